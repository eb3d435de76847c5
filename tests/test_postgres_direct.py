"""``TICKSTACK_DIRECT_WRITES`` on PostgreSQL (issue 11, "the writer steps aside for small writes"):
``WriterClient.call`` runs a transactional op in the caller's own transaction (:mod:`db.direct`),
with the writer's ops, validators, errors and record of applied requests; pipelines and
non-transactional ops still go to the writer. Real server, real writer; nothing mocked."""
from __future__ import annotations

import threading
import time

import psycopg
import pytest
from sqlalchemy.engine import make_url

from db.client import WriterClient
from db.config import load_settings
from db.errors import OpFailed, ValidationError, WriterUnavailable
from testkit.helpers import T0, query, wait_for
from testkit.postgres import PostgresServer
from testkit.writer import Stack

#: A server's own promises: run by ``pytest --database postgresql`` (the suite's PostgreSQL run).
pytestmark = pytest.mark.postgres_only

TICK = {"symbol": "BTCUSD", "ts": T0, "bid": 100.0, "ask": 100.5, "source": "direct", "seq": 1}


def direct_client(stack: Stack, deadline: float = 20, **env: str) -> WriterClient:
    return WriterClient(settings=load_settings({**stack.env, "TICKSTACK_DIRECT_WRITES": "1", **env}),
                        deadline=deadline)


def test_small_writes_go_straight_in_with_the_writers_answers(writer: Stack) -> None:
    """Answers and errors equal the writer's; no writer needs to run for them; pipelines still go
    to the writer."""
    through_writer = WriterClient(settings=writer.settings, deadline=20)
    bad = {**TICK, "bid": 101.0}  # above its ask
    with pytest.raises(ValidationError) as by_writer:
        through_writer.call("insert_ticks", ticks=[bad])
    writer.stop(writer.procs[0])  # from here on, nothing answers at the writer's socket

    with direct_client(writer) as client:
        with pytest.raises(ValidationError) as direct:
            client.call("insert_ticks", ticks=[bad])
        assert str(direct.value) == str(by_writer.value)  # the same validator, the same words
        assert client.call("insert_ticks", ticks=[TICK]) == {"inserted": 1, "duplicates": 0}
        assert client.call("insert_ticks", ticks=[TICK]) == {"inserted": 0, "duplicates": 1}
        trade = client.call("open_trade", symbol="BTCUSD", side="buy", size=1.0)
        assert trade["entry_price"] == 100.5  # a buy opens at the stored ask, as through the writer
        closed = client.call("close_trade", trade_id=trade["id"], price=101.5)
        assert closed == {"id": trade["id"], "exit_price": 101.5, "pnl": 1.0}
        assert client.call("audit", actor="me", action="direct")["id"] >= 1
        with pytest.raises(WriterUnavailable):  # a pipeline is the writer's (group commit), and it is gone
            ticket = client.submit("audit", actor="me", action="pipelined", _deadline=0.5)
            client.wait(ticket)
            ticket.result()
    applied = query(writer.settings, "SELECT count(*) FROM applied_requests WHERE client_id = ?", (client.client_id,))
    assert applied == [(5,)]  # every direct call recorded as applied, as the writer records its requests
    assert query(writer.settings, "SELECT count(*) FROM audit_log WHERE action = 'pipelined'") == [(0,)]


def test_a_session_lost_under_a_direct_write_is_retried_and_applied_once(writer: Stack,
                                                                         postgres_server: PostgresServer) -> None:
    """The call's transaction waits on a table the test holds; its session is ended under it. The
    call retries on a new session with the same (client id, seq) and is applied once. (No lock
    timeout: the session must be ended while it waits, never timed out.)"""
    url = make_url(writer.env["DATABASE_URL"])
    holder = psycopg.connect(host=url.query["host"], dbname=url.database, user=url.username, password=url.password)
    outcome: list[object] = []

    def write() -> None:
        with direct_client(writer, deadline=60, TICKSTACK_LOCK_TIMEOUT_MS="0") as client:
            outcome.append(client.call("audit", actor="me", action="once"))

    try:
        holder.execute("LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE")
        writing = threading.Thread(target=write)
        writing.start()
        waiting_sql = ("SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                       "WHERE NOT l.granted AND a.application_name LIKE 'tickstack %'")
        waiting = wait_for("the direct write to wait on the held table",
                           lambda: postgres_server.psql(url.database, "postgres", waiting_sql).split(), timeout=30)
        postgres_server.psql("postgres", "postgres", f"SELECT pg_terminate_backend({waiting[0]})")
    finally:
        holder.rollback()
        holder.close()
    writing.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], dict), outcome
    assert query(writer.settings, "SELECT count(*) FROM audit_log WHERE action = 'once'") == [(1,)]


def test_a_direct_write_waits_out_a_server_that_is_away_and_gives_up_retryably(
        writer: Stack, postgres_server: PostgresServer) -> None:
    """The server stopped for a few seconds (a restart): a direct write failed at once with OpFailed
    ("connection failed: ... Connection refused"), the API's 500 ``write_failed``, where the module
    promises a retry until the call's deadline (fault hunt on PostgreSQL mode). Now the call made
    while the server is away is applied once it is back; one whose deadline ends first is
    WriterUnavailable (the API's 503), not a failure of the request."""
    outcome: list[object] = []
    first_done, server_gone = threading.Event(), threading.Event()

    def write() -> None:  # one client, in one thread (it is not thread-safe), whose kept session the restart ends
        with direct_client(writer, deadline=60) as client:
            client.call("audit", actor="me", action="before")
            first_done.set()
            server_gone.wait(60)
            outcome.append(client.call("audit", actor="me", action="during"))

    writing = threading.Thread(target=write)
    writing.start()
    assert first_done.wait(30)
    back = threading.Event()
    restart = threading.Thread(target=postgres_server.restart, kwargs={"down_for": 60.0, "until": back})
    restart.start()
    try:
        wait_for("the server to stop", postgres_server.socket_gone, timeout=30)
        with direct_client(writer, deadline=1) as short:
            with pytest.raises(WriterUnavailable):
                short.call("audit", actor="me", action="gave-up")
        server_gone.set()
        time.sleep(2)  # the call retries while the server is away
        assert writing.is_alive() and not outcome, outcome
    finally:
        server_gone.set()
        back.set()
        restart.join(120)
        writing.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], dict), outcome
    assert query(writer.settings, "SELECT action, count(*) FROM audit_log WHERE actor = 'me' GROUP BY action "
                 "ORDER BY action") == [("before", 1), ("during", 1)]


def test_a_direct_write_whose_login_is_refused_fails_at_once_not_retried(writer: Stack) -> None:
    """A wrong password is no server away for a while: retried until the deadline, it held the
    caller (an API thread) that long and then said "unavailable" (review of round 36: psycopg gives
    a failed connection no SQLSTATE). It fails at once with the server's words."""
    wrong = make_url(writer.env["DATABASE_URL"]).set(password="not-the-password").render_as_string(
        hide_password=False)
    with direct_client(writer, deadline=30, DATABASE_URL=wrong) as client:
        with pytest.raises(OpFailed) as refused:
            client.call("audit", actor="me", action="refused")
    assert "password authentication failed" in str(refused.value), refused.value
    assert "not-the-password" not in str(refused.value)


def test_a_stop_bounds_a_direct_write_that_retries_as_it_bounds_a_request_to_the_writer(writer: Stack) -> None:
    """A worker's stop bounds its client (``give_up_by``: it must exit before circus's SIGKILL); a
    direct write retrying a lock wait went on to its own deadline (60 s here), past the stop."""
    url = make_url(writer.env["DATABASE_URL"])
    holder = psycopg.connect(host=url.query["host"], dbname=url.database, user=url.username, password=url.password)
    outcome: list[object] = []
    client = direct_client(writer, deadline=60, TICKSTACK_LOCK_TIMEOUT_MS="200")

    def write() -> None:
        try:
            outcome.append(client.call("audit", actor="me", action="held"))
        except WriterUnavailable as e:
            outcome.append(e)

    try:
        holder.execute("LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE")
        writing = threading.Thread(target=write)
        writing.start()
        time.sleep(1)  # a few of its lock waits (200 ms each) timed out and were retried
        assert writing.is_alive() and not outcome, outcome
        client.give_up_by(1)  # as a stop's signal handler does (Worker._bound_requests)
        writing.join(30)
        gave_up = not writing.is_alive()
    finally:
        holder.rollback()
        holder.close()
        writing.join(60)
        client.close()
    assert gave_up and len(outcome) == 1 and isinstance(outcome[0], WriterUnavailable), outcome
    assert query(writer.settings, "SELECT count(*) FROM audit_log WHERE action = 'held'") == [(0,)]


def test_a_direct_write_records_the_digest_the_writer_compares(writer: Stack) -> None:
    """A request applied in the caller's transaction is recorded with the digest the writer would
    record for it (:func:`db.protocol.request_digest` of the same decoded arguments): the same request
    sent to the writer under its id gets the first answer, a different one is refused, and nothing of
    the second is applied."""
    from db.protocol import encode_request, pack_columns
    from testkit.writer import RawPeer

    ticks = {"symbol": ["BTCUSD"] * 20, "ts": [T0 + i for i in range(20)], "bid": [100.0] * 20,
             "ask": [100.5] * 20, "source": ["direct"] * 20, "seq": list(range(1, 21))}
    with direct_client(writer) as client:
        first = client.call("insert_ticks", ticks=ticks)
        cid, seq = client.client_id, client._seq
    assert first == {"inserted": 20, "duplicates": 0}
    peer = RawPeer(writer.settings.writer_endpoint)
    try:  # packed as the client packed it, and as plain lists: the same request either way
        for args in (pack_columns("insert_ticks", {"ticks": ticks}), {"ticks": ticks}):
            again = peer.ask(encode_request(cid, seq, "insert_ticks", args))
            assert again["ok"] is True and again["result"] == first, again
        other = peer.ask(encode_request(cid, seq, "insert_ticks", {"ticks": {**ticks, "bid": [99.0] * 20}}))
        assert other["ok"] is False and other["error"]["type"] == "RequestIdReused", other
    finally:
        peer.close()
    assert query(writer.settings, "SELECT count(*), min(bid) FROM ticks WHERE source = 'direct'") == [(20, 100.0)]


def test_a_direct_write_on_a_schema_older_than_the_code_waits_for_the_writer_as_for_a_writer(writer: Stack) -> None:
    """A web app restarted on new code before the writer upgraded the schema: the statement names a
    column the database does not have yet. That is the writer's to fix at its start, so the caller
    gets WriterUnavailable (retried until its deadline; the API's 503), not a failed write for good."""
    writer.stop(writer.procs[0])
    url = make_url(writer.env["DATABASE_URL"])
    with psycopg.connect(host=url.query["host"], dbname=url.database, user=url.username, password=url.password,
                         autocommit=True) as conn:
        conn.execute("ALTER TABLE applied_requests DROP COLUMN digest")
    with direct_client(writer, deadline=1) as client, pytest.raises(WriterUnavailable) as waited:
        client.call("audit", actor="me", action="before-the-upgrade")
    assert "the database's schema is older than this code's" in str(waited.value), waited.value
    assert query(writer.settings, "SELECT count(*) FROM audit_log WHERE action = 'before-the-upgrade'") == [(0,)]
