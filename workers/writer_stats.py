"""The writer's counters (:class:`Stats`): what ``stats`` answers, ``db health`` shows and the
console charts. The IO thread reports them; the threads that commit (the commit thread, the IO
thread for a small batch) and the checkpointer update them."""
from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

from db.stats import percentile

#: Batches that must fail in a row, none committing between them, before the stats say the commits
#: fail (``commits_failing_s``): one batch that lost a race, then an idle writer, is no state (review,
#: round 40).
FAILING_AFTER_BATCHES = 2


class Stats:
    """Counters the IO thread reports and the threads that commit update. Plain
    attribute updates under the GIL; a report is a consistent-enough copy."""

    def __init__(self) -> None:
        #: When the counters began (the writer's start), by the monotonic clock: a step of the wall clock moved
        #: ``uptime_s`` as far (fault hunt, stop 53).
        self.started = time.monotonic()
        self.batches = 0
        self.batched_requests = 0
        self.max_batch = 0
        self.requests_ok = 0
        self.requests_failed = 0
        self.busy_replies = 0
        self.malformed = 0
        self.dedup_hits = 0
        #: SQLite's "database is locked": must stay 0 (only the writer writes).
        self.lock_errors = 0
        #: PostgreSQL: times a request (or a whole batch) lost a race with another session (a deadlock, a
        #: serialisation failure, a lock wait over TICKSTACK_LOCK_TIMEOUT_MS) and was answered retryably.
        self.lost_races = 0
        self.commit_failures = 0
        #: Batches run again carefully, a savepoint per request, after a failure in their fast run.
        self.careful_batches = 0
        #: Of ``batches``, those the IO thread committed itself, the commit thread being idle.
        self.io_batches = 0
        #: WAL checkpoints run off the commit path (:mod:`workers.checkpointer`), and when the last ran.
        self.background_checkpoints = 0
        self.last_background_checkpoint_ms: int | None = None
        self.storage_full = 0
        self.last_storage_full: dict[str, Any] | None = None
        #: Since when (monotonic) the disk is full, as the last write found it (none committed since a
        #: StorageFull); None while there is space. Kept by workers.answers.Answers.
        self.disk_full_since: float | None = None
        #: Why the writer refuses every write: its files were removed under it (workers.journal_guard).
        self.journal_removed: str | None = None
        #: Since when (monotonic) every batch has failed to commit, for a reason other than a full disk
        #: (an I/O error, a disk turned read-only), and the last reason; None once one commits. Kept by
        #: workers.answers.Answers.
        self.commits_failing_since: float | None = None
        self.failed_batches_in_a_row = 0
        self.last_commit_failure: dict[str, Any] | None = None
        self.ticks_inserted = 0
        self.commit_ms: deque[float] = deque(maxlen=4096)
        self.last_checkpoint: dict[str, Any] | None = None

    def report(self, queue_depth: int, queue_bytes: int = 0) -> dict[str, Any]:
        lat = sorted(self.commit_ms)

        def pct(p: float) -> float | None:
            value = percentile(lat, p)
            return None if value is None else round(value, 3)

        return {
            "pid": os.getpid(), "uptime_s": round(time.monotonic() - self.started, 3), "queue_depth": queue_depth,
            "queue_bytes": queue_bytes,
            "batches": self.batches, "max_batch": self.max_batch,
            "mean_batch": round(self.batched_requests / self.batches, 2) if self.batches else 0.0,
            "commit_p50_ms": pct(0.50), "commit_p99_ms": pct(0.99), "commit_max_ms": pct(1.0),
            "requests_ok": self.requests_ok, "requests_failed": self.requests_failed,
            "busy_replies": self.busy_replies, "malformed": self.malformed, "dedup_hits": self.dedup_hits,
            "lock_errors": self.lock_errors, "lost_races": self.lost_races, "commit_failures": self.commit_failures,
            "careful_batches": self.careful_batches, "io_batches": self.io_batches,
            "background_checkpoints": self.background_checkpoints,
            "last_background_checkpoint_ms": self.last_background_checkpoint_ms,
            "storage_full": self.storage_full, "last_storage_full": self.last_storage_full,
            "disk_full": self.disk_full_since is not None,
            "commits_failing_s": (
                None if self.commits_failing_since is None or self.failed_batches_in_a_row < FAILING_AFTER_BATCHES
                else round(time.monotonic() - self.commits_failing_since, 1)),
            "last_commit_failure": self.last_commit_failure,
            "ticks_inserted": self.ticks_inserted, "last_checkpoint": self.last_checkpoint,
            # SQLite's alone, and only once it happened: not a field of every answer on a server.
            **({"journal_removed": self.journal_removed} if self.journal_removed else {}),
        }
