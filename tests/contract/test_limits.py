"""Concurrency limits, enforced fleet-wide in the claim: per concurrency_key (default 1, or
concurrency_limit) and per queue. A blocked job is not claimed, never failed or lost, and is
claimed as soon as a slot frees; concurrent claimers never exceed a limit."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from conveyor import Conveyor, Job, JobState
from conveyor.backends.base import NewJob
from conveyor.states import succeed

from .conftest import RawDB, past_lease


def _insert(app: Conveyor, jobs: list[NewJob]) -> list[int]:
    return [j.id for j in app.backend.job_insert_many(jobs)]


def _claim(app: Conveyor, worker: str, queues: list[str], limit: int = 10) -> list[Job]:
    return app.backend.job_fetch_available(worker, queues, limit, 30)


def _finish(app: Conveyor, worker: str, job: Job) -> None:
    assert app.backend.job_finish_many(worker, [succeed(job, "null")]) == {job.id}


def test_concurrency_key_allows_one_running_job_by_default(app: Conveyor, raw: RawDB) -> None:
    keyed = _insert(app, [NewJob(task="t", queue="q", concurrency_key="acct-1") for _ in range(3)])
    (free,) = _insert(app, [NewJob(task="t", queue="q")])
    (other_key,) = _insert(app, [NewJob(task="t", queue="q", concurrency_key="acct-2")])

    a = _claim(app, "A", ["q"])
    assert sorted(j.id for j in a) == sorted([keyed[0], free, other_key])
    assert _claim(app, "B", ["q"]) == []  # another worker cannot run acct-1 either

    # blocked, not failed: still queued, attempt untouched
    for job_id in keyed[1:]:
        job = app.get_job(job_id)
        assert job.state == JobState.QUEUED and job.attempt == 0 and job.errors == []

    # the slot frees: the next one of the key is claimed at once, in order
    _finish(app, "A", next(j for j in a if j.id == keyed[0]))
    assert [j.id for j in _claim(app, "B", ["q"])] == [keyed[1]]
    assert _claim(app, "C", ["q"]) == []
    assert raw.count_jobs("state = 'running' AND concurrency_key = %s", ("acct-1",)) == 1


def test_concurrency_limit_allows_n_running_jobs_of_a_key(app: Conveyor) -> None:
    ids = _insert(
        app,
        [NewJob(task="t", queue="q", concurrency_key="k", concurrency_limit=3) for _ in range(5)],
    )
    first = _claim(app, "A", ["q"], limit=2)
    second = _claim(app, "B", ["q"], limit=10)
    assert [j.id for j in first + second] == ids[:3]
    assert _claim(app, "C", ["q"]) == []
    _finish(app, "B", second[0])
    assert [j.id for j in _claim(app, "C", ["q"])] == [ids[3]]


def test_a_rescued_job_frees_its_slot(app: Conveyor) -> None:
    ids = _insert(app, [NewJob(task="t", queue="q", concurrency_key="k") for _ in range(2)])
    (held,) = _claim(app, "A", ["q"])
    assert _claim(app, "B", ["q"]) == []
    (rescued,) = app.backend.job_rescue_stuck(now=past_lease(held))
    assert rescued.state == JobState.RETRYING
    # the slot is free again: one job of the key (the older run_at first) runs, one only
    assert [j.id for j in _claim(app, "B", ["q"])] == [ids[1]]
    assert _claim(app, "C", ["q"]) == []
    assert app.get_job(ids[0]).state == JobState.RETRYING


def test_queue_limit_declared_on_the_app(app: Conveyor) -> None:
    @app.task(queue="setup")
    def provision(n: int) -> int:
        return n

    app.queue("setup", concurrency=1)
    app.apply_queue_limits()
    jobs = [provision.enqueue(i) for i in range(3)]
    (other,) = _insert(app, [NewJob(task="t", queue="other")])

    claimed = _claim(app, "A", ["setup", "other"])
    assert sorted(j.id for j in claimed) == sorted([jobs[0].id, other])
    assert _claim(app, "B", ["setup"]) == []
    assert app.get_job(jobs[1].id).state == JobState.QUEUED
    stats = {s.queue: s for s in app.stats()}
    assert stats["setup"].concurrency_limit == 1 and stats["setup"].running == 1

    _finish(app, "A", next(j for j in claimed if j.id == jobs[0].id))
    assert [j.id for j in _claim(app, "B", ["setup"])] == [jobs[1].id]


def test_queue_configure_sets_changes_and_clears_the_limit(app: Conveyor) -> None:
    ids = _insert(app, [NewJob(task="t", queue="q") for _ in range(6)])
    app.backend.queue_configure("q", 2)
    assert len(_claim(app, "A", ["q"])) == 2
    assert _claim(app, "B", ["q"]) == []
    app.backend.queue_configure("q", 3)
    assert len(_claim(app, "B", ["q"])) == 1
    app.backend.queue_configure("q", None)  # no limit any more
    assert len(_claim(app, "C", ["q"])) == 3
    assert {j.state for j in app.list_jobs()} == {JobState.RUNNING}
    assert len(ids) == 6


def test_queue_and_key_limits_apply_together(app: Conveyor) -> None:
    app.backend.queue_configure("q", 2)
    ids = _insert(
        app,
        [
            NewJob(task="t", queue="q", concurrency_key="k"),
            NewJob(task="t", queue="q", concurrency_key="k"),
            NewJob(task="t", queue="q"),
            NewJob(task="t", queue="q"),
        ],
    )
    claimed = _claim(app, "A", ["q"])
    # the key allows one of its two; the queue allows two in all
    assert [j.id for j in claimed] == [ids[0], ids[2]]


# -- concurrent claimers ------------------------------------------------------------------------


class _Tracker:
    """Counts jobs held by claimer threads per group (a key or a queue), and the most ever held
    at once. A job counts from just after its claim committed until just before its outcome is
    written, so the count never exceeds what the database had running."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cond = threading.Condition()
        self.running: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    def start(self, group: str) -> None:
        with self.cond:
            self.running[group] += 1
            self.peak[group] = max(self.peak[group], self.running[group])
            self.cond.notify_all()

    def hold(self, group: str) -> None:
        """Keep the job until its group is full (so overlap is reached, not hoped for), or a short
        while passed (the tail, where fewer jobs are left than the limit)."""
        with self.cond:
            self.cond.wait_for(lambda: self.running[group] >= self.limit, timeout=0.05)

    def end(self, group: str) -> None:
        with self.cond:
            self.running[group] -= 1


def _run_claimers(
    app: Conveyor, queues: list[str], total: int, tracker: _Tracker, group: Callable[[Job], str]
) -> Counter[str]:
    """Threads with their own worker ids claim, hold and finish jobs until all ``total`` are done.
    Returns how many jobs each worker ran."""
    workers = 4
    start = threading.Barrier(workers)
    done = threading.Event()
    ran: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def claimer(worker: str) -> None:
        try:
            start.wait(timeout=10)
            while not done.is_set():
                jobs = app.backend.job_fetch_available(worker, queues, 3, 30)
                if not jobs:
                    with tracker.cond:  # wait for a slot to free (or all to be done)
                        tracker.cond.wait(timeout=0.01)
                    continue
                for job in jobs:
                    tracker.start(group(job))
                # finish one at a time, each once its group is full again: the others keep
                # running while other claimers take the freed slot
                for job in jobs:
                    tracker.hold(group(job))
                    tracker.end(group(job))
                    _finish(app, worker, job)
                with lock:
                    ran[worker] += len(jobs)
                    if sum(ran.values()) >= total:
                        done.set()
                with tracker.cond:
                    tracker.cond.notify_all()
        except BaseException as exc:
            errors.append(exc)
            done.set()

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "claimers did not finish"
    return ran


def _assert_all_succeeded_once(app: Conveyor, total: int) -> None:
    jobs = app.list_jobs(limit=total + 1)
    assert len(jobs) == total
    assert Counter(j.state for j in jobs) == {JobState.SUCCEEDED: total}
    assert all(j.attempt == 1 and j.errors == [] for j in jobs)  # never failed, never lost


def test_concurrent_claimers_respect_concurrency_keys(app: Conveyor) -> None:
    limit, per_key, keys = 2, 12, ["alpha", "beta"]
    jobs: list[NewJob] = []
    for i in range(per_key):
        for key in keys:
            jobs.append(NewJob(task="t", queue="q", concurrency_key=key, concurrency_limit=limit))
        if i % 3 == 0:
            jobs.append(NewJob(task="t", queue="q"))  # unkeyed jobs in between
    _insert(app, jobs)
    tracker = _Tracker(limit)

    def group(job: Job) -> Any:
        return job.concurrency_key or f"free-{job.id}"

    ran = _run_claimers(app, ["q"], len(jobs), tracker, group)

    assert sum(ran.values()) == len(jobs)
    for key in keys:
        assert tracker.peak[key] == limit, f"{key}: at most {tracker.peak[key]} ran at once"
    _assert_all_succeeded_once(app, len(jobs))


def test_concurrent_claimers_respect_a_queue_limit(app: Conveyor) -> None:
    limit, total = 2, 20
    app.queue("setup", concurrency=limit)
    app.apply_queue_limits()
    _insert(app, [NewJob(task="t", queue="setup") for _ in range(total)])
    _insert(app, [NewJob(task="t", queue="bulk") for _ in range(10)])  # unlimited
    tracker = _Tracker(limit)

    ran = _run_claimers(app, ["setup", "bulk"], total + 10, tracker, lambda j: j.queue)

    assert sum(ran.values()) == total + 10
    assert tracker.peak["setup"] == limit, f"at most {tracker.peak['setup']} ran at once"
    _assert_all_succeeded_once(app, total + 10)
