"""Files written whole under a name someone asked for (backups): private from the first byte, never
seen half-written, and never written over unless asked.

The part file is unique to its writer (two backups of one path at once each write their own, and
neither truncates or removes the other's), and the finished file takes its name in one step that
fails when the name is taken (a hard link): a check before the rename would leave the gap in which
another writer's file is silently replaced."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

#: What the part files beside a destination end with (hidden: a leading dot).
PART_SUFFIX = ".part"


def part_file(dest: Path) -> Path:
    """A new empty file, mode 0600, in ``dest``'s folder (made if missing), named
    ``.<dest's name>.<random>.part``: the caller writes into it, then :func:`put_in_place`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=PART_SUFFIX, dir=dest.parent)  # 0600
    os.close(fd)
    return Path(name)


def put_in_place(part: Path, dest: Path, *, overwrite: bool = False) -> None:
    """Give ``part`` the name ``dest``. Without ``overwrite``, FileExistsError when ``dest`` exists,
    decided by the link itself, so a file that took the name meanwhile stays as it is (``part`` is
    left for the caller to remove). A filesystem without hard links gets the rename after a check."""
    if overwrite:
        os.replace(part, dest)
        return
    try:
        os.link(part, dest)
    except FileExistsError:
        raise FileExistsError(f"{dest} exists; choose another path or pass --force") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if dest.exists():
            raise FileExistsError(f"{dest} exists; choose another path or pass --force") from None
        os.replace(part, dest)
        return
    part.unlink()
