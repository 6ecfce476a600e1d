"""Fixtures of the multi-process tests: a migrated database with the recording tables, and
``conveyor worker`` subprocesses that are always killed at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conveyor import Conveyor

from .apps import create_tables
from .support import WorkerProcess

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
    started: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        log = tmp_path / f"worker-{len(started) + 1}.log"
        worker = WorkerProcess(db_url, log, args)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.stop_now()
        for worker in started:  # shown by pytest when the test failed
            print(f"---- worker pid {worker.pid} {worker.args} (exit {worker.proc.returncode})")
            print(worker.log()[-20_000:])
