"""Shared by the kill storm, rolling deploy and poison scenarios (PostgreSQL): a fleet of worker
processes the test kills, stops and restarts, and readers of what actually happened: the
execution log (``exec_log``: one row per run of a task), the jobs, and their history
(``conveyor_job_events``, written by the database itself on every state or attempt change).

Every figure is counted from these records; nothing here assumes what a kill or a stop did."""

from __future__ import annotations

import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from conveyor import Conveyor
from tests.integration.support import WorkerProcess, rows

from .conftest import FAULT_APP, StartWorker

LEASE_LOST = "lease expired: worker {} lost"


@dataclass(frozen=True)
class Run:
    """One run of a task, as the task itself logged it (``t_end`` None: it never returned)."""

    job_id: int
    attempt: int
    worker: str
    pid: int
    t_start: float
    t_end: float | None


@dataclass(frozen=True)
class JobRow:
    id: int
    task: str
    state: str
    attempt: int
    max_attempts: int
    errors: list[dict[str, Any]]
    lease_owner: str | None


@dataclass(frozen=True)
class Event:
    """One transition of a job's history; ``at`` is the database clock as a Unix time."""

    job_id: int
    at: float
    from_state: str | None
    to_state: str
    worker: str | None
    attempt: int


def runs_by_job(url: str) -> dict[int, list[Run]]:
    """Every logged run, per job, in start order."""
    found: dict[int, list[Run]] = defaultdict(list)
    for row in rows(
        url,
        "SELECT job_id, attempt, worker, pid, t_start, t_end FROM exec_log ORDER BY t_start",
    ):
        found[int(row[0])].append(Run(int(row[0]), int(row[1]), str(row[2]), int(row[3]), *row[4:]))
    return dict(found)


def job_rows(url: str) -> dict[int, JobRow]:
    return {
        int(r[0]): JobRow(int(r[0]), r[1], r[2], int(r[3]), int(r[4]), list(r[5] or []), r[6])
        for r in rows(
            url,
            "SELECT id, task, state, attempt, max_attempts, errors, lease_owner"
            " FROM conveyor_jobs ORDER BY id",
        )
    }


def events(url: str) -> list[Event]:
    return [
        Event(int(r[0]), float(r[1]), r[2], r[3], r[4], int(r[5]))
        for r in rows(
            url,
            "SELECT job_id, extract(epoch FROM at), from_state, to_state, worker, attempt"
            " FROM conveyor_job_events ORDER BY id",
        )
    ]


def busy_pids(url: str) -> set[int]:
    """The pids of the workers holding a running job now (a worker id is host:pid:random)."""
    owners = rows(url, "SELECT DISTINCT lease_owner FROM conveyor_jobs WHERE state = 'running'")
    return {int(str(owner).rsplit(":", 2)[1]) for (owner,) in owners}


def state_totals(url: str) -> dict[str, int]:
    return {
        str(s): int(n)
        for s, n in rows(url, "SELECT state, count(*) FROM conveyor_jobs GROUP BY state")
    }


@dataclass
class Ended:
    """A worker process that ended: how (``kill``, ``sigterm``, ``died``), when, its exit code."""

    process: WorkerProcess
    how: str
    at: float  # time.time() when the test sent the signal or saw the process gone
    code: int
    worker_id: str | None = None  # from the registry; None if it was gone before registering
    exited_at: float | None = None  # time.time() once the test saw the process gone


@dataclass
class Fleet:
    """``size`` worker processes the test kills, stops and replaces, like a process manager."""

    start_worker: StartWorker
    url: str
    args: list[str]
    size: int
    app: str = FAULT_APP
    live: list[WorkerProcess] = field(default_factory=list)
    ended: list[Ended] = field(default_factory=list)
    started: int = 0

    def start(self) -> WorkerProcess:
        self.started += 1
        return self.start_worker(self.url, *self.args, app=self.app)

    def fill(self, app: Conveyor, timeout: float = 60) -> dict[int, str]:
        """Start workers up to ``size``; once each is registered in ``app``, returns every live
        worker's pid -> worker id."""
        while len(self.live) < self.size:
            self.live.append(self.start())
        return {p.pid: p.wait_registered(app, timeout).id for p in self.live}

    def kill(self, rng: random.Random, prefer: set[int] | None = None) -> Ended:
        """SIGKILL one live worker chosen by ``rng`` (among those whose pid is in ``prefer``, if
        any is) and start its replacement."""
        indexes = [i for i, p in enumerate(self.live) if prefer and p.pid in prefer]
        index = rng.choice(indexes or range(len(self.live)))
        victim = self.live[index]
        at = time.time()
        victim.signal(signal.SIGKILL)
        code = victim.wait_exit(10)
        ended = Ended(victim, "kill", at, code, exited_at=time.time())
        self.ended.append(ended)
        self.live[index] = self.start()
        return ended

    def reap(self) -> list[Ended]:
        """Restart every worker that died on its own; returns the dead ones."""
        dead = []
        for index, proc in enumerate(self.live):
            code = proc.proc.poll()
            if code is not None:
                ended = Ended(proc, "died", time.time(), code)
                dead.append(ended)
                self.ended.append(ended)
                self.live[index] = self.start()
        return dead

    def name_workers(self, app: Conveyor) -> dict[str, int]:
        """Fill in each ended worker's id from the registry; returns every worker id -> pid."""
        by_pid = {w.pid: w.id for w in app.backend.worker_list()}
        for ended in self.ended:
            ended.worker_id = by_pid.get(ended.process.pid)
        return {worker_id: pid for pid, worker_id in by_pid.items()}


@dataclass
class Explained:
    """Runs beyond one per job, each tied to the end of the worker that ran it."""

    surplus: int = 0  # runs beyond one per job
    cut: int = 0  # ... that never returned (t_end NULL): cut by the worker's end
    outcome_lost: int = 0  # ... that returned, but the worker ended before writing the outcome
    claimed_not_started: int = 0  # attempts lost with no logged run (ended between claim and log)
    problems: list[str] = field(default_factory=list)


def explain_lost_attempts(
    jobs: dict[int, JobRow], runs: dict[int, list[Run]], ended: dict[str, Ended]
) -> Explained:
    """Check that every attempt but a job's last was lost with a worker that ended.

    ``ended`` maps the id of every worker that was killed or died to its end. For every job:
    each logged run but the last ran in such a worker's process (its pid) and started before it
    ended, and the job's errors have one ``lease_expired`` entry for that attempt naming that
    worker; every error the job has is such an entry; one run per attempt."""
    out = Explained()
    for job_id, job in jobs.items():
        job_runs = sorted(runs.get(job_id, []), key=lambda r: (r.attempt, r.t_start))
        where = f"job {job_id} ({job.task}, {job.state}, attempt {job.attempt})"
        attempts = [r.attempt for r in job_runs]
        if len(set(attempts)) != len(attempts):
            out.problems.append(f"{where}: two runs of one attempt: {job_runs}")
        out.surplus += max(0, len(job_runs) - 1)
        errors = {e.get("attempt"): e for e in job.errors}
        if len(errors) != len(job.errors):
            out.problems.append(f"{where}: several errors for one attempt: {job.errors}")
        for error in job.errors:
            owner = _lost_worker(error)
            if error.get("kind") != "lease_expired" or owner not in ended:
                out.problems.append(f"{where}: error not from a worker that ended: {error}")
        lost = job_runs[:-1] if job.state == "succeeded" else job_runs
        if job.state == "succeeded":
            last = job_runs[-1] if job_runs else None
            if last is None or last.attempt != job.attempt or last.t_end is None:
                out.problems.append(f"{where}: its last run is not a finished run: {last}")
        for run in lost:
            error = errors.get(run.attempt)
            end = ended.get(run.worker)
            if end is None or run.pid != end.process.pid or run.t_start > end.at:
                out.problems.append(f"{where}: surplus run on a worker that did not end: {run}")
            elif error is None or error.get("message") != LEASE_LOST.format(run.worker):
                out.problems.append(f"{where}: run {run} has no lease error naming its worker")
            elif run.t_end is None:
                out.cut += 1
            else:
                out.outcome_lost += 1
        logged = {r.attempt for r in job_runs}
        out.claimed_not_started += sum(1 for a in errors if a not in logged)
        expected_errors = job.attempt - (1 if job.state == "succeeded" else 0)
        if len(job.errors) != expected_errors:
            out.problems.append(f"{where}: {len(job.errors)} errors for {job.attempt} attempts")
    return out


def _lost_worker(error: dict[str, Any]) -> str | None:
    message = str(error.get("message", ""))
    prefix, suffix = LEASE_LOST.split("{}")
    if message.startswith(prefix) and message.endswith(suffix):
        return message[len(prefix) : len(message) - len(suffix)]
    return None
