"""Watchers: status, processes, CPU, memory, uptime and restarts, live; start/stop/restart/incr/decr.

Actions are POST forms with the CSRF token. ``stop``, and ``decr`` of a watcher's last process
(which stops it just the same, until someone adds one back with ``incr``), need ``confirm=yes``:
without it the console answers with a confirmation page and changes nothing (the page's script asks
with a dialog instead and sends ``confirm=yes``). ``decr`` of one of several processes does not ask.
Every action is audited as ``watcher.<action>``.

A watcher of the stack circus does not have (:data:`supervision.circus.STACK_WATCHERS`: a
``reloadconfig`` of a broken circus.ini dropped it) is listed as health reports it, ``missing`` and
down, with no action and what to do; an action sent for it is refused with 400, saying that.

``circusd-stats``, the statistics process circus runs itself (``statsd = True``), is shown read-only:
no buttons, and an action on it is refused with 400.

Two actions cut the branch they sit on, and are audited *before* they are sent: those that stop or
restart the console serving the request (sent without waiting, else the request would wait for its
own end), and those that stop the writer (which takes the audit record).
"""
from __future__ import annotations

import os
import shlex
import time
from typing import Any, NamedTuple

from flask import flash, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import SQLAlchemyError

from db import queries
from db.circusd import circusctl_command
from db.errors import WriterError
from db.models import AUDIT_RESULTS, now_ms
from supervision.circus import (
    ACTIONS,
    HELD_BY,
    MISSING,
    CircusError,
    CircusSilent,
    WatcherState,
    missing_watchers,
)
from supervision.procstats import collect_watchers
from webapp.console.charts import sample_every
from webapp.console.common import audit, bad_request, bp, circus, log, meter, settings, writer
from webapp.extensions import db

#: The writer's watcher in circus.ini: stopping it takes the audit log away.
WRITER_WATCHER = "writer"
#: Actions that always ask first; ``decr`` asks when it would remove the watcher's last process.
CONFIRM_ACTIONS = ("stop",)
#: Watchers circus runs for itself: shown, never acted on.
READ_ONLY_WATCHERS = frozenset({"circusd-stats"})
#: Why circus.ini makes these watchers singletons (after their name), as the console says it when
#: it neither offers nor accepts +1/−1 for them; others are "a singleton (one process at most)".
ONE_PROCESS = {
    "ticks": ("runs the simulated feed: a second process would run a second, independent random walk into the "
              "same symbols, and bars, indicators and stops would be computed from the two interleaved"),
}
#: The status shown for a watcher circus calls active while it has no process to run (decr to 0):
#: down, as /api/health says ("0 of 1 processes (circus was asked for 0)"), and styled as a problem.
NO_PROCESSES = "no processes"
#: What circus says once each action is done, and how long the console follows it: longer than the
#: writer's graceful_timeout (45 s in circus.ini), which drains before it stops.
SETTLED = {"start": "active", "stop": "stopped", "restart": "active"}
FOLLOW_SECONDS = 60.0
LABELS = {"start": "Start", "stop": "Stop", "restart": "Restart", "incr": "+1 process", "decr": "−1 process"}
#: What the page says while an action is followed (the POST answers once it is done).
PROGRESS = {"start": "Starting", "stop": "Stopping", "restart": "Restarting", "incr": "Adding a process to",
            "decr": "Removing a process from"}


def restarts_last_hour() -> dict[str, int]:
    """Restarts per watcher over the last hour, from the sampler's ``watcher.restarts`` series:
    processes replaced after they died or were restarted, never an incr/decr or a stop and start
    (:mod:`supervision.sampler` says exactly what is counted); {} when it cannot be read."""
    try:
        totals = queries.sample_totals(db.session, "watcher.restarts", now_ms() - 3_600_000)
    except SQLAlchemyError:
        db.session.rollback()
        return {}
    return {label: int(total) for label, total in totals.items()}


def options_of(c: Any, name: str) -> dict[str, Any]:
    """circus's options of watcher ``name`` ({} when it does not say)."""
    try:
        return c.call("options", name=name).get("options") or {}
    except CircusError:
        return {}


def watcher_table() -> tuple[list[dict[str, Any]], str | None]:
    """(watchers with their figures and restarts, None) or ([], what is wrong with circus).

    Each row's ``status``, ``detail``, ``up`` and ``problem`` are :func:`shown_state`'s (a watcher
    circus calls active with no process asked for, decr to 0, reads ``no processes``, down);
    ``one_process`` says why scaling it makes no sense (:func:`one_process`: the page offers no +1/−1);
    ``unavailable`` the actions that would do nothing, each with why (:func:`unavailable_actions`).
    A watcher of the stack circus does not have (a ``reloadconfig`` of a broken circus.ini dropped
    it) is a row too, as health and metrics report it: ``missing``, down, ``missing`` true (no
    action: circus has nothing to act on) and ``advice``, what to do (:func:`missing_advice`)."""
    try:
        c = circus()
        rows = collect_watchers(c, meter())
    except CircusError as e:
        return [], str(e)
    lost = missing_watchers([row["name"] for row in rows])
    rows = sorted(rows + [{"name": name, "status": MISSING, "numprocesses": 0, "pids": [], "children": [], "cpu": None,
                           "rss": None, "uptime": None, "processes": []} for name in lost], key=lambda r: r["name"])
    restarts = restarts_last_hour()
    for row in rows:
        row["restarts"] = restarts.get(row["name"])
        row["missing"] = row["name"] in lost
        row["advice"] = missing_advice(row["name"]) if row["missing"] else None
        opts = options_of(c, row["name"]) if not row["missing"] else {}
        row["one_process"] = one_process(row["name"], opts)
        row["unavailable"] = {} if row["missing"] else unavailable_actions(
            row["name"], row["status"], opts.get("numprocesses"), asking_for_one(row["name"], row["one_process"]))
        shown = shown_state(row, opts)
        row.update(status=shown.status, detail=shown.detail, up=shown.up, problem=shown.problem)
    return rows, None


def missing_advice(name: str) -> str:
    """What to do about watcher ``name`` of the stack, which circus does not have, with circusctl
    commands that run as printed."""
    endpoint = settings().circus_endpoint
    return (f"circus has no watcher {name}: it was removed (a reloadconfig of a circus.ini without a valid "
            f"[watcher:{name}] section, or circus's rm command). Restore that section in the circus.ini "
            f"circusd runs, then "
            f"`{circusctl_command(endpoint, 'reloadconfig', '--waiting')}`; or restart circusd: "
            f"`{circusctl_command(endpoint, 'quit', '--waiting')}`, then `make run`.")


def unavailable_actions(name: str, circus_status: str, asked: Any, ask_one: str = LABELS["incr"]) -> dict[str, str]:
    """The actions that would do nothing to watcher ``name``, which circus calls ``circus_status`` (its own word,
    not :func:`shown_state`'s) and was asked to run ``asked`` processes of, each with why: the page
    disables their buttons and says why in their title. The one rule of the watchers table, its
    script and a watcher's page; the routes still answer each action (a page can be old).

    A stopped watcher asked for 0 processes (``set numprocesses 0``, −1 to 0, then stopped) starts
    none, and circus stops it again: ``ask_one`` first (:func:`asking_for_one`)."""
    if circus_status == "stopped":
        out = {a: f"{LABELS[a]}: {name} is stopped" for a in ("stop", "restart", "decr")}
        if asked == 0:
            out["start"] = (f"{LABELS['start']}: circus runs {name} with 0 processes, so a start runs none: "
                            f"{ask_one} first, then {LABELS['start']}")
        return out
    if circus_status == "stopping":  # a start waits for the stop, then starts it: stop, then start
        return {}
    return {"start": f"{LABELS['start']}: circus calls {name} {circus_status}, not stopped"}


def asking_for_one(name: str, single: str | None) -> str:
    """How to ask circus for a process of watcher ``name`` again: the page's +1, or, for one that must
    run one process (``single``: :func:`one_process`), on which the page offers no +1, circusctl's
    ``set`` as it runs when pasted (the writer's tooltip said "+1 process first")."""
    if single is None:
        return LABELS["incr"]
    return f"`{circusctl_command(settings().circus_endpoint, 'set', name, 'numprocesses', '1')}`"


def one_process(name: str, opts: dict[str, Any]) -> str | None:
    """Why watcher ``name`` (circus options ``opts``) must run one process, following its name
    ("is a singleton ..."); None when +1/−1 make sense for it."""
    if name in ONE_PROCESS:  # why circus.ini makes it a singleton, in words
        return ONE_PROCESS[name]
    return "is a singleton (one process at most)" if opts.get("singleton") else None


class Shown(NamedTuple):
    """A watcher as the console shows it (:func:`shown_state`)."""

    #: The word on its pill: circus's (active, stopped, starting, stopping) or ``no processes``.
    status: str
    #: What follows the word ("1 of 2 workers"); None when nothing does.
    detail: str | None
    #: What is wrong, in /api/health's words where health calls it down too; None when it is up.
    problem: str | None

    @property
    def up(self) -> bool:
        return self.problem is None


def shown_state(row: dict[str, Any], opts: dict[str, Any]) -> Shown:
    """How the console shows watcher ``row`` (:func:`~supervision.procstats.collect_watchers`'s)
    whose circus options are ``opts``, judged by :class:`~supervision.circus.WatcherState`, the rule
    of /api/health and /metrics, so a watcher health calls down is never shown up here: ``no
    processes`` when circus was asked for none (decr to 0), ``starting`` while fewer processes run
    than asked for, circus's word when it does not call the watcher active. On top of that rule, one
    refinement of the console's: a gunicorn watcher is ``starting`` (not up) while its master runs
    fewer workers than its ``--workers`` (circus calls it active as soon as the master runs, seconds
    before its workers are forked), which health does not look at."""
    state = WatcherState.of(row["status"], row["numprocesses"], opts.get("numprocesses"))
    if state.status != "active":
        return Shown(state.status, None, state.problem)
    if state.problem is not None:
        if state.asked == 0:
            return Shown(NO_PROCESSES, None, state.problem)
        return Shown("starting", state.problem, state.problem)
    workers = gunicorn_workers(str(opts.get("cmd") or ""), str(opts.get("args") or ""))
    if workers and len(row["children"]) < workers * row["numprocesses"]:
        short = f"{len(row['children'])} of {workers * row['numprocesses']} workers"
        return Shown("starting", short, short)
    return Shown("active", None, None)


def gunicorn_workers(cmd: str, args: str = "") -> int | None:
    """The ``--workers``/``-w`` of a gunicorn command line (1, gunicorn's default, when not given);
    None when it is not gunicorn."""
    try:
        words = shlex.split(f"{cmd} {args}")
    except ValueError:
        return None
    if not words or os.path.basename(words[0]) != "gunicorn":
        return None
    for i, word in enumerate(words):
        value = word.split("=", 1)[1] if word.startswith("--workers=") else (
            words[i + 1] if word in ("--workers", "-w") and i + 1 < len(words) else None)
        if value is not None and value.isdigit():
            return int(value)
    return 1


@bp.get("/")
def index() -> ResponseReturnValue:
    return redirect(url_for("console.watchers"))


def plugins() -> dict[str, str]:
    """circus's plugins (``plugin:flapping``, ``plugin:watchdog``) and their status; {} when circus
    does not say."""
    try:
        return {n.removeprefix("plugin:"): str(st) for n, st in sorted(circus().statuses().items())
                if n.startswith("plugin:")}
    except CircusError:
        return {}


@bp.get("/watchers")
def watchers() -> ResponseReturnValue:
    rows, error = watcher_table()
    return render_template("console/watchers.html", watchers=rows, error=error, actions=ACTIONS, labels=LABELS,
                           progress=PROGRESS, confirm_actions=CONFIRM_ACTIONS, read_only=READ_ONLY_WATCHERS,
                           plugins=plugins() if not error else {}, sample_every=sample_every())


@bp.get("/api/watchers")
def api_watchers() -> ResponseReturnValue:
    """The watchers table as JSON, for the page's 2-second poll."""
    rows, error = watcher_table()
    return jsonify({"ts": now_ms(), "error": error, "watchers": rows})


def pids_of(c: Any, name: str, silent_raises: bool = False) -> list[int] | None:
    """The pids of watcher ``name``'s processes (not their children); None if circus does not say
    (:class:`CircusSilent` raised instead when ``silent_raises``: circusd held, not unknowing)."""
    try:
        return [int(p) for p in c.call("list", name=name).get("pids") or []]
    except CircusSilent:
        if silent_raises:
            raise
        return None
    except (CircusError, TypeError, ValueError):
        return None


def serves_this_request(c: Any, name: str) -> bool:
    """Whether watcher ``name`` runs this process (gunicorn's master is our parent)."""
    return bool(set(pids_of(c, name) or []) & {os.getpid(), os.getppid()})


def _needs_confirmation(c: Any, name: str, action: str) -> bool:
    """``stop`` always; ``decr`` when the watcher has at most one process (or circus does not say how many)."""
    if action in CONFIRM_ACTIONS:
        return True
    if action == "decr":
        pids = pids_of(c, name)
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
    if name in missing_watchers(statuses):
        bad_request(f"{name} is missing: {missing_advice(name)}")
    if name not in statuses or name.startswith("plugin:"):
        names = sorted(n for n in statuses if not n.startswith("plugin:") and n not in READ_ONLY_WATCHERS)
        bad_request(f"no watcher named {name[:60]!r}; watchers are {', '.join(names)}")
    why_one = one_process(name, options_of(c, name)) if action in ("incr", "decr") else None
    if why_one:  # refused before any confirmation: there is nothing to confirm
        bad_request(f"{name} {why_one}: {LABELS[action]} makes no sense; use Restart, Stop or Start")
    if request.form.get("confirm") != "yes" and _needs_confirmation(c, name, action):
        endpoint = settings().circus_endpoint
        return render_template("console/confirm.html", name=name, action=action, label=LABELS[action],
                               is_writer=name == WRITER_WATCHER,
                               incr_console=circusctl_command(endpoint, "incr", "console"),
                               start_console=circusctl_command(endpoint, "start", "console"))
    ends_self = action in ("stop", "restart", "decr") and serves_this_request(c, name)
    what = f"watcher.{action}"
    if ends_self:  # this process goes away: recorded now, the outcome is seen on the reloaded page
        audit(what, name, "ok", "sent; recorded before sending: the action ends this console")
        props: dict[str, Any] = {"name": name, "waiting": False} if action != "decr" else {"name": name, "nb": 1}
        try:
            c.call(action, **props)
        except CircusSilent:  # in circusd's socket: it runs once circusd's loop is free
            pass
        except CircusError as e:
            flash(f"{LABELS[action]} {name} failed: {e}", "error")
            return redirect(url_for("console.watchers"), 303)
        flash(f"{LABELS[action]} {name}: sent. This console goes away for a moment; reload the page.", "warn")
        return redirect(url_for("console.watchers"), 303)
    # Followed until circus reports the new state: one audit row with the real outcome (spooled
    # at once when the action took the writer away, and sent when it is back).
    result, message = run_and_follow(c, name, action)
    writer_gone = name == WRITER_WATCHER and action in ("stop", "decr") and result == "ok"
    audit(what, name, audit_result(result), message, writer_down=writer_gone)
    if result == "ok":
        flash(f"{LABELS[action]} {name}: done. {message}", "ok")
    else:
        log.warning("console: %s %s: %s", action, name, message)
        flash(f"{LABELS[action]} {name}: {message}", "error" if result == "error" else "warn")
    return redirect(url_for("console.watchers"), 303)


def writer_answers(message: str) -> tuple[str, str]:
    """After circus reports a (re)started writer active: wait, bounded, until it answers a ping, so
    that "done" means it serves, and the audit record (with the spooled ones before it) is written
    now rather than left in the spool until the next action."""
    try:
        pong = writer().wait_ready(FOLLOW_SECONDS)
    except WriterError as e:
        return "timeout", f"{message} It does not answer yet: {e}"
    return "ok", f"{message} It answers (pid {pong.get('pid', '?')})."


def audit_result(result: str) -> str:
    """An outcome as the audit log stores it (the ``audit`` op takes :data:`db.models.AUDIT_RESULTS`):
    an action that did not settle in time (``timeout``) is recorded as an error, its detail saying so."""
    return result if result in AUDIT_RESULTS else "error"


def processes_now(c: Any, name: str) -> str:
    """How many processes circus now runs ``name`` with, in words, after an incr or decr: its
    asked-for ``numprocesses``, asked for since circus's answer to incr/decr does not carry it. A
    stopped watcher runs none of them (circus starts processes only for a running one): said so."""
    try:
        asked = c.asked_for(name)
        stopped = c.statuses().get(name) == "stopped"
    except CircusError as e:
        return f"circus did not say how many processes it runs now ({e})"
    if asked is None:
        return "circus did not say how many processes it runs now"
    if stopped and asked == 0:
        return runs_none(c, name)
    if stopped:
        return f"{asked} process(es) once started; {name} is stopped: {LABELS['start']} runs them"
    return f"{asked} process(es) now"


def asked_for_none(c: Any, name: str) -> bool:
    """Whether circus was asked to run 0 processes of ``name`` (−1 to 0, ``set numprocesses 0``)."""
    try:
        return c.asked_for(name) == 0
    except CircusError:
        return False


def runs_none(c: Any, name: str) -> str:
    """What a start or restart of a watcher asked for 0 processes did, in words, and how to run one
    again (+1 process, or circusctl's ``set`` for a singleton, on which the console offers no +1)."""
    how = f"{LABELS['incr']}, then {LABELS['start']}"
    if one_process(name, options_of(c, name)):
        set_one = circusctl_command(settings().circus_endpoint, "set", name, "numprocesses", "1")
        how = f"`{set_one}`, then {LABELS['start']}"
    return (f"{name} is stopped: circus runs it with 0 processes (after a {LABELS['decr']} to 0 or a `set "
            f"numprocesses 0`), and it stops a watcher whose start runs none. To run it: {how}.")


def run_and_follow(c: Any, name: str, action: str) -> tuple[str, str]:
    """Send ``action`` without making circusd wait for it (its answer would outlast any client
    timeout while a watcher drains), then poll its status until it is the one the action leads to,
    at most :data:`FOLLOW_SECONDS`; a (re)started writer is then followed until it answers
    (:func:`writer_answers`). A call circusd does not answer in time (:class:`CircusSilent`: its loop
    is held while the writer's ``after_start`` waits for the new writer, up to 10 s when a user's
    ``sqlite3`` shell holds the write lock) is in its socket and runs once it is free: the action is
    followed as if answered, a poll asked again, never "failed" (a retry would run it twice). So
    circusd must answer before the action is sent: held already, nothing is sent and it says so
    (the pids before it, unknown then, could not tell the new process from one circus respawned
    meanwhile). Returns (audit result, what happened in words): ``ok``, ``error`` (circus refused,
    or nothing sent) or ``timeout`` (sent, not settled yet: the page shows its state).

    A watcher circus was asked to run 0 processes of has no new process to wait for: circus ends a
    start that ran none by stopping the watcher (``Watcher._start``), so its start and restart lead
    to ``stopped``, said with how to run a process again (:func:`runs_none`)."""
    c.busy_retry = 15.0  # another command (circusctl, a respawn) finishes first; the user never sees it
    try:  # no such watcher, ...: None, and the action's own call says it
        before = set(pids_of(c, name, silent_raises=True) or [])
    except CircusSilent:
        return "error", (f"not sent: circusd did not answer within {c.timeout:g} s, {HELD_BY}; nothing was "
                         "asked of it: try again in a moment")
    started = time.monotonic()
    try:
        if action not in SETTLED:
            try:
                c.call(action, name=name, nb=1)
            except CircusSilent as e:
                return "timeout", f"sent, not answered yet: {e} (the page shows its state as it changes)."
            return "ok", processes_now(c, name)
        none = action != "stop" and asked_for_none(c, name)
        end = "stopped" if none else SETTLED[action]
        try:
            c.call(action, name=name, waiting=False)
        except CircusSilent:  # in circusd's socket, run once its loop is free: followed as if answered
            pass
        status = "not settled"
        while True:
            try:
                status = str(c.statuses().get(name))
                pids = set(pids_of(c, name) or [])
            except CircusSilent:  # circusd's loop is held (the writer's after_start waits): asked again
                settled = False
            else:
                settled = status == end and (action != "restart" or none or (pids and not pids & before))
            elapsed = time.monotonic() - started
            if settled and none:
                return "ok", runs_none(c, name)
            if settled:
                which = f" (pid {', '.join(map(str, sorted(pids)))})" if pids else ""
                message = f"{name} is {status}{which} after {elapsed:.1f} s."
                return writer_answers(message) if name == WRITER_WATCHER and action != "stop" else ("ok", message)
            if elapsed > FOLLOW_SECONDS:
                return "timeout", (f"sent; {name} is still {status} after {elapsed:.0f} s (the page shows "
                                   "its state as it changes).")
            time.sleep(0.25)
    except CircusError as e:
        return "error", f"failed: {e}"
