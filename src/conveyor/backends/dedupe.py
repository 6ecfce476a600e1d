"""Matching inserted rows back to the jobs asked for, for inserts that skip duplicates.

Backends insert with ``ON CONFLICT DO NOTHING``: the unique indexes decide what is a duplicate, so
two enqueuers racing cannot both insert. What was skipped is then looked up by its keys.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from ..errors import ConveyorError
from ..job import Job
from .base import NewJob

_MAX_ROUNDS = 20

Key = tuple[str | None, str | None]


def _key(job: NewJob | Job) -> Key:
    return (job.idempotency_key, job.unique_key)


def resolve_inserted(
    jobs: Sequence[NewJob],
    insert: Callable[[Sequence[NewJob]], list[Job]],
    find: Callable[[list[str], list[str]], list[Job]],
) -> list[Job]:
    """Insert ``jobs`` and return one Job per input, in order.

    ``insert`` inserts a batch skipping conflicts and returns the rows it inserted (rows of one
    key pair in input order, i.e. ascending id); ``find`` returns existing jobs holding any of the
    given idempotency keys, or the given unique keys while active. A skipped job whose holder
    vanished before the lookup (it finished, or its transaction rolled back) is inserted again.
    """
    out: list[Job | None] = [None] * len(jobs)
    pending = list(range(len(jobs)))
    for _ in range(_MAX_ROUNDS):
        batch = [jobs[i] for i in pending]
        groups: dict[Key, deque[Job]] = defaultdict(deque)
        for job in sorted(insert(batch), key=lambda j: j.id):
            groups[_key(job)].append(job)
        skipped = []
        for i in pending:
            group = groups.get(_key(jobs[i]))
            if group:
                out[i] = group.popleft()
            else:
                skipped.append(i)
        if not skipped:
            break
        idem = sorted({k for i in skipped if (k := jobs[i].idempotency_key) is not None})
        uniq = sorted({k for i in skipped if (k := jobs[i].unique_key) is not None})
        found = find(idem, uniq)
        by_idem = {j.idempotency_key: j for j in found if j.idempotency_key is not None}
        by_uniq = {j.unique_key: j for j in found if j.unique_key is not None and j.state.active}
        pending = []
        for i in skipped:
            ik, uk = _key(jobs[i])
            existing = (by_idem.get(ik) if ik is not None else None) or (
                by_uniq.get(uk) if uk is not None else None
            )
            if existing is None:
                pending.append(i)
            else:
                out[i] = replace(existing, deduplicated=True)
        if not pending:
            break
    else:
        raise ConveyorError("could not insert or find jobs after repeated unique-key conflicts")
    return [job for job in out if job is not None]
