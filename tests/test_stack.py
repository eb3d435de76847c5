"""The whole stack under the real circusd with the real circus.ini."""
from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from db.client import WriterClient
from db.health import integrity
from testkit.circus import WATCHERS, CircusStack
from testkit.env import ROOT
from testkit.helpers import T0, wait_for, write_bar_csv
from testkit.postgres import ReadConnection, read_connection


@pytest.fixture
def running() -> Iterator[CircusStack]:
    stack = CircusStack()
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


def ro(stack: CircusStack) -> sqlite3.Connection | ReadConnection:
    return read_connection(stack.settings)


def log_ms(line: str) -> int:
    """Epoch ms of a worker log line ('2026-11-27 15:52:01,732 INFO ...', local time)."""
    stamp = line[:23]
    return int(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() * 1000)


def first_line(text: str, needle: str) -> str:
    for line in text.splitlines():
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r} in:\n{text[-2000:]}")


def test_stack_end_to_end(running: CircusStack) -> None:
    stack = running
    settings = stack.settings
    status = stack.status()
    assert all(status[w] == "active" for w in WATCHERS), status

    # Ordering by readiness: every dependent started after the writer was ready.
    writer_ready = log_ms(first_line(stack.log("writer"), "writer ready"))
    for name in ("ticks", "analysis", "monitor", "jobs"):
        wait_for(f"{name} log", lambda name=name: f"{name} started" in stack.log(name), timeout=30)
        assert log_ms(first_line(stack.log(name), f"{name} started")) >= writer_ready, name
    circus_log = stack.log("circusd").splitlines()
    writer_started = next(i for i, line in enumerate(circus_log) if "writer started" in line)
    for name in ("api", "console", "ticks", "analysis", "monitor", "jobs"):
        ready = next(i for i, line in enumerate(circus_log) if "ready" in line and f"starting {name}" in line)
        started = next(i for i, line in enumerate(circus_log) if re.search(rf"\] {name} started", line))
        assert writer_started < ready < started, name

    # Live ticks flow in from the simulated feed.
    wait_for("sim ticks", lambda: ro(stack).execute("SELECT count(*) FROM ticks").fetchone()[0] > 20)

    # A CSV replay into the running stack: ticks -> bars -> indicators.
    csv_path = stack.home / "bars.csv"
    bars = write_bar_csv(csv_path)
    replay = subprocess.run([sys.executable, "-m", "workers.ticks", "--feed", "csv", "--file", str(csv_path),
                             "--symbol", "TESTX", "--speed", "max"], env=stack.env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert replay.returncode == 0, replay.stderr
    q = "SELECT ts, open, high, low, close, volume FROM bars WHERE symbol='TESTX' AND timeframe='1m' ORDER BY ts"
    wait_for("bars", lambda: len(ro(stack).execute(q).fetchall()) == len(bars))
    assert ro(stack).execute(q).fetchall() == bars
    wait_for("indicators", lambda: ro(stack).execute(
        "SELECT count(*) FROM indicators WHERE symbol='TESTX' AND timeframe='1m' AND name='sma_20'"
    ).fetchone()[0] >= len(bars) - 19)

    # A paper trade closed by the monitor on a price path (trailing stop).
    client = WriterClient(settings=settings, deadline=20)
    client.call("insert_ticks", ticks=[{"symbol": "TRADEUSD", "ts": T0, "bid": 100.0, "ask": 100.1}])
    trade = client.call("open_trade", symbol="TRADEUSD", side="buy", size=1.0, stop_loss=95.0, take_profit=120.0,
                        trailing_distance=2.0)
    assert trade["entry_price"] == 100.1
    for i, bid in enumerate((103.0, 105.0, 102.5), start=1):
        client.call("insert_ticks", ticks=[{"symbol": "TRADEUSD", "ts": T0 + i * 1000, "bid": bid, "ask": bid + 0.1}])
    closed = wait_for("trade closed", lambda: ro(stack).execute(
        "SELECT status, close_reason, exit_price, pnl FROM trades WHERE id = ? AND status = 'closed'",
        (trade["id"],)).fetchone())
    assert closed[1] == "trailing_stop" and closed[2] == 102.5
    assert closed[3] == pytest.approx(102.5 - 100.1)
    events = [k for (k,) in ro(stack).execute("SELECT kind FROM trade_events WHERE trade_id = ? ORDER BY id",
                                              (trade["id"],))]
    assert events[0] == "opened" and events[-1] == "closed" and "trailing" in events

    # Restart the writer during ingest: nothing received may be lost or doubled.
    old_pid = stack.pids_of("writer")
    restart = stack.circusctl("restart", "writer")
    assert restart.returncode == 0 and "ok" in restart.stdout, restart.stdout + restart.stderr
    new_pid = wait_for("new writer", lambda: (p := stack.pids_of("writer")) and p != old_pid and p)
    assert new_pid != old_pid
    wait_for("writer serving again", lambda: WriterClient(settings=settings, deadline=1).ping())
    time.sleep(2)

    # Quit: circusd exits, the WAL is checkpointed and the file is sound (SQLite), or every index
    # passes amcheck (a server, which checkpoints itself).
    quit_ = stack.circusctl("quit")
    assert quit_.returncode == 0, quit_.stdout + quit_.stderr
    assert stack.wait_exit(90) == 0
    con = ro(stack)
    if settings.database_path is None:  # a server: every index passes amcheck
        check = integrity(settings)
        assert check["ok"] and "skipped" not in check and check["indexes"] > 5, check
    else:
        wal = Path(f"{settings.database_path}-wal")
        assert not wal.exists() or wal.stat().st_size == 0, "WAL not checkpointed"
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    summary = re.search(r"source (sim-[A-Za-z0-9._-]+) received (\d+), acked (\d+) \(duplicates (\d+)\), spooled (\d+)",
                        stack.log("ticks"))
    assert summary, stack.log("ticks")[-2000:]
    source, received, acked, _dups, spooled = summary.group(1), *map(int, summary.groups()[1:])
    assert received > 0 and spooled == 0 and acked == received
    seqs = [s for (s,) in con.execute("SELECT seq FROM ticks WHERE source = ? ORDER BY seq", (source,))]
    assert seqs == list(range(received)), "every received tick stored exactly once"
    assert ("final checkpoint done" if settings.database_path is not None else
            "a server checkpoints its own WAL); exiting") in stack.log("writer")
    assert stack.log("writer").count("writer ready") == 2


@pytest.mark.database_independent("a watcher refused by a bad setting of its own is stopped by "
                                  "circus's flapping plugin, whatever the database")
def test_crash_looping_watcher_is_stopped_by_flapping_others_stay_up() -> None:
    # A broken setting in the jobs watcher's own environment makes it exit 2 at every start (the
    # same setting for the whole stack would stop `make run` at once, as it should).
    stack = CircusStack()
    try:
        stack.start()
        stack.call("set", name="jobs", options={"env": {**stack.env, "TICKSTACK_BACKUP_KEEP": "abc"}})
        wait_for("jobs stopped by flapping", lambda: stack.status().get("jobs") == "stopped", timeout=60)
        status = stack.status()
        assert all(status[w] == "active" for w in ("writer", "api", "console", "ticks", "analysis", "monitor"))
        assert "TICKSTACK_BACKUP_KEEP" in stack.log("jobs")
        assert "jobs" in stack.log("circusd") and "flapping" in stack.log("circusd").lower()
    finally:
        stack.close()


@pytest.mark.database_independent("a second circusd and an unchanged reloadconfig are circus's pid "
                                  "file and watchers, whatever the database")
def test_second_circusd_refuses_and_a_reload_of_the_same_ini_leaves_every_watcher_running(
        running: CircusStack) -> None:
    """A second circusd on the same home is refused and the first is untouched. So is every watcher
    when ``circusctl reloadconfig`` reads an unchanged circus.ini: circus restarts a watcher whose
    configuration (its copied environment included) changed, and circusd's own environment must not
    change under it (it once did: importing our hooks set OPENBLAS_NUM_THREADS, so every watcher
    compared as changed, was stopped, and was started again in no set order)."""
    stack = running
    pids = {w: stack.pids_of(w) for w in WATCHERS}
    second = subprocess.run([str(Path(sys.executable).parent / "circusd"), "circus.ini"], env=stack.env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert second.returncode != 0
    assert "pid file" in second.stdout + second.stderr  # circus's own words
    # `make run` asks first, and says plainly what is going on.
    prepare = subprocess.run([sys.executable, "-m", "db", "prepare"], env=stack.env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert prepare.returncode == 1 and "already running" in prepare.stderr
    assert all(stack.status()[w] == "active" for w in WATCHERS)
    assert {w: stack.pids_of(w) for w in WATCHERS} == pids
    assert WriterClient(settings=stack.settings, deadline=5).ping()["pid"] == pids["writer"][0]
    # The watchdog plugin logs its first line from its own process, a moment after circus calls it
    # started (a loaded run looked before it had).
    wait_for("the watchdog's first line in circusd's log", lambda: stack.circusd_log().count(
        "Watchdog listening UDP on 127.0.0.1:") >= 1, timeout=30)
    listening = stack.circusd_log().count("Watchdog listening UDP on 127.0.0.1:")
    assert listening == 1, stack.circusd_log()[-3000:]
    reload = stack.circusctl("reloadconfig", "--waiting")
    assert reload.returncode == 0 and "ok" in reload.stdout, reload.stdout + reload.stderr
    # circus restarts its plugins on every reload (it compares their command without the log options
    # it added at start), so wait for them; the watchers must not have moved.
    wait_for("the plugins back after the reload", lambda: all(
        stack.status().get(p) == "active" for p in ("plugin:flapping", "plugin:watchdog")), timeout=60)
    # And the new plugins log where the first ones did, in circusd's log (circus starts a reloaded
    # plugin without --log-output: its lines went to circusd's stderr, nowhere under --daemon).
    wait_for("the new watchdog's first line in circusd's log", lambda: stack.circusd_log().count(
        "Watchdog listening UDP on 127.0.0.1:") == 2, timeout=30)
    assert {w: stack.status()[w] for w in WATCHERS} == dict.fromkeys(WATCHERS, "active")
    assert {w: stack.pids_of(w) for w in WATCHERS} == pids, stack.circusd_log()[-3000:]
