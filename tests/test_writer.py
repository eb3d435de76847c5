"""The single writer, end to end: real writer processes, real SQLite files,
real ZeroMQ sockets; producers and readers in processes of their own."""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import zmq
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import OperationalError

from db.client import WriterClient
from db.engine import make_read_engine
from db.errors import Conflict, NotFound, ValidationError, WriterError
from db.health import integrity
from db.lock import PidLock
from db.models import audit_log_table, ticks_table
from testkit import writer_procs
from testkit.env import ROOT
from testkit.helpers import wait_for
from testkit.postgres import ReadConnection, read_connection
from testkit.writer import Stack, stopped_while_waiting_for_the_lock

ctx = mp.get_context("spawn")


def db_conn(stack: Stack) -> sqlite3.Connection | ReadConnection:
    return read_connection(stack.settings)


def run_producers(stack: Stack, n_producers: int, n_ops: int, n_readers: int, pause: float = 0.0,
                  during: object = None) -> tuple[list[dict], list[dict]]:
    out, rout, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    producers = [ctx.Process(target=writer_procs.producer, args=(stack.env, i, n_ops, out, pause))
                 for i in range(n_producers)]
    readers = [ctx.Process(target=writer_procs.reader, args=(stack.env, stop, rout)) for _ in range(n_readers)]
    for p in readers + producers:
        p.start()
    try:
        if during is not None:
            during()  # type: ignore[operator]
        results = [out.get(timeout=240) for _ in producers]
        stop.set()
        reads = [rout.get(timeout=60) for _ in readers]
    finally:
        stop.set()
        for p in producers + readers:
            p.join(30)
            if p.is_alive():
                p.kill()
    return results, reads


def check_exactly_once(stack: Stack, results: list[dict]) -> None:
    con = db_conn(stack)
    try:
        for r in results:
            source = f"p{r['index']}"
            stored = [s for (s,) in con.execute("SELECT seq FROM ticks WHERE source = ?", (source,))]
            assert Counter(stored) == Counter(r["seqs"]), f"{source}: ticks stored differ from ticks acknowledged"
            audits = Counter(t for (t,) in con.execute("SELECT target FROM audit_log WHERE actor = ?", (source,)))
            assert audits == Counter(r["audits"]), f"{source}: audit rows differ from audits acknowledged"
    finally:
        con.close()


def test_eight_producers_four_readers_no_errors_exactly_once(writer: Stack) -> None:
    n_ops = 250
    results, reads = run_producers(writer, 8, n_ops, 4)
    assert [r["errors"] for r in results] == [[]] * 8
    assert all(len(r["seqs"]) == n_ops // 2 * writer_procs.TICKS_PER_OP for r in results)
    assert all(len(r["audits"]) == n_ops // 2 for r in results)
    check_exactly_once(writer, results)
    assert [r["errors"] for r in reads] == [[]] * 4
    # Readers read while writes committed: they saw the table grow.
    assert all(r["reads"] > 10 and r["distinct_counts"] > 2 for r in reads), reads
    stats = WriterClient(settings=writer.settings, deadline=5).stats()
    assert stats["lock_errors"] == 0 and stats["requests_failed"] == 0 and stats["commit_failures"] == 0
    assert stats["requests_ok"] == 8 * n_ops
    assert stats["max_batch"] > 1  # concurrent requests were group-committed


def test_writer_killed_twice_mid_run_loses_nothing(stack: Stack) -> None:
    proc = stack.start_writer()
    n_ops = 300

    def kill_and_restart_twice() -> None:
        nonlocal proc
        engine = make_read_engine(stack.settings, pool_size=1)
        for threshold in (300, 900):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with engine.connect() as conn:
                    if conn.execute(select(func.count()).select_from(audit_log_table)).scalar_one() >= threshold:
                        break
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            time.sleep(0.3)  # requests sent now find no writer
            proc = stack.start_writer()
        engine.dispose()

    results, reads = run_producers(stack, 8, n_ops, 2, pause=0.002, during=kill_and_restart_twice)
    assert [r["errors"] for r in results] == [[]] * 8
    assert all(len(r["audits"]) == n_ops // 2 for r in results)
    check_exactly_once(stack, results)
    assert [r["errors"] for r in reads] == [[]] * 2
    assert stack.writer_log().count("writer ready") == 3
    assert WriterClient(settings=stack.settings, deadline=5).stats()["dedup_hits"] >= 0


BAD_TICK_CASES = [
    ("ticks", [], "a batch must hold 1..10000"),
    ("ticks", [{"symbol": "BTCUSD", "ts": 1, "bid": 1.0, "ask": 2.0}] * 10_001, "a batch must hold 1..10000"),
    ("ticks", [{"ts": 1, "bid": 1.0, "ask": 2.0}], "missing field 'symbol'"),
    ("ticks", [{"symbol": "BTCUSD", "ts": 1, "bid": 1.0, "ask": 2.0, "colour": "red"}], "unexpected field 'colour'"),
    ("ticks", [{"symbol": "BTCUSD", "ts": "yesterday", "bid": 1.0, "ask": 2.0}],
     "ticks[0].ts: 'yesterday' is not epoch"),
    ("ticks", [{"symbol": "BTCUSD", "ts": 1, "bid": "1.0", "ask": 2.0}], "ticks[0].bid: '1.0' is not a number"),
    ("ticks", [{"symbol": "BTCUSD", "ts": 1, "bid": math.nan, "ask": 2.0}], "ticks[0].bid: nan is not a price"),
    ("ticks", [{"symbol": "BTCUSD", "ts": 1, "bid": 1.0, "ask": math.inf}], "ticks[0].ask: inf is not a price"),
    ("ticks", [{"symbol": "BTCUSD", "ts": 1, "bid": -1.0, "ask": 2.0}], "ticks[0].bid: -1.0 is not a price"),
    ("ticks", [{"symbol": "BTCUSD", "ts": 1, "bid": 2.5, "ask": 2.0}], "bid 2.5 is above ask 2.0"),
    ("ticks", [{"symbol": "btc usd", "ts": 1, "bid": 1.0, "ask": 2.0}], "'btc usd' is not a symbol"),
    ("ticks", [{"symbol": "BTCUSD", "ts": 1, "bid": 1.0, "ask": 2.0, "volume": -3}],
     "ticks[0].volume: -3 is not a volume"),
    ("ticks", {"symbol": ["BTCUSD"], "ts": [1, 2], "bid": [1.0], "ask": [2.0]}, "1 values, expected 2"),
    ("ticks", "BTCUSD 1 2", "expected a list of ticks"),
]


def test_each_bad_input_fails_alone_in_its_batch(stack: Stack) -> None:
    # A batch window makes the writer take all of these into one transaction.
    stack.start_writer(TICKSTACK_WRITER_BATCH_WAIT="0.5")
    client = WriterClient(settings=stack.settings, deadline=10)
    good = [{"symbol": "BTCUSD", "ts": 1_700_000_000_000 + i, "bid": 1.0, "ask": 1.1, "source": "good", "seq": i}
            for i in range(3)]
    pipe = client.pipeline(window=100)
    tickets = [pipe.submit("insert_ticks", ticks=[good[0]])]
    bad = []
    for field, value, message in BAD_TICK_CASES:
        bad.append((pipe.submit("insert_ticks", **{field: value}), message))
    bad.append((pipe.submit("no_such_op", x=1), "unknown op 'no_such_op'"))
    bad.append((pipe.submit("insert_ticks"), "missing field 'ticks'"))
    bad.append((pipe.submit("insert_ticks", ticks=[good[2]], extra=1), "unexpected field 'extra'"))
    bad.append((pipe.submit("audit", actor="me", action="x", result="maybe"), "'maybe' is not one of ok, error"))
    bad.append((pipe.submit("open_trade", symbol="BTCUSD", side="buy", size=1.0, entry_price=100.0, stop_loss=101.0),
                "stop_loss 101.0 must be below the entry 100.0"))
    bad.append((pipe.submit("close_trade", trade_id=99), "trade 99 does not exist"))
    tickets.append(pipe.submit("insert_ticks", ticks=[good[1]]))
    tickets.append(pipe.submit("audit", actor="me", action="still-works"))
    pipe.drain()
    for ticket, message in bad:
        assert ticket.error is not None, f"accepted: {message}"
        assert isinstance(ticket.error, ValidationError | NotFound), ticket.error
        assert message in str(ticket.error), (message, str(ticket.error))
    assert [t.error for t in tickets] == [None, None, None]
    batches = {t.batch for t in tickets} | {t.batch for t, _ in bad}
    assert len(batches) == 1, f"expected one transaction, got batches {batches}"
    con = db_conn(stack)
    assert sorted(s for (s,) in con.execute("SELECT seq FROM ticks")) == [0, 1]
    assert con.execute("SELECT count(*) FROM audit_log").fetchone() == (1,)
    assert con.execute("SELECT count(*) FROM trades").fetchone() == (0,)
    con.close()


def test_garbage_frames_get_error_replies_and_the_writer_keeps_serving(stack: Stack) -> None:
    stack.start_writer(TICKSTACK_WRITER_MAX_MESSAGE="65536")
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(stack.settings.writer_endpoint)
    cases = [
        ([b"\xc1\xc1 not msgpack"], "not valid msgpack"),
        ([msgpack.packb([1, 2, 3])], "request must be a map"),
        ([msgpack.packb({"op": "audit", "cid": "c"})], "no sequence number"),
        ([msgpack.packb({"op": "audit", "seq": 1})], "no client id"),
        # Stored on SQLite, a DataError naming SQL on PostgreSQL: no text of ours holds a NUL.
        ([msgpack.packb({"op": "audit", "seq": 1, "cid": "a\x00b", "args": {"actor": "x", "action": "y"}})],
         "client id 'a\\x00b' holds a character that is not printable"),
        # A newline and an escape sequence went into the writer's log raw, in the lines that name a
        # client by its id: a client could write a line of its own (fault hunt, stop 53).
        ([msgpack.packb({"op": "audit", "seq": 1, "cid": "bot\n2026-12-08 ERROR writer: forged", "args": {}})],
         "client id 'bot\\n2026-12-08 ERROR writer: forged' holds a character that is not printable"),
        ([msgpack.packb({"op": "audit", "seq": 1, "cid": "\x1b[2Jbot", "args": {}})], "not printable"),
        ([msgpack.packb({"op": "audit", "seq": 1, "cid": "bot\u200bone", "args": {}})], "not printable"),
        ([msgpack.packb({"op": "audit", "seq": 1, "cid": "c", "args": [1]})], "args must be a map"),
        ([msgpack.packb({"op": "audit", "seq": 1, "cid": "c", "args": {}}), b"more"], "expected one message frame"),
        ([msgpack.packb({"op": "audit", "seq": 1, "cid": "c", "args": {"actor": "x" * 70_000}})], "over the limit"),
        ([msgpack.packb({"op": "drop_table", "seq": 2, "cid": "c", "args": {}})], "unknown op 'drop_table'"),
    ]
    try:
        for frames, message in cases:
            sock.send_multipart(frames)
            reply = msgpack.unpackb(sock.recv())
            assert reply["ok"] is False and message in reply["error"]["message"], (message, reply)
        # Over the hard cap ZeroMQ drops the peer unread; the writer lives on.
        sock.send(b"\x00" * (65536 * 4 + 10))
        client = WriterClient(settings=stack.settings, deadline=10)
        assert client.ping()["pid"] == stack.procs[0].pid
        assert client.call("audit", actor="me", action="after-garbage")["id"] == 1
        assert client.stats()["malformed"] == len(cases) - 1  # the unknown op is a failed request, not malformed
    finally:
        sock.close()
        zctx.term()


def test_retry_of_a_committed_request_is_not_applied_twice_even_across_restart(stack: Stack) -> None:
    proc = stack.start_writer()
    zctx = zmq.Context()

    def send(payload: bytes) -> dict:
        sock = zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(stack.settings.writer_endpoint)
        try:
            sock.send(payload)
            return msgpack.unpackb(sock.recv())
        finally:
            sock.close()

    request = msgpack.packb({"v": 1, "cid": "retry-test", "seq": 7, "op": "audit",
                             "args": {"actor": "me", "action": "once"}})
    first = send(request)
    again = send(request)
    assert first["ok"] and again["result"] == first["result"]
    assert stack.stop(proc) == 0
    stack.start_writer()
    after_restart = send(request)
    zctx.term()
    assert after_restart["result"] == first["result"]
    con = db_conn(stack)
    assert con.execute("SELECT count(*) FROM audit_log WHERE action = 'once'").fetchone() == (1,)
    con.close()


@pytest.mark.database_independent("the writer's and the leaders' file locks, with no database")
def test_a_lock_is_taken_even_while_someone_reads_who_holds_it(tmp_path: Path) -> None:
    """``read_lock_holder`` (``db health``, the console's database page) holds the lock shared for a
    moment to tell whether it is held; a writer or a leader starting in that moment found it taken and
    refused to start, or stood by, or (``--until-idle``) exited 3 naming nobody: 16 times in 5,000 with
    a reader in a loop beside it. Now every one of 3,000 tries takes it."""
    path = tmp_path / "some.lock"
    path.touch(mode=0o600)  # the reader opens it
    reader = subprocess.Popen([sys.executable, "-c", "import sys\nfrom db.lock import read_lock_holder\n"
                               f"while True: read_lock_holder({str(path)!r})"], cwd=ROOT)
    try:
        time.sleep(0.3)  # the reader's loop is running
        refused = 0
        for _ in range(3000):
            lock = PidLock(path)
            if lock.try_acquire():
                lock.release()
            else:
                refused += 1
        assert reader.poll() is None
    finally:
        reader.kill()
        reader.wait()
    assert refused == 0


@pytest.mark.database_independent("the writer's and the leaders' file locks, with no database")
def test_a_lock_whose_pid_cannot_be_written_is_let_go(tmp_path: Path) -> None:
    """When writing the pid fails after the lock was taken (a full disk; here a FIFO, which cannot be
    truncated), the error is raised and the lock let go: its descriptor was lost still holding it, and
    every later try of the process (a jobs worker's, every poll) found it taken, for ever."""
    path = tmp_path / "some.lock"
    os.mkfifo(path, 0o600)
    for _ in range(2):  # the second try meets the same error, not a lock held by the first
        with pytest.raises(OSError, match="Invalid argument"):
            PidLock(path).try_acquire()


def test_second_writer_refuses_and_first_keeps_serving(writer: Stack) -> None:
    first = writer.procs[0]
    second = subprocess.run([sys.executable, "-m", "workers.writer"], cwd=ROOT, capture_output=True, text=True,
                            env={**writer.env, "TICKSTACK_WRITER_LOCK_WAIT": "1"}, timeout=60)
    assert second.returncode == 3
    assert f"another writer (pid {first.pid}) holds" in second.stderr
    assert "waiting up to 1 s for it to end" in second.stderr, second.stderr[-2000:]
    # Stopped while it waits (circus stopping it), a stray signal first: handled, not the default action
    # (SIGUSR1 ended it at once, not a word: review of round 39).
    code, err = stopped_while_waiting_for_the_lock(writer.env, signal.SIGUSR1)
    assert code == 0 and "SIGUSR1 received: ignored" in err and "stopped while it waited" in err, err
    client = WriterClient(settings=writer.settings, deadline=10)
    assert client.ping()["pid"] == first.pid
    assert client.call("audit", actor="me", action="still-serving")["id"] == 1
    # python -m db init also respects the lock instead of writing.
    init = subprocess.run([sys.executable, "-m", "db", "init"], env=writer.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert init.returncode == 0 and "is running and keeps the schema current: nothing to do" in init.stdout, \
        init.stdout


def test_a_writer_started_while_another_stops_waits_for_its_lock_and_takes_over(writer: Stack) -> None:
    """circus's reload starts the new writer before it stops the old one: the new one exited at once
    (another writer holds the lock), and circus started another only once the whole reload was done,
    22 s without a writer (fault hunt, round 39). A writer started while another holds the lock now
    waits for it to end (``TICKSTACK_WRITER_LOCK_WAIT``), then serves; nothing of the old one's is lost."""
    first = writer.procs[0]
    client = WriterClient(settings=writer.settings, deadline=30)
    assert client.call("audit", actor="me", action="before")["id"] == 1
    log = writer.home / "log" / "second-writer.log"
    with open(log, "wb") as out:
        second = subprocess.Popen([sys.executable, "-m", "workers.writer"], env=writer.env, cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT)
    writer.procs.append(second)
    wait_for("the second writer to wait", lambda: "waiting up to 15 s for it to end" in log.read_text(), timeout=30)
    # Why it waits, as what it may be: it said "(circus's reload starts the new writer before it stops the
    # old one)" of a writer started by hand beside one that runs on (a new user's run, round 44).
    assert "it may be this home's previous writer" in log.read_text(), log.read_text()
    assert writer.stop(first) == 0
    wait_for("the second writer to serve", lambda: client.ping()["pid"] == second.pid, timeout=30)
    assert client.call("audit", actor="me", action="after")["id"] == 2
    assert second.poll() is None


def test_doctor_on_a_writer_that_has_not_committed_yet_says_so(stack: Stack) -> None:
    """It said "commit p99 None ms" right after a restart."""
    stack.start_writer()
    doctor = subprocess.run([sys.executable, "-m", "db", "doctor"], env=stack.env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    (said,) = [line for line in doctor.stdout.splitlines() if "The writer (pid" in line]
    assert "no commit yet" in said and "None" not in said, doctor.stdout


def test_a_sighup_stops_the_writer_and_the_workers_gracefully(stack: Stack) -> None:
    """SIGHUP (a terminal closed; the console offers it; ``circusctl signal``) killed the writer and
    every worker at once, by the default action: no drain, no final checkpoint, no line in the log, a
    tick batch in flight never spooled. It is a graceful stop now, as SIGTERM (under circus, a new
    process follows)."""
    writer = stack.start_writer()
    log = stack.home / "log" / "monitor-hup.log"
    monitor = stack.start_worker("workers.monitor", log)
    wait_for("the monitor to lead", lambda: "monitor: leading" in log.read_text(), timeout=60)
    client = WriterClient(settings=stack.settings, deadline=10)
    assert client.call("audit", actor="me", action="before-hup")["id"] >= 1
    client.close()
    monitor.send_signal(signal.SIGHUP)
    assert monitor.wait(60) == 0
    writer.send_signal(signal.SIGHUP)
    assert writer.wait(60) == 0
    said = stack.writer_log()
    assert "writer: SIGHUP received; draining" in said and "; exiting" in said, said[-2000:]


def test_sigterm_with_requests_in_flight_loses_nothing_and_truncates_wal(stack: Stack) -> None:
    """A producer streams on through a writer restart: what the stopping writer took in is committed
    and answered, what it left unread is resent to the next writer; every row once."""
    proc = stack.start_writer()
    out, started = ctx.Queue(), ctx.Event()
    batches, batch = 150, 1000
    producer = ctx.Process(target=writer_procs.pipelined_producer, args=(stack.env, batches, batch, out, started))
    producer.start()
    try:
        assert started.wait(60), "producer never got going"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        log = stack.writer_log()
        assert "SIGTERM received; draining" in log and ("final checkpoint" if stack.settings.database_path
                                                         is not None else "a server checkpoints its own WAL") in log
        if stack.settings.database_path is not None:
            wal = Path(f"{stack.settings.database_path}-wal")
            assert not wal.exists() or wal.stat().st_size == 0
        second = stack.start_writer()  # as circus would
        result = out.get(timeout=120)
    finally:
        producer.join(30)
    assert result["errors"] == []
    assert result["acked_rows"] == batches * batch
    assert stack.stop(second) == 0
    con = db_conn(stack)
    assert con.execute("SELECT count(*) FROM ticks").fetchone() == (batches * batch,)
    assert con.execute("SELECT count(DISTINCT seq) FROM ticks").fetchone() == (batches * batch,)
    if stack.settings.database_path is not None:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    else:
        check = integrity(stack.settings)
        assert check["ok"] and "skipped" not in check, check
    con.close()


def test_a_restart_under_a_steady_trickle_stops_once_caught_up_not_at_the_deadline(stack: Stack) -> None:
    """A lone ``circusctl restart writer`` while the feeds run: producers never go quiet, so a
    drain that waits for quiet lasts its whole deadline. The writer serves its drain_idle second,
    then stops as soon as nothing is queued."""
    proc = stack.start_writer(TICKSTACK_WRITER_DRAIN_IDLE="0.5", TICKSTACK_WRITER_DRAIN_DEADLINE="120")
    stop, answered = threading.Event(), []

    def trickle() -> None:
        client = WriterClient(settings=stack.settings, deadline=3)
        while not stop.is_set():
            try:
                answered.append(client.call("audit", actor="feed", action="tick")["id"])
            except WriterError:
                pass
            stop.wait(0.05)
        client.close()

    feeder = threading.Thread(target=trickle)
    feeder.start()
    try:
        wait_for("the trickle to reach the writer", lambda: len(answered) >= 5)
        proc.send_signal(signal.SIGTERM)
        # Far below the deadline of 120 s; the old rule (wait for a quiet second) waited all of it.
        assert proc.wait(60) == 0
    finally:
        stop.set()
        feeder.join(30)
    log = stack.writer_log()
    assert "drain deadline reached" not in log, log[-2000:]
    assert ("final checkpoint done" if stack.settings.database_path is not None else
            "a server checkpoints its own WAL); exiting") in log, log[-2000:]


@pytest.mark.sqlite_only("tests/test_writer.py::"
                         "test_a_restart_under_a_steady_trickle_stops_once_caught_up_not_at_the_deadline")
def test_a_reader_on_the_last_frame_does_not_hold_the_writers_stop(stack: Stack) -> None:
    """A ``circusctl restart writer`` leaves the readers running (the console, the API, analysis): at
    the SIGTERM one may hold a snapshot of the WAL's last frame. The final checkpoint then copies
    every frame into the database file, and only emptying the WAL waits for that reader. The writer
    waited for it anyway: ``busy_timeout`` (5 s) an attempt, then more attempts for 3 s, and said
    "partial" of a checkpoint that had copied everything. Past circusctl's own 5 s, a new user's
    ``circusctl restart writer --waiting`` timed out, and the next command found circus still busy
    with it. Now every write committed is in the file and it says so."""
    proc = stack.start_writer()
    with WriterClient(settings=stack.settings, deadline=10) as client:
        for i in range(20):
            client.call("audit", actor="test", action="write", detail=str(i))
    path = stack.settings.database_path
    reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM audit_log WHERE actor = 'test'").fetchone() == (20,)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        reader.close()
    log = stack.writer_log()
    assert "final checkpoint done: every committed write is in the database file" in log, log[-2000:]
    assert "partial" not in log, log[-2000:]
    # The database file alone (its WAL left aside) holds every acknowledged write.
    alone = stack.home / "alone.db"
    alone.write_bytes(Path(path).read_bytes())
    con = sqlite3.connect(f"file:{alone}?immutable=1", uri=True)
    try:
        assert con.execute("SELECT count(*) FROM audit_log WHERE actor = 'test'").fetchone() == (20,)
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        con.close()


def test_trades_ops_and_typed_errors(writer: Stack) -> None:
    client = WriterClient(settings=writer.settings, deadline=10)
    client.call("insert_ticks", ticks=[{"symbol": "BTCUSD", "ts": 1_700_000_000_000, "bid": 100.0, "ask": 101.0}])
    opened = client.call("open_trade", symbol="BTCUSD", side="buy", size=2.0, stop_loss=90.0, take_profit=120.0)
    assert opened["entry_price"] == 101.0  # a buy opens at the ask
    client.call("update_trade", trade_id=opened["id"], stop_loss=95.0, reason="trailing")
    closed = client.call("close_trade", trade_id=opened["id"], reason="manual")
    assert closed == {"id": opened["id"], "exit_price": 100.0, "pnl": -2.0}  # closes at the bid
    with pytest.raises(Conflict, match="already closed"):
        client.call("close_trade", trade_id=opened["id"])
    with pytest.raises(NotFound):
        client.call("update_trade", trade_id=12345, stop_loss=1.0)
    # A stop set where there was none said Python's None ("stop_loss None -> 96.0", on the console too).
    other = client.call("open_trade", symbol="BTCUSD", side="buy", size=1.0)
    client.call("update_trade", trade_id=other["id"], stop_loss=96.0, take_profit=130.0, reason="manual")
    con = db_conn(writer)
    kinds = [k for (k,) in con.execute("SELECT kind FROM trade_events WHERE trade_id = 1 ORDER BY id")]
    details = [d for (d,) in con.execute("SELECT detail FROM trade_events WHERE kind IN ('trailing', 'manual') "
                                         "ORDER BY id")]
    con.close()
    assert kinds == ["opened", "trailing", "closed"]
    assert details == ["stop_loss 90.0 -> 95.0", "stop_loss set to 96.0, take_profit set to 130.0"]


def test_client_refuses_sharing_across_threads_and_unsendable_args(writer: Stack) -> None:
    client = WriterClient(settings=writer.settings, deadline=5)
    client.ping()
    errors: list[BaseException] = []

    def other() -> None:
        try:
            client.ping()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1 and "not thread-safe" in str(errors[0])
    with pytest.raises(ValidationError, match="cannot be sent"):
        client.call("audit", actor="me", action="x", detail=object())


def test_writer_unavailable_after_deadline(stack: Stack) -> None:
    from db.errors import WriterUnavailable

    # Nothing answers at this home's endpoint: the call ends at its deadline (a hang is pytest-timeout's).
    client = WriterClient(settings=stack.settings, deadline=0.5)
    with pytest.raises(WriterUnavailable, match="no answer from the writer at .* within its deadline"):
        client.call("audit", actor="me", action="nobody-home")


def test_give_up_by_bounds_the_requests_in_flight_and_those_sent_after(stack: Stack) -> None:
    """A stopping worker's bound (``WriterClient.give_up_by``): requests with an hour's deadline and
    no writer give up by the bound, and one sent after it still gets its last try, then gives up too
    (before, a request sent after the stop signal had a deadline of its own again: the flush outlived
    circus's graceful_timeout). No writer runs here: every one ends WriterUnavailable."""
    from db.errors import WriterUnavailable

    client = WriterClient(settings=stack.settings, deadline=3600)
    first = [client.submit("audit", actor="me", action=f"in-flight-{i}") for i in range(3)]
    client.give_up_by(0.3)
    later = client.submit("audit", actor="me", action="sent-after")
    for ticket in (*first, later):
        client.wait(ticket)  # an hour each without the bound (the test's own timeout fails first)
        assert isinstance(ticket.error, WriterUnavailable), ticket.error
    with pytest.raises(ValueError, match="give_up_by: seconds"):
        client.give_up_by(float("nan"))
    client.close()


@pytest.mark.sqlite_only("tests/test_postgres.py::test_the_web_app_and_read_engines_cannot_write")
def test_read_engine_cannot_write(writer: Stack) -> None:
    engine = make_read_engine(writer.settings, pool_size=1)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA query_only")).scalar() == 1
        with pytest.raises(OperationalError, match="readonly|read-only|query_only"):
            conn.execute(insert(ticks_table).values(symbol="X", ts=1, bid=1.0, ask=1.0, volume=0, source="x", seq=1))
    engine.dispose()


@pytest.mark.sqlite_only("tests/test_file_modes.py::test_every_file_and_socket_of_the_running_stack_is_private")
def test_database_files_are_private(writer: Stack) -> None:
    settings = writer.settings
    WriterClient(settings=settings, deadline=5).call("audit", actor="me", action="x")
    assert os.stat(settings.database_path).st_mode & 0o077 == 0
    assert os.stat(settings.home).st_mode & 0o777 == 0o700
    assert os.stat(settings.run_dir).st_mode & 0o777 == 0o700


def test_pipeline_reports_only_tickets_the_caller_holds(writer: Stack) -> None:
    """on_done never sees the ticket ``submit`` is about to return: callers
    key their own records on it right after (the tick ingestor does)."""
    held: dict[int, int] = {}
    seen: list[int] = []

    def on_done(ticket) -> None:  # noqa: ANN001
        assert ticket.seq in held, f"on_done for request {ticket.seq} before submit returned it"
        seen.append(held.pop(ticket.seq))

    client = WriterClient(settings=writer.settings, deadline=10)
    with client.pipeline(window=4, on_done=on_done) as pipe:
        for i in range(300):
            ticket = pipe.submit("audit", actor="me", action="pipelined", target=str(i))
            held[ticket.seq] = i
            if i % 50 == 0:
                time.sleep(0.05)  # let answers pile up before the next submit
    assert seen == list(range(300)) and pipe.failed == []


def test_full_queue_answers_busy_and_clients_back_off_until_committed(stack: Stack) -> None:
    # A tiny queue and a batch window: a burst of pipelined requests overflows it.
    stack.start_writer(TICKSTACK_WRITER_MAX_QUEUE="2", TICKSTACK_WRITER_BATCH_WAIT="0.2",
                       TICKSTACK_WRITER_MAX_BATCH="2")
    client = WriterClient(settings=stack.settings, deadline=60)
    with client.pipeline(window=40) as pipe:
        for i in range(40):
            pipe.submit("audit", actor="me", action="burst", target=str(i))
    assert pipe.failed == [] and pipe.completed == 40
    stats = client.stats()
    assert stats["busy_replies"] > 0, stats
    assert stats["max_batch"] <= 2 and stats["queue_depth"] == 0
    con = db_conn(stack)
    targets = Counter(t for (t,) in con.execute("SELECT target FROM audit_log WHERE action = 'burst'"))
    con.close()
    assert targets == Counter(str(i) for i in range(40))  # each exactly once


def test_db_checkpoint_says_what_it_did_in_words_and_in_json_when_asked(writer: Stack) -> None:
    """``python -m db checkpoint`` printed SQLite's raw answer ({"busy": 0, "log": 3, ...}); it now
    says what was done, and ``--json`` gives the answer to a script. SQLite answers a TRUNCATE that
    emptied the WAL with 0 of 0 pages: the words said "0 of 0 WAL pages copied" of a 2 MiB WAL (a new
    user's first checkpoint). They now say what the WAL held, from its size before and after, as the
    console and the jobs worker do (:func:`db.checkpoints.checkpoint_words`)."""
    with WriterClient(settings=writer.settings, deadline=10) as client:
        for i in range(20):
            client.call("audit", actor="me", action="x", detail=str(i))

    def checkpoint(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "db", "checkpoint", *flags], env=writer.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    words = checkpoint()
    assert words.returncode == 0, words.stderr[-2000:]
    if writer.settings.database_path is not None:
        said = re.fullmatch(r"checkpoint TRUNCATE: every page of the WAL copied into the database and the WAL emptied "
                            r"\(the WAL went from ([\d.]+) (B|KiB|MiB) to 0 B\)\n", words.stdout)
        assert said and float(said.group(1)) > 0, words.stdout
    else:
        assert words.stdout == "checkpoint: nothing to do, a PostgreSQL server checkpoints itself\n", words.stdout
    answer = checkpoint("--json", "--mode", "passive")
    if writer.settings.database_path is not None:
        assert answer.returncode == 0, answer
        assert json.loads(answer.stdout) == {"mode": "PASSIVE", "busy": 0, "log": 0, "checkpointed": 0,
                                             "wal_before": 0, "wal_after": 0}, answer
    else:  # not zeros, which read as a checkpoint that copied nothing: what the words say
        assert answer.returncode == 0 and json.loads(answer.stdout) == {
            "skipped": "nothing to do, a PostgreSQL server checkpoints itself"}, answer


def test_a_writer_whose_lock_file_is_removed_drains_and_exits_so_no_second_writer_serves_beside_it(
        stack: Stack) -> None:
    """A lock file removed (a person tidying the folder) let a second writer lock a new file and
    serve beside the first, both committing, each to its own clients (a fault hunter's run: audit ids
    interleaved from two writers). The writer checks its lock's path every second now, as the
    leaders do, and drains and exits 3 when it names another file or none; the next writer serves."""
    first = stack.start_writer()
    with WriterClient(settings=stack.settings, deadline=30) as client:
        assert client.call("audit", actor="me", action="before")["id"] == 1
    stack.settings.writer_lock_path.unlink()
    assert first.wait(timeout=60) == 3, stack.writer_log()[-3000:]
    assert "was removed or replaced: another writer could start beside this one" in stack.writer_log()
    second = stack.start_writer()
    with WriterClient(settings=stack.settings, deadline=30) as client:
        assert client.call("audit", actor="me", action="after")["id"] == 2
        assert client.ping()["pid"] == second.pid
    assert stack.stop(second) == 0
