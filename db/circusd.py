"""The stack's circusd as its files and processes show it, and the circusctl commands we print.

:func:`circusctl_command` makes every circusctl command the stack prints, runnable as printed from
the checkout. :func:`live_circusd` tells a live circusd from a stale pid file: circus's own check,
``os.kill(pid, 0)``, is true for a zombie and for any process that got the pid later.
:func:`ask_circus` asks circusd in its own protocol, without circus's client (which configures
logging as it is imported). :func:`unreachable_circusd` finds a circusd of this stack whose control
socket is gone, by its process, and says how to stop it.

In :mod:`db` (not :mod:`supervision`) because ``python -m db prepare`` and doctor need it, and it
needs nothing from circus.
"""
from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any

import psutil

from db.config import ConfigError, Settings, load_settings
from db.files import not_sqlite_words

#: Seconds a process's start time may pass its pid file's mtime and still be the circusd that wrote
#: it (the two clocks are read differently: psutil derives start times from the boot time).
CLOCK_SLACK = 2.0


#: circusctl as a user runs it in the checkout without ``source .venv/bin/activate`` (which puts it
#: on PATH and sets ``CIRCUSCTL_ENDPOINT``), e.g. in ``make run``'s terminal.
CIRCUSCTL = ".venv/bin/circusctl"


def circusctl_command(endpoint: str, *args: str) -> str:
    """A circusctl command that runs as printed, from the checkout, the venv not activated: every
    circusctl hint the stack prints is made here. Without ``--endpoint`` circusctl would talk to
    tcp://127.0.0.1:5555, never to a tickstack circusd. Quoted for the shell: a home with a space
    in its path pastes as one argument. A start, stop, restart or quit waits until it is done
    (``--waiting``): circusctl otherwise answers at once, and circus refuses the next command
    ("arbiter is already running watcher_restart command") until it is."""
    if args and args[0] in _WAITABLE and "--waiting" not in args:
        args = (*args, "--waiting")
    timeout = ("--timeout", str(WAITED_TIMEOUT_S)) if "--waiting" in args else ()
    return shlex.join((CIRCUSCTL, "--endpoint", endpoint, *timeout, *args))


#: circusctl commands that take ``--waiting`` (a quit's: a ``make run`` right after it would find
#: circusd still stopping its watchers).
_WAITABLE = frozenset(("start", "stop", "restart", "quit"))


#: circusctl's ``--timeout`` for a command given ``--waiting`` (its own default, 5 s, would give up
#: on a stuck writer's restart and say "Timed out" while circusd goes on): a stop's graceful_timeout
#: (45 s for the writer), then a start's wait for the writer (TICKSTACK_READY_TIMEOUT, 30 s).
WAITED_TIMEOUT_S = 120


def circusd_pidfile(settings: Settings) -> Path:
    """circusd's pid file (``pidfile`` in circus.ini). circusd removes it when it exits, not when it
    is killed."""
    return settings.run_dir / "circusd.pid"


def is_circusd(cmdline: list[str]) -> bool:
    """Whether a command line is circusd's (``.../python .../bin/circusd circus.ini``)."""
    return any(os.path.basename(part) == "circusd" for part in cmdline[:2])


def live_circusd(pidfile: Path) -> int | None:
    """The pid in circusd's pid file if that process is the circusd that wrote it: alive and not a
    zombie, circusd by its command line, and started no later than the file was written (a pid
    reused by a newer process, even another circusd, is not it)."""
    try:
        text = pidfile.read_text().strip()
        written = pidfile.stat().st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not text.isdigit():
        return None
    try:
        proc = psutil.Process(int(text))
        if proc.status() == psutil.STATUS_ZOMBIE or not is_circusd(proc.cmdline()):
            return None
        return proc.pid if proc.create_time() <= written + CLOCK_SLACK else None
    except psutil.Error:
        return None


def ask_circus(endpoint: str, command: str, timeout: float = 1.0, **properties: Any) -> dict[str, Any] | None:
    """circusd's answer at ``endpoint`` to ``command``, asked in circus's own protocol (one JSON frame
    each way), as circusctl asks; None when it answers nothing within ``timeout`` or cannot be
    reached. circus answers ``status`` and ``get`` even while it runs another command."""
    import json
    import uuid

    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        call = uuid.uuid4().hex
        sock.send(json.dumps({"id": call, "command": command, "properties": properties}).encode())
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0 and sock.poll(int(left * 1000)):
            try:
                answer = json.loads(sock.recv())
            except ValueError:
                continue
            if isinstance(answer, dict) and answer.get("id") == call:
                return answer
        return None
    except zmq.ZMQError:  # an endpoint that cannot be reached: no controller serves it any more
        return None
    finally:
        sock.close()
        ctx.term()


def watchers_stopping(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether the circusd at ``endpoint`` is stopping watchers: its ``status`` has one ``stopping``
    (a ``circusctl quit`` without ``--waiting`` answers while circus stops them all; so does a stop or
    a restart of them), or it answers nothing within ``timeout`` (its controller stopped, at the end
    of a quit)."""
    answer = ask_circus(endpoint, "status", timeout)
    if answer is None:
        return True
    statuses = answer.get("statuses")
    return isinstance(statuses, dict) and "stopping" in statuses.values()


def processes_asked(endpoint: str, watcher: str, timeout: float = 1.0) -> int | None:
    """The ``numprocesses`` circusd at ``endpoint`` was asked to run for ``watcher`` (what ``set``,
    ``incr`` and ``decr`` change); None when it does not say."""
    answer = ask_circus(endpoint, "get", timeout, name=watcher, keys=["numprocesses"])
    value = ((answer or {}).get("options") or {}).get("numprocesses")
    return value if type(value) is int else None


def wait_while_stopping(endpoint: str, pid: int, seconds: float) -> bool:
    """Whether circusd ``pid`` exits within ``seconds`` while it stops its watchers
    (:func:`watchers_stopping`): False as soon as it stops none and still runs (a stop or a restart
    of watchers, not a quit), or when ``seconds`` pass."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if wait_for_exit(pid, 0.5):
            return True
        if not watchers_stopping(endpoint):
            return wait_for_exit(pid, 0)
    return False


def wait_for_exit(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` is gone (or a zombie, which holds nothing) within ``seconds``."""
    end = time.monotonic() + seconds
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.1)


def running_circusd(pid: int) -> psutil.Process | None:
    """The live circusd that runs ``pid`` (``pid`` itself, or its nearest circusd ancestor), other
    than this process: a process it runs, stopped alone, it would start again."""
    try:
        proc = psutil.Process(pid)
        for candidate in (proc, *proc.parents()):
            if candidate.pid == os.getpid():  # run by this process (a circusd's own hook): none other
                return None
            if is_circusd(candidate.cmdline()):
                return candidate if candidate.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        pass
    return None


#: What every tickstack circus.ini holds (its hooks), and a circus.ini of another project does not.
OUR_INI_MARK = "supervision.hooks."


def runs_our_ini(cmdline: list[str], cwd: str) -> bool:
    """Whether a circusd's command line names a tickstack circus.ini (a file, relative to ``cwd``,
    holding :data:`OUR_INI_MARK`): ``TICKSTACK_HOME`` in the environment of a circusd of another
    project (set in a shell's profile) does not make it this stack's, to be offered a ``kill``."""
    for arg in cmdline[1:]:
        if arg.startswith("-") or os.path.basename(arg) == "circusd":
            continue
        path = Path(cwd) / arg
        try:
            if path.is_file() and path.stat().st_size < 1_000_000 and OUR_INI_MARK in path.read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


def circusd_endpoint(circusd: psutil.Process) -> str | None:
    """The control endpoint of a tickstack circusd, from its ``TICKSTACK_HOME`` as circus.ini makes
    it (whether or not its socket is still there); None for another circusd, one whose command line
    names no tickstack circus.ini (:func:`runs_our_ini`) included."""
    try:
        home = circusd.environ().get("TICKSTACK_HOME")
        cwd = circusd.cwd()
        cmdline = circusd.cmdline()
    except psutil.Error:
        return None
    if not home or not runs_our_ini(cmdline, cwd):
        return None
    try:
        return load_settings({"TICKSTACK_HOME": str(Path(cwd) / Path(home).expanduser())}).circus_endpoint
    except ConfigError:
        return None


def quit_command(circusd: psutil.Process) -> str | None:
    """The circusctl command that stops a tickstack circusd (its control socket must be there); None
    for another circusd, and for one whose socket is gone (:func:`unreachable`)."""
    endpoint = circusd_endpoint(circusd)
    return circusctl_command(endpoint, "quit") if endpoint and _socket_there(endpoint) else None


def _socket_there(endpoint: str) -> bool:
    return Path(endpoint[len("ipc://"):]).is_socket()


def unreachable(circusd: psutil.Process) -> str | None:
    """Why circusctl cannot reach tickstack circusd ``circusd``: its control socket is gone; None
    otherwise. A second ``circusd circus.ini`` on the same home, started after its pid file was
    removed (circus calls a live one's file "stale"), binds its sockets over the running one's,
    fails on a port and exits, removing them: the stack runs on, out of reach."""
    endpoint = circusd_endpoint(circusd)
    if endpoint is None or _socket_there(endpoint):
        return None
    return (f"its control socket {endpoint[len('ipc://'):]} is gone (a second circusd started on its home "
            "removes it as it exits), so circus's commands and the console cannot reach it")


def unreachable_circusd(endpoint: str) -> str | None:
    """:func:`unreachable` for the tickstack circusd of ``endpoint``, found by its process, not its
    socket: what the console, the API and doctor say when the socket is not there (None at once
    when it is)."""
    if _socket_there(endpoint):
        return None
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (is_circusd(proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE
                    and circusd_endpoint(proc) == endpoint):
                reason = unreachable(proc)
                return None if reason is None else (
                    f"circusd pid {proc.pid} of this stack runs, but {reason}: `kill {proc.pid}` stops it and "
                    "everything it runs gracefully (circus takes SIGTERM as its quit), then `make run`")
        except psutil.Error:
            continue
    return None


#: How each of :func:`writer_down_advice`'s words begin.
_WRITER_DOWN = "The writer is not running"


def damaged_file_steps(settings: Settings, restore: str, circusd_pid: int | None = None) -> str:
    """The steps for a damaged database file, as a clause: the stack's stop first when circusd runs
    (``circusd_pid``, else asked), then ``restore`` (:func:`db.backups.restore_advice`)."""
    pid = circusd_pid if circusd_pid is not None else live_circusd(circusd_pidfile(settings))
    if pid is None:
        return restore
    return f"stop the stack (`{circusctl_command(settings.circus_endpoint, 'quit', '--waiting')}`), then {restore}"


def writer_down_advice(settings: Settings, restore_first: str | None = None) -> str:
    """What to do with no writer, by whether circusd runs: ``circusctl start writer`` cannot work
    without it (after a clean quit), ``make run`` would refuse with it. ``restore_first``: how to mend
    the damaged database file, which comes before any start (the stack stopped for it)."""
    pid = live_circusd(circusd_pidfile(settings))
    if restore_first is not None:
        stack = f", nor is the stack (no circusd in {settings.home})" if pid is None else \
            f" although circusd (pid {pid}) is"
        steps = damaged_file_steps(settings, restore_first, pid)
        what = ("is not an SQLite database, or its first page is damaged"
                if not_sqlite_words(settings.database_path) is not None else "is damaged")
        return (f"{_WRITER_DOWN}{stack}, and the database file {what} (below): do not start the writer on it. "
                f"{steps[:1].upper()}{steps[1:]}.")
    if pid is None:
        return (f"{_WRITER_DOWN}, nor is the stack (no circusd in {settings.home}), so writes wait (clients "
                "retry until their deadline). Start it with `make run` (or, after `source .venv/bin/activate`, "
                "`python -m db prepare && circusd circus.ini --daemon`: prepare clears a stale pid file and checks "
                "the ports); if it runs with another home, run this with that "
                "TICKSTACK_HOME.")
    if processes_asked(settings.circus_endpoint, "writer") == 0:
        # `start writer` answered "ok" and started nothing: circus was told to run none (`set writer
        # numprocesses 0`), and a singleton refuses `incr` (fault hunt as an operator). A stopped
        # watcher takes the number and starts nothing until it is started too (review of round 36).
        how = f"`{circusctl_command(settings.circus_endpoint, 'set', 'writer', 'numprocesses', '1')}`"
        statuses = (ask_circus(settings.circus_endpoint, "status") or {}).get("statuses") or {}
        if statuses.get("writer") != "active":
            how += f", then `{circusctl_command(settings.circus_endpoint, 'start', 'writer')}`"
        return (f"{_WRITER_DOWN} although circusd (pid {pid}) is: circus was told to run 0 writer processes, so "
                f"writes wait (clients retry until their deadline). Start it with {how}.")
    return (f"{_WRITER_DOWN} although circusd (pid {pid}) is, so writes wait (clients retry until their "
            f"deadline). Start it with `{circusctl_command(settings.circus_endpoint, 'start', 'writer')}`; if it "
            "stops again, read its log (the console's Logs page, or $TICKSTACK_HOME/log/writer.log).")


def stopped_watcher_findings(settings: Settings) -> list[tuple[str, str]]:
    """doctor's findings on the stack's watchers circus runs no process of and starts none of by itself:
    stopped (by circus's flapping plugin after their processes kept exiting, or by ``circusctl stop``),
    or asked for 0 processes (``decr`` to 0, ``set NAME numprocesses 0``), each with the commands that
    run it again (for one both stopped and at 0, the number first: a start alone answers ok and runs
    nothing); none when circusd does not answer (its own finding) and for the writer (its own finding
    too). After the cause of such exits was mended (the fault hunt: the readers' SELECT given back),
    doctor said every check was ok while analysis and the monitor stayed stopped; and "No problem
    found" after a ``decr`` to 0, while /api/health said degraded (round 47). Not health's judgement
    (:class:`supervision.circus.WatcherState`: a watcher short of processes is down there while circus
    restarts them): only what circus will not mend by itself."""
    if live_circusd(circusd_pidfile(settings)) is None:  # nothing to ask: an ask would wait out its second
        return []
    statuses = (ask_circus(settings.circus_endpoint, "status") or {}).get("statuses")
    if not isinstance(statuses, dict):
        return []
    stopped: list[str] = []
    none_asked: list[str] = []
    for name in sorted(n for n in statuses if n != "writer" and not n.startswith("plugin:")):
        asked = processes_asked(settings.circus_endpoint, name)
        if asked is None:  # no answer within its second (circusd held by a start hook): ask no more
            break
        if asked == 0:
            none_asked.append(name)
        if statuses[name] == "stopped":
            stopped.append(name)
    # Warnings, not failures: a worker an operator stopped on purpose (their own feed instead of
    # ticks) is no broken stack, and doctor's exit code is what scripts check.
    out: list[tuple[str, str]] = []
    endpoint = settings.circus_endpoint
    if stopped:
        starts = ", ".join(
            (f"`{circusctl_command(endpoint, 'set', name, 'numprocesses', '1')}` then " if name in none_asked else "")
            + f"`{circusctl_command(endpoint, 'start', name)}`" for name in stopped)
        logs = ", ".join(f"log/{name}.log" for name in stopped)
        out.append(("warn", f"circus runs no process of {', '.join(stopped)}: stopped by circus after their "
                            f"processes kept exiting ({logs} in the home {'says' if len(stopped) == 1 else 'say'} "
                            f"why), or by an operator's stop. Once the cause is mended, start them: {starts}."))
    active_at_zero = [name for name in none_asked if name not in stopped]
    if active_at_zero:
        # `set`, not `incr`: a singleton (ticks) refuses incr.
        sets = ", ".join(f"`{circusctl_command(endpoint, 'set', name, 'numprocesses', '1')}`"
                         for name in active_at_zero)
        out.append(("warn", f"circus was asked for 0 processes of {', '.join(active_at_zero)} (a decr to 0, or a "
                            "set of numprocesses 0), so it runs none: /api/health says degraded. To run one again: "
                            f"{sets}."))
    return out


#: What starts the stack where no circusd runs (``circusctl`` cannot, and ``make run`` refuses beside one).
MAKE_RUN = "`make run`"


def writer_restart_command(settings: Settings, writer_runs: bool | None = None) -> str:
    """How to start this home's writer again once what stopped it is mended: `circusctl start writer`
    when circusd runs (circus's flapping plugin may have stopped it; a start of a running writer
    is refused, so `restart` then), else :data:`MAKE_RUN`. ``writer_runs``: whether a writer runs,
    when the caller knows (a client that found its lock free: False); else circus is asked."""
    if live_circusd(circusd_pidfile(settings)) is None:
        return MAKE_RUN
    if writer_runs is None:
        statuses = (ask_circus(settings.circus_endpoint, "status") or {}).get("statuses") or {}
        writer_runs = statuses.get("writer") == "active"
    return f"`{circusctl_command(settings.circus_endpoint, 'restart' if writer_runs else 'start', 'writer')}`"


def new_database_url_words(settings: Settings, fix: str) -> str:
    """What a refused login's ``fix`` (:func:`db.server_wait.login_refused`) takes when it may be a new
    ``DATABASE_URL`` and circusd runs, as words to add after the restart of the writer; else "" (no
    such fix; no circusd: `make run`, which starts it, reads the new one). circusd gives its watchers
    the environment it was started with: a writer restarted by circusctl logged in with the old URL
    again, and was told the same fix again (fault hunt: the owner's password changed while it ran)."""
    if "DATABASE_URL" not in fix or live_circusd(circusd_pidfile(settings)) is None:
        return ""
    return (f"; after a change of DATABASE_URL, `{circusctl_command(settings.circus_endpoint, 'quit')}`, then "
            "`make run` with the new one (circusd gives the writer the DATABASE_URL it was started with)")


def writer_start_after_fix(settings: Settings, fix: str, writer_runs: bool | None = None) -> str:
    """:func:`writer_restart_command`, and what a new DATABASE_URL takes (:func:`new_database_url_words`)."""
    return writer_restart_command(settings, writer_runs) + new_database_url_words(settings, fix)
