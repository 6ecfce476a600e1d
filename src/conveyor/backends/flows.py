"""The storage contract of pipelines and batches, beside a backend's job contract (base.py).

Each backend implements it in ``backends/<name>/flows.py`` over its own connections and named
queries; the database's triggers (migration 0002) do the work that must happen in the transaction
finishing a job: enqueue a pipeline's next step, fail the pipeline, count a batch and enqueue its
on_complete. The contract test suite (tests/contract/test_pipelines.py, test_batches.py) checks
every implementation against these docstrings.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from ..job import Job
from ..pipelines import (
    Batch,
    BatchNotFoundError,
    JobSpec,
    Pipeline,
    PipelineNotFoundError,
    PipelineState,
)
from .base import Backend, NewJob

#: Overdue steps handled per call of ``pipeline_expire_steps``.
EXPIRE_BATCH = 1000
#: What ``connection=`` means to ``pipeline_start`` and ``batch_create``, as to a job's enqueue:
CALLER_TRANSACTION = """The rows are written on the caller's own connection and never committed
by Conveyor: inside the transaction open on it (in a savepoint, so that a failure leaves that
transaction usable), or, with none open, in the one its first statement opens, left open for the
caller to commit or roll back (and rolled back if the write fails: it held nothing of the
caller's). In autocommit mode with no transaction open, they are written in a transaction of
their own, committed at once, as each of the caller's statements is. The record is read back on
that connection: nobody else sees it before the caller commits."""


class FlowStore(abc.ABC):
    """Pipelines and batches of one backend. A backend implements the writes and two read
    primitives, ``_rows`` and ``_jobs``; the reads are built on them here."""

    # -- read primitives ------------------------------------------------------------------------
    @abc.abstractmethod
    def _rows(
        self, query: str, params: dict[str, Any], connection: Any = None
    ) -> list[dict[str, Any]]:
        """The rows of the named query, with Python types (times, decoded JSON); on
        ``connection`` (a caller's own, in its transaction) when given."""

    @abc.abstractmethod
    def _jobs(self, query: str, params: dict[str, Any]) -> list[Job]:
        """The jobs the named query selects."""

    @abc.abstractmethod
    def _prune(self, query: str, older_than: float, limit: int, now: datetime | None) -> int:
        """Run the named prune statement (parameters age, limit and now, as the backend passes
        times) in a transaction of its own (the backend's ``_execute``); the rows it deleted."""

    # -- pipelines ------------------------------------------------------------------------------
    @abc.abstractmethod
    def pipeline_start(
        self,
        name: str,
        entity: str | None,
        steps: Sequence[JobSpec],
        args: str,
        kwargs: str,
        connection: Any = None,
    ) -> Pipeline:
        """In one transaction: insert a running pipeline and its first step's job, called with
        ``args`` (a JSON array) followed by the step's own arguments, and the step's kwargs
        updated by ``kwargs`` (a JSON object). Every later step is enqueued by the database when
        the step before it succeeds, with that step's result as its first argument; the last
        step's success makes the pipeline succeeded with its result; a step's job ending dead,
        cancelled or deleted fails it ("step X exceeded its N s deadline (started HH:MM:SS)" when
        the job died of its deadline). With ``connection`` (the caller's own sqlite3 / psycopg
        connection to this database), see :data:`CALLER_TRANSACTION`."""

    def pipeline_get(self, pipeline_id: int, connection: Any = None) -> Pipeline:
        """The pipeline, or PipelineNotFoundError (read on ``connection`` when given)."""
        rows = self._rows("get_pipeline", {"id": pipeline_id}, connection)
        if not rows:
            raise PipelineNotFoundError(f"no pipeline with id {pipeline_id}")
        return pipeline_from_row(rows[0])

    def pipeline_list(
        self,
        state: str | None = None,
        name: str | None = None,
        entity: str | None = None,
        limit: int = 100,
    ) -> list[Pipeline]:
        """Pipelines matching the filters, newest first."""
        params = {"state": state, "name": name, "entity": entity, "limit": limit}
        return [pipeline_from_row(r) for r in self._rows("list_pipelines", params)]

    def pipeline_jobs(self, pipeline_id: int) -> list[Job]:
        """The jobs of its steps so far, in order (pruned ones are gone)."""
        return self._jobs("pipeline_jobs", {"id": pipeline_id})

    @abc.abstractmethod
    def pipeline_cancel(self, pipeline_id: int, reason: str) -> Pipeline:
        """Running -> cancelled (error ``reason``), and its current step's job cancelled like
        ``job_cancel`` does (pending: at once; running: cancellation requested from its worker);
        a finished pipeline is returned unchanged. No later step runs: the step's job ending, even
        succeeded, no longer moves the pipeline. PipelineNotFoundError if there is none."""

    @abc.abstractmethod
    def pipeline_expire_steps(self, now: datetime | None = None) -> list[Pipeline]:
        """The watchdog's pass: every running pipeline whose current step's job started more than
        its ``deadline`` before ``now`` (default: the database clock) and has not finished is
        failed ("step X exceeded its N s deadline (started HH:MM:SS)"), and that job cancelled at
        once, even while running (its worker then loses the lease, so its outcome is dropped).
        A step that has not started yet is never overdue. At most EXPIRE_BATCH per call; returns
        the pipelines failed. Safe to run from several workers at once."""

    # -- batches --------------------------------------------------------------------------------
    @abc.abstractmethod
    def batch_create(
        self, jobs: Sequence[NewJob], on_complete: JobSpec | None, connection: Any = None
    ) -> Batch:
        """In one transaction: insert the jobs and a batch of them (total = their number). Each
        job reaching succeeded, or dead/cancelled (failed), is counted in the transaction that
        finishes it; a manual retry of a failed one takes it off the count again. The update that
        makes the counts reach the total completes the batch (completed_at) and enqueues
        ``on_complete`` with {"batch_id", "total", "succeeded", "failed"} as its first argument:
        exactly once, also when the last two jobs finish at once on different workers. A batch
        whose jobs all ended at insert (or an empty one) completes at once. With ``connection``,
        see :data:`CALLER_TRANSACTION`."""

    def batch_get(self, batch_id: int, connection: Any = None) -> Batch:
        """The batch, or BatchNotFoundError (read on ``connection`` when given)."""
        rows = self._rows("get_batch", {"id": batch_id}, connection)
        if not rows:
            raise BatchNotFoundError(f"no batch with id {batch_id}")
        return batch_from_row(rows[0])

    def batch_jobs(self, batch_id: int) -> list[Job]:
        """The batch's jobs, in order (pruned ones are gone)."""
        return self._jobs("batch_jobs", {"id": batch_id})

    # -- retention ------------------------------------------------------------------------------
    def pipeline_prune(self, older_than: float, limit: int, now: datetime | None = None) -> int:
        """Delete up to ``limit`` finished pipelines (succeeded, failed or cancelled) whose
        finished_at is more than ``older_than`` seconds before ``now`` (default: the database
        clock) and none of whose jobs is left (jobs are pruned first, by their own retention),
        oldest first, in one statement. A running pipeline is never deleted. Returns how many."""
        return self._prune("prune_pipelines", older_than, limit, now)

    def batch_prune(self, older_than: float, limit: int, now: datetime | None = None) -> int:
        """Delete up to ``limit`` completed batches whose completed_at is more than ``older_than``
        seconds before ``now`` (default: the database clock) and none of whose jobs is left,
        oldest first, in one statement. A batch not completed is never deleted. Returns how
        many."""
        return self._prune("prune_batches", older_than, limit, now)

    # -- status subscriptions -------------------------------------------------------------------
    def watch_flows(
        self, on_changed: Callable[[Iterable[str]], None], on_gap: Callable[[], None]
    ) -> Callable[[], None] | None:
        """Push, if this backend can: call ``on_changed(keys)`` (from another thread) when
        pipelines (key ``p<id>``) or batches (``b<id>``) of any process change, ``on_gap()``
        when notifications may have been missed. A function that stops it; None when the backend
        cannot push (SQLite), so waiters poll."""
        return None


def flow_store(backend: Backend) -> FlowStore:
    """The pipelines and batches of ``backend``."""
    if backend.name == "sqlite":
        from .sqlite.flows import SQLiteFlows

        return SQLiteFlows(backend)  # type: ignore[arg-type]
    from .postgres.flows import PostgresFlows

    return PostgresFlows(backend)  # type: ignore[arg-type]


def pipeline_key(pipeline_id: int) -> str:
    return f"p{pipeline_id}"


def batch_key(batch_id: int) -> str:
    return f"b{batch_id}"


def pipeline_from_row(row: Mapping[str, Any]) -> Pipeline:
    """A Pipeline from a row with Python types (steps and result decoded from JSON), where
    ``current_started_at`` is the current step's start."""
    return Pipeline(
        id=row["id"],
        name=row["name"],
        entity=row["entity"],
        state=PipelineState(row["state"]),
        steps=tuple(JobSpec.from_json(s) for s in row["steps"]),
        current_step=row["current_step"],
        current_job_id=row["current_job_id"],
        step_started_at=row["current_started_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        return_value=row["result"],
        error=row["error"],
    )


def batch_from_row(row: Mapping[str, Any]) -> Batch:
    spec = row["on_complete"]
    return Batch(
        id=row["id"],
        total=row["total"],
        succeeded=row["succeeded"],
        failed=row["failed"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        completed_at=row["completed_at"],
        on_complete=None if spec is None else JobSpec.from_json(spec),
        on_complete_job_id=row["on_complete_job_id"],
    )
