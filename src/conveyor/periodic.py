"""Periodic jobs: a task enqueued on a schedule, a cron expression or a fixed interval, once per
tick, fleet-wide.

Every worker runs the scheduler (services/scheduler.py) about once a second. For each schedule it
enqueues the ticks at or before the database's clock that are at most ``grace`` seconds old, each
as a job whose ``run_at`` is the tick and whose idempotency key is ``periodic:<name>:<tick>``, in
the transaction that moves the schedule's last tick (table ``conveyor_periodic``) forward to it:
of all the workers that try at once, exactly one enqueues each tick, and a tick once enqueued
never is again, even after its job was pruned. A tick that no worker saw within ``grace`` (none
was running) is skipped, never made up later. Ticks are moments in UTC; a cron
expression is read on the wall clock of UTC or of the schedule's time zone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ConfigurationError
from .options import MAX_DELAY, Options, check_arguments, check_name
from .serialization import dumps

#: Days ``Cron`` searches back or ahead: the Gregorian calendar's dates and weekdays repeat every
#: 400 years, so an expression that fires at all (29 February on a Sunday: every 28 to 40 years)
#: fires within that.
_SEARCH_DAYS = 400 * 366
_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
#: (name, lowest, highest, names of the values from lowest on)
_FIELDS: tuple[tuple[str, int, int, list[str]], ...] = (
    ("minute", 0, 59, []),
    ("hour", 0, 23, []),
    ("day of month", 1, 31, []),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),  # 7 is Sunday too
)
#: Minutes a clock change may shift wall times by (more than any time zone's, 2 hours, needs).
_CLOCK_CHANGE = 180
#: Most tick-to-enqueue lateness allowed by default (seconds).
DEFAULT_GRACE = 60.0
#: Most ticks of one schedule one scheduler pass makes up (the latest of those within grace).
MAX_CATCH_UP = 100


class Cron:
    """A standard five-field cron expression, ``minute hour day-of-month month day-of-week``,
    evaluated in UTC or in the time zone ``tz`` (an IANA name): ``*``, lists (``1,15``), ranges
    (``1-5``), steps (``*/15``, ``10-50/20``), month and day names (``jan``, ``mon-fri``), Sunday as
    0 or 7, and the aliases ``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly``. As in
    cron, when both the day of month and the day of week are restricted, a day matching either
    one fires. In a time zone, a wall time that a clock change skips fires as the clocks say it an
    hour later (02:30 becomes 03:30), and one that a change repeats fires once, the first time."""

    def __init__(self, expression: str, tz: str | None = None) -> None:
        if not isinstance(expression, str):
            raise ConfigurationError(f"cron expression must be a string, not {expression!r}")
        self.expression = expression
        self.tz = tz
        self._zone = _zone(expression, tz)
        parts = _ALIASES.get(expression.strip().lower(), expression).split()
        if len(parts) != 5:
            raise ConfigurationError(
                f"cron {expression!r}: expected 5 fields (minute hour day-of-month month "
                f"day-of-week) or an alias such as @daily, got {len(parts)}"
            )
        sets = [
            _parse_field(expression, part, *spec) for part, spec in zip(parts, _FIELDS, strict=True)
        ]
        self.minutes, self.hours, self.days, self.months, weekdays = sets
        self.weekdays = frozenset(d % 7 for d in weekdays)
        self._days_restricted = not parts[2].startswith("*")
        self._weekdays_restricted = not parts[4].startswith("*")
        # every (hour, minute) it fires at in a day, latest first
        self._times_desc = [(h, m) for h in sorted(self.hours, reverse=True)
                            for m in sorted(self.minutes, reverse=True)]  # fmt: skip
        if self.latest(datetime(2400, 12, 31, 12, tzinfo=UTC)) is None:
            raise ConfigurationError(f"cron {expression!r} never fires (no such day)")

    def __repr__(self) -> str:
        return (
            f"Cron({self.expression!r})"
            if self.tz is None
            else (f"Cron({self.expression!r}, tz={self.tz!r})")
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cron) and (other.expression, other.tz) == (
            self.expression,
            self.tz,
        )

    def __hash__(self) -> int:
        return hash((self.expression, self.tz))

    def fires_on(self, day: date) -> bool:
        """Whether it fires on ``day`` (a date of its time zone)."""
        if day.month not in self.months:
            return False
        by_date = day.day in self.days
        by_weekday = (day.weekday() + 1) % 7 in self.weekdays  # Python: Monday 0; cron: Sunday 0
        if self._days_restricted and self._weekdays_restricted:
            return by_date or by_weekday
        return by_date and by_weekday

    def latest(self, at: datetime) -> datetime | None:
        """The last time it fires at or before ``at``, in UTC (whole minutes); None if it did not
        in the 400 years before."""
        at = at.astimezone(UTC)
        local = at.astimezone(self._zone)
        day = local.date()
        for _ in range(_SEARCH_DAYS):
            if self.fires_on(day):
                fire = self._nearest(day, at, local, self._times_desc, before=True)
                if fire is not None:
                    return fire
            if day == date.min:
                return None
            day -= timedelta(days=1)
        return None

    def next_after(self, at: datetime) -> datetime | None:
        """The first time it fires after ``at``, in UTC (whole minutes); None if not within 400
        years."""
        at = at.astimezone(UTC)
        local = at.astimezone(self._zone)
        day = local.date()
        ascending = self._times_desc[::-1]
        for _ in range(_SEARCH_DAYS):
            if self.fires_on(day):
                fire = self._nearest(day, at, local, ascending, before=False)
                if fire is not None:
                    return fire
            if day == date.max:
                return None
            day += timedelta(days=1)
        return None

    def _nearest(
        self,
        day: date,
        at: datetime,
        local: datetime,
        times: list[tuple[int, int]],
        before: bool,
    ) -> datetime | None:
        """Of ``day``'s fire times, the latest at or before ``at`` (``before``), else the first
        after it. ``times`` run away from ``at`` (latest first when looking back). Wall times map
        to moments in order, but for the hour around a clock change: so the search goes on for
        ``_CLOCK_CHANGE`` past the first match, and ignores wall times that far beyond ``at``'s."""
        best: datetime | None = None
        stop: int | None = None
        mark = local.hour * 60 + local.minute if day == local.date() else None
        sign = 1 if before else -1
        for h, m in times:
            wall = h * 60 + m
            if mark is not None and sign * (wall - mark) > _CLOCK_CHANGE:
                continue
            if stop is not None and sign * (stop - wall) > 0:
                break
            fire = self._utc(day, h, m)
            if (fire <= at) if before else (fire > at):
                if best is None or ((fire > best) if before else (fire < best)):
                    best = fire
                if stop is None:
                    stop = wall - sign * _CLOCK_CHANGE
        return best

    def _utc(self, day: date, hour: int, minute: int) -> datetime:
        """The moment a wall time of its zone names: a skipped one as the clocks say it an hour
        later, a repeated one at its first occurrence (``fold=0`` does both)."""
        wall = datetime(day.year, day.month, day.day, hour, minute, tzinfo=self._zone)
        return wall.astimezone(UTC)


def _zone(expression: str, tz: str | None) -> tzinfo:
    if tz is None:
        return UTC
    try:
        if not isinstance(tz, str):
            raise TypeError
        return ZoneInfo(tz)
    except (TypeError, ValueError, ZoneInfoNotFoundError):
        raise ConfigurationError(
            f"cron {expression!r}: unknown time zone {tz!r} (use an IANA name such as "
            "'Europe/Berlin')"
        ) from None


def _parse_field(
    expression: str, text: str, name: str, low: int, high: int, names: list[str]
) -> set[int]:
    def fail(why: str) -> ConfigurationError:
        return ConfigurationError(f"cron {expression!r}: bad {name} {text!r}: {why}")

    def value(token: str) -> int:
        token = token.lower()
        if token in names:
            return low + names.index(token)
        if not (token.isascii() and token.isdigit()):
            raise fail(f"{token!r} is not a number{' or a name' if names else ''}")
        number = int(token)
        if not low <= number <= high:
            raise fail(f"{number} is outside {low}-{high}")
        return number

    out: set[int] = set()
    for item in text.split(","):
        span, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not (step_text.isascii() and step_text.isdigit()) or int(step_text) < 1:
                raise fail(f"step {step_text!r} must be a whole number of at least 1")
            step = int(step_text)
        if span == "*":
            first, last = low, high
        elif "-" in span:
            a, _, b = span.partition("-")
            first, last = value(a), value(b)
            if first > last:
                raise fail(f"range {span!r} runs backwards")
        else:
            first = value(span)
            last = high if step_text else first  # "5/15": from 5 on, every 15
        out.update(range(first, last + 1, step))
    return out


@dataclass(frozen=True)
class Every:
    """A fixed interval, in seconds: ticks at whole multiples of it since the Unix epoch (every
    worker computes the same ticks)."""

    seconds: float

    def latest(self, at: datetime) -> datetime:
        ticks = math.floor(at.timestamp() / self.seconds)
        return datetime.fromtimestamp(ticks * self.seconds, UTC)

    def next_after(self, at: datetime) -> datetime:
        ticks = math.floor(at.timestamp() / self.seconds) + 1
        return datetime.fromtimestamp(ticks * self.seconds, UTC)


Schedule = Cron | Every


@dataclass(frozen=True)
class Periodic:
    """A task enqueued on a schedule (``app.periodic(...)``)."""

    name: str
    task: str
    schedule: Schedule
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: Options
    #: How late (seconds) a tick may still be enqueued.
    grace: float

    def due_ticks(self, now: datetime, after: datetime | None = None) -> list[datetime]:
        """The ticks to enqueue at ``now``, oldest first: those at or before it and at most
        ``grace`` old (so a scheduler that was late, or down for less than ``grace``, makes up
        what it missed), later than ``after`` if given, the latest :data:`MAX_CATCH_UP` at
        most."""
        ticks: list[datetime] = []
        tick = self.schedule.latest(now)
        while (
            tick is not None
            and len(ticks) < MAX_CATCH_UP
            and (now - tick).total_seconds() <= self.grace
            and (after is None or tick > after)
        ):
            ticks.append(tick)
            tick = self.schedule.latest(tick - timedelta(microseconds=1))
        return ticks[::-1]

    def key(self, tick: datetime) -> str:
        """The idempotency key of ``tick``'s job."""
        return f"periodic:{self.name}:{tick.astimezone(UTC).isoformat()}"

    def options_for(self, tick: datetime) -> Options:
        return self.options.merged(Options(run_at=tick, idempotency_key=self.key(tick)))


#: Options a schedule sets itself on each of its jobs (or that make no sense for one).
_RESERVED = ("run_at", "delay", "idempotency_key", "unique_key", "depends_on")


def make_periodic(
    task: str,
    task_options: Options,
    *,
    cron: str | None,
    every: float | timedelta | None,
    tz: str | None,
    name: str | None,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None,
    grace: float | timedelta,
    options: dict[str, Any],
    limit: int,
) -> Periodic:
    """Check and build a schedule (see ``Conveyor.periodic``); ``limit``: the payload limit."""
    where = f"periodic {name or task}"
    check_name("periodic", name or task)
    if (cron is None) == (every is None):
        raise ConfigurationError(f"{where}: give exactly one of cron= or every=")
    reserved = sorted(set(options) & set(_RESERVED))
    reserved += [k for k in ("unique_key", "idempotency_key") if getattr(task_options, k)]
    if reserved:
        raise ConfigurationError(
            f"{where}: {', '.join(sorted(set(reserved)))} cannot be set (here or on the task): "
            "each tick's job gets its run_at (the tick) and idempotency key from the schedule"
        )
    if tz is not None and cron is None:
        raise ConfigurationError(f"{where}: tz= applies to cron= only (every= counts seconds)")
    schedule: Schedule = (
        Cron(cron, tz) if cron is not None else Every(_seconds(where, "every", every))
    )
    call_args, call_kwargs = check_arguments(args, kwargs, where)
    dumps(list(call_args), "args", limit)  # JSON, and within the limit, now rather than per tick
    dumps(call_kwargs, "kwargs", limit)
    return Periodic(
        name=name or task,
        task=task,
        schedule=schedule,
        args=tuple(call_args),
        kwargs=call_kwargs,
        options=task_options.merged(Options.build(where, **options)),
        grace=_seconds(where, "grace", grace),
    )


def _seconds(where: str, what: str, value: float | timedelta | None) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or not 1 <= seconds <= MAX_DELAY
    ):
        raise ConfigurationError(
            f"{where}: {what}={value!r} must be at least 1 second and at most 100 years"
        )
    return float(seconds)


__all__ = ["DEFAULT_GRACE", "Cron", "Every", "Periodic", "Schedule", "make_periodic"]
