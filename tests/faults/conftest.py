"""Fixtures of the fault suite: every test here is marked ``faults``.

CI runs the suite at reduced sizes; ``make faults`` sets CONVEYOR_FAULTS_FULL=1 (the sizes of
issue 5) and CONVEYOR_FAULTS_REPORT, where each scenario writes its figures (see figures.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import Conveyor
from tests.integration.support import WorkerProcess, worker_processes

from .apps import create_tables
from .figures import Figures

StartWorker = Callable[..., WorkerProcess]
FAULT_APP = "tests.faults.apps:app"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.faults)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_OUTCOME] = report.outcome
    return report


_OUTCOME = pytest.StashKey[str]()


def _migrated_with_log(url: str) -> str:
    application = Conveyor(url)
    application.migrate()
    application.close()
    create_tables(url)
    return url


@pytest.fixture
def pg_url(pg_schema_url: str) -> str:
    """A migrated PostgreSQL schema with the execution log table."""
    return _migrated_with_log(pg_schema_url)


@pytest.fixture
def sqlite_file_url(sqlite_url: str) -> str:
    """A migrated SQLite file with the execution log table."""
    return _migrated_with_log(sqlite_url)


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest) -> str:
    """``sqlite_file_url`` and ``pg_url`` in turn: a scenario run on each backend."""
    name = "sqlite_file_url" if request.param == "sqlite" else "pg_url"
    found: str = request.getfixturevalue(name)
    return found


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[StartWorker]:
    """``workers(url, *worker_args, app=FAULT_APP, prefix=(), env=None)`` starts a ``conveyor
    worker`` subprocess; every one is killed at teardown and its log printed (shown on failure).

    Request it *after* the database fixture so the workers die before the database is dropped."""
    with worker_processes(tmp_path, app=FAULT_APP, show=12, tail=5_000) as start:
        yield start


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Callable[[int, str], Figures]]:
    """``figures(order, scenario)`` gives the scenario's Figures; written at teardown with the
    test's outcome when CONVEYOR_FAULTS_REPORT is set."""
    made: list[Figures] = []

    def make(order: int, scenario: str) -> Figures:
        fig = Figures(order, scenario)
        made.append(fig)
        return fig

    yield make
    outcome = request.node.stash.get(_OUTCOME, "error")
    for fig in made:
        fig.write(outcome)
