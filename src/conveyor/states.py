"""Pure state-machine logic: outcomes of an attempt and retry backoff. No I/O here.

The worker turns what a task did (returned, raised, snoozed, cancelled, timed out) into an
:class:`Outcome` with these functions; a backend writes it only if the job is still running under
the same attempt and lease (fencing). ``now`` is always the database's clock as seen by the worker.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from .job import Job, JobState

#: Transitions a job may take; the schema's CHECK constraints enforce the invariants of each state.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # every dependency succeeded / one ended dead or cancelled (or was deleted), or cancel
    JobState.WAITING: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RETRYING: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {
            JobState.SUCCEEDED,
            JobState.RETRYING,
            JobState.DEAD,
            JobState.CANCELLED,
            JobState.QUEUED,  # snoozed, or handed back at shutdown: the attempt is refunded
        }
    ),
    JobState.SUCCEEDED: frozenset(),
    # manual retry: waiting again while a dependency is unfinished
    JobState.DEAD: frozenset({JobState.QUEUED, JobState.WAITING}),
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.WAITING}),
}
#: The states a job is inserted in: waiting for dependencies, queued, or cancelled at once
#: because a dependency already ended dead or cancelled.
INITIAL_STATES = frozenset({JobState.WAITING, JobState.QUEUED, JobState.CANCELLED})


def can_transition(src: JobState, dst: JobState) -> bool:
    return dst in TRANSITIONS[src]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits ``min(cap, base * factor**(n-1))`` seconds,
    stretched by a random factor in ``[1, 1 + jitter]``.

    The default waits about 1, 2, 4, 8 ... seconds, never more than an hour (+25% jitter).
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 3600.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if self.base < 0 or self.factor < 1 or self.cap < 0 or self.jitter < 0:
            raise ValueError(f"invalid backoff {self!r}: base, cap, jitter >= 0 and factor >= 1")

    def __call__(self, attempt: int, rng: random.Random | None = None) -> float:
        exponent = min(max(attempt - 1, 0), 64)
        delay = min(self.cap, self.base * self.factor**exponent)
        spread = (rng or random).uniform(0.0, self.jitter) if self.jitter else 0.0
        return delay * (1.0 + spread)


BackoffPolicy = Backoff | Callable[[int], float]


class Outcome(NamedTuple):
    """What to write for one attempt. ``delay`` counts from the database's now at write time.
    (A named tuple: one is made per job on the hot path, several times cheaper than a frozen
    dataclass.)"""

    job_id: int
    attempt: int
    state: JobState
    delay: float = 0.0
    result: str | None = None  # JSON text, only for SUCCEEDED
    error: dict[str, Any] | None = None
    refund_attempt: bool = False
    snoozed: bool = False

    @property
    def plain_success(self) -> bool:
        """A success with nothing else to write: most outcomes, which backends write with a
        cheaper statement."""
        return (
            self.state == JobState.SUCCEEDED
            and self.error is None
            and not self.refund_attempt
            and not self.snoozed
        )


def error_entry(
    job: Job, kind: str, message: str, now: datetime, traceback: str | None = None
) -> dict[str, Any]:
    """One element of a job's error history."""
    entry: dict[str, Any] = {
        "attempt": job.attempt,
        "at": now.isoformat(),
        "kind": kind,
        "message": message,
    }
    if traceback:
        entry["traceback"] = traceback
    return entry


def succeed(job: Job, result_json: str) -> Outcome:
    return Outcome(job.id, job.attempt, JobState.SUCCEEDED, result=result_json)


def cancel(job: Job, reason: str, now: datetime) -> Outcome:
    entry = error_entry(job, "cancelled", reason, now)
    return Outcome(job.id, job.attempt, JobState.CANCELLED, error=entry)


def deadline_at(job: Job) -> datetime | None:
    """When the job's total ``deadline`` (counted from its first start) runs out."""
    if job.deadline is None or job.started_at is None:
        return None
    return job.started_at + timedelta(seconds=job.deadline)


def fail(
    job: Job,
    kind: str,
    message: str,
    now: datetime,
    backoff: BackoffPolicy,
    traceback: str | None = None,
) -> Outcome:
    """An attempt failed: retry after a backoff, or dead when attempts or the deadline run out."""
    if job.attempt >= job.max_attempts:
        entry = error_entry(job, kind, message, now, traceback)
        return Outcome(job.id, job.attempt, JobState.DEAD, error=entry)
    delay = max(0.0, float(backoff(job.attempt)))
    limit = deadline_at(job)
    if limit is not None and now + timedelta(seconds=delay) > limit:
        message += f" (not retried: the job's {job.deadline:g} s deadline runs out first)"
        entry = error_entry(job, kind, message, now, traceback)
        return Outcome(job.id, job.attempt, JobState.DEAD, error=entry)
    entry = error_entry(job, kind, message, now, traceback)
    return Outcome(job.id, job.attempt, JobState.RETRYING, delay=delay, error=entry)


def snooze(job: Job, seconds: float, now: datetime) -> Outcome:
    """Run again after ``seconds``; the attempt is refunded. Dead only past max_snoozes/deadline."""
    if job.max_snoozes is not None and job.snoozes >= job.max_snoozes:
        message = (
            f"snooze limit reached: max_snoozes={job.max_snoozes} (snoozed {job.snoozes} times)"
        )
        return Outcome(
            job.id, job.attempt, JobState.DEAD, error=error_entry(job, "snooze_limit", message, now)
        )
    limit = deadline_at(job)
    if limit is not None and now + timedelta(seconds=seconds) > limit:
        assert job.started_at is not None
        message = (
            f"deadline exceeded: the job's {job.deadline:g} s deadline (started "
            f"{job.started_at.isoformat(timespec='seconds')}) runs out before its next run"
        )
        return Outcome(
            job.id, job.attempt, JobState.DEAD, error=error_entry(job, "deadline", message, now)
        )
    return Outcome(
        job.id, job.attempt, JobState.QUEUED, delay=seconds, refund_attempt=True, snoozed=True
    )
