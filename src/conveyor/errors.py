"""Every error Conveyor raises on purpose derives from :class:`ConveyorError`.

The CLI prints these as one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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
    """Raised when waiting for the result of a job that ended dead or cancelled."""
