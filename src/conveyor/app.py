"""The application object: task registry, queue declarations, enqueueing and job operations."""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar, overload

from . import serialization
from .backends.base import Backend, NewJob, QueueStats, open_backend
from .backends.migrate import check_version
from .errors import ConfigurationError, UnknownTaskError
from .job import Job, JobEvent
from .options import DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, Options, check_queue_name, check_task_name
from .results import DEFAULT_PUSH_POLL_INTERVAL, JobWaiter, outcome
from .services.pruner import Retention
from .states import Backoff, BackoffPolicy

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_URL = "sqlite:///conveyor.db"
ENV_URL = "CONVEYOR_DATABASE_URL"


@dataclass(frozen=True)
class EnqueueRequest:
    """One job to enqueue, made by ``task.request(...)``; pass a list to ``app.enqueue_many``."""

    task: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: Options


class Task(Generic[P, R]):
    """A registered task. Calling it runs the function directly; ``enqueue`` makes a job."""

    def __init__(self, app: Conveyor, fn: Callable[P, R], name: str, options: Options) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.defaults = options
        self.is_async = inspect.iscoroutinefunction(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    @property
    def queue(self) -> str:
        return self.defaults.queue or DEFAULT_QUEUE

    @property
    def backoff(self) -> BackoffPolicy:
        return self.defaults.backoff or Backoff()

    def options(self, **options: Any) -> BoundTask[P, R]:
        """This task with per-enqueue options (delay, priority, unique_key, idempotency_key,
        depends_on=[jobs or ids], ...)."""
        return BoundTask(self, Options.build(f"task {self.name}", **options))

    def request(self, *args: P.args, **kwargs: P.kwargs) -> EnqueueRequest:
        return EnqueueRequest(self.name, args, kwargs, self.defaults)

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Enqueue one job and return it. ``connection=`` (a keyword reserved by Conveyor) enqueues
        inside the caller's open transaction on that sqlite3/psycopg connection."""
        return self.options().enqueue(*args, **kwargs)

    async def enqueue_async(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        return await self.options().enqueue_async(*args, **kwargs)


class BoundTask(Generic[P, R]):
    """A task with options for one enqueue (``task.options(...)``)."""

    def __init__(self, task: Task[P, R], options: Options) -> None:
        self.task = task
        self._options = task.defaults.merged(options)

    def request(self, *args: P.args, **kwargs: P.kwargs) -> EnqueueRequest:
        return EnqueueRequest(self.task.name, args, kwargs, self._options)

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        connection = kwargs.pop("connection", None)
        request = self.request(*args, **kwargs)
        return self.task.app.enqueue_many([request], connection=connection)[0]

    async def enqueue_async(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        return await asyncio.to_thread(self.enqueue, *args, **kwargs)


class Conveyor:
    """A Conveyor application: ``Conveyor("sqlite:///jobs.db")`` or ``Conveyor("postgresql://...")``.

    The URL defaults to ``$CONVEYOR_DATABASE_URL``, else ``sqlite:///conveyor.db``. Nothing
    connects until first use; the schema version is checked then (``conveyor migrate`` creates it).
    ``retention`` says how long workers' pruner keeps finished jobs and history (see
    :class:`~conveyor.services.pruner.Retention` for the defaults).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        max_payload_bytes: int = serialization.DEFAULT_MAX_PAYLOAD_BYTES,
        retention: Retention | None = None,
    ) -> None:
        if retention is not None and not isinstance(retention, Retention):
            raise ConfigurationError(
                f"retention must be a conveyor.Retention, not {type(retention).__name__}"
            )
        self.url = url or os.environ.get(ENV_URL) or DEFAULT_URL
        self.max_payload_bytes = max_payload_bytes
        self.retention = retention or Retention()
        #: While waiting for results on PostgreSQL (which pushes), re-read the job this often.
        self.result_poll_interval = DEFAULT_PUSH_POLL_INTERVAL
        self._waiter = JobWaiter(self)
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.queues: dict[str, int | None] = {}
        self._backend: Backend | None = None
        self._schema_checked = False
        self._lock = threading.Lock()
        self._wake_callbacks: list[Callable[[], None]] = []

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        """The open backend, checked to carry this Conveyor's schema version."""
        backend = self.raw_backend
        if not self._schema_checked:
            check_version(backend.schema_version(), self.url)
            self._schema_checked = True
        return backend

    @property
    def raw_backend(self) -> Backend:
        """The open backend, without the schema check (for ``migrate``)."""
        with self._lock:
            if self._backend is None:
                self._backend = open_backend(self.url)
            return self._backend

    def migrate(self) -> list[int]:
        applied = self.raw_backend.migrate()
        self._schema_checked = False
        return applied

    def close(self) -> None:
        self._waiter.close()
        with self._lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None
                self._schema_checked = False

    def add_wake_callback(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after every enqueue from this process; returns a remover."""
        self._wake_callbacks.append(callback)
        return lambda: self._wake_callbacks.remove(callback)

    # -- declarations ---------------------------------------------------------------------------
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self, fn: None = None, /, *, name: str | None = None, **options: Any
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self, fn: Callable[P, R] | None = None, /, *, name: str | None = None, **options: Any
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function (sync or async) as a task: ``@app.task(queue=..., max_attempts=...,
        timeout=..., deadline=..., max_snoozes=..., backoff=..., priority=...,
        concurrency_limit=...)``. The name defaults to ``module.qualname``."""

        def register(func: Callable[P, R]) -> Task[P, R]:
            default = f"{func.__module__}.{func.__qualname__}"
            task_name = check_task_name(default if name is None else name)
            if task_name in self.tasks:
                raise ConfigurationError(f"a task named {task_name!r} is already registered")
            opts = Options.build(f"task {task_name}", **options)
            if opts.depends_on is not None:
                raise ConfigurationError(
                    f"task {task_name}: depends_on is per enqueue, not per task: use "
                    "task.options(depends_on=[...]).enqueue(...)"
                )
            task = Task(self, func, task_name, opts)
            self.tasks[task_name] = task
            return task

        return register(fn) if fn is not None else register

    def queue(self, name: str, *, concurrency: int | None = None) -> None:
        """Declare a queue; ``concurrency=N`` allows at most N running jobs in it, fleet-wide.
        Workers write the limit to the database when they start (``apply_queue_limits``)."""
        check_queue_name(name)
        if concurrency is not None:
            Options.build(f"queue {name}", concurrency_limit=concurrency)
        self.queues[name] = concurrency

    def apply_queue_limits(self) -> None:
        for name, limit in self.queues.items():
            self.backend.queue_configure(name, limit)

    def get_task(self, name: str) -> Task[Any, Any]:
        try:
            return self.tasks[name]
        except KeyError:
            raise UnknownTaskError(f"no task named {name!r} is registered") from None

    # -- enqueue --------------------------------------------------------------------------------
    def enqueue(self, task: str, *args: Any, connection: Any = None, **kwargs: Any) -> Job:
        """Enqueue a registered task by name."""
        return self.enqueue_many(
            [self.get_task(task).request(*args, **kwargs)], connection=connection
        )[0]

    def enqueue_raw(
        self,
        task: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        connection: Any = None,
        **options: Any,
    ) -> Job:
        """Enqueue a task by name without requiring it to be registered here (for producers that
        do not import the workers' code). A worker without that task ends the job dead."""
        opts = Options.build(f"task {task}", **options)
        request = EnqueueRequest(check_task_name(task), tuple(args), dict(kwargs or {}), opts)
        return self.enqueue_many([request], connection=connection)[0]

    def enqueue_many(self, requests: Iterable[EnqueueRequest], connection: Any = None) -> list[Job]:
        """Enqueue many jobs in one transaction and one round trip; one Job per request, in order."""
        new_jobs = [self._new_job(r, i) for i, r in enumerate(requests)]
        jobs = self._bind(self.backend.job_insert_many(new_jobs, connection=connection))
        for callback in list(self._wake_callbacks):
            callback()
        return jobs

    async def enqueue_many_async(
        self, requests: Iterable[EnqueueRequest], connection: Any = None
    ) -> list[Job]:
        return await asyncio.to_thread(self.enqueue_many, list(requests), connection)

    def _new_job(self, request: EnqueueRequest, index: int) -> NewJob:
        if not isinstance(request, EnqueueRequest):
            raise ConfigurationError(
                f"enqueue_many item {index} is a {type(request).__name__}; "
                "build items with task.request(...) or task.options(...).request(...)"
            )
        check_task_name(request.task)
        opts = request.options
        limit = self.max_payload_bytes
        return NewJob(
            task=request.task,
            queue=opts.queue or DEFAULT_QUEUE,
            args=serialization.dumps(list(request.args), "args", limit),
            kwargs=serialization.dumps(request.kwargs, "kwargs", limit),
            priority=opts.priority or 0,
            delay=opts.delay or 0.0,
            run_at=opts.run_at,
            max_attempts=opts.max_attempts or DEFAULT_MAX_ATTEMPTS,
            max_snoozes=opts.max_snoozes,
            deadline=opts.deadline,
            timeout=opts.timeout,
            unique_key=opts.unique_key,
            idempotency_key=opts.idempotency_key,
            concurrency_key=opts.concurrency_key,
            concurrency_limit=opts.concurrency_limit or 1,
            depends_on=opts.depends_on or (),
        )

    # -- operations -----------------------------------------------------------------------------
    def _bind(self, jobs: list[Job]) -> list[Job]:
        """Let these snapshots wait for themselves (``job.result()``) through this app."""
        for job in jobs:
            object.__setattr__(job, "_app", self)
        return jobs

    def get_job(self, job_id: int) -> Job:
        return self._bind([self.backend.job_get(job_id)])[0]

    def result(self, job_id: int, timeout: float | None = None) -> Any:
        """Wait (at most ``timeout`` seconds; None: for ever) for the job to finish; its result.
        JobFailedError (carrying the last error) if it ended dead or cancelled, TimeoutError if
        it is unfinished when the time is up, JobNotFoundError if there is no such job."""
        return outcome(self._bind([self._waiter.wait(job_id, timeout)])[0])

    async def result_async(self, job_id: int, timeout: float | None = None) -> Any:
        """:meth:`result` for async code; never blocks the event loop."""
        return outcome(self._bind([await self._waiter.wait_async(job_id, timeout)])[0])

    def job_history(self, job_id: int) -> list[JobEvent]:
        """Every transition of the job, oldest first (see :class:`JobEvent`); JobNotFoundError
        for a job that does not exist."""
        events = self.backend.job_events(job_id)
        if not events:
            self.backend.job_get(job_id)  # raises for a missing job; an old one may have none left
        return events

    def job_dependencies(self, job_id: int) -> list[int]:
        """Ids of the jobs this job was enqueued to depend on (``depends_on``), ascending."""
        return self.backend.job_dependencies(job_id)

    def list_jobs(
        self,
        state: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        return self._bind(self.backend.job_list(state=state, queue=queue, task=task, limit=limit))

    def cancel_job(self, job_id: int, reason: str = "cancelled by request") -> Job:
        return self._bind([self.backend.job_cancel(job_id, reason)])[0]

    def retry_job(self, job_id: int) -> Job:
        return self._bind([self.backend.job_retry(job_id)])[0]

    def delete_job(self, job_id: int) -> bool:
        return self.backend.job_delete(job_id)

    def stats(self) -> list[QueueStats]:
        return self.backend.stats()

    # -- users' tests ---------------------------------------------------------------------------
    def drain(self, queues: Sequence[str] | None = None, **worker_options: Any) -> dict[str, int]:
        """Work off every due job in ``queues`` (default: all this app's queues) in this process,
        through the real claim path, and return {final state: count}. For users' tests."""
        return asyncio.run(self.drain_async(queues, **worker_options))

    async def drain_async(
        self, queues: Sequence[str] | None = None, **worker_options: Any
    ) -> dict[str, int]:
        from .worker import Worker

        worker_options.setdefault("concurrency", 1)
        worker = Worker(self, queues=queues, **worker_options)
        await worker.run(until_idle=True)
        return dict(worker.outcome_counts)

    def default_queues(self) -> list[str]:
        """The queues this app's tasks and declarations name (plus ``default``)."""
        names = {DEFAULT_QUEUE, *self.queues, *(t.queue for t in self.tasks.values())}
        return sorted(names)
