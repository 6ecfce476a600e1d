"""Dedupe: a unique_key admits one active (queued, running, retrying) job at a time; an
idempotency_key admits one job for ever. A duplicate enqueue returns the existing job marked
``deduplicated`` and inserts nothing: one at a time, in one batch, and from concurrent enqueuers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from conveyor import Conveyor, Job, JobState
from conveyor.states import Backoff, cancel, fail, succeed

from .conftest import RawDB, claim_one


def _task(app: Conveyor) -> Any:
    @app.task(name="dedupe.work")
    def work(n: int = 0) -> int:
        return n

    return work


def _run_concurrently(n: int, fn: Callable[[int], Job]) -> list[Job]:
    """Call fn(i) for i in range(n) from n threads released together; re-raise any error."""
    start = threading.Barrier(n)
    results: list[Job | None] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait(timeout=10)
            results[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


# -- unique_key ---------------------------------------------------------------------------------


def test_unique_key_returns_the_active_job_instead_of_inserting(app: Conveyor, raw: RawDB) -> None:
    work = _task(app)
    first = work.options(unique_key="report:42").enqueue(1)
    second = work.options(unique_key="report:42").enqueue(2)

    assert first.deduplicated is False
    assert second.deduplicated is True
    assert second.id == first.id
    assert second.args == [1]  # the existing job, not the new request
    assert raw.count_jobs() == 1
    # a different key is a different job
    other = work.options(unique_key="report:43").enqueue(1)
    assert other.id != first.id and not other.deduplicated
    assert raw.count_jobs() == 2


@pytest.mark.parametrize("state", ["running", "retrying"])
def test_unique_key_holds_while_running_or_retrying(app: Conveyor, raw: RawDB, state: str) -> None:
    work = _task(app)
    job = work.options(unique_key="k", max_attempts=3).enqueue()
    claimed = claim_one(app)
    if state == "retrying":
        now = app.backend.db_now()
        app.backend.job_finish_many(
            "worker-a", [fail(claimed, "error", "x", now, Backoff(base=60))]
        )
    assert app.get_job(job.id).state == state

    again = work.options(unique_key="k").enqueue()
    assert again.deduplicated and again.id == job.id and again.state == state
    assert raw.count_jobs() == 1


@pytest.mark.parametrize("end", ["succeeded", "dead", "cancelled"])
def test_unique_key_is_free_again_once_the_job_finished(
    app: Conveyor, raw: RawDB, end: str
) -> None:
    work = _task(app)
    job = work.options(unique_key="k", max_attempts=1).enqueue()
    claimed = claim_one(app)
    now = app.backend.db_now()
    outcome = {
        "succeeded": succeed(claimed, "0"),
        "dead": fail(claimed, "error", "x", now, Backoff()),
        "cancelled": cancel(claimed, "stop", now),
    }[end]
    assert app.backend.job_finish_many("worker-a", [outcome]) == {job.id}
    assert app.get_job(job.id).state == end

    fresh = work.options(unique_key="k").enqueue(7)
    assert not fresh.deduplicated
    assert fresh.id != job.id and fresh.state == JobState.QUEUED and fresh.args == [7]
    assert raw.count_jobs() == 2
    # and the new one holds the key in turn
    assert work.options(unique_key="k").enqueue().id == fresh.id


def test_unique_key_freed_by_cancelling_a_queued_job(app: Conveyor, raw: RawDB) -> None:
    work = _task(app)
    job = work.options(unique_key="k").enqueue()
    app.cancel_job(job.id)
    fresh = work.options(unique_key="k").enqueue()
    assert not fresh.deduplicated and fresh.id != job.id
    assert raw.count_jobs() == 2


def test_concurrent_enqueuers_of_one_unique_key_insert_exactly_one_job(
    app: Conveyor, raw: RawDB
) -> None:
    work = _task(app)
    jobs = _run_concurrently(8, lambda i: work.options(unique_key="once").enqueue(i))

    assert raw.count_jobs() == 1
    assert len({j.id for j in jobs}) == 1
    assert sum(not j.deduplicated for j in jobs) == 1  # exactly one enqueuer inserted
    assert raw.count_jobs("unique_key = %s", ("once",)) == 1


def test_concurrent_batches_with_overlapping_unique_keys(app: Conveyor, raw: RawDB) -> None:
    work = _task(app)
    keys = [f"k{i}" for i in range(20)]

    def enqueue(i: int) -> Job:
        # every thread enqueues all 20 keys, each in a different order
        order = keys[i:] + keys[:i]
        jobs = app.enqueue_many([work.options(unique_key=k).request(i) for k in order])
        by_key = {j.unique_key: j for j in jobs}
        assert sorted(by_key) == sorted(keys)
        return jobs[0]

    _run_concurrently(6, enqueue)
    assert raw.count_jobs() == 20
    assert raw.scalar("SELECT count(DISTINCT unique_key) FROM conveyor_jobs") == 20


def test_duplicate_keys_within_one_batch(app: Conveyor, raw: RawDB) -> None:
    work = _task(app)
    existing = work.options(unique_key="old").enqueue(0)
    jobs = app.enqueue_many(
        [
            work.options(unique_key="a").request(1),
            work.options(unique_key="a").request(2),
            work.options(unique_key="b").request(3),
            work.request(4),  # no key: always inserted
            work.options(unique_key="a").request(5),
            work.options(unique_key="old").request(6),
            work.request(7),
        ]
    )
    assert [j.deduplicated for j in jobs] == [False, True, False, False, True, True, False]
    assert jobs[1].id == jobs[0].id == jobs[4].id
    assert jobs[5].id == existing.id
    assert [j.args for j in jobs] == [[1], [1], [3], [4], [1], [0], [7]]
    assert len({jobs[0].id, jobs[2].id, jobs[3].id, jobs[6].id, existing.id}) == 5
    assert raw.count_jobs() == 5


# -- idempotency_key ----------------------------------------------------------------------------


def test_idempotency_key_returns_the_first_job_even_after_it_succeeded(
    app: Conveyor, raw: RawDB
) -> None:
    work = _task(app)
    first = work.options(idempotency_key="charge:9").enqueue(1)
    assert not first.deduplicated
    again = work.options(idempotency_key="charge:9").enqueue(2)
    assert again.deduplicated and again.id == first.id

    claimed = claim_one(app)
    app.backend.job_finish_many("worker-a", [succeed(claimed, "1")])

    later = work.options(idempotency_key="charge:9").enqueue(3)
    assert later.deduplicated
    assert later.id == first.id
    assert later.state == JobState.SUCCEEDED and later.return_value == 1
    assert raw.count_jobs() == 1


@pytest.mark.parametrize("end", ["dead", "cancelled"])
def test_idempotency_key_holds_whatever_the_state(app: Conveyor, raw: RawDB, end: str) -> None:
    work = _task(app)
    first = work.options(idempotency_key="i", max_attempts=1).enqueue()
    if end == "dead":
        claimed = claim_one(app)
        now = app.backend.db_now()
        app.backend.job_finish_many("worker-a", [fail(claimed, "error", "x", now, Backoff())])
    else:
        app.cancel_job(first.id)
    assert app.get_job(first.id).state == end

    again = work.options(idempotency_key="i").enqueue()
    assert again.deduplicated and again.id == first.id and again.state == end
    assert raw.count_jobs() == 1


def test_idempotency_key_in_one_batch_and_with_a_unique_key(app: Conveyor, raw: RawDB) -> None:
    work = _task(app)
    jobs = app.enqueue_many(
        [
            work.options(idempotency_key="i1").request(1),
            work.options(idempotency_key="i1").request(2),
            work.options(idempotency_key="i2", unique_key="u").request(3),
            work.options(unique_key="u").request(4),  # held by the job above
            work.options(idempotency_key="i3", unique_key="u").request(5),  # likewise
        ]
    )
    assert [j.deduplicated for j in jobs] == [False, True, False, True, True]
    assert jobs[1].id == jobs[0].id
    assert jobs[3].id == jobs[4].id == jobs[2].id
    assert raw.count_jobs() == 2


def test_concurrent_enqueuers_of_one_idempotency_key_insert_exactly_one_job(
    app: Conveyor, raw: RawDB
) -> None:
    work = _task(app)
    jobs = _run_concurrently(8, lambda i: work.options(idempotency_key="pay-1").enqueue(i))
    assert raw.count_jobs() == 1
    assert len({j.id for j in jobs}) == 1
    assert sum(not j.deduplicated for j in jobs) == 1
