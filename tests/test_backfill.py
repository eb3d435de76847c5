"""Backfill: ticks that arrive late or out of order, in any amount, end up in exactly the bars they
belong to, with the indicators recomputed from there on; nothing is dropped, and the console says so.

The reference is always a clean replay: the same ticks, in time order, into an empty database.
"""
from __future__ import annotations

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
from db.models import now_ms
from db.vocabulary import TIMEFRAMES
from testkit.env import ROOT
from testkit.helpers import wait_for
from testkit.postgres import ReadConnection, read_connection
from testkit.writer import Stack
from webapp import create_app
from workers.indicators import atr_wilder, ema, rsi_wilder, sma

MIN, DAY = 60_000, 86_400_000
README_TICK = {"symbol": "BTCUSD", "ts": 1732700000000, "bid": 97000.5, "ask": 97001.0}  # README's curl example


# --------------------------------------------------------------------------- helpers


def walk(symbol: str, times: list[int], seed: int, start: float = 1.1) -> list[dict]:
    """Ticks at ``times`` on a random walk, with volumes whose sums depend on the order of addition."""
    rnd, mid = random.Random(seed), start
    out = []
    for ts in times:
        mid = round(mid * (1 + rnd.gauss(0, 0.0008)), 5)
        out.append({"symbol": symbol, "ts": ts, "bid": mid, "ask": round(mid + 0.0002, 5),
                    "volume": round(rnd.uniform(0.01, 3.0), 3)})
    return out


def send(stack: Stack, ticks: list[dict], source: str, first_seq: int = 0, batch: int = 200) -> None:
    with WriterClient(settings=stack.settings, deadline=30) as client:
        for k in range(0, len(ticks), batch):
            part = [{**t, "source": source, "seq": first_seq + k + i} for i, t in enumerate(ticks[k:k + batch])]
            assert client.call("insert_ticks", ticks=part)["inserted"] == len(part)


def write_tick_csv(path: Path, ticks: list[dict]) -> Path:
    path.write_text("ts,symbol,bid,ask,volume\n" + "".join(
        f"{t['ts']},{t['symbol']},{t['bid']!r},{t['ask']!r},{t['volume']!r}\n" for t in ticks))
    return path


def run(stack: Stack, module: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], env=stack.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def db(stack: Stack) -> sqlite3.Connection | ReadConnection:
    return read_connection(stack.settings)


def cursor_at_end(stack: Stack) -> bool:
    con = db(stack)
    try:
        (cursor,) = con.execute("SELECT coalesce(max(value), 0) FROM cursors WHERE name = 'analysis'").fetchone()
        (last,) = con.execute("SELECT coalesce(max(id), 0) FROM ticks").fetchone()
        return cursor == last > 0
    finally:
        con.close()


def snapshot(stack: Stack) -> tuple[dict, dict]:
    """Every bar and indicator value, keyed without ids (they differ between two databases)."""
    con = db(stack)
    try:
        bars = {(s, tf, ts): tuple(rest) for s, tf, ts, *rest in con.execute(
            "SELECT symbol, timeframe, ts, open, high, low, close, volume, tick_count FROM bars")}
        inds = {(s, tf, n, ts): v for s, tf, n, ts, v in con.execute(
            "SELECT symbol, timeframe, name, ts, value FROM indicators")}
    finally:
        con.close()
    return bars, inds


def textbook(stack: Stack) -> tuple[dict, dict]:
    """Bars folded tick by tick from the stored ticks in (ts, id) order, and the batch indicators of
    those bars: an independent recomputation of what the worker must have stored."""
    con = db(stack)
    bars: dict[tuple, list] = {}
    try:
        for sym, ts, bid, vol in con.execute("SELECT symbol, ts, bid, volume FROM ticks ORDER BY ts, id"):
            for tf, length in TIMEFRAMES.items():
                b = bars.get(key := (sym, tf, ts // length * length))
                if b is None:
                    bars[key] = [bid, bid, bid, bid, vol, 1]
                else:
                    b[1], b[2], b[3] = max(b[1], bid), min(b[2], bid), bid
                    b[4] += vol
                    b[5] += 1
    finally:
        con.close()
    inds = {}
    for sym, tf in {(k[0], k[1]) for k in bars}:
        series = sorted((k[2], b) for k, b in bars.items() if k[:2] == (sym, tf))
        ts = [t for t, _ in series]
        hs, ls, cs = ([b[i] for _, b in series] for i in (1, 2, 3))
        for name, values in (("sma_20", sma(cs, 20)), ("ema_20", ema(cs, 20)), ("rsi_14", rsi_wilder(cs, 14)),
                             ("atr_14", atr_wilder(hs, ls, cs, 14))):
            inds.update({(sym, tf, name, t): v for t, v in zip(ts, values, strict=True) if v is not None})
    return {k: tuple(b) for k, b in bars.items()}, inds


@pytest.fixture
def clean() -> Iterator[Stack]:
    """A second, empty database with its own writer: where the reference replay goes."""
    st = Stack.create()
    try:
        st.start_writer()
        yield st
    finally:
        st.close()


def differences(got: dict, want: dict, shown: int = 8) -> str:
    """The keys where ``got`` and ``want`` differ, with both values (the first ``shown`` of each kind):
    what a failed bit-for-bit comparison needs to tell its cause in one run."""
    missing = sorted(want.keys() - got.keys())
    extra = sorted(got.keys() - want.keys())
    changed = sorted(k for k in got.keys() & want.keys() if got[k] != want[k])
    lines = [f"{len(changed)} differ, {len(missing)} missing, {len(extra)} extra"]
    lines += [f"  {k}: got {got[k]!r}, want {want[k]!r}" for k in changed[:shown]]
    lines += [f"  missing {k}: want {want[k]!r}" for k in missing[:shown]]
    lines += [f"  extra {k}: got {got[k]!r}" for k in extra[:shown]]
    return "\n".join(lines)


def assert_same(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    """Bars and indicators equal bit for bit; else the differing keys with both values."""
    for name, g, w in (("bars", got[0], want[0]), ("indicators", got[1], want[1])):
        assert g == w, f"{name}: {differences(g, w)}"


def analyse_all(stack: Stack, *args: str) -> None:
    """``workers.analysis --until-idle``, which must have read every stored tick (else a comparison of
    bars would fail with thousands of them, and not say why)."""
    log = run(stack, "workers.analysis", "--until-idle", *args).stderr
    assert cursor_at_end(stack), f"the --until-idle run stopped before the last tick:\n{log[-2000:]}"


def clean_replay(stack: Stack, ticks: list[dict]) -> tuple[dict, dict]:
    send(stack, sorted(ticks, key=lambda t: t["ts"]), "clean", batch=5000)
    analyse_all(stack)
    return snapshot(stack)


def samples(stack: Stack, name: str) -> dict[str, float]:
    con = db(stack)
    try:
        return dict(con.execute("SELECT labels, sum(value) FROM samples WHERE name = ? GROUP BY labels", (name,)))
    finally:
        con.close()


# --------------------------------------------------------------------------- tests


def test_history_replayed_into_a_live_symbol_equals_a_clean_replay(writer: Stack, clean: Stack) -> None:
    now = now_ms() // 2 * 2
    live_start = now - 45 * MIN
    rnd = random.Random(3)
    live_times = sorted({live_start + 2 * rnd.randrange(0, 45 * MIN // 2) for _ in range(900)})  # even ms
    live = walk("EURUSD", live_times, seed=1)
    btc = [{**t, "bid": t["bid"] * 90_000, "ask": t["ask"] * 90_000}
           for t in walk("BTCUSD", live_times[::10], seed=2)]
    # History: three days up to the live start, and ticks inside the live period that a slower source
    # delivers later (odd ms: no ts equal to a live one), down to the minute being built.
    hist_times = sorted({live_start - 3 * DAY + 2 * rnd.randrange(0, 3 * DAY // 2) + 1 for _ in range(1500)}
                        | {live_start + 2 * rnd.randrange(0, (live_times[-1] - live_start) // 2) + 1
                           for _ in range(300)})
    history = walk("EURUSD", hist_times, seed=4)

    analysis = subprocess.Popen([sys.executable, "-m", "workers.analysis", "--chunk", "97"], env=writer.env,
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    writer.procs.append(analysis)
    for k in range(0, len(live), 150):  # the live feed, with the worker keeping up
        send(writer, live[k:k + 150], "live", first_seq=k)
        send(writer, btc[k // 10:(k + 150) // 10], "live-btc", first_seq=k)
        wait_for("the worker to keep up", lambda: cursor_at_end(writer))
    wait_for("the worker to keep up", lambda: cursor_at_end(writer))

    csv = write_tick_csv(writer.home / "eurusd-history.csv", history)
    assert "acked 1800" in run(writer, "workers.ticks", "--feed", "csv", "--file", str(csv), "--speed", "max").stderr
    send(writer, [README_TICK], "readme")
    later = walk("EURUSD", [live_times[-1] + 2 * i for i in range(1, 40)], seed=5, start=live[-1]["bid"])
    send(writer, later, "live", first_seq=len(live))
    wait_for("the backfill to be analysed", lambda: cursor_at_end(writer), timeout=120)
    writer.stop(analysis)
    log = analysis.stderr.read() if analysis.stderr else ""

    got = snapshot(writer)
    assert_same(got, textbook(writer))  # every stored tick is in its bars, with indicators to match
    assert_same(got, clean_replay(clean, [*live, *btc, *history, README_TICK, *later]))  # bit for bit
    old = (README_TICK["symbol"], "1m", README_TICK["ts"] // MIN * MIN)
    assert got[0][old][:4] == (97000.5,) * 4  # the README's example tick has its bar
    # Nothing dropped silently: every late tick is counted, in the log and for the console.
    assert samples(writer, "analysis_backfill_ticks") == {"EURUSD": len(history), "BTCUSD": 1}
    assert samples(writer, "analysis_backfill_bars")["EURUSD"] >= len({t["ts"] // MIN for t in history})
    logged = sum(int(n) for n in re.findall(r"late ticks folded in (\d+)", log))
    assert logged == len(history) + 1, log[-2000:]


def test_console_market_page_shows_backfills(writer: Stack) -> None:
    ticks = walk("EURUSD", [now_ms() - 10 * MIN + i * 1000 for i in range(60)], seed=6)
    send(writer, ticks[30:], "live")
    run(writer, "workers.analysis", "--until-idle")
    send(writer, ticks[:30], "late")
    run(writer, "workers.analysis", "--until-idle")
    app = create_app("console", writer.settings)
    client = app.test_client()
    page = client.get("/console/login").text
    token = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    password = (writer.home / "admin-password").read_text().strip()
    assert client.post("/console/login", data={"csrf_token": token, "username": "admin",
                                                "password": password}).status_code == 302
    page = client.get("/console/market?symbol=EURUSD").text
    assert "Backfill" in page and "30 late ticks" in page, page


def test_sigkill_during_a_large_backfill_counts_every_tick_once(writer: Stack, clean: Stack) -> None:
    """Late ticks by the thousand, stored in several requests per chunk, the worker killed anywhere:
    the result is still the clean replay's."""
    base = now_ms() - 5 * DAY
    live = walk("ABC", [base + 4 * DAY + i * 1000 for i in range(3000)], seed=7)
    rnd = random.Random(8)
    history = walk("ABC", sorted({base + rnd.randrange(0, 4 * DAY + 3_000_000) | 1 for _ in range(20_000)}), seed=9)
    assert len(history) > 19_000
    send(writer, live, "live", batch=3000)
    analyse_all(writer)
    send(writer, history, "history", batch=5000)
    con = db(writer)
    try:
        start = con.execute("SELECT value FROM cursors WHERE name = 'analysis'").fetchone()[0]
        positions = []
        for _ in range(3):
            proc = subprocess.Popen([sys.executable, "-m", "workers.analysis", "--chunk", "700",
                                     "--rows-per-store", "300"], env=writer.env, cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            writer.procs.append(proc)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                (now,) = con.execute("SELECT value FROM cursors WHERE name = 'analysis'").fetchone()
                if now > (positions[-1] if positions else start) + 1500:
                    break
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)  # anywhere: between the requests of one chunk too
            proc.wait()
            positions.append(con.execute("SELECT value FROM cursors WHERE name = 'analysis'").fetchone()[0])
    finally:
        con.close()
    assert positions == sorted(positions) and positions[-1] < start + len(history), positions
    analyse_all(writer, "--rows-per-store", "300")
    got = snapshot(writer)
    assert_same(got, textbook(writer))  # every stored tick in its bars once, indicators to match
    assert_same(got, clean_replay(clean, [*live, *history]))


def test_late_tick_into_a_bar_whose_ticks_retention_deleted_is_folded_in(writer: Stack) -> None:
    """A bar older than retention keeps its values when a late tick arrives: the tick is added to it
    (its stored ticks are gone, so recomputing from them would lose them)."""
    day = (now_ms() - 40 * DAY) // DAY * DAY
    old = walk("OLD", [day + i * 60_000 + 7 for i in range(0, 1440, 3)], seed=10)
    send(writer, old, "old")
    send(writer, walk("OLD", [now_ms() - 1000], seed=11), "live")
    run(writer, "workers.analysis", "--until-idle")
    before = snapshot(writer)[0][("OLD", "1d", day)]
    with WriterClient(settings=writer.settings, deadline=30) as client:
        assert client.call("prune_ticks", before_ts=day + DAY)["deleted"] == len(old)
    late = {"symbol": "OLD", "ts": day + 5, "bid": 9.5, "ask": 9.6, "volume": 0.25}
    send(writer, [late], "late")
    run(writer, "workers.analysis", "--until-idle")
    after = snapshot(writer)[0][("OLD", "1d", day)]
    o, h, lo, c, v, n = before
    assert after == (o, max(h, 9.5), min(lo, 9.5), 9.5, v + 0.25, n + 1)
    assert snapshot(writer)[0][("OLD", "1m", day)] == (9.5, 9.5, 9.5, 9.5, 0.25, 1)  # a minute it never had
