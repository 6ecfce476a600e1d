"""Retention: the pruner deletes finished jobs (with their history), old history, and finished
pipelines and completed batches that no job is left of, past their retention, nothing else, in
bounded batches; two pruners at once are safe; one worker of the fleet prunes per interval."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner

from conveyor import ConfigurationError, Conveyor, JobState, Worker
from conveyor.backends.base import NewJob
from conveyor.cli import main
from conveyor.services.pruner import DAY, Pruner, PruneResult, Retention
from conveyor.states import Backoff, cancel, fail, succeed

from .conftest import (
    RawDB,
    batch_exists,
    claim_one,
    job_exists,
    pipeline_exists,
    running_worker,
    together,
    wait_until,
)

S, D, C = JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED


def _finished(app: Conveyor, state: JobState, n: int = 1) -> list[int]:
    """``n`` jobs that ran once and ended in ``state`` just now."""
    queue = f"p-{state.value}"
    app.backend.job_insert_many([NewJob(task="p.t", queue=queue, max_attempts=1) for _ in range(n)])
    claimed = app.backend.job_fetch_available("w", [queue], n, 30)
    now = app.backend.db_now()
    outcome: Callable[[Any], Any] = {
        S: lambda j: succeed(j, "1"),
        D: lambda j: fail(j, "error", "x", now, Backoff()),
        C: lambda j: cancel(j, "enough", now),
    }[state]
    assert app.backend.job_finish_many("w", [outcome(j) for j in claimed]) == {
        j.id for j in claimed
    }
    assert all(app.get_job(j.id).state == state for j in claimed)
    return [j.id for j in claimed]


def _later(app: Conveyor, days: float) -> datetime:
    return app.backend.db_now() + timedelta(days=days)


def test_pruner_deletes_only_what_is_past_retention(app: Conveyor, raw: RawDB) -> None:
    succeeded, dead, cancelled = _finished(app, S, 3), _finished(app, D, 2), _finished(app, C, 2)
    queued = app.backend.job_insert_many([NewJob(task="p.t", queue="q")])[0].id
    running = app.backend.job_insert_many([NewJob(task="p.t", queue="r")])[0].id
    claim_one(app, queue="r")
    retrying = app.backend.job_insert_many([NewJob(task="p.t", queue="b", max_attempts=2)])[0].id
    first = claim_one(app, queue="b")
    app.backend.job_finish_many(
        "worker-a", [fail(first, "error", "x", app.backend.db_now(), Backoff(base=3600))]
    )
    active = [queued, running, retrying]
    everything = [*succeeded, *dead, *cancelled, *active]
    pruner = Pruner(app.backend)  # the defaults: 7 days, dead 30 days, events 30 days

    assert pruner.run_once().total_jobs == 0  # nothing is old yet
    assert pruner.run_once(_later(app, 6.9)).total_jobs == 0
    assert all(job_exists(app, i) for i in everything)

    week = pruner.run_once(_later(app, 7.1))
    assert week.jobs == {"succeeded": 3, "cancelled": 2, "dead": 0} and week.events == 0
    assert not any(job_exists(app, i) for i in [*succeeded, *cancelled])
    assert all(job_exists(app, i) for i in [*dead, *active])
    gone = [*succeeded, *cancelled]
    assert all(app.backend.job_events(i) == [] for i in gone)  # their history went with them
    assert all(app.backend.job_events(i) for i in [*dead, *active])

    month = pruner.run_once(_later(app, 30.1))
    assert month.jobs == {"succeeded": 0, "cancelled": 0, "dead": 2}
    assert not any(job_exists(app, i) for i in dead)
    # active jobs are never pruned, however old; their events past 30 days are
    assert all(job_exists(app, i) for i in active)
    assert month.events == 1 + 2 + 3  # queued: enqueued; running: + claimed; retrying: + failed
    assert all(app.job_history(i) == [] for i in active)
    assert raw.scalar("SELECT count(*) FROM conveyor_job_events") == 0


def test_finished_pipelines_and_batches_go_past_retention_once_their_jobs_have(
    app: Conveyor,
) -> None:
    """A pipeline or batch is pruned when it ended past its retention (30 days by default) and
    none of its jobs is left; running pipelines and batches not completed stay, however old."""

    @app.task(name="pr.step")
    def step(n: int = 0) -> int:
        return n + 1

    definition = app.pipeline("pr.two-steps", [step.step(name="one"), step.step(name="two")])
    done, batch = definition.start(), app.batch([step.request(1), step.request(2)])
    app.drain()
    assert app.get_pipeline(done.id).state == "succeeded" and app.get_batch(batch.id).complete
    running, open_batch = definition.start(), app.batch([step.request(3)])  # never run
    pruner = Pruner(app.backend)

    first = pruner.run_once(_later(app, 29))  # the jobs go (7 days), the flows stay (30)
    assert (first.jobs["succeeded"], first.pipelines, first.batches) == (4, 0, 0)
    assert app.flows.pipeline_jobs(done.id) == [] and app.flows.batch_jobs(batch.id) == []
    assert pipeline_exists(app, done.id) and batch_exists(app, batch.id)

    month = pruner.run_once(_later(app, 30.1))
    assert (month.pipelines, month.batches) == (1, 1)
    assert not pipeline_exists(app, done.id) and not batch_exists(app, batch.id)
    assert pruner.run_once(_later(app, 3650)).pipelines == 0  # never the running ones
    assert pipeline_exists(app, running.id) and batch_exists(app, open_batch.id)
    assert app.get_pipeline(running.id).state == "running"


def test_a_pipeline_or_batch_stays_while_any_of_its_jobs_does(app: Conveyor) -> None:
    @app.task(name="pr.fails")
    def fails() -> None:
        raise RuntimeError("no")

    failed = app.pipeline("pr.fails", [fails.step(max_attempts=1)]).start()
    batch = app.batch([fails.options(max_attempts=1).request()])
    app.drain()
    assert app.get_pipeline(failed.id).state == "failed" and app.get_batch(batch.id).complete
    (dead,) = app.flows.pipeline_jobs(failed.id)
    assert dead.state == "dead"
    retention = Retention(dead=None, pipelines=DAY, batches=DAY)  # dead jobs kept for ever
    pruner = Pruner(app.backend, retention)

    kept = pruner.run_once(_later(app, 365))
    assert (kept.pipelines, kept.batches) == (0, 0)
    assert pipeline_exists(app, failed.id) and batch_exists(app, batch.id)
    for job in [dead, *app.flows.batch_jobs(batch.id)]:
        assert app.delete_job(job.id)
    gone = pruner.run_once(_later(app, 365))
    assert (gone.pipelines, gone.batches) == (1, 1)
    assert not pipeline_exists(app, failed.id) and not batch_exists(app, batch.id)
    forever = Retention(pipelines=None, batches=None)
    assert Pruner(app.backend, forever).run_once(_later(app, 3650)).statements == 4


def test_retention_is_configurable_per_state(app: Conveyor) -> None:
    succeeded, dead, cancelled = _finished(app, S), _finished(app, D), _finished(app, C)
    retention = Retention(succeeded=timedelta(hours=1), cancelled=None, dead=2 * DAY, events=None)
    pruner = Pruner(app.backend, retention)

    assert pruner.run_once(_later(app, 0.5 / 24)).total_jobs == 0
    assert pruner.run_once(_later(app, 1.5 / 24)).jobs == {"succeeded": 1, "dead": 0}
    result = pruner.run_once(_later(app, 3650))
    assert result.jobs == {"succeeded": 0, "dead": 1} and result.events == 0
    assert not job_exists(app, succeeded[0]) and not job_exists(app, dead[0])
    assert job_exists(app, cancelled[0]) and app.job_history(cancelled[0])  # kept for ever


def test_retention_and_pruner_reject_bad_settings(app: Conveyor) -> None:
    for bad in (0, -1, "7d", True, timedelta(0)):
        with pytest.raises(ConfigurationError, match="retention succeeded="):
            Retention(succeeded=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="retention batches="):
            Retention(batches=bad)  # type: ignore[arg-type]
    assert Retention(dead=timedelta(days=2)).dead == 2 * DAY
    assert Retention(pipelines=timedelta(hours=1)).pipelines == 3600.0
    with pytest.raises(ConfigurationError, match="batch_size"):
        Pruner(app.backend, batch_size=0)
    with pytest.raises(ConfigurationError, match="retention must be"):
        Conveyor(app.url, retention={"succeeded": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prune_interval"):
        Worker(app, prune_interval=0)


def test_pruner_deletes_in_bounded_batches(app: Conveyor) -> None:
    succeeded, dead = _finished(app, S, 25), _finished(app, D, 10)
    calls: list[tuple[str, int, int]] = []
    prune_jobs, prune_events = app.backend.job_prune, app.backend.event_prune

    def spy_jobs(state: JobState, older_than: float, limit: int, now: Any = None) -> int:
        deleted = prune_jobs(state, older_than, limit, now)
        calls.append((state.value, limit, deleted))
        return deleted

    def spy_events(older_than: float, limit: int, now: Any = None) -> int:
        deleted = prune_events(older_than, limit, now)
        calls.append(("events", limit, deleted))
        return deleted

    app.backend.job_prune = spy_jobs  # type: ignore[method-assign]
    app.backend.event_prune = spy_events  # type: ignore[method-assign]
    result = Pruner(app.backend, Retention(dead=DAY), batch_size=10).run_once(_later(app, 8))

    assert calls == [
        ("succeeded", 10, 10),
        ("succeeded", 10, 10),
        ("succeeded", 10, 5),
        ("cancelled", 10, 0),
        ("dead", 10, 10),
        ("dead", 10, 0),  # a full batch may not be the last
        ("events", 10, 0),
    ]
    assert result.jobs == {"succeeded": 25, "cancelled": 0, "dead": 10}
    assert result.statements == 9  # with one for pipelines and one for batches
    assert not any(job_exists(app, i) for i in [*succeeded, *dead])


def test_two_pruners_at_once_are_safe(app: Conveyor, raw: RawDB) -> None:
    old = _finished(app, S, 400)
    kept = _finished(app, D, 5)
    apps = [Conveyor(app.url), Conveyor(app.url)]  # two processes' worth of connections
    pruners = [Pruner(a.backend, batch_size=25) for a in apps]
    results: list[PruneResult] = []
    now = _later(app, 8)
    try:
        together(*(lambda p=p: results.append(p.run_once(now)) for p in pruners))
    finally:
        for a in apps:
            a.close()
    assert len(results) == 2
    # every old job deleted exactly once, between them; nothing else touched
    assert sum(r.jobs.get("succeeded", 0) for r in results) == len(old)
    assert raw.count_jobs() == len(kept) and all(job_exists(app, i) for i in kept)
    assert raw.scalar("SELECT count(*) FROM conveyor_job_events") == 3 * len(kept)


def test_a_pruner_skips_its_run_while_another_holds_the_lock(app: Conveyor) -> None:
    old = _finished(app, S, 3)
    other = Conveyor(app.url)
    try:
        with other.backend.maintenance_lock("prune") as held:
            assert held
            result = Pruner(app.backend).run_once(_later(app, 8))
        if app.backend.name == "postgres":  # the advisory lock excludes every other process
            assert result.skipped and result.total_jobs == 0
            assert all(job_exists(app, i) for i in old)
            assert Pruner(app.backend).run_once(_later(app, 8)).jobs["succeeded"] == 3
        else:  # SQLite: the writer lock serializes each batch; nothing to skip
            assert not result.skipped and result.jobs["succeeded"] == 3
    finally:
        other.close()


def test_one_worker_of_the_fleet_prunes_per_interval(app: Conveyor) -> None:
    contenders = 8
    won: list[str] = []
    apps = [Conveyor(app.url) for _ in range(contenders)]

    def claim(i: int) -> None:
        if apps[i].backend.leader_claim("prune", f"w{i}", 3600):
            won.append(f"w{i}")

    try:
        together(*(lambda i=i: claim(i) for i in range(contenders)))
    finally:
        for a in apps:
            a.close()
    assert len(won) == 1
    pruner = Pruner(app.backend)
    assert pruner.run_if_due("late", 3600) is None  # within the interval: someone already ran
    assert app.backend.leader_claim("prune", "late", 3600, _later(app, 0.5 / 24)) is False
    due = pruner.run_if_due("late", 3600, _later(app, 1.01 / 24))
    assert isinstance(due, PruneResult) and not due.skipped
    assert app.backend.leader_claim("prune", "again", 3600, _later(app, 1.5 / 24)) is False


def test_conveyor_prune_runs_one_pass_now(app: Conveyor, db_url: str) -> None:
    old = _finished(app, S, 2)
    runner = CliRunner()
    fresh = runner.invoke(main, ["prune", "--database", db_url])
    assert fresh.exit_code == 0, fresh.output
    assert fresh.output == (
        "pruned 0 jobs (0 succeeded, 0 cancelled, 0 dead), 0 events, 0 pipelines and 0 batches\n"
    )
    raw = RawDB(app)
    try:  # make the jobs 8 days old, as the database sees it
        then = raw.ts(app.backend.db_now() - timedelta(days=8))
        raw.execute(
            "UPDATE conveyor_jobs SET started_at = %s, attempted_at = %s, finished_at = %s",
            (then, then, then),
        )
    finally:
        raw.close()
    as_json = runner.invoke(main, ["prune", "--json", "--database", db_url])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == {
        "jobs": {"succeeded": 2, "cancelled": 0, "dead": 0},
        "events": 0,
        "pipelines": 0,
        "batches": 0,
        "skipped": False,
    }
    assert not any(job_exists(app, i) for i in old)


def test_a_worker_prunes_in_the_background(db_url: str) -> None:
    app = Conveyor(db_url, retention=Retention(succeeded=0.2))
    app.migrate()
    try:

        @app.task(name="p.short")
        def short() -> int:
            return 1

        job = short.enqueue()
        with running_worker(app, poll_interval=0.01, prune_interval=0.1) as worker:
            wait_until(lambda: not job_exists(app, job.id), 20, "the worker to prune the job")
            # the pass that deleted it has counted it (stopping could cut a pass short)
            wait_until(lambda: worker.stats.pruned_jobs, 20, "the prune pass to finish")
        assert worker.stats.pruned_jobs == 1
        assert app.backend.job_events(job.id) == []
    finally:
        app.close()


def test_forgetting_a_job_reads_only_its_own_history_records(app: Conveyor, raw: RawDB) -> None:
    """PostgreSQL: the history records of a deleted job are found through the GIN index of
    job ids. Planned on a small, never-analyzed history table, the lookup read every record
    instead (and decompressed every record's ids: 3.5-4 s for a prune of 1,000 jobs among
    40,000), so the function may not scan the table or its primary key whole."""
    if app.backend.name == "sqlite":
        pytest.skip("SQLite keeps one history row per event, indexed by job")
    import psycopg

    ids = [job_id for _ in range(20) for job_id in _finished(app, JobState.SUCCEEDED, 3)]
    records = raw.scalar("SELECT count(*) FROM conveyor_history")
    assert records >= 40
    stats = (
        "SELECT seq_scan, idx_tup_fetch FROM pg_stat_xact_user_tables"
        " WHERE relid = 'conveyor_history'::regclass"
    )
    # merged, as the pruner does first: an empty pending list made the index look dearer
    raw.scalar("SELECT gin_clean_pending_list('conveyor_history_jobs'::regclass)")
    with psycopg.connect(app.url, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT conveyor_history_forget(%s::bigint[])", (ids[:3],))
        seq_scans, fetched = conn.execute(stats).fetchone()
    assert seq_scans == 0 and fetched < records / 2
    assert app.job_history(ids[3])  # the others' history is intact
