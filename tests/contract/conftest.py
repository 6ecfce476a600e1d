"""Helpers shared by the contract suite: direct SQL on the app's database (to inspect rows or break
invariants on purpose), polling with a timeout instead of sleeps, and a second empty database of
the same backend."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pytest

from conveyor import Conveyor, Job, JobNotFoundError, Worker
from conveyor.pipelines import BatchNotFoundError, PipelineNotFoundError

WORKER = "worker-a"


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(delay)  # polling interval only; the predicate is what synchronises
        delay = min(delay * 2, 0.02)


@contextmanager
def running_worker(app: Conveyor, **options: Any) -> Iterator[Worker]:
    """A real worker running in a background thread (its own event loop) until the block ends."""
    worker = Worker(app, **options)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(worker.run())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-worker")
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the worker did not stop"
        assert not errors, errors


def together(*actions: Callable[[], Any]) -> None:
    """Run the actions in threads released at the same instant; re-raise their errors."""
    start = threading.Barrier(len(actions))
    errors: list[BaseException] = []

    def run(action: Callable[[], Any]) -> None:
        try:
            start.wait(timeout=10)
            action()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in actions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors


def _found(lookup: Callable[[int], Any], id: int, missing: type[Exception]) -> bool:
    try:
        lookup(id)
    except missing:
        return False
    return True


def job_exists(app: Conveyor, job_id: int) -> bool:
    return _found(app.get_job, job_id, JobNotFoundError)


def pipeline_exists(app: Conveyor, pipeline_id: int) -> bool:
    return _found(app.get_pipeline, pipeline_id, PipelineNotFoundError)


def batch_exists(app: Conveyor, batch_id: int) -> bool:
    return _found(app.get_batch, batch_id, BatchNotFoundError)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def explain_everything(conn: Any, **settings: str) -> list[str]:
    """PostgreSQL: from now on, the plan of every statement ``conn`` runs, nested ones too (in
    functions and triggers), is appended to the returned list (auto_explain, as notices).
    ``settings`` are SET on the session as well (e.g. ``jit="on"``)."""
    plans: list[str] = []
    conn.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    explain = {
        "auto_explain.log_min_duration": "0",
        "auto_explain.log_nested_statements": "on",
        "auto_explain.log_level": "notice",
    }
    for setting, value in {**settings, **explain}.items():
        conn.execute(f"SET {setting} = {value}")
    return plans


def claim_one(
    app: Conveyor, worker: str = WORKER, queue: str = "default", lease: float = 30.0
) -> Job:
    jobs = app.backend.job_fetch_available(worker, [queue], 1, lease)
    assert len(jobs) == 1, f"expected to claim one job, got {jobs}"
    return jobs[0]


def past_lease(job: Job, seconds: float = 1.0) -> datetime:
    """A time just after the job's lease ran out (to hand to the rescuer as ``now``)."""
    assert job.lease_expires_at is not None
    return job.lease_expires_at + timedelta(seconds=seconds)


class RawDB:
    """Direct SQL on an app's database, bypassing Conveyor. Queries use ``%s`` placeholders on
    both backends; times are passed through :meth:`ts`."""

    def __init__(self, app: Conveyor) -> None:
        self.sqlite = app.backend.name == "sqlite"
        if self.sqlite:
            path = app.backend.path  # type: ignore[attr-defined]
            self.conn: Any = sqlite3.connect(path, isolation_level=None, timeout=10)
        else:
            import psycopg

            self.conn = psycopg.connect(app.url, autocommit=True)
        #: The exception a violated constraint raises on this backend.
        self.integrity_error: type[Exception]
        if self.sqlite:
            self.integrity_error = sqlite3.IntegrityError
        else:
            import psycopg

            self.integrity_error = psycopg.errors.IntegrityError
        self.true = "1" if self.sqlite else "true"

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.sqlite:
            sql = sql.replace("%s", "?")
        cur = self.conn.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []

    def scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self.execute(sql, params)[0][0]

    def ts(self, value: datetime) -> Any:
        return value.timestamp() if self.sqlite else value

    def count_jobs(self, where: str = "TRUE", params: tuple[Any, ...] = ()) -> int:
        return int(self.scalar(f"SELECT count(*) FROM conveyor_jobs WHERE {where}", params))

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def other_app(app: Conveyor) -> Iterator[Conveyor]:
    """A second app on the same database: another process's connections."""
    other = Conveyor(app.url)
    yield other
    other.close()


@pytest.fixture
def raw(app: Conveyor) -> Iterator[RawDB]:
    db = RawDB(app)
    yield db
    db.close()


def _with_search_path(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"]
    query.append(("options", f"-csearch_path={schema}"))
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


@pytest.fixture
def other_db_url(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A second empty database of the same backend as ``db_url``."""
    if is_sqlite(db_url):
        yield f"sqlite:///{tmp_path / f'other-{uuid.uuid4().hex[:8]}.db'}"
        return
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    base = urlunsplit(urlsplit(db_url)._replace(query=""))
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield _with_search_path(db_url, schema)
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
