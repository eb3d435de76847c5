"""The schema, in portable SQLAlchemy Core: nothing here assumes SQLite.

Tables, not ORM classes: reads and writes are Core statements everywhere, and a process that loads
SQLAlchemy's ORM spends 40 to 80 ms more CPU starting (the ORM and the mapping of the classes), in
every worker, writer and ``python -m db`` command. ``tests/test_process_imports.py`` checks that
none loads it.

Times are integer epoch milliseconds UTC everywhere (``ts``), so that every
process and every database compares them the same way.
"""
from __future__ import annotations

import time
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

#: How an audited action went. ``skipped``: neither done nor failed (a check that could not be made,
#: amcheck not installed; a backup asked for while another was written).
AUDIT_RESULTS = ("ok", "error", "denied", "skipped")

# A 64-bit integer key that is still SQLite's fast rowid alias.
Id = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


#: The schema version table: one row per migration applied, so the writer knows where it stands.
schema_version_table = Table(
    "schema_version", metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", BigInteger, nullable=False),
)

#: A tick's unique key: who produced it and its sequence number there.
TICK_KEY = ("source", "seq")

ticks_table = Table(
    "ticks", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("symbol", String(32), nullable=False),
    Column("ts", BigInteger, nullable=False),
    Column("bid", Float, nullable=False),
    Column("ask", Float, nullable=False),
    Column("volume", Float, nullable=False, default=0.0),
    # Who produced the tick and its sequence number there: (source, seq) is unique, so a replayed or
    # retried tick is stored once.
    Column("source", String(64), nullable=False),
    Column("seq", BigInteger, nullable=True),
    UniqueConstraint(*TICK_KEY),
    Index("ix_ticks_symbol_ts", "symbol", "ts"),
    # Ids never go back, even after retention deletes the newest rows: workers resume from "the last
    # tick id I processed".
    sqlite_autoincrement=True,
)

#: OHLCV bars; ``ts`` is the bucket start, floor(ts / length) * length.
bars_table = Table(
    "bars", metadata,
    Column("symbol", String(32), primary_key=True),
    Column("timeframe", String(8), primary_key=True),
    Column("ts", BigInteger, primary_key=True),
    Column("open", Float, nullable=False),
    Column("high", Float, nullable=False),
    Column("low", Float, nullable=False),
    Column("close", Float, nullable=False),
    Column("volume", Float, nullable=False),
    Column("tick_count", Integer, nullable=False, default=0),
)

indicators_table = Table(
    "indicators", metadata,
    Column("symbol", String(32), primary_key=True),
    Column("timeframe", String(8), primary_key=True),
    Column("name", String(32), primary_key=True),
    Column("ts", BigInteger, primary_key=True),
    Column("value", Float, nullable=False),
)

#: The analysis worker's cursor (a row of :data:`cursors_table`): the last tick id it folded into
#: bars. Retention deletes no tick after it (``prune_ticks``): its bars would never be built.
ANALYSIS_CURSOR = "analysis"

#: Workers' progress markers (e.g. the last tick id analysed), with the state that goes with them.
cursors_table = Table(
    "cursors", metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
    Column("state", LargeBinary, nullable=True),
)

#: Paper trades and the exit rules the monitor applies to them.
trades_table = Table(
    "trades", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("symbol", String(32), nullable=False, index=True),
    Column("side", String(4), nullable=False),  # buy | sell
    Column("size", Float, nullable=False),
    Column("entry_price", Float, nullable=False),
    Column("stop_loss", Float, nullable=True),
    Column("take_profit", Float, nullable=True),
    Column("trailing_distance", Float, nullable=True),
    Column("breakeven_trigger", Float, nullable=True),
    # Best price seen since entry (highest for a buy, lowest for a sell).
    Column("best_price", Float, nullable=True),
    Column("status", String(8), nullable=False, default="open", index=True),  # open | closed
    Column("opened_at", BigInteger, nullable=False),
    Column("closed_at", BigInteger, nullable=True),
    Column("exit_price", Float, nullable=True),
    Column("pnl", Float, nullable=True),
    Column("close_reason", String(64), nullable=True),  # 32 before schema v2
    # Last tick id the monitor applied to this trade.
    Column("last_tick_id", BigInteger, nullable=False, default=0),
    # A trade's id is a client's handle on it (update_trade, close_trade): never given again, even
    # after a restore of an older backup (db.restore continues the counter). Schema v5 on SQLite.
    sqlite_autoincrement=True,
)

trade_events_table = Table(
    "trade_events", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("trade_id", ForeignKey("trades.id"), nullable=False, index=True),
    Column("ts", BigInteger, nullable=False),
    Column("kind", String(64), nullable=False),  # opened, stop_moved, closed, ... (32 before schema v2)
    Column("price", Float, nullable=True),
    Column("pnl", Float, nullable=True),
    Column("detail", Text, nullable=False, default=""),
    sqlite_autoincrement=True,  # as trades' (schema v5)
)

#: How an ok job run's detail starts when its check could not be made (amcheck not installed).
SKIPPED = "skipped: "

job_runs_table = Table(
    "job_runs", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("job", String(64), nullable=False, index=True),
    Column("started_at", BigInteger, nullable=False),
    Column("finished_at", BigInteger, nullable=False),
    Column("duration_ms", BigInteger, nullable=False),
    Column("ok", Boolean, nullable=False),
    Column("detail", Text, nullable=False, default=""),
)


audit_log_table = Table(
    "audit_log", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("ts", BigInteger, nullable=False, index=True),
    Column("actor", String(64), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(128), nullable=False, default=""),
    Column("result", String(16), nullable=False),  # one of AUDIT_RESULTS
    Column("detail", Text, nullable=False, default=""),
)

#: Measurements for the console's charts (last hour and more): ingest rate, commit latency, queue
#: depth, WAL size, CPU and memory per watcher. ``labels`` is e.g. the watcher name; empty for
#: stack-wide series.
samples_table = Table(
    "samples", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("ts", BigInteger, nullable=False),
    Column("name", String(64), nullable=False),
    Column("labels", String(128), nullable=False, default=""),
    Column("value", Float, nullable=False),
    Index("ix_samples_name_ts", "name", "ts"),
    Index("ix_samples_ts", "ts"),
)

#: Requests the writer has committed, with their results. Written in the same transaction as the
#: request's effects, so a client that retries after a writer crash gets the first result back
#: instead of applying the request twice.
applied_requests_table = Table(
    "applied_requests", metadata,
    Column("client_id", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("committed_at", BigInteger, nullable=False, index=True),
    Column("result", LargeBinary, nullable=False),
    # What the request asked for (db.protocol.request_digest), so that another request under the
    # same id is told apart from a resend. Schema v4; NULL for requests recorded before it, which are
    # not compared.
    Column("digest", LargeBinary, nullable=True),
)


def now_ms() -> int:
    """Now, in the epoch milliseconds UTC every ``ts`` column holds. The one
    clock of the stack: every ``ts`` written or compared comes from here."""
    return int(time.time() * 1000)


def trade_pnl(side: str, entry: float, exit_price: float, size: float) -> float:
    """Profit or loss of ``size`` units bought (``side`` "buy") or sold at
    ``entry`` and closed at ``exit_price``; the one rule for realised P&L
    (close_trade) and marked-to-market P&L (open trades in API and console).

    Exact in decimal, as an exchange computes it: each input is taken as the
    shortest decimal that gives its float back (``repr``: 97012.35, not
    97012.350000000006...), so the P&L has at most the decimals of the prices
    plus those of the size, and only then becomes the nearest float. Float
    arithmetic would leak binary noise into the money: (97001.8 - 97012.35) *
    0.35 is -3.692500000001018 in floats and -3.6925 here."""
    opened, closed = Decimal(repr(float(entry))), Decimal(repr(float(exit_price)))
    return float(((closed - opened) if side == "buy" else (opened - closed)) * Decimal(repr(float(size))))
