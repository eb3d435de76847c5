"""Before a stack starts in a ``TICKSTACK_HOME``: nothing of an earlier start may still run there.

A circusd killed with SIGKILL leaves its children behind (they now stop by themselves: see
:mod:`supervision.lifeline`, but one may be hung, or come from an older version). A new stack beside
them would run a second set of workers against the old writer while its own writer fails on the
lock, and its web servers would not get their ports. So ``python -m db prepare`` (``make run``) and
the writer's ``before_start`` hook in circusd (a plain ``circusd circus.ini``) ask
:func:`blockers` first and refuse, naming the pids, when anything is in the way:

* a process holding the writer lock;
* an *orphan*: a tickstack process of this home that circus started (circus makes every child the
  leader of a session of its own, which a process started from a shell is not) whose circusd is
  gone;
* a process holding the API's or the console's TCP port, or the watchdog's UDP port.

Each is named by the process to act on: a socket's owner is its farthest holder up the process tree
(circusd made the web ports' sockets; its gunicorn masters and their workers hold copies), and a
process a live circusd runs is named by that circusd, with the circusctl command that stops it
(killing one of its processes would only have it started again); a circusd of this home whose
control socket is gone, which circusctl cannot reach, with its ``kill`` (:func:`db.circusd.unreachable`).

:func:`check_socket_paths` checks every Unix socket path the stack binds; :mod:`db.circusd` knows
circusd itself (its pid file, its endpoint, the circusctl commands we print).

In :mod:`db` (not :mod:`supervision`) because ``python -m db prepare`` needs it, and it needs
nothing from circus.
"""
from __future__ import annotations

import configparser
import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from db.circusd import (
    is_circusd,
    live_circusd,
    quit_command,
    running_circusd,
    unreachable,
)
from db.config import CHECKOUT, SETTINGS, Settings, search_path
from db.errors import server_trouble
from db.lock import read_lock_holder
from db.parsers import check_ipc_path

#: What a tickstack process started by circus looks like on its command line.
OUR_COMMANDS = ("-m workers.", "webapp:create_app", "from circus import")
#: The checkout's circus.ini (``make run``'s): its ipc:// endpoints are sockets too.
CIRCUS_INI = CHECKOUT / "circus.ini"


def socket_paths(settings: Settings, ini: Path = CIRCUS_INI) -> list[tuple[str, str]]:
    """Every Unix socket path the stack binds, as (what, path): every ipc:// endpoint of ``ini``
    under ``$TICKSTACK_HOME``, circus's own as the settings name them, and the writer's (an ipc://
    ``WRITER_ENDPOINT``)."""
    found = [(f"{ini.name}'s {m[1]}", f"ipc://{settings.home}{m[2]}") for m in re.finditer(
        r"^\s*(\w+)\s*=\s*ipc://\$\(circus\.env\.TICKSTACK_HOME\)(\S*)",
        ini.read_text() if ini.exists() else "", re.MULTILINE)]
    found += [("circus's endpoint", settings.circus_endpoint), ("circus's pubsub_endpoint",
              settings.circus_pubsub_endpoint), ("circus's stats_endpoint", settings.circus_stats_endpoint),
              ("WRITER_ENDPOINT", settings.writer_endpoint)]
    paths: dict[str, str] = {}
    for what, endpoint in found:
        if endpoint.startswith("ipc://"):
            paths.setdefault(endpoint[len("ipc://"):], what)
    return [(what, path) for path, what in paths.items()]


def check_socket_paths(settings: Settings, ini: Path = CIRCUS_INI) -> None:
    """A :class:`ConfigError` naming the longest socket path of :func:`socket_paths` when it does not
    fit a Unix socket (:func:`db.parsers.check_ipc_path`'s rule): circusd could not bind it."""
    what, path = max(socket_paths(settings, ini), key=lambda found: len(os.fsencode(found[1])))
    check_ipc_path(path, what)


#: What circus.ini runs by bare name: circusd's watchers find them on its PATH (``copy_env``).
BARE_COMMANDS = ("python", "gunicorn")
#: Some of what those commands import, which a Python of another installation lacks.
_OUR_PACKAGES = "import circus, flask, gunicorn, msgpack, psutil, sqlalchemy, zmq"


def foreign_commands() -> str | None:
    """Why circus.ini's bare ``python`` and ``gunicorn`` would not run tickstack, in one line; None
    when they would. ``.venv/bin/circusd circus.ini`` typed without the venv activated ran every
    watcher with the system's Python, which crash-looped on an import error until the flapping
    plugin gave up. A command in this interpreter's own folder is ours; one elsewhere (a system
    whose Python has our packages) is asked whether it imports them; a wrapper whose ``#!`` line
    names no Python (a pyenv shim, pip's ``/bin/sh`` launcher) is not refused: it cannot be told."""
    path = search_path()
    ours = os.path.dirname(sys.executable)
    problems = []
    asked: dict[str, bool] = {}  # interpreter -> imports ours: gunicorn's is usually the python found
    for name in BARE_COMMANDS:
        found = shutil.which(name, path=path)
        if found is None:
            problems.append(f"`{name}` is not on PATH")
            continue
        if _same_folder(os.path.dirname(found), ours):
            continue
        interpreter = found if name == "python" else _interpreter(found, path)
        key = str(interpreter)  # as named, not resolved: a venv's python links to its base, which differs
        if key not in asked:
            asked[key] = _imports_ours(interpreter)
        if not asked[key]:
            problems.append(f"`{name}` on PATH is {found}, which lacks tickstack's packages")
    if not problems:
        return None
    activate = _activate()
    fix = f"the venv activated (`source {activate}`)" if activate else f"{ours} first on PATH"
    return (f"{'; '.join(problems)}: circus.ini runs `python` and `gunicorn` from PATH, so run circusd with "
            f"{fix}, or `make run`")


#: A circus.ini command's use of one of circus's sockets, and a value taken from circusd's environment.
_SOCKET_USE = re.compile(r"\$\(circus\.sockets\.(\w+)\)")
_ENV_USE = re.compile(r"\$\(circus\.env\.(\w+)\)")


def unmade_sockets(made: Collection[str], commands: Iterable[str], ini: Path = CIRCUS_INI) -> str | None:
    """Why circus made none of the sockets that ``commands`` (its watchers') name, in one line; None
    when it made each. circus.ini gives a ``[socket:NAME]`` its port from circusd's environment
    (``$(circus.env.TICKSTACK_API_PORT)``), which circus leaves as written when it is not set there:
    it logged a traceback, went on without the socket, and the API and the console crash-looped until
    the flapping plugin stopped them, circusd running on (a plain ``circusd circus.ini`` with
    ``TICKSTACK_HOME`` exported but not the ports: a new user's run-through). A set value that would
    not do fails the settings before this is asked, so here it is unset. A socket whose port is not
    from the environment (written out, or no such section) is said as such, with where circus's reason is."""
    unmade = sorted({name for command in commands for name in _SOCKET_USE.findall(command)} - set(made))
    if not unmade:
        return None
    sections = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        sections.read_string(ini.read_text())
    except (OSError, configparser.Error):
        sections.clear()
    names = dict.fromkeys(variable for name in unmade if sections.has_section(f"socket:{name}")
                          for value in sections[f"socket:{name}"].values() for variable in _ENV_USE.findall(value))
    if not names:  # a port written out (a typo), or no such section: not the environment's doing
        return (f"circus made no socket {', '.join(unmade)}: {ini} gives {'it' if len(unmade) == 1 else 'them'} no "
                "port from circusd's environment (a [socket:NAME] with its port written out, or no such section); "
                "circus's reason is its traceback in log/circusd.log (the home's)")
    defaults = {setting.env: setting.shown_default for setting in SETTINGS}
    export = " ".join(f"{name}={defaults.get(name, '...')}" for name in names)
    activate = _activate()
    activated = f", or `source {activate}`, which exports them," if activate else ","
    return (f"circus made no socket {', '.join(unmade)}: {ini.name} takes {', '.join(names)} from circusd's "
            f"environment, where {'it is' if len(names) == 1 else 'they are'} not set (circus then leaves "
            f"`$(circus.env.NAME)` as written); `export {export}` (make run's defaults){activated} then start "
            "circusd again, or `make run`")


def _activate() -> str | None:
    """This interpreter's venv's ``activate`` (it exports make run's defaults), None without one."""
    activate = os.path.join(os.path.dirname(sys.executable), "activate")
    return activate if os.path.exists(activate) else None


def _same_folder(a: str, b: str) -> bool:
    """The same folder, named alike or through symbolic links (a venv reached through one)."""
    return os.path.abspath(a) == os.path.abspath(b) or os.path.realpath(a) == os.path.realpath(b)


def _interpreter(script: str, path: str) -> str | None:
    """The Python a script's ``#!`` line names (through ``/usr/bin/env [-S] NAME`` too); ``""`` when
    it names something else (a shell: a wrapper, whose Python cannot be told)."""
    try:
        with open(script, "rb") as f:
            line = f.readline(4096).decode("utf-8", "replace")
    except OSError:
        return None
    words = line[2:].split() if line.startswith("#!") else []
    if words and os.path.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        program = shutil.which(words[0], path=path) if words else None
    else:
        program = words[0] if words else None
    if program is None:
        return None
    return program if os.path.basename(program).startswith("python") else ""


def _imports_ours(interpreter: str | None) -> bool:
    """Whether ``interpreter`` imports our packages; True for ``""`` (a wrapper: not refused)."""
    if interpreter == "":
        return True
    if interpreter is None:
        return False
    try:
        return subprocess.run([interpreter, "-c", _OUR_PACKAGES], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def wait_for_orphans(home: Path, seconds: float, left: list[int]) -> list[int]:
    """Wait at most ``seconds`` while this home's :func:`orphans` (``left``, as just found: of a circusd
    that is gone) stop by themselves, as each does when its circusd dies (:mod:`supervision.lifeline`:
    a SIGTERM, then its own graceful stop, the writer's drain the longest); the ones left. Not at all
    while one of them is stopped (SIGSTOP): it acts on nothing until it runs again, and the refusal
    says so."""
    end = time.monotonic() + seconds
    while left and time.monotonic() < end and not any(_stopped(pid) for pid in left):
        time.sleep(0.3)
        left = orphans(home)
    return left


def clear_stale_pidfile(pidfile: Path) -> int | None:
    """Remove circusd's pid file when no live circusd owns it (circus would refuse to start,
    "pid file ... is stale", for a zombie or a reused pid); returns the pid it named."""
    if live_circusd(pidfile) is not None:
        return None
    try:
        text = pidfile.read_text().strip()
        pidfile.unlink()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() else -1


@dataclass
class Blocker:
    """A process in the way of a new start, and why (``pid`` None: a port whose holder we may not see).
    A circusd stands for every process it runs; ``quit`` is the circusctl command that stops a
    tickstack circusd (None for any other process)."""

    pid: int | None
    cmdline: str
    reasons: list[str] = field(default_factory=list)
    quit: str | None = None
    #: A circusd with no ``quit`` (another project's): not ours to stop, so no ``kill`` is offered.
    foreign_circusd: bool = False
    #: Whether it is in this home's way (the writer lock, an orphan), not only on the ports it needs.
    in_home: bool = False
    #: The ports it holds that this stack needs: (setting's variable, port, "TCP" or "UDP").
    ports: list[tuple[str, int, str]] = field(default_factory=list)

    def __str__(self) -> str:
        who = f"pid {self.pid} ({self.cmdline})" if self.pid is not None else "a process we may not inspect"
        return f"{who}: {'; '.join(self.reasons)}"


def blockers(settings: Settings, *, tcp_ports: bool = True, udp_port: bool = True,
             leftovers: bool = True) -> list[Blocker]:
    """Everything in the way of starting a stack in ``settings.home`` (empty: go ahead): the writer
    lock's holder, and with ``leftovers`` the orphans, with ``tcp_ports`` the holders of the API's
    and the console's ports (False when circusd holds them already), with ``udp_port`` the
    watchdog's."""
    found: dict[int | None, Blocker] = {}

    def add(pid: int | None, reason: str, port: tuple[str, int, str] | None = None) -> None:
        circusd = running_circusd(pid) if pid is not None else None
        if circusd is not None and circusd.pid != pid:
            reason = f"{reason} (through its process pid {pid})"
            pid = circusd.pid
        if pid not in found:
            quit = None if circusd is None else quit_command(circusd)
            cut_off = None if circusd is None or quit is not None else unreachable(circusd)
            found[pid] = Blocker(pid, _cmdline(pid), quit=quit,
                                 foreign_circusd=circusd is not None and quit is None and cut_off is None)
            if cut_off is not None:  # ours, out of circusctl's reach: its `kill` is offered below
                found[pid].reasons.append(cut_off)
        found[pid].reasons.append(reason)
        if port is None:
            found[pid].in_home = True
        else:
            found[pid].ports.append(port)

    holder = read_lock_holder(settings.writer_lock_path)
    if holder is not None:
        add(holder, f"holds the writer lock {settings.writer_lock_path}")
    for pid in orphans(settings.home) if leftovers else []:
        add(pid, "left running by a circusd that is gone")
    ports = ([("TCP", settings.api_port, "API", "TICKSTACK_API_PORT"),
              ("TCP", settings.console_port, "console", "TICKSTACK_CONSOLE_PORT")] if tcp_ports else [])
    if udp_port:
        ports.append(("UDP", settings.watchdog_port, "watchdog", "TICKSTACK_WATCHDOG_PORT"))
    for kind, port, what, variable in ports:
        if port_taken(port, kind):
            owners = sorted({socket_owner(pid, port, kind) for pid in port_holders(port, kind)})
            for pid in owners or [None]:
                add(pid, f"holds 127.0.0.1:{port}/{kind}, the {what}'s port ({variable})", (variable, port, kind))
    return list(found.values())


def refusal(settings: Settings, found: list[Blocker]) -> str:
    """The message that names every blocker and says what to do: a tickstack circusd is stopped with
    circusctl's ``quit``, any other process with ``kill`` (SIGTERM: a graceful stop, which another
    circusd takes as its ``quit``); ports held by what is not in this home's way are better left to
    it, so free ones to use instead come first (a new user's run, round 40: another stack of theirs
    held 8000 and 8001, and the only advice was to quit it)."""
    in_home = any(b.in_home for b in found)
    lines = [f"refusing to start tickstack in {settings.home}: "
             + ("it is not alone there" if in_home else "ports it needs are taken")]
    lines += [f"  - {b}" for b in found]
    ways = [f"`{b.quit}` stops that circusd and all it runs" for b in found if b.quit]
    killable = [b.pid for b in found if b.pid is not None and not b.quit and not b.foreign_circusd]
    if killable:
        pids = " ".join(map(str, killable))
        ways.append(f"`kill {pids}` asks {'them' if ' ' in pids else 'it'} to finish gracefully")
        stopped = " ".join(str(pid) for pid in killable if _stopped(pid))
        if stopped:  # SIGSTOP (a debugger, a hang): a SIGTERM waits until it runs again
            one = " " not in stopped
            ways.append(f"{'pid' if one else 'pids'} {stopped} {'is' if one else 'are'} stopped (SIGSTOP): "
                        f"`kill -CONT {stopped}` after lets {'it' if one else 'them'} act on it")
    taken = sorted({port for b in found for port in b.ports})
    other_ports: str | None = None
    free = free_ports_instead(settings, taken)
    if free:
        other_ports = ("give this stack other ports, in every shell that starts or manages it: `export "
                       + " ".join(f"{variable}={port}" for variable, port in free) + "`, then start it again")
    if in_home or other_ports is None:
        stop = f"stop {'them' if len(found) > 1 else 'it'} first ({'; '.join(ways)})" if ways else \
            "free those ports first"
        lines.append(f"{stop}, or {other_ports}" if other_ports else stop)
    else:
        lines.append(f"{other_ports[0].upper()}{other_ports[1:]}" + (f"; or stop what holds them ({'; '.join(ways)})"
                                                                      if ways else ""))
    return "\n".join(lines)


def free_ports_instead(settings: Settings, taken: list[tuple[str, int, str]]) -> list[tuple[str, int]]:
    """For each taken (variable, port, kind), a free port of that kind to use instead: the first
    one up from ``port + 10`` that neither this stack's other ports nor another pick is."""
    used = {settings.api_port, settings.console_port, settings.watchdog_port}
    picks: list[tuple[str, int]] = []
    for variable, port, kind in taken:
        candidate = port + 10
        while candidate <= 65535 and (candidate in used or port_taken(candidate, kind)):
            candidate += 1
        if candidate <= 65535:
            used.add(candidate)
            picks.append((variable, candidate))
    return picks


def _stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def socket_owner(pid: int, port: int, kind: str = "TCP") -> int:
    """The owner of the socket ``pid`` has on ``port``: its farthest holder up from ``pid``, each
    parent holding it too (inherited: circusd made the web ports' sockets, its gunicorn masters and
    their workers hold copies; psutil names one holder per socket, often a worker)."""
    owner = pid
    try:
        for parent in psutil.Process(pid).parents():
            if parent.pid <= 1 or not _holds(parent, port, kind):  # init (a socket-activated service) is no owner
                break
            owner = parent.pid
    except psutil.Error:
        pass
    return owner


def _holds(proc: psutil.Process, port: int, kind: str) -> bool:
    """Whether ``proc`` has a socket bound to ``port`` (listening, for TCP)."""
    try:
        conns = proc.net_connections(kind="tcp" if kind == "TCP" else "udp")
    except psutil.Error:
        return False
    return any(c.laddr and c.laddr.port == port and (kind != "TCP" or c.status == psutil.CONN_LISTEN)
               for c in conns)


def orphans(home: Path) -> list[int]:
    """Pids of tickstack processes of ``home`` that circus started and whose circusd is gone: ours by
    command line and ``TICKSTACK_HOME``, session leaders (circus starts every child with
    ``setsid``; a command run from a shell is not one), and not children of a live circusd. A
    gunicorn worker is left out: its master is named instead."""
    home = home.absolute()
    mine = {os.getpid(), *(p.pid for p in _ancestors())}
    found = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.pid in mine or not any(c in " ".join(cmdline) for c in OUR_COMMANDS):
                continue
            if os.getsid(proc.pid) != proc.pid:
                continue
            env_home = proc.environ().get("TICKSTACK_HOME")
            # circus's helpers (plugins, circusd-stats) name the home's sockets on their command line.
            if not (env_home and Path(env_home).absolute() == home) and f"{home}/run/" not in " ".join(cmdline):
                continue
            parent = psutil.Process(proc.info["ppid"])
            if is_circusd(parent.cmdline()) and parent.status() != psutil.STATUS_ZOMBIE:
                continue
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
        found.append(proc.pid)
    return sorted(found)


def port_taken(port: int, kind: str = "TCP") -> bool:
    """Whether 127.0.0.1:``port`` cannot be bound (as circus binds: ``SO_REUSEADDR``, so a
    connection in TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "TCP" else socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def port_holders(port: int, kind: str = "TCP") -> list[int]:
    """Pids bound to ``port`` (listening, for TCP) that we may see."""
    try:
        conns = psutil.net_connections(kind="tcp" if kind == "TCP" else "udp")
    except (psutil.AccessDenied, PermissionError):
        return []
    return sorted({c.pid for c in conns if c.pid and c.laddr and c.laddr.port == port
                   and (kind != "TCP" or c.status == psutil.CONN_LISTEN)})


def _ancestors() -> list[psutil.Process]:
    try:
        return psutil.Process().parents()
    except psutil.Error:
        return []


def _cmdline(pid: int | None) -> str:
    if pid is None:
        return ""
    try:
        return " ".join(psutil.Process(pid).cmdline())[:200] or "?"
    except psutil.Error:
        return "gone or not ours to inspect"


#: How long ``db prepare`` waits for the server's answer to the owner's login: a server that is down
#: answers at once (no socket, a refused port); one that does not answer at all is not waited for
#: longer, since the writer waits for it anyway.
LOGIN_CHECK_S = 3.0


def owner_login_refused(settings: Settings) -> str | None:
    """On PostgreSQL, before circusd: the one line that says the server refuses ``DATABASE_URL``'s
    login (a wrong password, an unknown role or database) with what to do, or None (SQLite, the
    login works, or the server does not answer now: the writer waits for it, as at any start). A
    refused login was found only by the writer, which exited, was restarted, and was stopped by circus
    after 3 retries, with "cannot reach the database server" in its log (a new user's run)."""
    if settings.database_path is not None:
        return None
    from db.server import connect, scrub
    from db.server_wait import clear_refused, login_refused, login_user, refused_file

    try:
        conn = connect(settings.database_url, "prepare", settings.host, timeout=LOGIN_CHECK_S, read_only=False)
    except Exception as e:
        reason = scrub(" ".join(str(e).split()), settings.database_url)
        if server_trouble(reason) != "refuses the login":
            return None
        what, fix = login_refused(reason, "DATABASE_URL", login_user(settings.database_url, reason))
        return f"python -m db prepare: {what} ({reason}): {fix}, then run `make run` again"
    conn.close()
    clear_refused(refused_file(settings.run_dir), only_logins=True)  # an earlier writer's refused login is over
    return None
