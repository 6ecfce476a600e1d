"""Bad input is refused before anything is written, with an error that names what was wrong:
arguments that are not JSON, oversize payloads, unknown or invalid options, hostile names; bad
URLs, unreachable servers, and databases that are not migrated or were migrated by a newer
Conveyor."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from conveyor import (
    ConfigurationError,
    Conveyor,
    DatabaseUnavailableError,
    InvalidArgumentsError,
    Job,
    SchemaError,
    UnknownTaskError,
)
from conveyor.backends.migrate import LATEST_VERSION

from .conftest import RawDB, is_sqlite

HOSTILE_NAMES = [
    "'; drop table x",
    "%s",
    "%(task)s",
    'quote"d',
    "it's",
    "a b",
    "",
    "x" * 201,
    "ünïcode",
    "new\nline",
]


def _task(app: Conveyor) -> Any:
    @app.task(name="input.work")
    def work(*args: Any, **kwargs: Any) -> None:
        return None

    return work


Case = Callable[[Conveyor, Any], Any]

BAD_ARGUMENTS: dict[str, tuple[Case, str]] = {
    "datetime in kwargs": (lambda app, t: t.enqueue(when=datetime.now()), "kwargs['when']"),
    "set nested in kwargs": (
        lambda app, t: t.enqueue(opts={"tags": {"a", "b"}}),
        "kwargs['opts']['tags']",
    ),
    "set in args": (lambda app, t: t.enqueue(1, [2, {3}]), "args[1][1]"),
    "decimal": (lambda app, t: t.enqueue(price=Decimal("1.10")), "kwargs['price']"),
    "bytes": (lambda app, t: t.enqueue(b"raw"), "args[0]"),
    "object": (lambda app, t: t.enqueue(cb=object()), "kwargs['cb']"),
    "nan": (lambda app, t: t.enqueue(1.0, math.nan), "args[1]"),
    "infinity": (lambda app, t: t.enqueue(x={"y": [math.inf]}), "kwargs['x']['y'][0]"),
    "non-str key": (lambda app, t: t.enqueue(m={1: "one"}), "kwargs['m'] has key 1"),
    "tuple key": (lambda app, t: t.enqueue({(1, 2): "pair"}), "args[0] has key (1, 2)"),
    "oversize payload": (lambda app, t: t.enqueue("x" * 5000), "over the limit of 1000"),
    "oversize in a batch": (
        lambda app, t: app.enqueue_many([t.request(1), t.request(blob="y" * 5000)]),
        "kwargs is",
    ),
    "bad item in a batch": (
        lambda app, t: app.enqueue_many([t.request(1), t.request(when=datetime.now())]),
        "kwargs['when']",
    ),
}

BAD_OPTIONS: dict[str, tuple[Case, str]] = {
    "unknown option": (lambda app, t: t.options(retries=3).enqueue(), "'retries'"),
    "unknown task option": (lambda app, t: app.task(name="ok", retries=3)(print), "'retries'"),
    "negative delay": (lambda app, t: t.options(delay=-1).enqueue(), "delay=-1"),
    "nan delay": (lambda app, t: t.options(delay=math.nan).enqueue(), "delay=nan"),
    "string priority": (lambda app, t: t.options(priority="high").enqueue(), "priority='high'"),
    "huge priority": (lambda app, t: t.options(priority=10**9).enqueue(), "priority=1000000000"),
    "zero max_attempts": (lambda app, t: t.options(max_attempts=0).enqueue(), "max_attempts=0"),
    "zero timeout": (lambda app, t: t.options(timeout=0).enqueue(), "timeout=0"),
    "zero concurrency_limit": (
        lambda app, t: t.options(concurrency_limit=0).enqueue(),
        "concurrency_limit=0",
    ),
    "naive run_at": (
        lambda app, t: t.options(run_at=datetime(2030, 1, 1)).enqueue(),
        "run_at=datetime.datetime(2030, 1, 1, 0, 0)",
    ),
    "empty unique_key": (lambda app, t: t.options(unique_key="").enqueue(), "unique_key=''"),
    "long idempotency_key": (
        lambda app, t: t.options(idempotency_key="k" * 501).enqueue(),
        "idempotency_key=",
    ),
    "queue limit zero": (lambda app, t: app.queue("q", concurrency=0), "concurrency_limit=0"),
    "unknown task": (lambda app, t: app.enqueue("nobody.home", 1), "'nobody.home'"),
    "not a request": (lambda app, t: app.enqueue_many([("input.work", 1)]), "enqueue_many item 0"),
}


def _hostile_cases() -> dict[str, tuple[Case, str]]:
    cases: dict[str, tuple[Case, str]] = {}
    for name in HOSTILE_NAMES:
        cases[f"queue option {name[:20]!r}"] = (
            lambda app, t, n=name: t.options(queue=n).enqueue(),
            repr(name),
        )
        cases[f"task queue {name[:20]!r}"] = (
            lambda app, t, n=name: app.task(name="fine.name", queue=n)(print),
            repr(name),
        )
        cases[f"queue declaration {name[:20]!r}"] = (
            lambda app, t, n=name: app.queue(n),
            repr(name),
        )
        cases[f"task name {name[:20]!r}"] = (
            lambda app, t, n=name: app.task(name=n)(print),
            repr(name),
        )
    cases["queue name of 101 chars"] = (
        lambda app, t: t.options(queue="q" * 101).enqueue(),
        repr("q" * 101),
    )
    return cases


@pytest.fixture
def earlier(app: Conveyor) -> Job:
    """A job enqueued before the bad input, which must come through untouched."""
    return _task(app).enqueue(1, note="fine")


def _refused_all(
    app: Conveyor, raw: RawDB, earlier: Job, cases: dict[str, tuple[Case, str]]
) -> list[str]:
    """Run every case; return what went wrong (all of it, not just the first)."""
    task = app.get_task("input.work")
    problems = []
    for label, (case, error, fragment) in ((k, _expect(k, v)) for k, v in cases.items()):
        before, tasks_before, queues_before = raw.count_jobs(), set(app.tasks), dict(app.queues)
        try:
            case(app, task)
        except error as exc:
            if fragment not in str(exc):
                problems.append(f"{label}: message {str(exc)!r} does not name {fragment!r}")
        except Exception as exc:
            problems.append(f"{label}: raised {type(exc).__name__}, not {error.__name__}: {exc}")
        else:
            problems.append(f"{label}: was accepted")
        if raw.count_jobs() != before:
            problems.append(f"{label}: inserted a job")
        if set(app.tasks) != tasks_before or app.queues != queues_before:
            problems.append(f"{label}: registered a task or queue")
    if app.get_job(earlier.id) != earlier:
        problems.append("the earlier job changed")
    return problems


def _expect(label: str, case: tuple[Case, str]) -> tuple[Case, type[Exception], str]:
    error: type[Exception] = ConfigurationError
    if label in BAD_ARGUMENTS:
        error = InvalidArgumentsError
    elif label == "unknown task":
        error = UnknownTaskError
    return case[0], error, case[1]


def test_arguments_that_are_not_json_are_refused_naming_the_path(
    app: Conveyor, raw: RawDB, earlier: Job
) -> None:
    app.max_payload_bytes = 1000
    problems = _refused_all(app, raw, earlier, BAD_ARGUMENTS)
    assert not problems, "\n".join(problems)


def test_bad_options_are_refused_naming_the_option(app: Conveyor, raw: RawDB, earlier: Job) -> None:
    problems = _refused_all(app, raw, earlier, BAD_OPTIONS)
    assert not problems, "\n".join(problems)


def test_hostile_queue_and_task_names_are_refused_naming_the_value(
    app: Conveyor, raw: RawDB, earlier: Job
) -> None:
    cases = _hostile_cases()
    assert len(cases) == 4 * len(HOSTILE_NAMES) + 1
    problems = _refused_all(app, raw, earlier, cases)
    assert not problems, "\n".join(problems)


def test_hostile_keys_and_arguments_are_stored_as_plain_data(app: Conveyor, raw: RawDB) -> None:
    """Keys and arguments are free text, passed as parameters: stored verbatim, never run."""
    work = _task(app)
    hostile = "'); DROP TABLE conveyor_jobs; -- %s %(id)s"
    job = work.options(
        unique_key=hostile, idempotency_key=hostile, concurrency_key=hostile
    ).enqueue(hostile, **{hostile: [hostile]})
    stored = app.get_job(job.id)
    assert stored.unique_key == stored.idempotency_key == stored.concurrency_key == hostile
    assert stored.args == [hostile] and stored.kwargs == {hostile: [hostile]}
    assert work.options(unique_key=hostile).enqueue().id == job.id
    assert raw.count_jobs() == 1


def test_payload_at_the_limit_is_accepted(app: Conveyor) -> None:
    work = _task(app)
    app.max_payload_bytes = 1000
    text = "x" * (1000 - len('[""]'))
    assert work.enqueue(text).args == [text]


# -- URLs and databases -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["mysql://user:secret@db/jobs", "redis://localhost", "jobs.db", "http://x"]
)
def test_unsupported_url_scheme_is_a_configuration_error(url: str) -> None:
    app = Conveyor(url)
    with pytest.raises(ConfigurationError, match="unsupported database URL") as info:
        app.migrate()
    assert "secret" not in str(info.value)


def test_bad_sqlite_urls_are_configuration_errors(tmp_path: Path) -> None:
    for url in ("sqlite:///:memory:", f"sqlite:///{tmp_path}/missing/dir/jobs.db"):
        with pytest.raises(ConfigurationError):
            Conveyor(url).migrate()


def test_unreachable_postgres_is_database_unavailable() -> None:
    app = Conveyor("postgresql://postgres:hunter2@127.0.0.1:1/conveyor")
    with pytest.raises(DatabaseUnavailableError, match="cannot connect") as info:
        app.migrate()
    assert "hunter2" not in str(info.value)
    with pytest.raises(DatabaseUnavailableError):
        app.get_job(1)


def test_a_database_not_migrated_is_a_schema_error_when_used(db_url: str) -> None:
    app = Conveyor(db_url)  # never migrated
    try:

        @app.task
        def work() -> None: ...

        with pytest.raises(SchemaError, match="no Conveyor schema") as info:
            work.enqueue()
        assert "conveyor migrate" in str(info.value)
        with pytest.raises(SchemaError):
            app.get_job(1)
        with pytest.raises(SchemaError):
            app.stats()
        assert app.raw_backend.schema_version() is None  # and nothing was created
    finally:
        app.close()


def test_a_database_migrated_by_a_newer_conveyor_is_a_schema_error(
    app: Conveyor, raw: RawDB, db_url: str
) -> None:
    job = _task(app).enqueue(1)
    if is_sqlite(db_url):
        raw.execute(
            "INSERT INTO conveyor_migrations (version, name, applied_at) VALUES (%s, 'future', 0)",
            (LATEST_VERSION + 1,),
        )
    else:
        raw.execute(
            "INSERT INTO conveyor_migrations (version, name) VALUES (%s, 'future')",
            (LATEST_VERSION + 1,),
        )

    newer = Conveyor(db_url)
    try:
        with pytest.raises(SchemaError, match="newer") as info:
            newer.get_job(job.id)
        assert f"version {LATEST_VERSION + 1}" in str(info.value)
        with pytest.raises(SchemaError, match="newer"):
            newer.migrate()
        assert newer.raw_backend.schema_version() == LATEST_VERSION + 1
    finally:
        newer.close()
    assert raw.count_jobs() == 1
