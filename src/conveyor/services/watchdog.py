"""The watchdog: fails pipelines whose current step outlived its deadline.

A step's ``deadline`` counts from its job's first start (``started_at``), snoozes and retries
included, never from the pipeline's creation: a step that waited in the queue behind a late
worker still has its whole deadline once it starts. The job's own deadline already ends it
``dead`` when a snooze or retry would pass the deadline (the pipeline then fails by trigger);
the watchdog catches the rest: a step still running, or queued behind busy workers, past it.
It fails the pipeline ("step wait_ready exceeded its 120 s deadline (started 12:01:30)") and
cancels the step's job at once; a worker still running it loses its lease and drops its outcome.

Every worker runs it every ``app.watchdog_interval`` seconds (``Conveyor(watchdog_interval=...)``,
2 s by default; None turns it off). Concurrent passes are safe: each overdue step is handled by
the first transaction that locks its job. A pass that finds nothing only reads.
"""

from __future__ import annotations

import logging
from datetime import datetime

from ..backends.base import Backend
from ..backends.flows import EXPIRE_BATCH, flow_store
from ..pipelines import Pipeline
from .batching import until_short_batch

logger = logging.getLogger("conveyor.watchdog")


class Watchdog:
    def __init__(self, backend: Backend) -> None:
        self.flows = flow_store(backend)

    def run_once(self, now: datetime | None = None) -> list[Pipeline]:
        """Fail every running pipeline whose current step started more than its deadline before
        ``now`` (default: the database clock); returns them."""
        failed = until_short_batch(lambda: self.flows.pipeline_expire_steps(now), EXPIRE_BATCH)
        for pipeline in failed:
            logger.warning(
                "pipeline %s (%s) failed: %s", pipeline.id, pipeline.name, pipeline.error
            )
        return failed
