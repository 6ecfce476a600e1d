"""Job options: what a task declares and what one enqueue may override, validated up front.

Each bad value raises ConfigurationError naming the option and the value; nothing is written.
Every duration (delay, timeout, deadline, backoff, snooze) is at most :data:`MAX_DELAY` (100
years), and ``run_at`` lies between :data:`EARLIEST_RUN_AT` and :data:`LATEST_RUN_AT`: beyond,
the database or Python could not represent the times computed from them.
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

from .errors import ConfigurationError
from .states import Backoff, BackoffPolicy

logger = logging.getLogger("conveyor.options")

QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,99}")
TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:<>\-]{0,199}")
KEY_MAX = 500
PRIORITY_RANGE = (-1_000_000, 1_000_000)
#: Largest count (max_attempts, max_snoozes, concurrency_limit): a 32-bit integer column.
INT_MAX = 2**31 - 1
#: Largest job id (a 64-bit integer column).
ID_MAX = 2**63 - 1
DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 5
#: Longest delay, timeout, deadline, backoff or snooze, in seconds (100 years).
MAX_DELAY = 100 * 365.25 * 86400
#: The range of ``run_at`` (a day inside what Python's datetime and both databases hold).
EARLIEST_RUN_AT = datetime(1, 1, 2, tzinfo=UTC)
LATEST_RUN_AT = datetime(9999, 1, 1, tzinfo=UTC)


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


def check_arguments(
    args: object, kwargs: object, where: str | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A job's positional and keyword arguments as given (a list or tuple, a dict or None), as a
    tuple and a dict; ConfigurationError (prefixed with ``where``) for other shapes."""
    prefix = "" if where is None else f"{where}: "
    if isinstance(args, str | bytes) or not isinstance(args, list | tuple):
        raise ConfigurationError(f"{prefix}args must be a list, not {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ConfigurationError(f"{prefix}kwargs must be a dict, not {type(kwargs).__name__}")
    return tuple(args), dict(kwargs or {})


def _number(name: str, value: object, minimum: float, strict: bool = False) -> float:
    """A number of seconds, at least ``minimum`` and at most MAX_DELAY."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"option {name}={value!r} must be a finite number")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise ConfigurationError(f"option {name}={value!r} must be {op} {minimum:g}")
    if value > MAX_DELAY:
        raise ConfigurationError(
            f"option {name}={value!r} must be at most {MAX_DELAY:.0f} seconds (100 years)"
        )
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
        if isinstance(job_id, bool) or not isinstance(job_id, int) or not 1 <= job_id <= ID_MAX:
            raise ConfigurationError(
                f"option depends_on: {item!r} is not a job or a job id (a positive integer)"
            )
        if job_id not in ids:
            ids.append(job_id)
    return tuple(ids)


class Settled(NamedTuple):
    """The options that have a default, settled: as set, else Conveyor's default."""

    queue: str
    priority: int
    max_attempts: int
    concurrency_limit: int
    delay: float


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

    def settled(self) -> Settled:
        """The queue, priority, attempts, concurrency limit and delay these options give a job:
        as set here, else Conveyor's defaults (the one place they are applied)."""
        return Settled(
            self.queue or DEFAULT_QUEUE,
            self.priority or 0,
            self.max_attempts or DEFAULT_MAX_ATTEMPTS,
            self.concurrency_limit or 1,
            self.delay or 0.0,
        )

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
        return _integer(name, value, 1, INT_MAX)
    if name == "max_snoozes":
        return _integer(name, value, 0, INT_MAX)
    if name in ("timeout", "deadline"):
        return _number(name, value, 0, strict=True)
    if name == "delay":
        return _number(name, value, 0)
    if name in ("concurrency_key", "unique_key", "idempotency_key"):
        return _key(name, value)
    if name == "run_at":
        if not isinstance(value, datetime) or value.utcoffset() is None:
            raise ConfigurationError(f"option run_at={value!r} must be a timezone-aware datetime")
        if not EARLIEST_RUN_AT <= value < LATEST_RUN_AT:
            raise ConfigurationError(
                f"option run_at={value!r} must be between {EARLIEST_RUN_AT.date()} and "
                f"{LATEST_RUN_AT.date()} (UTC)"
            )
        return value
    if name == "depends_on":
        return _dependencies(value)
    if name == "backoff":
        return check_backoff(value)
    raise AssertionError(name)  # pragma: no cover


def check_backoff(value: object) -> BackoffPolicy:
    """Seconds (a Backoff from that base), a Backoff whose delays stay within MAX_DELAY, or a
    callable, wrapped so that whatever it returns or raises, a failed job still gets a delay."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Backoff(base=_number("backoff", value, 0))
    if isinstance(value, Backoff):
        numbers = (value.base, value.factor, value.cap, value.jitter)
        try:
            finite = all(math.isfinite(n) for n in numbers)
            longest = value(10**6, random.Random(0)) if finite else math.inf
        except (OverflowError, TypeError, ValueError):
            finite = False
        if not finite or value.cap * (1 + value.jitter) > MAX_DELAY or longest > MAX_DELAY:
            raise ConfigurationError(
                f"option backoff={value!r} must use finite numbers and wait at most "
                f"{MAX_DELAY:.0f} seconds (100 years): lower cap or jitter"
            )
        return value
    if isinstance(value, SafeBackoff):
        return value
    if not callable(value):
        raise ConfigurationError(
            f"option backoff={value!r} must be seconds, a Backoff or a callable"
        )
    return SafeBackoff(value)


class SafeBackoff:
    """A backoff callable of the user's, made total: its delay is clamped to [0, MAX_DELAY]; when
    it raises or returns something else than a number, the default Backoff applies (logged)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __repr__(self) -> str:
        return f"SafeBackoff({self.fn!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SafeBackoff) and other.fn == self.fn

    def __hash__(self) -> int:
        return hash(self.fn)

    def __call__(self, attempt: int) -> float:
        try:
            delay = self.fn(attempt)
            number = not isinstance(delay, bool) and isinstance(delay, int | float)
            if number and not math.isnan(delay):
                return min(max(float(delay), 0.0), MAX_DELAY)
            problem = f"returned {delay!r}, not a number of seconds"
        except Exception as exc:
            problem = f"raised {type(exc).__name__}: {exc}"
        logger.warning(
            "backoff %r %s for attempt %s; using the default backoff", self.fn, problem, attempt
        )
        return Backoff()(attempt)
