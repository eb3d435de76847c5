"""The writer's one write connection (:class:`WriteConnection`): the schema upgrade before it
serves, how it is kept usable after a failure, how the IO thread begins a batch on it without
waiting, and its last checkpoint.

Its users are :class:`workers.commit.Committer`'s two threads: the commit thread, and the IO
thread while the commit thread is idle (never both at once). The rule that matters here: the IO
thread never waits. It begins a batch only if SQLite's write lock is free at once
(:meth:`WriteConnection.begin_without_waiting`), and it never opens a connection, whose pragmas can
wait on another connection's lock (:meth:`WriteConnection.recover`).
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import stat
import time
from pathlib import Path

from sqlalchemy.engine import Connection, Engine

from db import ops
from db.config import Settings
from db.engine import checkpoint, io_error, raw_dbapi, storage_full_reason
from db.errors import database_words, named_database_words
from db.files import database_files
from db.schema import migrate
from db.sizes import human_bytes

log = logging.getLogger("tickstack.writer")

#: The longest :meth:`WriteConnection.open_database` waits for each lock on PostgreSQL while it gets ready.
GET_READY_LOCK_MS = 1000
#: How long each attempt of the final checkpoint waits for a reader (``busy_timeout``); the attempts go
#: on until every frame is copied, for 3 s at most (10 s after a removed WAL).
FINAL_CHECKPOINT_WAIT_MS = 100
#: How long the final checkpoint goes on trying to empty a WAL whose every frame it copied.
EMPTY_WAL_GRACE_S = 1.0


def live_sqlite(conn: Connection) -> sqlite3.Connection | None:
    """The sqlite3 connection under ``conn`` while ``conn`` is usable; None on a server, or for a
    closed or invalidated connection (a failure replaced it: the commit thread opens a new one)."""
    if conn.closed or conn.invalidated:
        return None
    try:
        driver = raw_dbapi(conn)
    except Exception:
        return None
    return driver if isinstance(driver, sqlite3.Connection) else None


def transaction_ended(conn: Connection) -> bool:
    """Whether SQLite ended the batch's transaction under SQLAlchemy (it rolls a whole transaction
    back on some errors: an I/O error, out of memory): the requests after it would each commit on
    their own, and what was applied before it is gone. A server keeps a failed transaction open
    (every later statement fails); a lost connection is no one request's doing (the batch's COMMIT
    fails, and every request of it gets a retryable error)."""
    driver = live_sqlite(conn)
    return driver is not None and not driver.in_transaction


class JournalWatch:
    """Whether the database file of ``database`` and SQLite's ``-wal`` and ``-shm`` files beside it that
    this process has open are still at their paths: removed (``rm``), moved (``mv``) or replaced,
    SQLite writes on into the file it has open, which nobody else sees (a moved database file: the
    readers and the next writer open another, a new empty one), and which a removed file goes with
    the process. Judged by what the kernel says this process has open (``/proc/self/fd``), so a
    symbolic link, or a file a reader makes in the place of a removed one, cannot fool it; nothing is
    judged where there is no ``/proc``."""

    def __init__(self, database: Path) -> None:
        real = database_files(Path(os.path.realpath(database)))
        self.paths = {database_files(database)[kind].name: str(real[kind]) for kind in ("db", "wal", "shm")}
        #: The database file's name (its reason is another: :func:`journal_gone_reason`).
        self.database = database.name
        #: What each path named when it was last seen open here (device, inode).
        self.known: dict[str, tuple[int, int] | None] = dict.fromkeys(self.paths)
        #: Where each file found gone is now, as the kernel names it (``... (deleted)`` when removed),
        #: and its descriptor here: a removed database file can still be copied out of the process.
        self.now_at: dict[str, tuple[str, int]] = {}

    def gone(self) -> list[str]:
        """The names of those files open here that are no longer at their path (about 20 ``fstat``)."""
        try:
            fds = os.listdir("/proc/self/fd")
        except OSError:
            return []
        open_here: dict[tuple[int, int], int] = {}
        for fd in fds:
            try:
                st = os.fstat(int(fd))
            except (OSError, ValueError):  # closed meanwhile (the listing's own)
                continue
            if stat.S_ISREG(st.st_mode):
                open_here[(st.st_dev, st.st_ino)] = int(fd)
        gone = []
        for name, path in self.paths.items():
            try:
                st = os.stat(path)
                now: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                now = None
            except OSError:  # cannot tell
                continue
            known = self.known[name]
            if now is not None and now in open_here:
                self.known[name] = now  # in place
            elif known is not None and known in open_here:
                gone.append(name)  # the one open here is no longer at its path
                fd = open_here[known]
                try:
                    self.now_at[name] = (os.readlink(f"/proc/self/fd/{fd}"), fd)
                except OSError:
                    pass
            else:
                self.known[name] = None  # not open here (not yet, or its connection was replaced)
        return gone


def database_removed(names: list[str], watch: JournalWatch) -> bool:
    """Whether :meth:`JournalWatch.gone` named the database file itself, removed (not moved)."""
    where, _fd = watch.now_at.get(watch.database, ("", -1))
    return watch.database in names and (where.endswith(" (deleted)") or not where)


def journal_gone_reason(names: list[str], circus_endpoint: str, watch: JournalWatch | None = None,
                        saved: Path | str | None = None) -> str:
    """Why the writer takes no more writes once :meth:`JournalWatch.gone` named ``names``; for a
    removed database file, ``saved`` is the complete copy the writer made (:meth:`WriteConnection.save_copy`),
    or why it could not."""
    from db.circusd import circusctl_command  # psutil and more: only the day it is needed

    if watch is not None and watch.database in names:
        path = watch.paths[watch.database]
        where, fd = watch.now_at.get(watch.database, ("", -1))
        if database_removed(names, watch):
            # What the writer acknowledged is in its open (removed) file and in the WAL at the path. Copies
            # of the two, put in place, lost what a reader's shared memory (-shm) then said was in the file
            # already: the writer's stop checkpoints into the removed file (fault hunt, round 39). The
            # writer's own copy (VACUUM INTO) reads both as it sees them.
            said = (f"the database file {watch.database} was removed under the writer (by another program): every "
                    "write it acknowledged is now only in the file it still has open and in the WAL, so it takes "
                    "no more writes. ")
            quit_stack = circusctl_command(circus_endpoint, "quit")
            if saved is None:
                return said + ("It is saving them all in a copy beside it; its next ERROR line says where, and how "
                               "to put it in place: stop nothing until then")
            if isinstance(saved, Path):
                return said + (f"It saved them all in a copy, {saved}: stop the stack (`{quit_stack}`), then remove "
                               f"the WAL files of the removed database and put the copy in its place (`rm -f "
                               f"{path}-wal {path}-shm && mv {saved} {path}`), then start it (`make run`)")
            return said + (f"It could not save a copy ({saved}): copy it out of the writer, the other watchers "
                           "stopped first (their shared memory would hide WAL frames from the copy), e.g. "
                           f"`cp /proc/{os.getpid()}/fd/{fd} {path}.copied && cp {path}-wal {path}.copied-wal`; "
                           f"then `{quit_stack}`, `rm -f {path}-shm && mv {path}.copied {path} && mv "
                           f"{path}.copied-wal {path}-wal`, and `make run`: SQLite applies the WAL")
        return (f"the database file {watch.database} was moved to {where} under the writer (by another program): "
                "the readers and the next writer would open another file at its path, a new empty database, so "
                f"the writer takes no more writes; put it back (`mv {where} {path}`), then restart the writer "
                f"(`{circusctl_command(circus_endpoint, 'restart', 'writer')}`): every write it acknowledged is in "
                "that file and its WAL")
    return (f"{' and '.join(names)} removed or moved under the writer (by another program; deleting them is "
            "never a remedy here): every write since the last checkpoint is only in the writer's open copy, so it "
            f"takes no more; restart the stack ({circusctl_command(circus_endpoint, 'quit')}, then make run; never "
            "kill -9 the writer): with no write after it and the readers stopping, its last checkpoint copies "
            "that copy into the database")


def make_database_private(path: Path | None) -> None:
    """SQLite's database file, and its WAL and shared-memory files, 0600 before they are opened:
    SQLite makes the last two with the database's mode, whatever the umask, so one others may
    read (an older ``db init``'s, a copy put in place by hand) kept the whole stack's so."""
    if path is None:
        return
    for one in database_files(path).values():
        try:
            mode = stat.S_IMODE(os.stat(one).st_mode)
            if mode & 0o077:
                os.chmod(one, 0o600)
                log.warning("writer: %s was open to other users (mode %o): made private (600), as every "
                            "file of the stack", one, mode)
        except FileNotFoundError:
            continue
        except OSError as e:  # not ours to change: said, and the writer goes on
            log.warning("writer: %s is open to other users and cannot be made private: %s", one, e)


def check_writable(conn: Connection, busy_timeout_ms: int | None = None) -> None:
    """Raise SQLite's SQLITE_READONLY if ``conn`` cannot write (a no-op on a server). SQLite opens a
    file this process may not write (its mode, its owner, a read-only mount) for reading only, without
    a word, and fails each write after: the writer said ready and refused every request for good, not
    retryably (fault hunt, round 39). A write that changes nothing fails at once instead: at the start,
    inside the caller's transaction (the writer exits, saying why), and on a connection opened after a
    failure (``busy_timeout_ms`` given: outside any transaction, waiting for no other program's write
    lock, which only says the file can be written; the timeout is then set back to it)."""
    if conn.dialect.name != "sqlite":
        return
    if busy_timeout_ms is None:
        conn.exec_driver_sql("DELETE FROM applied_requests WHERE 0")
        return
    raw = raw_dbapi(conn)
    raw.execute("PRAGMA busy_timeout = 0")
    try:
        raw.execute("DELETE FROM applied_requests WHERE 0")
    except sqlite3.OperationalError as e:
        if getattr(e, "sqlite_errorname", "") != "SQLITE_BUSY":
            raise
    finally:
        raw.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")


class WriteConnection:
    """The write connection (``conn``, replaced after a failure that leaves it unusable) and the
    engine that opens it."""

    def __init__(self, settings: Settings, engine: Engine, conn: Connection) -> None:
        self.settings = settings
        self.engine = engine
        self.conn = conn
        #: The driver connection the IO thread left with ``busy_timeout`` 0 (:meth:`begin_without_waiting`).
        self._not_waiting: sqlite3.Connection | None = None

    def open_database(self) -> tuple[int, int]:
        """Before the writer serves: upgrade the schema (returns the versions before and after; its
        errors are the caller's), then do what the first batch after every start would otherwise
        pay for (README, Benchmarks: "The first requests after a start"): configure SQLAlchemy's
        mappers and compile the statements of the record of applied requests. That part changes
        nothing (it is rolled back), waits at most :data:`GET_READY_LOCK_MS` for each lock it waits
        on (PostgreSQL), and never stops the writer: if it fails, the first batch compiles them, as
        before."""
        with self.conn.begin():
            versions = migrate(self.conn)
            check_writable(self.conn)
        # A transaction of its own, rolled back: a failure here must not undo the migration, and the
        # migration's ``lock_timeout = 0`` (PostgreSQL: as long as another writer's migration takes)
        # must not hold here.
        try:
            with self.conn.begin() as transaction:
                if self.conn.dialect.name == "postgresql":  # a session holding the table must not hold up the start
                    wait_ms = min(self.settings.lock_timeout_ms or GET_READY_LOCK_MS, GET_READY_LOCK_MS)
                    self.conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(wait_ms)}ms'")
                ops.compile_applied_records(self.conn)
                transaction.rollback()
        except Exception as e:
            self.recover()  # the commit thread must find it outside any transaction
            log.warning("writer: could not get ready for the first batch, which will (%s)", named_database_words(e))
        return versions

    def save_copy(self, path: Path) -> Path:
        """A complete copy of the database as this connection sees it, its file and every frame of its
        WAL, in a new file beside ``path`` (``<name>.saved``, ``.saved-2``, ...), with VACUUM INTO;
        returns it. Only the commit thread calls it (:class:`workers.journal_guard.SaveCopy`): nothing else
        uses the connection meanwhile, and the IO thread serves on (a watchdog killed a writer whose
        IO thread copied a large database, mid-copy: review of round 39). Refused before it starts
        when the disk has less room than the database's pages; a copy that fails leaves nothing (its
        rollback journal, left hot, would empty a good file put at its name later). Raises OSError or
        the driver's error."""
        raw = raw_dbapi(self.conn)
        if raw.in_transaction:
            raw.rollback()
        dest = next(d for n in range(1, 1000) if not os.path.lexists(
            d := path.with_name(f"{path.name}.saved" + (f"-{n}" if n > 1 else ""))))
        need = raw.execute("PRAGMA page_count").fetchone()[0] * raw.execute("PRAGMA page_size").fetchone()[0]
        free = shutil.disk_usage(dest.parent).free
        if need > free:
            raise OSError(errno.ENOSPC, f"the copy needs about {human_bytes(need)} and {dest.parent} has "
                                        f"{human_bytes(free)} free")
        try:
            raw.execute("VACUUM INTO ?", (str(dest),))
        except BaseException:
            for leftover in (dest, dest.with_name(dest.name + "-journal")):
                leftover.unlink(missing_ok=True)
            raise
        return dest

    @property
    def closed(self) -> bool:
        """Whether ``conn`` is closed or invalidated (a failure left it so; :meth:`recover` opens another)."""
        return self.conn.closed or self.conn.invalidated

    def recover(self, open_new: bool = True) -> Exception | None:
        """Leave the write connection outside any transaction; when it cannot be (closed,
        invalidated, its rollback fails), open a new one. A failed open is tried again before the
        next batch, which is answered with its error; returns it (None when the connection is
        usable, or left closed).

        ``open_new`` False (the IO thread, which never waits): opening sets pragmas that can wait
        on another connection's lock (``journal_mode = WAL`` while one recovers the WAL). The old one
        is left closed; :meth:`begin_without_waiting` begins nothing on it, so every batch goes to
        the commit thread, which opens a new one before its next batch."""
        conn = self.conn
        try:
            if not self.closed:
                if conn.get_transaction() is not None:  # active, or left inactive by a failed commit
                    conn.rollback()
                return None
        except Exception as e:
            log.warning("writer: the write connection did not roll back (%s); opening a new one",
                        named_database_words(e))
        try:
            conn.close()
        except Exception:  # it is being replaced
            pass
        if not open_new:
            return None
        try:
            conn = self.engine.connect()
            try:
                check_writable(conn, int(self.settings.busy_timeout_ms))
            except Exception:
                conn.close()
                raise
            self.conn = conn
        except Exception as e:
            log.error("writer: cannot reopen the database (%s); trying again before the next batch",
                      named_database_words(e))
            return e
        return None

    def begin_without_waiting(self) -> sqlite3.Connection | None:
        """SQLite: ``BEGIN IMMEDIATE`` on the driver's connection with ``busy_timeout`` 0; the driver's
        connection, begun, or None when nothing began (on a server, a closed connection, another
        connection holds the write lock, or any error, which the commit thread then meets as
        before). SQLAlchemy's ``begin`` joins it (:mod:`db.engine`). The timeout stays 0 (the batch
        on the IO thread waits for nothing either) until the commit thread takes the connection
        again (:meth:`wait_when_busy`): setting it back after each batch cost two statements a
        batch, a twentieth of the IO thread's time under small writes."""
        raw = live_sqlite(self.conn)
        if raw is None:
            return None
        if raw is not self._not_waiting:
            try:
                raw.execute("PRAGMA busy_timeout = 0")
            except sqlite3.Error:
                return None
            self._not_waiting = raw
        try:
            raw.execute("BEGIN IMMEDIATE")
            return raw
        except sqlite3.Error:
            return None

    def wait_when_busy(self) -> None:
        """On the commit thread, before it uses the connection: the usual ``busy_timeout`` again, if
        the IO thread left it at 0 (:meth:`begin_without_waiting`), so that the commit thread waits
        for another program's write lock as long as it is told to. A failure is said and left: the
        batch then meets the lock as an error, retryable, never as a wait without end."""
        raw, self._not_waiting = self._not_waiting, None
        if raw is None or raw is not live_sqlite(self.conn):  # none left at 0, or one since replaced
            return
        try:
            raw.execute(f"PRAGMA busy_timeout = {int(self.settings.busy_timeout_ms)}")
        except sqlite3.Error as e:
            log.warning("writer: could not set busy_timeout again: %s", e)

    def final_checkpoint(self, journal_removed: bool = False) -> bool:
        """TRUNCATE the WAL on the way out. A reader mid-transaction makes it
        partial (busy): retry briefly, since circus is stopping them too. A server checkpoints its
        own WAL: nothing to do there. ``journal_removed``: the WAL was removed under the writer
        (:class:`JournalWatch`), so what this copies is all the database file will ever have, and
        anything less is said as CRITICAL. Returns whether every committed write is safe."""
        if self.settings.database_path is None:
            log.info("writer: stopped serving (a server checkpoints its own WAL); exiting")
            return True
        lost = ("writer: its WAL was removed under it and %s: what it held since the last checkpoint is lost, "
                "and the database file may be a mix of two states; run python -m db doctor, and restore a backup "
                "if its check fails")
        if self.closed:
            if journal_removed:  # a new connection would open a new WAL by its name: nothing to copy from
                log.critical(lost, "the connection that had it open was closed by a failure")
                return False
            self.recover()  # the IO thread left it closed, and no batch came after
        # Each attempt waits little for a reader (busy_timeout held a `restart writer` 5 s an attempt for
        # a reader the restart leaves running). Once every frame is copied, only emptying the WAL is
        # left, which loses nothing if not done: it gets EMPTY_WAL_GRACE_S, not the whole deadline.
        raw = live_sqlite(self.conn)
        if raw is not None:
            try:
                raw.execute(f"PRAGMA busy_timeout = {FINAL_CHECKPOINT_WAIT_MS}")
            except sqlite3.Error as e:  # the usual timeout then: slower, not wrong
                log.warning("writer: could not shorten busy_timeout for the final checkpoint: %s", e)
        # After a removed WAL this copy is all the file will have: the readers circus is stopping get longer.
        deadline = time.monotonic() + (10.0 if journal_removed else 3.0)
        empty_by = None
        while True:
            try:
                result = checkpoint(self.conn, "TRUNCATE")
            except Exception as e:
                if journal_removed:
                    log.critical(lost, f"the last checkpoint failed ({database_words(e)})")
                    return False
                reason = storage_full_reason(e)
                if reason is not None:
                    log.warning("writer: no final checkpoint, the disk is full (%s); every committed write is "
                                "in the WAL, and the next writer checkpoints it; exiting", reason)
                elif io_error(e):  # the OS may never have written what SQLite gave it (synchronous=NORMAL)
                    log.error("writer: final checkpoint failed (%s): the disk fails; every committed write was "
                              "given to the WAL, but a disk that failed may have lost those not yet on it (with "
                              "TICKSTACK_SYNCHRONOUS=NORMAL, the last commits before the failure); mend the disk, "
                              "then run python -m db doctor; exiting", named_database_words(e))
                else:
                    log.error("writer: final checkpoint failed (%s); every committed write is in the WAL; "
                              "exiting", named_database_words(e))
                return True
            # (-1, -1) when it could not run at all (another checkpoint held its lock).
            copied = 0 <= result["log"] <= result["checkpointed"]
            if copied and empty_by is None:
                empty_by = min(deadline, time.monotonic() + EMPTY_WAL_GRACE_S)
            if not result["busy"] or time.monotonic() > (deadline if empty_by is None else empty_by):
                break
            time.sleep(0.1)
        if journal_removed and not copied:
            log.critical(lost, f"a reader held back its last checkpoint ({result})")
            return False
        if not result["busy"]:
            log.info("writer: final checkpoint done; exiting")
        elif copied:
            log.info("writer: final checkpoint done: every committed write is in the database file (a reader "
                     "still open on the WAL kept it from being emptied; %d frames, copied); exiting", result["log"])
        else:
            log.info("writer: final checkpoint partial %s: a reader held back the last frames, which stay in the "
                     "WAL for the next writer; exiting", result)
        return True
