"""Pipelines and batches on PostgreSQL (the contract: backends/flows.py).

Progress happens in the database: triggers of migration 0002 enqueue a pipeline's next step and
count a batch in the transaction that finishes a job. Here: starting, reading, cancelling, the
watchdog's pass, creating batches, and LISTEN for changes (``conveyor_flow_state``).

Lock order, everywhere: a step's job, then its pipeline, then batches (by id), as a worker's
finishing UPDATE takes them, so no two of these transactions can deadlock.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ...job import Job
from ...pipelines import Batch, JobSpec, Pipeline, PipelineNotFoundError
from ..base import NewJob
from ..flows import EXPIRE_BATCH, FlowStore
from . import QUERIES
from .listener import Listener

if TYPE_CHECKING:
    from . import PostgresBackend

#: Notified with 'p<id>' / 'b<id>' when a pipeline or batch changes (trigger conveyor_notify_flow).
FLOW_CHANNEL = "conveyor_flow_state"


class PostgresFlows(FlowStore):
    def __init__(self, backend: PostgresBackend) -> None:
        self.backend = backend

    def _rows(
        self, query: str, params: dict[str, Any], connection: Any = None
    ) -> list[dict[str, Any]]:
        if connection is None:
            return self.backend._all(query, params)
        with connection.cursor(row_factory=_dict_row()) as cur:  # whatever rows it makes
            return list(cur.execute(QUERIES[query], params).fetchall())

    def _jobs(self, query: str, params: dict[str, Any]) -> list[Job]:
        return self.backend._jobs(query, params)

    def _prune(self, query: str, older_than: float, limit: int, now: datetime | None) -> int:
        return self.backend._execute(query, {"age": float(older_than), "limit": limit, "now": now})

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
        specs = json.dumps([s.to_json() for s in steps])
        with self._transaction(connection) as conn, conn.cursor(row_factory=_dict_row()) as cur:
            params = {"name": name, "entity": entity, "steps": specs}
            pipeline_id = cur.execute(QUERIES["insert_pipeline"], params).fetchone()["id"]
            params = {"id": pipeline_id, "args": args, "kwargs": kwargs}
            job_id = cur.execute(QUERIES["enqueue_first_step"], params).fetchone()["job_id"]
            cur.execute(QUERIES["set_pipeline_job"], {"id": pipeline_id, "job_id": job_id})
        return self.pipeline_get(pipeline_id, connection)

    def pipeline_cancel(self, pipeline_id: int, reason: str) -> Pipeline:
        for _ in range(100):  # the pipeline may move on to its next step while we lock
            with self.backend._conn() as conn, conn.transaction():
                found = conn.execute(QUERIES["pipeline_current_job"], {"id": pipeline_id})
                row = found.fetchone()
                if row is None:
                    raise PipelineNotFoundError(f"no pipeline with id {pipeline_id}")
                job_id = row["current_job_id"]
                job = conn.execute(QUERIES["lock_job"], {"id": job_id}).fetchone()
                pipeline = conn.execute(QUERIES["lock_pipeline"], {"id": pipeline_id}).fetchone()
                if pipeline["state"] != "running":
                    break
                if pipeline["current_job_id"] != job_id:
                    continue
                started = None if job is None else job["started_at"]
                params = {"id": pipeline_id, "reason": reason, "started_at": started}
                conn.execute(QUERIES["cancel_pipeline"], params)
                if job is not None:
                    params = {"id": job_id, "reason": reason}
                    if not conn.execute(QUERIES["cancel_pending"], params).fetchall():
                        conn.execute(QUERIES["cancel_running"], {"id": job_id})
                break
        return self.pipeline_get(pipeline_id)

    def pipeline_expire_steps(self, now: datetime | None = None) -> list[Pipeline]:
        ids = [r["id"] for r in self._rows("overdue_steps", {"now": now, "limit": EXPIRE_BATCH})]
        if not ids:
            return []
        with self.backend._conn() as conn, conn.transaction():
            failed = conn.execute(QUERIES["expire_steps"], {"ids": ids, "now": now}).fetchall()
            if failed:
                params = {
                    "ids": [r["current_job_id"] for r in failed],
                    "messages": [r["error"] for r in failed],
                }
                conn.execute(QUERIES["cancel_overdue_jobs"], params)
        return [self.pipeline_get(r["id"]) for r in sorted(failed, key=lambda r: r["id"])]

    # -- batches --------------------------------------------------------------------------------
    def batch_create(
        self, jobs: Sequence[NewJob], on_complete: JobSpec | None, connection: Any = None
    ) -> Batch:
        spec = None if on_complete is None else json.dumps(on_complete.to_json())
        with self._transaction(connection) as conn:
            params = {"total": len(jobs), "on_complete": spec}
            with conn.cursor(row_factory=_dict_row()) as cur:
                batch_id = cur.execute(QUERIES["insert_batch"], params).fetchone()["id"]
            inserted = self.backend._insert_on(conn, jobs) if jobs else []
            if inserted:
                ids = [j.id for j in inserted]
                conn.execute(QUERIES["join_batch"], {"batch_id": batch_id, "ids": ids})
            failed = sum(1 for j in inserted if j.state.terminal)
            conn.execute(QUERIES["count_batch_at_insert"], {"id": batch_id, "failed": failed})
        return self.batch_get(batch_id, connection)

    @contextlib.contextmanager
    def _transaction(self, connection: Any) -> Any:
        """A connection in a transaction for several statements: a pooled one (committed at the
        end), or the caller's (see backends.flows.CALLER_TRANSACTION)."""
        if connection is None:
            with self.backend._conn() as conn, conn.transaction():
                yield conn
            return
        with _caller_transaction(self.backend.caller_connection(connection)):
            yield connection

    # -- status subscriptions -------------------------------------------------------------------
    def watch_flows(
        self, on_changed: Callable[[Iterable[str]], None], on_gap: Callable[[], None]
    ) -> Callable[[], None] | None:
        def on_notify(payload: str, conn: Any) -> None:
            keys = [k.strip() for k in payload.split(",") if k.strip()]
            if keys:
                on_changed(keys)

        return Listener(self.backend.url, FLOW_CHANNEL, on_notify, on_gap).start()


def _dict_row() -> Any:
    from psycopg.rows import dict_row

    return dict_row


def _caller_transaction(connection: Any) -> AbstractContextManager[Any]:
    """Where several statements go on a caller's psycopg connection: a savepoint in its open
    transaction, or a transaction of their own in autocommit mode; outside autocommit with none
    open, the one the first statement opens, which psycopg leaves open for the caller (its
    ``transaction()`` would commit it), rolled back if the statements fail (it held nothing of
    the caller's, and a failed transaction is of no use)."""
    from psycopg.pq import TransactionStatus

    if connection.autocommit or connection.info.transaction_status == TransactionStatus.INTRANS:
        return connection.transaction()  # type: ignore[no-any-return]
    return _rolled_back_on_failure(connection)


@contextlib.contextmanager
def _rolled_back_on_failure(connection: Any) -> Iterator[Any]:
    try:
        yield connection
    except BaseException:
        connection.rollback()
        raise


__all__ = ["FLOW_CHANNEL", "PostgresFlows"]
