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

from db.health import connect_read_only

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


def open_wal_index(database: Path) -> int | None:
    """The ``-shm`` file beside ``database``, open for :func:`wal_cut_short` (None if it cannot be).
    Opened once the writer's connection has it, it stays the one SQLite writes, even if another
    program removes the path and puts another file there, and a look costs two reads and a stat
    (about 4 us; an open and a close more made it 11 us, before every COMMIT)."""
    try:
        return os.open(f"{database}-shm", os.O_RDONLY)
    except OSError:
        return None


def wal_cut_short(database: Path, shm: int | None = None) -> str | None:
    """Why the WAL beside ``database`` is shorter than the frames its index says are committed, in
    words for the writer's log and its refusals; None when it is whole or it cannot tell. ``shm``:
    the index, open (:func:`open_wal_index`), or None to open it for this look."""
    wal = Path(f"{database}-wal")
    index = open_wal_index(database) if shm is None else shm
    if index is None:
        return None
    try:
        before = _committed_bytes(index)
        if before is None:
            return None
        size = os.stat(wal).st_size
        if size >= before[1] or _committed_bytes(index) != before:
            return None
    except OSError:
        return None
    finally:
        if shm is None:
            os.close(index)
    return (f"its WAL {wal.name} was cut short under it (by another program): {size} bytes of the {before[1]} its "
            "committed writes fill, so the writes it acknowledged since the last checkpoint are gone from the disk, "
            "and a checkpoint now would copy what is missing into the database file as damage")


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
