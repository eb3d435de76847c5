"""A host that goes silent, for ``tests/test_postgres_keepalives.py``: run as
``unshare --net -- python -m tests.silent_host`` (a network namespace of its own: its loopback, its
ports and its packet filter are nobody else's, and vanish with it).

In the namespace: a throwaway server listening on 127.0.0.1 (and its socket). "Host A" takes its
writer lock (:class:`db.server_lock.ServerWriterLock`) and the analysis leadership
(:class:`db.leader.Leadership`) over TCP, as a stack on another machine would. Then the
namespace's loopback goes down: every packet of those two connections goes nowhere, both ways,
and neither end is told (no FIN, no RST), as when a host's power fails or its network is cut.
"Host B" asks for the same writer lock and leadership through the socket every 0.2 s (a Unix
socket is not TCP: the cut does not touch it). Printed as JSON:
how long after the cut the server gave the lock and the leadership to B (its keepalives end A's
sessions), and how long host A's own lock thread took to notice (libpq's ``tcp_user_timeout``).
SIGTERM (the test's timeout) stops the server on the way out, by its pid (``pg_ctl stop``).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from db.config import load_settings
from db.leader import Leadership
from db.lock import WriterLocked
from db.server_lock import ServerWriterLock
from testkit.postgres import PostgresServer

#: Any port: the namespace is empty. Not 5432, so a slip outside one fails instead of meeting a real server.
PORT = 55432
#: Longer than the stated 11 s by far, shorter than Linux's default keepalive (2 h 11 min).
GIVE_UP_S = 120.0


def tcp_sessions(server: PostgresServer) -> int:
    """How many of the server's sessions came over TCP (host A's)."""
    return int(server.psql("postgres", "postgres", "SELECT count(*) FROM pg_stat_activity WHERE client_port > 0"))


def cut() -> None:
    """Take the namespace's loopback down: every TCP packet of host A's sessions, both ways, goes
    nowhere, and neither end is told (no FIN, no RST). The socket, host B's way in, is not TCP."""
    subprocess.run(["ip", "link", "set", "lo", "down"], check=True, capture_output=True, text=True, timeout=30)


def _stop(signum: int, _frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # the server is stopped by main's finally


def main() -> dict[str, Any]:
    signal.signal(signal.SIGTERM, _stop)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
    server = PostgresServer(tcp_port=PORT).start()
    try:
        with tempfile.TemporaryDirectory() as home_a, tempfile.TemporaryDirectory() as home_b:
            a = load_settings({"TICKSTACK_HOME": home_a, "DATABASE_URL": server.tcp_url(), "TICKSTACK_HOST": "host-a"})
            b = load_settings({"TICKSTACK_HOME": home_b, "DATABASE_URL": server.url(), "TICKSTACK_HOST": "host-a"})
            noticed: list[float] = []
            lock_a = ServerWriterLock(a.database_url, a.host, on_lost=lambda: noticed.append(time.monotonic()))
            lock_a.acquire()
            lead_a = Leadership(a, "analysis")
            assert lead_a.try_take(), "host A could not lead on an empty server"
            sessions = tcp_sessions(server)
            assert sessions == 2, f"expected host A's two TCP sessions, found {sessions}"
            lead_b = Leadership(b, "analysis")
            assert not lead_b.try_take(), "host B led while host A held the leadership"
            cut()
            t0 = time.monotonic()
            took: dict[str, float] = {}
            refused_at_first: dict[str, bool] = {}  # the cut itself released nothing: the server kept A's
            while len(took) < 2 and time.monotonic() - t0 < GIVE_UP_S:
                if "leadership" not in took and lead_b.try_take():
                    took["leadership"] = time.monotonic() - t0
                refused_at_first.setdefault("leadership", "leadership" not in took)
                if "writer_lock" not in took:
                    lock_b = ServerWriterLock(b.database_url, b.host)
                    try:
                        lock_b.acquire()
                        took["writer_lock"] = time.monotonic() - t0
                        lock_b.release()
                    except WriterLocked:
                        pass
                refused_at_first.setdefault("writer_lock", "writer_lock" not in took)
                time.sleep(0.2)
            deadline = t0 + GIVE_UP_S
            while not noticed and time.monotonic() < deadline:
                time.sleep(0.2)
            lead_b.release()
            threading.Thread(target=lock_a.release, daemon=True).start()  # its socket is cut: do not wait on it
            return {"took_over_after_s": {k: round(v, 2) for k, v in took.items()},
                    "refused_at_first": refused_at_first,
                    "host_a_noticed_after_s": round(noticed[0] - t0, 2) if noticed else None,
                    "gave_up_after_s": GIVE_UP_S}
    finally:
        server.stop()


if __name__ == "__main__":
    print(json.dumps(main()))
    sys.stdout.flush()
