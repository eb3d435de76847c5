"""Run the real ``circusd circus.ini`` in a private runtime folder, on free
ports, and stop it (and only what it started, by pid) afterwards."""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from circus.client import CircusClient

from db.config import Settings, load_settings
from db.health import connect_read_only

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WATCHERS = ("writer", "api", "console", "ticks", "analysis", "monitor", "jobs")
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CircusStack:
    def __init__(self, **extra_env: str) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="ts-"))
        self.api_port, self.console_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TICKSTACK_", "WRITER_", "DATABASE_"))}
        env.update(TICKSTACK_HOME=str(self.home), TICKSTACK_API_PORT=str(self.api_port),
                   TICKSTACK_CONSOLE_PORT=str(self.console_port), PATH=f"{BIN}:{env.get('PATH', '')}",
                   PYTHONPATH=str(ROOT))
        # Tests insert ticks dated 2024: keep retention from racing them.
        env.setdefault("TICKSTACK_RETENTION_DAYS", "36500")
        env.update(extra_env)
        self.env = env
        self.endpoint = f"ipc://{self.home}/run/circus.sock"
        self.proc: subprocess.Popen | None = None
        #: Every process circusd started, as (pid, create time): a pid alone may be reused.
        self.pids: set[tuple[int, float]] = set()

    @property
    def settings(self) -> Settings:
        return load_settings(self.env)

    def start(self, wait_active: tuple[str, ...] = WATCHERS, timeout: float = 90) -> None:
        subprocess.run([sys.executable, "-m", "db", "prepare"], env=self.env, cwd=ROOT, check=True,
                       capture_output=True)
        self.proc = subprocess.Popen([str(BIN / "circusd"), "circus.ini"], env=self.env, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"circusd exited with {self.proc.returncode}: {self.log('circusd')}"
            try:
                statuses = self.status()
                if all(statuses.get(w) == "active" for w in wait_active):
                    break
            except Exception:  # not listening yet
                pass
            assert time.monotonic() < deadline, f"watchers not active: {self.status()}"
            time.sleep(0.3)
        self._remember_pids()

    def call(self, command: str, **props: Any) -> dict:
        """A circus command, retried while circus is busy with another one."""
        client = CircusClient(endpoint=self.endpoint, timeout=30)
        try:
            for _ in range(50):
                answer = client.call({"command": command, "properties": props})
                if answer.get("status") == "error" and "already running" in answer.get("reason", ""):
                    time.sleep(0.2)
                    continue
                return answer
            return answer
        finally:
            client.stop()

    def status(self) -> dict[str, str]:
        return self.call("status")["statuses"]

    def pids_of(self, watcher: str) -> list[int]:
        return self.call("list", name=watcher)["pids"]

    def circusctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The real circusctl, as a user would run it (again while circusd
        answers that it is busy with another command, as a user would)."""
        for _ in range(20):
            done = subprocess.run([str(BIN / "circusctl"), "--endpoint", self.endpoint, "--timeout", "60", *args],
                                  env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            if "already running" not in done.stdout + done.stderr:
                break
            time.sleep(0.3)
        return done

    def log(self, name: str) -> str:
        path = self.home / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _remember_pids(self) -> None:
        if self.proc is None:
            return
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.pids.add((child.pid, child.create_time()))
        except psutil.NoSuchProcess:
            pass

    def wait_exit(self, timeout: float = 90) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Stop circusd and anything it started, by pid."""
        self._remember_pids()
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.call("quit")
                self.proc.wait(60)
            except Exception:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        for pid, created in self.pids:
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.home, ignore_errors=True)


def query(settings: Settings, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of ``sql`` from the test's database, read-only."""
    con = connect_read_only(settings.database_path)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll ``check`` until it returns something true; an exception counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def write_bar_csv(path: Path, n: int = 60, seed: int = 7) -> list[tuple[int, float, float, float, float, float]]:
    """A 1-minute OHLCV export like pandas writes it: unnamed first column."""
    rng = random.Random(seed)
    price, bars = 100.0, []
    lines = [",Open,High,Low,Close,Volume"]
    for i in range(n):
        ts = T0 + i * 60_000
        o = round(price, 2)
        c = round(max(1.0, o + rng.uniform(-1, 1)), 2)
        h = round(max(o, c) + rng.uniform(0, 0.5), 2)
        low = round(min(o, c) - rng.uniform(0, 0.5), 2)
        v = float(rng.randint(1, 1000))
        price = c
        bars.append((ts, o, h, low, c, v))
        stamp = datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"{stamp},{o},{h},{low},{c},{v}")
    path.write_text("\n".join(lines) + "\n")
    return bars
