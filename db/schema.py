"""Create or upgrade the schema, recording each step in ``schema_version``.

Migrations are ordered and each runs once, in the writer's IMMEDIATE
transaction, so a crash mid-upgrade leaves the previous version intact.
"""
from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import insert, inspect, select
from sqlalchemy.engine import Connection

from db.models import SchemaVersion, metadata, now_ms


def _v1_initial(conn: Connection) -> None:
    # Version 1 is the schema as first released; later versions must add
    # their own steps here instead of editing models under an old number.
    metadata.create_all(conn)


def _v2_reasons_of_64(conn: Connection) -> None:
    # update_trade and close_trade take a reason of up to 64 characters (db.validation, the API's
    # document), stored in trade_events.kind and trades.close_reason, which v1 declared VARCHAR(32):
    # SQLite never enforces a length, PostgreSQL refuses the longer ones (the request failed).
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("ALTER TABLE trades ALTER COLUMN close_reason TYPE VARCHAR(64)")
        conn.exec_driver_sql("ALTER TABLE trade_events ALTER COLUMN kind TYPE VARCHAR(64)")


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "initial schema", _v1_initial),
    (2, "trade reasons of 64 characters", _v2_reasons_of_64),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table(SchemaVersion.__tablename__):
        return 0
    return conn.execute(select(SchemaVersion.version).order_by(SchemaVersion.version.desc())).scalar() or 0


#: The advisory lock that serialises migrations on PostgreSQL (any constant all our processes share).
MIGRATION_LOCK = 0x7469636B_6D696772  # "tickmigr"


def migrate(conn: Connection) -> tuple[int, int]:
    """Apply every migration newer than the database; returns (from, to).

    One at a time: on SQLite the writer's ``BEGIN IMMEDIATE`` serialises them; on PostgreSQL a
    transaction-scoped advisory lock does (two ``db init`` or writers starting together otherwise
    both create the tables, and one fails with a duplicate key). The second waits for the first to
    commit, then finds the schema current."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
    before = current_version(conn)
    if before > SCHEMA_VERSION:
        raise RuntimeError(f"the database is at schema version {before}, newer than this code's "
                           f"{SCHEMA_VERSION}; upgrade tickstack")
    for version, _what, step in MIGRATIONS:
        if version > before:
            step(conn)
            conn.execute(insert(SchemaVersion).values(version=version, applied_at=now_ms()))
    return before, SCHEMA_VERSION
