"""gunicorn serving the API as ``circus.ini`` runs it, for ``python -m bench api``."""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.api.data import GUNICORN_READY_TIMEOUT, GUNICORN_STOP_TIMEOUT
from bench.common import error_key
from testkit.env import BIN, ROOT
from testkit.process import Descendants, stop_process


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


def _get_json(port: int, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, body[:300]


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
            status, last = _get_json(gun.port, "/api/health")
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
def running_gunicorn(env: dict[str, str], workers: int, log_path: Path) -> Iterator[Gunicorn]:
    """gunicorn as in ``circus.ini``, on a socket bound here (127.0.0.1, a free
    port) and passed as ``fd://``; stopped with SIGTERM, then SIGKILL, on exit."""
    gunicorn = BIN / "gunicorn"
    if not gunicorn.exists():
        raise RuntimeError(f"{gunicorn} does not exist: install gunicorn in the venv")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    cmd = [str(gunicorn), "--bind", f"fd://{sock.fileno()}", "--workers", str(workers), "--graceful-timeout", "10",
           "--no-control-socket", "--access-logfile", "-", "webapp:create_app('api')"]
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, pass_fds=(sock.fileno(),), stdout=log,
                                    stderr=subprocess.STDOUT)
    finally:
        sock.close()  # gunicorn holds its own copy
    gun = Gunicorn(proc=proc, port=port, log_path=log_path, workers=workers, extra={"cmd": cmd[1:]})
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
