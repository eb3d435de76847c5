"""Create or upgrade the schema, recording each step in ``schema_version``.

Migrations are ordered and each runs once, in the writer's IMMEDIATE
transaction, so a crash mid-upgrade leaves the previous version intact.
"""
from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import BigInteger, Column, Float, MetaData, PrimaryKeyConstraint, String, Table, insert, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateTable

from db.models import metadata, now_ms, schema_version_table, trade_events_table, trades_table
from db.vocabulary import INDICATORS

#: Indicator values, one row per bar: a column per indicator, NULL where it is not computable yet
#: (a series' first bars). Schema v3; ``indicators`` (symbol, timeframe, name, ts, value) is from then
#: on a view of it, so every reader of the old table reads the same rows. Why: the analysis worker
#: stores four values per bar, and one row of four costs SQLite about a quarter of four rows (bench
#: analysis, hourly). Declared here, with the migration that creates it, on its own MetaData: v1 is
#: ``metadata.create_all``, which must keep creating the v1 tables only. WITHOUT ROWID on SQLite:
#: the primary key is the only way in, so one b-tree instead of a table plus its key's index.
BAR_INDICATORS = Table(
    "bar_indicators", MetaData(),
    Column("symbol", String(32), nullable=False),
    Column("timeframe", String(8), nullable=False),
    Column("ts", BigInteger, nullable=False),
    *(Column(name, Float, nullable=True) for name in INDICATORS),
    PrimaryKeyConstraint("symbol", "timeframe", "ts", name="pk_bar_indicators"),
    sqlite_with_rowid=False,
)


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


def _v3_indicator_rows(conn: Connection) -> None:
    # See BAR_INDICATORS. The stored values move over (one row per (symbol, timeframe, ts), each
    # name's value in its column), then the table gives way to a view of the same name and columns.
    # Skipped when bar_indicators exists: a database whose version rows were rewound (a test's
    # downgrade) but whose tables are already v3.
    if inspect(conn).has_table(BAR_INDICATORS.name):
        return
    BAR_INDICATORS.create(conn)
    pick = ", ".join(f"max(CASE WHEN name = '{n}' THEN value END)" for n in INDICATORS)
    conn.exec_driver_sql(f"INSERT INTO bar_indicators (symbol, timeframe, ts, {', '.join(INDICATORS)}) "
                         f"SELECT symbol, timeframe, ts, {pick} FROM indicators GROUP BY symbol, timeframe, ts")
    conn.exec_driver_sql("DROP TABLE indicators")
    conn.exec_driver_sql("CREATE VIEW indicators AS " + " UNION ALL ".join(
        f"SELECT symbol, timeframe, CAST('{n}' AS VARCHAR(32)) AS name, ts, {n} AS value FROM bar_indicators "
        f"WHERE {n} IS NOT NULL" for n in INDICATORS))


def _v4_request_digests(conn: Connection) -> None:
    # applied_requests.digest (db.models.applied_requests_table): what each applied request asked for, so that
    # a different request under an applied id is refused instead of answered with the first one's
    # result. Nullable: the rows recorded before it have none and are not compared. v1's create_all
    # already made it on a database created since (and on one whose version rows were rewound).
    if "digest" in {c["name"] for c in inspect(conn).get_columns("applied_requests")}:
        return
    blob = "BYTEA" if conn.dialect.name == "postgresql" else "BLOB"
    conn.exec_driver_sql(f"ALTER TABLE applied_requests ADD COLUMN digest {blob}")


def _create_as(conn: Connection, table: Table, name: str, references: tuple[str, str] | None = None) -> None:
    """CREATE TABLE ``name`` as the model's ``table`` is declared (columns, keys, AUTOINCREMENT), its
    foreign key to ``references[0]`` pointing at ``references[1]`` instead; no index (made once it has
    the model's name)."""
    sql = str(CreateTable(table).compile(dialect=conn.dialect)).strip()
    head = f"CREATE TABLE {table.name} ("
    if not sql.startswith(head):
        raise RuntimeError(f"unexpected DDL for {table.name}: {sql[:80]}")
    sql = f"CREATE TABLE {name} (" + sql[len(head):]
    if references is not None:
        old, new = (f"REFERENCES {t} (id)" for t in references)
        if sql.count(old) != 1:
            raise RuntimeError(f"unexpected DDL for {table.name}: {sql[:200]}")
        sql = sql.replace(old, new)
    conn.exec_driver_sql(sql)


def _v5_trade_ids_never_reused(conn: Connection) -> None:
    # SQLite gave a new trade the highest id + 1 (a plain rowid): after a restore of a backup older
    # than a trade, its id (acknowledged to a client, which may close it by id) was given to the next
    # trade. AUTOINCREMENT keeps a counter that db.restore continues; SQLite cannot add it to a table,
    # so trades and trade_events are made again (the SQLite manual's procedure, in this transaction,
    # with foreign keys on: the events' copy points at the trades' copy until the renames, so neither
    # drop leaves a row pointing at nothing). A counter already there for the name (a restore into a
    # backup older than v5 wrote one) is kept when it is higher. PostgreSQL ids are sequences already.
    if conn.dialect.name != "sqlite":
        return
    ddl = dict(conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
    if "AUTOINCREMENT" in (ddl.get(trades_table.name) or "").upper():
        return  # made by v1's create_all since, or a database whose version rows were rewound
    orphans = conn.exec_driver_sql(f"PRAGMA foreign_key_check({trade_events_table.name})").fetchall()
    if orphans:  # the copy would fail on them (foreign keys on), in words no one could act on
        raise RuntimeError(
            f"schema v5 copies trade_events, and {len(orphans)} of them point at trades that do not exist (rowids "
            f"{', '.join(str(row[1]) for row in orphans[:5])}{', ...' if len(orphans) > 5 else ''}: deleted by hand "
            "with foreign keys off?); the database is left as it was. Delete those events (DELETE FROM trade_events "
            "WHERE trade_id NOT IN (SELECT id FROM trades)) or put their trades back, then start the writer again")
    counters = {}
    if "sqlite_sequence" in ddl:
        for name in (trades_table.name, trade_events_table.name):
            counters[name] = conn.exec_driver_sql("SELECT max(seq) FROM sqlite_sequence WHERE name = ?",
                                                  (name,)).scalar()
            conn.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = ?", (name,))
    trades, events = trades_table, trade_events_table
    for table, refs in ((trades, None), (events, (trades.name, f"{trades.name}_v5"))):
        _create_as(conn, table, f"{table.name}_v5", refs)
        columns = ", ".join(c.name for c in table.columns)
        conn.exec_driver_sql(f"INSERT INTO {table.name}_v5 ({columns}) SELECT {columns} FROM {table.name}")
    for table in (events, trades):  # the child first: then nothing points at trades
        conn.exec_driver_sql(f"DROP TABLE {table.name}")
    for table in (trades, events):  # SQLite renames the events' reference to trades_v5 with it
        conn.exec_driver_sql(f"ALTER TABLE {table.name}_v5 RENAME TO {table.name}")
        for index in table.indexes:
            index.create(conn)
        kept = counters.get(table.name)
        if kept is not None and not conn.exec_driver_sql("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?",
                                                         (kept, table.name)).rowcount:
            conn.exec_driver_sql("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table.name, kept))


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "initial schema", _v1_initial),
    (2, "trade reasons of 64 characters", _v2_reasons_of_64),
    (3, "indicator values one row per bar (bar_indicators; indicators a view of it)", _v3_indicator_rows),
    (4, "a digest of each applied request (applied_requests.digest)", _v4_request_digests),
    (5, "trade and trade event ids never given again (AUTOINCREMENT on SQLite)", _v5_trade_ids_never_reused),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table(schema_version_table.name):
        return 0
    version = schema_version_table.c.version
    return conn.execute(select(version).order_by(version.desc())).scalar() or 0


#: The advisory lock that serialises migrations on PostgreSQL (any constant all our processes share).
MIGRATION_LOCK = 0x7469636B_6D696772  # "tickmigr"


def migrate(conn: Connection) -> tuple[int, int]:
    """Apply every migration newer than the database; returns (from, to).

    One at a time: on SQLite the writer's ``BEGIN IMMEDIATE`` serialises them; on PostgreSQL a
    transaction-scoped advisory lock does (two ``db init`` or writers starting together otherwise
    both create the tables, and one fails with a duplicate key). The second waits for the first to
    commit, then finds the schema current."""
    if conn.dialect.name == "postgresql":
        # However long the first takes: the write session's lock_timeout is for batches, not this.
        conn.exec_driver_sql("SET LOCAL lock_timeout = 0")
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
    before = current_version(conn)
    if before > SCHEMA_VERSION:
        raise RuntimeError(f"the database is at schema version {before}, newer than this code's "
                           f"{SCHEMA_VERSION}; upgrade tickstack")
    for version, _what, step in MIGRATIONS:
        if version > before:
            step(conn)
            conn.execute(insert(schema_version_table).values(version=version, applied_at=now_ms()))
    return before, SCHEMA_VERSION
