"""Pipelines and batches on SQLite (the contract: backends/flows.py).

Progress happens in the database: triggers of migration 0002 enqueue a pipeline's next step and
count a batch in the transaction that finishes a job (SQLite's one writer serializes those). Here:
starting, reading, cancelling, the watchdog's pass and creating batches. SQLite cannot push, so
waiters poll (results.py).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

from ...job import Job
from ...pipelines import Batch, JobSpec, Pipeline
from ..base import NewJob
from ..flows import EXPIRE_BATCH, FlowStore
from . import QUERIES, SQLiteBackend, _convert, _from_time

_TIMES = (
    "created_at",
    "updated_at",
    "finished_at",
    "step_started_at",
    "current_started_at",
    "completed_at",
)
_JSON = ("steps", "on_complete", "result")  # a pipeline's error is plain text
T = TypeVar("T")


class SQLiteFlows(FlowStore):
    def __init__(self, backend: SQLiteBackend) -> None:
        self.backend = backend

    def _rows(
        self, query: str, params: dict[str, Any], connection: Any = None
    ) -> list[dict[str, Any]]:
        if connection is None:
            rows = self.backend._read(query, params)
        else:
            cur = connection.cursor()
            cur.row_factory = sqlite3.Row  # whatever rows the caller's connection makes
            rows = cur.execute(QUERIES[query], params).fetchall()
        return [_convert(r, _TIMES, _JSON) for r in rows]

    def _jobs(self, query: str, params: dict[str, Any]) -> list[Job]:
        return self.backend._read_jobs(query, params)

    def _prune(self, query: str, older_than: float, limit: int, now: datetime | None) -> int:
        return self.backend._execute(
            query, {"age": older_than, "limit": limit, "now": _from_time(now)}
        )

    # -- pipelines ------------------------------------------------------------------------------
    def pipeline_start(
        self,
        name: str,
        entity: str | None,
        steps: Sequence[JobSpec],
        args: str,
        kwargs: str,
        connection: Any = None,
    ) -> Pipeline:
        first = steps[0].to_json()
        full_args = json.dumps([*json.loads(args), *first["args"]])
        full_kwargs = json.dumps({**first["kwargs"], **json.loads(kwargs)})
        specs = json.dumps([s.to_json() for s in steps])

        def start(conn: sqlite3.Connection) -> int:
            cur = _tuples(conn)
            params: dict[str, Any] = {"name": name, "entity": entity, "steps": specs}
            pipeline_id: int = cur.execute(QUERIES["insert_pipeline"], params).fetchone()[0]
            params = {
                "spec": json.dumps(first),
                "args": full_args,
                "kwargs": full_kwargs,
                "pipeline": pipeline_id,
            }
            job_id = cur.execute(QUERIES["insert_spec_job"], params).fetchone()[0]
            cur.execute(QUERIES["set_pipeline_job"], {"id": pipeline_id, "job_id": job_id})
            return pipeline_id

        return self.pipeline_get(self._write(start, connection), connection)

    def pipeline_cancel(self, pipeline_id: int, reason: str) -> Pipeline:
        def cancel(conn: sqlite3.Connection) -> None:
            params = {"id": pipeline_id, "reason": reason}
            row = conn.execute(QUERIES["cancel_pipeline"], params).fetchone()
            if row is not None and row[0] is not None:
                params = {"id": row[0], "reason": reason}
                if not conn.execute(QUERIES["cancel_pending"], params).fetchall():
                    conn.execute(QUERIES["cancel_running"], {"id": row[0]}).fetchall()

        self.backend._write(cancel)
        return self.pipeline_get(pipeline_id)

    def pipeline_expire_steps(self, now: datetime | None = None) -> list[Pipeline]:
        at = _from_time(now)
        found = self.backend._read("overdue_steps", {"now": at, "limit": EXPIRE_BATCH})
        if not found:
            return []
        ids = json.dumps([r[0] for r in found])

        def expire(conn: sqlite3.Connection) -> list[int]:
            failed = conn.execute(QUERIES["expire_steps"], {"ids": ids, "now": at}).fetchall()
            for _pipeline_id, job_id, error in failed:
                conn.execute(QUERIES["cancel_overdue_job"], {"id": job_id, "message": error})
            return sorted(r[0] for r in failed)

        return [self.pipeline_get(i) for i in self.backend._write(expire)]

    # -- batches --------------------------------------------------------------------------------
    def batch_create(
        self, jobs: Sequence[NewJob], on_complete: JobSpec | None, connection: Any = None
    ) -> Batch:
        spec = None if on_complete is None else json.dumps(on_complete.to_json())

        def create(conn: sqlite3.Connection) -> int:
            params: dict[str, Any] = {"total": len(jobs), "on_complete": spec}
            batch_id: int = _tuples(conn).execute(QUERIES["insert_batch"], params).fetchone()[0]
            inserted = SQLiteBackend._insert_on(conn, jobs) if jobs else []
            if inserted:
                params = {"batch_id": batch_id, "ids": json.dumps([j.id for j in inserted])}
                conn.execute(QUERIES["join_batch"], params)
            failed = sum(1 for j in inserted if j.state.terminal)
            conn.execute(QUERIES["count_batch_at_insert"], {"id": batch_id, "failed": failed})
            return batch_id

        return self.batch_get(self._write(create, connection), connection)

    def _write(self, fn: Callable[[sqlite3.Connection], T], connection: Any) -> T:
        """``fn`` in one write transaction of the backend's, or on the caller's connection (see
        backends.flows.CALLER_TRANSACTION)."""
        if connection is None:
            return self.backend._write(fn)
        conn = self.backend.caller_connection(connection)
        with _caller_transaction(conn):
            return fn(conn)


def _tuples(conn: sqlite3.Connection) -> sqlite3.Cursor:
    """A cursor of plain tuple rows, whatever the connection's row_factory (a caller's own)."""
    cur = conn.cursor()
    cur.row_factory = None
    return cur


def _autocommit(conn: sqlite3.Connection) -> bool:
    """Whether each statement on ``conn`` commits itself: ``isolation_level=None``, or Python
    3.12's ``autocommit=True``."""
    return conn.isolation_level is None or getattr(conn, "autocommit", None) is True


@contextlib.contextmanager
def _caller_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """Several statements on a caller's sqlite3 connection, all or none: a savepoint in its open
    transaction. With none open, sqlite3's implicit transactions (the default) get one opened
    first, left open for the caller, as its own first statement would have (and rolled back if
    the statements fail: it held nothing of the caller's); in autocommit mode the savepoint is a
    transaction of its own, committed at once."""
    opened = not conn.in_transaction and not _autocommit(conn)
    if opened:
        conn.execute("BEGIN")
    conn.execute("SAVEPOINT conveyor_flow")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK TO conveyor_flow")
        conn.execute("RELEASE conveyor_flow")
        if opened:
            conn.execute("ROLLBACK")
        raise
    conn.execute("RELEASE conveyor_flow")
