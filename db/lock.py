"""The writer lock: what makes "exactly one writer" a fact, not a hope.

An exclusive ``flock`` on a file beside the database, holding the holder's
pid. The kernel drops it when the holder dies, however it dies, so a killed
writer never leaves a stale lock behind. Anything that writes the database
(the writer, ``python -m db init``) holds it while it does.
"""
from __future__ import annotations

import fcntl
import os


class WriterLocked(RuntimeError):
    """Another writer holds the lock; the message names its pid."""


class WriterLock:
    """An exclusive ``flock`` on a file beside the database, holding the pid.

    The kernel drops the lock when its holder dies, however it dies, so a
    killed writer never leaves a stale lock behind.
    """

    def __init__(self, path: os.PathLike[str] | str) -> None:
        self.path = os.fspath(path)
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WriterLocked(f"another writer (pid {holder}) holds {self.path}; refusing to start a second "
                               "one, since exactly one process may write the database") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def read_lock_holder(path: os.PathLike[str] | str) -> int | None:
    """The pid of the writer holding the lock at ``path``, or None."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
