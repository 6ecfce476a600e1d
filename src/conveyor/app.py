"""The application object: task registry, queue declarations, enqueueing and job operations."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Generic, NamedTuple, ParamSpec, TypeVar, overload

from . import serialization
from ._gc import collector_paused
from .backends.base import Backend, LazyNewJobs, NewJob, QueueStats, open_backend
from .backends.flows import FlowStore, batch_key, flow_store, pipeline_key
from .backends.migrate import check_version
from .errors import (
    ConfigurationError,
    InvalidTransitionError,
    JobNotFoundError,
    UnknownTaskError,
)
from .job import Job, JobEvent, JobState
from .options import (
    DEFAULT_QUEUE,
    ID_MAX,
    Options,
    check_arguments,
    check_queue_name,
    check_task_name,
)
from .periodic import DEFAULT_GRACE, Periodic, make_periodic
from .pipelines import (
    Batch,
    Pipeline,
    PipelineDefinition,
    PipelineFailedError,
    PipelineState,
    Step,
    batch_moved,
    check_entity,
    make_step,
    pipeline_moved,
    spec_from_request,
)
from .redaction import Redaction, check_fields, env_fields, scrub_error
from .results import DEFAULT_PUSH_POLL_INTERVAL, JobWaiter, Watcher, outcome
from .services.pruner import Retention
from .states import Backoff, BackoffPolicy

P = ParamSpec("P")
R = TypeVar("R")
FlowRecord = TypeVar("FlowRecord", "Pipeline", "Batch")
#: What waiting for a pipeline or batch needs: its key, how to read it, when it is ready, the
#: timeout and the error once the time ran out (the arguments of ``Watcher.until``).
FlowWaiting = tuple[
    str,
    Callable[[], FlowRecord],
    Callable[[FlowRecord], bool],
    float | None,
    Callable[[FlowRecord], Exception],
]

DEFAULT_URL = "sqlite:///conveyor.db"
#: How often each worker checks running pipelines' step deadlines (services/watchdog.py).
DEFAULT_WATCHDOG_INTERVAL = 2.0
ENV_URL = "CONVEYOR_DATABASE_URL"


class EnqueueRequest(NamedTuple):
    """One job to enqueue, made by ``task.request(...)``; pass a list to ``app.enqueue_many``.
    (A named tuple: bulk enqueues make thousands.)"""

    task: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: Options


@dataclasses.dataclass
class RetryResult:
    """What ``retry_jobs`` did: the jobs queued again, and those skipped (id: why)."""

    retried: list[Job] = dataclasses.field(default_factory=list)
    skipped: dict[int, str] = dataclasses.field(default_factory=dict)


class Task(Generic[P, R]):
    """A registered task. Calling it runs the function directly; ``enqueue`` makes a job."""

    def __init__(
        self,
        app: Conveyor,
        fn: Callable[P, R],
        name: str,
        options: Options,
        redact: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.defaults = options
        #: Argument fields hidden in output and error text, besides the app's (see redaction.py).
        self.redact = redact
        self.is_async = inspect.iscoroutinefunction(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    @property
    def queue(self) -> str:
        return self.defaults.settled().queue

    @property
    def backoff(self) -> BackoffPolicy:
        return self.defaults.backoff or Backoff()

    def options(self, **options: Any) -> BoundTask[P, R]:
        """This task with per-enqueue options (delay, priority, unique_key, idempotency_key,
        depends_on=[jobs or ids], ...)."""
        return BoundTask(self, Options.build(f"task {self.name}", **options))

    def request(self, *args: P.args, **kwargs: P.kwargs) -> EnqueueRequest:
        return EnqueueRequest(self.name, args, kwargs, self.defaults)

    def step(
        self,
        *,
        name: str | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Step:
        """This task as a pipeline step (``app.pipeline(name, [a.step(), b.step(deadline=120)])``)
        with its own options (queue, max_attempts, timeout, ``deadline`` for the whole step, ...).
        Step 1 is called with the pipeline's start arguments, each later step with the previous
        step's result; then ``args``, and ``kwargs``. ``name`` defaults to the function's name."""
        return make_step(self, name, args, kwargs, options)

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
    :class:`~conveyor.services.pruner.Retention` for the defaults). ``max_payload_bytes`` limits
    the JSON size of a job's arguments and of its result (default 1 MiB).

    ``redact=("password", "token")`` names argument fields whose values never show in the CLI's
    output, nor in the error messages and tracebacks workers store and log (each value's text is
    replaced by ``[redacted]``); ``$CONVEYOR_REDACT`` (comma-separated) adds names, and
    ``@app.task(redact=[...])`` adds names for one task. The stored arguments keep the real
    values. See :mod:`conveyor.redaction`.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        max_payload_bytes: int = serialization.DEFAULT_MAX_PAYLOAD_BYTES,
        retention: Retention | None = None,
        watchdog_interval: float | None = DEFAULT_WATCHDOG_INTERVAL,
        redact: Sequence[str] | None = None,
    ) -> None:
        if watchdog_interval is not None and not (
            isinstance(watchdog_interval, int | float)
            and not isinstance(watchdog_interval, bool)
            and watchdog_interval > 0
        ):
            raise ConfigurationError(
                f"watchdog_interval must be a number of seconds > 0 or None, "
                f"not {watchdog_interval!r}"
            )
        if retention is not None and not isinstance(retention, Retention):
            raise ConfigurationError(
                f"retention must be a conveyor.Retention, not {type(retention).__name__}"
            )
        if isinstance(max_payload_bytes, bool) or not (
            isinstance(max_payload_bytes, int) and max_payload_bytes >= 2
        ):
            raise ConfigurationError(
                f"max_payload_bytes must be an integer number of bytes >= 2, "
                f"not {max_payload_bytes!r}"
            )
        # An explicit URL, even an empty one, is used as given (open_backend refuses "").
        self.url = url if url is not None else (os.environ.get(ENV_URL) or DEFAULT_URL)
        self.max_payload_bytes = max_payload_bytes
        #: Argument fields redacted for every task (see redaction.py), $CONVEYOR_REDACT's included.
        self.redact = check_fields("Conveyor", redact) | env_fields()
        self._redactions: dict[str, Redaction] = {}  # per registered task: see redaction()
        self.retention = retention or Retention()
        #: While waiting for results on PostgreSQL (which pushes), re-read the job this often.
        self.result_poll_interval = DEFAULT_PUSH_POLL_INTERVAL
        #: How often each worker checks running pipelines' step deadlines; None: never.
        self.watchdog_interval = watchdog_interval
        self._waiter = JobWaiter(self)
        self._flow_waiter: Watcher[str] = Watcher(self, lambda: self.flows.watch_flows)
        self._flows: FlowStore | None = None
        self.tasks: dict[str, Task[Any, Any]] = {}
        #: Periodic jobs by name (``periodic``), enqueued by every worker's scheduler.
        self.periodic_jobs: dict[str, Periodic] = {}
        #: Inline mode for users' tests (``conveyor.testing.inline``): each enqueue runs the due
        #: jobs before it returns.
        self.inline = False
        self.queues: dict[str, int | None] = {}
        self._backend: Backend | None = None
        self._schema_checked = False
        self._lock = threading.Lock()
        self._wake_callbacks: list[Callable[[], None]] = []
        self._valid_names: set[str] = set()  # task names enqueued before: already checked
        #: The last options an enqueue used, with the NewJob fields they give (see _new_job).
        self._options_fields: tuple[Options | None, str, tuple[Any, ...]] = (None, "", ())

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

    @property
    def flows(self) -> FlowStore:
        """The backend's pipelines and batches (see backends/flows.py)."""
        backend = self.backend
        with self._lock:
            if self._flows is None:
                self._flows = flow_store(backend)
            return self._flows

    def close(self) -> None:
        self._waiter.close()
        self._flow_waiter.close()
        with self._lock:
            self._flows = None
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
        concurrency_limit=..., redact=[field names])``. The name defaults to
        ``module.qualname``."""

        def register(func: Callable[P, R]) -> Task[P, R]:
            default = f"{func.__module__}.{func.__qualname__}"
            task_name = check_task_name(default if name is None else name)
            if task_name in self.tasks:
                raise ConfigurationError(f"a task named {task_name!r} is already registered")
            given = dict(options)
            redact = check_fields(f"task {task_name}", given.pop("redact", None))
            opts = Options.build(f"task {task_name}", **given)
            if opts.depends_on is not None:
                raise ConfigurationError(
                    f"task {task_name}: depends_on is per enqueue, not per task: use "
                    "task.options(depends_on=[...]).enqueue(...)"
                )
            task = Task(self, func, task_name, opts, redact)
            self.tasks[task_name] = task
            return task

        return register(fn) if fn is not None else register

    def periodic(
        self,
        task: Task[Any, Any] | str,
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        tz: str | None = None,
        name: str | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        grace: float | timedelta = DEFAULT_GRACE,
        **options: Any,
    ) -> Periodic:
        """Enqueue ``task`` (registered here) on a schedule, once per tick fleet-wide: ``cron``, a
        five-field cron expression (``"*/15 * * * *"``, ``"0 9 * * mon-fri"``, ``"@daily"``) in
        UTC or in the time zone ``tz`` (``"Europe/Berlin"``), or ``every``, an interval of at
        least a second. Each tick's job is
        called with ``args`` and ``kwargs``, has the tick as its ``run_at`` and the task's options
        updated by ``options`` (queue, priority, max_attempts, timeout, ...). A tick no worker saw
        within ``grace`` seconds is skipped. ``name`` (default: the task's) must be unique here.
        See docs/periodic.md."""
        task_obj = self.get_task(task) if isinstance(task, str) else task
        if task_obj.app is not self:
            raise ConfigurationError(f"periodic: task {task_obj.name!r} belongs to another app")
        schedule = make_periodic(
            task_obj.name,
            task_obj.defaults,
            cron=cron,
            every=every,
            tz=tz,
            name=name,
            args=args,
            kwargs=kwargs,
            grace=grace,
            options=options,
            limit=self.max_payload_bytes,
        )
        if schedule.name in self.periodic_jobs:
            raise ConfigurationError(
                f"a periodic job named {schedule.name!r} is already registered: give this one "
                "another name="
            )
        self.periodic_jobs[schedule.name] = schedule
        return schedule

    def enqueue_periodic(self, ticks: Sequence[tuple[Periodic, datetime]]) -> list[Job]:
        """Enqueue the job of each (schedule, tick) unless that tick, or a later one of its
        schedule, was enqueued already (by any process, ever); the jobs inserted. What every
        worker's scheduler calls (services/scheduler.py)."""
        entries = [
            (
                periodic.name,
                tick,
                self._new_job(
                    EnqueueRequest(
                        periodic.task,
                        periodic.args,
                        dict(periodic.kwargs),
                        periodic.options_for(tick),
                    ),
                    i,
                ),
            )
            for i, (periodic, tick) in enumerate(ticks)
        ]
        jobs = self._bind(self.backend.periodic_enqueue(entries))
        if jobs:
            self._wake_workers()
        return [job for job in jobs if not job.deduplicated]

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
        request = EnqueueRequest(check_task_name(task), *check_arguments(args, kwargs), opts)
        return self.enqueue_many([request], connection=connection)[0]

    def enqueue_many(self, requests: Iterable[EnqueueRequest], connection: Any = None) -> list[Job]:
        """Enqueue many jobs in one transaction and one round trip; one Job per request, in order."""
        requests = requests if isinstance(requests, Sequence) else list(requests)
        with collector_paused(len(requests)):
            new_jobs: Sequence[NewJob]
            if connection is None:  # built as the backend reads them (see LazyNewJobs)
                new_jobs = LazyNewJobs(requests, self._new_job)
            else:  # all checked before anything is written in the caller's transaction
                new_jobs = [self._new_job(r, i) for i, r in enumerate(requests)]
            jobs = self._bind(self.backend.job_insert_many(new_jobs, connection=connection))
        if self._enqueued(connection):
            return [self._refreshed(job) for job in jobs]
        return jobs

    def _enqueued(self, connection: Any) -> bool:
        """After an enqueue: wake this process's workers; in inline mode (testing.inline), run
        the due jobs now, unless they wait for the caller's commit. True when they ran."""
        self._wake_workers()
        if not self.inline or connection is not None:
            return False
        from .testing import run_due_jobs

        run_due_jobs(self)
        return True

    def _refreshed(self, job: Job) -> Job:
        """``job`` as the database has it now (as it was, if it is gone)."""
        try:
            return self.get_job(job.id)
        except JobNotFoundError:
            return job

    def _wake_workers(self) -> None:
        for callback in list(self._wake_callbacks):
            callback()

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
        if request.task not in self._valid_names:  # checked once per name
            self._valid_names.add(check_task_name(request.task))
        opts = request.options
        limit = self.max_payload_bytes
        cached = self._options_fields
        if cached[0] is opts:  # requests of one enqueue_many mostly share their options
            queue, rest = cached[1], cached[2]
        else:
            settled = opts.settled()
            queue = settled.queue
            rest = (
                settled.priority,
                settled.delay,
                opts.run_at,
                settled.max_attempts,
                opts.max_snoozes,
                opts.deadline,
                opts.timeout,
                opts.unique_key,
                opts.idempotency_key,
                opts.concurrency_key,
                settled.concurrency_limit,
                opts.depends_on or (),
            )
            self._options_fields = (opts, queue, rest)
        # positionally, in NewJob's field order: a third of the cost of keywords, per job
        return NewJob._make(
            (
                request.task,
                queue,
                serialization.dumps(request.args, "args", limit),  # a tuple: encoded as a list
                serialization.dumps(request.kwargs, "kwargs", limit),
                *rest,
            )
        )

    # -- operations -----------------------------------------------------------------------------
    def _bind(self, jobs: list[Job]) -> list[Job]:
        """Let these snapshots wait for themselves (``job.result()``) through this app."""
        for job in jobs:
            object.__setattr__(job, "_app", self)
        return jobs

    def get_job(self, job_id: int) -> Job:
        return self._bind([self.backend.job_get(_job_id(job_id))])[0]

    def result(self, job_id: int, timeout: float | None = None) -> Any:
        """Wait (at most ``timeout`` seconds; None: for ever) for the job to finish; its result.
        JobFailedError (carrying the last error) if it ended dead or cancelled, TimeoutError if
        it is unfinished when the time is up, JobNotFoundError if there is no such job."""
        return outcome(self._bind([self._waiter.wait(_job_id(job_id), timeout)])[0])

    async def result_async(self, job_id: int, timeout: float | None = None) -> Any:
        """:meth:`result` for async code; never blocks the event loop."""
        return outcome(self._bind([await self._waiter.wait_async(_job_id(job_id), timeout)])[0])

    def job_history(self, job_id: int) -> list[JobEvent]:
        """Every transition of the job, oldest first (see :class:`JobEvent`); JobNotFoundError
        for a job that does not exist."""
        events = self.backend.job_events(_job_id(job_id))
        if not events:
            self.backend.job_get(job_id)  # raises for a missing job; an old one may have none left
        return events

    def job_dependencies(self, job_id: int) -> list[int]:
        """Ids of the jobs this job was enqueued to depend on (``depends_on``), ascending."""
        return self.backend.job_dependencies(_job_id(job_id))

    def list_jobs(
        self,
        state: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        """Jobs matching the filters, newest first (at most ``limit``, 1 to 100,000)."""
        if state is not None and state not in set(JobState):
            states = ", ".join(s.value for s in JobState)
            raise ConfigurationError(f"state {state!r} is not a job state: use one of {states}")
        if queue is not None:
            check_queue_name(queue)
        if task is not None:
            check_task_name(task)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise ConfigurationError(f"limit={limit!r} must be an integer from 1 to 100000")
        return self._bind(self.backend.job_list(state=state, queue=queue, task=task, limit=limit))

    def cancel_job(self, job_id: int, reason: str = "cancelled by request") -> Job:
        if not isinstance(reason, str) or "\x00" in reason or not 0 < len(reason) <= 10_000:
            raise ConfigurationError(
                f"cancel reason {reason!r:.80} must be text of 1 to 10000 characters without NUL"
            )
        return self._bind([self.backend.job_cancel(_job_id(job_id), reason)])[0]

    def retry_job(self, job_id: int) -> Job:
        return self._bind([self.backend.job_retry(_job_id(job_id))])[0]

    def retry_jobs(
        self,
        state: str = JobState.DEAD,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 1000,
    ) -> RetryResult:
        """Retry, as ``retry_job`` does, up to ``limit`` jobs in ``state`` (dead or cancelled),
        newest first, of ``queue`` and ``task`` if given: after an outage or a fixed bug, the
        dead-letter queue back to work. A job that left that state meanwhile, or that waits for a
        dependency that failed, is skipped (counted) and the rest go on."""
        if state not in (JobState.DEAD, JobState.CANCELLED):
            raise ConfigurationError(f"retry_jobs: state {state!r} must be 'dead' or 'cancelled'")
        result = RetryResult()
        for job in self.list_jobs(state=state, queue=queue, task=task, limit=limit):
            try:
                result.retried.append(self.retry_job(job.id))
            except (InvalidTransitionError, JobNotFoundError) as exc:
                result.skipped[job.id] = str(exc)
        return result

    def delete_job(self, job_id: int) -> bool:
        try:
            return self.backend.job_delete(_job_id(job_id))
        except JobNotFoundError:
            return False

    # -- redaction ------------------------------------------------------------------------------
    def redaction(self, task: str) -> Redaction:
        """What is hidden for jobs of ``task``: the app's fields and the task's own, and the
        positions of the task function's parameters so named (see :mod:`conveyor.redaction`)."""
        registered = self.tasks.get(task)
        if registered is None:  # no signature: every positional argument might be a secret
            return Redaction(self.redact, all_positions=bool(self.redact))
        # Built once per task (reading the signature is the costly part), again only if
        # ``self.redact`` was reassigned since.
        names = self.redact | registered.redact
        rules = self._redactions.get(task)
        if rules is None or rules.names != names:
            rules = self._redactions[task] = Redaction.for_function(names, registered.fn)
        return rules

    def scrubber(self, job: Job) -> Callable[[str], str]:
        """A function that replaces each redacted argument value of ``job`` in a text (an error
        message, a traceback) with ``[redacted]``; the identity when nothing is redacted."""
        return self.redaction(job.task).scrubber(job.args, job.kwargs)

    def redacted(self, job: Job) -> Job:
        """A copy of ``job`` for display: redacted fields' values replaced in its args, kwargs
        and result, and their text scrubbed from its errors (messages and tracebacks)."""
        rules = self.redaction(job.task)
        if not rules:
            return job
        scrub = rules.scrubber(job.args, job.kwargs)
        errors = job.errors
        if isinstance(errors, list):
            errors = [scrub_error(e, scrub) for e in errors]
        return dataclasses.replace(
            job,
            args=rules.args(job.args),
            kwargs=rules.value(job.kwargs),
            return_value=rules.value(job.return_value),
            last_error=scrub_error(job.last_error, scrub),
            errors=errors,
        )

    def redacted_history(self, job: Job, events: Iterable[JobEvent]) -> list[JobEvent]:
        """``events`` of ``job`` with the job's redacted values scrubbed from their errors."""
        scrub = self.scrubber(job)
        return [
            e if e.error is None else dataclasses.replace(e, error=scrub_error(e.error, scrub))
            for e in events
        ]

    def stats(self) -> list[QueueStats]:
        return self.backend.stats()

    # -- pipelines ------------------------------------------------------------------------------
    def pipeline(self, name: str, steps: Sequence[Step | Task[Any, Any]]) -> PipelineDefinition:
        """Define a pipeline: ordered steps (``task.step(**options)``, or a task as it is), run one
        job at a time. ``definition.start(entity=..., args=[...])`` starts a run. See
        docs/pipelines.md."""
        return PipelineDefinition(self, name, steps)

    def start_pipeline(
        self,
        definition: PipelineDefinition,
        *,
        entity: str | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        connection: Any = None,
    ) -> Pipeline:
        """Start a run of ``definition`` (what ``definition.start(...)`` calls); with
        ``connection``, inside the caller's transaction on it, as ``enqueue`` does."""
        start_args, start_kwargs = check_arguments(args, kwargs)
        limit = self.max_payload_bytes
        pipeline = self.flows.pipeline_start(
            definition.name,
            check_entity(entity),
            [step.spec for step in definition.steps],
            serialization.dumps(list(start_args), "args", limit),
            serialization.dumps(start_kwargs, "kwargs", limit),
            connection=connection,
        )
        if self._enqueued(connection):
            pipeline = self.flows.pipeline_get(pipeline.id)
        return self._bind_flow(pipeline)

    def get_pipeline(self, pipeline_id: int) -> Pipeline:
        return self._bind_flow(self.flows.pipeline_get(pipeline_id))

    def list_pipelines(
        self,
        state: str | None = None,
        name: str | None = None,
        entity: str | None = None,
        limit: int = 100,
    ) -> list[Pipeline]:
        """Pipelines matching the filters, newest first."""
        found = self.flows.pipeline_list(state=state, name=name, entity=entity, limit=limit)
        return [self._bind_flow(p) for p in found]

    def pipeline_jobs(self, pipeline_id: int) -> list[Job]:
        """The jobs of the pipeline's steps so far, in order."""
        return self._bind(self.flows.pipeline_jobs(pipeline_id))

    def cancel_pipeline(self, pipeline_id: int, reason: str = "cancelled by request") -> Pipeline:
        """Cancel a running pipeline and its current step's job (a running job is asked to stop,
        like ``cancel_job``); no later step runs. A finished pipeline is returned unchanged."""
        return self._bind_flow(self.flows.pipeline_cancel(pipeline_id, reason))

    def pipeline_result(self, pipeline_id: int, timeout: float | None = None) -> Any:
        """Wait (at most ``timeout`` s; None: for ever) for the pipeline to finish; the last
        step's result. PipelineFailedError if it failed or was cancelled, TimeoutError."""
        return _pipeline_outcome(self._wait_flow(self._pipeline_waiting(pipeline_id, timeout)))

    async def pipeline_result_async(self, pipeline_id: int, timeout: float | None = None) -> Any:
        waiting = self._pipeline_waiting(pipeline_id, timeout)
        return _pipeline_outcome(await self._wait_flow_async(waiting))

    def wait_pipeline_change(self, since: Pipeline, timeout: float | None = None) -> Pipeline:
        """Wait until the pipeline moved on from the snapshot ``since`` (another step, or
        finished); the new snapshot. TimeoutError if it did not within ``timeout`` seconds."""
        return self._wait_flow(self._pipeline_waiting(since.id, timeout, since))

    async def wait_pipeline_change_async(
        self, since: Pipeline, timeout: float | None = None
    ) -> Pipeline:
        return await self._wait_flow_async(self._pipeline_waiting(since.id, timeout, since))

    def _pipeline_waiting(
        self, pipeline_id: int, timeout: float | None, since: Pipeline | None = None
    ) -> FlowWaiting[Pipeline]:
        def ready(now: Pipeline) -> bool:
            return now.state.terminal if since is None else pipeline_moved(since, now)

        def timed_out(now: Pipeline) -> Exception:
            return TimeoutError(
                f"pipeline {now.id} ({now.name}) is still {now.state.value} at step {now.step} "
                f"after {timeout:g} s"
            )

        def read() -> Pipeline:
            return self.flows.pipeline_get(pipeline_id)

        return pipeline_key(pipeline_id), read, ready, timeout, timed_out

    # -- batches --------------------------------------------------------------------------------
    def batch(
        self,
        requests: Iterable[EnqueueRequest],
        on_complete: EnqueueRequest | None = None,
        connection: Any = None,
    ) -> Batch:
        """Enqueue jobs as one batch (one transaction; with ``connection``, inside the caller's
        transaction on it, as ``enqueue`` does). When the last of them finished,
        ``on_complete`` (``task.request(*args, **kwargs)``) is enqueued exactly once, called with
        ``{"batch_id", "total", "succeeded", "failed"}`` first, then its own arguments. Batch jobs
        cannot have a unique_key or idempotency_key (a job returned for a duplicate would belong
        to another batch)."""
        new_jobs = [self._new_job(r, i) for i, r in enumerate(requests)]
        for i, job in enumerate(new_jobs):
            if job.unique_key is not None or job.idempotency_key is not None:
                raise ConfigurationError(
                    f"batch item {i} ({job.task}) has a unique_key or idempotency_key: batch jobs "
                    "cannot be deduplicated (the existing job would belong to another batch)"
                )
        spec = (
            None
            if on_complete is None
            else spec_from_request(on_complete, "on_complete", self.max_payload_bytes)
        )
        batch = self.flows.batch_create(new_jobs, spec, connection=connection)
        if self._enqueued(connection):
            batch = self.flows.batch_get(batch.id)
        return self._bind_flow(batch)

    async def batch_async(
        self,
        requests: Iterable[EnqueueRequest],
        on_complete: EnqueueRequest | None = None,
        connection: Any = None,
    ) -> Batch:
        return await asyncio.to_thread(self.batch, list(requests), on_complete, connection)

    def get_batch(self, batch_id: int) -> Batch:
        return self._bind_flow(self.flows.batch_get(batch_id))

    def batch_jobs(self, batch_id: int) -> list[Job]:
        """The batch's jobs, in order."""
        return self._bind(self.flows.batch_jobs(batch_id))

    def batch_result(self, batch_id: int, timeout: float | None = None) -> Batch:
        """Wait (at most ``timeout`` s; None: for ever) until every job of the batch finished;
        the completed batch. TimeoutError if the time ran out first."""
        return self._wait_flow(self._batch_waiting(batch_id, timeout))

    async def batch_result_async(self, batch_id: int, timeout: float | None = None) -> Batch:
        return await self._wait_flow_async(self._batch_waiting(batch_id, timeout))

    def wait_batch_change(self, since: Batch, timeout: float | None = None) -> Batch:
        """Wait until a job of the batch finished (or it completed) since the snapshot
        ``since``; the new snapshot. TimeoutError if none did within ``timeout`` seconds."""
        return self._wait_flow(self._batch_waiting(since.id, timeout, since))

    async def wait_batch_change_async(self, since: Batch, timeout: float | None = None) -> Batch:
        return await self._wait_flow_async(self._batch_waiting(since.id, timeout, since))

    def _batch_waiting(
        self, batch_id: int, timeout: float | None, since: Batch | None = None
    ) -> FlowWaiting[Batch]:
        def ready(now: Batch) -> bool:
            return now.complete if since is None else batch_moved(since, now)

        def timed_out(now: Batch) -> Exception:
            return TimeoutError(
                f"batch {now.id} still has {now.pending} of {now.total} jobs pending "
                f"after {timeout:g} s"
            )

        def read() -> Batch:
            return self.flows.batch_get(batch_id)

        return batch_key(batch_id), read, ready, timeout, timed_out

    # -- waiting for pipelines and batches ------------------------------------------------------
    def _wait_flow(self, waiting: FlowWaiting[FlowRecord]) -> FlowRecord:
        return self._bind_flow(self._flow_waiter.until(*waiting))

    async def _wait_flow_async(self, waiting: FlowWaiting[FlowRecord]) -> FlowRecord:
        return self._bind_flow(await self._flow_waiter.until_async(*waiting))

    def _bind_flow(self, record: FlowRecord) -> FlowRecord:
        """Let this snapshot wait for itself and act through this app (like ``_bind``)."""
        object.__setattr__(record, "_app", self)
        return record

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


def _job_id(job_id: object) -> int:
    """A job id as the backends take it: JobNotFoundError for an integer no job can have."""
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise ConfigurationError(f"a job id must be an integer, not {job_id!r:.80}")
    if not 1 <= job_id <= ID_MAX:
        raise JobNotFoundError(f"no job with id {job_id}")
    return job_id


def _pipeline_outcome(pipeline: Pipeline) -> Any:
    if pipeline.state == PipelineState.SUCCEEDED:
        return pipeline.return_value
    raise PipelineFailedError(pipeline)
