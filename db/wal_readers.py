"""Which processes hold SQLite's WAL back: those in a read transaction on the database.

For the whole of a read transaction, an SQLite reader in WAL mode holds a shared lock on one of five
read-mark bytes of the ``-shm`` file (SQLite's ``WAL_READ_LOCK(i)``, byte 120 + 3 + i, i from 0 to
4): with i = 0 it reads the database file alone, and a checkpoint may not copy the WAL into it (the
checkpointer needs that byte alone); with any other it reads the WAL up to a frame, and a checkpoint
may not restart the WAL past it. Either way the WAL grows while the transaction lasts. A process that
has the database open between transactions holds none of these bytes. Linux lists every such lock with
its owner's pid in ``/proc/locks``, so ``db doctor`` can name the processes that keep the WAL from
shrinking, not every process that has the database open (all of the stack's readers).
"""
from __future__ import annotations

import os
from pathlib import Path

#: The read-mark bytes, first and last: WALINDEX_LOCK_OFFSET (120) + 3 + i, i from 0 to 4.
WAL_READ_MARKS = (123, 127)


def pids_in_read_transactions(shm: Path, locks: Path = Path("/proc/locks")) -> set[int] | None:
    """Pids of the processes in a read transaction on the database whose ``-shm`` file is ``shm``
    (the writer's own among them while it writes); None when that cannot be known (no such file, no
    ``/proc/locks``)."""
    try:
        info = os.stat(shm)
        text = locks.read_text()
    except OSError:
        return None
    # "12: POSIX  ADVISORY  READ 4321 fe:00:2149747 124 124" (a waiting request reads "12: -> POSIX ...").
    file_id = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    first, last = WAL_READ_MARKS
    pids: set[int] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 8 or fields[1] != "POSIX" or fields[5] != file_id:
            continue
        try:
            pid, start = int(fields[4]), int(fields[6])
            end = last if fields[7] == "EOF" else int(fields[7])
        except ValueError:
            continue
        if start <= last and end >= first:
            pids.add(pid)
    return pids
