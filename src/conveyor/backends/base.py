"""The storage contract. Each method is a domain verb; its docstring is the contract that the
contract test suite (tests/contract) checks against every backend.

Times are the database's clock. Every write that ends an attempt is *fenced*: it applies only
while the job is still ``running`` under the same attempt and lease owner.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, overload
from urllib.parse import unquote, urlsplit

from ..errors import ConfigurationError, InvalidTransitionError, JobNotFoundError
from ..job import Job, JobEvent, JobState
from ..states import Outcome


class NewJob(NamedTuple):
    """A job to insert. ``args``/``kwargs``/``result`` are already-validated JSON text. (A named
    tuple: a bulk enqueue makes one per job, and a frozen dataclass costs several times more.)"""

    task: str
    queue: str
    args: str = "[]"
    kwargs: str = "{}"
    priority: int = 0
    delay: float = 0.0
    run_at: datetime | None = None  # absolute; wins over delay
    max_attempts: int = 5
    max_snoozes: int | None = None
    deadline: float | None = None
    timeout: float | None = None
    unique_key: str | None = None
    idempotency_key: str | None = None
    concurrency_key: str | None = None
    concurrency_limit: int = 1
    #: Ids of jobs that must succeed first (see backends/dependencies.py).
    depends_on: tuple[int, ...] = ()


class LazyNewJobs(Sequence[NewJob]):
    """The NewJobs of an ``enqueue_many``, each built (validated and encoded) by ``build`` when
    first read, in order, and kept. A backend that streams a big batch builds the next jobs
    while the server writes the previous ones; reading a job may raise a bad request's error,
    so a backend reads every job before it writes anything it cannot take back (``list(jobs)``
    first, unless it can abandon what it sent, as PostgreSQL's COPY in autocommit can)."""

    def __init__(self, requests: Sequence[Any], build: Callable[[Any, int], NewJob]) -> None:
        self._requests = requests
        self._build = build
        self._built: list[NewJob] = []

    def __len__(self) -> int:
        return len(self._requests)

    def _build_to(self, stop: int) -> None:
        built, build, requests = self._built, self._build, self._requests
        for i in range(len(built), min(stop, len(requests))):
            built.append(build(requests[i], i))

    @overload
    def __getitem__(self, index: int) -> NewJob: ...

    @overload
    def __getitem__(self, index: slice) -> list[NewJob]: ...

    def __getitem__(self, index: int | slice) -> NewJob | list[NewJob]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:  # the common case (a backend reading chunks)
                self._build_to(stop)
                return self._built[start:stop]
            self._build_to(len(self))
            return self._built[index]
        self._build_to(len(self) if index < 0 else index + 1)
        return self._built[index]

    def __iter__(self) -> Iterator[NewJob]:
        self._build_to(len(self))
        return iter(self._built)


#: NewJob fields that are columns of conveyor_jobs (depends_on is a table of its own).
NEW_JOB_COLUMNS = tuple(f for f in NewJob._fields if f != "depends_on")


@dataclass(frozen=True)
class IdleClaim:
    """An idle worker's standing offer to the backend's due listener (``watch_due``): when jobs
    become due and ``request()`` returns (worker id, limit, lease), the listener claims them for
    the worker itself, on its own connection (awake, as it just took the notification), and hands
    them over with ``deliver(jobs)`` (or the claim's exception), instead of only waking the
    worker to claim them: two thread hand-offs and a round trip fewer between an enqueue and the
    job's start. ``request()`` returns None, leaving the wake-up to ``on_due``, while the worker is
    busy claiming, running jobs or stopping. Both are called from the listener's thread."""

    request: Callable[[], tuple[str, int, float] | None]
    deliver: Callable[[list[Job] | BaseException], None]


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    started_at: datetime | None = None
    last_seen_at: datetime | None = None
    stopped_at: datetime | None = None


@dataclass
class QueueStats:
    queue: str
    counts: dict[str, int] = field(default_factory=dict)
    oldest_due_age: float | None = None  # seconds the oldest due waiting job has waited
    concurrency_limit: int | None = None

    @property
    def running(self) -> int:
        return self.counts.get(JobState.RUNNING, 0)


#: Most stuck jobs one rescue statement handles (the Rescuer repeats until a short batch).
RESCUE_BATCH = 1000
#: Job fields in order, but ``deduplicated`` (not a column).
_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(Job) if f.name != "deduplicated")
#: The columns of a job row in Job field order (the ``result`` column is Job.return_value). Every
#: job query of both backends returns exactly these, in this order (``{job_columns}`` in their
#: queries.sql), so a row becomes a Job by position, without a dict per row.
JOB_COLUMNS = tuple("result" if name == "return_value" else name for name in _JOB_FIELDS)
_STATE_AT = JOB_COLUMNS.index("state")
_CANCEL_AT = JOB_COLUMNS.index("cancel_requested")
_STATES = {str(s): s for s in JobState}


def job_columns(query: str) -> str:
    """``query`` with ``{job_columns}`` (or ``{j.job_columns}``: each column prefixed by ``j.``)
    replaced by :data:`JOB_COLUMNS`."""
    return re.sub(
        r"\{(\w+\.)?job_columns\}",
        lambda m: ", ".join(f"{m.group(1) or ''}{c}" for c in JOB_COLUMNS),
        query,
    )


def job_from_fields(fields: dict[str, Any]) -> Job:
    """The :class:`Job` whose ``__dict__`` is ``fields`` (every field, ``deduplicated`` too,
    each of the Job's type; the dict itself is kept, not copied).

    On the hot path (every claimed and enqueued job), so it fills the frozen dataclass's
    ``__dict__`` directly instead of calling its ``__init__`` (one ``object.__setattr__`` per
    field, about five times slower); tests/unit/test_job_rows.py checks the two agree."""
    job = object.__new__(Job)
    object.__setattr__(job, "__dict__", fields)
    return job


def job_from_values(values: list[Any], **extra: Any) -> Job:
    """Build a :class:`Job` from the values of a row in :data:`JOB_COLUMNS` order, already
    converted to Python types (the list is changed in place)."""
    values[_STATE_AT] = _STATES[values[_STATE_AT]]
    values[_CANCEL_AT] = bool(values[_CANCEL_AT])
    fields = dict(zip(_JOB_FIELDS, values, strict=True))
    fields["deduplicated"] = False
    if extra:
        fields.update(extra)
    return job_from_fields(fields)


#: The fields of a job just inserted that no insert sets (job_from_insert copies it).
_NEW_ROW: dict[str, Any] = dict.fromkeys(_JOB_FIELDS) | {
    "attempt": 0,
    "snoozes": 0,
    "cancel_requested": False,
    "deduplicated": False,
}


def job_from_insert(
    new: NewJob,
    args: Any,
    kwargs: Any,
    id: int,
    created_at: datetime,
    run_at: datetime,
    state: str,
    finished_at: datetime | None,
    last_error: dict[str, Any] | None,
    errors: list[Any],
) -> Job:
    """The Job a plain insert of ``new`` made (no dedupe): what ``new`` set, ``args`` and
    ``kwargs`` as stored (read back: the database may normalize JSON), what the database set (the
    id, times, state and, for a job cancelled at once by a failed dependency, its error), the
    rest as a new row has them.
    Cheaper than reading the whole row back (most of a bulk enqueue's time, when it did), and
    built like :func:`job_from_values` from a copy of the fields every new row shares;
    tests/contract/test_operations.py checks it is the job read back."""
    fields = _NEW_ROW.copy()
    fields["id"] = id
    fields["queue"] = new.queue
    fields["task"] = new.task
    fields["args"] = args
    fields["kwargs"] = kwargs
    fields["state"] = _STATES[state]
    fields["priority"] = new.priority
    fields["created_at"] = created_at
    fields["run_at"] = run_at
    fields["finished_at"] = finished_at
    fields["max_attempts"] = new.max_attempts
    fields["max_snoozes"] = new.max_snoozes
    fields["deadline"] = None if new.deadline is None else float(new.deadline)
    fields["timeout"] = None if new.timeout is None else float(new.timeout)
    fields["last_error"] = last_error
    fields["errors"] = errors
    fields["unique_key"] = new.unique_key
    fields["idempotency_key"] = new.idempotency_key
    fields["concurrency_key"] = new.concurrency_key
    fields["concurrency_limit"] = new.concurrency_limit
    return job_from_fields(fields)


def in_claim_order(jobs: list[Job]) -> list[Job]:
    """``jobs`` sorted as a claim returns them: highest priority, earliest run_at, lowest id."""
    jobs.sort(key=lambda j: (-j.priority, j.run_at, j.id))
    return jobs


def event_from_row(row: dict[str, Any]) -> JobEvent:
    """Build a :class:`JobEvent` from a row already converted to Python types."""
    return JobEvent(
        id=row["id"],
        job_id=row["job_id"],
        at=row["at"],
        from_state=None if row["from_state"] is None else JobState(row["from_state"]),
        to_state=JobState(row["to_state"]),
        worker=row["worker"],
        attempt=row["attempt"],
        error=row["error"],
    )


def build_stats(
    counts: list[dict[str, Any]], oldest: list[dict[str, Any]], limits: list[dict[str, Any]]
) -> list[QueueStats]:
    by_queue: dict[str, QueueStats] = {}

    def get(name: str) -> QueueStats:
        return by_queue.setdefault(name, QueueStats(queue=name))

    for r in counts:
        get(r["queue"]).counts[r["state"]] = int(r["n"])
    for r in oldest:
        get(r["queue"]).oldest_due_age = max(0.0, float(r["age"]))
    for r in limits:
        if r["concurrency_limit"] is not None:
            get(r["name"]).concurrency_limit = int(r["concurrency_limit"])
    return [by_queue[k] for k in sorted(by_queue)]


class Backend(abc.ABC):
    """A job store. Implementations: SQLite (embedded) and PostgreSQL (shared by a fleet)."""

    url: str
    #: Name shown in stats and benchmarks ("sqlite" or "postgres").
    name: str

    # -- lifecycle and schema -------------------------------------------------------------------
    @abc.abstractmethod
    def close(self) -> None:
        """Release connections. The backend is unusable afterwards."""

    @abc.abstractmethod
    def migrate(self) -> list[int]:
        """Apply pending migrations; return the versions applied (empty when up to date).
        Idempotent and safe when several processes run it at once. Raises SchemaError when the
        database was migrated by a newer Conveyor."""

    @abc.abstractmethod
    def schema_version(self) -> int | None:
        """The highest applied migration, or None for a database never migrated."""

    @abc.abstractmethod
    def db_now(self) -> datetime:
        """The database clock, UTC."""

    # -- jobs -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def periodic_enqueue(self, ticks: Sequence[tuple[str, datetime, NewJob]]) -> list[Job]:
        """In one transaction, for each (schedule name, tick, job): move the schedule's last tick
        forward to ``tick`` unless that tick or a later one is recorded already, and insert the
        job of each tick so recorded (as ``job_insert_many``). Returns those jobs. Of concurrent
        callers with the same tick, exactly one records it and inserts its job; a tick recorded
        once is never enqueued again, even after its job is gone."""

    @abc.abstractmethod
    def job_insert_many(self, jobs: Sequence[NewJob], connection: Any = None) -> list[Job]:
        """Insert jobs in one transaction (or on the caller's ``connection``, inside the caller's
        transaction, never committing it). Returns one Job per input, in order. A job whose
        ``idempotency_key`` exists, or whose ``unique_key`` is held by an active (waiting, queued,
        running, retrying) job, is not inserted: the existing job is returned with
        ``deduplicated=True``. Dedupe is enforced by unique indexes, so concurrent enqueuers
        cannot both insert.

        A job with ``depends_on`` starts waiting until they all succeeded; queued if they already
        all did; cancelled at once, naming the first that failed, if one ended dead or cancelled.
        Its dependencies are share-locked while deciding, so none finishes unnoticed. A
        dependency that does not exist raises JobNotFoundError and inserts nothing."""

    def job_fetch_available(
        self, worker_id: str, queues: Sequence[str], limit: int, lease: float
    ) -> list[Job]:
        """Claim up to ``limit`` due jobs (queued or retrying, run_at <= now) from ``queues`` in one
        atomic step: highest priority first, then earliest run_at, then lowest id. Each claimed
        job becomes running with attempt+1, attempted_at=now, lease_owner=worker_id and
        lease_expires_at=now+lease. Jobs whose concurrency_key has ``concurrency_limit`` running
        jobs, or whose queue has its concurrency limit running, are not claimed (fleet-wide)."""
        return self._fetch(worker_id, queues, limit, lease)

    def _fetch(
        self, worker_id: str, queues: Sequence[str], limit: int, lease: float, **how: Any
    ) -> list[Job]:
        """``job_fetch_available``, passing ``how`` on to ``_claim`` (PostgreSQL: ``conn=``, the
        connection to claim on)."""
        if limit <= 0 or not queues:
            return []
        return in_claim_order(self._claim(worker_id, queues, limit, lease, **how))

    @abc.abstractmethod
    def _claim(self, worker_id: str, queues: Sequence[str], limit: int, lease: float) -> list[Job]:
        """The claim statement(s) of ``job_fetch_available``, for ``limit`` >= 1 and some queues;
        in any order."""

    @abc.abstractmethod
    def job_finish_many(self, worker_id: str, outcomes: Sequence[Outcome]) -> set[int]:
        """Write the outcomes of attempts. Each applies only while its job is running with the
        same attempt and ``lease_owner == worker_id`` (fencing); returns the ids applied."""

    @abc.abstractmethod
    def job_heartbeat(
        self, worker_id: str, job_ids: Sequence[int], lease: float
    ) -> dict[int, bool]:
        """Extend the leases of the given jobs still held by ``worker_id`` to now+lease. Returns
        {job id: cancel_requested} for the jobs still held; a missing id means the lease was lost."""

    @abc.abstractmethod
    def job_rescue_stuck(self, now: datetime | None = None) -> list[Job]:
        """Recover running jobs whose lease expired before ``now`` (default: the database clock):
        retrying (due at once) with the error "lease expired: worker W lost" and the attempt
        counted, or dead when the attempt was the last. Returns the rescued jobs."""

    @abc.abstractmethod
    def job_hand_back(self, worker_id: str, job_ids: Sequence[int]) -> int:
        """Return running jobs held by ``worker_id`` to queued, due now, refunding the attempt
        (graceful shutdown). Returns how many were handed back."""

    @abc.abstractmethod
    def job_get(self, job_id: int) -> Job:
        """The job, or JobNotFoundError."""

    @abc.abstractmethod
    def job_list(
        self,
        state: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        """Jobs matching the filters, newest first."""

    def job_cancel(self, job_id: int, reason: str = "cancelled by request") -> Job:
        """Waiting/queued/retrying -> cancelled at once; running -> cancel_requested (the worker
        delivers it); terminal -> unchanged. Returns the job after the change. Cancelling a job
        (like any job ending dead or cancelled) cancels the jobs waiting for it, transitively."""
        job = self._one_job("cancel_pending", job_id, reason=reason)
        job = job or self._one_job("cancel_running", job_id)
        return job or self.job_get(job_id)

    @abc.abstractmethod
    def _one_job(self, query: str, job_id: int, **params: Any) -> Job | None:
        """Run the named query (a write) for ``job_id``; the job it returns, if any."""

    @abc.abstractmethod
    def job_retry(self, job_id: int) -> Job:
        """Dead or cancelled -> queued, due now, attempt 0, snoozes 0, finish and lease fields
        cleared, error history kept; waiting instead while one of its dependencies is unfinished.
        Other states, or a dependency that ended dead or cancelled (retry it first):
        InvalidTransitionError."""

    @abc.abstractmethod
    def job_delete(self, job_id: int) -> bool:
        """Delete a job that is not running, with its history. Jobs waiting for it are cancelled
        ("dependency job N (task) was deleted"). Returns False if it did not exist; raises
        InvalidTransitionError for a running job (cancel it first)."""

    def _refusal(self, job_id: int, rule: str) -> InvalidTransitionError:
        """The error for an operation the job's current state refused (JobNotFoundError if the
        job does not exist), e.g. "job 7 is running; cancel it before deleting"."""
        current = self.job_get(job_id)
        return InvalidTransitionError(f"job {job_id} is {current.state}; {rule}")

    def _delete_refused(self, job_id: int) -> bool:
        """After a delete matched nothing: False for a missing job, else why it was refused."""
        try:
            error = self._refusal(job_id, "cancel it before deleting")
        except JobNotFoundError:
            return False
        raise error

    @abc.abstractmethod
    def job_dependencies(self, job_id: int) -> list[int]:
        """Ids of the jobs ``job_id`` was enqueued to depend on, ascending (empty if none)."""

    def watch_finished(
        self, on_finished: Callable[[Iterable[int]], None], on_gap: Callable[[], None]
    ) -> Callable[[], None] | None:
        """Push, if this backend can: call ``on_finished(ids)`` (from another thread) when jobs
        of any process reach a terminal state, and ``on_gap()`` when notifications may have been
        missed (the listener lost its connection, or got it back). Returns once listening (or
        after trying for a few seconds), with a function that stops it; None when the backend
        cannot push (SQLite), so callers poll."""
        return None

    def watch_due(
        self,
        queues: Sequence[str],
        on_due: Callable[[], None],
        on_gap: Callable[[], None],
        idle_claim: IdleClaim | None = None,
    ) -> Callable[[], None] | None:
        """Push, if this backend can: call ``on_due()`` (from another thread) soon after jobs in
        one of ``queues`` become due now in any process (inserted, retried, released), and
        ``on_gap()`` when notifications may have been missed; with ``idle_claim``, claim them
        for an idle worker instead (see :class:`IdleClaim`). A claim made this way is the claim
        of ``job_fetch_available``, with its fencing and ordering. Returns a function that stops
        it, waiting a few seconds for a claim in progress to be delivered, or None when the
        backend cannot push across processes (SQLite), so workers poll."""
        return None

    # -- history and retention ------------------------------------------------------------------
    @abc.abstractmethod
    def job_events(self, job_id: int) -> list[JobEvent]:
        """The job's history, oldest first: one event for its insert and one per transition
        (state or attempt changed), written by database triggers in the same transaction as the
        change, whatever wrote it. Empty for an unknown (or deleted) job: deleting a job deletes
        its events."""

    @abc.abstractmethod
    def job_prune(
        self, state: JobState, older_than: float, limit: int, now: datetime | None = None
    ) -> int:
        """Delete up to ``limit`` jobs in the terminal ``state`` whose finished_at is more than
        ``older_than`` seconds before ``now`` (default: the database clock), oldest first, with
        their events, in one statement. Skips rows another transaction holds. Returns how many."""

    @abc.abstractmethod
    def event_prune(self, older_than: float, limit: int, now: datetime | None = None) -> int:
        """Delete up to ``limit`` history records older than ``older_than`` seconds before ``now``
        (default: the database clock), oldest first, in one statement. Returns how many events
        they held. A record is one event on SQLite; on PostgreSQL, the events of one statement
        (up to 1000 jobs), all recorded at the same time."""

    @abc.abstractmethod
    def leader_claim(
        self, name: str, holder: str, interval: float, now: datetime | None = None
    ) -> bool:
        """Claim the run of the fleet-wide maintenance task ``name`` for this interval: True, and
        ``holder`` recorded as its last runner at ``now`` (default: the database clock), when no
        run was recorded or the last one started at least ``interval`` seconds before ``now``;
        else False. Atomic: of concurrent callers, at most one wins per interval."""

    def jobs_vacuum(self, min_dead: int, gentle: bool = False) -> bool:
        """Reclaim the jobs table's dead row versions when it holds at least ``min_dead`` of them
        (and a twentieth as many as live ones); True if it did. Every claim and every outcome
        leaves one behind on PostgreSQL (MVCC), and an entry in the claim index that each later
        claim steps over until VACUUM removes it. Never blocks claims or writes, and skips its
        turn while another process vacuums the table. ``gentle``: paced as autovacuum paces
        itself (PostgreSQL: a cost-based delay), longer but leaving the machine to the jobs that
        arrive meanwhile. It may do the other chores of the hot path's storage as well
        (PostgreSQL: merge the history index's pending list). The default, for stores that keep
        no dead versions (SQLite): False."""
        return False

    @abc.abstractmethod
    def maintenance_lock(self, name: str) -> AbstractContextManager[bool]:
        """A context manager yielding whether this process may run maintenance task ``name`` now,
        excluding every other process until it exits (PostgreSQL: a session advisory lock, never
        waited for; SQLite: always True, as its single writer lock already serializes writes)."""

    # -- queues, workers, stats -----------------------------------------------------------------
    @abc.abstractmethod
    def _execute(self, query: str, params: dict[str, Any]) -> int:
        """Run the statement named ``query`` in this backend's queries.sql, in a transaction of
        its own; the number of rows it touched. (Both backends name these statements alike, so
        the operations below are written once, here.)"""

    def queue_configure(self, name: str, concurrency: int | None) -> None:
        """Set (or clear, with None) a queue's fleet-wide concurrency limit."""
        self._execute("configure_queue", {"name": name, "limit": concurrency})

    def worker_register(self, info: WorkerInfo) -> None:
        """Record a worker (id, host, pid, queues, concurrency) as started and seen now."""
        params = {
            "id": info.id,
            "host": info.host,
            "pid": info.pid,
            "queues": json.dumps(info.queues),
            "concurrency": info.concurrency,
        }
        self._execute("register_worker", params)

    def worker_heartbeat(self, worker_id: str) -> None:
        """Set the worker's last_seen_at to now."""
        self._execute("worker_seen", {"id": worker_id})

    def worker_deregister(self, worker_id: str) -> None:
        """Mark the worker stopped."""
        self._execute("worker_stopped", {"id": worker_id})

    @abc.abstractmethod
    def worker_list(self) -> list[WorkerInfo]:
        """Registered workers, most recently seen first."""

    @abc.abstractmethod
    def stats(self) -> list[QueueStats]:
        """Per queue: job count per state, age of the oldest due waiting job, limit."""


def redact_url(url: str) -> str:
    """The URL with any password replaced, for error messages."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def open_backend(url: str) -> Backend:
    """A backend for ``sqlite:///path`` or ``postgresql://...``; ConfigurationError otherwise."""
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"database URL must be a non-empty string, not {url!r}")
    if "\x00" in unquote(url):
        raise ConfigurationError(f"database URL {redact_url(url)!r} contains a NUL character")
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:  # e.g. "Invalid IPv6 URL"
        raise ConfigurationError(f"invalid database URL {redact_url(url)!r}: {exc}") from None
    if scheme == "sqlite":
        from .sqlite import SQLiteBackend

        return SQLiteBackend(url)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresBackend

        return PostgresBackend(url)
    raise ConfigurationError(
        f"unsupported database URL {redact_url(url)!r}: use sqlite:///path/to/file.db "
        "or postgresql://user@host/dbname"
    )
