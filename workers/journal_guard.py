"""What the writer does when its database files are removed or moved under it (:class:`JournalGuard`,
SQLite only; the IO thread calls :meth:`JournalGuard.check` once a second).

SQLite's WAL (or shm) removed or moved under the writer (``rm tickstack.db-wal tickstack.db-shm``):
every write since the last checkpoint is then only in the WAL this process still has open, lost with
it. A checkpoint now could be partial (a reader's snapshot holds pages back), which without the WAL
leaves the database file a mix of two states; so the writer keeps what it has, refuses every write
from then on (retryably), and says how to save it: a restart of the stack, whose writer's last
checkpoint, the readers stopping, copies it all. The database file itself moved: the readers and the
next writer would open a new, empty one at its path; writes are refused likewise, and the reason
says where the file is now and how to put it back. Removed: the commit thread saves it whole
(:class:`SaveCopy`, after what it holds), and the reason then says where the copy is and how to put
it in place (:func:`workers.write_connection.journal_gone_reason`). The WAL cut short at its path
(:mod:`workers.wal_cut`): writes are refused likewise, and the writer checkpoints no more.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db.config import Settings
from db.errors import CommitFailed
from workers.wal_cut import hold_database_open, wal_cut_short, wal_index
from workers.write_connection import JournalWatch, database_removed, journal_gone_reason
from workers.writer_stats import Stats

log = logging.getLogger("tickstack.writer")


@dataclass
class SaveCopy:
    """Put on the commit thread's queue to save the database whole, its file having been removed under
    the writer (:meth:`workers.write_connection.WriteConnection.save_copy`), after the batches queued
    before it. ``result``: the copy's path, or why there is none; None until it is done."""

    path: Path
    result: Path | str | None = None


class JournalGuard:
    """The writer's :class:`~workers.write_connection.JournalWatch`, and what it does once a file is
    gone. ``committer`` is the writer's :class:`workers.commit.Committer`, ``requests`` its queue."""

    def __init__(self, settings: Settings, committer: Any, checkpointer: Any, stats: Stats,
                 requests: queue.Queue) -> None:
        assert settings.database_path is not None
        self.settings = settings
        self.committer = committer
        self.checkpointer = checkpointer
        self.stats = stats
        self.requests = requests
        self.watch = JournalWatch(settings.database_path)
        self.watch.gone()  # what the write connection opened, seen before the writer serves
        #: What the watch found gone; the removed database's copy asked of the commit thread (until
        #: done), whether it is on the queue, and the copy made (the stop then has nothing to save).
        self.gone: list[str] = []
        self.save: SaveCopy | None = None
        self.save_sent = False
        self.saved_copy: Path | None = None
        #: Why the WAL is found cut short (the writer then checkpoints no more), and the read-only
        #: connection that keeps the writer's own from closing last (:func:`workers.wal_cut.hold_database_open`).
        self.wal_cut: str | None = None
        self._holder: object = None
        self._cut_lock = threading.Lock()  # looked at by the IO thread and before each commit
        wal_index(settings.database_path)  # SQLite's, as the write connection opened it, kept for the looks

    def check(self) -> None:
        """Refuse every write once a file is gone (the checkpointer stopped: its PASSIVE checkpoints may
        be partial), and follow a removed database's copy."""
        if self.committer.refusing is not None:
            self._send_save()
            return
        self.gone = self.watch.gone()
        if self.gone:
            if database_removed(self.gone, self.watch):
                self.save = SaveCopy(self.settings.database_path)  # type: ignore[arg-type]
            self._refuse()
            self.checkpointer.stop(timeout=0)
            self._send_save()
        else:
            self.cut_short()

    def cut_short(self) -> str | None:
        """Why the WAL is cut short (looked at now, until it is found so), None while it is whole; once
        found, every write is refused and nothing checkpoints any more (nor may the stop)."""
        with self._cut_lock:
            if self.wal_cut is None:
                self._look_for_a_cut()
        return self.wal_cut

    def before_commit(self, conn: object) -> None:
        """In each batch's transaction, just before its COMMIT (:class:`workers.commit.Committer`): a WAL
        cut short since the last look fails the batch, nothing of it committed, before SQLite's
        automatic checkpoint at that COMMIT copies what the cut took into the database file (in the
        second between two looks, a steady stream of writes reached it)."""
        if self.cut_short() is not None:
            raise CommitFailed(f"not applied, retry: {self.wal_cut}")

    def _look_for_a_cut(self) -> None:
        cut = wal_cut_short(self.settings.database_path)  # type: ignore[arg-type]
        if cut is not None:
            from db.circusd import circusctl_command  # psutil and more: only the day it is needed

            self._holder = hold_database_open(self.settings.database_path)  # type: ignore[arg-type]
            self.wal_cut = cut
            self.checkpointer.stop(timeout=0)
            quit_stack = circusctl_command(self.settings.circus_endpoint, "quit")
            reason = self.stats.journal_removed = (
                f"{cut}; so it takes no more writes and does not checkpoint (never truncate or remove the WAL: it "
                f"holds every write since the last checkpoint). Stop the stack (`{quit_stack}`), then `make run`: "
                "the database opens as of its last checkpoint and the whole commits left in the WAL, the writes "
                "refused meanwhile are applied then (clients and feeds retry), and `python -m db doctor` checks it")
            log.error("writer: %s", reason)
            self.committer.refusing = f"not applied, retry: {reason}"

    def _refuse(self) -> None:
        """Every write refused from now on, saying why (the IO thread's, and what the committer holds)."""
        reason = self.stats.journal_removed = journal_gone_reason(
            self.gone, self.settings.circus_endpoint, self.watch,
            saved=self.save.result if self.save is not None else None)
        log.error("writer: %s", reason)
        self.committer.refusing = f"not applied, retry: {reason}"

    def _send_save(self) -> None:
        """The removed database's :class:`SaveCopy` to the commit thread, after what it holds (its queue
        full: at the next check); once done, the words say where the copy is."""
        if self.save is None:
            return
        if not self.save_sent:
            try:
                self.requests.put_nowait(self.save)
                self.save_sent = True
            except queue.Full:
                return
        if self.save.result is not None:
            self._refuse()
            self.saved_copy = self.save.result if isinstance(self.save.result, Path) else None
            self.save = None
