"""Job options: what a task declares and what one enqueue may override, validated up front.

Each bad value raises ConfigurationError naming the option and the value; nothing is written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

from .errors import ConfigurationError
from .states import Backoff, BackoffPolicy

QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,99}")
TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:<>\-]{0,199}")
KEY_MAX = 500
PRIORITY_RANGE = (-1_000_000, 1_000_000)
DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 5


def check_queue_name(name: object) -> str:
    if not isinstance(name, str) or not QUEUE_NAME.fullmatch(name):
        raise ConfigurationError(
            f"invalid queue name {name!r}: use 1-100 letters, digits, '_', '.', ':' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_name(kind: str, name: object) -> str:
    """A task, pipeline or step name: ``kind`` names which in the error."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ConfigurationError(
            f"invalid {kind} name {name!r}: use 1-200 letters, digits, '_', '.', ':', '<', '>' "
            "or '-', starting with a letter or '_'"
        )
    return name


def check_task_name(name: object) -> str:
    return check_name("task", name)


def _number(name: str, value: object, minimum: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"option {name}={value!r} must be a finite number")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise ConfigurationError(f"option {name}={value!r} must be {op} {minimum:g}")
    return float(value)


def _integer(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"option {name}={value!r} must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigurationError(f"option {name}={value!r} must be {bound}")
    return value


def _key(name: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > KEY_MAX:
        raise ConfigurationError(
            f"option {name}={value!r} must be a non-empty string of at most {KEY_MAX} characters"
        )
    return value


def _dependencies(value: object) -> tuple[int, ...]:
    """Job ids from a list of Jobs or ids, in order, without repeats."""
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple | set | frozenset):
        raise ConfigurationError(f"option depends_on={value!r} must be a list of jobs or job ids")
    ids: list[int] = []
    for item in value:
        job_id = getattr(item, "id", item) if not isinstance(item, int) else item
        if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 1:
            raise ConfigurationError(
                f"option depends_on: {item!r} is not a job or a job id (a positive integer)"
            )
        if job_id not in ids:
            ids.append(job_id)
    return tuple(ids)


@dataclass(frozen=True)
class Options:
    """Every option; None means "not set here" (a task's value, else the default, applies)."""

    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    deadline: float | None = None
    max_snoozes: int | None = None
    backoff: BackoffPolicy | None = None
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    unique_key: str | None = None
    idempotency_key: str | None = None
    delay: float | None = None
    run_at: datetime | None = None
    #: Jobs (or their ids) that must succeed before this one runs; only per enqueue.
    depends_on: tuple[int, ...] | None = None

    @classmethod
    def build(cls, where: str, **given: Any) -> Options:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                f"for {where}; known options: {', '.join(sorted(known))}"
            )
        checked = {k: _check(k, v) for k, v in given.items() if v is not None}
        return cls(**checked)

    def merged(self, override: Options) -> Options:
        """These options with every option set in ``override`` replacing ours."""
        return replace(
            self,
            **{f.name: v for f in fields(override) if (v := getattr(override, f.name)) is not None},
        )


def _check(name: str, value: Any) -> Any:
    if name == "queue":
        return check_queue_name(value)
    if name == "priority":
        return _integer(name, value, *PRIORITY_RANGE)
    if name in ("max_attempts", "concurrency_limit"):
        return _integer(name, value, 1)
    if name == "max_snoozes":
        return _integer(name, value, 0)
    if name in ("timeout", "deadline"):
        return _number(name, value, 0, strict=True)
    if name == "delay":
        return _number(name, value, 0)
    if name in ("concurrency_key", "unique_key", "idempotency_key"):
        return _key(name, value)
    if name == "run_at":
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ConfigurationError(f"option run_at={value!r} must be a timezone-aware datetime")
        return value
    if name == "depends_on":
        return _dependencies(value)
    if name == "backoff":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return Backoff(base=_number(name, value, 0))
        if not callable(value):
            raise ConfigurationError(
                f"option backoff={value!r} must be seconds, a Backoff or a callable"
            )
        return value
    raise AssertionError(name)  # pragma: no cover
