"""Outcomes of an attempt (issue 2, point 3), the polling case, and the schema invariants."""

from __future__ import annotations

from conveyor import Cancel, Conveyor, JobState, Snooze


def test_return_value_is_stored_and_job_succeeds(app: Conveyor) -> None:
    @app.task
    def add(a: int, b: int) -> dict[str, int]:
        return {"sum": a + b}

    job = add.enqueue(2, 3)
    assert job.state == JobState.QUEUED and job.attempt == 0

    counts = app.drain(poll_interval=0.01)

    done = app.get_job(job.id)
    assert counts == {"succeeded": 1}
    assert done.state == JobState.SUCCEEDED
    assert done.return_value == {"sum": 5}
    assert done.attempt == 1
    assert done.finished_at is not None and done.attempted_at is not None
    assert done.finished_at >= done.attempted_at
    assert done.lease_owner is None and done.lease_expires_at is None


def test_exception_retries_then_dead_with_history(app: Conveyor) -> None:
    @app.task(max_attempts=3, backoff=0)
    def flaky() -> None:
        raise RuntimeError("disk on fire")

    job = flaky.enqueue()
    app.drain(poll_interval=0.01)

    dead = app.get_job(job.id)
    assert dead.state == JobState.DEAD
    assert dead.attempt == 3
    assert [e["attempt"] for e in dead.errors] == [1, 2, 3]
    assert dead.error == "RuntimeError: disk on fire"
    assert dead.last_error is not None and "Traceback" in dead.last_error["traceback"]
    assert "disk on fire" in dead.last_error["traceback"]


def test_retry_waits_out_its_backoff(app: Conveyor) -> None:
    @app.task(max_attempts=2, backoff=3600)
    def fails_once() -> None:
        raise ValueError("later")

    job = fails_once.enqueue()
    app.drain(poll_interval=0.01)

    waiting = app.get_job(job.id)
    assert waiting.state == JobState.RETRYING
    assert waiting.attempt == 1
    assert waiting.lease_owner is None and waiting.finished_at is None
    assert (waiting.run_at - app.backend.db_now()).total_seconds() > 3000


def test_polling_job_snoozes_50_times_without_using_attempts(app: Conveyor) -> None:
    calls = {"n": 0}

    @app.task(max_attempts=3)
    def wait_ready() -> str:
        calls["n"] += 1
        if calls["n"] <= 50:
            raise Snooze(0)
        return "ready"

    job = wait_ready.enqueue()
    app.drain(poll_interval=0.01)

    done = app.get_job(job.id)
    assert done.state == JobState.SUCCEEDED
    assert done.return_value == "ready"
    assert done.attempt == 1
    assert done.snoozes == 50
    assert done.errors == []


def test_snooze_schedules_the_next_run_later(app: Conveyor) -> None:
    @app.task
    def later() -> None:
        raise Snooze(600)

    job = later.enqueue()
    app.drain(poll_interval=0.01)

    snoozed = app.get_job(job.id)
    assert snoozed.state == JobState.QUEUED
    assert snoozed.attempt == 0 and snoozed.snoozes == 1
    assert (snoozed.run_at - app.backend.db_now()).total_seconds() > 500


def test_max_snoozes_ends_dead_naming_the_limit(app: Conveyor) -> None:
    @app.task(max_snoozes=3)
    def forever() -> None:
        raise Snooze(0)

    job = forever.enqueue()
    app.drain(poll_interval=0.01)

    dead = app.get_job(job.id)
    assert dead.state == JobState.DEAD
    assert dead.snoozes == 3
    assert dead.error is not None and "max_snoozes=3" in dead.error


def test_deadline_ends_a_snoozing_job_dead_naming_the_limit(app: Conveyor) -> None:
    @app.task(deadline=5)
    def slow_poll() -> None:
        raise Snooze(10)  # the next run would be past the 5 s deadline

    job = slow_poll.enqueue()
    app.drain(poll_interval=0.01)

    dead = app.get_job(job.id)
    assert dead.state == JobState.DEAD
    assert dead.error is not None and "deadline" in dead.error and "5 s" in dead.error


def test_cancel_raised_by_task_cancels(app: Conveyor) -> None:
    @app.task
    def give_up() -> None:
        raise Cancel("customer left")

    job = give_up.enqueue()
    app.drain(poll_interval=0.01)

    cancelled = app.get_job(job.id)
    assert cancelled.state == JobState.CANCELLED
    assert cancelled.error == "customer left"
    assert cancelled.finished_at is not None


def test_unknown_task_goes_dead_and_worker_keeps_running(app: Conveyor) -> None:
    @app.task
    def known() -> str:
        return "ok"

    ghost = app.enqueue_many([known.request()])[0]
    # enqueue a job for a task this app does not have, as another service might
    from conveyor.backends.base import NewJob

    orphan = app.backend.job_insert_many([NewJob(task="nobody.home", queue=known.queue)])[0]
    app.drain(poll_interval=0.01)

    assert app.get_job(orphan.id).state == JobState.DEAD
    assert app.get_job(orphan.id).error == "no task named 'nobody.home' is registered"
    assert app.get_job(ghost.id).state == JobState.SUCCEEDED


def test_async_task_timeout_fails_and_retries(app: Conveyor) -> None:
    import asyncio

    @app.task(timeout=0.2, max_attempts=2, backoff=0)
    async def hangs() -> None:
        await asyncio.sleep(30)

    job = hangs.enqueue()
    app.drain(poll_interval=0.01)

    dead = app.get_job(job.id)
    assert dead.state == JobState.DEAD
    assert dead.attempt == 2
    assert all(e["kind"] == "timeout" for e in dead.errors)
    assert "0.2 s timeout" in (dead.error or "")


def test_sync_task_timeout_fails(app: Conveyor) -> None:
    import threading

    release = threading.Event()

    @app.task(timeout=0.2, max_attempts=1)
    def stuck() -> None:
        release.wait(10)

    job = stuck.enqueue()
    try:
        app.drain(poll_interval=0.01)
    finally:
        release.set()
    assert app.get_job(job.id).state == JobState.DEAD
    assert app.get_job(job.id).errors[0]["kind"] == "timeout"
