"""Conveyor: durable jobs on the database you already have (SQLite or PostgreSQL)."""

from .app import BoundTask, Conveyor, EnqueueRequest, RetryResult, Task
from .control import Cancel, JobContext, Snooze, current_job
from .errors import (
    ConfigurationError,
    ConveyorError,
    DatabaseUnavailableError,
    InvalidArgumentsError,
    InvalidTransitionError,
    JobFailedError,
    JobNotFoundError,
    SchemaError,
    UnknownTaskError,
)
from .job import Job, JobEvent, JobState
from .periodic import Cron, Every, Periodic
from .services.pruner import Pruner, PruneResult, Retention
from .states import Backoff
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "Backoff",
    "Batch",
    "BatchNotFoundError",
    "BoundTask",
    "Cancel",
    "ConfigurationError",
    "Conveyor",
    "ConveyorError",
    "Cron",
    "DatabaseUnavailableError",
    "EnqueueRequest",
    "Every",
    "InvalidArgumentsError",
    "InvalidTransitionError",
    "Job",
    "JobContext",
    "JobEvent",
    "JobFailedError",
    "JobNotFoundError",
    "JobState",
    "Periodic",
    "Pipeline",
    "PipelineDefinition",
    "PipelineFailedError",
    "PipelineNotFoundError",
    "PipelineState",
    "PruneResult",
    "Pruner",
    "Retention",
    "RetryResult",
    "SchemaError",
    "Snooze",
    "Task",
    "UnknownTaskError",
    "Worker",
    "__version__",
    "current_job",
]
