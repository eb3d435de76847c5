"""The tick ingestor's command line against a real writer: CSV replays,
malformed rows, the disk spool, bad flags."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime

from testkit.env import ROOT
from testkit.postgres import ReadConnection, read_connection
from testkit.writer import Stack

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def run(stack: Stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], env=stack.env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def ro(stack: Stack) -> sqlite3.Connection | ReadConnection:
    return read_connection(stack.settings)


def test_ohlcv_replay_gives_identical_bars_at_its_timeframe_and_replays_once(writer: Stack) -> None:
    # A 5-minute export with an unnamed index column and naive (UTC) times,
    # including down bars and a doji.
    rows = [(100.0, 101.5, 99.5, 101.0, 120.0), (101.0, 101.2, 98.7, 99.1, 80.5), (99.1, 99.1, 99.1, 99.1, 0.0),
            (99.1, 103.25, 99.0, 103.0, 310.25), (103.0, 103.5, 100.0, 100.25, 42.0)] * 6
    lines = [",Open,High,Low,Close,Volume"]
    expected = []
    for i, (o, h, low, c, v) in enumerate(rows):
        ts = T0 + i * 300_000
        lines.append(f"{datetime.fromtimestamp(ts / 1000, UTC):%Y-%m-%d %H:%M:%S},{o},{h},{low},{c},{v}")
        expected.append((ts, o, h, low, c, v))
    path = writer.home / "eurusd_5m.csv"
    path.write_text("\n".join(lines) + "\n")

    first = run(writer, "workers.ticks", "--feed", "csv", "--file", str(path), "--symbol", "EURUSD", "--speed", "max")
    assert first.returncode == 0, first.stderr
    assert f"received {4 * len(rows)}, acked {4 * len(rows)} (duplicates 0)" in first.stderr
    analysis = run(writer, "workers.analysis", "--until-idle")
    assert analysis.returncode == 0, analysis.stderr
    got = ro(writer).execute("SELECT ts, open, high, low, close, volume FROM bars WHERE symbol = 'EURUSD' "
                             "AND timeframe = '5m' ORDER BY ts").fetchall()
    assert got == expected

    again = run(writer, "workers.ticks", "--feed", "csv", "--file", str(path), "--symbol", "EURUSD")
    assert again.returncode == 0, again.stderr
    assert f"(duplicates {4 * len(rows)})" in again.stderr
    assert ro(writer).execute("SELECT count(*) FROM ticks").fetchone() == (4 * len(rows),)


def test_malformed_row_exits_nonzero_with_line_after_storing_rows_before_it(writer: Stack) -> None:
    path = writer.home / "ticks.csv"
    path.write_text("ts,symbol,bid,ask,volume\n"
                    "2024-01-01T00:00:00Z,BTCUSD,42000.5,42001.0,0.25\n"
                    "1704067201000,BTCUSD,42000.0,42002.0,1\n"
                    "2024-01-01T00:00:02+00:00,BTCUSD,42001.0,42001.5,0\n"
                    "2024-01-01T00:00:03Z,BTCUSD,42003.0,42001.0,2\n"
                    "2024-01-01T00:00:04Z,BTCUSD,42003.0,42004.0,2\n")
    result = run(writer, "workers.ticks", "--feed", "csv", "--file", str(path), "--speed", "max")
    assert result.returncode == 1
    assert "line 5" in result.stderr and "bid" in result.stderr and "ask" in result.stderr
    stored = ro(writer).execute("SELECT ts, bid FROM ticks ORDER BY ts").fetchall()
    assert stored == [(T0, 42000.5), (T0 + 1000, 42000.0), (T0 + 2000, 42001.0)]


def test_ticks_spool_while_the_writer_is_down_and_replay_later(stack: Stack) -> None:
    down = run(stack, "workers.ticks", "--feed", "sim", "--count", "50", "--seed", "3", "--rate", "1000",
               "--batch", "20", "--deadline", "1")
    assert down.returncode == 1, down.stderr  # nothing acknowledged: spooled, and it says so
    assert "spooled 50" in down.stderr
    spooled = sorted(p.name for p in stack.settings.spool_dir.iterdir())
    assert len(spooled) == 3
    stack.start_writer()
    up = run(stack, "workers.ticks", "--feed", "sim", "--count", "0")
    assert up.returncode == 0, up.stderr
    assert list(stack.settings.spool_dir.iterdir()) == []
    con = ro(stack)
    assert con.execute("SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM ticks").fetchone() == (
        50, 50, 0, 49)


def test_bad_flags_are_refused_with_the_reason(stack: Stack) -> None:
    cases = [
        (["--feed", "csv"], "--feed csv needs --file"),
        (["--feed", "csv", "--file", "/nonexistent.csv"], "no such file"),
        (["--feed", "csv", "--file", __file__, "--speed", "0"], "invalid replay speed"),
        (["--symbols", "btc,eth"], "--symbols"),
        (["--batch", "0"], "--batch 0"),
        (["--feed", "ftp"], "invalid choice"),
    ]
    for args, message in cases:
        result = run(stack, "workers.ticks", *args, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
