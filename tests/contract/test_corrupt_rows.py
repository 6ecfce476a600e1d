"""Rows corrupted behind Conveyor's back: a JSON column Python cannot decode, or arguments of the
wrong shape. Reading never raises (the value comes back as an UnreadableJSON), so a corrupted
row claimed beside good ones cannot poison the claim; the worker ends it dead and runs the rest.
"""

from __future__ import annotations

from typing import Any

import pytest

from conveyor import Conveyor, JobState
from conveyor.serialization import UnreadableJSON

from .conftest import WORKER, RawDB

#: A valid JSON number that Python refuses to convert (over 4300 digits).
HUGE = "[" + "7" * 5000 + "]"


def _task(app: Conveyor) -> Any:
    @app.task(name="corrupt.work", max_attempts=1)
    def work(*args: Any, **kwargs: Any) -> int:
        return len(args)

    return work


def _set(raw: RawDB, column: str, text: str, job_id: int) -> None:
    cast = "" if raw.sqlite else "::jsonb"
    raw.execute(f"UPDATE conveyor_jobs SET {column} = %s{cast} WHERE id = %s", (text, job_id))


def test_a_claim_hands_out_an_unreadable_row_beside_the_good_ones(
    app: Conveyor, raw: RawDB
) -> None:
    work = _task(app)
    first, bad, last = (work.enqueue(i) for i in range(3))
    _set(raw, "args", HUGE, bad.id)

    claimed = {j.id: j for j in app.backend.job_fetch_available(WORKER, ["default"], 10, 30.0)}
    assert sorted(claimed) == [first.id, bad.id, last.id]
    assert claimed[first.id].args == [0] and claimed[last.id].args == [2]
    unreadable = claimed[bad.id].args
    assert isinstance(unreadable, UnreadableJSON) and "4300" in unreadable.reason
    assert isinstance(app.get_job(bad.id).args, UnreadableJSON)
    assert len(app.list_jobs()) == 3


def test_a_worker_ends_corrupted_jobs_dead_and_runs_the_rest(app: Conveyor, raw: RawDB) -> None:
    work = _task(app)
    good = [work.enqueue(i) for i in range(4)]
    corrupted = {
        "args": ("args", HUGE),
        "args shape": ("args", '"a string"'),
        "kwargs shape": ("kwargs", "[1, 2]"),
        "kwargs": ("kwargs", '{"n": ' + HUGE + "}"),
    }
    victims = {}
    for label, (column, text) in corrupted.items():
        victims[label] = work.options(priority=1).enqueue(label).id
        _set(raw, column, text, victims[label])

    assert app.drain() == {"dead": len(victims), "succeeded": len(good)}
    for label, job_id in victims.items():
        job = app.get_job(job_id)
        assert job.state == JobState.DEAD, label
        assert [e["kind"] for e in job.errors] == ["bad_arguments"], (label, job.errors)
        assert "unusable arguments" in (job.error or ""), job.error
    assert all(app.get_job(j.id).return_value == 1 for j in good)


def test_sqlite_invalid_json_written_around_the_check_constraint(app: Conveyor, raw: RawDB) -> None:
    """SQLite only (PostgreSQL's jsonb cannot hold invalid JSON): the schema's CHECK refuses
    invalid JSON text, but a row corrupted with the checks off is still read and ended dead."""
    if not raw.sqlite:
        pytest.skip("PostgreSQL's jsonb cannot hold invalid JSON")
    work = _task(app)
    good, bad = work.enqueue(1), work.enqueue(2)
    try:
        raw.execute("UPDATE conveyor_jobs SET args = '[1,' WHERE id = %s", (bad.id,))
    except raw.integrity_error as exc:
        assert "CHECK" in str(exc)
    else:
        raise AssertionError("the CHECK constraint let invalid JSON in")
    raw.execute("PRAGMA ignore_check_constraints = ON")
    raw.execute("UPDATE conveyor_jobs SET args = '[1,' WHERE id = %s", (bad.id,))
    raw.execute("PRAGMA ignore_check_constraints = OFF")

    assert app.drain() == {"dead": 1, "succeeded": 1}
    assert app.get_job(good.id).state == JobState.SUCCEEDED
    assert isinstance(app.get_job(bad.id).args, UnreadableJSON)
