"""Scenario 1, kill storm (PostgreSQL): worker processes SIGKILLed one after another under load.

Four ``conveyor worker`` processes run 50-200 ms jobs (random per job, seeded) that arrive
steadily for the whole storm; every 2 s one worker, chosen at random among those running a job at
that moment (so that every kill cuts something), is killed with SIGKILL and a new one started. Then everything is left to finish. Nothing may be lost or stuck, and every
execution beyond one per job must be an attempt that a kill cut short, as the execution log and
the jobs' errors show."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable

import pytest

from conveyor import Conveyor
from tests.integration.support import wait_until, worker_args

from . import apps
from .conftest import StartWorker
from .figures import Figures, percentile, scale, size
from .storm import (
    Fleet,
    busy_pids,
    events,
    explain_lost_attempts,
    job_rows,
    runs_by_job,
    state_totals,
)

LEASE = 2.0
KILL_EVERY = 2.0
BATCH_EVERY = 0.25
WORKERS = 4
CONCURRENCY = 4
STORM = scale(12.0, 60.0)
JOBS = size(300, 2000)
SEED = 1
MAX_ATTEMPTS = 20


@pytest.mark.timeout(size(120, 400))
def test_kill_storm_loses_nothing_and_every_extra_run_is_a_killed_attempt(
    pg_url: str, workers: StartWorker, figures: Callable[[int, str], Figures]
) -> None:
    fig = figures(1, "Kill storm")
    rng = random.Random(SEED)
    fig.settings.update(
        backend="PostgreSQL",
        jobs=JOBS,
        job_ms="50-200 (uniform, seeded)",
        tasks="faults.work (sync) or faults.work_async, half each (seeded)",
        max_attempts=f"{MAX_ATTEMPTS} (a job cut by several kills in a row is not dead for want"
        " of attempts: this counts losses, not the retry policy)",
        workers=WORKERS,
        concurrency=CONCURRENCY,
        lease_s=LEASE,
        kill_every_s=KILL_EVERY,
        storm_s=STORM,
        arrival=f"steady, in batches every {BATCH_EVERY:g} s over the storm",
        victim="one worker every 2 s, at random (seeded) among those holding a running job",
        seed=SEED,
    )
    requests = [
        rng.choice((apps.work, apps.work_async))
        .options(max_attempts=MAX_ATTEMPTS)
        .request(round(rng.uniform(50, 200), 1))
        for _ in range(JOBS)
    ]
    batches = math.ceil(STORM / BATCH_EVERY)
    bounds = [round(i * JOBS / batches) for i in range(batches + 1)]

    client = Conveyor(pg_url)
    try:
        fleet = Fleet(
            workers, pg_url, worker_args(concurrency=CONCURRENCY, lease=LEASE, grace=1), WORKERS
        )
        fleet.fill(client)

        # The storm: a batch of jobs every BATCH_EVERY s, a SIGKILL every KILL_EVERY s.
        began = time.monotonic()
        # Kills fall between two batches, while the last batch's jobs are running.
        next_batch, next_kill, batch = began, began + KILL_EVERY + BATCH_EVERY / 2, 0
        while True:
            now = time.monotonic()
            if now >= began + STORM and batch >= batches:
                break
            if now >= next_batch and batch < batches:
                client.enqueue_many(requests[bounds[batch] : bounds[batch + 1]])
                batch += 1
                next_batch += BATCH_EVERY
            if now >= next_kill and now < began + STORM:
                fleet.kill(rng, prefer=busy_pids(pg_url))
                next_kill += KILL_EVERY
            wake = min(next_batch if batch < batches else next_kill, next_kill)
            time.sleep(max(0.0, wake - time.monotonic()))  # the storm's own pace
        storm_end = time.time()
        storm_took = time.monotonic() - began

        # Then everything is left to finish: the last kill's jobs come back within the lease.
        def settled() -> bool:
            totals = state_totals(pg_url)
            return sum(totals.get(s, 0) for s in ("succeeded", "dead", "cancelled")) == JOBS

        with contextlib.suppress(AssertionError):  # counted below: stuck jobs must be 0
            wait_until(settled, 120, "every job to end", interval=0.2)
        settle_s = time.time() - storm_end

        fleet.name_workers(client)
        jobs = job_rows(pg_url)
        runs = runs_by_job(pg_url)
        history = events(pg_url)
    finally:
        client.close()

    kills = [e for e in fleet.ended if e.how == "kill"]
    assert len(kills) == int((STORM - BATCH_EVERY / 2) // KILL_EVERY), kills
    assert all(e.code == -9 for e in kills), [(e.process.pid, e.code) for e in kills]
    killed = {e.worker_id: e for e in kills if e.worker_id is not None}

    states: dict[str, int] = {}
    for job in jobs.values():
        states[job.state] = states.get(job.state, 0) + 1
    lost = JOBS - states.get("succeeded", 0)
    stuck = sum(states.get(s, 0) for s in ("queued", "running", "retrying", "waiting"))
    explained = explain_lost_attempts(jobs, runs, killed)
    total_runs = sum(len(v) for v in runs.values())

    # Kill to recovery: every job a killed worker held when it died is rescued from it (its
    # history says so: running -> retrying, worker = the killed one); from the kill to the start
    # of that job's next attempt in the execution log. No job may be rescued from a live worker.
    recovery: list[float] = []
    unrecovered: list[str] = []
    cutting: set[str] = set()  # the killed workers that held a job
    for event in history:
        if event.from_state != "running" or event.to_state not in ("retrying", "dead"):
            continue
        if event.worker not in killed:
            unrecovered.append(f"job rescued from a worker that was not killed: {event}")
            continue
        later = [r for r in runs.get(event.job_id, []) if r.attempt == event.attempt + 1]
        if not later:
            unrecovered.append(f"job {event.job_id} attempt {event.attempt}: never ran again")
            continue
        recovery.append(min(r.t_start for r in later) - killed[event.worker].at)
        cutting.add(event.worker)

    fig.row("Jobs enqueued", len(jobs))
    fig.row("Workers killed (SIGKILL)", len(kills))
    fig.row("Kills that cut a job (the killed worker held one)", len(cutting))
    fig.row("Jobs lost (not succeeded)", lost, "0")
    fig.row("Jobs stuck after the run settled (queued/running/retrying)", stuck, "0")
    fig.row("Executions logged", total_runs)
    fig.row("Executions beyond one per job", explained.surplus)
    fig.row("... cut by a kill (t_end NULL, on the killed pid)", explained.cut)
    fig.row("... finished on a killed worker, outcome lost with it", explained.outcome_lost)
    fig.row(
        "... not explained by a kill",
        explained.surplus - explained.cut - explained.outcome_lost,
        "0",
    )
    fig.row("Attempts lost between claim and start (no run logged)", explained.claimed_not_started)
    fig.row("Most attempts one job took", max(j.attempt for j in jobs.values()))
    fig.row("Jobs held by a killed worker (rescued from it)", len(recovery))
    fig.row("Kill to next attempt start, p50 (s)", round(percentile(recovery, 0.5), 3))
    fig.row("Kill to next attempt start, p99 (s)", round(percentile(recovery, 0.99), 3))
    fig.row("Kill to next attempt start, max (s)", round(max(recovery, default=0.0), 3))
    fig.row("Storm duration (s)", round(storm_took, 1))
    fig.row("Time from storm end to every job ended (s)", round(settle_s, 1))
    fig.note(
        f"A kill's recovery waits for the lease ({LEASE:g} s from the last heartbeat, sent every"
        f" {LEASE / 3:.2f} s) and the next rescuer pass (every {LEASE / 2:g} s in each worker)."
    )

    assert lost == 0 and stuck == 0, states
    assert not explained.problems, "\n".join(explained.problems[:20])
    assert not unrecovered, "\n".join(unrecovered[:20])
    assert explained.surplus == explained.cut + explained.outcome_lost
    assert recovery, "no kill hit a running job: the storm proved nothing"
    assert all(r > 0 for r in recovery), sorted(recovery)[:5]
