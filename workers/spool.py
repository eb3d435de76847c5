"""The tick ingestor's spool: batches the writer has not acknowledged, kept until it does.

Kept apart from :mod:`workers.ticks` (which decides when a batch is spooled and replayed) because
its one job, keeping a batch whole or not at all on a disk that may be full, has rules of its own.
"""
from __future__ import annotations

import itertools
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import msgpack
import psutil

from db.files import make_folder, sync_folder

#: The columns of a batch of ticks, as the ingestor sends them to the writer.
COLUMNS = ("symbol", "ts", "bid", "ask", "volume", "source", "seq")


class Spool:
    """Batches the writer has not acknowledged: on disk while the disk takes them, else in memory.

    On disk, one msgpack file per batch (mode 0600), written under a temporary name that carries the
    writing process's pid, synced, then renamed into place: a crash or a full disk never leaves half a
    batch under a real name. A temporary file whose write failed is removed at once; those of a process
    that died mid-write are removed when a spool opens (:meth:`clean_stale`).

    When the disk refuses a batch (ENOSPC, EDQUOT, EROFS, EIO: any ``OSError``), it is held in memory
    instead, and moved to disk as soon as the disk takes it again (:meth:`flush_memory`). Memory is
    bounded by the ingestor: it stops reading its feed while :attr:`memory_full`, so at most
    ``memory_limit`` ticks plus the batches then in flight are held. Replaying a batch twice is
    harmless: (source, seq) is unique in the database."""

    PART_RE = re.compile(r"\.(\d+)\.part$")

    def __init__(self, folder: Path, memory_limit: int = 200_000) -> None:
        self.folder = folder
        self.memory_limit = memory_limit
        #: Batches the disk refused, by key, oldest first.
        self.memory: dict[int, dict[str, list[Any]]] = {}
        self.memory_ticks = 0
        #: The last error the disk gave (None once it takes batches again).
        self.disk_error: OSError | None = None
        self._keys = itertools.count()
        #: The files this object wrote and that are not settled yet (the others in the folder are an
        #: earlier run's, or another ingestor's).
        self.written: set[Path] = set()
        make_folder(folder)
        self.stale_removed = self.clean_stale()

    @staticmethod
    def name_of(columns: dict[str, list[Any]]) -> str:
        return f"ticks-{columns['source'][0]}-{columns['seq'][0]}-{len(columns['seq'])}.msgpack".replace("/", "_")

    def clean_stale(self) -> int:
        """Remove temporary files left by a process that died mid-write (or by versions that named
        them without a pid); those of a live process are its writes in progress. Returns how many."""
        removed = 0
        for path in self.folder.glob("*.part"):
            match = self.PART_RE.search(path.name)
            if match and int(match.group(1)) != os.getpid() and psutil.pid_exists(int(match.group(1))):
                continue
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def write(self, columns: dict[str, list[Any]], name: str) -> Path:
        """``columns`` as file ``name``, whole or not at all; raises OSError (nothing left behind)."""
        path = self.folder / name
        tmp = self.folder / f".{name}.{os.getpid()}.part"
        data = msgpack.packb(columns)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            sync_folder(self.folder)  # the batch's name, which its fsync does not keep
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self.written.add(path)
        return path

    def put(self, columns: dict[str, list[Any]]) -> Path | None:
        """Keep a batch: on disk (its path), or in memory (None) when the disk refuses it."""
        try:
            path = self.write(columns, self.name_of(columns))
        except OSError as e:
            self.disk_error = e
            self.memory[next(self._keys)] = columns
            self.memory_ticks += len(columns["seq"])
            return None
        self.disk_error = None
        return path

    def forget(self, key: int) -> None:
        """A batch held in memory was acknowledged (or moved to disk)."""
        columns = self.memory.pop(key, None)
        if columns is not None:
            self.memory_ticks -= len(columns["seq"])

    def settled(self, origin: Path | int) -> bool:
        """The writer answered a spooled batch for good (stored, or refused): drop it, from disk
        (its path) or from memory (its key). Whether this object kept it (False: a file of an
        earlier run, or of another ingestor)."""
        if isinstance(origin, Path):
            origin.unlink(missing_ok=True)
            if origin not in self.written:
                return False
            self.written.discard(origin)  # bounded by the files on disk, not by a run's length
            return True
        self.forget(origin)
        return True

    @property
    def memory_full(self) -> bool:
        return self.memory_ticks >= self.memory_limit

    def flush_memory(self, skip: Collection[int] = ()) -> int:
        """Move batches held in memory to disk, oldest first, until the disk refuses one; ``skip``
        those in flight. Returns how many ticks moved."""
        moved = 0
        for key, columns in list(self.memory.items()):
            if key in skip:
                continue
            try:
                self.write(columns, self.name_of(columns))
            except OSError as e:
                self.disk_error = e
                break
            self.disk_error = None
            moved += len(columns["seq"])
            self.forget(key)
        return moved

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("ticks-*.msgpack"))

    @staticmethod
    def load(path: Path) -> dict[str, list[Any]]:
        """A spooled batch; ValueError when the file is not one (damaged, or not ours)."""
        columns = msgpack.unpackb(path.read_bytes())
        if not (isinstance(columns, dict) and all(isinstance(columns.get(c), list) for c in COLUMNS)
                and columns["seq"] and len({len(columns[c]) for c in COLUMNS}) == 1):
            raise ValueError("not a batch of ticks")
        return columns
