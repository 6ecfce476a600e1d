"""The job record as stored, and its states."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .app import Conveyor


class JobState(enum.StrEnum):
    """States of a job; docs/state-machine.md draws the transitions between them."""

    WAITING = "waiting"  # blocked until every job it depends on succeeded; never claimed
    QUEUED = "queued"  # due now, or scheduled for later (run_at)
    RUNNING = "running"  # claimed by a worker that holds its lease
    RETRYING = "retrying"  # failed an attempt; waiting out its backoff until run_at
    SUCCEEDED = "succeeded"
    DEAD = "dead"  # attempts (or snooze/deadline limits) exhausted: the dead-letter queue
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def active(self) -> bool:
        return not self.terminal


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED})
#: The states a worker claims from (when run_at is due).


@dataclass(frozen=True)
class Job:
    """A snapshot of one job row. Times are timezone-aware UTC and come from the database clock.

    Jobs an app returns (enqueue, get_job, ...) know their app, so ``job.result(timeout)`` and
    ``await job.wait(timeout)`` can wait for the job to finish and return its result.
    """

    id: int
    queue: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    state: JobState
    priority: int
    created_at: datetime
    run_at: datetime
    started_at: datetime | None
    attempted_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    attempt: int
    max_attempts: int
    snoozes: int
    max_snoozes: int | None
    deadline: float | None
    timeout: float | None
    last_error: dict[str, Any] | None
    errors: list[dict[str, Any]]
    #: The task's return value (stored as JSON) once the job succeeded; see :meth:`result`.
    return_value: Any
    unique_key: str | None
    idempotency_key: str | None
    concurrency_key: str | None
    concurrency_limit: int
    cancel_requested: bool
    #: True when an enqueue returned this existing job instead of inserting a new one.
    deduplicated: bool = field(default=False, compare=False)
    #: The app that returned this snapshot, set by the app (``Conveyor._bind``). Not a dataclass
    #: field: no part of equality, repr, ``replace`` or the constructor, and free to build.
    _app: ClassVar[Conveyor | None] = None

    @property
    def error(self) -> str | None:
        """The last error's message, if any."""
        return None if self.last_error is None else str(self.last_error.get("message"))

    def result(self, timeout: float | None = None) -> Any:
        """Wait (at most ``timeout`` seconds; None: for ever) until the job finishes and return its
        result. Raises JobFailedError (with the job's last error) if it ended dead or cancelled,
        TimeoutError if it is still unfinished when the time is up."""
        if self.state == JobState.SUCCEEDED:  # terminal for ever: the snapshot is the answer
            return self.return_value
        return self._owner().result(self.id, timeout)

    async def wait(self, timeout: float | None = None) -> Any:
        """``result()`` for async code: waits without blocking the event loop."""
        if self.state == JobState.SUCCEEDED:
            return self.return_value
        return await self._owner().result_async(self.id, timeout)

    def _owner(self) -> Conveyor:
        if self._app is None:
            raise ConfigurationError(
                f"job {self.id} was not returned by a Conveyor app (it was built by a backend "
                "directly), so it cannot wait for itself: use app.result(job.id)"
            )
        return self._app


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's history: its insert (``from_state`` None) or one state transition,
    recorded by the database itself (triggers), with the database clock's time."""

    id: int
    job_id: int
    at: datetime
    from_state: JobState | None
    to_state: JobState
    #: The lease owner involved: the claiming worker on a claim, the worker that held the job
    #: when a running job leaves running; None for transitions no worker made.
    worker: str | None
    #: The attempt that ended when a running job leaves running; else the job's attempt after.
    attempt: int
    #: The error this transition recorded (kind, message, attempt, at; no traceback), if any.
    error: dict[str, Any] | None

    @property
    def message(self) -> str | None:
        return None if self.error is None else str(self.error.get("message"))
