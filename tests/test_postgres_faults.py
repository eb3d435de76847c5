"""The writer's connection to the server lost under a batch (issue 11; the analysis gap of issue 10).

A session can end under the writer at any moment (a DBA's ``pg_terminate_backend``, a failover, a
proxy's restart) while the writer's lock session lives on. Here the batch waits on rows a test
transaction holds, so the session is ended exactly while the batch runs, every time:

* the requests of a batch whose connection was lost are *retried* (the batch fails with a retryable
  error, the client sends them again), never failed for good: a lost connection is not the
  request's fault (this held before; the test keeps it so);
* a write that waits on a lock another session holds gives up after ``TICKSTACK_LOCK_TIMEOUT_MS``
  and is answered retryably, so the writer serves the other clients meanwhile;
* the analysis worker's chunk stored in several requests never moves its cursor past a part that
  was not stored, even when that part's batch fails and a later part's succeeds.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import psycopg
import pytest

from db.client import WriterClient
from db.errors import WriterError
from testkit.env import ROOT
from testkit.helpers import DiskUnavailable, fill_disk, small_disk, wait_for
from testkit.postgres import PostgresServer
from testkit.writer import Stack
from tests.test_analysis import MIN, T0, check_bars, insert

#: A server's own promises: run by ``pytest --database postgresql`` (the suite's PostgreSQL run).
pytestmark = pytest.mark.postgres_only


@pytest.fixture
def holder(stack: Stack, postgres_server: PostgresServer) -> Iterator[psycopg.Connection]:
    """A transaction of the test's own on the stack's database (as its owner), rolled back at the end."""
    from sqlalchemy.engine import make_url

    url = make_url(stack.env["DATABASE_URL"])
    conn = psycopg.connect(host=url.query["host"], dbname=url.database, user=url.username, password=url.password)
    try:
        yield conn
    finally:
        conn.rollback()
        conn.close()


def writer_session(server: PostgresServer, pid: int, waiting: bool) -> list[int]:
    """Backend pids of writer ``pid``'s write sessions (not its lock's), those waiting on a lock if ``waiting``."""
    sql = ("SELECT a.pid FROM pg_stat_activity a WHERE a.application_name LIKE "
           f"'tickstack writer pid {pid} on %'")
    if waiting:
        sql += " AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted)"
    return [int(p) for p in server.psql("postgres", "postgres", sql).split()]


def end_the_waiting_write_session(server: PostgresServer, pid: int, ended: set[int]) -> None:
    """Wait until writer ``pid``'s batch waits on the held rows in a session not ``ended`` before (a
    session just ended may still be listed a moment), then end that session and add it to ``ended``."""
    waiting = wait_for("the writer's batch to wait on the held rows",
                       lambda: [p for p in writer_session(server, pid, True) if p not in ended], timeout=30)
    done = server.psql("postgres", "postgres", f"SELECT pg_terminate_backend({waiting[0]})")
    assert done.split() == ["t"], done
    ended.add(waiting[0])


def close_a_held_trade(stack: Stack, holder: psycopg.Connection) -> tuple[int, threading.Thread, list[object]]:
    """Open a trade, hold its row in ``holder``'s transaction (``FOR UPDATE``), and start a client
    closing it at 2.0 in a thread of its own (deadline 60 s); its result or its error lands in the
    list."""
    with WriterClient(settings=stack.settings, deadline=30) as client:
        trade = client.call("open_trade", symbol="BTCUSD", side="buy", size=1.0, entry_price=1.0)["id"]
    holder.execute("SELECT id FROM trades WHERE id = %s FOR UPDATE", (trade,))
    outcome: list[object] = []

    def close() -> None:
        try:
            with WriterClient(settings=stack.settings, deadline=60) as c:
                outcome.append(c.call("close_trade", trade_id=trade, price=2.0))
        except WriterError as e:
            outcome.append(e)

    closing = threading.Thread(target=close)
    closing.start()
    return trade, closing, outcome


def assert_closed_once(stack: Stack, server: PostgresServer, trade: int, outcome: list[object]) -> None:
    assert outcome == [{"id": trade, "exit_price": 2.0, "pnl": 1.0}], outcome
    events = server.psql(_database(stack), "postgres",
                         f"SELECT count(*) FROM trade_events WHERE trade_id = {trade} AND kind = 'closed'")
    assert events.split() == ["1"], events


def test_a_batch_whose_connection_is_lost_is_retried_not_failed(stack: Stack, holder: psycopg.Connection,
                                                               postgres_server: PostgresServer) -> None:
    """A close_trade waits on the trade's row (held by the test). Its write session is ended twice:
    once in the batch's fast run and once in its careful run (a savepoint per request). The request
    is answered once the row is free: closed, once, with no error, and the writer still serves.
    (No lock timeout: here the session must be ended while the batch waits, never timed out.)"""
    writer = stack.start_writer(TICKSTACK_LOCK_TIMEOUT_MS="0")
    trade, closing, outcome = close_a_held_trade(stack, holder)
    ended: set[int] = set()
    for _ in range(2):  # the fast run, then the careful run of the same batch
        end_the_waiting_write_session(postgres_server, writer.pid, ended)
    wait_for("a write session waiting again", lambda: set(writer_session(postgres_server, writer.pid, True)) - ended,
             timeout=30)
    holder.rollback()
    closing.join(60)
    assert_closed_once(stack, postgres_server, trade, outcome)
    assert writer.poll() is None, stack.writer_log()[-2000:]
    assert "rolled back its whole batch" not in stack.writer_log()  # never blamed on the request


def test_a_write_held_up_by_another_session_is_answered_retryably_while_the_writer_serves_on(
        stack: Stack, holder: psycopg.Connection, postgres_server: PostgresServer) -> None:
    """A session of the test holds a trade's row (``FOR UPDATE``) and stays open, as a forgotten
    ``psql`` would. A close_trade of that trade waits at most ``TICKSTACK_LOCK_TIMEOUT_MS`` (500 ms
    here), then is answered retryably (lock_not_available) without running again in its batch's
    careful run, so the writer serves everyone else meanwhile: a call made while the row is held is
    acknowledged. (Before, the batch waited as long as the session lived, and every client with
    it.) The close, resent by its client, is applied once when the row is free."""
    writer = stack.start_writer(TICKSTACK_LOCK_TIMEOUT_MS="500")
    trade, closing, outcome = close_a_held_trade(stack, holder)
    try:
        wait_for("the close to wait on the held row", lambda: writer_session(postgres_server, writer.pid, True),
                 timeout=30)
        with WriterClient(settings=stack.settings, deadline=20) as client:
            assert client.call("audit", actor="test", action="while-held")["id"] >= 1
            wait_for("lock waits answered retryably", lambda: client.stats()["lost_races"] >= 2, timeout=30)
            assert client.stats()["lock_errors"] == 0  # SQLite's "database is locked": a server has none
        assert not outcome, outcome  # still retrying, not failed
    finally:
        holder.rollback()
        closing.join(60)
    assert_closed_once(stack, postgres_server, trade, outcome)
    log = stack.writer_log()
    # The fast run's loser is answered retryably; the careful run does not run it again (and wait again).
    assert "'close_trade' of client" in log and "lost a race with another session, answered retryably: 55P03 " \
        "lock_not_available" in log, log[-3000:]
    assert "op close_trade lost a race" not in log, log[-3000:]
    assert writer.poll() is None


def test_a_writer_that_cannot_get_ready_for_its_first_batch_still_starts_and_serves(
        stack: Stack, holder: psycopg.Connection) -> None:
    """At start the writer has the statements of its record of applied requests compiled, so that
    its first batch does not pay for it. That never stops it nor holds it up: here a session of the
    test holds ``applied_requests`` locked (as a DBA's ``LOCK TABLE`` would) while the writer starts
    with no lock timeout of its own (``TICKSTACK_LOCK_TIMEOUT_MS=0``). Getting ready gives up after
    ``GET_READY_LOCK_MS``, the writer says so and serves, and once the table is free its first batch
    is acknowledged."""
    stack.stop(stack.start_writer())  # the schema, created by a first writer
    holder.execute("LOCK TABLE applied_requests IN ACCESS EXCLUSIVE MODE")
    writer = stack.start_writer(TICKSTACK_LOCK_TIMEOUT_MS="0")  # returns once it answers a ping
    log = stack.writer_log()
    # The driver error's class, not the server's message (which initdb's locale may translate), in one
    # line: SQLAlchemy's text ran on over a second ("(Background on this error at: ...)").
    assert "could not get ready for the first batch, which will (LockNotAvailable: " in log, log[-3000:]
    assert "Background on this error" not in log, log[-3000:]
    holder.rollback()
    with WriterClient(settings=stack.settings, deadline=20) as client:
        assert client.call("audit", actor="test", action="after-the-lock")["id"] >= 1
    assert writer.poll() is None, stack.writer_log()[-2000:]


def test_a_chunk_stored_in_parts_never_moves_the_cursor_past_a_part_that_failed(
        stack: Stack, holder: psycopg.Connection, postgres_server: PostgresServer) -> None:
    """10,500 minutely ticks: one chunk, stored in two requests (over the 10,000 rows one may hold);
    the writer commits one request per batch. Every bar's key is held by an uncommitted insert of
    the test, so the first part waits; its session is ended twice (its batch fails, retryably). The
    second part must not be stored before the first: the cursor would pass bars never stored, and
    the first part's retry would then be refused. After the rows are freed every bar is stored and
    exact, and the cursor is at the last tick."""
    writer = stack.start_writer(TICKSTACK_WRITER_MAX_BATCH="1", TICKSTACK_LOCK_TIMEOUT_MS="0")
    ticks = [{"symbol": "ONE", "ts": T0 + i * MIN + 7, "bid": 100 + math.sin(i / 9) * 5, "ask": 200.0,
              "volume": 1.0} for i in range(10_500)]
    insert(stack, ticks, "minutely")
    with holder.cursor() as cur:  # every bar the chunk makes, inserted and not committed
        for tf, length in (("1m", MIN), ("5m", 5 * MIN), ("1h", 60 * MIN), ("1d", 1440 * MIN)):
            keys = sorted({t["ts"] // length * length for t in ticks})
            cur.executemany("INSERT INTO bars (symbol, timeframe, ts, open, high, low, close, volume, tick_count) "
                            "VALUES ('ONE', %s, %s, 0, 0, 0, 0, 0, 0)", [(tf, ts) for ts in keys])
    worker = subprocess.Popen([sys.executable, "-m", "workers.analysis", "--until-idle"], env=stack.env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ended: set[int] = set()
        for _ in range(2):
            end_the_waiting_write_session(postgres_server, writer.pid, ended)
        wait_for("a write session waiting again",
                 lambda: set(writer_session(postgres_server, writer.pid, True)) - ended, timeout=30)
        holder.rollback()
        out, _ = worker.communicate(timeout=180)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    assert worker.returncode == 0, out[-3000:]
    got = check_bars(stack)  # every bar as the ticks make it; the cursor at the last tick
    assert sum(1 for k in got if k[1] == "1m") == 10_500
    assert writer.poll() is None, stack.writer_log()[-2000:]


def _database(stack: Stack) -> str:
    from sqlalchemy.engine import make_url

    return str(make_url(stack.env["DATABASE_URL"]).database)


def test_a_full_disk_on_the_server_is_storage_full_and_writes_resume_once_space_is_freed(
        stack: Stack, postgres_server: PostgresServer) -> None:
    """The server's disk fills (the ticks table in a tablespace on an 8 MiB tmpfs): a write is
    answered 507 ``storage_full`` with the server's own reason (SQLSTATE 53100), nothing of it
    stored, the writer serves on (a trade still opens: its table has room), and the same write
    succeeds once space is freed, stored once."""
    import pwd

    from webapp import create_app

    try:
        disk_cm = small_disk("8m")
        disk = disk_cm.__enter__()
    except DiskUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"the full-disk tests must run in CI: {e}")
        pytest.skip(f"needs a real small disk: {e}")
    space = f"ts_small_{os.getpid()}"
    database = _database(stack)
    writer = None
    try:
        user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        folder = disk / "pg"
        folder.mkdir(mode=0o700)
        for path in (disk, folder):
            if user is not None:
                os.chown(path, user.pw_uid, user.pw_gid)
        postgres_server.psql("postgres", "postgres", f"CREATE TABLESPACE {space} LOCATION '{folder}'")
        writer = stack.start_writer()
        postgres_server.psql(database, "postgres", f"ALTER TABLE ticks SET TABLESPACE {space}")
        http = create_app("api", stack.settings).test_client()
        auth = {"Authorization": f"Bearer {(stack.home / 'api-token').read_text().strip()}"}
        body = {"ticks": [{"symbol": "BTCUSD", "ts": T0 + i, "bid": 100.0, "ask": 100.5, "source": "full",
                           "seq": i} for i in range(2000)]}
        assert http.post("/api/ticks", json=body, headers=auth).get_json() == {"inserted": 2000, "duplicates": 0}

        filler = disk / "filler"
        fill_disk(filler)
        body = {"ticks": [{**t, "seq": t["seq"] + 2000} for t in body["ticks"]]}
        resp = http.post("/api/ticks", json=body, headers=auth)
        assert resp.status_code == 507, resp.get_data(as_text=True)
        error = resp.get_json()["error"]
        assert error["code"] == "storage_full" and "53100" in error["message"], error
        assert resp.headers["Retry-After"]
        stored = int(postgres_server.psql(database, "postgres", "SELECT count(*) FROM ticks").strip())
        assert stored == 2000  # nothing of the refused write
        trade = http.post("/api/trades", json={"symbol": "BTCUSD", "side": "buy", "size": 1, "entry_price": 1.0},
                          headers=auth)
        assert trade.status_code == 201, trade.get_data(as_text=True)  # the writer serves on
        assert writer.poll() is None, stack.writer_log()[-2000:]

        filler.unlink()
        assert http.post("/api/ticks", json=body, headers=auth).get_json() == {"inserted": 2000, "duplicates": 0}
        assert int(postgres_server.psql(database, "postgres", "SELECT count(*) FROM ticks").strip()) == 4000
        assert "disk is full" in stack.writer_log() and "the disk has space again" in stack.writer_log()
    finally:
        if writer is not None:
            stack.stop(writer)
        postgres_server.psql(database, "postgres", "ALTER TABLE IF EXISTS ticks SET TABLESPACE pg_default")
        postgres_server.psql("postgres", "postgres", f"DROP TABLESPACE IF EXISTS {space}")
        disk_cm.__exit__(None, None, None)


def test_a_readers_idle_in_transaction_timeout_never_ends_a_worker(stack: Stack,
                                                                    postgres_server: PostgresServer) -> None:
    """A DBA's ``idle_in_transaction_session_timeout`` on the readers' role (a common guard of a
    server's vacuum horizon) ended the analysis worker's read session while it folded a chunk or
    waited for the writer's answers, with its read transaction left open: a traceback
    (``IdleInTransactionSessionTimeout``), then a restart by circus. The workers' reads hold no
    transaction between statements on PostgreSQL (each is a snapshot of its own there in any case), so
    even a 1 ms timeout ends none of them."""
    name = _database(stack)
    postgres_server.psql(name, "postgres", f"ALTER ROLE ts_reader IN DATABASE {name} "
                                           "SET idle_in_transaction_session_timeout = '1ms'")
    try:
        stack.start_writer()
        insert(stack, [{"symbol": "ONE", "ts": T0 + i * MIN + 7, "bid": 100 + math.sin(i / 9) * 5, "ask": 200.0,
                        "volume": 1.0} for i in range(3_000)], "minutely")
        worker = subprocess.run([sys.executable, "-m", "workers.analysis", "--until-idle", "--chunk", "500"],
                                env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=180)
        monitor = subprocess.run([sys.executable, "-m", "workers.monitor", "--until-idle"], env=stack.env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=180)
    finally:
        postgres_server.psql(name, "postgres", f"ALTER ROLE ts_reader IN DATABASE {name} "
                                               "RESET idle_in_transaction_session_timeout")
    assert worker.returncode == 0 and "Traceback" not in worker.stderr, worker.stderr[-3000:]
    assert monitor.returncode == 0 and "Traceback" not in monitor.stderr, monitor.stderr[-3000:]
    assert sum(1 for key in check_bars(stack) if key[1] == "1m") == 3_000
