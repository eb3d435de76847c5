"""circusd in a private runtime folder: :class:`Circusd` runs any circus
ini file; :class:`CircusStack` runs the real ``circus.ini`` (the whole
stack) on free ports. Both stop circusd, and only what it started, by pid."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from circus.client import CircusClient

from db.config import Settings, load_settings
from supervision.circus import STACK_WATCHERS as WATCHERS  # the stack's watchers: one list
from supervision.circus import retry_while_busy
from testkit.env import BIN, ROOT, isolated_env, new_home, remove_home
from testkit.helpers import pauses
from testkit.process import Descendants, stop_process


class Circusd:
    """``circusd INI`` with ``env``; its control endpoint is
    ``$TICKSTACK_HOME/run/circus.sock``, as in ``circus.ini`` and the settings."""

    def __init__(self, env: dict[str, str], ini: str | Path, *, cwd: Path = ROOT, log_path: Path | None = None,
                 call_timeout: float = 30) -> None:
        self.env = env
        self.ini = ini
        self.cwd = cwd
        self.log_path = log_path
        self.call_timeout = call_timeout
        # From TICKSTACK_HOME alone (as circus.ini does): a test may give circusd settings that do not load.
        self.endpoint = f"ipc://{Path(env['TICKSTACK_HOME']) / 'run' / 'circus.sock'}"
        self.proc: subprocess.Popen | None = None
        #: The wall clock just before circusd was started (what a process's start time must not precede).
        self.started_at: float | None = None
        #: Every process circusd started (a pid alone may be reused: see :class:`Descendants`).
        self.children: Descendants | None = None

    @property
    def settings(self) -> Settings:
        return load_settings(self.env)

    def start(self, wait_active: tuple[str, ...], timeout: float = 90, poll: float = 0.3) -> None:
        """Start circusd and return once every watcher in ``wait_active`` is active."""
        self.started_at = time.time()
        if self.log_path is None:
            self.proc = subprocess.Popen([str(BIN / "circusd"), str(self.ini)], env=self.env, cwd=self.cwd,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([str(BIN / "circusd"), str(self.ini)], env=self.env, cwd=self.cwd,
                                             stdout=log, stderr=subprocess.STDOUT)
        self.children = Descendants(self.proc.pid)
        deadline = time.monotonic() + timeout
        for pause in pauses(poll):
            assert self.proc.poll() is None, f"circusd exited with {self.proc.returncode}: {self.circusd_log()}"
            try:
                statuses = self.status()
                if all(statuses.get(w) == "active" for w in wait_active):
                    break
            except Exception:  # not listening yet
                pass
            assert time.monotonic() < deadline, f"watchers not active: {self.status()}"
            time.sleep(pause)
        self.children.remember()

    def circusd_log(self) -> str:
        """circusd's own output (empty when it went to /dev/null)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def call(self, command: str, **props: Any) -> dict:
        """A circus command, retried while circus is busy with another one."""
        client = CircusClient(endpoint=self.endpoint, timeout=self.call_timeout)
        try:
            return retry_while_busy(lambda: client.call({"command": command, "properties": props}), 10.0, 0.2)
        finally:
            client.stop()

    def status(self) -> dict[str, str]:
        return self.call("status")["statuses"]

    def pids_of(self, watcher: str) -> list[int]:
        return self.call("list", name=watcher)["pids"]

    def wait_exit(self, timeout: float = 90) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, quit_timeout: float = 60, term_timeout: float = 30) -> None:
        """Ask circusd to quit (SIGTERM, then SIGKILL if it does not), then
        kill anything it started that outlived it, by pid."""
        if self.children is not None:
            self.children.remember()
        if self.proc is not None and self.proc.poll() is None:
            # No socket file, no answer: a quit asked there waited out the call's whole timeout (30 s,
            # every time a test moved or removed the home under a stack) before the SIGTERM.
            if not Path(self.endpoint.removeprefix("ipc://")).exists():
                stop_process(self.proc, term_timeout)
            else:
                try:
                    self.call("quit")
                    self.proc.wait(quit_timeout)
                except Exception:
                    stop_process(self.proc, term_timeout)
        if self.children is not None:
            self.children.kill_survivors()


class CircusStack(Circusd):
    """The real ``circus.ini`` in a new private runtime folder, on free ports."""

    def __init__(self, **extra_env: str) -> None:
        self.home = new_home()
        env = isolated_env(self.home, ports=True)
        # Tests insert ticks dated 2024: keep retention from racing them.
        env["TICKSTACK_RETENTION_DAYS"] = "36500"
        env.update(extra_env)
        self.api_port, self.console_port = int(env["TICKSTACK_API_PORT"]), int(env["TICKSTACK_CONSOLE_PORT"])
        super().__init__(env, "circus.ini")

    def start(self, wait_active: tuple[str, ...] = WATCHERS, timeout: float = 90, poll: float = 0.3) -> None:
        """``python -m db prepare`` (as ``make run`` does), then circusd."""
        subprocess.run([sys.executable, "-m", "db", "prepare"], env=self.env, cwd=ROOT, check=True,
                       capture_output=True)
        super().start(wait_active, timeout, poll)

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

    def circusd_log(self) -> str:
        """circusd's log file (``logoutput`` in circus.ini)."""
        return self.log("circusd")

    def close(self) -> None:
        """Stop circusd and anything it started, by pid, and remove the folder."""
        self.stop()
        remove_home(self.home)
