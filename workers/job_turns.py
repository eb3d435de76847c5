"""The locks a jobs worker holds while it can (:meth:`workers.jobs.JobsWorker._holds`): the database's
jobs leadership (:class:`db.leader.Leadership`), or this home's metrics lock (:class:`HomeLock`), each
in a :class:`Turn` with the words of its log lines."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from db.leader import Leadership
from db.lock import PidLock, read_lock_holder


class HomeLock:
    """This home's :data:`workers.jobs.METRICS_LOCK`, a :class:`db.lock.PidLock` with the calls of a
    :class:`db.leader.Leadership` that :meth:`workers.jobs.JobsWorker._holds` makes."""

    def __init__(self, path: Path) -> None:
        self.lock = PidLock(path)
        self.lost: str | None = None

    @property
    def held(self) -> bool:
        return self.lock.fd is not None

    def still_held(self) -> bool:
        if self.lock.still_ours():
            return True
        self.lost = f"{self.lock.path} was removed or replaced"
        self.lock.release()
        return False

    def attempt(self) -> str | None:
        """None when taken now, else who holds it (or why nobody can be told), in words."""
        try:
            if self.lock.try_acquire():
                return None
            return f"pid {read_lock_holder(self.lock.path) or 'unknown'}"
        except OSError as e:  # a folder in its place, no run/ yet: said once, tried again
            return f"nobody: cannot use {self.lock.path}: {e.strerror or e}"

    def release(self) -> None:
        self.lock.release()


@dataclass
class Turn:
    """A lock a jobs worker holds while it can (:meth:`workers.jobs.JobsWorker._holds`): the jobs leadership, or
    this home's metrics lock, with the words of its log lines and what the worker knows of it."""

    lock: Leadership | HomeLock
    #: Said when it is taken, lost (``%s``: why), held by another (``%s``: who), unusable (``%s``: why).
    taken: str
    lost: str
    holder: str
    unusable: str
    tried_at: float = 0.0  # monotonic s
    said: str | None = None  # who holds it (or why it cannot be used), as last said
