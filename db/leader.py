"""One leader at a time for the workers that must run once per database, whatever the hosts.

With several hosts on one PostgreSQL database, each runs its own circus stack (writer, ticks, API,
console), but the analysis worker, the monitor and the jobs that maintain the database must run
once: two analysis workers would fold the same ticks twice over, and two simulated markets (the
``ticks`` watcher's, ``--lead``) would interleave two random walks in one series. A worker whose class says
``leader_only`` (:class:`workers.base.Worker`) takes its name's *leadership* before it does any
work, and waits as a standby while another host's worker holds it.

Leadership is a session-level advisory lock (``pg_try_advisory_lock(namespace, key of the
name)``) on a connection of its own, kept open while the worker leads. The server drops it when
that session ends, however the leader died: a process or host that is killed loses it when the
kernel closes its socket (at once), a host that vanishes from the network when the server's TCP
keepalives give up on it (about 11 s, :data:`db.server_lock.SERVER_KEEPALIVES`). The standby asks every
``poll`` seconds and takes over then. The leader checks its session every ``check_every`` seconds
and stops leading (the worker exits, circus starts it again as a standby) when it is gone.

On SQLite there is one host per database file, and a second process of such a worker comes from
``circusctl incr analysis`` or from one run by hand beside the stack: both would fold the same
ticks, each store refused in turn (the cursor moved under it). Leadership there is an exclusive
``flock`` on a file beside the database (``<database>.leader-<name>.lock``, holding the pid), which
the kernel drops when its holder dies, however it dies; the standby polls it as on PostgreSQL.
"""
from __future__ import annotations

import errno
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any

from db.config import Settings
from db.engine import is_sqlite, psycopg_connect_args
from db.errors import server_trouble
from db.lock import PidLock, read_lock_holder
from db.server_lock import KEEPALIVES, SERVER_KEEPALIVES

log = logging.getLogger("tickstack.leader")

#: The workers that run under a leadership (their ``name``): for health, doctor and the console. The
#: tick ingestor only with ``--lead`` (the ``ticks`` watcher's simulated market: one per database).
LEADER_NAMES = ("analysis", "monitor", "jobs", "ticks")
#: What "nobody leads" means for each (a feed run by hand without ``--lead`` feeds without leading).
NOBODY = {name: f"no {name} process runs" for name in LEADER_NAMES} | {
    "ticks": "no simulated market runs with --lead (the ticks watcher's)"}
#: The first half of every leadership lock's key ("tick"): the second is the worker's name.
NAMESPACE = 0x7469636B
#: ``application_name`` prefix of a leadership session: how a standby, ``db doctor`` and the
#: console name the leader (pg_stat_activity shows every session's name to every role).
LEADER_APP = "tickstack leader"
_HOLDER_SQL = """
SELECT a.application_name, a.backend_start
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid = %s AND l.objid = %s"""
_LEADERS_SQL = """
SELECT l.objid, a.application_name, a.backend_start
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid = %s"""


def leader_key(name: str) -> int:
    """The lock key of ``name`` (a positive 31-bit number, stable across hosts and versions)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def leader_application_name(name: str, host: str) -> str:
    """``tickstack leader analysis pid 1234 on host``, cut to PostgreSQL's 63 bytes."""
    return f"{LEADER_APP} {name} pid {os.getpid()} on {host}".encode()[:63].decode(errors="ignore")


def leader_lock_path(database: Path, name: str) -> Path:
    """The file whose lock is ``name``'s leadership of the SQLite database at ``database``."""
    return database.with_name(f"{database.name}.leader-{name}.lock")


def leaders(conn: Any, names: tuple[str, ...]) -> dict[str, str | None]:
    """Who leads each of ``names`` on ``conn``'s database (a SQLAlchemy or psycopg connection):
    the leader session's application_name, or None when nobody leads it."""
    by_key = {leader_key(n): n for n in names}
    found: dict[str, str | None] = dict.fromkeys(names)
    rows = (conn.exec_driver_sql(_LEADERS_SQL, (NAMESPACE,)) if hasattr(conn, "exec_driver_sql")
            else conn.execute(_LEADERS_SQL, (NAMESPACE,)).fetchall())  # SQLAlchemy, or psycopg
    for objid, app, _since in rows:
        if objid in by_key:
            found[by_key[objid]] = app
    return found


def file_leader(lock: Path) -> str | None:
    """Who holds the SQLite leader lock ``lock``, in words (``pid N on this host``); None: nobody."""
    try:
        pid = read_lock_holder(lock)
    except OSError as e:
        return f"unknown: {lock}: {e.strerror or e}"
    return f"pid {pid} on this host" if pid is not None else None


#: Errors of a leader lock file that waiting does not end (others, e.g. ENOENT or ENOSPC, may).
_LASTING = frozenset({errno.EISDIR, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENOTDIR, errno.EROFS,
                      errno.ENAMETOOLONG})


class LeadershipUnusable(RuntimeError):
    """The leadership cannot be taken at all here (SQLite: its lock file cannot be opened): not a
    server that is down for a while, so waiting would never end; the message says which file and why."""


class Leadership:
    """The leadership of ``name`` on the settings' database. Not thread-safe: the worker's loop
    uses it (:meth:`try_take` while standing by, :meth:`still_held` while leading)."""

    def __init__(self, settings: Settings, name: str, check_every: float = 2.0) -> None:
        self.name = name
        self.url = settings.database_url
        self.host = settings.host
        #: On a server (an advisory lock), or on a SQLite file (a file lock).
        self.shared = not is_sqlite(self.url)
        self.key = leader_key(name)
        self.check_every = check_every
        self.held = False
        self.lost: str | None = None
        self._conn: Any = None
        self._file: PidLock | None = None
        if not self.shared:
            assert settings.database_path is not None
            self._file = PidLock(leader_lock_path(settings.database_path, name))
        self._checked_at = 0.0

    def try_take(self) -> bool:
        """Take the leadership if nobody holds it; True when this process leads. Raises psycopg's
        OperationalError when the server cannot be reached, OSError when the lock file cannot be made
        or written yet (its folder not made yet, a full disk): the caller waits and tries again; and
        :class:`LeadershipUnusable` when waiting would not help (a folder or another user's file in
        its place)."""
        if self.held:
            return True
        if self._file is not None:
            try:
                self.held = self._file.try_acquire()
            except OSError as e:
                if e.errno not in _LASTING:
                    raise
                raise LeadershipUnusable(f"cannot use the {self.name} leader lock {self._file.path}: "
                                         f"{e.strerror or e}") from None
            return self.held
        if self._conn is None:
            import psycopg

            self._conn = psycopg.connect(**psycopg_connect_args(
                self.url, options=SERVER_KEEPALIVES, defaults={"connect_timeout": 5, **KEEPALIVES}, autocommit=True,
                application_name=leader_application_name(self.name, self.host)))
        try:
            got = self._conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (NAMESPACE, self.key)).fetchone()[0]
        except Exception:
            self._close()
            raise
        self.held = bool(got)
        self._checked_at = time.monotonic()
        return self.held

    def attempt(self) -> str | None:
        """:meth:`try_take`, for a standby's loop: None when this process leads now, else who leads
        in words (:meth:`holder`), or why nobody can be told yet (a server that does not answer, a
        lock file not makeable yet). Raises :class:`LeadershipUnusable` (waiting would not help)."""
        try:
            return None if self.try_take() else self.holder()
        except LeadershipUnusable:
            raise
        except Exception as e:  # the server is down or restarting, or refuses the login
            if isinstance(e, OSError) and self._file is not None:  # its folder not made yet, a full disk
                return f"nobody known: the lock cannot be taken yet ({e})"
            return f"nobody known: the database server {server_trouble(str(e))} ({type(e).__name__})"

    def holder(self) -> str:
        """In words, who leads now (for a standby's log line)."""
        if self._file is not None:
            if self.held:
                return "this process"
            leader = file_leader(Path(self._file.path))
            if leader is None:
                return "nobody (it just ended)"
            return leader if leader.startswith("unknown") else f"{leader} ({self._file.path})"
        try:
            row = self._conn.execute(_HOLDER_SQL, (NAMESPACE, self.key)).fetchone() if self._conn else None
        except Exception as e:
            return f"unknown ({type(e).__name__})"
        if row is None:
            return "nobody (it just ended)"
        app, since = row
        return f"{app or 'an unnamed session'}, connected since {since:%Y-%m-%d %H:%M:%S %Z}"

    def still_held(self) -> bool:
        """While leading, as often as the loop likes: at most every ``check_every`` seconds, prove
        that the session (and with it the lock) is still there. False once it is not."""
        if not self.held:
            return False
        now = time.monotonic()
        if now - self._checked_at < self.check_every:
            return True
        self._checked_at = now
        if self._file is not None:  # a file lock is held until its process lets it go, if the file stays
            if not self._file.still_ours():
                self.lost = f"{self._file.path} was removed or replaced"
                self.held = False
                self._file.release()
            return self.held
        try:
            self._conn.execute("SELECT 1")
        except Exception as e:
            self.lost = f"{type(e).__name__}: {str(e).strip() or 'connection closed'}"
            self.held = False
            self._close()
        return self.held

    def release(self) -> None:
        """End the session (or close the lock file), and with it the leadership."""
        self.held = False
        if self._file is not None:
            self._file.release()
        self._close()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already gone: so is the lock
                pass
