"""Results: ``job.result(timeout)`` and ``await job.wait(timeout)`` return a succeeded job's stored
result, re-raise a dead or cancelled job's error, time out on an unfinished one, and wait without
tight polling (PostgreSQL: LISTEN/NOTIFY, with a slow poll as the safety net; SQLite: backoff)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from conveyor import (
    ConfigurationError,
    Conveyor,
    JobFailedError,
    JobNotFoundError,
    JobState,
)
from conveyor.backends.base import NewJob
from conveyor.states import succeed

from .conftest import running_worker, wait_until


def _count_reads(app: Conveyor) -> list[int]:
    """Count the job reads a waiter makes (a spy on backend.job_get)."""
    calls: list[int] = []
    original = app.backend.job_get

    def spy(job_id: int) -> Any:
        calls.append(job_id)
        return original(job_id)

    app.backend.job_get = spy  # type: ignore[method-assign]
    return calls


def _waiting_on(app: Conveyor, job_id: int) -> bool:
    return job_id in app._waiter._wakers


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc
        out["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


# -- values and errors --------------------------------------------------------------------------


def test_result_returns_the_stored_value(app: Conveyor) -> None:
    @app.task
    def add(a: int, b: int) -> dict[str, int]:
        return {"sum": a + b}

    job = add.enqueue(2, 3)
    with running_worker(app, poll_interval=0.01):
        assert job.result(timeout=10) == {"sum": 5}
    done = app.get_job(job.id)
    assert done.return_value == {"sum": 5}
    reads = _count_reads(app)
    assert done.result(timeout=0) == {"sum": 5}  # a succeeded snapshot answers by itself
    assert app.result(job.id, timeout=0) == {"sum": 5}
    assert reads == [job.id]


def test_result_reraises_a_dead_jobs_error_with_its_message(app: Conveyor) -> None:
    @app.task(max_attempts=2, backoff=0)
    def broken(x: int) -> None:
        raise ValueError(f"bad input {x}")

    job = broken.enqueue(7)
    with running_worker(app, poll_interval=0.01), pytest.raises(JobFailedError) as failed:
        job.result(timeout=10)
    assert failed.value.error == "ValueError: bad input 7"
    assert str(failed.value) == f"job {job.id} ({broken.name}) ended dead: ValueError: bad input 7"
    assert failed.value.job.state == JobState.DEAD and failed.value.job.attempt == 2
    with pytest.raises(JobFailedError, match="bad input 7"):  # and again, from the snapshot
        failed.value.job.result(timeout=0)


def test_result_of_a_cancelled_job_raises_with_the_reason(app: Conveyor) -> None:
    @app.task
    def never() -> None: ...

    job = never.enqueue()
    app.cancel_job(job.id, reason="customer left")
    with pytest.raises(JobFailedError, match="ended cancelled: customer left") as failed:
        job.result(timeout=1)
    assert failed.value.job.state == JobState.CANCELLED


def test_result_times_out_on_an_unfinished_job(app: Conveyor) -> None:
    @app.task
    def nobody_runs_me() -> None: ...

    job = nobody_runs_me.enqueue()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"job {job.id} .* is still queued after 0.3 s"):
        job.result(timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 2.0
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        job.result(timeout=0)  # look once
    assert time.monotonic() - started < 0.5
    with pytest.raises(ValueError, match="timeout"):
        job.result(timeout=-1)


def test_result_of_a_missing_job_or_a_job_no_app_returned(app: Conveyor) -> None:
    with pytest.raises(JobNotFoundError):
        app.result(987_654, timeout=1)
    (raw_job,) = app.backend.job_insert_many([NewJob(task="r.raw", queue="default")])
    with pytest.raises(ConfigurationError, match=r"use app\.result\(job\.id\)"):
        raw_job.result(timeout=0)
    with pytest.raises(TimeoutError):
        app.result(raw_job.id, timeout=0)


def test_a_result_over_the_payload_limit_fails_the_job_with_a_clear_error(db_url: str) -> None:
    app = Conveyor(db_url, max_payload_bytes=1000)
    app.migrate()
    try:

        @app.task(max_attempts=1)
        def huge() -> str:
            return "x" * 2000

        job = huge.enqueue()
        app.drain(poll_interval=0.01)
        with pytest.raises(JobFailedError) as failed:
            job.result(timeout=1)
        assert failed.value.error == (
            "result cannot be stored: result is 2002 bytes as JSON, over the limit of 1000"
        )
        assert failed.value.job.last_error is not None
        assert failed.value.job.last_error["kind"] == "bad_result"
    finally:
        app.close()


# -- async --------------------------------------------------------------------------------------


def test_async_wait_returns_results_and_never_blocks_the_loop(app: Conveyor) -> None:
    @app.task
    async def slow_square(x: int) -> int:
        await asyncio.sleep(0.2)
        return x * x

    @app.task(max_attempts=1)
    def fails() -> None:
        raise RuntimeError("async boom")

    jobs = app.enqueue_many([slow_square.request(i) for i in range(60)])
    failing = fails.enqueue()

    async def main() -> tuple[list[Any], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        tick_task = asyncio.create_task(ticker())
        values = await asyncio.gather(*(job.wait(timeout=20) for job in jobs))
        with pytest.raises(JobFailedError, match="RuntimeError: async boom"):
            await failing.wait(timeout=20)
        assert await app.get_job(jobs[1].id).wait(timeout=0) == 1  # succeeded: answers at once
        stop.set()
        await tick_task
        return values, ticks

    with running_worker(app, poll_interval=0.01, concurrency=20):
        started = time.monotonic()
        values, ticks = asyncio.run(main())
        elapsed = time.monotonic() - started
    assert values == [i * i for i in range(60)]
    # 60 waits took a while (3 rounds of 0.2 s at least), and the loop kept ticking all along
    assert elapsed >= 0.6
    assert ticks >= elapsed / 0.005 / 10  # a blocked loop would tick a handful of times


def test_async_wait_times_out(app: Conveyor) -> None:
    @app.task
    def idle() -> None: ...

    job = idle.enqueue()

    async def main() -> None:
        with pytest.raises(TimeoutError, match="still queued"):
            await job.wait(timeout=0.2)

    started = time.monotonic()
    asyncio.run(main())
    assert 0.2 <= time.monotonic() - started < 2.0


# -- no tight polling ---------------------------------------------------------------------------


def test_waiting_does_not_poll_tightly(app: Conveyor) -> None:
    @app.task
    def idle() -> None: ...

    job = idle.enqueue()
    app.result_poll_interval = 0.5  # PostgreSQL: the safety-net poll
    reads = _count_reads(app)
    with pytest.raises(TimeoutError):
        job.result(timeout=1.2)
    if app.backend.name == "postgres":  # pushed: reads at 0, 0.5, 1.0 and 1.2 s
        assert 2 <= len(reads) <= 5
    else:  # backoff 10 ms x 1.5 up to 500 ms: about 12 reads in 1.2 s, not hundreds
        assert 8 <= len(reads) <= 16


def test_a_waiter_wakes_promptly_when_another_process_finishes_the_job(
    app: Conveyor, other_app: Conveyor
) -> None:
    app.result_poll_interval = 60.0  # PostgreSQL: only the notification can wake it in time
    job = app.enqueue_raw("r.remote")
    thread, out = _in_thread(lambda: job.result(timeout=30))
    wait_until(lambda: _waiting_on(app, job.id), 10, "the waiter to start waiting")
    (claimed,) = other_app.backend.job_fetch_available("remote", ["default"], 1, 30)
    other_app.backend.job_finish_many("remote", [succeed(claimed, '"from afar"')])
    finished_at = time.monotonic()
    thread.join(timeout=30)
    assert out.get("value") == "from afar", out
    assert out["at"] - finished_at < 1.5  # SQLite: one 500 ms poll at most; PostgreSQL: pushed


def test_every_job_of_a_large_batched_finish_wakes_its_waiter(
    app: Conveyor, other_app: Conveyor
) -> None:
    """Notifications carry at most 300 ids each; a batch of 1000 sends several."""
    app.result_poll_interval = 60.0
    jobs = app.backend.job_insert_many([NewJob(task="r.bulk", queue="bulk") for _ in range(1000)])
    last = app.get_job(jobs[-1].id)
    middle = app.get_job(jobs[650].id)
    waiters = [_in_thread(lambda j=j: j.result(timeout=30)) for j in (last, middle)]  # type: ignore[misc]
    wait_until(lambda: _waiting_on(app, last.id) and _waiting_on(app, middle.id), 10, "waiters")
    claimed = other_app.backend.job_fetch_available("w", ["bulk"], 1000, 30)
    assert len(claimed) == 1000
    other_app.backend.job_finish_many("w", [succeed(j, str(j.id)) for j in claimed])
    finished_at = time.monotonic()
    for thread, out in waiters:
        thread.join(timeout=30)
        assert "value" in out, out
        assert out["at"] - finished_at < 3.0
    assert [out["value"] for _, out in waiters] == [last.id, middle.id]


def _listener_pids(url: str) -> set[int]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'conveyor-listener'"
        ).fetchall()
    return {row[0] for row in rows}


def test_the_listener_reconnects_after_losing_its_connection(pg_schema_url: str) -> None:
    """PostgreSQL only: the listener's connection is killed; it reconnects, and notifications
    wake waiters again."""
    import psycopg

    app, finisher = Conveyor(pg_schema_url), Conveyor(pg_schema_url)
    app.migrate()
    try:
        app.result_poll_interval = 60.0
        with pytest.raises(TimeoutError):
            app.enqueue_raw("r.first").result(timeout=0)  # starts the listener
        before = _listener_pids(pg_schema_url)
        assert len(before) == 1
        with psycopg.connect(pg_schema_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (next(iter(before)),))
        wait_until(lambda: _listener_pids(pg_schema_url) - before, 15, "the listener to reconnect")
        job = app.enqueue_raw("r.second", queue="second")
        thread, out = _in_thread(lambda: job.result(timeout=30))
        wait_until(lambda: _waiting_on(app, job.id), 10, "the waiter to start waiting")
        (claimed,) = finisher.backend.job_fetch_available("w", ["second"], 1, 30)
        finisher.backend.job_finish_many("w", [succeed(claimed, '"again"')])
        finished_at = time.monotonic()
        thread.join(timeout=30)
        assert out.get("value") == "again", out
        assert out["at"] - finished_at < 3.0
    finally:
        finisher.close()
        app.close()
