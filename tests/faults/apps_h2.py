"""Tasks of the stale-worker scenario (``--app tests.faults.apps_h2:app``), beside the shared
``faults.*`` tasks of apps.py (same app, same ``exec_log``)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from conveyor import current_job

from .apps import _db, app, log_end, log_start

__all__ = ["app", "block_first"]

#: The first attempt blocks until another worker runs the job again (``during_rerun``: its
#: outcome then meets a job running under a newer attempt) or until that rerun succeeded
#: (``after_success``: its outcome meets a finished job).
MODES = ("during_rerun", "after_success")
_JOB = "SELECT state, attempt, lease_owner FROM conveyor_jobs WHERE id = ?"


@app.task(name="faults.h2_block_first")
async def block_first(mode: str, later_ms: float, cap_s: float = 60.0) -> dict[str, Any]:
    """An async task whose *first* attempt blocks its worker's event loop (``time.sleep`` in a
    coroutine: no heartbeat, no other job, no outcome is written meanwhile) until the job was
    claimed again elsewhere, as ``mode`` says (at most ``cap_s`` seconds); later attempts sleep
    ``later_ms`` milliseconds politely. Every run is logged in exec_log; the result names the
    attempt and the worker that produced it."""
    ctx = current_job()
    me = ctx.worker_id
    if ctx.job.attempt == 1:  # the misbehaving attempt: everything here blocks the loop
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        log_start()
        deadline = time.monotonic() + cap_s
        while time.monotonic() < deadline:
            state, attempt, owner = _db(_JOB, (ctx.job.id,))[0]
            if mode == "after_success" and state == "succeeded":
                break
            if mode == "during_rerun" and state == "running" and attempt > 1 and owner != me:
                break
            time.sleep(0.05)
        log_end()
    else:
        await asyncio.to_thread(log_start)  # to_thread copies the context: current_job()
        await asyncio.sleep(later_ms / 1000)
        await asyncio.to_thread(log_end)
    return {"attempt": ctx.job.attempt, "worker": me, "pid": os.getpid()}
