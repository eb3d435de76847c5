"""A page per watcher: ``/console/watchers/<name>``.

What circus runs (command line, environment without secrets), each process with its pid, age, CPU
and memory (a gunicorn master and each of its workers on a line of their own), restarts, the
flapping plugin's state for it, its last log lines, and its actions (start, stop, restart, a
signal: :mod:`webapp.console.watcher_actions`).

**Secrets are never shown.** A variable is hidden when the settings registry flags it secret
(:data:`db.config.SETTINGS`, ``secret=True``: ``TICKSTACK_API_TOKEN``) or its name says it holds
one (``PASSWORD``, ``TOKEN``, ``SECRET``, ``KEY``...); a database URL is shown through
:func:`db.engine.display_url` (``ts_owner:***@host``), and so is any ``scheme://user:password@``
in another variable or in the command line.

**Flapping** is read from circusd's log, where our plugin (:class:`supervision.plugins.Flapping`,
running in a process of its own) writes each decision: ``NAME: flapping detected: retry in 15s
(attempt number 1 of 3)`` or ``... reached max retry limit``.
"""
from __future__ import annotations

import re
import shlex
import signal
import time
from typing import Any

from flask import abort, render_template
from flask.typing import ResponseReturnValue

from db.config import SETTINGS
from db.engine import display_url
from db.models import now_ms
from supervision.circus import ACTIONS, CircusError, missing_watchers
from supervision.procstats import ProcessMeter, collect_watchers
from webapp.console import logfiles
from webapp.console.charts import CHART_BY_ID, SERIES_LABELS, sample_every, summaries
from webapp.console.common import bp, circus, meter, settings
from webapp.console.watchers import (
    CONFIRM_ACTIONS,
    LABELS,
    PROGRESS,
    READ_ONLY_WATCHERS,
    asking_for_one,
    gunicorn_workers,
    missing_advice,
    one_process,
    options_of,
    restarts_last_hour,
    shown_state,
    unavailable_actions,
)

#: Variables whose value is never shown: the settings flagged secret, and names that say so.
SECRET_SETTINGS = frozenset(s.env for s in SETTINGS if s.secret)
SECRET_NAME_RE = re.compile(r"PASSW|SECRET|TOKEN|CREDENTIAL|PRIVATE|(?:^|_)KEY(?:$|_)|AUTH|COOKIE|SESSION", re.I)
URL_SETTINGS = frozenset({"DATABASE_URL", "DATABASE_READ_URL"})
#: The variables whose values are shown: tickstack's own settings (not the secret ones), and these
#: harmless ones of the system and Python, by their exact names (a prefix let PYTHON_DSN through: the
#: review of round 41). Every other value is hidden: a list of secret names
#: missed ``MY_DSN="host=db password=..."``, ``amqp://u:pa/ss@h/`` and ``https://KEY@sentry...``
#: (a security review, round 41), and there is no end to such names.
SHOWN_SETTINGS = frozenset(s.env for s in SETTINGS if not s.secret)
SHOWN_NAMES = frozenset({"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "PWD", "TERM",
                         "TMPDIR", "HOSTNAME", "VIRTUAL_ENV", "OPENBLAS_NUM_THREADS", "PROMETHEUS_MULTIPROC_DIR",
                         "PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGAPPNAME", "PGSSLMODE", "PGPASSFILE",
                         "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "LC_NUMERIC", "LC_TIME", "LC_COLLATE", "LC_MONETARY",
                         "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED",
                         "PYTHONIOENCODING", "PYTHONFAULTHANDLER", "PYTHONWARNINGS", "PYTHONUTF8"})
#: ``scheme://user:password@`` anywhere in a text.
USERINFO_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):[^\s@/]*@")
HIDDEN = "hidden (a secret)"
HIDDEN_UNKNOWN = "hidden (not a setting of tickstack's: it may be a secret)"
#: Signals the console sends, with what each does to our processes.
SIGNALS = {"HUP": "SIGHUP: gunicorn reloads its workers; the writer and our workers stop gracefully, as on TERM "
                  "(circus starts a new process)",
           "TERM": "SIGTERM: a graceful stop (circus starts a new process)",
           "KILL": "SIGKILL: killed at once, nothing flushed (circus starts a new process)"}
LOG_LINES = 40
FLAP_RE = re.compile(r"\] (?P<name>[^:\s]+): flapping detected: (?:retry in (?P<retry>\d+(?:\.\d+)?)s \(attempt "
                     r"number (?P<n>\d+) of (?P<of>-?\d+)\)|(?P<limit>reached max retry limit))")
#: circus's line for a watcher it started (``Watcher._start``): it ends the plugin's decision before it.
START_RE = r"\] {name} started\s*$"
#: The plugin's decisions shown on the page, and the lines (decisions and starts) kept while scanning.
FLAP_EVENTS = 10
FLAP_SCAN_LINES = 50
#: How far back circusd's log is searched for the plugin's decisions.
FLAP_SCAN_BYTES = 4 * 1024 * 1024
#: The plugin's ``reset_after`` (circus.ini): after this many seconds without flapping the count starts over.
FLAP_RESET_S = 300


def hide_userinfo(text: str) -> str:
    """``scheme://user:password@`` in ``text`` shown as ``scheme://user:***@``."""
    return USERINFO_RE.sub(r"\1:***@", text)


def safe_environment(env: dict[str, Any]) -> list[dict[str, Any]]:
    """``env`` as rows ``{name, value, hidden}`` sorted by name, without a secret (module docstring)."""
    rows = []
    for name in sorted(env):
        value = str(env[name])
        if name in SECRET_SETTINGS or SECRET_NAME_RE.search(name):
            rows.append({"name": name, "value": HIDDEN if value else "(empty)", "hidden": True})
            continue
        if name not in SHOWN_SETTINGS and name not in SHOWN_NAMES:
            rows.append({"name": name, "value": HIDDEN_UNKNOWN if value else "(empty)", "hidden": True})
            continue
        if name in URL_SETTINGS or ("://" in value and ("@" in value or "password=" in value.lower())):
            value = display_url(value) if name in URL_SETTINGS else hide_userinfo(value)
            if "password=" in value.lower() and name not in URL_SETTINGS:
                value = value.split("://", 1)[0] + "://***"
        rows.append({"name": name, "value": value, "hidden": False})
    return rows


def command_line(opts: dict[str, Any]) -> str:
    """The watcher's command and arguments as circus runs them, with any URL password hidden."""
    cmd, args = str(opts.get("cmd") or ""), opts.get("args") or ""
    if isinstance(args, list | tuple):
        args = shlex.join(str(a) for a in args)
    return hide_userinfo(f"{cmd} {args}".strip())


def flapping_state(name: str, status: str, plugin_status: str | None) -> dict[str, Any]:
    """What the flapping plugin did to ``name`` lately: ``state`` (``off``: no plugin running,
    ``calm``, ``recent``: it flapped within :data:`FLAP_RESET_S`, ``retrying``: stopped for a
    crash loop and to be started again, ``given-up``: stopped until someone starts it), ``text``
    in words, and ``events`` (time in ms, line), newest last.

    A start of the watcher logged after the plugin's newest decision (circus's ``NAME started``:
    ``circusctl start``, the console's Start, a new circusd) ends that decision: a stop after it is
    someone else's, never the plugin's "stopped until someone starts it"."""
    events: list[dict[str, Any]] = []
    started_since = False  # circus started the watcher after the plugin's newest decision
    path = settings().log_dir / "circusd.log"
    try:
        started = re.compile(START_RE.format(name=re.escape(name)))
        found = logfiles.scan(path, FLAP_SCAN_LINES, None, name, window=FLAP_SCAN_BYTES,
                              pattern=re.compile(f"{FLAP_RE.pattern}|{started.pattern}"))
        for line in found.lines:
            m = FLAP_RE.search(line.text)
            if m is None or m.group("name") != name:
                started_since = started_since or bool(started.search(line.text))
                continue
            started_since = False
            events.append({"ts": line.ts, "text": line.text, "limit": bool(m.group("limit")),
                           "retry": float(m.group("retry")) if m.group("retry") else None,
                           "n": m.group("n"), "of": m.group("of")})
    except FileNotFoundError:
        pass
    events = events[-FLAP_EVENTS:]
    if plugin_status is None:
        return {"state": "off", "text": "no flapping plugin runs in this stack: a crash loop is respawned forever",
                "events": events}
    last = events[-1] if events else None
    now_ms = time.time() * 1000
    if last is None or last["ts"] is None:
        return {"state": "calm", "text": "no crash loop seen", "events": events}
    if last["limit"] and status == "stopped" and not started_since:
        return {"state": "given-up", "text": "stopped by the flapping plugin after its last retry: it stays stopped "
                                             "until someone starts it", "events": events}
    if (last["retry"] is not None and status == "stopped" and not started_since
            and now_ms < last["ts"] + (last["retry"] + 30) * 1000):
        at = last["ts"] + last["retry"] * 1000
        return {"state": "retrying", "at": at, "events": events,
                "text": f"stopped for a crash loop; circus starts it again (attempt {last['n']} of {last['of']})"}
    if now_ms - last["ts"] < FLAP_RESET_S * 1000:
        return {"state": "recent", "events": events,
                "text": "crash-looped lately; the count of retries starts over after 5 min without one"}
    return {"state": "calm", "text": "no crash loop lately", "events": events}


def processes(row: dict[str, Any], gunicorn: bool) -> list[dict[str, Any]]:
    """Each circus process of ``row`` and, under it, each of its children, measured on its own
    (once, by this thread's meter: CPU is since this thread's previous look, or since the process
    started on the first): ``{pid, role, cpu, rss, started, age, parent}``."""
    m = meter()

    def one(pid: int, role: str, parent: int | None) -> dict[str, Any]:
        got = m.measure(pid)
        return {"pid": pid, "role": role, "parent": parent, "cpu": got["cpu"] if got else None,
                "rss": got["rss"] if got else None, "started": got["started"] if got else None,
                "age": round(time.time() - got["started"], 1) if got else None}

    out = []
    for p in row["processes"]:
        out.append(one(p["pid"], "gunicorn master" if gunicorn else "process", None))
        out.extend(one(pid, "gunicorn worker" if gunicorn else "child", p["pid"]) for pid in p["children"])
    return out


def watcher_names(statuses: dict[str, str]) -> list[str]:
    return sorted(n for n in statuses if not n.startswith("plugin:") and n not in READ_ONLY_WATCHERS)


def find_watcher(c: Any, name: str) -> dict[str, str]:
    """circus's statuses, once ``name`` is known to be one of its watchers (else 404 naming them, or
    saying what to do when it is one of the stack's that circus lost)."""
    statuses = c.statuses()
    if name in missing_watchers(statuses):  # the stack's, lost by circus: say what to do
        abort(404, description=f"{name} is missing: {missing_advice(name)}")
    if name not in watcher_names(statuses):
        abort(404, description=f"no watcher named {name[:60]!r}; watchers are {', '.join(watcher_names(statuses))}")
    return statuses


@bp.get("/watchers/<name>")
def watcher_page(name: str) -> ResponseReturnValue:
    c = circus()
    try:
        statuses = find_watcher(c, name)
        rows = collect_watchers(c, ProcessMeter())  # which processes; each is measured once below
    except CircusError as e:
        return render_template("console/error.html", status=503, title="circusd unavailable", message=str(e)), 503
    row = next((r for r in rows if r["name"] == name), None)
    if row is None:
        abort(404, description=f"circus no longer has a watcher named {name[:60]!r}")
    opts = options_of(c, name)
    gunicorn = gunicorn_workers(str(opts.get("cmd") or ""), str(opts.get("args") or "")) is not None
    single = one_process(name, opts)
    shown = shown_state(row, opts)  # row["status"] stays circus's word (the flapping plugin's state reads it)
    row.update(status_text=shown.status, detail=shown.detail, up=shown.up, problem=shown.problem)
    logs = {f["name"]: f for f in logfiles.list_logs(settings().log_dir)}
    log_name = f"{name}.log" if f"{name}.log" in logs else None
    lines = logfiles.tail(settings().log_dir / log_name, LOG_LINES)[0] if log_name else []
    related = [n for n in (f"{name}.log", f"{name}.stdout.log", f"{name}.access.log") if n in logs]
    charts = (CHART_BY_ID["cpu"], CHART_BY_ID["memory"])
    summary = {cid: [r for r in rows if r["label"] == name]
               for cid, rows in summaries(charts, now_ms() - 3_600_000).items()}
    return render_template(
        "console/watcher.html", w=row, opts=opts, one_process=single, command=command_line(opts),
        unavailable=unavailable_actions(name, row["status"], opts.get("numprocesses"), asking_for_one(name, single)),
        env=safe_environment(opts.get("env") or {}), procs=processes(row, gunicorn), gunicorn=gunicorn,
        restarts=restarts_last_hour().get(name), flapping=flapping_state(name, row["status"],
                                                                          statuses.get("plugin:flapping")),
        lines=lines, log_name=log_name, related=related, signals=SIGNALS, actions=ACTIONS, labels=LABELS,
        progress=PROGRESS, confirm_actions=CONFIRM_ACTIONS, charts=charts, summary=summary,
        series_labels=SERIES_LABELS, sample_every=sample_every(),
        signal_names={int(sig): f"{sig.name} ({int(sig)})" for sig in signal.Signals})
