"""Large bulk enqueues: however a backend writes a big batch (PostgreSQL copies batches of plain
jobs with COPY, ids taken first; SQLite inserts in bound chunks), each returned Job is the job as
stored, in input order, and the batch is all or nothing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from conveyor import ConfigurationError, Conveyor, InvalidArgumentsError, JobState
from conveyor.backends.base import NewJob
from conveyor.backends.postgres.bulk import COPY_CHUNK, COPY_MIN

from .conftest import RawDB, is_sqlite, together

SIZE = COPY_MIN + 100
#: Past the first chunk a COPY sends: jobs built and checked while the COPY runs.
LATE = COPY_CHUNK + 50
#: Text that COPY's format escapes, or that looks like its NULL, plus non-ASCII text.
AWKWARD = ["back\\slash", "tab\there", "new\nline", "cr\rx", 'quote"', "\\N", "ünï©ødé €", ""]


def _task(app: Conveyor) -> Any:
    @app.task(name="bulk.work")
    def work(*args: Any, **kwargs: Any) -> None:
        return None

    return work


def _plain_requests(app: Conveyor) -> list[Any]:
    """SIZE requests with positional arguments only and every option a plain job may have."""
    work = _task(app)
    later = datetime.now(timezone(timedelta(hours=5))) + timedelta(days=1)  # not UTC
    variants = [
        lambda i: work.request(i),
        lambda i: work.request(AWKWARD[i % len(AWKWARD)], [i, [True, None]], 2.5e-7, 2**70),
        lambda i: work.options(priority=-3, max_attempts=1, timeout=2).request(0.1, -1.5),
        lambda i: work.options(run_at=later, deadline=60, max_snoozes=0).request(),
        lambda i: work.options(
            queue="other", concurrency_key=AWKWARD[i % len(AWKWARD)] or "k", concurrency_limit=3
        ).request(i),
    ]
    return [variants[i % len(variants)](i) for i in range(SIZE)]


def _assert_stored(app: Conveyor, jobs: list[Any]) -> None:
    ids = [j.id for j in jobs]
    assert ids == sorted(set(ids)), "ids follow the input order"
    stored = {j.id: j for j in app.list_jobs(limit=100_000)}
    for job in jobs:
        assert stored[job.id] == job and repr(stored[job.id]) == repr(job)


def test_a_large_batch_of_plain_jobs_is_returned_as_stored(app: Conveyor) -> None:
    requests = _plain_requests(app)
    jobs = app.enqueue_many(requests)
    assert len(jobs) == SIZE
    assert [j.args for j in jobs[:2]] == [[0], ["tab\there", [1, [True, None]], 2.5e-7, 2**70]]
    assert all(j.state == JobState.QUEUED for j in jobs)
    _assert_stored(app, jobs)
    # each insert is in the history, as for any other enqueue
    assert [e.to_state for e in app.job_history(jobs[-1].id)] == [JobState.QUEUED]


def test_a_large_batch_with_values_jsonb_rewrites_is_returned_as_stored(app: Conveyor) -> None:
    """Objects (jsonb orders their keys), numbers with a positive exponent (stored as the integer
    they denote) and negative zeros (stored as 0.0) come back as stored: such batches take the
    path that reads the rows back. (SQLite stores the JSON text as sent.)"""
    work = _task(app)
    for request in (
        lambda i: work.request(i, zz=1, a=True),
        lambda i: work.request(i, 1e16),
        lambda i: work.request(i, [-0.0]),
    ):
        jobs = app.enqueue_many([request(i) for i in range(SIZE)])
        _assert_stored(app, jobs)


def test_a_large_batch_with_delays_runs_them_by_the_database_clock(app: Conveyor) -> None:
    work = _task(app)
    jobs = app.enqueue_many(
        [work.options(delay=30 if i % 3 == 0 else None).request(i) for i in range(SIZE)]
    )
    _assert_stored(app, jobs)
    delays = {round((j.run_at - j.created_at).total_seconds(), 3) for j in jobs}
    assert delays == {0.0, 30.0}


def test_a_large_batch_is_all_or_nothing(app: Conveyor, raw: RawDB) -> None:
    """A row the schema rejects (an empty queue name, past the app's checks) fails the batch."""
    batch = [NewJob(task="t", queue="q") for _ in range(SIZE)]
    batch[SIZE // 2] = NewJob(task="t", queue="")
    with pytest.raises(Exception) as info:
        app.backend.job_insert_many(batch)
    assert "conveyor_jobs_names_valid" in str(info.value)
    assert raw.count_jobs() == 0
    assert len(app.backend.job_insert_many(batch[: SIZE // 2])) == SIZE // 2


def test_large_batches_enqueued_at_once_are_each_returned_as_stored(app: Conveyor) -> None:
    """Two callers enqueueing big batches at the same moment (their ids may interleave)."""
    results: list[list[Any]] = []
    requests = _plain_requests(app)
    together(*(lambda: results.append(app.enqueue_many(requests)) for _ in range(3)))
    assert len({j.id for batch in results for j in batch}) == 3 * SIZE
    for batch in results:
        _assert_stored(app, batch)


def test_ids_other_sessions_took_meanwhile_are_skipped(app: Conveyor, raw: RawDB) -> None:
    """PostgreSQL: the ids of a COPY are taken from the sequence first; when they are not one
    run (another session took some in between; here: the sequence steps by 2), each row gets
    the id taken for it all the same."""
    if is_sqlite(app.url):
        pytest.skip("PostgreSQL's id sequence; SQLite assigns rowids as it inserts")
    raw.execute("ALTER TABLE conveyor_jobs ALTER COLUMN id SET INCREMENT BY 2")
    jobs = app.enqueue_many(_plain_requests(app))
    ids = [j.id for j in jobs]
    assert ids == list(range(ids[0], ids[0] + 2 * SIZE, 2))
    _assert_stored(app, jobs)


def test_created_at_and_run_at_come_from_the_database_clock(app: Conveyor) -> None:
    work = _task(app)
    before = app.backend.db_now()
    jobs = app.enqueue_many([work.request(i) for i in range(SIZE)])
    after = app.backend.db_now()
    assert all(before <= j.created_at == j.run_at <= after for j in jobs)
    assert all(j.created_at.utcoffset() == timedelta(0) for j in jobs)


def test_a_bad_request_late_in_a_large_batch_writes_nothing(app: Conveyor, raw: RawDB) -> None:
    """Jobs are built as a big batch is sent (PostgreSQL): a request that cannot be encoded,
    far into the batch, still fails the whole batch before anything is stored."""
    work = _task(app)
    requests = [work.request(i) for i in range(LATE + 100)]
    requests[LATE] = work.request({1, 2})  # a set is not JSON
    with pytest.raises(InvalidArgumentsError, match="args"):
        app.enqueue_many(requests)
    assert raw.count_jobs() == 0
    requests[LATE] = "not a request"  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match=f"item {LATE}"):
        app.enqueue_many(requests)
    assert raw.count_jobs() == 0
    assert len(app.enqueue_many(requests[:SIZE])) == SIZE  # the app works on


def test_a_large_batch_with_a_keyed_job_late_in_it_dedupes_it(app: Conveyor) -> None:
    """A job that needs the INSERT path far into a big batch (a key, a delay) sends the whole
    batch down that path, deduped as any batch is."""
    work = _task(app)
    first = work.options(unique_key="late").enqueue(-1)
    requests = [work.request(i) for i in range(LATE + 100)]
    requests[LATE] = work.options(unique_key="late").request(-2)
    jobs = app.enqueue_many(requests)
    assert jobs[LATE].id == first.id and jobs[LATE].deduplicated
    assert len({j.id for j in jobs}) == LATE + 100
    _assert_stored(app, [j for j in jobs if not j.deduplicated])


def test_run_at_in_the_repeated_hour_of_a_clock_change_is_kept(app: Conveyor) -> None:
    """The two 01:30 of a day that turns the clocks back are equal datetimes (they differ in
    ``fold`` only) an hour apart: jobs sharing everything else must not share a run_at."""
    from zoneinfo import ZoneInfo

    work = _task(app)
    first = datetime(2030, 11, 3, 1, 30, tzinfo=ZoneInfo("America/New_York"))
    second = first.replace(fold=1)
    jobs = app.enqueue_many(
        [work.options(run_at=second if i % 2 else first).request(i) for i in range(SIZE)]
    )
    _assert_stored(app, jobs)
    assert jobs[1].run_at - jobs[0].run_at == timedelta(hours=1)


def test_a_role_without_rights_on_the_id_sequence_enqueues_large_batches(
    app: Conveyor, raw: RawDB
) -> None:
    """PostgreSQL: COPY takes ids from the jobs' sequence itself, which needs USAGE on it; a role
    granted only the tables and functions enqueues big batches through INSERT instead."""
    if is_sqlite(app.url):
        pytest.skip("PostgreSQL roles")
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    role = f"conveyor_writer_{uuid.uuid4().hex[:8]}"
    schema = raw.scalar("SELECT current_schema()")
    raw.execute(f"CREATE ROLE {role} LOGIN")
    try:
        raw.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        raw.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}"
        )
        raw.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {role}")
        parts = urlsplit(app.url)
        writer = Conveyor(
            urlunsplit(parts._replace(netloc=parts.netloc.replace("postgres@", f"{role}@", 1)))
        )
        try:
            _task(writer)
            jobs = writer.enqueue_many([writer.tasks["bulk.work"].request(i) for i in range(SIZE)])
            _assert_stored(app, jobs)
        finally:
            writer.close()
    finally:
        raw.execute(f"DROP OWNED BY {role}")
        raw.execute(f"DROP ROLE {role}")
