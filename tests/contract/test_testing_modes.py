"""Users' test modes: inline (each enqueue runs the due jobs before it returns) and manual
(``app.drain()``), both through the real database and claim."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from conveyor import Conveyor, JobState
from conveyor.testing import MAX_DEPTH, inline


def _tasks(app: Conveyor, ran: list[str]) -> tuple[Any, Any]:
    @app.task(name="tm.child")
    def child(n: int) -> int:
        ran.append(f"child {n}")
        return n * 10

    @app.task(name="tm.parent")
    def parent(n: int) -> int:
        ran.append(f"parent {n} starts")
        done = child.enqueue(n)
        ran.append(f"parent {n} sees the child {done.state}")
        return n

    return child, parent


def test_inside_inline_an_enqueue_returns_its_job_finished(app: Conveyor) -> None:
    ran: list[str] = []
    child, _ = _tasks(app, ran)
    with inline(app):
        job = child.enqueue(4)
    assert (job.state, job.return_value, ran) == (JobState.SUCCEEDED, 40, ["child 4"])
    after = child.enqueue(5)  # the block is over: back to normal
    assert after.state == JobState.QUEUED and app.get_job(after.id).state == JobState.QUEUED
    assert app.drain() == {"succeeded": 1} and ran == ["child 4", "child 5"]  # manual mode


def test_jobs_enqueued_by_inline_jobs_run_depth_first(app: Conveyor) -> None:
    ran: list[str] = []
    _, parent = _tasks(app, ran)
    with inline(app):
        job = parent.enqueue(1)
    assert job.state == JobState.SUCCEEDED
    assert ran == ["parent 1 starts", "child 1", "parent 1 sees the child succeeded"]


def test_inline_from_async_code(app: Conveyor) -> None:
    """Inside a running event loop (an async task, an async test), the jobs run in a thread of
    their own while the enqueue waits; an async task's own enqueues run as well."""
    ran: list[str] = []
    child, _ = _tasks(app, ran)

    @app.task(name="tm.async_parent")
    async def async_parent(n: int) -> int:
        done = child.enqueue(n)  # a plain enqueue inside the worker's event loop
        ran.append(f"async parent sees the child {done.state}")
        return n

    async def test_body() -> list[Any]:
        with inline(app):
            return [child.enqueue(1), await child.enqueue_async(2), async_parent.enqueue(3)]

    jobs = asyncio.run(test_body())
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 3
    assert ran == ["child 1", "child 2", "child 3", "async parent sees the child succeeded"]


def test_inline_runs_whole_pipelines_and_batches(app: Conveyor) -> None:
    ran: list[str] = []
    child, _ = _tasks(app, ran)

    @app.task(name="tm.add")
    def add(total: int, more: int) -> int:
        return total + more

    @app.task(name="tm.report")
    def report(counts: dict[str, int]) -> None:
        ran.append(f"report {counts['succeeded']}/{counts['total']}")

    adding = app.pipeline("tm.adding", [child.step(), add.step(args=[5])])
    with inline(app):
        run = adding.start(args=[2])
        batch = app.batch([child.request(7), child.request(8)], report.request())
    assert run.state == "succeeded" and run.return_value == 25
    assert batch.complete and batch.succeeded == 2
    assert ran == ["child 2", "child 7", "child 8", "report 2/2"]


def test_jobs_in_the_callers_transaction_run_once_it_committed(app: Conveyor) -> None:
    ran: list[str] = []
    child, _ = _tasks(app, ran)
    if app.backend.name == "sqlite":
        conn: Any = sqlite3.connect(app.backend.path)  # type: ignore[attr-defined]
    else:
        import psycopg

        conn = psycopg.connect(app.url)
    try:
        with inline(app):
            waiting = child.enqueue(1, connection=conn)
            assert waiting.state == JobState.QUEUED and ran == []  # not committed: not run
            conn.commit()
            child.enqueue(2)
        assert app.get_job(waiting.id).state == JobState.SUCCEEDED
        assert sorted(ran) == ["child 1", "child 2"]
    finally:
        conn.close()


def test_a_deep_chain_runs_whole_without_nesting_past_the_limit(app: Conveyor) -> None:
    """Each job enqueues the next: past MAX_DEPTH nested runs, the next jobs wait for the runs
    already going instead of nesting deeper, and every one of them still runs, once."""
    ran: list[int] = []

    @app.task(name="tm.countdown")
    def countdown(n: int) -> None:
        ran.append(n)
        if n > 0:
            countdown.enqueue(n - 1)

    with inline(app):
        first = countdown.enqueue(MAX_DEPTH + 10)
    assert first.state == JobState.SUCCEEDED
    assert ran == list(range(MAX_DEPTH + 10, -1, -1))
    assert {j.state for j in app.list_jobs(task="tm.countdown", limit=100)} == {"succeeded"}
