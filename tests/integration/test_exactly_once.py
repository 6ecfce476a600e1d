"""Exactly-once under concurrency: 2,000 jobs, 8 concurrent workers in 2 OS processes."""

from __future__ import annotations

from collections import Counter

import pytest

from conveyor import Conveyor, JobState

from . import apps
from .conftest import StartWorker
from .support import rows, wait_all_in, worker_args

N_JOBS = 2000
PROCESSES = 2
CONCURRENCY = 4


@pytest.mark.slow
def test_every_job_runs_exactly_once_across_processes(
    app: Conveyor, url: str, start_worker: StartWorker
) -> None:
    workers = [start_worker(*worker_args(concurrency=CONCURRENCY)) for _ in range(PROCESSES)]
    for w in workers:  # both are claiming before the first job exists: they race for all of it
        w.wait_registered(app)

    # Half sync tasks (thread pool), half async tasks (event loop), interleaved.
    requests = [(apps.record if i % 2 else apps.record_async).request(i) for i in range(N_JOBS)]
    ids = [job.id for job in app.enqueue_many(requests)]
    assert len(set(ids)) == N_JOBS

    counts = wait_all_in(app, [JobState.SUCCEEDED], N_JOBS, timeout=60)
    assert counts == {"succeeded": N_JOBS}

    executions = rows(url, "SELECT job_id, attempt, pid FROM executions")
    runs = Counter(job_id for job_id, _, _ in executions)
    twice = {job_id: n for job_id, n in runs.items() if n > 1}
    assert not twice, f"jobs executed more than once: {dict(list(twice.items())[:10])}"
    assert set(runs) == set(ids), f"{len(set(ids) - set(runs))} jobs never executed"
    assert {attempt for _, attempt, _ in executions} == {1}

    # The work really was shared by the processes, and each result is the job's own.
    pids = Counter(pid for _, _, pid in executions)
    assert set(pids) == {w.pid for w in workers}, pids
    done = app.list_jobs(state="succeeded", limit=N_JOBS)
    assert len(done) == N_JOBS
    assert all(j.return_value == j.args[0] and j.attempt == 1 and j.errors == [] for j in done)
    assert all(j.lease_owner is None for j in done)
