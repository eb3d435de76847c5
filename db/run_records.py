"""Small records our processes leave in ``$TICKSTACK_HOME/run`` for others to read: the writer's wait
for its server and its refused login (:mod:`db.server_wait`), the database it writes
(:mod:`db.served_database`). Written whole and private; read without trusting them.

Their readers run in circusd's own loop (a readiness hook that raises leaves a watcher stopped; a read
that blocks holds every circusctl command), in the API and in ``db`` commands. So a reader follows no
symlink (a FIFO or ``/dev/zero`` behind one), reads only a regular file of at most
:data:`MAX_RECORD_BYTES`, and any failure means "no record" (review of round 42: JSON nested past the
recursion limit raised out of a hook).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

#: The largest record (a line of libpq's, a URL): a larger file is not ours, and is not read.
MAX_RECORD_BYTES = 8192


def write_record(path: Path, text: str) -> bool:
    """``text`` into ``path`` whole (a new file renamed over the old one), 0600 whatever the umask;
    whether it was written (a run folder gone or full: not, and nothing is left half-written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)  # one a killed process of this pid left: O_EXCL makes it anew
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False


def read_record(path: Path) -> tuple[str, float] | None:
    """The text in ``path`` and when it was written (its mtime), or None: no such file, or anything
    but a regular file of at most :data:`MAX_RECORD_BYTES` of UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_RECORD_BYTES:
            return None
        return os.read(fd, MAX_RECORD_BYTES + 1).decode("utf-8"), info.st_mtime
    except Exception:  # unreadable, not UTF-8: not a record
        return None
    finally:
        os.close(fd)
