"""Which database a home's writer writes, and whether this process's settings name the same one.

A shell with ``TICKSTACK_HOME`` set for a stack on PostgreSQL and no ``DATABASE_URL`` names the home's
SQLite file: ``db health`` reported that absent file and advised ``db init``, which made a stray SQLite
database in a PostgreSQL home (new users' runs, rounds 40 and 42). The rule is doctor's
(:func:`db.health.diagnose`); ``db health`` and ``db init`` refuse by it too.
"""
from __future__ import annotations

import os
from pathlib import Path

from db.config import Settings
from db.engine import display_url
from db.errors import WriterError


def served_database(settings: Settings, timeout: float = 1.0) -> str | None:
    """The database the home's writer writes, as its ping says it (its URL without the password), or
    None: no writer answers there (no socket: not asked at all)."""
    from db.client import WriterClient

    endpoint = settings.writer_endpoint
    if endpoint.startswith("ipc://") and not os.path.exists(endpoint[len("ipc://"):]):
        return None
    client = WriterClient(settings=settings, deadline=timeout)
    try:
        return client.ping(timeout=timeout).get("database")
    except WriterError:
        return None
    finally:
        client.close()


def wrong_database_refusal(settings: Settings, served: str | None) -> str | None:
    """Doctor's rule (:func:`other_database`) for the commands that would act on the settings'
    database: the words of its failure when the home's writer (which writes ``served``) writes
    another kind of database, else None. ``db health`` reported the home's absent SQLite file and
    advised ``db init``, which made a stray SQLite database in a PostgreSQL home."""
    found = other_database(served, display_url(settings.database_url))
    return found[1] if found is not None and found[0] == "fail" else None


def other_database(served: str | None, ours: str | None) -> tuple[str, str] | None:
    """The finding of :func:`_other_database`, given the database the home's writer writes (``served``)
    and the one this process's settings name (``ours``), both as :func:`db.engine.display_url` shows them."""
    if not served or not ours or served == ours:
        return None
    from sqlalchemy.engine import make_url

    try:
        theirs, mine = make_url(served), make_url(ours)
    except Exception:  # shown cut down (display_url): compare as written
        theirs = mine = None
    fix = ("set DATABASE_URL and DATABASE_READ_URL here as the stack's environment has them (the shell that "
           "ran `make run` or circusd), then run this again")
    if theirs is None or mine is None or theirs.get_backend_name() != mine.get_backend_name():
        return ("fail", f"This home's writer writes {served}, but this process's settings name {ours}: {fix}. "
                        "Nothing else is checked: it would be about a database the stack does not use.")
    if theirs.get_backend_name() == "sqlite":
        same = Path(theirs.database or "").resolve() == Path(mine.database or "").resolve()
    else:
        same = (theirs.host, theirs.port, theirs.database) == (mine.host, mine.port, mine.database)
    return None if same else ("warn", f"This home's writer writes {served}, but this process's settings name "
                                      f"{ours}: unless they are one database by two names, {fix}.")
