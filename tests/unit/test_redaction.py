"""Redaction (conveyor.redaction and the app's use of it), the bounds on durations and backoffs,
and the stricter JSON rules of serialization: pure functions, no database."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from conveyor import Backoff, ConfigurationError, Conveyor, InvalidArgumentsError, Job, JobState
from conveyor.options import MAX_DELAY, Options, SafeBackoff
from conveyor.redaction import REDACTED, Redaction, check_fields, redact, scrub
from conveyor.serialization import UnreadableJSON, dumps, load_stored

NAMES = frozenset({"password", "token"})


def job(task: str, args: list[Any], kwargs: dict[str, Any], **fields: Any) -> Job:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    values: dict[str, Any] = dict(
        id=1, queue="default", task=task, args=args, kwargs=kwargs, state=JobState.DEAD,
        priority=0, created_at=now, run_at=now, started_at=now, attempted_at=now,
        finished_at=now, heartbeat_at=None, lease_owner=None, lease_expires_at=None, attempt=1,
        max_attempts=1, snoozes=0, max_snoozes=None, deadline=None, timeout=None,
        last_error=None, errors=[], return_value=None, unique_key=None, idempotency_key=None,
        concurrency_key=None, concurrency_limit=1, cancel_requested=False,
    )  # fmt: skip
    values.update(fields)
    return Job(**values)


def test_fields_are_names_matched_case_insensitively_at_any_depth() -> None:
    value = {"user": "a", "Password": "s3cret", "nested": [{"TOKEN": {"x": 1}}, {"ok": 2}]}
    assert redact(value, NAMES) == {
        "user": "a",
        "Password": REDACTED,
        "nested": [{"TOKEN": REDACTED}, {"ok": 2}],
    }
    assert value["Password"] == "s3cret"  # a copy: the original is untouched


def test_check_fields_accepts_lists_and_comma_text_and_refuses_the_rest() -> None:
    assert check_fields("x", ["Password", " token "]) == NAMES
    assert check_fields("x", "password,token") == NAMES
    assert check_fields("x", None) == frozenset()
    for bad in (3, ["ok", ""], [None], {"a": 1}):
        with pytest.raises(ConfigurationError, match="redact"):
            check_fields("task t", bad)


def test_secrets_are_every_text_under_a_redacted_field_with_their_escapings() -> None:
    rules = Redaction(NAMES)
    secrets = rules.secrets(["x"], {"password": 'it\'s "é"', "token": {"a": [12345, 12]}})
    assert 'it\'s "é"' in secrets  # raw
    assert 'it\'s \\"\\u00e9\\"' in secrets  # JSON, ASCII-escaped
    assert 'it\\\'s "é"' in secrets  # repr
    assert "12345" in secrets and "12" not in secrets  # too short to search for
    assert secrets == sorted(secrets, key=len, reverse=True)


def test_scrub_replaces_every_occurrence_longest_first() -> None:
    assert scrub("a hunter2 b hunter2x", ["hunter2x", "hunter2"]) == f"a {REDACTED} b {REDACTED}"
    assert scrub("nothing here", ["hunter2"]) == "nothing here"


def test_positional_parameters_are_matched_by_the_task_signature() -> None:
    def login(user: str, password: str, *rest: Any, token: str = "") -> None: ...

    rules = Redaction.for_function(NAMES, login)
    assert rules.positions == (1,)
    assert rules.args(["alice", "pw-secret", "extra"]) == ["alice", REDACTED, "extra"]
    assert "pw-secret" in rules.secrets(["alice", "pw-secret"], {})
    assert Redaction(NAMES, all_positions=True).args(["alice", 1]) == [REDACTED, REDACTED]


def test_the_app_combines_its_fields_the_tasks_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONVEYOR_REDACT", "api_key, Token")
    app = Conveyor("sqlite:///unused.db", redact=("password",))
    assert app.redact == frozenset({"password", "api_key", "token"})

    @app.task(name="t.login", redact=["pin"])
    def login(user: str, pin: str, **kwargs: Any) -> None: ...

    stored = job(
        "t.login",
        ["alice", "1234-5678"],
        {"api_key": "key-abcdef", "other": 1},
        errors=[{"kind": "error", "message": "bad pin 1234-5678 for key-abcdef", "attempt": 1}],
        last_error={"kind": "error", "message": "bad pin 1234-5678", "traceback": "key-abcdef"},
        return_value={"token": "tok-xyz1", "n": 2},
    )
    shown = app.redacted(stored)
    assert shown.args == ["alice", REDACTED]
    assert shown.kwargs == {"api_key": REDACTED, "other": 1}
    assert shown.return_value == {"token": REDACTED, "n": 2}
    assert shown.errors[0]["message"] == f"bad pin {REDACTED} for {REDACTED}"
    assert shown.last_error == {"kind": "error", "message": f"bad pin {REDACTED}",
                                "traceback": REDACTED}  # fmt: skip
    assert stored.args == ["alice", "1234-5678"]  # the real job is untouched
    assert app.scrubber(stored)("pin 1234-5678!") == f"pin {REDACTED}!"
    # Unknown task (the CLI without --app): positional arguments cannot be matched, all hidden.
    other = app.redacted(job("elsewhere.task", ["a", "b"], {"password": "pw-12345"}))
    assert other.args == [REDACTED, REDACTED] and other.kwargs == {"password": REDACTED}


def test_without_redaction_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVEYOR_REDACT", raising=False)
    app = Conveyor("sqlite:///unused.db")
    stored = job("t", ["a"], {"password": "x"}, errors=[{"message": "x"}])
    assert app.redacted(stored) is stored
    assert app.scrubber(stored)("password x") == "password x"


# -- bounds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("delay", MAX_DELAY * 2, "at most"),
        ("timeout", 1e300, "at most"),
        ("deadline", math.inf, "finite"),
        ("run_at", datetime.max.replace(tzinfo=UTC), "between"),
        ("max_snoozes", 2**31, "between 0 and 2147483647"),
        ("backoff", Backoff(cap=math.inf), "finite"),
        ("backoff", Backoff(base=1, factor=1e10, cap=3600), "finite"),
        ("backoff", Backoff(cap=MAX_DELAY, jitter=1.0), "at most"),
    ],
)
def test_durations_and_times_beyond_what_can_be_stored_are_refused(
    option: str, value: Any, fragment: str
) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        Options.build("test", **{option: value})


def test_a_backoff_function_is_made_total() -> None:
    assert SafeBackoff(lambda n: math.inf)(1) == MAX_DELAY
    assert SafeBackoff(lambda n: -5)(1) == 0.0
    assert SafeBackoff(lambda n: 2.5)(1) == 2.5
    for bad in (lambda n: "soon", lambda n: math.nan, lambda n: 1 / 0, lambda n: None):
        assert 1.0 <= SafeBackoff(bad)(1) <= 1.25  # the default Backoff's first delay
    fn = lambda n: 3.0  # noqa: E731
    opts = Options.build("t", backoff=fn)
    assert isinstance(opts.backoff, SafeBackoff) and opts.backoff == SafeBackoff(fn)


# -- serialization --------------------------------------------------------------------------------


def _deep(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (10**4300, "more than 4300 digits"),
        ("a\x00", "NUL"),
        ({"\x00": 1}, "NUL"),
        (["\udfff"], "args[0] is not valid Unicode"),
        ({"k\ud800": 1}, "key 'k\\ud800' is not valid Unicode"),
        (_deep(200), "nested more than 128"),
    ],
    ids=["huge int", "nul", "nul key", "surrogate", "surrogate key", "deep"],
)
def test_json_that_no_backend_or_reader_can_hold_is_refused(value: Any, fragment: str) -> None:
    with pytest.raises(InvalidArgumentsError, match=re.escape(fragment)):
        dumps(value, "args")


def test_limits_are_inclusive() -> None:
    assert dumps(10**4299, "args") == "1" + "0" * 4299
    assert dumps(_deep(127), "args").count("[") == 128


def test_stored_json_that_cannot_be_decoded_is_unreadable_not_an_error() -> None:
    for text in ("[1,", "[" + "1" * 5000 + "]", "[" * 100_000 + "]" * 100_000, b"\xff"):
        found = load_stored(text)
        assert isinstance(found, UnreadableJSON), text
        assert str(found).startswith("<unreadable JSON: ") and "1111" not in str(found)
    assert load_stored(b'{"a": [1]}') == {"a": [1]}
    assert load_stored(memoryview(b"[2]")) == [2]


def test_the_cli_prints_stored_text_with_control_characters_escaped() -> None:
    from conveyor.cli import _cells, _printable

    assert _printable("a\x1b[2Jb\x07\tc\nd\x9b") == "a\\x1b[2Jb\\x07\tc\nd\\x9b"
    (cell,) = _cells("[link=https://evil.example]x[/link]")
    assert cell.plain == "[link=https://evil.example]x[/link]" and not cell.spans
