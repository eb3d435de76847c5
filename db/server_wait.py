"""A writer that waits for its database server says so in a file: ``run/writer.server-wait``.

A PostgreSQL writer whose server does not answer at its start waits for it (up to
:data:`db.server_lock.SERVER_WAIT_S`) before it serves. circusd's readiness hooks
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
import re
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from db.config import Settings
from db.run_records import read_record, write_record

#: In ``$TICKSTACK_HOME/run``, beside the writer lock of a PostgreSQL stack.
FILE_NAME = "writer.server-wait"


def wait_file(run_dir: Path) -> Path:
    """Where the writer of the stack whose run folder is ``run_dir`` says it waits for its server."""
    return run_dir / FILE_NAME


def say_waiting(path: Path, reason: str) -> None:
    """Said by the writer at each failed try: this process waits for its server, because ``reason``."""
    _write_record(path, {"pid": os.getpid(), "reason": reason})


def done_waiting(path: Path) -> None:
    """Said by the writer once its wait is over, whichever way: the file goes if it is this process's."""
    if waiting_reason(path, (os.getpid(),)) is not None:
        path.unlink(missing_ok=True)


def waiting_reason(path: Path, pids: Collection[int]) -> str | None:
    """The reason one of ``pids`` (the writer's processes, as circus knows them) waits for its
    database server, or None: no file, another process's, or one written before that process started
    (its pid reused)."""
    record = _read_record(path)
    if record is None:
        return None
    said, mtime = record
    pid = said.get("pid")
    if type(pid) is not int or pid not in pids or not isinstance(said.get("reason"), str):
        return None
    try:
        import psutil

        if psutil.Process(pid).create_time() > mtime + 1:  # create_time is rounded to the clock tick
            return None
    except Exception:  # gone meanwhile
        return None
    return said["reason"]


def _write_record(path: Path, record: dict[str, Any]) -> None:
    """``record`` into ``path``, whole and private (:func:`db.run_records.write_record`). A run folder
    gone or full loses it: its readers then say what they said before it."""
    write_record(path, json.dumps(record))


def _read_record(path: Path) -> tuple[dict[str, Any], float] | None:
    """The JSON object in ``path`` and when it was written, or None (:func:`db.run_records.read_record`:
    no file, not a small regular one; here also not JSON, nested too deep, not an object)."""
    found = read_record(path)
    if found is None:
        return None
    try:
        said = json.loads(found[0])
    except Exception:  # not JSON, nested past the recursion limit: not a record
        return None
    return (said, found[1]) if isinstance(said, dict) else None


# --- A writer the server refused: its last words ----------------------------------------------------

#: In ``$TICKSTACK_HOME/run`` too: why this home's last writer could not start on its server, said by
#: the writer as it exits (a refused login; its host's writer lock held by another home's writer),
#: read by ``db doctor``, the clients (``/api/health``, the API's 503) and circus's flapping plugin,
#: which otherwise said only "the writer is not running: start it" (a new user's run with a wrong
#: password). Removed by the next writer that gets in, and by ``db prepare`` once the login works.
REFUSED_FILE = "writer.refused"


def refused_file(run_dir: Path) -> Path:
    """Where the writer of the stack whose run folder is ``run_dir`` says the server refused it."""
    return run_dir / REFUSED_FILE


def login_user(url: str, reason: str = "") -> str | None:
    """The role ``url`` logs in as: its user, else the one libpq's ``reason`` names (a URL without one
    logs in as PGUSER or the system user), else None. Never the password."""
    try:
        from sqlalchemy.engine import make_url

        user = make_url(url).username
    except Exception:  # unparsable: no name rather than a guess
        user = None
    if user:
        return user
    found = re.search(r'for user "([^"]*)"', reason)
    return found.group(1) if found else None


def sql_name(name: str) -> str:
    """``name`` as an SQL identifier in a statement given to paste: double-quoted, so that a role or a
    database named with capitals, spaces or a keyword (``"TS_Owner"``, ``"user"``) is the one meant
    (unquoted, PostgreSQL folds it to lower case, or refuses it)."""
    return '"' + name.replace('"', '""') + '"'


def login_refused(reason: str, variable: str, user: str | None, named: bool = True) -> tuple[str, str]:
    """(what, fix) for a login the server refused with libpq's ``reason``, as the role of ``variable``
    (``DATABASE_URL``): which login it refused (the user named, never the password) and what to set.
    Without the restart to do after: each caller says its own. ``named`` False: no role's or
    database's name in either, for what is served without a login (:func:`public_words`)."""
    said = reason.lower()
    who = f"{variable}'s login (user {user!r})" if user and named else f"{variable}'s login"
    role = sql_name(user) if user and named else "that_role"
    if "is not permitted to log in" in said:  # a role made without LOGIN (NOLOGIN: a group's role)
        fix = f"as a superuser: ALTER ROLE {role} LOGIN; or use a role that may log in in {variable}"
    elif "permission denied for database" in said:  # CONNECT revoked from PUBLIC, not granted to the role
        # The name as the server writes it: between double quotes, one inside it not doubled (a name
        # with one was read up to it, and the GRANT named another database); libpq's DETAIL follows.
        found = (re.search(r'permission denied for database "(.*)" DETAIL:', reason)
                 or re.search(r'permission denied for database "([^"]*)"', reason)) if named else None
        fix = (f"as the database's owner or a superuser: GRANT CONNECT ON DATABASE "
               f"{sql_name(found.group(1)) if found else 'that_database'} TO {role}")
    elif "does not exist" in said:
        fix = f"fix the user or the database name in {variable} (the role and the database must exist on the server)"
    elif "pg_hba.conf" in said:
        fix = (f"the server's pg_hba.conf has no entry letting that user in from here: add one (or use another "
               f"host in {variable})")
    else:  # a wrong password, or none supplied
        fix = f"fix the password in {variable} or in ~/.pgpass"
    return f"the database server refused {who}", fix


def say_refused(path: Path, url: str, reason: str) -> str:
    """Said by the writer as it exits for a login the server refused (libpq's ``reason``): written to
    ``path`` (the URL's user and a fix, never the password, nor libpq's words); returns the line to
    log, with the reason."""
    user = login_user(url, reason)
    what, fix = login_refused(reason, "DATABASE_URL", user)
    _write_record(path, {"pid": os.getpid(), "at": time.time(), "kind": "login", "user": user, "what": what,
                         "fix": fix, "public_fix": login_refused(reason, "DATABASE_URL", user, named=False)[1]})
    return f"{what} ({reason}): {fix}"


def say_host_taken(path: Path, host: str) -> None:
    """Said by the writer as it exits because the server's writer lock for its ``host`` (``TICKSTACK_HOST``)
    is held by a stack of another home: the clients of this one said "no writer is running: start the
    stack" to a stack that runs (a review, round 42). Its own words are in its log; this is for the
    readers of :func:`last_refusal`."""
    _write_record(path, {"pid": os.getpid(), "at": time.time(), "kind": "host", "user": None,
                         "what": f"the database's writer lock for host {host!r} is held by the writer of another "
                                 "home (another stack with the same TICKSTACK_HOST)",
                         "fix": HOST_TAKEN_FIX, "public_fix": HOST_TAKEN_FIX})


def clear_refused(path: Path, only_logins: bool = False) -> None:
    """Said by a writer that reached its server, whether it got in or the server did not answer (and
    by ``db prepare`` once the login works, ``only_logins``: a login that works says nothing of its
    host's writer lock, which another home's writer may hold still): the last refusal is no longer the
    news."""
    if only_logins:
        found = _read_record(path)
        if found is not None and found[0].get("kind", "login") != "login":
            return
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def last_refusal(settings: Settings) -> dict[str, Any] | None:
    """What this home's last writer said as its PostgreSQL server refused its login, or as it found its
    host's writer lock taken (``kind``: ``login`` or ``host``; ``what``, ``fix``, ``public_fix``,
    ``user``, ``at``: seconds since the epoch), or None: on SQLite always (a file left from
    before the home moved to SQLite is about a server it no longer has), no file, or not a record."""
    if settings.database_path is not None:
        return None
    record = _read_record(refused_file(settings.run_dir))
    if record is None:
        return None
    said = record[0]
    if not all(isinstance(said.get(k), str) for k in ("what", "fix")) or not isinstance(said.get("at"), (int, float)) \
            or not 0 <= said["at"] < 1e11:  # NaN, or past what a message can show as a date (year 5138)
        return None
    return said


#: What a caller that may not name the role says (``/api/health``, the API's 503: no login).
REFUSED_PUBLIC = "the database server refused the writer's login"
#: The same for a writer that found its host's writer lock taken (:func:`say_host_taken`).
HOST_TAKEN_PUBLIC = "a stack of another home with the same TICKSTACK_HOST holds this database's writer lock"
HOST_TAKEN_FIX = "give this stack its own TICKSTACK_HOST (or stop that stack's writer)"


def public_words(said: dict[str, Any]) -> tuple[str, str | None]:
    """(what, fix) of a :func:`last_refusal` record for a caller that may name no role nor database:
    the fix None when the record has none that names nothing (one written before they had one)."""
    what = HOST_TAKEN_PUBLIC if said.get("kind") == "host" else REFUSED_PUBLIC
    fix = said.get("public_fix")
    return what, fix if isinstance(fix, str) else None
