"""The vacuum: keeps claims as cheap with a million jobs behind them as with a thousand.

On PostgreSQL every claim and every outcome leaves a dead row version in ``conveyor_jobs``, and
each claim leaves an entry in the claim index pointing at one. Until VACUUM removes them, every
claim steps over the entries of all the jobs claimed before it, so a long drain slows down as it
goes. Autovacuum looks at a table at most once per ``autovacuum_naptime`` (a minute by default),
far too seldom for a queue that works off tens of thousands of jobs a second. So every worker
checks the server's count of dead rows every ``interval`` seconds and vacuums the table past
``min_dead`` of them (and a twentieth of the live rows: a VACUUM reads every index whole, so a
table holding weeks of finished jobs is vacuumed less often): VACUUM blocks no claim and no
write, and a worker skips its turn while another process vacuums. On SQLite there is nothing to
do.
"""

from __future__ import annotations

import logging
from datetime import datetime

from ..backends.base import Backend

logger = logging.getLogger("conveyor.vacuum")

#: Dead row versions that make a vacuum worth it: about two seconds of a fast drain.
DEFAULT_MIN_DEAD = 50_000
#: The same while the worker is idle: after a burst, the claims that idle workers make for each
#: new job step over the burst's dead index entries until a VACUUM (0.3-0.4 ms of an idle claim
#: after 20,000 jobs), and an idle worker has the time to spare.
IDLE_MIN_DEAD = 1_000


class Vacuum:
    """``gentle``: paced (see ``Backend.jobs_vacuum``), for an idle worker, whose vacuum would
    otherwise slow the pickups of the jobs that arrive while it runs; a busy worker's vacuum is
    not paced, so that it ends sooner."""

    def __init__(
        self, backend: Backend, min_dead: int = DEFAULT_MIN_DEAD, gentle: bool = False
    ) -> None:
        self.backend = backend
        self.min_dead = min_dead
        self.gentle = gentle

    def run_once(self, now: datetime | None = None) -> bool:
        """Vacuum the jobs table if it holds at least ``min_dead`` dead rows; True if it did.
        (``now`` is not used: the server's own count says when.)"""
        vacuumed = self.backend.jobs_vacuum(self.min_dead, self.gentle)
        if vacuumed:
            logger.info("vacuumed the jobs table (at least %d dead row versions)", self.min_dead)
        return vacuumed
