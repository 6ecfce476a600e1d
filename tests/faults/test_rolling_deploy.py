"""Scenario 2, rolling deploy (PostgreSQL): workers replaced one by one with SIGTERM under load.

Three ``conveyor worker`` processes run a steady stream of short jobs (50-300 ms) with some long
ones (3-6 s, longer than the 2 s grace) among them. One step of the deploy starts a replacement
worker, waits until the old one holds a long job that cannot finish within the grace, sends the
old one SIGTERM and waits for it to exit; then the next. Nothing may be lost; a job that finishes
within the grace runs once; a job still running when the grace runs out goes back to the queue
with its attempt refunded (docs/state-machine.md: hand-back), its next run has the same attempt
number, and it runs to completion on another worker. All of it is read from the execution log
and the jobs' history in the database."""

from __future__ import annotations

import itertools
import random
import re
import signal
import threading
import time
from collections.abc import Callable

import pytest

from conveyor import Conveyor
from conveyor.app import EnqueueRequest
from tests.integration.support import rows, wait_until, worker_args

from . import apps
from .conftest import StartWorker
from .figures import Figures, size
from .storm import Ended, Event, Fleet, Run, events, job_rows, runs_by_job, state_totals

GRACE = 2.0
LEASE = 10.0  # far beyond a step: a job that came back through its lease would show an error
WORKERS = 3
CONCURRENCY = 4
STEPS = size(3, 9)  # each worker of the fleet replaced once (reduced), three times (full)
LONG_SHARE = 0.05
LONG_MS = (3000.0, 6000.0)
SHORT_MS = (50.0, 300.0)
BACKLOG = 2 * WORKERS * CONCURRENCY
SEED = 2

# Runs on the worker that are still going and cannot end before the grace does (nor soon after).
HOLDS_LONG = (
    "SELECT count(*) FROM exec_log e JOIN conveyor_jobs j ON j.id = e.job_id"
    " WHERE e.worker = ? AND e.t_end IS NULL AND j.state = 'running' AND j.lease_owner = ?"
    " AND e.t_start + (j.args->>0)::float / 1000 > ?"
)


class Producer(threading.Thread):
    """Keeps a backlog of queued jobs until stopped, like steady traffic."""

    def __init__(self, url: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.rng = random.Random(seed)
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        client = Conveyor(self.url)
        try:
            while not self.stopping.is_set():
                if state_totals(self.url).get("queued", 0) < BACKLOG:
                    client.enqueue_many([self._request() for _ in range(WORKERS * CONCURRENCY)])
                self.stopping.wait(0.1)
        except BaseException as exc:
            self.error = exc
        finally:
            client.close()

    def _request(self) -> EnqueueRequest:
        long = self.rng.random() < LONG_SHARE
        ms = self.rng.uniform(*(LONG_MS if long else SHORT_MS))
        task = self.rng.choice((apps.work, apps.work_async))
        return task.request(round(ms, 1))


@pytest.mark.timeout(size(120, 300))
def test_rolling_deploy_hands_back_unfinished_jobs_and_runs_finished_ones_once(
    pg_url: str, workers: StartWorker, figures: Callable[[int, str], Figures]
) -> None:
    fig = figures(2, "Rolling deploy")
    fig.settings.update(
        backend="PostgreSQL",
        workers=WORKERS,
        concurrency=CONCURRENCY,
        grace_s=GRACE,
        lease_s=LEASE,
        steps=STEPS,
        jobs=f"steady backlog of {BACKLOG} queued; {LONG_SHARE:.0%} long "
        f"({LONG_MS[0] / 1000:g}-{LONG_MS[1] / 1000:g} s), the rest "
        f"{SHORT_MS[0]:g}-{SHORT_MS[1]:g} ms; sync (faults.work) or async (faults.work_async), "
        "half each",
        step="start the replacement, wait until the old worker holds a job that outlives the "
        "grace, SIGTERM the old one, wait for its exit",
        seed=SEED,
    )
    client = Conveyor(pg_url)
    producer = Producer(pg_url, SEED)
    stops: list[Ended] = []
    try:
        fleet = Fleet(
            workers,
            pg_url,
            worker_args(concurrency=CONCURRENCY, lease=LEASE, grace=GRACE),
            WORKERS,
        )
        ids = fleet.fill(client)
        producer.start()

        for step in range(STEPS):
            index = step % WORKERS
            old = fleet.live[index]
            new = fleet.start()
            ids[new.pid] = new.wait_registered(client, 60).id
            old_id = ids[old.pid]

            def holds_long(worker: str = old_id) -> bool:
                found = rows(pg_url, HOLDS_LONG, (worker, worker, time.time() + GRACE + 0.5))
                return bool(found[0][0])

            wait_until(holds_long, 60, f"worker {old_id} to hold a job longer than the grace")
            at = time.time()
            old.signal(signal.SIGTERM)
            code = old.wait_exit(GRACE + 30)
            stops.append(Ended(old, "sigterm", at, code, old_id, time.time()))
            fleet.live[index] = new
            if producer.error is not None:
                raise producer.error
        producer.stopping.set()
        producer.join(30)
        assert producer.error is None, producer.error
        deployed = time.time()

        def settled() -> bool:
            totals = state_totals(pg_url)
            return sum(totals.values()) == totals.get("succeeded", 0)

        wait_until(settled, 90, f"every job to succeed; now {state_totals(pg_url)}", interval=0.2)
        settle_s = time.time() - deployed
        jobs = job_rows(pg_url)
        runs = runs_by_job(pg_url)
        history = events(pg_url)
        ms_of = {
            int(i): float(ms) for i, ms in rows(pg_url, "SELECT id, args->>0 FROM conveyor_jobs")
        }
    finally:
        producer.stopping.set()
        client.close()

    victims = {s.worker_id: s for s in stops if s.worker_id is not None}
    exits = [s.process.proc.returncode for s in stops]
    took = [_exit_time(s) - s.at for s in stops]
    logged_backs = sum(
        int(m) for s in stops for m in re.findall(r"(\d+) handed back", s.process.log())
    )
    handbacks = [e for e in history if e.from_state == "running" and e.to_state == "queued"]
    back_keys = {(e.job_id, e.worker, e.attempt) for e in handbacks}
    finishes = {
        (e.job_id, e.worker, e.attempt)
        for e in history
        if e.from_state == "running" and e.to_state == "succeeded"
    }

    problems: list[str] = []
    by_job: dict[int, list[Event]] = {}
    for event in history:
        by_job.setdefault(event.job_id, []).append(event)
    refunded = 0  # hand-backs whose next claim ran the same attempt number again
    for event in handbacks:
        victim = victims.get(event.worker or "")
        if victim is None or not victim.at <= event.at <= _exit_time(victim):
            problems.append(f"hand-back not by a worker during its shutdown: {event}")
        job_events = by_job[event.job_id]
        following = job_events[job_events.index(event) + 1 :]
        claim = following[0] if following else None
        if claim is None or claim.to_state != "running" or claim.worker == event.worker:
            problems.append(f"hand-back {event} not followed by a claim elsewhere: {claim}")
        elif claim.attempt == event.attempt:
            refunded += 1

    duplicates_in_grace = 0  # jobs that finished within the grace period and ran again
    finished_in_grace = 0  # runs going at SIGTERM that finished within the grace, run once
    handed_back_runs: list[Run] = []
    same_attempt = completed_elsewhere = long_back = after_grace = 0
    for job_id, job in jobs.items():
        job_runs = runs.get(job_id, [])
        where = f"job {job_id} ({ms_of[job_id]:g} ms)"
        if job.state != "succeeded" or job.attempt != 1 or job.errors:
            problems.append(f"{where}: {job.state}, attempt {job.attempt}, errors {job.errors}")
        if not job_runs:
            problems.append(f"{where}: succeeded without a logged run")
            continue
        last = job_runs[-1]
        if last.t_end is None or (job_id, last.worker, last.attempt) not in finishes:
            problems.append(f"{where}: its last run {last} is not the one that succeeded")
        for run in job_runs:
            victim = victims.get(run.worker)
            if victim is not None and run.t_end is not None:
                finished_in_grace += run.t_start < victim.at <= run.t_end <= victim.at + GRACE
        for run, following in itertools.pairwise(job_runs):
            victim = victims.get(run.worker)
            if victim is None:
                problems.append(f"{where}: ran again after {run}, whose worker was not stopped")
                continue
            if run.t_end is not None and run.t_end <= victim.at + GRACE:
                duplicates_in_grace += 1
                problems.append(f"{where}: finished within the grace, then ran again: {run}")
            elif run.t_end is not None:
                after_grace += 1  # returned after the grace ran out, in the worker's last moments
            if (job_id, run.worker, run.attempt) not in back_keys:
                problems.append(f"{where}: no hand-back recorded for {run}")
            handed_back_runs.append(run)
            same_attempt += following.attempt == run.attempt
            long_back += ms_of[job_id] > GRACE * 1000
        if len(job_runs) > 1:
            completed_elsewhere += last.worker not in {r.worker for r in job_runs[:-1]}

    jobs_back = {r.job_id for r in handed_back_runs}
    fig.row("Workers replaced (SIGTERM)", len(stops))
    fig.row("Jobs run", len(jobs))
    fig.row("Jobs lost (not succeeded)", sum(j.state != "succeeded" for j in jobs.values()), "0")
    fig.row("Executions logged", sum(len(v) for v in runs.values()))
    fig.row("Runs going at SIGTERM that finished within the grace (run once)", finished_in_grace)
    fig.row("Duplicate executions of jobs that finished within the grace", duplicates_in_grace, "0")
    fig.row("Hand-backs recorded in the jobs' history (running -> queued)", len(handbacks))
    fig.row("Hand-backs the stopped workers logged", logged_backs)
    fig.row("Runs handed back (cut by the end of the grace)", len(handed_back_runs))
    fig.row("... of long jobs (longer than the grace)", long_back)
    fig.row("... that returned after the grace, before the process exited", after_grace)
    fig.row("Handed-back runs whose next run had the same attempt number", same_attempt)
    fig.row("Hand-backs whose next claim had the same attempt (refunded, history)", refunded)
    fig.row("Handed-back jobs then completed on another worker", completed_elsewhere)
    fig.row(
        "Jobs with an error or an attempt above 1",
        sum(bool(j.errors) or j.attempt != 1 for j in jobs.values()),
        "0",
    )
    fig.row("Exit after SIGTERM, max (s)", round(max(took), 2))
    fig.row("Time from the last exit to every job done (s)", round(settle_s, 1))

    assert exits == [0] * STEPS, exits
    # Each stopped worker held a job outliving the grace: it waited the whole grace for it.
    assert all(t >= GRACE * 0.9 for t in took), took
    assert not problems, "\n".join(problems[:20])
    assert duplicates_in_grace == 0
    assert len(handbacks) == logged_backs == len(handed_back_runs), (
        len(handbacks),
        logged_backs,
        len(handed_back_runs),
    )
    assert long_back >= STEPS, "every step should have handed back a long job"
    assert same_attempt == refunded == len(handed_back_runs)
    assert completed_elsewhere == len(jobs_back)


def _exit_time(stop: Ended) -> float:
    assert stop.exited_at is not None
    return stop.exited_at
