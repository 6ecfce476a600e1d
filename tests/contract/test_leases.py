"""Leases and recovery: heartbeats extend a lease and carry cancel requests; expired leases are
rescued to retrying (attempt counted) or dead on the last attempt, so a job whose worker always
dies ends dead instead of looping; the Rescuer service does the same; hand-back refunds."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest

from conveyor import Conveyor, JobState
from conveyor.backends.base import NewJob
from conveyor.services.rescuer import Rescuer
from conveyor.states import succeed

from .conftest import claim_one, past_lease, wait_until


def _enqueue(app: Conveyor, n: int = 1, **fields: Any) -> list[int]:
    jobs = app.backend.job_insert_many([NewJob(task="t", queue="q", **fields) for _ in range(n)])
    return [j.id for j in jobs]


def test_heartbeat_extends_the_lease_from_the_database_clock(app: Conveyor) -> None:
    (job_id,) = _enqueue(app)
    job = claim_one(app, worker="A", queue="q", lease=5)
    assert job.lease_expires_at is not None

    before = app.backend.db_now()
    assert app.backend.job_heartbeat("A", [job_id], 600) == {job_id: False}
    after = app.backend.db_now()

    beat = app.get_job(job_id)
    assert beat.lease_expires_at is not None and beat.heartbeat_at is not None
    assert before + timedelta(seconds=600) <= beat.lease_expires_at
    assert beat.lease_expires_at <= after + timedelta(seconds=600)
    assert before <= beat.heartbeat_at <= after
    assert beat.state == JobState.RUNNING and beat.lease_owner == "A" and beat.attempt == 1
    # the extended lease is what the rescuer honours
    assert app.backend.job_rescue_stuck(now=past_lease(job)) == []
    assert app.get_job(job_id).state == JobState.RUNNING


def test_heartbeat_reports_cancel_requests(app: Conveyor) -> None:
    ids = _enqueue(app, 2)
    app.backend.job_fetch_available("A", ["q"], 2, 30)
    app.cancel_job(ids[1])
    assert app.backend.job_heartbeat("A", ids, 30) == {ids[0]: False, ids[1]: True}


def test_heartbeat_leaves_out_jobs_whose_lease_is_lost(app: Conveyor) -> None:
    held, rescued_id, finished, never_claimed = _enqueue(app, 4)
    jobs = {j.id: j for j in app.backend.job_fetch_available("A", ["q"], 3, 30)}
    assert set(jobs) == {held, rescued_id, finished}
    app.backend.job_heartbeat("A", [held, finished], 3600)
    assert [j.id for j in app.backend.job_rescue_stuck(now=past_lease(jobs[rescued_id]))] == [
        rescued_id
    ]
    assert app.backend.job_finish_many("A", [succeed(jobs[finished], "1")]) == {finished}

    beat = app.backend.job_heartbeat("A", [held, rescued_id, finished, never_claimed, 999_999], 30)
    assert beat == {held: False}
    # another worker's heartbeat neither reports nor extends A's lease
    lease = app.get_job(held).lease_expires_at
    assert app.backend.job_heartbeat("B", [held], 7200) == {}
    assert app.get_job(held).lease_expires_at == lease


def test_expired_lease_is_rescued_to_retrying_with_the_attempt_counted(app: Conveyor) -> None:
    (job_id,) = _enqueue(app, max_attempts=3)
    job = claim_one(app, worker="worker-17", queue="q", lease=30)

    # not yet expired: nothing happens
    assert job.lease_expires_at is not None
    assert app.backend.job_rescue_stuck(now=job.lease_expires_at - timedelta(seconds=1)) == []
    assert app.get_job(job_id).state == JobState.RUNNING

    (rescued,) = app.backend.job_rescue_stuck(now=past_lease(job))
    assert rescued.id == job_id
    assert rescued.state == JobState.RETRYING
    assert rescued.attempt == 1  # the lost attempt counts
    assert rescued.error == "lease expired: worker worker-17 lost"
    assert rescued.last_error is not None and rescued.last_error["kind"] == "lease_expired"
    assert rescued.last_error["attempt"] == 1
    assert [e["message"] for e in rescued.errors] == ["lease expired: worker worker-17 lost"]
    assert rescued.lease_owner is None and rescued.lease_expires_at is None
    assert rescued.finished_at is None
    assert rescued.run_at <= app.backend.db_now()  # due at once
    assert app.get_job(job_id) == rescued

    # rescued once only, and claimable again
    assert app.backend.job_rescue_stuck(now=past_lease(job, 100)) == []
    again = claim_one(app, worker="B", queue="q")
    assert again.id == job_id and again.attempt == 2


def test_expired_lease_on_the_last_attempt_is_dead(app: Conveyor) -> None:
    (job_id,) = _enqueue(app, max_attempts=1)
    job = claim_one(app, worker="W", queue="q")
    (rescued,) = app.backend.job_rescue_stuck(now=past_lease(job))
    assert rescued.id == job_id
    assert rescued.state == JobState.DEAD
    assert rescued.attempt == 1
    assert rescued.error == "lease expired: worker W lost"
    assert rescued.finished_at is not None and rescued.attempted_at is not None
    assert rescued.finished_at >= rescued.attempted_at
    assert rescued.lease_owner is None
    assert app.backend.job_fetch_available("B", ["q"], 1, 30) == []


@pytest.mark.parametrize("max_attempts", [1, 4])
def test_a_job_whose_worker_always_dies_ends_dead_after_max_attempts(
    app: Conveyor, max_attempts: int
) -> None:
    (job_id,) = _enqueue(app, max_attempts=max_attempts)
    claims = 0
    for _ in range(max_attempts + 5):  # bounded: a looping job fails the test, not the suite
        jobs = app.backend.job_fetch_available(f"w{claims}", ["q"], 1, 30)
        if not jobs:
            break
        claims += 1
        assert jobs[0].attempt == claims
        (rescued,) = app.backend.job_rescue_stuck(now=past_lease(jobs[0]))
        assert rescued.id == job_id

    dead = app.get_job(job_id)
    assert claims == max_attempts
    assert dead.state == JobState.DEAD
    assert dead.attempt == max_attempts
    assert [e["attempt"] for e in dead.errors] == list(range(1, max_attempts + 1))
    assert [e["message"] for e in dead.errors] == [
        f"lease expired: worker w{i} lost" for i in range(max_attempts)
    ]


def test_rescuer_service_rescues_only_expired_leases(app: Conveyor) -> None:
    short, long_, not_running = _enqueue(app, 3)
    a = claim_one(app, worker="A", queue="q", lease=10)
    b = claim_one(app, worker="B", queue="q", lease=1000)
    assert (a.id, b.id) == (short, long_)

    rescued = Rescuer(app.backend).run_once(now=past_lease(a))

    assert [(j.id, j.state) for j in rescued] == [(short, JobState.RETRYING)]
    assert app.get_job(long_).state == JobState.RUNNING
    assert app.get_job(not_running).state == JobState.QUEUED
    assert Rescuer(app.backend).run_once(now=past_lease(a)) == []


def test_rescuer_uses_the_database_clock_by_default(app: Conveyor) -> None:
    (job_id,) = _enqueue(app)
    claim_one(app, worker="A", queue="q", lease=0.05)
    rescuer = Rescuer(app.backend)
    rescued = wait_until(rescuer.run_once, timeout=10, what="the 50 ms lease to expire")
    assert [j.id for j in rescued] == [job_id]
    assert app.get_job(job_id).state == JobState.RETRYING


def test_concurrent_rescuers_rescue_each_job_once(app: Conveyor) -> None:
    total, rescuers = 60, 4
    _enqueue(app, total)
    jobs = app.backend.job_fetch_available("A", ["q"], total, 30)
    assert len(jobs) == total
    now = max(past_lease(j) for j in jobs)
    start = threading.Barrier(rescuers)
    found: list[list[int]] = [[] for _ in range(rescuers)]

    def rescue(i: int) -> None:
        start.wait(timeout=10)
        found[i] = [j.id for j in Rescuer(app.backend).run_once(now=now)]

    threads = [threading.Thread(target=rescue, args=(i,)) for i in range(rescuers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    every = [job_id for ids in found for job_id in ids]
    assert sorted(every) == sorted(j.id for j in jobs)  # all rescued, none twice
    for job in app.list_jobs(limit=total + 1):
        assert job.state == JobState.RETRYING and len(job.errors) == 1


def test_hand_back_returns_held_jobs_to_the_queue_refunding_the_attempt(app: Conveyor) -> None:
    ids = _enqueue(app, 3)
    held = app.backend.job_fetch_available("A", ["q"], 2, 30)
    other = claim_one(app, worker="B", queue="q")
    assert app.backend.job_hand_back("A", [*[j.id for j in held], other.id]) == 2
    for job_id in ids[:2]:
        job = app.get_job(job_id)
        assert job.state == JobState.QUEUED and job.attempt == 0 and job.lease_owner is None
        assert job.errors == []
    assert app.get_job(other.id).lease_owner == "B"
    again = app.backend.job_fetch_available("C", ["q"], 5, 30)
    assert sorted(j.id for j in again) == ids[:2]
    assert all(j.attempt == 1 for j in again)
