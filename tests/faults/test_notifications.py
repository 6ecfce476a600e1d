"""Scenario 4, lost notifications (PostgreSQL): idle workers wake on ``conveyor_job_due``
notifications; when those are lost, work must still complete (polling) and push must come back.

One idle worker (poll interval POLL: a pickup far quicker than that is a push) on a queue of its
own. Probes are single jobs enqueued from this process (which cannot wake the worker in-process);
pickup latency = exec_log ``t_start`` - the job's ``created_at`` (database clock, same machine).

1. before: probes, pushed.
2. the worker's LISTEN connection is killed (``pg_terminate_backend``; found by
   application_name ``conveyor-due-listener`` *and* by the worker process's own TCP ports, since
   other tests' workers share the server): a probe enqueued at the kill still runs, a new
   listener backend of that worker appears and LISTENs (detection time = its backend_start -
   the kill), and the probes after it are pushed again.
3. notifications suppressed: ``conveyor_notify_due`` (which the job triggers call) replaced by a
   no-op in the test's schema, so inserts still write history but notify nobody: probes still
   complete, by polling; then the function is restored and probes are pushed again.

An independent LISTEN connection of the test counts the notifications of the worker's queue in
each phase: proof that phase 3 really sent none.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from conveyor import Conveyor, JobState
from conveyor.backends.postgres.listener import (
    DUE_APPLICATION_NAME,
    DUE_CHANNEL,
    schema_channel,
)
from conveyor.backends.postgres.listener import listen as listen_on
from tests.integration.support import WorkerProcess, rows, wait_until, worker_args

from . import apps
from .conftest import StartWorker
from .figures import Figures, percentile, size

QUEUE = "h2-notify"
POLL = 2.0  # the worker's poll interval: polling pickups take up to this long, pushes ~ms
PUSHED = POLL / 4  # a median pickup under this is pushed (polling would give ~POLL / 2)
_NO_NOTIFY = """CREATE OR REPLACE FUNCTION conveyor_notify_due(_queues text[], _schema name)
RETURNS void
LANGUAGE plpgsql AS $fn$ BEGIN END $fn$"""


def tcp_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets process ``pid`` holds (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def listeners_of(admin: Any, worker: WorkerProcess) -> list[tuple[int, float, str, str]]:
    """The worker's listener backends: (backend pid, backend_start epoch, state, last query)."""
    found = admin.execute(
        "SELECT pid, client_port, extract(epoch FROM backend_start)::float8, state, query"
        " FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
        (DUE_APPLICATION_NAME,),
    ).fetchall()
    ports = tcp_ports(worker.pid)
    return [(r[0], r[2], r[3], r[4]) for r in found if r[1] in ports]


def listening(admin: Any, worker: WorkerProcess, not_pid: int | None = None) -> Any:
    """The worker's listener backend that LISTENs on the due channel (other than ``not_pid``):
    past its setup (SET ...), it ran LISTEN, then maybe claims for the worker."""
    for pid, started, state, query in listeners_of(admin, worker):
        if pid != not_pid and state == "idle" and query and not query.startswith("SET "):
            return pid, started
    return None


@contextmanager
def notification_counter(url: str) -> Iterator[list[float]]:
    """Times (time.time()) of the due notifications naming QUEUE, seen by our own listener."""
    seen: list[float] = []
    stop = threading.Event()
    ready = threading.Event()

    def listen() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            listen_on(conn, schema_channel(conn, DUE_CHANNEL))
            ready.set()
            while not stop.is_set():
                for note in conn.notifies(timeout=0.1):
                    if note.payload == QUEUE:
                        seen.append(time.time())

    thread = threading.Thread(target=listen, name="h2-notify-counter", daemon=True)
    thread.start()
    assert ready.wait(10), "the test's own listener did not start"
    try:
        yield seen
    finally:
        stop.set()
        thread.join(5)


class Prober:
    """Enqueues one job at a time and measures its pickup latency from the database."""

    def __init__(self, app: Conveyor, url: str) -> None:
        self.app = app
        self.url = url
        self.rng = random.Random(5)

    def probe(self, gap: float = 0.0) -> float:
        if gap:
            time.sleep(self.rng.uniform(0, gap))  # decorrelate from the worker's poll phase
        job = self.app.enqueue_many([apps.work.options(queue=QUEUE).request(5)])[0]
        return self.wait(job.id)

    def wait(self, job_id: int) -> float:
        wait_until(
            lambda: self.app.get_job(job_id).state == JobState.SUCCEEDED,
            timeout=3 * POLL + 20,
            what=f"probe job {job_id} to succeed",
            interval=0.02,
        )
        found = rows(
            self.url,
            "SELECT e.t_start - extract(epoch FROM j.created_at)::float8 FROM exec_log e"
            " JOIN conveyor_jobs j ON j.id = e.job_id WHERE e.job_id = ? ORDER BY e.attempt",
            (job_id,),
        )
        assert len(found) == 1, f"probe {job_id} ran {len(found)} times"
        return float(found[0][0])

    def phase(self, n: int, gap: float) -> list[float]:
        return [self.probe(gap) for _ in range(n)]


def _ms(values: list[float], q: float) -> float:
    return round(percentile(values, q) * 1000, 1)


def test_lost_notifications_cost_latency_never_work(
    pg_url: str, workers: StartWorker, figures: Callable[[int, str], Figures]
) -> None:
    kills, k_push, k_poll = size(2, 5), size(5, 20), size(4, 12)
    fig = figures(4, "Lost notifications")
    fig.settings.update(
        backend="postgresql",
        worker_poll_interval_s=POLL,
        probes_per_pushed_phase=k_push,
        probes_while_suppressed=k_poll,
        listener_kills=kills,
        suppression="conveyor_notify_due() replaced by a no-op in the schema, then restored",
    )
    app = Conveyor(pg_url)
    admin = psycopg.connect(pg_url, autocommit=True)
    try:
        worker = workers(
            pg_url, *worker_args(queues=QUEUE, concurrency=2, lease=10, poll=str(POLL))
        )
        worker.wait_registered(app)
        first = wait_until(lambda: listening(admin, worker), 20, "the worker's listener")
        prober = Prober(app, pg_url)
        with notification_counter(pg_url) as notified:

            def notes_since(t0: float, expected: int = 0) -> int:
                """The notifications seen since t0 (given up to 2 s to reach ``expected``)."""
                deadline = time.monotonic() + 2
                while True:
                    seen = sum(1 for t in notified if t >= t0)
                    if seen >= expected or time.monotonic() > deadline:
                        return seen
                    time.sleep(0.02)

            # 1. before
            t0 = time.time()
            before = prober.phase(k_push, gap=0.3)
            notes_before = notes_since(t0, k_push)

            # 2. the listener connection killed, `kills` times
            detections, at_kill, old = [], [], first
            for _ in range(kills):
                t_kill = time.time()
                admin.execute("SELECT pg_terminate_backend(%s)", (old[0],))
                job = app.enqueue_many([apps.work.options(queue=QUEUE).request(5)])[0]
                new = wait_until(
                    lambda o=old: listening(admin, worker, not_pid=o[0]),
                    30,
                    "a new listener connection of the worker",
                    interval=0.01,
                )
                detections.append(new[1] - t_kill)
                at_kill.append(prober.wait(job.id))
                old = new
            listeners_after_kills = len(listeners_of(admin, worker))
            after_kill = prober.phase(k_push, gap=0.3)

            # 3. notifications suppressed, then restored
            (original,) = admin.execute(
                "SELECT pg_get_functiondef('conveyor_notify_due(text[], name)'::regprocedure)"
            ).fetchone()
            t_sup = time.time()
            admin.execute(_NO_NOTIFY)
            try:
                suppressed = prober.phase(k_poll, gap=POLL)
            finally:
                admin.execute(original)
            notes_suppressed = notes_since(t_sup)
            t_back = time.time()
            restored = prober.phase(k_push, gap=0.3)
            notes_restored = notes_since(t_back, k_push)

        probes = 2 * k_push + kills + k_poll + k_push
        ((total, succeeded),) = rows(
            pg_url,
            "SELECT count(*), count(*) FILTER (WHERE state = 'succeeded') FROM conveyor_jobs",
        )
        fig.row("probe jobs enqueued", total, str(probes))
        fig.row("probe jobs succeeded", succeeded, str(probes))
        fig.row("lost jobs", total - succeeded, "0")
        for name, values in [
            ("before any fault", before),
            ("enqueued at the listener kill", at_kill),
            ("after the listener reconnected", after_kill),
            ("while notifications were suppressed (polling)", suppressed),
            ("after notifications were restored", restored),
        ]:
            fig.row(
                f"pickup latency {name}: p50 / max (ms)", f"{_ms(values, 0.5)} / {_ms(values, 1)}"
            )
        fig.row(
            "listener kill to new LISTEN connection: p50 / max (ms)",
            f"{_ms(detections, 0.5)} / {_ms(detections, 1)}",
        )
        fig.row("listener reconnections seen", len(detections), str(kills))
        fig.row("listener connections of the worker after the kills", listeners_after_kills, "1")
        fig.row(
            f"due notifications of the queue before ({k_push} probes)", notes_before, str(k_push)
        )
        fig.row("due notifications while suppressed", notes_suppressed, "0")
        fig.row(f"due notifications after restoring ({k_push} probes)", notes_restored, str(k_push))
        fig.note(
            f"A pickup is pushed when far quicker than the worker's {POLL:g} s poll interval; "
            "polling pickups are spread over it. Detection = backend_start of the worker's new "
            "listener connection minus the time of pg_terminate_backend."
        )

        assert total == probes and succeeded == probes
        assert len(detections) == kills and listeners_after_kills == 1
        assert (notes_before, notes_suppressed, notes_restored) == (k_push, 0, k_push)
        assert statistics.median(before) < PUSHED, before
        assert statistics.median(after_kill) < PUSHED, after_kill
        assert statistics.median(restored) < PUSHED, restored
        assert worker.proc.poll() is None
    finally:
        admin.close()
        app.close()
