"""Claiming (backend.job_fetch_available): due jobs only, in priority / run_at / id order, with the
lease, attempt and times set from the database clock, and never the same job to two claimers."""

from __future__ import annotations

import os
import threading
from datetime import timedelta

import pytest

from conveyor import Conveyor, JobState
from conveyor.backends.base import NewJob
from conveyor.states import Backoff, fail, succeed

from .conftest import RawDB, claim_one, explain_everything, is_sqlite


def _insert(app: Conveyor, *jobs: NewJob) -> list[int]:
    return [j.id for j in app.backend.job_insert_many(list(jobs))]


def test_only_due_jobs_of_the_asked_queues_are_claimed(app: Conveyor) -> None:
    now = app.backend.db_now()
    due, past = _insert(
        app,
        NewJob(task="t", queue="default"),
        NewJob(task="t", queue="default", run_at=now - timedelta(seconds=5)),
    )
    delayed, scheduled, elsewhere = _insert(
        app,
        NewJob(task="t", queue="default", delay=3600),
        NewJob(task="t", queue="default", run_at=now + timedelta(hours=1)),
        NewJob(task="t", queue="other"),
    )

    claimed = app.backend.job_fetch_available("w", ["default"], 10, 30)

    assert sorted(j.id for j in claimed) == [due, past]
    for job_id in (delayed, scheduled, elsewhere):
        job = app.get_job(job_id)
        assert job.state == JobState.QUEUED and job.attempt == 0 and job.lease_owner is None
    assert app.backend.job_fetch_available("w", ["default"], 10, 30) == []
    # the other queue is claimed only when asked for
    assert [j.id for j in app.backend.job_fetch_available("w", ["other"], 10, 30)] == [elsewhere]


def test_claim_order_is_priority_then_run_at_then_id(app: Conveyor) -> None:
    now = app.backend.db_now()
    t1, t2 = now - timedelta(seconds=20), now - timedelta(seconds=10)
    ids = _insert(
        app,
        NewJob(task="t", queue="q", priority=5, run_at=t2),  # 0
        NewJob(task="t", queue="q", priority=5, run_at=t1),  # 1
        NewJob(task="t", queue="q", priority=5, run_at=t1),  # 2: same as 1, later id
        NewJob(task="t", queue="q", priority=0, run_at=t1),  # 3
        NewJob(task="t", queue="q", priority=9, run_at=t2),  # 4
        NewJob(task="t", queue="q", priority=-3, run_at=t1),  # 5
        NewJob(task="t", queue="q", priority=100, delay=3600),  # 6: not due, whatever its priority
    )
    expected = [ids[4], ids[1], ids[2], ids[0], ids[3], ids[5]]

    one_by_one = [claim_one(app, queue="q").id for _ in expected]
    assert one_by_one == expected
    assert app.backend.job_fetch_available("w", ["q"], 1, 30) == []


def test_a_batch_claim_takes_the_best_jobs_and_returns_them_in_order(app: Conveyor) -> None:
    now = app.backend.db_now()
    ids = _insert(
        app,
        *[NewJob(task="t", queue="q", priority=p, run_at=now) for p in (1, 7, 3, 7, 5, 0, 2)],
    )
    claimed = app.backend.job_fetch_available("w", ["q"], 4, 30)
    assert [j.id for j in claimed] == [ids[1], ids[3], ids[4], ids[2]]
    assert [j.priority for j in claimed] == [7, 7, 5, 3]


def test_claim_order_holds_across_queues_and_keyed_jobs(app: Conveyor) -> None:
    """Priority wins over everything else: the queue a job is in, and whether it is under a
    concurrency limit (a concurrency_key, or a queue with a limit)."""
    app.backend.queue_configure("limited", 5)
    now = app.backend.db_now()
    ids = _insert(
        app,
        NewJob(task="t", queue="a", priority=0, run_at=now, concurrency_key="k1"),  # 0
        NewJob(task="t", queue="b", priority=10, run_at=now),  # 1
        NewJob(task="t", queue="limited", priority=5, run_at=now),  # 2
        NewJob(task="t", queue="a", priority=7, run_at=now),  # 3
        NewJob(task="t", queue="b", priority=8, run_at=now, concurrency_key="k2"),  # 4
        NewJob(task="t", queue="limited", priority=1, run_at=now),  # 5
    )
    queues = ["a", "b", "limited"]
    order = []
    for _ in ids:
        (job,) = app.backend.job_fetch_available("w", queues, 1, 30)
        order.append(job.id)
    assert order == [ids[1], ids[4], ids[3], ids[2], ids[5], ids[0]]


def test_claim_sets_the_lease_attempt_and_times_from_the_database_clock(app: Conveyor) -> None:
    (job_id,) = _insert(app, NewJob(task="t", queue="q", max_attempts=3))
    before = app.backend.db_now()
    job = claim_one(app, worker="worker-7", queue="q", lease=45)
    after = app.backend.db_now()

    assert job.id == job_id
    assert job.state == JobState.RUNNING
    assert job.attempt == 1
    assert job.lease_owner == "worker-7"
    assert job.attempted_at is not None and job.lease_expires_at is not None
    assert before <= job.attempted_at <= after
    assert job.started_at == job.attempted_at
    lease = (job.lease_expires_at - job.attempted_at).total_seconds()
    assert abs(lease - 45) < 0.01
    assert job.finished_at is None and not job.cancel_requested
    assert app.get_job(job_id) == job  # what was returned is what was stored

    # a failed attempt with no backoff is retrying and due at once: the next claim is attempt 2
    assert app.backend.job_finish_many(
        "worker-7", [fail(job, "error", "boom", after, Backoff(base=0, jitter=0))]
    ) == {job_id}
    assert app.get_job(job_id).state == JobState.RETRYING
    second = claim_one(app, worker="worker-8", queue="q", lease=5)
    assert second.attempt == 2
    assert second.lease_owner == "worker-8"
    assert second.started_at == job.started_at  # the first start is kept
    assert second.attempted_at is not None and second.attempted_at >= job.attempted_at
    assert second.lease_expires_at is not None
    assert abs((second.lease_expires_at - second.attempted_at).total_seconds() - 5) < 0.01


def test_claim_takes_at_most_limit_jobs(app: Conveyor) -> None:
    _insert(app, *[NewJob(task="t", queue="q") for _ in range(10)])
    assert app.backend.job_fetch_available("w", ["q"], 0, 30) == []
    assert app.backend.job_fetch_available("w", [], 5, 30) == []
    assert len(app.backend.job_fetch_available("w", ["q"], 3, 30)) == 3
    assert len(app.backend.job_fetch_available("w", ["q"], 100, 30)) == 7
    assert app.list_jobs(state="queued") == []


def test_finished_jobs_are_never_claimed_again(app: Conveyor) -> None:
    (job_id,) = _insert(app, NewJob(task="t", queue="q"))
    job = claim_one(app, queue="q")
    assert app.backend.job_finish_many("worker-a", [succeed(job, "1")]) == {job_id}
    assert app.backend.job_fetch_available("w", ["q"], 10, 30) == []
    assert app.get_job(job_id).state == JobState.SUCCEEDED


def test_concurrent_claimers_never_get_the_same_job(app: Conveyor) -> None:
    total, claimers = 240, 4
    app.backend.job_insert_many([NewJob(task="t", queue="q") for _ in range(total)])
    start = threading.Barrier(claimers)
    claimed: dict[str, list[int]] = {f"w{i}": [] for i in range(claimers)}
    errors: list[BaseException] = []

    def claimer(worker: str) -> None:
        try:
            start.wait(timeout=10)
            while True:
                jobs = app.backend.job_fetch_available(worker, ["q"], 3, 30)
                if not jobs:
                    return
                claimed[worker].extend(j.id for j in jobs)
                for j in jobs:
                    assert j.lease_owner == worker and j.attempt == 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(w,)) for w in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    every = [job_id for ids in claimed.values() for job_id in ids]
    assert len(every) == total, "a job was claimed twice or not at all"
    assert len(set(every)) == total, "two claimers got the same job"
    # the database agrees about who holds what
    owner = {job_id: w for w, ids in claimed.items() for job_id in ids}
    stored = app.list_jobs(limit=total + 1)
    assert len(stored) == total
    for job in stored:
        assert job.state == JobState.RUNNING and job.attempt == 1
        assert job.lease_owner == owner[job.id]


def test_the_claim_never_reads_the_whole_jobs_table(app: Conveyor, raw: RawDB) -> None:
    """PostgreSQL: the claim's statements keep one generic plan per session, made at their first
    call with the table as it is then. Made on a small table, never analyzed (a fresh database,
    a worker started before the first ANALYZE), the cheapest plan to update the chosen jobs read
    the table sequentially, and kept doing so as the table grew. The claim forbids that."""
    if is_sqlite(app.url):
        pytest.skip("PostgreSQL's plan cache; SQLite plans every statement anew")
    import psycopg

    _insert(app, *(NewJob(task="t", queue="seq") for _ in range(300)))
    claim = "SELECT id FROM conveyor_claim('w', ARRAY['seq'], 5, 30)"
    seq_scans = (
        "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relid = 'conveyor_jobs'::regclass"
    )
    with psycopg.connect(app.url, autocommit=True) as conn:
        assert len(conn.execute(claim).fetchall()) == 5  # the plans are made here
        _insert(app, *(NewJob(task="t", queue="seq") for _ in range(3000)))
        with conn.transaction():
            assert len(conn.execute(claim).fetchall()) == 5
            assert conn.execute(seq_scans).fetchone() == (0,)


def test_the_claim_never_jit_compiles(app: Conveyor) -> None:
    """PostgreSQL: forbidding sequential scans (the test above) adds 1e10 to their cost, which a
    plan keeps in a branch it never runs; on a session with JIT on (the server's default, kept by
    a pooler or a connection Conveyor did not configure) that cost passed jit_above_cost and
    every claim compiled its expressions again (120 ms of a 1 ms claim). The claim and the
    history lookup of a prune turn JIT off themselves: with every statement's cost above the JIT
    thresholds, auto_explain shows no JIT in any of the claim's plans."""
    if is_sqlite(app.url):
        pytest.skip("PostgreSQL's JIT; SQLite has none")
    import psycopg

    _insert(app, *(NewJob(task="t", queue="jit") for _ in range(20)))
    with psycopg.connect(app.url, autocommit=True) as conn:
        if conn.execute("SELECT pg_jit_available()").fetchone() != (True,):
            message = "this PostgreSQL server has no JIT provider (llvmjit) installed"
            if os.environ.get("CI") == "true":  # CI's server has one: the test must run there
                pytest.fail(message)
            pytest.skip(message)
        plans = explain_everything(
            conn,
            jit="on",
            jit_above_cost="0",
            jit_optimize_above_cost="0",
            jit_inline_above_cost="0",
        )
        # the control: a plain statement on this session is compiled
        conn.execute("SELECT count(*) FROM conveyor_jobs WHERE queue = 'jit'").fetchall()
        assert any("JIT:" in plan for plan in plans), plans
        plans.clear()
        ids = conn.execute("SELECT id FROM conveyor_claim('w', ARRAY['jit'], 5, 30)").fetchall()
        conn.execute("SELECT conveyor_history_forget(ARRAY[-1]::bigint[])")
    assert len(ids) == 5
    callers = ("Query Text: SELECT id FROM conveyor_claim", "Query Text: SELECT conveyor_history")
    nested = [plan for plan in plans if not any(caller in plan for caller in callers)]
    assert len(nested) >= 3, plans  # the claim's own statements were explained
    assert not [plan for plan in nested if "JIT:" in plan], "a statement JIT-compiled"
