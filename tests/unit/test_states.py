"""Pure state-machine logic: no database."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor.job import Job, JobState
from conveyor.states import TRANSITIONS, Backoff, can_transition, fail, snooze, succeed

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def make_job(**overrides: Any) -> Job:
    fields: dict[str, Any] = dict(
        id=1, queue="q", task="t", args=[], kwargs={}, state=JobState.RUNNING, priority=0,
        created_at=NOW, run_at=NOW, started_at=NOW, attempted_at=NOW, finished_at=None,
        heartbeat_at=NOW, lease_owner="w", lease_expires_at=NOW, attempt=1, max_attempts=3,
        snoozes=0, max_snoozes=None, deadline=None, timeout=None, last_error=None, errors=[],
        return_value=None, unique_key=None, idempotency_key=None, concurrency_key=None,
        concurrency_limit=1, cancel_requested=False,
    )  # fmt: skip
    fields.update(overrides)
    return Job(**fields)


def test_terminal_states_only_leave_by_manual_retry() -> None:
    assert TRANSITIONS[JobState.SUCCEEDED] == frozenset()
    for state in (JobState.DEAD, JobState.CANCELLED):  # waiting again if a dependency is unfinished
        assert TRANSITIONS[state] == {JobState.QUEUED, JobState.WAITING}
    assert can_transition(JobState.RUNNING, JobState.QUEUED)
    assert not can_transition(JobState.QUEUED, JobState.SUCCEEDED)


def test_a_waiting_job_is_released_or_cancelled_and_never_runs_directly() -> None:
    assert TRANSITIONS[JobState.WAITING] == {JobState.QUEUED, JobState.CANCELLED}
    assert not any(JobState.WAITING in TRANSITIONS[s] for s in (JobState.QUEUED, JobState.RUNNING))
    assert set(TRANSITIONS) == set(JobState)


def test_default_backoff_doubles_with_bounded_jitter() -> None:
    backoff = Backoff()
    rng = random.Random(7)
    for attempt, base in [(1, 1), (2, 2), (3, 4), (10, 512)]:
        delay = backoff(attempt, rng)
        assert base <= delay <= base * 1.25
    assert backoff(40, rng) <= 3600 * 1.25


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(base=-1)


def test_failure_with_attempts_left_retries_after_backoff() -> None:
    outcome = fail(make_job(attempt=1), "error", "boom", NOW, lambda n: 5.0)
    assert outcome.state == JobState.RETRYING
    assert outcome.delay == 5.0
    assert outcome.error is not None and outcome.error["message"] == "boom"


def test_failure_on_last_attempt_is_dead() -> None:
    outcome = fail(make_job(attempt=3, max_attempts=3), "error", "boom", NOW, lambda n: 5.0)
    assert outcome.state == JobState.DEAD


def test_failure_whose_retry_would_pass_the_deadline_is_dead() -> None:
    job = make_job(deadline=60.0, started_at=NOW - timedelta(seconds=50))
    outcome = fail(job, "error", "boom", NOW, lambda n: 30.0)
    assert outcome.state == JobState.DEAD
    assert outcome.error is not None and "deadline" in outcome.error["message"]


def test_snooze_refunds_the_attempt() -> None:
    outcome = snooze(make_job(attempt=3, max_attempts=3), 2.0, NOW)
    assert outcome.state == JobState.QUEUED
    assert outcome.refund_attempt and outcome.snoozed
    assert outcome.delay == 2.0


def test_snooze_past_max_snoozes_is_dead_naming_the_limit() -> None:
    outcome = snooze(make_job(snoozes=4, max_snoozes=4), 1.0, NOW)
    assert outcome.state == JobState.DEAD
    assert outcome.error is not None and "max_snoozes=4" in outcome.error["message"]


def test_deadline_counts_from_first_start_not_creation() -> None:
    created_long_ago = NOW - timedelta(hours=5)
    job = make_job(
        created_at=created_long_ago, started_at=NOW - timedelta(seconds=10), deadline=120.0
    )
    assert snooze(job, 1.0, NOW).state == JobState.QUEUED
    late = make_job(started_at=NOW - timedelta(seconds=119.5), deadline=120.0)
    outcome = snooze(late, 1.0, NOW)
    assert outcome.state == JobState.DEAD
    assert outcome.error is not None and "120 s deadline" in outcome.error["message"]


def test_success_carries_the_result_json() -> None:
    outcome = succeed(make_job(), '{"ok":true}')
    assert outcome.state == JobState.SUCCEEDED and outcome.result == '{"ok":true}'
