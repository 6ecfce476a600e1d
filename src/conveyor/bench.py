"""``conveyor bench``: Conveyor's speed on this machine, by the method of ../shared/peerbench.

Phases, each on a fresh database (SQLite) or schema (PostgreSQL) that is removed afterwards:

* enqueue: the time of one ``enqueue_many`` call for N jobs, building the requests included;
* drain: N jobs pending (table ANALYZEd and CHECKPOINTed on PostgreSQL), P worker processes
  started; from the first job start to the first 10 ms poll that sees no unfinished job (the
  database is polled once every job has started; before, the execution logs are);
* latency: one idle worker process; rounds of single enqueues ``gap`` apart after 1 s idle;
  latency = job start minus the start of the enqueue call; p50 and p99;
* ceiling (``--ceiling`` only): N more jobs; two processes per worker process (a worker claims
  on one connection while it writes outcomes on another) that call the backend's claim and
  outcome methods back to back, with no event loop, no tasks and no job around them, until the
  queue is empty: about the most a worker could drain with this backend, database and machine.

The job records its id and a CLOCK_MONOTONIC timestamp with one O_APPEND write to a per-process
log, so counting executions adds no database load; ``executed_once`` is counted from those logs.
Worker processes import this module's ``app`` (``--app conveyor.bench:app``). They start as
an installed Conveyor's would: the package's modules are compiled to bytecode first, as pip does
at install (an editable install run with PYTHONDONTWRITEBYTECODE=1 would otherwise compile every
module again in every worker, about 100 ms of each start, inside the drain's first tenth).
"""

from __future__ import annotations

import compileall
import contextlib
import datetime as dt
import multiprocessing
import os
import queue
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from . import __version__
from .app import Conveyor, EnqueueRequest
from .backends.sqlite import path_from_url
from .bench_settings import BenchSettings
from .errors import ConfigurationError, ConveyorError
from .options import Options
from .states import succeed

URL_ENV = "CONVEYOR_BENCH_URL"
LOG_ENV = "CONVEYOR_BENCH_LOG"
QUEUE = "bench"
CEILING_QUEUE = "bench-ceiling"
TASK = "conveyor.bench.noop"

app = Conveyor(os.environ.get(URL_ENV) or os.environ.get("CONVEYOR_DATABASE_URL"))
_fd: int | None = None


@app.task(name=TASK, queue=QUEUE)
async def noop(n: int) -> None:
    record(n)


def record(n: int) -> None:
    """Append "n t_monotonic" to this process's execution log with one write."""
    global _fd
    t = time.monotonic()
    if _fd is None:
        path = f"{os.environ[LOG_ENV]}.{os.getpid()}"
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, b"%d %.6f\n" % (n, t))


# -- fresh database -----------------------------------------------------------------------------
@contextlib.contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """A URL for an empty database (SQLite) or schema (PostgreSQL), removed afterwards."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        folder = tempfile.mkdtemp(prefix="conveyor-bench-", dir=Path(path_from_url(url)).parent)
        try:
            yield f"sqlite:///{Path(folder) / 'bench.db'}"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    if scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(f"bench needs a sqlite:/// or postgresql:// URL, not {url!r}")
    import psycopg

    schema = f"conveyor_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


class _Probe:
    """A raw connection for the 10 ms "anything unfinished?" poll and table upkeep."""

    #: Is any job left unfinished? Three probes, each matching one partial index's predicate (the
    #: claim indexes and the running one), so the 10 ms poll never scans the table: a count over
    #: the whole table, as before, cost the server as much as a third of the drain itself.
    UNFINISHED = (
        "SELECT CAST(EXISTS (SELECT 1 FROM conveyor_jobs"
        "                 WHERE state IN ('queued', 'retrying') AND concurrency_key IS NULL)"
        "     OR EXISTS (SELECT 1 FROM conveyor_jobs"
        "                 WHERE state IN ('queued', 'retrying') AND concurrency_key IS NOT NULL)"
        "     OR EXISTS (SELECT 1 FROM conveyor_jobs WHERE state = 'running') AS INTEGER)"
    )

    def __init__(self, url: str) -> None:
        self.postgres = not url.startswith("sqlite")
        if self.postgres:
            import psycopg

            self.conn: Any = psycopg.connect(url, autocommit=True)
        else:
            self.conn = sqlite3.connect(path_from_url(url), isolation_level=None)

    def unfinished(self) -> int:
        """1 while any job is queued, retrying or running, else 0."""
        return int(self.conn.execute(self.UNFINISHED).fetchone()[0])

    def settle(self) -> None:
        """ANALYZE and CHECKPOINT, as peerbench does before a drain."""
        if self.postgres:
            self.conn.execute("ANALYZE conveyor_jobs")
            with contextlib.suppress(Exception):
                self.conn.execute("CHECKPOINT")
        else:
            self.conn.execute("ANALYZE")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def vacuum(self) -> None:
        """VACUUM the jobs table (PostgreSQL): the dead rows of earlier phases go."""
        if self.postgres:
            self.conn.execute("VACUUM conveyor_jobs")

    def close(self) -> None:
        self.conn.close()


# -- processes and logs -------------------------------------------------------------------------
def _compile_package() -> None:
    """Compile Conveyor's modules to bytecode where they are not yet (see the module's doc);
    nothing where the package cannot be written (an install has its bytecode already)."""
    with contextlib.suppress(OSError):
        compileall.compile_dir(Path(__file__).parent, quiet=2)


def _start_workers(
    url: str, log: str, s: BenchSettings, count: int
) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, URL_ENV: url, "CONVEYOR_DATABASE_URL": url, LOG_ENV: log}
    cmd = [
        sys.executable, "-m", "conveyor", "worker", "--app", "conveyor.bench:app",
        "--queues", QUEUE, "--concurrency", str(s.concurrency), "--batch-size", str(s.batch_size),
        "--poll-interval", str(s.poll_interval), "--log-level", "WARNING",
    ]  # fmt: skip
    return [subprocess.Popen(cmd, env=env) for _ in range(count)]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _executions(log: str) -> list[tuple[int, float]]:
    return _ExecutionLog(log).rows()


class _ExecutionLog:
    """The workers' execution logs (``log.<pid>``: "n t" lines), read incrementally: each call
    reads only what was appended since the last, so polling it is cheap all through a drain."""

    def __init__(self, log: str) -> None:
        self.folder, self.prefix = os.path.split(log)
        self.prefix += "."
        self._read: dict[str, int] = {}  # file: bytes read, up to its last complete line
        self._rows: list[tuple[int, float]] = []

    def rows(self) -> list[tuple[int, float]]:
        for name in os.listdir(self.folder):
            if name.startswith(self.prefix):
                self._read_new(os.path.join(self.folder, name))
        return self._rows

    def _read_new(self, path: str) -> None:
        with open(path, "rb") as f:
            f.seek(self._read.get(path, 0))
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line being written waits for the next read
        self._read[path] = self._read.get(path, 0) + len(complete)
        self._rows.extend(
            (int(a), float(b)) for a, b in (line.split() for line in complete.splitlines())
        )


def _wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise ConveyorError(f"bench: timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _requests(ids: range, queue: str = QUEUE) -> list[EnqueueRequest]:
    opts = Options(queue=queue)
    return [EnqueueRequest(TASK, (i,), {}, opts) for i in ids]


# -- phases -------------------------------------------------------------------------------------
def phase_enqueue(driver: Conveyor, n: int) -> float:
    t0 = time.monotonic()
    jobs = driver.enqueue_many(_requests(range(n)))
    elapsed = time.monotonic() - t0
    if len(jobs) != n:
        raise ConveyorError(f"bench: enqueued {len(jobs)} of {n} jobs")
    return n / elapsed


def _rss_mb(pid: int) -> float | None:
    """A process's resident set (Linux /proc), in MiB; None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class DrainResult:
    per_s: float
    #: Jobs/s in each tenth of the drain (by execution order): flat when claim cost does not
    #: grow as jobs finish.
    per_s_by_tenth: list[float]
    #: Worker RSS (MiB, summed over processes) sampled once a second: first, peak and last.
    rss_mb: dict[str, float]


def _by_tenth(times: list[float]) -> list[float]:
    times = sorted(times)
    n = len(times)
    if n < 20:
        return []
    rates = []
    for k in range(10):
        lo, hi = times[k * n // 10], times[min(n - 1, (k + 1) * n // 10)]
        rates.append(round((n // 10) / (hi - lo), 1) if hi > lo else 0.0)
    return rates


def phase_drain(url: str, log: str, s: BenchSettings) -> DrainResult:
    """Start the workers on the whole backlog; the drain ends when the database has no job left
    unfinished. As peerbench does, the wait polls the execution logs (cheap) until every job has
    started, and only then the database: a database probe every 10 ms all through the drain
    took CPU from the workers and the server (2 cores here), 10-15% of the drain rate."""
    probe = _Probe(url)
    samples: list[float] = []
    try:
        probe.settle()
        procs = _start_workers(url, log, s, s.processes)
        executions = _ExecutionLog(log)
        next_sample = time.monotonic() + 1.0

        def all_started() -> bool:
            nonlocal next_sample
            if time.monotonic() >= next_sample:
                next_sample += 1.0
                rss = [_rss_mb(p.pid) for p in procs]
                if all(r is not None for r in rss):
                    samples.append(sum(r for r in rss if r is not None))
            for p in procs:
                if p.poll() is not None:
                    raise ConveyorError(
                        f"bench: worker process {p.pid} exited with status {p.returncode} "
                        "during the drain"
                    )
            return len(executions.rows()) >= s.jobs

        try:
            _wait_for(all_started, 3600, "the drain's jobs to start", interval=0.01)
            _wait_for(lambda: probe.unfinished() == 0, 3600, "the drain", interval=0.01)
            t_end = time.monotonic()
        finally:
            _stop(procs)
    finally:
        probe.close()
    times = [t for _, t in executions.rows()]
    rss = (
        {
            "first": round(samples[0], 1),
            "peak": round(max(samples), 1),
            "last": round(samples[-1], 1),
        }
        if samples
        else {}
    )
    return DrainResult(s.jobs / (t_end - min(times)), _by_tenth(times), rss)


@dataclass
class LatencyResult:
    #: Pickup latencies, enqueue call to job start (ms), sorted.
    pickups: list[float]
    #: The enqueue calls alone (ms), sorted: the insert with its commit, which the pickup
    #: includes; what is left is the notification, the claim and the hand-over.
    enqueue_calls: list[float]
    #: Every execution logged so far, read once the worker has stopped.
    executions: list[tuple[int, float]]


def phase_latency(driver: Conveyor, url: str, log: str, s: BenchSettings) -> LatencyResult:
    """One idle worker; rounds of single enqueues (see the module's doc)."""
    base = s.jobs
    procs = _start_workers(url, log, s, 1)
    try:
        warm = base
        driver.enqueue_many(_requests(range(warm, warm + 1)))
        _wait_for(lambda: warm in {n for n, _ in _executions(log)}, 60, "the warm-up job")
        started: dict[int, float] = {}
        calls: list[float] = []
        next_id = warm + 1
        for _ in range(s.latency_rounds):
            time.sleep(1.0)  # the workload: let the worker go idle before each round
            t_next = time.monotonic()
            for _ in range(s.latency_jobs):
                started[next_id] = t0 = time.monotonic()
                driver.enqueue_many(_requests(range(next_id, next_id + 1)))
                calls.append((time.monotonic() - t0) * 1000)
                next_id += 1
                t_next += s.latency_gap
                if (pause := t_next - time.monotonic()) > 0:
                    time.sleep(pause)
        _wait_for(lambda: set(started) <= {n for n, _ in _executions(log)}, 60, "latency jobs")
    finally:
        _stop(procs)
    rows = _executions(log)
    ran = dict(rows)
    pickups = sorted((ran[n] - t) * 1000 for n, t in started.items())
    return LatencyResult(pickups, sorted(calls), rows)


def _ceiling_process(url: str, worker_id: str, batch_size: int, go: Any, out: Any) -> None:
    """One process of the ceiling phase: once connected, puts "ready" on ``out`` and waits for
    ``go``; then claims and succeeds jobs back to back until none is left, and puts (jobs
    claimed, outcomes applied) on ``out``."""
    driver = Conveyor(url)
    try:
        backend = driver.backend
        out.put("ready")
        go.wait()
        claimed = applied = 0
        while jobs := backend.job_fetch_available(worker_id, [CEILING_QUEUE], batch_size, 60.0):
            claimed += len(jobs)
            applied += len(backend.job_finish_many(worker_id, [succeed(j, "null") for j in jobs]))
        out.put((claimed, applied))
    finally:
        driver.close()


def _collect(out: Any, procs: list[Any], n: int, timeout: float, what: str) -> list[Any]:
    """``n`` messages from ``out``; ConveyorError as soon as a process failed, or after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    got: list[Any] = []
    while len(got) < n:
        with contextlib.suppress(queue.Empty):
            got.append(out.get(timeout=0.2))
            continue
        if any(p.exitcode not in (None, 0) for p in procs):
            raise ConveyorError(f"bench: a ceiling process failed {what} (see its traceback)")
        if time.monotonic() > deadline:
            raise ConveyorError(f"bench: the ceiling processes took over {timeout:g} s {what}")
    return got


def phase_ceiling(driver: Conveyor, url: str, s: BenchSettings) -> float:
    """Jobs/s of the ceiling phase (see the module's doc): from the moment every process is
    connected and ready until the last one finds the queue empty. Every job must be claimed and
    finished exactly once, or ConveyorError."""
    driver.enqueue_many(_requests(range(s.jobs), CEILING_QUEUE))
    probe = _Probe(url)
    try:
        probe.vacuum()  # as fresh as the drain's table
        probe.settle()
    finally:
        probe.close()
    ctx = multiprocessing.get_context("spawn")  # no fork of this process's pool threads
    go, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_ceiling_process,
            args=(url, f"bench-ceiling-{i}", s.batch_size, go, out),
            daemon=True,
        )
        for i in range(2 * s.processes)
    ]
    for p in procs:
        p.start()
    try:
        _collect(out, procs, len(procs), 120, "to get ready")
        t0 = time.monotonic()
        go.set()
        done: list[tuple[int, int]] = _collect(out, procs, len(procs), 3600, "to drain")
        elapsed = time.monotonic() - t0
    finally:
        go.set()  # none is left waiting
        for p in procs:
            p.join(timeout=15)
            if p.is_alive():
                p.kill()
    claimed, applied = sum(c for c, _ in done), sum(a for _, a in done)
    if claimed != s.jobs or applied != s.jobs:
        raise ConveyorError(
            f"bench: the ceiling phase claimed {claimed} and finished {applied} of {s.jobs} jobs"
        )
    return s.jobs / elapsed


def _percentile(values: list[float], p: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]
        if len(values) > 1
        else values[0]
    )


def run_bench(s: BenchSettings) -> dict[str, Any]:
    logdir = tempfile.mkdtemp(prefix="conveyor-bench-log-")
    log = os.path.join(logdir, "exec")
    _compile_package()
    try:
        with fresh_database(s.database) as url:
            driver = Conveyor(url)
            driver.migrate()
            enqueue_per_s = phase_enqueue(driver, s.jobs)
            drain = phase_drain(url, log, s)
            latency = phase_latency(driver, url, log, s)
            ceiling = phase_ceiling(driver, url, s) if s.ceiling else None
            counts = Counter(n for n, _ in latency.executions)
            driver.close()
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    expected = s.jobs + 1 + s.latency_jobs * s.latency_rounds
    executed_once = len(counts) == expected and set(counts.values()) == {1}
    return {
        "backend": "sqlite" if s.database.startswith("sqlite") else "postgres",
        "jobs": s.jobs,
        "processes": s.processes,
        "concurrency": s.concurrency,
        "enqueue_per_s": round(enqueue_per_s, 1),
        "drain_per_s": round(drain.per_s, 1),
        "drain_per_s_by_tenth": drain.per_s_by_tenth,
        "worker_rss_mb": drain.rss_mb,
        "latency_p50_ms": round(_percentile(latency.pickups, 50), 2),
        "latency_p99_ms": round(_percentile(latency.pickups, 99), 2),
        # of which the enqueue call (insert and commit): the rest is the queue's own pickup
        "enqueue_call_p50_ms": round(_percentile(latency.enqueue_calls, 50), 2),
        "enqueue_call_p99_ms": round(_percentile(latency.enqueue_calls, 99), 2),
        "executed_once": executed_once,
        # the backend's own claim and outcome calls, no worker (--ceiling; else None)
        "ceiling_per_s": None if ceiling is None else round(ceiling, 1),
        "executions": sum(counts.values()),
        "expected_executions": expected,
        "settings": {k: v for k, v in asdict(s).items() if k != "database"},
        "conveyor": __version__,
        "python": sys.version.split()[0],
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def format_result(result: dict[str, Any]) -> str:
    return (
        f"{result['backend']}: {result['jobs']} jobs, {result['processes']} worker process(es) x "
        f"{result['concurrency']}\n"
        f"  enqueue  {result['enqueue_per_s']:>10,.0f} jobs/s\n"
        f"  drain    {result['drain_per_s']:>10,.0f} jobs/s"
        f" (by tenth: {', '.join(f'{r:,.0f}' for r in result['drain_per_s_by_tenth'])})\n"
        f"  worker RSS (MiB): {result['worker_rss_mb'] or 'drain under 1 s, not sampled'}\n"
        f"  pickup   p50 {result['latency_p50_ms']:.2f} ms, p99 {result['latency_p99_ms']:.2f} ms"
        f" (the enqueue call alone: p50 {result['enqueue_call_p50_ms']:.2f} ms,"
        f" p99 {result['enqueue_call_p99_ms']:.2f} ms)\n"
        f"  executed exactly once: {result['executed_once']} "
        f"({result['executions']}/{result['expected_executions']})"
        + (
            ""
            if result["ceiling_per_s"] is None
            else f"\n  ceiling  {result['ceiling_per_s']:>10,.0f} jobs/s"
            " (the backend's claim and outcome calls alone, no worker)"
        )
    )


__all__ = ["BenchSettings", "app", "format_result", "run_bench"]
