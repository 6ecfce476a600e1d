"""LISTEN for finished jobs: one thread and one dedicated connection per app.

The triggers send ``pg_notify('conveyor_job_state', '12,13,...')`` when jobs reach a terminal
state; this thread hands the ids to a callback. When the connection drops it reports a gap (the
waiters then look for themselves), reconnects with backoff, and reports a gap again once it
listens, since notifications sent meanwhile are lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger("conveyor.listener")

CHANNEL = "conveyor_job_state"
#: The listener connection's name in pg_stat_activity.
APPLICATION_NAME = "conveyor-listener"
#: How long ``start`` waits for the first LISTEN before returning (waiters poll meanwhile).
START_TIMEOUT = 5.0
_WAKE_EVERY = 0.1  # how often the thread checks whether it was stopped


def parse_ids(payload: str) -> list[int]:
    """The job ids of one notification; anything malformed is ignored."""
    out = []
    for part in payload.split(","):
        part = part.strip()
        if part.isdigit():
            out.append(int(part))
    return out


class FinishedListener:
    def __init__(
        self,
        url: str,
        on_finished: Callable[[Iterable[int]], None],
        on_gap: Callable[[], None],
    ) -> None:
        self.url = url
        self.on_finished = on_finished
        self.on_gap = on_gap
        self.listening = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conveyor-listen", daemon=True)

    def start(self) -> Callable[[], None]:
        self._thread.start()
        if not self.listening.wait(START_TIMEOUT):
            logger.warning("not listening for finished jobs yet; result waiters poll meanwhile")
        return self.stop

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg

        backoff = 0.1
        first = True
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.url, autocommit=True, connect_timeout=5, application_name=APPLICATION_NAME
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    if not first:
                        self.on_gap()  # notifications sent while reconnecting are lost
                    first, backoff = False, 0.1
                    self._receive(conn)
            except psycopg.Error as exc:
                logger.warning("listener connection failed (%s); reconnecting", exc)
            self.listening.clear()
            if not self._stop.is_set():
                self.on_gap()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _receive(self, conn: Any) -> None:
        while not self._stop.is_set():
            for notify in conn.notifies(timeout=_WAKE_EVERY):
                ids = parse_ids(notify.payload)
                if ids:
                    try:
                        self.on_finished(ids)
                    except Exception:  # a waiter's bug must not stop the listener
                        logger.exception("waking the waiters of jobs %s failed", ids)
