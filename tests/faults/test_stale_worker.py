"""Scenario 5, stale worker (PostgreSQL): a worker whose event loop is blocked past its lease.

Worker A claims N jobs of an async task whose first attempt calls ``time.sleep`` on the event
loop: no heartbeat runs, so every lease expires; worker B rescues the jobs and runs them again
(attempt 2). A's blocked attempts end late, once B has each job running (``during_rerun``) or
already succeeded (``after_success``), and A then tries to write their outcomes. Fencing (state
running, same attempt, same lease owner) must reject every one: the job's result is B's, its
attempt is 2, its history has one success. Everything is counted from the database, exec_log
and A's own log.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from conveyor import Conveyor, JobState
from tests.integration.support import rows, wait_all_in, wait_until, worker_args

from . import apps_h2
from .conftest import StartWorker
from .figures import Figures, size

APP = "tests.faults.apps_h2:app"
QUEUE = "h2-stale"
LEASE = 2.0
RERUN_MS = {"during_rerun": 6000.0, "after_success": 300.0}  # B's run of attempt 2
REJECTED = re.compile(
    r"^(\S+ \S+) WARNING .* outcome of job (\d+) attempt (\d+) rejected: no longer ours$", re.M
)
ABANDONED = re.compile(r"abandoning job (\d+): [^\n]*lease was lost")


def _log_time(stamp: str) -> float:
    """A worker log line's time (logging's local ``asctime``: ``2026-01-02 03:04:05,678``)."""
    whole, ms = stamp.split(",")
    return time.mktime(time.strptime(whole, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def test_stale_workers_late_outcomes_are_fenced_off(
    pg_url: str, workers: StartWorker, figures: Callable[[int, str], Figures]
) -> None:
    n = size(3, 20)
    fig = figures(5, "Stale worker")
    fig.settings.update(
        backend="postgresql",
        jobs=n,
        lease_s=LEASE,
        stale_worker="async task calling time.sleep on the event loop until the job ran again",
        rerun_ms=RERUN_MS,
    )
    app = Conveyor(pg_url)
    try:
        modes = [apps_h2.MODES[i % 2] for i in range(n)]
        jobs = app.enqueue_many(
            apps_h2.block_first.options(queue=QUEUE).request(mode, RERUN_MS[mode]) for mode in modes
        )
        ids = [j.id for j in jobs]
        mode_of = dict(zip(ids, modes, strict=True))
        args = worker_args(queues=QUEUE, concurrency=n, lease=LEASE, grace=1, poll="0.2")

        stale = workers(pg_url, *args, app=APP)
        stale_id = stale.wait_registered(app).id

        def all_claimed_by_stale() -> bool:
            got = [app.get_job(i) for i in ids]
            return all(j.state == JobState.RUNNING and j.lease_owner == stale_id for j in got)

        wait_until(all_claimed_by_stale, 30, f"worker A to claim all {n} jobs")
        fresh = workers(pg_url, *args, app=APP)  # only now: A holds every job first
        fresh_id = fresh.wait_registered(app).id

        wait_all_in(app, [JobState.SUCCEEDED], n, timeout=60)

        def stale_verdicts() -> tuple[dict[int, float], set[int]] | None:
            log = stale.log()
            rejected = {int(m[2]): _log_time(m[1]) for m in REJECTED.finditer(log) if m[3] == "1"}
            abandoned = {int(m[1]) for m in ABANDONED.finditer(log)}
            return (rejected, abandoned) if len(rejected.keys() | abandoned) >= n else None

        # A writes its late outcomes only once its loop is free again: wait for all n verdicts.
        rejected, abandoned = wait_until(stale_verdicts, 30, "worker A's n late outcomes")
        assert stale.proc.poll() is None and fresh.proc.poll() is None  # both still working

        final = {i: app.get_job(i) for i in ids}
        history = {i: app.job_history(i) for i in ids}
        runs = rows(
            pg_url,
            "SELECT job_id, attempt, worker, t_start, t_end FROM exec_log ORDER BY job_id, attempt",
        )
        run_of = {(r[0], r[1]): r for r in runs}

        # What the stale attempts did (exec_log): each began under A, and ended late, after B's
        # rerun began (during_rerun) or after it ended (after_success).
        stale_runs = [run_of.get((i, 1)) for i in ids]
        rerun_runs = [run_of.get((i, 2)) for i in ids]
        ended = [
            (s[4], f[3], f[4])  # stale end, rerun start, rerun end
            for s, f in zip(stale_runs, rerun_runs, strict=True)
            if s is not None and f is not None and s[4] is not None and f[4] is not None
        ]
        ended_during = sum(1 for end, r_start, r_end in ended if r_start < end < r_end)
        ended_after = sum(1 for end, _, r_end in ended if end > r_end)
        # When each refusal happened (A's log, ms), against B's rerun of that job (exec_log):
        # refused by attempt and lease owner while B ran it, or by state once B had finished.
        rerun_of = {r[0]: r for r in rerun_runs if r is not None and r[4] is not None}
        refused_running = sum(
            1 for i, at in rejected.items() if i in rerun_of and at < rerun_of[i][4] - 0.01
        )
        refused_finished = sum(
            1 for i, at in rejected.items() if i in rerun_of and at > rerun_of[i][4] + 0.01
        )

        # Stale writes applied, from the database: a result that is not the newer attempt's, a
        # job not finished by its attempt 2, or more than one success in its history.
        wrong_result = [
            i
            for i, job in final.items()
            if job.return_value != {"attempt": 2, "worker": fresh_id, "pid": fresh.pid}
        ]
        wrong_attempt = [i for i, job in final.items() if job.attempt != 2]
        successes = {
            i: [e for e in events if e.to_state == JobState.SUCCEEDED]
            for i, events in history.items()
        }
        extra_success = [i for i, s in successes.items() if len(s) != 1 or s[0].attempt != 2]
        lease_errors = [
            i
            for i, job in final.items()
            if [(e["kind"], e["attempt"]) for e in job.errors] != [("lease_expired", 1)]
        ]
        stale_applied = len(set(wrong_result) | set(wrong_attempt) | set(extra_success))

        by_stale = sum(1 for r in stale_runs if r is not None and r[2] == stale_id)
        by_fresh = sum(1 for r in rerun_runs if r is not None and r[2] == fresh_id)
        fig.row("jobs run first by the stale worker A (attempt 1)", by_stale, str(n))
        fig.row("jobs claimed again and run by worker B (attempt 2)", by_fresh, str(n))
        fig.row("stale attempts ending while B's rerun was running", ended_during)
        fig.row("stale attempts ending after B's rerun had succeeded", ended_after)
        fig.row("late outcomes of A rejected by fencing (A's log)", len(rejected), str(n))
        fig.row(
            "late outcomes rejected while B's rerun ran (newer attempt, other owner)",
            refused_running,
        )
        fig.row("late outcomes rejected after B's rerun succeeded (state)", refused_finished)
        fig.row("late outcomes of A dropped as lease lost (A's log)", len(abandoned))
        fig.row("jobs whose attempt 1 error is lease_expired", n - len(lease_errors), str(n))
        fig.row("stale writes applied", stale_applied, "0")
        fig.row("jobs succeeded with B's result", n - len(wrong_result), str(n))
        fig.row("lost jobs", sum(1 for j in final.values() if j.state != JobState.SUCCEEDED), "0")
        fig.note(
            "A blocks its own event loop; its lease expires after "
            f"{LEASE:g} s and B's rescuer hands the jobs back. Fencing refuses A's outcome "
            "both while B runs the job (newer attempt, other lease owner) and after B finished "
            "it (state no longer running)."
        )

        assert by_stale == n and by_fresh == n, runs
        assert stale_applied == 0, (wrong_result, wrong_attempt, extra_success)
        assert lease_errors == []
        assert ended_during == sum(1 for m in mode_of.values() if m == "during_rerun")
        assert ended_after == sum(1 for m in mode_of.values() if m == "after_success")
        # Every late outcome reached the database and was refused there: none was dropped
        # before the write (A's loop ran its outcomes before its first heartbeat).
        assert set(rejected) == set(ids), (rejected, abandoned)
        assert refused_running == ended_during and refused_finished == ended_after
    finally:
        app.close()
