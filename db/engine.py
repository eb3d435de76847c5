"""SQLAlchemy engines: the only module (with :mod:`db.health`) that knows the
database is SQLite.

* The **write engine** belongs to the writer process alone. Every transaction
  starts with ``BEGIN IMMEDIATE``: it takes the write lock before the first
  read, so no statement later in the transaction can fail with SQLITE_BUSY
  (a deferred transaction that read before another connection committed
  cannot be upgraded, and SQLite then fails at once without waiting).
* **Read engines** open the file with ``mode=ro`` and ``PRAGMA query_only``:
  a bug in a reader cannot write, let alone take the write lock.
* Fork-safe: pooled connections never cross ``fork()``; in a child every
  engine made here drops the parent's connections without closing them
  (closing would disturb the parent's SQLite locks).

On PostgreSQL (psycopg 3) the same split holds: the writer's engine uses
``DATABASE_URL``; read engines use ``DATABASE_READ_URL`` (a read-only role,
where one is configured) and every session they open is read-only
(``default_transaction_read_only``), so a reader cannot write whatever its
role may do. A URL is only ever shown through :func:`display_url` (password
hidden) or :func:`database_location` (dialect and host).
"""
from __future__ import annotations

import errno
import os
import sqlite3
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.pool import NullPool

from db import slowreads
from db.config import Settings
from db.errors import server_trouble
from db.files import new_database_refusal

_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for engine in list(_engines):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_after_fork)


def is_sqlite(url_or_engine: str | Engine | Connection) -> bool:
    if isinstance(url_or_engine, str):
        return url_or_engine.startswith("sqlite")
    return url_or_engine.dialect.name == "sqlite"


#: What stands for a hidden password (SQLAlchemy's own mask).
HIDDEN = "***"
#: Query parameters that carry a secret (libpq accepts ``?password=``).
_SECRET_PARAMS = ("password", "sslpassword")  # libpq's: the password and the client key's passphrase


def display_url(url: str) -> str:
    """``url`` as it may be printed, logged, stored or shown: its password (in the netloc or as a
    ``password`` query parameter) replaced by ``***``. The one way a database URL leaves a
    process: the password must not reach a log, a job record, a page or a response. A URL that
    SQLAlchemy cannot parse is cut down to its scheme rather than risk showing what follows."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return url.split("://", 1)[0] + "://" + HIDDEN
    hidden = {k: HIDDEN for k in parsed.query if k.lower() in _SECRET_PARAMS}
    if hidden:
        parsed = parsed.update_query_dict(hidden)
    return parsed.render_as_string(hide_password=True)


def database_location(url: str) -> dict[str, str | None]:
    """What anyone may see of a server database: its dialect and host (``?host=`` for a Unix
    socket folder), no user, no password, no database name. ``/api/health`` answers it without
    a login."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return {"dialect": url.split(":", 1)[0].split("+", 1)[0], "host": None}
    host = parsed.host or parsed.query.get("host")
    if isinstance(host, tuple):  # ?host=a&host=b: libpq's list of hosts
        host = ",".join(host)
    return {"dialect": parsed.get_backend_name(), "host": host}


def application_name(role: str, host: str) -> str:
    """``tickstack writer pid 1234 on host``: what every PostgreSQL session of this process is named
    (``application_name``), so ``pg_stat_activity``, ``db doctor`` and ``/metrics`` tell who holds
    which connections, the server-side counterpart of "who holds the file". ``role`` is the
    program (``writer``, ``analysis``, ``gunicorn``...) or what the session is for; ``host`` is the
    setting ``TICKSTACK_HOST`` (two stacks on one machine are two hosts), as in the names of the
    writer lock's and the leaders' sessions. At most PostgreSQL's 63 bytes."""
    return f"tickstack {role} pid {os.getpid()} on {host}".encode()[:63].decode(errors="ignore")


def program_name() -> str:
    """This process's program: the module run with ``python -m`` (``workers.writer``: ``writer``), or
    the script's name (``gunicorn``, ``circusd``, ``pytest``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__").rsplit(".", 1)[-1]
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"


def psycopg_params(url: URL) -> dict[str, Any]:
    """``psycopg.connect`` keyword arguments for a SQLAlchemy PostgreSQL URL, as SQLAlchemy's own
    dialect makes them (``?host=`` sockets, ``?sslmode=`` and the rest): for the few sessions that
    need a bare psycopg connection (the writer lock's, a dump's)."""
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    _args, params = PGDialect_psycopg().create_connect_args(url)
    return dict(params)


def psycopg_connect_args(url: str, *, options: str = "", defaults: dict[str, Any] | None = None,
                         **ours: Any) -> dict[str, Any]:
    """The keyword arguments of a bare ``psycopg.connect`` to ``url``: ``defaults``, then the URL's own
    libpq parameters (``?connect_timeout=``, ``?target_session_attrs=``, ...), then ``ours`` over both
    (a session's ``application_name``, which doctor and the console go by; a health probe's bound on
    ``connect_timeout``), with ``options`` after the URL's own. One dict, so a parameter given both ways
    is one value: given twice, psycopg refused the connection ("got multiple values for keyword
    argument 'application_name'"), and a writer whose URL named its sessions crash-looped."""
    params = {**(defaults or {}), **psycopg_params(make_url(url))}
    options = " ".join(o for o in (params.pop("options", ""), options) if o)
    return {**params, **ours, **({"options": options} if options else {})}


def _configure_sqlite(engine: Engine, begin_sql: str, pragmas: list[str]) -> Engine:
    """SQLAlchemy's documented recipe for explicit transactions: pysqlite
    starts none by itself (``isolation_level = None``), SQLAlchemy starts
    each with ``begin_sql`` (unless the driver's connection has begun one: the writer's IO thread
    takes its own, below); ``pragmas`` run on every new connection."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        for pragma in pragmas:
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # Unless the driver's connection has begun already: the writer's IO thread takes its
        # batch's write lock itself, without waiting (workers.commit.Committer.commit_here).
        if not conn.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
            conn.exec_driver_sql(begin_sql)

    _engines.add(engine)
    return engine


def make_write_engine(settings: Settings) -> Engine:
    """The writer's engine: WAL, IMMEDIATE transactions, one connection."""
    url = settings.database_url
    if not is_sqlite(url):
        engine = create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True,
                               connect_args={"application_name": application_name(program_name(), settings.host)})
        # A statement waits this long at most on a lock another session holds (a session left open
        # in a transaction, another host's writer), then fails retryably (transient_reason),
        # instead of holding the writer, and every client behind it, for as long as that session
        # lives.
        _session_settings(engine, lock_timeout=f"{int(settings.lock_timeout_ms)}ms")
        _engines.add(engine)
        return engine
    path = settings.database_path
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, poolclass=NullPool)
    return _configure_sqlite(engine, "BEGIN IMMEDIATE", [
        f"busy_timeout = {int(settings.busy_timeout_ms)}",
        "journal_mode = WAL",
        f"synchronous = {settings.synchronous}",
        "foreign_keys = ON",
        f"journal_size_limit = {int(settings.journal_size_limit)}",
        # The writer checkpoints on its own schedule and at exit (TRUNCATE);
        # the automatic PASSIVE checkpoint after commits stays on so the WAL
        # cannot grow without bound between them.
        "wal_autocheckpoint = 1000",
    ])


def read_only_url(path: Path) -> str:
    return f"sqlite:///file:{path}?mode=ro&uri=true"


def reader_url(settings: Settings) -> str:
    """The URL readers connect with: SQLite's file opened ``mode=ro``, or ``DATABASE_READ_URL``
    (``DATABASE_URL`` unless set) on a server. For engines built elsewhere (Flask-SQLAlchemy's),
    which then go through :func:`configure_read_only`."""
    path = settings.database_path
    return read_only_url(path) if path is not None else settings.database_read_url


def make_read_engine(settings: Settings, pool_size: int = 5) -> Engine:
    """A read-only engine. On SQLite each transaction is a consistent snapshot;
    keep them short, since an open read holds back WAL checkpoints. On
    PostgreSQL each statement is a transaction of its own (:func:`configure_read_only`)."""
    url = reader_url(settings)
    if not is_sqlite(url):
        return configure_read_only(create_engine(url, pool_size=pool_size, pool_pre_ping=True), settings)
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size)
    return configure_read_only(engine, settings)


def configure_read_only(engine: Engine, settings: Settings, timed: bool = True, role: str | None = None,
                        bounded_lock_wait: bool = False) -> Engine:
    """Make an engine built elsewhere (Flask-SQLAlchemy's, on :func:`reader_url`) behave like
    :func:`make_read_engine`'s, fork-safe. SQLite: query_only, busy timeout, explicit snapshot
    transactions. PostgreSQL: every session ``default_transaction_read_only`` from its first
    statement (set when the connection is made, so no transaction of it can write: "cannot
    execute INSERT in a read-only transaction"), whatever the role may do, and each statement in a
    transaction of its own (autocommit: none is left open between them). ``timed``: every
    statement is timed into this process's slowest reads (:mod:`db.slowreads`, the console's
    "Slowest reads"), its text without literal values, never its parameters. ``role``: what its
    sessions are named for (:func:`application_name`; the program's name by default), e.g. ``api``
    and ``console`` for the two web apps, which run under one program (gunicorn). ``bounded_lock_wait``
    (the web apps'): on PostgreSQL a statement waits ``TICKSTACK_LOCK_TIMEOUT_MS`` at most on a lock
    another session holds, then fails (:func:`db.errors.lock_wait_words`): a table locked by a session
    left open held every request reading it, and in time every thread of the API, for as long as that
    session lived. The workers' reads wait: a failed read ends a worker, and circus's flapping would
    stop one that a minute's lock made fail again at each start."""
    if timed:
        slowreads.instrument(engine, settings.run_dir)
    if is_sqlite(engine):
        return _configure_sqlite(engine, "BEGIN", [f"busy_timeout = {int(settings.busy_timeout_ms)}",
                                                   "query_only = 1"])

    values = {"default_transaction_read_only": "on",
              "application_name": application_name(role or program_name(), settings.host)}
    if bounded_lock_wait:  # 0: no limit, as the writer's
        values["lock_timeout"] = f"{int(settings.lock_timeout_ms)}ms"
    _session_settings(engine, **values)
    # Each statement its own transaction: a read leaves none open while its program folds what it read
    # or waits for the writer. An open one held back the server's vacuum meanwhile, and a DBA's
    # idle_in_transaction_session_timeout ended the session under the analysis worker (a traceback,
    # then a restart). Under READ COMMITTED each statement takes a snapshot of its own anyway.
    engine.update_execution_options(isolation_level="AUTOCOMMIT")
    _engines.add(engine)
    return engine


def _session_settings(engine: Engine, **values: str) -> None:
    """Set these PostgreSQL settings on every new session of ``engine``, before its first statement.
    SQLAlchemy's recipe for session settings (its PostgreSQL "search_path" example): in
    autocommit, so the pool's rollback does not undo them."""
    @event.listens_for(engine, "connect", insert=True)
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True
        cur = dbapi_conn.cursor()
        for name, value in values.items():
            cur.execute("SELECT set_config(%s, %s, false)", (name, value))
        cur.close()
        dbapi_conn.autocommit = autocommit


def checkpoint(conn: Connection, mode: str = "TRUNCATE", wait_ms: int | None = None) -> dict[str, int]:
    """Copy the WAL into the database file; TRUNCATE also empties the WAL.

    Must run outside a transaction. Returns SQLite's answer: ``busy`` is 1
    when a reader kept the checkpoint from finishing (it is then partial).
    ``wait_ms``: how long it waits for readers (``busy_timeout`` for this
    statement alone; None: the connection's own).
    """
    mode = mode.upper()
    if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
        raise ValueError(f"checkpoint mode {mode!r} must be PASSIVE, FULL, RESTART or TRUNCATE")
    if not is_sqlite(conn):
        return {"busy": 0, "log": 0, "checkpointed": 0}
    if conn.in_transaction():
        raise RuntimeError("checkpoint must run outside a transaction")
    # On the DB-API connection: through SQLAlchemy the PRAGMA would start a
    # transaction (BEGIN IMMEDIATE), inside which a checkpoint cannot run.
    sql = f"PRAGMA wal_checkpoint({mode})"
    raw = raw_dbapi(conn)
    before = None
    try:
        if wait_ms is not None:
            before = raw.execute("PRAGMA busy_timeout").fetchone()[0]
            raw.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
        busy, log, done = raw.execute(sql).fetchone()
    except sqlite3.Error as e:  # raised as SQLAlchemy raises the driver's errors (a full disk: SQLITE_FULL)
        raise DBAPIError.instance(sql, None, e, sqlite3.Error) from e
    finally:
        if before is not None:
            raw.execute(f"PRAGMA busy_timeout = {int(before)}")
    return {"busy": int(busy), "log": int(log), "checkpointed": int(done)}


#: errno values of a full disk or an exhausted quota.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def storage_full_reason(exc: BaseException) -> str | None:
    """The database's own words when ``exc`` (or an error under it) says the
    disk is full, e.g. ``"SQLITE_FULL: database or disk is full"`` or
    ``"ENOSPC: No space left on device"``; None for any other error. A full
    disk is a state the writer reports and waits out, not a crash."""
    for e in _errors_under(exc):
        if isinstance(e, sqlite3.Error) and (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_FULL:
            return f"{getattr(e, 'sqlite_errorname', 'SQLITE_FULL')}: {e}"
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return f"{errno.errorcode[e.errno]}: {e.strerror}"
        if getattr(e, "sqlstate", None) == "53100" or getattr(e, "pgcode", None) == "53100":  # PostgreSQL disk_full
            return f"53100 disk_full: {e}".strip()
    return None


#: SQLSTATEs of a transaction that lost a race with another session, through no fault of its work:
#: serialization_failure, deadlock_detected, lock_not_available (a wait over ``lock_timeout``).
_TRANSIENT_STATES = {"40001": "serialization_failure", "40P01": "deadlock_detected", "55P03": "lock_not_available"}
#: SQLite's: the file's write lock (or a table's) held by another connection past busy_timeout.
_TRANSIENT_SQLITE = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def transient_reason(exc: BaseException) -> str | None:
    """The database's own words when ``exc`` (or an error under it) says the work lost a race with
    another session: a deadlock, a serialisation failure or a lock waited on for longer than the
    setting allows (PostgreSQL), a lock held past busy_timeout (SQLite). Nothing of that statement
    was applied and the same work run again can succeed, so it is answered retryably; None for
    any other error."""
    for e in _errors_under(exc):
        state = getattr(e, "sqlstate", None)
        if state in _TRANSIENT_STATES:
            return f"{state} {_TRANSIENT_STATES[state]}: {' '.join(str(e).split())}"
        if isinstance(e, sqlite3.Error) and (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF in _TRANSIENT_SQLITE:
            return f"{getattr(e, 'sqlite_errorname', 'SQLITE_BUSY')}: {e}"
    return None


def server_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error under it) is a connection to the PostgreSQL server that failed in
    a way worth waiting out: refused, reset, the server starting or shutting down (SQLSTATE class 08
    or 57P, or none at all). A wrong password, role or database is not: waiting does not mend those."""
    psycopg = sys.modules.get("psycopg")  # not loaded: the error cannot be one of its
    if psycopg is None:
        return False
    for e in _errors_under(exc):
        state = getattr(e, "sqlstate", None)  # subclasses too: CannotConnectNow (57P03) is "starting up"
        if not isinstance(e, psycopg.OperationalError):
            continue
        if state is None:
            # psycopg gives a failed connection no SQLSTATE, a refused login included: told by libpq's
            # words, or a wrong password was waited out to the deadline (review of round 36).
            return server_trouble(str(e)) != "refuses the login"
        if state[:2] == "08" or state[:3] == "57P":
            return True
    return False


#: SQLSTATEs of a statement naming a column or a table the database does not have yet
#: (undefined_column, undefined_table).
_SCHEMA_BEHIND_STATES = {"42703": "undefined_column", "42P01": "undefined_table"}


def schema_behind_reason(exc: BaseException) -> str | None:
    """The database's own words when ``exc`` (or an error under it) says a statement named a column
    or table the database does not have yet (PostgreSQL): code newer than the schema, until the
    writer's migrations run at its start. None for any other error."""
    for e in _errors_under(exc):
        state = getattr(e, "sqlstate", None)
        if state in _SCHEMA_BEHIND_STATES:
            return f"{state} {_SCHEMA_BEHIND_STATES[state]}: {' '.join(str(e).split())}"
    return None


def io_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error under it) is the disk failing: SQLite's SQLITE_IOERR family or
    SQLITE_READONLY on a file it wrote (a filesystem turned read-only after errors), or errno EIO or
    EROFS."""
    for e in _errors_under(exc):
        if isinstance(e, sqlite3.Error) and (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF in (
                sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY):
            return True
        if isinstance(e, OSError) and e.errno in (errno.EIO, errno.EROFS):
            return True
    return False


def connect_read_only(path: os.PathLike[str] | str, timeout: float = 5.0) -> sqlite3.Connection:
    """A stdlib read-only connection (for PRAGMAs, checks and backups)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(new_database_refusal(path) or f"no database at {path}; start the writer (it creates "
                                "it) or run `python -m db init`")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout, isolation_level=None)
    con.execute("PRAGMA query_only = 1")
    return con


def check_findings(con: sqlite3.Connection, pragma: str = "integrity_check") -> list[str]:
    """``PRAGMA integrity_check`` (or ``quick_check``) on ``con``, one finding an item (``["ok"]``
    when sound): SQLite puts a whole tree's findings in one row, a line each, under a "*** in
    database main ***" heading, and shown as the row it was one line of a hundred findings."""
    return [line for (row,) in con.execute(f"PRAGMA {pragma}") for line in str(row).splitlines()
            if not line.startswith("*** in database ")]


#: What SQLite finding the database file itself damaged means (a commit failed on it, not on the disk);
#: doctor adds how to restore it (:func:`db.backups.restore_advice`, which names the backup).
DAMAGED_FILE_ADVICE = ("The database file is damaged (SQLite met a page it cannot read): see where with `python -m db "
                       "health --quick-check`")


def damaged_database(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error under it) is SQLite finding the database file damaged: SQLITE_CORRUPT
    ("database disk image is malformed") or SQLITE_NOTADB, which no retry mends (a failing disk is :func:`io_error`)."""
    return any(isinstance(e, sqlite3.Error) and (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF in (
        sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) for e in _errors_under(exc))


def _errors_under(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every error under it (SQLAlchemy's ``orig``, causes, contexts), each once."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [x for x in (getattr(e, "orig", None), e.__cause__, e.__context__) if isinstance(x, BaseException)]


def raw_dbapi(conn: Connection) -> Any:
    """The DB-API connection under ``conn`` (for executemany fast paths)."""
    return conn.connection.dbapi_connection
