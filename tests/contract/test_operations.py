"""Operations on jobs: cancel (queued at once, running by request delivered to the task), retry
of dead and cancelled jobs, delete; and what each refuses."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from click.testing import CliRunner

import conveyor
from conveyor import (
    ConfigurationError,
    Conveyor,
    InvalidTransitionError,
    JobNotFoundError,
    JobState,
    Worker,
)
from conveyor.cli import main
from conveyor.states import Backoff, fail, succeed

from .conftest import claim_one, wait_until


def _task(app: Conveyor, **options: Any) -> Any:
    @app.task(name="ops.work", **options)
    def work(n: int = 0) -> int:
        return n

    return work


def _cancel_when_running(app: Conveyor, job_id: int, started: threading.Event) -> threading.Thread:
    """From another thread (as an operator would), cancel the job once its task has started."""

    def run() -> None:
        if started.wait(timeout=10):
            app.cancel_job(job_id)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


# -- cancel -------------------------------------------------------------------------------------


def test_cancel_a_queued_job_cancels_it_at_once(app: Conveyor) -> None:
    work = _task(app)
    job = work.enqueue()
    cancelled = app.cancel_job(job.id, reason="not needed")

    assert cancelled.state == JobState.CANCELLED
    assert cancelled.finished_at is not None
    assert cancelled.error == "not needed"
    assert cancelled.errors[-1]["kind"] == "cancelled"
    assert app.get_job(job.id) == cancelled
    assert app.backend.job_fetch_available("w", [work.queue], 10, 30) == []


def test_cancel_a_retrying_job_cancels_it_at_once(app: Conveyor) -> None:
    work = _task(app, max_attempts=3)
    job = work.enqueue()
    claimed = claim_one(app)
    app.backend.job_finish_many(
        "worker-a", [fail(claimed, "error", "x", app.backend.db_now(), Backoff(base=60))]
    )
    cancelled = app.cancel_job(job.id)
    assert cancelled.state == JobState.CANCELLED
    assert [e["kind"] for e in cancelled.errors] == ["error", "cancelled"]
    assert cancelled.error == "cancelled by request"


def test_cancel_a_running_job_requests_it(app: Conveyor) -> None:
    work = _task(app)
    job = work.enqueue()
    claimed = claim_one(app)

    requested = app.cancel_job(job.id)

    assert requested.state == JobState.RUNNING
    assert requested.cancel_requested is True
    assert requested.lease_owner == claimed.lease_owner
    assert app.backend.job_heartbeat("worker-a", [job.id], 30) == {job.id: True}
    # a task that ignores the request and succeeds anyway is recorded as such
    assert app.backend.job_finish_many("worker-a", [succeed(claimed, "1")]) == {job.id}
    done = app.get_job(job.id)
    assert done.state == JobState.SUCCEEDED and done.cancel_requested is False


def test_cancel_a_finished_job_changes_nothing(app: Conveyor) -> None:
    work = _task(app)
    job = work.enqueue()
    claimed = claim_one(app)
    app.backend.job_finish_many("worker-a", [succeed(claimed, "5")])
    before = app.get_job(job.id)
    assert app.cancel_job(job.id) == before
    assert app.get_job(job.id) == before
    with pytest.raises(JobNotFoundError):
        app.cancel_job(987_654)


def test_async_task_in_drain_is_cancelled_and_ends_cancelled(app: Conveyor) -> None:
    started = threading.Event()
    seen: list[str] = []

    @app.task
    async def long_poll() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    job = long_poll.enqueue()
    canceller = _cancel_when_running(app, job.id, started)
    counts = app.drain(lease=0.3, poll_interval=0.01)  # heartbeats every 0.1 s
    canceller.join(timeout=10)

    assert counts == {"cancelled": 1}
    assert seen == ["cancelled"]
    ended = app.get_job(job.id)
    assert ended.state == JobState.CANCELLED
    assert ended.error == "cancelled by request"
    assert ended.cancel_requested is False and ended.finished_at is not None


def test_sync_task_sees_the_cancel_request(app: Conveyor) -> None:
    started = threading.Event()
    seen: list[bool] = []

    @app.task
    def crunch() -> str:
        ctx = conveyor.current_job()
        seen.append(ctx.cancel_requested)
        started.set()
        wait_until(lambda: ctx.cancel_requested, timeout=10, what="the cancel request")
        seen.append(ctx.cancel_requested)
        ctx.raise_if_cancelled()
        return "not reached"

    job = crunch.enqueue()
    canceller = _cancel_when_running(app, job.id, started)
    counts = app.drain(lease=0.3, poll_interval=0.01)
    canceller.join(timeout=10)

    assert seen == [False, True]
    assert counts == {"cancelled": 1}
    assert app.get_job(job.id).state == JobState.CANCELLED


def test_worker_delivers_a_cancel_to_a_running_async_task(app: Conveyor) -> None:
    started = threading.Event()

    @app.task
    async def stream() -> None:
        started.set()
        await asyncio.sleep(60)

    @app.task
    async def quick(n: int) -> int:
        return n

    job = stream.enqueue()
    other = quick.enqueue(3)
    worker = Worker(app, concurrency=2, lease=0.3, poll_interval=0.01, grace=5)
    runner = threading.Thread(target=lambda: asyncio.run(worker.run()))
    runner.start()
    try:
        canceller = _cancel_when_running(app, job.id, started)
        canceller.join(timeout=10)
        wait_until(
            lambda: app.get_job(job.id).state == JobState.CANCELLED,
            what="the running job to end cancelled",
        )
        wait_until(lambda: app.get_job(other.id).state == JobState.SUCCEEDED, what="other job")
    finally:
        worker.stop()
        runner.join(timeout=15)
    assert not runner.is_alive()
    assert worker.outcome_counts == {"cancelled": 1, "succeeded": 1}
    assert app.get_job(job.id).error == "cancelled by request"


# -- retry --------------------------------------------------------------------------------------


def test_retry_a_dead_job_queues_it_again_keeping_its_history(app: Conveyor) -> None:
    calls = {"n": 0}

    @app.task(max_attempts=2, backoff=0)
    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError(f"failure {calls['n']}")
        return "third time lucky"

    job = flaky.enqueue()
    app.drain(poll_interval=0.01)
    dead = app.get_job(job.id)
    assert dead.state == JobState.DEAD and dead.attempt == 2

    retried = app.retry_job(job.id)

    assert retried.state == JobState.QUEUED
    assert retried.attempt == 0 and retried.snoozes == 0
    assert retried.finished_at is None and retried.lease_owner is None
    assert retried.run_at <= app.backend.db_now()
    assert [e["message"] for e in retried.errors] == [
        "RuntimeError: failure 1",
        "RuntimeError: failure 2",
    ]
    assert app.drain(poll_interval=0.01) == {"succeeded": 1}
    done = app.get_job(job.id)
    assert done.state == JobState.SUCCEEDED and done.return_value == "third time lucky"
    assert done.attempt == 1 and len(done.errors) == 2


def test_retry_a_cancelled_job(app: Conveyor) -> None:
    work = _task(app)
    job = work.enqueue(4)
    app.cancel_job(job.id)
    retried = app.retry_job(job.id)
    assert retried.state == JobState.QUEUED and retried.attempt == 0
    assert [e["kind"] for e in retried.errors] == ["cancelled"]
    assert claim_one(app).id == job.id


@pytest.mark.parametrize("state", ["queued", "running", "retrying", "succeeded"])
def test_retry_refuses_jobs_that_are_not_dead_or_cancelled(app: Conveyor, state: str) -> None:
    work = _task(app, max_attempts=3)
    job = work.enqueue()
    if state != "queued":
        claimed = claim_one(app)
        now = app.backend.db_now()
        if state == "retrying":
            app.backend.job_finish_many(
                "worker-a", [fail(claimed, "error", "x", now, Backoff(base=60))]
            )
        elif state == "succeeded":
            app.backend.job_finish_many("worker-a", [succeed(claimed, "1")])
    before = app.get_job(job.id)
    assert before.state == state

    with pytest.raises(InvalidTransitionError, match=state):
        app.retry_job(job.id)
    assert app.get_job(job.id) == before


def test_retry_of_a_missing_job_is_not_found(app: Conveyor) -> None:
    with pytest.raises(JobNotFoundError):
        app.retry_job(123_456)


# -- delete -------------------------------------------------------------------------------------


def test_delete_removes_a_job_that_is_not_running(app: Conveyor) -> None:
    work = _task(app)
    done, waiting, keep = work.enqueue(1), work.enqueue(2), work.enqueue(3)
    claimed = app.backend.job_fetch_available("w", [work.queue], 1, 30)[0]
    assert claimed.id == done.id
    app.backend.job_finish_many("w", [succeed(claimed, "1")])

    assert app.delete_job(waiting.id) is True  # queued
    assert app.delete_job(done.id) is True  # succeeded
    for job_id in (done.id, waiting.id):
        with pytest.raises(JobNotFoundError):
            app.get_job(job_id)
    assert app.delete_job(waiting.id) is False  # already gone
    assert [j.id for j in app.list_jobs()] == [keep.id]


def test_delete_refuses_a_running_job(app: Conveyor) -> None:
    work = _task(app)
    job = work.enqueue()
    claimed = claim_one(app)
    with pytest.raises(InvalidTransitionError, match="running"):
        app.delete_job(job.id)
    assert app.get_job(job.id) == claimed


def test_enqueued_jobs_are_returned_as_stored(app: Conveyor) -> None:
    """What enqueue_many returns is the job as the database stores it, whatever the options
    (a bulk insert builds it from what was asked and what the database set)."""
    from datetime import UTC, datetime, timedelta

    work = _task(app)
    gone = app.cancel_job(work.enqueue(1).id)  # a dependent of it is cancelled at once
    work.enqueue(2)
    running = claim_one(app)  # a dependent of it waits
    later = datetime.now(UTC) + timedelta(days=1)
    requests = [
        work.request(),
        work.request(7),
        work.options(priority=-3, delay=30, max_attempts=1, timeout=2).request(n=1),
        work.options(run_at=later, deadline=60, max_snoozes=0).request(2),
        work.options(queue="other", concurrency_key="k", concurrency_limit=3).request(3),
        work.request(1e16, bbb=1, a=2.5e-7),  # JSON a database may normalize
        work.options(depends_on=[gone.id]).request(4),
        work.options(depends_on=[running.id]).request(5),
    ]
    jobs = app.enqueue_many(requests)
    assert [j.state for j in jobs[-2:]] == [JobState.CANCELLED, JobState.WAITING]
    for job in jobs:
        stored = app.get_job(job.id)
        assert stored == job and repr(stored) == repr(job)  # 60.0 is not 60


def test_retry_jobs_brings_the_dead_letter_queue_back(app: Conveyor) -> None:
    @app.task(name="ops.flaky", max_attempts=1)
    def flaky(n: int) -> None:
        raise RuntimeError("the service was down")

    @app.task(name="ops.after", max_attempts=1)
    def after() -> None: ...

    dead = [flaky.enqueue(i) for i in range(3)]
    other = flaky.options(queue="elsewhere").enqueue(9)
    dependent = after.options(depends_on=[dead[0]]).enqueue()
    assert app.drain(["default", "elsewhere"]) == {"dead": 4}
    assert app.get_job(dependent.id).state == JobState.CANCELLED

    # the dependent went with its dependency: retrying it before that one is refused (skipped)
    cancelled = app.retry_jobs(state="cancelled")
    assert cancelled.retried == [] and list(cancelled.skipped) == [dependent.id]
    assert cancelled.skipped[dependent.id].endswith(f"which is dead: retry job {dead[0].id} first")

    result = app.retry_jobs(queue="default", task="ops.flaky")
    assert [j.id for j in result.retried] == [j.id for j in reversed(dead)]  # newest first
    assert result.skipped == {}
    assert {(j.state, j.attempt) for j in map(app.get_job, (j.id for j in dead))} == {
        (JobState.QUEUED, 0)
    }
    assert app.get_job(other.id).state == JobState.DEAD  # another queue
    assert len(app.job_history(dead[0].id)) > 3  # its history kept

    (waiting,) = app.retry_jobs(state="cancelled").retried  # now it waits for the dependency
    assert waiting.id == dependent.id and waiting.state == JobState.WAITING
    with pytest.raises(ConfigurationError, match="state 'queued' must be 'dead' or 'cancelled'"):
        app.retry_jobs(state="queued")

    out = CliRunner().invoke(
        main, ["jobs", "retry-all", "--queue", "elsewhere", "--json", "--database", app.url]
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"retried": [other.id], "skipped": {}}
    assert app.get_job(other.id).state == JobState.QUEUED
