"""``conveyor bench``'s settings and their defaults, apart from ``bench`` itself: the CLI shows
these defaults in its options without importing the benchmark (whose module builds the workers'
app when imported)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchSettings:
    database: str
    jobs: int = 20_000
    processes: int = 1
    #: Each worker's slots: no-op jobs need enough for two claims in flight.
    concurrency: int = 2000
    batch_size: int = 1000
    poll_interval: float = 0.05
    latency_jobs: int = 200
    latency_rounds: int = 3
    latency_gap: float = 0.02
    #: Also measure the ceiling: the backend's claim and outcome calls alone (see bench.py).
    ceiling: bool = False
