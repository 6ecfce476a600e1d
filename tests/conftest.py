"""Shared fixtures: real SQLite files and a real PostgreSQL server, never mocks.

PostgreSQL is found in this order: $CONVEYOR_TEST_POSTGRES_URL, then postgresql://postgres@127.0.0.1:5432,
then a throwaway cluster started with initdb/pg_ctl. Without any, PostgreSQL tests are skipped
loudly, except under CI=true, where that is a failure. Each test gets its own schema.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from conveyor import Conveyor

TEST_DB = "conveyor_test"
_pg_state: dict[str, str | None] = {}


def _try_connect(url: str) -> bool:
    try:
        import psycopg

        psycopg.connect(url, connect_timeout=3).close()
        return True
    except Exception:
        return False


def _throwaway_cluster() -> str | None:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl or os.geteuid() == 0:  # initdb refuses to run as root
        return None
    data = tempfile.mkdtemp(prefix="conveyor-pg-")
    port = "55432"
    subprocess.run(
        [initdb, "-D", data, "-U", "postgres", "-A", "trust"], check=True, capture_output=True
    )
    subprocess.run(
        [
            pg_ctl,
            "-D",
            data,
            "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    _pg_state["cluster"] = data
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def _find_server() -> str | None:
    env = os.environ.get("CONVEYOR_TEST_POSTGRES_URL")
    if env:
        return env if _try_connect(env) else None
    default = "postgresql://postgres@127.0.0.1:5432/postgres"
    if _try_connect(default):
        return default
    try:
        return _throwaway_cluster()
    except Exception:
        return None


def _admin_url() -> str | None:
    if "admin" not in _pg_state:
        _pg_state["admin"] = _find_server()
        url = _pg_state["admin"]
        if url is not None:
            import psycopg

            with psycopg.connect(url, autocommit=True) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (TEST_DB,)
                ).fetchone()
                if not exists:
                    conn.execute(f"CREATE DATABASE {TEST_DB}")
    return _pg_state["admin"]


def _db_url(admin: str, db: str) -> str:
    base, _, _ = admin.rpartition("/")
    return f"{base}/{db}"


def pytest_sessionfinish(session: pytest.Session) -> None:
    data = _pg_state.get("cluster")
    if data:
        subprocess.run(["pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def postgres_url_or_skip() -> str:
    admin = _admin_url()
    if admin is None:
        message = "no PostgreSQL server could be found or started"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}, and CI=true requires the PostgreSQL tests to run")
        warnings.warn(f"SKIPPING PostgreSQL tests: {message}", stacklevel=1)
        pytest.skip(message)
    return _db_url(admin, TEST_DB)


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A URL whose search_path is a fresh, empty schema (dropped afterwards)."""
    import psycopg

    url = postgres_url_or_skip()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    yield f"{url}{sep}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'conveyor.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """An empty database on each backend in turn: the contract suite runs against both."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_schema_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def app(db_url: str) -> Iterator[Conveyor]:
    """A migrated app on each backend in turn."""
    application = Conveyor(db_url)
    application.migrate()
    yield application
    application.close()
