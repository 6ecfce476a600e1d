"""Job history: the database records every transition of a job (triggers), whoever makes it, with
the worker, the attempt, the error and the database clock's time; ``conveyor jobs show`` prints it."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from click.testing import CliRunner

from conveyor import Conveyor, JobEvent, JobNotFoundError, JobState
from conveyor.backends.base import NewJob
from conveyor.cli import main
from conveyor.states import Backoff, cancel, fail, snooze, succeed

from .conftest import RawDB, claim_one, is_sqlite, past_lease

Q, R, S, D, C = (
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.SUCCEEDED,
    JobState.DEAD,
    JobState.CANCELLED,
)
RETRYING = JobState.RETRYING


def _rows(events: list[JobEvent]) -> list[tuple[Any, ...]]:
    """(from, to, worker, attempt, error message) per event."""
    return [(e.from_state, e.to_state, e.worker, e.attempt, e.message) for e in events]


def _insert(app: Conveyor, **fields: Any) -> int:
    return app.backend.job_insert_many([NewJob(task="h.work", queue="default", **fields)])[0].id


def test_retried_then_succeeded_job_lists_every_transition(app: Conveyor) -> None:
    job_id = _insert(app, max_attempts=3)
    first = claim_one(app, worker="worker-a")
    now = app.backend.db_now()
    app.backend.job_finish_many("worker-a", [fail(first, "error", "boom", now, Backoff(base=0))])
    second = claim_one(app, worker="worker-b")
    assert app.backend.job_finish_many("worker-b", [succeed(second, '"ok"')]) == {job_id}

    history = app.job_history(job_id)
    assert _rows(history) == [
        (None, Q, None, 0, None),
        (Q, R, "worker-a", 1, None),
        (R, RETRYING, "worker-a", 1, "boom"),
        (RETRYING, R, "worker-b", 2, None),
        (R, S, "worker-b", 2, None),
    ]
    assert all(e.job_id == job_id for e in history)
    assert [e.id for e in history] == sorted(e.id for e in history)
    failure = history[2].error
    assert failure is not None and failure["kind"] == "error" and failure["attempt"] == 1
    assert "traceback" not in failure
    # times are the database clock's, the same instants the job row records
    done = app.get_job(job_id)
    assert history[0].at == done.created_at
    assert history[3].at == done.attempted_at
    assert history[-1].at == done.finished_at
    assert [e.at for e in history] == sorted(e.at for e in history)


def test_a_real_worker_records_its_id_and_each_attempts_error(app: Conveyor) -> None:
    calls = {"n": 0}

    @app.task(max_attempts=3, backoff=0)
    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("first try fails")
        return "second try works"

    job = flaky.enqueue()
    app.drain(poll_interval=0.01, worker_id="drainer")

    assert _rows(app.job_history(job.id)) == [
        (None, Q, None, 0, None),
        (Q, R, "drainer", 1, None),
        (R, RETRYING, "drainer", 1, "RuntimeError: first try fails"),
        (RETRYING, R, "drainer", 2, None),
        (R, S, "drainer", 2, None),
    ]


def test_snooze_hand_back_rescue_cancel_and_retry_are_recorded(app: Conveyor) -> None:
    job_id = _insert(app, max_attempts=2)
    claimed = claim_one(app, worker="w1")
    app.backend.job_finish_many("w1", [snooze(claimed, 0, app.backend.db_now())])
    claim_one(app, worker="w2")
    assert app.backend.job_hand_back("w2", [job_id]) == 1
    lost = claim_one(app, worker="w3", lease=5)
    assert [j.id for j in app.backend.job_rescue_stuck(past_lease(lost))] == [job_id]
    last = claim_one(app, worker="w4")
    app.cancel_job(job_id)  # running: only requested, which is not a transition
    app.backend.job_finish_many("w4", [cancel(last, "stopped on request", app.backend.db_now())])
    app.retry_job(job_id)
    app.cancel_job(job_id, reason="not needed after all")

    assert _rows(app.job_history(job_id)) == [
        (None, Q, None, 0, None),
        (Q, R, "w1", 1, None),
        (R, Q, "w1", 1, None),  # snoozed: the attempt that ended is 1, then refunded
        (Q, R, "w2", 1, None),
        (R, Q, "w2", 1, None),  # handed back at shutdown
        (Q, R, "w3", 1, None),
        (R, RETRYING, "w3", 1, "lease expired: worker w3 lost"),
        (RETRYING, R, "w4", 2, None),
        (R, C, "w4", 2, "stopped on request"),
        (C, Q, None, 0, None),  # manual retry resets the attempts
        (Q, C, None, 0, "not needed after all"),
    ]


def test_bulk_insert_claim_and_batched_finish_record_one_event_per_job(
    app: Conveyor, raw: RawDB
) -> None:
    n = 300
    jobs = app.backend.job_insert_many([NewJob(task="h.bulk", queue="bulk") for _ in range(n)])
    claimed = app.backend.job_fetch_available("w", ["bulk"], n, 30)
    assert len(claimed) == n
    app.backend.job_heartbeat("w", [j.id for j in claimed], 30)  # not a transition
    assert app.backend.job_finish_many("w", [succeed(j, "1") for j in claimed]) == {
        j.id for j in jobs
    }
    for job in jobs[:: n // 10]:
        assert _rows(app.backend.job_events(job.id)) == [
            (None, Q, None, 0, None),
            (Q, R, "w", 1, None),
            (R, S, "w", 1, None),
        ]
    assert raw.scalar("SELECT count(*) FROM conveyor_job_events") == 3 * n


def test_a_bulk_insert_larger_than_a_history_record_lists_every_job(
    app: Conveyor, raw: RawDB
) -> None:
    """(PostgreSQL keeps one history record per statement and 1000 jobs: a 2,500-job insert spans
    three.) Every job, first to last, has exactly its own events."""
    n = 2500
    jobs = app.backend.job_insert_many([NewJob(task="h.big", queue="big") for _ in range(n)])
    claimed = app.backend.job_fetch_available("w", ["big"], 1200, 30)
    assert len(claimed) == 1200
    for job in (jobs[0], jobs[999], jobs[1000], jobs[1199], jobs[1200], jobs[-1]):
        expected = [(None, Q, None, 0, None)]
        if job.id in {c.id for c in claimed}:
            expected.append((Q, R, "w", 1, None))
        assert _rows(app.backend.job_events(job.id)) == expected
    assert raw.scalar("SELECT count(*) FROM conveyor_job_events") == n + 1200
    ids = [e.id for e in app.backend.job_events(jobs[-1].id)]
    assert len(ids) == len(set(ids)) == 1


def test_deleting_jobs_keeps_the_history_of_jobs_recorded_with_them(
    app: Conveyor, raw: RawDB
) -> None:
    """Jobs inserted, claimed and finished together: deleting some leaves the others' history as
    it was, event ids included."""
    jobs = app.backend.job_insert_many([NewJob(task="h.t", queue="t") for _ in range(5)])
    claimed = app.backend.job_fetch_available("w", ["t"], 5, 30)
    app.backend.job_finish_many("w", [succeed(j, "1") for j in claimed])
    before = {j.id: app.backend.job_events(j.id) for j in jobs}
    assert all(len(events) == 3 for events in before.values())

    doomed = [jobs[1].id, jobs[3].id]
    for job_id in doomed:
        assert app.delete_job(job_id) is True
    for job in jobs:
        expected = [] if job.id in doomed else before[job.id]
        assert app.backend.job_events(job.id) == expected
    assert raw.scalar("SELECT count(*) FROM conveyor_job_events") == 3 * 3
    for job_id in (jobs[0].id, jobs[2].id, jobs[4].id):
        assert app.delete_job(job_id) is True
    assert raw.scalar("SELECT count(*) FROM conveyor_job_events") == 0
    if not is_sqlite(app.url):  # and no record is left behind without a job
        assert raw.scalar("SELECT count(*) FROM conveyor_history") == 0


def test_jobs_recorded_together_deleted_at_once_leave_no_history(app: Conveyor) -> None:
    """Two transactions delete two of three jobs recorded together, the second waiting for the
    first: neither deleted job keeps any history (the second must not write back the first's),
    the third keeps all of its own."""
    jobs = app.backend.job_insert_many([NewJob(task="h.t", queue="t") for _ in range(3)])
    first = RawDB(app)
    try:
        first.execute("BEGIN")
        first.execute("DELETE FROM conveyor_jobs WHERE id = %s", (jobs[0].id,))
        done = threading.Event()

        def delete_second() -> None:
            second = RawDB(app)  # its own connection, in its own thread
            try:
                second.execute("BEGIN")
                second.execute("DELETE FROM conveyor_jobs WHERE id = %s", (jobs[1].id,))  # waits
                second.execute("COMMIT")
                done.set()
            finally:
                second.close()

        waiter = threading.Thread(target=delete_second)
        waiter.start()
        assert not done.wait(0.3)  # the workload: it is blocked behind the first delete
        first.execute("COMMIT")
        waiter.join(timeout=10)
        assert done.is_set()
    finally:
        first.close()
    assert app.backend.job_events(jobs[0].id) == []
    assert app.backend.job_events(jobs[1].id) == []
    assert _rows(app.backend.job_events(jobs[2].id)) == [(None, Q, None, 0, None)]


def test_events_without_an_error_have_none(app: Conveyor, raw: RawDB) -> None:
    """In a batch where one outcome has an error, the others' events have no error (SQL NULL)."""
    app.backend.job_insert_many([NewJob(task="h.t", queue="t", max_attempts=1) for _ in range(3)])
    claimed = app.backend.job_fetch_available("w", ["t"], 3, 30)
    now = app.backend.db_now()
    outcomes = [succeed(claimed[0], "1"), succeed(claimed[1], "1")]
    outcomes.append(fail(claimed[2], "error", "broken", now, Backoff(base=0)))
    app.backend.job_finish_many("w", outcomes)
    assert raw.scalar("SELECT count(*) FROM conveyor_job_events WHERE error IS NOT NULL") == 1
    assert raw.scalar("SELECT count(*) FROM conveyor_job_events WHERE error IS NULL") == 3 + 3 + 2


def test_changes_made_with_plain_sql_are_recorded_too(app: Conveyor, raw: RawDB) -> None:
    """The history is the database's: a transition no Conveyor code path made is still there."""
    job_id = _insert(app)
    raw.execute("UPDATE conveyor_jobs SET priority = 3 WHERE id = %s", (job_id,))  # no transition
    ts = raw.ts(app.backend.db_now())
    raw.execute(
        "UPDATE conveyor_jobs SET state = 'cancelled', finished_at = %s WHERE id = %s", (ts, job_id)
    )
    assert _rows(app.job_history(job_id)) == [(None, Q, None, 0, None), (Q, C, None, 0, None)]


def test_history_is_part_of_the_callers_transaction(app: Conveyor, raw: RawDB) -> None:
    @app.task(name="h.tx")
    def tx() -> None: ...

    if app.backend.name == "sqlite":
        import sqlite3

        conn: Any = sqlite3.connect(app.backend.path, timeout=10)  # type: ignore[attr-defined]
    else:
        import psycopg

        conn = psycopg.connect(app.url)
    try:
        tx.enqueue(connection=conn)
        conn.rollback()
        assert raw.scalar("SELECT count(*) FROM conveyor_job_events") == 0
        kept = tx.enqueue(connection=conn)
        assert raw.scalar("SELECT count(*) FROM conveyor_job_events") == 0  # not committed yet
        conn.commit()
    finally:
        conn.close()
    assert raw.scalar("SELECT count(*) FROM conveyor_job_events") == 1
    assert _rows(app.job_history(kept.id)) == [(None, Q, None, 0, None)]


def test_deleting_a_job_deletes_its_history(app: Conveyor) -> None:
    job_id, other = _insert(app), _insert(app)
    assert len(app.job_history(job_id)) == 1
    assert app.delete_job(job_id) is True
    assert app.backend.job_events(job_id) == []
    with pytest.raises(JobNotFoundError):
        app.job_history(job_id)
    assert len(app.job_history(other)) == 1


def test_jobs_show_prints_the_history(app: Conveyor, db_url: str) -> None:
    @app.task(name="h.show", max_attempts=2, backoff=0)
    def show() -> None:
        raise RuntimeError("kaput")

    job = show.enqueue()
    claimed = claim_one(app, worker="w-show")
    app.backend.job_finish_many("w-show", [snooze(claimed, 0, app.backend.db_now())])
    app.drain(poll_interval=0.01, worker_id="w-show")
    assert app.get_job(job.id).state == D

    runner = CliRunner()
    text = runner.invoke(main, ["jobs", "show", str(job.id), "--database", db_url])
    assert text.exit_code == 0, text.output
    lines = text.output.split("\nhistory:\n", 1)[1].splitlines()
    assert [line.split("  ", 2)[2] for line in lines] == [
        "(enqueued) -> queued  attempt 0",
        "queued -> running  attempt 1  worker w-show",
        "running -> queued  attempt 1  worker w-show",
        "queued -> running  attempt 1  worker w-show",
        "running -> retrying  attempt 1  worker w-show  error: RuntimeError: kaput",
        "retrying -> running  attempt 2  worker w-show",
        "running -> dead  attempt 2  worker w-show  error: RuntimeError: kaput",
    ]

    as_json = runner.invoke(main, ["jobs", "show", str(job.id), "--json", "--database", db_url])
    assert as_json.exit_code == 0, as_json.output
    history = json.loads(as_json.output)["history"]
    assert [(h["from_state"], h["to_state"], h["worker"], h["attempt"]) for h in history] == [
        (None, "queued", None, 0),
        ("queued", "running", "w-show", 1),
        ("running", "queued", "w-show", 1),
        ("queued", "running", "w-show", 1),
        ("running", "retrying", "w-show", 1),
        ("retrying", "running", "w-show", 2),
        ("running", "dead", "w-show", 2),
    ]
    assert history[-1]["error"]["message"] == "RuntimeError: kaput"
    assert history[-1]["error"]["kind"] == "error"
    events = app.job_history(job.id)
    assert [h["at"] for h in history] == [e.at.isoformat() for e in events]
