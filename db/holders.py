"""Who holds an SQLite database's files open, by pid, and in what role (doctor's process list, the
console's database page, and ``db restore``'s check that nothing has the database open).

This is what replaces the seed's "stop all Python processes": instead of killing by name, it names
each process that has the database, its WAL or its ``-shm`` open, and flags any that is neither the
writer nor a known reader, and any that opened the database for writing behind the writer's back
(the only way left to get "database is locked").
"""
from __future__ import annotations

import os
from pathlib import Path

import psutil

from db.files import database_files

#: Modules whose processes are ours: a process running one of them with the
#: database open is a known reader.
OUR_MODULES = ("workers.", "webapp", "db", "bench", "circus", "gunicorn", "pytest")

#: The roles :func:`holders` flags: the cause of lock errors, and what is not ours.
FLAGGED = ("rogue-writer", "unknown")


def holders(path: Path, lock_pid: int | None, home: Path, known_pids: set[int] | None = None,
            lock_command: str | None = None) -> list[dict]:
    """Every process (that we may inspect) holding the database files open.

    ``lock_pid`` holds the writer lock, and ``lock_command`` is what it is when it is not a writer
    (:func:`db.lock.holder_command`, as the caller read it for its own words). ``role`` is ``writer``
    (that pid, a writer), ``lock-holder`` (that pid, but not a writer: ``python -m db restore`` holds
    the lock while it replaces the database), ``reader`` (ours, read-only), ``rogue-writer``
    (opened the database for writing but is not the writer: the cause of lock errors) or ``unknown``
    (not ours).
    """
    # By real path: /proc names a file so, and a home reached through a symbolic link names it otherwise.
    wanted = {os.path.realpath(p): kind for kind, p in database_files(path).items()}
    known_pids = known_pids or set()
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            files = [f for f in proc.open_files() if f.path in wanted]
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if not files:
            continue
        writes_db = any(wanted[f.path] == "db" and f.mode != "r" for f in files)
        # One line whatever its arguments hold (``python -c`` with a program of several lines).
        cmdline = " ".join(" ".join(arg.split()) for arg in proc.info["cmdline"] or [])
        if proc.pid == lock_pid:
            role = "writer" if lock_command is None else "lock-holder"
        elif writes_db:
            role = "rogue-writer"
        elif proc.pid in known_pids or proc.pid == os.getpid() or _is_ours(proc, cmdline, home):
            role = "reader"
        else:
            role = "unknown"
        found.append({"pid": proc.pid, "name": proc.info["name"], "cmdline": cmdline[:300], "role": role,
                      "files": sorted({wanted[f.path] for f in files}), "flagged": role in FLAGGED})
    return sorted(found, key=lambda h: h["pid"])


def _is_ours(proc: psutil.Process, cmdline: str, home: Path) -> bool:
    try:
        if proc.environ().get("TICKSTACK_HOME") and Path(proc.environ()["TICKSTACK_HOME"]).absolute() == home:
            return True
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        pass
    return any(f"-m {m}" in cmdline for m in OUR_MODULES)
