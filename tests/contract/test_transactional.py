"""Transactional enqueue: with ``connection=`` the job (or a pipeline and its first job, or a batch
and its jobs) is written inside the caller's open transaction on their own sqlite3 / psycopg
connection, never committed by Conveyor, so it exists only if the caller commits. Without it, a
batch is still all or nothing."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from conveyor import ConfigurationError, Conveyor, InvalidArgumentsError, JobState
from conveyor.backends.base import NewJob
from conveyor.backends.postgres.bulk import COPY_MIN
from conveyor.pipelines import BatchNotFoundError

from .conftest import RawDB, job_exists, pipeline_exists


@pytest.fixture
def conn(app: Conveyor) -> Iterator[Any]:
    """The caller's own connection to the app's database, outside autocommit."""
    if app.backend.name == "sqlite":
        connection: Any = sqlite3.connect(app.backend.path, timeout=10)  # type: ignore[attr-defined]
    else:
        import psycopg

        connection = psycopg.connect(app.url)
    connection.execute("CREATE TABLE IF NOT EXISTS orders (id integer PRIMARY KEY, item text)")
    connection.commit()
    yield connection
    connection.rollback()
    connection.close()


def _in_transaction(connection: Any) -> bool:
    if isinstance(connection, sqlite3.Connection):
        return connection.in_transaction
    from psycopg.pq import TransactionStatus

    return bool(connection.info.transaction_status == TransactionStatus.INTRANS)


def _task(app: Conveyor) -> Any:
    @app.task(name="tx.ship")
    def ship(order: int) -> int:
        return order

    return ship


def test_job_exists_only_once_the_caller_commits(app: Conveyor, conn: Any, raw: RawDB) -> None:
    ship = _task(app)
    conn.execute("INSERT INTO orders (id, item) VALUES (1, 'book')")
    job = ship.enqueue(1, connection=conn)

    assert job.id > 0 and job.args == [1]
    assert _in_transaction(conn), "Conveyor must not commit the caller's transaction"
    assert not job_exists(app, job.id), "visible before the caller committed"
    assert raw.count_jobs() == 0

    conn.commit()

    assert app.get_job(job.id).args == [1]
    assert raw.count_jobs() == 1
    assert raw.scalar("SELECT count(*) FROM orders") == 1


def test_rollback_leaves_neither_the_job_nor_the_callers_writes(
    app: Conveyor, conn: Any, raw: RawDB
) -> None:
    ship = _task(app)
    kept = ship.enqueue(0)  # an earlier job, outside the transaction
    conn.execute("INSERT INTO orders (id, item) VALUES (2, 'lamp')")
    jobs = app.enqueue_many([ship.request(2), ship.request(3)], connection=conn)
    assert len(jobs) == 2

    conn.rollback()

    assert raw.count_jobs() == 1
    assert raw.scalar("SELECT count(*) FROM orders") == 0
    for job in jobs:
        assert not job_exists(app, job.id)
    assert app.get_job(kept.id) == kept
    # the app works normally afterwards (SQLite may reuse the rolled-back ids: they never existed)
    later = ship.enqueue(4)
    assert app.get_job(later.id).args == [4]
    assert raw.count_jobs() == 2


def test_a_large_batch_is_rolled_back_with_the_callers_transaction(
    app: Conveyor, conn: Any, raw: RawDB
) -> None:
    """A batch large enough for PostgreSQL's COPY path (ids taken, then COPY) is still inside
    the caller's transaction: rolled back with it, or committed with it."""
    ship = _task(app)
    size = COPY_MIN + 1
    jobs = app.enqueue_many([ship.request(i) for i in range(size)], connection=conn)
    assert len(jobs) == size and _in_transaction(conn)
    conn.rollback()
    assert raw.count_jobs() == 0
    jobs = app.enqueue_many([ship.request(i) for i in range(size)], connection=conn)
    conn.commit()
    assert raw.count_jobs() == size
    assert app.get_job(jobs[-1].id) == jobs[-1]


def test_dedupe_inside_the_callers_transaction(app: Conveyor, conn: Any, raw: RawDB) -> None:
    ship = _task(app)
    first = ship.options(unique_key="order-5").enqueue(5, connection=conn)
    again = ship.options(unique_key="order-5").enqueue(5, connection=conn)
    assert again.deduplicated and again.id == first.id
    conn.commit()
    assert raw.count_jobs() == 1
    after = ship.options(unique_key="order-5").enqueue(5)
    assert after.deduplicated and after.id == first.id


def test_bad_arguments_leave_the_callers_transaction_usable(
    app: Conveyor, conn: Any, raw: RawDB
) -> None:
    ship = _task(app)
    conn.execute("INSERT INTO orders (id, item) VALUES (3, 'pen')")
    with pytest.raises(InvalidArgumentsError):
        ship.enqueue({1, 2}, connection=conn)  # type: ignore[arg-type]
    job = ship.enqueue(3, connection=conn)
    conn.commit()
    assert raw.scalar("SELECT count(*) FROM orders") == 1
    assert raw.count_jobs() == 1 and job_exists(app, job.id)


def test_a_connection_of_the_wrong_kind_is_refused(
    app: Conveyor, raw: RawDB, tmp_path: Any
) -> None:
    ship = _task(app)
    if app.backend.name == "sqlite":
        wrong: Any = object()
    else:
        wrong = sqlite3.connect(tmp_path / "elsewhere.db")
    with pytest.raises(ConfigurationError, match="connection="):
        ship.enqueue(1, connection=wrong)
    assert raw.count_jobs() == 0


def test_a_batch_is_all_or_nothing(app: Conveyor, raw: RawDB) -> None:
    """A row the schema rejects (an empty queue name, past the app's checks) fails the batch."""
    before = raw.count_jobs()
    with pytest.raises(Exception) as info:
        app.backend.job_insert_many(
            [NewJob(task="t", queue="q"), NewJob(task="t", queue=""), NewJob(task="t", queue="q")]
        )
    assert "conveyor_jobs_names_valid" in str(info.value)
    assert raw.count_jobs() == before
    assert len(app.backend.job_insert_many([NewJob(task="t", queue="q")])) == 1


def test_a_batch_may_mix_int_and_float_values(app: Conveyor) -> None:
    """NewJob's float fields accept ints; one batch may hold both (one typed array on PostgreSQL)."""
    jobs = app.backend.job_insert_many(
        [
            NewJob(task="t", queue="q", delay=600, timeout=3, deadline=10.5),
            NewJob(task="t", queue="q", delay=0.5, timeout=2.5, deadline=20),
            NewJob(task="t", queue="q"),
        ]
    )
    assert [(j.timeout, j.deadline) for j in jobs] == [(3.0, 10.5), (2.5, 20.0), (None, None)]
    delays = [(j.run_at - j.created_at).total_seconds() for j in jobs]
    assert abs(delays[0] - 600) < 0.01 and abs(delays[1] - 0.5) < 0.01 and abs(delays[2]) < 0.01


# -- pipelines and batches in the caller's transaction ------------------------------------------
def _flows_of(app: Conveyor) -> tuple[Any, Any]:
    ship = _task(app)

    @app.task(name="tx.report")
    def report(counts: dict[str, int]) -> int:
        return counts["succeeded"]

    return app.pipeline("tx.deliver", [ship.step(name="pack"), ship.step(name="send")]), report


def test_a_pipeline_exists_only_once_the_caller_commits(
    app: Conveyor, conn: Any, raw: RawDB
) -> None:
    deliver, _ = _flows_of(app)
    conn.execute("INSERT INTO orders (id, item) VALUES (7, 'desk')")
    run = deliver.start(args=[7], entity="order-7", connection=conn)

    assert run.state == "running" and run.entity == "order-7"  # read back on the caller's
    assert _in_transaction(conn), "Conveyor must not commit the caller's transaction"
    assert not pipeline_exists(app, run.id) and raw.count_jobs() == 0

    conn.commit()

    assert app.get_pipeline(run.id).state == "running" and raw.count_jobs() == 1
    app.drain()
    assert app.get_pipeline(run.id).return_value == 7


def test_a_batch_is_rolled_back_with_the_callers_transaction(
    app: Conveyor, conn: Any, raw: RawDB
) -> None:
    _, report = _flows_of(app)
    ship = app.tasks["tx.ship"]
    conn.execute("INSERT INTO orders (id, item) VALUES (8, 'chair')")
    batch = app.batch([ship.request(8), ship.request(9)], report.request(), connection=conn)
    assert batch.total == 2 and not batch.complete
    assert _in_transaction(conn) and raw.count_jobs() == 0

    conn.rollback()

    with pytest.raises(BatchNotFoundError):
        app.get_batch(batch.id)
    assert raw.count_jobs() == 0 and raw.scalar("SELECT count(*) FROM orders") == 0
    kept = app.batch([ship.request(10)], report.request(), connection=conn)
    conn.commit()
    app.drain()
    assert app.get_batch(kept.id).complete and raw.count_jobs() == 2  # its job, the report


def test_a_failed_start_leaves_the_callers_transaction_usable(
    app: Conveyor, conn: Any, raw: RawDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline's statements run in a savepoint: when one fails, what they wrote is undone
    and the caller's own writes can still be committed."""
    deliver, _ = _flows_of(app)
    queries = sys.modules[type(app.flows).__module__].QUERIES
    monkeypatch.setitem(queries, "set_pipeline_job", "SELECT * FROM conveyor_no_such_table")
    conn.execute("INSERT INTO orders (id, item) VALUES (11, 'vase')")
    with pytest.raises(Exception, match="conveyor_no_such_table"):
        deliver.start(args=[11], connection=conn)

    conn.commit()

    assert raw.scalar("SELECT count(*) FROM orders") == 1
    assert raw.count_jobs() == 0 and app.list_pipelines() == []


def test_with_no_transaction_open_yet_the_one_it_opens_is_left_to_the_caller(
    app: Conveyor, conn: Any, raw: RawDB
) -> None:
    deliver, report = _flows_of(app)
    assert not _in_transaction(conn)
    run = deliver.start(args=[13], connection=conn)
    assert _in_transaction(conn), "Conveyor must not commit the transaction it opened"
    conn.rollback()
    assert not pipeline_exists(app, run.id) and raw.count_jobs() == 0
    batch = app.batch([app.tasks["tx.ship"].request(14)], report.request(), connection=conn)
    assert _in_transaction(conn)
    conn.rollback()
    with pytest.raises(BatchNotFoundError):
        app.get_batch(batch.id)


def test_in_autocommit_mode_a_pipeline_is_its_own_transaction(app: Conveyor, conn: Any) -> None:
    deliver, _ = _flows_of(app)
    if isinstance(conn, sqlite3.Connection):
        conn.isolation_level = None
    else:
        conn.autocommit = True
    run = deliver.start(args=[12], connection=conn)
    assert not _in_transaction(conn)
    assert app.get_pipeline(run.id).state == "running"  # committed at once


def test_flows_refuse_a_connection_of_the_wrong_kind(app: Conveyor, raw: RawDB) -> None:
    deliver, _ = _flows_of(app)
    with pytest.raises(ConfigurationError, match=r"connection= must be a .* not object"):
        deliver.start(connection=object())
    with pytest.raises(ConfigurationError, match=r"connection= must be a .* not object"):
        app.batch([app.tasks["tx.ship"].request(1)], connection=object())
    assert raw.count_jobs() == 0 and app.list_pipelines() == []


def test_a_failed_start_rolls_back_the_transaction_it_opened(
    app: Conveyor, conn: Any, raw: RawDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no transaction open, a start that fails leaves none open either: no lock held
    (SQLite's writers would wait on it), no failed transaction (PostgreSQL's)."""
    deliver, _ = _flows_of(app)
    queries = sys.modules[type(app.flows).__module__].QUERIES
    monkeypatch.setitem(queries, "set_pipeline_job", "SELECT * FROM conveyor_no_such_table")
    assert not _in_transaction(conn)
    with pytest.raises(Exception, match="conveyor_no_such_table"):
        deliver.start(args=[15], connection=conn)
    assert not _in_transaction(conn)
    monkeypatch.undo()
    assert app.tasks["tx.ship"].enqueue(16).state == JobState.QUEUED  # no lock in the way
    assert raw.count_jobs() == 1 and app.list_pipelines() == []


def test_flows_on_a_connection_that_makes_dict_rows(app: Conveyor, conn: Any) -> None:
    deliver, report = _flows_of(app)
    if isinstance(conn, sqlite3.Connection):
        conn.row_factory = lambda cur, row: {
            d[0]: v for d, v in zip(cur.description, row, strict=True)
        }
    else:
        from psycopg.rows import dict_row

        conn.row_factory = dict_row
    run = deliver.start(args=[17], connection=conn)
    batch = app.batch([app.tasks["tx.ship"].request(18)], report.request(), connection=conn)
    conn.commit()
    assert app.get_pipeline(run.id).state == "running" and app.get_batch(batch.id).total == 1
