"""The ``conveyor`` command: migrate, worker, enqueue, stats, jobs, pipelines, prune, demo.

Conveyor's own errors (bad URL, unreachable server, schema not migrated or too new, bad input)
print as one line on stderr and exit 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import importlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from .app import Conveyor
from .bench_settings import BenchSettings as Bench
from .errors import ConfigurationError, ConveyorError
from .job import Job, JobEvent, JobState
from .periodic import Cron, Every, Periodic
from .pipelines import Pipeline, PipelineState
from .services.pruner import Pruner
from .worker import Worker

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text
#: Control characters (but newline and tab): shown escaped, so stored text cannot drive the
#: terminal (cursor moves, titles, hyperlinks) when a command prints it.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _printable(text: object) -> str:
    """Text from the database (error messages, tracebacks, names) made safe for a terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))


@functools.cache
def _console() -> Console:
    """The terminal tables print to. rich is imported on the first table: a worker never prints
    one, and importing rich was about a sixth of a worker's start."""
    from rich.console import Console

    return Console()


def _echo(text: object) -> None:
    click.echo(_printable(text))


def _cells(*values: object) -> list[Text]:
    """Table cells as plain text: never read as rich markup (``[link=...]``, ``[bold]``)."""
    from rich.text import Text

    return [Text(_printable(v)) for v in values]


def _table(columns: Iterable[str], rows: Iterable[Iterable[object]]) -> Table:
    """A table of these columns, each row's values as plain-text cells (see ``_cells``)."""
    from rich.table import Table

    table = Table()
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*_cells(*row))
    return table


def load_app(spec: str) -> Conveyor:
    """Import ``module:attribute`` (the current directory is importable) and check it is an app."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"--app {spec!r} must look like module:app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"--app {spec!r}: cannot import {module_name!r}: {exc}") from None
    app = getattr(module, attr, None)
    if not isinstance(app, Conveyor):
        raise ConfigurationError(f"--app {spec!r}: {attr!r} in {module_name} is not a Conveyor app")
    return app


def resolve_app(database: str | None, app_spec: str | None) -> Conveyor:
    if app_spec:
        app = load_app(app_spec)
        if database:
            app.url = database
        return app
    return Conveyor(database)


def with_app(
    require_app: bool = False,
    pass_app_given: bool = False,
    setup: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add --database/--app to a command and pass it ``app=resolve_app(database, app_spec)``.

    ``require_app``: fail unless --app is given (the worker's check); ``pass_app_given``: also
    pass ``app_given``; ``setup(kwargs)`` runs before the app is imported (e.g. logging config).
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(*args: Any, database: str | None, app_spec: str | None, **kwargs: Any) -> Any:
            if require_app and not app_spec:
                raise ConfigurationError(
                    f"{fn.__name__} needs --app module:app (the app that defines its tasks)"
                )
            if pass_app_given:
                kwargs["app_given"] = bool(app_spec)
            if setup is not None:
                setup(kwargs)
            return fn(*args, app=resolve_app(database, app_spec), **kwargs)

        wrapped = click.option(
            "--app",
            "app_spec",
            metavar="MODULE:APP",
            help="Import the app (its tasks and database).",
        )(command)
        return click.option(
            "--database",
            "-d",
            envvar="CONVEYOR_DATABASE_URL",
            metavar="URL",
            help="sqlite:///file.db or postgresql://... (default: $CONVEYOR_DATABASE_URL, the "
            "app's, else sqlite:///conveyor.db)",
        )(wrapped)

    return decorate


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConveyorError as exc:
            # One line, even when a driver's message (e.g. psycopg's) carries newlines.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            message = " ".join(lines) or type(exc).__name__
            click.echo(f"conveyor: error: {message}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="conveyor")
def main() -> None:
    """Conveyor: durable jobs on SQLite or PostgreSQL."""


@main.command()
@with_app()
def migrate(app: Conveyor) -> None:
    """Create or upgrade the Conveyor schema (safe to run repeatedly and concurrently)."""
    applied = app.migrate()
    version = app.raw_backend.schema_version()
    if applied:
        click.echo(f"applied migrations {', '.join(map(str, applied))}; schema version {version}")
    else:
        click.echo(f"schema up to date (version {version})")


@main.command()
@with_app(require_app=True, setup=lambda kw: _configure_logging(kw["log_level"]))
@click.option("--queues", "-q", help="Comma-separated queues (default: every queue the app names).")
@click.option("--concurrency", "-c", default=10, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--lease", default=30.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds."
)
@click.option(
    "--grace", default=30.0, show_default=True, type=click.FloatRange(min=0), help="Seconds."
)
@click.option("--poll-interval", default=1.0, show_default=True, type=click.FloatRange(min=0.001))
@click.option(
    "--prune-interval",
    default=3600.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds between fleet-wide prunes of old jobs and history; 0: never from this worker.",
)
@click.option(
    "--vacuum-interval",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds between looks at the jobs table's dead rows (PostgreSQL), vacuumed past "
    "50,000; 0: never from this worker.",
)
@click.option(
    "--batch-size",
    default=100,
    show_default=True,
    type=click.IntRange(min=1, max=10_000),
    help="Most jobs per claim and outcomes per write.",
)
@click.option("--log-level", default="INFO", show_default=True)
@click.option(
    "--loop",
    "loop_kind",
    type=click.Choice(["auto", "asyncio", "uvloop"]),
    default="auto",
    show_default=True,
    help="Event loop: auto uses uvloop where it is installed (pip install 'conveyor[speed]').",
)
def worker(
    app: Conveyor,
    queues: str | None,
    concurrency: int,
    lease: float,
    grace: float,
    poll_interval: float,
    prune_interval: float,
    vacuum_interval: float,
    batch_size: int,
    log_level: str,
    loop_kind: str,
) -> None:
    """Run jobs. SIGTERM/SIGINT: stop claiming, finish within --grace, hand the rest back;
    a second signal exits at once."""
    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    w = Worker(
        app,
        queues=queue_list,
        concurrency=concurrency,
        lease=lease,
        grace=grace,
        poll_interval=poll_interval,
        prune_interval=prune_interval or None,
        vacuum_interval=vacuum_interval or None,
        batch_size=batch_size,
    )
    app.backend  # noqa: B018 - fail fast, before the loop starts, on a bad URL or schema
    _tune_collector()
    with asyncio.Runner(loop_factory=_loop_factory(loop_kind)) as runner:
        runner.run(_run_until_signalled(w))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(
        0
    )  # sync tasks abandoned at shutdown may still hold threads; their jobs are handed back


def _tune_collector() -> None:
    """For this worker process only (never for a Worker embedded in an application): what it
    loaded and built to start (modules, the app) is frozen out of the cycle collector's passes,
    and a pass comes after 10,000 new objects rather than 700. Every claimed job makes a few
    dozen objects, so the collector ran every few jobs over everything alive: a fifth of a
    short job's CPU. Nothing a job leaves in a reference cycle is missed, only found later."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def _loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The worker's event loop: uvloop (about a fifth faster on short jobs) where installed."""
    if kind == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise click.ClickException(
                "--loop uvloop: uvloop is not installed (pip install 'conveyor[speed]')"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _configure_logging(log_level: str) -> None:
    # before the app is imported, so that its import-time logging is configured too
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


async def _run_until_signalled(w: Worker) -> None:
    loop = asyncio.get_running_loop()
    received: list[str] = []
    log = logging.getLogger("conveyor.worker")

    def on_signal(name: str) -> None:
        received.append(name)
        if len(received) == 1:
            log.info(
                "%s: stopping; running jobs have %.0f s to finish (signal again to exit now)",
                name,
                w.grace,
            )
            w.stop()
        else:
            log.warning(
                "%s again: exiting now; unfinished jobs are recovered when their lease expires",
                name,
            )
            os._exit(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    log.info(
        "worker %s started: queues %s, concurrency %d", w.id, ",".join(w.queues), w.concurrency
    )
    await w.run()
    log.info(
        "worker %s stopped: %d claimed, %s, %d handed back",
        w.id,
        w.stats.claimed,
        dict(w.stats.outcomes),
        w.stats.handed_back,
    )


@main.command()
@with_app(pass_app_given=True)
@click.argument("task")
@click.option("--args", "args_json", default="[]", show_default=True, help="JSON array.")
@click.option("--kwargs", "kwargs_json", default="{}", show_default=True, help="JSON object.")
@click.option("--queue", help="Queue (default: the task's, else 'default').")
@click.option("--delay", type=float, help="Seconds before the job is due.")
@click.option("--priority", type=int)
@click.option("--max-attempts", type=int)
@click.option("--unique-key")
@click.option("--idempotency-key")
@click.option("--concurrency-key")
@click.option(
    "--depends-on", metavar="IDS", help="Comma-separated ids of jobs that must succeed first."
)
def enqueue(
    app: Conveyor,
    app_given: bool,
    task: str,
    args_json: str,
    kwargs_json: str,
    depends_on: str | None,
    **options: Any,
) -> None:
    """Enqueue TASK. With --app the task must be registered (its options apply)."""
    args = _json_arg("--args", args_json, list)
    kwargs = _json_arg("--kwargs", kwargs_json, dict)
    opts = {k: v for k, v in options.items() if v is not None}
    if depends_on is not None:
        opts["depends_on"] = _ids_arg("--depends-on", depends_on)
    if app_given:
        registered = app.get_task(task)
        job = registered.options(**opts).enqueue(*args, **kwargs)
    else:
        job = app.enqueue_raw(task, args, kwargs, **opts)
    note = " (already enqueued: existing job returned)" if job.deduplicated else ""
    click.echo(f"job {job.id} {job.state} in queue {job.queue}{note}")


def _ids_arg(flag: str, text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ConfigurationError(f"{flag} {text!r} must be comma-separated job ids, like 12,13")
    return [int(p) for p in parts]


def _json_arg(flag: str, text: str, kind: type) -> Any:
    # The text is not echoed whole: it may be large, or hold a secret.
    shown = text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, too many digits, too deep
        reason = str(exc).splitlines()[0] if isinstance(exc, ValueError) else "nested too deep"
        raise ConfigurationError(f"{flag} {shown!r} is not valid JSON: {reason}") from None
    if not isinstance(value, kind):
        raise ConfigurationError(
            f"{flag} must be a JSON {'array' if kind is list else 'object'}, got {shown!r}"
        )
    return value


@main.command()
@with_app()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(app: Conveyor, as_json: bool) -> None:
    """Per queue: jobs per state, age of the oldest due job, running jobs."""
    rows = app.stats()
    if as_json:
        click.echo(json.dumps([stats_dict(s) for s in rows], indent=2))
        return
    _console().print(stats_table(rows))


def stats_dict(s: Any) -> dict[str, Any]:
    return {
        "queue": s.queue,
        "counts": {state.value: s.counts.get(state.value, 0) for state in JobState},
        "running": s.running,
        "oldest_due_age_s": s.oldest_due_age,
        "concurrency_limit": s.concurrency_limit,
    }


def stats_table(rows: list[Any]) -> Table:
    from rich.table import Table

    table = Table(title="Conveyor queues")
    table.add_column("queue")
    for state in JobState:
        table.add_column(state.value, justify="right")
    table.add_column("oldest due", justify="right")
    table.add_column("limit", justify="right")
    for s in rows:
        age = "-" if s.oldest_due_age is None else f"{s.oldest_due_age:.1f} s"
        limit = "-" if s.concurrency_limit is None else str(s.concurrency_limit)
        table.add_row(*_cells(s.queue, *(s.counts.get(st.value, 0) for st in JobState), age, limit))
    return table


@main.group()
def jobs() -> None:
    """Inspect and act on jobs."""


@jobs.command("list")
@with_app()
@click.option("--state", type=click.Choice([s.value for s in JobState]))
@click.option("--queue")
@click.option("--task")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
def jobs_list(
    app: Conveyor,
    state: str | None,
    queue: str | None,
    task: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List jobs, newest first."""
    rows = [
        app.redacted(j) for j in app.list_jobs(state=state, queue=queue, task=task, limit=limit)
    ]
    if as_json:
        click.echo(json.dumps([job_dict(j) for j in rows], indent=2, default=str))
        return
    columns = ("id", "queue", "task", "state", "attempt", "snoozes", "run_at", "error")
    cells = (
        (
            j.id,
            j.queue,
            j.task,
            j.state.value,
            f"{j.attempt}/{j.max_attempts}",
            j.snoozes,
            j.run_at.isoformat(timespec="seconds"),
            (j.error or "")[:60],
        )
        for j in rows
    )
    _console().print(_table(columns, cells))


def job_dict(job: Job) -> dict[str, Any]:
    names = [k for k in job.__dataclass_fields__ if k != "deduplicated"]
    # the return value is shown under the stored column's name, "result"
    out = {("result" if k == "return_value" else k): getattr(job, k) for k in names}
    out["state"] = job.state.value
    return out


@jobs.command("show")
@with_app()
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True)
def jobs_show(app: Conveyor, job_id: int, as_json: bool) -> None:
    """Everything about one job, with its error history and its history of transitions."""
    stored = app.get_job(job_id)
    history = app.redacted_history(stored, app.job_history(job_id))
    job = app.redacted(stored)  # redacted fields and their values in error text: "[redacted]"
    data = job_dict(job)
    data["depends_on"] = app.job_dependencies(job_id)
    if as_json:
        data["history"] = [event_dict(e) for e in history]
        click.echo(json.dumps(data, indent=2, default=str))
        return
    errors = data.pop("errors")
    data.pop("last_error")
    _print_fields(data, 18)
    if not isinstance(errors, list):  # unreadable in the database
        _echo(f"\nerrors: {errors}")
        errors = []
    for entry in errors:
        if not isinstance(entry, dict):
            _echo(f"\nerror: {entry}")
            continue
        _echo(
            f"\nattempt {entry.get('attempt')} at {entry.get('at')} [{entry.get('kind')}]: {entry.get('message')}"
        )
        if entry.get("traceback"):
            _echo(str(entry["traceback"]).rstrip())
    click.echo("\nhistory:")
    for event in history:
        _echo(event_line(event))


def _print_fields(data: dict[str, Any], width: int) -> None:
    for key, value in data.items():
        _echo(f"{key:>{width}}: {value}")


def event_dict(event: JobEvent) -> dict[str, Any]:
    return {
        "at": event.at.isoformat(),
        "from_state": None if event.from_state is None else event.from_state.value,
        "to_state": event.to_state.value,
        "worker": event.worker,
        "attempt": event.attempt,
        "error": event.error,
    }


def event_line(event: JobEvent) -> str:
    """One transition as a line: ``<time>  queued -> running  attempt 1  worker w1``."""
    source = "(enqueued)" if event.from_state is None else event.from_state.value
    line = f"  {event.at.isoformat(timespec='milliseconds')}  {source} -> {event.to_state.value}"
    line += f"  attempt {event.attempt}"
    if event.worker:
        line += f"  worker {event.worker}"
    if event.message is not None:
        line += f"  error: {event.message}"
    return line


@jobs.command("retry")
@with_app()
@click.argument("job_id", type=int)
def jobs_retry(app: Conveyor, job_id: int) -> None:
    """Queue a dead or cancelled job again (attempts reset, history kept)."""
    job = app.retry_job(job_id)
    click.echo(f"job {job.id} {job.state}")


@jobs.command("retry-all")
@with_app()
@click.option(
    "--state", type=click.Choice(["dead", "cancelled"]), default="dead", show_default=True
)
@click.option("--queue", help="Only jobs of this queue.")
@click.option("--task", help="Only jobs of this task.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True)
def jobs_retry_all(
    app: Conveyor, state: str, queue: str | None, task: str | None, limit: int, as_json: bool
) -> None:
    """Queue again every dead (or cancelled) job, newest first, up to --limit."""
    result = app.retry_jobs(state=state, queue=queue, task=task, limit=limit)
    if as_json:
        retried = [j.id for j in result.retried]
        skipped = {str(k): v for k, v in result.skipped.items()}
        click.echo(json.dumps({"retried": retried, "skipped": skipped}))
        return
    click.echo(f"retried {len(result.retried)} jobs, skipped {len(result.skipped)}")
    for job_id, why in result.skipped.items():
        click.echo(f"  job {job_id}: {_printable(why)}")


@jobs.command("cancel")
@with_app()
@click.argument("job_id", type=int)
def jobs_cancel(app: Conveyor, job_id: int) -> None:
    """Cancel a waiting job, or ask its worker to cancel a running one."""
    job = app.cancel_job(job_id)
    extra = " (cancellation requested from its worker)" if job.cancel_requested else ""
    click.echo(f"job {job.id} {job.state}{extra}")


@main.group()
def pipelines() -> None:
    """Where each pipeline is: its current step, since when, and its state."""


@pipelines.command("list")
@with_app()
@click.option("--state", type=click.Choice([s.value for s in PipelineState]))
@click.option("--name", help="Only pipelines of this name.")
@click.option("--entity", help="Only pipelines about this entity.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
def pipelines_list(
    app: Conveyor,
    state: str | None,
    name: str | None,
    entity: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List pipelines, newest first, with their current step."""
    rows = app.list_pipelines(state=state, name=name, entity=entity, limit=limit)
    if as_json:
        click.echo(json.dumps([pipeline_dict(p) for p in rows], indent=2, default=str))
        return
    columns = ("id", "name", "entity", "state", "step", "step started", "created", "error")
    cells = (
        (
            p.id,
            p.name,
            p.entity or "",
            p.state.value,
            f"{p.current_step + 1}/{len(p.steps)} {p.step}",
            _time(p.step_started_at),
            _time(p.created_at),
            (p.error or "")[:60],
        )
        for p in rows
    )
    _console().print(_table(columns, cells))


def _time(value: Any) -> str:
    return "-" if value is None else value.isoformat(timespec="seconds")


def pipeline_dict(p: Pipeline) -> dict[str, Any]:
    return {
        "id": p.id,
        "name": p.name,
        "entity": p.entity,
        "state": p.state.value,
        "step": p.step,
        "step_index": p.current_step,
        "steps": p.step_names,
        "current_job_id": p.current_job_id,
        "step_started_at": p.step_started_at,
        "step_deadline": p.step_deadline,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
        "finished_at": p.finished_at,
        "result": p.return_value,
        "error": p.error,
    }


@pipelines.command("show")
@with_app()
@click.argument("pipeline_id", type=int)
@click.option("--json", "as_json", is_flag=True)
def pipelines_show(app: Conveyor, pipeline_id: int, as_json: bool) -> None:
    """One pipeline: its state, and each step with its job."""
    pipeline = app.get_pipeline(pipeline_id)
    jobs = [app.redacted(j) for j in app.pipeline_jobs(pipeline_id)]
    # One job per step that ran, in order, the last one the current step's (old ones may have
    # been pruned, so align from the end).
    offset = len(jobs) - 1 - pipeline.current_step
    steps = []
    for i, spec in enumerate(pipeline.steps):
        k = i + offset
        job = jobs[k] if 0 <= k < len(jobs) and i <= pipeline.current_step else None
        steps.append(
            {
                "step": spec.name or spec.task,
                "task": spec.task,
                "queue": spec.queue,
                "deadline": spec.deadline,
                **_step_job_fields(job),
            }
        )
    data = pipeline_dict(pipeline)
    if as_json:
        data["steps"] = steps
        click.echo(json.dumps(data, indent=2, default=str))
        return
    data.pop("steps")
    _print_fields(data, 16)
    click.echo("\nsteps:")
    for i, step in enumerate(steps):
        mark = ">" if i == pipeline.current_step and not pipeline.state.terminal else " "
        line = f" {mark} {i + 1}. {step['step']} ({step['task']}, queue {step['queue']}"
        line += "" if step["deadline"] is None else f", deadline {step['deadline']:g} s"
        line += ")"
        if step["job_id"] is None:
            line += "  not started"
        else:
            line += f"  job {step['job_id']} {step['state']}, attempt {step['attempt']}"
            line += f", {step['snoozes']} snoozes, started {_time(step['started_at'])}"
            if step["error"]:
                line += f"  error: {step['error']}"
        _echo(line)


def _step_job_fields(job: Job | None) -> dict[str, Any]:
    """A pipeline step's job columns; all None for a step that has not run."""
    if job is None:
        names = ("job_id", "state", "attempt", "snoozes", "started_at", "finished_at", "error")
        return dict.fromkeys(names)
    return {
        "job_id": job.id,
        "state": job.state.value,
        "attempt": job.attempt,
        "snoozes": job.snoozes,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "error": job.error,
    }


@pipelines.command("cancel")
@with_app()
@click.argument("pipeline_id", type=int)
def pipelines_cancel(app: Conveyor, pipeline_id: int) -> None:
    """Cancel a running pipeline and its current step's job."""
    pipeline = app.cancel_pipeline(pipeline_id)
    click.echo(f"pipeline {pipeline.id} {pipeline.state} at step {pipeline.step}")


@main.command()
@with_app(require_app=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def periodic(app: Conveyor, as_json: bool) -> None:
    """The app's periodic jobs: schedule, last tick and next tick (UTC, the database's clock)."""
    now = app.backend.db_now()
    rows = [periodic_dict(p, now) for p in app.periodic_jobs.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    columns = ("name", "task", "schedule", "queue", "last tick", "next tick")
    cells = (
        (r["name"], r["task"], r["schedule"], r["queue"], r["last_tick"] or "", r["next_tick"])
        for r in rows
    )
    _console().print(_table(columns, cells))


def _schedule_text(schedule: Cron | Every) -> str:
    if isinstance(schedule, Every):
        return f"every {schedule.seconds:g} s"
    return schedule.expression if schedule.tz is None else f"{schedule.expression} ({schedule.tz})"


def periodic_dict(p: Periodic, now: datetime) -> dict[str, Any]:
    schedule = p.schedule
    latest, following = schedule.latest(now), schedule.next_after(now)
    return {
        "name": p.name,
        "task": p.task,
        "schedule": _schedule_text(schedule),
        "queue": p.options.settled().queue,
        "last_tick": None if latest is None else latest.isoformat(),
        "next_tick": None if following is None else following.isoformat(),
        "grace": p.grace,
    }


@main.command()
@with_app()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def prune(app: Conveyor, as_json: bool) -> None:
    """Delete finished jobs, history, finished pipelines and completed batches past the app's
    retention now (workers also do this periodically). With --app, its Conveyor(retention=...)
    applies; else the defaults."""
    result = Pruner(app.backend, app.retention).run_once()
    if as_json:
        data = {
            "jobs": result.jobs,
            "events": result.events,
            "pipelines": result.pipelines,
            "batches": result.batches,
            "skipped": result.skipped,
        }
        click.echo(json.dumps(data))
    elif result.skipped:
        click.echo("skipped: another process is pruning")
    else:
        per_state = ", ".join(f"{n} {state}" for state, n in result.jobs.items())
        click.echo(
            f"pruned {result.total_jobs} jobs ({per_state}), {result.events} events, "
            f"{result.pipelines} pipelines and {result.batches} batches"
        )


@main.command()
@click.option(
    "--database", "-d", default="sqlite:///conveyor-demo.db", show_default=True, metavar="URL"
)
@click.option("--jobs", "n_jobs", default=300, show_default=True, type=click.IntRange(10, 100_000))
@click.option("--concurrency", default=20, show_default=True, type=click.IntRange(1, 1000))
def demo(database: str, n_jobs: int, concurrency: int) -> None:
    """Enqueue a few hundred jobs (some fail and retry, some snooze, some die), work them off with
    a progress bar, and print the stats table."""
    from .demo import run_demo

    run_demo(database, n_jobs, concurrency, _console())


@main.command()
@click.option("--database", "-d", required=True, envvar="CONVEYOR_DATABASE_URL", metavar="URL",
              help="Where to run: a fresh schema (PostgreSQL) or file beside it (SQLite) is used and removed.")  # fmt: skip
@click.option(
    "--jobs", "-n", default=Bench.jobs, show_default=True, type=click.IntRange(1, 10_000_000)
)
@click.option(
    "--processes", "-p", default=Bench.processes, show_default=True, type=click.IntRange(1, 64)
)
@click.option(
    "--concurrency",
    "-c",
    default=Bench.concurrency,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Each worker's slots (no-op jobs: enough for two claims in flight).",
)
@click.option(
    "--batch-size",
    default=Bench.batch_size,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="The workers' --batch-size: most jobs per claim and outcomes per write.",
)
@click.option(
    "--poll-interval",
    default=Bench.poll_interval,
    show_default=True,
    type=click.FloatRange(min=0.001),
)
@click.option(
    "--latency-jobs", default=Bench.latency_jobs, show_default=True, type=click.IntRange(1, 100_000)
)
@click.option(
    "--latency-rounds", default=Bench.latency_rounds, show_default=True, type=click.IntRange(1, 100)
)
@click.option(
    "--ceiling",
    is_flag=True,
    help="Also measure the ceiling: 2 x P processes calling the backend's claim and outcome "
    "methods back to back on N more jobs, with no worker around them.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench(
    database: str,
    jobs: int,
    processes: int,
    concurrency: int,
    batch_size: int,
    poll_interval: float,
    latency_jobs: int,
    latency_rounds: int,
    ceiling: bool,
    as_json: bool,
) -> None:
    """Measure enqueue rate, drain rate and pickup latency (the peerbench method)."""
    from .bench import format_result, run_bench

    settings = Bench(
        database=database,
        jobs=jobs,
        processes=processes,
        concurrency=concurrency,
        batch_size=batch_size,
        poll_interval=poll_interval,
        latency_jobs=latency_jobs,
        latency_rounds=latency_rounds,
        ceiling=ceiling,
    )
    result = run_bench(settings)
    click.echo(json.dumps(result) if as_json else format_result(result))
