"""Fixtures of the multi-process tests: a migrated database with the recording tables, and
``conveyor worker`` subprocesses that are always killed at teardown."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conveyor import Conveyor

from .apps import create_tables
from .support import WorkerProcess, worker_processes

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def url(app: Conveyor, db_url: str) -> str:
    """The migrated database of ``app`` (each backend in turn), with the recording tables."""
    create_tables(db_url)
    return db_url


@pytest.fixture
def start_worker(db_url: str, tmp_path: Path) -> Iterator[StartWorker]:
    """``start_worker(*worker_args)`` starts a ``conveyor worker`` subprocess on ``db_url``.

    Depends on ``db_url`` so that the workers are killed before the database is dropped."""
    with worker_processes(tmp_path) as start:
        yield functools.partial(start, db_url)
