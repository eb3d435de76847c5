"""gunicorn serving the API as ``circus.ini`` runs it, for ``python -m bench api``: the command
line of circus.ini's ``api`` watcher, its socket bound here, and any worker class to compare."""
from __future__ import annotations

import http.client
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.api.data import GUNICORN_READY_TIMEOUT, GUNICORN_STOP_TIMEOUT, WORKER_NAMES
from bench.common import error_key
from testkit.env import BIN, ROOT
from testkit.gunicorn import get_json, watcher_command
from testkit.process import Descendants, stop_process


def _without(args: list[str], options: set[str]) -> list[str]:
    """``args`` without the ``options`` given and their values (``--threads 8``)."""
    out: list[str] = []
    rest = iter(args)
    for arg in rest:
        if arg in options:
            next(rest, None)
        else:
            out.append(arg)
    return out


@dataclass(frozen=True)
class WorkerSpec:
    """A worker class to serve with: ``circus`` (as circus.ini), or ``NAME[:THREADS]`` with NAME
    one of :data:`~bench.api.data.WORKER_NAMES` (``sync``, ``gthread:8``, ``headers-first:8``, ...)."""

    label: str
    worker_class: str | None = None
    threads: int | None = None

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        name, _, threads = text.strip().partition(":")
        if name == "circus" and not threads:
            return cls("circus.ini")
        if name not in WORKER_NAMES:
            raise ValueError(f"{name!r} is not a worker class: give circus, or one of {', '.join(WORKER_NAMES)} "
                             "with :THREADS if you like (gthread:8)")
        if threads and not (threads.isdigit() and 1 <= int(threads) <= 256):
            raise ValueError(f"{text!r}: threads must be a whole number 1..256")
        if name == "sync" and threads not in ("", "1"):
            raise ValueError("sync serves one request at a time: no threads (gunicorn would switch to gthread)")
        return cls(text.strip(), WORKER_NAMES[name], int(threads) if threads else (1 if name == "sync" else None))

    def command(self, base: list[str], workers: int) -> list[str]:
        """``base`` (circus.ini's command line, the app last) with this worker class and ``workers``."""
        replaced = {"--workers", "-w"} | ({"--worker-class", "-k", "--threads"} if self.worker_class else set())
        extra = ["--workers", str(workers)]
        if self.worker_class:
            extra += ["--worker-class", self.worker_class]
            if self.threads is not None:
                extra += ["--threads", str(self.threads)]
        return [*_without(base[:-1], replaced), *extra, base[-1]]


@dataclass
class Gunicorn:
    """A running gunicorn master serving the API on ``port``."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    workers: int
    extra: dict[str, Any] = field(default_factory=dict)

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.worker_processes()]

    def worker_processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of gunicorn's own log (access log lines left out)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join([line for line in text if '"GET /' not in line and '"POST /' not in line][-lines:])


def _wait_ready(gun: Gunicorn, timeout: float) -> None:
    """Until ``/api/health`` answers 200, then until every worker has finished
    loading the app (its CPU time stops growing: the app is loaded after the
    fork, in each worker)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        if gun.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with code {gun.proc.returncode} before it was ready:\n"
                               f"{gun.log_tail()}")
        try:
            status, last = get_json(gun.port, "/api/health")
            if status == 200:
                gun.extra["health"] = last
                break
        except (OSError, http.client.HTTPException) as e:
            last = error_key(e)
        if time.monotonic() > deadline:
            raise RuntimeError(f"gunicorn: /api/health did not answer 200 within {timeout} s; last: {last}\n"
                               f"{gun.log_tail()}")
        time.sleep(0.2)
    quiet_for: dict[int, float] = {}
    cpu: dict[int, float] = {}
    while time.monotonic() < deadline:
        pids = gun.worker_pids()
        now = time.monotonic()
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            used = t.user + t.system
            if cpu.get(pid) != used:
                cpu[pid], quiet_for[pid] = used, now
        if len(pids) >= gun.workers and all(now - quiet_for.get(p, now) >= 0.5 for p in pids):
            return
        time.sleep(0.1)
    gun.extra["ready_note"] = "workers still busy after the ready timeout; measured anyway"


@contextmanager
def running_gunicorn(env: dict[str, str], workers: int, log_path: Path,
                     spec: WorkerSpec = WorkerSpec("circus.ini")) -> Iterator[Gunicorn]:
    """gunicorn as in ``circus.ini`` (with ``spec``'s worker class), on a socket bound here
    (127.0.0.1, a free port) and passed as ``fd://``; stopped with SIGTERM, then SIGKILL, on exit."""
    gunicorn = BIN / "gunicorn"
    if not gunicorn.exists():
        raise RuntimeError(f"{gunicorn} does not exist: install gunicorn in the venv")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    cmd = spec.command(watcher_command("api", env, sock.fileno()), workers)
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, pass_fds=(sock.fileno(),), stdout=log,
                                    stderr=subprocess.STDOUT)
    finally:
        sock.close()  # gunicorn holds its own copy
    gun = Gunicorn(proc=proc, port=port, log_path=log_path, workers=workers, extra={"cmd": cmd[1:],
                                                                                   "server": spec.label})
    workers_seen = Descendants(proc.pid)
    try:
        _wait_ready(gun, GUNICORN_READY_TIMEOUT)
        workers_seen.remember(recursive=False)
        yield gun
    finally:
        workers_seen.remember(recursive=False)
        if stop_process(proc, GUNICORN_STOP_TIMEOUT):
            gun.extra["killed"] = True
        # Only gunicorn's own workers, by pid, if any outlived their master.
        killed = workers_seen.kill_survivors()
        if killed:
            gun.extra["workers_killed"] = killed
        gun.extra["exit_code"] = proc.returncode
