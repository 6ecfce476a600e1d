"""Tasks that the integration tests' worker subprocesses run (``--app tests.integration.apps:app``).

The app's database URL is ``$CONVEYOR_DATABASE_URL`` (the Conveyor default). Every task records
what it did in plain tables of that same database (the SQLite file, or the PostgreSQL schema
named by the URL's search_path), so the test process can check what really ran, where and when:

* ``executions (job_id, attempt, pid)``: one row per completed run of ``record``/``record_async``.
* ``spans (grp, job_id, pid, t_start, t_end)``: one row per run of ``span``/``setup_step``, timed
  with ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process on the machine).
* ``starts (job_id, attempt, pid)``: written as ``hang_first``/``hang_first_async`` *start*, so a
  test knows a job is running before it kills or stops its worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from typing import Any

from conveyor import Conveyor, current_job

app = Conveyor()
app.queue("setup", concurrency=1)

TABLES = (
    "CREATE TABLE IF NOT EXISTS executions (job_id bigint, attempt integer, pid integer)",
    "CREATE TABLE IF NOT EXISTS spans (grp text, job_id bigint, pid integer,"
    " t_start double precision, t_end double precision)",
    "CREATE TABLE IF NOT EXISTS starts (job_id bigint, attempt integer, pid integer)",
)


class Recorder:
    """One plain connection (autocommit) to a Conveyor database URL, outside Conveyor's code.

    SQL uses ``?`` placeholders; they become ``%s`` for PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.postgres = not url.startswith("sqlite:")
        self.conn: Any
        if self.postgres:
            import psycopg

            self.conn = psycopg.connect(url, autocommit=True)
        else:
            from conveyor.backends.sqlite import path_from_url

            self.conn = sqlite3.connect(path_from_url(url), timeout=60, isolation_level=None)

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.postgres:
            cur = self.conn.execute(sql.replace("?", "%s"), params)
            return list(cur.fetchall()) if cur.description else []
        return list(self.conn.execute(sql, params).fetchall())

    def close(self) -> None:
        self.conn.close()


def create_tables(url: str) -> None:
    rec = Recorder(url)
    try:
        for statement in TABLES:
            rec.execute(statement)
    finally:
        rec.close()


_local = threading.local()


def thread_db(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run SQL on this thread's own recorder connection to ``url``. A failed statement drops
    the connection (e.g. after a database restart): the next call reconnects."""
    recorders: dict[str, Recorder] = _local.__dict__.setdefault("recorders", {})
    rec = recorders.get(url)
    if rec is None:
        rec = recorders[url] = Recorder(url)
    try:
        return rec.execute(sql, params)
    except Exception:
        del recorders[url]
        with contextlib.suppress(Exception):
            rec.close()
        raise


def _db(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run SQL on this thread's recorder for the worker's own database."""
    return thread_db(app.url, sql, params)


def _insert_execution() -> None:
    job = current_job().job
    _db("INSERT INTO executions VALUES (?, ?, ?)", (job.id, job.attempt, os.getpid()))


# -- exactly-once ---------------------------------------------------------------------------------
@app.task(name="it.record")
def record(n: int) -> int:
    _insert_execution()
    return n


@app.task(name="it.record_async")
async def record_async(n: int) -> int:
    await asyncio.to_thread(_insert_execution)  # to_thread copies the context: current_job()
    return n


# -- concurrency limits ---------------------------------------------------------------------------
def _span(group: str, seconds: float) -> None:
    job = current_job().job
    start = time.monotonic()
    time.sleep(seconds)
    end = time.monotonic()
    _db("INSERT INTO spans VALUES (?, ?, ?, ?, ?)", (group, job.id, os.getpid(), start, end))


@app.task(name="it.span")
def span(seconds: float) -> None:
    """Record this run's [start, end] under its concurrency key."""
    key = current_job().job.concurrency_key
    _span(f"key:{key}", seconds)


@app.task(name="it.setup_step", queue="setup")
def setup_step(seconds: float) -> None:
    """A job of the ``setup`` queue (declared above with concurrency=1)."""
    _span("queue:setup", seconds)


# -- crash and shutdown ---------------------------------------------------------------------------
def _announce_start() -> int:
    """Record that this run started; return how many runs of this job have started so far."""
    job = current_job().job
    _db("INSERT INTO starts VALUES (?, ?, ?)", (job.id, job.attempt, os.getpid()))
    return int(_db("SELECT count(*) FROM starts WHERE job_id = ?", (job.id,))[0][0])


@app.task(name="it.hang_first")
def hang_first(seconds: float) -> int:
    """Sleep ``seconds`` on the job's first run only (ignoring cancellation, like a stubborn
    blocking call); later runs return at once. Returns the run number."""
    runs = _announce_start()
    if runs == 1:
        time.sleep(seconds)
    return runs


@app.task(name="it.hang_first_async")
async def hang_first_async(seconds: float) -> int:
    """As ``hang_first``, for an async task (cancelled when its worker gives it up)."""
    runs = await asyncio.to_thread(_announce_start)
    if runs == 1:
        await asyncio.sleep(seconds)
    return runs
