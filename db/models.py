"""The schema, in portable SQLAlchemy: nothing here assumes SQLite.

Times are integer epoch milliseconds UTC everywhere (``ts``), so that every
process and every database compares them the same way.
"""
from __future__ import annotations

import time
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

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


class Base(DeclarativeBase):
    metadata = metadata


class SchemaVersion(Base):
    """One row per migration applied, so the writer knows where it stands."""

    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    applied_at: Mapped[int] = mapped_column(BigInteger)


#: A tick's unique key: who produced it and its sequence number there.
TICK_KEY = ("source", "seq")


class Tick(Base):
    __tablename__ = "ticks"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    symbol: Mapped[str] = mapped_column(String(32))
    ts: Mapped[int] = mapped_column(BigInteger)
    bid: Mapped[float] = mapped_column(Float)
    ask: Mapped[float] = mapped_column(Float)
    volume: Mapped[float] = mapped_column(Float, default=0.0)
    #: Who produced the tick and its sequence number there: (source, seq) is
    #: unique, so a replayed or retried tick is stored once.
    source: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    __table_args__ = (
        UniqueConstraint(*TICK_KEY),
        Index("ix_ticks_symbol_ts", "symbol", "ts"),
        # Ids never go back, even after retention deletes the newest rows:
        # workers resume from "the last tick id I processed".
        {"sqlite_autoincrement": True},
    )


class Bar(Base):
    """OHLCV bar; ``ts`` is the bucket start, floor(ts / length) * length."""

    __tablename__ = "bars"
    symbol: Mapped[str] = mapped_column(String(32), primary_key=True)
    timeframe: Mapped[str] = mapped_column(String(8), primary_key=True)
    ts: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    open: Mapped[float] = mapped_column(Float)
    high: Mapped[float] = mapped_column(Float)
    low: Mapped[float] = mapped_column(Float)
    close: Mapped[float] = mapped_column(Float)
    volume: Mapped[float] = mapped_column(Float)
    tick_count: Mapped[int] = mapped_column(Integer, default=0)


class IndicatorValue(Base):
    __tablename__ = "indicators"
    symbol: Mapped[str] = mapped_column(String(32), primary_key=True)
    timeframe: Mapped[str] = mapped_column(String(8), primary_key=True)
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    ts: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    value: Mapped[float] = mapped_column(Float)


#: The analysis worker's cursor (:class:`Cursor`): the last tick id it folded into bars. Retention
#: deletes no tick after it (``prune_ticks``): its bars would never be built.
ANALYSIS_CURSOR = "analysis"


class Cursor(Base):
    """A worker's progress marker (e.g. the last tick id analysed)."""

    __tablename__ = "cursors"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class Trade(Base):
    """A paper trade and the exit rules the monitor applies to it."""

    __tablename__ = "trades"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    symbol: Mapped[str] = mapped_column(String(32), index=True)
    side: Mapped[str] = mapped_column(String(4))  # buy | sell
    size: Mapped[float] = mapped_column(Float)
    entry_price: Mapped[float] = mapped_column(Float)
    stop_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    take_profit: Mapped[float | None] = mapped_column(Float, nullable=True)
    trailing_distance: Mapped[float | None] = mapped_column(Float, nullable=True)
    breakeven_trigger: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Best price seen since entry (highest for a buy, lowest for a sell).
    best_price: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(8), default="open", index=True)  # open | closed
    opened_at: Mapped[int] = mapped_column(BigInteger)
    closed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    exit_price: Mapped[float | None] = mapped_column(Float, nullable=True)
    pnl: Mapped[float | None] = mapped_column(Float, nullable=True)
    close_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)  # 32 before schema v2
    #: Last tick id the monitor applied to this trade.
    last_tick_id: Mapped[int] = mapped_column(BigInteger, default=0)
    # A trade's id is a client's handle on it (update_trade, close_trade): never given again, even
    # after a restore of an older backup (db.restore continues the counter). Schema v5 on SQLite.
    __table_args__ = ({"sqlite_autoincrement": True},)


class TradeEvent(Base):
    __tablename__ = "trade_events"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    trade_id: Mapped[int] = mapped_column(ForeignKey("trades.id"), index=True)
    ts: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(64))  # opened, stop_moved, closed, ... (32 before schema v2)
    price: Mapped[float | None] = mapped_column(Float, nullable=True)
    pnl: Mapped[float | None] = mapped_column(Float, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    __table_args__ = ({"sqlite_autoincrement": True},)  # as trades' (schema v5)


#: How an ok job run's detail starts when its check could not be made (amcheck not installed).
SKIPPED = "skipped: "


class JobRun(Base):
    __tablename__ = "job_runs"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(String(64), index=True)
    started_at: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int] = mapped_column(BigInteger)
    duration_ms: Mapped[int] = mapped_column(BigInteger)
    ok: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[str] = mapped_column(Text, default="")

    @property
    def skipped(self) -> bool:
        """An ok run whose check could not be made: neither passed nor failed."""
        return bool(self.ok) and (self.detail or "").startswith(SKIPPED)


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    ts: Mapped[int] = mapped_column(BigInteger, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128), default="")
    result: Mapped[str] = mapped_column(String(16))  # one of AUDIT_RESULTS
    detail: Mapped[str] = mapped_column(Text, default="")


class Sample(Base):
    """A measurement for the console's charts (last hour and more): ingest
    rate, commit latency, queue depth, WAL size, CPU and memory per watcher.
    ``labels`` is e.g. the watcher name; empty for stack-wide series."""

    __tablename__ = "samples"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    ts: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(64))
    labels: Mapped[str] = mapped_column(String(128), default="")
    value: Mapped[float] = mapped_column(Float)
    __table_args__ = (Index("ix_samples_name_ts", "name", "ts"), Index("ix_samples_ts", "ts"))


class AppliedRequest(Base):
    """Requests the writer has committed, with their results.

    Written in the same transaction as the request's effects, so a client
    that retries after a writer crash gets the first result back instead of
    applying the request twice.
    """

    __tablename__ = "applied_requests"
    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    committed_at: Mapped[int] = mapped_column(BigInteger, index=True)
    result: Mapped[bytes] = mapped_column(LargeBinary)
    #: What the request asked for (:func:`db.protocol.request_digest`), so that another request under
    #: the same id is told apart from a resend. Schema v4; NULL for requests recorded before it,
    #: which are not compared.
    digest: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


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
