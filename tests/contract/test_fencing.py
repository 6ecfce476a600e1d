"""Fencing: an outcome is written only while its job is running under the same attempt and lease
owner. A worker whose lease expired and whose job was claimed again cannot overwrite the new
attempt, whatever it tries to write."""

from __future__ import annotations

import pytest

from conveyor import Conveyor, JobState
from conveyor.backends.base import NewJob
from conveyor.job import Job
from conveyor.states import Backoff, Outcome, cancel, fail, snooze, succeed

from .conftest import WORKER, claim_one, past_lease

NO_BACKOFF = Backoff(base=0, jitter=0)


def _lose_lease_and_reclaim(app: Conveyor) -> tuple[Job, Job]:
    """Worker A claims; its lease runs out and the rescuer moves the job back; B claims it."""
    app.backend.job_insert_many([NewJob(task="t", queue="q", max_attempts=5)])
    a = claim_one(app, worker="A", queue="q", lease=30)
    rescued = app.backend.job_rescue_stuck(now=past_lease(a))
    assert [j.id for j in rescued] == [a.id]
    b = claim_one(app, worker="B", queue="q", lease=30)
    assert b.id == a.id and b.attempt == 2 and b.lease_owner == "B"
    return a, b


def _stale_outcomes(job: Job) -> dict[str, Outcome]:
    now = job.attempted_at
    assert now is not None
    return {
        "succeed": succeed(job, '"stale"'),
        "fail": fail(job, "error", "stale failure", now, NO_BACKOFF),
        "snooze": snooze(job, 0, now),
        "cancel": cancel(job, "stale cancel", now),
        "dead": Outcome(job.id, job.attempt, JobState.DEAD, error={"message": "stale"}),
    }


@pytest.mark.parametrize("kind", ["succeed", "fail", "snooze", "cancel", "dead"])
def test_stale_outcome_after_lease_loss_is_rejected_and_the_new_attempt_stands(
    app: Conveyor, kind: str
) -> None:
    a, b = _lose_lease_and_reclaim(app)

    applied = app.backend.job_finish_many("A", [_stale_outcomes(a)[kind]])

    assert applied == set()
    current = app.get_job(a.id)
    assert current.state == JobState.RUNNING
    assert current.attempt == 2 and current.lease_owner == "B"
    assert current.lease_expires_at == b.lease_expires_at
    assert current.return_value is None
    assert [e["kind"] for e in current.errors] == ["lease_expired"]

    # B's outcome is the one that counts
    assert app.backend.job_finish_many("B", [succeed(b, '"fresh"')]) == {b.id}
    done = app.get_job(b.id)
    assert done.state == JobState.SUCCEEDED and done.return_value == "fresh" and done.attempt == 2


def test_a_stale_success_cannot_undo_the_new_attempts_outcome(app: Conveyor) -> None:
    a, b = _lose_lease_and_reclaim(app)
    now = app.backend.db_now()
    assert app.backend.job_finish_many("B", [fail(b, "error", "B failed", now, NO_BACKOFF)]) == {
        b.id
    }
    assert app.get_job(b.id).state == JobState.RETRYING

    assert app.backend.job_finish_many("A", [succeed(a, '"stale"')]) == set()
    after = app.get_job(b.id)
    assert after.state == JobState.RETRYING and after.return_value is None
    assert after.error == "B failed"


def test_old_attempt_of_the_same_worker_is_rejected(app: Conveyor) -> None:
    """The attempt number fences too: the same worker claiming the job again does not make its
    first attempt's outcome valid."""
    app.backend.job_insert_many([NewJob(task="t", queue="q")])
    first = claim_one(app, worker="A", queue="q")
    app.backend.job_rescue_stuck(now=past_lease(first))
    second = claim_one(app, worker="A", queue="q")
    assert second.attempt == first.attempt + 1

    assert app.backend.job_finish_many("A", [succeed(first, '"old"')]) == set()
    assert app.get_job(first.id).state == JobState.RUNNING
    assert app.backend.job_finish_many("A", [succeed(second, '"new"')]) == {second.id}
    assert app.get_job(first.id).return_value == "new"


def test_another_worker_cannot_finish_a_job_it_does_not_hold(app: Conveyor) -> None:
    app.backend.job_insert_many([NewJob(task="t", queue="q")])
    job = claim_one(app, worker="A", queue="q")
    assert app.backend.job_finish_many("intruder", [succeed(job, "1")]) == set()
    assert app.get_job(job.id).state == JobState.RUNNING
    assert app.get_job(job.id).lease_owner == "A"


def test_an_outcome_is_written_once(app: Conveyor) -> None:
    app.backend.job_insert_many([NewJob(task="t", queue="q")])
    job = claim_one(app, worker="A", queue="q")
    assert app.backend.job_finish_many("A", [succeed(job, "1")]) == {job.id}
    finished = app.get_job(job.id)
    # the same outcome again (a retried write), or a different one, changes nothing
    assert app.backend.job_finish_many("A", [succeed(job, "2")]) == set()
    assert app.backend.job_finish_many("A", [cancel(job, "late", finished.finished_at)]) == set()
    assert app.get_job(job.id) == finished


def test_outcomes_after_rescue_to_dead_are_rejected(app: Conveyor) -> None:
    app.backend.job_insert_many([NewJob(task="t", queue="q", max_attempts=1)])
    job = claim_one(app, worker="A", queue="q")
    (rescued,) = app.backend.job_rescue_stuck(now=past_lease(job))
    assert rescued.state == JobState.DEAD
    assert app.backend.job_finish_many("A", [succeed(job, "1")]) == set()
    assert app.get_job(job.id).state == JobState.DEAD


def test_a_batch_applies_only_its_fenced_outcomes(app: Conveyor) -> None:
    app.backend.job_insert_many([NewJob(task="t", queue="q") for _ in range(3)])
    jobs = app.backend.job_fetch_available("A", ["q"], 3, 30)
    assert len(jobs) == 3
    lost, kept, also_kept = jobs
    # only ``lost`` has its lease run out and is taken by B
    app.backend.job_heartbeat("A", [kept.id, also_kept.id], 3600)
    assert [j.id for j in app.backend.job_rescue_stuck(now=past_lease(lost))] == [lost.id]
    b = claim_one(app, worker="B", queue="q")
    assert b.id == lost.id

    applied = app.backend.job_finish_many(
        "A", [succeed(lost, "0"), succeed(kept, "1"), succeed(also_kept, "2")]
    )
    assert applied == {kept.id, also_kept.id}
    assert app.get_job(lost.id).state == JobState.RUNNING
    assert app.get_job(lost.id).lease_owner == "B"
    assert app.get_job(kept.id).return_value == 1 and app.get_job(also_kept.id).return_value == 2


def test_a_job_named_twice_in_one_batch_is_written_as_if_one_at_a_time(app: Conveyor) -> None:
    """Outcomes apply in order: of two for the same attempt the first wins; a stale one (an
    older attempt) before the current one does not stop the current one applying."""
    app.backend.job_insert_many([NewJob(task="f.t", queue="q", max_attempts=3) for _ in range(2)])
    both = app.backend.job_fetch_available(WORKER, ["q"], 2, 30)
    same, renewed = sorted(both, key=lambda j: j.id)
    now = app.backend.db_now()
    # `renewed` fails its attempt 1 and is claimed again as attempt 2
    app.backend.job_finish_many(WORKER, [fail(renewed, "error", "x", now, Backoff(base=0))])
    (again,) = app.backend.job_fetch_available(WORKER, ["q"], 1, 30)
    assert again.id == renewed.id and again.attempt == 2
    outcomes = [
        succeed(same, '"first"'),
        succeed(renewed, '"stale"'),  # attempt 1: fenced out
        succeed(same, '"second"'),
        succeed(again, '"current"'),
    ]
    assert app.backend.job_finish_many(WORKER, outcomes) == {same.id, renewed.id}
    assert app.get_job(same.id).return_value == "first"
    assert app.get_job(renewed.id).return_value == "current"
