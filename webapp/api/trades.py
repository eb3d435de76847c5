"""Routes of paper trades: open, list, read (with events and P&L) and close."""
from __future__ import annotations

from typing import Any

from flask import jsonify
from flask.typing import ResponseReturnValue

from db import ops, queries, validation
from webapp.api.errors import ApiError
from webapp.api.limits import MAX_ID
from webapp.api.params import LIMIT, ROW_ID, Param, json_object, query
from webapp.api.routes import page_json
from webapp.api.state import bp, write
from webapp.api.tokens import requires_token
from webapp.extensions import db

#: Fields a close request may carry (the rest of close_trade is the monitor's).
CLOSE_FIELDS = ("price", "reason")
#: A trade's own fields in its JSON; ``pnl``, ``pnl_kind`` and ``mark`` are added by :func:`trade_json`.
TRADE_FIELDS = ("id", "symbol", "side", "size", "entry_price", "stop_loss", "take_profit", "trailing_distance",
                "breakeven_trigger", "best_price", "status", "opened_at", "closed_at", "exit_price", "close_reason")
STATUS = Param(validation.one_of("open", "closed"))
SYMBOL_FILTER = Param(validation.symbol)


def trade_json(trade: Any, mark: queries.Mark | None) -> dict[str, Any]:
    """A trade with its P&L: realised for a closed trade; for an open one,
    unrealised at ``mark`` (:func:`db.queries.marks`: the latest tick of its
    symbol, the bid for a buy, the ask for a sell; null without a tick)."""
    out = {f: getattr(trade, f) for f in TRADE_FIELDS}
    if trade.status != "open":
        out.update(pnl=trade.pnl, pnl_kind="realised", mark=None)
    elif mark is None:
        out.update(pnl=None, pnl_kind="unrealised", mark=None)
    else:
        out.update(pnl=mark.pnl, pnl_kind="unrealised",
                   mark={"price": mark.price, "ts": mark.ts, "tick_id": mark.tick_id})
    return out


def _not_found(trade_id: int) -> ApiError:
    return ApiError(404, "not_found", f"trade {trade_id} does not exist")


def _trade_id(trade_id: int) -> int:
    """``trade_id`` when it can be an id; 404 (no such trade) when it cannot."""
    if not 1 <= trade_id <= MAX_ID:
        raise _not_found(trade_id)
    return trade_id


def trade_detail(trade_id: int) -> dict[str, Any]:
    """The trade, its P&L and its events (oldest first); 404 if unknown."""
    trade = queries.trade(db.session, trade_id)
    if trade is None:
        raise _not_found(trade_id)
    out = trade_json(trade, queries.marks(db.session, [trade]).get(trade.id))
    out["events"] = [e._asdict() for e in queries.trade_events(db.session, trade_id)]
    return out


@bp.post("/trades")
@requires_token
def open_trade() -> ResponseReturnValue:
    """Open a paper trade (the fields of the writer's ``open_trade``); 201
    with the trade and ``Location``."""
    query()  # a write's fields are in its body: one put in the query is refused, not dropped
    result = write("open_trade", json_object())
    detail = trade_detail(result["id"])
    return jsonify(detail), 201, {"Location": f"/api/trades/{result['id']}"}


@bp.get("/trades")
def list_trades() -> ResponseReturnValue:
    """A page of trades, newest first (by id), optionally only ``status`` open
    or closed and only ``symbol``, only ids below ``before_id``; each with its
    P&L (see :func:`trade_json`)."""
    q = query(status=STATUS, symbol=SYMBOL_FILTER, limit=LIMIT, before_id=ROW_ID)
    page = queries.trades(db.session, status=q["status"], symbol=q["symbol"], limit=q["limit"],
                          before_id=q["before_id"])
    marks = queries.marks(db.session, page.rows)
    return page_json(page, "trades", [trade_json(t, marks.get(t.id)) for t in page.rows])


@bp.get("/trades/<int:trade_id>")
def get_trade(trade_id: int) -> ResponseReturnValue:
    """One trade with its events and P&L; 404 if unknown."""
    query()
    return jsonify(trade_detail(_trade_id(trade_id)))


@bp.post("/trades/<int:trade_id>/close")
@requires_token
def close_trade(trade_id: int) -> ResponseReturnValue:
    """Close a trade at ``price`` (default: the latest tick, bid for a buy,
    ask for a sell) with ``reason`` (default ``manual``); the body may be
    empty. 200 with the closed trade; 404 unknown id; 409 already closed."""
    trade_id = _trade_id(trade_id)
    query()  # a write's fields are in its body: one put in the query is refused, not dropped
    body = json_object(optional=True)
    # Only the close request's own fields, checked by the writer's rule (and message) for fields.
    validation.check_fields("", body, {f: ops.OPS["close_trade"].fields[f] for f in CLOSE_FIELDS})
    write("close_trade", {**body, "trade_id": trade_id})
    return jsonify(trade_detail(trade_id)), 200
