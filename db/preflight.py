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

It also tells a live circusd from a stale pid file (:func:`live_circusd`): circus's own check,
``os.kill(pid, 0)``, is true for a zombie and for any process that got the pid later.

In :mod:`db` (not :mod:`supervision`) because ``python -m db prepare`` needs it, and it needs
nothing from circus.
"""
from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from db.config import Settings
from db.lock import read_lock_holder

#: Seconds a process's start time may pass its pid file's mtime and still be the circusd that wrote
#: it (the two clocks are read differently: psutil derives start times from the boot time).
CLOCK_SLACK = 2.0
#: What a tickstack process started by circus looks like on its command line.
OUR_COMMANDS = ("-m workers.", "webapp:create_app", "from circus import")


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
    """A process in the way of a new start, and why (``pid`` None: a port whose holder we may not see)."""

    pid: int | None
    cmdline: str
    reasons: list[str] = field(default_factory=list)

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

    def add(pid: int | None, reason: str) -> None:
        if pid not in found:
            found[pid] = Blocker(pid, _cmdline(pid))
        found[pid].reasons.append(reason)

    holder = read_lock_holder(settings.writer_lock_path)
    if holder is not None:
        add(holder, f"holds the writer lock {settings.writer_lock_path}")
    for pid in orphans(settings.home) if leftovers else []:
        add(pid, "left running by a circusd that is gone")
    ports = [("TCP", settings.api_port, "API"), ("TCP", settings.console_port, "console")] if tcp_ports else []
    if udp_port:
        ports.append(("UDP", settings.watchdog_port, "watchdog"))
    for kind, port, what in ports:
        if port_taken(port, kind):
            holders = port_holders(port, kind) or [None]
            for pid in holders:
                add(pid, f"holds 127.0.0.1:{port}/{kind}, the {what}'s port")
    return list(found.values())


def refusal(settings: Settings, found: list[Blocker]) -> str:
    """The message that names every blocker and says what to do."""
    lines = [f"refusing to start tickstack in {settings.home}: it is not alone there"]
    lines += [f"  - {b}" for b in found]
    pids = " ".join(str(b.pid) for b in found if b.pid is not None)
    lines.append(f"stop them first (`kill {pids}` asks them to finish gracefully), or choose other ports/home"
                 if pids else "free those ports first, or choose other ports (TICKSTACK_*_PORT)")
    return "\n".join(lines)


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
