"""gunicorn serving one of the web apps exactly as ``circus.ini`` runs it,
but without circusd: the watcher's own command line (worker class, workers,
timeouts, config module) is read from ``circus.ini``, its circus socket
becomes a listening socket bound here on a free 127.0.0.1 port and passed
as ``fd://``, and ``$(circus.env.X)`` comes from the test's environment. A
test of the app's contract (schemathesis) thus meets the production server
without the rest of the stack. Stopped, with its workers, by pid.
"""
from __future__ import annotations

import configparser
import http.client
import json
import re
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testkit.env import BIN, ROOT
from testkit.helpers import pauses
from testkit.process import Descendants, stop_process

#: One answer read off a raw socket: (status, headers in lower case, body).
Answer = tuple[int, dict[str, str], bytes]

_PLACEHOLDER = re.compile(r"\$\(circus\.(sockets|env)\.([A-Za-z0-9_]+)\)")


@dataclass(frozen=True)
class Served:
    """A running gunicorn master and where it listens."""

    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def watcher_command(watcher: str, env: dict[str, str], fd: int, ini: Path = ROOT / "circus.ini") -> list[str]:
    """``[watcher:NAME] cmd`` of ``ini``, its circus socket replaced by ``fd``
    and ``$(circus.env.X)`` by ``env``'s value."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ini)
    cmd = parser.get(f"watcher:{watcher}", "cmd")

    def fill(m: re.Match[str]) -> str:
        return str(fd) if m.group(1) == "sockets" else env[m.group(2)]

    argv = shlex.split(_PLACEHOLDER.sub(fill, cmd))
    if argv[0] == "gunicorn":
        argv[0] = str(BIN / "gunicorn")
    return argv


def get_json(port: int, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """``GET path`` on 127.0.0.1:``port``: the status and the body as JSON (its
    first 300 bytes when it is not JSON). Raises OSError when nothing answers."""
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


def _answers(port: int, path: str) -> bool:
    try:
        return get_json(port, path)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


@contextmanager
def serving(env: dict[str, str], watcher: str = "api", ready_path: str = "/api/health",
            timeout: float = 60.0, ini: Path = ROOT / "circus.ini") -> Iterator[Served]:
    """Run ``watcher``'s gunicorn of ``ini`` with ``env`` until the block ends; yields once
    ``GET ready_path`` answers 200 (for the API: once the writer answers too)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    log_path = Path(env["TICKSTACK_HOME"]) / "log" / f"{watcher}-test.log"
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(watcher_command(watcher, env, sock.fileno(), ini), env=env, cwd=ini.parent,
                                    pass_fds=(sock.fileno(),), stdout=log, stderr=subprocess.STDOUT)
    finally:
        sock.close()  # gunicorn holds its own copy
    served = Served(proc, port, log_path)
    workers = Descendants(proc.pid)
    try:
        deadline = time.monotonic() + timeout
        waits = pauses(0.2)
        while not _answers(port, ready_path):
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{served.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn: GET {ready_path} not 200 within {timeout:g} s:\n{served.log()[-3000:]}")
            time.sleep(next(waits))
        workers.remember()
        yield served
    finally:
        workers.remember()
        stop_process(proc, 30)
        workers.kill_survivors()


def exchange(port: int, head: bytes, body: bytes = b"", timeout: float = 20.0) -> list[Answer]:
    """Send ``head`` then ``body`` (from a thread, so an answer given before the body is all sent is
    read meanwhile), read until the server closes the connection, and return every answer in what
    it sent: (status, headers in lower case, body). Raw bytes: what is under test is what the server
    does with requests no HTTP client library would send."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        def send() -> None:
            try:
                sock.sendall(head + body)
            except OSError:  # the server answered and closed before taking it all
                pass

        sender = threading.Thread(target=send)
        sender.start()
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:  # closed with some of the body unread: what came before counts
            pass
        sender.join(timeout)
    return parse_answers(data)


def parse_answers(data: bytes) -> list[Answer]:
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        answers.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return answers


def request_head(method: str, target: str, *headers: str, keep_alive: bool = False) -> bytes:
    """A request's head; ``Connection: close`` unless ``keep_alive``, so the exchange ends with the answer."""
    close = () if keep_alive else ("Connection: close",)
    return "\r\n".join((f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *close, *headers, "", "")).encode("latin-1")


def chunked(body: bytes, size: int = 65536) -> bytes:
    """``body`` in the chunked transfer coding."""
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
