"""A supervised process's two ties to the circusd that started it.

**It never outlives circusd.** circus does not stop its children when it dies by SIGKILL: they go
on under pid 1 holding the writer lock and the ports, and the next start runs a second stack
beside them. Importing this module in a process whose parent is circusd asks the kernel for SIGTERM
the moment that parent dies (``prctl(PR_SET_PDEATHSIG)``): no thread, no polling, delivered however
circusd died and while the process is blocked in a call. SIGTERM is the graceful stop every
tickstack process handles (the writer drains and checkpoints, workers flush, gunicorn finishes its
requests); before a process installed its handler it simply ends, having nothing to flush yet.
Processes of ours import this module first thing (``workers/__init__.py``, the gunicorn config, the
circus plugins); one whose circusd died even before that is *orphaned at birth*
(:func:`orphaned_at_birth`) and stops at :meth:`Lifeline.attach`. prctl(2)'s caveat (the signal
follows the death of the parent *thread* that forked us) holds for circusd, which forks from its
one event-loop thread; but a SIGKILLed circusd's threads die in any order, so the signal can
come while ``getppid()`` still names circusd (see :meth:`Lifeline._parent_gone`). prctl is
Linux's; elsewhere, :meth:`Lifeline.tend` also compares ``getppid()`` with the parent at birth and
sends the same SIGTERM itself.

**It proves it is alive.** circus sees a process as "active" while it exists, even SIGSTOPped or
stuck. :meth:`Lifeline.tend` sends circus's watchdog (:class:`supervision.plugins.WatchDog`) a
heartbeat (UDP on 127.0.0.1, ``TICKSTACK_WATCHDOG_PORT``, "pid;time", at most once a second). It
must be called from the process's main loop, never from a thread of its own, which would go on
beating while the loop is stuck.

Both apply only to a process whose parent is circusd: a writer a test spawned, or a CSV replay run
from a shell, has nothing to outlive and no watchdog listening.

circusd also wrote the process's stdout and stderr into its log files, through pipes that lead
nowhere once it is gone; given ``log_dir`` and ``log_name``, an orphaned process reopens them on
the files themselves (``<log_name>.log``, ``<log_name>.stdout.log``), so its last words (the
writer's drain and final checkpoint) are kept.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from db.circusd import CLOCK_SLACK, circusd_pidfile, is_circusd, live_circusd
from db.config import ConfigError, load_settings

log = logging.getLogger("tickstack.lifeline")

PR_SET_PDEATHSIG = 1
#: Seconds between two heartbeats (the watchdog's timeouts are many times this).
HEARTBEAT_EVERY = 1.0


def parent_is_circusd(ppid: int) -> bool:
    try:
        return is_circusd(psutil.Process(ppid).cmdline())
    except psutil.Error:
        return False


def _sigterm_when_parent_dies() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): circusd's death is noticed by polling only",
                        ctypes.get_errno())


def orphaned_at_birth() -> int | None:
    """The pid of the circusd that started this process and died before it could notice: this
    process leads a session of its own (circus starts every child so), its home's circusd pid file
    was written before it started, and names no live circusd. None otherwise (a process started
    from a shell, or by a circusd that lives)."""
    if os.getsid(0) != os.getpid():
        return None
    try:
        pidfile = circusd_pidfile(load_settings())
        written, pid = pidfile.stat().st_mtime, int(pidfile.read_text().strip())
        if live_circusd(pidfile) is not None or psutil.Process().create_time() < written - CLOCK_SLACK:
            return None
    except (ConfigError, OSError, ValueError, psutil.Error):
        return None
    return pid


def _birth() -> tuple[int, int, bool]:
    """(pid, circusd's pid, supervised) when this module was first imported."""
    ppid = os.getppid()
    if parent_is_circusd(ppid):
        _sigterm_when_parent_dies()
        return os.getpid(), ppid, True
    dead = orphaned_at_birth()
    return os.getpid(), (ppid if dead is None else dead), dead is not None


BIRTH = _birth()


class Lifeline:
    """See the module docstring. ``watchdog_port`` None: no heartbeats (a gunicorn master, a plugin:
    only the parent-death half)."""

    def __init__(self, watchdog_port: int | None = None, log_dir: Path | None = None,
                 log_name: str | None = None) -> None:
        pid, self.ppid, self.supervised = BIRTH
        if pid != os.getpid():  # forked since (a child of ours): circusd is not its parent
            self.ppid, self.supervised = os.getppid(), False
        self.watchdog_port = watchdog_port
        self.logs = (log_dir / f"{log_name}.log", log_dir / f"{log_name}.stdout.log") if log_dir and log_name else None
        self.orphaned = False
        self._reopened = False
        self._next = 0.0
        self._sock: socket.socket | None = None

    def attach(self) -> Lifeline:
        """Check that circusd is still there (SIGTERM to this process if not); with logs to reopen,
        wrap the SIGTERM handler so that it reopens them first. From the main thread, after the
        process installed its own SIGTERM handler. Returns self."""
        if not self.supervised:
            return self
        if self.logs is not None:
            previous = signal.getsignal(signal.SIGTERM)

            def on_sigterm(signum: int, frame: Any) -> None:
                if self._parent_gone(dying_counts=True):
                    self._orphaned()
                if callable(previous):
                    previous(signum, frame)

            signal.signal(signal.SIGTERM, on_sigterm)
        self._check_parent()
        return self

    def tend(self) -> None:
        """From the main loop, as often as it likes: at most once a second, check the parent and
        send a heartbeat."""
        if not self.supervised:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + HEARTBEAT_EVERY
        if not self._check_parent() and self.watchdog_port is not None:
            self._beat()

    def _parent_gone(self, dying_counts: bool = False) -> bool:
        """Whether circusd is gone. ``dying_counts``: also while it is dying. The parent-death
        SIGTERM can arrive *before* ``getppid()`` changes: the kernel sends it when the thread
        that forked us exits, and when circusd is SIGKILLed its main thread may exit before its
        other threads (ZeroMQ's), so we are first handed to one of those (same pid) and signalled.
        circusd's main thread is then a zombie: that is enough to know."""
        if os.getppid() != self.ppid:
            return True
        if not dying_counts:
            return False
        try:
            return psutil.Process(self.ppid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        except psutil.Error:
            return True

    def _check_parent(self) -> bool:
        """True (and SIGTERM to this process, once) when the parent is no longer circusd."""
        if not self._parent_gone():
            return False
        if not self.orphaned:
            self._orphaned()
            os.kill(os.getpid(), signal.SIGTERM)
        return True

    def _orphaned(self) -> None:
        """Reopen the logs, then say so. The SIGTERM handler calls this too, and may run in the
        middle of it (Python runs handlers between any two bytecodes): the logs are reopened first
        and marked done last, so whichever comes first, every line after it reaches the files."""
        self._reopen_logs()
        if not self.orphaned:
            self.orphaned = True
            log.warning("circusd (pid %d) is gone; stopping so that nothing outlives it", self.ppid)

    def _reopen_logs(self) -> None:
        if self.logs is None or self._reopened:
            return
        for fd, path in zip((2, 1), self.logs, strict=True):
            try:
                out = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError:
                continue
            os.dup2(out, fd)
            os.close(out)
        self._reopened = True

    def _beat(self) -> None:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
            # Its own port on the loopback address: not every address, where a sendto binds it, open to any
            # host; and the watchdog checks whose socket the beats come from (supervision.plugins).
            try:
                self._sock.bind(("127.0.0.1", 0))
            except OSError as e:
                log.debug("heartbeat socket not bound to the loopback address: %s", e)
        try:
            self._sock.sendto(f"{os.getpid()};{time.time():.3f}".encode(), ("127.0.0.1", self.watchdog_port))
        except OSError as e:  # a full buffer or no listener: the next beat tries again
            log.debug("heartbeat not sent: %s", e)
