"""A writer outside circus: :func:`spawn` starts ``python -m workers.writer``
and returns once it answers, :class:`Stack` is a private runtime folder
with the writer processes a test started in it, and :class:`RawPeer` speaks
to a writer in frames as they are."""
from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from db.config import Settings, load_settings
from testkit.env import ROOT, isolated_env, new_home, remove_home
from testkit.process import stop_process


def spawn(env: dict[str, str], timeout: float = 20.0, **popen: Any) -> subprocess.Popen:
    """Start ``python -m workers.writer`` with ``env`` (in the checkout unless
    ``cwd`` is given) and return once it answers a ping, so the caller's first
    request is not spent waiting for it. Raises RuntimeError (with the
    writer's exit code) if it dies first; a writer that never answers is
    killed, by its pid."""
    from db.client import WriterClient
    from db.errors import WriterUnavailable

    popen.setdefault("cwd", ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "workers.writer"], env=env, **popen)
    try:
        try:
            with WriterClient(settings=load_settings(env), deadline=0.5) as client:
                client.wait_ready(timeout, is_alive=lambda: proc.poll() is None)
        except WriterUnavailable as e:
            code = proc.poll()
            raise RuntimeError(f"writer exited with code {code} before it was ready" if code is not None
                               else f"writer not ready after {timeout} s ({e})") from None
        return proc
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise


def stopped_while_waiting_for_the_lock(env: dict[str, str], *signals: signal.Signals) -> tuple[int, str]:
    """Start a writer with ``env`` while another holds its lock (it waits up to 60 s, saying so), send it
    ``signals`` once it waits, then SIGTERM, as circus stopping it would; its exit code and stderr."""
    from testkit.helpers import wait_for

    waiting = subprocess.Popen([sys.executable, "-m", "workers.writer"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               env={**env, "TICKSTACK_WRITER_LOCK_WAIT": "60"})
    try:
        wait_for("the writer to wait for the lock", lambda: waiting.stderr is not None and "waiting up to 60 s" in
                 waiting.stderr.readline(), timeout=30)
        for sig in (*signals, signal.SIGTERM):
            waiting.send_signal(sig)
        _out, err = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    return waiting.returncode, err


@dataclass
class Stack:
    """A runtime folder with its environment, and the processes started in it."""

    home: Path
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def create(cls) -> Stack:
        """A new private runtime folder (:func:`testkit.env.new_home`) and its environment."""
        home = new_home()
        return cls(home, isolated_env(home))

    @classmethod
    def linked(cls, folder: Path) -> Stack:
        """As :meth:`create`, its database's path a symbolic link to ``ticks.db`` in ``folder`` (made,
        0700): another disk's file, as SQLite follows the link and keeps the WAL beside that file."""
        stack = cls.create()
        folder.mkdir(mode=0o700)
        link = stack.settings.database_path
        assert link is not None, "a symbolic link is an SQLite database's path"
        link.symlink_to(folder / "ticks.db")
        return stack

    @property
    def settings(self) -> Settings:
        return load_settings(self.env)

    def start_writer(self, **extra_env: str) -> subprocess.Popen:
        """A writer with this stack's environment (plus ``extra_env``), logging to ``log/writer-test.log``."""
        env = {**self.env, **extra_env}
        with open(self.home / "log" / "writer-test.log", "ab") as log:
            proc = spawn(env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start_worker(self, module: str, log: Path, *args: str, **extra_env: str) -> subprocess.Popen:
        """``python -m module args`` with this stack's environment (plus ``extra_env``), its output
        appended to ``log``; stopped with the stack."""
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", module, *args], env={**self.env, **extra_env}, cwd=ROOT,
                                    stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def writer_log(self) -> str:
        path = self.home / "log" / "writer-test.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop ``proc`` with ``sig`` (SIGKILL after ``timeout``); returns its exit code."""
        stop_process(proc, timeout, sig)
        return proc.returncode

    def close(self) -> None:
        """Kill whatever is still running (by pid) and remove the folder."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        remove_home(self.home)


class RawPeer:
    """A DEALER socket that sends frames as they are, for requests no client would build."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, payload: bytes) -> None:
        self.sock.send(payload)

    def waiting(self, timeout: float) -> bool:
        """Whether a reply arrives within ``timeout`` seconds."""
        return bool(self.sock.poll(int(max(0.0, timeout) * 1000)))

    def recv(self, timeout: float = 20.0) -> dict[str, Any]:
        assert self.waiting(timeout), f"no reply from the writer within {timeout} s"
        return msgpack.unpackb(self.sock.recv(), strict_map_key=False)

    def ask(self, payload: bytes, timeout: float = 20.0) -> dict[str, Any]:
        self.send(payload)
        return self.recv(timeout)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@contextmanager
def stacks_on_one_database(urls_of: Callable[[Path], dict[str, str]], **env: str) -> Iterator[tuple[Stack, Stack]]:
    """Two private homes ("hosts") on one server database, whose URLs ``urls_of`` gives for the first
    home (:class:`testkit.postgres.HomeDatabases`), each with ``env`` added: two stacks, closed after."""
    first, second = new_home(), new_home()
    urls = urls_of(first)
    stacks = []
    for home in (first, second):
        isolated = {k: v for k, v in isolated_env(home).items() if not k.startswith("DATABASE_")}
        stacks.append(Stack(home, {**isolated, **urls, **env}))
    try:
        yield stacks[0], stacks[1]
    finally:
        for stack in stacks:
            stack.close()


def no_writer_words(settings: Settings, timeout: float = 30.0) -> str:
    """What a client of ``settings``' home is told once no writer has run there for a while (the
    words ``/api/health`` and the API's 503 give: :meth:`db.silence.Silence.no_writer`)."""
    from db.client import WriterClient
    from db.errors import WriterUnavailable
    from testkit.helpers import wait_for

    said: list[str] = []

    def told() -> bool:
        try:
            client.ping(timeout=0.5)
        except WriterUnavailable as e:
            said.append(str(e))
            return "no writer is running" in said[-1]
        return False

    with WriterClient(settings=settings) as client:
        wait_for("a client to say no writer is running", told, timeout=timeout)
    return said[-1]
