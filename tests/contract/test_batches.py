"""Batches: jobs enqueued as one group, counted (succeeded, failed, pending) in the transaction that
finishes each of them; the on_complete job is enqueued exactly once, with the counts as its first
argument, by the transaction that finishes the last one: also with 8 concurrent workers, and when
the last two finish at the same instant. With a queue limited to one running job, a batch runs
strictly one job at a time."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from contextlib import ExitStack
from typing import Any

import pytest

from conveyor import ConfigurationError, Conveyor, JobState
from conveyor.backends.base import NewJob
from conveyor.pipelines import Batch, BatchNotFoundError
from conveyor.states import Backoff, cancel, fail, succeed

from .conftest import RawDB, running_worker, together, wait_until


class Calls:
    """Every call of a task, from any worker thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[Any, ...]] = []

    def add(self, *call: Any) -> None:
        with self.lock:
            self.calls.append(call)


def _report_task(app: Conveyor, calls: Calls, name: str = "b.report") -> Any:
    @app.task(name=name)
    def report(counts: dict[str, int], label: str, *, notify: bool = False) -> dict[str, Any]:
        calls.add(counts, label, notify)
        return {**counts, "label": label}

    return report


def _reports_of(app: Conveyor, batch_id: int, task: str = "b.report") -> list[int]:
    """Ids of the on_complete jobs enqueued for ``batch_id``."""
    return [
        j.id
        for j in app.list_jobs(task=task, limit=10_000)
        if j.args[0].get("batch_id") == batch_id
    ]


def test_a_500_job_batch_over_8_workers_completes_once_with_the_right_counts(
    app: Conveyor, other_app: Conveyor
) -> None:
    calls, ran = Calls(), Calls()
    for each in (app, other_app):  # two "processes", four workers each

        @each.task(name="b.item", max_attempts=1)
        def item(i: int) -> int:
            ran.add(i)
            if i % 10 == 3:
                raise RuntimeError(f"item {i} failed")
            return i

        report = _report_task(each, calls)

    batch = app.batch(
        [item.request(i) for i in range(500)],
        on_complete=report.options(priority=5).request("nightly", notify=True),
    )
    assert (batch.total, batch.succeeded, batch.failed, batch.pending) == (500, 0, 0, 500)
    assert not batch.complete and batch.on_complete_job_id is None

    with ExitStack() as stack:
        for each in (app, other_app):
            for _ in range(4):
                stack.enter_context(running_worker(each, poll_interval=0.01, concurrency=8))
        done = batch.result(timeout=120)
        report_result = app.result(done.on_complete_job_id or 0, timeout=60)

    counts = {"batch_id": batch.id, "total": 500, "succeeded": 450, "failed": 50}
    assert (done.total, done.succeeded, done.failed, done.pending) == (500, 450, 50, 0)
    assert done.complete and done.counts() == counts
    assert calls.calls == [(counts, "nightly", True)]  # exactly once, counts first
    assert report_result == {**counts, "label": "nightly"}
    assert _reports_of(app, batch.id) == [done.on_complete_job_id]
    callback = app.get_job(done.on_complete_job_id or 0)
    assert callback.priority == 5 and callback.kwargs == {"notify": True}
    assert sorted(i for (i,) in ran.calls) == list(range(500))  # each job ran once
    members = app.batch_jobs(batch.id)
    assert len(members) == 500
    assert sum(j.state == JobState.DEAD for j in members) == 50
    workers = {e.worker for j in members[::10] for e in app.job_history(j.id) if e.worker}
    assert len(workers) > 1  # the work was spread over several workers
    # completed, and the callback enqueued, by the transaction that finished a member
    assert done.completed_at in {j.finished_at for j in members}
    assert callback.created_at == done.completed_at


def test_the_last_two_jobs_finishing_at_once_complete_the_batch_exactly_once(
    app: Conveyor, other_app: Conveyor
) -> None:
    report = _report_task(app, Calls())
    for round_ in range(15):
        batch = app.batch(
            [
                report.options(queue=f"x{round_}").request({}, "x"),
                report.options(queue=f"y{round_}", max_attempts=1).request({}, "y"),
            ],
            on_complete=report.options(queue="done").request("both"),
        )
        (jx,) = app.backend.job_fetch_available("wx", [f"x{round_}"], 1, 30)
        (jy,) = other_app.backend.job_fetch_available("wy", [f"y{round_}"], 1, 30)
        dead = fail(jy, "error", "boom", app.backend.db_now(), Backoff())
        assert dead.state == JobState.DEAD
        together(
            lambda jx=jx: app.backend.job_finish_many("wx", [succeed(jx, "1")]),
            lambda jy=jy, dead=dead: other_app.backend.job_finish_many("wy", [dead]),
        )
        done = app.get_batch(batch.id)
        assert (done.succeeded, done.failed, done.complete) == (1, 1, True), f"round {round_}"
        assert _reports_of(app, batch.id) == [done.on_complete_job_id], f"round {round_}"
        (callback,) = [app.get_job(i) for i in _reports_of(app, batch.id)]
        assert callback.args == [done.counts(), "both"]


def test_a_batch_finished_in_one_statement_completes_once(app: Conveyor) -> None:
    """One worker's batched outcome write finishes several members (and other jobs) at once."""
    report = _report_task(app, Calls())
    first = app.batch(
        [report.options(queue="s").request({}, str(i)) for i in range(3)],
        on_complete=report.options(queue="cb").request("first"),
    )
    second = app.batch(
        [report.options(queue="s").request({}, "x")],
        on_complete=report.options(queue="cb").request("second"),
    )
    loose = app.enqueue_raw("b.loose", queue="s")
    claimed = app.backend.job_fetch_available("w", ["s"], 10, 30)
    assert len(claimed) == 5
    app.backend.job_finish_many("w", [succeed(j, "1") for j in claimed])
    for batch, label in ((first, "first"), (second, "second")):
        done = batch.refresh()
        assert (done.succeeded, done.pending, done.complete) == (done.total, 0, True)
        (callback,) = [app.get_job(i) for i in _reports_of(app, batch.id)]
        assert callback.args == [done.counts(), label] and callback.queue == "cb"
    assert app.get_job(loose.id).state == JobState.SUCCEEDED


def test_a_batch_on_a_queue_with_concurrency_1_runs_strictly_one_job_at_a_time(
    app: Conveyor,
) -> None:
    app.queue("seq", concurrency=1)
    spans: list[tuple[int, float, float]] = []
    lock = threading.Lock()

    @app.task(name="b.seq", queue="seq")
    def step(i: int) -> int:
        began = time.monotonic()
        time.sleep(0.02)
        with lock:
            spans.append((i, began, time.monotonic()))
        return i

    calls = Calls()
    report = _report_task(app, calls)
    batch = app.batch([step.request(i) for i in range(12)], on_complete=report.request("seq"))
    with (
        running_worker(app, poll_interval=0.01, concurrency=4),
        running_worker(app, poll_interval=0.01, concurrency=4),
        running_worker(app, poll_interval=0.01, concurrency=4),
    ):
        done = batch.result(timeout=60)
        app.result(done.on_complete_job_id or 0, timeout=30)
    ordered = sorted(spans, key=lambda s: s[1])
    assert [i for i, _, _ in ordered] == list(range(12))  # in enqueue order
    for (_, _, end), (_, begin, _) in itertools.pairwise(ordered):
        assert end <= begin  # never two at once, across three workers
    assert calls.calls == [(done.counts(), "seq", False)]
    callback = app.get_job(done.on_complete_job_id or 0)
    last = max(j.finished_at for j in done.jobs() if j.finished_at is not None)
    assert callback.started_at is not None and callback.started_at >= last


def test_batch_counts_follow_every_way_a_job_ends(app: Conveyor, raw: RawDB) -> None:
    report = _report_task(app, Calls())

    # an empty batch, and one whose jobs all ended at insert, complete at once
    empty = app.batch([], on_complete=report.request("empty"))
    assert empty.complete and empty.total == 0 and empty.on_complete_job_id is not None
    assert app.get_job(empty.on_complete_job_id).args[0] == empty.counts()
    (dep,) = app.backend.job_insert_many([NewJob(task="b.dep", queue="dep", max_attempts=1)])
    app.cancel_job(dep.id)
    doomed = app.batch([report.options(depends_on=[dep]).request({}, "never")])
    assert (doomed.failed, doomed.complete, doomed.on_complete_job_id) == (1, True, None)

    # a member cancelled because its dependency died (by the dependencies' trigger) is counted
    (upstream,) = app.backend.job_insert_many([NewJob(task="b.up", queue="up", max_attempts=1)])
    downstream = app.batch(
        [report.options(depends_on=[upstream]).request({}, "later")],
        on_complete=report.options(queue="cb").request("downstream"),
    )
    assert downstream.pending == 1 and downstream.jobs()[0].state == JobState.WAITING
    (claimed,) = app.backend.job_fetch_available("w", ["up"], 1, 30)
    now = app.backend.db_now()
    app.backend.job_finish_many("w", [fail(claimed, "error", "upstream broke", now, Backoff())])
    assert (downstream.refresh().failed, downstream.refresh().complete) == (1, True)

    # ... also when the job whose end cancels it is a member too (both counted, in one go)
    (head,) = app.batch([report.options(queue="hd", max_attempts=1).request({}, "h")]).jobs()
    chain = app.batch(
        [
            report.options(queue="hd2", max_attempts=1).request({}, "h2"),
            report.options(depends_on=[head]).request({}, "tail"),
        ]
    )
    _, tail = chain.jobs()  # the tail waits for a member of another batch
    (claimed,) = app.backend.job_fetch_available("w", ["hd"], 1, 30)
    (claimed2,) = app.backend.job_fetch_available("w", ["hd2"], 1, 30)
    now = app.backend.db_now()
    app.backend.job_finish_many(
        "w", [fail(c, "error", "head broke", now, Backoff()) for c in (claimed, claimed2)]
    )
    assert app.get_job(tail.id).state == JobState.CANCELLED
    assert (chain.refresh().failed, chain.refresh().complete) == (2, True)

    # a manual retry takes a failed job off the count; the batch still completes only once
    batch = app.batch(
        [report.options(queue=f"m{i}").request({}, str(i)) for i in range(4)],
        on_complete=report.options(queue="cb").request("mixed"),
    )
    members = [j.id for j in batch.jobs()]

    def end(i: int, how: str) -> None:
        (job,) = app.backend.job_fetch_available("w", [f"m{i}"], 1, 30)
        now = app.backend.db_now()
        outcome = {"ok": succeed(job, "1"), "cancel": cancel(job, "no", now)}[how]
        assert app.backend.job_finish_many("w", [outcome]) == {job.id}

    def counts() -> tuple[int, int, int, bool]:
        now = batch.refresh()
        return now.succeeded, now.failed, now.pending, now.complete

    end(0, "cancel")
    assert counts() == (0, 1, 3, False)
    app.retry_job(members[0])
    assert counts() == (0, 0, 4, False)
    end(0, "ok")
    end(1, "ok")
    assert app.delete_job(members[2])  # deleted before it finished: counts as failed
    assert counts() == (2, 1, 1, False)
    end(3, "cancel")
    assert counts() == (2, 2, 0, True)
    done = batch.refresh()
    callback = app.get_job(done.on_complete_job_id or 0)
    assert callback.args == [done.counts(), "mixed"] and done.counts()["failed"] == 2
    app.retry_job(members[3])  # after completion: counted again, never completed again
    assert counts() == (2, 1, 1, True)
    end(3, "ok")
    assert counts() == (3, 1, 0, True)
    assert _reports_of(app, batch.id) == [callback.id]

    # the counts can never be written inconsistent
    with pytest.raises(raw.integrity_error, match="conveyor_batches_counts_valid"):
        raw.execute("UPDATE conveyor_batches SET succeeded = total + 1 WHERE id = %s", (batch.id,))


def test_batch_input_is_checked_up_front(app: Conveyor) -> None:
    report = _report_task(app, Calls())
    for bad, message in [
        (lambda: app.batch([report.options(unique_key="k").request({}, "x")]), "unique_key"),
        (lambda: app.batch([report.request({}, "x")], on_complete="b.report"), "task.request"),
        (
            lambda: app.batch([], on_complete=report.options(depends_on=[1]).request("x")),
            "depends_on cannot be used",
        ),
        (lambda: app.batch(["b.report"]), "build items with task.request"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            bad()
    with pytest.raises(BatchNotFoundError):
        app.get_batch(987_654)
    assert app.list_jobs() == []  # nothing was enqueued


def test_waiting_for_a_batch_to_change_or_complete(app: Conveyor, other_app: Conveyor) -> None:
    app.result_poll_interval = 60.0  # PostgreSQL: only the notification can wake it in time
    report = _report_task(app, Calls())
    batch = app.batch([report.options(queue=f"wq{i}").request({}, str(i)) for i in range(2)])

    def finish(i: int) -> None:
        (job,) = other_app.backend.job_fetch_available("w", [f"wq{i}"], 1, 30)
        other_app.backend.job_finish_many("w", [succeed(job, "1")])

    changed: dict[str, Any] = {}

    def watch() -> None:
        changed["batch"] = batch.next_change(timeout=30)
        changed["at"] = time.monotonic()

    watcher = threading.Thread(target=watch)
    watcher.start()
    wait_until(lambda: f"b{batch.id}" in app._flow_waiter._wakers, 10, "the watcher to wait")
    finish(0)
    finished_at = time.monotonic()
    watcher.join(timeout=30)
    moved: Batch = changed["batch"]
    assert (moved.succeeded, moved.pending, moved.complete) == (1, 1, False)
    assert changed["at"] - finished_at < 1.5  # SQLite: one 500 ms poll at most; PostgreSQL: pushed
    with pytest.raises(TimeoutError, match=r"1 of 2 jobs pending after 0\.2 s"):
        moved.result(timeout=0.2)

    async def complete() -> Batch:
        waiting = asyncio.create_task(moved.wait(timeout=30))
        await asyncio.to_thread(
            wait_until,
            lambda: f"b{moved.id}" in app._flow_waiter._wakers,
            10,
            "the async waiter",
        )
        await asyncio.to_thread(finish, 1)
        return await waiting

    done = asyncio.run(complete())
    assert done.complete and done.succeeded == 2
    assert done.result(timeout=0) is done
