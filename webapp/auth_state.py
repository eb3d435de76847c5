"""The console's login state that every gunicorn worker shares: the login throttle, the live
sessions, and who is knocking (:func:`peer_key`).

Both stores are small JSON files in ``$TICKSTACK_HOME/run`` (mode 0600, in the 0700 folder), read
and changed only under a ``flock`` (:func:`locked_json`): the console runs in two gunicorn worker
processes with several threads each, so state kept in memory would be one state per worker (a
session revoked in one would live on in the other, and each would count failures on its own).
``flock`` is taken on a descriptor opened per call, so it serialises the threads of one process
as well as the processes, and the kernel drops it if a holder dies.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Entries kept at most in either file (the oldest go first), so no flood can grow it without bound.
MAX_ENTRIES = 10_000


def locked_json(path: Path, change: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """The JSON object in ``path``, read under ``flock`` (shared when ``change`` is None). ``change``
    edits it in place under the exclusive lock and returns whether to write it back. A missing or
    damaged file reads as ``{}``. A write that cannot be made (a full disk: ``OSError``) raises
    with the file as it was: the new text's blocks are taken first, then it is written over the old
    one and the rest cut off. Emptied first and then written, a full disk left it empty: every
    console session ended, and every failed login forgotten by the throttle (fault hunt)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_SH if change is None else fcntl.LOCK_EX)
        try:
            data = json.loads(f.read() or b"{}")
        except ValueError:
            data = None
        if not isinstance(data, dict):
            data = {}
        if change is not None and change(data):
            text = json.dumps(data).encode()
            if text:
                os.posix_fallocate(fd, 0, len(text))
            f.seek(0)
            f.write(text)
            f.flush()
            f.truncate(len(text))
    return data


# --- who is knocking ----------------------------------------------------------------------------


def peer_uid(client: tuple[str, int], server: tuple[str, int], table: str = "/proc/net/tcp") -> int | None:
    """The user id owning the client end of the TCP connection ``client`` -> ``server``, as the
    kernel lists it in ``table``; None when it is not there (not loopback IPv4, another network
    namespace, or already closed). Every local user can read that table: no privilege needed."""
    try:
        local = _hex_endpoint(*client)
        remote = _hex_endpoint(*server)
    except (OSError, ValueError, TypeError):
        return None
    try:
        with open(table) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 7 and fields[1] == local and fields[2] == remote:
                    return int(fields[7])
    except (OSError, ValueError):
        pass
    return None


def _hex_endpoint(addr: str, port: int) -> str:
    """``addr:port`` as /proc/net/tcp prints it: the IPv4 address as a host-order word, in hex."""
    return f"{int.from_bytes(socket.inet_aton(addr), sys.byteorder):08X}:{int(port):04X}"


def peer_key(wsgi_env: Mapping[str, Any]) -> str:
    """Whom a request (its WSGI environ) counts against: ``uid:N``, the local user who opened the
    connection (the server listens on 127.0.0.1 only, so every client is on this machine and the
    kernel knows which user it is), else ``addr:ADDRESS`` (a peer the table does not show, such as
    a reverse proxy's, or a test client without a socket)."""
    addr = str(wsgi_env.get("REMOTE_ADDR") or "unknown")
    try:
        client = (addr, int(wsgi_env["REMOTE_PORT"]))
        server = (str(wsgi_env["SERVER_NAME"]), int(wsgi_env["SERVER_PORT"]))
    except (KeyError, ValueError):
        return f"addr:{addr}"
    uid = peer_uid(client, server)
    return f"addr:{addr}" if uid is None else f"uid:{uid}"


# --- the throttle ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """After ``n`` failed logins of one peer, its next password check waits ``delay(n)``: nothing
    for the first :attr:`free` failures, then :attr:`base_s` doubling at each failure, at most
    :attr:`cap_s`. A peer whose last failure is :attr:`forget_s` old starts afresh."""

    free: int = 5
    base_s: float = 10.0
    cap_s: float = 60.0
    forget_s: float = 900.0

    def delay(self, failures: int) -> float:
        if failures < self.free:
            return 0.0
        return min(self.cap_s, self.base_s * 2.0 ** min(failures - self.free, 60))

    def max_checks(self, seconds: float) -> int:
        """The most password checks one peer can get within ``seconds``, starting afresh: the free
        ones, then one per delay as the delays add up."""
        checks, waited = self.free, 0.0
        while waited + self.delay(checks) <= seconds:
            waited += self.delay(checks)
            checks += 1
        return checks


class LoginThrottle:
    """Failed logins per peer (:func:`peer_key`), in a file shared by every worker; see
    :class:`Schedule` for the delays and :mod:`webapp.auth` for why it is built this way.

    The count cannot race: :meth:`admit` counts the attempt as a failure *before* its password is
    checked, under the lock, and sets when the next check may start; :meth:`succeeded` forgets the
    peer once a check passed. So parallel attempts are admitted one delay apart, whatever their
    number, and never more than :meth:`Schedule.max_checks` within a time."""

    def __init__(self, path: Path, schedule: Schedule = Schedule()) -> None:
        self.path = path
        self.schedule = schedule

    def admit(self, key: str) -> float:
        """0 when ``key`` may have its password checked now (the attempt is then counted), else the
        seconds until it may (nothing is counted)."""
        wait = 0.0

        def reserve(entries: dict[str, Any]) -> bool:
            nonlocal wait
            now = time.time()
            self._forget_old(entries, now)
            failures, next_at, _last = entries.get(key, (0, 0.0, now))
            # Capped even if the clock went back: a peer never waits longer than the schedule's cap.
            wait = min(max(0.0, next_at - now), self.schedule.cap_s)
            if wait > 0:
                return False
            failures += 1
            entries[key] = (failures, now + self.schedule.delay(failures), now)
            return True

        locked_json(self.path, reserve)
        return wait

    def succeeded(self, key: str) -> None:
        """The admitted attempt of ``key`` had the right password: its failures are forgotten."""
        locked_json(self.path, lambda entries: entries.pop(key, None) is not None)

    def failures(self, key: str) -> int:
        """Password checks of ``key`` counted as failures (and not forgotten yet)."""
        entry = locked_json(self.path).get(key)
        return int(entry[0]) if entry else 0

    def _forget_old(self, entries: dict[str, Any], now: float) -> None:
        for k in [k for k, v in entries.items() if not _is_entry(v) or now - v[2] > self.schedule.forget_s]:
            del entries[k]
        if len(entries) > MAX_ENTRIES:
            for k in sorted(entries, key=lambda k: entries[k][2])[:len(entries) - MAX_ENTRIES]:
                del entries[k]


def _is_entry(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(isinstance(x, int | float) for x in value)


def retry_after(wait: float) -> int:
    """Seconds for a ``Retry-After`` header: whole, at least 1."""
    return max(1, math.ceil(wait))


# --- sessions -------------------------------------------------------------------------------------


class SessionStore:
    """The console's live sessions, by a hash of their id: a session is valid only while its id is
    here, so logging out (:meth:`revoke`) ends it in every worker at once, and a copy of its cookie
    is worth nothing afterwards. Ids are 256-bit random; the file keeps only their SHA-256."""

    def __init__(self, path: Path, max_age_s: float, max_sessions: int = 64) -> None:
        self.path = path
        self.max_age_s = max_age_s
        self.max_sessions = max_sessions

    @staticmethod
    def _digest(sid: str) -> str:
        return hashlib.sha256(sid.encode()).hexdigest()

    def create(self, user: str) -> str:
        """A new session of ``user``; returns its id. The oldest sessions beyond ``max_sessions``
        end (every one was made with the password, so this bounds the file, not an attacker)."""
        sid = secrets.token_urlsafe(32)

        def add(entries: dict[str, Any]) -> bool:
            now = time.time()
            for k in [k for k, v in entries.items() if not self._live(v, now)]:
                del entries[k]
            entries[self._digest(sid)] = [now, user]
            for k in sorted(entries, key=lambda k: entries[k][0])[:max(0, len(entries) - self.max_sessions)]:
                del entries[k]
            return True

        locked_json(self.path, add)
        return sid

    def user_of(self, sid: Any) -> str | None:
        """The user of the live session ``sid``; None when it ended, expired or never was."""
        if not isinstance(sid, str) or not sid:
            return None
        entry = locked_json(self.path).get(self._digest(sid))
        return entry[1] if self._live(entry, time.time()) else None

    def revoke(self, sid: Any) -> None:
        """End the session ``sid`` (nothing if it is not live)."""
        if isinstance(sid, str) and sid:
            locked_json(self.path, lambda entries: entries.pop(self._digest(sid), None) is not None)

    def _live(self, entry: Any, now: float) -> bool:
        return (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int | float)
                and isinstance(entry[1], str) and 0 <= now - entry[0] < self.max_age_s)
