"""A tiny loader for named queries kept in ``.sql`` files.

A file holds blocks that start with a ``-- name: <identifier>`` line; the block's text, up to the
next name line, is the query. Lines starting with ``--`` before the first name are the file's header.
"""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    queries: dict[str, str] = {}
    matches = list(_NAME.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        name = match.group(1)
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        body = text[match.end() : end].strip()
        if not body:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = body
    return queries


def load(package: str, filename: str = "queries.sql") -> dict[str, str]:
    return parse(resources.files(package).joinpath(filename).read_text())


def migrations(backend: str) -> list[tuple[int, str, str]]:
    """(version, name, sql) for every ``NNNN_name.sql`` in ``conveyor/backends/<backend>/migrations``
    (read as package data, without importing the backend)."""
    found = []
    folder = resources.files("conveyor.backends").joinpath(backend, "migrations")
    for entry in folder.iterdir():
        m = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", entry.name)
        if m:
            found.append((int(m.group(1)), m.group(2), entry.read_text()))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"migrations of {backend} are not numbered 1..n: {versions}")
    return found
