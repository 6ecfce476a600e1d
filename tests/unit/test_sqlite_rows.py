"""The SQLite backend's hot path: jobs inserted by chunks of bound rows, rows read as tuples,
outcomes written by one statement per batch. What the contract suite cannot see from outside:
the chunking, the decoding shortcuts, and batches that mix outcomes or name a job twice."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from conveyor.backends.base import JOB_COLUMNS, NEW_JOB_COLUMNS, NewJob
from conveyor.backends.sqlite import (
    _INSERT_WIDTH,
    _MAX_PARAMS,
    SQLiteBackend,
    _insert_chunks,
    _jobs,
    _max_rows,
    _record,
)
from conveyor.job import Job, JobState
from conveyor.serialization import UnreadableJSON
from conveyor.states import Backoff, Outcome, cancel, fail, snooze, succeed

NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[SQLiteBackend]:
    b = SQLiteBackend(f"sqlite:///{tmp_path / 'rows.db'}")
    b.migrate()
    yield b
    b.close()


def test_an_insert_row_holds_every_new_job_column_in_order() -> None:
    job = NewJob(
        task="t", queue="q", args="[1]", kwargs='{"a": 2}', priority=3, delay=4.5, run_at=NOW,
        max_attempts=6, max_snoozes=7, deadline=8.0, timeout=9.0, unique_key="u",
        idempotency_key="i", concurrency_key="c", concurrency_limit=10,
    )  # fmt: skip
    columns = {name: getattr(job, name) for name in NEW_JOB_COLUMNS}
    columns["run_at"] = NOW.timestamp()
    assert _record(11, job, {}) == (11, *columns.values(), "queued", None)
    assert _record(0, job, {id(job): ("waiting", None)})[-2:] == ("waiting", None)


@pytest.mark.parametrize("count", [0, 1, 2, 31, 32, 33, 100, 1000])
def test_insert_chunks_cover_the_jobs_once_with_few_statement_sizes(count: int) -> None:
    chunks = list(_insert_chunks(count))
    covered = [i for start, size in chunks for i in range(start, start + size)]
    assert covered == list(range(count))
    most = _max_rows(_INSERT_WIDTH)
    assert most == 32 and most * _INSERT_WIDTH <= _MAX_PARAMS
    assert all(size <= most and size & (size - 1) == 0 for _, size in chunks)


def test_many_jobs_come_back_in_input_order_with_dedupe_across_chunks(
    backend: SQLiteBackend,
) -> None:
    jobs = [NewJob(task="t", queue="q", args=f"[{i}]") for i in range(100)]
    jobs[70] = NewJob(task="t", queue="q", args="[70]", unique_key="same")
    jobs[5] = NewJob(task="t", queue="q", args="[5]", unique_key="same")
    inserted = backend.job_insert_many(jobs)
    assert [j.args for j in inserted] == [[i] for i in range(100)[:70]] + [[5]] + [
        [i] for i in range(71, 100)
    ]
    assert inserted[70].deduplicated and inserted[70].id == inserted[5].id
    fresh = [j for i, j in enumerate(inserted) if i != 70]
    assert [j.id for j in fresh] == sorted(j.id for j in fresh)
    assert inserted[0] == backend.job_get(inserted[0].id)


def _row(**values: Any) -> tuple[Any, ...]:
    base: dict[str, Any] = dict(
        id=1, queue="q", task="t", args="[]", kwargs="{}", state="queued", priority=0,
        created_at=1.5, run_at=1.5, started_at=None, attempted_at=None, finished_at=None,
        heartbeat_at=None, lease_owner=None, lease_expires_at=None, attempt=0, max_attempts=5,
        snoozes=0, max_snoozes=None, deadline=None, timeout=None, last_error=None, errors="[]",
        result=None, unique_key=None, idempotency_key=None, concurrency_key=None,
        concurrency_limit=1, cancel_requested=0,
    )  # fmt: skip
    base.update(values)
    return tuple(base[name] for name in JOB_COLUMNS)


def test_rows_decode_like_json_loads_and_never_share_objects() -> None:
    a, b = _jobs([_row(), _row(id=2)])
    assert a.args == [] and a.kwargs == {} and a.errors == []
    assert a.args is not b.args and a.kwargs is not b.kwargs and a.errors is not b.errors
    assert a.created_at == a.run_at == datetime.fromtimestamp(1.5, UTC)

    (job,) = _jobs(
        [_row(args=' [1, "x"] ', kwargs='{"k": [true, null]}', result="2.5", errors="[{}] ")]
    )
    assert job.args == [1, "x"] and job.kwargs == {"k": [True, None]}
    assert job.return_value == 2.5 and job.errors == [{}]

    (bad,) = _jobs([_row(args="[1,", kwargs="[" + "7" * 5000 + "]", last_error="{}{}")])
    assert isinstance(bad.args, UnreadableJSON)
    assert isinstance(bad.kwargs, UnreadableJSON) and "4300" in bad.kwargs.reason
    assert isinstance(bad.last_error, UnreadableJSON)

    (blob,) = _jobs([_row(args=b"[3]", result=b"{")])  # BLOBs written behind Conveyor's back
    assert blob.args == [3] and isinstance(blob.return_value, UnreadableJSON)


def test_times_round_down_to_the_microsecond() -> None:
    (job,) = _jobs([_row(created_at=1.0000019, run_at=1.0000019, started_at=2.0)])
    assert job.created_at.microsecond == 1 and job.created_at == job.run_at
    assert job.started_at == datetime.fromtimestamp(2.0, UTC)


def _claimed(backend: SQLiteBackend, count: int) -> list[Job]:
    backend.job_insert_many(
        [NewJob(task="t", queue="q", args=f"[{i}]", max_attempts=2) for i in range(count)]
    )
    return backend.job_fetch_available("w", ["q"], count, 30.0)


def _outcomes(jobs: list[Job]) -> list[Outcome]:
    err = {"attempt": 1, "at": NOW.isoformat(), "kind": "error", "message": "no"}
    return [
        succeed(jobs[0], '{"ok": true}'),
        fail(jobs[1], "error", "retry me", NOW, Backoff(base=0.0, jitter=0.0)),
        Outcome(jobs[2].id, jobs[2].attempt, JobState.DEAD, error=err),
        snooze(jobs[3], 0.0, NOW),
        cancel(jobs[4], "stop", NOW),
        succeed(jobs[5], "null"),
        Outcome(jobs[6].id, jobs[6].attempt + 1, JobState.SUCCEEDED, result="1"),  # stale
    ]


def _state(backend: SQLiteBackend, job_id: int) -> tuple[Any, ...]:
    job = backend.job_get(job_id)
    events = [
        (e.from_state, e.to_state, e.worker, e.attempt, e.error) for e in backend.job_events(job_id)
    ]
    return (
        job.state, job.attempt, job.snoozes, job.return_value, job.last_error, job.errors,
        job.lease_owner, job.finished_at is None, events,
    )  # fmt: skip


def test_a_batch_of_mixed_outcomes_writes_what_one_at_a_time_writes(tmp_path: Path) -> None:
    together = SQLiteBackend(f"sqlite:///{tmp_path / 'a.db'}")
    apart = SQLiteBackend(f"sqlite:///{tmp_path / 'b.db'}")
    together.migrate()
    apart.migrate()
    jobs_a, jobs_b = _claimed(together, 7), _claimed(apart, 7)
    applied = together.job_finish_many("w", _outcomes(jobs_a))
    one_by_one: set[int] = set()
    for outcome in _outcomes(jobs_b):
        one_by_one |= apart.job_finish_many("w", [outcome])
    assert applied == one_by_one == {j.id for j in jobs_a[:6]}
    for a, b in zip(jobs_a, jobs_b, strict=True):
        assert _state(together, a.id) == _state(apart, b.id)
    states = [together.job_get(j.id).state for j in jobs_a]
    assert states == [
        "succeeded",
        "retrying",
        "dead",
        "queued",
        "cancelled",
        "succeeded",
        "running",
    ]
    together.close()
    apart.close()


def test_a_job_named_twice_in_a_batch_takes_its_first_outcome(backend: SQLiteBackend) -> None:
    (job,) = _claimed(backend, 1)
    first, second = succeed(job, '"first"'), succeed(job, '"second"')
    assert backend.job_finish_many("w", [first, second]) == {job.id}
    assert backend.job_get(job.id).return_value == "first"


def test_outcomes_of_another_worker_are_fenced_out(backend: SQLiteBackend) -> None:
    jobs = _claimed(backend, 2)
    assert backend.job_finish_many("intruder", [succeed(j, "1") for j in jobs]) == set()
    mixed = [succeed(jobs[0], "1"), cancel(jobs[1], "stop", NOW)]
    assert backend.job_finish_many("intruder", mixed) == set()
    assert {backend.job_get(j.id).state for j in jobs} == {JobState.RUNNING}


def test_claims_after_a_full_claim_still_find_nothing_when_nothing_is_left(
    backend: SQLiteBackend,
) -> None:
    assert len(_claimed(backend, 3)) == 3  # full: the next claim skips the read-only check
    assert backend.job_fetch_available("w", ["q"], 3, 30.0) == []
    assert backend.job_fetch_available("w", ["q"], 3, 30.0) == []


@pytest.mark.parametrize("mixed", [False, True])
def test_batches_larger_than_a_statement_are_written_whole(
    backend: SQLiteBackend, mixed: bool
) -> None:
    jobs = _claimed(backend, 300)
    outcomes = [succeed(j, str(j.id)) for j in jobs]
    if mixed:  # the general statement, with fewer rows per statement
        outcomes[1::2] = [cancel(j, "stop", NOW) for j in jobs[1::2]]
    assert backend.job_finish_many("intruder", outcomes) == set()
    assert backend.job_finish_many("w", outcomes) == {j.id for j in jobs}
    finished = [backend.job_get(j.id) for j in jobs]
    assert [j.return_value for j in finished[::2]] == [j.id for j in jobs[::2]]
    expected = JobState.CANCELLED if mixed else JobState.SUCCEEDED
    assert {j.state for j in finished[1::2]} == {expected}
