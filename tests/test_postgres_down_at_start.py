"""The stack started while its PostgreSQL server is down (``circusd circus.ini``, as a user runs it).

The writer waits for its server (up to 5 minutes), and circusd's readiness hooks waited for the
writer on circusd's own event loop: 10 s in the writer's ``after_start``, then 30 s in the API's
``before_start``, during which ``circusctl status`` went unanswered and nothing said why. Now the
writer says in its run folder that it waits for its server (:mod:`db.server_wait`), the hooks stop
waiting for it at once, circusd's log and stderr say why, and the stack comes up by itself once the
server is back, with the writes sent meanwhile stored.
"""
from __future__ import annotations

import configparser
import json
import subprocess
import threading
import time
import urllib.request

import pytest

from db.client import WriterClient
from db.server_wait import last_refusal, refused_file, say_refused, wait_file
from supervision.circus import STACK_WATCHERS
from testkit.circus import Circusd, CircusStack
from testkit.env import ROOT
from testkit.helpers import wait_for
from testkit.postgres import PostgresServer, read_connection

#: A server's own promise (its outage): run by ``pytest --database postgresql``.
pytestmark = pytest.mark.postgres_only

#: How long one ``circusctl status`` may go unanswered before it counts as circusd hung (a hook
#: holding its loop). A bound on a hang, not a speed: an idle circusd answers within a second, even
#: on a loaded machine within a few; a held one did not for 30 s, and the loop below asks every
#: half second, so one of its asks lands early in such a hold and waits out this bound.
HANG_BOUND_S = 25.0
NOW_TS = 1_704_067_200_000


def status_within_bound(stack: CircusStack, started: float) -> dict[str, str]:
    """``circusctl status`` as a user types it, failing the test if it hangs past :data:`HANG_BOUND_S`."""
    asked = time.monotonic()
    try:
        done = stack.circusctl("status", timeout=HANG_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"circusctl status did not answer within {HANG_BOUND_S:g} s (asked {asked - started:.1f} s after "
                    f"circusd first answered): circusd's loop is held. circusd.log: {stack.circusd_log()[-2000:]}")
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)


def health(stack: CircusStack) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.api_port}/api/health", timeout=5) as answer:
        return json.loads(answer.read())


def test_with_the_server_down_at_start_circusctl_answers_says_why_and_the_stack_comes_up_once_it_is_back(
        postgres_server: PostgresServer) -> None:
    stack = CircusStack()  # its database made on the session's server, which is up
    try:
        check_the_outage_then_the_return(stack, postgres_server)
    finally:
        stack.close()


def check_the_outage_then_the_return(stack: CircusStack, postgres_server: PostgresServer) -> None:
    back = threading.Event()
    outage = threading.Thread(target=postgres_server.restart, kwargs={"down_for": 300.0, "until": back})
    outage.start()
    stored: list[object] = []
    writing = threading.Thread()
    try:
        wait_for("the server to stop", postgres_server.socket_gone, timeout=30)
        # What an earlier writer of this home left as its server refused its login (a wrong password,
        # mended since): while the server is down, the news is that it does not answer (review, round 42:
        # doctor said "The writer cannot start: ... refused ... login", and would have sent the user to
        # mend a password that was right).
        refused = refused_file(stack.settings.run_dir)
        refused.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        say_refused(refused, stack.settings.database_url, 'FATAL:  password authentication failed for user "ts_owner"')
        assert last_refusal(stack.settings) is not None
        # As a user starts it: `circusd circus.ini` (no `db prepare`), its stderr kept (the terminal).
        stack.log_path = stack.home / "log" / "circusd.terminal"
        Circusd.start(stack, wait_active=(), timeout=30)  # once circusd answers at all
        started = time.monotonic()
        # Every watcher up, and the writer's reason said, each status answered within the bound.
        while True:
            statuses = status_within_bound(stack, started)
            said = "writer: the database server does not answer at postgresql+psycopg://ts_owner:***@"
            if all(statuses.get(w) == "active" for w in STACK_WATCHERS) and said in stack.log("writer"):
                break
            if time.monotonic() - started > 120:  # a give-up, not a speed: the stack never came up
                pytest.fail(f"not every watcher active with the writer's reason said: {statuses}, circusd.log: "
                            f"{stack.circusd_log()[-3000:]}")
            time.sleep(0.5)
        listed = stack.circusctl("list", timeout=HANG_BOUND_S)
        assert listed.returncode == 0 and "writer" in listed.stdout, listed.stdout + listed.stderr
        assert wait_file(stack.settings.run_dir).exists()
        assert not refused.exists() and last_refusal(stack.settings) is None
        assert "waits for its database server: the database server does not answer at" in stack.circusd_log()
        terminal = stack.log_path.read_text()
        assert "circusd: the writer waits for its database server: the database server does not answer" in terminal, \
            terminal
        for role, password in postgres_server.passwords.items():
            for text in (stack.log("writer"), stack.circusd_log(), terminal):
                assert password not in text, f"{role}'s password in a log"

        # A write sent while the server is down: acknowledged once the server is back, and stored.
        def write() -> None:
            ticks = [{"symbol": "BTCUSD", "ts": NOW_TS + i, "bid": 1.0, "ask": 1.5, "volume": 1.0, "source": "outage",
                      "seq": i} for i in range(10)]
            with WriterClient(settings=stack.settings, deadline=240) as client:
                stored.append(client.call("insert_ticks", ticks=ticks))

        writing = threading.Thread(target=write)
        writing.start()
        time.sleep(1)
        assert postgres_server.socket_gone(), "the server came back before the checks ended"
    finally:
        back.set()
        outage.join(120)
    # Back: the stack comes up by itself, without a restart of circusd or of any watcher.
    writing.join(180)
    assert stored == [{"inserted": 10, "duplicates": 0}], stored
    wait_for("/api/health to say ok", lambda: health(stack)["status"] == "ok", timeout=120)
    with read_connection(stack.settings) as conn:
        count = conn.execute("SELECT count(*) FROM ticks WHERE source = ?", ("outage",)).fetchone()[0]
    assert count == 10
    assert stack.log("writer").count("writer ready") == 1, stack.log("writer")[-3000:]
    assert not wait_file(stack.settings.run_dir).exists()


def test_a_stack_started_with_the_server_down_stops_at_once_its_writer_not_killed(
        postgres_server: PostgresServer) -> None:
    """``circusctl quit`` while the writer waits for its server: the writer's wait ended only after its
    5 minutes, so circus killed it at its graceful timeout (45 s of quit, a SIGKILL in circusd's log).
    It stops as it is asked now, exit 0."""
    stack = CircusStack()
    back = threading.Event()
    outage = threading.Thread(target=postgres_server.restart, kwargs={"down_for": 300.0, "until": back})
    outage.start()
    try:
        wait_for("the server to stop", postgres_server.socket_gone, timeout=30)
        Circusd.start(stack, wait_active=("writer", "api"), timeout=60)
        wait_for("the writer to say it waits", lambda: "the database server does not answer" in stack.log("writer"),
                 timeout=60)
        done = stack.circusctl("quit", "--waiting")
        assert done.returncode == 0, done.stdout + done.stderr
        assert stack.wait_exit(120) == 0
        assert postgres_server.socket_gone(), "the server came back before the checks ended"
        assert "writer: stopped while it waited" in stack.log("writer"), stack.log("writer")[-2000:]
        assert "SIGKILL" not in stack.circusd_log(), stack.circusd_log()[-3000:]
        assert not wait_file(stack.settings.run_dir).exists()
    finally:
        back.set()
        outage.join(120)
        stack.close()


def test_a_writer_waiting_for_its_server_at_start_is_not_restarted_by_the_watchdog(
        postgres_server: PostgresServer) -> None:
    """circus's watchdog watches what already runs when it starts, the writer included, from that
    moment. A writer waiting for its server (down, or every connection slot taken: the fault hunt's
    max_connections at a start) sent no heartbeat, so the watchdog restarted it after its
    ``watchdog.timeout`` (20 s) as "stuck": a false alarm in circusd's log and the audit log, and the
    wait begun again. It sends them while it waits now: the writer that waited is the one that serves."""
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ROOT / "circus.ini")
    writer_limit = ini.getfloat("watcher:writer", "watchdog.timeout")
    stack = CircusStack()
    back = threading.Event()
    outage = threading.Thread(target=postgres_server.restart, kwargs={"down_for": 300.0, "until": back})
    outage.start()
    try:
        try:
            wait_for("the server to stop", postgres_server.socket_gone, timeout=30)
            Circusd.start(stack, wait_active=("writer",), timeout=60)
            wait_for("the writer to say it waits", lambda: "the database server does not answer" in stack.log("writer"),
                     timeout=60)
            [waiting] = stack.pids_of("writer")
            wait_for("the watchdog to listen", lambda: "Watchdog listening UDP" in stack.circusd_log(), timeout=60)
            time.sleep(writer_limit + 10)  # the watchdog's chance to find it silent (it looks every second)
            assert postgres_server.socket_gone(), "the server came back before the watchdog had its chance"
            log = stack.circusd_log()
            assert "sent no heartbeat" not in log, log[-3000:]
            assert stack.pids_of("writer") == [waiting]
            # Watched, and alive by its heartbeats: from the watchdog's start (what ran then; a heartbeat
            # of another process first made it learn them all as not beating yet), or from its first one.
            assert (f"watchdog: writer pid {waiting}: running; watched from now on" in log
                    or f"watchdog: writer pid {waiting}: first heartbeat; watched from now on" in log), log[-3000:]
        finally:
            back.set()
            outage.join(120)
        wait_for("the writer that waited to serve", lambda: f"writer ready: pid {waiting}," in stack.log("writer"),
                 timeout=120)
    finally:
        stack.close()
