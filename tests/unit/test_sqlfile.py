"""The named-query loader and the migration lists."""

from __future__ import annotations

import pytest

from conveyor import sqlfile
from conveyor.backends.migrate import LATEST_VERSION, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS


def test_parse_splits_named_blocks() -> None:
    text = "-- header\n-- name: one\nSELECT 1\n\n-- name: two\nSELECT 2;\n"
    assert sqlfile.parse(text) == {"one": "SELECT 1", "two": "SELECT 2;"}


def test_duplicate_and_empty_names_are_errors() -> None:
    with pytest.raises(ValueError, match="twice"):
        sqlfile.parse("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n")
    with pytest.raises(ValueError, match="empty"):
        sqlfile.parse("-- name: a\n\n-- name: b\nSELECT 2\n")


def test_both_backends_have_the_same_migration_numbering() -> None:
    assert [v for v, _, _ in SQLITE_MIGRATIONS] == [v for v, _, _ in POSTGRES_MIGRATIONS]
    assert LATEST_VERSION == len(SQLITE_MIGRATIONS) >= 1


def test_both_backends_define_the_same_queries_where_shared() -> None:
    pg = sqlfile.load("conveyor.backends.postgres")
    lite = sqlfile.load("conveyor.backends.sqlite")
    shared = {
        "claim",
        "finish",
        "heartbeat",
        "rescue_stuck",
        "hand_back",
        "retry_job",
        "cancel_pending",
    }
    assert shared <= set(pg) and shared <= set(lite)
