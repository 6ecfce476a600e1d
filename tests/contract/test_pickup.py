"""Realtime pickup: an idle worker starts a job enqueued by another process without waiting for
its poll interval (PostgreSQL: LISTEN/NOTIFY; SQLite: short idle polling with backoff)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from conveyor import Conveyor, Job, JobState
from conveyor.backends.postgres.listener import DUE_CHANNEL, listen, schema_channel
from conveyor.states import succeed

from .conftest import explain_everything, is_sqlite, running_worker, wait_until

LONG_POLL = 60.0  # far longer than any wait below: only a push or idle polling can be this fast


def _other_process_app(url: str) -> Conveyor:
    """A second app on the same database: its enqueues do not wake the worker in-process."""
    other = Conveyor(url)

    @other.task(name="pickup.noop")
    def noop(n: int) -> int:
        return n

    return other


@contextmanager
def _explained_beside_a_due_listener(db_url: str) -> Iterator[tuple[Any, Any, list[str]]]:
    """PostgreSQL: a connection listening on the schema's due channel, and a connection configured
    as Conveyor's are whose every statement's plan, nested ones too, is collected."""
    import psycopg

    from conveyor.backends.postgres import _configure

    with (
        psycopg.connect(db_url, autocommit=True) as listener,
        psycopg.connect(db_url, autocommit=True) as conn,
    ):
        listen(listener, schema_channel(listener, DUE_CHANNEL))
        _configure(conn)
        yield listener, conn, explain_everything(conn)


def _run_one_by_hand(app: Conveyor) -> Job:
    """Enqueue a pickup.noop job, claim it and write its success as a worker would: a due and a
    finished notification, on the app's schema's channels."""
    job = app.tasks["pickup.noop"].enqueue(1)
    (claimed,) = app.backend.job_fetch_available("w", ["default"], 1, 30)
    app.backend.job_finish_many("w", [succeed(claimed, "1")])
    return job


def _app_with_task(app: Conveyor) -> None:
    @app.task(name="pickup.noop")
    def noop(n: int) -> int:
        return n


def test_idle_worker_picks_up_a_job_from_another_process_at_once(
    app: Conveyor, db_url: str
) -> None:
    _app_with_task(app)
    other = _other_process_app(db_url)
    try:
        with running_worker(app, poll_interval=LONG_POLL, concurrency=2) as worker:
            if not is_sqlite(db_url):
                wait_until(lambda: worker.push_wakeups, timeout=5, what="the worker's listener")
            assert worker.push_wakeups is not is_sqlite(db_url)
            time.sleep(0.3)  # the workload: no job yet, so the worker goes idle (SQLite backs off)
            for n in range(3):
                job = other.tasks["pickup.noop"].enqueue(n)
                done = wait_until(
                    lambda j=job: app.get_job(j.id).state == JobState.SUCCEEDED,
                    timeout=5,
                    what=f"job {job.id} picked up without a poll",
                )
                assert done
    finally:
        other.close()


def test_the_listener_claims_for_an_idle_worker_within_its_concurrency(
    app: Conveyor, db_url: str
) -> None:
    """PostgreSQL: the worker's listener claims jobs for it while it is idle (one hop less than
    waking it), for its free slots only. One slot is held by a gate job; a burst of six jobs
    arrives from another process: they run one at a time in the other slot, each exactly once,
    and the listener claimed some. (SQLite has no listener: the worker claims everything.)"""
    lock = threading.Lock()
    running: list[str] = []
    peak: list[int] = [0]
    runs: list[str] = []
    gate = threading.Event()

    def enter(name: str) -> None:
        with lock:
            running.append(name)
            runs.append(name)
            peak[0] = max(peak[0], len(running))

    def leave(name: str) -> None:
        with lock:
            running.remove(name)

    # async tasks: nothing but the worker's slots limits how many run at once
    @app.task(name="pickup.gate")
    async def hold() -> None:
        enter("gate")
        await asyncio.to_thread(gate.wait, 10)
        leave("gate")

    @app.task(name="pickup.slow")
    async def slow(n: int) -> None:
        enter(f"slow{n}")
        await asyncio.sleep(0.01)  # the workload: jobs that overlap if claimed together
        leave(f"slow{n}")

    other = Conveyor(db_url)
    producer = other.task(name="pickup.slow")(lambda n: n)
    burst = [producer.request(n) for n in range(6)]
    try:
        with running_worker(app, poll_interval=LONG_POLL, concurrency=2) as worker:
            if not is_sqlite(db_url):
                wait_until(lambda: worker.push_wakeups, timeout=5, what="the worker's listener")
            held = other.enqueue_raw("pickup.gate")
            wait_until(lambda: "gate" in running, timeout=10, what="the gate job to run")
            # the worker waits for work again, one slot free (white box: the idle claim's offer)
            wait_until(lambda: worker._parked == 1, timeout=10, what="the worker to go idle")
            jobs = other.enqueue_many(burst)
            wait_until(
                lambda: all(app.get_job(j.id).state == JobState.SUCCEEDED for j in jobs),
                timeout=10,
                what="the burst, one at a time",
            )
            gate.set()
            wait_until(lambda: app.get_job(held.id).state == JobState.SUCCEEDED, 10, "the gate")
            listener_claimed = worker.stats.listener_claimed
    finally:
        gate.set()
        other.close()
    assert sorted(runs) == sorted(["gate", *(f"slow{n}" for n in range(6))])  # each once
    assert peak[0] == 2
    if is_sqlite(db_url):
        assert listener_claimed == 0
    else:
        assert listener_claimed >= 1


def test_listener_reconnects_after_its_connection_is_killed(app: Conveyor, db_url: str) -> None:
    if is_sqlite(db_url):
        pytest.skip("SQLite has no notifications to lose: idle workers poll")
    import psycopg

    _app_with_task(app)
    other = _other_process_app(db_url)
    try:
        with running_worker(app, poll_interval=LONG_POLL, concurrency=2):
            with psycopg.connect(db_url, autocommit=True) as admin:
                killed = wait_until(
                    lambda: admin.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = 'conveyor-due-listener' "
                        "AND query LIKE 'LISTEN \"conveyor_job_due_%'"
                    ).fetchone()[0],
                    timeout=5,
                    what="the worker's listener connection",
                )
                assert killed >= 1
                wait_until(
                    lambda: (
                        admin.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                            "'conveyor-due-listener' AND query LIKE 'LISTEN \"conveyor_job_due_%'"
                        ).fetchone()[0]
                        >= 1
                    ),
                    timeout=10,
                    what="the listener to reconnect",
                )
            job = other.tasks["pickup.noop"].enqueue(7)
            wait_until(
                lambda: app.get_job(job.id).state == JobState.SUCCEEDED,
                timeout=5,
                what="pickup after the listener reconnected",
            )
    finally:
        other.close()


def test_one_notification_per_statement_and_queue(app: Conveyor, db_url: str) -> None:
    if is_sqlite(db_url):
        pytest.skip("SQLite has no LISTEN/NOTIFY")
    import psycopg

    _app_with_task(app)
    noop = app.tasks["pickup.noop"]
    with psycopg.connect(db_url, autocommit=True) as listener:
        listen(listener, schema_channel(listener, DUE_CHANNEL))
        requests = [noop.options(queue="alpha").request(i) for i in range(500)]
        requests += [noop.options(queue="beta").request(i) for i in range(500)]
        requests += [noop.options(queue="gamma", delay=3600).request(0)]  # not due: no wake-up
        app.enqueue_many(requests)
        got = [n.payload for n in listener.notifies(timeout=1.0)]
    assert sorted(got) == ["alpha", "beta"]


def test_the_listener_connection_warms_up_its_claims_without_a_trace(
    app: Conveyor, db_url: str
) -> None:
    """PostgreSQL: a session's first claim compiles the claim function and its triggers (7-10 ms,
    paid by an idle worker's first pickup). The due listener's connection claims once at connect
    in a transaction rolled back: the claim's UPDATE runs, and no job, history record or
    notification of it remains."""
    if is_sqlite(db_url):
        pytest.skip("PostgreSQL's listener connection")
    import psycopg

    from conveyor.backends.postgres import _warm_up_claims

    with _explained_beside_a_due_listener(db_url) as (listener, conn, plans):
        _warm_up_claims(conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        history = conn.execute("SELECT count(*) FROM conveyor_history").fetchone()
        heard = [n.payload for n in listener.notifies(timeout=0.3)]
    assert any("SET state = 'running'" in plan for plan in plans), plans  # the claim's UPDATE
    assert app.list_jobs() == []
    assert history == (0,)
    assert "conveyor.warm-up" not in heard


def test_a_failed_warm_up_leaves_the_listener_connection_usable(db_url: str) -> None:
    """PostgreSQL: the warm-up is best effort: where it cannot claim (here: no Conveyor schema on
    the connection's search path) it gives up quietly and the connection is left idle."""
    if is_sqlite(db_url):
        pytest.skip("PostgreSQL's listener connection")
    import psycopg

    from conveyor.backends.postgres import _warm_up_claims

    with psycopg.connect(db_url, autocommit=True) as conn:  # db_url's schema is still empty
        _warm_up_claims(conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_conveyors_in_two_schemas_of_one_database_do_not_hear_each_other(
    app: Conveyor, db_url: str, other_db_url: str
) -> None:
    """PostgreSQL: NOTIFY channels are database-wide. Each schema's triggers notify on channels
    of its own (named after the schema's oid), so an enqueue in one schema wakes no idle worker
    of the other (whose listener would claim there in vain), and a job finishing in one wakes no
    result waiter of the other (with an id that means another job there)."""
    if is_sqlite(db_url):
        pytest.skip("SQLite has no LISTEN/NOTIFY")
    import psycopg

    from conveyor.backends.postgres.listener import CHANNEL

    _app_with_task(app)
    other = _other_process_app(other_db_url)
    other.migrate()
    try:
        with (
            psycopg.connect(db_url, autocommit=True) as ours,
            psycopg.connect(other_db_url, autocommit=True) as theirs,
        ):
            channels = {
                name: (schema_channel(ours, name), schema_channel(theirs, name))
                for name in (DUE_CHANNEL, CHANNEL)
            }
            for mine, its in channels.values():
                assert mine != its
                listen(ours, mine)
                listen(theirs, its)
            job = _run_one_by_hand(other)
            # theirs heard it all (the control): due, then finished; ours heard nothing
            heard = {(n.channel, n.payload) for n in theirs.notifies(timeout=5, stop_after=2)}
            assert heard == {
                (channels[DUE_CHANNEL][1], "default"),
                (channels[CHANNEL][1], str(job.id)),
            }
            assert [(n.channel, n.payload) for n in ours.notifies(timeout=0.3)] == []
    finally:
        other.close()


def test_an_enqueue_names_its_channel_without_a_catalog_query(app: Conveyor, db_url: str) -> None:
    """PostgreSQL: the insert trigger names the due channel from its table's schema name
    (conveyor_schema_channel, inlined into the trigger's cached plans). Reading the schema's oid
    from pg_class in an SQL function planned that query again at every call: 0.3-0.4 ms of an
    idle machine's 2.5 ms enqueue."""
    if is_sqlite(db_url):
        pytest.skip("SQLite has no LISTEN/NOTIFY")
    _app_with_task(app)
    with _explained_beside_a_due_listener(db_url) as (listener, conn, plans):
        app.tasks["pickup.noop"].enqueue(1, connection=conn)
        heard = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert heard == ["default"]  # the statement explained did notify
    assert any("Insert on conveyor_history" in plan for plan in plans), plans  # nested: seen
    assert not [plan for plan in plans if "pg_class" in plan]


def test_a_schema_whose_name_needs_quoting_hears_its_own_notifications() -> None:
    """PostgreSQL: the channel's schema is named in SQL (quoted) to find its oid; a schema named
    with capitals and quotes gets the same channel its listeners ask for."""
    import uuid
    from urllib.parse import quote

    import psycopg
    from psycopg import sql

    from conveyor.backends.postgres.listener import CHANNEL

    from ..conftest import postgres_url_or_skip

    base = postgres_url_or_skip()
    schema = f'Tenant"{uuid.uuid4().hex[:8]}"'
    search_path = '"' + schema.replace('"', '""') + '"'
    url = f"{base}{'&' if '?' in base else '?'}options={quote(f'-csearch_path={search_path}')}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    app = _other_process_app(url)
    try:
        app.migrate()
        with psycopg.connect(url, autocommit=True) as listener:
            (oid,) = listener.execute(
                "SELECT oid FROM pg_namespace WHERE nspname = %s", (schema,)
            ).fetchone()
            due, state = (schema_channel(listener, name) for name in (DUE_CHANNEL, CHANNEL))
            assert (due, state) == (f"{DUE_CHANNEL}_{oid}", f"{CHANNEL}_{oid}")
            listen(listener, due)
            listen(listener, state)
            job = _run_one_by_hand(app)
            heard = {(n.channel, n.payload) for n in listener.notifies(timeout=5, stop_after=2)}
        assert heard == {(due, "default"), (state, str(job.id))}
    finally:
        app.close()
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
