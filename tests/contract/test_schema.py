"""The schema: CHECK constraints reject rows that break the state machine's invariants, whoever
writes them; migrations are idempotent and safe to run from several threads or processes at once;
and the migrations build exactly the schema documented in ``backends/<name>/schema.sql``."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import threading
from datetime import timedelta
from importlib import resources
from typing import Any

from conveyor import Conveyor, JobState
from conveyor.backends.base import NewJob
from conveyor.backends.migrate import LATEST_VERSION
from conveyor.states import succeed

from .conftest import RawDB, claim_one, is_sqlite

# -- CHECK constraints --------------------------------------------------------------------------


def test_check_constraints_reject_rows_that_break_the_invariants(app: Conveyor, raw: RawDB) -> None:
    def insert() -> int:
        return app.backend.job_insert_many([NewJob(task="t", queue="q", max_attempts=3)])[0].id

    done = insert()
    app.backend.job_finish_many("worker-a", [succeed(claim_one(app, queue="q"), "1")])
    running = insert()
    claim_one(app, queue="q")
    queued = insert()
    assert [app.get_job(i).state for i in (queued, running, done)] == [
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.SUCCEEDED,
    ]

    now = app.backend.db_now()
    ts = raw.ts(now)
    attempted = app.get_job(done).attempted_at
    assert attempted is not None
    before_attempt = raw.ts(attempted - timedelta(hours=1))
    cases: list[tuple[str, str, tuple[Any, ...], str]] = [
        ("finished_at on a queued job", "finished_at = %s", (ts,), "finished_iff_terminal"),
        ("succeeded without finished_at", "finished_at = NULL", (), "finished_iff_terminal"),
        ("unknown state", "state = 'paused'", (), "state_valid"),
        (
            "running without a lease",
            "state = 'running', attempt = 1, attempted_at = %s, started_at = %s",
            (ts, ts),
            "lease_iff_running",
        ),
        (
            "a lease on a queued job",
            "lease_owner = 'w', lease_expires_at = %s",
            (ts,),
            "lease_iff_running",
        ),
        ("running, never attempted", "attempted_at = NULL", (), "running_attempted"),
        (
            "finished before attempted",
            "finished_at = %s",
            (before_attempt,),
            "finished_after_attempted",
        ),
        ("attempt above max_attempts", "attempt = 4", (), "attempt_range"),
        ("negative attempt", "attempt = -1", (), "attempt_range"),
        ("queued with no attempt left", "attempt = 3", (), "pending_can_run"),
        ("waiting with no attempt left", "state = 'waiting', attempt = 3", (), "pending_can_run"),
        ("waiting after it started", "state = 'waiting', attempt = 1", (), "waiting_never_started"),
        ("result on a queued job", "result = '1'", (), "result_only_succeeded"),
        (
            "cancel request on a queued job",
            f"cancel_requested = {raw.true}",
            (),
            "cancel_only_running",
        ),
        ("zero concurrency_limit", "concurrency_limit = 0", (), "limits_positive"),
        ("negative timeout", "timeout = -1", (), "limits_positive"),
        ("empty queue name", "queue = ''", (), "names_valid"),
    ]
    target = {
        "succeeded without finished_at": done,
        "running, never attempted": running,
        "finished before attempted": done,
        "attempt above max_attempts": running,
        "negative attempt": done,
    }
    problems = []
    for label, assignment, params, constraint in cases:
        job_id = target.get(label, queued)
        before = app.get_job(job_id)
        try:
            raw.execute(f"UPDATE conveyor_jobs SET {assignment} WHERE id = %s", (*params, job_id))
        except raw.integrity_error as exc:
            if f"conveyor_jobs_{constraint}" not in str(exc):
                problems.append(f"{label}: rejected by the wrong rule: {exc}")
        else:
            problems.append(f"{label}: accepted")
        if app.get_job(job_id) != before:
            problems.append(f"{label}: the row changed")
    assert not problems, "\n".join(problems)

    # control: a valid direct update goes through, so the rejections above are the constraints'
    raw.execute("UPDATE conveyor_jobs SET priority = 7 WHERE id = %s", (queued,))
    assert app.get_job(queued).priority == 7

    try:
        raw.execute(
            "INSERT INTO conveyor_queues (name, concurrency_limit, updated_at) VALUES ('z', 0, %s)",
            (ts,),
        )
    except raw.integrity_error as exc:
        assert "conveyor_queues_limit_positive" in str(exc)
    else:
        raise AssertionError("a queue limit of 0 was accepted")

    # a dependency is always an older job, so the dependency graph cannot have a cycle
    try:
        raw.execute(
            "INSERT INTO conveyor_job_deps (job_id, depends_on) VALUES (%s, %s)", (queued, queued)
        )
    except raw.integrity_error as exc:
        assert "conveyor_job_deps_acyclic" in str(exc)
    else:
        raise AssertionError("a job depending on itself was accepted")


# -- migrations ---------------------------------------------------------------------------------


def test_migrate_is_idempotent(app: Conveyor, raw: RawDB) -> None:
    job = app.backend.job_insert_many([NewJob(task="t", queue="q")])[0]
    assert app.backend.schema_version() == LATEST_VERSION
    assert app.migrate() == []
    assert app.migrate() == []
    assert raw.scalar("SELECT count(*) FROM conveyor_migrations") == LATEST_VERSION
    assert app.get_job(job.id) == job
    # a second app on the same database finds nothing to do either
    other = Conveyor(app.url)
    try:
        assert other.migrate() == []
    finally:
        other.close()


def test_concurrent_migrations_in_threads_apply_each_version_once(db_url: str) -> None:
    runners = 4
    apps = [Conveyor(db_url) for _ in range(runners)]
    start = threading.Barrier(runners)
    applied: list[list[int]] = [[] for _ in range(runners)]
    errors: list[BaseException] = []

    def migrate(i: int) -> None:
        try:
            assert apps[i].raw_backend  # connect first, so the race is in migrate() itself
            start.wait(timeout=10)
            applied[i] = apps[i].migrate()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(i,)) for i in range(runners)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert sorted(v for versions in applied for v in versions) == list(
            range(1, LATEST_VERSION + 1)
        )
        assert sum(1 for versions in applied if versions) == 1
        for app in apps:
            assert app.backend.schema_version() == LATEST_VERSION
        _assert_usable(apps[0])
    finally:
        for app in apps:
            app.close()


_CHILD = """
import json, sys
from conveyor import Conveyor
app = Conveyor(sys.argv[1])
app.raw_backend
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps(app.migrate()), flush=True)
app.close()
"""


def test_concurrent_migrations_in_processes_apply_each_version_once(db_url: str) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, db_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for child in children:  # every child is connected and waiting ...
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for child in children:  # ... then all are released together
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=60) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
    applied = [json.loads(out) for out, _ in outputs]
    assert sorted(v for versions in applied for v in versions) == list(range(1, LATEST_VERSION + 1))
    app = Conveyor(db_url)
    try:
        assert app.backend.schema_version() == LATEST_VERSION
        _assert_usable(app)
    finally:
        app.close()


def _assert_usable(app: Conveyor) -> None:
    (job,) = app.backend.job_insert_many([NewJob(task="t", queue="q")])
    (claimed,) = app.backend.job_fetch_available("w", ["q"], 1, 30)
    assert claimed.id == job.id
    assert app.backend.job_finish_many("w", [succeed(claimed, "1")]) == {job.id}
    assert app.get_job(job.id).state == JobState.SUCCEEDED


# -- the migrations build the schema documented in schema.sql -----------------------------------


def _schema_sql(backend: str) -> str:
    return resources.files(f"conveyor.backends.{backend}").joinpath("schema.sql").read_text()


def _normalize(sql: str | None) -> str | None:
    if sql is None:
        return None
    sql = re.sub(r"--[^\n]*", "", sql)
    sql = re.sub(r"\s+", " ", sql).strip()
    return re.sub(r"\s*([(),])\s*", r"\1", sql)


def _sqlite_catalog(path: str) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        objects = sorted(
            (row[0], row[1], row[2], _normalize(row[3]))
            for row in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")
        )
        tables = [name for kind, name, _, _ in objects if kind == "table"]
        indexes = [name for kind, name, _, _ in objects if kind == "index"]
        return {
            "objects": objects,
            "columns": {t: conn.execute(f"PRAGMA table_xinfo('{t}')").fetchall() for t in tables},
            "index_list": {
                t: sorted(conn.execute(f"PRAGMA index_list('{t}')").fetchall()) for t in tables
            },
            "index_columns": {
                i: conn.execute(f"PRAGMA index_xinfo('{i}')").fetchall() for i in indexes
            },
            "foreign_keys": {
                t: conn.execute(f"PRAGMA foreign_key_list('{t}')").fetchall() for t in tables
            },
        }
    finally:
        conn.close()


_PG_CATALOG = {
    "tables": """
        SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1""",
    "columns": """
        SELECT table_name, column_name, ordinal_position, data_type, is_nullable, column_default,
               is_identity, identity_generation, character_maximum_length, numeric_precision
          FROM information_schema.columns
         WHERE table_schema = current_schema()
         ORDER BY table_name, ordinal_position""",
    "constraints": """
        SELECT c.relname, con.conname, con.contype, pg_get_constraintdef(con.oid)
          FROM pg_constraint con
          JOIN pg_class c ON c.oid = con.conrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema()
         ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, replace(indexdef, schemaname || '.', '')
          FROM pg_indexes WHERE schemaname = current_schema() ORDER BY 1, 2""",
    "functions": """
        SELECT p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid),
               p.provolatile, l.lanname, p.prosrc
          FROM pg_proc p
          JOIN pg_namespace n ON n.oid = p.pronamespace
          JOIN pg_language l ON l.oid = p.prolang
         WHERE n.nspname = current_schema()
         ORDER BY 1, 2""",
    "triggers": """
        SELECT c.relname, t.tgname, replace(pg_get_triggerdef(t.oid), n.nspname || '.', '')
          FROM pg_trigger t
          JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND NOT t.tgisinternal
         ORDER BY 1, 2""",
    "sequences": """
        SELECT sequencename, data_type, start_value, increment_by
          FROM pg_sequences WHERE schemaname = current_schema() ORDER BY 1""",
    "views": """
        SELECT viewname, definition FROM pg_views WHERE schemaname = current_schema() ORDER BY 1""",
    "options": """
        SELECT c.relname, c.reloptions
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.reloptions IS NOT NULL
         ORDER BY 1""",
}


def _pg_catalog(url: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return {name: conn.execute(sql).fetchall() for name, sql in _PG_CATALOG.items()}


def test_migrations_build_the_schema_in_schema_sql(
    app: Conveyor, db_url: str, other_db_url: str
) -> None:
    """``app`` was built by the migrations; ``other_db_url`` gets schema.sql as it stands."""
    if is_sqlite(db_url):
        documented_db = other_db_url.removeprefix("sqlite:///")
        script = sqlite3.connect(documented_db)
        script.executescript(_schema_sql("sqlite"))
        script.close()
        migrated = _sqlite_catalog(app.backend.path)  # type: ignore[attr-defined]
        documented = _sqlite_catalog(documented_db)
        names = {name for _, name, _, _ in migrated["objects"]}
    else:
        import psycopg

        with psycopg.connect(other_db_url, autocommit=True) as conn:
            conn.execute(_schema_sql("postgres"))  # type: ignore[arg-type]
        migrated = _pg_catalog(db_url)
        documented = _pg_catalog(other_db_url)
        names = {row[1] for row in migrated["constraints"] + migrated["indexes"]}
        names |= {row[0] for row in migrated["tables"] + migrated["functions"]}
        names |= {row[0] for row in migrated["views"]}
        names |= {row[1] for row in migrated["triggers"]}

    # the catalogs are not vacuous: they see the schema's tables, constraints and indexes
    for expected in (
        "conveyor_jobs",
        "conveyor_migrations",
        "conveyor_queues",
        "conveyor_workers",
        "conveyor_jobs_unique_key",
        "conveyor_jobs_fetch",
        "conveyor_job_events",  # a table on SQLite, a view over conveyor_history on PostgreSQL
        "conveyor_leader",
    ):
        assert expected in names, f"{expected} is missing from the migrated catalog"
    if not is_sqlite(db_url):
        assert "conveyor_jobs_finished_iff_terminal" in names and "conveyor_claim" in names
        assert {"conveyor_history", "conveyor_history_jobs", "conveyor_history_record"} <= names
        assert "conveyor_jobs_after_update" in names  # the history trigger (and its function)
    else:
        assert {"conveyor_jobs_history_update", "conveyor_job_events_job"} <= names
    for part in migrated:
        assert documented[part] == migrated[part], f"schema.sql differs from the migrations: {part}"
