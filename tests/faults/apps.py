"""Tasks that the fault scenarios' worker subprocesses run (``--app tests.faults.apps:app``).

Every run of a task is logged in ``exec_log`` of the app's own database (the SQLite file, or the
PostgreSQL schema named by the URL's search_path): one row inserted when the run *starts*, its
``t_end`` filled in when it *ends*. A run cut short by a kill keeps ``t_end`` NULL. Times are
``time.time()`` (one wall clock for every process and network namespace on the machine).

A scenario that needs tasks of its own puts them in a module that imports ``app`` from here and
starts its workers with ``--app tests.faults.<module>:app``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from conveyor import Conveyor, current_job
from tests.integration.apps import Recorder, thread_db

app = Conveyor()

TABLES = (
    "CREATE TABLE IF NOT EXISTS exec_log (job_id bigint, attempt integer, worker text,"
    " pid integer, t_start double precision, t_end double precision)",
)


def create_tables(url: str) -> None:
    rec = Recorder(url)
    try:
        for statement in TABLES:
            rec.execute(statement)
    finally:
        rec.close()


def _db(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run SQL on this thread's own recorder connection to the worker's database."""
    return thread_db(app.url, sql, params)


def log_start() -> None:
    ctx = current_job()
    job = ctx.job
    _db(
        "INSERT INTO exec_log (job_id, attempt, worker, pid, t_start) VALUES (?, ?, ?, ?, ?)",
        (job.id, job.attempt, ctx.worker_id, os.getpid(), time.time()),
    )


def log_end() -> None:
    job = current_job().job
    _db(
        "UPDATE exec_log SET t_end = ? WHERE job_id = ? AND attempt = ? AND pid = ?",
        (time.time(), job.id, job.attempt, os.getpid()),
    )


@app.task(name="faults.work")
def work(ms: float) -> int:
    """Log the run, sleep ``ms`` milliseconds (a blocking call), log its end."""
    log_start()
    time.sleep(ms / 1000)
    log_end()
    return current_job().job.attempt


@app.task(name="faults.work_async")
async def work_async(ms: float) -> int:
    """As ``work``, for an async task."""
    await asyncio.to_thread(log_start)  # to_thread copies the context: current_job()
    await asyncio.sleep(ms / 1000)
    await asyncio.to_thread(log_end)
    return current_job().job.attempt


@app.task(name="faults.poison")
def poison() -> None:
    """Log the run, then take the whole worker process down (no cleanup, no outcome)."""
    log_start()
    os._exit(13)
