"""Shared by the maintenance services: repeat a bounded statement until it comes back short."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until_short_batch(step: Callable[[], list[T]], size: int) -> list[T]:
    """Call ``step`` (which handles at most ``size`` rows) until a call returns fewer than
    ``size``; every row handled, in order."""
    done: list[T] = []
    while True:
        batch = step()
        done.extend(batch)
        if len(batch) < size:
            return done
