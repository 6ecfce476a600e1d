"""Realtime pickup: an idle worker starts a job enqueued by another process without waiting for
its poll interval (PostgreSQL: LISTEN/NOTIFY; SQLite: short idle polling with backoff)."""

from __future__ import annotations

import time

import pytest

from conveyor import Conveyor, JobState

from .conftest import is_sqlite, running_worker, wait_until

LONG_POLL = 60.0  # far longer than any wait below: only a push or idle polling can be this fast


def _other_process_app(url: str) -> Conveyor:
    """A second app on the same database: its enqueues do not wake the worker in-process."""
    other = Conveyor(url)

    @other.task(name="pickup.noop")
    def noop(n: int) -> int:
        return n

    return other


def _app_with_task(app: Conveyor) -> None:
    @app.task(name="pickup.noop")
    def noop(n: int) -> int:
        return n


def test_idle_worker_picks_up_a_job_from_another_process_at_once(
    app: Conveyor, db_url: str
) -> None:
    _app_with_task(app)
    other = _other_process_app(db_url)
    try:
        with running_worker(app, poll_interval=LONG_POLL, concurrency=2) as worker:
            if not is_sqlite(db_url):
                wait_until(lambda: worker.push_wakeups, timeout=5, what="the worker's listener")
            assert worker.push_wakeups is not is_sqlite(db_url)
            time.sleep(0.3)  # the workload: no job yet, so the worker goes idle (SQLite backs off)
            for n in range(3):
                job = other.tasks["pickup.noop"].enqueue(n)
                done = wait_until(
                    lambda j=job: app.get_job(j.id).state == JobState.SUCCEEDED,
                    timeout=5,
                    what=f"job {job.id} picked up without a poll",
                )
                assert done
    finally:
        other.close()


def test_listener_reconnects_after_its_connection_is_killed(app: Conveyor, db_url: str) -> None:
    if is_sqlite(db_url):
        pytest.skip("SQLite has no notifications to lose: idle workers poll")
    import psycopg

    _app_with_task(app)
    other = _other_process_app(db_url)
    try:
        with running_worker(app, poll_interval=LONG_POLL, concurrency=2):
            with psycopg.connect(db_url, autocommit=True) as admin:
                killed = wait_until(
                    lambda: admin.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = 'conveyor-listener' AND query LIKE 'LISTEN conveyor_job_due%'"
                    ).fetchone()[0],
                    timeout=5,
                    what="the worker's listener connection",
                )
                assert killed >= 1
                wait_until(
                    lambda: (
                        admin.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                            "'conveyor-listener' AND query LIKE 'LISTEN conveyor_job_due%'"
                        ).fetchone()[0]
                        >= 1
                    ),
                    timeout=10,
                    what="the listener to reconnect",
                )
            job = other.tasks["pickup.noop"].enqueue(7)
            wait_until(
                lambda: app.get_job(job.id).state == JobState.SUCCEEDED,
                timeout=5,
                what="pickup after the listener reconnected",
            )
    finally:
        other.close()


def test_one_notification_per_statement_and_queue(app: Conveyor, db_url: str) -> None:
    if is_sqlite(db_url):
        pytest.skip("SQLite has no LISTEN/NOTIFY")
    import psycopg

    _app_with_task(app)
    noop = app.tasks["pickup.noop"]
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN conveyor_job_due")
        requests = [noop.options(queue="alpha").request(i) for i in range(500)]
        requests += [noop.options(queue="beta").request(i) for i in range(500)]
        requests += [noop.options(queue="gamma", delay=3600).request(0)]  # not due: no wake-up
        app.enqueue_many(requests)
        got = [n.payload for n in listener.notifies(timeout=1.0)]
    assert sorted(got) == ["alpha", "beta"]
