"""Scenario 3, database restart (PostgreSQL): the server restarts in the middle of a run.

The machine's main cluster is shared by every test, so this scenario starts a private one
(pgcluster.py) and restarts that: ``pg_ctl restart -m fast`` (connections terminated, clean
shutdown), then ``-m immediate`` (no shutdown at all: crash recovery on start). Two workers run
a backlog of short jobs throughout and are never touched: they must reconnect by themselves
(their pooled connections, their LISTEN connections, the tasks' own connections), and every job
must end succeeded, none lost, none stuck.

Time until work resumes, per restart, counted from the execution log and the database: from the
restart command to the first job *start* logged after the server was back (exec_log t_start),
and to the first *outcome* written after it (the jobs' finished_at).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conveyor import Conveyor
from conveyor.backends.postgres.listener import DUE_APPLICATION_NAME
from tests.integration.support import rows, wait_until, worker_args

from . import apps
from .apps import create_tables
from .conftest import StartWorker
from .figures import FULL, Figures, size
from .pgcluster import Cluster, private_cluster_or_skip

WORKERS = 2
CONCURRENCY = 4
LEASE = 5.0
JOB_MS = 20
UNANSWERED = re.compile(r"a claim got no answer but took jobs \[([\d, ]+)\]")
PRODUCED = 5  # jobs the test's own app enqueues, one by one, right after each restart


@pytest.fixture
def private_pg() -> Iterator[Cluster]:
    """A private cluster; request it *before* ``workers`` so workers die before it does."""
    with private_cluster_or_skip() as cluster:
        yield cluster


def _one(url: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    return rows(url, sql, params)[0][0]


def _listeners_back(url: str) -> float | None:
    """When the last worker listener came back (max backend_start), once all WORKERS LISTEN
    (past their setup, SET ...: they ran LISTEN, then maybe claims for their worker)."""
    found = rows(
        url,
        "SELECT extract(epoch FROM backend_start)::float8 FROM pg_stat_activity"
        " WHERE application_name = ? AND state = 'idle' AND query <> '' AND query NOT LIKE ?",
        (DUE_APPLICATION_NAME, "SET %"),
    )
    return max(r[0] for r in found) if len(found) == WORKERS else None


def test_workers_ride_out_database_restarts(
    private_pg: Cluster, workers: StartWorker, figures: Callable[[int, str], Figures]
) -> None:
    n = size(400, 3000)
    modes = ["fast", "immediate"] * (2 if FULL else 1)
    fig = figures(3, "Database restart")
    fig.settings.update(
        backend="postgresql (a private cluster, restarted with pg_ctl)",
        jobs=n,
        job_ms=JOB_MS,
        workers=WORKERS,
        concurrency=CONCURRENCY,
        lease_s=LEASE,
        restarts=modes,
    )
    url = private_pg.url()
    app = Conveyor(url)
    app.migrate()
    create_tables(url)
    ended_sql = "SELECT count(*) FROM conveyor_jobs WHERE state IN ('succeeded', 'dead')"
    try:
        started = [
            workers(url, *worker_args(concurrency=CONCURRENCY, lease=LEASE, grace=2, poll="0.5"))
            for _ in range(WORKERS)
        ]
        for w in started:
            w.wait_registered(app)
        wait_until(lambda: _listeners_back(url), 20, "both workers' listeners")
        ids = [j.id for j in app.enqueue_many(apps.work.request(JOB_MS) for _ in range(n))]
        # The test's app is a producer whose pooled connections die with the server: right
        # after each restart it enqueues PRODUCED more jobs, one by one, none of which may fail
        # (the server is up). Everything else is read with fresh connections.
        producer_failures: list[str] = []

        measured = []
        for k, mode in enumerate(modes):
            threshold = n * (k + 1) // (len(modes) + 1)
            wait_until(
                lambda t=threshold: _one(url, ended_sql) >= t,
                120,
                f"{threshold} jobs ended before restart {k + 1}",
                interval=0.1,
            )
            t_cmd = time.time()
            private_pg.restart(mode)
            t_up = time.time()
            for _ in range(PRODUCED):
                try:
                    ids += [j.id for j in app.enqueue_many([apps.work.request(JOB_MS)])]
                except Exception as exc:
                    producer_failures.append(f"{mode}: {exc!r}")
            # The new server's start: a job logged after it cannot have started before the
            # restart (its exec_log insert needs the new server); pg_ctl -w returns later.
            t_new = _one(url, "SELECT extract(epoch FROM pg_postmaster_start_time())::float8")
            assert t_cmd < t_new < t_up
            first_start = wait_until(
                lambda t=t_new: _one(
                    url, "SELECT min(t_start) FROM exec_log WHERE t_start > ?", (t,)
                ),
                60,
                f"a job to start after the {mode} restart",
            )
            first_outcome = wait_until(
                lambda t=t_new: _one(
                    url,
                    "SELECT min(extract(epoch FROM finished_at))::float8 FROM conveyor_jobs"
                    " WHERE finished_at > to_timestamp(?)",
                    (t,),
                ),
                60,
                f"an outcome written after the {mode} restart",
            )
            listeners = wait_until(
                lambda t=t_new: (b := _listeners_back(url)) is not None and b > t and b,
                60,
                f"both workers' listeners back after the {mode} restart",
            )
            left = len(ids) - _one(url, ended_sql)
            measured.append((mode, t_cmd, t_up, first_start, first_outcome, listeners, left))

        def settled() -> bool:
            succeeded = "SELECT count(*) FROM conveyor_jobs WHERE state = 'succeeded'"
            return bool(_one(url, succeeded) == len(ids))

        with contextlib.suppress(AssertionError):  # counted below: lost and stuck must be 0
            wait_until(settled, 180 if FULL else 90, "every job to succeed", interval=0.2)

        states = Counter(
            dict(rows(url, "SELECT state, count(*) FROM conveyor_jobs GROUP BY state"))
        )
        in_db = sum(states.values())
        lost = (len(ids) - in_db) + states["dead"] + states["cancelled"]
        stuck = sum(states[s] for s in ("queued", "running", "retrying", "waiting"))
        errors = Counter(
            dict(
                rows(
                    url,
                    "SELECT e->>'kind', count(*) FROM conveyor_jobs, jsonb_array_elements(errors) e"
                    " GROUP BY 1",
                )
            )
        )
        unlogged = _one(
            url,
            "SELECT count(*) FROM conveyor_jobs j WHERE j.state = 'succeeded' AND NOT EXISTS ("
            " SELECT 1 FROM exec_log e WHERE e.job_id = j.id AND e.attempt = j.attempt"
            " AND e.t_end IS NOT NULL)",
        )
        twice = _one(
            url,
            "SELECT count(*) FROM (SELECT job_id FROM exec_log WHERE t_end IS NOT NULL"
            " GROUP BY job_id HAVING count(*) > 1) x",
        )
        # Why an attempt that ran to its end was not the job's last: the error its attempt
        # recorded (a task error: its own write was cut after committing; lease_expired), or
        # none at all, which would be a rerun without a cause.
        reruns = Counter(
            dict(
                rows(
                    url,
                    "SELECT coalesce((SELECT x->>'kind' FROM jsonb_array_elements(j.errors) x"
                    "  WHERE (x->>'attempt')::int = e.attempt LIMIT 1), 'none'), count(*)"
                    " FROM exec_log e JOIN conveyor_jobs j ON j.id = e.job_id"
                    " WHERE e.t_end IS NOT NULL AND e.attempt < j.attempt GROUP BY 1",
                )
            )
        )
        cut_short = _one(url, "SELECT count(*) FROM exec_log WHERE t_end IS NULL")
        alive = sum(1 for w in started if w.proc.poll() is None)
        adopted = sum(len(m[1].split(",")) for w in started for m in UNANSWERED.finditer(w.log()))
        pids = {r[0] for r in rows(url, "SELECT DISTINCT pid FROM exec_log")}

        fig.row("jobs enqueued (the backlog, then the producer's after each restart)", len(ids))
        fig.row(
            f"producer enqueues failing right after a restart (of {PRODUCED * len(modes)})",
            len(producer_failures),
            "0",
        )
        for i, (mode, t_cmd, t_up, first_start, first_outcome, listeners, left) in enumerate(
            measured, 1
        ):
            label = f"restart {i} ({mode}, {left} jobs left)"
            fig.row(f"{label}: restart command to server up (ms)", round((t_up - t_cmd) * 1000))
            fig.row(
                f"{label}: restart command to first job start (ms)",
                round((first_start - t_cmd) * 1000),
            )
            fig.row(
                f"{label}: restart command to first outcome written (ms)",
                round((first_outcome - t_cmd) * 1000),
            )
            fig.row(
                f"{label}: restart command to both listeners back (ms)",
                round((listeners - t_cmd) * 1000),
            )
        fig.row("jobs succeeded", states["succeeded"], str(len(ids)))
        fig.row("lost jobs (missing, dead or cancelled)", lost, "0")
        fig.row("stuck jobs (not finished at the end)", stuck, "0")
        fig.row("succeeded jobs without a completed run of that attempt", unlogged, "0")
        fig.row(
            "attempts failed by the restarts (the task's own database writes cut)", errors["error"]
        )
        fig.row(
            "jobs a claim took although its answer was lost, handed out by the next claim",
            adopted,
        )
        fig.row("attempts rescued after their lease expired", errors["lease_expired"], "0")
        fig.row("runs cut short (exec_log without t_end)", cut_short)
        fig.row("jobs run to completion more than once", twice)
        for kind in sorted(set(reruns) - {"none"}):
            fig.row(f"completed runs followed by another attempt: recorded {kind}", reruns[kind])
        fig.row(
            "completed runs followed by another attempt without a recorded cause",
            reruns["none"],
            "0",
        )
        fig.row("worker processes still running, never restarted", alive, str(WORKERS))
        fig.note(
            "Failed attempts are the task's own exec_log writes hitting the restart; they are "
            "retried with backoff like any failure. Resume times include the workers' own "
            "reconnection backoff (claim retries, listener backoff from 0.1 s doubling)."
        )

        assert lost == 0 and stuck == 0, dict(states)
        assert errors["lease_expired"] == 0, dict(errors)
        assert producer_failures == []
        assert states["succeeded"] == len(ids) == n + PRODUCED * len(modes)
        assert unlogged == 0
        assert reruns["none"] == 0, dict(reruns)
        assert alive == WORKERS
        assert len(pids) == WORKERS  # only the two original processes ever ran jobs
    finally:
        app.close()
