"""Pipelines: ordered steps, one job at a time, each step's job enqueued by the database in the
transaction that records the previous step's success (with its result as the first argument). A
step's deadline counts from that step's own start, never from the pipeline's creation; a step that
outlives it, dies or is cancelled fails the pipeline, and no later step ever runs. The watchdog,
cancellation, a worker killed mid-step, waiting and the CLI, on both backends."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conveyor import (
    Cancel,
    Conveyor,
    ConveyorError,
    JobState,
    Snooze,
    current_job,
)
from conveyor.cli import main
from conveyor.pipelines import (
    Pipeline,
    PipelineDefinition,
    PipelineFailedError,
    PipelineNotFoundError,
    PipelineState,
)
from conveyor.services.rescuer import Rescuer
from conveyor.services.watchdog import Watchdog
from conveyor.states import snooze, succeed

from .conftest import RawDB, past_lease, running_worker, wait_until

RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    PipelineState.RUNNING,
    PipelineState.SUCCEEDED,
    PipelineState.FAILED,
    PipelineState.CANCELLED,
)
HOUR = 3600.0


class Executions:
    """What ran: (step name, job id, snoozes so far), in order, from inside the tasks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: list[tuple[str, int, int]] = []

    def add(self, name: str) -> None:
        job = current_job().job
        with self.lock:
            self.runs.append((name, job.id, job.snoozes))

    def names(self) -> list[str]:
        with self.lock:
            return [name for name, _, _ in self.runs]

    def count(self, name: str) -> int:
        return self.names().count(name)


def _rewind(raw: RawDB, table: str, row_id: int, seconds: float, *columns: str) -> None:
    """Move the row's times ``seconds`` into the past, as if it was written that long ago."""
    if raw.sqlite:
        sets = ", ".join(f"{c} = {c} - %s" for c in columns)
        raw.execute(f"UPDATE {table} SET {sets} WHERE id = %s", (*[seconds] * len(columns), row_id))
    else:
        sets = ", ".join(f"{c} = {c} - %s * interval '1 second'" for c in columns)
        raw.execute(f"UPDATE {table} SET {sets} WHERE id = %s", (*[seconds] * len(columns), row_id))


def _hms(pipeline: Pipeline) -> str:
    assert pipeline.step_started_at is not None
    return f"{pipeline.step_started_at:%H:%M:%S}"


@pytest.fixture
def fast_watchdog(app: Conveyor) -> Conveyor:
    """Workers started in the test check step deadlines every 50 ms."""
    app.watchdog_interval = 0.05
    return app


# -- the setup scenario ----------------------------------------------------------------------------

DEADLINE = 3.0  # of the polling steps: far less than the hour the pipeline waited for a worker


def _setup_pipeline(app: Conveyor, ran: Executions) -> PipelineDefinition:
    @app.task(name="setup.create_files")
    def create_files(project: str) -> dict[str, Any]:
        ran.add("create_files")
        return {"project": project, "files": ["compose.yml", ".env"]}

    @app.task(name="setup.compose_up")
    def compose_up(state: dict[str, Any]) -> dict[str, Any]:
        ran.add("compose_up")
        return {**state, "containers": 3}

    @app.task(name="setup.wait_ready")
    async def wait_ready(state: dict[str, Any]) -> dict[str, Any]:
        ran.add("wait_ready")
        if current_job().job.snoozes < 4:  # "not ready yet": poll again shortly
            raise Snooze(0.02)
        return {**state, "ready": True}

    @app.task(name="setup.create_session")
    def create_session(state: dict[str, Any]) -> dict[str, Any]:
        ran.add("create_session")
        return {**state, "session": f"sess-{state['project']}"}

    @app.task(name="setup.send_first_prompt")
    async def send_first_prompt(state: dict[str, Any], prompt: str) -> dict[str, Any]:
        ran.add("send_first_prompt")
        return {**state, "prompt": prompt}

    @app.task(name="setup.wait_idle")
    def wait_idle(state: dict[str, Any]) -> dict[str, Any]:
        ran.add("wait_idle")
        if current_job().job.snoozes < 2:
            raise Snooze(0.02)
        return {**state, "idle": True}

    return app.pipeline(
        "setup_project",
        [
            create_files.step(),
            compose_up.step(deadline=DEADLINE),
            wait_ready.step(deadline=DEADLINE, queue="docker"),
            create_session.step(max_attempts=3),
            send_first_prompt.step(args=["hello"], timeout=10),
            wait_idle.step(deadline=DEADLINE),
        ],
    )


def test_the_setup_pipeline_succeeds_though_its_worker_starts_an_hour_late(
    fast_watchdog: Conveyor, raw: RawDB
) -> None:
    app = fast_watchdog
    ran = Executions()
    setup = _setup_pipeline(app, ran)
    run = setup.start(entity="proj_42", args=["proj_42"])
    assert (run.state, run.step, run.current_step, run.entity) == (
        RUNNING,
        "create_files",
        0,
        "proj_42",
    )
    assert run.step_started_at is None  # no worker yet
    assert [j.args for j in run.jobs()] == [["proj_42"]]

    # No worker for an hour: the pipeline (and its first job) are an hour old when one starts.
    _rewind(raw, "conveyor_pipelines", run.id, HOUR, "created_at", "updated_at")
    _rewind(raw, "conveyor_jobs", run.current_job_id or 0, HOUR, "created_at", "run_at")
    in_an_hour = app.backend.db_now() + timedelta(hours=1)
    assert Watchdog(app.backend).run_once(now=in_an_hour) == []  # nothing has started: no deadline

    with running_worker(app, queues=["default"], poll_interval=0.01, lease=5):
        # the general worker runs the first two steps; the docker step waits for its worker ...
        waiting = wait_until(
            lambda: (p := app.get_pipeline(run.id)).step == "wait_ready" and p, 30, "step 3"
        )
        assert waiting.state == RUNNING and waiting.step_started_at is None
        # ... for an hour too, longer than its deadline, without starting it
        _rewind(raw, "conveyor_jobs", waiting.current_job_id or 0, HOUR, "created_at", "run_at")
        assert Watchdog(app.backend).run_once(now=in_an_hour) == []
        assert app.get_pipeline(run.id).state == RUNNING
        with running_worker(app, queues=["docker"], poll_interval=0.01, lease=5):
            result = run.result(timeout=60)

    assert result == {
        "project": "proj_42",
        "files": ["compose.yml", ".env"],
        "containers": 3,
        "ready": True,
        "session": "sess-proj_42",
        "prompt": "hello",
        "idle": True,
    }
    done = app.get_pipeline(run.id)
    assert (done.state, done.step, done.current_step, done.error) == (
        SUCCEEDED,
        "wait_idle",
        5,
        None,
    )
    assert done.return_value == result and done.finished_at is not None
    assert done.created_at < done.finished_at - timedelta(hours=1)  # created an hour before

    # each step ran once (the polling ones once per snooze), strictly in order
    names = ran.names()
    assert [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n] == setup_order(setup)
    assert ran.count("wait_ready") == 5 and ran.count("wait_idle") == 3
    jobs = done.jobs()
    assert [j.task.removeprefix("setup.") for j in jobs] == setup_order(setup)
    assert all(j.state == JobState.SUCCEEDED for j in jobs)
    # each later step got the previous one's result first
    for before, after in itertools.pairwise(jobs):
        assert after.args[0] == before.return_value
    assert jobs[4].args == [jobs[3].return_value, "hello"]
    # the polling step's deadline counted from its own start, not from its creation
    ready = jobs[2]
    assert ready.snoozes == 4 and ready.deadline == DEADLINE
    assert ready.started_at is not None and ready.finished_at is not None
    assert ready.started_at - ready.created_at > timedelta(seconds=HOUR)
    assert ready.finished_at - ready.started_at < timedelta(seconds=DEADLINE)
    assert (ready.queue, jobs[3].max_attempts, jobs[4].timeout) == ("docker", 3, 10.0)


def setup_order(setup: PipelineDefinition) -> list[str]:
    return [s.name for s in setup.steps]


# -- deadlines -------------------------------------------------------------------------------------


def test_a_step_snoozing_past_its_deadline_fails_the_pipeline_and_nothing_after_it_runs(
    app: Conveyor,
) -> None:
    app.watchdog_interval = None  # the job's own deadline ends it: the trigger fails the pipeline
    ran = Executions()

    @app.task(name="dl.prepare")
    def prepare() -> str:
        ran.add("prepare")
        return "prepared"

    @app.task(name="dl.wait_ready")
    def wait_ready(_: str) -> None:
        ran.add("wait_ready")
        raise Snooze(0.05)  # never ready

    @app.task(name="dl.after")
    def after(_: Any) -> None:
        ran.add("after")

    pipeline = app.pipeline(
        "never_ready", [prepare.step(), wait_ready.step(deadline=0.4), after.step()]
    )
    run = pipeline.start()
    with running_worker(app, poll_interval=0.01), pytest.raises(PipelineFailedError) as failed:
        run.result(timeout=30)

    done = failed.value.pipeline
    assert (done.state, done.step, done.current_step) == (FAILED, "wait_ready", 1)
    expected = f"step wait_ready exceeded its 0.4 s deadline (started {_hms(done)})"
    assert done.error == failed.value.error == expected
    assert str(failed.value) == f"pipeline {run.id} (never_ready) failed: {expected}"
    jobs = done.jobs()
    assert [j.task for j in jobs] == ["dl.prepare", "dl.wait_ready"]  # no job for "after"
    step = jobs[1]
    assert step.state == JobState.DEAD and step.last_error is not None
    assert step.last_error["kind"] == "deadline"
    assert done.step_started_at == step.started_at and step.snoozes >= 2
    assert ran.count("after") == 0 and ran.names()[0] == "prepare"
    assert app.list_jobs(task="dl.after") == []


def test_the_watchdog_fails_an_overdue_step_counting_from_its_start(
    app: Conveyor, raw: RawDB
) -> None:
    """With an injected clock: a step that has not started is never overdue, however old; once
    started, it is overdue ``deadline`` seconds later, running or snoozing."""
    definition = app.pipeline(
        "watched",
        [
            app.task(name="wd.first", queue="wd1")(lambda: 1).step(),
            app.task(name="wd.slow", queue="wd2")(lambda _: 2).step(deadline=120),
            app.task(name="wd.last", queue="wd3")(lambda _: 3).step(),
        ],
    )
    watchdog = Watchdog(app.backend)
    running_run, snoozed_run = definition.start(), definition.start()
    for _ in (running_run, snoozed_run):
        (first,) = app.backend.job_fetch_available("w", ["wd1"], 1, 30)
        assert app.backend.job_finish_many("w", [succeed(first, "1")]) == {first.id}
    assert app.get_pipeline(running_run.id).step == "slow"
    assert watchdog.run_once(now=app.backend.db_now() + timedelta(days=1)) == []  # not started

    held, snoozer = app.backend.job_fetch_available("w", ["wd2"], 2, 30)
    assert held.started_at is not None and held.attempted_at is not None
    app.backend.job_finish_many("w", [snooze(snoozer, 30.0, app.backend.db_now())])
    assert app.get_job(snoozer.id).state == JobState.QUEUED  # started, then snoozed

    started = max(held.started_at, app.get_job(snoozer.id).started_at or held.started_at)
    assert watchdog.run_once(now=started + timedelta(seconds=119)) == []
    failed = watchdog.run_once(now=started + timedelta(seconds=121))
    assert sorted(p.id for p in failed) == [running_run.id, snoozed_run.id]
    for pipeline, job in zip(sorted(failed, key=lambda p: p.id), (held, snoozer), strict=True):
        expected = f"step slow exceeded its 120 s deadline (started {_hms(pipeline)})"
        assert (pipeline.state, pipeline.error, pipeline.step) == (FAILED, expected, "slow")
        assert pipeline.current_job_id == job.id
        assert pipeline.finished_at is not None
        cancelled = app.get_job(job.id)
        assert cancelled.state == JobState.CANCELLED  # at once, even while running
        assert cancelled.error == expected and cancelled.last_error is not None
        assert cancelled.last_error["kind"] == "deadline"
        assert cancelled.lease_owner is None and pipeline.step_started_at == cancelled.started_at

    # the worker that held the running step lost it: its outcome is dropped, nothing moves on
    assert app.backend.job_heartbeat("w", [held.id], 30) == {}
    assert app.backend.job_finish_many("w", [succeed(held, "2")]) == set()
    assert app.get_pipeline(running_run.id).state == FAILED
    assert app.list_jobs(task="wd.last") == []
    assert watchdog.run_once(now=started + timedelta(days=1)) == []  # handled once


def test_workers_run_the_watchdog_and_interrupt_an_overdue_step(fast_watchdog: Conveyor) -> None:
    app = fast_watchdog
    interrupted = threading.Event()

    @app.task(name="wdw.hang")
    async def hang() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            interrupted.set()
            raise

    @app.task(name="wdw.never")
    def never(_: Any) -> None:
        raise AssertionError("the step after a failed one ran")

    run = app.pipeline("hangs", [hang.step(deadline=0.5), never.step()]).start()
    with running_worker(app, poll_interval=0.01, lease=1.5):
        with pytest.raises(PipelineFailedError, match=r"step hang exceeded its 0.5 s deadline"):
            run.result(timeout=30)
        # the worker's heartbeat finds the lease gone and cancels the task
        assert interrupted.wait(10)
    job = app.get_job(run.current_job_id or 0)
    assert job.state == JobState.CANCELLED and job.attempt == 1
    assert job.finished_at is not None and job.started_at is not None
    assert timedelta(seconds=0.5) <= job.finished_at - job.started_at < timedelta(seconds=10)
    assert app.list_jobs(task="wdw.never") == []


# -- failures and cancellation -------------------------------------------------------------------


def test_a_dead_or_cancelled_step_fails_the_pipeline(app: Conveyor) -> None:
    @app.task(name="f.ok")
    def ok() -> str:
        return "ok"

    @app.task(name="f.broken", max_attempts=2, backoff=0)
    def broken(_: str) -> None:
        raise RuntimeError("compose exploded")

    @app.task(name="f.refuses")
    def refuses(_: str) -> None:
        raise Cancel("no docker on this host")

    @app.task(name="f.after")
    def after(_: Any) -> None:
        raise AssertionError("ran after a failed step")

    @app.task(name="f.flaky")  # default backoff: the retry would come after the deadline
    def flaky(_: str) -> None:
        raise RuntimeError("flaky")

    dies = app.pipeline("dies", [ok.step(), broken.step(), after.step()]).start()
    gives_up = app.pipeline("gives_up", [ok.step(), refuses.step(), after.step()]).start()
    too_late = app.pipeline("too_late", [ok.step(), flaky.step(deadline=0.3), after.step()]).start()
    app.drain(poll_interval=0.01)

    late = app.get_pipeline(too_late.id)
    assert late.error == f"step flaky exceeded its 0.3 s deadline (started {_hms(late)})"
    assert "deadline runs out first" in (app.get_job(late.current_job_id or 0).error or "")

    died, cancelled = app.get_pipeline(dies.id), app.get_pipeline(gives_up.id)
    assert died.state == FAILED and died.step == "broken"
    assert died.error == (
        f"step broken (job {died.current_job_id}) ended dead: RuntimeError: compose exploded"
    )
    assert cancelled.state == FAILED
    assert cancelled.error == (
        f"step refuses (job {cancelled.current_job_id}) was cancelled: no docker on this host"
    )
    with pytest.raises(PipelineFailedError, match="compose exploded"):
        died.result(timeout=0)
    assert app.list_jobs(task="f.after") == []
    assert app.get_job(died.current_job_id or 0).attempt == 2  # retried as its task says first


def test_cancelling_a_pipeline_cancels_its_current_step(app: Conveyor) -> None:
    first = app.task(name="c.first", queue="c1")(lambda: "one")
    second = app.task(name="c.second", queue="c2")(lambda _: "two")
    definition = app.pipeline("cancellable", [first.step(), second.step()])

    queued = definition.start()
    cancelled = queued.cancel()
    assert (cancelled.state, cancelled.error) == (CANCELLED, "cancelled by request")
    assert cancelled.finished_at is not None
    job = app.get_job(queued.current_job_id or 0)
    assert job.state == JobState.CANCELLED and job.error == "cancelled by request"
    with pytest.raises(PipelineFailedError, match="cancelled: cancelled by request"):
        queued.result(timeout=1)

    running = definition.start()
    (claimed,) = app.backend.job_fetch_available("w", ["c1"], 1, 30)
    done = app.cancel_pipeline(running.id, reason="project deleted")
    assert (done.state, done.error, done.step) == (CANCELLED, "project deleted", "first")
    assert done.step_started_at == claimed.started_at
    assert app.get_job(claimed.id).cancel_requested  # its worker is asked to stop
    # the task finished anyway: its success is recorded, but the pipeline does not move on
    assert app.backend.job_finish_many("w", [succeed(claimed, '"one"')]) == {claimed.id}
    assert app.get_pipeline(running.id).state == CANCELLED
    assert app.list_jobs(task="c.second") == []

    assert app.cancel_pipeline(running.id) == app.get_pipeline(running.id)  # finished: unchanged
    with pytest.raises(PipelineNotFoundError):
        app.cancel_pipeline(987_654)
    with pytest.raises(PipelineNotFoundError):
        app.get_pipeline(987_654)


def test_deleting_a_steps_job_fails_the_pipeline(app: Conveyor) -> None:
    step = app.task(name="d.step", queue="d")(lambda: None)
    run = app.pipeline("deleted", [step.step(), step.step(name="again")]).start()
    assert app.delete_job(run.current_job_id or 0)
    failed = app.get_pipeline(run.id)
    assert failed.state == FAILED
    assert failed.error == f"step step (job {run.current_job_id}) was deleted"


# -- a worker killed mid-step ----------------------------------------------------------------------

_DOOMED_WORKER = """
import asyncio, pathlib, sys, time
from conveyor import Conveyor, Worker

app = Conveyor(sys.argv[1])
marker = pathlib.Path(sys.argv[2])

@app.task(name="crash.deploy")
def deploy(previous):
    partial = marker.with_suffix(".partial")
    partial.write_text(str(previous))
    partial.rename(marker)  # atomic: the test never reads a half-written marker
    time.sleep(600)  # killed in here

asyncio.run(Worker(app, queues=["crash"], lease=30, poll_interval=0.01, worker_id="doomed").run())
"""


@pytest.fixture
def doomed_worker(db_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    marker = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, "-c", _DOOMED_WORKER, db_url, str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc, marker
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_a_worker_killed_mid_step_is_recovered_and_the_pipeline_goes_on(
    app: Conveyor, doomed_worker: tuple[subprocess.Popen[str], Path]
) -> None:
    ran = Executions()

    @app.task(name="crash.build", queue="pre")
    def build() -> int:
        ran.add("build")
        return 41

    @app.task(name="crash.deploy", queue="crash")
    def deploy(previous: int) -> int:  # here, the run after the crash
        ran.add("deploy")
        return previous + 1

    @app.task(name="crash.announce", queue="post")
    def announce(previous: int) -> str:
        ran.add("announce")
        return f"deployed {previous}"

    run = app.pipeline("deploy", [build.step(), deploy.step(), announce.step()]).start()
    app.drain(queues=["pre"], poll_interval=0.01)
    proc, marker = doomed_worker
    wait_until(marker.exists, 30, "the doomed worker to start the step")
    assert marker.read_text() == "41"
    step = app.get_pipeline(run.id)
    job = app.get_job(step.current_job_id or 0)
    assert (step.step, job.state, job.lease_owner) == ("deploy", JobState.RUNNING, "doomed")

    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert app.get_job(job.id).state == JobState.RUNNING  # nobody told the database
    (rescued,) = Rescuer(app.backend).run_once(now=past_lease(job))
    assert (rescued.id, rescued.state) == (job.id, JobState.RETRYING)
    assert app.get_pipeline(run.id).state == RUNNING  # a retry is no failure

    with running_worker(app, queues=["crash", "post"], poll_interval=0.01):
        assert run.result(timeout=30) == "deployed 42"
    deployed = app.get_job(job.id)
    assert deployed.state == JobState.SUCCEEDED and deployed.attempt == 2
    assert [e["message"] for e in deployed.errors] == ["lease expired: worker doomed lost"]
    assert ran.names() == ["build", "deploy", "announce"]  # this process's runs: once each


# -- waiting ---------------------------------------------------------------------------------------


def _advance(app: Conveyor, queue: str, result: str = '"ok"') -> None:
    """Another worker (here: the test) finishes the job of ``queue``."""
    (job,) = app.backend.job_fetch_available("w", [queue], 1, 30)
    assert app.backend.job_finish_many("w", [succeed(job, result)]) == {job.id}


@pytest.fixture
def other(app: Conveyor) -> Iterator[Conveyor]:
    """A second app on the same database, as another process would be."""
    second = Conveyor(app.url)
    yield second
    second.close()


def test_waiting_for_a_pipeline_to_move_on_or_finish(app: Conveyor, other: Conveyor) -> None:
    app.result_poll_interval = 60.0  # PostgreSQL: only the notification can wake it in time
    steps = [app.task(name=f"w.s{i}", queue=f"w{i}")(lambda *_: None).step() for i in range(3)]
    run = app.pipeline("waited", steps).start()

    moved: dict[str, Any] = {}

    def watch() -> None:
        moved["first"] = run.next_change(timeout=30)
        moved["at"] = time.monotonic()

    watcher = threading.Thread(target=watch)
    watcher.start()
    wait_until(lambda: f"p{run.id}" in app._flow_waiter._wakers, 10, "the watcher to wait")
    _advance(other, "w0", "10")
    advanced_at = time.monotonic()
    watcher.join(timeout=30)
    first = moved["first"]
    assert (first.step, first.current_step, first.state) == ("s1", 1, RUNNING)
    assert moved["at"] - advanced_at < 1.5  # SQLite: one 500 ms poll at most; PostgreSQL: pushed
    assert app.get_job(first.current_job_id or 0).args == [10]

    with pytest.raises(TimeoutError, match=r"still running at step s1 after 0.2 s"):
        first.next_change(timeout=0.2)
    with pytest.raises(TimeoutError):
        first.result(timeout=0)

    async def finish() -> Any:
        waiting = asyncio.create_task(first.wait(timeout=30))
        changed = asyncio.create_task(first.next_change_async(timeout=30))
        await asyncio.to_thread(
            wait_until,
            lambda: len(app._flow_waiter._wakers.get(f"p{run.id}", ())) >= 2,
            10,
            "both async waiters",
        )
        await asyncio.to_thread(_advance, other, "w1", '"twenty"')
        second = await changed
        await asyncio.to_thread(_advance, other, "w2", '{"done": true}')
        return second, await waiting

    second, value = asyncio.run(finish())
    assert second.step == "s2" and value == {"done": True}
    assert app.get_pipeline(run.id).result(timeout=0) == {"done": True}


def test_listing_pipelines_and_their_jobs(app: Conveyor) -> None:
    a = app.task(name="l.a", queue="la")(lambda: "a")
    b = app.task(name="l.b", queue="lb")(lambda _: "b")
    definition = app.pipeline("listed", [a.step(), b.step()])
    other_def = app.pipeline("other", [a.step()])
    first = definition.start(entity="proj_1")
    second = definition.start(entity="proj_2")
    third = other_def.start(entity="proj_1")
    _advance(app, "la")
    assert [p.id for p in app.list_pipelines()] == [third.id, second.id, first.id]
    assert [p.id for p in app.list_pipelines(entity="proj_1")] == [third.id, first.id]
    assert [p.id for p in app.list_pipelines(name="listed", limit=1)] == [second.id]
    moved = app.get_pipeline(first.id)
    assert (moved.step, moved.step_names) == ("b", ["a", "b"])
    assert [j.task for j in moved.jobs()] == ["l.a", "l.b"]
    assert app.list_pipelines(state="succeeded") == []


# -- definitions -----------------------------------------------------------------------------------


def test_pipeline_definitions_are_checked_up_front(app: Conveyor) -> None:
    @app.task(name="v.task")
    def task(_: Any = None) -> None: ...

    assert task.step().name == "task"
    assert app.pipeline("plain", [task, task.step(name="twice")]).steps[0].name == "task"
    bad: list[tuple[Any, str]] = [
        (lambda: app.pipeline("", [task.step()]), "invalid pipeline name"),
        (lambda: app.pipeline("x", []), "non-empty list"),
        (lambda: app.pipeline("x", [task.step(), task.step()]), "two steps are named 'task'"),
        (lambda: app.pipeline("x", ["v.task"]), "build steps with task.step"),
        (lambda: app.pipeline("x", [task.options(priority=1)]), "use task.step"),
        (lambda: task.step(unique_key="k"), "unique_key cannot be used"),
        (lambda: task.step(depends_on=[1]), "depends_on cannot be used"),
        (lambda: task.step(deadline=0), "deadline=0 must be > 0"),
        (lambda: task.step(name="bad name"), "invalid step name"),
        (lambda: task.step(args="x"), "args must be a list"),
        (lambda: task.step(args=[object()]), "not JSON-serializable"),
        (lambda: task.step(bogus=1), "unknown option 'bogus'"),
        (lambda: task.step(backoff=3), "backoff is the task's own"),
        (lambda: app.pipeline("x", [task.step()]).start(entity=""), "entity"),
        (lambda: app.pipeline("x", [task.step()]).start(args=[{1, 2}]), "not JSON"),
    ]
    for make, message in bad:
        with pytest.raises(ConveyorError, match=message):
            make()
    assert app.list_pipelines() == []  # nothing was started


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_shows_where_each_pipeline_is(app: Conveyor, db_url: str) -> None:
    a = app.task(name="cli.fetch", queue="cq1")(lambda: "fetched")
    b = app.task(name="cli.build", queue="cq2")(lambda _: "built")
    run = app.pipeline("ship", [a.step(), b.step(deadline=60)]).start(entity="proj_9")
    _advance(app, "cq1", '"fetched"')
    (building,) = app.backend.job_fetch_available("w", ["cq2"], 1, 30)
    runner = CliRunner()

    listed = runner.invoke(main, ["pipelines", "list", "--json", "--database", db_url])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.output)
    assert (row["id"], row["name"], row["entity"], row["state"]) == (
        run.id,
        "ship",
        "proj_9",
        "running",
    )
    assert (row["step"], row["step_index"], row["steps"]) == ("build", 1, ["fetch", "build"])
    assert row["step_started_at"] == str(building.started_at) and row["step_deadline"] == 60

    table = runner.invoke(main, ["pipelines", "list", "--database", db_url], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "2/2 build" in table.output and "proj_9" in table.output

    shown = runner.invoke(main, ["pipelines", "show", str(run.id), "--json", "--database", db_url])
    data = json.loads(shown.output)
    assert [(s["step"], s["state"]) for s in data["steps"]] == [
        ("fetch", "succeeded"),
        ("build", "running"),
    ]
    text = runner.invoke(main, ["pipelines", "show", str(run.id), "--database", db_url]).output
    assert "> 2. build (cli.build, queue cq2, deadline 60 s)" in text

    cancelled = runner.invoke(main, ["pipelines", "cancel", str(run.id), "--database", db_url])
    assert cancelled.output == f"pipeline {run.id} cancelled at step build\n"
    missing = runner.invoke(main, ["pipelines", "show", "999999", "--database", db_url])
    assert missing.exit_code == 1 and "no pipeline with id 999999" in missing.output
