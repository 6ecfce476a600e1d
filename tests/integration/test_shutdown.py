"""Graceful shutdown of a ``conveyor worker`` process (SIGTERM), and the second-signal exit."""

from __future__ import annotations

import signal
import socket
import time

from conveyor import Conveyor, JobState

from . import apps
from .conftest import StartWorker
from .support import rows, wait_all_in, wait_rows, wait_until, worker_args

GRACE = 2.0
STARTS = "SELECT job_id, attempt, pid FROM starts ORDER BY job_id, pid"


def test_sigterm_finishes_within_grace_and_hands_the_rest_back(
    app: Conveyor, url: str, start_worker: StartWorker
) -> None:
    worker = start_worker(*worker_args(concurrency=4, grace=GRACE, lease=2))
    worker_id = worker.wait_registered(app).id
    short = app.enqueue_many([apps.hang_first.request(1.0), apps.hang_first_async.request(1.0)])
    long = app.enqueue_many([apps.hang_first.request(120), apps.hang_first_async.request(120)])
    (waiting,) = app.enqueue_many([apps.hang_first.options(priority=-1).request(0.0)])  # no slot

    wait_rows(url, STARTS, 4)
    signalled_at = app.backend.db_now()
    sent = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(GRACE + 10) == 0
    took = time.monotonic() - sent
    assert GRACE * 0.9 <= took <= GRACE + 3.0, f"exited {took:.2f} s after SIGTERM"

    for job in short:  # running at SIGTERM, finished within the grace period
        done = app.get_job(job.id)
        assert done.state == JobState.SUCCEEDED, done
        assert done.finished_at is not None and done.finished_at > signalled_at
        assert done.attempt == 1 and done.return_value == 1
    for job in long:  # still running when grace ran out: back to queued, attempt refunded
        back = app.get_job(job.id)
        assert back.state == JobState.QUEUED, back
        assert back.attempt == 0 and back.errors == []
        assert back.lease_owner is None and back.lease_expires_at is None
        assert back.run_at <= app.backend.db_now()  # due at once
    untouched = app.get_job(waiting.id)  # never claimed: the worker stopped claiming
    assert untouched.state == JobState.QUEUED and untouched.attempted_at is None
    assert "2 handed back" in worker.log() and "Traceback" not in worker.log()

    (info,) = app.backend.worker_list()
    assert info.id == worker_id and info.stopped_at is not None
    assert info.stopped_at >= signalled_at

    # A later worker runs the handed-back jobs (their second run, first attempt) to success.
    successor = start_worker(*worker_args(concurrency=4))
    wait_all_in(app, [JobState.SUCCEEDED], 5, timeout=20)
    for job in long:
        done = app.get_job(job.id)
        assert done.attempt == 1 and done.return_value == 2 and done.errors == []
    started = rows(url, STARTS)
    assert sorted(started) == sorted(
        [(j.id, 1, worker.pid) for j in [*short, *long]]
        + [(j.id, 1, successor.pid) for j in [*long, waiting]]
    )


def test_second_signal_exits_at_once_and_the_lease_recovers_the_job(
    app: Conveyor, url: str, start_worker: StartWorker
) -> None:
    worker = start_worker(*worker_args(grace=60, lease=1))
    (job,) = app.enqueue_many([apps.hang_first.request(120)])
    wait_rows(url, STARTS, 1)

    worker.signal(signal.SIGTERM)
    wait_until(lambda: "SIGTERM: stopping" in worker.log(), 10, "the first signal to be handled")
    sent = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(5) == 1
    assert time.monotonic() - sent < 2.0
    assert "SIGTERM again: exiting now" in worker.log()
    assert app.get_job(job.id).state == JobState.RUNNING  # not handed back: no time for it

    start_worker(*worker_args(lease=1))
    wait_all_in(app, [JobState.SUCCEEDED], 1, timeout=20)
    done = app.get_job(job.id)
    assert done.attempt == 2 and done.return_value == 2
    assert [e["kind"] for e in done.errors] == ["lease_expired"]


def test_workers_register_heartbeat_and_deregister(
    app: Conveyor, url: str, start_worker: StartWorker
) -> None:
    worker = start_worker(*worker_args(concurrency=3, lease=0.6, queues="default,setup"))
    info = worker.wait_registered(app)
    assert info.pid == worker.pid
    assert info.host == socket.gethostname()
    assert info.id.startswith(f"{info.host}:{worker.pid}:")
    assert info.queues == ["default", "setup"] and info.concurrency == 3
    assert info.started_at is not None and info.last_seen_at is not None
    assert info.stopped_at is None
    assert info.started_at <= info.last_seen_at <= app.backend.db_now()

    first_seen = info.last_seen_at
    seen = wait_until(  # heartbeats every lease/3 = 0.2 s
        lambda: (i := worker.info(app)) is not None and i.last_seen_at > first_seen and i,
        timeout=10,
        what="the worker's last_seen_at to advance",
    )
    assert seen.started_at == info.started_at and seen.stopped_at is None

    worker.signal(signal.SIGINT)  # SIGINT stops gracefully too
    assert worker.wait_exit(10) == 0
    assert "Traceback" not in worker.log()
    stopped = worker.info(app)
    assert stopped is not None and stopped.id == info.id
    assert stopped.stopped_at is not None and stopped.stopped_at >= seen.last_seen_at
