"""The ``conveyor`` command, run as a real subprocess against each backend."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conveyor import Conveyor, JobState
from conveyor.backends.migrate import LATEST_VERSION

from .apps import Recorder, create_tables
from .conftest import StartWorker
from .support import APP, conveyor, conveyor_many, wait_rows, wait_until, worker_args


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The command failed as Conveyor's errors should: exit 1, one line on stderr, no traceback."""
    shown = f"{result.args}:\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert result.returncode == 1, shown
    assert result.stdout == "", shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("conveyor: error: "), shown
    for fragment in fragments:
        assert fragment in lines[0], shown
    return lines[0]


def job_id_of(enqueue_output: str) -> int:
    match = re.fullmatch(r"job (\d+) queued in queue (\S+)\n", enqueue_output)
    assert match, enqueue_output
    return int(match[1])


@pytest.mark.slow  # some 25 `conveyor` processes
def test_migrate_enqueue_stats_and_jobs_commands(db_url: str) -> None:
    """Independent commands run side by side (also showing they are safe concurrently)."""
    d = ["--database", db_url]
    migrated = sorted(ok(r) for r in conveyor_many([["migrate", *d], ["migrate", *d]]))
    assert migrated == [
        f"applied migrations {', '.join(map(str, range(1, LATEST_VERSION + 1)))}; "
        f"schema version {LATEST_VERSION}\n",
        f"schema up to date (version {LATEST_VERSION})\n",
    ]

    # With --app the task must be registered and its options apply; without, any name goes.
    record, setup, raw, once, once_again = (
        ok(r)
        for r in conveyor_many(
            [
                ["enqueue", "it.record", "--args", "[7]", "--app", APP, *d],
                ["enqueue", "it.setup_step", "--args", "[0.5]", "--priority", "5",
                 "--concurrency-key", "k1", "--max-attempts", "2", "--app", APP, *d],
                ["enqueue", "billing.charge", "--kwargs", '{"order": 9}', "--queue", "bills", *d],
                ["enqueue", "x.y", "--idempotency-key", "once", *d],
                ["enqueue", "x.y", "--idempotency-key", "once", *d],
            ]
        )
    )  # fmt: skip
    first, second, third = job_id_of(record), job_id_of(setup), job_id_of(raw)
    assert record.endswith("in queue default\n") and setup.endswith("in queue setup\n")
    plain, deduped = sorted([once, once_again], key=len)  # same job; one says so
    assert deduped == plain.rstrip("\n") + " (already enqueued: existing job returned)\n"
    fourth = job_id_of(plain)

    results = conveyor_many(
        [
            ["stats", "--json", *d],
            ["stats", *d],
            ["jobs", "list", "--json", *d],
            ["jobs", "list", "--task", "it.record", "--json", *d],
            ["jobs", "list", "--state", "dead", "--json", *d],
            ["jobs", "list", "--queue", "bills", *d],
            ["jobs", "show", str(second), "--json", *d],
            ["jobs", "show", str(third), "--json", *d],
            ["jobs", "show", str(first), *d],
        ]
    )
    stats, table, listed, only, dead, bills, shown, shown_raw, text = (ok(r) for r in results)
    by_queue = {s["queue"]: s for s in json.loads(stats)}
    assert by_queue["default"]["counts"]["queued"] == 2
    assert by_queue["setup"]["counts"]["queued"] == 1
    assert by_queue["bills"]["counts"] == {s.value: int(s == JobState.QUEUED) for s in JobState}
    assert all(s["running"] == 0 for s in by_queue.values())
    assert "Conveyor queues" in table and "bills" in table

    newest_first = sorted([first, second, third, fourth], reverse=True)
    assert [j["id"] for j in json.loads(listed)] == newest_first
    assert [j["id"] for j in json.loads(only)] == [first]
    assert json.loads(dead) == []
    assert "billing.charge" in bills and "it.record" not in bills

    job = json.loads(shown)
    assert job["task"] == "it.setup_step" and job["queue"] == "setup"
    assert job["args"] == [0.5] and job["priority"] == 5 and job["max_attempts"] == 2
    assert job["concurrency_key"] == "k1" and job["state"] == "queued"
    assert json.loads(shown_raw)["kwargs"] == {"order": 9}
    assert re.search(r"^\s+state: queued$", text, re.M)
    assert re.search(r"^\s+task: it\.record$", text, re.M)

    assert ok(conveyor("jobs", "cancel", str(first), *d)) == f"job {first} cancelled\n"
    cancelled = ok(conveyor("jobs", "show", str(first), *d))
    assert re.search(r"^\s+state: cancelled$", cancelled, re.M)
    assert "[cancelled]: cancelled by request" in cancelled  # the error history
    assert ok(conveyor("jobs", "retry", str(first), *d)) == f"job {first} queued\n"

    retried, again, missing = conveyor_many(
        [
            ["jobs", "show", str(first), "--json", *d],
            ["jobs", "retry", str(first), *d],
            ["jobs", "show", "999999", *d],
        ]
    )
    job = json.loads(ok(retried))
    assert job["state"] == "queued" and job["attempt"] == 0
    assert [e["kind"] for e in job["errors"]] == ["cancelled"]  # history kept
    one_line_error(again, f"job {first} is queued", "only dead or cancelled")
    one_line_error(missing, "no job with id 999999")


def test_cancel_of_a_running_job_reaches_its_worker(
    app: Conveyor, url: str, start_worker: StartWorker
) -> None:
    worker = start_worker(*worker_args(lease=0.6))  # heartbeats, which deliver cancels, 0.2 s
    out = ok(conveyor("enqueue", "it.hang_first_async", "--args", "[120]", "--app", APP, url=url))
    job_id = job_id_of(out)
    wait_rows(url, "SELECT job_id FROM starts", 1)

    answer = ok(conveyor("jobs", "cancel", str(job_id), url=url))
    assert answer == f"job {job_id} running (cancellation requested from its worker)\n"
    wait_until(
        lambda: app.get_job(job_id).state == JobState.CANCELLED, 15, "the worker to cancel it"
    )
    job = app.get_job(job_id)
    assert job.attempt == 1 and job.error == "cancelled by request"
    assert job.finished_at is not None and not job.cancel_requested
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(10) == 0


def test_unmigrated_and_too_new_schemas_are_one_line_errors(db_url: str) -> None:
    d = ["--database", db_url]
    commands = [
        ["stats", "--json", *d],
        ["enqueue", "x.y", *d],
        ["worker", "--app", APP, "--queues", "default", *d],
    ]
    for result in conveyor_many(commands):
        one_line_error(result, "has no Conveyor schema", "conveyor migrate")

    ok(conveyor("migrate", *d))
    create_tables(db_url)  # extra tables do not bother Conveyor
    rec = Recorder(db_url)
    try:
        now = "now()" if rec.postgres else "0"
        rec.execute(
            f"INSERT INTO conveyor_migrations (version, name, applied_at) VALUES (?, ?, {now})",
            (LATEST_VERSION + 1, "from_the_future"),
        )
    finally:
        rec.close()
    for result in conveyor_many([*commands, ["migrate", *d]]):
        one_line_error(result, f"schema version {LATEST_VERSION + 1}", "upgrade conveyor")


def test_bad_urls_and_unreachable_servers_are_one_line_errors(tmp_path: Path) -> None:
    not_a_db = tmp_path / "garbage.db"
    not_a_db.write_text("this is not a database\n" * 100)
    cases = {
        "mysql://user@host/db": "unsupported database URL",
        "sqlite:///": "names no file",
        f"sqlite:///{tmp_path}/missing-dir/x.db": "does not exist",
        f"sqlite:///{not_a_db}": "not a database",
        "postgresql://postgres@127.0.0.1:1/conveyor": "cannot connect to PostgreSQL",
        "postgresql://postgres@127.0.0.1:5432/no_such_db_xyz": "cannot connect to PostgreSQL",
        "postgresql://pg%zz@127.0.0.1/x": "invalid PostgreSQL URL",
        "postgresql://user:s3cret@127.0.0.1:1/x": "postgresql://user:***@127.0.0.1:1/x",
    }
    commands = [["stats", "--database", u] for u in cases]
    fragments = list(cases.values())
    for u in list(cases)[1::3]:  # a few through the other entry points
        commands += [["migrate", "--database", u], ["worker", "--app", APP, "--database", u]]
        fragments += [cases[u]] * 2
    results = conveyor_many(commands)
    for result, fragment in zip(results, fragments, strict=True):
        line = one_line_error(result, fragment)
        assert "s3cret" not in line
    # $CONVEYOR_DATABASE_URL is read the same way.
    one_line_error(conveyor("stats", url="mysql://x/y"), "unsupported database URL")


def test_bad_input_is_a_one_line_error(sqlite_url: str) -> None:
    d = ["--database", sqlite_url]
    ok(conveyor("migrate", *d))
    results = conveyor_many(
        [
            ["enqueue", "no.such.task", "--app", APP, *d],
            ["enqueue", "it.record", "--args", "{not json", *d],
            ["enqueue", "it.record", "--args", '{"a": 1}', *d],
            ["enqueue", "it.record", "--kwargs", "[1]", *d],
            ["worker", *d],  # no --app
            ["worker", "--app", "no_such_module:app", *d],
            ["worker", "--app", "tests.integration.apps", *d],
            ["worker", "--app", APP, "--queues", "bad queue!", *d],
        ]
    )
    one_line_error(results[0], "no task named 'no.such.task'")
    one_line_error(results[1], "--args", "not valid JSON")
    one_line_error(results[2], "--args must be a JSON array")
    one_line_error(results[3], "--kwargs must be a JSON object")
    one_line_error(results[4], "worker needs --app")
    one_line_error(results[5], "no_such_module")
    one_line_error(results[6], "must look like module:app")
    one_line_error(results[7], "bad queue!")
