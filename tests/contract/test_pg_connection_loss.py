"""PostgreSQL: connections lost to a server restart or pg_terminate_backend.

Both found by the fault suite's database-restart scenario (tests/faults/test_db_restart.py):

* after a restart, every operation failed once per idle pooled connection
  (DatabaseUnavailableError) although the server was up again: dead pooled connections are now
  replaced before use;
* a claim whose connection died after its commit left its jobs running under the worker, unknown
  to it, until their leases expired (a lease of delay and a burnt attempt each): the next claim
  of that worker now hands them out.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from conveyor import Conveyor, JobState
from conveyor.backends.postgres import PostgresBackend
from conveyor.errors import DatabaseUnavailableError

from .conftest import is_sqlite, wait_until

_CLAIM_LOCK = 7262100438  # conveyor_claim's advisory lock, taken when keyed jobs are due


def _postgres(app: Conveyor, db_url: str) -> PostgresBackend:
    if is_sqlite(db_url):
        pytest.skip("SQLite has no server connections to lose")
    backend = app.backend
    assert isinstance(backend, PostgresBackend)
    return backend


def _pool_backends(backend: PostgresBackend, n: int) -> list[int]:
    """Check out n pooled connections at once (so the pool holds n), return their server pids."""
    conns: list[Any] = [backend._pool.getconn() for _ in range(n)]
    try:
        return [int(c.info.backend_pid) for c in conns]
    finally:
        for conn in conns:
            backend._pool.putconn(conn)


def test_operations_after_the_server_dropped_every_pooled_connection(
    app: Conveyor, db_url: str
) -> None:
    backend = _postgres(app, db_url)
    pids = _pool_backends(backend, 3)
    with psycopg.connect(db_url, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))  # waits for the exit
    # Every idle pooled connection is dead now; each of these would have failed before.
    for n in range(4):
        job = app.enqueue_raw("dead.connections", [n])
        assert app.get_job(job.id).args == [n]
    assert app.stats()
    assert set(_pool_backends(backend, 3)).isdisjoint(pids)


def test_a_claim_that_got_no_answer_hands_its_jobs_to_the_next_claim(
    app: Conveyor, db_url: str
) -> None:
    backend = _postgres(app, db_url)
    worker = "worker-unanswered"
    lost = app.enqueue_raw("unanswered.first")
    with psycopg.connect(db_url, autocommit=True) as admin:
        # A claim of the worker that committed but whose answer never reached it.
        (taken,) = admin.execute(
            "SELECT id FROM conveyor_claim(%s, ARRAY['default'], 1, 30)", (worker,)
        ).fetchall()
        assert taken[0] == lost.id
        keyed = app.enqueue_raw("unanswered.keyed", concurrency_key="k")
        # The worker's next claim fails with its connection: held at the claim lock (a keyed
        # job is due), its server process is terminated.
        failed: list[BaseException] = []
        with admin.transaction():
            admin.execute("SELECT pg_advisory_xact_lock(%s)", (_CLAIM_LOCK,))
            me = admin.info.backend_pid

            def claim() -> None:
                try:
                    backend.job_fetch_available(worker, ["default"], 5, 30)
                except BaseException as exc:
                    failed.append(exc)

            thread = threading.Thread(target=claim)
            thread.start()
            (blocked,) = wait_until(
                lambda: admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                    (me,),
                ).fetchall(),
                what="the worker's claim to wait for the claim lock",
            )
            admin.execute("SELECT pg_terminate_backend(%s)", (blocked[0],))
            thread.join(10)
        assert len(failed) == 1 and isinstance(failed[0], DatabaseUnavailableError), failed

    jobs = backend.job_fetch_available(worker, ["default"], 5, 30)
    assert sorted(j.id for j in jobs) == [lost.id, keyed.id]
    assert all(j.state == JobState.RUNNING and j.lease_owner == worker for j in jobs)
    assert {j.id: j.attempt for j in jobs} == {lost.id: 1, keyed.id: 1}
    # Handed out once: the next claims find nothing more (no job is handed out twice).
    assert backend.job_fetch_available(worker, ["default"], 5, 30) == []
    assert app.enqueue_raw("unanswered.later")
    (later,) = backend.job_fetch_available(worker, ["default"], 5, 30)
    assert later.id not in (lost.id, keyed.id)
