"""Tasks of the bad-input and security scenarios (``--app tests.faults.apps_h4:app``).

An app of its own, because it is configured: ``redact=("api_key",)`` for every task, and
``h4.login`` adds its ``password`` parameter (``$CONVEYOR_REDACT`` adds more, e.g. ``token``).
Every run is logged in ``exec_log`` (same table as apps.py) through this app's own URL.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

from conveyor import Cancel, Conveyor, Snooze, current_job
from tests.integration.apps import Recorder

app = Conveyor(redact=("api_key",))

_local = threading.local()


def _log_run() -> None:
    """One exec_log row for this run (start and end together: these tasks are instant)."""
    ctx = current_job()
    rec: Recorder | None = getattr(_local, "rec", None)
    if rec is None:
        rec = _local.rec = Recorder(app.url)
    now = time.time()
    try:
        rec.execute(
            "INSERT INTO exec_log (job_id, attempt, worker, pid, t_start, t_end)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (ctx.job.id, ctx.job.attempt, ctx.worker_id, os.getpid(), now, now),
        )
    except Exception:
        _local.rec = None
        with contextlib.suppress(Exception):
            rec.close()
        raise


@app.task(name="h4.echo", max_attempts=1)
def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Return exactly what it was called with (the arguments as the worker decoded them)."""
    _log_run()
    return {"args": list(args), "kwargs": kwargs}


@app.task(name="h4.login", redact=["password"], max_attempts=2, backoff=0)
def login(user: str, password: str, *, token: str, profile: dict[str, Any], mode: str) -> Any:
    """Secrets in: ``password`` (positional, redacted by this task), ``token`` (keyword,
    redacted by $CONVEYOR_REDACT) and ``profile['api_key']`` (nested, redacted by the app).
    ``mode``: "fail" raises with every secret in the message (twice: retried, then dead),
    "cancel" cancels with the password in the reason, "ok" returns the api_key in its result."""
    _log_run()
    secret = profile.get("api_key")
    if mode == "fail":
        raise PermissionError(
            f"login refused for {user}: password {password!r}, token {token}, key {secret}"
        )
    if mode == "cancel":
        raise Cancel(f"giving up on {user} with {password}")
    return {"user": user, "api_key": secret}


@app.task(name="h4.snooze_forever", max_attempts=1)
def snooze_forever(seconds: float) -> None:
    """Ask to run again after ``seconds`` (bad input when it is beyond 100 years)."""
    _log_run()
    raise Snooze(seconds)


@app.task(name="h4.backoff_inf", max_attempts=2, backoff=lambda attempt: float("inf"))
def backoff_inf() -> None:
    """Fails; its backoff function asks for an infinite wait."""
    _log_run()
    raise RuntimeError("failing on purpose (backoff returns inf)")


@app.task(name="h4.backoff_text", max_attempts=2, backoff=lambda attempt: "soon")
def backoff_text() -> None:
    """Fails; its backoff function returns text, not seconds."""
    _log_run()
    raise RuntimeError("failing on purpose (backoff returns text)")


@app.task(name="h4.fail_with", max_attempts=1)
def fail_with(message: str) -> None:
    """Fail with exactly this message (e.g. terminal escapes or rich markup in it)."""
    _log_run()
    raise RuntimeError(message)
