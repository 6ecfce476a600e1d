"""The rescuer: jobs whose worker died (their lease expired) go back to retrying, or dead."""

from __future__ import annotations

import logging
from datetime import datetime

from ..backends.base import RESCUE_BATCH, Backend
from ..job import Job
from .batching import until_short_batch

logger = logging.getLogger("conveyor.rescuer")


class Rescuer:
    """Any live worker runs this periodically; concurrent runs are safe (each stuck job is
    rescued once, by whichever statement locks it first)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def run_once(self, now: datetime | None = None) -> list[Job]:
        """Rescue every job whose lease expired before ``now`` (default: the database clock)."""
        rescued = until_short_batch(lambda: self.backend.job_rescue_stuck(now), RESCUE_BATCH)
        for job in rescued:
            logger.warning("rescued job %s (%s): %s -> %s", job.id, job.task, job.error, job.state)
        return rescued
