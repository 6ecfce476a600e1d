"""A worker process killed with SIGKILL mid-job: its jobs come back when their lease expires."""

from __future__ import annotations

import signal

from conveyor import Conveyor, JobState

from . import apps
from .conftest import StartWorker
from .support import rows, wait_all_in, wait_rows, worker_args

LEASE = 1.0


def test_sigkilled_workers_jobs_are_rescued_and_run_by_another_process(
    app: Conveyor, url: str, start_worker: StartWorker
) -> None:
    doomed = start_worker(*worker_args(lease=LEASE))
    doomed.wait_registered(app)
    jobs = app.enqueue_many(
        [apps.hang_first.request(120), apps.hang_first_async.request(120)]  # first runs hang
    )
    ids = sorted(j.id for j in jobs)

    started = wait_rows(url, "SELECT job_id, attempt, pid FROM starts ORDER BY job_id", 2)
    assert started == [(i, 1, doomed.pid) for i in ids]
    owners = {app.get_job(i).lease_owner for i in ids}
    doomed_id = doomed.wait_registered(app).id
    assert owners == {doomed_id}

    doomed.signal(signal.SIGKILL)
    assert doomed.wait_exit(10) == -signal.SIGKILL
    assert {app.get_job(i).state for i in ids} == {JobState.RUNNING}  # nobody told the database

    rescuer = start_worker(*worker_args(lease=LEASE))
    wait_all_in(app, [JobState.SUCCEEDED], len(ids), timeout=30)

    for job_id in ids:
        job = app.get_job(job_id)
        assert job.attempt == 2
        assert job.return_value == 2  # the second run (hang_first returns its run number)
        assert len(job.errors) == 1
        error = job.errors[0]
        assert error["message"] == f"lease expired: worker {doomed_id} lost"
        assert error["kind"] == "lease_expired" and error["attempt"] == 1
        assert job.error == error["message"]
    assert rows(url, "SELECT job_id, attempt, pid FROM starts ORDER BY job_id, attempt") == [
        row for i in ids for row in [(i, 1, doomed.pid), (i, 2, rescuer.pid)]
    ]
    # The killed worker never deregistered; the live one is still registered and running.
    workers = {w.pid: w for w in app.backend.worker_list()}
    assert workers[doomed.pid].stopped_at is None
    assert workers[rescuer.pid].stopped_at is None
    assert workers[rescuer.pid].last_seen_at > workers[doomed.pid].last_seen_at
