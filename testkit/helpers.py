"""Small pieces the tests share: polling for a condition, read-only queries
of a test's database, and test data."""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from db.config import Settings
from testkit.env import ROOT
from testkit.postgres import read_connection

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z


#: The CSRF token in a console page's forms (Flask-WTF's hidden field).
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


class ConsoleClient:
    """A logged-in operator of a console app, through Flask's test client (CSRF on, as in
    production): ``get``, ``post`` (with the session's CSRF token), ``login`` (the generated
    password from its home)."""

    def __init__(self, app: Any) -> None:
        self.client = app.test_client()
        self.home: Path = app.config["TICKSTACK"].home

    @classmethod
    def logged_in(cls, app: Any) -> ConsoleClient:
        console = cls(app)
        console.login()
        return console

    def get(self, url: str, **kw: Any) -> Any:
        return self.client.get(url, **kw)

    def token(self) -> str:
        """The session's CSRF token, from a page's form."""
        return CSRF_RE.search(self.get("/console/audit").text).group(1)  # type: ignore[union-attr]

    def post(self, url: str, data: dict[str, str] | None = None) -> Any:
        return self.client.post(url, data={"csrf_token": self.token(), **(data or {})})

    def login(self) -> None:
        token = CSRF_RE.search(self.get("/console/login").text).group(1)  # type: ignore[union-attr]
        password = (self.home / "admin-password").read_text().strip()
        r = self.client.post("/console/login", data={"csrf_token": token, "username": "admin", "password": password})
        assert r.status_code == 302, r.status_code


def query(settings: Settings, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of ``sql`` (``?`` placeholders) from the test's database, read-only: the SQLite file or
    the server's database (:func:`testkit.postgres.read_connection`), so one test reads both."""
    con = read_connection(settings)
    try:
        return [tuple(row) for row in con.execute(sql, params).fetchall()]
    finally:
        con.close()


def pauses(longest: float = 0.25) -> Iterator[float]:
    """The pauses between two looks at something a test waits for: 10 ms, doubled up to ``longest``.
    A fixed 0.25 s made each wait last 0.12 s longer than its thing, on average; thousands of waits
    a run left the 2 cores idle for minutes of ``make test``. Most things come within 100 ms."""
    pause = min(0.01, longest)
    while True:
        yield pause
        pause = min(pause * 2, longest)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll ``check`` until it returns something true; an exception counts as not yet."""
    deadline = time.monotonic() + timeout
    for pause in pauses():
        try:
            value = check()
        except Exception:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(pause)
    raise AssertionError("unreachable: pauses() never ends")


def write_bar_csv(path: Path, n: int = 60, seed: int = 7,
                  step_ms: int = 60_000) -> list[tuple[int, float, float, float, float, float]]:
    """An OHLCV export like pandas writes it (unnamed first column): ``n`` bars ``step_ms`` apart
    (1-minute bars by default)."""
    rng = random.Random(seed)
    price, bars = 100.0, []
    lines = [",Open,High,Low,Close,Volume"]
    for i in range(n):
        ts = T0 + i * step_ms
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


class DiskUnavailable(Exception):
    """A small disk cannot be mounted here (not root, or ``mount`` refused); a test skips on it."""


@contextmanager
def small_disk(size: str = "8m") -> Iterator[Path]:
    """A tmpfs of ``size`` (mode 0700) mounted on a new short folder, to fill for real: a full disk
    is a state the stack must survive. Needs root (raises :class:`DiskUnavailable` otherwise).
    Unmounted by its path after (lazily if a process still holds a file on it), never by name."""
    if os.geteuid() != 0:
        raise DiskUnavailable("mounting a tmpfs needs root")
    folder = Path(tempfile.mkdtemp(prefix="ts-disk-"))
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        folder.rmdir()
        raise DiskUnavailable(f"mount -t tmpfs failed: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        folder.rmdir()


@contextmanager
def aborting_disk(size_mb: int = 32) -> Iterator[tuple[Path, Callable[[], None]]]:
    """An ext4 filesystem in an image file, loop-mounted on a new short folder (mode 0700), and the
    call that makes it fail as a failing disk does: ext4's ``abort`` (every write from then on an I/O
    error, the filesystem read-only, as after ``errors=remount-ro``). Needs root and a loop device
    (raises :class:`DiskUnavailable` otherwise). Unmounted by its path after, the image removed."""
    if os.geteuid() != 0:
        raise DiskUnavailable("mounting a loop device needs root")
    work = Path(tempfile.mkdtemp(prefix="ts-ext4-"))
    image, folder = work / "disk.img", work / "mnt"
    folder.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mb * 2**20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    mount = made if made.returncode != 0 else subprocess.run(["mount", "-o", "loop", str(image), str(folder)],
                                                             capture_output=True, text=True)
    if mount.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise DiskUnavailable(f"an ext4 loop mount failed: {mount.stderr.strip()}")
    os.chmod(folder, 0o700)

    def abort() -> None:
        done = subprocess.run(["mount", "-o", "remount,abort", str(folder)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    try:
        yield folder, abort
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def fill_disk(path: Path, leave: int = 0) -> int:
    """Write ``path`` until its disk has at most ``leave`` bytes free (0: until ENOSPC); returns
    its size. Delete ``path`` to give the space back."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for chunk in (65536, 4096, 1):
            while True:
                vfs = os.statvfs(path)
                if vfs.f_bavail * vfs.f_frsize - chunk < leave:
                    break
                try:
                    written += f.write(b"\0" * chunk)
                except OSError:  # ENOSPC
                    break
    return written


def backticked(text: str, needle: str) -> str:
    """The first `...` command in ``text`` that contains ``needle``."""
    commands = [c for c in re.findall(r"`([^`]+)`", text) if needle in c]
    assert commands, f"no `...{needle}...` in:\n{text}"
    return commands[0]


def run_as_printed(command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A command as a user pastes it into a shell in the checkout without the venv activated: no
    venv on PATH, no CIRCUSCTL_ENDPOINT, no TICKSTACK_* variable."""
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "-c", command], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
