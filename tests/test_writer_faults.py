"""Faults and attacks on the writer (issue 8, points 1, 2, 6 and 7), with real
processes: a real writer, real SQLite (faults injected through SQLite itself:
triggers, another connection holding the write lock, a real full disk on a
tmpfs), real ZeroMQ frames crafted by hand, and the API app on that writer.

Each test holds the writer to the rule "no input of any size or shape, and no
database error, stops it": the bad request gets a clear reply, and the writer
keeps serving everyone else.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq
from sqlalchemy import create_engine

from db.client import LAST_TRY_S, WriterClient
from db.config import load_settings
from db.engine import connect_read_only
from db.errors import CommitFailed, OpFailed, StorageFull, ValidationError, WriterUnavailable
from db.inflight import FIRST_ATTEMPT_TIMEOUT, Ticket
from db.protocol import encode_request
from db.validation import MAX_PRICE, MAX_SIZE
from testkit.env import ROOT, isolated_env, new_home
from testkit.helpers import T0, DiskUnavailable, aborting_disk, backticked, query, wait_for
from testkit.process import peak_rss
from testkit.writer import RawPeer, Stack, spawn

MiB = 1024 * 1024
#: What the writer may take in memory after any single hostile request (it starts near 50 MiB).
RSS_BOUND = 300 * MiB


def request(op: str, args: Any, seq: int = 1, cid: str = "raw-peer") -> bytes:
    return msgpack.packb({"v": 1, "cid": cid, "seq": seq, "op": op, "args": args})


def ticks(n: int, source: str, price: float = 100.0) -> dict[str, list]:
    return {"symbol": ["BTCUSD"] * n, "ts": [T0 + i for i in range(n)], "bid": [price] * n,
            "ask": [price + 0.5] * n, "source": [source] * n, "seq": list(range(n))}


def count(stack: Stack, sql: str, params: tuple = (), settings: Any = None) -> int:
    return query(settings or stack.settings, sql, params)[0][0]


# --- point 1: the envelope and the record of applied requests ------------------------------------------------


class Blocker:
    """A transaction of the test's own that makes the writer's next batch wait: SQLite's write lock
    (``BEGIN IMMEDIATE``), or on a server an exclusive lock on ``table``. ``rollback`` lets it go."""

    def __init__(self, stack: Stack) -> None:
        if stack.settings.database_path is not None:
            self.conn: Any = sqlite3.connect(stack.settings.database_path, timeout=10, isolation_level=None)
        else:
            import psycopg
            from sqlalchemy.engine import make_url

            url = make_url(stack.env["DATABASE_URL"])
            self.conn = psycopg.connect(host=url.query["host"], dbname=url.database, user=url.username,
                                        password=url.password)
        self.sqlite = stack.settings.database_path is not None

    def hold(self, table: str) -> None:
        self.conn.execute("BEGIN IMMEDIATE" if self.sqlite else f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

    def rollback(self) -> None:
        self.conn.rollback()

    def close(self) -> None:
        self.conn.close()


def add_trigger(stack: Stack, definition: str, postgres: tuple[str, str] | None = None) -> None:
    """Start a writer that batches for 0.3 s, then fault-inject through the database itself: a trigger,
    created by a connection of our own (on SQLite the writer holds the write lock only while it
    commits). ``postgres``: ``(table, plpgsql body)`` of the same trigger on a server."""
    stack.start_writer(TICKSTACK_WRITER_BATCH_WAIT="0.3")
    if stack.settings.database_path is None:
        assert postgres is not None, "this fault has no PostgreSQL form"
        table, body = postgres
        engine = create_engine(stack.env["DATABASE_URL"])
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                                     f"{body} RETURN NEW; END $$")
                conn.exec_driver_sql(f"CREATE TRIGGER fault BEFORE INSERT ON {table} FOR EACH ROW "
                                     "EXECUTE FUNCTION fault()")
        finally:
            engine.dispose()
        return
    con = sqlite3.connect(stack.settings.database_path, timeout=10)
    try:
        con.execute(f"CREATE TRIGGER fault {definition}")
        con.commit()
    finally:
        con.close()


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("payload, message", [
    # Nested deeper than Python's repr goes (within the decode limits): the error still names the field.
    (request("audit", {"actor": nested(990), "action": "deep"}), r"^actor: \[\[\[.* is not a name"),
    (msgpack.packb({"v": nested(990), "cid": "raw-peer", "seq": 1, "op": "audit", "args": {}}),
     r"^protocol version \[\[\[.*\]\]\] is not supported"),
    # true is 1 to Python: it was taken as protocol 1.
    (msgpack.packb({"v": True, "cid": "raw-peer", "seq": 1, "op": "audit", "args": {}}),
     r"^protocol version True is not supported \(this writer speaks 1\)$"),
    # A value no set can hold (a list) in a text column of the columns form: its column and index.
    (request("insert_ticks", {"ticks": {**ticks(2, "unhashable"), "symbol": ["BTCUSD", ["A"]]}}),
     r"^ticks\.symbol\[1\]: \['A'\] is not a symbol"),
    (request("insert_ticks", {"ticks": {**ticks(2, "unhashable"), "source": [{}, "feed"]}}),
     r"^ticks\.source\[0\]: \{\} is not a source name"),
    # A NUL character: PostgreSQL's text cannot hold it, so no text field takes it, on either database.
    (request("audit", {"actor": "me", "action": "nul", "detail": "before\x00after"}),
     r"^detail: 'before\\x00after' holds a NUL character"),
], ids=["nested-field", "nested-envelope", "version-true", "unhashable-symbol", "unhashable-source", "nul-in-text"])
def test_a_value_of_any_shape_gets_an_error_naming_its_field(writer: Stack, peer: RawPeer, payload: bytes,
                                                           message: str) -> None:
    """What the value is does not matter to the reply: nested a thousand deep or unhashable, the error
    names the field (and index), as for any other bad value, and nothing is logged as the writer's
    own failure."""
    reply = peer.ask(payload)
    assert reply["ok"] is False and reply["error"]["type"] == "ValidationError", reply
    assert re.search(message, reply["error"]["message"]), reply["error"]["message"]
    assert len(reply["error"]["message"]) < 300
    client = WriterClient(settings=writer.settings, deadline=10)
    assert client.call("audit", actor="me", action="after")["id"] == 1
    assert "Traceback" not in writer.writer_log()


def test_a_client_made_to_send_again_cannot_reuse_an_id_for_a_new_request(writer: Stack) -> None:
    """``WriterClient(client_id=...)`` exists to send an earlier client's unanswered requests again
    under their own ids (``submit(..., _seq=N)``). A new request from it would number from 1 again and
    take the id of one already applied: the writer would answer it with that request's result and
    apply nothing. So it refuses new requests, and only those: a resend, a ping and stats work."""
    first = WriterClient(settings=writer.settings, deadline=10)
    assert first.call("audit", actor="alice", action="first")["id"] == 1
    again = WriterClient(settings=writer.settings, deadline=10, client_id=first.client_id)
    with pytest.raises(ValueError, match=r"only sends earlier requests again .*_seq"):
        again.call("audit", actor="bob", action="second")
    with pytest.raises(ValueError, match=r"only sends earlier requests again"):
        again.submit("open_trade", symbol="BTCUSD", side="buy", size=1.0, entry_price=100.0)
    assert again.ping()["pid"] == writer.procs[0].pid and "batches" in again.stats()
    resent = again.submit("audit", _seq=1, actor="alice", action="first")
    again.wait(resent)
    assert resent.result() == {"id": 1}
    assert count(writer, "SELECT count(*) FROM audit_log") == 1
    assert count(writer, "SELECT count(*) FROM trades") == 0
    # A client that sent a request under a number of its choosing numbers its next ones above it.
    chosen = first.submit("audit", _seq=5, actor="alice", action="chosen")
    first.wait(chosen)
    assert chosen.result() == {"id": 2}
    assert first.call("audit", actor="alice", action="after")["id"] == 3
    # An id the writer refuses (not 1-64 printable characters) is refused at once, saying why, not by
    # each request waiting out its answer: a newline went into the writer's log lines raw (stop 53).
    for bad, said in (("bot\n2026-12-08 ERROR forged", "not printable"), ("", "not 1-64 characters"),
                      ("x" * 65, "not 1-64 characters")):
        with pytest.raises(ValueError, match=said):
            WriterClient(settings=writer.settings, deadline=10, client_id=bad)


@pytest.mark.parametrize("seq", [2**63, 2**64 - 1])
def test_a_seq_the_database_cannot_store_is_refused_and_the_writer_serves_on(writer: Stack, peer: RawPeer,
                                                                             seq: int) -> None:
    proc = writer.procs[0]
    reply = peer.ask(request("audit", {"actor": "me", "action": "huge-seq"}, seq=seq))
    assert reply["ok"] is False and reply["error"]["type"] == "ValidationError", reply
    assert "below 2^63" in reply["error"]["message"]
    client = WriterClient(settings=writer.settings, deadline=10)
    assert client.call("audit", actor="me", action="after")["id"] == 1
    assert proc.poll() is None and client.ping()["pid"] == proc.pid
    assert count(writer, "SELECT count(*) FROM audit_log WHERE action = 'huge-seq'") == 0


def test_a_request_whose_record_cannot_be_stored_fails_alone_and_leaves_nothing(stack: Stack) -> None:
    """The applied-request record is written in the request's own savepoint: when it fails, the request's
    effects go with it, and the requests batched with it commit."""
    add_trigger(stack, "BEFORE INSERT ON applied_requests WHEN NEW.client_id = 'no-record' "
                       "BEGIN SELECT RAISE(ABORT, 'no record for you'); END",
                postgres=("applied_requests", "IF NEW.client_id = 'no-record' THEN "
                                              "RAISE EXCEPTION 'no record for you'; END IF;"))
    peer = RawPeer(stack.settings.writer_endpoint)
    client = WriterClient(settings=stack.settings, deadline=20)
    try:
        with client.pipeline() as pipe:
            first = pipe.submit("audit", actor="me", action="first")
            peer.send(request("audit", {"actor": "me", "action": "unrecorded"}, cid="no-record"))
            time.sleep(0.05)
            last = pipe.submit("audit", actor="me", action="last")
        reply = peer.recv()
    finally:
        peer.close()
    assert reply["ok"] is False and reply["error"]["type"] == "OpFailed", reply
    assert "no record for you" in reply["error"]["message"]
    assert first.error is None and last.error is None
    assert count(stack, "SELECT count(*) FROM audit_log WHERE action = 'unrecorded'") == 0
    assert count(stack, "SELECT count(*) FROM audit_log WHERE action IN ('first', 'last')") == 2


@pytest.mark.sqlite_only("tests/test_postgres_faults.py::test_a_batch_whose_connection_is_lost_is_retried_not_failed")
def test_a_request_that_rolls_back_the_whole_transaction_fails_alone(stack: Stack) -> None:
    """A database error that takes the batch's transaction with it (here a trigger's RAISE(ROLLBACK)) fails
    the request that caused it, at once and for good; the rest of its batch runs again and commits.
    PostgreSQL has no RAISE(ROLLBACK): there the error that takes a transaction with it is a lost
    connection, which is nobody's request's fault and is retried (the counterpart)."""
    add_trigger(stack, "BEFORE INSERT ON audit_log WHEN NEW.action = 'poison' "
                       "BEGIN SELECT RAISE(ROLLBACK, 'poisoned'); END")
    client = WriterClient(settings=stack.settings, deadline=20)
    before = client.stats()
    with client.pipeline() as pipe:
        good = [pipe.submit("audit", actor="me", action=f"good-{i}") for i in range(3)]
        bad = pipe.submit("audit", actor="me", action="poison")
        good += [pipe.submit("audit", actor="me", action=f"good-{i}") for i in range(3, 6)]
    assert isinstance(bad.error, OpFailed) and "poisoned" in str(bad.error), bad.error
    # Failed once, for good: its batch was run carefully once, not again and again until its deadline.
    after = client.stats()
    ran = {key: after[key] - before[key] for key in ("careful_batches", "requests_failed", "requests_ok")}
    assert ran == {"careful_batches": 1, "requests_failed": 1, "requests_ok": 6}, ran
    assert [t.error for t in good] == [None] * 6
    assert count(stack, "SELECT count(*) FROM audit_log WHERE action LIKE 'good-%'") == 6
    assert client.ping()["pid"] == stack.procs[0].pid


# --- point 7: memory bounded in bytes ----------------------------------------------------------------------------


def empty_maps_flat(size: int) -> bytes:
    """One msgpack array of ``size - 5`` empty maps: one byte each on the wire, ~72 bytes each decoded."""
    n = size - 5
    return b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n


def empty_maps_nested(size: int) -> bytes:
    """The same inside a request envelope, as arrays of 40,000 empty maps (each within any per-array limit)."""
    inner = b"\xdd" + (40_000).to_bytes(4, "big") + b"\x80" * 40_000
    k = (size - 200) // len(inner)
    args = b"\x81\xa1x" + b"\xdd" + k.to_bytes(4, "big") + inner * k
    head = msgpack.packb({"v": 1, "cid": "hostile", "seq": 1, "op": "audit"})
    return b"\x85" + head[1:] + b"\xa4args" + args


def test_a_16_mib_request_of_empty_maps_leaves_the_writer_small_and_serving(writer: Stack, peer: RawPeer) -> None:
    proc = writer.procs[0]
    limit = writer.settings.writer_max_message
    for payload, message in ((empty_maps_flat(limit), "over the decode limits"),
                             (empty_maps_nested(limit), "items")):
        assert len(payload) <= limit
        reply = peer.ask(payload, timeout=60)
        client = WriterClient(settings=writer.settings, deadline=30)
        started = time.monotonic()
        assert client.call("audit", actor="me", action="after-hostile")["id"] >= 1
        waited = time.monotonic() - started
        rss, peak = psutil.Process(proc.pid).memory_info().rss, peak_rss(proc.pid)
        print(f"{message}: rss {rss / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, good call {waited * 1000:.0f} ms")
        assert rss < RSS_BOUND and peak < RSS_BOUND, f"writer grew to {rss / MiB:.0f} MiB (peak {peak / MiB:.0f})"
        assert reply["ok"] is False and message in reply["error"]["message"], reply["error"]
    assert proc.poll() is None


def test_a_request_over_the_decode_or_size_limits_is_answered_to_its_client_with_the_reason(writer: Stack,
                                                                                            peer: RawPeer) -> None:
    """A batch of 40,001 ticks (over the 40,000 items an array may hold): the writer said why, in a
    reply without the request's seq (it had not decoded the request), which the client matched to
    none of its requests. It sent the request again and again (13 "undecodable request" lines in
    the fault hunt) until its deadline, then said "no answer from the writer ... it may or may not
    have been applied". The writer now reads the seq from the envelope's head, and the client
    raises the reason at once. The same for a frame over ``TICKSTACK_WRITER_MAX_MESSAGE`` from a
    client whose limit is not the writer's (``WriterClient`` refuses it before sending)."""
    tick = {"symbol": "BTCUSD", "ts": T0, "bid": 100.0, "ask": 100.5}
    with WriterClient(settings=writer.settings, deadline=20) as client:
        with pytest.raises(ValidationError, match=r"over the decode limits: 40001 exceeds max_array_len"):
            client.call("insert_ticks", ticks=[tick] * 40_001)
        assert client.call("audit", actor="me", action="after")["id"] >= 1  # and the writer serves on
    limit = writer.settings.writer_max_message
    oversize = msgpack.packb({"v": 1, "cid": "other-limit", "seq": 5, "op": "audit",
                              "args": {"actor": "me", "action": "big", "detail": "x" * limit}})
    reply = peer.ask(oversize, timeout=20)
    assert reply["seq"] == 5 and reply["ok"] is False, reply
    assert f"is over the limit of {limit} (TICKSTACK_WRITER_MAX_MESSAGE)" in reply["error"]["message"], reply
    log = writer.writer_log()
    assert log.count("undecodable request") == 1, log[-3000:]  # one request, sent once


def test_a_flood_of_undecodable_requests_is_answered_each_and_logged_a_few_lines_a_period(writer: Stack,
                                                                                          peer: RawPeer) -> None:
    """3,000 undecodable frames from one local program were 3,000 WARNING lines: with circusd stopped
    (it reads the writer's stderr) they filled the pipe, and the IO thread waited in the logging call,
    answering no one (fault hunt, round 40). Each is still answered; at most 10 lines a period are
    logged (workers.seldom), the next line counting what was not; when the flood has stopped, a line
    says how many were not logged once the period is over (before, the count was never said)."""
    for _ in range(300):
        peer.send(b"\xc1" * 40)
    replies = [peer.recv(timeout=20) for _ in range(300)]
    assert all(r["ok"] is False and r["error"]["type"] == "ValidationError" for r in replies), replies[:3]
    log = writer.writer_log()
    assert 1 <= log.count("undecodable request (40 bytes)") <= 10, log[-3000:]
    assert writer.procs[0].poll() is None
    wait_for("the count of the lines not logged", lambda: "more like it before it, not logged" in writer.writer_log(),
             timeout=25)
    unsaid = [int(n) for n in re.findall(r"and (\d+) more like it", writer.writer_log())]
    assert writer.writer_log().count("undecodable request (40 bytes)") + sum(unsaid) == 300, unsaid


def test_a_client_sending_requests_slow_to_decode_does_not_hold_the_others_answers(writer: Stack,
                                                                                  peer: RawPeer) -> None:
    """Each request within every limit, each slow to decode (600,000 short strings, tens of ms): the
    IO thread read up to 1,000 frames a round and sent the commit thread's answers, committed its own
    small batches and beat the watchdog's heart only between rounds. One client streaming such
    requests held every other client's answers for as long as it streamed (45 to 56 s in the fault
    hunt; past the watchdog's 20 s under circus). A round now ends after a few milliseconds, so
    another client's write is answered while that stream is still being read."""
    hog = 60
    frames = [msgpack.packb({"v": 1, "cid": "hog", "seq": i + 1, "op": "audit",
                             "args": {"actor": "hog", "action": "slow", "detail": [["ab"] * 40_000] * 15}})
              for i in range(hog)]
    for frame in frames:
        peer.send(frame)
    with WriterClient(settings=writer.settings, deadline=120) as client:
        assert client.call("audit", actor="me", action="between")["id"] >= 1
    answered = 0
    while peer.waiting(0):  # what the hog had been answered when the other client was
        peer.recv()
        answered += 1
    assert answered < hog // 2, f"the other client waited for {answered} of the hog's {hog} requests"
    # And the hog is answered too, each with the reason, or told the queue is full (its requests are
    # each tens of MB decoded: on PostgreSQL, where every batch goes to the commit thread, the queue's
    # byte budget fills, and busy is the writer's answer to that; a fresh clone's make test, round 42).
    reasons = 0
    while answered < hog and peer.waiting(120):
        answer = peer.recv()
        assert answer.get("busy") or "detail" in answer["error"]["message"], answer
        reasons += not answer.get("busy")
        answered += 1
    assert answered == hog and reasons > 0, (answered, reasons)


def test_answers_a_client_does_not_read_are_bounded_per_connection(writer: Stack) -> None:
    """Clients that send and never read their answers: ZeroMQ kept up to 100,000 answers a connection
    in the writer (``SNDHWM``), about 50 MB for each such client of ``stats`` (+495 MB for ten in the
    fault hunt, most of it never given back). It keeps :data:`workers.writer.REPLY_BACKLOG_MESSAGES`,
    more than a :class:`db.client.Pipeline` can have in flight; past that an answer is dropped, and
    a client that reads after all gets it by asking again (its request is recorded, or never was)."""
    proc = writer.procs[0]
    ctx = zmq.Context()
    hogs, per_hog = 8, 40_000
    frames = [request("stats", {}, seq=i + 1, cid="no-reader") for i in range(per_hog)]
    socks = []
    try:
        before = peak_rss(proc.pid)
        for _ in range(hogs):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.RCVHWM, 1)  # the answers stay in the writer, as for a client that stopped
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(writer.settings.writer_endpoint)
            socks.append(sock)
        for sock in socks:
            for frame in frames:
                sock.send(frame)
            sock.send(msgpack.packb({"v": 99}))  # malformed, counted: read after every frame before it
        with WriterClient(settings=writer.settings, deadline=120) as client:
            wait_for("the writer to read every request", lambda: client.stats()["malformed"] >= hogs, timeout=120)
            grown = peak_rss(proc.pid) - before
            assert client.call("audit", actor="me", action="after")["id"] >= 1
        print(f"the writer grew by {grown / MiB:.0f} MiB")
        assert grown < 100 * MiB, f"the writer grew by {grown / MiB:.0f} MiB holding answers nobody reads"
    finally:
        for sock in socks:
            sock.close()
        ctx.term()


def test_the_queue_is_bounded_in_bytes_busy_beyond(stack: Stack) -> None:
    """While the commit thread waits for the database, large requests are queued only up to the byte budget;
    beyond it they are answered busy at once, and the writer's memory stays bounded."""
    # No lock timeout on either database: the writer must wait on the held lock, never give up on it.
    proc = stack.start_writer(TICKSTACK_WRITER_MAX_MESSAGE=str(MiB), TICKSTACK_BUSY_TIMEOUT_MS="60000",
                              TICKSTACK_LOCK_TIMEOUT_MS="0")
    # About 840 KB on the wire and 16 MB decoded each (280,000 two-letter strings).
    payloads = [request("audit", {"actor": "me", "action": "big", "detail": [["ab"] * 40_000] * 7}, seq=i + 1)
                for i in range(30)]
    assert all(len(p) < MiB for p in payloads)
    blocker = Blocker(stack)
    peer = RawPeer(stack.settings.writer_endpoint)
    replies: list[dict] = []
    try:
        # The writer's next batch waits for this lock: SQLite's at BEGIN; on a server at the batch's
        # first statement, the look-up of a new client's requests (before any request is validated).
        blocker.hold("applied_requests")
        for p in payloads:
            peer.send(p)
        # All but the one the commit thread holds are answered busy while it waits.
        deadline = time.monotonic() + 20
        while len(replies) < len(payloads) - 1 and peer.waiting(deadline - time.monotonic()):
            replies.append(peer.recv())
        held = psutil.Process(proc.pid).memory_info().rss
        stats = WriterClient(settings=stack.settings, deadline=10).stats()
    finally:
        blocker.rollback()
        blocker.close()
    try:
        while len(replies) < len(payloads):
            replies.append(peer.recv(timeout=60))
    finally:
        peer.close()
    busy = [r for r in replies if r.get("busy")]
    print(f"busy {len(busy)} of {len(payloads)}, rss while blocked {held / MiB:.0f} MiB, "
          f"queue {stats['queue_depth']} requests / {stats.get('queue_bytes')} bytes")
    assert len(busy) == len(payloads) - 1, f"{len(busy)} busy: the queue took requests beyond its byte budget"
    assert stats["queue_bytes"] <= 16 * MiB + 64 * MiB
    assert held < RSS_BOUND and peak_rss(proc.pid) < RSS_BOUND
    others = [r for r in replies if not r.get("busy")]
    assert others and all(r["error"]["type"] == "ValidationError" for r in others)  # detail must be text
    assert WriterClient(settings=stack.settings, deadline=10).call("audit", actor="me", action="after")["id"] == 1


def test_frames_far_over_the_limit_from_many_peers_are_never_read_into_the_writers_memory(stack: Stack) -> None:
    """ZeroMQ read frames of up to 4 x ``TICKSTACK_WRITER_MAX_MESSAGE`` whole, up to 1,000 a peer ahead
    of the writer, before the writer answered each one "over the limit": 8 peers sending 60 MiB frames
    took a writer of 16 MiB messages from 77 MB to 0.6-2.4 GB. Now a frame more than
    ``MAX_MESSAGE_SLACK`` over the limit closes its peer's connection unread."""
    limit = 4 * MiB
    proc = stack.start_writer(TICKSTACK_WRITER_MAX_MESSAGE=str(limit))
    client = WriterClient(settings=stack.settings, deadline=30)
    assert client.call("audit", actor="me", action="before")["id"] == 1
    before = peak_rss(proc.pid)
    ctx = zmq.Context()
    try:
        big = b"\x00" * (3 * limit)
        peers = []
        for _ in range(8):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(stack.settings.writer_endpoint)
            peers.append(sock)
        frames = 16
        for _ in range(frames):
            for sock in peers:
                sock.send(big, copy=False)
        assert client.call("audit", actor="me", action="after")["id"] == 2
        # Until every frame is answered ("over the limit": each was read whole), or none was for 5 s
        # (none is read: their peers' connections were closed at the first).
        poller = zmq.Poller()
        for sock in peers:
            poller.register(sock, zmq.POLLIN)
        answered = 0
        while answered < frames * len(peers):
            ready = dict(poller.poll(5000))
            if not ready:
                break
            for sock in ready:
                sock.recv()
                answered += 1
        grew = peak_rss(proc.pid) - before
        print(f"writer's peak grew by {grew / MiB:.0f} MiB; {answered} frames answered")
        assert grew < 8 * limit, f"the writer held {grew / MiB:.0f} MiB of frames it refuses"
        assert answered == 0  # none was read: each peer's connection closed at its first
    finally:
        ctx.destroy(linger=0)
    assert client.call("audit", actor="me", action="later")["id"] == 3 and proc.poll() is None


def test_an_oversize_request_gets_a_clear_error_not_silence(writer: Stack, peer: RawPeer) -> None:
    limit = writer.settings.writer_max_message
    # Over the limit, within MAX_MESSAGE_SLACK of it: the writer answers.
    reply = peer.ask(b"\x00" * (limit + 10), timeout=60)
    assert reply["ok"] is False and "over the limit" in reply["error"]["message"]
    # A client never sends what the writer cannot take: a 100 MiB request fails at once, saying why.
    client = WriterClient(settings=writer.settings, deadline=5)
    # The client's words, not the writer's ("over the limit"), nor a deadline's WriterUnavailable: never sent.
    with pytest.raises(ValidationError, match="over the writer's limit"):
        client.call("audit", actor="me", action="big", detail="x" * (100 * MiB))
    assert client.call("audit", actor="me", action="after")["id"] == 1


def test_a_request_over_the_writers_limit_from_a_client_with_a_larger_one_is_refused_saying_so(stack: Stack) -> None:
    """A client whose ``TICKSTACK_WRITER_MAX_MESSAGE`` is larger than the writer's (another shell's
    environment) sends what the writer closes its connection on, unread: it waited its whole deadline,
    then said the request "may or may not have been applied". Now, once the answer is late, it asks
    the writer's limit (the ping says it) and fails the request with both limits; nothing is applied,
    and the client serves on."""
    stack.start_writer(TICKSTACK_WRITER_MAX_MESSAGE=str(MiB))
    assert WriterClient(settings=stack.settings).ping()["max_message"] == MiB
    larger = load_settings({**stack.env, "TICKSTACK_WRITER_MAX_MESSAGE": str(16 * MiB)})
    client = WriterClient(settings=larger, deadline=20)
    assert client.call("audit", actor="me", action="before")["id"] == 1
    with pytest.raises(ValidationError) as refused:
        client.call("audit", actor="me", action="big", detail="x" * (3 * MiB))
    said = str(refused.value)
    assert f"over the writer's limit of {MiB}" in said and f"this client's is {16 * MiB}" in said, said
    assert "nothing of it was applied" in said, said
    # Within the slack the writer answers it itself, as before; and the client goes on.
    with pytest.raises(ValidationError, match="over the limit of"):
        client.call("audit", actor="me", action="big", detail="x" * (MiB + 1000))
    assert client.call("audit", actor="me", action="after")["id"] == 2


def test_a_writer_restarted_with_a_larger_limit_is_not_judged_by_the_limit_an_earlier_one_said(stack: Stack) -> None:
    """The limit a client learnt from a writer's ping is that writer's: the writer restarted with a larger
    TICKSTACK_WRITER_MAX_MESSAGE (the fix the refusal itself says) takes the request. A late answer (the
    writer paused, here by SIGSTOP) must not make the client refuse it with the old limit, saying "nothing
    of it was applied", while the writer reads and applies it (a review: the limit was kept for ever)."""
    first = stack.start_writer(TICKSTACK_WRITER_MAX_MESSAGE=str(64 * 1024))
    larger = load_settings({**stack.env, "TICKSTACK_WRITER_MAX_MESSAGE": str(16 * MiB)})
    client = WriterClient(settings=larger, deadline=30)
    with pytest.raises(ValidationError, match=f"over the writer's limit of {64 * 1024}"):
        client.call("insert_ticks", ticks=ticks(10_000, "big"))
    assert stack.stop(first) == 0
    second = stack.start_writer(TICKSTACK_WRITER_MAX_MESSAGE=str(16 * MiB))
    assert client.call("audit", actor="me", action="before")["id"] == 1
    # Paused past the request's first attempt (1 s), then let go: its answer is late, not refused.
    second.send_signal(signal.SIGSTOP)
    resumed = threading.Timer(3.0, second.send_signal, (signal.SIGCONT,))
    resumed.start()
    try:
        outcome: Any = client.call("insert_ticks", ticks=ticks(10_000, "big-again"))
    except ValidationError as e:
        outcome = e
    finally:
        resumed.join()
        second.send_signal(signal.SIGCONT)
    assert client.call("audit", actor="me", action="after")["id"] == 2  # the ticks, if sent, came before it
    applied = count(stack, "SELECT COUNT(*) FROM ticks WHERE source = 'big-again'")
    assert not (isinstance(outcome, ValidationError) and applied), f"said {outcome}, yet {applied} ticks were applied"
    assert applied == 10_000 and outcome == {"inserted": 10_000, "duplicates": 0}, outcome


def test_a_writer_that_does_not_answer_is_asked_its_limit_once_per_silence_not_once_per_request(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several big requests in flight (a pipeline) to a writer that answers nothing (paused, here by
    SIGSTOP): the ping asking its limit waits its second and fails. It was asked again for each late
    request, one after the other, in one pump: the caller was held a second per request, past every
    request's deadline and a producer's stop bound (give_up_by) (a review)."""
    writer = stack.start_writer(TICKSTACK_WRITER_MAX_MESSAGE=str(64 * 1024))
    larger = load_settings({**stack.env, "TICKSTACK_WRITER_MAX_MESSAGE": str(16 * MiB)})
    client = WriterClient(settings=larger, deadline=4)
    assert client.call("audit", actor="me", action="before")["id"] == 1
    pings: list[float] = []
    real_ping = WriterClient.ping

    def counted(self: WriterClient, timeout: float = 1.0) -> dict[str, Any]:
        pings.append(timeout)
        return real_ping(self, timeout)

    monkeypatch.setattr(WriterClient, "ping", counted)  # counts them; the pings are real
    writer.send_signal(signal.SIGSTOP)
    try:
        sent = [client.submit("insert_ticks", ticks=ticks(10_000, f"big-{i}")) for i in range(6)]
        for ticket in sent:
            client.wait(ticket)
    finally:
        writer.send_signal(signal.SIGCONT)
    for ticket in sent:
        with pytest.raises(WriterUnavailable):
            ticket.result()
    # At most one per silence: the first late one at 1 s, the next at 3 s, then the deadline (4 s).
    assert 1 <= len(pings) <= 2, pings


# --- point 6: bounded sizes, prices and distances; no NaN or Infinity out ------------------------------------------


@pytest.mark.parametrize("args, message", [
    ({"size": 1e305}, "size: 1e+305 must be > 0 and < 1e+12"),
    ({"size": MAX_SIZE}, "size: 1000000000000.0 must be > 0 and < 1e+12"),
    ({"trailing_distance": 1e300}, "trailing_distance: 1e+300 must be > 0 and < 1e+12"),
    ({"breakeven_trigger": MAX_PRICE}, "breakeven_trigger: 1000000000000.0 must be > 0 and < 1e+12"),
    ({"entry_price": 1e300}, "entry_price: 1e+300 is not a price (must be > 0 and < 1e+12)"),
])
def test_trade_sizes_and_distances_are_bounded(writer: Stack, args: dict, message: str) -> None:
    client = WriterClient(settings=writer.settings, deadline=10)
    trade = {"symbol": "BTCUSD", "side": "buy", "size": 1.0, "entry_price": 100.0, **args}
    with pytest.raises(ValidationError, match=re.escape(message)):
        client.call("open_trade", **trade)
    assert count(writer, "SELECT count(*) FROM trades") == 0


@pytest.mark.parametrize("op, args", [
    ("put_indicators", {"values": [{"symbol": "BTCUSD", "timeframe": "1m", "name": "sma_20", "ts": T0,
                                    "value": 1e300}]}),
    ("record_samples", {"samples": [{"ts": T0, "name": "x", "value": -1e300}]}),
    ("upsert_bars", {"bars": [{"symbol": "BTCUSD", "timeframe": "1m", "ts": T0, "open": 1.0, "high": 1.0,
                               "low": 1.0, "close": 1.0, "volume": 1e300}]}),
])
def test_measured_values_are_bounded_so_their_sums_stay_finite(writer: Stack, op: str, args: dict) -> None:
    with pytest.raises(ValidationError, match="1e\\+30"):
        WriterClient(settings=writer.settings, deadline=10).call(op, **args)


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant} in the response")

    return json.loads(text, parse_constant=refuse)


def test_the_api_refuses_a_trade_whose_pnl_could_overflow_and_emits_only_finite_json(
        writer: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    from webapp import create_app

    monkeypatch.delenv("TICKSTACK_API_TOKEN", raising=False)
    app = create_app("api", load_settings(writer.env))
    http = app.test_client()
    auth = {"Authorization": f"Bearer {(writer.home / 'api-token').read_text().strip()}"}
    resp = http.post("/api/trades", json={"symbol": "BTCUSD", "side": "buy", "size": 1e305, "entry_price": 100.0},
                     headers=auth)
    assert resp.status_code == 400 and "size" in resp.get_json()["error"]["message"], resp.get_data(as_text=True)
    # The largest trade the bounds allow, closed at the far end of the price range: a large, finite P&L.
    big = http.post("/api/trades", json={"symbol": "BTCUSD", "side": "sell", "size": MAX_SIZE * 0.999,
                                         "entry_price": MAX_PRICE * 0.999}, headers=auth)
    assert big.status_code == 201, big.get_data(as_text=True)
    trade_id = big.get_json()["id"]
    closed = http.post(f"/api/trades/{trade_id}/close", json={"price": 1e-9}, headers=auth)
    assert closed.status_code == 200, closed.get_data(as_text=True)
    listed = strict_json(http.get("/api/trades").get_data(as_text=True))
    assert [t["pnl"] for t in listed["trades"] if t["id"] == trade_id] == [pytest.approx(MAX_SIZE * MAX_PRICE,
                                                                                         rel=0.01)]
    strict_json(http.get(f"/api/trades/{trade_id}").get_data(as_text=True))


# --- point 2: a full disk is a state, not a crash ---------------------------------------------------------------


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the full-disk test must run in CI: {reason}")
    pytest.skip(f"full-disk test skipped: {reason}")


@pytest.fixture
def small_disk(stack: Stack) -> Iterator[Path]:
    """A 4 MiB tmpfs (mode 0700) for the database; unmounted (by path) after the test's writers are stopped."""
    if os.geteuid() != 0:
        _unavailable("mounting a tmpfs needs root")
    folder = Path(tempfile.mkdtemp(prefix="ts-disk-"))
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        folder.rmdir()
        _unavailable(f"mount -t tmpfs failed: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        for proc in stack.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        folder.rmdir()


def fill(path: Path) -> int:
    """Write ``path`` until the disk is full; returns its size."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for chunk in (65536, 4096, 1):
            while True:
                try:
                    written += f.write(b"\0" * chunk)
                except OSError:  # ENOSPC
                    break
    return written


@pytest.mark.sqlite_only("tests/test_writer_faults.py::test_a_full_disk_is_answered_storage_full_and_writes_resume_"
                         "when_space_returns")
def _writer_answering_locked_retryably(stack: Stack) -> tuple[subprocess.Popen, WriterClient, Blocker, Any]:
    """A writer that answers "database is locked" (CommitFailed, retryable) within 0.1 s while the
    :class:`Blocker` holds a table's lock, a client that has written once, and a pipeline of one."""
    proc = stack.start_writer(TICKSTACK_BUSY_TIMEOUT_MS="100")
    client = WriterClient(settings=stack.settings, deadline=120)
    client.call("audit", actor="me", action="before")
    return proc, client, Blocker(stack), client.pipeline(window=1)


def test_a_request_in_flight_at_its_deadline_is_not_said_unapplied_for_an_earlier_retryable_answer(
        stack: Stack) -> None:
    """A request answered retryably (here "database is locked": another program holds SQLite's write
    lock past the writer's busy_timeout; a full disk is answered StorageFull the same way) is sent
    again, and its deadline (or give_up_by's bound) can pass while that resend is unanswered: the
    writer has it, and applies it once the lock is let go. The client said "not applied by the
    writer ... its last answer: CommitFailed" (and on a full disk raised StorageFull, "nothing of
    the request was written", which the API serves as 507): an answer about an earlier send, not the
    one in flight. A caller told "not applied" sends it again as a new request, and it is applied
    twice. What it must say is what it knows: no answer to its last send, so it may or may not have
    been applied (and a resend under its id applies it at most once)."""
    proc, client, blocker, pipe = _writer_answering_locked_retryably(stack)
    stopped = False
    try:
        blocker.hold("audit_log")
        ticket = pipe.submit("audit", actor="me", action="late")
        # The writer answers it retryably (the lock is held past its busy_timeout); the client sends it again.
        # Stopped between an answer and the resend it backs off for (only collect sends): stopped with a
        # resend in flight, the writer may have answered it before the stop, an answer read at a time no
        # wait of ours can bound (the test read it in a 0.3 s it assumed enough).
        while (ticket.last_error is None or ticket.awaiting) and not ticket.done:
            pipe.collect(0.005)
        assert isinstance(ticket.last_error, CommitFailed) and not ticket.done
        os.kill(proc.pid, signal.SIGSTOP)  # the writer holds its resend (a stall, a swapped-out host)
        stopped = True
        blocker.rollback()  # the lock is free: the writer commits what it holds once it runs
        while not ticket.awaiting:  # sent again, and not answered: the writer has it
            assert not ticket.done, ticket.error
            pipe.collect(0.05)
        assert ticket.awaiting and ticket.last_error is not None and not ticket.done
        client.give_up_by(0)  # the deadline passes now, with that resend unanswered
        while not ticket.done:
            pipe.collect(0.05)
        error = ticket.error
        told = f"{type(error).__name__}: {error}"
        os.kill(proc.pid, signal.SIGCONT)
        stopped = False
        # Stored: the request the client gave up on is applied, once.
        wait_for("the writer to apply the resend it held",
                 lambda: count(stack, "SELECT count(*) FROM audit_log WHERE action = 'late'") == 1)
    finally:
        if stopped:
            os.kill(proc.pid, signal.SIGCONT)
        blocker.close()
    # The writer's earlier answer, quoted, may say "not applied" of its send.
    _said_maybe_applied(error, told, quoted_after="its answer to an earlier send: ")
    # A resend under its id is answered with the first result, and applies nothing more.
    _resent_under_its_id_applies_once(stack, client, ticket)
    assert stack.stop(proc) == 0


def _said_maybe_applied(error: BaseException, told: str, quoted_after: str) -> None:
    """The client's own words (before ``quoted_after``, where the writer's answer is quoted) say the
    request may or may not have been applied, never "not applied"; the quoted answer is still said,
    as what it was (CommitFailed)."""
    assert isinstance(error, WriterUnavailable) and not isinstance(error, StorageFull), told
    ours, _, answer = told.partition(quoted_after)
    assert "not applied" not in ours and "may or may not have been applied" in ours, told
    assert answer.startswith("CommitFailed"), told


def _resent_under_its_id_applies_once(stack: Stack, client: WriterClient, ticket: Ticket) -> None:
    """The "late" audit of ``ticket``, sent again under its id by a client with ``client``'s id, is
    answered with a result and stored once in all."""
    with WriterClient(settings=stack.settings, client_id=client.client_id, deadline=30) as again:
        resent = again.submit("audit", _seq=ticket.seq, actor="me", action="late")
        again.wait(resent)
        assert resent.result()["id"] > 0
    assert count(stack, "SELECT count(*) FROM audit_log WHERE action = 'late'") == 1


def test_a_request_once_unanswered_is_not_said_unapplied_for_a_later_retryable_answer(stack: Stack) -> None:
    """A send the writer never answered (a silence: the writer stopped, restarting, or its answer lost
    with the connection the client then replaced) may have been applied. The writer's later retryable
    answers are about later sends, and some are given without a look at its record of applied requests
    (a writer refusing writes, its database file removed, answers CommitFailed at once; a batch whose
    commit fails answers all of its requests alike). The client said "not applied by the writer ...
    its last answer: CommitFailed" once the deadline passed between two sends: what it cannot know.
    Review of round 44. Here nothing was applied (the lock was held throughout); the client must say
    only what it knows, and a resend under its id then applies it once."""
    proc, client, blocker, pipe = _writer_answering_locked_retryably(stack)
    stopped = False
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = True
        ticket = pipe.submit("audit", actor="me", action="late")
        while ticket.attempt_timeout <= FIRST_ATTEMPT_TIMEOUT:  # unanswered past its first wait: sent again
            pipe.collect(0.05)
        blocker.hold("audit_log")
        os.kill(proc.pid, signal.SIGCONT)
        stopped = False
        # Answered retryably now (the lock held past the writer's busy_timeout): caught between two sends.
        while ticket.awaiting or ticket.last_error is None:
            pipe.collect(0.005)
        assert isinstance(ticket.last_error, CommitFailed) and not ticket.done
        client.give_up_by(0)  # the deadline passes now, with no send in flight
        while not ticket.done:
            pipe.collect(0.05)
        error = ticket.error
        told = f"{type(error).__name__}: {error}"
    finally:
        if stopped:
            os.kill(proc.pid, signal.SIGCONT)
        blocker.close()
    _said_maybe_applied(error, told, quoted_after="its last answer: ")
    assert count(stack, "SELECT count(*) FROM audit_log WHERE action = 'late'") == 0
    _resent_under_its_id_applies_once(stack, client, ticket)
    assert stack.stop(proc) == 0


@pytest.mark.sqlite_only("tests/test_writer_faults.py::test_a_full_disk_is_answered_storage_full_and_writes_resume_"
                         "when_space_returns")
def test_a_resend_unanswered_at_its_deadline_waits_no_longer_than_a_stops_bound(stack: Stack) -> None:
    """The wait past its deadline that a request sent again after a retryable answer gets (LAST_TRY_S
    from that resend, for the writer's answer to it) is not past a stop's bound (give_up_by): a worker's
    flush is bounded by its stop's time, before circus's SIGKILL. The client checked only whether the
    bound came before the deadline; when the deadline came first and the stop's bound passed before
    that resend's LAST_TRY_S, the request was still waited for, past the bound."""
    proc, client, blocker, pipe = _writer_answering_locked_retryably(stack)
    stopped = False
    try:
        blocker.hold("audit_log")
        ticket = pipe.submit("audit", actor="me", action="late")
        # Answered retryably (the lock held past the writer's busy_timeout), over more than LAST_TRY_S, so
        # that the bound a stop gives this request is the stop's time itself; stopped between an answer and
        # the resend it backs off for (only collect sends), so the stopped writer holds that resend. Stopped
        # with a send in flight (a race), the test waited out the client's 120 s deadline, then for ever.
        while (ticket.last_error is None or time.monotonic() < ticket.first_sent + LAST_TRY_S
               or ticket.awaiting) and not ticket.done:  # done (its deadline passed, the writer silent): said below
            pipe.collect(0.005)
        assert isinstance(ticket.last_error, CommitFailed) and not ticket.done
        os.kill(proc.pid, signal.SIGSTOP)  # the writer holds the next resend unanswered
        stopped = True
        while not ticket.awaiting:  # sent again, and not answered
            assert not ticket.done, ticket.error
            pipe.collect(0.05)
        assert ticket.awaiting and ticket.last_error is not None and not ticket.done
        # Its deadline passes now, and then the stop's bound: both are behind it at the next pump.
        ticket.deadline = time.monotonic()
        client.give_up_by(0)
        pipe.collect(0)
        assert ticket.done, "waited past the stop's bound (give_up_by) for the resend's answer"
        assert "may or may not have been applied" in str(ticket.error), ticket.error
    finally:
        if stopped:
            os.kill(proc.pid, signal.SIGCONT)
        blocker.close()
        client.close()
    assert stack.stop(proc) == 0


def test_a_full_disk_is_answered_storage_full_and_writes_resume_when_space_returns(stack: Stack,
                                                                                 small_disk: Path) -> None:
    extra = {"DATABASE_URL": f"sqlite:///{small_disk}/tickstack.db"}
    proc = stack.start_writer(**extra)
    settings = load_settings({**stack.env, **extra})
    client = WriterClient(settings=settings, deadline=3)
    # Pages in the WAL beyond the database's end: a checkpoint must grow the file.
    assert client.call("insert_ticks", ticks=ticks(3000, "before"))["inserted"] == 3000
    filler = small_disk / "filler"
    fill(filler)

    with pytest.raises(StorageFull, match="SQLITE_FULL") as full:
        client.call("insert_ticks", ticks=ticks(3000, "while-full"))
    assert "bytes free" in str(full.value)
    with pytest.raises(StorageFull, match="SQLITE_FULL"):
        client.call("checkpoint")
    assert proc.poll() is None, "the writer died on a full disk"
    stats = client.stats()
    assert stats["pid"] == proc.pid and stats["storage_full"] >= 2
    assert "SQLITE_FULL" in stats["last_storage_full"]["reason"]
    from db.health import writes_refused  # what /api/health and doctor say of it: refusing now

    assert "its disk is full" in (writes_refused(stats) or ""), stats

    filler.unlink()  # space returns: the writer takes writes again by itself
    client = WriterClient(settings=settings, deadline=20)
    assert client.call("insert_ticks", ticks=ticks(3000, "after"))["inserted"] == 3000
    # A write committed since: not refusing now, whatever the last StorageFull (review of round 39: "degraded"
    # for a minute after one large batch was refused while small ones fit).
    assert writes_refused(client.stats()) is None
    assert client.call("checkpoint")["busy"] == 0
    assert client.ping()["pid"] == proc.pid
    got = {s: count(stack, "SELECT count(*) FROM ticks WHERE source = ?", (s,), settings)
           for s in ("before", "while-full", "after")}
    assert got == {"before": 3000, "while-full": 0, "after": 3000}

    # SIGTERM on a full disk: drain, try the final checkpoint, say why it failed, exit 0.
    assert client.call("insert_ticks", ticks=ticks(3000, "last"))["inserted"] == 3000
    fill(filler)
    assert stack.stop(proc) == 0
    log = stack.writer_log()
    assert "Traceback" not in log, log[-3000:]
    assert "no final checkpoint, the disk is full (SQLITE_FULL" in log
    # Said when it fills and when it frees, not once per refused retry.
    assert 1 <= log.count("writer: the disk is full (SQLITE_FULL") <= 2
    assert "the disk has space again; writes resume" in log
    filler.unlink()
    assert count(stack, "SELECT count(*) FROM ticks WHERE source = 'last'", settings=settings) == 3000


def test_a_rejected_insert_is_said_in_one_line_without_its_statement_or_values(stack: Stack) -> None:
    """An insert the database refuses (here a trigger; after a bad restore, a duplicate key) fails its
    request with the database's own words, in one line of the writer's log and of the answer: not
    SQLAlchemy's statement of 100 rows of VALUES and its parameters (the ticks themselves, kilobytes
    of them, and on every retry)."""
    add_trigger(stack, "BEFORE INSERT ON ticks WHEN NEW.source = 'refused' "
                       "BEGIN SELECT RAISE(ABORT, 'no ticks from this source'); END",
                postgres=("ticks", "IF NEW.source = 'refused' THEN "
                                   "RAISE EXCEPTION 'no ticks from this source'; END IF;"))
    client = WriterClient(settings=stack.settings, deadline=20)
    ticks = [{"symbol": "EURUSD", "ts": 1_700_000_000_000 + i, "bid": 1.1, "ask": 1.2 + i / 1e6, "volume": 1.0,
              "source": "refused", "seq": i} for i in range(300)]
    with pytest.raises(OpFailed) as refused:
        client.call("insert_ticks", ticks=ticks)
    message = str(refused.value)
    assert "no ticks from this source" in message and "\n" not in message, message
    assert "INSERT" not in message and "1.200299" not in message and len(message) < 500, message
    assert client.call("audit", actor="me", action="after")["id"] > 0  # the writer serves on
    lines = [line for line in stack.writer_log().splitlines() if "no ticks from this source" in line or
             "INSERT" in line or "1.200299" in line or line.startswith(("Traceback", "  File"))]
    assert len(lines) == 1 and "insert_ticks" in lines[0] and "INSERT" not in lines[0], "\n".join(lines)[:3000]


def writer_with_fifty_audits(stack: Stack) -> tuple[subprocess.Popen, WriterClient]:
    """A writer, and a client whose 50 audits (action ``before``) it acknowledged."""
    proc = stack.start_writer()
    client = WriterClient(settings=stack.settings, deadline=20)
    with client.pipeline() as pipe:
        for i in range(50):
            pipe.submit("audit", actor="me", action="before", target=str(i))
    assert pipe.failed == [] and pipe.completed == 50
    return proc, client


def assert_fifty_audits_and_a_writer_again(stack: Stack, client: WriterClient, refused: str | None = None) -> None:
    """The file at the database's path is sound and holds the 50 audits (and no audit of the action
    ``refused``); a writer serves on it again."""
    con = sqlite3.connect(stack.settings.database_path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute("SELECT count(*) FROM audit_log WHERE action = 'before'").fetchone() == (50,)
        if refused is not None:
            assert con.execute("SELECT count(*) FROM audit_log WHERE action = ?", (refused,)).fetchone() == (0,)
    finally:
        con.close()
    stack.start_writer()
    assert client.call("audit", actor="me", action="after")["id"] > 0


@pytest.mark.sqlite_only("tests/test_writer.py::test_writer_killed_twice_mid_run_loses_nothing")
def test_the_database_file_moved_under_the_writer_stops_its_writes_until_it_is_put_back(stack: Stack) -> None:
    """``mv tickstack.db moved.db`` under a running writer: it acknowledged on into the moved file,
    which no reader opened, without a word, and its next start made a new, empty database beside the
    old WAL (checkpoints then failed, "database disk image is malformed"): acknowledged writes split
    over two files (fault hunt as an operator). The writer now refuses writes, says where the file
    is and how to put it back, and nothing acknowledged is missing once it is back."""
    path = stack.settings.database_path
    proc, client = writer_with_fifty_audits(stack)
    moved = stack.home / "moved.db"
    path.rename(moved)

    def refused_yet() -> bool:
        try:
            WriterClient(settings=stack.settings, deadline=0.5).call("audit", actor="me", action="probe")
        except WriterUnavailable as e:
            return f"the database file tickstack.db was moved to {moved} under the writer" in str(e)
        return False

    wait_for("the writer to refuse writes", refused_yet, timeout=10)
    said = [line for line in stack.writer_log().splitlines() if "ERROR" in line]
    assert said and f"put it back (`mv {moved} {path}`)" in said[0] and " restart writer --waiting" in said[0], said
    moved.rename(path)  # as it says
    assert stack.stop(proc) == 0
    assert_fifty_audits_and_a_writer_again(stack, client)


@pytest.mark.sqlite_only("tests/test_writer.py::test_writer_killed_twice_mid_run_loses_nothing")
def test_the_database_file_removed_under_the_writer_is_saved_as_its_words_say(stack: Stack) -> None:
    """``rm tickstack.db`` under a running writer: its first advice (copy the removed file out of the
    writer, restart it) lost every write still in the WAL, the schema too, since the stop checkpoints
    into the removed file and empties the WAL (review of round 36). Its second (copy the file and the
    WAL out first) lost the last writes whenever a reader had the database open, as the stack's always
    do: the stop's checkpoint marked the WAL's frames as copied in the shared memory the readers keep,
    and the next writer, trusting it, wrote over them (fault hunt, round 39). The writer now saves a
    complete copy itself; its words, followed as printed with a reader open throughout until the
    stack's stop (the circusctl steps done here by stopping the writer and the reader), keep all."""
    path = stack.settings.database_path
    proc, client = writer_with_fifty_audits(stack)
    reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    assert reader.execute("SELECT count(*) FROM audit_log").fetchone() == (50,)
    path.unlink()
    said: list[str] = []

    def saved_yet() -> bool:  # said at once, then again once the copy is made, by the commit thread
        said[:] = [line for line in stack.writer_log().splitlines() if "was removed under the writer" in line]
        return len(said) == 2

    wait_for("the writer to say so", saved_yet, timeout=15)
    assert "It is saving them all in a copy beside it" in said[0], said[0]
    assert f"It saved them all in a copy, {path}.saved: stop the stack (`" in said[1], said[1]
    said.pop(0)
    steps = re.findall(r"`([^`]+)`", said[0])
    assert " quit" in steps[0] and steps[-1] == "make run", steps
    assert reader.execute("SELECT count(*) FROM audit_log").fetchone() == (50,)
    assert stack.stop(proc) == 0
    assert "every write it acknowledged is in the copy it saved" in stack.writer_log()  # no CRITICAL "lost"
    reader.close()
    assert subprocess.run(steps[1], shell=True).returncode == 0
    assert_fifty_audits_and_a_writer_again(stack, client)


@pytest.mark.database_independent("paths only: which WAL belongs to a database path, opened by nobody")
def test_the_wal_of_a_database_reached_through_a_symbolic_link_is_looked_for_beside_its_target(
        tmp_path: Path) -> None:
    """SQLite keeps the WAL beside the file a symbolic link names; the check looked beside the link
    and let a writer make a new database (review of round 36)."""
    from db.files import orphaned_journal

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "a" / "link.db"
    link.symlink_to(tmp_path / "b" / "real.db")  # the database itself moved away: the link dangles
    (tmp_path / "b" / "real.db-wal").write_bytes(b"frames")
    said = orphaned_journal(link)
    assert said is not None and "its WAL real.db-wal is there" in said, said


@pytest.mark.sqlite_only("tests/test_writer.py::test_writer_killed_twice_mid_run_loses_nothing")
def test_putting_back_a_database_reached_through_a_symbolic_link_where_the_words_say_keeps_its_wal(
        tmp_path: Path) -> None:
    """The database's path a symbolic link, the file it names moved away after the writer was killed,
    its WAL left beside where it was: the writer's refusal said "Put the database back at <the link>".
    ``mv`` onto a link replaces the link, so the file came back beside the link, away from its WAL: the
    next writer opened it without the WAL's frames and served on, every acknowledged write since the
    last checkpoint gone without a word. The words name the file the link names."""
    stack = Stack.linked(tmp_path / "disk")
    try:
        link = stack.settings.database_path
        real = tmp_path / "disk" / "ticks.db"
        proc = stack.start_writer()
        with WriterClient(settings=stack.settings, deadline=20) as client:
            assert client.call("audit", actor="me", action="kept")["id"] > 0
        proc.kill()  # no last checkpoint: the row is in the WAL only
        proc.wait()
        assert Path(f"{real}-wal").stat().st_size > 0
        moved = tmp_path / "moved.db"
        os.rename(real, moved)
        started = subprocess.run([sys.executable, "-m", "workers.writer"], env=stack.env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=60)
        assert started.returncode == 1, started.stderr[-3000:]
        back = re.search(r"Put the database back at (.+?); or restore", started.stderr)
        assert back is not None, started.stderr[-3000:]
        assert subprocess.run(["mv", str(moved), back[1]], timeout=30).returncode == 0
        writer = stack.start_writer()
        assert [a for (a,) in query(stack.settings, "SELECT action FROM audit_log")] == ["kept"]
        assert stack.stop(writer) == 0
        assert link.is_symlink() and link.resolve() == real
    finally:
        stack.close()


@pytest.mark.sqlite_only("tests/test_writer.py::test_writer_killed_twice_mid_run_loses_nothing")
@pytest.mark.parametrize("way", ["restore a backup", "move the files it left aside"])
def test_a_writer_does_not_make_a_new_database_beside_the_wal_of_a_missing_one(stack: Stack, way: str) -> None:
    """The database file gone and its WAL there (moved or removed after the writer was killed): the
    writer made a new, empty database beside the old WAL and served on it. It now exits 1 saying what
    to do, and makes nothing; so do ``db init``, ``db prepare`` and doctor. Each way it gives works."""
    path = stack.settings.database_path
    proc = stack.start_writer()
    client = WriterClient(settings=stack.settings, deadline=20)
    assert client.call("audit", actor="me", action="x")["id"] > 0
    backup = stack.home / "kept.db"
    assert subprocess.run([sys.executable, "-m", "db", "backup", str(backup)], env=stack.env, cwd=ROOT,
                          capture_output=True, timeout=120).returncode == 0
    assert client.call("audit", actor="me", action="after-the-backup")["id"] > 0
    client.close()
    proc.kill()
    proc.wait()
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size > 0
    path.rename(stack.home / "elsewhere.db")
    started = subprocess.run([sys.executable, "-m", "workers.writer"], env=stack.env, cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert started.returncode == 1, started.stderr[-3000:]
    missing = f"the database {path} is missing but its WAL tickstack.db-wal is there"
    assert missing in started.stderr, started.stderr
    assert not path.exists()
    # `db init` and `make run`'s `db prepare` made that new database beside the old WAL too (SQLite
    # then replays the old database's frames into it), and doctor said "start the writer (it creates
    # it)", which refuses: each says the writer's words, and makes nothing.
    for command in ("init", "prepare", "doctor"):
        done = subprocess.run([sys.executable, "-m", "db", command], env=stack.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 1 and missing in done.stdout + done.stderr, (command, done.stdout + done.stderr)
        assert "start the writer (it creates" not in done.stdout + done.stderr, (command, done.stdout)
        assert not path.exists(), command
    if way == "restore a backup":
        restored = subprocess.run([sys.executable, "-m", "db", "restore", str(backup)], env=stack.env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=120)
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert not wal.exists() or wal.stat().st_size == 0  # kept aside, not replayed into the backup
        # The missing database's ids cannot be read from its WAL alone: it said nothing of them, and
        # that "the database it replaced is kept as <a file that is not there>"; ids it gave after the
        # backup were given again, a consumer that saw them skipping the new rows of those ids.
        kept = re.search(r"could not be read \(its file was missing; its WAL alone is kept, as (\S+)\): ids it gave "
                         r"after the backup", restored.stdout)
        assert kept is not None and Path(kept[1]).stat().st_size > 0, restored.stdout
        assert "the database it replaced is kept as" not in restored.stdout, restored.stdout
    else:
        command = re.search(rf"{re.escape(way)} \(`([^`]+)`\)", done.stdout)
        assert command is not None, done.stdout
        assert subprocess.run(command[1], shell=True, cwd="/", timeout=30).returncode == 0
        assert not wal.exists() and len(list(stack.home.glob("tickstack.db-wal.orphaned-*"))) == 1
    writer = stack.start_writer()
    with WriterClient(settings=stack.settings, deadline=20) as client:
        assert client.call("audit", actor="me", action="again")["id"] > 0
    actions = [a for (a,) in query(stack.settings, "SELECT action FROM audit_log ORDER BY id")]
    assert actions == (["x", "again"] if way == "restore a backup" else ["again"]), actions
    assert stack.stop(writer) == 0


@pytest.mark.sqlite_only("tests/test_writer.py::test_writer_killed_twice_mid_run_loses_nothing")
@pytest.mark.parametrize("how", ["rm", "mv"])
def test_journal_files_removed_under_the_writer_stop_its_writes_until_a_restart_saves_them(stack: Stack,
                                                                                         how: str) -> None:
    """``rm tickstack.db-wal tickstack.db-shm`` (or ``mv``) under a running writer (an old remedy for
    "database is locked"): SQLite wrote on into the removed WAL, which only the writer's process still had, and
    acknowledged writes there without a word; every write since the last checkpoint was lost with
    the process. The writer now sees within a second that the files it has open were removed, says
    so, and refuses every write (retryably: feeds spool, clients retry) instead of adding to what is
    at risk. Its stop (the stack's restart: readers first) copies its WAL into the database: nothing
    acknowledged is lost, and the refused writes are applied once by the next writer."""
    path = stack.settings.database_path
    proc, client = writer_with_fifty_audits(stack)
    for suffix in ("-wal", "-shm"):
        journal = path.with_name(path.name + suffix)
        journal.unlink() if how == "rm" else journal.rename(stack.home / f"moved{suffix}")

    def refused_yet() -> bool:
        try:
            WriterClient(settings=stack.settings, deadline=0.5).call("audit", actor="me", action="probe")
        except WriterUnavailable as e:  # answered retryably, and retried until its short deadline
            return "its last answer: CommitFailed: not applied, retry: tickstack.db-wal and tickstack.db-shm " \
                   "removed or moved under the writer" in str(e)
        return False

    wait_for("the writer to refuse writes", refused_yet, timeout=10)
    assert client.ping()["pid"] == proc.pid  # it serves pings and stats, and holds the lock
    stats = client.stats()
    assert "tickstack.db-wal" in (stats.get("journal_removed") or ""), stats
    doctor = subprocess.run([sys.executable, "-m", "db", "doctor"], env=stack.env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert doctor.returncode == 1 and "The writer refuses every write" in doctor.stdout, doctor.stdout
    # /api/health said "ok" meanwhile (fault hunt, round 39): degraded, saying why, still 200 (the writer answers).
    from webapp import create_app

    health = create_app("api", stack.settings).test_client().get("/api/health")
    body = health.get_json()
    assert health.status_code == 200 and body["status"] == "degraded", body
    assert "tickstack.db-wal" in body["writer"]["writes_refused"], body["writer"]
    # A backup would copy the file alone, without what only the removed WAL holds, and pass its check.
    backup = subprocess.run([sys.executable, "-m", "db", "backup", str(stack.home / "b.db")], env=stack.env,
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert backup.returncode != 0 and "no backup: the writer says" in backup.stderr, backup
    assert not (stack.home / "b.db").exists()
    said = [line for line in stack.writer_log().splitlines() if "ERROR" in line]
    assert said and "removed or moved under the writer" in said[0] and "circusctl --endpoint" in said[0] and \
        " quit --waiting" in said[0], said
    assert stack.stop(proc) == 0
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        probes = con.execute("SELECT count(*) FROM audit_log WHERE action = 'probe'").fetchone()[0]
        assert con.execute("SELECT count(*) FROM audit_log WHERE action = 'before'").fetchone() == (50,)
    finally:
        con.close()
    stack.start_writer()
    assert client.call("audit", actor="me", action="after")["id"] > 0
    assert count(stack, "SELECT count(*) FROM audit_log WHERE action = 'probe'") == probes  # none applied twice


@pytest.mark.sqlite_only("tests/test_writer.py::test_writer_killed_twice_mid_run_loses_nothing")
def test_the_wal_cut_look_follows_a_symlinked_database_and_a_new_index(tmp_path: Path) -> None:
    """workers.wal_cut, in this process on real SQLite files (review, round 46): a database named by a
    symbolic link has its WAL and index beside the link's target, as SQLite keeps them (the look
    found none, and never saw a cut); and an index SQLite made anew after its last connection closed
    is not judged by the one kept open before (its old frame count against the new, short WAL: a
    false cut, which would refuse every write)."""
    from workers.wal_cut import wal_cut_short, wal_index

    target, link = tmp_path / "real" / "x.db", tmp_path / "x.db"
    target.parent.mkdir()
    link.symlink_to(target)

    def open_and_write(rows: int) -> sqlite3.Connection:
        con = sqlite3.connect(link, isolation_level=None)
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA wal_autocheckpoint = 0")
        con.execute("CREATE TABLE IF NOT EXISTS t (x)")
        for i in range(rows):
            con.execute("INSERT INTO t VALUES (?)", (i,))
        return con

    con = open_and_write(50)
    assert wal_index(link) is not None and wal_cut_short(link) is None
    con.close()  # the last connection: SQLite checkpoints and removes the WAL and the index
    con = open_and_write(1)  # a new index, with one commit's frames; the look kept the old one open
    assert wal_cut_short(link) is None
    con.execute("INSERT INTO t VALUES (1)")
    os.truncate(f"{target}-wal", 0)  # the WAL beside the target, cut short
    said = wal_cut_short(link)
    assert said is not None and "x.db-wal was cut short" in said, said
    con.close()


@pytest.mark.sqlite_only("tests/test_writer.py::test_writer_killed_twice_mid_run_loses_nothing")
def test_a_wal_cut_short_under_the_writer_stops_its_writes_and_its_checkpoints(stack: Stack) -> None:
    """``truncate -s 0 tickstack.db-wal`` under a running writer: the file stays at its path, so nothing
    saw it; the writer acknowledged every write after it, readers got "database disk image is
    malformed", and its stop's checkpoint copied the frames the cut took into the database file as
    zeros, saying "final checkpoint done": a file no reader could read, every write lost (fault hunt,
    round 44). What the cut took is gone; what was checkpointed before it must stay sound: the writer
    refuses every write from then on (retryably), saying so, does not checkpoint, and the next writer
    applies the refused writes once."""
    path = stack.settings.database_path
    proc, client = writer_with_fifty_audits(stack)
    client.call("checkpoint")  # the 50 are in the database file; the next ones only in the WAL
    for i in range(50):
        client.call("audit", actor="me", action="in-the-wal", target=str(i))
    os.truncate(path.with_name(path.name + "-wal"), 0)

    def refused_yet() -> bool:
        try:
            WriterClient(settings=stack.settings, deadline=0.5).call("audit", actor="me", action="probe")
        except WriterUnavailable as e:  # answered retryably, and retried until its short deadline
            return "not applied, retry: its WAL tickstack.db-wal was cut short under it" in str(e)
        return False

    wait_for("the writer to refuse writes", refused_yet, timeout=10)
    doctor = subprocess.run([sys.executable, "-m", "db", "doctor"], env=stack.env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert doctor.returncode == 1 and "The writer refuses every write: its WAL tickstack.db-wal was cut short" \
        in doctor.stdout and " quit --waiting" in doctor.stdout, doctor.stdout
    assert stack.stop(proc) == 1
    assert "CRITICAL" in stack.writer_log() and "no final checkpoint: its WAL" in stack.writer_log()
    assert_fifty_audits_and_a_writer_again(stack, client, refused="probe")


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_quick_check_runs_amcheck_and_is_skipped_not_failed_without_it")
def test_a_damaged_index_page_is_said_as_damage_by_doctor_in_one_line_each(stack: Stack) -> None:
    """Bytes of an index page overwritten (a failing disk's or another program's): every write that
    touched it failed retryably, and doctor said "A disk turned read-only after errors (`dmesg`) or
    failing needs the stack stopped and the disk mended", then quick_check's finding over 100 lines,
    one per cell of the page (fault hunt, round 44). Damage is said as damage, each finding in one line."""
    path = stack.settings.database_path
    proc, client = writer_with_fifty_audits(stack)
    client.call("insert_ticks", ticks=ticks(2000, "feed"))
    client.call("checkpoint")
    assert stack.stop(proc) == 0
    page = query(stack.settings, "SELECT pageno FROM dbstat WHERE name = 'sqlite_autoindex_ticks_1' "
                                 "AND pagetype = 'leaf' ORDER BY path LIMIT 1 OFFSET 3")[0][0]
    page_size = query(stack.settings, "PRAGMA page_size")[0][0]
    with open(path, "r+b") as f:  # the cell pointers of a leaf of the (source, seq) index
        f.seek((page - 1) * page_size + 8)
        f.write(b"\xff" * 200)
    stack.start_writer()
    with pytest.raises(WriterUnavailable, match="database disk image is malformed"):
        WriterClient(settings=stack.settings, deadline=3).call("insert_ticks", ticks=ticks(2000, "feed"))
    doctor = subprocess.run([sys.executable, "-m", "db", "doctor"], env=stack.env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    lines = doctor.stdout.splitlines()
    assert doctor.returncode == 1 and all(line.startswith("[") for line in lines), doctor.stdout[:3000]
    failing = [line for line in lines if "The writer's commits fail" in line]
    assert failing and "The database file is damaged" in failing[0] and "dmesg" not in failing[0], lines
    assert any(f"quick_check found problems: On tree page {page}" in line for line in lines), lines


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_quick_check_runs_amcheck_and_is_skipped_not_failed_without_it")
@pytest.mark.parametrize("damage", ["index-page", "header", "header-no-backup"])
def test_a_damaged_file_with_the_stack_stopped_is_restored_before_any_start_as_doctor_says(damage: str) -> None:
    """With the stack stopped and the file damaged, doctor's first line said "Start it with `make run`",
    which starts a writer that fails every write touching the damage; a file whose header was hit was only
    "Cannot read the database: file is not a database"; and quick_check's advice named `python -m db
    backup`, not the restore (fault hunt, round 44, left until round 47). Each line says restore first,
    naming the latest backup quoted for the shell (this home's path has a space), and the command as
    printed mends it; with no backup, that there is none, and no start."""
    home = new_home(prefix="ts dmg ")  # a space in the path: the printed restore must quote it
    stack = Stack(home, isolated_env(home))
    try:
        _damaged_file_advice_mends_it(stack, damage)
    finally:
        stack.close()


def _damaged_file_advice_mends_it(stack: Stack, damage: str) -> None:
    path = stack.settings.database_path
    proc, client = writer_with_fifty_audits(stack)
    client.call("checkpoint")
    if damage != "header-no-backup":
        backup = subprocess.run([sys.executable, "-m", "workers.jobs", "--run", "backup"], env=stack.env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert backup.returncode == 0, backup.stdout + backup.stderr
    client.call("insert_ticks", ticks=ticks(2000, "feed"))
    client.call("checkpoint")
    assert stack.stop(proc) == 0
    page, page_size = 1, 4096
    if damage == "index-page":
        page = query(stack.settings, "SELECT pageno FROM dbstat WHERE name = 'sqlite_autoindex_ticks_1' "
                                     "AND pagetype = 'leaf' ORDER BY path LIMIT 1 OFFSET 3")[0][0]
        page_size = query(stack.settings, "PRAGMA page_size")[0][0]
    with open(path, "r+b") as f:  # the cell pointers of an index leaf, or the file's header
        f.seek((page - 1) * page_size + (8 if damage == "index-page" else 0))
        f.write(b"\xff" * 200)

    doctor = subprocess.run([sys.executable, "-m", "db", "doctor"], env=stack.env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    lines = doctor.stdout.splitlines()
    assert doctor.returncode == 1 and all(line.startswith("[") for line in lines), doctor.stdout
    writer_line = next(line for line in lines if "The writer is not running" in line)
    damage_lines = [line for line in lines if line.startswith("[FAIL]") and "damaged" in line and line != writer_line]
    assert "damaged" in writer_line and len(damage_lines) == 1 and "db backup makes" not in damage_lines[0], lines
    if damage == "header-no-backup":
        assert all("there is no backup in" in line.lower() and "make run" not in line
                   for line in (writer_line, damage_lines[0])), lines
        return
    assert "make run" not in writer_line.split("db restore")[0], writer_line  # no start before the restore
    restore = backticked(writer_line, "db restore")
    assert backticked(damage_lines[0], "db restore") == restore, lines
    # The command as printed (the venv's python for `python`) mends it: a writer serves what the backup held.
    done = subprocess.run(["bash", "-c", f"{Path(sys.executable).parent}/{restore}"], env=stack.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (restore, done.stdout + done.stderr)
    assert query(stack.settings, "SELECT count(*) FROM ticks")[0][0] == 0
    assert_fifty_audits_and_a_writer_again(stack, client)


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_quick_check_runs_amcheck_and_is_skipped_not_failed_without_it")
def test_a_backup_of_a_damaged_file_and_a_damaged_backup_say_what_is_damaged_and_what_to_do(stack: Stack) -> None:
    """A backup of a damaged file (``db backup``, the jobs worker's, the console's button) failed with
    "backup failed its integrity check: ['*** in database main ***\\nOn tree page ...", a Python
    list of a hundred findings on one line, never saying that the database itself is damaged nor
    what to do (fault hunt on the recovery path). It says the file is damaged, three findings, and
    doctor's restore of the latest backup. A damaged backup given to ``db restore`` is refused the
    same way, naming the backup before it, as doctor names only the latest."""
    path = stack.settings.database_path
    proc, client = writer_with_fifty_audits(stack)
    client.call("checkpoint")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], env=stack.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=120)

    for _ in range(2):
        assert run("workers.jobs", "--run", "backup").returncode == 0
    older, latest = sorted((stack.home / "backups").glob("tickstack-*.db"))[-2:]
    client.call("insert_ticks", ticks=ticks(2000, "feed"))
    client.call("checkpoint")
    page = query(stack.settings, "SELECT pageno FROM dbstat WHERE name = 'sqlite_autoindex_ticks_1' "
                                 "AND pagetype = 'leaf' ORDER BY path LIMIT 1 OFFSET 3")[0][0]
    page_size = query(stack.settings, "PRAGMA page_size")[0][0]
    assert stack.stop(proc) == 0
    with open(path, "r+b") as f:  # the cell pointers of a leaf of the (source, seq) index
        f.seek((page - 1) * page_size + 8)
        f.write(b"\xff" * 200)
    advice = f"the database file is damaged; restore the latest backup, `python -m db restore {latest}`"
    refused = run("db", "backup", str(stack.home / "copy.db"))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"On tree page {page}" in refused.stderr and "***" not in refused.stderr and "\\n" not in refused.stderr, \
        refused.stderr
    assert advice in refused.stderr and refused.stderr.rstrip().endswith("then `make run`."), refused.stderr
    proc = stack.start_writer()  # to record the jobs worker's run
    failed = run("workers.jobs", "--run", "backup")
    assert failed.returncode == 1 and advice in failed.stderr and "Traceback" not in failed.stderr, failed.stderr
    assert stack.stop(proc) == 0
    assert sorted((stack.home / "backups").glob("tickstack-*.db"))[-2:] == [older, latest]

    con = connect_read_only(latest)
    try:
        page = con.execute("SELECT pageno FROM dbstat WHERE name = 'audit_log' AND pagetype = 'leaf'").fetchone()[0]
    finally:
        con.close()
    with open(latest, "r+b") as f:  # the latest backup rotted on its disk too
        f.seek((page - 1) * page_size + 8)
        f.write(b"\xff" * 200)
    refused = run("db", "restore", str(latest))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"{latest} is damaged" in refused.stderr, refused.stderr
    assert "***" not in refused.stderr, refused.stderr
    assert refused.stderr.rstrip().endswith(f"the backup before it: `python -m db restore {older}`"), refused.stderr
    dump = stack.home / "tickstack-20260101T000000Z.dump"  # a PostgreSQL home's backup, given here
    dump.write_bytes(b"PGDMP\x01\x0e\x00" + b"\x00" * 100)
    refused = run("db", "restore", str(dump))
    assert refused.returncode == 1 and "is a PostgreSQL dump (pg_dump -Fc): this stack's database is an SQLite " \
        "file, which takes .db backups" in refused.stderr, refused.stderr
    done = run("db", "restore", str(older))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_fifty_audits_and_a_writer_again(stack, client)


def test_a_low_hard_open_file_limit_is_warned_about_as_the_writer_starts(stack: Stack) -> None:
    """A hard limit cannot be raised: with one of 64, 120 clients ended the writer at each start
    (SIGABRT in libzmq's accept) and it crash-looped without a word of why (fault hunt, round 40)."""
    with open(stack.home / "log" / "writer-test.log", "ab") as log:
        proc = spawn(stack.env, stdout=log, stderr=subprocess.STDOUT,
                     preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    stack.procs.append(proc)
    assert "writer: at most 256 open files (a hard limit: ulimit -Hn): each client connection takes one" in \
        stack.writer_log(), stack.writer_log()[-2000:]
    assert stack.stop(proc) == 0


def test_more_connections_than_a_low_soft_open_file_limit_leave_the_writer_serving() -> None:
    """Each client connection holds one of the writer's file descriptors, and libzmq 4.3 aborts the
    whole process when an ``ipc://`` accept finds none left ("Too many open files
    (src/ipc_listener.cpp)", SIGABRT): 1,100 connections killed a writer started under a soft limit
    of 1,024, a common login shell's (fault hunt, round 38). The writer raises its soft limit to the
    hard one as it starts; here 300 connections to a writer started with a soft limit of 128 are
    each answered, and the writer serves on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard >= 2048, f"a hard open-file limit of {hard} is too low to test"
    if soft < 2048:  # this process holds the 300 connections' descriptors too
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    st = Stack.create()
    ctx = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, 2048)
    peers: list[zmq.Socket] = []
    try:
        with open(st.home / "log" / "writer-test.log", "ab") as log:
            proc = spawn(st.env, stdout=log, stderr=subprocess.STDOUT,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard)))
        st.procs.append(proc)
        for n in range(300):
            peer = ctx.socket(zmq.DEALER)
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(st.settings.writer_endpoint)
            peer.send(encode_request(f"peer-{n}", 1, "ping", {}))
            peers.append(peer)
        answered = 0
        for peer in peers:
            assert peer.poll(30_000), (f"{answered} of 300 answered; the writer "
                                       f"{'exited with ' + str(proc.poll()) if proc.poll() is not None else 'runs'}: "
                                       + (st.home / "log" / "writer-test.log").read_text()[-1500:])
            assert msgpack.unpackb(peer.recv())["ok"] is True
            answered += 1
        assert proc.poll() is None
        assert WriterClient(settings=st.settings, deadline=10).ping()["pid"] == proc.pid
    finally:
        for peer in peers:
            peer.close()
        ctx.term()
        st.close()


def test_a_tick_or_a_trade_dated_more_than_a_day_ahead_is_refused_naming_it(writer: Stack) -> None:
    """A tick dated 2100 was stored as it came, and was then its symbol's latest price until 2100: a
    trade opened at it, and the simulated feed went on from it (fault hunt, round 38). A tick or a
    trade time more than a day ahead of the writer's clock is refused, the value and its place
    named, in each form a tick batch takes (rows, short columns, packed columns), and nothing of the
    batch is stored."""
    client = WriterClient(settings=writer.settings, deadline=10)
    now = int(time.time() * 1000)
    ahead = now + 2 * 86_400_000
    row = {"symbol": "BTCUSD", "bid": 60_000.0, "ask": 60_001.0}
    forms = {
        "rows": [{**row, "ts": now}, {**row, "ts": 4_102_444_800_000}],
        "short columns": {"symbol": ["BTCUSD"] * 2, "ts": [now, ahead], "bid": [1.0] * 2, "ask": [1.5] * 2},
        "packed columns": {"symbol": ["BTCUSD"] * 40, "ts": [now] * 39 + [ahead], "bid": [1.0] * 40,
                           "ask": [1.5] * 40},
    }
    for form, ticks in forms.items():
        with pytest.raises(ValidationError) as refused:
            client.call("insert_ticks", ticks=ticks)
        said = str(refused.value)
        # Named as sent: ticks[1].ts in rows (it said ticks.ts[1], a column the caller never sent).
        where = "ticks[1].ts" if form == "rows" else "ticks.ts[1]" if form == "short columns" else "ticks.ts[39]"
        assert said.startswith(f"{where}: ") and "more than a day ahead of now" in said, (form, said)
    assert query(writer.settings, "SELECT count(*) FROM ticks")[0][0] == 0
    refused_trade = r"^ts: \d+ \(\d{4}-\d\d-\d\d \d\d:\d\d UTC\) is more than a day ahead of now"
    with pytest.raises(ValidationError, match=refused_trade):
        client.call("open_trade", symbol="BTCUSD", side="buy", size=1.0, entry_price=60_000.0, ts=ahead)
    # A day ahead and less is taken (hosts' clocks, a local time sent as UTC).
    assert client.call("insert_ticks", ticks=[{**row, "ts": now + 3_600_000}])["inserted"] == 1


def test_a_tick_or_a_trade_time_in_seconds_or_microseconds_is_refused_saying_so(writer: Stack) -> None:
    """A bot sending ``int(time.time())`` had its ticks stored in January 1970: the API takes epoch
    milliseconds only, and a time in seconds is one of them (a new user's run, round 38). A time from
    1e9 to 1e10 (in seconds 2001 to 2286, in milliseconds January to April 1970) is refused, saying
    what it is in seconds, in each form a tick batch takes and for a trade; microseconds and
    nanoseconds, out of range already, are named as such. Nothing of a refused batch is stored."""
    client = WriterClient(settings=writer.settings, deadline=10)
    seconds = 1_764_979_200  # 2025-12-06 00:00 UTC
    row = {"symbol": "BTCUSD", "bid": 60_000.0, "ask": 60_001.0}
    in_seconds = (rf"{seconds} looks like a time in seconds \(2025-12-06 00:00 UTC as seconds, 1970-01-21 10:16 UTC "
                  r"as milliseconds\): send epoch milliseconds \(seconds x 1000\)$")
    forms = {
        "rows": [{**row, "ts": seconds * 1000}, {**row, "ts": seconds}],
        "short columns": {"symbol": ["BTCUSD"] * 2, "ts": [seconds * 1000, seconds], "bid": [1.0] * 2,
                          "ask": [1.5] * 2},
        "packed columns": {"symbol": ["BTCUSD"] * 40, "ts": [seconds * 1000] * 39 + [seconds], "bid": [1.0] * 40,
                           "ask": [1.5] * 40},
    }
    for form, ticks in forms.items():
        where = {"rows": r"ticks\[1\]\.ts", "short columns": r"ticks\.ts\[1\]",
                 "packed columns": r"ticks\.ts\[39\]"}[form]
        with pytest.raises(ValidationError, match=rf"^{where}: {in_seconds}"):
            client.call("insert_ticks", ticks=ticks)
    for unit, value in (("microseconds", seconds * 10**6), ("nanoseconds", seconds * 10**9)):
        with pytest.raises(ValidationError, match=rf"^ticks\[0\]\.ts: {value} is out of range \(epoch ms "
                                                  rf"1970\.\.2100\); it looks like {unit} \(2025-12-06 00:00 UTC\)"):
            client.call("insert_ticks", ticks=[{**row, "ts": value}])
    with pytest.raises(ValidationError, match=rf"^ts: {in_seconds}"):
        client.call("open_trade", symbol="BTCUSD", side="buy", size=1.0, entry_price=60_000.0, ts=seconds)
    assert query(writer.settings, "SELECT count(*) FROM ticks")[0][0] == 0
    assert query(writer.settings, "SELECT count(*) FROM trades")[0][0] == 0
    # Milliseconds of the same moment are taken, as are small times (tests and old data use them).
    assert client.call("insert_ticks", ticks=[{**row, "ts": seconds * 1000}, {**row, "ts": 60_000}])["inserted"] == 2
    # A trade's update and close take the time of a stored tick (the monitor sends it), which may be one stored
    # in seconds before this rule: taken, or the monitor could not close the trade (a review, round 39).
    trade = client.call("open_trade", symbol="BTCUSD", side="buy", size=1.0, entry_price=60_000.0)["id"]
    client.call("update_trade", trade_id=trade, stop_loss=59_000.0, reason="moved", ts=seconds)
    assert client.call("close_trade", trade_id=trade, price=60_100.0, reason="stop", ts=seconds)["id"] == trade


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_health_doctor_api_and_metrics_report_the_server_and_fail_while_it_is_down")
def test_a_database_the_writer_may_only_read_stops_it_in_one_line_and_it_serves_once_writable(stack: Stack) -> None:
    """SQLite opens a database file its process may not write (mode 0400, another owner, a read-only
    mount) for reading only, without a word: the writer logged a warning, said it was ready, and
    answered every write with a failure that was not retryable, for good; the tick feed set its
    batches aside as refused, the analysis worker crash-looped, doctor found no problem (fault hunt,
    round 39). The writer now exits 1 with one line naming the cause, and starts once the file is
    writable again. As root, file modes bind only without the capabilities that override them."""
    init = subprocess.run([sys.executable, "-m", "db", "init"], env=stack.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    path = stack.settings.database_path
    assert path is not None
    path.chmod(0o400)
    command = [sys.executable, "-m", "workers.writer"]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *command]
    refused = subprocess.run(command, env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1, (refused.returncode, refused.stderr[-2000:])
    said = [line for line in refused.stderr.splitlines() if "ERROR" in line]
    assert len(said) == 1 and f"cannot open the database {path}: attempt to write a readonly database (it, its " \
        "-wal or -shm file, or its folder is not writable by this process" in said[0], refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and "ready" not in refused.stderr, refused.stderr[-2000:]
    path.chmod(0o600)
    stack.start_writer()
    assert WriterClient(settings=stack.settings, deadline=10).call(
        "insert_ticks", ticks=[{"symbol": "BTCUSD", "ts": T0, "bid": 1.0, "ask": 1.5}])["inserted"] == 1


def test_sigusr1_and_sigusr2_are_logged_and_ignored_and_sigquit_drains_like_sigterm(stack: Stack) -> None:
    """SIGUSR1, SIGUSR2 and SIGQUIT (a log-reopen habit, a Ctrl-\\\\) ended the writer at once: no line
    in its log, no drain, no last checkpoint (fault hunt, round 39). The first two are now logged and
    ignored; SIGQUIT asks it to stop, as SIGTERM does: it drains, and what it acknowledged is stored."""
    proc = stack.start_writer()
    client = WriterClient(settings=stack.settings, deadline=10)
    tick = {"symbol": "BTCUSD", "bid": 1.0, "ask": 1.5, "source": "signals"}
    assert client.call("insert_ticks", ticks=[{**tick, "ts": T0, "seq": 1}])["inserted"] == 1
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        proc.send_signal(sig)
        wait_for(f"{sig.name} in the writer's log", lambda s=sig: f"{s.name} received: ignored" in stack.writer_log(),
                 timeout=10)
        assert proc.poll() is None
    assert client.call("insert_ticks", ticks=[{**tick, "ts": T0 + 1, "seq": 2}])["inserted"] == 1
    client.close()
    assert stack.stop(proc, signal.SIGQUIT) == 0
    assert "SIGQUIT received; draining" in stack.writer_log()
    assert query(stack.settings, "SELECT count(*) FROM ticks WHERE source = 'signals'")[0][0] == 2


@pytest.mark.sqlite_only("tests/test_postgres_faults.py::test_a_batch_whose_connection_is_lost_is_retried_not_failed")
def test_a_disk_that_fails_under_the_writer_is_said_by_health_and_doctor_and_its_stop_is_clean() -> None:
    """ext4 aborted under a running writer (a failing disk: every write an I/O error from then on, the
    filesystem read-only): every batch failed and was answered retryably, as it should, but doctor said
    "No problem found" and /api/health ``ok``; the stop ended in a traceback (the lock file could not be
    emptied) and its last line said every committed write was in the WAL (fault hunt, round 40). Now
    the writer's stats say since when no batch commits and why, health is ``degraded`` and doctor
    fails saying so, and the stop says what a failed disk may have lost, with no traceback."""
    from webapp import create_app

    try:
        with aborting_disk() as (home, abort):
            env = isolated_env(home)
            proc = spawn(env, stderr=subprocess.PIPE, text=True)
            try:
                with WriterClient(settings=load_settings(env), deadline=2) as client:
                    assert client.call("audit", actor="me", action="before")["id"] == 1
                    abort()
                    with pytest.raises(WriterUnavailable, match="disk I/O error|readonly|read-only"):
                        client.call("audit", actor="me", action="after")
                    failing = wait_for("the failing commits to last", lambda: (
                        (client.stats().get("commits_failing_s") or 0) >= 2 and client.stats()), timeout=30)
                assert failing["last_commit_failure"]["reason"], failing
                health = create_app("api", load_settings(env)).test_client().get("/api/health")
                assert health.json["status"] == "degraded", health.json
                assert "no batch has committed for" in health.json["writer"]["writes_refused"], health.json
                doctor = subprocess.run([sys.executable, "-m", "db", "doctor"], env=env, cwd=ROOT,
                                        capture_output=True, text=True, timeout=120)
                assert doctor.returncode == 1 and "[FAIL] The writer's commits fail: no batch has committed" \
                    in doctor.stdout, doctor.stdout
                proc.send_signal(signal.SIGTERM)
                _out, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert "Traceback" not in err, err[-3000:]
            assert "a disk that failed may have lost" in err, err[-3000:]
    except DiskUnavailable as e:  # a loop device is not in every container (CI's may lack one): said, not failed
        pytest.skip(f"needs an ext4 loop mount: {e}")


@pytest.mark.sqlite_only("tests/test_writer.py::test_writer_killed_twice_mid_run_loses_nothing")
def test_a_writer_out_of_memory_reading_requests_drops_them_and_serves_on(stack: Stack) -> None:
    """Under a memory limit (``prlimit --as``, 480 MB), 32 peers each sending three requests of 16 MiB:
    a MemoryError while ZeroMQ's frames were copied escaped the IO loop, and its teardown waited for
    the commit thread's socket for ever; the writer answered nothing more, silent (fault hunt, round
    40). The request is dropped now (its client sends it again), said in one ERROR line, and the
    writer serves on. Out of memory later, handling a request it had read (its digest: as much again),
    it answered "OpFailed: ... MemoryError", which a client may not send again, and logged a traceback
    for each: now it answers that it may be sent again (``WriterUnavailable``), in the same one line."""
    env = {**stack.env, "TICKSTACK_WRITER_MAX_MESSAGE": str(20 * 2**20)}
    with open(stack.home / "log" / "writer-test.log", "ab") as log:
        proc = subprocess.Popen(["prlimit", "--as=480000000", "--", sys.executable, "-m", "workers.writer"], env=env,
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    stack.procs.append(proc)
    with WriterClient(settings=stack.settings, deadline=30) as client:
        client.wait_ready(30, is_alive=lambda: proc.poll() is None)

    errors: list[dict[str, str]] = []

    def flood(peer: int) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(stack.settings.writer_endpoint)
        try:
            for seq in range(1, 4):
                # Bytes, refused once read (a detail is text): the reading is what runs out of memory.
                sock.send(encode_request(f"big-{peer}", seq, "audit", {"actor": "x", "action": "big",
                                                                      "detail": b"x" * (16 * 2**20)}))
                if sock.poll(4_000):  # answered or not (a dropped one is not, and waited for in full)
                    errors.append(msgpack.unpackb(sock.recv(), strict_map_key=False)["error"])
        finally:
            sock.close()

    peers = [threading.Thread(target=flood, args=(i,)) for i in range(32)]
    for t in peers:
        t.start()
    for t in peers:
        t.join(300)
    assert proc.poll() is None, stack.writer_log()[-3000:]
    # It did run out (reading a request's frames, or later while handling one), or nothing was tested.
    log = stack.writer_log()
    assert "out of memory" in log, log[-3000:]
    # Each answer is the refusal of the bytes (read whole), or a refusal to send again; one line, no traceback.
    assert all(e["type"] == "ValidationError" and "detail" in e["message"] or e["type"] == "WriterUnavailable"
               for e in errors), [e for e in errors if e["type"] not in ("ValidationError", "WriterUnavailable")]
    assert "Traceback" not in log, log[-3000:]
    with WriterClient(settings=stack.settings, deadline=30) as client:
        assert client.ping(timeout=30)["pid"] == proc.pid
        assert client.call("audit", actor="me", action="after")["id"] >= 1
    assert stack.stop(proc) == 0, stack.writer_log()[-3000:]


def _wait_for_a_new_client(writer: Stack) -> None:
    """Until a client made now (connected after whatever happened to the socket) reaches the writer."""
    def a_new_client_is_answered() -> bool:
        try:
            with WriterClient(settings=writer.settings, deadline=1) as client:
                return client.ping(timeout=1)["pid"] == writer.procs[0].pid
        except WriterUnavailable:
            return False

    wait_for("a new client to reach the writer", a_new_client_is_answered, timeout=30)


def test_the_writers_socket_file_removed_under_it_is_bound_again_and_new_clients_reach_it(writer: Stack) -> None:
    """``rm run/writer.sock`` under a running writer: the clients already connected went on, every new
    one waited out its deadline, the writer said nothing and its heartbeats went on, so nothing
    restarted it (fault hunt, round 40). It binds again within a second or so, saying so; a client
    connected before is not cut off."""
    old = WriterClient(settings=writer.settings, deadline=30)
    try:
        assert old.call("audit", actor="me", action="before")["id"] == 1
        socket_path = Path(writer.settings.writer_endpoint.removeprefix("ipc://"))
        socket_path.unlink()
        _wait_for_a_new_client(writer)
        assert socket_path.exists()
        assert old.call("audit", actor="me", action="after")["id"] == 2
    finally:
        old.close()
    assert f"writer: its socket {socket_path} was removed (clients not yet connected could not reach it); bound " \
           "again" in writer.writer_log(), writer.writer_log()[-3000:]


def test_the_run_folder_removed_under_the_writer_is_made_again_and_new_clients_reach_it(writer: Stack) -> None:
    """``rm -r run/`` under a running writer (a tidy-up of the home, as ``rm run/writer.sock`` above): the
    writer tried to bind its socket again, failed for want of the folder, said "restart it" once and
    served on unreachable: every new client (a restarted worker, the API's next request, ``db
    doctor``) waited out its deadline, told only "no answer", and its heartbeats went on, so nothing
    restarted it. It makes its run folder again (private, as at its start) and binds; a client
    connected before is not cut off. A home removed whole is not made again (no new home, and no new
    database, at the old path: tests/test_supervision.py)."""
    old = WriterClient(settings=writer.settings, deadline=30)
    run = writer.settings.run_dir
    try:
        assert old.call("audit", actor="me", action="before")["id"] == 1
        socket_path = Path(writer.settings.writer_endpoint.removeprefix("ipc://"))
        assert socket_path.parent == run
        shutil.rmtree(run)
        _wait_for_a_new_client(writer)
        assert socket_path.exists() and (run.stat().st_mode & 0o777) == 0o700
        assert old.call("audit", actor="me", action="after")["id"] == 2
    finally:
        old.close()
    assert f"writer: its socket {socket_path} was removed (clients not yet connected could not reach it); bound " \
           "again" in writer.writer_log(), writer.writer_log()[-3000:]


@pytest.mark.sqlite_only("tests/test_postgres_faults.py::test_a_write_held_up_by_another_session_is_answered_retryably_while_the_writer_serves_on")
def test_one_batch_that_failed_then_an_idle_writer_is_no_state_of_failing_commits(writer: Stack, peer: RawPeer) -> None:
    """Another program held SQLite's write lock past busy_timeout: one batch failed, answered retryably,
    and the writer then sat idle. Its stats said commits failing from then on, /api/health degraded and
    doctor FAIL, until the next request (an adversarial review, round 40). Two failed batches in a row
    are a state; one is not."""
    from db.health import writes_refused

    other = sqlite3.connect(writer.settings.database_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        reply = peer.ask(request("audit", {"actor": "me", "action": "held"}, seq=1, cid="held"), timeout=60)
        assert reply["ok"] is False and reply["error"]["type"] == "CommitFailed", reply
    finally:
        other.execute("ROLLBACK")
        other.close()
    time.sleep(3)  # idle, longer than the 2 s after which failing commits are said
    with WriterClient(settings=writer.settings, deadline=10) as client:
        stats = client.stats()
    assert stats["commits_failing_s"] is None and writes_refused(stats) is None, stats
    assert stats["last_commit_failure"]["reason"], stats  # said, for the log's reader


@pytest.mark.sqlite_only("tests/test_writer.py::test_writer_killed_twice_mid_run_loses_nothing")
def test_a_database_path_linked_into_a_folder_that_is_not_there_is_said_so(tmp_path: Path) -> None:
    """The database's path a symbolic link into a folder that is not there (a disk not mounted, a link
    mistyped): doctor said "no database ...; start the writer (it creates it) or run `python -m db
    init`", and both failed with SQLite's "unable to open database file". Each (the writer, db init,
    make run's db prepare, doctor) now says which folder is missing, and makes nothing."""
    stack = Stack.linked(tmp_path / "disk")
    try:
        link = stack.settings.database_path
        link.unlink()
        target = tmp_path / "unmounted" / "data" / "ticks.db"
        link.symlink_to(target)
        said_of = f"the folder {target.parent} of the file it names is not there"
        for args in (["-m", "workers.writer"], ["-m", "db", "init"], ["-m", "db", "prepare"], ["-m", "db", "doctor"]):
            done = subprocess.run([sys.executable, *args], env=stack.env, cwd=ROOT, capture_output=True, text=True,
                                  timeout=120)
            said = done.stdout + done.stderr
            assert done.returncode == 1 and said_of in said, (args, said[-3000:])
            assert "start the writer (it creates" not in said, (args, said[-3000:])
        assert not (tmp_path / "unmounted").exists() and link.is_symlink()
    finally:
        stack.close()


def test_many_checkpoint_requests_while_a_reader_holds_the_wal_back_hold_no_write(writer: Stack) -> None:
    """A checkpoint request waits up to 200 ms for readers (``db.ops.CHECKPOINT_OP_WAIT_MS``), and it is
    never recorded as applied: each one, and each resend of it, ran again. With a reader holding a
    snapshot, 100 of them pipelined by one client (a script in a loop; ``db checkpoint`` run by several
    jobs) were run one by one, 20 s of waiting; their client resent all 100 after its first second of
    silence, and again, so none was answered within 120 s and neither was any other client's write
    (fault hunt, stop 53). The same checkpoints asked in one batch now run once for all of it: every
    request is answered, the reader's hold said in each (``busy``), and the write behind them is
    answered too."""
    database = writer.settings.database_path
    with WriterClient(settings=writer.settings) as client:
        client.call("audit", actor="me", action="before-the-reader")
    reader = sqlite3.connect(database, isolation_level=None) if database is not None else None
    try:
        if reader is not None:  # a snapshot of the WAL as it is: a TRUNCATE checkpoint waits for it
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM audit_log").fetchall()
            with WriterClient(settings=writer.settings) as client:
                client.call("audit", actor="me", action="after-the-reader")  # a frame the snapshot lacks
        with WriterClient(settings=writer.settings, deadline=30) as asker, \
                WriterClient(settings=writer.settings, deadline=30) as other:
            asked = [asker.submit("checkpoint", mode="TRUNCATE") for _ in range(100)]
            behind = other.submit("audit", actor="me", action="behind-the-checkpoints")
            for ticket in asked:
                asker.wait(ticket)
            other.wait(behind)
            errors = [str(t.error) for t in asked if t.error is not None]
            assert not errors, f"{len(errors)} of 100 checkpoints failed: {errors[:2]}"
            assert all(t.result()["busy"] == (1 if reader is not None else 0) for t in asked)
            assert behind.result()["id"] >= 1
    finally:
        if reader is not None:
            reader.close()
