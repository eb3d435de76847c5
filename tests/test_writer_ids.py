"""A request id (client id, seq) is applied once, to one request: a resend of the same request gets
the first answer, and a different request under an applied id (another op, other arguments) is refused
with :class:`db.errors.RequestIdReused` and applies nothing, on the fast path and the careful one, from
the writer's cache and from the database's record after a kill -9, and across the schema upgrade that
added the record's digest (v4). Spoken in raw protocol frames, as a client of another language would."""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from db.client import WriterClient
from db.errors import ERROR_TYPES
from db.schema import SCHEMA_VERSION
from testkit.writer import RawPeer, Stack
from tests.test_writer_faults import count, request

#: The error a request gets when its id was already applied to a different request (db.errors).
REUSED = "RequestIdReused"


@contextmanager
def migrated_connection(stack: Stack) -> Iterator[Connection]:
    """A connection of the writer's kind to ``stack``'s database, its schema made: for the tests of the
    record of applied requests through its own statements (``workers.dedup``)."""
    from db.engine import make_write_engine
    from db.schema import migrate

    engine = make_write_engine(stack.settings)
    try:
        with engine.connect() as conn:
            with conn.begin():
                migrate(conn)
            yield conn
    finally:
        engine.dispose()


def refused_as_reused(reply: dict[str, Any], seq: int, cid: str, op: str) -> None:
    assert reply["ok"] is False and reply["error"]["type"] == REUSED, reply
    assert reply["error"]["message"] == (
        f"request {seq} of client {cid} ('{op}') reuses an id already applied to a different request: "
        "nothing of it was applied, and a new request needs a new (client id, seq)"), reply


def test_an_id_reused_for_a_different_request_is_refused_and_nothing_of_it_is_applied(writer: Stack,
                                                                                       peer: RawPeer) -> None:
    """A client of the protocol other than ours (a bug, a client id kept across restarts with seqs from 1
    again) may send a new request under an id already applied. The writer keeps a digest of what each
    applied request asked for: a different op or different arguments under that id fail alone, saying
    so, instead of being answered with the first request's result and silently dropped; the same
    request sent again still gets the first answer (dedup kept). The client raises it, never retried."""
    first = peer.ask(request("audit", {"actor": "me", "action": "first"}, seq=17, cid="reuser"))
    assert first["ok"] is True, first
    other_args = peer.ask(request("audit", {"actor": "me", "action": "second"}, seq=17, cid="reuser"))
    refused_as_reused(other_args, 17, "reuser", "audit")
    trade = {"symbol": "BTCUSD", "side": "buy", "size": 1.0, "entry_price": 100.0}
    other_op = peer.ask(request("open_trade", trade, seq=17, cid="reuser"))
    refused_as_reused(other_op, 17, "reuser", "open_trade")
    again = peer.ask(request("audit", {"actor": "me", "action": "first"}, seq=17, cid="reuser"))
    assert again["ok"] is True and again["result"] == first["result"], again
    assert count(writer, "SELECT count(*) FROM audit_log") == 1
    assert count(writer, "SELECT count(*) FROM audit_log WHERE action = 'second'") == 0
    assert count(writer, "SELECT count(*) FROM trades") == 0
    error_type = ERROR_TYPES.get(REUSED)
    assert error_type is not None and not error_type.retryable


def test_an_id_reused_after_a_kill_is_compared_with_the_record_in_the_database(stack: Stack) -> None:
    """After a restart (here kill -9) the writer's cache is empty: the digest compared is the one the
    database recorded with the request, in the same transaction as its effects."""
    proc = stack.start_writer()
    peer = RawPeer(stack.settings.writer_endpoint)
    try:
        first = peer.ask(request("audit", {"actor": "me", "action": "before-kill"}, seq=3, cid="killed"))
        assert first["ok"] is True, first
        assert stack.stop(proc, signal.SIGKILL) == -signal.SIGKILL
        stack.start_writer()
        refused_as_reused(peer.ask(request("audit", {"actor": "me", "action": "after-kill"}, seq=3, cid="killed"),
                                   timeout=30), 3, "killed", "audit")
        again = peer.ask(request("audit", {"actor": "me", "action": "before-kill"}, seq=3, cid="killed"))
        assert again["ok"] is True and again["result"] == first["result"], again
    finally:
        peer.close()
    assert count(stack, "SELECT count(*) FROM audit_log") == 1
    assert count(stack, "SELECT count(*) FROM audit_log WHERE action = 'after-kill'") == 0


@pytest.mark.parametrize("sql", [
    "UPDATE applied_requests SET committed_at = committed_at - 7200000",
    "UPDATE applied_requests SET committed_at = committed_at + 86400000 WHERE client_id = 'ahead'",
], ids=["all-two-hours-back", "one-a-day-ahead"])
def test_no_request_is_forgotten_after_a_clock_jump_a_downtime_or_a_record_stamped_ahead(stack: Stack,
                                                                                           sql: str) -> None:
    """The record of applied requests is pruned by the wall clock. A jump of it forward of two hours made
    every record old and the next prune forgot them all: a request applied seconds before, sent again
    after a writer restart, was applied twice (fault hunt, round 40). Set two hours back, as such a jump
    (or two hours without a writer) leaves them, the records are kept: a writer prunes none of the
    newest at its start until it has run the TTL. And a record stamped a day ahead (an old jump, since
    put right) does not make the others old: a first version of the fix read its clock from the newest
    record, and its first prune forgot the whole last day (an adversarial review, round 40). The
    restarted writer's first batch prunes."""
    proc = stack.start_writer()
    peer = RawPeer(stack.settings.writer_endpoint)
    try:
        asked = request("audit", {"actor": "me", "action": "once"}, seq=7, cid="victim")
        first = peer.ask(asked)
        assert first["ok"] is True, first
        assert peer.ask(request("audit", {"actor": "me", "action": "ahead"}, seq=1, cid="ahead"))["ok"] is True
        assert stack.stop(proc, signal.SIGKILL) == -signal.SIGKILL
        engine = create_engine(stack.settings.database_url)
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(sql)
        finally:
            engine.dispose()
        stack.start_writer()
        assert peer.ask(request("audit", {"actor": "me", "action": "pruning"}, seq=1, cid="other"),
                        timeout=30)["ok"] is True  # the commit thread's first batch: the prune is due
        again = peer.ask(asked, timeout=30)
        assert again["ok"] is True and again["result"] == first["result"], again
    finally:
        peer.close()
    assert count(stack, "SELECT count(*) FROM audit_log WHERE action = 'once'") == 1
    assert count(stack, "SELECT count(*) FROM applied_requests WHERE client_id = 'victim'") == 1


def test_a_jump_of_the_wall_clock_between_two_batches_moves_the_older_records_as_far(stack: Stack) -> None:
    """The wall clock read by the record of applied requests (``workers.dedup.AppliedRequests``, given a
    clock to read as a test can move it; a real SQLite file and the writer's own statements): jumped two
    hours forward between two batches, the first batch after it moves the older records as far, so the
    next prune, and a writer started after it (a new AppliedRequests reading the moved records), forget
    none of them; a batch that does not commit moves nothing. On PostgreSQL the record goes by the
    server's clock (read once a minute, and when the host's strays): here it jumps as the host's does."""
    from sqlalchemy import text

    from db import ops
    from workers.dedup import AppliedRequests

    now = [1_800_000_000.0]
    with migrated_connection(stack) as conn:
        def clocks() -> AppliedRequests:  # the host's, and the server's
            return AppliedRequests(wall_clock=lambda: now[0], server_clock=lambda _conn: int(now[0] * 1000))

        applied = clocks()

        def batch(records: list[tuple[str, int]], commit: bool = True, ttl: float = 3600.0,
                  who: AppliedRequests = applied) -> None:
            transaction = conn.begin()
            stamp = who.begin_batch(conn)
            ops.record_applied_many(conn, [(cid, seq, b"\x80", None) for cid, seq in records], stamp)
            who.prune(conn, ttl)
            if commit:
                transaction.commit()
                who.remember({})
            else:
                transaction.rollback()

        def stamps() -> dict[str, int]:
            rows = conn.execute(text("SELECT client_id, committed_at FROM applied_requests")).all()
            conn.rollback()
            return dict(rows)

        batch([("before", 1)])
        now[0] += 7200  # two hours forward, at once
        batch([("failed", 1)], commit=False)
        assert stamps() == {"before": 1_800_000_000_000}  # rolled back: nothing moved
        batch([("after", 1)])
        moved = stamps()
        assert set(moved) == {"before", "after"}, moved  # the prune forgot nothing
        # As far as the jump, less the real time between the two batches.
        assert 1_800_007_190_000 <= moved["before"] <= 1_800_007_200_000, moved
        now[0] += 60
        batch([("restarted", 1)], who=clocks())
        assert set(stamps()) == {"before", "after", "restarted"}


class RecordClock:
    """The record of applied requests of one writer after another (``workers.dedup.AppliedRequests``),
    on a wall clock a test moves (the host's, and on a server the server's), through its own statements
    on a real database; each batch records one request, prunes (TTL an hour) and commits."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.now = 1_800_000_000.0
        self.writer = self.new_writer()

    def new_writer(self) -> Any:
        from workers.dedup import AppliedRequests

        self.writer = AppliedRequests(wall_clock=lambda: self.now, server_clock=lambda _conn: int(self.now * 1000))
        return self.writer

    def batch(self, cid: str) -> None:
        from db import ops

        with self.conn.begin():
            stamp = self.writer.begin_batch(self.conn)
            ops.record_applied_many(self.conn, [(cid, 1, b"\x80", None)], stamp)
            self.writer.prune(self.conn, 3600.0)
        self.writer.remember({})

    def kept(self) -> set[str]:
        from sqlalchemy import text

        ids = {cid for (cid,) in self.conn.execute(text("SELECT client_id FROM applied_requests")).all()}
        self.conn.rollback()
        return ids


def test_a_jump_of_the_wall_clock_while_no_writer_ran_is_not_forgotten_by_the_writer_after_the_next(
        stack: Stack) -> None:
    """The wall clock jumped two hours forward while no writer ran (a kill, then NTP's step). The writer
    that started next pruned nothing young (it prunes none of the newest records at its start until it
    has run the TTL), but only in its memory: it stamped its own records two hours after the ones
    before, and the writer after it, started seconds later, took its newest record for its start and
    forgot every record made before the jump, seconds old. A request applied by the first writer and
    sent again to the third was applied twice (fault hunt, stop 53: a real writer whose clock a
    preloaded library moved). The time since the newest record, when a writer starts, is now counted
    as a jump: the records are moved as far, in its first batch. The record's clocks as the other
    test of jumps gives them (real statements, a real database)."""
    with migrated_connection(stack) as conn:
        clock = RecordClock(conn)
        clock.batch("first")
        clock.now += 7200  # while no writer runs
        clock.new_writer()
        clock.batch("second")
        clock.now += 5
        clock.new_writer()
        clock.batch("third")
        assert clock.kept() == {"first", "second", "third"}


def test_a_wall_clock_set_back_under_the_writer_then_forward_while_none_ran_forgets_nothing(stack: Stack) -> None:
    """The wall clock set two hours back while the writer runs (a fast clock put right), then forward
    again while no writer ran: the records made before the step back kept their stamps, two hours after
    the ones made after it, so the next writer went by them as the newest and its first prune forgot
    every record made after the step, seconds old; a resend of one was applied twice (fault hunt,
    stop 53, with a real writer whose clock a preloaded library moved). A step back seen between two
    batches now moves back as far the records stamped after the clock's new now (made before the step:
    none made after it is), so that they keep their age and the newest record is the newest made."""
    with migrated_connection(stack) as conn:
        clock = RecordClock(conn)
        clock.batch("before")
        clock.now -= 7200  # set back under the running writer
        clock.batch("after")
        clock.now += 7200  # and forward again while no writer runs
        clock.new_writer()
        clock.batch("restarted")
        assert clock.kept() == {"before", "after", "restarted"}


def test_a_wall_clock_set_back_then_forward_while_no_writer_ran_forgets_nothing(stack: Stack) -> None:
    """The wall clock set three hours back while no writer ran, then two hours forward before the next
    start: the writer between stamped its records three hours before the newest, so the one after it
    went by that newest record and its first prune forgot them, seconds old (fault hunt, stop 53: a
    real writer whose clock a preloaded library stepped at random, a kill at each downtime, every
    request sent again after each start; 1 to 8 of 18 to 26 requests applied twice in each of six
    runs). A writer's first batch now moves back as far the records stamped ahead of its now, as a
    step back seen while it runs does."""
    with migrated_connection(stack) as conn:
        clock = RecordClock(conn)
        clock.batch("first")
        clock.now -= 3 * 3600  # while no writer runs
        clock.new_writer()
        clock.batch("second")
        clock.now += 2 * 3600  # again while none runs
        clock.new_writer()
        clock.batch("third")
        assert clock.kept() == {"first", "second", "third"}


def test_a_request_recorded_before_schema_v4_has_no_digest_and_is_answered_as_before(stack: Stack) -> None:
    """Schema v4 adds the digest column to ``applied_requests``; the rows recorded before it have none
    (NULL), and a request under one of their ids gets that row's result, as before v4 (nothing to
    compare). Requests applied after the upgrade are compared."""
    proc = stack.start_writer()
    peer = RawPeer(stack.settings.writer_endpoint)
    try:
        first = peer.ask(request("audit", {"actor": "me", "action": "v3"}, seq=5, cid="upgraded"))
        assert first["ok"] is True, first
        assert stack.stop(proc) == 0
        engine = create_engine(stack.settings.database_url)
        try:  # the database as schema v3 left it: no digest column, no version 4
            with engine.begin() as conn:
                conn.exec_driver_sql("ALTER TABLE applied_requests DROP COLUMN digest")
                conn.exec_driver_sql("DELETE FROM schema_version WHERE version >= 4")
        finally:
            engine.dispose()
        stack.start_writer()
        old = peer.ask(request("audit", {"actor": "me", "action": "other"}, seq=5, cid="upgraded"), timeout=30)
        assert old["ok"] is True and old["result"] == first["result"], old
        assert peer.ask(request("audit", {"actor": "me", "action": "v4"}, seq=6, cid="upgraded"))["ok"] is True
        refused_as_reused(peer.ask(request("audit", {"actor": "me", "action": "other"}, seq=6, cid="upgraded")),
                          6, "upgraded", "audit")
    finally:
        peer.close()
    assert count(stack, "SELECT max(version) FROM schema_version") == SCHEMA_VERSION
    assert count(stack, "SELECT count(*) FROM applied_requests WHERE digest IS NULL") == 1
    assert count(stack, "SELECT count(*) FROM audit_log WHERE action = 'other'") == 0


@pytest.mark.parametrize("careful", [False, True], ids=["fast", "careful"])
def test_within_one_batch_an_id_is_applied_once_and_a_different_request_under_it_refused(stack: Stack,
                                                                                         careful: bool) -> None:
    """The same id three times in one batch: the first applies, the same body again gets its answer, a
    different one is refused; on the fast path (one record for the batch) and on the careful one (a
    request failing in its op makes the batch run again with a savepoint per request) alike."""
    stack.start_writer(TICKSTACK_WRITER_BATCH_WAIT="0.3")  # the frames below are one batch
    peer = RawPeer(stack.settings.writer_endpoint)
    client = WriterClient(settings=stack.settings, deadline=20)
    try:
        assert client.ping()["pid"] == stack.procs[0].pid
        frames = [request("audit", {"actor": "me", "action": "once"}, seq=1, cid="batched"),
                  request("audit", {"actor": "me", "action": "twice"}, seq=1, cid="batched"),
                  request("audit", {"actor": "me", "action": "once"}, seq=1, cid="batched")]
        if careful:
            frames.insert(1, request("close_trade", {"trade_id": 404}, seq=2, cid="batched"))  # NotFound
        for frame in frames:
            peer.send(frame)
        replies = [peer.recv() for _ in frames]
    finally:
        peer.close()
    assert len({r.get("batch") for r in replies}) == 1, replies
    if careful:
        assert replies.pop(1)["error"]["type"] == "NotFound"
    once, twice, resent = replies
    assert once["ok"] is True, once
    refused_as_reused(twice, 1, "batched", "audit")
    assert resent["ok"] is True and resent["result"] == once["result"], resent
    assert client.stats()["careful_batches"] == (1 if careful else 0)
    assert count(stack, "SELECT count(*) FROM audit_log") == 1
    assert count(stack, "SELECT count(*) FROM audit_log WHERE action = 'twice'") == 0


def test_a_resend_with_its_columns_packed_another_way_is_the_same_request(writer: Stack, peer: RawPeer) -> None:
    """A column goes packed (float64/int64) or as a plain list (a tuple, a numpy array made a list, a
    column read back from JSON), and the writer runs both the same: a resend of the same ticks
    packed the other way gets the first answer, not a refusal (its caller would take that refusal
    for a failed write and send the ticks again under a new id)."""
    from db.protocol import encode_request, pack_columns

    ticks = {"symbol": ["BTCUSD"] * 20, "ts": [1_704_067_200_000 + i for i in range(20)],
             "bid": [100.0 + i for i in range(20)], "ask": [100.5 + i for i in range(20)]}
    first = peer.ask(encode_request("packer", 1, "insert_ticks", pack_columns("insert_ticks", {"ticks": ticks})))
    assert first["ok"] is True and first["result"] == {"inserted": 20, "duplicates": 0}, first
    plain = peer.ask(encode_request("packer", 1, "insert_ticks", {"ticks": ticks}))
    assert plain["ok"] is True and plain["result"] == first["result"], plain
    as_tuples = peer.ask(encode_request("packer", 1, "insert_ticks",
                                            {"ticks": {name: tuple(col) for name, col in ticks.items()}}))
    assert as_tuples["ok"] is True and as_tuples["result"] == first["result"], as_tuples
    assert count(writer, "SELECT count(*) FROM ticks") == 20


def test_a_sequence_number_out_of_the_protocols_range_is_refused_by_the_client_at_once(writer: Stack) -> None:
    """``submit(op, _seq=2**63 - 1)`` is the protocol's last number: the next new request of that
    client was numbered 2**63, which the writer refuses as an envelope it cannot answer by number, and
    the call waited out its whole deadline for an answer that never came (a bad-input hunt, left Low
    in round 44). A ``_seq`` outside 0..2**63-1, or not an integer, was sent as it was. The client now
    refuses both at once, naming the bound, and sends nothing."""
    with WriterClient(settings=writer.settings, deadline=30) as client:
        for bad in (-1, 2**63, 2**64, 1.5, True, "7"):
            with pytest.raises(ValueError, match=r"_seq must be a whole number from 0 to 2\^63-1") as refused:
                client.submit("audit", _seq=bad, actor="me", action="bad_seq")
            assert repr(bad)[:20] in str(refused.value)
        last = client.submit("audit", _seq=2**63 - 1, actor="me", action="last_number")
        client.wait(last)
        assert last.error is None, last.error
        with pytest.raises(ValueError, match="has used every sequence number.*a new client") as used_up:
            client.call("audit", actor="me", action="one_more")
        assert "2^63-1" in str(used_up.value)
    assert count(writer, "SELECT count(*) FROM audit_log") == 1


@pytest.mark.postgres_only
@pytest.mark.parametrize("clock_a,clock_b,b_restarts", [
    (-7200.0, 0.0, False),  # host A's clock two hours slow; host B's writer runs on
    (0.0, 7200.0, True),  # host B's clock two hours fast; its writer restarts
], ids=["a-two-hours-slow", "b-two-hours-fast"])
def test_a_hosts_clock_off_does_not_make_another_hosts_writer_forget_its_requests(
        stack: Stack, clock_a: float, clock_b: float, b_restarts: bool) -> None:
    """Several hosts' writers (and direct writes) record applied requests in one table on the server,
    and each prunes it, once a minute, of what is older than ``TICKSTACK_DEDUP_TTL``. Each stamped its
    records, and pruned, by its own host's wall clock: with host A's clock two hours slow (or host B's two
    hours fast, a clock kept in local time), host B's next prune forgot every request host A's writer had
    just applied, and a client's resend after host A's writer restarted (the answer lost to a kill -9)
    was applied twice. The record's clock is the server's. The writer's own statements and record
    (:class:`workers.dedup.AppliedRequests`, given each host's clock) on a real PostgreSQL database."""
    import time
    from types import SimpleNamespace

    from sqlalchemy import text

    from db import ops
    from db.engine import make_write_engine
    from db.schema import migrate
    from workers.dedup import AppliedRequests

    engine = make_write_engine(stack.settings)
    try:
        with engine.connect() as conn:
            with conn.begin():
                migrate(conn)

            def batch(host: AppliedRequests, records: list[tuple[str, int]]) -> None:
                with conn.begin():
                    stamp = host.begin_batch(conn)
                    ops.record_applied_many(conn, [(cid, seq, b"\x80", None) for cid, seq in records], stamp)
                    if host.prune_due():
                        host.prune(conn, 3600.0)
                host.remember({})

            def host_clock(offset: float) -> AppliedRequests:
                return AppliedRequests(wall_clock=lambda: time.time() + offset)

            host_b = host_clock(clock_b)
            batch(host_b, [("b-client", 1)])  # host B's writer serves
            batch(host_clock(clock_a), [("victim", 7)])  # host A's writer applies a request, then is killed
            if b_restarts:
                host_b = host_clock(clock_b)
            host_b.last_prune = 0.0  # its prune is due (once a minute)
            batch(host_b, [("b-client", 2)])
            kept = conn.execute(text("SELECT client_id FROM applied_requests ORDER BY client_id")).scalars().all()
            conn.rollback()
            assert kept == ["b-client", "b-client", "victim"], kept
            # host A's writer, restarted, asked again for the request it applied: its first answer.
            resent = SimpleNamespace(cid="victim", seq=7, op="audit", digest=None)
            with conn.begin():
                assert host_clock(clock_a).prior(conn, resent, {}) == b"\x80"
    finally:
        engine.dispose()
