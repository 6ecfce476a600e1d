"""Repeated use does not leak connections or threads."""

from __future__ import annotations

import os
import threading

from conveyor import Conveyor


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_repeated_drains_do_not_leak_connections_or_threads(app: Conveyor) -> None:
    @app.task
    def noop(i: int) -> int:
        return i

    noop.enqueue(0)
    app.drain(poll_interval=0.01)  # warm up pools
    files, threads = _open_files(), threading.active_count()
    for i in range(30):
        noop.enqueue(i)
        assert app.drain(poll_interval=0.01) == {"succeeded": 1}
    assert _open_files() <= files + 4
    assert threading.active_count() <= threads + 2
