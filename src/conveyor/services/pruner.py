"""The pruner: deletes finished jobs (with their history), old history, and finished pipelines and
completed batches (once none of their jobs is left) past their retention.

Only one process of the fleet prunes at a time: on PostgreSQL ``run_once`` holds a session
advisory lock (a second pruner skips its run); on SQLite the single writer lock serializes every
batch. The worker calls :meth:`Pruner.run_if_due`, which first claims the run for the interval in
the ``conveyor_leader`` table, so one worker of the fleet prunes per interval.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..backends.base import Backend
from ..backends.flows import flow_store
from ..errors import ConfigurationError
from ..job import JobState

logger = logging.getLogger("conveyor.pruner")

DAY = 86_400.0
#: Rows deleted per statement; each statement is its own short transaction.
DEFAULT_BATCH_SIZE = 1000
LEADER_NAME = "prune"

Age = float | timedelta | None


def _seconds(name: str, value: Age) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(
            f"retention {name}={value!r} must be a positive number of seconds, a timedelta, "
            "or None (keep for ever)"
        )
    return float(value)


@dataclass(frozen=True)
class Retention:
    """How long finished jobs, history, finished pipelines and completed batches are kept, in
    seconds (or a timedelta); None keeps them for ever. A job's age counts from its
    ``finished_at``; an event's from its ``at``; a pipeline's from its ``finished_at``; a batch's
    from its ``completed_at``. Deleting a job deletes its events; ``events`` also trims the history
    of jobs still kept. A pipeline or batch is kept while any of its jobs is (so a pipeline whose
    failed step is kept as dead for 30 days stays as long, with it).

    Defaults: succeeded and cancelled jobs 7 days; dead jobs (the dead-letter queue, which someone
    may still want to inspect and retry) 30 days; events, pipelines and batches 30 days.
    """

    succeeded: Age = 7 * DAY
    cancelled: Age = 7 * DAY
    dead: Age = 30 * DAY
    events: Age = 30 * DAY
    pipelines: Age = 30 * DAY
    batches: Age = 30 * DAY

    def __post_init__(self) -> None:
        for name in ("succeeded", "cancelled", "dead", "events", "pipelines", "batches"):
            object.__setattr__(self, name, _seconds(name, getattr(self, name)))

    def for_state(self, state: JobState) -> float | None:
        """Seconds a finished job in ``state`` is kept, or None (for ever)."""
        return self.age_of(state.value)

    def age_of(self, name: str) -> float | None:
        """Seconds kept for ``name`` (a finished state, "events", "pipelines" or "batches"); None:
        for ever. Already
        checked and converted to seconds by ``__post_init__``."""
        age: float | None = getattr(self, name)
        return age


@dataclass
class PruneResult:
    """What one run deleted: jobs per state, events (besides those deleted with their job),
    pipelines and batches."""

    jobs: dict[str, int] = field(default_factory=dict)
    events: int = 0
    pipelines: int = 0
    batches: int = 0
    statements: int = 0
    #: True when another process held the prune lock, so this run did nothing.
    skipped: bool = False

    @property
    def total_jobs(self) -> int:
        return sum(self.jobs.values())


class Pruner:
    """Deletes what ``retention`` no longer keeps, ``batch_size`` rows per statement."""

    def __init__(
        self,
        backend: Backend,
        retention: Retention | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be a positive integer, not {batch_size!r}")
        self.backend = backend
        self.retention = retention or Retention()
        self.batch_size = batch_size

    def run_once(self, now: datetime | None = None) -> PruneResult:
        """One full pass at ``now`` (default: the database clock): every finished job past its
        state's retention, then every event past the events retention, then the pipelines and
        batches past theirs that no job is left of."""
        with self.backend.maintenance_lock(LEADER_NAME) as held:
            if not held:
                logger.info("prune skipped: another process is pruning")
                return PruneResult(skipped=True)
            result = PruneResult()
            self._prune_jobs_and_events(result, now)
            self._prune_flows(result, now)
        if result.total_jobs or result.events or result.pipelines or result.batches:
            logger.info(
                "pruned %s jobs %s, %d events, %d pipelines and %d batches",
                result.total_jobs,
                result.jobs,
                result.events,
                result.pipelines,
                result.batches,
            )
        return result

    def run_if_due(
        self, holder: str, interval: float, now: datetime | None = None
    ) -> PruneResult | None:
        """Run once if no process of the fleet has in the last ``interval`` seconds (claimed in the
        database); None when another one has."""
        if not self.backend.leader_claim(LEADER_NAME, holder, interval, now):
            return None
        return self.run_once(now)

    def _prune_jobs_and_events(self, result: PruneResult, now: datetime | None) -> None:
        for state in (JobState.SUCCEEDED, JobState.CANCELLED, JobState.DEAD):
            age = self.retention.for_state(state)
            if age is not None:
                result.jobs[state.value] = self._batches(self._jobs_of(state, age, now), result)
        events_age = self.retention.age_of("events")
        if events_age is not None:
            prune = functools.partial(self.backend.event_prune, events_age, self.batch_size, now)
            result.events = self._batches(prune, result)

    def _prune_flows(self, result: PruneResult, now: datetime | None) -> None:
        """Pipelines and batches: after the jobs, whose pruning may leave them without any."""
        flows = flow_store(self.backend)
        for name, prune in (("pipelines", flows.pipeline_prune), ("batches", flows.batch_prune)):
            age = self.retention.age_of(name)
            if age is not None:
                deleted = self._batches(functools.partial(prune, age, self.batch_size, now), result)
                setattr(result, name, deleted)

    def _jobs_of(self, state: JobState, age: float, now: datetime | None) -> Callable[[], int]:
        return lambda: self.backend.job_prune(state, age, self.batch_size, now)

    def _batches(self, prune: Callable[[], int], result: PruneResult) -> int:
        """Run ``prune`` until a statement deletes less than a full batch; the rows deleted."""
        total = 0
        while True:
            deleted = prune()
            result.statements += 1
            total += deleted
            if deleted < self.batch_size:
                return total
