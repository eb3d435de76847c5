"""One writer per PostgreSQL database, across homes and hosts (issue 11).

The writer's file lock is per ``TICKSTACK_HOME``; on PostgreSQL it also holds a session-level
advisory lock (:class:`db.server_lock.ServerWriterLock`). Two homes on one database of the session's
throwaway server stand for two hosts: the second writer refuses (exit code ``EXIT_LOCKED``, the
holder named), and takes over once the first stops, is SIGKILLed, or loses its lock's session.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from db.client import WriterClient
from db.errors import WriterError, WriterUnavailable
from db.server_lock import LOCK_APP
from testkit.env import ROOT
from testkit.helpers import query, wait_for
from testkit.postgres import HomeDatabases, PostgresServer
from testkit.writer import Stack, stacks_on_one_database, stopped_while_waiting_for_the_lock
from workers.writer import EXIT_LOCKED

#: A server's own promises: run by ``pytest --database postgresql`` (the suite's PostgreSQL run).
pytestmark = pytest.mark.postgres_only

NOW_TS = 1_704_067_200_000


@pytest.fixture
def two_homes(home_databases: HomeDatabases) -> Iterator[tuple[Stack, Stack]]:
    """Two private homes ("hosts") on one database of the session's server, passwords in the URLs."""
    with stacks_on_one_database(home_databases) as stacks:
        yield stacks


def refused(stack: Stack, timeout: float = 60) -> subprocess.CompletedProcess:
    """Start a writer in ``stack``'s home and wait for it to exit (it should refuse, after a lock wait of 1 s)."""
    return subprocess.run([sys.executable, "-m", "workers.writer"], cwd=ROOT, capture_output=True, text=True,
                          env={**stack.env, "TICKSTACK_WRITER_LOCK_WAIT": "1"}, timeout=timeout)


def insert(stack: Stack, seq: int, deadline: float = 20) -> dict:
    tick = {"symbol": "BTCUSD", "ts": NOW_TS + seq, "bid": 1.0, "ask": 1.5, "volume": 1.0,
            "source": f"home-{stack.home.name}", "seq": seq}
    with WriterClient(settings=stack.settings, deadline=deadline) as client:
        return client.call("insert_ticks", ticks=[tick])


def holder_text(pid: int) -> str:
    return f"{LOCK_APP} pid {pid} on {socket.gethostname()}"


def assert_no_password(text: str, server: PostgresServer) -> None:
    for role, password in server.passwords.items():
        assert password not in text, f"{role}'s password is in the output"


def take_over(stack: Stack, timeout: float = 60) -> subprocess.Popen:
    """Start a writer in ``stack`` until one serves (a refusal is retried for up to ``timeout`` seconds)."""
    started = time.monotonic()
    while True:
        try:
            return stack.start_writer()
        except RuntimeError:
            if time.monotonic() - started > timeout:
                raise


def lock_sessions(server: PostgresServer, pid: int) -> int:
    """How many sessions of the server the writer of ``pid`` still has for its lock."""
    return int(server.psql("postgres", "postgres", "SELECT count(*) FROM pg_stat_activity "
                           f"WHERE application_name = '{holder_text(pid)}'"))


def test_a_second_writer_on_the_same_database_refuses_until_the_first_is_gone(
        two_homes: tuple[Stack, Stack], postgres_server: PostgresServer) -> None:
    """Two homes, one database: the second writer exits EXIT_LOCKED naming the first (its pid and
    host, from the lock session's application_name) while the first runs; it takes over once the
    first is stopped (SIGTERM, by pid) and, the other way round, once the holder is SIGKILLed (the
    server ends the dead writer's session, and its lock with it)."""
    a, b = two_homes
    writer_a = a.start_writer()
    assert insert(a, 1) == {"inserted": 1, "duplicates": 0}

    second = refused(b)
    assert second.returncode == EXIT_LOCKED, second.stderr[-2000:]
    assert "another writer holds this PostgreSQL database's writer lock" in second.stderr, second.stderr
    assert holder_text(writer_a.pid) in second.stderr, second.stderr
    assert_no_password(second.stdout + second.stderr, postgres_server)
    doctor = subprocess.run([sys.executable, "-m", "db", "doctor"], env=b.env, cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert doctor.returncode == 1, doctor.stdout
    # The lock is per host: the other home's writer of the same host name holds it (and this stack's
    # writes reach no writer: tests/test_postgres_messages.py).
    assert f"writer lock for that host ({holder_text(writer_a.pid)}" in doctor.stdout, doctor.stdout

    assert a.stop(writer_a) == 0  # SIGTERM: drains, releases the lock
    writer_b = take_over(b)
    assert insert(b, 2) == {"inserted": 1, "duplicates": 0}

    again = refused(a)
    assert again.returncode == EXIT_LOCKED and holder_text(writer_b.pid) in again.stderr, again.stderr

    b.stop(writer_b, sig=9)  # SIGKILL: no release; the server frees the lock when the session dies
    # The kernel closed the dead writer's socket, so its backend ends at once (a socket has no keepalive
    # to wait out); the server releases a session's locks before it drops it from pg_stat_activity.
    wait_for("the killed writer's lock session to end", lambda: lock_sessions(postgres_server, writer_b.pid) == 0)
    writer_a = a.start_writer(TICKSTACK_WRITER_LOCK_WAIT="0")  # takes the lock at its first try, or refuses
    assert insert(a, 3) == {"inserted": 1, "duplicates": 0}
    for stack in (a, b):
        assert_no_password(stack.writer_log(), postgres_server)


def test_a_writer_started_while_another_holds_the_server_lock_waits_for_it_and_takes_over(
        two_homes: tuple[Stack, Stack], postgres_server: PostgresServer) -> None:
    """The server lock is waited for as the file lock is (``TICKSTACK_WRITER_LOCK_WAIT``): the old
    writer ends its lock's session just before it lets its file lock go, and the server drops the
    lock only once that session's backend has exited, so a writer started by circus's reload took
    the file lock, found the server's still held, and exited EXIT_LOCKED (left in round 39). Here the
    holder is another home's writer: the new one waits, saying for what, and serves once it stops."""
    a, b = two_homes
    writer_a = a.start_writer()
    assert insert(a, 1) == {"inserted": 1, "duplicates": 0}
    log = b.home / "log" / "waiting-writer.log"
    with open(log, "wb") as out:
        waiting = subprocess.Popen([sys.executable, "-m", "workers.writer"], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, env={**b.env, "TICKSTACK_WRITER_LOCK_WAIT": "60"})
    b.procs.append(waiting)
    wait_for("the new writer to wait for the server lock", lambda: "waiting up to 60 s for it to end" in
             log.read_text() or waiting.poll() is not None, timeout=30)
    assert waiting.poll() is None, log.read_text()[-2000:]
    assert holder_text(writer_a.pid) in log.read_text(), log.read_text()[-2000:]
    assert a.stop(writer_a) == 0

    def b_serves() -> bool:
        try:
            with WriterClient(settings=b.settings, deadline=1) as client:
                return client.ping(timeout=1)["pid"] == waiting.pid
        except WriterUnavailable:
            return waiting.poll() is not None  # ended: the assert below says how

    wait_for("the waiting writer to serve", b_serves, timeout=30)
    assert waiting.poll() is None, log.read_text()[-2000:]
    assert insert(b, 2) == {"inserted": 1, "duplicates": 0}
    # Stopped while it waits (circus stopping it): exit 0 at once, not EXIT_LOCKED after the wait.
    code, err = stopped_while_waiting_for_the_lock(a.env)
    assert code == 0 and "stopped while it waited" in err, err
    assert_no_password(log.read_text() + err, postgres_server)


def test_a_writer_that_loses_its_lock_session_stops_serving(two_homes: tuple[Stack, Stack],
                                                            postgres_server: PostgresServer) -> None:
    """The lock's session ended under the writer (``pg_terminate_backend``, as a DBA or a network
    cut would): the writer stops serving at once and exits EXIT_LOCKED, so it never writes beside
    the writer that takes the lock next; a writer of the other home then takes over."""
    a, b = two_homes
    writer_a = a.start_writer()
    assert insert(a, 1) == {"inserted": 1, "duplicates": 0}
    ended = postgres_server.psql("postgres", "postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 f"WHERE application_name = '{holder_text(writer_a.pid)}'")
    assert ended.split() == ["t"], ended
    # Asked at once, it commits nothing: its lock's watching thread stops it, and a batch that beats
    # that thread finds the lock gone just before its COMMIT (ServerWriterLock.check_held).
    try:
        answer: object = insert(a, 99, deadline=5)
    except WriterError as e:
        answer = e
    assert isinstance(answer, WriterError), f"acknowledged without its lock: {answer}"
    assert writer_a.wait(60) == EXIT_LOCKED, a.writer_log()[-2000:]
    assert "no longer ours" in a.writer_log() or "lost the PostgreSQL writer lock" in a.writer_log(), \
        a.writer_log()[-2000:]
    take_over(b)
    assert insert(b, 2) == {"inserted": 1, "duplicates": 0}
    assert query(b.settings, "SELECT count(*) FROM ticks WHERE seq = 99") == [(0,)]
    assert_no_password(a.writer_log() + b.writer_log(), postgres_server)


def test_a_server_restart_ends_the_writer_and_its_successor_waits_for_the_server(
        two_homes: tuple[Stack, Stack], postgres_server: PostgresServer) -> None:
    """A server restart ends every session, the lock's too: the writer exits EXIT_LOCKED (circus
    starts it again) rather than reconnect without its lock. A writer started while the server is
    down waits for it (no exit, which would trip circus's flapping limit) and serves once it is back."""
    a, _ = two_homes
    writer_a = a.start_writer()
    assert insert(a, 1) == {"inserted": 1, "duplicates": 0}
    # The server stays down until the successor has said it waits for it (not for a fixed time,
    # which a loaded machine outlasts: the successor would then start with the server back).
    back = threading.Event()
    restart = threading.Thread(target=postgres_server.restart, kwargs={"down_for": 120.0, "until": back})
    restart.start()
    try:
        writer_a.wait(60)
        assert writer_a.returncode == EXIT_LOCKED, a.writer_log()[-2000:]
        waits_before = a.writer_log().count("the database server does not answer")
        with open(a.home / "log" / "writer-test.log", "ab") as log:
            successor = subprocess.Popen([sys.executable, "-m", "workers.writer"], env=a.env, cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT)
        a.procs.append(successor)
        wait_for("the successor to say the server does not answer",
                 lambda: a.writer_log().count("the database server does not answer") > waits_before, timeout=60)
        assert successor.poll() is None, a.writer_log()[-2000:]
    finally:
        back.set()
        restart.join(120)

    def serving() -> bool:
        assert successor.poll() is None, a.writer_log()[-2000:]
        try:
            with WriterClient(settings=a.settings, deadline=1) as client:
                client.ping(timeout=1)
            return True
        except WriterUnavailable:
            return False

    wait_for("the successor to serve once the server is back", serving, timeout=60)
    assert insert(a, 2) == {"inserted": 1, "duplicates": 0}
    log_text = a.writer_log()
    assert "the database server does not answer" in log_text, log_text[-3000:]
    assert re.search(r"lost the PostgreSQL writer lock", log_text), log_text[-3000:]
    assert_no_password(log_text, postgres_server)



def test_a_write_connection_made_after_the_lock_is_lost_is_refused(two_homes: tuple[Stack, Stack],
                                                                   postgres_server: PostgresServer) -> None:
    """The fence: every new connection of the writer's engine checks that the lock's session still
    holds the lock. Once that session is gone (a restart would end both; here only the lock's, by
    pg_terminate_backend) a reconnecting write connection fails instead of committing beside the
    next writer, and the lock reports itself lost."""
    from sqlalchemy import text

    from db.engine import make_write_engine
    from db.lock import WriterLocked
    from db.server_lock import take_server_lock

    a, _ = two_homes
    lost = threading.Event()
    lock = take_server_lock(a.env["DATABASE_URL"], a.settings.host, on_lost=lost.set)
    assert lock is not None
    engine = make_write_engine(a.settings)
    lock.fence(engine)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        engine.dispose()  # the next connect is a new session, as after a reconnection
        postgres_server.psql("postgres", "postgres", f"SELECT pg_terminate_backend({lock.backend_pid})")
        assert lost.wait(60) and lock.lost, "the loss of the lock's session went unnoticed"
        with pytest.raises(WriterLocked, match="no longer holds the PostgreSQL writer lock"):
            with engine.connect():
                pass
    finally:
        engine.dispose()
        lock.release()


def test_under_circus_the_refused_writer_is_retried_by_flapping_and_takes_over(
        two_homes: tuple[Stack, Stack], postgres_server: PostgresServer) -> None:
    """A second stack's writer under circus (the flapping plugin of circus.ini, with a short
    ``retry_in``): refused while the first writer runs (its log names the holder), stopped by the
    flapping plugin instead of respawned in a loop, retried, and serving once the first is gone."""
    from testkit.circus import Circusd

    a, b = two_homes
    writer_a = a.start_writer()
    run_dir, log_dir = b.home / "run", b.home / "log"
    ini = b.home / "circus-lock.ini"
    ini.write_text(f"""[circus]
endpoint = ipc://{run_dir}/circus.sock
pubsub_endpoint = ipc://{run_dir}/circus-pubsub.sock
stats_endpoint = ipc://{run_dir}/circus-stats.sock
statsd = False

[plugin:flapping]
use = supervision.plugins.Flapping
attempts = 3
window = 10
retry_in = 3
max_retry = 5

[watcher:writer]
cmd = python -m workers.writer
copy_env = True
stderr_stream.class = FileStream
stderr_stream.filename = {log_dir}/writer-circus.log
""")
    # No lock wait: each start is refused at once, as three within the flapping window need.
    daemon = Circusd({**b.env, "TICKSTACK_WRITER_LOCK_WAIT": "0"}, ini, cwd=b.home,
                     log_path=log_dir / "circusd-lock.log", call_timeout=5)
    try:
        daemon.start(wait_active=(), timeout=30, poll=0.2)
        log = log_dir / "writer-circus.log"
        wait_for("three refusals", lambda: log.exists() and log.read_text().count("another writer holds") >= 3,
                 timeout=30)
        wait_for("the flapping plugin to stop the refused writer",
                 lambda: daemon.status().get("writer") == "stopped", timeout=30)
        assert holder_text(writer_a.pid) in log.read_text()
        assert a.stop(writer_a) == 0

        def b_serves() -> bool:
            try:
                with WriterClient(settings=b.settings, deadline=1) as client:
                    return client.ping(timeout=1)["pid"] != writer_a.pid
            except WriterUnavailable:
                return False

        wait_for("the flapping plugin's retry to take over", b_serves, timeout=30)
        assert insert(b, 1) == {"inserted": 1, "duplicates": 0}
        assert_no_password(log.read_text(), postgres_server)
    finally:
        daemon.stop(quit_timeout=30, term_timeout=10)


def test_a_batch_running_when_the_lock_is_lost_is_not_committed(two_homes: tuple[Stack, Stack],
                                                                postgres_server: PostgresServer) -> None:
    """The window the fence leaves: a batch already in the writer's transaction when the lock's
    session ends. Here it waits on a row the test holds (a ``close_trade`` behind a ``FOR UPDATE``),
    the lock's session is ended (``pg_terminate_backend``), the other home's writer takes over and
    serves; then the row is released and the old batch could commit beside the new writer. Each
    batch checks in its own transaction, just before COMMIT, that the lock is still its writer's:
    the close is not committed, its caller gets an error, not an acknowledgement, and the old
    writer exits EXIT_LOCKED."""
    import psycopg

    from db.errors import WriterError
    from tests.test_postgres_health import psycopg_params_of

    a, b = two_homes
    writer_a = a.start_writer(TICKSTACK_LOCK_TIMEOUT_MS="0")  # the batch must still wait when the lock goes
    with WriterClient(settings=a.settings, deadline=20) as client:
        assert insert(a, 1) == {"inserted": 1, "duplicates": 0}
        trade = client.call("open_trade", symbol="BTCUSD", side="buy", size=1.0)["id"]
    owner = psycopg_params_of(a.env["DATABASE_URL"])
    holder = psycopg.connect(owner["conninfo"], password=owner["password"])
    outcome: list[object] = []

    def close() -> None:
        try:
            with WriterClient(settings=a.settings, deadline=8) as c:  # its writer goes: no long retry
                outcome.append(c.call("close_trade", trade_id=trade, price=2.0))
        except WriterError as e:
            outcome.append(e)

    try:
        holder.execute("SELECT id FROM trades WHERE id = %s FOR UPDATE", (trade,))
        closing = threading.Thread(target=close)
        closing.start()
        blocked = ("SELECT count(*) FROM pg_locks WHERE NOT granted AND pid IN (SELECT pid FROM pg_stat_activity "
                   f"WHERE application_name LIKE 'tickstack writer pid {writer_a.pid} %')")
        wait_for("the writer's batch to wait on the held row",
                 lambda: int(postgres_server.psql("postgres", "postgres", blocked).strip()) > 0, timeout=20)
        ended = postgres_server.psql("postgres", "postgres", "SELECT pg_terminate_backend(pid) FROM "
                                     f"pg_stat_activity WHERE application_name = '{holder_text(writer_a.pid)}'")
        assert ended.split() == ["t"], ended
        take_over(b)
        assert insert(b, 2) == {"inserted": 1, "duplicates": 0}  # the new writer serves
    finally:
        holder.rollback()  # the row is free: the old writer's batch goes on to its COMMIT
        holder.close()
    closing.join(40)
    writer_a.wait(20)
    assert writer_a.returncode == EXIT_LOCKED, a.writer_log()[-2000:]
    assert len(outcome) == 1 and isinstance(outcome[0], WriterError), outcome  # never acknowledged
    rows = postgres_server.psql(_database_of(a), "postgres", f"SELECT status FROM trades WHERE id = {trade}")
    assert rows.split() == ["open"], rows
    assert "no longer ours" in a.writer_log() or "lost the PostgreSQL writer lock" in a.writer_log()
    with WriterClient(settings=b.settings, deadline=20) as client:  # the trade is the new writer's to close
        assert client.call("close_trade", trade_id=trade, price=2.0)["id"] == trade


def _database_of(stack: Stack) -> str:
    """The name of ``stack``'s database on the session's server."""
    from sqlalchemy.engine import make_url

    return str(make_url(stack.env["DATABASE_URL"]).database)


def test_the_check_before_commit_asks_the_server_not_the_watching_thread(two_homes: tuple[Stack, Stack],
                                                                         postgres_server: PostgresServer) -> None:
    """``check_held`` in a write transaction: passes while the lock's session holds the lock; once
    that session is ended, raises WriterLocked (and calls on_lost) from what the server says, even
    with the watching thread stopped, so it has not noticed."""
    from sqlalchemy import text

    from db.engine import make_write_engine
    from db.lock import WriterLocked
    from db.server_lock import take_server_lock

    a, _ = two_homes
    lost = threading.Event()
    lock = take_server_lock(a.env["DATABASE_URL"], a.settings.host, on_lost=lost.set)
    assert lock is not None
    engine = make_write_engine(a.settings)
    try:
        with engine.begin() as conn:
            lock.check_held(conn)  # held: nothing raised
            conn.execute(text("SELECT 1"))
        lock._stop.set()  # the watching thread returns without a word
        assert lock._wake is not None
        os.write(lock._wake[1], b"x")
        assert lock._watch is not None
        lock._watch.join(5)
        assert not lock._watch.is_alive()
        postgres_server.psql("postgres", "postgres", f"SELECT pg_terminate_backend({lock.backend_pid})")
        wait_for("the lock's session to end", lambda: str(lock.backend_pid) not in postgres_server.psql(
            "postgres", "postgres", "SELECT pid FROM pg_stat_activity").split())
        assert lock.lost is None and not lost.is_set()
        with pytest.raises(WriterLocked, match="no longer holds the PostgreSQL writer lock"):
            with engine.begin() as conn:
                lock.check_held(conn)
        assert lost.is_set() and lock.lost
    finally:
        engine.dispose()
        lock.release()


def test_a_new_writer_waits_for_a_batch_of_the_old_one_between_its_check_and_its_commit(
        two_homes: tuple[Stack, Stack], postgres_server: PostgresServer) -> None:
    """The fence: a transaction holding it shared (as a batch does from its check to its COMMIT)
    keeps the next writer from taking over until it ends; then the writer serves."""
    from db.server_lock import fence_key
    from tests.test_postgres_health import psycopg_params_of

    a, b = two_homes
    owner = psycopg_params_of(a.env["DATABASE_URL"])
    import psycopg

    batch = psycopg.connect(owner["conninfo"], password=owner["password"])
    try:
        batch.execute("SELECT pg_advisory_xact_lock_shared(%s)", (fence_key(b.settings.host),))
        taking = threading.Thread(target=lambda: b.start_writer())
        taking.start()
        wait_for("the new writer to wait on the fence", lambda: int(postgres_server.psql(
            "postgres", "postgres", "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            f"AND objid = {fence_key(b.settings.host) & 0xFFFFFFFF}").strip()) == 1, timeout=30)
        assert taking.is_alive()  # not serving while the old batch may still commit
    finally:
        batch.rollback()
        batch.close()
    taking.join(30)
    assert not taking.is_alive()
    assert insert(b, 1) == {"inserted": 1, "duplicates": 0}
