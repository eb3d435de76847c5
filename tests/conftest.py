"""Fixtures that start real processes in a private runtime folder.

Every test gets its own short ``TICKSTACK_HOME`` (Unix socket paths are
limited to 107 bytes, so not pytest's deep tmp_path) and stops what it
started by pid.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from db.config import Settings, load_settings  # noqa: E402
from workers.writer import spawn  # noqa: E402


@dataclass
class Stack:
    """A runtime folder with its environment, and the processes started in it."""

    home: Path
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return load_settings(self.env)

    def start_writer(self, **extra_env: str) -> subprocess.Popen:
        env = {**self.env, **extra_env}
        log = open(self.home / "log" / "writer-test.log", "ab")  # noqa: SIM115 - closed with the process
        proc = spawn(env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        self.procs.append(proc)
        return proc

    def writer_log(self) -> str:
        path = self.home / "log" / "writer-test.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


@pytest.fixture
def stack() -> Iterator[Stack]:
    home = Path(tempfile.mkdtemp(prefix="ts-"))
    for sub in ("run", "log", "spool", "backups"):
        (home / sub).mkdir(mode=0o700)
    env = {**os.environ, "TICKSTACK_HOME": str(home), "PYTHONPATH": str(ROOT)}
    for key in [k for k in env if k.startswith(("TICKSTACK_", "WRITER_")) and k != "TICKSTACK_HOME"]:
        del env[key]
    env.pop("DATABASE_URL", None)
    st = Stack(home, env)
    try:
        yield st
    finally:
        for proc in st.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def writer(stack: Stack) -> Iterator[Stack]:
    """A running writer in a fresh runtime folder."""
    stack.start_writer()
    yield stack
