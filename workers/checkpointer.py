"""The writer's WAL checkpoints, mostly off the commit path (:class:`Checkpointer`).

SQLite checkpoints the WAL in the committing connection: the commit that takes the WAL past
``wal_autocheckpoint`` pages (1000) copies them all into the database file and syncs both files
before it returns, tens of milliseconds on this disk and more under load, while every request
queued behind it waits. Those commits were most of the writer's worst latencies (issue 10).

This thread copies the WAL ahead of them, in a connection of its own, with ``PASSIVE``
checkpoints (which never wait for, nor block, the writer or any reader), each time
:data:`BACKLOG_PAGES` pages wait. When the writer's own automatic checkpoint then comes, a few
pages are left for it to copy and sync, and it resets the WAL to its start: a checkpoint in
another connection cannot do that while commits keep coming (it is never complete when the next
transaction begins), so SQLite's autocheckpoint stays on for it, and the WAL stays bounded as
before. Nothing changes for durability: a checkpoint syncs what it copied, wherever it runs.

How it sees the backlog: the WAL index header in the ``-shm`` file (SQLite's documented format,
https://sqlite.org/walformat.html, section 2.2: ``mxFrame`` at byte 16, ``nBackfill`` at byte 96,
native byte order), read with one ``pread`` and no lock: a stale look only moves a checkpoint by
a commit. A header it does not recognise turns it off (the writer's autocheckpoint does the work,
as before). On a full disk a checkpoint fails like any write; it says so once, and tries again at
the next commit.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
from typing import Any

from sqlalchemy.engine import Engine

from db.config import Settings
from db.engine import is_sqlite, storage_full_reason
from db.errors import named_database_words
from db.models import now_ms
from workers.wal_cut import wal_cut_short, wal_index
from workers.writer_stats import Stats

log = logging.getLogger("tickstack.writer")

#: Pages waiting in the WAL that start a checkpoint here (the writer's own comes at 1000).
BACKLOG_PAGES = 250
#: The WAL index header: version (byte 0), mxFrame (16), nBackfill (96).
_WAL_INDEX_VERSION = 3007000
_HEADER = struct.Struct("=I12xI76xI")


class Checkpointer(threading.Thread):
    def __init__(self, settings: Settings, engine: Engine, stats: Stats) -> None:
        """Opens nothing until :meth:`run`; does nothing for a database that is not SQLite.
        Counts its checkpoints in ``stats.background_checkpoints`` (the writer's stats)."""
        super().__init__(name="checkpointer", daemon=True)
        self.settings = settings
        self.engine = engine
        self.stats = stats
        self.enabled = is_sqlite(engine) and settings.database_path is not None
        self._poked = threading.Event()
        self._stopping = False
        self._failing: str | None = None
        #: The ``-shm`` file, open while the thread runs (None: every poke wakes it).
        self._shm: int | None = None

    def poke(self) -> None:
        """After a commit (on the committing thread): wake this thread when there is a backlog to
        copy. The look is one ``pread`` of the header; waking the thread after every commit to look
        itself cost the committing thread a hand-over of the GIL each time, most of a small batch's
        time."""
        shm = self._shm
        if shm is not None and not self._poked.is_set():
            try:
                backlog = self._backlog(shm)
            except OSError:
                backlog = None  # the thread looks, and says what is wrong
            if backlog is not None and backlog < BACKLOG_PAGES:
                return
        self._poked.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and wait (before the writer's final TRUNCATE checkpoint, which a checkpoint here would
        make wait)."""
        self._stopping = True
        self._poked.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        if not self.enabled:
            return
        pooled = None
        shm = None
        try:
            pooled = self.engine.raw_connection()
            con: Any = pooled.driver_connection
            # Never closed: closing it would drop SQLite's locks of this process on the file (wal_index)
            shm = wal_index(self.settings.database_path)  # type: ignore[arg-type]
            if shm is None:
                raise FileNotFoundError(f"no {self.settings.database_path}-shm")
            self._shm = shm
            while not self._stopping:
                self._poked.wait(1.0)
                self._poked.clear()
                if self._stopping:
                    break
                backlog = self._backlog(shm)
                if backlog is None:
                    log.info("writer: unknown WAL index format; checkpoints stay with the commits")
                    return
                # Not into a WAL cut short: it would copy what the cut took as damage (the guard stops this thread).
                if backlog >= BACKLOG_PAGES and wal_cut_short(self.settings.database_path) is None:
                    self._checkpoint(con)
        except Exception as e:  # the commit thread's own autocheckpoint goes on without this thread
            log.warning("writer: background checkpoints stopped (%s); the commits checkpoint as before",
                        named_database_words(e))
        finally:
            self._shm = None
            if pooled is not None:
                try:
                    pooled.close()
                except Exception as e:  # e.g. a full disk: nothing of ours is pending in it
                    log.debug("writer: closing the checkpoint connection: %s", e)

    @staticmethod
    def _backlog(shm: int) -> int | None:
        """WAL pages not yet copied into the database; None for a header it does not recognise."""
        header = os.pread(shm, _HEADER.size, 0)
        if len(header) < _HEADER.size:
            return 0  # not initialised yet: nothing written
        version, frames, backfilled = _HEADER.unpack(header)
        if version != _WAL_INDEX_VERSION:
            return None
        return max(0, frames - backfilled)

    def _checkpoint(self, con: Any) -> None:
        try:
            con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except Exception as e:
            reason = storage_full_reason(e) or named_database_words(e)
            if reason != self._failing:
                log.warning("writer: background checkpoint failed (%s); trying again after the next commit", reason)
                self._failing = reason
            return
        self._failing = None
        self.stats.background_checkpoints += 1
        self.stats.last_background_checkpoint_ms = now_ms()
