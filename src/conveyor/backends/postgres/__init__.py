"""PostgreSQL backend: psycopg 3 with a connection pool; claims with FOR UPDATE SKIP LOCKED."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from ... import sqlfile
from ...errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    JobNotFoundError,
)
from ...job import Job, JobEvent, JobState
from ...serialization import load_stored, load_text
from ...states import Outcome
from ..base import (
    JOB_COLUMNS,
    NEW_JOB_COLUMNS,
    RESCUE_BATCH,
    Backend,
    IdleClaim,
    NewJob,
    QueueStats,
    WorkerInfo,
    build_stats,
    event_from_row,
    job_columns,
    job_from_insert,
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
from ..migrate import POSTGRES_MIGRATIONS as MIGRATIONS
from ..migrate import check_version
from .bulk import COPY_MIN, copy_jobs, copyable
from .listener import due_listener, finished_listener, network_options

try:
    import psycopg
    from psycopg.rows import dict_row, tuple_row
    from psycopg.types.json import set_json_loads
    from psycopg.types.string import TextBinaryLoader
    from psycopg_pool import ConnectionPool
except ImportError:  # pragma: no cover - exercised only without the extra installed
    psycopg = None  # type: ignore[assignment]

logger = logging.getLogger("conveyor.postgres")
_MIGRATION_LOCK = 7262100439
#: Session advisory locks of maintenance tasks (one process at a time runs each).
_MAINTENANCE_LOCKS = {"prune": 7262100440}
QUERIES = {name: job_columns(sql) for name, sql in sqlfile.load(__name__).items()}
_CONFLICT = "ON CONFLICT DO NOTHING\nRETURNING " + ", ".join(JOB_COLUMNS)
assert QUERIES["insert_jobs"].endswith(_CONFLICT)
QUERIES["insert_new_jobs"] = QUERIES["insert_jobs"].removesuffix(_CONFLICT) + (
    "RETURNING id, args, kwargs, created_at, run_at, state, finished_at, last_error, errors"
)
_ARGS, _KWARGS, _LAST_ERROR, _ERRORS, _RESULT = (
    JOB_COLUMNS.index(c) for c in ("args", "kwargs", "last_error", "errors", "result")
)


def _configure(conn: Any) -> None:
    conn.execute("SET TIME ZONE 'UTC'")
    # No JIT: Conveyor's statements touch a few rows each, but the claim's generic plan estimates
    # a tenth of the table for its LIMIT, and past a few hundred thousand jobs that cost made
    # every claim JIT-compile its query again (4 ms of a 6 ms claim with 1,000,000 jobs waiting).
    conn.execute("SET jit = off")
    # A stored value Python cannot decode (e.g. a 5000-digit number) becomes an UnreadableJSON
    # instead of failing the whole statement: one corrupted row cannot poison a claim.
    set_json_loads(load_stored, conn)


def _warm_up_claims(conn: Any) -> None:
    """Make a new connection's first claim as cheap as its later ones: claim a job of its own in
    a transaction rolled back (nothing of it is ever seen by another session). The first claim
    of a session compiles the claim function and the triggers it fires and plans their
    statements: 7-10 ms, which an idle worker's first pickup on its listener connection paid.
    Best effort: a role that may not insert jobs (or any other failure) leaves it cold."""
    try:
        with conn.transaction(force_rollback=True), conn.cursor() as cur:
            cur.execute(QUERIES["warm_up_insert"])
            cur.execute(QUERIES["warm_up_claim"])
    except psycopg.Error as exc:
        logger.debug("warming up the claim on a new connection failed: %s", exc)


#: A gentle vacuum's cost-based delay (ms), autovacuum's own default: it sleeps that long each time
#: its page accesses reach ``vacuum_cost_limit``. An idle worker's unpaced VACUUM after a burst of
#: 20,000 jobs took the two cores of the benchmark machine and wrote its WAL as fast as it could:
#: the slowest pickup of a job enqueued meanwhile took 26-38 ms (three runs); paced, 12-17 ms.
GENTLE_VACUUM_COST_DELAY_MS = 2


def _json(value: str | None) -> Any:
    """A jsonb value read in binary: a version byte, then the JSON text."""
    return None if value is None else load_text(value, 1)


# Array parameters as PostgreSQL array literals (cast in the query, e.g. ``%(id)s::bigint[]``):
# built with str.join, several times cheaper than psycopg's dump of a list, which was the largest
# client cost of bulk enqueues and batched outcome writes.
def _int_array(values: Iterable[int | None]) -> str:
    return "{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}"


def _float_array(values: Iterable[float | None]) -> str:
    return "{" + ",".join("NULL" if v is None else repr(float(v)) for v in values) + "}"


def _quoted(text: str) -> str:
    if '"' in text or "\\" in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + text + '"'


def _text_array(values: Iterable[str | None]) -> str:
    return "{" + ",".join("NULL" if v is None else _quoted(v) for v in values) + "}"


def _time_array(values: Iterable[datetime | None]) -> str:
    return "{" + ",".join("NULL" if v is None else _quoted(v.isoformat()) for v in values) + "}"


#: How each NewJob column becomes an array literal for ``insert_jobs``.
_NEW_JOB_ARRAYS: dict[str, Callable[[Iterable[Any]], str]] = {
    name: _text_array for name in NEW_JOB_COLUMNS
} | {
    "priority": _int_array,
    "max_attempts": _int_array,
    "max_snoozes": _int_array,
    "concurrency_limit": _int_array,
    "delay": _float_array,
    "deadline": _float_array,
    "timeout": _float_array,
    "run_at": _time_array,
}


def _job(row: tuple[Any, ...]) -> Job:
    """A Job from a row of ``{job_columns}`` read in binary (see _job_rows)."""
    values = list(row)
    values[_ARGS] = _json(values[_ARGS])
    values[_KWARGS] = _json(values[_KWARGS])
    values[_LAST_ERROR] = _json(values[_LAST_ERROR])
    errors = values[_ERRORS]
    values[_ERRORS] = [] if errors == "\x01[]" else _json(errors)
    values[_RESULT] = _json(values[_RESULT])
    return job_from_values(values)


def _job_rows(conn: Any, query: str, params: dict[str, Any] | None = None) -> list[Job]:
    """Run a job query (one that returns ``{job_columns}``) on ``conn``: its jobs. Rows come
    in binary as tuples, several times cheaper to read than text rows as dicts."""
    with conn.cursor(binary=True, row_factory=tuple_row) as cur:
        # jsonb as text, decoded in _job (also on a caller's connection, configured or not)
        cur.adapters.register_loader("jsonb", TextBinaryLoader)
        cur.execute(QUERIES[query], params)
        return [_job(row) for row in cur.fetchall()]


def _inserted(conn: Any, batch: Sequence[NewJob], cols: dict[str, str]) -> list[Job]:
    """Insert ``batch`` (none skipped: no job has a key) and return its Jobs, built from what
    was asked and what the database set or normalized (jsonb orders keys and rewrites numbers:
    the arguments as stored, which the task will get), in id order, which is the input order."""
    with conn.cursor(binary=True, row_factory=tuple_row) as cur:
        cur.adapters.register_loader("jsonb", TextBinaryLoader)
        cur.execute(QUERIES["insert_new_jobs"], cols)
        rows = sorted(cur.fetchall())
    return [
        job_from_insert(
            new,
            [] if args == "\x01[]" else _json(args),
            {} if kwargs == "\x01{}" else _json(kwargs),
            job_id,
            created_at,
            run_at,
            state,
            finished_at,
            _json(last_error),
            [] if errors == "\x01[]" else _json(errors),
        )
        for new, (
            job_id,
            args,
            kwargs,
            created_at,
            run_at,
            state,
            finished_at,
            last_error,
            errors,
        ) in zip(batch, rows, strict=True)
    ]


def _alive(conn: Any) -> bool:
    """Whether an idle pooled connection still has its server, without a round trip: nothing
    arrives on an idle connection unless the server hung up (EOF, or a FATAL error first, as in
    a fast shutdown or pg_terminate_backend); whatever arrived is read to be sure. PQconsumeInput
    never blocks (libpq's socket is non-blocking), so no select(), which fails for fds >= 1024."""
    if conn.closed or conn.broken:
        return False
    try:
        for _ in range(3):  # a FATAL message, then EOF: two reads
            conn.pgconn.consume_input()
    except psycopg.Error:
        return False
    return bool(conn.pgconn.status == psycopg.pq.ConnStatus.OK)


class PostgresBackend(Backend):
    name = "postgres"

    def __init__(self, url: str, min_size: int = 1, max_size: int = 8) -> None:
        if psycopg is None:
            raise ConfigurationError(
                "PostgreSQL support needs psycopg: pip install 'conveyor[postgres]'"
            )
        self.url = url
        self._max_size = max_size
        #: Per worker: the latest attempted_at of the jobs its claims were answered with, and
        #: (for workers whose last claim failed) that time when it failed; see ``_claim``.
        self._last_claimed: dict[str, datetime] = {}
        self._unanswered: dict[str, datetime | None] = {}
        self._claims_lock = threading.Lock()
        self._history_merge_refused = False  # see _merge_history_pending
        self._copy_allowed: bool | None = None  # see _may_copy
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(
                f"invalid PostgreSQL URL {redact_url(url)!r}: {str(exc).strip()}"
            ) from None
        self._check_reachable()
        self._pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True, "row_factory": dict_row, **network_options(url)},
            configure=_configure,
            open=False,
            name="conveyor",
        )
        self._pool.open(wait=True, timeout=10)

    def _check_reachable(self) -> None:
        try:
            psycopg.connect(self.url, connect_timeout=5).close()
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatabaseUnavailableError(
                f"cannot connect to PostgreSQL at {redact_url(self.url)}: {first}"
            ) from None

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _conn(self) -> Iterator[Any]:
        try:
            conn = self._checkout()
            try:
                with conn:  # commit or roll back as ConnectionPool.connection(); pooled: not closed
                    yield conn
            finally:
                self._pool.putconn(conn)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(
                f"lost PostgreSQL at {redact_url(self.url)}: {str(exc).strip()}"
            ) from exc

    def _checkout(self) -> Any:
        """A pooled connection the server has not hung up on. After a server restart every
        idle pooled connection is dead, and each would fail one operation although the server
        is back: those are discarded here (at most a pool's worth), without a round trip."""
        for _ in range(self._max_size):
            conn = self._pool.getconn()
            if _alive(conn):
                return conn
            conn.close()
            self._pool.putconn(conn)  # a closed connection is discarded (and replaced)
        return self._pool.getconn()

    def _all(self, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._conn() as conn:
            return list(conn.execute(QUERIES[query], params or {}).fetchall())

    def _jobs(self, query: str, params: dict[str, Any] | None = None) -> list[Job]:
        with self._conn() as conn:
            return _job_rows(conn, query, params or {})

    def _one_job(self, query: str, job_id: int, **params: Any) -> Job | None:
        rows = self._jobs(query, {"id": job_id, **params})
        return rows[0] if rows else None

    # -- schema ---------------------------------------------------------------------------------
    def migrate(self) -> list[int]:
        applied: list[int] = []
        with self._conn() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
            try:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS conveyor_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                current = self._version(conn)
                check_version(current, self.url, allow_missing=True)
                for version, name, sql in MIGRATIONS:
                    if version <= (current or 0):
                        continue
                    with conn.transaction():
                        conn.execute(sql)
                        conn.execute(
                            "INSERT INTO conveyor_migrations (version, name) VALUES (%s, %s)",
                            (version, name),
                        )
                    applied.append(version)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
        return applied

    def _version(self, conn: Any) -> int | None:
        exists = conn.execute(
            "SELECT to_regclass('conveyor_migrations') IS NOT NULL AS e"
        ).fetchone()
        if not exists["e"]:
            return None
        row = conn.execute("SELECT max(version) AS v FROM conveyor_migrations").fetchone()
        return None if row["v"] is None else int(row["v"])

    def schema_version(self) -> int | None:
        with self._conn() as conn:
            return self._version(conn)

    def db_now(self) -> datetime:
        now: datetime = self._all("db_now")[0]["now"]
        return now

    # -- jobs -----------------------------------------------------------------------------------
    def job_insert_many(self, jobs: Sequence[NewJob], connection: Any = None) -> list[Job]:
        if not jobs:
            return []
        if connection is not None:
            return self._insert_on(self.caller_connection(connection), list(jobs))
        with self._conn() as conn:
            # A big batch of plain jobs: COPY, the jobs built as they are sent (autocommit: an
            # abandoned COPY leaves nothing). None: not such a batch, nothing written.
            copied = copy_jobs(conn, jobs, QUERIES) if self._may_copy(conn, jobs) else None
            if copied is not None:
                return copied
            jobs = list(jobs)  # built (and checked) before anything is written
            if not any(j.depends_on or j.unique_key or j.idempotency_key for j in jobs):
                # one INSERT statement, atomic on its own: no BEGIN and COMMIT round trips
                return self._insert_rows(conn, jobs)
            with conn.transaction():  # dedupe lookups and dependencies: several statements
                return self._insert_rows(conn, jobs)

    def periodic_enqueue(self, ticks: Sequence[tuple[str, datetime, NewJob]]) -> list[Job]:
        if not ticks:
            return []
        ordered = sorted(ticks, key=lambda t: (t[0], t[1]))  # one lock order for all callers
        with self._conn() as conn, conn.transaction():
            fresh = [
                job
                for name, tick, job in ordered
                if conn.execute(
                    QUERIES["periodic_advance"], {"name": name, "tick": tick}
                ).fetchone()
            ]
            return self._insert_rows(conn, fresh) if fresh else []

    @staticmethod
    def caller_connection(connection: Any) -> Any:
        """``connection`` (a caller's ``connection=``) if it is a psycopg 3 Connection, else a
        ConfigurationError naming what it is."""
        if psycopg is None or not isinstance(connection, psycopg.Connection):
            raise ConfigurationError(
                f"connection= must be a psycopg (3) Connection for a PostgreSQL app, "
                f"not {type(connection).__name__}"
            )
        return connection

    def _insert_on(self, conn: Any, jobs: Sequence[NewJob]) -> list[Job]:
        """Insert ``jobs`` (built already) on ``conn``, in whatever transaction it is in."""
        # checked whole first: a COPY abandoned midway aborts a transaction
        if copyable(jobs) and self._may_copy(conn, jobs):
            copied = copy_jobs(conn, jobs, QUERIES)
            assert copied is not None
            return copied
        return self._insert_rows(conn, jobs)

    def _insert_rows(self, conn: Any, jobs: Sequence[NewJob]) -> list[Job]:
        """The INSERT path: dedupe by key, dependencies, the rows read back."""
        initial = self._initial_states(conn, jobs)

        def insert(batch: Sequence[NewJob]) -> list[Job]:
            columns = dict(zip(NewJob._fields, zip(*batch, strict=True), strict=True))
            cols = {name: encode(columns[name]) for name, encode in _NEW_JOB_ARRAYS.items()}
            states = [initial.get(id(j), NO_DEPENDENCIES) for j in batch]
            cols["state"] = _text_array(state for state, _ in states)
            cols["reason"] = _text_array(reason for _, reason in states)
            if any(j.unique_key or j.idempotency_key for j in batch):
                return _job_rows(conn, "insert_jobs", cols)  # some may be skipped: read them
            return _inserted(conn, batch, cols)

        def find(idem: list[str], uniq: list[str]) -> list[Job]:
            params = {"idempotency_keys": idem, "unique_keys": uniq}
            return _job_rows(conn, "find_duplicates", params)

        inserted = resolve_inserted(jobs, insert, find)
        pairs = edges(jobs, inserted)
        if pairs:
            with conn.cursor() as cur:
                cur.execute(
                    QUERIES["insert_dependencies"],
                    {"job_id": [e[0] for e in pairs], "depends_on": [e[1] for e in pairs]},
                )
        return inserted

    def _may_copy(self, conn: Any, jobs: Sequence[NewJob]) -> bool:
        """Whether this role may enqueue ``jobs`` by COPY (bulk.py), which takes ids from the
        jobs' sequence itself: asked once per backend, on the first batch big enough."""
        if len(jobs) < COPY_MIN:
            return False
        if self._copy_allowed is None:
            with conn.cursor(row_factory=tuple_row) as cur:  # maybe the caller's connection
                self._copy_allowed = bool(cur.execute(QUERIES["may_reserve_job_ids"]).fetchone()[0])
        return self._copy_allowed

    @staticmethod
    def _initial_states(conn: Any, jobs: Sequence[NewJob]) -> dict[int, tuple[str, str | None]]:
        """{id(new job): (state, reason)} for the jobs with dependencies, which stay share-locked
        until the caller's transaction ends (so none finishes before the edges are committed)."""
        ids = all_dependency_ids(jobs)
        if not ids:
            return {}
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(QUERIES["lock_dependencies"], {"ids": ids})
            found = {r["id"]: Dependency.from_row(r) for r in cur.fetchall()}
        return plan_dependencies(jobs, found)

    def _claim(
        self, worker_id: str, queues: Sequence[str], limit: int, lease: float, conn: Any = None
    ) -> list[Job]:
        """The claim on a pooled connection, or on ``conn`` (a due listener's, see watch_due)."""
        jobs = self._claimed_unanswered(worker_id)
        if len(jobs) >= limit:
            return jobs
        params = {
            "worker": worker_id,
            "queues": list(queues),
            "limit": limit - len(jobs),
            "lease": lease,
        }
        try:
            if conn is None:
                claimed = self._jobs("claim", params)
            else:
                claimed = _job_rows(conn, "claim", params)
        except (DatabaseUnavailableError, psycopg.OperationalError):
            # The claim may have committed with its answer lost (the server restarted, the
            # connection died): its jobs would be running under this worker unknown to it until
            # their leases expired. Look for them before the next claim.
            with self._claims_lock:
                self._unanswered.setdefault(worker_id, self._last_claimed.get(worker_id))
            raise
        self._handed(worker_id, claimed)
        return jobs + claimed

    def _claimed_unanswered(self, worker_id: str) -> list[Job]:
        """After a claim of ``worker_id`` failed: the jobs it took anyway, handed out now. They
        are no more than the slots that claim asked for, which are still free: no claim of
        this worker has succeeded since (claims of one worker run one at a time)."""
        with self._claims_lock:
            if worker_id not in self._unanswered:
                return []
            since = self._unanswered[worker_id]
        found = self._jobs("claimed_unanswered", {"worker": worker_id, "since": since})
        with self._claims_lock:
            self._unanswered.pop(worker_id, None)
        if found:
            logger.warning(
                "worker %s: a claim got no answer but took jobs %s: handing them out now",
                worker_id,
                [j.id for j in found],
            )
        self._handed(worker_id, found)
        return found

    def _handed(self, worker_id: str, jobs: Sequence[Job]) -> None:
        """Remember the latest claim time of the jobs handed to ``worker_id``: an unanswered
        claim's jobs are the ones claimed after it (claims of one worker run one at a time)."""
        times = [j.attempted_at for j in jobs if j.attempted_at is not None]
        if times:
            with self._claims_lock:
                last = self._last_claimed.get(worker_id)
                self._last_claimed[worker_id] = max(times) if last is None else max(last, *times)

    def job_finish_many(self, worker_id: str, outcomes: Sequence[Outcome]) -> set[int]:
        if not outcomes:
            return set()
        if len({o.job_id for o in outcomes}) < len(outcomes):
            # A job named twice: one statement would apply either. In order, as written one
            # at a time: the first outcome of each job, then the second, ...
            applied: set[int] = set()
            rounds: list[list[Outcome]] = []
            seen: dict[int, int] = {}
            for o in outcomes:
                k = seen[o.job_id] = seen.get(o.job_id, -1) + 1
                if k == len(rounds):
                    rounds.append([])
                rounds[k].append(o)
            for batch in rounds:
                applied |= self._finish(worker_id, batch)
            return applied
        return self._finish(worker_id, outcomes)

    def _finish(self, worker_id: str, outcomes: Sequence[Outcome]) -> set[int]:
        """One fenced statement for outcomes of distinct jobs."""
        # Rows are locked in the order given: in id order, as the heartbeat (id = ANY(...)) takes
        # them, so the two cannot deadlock over the jobs whose outcomes are still unwritten.
        outcomes = sorted(outcomes, key=lambda o: o.job_id)
        params: dict[str, Any]
        if all(o.plain_success for o in outcomes):
            params = {
                "worker": worker_id,
                "id": _int_array(o.job_id for o in outcomes),
                "attempt": _int_array(o.attempt for o in outcomes),
                # the results are JSON texts already: together, one JSON array
                "result": "[" + ",".join(o.result or "null" for o in outcomes) + "]",
            }
            return self._applied("finish_succeeded", params)
        params = {
            "worker": worker_id,
            "id": [o.job_id for o in outcomes],
            "attempt": [o.attempt for o in outcomes],
            "state": [str(o.state) for o in outcomes],
            "delay": [float(o.delay) for o in outcomes],
            "result": [o.result for o in outcomes],
            "error": [None if o.error is None else json.dumps(o.error) for o in outcomes],
            "refund": [int(o.refund_attempt) for o in outcomes],
            "snoozed": [int(o.snoozed) for o in outcomes],
        }
        return self._applied("finish", params)

    def _applied(self, query: str, params: dict[str, Any]) -> set[int]:
        """Run a fenced outcome write; the ids of the jobs it applied to."""
        with self._conn() as conn, conn.cursor(binary=True, row_factory=tuple_row) as cur:
            cur.execute(QUERIES[query], params)
            return {row[0] for row in cur.fetchall()}

    def job_heartbeat(
        self, worker_id: str, job_ids: Sequence[int], lease: float
    ) -> dict[int, bool]:
        if not job_ids:
            return {}
        rows = self._all("heartbeat", {"worker": worker_id, "ids": list(job_ids), "lease": lease})
        return {r["id"]: bool(r["cancel_requested"]) for r in rows}

    def job_rescue_stuck(self, now: datetime | None = None) -> list[Job]:
        return self._jobs("rescue_stuck", {"now": now, "limit": RESCUE_BATCH})

    def job_hand_back(self, worker_id: str, job_ids: Sequence[int]) -> int:
        if not job_ids:
            return 0
        return self._execute("hand_back", {"worker": worker_id, "ids": list(job_ids)})

    def job_get(self, job_id: int) -> Job:
        job = self._one_job("get_job", job_id)
        if job is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        return job

    def job_list(
        self,
        state: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        return self._jobs(
            "list_jobs", {"state": state, "queue": queue, "task": task, "limit": limit}
        )

    def job_retry(self, job_id: int) -> Job:
        retried: list[Job] = []
        with self._conn() as conn, conn.transaction():
            locked = conn.execute(QUERIES["lock_job"], {"id": job_id}).fetchone()
            if locked is not None and locked["state"] in ("dead", "cancelled"):
                deps = [
                    Dependency.from_row(r)
                    for r in conn.execute(QUERIES["lock_job_dependencies"], {"id": job_id})
                ]
                params = {"id": job_id, "state": retry_state(job_id, deps)}
                retried = _job_rows(conn, "retry_job", params)
        if not retried:
            raise self._refusal(job_id, "only dead or cancelled jobs can be retried")
        return retried[0]

    def job_dependencies(self, job_id: int) -> list[int]:
        return [int(r["depends_on"]) for r in self._all("job_dependencies", {"id": job_id})]

    def job_delete(self, job_id: int) -> bool:
        if self._all("delete_job", {"id": job_id}):
            return True
        return self._delete_refused(job_id)

    def watch_finished(
        self, on_finished: Callable[[Iterable[int]], None], on_gap: Callable[[], None]
    ) -> Callable[[], None] | None:
        return finished_listener(self.url, on_finished, on_gap).start()

    def watch_due(
        self,
        queues: Sequence[str],
        on_due: Callable[[], None],
        on_gap: Callable[[], None],
        idle_claim: IdleClaim | None = None,
    ) -> Callable[[], None] | None:
        claim_on = None if idle_claim is None else self._claimer(queues, idle_claim)
        warm_up = None if idle_claim is None else _warm_up_claims
        return due_listener(self.url, queues, on_due, on_gap, claim_on, _configure, warm_up).start()

    def _claimer(self, queues: Sequence[str], idle_claim: IdleClaim) -> Callable[[Any], bool]:
        """For the due listener: claim on its connection for an idle worker (True if it did)."""

        def claim_on(conn: Any) -> bool:
            asked = idle_claim.request()
            if asked is None:
                return False
            worker_id, limit, lease = asked
            try:
                jobs = self._fetch(worker_id, queues, limit, lease, conn=conn)
            except BaseException as exc:
                idle_claim.deliver(exc)
                raise
            idle_claim.deliver(jobs)
            return True

        return claim_on

    # -- history and retention ------------------------------------------------------------------
    def job_events(self, job_id: int) -> list[JobEvent]:
        return [event_from_row(r) for r in self._all("job_events", {"id": job_id})]

    def _execute(self, query: str, params: dict[str, Any]) -> int:
        """Run one named statement on a pooled connection; the rows it touched."""
        with self._conn() as conn:
            return int(conn.execute(QUERIES[query], params).rowcount)

    def job_prune(
        self, state: JobState, older_than: float, limit: int, now: datetime | None = None
    ) -> int:
        params = {"state": str(state), "age": float(older_than), "limit": limit, "now": now}
        with self._conn() as conn:
            # each deleted job's history is looked up through the GIN index, and every lookup
            # reads the whole pending list: merge it once first
            self._merge_history_pending(conn)
            return int(conn.execute(QUERIES["prune_jobs"], params).rowcount)

    def event_prune(self, older_than: float, limit: int, now: datetime | None = None) -> int:
        params = {"age": float(older_than), "limit": limit, "now": now}
        return int(self._all("prune_events", params)[0]["events"])

    def leader_claim(
        self, name: str, holder: str, interval: float, now: datetime | None = None
    ) -> bool:
        params = {"name": name, "holder": holder, "interval": float(interval), "now": now}
        return bool(self._all("leader_claim", params))

    def jobs_vacuum(self, min_dead: int, gentle: bool = False) -> bool:
        with self._conn() as conn:
            self._merge_history_pending(conn)
            rows = conn.execute(QUERIES["jobs_dead_rows"]).fetchone()
            # past min_dead, and a twentieth of the live rows: a VACUUM reads every index whole
            if rows["dead"] < max(min_dead, rows["live"] // 20):
                return False
            skipped: list[str] = []

            def on_notice(diag: Any) -> None:
                if (diag.message_primary or "").startswith("skipping vacuum"):
                    skipped.append(diag.message_primary)

            conn.add_notice_handler(on_notice)
            try:
                if gentle:  # session-wide (VACUUM runs outside transactions): reset below
                    delay = str(GENTLE_VACUUM_COST_DELAY_MS)
                    conn.execute("SELECT set_config('vacuum_cost_delay', %s, false)", (delay,))
                # SKIP_LOCKED: not behind another VACUUM of it (autovacuum, another worker)
                conn.execute("VACUUM (SKIP_LOCKED, INDEX_CLEANUP ON) conveyor_jobs")
            finally:
                conn.remove_notice_handler(on_notice)
                if gentle and not conn.broken:
                    conn.execute("RESET vacuum_cost_delay")
            return not skipped

    def _merge_history_pending(self, conn: Any) -> None:
        """Merge the pending list of history's job index (migration 0004) into the index, so that
        the statements adding history seldom find it full and merge it themselves (about 0.2 s
        for a full list). Only the index's owner may: other roles leave it to (auto)vacuum."""
        if self._history_merge_refused:
            return
        try:
            conn.execute(QUERIES["merge_history_pending"])
        except psycopg.errors.InsufficientPrivilege as exc:
            self._history_merge_refused = True
            logger.info("not merging the history index's pending list: %s", str(exc).strip())

    @contextmanager
    def maintenance_lock(self, name: str) -> Iterator[bool]:
        key = _MAINTENANCE_LOCKS[name]
        with self._conn() as conn:
            held = bool(
                conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (key,)).fetchone()["ok"]
            )
            try:
                yield held
            finally:
                if held:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    # -- queues, workers, stats -----------------------------------------------------------------
    def worker_list(self) -> list[WorkerInfo]:
        return [WorkerInfo(**r) for r in self._all("list_workers")]

    def stats(self) -> list[QueueStats]:
        return build_stats(
            self._all("stats_counts"), self._all("stats_oldest_due"), self._all("stats_limits")
        )


__all__ = ["PostgresBackend"]
