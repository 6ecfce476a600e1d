"""Scenario 9, bad input, on each backend: every case gets a clear error naming the bad value,
or a defined outcome, and nothing else is lost.

Refused before anything is written (counted: no job row appears): arguments that are not JSON,
over the size limit, integers no reader could decode, text with NUL or a lone surrogate,
nesting too deep, hostile queue and task names, out-of-range options and times, invalid URLs,
bad job ids and filters. Defined outcomes, with a real worker process: a ``run_at`` in the past
runs now, one in the far future stays queued and visible; a job whose row was corrupted in the
database (arguments of the wrong shape, or JSON that Python cannot decode) ends dead naming the
problem, while the jobs claimed in the same batch all succeed and the worker lives on; writes of
invalid JSON text are refused by the schema itself. Every other job in the database succeeds,
exactly once, and the tables are still there.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from conveyor import (
    Backoff,
    ConfigurationError,
    Conveyor,
    DatabaseUnavailableError,
    InvalidArgumentsError,
    JobNotFoundError,
    JobState,
    Snooze,
)
from tests.integration.apps import Recorder
from tests.integration.support import conveyor, rows, wait_until, worker_args

from .conftest import StartWorker
from .figures import Figures, size

APP = "tests.faults.apps_h4:app"
#: Good jobs enqueued around the bad ones; all must succeed.
N_GOOD = size(40, 2_000)
#: The size limit configured for the scenario (the default is 1 MiB, checked too).
LIMIT = 64 * 1024
HOSTILE_NAMES = ["'; drop table conveyor_jobs; --", "%s", "\"quoted\" 'name'", "q" * 201]
FAR_FUTURE = datetime(9998, 12, 31, tzinfo=UTC)
WORKER_TROUBLE = ("claim failed", "writing outcomes failed", "internal error", "Traceback")


@pytest.fixture
def client(url: str) -> Iterator[Conveyor]:
    app = Conveyor(url, max_payload_bytes=LIMIT)
    yield app
    app.close()


def count_jobs(url: str) -> int:
    return int(rows(url, "SELECT count(*) FROM conveyor_jobs")[0][0])


def _nested(depth: int) -> list[Any]:
    return functools.reduce(lambda inner, _: [inner], range(depth), [])


def _self_containing() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


Case = tuple[str, Callable[[], Any], type[Exception], str]


def refused_cases(app: Conveyor) -> list[Case]:
    """(case, action, error it must raise, text the message must contain)."""
    echo = app.task(name="h4.echo", max_attempts=1)(lambda *a, **k: None)
    raw = app.enqueue_raw
    cases: list[Case] = [
        (
            "argument: datetime",
            lambda: echo.enqueue(when=datetime.now(UTC)),
            InvalidArgumentsError,
            "kwargs['when']",
        ),
        (
            "argument: set nested in a dict",
            lambda: echo.enqueue({"tags": {"a"}}),
            InvalidArgumentsError,
            "args[0]['tags']",
        ),
        (
            "argument: bytes (e.g. a pickle)",
            lambda: echo.enqueue(b"\x80\x04K\x01."),
            InvalidArgumentsError,
            "args[0]",
        ),
        (
            "argument: Decimal",
            lambda: echo.enqueue(price=Decimal("1.10")),
            InvalidArgumentsError,
            "kwargs['price']",
        ),
        (
            "argument: NaN",
            lambda: echo.enqueue(math.nan),
            InvalidArgumentsError,
            "args[0] is nan",
        ),
        (
            "argument: object",
            lambda: echo.enqueue(x=object()),
            InvalidArgumentsError,
            "kwargs['x']",
        ),
        (
            f"arguments over the configured limit ({LIMIT} B)",
            lambda: echo.enqueue("x" * LIMIT),
            InvalidArgumentsError,
            f"over the limit of {LIMIT}",
        ),
        (
            "arguments over the default limit (1 MiB)",
            lambda: Conveyor(app.url).enqueue_raw("h4.echo", ["x" * 2**20]),
            InvalidArgumentsError,
            "over the limit of 1048576",
        ),
        (
            "integer of 5000 digits",
            lambda: echo.enqueue(n=10**4999),
            InvalidArgumentsError,
            "kwargs['n'] is an integer of more than 4300 digits",
        ),
        (
            "text with a NUL character",
            lambda: echo.enqueue("a\x00b"),
            InvalidArgumentsError,
            "args[0] contains a NUL",
        ),
        (
            "key with a NUL character",
            lambda: echo.enqueue(m={"k\x00": 1}),
            InvalidArgumentsError,
            "has key 'k\\x00'",
        ),
        (
            "text with a lone surrogate",
            lambda: echo.enqueue(s="\ud800"),
            InvalidArgumentsError,
            "kwargs['s'] is not valid Unicode",
        ),
        (
            "lists nested 1000 deep",
            lambda: echo.enqueue(_nested(1000)),
            InvalidArgumentsError,
            "nested more than 128",
        ),
        (
            "a list that contains itself",
            lambda: echo.enqueue(_self_containing()),
            InvalidArgumentsError,
            "or contains itself",
        ),
        (
            "enqueue_raw with args a string",
            lambda: raw("h4.echo", "abc"),
            ConfigurationError,
            "args must be a list, not str",
        ),
        (
            "enqueue_raw with kwargs a list",
            lambda: raw("h4.echo", [], [("a", 1)]),
            ConfigurationError,
            "kwargs must be a dict, not list",
        ),
        (
            "delay of 1e12 s",
            lambda: echo.options(delay=1e12).enqueue(),
            ConfigurationError,
            "delay=1000000000000.0 must be at most",
        ),
        (
            "deadline of 1e300 s",
            lambda: echo.options(deadline=1e300).enqueue(),
            ConfigurationError,
            "deadline=1e+300",
        ),
        (
            "timeout of infinity",
            lambda: echo.options(timeout=math.inf).enqueue(),
            ConfigurationError,
            "timeout=inf",
        ),
        (
            "run_at at the end of year 9999",
            lambda: echo.options(run_at=datetime.max.replace(tzinfo=UTC)).enqueue(),
            ConfigurationError,
            "run_at=datetime.datetime(9999, 12, 31",
        ),
        (
            "run_at without a time zone",
            lambda: echo.options(run_at=datetime(2030, 1, 1)).enqueue(),
            ConfigurationError,
            "run_at=datetime.datetime(2030, 1, 1, 0, 0) must be a timezone-aware",
        ),
        (
            "max_attempts of 2**31",
            lambda: echo.options(max_attempts=2**31).enqueue(),
            ConfigurationError,
            "max_attempts=2147483648",
        ),
        (
            "backoff Backoff(cap=inf)",
            lambda: app.task(name="h4.b1", backoff=Backoff(cap=math.inf))(print),
            ConfigurationError,
            "option backoff=Backoff(",
        ),
        (
            "Snooze(1e300) raised by a task",
            lambda: Snooze(1e300),
            ConfigurationError,
            "not 1e+300",
        ),
        (
            "depends_on an id beyond 64 bits",
            lambda: echo.options(depends_on=[2**64]).enqueue(),
            ConfigurationError,
            "18446744073709551616",
        ),
        ("job id 'abc'", lambda: app.get_job("abc"), ConfigurationError, "not 'abc'"),  # type: ignore[arg-type]
        ("job id 2**70", lambda: app.cancel_job(2**70), JobNotFoundError, str(2**70)),
        (
            "list filter state='bogus'",
            lambda: app.list_jobs(state="bogus"),
            ConfigurationError,
            "state 'bogus'",
        ),
        ("list limit=-1", lambda: app.list_jobs(limit=-1), ConfigurationError, "limit=-1"),
        (
            "cancel reason with a NUL",
            lambda: app.cancel_job(1, "a\x00b"),
            ConfigurationError,
            "cancel reason 'a\\x00b'",
        ),
        (
            "max_payload_bytes=-1",
            lambda: Conveyor(app.url, max_payload_bytes=-1),
            ConfigurationError,
            "not -1",
        ),
    ]
    for name in HOSTILE_NAMES:
        short = name if len(name) <= 32 else f"{name[:12]}... ({len(name)} chars)"
        cases += [
            (
                f"queue name {short}",
                lambda n=name: echo.options(queue=n).enqueue(),
                ConfigurationError,
                repr(name),
            ),
            (
                f"task name {short}",
                lambda n=name: app.task(name=n)(print),
                ConfigurationError,
                repr(name),
            ),
            (f"enqueue_raw task {short}", lambda n=name: raw(n), ConfigurationError, repr(name)),
            (
                f"list filter queue={short}",
                lambda n=name: app.list_jobs(queue=n),
                ConfigurationError,
                repr(name),
            ),
        ]
    return cases


BAD_URLS: list[tuple[str, type[Exception], str]] = [
    ("", ConfigurationError, "non-empty string"),
    ("mysql://user:hunter2@db/jobs", ConfigurationError, "unsupported database URL"),
    ("jobs.db", ConfigurationError, "unsupported database URL"),
    ("postgresql://[::1", ConfigurationError, "Invalid IPv6 URL"),
    ("sqlite:///jobs%00.db", ConfigurationError, "NUL"),
    ("sqlite:///:memory:", ConfigurationError, "in-memory"),
    ("sqlite:///no/such/dir/jobs.db", ConfigurationError, "does not exist"),
    ("postgresql://postgres:hunter2@127.0.0.1:1/x", DatabaseUnavailableError, "cannot connect"),
    ("postgresql://postgres@127.0.0.1:5432/x?sslmode=bogus", DatabaseUnavailableError, "sslmode"),
    (
        "postgresql://postgres@127.0.0.1/x'; drop table t; --",
        ConfigurationError,
        "invalid PostgreSQL URL",
    ),
]


def _outcome(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"refused, {type(exc).__name__}: {text if len(text) <= 110 else text[:107] + '...'}"


def check_refusals(url: str, app: Conveyor, fig: Figures) -> list[str]:
    """Run every refused case; record each; return what went wrong (all of it)."""
    problems = []
    for label, action, error, fragment in refused_cases(app):
        before = count_jobs(url)
        try:
            action()
        except error as exc:
            fig.row(label, _outcome(exc), "refused, naming the value")
            if fragment not in str(exc):
                problems.append(f"{label}: message {str(exc)!r} does not name {fragment!r}")
        except Exception as exc:
            fig.row(label, f"WRONG ERROR {type(exc).__name__}: {exc}", "refused, naming the value")
            problems.append(f"{label}: raised {type(exc).__name__}, not {error.__name__}: {exc}")
        else:
            fig.row(label, "ACCEPTED", "refused, naming the value")
            problems.append(f"{label}: was accepted")
        if count_jobs(url) != before:
            problems.append(f"{label}: a job was written")
    for bad_url, error, fragment in BAD_URLS:
        label = f"database URL {bad_url!r}"
        try:
            Conveyor(bad_url).get_job(1)
        except error as exc:
            fig.row(label, _outcome(exc), "refused, naming the problem")
            if fragment not in str(exc) or "hunter2" in str(exc):
                problems.append(f"{label}: message {str(exc)!r} (wants {fragment!r}, no password)")
        except Exception as exc:
            fig.row(label, f"WRONG ERROR {type(exc).__name__}: {exc}", "refused")
            problems.append(f"{label}: raised {type(exc).__name__}: {exc}")
        else:
            problems.append(f"{label}: was accepted")
    return problems


# -- rows corrupted in the database -----------------------------------------------------------


def corruptions(postgres: bool) -> list[tuple[str, list[str], tuple[Any, ...]]]:
    """(case, statements whose last is an UPDATE ... WHERE id = ?, that UPDATE's parameters
    before the id)."""
    cast = "::jsonb" if postgres else ""
    digits = "1" * 5000
    cases: list[tuple[str, list[str], tuple[Any, ...]]] = [
        (
            "args a JSON string, not an array",
            [f"UPDATE conveyor_jobs SET args = '\"rm -rf /\"'{cast} WHERE id = ?"],
            (),
        ),
        (
            "kwargs a JSON array, not an object",
            [f"UPDATE conveyor_jobs SET kwargs = '[1, 2]'{cast} WHERE id = ?"],
            (),
        ),
        (
            "args an object, kwargs null",
            [
                f"UPDATE conveyor_jobs SET args = '{{\"a\": 1}}'{cast}, kwargs = 'null'{cast} WHERE id = ?"
            ],
            (),
        ),
        (
            "args valid JSON Python cannot read (5000-digit number)",
            [f"UPDATE conveyor_jobs SET args = ?{cast} WHERE id = ?"],
            (f"[{digits}]",),
        ),
        (
            "args nested 5000 deep",
            [f"UPDATE conveyor_jobs SET args = ?{cast} WHERE id = ?"],
            ("[" * 5000 + "]" * 5000,),
        ),
        ("args invalid JSON text", ["UPDATE conveyor_jobs SET args = '[1, 2' WHERE id = ?"], ()),
        (
            "task name overwritten with SQL",
            ["UPDATE conveyor_jobs SET task = ? WHERE id = ?"],
            ("'; drop table conveyor_jobs; --",),
        ),
    ]
    if not postgres:  # jsonb cannot hold invalid JSON; SQLite can, with its checks turned off
        cases.append(
            (
                "args invalid JSON text, written with CHECKs off (on-disk corruption)",
                [
                    "PRAGMA ignore_check_constraints = ON",
                    "UPDATE conveyor_jobs SET args = '[1, 2' WHERE id = ?",
                ],
                (),
            )
        )
    return cases


def corrupt(url: str, statements: list[str], params: tuple[Any, ...]) -> str | None:
    """Apply one corruption; None if it was written, else the database's refusal."""
    rec = Recorder(url)
    try:
        for sql in statements[:-1]:
            rec.execute(sql)
        rec.execute(statements[-1], params)
        return None
    except Exception as exc:  # sqlite3 / psycopg: the database refused the write
        return " ".join(str(exc).split())[:90]
    finally:
        rec.close()


def terminal_count(url: str, ids: list[int]) -> int:
    marks = ",".join("?" * len(ids))
    found = rows(
        url,
        f"SELECT count(*) FROM conveyor_jobs WHERE id IN ({marks})"
        " AND state IN ('succeeded', 'dead', 'cancelled')",
        tuple(ids),
    )
    return int(found[0][0])


def test_bad_input_gets_a_clear_error_or_a_defined_outcome(
    url: str, client: Conveyor, workers: StartWorker, figures: Any
) -> None:
    backend = "PostgreSQL" if url.startswith("postgres") else "SQLite"
    fig: Figures = figures(9, f"Bad input ({backend})")
    fig.settings.update(
        backend=backend,
        good_jobs=N_GOOD,
        max_payload_bytes=LIMIT,
        worker="1 process, concurrency 8",
    )
    started = time.monotonic()

    # -- refused up front: nothing written ------------------------------------------------------
    problems = check_refusals(url, client, fig)
    assert not problems, "\n".join(problems)
    assert count_jobs(url) == 0

    # -- jobs for the worker: good ones around bad ones, all claimable at once --------------------
    echo = client.get_task("h4.echo")
    good_ids = [echo.options(priority=5).enqueue(i, n=i).id for i in range(N_GOOD // 2)]
    hostile = "'); DROP TABLE conveyor_jobs; -- %s %(id)s {0} ${x} `id`"
    verbatim = echo.options(unique_key=hostile, concurrency_key=hostile, priority=5).enqueue(
        hostile, **{hostile: [hostile]}
    )
    past = {
        "run_at 1970-01-01": echo.options(run_at=datetime(1970, 1, 1, tzinfo=UTC)).enqueue(),
        "run_at 0001-01-02": echo.options(run_at=datetime(1, 1, 2, tzinfo=UTC)).enqueue(),
    }
    future = echo.options(run_at=FAR_FUTURE).enqueue("later")
    # Tasks whose own code asks for the impossible (see apps_h4.py).
    misbehaving = {
        "task raises Snooze(1e300)": client.enqueue_raw("h4.snooze_forever", [1e300], max_attempts=1),
        "task's backoff function returns 'soon'": client.enqueue_raw("h4.backoff_text", max_attempts=2),
        "task's backoff function returns inf": client.enqueue_raw("h4.backoff_inf", max_attempts=2),
    }  # fmt: skip
    # The corrupted rows come first in claim order, each beside a good job: the worker's first
    # claims hold both.
    victims: dict[str, tuple[int, str | None]] = {}
    for label, statements, params in corruptions(backend == "PostgreSQL"):
        good_ids.append(echo.options(priority=9).enqueue(label).id)
        job = echo.options(priority=9).enqueue(label)
        victims[label] = (job.id, corrupt(url, statements, (*params, job.id)))
    good_ids += [echo.options(priority=5).enqueue(i).id for i in range(N_GOOD - len(good_ids))]
    good_ids += [verbatim.id, *(j.id for j in past.values())]

    # -- one worker works them off --------------------------------------------------------------
    worker = workers(url, *worker_args(concurrency=8, lease=10, grace=2), app=APP)
    finishing = [j.id for label, j in misbehaving.items() if not label.endswith("inf")]
    every = [*good_ids, *(i for i, _ in victims.values()), *finishing]
    wait_until(lambda: terminal_count(url, every) == len(every), 90, "every due job to finish")
    assert worker.proc.poll() is None, f"the worker died:\n{worker.log()[-5_000:]}"
    # ... and keeps working: a second wave after the bad rows
    wave = [echo.enqueue(f"after-{i}").id for i in range(10)]
    wait_until(lambda: terminal_count(url, wave) == len(wave), 60, "the second wave")
    assert worker.proc.poll() is None, f"the worker died:\n{worker.log()[-5_000:]}"

    # -- what happened to each bad row ----------------------------------------------------------
    ran = {r[0]: r[1] for r in rows(url, "SELECT job_id, count(*) FROM exec_log GROUP BY job_id")}
    for label, (job_id, refusal) in victims.items():
        job = client.get_job(job_id)
        if refusal is not None:  # the database itself refused the corruption
            fig.row(
                f"row corrupted: {label}",
                f"write refused by the schema ({refusal})",
                "refused, or dead naming the problem",
            )
            assert job.state == JobState.SUCCEEDED and ran.get(job_id) == 1, (label, job)
            continue
        kinds = [e.get("kind") for e in job.errors] if isinstance(job.errors, list) else []
        fig.row(
            f"row corrupted: {label}", f"{job.state.value}: {job.error}", "dead, naming the problem"
        )
        assert job.state == JobState.DEAD, (label, job)
        assert kinds in (["bad_arguments"], ["unknown_task"]), (label, job.errors)
        assert ran.get(job_id) is None, f"{label}: the task ran on corrupted arguments"
        if kinds == ["bad_arguments"]:
            assert "unusable arguments" in (job.error or ""), job.error
        else:
            assert "drop table" in (job.error or ""), job.error

    # The CLI shows a corrupted job and the list (no traceback).
    shown = [conveyor("jobs", "show", str(i), "--json", url=url) for i, _ in victims.values()]
    listed = conveyor("jobs", "list", "--state", "dead", "--json", url=url)
    for result in [*shown, listed]:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result
    fig.row(
        "`conveyor jobs show/list --json` of the corrupted jobs", "exit 0, no traceback", "works"
    )

    # -- past and far-future run_at -------------------------------------------------------------
    for label, job in past.items():
        after = client.get_job(job.id)
        fig.row(label, f"{after.state.value} (ran {ran.get(job.id, 0)} time)", "runs now")
        assert after.state == JobState.SUCCEEDED and ran.get(job.id) == 1
    scheduled = client.get_job(future.id)
    queued = {j.id for j in client.list_jobs(state="queued")}
    queued_count = sum(s.counts.get("queued", 0) for s in client.stats())
    fig.row(
        f"run_at {FAR_FUTURE.date()}",
        f"{scheduled.state.value}, run_at {scheduled.run_at.date()}, listed: "
        f"{future.id in queued}, counted queued in stats: {queued_count}",
        "stays queued, visible",
    )
    assert scheduled.state == JobState.QUEUED and scheduled.run_at == FAR_FUTURE
    assert future.id in queued and queued_count == 1 and ran.get(future.id) is None

    # -- misbehaving tasks ----------------------------------------------------------------------
    outcomes = {label: client.get_job(j.id) for label, j in misbehaving.items()}
    for label, job in outcomes.items():
        wait = (job.run_at - client.raw_backend.db_now()).total_seconds() / (365.25 * 86400)
        shown = f"{job.state.value} after {job.attempt} attempt(s): {job.error}"
        if job.state == JobState.RETRYING:
            shown += f"; next run in {wait:.1f} years"
        fig.row(label, shown[:150], "a defined outcome, the worker unharmed")
    snoozed = outcomes["task raises Snooze(1e300)"]
    assert snoozed.state == JobState.DEAD and "Snooze seconds must be" in (snoozed.error or "")
    texted = outcomes["task's backoff function returns 'soon'"]
    assert texted.state == JobState.DEAD and texted.attempt == 2, texted
    assert "returned 'soon', not a number of seconds" in worker.log()
    forever = outcomes["task's backoff function returns inf"]
    assert forever.state == JobState.RETRYING and forever.attempt == 1, forever
    years = (forever.run_at - client.raw_backend.db_now()).total_seconds() / (365.25 * 86400)
    assert 99.9 < years <= 100.0, years

    # -- hostile text as data --------------------------------------------------------------------
    stored = client.get_job(verbatim.id)
    assert stored.unique_key == stored.concurrency_key == hostile
    assert stored.return_value == {"args": [hostile], "kwargs": {hostile: [hostile]}}
    fig.row(
        "SQL/format text as arguments and keys",
        "stored and passed to the task verbatim",
        "plain data",
    )

    # -- nothing else lost ----------------------------------------------------------------------
    everyone = [*good_ids, *wave]
    states = {j: client.get_job(j).state for j in everyone}
    succeeded = sum(s == JobState.SUCCEEDED for s in states.values())
    once = sum(ran.get(j) == 1 for j in everyone)
    fig.row(
        "other jobs in the same database that succeeded", f"{succeeded} of {len(everyone)}", "all"
    )
    fig.row("other jobs that ran exactly once (execution log)", once, str(len(everyone)))
    assert succeeded == len(everyone), {j: s for j, s in states.items() if s != "succeeded"}
    assert once == len(everyone)
    tables = count_jobs(url)
    fig.row("conveyor_jobs rows after all of it (table intact)", tables, "every job")
    assert tables == len(everyone) + len(victims) + len(misbehaving) + 1  # + the far-future job
    trouble = [line for line in worker.log().splitlines() if any(t in line for t in WORKER_TROUBLE)]
    fig.row("claim or outcome failures in the worker's log", len(trouble), "0")
    fig.row("worker processes that died", int(worker.proc.poll() is not None), "0")
    assert not trouble, "\n".join(trouble[:20])
    fig.note(
        "Refused cases are counted with a job count before and after each: none wrote a row. "
        "Corrupted rows are written with plain SQL behind Conveyor's back after enqueue, at the "
        "same priority as good jobs, so the worker claims them in the same batches."
    )
    fig.settings["wall_s"] = round(time.monotonic() - started, 1)
