"""SQLite backend: one file in WAL mode; every write is one ``BEGIN IMMEDIATE`` transaction, and
SQLITE_BUSY is retried here, never surfaced to callers."""

from __future__ import annotations

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
from ...serialization import load_stored
from ...states import Outcome
from ..base import (
    NEW_JOB_COLUMNS,
    RESCUE_BATCH,
    Backend,
    NewJob,
    QueueStats,
    WorkerInfo,
    build_stats,
    event_from_row,
    job_from_row,
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
QUERIES = {k: v.replace("{now}", _NOW) for k, v in sqlfile.load(__name__).items()}
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
#: How long a write keeps retrying SQLITE_BUSY before giving up with a clear error.
BUSY_RETRY_SECONDS = 60.0
#: Idle connections kept open for reuse; more may be open while in use.
_MAX_IDLE = 8
#: Jobs inserted per statement by enqueue_many (one JSON array each).
_INSERT_CHUNK = 5000


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


def _job(row: sqlite3.Row) -> Job:
    return job_from_row(_convert(row))


def _record(job: NewJob, initial: dict[int, tuple[str, str | None]]) -> dict[str, Any]:
    """One job as an object of the JSON array that ``insert_jobs`` reads."""
    record = {k: getattr(job, k) for k in NEW_JOB_COLUMNS}
    record["run_at"] = _from_time(job.run_at)
    record["state"], record["reason"] = initial.get(id(job), NO_DEPENDENCIES)
    return record


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
        self._closed = False
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
        """Run ``fn`` in one BEGIN IMMEDIATE transaction, retrying the whole of it on SQLITE_BUSY."""
        with self._connection() as conn:
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
        if not jobs:
            return []
        if connection is not None:
            if not isinstance(connection, sqlite3.Connection):
                raise ConfigurationError(
                    f"connection= must be a sqlite3.Connection for a SQLite app, "
                    f"not {type(connection).__name__}"
                )
            return self._insert_on(connection, jobs)
        return self._write(lambda conn: self._insert_on(conn, jobs))

    @staticmethod
    def _insert_on(conn: sqlite3.Connection, jobs: Sequence[NewJob]) -> list[Job]:
        def rows(query: str, params: dict[str, Any]) -> list[sqlite3.Row]:
            cur = conn.cursor()
            cur.row_factory = sqlite3.Row
            return cur.execute(QUERIES[query], params).fetchall()

        initial = SQLiteBackend._initial_states(jobs, rows)

        def insert(batch: Sequence[NewJob]) -> list[Job]:
            out: list[Job] = []
            for start in range(0, len(batch), _INSERT_CHUNK):
                records = [_record(job, initial) for job in batch[start : start + _INSERT_CHUNK]]
                out.extend(_job(r) for r in rows("insert_jobs", {"jobs": json.dumps(records)}))
            return out

        def find(idem: list[str], uniq: list[str]) -> list[Job]:
            params = {"idempotency_keys": json.dumps(idem), "unique_keys": json.dumps(uniq)}
            return [_job(r) for r in rows("find_duplicates", params)]

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
        with self._connection() as conn:
            # A read first: an idle poll must not take the write lock that enqueuers need.
            if not self._retry_busy(lambda: self._any_due(conn, qjson, queues)):
                return []

        def claim(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            limited = [r[0] for r in conn.execute(QUERIES["limited_queues"], {"queues": qjson})]
            ljson = json.dumps(limited)
            # The best jobs under a limit and the best jobs under none; claim the best of both,
            # so priority order holds across the two (dropping limited jobs keeps the limits).
            chosen: list[sqlite3.Row] = []
            if self._limited_due(conn, qjson, limited):
                params = {"queues": qjson, "limited": ljson, "limit": limit, "scan": limit * 4}
                chosen = conn.execute(QUERIES["choose_limited"], params).fetchall()
            # One query per queue: with ``queue = ?`` the partial index yields rows in claim
            # order, so a claim reads ~limit rows whatever the backlog (an IN list would sort).
            for queue in (q for q in queues if q not in limited):
                params = {"queue": queue, "limit": limit}
                chosen += conn.execute(QUERIES["choose"], params).fetchall()
            chosen.sort(key=lambda r: (-r["priority"], r["run_at"], r["id"]))
            if not chosen:
                return []
            ids = json.dumps([r["id"] for r in chosen[:limit]])
            params = {"worker": worker_id, "lease": lease, "ids": ids}
            return conn.execute(QUERIES["claim"], params).fetchall()

        return [_job(r) for r in self._write(claim)]

    @classmethod
    def _any_due(cls, conn: sqlite3.Connection, qjson: str, queues: Sequence[str]) -> bool:
        """Is any claimable job due in ``queues``? (Index probes only.)"""
        return cls._limited_due(conn, qjson, list(queues))

    @staticmethod
    def _limited_due(conn: sqlite3.Connection, qjson: str, limited: list[str]) -> bool:
        """Is any job under a concurrency limit due? (Limited queues are asked one by one, so
        each check is an index probe, never a scan of the backlog.)"""
        if conn.execute(QUERIES["keyed_due"], {"queues": qjson}).fetchone()[0]:
            return True
        return any(conn.execute(QUERIES["queue_due"], {"queue": q}).fetchone()[0] for q in limited)

    def job_finish_many(self, worker_id: str, outcomes: Sequence[Outcome]) -> set[int]:
        if not outcomes:
            return set()

        def finish(conn: sqlite3.Connection) -> set[int]:
            applied: set[int] = set()
            for o in outcomes:
                params = {
                    "worker": worker_id,
                    "id": o.job_id,
                    "attempt": o.attempt,
                    "state": str(o.state),
                    "delay": o.delay,
                    "result": o.result,
                    "error": None if o.error is None else json.dumps(o.error),
                    "refund": int(o.refund_attempt),
                    "snoozed": int(o.snoozed),
                }
                applied.update(r[0] for r in conn.execute(QUERIES["finish"], params))
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
        return [_job(r) for r in self._write_rows("rescue_stuck", params)]

    def job_hand_back(self, worker_id: str, job_ids: Sequence[int]) -> int:
        if not job_ids:
            return 0
        params = {"worker": worker_id, "ids": json.dumps(list(job_ids))}
        return self._write(lambda c: c.execute(QUERIES["hand_back"], params).rowcount)

    def _one_job(self, query: str, job_id: int, **params: Any) -> Job | None:
        rows = self._write_rows(query, {"id": job_id, **params})
        return _job(rows[0]) if rows else None

    def job_get(self, job_id: int) -> Job:
        rows = self._read("get_job", {"id": job_id})
        if not rows:
            raise JobNotFoundError(f"no job with id {job_id}")
        return _job(rows[0])

    def job_list(
        self,
        state: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        params = {"state": state, "queue": queue, "task": task, "limit": limit}
        return [_job(r) for r in self._read("list_jobs", params)]

    def job_retry(self, job_id: int) -> Job:
        def retry(conn: sqlite3.Connection) -> sqlite3.Row | None:
            current = conn.execute(QUERIES["get_job"], {"id": job_id}).fetchone()
            if current is None or current["state"] not in ("dead", "cancelled"):
                return None
            rows = conn.execute(QUERIES["job_dependencies"], {"id": job_id}).fetchall()
            deps = [Dependency.from_row(_convert(r)) for r in rows]
            params = {"id": job_id, "state": retry_state(job_id, deps)}
            row: sqlite3.Row | None = conn.execute(QUERIES["retry_job"], params).fetchone()
            return row

        row = self._write(retry)
        if row is None:
            raise self._refusal(job_id, "only dead or cancelled jobs can be retried")
        return _job(row)

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
    def queue_configure(self, name: str, concurrency: int | None) -> None:
        self._write_rows("configure_queue", {"name": name, "limit": concurrency})

    def worker_register(self, info: WorkerInfo) -> None:
        params = {
            "id": info.id,
            "host": info.host,
            "pid": info.pid,
            "queues": json.dumps(info.queues),
            "concurrency": info.concurrency,
        }
        self._write_rows("register_worker", params)

    def worker_heartbeat(self, worker_id: str) -> None:
        self._write_rows("worker_seen", {"id": worker_id})

    def worker_deregister(self, worker_id: str) -> None:
        self._write_rows("worker_stopped", {"id": worker_id})

    def worker_list(self) -> list[WorkerInfo]:
        return [WorkerInfo(**_convert(r)) for r in self._read("list_workers")]

    def stats(self) -> list[QueueStats]:
        def rows(name: str) -> list[dict[str, Any]]:
            return [dict(zip(r.keys(), r, strict=True)) for r in self._read(name)]

        return build_stats(rows("stats_counts"), rows("stats_oldest_due"), rows("stats_limits"))


__all__ = ["SQLiteBackend", "path_from_url", "redact_url"]
