"""The OpenAPI 3.1 document of the REST API, written by hand.

:func:`document` returns it as a dict (served at ``GET /api/openapi.json``).

Why by hand: the API does not validate bodies against a schema. Every body is
checked by the writer's own validators (:mod:`db.validation`, through
:func:`db.ops.prepare`), which are the rules the writer applies anyway and
give the messages the API returns; a schema library would be a second,
drifting copy of those rules. So this document describes the contract for
clients and is not executed; its numbers (limits, deadlines, patterns) come
from the modules that enforce them. ``tests/test_api.py`` keeps it honest:
it validates the document (``openapi-spec-validator``), checks that its paths
and methods are exactly the app's routes under ``/api`` and ``/metrics``, and
that each write's request body lists exactly the fields of the op it calls,
with the same required-ness. Change them together.
"""
from __future__ import annotations

import copy
import functools
from typing import Any

from db.timestamps import UNITS_RULE
from db.validation import MAX_PRICE, MAX_SIZE, MAX_TICKS, MAX_TS, NAME_RE, SYMBOL_RE
from db.vocabulary import INDICATORS, TIMEFRAMES
from webapp.api.limits import LIMIT_DEFAULT, LIMIT_MAX, MAX_ID, RETRY_AFTER, WRITER_DEADLINE


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    names = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
             409: "Conflict", 413: "PayloadTooLarge", 415: "UnsupportedMediaType", 503: "Unavailable",
             507: "StorageFull"}
    return {str(c): _ref("responses", names[c]) for c in codes}


_NUMBER = {"type": "number"}
_NULLABLE_NUMBER = {"type": ["number", "null"]}
_TS = {"type": "integer", "minimum": 0, "maximum": MAX_TS, "description": "Epoch milliseconds UTC"}
#: A tick's or a trade's time as sent: no later than a day ahead of now (db.validation.moment).
AHEAD_RULE = "at most a day ahead of now"
#: ... and not a time in seconds (db.timestamps.time_problem).
SECONDS_RULE = f"{UNITS_RULE} (1e9 to 1e10: a time in seconds, January to April 1970 as milliseconds)"
_TS_IN = {**_TS, "description": f"Epoch milliseconds UTC, {AHEAD_RULE}, {SECONDS_RULE} (400 otherwise)"}
#: What the writer's validators (db.validation) accept, as JSON Schema: a price (also a trailing or
#: break-even distance), a trade's size, a tick's volume, a tick's seq.
_PRICE = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": MAX_PRICE}
_SIZE = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": MAX_SIZE}
_VOLUME = {"type": "number", "minimum": 0, "exclusiveMaximum": MAX_PRICE}
_SEQ = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
#: Rules of every request that JSON Schema cannot express (a JSON Schema "integer" is any number
#: without a fractional part, 1.0 included), stated in the document's description.
_INTEGERS = ("Integers (ts, seq, ids) are written without a fraction or exponent: 1, not 1.0 or 1e0 (400). An "
             "empty query parameter counts as absent.")
_WRITE_ERRORS = (400, 401, 403, 413, 415, 503, 507)
_SERIES_PARAMS = [_ref("parameters", "Since"), _ref("parameters", "Until"), _ref("parameters", "Limit")]
_TICK_PARAMS = [*_SERIES_PARAMS, _ref("parameters", "AfterId"), _ref("parameters", "BeforeId")]
#: What every list response adds to its rows: is there more, and the parameters of the next page.
_PAGE_PROPS = {"more": {"type": "boolean", "description": "More rows lie beyond this page, in its direction"},
               "next": _ref("schemas", "Next")}
_PAGE_DESCRIPTION = (
    "Lists are pages, as exchange APIs page (ccxt's `fetch_ohlcv(since, limit)`): a series (ticks, bars, "
    "indicators) gives the oldest `limit` rows with ts >= `since` when `since` is given (paging forward; `until` "
    "still bounds it), else the newest `limit` rows with ts <= `until`, or of all (paging backward); rows are "
    "always returned oldest first. Trades are listed newest first. Every list says whether `more` rows lie beyond"
    " the page in its direction and gives `next`, the query parameters of the next page (null when `more` is "
    "false): keep the request's parameters and replace those in `next`. Bars and indicator values have one row "
    "per ts, so their cursor is ts alone (`since`: last ts + 1, or `until`: first ts - 1). Ticks can share a ts, "
    "and a ts alone would split or repeat them at a page boundary, so their cursor is (ts, id): `since` with "
    "`after_id` (the ticks after that one in (ts, id) order) or `until` with `before_id`. Trades page by id "
    "(`before_id`). "
)


def _page(required: list[str], properties: dict[str, Any], description: str) -> dict[str, Any]:
    """A list response: ``properties`` (its rows and what was asked for) and ``more``/``next``."""
    return _json({"type": "object", "required": [*required, "more", "next"],
                  "properties": {**properties, **_PAGE_PROPS}}, description)


@functools.cache
def _build() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tickstack API",
            "version": "1.0.0",
            "description": (
                "Ticks, bars, indicators and paper trades of one tickstack. Every write (POST) goes through the "
                "single writer and is answered after its commit; it needs `Authorization: Bearer <token>` (the "
                "token is TICKSTACK_API_TOKEN, or the api-token file in TICKSTACK_HOME). Every error has the shape "
                '`{"error": {"code", "message"}}`, at any path of the API\'s port. ' + _PAGE_DESCRIPTION +
                "Prices are returned as stored; P&L is derived exactly in decimal (see Trade.pnl). "
                "Times are epoch milliseconds UTC. Unknown query "
                f"parameters are rejected (400). When the writer does not answer within {WRITER_DEADLINE:g} s the "
                f"answer is 503 with Retry-After ({RETRY_AFTER} s), and the write may or may not have been "
                "applied: ticks with source and seq are deduplicated, so resending them is safe. When the "
                "database's disk is full the answer is 507 (`storage_full`) with the writer's reason: nothing was "
                "written, and the same write succeeds once space is freed."
            ),
        },
        "servers": [{"url": "/"}],
        "tags": [{"name": "status"}, {"name": "ticks"}, {"name": "bars"}, {"name": "trades"}],
        "paths": {
            "/api/health": {
                "get": {
                    "tags": ["status"], "operationId": "health",
                    "summary": "Writer, database and circus watchers",
                    "description": (
                        "200 while the writer answers, 503 when it does not. `status` is `ok`, `degraded` (writer up, "
                        "but it refuses writes, `writer.writes_refused` saying why: its database files removed "
                        "under it, or its disk full; or the database cannot be read or a "
                        "circus watcher is down: stopped, missing, or running "
                        "fewer processes than circus was asked for, at least one; `circus.down` names each) or "
                        "`unavailable`. circus being unreachable (the API run outside circus) is reported but does "
                        "not change the code."
                    ),
                    "responses": {
                        "200": _json(_ref("schemas", "Health"), "The writer answers"),
                        "503": _json(_ref("schemas", "Health"), "The writer does not answer"),
                        **_errors(400),
                    },
                },
            },
            "/api/openapi.json": {
                "get": {
                    "tags": ["status"], "operationId": "openapi", "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 document"), **_errors(400)},
                },
            },
            "/api/ticks": {
                "get": {
                    "tags": ["ticks"], "operationId": "listTicks", "summary": "Ticks of a symbol",
                    "description": _PAGE_DESCRIPTION,
                    "parameters": [_ref("parameters", "Symbol"), *_TICK_PARAMS],
                    "responses": {
                        "200": _page(["symbol", "ticks"], {
                            "symbol": {"type": "string"},
                            "ticks": {"type": "array", "items": _ref("schemas", "Tick")},
                        }, "A page of ticks by (ts, id), oldest first"),
                        **_errors(400),
                    },
                },
                "post": {
                    "tags": ["ticks"], "operationId": "insertTicks", "summary": "Store a batch of ticks",
                    "description": (
                        "Answered after the commit with 200 (not 201: ticks get no URL, and a resent batch creates "
                        "nothing). A tick whose (source, seq) is already stored counts as a duplicate. `ticks` may "
                        "also be given as columns: an object of equal-length arrays keyed by field name."
                    ),
                    "security": [{"bearer": []}],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["ticks"], "additionalProperties": False,
                        "properties": {"ticks": {"oneOf": [
                            {"type": "array", "minItems": 1, "maxItems": MAX_TICKS, "items": _ref("schemas", "TickIn")},
                            _columns({"symbol": _ref("schemas", "Symbol"), "ts": _TS_IN, "bid": _PRICE, "ask": _PRICE,
                                      "volume": {**_VOLUME, "type": ["number", "null"]},
                                      "source": {"type": ["string", "null"], "pattern": f"^{NAME_RE.pattern}$"},
                                      "seq": {**_SEQ, "type": ["integer", "null"]}}),
                        ]}},
                    }}}},
                    "responses": {
                        "200": _json({
                            "type": "object", "required": ["inserted", "duplicates"],
                            "properties": {"inserted": {"type": "integer"}, "duplicates": {"type": "integer"}},
                        }, "Committed"),
                        **_errors(*_WRITE_ERRORS),
                    },
                },
            },
            "/api/bars": {
                "get": {
                    "tags": ["bars"], "operationId": "listBars", "summary": "OHLCV bars",
                    "parameters": [_ref("parameters", "Symbol"), _ref("parameters", "Timeframe"), *_SERIES_PARAMS],
                    "responses": {
                        "200": _page(["symbol", "timeframe", "bars"], {
                            "symbol": {"type": "string"}, "timeframe": {"type": "string"},
                            "bars": {"type": "array", "items": _ref("schemas", "Bar")},
                        }, "A page of bars, oldest first"),
                        **_errors(400),
                    },
                },
            },
            "/api/indicators": {
                "get": {
                    "tags": ["bars"], "operationId": "listIndicators", "summary": "Indicator values",
                    "parameters": [
                        _ref("parameters", "Symbol"), _ref("parameters", "Timeframe"),
                        {"name": "name", "in": "query", "required": True,
                         "schema": {"type": "string", "enum": list(INDICATORS)}},
                        *_SERIES_PARAMS,
                    ],
                    "responses": {
                        "200": _page(["symbol", "timeframe", "name", "values"], {
                            "symbol": {"type": "string"}, "timeframe": {"type": "string"},
                            "name": {"type": "string"},
                            "values": {"type": "array", "items": {
                                "type": "object", "required": ["ts", "value"],
                                "properties": {"ts": _TS, "value": _NUMBER}}},
                        }, "A page of values, oldest first (ts is the bar's bucket start)"),
                        **_errors(400),
                    },
                },
            },
            "/api/trades": {
                "get": {
                    "tags": ["trades"], "operationId": "listTrades", "summary": "Trades, newest first",
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string", "enum": ["open", "closed"]}},
                        {"name": "symbol", "in": "query", "schema": _ref("schemas", "Symbol")},
                        _ref("parameters", "Limit"),
                        {"name": "before_id", "in": "query", "description": (
                            "Only trades with a smaller id: the cursor of the next page (`next`)"),
                         "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ID}},
                    ],
                    "responses": {
                        "200": _page(["trades"], {"trades": {"type": "array", "items": _ref("schemas", "Trade")}},
                                     "A page of trades by id, newest first"),
                        **_errors(400),
                    },
                },
                "post": {
                    "tags": ["trades"], "operationId": "openTrade", "summary": "Open a paper trade",
                    "description": ("Without entry_price it opens at the latest tick (ask for a buy, bid for a sell): "
                                    "it needs a stored tick of the symbol (400 otherwise)."),
                    "security": [{"bearer": []}],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": _ref("schemas", "TradeIn")}}},
                    "responses": {
                        "201": {**_json(_ref("schemas", "TradeDetail"), "Opened"),
                                "headers": {"Location": {"schema": {"type": "string"},
                                                         "description": "/api/trades/{id}"}}},
                        **_errors(*_WRITE_ERRORS),
                    },
                },
            },
            "/api/trades/{trade_id}": {
                "get": {
                    "tags": ["trades"], "operationId": "getTrade", "summary": "A trade with its events and P&L",
                    "parameters": [_ref("parameters", "TradeId")],
                    "responses": {"200": _json(_ref("schemas", "TradeDetail"), "The trade"), **_errors(400, 404)},
                },
            },
            "/api/trades/{trade_id}/close": {
                "post": {
                    "tags": ["trades"], "operationId": "closeTrade", "summary": "Close a trade",
                    "description": ("Closes at `price`, or at the latest tick (bid for a buy, ask for a sell): "
                                    "without `price` it needs a stored tick of the symbol (400 otherwise). The "
                                    "body may be empty."),
                    "security": [{"bearer": []}],
                    "parameters": [_ref("parameters", "TradeId")],
                    "requestBody": {"required": False, "content": {"application/json": {"schema": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"price": {**_PRICE, "type": ["number", "null"]},
                                       "reason": {"type": "string", "maxLength": 64, "default": "manual",
                                                  # PostgreSQL's text cannot hold NUL: no text field takes it
                                                  "pattern": "^[^\\x00]*$"}},
                    }}}},
                    "responses": {
                        "200": _json(_ref("schemas", "TradeDetail"), "Closed"),
                        **_errors(*_WRITE_ERRORS, 404, 409),
                    },
                },
            },
            "/metrics": {
                "get": {
                    "tags": ["status"], "operationId": "metrics", "summary": "Prometheus metrics",
                    "description": (
                        "Prometheus text exposition (OpenMetrics when asked for in Accept). Request series "
                        "(tickstack_http_requests_total, tickstack_http_request_duration_seconds) count the "
                        "requests of every gunicorn worker together (prometheus-client's multiprocess mode), from "
                        "zero at the API's start; stack series (tickstack_writer_*, "
                        "tickstack_database_size_bytes, tickstack_wal_size_bytes, tickstack_watcher_up{watcher}) are "
                        "read at scrape time. No auth: "
                        "the API listens on 127.0.0.1 only."
                    ),
                    "responses": {"200": {"description": "Metrics",
                                          "content": {"text/plain": {"schema": {"type": "string"}}}},
                                  **_errors(400)},
                },
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "parameters": {
                "Symbol": {"name": "symbol", "in": "query", "required": True, "schema": _ref("schemas", "Symbol")},
                "Timeframe": {"name": "timeframe", "in": "query", "required": True,
                              "schema": {"type": "string", "enum": list(TIMEFRAMES)}},
                "Since": {"name": "since", "in": "query", "schema": _TS, "description": (
                    "Earliest ts, inclusive; given, the page is the oldest `limit` rows from here (paging forward)")},
                "Until": {"name": "until", "in": "query", "schema": _TS, "description": (
                    "Latest ts, inclusive (>= since); without since, the page is the newest `limit` rows up to here "
                    "(paging backward)")},
                "AfterId": {"name": "after_id", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                                          "maximum": MAX_ID}, "description": (
                    "With since: only ticks after the tick (since, after_id) in (ts, id) order; from `next`")},
                "BeforeId": {"name": "before_id", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                                            "maximum": MAX_ID}, "description": (
                    "With until and without since: only ticks before the tick (until, before_id) in (ts, id) "
                    "order; from `next`")},
                "Limit": {"name": "limit", "in": "query", "description": "Rows per page",
                          "schema": {"type": "integer", "minimum": 1, "maximum": LIMIT_MAX, "default": LIMIT_DEFAULT}},
                "TradeId": {"name": "trade_id", "in": "path", "required": True,
                            "schema": {"type": "integer", "minimum": 1}},
            },
            "schemas": {
                "Symbol": {"type": "string", "pattern": f"^{SYMBOL_RE.pattern}$"},
                "Next": {"description": (
                    "The query parameters of the next page, to put in place of the request's own; null when "
                    "`more` is false. Forward: since (and after_id for ticks); backward: until (and before_id "
                    "for ticks); trades: before_id."),
                    "oneOf": [{"type": "null"}, {
                        "type": "object", "additionalProperties": False, "minProperties": 1,
                        "properties": {"since": _TS, "until": _TS,
                                       "after_id": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
                                       "before_id": {"type": "integer", "minimum": 0, "maximum": MAX_ID}}}]},
                "Error": {
                    "type": "object", "required": ["error"],
                    "properties": {"error": {
                        "type": "object", "required": ["code", "message"],
                        "properties": {"code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
                                       "message": {"type": "string"}},
                    }},
                },
                "Tick": {
                    "type": "object", "required": ["id", "symbol", "ts", "bid", "ask", "volume", "source", "seq"],
                    "properties": {"id": {"type": "integer"}, "symbol": {"type": "string"}, "ts": _TS, "bid": _NUMBER,
                                   "ask": _NUMBER, "volume": _NUMBER, "source": {"type": "string"},
                                   "seq": {"type": ["integer", "null"]}},
                },
                "TickIn": {
                    "type": "object", "required": ["symbol", "ts", "bid", "ask"], "additionalProperties": False,
                    "properties": {
                        "symbol": _ref("schemas", "Symbol"), "ts": _TS_IN, "bid": _PRICE,
                        "ask": {**_PRICE, "description": "At least bid: bid <= ask (400 otherwise)"},
                        "volume": {**_VOLUME, "type": ["number", "null"], "default": 0},
                        "source": {"type": ["string", "null"], "pattern": f"^{NAME_RE.pattern}$",
                                   "default": "external"},
                        "seq": {**_SEQ, "type": ["integer", "null"],
                                "description": "With source, makes the tick idempotent"},
                    },
                },
                "Bar": {
                    "type": "object", "required": ["ts", "open", "high", "low", "close", "volume"],
                    "properties": {"ts": {**_TS, "description": "Bucket start, epoch ms UTC"}, "open": _NUMBER,
                                   "high": _NUMBER, "low": _NUMBER, "close": _NUMBER, "volume": _NUMBER},
                },
                "TradeIn": {
                    "type": "object", "required": ["symbol", "side", "size"], "additionalProperties": False,
                    "properties": {
                        "symbol": _ref("schemas", "Symbol"), "side": {"type": "string", "enum": ["buy", "sell"]},
                        "size": _SIZE,
                        "entry_price": {**_PRICE, "type": ["number", "null"]},
                        "stop_loss": {**_PRICE, "type": ["number", "null"], "description": (
                            "stop_loss below the entry for a buy, above for a sell (400 otherwise)")},
                        "take_profit": {**_PRICE, "type": ["number", "null"], "description": (
                            "take_profit above the entry for a buy, below for a sell (400 otherwise)")},
                        "trailing_distance": {**_PRICE, "type": ["number", "null"], "description": (
                            "for a sell, entry + trailing_distance (where its trailing stop starts) "
                            "below 1e12 too (400 otherwise)")},
                        "breakeven_trigger": {**_PRICE, "type": ["number", "null"]},
                        "ts": {**_TS, "type": ["integer", "null"], "description": (
                            f"Opening time; default now; {AHEAD_RULE}, {SECONDS_RULE} (400 otherwise)")},
                    },
                },
                "Trade": {
                    "type": "object",
                    "required": ["id", "symbol", "side", "size", "entry_price", "status", "opened_at", "pnl",
                                 "pnl_kind", "mark"],
                    "properties": {
                        "id": {"type": "integer"}, "symbol": {"type": "string"},
                        "side": {"type": "string", "enum": ["buy", "sell"]}, "size": _NUMBER, "entry_price": _NUMBER,
                        "stop_loss": _NULLABLE_NUMBER, "take_profit": _NULLABLE_NUMBER,
                        "trailing_distance": _NULLABLE_NUMBER, "breakeven_trigger": _NULLABLE_NUMBER,
                        "best_price": _NULLABLE_NUMBER, "status": {"type": "string", "enum": ["open", "closed"]},
                        "opened_at": _TS, "closed_at": {"type": ["integer", "null"]}, "exit_price": _NULLABLE_NUMBER,
                        "close_reason": {"type": ["string", "null"]},
                        "pnl": {"type": ["number", "null"], "description": (
                            "Realised for a closed trade; for an open one unrealised at the latest tick (bid for a "
                            "buy, ask for a sell), null without a tick. Computed exactly in decimal, (exit - entry) x "
                            "size on the prices and size as sent (each float's shortest decimal form), so it has at "
                            "most the decimals of the prices plus those of the size and no binary float noise: "
                            "(97001.8 - 97012.35) x 0.35 is -3.6925")},
                        "pnl_kind": {"type": "string", "enum": ["realised", "unrealised"]},
                        "mark": {"oneOf": [{"type": "null"}, {
                            "type": "object", "required": ["price", "ts", "tick_id"],
                            "properties": {"price": _NUMBER, "ts": _TS, "tick_id": {"type": "integer"}}}]},
                    },
                },
                "TradeDetail": {
                    "allOf": [_ref("schemas", "Trade"), {
                        "type": "object", "required": ["events"],
                        "properties": {"events": {"type": "array", "items": {
                            "type": "object", "required": ["id", "ts", "kind", "price", "pnl", "detail"],
                            "properties": {"id": {"type": "integer"}, "ts": _TS, "kind": {"type": "string"},
                                           "price": _NULLABLE_NUMBER, "pnl": _NULLABLE_NUMBER,
                                           "detail": {"type": "string"}}}}},
                    }],
                },
                "Health": {
                    "type": "object", "required": ["status", "writer", "database", "circus"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ok", "degraded", "unavailable"]},
                        "writer": {"type": "object", "required": ["up"], "properties": {
                            "up": {"type": "boolean"}, "pid": {"type": "integer"}, "ping_ms": _NUMBER,
                            "stats": {"type": "object", "description": (
                                "The writer's counters (queue_depth, commit_p50_ms, commit_p99_ms, lock_errors, ...)")},
                            "error": {"type": "string"},
                            "writes_refused": {"type": "string", "description": "why it refuses writes now"}}},
                        "database": {"type": "object", "description": (
                            "SQLite: the file's path, journal mode, sizes, lock errors (must read 0) and the "
                            "last checkpoint. A server (PostgreSQL): its dialect and host only (never a user "
                            "or password), whether it answers (503 when not), its size, ping and number of "
                            "sessions."), "properties": {
                            "path": {"type": "string"}, "journal_mode": {"type": "string"},
                            **{name: {"type": ["integer", "null"]} for name in (
                                "page_count", "page_size", "freelist_count", "schema_version")},
                            "size_bytes": {"type": ["integer", "null"]}, "wal_bytes": {"type": "integer"},
                            "lock_errors": {"type": ["integer", "null"]},
                            "last_checkpoint": {"type": ["object", "null"], "description": (
                                "the last checkpoint asked of the writer (the checkpoint op: the jobs worker, "
                                "the console, python -m db checkpoint) since it started; null before the first. "
                                "The writer's own, in the background, are counted in its stats "
                                "(background_checkpoints).")},
                            "dialect": {"type": "string", "examples": ["postgresql"]},
                            "host": {"type": ["string", "null"]}, "reachable": {"type": "boolean"},
                            "ping_ms": _NUMBER,
                            "connections": {"type": "integer", "description": "This database's sessions"},
                            "error": {"type": "string"}}, "additionalProperties": False},
                        "circus": {
                            "type": "object", "required": ["reachable", "watchers", "processes", "down"],
                            "additionalProperties": False, "properties": {
                                "reachable": {"type": "boolean"},
                                "watchers": {"type": "object", "additionalProperties": {"type": "string"},
                                             "description": ("circus's status of each watcher (active, stopped, ...); "
                                                             "`missing (...)`: one of the stack's that circus has "
                                                             "not (a reloadconfig removed it)")},
                                "processes": {"type": "object", "additionalProperties": {"type": ["integer", "null"]},
                                              "description": "Processes each watcher runs (null: circusd did not say)"},
                                "down": {"type": "object", "additionalProperties": {"type": "string"},
                                         "examples": [{"analysis": "stopped"}], "description": (
                                             "Each watcher that is down, with what is wrong: its status (`stopped`), "
                                             "or `N of M processes` when circus calls it active with fewer than it "
                                             "was asked for, at least 1 (after a `decr` to 0: `0 of 1 "
                                             "processes (circus was asked for 0)`), or `missing (...)` for a "
                                             "watcher of the stack circus does not have")},
                                "error": {"type": "string"}}},
                    },
                },
            },
            "responses": {
                name: _json(_ref("schemas", "Error"), text)
                for name, text in (
                    ("BadRequest", "Bad query parameter (invalid_parameter), body not JSON (invalid_json) or rejected "
                                   "by validation (invalid_body), or a body that cannot be read (bad_request: a "
                                   "malformed chunked encoding)"),
                    ("Unauthorized", "Missing or malformed bearer token"),
                    ("Forbidden", "Wrong token"),
                    ("NotFound", "No such trade"),
                    ("MethodNotAllowed", "Method not allowed on this path"),
                    ("Conflict", "The trade is already closed"),
                    ("PayloadTooLarge", "Body over 8 MiB, sent with a Content-Length or chunked"),
                    ("UnsupportedMediaType", "Body not sent as application/json"),
                    ("Unavailable", "The writer did not answer in time (writer_unavailable; Retry-After says when "
                                    "to retry), or the API's token file is unusable (token_file_unusable, saying "
                                    "which file and why: every write is refused until it is fixed)"),
                    ("StorageFull", "The database's disk is full (storage_full, with the writer's reason): nothing "
                                    "was written; retry once space is freed (Retry-After)"),
                )
            },
        },
    }


def _columns(fields: dict[str, Any]) -> dict[str, Any]:
    """The columns form of a tick batch: an object of equal-length arrays, one per field."""
    return {"type": "object", "required": ["symbol", "ts", "bid", "ask"], "additionalProperties": False,
            "description": "Columns: symbol, ts, bid, ask required; volume, source, seq optional; all arrays of one "
                           "length (400 otherwise); bid <= ask in every row",
            "properties": {name: {"type": "array", "minItems": 1, "maxItems": MAX_TICKS, "items": schema}
                           for name, schema in fields.items()}}


@functools.cache
def _complete() -> dict[str, Any]:
    """The document with what every request shares: :data:`_INTEGERS` stated, and every optional
    query parameter marked ``allowEmptyValue`` (the API takes an empty value as absent)."""
    doc = copy.deepcopy(_build())
    doc["info"]["description"] += " " + _INTEGERS
    inline = [p for item in doc["paths"].values() for op in item.values() for p in op.get("parameters", [])]
    for param in [*inline, *doc["components"]["parameters"].values()]:
        if param.get("in") == "query" and not param.get("required"):
            param["allowEmptyValue"] = True
    return doc


def document() -> dict[str, Any]:
    """A fresh copy of the OpenAPI 3.1 document (callers may change it)."""
    return copy.deepcopy(_complete())
