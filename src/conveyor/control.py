"""What a running task can raise or ask: Snooze, Cancel, and the current job's context."""

from __future__ import annotations

import contextvars
import math

from .errors import ConfigurationError
from .job import Job
from .options import MAX_DELAY


class Snooze(Exception):
    """Raise to run the job again after ``seconds``. Not a failure: the attempt is refunded and
    ``snoozes`` counted; only the task's ``max_snoozes`` or ``deadline`` can end it."""

    def __init__(self, seconds: float = 0.0) -> None:
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not math.isfinite(seconds)
            or not 0 <= seconds <= MAX_DELAY
        ):
            raise ConfigurationError(
                f"Snooze seconds must be a number from 0 to {MAX_DELAY:.0f} (100 years), "
                f"not {seconds!r}"
            )
        super().__init__(f"snooze {seconds:g} s")
        self.seconds = float(seconds)


class Cancel(Exception):
    """Raise to end the job as cancelled (no retry)."""

    def __init__(self, reason: str = "cancelled by the task") -> None:
        super().__init__(reason)
        self.reason = reason


class JobContext:
    """The running attempt, as seen from inside a task (``conveyor.current_job()``)."""

    __slots__ = ("_cancelled", "job", "worker_id")

    def __init__(self, job: Job, worker_id: str) -> None:
        self.job = job
        self.worker_id = worker_id
        self._cancelled = False  # set once by the worker's loop; read by the task's thread

    def __repr__(self) -> str:
        return (
            f"JobContext(job={self.job.id}, attempt={self.job.attempt}, worker={self.worker_id!r})"
        )

    @property
    def cancel_requested(self) -> bool:
        """True once cancellation was requested (or the attempt was abandoned). Sync tasks poll
        this; async tasks are cancelled directly."""
        return self._cancelled

    def request_cancel(self) -> None:
        """Called by the worker; a task raises Cancel itself (``raise_if_cancelled``)."""
        self._cancelled = True

    def raise_if_cancelled(self) -> None:
        if self._cancelled:
            raise Cancel("cancelled by request")


_current: contextvars.ContextVar[JobContext] = contextvars.ContextVar("conveyor_job")


def current_job() -> JobContext:
    """The context of the job this code runs in; LookupError outside a task."""
    try:
        return _current.get()
    except LookupError:
        raise LookupError("current_job() called outside a Conveyor task") from None
