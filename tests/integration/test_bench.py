"""`conveyor bench` at a small size: it runs, prints one JSON object, and counts exactly-once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conveyor.bench import BenchSettings, _by_tenth, fresh_database, run_bench
from conveyor.errors import ConfigurationError

from .support import conveyor

KEYS = {"backend", "jobs", "enqueue_per_s", "drain_per_s", "latency_p50_ms", "latency_p99_ms",
        "enqueue_call_p50_ms", "enqueue_call_p99_ms", "executed_once", "settings"}  # fmt: skip


def test_bench_command_prints_one_json_object(db_url: str) -> None:
    """600 jobs: enough for the bulk enqueue's COPY path on PostgreSQL."""
    base = db_url.split("?")[0] if db_url.startswith("postgres") else db_url
    done = conveyor(
        "bench", "--database", base, "--jobs", "600", "--processes", "2", "--concurrency", "20",
        "--latency-jobs", "10", "--latency-rounds", "1", "--json", timeout=120,
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
