"""The REST API blueprint: JSON in, JSON out, under ``/api`` (and ``/metrics``).

Contracts shared by every route (the OpenAPI document, ``GET
/api/openapi.json``, spells each one out):

* **Errors** all have one shape, ``{"error": {"code": "<snake_case>",
  "message": "<reason>"}}``, including Flask's own 404/405/413 and unhandled
  500s, for paths under ``/api`` and ``/metrics``. Other paths (the console)
  keep Flask's default HTML errors. Codes: 400 ``invalid_parameter`` (query),
  ``invalid_json`` (body not JSON, ``NaN``/``Infinity`` included),
  ``invalid_body`` (the writer's validation message, naming the field);
  401 ``unauthorized``; 403 ``forbidden``; 404 ``not_found``;
  405 ``method_not_allowed``; 409 ``conflict``; 413 ``payload_too_large``;
  415 ``unsupported_media_type``; 500 ``internal_error`` / ``write_failed``;
  503 ``writer_unavailable`` / ``database_unavailable`` with ``Retry-After``.
* **Writes** (POST) need ``Authorization: Bearer <token>``. The token is
  ``TICKSTACK_API_TOKEN`` from the environment when set, else the content of
  ``$TICKSTACK_HOME/api-token`` (mode 0600, generated when the API app is
  first created). Missing or malformed header: 401; wrong token: 403
  (compared in constant time). Writes go only through the writer
  (:mod:`db.client`), with a deadline of :data:`WRITER_DEADLINE` seconds: when
  it passes, 503 and the write may or may not have been applied (ticks that
  carry ``source`` and ``seq`` can be resent safely; the writer drops
  duplicates). Bodies are validated here with the writer's own validators
  (:func:`db.ops.prepare`), so a bad body costs no writer round trip and gets
  exactly the writer's message; the writer validates again.
* **Reads** go through Flask-SQLAlchemy on the read-only engine. Series
  (ticks, bars, indicators) are limited to the newest ``limit`` rows (1..5000,
  default 500) in ``[since, until]`` (inclusive, epoch ms UTC) and returned
  oldest first. Unknown query parameters are rejected, so typos do not pass
  silently; an empty value counts as absent.
"""
from __future__ import annotations

import functools
import hmac
import json
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from flask import Blueprint, Response, current_app, jsonify, request
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue
from sqlalchemy import Select, select
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from db import ops
from db.client import WriterClient, thread_client
from db.config import Settings, read_or_create_secret
from db.errors import CommitFailed, Conflict, NotFound, ValidationError, WriterError, WriterUnavailable
from db.health import pragmas
from db.models import INDICATORS, TIMEFRAMES, Bar, IndicatorValue, Tick, Trade, TradeEvent
from webapp import openapi
from webapp.extensions import db
from webapp.metrics import Probe, init_metrics

log = logging.getLogger("tickstack.api")

bp = Blueprint("api", __name__, url_prefix="/api")

#: Longest an API request waits for the writer (the client's own deadline,
#: 60 s by default, is for producers that must not give up).
WRITER_DEADLINE = 5.0
#: What a 503 tells the client to wait before retrying, in seconds.
RETRY_AFTER = 5
LIMIT_DEFAULT = 500
LIMIT_MAX = 5000
MAX_ID = 2**63 - 1
TOKEN_ENV = "TICKSTACK_API_TOKEN"
TOKEN_FILE = "api-token"
#: Fields a close request may carry (the rest of close_trade is the monitor's).
CLOSE_FIELDS = ("price", "reason")

# Token sources already logged by this process: each is logged once.
_announced: set[str] = set()


# --- per-app state ------------------------------------------------------------------


class ApiState:
    """What the API keeps per app: settings, the write token, the probe, and
    one writer client per thread (a client is not thread-safe)."""

    def __init__(self, settings: Settings, token: str, deadline: float) -> None:
        self.settings = settings
        self.token = token.encode()
        self.deadline = deadline
        self.probe = Probe(settings, self.client)

    def client(self) -> WriterClient:
        """This thread's writer client for this app (made on first use)."""
        return thread_client(self.settings, self.deadline)


def load_token(settings: Settings) -> str:
    """The write token: ``TICKSTACK_API_TOKEN`` if set and not blank, else
    the one stored in ``$TICKSTACK_HOME/api-token`` (generated on first use,
    mode 0600). Logs where it comes from once per process, never the token."""
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    if from_env:
        if TOKEN_ENV not in _announced:
            _announced.add(TOKEN_ENV)
            log.info("API write token: from %s", TOKEN_ENV)
            if len(from_env) < 16:
                log.warning("%s is shorter than 16 characters; use a long random token", TOKEN_ENV)
        return from_env
    path = settings.home / TOKEN_FILE
    token, created = read_or_create_secret(path, lambda: secrets.token_urlsafe(32))
    if created or str(path) not in _announced:
        _announced.add(str(path))
        log.info("API write token: %s %s (send it as 'Authorization: Bearer <token>')",
                 "generated in" if created else "read from", path)
    return token


def _log_through_gunicorn() -> None:
    """Under gunicorn, nothing configures the root logger, so INFO records of
    ours would be dropped: send them to gunicorn's error log (its level)."""
    gunicorn = logging.getLogger("gunicorn.error")
    if gunicorn.handlers and not log.handlers:
        log.handlers = list(gunicorn.handlers)
        log.setLevel(gunicorn.level)
        log.propagate = False


@bp.record_once
def _setup(setup: BlueprintSetupState) -> None:
    app = setup.app
    settings: Settings = app.config["TICKSTACK"]
    _log_through_gunicorn()
    api = ApiState(settings, load_token(settings), min(settings.client_deadline, WRITER_DEADLINE))
    app.extensions["tickstack_api"] = api
    init_metrics(app, api.probe)


def _api() -> ApiState:
    return current_app.extensions["tickstack_api"]


# --- errors: the one place responses for failures are made --------------------------------


class ApiError(Exception):
    """A failure with its HTTP status, error code and message."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """``{"error": {"code", "message"}}`` with ``status`` and ``headers``."""
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    response.headers.update(dict(headers or {}))
    return response


def bad_param(message: str) -> NoReturn:
    raise ApiError(400, "invalid_parameter", message)


def _is_api_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in ("/api", "/metrics"))


HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
              415: "unsupported_media_type", 500: "internal_error", 503: "unavailable"}


@bp.app_errorhandler(HTTPException)
def _http_error(e: HTTPException) -> ResponseReturnValue:
    """Flask's and Werkzeug's own errors, as JSON under /api and /metrics;
    elsewhere (the console) Flask's default page."""
    if not _is_api_path(request.path) or e.code is None:
        return e
    code = HTTP_CODES.get(e.code) or "_".join((e.name or "error").lower().split())
    headers: dict[str, str] = {}
    message = e.description or e.name
    if e.code == 404:
        message = f"no such endpoint: {request.path} (the routes are in /api/openapi.json)"
    elif isinstance(e, MethodNotAllowed):
        allowed = ", ".join(e.valid_methods or ())
        headers["Allow"] = allowed
        message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    elif e.code == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        message = f"the body is larger than the limit of {limit} bytes; send fewer ticks per request"
    elif e.code == 500:
        message = "internal error; the API log has the details"
    return error_response(e.code, code, message, headers)


@bp.app_errorhandler(ApiError)
def _api_error(e: ApiError) -> ResponseReturnValue:
    return error_response(e.status, e.code, e.message, e.headers)


@bp.errorhandler(WriterError)
def _writer_error(e: WriterError) -> ResponseReturnValue:
    """The writer's typed errors (and the local validation that mirrors it)."""
    if isinstance(e, ValidationError):
        # Top-level fields come out of db.ops as ": missing field 'x'" (an empty path before the colon).
        return error_response(400, "invalid_body", str(e).removeprefix(": "))
    if isinstance(e, NotFound):
        return error_response(404, "not_found", str(e))
    if isinstance(e, Conflict):
        return error_response(409, "conflict", str(e))
    if isinstance(e, WriterUnavailable | CommitFailed):
        return error_response(
            503, "writer_unavailable",
            f"the writer did not answer within {_api().deadline:g} s (it may be restarting); the write may or "
            "may not have been applied: ticks with source and seq can be resent safely, and GET /api/trades "
            "shows whether a trade was opened or closed", {"Retry-After": str(RETRY_AFTER)})
    log.error("writer call failed: %s", e)
    return error_response(500, "write_failed", f"the writer could not apply the request: {e}")


@bp.errorhandler(OperationalError)
def _database_error(e: OperationalError) -> ResponseReturnValue:
    """A read that failed for the database's reasons (locked past the busy
    timeout, file missing): transient, so 503."""
    log.warning("read failed: %s", e.orig)
    return error_response(503, "database_unavailable", f"the database could not be read: {e.orig}",
                          {"Retry-After": str(RETRY_AFTER)})


# --- input: the one place query parameters and bodies are parsed --------------------------

Parser = Callable[[str, str], Any]
F = TypeVar("F", bound=Callable[..., ResponseReturnValue])


@dataclass(frozen=True)
class Param:
    """A query parameter: its parser, whether it is required, its default."""

    parse: Parser
    required: bool = False
    default: Any = None


def _symbol(name: str, raw: str) -> str:
    if not ops.SYMBOL_RE.fullmatch(raw):
        bad_param(f"{name}: {raw!r} is not a symbol (1-32 characters of A-Z 0-9 . _ : / -, upper case)")
    return raw


def _one_of(*choices: str) -> Parser:
    def parse(name: str, raw: str) -> str:
        if raw not in choices:
            bad_param(f"{name}: {raw!r} is not one of {', '.join(choices)}")
        return raw

    return parse


def _integer(lo: int, hi: int, what: str = "an integer") -> Parser:
    def parse(name: str, raw: str) -> int:
        digits = raw[1:] if raw.startswith("-") else raw
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 19):
            bad_param(f"{name}: {raw!r} is not {what}")
        value = int(raw)
        if not lo <= value <= hi:
            bad_param(f"{name}: {value} is out of range {lo}..{hi}")
        return value

    return parse


SYMBOL = Param(_symbol, required=True)
TIMEFRAME = Param(_one_of(*TIMEFRAMES), required=True)
TIMESTAMP = Param(_integer(0, ops.MAX_TS, "epoch milliseconds (an integer)"))
LIMIT = Param(_integer(1, LIMIT_MAX), default=LIMIT_DEFAULT)
SERIES = {"since": TIMESTAMP, "until": TIMESTAMP, "limit": LIMIT}


def query(**spec: Param) -> dict[str, Any]:
    """The query parameters of ``spec``, parsed; 400 ``invalid_parameter``
    for an unknown, repeated, missing or bad one, or since > until."""
    unknown = sorted(set(request.args) - set(spec))
    if unknown:
        bad_param(f"unknown parameter {unknown[0]!r}; parameters are {', '.join(spec) or 'none'}")
    out: dict[str, Any] = {}
    for name, param in spec.items():
        values = request.args.getlist(name)
        if len(values) > 1:
            bad_param(f"{name}: given {len(values)} times; give it once")
        if not values or values[0] == "":
            if param.required:
                bad_param(f"{name}: required")
            out[name] = param.default
            continue
        out[name] = param.parse(name, values[0])
    if out.get("since") is not None and out.get("until") is not None and out["since"] > out["until"]:
        bad_param(f"since {out['since']} is after until {out['until']}")
    return out


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def json_object(*, optional: bool = False) -> dict[str, Any]:
    """The request body as a JSON object. 413 beyond MAX_CONTENT_LENGTH (from
    Flask); 415 unless ``Content-Type: application/json``; 400 when it is not
    strict JSON (``NaN``, ``Infinity`` refused) or not an object. With
    ``optional``, an empty body is ``{}`` whatever its content type."""
    raw = request.get_data(cache=False)
    if optional and not raw.strip():
        return {}
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type",
                       f"send the body as JSON with 'Content-Type: application/json' (got {request.mimetype!r})")
    if not raw.strip():
        raise ApiError(400, "invalid_json", "the body is empty; expected a JSON object")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError, bad UTF-8, NaN/Infinity
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON: nested too deeply") from None
    if type(body) is not dict:
        raise ApiError(400, "invalid_body", f"the body must be a JSON object, got {_json_type(body)}")
    return body


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def requires_token(view: F) -> F:
    """401 without a well-formed ``Authorization: Bearer <token>``; 403 when
    the token is wrong. Checked before the body is read."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> ResponseReturnValue:
        header = request.headers.get("Authorization", "")
        challenge = {"WWW-Authenticate": 'Bearer realm="tickstack"'}
        if not header:
            raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>' "
                           f"(the token is in the {TOKEN_FILE} file in TICKSTACK_HOME, or {TOKEN_ENV})", challenge)
        scheme, _, credentials = header.partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials or " " in credentials:
            raise ApiError(401, "unauthorized", "malformed Authorization header: expected 'Bearer <token>'",
                           challenge)
        if not hmac.compare_digest(credentials.encode(), _api().token):
            raise ApiError(403, "forbidden", "invalid token")
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def write(op: str, args: dict[str, Any]) -> Any:
    """Validate ``args`` for ``op`` here (the writer's validators, so its
    messages) and run it through the writer; returns the committed result."""
    _, clean = ops.prepare(op, args)
    return _api().client().call(op, **clean)


def _trade_id(trade_id: int) -> int:
    if not 1 <= trade_id <= MAX_ID:
        raise ApiError(404, "not_found", f"trade {trade_id} does not exist")
    return trade_id


# --- reads ------------------------------------------------------------------------------------


def newest_first_reversed(stmt: Select, ts_column: Any, q: Mapping[str, Any], *tiebreak: Any) -> list[Any]:
    """Rows of ``stmt`` within [since, until], the newest ``limit`` of them,
    returned oldest first."""
    if q["since"] is not None:
        stmt = stmt.where(ts_column >= q["since"])
    if q["until"] is not None:
        stmt = stmt.where(ts_column <= q["until"])
    order = [ts_column.desc(), *(c.desc() for c in tiebreak)]
    rows = db.session.execute(stmt.order_by(*order).limit(q["limit"])).all()
    rows.reverse()
    return rows


def _latest_tick(symbol: str) -> Any:
    return db.session.execute(
        select(Tick.id, Tick.ts, Tick.bid, Tick.ask).where(Tick.symbol == symbol)
        .order_by(Tick.ts.desc(), Tick.id.desc()).limit(1)
    ).first()


TRADE_FIELDS = ("id", "symbol", "side", "size", "entry_price", "stop_loss", "take_profit", "trailing_distance",
                "breakeven_trigger", "best_price", "status", "opened_at", "closed_at", "exit_price", "close_reason")


def trade_json(trade: Trade, marks: dict[str, Any]) -> dict[str, Any]:
    """A trade with its P&L: realised for a closed trade; for an open one,
    unrealised at the latest tick of its symbol (the bid for a buy, the ask
    for a sell; null without a tick). ``marks`` caches latest ticks."""
    out = {f: getattr(trade, f) for f in TRADE_FIELDS}
    if trade.status != "open":
        out.update(pnl=trade.pnl, pnl_kind="realised", mark=None)
        return out
    if trade.symbol not in marks:
        marks[trade.symbol] = _latest_tick(trade.symbol)
    tick = marks[trade.symbol]
    if tick is None:
        out.update(pnl=None, pnl_kind="unrealised", mark=None)
        return out
    price = tick.bid if trade.side == "buy" else tick.ask
    out.update(pnl=ops.trade_pnl(trade.side, trade.entry_price, price, trade.size), pnl_kind="unrealised",
               mark={"price": price, "ts": tick.ts, "tick_id": tick.id})
    return out


def trade_detail(trade_id: int) -> dict[str, Any]:
    """The trade, its P&L and its events (oldest first); 404 if unknown."""
    trade = db.session.get(Trade, trade_id)
    if trade is None:
        raise ApiError(404, "not_found", f"trade {trade_id} does not exist")
    out = trade_json(trade, {})
    events = db.session.execute(
        select(TradeEvent.id, TradeEvent.ts, TradeEvent.kind, TradeEvent.price, TradeEvent.pnl, TradeEvent.detail)
        .where(TradeEvent.trade_id == trade_id).order_by(TradeEvent.ts, TradeEvent.id)
    ).all()
    out["events"] = [e._asdict() for e in events]
    return out


# --- routes -------------------------------------------------------------------------------------


@bp.get("/health")
def health() -> ResponseReturnValue:
    """Writer (ping and stats), database (journal mode, file sizes, lock
    errors) and circus watchers. 200 while the writer answers, whatever
    circus says (the API works without circus: tests, development; circus is
    reported as unreachable then); 503 when the writer does not answer.
    ``status`` is ``ok``, ``degraded`` (writer up, but the database cannot be
    read or a watcher is not active) or ``unavailable``."""
    api = _api()
    ping, stats, error = api.probe.writer()
    writer: dict[str, Any] = ({"up": True, "pid": ping["pid"], "ping_ms": ping["latency_ms"], "stats": stats}
                              if ping is not None else {"up": False, "error": error})
    database = _database_health(api.settings, stats)
    circus = api.probe.circus()
    circus_json: dict[str, Any] = {"reachable": circus.reachable, "watchers": circus.statuses}
    if circus.error:
        circus_json["error"] = circus.error
    if ping is None:
        status = "unavailable"
    elif "error" in database or any(s != "active" for s in circus.statuses.values()):
        status = "degraded"
    else:
        status = "ok"
    body = {"status": status, "writer": writer, "database": database, "circus": circus_json}
    return jsonify(body), 503 if ping is None else 200


def _database_health(settings: Settings, stats: dict[str, Any] | None) -> dict[str, Any]:
    path = settings.database_path
    if path is None:
        return {"url": settings.database_url}
    files = _api().probe.database_files()
    out: dict[str, Any] = {"path": str(path), "size_bytes": files.get("db"), "wal_bytes": files.get("wal") or 0,
                           "lock_errors": (stats or {}).get("lock_errors"),
                           "last_checkpoint": (stats or {}).get("last_checkpoint")}
    try:
        out.update(pragmas(path))
    except (sqlite3.Error, FileNotFoundError) as e:
        out["error"] = str(e)
    return out


@bp.get("/openapi.json")
def openapi_document() -> ResponseReturnValue:
    """The OpenAPI 3.1 description of every route here and of /metrics."""
    return jsonify(openapi.document())


@bp.post("/ticks")
@requires_token
def post_ticks() -> ResponseReturnValue:
    """Store ``{"ticks": [...]}`` through the writer; 200 once committed with
    ``{"inserted", "duplicates"}`` (a tick whose (source, seq) is stored is a
    duplicate, so a resent batch is safe). 200 rather than 201: ticks get no
    URL of their own, and a batch of duplicates creates nothing."""
    result = write("insert_ticks", json_object())
    return jsonify({"inserted": result["inserted"], "duplicates": result["duplicates"]}), 200


@bp.get("/ticks")
def get_ticks() -> ResponseReturnValue:
    """The newest ``limit`` ticks of ``symbol`` in [since, until] by ``ts``,
    oldest first."""
    q = query(symbol=SYMBOL, **SERIES)
    stmt = select(Tick.id, Tick.symbol, Tick.ts, Tick.bid, Tick.ask, Tick.volume, Tick.source, Tick.seq
                  ).where(Tick.symbol == q["symbol"])
    rows = newest_first_reversed(stmt, Tick.ts, q, Tick.id)
    return jsonify({"symbol": q["symbol"], "ticks": [r._asdict() for r in rows]})


@bp.get("/bars")
def get_bars() -> ResponseReturnValue:
    """OHLCV bars of ``symbol`` and ``timeframe``, ``ts`` the bucket start
    (epoch ms UTC), the newest ``limit`` in [since, until], oldest first."""
    q = query(symbol=SYMBOL, timeframe=TIMEFRAME, **SERIES)
    stmt = select(Bar.ts, Bar.open, Bar.high, Bar.low, Bar.close, Bar.volume).where(
        Bar.symbol == q["symbol"], Bar.timeframe == q["timeframe"])
    rows = newest_first_reversed(stmt, Bar.ts, q)
    return jsonify({"symbol": q["symbol"], "timeframe": q["timeframe"], "bars": [r._asdict() for r in rows]})


@bp.get("/indicators")
def get_indicators() -> ResponseReturnValue:
    """Values of indicator ``name`` for ``symbol`` and ``timeframe`` (``ts``
    the bar's bucket start), the newest ``limit`` in [since, until], oldest
    first."""
    q = query(symbol=SYMBOL, timeframe=TIMEFRAME, name=Param(_one_of(*INDICATORS), required=True), **SERIES)
    stmt = select(IndicatorValue.ts, IndicatorValue.value).where(
        IndicatorValue.symbol == q["symbol"], IndicatorValue.timeframe == q["timeframe"],
        IndicatorValue.name == q["name"])
    rows = newest_first_reversed(stmt, IndicatorValue.ts, q)
    return jsonify({"symbol": q["symbol"], "timeframe": q["timeframe"], "name": q["name"],
                    "values": [r._asdict() for r in rows]})


@bp.post("/trades")
@requires_token
def open_trade() -> ResponseReturnValue:
    """Open a paper trade (the fields of the writer's ``open_trade``); 201
    with the trade and ``Location``."""
    result = write("open_trade", json_object())
    detail = trade_detail(result["id"])
    return jsonify(detail), 201, {"Location": f"/api/trades/{result['id']}"}


@bp.get("/trades")
def list_trades() -> ResponseReturnValue:
    """Trades, newest first (by id), optionally only ``status`` open or
    closed and only ``symbol``; each with its P&L (see :func:`trade_json`)."""
    q = query(status=Param(_one_of("open", "closed")), symbol=Param(_symbol), limit=LIMIT)
    stmt = select(Trade)
    if q["status"] is not None:
        stmt = stmt.where(Trade.status == q["status"])
    if q["symbol"] is not None:
        stmt = stmt.where(Trade.symbol == q["symbol"])
    trades = db.session.execute(stmt.order_by(Trade.id.desc()).limit(q["limit"])).scalars().all()
    marks: dict[str, Any] = {}
    return jsonify({"trades": [trade_json(t, marks) for t in trades]})


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
    body = json_object(optional=True)
    extra = sorted(set(body) - set(CLOSE_FIELDS))
    if extra:
        raise ValidationError(f"unexpected field {extra[0]!r}; fields are {', '.join(CLOSE_FIELDS)}")
    write("close_trade", {**body, "trade_id": trade_id})
    return jsonify(trade_detail(trade_id)), 200
