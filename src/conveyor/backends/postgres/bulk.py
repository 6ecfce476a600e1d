"""Bulk enqueue by COPY: large batches of plain jobs without an INSERT ... RETURNING.

COPY writes rows several times cheaper than an INSERT of unnested arrays, and it returns nothing,
which this turns into an advantage: the ids are taken from the sequence first, so each Job is
built from what was sent while the server is still writing the rows (the data goes out in
chunks; on two cores the client's work and the server's overlap). A batch qualifies when nothing
about its rows needs the database's answer (see :func:`copyable`); any other batch takes the
INSERT path, which reads what the database set back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from ...job import Job
from ...serialization import load_text
from ..base import NewJob, job_from_fields, job_from_insert

#: A key-less enqueue of at least this many jobs goes through COPY when it can.
COPY_MIN = 500
#: Rows per write of the COPY data (the server writes one chunk while the next is built).
COPY_CHUNK = 1000


def _field(value: str | None) -> str:
    """``value`` as a field of COPY's text format (backslash, tab, newline, CR escaped)."""
    if value is None:
        return "\\N"
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        value = value.replace("\\", "\\\\").replace("\t", "\\t")
        value = value.replace("\n", "\\n").replace("\r", "\\r")
    return value


def _json_field(text: str) -> str:
    """Conveyor's JSON ``text`` as a field of COPY's text format: JSON holds no tab, newline or
    CR (the encoder escapes them), so only backslashes need escaping."""
    return text.replace("\\", "\\\\") if "\\" in text else text


def _number(value: float | None) -> str:
    return "\\N" if value is None else repr(value)


#: Python's JSON for a negative zero (not -0.05, nor the exponent of 2.5e-07).
_NEGATIVE_ZERO = re.compile(r"-0\.0(?![0-9])")


def _stored_as_sent(text: str) -> bool:
    """Whether jsonb gives JSON ``text`` (as Conveyor encodes it) back as the same Python value
    as the text decodes to. Not for an object with keys (jsonb orders them its own way), a number
    with a positive exponent (it comes back as the integer it denotes: 1e+16 as
    10000000000000000), a negative zero (it comes back as 0.0). False also when those characters
    are inside a string: that only sends the batch down the INSERT path."""
    return (
        ("{" not in text or text == "{}")
        and "e+" not in text
        and ("-0.0" not in text or _NEGATIVE_ZERO.search(text) is None)
    )


def _copyable(jobs: Iterable[NewJob]) -> bool:
    """Whether COPY can insert ``jobs`` and their Jobs can be built without reading anything
    back: no key (which a conflict may skip), no dependency, none delayed (run_at = the
    database's now() + delay is the database's arithmetic), every argument stored as sent."""
    return all(
        not (j.unique_key or j.idempotency_key or j.depends_on)
        and (j.run_at is not None or not j.delay)
        and _stored_as_sent(j.args)
        and _stored_as_sent(j.kwargs)
        for j in jobs
    )


def copyable(jobs: Sequence[NewJob]) -> bool:
    """Whether :func:`copy_jobs` takes every one of ``jobs`` (a batch big enough, each
    :func:`_copyable`)."""
    return len(jobs) >= COPY_MIN and _copyable(jobs)


class _NotCopyable(Exception):
    """A job of the batch needs the INSERT path: the COPY is abandoned, nothing written."""


class _Rows:
    """The COPY rows and the Jobs of one batch. Jobs enqueued together mostly share everything
    but their arguments (one task, one set of options), so what they share is worked out once
    per distinct task and options: the text of those columns, and the fields of the Job (copied,
    then the id and the arguments filled in). A third of the client's cost of a bulk enqueue,
    per job, when each row and each Job was built whole."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.now_text = now.isoformat()
        self._shared: dict[tuple[Any, ...], tuple[str, str, dict[str, Any]]] = {}

    def _of(self, job: NewJob) -> tuple[str, str, dict[str, Any]]:
        """The columns before the arguments, those after, and the Job's fields, for ``job``'s
        task and options."""
        # All but args and kwargs; run_at's offset too: the two 01:30 of a day that turns the
        # clocks back are equal datetimes (they differ in fold alone), an hour apart.
        run_at = job.run_at
        key = (*job[:2], *job[4:], None if run_at is None else run_at.utcoffset())
        shared = self._shared.get(key)
        if shared is None:
            now = self.now
            head = f"{_field(job.queue)}\t{_field(job.task)}\t"
            tail = (
                f"\t{job.priority}\t{self.now_text}\t"
                f"{self.now_text if run_at is None else run_at.isoformat()}\t{job.max_attempts}\t"
                f"{_number(job.max_snoozes)}\t{_number(job.deadline)}\t{_number(job.timeout)}\t"
                f"{_field(job.concurrency_key)}\t{job.concurrency_limit}\n"
            )
            stored_run_at = now if run_at is None else run_at.astimezone(now.tzinfo)
            fields = vars(
                job_from_insert(job, [], {}, 0, now, stored_run_at, "queued", None, None, [])
            )
            shared = self._shared[key] = (head, tail, fields)
        return shared

    def add(self, job_id: int, job: NewJob, lines: list[str], jobs: list[Job]) -> None:
        """Append ``job``'s COPY row (with id ``job_id``) to ``lines``, its Job to ``jobs``."""
        head, tail, fields = self._of(job)
        args, kwargs = job.args, job.kwargs
        lines.append(f"{job_id}\t{head}{_json_field(args)}\t{_json_field(kwargs)}{tail}")
        values = fields.copy()
        values["id"] = job_id
        values["args"] = [] if args == "[]" else load_text(args)
        values["kwargs"] = {} if kwargs == "{}" else load_text(kwargs)
        values["errors"] = []
        jobs.append(job_from_fields(values))


def copy_jobs(conn: Any, jobs: Sequence[NewJob], queries: dict[str, str]) -> list[Job] | None:
    """Insert ``jobs`` and return their Jobs in input order, with ids in that order; None,
    having written nothing, when the batch is too small or a job needs the INSERT path.

    Two statements, each atomic: the ids (with the database's now(), every row's created_at),
    then the COPY, which writes all the rows or none. ``jobs`` may be built as they are read
    (:class:`~conveyor.backends.base.LazyNewJobs`): each chunk is built, checked and sent while
    the server writes the previous one, and a bad request's error (or a job that needs the
    INSERT path) abandons the COPY. Abandoning a COPY inside a transaction aborts the
    transaction: on a connection that is not in autocommit mode, pass jobs already checked
    with :func:`copyable`."""
    from psycopg.rows import tuple_row  # here: the module imports without the postgres extra

    if len(jobs) < COPY_MIN or not _copyable(jobs[:COPY_CHUNK]):
        return None
    with conn.cursor(binary=True, row_factory=tuple_row) as cur:
        now, first, last, listed = cur.execute(
            queries["reserve_job_ids"], {"n": len(jobs)}
        ).fetchone()
        ids: Sequence[int] = range(first, last + 1) if listed is None else listed
        rows = _Rows(now)
        out: list[Job] = []
        try:
            with cur.copy(queries["copy_jobs"]) as copy:
                for start in range(0, len(jobs), COPY_CHUNK):
                    end = start + COPY_CHUNK
                    chunk = jobs[start:end]
                    if start and not _copyable(chunk):
                        raise _NotCopyable
                    lines: list[str] = []
                    for job_id, job in zip(ids[start:end], chunk, strict=True):
                        rows.add(job_id, job, lines, out)
                    copy.write("".join(lines))
        except _NotCopyable:
            return None  # the ids taken stay unused: a sequence has gaps anyway
    return out
