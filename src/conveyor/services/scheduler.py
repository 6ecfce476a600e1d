"""The scheduler: enqueues the due tick of each periodic job (``app.periodic``, periodic.py).

Every worker runs it about once a second, from as many hosts as there are; a tick is enqueued by
the transaction that moves its schedule's last tick forward to it (``conveyor_periodic``), so
each tick runs once whoever saw it first, and never again. Times come from the database's clock,
which every worker shares, not from each host's own.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from ..job import Job
from ..periodic import Periodic

if TYPE_CHECKING:
    from ..app import Conveyor

logger = logging.getLogger("conveyor.scheduler")

#: How often (seconds) a worker looks for due ticks.
SCHEDULE_INTERVAL = 1.0


class Scheduler:
    """The periodic jobs of ``app``, enqueued tick by tick."""

    def __init__(self, app: Conveyor) -> None:
        self.app = app
        #: Per schedule, the last tick this scheduler asked for (enqueued by it or another).
        self._enqueued: dict[str, datetime] = {}

    def run_once(self, now: datetime | None = None) -> list[Job]:
        """Enqueue, for each schedule, its ticks at or before ``now`` (default: the database
        clock) that are at most its grace old, since this scheduler's last pass (on its first,
        the latest alone), in one transaction for all (``Conveyor.enqueue_periodic``): a tick
        another scheduler enqueued, or any earlier one, is not enqueued again. The jobs this
        call inserted."""
        periodic = list(self.app.periodic_jobs.values())
        if not periodic:
            return []
        at = now if now is not None else self.app.backend.db_now()
        due = [(p, tick) for p in periodic for tick in self._ticks(p, at)]
        if not due:
            return []
        inserted = self.app.enqueue_periodic(due)
        for p, tick in due:  # in order: the last one of each schedule stays
            self._enqueued[p.name] = tick
        for job in inserted:
            logger.info("enqueued periodic job %s (%s) for %s", job.id, job.task, job.run_at)
        return inserted

    def _ticks(self, periodic: Periodic, at: datetime) -> list[datetime]:
        """Since this scheduler's last pass, every tick within grace (a late pass makes up what
        it missed); on its first pass, the latest alone (ticks of a downtime are not made up)."""
        last = self._enqueued.get(periodic.name)
        ticks = periodic.due_ticks(at, last)
        return ticks if last is not None else ticks[-1:]
