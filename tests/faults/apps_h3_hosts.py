"""The task of the several-hosts scenario (8): ``--app tests.faults.apps_h3_hosts:app``.

``faults.host_work(ms)`` is ``faults.work`` with its execution log written over the host's second
link (``$CONVEYOR_H3_LOG_URL``), which the test never cuts: the log is the observer, not part of
the system under test, so it keeps recording, with the time each run really started and ended,
while the host's worker is cut off from the database.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from conveyor import current_job
from tests.integration.apps import Recorder

from .apps import app

__all__ = ["app", "host_work"]

_local = threading.local()


def _log(sql: str, params: tuple[Any, ...]) -> None:
    rec: Recorder | None = getattr(_local, "rec", None)
    if rec is None:
        rec = _local.rec = Recorder(os.environ["CONVEYOR_H3_LOG_URL"])
    rec.execute(sql, params)


@app.task(name="faults.host_work", max_attempts=20)
def host_work(ms: float) -> int:
    """Log the run's start, sleep ``ms`` milliseconds, log its end; return the attempt."""
    ctx = current_job()
    job = ctx.job
    _log(
        "INSERT INTO exec_log (job_id, attempt, worker, pid, t_start) VALUES (?, ?, ?, ?, ?)",
        (job.id, job.attempt, ctx.worker_id, os.getpid(), time.time()),
    )
    time.sleep(ms / 1000)
    _log(
        "UPDATE exec_log SET t_end = ? WHERE job_id = ? AND attempt = ? AND pid = ?",
        (time.time(), job.id, job.attempt, os.getpid()),
    )
    return job.attempt
