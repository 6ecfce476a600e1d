"""Scenario 10, security, on each backend.

* Arguments are data, never code: Conveyor's source imports no unpickler and calls no evaluator
  (checked on its syntax tree), and payloads that would run if they were unpickled, evaluated,
  templated or passed to a shell travel through a real worker and come back verbatim while
  nothing runs.
* Identifiers never reach SQL as text: hostile queue and task names given to the CLI are refused
  before any SQL with a one-line error, and the tables are intact afterwards; the only text
  formatted into SQL in the source is constants (checked on the syntax tree).
* Redaction: canary secrets passed in redacted fields (a positional parameter redacted by its
  task, a keyword field redacted by $CONVEYOR_REDACT, a nested dict key redacted by the app) to
  a task that fails with them in its exception, cancels with one in its reason, and succeeds
  returning one, appear nowhere in a real worker's log (at DEBUG), in the stored errors and
  history, nor in any ``conveyor jobs`` output, with or without ``--app``; the stored arguments
  keep the real values.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import pickle
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import conveyor as conveyor_package
from conveyor import Conveyor, JobState
from tests.integration.support import conveyor_many, rows, wait_until, worker_args

from .conftest import StartWorker
from .figures import Figures

APP = "tests.faults.apps_h4:app"
SRC = Path(conveyor_package.__file__).resolve().parent

#: Modules that turn bytes or text into live objects or code.
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle",
                  "jsonpickle", "yaml", "copyreg"}  # fmt: skip
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}
#: The only expressions formatted into SQL text in src, each a constant of the code.
SQL_INTERPOLATIONS = {
    "_NOW": "SQLite's clock expression, a module constant",
    "schema": "bench's throwaway schema, 'conveyor_bench_' + uuid4 hex",
}
SQL_CALLS = {"execute", "executemany", "executescript"}


# -- the source -------------------------------------------------------------------------------


def source_findings() -> dict[str, list[str]]:
    """Unsafe imports, unsafe calls, and SQL built from text, per kind, as 'file:line what'."""
    found: dict[str, list[str]] = {"imports": [], "calls": [], "sql": [], "import_module": []}
    for path in sorted(SRC.rglob("*.py")):
        name = path.relative_to(SRC.parent)
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in UNSAFE_MODULES:
                        found["imports"].append(f"{where} import {alias.name}")
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module.split(".")[0] in UNSAFE_MODULES:
                    found["imports"].append(f"{where} from {node.module} import ...")
            elif isinstance(node, ast.Call):
                func = node.func
                called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if isinstance(func, ast.Name) and called in UNSAFE_CALLS:
                    found["calls"].append(f"{where} {called}()")
                if called == "import_module":
                    found["import_module"].append(f"{where} import_module()")
                if called in SQL_CALLS and node.args:
                    found["sql"] += [f"{where} {bad}" for bad in _formatted(node.args[0])]
    return found


def _formatted(sql: ast.expr) -> list[str]:
    """What is formatted into this SQL text, other than the allowed constants."""
    if isinstance(sql, ast.JoinedStr):
        parts = [ast.unparse(v.value) for v in sql.values if isinstance(v, ast.FormattedValue)]
        return [f"f-string {{{p}}}" for p in parts if p not in SQL_INTERPOLATIONS]
    if isinstance(sql, ast.BinOp) and isinstance(sql.op, ast.Mod | ast.Add):
        return [f"text built with {type(sql.op).__name__}: {ast.unparse(sql)[:60]}"]
    if isinstance(sql, ast.Call) and getattr(sql.func, "attr", "") == "format":
        return [f"str.format: {ast.unparse(sql)[:60]}"]
    return []


def test_source_never_unpickles_or_evaluates_and_formats_no_data_into_sql(figures: Any) -> None:
    fig: Figures = figures(10, "Security: Conveyor's source")
    fig.settings.update(files=len(list(SRC.rglob("*.py"))), checked="the syntax tree of src/")
    found = source_findings()
    fig.row(
        f"imports of {', '.join(sorted(UNSAFE_MODULES))}",
        len(found["imports"]),
        "0",
    )
    fig.row(f"calls of {', '.join(sorted(UNSAFE_CALLS))}", len(found["calls"]), "0")
    fig.row("SQL text formatted from anything but constants", len(found["sql"]), "0")
    fig.row(
        "import_module calls (only the CLI's --app, given by the operator)",
        len(found["import_module"]),
        "1",
    )
    fig.note(
        "Constants formatted into SQL: "
        + "; ".join(f"{k} ({v})" for k, v in SQL_INTERPOLATIONS.items())
        + ". Every other value reaches SQL as a bound parameter."
    )
    assert not found["imports"], found["imports"]
    assert not found["calls"], found["calls"]
    assert not found["sql"], found["sql"]
    assert [f.split(":")[0] for f in found["import_module"]] == ["conveyor/cli.py"]


# -- with a worker, on each backend -----------------------------------------------------------


@pytest.fixture
def client(url: str) -> Iterator[Conveyor]:
    app = Conveyor(url)
    yield app
    app.close()


class Evil:
    """Unpickling this would run a shell command creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def payloads(marker: Path) -> dict[str, str]:
    """Text that would create ``marker`` if anything unpickled, evaluated, templated or shelled
    it (pickling Evil does not run it)."""
    pickled = pickle.dumps(Evil(marker))
    touch = f"touch {marker}"
    return {
        "pickle, base64": base64.b64encode(pickled).decode(),
        "pickle, protocol 0 (text)": pickle.dumps(Evil(marker), protocol=0).decode(),
        "Python eval": f"__import__('os').system('{touch}')",
        "YAML python tag": f"!!python/object/apply:os.system ['{touch}']",
        "jsonpickle object": json.dumps({"py/reduce": [{"py/function": "os.system"}, [touch]]}),
        "template": f"{{{{ cycler.__init__.__globals__.os.popen('{touch}') }}}}",
        "shell": f"$({touch}); `{touch}`",
        "SQL": "'); DROP TABLE conveyor_jobs; -- %s %(id)s",
    }


def test_arguments_are_inert_data_and_identifiers_never_reach_sql(
    url: str, client: Conveyor, workers: StartWorker, figures: Any, tmp_path: Path
) -> None:
    backend = "PostgreSQL" if url.startswith("postgres") else "SQLite"
    fig: Figures = figures(10, f"Security: inert payloads and hostile names ({backend})")
    fig.settings.update(backend=backend, worker="1 process, task h4.echo returns its arguments")
    started = time.monotonic()
    marker = tmp_path / "executed"
    cases = payloads(marker)
    jobs = {
        label: client.enqueue_raw("h4.echo", [text], {"payload": text, text[:50]: [text]})
        for label, text in cases.items()
    }
    cli_args = json.dumps(list(cases.values()))
    hostile = "'; drop table conveyor_jobs; --"
    refused = {
        f"conveyor worker --queues 'default,{hostile}'": [
            "worker", "--app", APP, "--queues", f"default,{hostile}"
        ],
        f"conveyor enqueue '{hostile}'": ["enqueue", hostile, "--args", "[]"],
        "conveyor enqueue h4.echo --queue '%s'": ["enqueue", "h4.echo", "--queue", "%s", "--app", APP],
        f"conveyor jobs list --queue '{hostile}'": ["jobs", "list", "--queue", hostile],
        "conveyor jobs list --task '%(task)s'": ["jobs", "list", "--task", "%(task)s"],
    }  # fmt: skip
    enqueue = ["enqueue", "h4.echo", "--args", cli_args, "--app", APP]
    enqueued, *results = conveyor_many([enqueue, *refused.values()], url=url)
    assert enqueued.returncode == 0, enqueued
    cli_job = int(enqueued.stdout.split()[1])
    for label, result in zip(refused, results, strict=True):
        lines = result.stderr.splitlines()
        ok = result.returncode == 1 and len(lines) == 1 and "invalid" in lines[0]
        shown = lines[0] if lines else result.stdout[:80]
        fig.row(
            f"CLI: {label}",
            f"exit {result.returncode}: {shown[:100]}",
            "refused before SQL, one line",
        )
        assert ok and ("queue name" in lines[0] or "task name" in lines[0]), result

    # An error message built to drive a terminal or the CLI's table markup.
    rogue = "\x1b[2J\x1b]0;pwned\x07[link=https://evil.example]x[/link][bold red]y[/]"
    rogue_job = client.enqueue_raw("h4.fail_with", [rogue], max_attempts=1)
    worker = workers(url, *worker_args(concurrency=4, lease=10, grace=2), app=APP)
    ids = [*(j.id for j in jobs.values()), cli_job, rogue_job.id]
    wait_until(lambda: all(client.get_job(i).state.terminal for i in ids), 60, "the payload jobs")
    for label, job in jobs.items():
        text = cases[label]
        after = client.get_job(job.id)
        intact = after.args == [text] and after.kwargs == {"payload": text, text[:50]: [text]}
        echoed = after.return_value == {"args": [text], "kwargs": after.kwargs}
        fig.row(
            f"payload: {label}",
            f"{after.state.value}; stored verbatim: {intact}; task got it verbatim: {echoed}",
            "plain data, nothing run",
        )
        assert after.state == JobState.SUCCEEDED and intact and echoed, (label, after)
    from_cli = client.get_job(cli_job)
    assert from_cli.state == JobState.SUCCEEDED and from_cli.args == list(cases.values())
    fig.row("the same payloads through `conveyor enqueue --args`", from_cli.state.value,
            "succeeded, verbatim")  # fmt: skip
    fig.row("commands run by any payload (marker file created)", int(marker.exists()), "0")
    assert client.get_job(rogue_job.id).error == f"RuntimeError: {rogue}"
    shown = conveyor_many([["jobs", "show", str(rogue_job.id)], ["jobs", "list"]], url=url)
    printed = "".join(r.stdout for r in shown)
    raw_controls = sum(printed.count(c) for c in ("\x1b", "\x07"))
    fig.row(
        "terminal control characters printed by `jobs show`/`jobs list` from an error message",
        raw_controls,
        "0 (shown escaped)",
    )
    assert all(r.returncode == 0 for r in shown) and raw_controls == 0, shown
    assert "\\x1b[2J" in shown[0].stdout and "[link=https://evil.example]" in shown[1].stdout
    assert not marker.exists()
    tables = rows(url, "SELECT count(*) FROM conveyor_jobs")[0][0]
    fig.row("conveyor_jobs rows afterwards (table intact)", tables, str(len(ids)))
    assert tables == len(ids)
    assert worker.proc.poll() is None
    fig.settings["wall_s"] = round(time.monotonic() - started, 1)


# -- redaction ----------------------------------------------------------------------------------


def test_redacted_secrets_never_show_in_logs_errors_or_cli(
    url: str, client: Conveyor, workers: StartWorker, figures: Any
) -> None:
    backend = "PostgreSQL" if url.startswith("postgres") else "SQLite"
    fig: Figures = figures(10, f"Security: redaction ({backend})")
    started = time.monotonic()
    tag = uuid.uuid4().hex
    # Distinct canaries: one per way of naming a field; quotes and non-ASCII test the escaping.
    password = f"pa'ss\"wörd-{tag}-1"  # positional parameter, redacted by @app.task
    token = f"tok-{tag}-2"  # keyword field, redacted by $CONVEYOR_REDACT
    api_key = f"key-{tag}-3"  # nested dict key, redacted by Conveyor(redact=...)
    fig.settings.update(
        backend=backend,
        app="Conveyor(redact=('api_key',)); @app.task(redact=['password']); "
        "worker $CONVEYOR_REDACT=token",
        worker_log_level="DEBUG",
    )

    def login(mode: str) -> int:
        kwargs = {"token": token, "profile": {"api_key": api_key, "plan": "pro"}, "mode": mode}
        return client.enqueue_raw("h4.login", ["alice", password], kwargs, max_attempts=2).id

    ids = {mode: login(mode) for mode in ("fail", "cancel", "ok")}
    worker = workers(
        url,
        *worker_args(concurrency=4, lease=10, grace=2),
        "--log-level",
        "DEBUG",
        app=APP,
        env={"CONVEYOR_REDACT": "token"},
    )
    wait_until(lambda: all(client.get_job(i).state.terminal for i in ids.values()), 60, "jobs")
    jobs = {mode: client.get_job(i) for mode, i in ids.items()}
    assert [j.state for j in jobs.values()] == [
        JobState.DEAD,
        JobState.CANCELLED,
        JobState.SUCCEEDED,
    ], jobs
    assert jobs["fail"].attempt == 2  # failed twice: two log lines, two stored errors

    # The stored arguments (and the result) keep the real values: the task needs them.
    for job in jobs.values():
        assert job.args == ["alice", password] and job.kwargs["token"] == token
    assert jobs["ok"].return_value == {"user": "alice", "api_key": api_key}
    fig.row("stored arguments keep the real values", "yes (all 3 jobs)", "yes")

    def leaks(text: str) -> int:
        """Occurrences of any canary, in any escaping (the unique tag is in all of them)."""
        return text.count(tag)

    # -- stored errors and history --------------------------------------------------------------
    stored = rows(url, "SELECT errors, last_error FROM conveyor_jobs")
    events = rows(url, "SELECT error FROM conveyor_job_events WHERE error IS NOT NULL")
    stored_text = json.dumps([[str(c) for c in r] for r in [*stored, *events]], ensure_ascii=False)
    fig.row("canary occurrences in stored errors, tracebacks and history", leaks(stored_text), "0")
    messages = [e["message"] for j in jobs.values() for e in j.errors]
    assert any("[redacted]" in m for m in messages), messages
    assert leaks(stored_text) == 0, stored_text

    # -- the worker's log, once it stopped --------------------------------------------------------
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(30) == 0
    log = worker.log()
    failed_lines = [line for line in log.splitlines() if "attempt" in line and "failed" in line]
    fig.row("worker log lines (DEBUG)", len(log.splitlines()))
    fig.row("canary occurrences in the worker log", leaks(log), "0")
    assert len(failed_lines) == 2 and all("[redacted]" in line for line in failed_lines), log
    assert leaks(log) == 0, log

    # -- the CLI, with the app and without ------------------------------------------------------
    job_cmds = [
        ["jobs", "show", str(ids["fail"])],
        ["jobs", "show", str(ids["fail"]), "--json"],
        ["jobs", "show", str(ids["ok"]), "--json"],
        ["jobs", "list"],
        ["jobs", "list", "--json"],
    ]
    with_app = conveyor_many(
        [[*c, "--app", APP] for c in job_cmds], url=url, env={"CONVEYOR_REDACT": "token"}
    )
    without = conveyor_many(job_cmds, url=url, env={"CONVEYOR_REDACT": "password,token,api_key"})
    for label, results in (("with --app", with_app), ("without --app", without)):
        text = "".join(r.stdout + r.stderr for r in results)
        fig.row(
            f"canary occurrences in `conveyor jobs show/list` output, {label} "
            f"({len(results)} commands, text and --json)",
            leaks(text),
            "0",
        )
        assert all(r.returncode == 0 for r in results), results
        assert leaks(text) == 0, text
        shown = json.loads(results[1].stdout)
        assert shown["args"][1] == "[redacted]" and shown["kwargs"]["token"] == "[redacted]"
        assert shown["kwargs"]["profile"]["api_key"] == "[redacted]", shown
        assert json.loads(results[2].stdout)["result"]["api_key"] == "[redacted]"
        assert "[redacted]" in results[0].stdout and "[redacted]" in results[3].stdout
    fig.note(
        "Every canary carries one random tag, counted in every form it could take (raw, JSON- "
        "or repr-escaped). The failing task raises with all three secrets in its message; the "
        "cancelling one puts the password in its reason; the succeeding one returns the key."
    )
    fig.settings["wall_s"] = round(time.monotonic() - started, 1)
