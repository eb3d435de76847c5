"""The analysis worker end to end: a real writer, the worker as a process (and in-process), bars and
indicators checked against an independent recomputation from the stored ticks."""
from __future__ import annotations

import math
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.client import WriterClient
from db.config import load_settings
from db.errors import Conflict, ValidationError
from db.vocabulary import TIMEFRAMES
from testkit.env import ROOT
from testkit.helpers import ConsoleClient, wait_for
from testkit.postgres import ReadConnection, read_connection
from testkit.writer import Stack
from webapp import create_app
from workers.analysis import AnalysisWorker
from workers.analyzer import Analyzer, Chunk, Output
from workers.indicators import SERIES, atr_wilder, ema, rsi_wilder, sma

T0 = 1_704_153_600_000  # 2024-01-02T00:00:00Z
MIN = 60_000


def db(stack: Stack) -> sqlite3.Connection | ReadConnection:
    return read_connection(stack.settings)


def price_path(symbols: list[str], start_ts: int, n: int, step_ms: int, seed: int,
               skip: tuple[int, int] | None = None) -> Iterator[dict]:
    """n ticks round-robin over symbols, ts non-decreasing; ``skip`` = a (from, to) ts gap for symbols[0]."""
    rnd = random.Random(seed)
    mids = {s: 100.0 + 50 * i for i, s in enumerate(symbols)}
    ts = start_ts
    for i in range(n):
        sym = symbols[i % len(symbols)]
        ts += rnd.randint(0, step_ms)
        if skip and sym == symbols[0] and skip[0] <= ts < skip[1]:
            continue
        mids[sym] = round(max(1.0, mids[sym] * (1 + rnd.gauss(0, 0.002))), 4)
        yield {"symbol": sym, "ts": ts, "bid": mids[sym], "ask": round(mids[sym] + 0.05, 4),
               "volume": rnd.randint(1, 40) / 4}


def insert(stack: Stack, ticks: list[dict], source: str) -> None:
    client = WriterClient(settings=stack.settings, deadline=30)
    base = _next_seq.setdefault(source, 0)
    for k in range(0, len(ticks), 10_000):
        batch = [{**t, "source": source, "seq": base + k + i} for i, t in enumerate(ticks[k:k + 10_000])]
        assert client.call("insert_ticks", ticks=batch)["inserted"] == len(batch)
    _next_seq[source] = base + len(ticks)
    client.close()


_next_seq: dict[str, int] = {}


def run_worker(stack: Stack, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "workers.analysis", "--until-idle", *args], env=stack.env,
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def expected_bars(con: sqlite3.Connection) -> dict[tuple, dict]:
    """Bars recomputed from every stored tick, in id order: floor(ts / len) * len buckets;
    open/close = first/last bid (ticks are in ts order per symbol), high/low = max/min, volume = sum."""
    bars: dict[tuple, dict] = {}
    for sym, ts, bid, vol in con.execute("SELECT symbol, ts, bid, volume FROM ticks ORDER BY id"):
        for tf, length in TIMEFRAMES.items():
            key = (sym, tf, ts // length * length)
            b = bars.get(key)
            if b is None:
                bars[key] = {"open": bid, "high": bid, "low": bid, "close": bid, "volume": vol, "tick_count": 1}
            else:
                b["high"], b["low"], b["close"] = max(b["high"], bid), min(b["low"], bid), bid
                b["volume"] += vol
                b["tick_count"] += 1
    return bars


def stored_bars(con: sqlite3.Connection) -> dict[tuple, dict]:
    rows = con.execute("SELECT symbol, timeframe, ts, open, high, low, close, volume, tick_count FROM bars")
    return {(s, tf, ts): {"open": o, "high": h, "low": lo, "close": c, "volume": v, "tick_count": n}
            for s, tf, ts, o, h, lo, c, v, n in rows}


def check_bars(stack: Stack) -> dict[tuple, dict]:
    con = db(stack)
    try:
        want, got = expected_bars(con), stored_bars(con)
        assert con.execute("SELECT value FROM cursors WHERE name = 'analysis'").fetchone() == \
            con.execute("SELECT max(id) FROM ticks").fetchone()
    finally:
        con.close()
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        assert g == w, key  # volume too: added tick after tick, as the textbook fold does
    return got


def check_indicators(stack: Stack, timeframes: tuple[str, ...] = ("1m", "5m")) -> int:
    """Stored indicators equal the batch functions over the stored bars; SMA also a textbook loop."""
    con = db(stack)
    checked = 0
    try:
        for (sym,) in con.execute("SELECT DISTINCT symbol FROM bars").fetchall():
            for tf in timeframes:
                rows = con.execute("SELECT ts, high, low, close FROM bars WHERE symbol = ? AND timeframe = ? "
                                   "ORDER BY ts", (sym, tf)).fetchall()
                ts, highs, lows, closes = (list(col) for col in zip(*rows, strict=True))
                want = {}
                for name, values in (("sma_20", sma(closes, 20)), ("ema_20", ema(closes, 20)),
                                     ("rsi_14", rsi_wilder(closes, 14)), ("atr_14", atr_wilder(highs, lows, closes))):
                    want.update({(name, t): v for t, v in zip(ts, values, strict=True) if v is not None})
                got = {(name, t): v for name, t, v in con.execute(
                    "SELECT name, ts, value FROM indicators WHERE symbol = ? AND timeframe = ?", (sym, tf))}
                assert got == want, (sym, tf)
                for i in range(19, len(closes)):
                    assert got[("sma_20", ts[i])] == pytest.approx(sum(closes[i - 19:i + 1]) / 20, rel=1e-12)
                checked += len(got)
    finally:
        con.close()
    return checked


def test_bars_and_indicators_exact_across_runs_and_restarts(writer: Stack) -> None:
    symbols = ["AAA", "BBB"]
    first = list(price_path(symbols, T0 + 1234, 2000, 4000, seed=1, skip=(T0 + 10 * MIN, T0 + 13 * MIN)))
    insert(writer, first, "feed")
    log = run_worker(writer)
    assert f"stored 1 chunk(s): {len(first)} ticks" in log and "nothing left to do" in log
    bars = check_bars(writer)
    assert len({k[2] for k in bars if k[1] == "1m"}) > 30 and len({k[2] for k in bars if k[1] == "5m"}) > 6
    assert check_indicators(writer) > 200

    # More ticks, the first ones into the buckets still open; then a run in-process with tiny batches
    # (the writer's row limits, scaled down) to exercise the split into several atomic stores.
    more = list(price_path(symbols, first[-1]["ts"], 900, 4000, seed=2))
    assert more[0]["ts"] // MIN * MIN == first[-1]["ts"] // MIN * MIN
    insert(writer, more, "feed")
    worker = AnalysisWorker(writer.settings, until_idle=True, chunk=97, rows_per_store=10)
    assert worker.run() == 0
    check_bars(writer)
    check_indicators(writer)

    # Nothing new: a run changes nothing.
    assert "stored" not in run_worker(writer)
    check_bars(writer)


def test_a_chunk_over_the_row_limits_is_split(writer: Stack) -> None:
    # One tick a minute: 10,500 1m bars plus 5m/1h/1d ones, and a row of indicators each: over the
    # 10,000 rows a store_analysis list may hold, all in one chunk.
    ticks = [{"symbol": "ONE", "ts": T0 + i * MIN + 7, "bid": 100 + math.sin(i / 9) * 5, "ask": 200.0,
              "volume": 1.0} for i in range(10_500)]
    insert(writer, ticks, "minutely")
    log = run_worker(writer)
    stored = re.search(r"stored (\d+) chunk\(s\): 10500 ticks", log)
    assert stored is not None and int(stored[1]) >= 2, log  # requests: as many as the rows need, or more
    assert sum(1 for k in check_bars(writer) if k[1] == "1m") == 10_500
    assert check_indicators(writer, ("1m", "5m", "1h")) > 10_000


def test_sigkill_mid_run_never_counts_a_tick_twice(writer: Stack) -> None:
    insert(writer, list(price_path(["AAA", "BBB", "CCC"], T0, 24_000, 500, seed=3)), "bulk")
    con = db(writer)
    positions = []
    try:
        for _ in range(3):
            proc = subprocess.Popen([sys.executable, "-m", "workers.analysis", "--chunk", "100"], env=writer.env,
                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            writer.procs.append(proc)
            start = positions[-1] if positions else 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                row = con.execute("SELECT value FROM cursors WHERE name = 'analysis'").fetchone()
                if row and row[0] > start + 1000:
                    break
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)  # anywhere: reading, folding, or waiting on the writer
            proc.wait()
            positions.append(con.execute("SELECT value FROM cursors WHERE name = 'analysis'").fetchone()[0])
    finally:
        con.close()
    assert positions == sorted(positions) and positions[-1] < 24_000, positions  # killed mid-way
    run_worker(writer, "--chunk", "700")
    check_bars(writer)
    check_indicators(writer)


def test_a_second_analysis_worker_stands_by_and_takes_over_when_the_leader_dies(writer: Stack) -> None:
    """One analysis worker per database, on either database (:mod:`db.leader`): a second one
    (``circusctl incr analysis``, or one run by hand beside the stack) stands by, naming the leader's
    pid, while the first folds the ticks, and takes over when it dies; a bounded run exits 3. On
    SQLite both used to fold the same ticks, their stores refused every second (the cursor moved
    under them) and counted as failed requests."""
    logs = [writer.home / "log" / f"analysis-{k}.log" for k in "ab"]

    def start(log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "workers.analysis", "--chunk", "500"], env=writer.env,
                                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        writer.procs.append(proc)
        return proc

    def cursor() -> int:
        con = db(writer)
        try:
            row = con.execute("SELECT value FROM cursors WHERE name = 'analysis'").fetchone()
            return row[0] if row else 0
        finally:
            con.close()

    first = start(logs[0])
    wait_for("the first analysis worker to lead", lambda: "analysis: leading" in logs[0].read_text(), timeout=60)
    second = start(logs[1])
    wait_for("the second to stand by", lambda: "analysis: standing by" in logs[1].read_text(), timeout=30)
    said = logs[1].read_text()
    assert f"pid {first.pid}" in said.split("standing by", 1)[1].splitlines()[0], said
    for part in range(3):  # both would be folding now: their stores collide on the cursor
        insert(writer, list(price_path(["AAA", "BBB"], T0 + part * 3_600_000, 3000, 500, seed=part)), "lead")
        wait_for("the leader to catch up", lambda n=3000 * (part + 1): cursor() == n, timeout=60)
    with WriterClient(settings=writer.settings) as client:
        assert client.stats()["requests_failed"] == 0
    health = subprocess.run([sys.executable, "-m", "db", "health"], env=writer.env, cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    (said_leader,) = [line for line in health.stdout.splitlines() if line.startswith("leader     analysis: ")]
    assert f"pid {first.pid} " in said_leader, health.stdout
    page = ConsoleClient.logged_in(create_app("console", writer.settings)).get("/console/database").text
    row = re.search(r'<tr data-leader="analysis">(.*?)</tr>', page, re.S)  # the server's hosts card, or SQLite's
    assert row and f"pid {first.pid} on " in row.group(1), page
    assert "leading" not in logs[1].read_text() and "store failed" not in logs[0].read_text()

    first.send_signal(signal.SIGKILL)
    first.wait(30)
    wait_for("the standby to take over", lambda: "analysis: leading" in logs[1].read_text(), timeout=60)
    insert(writer, list(price_path(["AAA", "BBB"], T0 + 5 * 3_600_000, 2000, 500, seed=7)), "lead")
    wait_for("the new leader to catch up", lambda: cursor() == 11_000, timeout=60)
    bounded = subprocess.run([sys.executable, "-m", "workers.analysis", "--until-idle"], env=writer.env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert bounded.returncode == 3, bounded.stderr
    assert "another process leads (" in bounded.stderr and f"pid {second.pid}" in bounded.stderr, bounded.stderr
    second.send_signal(signal.SIGTERM)
    assert second.wait(60) == 0
    check_bars(writer)
    check_indicators(writer)


class NoHistory:
    """For ticks in order the fold never reads stored data: any read is a failure."""

    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"ticks in order must not read history ({name})")


def rows_of(out: Output) -> tuple[dict, dict]:
    bars = {k: dict(zip(out.bars, v, strict=True)) for k, v in zip(
        zip(out.bars["symbol"], out.bars["timeframe"], out.bars["ts"], strict=True),
        zip(*out.bars.values(), strict=True), strict=True)}
    ind = out.indicators  # one row per bar, a column per indicator, NaN where a bar has none
    inds = {(s, tf, n, t): v for n in SERIES
            for s, tf, t, v in zip(ind["symbol"], ind["timeframe"], ind["ts"], ind[n], strict=True) if v == v}
    return bars, inds


def test_analyzer_state_round_trip_and_chunking_do_not_change_results() -> None:
    ticks = list(price_path(["AAA", "BBB"], T0, 3000, 3000, seed=4))
    rows = [(i, t["symbol"], t["ts"], t["bid"], t["volume"]) for i, t in enumerate(ticks, start=1)]

    def fold(cuts: list[int], restarts: set[int]) -> tuple[dict, dict]:
        bars: dict = {}
        inds: dict = {}
        an = Analyzer()
        for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True):
            if a in restarts:  # a restart: only what was stored survives
                an = Analyzer(an.position, an.state())
            got_bars, got_inds = rows_of(an.process(Chunk.from_rows(rows[a:b]), NoHistory()))
            bars.update(got_bars)
            inds.update(got_inds)
        return bars, inds

    reference = fold([], set())
    assert fold([500, 501, 1777], {500, 501, 1777}) == reference
    assert fold(list(range(7, 3000, 7)), {700, 2100}) == reference
    assert fold(list(range(1, 3000)), set()) == reference  # one tick at a time


def test_bad_arguments_and_missing_state() -> None:
    with pytest.raises(ValueError, match="no state stored"):
        Analyzer(42, None)
    with pytest.raises(ValueError, match="rows_per_store"):
        AnalysisWorker(load_settings({"TICKSTACK_HOME": "/tmp/ts-none"}), rows_per_store=0)


@pytest.mark.parametrize("args, message", [
    (["--chunk", "0"], "argument --chunk: '0' must be a whole number from 1 to 1000000"),
    # Bounded: a chunk is read into memory whole (it took any number before).
    (["--chunk", "1e15"], "argument --chunk: '1e15' must be a whole number from 1 to 1000000"),
    (["--chunk", "2.5"], "argument --chunk: '2.5' must be a whole number from 1 to 1000000"),
    (["--rows-per-store", "-5"], "argument --rows-per-store: '-5' must be a whole number from 1 to"),
])
def test_the_workers_flags_are_whole_numbers_in_range(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "workers.analysis", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "TICKSTACK_HOME": "/tmp/ts-none"})
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], (args, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr


def test_store_analysis_takes_columns_checked_as_rows_are_and_refuses_a_gap(writer: Stack) -> None:
    client = WriterClient(settings=writer.settings, deadline=30)
    bars = {"symbol": ["AAA"] * 3, "timeframe": ["1m"] * 3, "ts": [T0, T0 + MIN, T0 + 2 * MIN],
            "open": [1.0] * 3, "high": [2.0] * 3, "low": [0.5] * 3, "close": [1.5] * 3, "volume": [1.0, 0.0, 2.5]}
    values = {"symbol": ["AAA"], "timeframe": ["1m"], "name": ["sma_20"], "ts": [T0], "value": [1.25]}
    assert client.call("store_analysis", cursor="t", position=5, bars=bars, indicators=values, expect=0) == {
        "bars": 3, "indicators": 1, "position": 5}
    rows = [dict(zip(bars, row, strict=True)) for row in zip(*bars.values(), strict=True)]
    assert client.call("store_analysis", cursor="t", position=5, bars=rows, indicators=[])["bars"] == 3
    con = db(writer)
    try:
        assert con.execute("SELECT ts, volume, tick_count FROM bars ORDER BY ts").fetchall() == [
            (T0, 1.0, 0), (T0 + MIN, 0.0, 0), (T0 + 2 * MIN, 2.5, 0)]
    finally:
        con.close()
    # Every rule of the rows form, with the same precise message (column or row, index, reason).
    for bad, message in [
        ({**bars, "high": [2.0, math.nan, 2.0]}, "bars.high[1]: nan is not a finite number"),
        ({**bars, "ts": [T0, T0 + 1, T0]}, f"bars[1].ts: {T0 + 1} is not the start of a 1m bucket"),
        ({**bars, "low": [0.5, 1.7, 0.5]}, "bars[1]: low 1.7 / high 2.0 do not bound open 1.0 and close 1.5"),
        ({**bars, "volume": [1.0, 1e300, 1.0]}, "bars.volume[1]: 1e+300 must be a finite number >= 0"),
        ({**bars, "symbol": ["AAA", "a b", "AAA"]}, "bars.symbol[1]: 'a b' is not a symbol"),
        ({**bars, "tick_count": [1, True, 1]}, "bars.tick_count[1]: expected an integer, got bool"),
        ({**bars, "close": [1.5]}, "bars.close: 1 values, expected 3 like ts"),
        ({**bars, "x": [1, 2, 3]}, "bars: unexpected column 'x'"),
        ({k: v for k, v in bars.items() if k != "open"}, "bars: missing column 'open'"),
    ]:
        with pytest.raises(ValidationError, match=re.escape(message)):
            client.call("store_analysis", cursor="t", position=6, bars=bad)
    with pytest.raises(ValidationError, match=re.escape("indicators.name[0]: 'sma_9' is not one of")):
        client.call("store_analysis", cursor="t", position=6, indicators={**values, "name": ["sma_9"]})
    # An indicator value dated off its bar's bucket start was taken (a bad-input hunt, round 38): no bar is
    # found at its time. Refused in each form, as a bar's time is.
    per_bar = {"symbol": ["AAA"] * 2, "timeframe": ["5m"] * 2, "ts": [T0, T0 + MIN], "sma_20": [1.0, 2.0]}
    packed = {**per_bar, **{k: [T0] * 19 + [T0 + MIN] if k == "ts" else per_bar[k][:1] * 20 for k in per_bar}}
    off = [(per_bar, 1), (packed, 19), ({**values, "ts": [T0 + 1]}, 0)]
    for bad, i in off:
        bad_ts = bad["ts"][i]
        with pytest.raises(ValidationError, match=re.escape(f"indicators[{i}].ts: {bad_ts} is not the start of a")):
            client.call("store_analysis", cursor="t", position=6, indicators=bad)
    with pytest.raises(ValidationError, match=re.escape(f"values[0].ts: {T0 + 1} is not the start of a 1m bucket")):
        client.call("put_indicators", values=[{"symbol": "AAA", "timeframe": "1m", "name": "sma_20", "ts": T0 + 1,
                                               "value": 1.0}])
    # A store computed from another cursor position than the stored one lands nowhere.
    with pytest.raises(Conflict, match="not at 4"):
        client.call("store_analysis", cursor="t", position=9, bars=bars, expect=4)
    con = db(writer)
    try:
        assert con.execute("SELECT value FROM cursors WHERE name = 't'").fetchone() == (5,)
    finally:
        con.close()
    client.close()
