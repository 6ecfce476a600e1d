"""Periodic jobs: each tick of a schedule becomes exactly one job, however many schedulers (one
per worker, on any host) see it; a tick older than its grace is skipped; workers run the
scheduler themselves."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conveyor import Conveyor, JobState
from conveyor import worker as worker_module
from conveyor.cli import main
from conveyor.services.scheduler import Scheduler

from .conftest import running_worker, together, wait_until


def _schedule(app: Conveyor, **given: Any) -> Any:
    @app.task(name="per.tick", queue="per")
    def tick(label: str) -> str:
        return label

    return app.periodic(tick, args=["t"], **given)


def _minute(app: Conveyor, seconds_past: float = 5.0) -> datetime:
    """A time ``seconds_past`` after the next whole minute of the database clock."""
    now = app.backend.db_now()
    return now.replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=seconds_past)


def _jobs(app: Conveyor) -> list[Any]:
    return sorted(app.list_jobs(queue="per", limit=1000), key=lambda j: j.id)


def test_each_tick_is_enqueued_once_with_the_tick_as_run_at(app: Conveyor) -> None:
    _schedule(app, cron="* * * * *", priority=4)
    scheduler = Scheduler(app)
    first = _minute(app)
    tick = first.replace(second=0)

    (job,) = scheduler.run_once(first)
    assert (job.task, job.args, job.queue, job.priority) == ("per.tick", ["t"], "per", 4)
    assert job.run_at == tick and job.state == JobState.QUEUED
    assert job.idempotency_key == f"periodic:per.tick:{tick.isoformat()}"
    assert scheduler.run_once(first + timedelta(seconds=30)) == []  # the same tick
    assert Scheduler(app).run_once(first) == []  # a fresh scheduler: the key keeps it out
    (following,) = scheduler.run_once(first + timedelta(minutes=1))
    assert following.run_at == tick + timedelta(minutes=1)
    assert [j.id for j in _jobs(app)] == [job.id, following.id]


def test_a_schedule_in_a_time_zone_ticks_on_its_wall_clock(app: Conveyor) -> None:
    _schedule(app, cron="0 9 * * *", tz="America/New_York", name="per.ny")
    nine = datetime.fromisoformat("2026-12-01T14:00:00+00:00")  # 09:00 EST
    (job,) = Scheduler(app).run_once(nine + timedelta(seconds=20))
    assert job.run_at == nine and job.idempotency_key == "periodic:per.ny:2026-12-01T14:00:00+00:00"
    assert Scheduler(app).run_once(nine - timedelta(minutes=1)) == []  # 08:59: yesterday's, late


def test_a_tick_is_never_enqueued_again_even_once_its_job_is_gone(app: Conveyor) -> None:
    """The schedule's last tick is recorded in the database with the job: a scheduler that never
    saw the tick (a worker started after a deploy) does not enqueue it again after its job was
    deleted or pruned."""
    _schedule(app, every=3600, grace=7200)
    hour = _minute(app, 0).replace(minute=0) + timedelta(hours=1)
    (job,) = Scheduler(app).run_once(hour + timedelta(minutes=1))
    assert app.delete_job(job.id)
    assert Scheduler(app).run_once(hour + timedelta(minutes=30)) == []
    assert _jobs(app) == []


def test_ticks_missed_within_grace_are_made_up_in_order(app: Conveyor) -> None:
    """A scheduler that was late (a stalled worker, a slow database) enqueues every tick it
    missed that is still within grace, oldest first, each once; one starting up enqueues the
    latest tick alone (the ticks of a downtime are not made up)."""
    _schedule(app, every=60, grace=300)
    first = _minute(app, 10)
    scheduler = Scheduler(app)
    assert [j.run_at for j in scheduler.run_once(first)] == [first - timedelta(seconds=10)]
    later = first + timedelta(seconds=180)  # three ticks later
    made_up = scheduler.run_once(later)
    assert [j.run_at for j in made_up] == [first + timedelta(seconds=s) for s in (50, 110, 170)]
    assert Scheduler(app).run_once(later) == []  # another worker: nothing left to enqueue
    assert len(_jobs(app)) == 4


def test_a_tick_older_than_its_grace_is_skipped(app: Conveyor) -> None:
    _schedule(app, cron="0 * * * *", grace=30)
    hour = _minute(app, 0).replace(minute=0) + timedelta(hours=1)
    assert Scheduler(app).run_once(hour + timedelta(seconds=31)) == []
    assert _jobs(app) == []
    assert len(Scheduler(app).run_once(hour + timedelta(seconds=29))) == 1
    assert Scheduler(app).run_once(hour + timedelta(hours=1, minutes=5)) == []  # not made up
    assert len(_jobs(app)) == 1


def test_schedulers_of_many_workers_enqueue_each_tick_once(app: Conveyor) -> None:
    """Eight schedulers on their own connections (as eight workers), released together on the
    same ticks, five ticks in a row: five jobs, each inserted by exactly one of them."""
    _schedule(app, every=60)
    apps = [Conveyor(app.url) for _ in range(8)]
    try:
        for other in apps:
            other.periodic_jobs = app.periodic_jobs
            other.tasks = app.tasks
        schedulers = [Scheduler(other) for other in apps]
        first = _minute(app)
        inserted: list[int] = []
        lock = threading.Lock()

        def run(scheduler: Scheduler, at: datetime) -> None:
            jobs = scheduler.run_once(at)
            with lock:
                inserted.extend(j.id for j in jobs)

        for k in range(5):
            at = first + timedelta(minutes=k)
            together(*[lambda s=s, at=at: run(s, at) for s in schedulers])
        jobs = _jobs(app)
        assert len(jobs) == 5 and sorted(inserted) == [j.id for j in jobs]
        assert len({j.run_at for j in jobs}) == 5
    finally:
        for other in apps:
            other.close()


def test_a_worker_enqueues_and_runs_its_apps_periodic_jobs(app: Conveyor) -> None:
    ran: list[str] = []

    @app.task(name="per.beat", queue="per")
    def beat(label: str) -> None:
        ran.append(label)

    app.periodic(beat, every=1, args=["beat"])
    with running_worker(app, queues=["per"], poll_interval=0.05) as worker:
        wait_until(lambda: len(ran) >= 2, timeout=10, what="two ticks to run")
        assert worker.stats.periodic_enqueued >= 2
    jobs = _jobs(app)
    assert len({j.run_at for j in jobs}) == len(jobs)  # one job per tick
    assert all(j.run_at.microsecond == 0 for j in jobs)


def test_draining_in_tests_enqueues_no_ticks(
    app: Conveyor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain that lasts many scheduler intervals (made 10 ms here) still enqueues no tick: the
    scheduler is not among its services."""
    monkeypatch.setattr(worker_module, "SCHEDULE_INTERVAL", 0.01)
    _schedule(app, every=1)
    slow = threading.Event()

    @app.task(name="per.slow", queue="per")
    def takes_a_while() -> None:
        slow.wait(0.3)  # a job that runs while 30 scheduler intervals pass

    (job,) = app.enqueue_many([takes_a_while.request()])
    assert app.drain() == {"succeeded": 1}
    assert [j.id for j in _jobs(app)] == [job.id]


def test_conveyor_periodic_lists_schedules_with_their_last_and_next_tick(
    app: Conveyor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"periodic_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "from conveyor import Conveyor\n"
        f"app = Conveyor({app.url!r})\n"
        "@app.task(name='pm.clean', queue='maint')\n"
        "def clean() -> None: ...\n"
        "app.periodic(clean, cron='0 9 * * mon-fri')\n"
        "app.periodic(clean, every=90, name='pm.often', grace=30)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()
    before = app.backend.db_now()
    listed = runner.invoke(main, ["periodic", "--app", f"{module}:app", "--json"])
    after = app.backend.db_now()
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r for r in json.loads(listed.output)}
    assert set(rows) == {"pm.clean", "pm.often"}
    weekdays, often = rows["pm.clean"], rows["pm.often"]
    assert (weekdays["schedule"], weekdays["queue"], weekdays["grace"]) == (
        "0 9 * * mon-fri",
        "maint",
        60.0,
    )
    assert often["schedule"] == "every 90 s" and often["grace"] == 30.0
    for row in rows.values():  # computed by the command at a moment between the two
        last, following = (datetime.fromisoformat(row[k]) for k in ("last_tick", "next_tick"))
        assert last <= after and following > before and last < following
    assert datetime.fromisoformat(weekdays["next_tick"]).weekday() < 5
    text = runner.invoke(main, ["periodic", "--app", f"{module}:app"])
    assert text.exit_code == 0 and "pm.often" in text.output and "every 90 s" in text.output
    refused = runner.invoke(main, ["periodic", "--database", app.url])
    assert refused.exit_code != 0 and "periodic needs --app module:app" in refused.output
