"""Market data: the latest tick per symbol, candlesticks per symbol and timeframe, open trades with
their live P&L (marked at the latest bid for a buy, the ask for a sell: what closing would get) and
their events, and closing a trade (the writer's ``close_trade``; confirmed, audited).

Symbols are listed with a skip-scan over the ``(symbol, ts)`` index (one index seek per symbol), so
the page stays fast with millions of ticks.
"""
from __future__ import annotations

import json
from typing import Any

from flask import flash, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select, text

from db import queries, validation
from db.errors import ValidationError, WriterError
from db.models import now_ms, trade_events_table, trades_table
from db.vocabulary import TIMEFRAMES
from webapp.console.charts import DEFAULT_BAR_RANGE, MAX_BARS, RANGE_NAMES, price_chart, range_arg
from webapp.console.common import audit, bad_request, bp, call_writer, int_arg, settings
from webapp.console.formats import pnl, price
from webapp.extensions import db

MAX_SYMBOLS = 200
#: Backfills (late ticks the analysis worker folded into older bars) shown from this far back.
BACKFILL_WINDOW_MS = 24 * 3600 * 1000

# One index seek per distinct symbol, in SQLite and PostgreSQL alike.
_SYMBOLS_SQL = """
WITH RECURSIVE s(symbol) AS (
    SELECT MIN(symbol) FROM {table}
    UNION ALL
    SELECT (SELECT MIN(symbol) FROM {table} WHERE symbol > s.symbol) FROM s WHERE s.symbol IS NOT NULL
)
SELECT symbol FROM s WHERE symbol IS NOT NULL LIMIT :limit
"""


def symbols() -> list[str]:
    """Every symbol with ticks or bars (at most :data:`MAX_SYMBOLS`), sorted."""
    found: set[str] = set()
    for table in ("ticks", "bars"):
        found.update(db.session.execute(text(_SYMBOLS_SQL.format(table=table)), {"limit": MAX_SYMBOLS}).scalars())
    return sorted(found)[:MAX_SYMBOLS]


def open_trades() -> list[dict[str, Any]]:
    """Open trades, newest first, with the mark price (and its tick's time) and the unrealised P&L
    of :func:`db.queries.marks`; None for both without a tick."""
    trades = queries.trades(db.session, status="open").rows
    marks = queries.marks(db.session, trades)
    out = []
    for t in trades:
        mark = marks[t.id]
        out.append({
            "id": t.id, "symbol": t.symbol, "side": t.side, "size": t.size, "entry_price": t.entry_price,
            "stop_loss": t.stop_loss, "take_profit": t.take_profit, "opened_at": t.opened_at,
            "mark": mark.price if mark else None, "mark_ts": mark.ts if mark else None,
            "pnl": mark.pnl if mark else None,
        })
    return out


def _checked(validator: validation.Validator, name: str, raw: str | None) -> str:
    """``raw`` checked by the writer's own ``validator`` (its rule and message); else 400, and
    "required" for a parameter not given (it read "None is not a symbol"), as the API says it."""
    if raw is None or raw == "":
        bad_request(f"{name}: required")
    try:
        return validator(name, raw)
    except ValidationError as e:
        bad_request(str(e))


def check_symbol(raw: str | None) -> str:
    return _checked(validation.symbol, "symbol", raw)


def check_timeframe(raw: str | None) -> str:
    return _checked(validation.timeframe, "timeframe", raw)


def decimals_of(symbols: list[str]) -> dict[str, int]:
    """Each symbol's price decimals: configured (``TICKSTACK_PRICE_DECIMALS``) or learned from its data."""
    return queries.price_decimals(db.session, symbols, configured=settings().price_decimals)


@bp.get("/market")
def market() -> ResponseReturnValue:
    syms = symbols()
    raw = request.args.get("symbol")
    symbol = check_symbol(raw) if raw else (syms[0] if syms else None)
    timeframe = check_timeframe(request.args.get("timeframe") or "1m")
    trades = open_trades()
    events = []
    if trades:
        event = trade_events_table.c
        events = db.session.execute(select(trade_events_table).where(event.trade_id.in_([t["id"] for t in trades]))
                                    .order_by(event.id.desc()).limit(50)).all()
    closed = db.session.execute(select(trades_table).where(trades_table.c.status == "closed")
                                .order_by(trades_table.c.closed_at.desc()).limit(10)).all()
    recent_bars = queries.bar_series(db.session, symbol, timeframe, limit=10).rows if symbol else []
    backfills = queries.backfills(db.session, now_ms() - BACKFILL_WINDOW_MS)
    range_key = range_arg(request.args.get("range"), DEFAULT_BAR_RANGE[timeframe])
    return render_template("console/market.html", symbols=syms, symbol=symbol, timeframe=timeframe,
                           timeframes=list(TIMEFRAMES), ticks=queries.latest_ticks(db.session, syms), trades=trades,
                           events=events, closed=closed, recent_bars=list(reversed(recent_bars)), backfills=backfills,
                           decimals=decimals_of(syms), range_key=range_key, ranges=RANGE_NAMES,
                           trade_symbols={t["id"]: t["symbol"] for t in trades})


@bp.get("/api/bars")
def api_bars() -> ResponseReturnValue:
    """``?symbol=&timeframe=&range=`` (or ``&limit=``, the latest bars): bars in time order, the
    stored indicators and the symbol's price decimals (:func:`webapp.console.charts.price_chart`)."""
    symbol = check_symbol(request.args.get("symbol"))
    timeframe = check_timeframe(request.args.get("timeframe"))
    limit = int_arg(request.args.get("limit"), "limit", 1, MAX_BARS, 0) or None
    range_key = range_arg(request.args.get("range"), DEFAULT_BAR_RANGE[timeframe])
    return jsonify(price_chart(symbol, timeframe, range_key, limit))


@bp.get("/api/trades")
def api_trades() -> ResponseReturnValue:
    """Open trades with live P&L, the latest tick and the price decimals per symbol, for the page's poll."""
    syms = symbols()
    ticks = {s: {"bid": t.bid, "ask": t.ask, "ts": t.ts, "volume": t.volume}
             for s, t in queries.latest_ticks(db.session, syms).items()}
    return jsonify({"trades": open_trades(), "ticks": ticks, "decimals": decimals_of(syms)})


@bp.post("/trades/<trade_id>/close")
def close_trade(trade_id: str) -> ResponseReturnValue:
    """Close an open trade at the latest tick (the writer's ``close_trade``, reason ``console``)."""
    tid = int_arg(trade_id, "trade id", 1, 2**63 - 1)
    keep = {k: v for k, v in request.args.items() if k in ("symbol", "timeframe")}
    back = redirect(url_for("console.market", **keep), 303)
    if request.form.get("confirm") != "yes":
        trade = queries.trade(db.session, tid)
        if trade is None:
            bad_request(f"trade {tid} does not exist")
        return render_template("console/confirm_close.html", trade=trade)
    try:
        result = call_writer("close_trade", trade_id=tid, reason="console")
    except WriterError as e:
        audit("trade.close", str(tid), "error", str(e))
        flash(f"Closing trade {tid} failed: {e}", "error")
        return back
    audit("trade.close", str(tid), "ok", json.dumps(result))
    trade = queries.trade(db.session, tid)
    digits = decimals_of([trade.symbol]).get(trade.symbol) if trade else None
    flash(f"Trade {tid} closed at {price(result['exit_price'], digits)}, P&L {pnl(result['pnl'])}.", "ok")
    return back
