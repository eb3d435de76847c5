"""Watchers: status, processes, CPU, memory, uptime and restarts, live; start/stop/restart/incr/decr.

Actions are POST forms with the CSRF token. ``stop``, and ``decr`` of a watcher's last process
(which stops it just the same, until someone adds one back with ``incr``), need ``confirm=yes``:
without it the console answers with a confirmation page and changes nothing (the page's script asks
with a dialog instead and sends ``confirm=yes``). ``decr`` of one of several processes does not ask.
Every action is audited as ``watcher.<action>``.

``circusd-stats``, the statistics process circus runs itself (``statsd = True``), is shown read-only:
no buttons, and an action on it is refused with 400.

Two actions cut the branch they sit on, and are audited *before* they are sent: those that stop or
restart the console serving the request (sent without waiting, else the request would wait for its
own end), and those that stop the writer (which takes the audit record).
"""
from __future__ import annotations

import json
import os
from typing import Any

from flask import flash, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import SQLAlchemyError

from db import queries
from db.models import now_ms
from supervision.circus import ACTIONS, CircusError
from supervision.procstats import collect_watchers
from webapp.console.common import audit, bad_request, bp, circus, log, meter
from webapp.extensions import db

#: The writer's watcher in circus.ini: stopping it takes the audit log away.
WRITER_WATCHER = "writer"
#: Actions that always ask first; ``decr`` asks when it would remove the watcher's last process.
CONFIRM_ACTIONS = ("stop",)
#: Watchers circus runs for itself: shown, never acted on.
READ_ONLY_WATCHERS = frozenset({"circusd-stats"})
LABELS = {"start": "Start", "stop": "Stop", "restart": "Restart", "incr": "+1 process", "decr": "−1 process"}


def restarts_last_hour() -> dict[str, int]:
    """Restarts per watcher over the last hour, from the sampler's ``watcher.restarts`` series
    (see :mod:`supervision.sampler` for what is counted); {} when it cannot be read."""
    try:
        totals = queries.sample_totals(db.session, "watcher.restarts", now_ms() - 3_600_000)
    except SQLAlchemyError:
        db.session.rollback()
        return {}
    return {label: int(total) for label, total in totals.items()}


def watcher_table() -> tuple[list[dict[str, Any]], str | None]:
    """(watchers with their figures and restarts, None) or ([], what is wrong with circus)."""
    try:
        rows = collect_watchers(circus(), meter())
    except CircusError as e:
        return [], str(e)
    restarts = restarts_last_hour()
    for row in rows:
        row["restarts"] = restarts.get(row["name"])
    return rows, None


@bp.get("/")
def index() -> ResponseReturnValue:
    return redirect(url_for("console.watchers"))


@bp.get("/watchers")
def watchers() -> ResponseReturnValue:
    rows, error = watcher_table()
    return render_template("console/watchers.html", watchers=rows, error=error, actions=ACTIONS, labels=LABELS,
                           confirm_actions=CONFIRM_ACTIONS, read_only=READ_ONLY_WATCHERS)


@bp.get("/api/watchers")
def api_watchers() -> ResponseReturnValue:
    """The watchers table as JSON, for the page's 2-second poll."""
    rows, error = watcher_table()
    return jsonify({"ts": now_ms(), "error": error, "watchers": rows})


def _pids(c: Any, name: str) -> list[int] | None:
    """The pids of watcher ``name``'s processes (not their children); None if circus does not say."""
    try:
        return [int(p) for p in c.call("list", name=name).get("pids") or []]
    except (CircusError, TypeError, ValueError):
        return None


def _serves_this_request(c: Any, name: str) -> bool:
    """Whether watcher ``name`` runs this process (gunicorn's master is our parent)."""
    return bool(set(_pids(c, name) or []) & {os.getpid(), os.getppid()})


def _needs_confirmation(c: Any, name: str, action: str) -> bool:
    """``stop`` always; ``decr`` when the watcher has at most one process (or circus does not say how many)."""
    if action in CONFIRM_ACTIONS:
        return True
    if action == "decr":
        pids = _pids(c, name)
        return pids is None or len(pids) <= 1
    return False


@bp.post("/watchers/<name>/<action>")
def watcher_action(name: str, action: str) -> ResponseReturnValue:
    if action not in ACTIONS:
        bad_request(f"unknown action {action[:40]!r}; one of {', '.join(ACTIONS)}")
    if name in READ_ONLY_WATCHERS:
        bad_request(f"{name} is circus's own statistics process: the console shows it, read-only, "
                    "and does not act on it")
    try:
        c = circus()
        statuses = c.statuses()
    except CircusError as e:
        flash(f"{LABELS[action]} {name}: {e}", "error")
        return redirect(url_for("console.watchers"), 303)
    if name not in statuses or name.startswith("plugin:"):
        names = sorted(n for n in statuses if not n.startswith("plugin:") and n not in READ_ONLY_WATCHERS)
        bad_request(f"no watcher named {name[:60]!r}; watchers are {', '.join(names)}")
    if request.form.get("confirm") != "yes" and _needs_confirmation(c, name, action):
        return render_template("console/confirm.html", name=name, action=action, label=LABELS[action],
                               is_writer=name == WRITER_WATCHER)
    ends_self = action in ("stop", "restart", "decr") and _serves_this_request(c, name)
    stops_writer = name == WRITER_WATCHER and action in ("stop", "decr")
    what = f"watcher.{action}"
    if ends_self or stops_writer:
        audit(what, name, "ok", "recorded before sending: the action ends "
              + ("this console" if ends_self else "the writer, which records the audit log"))
    try:
        if ends_self:
            props: dict[str, Any] = {"name": name, "waiting": False} if action != "decr" else {"name": name, "nb": 1}
            answer = c.call(action, **props)
        else:
            answer = c.act(action, name)
    except CircusError as e:
        log.warning("console: %s %s failed: %s", action, name, e)
        audit(what, name, "error", str(e))
        flash(f"{LABELS[action]} {name} failed: {e}", "error")
        return redirect(url_for("console.watchers"), 303)
    detail = {k: v for k, v in answer.items() if k in ("info", "numprocesses") and v is not None}
    if not (ends_self or stops_writer):
        audit(what, name, "ok", json.dumps(detail) if detail else "")
    if ends_self:
        flash(f"{LABELS[action]} {name}: sent. This console goes away for a moment; reload the page.", "warn")
    else:
        flash(f"{LABELS[action]} {name}: done.", "ok")
    return redirect(url_for("console.watchers"), 303)
