"""Validation of arguments, options and names, before anything reaches a database."""

from __future__ import annotations

import math
from datetime import datetime

import pytest

from conveyor.errors import ConfigurationError, InvalidArgumentsError
from conveyor.options import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_QUEUE,
    Options,
    Settled,
    check_queue_name,
    check_task_name,
)
from conveyor.serialization import dumps


def test_json_arguments_encode_compactly() -> None:
    assert dumps([1, "é", {"a": None}], "args") == '[1,"é",{"a":null}]'


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"when": datetime(2026, 1, 1)}, "kwargs['when']"),
        ({"tags": {1, 2}}, "kwargs['tags']"),
        ({"nested": [1, {"x": object()}]}, "kwargs['nested'][1]['x']"),
        ({"ratio": math.nan}, "kwargs['ratio']"),
        ({"m": {3: "int key"}}, "kwargs['m']"),
    ],
)
def test_non_json_values_are_named_by_path(value: object, path: str) -> None:
    with pytest.raises(InvalidArgumentsError) as err:
        dumps(value, "kwargs")
    assert path in str(err.value)


def test_payload_over_the_limit_is_refused_with_its_size() -> None:
    with pytest.raises(InvalidArgumentsError, match="over the limit of 100"):
        dumps(["x" * 200], "args", max_bytes=100)


@pytest.mark.parametrize(
    "name", ["'; drop table conveyor_jobs; --", "%s", 'a"b', "", "x" * 101, "sp ace", None]
)
def test_hostile_queue_names_are_refused_by_value(name: object) -> None:
    with pytest.raises(ConfigurationError) as err:
        check_queue_name(name)
    assert repr(name)[:40] in str(err.value)


@pytest.mark.parametrize("name", ["'; drop table x", "%s", "1abc", "x" * 201])
def test_hostile_task_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError):
        check_task_name(name)


def test_good_names_pass() -> None:
    assert check_queue_name("emails.high-priority:v2") == "emails.high-priority:v2"
    assert check_task_name("app.tasks.outer.<locals>.inner") == "app.tasks.outer.<locals>.inner"


def test_unknown_options_are_named() -> None:
    with pytest.raises(ConfigurationError, match="'retries'"):
        Options.build("task t", retries=3)


@pytest.mark.parametrize(
    ("option", "value"),
    [("delay", -1), ("max_attempts", 0), ("timeout", 0), ("priority", "high"), ("delay", math.inf),
     ("unique_key", ""), ("run_at", datetime(2026, 1, 1)), ("max_attempts", True)],
)  # fmt: skip
def test_bad_option_values_are_named(option: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=option):
        Options.build("task t", **{option: value})


def test_merged_options_override_only_what_is_set() -> None:
    base = Options.build("t", queue="a", priority=1, max_attempts=3)
    over = Options.build("t", priority=9)
    merged = base.merged(over)
    assert (merged.queue, merged.priority, merged.max_attempts) == ("a", 9, 3)


def test_settled_options_are_as_set_else_the_defaults() -> None:
    assert Options().settled() == Settled(DEFAULT_QUEUE, 0, DEFAULT_MAX_ATTEMPTS, 1, 0.0)
    given = Options.build("test", queue="mail", priority=-3, max_attempts=9, concurrency_limit=4)
    assert given.settled() == Settled("mail", -3, 9, 4, 0.0)
    assert Options.build("test", delay=2.5).settled().delay == 2.5
