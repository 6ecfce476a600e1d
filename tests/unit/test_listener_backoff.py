"""The listener's reconnection schedule (backends/postgres/listener.py)."""

from __future__ import annotations

from conveyor.backends.postgres.listener import (
    RECONNECT_FIRST,
    RECONNECT_MAX,
    RECONNECT_STABLE,
    next_backoff,
)


def _schedule(first: float, lost_after: list[float | None]) -> list[float]:
    waits, wait = [], first
    for listened in lost_after:
        wait = next_backoff(wait, listened)
        waits.append(wait)
    return waits


def test_a_connection_that_listened_for_a_while_is_replaced_at_once() -> None:
    """Notifications are lost until the listener is back: after a working connection dies (a
    killed backend, a restarted pooler), the server is likely there, so no pause."""
    assert next_backoff(RECONNECT_MAX, RECONNECT_STABLE) == 0.0
    assert next_backoff(0.4, 3600.0) == 0.0


def test_a_connection_lost_soon_after_it_listened_is_replaced_after_a_pause() -> None:
    """A server (or pooler) that drops each connection soon after LISTEN is not hammered."""
    brief = RECONNECT_STABLE / 10
    assert _schedule(0.0, [brief, brief, brief]) == [RECONNECT_FIRST] * 3


def test_attempts_that_never_listen_back_off_doubling_up_to_the_cap() -> None:
    """The server is down: attempts that fail to connect or to listen (None) wait longer and
    longer, up to the cap."""
    waits = _schedule(0.0, [None] * 10)
    assert waits[0] == RECONNECT_FIRST
    doubled = [min(2 * earlier, RECONNECT_MAX) for earlier in waits[:-1]]
    assert waits[1:] == doubled
    assert waits[-1] == RECONNECT_MAX


def test_after_an_immediate_retry_fails_the_backoff_starts_again() -> None:
    assert _schedule(0.0, [RECONNECT_STABLE * 5, None, None]) == [
        0.0,
        RECONNECT_FIRST,
        2 * RECONNECT_FIRST,
    ]
