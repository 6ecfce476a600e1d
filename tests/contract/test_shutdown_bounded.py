"""Shutdown cannot hang on an unreachable database: each shutdown call (outcome flush,
hand-back, deregistration) is given up after a bound, and the worker then does not wait for
the blocked thread (tests/faults/test_hosts.py cuts a real network link)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from conveyor import Conveyor
from conveyor.worker import Worker


def test_a_shutdown_call_that_never_answers_is_given_up(app: Conveyor) -> None:
    worker = Worker(app, concurrency=1)
    release = threading.Event()

    def hung_call() -> None:  # a database call stuck on a dead TCP connection
        release.wait(10)

    async def scenario() -> float:
        worker._loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no answer from the database within 0\.2 s"):
            await worker._db_bounded(0.2, hung_call)
        return time.monotonic() - t0

    try:
        waited = asyncio.run(scenario())
        assert 0.2 <= waited < 5
        assert worker._stuck_calls  # so the worker's thread pool is not joined at exit
    finally:
        release.set()
        worker._db_pool.shutdown(wait=True)
