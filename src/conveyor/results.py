"""Waiting for jobs, pipelines and batches, without tight polling.

On PostgreSQL the database pushes: a trigger sends ``pg_notify('conveyor_job_state', ids)`` when
jobs reach a terminal state (``conveyor_flow_state`` with ``p<id>``/``b<id>`` when pipelines and
batches change), and one listener connection per app and channel wakes the waiters of those keys.
Waiters still re-read what they wait for every ``app.result_poll_interval`` seconds, so a lost
notification (or a listener reconnecting) costs latency, never correctness. On SQLite, which
cannot push, a waiter polls with backoff: 10 ms, growing by half each time, to at most 500 ms.

Async waiters wait on an ``asyncio.Event`` and read the job in a worker thread, so the event loop
never blocks and a thousand waiters need no thousand threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

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
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


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


def _pause(
    delay: float, deadline: float | None, value: T, timed_out: Callable[[T], Exception]
) -> float:
    """How long to wait before reading again: ``delay``, cut to what is left before
    ``deadline``; raises ``timed_out(value)`` when nothing is left."""
    pause = delay if deadline is None else min(delay, deadline - time.monotonic())
    if pause <= 0:
        raise timed_out(value)
    return pause


def _timed_out(job: Job, timeout: float | None) -> TimeoutError:
    return TimeoutError(f"job {job.id} ({job.task}) is still {job.state.value} after {timeout:g} s")


#: Start a backend's push: ``subscribe(on_keys, on_gap)`` returns a stop function, or None when
#: the backend cannot push.
Subscribe = Callable[[Callable[[Iterable[K]], None], Callable[[], None]], Callable[[], None] | None]


class Watcher(Generic[K]):
    """Waiters keyed by what they wait for (a job id, ``"p12"``), woken by the backend's push
    (started on first use) and re-reading on a timer either way."""

    def __init__(self, app: Conveyor, subscribe: Callable[[], Subscribe[K]]) -> None:
        self._app = app
        self._subscribe = subscribe  # resolved on first use: the backend opens lazily
        self._lock = threading.Lock()  # the wakers (the listener thread takes it too)
        self._start_lock = threading.Lock()  # starting the listener, which may take a while
        self._wakers: dict[K, list[Waker]] = {}
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
                stop = self._subscribe()(self._notified, self._gap)
                self._stop_listener = stop
                self._push = stop is not None
            return self._push

    def _notified(self, keys: Iterable[K]) -> None:
        with self._lock:
            wakers = [w for k in keys for w in self._wakers.get(k, ())]
        for wake in wakers:
            wake()

    def _gap(self) -> None:
        """Notifications may have been missed: every waiter looks again."""
        with self._lock:
            wakers = [w for ws in self._wakers.values() for w in ws]
        for wake in wakers:
            wake()

    @contextlib.contextmanager
    def _registered(self, key: K, wake: Waker) -> Iterator[None]:
        with self._lock:
            self._wakers.setdefault(key, []).append(wake)
        try:
            yield
        finally:
            with self._lock:
                wakers = self._wakers[key]
                wakers.remove(wake)
                if not wakers:
                    del self._wakers[key]

    def _delays(self, push: bool) -> Iterator[float]:
        if push:
            while True:
                yield self._app.result_poll_interval
        delay = POLL_FIRST
        while True:
            yield delay
            delay = min(delay * POLL_GROWTH, POLL_MAX)

    # -- waiting --------------------------------------------------------------------------------
    def until(
        self,
        key: K,
        read: Callable[[], T],
        ready: Callable[[T], bool],
        timeout: float | None,
        timed_out: Callable[[T], Exception],
    ) -> T:
        """``read()`` until ``ready`` says yes (returned), waking on pushes for ``key``; raises
        ``timed_out(last read)`` once ``timeout`` seconds passed (None: wait for ever)."""
        deadline = _deadline(timeout)
        push = self._start()
        event = threading.Event()
        with self._registered(key, event.set):
            for delay in self._delays(push):
                value = read()
                if ready(value):
                    return value
                event.wait(_pause(delay, deadline, value, timed_out))
                event.clear()
        raise AssertionError("unreachable")  # pragma: no cover

    async def until_async(
        self,
        key: K,
        read: Callable[[], T],
        ready: Callable[[T], bool],
        timeout: float | None,
        timed_out: Callable[[T], Exception],
    ) -> T:
        """:meth:`until` for a coroutine: the loop never blocks on the database or a sleep
        (``read`` runs in a worker thread)."""
        deadline = _deadline(timeout)
        push = self._push if self._push is not None else await asyncio.to_thread(self._start)
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed after we stopped waiting
                loop.call_soon_threadsafe(event.set)

        with self._registered(key, wake):
            for delay in self._delays(push):
                value = await asyncio.to_thread(read)
                if ready(value):
                    return value
                pause = _pause(delay, deadline, value, timed_out)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), pause)
                event.clear()
        raise AssertionError("unreachable")  # pragma: no cover


class JobWaiter(Watcher[int]):
    """One per app: waits for jobs to finish (keys: job ids), pushed by ``watch_finished``."""

    def __init__(self, app: Conveyor) -> None:
        super().__init__(app, lambda: app.backend.watch_finished)

    def wait(self, job_id: int, timeout: float | None = None) -> Job:
        """The job once it is terminal (JobNotFoundError if it does not exist, TimeoutError)."""
        return self.until(job_id, *self._waiting(job_id, timeout))

    async def wait_async(self, job_id: int, timeout: float | None = None) -> Job:
        """:meth:`wait` for a coroutine: the loop never blocks on the database or a sleep."""
        return await self.until_async(job_id, *self._waiting(job_id, timeout))

    def _waiting(
        self, job_id: int, timeout: float | None
    ) -> tuple[Callable[[], Job], Callable[[Job], bool], float | None, Callable[[Job], Exception]]:
        """The arguments of ``until`` after the key: read the job, until terminal."""
        return (
            lambda: self._app.backend.job_get(job_id),
            lambda job: job.state.terminal,
            timeout,
            lambda job: _timed_out(job, timeout),
        )
