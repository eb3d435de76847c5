"""The reads more than one place needs: the read side's counterpart of :mod:`db.ops`.

Each query is a plain function of a SQLAlchemy ``Connection`` or ``Session``
(the web apps pass Flask-SQLAlchemy's ``db.session`` on the read-only engine,
the workers their own read connections, and the writer its connection inside
the batch transaction), takes plain values and returns rows (attribute access
by column name, ``_asdict()`` for JSON) or plain values. So a rule such as
"the latest tick of a symbol" or "what an open trade is worth now" is written
once, and the API, the console and the writer cannot drift apart.

Like the ops, queries stay portable SQL (SQLite or PostgreSQL).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, Select, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from db.models import Bar, IndicatorValue, Sample, Tick, Trade, TradeEvent, trade_pnl

#: What a query runs on: a connection (workers, the writer) or a session (the web apps).
Reader = Connection | Session

TICK_COLUMNS = (Tick.id, Tick.symbol, Tick.ts, Tick.bid, Tick.ask, Tick.volume, Tick.source, Tick.seq)
BAR_COLUMNS = (Bar.ts, Bar.open, Bar.high, Bar.low, Bar.close, Bar.volume)
INDICATOR_COLUMNS = (IndicatorValue.ts, IndicatorValue.value)
#: A trade as callers show it (``last_tick_id`` is the monitor's bookkeeping, left out).
TRADE_COLUMNS = (Trade.id, Trade.symbol, Trade.side, Trade.size, Trade.entry_price, Trade.stop_loss,
                 Trade.take_profit, Trade.trailing_distance, Trade.breakeven_trigger, Trade.best_price,
                 Trade.status, Trade.opened_at, Trade.closed_at, Trade.exit_price, Trade.pnl, Trade.close_reason)
EVENT_COLUMNS = (TradeEvent.id, TradeEvent.ts, TradeEvent.kind, TradeEvent.price, TradeEvent.pnl,
                 TradeEvent.detail)


def _newest_oldest_first(conn: Reader, stmt: Select, ts_column: Any, since: int | None, until: int | None,
                         limit: int, *tiebreak: Any) -> list[Row]:
    """Rows of ``stmt`` with ``ts_column`` in [since, until] (either bound may be None), the newest
    ``limit`` of them, returned oldest first: what a chart or an API page of a series wants."""
    if since is not None:
        stmt = stmt.where(ts_column >= since)
    if until is not None:
        stmt = stmt.where(ts_column <= until)
    order = [ts_column.desc(), *(c.desc() for c in tiebreak)]
    rows = list(conn.execute(stmt.order_by(*order).limit(limit)).all())
    rows.reverse()
    return rows


# --- ticks and prices ------------------------------------------------------------------------


def latest_tick(conn: Reader, symbol: str) -> Row | None:
    """The latest tick of ``symbol`` (by ts, then id), or None when it has none."""
    return conn.execute(select(*TICK_COLUMNS).where(Tick.symbol == symbol)
                        .order_by(Tick.ts.desc(), Tick.id.desc()).limit(1)).first()


def latest_ticks(conn: Reader, symbols: Iterable[str]) -> dict[str, Row]:
    """Symbol -> its latest tick, for the symbols that have one (one index seek each)."""
    out = {}
    for symbol in symbols:
        tick = latest_tick(conn, symbol)
        if tick is not None:
            out[symbol] = tick
    return out


def market_price(tick: Any, side: str, *, opening: bool) -> float:
    """The price a market order gets at ``tick``: a buy opens at the ask and closes at the bid, a
    sell the other way round. Marking an open trade to market uses the closing price (what closing
    it now would get)."""
    return float(tick.ask if (side == "buy") == opening else tick.bid)


def tick_series(conn: Reader, symbol: str, *, since: int | None = None, until: int | None = None,
                limit: int) -> list[Row]:
    """The newest ``limit`` ticks of ``symbol`` with ts in [since, until], oldest first (ties by id)."""
    stmt = select(*TICK_COLUMNS).where(Tick.symbol == symbol)
    return _newest_oldest_first(conn, stmt, Tick.ts, since, until, limit, Tick.id)


# --- bars and indicators ---------------------------------------------------------------------


def bar_series(conn: Reader, symbol: str, timeframe: str, *, since: int | None = None, until: int | None = None,
               limit: int) -> list[Row]:
    """The newest ``limit`` bars of ``symbol`` and ``timeframe`` (ts: bucket start) in [since, until],
    oldest first."""
    stmt = select(*BAR_COLUMNS).where(Bar.symbol == symbol, Bar.timeframe == timeframe)
    return _newest_oldest_first(conn, stmt, Bar.ts, since, until, limit)


def indicator_series(conn: Reader, symbol: str, timeframe: str, name: str, *, since: int | None = None,
                     until: int | None = None, limit: int) -> list[Row]:
    """The newest ``limit`` values of indicator ``name`` for ``symbol`` and ``timeframe`` in
    [since, until], oldest first."""
    stmt = select(*INDICATOR_COLUMNS).where(IndicatorValue.symbol == symbol, IndicatorValue.timeframe == timeframe,
                                            IndicatorValue.name == name)
    return _newest_oldest_first(conn, stmt, IndicatorValue.ts, since, until, limit)


# --- trades ----------------------------------------------------------------------------------


def trade(conn: Reader, trade_id: int) -> Row | None:
    """The trade with id ``trade_id``, or None."""
    return conn.execute(select(*TRADE_COLUMNS).where(Trade.id == trade_id)).first()


def trade_events(conn: Reader, trade_id: int) -> list[Row]:
    """The events of trade ``trade_id``, oldest first."""
    return list(conn.execute(select(*EVENT_COLUMNS).where(TradeEvent.trade_id == trade_id)
                             .order_by(TradeEvent.ts, TradeEvent.id)).all())


def trades(conn: Reader, *, status: str | None = None, symbol: str | None = None,
           limit: int | None = None) -> list[Row]:
    """Trades newest first (by id), only ``status`` and ``symbol`` when given, at most ``limit``."""
    stmt = select(*TRADE_COLUMNS)
    if status is not None:
        stmt = stmt.where(Trade.status == status)
    if symbol is not None:
        stmt = stmt.where(Trade.symbol == symbol)
    return list(conn.execute(stmt.order_by(Trade.id.desc()).limit(limit)).all())


@dataclass(frozen=True)
class Mark:
    """An open trade marked to market: the price closing it now would get (from the latest tick of
    its symbol) and the unrealised P&L at that price (:func:`db.models.trade_pnl`, the rule that
    ``close_trade`` realises)."""

    price: float
    ts: int
    tick_id: int
    pnl: float


def marks(conn: Reader, trades_: Sequence[Any]) -> dict[int, Mark | None]:
    """Trade id -> its :class:`Mark` for each open trade of ``trades_`` (rows with id, symbol, side,
    size, entry_price, status); None for one whose symbol has no tick. The latest tick of each
    symbol is read once."""
    open_ = [t for t in trades_ if t.status == "open"]
    ticks = latest_ticks(conn, sorted({t.symbol for t in open_}))
    out: dict[int, Mark | None] = {}
    for t in open_:
        tick = ticks.get(t.symbol)
        if tick is None:
            out[t.id] = None
            continue
        price = market_price(tick, t.side, opening=False)
        out[t.id] = Mark(price, tick.ts, tick.id, trade_pnl(t.side, t.entry_price, price, t.size))
    return out


# --- samples (the console's charts) ------------------------------------------------------------


def samples_since(conn: Reader, names: Sequence[str], since_ms: int) -> list[Row]:
    """Samples (name, labels, ts, value) of the series ``names`` since ``since_ms``, in time order."""
    return list(conn.execute(select(Sample.name, Sample.labels, Sample.ts, Sample.value)
                             .where(Sample.name.in_(names), Sample.ts >= since_ms)
                             .order_by(Sample.ts, Sample.id)).all())


def latest_sample(conn: Reader, name: str, since_ms: int) -> Row | None:
    """The latest sample (ts, value) of series ``name`` since ``since_ms``, or None."""
    return conn.execute(select(Sample.ts, Sample.value).where(Sample.name == name, Sample.ts >= since_ms)
                        .order_by(Sample.ts.desc()).limit(1)).first()


def sample_totals(conn: Reader, name: str, since_ms: int) -> dict[str, float]:
    """Label -> the sum of series ``name``'s values since ``since_ms`` (e.g. restarts per watcher)."""
    rows = conn.execute(select(Sample.labels, func.sum(Sample.value))
                        .where(Sample.name == name, Sample.ts >= since_ms).group_by(Sample.labels)).all()
    return {label: float(total or 0) for label, total in rows}
