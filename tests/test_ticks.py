"""The tick ingestor's command line against a real writer: CSV replays,
malformed rows, the disk spool, bad flags."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgpack
import pytest
from sqlalchemy import create_engine

from testkit.env import ROOT, isolated_env, new_home
from testkit.helpers import wait_for
from testkit.postgres import ReadConnection, read_connection
from testkit.writer import Stack

#: The tests of this module whose promise is the same whatever the database (tests/conftest.py).
DATABASE_INDEPENDENT = pytest.mark.database_independent(
    "the ingestor's flags are refused before it sends anything to the writer")

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
    # The interval it inferred, said before it replays (a wrong guess would store bars of another timeframe).
    assert f"{path}: 5m bars of EURUSD (inferred from the file; --timeframe to say otherwise)" in first.stderr
    analysis = run(writer, "workers.analysis", "--until-idle")
    assert analysis.returncode == 0, analysis.stderr
    got = ro(writer).execute("SELECT ts, open, high, low, close, volume FROM bars WHERE symbol = 'EURUSD' "
                             "AND timeframe = '5m' ORDER BY ts").fetchall()
    assert got == expected

    again = run(writer, "workers.ticks", "--feed", "csv", "--file", str(path), "--symbol", "EURUSD",
                "--timeframe", "5m")
    assert again.returncode == 0, again.stderr
    assert f"{path}: 5m bars of EURUSD (--timeframe)" in again.stderr
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


# A bad row at line 7 after good lines 2-6, then good lines 8-10: the replay stores lines 2-6 and no
# other, never has a batch refused by the writer (which would keep lines 2-6 out too), and exits 1
# naming line 7 and the field. Each line's tick has its own ts, so the stored rows say which lines.
BAD_LINE = 7


def tick_row(line: int) -> str:
    return f"{T0 + line * 1000},EURUSD,1.1,1.1002,1"


def replay(stack: Stack, path: Path, *extra: str) -> subprocess.CompletedProcess:
    return run(stack, "workers.ticks", "--feed", "csv", "--file", str(path), "--speed", "max", *extra)


def stored(stack: Stack) -> list[tuple[int, int]]:
    return ro(stack).execute("SELECT seq, ts FROM ticks ORDER BY seq").fetchall()


def assert_stopped_at_bad_line(stack: Stack, result: subprocess.CompletedProcess, expected: list[tuple[int, int]],
                               line: int, *words: str) -> None:
    """Exit 1, the error names ``line`` and ``words`` (the field), every row before it stored once and
    none after, no traceback and no batch refused by the writer."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "writer rejected" not in result.stderr, result.stderr
    error = [msg for msg in result.stderr.splitlines() if f"line {line}: " in msg]
    assert error and all(w in error[0] for w in words), (words, result.stderr[-2000:])
    assert stored(stack) == expected
    assert list(stack.settings.spool_dir.iterdir()) == []


@pytest.mark.parametrize(("row", "field"), [
    pytest.param(f"{T0 + 7000},eurusd,1.1,1.1002,1", "symbol", id="lower-case-symbol"),
    pytest.param("2200-01-01T00:00:00,EURUSD,1.1,1.1002,1", "ts", id="year-2200"),
    pytest.param(f"{T0 + 7000},EURUSD,1e13,1e13,1", "bid", id="price-1e13"),
    pytest.param("-5,EURUSD,1.1,1.1002,1", "ts", id="negative-ts"),
    pytest.param(f"{T0 + 7000},EURUSD,1.1,1.1002,1e13", "volume", id="volume-1e13"),
    pytest.param("9" * 5000 + ",EURUSD,1.1,1.1002,1", "ts", id="ts-of-5000-digits"),
])
def test_a_row_the_writer_would_refuse_stops_the_replay_at_its_line(writer: Stack, row: str, field: str) -> None:
    path = writer.home / "bad.csv"
    lines = [tick_row(n) for n in range(2, BAD_LINE)] + [row] + [tick_row(n) for n in range(BAD_LINE + 1, 11)]
    path.write_text("ts,symbol,bid,ask,volume\n" + "\n".join(lines) + "\n")
    result = replay(writer, path)
    expected = [(4 * n, T0 + n * 1000) for n in range(2, BAD_LINE)]
    assert_stopped_at_bad_line(writer, result, expected, BAD_LINE, field)


@pytest.mark.parametrize(("row", "field"), [
    pytest.param(f"{T0 + 7000},EURUSD,1_1,1_2,1", "bid", id="underscore-in-bid"),
    pytest.param("\u0661\u0667\u0660\u0664\u0660\u0666\u0667\u0662\u0660\u0667\u0660\u0660\u0660,EURUSD,1.1,"
                 "1.1002,1", "ts", id="arabic-indic-ts"),
])
def test_a_number_python_reads_but_no_export_writes_stops_the_replay_at_its_line(writer: Stack, row: str,
                                                                                  field: str) -> None:
    # float() reads "1_1" as 11 and int() Arabic-Indic digits: both were stored.
    path = writer.home / "bad.csv"
    lines = [tick_row(n) for n in range(2, BAD_LINE)] + [row] + [tick_row(n) for n in range(BAD_LINE + 1, 11)]
    path.write_text("ts,symbol,bid,ask,volume\n" + "\n".join(lines) + "\n")
    result = replay(writer, path)
    expected = [(4 * n, T0 + n * 1000) for n in range(2, BAD_LINE)]
    assert_stopped_at_bad_line(writer, result, expected, BAD_LINE, field, "is not")


def test_a_tick_file_of_epoch_seconds_is_stored_at_those_seconds(writer: Stack) -> None:
    # They were read as ms, and stored as January 1970; bar files told seconds from ms, now both do.
    path = writer.home / "seconds.csv"
    path.write_text("ts,symbol,bid,ask,volume\n" + "".join(f"{T0 // 1000 + n},EURUSD,1.1,1.1002,1\n"
                                                             for n in range(2, 6)))
    result = replay(writer, path)
    assert result.returncode == 0, result.stderr
    assert stored(writer) == [(4 * n, T0 + n * 1000) for n in range(2, 6)]


def test_a_field_over_the_csv_limit_stops_the_replay_at_its_line(writer: Stack) -> None:
    path = writer.home / "long.csv"
    lines = [tick_row(n) for n in range(2, BAD_LINE)] + [f"{T0 + 7000},EURUSD,1.1,1.1002,{'1' * 140_000}"]
    path.write_text("ts,symbol,bid,ask,volume\n" + "\n".join(lines + [tick_row(8)]) + "\n")
    result = replay(writer, path)
    expected = [(4 * n, T0 + n * 1000) for n in range(2, BAD_LINE)]
    assert_stopped_at_bad_line(writer, result, expected, BAD_LINE, "field", "131072")


#: Megabytes of the large files of the memory tests: several times their bound (a quarter of it), and
#: small enough to be written and read in a moment.
LARGE_MB = 64


def peak_memory(stack: Stack, path: Path, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    """A replay of ``path`` and its peak resident memory in KiB. The replay runs as the one child of a
    small wrapper that reports its children's peak (``getrusage``): this process's children are every
    process the test run started, the writer among them."""
    wrapper = ("import resource, subprocess, sys; done = subprocess.run([sys.executable, '-m', *sys.argv[1:]]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")
    result = subprocess.run([sys.executable, "-c", wrapper, "workers.ticks", "--feed", "csv", "--file", str(path),
                             "--speed", "max", *args], env=stack.env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    return result, int(result.stdout.split()[-1])


def test_a_replay_does_not_hold_the_file_in_memory_to_name_its_source(writer: Stack) -> None:
    # The source is the file's hash, which read the whole file at once: memory grew with the file (870 MB
    # took 900 MB before the first tick was sent), and a file larger than memory could not be replayed.
    # Line 3 is bad, so the replay reads no further; only the hash reads the rows after it.
    head = f"ts,symbol,bid,ask,volume\n{tick_row(2)}\n{T0 + 3000},EURUSD,x,1.1002,1\n"
    small = writer.home / "small.csv"
    small.write_text(head)
    large = writer.home / "large.csv"
    row = f"{tick_row(4)}\n"
    large.write_text(head + row * (LARGE_MB * 2**20 // len(row)))
    base, base_kib = peak_memory(writer, small)
    result, kib = peak_memory(writer, large)
    for replay in (base, result):
        assert replay.returncode == 1 and "line 3: bid 'x' is not a number" in replay.stderr, replay.stderr[-2000:]
    # The digest of the file's bytes, as before: a file replayed before keeps its source.
    assert f"source csv-file-{hashlib.sha256(small.read_bytes()).hexdigest()[:16]}," in base.stderr, base.stderr
    assert kib - base_kib < LARGE_MB * 1024 // 4, (base_kib, kib)


def test_a_line_longer_than_any_row_stops_the_replay_at_its_line_in_bounded_memory(writer: Stack) -> None:
    # A line is read at most csvrows.MAX_RECORD_CHARS characters in: a 500 MB line took a gigabyte
    # before the csv module refused its field.
    head = f"ts,symbol,bid,ask,volume\n{tick_row(2)}\n{T0 + 3000},EURUSD,1.1,1.1002,"
    small = writer.home / "small.csv"
    small.write_text(f"{head}x\n{tick_row(4)}\n")
    large = writer.home / "large.csv"
    large.write_text(f"{head}{'1' * (LARGE_MB * 2**20)}\n{tick_row(4)}\n")
    base, base_kib = peak_memory(writer, small)
    result, kib = peak_memory(writer, large)
    assert base.returncode == 1 and "line 3: volume 'x' is not a number" in base.stderr, base.stderr[-2000:]
    assert kib - base_kib < LARGE_MB * 1024 // 4, (base_kib, kib)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "line 3: the row is longer than 1,048,576 characters" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert stored(writer) == [(8, T0 + 2000)] * 2  # line 2 of each file (two files: two sources)


def test_a_bar_replay_does_not_hold_the_file_in_memory_to_infer_its_timeframe(writer: Stack) -> None:
    # The timeframe is inferred from every bar: all of them were read into a list first, so memory grew
    # with the file (tick files stream). The last bar is off the 1-minute boundaries, so both replays
    # read the whole file to infer the timeframe, then stop at that line before sending anything.
    def bars(count: int) -> str:
        rows = "".join(f"{T0 + i * 60_000},100,101,99,100.5,10\n" for i in range(count))
        return f"Date,Open,High,Low,Close,Volume\n{rows}{T0 + count * 60_000 + 30_000},100,101,99,100.5,10\n"

    small = writer.home / "small-bars.csv"
    small.write_text(bars(3))
    large = writer.home / "large-bars.csv"
    large.write_text(bars(LARGE_MB * 2**20 // 4 // len("1704067200000,100,101,99,100.5,10\n")))
    base, base_kib = peak_memory(writer, small, "--symbol", "EURUSD")
    result, kib = peak_memory(writer, large, "--symbol", "EURUSD")
    for replay, path in ((base, small), (result, large)):
        last = len(path.read_text().splitlines())
        assert replay.returncode != 0 and f"line {last}: bar time " in replay.stderr and \
            "is not aligned to 1m bars (UTC boundaries)" in replay.stderr, replay.stderr[-2000:]
    assert stored(writer) == []
    # A quarter of the file, as the tick files' tests: the bars of a list took many times the file.
    assert kib - base_kib < LARGE_MB * 1024 // 4 // 4, (base_kib, kib)


@pytest.mark.parametrize("good", [5, 3000], ids=["in-the-first-8k", "after-3000-rows"])
def test_a_byte_that_is_not_utf8_stops_the_replay_at_its_line(writer: Stack, good: int) -> None:
    # The reader decoded 8 KB at a time: the good rows sharing the bad byte's 8 KB were lost, and a
    # bad byte in the first 8 KB was reported before the header was read, with no file and no line.
    bad = good + 2
    path = writer.home / "latin1.csv"
    head = "ts,symbol,bid,ask,volume\n" + "".join(f"{tick_row(n)}\n" for n in range(2, bad))
    path.write_bytes(head.encode() + f"{T0 + bad * 1000},EUR".encode() + b"\xff" + b"USD,1.1,1.1002,1\n"
                     + f"{tick_row(bad + 1)}\n".encode())
    result = replay(writer, path)
    expected = [(4 * n, T0 + n * 1000) for n in range(2, bad)]
    assert_stopped_at_bad_line(writer, result, expected, bad, "symbol", "UTF-8")


@pytest.mark.parametrize(("row", "field"), [
    pytest.param("2024-01-01 00:05:00,100,1e13,99,100.5,10", "high", id="high-1e13"),
    pytest.param("2024-01-01 00:05:00,100,101,99,100.5,1e13", "volume", id="volume-1e13"),
    pytest.param("2200-01-01 00:00:00,100,101,99,100.5,10", "time", id="year-2200"),
    pytest.param("2024-01-01 00:05:00,100,101,102,100.5,10", "high", id="high-below-low"),
])
def test_a_bad_bar_stops_the_replay_at_its_line_after_storing_the_bars_before_it(writer: Stack, row: str,
                                                                                 field: str) -> None:
    path = writer.home / "bars.csv"
    # 1-minute bars from T0 on lines 2-10 (line n at minute n - 2), the one of line 7 replaced by ``row``.
    bars = [f"{datetime.fromtimestamp((T0 + i * 60_000) / 1000, UTC):%Y-%m-%d %H:%M:%S},100,101,99,100.5,10"
            for i in range(9)]
    bars[BAD_LINE - 2] = row
    path.write_text("Date,Open,High,Low,Close,Volume\n" + "\n".join(bars) + "\n")
    result = replay(writer, path, "--symbol", "EURUSD")
    # A bar is 4 ticks (seq = line * 4 + position) at these offsets inside its minute.
    offsets = (0, 15_000, 30_000, 59_999)
    expected = [(4 * n + k, T0 + (n - 2) * 60_000 + offsets[k]) for n in range(2, BAD_LINE) for k in range(4)]
    assert_stopped_at_bad_line(writer, result, expected, BAD_LINE, field)


def test_ticks_spool_while_the_writer_is_down_and_replay_later(stack: Stack) -> None:
    down = run(stack, "workers.ticks", "--feed", "sim", "--count", "50", "--seed", "3", "--rate", "1000",
               "--batch", "20", "--deadline", "1")
    assert down.returncode == 1, down.stderr  # nothing acknowledged: spooled, and it says so
    assert "spooled 50" in down.stderr
    spooled = sorted(p.name for p in stack.settings.spool_dir.iterdir())
    assert len(spooled) == 3
    spooled_source = re.search(r"source (\S+) received", down.stderr)[1]  # type: ignore[index]
    stack.start_writer()
    up = run(stack, "workers.ticks", "--feed", "sim", "--count", "5", "--seed", "4", "--rate", "1000")
    assert up.returncode == 0, up.stderr
    assert list(stack.settings.spool_dir.iterdir()) == []
    # Its own ticks apart from the earlier run's: "received 5, acked 55" read as if ticks were made up.
    assert "received 5, acked 5 (duplicates 0)" in up.stderr and "50 ticks an earlier run spooled" in up.stderr
    con = ro(stack)
    assert con.execute("SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM ticks WHERE source = ?",
                       (spooled_source,)).fetchone() == (50, 50, 0, 49)
    assert con.execute("SELECT count(*) FROM ticks").fetchone() == (55,)


def test_a_simulated_tick_is_sent_when_it_is_due_never_dated_ahead(writer: Stack) -> None:
    # --seed 10 at --rate 0.25: the first tick is 3.4 s after the feed's start. It was sent at once,
    # dated 3.4 s after it was stored (at --rate 1e-9, about 30 years after).
    result = run(writer, "workers.ticks", "--count", "1", "--rate", "0.25", "--seed", "10")
    done = int(time.time() * 1000)
    assert result.returncode == 0, result.stderr
    ((ts,),) = ro(writer).execute("SELECT ts FROM ticks").fetchall()
    assert ts <= done, (ts, done)


def test_a_stop_does_not_wait_for_a_slow_feeds_next_tick(writer: Stack) -> None:
    # --seed 0 at --rate 0.001: ticks due 31 and 61 minutes after the start. The wait for a tick was a
    # sleep SIGTERM did not end: a stop waited for the next tick (circus kills after 20 s).
    log = writer.home / "log" / "ticks-test.log"
    code = run_until(writer, ["--rate", "0.001", "--seed", "0"], log, signal.SIGTERM,
                     "the ingestor's start", lambda: "spooled batches to replay" in log.read_text())
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


def run_until(stack: Stack, args: list[str], log: Path, sig: int, what: str, ready: Callable[[], bool]) -> int:
    """``python -m workers.ticks ARGS``, logging into ``log``, sent ``sig`` once ``ready()``: its exit
    code (killed, by its pid, if it does not exit within a minute)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "workers.ticks", *args], env=stack.env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(what, ready)
        proc.send_signal(sig)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_replay_stopped_before_its_end_says_so_and_exits_1_and_a_second_run_finishes_it(writer: Stack) -> None:
    """A replay at real-time speed, Ctrl-C'd after its first tick: it exited 0 ("received 1, acked 1")
    while the README says 0 means every tick of the file is acknowledged (a new user's run of the
    README, round 37). It now says where it stopped and exits 1; the same command run again stores
    the rest, the first tick once. And the first tick is stored when it is due: it was held until the
    next one was (here ten minutes later), and sent only by the stop."""
    path = writer.home / "slow.csv"
    path.write_text("ts,symbol,bid,ask,volume\n" + "".join(f"{T0 + n * 600_000},EURUSD,1.1,1.1002,1\n"
                                                           for n in range(4)))
    args = ["--feed", "csv", "--file", str(path), "--symbol", "EURUSD"]
    log = writer.home / "log" / "ticks-test.log"
    # Ten minutes between ticks at real time: the first is sent, then it waits.
    code = run_until(writer, [*args, "--speed", "1"], log, signal.SIGINT, "the first tick stored",
                     lambda: len(stored(writer)) == 1)
    said = log.read_text()
    assert code == 1 and "stopped before the end of its feed" in said and "Traceback" not in said, said
    assert "a CSV replay run again with the same file sends the rest" in said, said
    again = run(writer, "workers.ticks", *args, "--speed", "max")
    assert again.returncode == 0, again.stderr
    assert len(stored(writer)) == 4
    # A simulated feed's --count stopped early is told so, without the replay's "sends the rest"
    # (a new walk sends new ticks; review of round 37).
    code = run_until(writer, ["--feed", "sim", "--count", "1000000", "--rate", "50", "--symbols", "GBPUSD"], log,
                     signal.SIGINT, "a simulated tick stored",
                     lambda: ro(writer).execute("SELECT count(*) FROM ticks WHERE symbol = 'GBPUSD'").fetchone()[0])
    said = log.read_text()
    assert code == 1 and "stopped before the end of its feed" in said, said
    assert "its --count ticks are new ones, not the rest" in said, said


def test_a_stop_spools_what_a_silent_writer_has_not_answered_within_its_budget(writer: Stack) -> None:
    """A stop's flush waited for each request in flight until its client deadline (``--deadline``, 15 s
    by default; then up to 6 s of last chance): past circus's graceful_timeout (20 s) the feed was
    SIGKILLed, its ticks in memory and its summary lost (seen after a quit on a loaded machine). A
    stop now gives the writer :data:`workers.tick_ingestor.STOP_BUDGET_S` at most, then spools (every worker
    has such a budget: ``Worker.stop_budget``). Here the
    deadline is an hour and the writer is stopped (SIGSTOP): the old flush waited the hour."""
    (writer_proc,) = writer.procs
    log = writer.home / "log" / "ticks-test.log"
    proc = writer.start_worker("workers.ticks", log, "--feed", "sim", "--rate", "200", "--deadline", "3600")
    try:
        wait_for("ticks stored", lambda: ro(writer).execute("SELECT count(*) FROM ticks").fetchone()[0] > 0)
        os.kill(writer_proc.pid, signal.SIGSTOP)
        try:
            time.sleep(1.0)  # the feed goes on: batches sent to the stopped writer, unanswered, the window full
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:  # where its stop got to (one full run met this once)
                raise AssertionError(f"no exit 120 s after SIGTERM:\n{log.read_text()[-3000:]}") from None
            assert code == 0, log.read_text()[-3000:]
        finally:
            os.kill(writer_proc.pid, signal.SIGCONT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    summary = re.search(r"received (\d+), acked (\d+) \(duplicates \d+\), spooled (\d+)", text)
    assert summary, text[-3000:]
    received, acked, spooled = map(int, summary.groups())
    assert spooled > 0 and received == acked + spooled, text[-3000:]  # every tick acked or on disk
    # What becomes of them is said (a replay that spooled exited 1 with the summary alone).
    assert re.search(rf"ticks: [1-9]\d* spooled batch\(es\) of this run are in {writer.home / 'spool'}, not stored "
                     r"yet: the `ticks` watcher, or any `python -m workers.ticks` on this home, sends them once the "
                     "writer answers", text), text[-3000:]
    assert "Traceback" not in text, text[-3000:]


@DATABASE_INDEPENDENT
def test_bad_flags_are_refused_with_the_reason(stack: Stack) -> None:
    bad_header = stack.home / "bad-header.csv"
    bad_header.write_text("time,sym,price\n2024-01-02,EURUSD,1.1\n")
    cases = [
        (["--feed", "csv"], "--feed csv needs --file"),
        (["--feed", "csv", "--file", "/nonexistent.csv"], "no such file"),
        # A folder or a device was "no such file" too.
        (["--feed", "csv", "--file", str(stack.home)], f"--file {stack.home}: is a folder, not a CSV file"),
        (["--feed", "csv", "--file", "/dev/null"], "--file /dev/null: is a character device, not a CSV file"),
        (["--feed", "csv", "--file", ""], "'' is empty: give a file's path"),
        (["--feed", "csv", "--file", __file__, "--speed", ""], "invalid replay speed"),  # not the default's
        (["--feed", "sim", "--symbols", ""], "--symbols"),
        (["--feed", "csv", "--file", __file__, "--speed", "0"], "invalid replay speed"),
        # A header that gives no tick, refused before the writer is asked anything (it was at "line 1 ...
        # (every row before it is stored)", once the feed had started), naming every column it lacks.
        (["--feed", "csv", "--file", str(bad_header), "--symbol", "EURUSD"],
         f"{bad_header}: line 1: header lacks column(s) bid; ask; expected ts,symbol,bid,ask,volume"),
        (["--symbols", "btc,eth"], "--symbols"),
        # A symbol given twice got twice the share of --rate (a bad-input hunt, round 38).
        (["--symbols", "BTCUSD,EURUSD,BTCUSD"], "--symbols 'BTCUSD,EURUSD,BTCUSD': BTCUSD is given twice"),
        (["--batch", "0"], "argument --batch: '0' must be a whole number from 1 to 10000"),
        # Whole numbers with a bound: a huge count or memory limit is refused, not run for ever.
        (["--count", "-1"], "argument --count: '-1' must be a whole number from 0 to 1000000000000"),
        (["--count", "1e30"], "argument --count: '1e30' must be a whole number from 0 to 1000000000000"),
        (["--count", "9" * 5000], "argument --count: '" + "9" * 40 + "'... (5,000 characters) must be a whole"),
        (["--seed", "2.5"], "argument --seed: '2.5' must be a whole number from 0 to 4294967295"),
        (["--memory-limit", "1e12"], "argument --memory-limit: '1e12' must be a whole number from 1 to 10000000"),
        (["--feed", "ftp"], "invalid choice"),
        # Not finite, or no use: nan would never compare, inf would never end a wait.
        (["--deadline", "inf"], "argument --deadline: 'inf' must be a number from 0.1 to 86400"),
        (["--deadline", "-1"], "argument --deadline: '-1' must be a number from 0.1 to 86400"),
        (["--rate", "nan"], "argument --rate: 'nan' must be a number from 0.001 to 1000000"),
        # Numbers that broke the feed: a tick every 1e300 s on average was dated too far ahead to be sent
        # (a traceback), every 1e12 s one the writer refused, every 1e9 s one of about 2057; a deadline
        # no answer comes within spooled every tick.
        (["--rate", "1e-300"], "argument --rate: '1e-300' must be a number from 0.001 to 1000000"),
        (["--rate", "1e-9"], "argument --rate: '1e-9' must be a number from 0.001 to 1000000"),
        (["--deadline", "1e-300"], "argument --deadline: '1e-300' must be a number from 0.1 to 86400"),
        (["--vol-scale", "1e300"], "argument --vol-scale: '1e300' must be a number greater than 0 and at most 1000"),
    ]
    for args, message in cases:
        result = run(stack, "workers.ticks", *args, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr) < 1000, (args, result.stderr[:2000])
        # Named as typed: it said "python -m workers.tick_ingestor", its class's module (round 40).
        said = result.stderr
        assert "python -m workers.ticks" in said and "tick_ingestor" not in said, (args, said)


def test_a_batch_the_writer_refuses_is_kept_aside_and_sent_again_once_renamed(writer: Stack) -> None:
    """A batch the writer refuses for good (not retryable) is kept in ``spool/rejected-*.msgpack``,
    out of the replay; once the cause is mended, renaming it ``ticks-*.msgpack`` sends it again (the
    README's words): each tick stored once."""
    refuse = ("CREATE TRIGGER refuse BEFORE INSERT ON ticks WHEN NEW.source = 'refused-feed' "
              "BEGIN SELECT RAISE(ABORT, 'refused for the test'); END", "DROP TRIGGER refuse")
    if writer.settings.database_path is None:
        refuse = ("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.source = "
                  "'refused-feed' THEN RAISE EXCEPTION 'refused for the test'; END IF; RETURN NEW; END $$; "
                  "CREATE TRIGGER refuse BEFORE INSERT ON ticks FOR EACH ROW EXECUTE FUNCTION refuse()",
                  "DROP TRIGGER refuse ON ticks")
    path = writer.settings.database_path
    owner = create_engine(f"sqlite:///{path}" if path is not None else writer.env["DATABASE_URL"])
    spool = writer.settings.spool_dir
    spool.mkdir(mode=0o700, exist_ok=True)
    try:
        with owner.begin() as conn:
            conn.exec_driver_sql(refuse[0])
        (spool / "ticks-refused-feed-0-3.msgpack").write_bytes(msgpack.packb(
            {"symbol": ["BTCUSD"] * 3, "ts": [1_700_000_000_000 + i for i in range(3)], "bid": [1.0] * 3,
             "ask": [1.5] * 3, "volume": [1.0] * 3, "source": ["refused-feed"] * 3, "seq": [0, 1, 2]}))
        first = run(writer, "workers.ticks", "--feed", "sim", "--count", "0")
        assert "writer rejected 3 ticks" in first.stderr and "refused for the test" in first.stderr, first.stderr
        (kept,) = spool.iterdir()
        assert kept.name.startswith("rejected-") and kept.suffix == ".msgpack", kept
        with owner.begin() as conn:
            conn.exec_driver_sql(refuse[1])
        kept.rename(spool / f"ticks-{kept.name}")
        again = run(writer, "workers.ticks", "--feed", "sim", "--count", "0")
        assert again.returncode == 0 and "3 ticks an earlier run spooled" in again.stderr, again.stderr
    finally:
        owner.dispose()
    assert list(spool.iterdir()) == []
    assert ro(writer).execute("SELECT count(*), count(DISTINCT seq) FROM ticks WHERE source = 'refused-feed'"
                              ).fetchone() == (3, 3)


def test_one_leading_simulated_market_per_database_and_a_standby_takes_over(writer: Stack) -> None:
    """The ``ticks`` watcher runs ``--feed sim --lead``: on a second host (PostgreSQL) or beside it by
    hand, a second such feed stands by instead of interleaving a second random walk into the same
    symbols, and takes over when the leader ends, its clock starting then (no tick dated in the
    hours it stood by)."""
    logs = [writer.home / "log" / f"lead-{i}.log" for i in range(2)]
    first = writer.start_worker("workers.ticks", logs[0], "--feed", "sim", "--lead", "--rate", "20")
    wait_for("the first feed's ticks", lambda: ro(writer).execute("SELECT count(*) FROM ticks").fetchone()[0] > 0)
    # The second as a second host's: its own home (and spool), the same database and writer. Its spool
    # holds a batch of a run of it that led: a standby sends it, for it needs no lead.
    other = new_home("ts-host-b-")
    try:
        env = {**isolated_env(other), "WRITER_ENDPOINT": writer.settings.writer_endpoint,
               "DATABASE_URL": writer.settings.database_url}
        (other / "spool").mkdir(mode=0o700, exist_ok=True)
        for i in range(12):  # more than one window of requests
            (other / "spool" / f"ticks-sim-host-b-1-{2 * i}-2.msgpack").write_bytes(msgpack.packb(
                {"symbol": ["BTCUSD"] * 2, "ts": [1_700_000_000_000 + 2 * i, 1_700_000_000_001 + 2 * i],
                 "bid": [1.0] * 2, "ask": [1.5] * 2, "volume": [1.0] * 2, "source": ["sim-host-b-1"] * 2,
                 "seq": [2 * i, 2 * i + 1]}))
        with open(logs[1], "ab") as out:
            second = subprocess.Popen([sys.executable, "-m", "workers.ticks", "--feed", "sim", "--lead", "--rate",
                                       "20"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        writer.procs.append(second)
        wait_for("the second to stand by", lambda: "standing by; the leader is" in logs[1].read_text())
        wait_for("the standby to send its spool", lambda: not list((other / "spool").iterdir()))
        assert ro(writer).execute("SELECT count(*) FROM ticks WHERE source = 'sim-host-b-1'").fetchone() == (24,)
        time.sleep(1.0)
        assert ro(writer).execute("SELECT count(DISTINCT source) FROM ticks WHERE source LIKE 'sim-%' AND "
                                  "source != 'sim-host-b-1'").fetchone() == (1,)
        writer.stop(first, signal.SIGKILL)
        taken_at = int(time.time() * 1000)
        wait_for("the standby to take over", lambda: ro(writer).execute(
            "SELECT count(DISTINCT source) FROM ticks WHERE source != 'sim-host-b-1'").fetchone()[0] == 2,
            timeout=60)
    finally:
        assert writer.stop(second) == 0
        shutil.rmtree(other, ignore_errors=True)
    assert "ticks: leading" in logs[1].read_text()
    (earliest,) = ro(writer).execute("SELECT min(ts) FROM ticks WHERE source = (SELECT source FROM ticks "
                                     "ORDER BY id DESC LIMIT 1)").fetchone()
    assert earliest >= taken_at - 1000, (earliest, taken_at)
    # A CSV replay runs where it is asked to: --lead is refused for it.
    refused = run(writer, "workers.ticks", "--feed", "csv", "--file", str(logs[0]), "--lead")
    assert refused.returncode == 2 and "--lead is for the simulated feed" in refused.stderr, refused.stderr


def test_a_feeds_flags_given_to_the_other_feed_are_refused_not_ignored(writer: Stack) -> None:
    """``--file ticks.csv --symbol EURUSD`` without ``--feed csv`` ran the simulated market (the
    default feed) without end, storing synthetic BTCUSD and EURUSD ticks, its CSV flags ignored; a
    replay ignored ``--count`` and ``--symbols`` the same way (fault hunt, round 38). Each is refused
    in one line, exit 2, naming the flags and the feed they are for; nothing is stored."""
    path = writer.home / "ticks.csv"
    path.write_text(f"ts,symbol,bid,ask,volume\n{T0},EURUSD,1.1,1.1002,1\n")
    for args, said in (
            (["--file", str(path), "--symbol", "EURUSD", "--speed", "max"],
             "--file, --symbol, --speed are for --feed csv, and this run is --feed sim (the default): add --feed csv"),
            (["--feed", "csv", "--file", str(path), "--count", "1", "--symbols", "X"],
             "--symbols, --count are for --feed sim, and this run is --feed csv: add --feed sim")):
        refused = run(writer, "workers.ticks", *args)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
    assert stored(writer) == []
