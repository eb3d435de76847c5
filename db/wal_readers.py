"""Which processes hold SQLite's WAL back: those in a read transaction on the database.

For the whole of a read transaction, an SQLite reader in WAL mode holds a shared lock on one of five
read-mark bytes of the ``-shm`` file (SQLite's ``WAL_READ_LOCK(i)``, byte 120 + 3 + i, i from 0 to
4): with i = 0 it reads the database file alone, and a checkpoint may not copy the WAL into it (the
checkpointer needs that byte alone); with any other it reads the WAL up to a frame, and a checkpoint
may not restart the WAL past it. Either way the WAL grows while the transaction lasts. A process that
has the database open between transactions holds none of these bytes. Linux lists every such lock with
its owner's pid in ``/proc/locks``, so ``db doctor`` can name the processes that keep the WAL from
shrinking, not every process that has the database open (all of the stack's readers).

``/proc/locks`` names a file by its file system's device (its superblock's, as ``/proc/self/mountinfo``
does), which is not always the device ``stat()`` gives it: on overlayfs over two file systems (a
container's) and on a btrfs subvolume each has a number of its own. Both are looked for.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

#: The read-mark bytes, first and last: WALINDEX_LOCK_OFFSET (120) + 3 + i, i from 0 to 4.
WAL_READ_MARKS = (123, 127)
#: The byte every connection with the WAL index open holds a shared lock on (SQLite's WAL_DMS,
#: 120 + 8): a process opening the database that finds it unlocked rebuilds the index.
WAL_CONNECTED = 128


def pids_in_read_transactions(shm: Path, locks: Path = Path("/proc/locks")) -> set[int] | None:
    """Pids of the processes in a read transaction on the database whose ``-shm`` file is ``shm``
    (the writer's own among them while it writes); None when that cannot be known (no such file, no
    ``/proc/locks``)."""
    return pids_locking(shm, *WAL_READ_MARKS, locks=locks)


def pids_locking(shm: Path, first: int, last: int, locks: Path = Path("/proc/locks")) -> set[int] | None:
    """Pids of the processes holding a POSIX lock on bytes ``first`` to ``last`` of ``shm`` (e.g.
    SQLite's "connected" byte, :data:`WAL_CONNECTED`); None when that cannot be known."""
    try:
        info = os.stat(shm)
        text = locks.read_text()
    except OSError:
        return None
    # "12: POSIX  ADVISORY  READ 4321 fe:00:2149747 124 124" (a waiting request reads "12: -> POSIX ...").
    file_ids = {f"{device}:{info.st_ino}" for device in (_device(info.st_dev), _mount_device(shm)) if device}
    pids: set[int] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 8 or fields[1] != "POSIX" or fields[5] not in file_ids:
            continue
        try:
            pid, start = int(fields[4]), int(fields[6])
            end = last if fields[7] == "EOF" else int(fields[7])
        except ValueError:
            continue
        if start <= last and end >= first:
            pids.add(pid)
    return pids


def _device(dev: int) -> str:
    """A device number as ``/proc/locks`` prints it: major and minor in hexadecimal."""
    return f"{os.major(dev):02x}:{os.minor(dev):02x}"


def _mount_device(path: Path) -> str | None:
    """The device of the file system mounted where ``path`` is (the last mounted of the deepest mount
    point above it), as ``/proc/locks`` prints it; None when ``/proc/self/mountinfo`` cannot be read."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    deepest, device = "", None
    for line in lines:  # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw": the device, then where
        fields = line.split()
        if len(fields) < 5:
            continue
        # Its spaces, tabs, newlines and backslashes written in octal ("\040").
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(deepest):
            deepest, device = point, fields[2]
    try:
        major, minor = (int(n) for n in (device or "").split(":"))
    except ValueError:
        return None
    return _device(os.makedev(major, minor))
