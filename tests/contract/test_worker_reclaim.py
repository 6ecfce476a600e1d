"""A worker that gets a job back (claims it again) while its older attempt of that job is still
running: the new attempt must stay tracked, heartbeated and fenced when the old one ends.

A worker keys its running attempts by job id. Its older attempt can still be running when the
job comes back to it: the lease was lost (heartbeats failing, a blocked thread), the job was
rescued, and this worker's free slot claimed it again before its heartbeat noticed. The end of
the old attempt must not untrack the new one, or the new one runs unheartbeated, its lease
expires while it runs, and the job runs a third time beside it."""

from __future__ import annotations

import threading
import time

from conveyor import Conveyor, JobState

from .conftest import past_lease, running_worker, wait_until

LEASE = 1.0


def test_reclaimed_job_keeps_its_new_attempt_tracked(app: Conveyor) -> None:
    release = {1: threading.Event(), 2: threading.Event()}
    seen: list[int] = []

    @app.task(name="reclaim.hold")
    def hold() -> int:
        from conveyor import current_job

        attempt = current_job().job.attempt
        seen.append(attempt)
        release.get(attempt, release[2]).wait(30)
        return attempt

    job = hold.enqueue()
    try:
        with running_worker(
            app, concurrency=2, lease=LEASE, poll_interval=0.05, rescue_interval=0.2
        ) as worker:
            wait_until(lambda: seen == [1], what="attempt 1 to start")
            # Its lease is lost behind its back: rescued (as after missed heartbeats), and
            # this worker's free slot claims the job again.
            claimed = app.get_job(job.id)
            assert app.backend.job_rescue_stuck(past_lease(claimed))
            wait_until(lambda: seen == [1, 2], what="the job claimed again, attempt 2")
            release[1].set()  # the old attempt ends while attempt 2 runs
            time.sleep(3 * LEASE)  # the scenario: attempt 2 runs on, for several leases
            assert seen == [1, 2], "the job ran again beside its running attempt 2"
            now = app.get_job(job.id)
            assert now.state == JobState.RUNNING and now.attempt == 2
            assert now.lease_owner == worker.id
            assert job.id in worker.running_job_ids
            release[2].set()
            wait_until(
                lambda: app.get_job(job.id).state == JobState.SUCCEEDED, what="attempt 2's end"
            )
        done = app.get_job(job.id)
        assert done.return_value == 2 and done.attempt == 2
        assert seen == [1, 2]
        assert [e["kind"] for e in done.errors] == ["lease_expired"]
    finally:
        for event in release.values():
            event.set()
