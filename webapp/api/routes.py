"""Routes of the stack's status and of market data: health, the OpenAPI
document, the metrics, ticks (read and write), bars and indicators. Every
route takes its query parameters through :func:`~webapp.api.params.query`
(none, for most), so an unknown one is refused everywhere."""
from __future__ import annotations

import sqlite3
from typing import Any

from flask import Response, jsonify, request
from flask.typing import ResponseReturnValue

from db import queries
from db.circusd import circusd_pidfile
from db.config import Settings
from db.engine import database_location
from db.errors import server_trouble
from db.health import pragmas, writes_refused
from webapp.api import openapi
from webapp.api.params import INDICATOR, SERIES, SYMBOL, TICK_SERIES, TIMEFRAME, json_object, query
from webapp.api.state import api_state, bp, metrics_bp, write
from webapp.api.tokens import requires_token
from webapp.extensions import db
from webapp.metrics import exposition


@bp.get("/health")
def health() -> ResponseReturnValue:
    """Writer (ping and stats), database (journal mode, file sizes, lock
    errors) and circus watchers: circus's status of each (``watchers``), the processes each runs
    (``processes``, null when circusd did not say) and each watcher that is down with what is wrong
    (``down``: ``stopped``, or ``0 of 1 processes``; up is active with at least the processes circus
    was asked for, at least one: :class:`~supervision.circus.WatcherState`). 200 while the writer
    answers, whatever circus says (the API works without circus: tests, development; circus is
    reported as unreachable then); 503 when the writer does not answer, or (PostgreSQL) the
    database server does not (``database.reachable`` false; its size and connections otherwise).
    ``status`` is ``ok``, ``degraded`` (writer up, but it refuses writes (``writer.writes_refused``
    says why: :func:`db.health.writes_refused`), the database cannot be
    read, a watcher is down, or circusd does not answer although its
    pid file is there: it was killed, or is stuck; nothing restarts a process
    that dies) or ``unavailable``."""
    query()
    api = api_state()
    ping, stats, error = api.probe.writer()
    if stats and stats.get("last_commit_failure") and api.settings.database_path is None:
        # libpq's words name the database and the role: not for an anonymous caller (review, round 40).
        stats["last_commit_failure"] = {**stats["last_commit_failure"],
                                        "reason": "the database server refused it (the writer's log says why)"}
    writer: dict[str, Any] = ({"up": True, "pid": ping["pid"], "ping_ms": ping["latency_ms"], "stats": stats}
                              if ping is not None else {"up": False, "error": error})
    refused = writes_refused(stats) if ping is not None else None
    if refused is not None:
        writer["writes_refused"] = refused
    database = _database_health(api.settings, stats)
    circus = api.probe.circus()
    circus_json: dict[str, Any] = {"reachable": circus.reachable, "watchers": circus.statuses,
                                   "processes": {name: w.processes for name, w in circus.watchers.items()},
                                   "down": circus.down}
    if circus.error:
        circus_json["error"] = circus.error
    if ping is None or database.get("reachable") is False:  # no writer, or no server behind it
        status = "unavailable"
    elif ("error" in database or circus.down or refused is not None
          or (not circus.reachable and circusd_pidfile(api.settings).exists())):
        status = "degraded"
    else:
        status = "ok"
    body = {"status": status, "writer": writer, "database": database, "circus": circus_json}
    return jsonify(body), 503 if status == "unavailable" else 200


def _database_health(settings: Settings, stats: dict[str, Any] | None) -> dict[str, Any]:
    path = settings.database_path
    if path is None:  # a server: its dialect and host, never its user or password (no login here)
        server = api_state().probe.database_server() or {"reachable": False}
        if not server["reachable"]:  # libpq's words name the role: not for an anonymous caller
            return {**database_location(settings.database_url), "reachable": False,
                    "error": f"the database server {server_trouble(str(server.get('error') or ''))}"}
        return {**database_location(settings.database_url), "reachable": True, "size_bytes": server["size_bytes"],
                "connections": server["connections"], "ping_ms": server["ping_ms"]}
    files = api_state().probe.database_files()
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
    query()
    return jsonify(openapi.document())


@metrics_bp.get("/metrics")
def metrics() -> ResponseReturnValue:
    """The Prometheus exposition (text format, or OpenMetrics when the
    scraper asks for it in ``Accept``). No auth: it binds to loopback only."""
    query()
    return exposition(request.headers.get("Accept", ""))


@bp.post("/ticks")
@requires_token
def post_ticks() -> ResponseReturnValue:
    """Store ``{"ticks": [...]}`` through the writer; 200 once committed with
    ``{"inserted", "duplicates"}`` (a tick whose (source, seq) is stored is a
    duplicate, so a resent batch is safe). 200 rather than 201: ticks get no
    URL of their own, and a batch of duplicates creates nothing."""
    query()  # a write's fields are in its body: one put in the query is refused, not dropped
    result = write("insert_ticks", json_object())
    return jsonify({"inserted": result["inserted"], "duplicates": result["duplicates"]}), 200


def page_json(page: queries.Page, key: str, items: list[Any] | None = None, **head: Any) -> Response:
    """A list response: ``head`` (what was asked for), the rows under ``key`` (``items``, or each
    row as a dict), then ``more`` (rows lie beyond this page) and ``next`` (the query parameters of
    the next page, to merge into this request's; null when ``more`` is false)."""
    rows = items if items is not None else [r._asdict() for r in page.rows]
    return jsonify({**head, key: rows, "more": page.more, "next": page.next})


@bp.get("/ticks")
def get_ticks() -> ResponseReturnValue:
    """A page of ``symbol``'s ticks by (ts, id), oldest first: the oldest
    ``limit`` from ``since`` (after the tick ``since, after_id``), else the
    newest up to ``until`` (before the tick ``until, before_id``)."""
    q = query(symbol=SYMBOL, **TICK_SERIES)
    page = queries.tick_series(db.session, q["symbol"], since=q["since"], until=q["until"], limit=q["limit"],
                               after_id=q["after_id"], before_id=q["before_id"])
    return page_json(page, "ticks", symbol=q["symbol"])


@bp.get("/bars")
def get_bars() -> ResponseReturnValue:
    """A page of OHLCV bars of ``symbol`` and ``timeframe``, ``ts`` the bucket
    start (epoch ms UTC), oldest first: the oldest ``limit`` from ``since``,
    else the newest up to ``until``."""
    q = query(symbol=SYMBOL, timeframe=TIMEFRAME, **SERIES)
    page = queries.bar_series(db.session, q["symbol"], q["timeframe"], since=q["since"], until=q["until"],
                              limit=q["limit"])
    return page_json(page, "bars", symbol=q["symbol"], timeframe=q["timeframe"])


@bp.get("/indicators")
def get_indicators() -> ResponseReturnValue:
    """A page of values of indicator ``name`` for ``symbol`` and ``timeframe``
    (``ts`` the bar's bucket start), paged as bars."""
    q = query(symbol=SYMBOL, timeframe=TIMEFRAME, name=INDICATOR, **SERIES)
    page = queries.indicator_series(db.session, q["symbol"], q["timeframe"], q["name"], since=q["since"],
                                    until=q["until"], limit=q["limit"])
    return page_json(page, "values", symbol=q["symbol"], timeframe=q["timeframe"], name=q["name"])
