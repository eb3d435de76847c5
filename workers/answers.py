"""What a request is answered when the database fails it (:class:`Answers`), for the writer's
commit thread (:mod:`workers.commit`): the op's own error, a full disk (a state the writer reports
and waits out), a race lost to another session (retryable: run it again), or the op's failure.
Every such answer is counted in the writer's stats here.
"""
from __future__ import annotations

import logging
import shutil
import time

from sqlalchemy.exc import SQLAlchemyError

from db import ops
from db.config import Settings
from db.engine import damaged_database, storage_full_reason, transient_reason
from db.errors import CommitFailed, OpFailed, StorageFull, WriterError, database_words, named_database_words
from db.validation import shown
from workers.writer_stats import FAILING_AFTER_BATCHES, Stats

log = logging.getLogger("tickstack.writer")


class Answers:
    """The answer rules of one writer, and the one state they keep: since when the disk is full."""

    def __init__(self, settings: Settings, stats: Stats) -> None:
        self.settings = settings
        self.stats = stats

    def committed(self, applied: bool) -> None:
        """A batch committed: commits fail no more; and if it ``applied`` something while the disk was
        full, the disk has space again (a batch of answers alone proves no room)."""
        if self.stats.failed_batches_in_a_row:
            if self.stats.failed_batches_in_a_row >= FAILING_AFTER_BATCHES:
                log.warning("writer: batches commit again (they failed for %.0f s)",
                            time.monotonic() - (self.stats.commits_failing_since or time.monotonic()))
            self.stats.commits_failing_since, self.stats.failed_batches_in_a_row = None, 0
        since = self.stats.disk_full_since
        if applied and since is not None:
            log.warning("writer: the disk has space again; writes resume (it was full for %.0f s)",
                        time.monotonic() - since)
            self.stats.disk_full_since = None

    def op_error(self, spec: ops.Op, e: BaseException) -> WriterError:
        """What a request whose op raised ``e`` is answered: the op's own
        error, StorageFull on a full disk, OpFailed for anything else."""
        if isinstance(e, WriterError):
            return e
        reason = storage_full_reason(e)
        if reason is not None:
            return self.storage_full(reason)
        transient = transient_reason(e)
        if transient is not None:  # lost a race with another session: nothing applied, run it again
            return self._retry(spec.name, transient)
        if isinstance(e, SQLAlchemyError):
            words = database_words(e)
            log.warning("writer: op %s failed: %s", spec.name, words)
            return OpFailed(f"{spec.name} failed: {words}")
        log.error("writer: op %s raised", spec.name, exc_info=e)  # an op's bug fails its request, never the writer
        return OpFailed(f"{spec.name} failed: {type(e).__name__}: {e}")

    def batch_error(self, e: BaseException) -> WriterError:
        """The retryable error every request of a batch that did not commit gets; the state of failing
        commits (``commits_failing_since``) begins with it, for health and doctor: with a disk turned
        read-only under it every batch failed, and both said all was well (fault hunt, round 40)."""
        reason = storage_full_reason(e)
        if reason is not None:
            return self.storage_full(reason)
        words = named_database_words(e)
        self.stats.last_commit_failure = {"at_ms": ops.now_ms(), "reason": words,
                                          **({"damaged": True} if damaged_database(e) else {})}
        self.stats.failed_batches_in_a_row += 1
        if self.stats.commits_failing_since is None:
            self.stats.commits_failing_since = time.monotonic()
        return CommitFailed(f"commit failed, nothing applied; retry: {words}")

    def storage_full(self, reason: str) -> StorageFull:
        """A full disk, in the database's own words and with the free space the writer sees."""
        self.stats.storage_full += 1
        where = self.settings.database_path
        try:
            free = f"; {shutil.disk_usage(where.parent).free} bytes free in {where.parent}" if where else ""
        except OSError:
            free = ""
        self.stats.last_storage_full = {"at_ms": ops.now_ms(), "reason": reason}
        if self.stats.disk_full_since is None:
            self.stats.disk_full_since = time.monotonic()
            log.warning("writer: the disk is full (%s%s); writes are answered StorageFull until space is freed",
                        reason, free)
        return StorageFull(f"the database's disk is full ({reason}{free}): nothing of the request was written; "
                           "the writer keeps serving, and the request succeeds once space is freed")

    def lost_race(self, cause: BaseException, op: object, cid: str) -> CommitFailed | None:
        """The answer of a request (``op`` of client ``cid``) whose op failed with ``cause`` in a
        batch's fast run, if that lost a race with another session (a lock held past
        TICKSTACK_LOCK_TIMEOUT_MS, a deadlock): retryable, without running it again, since it would
        most likely wait the whole timeout again, holding the batch and every client behind it.
        Nothing of it was applied (the fast run was rolled back); its client sends it again. None
        for any other failure, which runs again in the careful run (:mod:`workers.commit`)."""
        race = transient_reason(cause)
        return None if race is None else self._retry(shown(op), race, cid)

    def count_race(self, e: BaseException) -> None:
        """Count an error that lost a race with another session: SQLite's "database is locked" (which
        must never happen: only the writer writes), or a server's deadlock, serialisation failure or
        lock timeout (which may, between several hosts' writers)."""
        if transient_reason(e) is not None:
            self._raced()

    def _retry(self, op: str, race: str, cid: str | None = None) -> CommitFailed:
        """The answer of op ``op`` (of client ``cid``, when known), which lost ``race``: counted, logged,
        retryable."""
        self._raced()
        log.warning("writer: %s%s lost a race with another session, answered retryably: %s", op,
                    f" of client {cid}" if cid else "", race)
        return CommitFailed(f"{op}: not applied, retry: {race}")

    def _raced(self) -> None:
        if self.settings.database_path is not None:
            self.stats.lock_errors += 1
        else:
            self.stats.lost_races += 1
