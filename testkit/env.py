"""The one isolated environment for a private stack.

A test or benchmark must never touch the user's database, writer or ports,
so everything that could point at them is dropped from the inherited
environment and ``TICKSTACK_HOME`` is set to a new folder of its own.
"""
from __future__ import annotations

import fcntl
import functools
import os
import random
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from db import slowreads
from db.config import ensure_home, load_settings

#: The checkout: the working folder of every process the harness starts.
ROOT = Path(__file__).resolve().parent.parent
#: The venv's scripts (``circusd``, ``circusctl``, ``gunicorn``), found beside the running python.
BIN = Path(sys.executable).parent

#: Inherited variables dropped from every private environment: every tickstack
#: setting, and the two that name a database or a writer directly.
UNSAFE_PREFIXES = ("TICKSTACK_", "WRITER_", "DATABASE_")

#: Given a private home, the ``DATABASE_*`` variables of a server database of its own; None (the
#: default): SQLite, in the home. Set for a whole run by :func:`use_database`.
_database_for_home: Callable[[Path], dict[str, str]] | None = None


def use_database(provider: Callable[[Path], dict[str, str]] | None) -> None:
    """From now on every :func:`isolated_env` points its stack at ``provider(home)``'s database
    (e.g. :class:`testkit.postgres.HomeDatabases`: ``pytest --database postgresql``); None goes
    back to SQLite."""
    global _database_for_home
    _database_for_home = provider


#: One lock file per port handed out, held by the process that took it for as long as it lives:
#: the two pytest runs of ``make test`` (and a benchmark beside them) each ask the kernel for a
#: free port, and may be given the same one between one's asking and its server's binding it.
_PORTS_DIR = Path(tempfile.gettempdir()) / f"tickstack-ports-{os.getuid()}"
#: (protocol, port) -> the open lock file that claims it for this process.
_claimed: dict[tuple[str, int], int] = {}


def _claim(protocol: str, port: int) -> bool:
    """Claim ``port`` among every process of ours on this machine; False if another (or this one,
    earlier) has it."""
    if (protocol, port) in _claimed:
        return False
    if not _claimed:  # the first claim of this process: the folder, checked once
        _PORTS_DIR.mkdir(mode=0o700, exist_ok=True)
        found = _PORTS_DIR.lstat()  # a predictable name: another user may have made it first
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or stat.S_IMODE(found.st_mode) & 0o077:
            raise RuntimeError(f"{_PORTS_DIR} is not a private folder of this user (mode 0700): remove it and "
                               "run again")
    fd = os.open(_PORTS_DIR / f"{protocol}-{port}", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _claimed[(protocol, port)] = fd
    return True


#: Ports are drawn from here up to the start of the kernel's ephemeral range (or above its end).
FIRST_PORT = 10_000
#: The fewest ports a stretch outside the ephemeral range must hold to be drawn from.
MIN_STRETCH = 1000
_random = random.SystemRandom()  # not the module's generator, which a test may seed


@functools.cache
def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range, first and last (``ip_local_port_range``, read once per process;
    Linux's default if it cannot be read)."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def port_stretch(low: int, high: int) -> tuple[int, int] | None:
    """Where free ports are drawn from, [start, stop), given the ephemeral range [low, high]: outside
    it, since the kernel draws every outgoing connection's source port from it and would give one to
    a client while a port handed out here waits for its server to bind it. Below it, else above it;
    None when neither holds :data:`MIN_STRETCH` ports (then the kernel's own pick)."""
    if low - FIRST_PORT >= MIN_STRETCH:
        return FIRST_PORT, low
    above = max(high + 1, FIRST_PORT)
    if 65536 - above >= MIN_STRETCH:
        return above, 65536
    return None


def _candidates(kind: socket.SocketKind) -> Iterator[int]:
    stretch = port_stretch(*ephemeral_range())
    for _ in range(200):
        if stretch is not None:
            yield _random.randrange(*stretch)
            continue
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            yield s.getsockname()[1]


def _bindable(kind: socket.SocketKind, port: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:  # in use (or in TIME_WAIT): another one
            return False
    return True


def _free(protocol: str, kind: socket.SocketKind) -> int:
    for port in _candidates(kind):
        if _bindable(kind, port) and _claim(protocol, port):
            return port
    raise RuntimeError(f"no free {protocol.upper()} port on 127.0.0.1 after 200 tries")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that no other process of
    ours (another test run) has been given."""
    return _free("tcp", socket.SOCK_STREAM)


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing is bound to right now (the watchdog's), and that no
    other process of ours has been given."""
    return _free("udp", socket.SOCK_DGRAM)


def remove_home(home: Path) -> None:
    """Remove a test's home, this process's record of slow reads under it first: a read this process
    made there (an in-process console's, its doctor's) is written by a timer up to 3 s later, which
    made ``run/slow-reads`` again inside the home being removed, and left it behind."""
    slowreads.forget(home / "run")
    shutil.rmtree(home, ignore_errors=True)


def new_home(prefix: str = "ts-") -> Path:
    """A new, empty runtime folder with its subfolders (mode 0700). Short, in
    the system's temporary folder: the ipc sockets live in it, and their paths
    are limited to 107 bytes (pytest's ``tmp_path`` is too deep)."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        ensure_home(load_settings({"TICKSTACK_HOME": str(home)}))
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise
    return home


def isolated_env(home: Path, *, ports: bool = False) -> dict[str, str]:
    """The environment of a private stack in ``home``: ``os.environ`` without
    any inherited ``TICKSTACK_*``, ``WRITER_*`` or ``DATABASE_*`` variable,
    with ``TICKSTACK_HOME`` set, the checkout first on ``PYTHONPATH`` (so
    ``python -m workers.writer`` finds the project from any folder) and the
    venv's scripts first on ``PATH`` (``circus.ini`` runs ``python`` and
    ``gunicorn`` by name). With ``ports``, free 127.0.0.1 ports for the API
    and the console too, and for the watchdog's heartbeats (UDP). When a run uses a server
    (:func:`use_database`), the home's own database on it (``DATABASE_URL``, ``DATABASE_READ_URL``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(UNSAFE_PREFIXES)}
    env["TICKSTACK_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join(p for p in (str(BIN), env.get("PATH", "")) if p)
    if _database_for_home is not None:
        env.update(_database_for_home(home))
    if ports:
        env["TICKSTACK_API_PORT"] = str(free_port())
        env["TICKSTACK_CONSOLE_PORT"] = str(free_port())
        env["TICKSTACK_WATCHDOG_PORT"] = str(free_udp_port())
    return env
