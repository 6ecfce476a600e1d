"""job_from_values' fast construction agrees with the Job dataclass constructor."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from conveyor.backends.base import JOB_COLUMNS, job_from_values
from conveyor.job import Job, JobState

NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def row(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        id=7, queue="q", task="t", args=[1, "a"], kwargs={"k": None}, state="running", priority=3,
        created_at=NOW, run_at=NOW, started_at=NOW, attempted_at=NOW, finished_at=None,
        heartbeat_at=NOW, lease_owner="w", lease_expires_at=NOW, attempt=2, max_attempts=5,
        snoozes=1, max_snoozes=None, deadline=60.0, timeout=None, last_error={"message": "x"},
        errors=[{"message": "x"}], result=None, unique_key="u", idempotency_key=None,
        concurrency_key=None, concurrency_limit=1, cancel_requested=0,
        pipeline_id=None, batch_id=None,  # columns a Job does not carry are ignored
    )  # fmt: skip
    base.update(overrides)
    return base


def job_from_row(r: dict[str, Any], **extra: Any) -> Job:
    """A row (by column name) in JOB_COLUMNS order, as the backends' job queries return it."""
    return job_from_values([r[name] for name in JOB_COLUMNS], **extra)


def via_constructor(r: dict[str, Any], **extra: Any) -> Job:
    names = {f.name for f in dataclasses.fields(Job)}
    values = {k: v for k, v in r.items() if k in names}
    values.update(
        state=JobState(r["state"]),
        return_value=r["result"],
        cancel_requested=bool(r["cancel_requested"]),
    )
    values.update(extra)
    return Job(**values)


@pytest.mark.parametrize("extra", [{}, {"deduplicated": True}])
def test_fast_rows_equal_constructed_jobs(extra: dict[str, Any]) -> None:
    r = row()
    fast, slow = job_from_row(r, **extra), via_constructor(r, **extra)
    assert fast == slow
    assert repr(fast) == repr(slow)
    assert {f.name: getattr(fast, f.name) for f in dataclasses.fields(Job)} == {
        f.name: getattr(slow, f.name) for f in dataclasses.fields(Job)
    }
    assert fast.state is JobState.RUNNING and fast.cancel_requested is False
    assert fast.deduplicated is extra.get("deduplicated", False)


def test_fast_rows_stay_frozen_and_replaceable() -> None:
    job = job_from_row(row())
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.attempt = 3  # type: ignore[misc]
    assert dataclasses.replace(job, attempt=3).attempt == 3


def test_a_row_with_a_column_too_few_is_an_error() -> None:
    values = [row()[name] for name in JOB_COLUMNS]
    for short in (values[:-1], values[1:]):  # never a Job with its fields shifted
        with pytest.raises((ValueError, IndexError, KeyError)):
            job_from_values(list(short))
