"""Schema versions shared by every backend: both are numbered 1..n and must stay in step."""

from __future__ import annotations

from .. import sqlfile
from ..errors import SchemaError
from .base import redact_url

_SQLITE = sqlfile.migrations("sqlite")
_POSTGRES = sqlfile.migrations("postgres")
if [v for v, _, _ in _SQLITE] != [v for v, _, _ in _POSTGRES]:  # pragma: no cover
    raise RuntimeError("the SQLite and PostgreSQL migrations are not numbered the same")

#: The schema version this Conveyor writes and understands.
LATEST_VERSION = len(_POSTGRES)
SQLITE_MIGRATIONS = _SQLITE
POSTGRES_MIGRATIONS = _POSTGRES


def check_version(version: int | None, url: str, allow_missing: bool = False) -> None:
    """Raise SchemaError for a database not migrated or migrated by a newer Conveyor."""
    if version is None:
        if allow_missing:
            return
        raise SchemaError(
            f"database {redact_url(url)} has no Conveyor schema: run "
            f"`conveyor migrate --database {redact_url(url)}` first"
        )
    if version > LATEST_VERSION:
        raise SchemaError(
            f"database {redact_url(url)} has Conveyor schema version {version}, newer than this "
            f"Conveyor understands ({LATEST_VERSION}): upgrade conveyor"
        )
