"""A writer that waits for its database server says so in a file: ``run/writer.server-wait``.

A PostgreSQL writer whose server does not answer at its start waits for it (up to
:data:`db.lock.SERVER_WAIT_S`) before it serves. circusd's readiness hooks
(:mod:`supervision.hooks`) wait for the writer to answer on circusd's own event loop, where no
command is answered meanwhile: they waited their whole timeouts for a writer that could not answer
before the server did (40 s at a start with the server down, ``circusctl status`` unanswered). This
file tells them at once that the writer runs and waits for its server, and why, so they stop
waiting for it: they read it (no connection, nothing that can block), the writer writes it.

The file holds the writer's pid and its reason in one JSON object (the server's URL without its
password, libpq's words); it is written whole (a new file renamed over the old one), under the
writer's umask (0600), and removed once the writer got past its wait. A writer killed meanwhile
leaves it: it counts only for a process of that pid that started before it was written.
"""
from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path

#: In ``$TICKSTACK_HOME/run``, beside the writer lock of a PostgreSQL stack.
FILE_NAME = "writer.server-wait"


def wait_file(run_dir: Path) -> Path:
    """Where the writer of the stack whose run folder is ``run_dir`` says it waits for its server."""
    return run_dir / FILE_NAME


def say_waiting(path: Path, reason: str) -> None:
    """Said by the writer at each failed try: this process waits for its server, because ``reason``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"pid": os.getpid(), "reason": reason}))
        os.replace(tmp, path)
    except OSError:  # the run folder gone or full: the hooks then wait their timeouts, as before
        tmp.unlink(missing_ok=True)


def done_waiting(path: Path) -> None:
    """Said by the writer once its wait is over, whichever way: the file goes if it is this process's."""
    if waiting_reason(path, (os.getpid(),)) is not None:
        path.unlink(missing_ok=True)


def waiting_reason(path: Path, pids: Collection[int]) -> str | None:
    """The reason one of ``pids`` (the writer's processes, as circus knows them) waits for its
    database server, or None: no file, another process's, or one written before that process started
    (its pid reused)."""
    try:
        mtime = path.stat().st_mtime
        said = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = said.get("pid") if isinstance(said, dict) else None
    if pid not in pids or not isinstance(said.get("reason"), str):
        return None
    try:
        import psutil

        if psutil.Process(pid).create_time() > mtime + 1:  # create_time is rounded to the clock tick
            return None
    except Exception:  # gone meanwhile
        return None
    return said["reason"]
