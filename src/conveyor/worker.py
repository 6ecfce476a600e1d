"""The worker: claims jobs, runs async tasks on its event loop and sync tasks in a thread pool,
heartbeats their leases, writes their outcomes in batches, and rescues jobs of dead workers.

All database work runs in a small thread pool beside the event loop, so the loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from . import serialization, states
from .backends.base import IdleClaim, WorkerInfo
from .control import Cancel, JobContext, Snooze, _current
from .errors import InvalidArgumentsError
from .job import Job, JobState
from .options import check_queue_name
from .services.pruner import Pruner
from .services.rescuer import Rescuer
from .services.scheduler import SCHEDULE_INTERVAL, Scheduler
from .services.vacuum import DEFAULT_MIN_DEAD, IDLE_MIN_DEAD, Vacuum
from .services.watchdog import Watchdog
from .states import Outcome

if TYPE_CHECKING:
    from .app import Conveyor, Task

logger = logging.getLogger("conveyor.worker")
#: Idle polling where the backend cannot push (SQLite across processes): from 1 ms, growing, to 50 ms.
IDLE_POLL_MIN = 0.001
IDLE_POLL_MAX = 0.05
#: Longest wait for one database call during shutdown (hand-back, deregistration): a worker
#: whose database is unreachable still exits soon after its grace period.
SHUTDOWN_CALL_TIMEOUT = 5.0
T = TypeVar("T")


@dataclass
class _Attempt:
    """One claimed job being run by this worker."""

    job: Job
    ctx: JobContext
    started: float  # time.monotonic() at claim
    is_async: bool = False
    inner: asyncio.Future[Any] | None = None
    runner: asyncio.Task[None] | None = None
    abandoned: bool = False  # lease lost, or handed back at shutdown: write no outcome

    def db_now(self) -> datetime:
        """The database clock now, from the claim's database time plus monotonic time since."""
        assert self.job.attempted_at is not None
        return self.job.attempted_at + timedelta(seconds=time.monotonic() - self.started)


@dataclass
class WorkerStats:
    claimed: int = 0
    #: Of those, the jobs the backend's listener claimed for this worker while it was idle.
    listener_claimed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    rejected: int = 0  # outcomes refused by fencing (the job was no longer ours)
    handed_back: int = 0
    rescued: int = 0
    pruned_jobs: int = 0
    pruned_events: int = 0
    #: Periodic jobs this worker's scheduler enqueued (ticks it saw first).
    periodic_enqueued: int = 0


class Worker:
    """Run jobs from ``queues`` (default: every queue the app's tasks name)."""

    def __init__(
        self,
        app: Conveyor,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 10,
        lease: float = 30.0,
        poll_interval: float = 1.0,
        grace: float = 30.0,
        rescue_interval: float | None = None,
        prune_interval: float | None = 3600.0,
        vacuum_interval: float | None = 2.0,
        vacuum_min_dead: int = DEFAULT_MIN_DEAD,
        batch_size: int = 100,
        batch_window: float = 0.002,
        worker_id: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, not {concurrency}")
        if lease <= 0 or poll_interval <= 0 or grace < 0:
            raise ValueError("lease and poll_interval must be > 0 and grace >= 0")
        for name, value in (
            ("prune_interval", prune_interval),
            ("vacuum_interval", vacuum_interval),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, not {value!r}")
        self.app = app
        self.queues = [check_queue_name(q) for q in (queues or app.default_queues())]
        self.concurrency = concurrency
        self.lease = lease
        self.poll_interval = poll_interval
        self.grace = grace
        self.heartbeat_interval = lease / 3
        self.rescue_interval = (
            rescue_interval if rescue_interval is not None else min(lease / 2, 15.0)
        )
        #: How often one worker of the fleet prunes (see services/pruner.py); None: never here.
        self.prune_interval = prune_interval
        #: How often this worker looks at the jobs table's dead rows (services/vacuum.py).
        self.vacuum_interval = vacuum_interval
        self.vacuum_min_dead = vacuum_min_dead
        self.batch_size = batch_size
        self.batch_window = batch_window
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats = WorkerStats()
        self._scheduler = Scheduler(app)
        self._attempts: dict[int, _Attempt] = {}
        self._outbox: list[Outcome] = []
        self._stopping = False
        self._pushed = False
        self._stuck_calls = False  # a shutdown call timed out: its thread may still be blocked
        self._idle_delay = IDLE_POLL_MIN
        self._claim_min = max(1, min(concurrency, batch_size) // 4)
        # The idle claim (backends.base.IdleClaim): while the fetch loop waits with free slots
        # (_parked: how many), the backend's listener may claim for us; _claiming_away until
        # those jobs are delivered to the loop. Shared with the listener's thread: under the lock.
        self._idle_lock = threading.Lock()
        self._parked = 0
        self._claiming_away = False
        self._db_pool = ThreadPoolExecutor(4, thread_name_prefix="conveyor-db")
        self._task_pool = ThreadPoolExecutor(concurrency, thread_name_prefix="conveyor-task")

    @property
    def outcome_counts(self) -> Counter[str]:
        return self.stats.outcomes

    @property
    def push_wakeups(self) -> bool:
        """True while the backend pushes due jobs to this worker (PostgreSQL LISTEN/NOTIFY);
        False when it polls (SQLite: from 1 ms, backing off to 50 ms while idle)."""
        return self._pushed

    @property
    def running_job_ids(self) -> list[int]:
        return list(self._attempts)

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self, until_idle: bool = False) -> None:
        """Work until ``stop()`` (or, with ``until_idle``, until no due job is left)."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._outbox_ready = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        backend = self.app.backend
        await self._db(self.app.apply_queue_limits)
        info = WorkerInfo(self.id, socket.gethostname(), os.getpid(), self.queues, self.concurrency)
        await self._db(backend.worker_register, info)
        remove_wake = self.app.add_wake_callback(self._wake_threadsafe)
        services = [
            asyncio.create_task(self._every(self.heartbeat_interval, self._heartbeat_once)),
            asyncio.create_task(self._every(self.rescue_interval, self._rescue_once)),
            asyncio.create_task(self._completer()),
        ]
        if self.app.watchdog_interval is not None:  # pipeline step deadlines
            services.append(
                asyncio.create_task(self._every(self.app.watchdog_interval, self._watchdog_once))
            )
        if self.prune_interval is not None:
            # Check a few times per interval; the database lets one worker per interval prune.
            check = self.prune_interval / 4
            services.append(asyncio.create_task(self._every(check, self._prune_once)))
        if self.vacuum_interval is not None:
            services.append(
                asyncio.create_task(self._every(self.vacuum_interval, self._vacuum_once))
            )
        if self.app.periodic_jobs and not until_idle:  # app.drain() enqueues no ticks
            services.append(
                asyncio.create_task(self._every(SCHEDULE_INTERVAL, self._schedule_once))
            )
        # Idle workers wake on a push where the backend has one (LISTEN/NOTIFY), else poll; the
        # pushing listener also claims for them (IdleClaim).
        idle_claim = IdleClaim(self._idle_claim_request, self._idle_claim_deliver)
        stop_push = (
            None
            if until_idle
            else await self._db(
                backend.watch_due,
                self.queues,
                self._wake_threadsafe,
                self._wake_threadsafe,
                idle_claim,
            )
        )
        self._pushed = stop_push is not None
        try:
            await self._fetch_loop(until_idle)
            if stop_push is not None:  # no more idle claims; the last one's jobs run below
                await self._quietly(stop_push)
                stop_push = None
                await self._claims_away_delivered(SHUTDOWN_CALL_TIMEOUT)
            await self._finish_running()
        finally:
            remove_wake()
            if stop_push is not None:
                await self._quietly(stop_push)
            for service in services:
                service.cancel()
            await asyncio.gather(*services, return_exceptions=True)
            await self._flush(give_up_after=10.0)
            await self._quietly(backend.worker_deregister, self.id)
            self._task_pool.shutdown(wait=False, cancel_futures=True)
            self._db_pool.shutdown(wait=not self._stuck_calls, cancel_futures=True)

    def stop(self) -> None:
        """Stop claiming; running jobs get ``grace`` seconds, then go back to the queue."""
        self._stopping = True
        if hasattr(self, "_loop"):
            self._loop.call_soon_threadsafe(self._wake.set)

    def _wake_threadsafe(self) -> None:
        self._loop.call_soon_threadsafe(self._wake.set)

    # -- idle claims (the listener's thread claims for us: see backends.base.IdleClaim) ---------
    def _idle_claim_request(self) -> tuple[str, int, float] | None:
        with self._idle_lock:
            if not self._parked or self._stopping:
                return None
            free, self._parked, self._claiming_away = self._parked, 0, True
        return self.id, min(free, self.batch_size), self.lease

    def _idle_claim_deliver(self, claimed: list[Job] | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._claimed_away, claimed)
        except RuntimeError:  # the worker stopped before the claim came back (database stalled)
            if isinstance(claimed, list) and claimed:
                logger.warning(
                    "worker %s: jobs %s were claimed for it after it stopped; they go back to "
                    "the queue when their lease runs out",
                    self.id,
                    [j.id for j in claimed],
                )

    def _claimed_away(self, claimed: list[Job] | BaseException) -> None:
        if isinstance(claimed, BaseException):
            logger.warning("worker %s: the listener's claim failed (%s)", self.id, claimed)
        else:
            self.stats.listener_claimed += len(claimed)
            for job in claimed:
                self._start(job)
        with self._idle_lock:
            self._claiming_away = False
        self._wake.set()

    async def _claims_away_delivered(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until a claim the listener made for us was delivered."""
        deadline = self._loop.time() + timeout
        while self._claiming_away and (left := deadline - self._loop.time()) > 0:
            await self._wait_wake(min(left, 0.1))

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._loop.run_in_executor(self._db_pool, fn, *args)

    async def _db_bounded(self, timeout: float, fn: Callable[..., T], *args: Any) -> T:
        """A database call at shutdown: given up (TimeoutError) after ``timeout`` seconds, so an
        unreachable database cannot hold the worker past its grace period. The call's thread
        is left to finish or fail on its own."""
        try:
            return await asyncio.wait_for(self._db(fn, *args), max(timeout, 0.1))
        except TimeoutError:
            self._stuck_calls = True
            raise TimeoutError(f"no answer from the database within {timeout:g} s") from None

    async def _quietly(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            await self._db_bounded(SHUTDOWN_CALL_TIMEOUT, fn, *args)
        except Exception as exc:
            logger.warning("worker %s: %s failed: %s", self.id, getattr(fn, "__name__", fn), exc)

    async def _every(self, interval: float, fn: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await fn()
            except Exception:
                logger.exception("worker %s: %s failed", self.id, getattr(fn, "__name__", fn))

    async def _wait_wake(self, timeout: float) -> None:
        if not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # no task per wait, unlike wait_for
                    await self._wake.wait()
        self._wake.clear()

    # -- claiming -------------------------------------------------------------------------------
    def _idle_wait(self, claimed_any: bool) -> float:
        """How long to sleep after a claim found nothing: the poll interval when pushes wake us,
        else a short interval that grows while idle (1 ms, x1.5, up to IDLE_POLL_MAX)."""
        if self._pushed:
            return self.poll_interval
        self._idle_delay = (
            IDLE_POLL_MIN
            if claimed_any
            else min(self._idle_delay * 1.5, IDLE_POLL_MAX, self.poll_interval)
        )
        return self._idle_delay

    async def _fetch_loop(self, until_idle: bool) -> None:
        failures = 0
        claimed_any = True
        window_ends: float | None = None  # while waiting for more slots to free up
        while not self._stopping:
            # A job holds its slot until its outcome is written, give or take a batch: when
            # writes lag (the database is slow or failing), claiming stops instead of piling
            # up outcomes in memory.
            free = min(
                self.concurrency - len(self._attempts),
                self.concurrency + self.batch_size - len(self._attempts) - len(self._outbox),
            )
            if free <= 0:
                await self._wait_wake(self.poll_interval)
                continue
            if self._attempts and free < self._claim_min and not until_idle:
                # Few slots free: wait (up to one batch window) for more, so that one bigger
                # claim replaces many small ones. Every finishing job wakes us to look again.
                now = self._loop.time()
                window_ends = window_ends or now + self.batch_window
                if now < window_ends:
                    await self._wait_wake(window_ends - now)
                    continue
            window_ends = None
            if until_idle:
                await self._flush()
            try:
                # At most a batch per claim: with more slots than that, the next claim is on its
                # way while the jobs of this one run (claims and runs overlap).
                jobs = await self._db(
                    self.app.backend.job_fetch_available,
                    self.id,
                    self.queues,
                    min(free, self.batch_size),
                    self.lease,
                )
                failures = 0
            except Exception as exc:
                failures += 1
                logger.warning("worker %s: claim failed (%s); retrying", self.id, exc)
                await self._wait_wake(min(self.poll_interval * failures, 5.0))
                continue
            for job in jobs:
                self._start(job)
            if jobs:
                claimed_any = True
                continue
            if until_idle and not self._attempts and not self._outbox:
                return
            with self._idle_lock:  # let the listener claim for us while we wait
                self._parked = free
            await self._wait_wake(self._idle_wait(claimed_any))
            with self._idle_lock:
                self._parked = 0
            while self._claiming_away and not self._stopping:  # never two claims at once
                await self._wait_wake(self.poll_interval)
            claimed_any = False

    def _start(self, job: Job) -> None:
        self.stats.claimed += 1
        older = self._attempts.get(job.id)
        if older is not None and not older.abandoned:
            # The job came back to us (rescued, then claimed again) while an older attempt of it
            # still runs here: that attempt's lease is gone, so its outcome must not be written.
            self._abandon(older, f"claimed again as attempt {job.attempt}; its lease was lost")
        attempt = _Attempt(job, JobContext(job, self.id), time.monotonic())
        self._attempts[job.id] = attempt
        token = _current.set(attempt.ctx)  # the runner (and so the task) sees current_job()
        try:
            attempt.runner = asyncio.create_task(self._execute(attempt))
        finally:
            _current.reset(token)

    # -- running --------------------------------------------------------------------------------
    async def _execute(self, attempt: _Attempt) -> None:
        try:
            outcome = await self._outcome_of(attempt)
        except asyncio.CancelledError:  # interrupted before the task's code even started
            outcome = self._cancelled(attempt)
        except Exception as exc:  # a bug in Conveyor: still end the attempt, never lose the job
            logger.exception("worker %s: internal error running job %s", self.id, attempt.job.id)
            outcome = self._failure(attempt, "internal", f"internal error: {exc!r}")
        if outcome is not None and not attempt.abandoned:
            self._outbox.append(outcome)
            self._outbox_ready.set()
        if self._attempts.get(attempt.job.id) is attempt:  # not a newer attempt of the job
            del self._attempts[attempt.job.id]
        self._wake.set()

    async def _outcome_of(self, attempt: _Attempt) -> Outcome | None:
        job = attempt.job
        task = self.app.tasks.get(job.task)
        if task is None:
            return self._dead(attempt, "unknown_task", f"no task named {job.task!r} is registered")
        if not isinstance(job.args, list) or not isinstance(job.kwargs, dict):
            return self._dead(
                attempt,
                "bad_arguments",
                f"job {job.id} has unusable arguments: args must be a JSON array and kwargs a "
                f"JSON object, got {type(job.args).__name__} and {type(job.kwargs).__name__}",
            )
        attempt.is_async = task.is_async
        if task.is_async:
            return await self._run_async(attempt, task)
        return await self._run_sync(attempt, task)

    async def _run_async(self, attempt: _Attempt, task: Task[Any, Any]) -> Outcome | None:
        """Run an async task in this runner's own asyncio task (one task per job): cancelling
        the runner (``_interrupt``) cancels the task's code."""
        job = attempt.job
        timer = None if job.timeout is None else asyncio.timeout(job.timeout)
        try:
            if timer is None:
                value = await task.fn(*job.args, **job.kwargs)
            else:
                async with timer:
                    value = await task.fn(*job.args, **job.kwargs)
        except asyncio.CancelledError:
            return self._cancelled(attempt)
        except Exception as exc:
            if timer is not None and timer.expired():
                return self._timed_out(attempt, task)
            return self._raised(attempt, task, exc)
        if timer is not None and timer.expired():  # the task swallowed its cancellation
            return self._timed_out(attempt, task)
        if attempt.abandoned:
            return None
        return self._succeeded(attempt, task, value)

    async def _run_sync(self, attempt: _Attempt, task: Task[Any, Any]) -> Outcome | None:
        """Run a sync task in the thread pool; on timeout it is flagged (it cannot be stopped)
        and the attempt fails at once."""
        job = attempt.job
        ctx = contextvars.copy_context()
        inner = asyncio.wrap_future(
            self._task_pool.submit(ctx.run, task.fn, *job.args, **job.kwargs)
        )
        attempt.inner = inner
        if not await self._finished_in_time(inner, job.timeout):
            return self._timed_out(attempt, task)
        if attempt.abandoned:
            return None
        if inner.cancelled():
            return self._cancelled(attempt)
        exc = inner.exception()
        if exc is not None:
            return self._raised(attempt, task, exc)
        return self._succeeded(attempt, task, inner.result())

    @staticmethod
    async def _finished_in_time(inner: asyncio.Future[Any], timeout: float | None) -> bool:
        """Wait for the task; False if ``timeout`` ran out first. The task's own exception or
        cancellation is left in ``inner`` for classification."""
        if timeout is not None:
            done, _ = await asyncio.wait({inner}, timeout=timeout)
            return bool(done)
        try:
            await inner
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this runner itself is being cancelled (shutdown), not just the task
        except BaseException:
            pass
        return True

    def _succeeded(self, attempt: _Attempt, task: Task[Any, Any], value: Any) -> Outcome:
        if value is None:  # the common case, without the encoder
            return states.succeed(attempt.job, "null")
        try:
            text = serialization.dumps(value, "result", self.app.max_payload_bytes)
        except InvalidArgumentsError as bad:
            return self._failure(attempt, "bad_result", f"result cannot be stored: {bad}", task)
        return states.succeed(attempt.job, text)

    def _cancelled(self, attempt: _Attempt) -> Outcome | None:
        """The task's code was cancelled: a cancellation request ends the job cancelled; an
        abandoned attempt (lease lost, shutdown) writes nothing."""
        if attempt.ctx.cancel_requested and not attempt.abandoned:
            return states.cancel(attempt.job, "cancelled by request", attempt.db_now())
        return None

    def _timed_out(self, attempt: _Attempt, task: Task[Any, Any]) -> Outcome:
        attempt.ctx.request_cancel()  # async code was cancelled by its timer; sync code sees this
        job = attempt.job
        return self._failure(
            attempt, "timeout", f"job {job.id} exceeded its {job.timeout:g} s timeout", task
        )

    def _raised(self, attempt: _Attempt, task: Task[Any, Any], exc: BaseException) -> Outcome:
        job = attempt.job
        if isinstance(exc, Snooze):
            return states.snooze(job, exc.seconds, attempt.db_now())
        if isinstance(exc, Cancel):
            return states.cancel(job, self.app.scrubber(job)(exc.reason), attempt.db_now())
        trace = "".join(traceback.format_exception(exc))
        return self._failure(attempt, "error", f"{type(exc).__name__}: {exc}", task, trace)

    def _failure(
        self,
        attempt: _Attempt,
        kind: str,
        message: str,
        task: Task[Any, Any] | None = None,
        trace: str | None = None,
    ) -> Outcome:
        """A failed attempt, logged and stored with redacted argument values scrubbed from its
        message and traceback."""
        job = attempt.job
        backoff = task.backoff if task is not None else states.Backoff()
        scrub = self.app.scrubber(job)
        message = scrub(message)
        logger.warning("job %s (%s) attempt %s failed: %s", job.id, job.task, job.attempt, message)
        trace = None if trace is None else scrub(trace)
        return states.fail(job, kind, message, attempt.db_now(), backoff, trace)

    def _dead(self, attempt: _Attempt, kind: str, message: str) -> Outcome:
        logger.error("job %s: %s", attempt.job.id, message)
        entry = states.error_entry(attempt.job, kind, message, attempt.db_now())
        return Outcome(attempt.job.id, attempt.job.attempt, JobState.DEAD, error=entry)

    def _interrupt(self, attempt: _Attempt) -> None:
        """Tell the task to stop: async tasks are cancelled, sync tasks see the flag."""
        attempt.ctx.request_cancel()
        if attempt.is_async and attempt.runner is not None and not attempt.runner.done():
            attempt.runner.cancel()

    def _abandon(self, attempt: _Attempt, why: str) -> None:
        logger.warning("worker %s: abandoning job %s: %s", self.id, attempt.job.id, why)
        attempt.abandoned = True
        self._interrupt(attempt)

    # -- outcomes -------------------------------------------------------------------------------
    async def _completer(self) -> None:
        while True:
            await self._outbox_ready.wait()
            if len(self._outbox) < self.batch_size:
                await asyncio.sleep(self.batch_window)
            try:
                await self._flush()
            except Exception:
                logger.exception("worker %s: writing outcomes failed", self.id)
                await asyncio.sleep(0.5)

    async def _flush(self, give_up_after: float | None = None) -> None:
        """Write every pending outcome (fenced), retrying database errors."""
        started = time.monotonic()
        async with self._flush_lock:
            self._outbox_ready.clear()
            while self._outbox:
                batch = self._outbox[: self.batch_size]
                try:
                    if give_up_after is None:
                        applied = await self._db(self.app.backend.job_finish_many, self.id, batch)
                    else:
                        left = give_up_after - (time.monotonic() - started)
                        applied = await self._db_bounded(
                            left, self.app.backend.job_finish_many, self.id, batch
                        )
                except Exception as exc:
                    if give_up_after is not None and time.monotonic() - started > give_up_after:
                        logger.error(
                            "worker %s: giving up writing %d outcomes: %s",
                            self.id,
                            len(self._outbox),
                            exc,
                        )
                        self._outbox.clear()
                        return
                    logger.warning(
                        "worker %s: writing outcomes failed (%s); retrying", self.id, exc
                    )
                    await asyncio.sleep(0.2)
                    continue
                del self._outbox[: len(batch)]
                for outcome in batch:
                    if outcome.job_id in applied:
                        self.stats.outcomes[str(outcome.state)] += 1
                    else:
                        self.stats.rejected += 1
                        logger.warning(
                            "worker %s: outcome of job %s attempt %s rejected: no longer ours",
                            self.id,
                            outcome.job_id,
                            outcome.attempt,
                        )
            self._wake.set()

    # -- leases and maintenance -----------------------------------------------------------------
    async def _heartbeat_once(self) -> None:
        ids = [*self._attempts, *(o.job_id for o in self._outbox)]
        backend = self.app.backend
        held = await self._db(backend.job_heartbeat, self.id, ids, self.lease) if ids else {}
        await self._db(backend.worker_heartbeat, self.id)
        asked = set(ids)
        for job_id, attempt in list(self._attempts.items()):
            if job_id not in asked or attempt.abandoned:
                continue
            if job_id not in held:
                self._abandon(attempt, "its lease was lost (claimed elsewhere or rescued)")
            elif held[job_id] and not attempt.ctx.cancel_requested:
                logger.info("worker %s: cancelling job %s on request", self.id, job_id)
                self._interrupt(attempt)

    async def _rescue_once(self) -> None:
        rescued = await self._db(Rescuer(self.app.backend).run_once)
        self.stats.rescued += len(rescued)

    async def _watchdog_once(self) -> None:
        await self._db(Watchdog(self.app.backend).run_once)

    async def _vacuum_once(self) -> None:
        # Idle (waiting for work, nothing running): a lower bar, so that a burst's dead rows go
        # before the next jobs' claims step over them, and a paced vacuum, so that the jobs that
        # arrive meanwhile are picked up as fast as ever.
        idle = self._parked > 0 and not self._attempts
        min_dead = min(self.vacuum_min_dead, IDLE_MIN_DEAD) if idle else self.vacuum_min_dead
        await self._db(Vacuum(self.app.backend, min_dead, gentle=idle).run_once)

    async def _schedule_once(self) -> None:
        enqueued = await self._db(self._scheduler.run_once)
        self.stats.periodic_enqueued += len(enqueued)

    async def _prune_once(self) -> None:
        assert self.prune_interval is not None
        pruner = Pruner(self.app.backend, self.app.retention)
        result = await self._db(pruner.run_if_due, self.id, self.prune_interval)
        if result is not None:
            self.stats.pruned_jobs += result.total_jobs
            self.stats.pruned_events += result.events

    async def _finish_running(self) -> None:
        """Shutdown: give running jobs ``grace`` seconds, then hand the rest back to the queue."""
        deadline = time.monotonic() + self.grace
        while self._attempts and (left := deadline - time.monotonic()) > 0:
            await self._wait_wake(min(left, 0.1))
        # A task that returned just before the deadline finished within grace: let its runner
        # record the outcome instead of handing the job back (and running it twice).
        finishing = [
            a.runner
            for a in self._attempts.values()
            if not a.abandoned and a.inner is not None and a.inner.done() and a.runner is not None
        ]
        if finishing:
            await asyncio.wait(finishing, timeout=1.0)
        remaining = [a for a in self._attempts.values() if not a.abandoned]
        for attempt in remaining:
            self._abandon(attempt, "shutdown grace period over; handing back")
        await self._flush(give_up_after=10.0)
        if remaining:
            ids = [a.job.id for a in remaining]
            try:
                self.stats.handed_back += await self._db_bounded(
                    SHUTDOWN_CALL_TIMEOUT, self.app.backend.job_hand_back, self.id, ids
                )
            except Exception as exc:
                logger.error("worker %s: hand-back failed (%s); leases will expire", self.id, exc)
