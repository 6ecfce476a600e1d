"""Dependencies: ``task.options(depends_on=[...])`` makes a job wait (state ``waiting``, never
claimed) until every job it depends on succeeded; one that ends dead or cancelled cancels its
dependents, transitively, naming it. The release and the cancellation happen in the database, in
the transaction that finished the dependency, so no code path (and no race) can strand a job."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest
from click.testing import CliRunner

from conveyor import (
    ConfigurationError,
    Conveyor,
    InvalidTransitionError,
    Job,
    JobFailedError,
    JobNotFoundError,
    JobState,
)
from conveyor.backends.base import NewJob
from conveyor.cli import main
from conveyor.states import Backoff, cancel, fail, succeed

from .conftest import RawDB, running_worker, together

W, Q, R, S, D, C = (
    JobState.WAITING,
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.SUCCEEDED,
    JobState.DEAD,
    JobState.CANCELLED,
)


class Recorder:
    """What ran, in order: ("start" | "end", name, monotonic time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, float]] = []

    def add(self, kind: str, name: str) -> None:
        with self.lock:
            self.events.append((kind, name, time.monotonic()))

    def at(self, kind: str, name: str) -> float:
        (t,) = [t for k, n, t in self.events if k == kind and n == name]
        return t

    def ran(self) -> list[str]:
        return [n for k, n, _ in self.events if k == "start"]


def _steps(app: Conveyor, record: Recorder, **options: Any) -> Any:
    @app.task(name="deps.step", **options)
    def step(name: str, fail_with: str | None = None, pause: float = 0.0) -> str:
        record.add("start", name)
        time.sleep(pause)
        record.add("end", name)
        if fail_with:
            raise RuntimeError(fail_with)
        return f"{name} done"

    return step


def _new(app: Conveyor, queue: str, *depends_on: int, **fields: Any) -> Job:
    """Insert one job in its own queue (so a test can claim exactly it)."""
    (job,) = app.backend.job_insert_many(
        [NewJob(task="deps.t", queue=queue, depends_on=tuple(depends_on), **fields)]
    )
    return job


def _end(app: Conveyor, queue: str, how: JobState, worker: str = "w") -> Job:
    """Claim the job of ``queue`` and end it succeeded, dead or cancelled."""
    (job,) = app.backend.job_fetch_available(worker, [queue], 1, 30)
    now = app.backend.db_now()
    outcome = {
        S: lambda: succeed(job, '"ok"'),
        D: lambda: fail(job, "error", f"{queue} broke", now, Backoff()),
        C: lambda: cancel(job, f"{queue} gave up", now),
    }[how]()
    assert app.backend.job_finish_many(worker, [outcome]) == {job.id}
    ended = app.get_job(job.id)
    assert ended.state == how
    return ended


def _state(app: Conveyor, job: Job) -> JobState:
    return app.get_job(job.id).state


# -- with real workers --------------------------------------------------------------------------


def test_a_diamond_runs_in_a_valid_order(app: Conveyor) -> None:
    record = Recorder()
    step = _steps(app, record)
    a = step.enqueue("a", pause=0.05)
    b = step.options(depends_on=[a]).enqueue("b", pause=0.05)
    c = step.options(depends_on=[a.id]).enqueue("c", pause=0.05)
    d = step.options(depends_on=[b, c]).enqueue("d")
    assert [a.state, b.state, c.state, d.state] == [Q, W, W, W]

    counts = app.drain(poll_interval=0.01, concurrency=4)

    assert counts == {"succeeded": 4}
    assert sorted(record.ran()) == ["a", "b", "c", "d"]
    assert record.at("end", "a") <= min(record.at("start", "b"), record.at("start", "c"))
    assert max(record.at("end", "b"), record.at("end", "c")) <= record.at("start", "d")
    assert d.result(timeout=5) == "d done"
    assert [(e.from_state, e.to_state) for e in app.job_history(d.id)][:2] == [(None, W), (W, Q)]
    assert app.job_dependencies(d.id) == [b.id, c.id]


def test_fan_in_waits_for_every_dependency_across_concurrent_workers(app: Conveyor) -> None:
    record = Recorder()
    step = _steps(app, record)
    parts = app.enqueue_many([step.request(f"part{i}", pause=0.02) for i in range(12)])
    total = step.options(depends_on=parts).enqueue("total")
    with (
        running_worker(app, poll_interval=0.01, concurrency=3),
        running_worker(app, poll_interval=0.01, concurrency=3),
        running_worker(app, poll_interval=0.01, concurrency=3),
    ):
        assert total.result(timeout=30) == "total done"
    assert sorted(record.ran()) == sorted([f"part{i}" for i in range(12)] + ["total"])
    last_part = max(record.at("end", f"part{i}") for i in range(12))
    assert last_part <= record.at("start", "total")


def test_a_dead_dependency_cancels_its_dependents_transitively(app: Conveyor) -> None:
    record = Recorder()
    step = _steps(app, record, max_attempts=1)
    a = step.enqueue("a", fail_with="a exploded")
    ok = step.enqueue("ok")
    b = step.options(depends_on=[a]).enqueue("b")
    c = step.options(depends_on=[b]).enqueue("c")
    mixed = step.options(depends_on=[ok, b]).enqueue("mixed")
    deep = step.options(depends_on=[c, mixed]).enqueue("deep")
    fine = step.options(depends_on=[ok]).enqueue("fine")

    app.drain(poll_interval=0.01, concurrency=2)

    assert sorted(record.ran()) == ["a", "fine", "ok"]
    assert [_state(app, j) for j in (a, ok, fine)] == [D, S, S]
    reason = f"dependency job {a.id} (deps.step) ended dead"
    for job in (b, c, mixed, deep):
        done = app.get_job(job.id)
        assert done.state == C and done.attempt == 0 and done.started_at is None
        assert done.error == reason, (job.args, done.error)
        assert done.last_error is not None and done.last_error["kind"] == "dependency"
        assert [(e.from_state, e.to_state, e.message) for e in app.job_history(job.id)] == [
            (None, W, None),
            (W, C, reason),
        ]
    with pytest.raises(JobFailedError, match=re.escape(f"ended cancelled: {reason}")):
        deep.result(timeout=5)
    with pytest.raises(JobFailedError, match="RuntimeError: a exploded"):
        a.result(timeout=5)


# -- enqueueing ---------------------------------------------------------------------------------


def test_enqueue_decides_from_the_dependencies_states(app: Conveyor, raw: RawDB) -> None:
    dead = _new(app, "d", max_attempts=1)
    done, cancelled, running = (_new(app, q) for q in ("s", "c", "r"))
    _end(app, "s", S), _end(app, "d", D), _end(app, "c", C)
    app.backend.job_fetch_available("w", ["r"], 1, 30)

    assert _new(app, "x", done.id).state == Q  # already succeeded: runs at once
    assert _new(app, "x", done.id, running.id).state == W
    at_once = _new(app, "x", done.id, dead.id, cancelled.id)
    assert at_once.state == C and at_once.finished_at is not None
    assert (
        at_once.error == f"dependency job {dead.id} (deps.t) ended dead"
    )  # the lowest id of those that failed
    assert at_once.errors == [at_once.last_error]
    assert _new(app, "x", cancelled.id).error == (
        f"dependency job {cancelled.id} (deps.t) ended cancelled"
    )
    assert [(e.from_state, e.to_state, e.message) for e in app.job_history(at_once.id)] == [
        (None, C, at_once.error)
    ]

    before = raw.count_jobs()
    with pytest.raises(JobNotFoundError, match="depends_on names job 999999, which does not exist"):
        app.backend.job_insert_many(
            [
                NewJob(task="deps.ok", queue="x", depends_on=(done.id,)),
                NewJob(task="deps.bad", queue="x", depends_on=(done.id, 999_999)),
            ]
        )
    assert raw.count_jobs() == before  # all or nothing


def test_waiting_jobs_are_never_claimed_and_count_in_stats(app: Conveyor) -> None:
    first = _new(app, "q")
    blocked = _new(app, "q", first.id, priority=100)  # the best job in the queue, but blocked
    (claimed,) = app.backend.job_fetch_available("w", ["q"], 10, 30)
    assert claimed.id == first.id
    assert app.backend.job_fetch_available("w", ["q"], 10, 30) == []
    (stats,) = [s for s in app.stats() if s.queue == "q"]
    assert stats.counts == {"waiting": 1, "running": 1}
    app.backend.job_finish_many("w", [succeed(claimed, "1")])
    assert _state(app, blocked) == Q
    assert [j.id for j in app.backend.job_fetch_available("w", ["q"], 10, 30)] == [blocked.id]


def test_depends_on_takes_jobs_or_ids_and_rejects_nonsense(app: Conveyor) -> None:
    @app.task(name="deps.opt")
    def opt() -> None: ...

    a, b = opt.enqueue(), opt.enqueue()
    both = opt.options(depends_on=[b, a.id, b.id]).enqueue()
    assert app.job_dependencies(both.id) == [a.id, b.id]
    assert app.job_dependencies(a.id) == []
    via_raw = app.enqueue_raw("deps.elsewhere", depends_on=(a.id,))
    assert via_raw.state == W
    for bad in (5, "12", [0], [True], [1.5], [None], ["7"]):
        with pytest.raises(ConfigurationError, match="depends_on"):
            opt.options(depends_on=bad)
    with pytest.raises(ConfigurationError, match="per enqueue"):
        app.task(name="deps.bad", depends_on=[a])(lambda: None)


def test_a_waiting_job_holds_its_unique_key(app: Conveyor) -> None:
    first = _new(app, "q")
    waiting = _new(app, "u", first.id, unique_key="report:7")
    (again,) = app.backend.job_insert_many(
        [NewJob(task="deps.t", queue="u", unique_key="report:7", depends_on=(first.id,))]
    )
    assert again.deduplicated and again.id == waiting.id
    assert app.job_dependencies(waiting.id) == [first.id]  # no second set of edges


# -- operations ---------------------------------------------------------------------------------


def test_cancelling_a_waiting_job_cancels_its_dependents(app: Conveyor) -> None:
    a = _new(app, "a")
    b = _new(app, "b", a.id)
    c = _new(app, "c", b.id)
    cancelled = app.cancel_job(b.id, reason="not needed")
    assert cancelled.state == C and cancelled.error == "not needed"
    assert app.get_job(c.id).error == f"dependency job {b.id} (deps.t) ended cancelled"
    assert _state(app, a) == Q
    _end(app, "a", S)
    assert [_state(app, j) for j in (a, b, c)] == [S, C, C]  # a late success revives nothing


def test_deleting_a_dependency_cancels_the_jobs_waiting_for_it(app: Conveyor) -> None:
    a = _new(app, "a")
    b = _new(app, "b", a.id)
    assert app.delete_job(a.id) is True
    assert app.get_job(b.id).error == f"dependency job {a.id} (deps.t) was deleted"
    assert _state(app, b) == C


def test_retrying_a_dependent_waits_for_its_dependencies_again(app: Conveyor) -> None:
    a = _new(app, "a", max_attempts=1)
    b = _new(app, "b", a.id)
    _end(app, "a", D)
    assert _state(app, b) == C
    with pytest.raises(InvalidTransitionError, match=f"which is dead: retry job {a.id} first"):
        app.retry_job(b.id)
    assert app.retry_job(a.id).state == Q
    assert app.retry_job(b.id).state == W  # a is not finished yet
    _end(app, "a", S)
    assert _state(app, b) == Q
    assert [(e.from_state, e.to_state) for e in app.job_history(b.id)] == [
        (None, W),
        (W, C),
        (C, W),
        (W, Q),
    ]
    # once its dependencies succeeded, a retried dependent is queued at once
    _end(app, "b", C)
    assert app.retry_job(b.id).state == Q


def test_a_long_chain_is_released_link_by_link_and_cancelled_at_once(app: Conveyor) -> None:
    links = 60
    head = _new(app, "head")
    chain = [head]
    for _ in range(links):
        chain.append(_new(app, "chain", chain[-1].id))
    spare = _new(app, "spare", max_attempts=1)
    other = [spare]
    for _ in range(links):
        other.append(_new(app, "other", other[-1].id))

    _end(app, "head", S)
    released = 0
    while jobs := app.backend.job_fetch_available("w", ["chain"], 10, 30):
        assert len(jobs) == 1  # only the next link is ever claimable
        app.backend.job_finish_many("w", [succeed(jobs[0], "1")])
        released += 1
    assert released == links

    _end(app, "spare", D)
    reason = f"dependency job {spare.id} (deps.t) ended dead"
    assert all(app.get_job(j.id).error == reason for j in other[1:])


# -- races --------------------------------------------------------------------------------------


def test_two_dependencies_finishing_at_once_always_release_their_dependent(
    app: Conveyor, other_app: Conveyor
) -> None:
    for round_ in range(15):
        a, b = _new(app, f"a{round_}"), _new(app, f"b{round_}")
        d = _new(app, f"d{round_}", a.id, b.id)
        (ja,) = app.backend.job_fetch_available("wa", [f"a{round_}"], 1, 30)
        (jb,) = other_app.backend.job_fetch_available("wb", [f"b{round_}"], 1, 30)
        together(
            lambda ja=ja: app.backend.job_finish_many("wa", [succeed(ja, "1")]),
            lambda jb=jb: other_app.backend.job_finish_many("wb", [succeed(jb, "2")]),
        )
        assert _state(app, d) == Q, f"round {round_}: the dependent was stranded"


def test_enqueueing_while_the_dependency_finishes_never_strands_the_job(
    app: Conveyor, other_app: Conveyor
) -> None:
    @app.task(name="deps.race")
    def race() -> None: ...

    for round_ in range(15):
        a = _new(app, f"r{round_}")
        (claimed,) = app.backend.job_fetch_available("w", [f"r{round_}"], 1, 30)
        added: list[Job] = []
        together(
            lambda c=claimed: other_app.backend.job_finish_many("w", [succeed(c, "1")]),
            lambda a=a, added=added: added.append(race.options(depends_on=[a]).enqueue()),
        )
        assert _state(app, added[0]) == Q, f"round {round_}: the dependent was stranded"


def test_enqueueing_in_the_callers_transaction_holds_the_dependency_until_commit(
    app: Conveyor,
) -> None:
    """On the caller's own connection the dependency is locked until the caller commits: a
    worker finishing it waits, then releases the new job it now sees."""

    @app.task(name="deps.tx")
    def tx() -> None: ...

    a = _new(app, "a")
    (claimed,) = app.backend.job_fetch_available("w", ["a"], 1, 30)
    if app.backend.name == "sqlite":
        import sqlite3

        conn: Any = sqlite3.connect(app.backend.path, timeout=10)  # type: ignore[attr-defined]
    else:
        import psycopg

        conn = psycopg.connect(app.url)
    finished = threading.Event()

    def finish() -> None:
        app.backend.job_finish_many("w", [succeed(claimed, "1")])
        finished.set()

    try:
        dependent = tx.options(depends_on=[a]).enqueue(connection=conn)
        assert dependent.state == W
        worker = threading.Thread(target=finish)
        worker.start()
        assert not finished.wait(0.3)  # blocked by the caller's open transaction
        conn.commit()
        worker.join(timeout=30)
        assert finished.is_set()
    finally:
        conn.close()
    assert _state(app, a) == S
    assert _state(app, dependent) == Q


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_enqueues_with_dependencies_and_shows_them(app: Conveyor, db_url: str) -> None:
    a = _new(app, "a")
    runner = CliRunner()
    out = runner.invoke(
        main, ["enqueue", "deps.cli", "--depends-on", f"{a.id}", "--database", db_url]
    )
    assert out.exit_code == 0, out.output
    job_id = int(out.output.split()[1])
    assert out.output == f"job {job_id} waiting in queue default\n"
    shown = runner.invoke(main, ["jobs", "show", str(job_id), "--database", db_url])
    assert f"depends_on: [{a.id}]" in shown.output
    bad = runner.invoke(main, ["enqueue", "deps.cli", "--depends-on", "x", "--database", db_url])
    assert bad.exit_code == 1 and "comma-separated job ids" in bad.output
