"""Pipelines and batches: what an app defines and starts, and the records the database keeps.

A **pipeline** is an ordered list of steps, each a task with its own options (queue, retries, a
``deadline`` for the step, ...). Starting one creates one ``conveyor_pipelines`` row and the first
step's job; each later step's job is enqueued by the database in the transaction that records the
previous step's success, with that step's result as its first argument (Celery-chain style). A
step that ends dead or cancelled, or outlives its deadline, fails the pipeline.

A **batch** is a group of jobs enqueued together and counted as they finish; its ``on_complete``
job is enqueued exactly once, in the transaction that finishes the last of them, with the counts
as its first argument. See docs/pipelines.md.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from . import serialization
from .errors import ConfigurationError, ConveyorError
from .options import DEFAULT_MAX_ATTEMPTS, Options, check_arguments, check_name

if TYPE_CHECKING:
    from .app import Conveyor, EnqueueRequest, Task
    from .job import Job

ENTITY_MAX = 500
#: Options that make no sense for a job the database enqueues later on its own: it is never a
#: duplicate of anything, depends on nothing but the step before, and is due when it is enqueued
#: (``delay`` is allowed).
_NOT_FOR_SPECS = ("unique_key", "idempotency_key", "depends_on", "run_at")


class PipelineState(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a step ended dead or cancelled, outlived its deadline, or was deleted
    CANCELLED = "cancelled"  # by request (app.cancel_pipeline)

    @property
    def terminal(self) -> bool:
        return self is not PipelineState.RUNNING


class PipelineFailedError(ConveyorError):
    """Raised when waiting for the result of a pipeline that failed or was cancelled.
    ``pipeline`` is the finished pipeline; ``error`` why it failed."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.error = pipeline.error
        super().__init__(
            f"pipeline {pipeline.id} ({pipeline.name}) {pipeline.state.value}: "
            f"{pipeline.error or 'no error recorded'}"
        )

    def __reduce__(self) -> tuple[type[PipelineFailedError], tuple[Pipeline]]:
        return (type(self), (self.pipeline,))


class PipelineNotFoundError(ConveyorError, LookupError):
    """No pipeline with the given id."""


class BatchNotFoundError(ConveyorError, LookupError):
    """No batch with the given id."""


# -- specs: a job the database enqueues later ----------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """A job to enqueue later, stored as JSON: a pipeline step, or a batch's on_complete. Its
    arguments are what the database puts first (the previous step's result, the batch's counts,
    or a pipeline's start arguments) followed by ``args``."""

    task: str
    queue: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None
    priority: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_snoozes: int | None = None
    deadline: float | None = None
    timeout: float | None = None
    concurrency_key: str | None = None
    concurrency_limit: int = 1
    delay: float = 0.0
    #: The step's name (pipelines only).
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["args"] = list(self.args)
        out["kwargs"] = dict(self.kwargs or {})
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobSpec:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["args"] = tuple(values.get("args") or ())
        return cls(**values)

    @classmethod
    def build(
        cls,
        where: str,
        task: str,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        options: Options,
        max_payload_bytes: int,
        name: str | None = None,
    ) -> JobSpec:
        bad = [n for n in _NOT_FOR_SPECS if getattr(options, n) is not None]
        if bad:
            raise ConfigurationError(
                f"{where}: option{'s' if len(bad) > 1 else ''} {', '.join(bad)} cannot be used "
                "here (the database enqueues this job later: it is due when enqueued, depends on "
                "nothing else, and is never deduplicated)"
            )
        args, kwargs = check_arguments(args, kwargs, where)
        serialization.dumps(list(args), f"{where} args", max_payload_bytes)
        serialization.dumps(kwargs, f"{where} kwargs", max_payload_bytes)
        settled = options.settled()
        return cls(
            task=task,
            queue=settled.queue,
            args=args,
            kwargs=kwargs,
            priority=settled.priority,
            max_attempts=settled.max_attempts,
            max_snoozes=options.max_snoozes,
            deadline=options.deadline,
            timeout=options.timeout,
            concurrency_key=options.concurrency_key,
            concurrency_limit=settled.concurrency_limit,
            delay=settled.delay,
            name=name,
        )


def spec_from_request(request: EnqueueRequest, where: str, max_payload_bytes: int) -> JobSpec:
    """A batch's on_complete, from ``task.request(...)`` / ``task.options(...).request(...)``."""
    from .app import EnqueueRequest

    if not isinstance(request, EnqueueRequest):
        raise ConfigurationError(
            f"{where} must be built with task.request(...), not {type(request).__name__}"
        )
    return JobSpec.build(
        where, request.task, request.args, request.kwargs, request.options, max_payload_bytes
    )


# -- pipelines -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step of a pipeline: ``task.step(name=None, args=(), kwargs=None, **options)``.

    Step 1 is called with the pipeline's start arguments, then ``args``; every later step with the
    previous step's result, then ``args``; ``kwargs`` always. ``deadline`` bounds the whole step,
    counted from its job's first start, snoozes and retries included."""

    name: str
    spec: JobSpec


def make_step(
    task: Task[Any, Any],
    name: str | None,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None,
    options: dict[str, Any],
) -> Step:
    step_name = check_name("step", task.name.rsplit(".", 1)[-1] if name is None else name)
    where = f"step {step_name}"
    own = Options.build(where, **options)
    if own.backoff is not None:
        raise ConfigurationError(
            f"{where}: backoff is the task's own (workers read it from their registry): "
            f"set it with @app.task(backoff=...)"
        )
    merged = task.defaults.merged(own)
    spec = JobSpec.build(
        where, task.name, args, kwargs, merged, task.app.max_payload_bytes, name=step_name
    )
    return Step(step_name, spec)


class PipelineDefinition:
    """A named, ordered list of steps (``app.pipeline(name, steps)``); ``start`` runs it."""

    def __init__(self, app: Conveyor, name: str, steps: Sequence[Step | Task[Any, Any]]) -> None:
        self.app = app
        self.name = check_name("pipeline", name)
        if isinstance(steps, str | bytes) or not isinstance(steps, list | tuple) or not steps:
            raise ConfigurationError(f"pipeline {name}: steps must be a non-empty list of steps")
        out: list[Step] = []
        for i, step in enumerate(steps):
            if not isinstance(step, Step):
                step = _as_step(step, f"pipeline {name} step {i + 1}")
            if any(s.name == step.name for s in out):
                raise ConfigurationError(
                    f"pipeline {name}: two steps are named {step.name!r}; "
                    "name them apart with task.step(name=...)"
                )
            out.append(step)
        self.steps: tuple[Step, ...] = tuple(out)

    def __repr__(self) -> str:
        return f"<PipelineDefinition {self.name}: {' -> '.join(s.name for s in self.steps)}>"

    def start(
        self,
        *,
        entity: str | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        connection: Any = None,
    ) -> Pipeline:
        """Start a run: one pipeline record and the first step's job, in one transaction (with
        ``connection``, the caller's own sqlite3 / psycopg connection: inside the transaction
        open on it, never committed by Conveyor, as ``enqueue(connection=...)`` does). The
        first step is called with ``args`` and ``kwargs`` (before its own). ``entity`` labels
        what the run is about (a project id, ...), for listing and display."""
        return self.app.start_pipeline(
            self, entity=entity, args=args, kwargs=kwargs, connection=connection
        )

    async def start_async(
        self,
        *,
        entity: str | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        connection: Any = None,
    ) -> Pipeline:
        import asyncio

        return await asyncio.to_thread(
            self.start, entity=entity, args=args, kwargs=kwargs, connection=connection
        )


def _as_step(item: object, where: str) -> Step:
    from .app import BoundTask, Task

    if isinstance(item, Task):
        return item.step()
    if isinstance(item, BoundTask):
        raise ConfigurationError(f"{where}: use task.step(**options), not task.options(...)")
    raise ConfigurationError(f"{where} is a {type(item).__name__}; build steps with task.step()")


def check_entity(entity: object) -> str | None:
    if entity is None:
        return None
    if not isinstance(entity, str) or not entity or len(entity) > ENTITY_MAX:
        raise ConfigurationError(
            f"entity={entity!r} must be a non-empty string of at most {ENTITY_MAX} characters"
        )
    return entity


@dataclass(frozen=True)
class Pipeline:
    """A snapshot of one pipeline run. Times are UTC, from the database clock."""

    id: int
    name: str
    entity: str | None
    state: PipelineState
    steps: tuple[JobSpec, ...] = field(repr=False)
    #: Index into ``steps`` of the step running now (or the last one that ran, once finished).
    current_step: int
    current_job_id: int | None
    #: When the current step's job first started (None until a worker claims it): its deadline
    #: counts from here.
    step_started_at: datetime | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    #: The last step's result, once succeeded.
    return_value: Any
    error: str | None
    _app: ClassVar[Conveyor | None] = None

    @property
    def step(self) -> str:
        """The current step's name."""
        return self.steps[self.current_step].name or self.steps[self.current_step].task

    @property
    def step_names(self) -> list[str]:
        return [s.name or s.task for s in self.steps]

    @property
    def step_deadline(self) -> float | None:
        return self.steps[self.current_step].deadline

    def _owner(self) -> Conveyor:
        if self._app is None:
            raise ConfigurationError(
                f"pipeline {self.id} was not returned by a Conveyor app: use app.get_pipeline(id)"
            )
        return self._app

    def refresh(self) -> Pipeline:
        return self._owner().get_pipeline(self.id)

    def result(self, timeout: float | None = None) -> Any:
        """Wait (at most ``timeout`` s; None: for ever) until the pipeline finishes; the last
        step's result. PipelineFailedError if it failed or was cancelled, TimeoutError."""
        if self.state == PipelineState.SUCCEEDED:
            return self.return_value
        return self._owner().pipeline_result(self.id, timeout)

    async def wait(self, timeout: float | None = None) -> Any:
        """``result()`` for async code."""
        if self.state == PipelineState.SUCCEEDED:
            return self.return_value
        return await self._owner().pipeline_result_async(self.id, timeout)

    def next_change(self, timeout: float | None = None) -> Pipeline:
        """Wait until the pipeline moved on from this snapshot (another step, or finished) and
        return the new snapshot; TimeoutError if it did not within ``timeout`` seconds."""
        return self._owner().wait_pipeline_change(self, timeout)

    async def next_change_async(self, timeout: float | None = None) -> Pipeline:
        return await self._owner().wait_pipeline_change_async(self, timeout)

    def cancel(self, reason: str = "cancelled by request") -> Pipeline:
        return self._owner().cancel_pipeline(self.id, reason)

    def jobs(self) -> list[Job]:
        """The jobs of the steps that ran so far, in order."""
        return self._owner().pipeline_jobs(self.id)


def pipeline_moved(before: Pipeline, now: Pipeline) -> bool:
    return (now.state, now.current_step) != (before.state, before.current_step)


# -- batches -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """A snapshot of one batch: how many of its jobs succeeded, failed (dead or cancelled) or are
    still pending, and, once all finished, when, with the on_complete job enqueued then."""

    id: int
    total: int
    succeeded: int
    failed: int
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    on_complete: JobSpec | None = field(repr=False)
    on_complete_job_id: int | None
    _app: ClassVar[Conveyor | None] = None

    @property
    def pending(self) -> int:
        return self.total - self.succeeded - self.failed

    @property
    def complete(self) -> bool:
        return self.completed_at is not None

    def counts(self) -> dict[str, int]:
        """What on_complete receives as its first argument (with ``batch_id``)."""
        return {
            "batch_id": self.id,
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
        }

    def _owner(self) -> Conveyor:
        if self._app is None:
            raise ConfigurationError(
                f"batch {self.id} was not returned by a Conveyor app: use app.get_batch(id)"
            )
        return self._app

    def refresh(self) -> Batch:
        return self._owner().get_batch(self.id)

    def result(self, timeout: float | None = None) -> Batch:
        """Wait (at most ``timeout`` s; None: for ever) until every job of the batch finished;
        the completed batch (its counts). TimeoutError if the time ran out first."""
        if self.complete:
            return self
        return self._owner().batch_result(self.id, timeout)

    async def wait(self, timeout: float | None = None) -> Batch:
        if self.complete:
            return self
        return await self._owner().batch_result_async(self.id, timeout)

    def next_change(self, timeout: float | None = None) -> Batch:
        """Wait until a job of the batch finished since this snapshot; the new snapshot."""
        return self._owner().wait_batch_change(self, timeout)

    async def next_change_async(self, timeout: float | None = None) -> Batch:
        return await self._owner().wait_batch_change_async(self, timeout)

    def jobs(self) -> list[Job]:
        return self._owner().batch_jobs(self.id)


def batch_moved(before: Batch, now: Batch) -> bool:
    keys = ("succeeded", "failed", "completed_at")
    return any(getattr(now, k) != getattr(before, k) for k in keys)
