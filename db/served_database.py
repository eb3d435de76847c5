"""Which database a home's writer writes, and whether this process's settings name the same one.

A shell with ``TICKSTACK_HOME`` set for a stack on PostgreSQL and no ``DATABASE_URL`` names the home's
SQLite file: ``db health`` reported that absent file and advised ``db init``, which made a stray SQLite
database in a PostgreSQL home (new users' runs, rounds 40 and 42). The rule is doctor's
(:func:`db.health.diagnose`); ``db health`` and ``db init`` refuse by it too.

A writer that does not answer (stopped, or waiting for a server that is down: no socket yet) says
nothing by a ping, and the rule went unapplied: ``db init`` still made the stray file. So the writer
records the database it writes in ``run/database`` at each start (:func:`record_database`), and the
rule falls back to that record (:func:`recorded_database`) when no writer answers.
"""
from __future__ import annotations

import os
from pathlib import Path

from db.config import Settings
from db.engine import display_url
from db.errors import WriterError
from db.run_records import read_record, write_record


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
    """Doctor's rule (:func:`home_database_finding`) for the commands that would act on the settings'
    database: the words of its failure when the home's writer (which writes ``served``; None: no
    writer answers, its record then) writes another kind of database, else None. ``db health``
    reported the home's absent SQLite file and advised ``db init``, which made a stray SQLite
    database in a PostgreSQL home."""
    found = home_database_finding(settings.run_dir, served, display_url(settings.database_url))
    return found[1] if found is not None and found[0] == "fail" else None


def home_database_finding(run_dir: Path, served: str | None, ours: str | None) -> tuple[str, str] | None:
    """:func:`other_database` for the home whose run folder is ``run_dir``: by what its writer answers
    (``served``), else, no writer answering, by what it recorded at its last start."""
    if served:
        return other_database(served, ours)
    return other_database(recorded_database(run_dir), ours, last=True)


#: The kinds of database a home may move between on purpose, as a person names them.
_KIND_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def other_database(served: str | None, ours: str | None, last: bool = False) -> tuple[str, str] | None:
    """Doctor's finding, given the database the home's writer writes (``served``; with ``last``, the
    one it recorded at its last start, no writer answering now) and the one this process's settings
    name (``ours``), both as :func:`db.engine.display_url` shows them."""
    if not served or not ours or served == ours:
        return None
    from sqlalchemy.engine import make_url

    try:
        theirs, mine = make_url(served), make_url(ours)
    except Exception:  # shown cut down (display_url): compare as written
        theirs = mine = None
    fix = ("set DATABASE_URL and DATABASE_READ_URL here as the stack's environment has them (the shell that "
           "ran `make run` or circusd), then run this again")
    writes = f"last wrote {served} (no writer answers now)" if last else f"writes {served}"
    if theirs is None or mine is None or theirs.get_backend_name() != mine.get_backend_name():
        if last:  # a home may move on purpose: its writer (make run's) records the move as it starts
            kind = _KIND_NAMES.get(mine.get_backend_name(), mine.get_backend_name()) if mine else "it"
            fix += f"; or, if the home moves to {kind} on purpose, start the stack on it with `make run`"
        return ("fail", f"This home's writer {writes}, but this process's settings name {ours}: {fix}. "
                        "Nothing else is checked: it would be about a database the stack does not use.")
    if theirs.get_backend_name() == "sqlite":
        same = Path(theirs.database or "").resolve() == Path(mine.database or "").resolve()
    else:
        same = (theirs.host, theirs.port, theirs.database) == (mine.host, mine.port, mine.database)
    return None if same else ("warn", f"This home's writer {writes}, but this process's settings name "
                                      f"{ours}: unless they are one database by two names, {fix}.")


# --- The writer's record ----------------------------------------------------------------------------

#: In ``$TICKSTACK_HOME/run``: the database this home's writer wrote at its last start, its URL as
#: :func:`db.engine.display_url` shows it (never the password), on one line.
RECORD_FILE = "database"


def record_database(settings: Settings) -> None:
    """Said by the writer at each start, once it holds the home's writer lock: the database it writes,
    whole and private (:func:`db.run_records.write_record`). A record that cannot be written (a full
    disk) is removed rather than left naming another database; the writer starts all the same."""
    path = settings.run_dir / RECORD_FILE
    if not write_record(path, display_url(settings.database_url) + "\n"):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def recorded_database(run_dir: Path) -> str | None:
    """The database the home's writer recorded at its last start, or None: no record, or not one line
    naming a URL (:func:`db.run_records.read_record` reads it: a broken file never stops ``db health``
    or doctor)."""
    found = read_record(run_dir / RECORD_FILE)
    words = found[0].strip() if found is not None else ""
    if not words or "\n" in words or "://" not in words:
        return None
    try:
        return display_url(words)  # a record edited by hand shows no password either
    except Exception:
        return None
