"""Scenario 7, SQLite under kills: four worker processes and one producer process share one
SQLite file while the workers are SIGKILLed at random moments, some of them inside a write
transaction, and replaced.

Counted from the producer's output, the execution log and the database: no job is lost, every
surplus execution belongs to a killed process, the file passes ``PRAGMA integrity_check``, and no
``database is locked`` (SQLITE_BUSY, OperationalError) reaches the producer or any worker's log.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conveyor import Conveyor
from conveyor.backends.sqlite import path_from_url
from tests.integration.support import (
    ROOT,
    WorkerProcess,
    rows,
    subprocess_env,
    worker_args,
)

from .conftest import StartWorker
from .figures import FULL, Figures, scale, size

N_JOBS = size(2_000, 20_000)
WORKERS = 4
CONCURRENCY = 4
LEASE = 2.0
#: Seconds between two kills (uniformly drawn).
KILL_GAP = (0.3, 1.0)
#: Every other kill waits (at most this long) for the victim to hold SQLite's write lock.
AIM_FOR_TRANSACTION = 0.5
#: What must never reach the producer or a worker's log.
LOCK_ERRORS = re.compile(
    r"locked|SQLITE_BUSY|OperationalError|DatabaseUnavailable|Traceback", re.IGNORECASE
)
#: The WAL write lock: byte 120 of the ``-shm`` file (SQLite's WALINDEX_LOCK_OFFSET + 0).
WAL_WRITE_LOCK = 120


@dataclass
class Kill:
    pid: int
    worker_id: str
    at: float  # time.time() of the SIGKILL
    in_transaction: bool  # the victim held the WAL write lock when it was stopped


def holds_write_lock(pid: int, shm_inode: int) -> bool:
    """Does ``pid`` hold SQLite's WAL write lock (a POSIX lock on byte 120 of the -shm file)?"""
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if "->" in parts:  # a blocked waiter, not a held lock
            continue
        try:
            kind, owner, inode = parts[3], int(parts[4]), int(parts[5].rsplit(":", 1)[1])
            start, end = int(parts[6]), parts[7]
        except (IndexError, ValueError):
            continue
        mine = owner == pid and inode == shm_inode and kind == "WRITE"
        if mine and start <= WAL_WRITE_LOCK and (end == "EOF" or int(end) >= WAL_WRITE_LOCK):
            return True
    return False


def kill_mid_work(victim: WorkerProcess, worker_id: str, shm_inode: int, aim: bool) -> Kill:
    """SIGKILL ``victim`` now, or (``aim``) as soon as it is seen holding the write lock (within
    AIM_FOR_TRANSACTION s); whether it held it is read while the process is stopped, just before."""
    if aim:
        deadline = time.monotonic() + AIM_FOR_TRANSACTION
        while time.monotonic() < deadline and not holds_write_lock(victim.pid, shm_inode):
            time.sleep(0.0002)
    victim.signal(signal.SIGSTOP)
    held = holds_write_lock(victim.pid, shm_inode)
    victim.signal(signal.SIGKILL)
    at = time.time()
    assert victim.wait_exit(10) == -signal.SIGKILL
    return Kill(victim.pid, worker_id, at, held)


def unfinished(url: str) -> int:
    found = rows(
        url,
        "SELECT count(*) FROM conveyor_jobs WHERE state NOT IN ('succeeded', 'dead', 'cancelled')",
    )
    return int(found[0][0])


def busy_owners(url: str) -> dict[str, int]:
    """Running jobs per lease owner (worker id)."""
    found = rows(
        url,
        "SELECT lease_owner, count(*) FROM conveyor_jobs WHERE state = 'running'"
        " GROUP BY lease_owner",
    )
    return {owner: n for owner, n in found}


@pytest.mark.timeout(scale(150, 900))
def test_sqlite_survives_sigkills_of_busy_workers(
    sqlite_file_url: str, workers: StartWorker, figures: Any, tmp_path: Path
) -> None:
    url = sqlite_file_url
    rnd = random.Random(7)
    fig: Figures = figures(7, "SQLite under kills")
    fig.settings.update(
        jobs=N_JOBS,
        worker_processes=WORKERS,
        concurrency=CONCURRENCY,
        lease_s=LEASE,
        seconds_between_kills=f"{KILL_GAP[0]:g}-{KILL_GAP[1]:g}",
        tasks="faults.work and faults.work_async in turn, 1-15 ms each",
        execution_log="two writes per run, in the same SQLite file",
    )
    app = Conveyor(url)
    args = worker_args(concurrency=CONCURRENCY, lease=LEASE, grace=1)
    alive: dict[int, tuple[WorkerProcess, str]] = {}  # pid -> (process, worker id)
    every: list[WorkerProcess] = []

    def start_one() -> None:
        worker = workers(url, *args)
        every.append(worker)
        alive[worker.pid] = (worker, worker.wait_registered(app, timeout=30).id)

    started = time.monotonic()
    for _ in range(WORKERS):
        start_one()
    shm_inode = os.stat(path_from_url(url) + "-shm").st_ino

    produced_log = tmp_path / "producer.log"
    with open(produced_log, "wb") as out:
        producer = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.apps_h3", str(N_JOBS), "7"],
            env=subprocess_env(url),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    kills: list[Kill] = []
    deadline = time.monotonic() + scale(100, 800)
    try:
        while True:
            time.sleep(rnd.uniform(*KILL_GAP))  # the scenario: a kill every so often
            if producer.poll() is not None and unfinished(url) == 0:
                break
            assert time.monotonic() < deadline, f"not done in time: {unfinished(url)} unfinished"
            assert producer.poll() in (None, 0), produced_log.read_text()[-5_000:]
            owners = busy_owners(url)
            busy = [pid for pid, (_, wid) in alive.items() if owners.get(wid)]
            if not busy:
                continue
            victim, worker_id = alive.pop(rnd.choice(busy))
            aim = len(kills) % 2 == 0  # every other kill aims for a transaction
            kills.append(kill_mid_work(victim, worker_id, shm_inode, aim))
            start_one()
    finally:
        if producer.poll() is None:
            producer.kill()
        producer.wait(10)
    elapsed = time.monotonic() - started
    for worker, _ in alive.values():  # a clean stop: their logs are complete, their exit clean
        worker.signal(signal.SIGTERM)
    for worker, _ in alive.values():
        assert worker.wait_exit(30) == 0, worker.log()[-5_000:]

    # -- the producer: every id it was given, and nothing it printed about a lock --------------
    produced_text = produced_log.read_text()
    assert producer.returncode == 0, produced_text[-5_000:]
    produced = [
        int(i)
        for line in produced_text.splitlines()
        if line.startswith("ids ")
        for i in line[4:].split(",")
    ]
    assert f"done {N_JOBS}" in produced_text
    fig.row("jobs enqueued by the producer process (its output)", len(produced), str(N_JOBS))
    assert len(produced) == len(set(produced)) == N_JOBS

    # -- the database ---------------------------------------------------------------------------
    jobs = {
        r[0]: r for r in rows(url, "SELECT id, state, attempt, result, errors FROM conveyor_jobs")
    }
    succeeded = {i for i, r in jobs.items() if r[1] == "succeeded"}
    lost = [i for i in produced if i not in succeeded]
    fig.row("jobs succeeded", len(succeeded), str(N_JOBS))
    fig.row("jobs lost (enqueued, not succeeded)", len(lost), "0")
    fig.row("jobs dead", sum(r[1] == "dead" for r in jobs.values()), "0")
    fig.row(
        "jobs in the database the producer was not told of", len(set(jobs) - set(produced)), "0"
    )
    fig.row("workers SIGKILLed while running jobs", len(kills))
    fig.row(
        "kills inside a write transaction (victim held the WAL write lock)",
        sum(k.in_transaction for k in kills),
    )

    killed_pids = {k.pid: k for k in kills}
    killed_ids = {k.worker_id for k in kills}
    lease_errors = 0
    other_errors: list[Any] = []
    for _, _, _, _, errors in jobs.values():
        for error in json.loads(errors):
            owner = error["message"].removeprefix("lease expired: worker ").removesuffix(" lost")
            if error["kind"] == "lease_expired" and owner in killed_ids:
                lease_errors += 1
            else:
                other_errors.append(error)
    fig.row(
        "attempts cut short by a kill (lease_expired errors naming a killed worker)", lease_errors
    )
    fig.row("job errors not caused by a kill", len(other_errors), "0")

    # -- the execution log: who ran what ---------------------------------------------------------
    runs: dict[int, list[tuple[int, int, float, float | None]]] = defaultdict(list)
    log_rows = rows(url, "SELECT job_id, attempt, pid, t_start, t_end FROM exec_log")
    for job_id, attempt, pid, t_start, t_end in log_rows:
        runs[job_id].append((attempt, pid, t_start, t_end))
    finishers = dict(
        rows(
            url,
            "SELECT job_id, worker FROM conveyor_job_events WHERE to_state = 'succeeded'",
        )
    )
    worker_pid = {w.id: w.pid for w in app.backend.worker_list()}
    app.close()
    unexplained: list[Any] = []  # surplus runs by a process that was never killed
    bad_winner: list[Any] = []
    surplus = 0
    for job_id in produced:
        attempt, result = jobs[job_id][2], jobs[job_id][3]
        winners = [r for r in runs[job_id] if r[0] == attempt]
        ok = (
            len(winners) == 1
            and winners[0][3] is not None
            and winners[0][1] == worker_pid.get(finishers.get(job_id, ""))
            and json.loads(result) == attempt
        )
        if not ok:
            bad_winner.append((job_id, attempt, result, runs[job_id], finishers.get(job_id)))
        for run in runs[job_id]:
            if run in winners[:1]:
                continue
            surplus += 1
            kill = killed_pids.get(run[1])
            if kill is None or run[2] > kill.at:
                unexplained.append((job_id, run))
    fig.row("executions logged", len(log_rows))
    fig.row("jobs executed more than once", sum(len(r) > 1 for r in runs.values()))
    fig.row("surplus executions (beyond one per job)", surplus)
    fig.row("surplus executions not by a killed process before its kill", len(unexplained), "0")
    fig.row("jobs whose succeeding run is not the one the database recorded", len(bad_winner), "0")

    # -- the file and the logs ------------------------------------------------------------------
    integrity = rows(url, "PRAGMA integrity_check")
    fig.row("PRAGMA integrity_check", integrity[0][0] if len(integrity) == 1 else integrity, "ok")
    lock_lines = [
        (name, line)
        for name, text in [("producer", produced_text)]
        + [(f"worker {w.pid}", w.log()) for w in every]
        for line in text.splitlines()
        if LOCK_ERRORS.search(line)
    ]
    fig.row(
        "'database is locked'/SQLITE_BUSY/OperationalError/traceback lines in the producer's "
        f"output and the {len(every)} worker logs",
        len(lock_lines),
        "0",
    )
    fig.row("wall time (s)", round(elapsed, 1))
    fig.row("throughput under kills (jobs/s)", round(N_JOBS / elapsed, 1))
    if not FULL:
        fig.note("Reduced size (CI).")

    assert not lost, f"{len(lost)} jobs lost, e.g. {lost[:10]}"
    assert len(jobs) == N_JOBS
    assert not other_errors, other_errors[:5]
    assert not unexplained, unexplained[:10]
    assert not bad_winner, bad_winner[:10]
    assert integrity == [("ok",)], integrity
    assert not lock_lines, lock_lines[:20]
    assert kills and sum(k.in_transaction for k in kills) > 0, kills
    assert lease_errors > 0
