"""SQLite backend: one file in WAL mode; every write is one ``BEGIN IMMEDIATE`` transaction, and
SQLITE_BUSY is retried here, never surfaced to callers."""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from ... import sqlfile
from ...errors import (
    ConfigurationError,
    ConveyorError,
    DatabaseUnavailableError,
    JobNotFoundError,
)
from ...job import Job, JobEvent, JobState
from ...serialization import load_stored, load_text
from ...states import Outcome
from ..base import (
    JOB_COLUMNS,
    RESCUE_BATCH,
    Backend,
    NewJob,
    QueueStats,
    WorkerInfo,
    build_stats,
    event_from_row,
    job_columns,
    job_from_values,
    redact_url,
)
from ..dedupe import resolve_inserted
from ..dependencies import (
    NO_DEPENDENCIES,
    Dependency,
    all_dependency_ids,
    edges,
    retry_state,
)
from ..dependencies import (
    plan as plan_dependencies,
)
from ..migrate import SQLITE_MIGRATIONS as MIGRATIONS
from ..migrate import check_version

T = TypeVar("T")

_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
QUERIES = {k: job_columns(v.replace("{now}", _NOW)) for k, v in sqlfile.load(__name__).items()}
_TIME_COLUMNS = [
    "created_at",
    "run_at",
    "started_at",
    "attempted_at",
    "finished_at",
    "heartbeat_at",
    "lease_expires_at",
    "last_seen_at",
    "stopped_at",
    "at",
]
_JSON_COLUMNS = ("args", "kwargs", "last_error", "errors", "result", "queues", "error")
#: Positions in a job row (``{job_columns}``) of its times and of its JSON columns.
_JOB_TIMES = tuple(i for i, name in enumerate(JOB_COLUMNS) if name in _TIME_COLUMNS)
_ARGS, _KWARGS, _LAST_ERROR, _ERRORS, _RESULT, _DEADLINE, _TIMEOUT = (
    JOB_COLUMNS.index(c)
    for c in ("args", "kwargs", "last_error", "errors", "result", "deadline", "timeout")
)
#: How long a write keeps retrying SQLITE_BUSY before giving up with a clear error.
BUSY_RETRY_SECONDS = 60.0
#: Idle connections kept open for reuse; more may be open while in use.
_MAX_IDLE = 8


def path_from_url(url: str) -> str:
    parts = urlsplit(url)
    raw = unquote(parts.netloc + parts.path)
    path = raw[1:] if raw.startswith("/") else raw
    if not path:
        raise ConfigurationError(f"SQLite URL {url!r} names no file: use sqlite:///path/to/file.db")
    if path == ":memory:" or path.startswith("file::memory:"):
        raise ConfigurationError(
            f"SQLite URL {url!r} is an in-memory database, which workers cannot share: use a file"
        )
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise ConfigurationError(f"SQLite URL {url!r}: directory {str(parent)!r} does not exist")
    return str(Path(path).expanduser())


def _to_time(value: float | None) -> datetime | None:
    """Rounded down to the microsecond, so a time read back and written again (``run_at=now``)
    is never later than the database's own value."""
    if value is None:
        return None
    return datetime.fromtimestamp(math.floor(value * 1e6) / 1e6, UTC)


def _from_time(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ConfigurationError(f"datetime {value!r} has no timezone; pass an aware datetime")
    return value.timestamp()


def _convert(
    row: sqlite3.Row,
    times: Iterable[str] = _TIME_COLUMNS,
    json_columns: Iterable[str] = _JSON_COLUMNS,
) -> dict[str, Any]:
    """The row with Python types: ``times`` (epoch seconds) as datetimes, ``json_columns``
    decoded (the defaults: the columns of jobs, events and workers)."""
    out = dict(zip(row.keys(), row, strict=True))
    for key in times:
        if key in out:
            out[key] = _to_time(out[key])
    for key in json_columns:
        if key in out and out[key] is not None:
            out[key] = load_stored(out[key])
    return out


def _load(value: Any) -> Any:
    """A JSON column's value: :func:`load_text` (the C scanner directly, several times cheaper
    than ``json.loads``) for text, as stored; :func:`load_stored` for anything else, such as a
    BLOB written behind Conveyor's back."""
    return load_text(value) if type(value) is str else load_stored(value)


def _jobs(rows: Iterable[Sequence[Any]]) -> list[Job]:
    """Jobs from rows of ``{job_columns}`` (plain tuples, see _job_rows). The rows of one
    statement share its clock ({now} is fixed within a statement), so each distinct time is
    converted once; '[]' and '{}', the usual arguments and error history, are not decoded."""
    times: dict[float, datetime | None] = {}
    cached = times.get
    jobs = []
    for row in rows:
        values = list(row)
        for i in _JOB_TIMES:
            value = values[i]
            if value is not None:
                at = cached(value)
                if at is None:
                    at = times[value] = _to_time(value)
                values[i] = at
        args = values[_ARGS]
        values[_ARGS] = [] if args == "[]" else _load(args)
        kwargs = values[_KWARGS]
        values[_KWARGS] = {} if kwargs == "{}" else _load(kwargs)
        errors = values[_ERRORS]
        values[_ERRORS] = [] if errors == "[]" else _load(errors)
        if values[_LAST_ERROR] is not None:
            values[_LAST_ERROR] = _load(values[_LAST_ERROR])
        if values[_RESULT] is not None:
            values[_RESULT] = _load(values[_RESULT])
        for i in (_DEADLINE, _TIMEOUT):  # seconds, always a float (SQLite may keep an int)
            if values[i] is not None:
                values[i] = float(values[i])
        jobs.append(job_from_values(values))
    return jobs


def _job_rows(conn: sqlite3.Connection, query: str, params: dict[str, Any]) -> list[Job]:
    """Run a job query (one that returns ``{job_columns}``) on ``conn``: its jobs. Rows come as
    plain tuples, whatever the connection's row_factory (a caller's connection too)."""
    cur = conn.cursor()
    cur.row_factory = None
    return _jobs(cur.execute(QUERIES[query], params).fetchall())


def _record(ord: int, job: NewJob, initial: dict[int, tuple[str, str | None]]) -> tuple[Any, ...]:
    """One job's row of ``insert_jobs``: its place in the input, its columns, state and reason."""
    state, reason = initial.get(id(job), NO_DEPENDENCIES)
    return (
        ord,
        job.task,
        job.queue,
        job.args,
        job.kwargs,
        job.priority,
        job.delay,
        _from_time(job.run_at),
        job.max_attempts,
        job.max_snoozes,
        job.deadline,
        job.timeout,
        job.unique_key,
        job.idempotency_key,
        job.concurrency_key,
        job.concurrency_limit,
        state,
        reason,
    )


#: Bound parameters per statement at most (SQLite's limit before 3.32 was 999).
_MAX_PARAMS = 998
#: Bound parameters per row of ``insert_jobs``, ``finish_succeeded`` and ``finish``.
_INSERT_WIDTH, _SUCCESS_WIDTH, _OUTCOME_WIDTH = 18, 3, 8


def _max_rows(width: int) -> int:
    """Most rows of ``width`` parameters per statement: a power of two (32 for an insert)."""
    return 1 << ((_MAX_PARAMS // width).bit_length() - 1)


@functools.cache
def _rows_sql(query: str, width: int, rows: int) -> str:
    """``query`` with {rows} as ``rows`` rows of ``width`` bound parameters. Callers use a few
    row counts (powers of two), so that each text is prepared once per connection (the sqlite3
    module's statement cache) whatever the number of jobs."""
    row = "(" + ", ".join("?" * width) + ")"
    return QUERIES[query].replace("{rows}", ", ".join([row] * rows))


def _insert_chunks(count: int) -> Iterator[tuple[int, int]]:
    """(start, size) of the statements that insert ``count`` jobs: as many rows as a statement
    takes at a time, then the rest by powers of two."""
    start, most = 0, _max_rows(_INSERT_WIDTH)
    while start < count:
        size = min(most, 1 << ((count - start).bit_length() - 1))
        yield start, size
        start += size


def _finish_statements(
    worker_id: str, outcomes: Sequence[Outcome]
) -> Iterator[tuple[str, list[Any]]]:
    """The statements that write ``outcomes`` (no job twice), with their parameters: the cheaper
    ``finish_succeeded`` when every one is a plain success, as most are. Each takes as many
    outcomes as it can, padded with rows of NULLs to a power of two (one statement for a
    worker's batch of 100 successes)."""
    if all(o.plain_success for o in outcomes):
        query, width = "finish_succeeded", _SUCCESS_WIDTH
        values: list[Any] = [v for o in outcomes for v in (o.job_id, o.attempt, o.result)]
    else:
        query, width = "finish", _OUTCOME_WIDTH
        values = [
            v
            for o in outcomes
            for v in (
                o.job_id,
                o.attempt,
                str(o.state),
                o.delay,
                o.result,
                None if o.error is None else json.dumps(o.error),
                int(o.refund_attempt),
                int(o.snoozed),
            )
        ]
    most = _max_rows(width)
    for start in range(0, len(outcomes), most):
        count = min(most, len(outcomes) - start)
        rows = 1 << (count - 1).bit_length()
        params = values[start * width : (start + count) * width]
        params += [None] * ((rows - count) * width)
        params.append(worker_id)
        yield _rows_sql(query, width, rows), params


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _statements(script: str) -> list[str]:
    """Split a migration into statements without executescript (which would commit)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()
    ):
        raise ConveyorError(f"incomplete statement in migration: {buf.strip()[:60]!r}")
    return out


class SQLiteBackend(Backend):
    name = "sqlite"

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = path_from_url(url)
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        #: Held around every write transaction of this backend (see _write).
        self._writer = threading.RLock()
        self._closed = False
        #: Workers whose last claim came back full (see _claim).
        self._claimed_full: set[str] = set()
        with self._connection():  # open now, so a bad file fails here with a clear error
            pass

    # -- connections and transactions -----------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 5000")
            self._retry_busy(lambda: conn.execute("PRAGMA journal_mode = WAL"))
            conn.execute("PRAGMA synchronous = NORMAL")
            # The transient tables of a claim or an outcome write (RETURNING rows, IN lists,
            # UPDATE ... FROM) in memory: about a tenth of their cost. (Whole-table sorts, as in
            # stats(), spill to temp files instead: see _sorting.)
            conn.execute("PRAGMA temp_store = MEMORY")
            # Cancelling a job's dependents fires the same trigger for theirs (dependencies).
            conn.execute("PRAGMA recursive_triggers = ON")
        except sqlite3.DatabaseError as exc:
            raise ConfigurationError(f"cannot open SQLite database {self.path!r}: {exc}") from None
        return conn

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A connection for this thread's use, from a small pool (at most _MAX_IDLE kept open)."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._open()
        try:
            yield conn
        finally:
            with self._lock:
                keep = not self._closed and not conn.in_transaction and len(self._idle) < _MAX_IDLE
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    def _retry_busy(self, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + BUSY_RETRY_SECONDS
        delay = 0.001
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if time.monotonic() > deadline:
                    raise DatabaseUnavailableError(
                        f"SQLite database {self.path!r} stayed locked for "
                        f"{BUSY_RETRY_SECONDS:g} s: {exc}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one BEGIN IMMEDIATE transaction, retrying the whole of it on SQLITE_BUSY.

        Writers of this process take turns on ``_writer`` first: one waiting for another in
        SQLite's busy handler would sleep 1, 2, 5 ms... (a worker's claims and outcome writes run
        in different threads), while the lock is held for well under a millisecond."""
        with self._connection() as conn, self._writer:
            return self._retry_busy(lambda: self._transaction(conn, fn))

    @staticmethod
    def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
            return result
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _read(self, query: str, params: dict[str, Any] | None = None) -> list[sqlite3.Row]:
        with self._connection() as conn:
            return self._retry_busy(lambda: conn.execute(QUERIES[query], params or {}).fetchall())

    def _write_rows(self, query: str, params: dict[str, Any]) -> list[sqlite3.Row]:
        return self._write(lambda c: c.execute(QUERIES[query], params).fetchall())

    def _execute(self, query: str, params: dict[str, Any]) -> int:
        return self._write(lambda c: int(c.execute(QUERIES[query], params).rowcount))

    def _read_jobs(self, query: str, params: dict[str, Any]) -> list[Job]:
        with self._connection() as conn:
            return self._retry_busy(lambda: _job_rows(conn, query, params))

    def _write_jobs(self, query: str, params: dict[str, Any]) -> list[Job]:
        return self._write(lambda conn: _job_rows(conn, query, params))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- schema ---------------------------------------------------------------------------------
    def migrate(self) -> list[int]:
        def run(conn: sqlite3.Connection) -> list[int]:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS conveyor_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            current = self._version(conn)
            check_version(current, self.url, allow_missing=True)
            applied = []
            for version, name, sql in MIGRATIONS:
                if version <= (current or 0):
                    continue
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute(
                    f"INSERT INTO conveyor_migrations (version, name, applied_at) "
                    f"VALUES (?, ?, {_NOW})",
                    (version, name),
                )
                applied.append(version)
            return applied

        return self._write(run)

    @staticmethod
    def _version(conn: sqlite3.Connection) -> int | None:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'conveyor_migrations'"
        ).fetchone()
        if exists is None:
            return None
        row = conn.execute("SELECT max(version) FROM conveyor_migrations").fetchone()
        return None if row[0] is None else int(row[0])

    def schema_version(self) -> int | None:
        with self._connection() as conn:
            return self._retry_busy(lambda: self._version(conn))

    def db_now(self) -> datetime:
        value = _to_time(self._read("db_now")[0]["now"])
        assert value is not None
        return value

    # -- jobs -----------------------------------------------------------------------------------
    def job_insert_many(self, jobs: Sequence[NewJob], connection: Any = None) -> list[Job]:
        jobs = list(jobs)  # built (and checked) before anything is written (see LazyNewJobs)
        if not jobs:
            return []
        if connection is not None:
            return self._insert_on(self.caller_connection(connection), jobs)
        return self._write(lambda conn: self._insert_on(conn, jobs))

    def periodic_enqueue(self, ticks: Sequence[tuple[str, datetime, NewJob]]) -> list[Job]:
        if not ticks:
            return []
        ordered = sorted(ticks, key=lambda t: (t[0], t[1]))

        def enqueue(conn: sqlite3.Connection) -> list[Job]:
            cur = conn.cursor()
            fresh = [
                job
                for name, tick, job in ordered
                if cur.execute(
                    QUERIES["periodic_advance"], {"name": name, "tick": _from_time(tick)}
                ).fetchone()
            ]
            return self._insert_on(conn, fresh) if fresh else []

        return self._write(enqueue)

    @staticmethod
    def caller_connection(connection: Any) -> sqlite3.Connection:
        """``connection`` (a caller's ``connection=``) if it is a sqlite3.Connection, else a
        ConfigurationError naming what it is."""
        if not isinstance(connection, sqlite3.Connection):
            raise ConfigurationError(
                f"connection= must be a sqlite3.Connection for a SQLite app, "
                f"not {type(connection).__name__}"
            )
        return connection

    @staticmethod
    def _insert_on(conn: sqlite3.Connection, jobs: Sequence[NewJob]) -> list[Job]:
        def rows(query: str, params: dict[str, Any]) -> list[sqlite3.Row]:
            cur = conn.cursor()
            cur.row_factory = sqlite3.Row
            return cur.execute(QUERIES[query], params).fetchall()

        initial = SQLiteBackend._initial_states(jobs, rows)

        def insert(batch: Sequence[NewJob]) -> list[Job]:
            cur = conn.cursor()
            cur.row_factory = None
            inserted: list[Any] = []
            for start, size in _insert_chunks(len(batch)):
                params = [
                    value
                    for ord in range(start, start + size)
                    for value in _record(ord, batch[ord], initial)
                ]
                sql = _rows_sql("insert_jobs", _INSERT_WIDTH, size)
                inserted += cur.execute(sql, params).fetchall()
            return _jobs(inserted)

        def find(idem: list[str], uniq: list[str]) -> list[Job]:
            params = {"idempotency_keys": json.dumps(idem), "unique_keys": json.dumps(uniq)}
            return _job_rows(conn, "find_duplicates", params)

        inserted = resolve_inserted(jobs, insert, find)
        pairs = edges(jobs, inserted)
        if pairs:
            rows("insert_dependencies", {"pairs": json.dumps(pairs)})
        return inserted

    @staticmethod
    def _initial_states(
        jobs: Sequence[NewJob], rows: Callable[[str, dict[str, Any]], list[sqlite3.Row]]
    ) -> dict[int, tuple[str, str | None]]:
        """{id(new job): (state, reason)} for the jobs with dependencies (inside the write
        transaction, so no dependency can finish before the job and its edges are written)."""
        ids = all_dependency_ids(jobs)
        if not ids:
            return {}
        rows("take_write_lock", {})  # already held in our own BEGIN IMMEDIATE transactions
        deps = [
            Dependency.from_row(_convert(r))
            for r in rows("dependency_states", {"ids": json.dumps(ids)})
        ]
        return plan_dependencies(jobs, {d.id: d for d in deps})

    def _claim(self, worker_id: str, queues: Sequence[str], limit: int, lease: float) -> list[Job]:
        qjson = json.dumps(list(queues))
        # A read first: an idle poll must not take the write lock that enqueuers need. Skipped
        # while this worker's claims come back full: there is work, and the claim looks anyway.
        if worker_id not in self._claimed_full:
            with self._connection() as conn:
                due = self._retry_busy(
                    lambda: conn.execute(QUERIES["any_due"], {"queues": qjson}).fetchone()[0]
                )
            if not due:
                return []

        def claim(conn: sqlite3.Connection) -> list[Job]:
            limited_json, keyed = conn.execute(QUERIES["claim_plan"], {"queues": qjson}).fetchone()
            limited = [] if limited_json == "[]" else json.loads(limited_json)
            unlimited = list(dict.fromkeys(q for q in queues if q not in limited))
            # The best jobs under a limit and the best jobs under none; claim the best of both,
            # so priority order holds across the two (dropping limited jobs keeps the limits).
            chosen: list[sqlite3.Row] = []
            if keyed or (
                limited
                and conn.execute(QUERIES["queues_due"], {"queues": limited_json}).fetchone()[0]
            ):
                params = {
                    "queues": qjson,
                    "limited": limited_json,
                    "limit": limit,
                    "scan": limit * 4,
                }
                chosen = conn.execute(QUERIES["choose_limited"], params).fetchall()
            lease_params = {"worker": worker_id, "lease": lease}
            if not chosen and len(unlimited) == 1:  # the usual claim: one statement
                params = {**lease_params, "queue": unlimited[0], "limit": limit}
                return _job_rows(conn, "claim_queue", params)
            # One query per queue: with ``queue = ?`` the partial index yields rows in claim
            # order, so a claim reads ~limit rows whatever the backlog (an IN list would sort).
            for queue in unlimited:
                chosen += conn.execute(
                    QUERIES["choose"], {"queue": queue, "limit": limit}
                ).fetchall()
            if not chosen:
                return []
            chosen.sort(key=lambda r: (-r[1], r[2], r[0]))  # rows of (id, priority, run_at)
            ids = json.dumps([r[0] for r in chosen[:limit]])
            return _job_rows(conn, "claim", {**lease_params, "ids": ids})

        jobs = self._write(claim)
        if len(jobs) >= limit:
            self._claimed_full.add(worker_id)
        else:
            self._claimed_full.discard(worker_id)
        return jobs

    def job_finish_many(self, worker_id: str, outcomes: Sequence[Outcome]) -> set[int]:
        if not outcomes:
            return set()
        # One statement for the batch; a job named twice (outcomes of two attempts) would make
        # its result depend on the join: then one outcome at a time, in order, each fenced.
        batches = [outcomes]
        if len({o.job_id for o in outcomes}) < len(outcomes):
            batches = [[o] for o in outcomes]

        def finish(conn: sqlite3.Connection) -> set[int]:
            applied: set[int] = set()
            for batch in batches:
                for sql, params in _finish_statements(worker_id, batch):
                    applied.update(r[0] for r in conn.execute(sql, params))
            return applied

        return self._write(finish)

    def job_heartbeat(
        self, worker_id: str, job_ids: Sequence[int], lease: float
    ) -> dict[int, bool]:
        if not job_ids:
            return {}
        params = {"worker": worker_id, "ids": json.dumps(list(job_ids)), "lease": lease}
        return {r["id"]: bool(r["cancel_requested"]) for r in self._write_rows("heartbeat", params)}

    def job_rescue_stuck(self, now: datetime | None = None) -> list[Job]:
        params = {"now": _from_time(now), "limit": RESCUE_BATCH}
        return self._write_jobs("rescue_stuck", params)

    def job_hand_back(self, worker_id: str, job_ids: Sequence[int]) -> int:
        if not job_ids:
            return 0
        params = {"worker": worker_id, "ids": json.dumps(list(job_ids))}
        return self._write(lambda c: c.execute(QUERIES["hand_back"], params).rowcount)

    def _one_job(self, query: str, job_id: int, **params: Any) -> Job | None:
        jobs = self._write_jobs(query, {"id": job_id, **params})
        return jobs[0] if jobs else None

    def job_get(self, job_id: int) -> Job:
        jobs = self._read_jobs("get_job", {"id": job_id})
        if not jobs:
            raise JobNotFoundError(f"no job with id {job_id}")
        return jobs[0]

    def job_list(
        self,
        state: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        params = {"state": state, "queue": queue, "task": task, "limit": limit}
        return self._read_jobs("list_jobs", params)

    def job_retry(self, job_id: int) -> Job:
        def retry(conn: sqlite3.Connection) -> list[Job]:
            current = conn.execute(QUERIES["job_state"], {"id": job_id}).fetchone()
            if current is None or current[0] not in ("dead", "cancelled"):
                return []
            rows = conn.execute(QUERIES["job_dependencies"], {"id": job_id}).fetchall()
            deps = [Dependency.from_row(_convert(r)) for r in rows]
            params = {"id": job_id, "state": retry_state(job_id, deps)}
            return _job_rows(conn, "retry_job", params)

        retried = self._write(retry)
        if not retried:
            raise self._refusal(job_id, "only dead or cancelled jobs can be retried")
        return retried[0]

    def job_dependencies(self, job_id: int) -> list[int]:
        return [int(r["id"]) for r in self._read("job_dependencies", {"id": job_id})]

    def job_delete(self, job_id: int) -> bool:
        if self._write_rows("delete_job", {"id": job_id}):
            return True
        return self._delete_refused(job_id)

    # -- history and retention ------------------------------------------------------------------
    def job_events(self, job_id: int) -> list[JobEvent]:
        return [event_from_row(_convert(r)) for r in self._read("job_events", {"id": job_id})]

    def job_prune(
        self, state: JobState, older_than: float, limit: int, now: datetime | None = None
    ) -> int:
        params = {"state": str(state), "age": older_than, "limit": limit, "now": _from_time(now)}
        return self._write(lambda c: c.execute(QUERIES["prune_jobs"], params).rowcount)

    def event_prune(self, older_than: float, limit: int, now: datetime | None = None) -> int:
        params = {"age": older_than, "limit": limit, "now": _from_time(now)}
        return self._write(lambda c: c.execute(QUERIES["prune_events"], params).rowcount)

    def leader_claim(
        self, name: str, holder: str, interval: float, now: datetime | None = None
    ) -> bool:
        params = {"name": name, "holder": holder, "interval": interval, "now": _from_time(now)}
        return bool(self._write_rows("leader_claim", params))

    def maintenance_lock(self, name: str) -> AbstractContextManager[bool]:
        return nullcontext(True)

    # -- queues, workers, stats -----------------------------------------------------------------
    def worker_list(self) -> list[WorkerInfo]:
        return [WorkerInfo(**_convert(r)) for r in self._read("list_workers")]

    def stats(self) -> list[QueueStats]:
        with self._connection() as conn, self._sorting(conn):

            def rows(name: str) -> list[dict[str, Any]]:
                found = self._retry_busy(lambda: conn.execute(QUERIES[name]).fetchall())
                return [dict(zip(r.keys(), r, strict=True)) for r in found]

            return build_stats(rows("stats_counts"), rows("stats_oldest_due"), rows("stats_limits"))

    @staticmethod
    @contextmanager
    def _sorting(conn: sqlite3.Connection) -> Iterator[None]:
        """For reads that sort a whole table (stats' GROUP BY over every job): their sorter
        spills to temp files, not memory as the hot path's small transient tables do (about
        50 bytes a job, held until the read ends)."""
        conn.execute("PRAGMA temp_store = FILE")
        try:
            yield
        finally:
            conn.execute("PRAGMA temp_store = MEMORY")


__all__ = ["SQLiteBackend", "path_from_url", "redact_url"]
