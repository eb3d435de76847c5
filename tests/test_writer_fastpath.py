"""Issue 10: the writer's per-request cost cut to what the work needs, with every guarantee kept.

* **Packed columns** (:mod:`db.protocol`): a column of numbers may travel as one msgpack extension
  value (little-endian float64 or int64), and means exactly the list it was packed from: the same
  rows are stored, and a bad value gets the same message (field, index, reason) either way.
* **Fast batches** (:mod:`workers.commit`): a batch runs with no savepoint per request and one
  record of applied requests per batch; only a batch in which something failed runs again with a
  savepoint per request, with the same results (``careful_batches`` in the writer's stats counts
  those).
* **The benchmark** reports the ratios the issue asks for.

Real writer processes, real SQLite (or PostgreSQL with ``--database postgresql``), real ZeroMQ.
No test asserts a time.
"""
from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import struct
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import msgpack
import pytest
from sqlalchemy import text

from db.client import WriterClient
from db.engine import make_read_engine
from db.errors import NotFound, ValidationError
from db.protocol import decode_request, encode_request
from db.validation import MAX_PRICE
from db.wal_readers import WAL_CONNECTED, pids_locking
from testkit.env import ROOT
from testkit.helpers import T0, ConsoleClient, wait_for
from testkit.writer import RawPeer, Stack

#: The wire format's extension types of packed columns (a contract with every client: pinned here).
EXT_FLOAT64, EXT_INT64 = 1, 2
N = 20  # ticks per batch in these tests: at least db.protocol.PACK_MIN, so the client packs them


def rows(stack: Stack, sql: str, **params: Any) -> list[tuple]:
    engine = make_read_engine(stack.settings, pool_size=1)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


class Peer(RawPeer):
    """A :class:`~testkit.writer.RawPeer` that builds its frames from an op and its arguments (columns
    packed by hand, or plain lists), each under a new seq."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint)
        self.seq = 0

    def ask(self, op: str, args: dict[str, Any], cid: str = "peer") -> dict[str, Any]:  # type: ignore[override]
        self.seq += 1
        return super().ask(msgpack.packb({"v": 1, "cid": cid, "seq": self.seq, "op": op, "args": args}), timeout=30.0)


@pytest.fixture
def peer_class() -> type[Peer]:
    """conftest's ``peer`` fixture, as this module's :class:`Peer`."""
    return Peer


def f64(values: list[float]) -> msgpack.ExtType:
    """A packed float64 column, built by hand (independent of the client's packing)."""
    return msgpack.ExtType(EXT_FLOAT64, struct.pack(f"<{len(values)}d", *values))


def i64(values: list[int]) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_INT64, struct.pack(f"<{len(values)}q", *values))


def tick_columns(source: str, n: int = N) -> dict[str, list]:
    bid = [100.0 + i * 0.25 for i in range(n)]
    return {"symbol": ["BTCUSD", "EURUSD"] * (n // 2), "ts": [T0 + i for i in range(n)], "bid": bid,
            "ask": [b + 0.5 for b in bid], "volume": [float(i % 3) for i in range(n)], "source": [source] * n,
            "seq": list(range(n))}


def packed(cols: dict[str, list]) -> dict[str, Any]:
    """``cols`` with every number column packed by hand: float columns as float64, int ones as int64."""
    out: dict[str, Any] = {}
    for name, col in cols.items():
        if all(type(v) is float for v in col):
            out[name] = f64(col)
        elif all(type(v) is int for v in col):
            out[name] = i64(col)
        else:
            out[name] = col
    return out


# --- the wire format ------------------------------------------------------------------------------------------


def test_packed_columns_decode_to_exactly_the_lists_they_were_packed_from() -> None:
    from db import protocol
    from db.protocol import PACK_MIN, pack_columns

    assert (protocol.EXT_FLOAT64, protocol.EXT_INT64) == (EXT_FLOAT64, EXT_INT64) and N >= PACK_MIN
    n = PACK_MIN
    cols = {"ts": [T0 + i for i in range(n - 2)] + [0, 2**63 - 1],
            "bid": [1.5] * (n - 4) + [math.nan, math.inf, -0.0, 5e-324],
            "ask": [2] * (n - 1) + [2.5],                       # ints and floats mixed: stays a list
            "volume": [1.0] * (n - 1) + [None],                  # a None: stays a list
            "seq": [True] * n,                                   # bools are not ints here: stays a list
            "source": ["x"] * n,
            "symbol": [2**63] * n}                               # beyond int64: stays a list
    args = pack_columns("insert_ticks", {"ticks": cols})
    sent = args["ticks"]
    assert type(sent["ts"]) is array and sent["ts"].typecode == "q"
    assert type(sent["bid"]) is array and sent["bid"].typecode == "d"
    assert all(sent[k] is cols[k] for k in ("ask", "volume", "seq", "source", "symbol"))
    assert pack_columns("insert_ticks", {"ticks": {"ts": [1] * (PACK_MIN - 1)}})["ticks"]["ts"] == [1] * (PACK_MIN - 1)
    assert pack_columns("audit", {"detail": [1.0] * 100}) == {"detail": [1.0] * 100}  # only the bulk ops' columns

    msg, _cost = decode_request(encode_request("c", 1, "insert_ticks", args))
    got = msg["args"]["ticks"]
    assert got["ts"].tolist() == cols["ts"]
    back = got["bid"].tolist()
    assert back[:-4] == cols["bid"][:-4] and math.isnan(back[-4]) and back[-3:] == [math.inf, -0.0, 5e-324]
    assert math.copysign(1, back[-2]) == -1
    assert {k: got[k] for k in ("ask", "volume", "seq", "source", "symbol")} == \
           {k: cols[k] for k in ("ask", "volume", "seq", "source", "symbol")}


@pytest.mark.parametrize("ts, message", [
    (msgpack.ExtType(EXT_INT64, b"\x00" * 12), "packed column of 12 bytes is not a whole number"),
    (msgpack.ExtType(EXT_INT64, b"\x00" * 8 * 40_001), "over the decode limits: a packed column"),
])
def test_a_malformed_packed_column_is_refused_saying_why(writer: Stack, peer: Peer, ts: msgpack.ExtType,
                                                         message: str) -> None:
    reply = peer.ask("insert_ticks", {"ticks": {"symbol": ["X"], "ts": ts, "bid": [1.0], "ask": [1.0]}})
    assert reply["ok"] is False and reply["error"]["type"] == "ValidationError", reply
    assert message in reply["error"]["message"]
    # An extension type no column uses is left to the op, which says what it expected.
    reply = peer.ask("insert_ticks", {"ticks": {"symbol": ["X"], "ts": msgpack.ExtType(9, b"\x00" * 8),
                                                "bid": [1.0], "ask": [1.0]}})
    assert reply["ok"] is False and "ticks.ts: expected a list, got ExtType" in reply["error"]["message"], reply
    assert WriterClient(settings=writer.settings, deadline=10).call("audit", actor="me", action="after")["id"] == 1


# --- the same rows, the same messages -----------------------------------------------------------------------------


def test_packed_and_listed_ticks_store_the_same_rows(writer: Stack, peer: Peer) -> None:
    as_lists, as_packed = tick_columns("lists"), tick_columns("packed")
    assert peer.ask("insert_ticks", {"ticks": as_lists})["result"] == {"inserted": N, "duplicates": 0}
    assert peer.ask("insert_ticks", {"ticks": packed(as_packed)})["result"] == {"inserted": N, "duplicates": 0}
    # The client packs by itself; a replay of the same ticks is all duplicates.
    client = WriterClient(settings=writer.settings, deadline=10)
    sent = encode_request("c", 1, "insert_ticks", {"ticks": tick_columns("client")})
    assert msgpack.unpackb(sent)["args"]["ticks"]["bid"] == tick_columns("client")["bid"]  # a plain request
    assert client.call("insert_ticks", ticks=tick_columns("client")) == {"inserted": N, "duplicates": 0}
    assert client.call("insert_ticks", ticks=tick_columns("client")) == {"inserted": 0, "duplicates": N}
    stored = {source: rows(writer, "SELECT symbol, ts, bid, ask, volume, seq FROM ticks WHERE source = :s "
                                   "ORDER BY seq", s=source) for source in ("lists", "packed", "client")}
    assert len(stored["lists"]) == N and stored["lists"] == stored["packed"] == stored["client"]


def with_bad(field: str, index: int, value: Any) -> dict[str, list]:
    cols = tick_columns("bad")
    cols[field] = list(cols[field])
    cols[field][index] = value
    return cols


BAD_PACKED_TICKS = [
    (with_bad("bid", 7, math.nan), "ticks.bid[7]: nan is not a price"),
    (with_bad("ask", 3, math.inf), "ticks.ask[3]: inf is not a price"),
    (with_bad("bid", 11, MAX_PRICE), "ticks.bid[11]: 1000000000000.0 is not a price"),
    (with_bad("bid", 5, 1e6), "ticks[5]: bid 1000000.0 is above ask 101.75"),
    (with_bad("ts", 2, -5), "ticks.ts[2]: -5 is out of range"),
    ({**tick_columns("bad"), "ts": [float(T0 + i) for i in range(N)]}, f"ticks.ts[0]: {float(T0)!r} is not epoch"),
    (with_bad("volume", 9, -1.0), "ticks.volume[9]: -1.0 is not a volume"),
    (with_bad("seq", 13, -1), "ticks.seq[13]: -1 is out of range"),
    ({**tick_columns("bad"), "seq": [float(i) for i in range(N)]}, "ticks.seq[0]: 0.0 is not an integer"),
]


@pytest.mark.parametrize("cols, message", BAD_PACKED_TICKS, ids=[m for _, m in BAD_PACKED_TICKS])
def test_a_bad_value_in_a_packed_column_gets_the_message_a_list_gets(writer: Stack, peer: Peer,
                                                                      cols: dict, message: str) -> None:
    as_list = peer.ask("insert_ticks", {"ticks": cols})
    as_packed = peer.ask("insert_ticks", {"ticks": packed(cols)})
    assert as_list["ok"] is False and as_packed["ok"] is False, (as_list, as_packed)
    assert message in as_list["error"]["message"], as_list
    assert as_packed["error"] == as_list["error"]
    assert rows(writer, "SELECT count(*) FROM ticks") == [(0,)]


def bar_columns(n: int = N) -> dict[str, list]:
    opens = [100.0 + i for i in range(n)]
    return {"symbol": ["BTCUSD"] * n, "timeframe": ["1m"] * n, "ts": [T0 + 60_000 * i for i in range(n)],
            "open": opens, "high": [o + 2 for o in opens], "low": [o - 1 for o in opens],
            "close": [o + 1 for o in opens], "volume": [10.0] * n, "tick_count": [4] * n}


def test_packed_bar_columns_store_the_same_bars_and_get_the_same_messages(writer: Stack, peer: Peer) -> None:
    bad = bar_columns()
    bad["high"] = list(bad["high"])
    bad["high"][4] = math.nan
    as_list = peer.ask("store_analysis", {"cursor": "t", "position": 1, "bars": bad})
    as_packed = peer.ask("store_analysis", {"cursor": "t", "position": 1, "bars": packed(bad)})
    assert as_list["ok"] is False and "bars.high[4]: nan is not a finite number" in as_list["error"]["message"]
    assert as_packed["error"] == as_list["error"]
    bad_ts = {**bar_columns(), "ts": [T0 + 60_000 * i + 1 for i in range(N)]}
    assert peer.ask("store_analysis", {"cursor": "t", "position": 1, "bars": packed(bad_ts)})["error"] == \
           peer.ask("store_analysis", {"cursor": "t", "position": 1, "bars": bad_ts})["error"]

    reply = peer.ask("store_analysis", {"cursor": "t", "position": 1, "bars": packed(bar_columns())})
    assert reply["ok"] is True and reply["result"]["bars"] == N, reply
    cols = bar_columns()
    expected = [tuple(cols[c][i] for c in ("ts", "open", "high", "low", "close", "volume", "tick_count"))
                for i in range(N)]
    assert rows(writer, "SELECT ts, open, high, low, close, volume, tick_count FROM bars ORDER BY ts") == expected


def test_bulk_upserts_store_what_a_statement_per_row_stores(writer: Stack, peer: Peer) -> None:
    """store_analysis upserts bars and indicator values 100 rows a statement (db.statements.BULK_ROWS;
    250 rows: two statements, then 50 rows one by one): the rows stored are those of a statement per
    row (upsert_bars, bars as rows), a key given three times (in each statement and in the last rows)
    ends as its last row, and an indicator a later row has no value for keeps the earlier one."""
    n = 250
    cols = bar_columns(n)
    for i in (130, 240):  # the key of row 20 again, with other values
        cols["ts"][i] = cols["ts"][20]
    assert peer.ask("store_analysis", {"cursor": "t", "position": 1, "bars": packed(cols)})["result"]["bars"] == n
    as_rows = [dict(zip(cols, row, strict=True)) for row in zip(*cols.values(), strict=True)]
    assert peer.ask("upsert_bars", {"bars": [{**r, "symbol": "ROWS"} for r in as_rows]})["ok"] is True
    sql = "SELECT ts, open, high, low, close, volume, tick_count FROM bars WHERE symbol = :s ORDER BY ts"
    stored = rows(writer, sql, s="BTCUSD")
    assert len(stored) == n - 2 and stored == rows(writer, sql, s="ROWS")
    assert (cols["ts"][20], cols["open"][240]) in [r[:2] for r in stored]

    values: dict[str, list] = {k: cols[k] for k in ("symbol", "timeframe", "ts")}
    for j, name in enumerate(("sma_20", "ema_20", "rsi_14", "atr_14")):
        values[name] = [float(i * 10 + j) for i in range(n)]
    values["sma_20"][130] = values["sma_20"][240] = None  # row 20's stays
    values["ema_20"][240] = None  # row 130's stays
    values["atr_14"][20] = values["atr_14"][130] = None  # row 240's, the only one
    reply = peer.ask("store_analysis", {"cursor": "t", "position": 2, "indicators": values})
    assert reply["result"]["indicators"] == 4 * n - 5, reply
    got = rows(writer, "SELECT sma_20, ema_20, rsi_14, atr_14 FROM bar_indicators WHERE ts = :t", t=cols["ts"][20])
    assert got == [(200.0, 1301.0, 2402.0, 2403.0)]
    assert rows(writer, "SELECT count(*), sum(sma_20), sum(rsi_14) FROM bar_indicators") == [
        (n - 2, sum(values["sma_20"][i] for i in range(n) if i not in (130, 240)),
         sum(values["rsi_14"][i] for i in range(n) if i not in (20, 130)))]


def test_bulk_tick_inserts_store_what_a_statement_per_row_stores(writer: Stack, peer: Peer) -> None:
    """insert_ticks runs 100 rows a statement too (250 ticks: two statements, then 50 one by one). A
    tick whose (source, seq) came earlier in the same request is a duplicate wherever it is (in the
    same statement, the next one, the last rows), the first one is kept, and ids follow the request's
    order: what the same ticks give sent one per request (a statement each). A resend is all
    duplicates."""
    n = 250
    cols = tick_columns("bulk", n)
    for i in (30, 130, 240):  # row 20's (source, seq) again, with other prices
        cols["seq"][i] = cols["seq"][20]
    cols["seq"][249] = cols["seq"][150]  # a later row's too
    assert peer.ask("insert_ticks", {"ticks": packed(cols)})["result"] == {"inserted": n - 4, "duplicates": 4}
    one_by_one = [peer.ask("insert_ticks", {"ticks": {k: [v[i] if k != "source" else "rows"] for k, v in cols.items()}})
                  for i in range(n)]
    assert [r["result"]["inserted"] for r in one_by_one].count(0) == 4, one_by_one[:3]
    sql = "SELECT symbol, ts, bid, ask, volume, seq FROM ticks WHERE source = :s ORDER BY id"
    stored = rows(writer, sql, s="bulk")
    assert len(stored) == n - 4 and stored == rows(writer, sql, s="rows")
    assert [r[1] for r in stored] == sorted(r[1] for r in stored)  # the request's order (ts ascends in it)
    assert (cols["ts"][20], cols["seq"][20]) in [(r[1], r[5]) for r in stored]
    assert cols["ts"][130] not in [r[1] for r in stored]
    assert peer.ask("insert_ticks", {"ticks": packed(cols)})["result"] == {"inserted": 0, "duplicates": n}


# --- fast batches, careful only when something failed --------------------------------------------------------------


def careful_batches(client: WriterClient) -> int:
    return client.stats()["careful_batches"]


def test_the_writer_has_numpy_loaded_before_its_first_request(writer: Stack) -> None:
    """Packed columns are checked with numpy (:mod:`db.validation`, :mod:`db.columns`), which those
    modules import only where they use it, so that the readers never load it. The writer loads it at
    start, before it answers its first ping: else its first bulk request paid for the import, inside
    a producer's first commit (README, Benchmarks: "The first requests after a start")."""
    maps = Path(f"/proc/{writer.procs[0].pid}/maps").read_text()
    assert "_multiarray_umath" in maps, "numpy's core module is not loaded in the ready writer"


#: Run in a fresh interpreter (nothing configured or compiled yet): the writer's own start-up
#: (WriteConnection.open_database), then the first request's batch. For each, the statements of the record of
#: applied requests compiled in it: by SQLAlchemy (seen at execution, as a cache miss) and by
#: db.statements (its cache of compiled INSERTs, whose SQLite ones go to the cursor unseen).
_FIRST_BATCH = """
import json, queue
import msgpack
from sqlalchemy import event
from sqlalchemy.engine.interfaces import CacheStats
from db import ops, statements
from db.config import load_settings
from db.engine import make_write_engine
from workers.commit import Committer, Request
from workers.writer_stats import Stats

settings = load_settings()
engine = make_write_engine(settings)
compiled = []

@event.listens_for(engine, "after_cursor_execute")
def seen(_conn, _cursor, statement, _parameters, context, _executemany):
    if context is not None and context.cache_hit is CacheStats.CACHE_MISS and "applied_requests" in statement:
        compiled.append(statement.split()[0])

def inserts():
    return sorted(str(key) for key in statements._compiled if key[1] == "applied_requests")

conn = engine.connect()
committer = Committer(settings, engine, conn, Stats(), queue.Queue(), on_fatal=lambda: None)
committer.link.open_database()
at_start, inserts_at_start = sorted(compiled), inserts()
# Request 5 of the client was applied before this start: its request 1, resent after the restart, is
# looked up in the record before it runs.
with committer.conn.begin():
    ops.record_applied(committer.conn, "first-client", 5, msgpack.packb({"id": 0}))
compiled.clear()
replies = committer._commit_or_fail([Request(b"peer", "first-client", 1, "audit", {"actor": "a", "action": "x"})])
print(json.dumps({"at_start": at_start, "inserts_at_start": inserts_at_start, "in_first_batch": compiled,
                  "inserts_after": inserts(), "reply": replies[0][1].hex()}))
committer.conn.close()
engine.dispose()
"""


def test_the_first_batch_after_a_start_compiles_nothing_of_the_record_of_applied_requests(
        stack: Stack) -> None:
    """The first batch after every start of the writer configured SQLAlchemy's mappers and compiled
    the look-ups, the record and the prune of applied requests (README, Benchmarks: "The first
    requests after a start"). The writer now has them compiled while it opens the database, before it
    serves, and the first batch finds them so, a resent request's look-up included."""
    out = subprocess.run([sys.executable, "-c", _FIRST_BATCH], env=stack.env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert msgpack.unpackb(bytes.fromhex(seen["reply"]))["ok"] is True
    # Both look-ups, the newest record (the record's clock: workers.dedup) and the prune, at start.
    assert seen["at_start"] == ["DELETE", "SELECT", "SELECT", "SELECT"], seen
    assert len(seen["inserts_at_start"]) == 1, seen  # and the record's INSERT
    assert seen["in_first_batch"] == [] and seen["inserts_after"] == seen["inserts_at_start"], seen


def test_a_batch_without_failures_runs_fast_and_one_with_a_failure_runs_again_with_the_same_results(
        stack: Stack) -> None:
    stack.start_writer(TICKSTACK_WRITER_BATCH_WAIT="0.3")  # each pipeline below is one batch
    client = WriterClient(settings=stack.settings, deadline=20)
    with client.pipeline(window=50) as pipe:
        clean = [pipe.submit("audit", actor="me", action="clean", target=str(i)) for i in range(10)]
        clean.append(pipe.submit("insert_ticks", ticks=tick_columns("clean")))
    assert [t.error for t in clean] == [None] * 11 and len({t.batch for t in clean}) == 1
    assert careful_batches(client) == 0

    with client.pipeline(window=50) as pipe:
        first = [pipe.submit("audit", actor="me", action="mixed", target=str(i)) for i in range(3)]
        missing = pipe.submit("close_trade", trade_id=404)         # fails inside its op: NotFound
        wrong = pipe.submit("open_trade", symbol="BTCUSD", side="buy", size=1.0, entry_price=100.0,
                            stop_loss=101.0)                       # fails inside its op: ValidationError
        ticks = pipe.submit("insert_ticks", ticks=tick_columns("mixed"))
        last = [pipe.submit("audit", actor="me", action="mixed", target=str(i)) for i in range(3, 6)]
    tickets = [*first, missing, wrong, ticks, *last]
    assert len({t.batch for t in tickets}) == 1, "the batch that ran again keeps its number"
    assert isinstance(missing.error, NotFound) and "trade 404 does not exist" in str(missing.error)
    assert isinstance(wrong.error, ValidationError) and "stop_loss 101.0 must be below" in str(wrong.error)
    assert [t.error for t in (*first, ticks, *last)] == [None] * 7
    assert careful_batches(client) == 1
    assert rows(stack, "SELECT target FROM audit_log WHERE action = 'mixed' ORDER BY id") == \
           [(str(i),) for i in range(6)]
    assert rows(stack, "SELECT count(*) FROM ticks WHERE source = 'mixed'") == [(N,)]
    assert rows(stack, "SELECT count(*) FROM trades") == [(0,)]


def test_the_same_request_twice_in_one_batch_is_applied_once_on_the_fast_path(stack: Stack) -> None:
    stack.start_writer(TICKSTACK_WRITER_BATCH_WAIT="0.3")
    peer = Peer(stack.settings.writer_endpoint)
    try:
        payload = msgpack.packb({"v": 1, "cid": "twice", "seq": 1, "op": "audit",
                                 "args": {"actor": "me", "action": "twice"}})
        peer.sock.send(payload)
        peer.sock.send(payload)  # a resend while the first is still queued
        first, second = peer.recv(), peer.recv()
    finally:
        peer.close()
    assert first["ok"] and second["ok"] and first["result"] == second["result"] and first["batch"] == second["batch"]
    client = WriterClient(settings=stack.settings, deadline=10)
    assert careful_batches(client) == 0 and client.stats()["dedup_hits"] == 1
    assert rows(stack, "SELECT count(*) FROM audit_log WHERE action = 'twice'") == [(1,)]


# --- small batches on the IO thread ------------------------------------------------------------------------------


def test_small_batches_commit_on_the_io_thread_in_order_with_the_bulk_ones_the_commit_thread_takes(
        stack: Stack) -> None:
    """SQLite: a small batch that finds the commit thread idle is committed by the IO thread
    (``io_batches``), a bulk one goes to the commit thread; requests are applied in the order they
    came whichever thread commits them (the last upsert of a bar wins), each acknowledged once,
    after its commit. PostgreSQL: every batch stays on the commit thread."""
    stack.start_writer()
    client = WriterClient(settings=stack.settings, deadline=30)
    client.call("audit", actor="me", action="first")  # the first batch prunes the record: the commit thread's
    start = client.stats()
    for i in range(20):  # one at a time: each a batch of one, the commit thread idle
        client.call("audit", actor="me", action="io", target=str(i))
    after_small = client.stats()
    bulk = 5_000  # a request of packed columns far over IO_BATCH_BYTES
    with client.pipeline(window=16) as pipe:
        tickets = []
        for v in range(40):
            if v % 8 == 0:
                cols = tick_columns(f"bulk-{v}", bulk)
                tickets.append(pipe.submit("insert_ticks", ticks=cols))
            tickets.append(pipe.submit("upsert_bars", bars=[{
                "symbol": "BTCUSD", "timeframe": "1m", "ts": T0 - T0 % 60_000, "open": 1.0, "high": 100.0 + v,
                "low": 1.0, "close": 1.0 + v, "volume": float(v)}]))
    assert [t.error for t in tickets] == [None] * len(tickets)
    end = client.stats()
    assert rows(stack, "SELECT close FROM bars WHERE symbol = 'BTCUSD'") == [(40.0,)]  # the last one sent
    assert rows(stack, "SELECT target FROM audit_log WHERE action = 'io' ORDER BY id") == [(str(i),) for i in range(20)]
    assert rows(stack, "SELECT count(*) FROM ticks") == [(5 * bulk,)]
    assert end["requests_ok"] - start["requests_ok"] == 20 + len(tickets)
    if stack.settings.database_url.startswith("sqlite"):
        assert after_small["io_batches"] - start["io_batches"] == 20
        assert end["batches"] - end["io_batches"] >= 1, end  # the bulk requests' (two may share one)
        before = client.stats()["io_batches"]
        client.call("prune_ticks", before_ts=T0)  # a delete by age: its time grows with the table
        assert client.stats()["io_batches"] == before
    else:
        assert end["io_batches"] == 0


@pytest.mark.sqlite_only("tests/test_writer_fastpath.py::test_small_batches_commit_on_the_io_thread_in_order_with_the_bulk_ones_the_commit_thread_takes")
def test_the_io_thread_answers_pings_while_another_program_holds_the_write_lock(stack: Stack) -> None:
    """A program that writes the file without the writer (the seed's bot, a sqlite3 shell) holds
    SQLite's write lock: a small request then waits for it, up to busy_timeout, on the commit
    thread, while the IO thread answers pings and tends the lifeline. Committed on the IO thread,
    it held every ping for as long as the lock was held."""
    stack.start_writer(TICKSTACK_BUSY_TIMEOUT_MS="120000")
    client = WriterClient(settings=stack.settings, deadline=60)
    client.call("audit", actor="me", action="before")  # ready, and the prune of its first batch done
    client.call("audit", actor="me", action="on-the-io-thread")
    assert client.stats()["io_batches"] == 1
    path = stack.settings.database_path
    assert path is not None
    intruder = sqlite3.connect(path, isolation_level=None)
    try:
        intruder.execute("BEGIN IMMEDIATE")
        intruder.execute("INSERT INTO audit_log (ts, actor, action, target, result, detail) "
                         "VALUES (1, 'intruder', 'x', '', 'ok', '')")
        with WriterClient(settings=stack.settings, deadline=60) as waiting:
            ticket = waiting.submit("audit", actor="me", action="waits")
            answered = [WriterClient(settings=stack.settings, deadline=10).ping(timeout=10) for _ in range(3)]
            assert all(a["pid"] for a in answered)  # answered while the lock is still held
            assert rows(stack, "SELECT count(*) FROM audit_log WHERE action = 'waits'") == [(0,)]
            intruder.execute("COMMIT")
            waiting.wait(ticket)
            assert ticket.result()["id"] > 0
    finally:
        intruder.close()
    assert rows(stack, "SELECT actor FROM audit_log WHERE action IN ('x', 'waits') ORDER BY id") == \
           [("intruder",), ("me",)]
    # It waited for the lock on the commit thread (busy_timeout, 120 s here): never answered "locked"
    # and sent again, though the IO thread's batches before it began theirs with a timeout of 0.
    assert client.stats()["lock_errors"] == 0


# --- checkpoints off the commit path ------------------------------------------------------------------------------


#: A reader of the test's database, in its own process: with ``hold``, in a read transaction until its
#: stdin closes; else between transactions, the file open.
_READER = """
import sqlite3, sys
con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, isolation_level=None)
if sys.argv[2] == "hold":
    con.execute("BEGIN")
con.execute("SELECT count(*) FROM ticks").fetchall()
print("reading", flush=True)
sys.stdin.read()
"""


@pytest.mark.sqlite_only("tests/test_postgres_health.py::"
                         "test_health_doctor_api_and_metrics_report_the_server_and_fail_while_it_is_down")
def test_doctor_names_the_reader_whose_transaction_holds_the_wal_back(stack: Stack) -> None:
    """``db doctor``'s warning of a large WAL listed every process with the database open ("readers keep
    long transactions open (pids [...])": all of the stack's readers, whatever they did). It now names
    the processes in a read transaction (their locks on SQLite's read marks, from /proc/locks), says
    when none is, and ``db health`` marks them."""
    stack.env["TICKSTACK_JOURNAL_SIZE_LIMIT"] = "0"  # any WAL left after a checkpoint is "large"
    stack.start_writer()
    path = str(stack.settings.database_path)
    readers = {how: subprocess.Popen([sys.executable, "-c", _READER, path, how], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True) for how in ("hold", "idle")}
    try:
        for proc in readers.values():
            assert proc.stdout.readline().strip() == "reading"
        with WriterClient(settings=stack.settings, deadline=30) as client:
            for n in range(5):
                client.call("insert_ticks", ticks=[{"symbol": "WALUSD", "ts": T0 + n, "bid": 1.0, "ask": 1.1}])
            client.call("checkpoint", mode="TRUNCATE")  # partial: the held read keeps the WAL
        doctor = [sys.executable, "-m", "db", "doctor"]
        said = subprocess.run(doctor, env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
        line = next((line for line in said.splitlines() if "The WAL is" in line), said)
        held, idle = readers["hold"].pid, readers["idle"].pid
        assert line.startswith("[WARN]") and "a read transaction held open keeps checkpoints from shrinking it" \
            in line, said
        assert f"pid {held} (" in line and f"pid {idle}" not in line and "pids [" not in line, said
        health = subprocess.run([sys.executable, "-m", "db", "health"], env=stack.env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120).stdout
        marked = [line for line in health.splitlines() if "(in a read transaction)" in line]
        assert len(marked) == 1 and f" {held} " in marked[0], health
        # Its program of several lines on its one line (its lines broke health's table), cut at the
        # table's 70 characters: how much of the program shows depends on the checkout's path.
        one_line = " ".join([sys.executable, "-c", " ".join(_READER.split()), path, "hold"])
        assert f" {one_line[:70]}" in marked[0], health
    finally:
        for proc in readers.values():
            proc.communicate(timeout=30)
    said = subprocess.run(doctor, env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    line = next((line for line in said.splitlines() if "The WAL is" in line), "")
    # Ended: no reader names; a WAL still there (the checkpointer's next turn) is said to shrink now.
    assert not line or "no reader is in a read transaction now" in line, said


@pytest.mark.sqlite_only("tests/test_jobs.py::test_no_checkpoint_job_runs_on_a_server")
def test_checkpoints_run_beside_the_commits_and_the_wal_stays_bounded(writer: Stack) -> None:
    """A thread copies the WAL ahead of SQLite's own checkpoint (which a commit pays for); the
    commits' own checkpoint still resets the WAL, so it never grows with what was written."""
    path = writer.settings.database_path
    assert path is not None
    client = WriterClient(settings=writer.settings, deadline=60)
    batch, batches = 500, 400  # 200,000 ticks: about 5,000 WAL pages, five times the autocheckpoint
    with client.pipeline(window=8) as pipe:
        for b in range(batches):
            cols = tick_columns(f"wal-{b}", batch)
            cols["ts"] = [T0 + b * batch + i for i in range(batch)]
            pipe.submit("insert_ticks", ticks=cols)
    assert pipe.failed == [] and pipe.completed == batches
    stats = client.stats()
    assert stats["background_checkpoints"] >= 1, stats
    assert 0 < time.time() * 1000 - stats["last_background_checkpoint_ms"] < 600_000, stats
    # And the writer is still "connected" to the WAL index: its checkpointer's look at the index
    # opened and closed it, which dropped SQLite's locks of the process on it, and the next process
    # to open the database rebuilt the index under the writer, which died of SIGBUS (review, round 46).
    connected = pids_locking(Path(f"{path}-shm"), WAL_CONNECTED, WAL_CONNECTED)
    assert connected is not None and writer.procs[0].pid in connected, connected
    # The console says so: "Last checkpoint: none since the writer started" read as if none had run
    # (a new user's run, round 40); that line is about those asked for (the checkpoint op).
    from webapp import create_app

    page = ConsoleClient.logged_in(create_app("console", writer.settings)).get("/console/database")
    said = re.search(r"data-checkpoint>(.*?)</dd>", page.text, re.S)
    assert said is not None, page.text[:2000]
    words = " ".join(re.sub(r"<[^>]+>", " ", said[1]).split())
    assert "none asked since the writer started" in words, words
    assert re.search(r"the writer's own, in the background: \d+, the last \d{4}-\d\d-\d\d \d\d:\d\d", words), words

    more = iter(range(batches, batches + 200))

    def reset() -> bool:
        # SQLite resets the WAL at the first write after a checkpoint that copied all of it; the load's
        # last ones may not have (once under the full suite's load: 18 MB at its end), and the load
        # going on, a later one does. A WAL never reset would keep growing and fail this.
        b = next(more)
        cols = tick_columns(f"wal-{b}", batch)
        cols["ts"] = [T0 + b * batch + i for i in range(batch)]
        client.call("insert_ticks", ticks=cols)
        return Path(f"{path}-wal").stat().st_size < 3000 * 4096

    wait_for("the WAL to be reset", reset, timeout=60)
    loaded = next(more) - batches  # the batches reset() inserted
    assert rows(writer, "SELECT count(*) FROM ticks") == [(batch * (batches + loaded),)]


def test_numpy_starts_no_blas_threads_in_the_workers_unless_the_user_asks() -> None:
    """``workers`` sets OPENBLAS_NUM_THREADS=1 before numpy loads (no worker calls BLAS; its thread per
    extra core spins about 0.1 s of CPU at every start of the writer and the analysis worker); a
    value in the environment wins."""
    probe = ("import os, sys; import workers.writer, workers.analysis; "
             "print(len(os.listdir('/proc/self/task')), os.environ['OPENBLAS_NUM_THREADS'])")

    def threads(env_value: str | None) -> tuple[int, str]:
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
        if env_value is not None:
            env["OPENBLAS_NUM_THREADS"] = env_value
        done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60, check=True)
        count, value = done.stdout.split()
        return int(count), value

    ours, one, asked = threads(None), threads("1"), threads("2")
    assert ours == one and asked[1] == "2", (ours, one, asked)
    # OpenBLAS starts no more threads than the process may run on: with 2 CPUs, one more for "2".
    if len(os.sched_getaffinity(0)) >= 2:
        assert asked[0] == ours[0] + 1, (ours, asked)


#: ``python -m MODULE ARGS`` as Python runs it (``sys.argv[0]`` is ``"-m"`` while runpy imports the
#: module's packages), saying at exit how many collections the garbage collector made once the
#: ``workers`` package began to load its modules, before and after the process froze its start-up objects, and
#: whether the collector is on.
_AS_A_COMMAND = """
import atexit, gc, runpy, sys
seen = []
# From the moment the command's package imports the first of the rest (runpy's own work before it, the
# package's compiling where it has no bytecode yet, are not the loading of its modules).
gc.callbacks.append(lambda phase, info: phase == "start" and "db" in sys.modules
                    and seen.append(gc.get_freeze_count() > 0))
atexit.register(lambda: print(f"collections before the freeze {seen.count(False)}, after {seen.count(True)}, "
                              f"collector on {gc.isenabled()}", file=sys.stderr))
module, sys.argv = sys.argv[1], ["-m", *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def test_a_worker_loads_its_modules_with_the_collector_paused_and_works_with_it_on(stack: Stack) -> None:
    """Loading a worker's modules makes some 70,000 objects and no garbage, yet the collector walked
    them again and again as they were made: about 0.06 s of CPU at each start of a worker here (0.41 s
    to 0.35 s, median of 15). A worker run as a command now loads with it paused, and its main turns
    it back on as it freezes what was loaded: the writer (its own main) and a worker of
    ``workers.base.main`` (the analysis worker: every other worker's path too)."""
    def said(stderr: str) -> str:
        return next((line for line in stderr.splitlines() if line.startswith("collections before")), stderr[-2000:])

    writer = subprocess.Popen([sys.executable, "-c", _AS_A_COMMAND, "workers.writer"], env=stack.env, cwd=ROOT,
                              stderr=subprocess.PIPE, text=True)
    try:
        with WriterClient(settings=stack.settings, deadline=60) as client:
            client.ping(timeout=60)
            analysis = subprocess.run([sys.executable, "-c", _AS_A_COMMAND, "workers.analysis", "--until-idle"],
                                      env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert analysis.returncode == 0, analysis.stderr[-3000:]
        writer.terminate()
        _, writer_err = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    for name, stderr in (("writer", writer_err), ("analysis", analysis.stderr)):
        line = said(stderr)
        found = re.fullmatch(r"collections before the freeze (\d+), after (\d+), collector on (True|False)", line)
        assert found, (name, line)
        assert found[1] == "0" and found[3] == "True", (name, line)


#: In a fresh interpreter, on a real SQLite file: the IO thread's way into a batch
#: (Committer.commit_here) hands every batch that would wait or begin twice to the commit thread.
_COMMIT_HERE = """
import json, logging, os, queue, sqlite3, time
import msgpack
from sqlalchemy import event
from db import ops
from db.config import load_settings
from db.engine import make_write_engine
from workers.commit import Committer, Request
from workers.dedup import PRUNE_EVERY_S
from workers.writer_stats import Stats

settings = load_settings()  # busy_timeout 600 s: a wait would outlast the test's timeout
engine = make_write_engine(settings)
committer = Committer(settings, engine, engine.connect(), Stats(), queue.Queue(), on_fatal=lambda: None)
committer.link.open_database()
committer._commit_or_fail([Request(b"p", "c", 1, "audit", {"actor": "a", "action": "first"})])  # prunes, once
raw = committer.conn.connection.driver_connection
out = {}

def audit(seq):
    return [Request(b"p", "c", seq, "audit", {"actor": "a", "action": f"n{seq}"})]

def decoded(replies):
    return None if replies is None else [msgpack.unpackb(r) for _, r in replies]

other = sqlite3.connect(settings.database_path, isolation_level=None)
other.execute("BEGIN IMMEDIATE")  # another program holds the write lock
out["locked"] = decoded(committer.commit_here(audit(2)))
out["locked_left_begun"] = raw.in_transaction
other.execute("COMMIT")
out["free"] = decoded(committer.commit_here(audit(2)))
out["io_batches"] = committer.stats.io_batches

failing = [Request(b"p", "c", 3, "close_trade", {"trade_id": 404})]
out["failing_here"] = decoded(committer.commit_here(failing))
out["failing_left_begun"] = raw.in_transaction
out["failing_there"] = decoded(committer._commit_or_fail(failing))

with committer.conn.begin():  # an applied request past the dedup window
    ops.record_applied(committer.conn, "old", 1, msgpack.packb({"id": 0}))
    committer.conn.exec_driver_sql("UPDATE applied_requests SET committed_at = 0 WHERE client_id = 'old'")
committer.applied.last_prune = time.monotonic() - PRUNE_EVERY_S - 1  # due
out["due_here"] = decoded(committer.commit_here(audit(4)))
committer.prune_due = lambda: False  # due only once the IO thread's batch runs (the race it closes)
out["due_during"] = decoded(committer.commit_here(audit(5)))
count = "SELECT count(*) FROM applied_requests WHERE client_id = 'old'"
out["old_after_io"] = committer.conn.exec_driver_sql(count).scalar()
committer.conn.rollback()
del committer.prune_due  # due, as the clock says
committer._commit_or_fail(audit(6))  # the commit thread's batch prunes
out["old_after_commit_thread"] = committer.conn.exec_driver_sql(count).scalar()
committer.conn.rollback()

# Its connection lost in its batch: the IO thread opens none (opening sets pragmas that can wait on
# another connection's lock); the commit thread does, before the batch handed over to it.
opened = []
event.listen(engine, "connect", lambda *_: opened.append(where))
prior = committer.applied.prior

def lost_prior(conn, req, committed):
    if req.cid == "lost":
        conn.connection.driver_connection.close()
    return prior(conn, req, committed)

committer.applied.prior = lost_prior
where = "io"
lost = [Request(b"p", "lost", 1, "audit", {"actor": "a", "action": "lost"})]
out["lost_here"] = decoded(committer.commit_here(lost))
out["then_here"] = decoded(committer.commit_here(audit(7)))  # no connection yet: handed over
committer.applied.prior = prior
where = "commit thread"
out["lost_there"] = decoded(committer._commit_or_fail(lost))
out["lost_stored"] = committer.conn.exec_driver_sql("SELECT count(*) FROM audit_log WHERE action = 'lost'").scalar()
committer.conn.rollback()
committer.applied.prior = lost_prior  # lost again, and the writer exits before another batch
where = "io"
committer.commit_here([Request(b"p", "lost", 2, "audit", {"actor": "a", "action": "lost"})])
committer.applied.prior = prior
where = "exit"
committer.link.final_checkpoint()  # reopens the connection the IO thread left closed
out["opened_by"] = list(opened)
out["wal_after_exit"] = os.path.getsize(f"{settings.database_path}-wal")

# Left closed, and the database cannot be opened (a folder where its file was): the batch is
# answered at once, retryably, with why; one try per batch.
reopen_failures = []
logging.getLogger("tickstack.writer").addHandler(type("H", (logging.Handler,), {
    "emit": lambda self, record: reopen_failures.append(record.getMessage())
    if "cannot reopen" in record.getMessage() else None})())
committer.conn.close()
path = str(settings.database_path)
os.rename(path, path + ".away")
os.mkdir(path)
try:
    out["unopenable"] = decoded(committer._commit_or_fail(audit(8)))
finally:
    os.rmdir(path)
    os.rename(path + ".away", path)
out["reopen_tries"] = len(reopen_failures)
out["reopened"] = decoded(committer._commit_or_fail(audit(9)))
print(json.dumps(out))
"""


@pytest.mark.sqlite_only("tests/test_writer_fastpath.py::test_small_batches_commit_on_the_io_thread_in_order_with_the_bulk_ones_the_commit_thread_takes")
def test_the_io_thread_hands_over_every_batch_that_would_wait_or_run_twice(stack: Stack) -> None:
    """The IO thread commits a small batch only if it can take SQLite's write lock at once (then it
    keeps it for the batch: a probe let go of it, and another program could take it before the
    batch's own BEGIN, which then waited up to busy_timeout), the prune of applied requests is not
    due (nor becomes due while it runs), the fast run succeeds (a careful run would begin again), and
    its connection is open (opening one sets pragmas that can wait: the commit thread does it)."""
    out = subprocess.run([sys.executable, "-c", _COMMIT_HERE], env={**stack.env, "TICKSTACK_BUSY_TIMEOUT_MS": "600000"},
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["locked"] is None and not seen["locked_left_begun"], seen  # handed over at once
    assert seen["free"][0]["ok"] and seen["io_batches"] == 1, seen
    assert seen["failing_here"] is None and not seen["failing_left_begun"], seen
    (there,) = seen["failing_there"]
    assert not there["ok"] and "trade 404 does not exist" in there["error"]["message"], there
    assert there["batch"] == seen["free"][0]["batch"] + 1, seen  # the run handed over took no number
    assert seen["due_here"] is None, seen
    assert seen["due_during"][0]["ok"] and seen["old_after_io"] == 1, seen  # not pruned on the IO thread
    assert seen["old_after_commit_thread"] == 0, seen
    # A connection lost on the IO thread is reopened by the commit thread, which stores the batch.
    assert [r["error"]["type"] for r in seen["lost_here"]] == ["CommitFailed"], seen  # retryable
    assert seen["then_here"] is None, seen  # handed over until a connection is open again
    assert seen["lost_there"][0]["ok"] and seen["lost_stored"] == 1, seen  # the resend, stored once
    assert seen["opened_by"] == ["commit thread", "exit"], seen
    assert seen["wal_after_exit"] == 0, seen  # the final checkpoint ran (TRUNCATE)
    (unopenable,) = seen["unopenable"]
    assert unopenable["error"]["type"] == "CommitFailed", unopenable  # retryable, and says why:
    assert "unable to open database file" in unopenable["error"]["message"], unopenable
    assert seen["reopen_tries"] == 1 and seen["reopened"][0]["ok"], seen


#: A request whose look-up in the record of applied requests meets an error after which SQLite has
#: rolled the whole transaction back (an I/O error, out of memory: made here by a ROLLBACK on the
#: driver's connection, then the error SQLite gives), in the middle of a batch.
_TRANSACTION_ENDED = """
import json, queue, sqlite3
import msgpack
from db.config import load_settings
from db.engine import make_write_engine
from workers.commit import Committer, Request
from workers.writer_stats import Stats

settings = load_settings()
engine = make_write_engine(settings)
committer = Committer(settings, engine, engine.connect(), Stats(), queue.Queue(), on_fatal=lambda: None)
committer.link.open_database()
prior = committer.applied.prior

def failing_prior(conn, req, committed):
    if req.cid == "b":
        conn.connection.driver_connection.execute("ROLLBACK")
        raise sqlite3.OperationalError("disk I/O error")
    return prior(conn, req, committed)

committer.applied.prior = failing_prior
batch = [Request(b"p", cid, 1, "audit", {"actor": "me", "action": cid}) for cid in ("a", "b", "c")]
replies = [msgpack.unpackb(r) for _, r in committer._commit_or_fail(batch)]
stored = [a for (a,) in committer.conn.exec_driver_sql("SELECT action FROM audit_log ORDER BY id")]
committer.conn.rollback()

def lost_prior(conn, req, committed):  # the connection is lost (a server restarted): not one request's fault
    if req.cid == "e":
        conn.connection.driver_connection.close()
        conn.exec_driver_sql("SELECT 1")
    return prior(conn, req, committed)

committer.applied.prior = lost_prior
batch = [Request(b"p", cid, 1, "audit", {"actor": "me", "action": cid}) for cid in ("d", "e", "f")]
lost = [msgpack.unpackb(r) for _, r in committer._commit_or_fail(batch)]

def failing_everywhere(conn, req, committed):  # a disk failing every read: not one request's doing
    conn.connection.driver_connection.execute("ROLLBACK")
    raise sqlite3.OperationalError("disk I/O error")

committer.applied.prior = failing_everywhere
batch = [Request(b"p", f"x{i}", 1, "audit", {"actor": "me", "action": "x"}) for i in range(600)]
everywhere = [(r["ok"], (r.get("error") or {}).get("type")) for r in
              (msgpack.unpackb(r) for _, r in committer._commit_or_fail(batch))]
print(json.dumps({"ok": [r["ok"] for r in replies], "stored": stored,
                  "lost": [(r["ok"], (r.get("error") or {}).get("type")) for r in lost],
                  "everywhere": [everywhere.count((False, "OpFailed")), everywhere.count((False, "CommitFailed"))]}))
"""


@pytest.mark.sqlite_only("tests/test_postgres_faults.py::test_a_batch_whose_connection_is_lost_is_retried_not_failed")
def test_a_request_whose_error_ended_the_transaction_does_not_take_the_acknowledged_ones_with_it(
        stack: Stack) -> None:
    """SQLite rolls a whole transaction back on some errors. A request whose handling met one failed
    alone and the batch went on: the requests before it were acknowledged though rolled back (lost),
    and those after it committed one statement at a time (a crash between an op and its record
    would apply it twice on a retry). The batch now runs again without it."""
    out = subprocess.run([sys.executable, "-c", _TRANSACTION_ENDED], env=stack.env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["ok"] == [True, False, True], seen
    assert seen["stored"] == ["a", "c"], seen  # every acknowledged request stored, once
    # A lost connection is no request's fault: every request of the batch is answered retryably.
    assert [tuple(r) for r in seen["lost"]] == [(False, "CommitFailed")] * 3, seen
    # Nor is an error every request meets: the first is blamed (it cannot be told apart yet), and
    # once a second meets the same, the rest are answered retryably. Each request taken out was a
    # level of recursion: past about 490 a RecursionError, and every request before it failed for good.
    assert seen["everywhere"] == [1, 599], seen
