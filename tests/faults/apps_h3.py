"""The producer of the SQLite storm (scenario 7): a separate process that enqueues while the
workers run and get killed.

``python -m tests.faults.apps_h3 N SEED`` enqueues N jobs, ``faults.work`` (sync) and
``faults.work_async`` in turn, on
$CONVEYOR_DATABASE_URL in small batches (1 to 40 jobs, a few milliseconds apart), printing one
line ``ids 12,13,...`` per batch as soon as its enqueue returned, then ``done N``. It catches
nothing: an error of the library (``database is locked`` included) ends it with a traceback and a
non-zero exit status, which the test reads.
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any

from conveyor.app import BoundTask

from .apps import app, work, work_async

#: Attempts enough that no job dies of the kills alone (each kill costs its jobs one attempt).
MAX_ATTEMPTS = 50


def produce(n: int, seed: int) -> None:
    rnd = random.Random(seed)
    tasks: list[BoundTask[..., Any]] = [
        work.options(max_attempts=MAX_ATTEMPTS),
        work_async.options(max_attempts=MAX_ATTEMPTS),
    ]
    made = 0
    while made < n:
        batch = min(n - made, rnd.randint(1, 40))
        requests = [tasks[(made + i) % 2].request(rnd.randint(1, 15)) for i in range(batch)]
        jobs = app.enqueue_many(requests)
        made += len(jobs)
        print("ids " + ",".join(str(j.id) for j in jobs), flush=True)
        time.sleep(rnd.uniform(0.0, 0.01))
    print(f"done {made}", flush=True)


if __name__ == "__main__":
    produce(int(sys.argv[1]), int(sys.argv[2]))
