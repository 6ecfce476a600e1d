"""The vacuum service: on PostgreSQL it reclaims the dead row versions that claims and outcomes
leave in the jobs table once there are enough of them; SQLite keeps none, so it never runs.
(What it is for, claims as cheap after a million jobs as after a thousand, is measured by
``conveyor bench``, not asserted here.)"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from conveyor import Conveyor
from conveyor.backends.base import NewJob
from conveyor.services.vacuum import IDLE_MIN_DEAD, Vacuum
from conveyor.states import succeed

from .conftest import RawDB, is_sqlite, running_worker, wait_until


def _churn(app: Conveyor, n: int) -> list[int]:
    """n jobs inserted, claimed and finished: two dead row versions each on PostgreSQL."""
    jobs = app.backend.job_insert_many([NewJob(task="v.t", queue="v") for _ in range(n)])
    claimed = app.backend.job_fetch_available("w", ["v"], n, 30)
    assert app.backend.job_finish_many("w", [succeed(j, "null") for j in claimed]) == {
        j.id for j in jobs
    }
    return [j.id for j in jobs]


def test_the_vacuum_runs_only_past_its_threshold_and_only_where_rows_die(
    app: Conveyor, raw: RawDB
) -> None:
    ids = _churn(app, 50)
    assert Vacuum(app.backend, min_dead=10**12).run_once() is False  # never that many
    vacuumed = Vacuum(app.backend, min_dead=0).run_once()
    assert vacuumed is (not is_sqlite(app.url))
    # nothing a vacuum does is visible: the jobs and their history are all there
    assert all(app.get_job(i).state == "succeeded" for i in ids)
    assert raw.scalar("SELECT count(*) FROM conveyor_job_events") == 3 * len(ids)
    if not is_sqlite(app.url):
        vacuums = "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'conveyor_jobs'"
        wait_until(lambda: raw.scalar(vacuums) >= 1, what="the vacuum in the statistics")


def test_a_worker_vacuums_in_the_background(app: Conveyor, raw: RawDB) -> None:
    @app.task(name="v.t", queue="v")
    def noop() -> None: ...

    _churn(app, 20)
    if is_sqlite(app.url):
        return  # nothing to vacuum (the service's pass is a no-op; covered above)
    vacuums = "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'conveyor_jobs'"
    before = raw.scalar(vacuums) or 0
    options = {"vacuum_interval": 0.05, "vacuum_min_dead": 0, "poll_interval": 0.05}
    with running_worker(app, queues=["v"], **options):  # any dead row is enough
        wait_until(lambda: (raw.scalar(vacuums) or 0) > before, what="a background vacuum")


def test_an_idle_worker_vacuums_a_bursts_dead_rows_sooner(app: Conveyor, raw: RawDB) -> None:
    """Below the busy threshold, but past the idle one: a worker waiting for work vacuums."""
    if is_sqlite(app.url):
        pytest.skip("SQLite keeps no dead row versions")

    @app.task(name="v.t", queue="v")
    def noop() -> None: ...

    burst = Conveyor(app.url)  # closed after: its server processes report their statistics
    _churn(burst, IDLE_MIN_DEAD)  # two dead row versions each: past the idle threshold
    burst.close()
    dead = "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'conveyor_jobs'::regclass"
    wait_until(lambda: raw.scalar(dead) >= IDLE_MIN_DEAD, what="the dead rows in the statistics")
    vacuums = "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'conveyor_jobs'::regclass"
    before = raw.scalar(vacuums) or 0
    options = {"vacuum_interval": 0.05, "vacuum_min_dead": 10**9, "poll_interval": 0.05}
    with running_worker(app, queues=["v"], **options):
        wait_until(lambda: (raw.scalar(vacuums) or 0) > before, what="an idle worker's vacuum")


def test_the_vacuum_skips_its_turn_while_another_holds_the_table(app: Conveyor, raw: RawDB) -> None:
    """Another session vacuuming the table (here: holding the lock a VACUUM takes): this one
    does not wait for it, and says it did not vacuum."""
    _churn(app, 20)
    if is_sqlite(app.url):
        assert Vacuum(app.backend, min_dead=0).run_once() is False
        return
    raw.execute("BEGIN")
    raw.execute("LOCK TABLE conveyor_jobs IN SHARE UPDATE EXCLUSIVE MODE")
    try:
        assert Vacuum(app.backend, min_dead=0).run_once() is False
    finally:
        raw.execute("ROLLBACK")
    assert Vacuum(app.backend, min_dead=0).run_once() is True


def test_the_vacuum_merges_the_history_index_pending_list(app: Conveyor, raw: RawDB) -> None:
    """PostgreSQL: history's GIN index takes new job ids into a pending list; every turn of the
    vacuum service merges it (even when the table needs no VACUUM), so that the statements
    writing history seldom find it full and merge it themselves. Lookups see pending ids."""
    if is_sqlite(app.url):
        pytest.skip("SQLite keeps history in a plain table, without a GIN index")
    ids = _churn(app, 50)
    assert Vacuum(app.backend, min_dead=10**12).run_once() is False  # no VACUUM: too few dead
    merge = "SELECT gin_clean_pending_list('conveyor_history_jobs'::regclass)"
    assert raw.scalar(merge) == 0  # nothing was left pending
    _churn(app, 5)
    assert raw.scalar(merge) > 0  # pending again, until merged
    assert [e.to_state for e in app.job_history(ids[0])] == ["queued", "running", "succeeded"]


def test_a_gentle_vacuum_is_paced_and_leaves_its_connection_as_it_was(
    app: Conveyor, raw: RawDB
) -> None:
    """PostgreSQL: a gentle vacuum sleeps between rounds of page accesses, as autovacuum does
    (seen as the VacuumDelay wait in pg_stat_activity while it runs), and resets the pooled
    connection's vacuum_cost_delay afterwards."""
    if is_sqlite(app.url):
        pytest.skip("SQLite keeps no dead row versions")
    from conveyor.backends.postgres import PostgresBackend

    _churn(app, 10_000)
    backend = PostgresBackend(app.url, min_size=1, max_size=1)  # one connection: the one used
    done = threading.Event()
    result: list[bool] = []

    def vacuum() -> None:
        try:
            result.append(backend.jobs_vacuum(0, gentle=True))
        finally:
            done.set()

    thread = threading.Thread(target=vacuum)
    thread.start()
    paced = False
    delay = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'VacuumDelay'"
    while not done.is_set() and not paced:  # sampled as fast as it goes, while it runs
        paced = raw.scalar(delay) > 0
    thread.join(timeout=60)
    try:
        assert paced, "the vacuum never slept between rounds of page accesses"
        assert result == [True]
        with backend._conn() as conn:
            setting = conn.execute("SHOW vacuum_cost_delay").fetchone()["vacuum_cost_delay"]
        assert setting == "0"
    finally:
        backend.close()


def test_a_worker_vacuums_gently_while_idle_and_at_full_speed_while_busy(
    app: Conveyor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The vacuum of a worker waiting for work (parked, nothing running) is the gentle one, so
    that the pickups of the jobs arriving during it are not slowed by it; a busy worker's is not
    paced, so that it ends sooner."""
    import conveyor.worker

    asked: list[bool] = []

    class Recorded(Vacuum):
        def run_once(self, now: Any = None) -> bool:
            asked.append(self.gentle)
            return False

    async def inline(fn: Any, *args: Any) -> Any:
        return fn(*args)

    monkeypatch.setattr(conveyor.worker, "Vacuum", Recorded)
    worker = conveyor.worker.Worker(app)
    monkeypatch.setattr(worker, "_db", inline)
    worker._parked = 4  # waiting for work with four free slots
    asyncio.run(worker._vacuum_once())
    worker._parked = 0  # claiming, or every slot taken
    asyncio.run(worker._vacuum_once())
    worker._parked, worker._attempts[1] = 4, object()  # type: ignore[assignment]  # a job runs
    asyncio.run(worker._vacuum_once())
    assert asked == [True, False, False]
