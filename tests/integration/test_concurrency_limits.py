"""Fleet-wide limits across processes: per concurrency_key, and per declared queue.

Each run records [start, end] from CLOCK_MONOTONIC (one clock for every process), inside the
task: a sub-interval of the time its job was ``running`` in the database. The highest overlap of
those intervals is therefore a lower bound on the real concurrency: it must reach the limit (the
test is able to see concurrency) and never pass it.
"""

from __future__ import annotations

from collections import defaultdict

from conveyor import Conveyor, JobState

from . import apps
from .conftest import StartWorker
from .support import max_overlap, rows, wait_all_in, worker_args

SINGLE_KEYS = ("tenant-a", "tenant-b", "tenant-c")  # default concurrency_limit=1
PAIR_KEY = "tenant-pair"  # concurrency_limit=2


def test_limits_hold_fleet_wide_and_are_reached(
    app: Conveyor, url: str, start_worker: StartWorker
) -> None:
    workers = [start_worker(*worker_args(concurrency=4)) for _ in range(2)]
    for w in workers:
        w.wait_registered(app)

    requests = []
    for _ in range(8):  # interleaved, so every key has work waiting at once
        for key in SINGLE_KEYS:
            requests.append(apps.span.options(concurrency_key=key).request(0.05))
        requests.append(apps.setup_step.request(0.05))
    for _ in range(12):
        requests.append(
            apps.span.options(concurrency_key=PAIR_KEY, concurrency_limit=2).request(0.2)
        )
    jobs = app.enqueue_many(requests)
    assert {j.queue for j in jobs} == {"default", "setup"}

    wait_all_in(app, [JobState.SUCCEEDED], len(jobs), timeout=45)

    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    pids = set()
    recorded = rows(url, "SELECT grp, job_id, pid, t_start, t_end FROM spans")
    for group, _job_id, pid, start, end in recorded:
        spans[group].append((start, end))
        pids.add(pid)
    assert sorted(job_id for _, job_id, *_ in recorded) == sorted(j.id for j in jobs)
    assert pids == {w.pid for w in workers}, "both processes should have run limited jobs"

    peaks = {group: max_overlap(s) for group, s in spans.items()}
    assert peaks == {
        "key:tenant-a": 1,
        "key:tenant-b": 1,
        "key:tenant-c": 1,
        f"key:{PAIR_KEY}": 2,
        "queue:setup": 1,
    }
    # Different keys did run side by side: the limits are per key, not global.
    everything = [s for group in spans.values() for s in group]
    assert max_overlap(everything) >= 4
    assert {s.queue: s.concurrency_limit for s in app.stats()}["setup"] == 1
