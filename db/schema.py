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


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "initial schema", _v1_initial),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table(SchemaVersion.__tablename__):
        return 0
    return conn.execute(select(SchemaVersion.version).order_by(SchemaVersion.version.desc())).scalar() or 0


def migrate(conn: Connection) -> tuple[int, int]:
    """Apply every migration newer than the database; returns (from, to)."""
    before = current_version(conn)
    if before > SCHEMA_VERSION:
        raise RuntimeError(f"the database is at schema version {before}, newer than this code's "
                           f"{SCHEMA_VERSION}; upgrade tickstack")
    for version, _what, step in MIGRATIONS:
        if version > before:
            step(conn)
            conn.execute(insert(SchemaVersion).values(version=version, applied_at=now_ms()))
    return before, SCHEMA_VERSION
