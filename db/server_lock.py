"""The writer lock on PostgreSQL: one writer per host and database, whatever the home.

A file lock (:class:`db.lock.WriterLock`) is per folder, so on a server (one database, several homes
or hosts) the writer also holds :class:`ServerWriterLock`, a session-level advisory lock on the
server, one per host (``TICKSTACK_HOST``), that ends with its session: a second writer for the same
host on that database refuses to start, naming the first. Each batch proves, in its transaction,
that its writer still holds it (:meth:`ServerWriterLock.check_held`, behind a fence a new writer
takes once).
"""
from __future__ import annotations

import os
import select
import socket
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

from db.errors import server_trouble
from db.lock import HOST_TAKEN_SAY_AFTER_S, HOST_TAKEN_WHY, HeldLockWait, WriterLocked, log

#: The first half of the writer lock's key on PostgreSQL ("tiwr"; the second half is the host's,
#: :func:`writer_lock_key`). Advisory locks are per database, so two stacks of one host on one
#: database contend for it, and stacks of two hosts do not. Not "tick", the migration lock's first
#: half (:data:`db.schema.MIGRATION_LOCK`), so a migrating session is never taken for a writer.
SERVER_LOCK_CLASS = 0x74697772
#: The first half of the writer *fence*'s key ("tife"; the second half is the host's): each batch
#: takes it shared, in its transaction, just before checking that its writer still holds the lock
#: and committing; a writer that has just taken the lock takes it exclusively once, so it waits
#: for any batch of the writer before it that checked and has not committed yet
#: (:meth:`ServerWriterLock.check_held`).
FENCE_CLASS = 0x74696665
#: ``application_name`` prefix of the lock's session: how another writer, ``db doctor`` and the
#: console name the holder (pg_stat_activity shows every session's application_name to every role,
#: unlike its client address or query).
LOCK_APP = "tickstack writer-lock"
#: libpq's keepalives on the lock session (client side: a dead server is noticed), and the server's
#: own per session (server side: the session of a host that died silently, with its lock, ends in
#: about idle + interval x count = 5 + 2 x 3 = 11 s; tcp_user_timeout caps unacknowledged data at
#: 10 s). None of this applies on a Unix socket, where the kernel tells both ends at once.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
              "tcp_user_timeout": 10_000}
SERVER_KEEPALIVES = ("-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3 "
                     "-c tcp_user_timeout=10000")
#: The lock's session as pg_locks shows a one-bigint advisory lock: high and low 32 bits, objsubid 1.
_HOLDERS_SQL = """
SELECT a.pid, a.application_name, a.backend_start, l.objid
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid = %s"""
_HOLDER_SQL = _HOLDERS_SQL + " AND l.objid = %s"
#: Once a batch, one round trip: the fence, shared, then whether the lock's session (``pid``) still
#: holds the lock (pg_locks alone, no join).
_STILL_HELD = ("SELECT pg_advisory_xact_lock_shared(%(fence)s), EXISTS (SELECT 1 FROM pg_locks WHERE "
               "locktype = 'advisory' AND granted AND objsubid = 1 AND pid = %(pid)s AND classid = %(hi)s "
               "AND objid = %(lo)s)")


def host_key(host: str) -> int:
    """The second half of ``host``'s writer lock key: a 32-bit hash, the same on every machine."""
    return zlib.crc32(host.encode())


def writer_lock_key(host: str) -> int:
    """The bigint key of ``host``'s writer lock (``pg_try_advisory_lock(key)``)."""
    return (SERVER_LOCK_CLASS << 32) | host_key(host)


def fence_key(host: str) -> int:
    """The bigint key of ``host``'s writer fence (see :data:`FENCE_CLASS`)."""
    return (FENCE_CLASS << 32) | host_key(host)


def _key_parts(host: str) -> tuple[int, int]:
    return SERVER_LOCK_CLASS, host_key(host)


def lock_application_name(pid: int | None = None, host: str | None = None) -> str:
    """``tickstack writer-lock pid 1234 on host``, cut to PostgreSQL's 63 bytes (NAMEDATALEN - 1)."""
    pid = os.getpid() if pid is None else pid
    host = socket.gethostname() if host is None else host
    return f"{LOCK_APP} pid {pid} on {host}".encode()[:63].decode(errors="ignore")


def describe_holder(row: tuple[Any, ...] | None) -> str:
    """Plain words for a row of :data:`_HOLDER_SQL`: who holds the writer lock."""
    if row is None:
        return "a session that ended as we looked"
    backend, app, since = row
    since_text = f", connected since {since:%Y-%m-%d %H:%M:%S %Z}" if since is not None else ""
    who = app if app and app.startswith(LOCK_APP) else f"a session named {app!r}" if app else "an unnamed session"
    return f"{who} (server backend pid {backend}{since_text})"


def server_lock_holder(conn: Any, host: str) -> tuple[Any, ...] | None:
    """(backend pid, application_name, backend_start) of the session holding ``host``'s writer lock
    on ``conn``'s database, or None. ``conn`` is a psycopg connection or a SQLAlchemy Connection."""
    row = _query(conn, _HOLDER_SQL, _key_parts(host), one=True)
    return tuple(row[:3]) if row is not None else None


def server_lock_holders(conn: Any) -> list[tuple[Any, ...]]:
    """(backend pid, application_name, backend_start) of every host's writer on ``conn``'s database."""
    return [tuple(r[:3]) for r in _query(conn, _HOLDERS_SQL, (SERVER_LOCK_CLASS,), one=False)]


def _query(conn: Any, sql: str, params: tuple, one: bool) -> Any:
    result = conn.exec_driver_sql(sql, params) if hasattr(conn, "exec_driver_sql") else conn.execute(sql, params)
    return (result.first() if hasattr(result, "first") else result.fetchone()) if one else result.fetchall()


class ServerWriterLock:
    """The writer lock on PostgreSQL: ``pg_try_advisory_lock`` on a connection of its own, kept
    open while the writer serves. The server drops the lock when that session ends, however the
    writer dies (the kernel closes its socket), so a killed writer never leaves it behind.

    Losing the session (a server restart, ``pg_terminate_backend``, a network cut) loses the lock:
    a thread watching the session's socket calls ``on_lost`` at once, and :meth:`fence` makes every
    new write connection prove that this session still holds the lock, so a write connection that
    reconnects after a restart cannot commit for a writer that is no longer the one."""

    def __init__(self, url: str, host: str, on_lost: Callable[[], None] | None = None,
                 check_every: float = 2.0) -> None:
        self.url = url
        self.host = host
        self.on_lost = on_lost
        self.check_every = check_every
        self.conn: Any = None
        self.backend_pid: int | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None  # a pipe: release() wakes the watching thread at once

    def acquire(self) -> None:
        """Take the lock or raise :class:`WriterLocked` naming the holder; psycopg's OperationalError
        when the server cannot be reached."""
        import psycopg

        from db.engine import psycopg_connect_args

        conn = psycopg.connect(**psycopg_connect_args(
            self.url, options=SERVER_KEEPALIVES, defaults={"connect_timeout": 5, **KEEPALIVES}, autocommit=True,
            application_name=lock_application_name(host=self.host)))
        try:
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (writer_lock_key(self.host),)).fetchone()[0]
            if not got:
                holder = describe_holder(server_lock_holder(conn, self.host))
                raise WriterLocked(f"another writer holds this PostgreSQL database's writer lock for host "
                                   f"{self.host!r}: {holder}; refusing to start a second one, since exactly one "
                                   "process per host may write the database (stop that stack's writer, or give "
                                   "this stack another TICKSTACK_HOST)")
            self.backend_pid = conn.info.backend_pid
            # The fence: wait for a batch of this host's previous writer that checked the lock and
            # has not committed yet (it holds the fence shared until its COMMIT); any later batch of
            # it finds the lock gone (check_held). Taken and given back: batches only share it.
            conn.execute("SELECT pg_advisory_lock(%s)", (fence_key(self.host),))
            conn.execute("SELECT pg_advisory_unlock(%s)", (fence_key(self.host),))
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        self._wake = os.pipe()
        self._watch = threading.Thread(target=self._watch_session, name="writer-lock", daemon=True)
        self._watch.start()

    def _watch_session(self) -> None:
        """Wait on the session's socket: the server writes to it only when it ends the session (a
        shutdown, a terminated backend), so readable means "look now"; otherwise a ``SELECT 1``
        every ``check_every`` seconds finds a connection that died silently (keepalives)."""
        conn = self.conn
        while not self._stop.is_set():
            try:
                assert self._wake is not None
                select.select([conn.fileno(), self._wake[0]], [], [], self.check_every)
                if self._stop.is_set():
                    return
                # A notice on a live session is consumed by this query; a dead one raises.
                conn.execute("SELECT 1")
            except Exception as e:
                if self._stop.is_set():
                    return
                self.lost = f"{type(e).__name__}: {str(e).strip() or 'connection closed'}"
                break
        self.lost = self.lost or "the lock's session ended"
        log.error("writer: lost the PostgreSQL writer lock (%s); stopping at once, since another writer may "
                  "now take it (circus starts this one again: it serves once it holds the lock)", self.lost)
        if self.on_lost is not None:
            self.on_lost()

    def fence(self, engine: Any) -> None:
        """Every new connection of ``engine`` (the writer's) checks that this lock's session still
        holds the lock, and fails if not: after a server restart the lock is gone (and maybe taken
        by another writer) while the pool would reconnect silently."""
        from sqlalchemy import event

        @event.listens_for(engine, "connect")
        def _still_ours(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            try:
                cur.execute(_HOLDER_SQL, _key_parts(self.host))
                found = cur.fetchone()
                row = tuple(found[:3]) if found else None
            finally:
                cur.close()
            dbapi_conn.rollback()  # the check's transaction, not the writer's first one
            if self.lost is not None or row is None or row[0] != self.backend_pid:
                raise WriterLocked(f"this writer no longer holds the PostgreSQL writer lock (now held by "
                                   f"{describe_holder(row) if row else 'nobody'}); it stops serving")

    def check_held(self, conn: Any) -> None:
        """In the write transaction ``conn`` (SQLAlchemy), just before its COMMIT: raise
        :class:`WriterLocked` (and call ``on_lost``) unless this lock's session still holds the lock.
        The watching thread notices a lost session within milliseconds, or ``check_every`` seconds
        for one that died silently; a batch already running in that time would otherwise commit
        for a writer that may no longer be the one. The fence closes the rest: the check takes it
        shared until the COMMIT, and the next writer takes it exclusively before it serves, so a
        batch that passed the check commits before the next writer's first batch, and one that
        did not pass commits nothing. One round trip per batch (pg_locks: every lock partition is
        read briefly; at a few thousand batches a second that is measurable, see the README)."""
        if self.lost is None:
            hi, lo = _key_parts(self.host)
            row = conn.exec_driver_sql(_STILL_HELD, {"fence": fence_key(self.host), "pid": self.backend_pid,
                                                     "hi": hi, "lo": lo}).first()
            if row is not None and row[1]:
                return
        first = self.lost is None
        self.lost = self.lost or "its session no longer holds it"
        if first:
            log.error("writer: the PostgreSQL writer lock is no longer ours (%s); this batch is not committed "
                      "and the writer stops", self.lost)
            if self.on_lost is not None:
                self.on_lost()
        raise WriterLocked(f"this writer no longer holds the PostgreSQL writer lock ({self.lost}); nothing of "
                           "this batch was committed: retry, the writer that holds the lock answers")

    def release(self) -> None:
        """End the lock's session (and with it the lock); the watching thread ends first, so the
        connection is never used by two threads at once."""
        self._stop.set()
        if self._wake is not None:
            os.write(self._wake[1], b"x")
        if self._watch is not None and self._watch is not threading.current_thread():
            self._watch.join(10)
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already gone: so is the lock
                pass
        if self._wake is not None:
            for fd in self._wake:
                os.close(fd)
            self._wake = None


#: How long a starting writer waits for an unreachable server (a restart, a failover) before it
#: exits 1; circus then starts it again. Spaced so, its deaths never trip circus's flapping limit,
#: which would leave the writer stopped for good after a long outage.
SERVER_WAIT_S = 300.0


def take_server_lock(url: str, host: str, on_lost: Callable[[], None] | None = None, wait: float = 0.0,
                     held_wait: float = 0.0, stopping: Callable[[], bool] = lambda: False,
                     on_unreachable: Callable[[str], None] | None = None) -> ServerWriterLock | None:
    """``host``'s writer lock on ``url``'s server, taken (:class:`ServerWriterLock`); None on SQLite,
    whose file lock (:class:`db.lock.WriterLock`, beside the database) already is per database. An
    unreachable server is tried again every second for ``wait`` seconds (logged every 10 s, and
    told to ``on_unreachable`` at each try, in words naming the URL without its password), not at
    all once this process is orphaned (its supervisor died: nobody would stop it), and no longer
    once ``stopping()`` (a stop waited out the whole wait, past circus's graceful timeout). A lock
    held by another writer is tried again every 0.2 s for ``held_wait`` seconds (:class:`HeldLockWait`,
    as :meth:`WriterLock.acquire` waits for the file lock), and no longer once ``stopping()``: the
    writer that held the file lock ends its session just before it lets that lock go, and the server
    drops its locks only when that session's backend has exited, a moment later."""
    if url.startswith("sqlite"):
        return None
    from db.engine import display_url, server_unreachable

    deadline, parent, told = time.monotonic() + wait, os.getppid(), 0.0
    held = HeldLockWait(held_wait, stopping, every=0.2, why=HOST_TAKEN_WHY, say_after=HOST_TAKEN_SAY_AFTER_S)
    while True:
        lock = ServerWriterLock(url, host, on_lost)
        try:
            lock.acquire()
            return lock
        except WriterLocked as e:
            holder = str(e).split(";")[0]
            if not held.goes_on(lambda holder=holder: holder):
                raise
            continue
        except Exception as e:
            now = time.monotonic()
            if not server_unreachable(e) or now >= deadline or os.getppid() != parent:
                raise
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            said = f"the database server {server_trouble(reason)} at {display_url(url)} ({reason})"
            if stopping():
                raise WriterLocked(said) from None
            if on_unreachable is not None:
                on_unreachable(said)
            if now - told >= 10:
                told = now
                log.warning("writer: %s; waiting for it, trying again every second for %.0f s", said, deadline - now)
        for _ in range(10):  # a second, and a stop asked meanwhile ends the wait at once
            if stopping():
                break
            time.sleep(0.1)
