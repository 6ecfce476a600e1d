"""`conveyor bench` at a small size: it runs, prints one JSON object, and counts exactly-once."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import Conveyor, bench
from conveyor.bench import BenchSettings, _by_tenth, _ExecutionLog, fresh_database, run_bench
from conveyor.errors import ConfigurationError, ConveyorError

from .support import conveyor

KEYS = {"backend", "jobs", "enqueue_per_s", "drain_per_s", "latency_p50_ms", "latency_p99_ms",
        "enqueue_call_p50_ms", "enqueue_call_p99_ms", "executed_once", "settings"}  # fmt: skip


def test_bench_command_prints_one_json_object(db_url: str) -> None:
    """600 jobs: enough for the bulk enqueue's COPY path on PostgreSQL."""
    base = db_url.split("?")[0] if db_url.startswith("postgres") else db_url
    done = conveyor(
        "bench", "--database", base, "--jobs", "600", "--processes", "2", "--concurrency", "20",
        "--latency-jobs", "10", "--latency-rounds", "1", "--ceiling", "--json", timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert set(result) >= KEYS
    assert result["jobs"] == 600 and result["settings"]["processes"] == 2
    assert result["executed_once"] is True
    assert result["executions"] == result["expected_executions"] == 600 + 1 + 10
    assert result["drain_per_s"] > 0 and result["enqueue_per_s"] > 0
    assert 0 < result["latency_p50_ms"] <= result["latency_p99_ms"]
    # the enqueue call is part of each pickup (an enqueue is the pickup's start)
    assert 0 < result["enqueue_call_p50_ms"] <= result["enqueue_call_p99_ms"]
    assert result["enqueue_call_p50_ms"] < result["latency_p99_ms"]
    assert len(result["drain_per_s_by_tenth"]) == 10
    assert all(rate >= 0 for rate in result["drain_per_s_by_tenth"])
    assert result["ceiling_per_s"] > 0 and result["settings"]["ceiling"] is True


def test_drain_rate_by_tenth_splits_the_execution_times_in_ten() -> None:
    # 100 executions: the first half 1 ms apart, the second half 2 ms apart.
    times = [i * 0.001 for i in range(50)] + [0.05 + i * 0.002 for i in range(50)]
    rates = _by_tenth(times)
    assert len(rates) == 10
    assert rates[0] == pytest.approx(1000, rel=0.01)
    assert rates[-1] == pytest.approx(10 / 0.018, rel=0.01)  # last tenth: 9 gaps of 2 ms
    assert _by_tenth(times[:10]) == []


def test_fresh_database_is_used_and_removed_afterwards(sqlite_url: str) -> None:
    with fresh_database(sqlite_url) as url:
        path = Path(url.removeprefix("sqlite:///"))
        assert url != sqlite_url
        path.write_text("scratch")
    assert not path.exists()


def test_bench_refuses_other_databases() -> None:
    with pytest.raises(ConfigurationError, match="bench needs"):
        run_bench(BenchSettings(database="mysql://x/y"))


def test_the_drain_polls_the_database_only_once_every_job_has_started(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """peerbench's method: the drain's wait reads the execution logs, and asks the database
    whether jobs are left only once each has started (a probe every 10 ms throughout took CPU
    from the workers and the server). The probe's calls and the jobs' starts share a clock
    (CLOCK_MONOTONIC)."""
    probed: list[float] = []
    started: list[float] = []
    unfinished, by_tenth = bench._Probe.unfinished, bench._by_tenth

    def probe(self: bench._Probe) -> int:
        probed.append(time.monotonic())
        return unfinished(self)

    def tenths(times: list[float]) -> list[float]:  # called with the drain's start times
        started.extend(times)
        return by_tenth(times)

    monkeypatch.setattr(bench._Probe, "unfinished", probe)
    monkeypatch.setattr(bench, "_by_tenth", tenths)
    base = db_url.split("?")[0] if db_url.startswith("postgres") else db_url
    settings = BenchSettings(base, jobs=300, concurrency=20, latency_jobs=3, latency_rounds=1)
    result = run_bench(settings)
    assert result["executed_once"] is True
    assert len(started) == 300 and probed
    assert min(probed) >= max(started)


def test_the_execution_log_is_read_incrementally(tmp_path: Path) -> None:
    """Each read takes what was appended since the last; a line still being written (no newline
    yet) waits for the next read; every process's file counts."""
    log = _ExecutionLog(str(tmp_path / "exec"))
    first, second = tmp_path / "exec.101", tmp_path / "exec.102"
    first.write_bytes(b"1 10.5\n2 10.75\n3 1")
    (tmp_path / "other.101").write_bytes(b"9 9.0\n")  # not an execution log
    assert log.rows() == [(1, 10.5), (2, 10.75)]
    with first.open("ab") as f:
        f.write(b"1.25\n")
    second.write_bytes(b"4 12.0\n")
    assert sorted(log.rows()) == [(1, 10.5), (2, 10.75), (3, 11.25), (4, 12.0)]
    assert len(log.rows()) == 4  # nothing read twice


def test_a_worker_that_exits_during_the_drain_ends_the_bench_at_once(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain does not wait out its timeout for jobs that no worker is left to run."""

    def doomed(*args: object) -> list[subprocess.Popen[bytes]]:
        return [subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])]

    monkeypatch.setattr(bench, "_start_workers", doomed)
    with fresh_database(sqlite_url) as url:
        driver = Conveyor(url)
        driver.migrate()
        bench.phase_enqueue(driver, 5)
        driver.close()
        started = time.monotonic()
        with pytest.raises(ConveyorError, match=r"exited with status 3 during the drain"):
            bench.phase_drain(url, str(tmp_path / "exec"), BenchSettings(url, jobs=5))
    assert time.monotonic() - started < 30


def test_the_ceiling_claims_and_finishes_every_job_exactly_once(db_url: str) -> None:
    """Four processes (two per worker process) claim and succeed the ceiling's jobs, and nothing
    else: each job once (attempt 1), none left; the drain's queue is not touched."""
    base = db_url.split("?")[0] if db_url.startswith("postgres") else db_url
    with fresh_database(base) as url:
        driver = Conveyor(url)
        driver.migrate()
        other = driver.enqueue_many(bench._requests(range(3)))
        settings = BenchSettings(url, jobs=400, processes=2, batch_size=25)
        assert bench.phase_ceiling(driver, url, settings) > 0
        jobs = driver.list_jobs(queue=bench.CEILING_QUEUE, limit=1000)
        assert len(jobs) == 400
        assert {(j.state, j.attempt) for j in jobs} == {("succeeded", 1)}
        assert {j.lease_owner for j in jobs} == {None}
        assert {driver.get_job(j.id).state for j in other} == {"queued"}
        driver.close()


def test_the_ceiling_counts_what_its_processes_took(sqlite_url: str) -> None:
    """The rate stands only if the processes claimed and finished exactly the phase's jobs: five
    more in its queue (enqueued before it) make it an error, not a rate."""
    with fresh_database(sqlite_url) as url:
        driver = Conveyor(url)
        driver.migrate()
        driver.enqueue_many(bench._requests(range(5), bench.CEILING_QUEUE))
        with pytest.raises(ConveyorError, match="claimed 25 and finished 25 of 20 jobs"):
            bench.phase_ceiling(driver, url, BenchSettings(url, jobs=20, batch_size=5))
        driver.close()


def test_waiting_on_ceiling_processes_ends_when_one_fails_or_time_runs_out() -> None:
    """The phase never waits blindly: a process that exited with an error ends the wait at once,
    naming the stage, and so does the deadline; messages are collected until then."""

    class Proc:
        def __init__(self, exitcode: int | None) -> None:
            self.exitcode = exitcode

    out: queue.Queue[Any] = queue.Queue()
    out.put("ready")
    started = time.monotonic()
    with pytest.raises(ConveyorError, match="a ceiling process failed to get ready"):
        bench._collect(out, [Proc(None), Proc(1)], 2, 60, "to get ready")
    assert time.monotonic() - started < 5
    with pytest.raises(ConveyorError, match=r"took over 0\.3 s to drain"):
        bench._collect(out, [Proc(None)], 1, 0.3, "to drain")
    out.put((3, 3))
    assert bench._collect(out, [Proc(0)], 1, 5, "to drain") == [(3, 3)]
