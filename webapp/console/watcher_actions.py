"""Actions on several processes at once: restart every watcher, and send a signal to a watcher's
processes. Both are POST forms with the CSRF token that ask first: without ``confirm=yes`` the
console answers with a confirmation page and changes nothing (the page's script asks with a dialog
instead and sends ``confirm=yes``). Both go through circusd and are audited once.

**Restart all** restarts each watcher that is not stopped (one stopped on purpose stays stopped),
in circus's priority order (the writer first), one after the other, each followed until circus
runs new processes (:func:`webapp.console.watchers.run_and_follow`; one circus was asked to run 0
processes of, until circus stops it: a start that runs none ends so), then records one audit row
``watchers.restart_all`` with each outcome. The console serving the request comes last: the row is
recorded before its restart is sent (this request ends with it), so it says ``sent`` for it.

**Signal** sends SIGHUP, SIGTERM or SIGKILL to every process of a watcher, or to one of them, with
circus's ``signal`` command (a gunicorn master passes HUP and TERM on to its workers itself).
After a signal that ends the processes (TERM, KILL, and HUP but to gunicorn, which reloads its
workers on it: :func:`ends_processes`) the console waits, bounded, to say whether each exited. A HUP
to a gunicorn master that has not set its handlers yet (it is starting) is refused, not sent: it
would end it; the confirmation page says so already, and a confirmed one refused is audited as
``skipped``. Audited as ``watcher.signal``: recorded before the signal is sent when it ends the
console serving the request; when it ends the writer (which takes the record), spooled and sent once
the writer is back.

The audit log stores one of ``db.models.AUDIT_RESULTS``: an action that did not settle in time is an error there,
its detail saying what was sent and what was seen.
"""
from __future__ import annotations

import signal
import time
from typing import Any

import psutil
from flask import flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from db.lock import PidLock
from supervision.circus import CircusError, missing_watchers
from supervision.procstats import takes_default_action
from webapp.console.common import audit, bad_request, bp, circus, log, settings
from webapp.console.watcher_page import SIGNALS, find_watcher, watcher_names
from webapp.console.watchers import (
    WRITER_WATCHER,
    audit_result,
    gunicorn_workers,
    missing_advice,
    options_of,
    pids_of,
    run_and_follow,
    serves_this_request,
)

#: Seconds the console waits for signalled processes to exit after a signal that ends them.
EXIT_WAIT = 10.0


def _back(name: str | None = None) -> ResponseReturnValue:
    return redirect(url_for("console.watcher_page", name=name) if name else url_for("console.watchers"), 303)


# --- signal --------------------------------------------------------------------------------------------


def _targets(c: Any, name: str, raw_pid: str | None) -> list[int]:
    """The pids the signal goes to: every process of ``name``, or the one given, checked."""
    pids = pids_of(c, name) or []
    if not raw_pid:
        if not pids:
            bad_request(f"{name} has no process to signal (it is stopped)")
        return pids
    if not (raw_pid.isascii() and raw_pid.isdigit() and len(raw_pid) <= 10) or int(raw_pid) not in pids:
        bad_request(f"pid: {raw_pid[:20]!r} is not a process of {name} (its processes: "
                    f"{', '.join(map(str, pids)) or 'none'}); leave it empty for all of them")
    return [int(raw_pid)]


def ends_processes(c: Any, name: str, sig: str) -> bool:
    """Whether ``sig`` (a key of ``SIGNALS``) ends the processes of watcher ``name``: TERM and KILL
    always; HUP too (the writer and our workers stop gracefully on it), but for a gunicorn watcher,
    whose master reloads its workers and stays."""
    if sig != "HUP":
        return True
    opts = options_of(c, name)
    return gunicorn_workers(str(opts.get("cmd") or ""), str(opts.get("args") or "")) is None


def _exited(proc: psutil.Process) -> bool:
    """Whether ``proc`` has ended (a zombie circus has not reaped yet has ended too)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_exit(pids: list[int], within: float) -> dict[int, bool]:
    """{pid: exited} after waiting at most ``within`` seconds for each of ``pids`` to end."""
    procs: dict[int, psutil.Process | None] = {}
    for pid in pids:
        try:
            procs[pid] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            procs[pid] = None
    deadline = time.monotonic() + within
    while True:
        exited = {pid: proc is None or _exited(proc) for pid, proc in procs.items()}
        if all(exited.values()) or time.monotonic() >= deadline:
            return exited
        time.sleep(0.1)


def _still_starting(name: str, sig: str, pids: list[int], ends: bool) -> str | None:
    """Why ``sig`` is not sent to ``pids`` of ``name``, or None. ``ends``: :func:`ends_processes`'s
    answer; a signal that ends them is sent whatever their state. Otherwise (HUP to gunicorn): circus
    calls a gunicorn master active as soon as it runs, and until it sets its handlers HUP's default
    action ends it instead of reloading its workers. Not sent to any of them: the operator can pick
    the others by pid."""
    if ends:
        return None
    starting = [p for p in pids if takes_default_action(p, int(getattr(signal, f"SIG{sig}")))]
    if not starting:
        return None
    one = len(starting) == 1
    return (f"SIG{sig} not sent: {name}'s gunicorn {'master' if one else 'masters'} (pid "
            f"{', '.join(map(str, starting))}) {'is' if one else 'are'} still starting and "
            f"{'has' if one else 'have'} not set {'its' if one else 'their'} signal handlers: SIG{sig} "
            f"would end {'it' if one else 'them'} instead of reloading {'its' if one else 'their'} workers. "
            "Try again in a moment.")


@bp.post("/watchers/<name>/signal")
def watcher_signal(name: str) -> ResponseReturnValue:
    sig = request.form.get("signal", "")
    if sig not in SIGNALS:
        bad_request(f"signal: {sig[:20]!r} is not one the console sends; one of {', '.join(SIGNALS)}")
    c = circus()
    c.busy_retry = 15.0  # a busy circus is waited out: for the options ends_processes reads, and the signals
    find_watcher(c, name)
    pids = _targets(c, name, request.form.get("pid"))
    what = f"SIG{sig} to {name} ({'pid' if len(pids) == 1 else 'pids'} {', '.join(map(str, pids))})"
    ends = ends_processes(c, name, sig)
    refusal = _still_starting(name, sig, pids, ends)
    if request.form.get("confirm") != "yes":  # the page says already what would refuse it now
        return render_template("console/confirm_signal.html", name=name, signal=sig, meaning=SIGNALS[sig],
                               pid=request.form.get("pid") or "", pids=pids, what=what,
                               is_writer=name == WRITER_WATCHER, refusal=refusal)
    if refusal:
        audit("watcher.signal", name, "skipped", refusal)  # confirmed and not done: in the audit log too
        flash(refusal, "error")
        return _back(name)
    signum = int(getattr(signal, f"SIG{sig}"))
    ends_self = ends and serves_this_request(c, name)
    writer_down = ends and name == WRITER_WATCHER
    if ends_self:
        audit("watcher.signal", name, "ok", f"{what}: sent; recorded before sending, it ends this console")
    props: dict[str, Any] = {"name": name, "signum": signum}
    try:
        for pid in pids:
            c.call("signal", pid=pid, **props)
    except CircusError as e:
        if not ends_self:
            audit("watcher.signal", name, "error", f"{what}: {e}")
        flash(f"Sending {what} failed: {e}", "error")
        return _back(name)
    if ends_self:
        flash(f"Sent {what}. This console goes away for a moment; reload the page.", "warn")
        return _back(name)
    message = f"Sent {what}."
    result = "ok"
    if ends:
        exited = _wait_exit(pids, EXIT_WAIT)
        gone = [p for p, e in exited.items() if e]
        staying = [p for p, e in exited.items() if not e]
        if gone:
            message += f" Exited: {', '.join(map(str, gone))}; circus starts a new process in its place."
        if staying:
            message += (f" Still running after {EXIT_WAIT:.0f} s: {', '.join(map(str, staying))} (a graceful stop "
                        "may take longer; KILL ends it at once).")
            result = "timeout"
    audit("watcher.signal", name, audit_result(result), message, writer_down=writer_down)
    flash(message, "ok" if result == "ok" else "warn")
    return _back(name)


# --- restart all ---------------------------------------------------------------------------------------


def restart_order(c: Any, names: list[str]) -> list[str]:
    """``names`` by circus priority, highest first (the order circus starts them in), then by name."""
    def priority(name: str) -> int:
        value = options_of(c, name).get("priority")
        return int(value) if isinstance(value, int) else 0
    return sorted(names, key=lambda n: (-priority(n), n))


#: Held (``flock``, by whichever worker and thread runs it) while a restart of every watcher runs.
RESTART_ALL_LOCK = "console-restart-all.lock"


@bp.post("/watchers/restart-all")
def restart_all() -> ResponseReturnValue:
    """Ask, then restart every running watcher once, this console last. One at a time, across the
    console's workers: two at once restarted every watcher twice, and the first to restart this
    console killed the other request midway, unanswered and unaudited (fault hunt as an operator)."""
    if request.form.get("confirm") != "yes":
        return _restart_all()
    lock = PidLock(settings().run_dir / RESTART_ALL_LOCK)
    if not lock.try_acquire():
        flash("A restart of every watcher is already running (asked by another request): this one was not "
              "run. The Watchers page shows its progress; its result is in the audit log.", "warn")
        return _back()
    try:
        return _restart_all()
    finally:
        lock.release()


def _restart_all() -> ResponseReturnValue:
    c = circus()
    statuses = c.statuses()
    names = watcher_names(statuses)
    running = [n for n in names if statuses[n] != "stopped"]
    stopped = [n for n in names if statuses[n] == "stopped"]
    missing = missing_watchers(statuses)  # no restart brings them back: said, with what does
    own = next((n for n in running if serves_this_request(c, n)), None)
    # Shown, audited and run in one order (the page listed them by name under "the writer first").
    others = restart_order(c, [n for n in running if n != own])
    order = [*others, own] if own is not None else others
    if request.form.get("confirm") != "yes":
        return render_template("console/confirm_restart_all.html", running=order, stopped=stopped,
                               missing=[(n, missing_advice(n)) for n in missing])
    if not running:
        flash("Every watcher is stopped: nothing to restart (start them one by one).", "warn")
        return _back()
    c.busy_retry = 15.0
    outcomes: list[str] = []
    failed = False
    for name in others:
        result, message = run_and_follow(c, name, "restart")  # the writer: until it answers
        failed = failed or result != "ok"
        outcomes.append(f"{name}: {result}, {message}")
    if stopped:
        outcomes.append(f"left stopped: {', '.join(stopped)}")
    outcomes.extend(f"{name}: missing, not restarted: {missing_advice(name)}" for name in missing)
    if own is not None:
        outcomes.append(f"{own}: sent (this console restarts last)")
    detail = "\n".join(outcomes)
    audit("watchers.restart_all", ", ".join(order), "error" if failed else "ok", detail)
    if own is not None:
        try:
            c.call("restart", name=own, waiting=False)
        except CircusError as e:
            log.warning("console: restart-all: restarting %s failed: %s", own, e)
            flash(f"Restarted the others; restarting {own} failed: {e}", "error")
            return _back()
        flash(f"Restarted {len(running) - 1} watcher(s); {own}, this console, restarts now: reload the page in a "
              "moment.", "warn")
        return _back()
    flash(("Restart all: " if not (failed or missing) else "Restart all, with problems: ") + "; ".join(outcomes),
          "error" if failed else "warn" if missing else "ok")
    return _back()
