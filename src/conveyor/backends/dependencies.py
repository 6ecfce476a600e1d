"""The state a job with dependencies starts in (or returns to on a manual retry), decided from its
dependencies' states, which the backend reads under a share lock in the same transaction (so none
of them can finish unnoticed in between). Later transitions of dependencies release or cancel
their dependents in the database itself (triggers; see the migrations)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidTransitionError, JobNotFoundError
from ..job import Job, JobState
from .base import NewJob

FAILED = frozenset({JobState.DEAD.value, JobState.CANCELLED.value})


@dataclass(frozen=True)
class Dependency:
    """A job another job depends on, as read for a decision. ``state`` None: it no longer exists
    (pruned after it finished), which blocks nothing."""

    id: int
    task: str | None
    state: str | None
    last_error: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Dependency:
        return cls(row["id"], row["task"], row["state"], row["last_error"])

    @property
    def failed(self) -> bool:
        return self.state in FAILED

    @property
    def blocking(self) -> bool:
        return self.state is not None and self.state != JobState.SUCCEEDED.value


def failure_reason(dep: Dependency) -> str:
    """Why a dependent of ``dep`` is cancelled; a job itself cancelled by a dependency passes on
    the reason that names the job that failed (the triggers do the same)."""
    if dep.last_error is not None and dep.last_error.get("kind") == "dependency":
        return str(dep.last_error.get("message"))
    return f"dependency job {dep.id} ({dep.task}) ended {dep.state}"


def all_dependency_ids(jobs: Iterable[NewJob]) -> list[int]:
    return sorted({i for job in jobs for i in job.depends_on})


def check_exist(jobs: Iterable[NewJob], found: Mapping[int, Dependency]) -> None:
    """JobNotFoundError naming the first dependency that does not exist."""
    for job in jobs:
        for dep_id in job.depends_on:
            if dep_id not in found:
                raise JobNotFoundError(
                    f"cannot enqueue {job.task}: depends_on names job {dep_id}, which does not exist"
                )


def initial_state(
    depends_on: Sequence[int], found: Mapping[int, Dependency]
) -> tuple[str, str | None]:
    """(state, cancellation reason) of a new job: cancelled at once if a dependency already ended
    dead or cancelled, queued if all succeeded (or there are none), else waiting."""
    deps = [found[i] for i in sorted(depends_on)]
    failed = [d for d in deps if d.failed]
    if failed:
        return JobState.CANCELLED.value, failure_reason(failed[0])
    if any(d.blocking for d in deps):
        return JobState.WAITING.value, None
    return JobState.QUEUED.value, None


def retry_state(job_id: int, deps: Sequence[Dependency]) -> str:
    """The state a manual retry puts a job in: waiting while a dependency is unfinished, else
    queued. A dependency that ended dead or cancelled must be retried first."""
    for dep in sorted(deps, key=lambda d: d.id):
        if dep.failed:
            raise InvalidTransitionError(
                f"job {job_id} depends on job {dep.id} ({dep.task}), which is {dep.state}: "
                f"retry job {dep.id} first"
            )
    return JobState.WAITING.value if any(d.blocking for d in deps) else JobState.QUEUED.value


#: The (state, reason) of a new job that depends on nothing.
NO_DEPENDENCIES: tuple[str, str | None] = ("queued", None)


def plan(
    jobs: Sequence[NewJob], found: Mapping[int, Dependency]
) -> dict[int, tuple[str, str | None]]:
    """{id(new job): (state, reason)} for the jobs with dependencies, given the states of every
    job they name (read under a lock by the backend); JobNotFoundError for an unknown one."""
    check_exist(jobs, found)
    return {id(job): initial_state(job.depends_on, found) for job in jobs if job.depends_on}


def edges(jobs: Sequence[NewJob], inserted: Sequence[Job]) -> list[tuple[int, int]]:
    """(job id, dependency id) rows to record for the jobs actually inserted (not deduplicated)."""
    return [
        (job.id, dep)
        for new, job in zip(jobs, inserted, strict=True)
        if not job.deduplicated
        for dep in new.depends_on
    ]
