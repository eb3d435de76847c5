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
"""
from __future__ import annotations

import os
import sqlite3
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from db.config import Settings

_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for engine in list(_engines):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_after_fork)


def is_sqlite(url_or_engine: str | Engine | Connection) -> bool:
    if isinstance(url_or_engine, str):
        return url_or_engine.startswith("sqlite")
    return url_or_engine.dialect.name == "sqlite"


def _configure_sqlite(engine: Engine, begin_sql: str, pragmas: list[str]) -> Engine:
    """SQLAlchemy's documented recipe for explicit transactions: pysqlite
    starts none by itself (``isolation_level = None``), SQLAlchemy starts
    each with ``begin_sql``; ``pragmas`` run on every new connection."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        for pragma in pragmas:
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin_sql)

    _engines.add(engine)
    return engine


def make_write_engine(settings: Settings) -> Engine:
    """The writer's engine: WAL, IMMEDIATE transactions, one connection."""
    url = settings.database_url
    if not is_sqlite(url):
        engine = create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True)
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


def make_read_engine(settings: Settings, pool_size: int = 5) -> Engine:
    """A read-only engine. Each transaction is a consistent snapshot; keep
    them short, since an open read holds back WAL checkpoints."""
    url = settings.database_url
    if not is_sqlite(url):
        engine = create_engine(url, pool_size=pool_size, pool_pre_ping=True)

        @event.listens_for(engine, "begin")
        def _read_only(conn: Connection) -> None:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")

        _engines.add(engine)
        return engine
    path = settings.database_path
    assert path is not None
    engine = create_engine(read_only_url(path), pool_size=pool_size, max_overflow=pool_size)
    return configure_read_only(engine, settings)


def configure_read_only(engine: Engine, settings: Settings) -> Engine:
    """Make an engine built elsewhere (Flask-SQLAlchemy's, on a
    :func:`read_only_url`) behave like :func:`make_read_engine`'s: query_only,
    busy timeout, explicit snapshot transactions, fork-safe."""
    if not is_sqlite(engine):
        return engine
    return _configure_sqlite(engine, "BEGIN", [f"busy_timeout = {int(settings.busy_timeout_ms)}", "query_only = 1"])


def checkpoint(conn: Connection, mode: str = "TRUNCATE") -> dict[str, int]:
    """Copy the WAL into the database file; TRUNCATE also empties the WAL.

    Must run outside a transaction. Returns SQLite's answer: ``busy`` is 1
    when a reader kept the checkpoint from finishing (it is then partial).
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
    busy, log, done = raw_dbapi(conn).execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return {"busy": int(busy), "log": int(log), "checkpointed": int(done)}


def raw_dbapi(conn: Connection) -> Any:
    """The DB-API connection under ``conn`` (for executemany fast paths)."""
    return conn.connection.dbapi_connection
