"""Scenario 6, poison job (PostgreSQL): a job that takes its worker process down every time.

``faults.poison`` calls ``os._exit`` (no cleanup, no outcome written) and is mixed into normal
jobs. A small supervisor loop in the test restarts every worker that dies, as a process manager
would, and counts the restarts. The poison job must end ``dead`` after its ``max_attempts``, with
one error per attempt, "lease expired: worker <id> lost", naming the worker that ran that attempt
(from the execution log); every normal job must succeed, any run of one cut by a poisoned worker
accounted for by that worker's death."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

from conveyor import Conveyor
from tests.integration.support import worker_args

from . import apps
from .conftest import StartWorker
from .figures import Figures, size
from .storm import LEASE_LOST, Fleet, events, explain_lost_attempts, job_rows, runs_by_job

WORKERS = 3
CONCURRENCY = 4
LEASE = 2.0
MAX_ATTEMPTS = 3
NORMAL = size(200, 1000)
NORMAL_MS = (50.0, 400.0)
POISON_EXIT = 13  # faults.poison: os._exit(13)
SEED = 6


@pytest.mark.timeout(size(120, 240))
def test_poison_job_ends_dead_naming_each_lost_worker_and_the_rest_succeed(
    pg_url: str, workers: StartWorker, figures: Callable[[int, str], Figures]
) -> None:
    fig = figures(6, "Poison job")
    rng = random.Random(SEED)
    requests = [
        rng.choice((apps.work, apps.work_async)).request(round(rng.uniform(*NORMAL_MS), 1))
        for _ in range(NORMAL)
    ]
    position = rng.randrange(NORMAL // 2)  # early: it runs while normal jobs are running
    requests.insert(position, apps.poison.options(max_attempts=MAX_ATTEMPTS).request())
    fig.settings.update(
        backend="PostgreSQL",
        normal_jobs=NORMAL,
        normal_ms=f"{NORMAL_MS[0]:g}-{NORMAL_MS[1]:g} (uniform, seeded)",
        normal_tasks="faults.work (sync) or faults.work_async, half each (seeded)",
        poison="faults.poison: os._exit(13) in the worker process",
        poison_max_attempts=MAX_ATTEMPTS,
        poison_position=position,
        workers=WORKERS,
        concurrency=CONCURRENCY,
        lease_s=LEASE,
        supervisor="restarts a dead worker within 50 ms of seeing it gone",
        seed=SEED,
    )

    client = Conveyor(pg_url)
    try:
        fleet = Fleet(
            workers, pg_url, worker_args(concurrency=CONCURRENCY, lease=LEASE, grace=1), WORKERS
        )
        fleet.fill(client)
        enqueued = client.enqueue_many(requests)
        poison_id = enqueued[position].id
        normal_ids = {j.id for j in enqueued} - {poison_id}
        began = time.time()

        # The supervisor: restart whatever died, until the poison is dead and the rest done.
        def done() -> bool:
            if client.get_job(poison_id).state != "dead":
                return False
            counts = {str(k): v for s in client.stats() for k, v in s.counts.items() if v}
            return counts.get("succeeded", 0) == NORMAL and sum(counts.values()) == NORMAL + 1

        deadline = time.monotonic() + size(90, 180)
        while not done():
            fleet.reap()
            assert time.monotonic() < deadline, f"not settled; jobs {client.stats()}"
            time.sleep(0.05)  # the supervisor's own pace
        fleet.reap()
        settled = time.time() - began
        ids = fleet.name_workers(client)
        jobs = job_rows(pg_url)
        runs = runs_by_job(pg_url)
        history = events(pg_url)
    finally:
        client.close()

    deaths = [e for e in fleet.ended if e.how == "died"]
    died = {e.worker_id: e for e in deaths if e.worker_id is not None}
    poison = jobs[poison_id]
    poison_runs = sorted(runs.get(poison_id, []), key=lambda r: r.attempt)
    named = [
        error
        for error, run in zip(poison.errors, poison_runs, strict=False)
        if error.get("kind") == "lease_expired"
        and error.get("attempt") == run.attempt
        and error.get("message") == LEASE_LOST.format(run.worker)
    ]
    normal = {i: jobs[i] for i in normal_ids}
    explained = explain_lost_attempts(jobs, runs, died)
    to_dead = [e.at for e in history if e.job_id == poison_id and e.to_state == "dead"]
    by_pid = {pid: worker for worker, pid in ids.items()}

    fig.row("Normal jobs", len(normal))
    fig.row("Poison runs logged", len(poison_runs), str(MAX_ATTEMPTS))
    fig.row("Worker processes that died", len(deaths), str(MAX_ATTEMPTS))
    fig.row(
        f"... with the poison's exit code {POISON_EXIT}", sum(e.code == POISON_EXIT for e in deaths)
    )
    fig.row("Worker restarts by the supervisor", len(deaths))
    fig.row("Poison job final state", poison.state, "dead")
    fig.row("Poison job attempts", poison.attempt, str(MAX_ATTEMPTS))
    fig.row("Poison errors naming the worker of that attempt", len(named), str(MAX_ATTEMPTS))
    fig.row(
        "Normal jobs lost (not succeeded)",
        sum(j.state != "succeeded" for j in normal.values()),
        "0",
    )
    fig.row(
        "Normal-job runs cut by a poisoned worker (re-run)",
        sum(max(0, len(runs.get(i, [])) - 1) for i in normal_ids),
    )
    fig.row("Normal-job attempts lost between claim and start", explained.claimed_not_started)
    fig.row("Runs or errors not explained by a poisoned worker", len(explained.problems), "0")
    fig.row(
        "First poison run to poison dead (s)",
        round(to_dead[0] - poison_runs[0].t_start, 2) if to_dead and poison_runs else None,
    )
    fig.row("Enqueue to everything settled (s)", round(settled, 1))

    assert poison.state == "dead" and poison.attempt == MAX_ATTEMPTS, poison
    assert [r.attempt for r in poison_runs] == list(range(1, MAX_ATTEMPTS + 1)), poison_runs
    assert len({r.pid for r in poison_runs}) == MAX_ATTEMPTS, poison_runs
    assert len(poison.errors) == MAX_ATTEMPTS and len(named) == MAX_ATTEMPTS, poison.errors
    # Each poison run took its worker down: exactly those workers died, each with its exit code.
    assert sorted(e.process.pid for e in deaths) == sorted(r.pid for r in poison_runs), deaths
    assert all(e.code == POISON_EXIT for e in deaths), [e.code for e in deaths]
    assert all(by_pid.get(r.pid) == r.worker for r in poison_runs), (by_pid, poison_runs)
    assert len(fleet.live) == WORKERS and fleet.started == WORKERS + len(deaths)
    assert all(j.state == "succeeded" for j in normal.values())
    assert not explained.problems, "\n".join(explained.problems[:20])
