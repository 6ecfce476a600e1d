"""PostgreSQL connections notice a silent network partition in seconds, not minutes: every
connection gets TCP keepalives and a user timeout unless its URL sets them (the multi-host fault
scenario measures what this buys: tests/faults/test_hosts.py)."""

from __future__ import annotations

from conveyor.backends.postgres import PostgresBackend
from conveyor.backends.postgres.listener import NETWORK_DEFAULTS, network_options


def test_network_defaults_fill_only_what_the_url_leaves_unset() -> None:
    url = "postgresql://u@h/db?keepalives_idle=30&connect_timeout=2"
    options = network_options(url)
    assert "keepalives_idle" not in options and "connect_timeout" not in options
    assert options["tcp_user_timeout"] == NETWORK_DEFAULTS["tcp_user_timeout"]
    assert options["keepalives"] == 1


def test_pooled_connections_carry_the_keepalive_settings(pg_schema_url: str) -> None:
    backend = PostgresBackend(pg_schema_url)
    try:
        with backend._conn() as conn:
            params = conn.info.get_parameters()
        assert params["keepalives_idle"] == "5"
        assert params["tcp_user_timeout"] == "10000"
    finally:
        backend.close()
