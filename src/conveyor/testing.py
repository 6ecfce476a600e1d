"""Running jobs in users' tests, through the real database, claim and state machine (no second,
in-memory implementation to drift from them).

- Manual mode, ``app.drain()`` (Oban's ``drain_queue``): enqueue as the code under test does, then
  work off every due job in this process and look at the outcomes.
- Inline mode, ``with inline(app):`` (Oban's ``:inline``, huey's immediate mode): inside the block
  every enqueue, pipeline start and batch runs the due jobs before it returns, and returns its
  jobs as they ended (the jobs those jobs enqueue run too, depth first, up to
  :data:`MAX_DEPTH` levels). Jobs enqueued on a caller's own connection (``connection=``) are
  not committed yet, so they run at the next inline enqueue or drain. A job that fails waits out
  its backoff as always: it is ``retrying`` when the enqueue returns.

Periodic jobs are never scheduled by either mode: tests call the task, or ``Scheduler(app)
.run_once(now)`` with the time they want.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import Conveyor

logger = logging.getLogger("conveyor.testing")

#: How deep inline runs nest (a job that enqueues a job that enqueues ...): past it, the jobs
#: stay queued (with a warning) instead of recursing for ever.
MAX_DEPTH = 20
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("conveyor_inline_depth", default=0)


@contextmanager
def inline(app: Conveyor) -> Iterator[Conveyor]:
    """Inline mode for the block (see the module's doc); nests, and restores what was before."""
    before = app.inline
    app.inline = True
    try:
        yield app
    finally:
        app.inline = before


def run_due_jobs(app: Conveyor) -> None:
    """Run every due job of ``app`` now (its drain), from any thread: inside a running event
    loop (an async task or test), in a thread of its own while this one waits."""
    depth = _depth.get()
    if depth >= MAX_DEPTH:
        logger.warning("inline jobs nested %d deep: leaving the new ones queued", depth)
        return
    context = contextvars.copy_context()
    context.run(_depth.set, depth + 1)
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop here: drain in this thread
        context.run(app.drain)
        return
    failure: list[BaseException] = []

    def drain() -> None:
        try:
            context.run(app.drain)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=drain, name="conveyor-inline")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


__all__ = ["MAX_DEPTH", "inline", "run_due_jobs"]
