"""Waiting for jobs to finish, without tight polling.

On PostgreSQL the database pushes: a trigger sends ``pg_notify('conveyor_job_state', ids)`` when
jobs reach a terminal state, and one listener connection per app wakes the waiters of those ids.
Waiters still re-read the job every ``app.result_poll_interval`` seconds, so a lost notification
(or a listener reconnecting) costs latency, never correctness. On SQLite, which cannot push, a
waiter polls with backoff: 10 ms, growing by half each time, to at most 500 ms.

Async waiters wait on an ``asyncio.Event`` and read the job in a worker thread, so the event loop
never blocks and a thousand waiters need no thousand threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import JobFailedError
from .job import Job, JobState

if TYPE_CHECKING:
    from .app import Conveyor

#: Re-read interval while the database pushes (PostgreSQL): only a safety net.
DEFAULT_PUSH_POLL_INTERVAL = 1.0
POLL_FIRST = 0.01
POLL_GROWTH = 1.5
POLL_MAX = 0.5

Waker = Callable[[], None]


def outcome(job: Job) -> Any:
    """A finished job's result, or JobFailedError for a dead or cancelled one."""
    if job.state == JobState.SUCCEEDED:
        return job.return_value
    raise JobFailedError(job)


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
        raise ValueError(f"timeout must be a number of seconds >= 0 or None, not {timeout!r}")
    return time.monotonic() + timeout


def _timed_out(job: Job, timeout: float | None) -> TimeoutError:
    return TimeoutError(f"job {job.id} ({job.task}) is still {job.state.value} after {timeout:g} s")


class JobWaiter:
    """One per app: the push listener (if the backend has one) and the waiters it wakes."""

    def __init__(self, app: Conveyor) -> None:
        self._app = app
        self._lock = threading.Lock()  # the wakers (the listener thread takes it too)
        self._start_lock = threading.Lock()  # starting the listener, which may take a while
        self._wakers: dict[int, list[Waker]] = {}
        self._push: bool | None = None  # None: listener not started yet
        self._stop_listener: Callable[[], None] | None = None

    def close(self) -> None:
        with self._start_lock:
            stop, self._stop_listener, self._push = self._stop_listener, None, None
        if stop is not None:
            stop()

    # -- push -----------------------------------------------------------------------------------
    def _start(self) -> bool:
        """Start the backend's push listener once; whether the backend pushes."""
        with self._start_lock:
            if self._push is None:
                stop = self._app.backend.watch_finished(self._finished, self._gap)
                self._stop_listener = stop
                self._push = stop is not None
            return self._push

    def _finished(self, job_ids: Iterable[int]) -> None:
        with self._lock:
            wakers = [w for i in job_ids for w in self._wakers.get(i, ())]
        for wake in wakers:
            wake()

    def _gap(self) -> None:
        """Notifications may have been missed: every waiter looks again."""
        with self._lock:
            wakers = [w for ws in self._wakers.values() for w in ws]
        for wake in wakers:
            wake()

    @contextlib.contextmanager
    def _registered(self, job_id: int, wake: Waker) -> Iterator[None]:
        with self._lock:
            self._wakers.setdefault(job_id, []).append(wake)
        try:
            yield
        finally:
            with self._lock:
                wakers = self._wakers[job_id]
                wakers.remove(wake)
                if not wakers:
                    del self._wakers[job_id]

    def _delays(self, push: bool) -> Iterator[float]:
        if push:
            while True:
                yield self._app.result_poll_interval
        delay = POLL_FIRST
        while True:
            yield delay
            delay = min(delay * POLL_GROWTH, POLL_MAX)

    # -- waiting --------------------------------------------------------------------------------
    def wait(self, job_id: int, timeout: float | None = None) -> Job:
        """The job once it is terminal (JobNotFoundError if it does not exist, TimeoutError)."""
        deadline = _deadline(timeout)
        push = self._start()
        event = threading.Event()
        with self._registered(job_id, event.set):
            for delay in self._delays(push):
                job = self._app.backend.job_get(job_id)
                if job.state.terminal:
                    return job
                pause = delay if deadline is None else min(delay, deadline - time.monotonic())
                if pause <= 0:
                    raise _timed_out(job, timeout)
                event.wait(pause)
                event.clear()
        raise AssertionError("unreachable")  # pragma: no cover

    async def wait_async(self, job_id: int, timeout: float | None = None) -> Job:
        """:meth:`wait` for a coroutine: the loop never blocks on the database or a sleep."""
        deadline = _deadline(timeout)
        push = self._push if self._push is not None else await asyncio.to_thread(self._start)
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed after we stopped waiting
                loop.call_soon_threadsafe(event.set)

        with self._registered(job_id, wake):
            for delay in self._delays(push):
                job = await asyncio.to_thread(self._app.backend.job_get, job_id)
                if job.state.terminal:
                    return job
                pause = delay if deadline is None else min(delay, deadline - time.monotonic())
                if pause <= 0:
                    raise _timed_out(job, timeout)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), pause)
                event.clear()
        raise AssertionError("unreachable")  # pragma: no cover
