"""Every error Conveyor raises on purpose derives from :class:`ConveyorError`.

The CLI prints these as one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .job import Job


class ConveyorError(Exception):
    """Base class of Conveyor's own errors."""


class ConfigurationError(ConveyorError):
    """A bad database URL, option or name given by the caller."""


class InvalidArgumentsError(ConveyorError, TypeError):
    """Job arguments that cannot be stored as JSON (the message names the bad value's path)."""


class DatabaseUnavailableError(ConveyorError):
    """The database server cannot be reached."""


class SchemaError(ConveyorError):
    """The database is not migrated, or was migrated by a newer Conveyor."""


class UnknownTaskError(ConveyorError, LookupError):
    """A task name that no ``@app.task`` registered."""


class JobNotFoundError(ConveyorError, LookupError):
    """No job with the given id."""


class InvalidTransitionError(ConveyorError):
    """An operation that the job's current state does not allow (e.g. retrying a running job)."""


class JobFailedError(ConveyorError):
    """Raised when waiting for the result of a job that ended dead or cancelled. ``job`` is the
    finished job; ``error`` its last error's message (None if it recorded none)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.error = job.error
        reason = job.error if job.error is not None else "no error recorded"
        super().__init__(f"job {job.id} ({job.task}) ended {job.state.value}: {reason}")

    def __reduce__(self) -> tuple[type[JobFailedError], tuple[Job]]:
        return (type(self), (self.job,))
