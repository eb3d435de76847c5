"""A WAL cut short under the writer (``truncate -s 0 tickstack.db-wal``, ``: > tickstack.db-wal``):
:func:`wal_cut_short` says so, for the writer's :class:`workers.journal_guard.JournalGuard` and for
its stop.

The file stays at its path, so :class:`workers.write_connection.JournalWatch` sees nothing; but the
frames the WAL index (``-shm``) says are committed now lie past its end. The writer went on
acknowledging writes, readers got "database disk image is malformed", and its last checkpoint copied
the missing frames into the database file as zeros, then said "final checkpoint done": a database
whose every page SQLite could not read (fault hunt, round 44). What the cut took is gone from the
disk; what the database file holds (the writes up to the last checkpoint) is whole, and stays so if
nothing checkpoints any more: the writer refuses every write, does not checkpoint, and keeps a
read-only connection open to the database until it exits, so that the close of its own connections
is not the last one (the last connection to close checkpoints). The next writer's SQLite reads the
WAL as it is then and keeps only whole commits of it.

How the frames are counted: the WAL index header (https://sqlite.org/walformat.html, section 2.2,
native byte order), whose two copies SQLite writes one after the other: ``szPage`` at byte 14 (1
for 65536), ``mxFrame`` at byte 16; a frame is its page and a 24-byte header, after the WAL's own
32 bytes. Read twice around the WAL's size: a header that changed meanwhile (a commit, or the
writer's own TRUNCATE checkpoint, which empties the header before it shortens the file) judges
nothing.
"""
from __future__ import annotations

import os
import sqlite3
import struct
from pathlib import Path

from db.engine import connect_read_only

#: One copy of the WAL index header: version, szPage, mxFrame (and the bytes between).
_HEADER = struct.Struct("=I10xHI")
_COPY = 48
_WAL_INDEX_VERSION = 3007000
_WAL_HEADER = 32
_FRAME_HEADER = 24


def _committed_bytes(shm: int) -> tuple[bytes, int] | None:
    """The WAL index header as read, and the bytes of WAL its committed frames fill; None when it
    cannot tell (not initialised, another format, its two copies differ: being written)."""
    both = os.pread(shm, 2 * _COPY, 0)
    if len(both) < 2 * _COPY or both[:_COPY] != both[_COPY:]:
        return None
    version, page, frames = _HEADER.unpack_from(both)
    if version != _WAL_INDEX_VERSION or not frames:
        return None
    page = 65536 if page == 1 else page
    return both, _WAL_HEADER + frames * (page + _FRAME_HEADER)


#: This process's descriptors of ``-shm`` files, by real path: opened once and never closed. Closing
#: any descriptor of a file drops every POSIX lock the process holds on it, SQLite's included: the
#: writer's shared lock that says "connected" went with each look's close, and the next process to
#: open the database (a reader, ``db health``) found no one connected, rebuilt the ``-shm`` under the
#: writer's mapping of it, and the writer died of SIGBUS (review, round 46).
_INDEXES: dict[str, int] = {}


#: The ``-shm`` and ``-wal`` SQLite uses for a database, by the path it was given: resolved once (a
#: ``realpath`` is about 9 us, and the look runs before every COMMIT).
_JOURNALS: dict[str, tuple[str, str]] = {}


def _journal_paths(database: Path) -> tuple[str, str]:
    """The ``-shm`` and ``-wal`` SQLite uses for ``database``: beside the file a symbolic link names."""
    key = os.fspath(database)
    paths = _JOURNALS.get(key)
    if paths is None:
        real = os.path.realpath(key)
        paths = _JOURNALS[key] = (f"{real}-shm", f"{real}-wal")
    return paths


def wal_index(database: Path, fresh: bool = False) -> int | None:
    """This process's descriptor of the ``-shm`` file of ``database`` (None if there is none), for
    :func:`wal_cut_short` and the writer's checkpointer: two reads and a stat a look, its paths
    resolved once (about 4 us; an open, a close and two ``realpath`` more made it 11 to 26 us, before
    every COMMIT). ``fresh``: open it again if the path now names another file (SQLite makes a new
    one when the last connection closes and another opens); the one kept before stays open, since
    closing it would drop this process's locks on a file SQLite may still use."""
    path = _journal_paths(database)[0]
    fd = _INDEXES.get(path)
    try:
        if fd is not None and not (fresh and os.fstat(fd).st_ino != os.stat(path).st_ino):
            return fd
        _INDEXES[path] = fd = os.open(path, os.O_RDONLY)
    except OSError:
        return fd
    return fd


def _cut_words(database: Path, fresh: bool) -> str | None:
    index = wal_index(database, fresh)
    if index is None:
        return None
    wal = _journal_paths(database)[1]
    try:
        before = _committed_bytes(index)
        if before is None:
            return None
        size = os.stat(wal).st_size
        if size >= before[1] or _committed_bytes(index) != before:
            return None
    except OSError:
        return None
    return (f"its WAL {os.path.basename(wal)} was cut short under it (by another program): {size} bytes of the "
            f"{before[1]} its committed writes fill, so the writes it acknowledged since the last checkpoint are "
            "gone from the disk, and a checkpoint now would copy what is missing into the database file as damage")


def wal_cut_short(database: Path) -> str | None:
    """Why the WAL beside ``database`` is shorter than the frames its index says are committed, in
    words for the writer's log and its refusals; None when it is whole or it cannot tell. A cut
    seen in an index the path no longer names is looked at again in the one it names."""
    return _cut_words(database, fresh=False) and _cut_words(database, fresh=True)


def hold_database_open(database: Path) -> sqlite3.Connection | None:
    """A read-only connection to ``database`` holding SQLite's shared lock on it, kept open until the
    process exits, so that no connection of the writer closes last (the last one to close
    checkpoints, even after a failure); None if it cannot be opened."""
    try:
        con = connect_read_only(database)
    except (OSError, sqlite3.Error):
        return None
    try:  # takes the lock; the read itself may fail on what was cut, the lock stays
        con.execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error:
        pass
    return con
