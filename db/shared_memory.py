"""Readers of an SQLite file kept on the file the writer uses after its ``-shm`` file is replaced.

SQLite's WAL mode keeps its index of the WAL in ``<database>-shm``, which every connection of a
process to one database shares: one map, per process, for as long as any of them is open. When the
``-wal`` and ``-shm`` files are removed under a running stack (``rm tickstack.db-wal
tickstack.db-shm``, an old remedy for "database is locked"), the connections open at that moment
keep the removed map, which no writer updates any more, and with it their page cache: every read
of that process then returns the database as it was at the removal, for as long as the process
lives, whatever the new writer stores (``workers.write_connection`` saves what the old one
acknowledged, and the writer starts again with files of its own).

:func:`watch` makes a read engine notice it: at each checkout it compares what the ``-shm`` path
names (one ``stat``) with what it named before. When it names another file, or none, or one again,
every connection made before is closed at its next checkout (SQLAlchemy connects a new one), and
until no removed ``-shm`` of the database is mapped in this process any more (``/proc/self/maps``:
a connection another thread had checked out, or one made while such a connection was open, shares
the old map), every connection is closed as it comes back to its pool. A read or two may be of the
old map meanwhile; none after.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError

log = logging.getLogger("tickstack.db")

#: Per database file: what its ``-shm`` path named when last looked at (device, inode; None: no
#: file), the generation of its connections (bumped when it changes), and whether a removed map of it
#: may still be held in this process.
_state: dict[Path, dict[str, Any]] = {}
_lock = threading.Lock()


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file ``path`` names; None when it names none. Raises other OSErrors."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def removed_map_held(shm: Path) -> bool:
    """Whether this process maps a removed ``shm`` (``/proc/self/maps`` says "(deleted)"); False
    where there is no ``/proc``."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any(line.rstrip("\n").endswith(f"{shm} (deleted)") for line in maps)
    except OSError:
        return False


def watch(engine: Engine, database: Path) -> None:
    """Keep ``engine``'s connections to the SQLite file ``database`` on its current ``-shm`` file
    (see the module's docstring)."""
    database = database.resolve()
    shm = database.with_name(f"{database.name}-shm")

    @event.listens_for(engine, "connect")
    def _on_connect(_dbapi_conn: Any, record: Any) -> None:
        with _lock:
            record.info["shm_generation"] = _state.get(database, {}).get("generation", 0)

    @event.listens_for(engine, "checkout")
    def _on_checkout(_dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        try:
            now = file_identity(shm)
        except OSError:  # cannot tell (no right to look): the connection is used as it is
            return
        with _lock:
            state = _state.setdefault(database, {"named": now, "generation": 0, "suspect": False})
            if state["named"] != now:
                # The fault is a removed map still held here. Else it is SQLite's own doing: made by the
                # first writer since this process started, or removed by a writer's last close (when no
                # connection had the database open) and made again by the next.
                held = removed_map_held(shm)
                said = log.warning if held else log.info
                said("%s was %s: this process's connections to the database are replaced by connections that "
                     "read the files in place", shm.name,
                     "removed or replaced under them" if held else "made again")
                state.update(named=now, generation=state["generation"] + 1, suspect=held)
            if state["suspect"] and not removed_map_held(shm):
                state["suspect"] = False
            stale = record.info.get("shm_generation") != state["generation"]
        if stale:  # SQLAlchemy closes it and connects again, the new one of this generation
            raise DisconnectionError(f"{shm.name} was replaced: a new connection reads the file in place")

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        with _lock:
            suspect = _state.get(database, {}).get("suspect", False)
        if suspect:  # it may hold, or share, the removed map: closed, so that the map goes
            record.invalidate()
