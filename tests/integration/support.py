"""Helpers for the multi-process tests: polling, `conveyor` subprocesses, reading the records."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from conveyor import Conveyor, Job, JobState
from conveyor.backends.base import WorkerInfo

from .apps import Recorder

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.integration.apps:app"
_SCRIPT = Path(sys.executable).with_name("conveyor")
CONVEYOR = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "conveyor"]
POLL = "0.05"


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def subprocess_env(url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_DATABASE_URL"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"  # rich tables: no wrapped cells
    if url is not None:
        env["CONVEYOR_DATABASE_URL"] = url
    return env


def conveyor(
    *args: str, url: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run one ``conveyor`` command to completion (``url`` goes in $CONVEYOR_DATABASE_URL)."""
    return subprocess.run(
        [*CONVEYOR, *args],
        env=subprocess_env(url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def conveyor_many(
    commands: Sequence[Sequence[str]],
    timeout: float = 60,
    *,
    url: str | None = None,
    env: dict[str, str] | None = None,
) -> list[subprocess.CompletedProcess[str]]:
    """Run several ``conveyor`` commands at once (they are independent); results in order.
    ``url`` goes in $CONVEYOR_DATABASE_URL; ``env`` is added to the environment."""
    full_env = {**subprocess_env(url), **(env or {})}
    procs = [
        subprocess.Popen(
            [*CONVEYOR, *cmd],
            env=full_env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd in commands
    ]
    results = []
    try:
        for cmd, proc in zip(commands, procs, strict=True):
            out, err = proc.communicate(timeout=timeout)
            results.append(
                subprocess.CompletedProcess([*CONVEYOR, *cmd], proc.returncode, out, err)
            )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


class WorkerProcess:
    """A ``conveyor worker`` subprocess; its output goes to a log file (shown on failure)."""

    def __init__(
        self,
        url: str,
        log: Path,
        args: Sequence[str],
        *,
        app: str = APP,
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """``prefix`` goes before the command (e.g. ``ip netns exec host1``); ``env`` is added
        to the subprocess environment."""
        self.url = url
        self.log_path = log
        self.args = list(args)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*prefix, *CONVEYOR, "worker", "--app", app, *args],
                env={**subprocess_env(url), **(env or {})},
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.pid} still running {timeout:g} s later; log:\n{self.log()}"
            ) from None

    def info(self, app: Conveyor) -> WorkerInfo | None:
        """This process's row in the worker registry, if it registered."""
        return next((w for w in app.backend.worker_list() if w.pid == self.pid), None)

    def wait_registered(self, app: Conveyor, timeout: float = 20) -> WorkerInfo:
        def registered() -> WorkerInfo | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            return self.info(app)

        return wait_until(registered, timeout, f"worker {self.pid} to register")

    def stop_now(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@contextlib.contextmanager
def worker_processes(
    tmp_path: Path, *, app: str = APP, show: int | None = None, tail: int = 20_000
) -> Iterator[Callable[..., WorkerProcess]]:
    """``start(url, *worker_args, **options)`` starts a ``WorkerProcess`` (of ``app`` unless
    ``options`` name another) logging under ``tmp_path``. When the block ends every one is killed and the last ``tail`` characters of
    the logs of the last ``show`` started (all: None) are printed (shown when a test failed)."""
    started: list[WorkerProcess] = []

    def start(url: str, *args: str, **options: Any) -> WorkerProcess:
        log = tmp_path / f"worker-{len(started) + 1}.log"
        worker = WorkerProcess(url, log, args, **{"app": app, **options})
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.stop_now()
        for worker in started[-show if show else 0 :]:
            print(f"---- worker pid {worker.pid} {worker.args} (exit {worker.proc.returncode})")
            print(worker.log()[-tail:])


def worker_args(
    *,
    queues: str | None = None,
    concurrency: int = 4,
    lease: float = 30,
    grace: float = 5,
    poll: str = POLL,
) -> list[str]:
    args = [
        "--concurrency",
        str(concurrency),
        "--lease",
        str(lease),
        "--grace",
        str(grace),
        "--poll-interval",
        poll,
    ]
    return [*args, "--queues", queues] if queues else args


def state_counts(app: Conveyor) -> Counter[str]:
    """Jobs per state, over every queue."""
    total: Counter[str] = Counter()
    for s in app.stats():
        total.update({k: v for k, v in s.counts.items() if v})
    return total


def wait_all_in(app: Conveyor, states: Iterable[JobState], n: int, timeout: float) -> Counter[str]:
    """Wait until ``n`` jobs are in ``states`` (and none elsewhere); returns the counts."""
    wanted = {str(s) for s in states}

    def done() -> Counter[str] | None:
        counts = state_counts(app)
        in_wanted = sum(v for k, v in counts.items() if k in wanted)
        return counts if in_wanted == n and sum(counts.values()) == n else None

    try:
        return wait_until(done, timeout, f"{n} jobs to be {sorted(wanted)}", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; counts now {dict(state_counts(app))}") from None


def jobs_by_id(app: Conveyor, ids: Iterable[int]) -> dict[int, Job]:
    return {i: app.get_job(i) for i in ids}


def rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Query the recording tables with a fresh connection."""
    rec = Recorder(url)
    try:
        return rec.execute(sql, params)
    finally:
        rec.close()


def wait_rows(
    url: str, sql: str, n: int, timeout: float = 20, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    """Poll the query until it returns at least ``n`` rows; returns them."""

    def enough() -> list[tuple[Any, ...]] | None:
        found = rows(url, sql, params)
        return found if len(found) >= n else None

    return wait_until(enough, timeout, f"{n} rows from {sql!r}")


def max_overlap(spans: Iterable[tuple[float, float]]) -> int:
    """The most intervals [start, end] open at one instant (an end before a start at a tie)."""
    events = sorted(
        [(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans],
        key=lambda e: (e[0], e[1]),
    )
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak
