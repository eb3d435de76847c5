"""The components of the API's OpenAPI document (:mod:`webapp.api.openapi`): the query parameters,
schemas and error responses its paths refer to (:func:`components`), and the JSON Schema pieces both
use: a reference, a JSON response, and what the writer's validators accept as a time, a price, a size.
"""
from __future__ import annotations

from typing import Any

from db.timestamps import UNITS_RULE
from db.validation import DEFAULT_SOURCE, MAX_PRICE, MAX_SIZE, MAX_TS, NAME_RE, SYMBOL_RE
from db.vocabulary import TIMEFRAMES
from webapp.api.limits import LIMIT_DEFAULT, LIMIT_MAX, MAX_ID


def ref(kind: str, name: str) -> dict[str, str]:
    """A reference to the component ``name`` of ``kind`` ("schemas", "parameters", "responses")."""
    return {"$ref": f"#/components/{kind}/{name}"}


def json_response(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A response whose JSON body has ``schema``."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


NUMBER = {"type": "number"}
NULLABLE_NUMBER = {"type": ["number", "null"]}
TS = {"type": "integer", "minimum": 0, "maximum": MAX_TS, "description": "Epoch milliseconds UTC"}
#: A tick's or a trade's time as sent: no later than a day ahead of now (db.validation.moment).
AHEAD_RULE = "at most a day ahead of now"
#: ... and not a time in seconds (db.timestamps.time_problem).
SECONDS_RULE = f"{UNITS_RULE} (1e9 to 1e10: a time in seconds, January to April 1970 as milliseconds)"
TS_IN = {**TS, "description": f"Epoch milliseconds UTC, {AHEAD_RULE}, {SECONDS_RULE} (400 otherwise)"}
#: What the writer's validators (db.validation) accept, as JSON Schema: a price (also a trailing or
#: break-even distance), a trade's size, a tick's volume, a tick's seq.
PRICE = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": MAX_PRICE}
SIZE = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": MAX_SIZE}
VOLUME = {"type": "number", "minimum": 0, "exclusiveMaximum": MAX_PRICE}
SEQ = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}


def components() -> dict[str, Any]:
    """The document's ``components``: the bearer scheme, and the query parameters, schemas and error
    responses that its paths refer to (:func:`ref`)."""
    return {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "parameters": {
            "Symbol": {"name": "symbol", "in": "query", "required": True, "schema": ref("schemas", "Symbol")},
            "Timeframe": {"name": "timeframe", "in": "query", "required": True,
                          "schema": {"type": "string", "enum": list(TIMEFRAMES)}},
            "Since": {"name": "since", "in": "query", "schema": TS, "description": (
                "Earliest ts, inclusive; given, the page is the oldest `limit` rows from here (paging forward)")},
            "Until": {"name": "until", "in": "query", "schema": TS, "description": (
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
                    "properties": {"since": TS, "until": TS,
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
                "properties": {"id": {"type": "integer"}, "symbol": {"type": "string"}, "ts": TS, "bid": NUMBER,
                               "ask": NUMBER, "volume": NUMBER, "source": {"type": "string"},
                               "seq": {"type": ["integer", "null"]}},
            },
            "TickIn": {
                "type": "object", "required": ["symbol", "ts", "bid", "ask"], "additionalProperties": False,
                "properties": {
                    "symbol": ref("schemas", "Symbol"), "ts": TS_IN, "bid": PRICE,
                    "ask": {**PRICE, "description": "At least bid: bid <= ask (400 otherwise)"},
                    "volume": {**VOLUME, "type": ["number", "null"], "default": 0},
                    "source": {"type": ["string", "null"], "pattern": f"^{NAME_RE.pattern}$",
                               "default": DEFAULT_SOURCE},
                    "seq": {**SEQ, "type": ["integer", "null"],
                            "description": "With source, makes the tick idempotent"},
                },
            },
            "Bar": {
                "type": "object", "required": ["ts", "open", "high", "low", "close", "volume"],
                "properties": {"ts": {**TS, "description": "Bucket start, epoch ms UTC"}, "open": NUMBER,
                               "high": NUMBER, "low": NUMBER, "close": NUMBER, "volume": NUMBER},
            },
            "TradeIn": {
                "type": "object", "required": ["symbol", "side", "size"], "additionalProperties": False,
                "properties": {
                    "symbol": ref("schemas", "Symbol"), "side": {"type": "string", "enum": ["buy", "sell"]},
                    "size": SIZE,
                    "entry_price": {**PRICE, "type": ["number", "null"]},
                    "stop_loss": {**PRICE, "type": ["number", "null"], "description": (
                        "stop_loss below the entry for a buy, above for a sell (400 otherwise)")},
                    "take_profit": {**PRICE, "type": ["number", "null"], "description": (
                        "take_profit above the entry for a buy, below for a sell (400 otherwise)")},
                    "trailing_distance": {**PRICE, "type": ["number", "null"], "description": (
                        "for a sell, entry + trailing_distance (where its trailing stop starts) "
                        "below 1e12 too (400 otherwise)")},
                    "breakeven_trigger": {**PRICE, "type": ["number", "null"]},
                    "ts": {**TS, "type": ["integer", "null"], "description": (
                        f"Opening time; default now; {AHEAD_RULE}, {SECONDS_RULE} (400 otherwise)")},
                },
            },
            "Trade": {
                "type": "object",
                "required": ["id", "symbol", "side", "size", "entry_price", "status", "opened_at", "pnl",
                             "pnl_kind", "mark"],
                "properties": {
                    "id": {"type": "integer"}, "symbol": {"type": "string"},
                    "side": {"type": "string", "enum": ["buy", "sell"]}, "size": NUMBER, "entry_price": NUMBER,
                    "stop_loss": NULLABLE_NUMBER, "take_profit": NULLABLE_NUMBER,
                    "trailing_distance": NULLABLE_NUMBER, "breakeven_trigger": NULLABLE_NUMBER,
                    "best_price": NULLABLE_NUMBER, "status": {"type": "string", "enum": ["open", "closed"]},
                    "opened_at": TS, "closed_at": {"type": ["integer", "null"]}, "exit_price": NULLABLE_NUMBER,
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
                        "properties": {"price": NUMBER, "ts": TS, "tick_id": {"type": "integer"}}}]},
                },
            },
            "TradeDetail": {
                "allOf": [ref("schemas", "Trade"), {
                    "type": "object", "required": ["events"],
                    "properties": {"events": {"type": "array", "items": {
                        "type": "object", "required": ["id", "ts", "kind", "price", "pnl", "detail"],
                        "properties": {"id": {"type": "integer"}, "ts": TS, "kind": {"type": "string"},
                                       "price": NULLABLE_NUMBER, "pnl": NULLABLE_NUMBER,
                                       "detail": {"type": "string"}}}}},
                }],
            },
            "Health": {
                "type": "object", "required": ["status", "writer", "database", "circus"],
                "properties": {
                    "status": {"type": "string", "enum": ["ok", "degraded", "unavailable"]},
                    "writer": {"type": "object", "required": ["up"], "properties": {
                        "up": {"type": "boolean"}, "pid": {"type": "integer"}, "ping_ms": NUMBER,
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
                        "ping_ms": NUMBER,
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
            name: json_response(ref("schemas", "Error"), text)
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
    }
