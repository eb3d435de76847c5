"""Backups of the database (:func:`backup`), named, locked and rotated in the backups folder
(:func:`new_backup`, the jobs worker's and the console's): a SQLite copy made with the online backup
API from a read-only connection, or a ``pg_dump -Fc`` archive of a server (:func:`db.server.dump`).
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import sqlite3
import time
from pathlib import Path
from typing import Any

from db.circusd import damaged_file_steps
from db.config import SECRET_FILES, Settings
from db.engine import check_findings, connect_read_only
from db.errors import MaintenanceFailed, WriterError
from db.files import (
    REPLACED_RE,
    check_replaceable,
    database_files,
    discard_part,
    not_sqlite_reason,
    not_sqlite_words,
    part_file,
    put_in_place,
    stopped_restore_copy,
)
from db.leader import LEADER_NAMES, leader_lock_path
from db.lock import PidLock, read_lock_holder
from db.sizes import human_bytes

#: The name of every backup the stack makes (the jobs worker's and the console's): its UTC time, so
#: names sort in time order, and rotation can tell our backups from files a person put beside them.
#: ``.db`` a SQLite copy, ``.dump`` a PostgreSQL ``pg_dump -Fc`` archive (``pg_restore`` reads it).
BACKUP_RE = re.compile(r"tickstack-\d{8}T\d{6}Z\.(db|dump)")


def backup_suffix(settings: Settings) -> str:
    return ".db" if settings.database_path is not None else ".dump"


def backup_path(directory: Path, suffix: str) -> Path:
    """A path for a new backup in ``directory``, named ``tickstack-<UTC stamp><suffix>``
    (``suffix``: :func:`backup_suffix`, the one the backup will have). When a backup of this second
    exists it waits for a fresh stamp rather than overwrite (FileExistsError after three tries)."""
    for _ in range(3):
        dest = directory / f"tickstack-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}{suffix}"
        if not dest.exists():
            return dest
        time.sleep(1.01 - time.time() % 1)
    raise FileExistsError(f"{dest} exists")


#: In ``run/``: held while a backup of the backups folder is named and written (:func:`new_backup`),
#: so that two (the console's, the jobs worker's) never take the same second's name.
BACKUP_LOCK = "backup.lock"


def new_backup(settings: Settings, keep: int | None = None) -> dict[str, Any] | None:
    """:func:`backup` into the backups folder, named by :func:`backup_path` with this database's
    suffix, then :func:`rotate_backups` to the newest ``keep`` (``TICKSTACK_BACKUP_KEEP`` unless
    given), holding :data:`BACKUP_LOCK` throughout: the jobs worker's backup and the console's
    button alike, so neither's backups pile up until the other's. The result's ``removed`` names
    the backups deleted, ``rotation_error`` why the rotation failed (the backup is written all the
    same); a backup that fails raises before the rotation, so it never deletes the old ones. None,
    at once, when another process holds the lock (a backup is being written)."""
    settings.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = PidLock(settings.run_dir / BACKUP_LOCK)
    if not lock.try_acquire():
        return None
    try:
        result = backup(settings, backup_path(settings.backup_dir, backup_suffix(settings)))
        removed: list[Path] = []
        try:
            removed = rotate_backups(settings.backup_dir, settings.backup_keep if keep is None else keep,
                                     spare=Path(result["path"]))
        except OSError as e:
            result["rotation_error"] = f"{type(e).__name__}: {e}"
    finally:
        lock.release()
    return {**result, "removed": [p.name for p in removed]}


#: A backup named more than this after now was named by a clock since set back (a VM's clock running
#: fast, then corrected): older than every backup made since, whatever its name says. Less is a copy
#: from a host whose clock is a little ahead, taken at its word.
CLOCK_SLACK_S = 300


def list_backups(directory: Path, now: float | None = None) -> list[Path]:
    """The backups in ``directory`` named by :data:`BACKUP_RE`, oldest first ([] when it does not
    exist). The name (its UTC stamp sorts as text), not the mtime (which copying changes), orders them,
    but those named more than :data:`CLOCK_SLACK_S` after ``now`` (epoch s) come first of all: a clock
    set back since made every backup after them, and by name alone rotation deleted those, and "the
    latest" named a stale one."""
    try:
        found = [p for p in directory.iterdir() if BACKUP_RE.fullmatch(p.name) and p.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    # The stamp's text against now's, both fixed-width: a stamp no calendar has (99999999) is ahead too.
    latest = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime((time.time() if now is None else now) + CLOCK_SLACK_S))
    return sorted(found, key=lambda p: (p.name[len("tickstack-"):-len(p.suffix)] <= latest, p.name))



def replaced_copy(settings: Settings) -> Path:
    """Where ``db restore`` keeps the database it replaces, now (:data:`REPLACED_RE` reads the name):
    SQLite's file beside it, ``<name>.replaced-<UTC time>`` (its WAL and shared memory after it);
    PostgreSQL's dump in the home, ``tickstack.replaced-<UTC time>.dump``. ``.2`` and on when a
    restore within the same second kept one there: no file of the set has the name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    # Beside the file a symbolic link names, which is what a restore replaces (the link stays).
    path = None if settings.database_path is None else Path(os.path.realpath(settings.database_path))
    n = 1
    while True:
        nth = "" if n == 1 else f".{n}"
        if path is None:
            candidate = settings.home / f"tickstack.replaced-{stamp}{nth}.dump"
            taken = candidate.exists()
        else:
            candidate = path.with_name(f"{path.name}.replaced-{stamp}{nth}")
            taken = any(file.exists() for file in database_files(candidate).values())
        if not taken:
            return candidate
        n += 1


def replaced_copies(settings: Settings) -> list[Path]:
    """The files ``db restore`` kept of the databases it replaced, oldest first; nothing ever removes
    them, and each is the size of a database."""
    path = None if settings.database_path is None else Path(os.path.realpath(settings.database_path))
    folder = settings.home if path is None else path.parent
    try:
        names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file(follow_symlinks=False))
    except OSError:
        return []
    # Of this database only: SQLite's beside its file, named after it; PostgreSQL's dumps in the home.
    kept = [(m, folder / name) for name in names if (m := REPLACED_RE.fullmatch(name)) is not None
            and m.group("name") == (None if path is None else path.name)]
    def when(found: tuple[re.Match[str], Path]) -> tuple[str, int, str]:  # ".10" after ".9": by number
        m, copy = found
        return m.group("stamp") or m.group("dstamp"), int(m.group("n") or m.group("dn") or 1), copy.name
    return [copy for _, copy in sorted(kept, key=when)]


def replaced_copies_finding(settings: Settings, low: bool) -> list[tuple[str, str]]:
    """Doctor's line on :func:`replaced_copies`, as nothing removes them: a warning when a disk is
    filling up (``low``), where they are space to free."""
    # Not the one a restore stopped mid-swap moved aside: the only copy of that database until the
    # restore is finished, one way or the other (doctor's unfinished-restore finding says how).
    held = stopped_restore_copy(settings.database_path)
    copies = [copy for copy in replaced_copies(settings)
              if held is None or copy.name not in {held.name, f"{held.name}-wal", f"{held.name}-shm"}]
    if not copies:
        return []
    newest = next((c.name for c in reversed(copies) if not c.name.endswith(("-wal", "-shm"))), copies[-1].name)
    size = 0
    for copy in copies:
        with contextlib.suppress(OSError):
            size += copy.stat().st_size
    return [("warn" if low else "ok", f"{len(copies)} file(s) kept by `db restore` of the databases it replaced take "
                                      f"{human_bytes(size)} in {copies[0].parent} (the newest {newest}); "
                                      "nothing removes them: delete them once you no longer need them.")]


def restore_advice(settings: Settings) -> str:
    """What to do about a damaged database once the stack is stopped, as a clause: the restore of the
    newest backup (``.db``, or on PostgreSQL ``.dump``), named and quoted for the shell (``python -m db
    restore`` checks it first and refuses one it cannot use: the one before, then), and ``make run``.
    With no backup, that there is none (for an SQLite file, and that the writer must not run on it: a
    write that meets the damage fails)."""
    try:
        backups = [p for p in list_backups(settings.backup_dir) if p.suffix == backup_suffix(settings)]
    except OSError as e:  # a folder this user may not list: say so rather than end doctor's run
        return (f"restore a backup (`python -m db restore BACKUP`; the backups folder {settings.backup_dir} cannot "
                f"be read: {e.strerror or e}), then `make run`")
    if not backups and settings.database_path is None:
        return f"restore a backup: there is none in {settings.backup_dir}"
    if not backups:
        return (f"there is no backup in {settings.backup_dir} to restore: keep the writer stopped (a write that "
                "meets the damage fails), copy the file aside with its -wal, and rebuild what you can from the copy")
    return (f"restore the latest backup, `python -m db restore {shlex.quote(str(backups[-1]))}` (if it refuses it, "
            f"the one before it in {settings.backup_dir}), then `make run`")


def damaged_file_words(settings: Settings, restore: str | None = None) -> str:
    """A damaged SQLite file, and the steps that mend it (the stack's stop first when circusd runs);
    ``restore``: :func:`restore_advice`'s words when the caller has them already."""
    steps = damaged_file_steps(settings, restore or restore_advice(settings))
    not_sqlite = not_sqlite_words(settings.database_path)
    if not_sqlite is not None:
        return (f"{not_sqlite}. If DATABASE_URL names the wrong file, set it right; if this is the stack's database, "
                f"its first page is damaged: {steps}")
    return f"the database file is damaged; {steps}"


def rotate_backups(directory: Path, keep: int, spare: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` backups in ``directory`` (:func:`list_backups`: only our
    names, so a copy a person put there under another name is never touched); return them.
    ``spare`` (the backup just written) is never deleted, even when newer names were copied in or
    the clock stepped back."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    old = [p for p in list_backups(directory)[:-keep] if spare is None or p.name != spare.name]
    for path in old:
        path.unlink(missing_ok=True)
    return old


def _refuse_live_file(settings: Settings, dest: Path) -> None:
    """ValueError when ``dest``, however spelled (``..``, a symlink, a hard link), is a file the running
    stack uses: the database, its WAL, shared-memory or journal file, the writer's or a leader's lock
    (:func:`db.leader.leader_lock_path`), a secret file (:data:`db.config.SECRET_FILES`), or anything
    in ``run/``. The backup's rename would put a new file in its place: a copy under the live writer,
    a lock file no one holds, which would let a second writer, or a second analysis worker, start, or
    a database where the console's password was (every login refused after)."""
    real = dest.resolve()
    live = [settings.writer_lock_path.resolve(), *((settings.home / name).resolve() for name in SECRET_FILES)]
    if settings.database_path is not None:
        db_file = Path(settings.database_path).resolve()
        live += [db_file, *(Path(f"{db_file}-{suffix}") for suffix in ("wal", "shm", "journal")),
                 *(leader_lock_path(db_file, name) for name in LEADER_NAMES)]
    same = dest.exists() and any(f.exists() and os.path.samefile(dest, f) for f in live)
    if real in live or same:
        raise ValueError(f"{dest} is a file of the running stack (the database, its WAL, shared-memory or "
                         "journal file, the writer's or a leader's lock, or a secret file); choose another path")
    if real.is_relative_to(settings.run_dir.resolve()):
        raise ValueError(f"{dest} is in the stack's run folder ({settings.run_dir}); choose another path")


def _journal_removed(settings: Settings) -> str | None:
    """The running writer's word that its WAL was removed under it (its ``stats``), when one runs and
    answers within a second: a copy of the database file would then lack what only that WAL holds,
    and pass its integrity check all the same."""
    if read_lock_holder(settings.writer_lock_path) is None:
        return None
    from db.client import WriterClient

    try:
        with WriterClient(settings=settings, deadline=1.0) as client:
            return client.stats(timeout=1.0).get("journal_removed")
    except WriterError:  # not answering: nothing it holds can be asked for either
        return None


def copy_database(source: Path, dest: Path) -> list[str]:
    """SQLite's online backup API from ``source`` (read-only: one read transaction, a consistent copy
    while the stack writes) into the new file ``dest``, left in rollback-journal mode (one file, no
    WAL beside it); returns ``dest``'s ``integrity_check`` (``["ok"]`` when sound)."""
    src = connect_read_only(source)
    try:
        out = sqlite3.connect(dest)
        try:
            src.backup(out)
            out.execute("PRAGMA journal_mode = DELETE")
            return check_findings(out)
        finally:
            out.close()
    finally:
        src.close()


def backup(settings: Settings, dest: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Copy the database to ``dest`` with SQLite's online backup API from a read-only connection: a
    consistent snapshot while the stack runs (the copy is one step, one read transaction). Written to
    a part file of its own, checked with integrity_check, then given its name (:mod:`db.files`: never
    over a file there, unless ``overwrite``). On PostgreSQL, a ``pg_dump -Fc`` archive checked with
    ``pg_restore --list`` (:func:`db.server.dump`)."""
    path = settings.database_path
    dest = Path(dest).absolute()
    if dest.is_dir():
        example = backup_path(dest, backup_suffix(settings))
        raise IsADirectoryError(f"{dest} is a folder; give the backup file's path (e.g. {example})")
    _refuse_live_file(settings, dest)  # before "exists; pass --force", which would point the wrong way
    check_replaceable(dest)  # before the copy is written, not only at its rename
    if path is None:
        # One of our names made for SQLite (backup_path's default, as the console asks): the same
        # stamp as a dump, so rotation and the console count it.
        if BACKUP_RE.fullmatch(dest.name) and dest.suffix == ".db":
            dest = dest.with_suffix(".dump")
        if dest.exists() and not overwrite:
            raise FileExistsError(f"{dest} exists; choose another path or pass --force")
        from db.server import dump

        return dump(settings, dest, overwrite=overwrite)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; choose another path or pass --force")
    refusal = _journal_removed(settings)
    if refusal is not None:
        raise MaintenanceFailed(f"no backup: the writer says {refusal}")
    started = time.perf_counter()
    # Private from its first byte, its own (another backup of this path writes another), and never
    # left behind half-written (a full disk, a bad page).
    tmp = part_file(dest)
    try:
        check = copy_database(path, tmp)
        if check != ["ok"]:  # a copy page by page: the database's own pages are damaged
            raise MaintenanceFailed(f"no backup written: its copy fails integrity_check ({'; '.join(check[:3])}), "
                                    f"so {damaged_file_words(settings)}.")
        put_in_place(tmp, dest, overwrite=overwrite)
    except sqlite3.Error as e:
        reason = not_sqlite_reason(path) or e  # SQLite says only "file is not a database"
        raise MaintenanceFailed(f"backup to {dest} failed: {reason} (nothing left behind)") from e
    finally:
        discard_part(tmp)  # gone once put in place; its journals, and the whole of a failed copy
    return {"path": str(dest), "bytes": dest.stat().st_size, "ms": round((time.perf_counter() - started) * 1000, 1)}
