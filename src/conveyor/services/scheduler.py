"""The scheduler: enqueues the due tick of each periodic job (``app.periodic``, periodic.py).

Every worker runs it about once a second, from as many hosts as there are; the idempotency key of
a tick's job lets one enqueue of it in, so each tick runs once whoever saw it first. Times come
from the database's clock, which every worker shares, not from each host's own.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from ..job import Job

if TYPE_CHECKING:
    from ..app import Conveyor

logger = logging.getLogger("conveyor.scheduler")

#: How often (seconds) a worker looks for due ticks.
SCHEDULE_INTERVAL = 1.0


class Scheduler:
    """The periodic jobs of ``app``, enqueued tick by tick."""

    def __init__(self, app: Conveyor) -> None:
        self.app = app
        #: Per schedule, the last tick known to be enqueued (by this scheduler or another).
        self._enqueued: dict[str, datetime] = {}

    def run_once(self, now: datetime | None = None) -> list[Job]:
        """Enqueue, for each schedule, its latest tick at or before ``now`` (default: the database
        clock) unless that tick is older than the schedule's grace or already enqueued; one
        statement for all. The jobs this call inserted (not those another scheduler inserted
        first)."""
        periodic = list(self.app.periodic_jobs.values())
        if not periodic:
            return []
        at = now if now is not None else self.app.backend.db_now()
        due = [
            (p, tick)
            for p in periodic
            if (tick := p.due(at)) is not None and self._enqueued.get(p.name) != tick
        ]
        if not due:
            return []
        requests = [self.app.periodic_request(p, tick) for p, tick in due]
        jobs = self.app.enqueue_many(requests)
        for p, tick in due:
            self._enqueued[p.name] = tick
        inserted = [job for job in jobs if not job.deduplicated]
        for job in inserted:
            logger.info("enqueued periodic job %s (%s) for %s", job.id, job.task, job.run_at)
        return inserted
