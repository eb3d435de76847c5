"""The OpenAPI 3.1 document of the REST API, written by hand.

:func:`document` returns it as a dict (served at ``GET /api/openapi.json``): the paths are
written here, the components they refer to in :mod:`webapp.api.openapi_components`.

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

from db.validation import MAX_TICKS, NAME_RE
from db.vocabulary import INDICATORS
from webapp.api.limits import MAX_ID, RETRY_AFTER, WRITER_DEADLINE
from webapp.api.openapi_components import (
    NUMBER,
    PRICE,
    SEQ,
    TS,
    TS_IN,
    VOLUME,
    components,
    json_response,
    ref,
)


def _errors(*codes: int) -> dict[str, Any]:
    names = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
             409: "Conflict", 413: "PayloadTooLarge", 415: "UnsupportedMediaType", 503: "Unavailable",
             507: "StorageFull"}
    return {str(c): ref("responses", names[c]) for c in codes}


#: Rules of every request that JSON Schema cannot express (a JSON Schema "integer" is any number
#: without a fractional part, 1.0 included), stated in the document's description.
_INTEGERS = ("Integers (ts, seq, ids) are written without a fraction or exponent: 1, not 1.0 or 1e0 (400). An "
             "empty query parameter counts as absent.")
_WRITE_ERRORS = (400, 401, 403, 413, 415, 503, 507)
_SERIES_PARAMS = [ref("parameters", "Since"), ref("parameters", "Until"), ref("parameters", "Limit")]
_TICK_PARAMS = [*_SERIES_PARAMS, ref("parameters", "AfterId"), ref("parameters", "BeforeId")]
#: What every list response adds to its rows: is there more, and the parameters of the next page.
_PAGE_PROPS = {"more": {"type": "boolean", "description": "More rows lie beyond this page, in its direction"},
               "next": ref("schemas", "Next")}
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
    return json_response({"type": "object", "required": [*required, "more", "next"],
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
                        "200": json_response(ref("schemas", "Health"), "The writer answers"),
                        "503": json_response(ref("schemas", "Health"), "The writer does not answer"),
                        **_errors(400),
                    },
                },
            },
            "/api/openapi.json": {
                "get": {
                    "tags": ["status"], "operationId": "openapi", "summary": "This document",
                    "responses": {"200": json_response({"type": "object"}, "The OpenAPI 3.1 document"), **_errors(400)},
                },
            },
            "/api/ticks": {
                "get": {
                    "tags": ["ticks"], "operationId": "listTicks", "summary": "Ticks of a symbol",
                    "description": _PAGE_DESCRIPTION,
                    "parameters": [ref("parameters", "Symbol"), *_TICK_PARAMS],
                    "responses": {
                        "200": _page(["symbol", "ticks"], {
                            "symbol": {"type": "string"},
                            "ticks": {"type": "array", "items": ref("schemas", "Tick")},
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
                            {"type": "array", "minItems": 1, "maxItems": MAX_TICKS, "items": ref("schemas", "TickIn")},
                            _columns({"symbol": ref("schemas", "Symbol"), "ts": TS_IN, "bid": PRICE, "ask": PRICE,
                                      "volume": {**VOLUME, "type": ["number", "null"]},
                                      "source": {"type": ["string", "null"], "pattern": f"^{NAME_RE.pattern}$"},
                                      "seq": {**SEQ, "type": ["integer", "null"]}}),
                        ]}},
                    }}}},
                    "responses": {
                        "200": json_response({
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
                    "parameters": [ref("parameters", "Symbol"), ref("parameters", "Timeframe"), *_SERIES_PARAMS],
                    "responses": {
                        "200": _page(["symbol", "timeframe", "bars"], {
                            "symbol": {"type": "string"}, "timeframe": {"type": "string"},
                            "bars": {"type": "array", "items": ref("schemas", "Bar")},
                        }, "A page of bars, oldest first"),
                        **_errors(400),
                    },
                },
            },
            "/api/indicators": {
                "get": {
                    "tags": ["bars"], "operationId": "listIndicators", "summary": "Indicator values",
                    "parameters": [
                        ref("parameters", "Symbol"), ref("parameters", "Timeframe"),
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
                                "properties": {"ts": TS, "value": NUMBER}}},
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
                        {"name": "symbol", "in": "query", "schema": ref("schemas", "Symbol")},
                        ref("parameters", "Limit"),
                        {"name": "before_id", "in": "query", "description": (
                            "Only trades with a smaller id: the cursor of the next page (`next`)"),
                         "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ID}},
                    ],
                    "responses": {
                        "200": _page(["trades"], {"trades": {"type": "array", "items": ref("schemas", "Trade")}},
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
                        "schema": ref("schemas", "TradeIn")}}},
                    "responses": {
                        "201": {**json_response(ref("schemas", "TradeDetail"), "Opened"),
                                "headers": {"Location": {"schema": {"type": "string"},
                                                         "description": "/api/trades/{id}"}}},
                        **_errors(*_WRITE_ERRORS),
                    },
                },
            },
            "/api/trades/{trade_id}": {
                "get": {
                    "tags": ["trades"], "operationId": "getTrade", "summary": "A trade with its events and P&L",
                    "parameters": [ref("parameters", "TradeId")],
                    "responses": {"200": json_response(ref("schemas", "TradeDetail"), "The trade"),
                                  **_errors(400, 404)},
                },
            },
            "/api/trades/{trade_id}/close": {
                "post": {
                    "tags": ["trades"], "operationId": "closeTrade", "summary": "Close a trade",
                    "description": ("Closes at `price`, or at the latest tick (bid for a buy, ask for a sell): "
                                    "without `price` it needs a stored tick of the symbol (400 otherwise). The "
                                    "body may be empty."),
                    "security": [{"bearer": []}],
                    "parameters": [ref("parameters", "TradeId")],
                    "requestBody": {"required": False, "content": {"application/json": {"schema": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"price": {**PRICE, "type": ["number", "null"]},
                                       "reason": {"type": "string", "maxLength": 64, "default": "manual",
                                                  # PostgreSQL's text cannot hold NUL: no text field takes it
                                                  "pattern": "^[^\\x00]*$"}},
                    }}}},
                    "responses": {
                        "200": json_response(ref("schemas", "TradeDetail"), "Closed"),
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
        "components": components(),
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
