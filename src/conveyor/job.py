"""The job record as stored, and its states."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class JobState(enum.StrEnum):
    """States of a job; docs/state-machine.md draws the transitions between them."""

    QUEUED = "queued"  # waiting: due now, or scheduled for later (run_at)
    RUNNING = "running"  # claimed by a worker that holds its lease
    RETRYING = "retrying"  # failed an attempt; waiting out its backoff until run_at
    SUCCEEDED = "succeeded"
    DEAD = "dead"  # attempts (or snooze/deadline limits) exhausted: the dead-letter queue
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def active(self) -> bool:
        return not self.terminal


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED})
WAITING_STATES = frozenset({JobState.QUEUED, JobState.RETRYING})


@dataclass(frozen=True)
class Job:
    """A snapshot of one job row. Times are timezone-aware UTC and come from the database clock."""

    id: int
    queue: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    state: JobState
    priority: int
    created_at: datetime
    run_at: datetime
    started_at: datetime | None
    attempted_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    attempt: int
    max_attempts: int
    snoozes: int
    max_snoozes: int | None
    deadline: float | None
    timeout: float | None
    last_error: dict[str, Any] | None
    errors: list[dict[str, Any]]
    result: Any
    unique_key: str | None
    idempotency_key: str | None
    concurrency_key: str | None
    concurrency_limit: int
    cancel_requested: bool
    #: True when an enqueue returned this existing job instead of inserting a new one.
    deduplicated: bool = field(default=False, compare=False)

    @property
    def error(self) -> str | None:
        """The last error's message, if any."""
        return None if self.last_error is None else str(self.last_error.get("message"))
