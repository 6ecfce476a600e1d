"""LISTEN/NOTIFY subscriptions: one thread and one dedicated connection per subscription.

The triggers send ``pg_notify('conveyor_job_state_<schema>', '12,13,...')`` when jobs reach a
terminal state (for result waiters) and ``pg_notify('conveyor_job_due_<schema>', queue)`` when
jobs become due now (for idle workers); ``<schema>`` is the oid of the schema that holds the
jobs table (SQL ``conveyor_channel``), so that Conveyors in two schemas of one database do not
hear each other; a listener asks for its channel's name when it connects. A listener hands each
payload to a callback. When its connection drops it reports a gap (subscribers then look for
themselves), reconnects with backoff, and reports a gap again once it listens, since
notifications sent meanwhile are lost: notifications cost latency when lost, never correctness,
because every subscriber also polls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger("conveyor.listener")

CHANNEL = "conveyor_job_state"
#: Notified with a queue name when jobs in it become due now (inserted, retried, released).
DUE_CHANNEL = "conveyor_job_due"
#: The listener connections' names in pg_stat_activity: result and flow waiters', and workers'
#: (a worker's listener also claims for it: see backends.base.IdleClaim).
APPLICATION_NAME = "conveyor-listener"
DUE_APPLICATION_NAME = "conveyor-due-listener"
#: How long ``start`` waits for the first LISTEN before returning (waiters poll meanwhile).
START_TIMEOUT = 5.0
_WAKE_EVERY = 0.1  # how often the thread checks whether it was stopped
#: Reconnecting: a connection that listened for RECONNECT_STABLE seconds or more is replaced at
#: once when lost (a killed backend, a restarted pooler: the server is likely there, and
#: notifications are lost until then); one lost sooner, after RECONNECT_FIRST (a server that
#: drops each connection soon after it listens is not hammered); attempts that fail to listen
#: wait from RECONNECT_FIRST, doubling, up to RECONNECT_MAX (the server is down).
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 5.0
RECONNECT_STABLE = 1.0


def next_backoff(previous: float, listened: float | None) -> float:
    """The wait before the next attempt to connect, after waiting ``previous`` before this one
    and listening for ``listened`` seconds on the connection just lost (None: it never got to
    listen)."""
    if listened is None:
        return min(max(previous * 2, RECONNECT_FIRST), RECONNECT_MAX)
    return 0.0 if listened >= RECONNECT_STABLE else RECONNECT_FIRST


def schema_channel(conn: Any, name: str) -> str:
    """The channel ``name`` of the Conveyor schema that ``conn`` sees (its search path): e.g.
    ``conveyor_job_due_2200`` (SQL ``conveyor_channel``: the name and the schema's oid)."""
    from psycopg.rows import tuple_row

    with conn.cursor(row_factory=tuple_row) as cur:  # whatever rows the connection makes
        cur.execute("SELECT conveyor_channel(%s, 'conveyor_jobs'::regclass)", (name,))
        (channel,) = cur.fetchone()
    return str(channel)


def listen(conn: Any, channel: str) -> None:
    """LISTEN on ``channel`` (quoted as an identifier)."""
    from psycopg import sql

    statement = sql.SQL("LISTEN {}").format(sql.Identifier(channel))
    conn.execute(statement)


def parse_ids(payload: str) -> list[int]:
    """The job ids of one notification; anything malformed is ignored."""
    out = []
    for part in payload.split(","):
        part = part.strip()
        if part.isdigit():
            out.append(int(part))
    return out


#: TCP settings every Conveyor connection gets unless its URL sets them: a silent network
#: partition is noticed in about 10 s (keepalives on idle connections, tcp_user_timeout on
#: unacknowledged writes) instead of the kernel's ~15 minutes, so the pool and the listener
#: reconnect soon after the link returns.
NETWORK_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}


def network_options(url: str) -> dict[str, Any]:
    """The :data:`NETWORK_DEFAULTS` that ``url`` does not set itself."""
    import psycopg

    given = psycopg.conninfo.conninfo_to_dict(url)
    return {k: v for k, v in NETWORK_DEFAULTS.items() if k not in given}


class Listener:
    """LISTEN on one channel in a thread with its own connection; ``on_notify(payload, conn)`` for
    each notification, ``on_gap()`` whenever notifications may have been missed. ``on_notify`` is
    called between waits, so it may run statements on ``conn`` (which ``configure`` prepared and
    ``warm_up`` readied, each before LISTEN, which stays the connection's last query to be seen
    in pg_stat_activity until a notification comes)."""

    def __init__(
        self,
        url: str,
        channel: str,
        on_notify: Callable[[str, Any], None],
        on_gap: Callable[[], None],
        configure: Callable[[Any], None] | None = None,
        application_name: str = APPLICATION_NAME,
        warm_up: Callable[[Any], None] | None = None,
    ) -> None:
        self.url = url
        self.channel = channel
        self.on_notify = on_notify
        self.on_gap = on_gap
        self.configure = configure
        self.warm_up = warm_up
        self.application_name = application_name
        self.listening = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conveyor-listen", daemon=True)

    def start(self) -> Callable[[], None]:
        self._thread.start()
        if not self.listening.wait(START_TIMEOUT):
            logger.warning("not listening on %s yet; polling meanwhile", self.channel)
        return self.stop

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg

        backoff = 0.0
        first = True
        while not self._stop.is_set():
            since: float | None = None  # when this connection started listening
            try:
                with psycopg.connect(
                    self.url,
                    autocommit=True,
                    application_name=self.application_name,
                    **network_options(self.url),
                ) as conn:
                    if self.configure is not None:
                        self.configure(conn)
                    if self.warm_up is not None:
                        self.warm_up(conn)
                    listen(conn, schema_channel(conn, self.channel))
                    self.listening.set()
                    since = time.monotonic()
                    if not first:
                        self.on_gap()  # notifications sent while reconnecting are lost
                    first = False
                    self._receive(conn)
            except psycopg.Error as exc:
                logger.warning("listener connection failed (%s); reconnecting", exc)
            self.listening.clear()
            if not self._stop.is_set():
                self.on_gap()
                listened = None if since is None else time.monotonic() - since
                backoff = next_backoff(backoff, listened)
                self._stop.wait(backoff)

    def _receive(self, conn: Any) -> None:
        import psycopg

        while not self._stop.is_set():
            # Out of notifies() before handling (it holds the connection), so that a handler may
            # use the connection; what arrives meanwhile waits for the next notifies().
            payloads = [n.payload for n in conn.notifies(timeout=_WAKE_EVERY, stop_after=1)]
            for payload in payloads:
                try:
                    self.on_notify(payload, conn)
                except psycopg.OperationalError:
                    raise  # the connection failed: reconnect (in _run)
                except Exception:  # a subscriber's bug must not stop the listener
                    logger.exception("handling %s notification %r failed", self.channel, payload)


def finished_listener(
    url: str, on_finished: Callable[[Iterable[int]], None], on_gap: Callable[[], None]
) -> Listener:
    """Job ids reaching a terminal state (``conveyor_job_state``), for result waiters."""

    def on_notify(payload: str, conn: Any) -> None:
        ids = parse_ids(payload)
        if ids:
            on_finished(ids)

    return Listener(url, CHANNEL, on_notify, on_gap)


def due_listener(
    url: str,
    queues: Iterable[str],
    on_due: Callable[[], None],
    on_gap: Callable[[], None],
    claim_on: Callable[[Any], bool] | None = None,
    configure: Callable[[Any], None] | None = None,
    warm_up: Callable[[Any], None] | None = None,
) -> Listener:
    """Queues that just got due jobs (the schema's ``conveyor_job_due`` channel, payload: the
    queue name), for idle workers: when one of ``queues`` is named, ``claim_on(conn)`` may claim
    for the worker on the listener's connection (True when it did), else the worker is woken
    with ``on_due()``; ``warm_up(conn)`` readies the connection for those claims each time it
    connects."""
    wanted = frozenset(queues)

    def on_notify(payload: str, conn: Any) -> None:
        if payload in wanted and not (claim_on is not None and claim_on(conn)):
            on_due()

    return Listener(url, DUE_CHANNEL, on_notify, on_gap, configure, DUE_APPLICATION_NAME, warm_up)
