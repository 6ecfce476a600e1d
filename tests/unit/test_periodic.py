"""Schedules of periodic jobs: cron expressions parsed and evaluated as cron does, intervals, and
the checks made when a schedule is registered."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from conveyor import ConfigurationError, Conveyor
from conveyor.periodic import Cron, Every


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("expression", "now", "latest"),
    [
        ("*/15 * * * *", at(2026, 11, 29, 10, 7, 30), at(2026, 11, 29, 10, 0)),
        ("*/15 * * * *", at(2026, 11, 29, 10, 15), at(2026, 11, 29, 10, 15)),
        ("* * * * *", at(2026, 11, 29, 10, 7, 59, 999999), at(2026, 11, 29, 10, 7)),
        # weekdays at 9:00; 2026-11-29 is a Sunday: the Friday before
        ("0 9 * * 1-5", at(2026, 11, 29, 12), at(2026, 11, 27, 9)),
        ("0 9 * * mon-fri", at(2026, 11, 30, 8, 59), at(2026, 11, 27, 9)),
        ("0 9 * * MON-FRI", at(2026, 11, 30, 9), at(2026, 11, 30, 9)),
        ("30 2 1 * *", at(2026, 3, 1, 2, 29), at(2026, 2, 1, 2, 30)),
        ("0 0 29 2 *", at(2027, 3, 1), at(2024, 2, 29)),
        ("0 12 * jan,jul *", at(2026, 6, 30, 23, 59), at(2026, 1, 31, 12)),
        # both days restricted: the 13th or a Friday (2026-11-13 is a Friday, 11-20 too)
        ("0 0 13 * 5", at(2026, 11, 19), at(2026, 11, 13)),
        ("0 0 13 * 5", at(2026, 11, 21), at(2026, 11, 20)),
        ("0 0 15 * 1", at(2026, 11, 17), at(2026, 11, 16)),  # Monday the 16th, not the 15th
        # one of them "*": the other alone decides
        ("0 0 13 * *", at(2026, 11, 21), at(2026, 11, 13)),
        ("0 0 */2 * 5", at(2026, 11, 21), at(2026, 11, 13)),  # */2 counts as "*": both apply
        ("0 0 * * 7", at(2026, 11, 30), at(2026, 11, 29)),  # 7 is Sunday
        ("0 0 * * sun", at(2026, 11, 30), at(2026, 11, 29)),
        ("5/20 * * * *", at(2026, 11, 29, 10, 44), at(2026, 11, 29, 10, 25)),
        ("10-50/20 3 * * *", at(2026, 11, 29, 3, 49), at(2026, 11, 29, 3, 30)),
        ("0,30 * * * *", at(2026, 11, 29, 0, 0, 1), at(2026, 11, 29, 0, 0)),
        ("@daily", at(2026, 11, 29, 23, 59), at(2026, 11, 29)),
        ("@hourly", at(2026, 11, 29, 23, 59), at(2026, 11, 29, 23)),
        ("@weekly", at(2026, 11, 28), at(2026, 11, 22)),
        ("@monthly", at(2026, 11, 1), at(2026, 11, 1)),
        ("@yearly", at(2026, 11, 29), at(2026, 1, 1)),
    ],
)
def test_cron_latest_fire_time(expression: str, now: datetime, latest: datetime) -> None:
    assert Cron(expression).latest(now) == latest


def test_cron_rare_days_are_found_across_decades() -> None:
    """29 February on a Sunday ("*/7" does not restrict, so both fields must match): 28 years
    apart here."""
    cron = Cron("0 0 29 2 */7")
    assert cron.latest(at(2026, 11, 29)) == at(2004, 2, 29)
    assert cron.next_after(at(2026, 11, 29)) == at(2032, 2, 29)


def test_cron_next_fire_time() -> None:
    assert Cron("0 9 * * 1-5").next_after(at(2026, 11, 27, 9)) == at(2026, 11, 30, 9)
    assert Cron("*/15 * * * *").next_after(at(2026, 11, 29, 23, 59, 30)) == at(2026, 11, 30)
    assert Cron("0 0 29 2 *").next_after(at(2026, 11, 29)) == at(2028, 2, 29)
    assert Cron("@yearly").next_after(at(2026, 12, 31, 23, 59, 59)) == at(2027, 1, 1)


BERLIN = "Europe/Berlin"  # CET (+1), CEST (+2) from 2026-03-29 02:00 to 2026-10-25 03:00


@pytest.mark.parametrize(
    ("expression", "now", "latest"),
    [
        # 09:00 Berlin time on weekdays: 08:00 UTC in winter, 07:00 in summer
        ("0 9 * * mon-fri", at(2026, 11, 30, 8, 30), at(2026, 11, 30, 8)),
        ("0 9 * * mon-fri", at(2026, 11, 30, 7, 59), at(2026, 11, 27, 8)),
        ("0 9 * * mon-fri", at(2026, 6, 1, 7, 30), at(2026, 6, 1, 7)),
        # the local day decides the date: 00:30 Berlin on the 1st is 23:30 UTC on the 31st
        ("30 0 1 * *", at(2026, 1, 1), at(2025, 12, 31, 23, 30)),
        # 02:30 does not exist on 2026-03-29: it fires at 03:30 CEST (01:30 UTC)
        ("30 2 * * *", at(2026, 3, 29, 1, 40), at(2026, 3, 29, 1, 30)),
        ("30 2 * * *", at(2026, 3, 29, 1, 20), at(2026, 3, 28, 1, 30)),
        # 02:30 comes twice on 2026-10-25: only the first (00:30 UTC) fires
        ("30 2 * * *", at(2026, 10, 25, 1, 45), at(2026, 10, 25, 0, 30)),
        # ... and so do 02:00 and 02:30 of a half-hourly one: the repeated hour fires once
        ("*/30 * * * *", at(2026, 10, 25, 1, 15), at(2026, 10, 25, 0, 30)),
        ("*/30 * * * *", at(2026, 10, 25, 2, 0), at(2026, 10, 25, 2, 0)),  # 03:00 CET
        # 02:00 and 02:30 do not exist on 2026-03-29: they fire with 03:00 and 03:30 CEST
        ("0,30 2,3 * * *", at(2026, 3, 29, 1, 35), at(2026, 3, 29, 1, 30)),
        ("0,30 2,3 * * *", at(2026, 3, 29, 1, 29), at(2026, 3, 29, 1, 0)),
    ],
)
def test_cron_in_a_time_zone(expression: str, now: datetime, latest: datetime) -> None:
    assert Cron(expression, BERLIN).latest(now) == latest


def test_cron_in_a_time_zone_fires_once_per_wall_time_across_clock_changes() -> None:
    cron = Cron("30 2 * * *", BERLIN)
    assert cron.next_after(at(2026, 10, 25, 0, 30)) == at(2026, 10, 26, 1, 30)  # not 01:30 UTC
    assert cron.next_after(at(2026, 3, 28, 1, 30)) == at(2026, 3, 29, 1, 30)  # 03:30 CEST
    ticks, t = [], at(2026, 3, 27)
    while t < at(2026, 3, 31):
        ticks.append(t := cron.next_after(t))  # type: ignore[arg-type]
    assert ticks == [at(2026, 3, 27, 1, 30), at(2026, 3, 28, 1, 30), at(2026, 3, 29, 1, 30),
                     at(2026, 3, 30, 0, 30), at(2026, 3, 31, 0, 30)]  # fmt: skip
    with pytest.raises(ConfigurationError, match="unknown time zone 'Mars/Olympus'"):
        Cron("* * * * *", "Mars/Olympus")


def test_cron_in_a_time_zone_agrees_with_its_wall_times_listed_around_clock_changes() -> None:
    """Every fire time of the days around a clock change, listed from the wall times (each
    as ``fold=0`` reads it), against ``latest`` and ``next_after`` at many moments between."""
    rng = random.Random(7)
    changes = {
        "Europe/Berlin": [at(2026, 3, 29, 1), at(2026, 10, 25, 1)],
        "America/New_York": [at(2026, 3, 8, 7), at(2026, 11, 1, 6)],
        "Australia/Lord_Howe": [at(2026, 4, 4, 15), at(2026, 10, 3, 15, 30)],  # 30 min changes
    }
    expressions = ["*/30 * * * *", "15,45 1-3 * * *", "0 2 * * *", "*/20 1,2 * * *", "59 * * * *"]
    for zone_name, moments in changes.items():
        zone = __import__("zoneinfo").ZoneInfo(zone_name)
        for expression in expressions:
            cron = Cron(expression, zone_name)
            for change in moments:
                fires = sorted(
                    {
                        datetime(d.year, d.month, d.day, h, m, tzinfo=zone).astimezone(UTC)
                        for k in range(-3, 4)
                        for d in [(change + timedelta(days=k)).astimezone(zone).date()]
                        if cron.fires_on(d)
                        for h in cron.hours
                        for m in cron.minutes
                    }
                )
                for _ in range(40):
                    now = change + timedelta(minutes=rng.randrange(-1440, 1440))
                    assert cron.latest(now) == max(f for f in fires if f <= now), (cron, now)
                    assert cron.next_after(now) == min(f for f in fires if f > now), (cron, now)


def test_cron_latest_takes_any_timezone_and_answers_in_utc() -> None:
    berlin = datetime(2026, 11, 29, 10, 7, tzinfo=UTC).astimezone(
        __import__("zoneinfo").ZoneInfo("Europe/Berlin")
    )
    assert Cron("0 * * * *").latest(berlin) == at(2026, 11, 29, 10)


def _naive(cron: Cron, now: datetime, window: timedelta, forward: bool) -> datetime | None:
    """Minute by minute from ``now``, back (or forward, after it) at most ``window``: the
    definition, slowly."""
    step = timedelta(minutes=1 if forward else -1)
    t = now.replace(second=0, microsecond=0) + (step if forward else timedelta(0))
    while abs(t - now) <= window:
        if (
            t.minute in cron.minutes
            and t.hour in cron.hours
            and t.month in cron.months
            and cron.fires_on(t.date())
        ):
            return t
        t += step
    return None


def test_cron_latest_agrees_with_a_minute_by_minute_search() -> None:
    rng = random.Random(4)
    fields = [
        ["*", "*/7", "0", "5-10", "59", "0,30"],
        ["*", "*/5", "0", "9-17", "23"],
        ["*", "1", "*/10", "28-31", "15"],
        ["*", "*", "*", "1-6", "*/3", "2"],
        ["*", "1-5", "0", "6", "sat,sun"],
    ]
    window = timedelta(days=12)
    found = 0
    for _ in range(150):
        cron = Cron(" ".join(rng.choice(options) for options in fields))
        now = at(2026, 1, 1) + timedelta(minutes=rng.randrange(60 * 24 * 365))
        expected = _naive(cron, now, window, forward=False)
        latest = cron.latest(now)
        assert latest is not None
        if expected is None:
            assert now - latest > window, (cron, now)
        else:
            found += 1
            assert latest == expected, (cron, now)
        following, expected_next = cron.next_after(now), _naive(cron, now, window, forward=True)
        assert following is not None and following > now
        if expected_next is None:
            assert following - now > window, (cron, now)
        else:
            assert following == expected_next, (cron, now)
    assert found > 75  # the comparison was made, not skipped


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("61 * * * *", r"bad minute '61': 61 is outside 0-59"),
        ("* 24 * * *", r"bad hour '24'"),
        ("* * 0 * *", r"bad day of month '0'"),
        ("* * * 13 *", r"bad month '13'"),
        ("* * * * 8", r"bad day of week '8'"),
        ("* * * foo *", r"'foo' is not a number or a name"),
        ("*/0 * * * *", r"step '0' must be a whole number of at least 1"),
        ("5-1 * * * *", r"range '5-1' runs backwards"),
        ("* * * *", r"expected 5 fields .* got 4"),
        ("@often", r"expected 5 fields"),
        ("0 0 30 2 *", r"never fires"),
        ("0 0 31 4,6,9,11 *", r"never fires"),
        ("\u00b2 * * * *", r"is not a number"),  # a superscript two is no digit to cron
        ("*/\u0663 * * * *", r"step .* must be a whole number"),  # nor an Arabic-Indic three
    ],
)
def test_a_bad_cron_expression_is_refused_naming_the_field(expression: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        Cron(expression)
    assert repr(expression) in str(info.value)


def test_every_ticks_at_multiples_of_the_interval_since_the_epoch() -> None:
    assert Every(30).latest(at(2026, 11, 29, 12, 0, 45)) == at(2026, 11, 29, 12, 0, 30)
    assert Every(30).next_after(at(2026, 11, 29, 12, 0, 45)) == at(2026, 11, 29, 12, 1)
    assert Every(30).next_after(at(2026, 11, 29, 12, 1)) == at(2026, 11, 29, 12, 1, 30)
    assert Every(3600).latest(at(2026, 11, 29, 12, 59, 59)) == at(2026, 11, 29, 12)
    assert Every(86400).latest(at(2026, 11, 29, 0, 0)) == at(2026, 11, 29)


def test_registering_a_schedule_checks_everything_up_front(tmp_path: object) -> None:
    app = Conveyor(f"sqlite:///{tmp_path}/p.db")

    @app.task(name="p.tick", queue="ticks")
    def tick(label: str) -> str:
        return label

    every = app.periodic(tick, every=timedelta(minutes=5), args=["five"], priority=3)
    assert every.name == "p.tick" and every.schedule == Every(300.0)
    assert every.options.queue == "ticks" and every.options.priority == 3
    cron = app.periodic("p.tick", cron="@daily", tz=BERLIN, name="p.daily", kwargs={"label": "day"})
    assert cron.schedule == Cron("@daily", BERLIN) and cron.schedule != Cron("@daily")
    assert app.periodic_jobs == {"p.tick": every, "p.daily": cron}

    bad: list[tuple[dict[str, object], str]] = [
        ({"cron": "* * * * *", "every": 60}, "exactly one of cron= or every="),
        ({}, "exactly one of cron= or every="),
        ({"every": 0.5}, r"every=0.5 must be at least 1 second"),
        ({"every": 1e12}, r"every=1000000000000.0 must be .* at most 100 years"),
        ({"every": float("nan")}, r"every=nan must be"),
        ({"every": 60, "grace": 0}, "grace=0 must be at least 1 second"),
        ({"every": 60, "idempotency_key": "x"}, "idempotency_key cannot be set"),
        ({"every": 60, "run_at": at(2030, 1, 1)}, "run_at cannot be set"),
        ({"every": 60, "args": [object()]}, "args"),
        ({"every": 60, "priority": "high"}, "priority"),
        ({"every": 60, "name": "two words"}, "invalid periodic name"),
        ({"every": 60, "tz": BERLIN}, "tz= applies to cron= only"),
        ({"cron": "@daily", "tz": "Nowhere/Town", "name": "p.tz"}, "unknown time zone"),
        ({"every": 60}, "already registered"),  # p.tick again
    ]
    for given, message in bad:
        with pytest.raises(Exception, match=message):
            app.periodic(tick, **given)  # type: ignore[arg-type]

    @app.task(name="p.unique", unique_key="only-one")
    def unique() -> None: ...

    with pytest.raises(ConfigurationError, match=r"unique_key cannot be set \(here or on the task"):
        app.periodic(unique, every=60)
    with pytest.raises(Exception, match=r"no task named 'p\.nope'"):
        app.periodic("p.nope", every=60)
    assert set(app.periodic_jobs) == {"p.tick", "p.daily"}
    app.close()
