"""Put an SQLite backup in the database's place (``python -m db restore BACKUP``), with the stack stopped.

The steps a person would take by hand, each with its trap closed: the backup is checked first
(an SQLite file that passes ``integrity_check`` and holds tickstack's schema); nothing may have the
database open (the writer's lock is taken, so no writer starts meanwhile, and no reader may hold the
old file: it would go on reading it); the copy is made beside the database under a private part
name before anything is moved; the database and its WAL and shared-memory files are moved aside
together (kept, under ``.replaced-<UTC time>``: a WAL left beside the restored file would be
replayed into it, pages of another database), and the copy takes the name. On PostgreSQL, a
``.dump`` is restored with ``pg_restore`` (README).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from db.backups import copy_database, list_backups, replaced_copy
from db.circusd import circusctl_command
from db.config import Settings, ensure_home
from db.engine import connect_read_only
from db.errors import MaintenanceFailed
from db.files import (
    discard_part,
    folder_not_there,
    make_folder,
    orphaned_journal,
    part_file,
    put_in_place,
    restore_marker,
    sync_folder,
    unfinished_restore,
)
from db.health import integrity_check
from db.holders import holders
from db.lock import WriterLock, WriterLocked, lock_holder_words

#: The database's companions that move with it (SQLite names them after it).
COMPANIONS = ("-wal", "-shm")


def check_backup(source: Path) -> None:
    """ValueError unless ``source`` is an SQLite file that passes ``integrity_check`` and holds
    tickstack's schema (``schema_version``)."""
    if not source.is_file():
        raise ValueError(f"{source}: no such file" if not source.exists() else f"{source} is not a file")
    try:
        check = integrity_check(source)
        con = connect_read_only(source)
        try:
            ours = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                               "AND name = 'schema_version'").fetchone()
        finally:
            con.close()
    except sqlite3.Error as e:
        if (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_CORRUPT:  # ours, rotted: not "not one"
            raise ValueError(f"{source} is damaged: SQLite cannot read it ({e})") from None
        with open(source, "rb") as f:
            if f.read(5) == b"PGDMP":  # the jobs worker's backup on PostgreSQL
                raise ValueError(f"{source} is a PostgreSQL dump (pg_dump -Fc): this stack's database is an SQLite "
                                 "file, which takes .db backups; a stack on PostgreSQL restores a .dump with the same "
                                 "command") from None
        raise ValueError(f"{source} is not an SQLite database that can be read ({e})") from None
    if check != ["ok"]:
        raise ValueError(f"{source} is damaged: its integrity check finds {'; '.join(check[:3])}")
    if ours is None:
        raise ValueError(f"{source} is an SQLite database, but not tickstack's (no schema_version table)")


def _refuse_if_open(settings: Settings, path: Path) -> None:
    """ValueError naming every other process that holds the database (or its WAL) open."""
    open_by = [h for h in holders(path, None, settings.home) if h["pid"] != os.getpid()]
    if open_by:
        who = ", ".join(f"pid {h['pid']} ({h['cmdline'][:60] or h['name']})" for h in open_by)
        raise ValueError(f"{path} is open in {who}: it would go on with the old file; stop it first "
                         f"(`{circusctl_command(settings.circus_endpoint, 'quit')}` stops the stack)")


def _backup_before(settings: Settings, source: Path) -> Path | None:
    """The SQLite backup of the backups folder just older than ``source`` (:func:`list_backups`'s
    order), when ``source`` is one of them; else None."""
    found = [p for p in list_backups(settings.backup_dir) if p.suffix == ".db"]
    names = [p.name for p in found]
    if source.parent.resolve() != settings.backup_dir.resolve() or source.name not in names:
        return None
    at = names.index(source.name)
    return found[at - 1] if at > 0 else None


#: Tables whose ids a client or a consumer holds, and whose counters came with schema v5 (before it,
#: a plain rowid: the highest id is all a replaced database says of what it gave).
ROWID_TABLES = ("trades", "trade_events")


def _ids_given(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """What the database at ``path`` (read with its WAL) gave out: its AUTOINCREMENT counters
    (``sqlite_sequence``, by table) and the highest id of each of :data:`ROWID_TABLES` it has (0:
    none); ({}, {}) without the file. sqlite3.Error when it cannot be read (a damaged file)."""
    if not path.exists():
        return {}, {}
    con = connect_read_only(path)
    try:
        tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        counters = {name: seq for name, seq in con.execute("SELECT name, seq FROM sqlite_sequence")
                    if isinstance(name, str) and isinstance(seq, int)} if "sqlite_sequence" in tables else {}
        tops = {name: con.execute(f"SELECT max(id) FROM {name}").fetchone()[0] or 0
                for name in ROWID_TABLES if name in tables}
        return counters, tops
    finally:
        con.close()


def _trades_reopened(replaced: Path, restored: Path) -> list[int]:
    """The ids of the trades open in ``restored`` (the backup's copy) that the database at ``replaced``
    (read with its WAL) has closed: the restore puts them back open. sqlite3.Error when either
    cannot be read."""
    if not replaced.exists():
        return []
    opened = _trade_ids(restored, "SELECT id FROM trades WHERE status = 'open' ORDER BY id")
    if not opened:
        return []
    return _trade_ids(replaced, "SELECT t.id FROM json_each(?) o JOIN trades t ON t.id = o.value "
                                "WHERE t.status = 'closed' ORDER BY t.id", (json.dumps(opened),))


def _trade_ids(path: Path, sql: str, params: tuple = ()) -> list[int]:
    """The ids ``sql`` selects in the database at ``path``; none when it has no ``trades`` table."""
    con = connect_read_only(path)
    try:
        if con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'trades'").fetchone() is None:
            return []
        return [i for (i,) in con.execute(sql, params)]
    finally:
        con.close()


def _continue_ids(copy: Path, counters: dict[str, int]) -> dict[str, int]:
    """Raise the counters of ``copy`` (the backup's copy, not in place yet) to ``counters`` where they
    are lower, for its tables of those names; returns those raised. A backup's counters are the
    backup's: the tick ids the replaced database gave after it were given again to new ticks, and
    tick ids never go back (a consumer resumes from the last one it processed)."""
    con = sqlite3.connect(copy)
    try:
        tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        have = dict(con.execute("SELECT name, seq FROM sqlite_sequence").fetchall()) \
            if "sqlite_sequence" in tables else {}
        raised = {name: seq for name, seq in counters.items() if name in tables and seq > (have.get(name) or 0)}
        with con:
            for name, seq in raised.items():
                if name in have:
                    con.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = ?", (seq, name))
                else:
                    con.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (name, seq))
        return raised
    finally:
        con.close()


#: What asks a restore to stop: Ctrl-C, and (``python -m db restore`` makes them Ctrl-C) SIGTERM and SIGHUP.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """:data:`STOP_SIGNALS` held back inside: one that comes meanwhile is noted and sent again once
    what the block holds is done, to the handler there was (Python runs handlers in the main thread
    whatever thread the kernel gave the signal to: a mask would not hold them). Outside the main
    thread, where no handler can be set, nothing is held: only the main thread takes them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    asked: list[int] = []
    # One ignored (SIGHUP under nohup, SIGINT in a background job) stays so: noted, it was sent again
    # to SIG_IGN in place of a stop that came after it.
    previous = {sig: handler for sig in STOP_SIGNALS if (handler := signal.getsignal(sig)) is not signal.SIG_IGN}
    for sig in previous:
        signal.signal(sig, lambda signum, _frame: asked.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if asked:
            signal.raise_signal(asked[0])


def _swap(path: Path, copy: Path, aside: Path) -> bool:
    """Move the database and its companions aside as ``aside`` and give ``copy`` its name. Two files
    (the database and its WAL) cannot change names in one step, so a mark is left beside it for the
    moves (:func:`db.files.restore_marker`, synced before the first): a restore killed between them
    (SIGKILL, a power cut) left no database, and the next writer started a new, empty one without a
    word; the writer, ``db init``, doctor and this restore now say how to finish. An exception
    (an error, Ctrl-C) moves them back. Whether there was a database to move aside."""
    marker = restore_marker(path)
    if os.path.lexists(path):  # none (a new machine's): killed before the copy takes the name, none still
        part = part_file(marker)
        with open(part, "w", encoding="utf-8") as f:
            f.write(f"{copy}\n{aside}\n")
        put_in_place(part, marker, overwrite=True)  # synced, its name too: before anything is moved
    moved: list[str] = []
    try:
        for suffix in ("", *COMPANIONS):  # the database first: the others are nothing without it
            if Path(f"{path}{suffix}").exists():
                os.replace(f"{path}{suffix}", f"{aside}{suffix}")
                moved.append(suffix)
        put_in_place(copy, path)  # syncs the folder, the moves aside with it
        return "" in moved  # a WAL without its database (moved or removed) is no database
    except BaseException:
        for suffix in moved:  # back as they were
            os.replace(f"{aside}{suffix}", f"{path}{suffix}")
        sync_folder(path.parent)
        raise
    finally:
        if os.path.lexists(path):  # the old database or the new one: the mark says nothing any more
            marker.unlink(missing_ok=True)
            sync_folder(path.parent)


def restore(settings: Settings, source: Path, done: threading.Event | None = None) -> dict[str, Any]:
    """Replace the SQLite database with ``source`` (see the module docstring); returns ``restored``,
    ``source``, ``replaced`` (where the replaced database is kept, None when there was none),
    ``bytes``, ``ids_continued`` (the id counters raised to the replaced database's, by table: no tick
    id it gave is given again), ``ids_unread`` (why its ids could not be read, else None) and
    ``trades_lost`` (the first and last id of the trades it had and the backup has not, else None:
    their ids are not given again either; a backup older than schema v5 gets its trades counter
    from them, which the writer's migration keeps) and ``trades_reopened`` (the ids of the trades it
    had closed and the backup has open; why their states could not be read, a string, when its ids
    could). ``done`` is set once the backup has the database's name (a stop asked for in the swap is
    taken after it: the caller's words on a stop go by it).
    Raises ValueError (what is in the way, said) or MaintenanceFailed."""
    if settings.database_path is None:
        raise ValueError("restore puts an SQLite backup in place; a PostgreSQL .dump goes back with "
                         "db.server_restore.restore_dump (python -m db restore FILE.dump)")
    # The file SQLite opens: a symbolic link's, on its disk, its WAL beside it; the link stays.
    named = Path(os.path.abspath(settings.database_path))
    path = Path(os.path.realpath(named))
    source = Path(source).absolute()
    if source.exists() and source.resolve() in {Path(f"{path}{s}").resolve() for s in ("", *COMPANIONS)}:
        raise ValueError(f"{source} is the database itself; give a backup's path")
    try:
        check_backup(source)
    except ValueError as e:  # doctor names the latest backup only: when it is unusable, which one next
        older = _backup_before(settings, source)
        raise ValueError(f"{e}; restore the backup before it: `python -m db restore {shlex.quote(str(older))}`"
                         if older else str(e)) from None
    ensure_home(settings)  # a new machine's: restored into before anything ran there
    # Made by its name, as the writer makes it; by the file a link names, it was made wherever its
    # parent was (a disk not mounted: below the mount point), and the backup restored there.
    refused = folder_not_there(named)
    if refused is not None:
        raise ValueError(refused)
    make_folder(named.parent)  # a DATABASE_URL's folder elsewhere (a new machine's)
    lock = WriterLock(settings.writer_lock_path)
    try:
        lock.acquire()
    except WriterLocked:  # its words are a second writer's ("refusing to start a second one"): not a restore's
        holder, command = lock_holder_words(settings.writer_lock_path)
        if command is not None:  # another restore, most likely: not the writer, and no stack to stop
            raise ValueError(f"`{command}` (pid {holder}) holds the writer lock {settings.writer_lock_path}: "
                             "restore once it has ended") from None
        raise ValueError(f"the writer is running (pid {holder or 'unknown'}, holding {settings.writer_lock_path}), "
                         "and a restore replaces its database: stop the stack first "
                         f"(`{circusctl_command(settings.circus_endpoint, 'quit')}`), then restore, then "
                         "`make run`") from None
    tmp = None
    try:
        # Asked holding the lock: a restore killed mid-swap while this one checked its backup (minutes
        # for a large one) left its mark and no database, and its lock free.
        unfinished = unfinished_restore(path)
        if unfinished is not None:  # the replaced database's ids are not where this restore reads them
            raise ValueError(unfinished)
        _refuse_if_open(settings, path)
        tmp = part_file(path)
        try:
            check = copy_database(source, tmp)
        except sqlite3.Error as e:
            raise MaintenanceFailed(f"copying {source} failed: {e} (nothing was moved)") from e
        if check != ["ok"]:
            raise MaintenanceFailed(f"the copy of {source} fails its integrity check ({'; '.join(check[:3])}): "
                                    "nothing was moved")
        try:
            (counters, replaced_tops), unread = _ids_given(path), None
        except sqlite3.Error as e:  # a damaged file: its rows are what the backup replaces
            (counters, replaced_tops), unread = ({}, {}), str(e)
        for name, top in replaced_tops.items():  # a replaced database older than schema v5 has no such counter
            if top:
                counters = {**counters, name: max(counters.get(name) or 0, top)}
        replaced_top_trade = replaced_tops.get("trades", 0)
        reopened: list[int] | str
        try:
            reopened = _trades_reopened(path, tmp) if unread is None else []
        except sqlite3.Error as e:  # its ids read, their states not (a damaged page): said, not taken as none
            reopened = str(e)
        try:
            raised = _continue_ids(tmp, counters)
            top_trade = _ids_given(tmp)[1].get("trades", 0)
        except sqlite3.Error as e:
            raise MaintenanceFailed(f"continuing the ids in the copy of {source} failed: {e} "
                                    "(nothing was moved)") from e
        _refuse_if_open(settings, path)  # again: one may have opened it while the copy was made
        aside = replaced_copy(settings)
        if unread is None and orphaned_journal(path) is not None:  # its ids are in its pages, not in a WAL alone
            unread = f"its file was missing; its WAL alone is kept, as {aside}-wal"
        with stop_signals_held():  # a stop asked for in the swap is taken after it: either database, whole
            moved = _swap(path, tmp, aside)
            tmp = None
            if done is not None:
                done.set()
        return {"restored": str(path), "source": str(source), "replaced": str(aside) if moved else None,
                "bytes": path.stat().st_size, "ids_continued": raised, "ids_unread": unread,
                "trades_lost": [top_trade + 1, replaced_top_trade] if replaced_top_trade > top_trade else None,
                "trades_reopened": reopened}
    finally:
        if tmp is not None:
            discard_part(tmp)
        lock.release()
