"""workers.jobs end to end: a real writer, the worker run as ``python -m workers.jobs``, results read
back from the database (job_runs, ticks, bars, backups; on SQLite the WAL), on either database."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from db.backups import BACKUP_LOCK, restore_advice, rotate_backups
from db.client import WriterClient
from db.config import ConfigError
from db.engine import connect_read_only
from db.errors import NotFound, WriterError
from db.files import part_file, put_in_place
from db.health import file_sizes
from db.leader import leader_lock_path
from db.schema import SCHEMA_VERSION
from db.server import pg_program
from testkit.env import ROOT
from testkit.helpers import query, wait_for
from testkit.writer import Stack
from workers.jobs import BACKUP_RETRY_S, PRUNE_BATCH, JobSchedule, JobsWorker

DAY_MS = 86_400_000


def run_jobs(stack: Stack, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.jobs", *args], env={**stack.env, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def job_runs(stack: Stack) -> list[dict[str, Any]]:
    cols = ("id", "job", "started_at", "finished_at", "duration_ms", "ok", "detail")
    return [dict(zip(cols, row, strict=True))
            for row in query(stack.settings, f"SELECT {', '.join(cols)} FROM job_runs ORDER BY id")]


def insert_ticks(stack: Stack, ts_list: list[int], source: str) -> None:
    with WriterClient(settings=stack.settings, deadline=30) as client:
        for i in range(0, len(ts_list), 5000):
            chunk = ts_list[i:i + 5000]
            client.call("insert_ticks", ticks={
                "symbol": ["BTCUSD"] * len(chunk), "ts": chunk, "bid": [100.0] * len(chunk),
                "ask": [100.5] * len(chunk), "source": [source] * len(chunk),
                "seq": list(range(i, i + len(chunk)))})


def backups(stack: Stack) -> list[str]:
    return sorted(p.name for p in stack.settings.backup_dir.iterdir() if p.name.startswith("tickstack-2"))


def check_run(run: dict[str, Any], job: str, ok: bool = True) -> None:
    assert run["job"] == job and bool(run["ok"]) is ok, run
    assert run["duration_ms"] == run["finished_at"] - run["started_at"] >= 0, run


# --------------------------------------------------------------------------- config


def test_schedule_defaults_and_overrides() -> None:
    assert JobSchedule.from_env({}) == JobSchedule(30, 3600, 6, 7, 24, 64, 30)
    s = JobSchedule.from_env({"TICKSTACK_RETENTION_DAYS": "0.5", "TICKSTACK_BACKUP_KEEP": "2",
                              "TICKSTACK_CHECKPOINT_WAL_MB": "", "TICKSTACK_BACKUP_EVERY_H": "1"})
    assert (s.retention_days, s.backup_keep, s.checkpoint_wal_mb) == (0.5, 2, 64)
    assert s.every_s("backup") == 3600 and s.every_s("quick_check") == 24 * 3600


@pytest.mark.parametrize("name, value, message", [
    ("TICKSTACK_BACKUP_KEEP", "abc", "is not a whole number"),
    ("TICKSTACK_BACKUP_KEEP", "0", "must be a whole number greater than 0"),
    ("TICKSTACK_BACKUP_KEEP", "2.5", "is not a whole number"),
    ("TICKSTACK_RETENTION_DAYS", "-1", "greater than 0"),
    ("TICKSTACK_RETENTION_EVERY_S", "soon", "is not a number"),
    ("TICKSTACK_CHECKPOINT_WAL_MB", "nan", "greater than 0"),
    ("TICKSTACK_QUICK_CHECK_EVERY_H", "inf", "greater than 0"),
    ("TICKSTACK_CHECKPOINT_EVERY_S", "0", "greater than 0"),
])
def test_bad_schedule_is_rejected_naming_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}=.*{message}"):
        JobSchedule.from_env({name: value})


@pytest.mark.parametrize("env", [{"TICKSTACK_BACKUP_KEEP": "abc"}, {"TICKSTACK_BACKUP_KEEP": "0"},
                                 {"TICKSTACK_RETENTION_DAYS": "-3"}])
def test_bad_config_exits_2_with_the_variable_named(stack: Stack, env: dict[str, str]) -> None:
    proc = run_jobs(stack, "--until-idle", timeout=30, **env)  # no writer needed: fails before connecting
    (name, value), = env.items()
    assert proc.returncode == 2, proc.stderr
    assert f"{name}={value!r}" in proc.stderr and "python -m workers.jobs: error:" in proc.stderr


def test_unknown_job_is_an_argparse_error(stack: Stack) -> None:
    proc = run_jobs(stack, "--run", "vacuum", timeout=30)
    assert proc.returncode == 2 and "invalid choice: 'vacuum'" in proc.stderr, proc.stderr


def test_rotate_keeps_the_newest_and_only_touches_our_names(tmp_path: Any) -> None:
    names = [f"tickstack-2024010{d}T000000Z.db" for d in range(1, 6)]
    others = ["tickstack-manual.db", "notes.txt", ".tickstack-20240109T000000Z.db.part"]
    for n in names + others:
        (tmp_path / n).write_bytes(b"x")
    removed = rotate_backups(tmp_path, 2)
    assert sorted(p.name for p in removed) == names[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:] + others)
    # The backup just written is never deleted, even named older than those kept (the clock stepped
    # back, or newer backups were copied in from another host).
    (tmp_path / names[0]).write_bytes(b"x")
    assert rotate_backups(tmp_path, 2, spare=tmp_path / names[0]) == []
    assert (tmp_path / names[0]).exists()


# --------------------------------------------------------------------------- jobs, one at a time


def test_retention_deletes_exactly_the_old_ticks_and_keeps_bars(writer: Stack) -> None:
    now = int(time.time() * 1000)
    old = [now - 40 * DAY_MS + i for i in range(2 * PRUNE_BATCH + 123)]  # needs three bounded calls
    recent = [now - 29 * DAY_MS, now - DAY_MS, now - 1000]
    insert_ticks(writer, old, "old")
    insert_ticks(writer, recent, "recent")
    bar_ts = (now - 40 * DAY_MS) // 60_000 * 60_000
    with WriterClient(settings=writer.settings, deadline=30) as client:
        client.call("upsert_bars", bars=[{"symbol": "BTCUSD", "timeframe": "1m", "ts": bar_ts, "open": 100.0,
                                          "high": 101.0, "low": 99.0, "close": 100.0, "volume": 1.0}])
    proc = run_jobs(writer, "--run", "retention")
    assert proc.returncode == 0, proc.stderr
    assert query(writer.settings, "SELECT source, count(*) FROM ticks GROUP BY source") == [("recent", 3)]
    assert query(writer.settings, "SELECT ts FROM bars") == [(bar_ts,)]
    (run,) = job_runs(writer)
    check_run(run, "retention")
    detail = json.loads(run["detail"])
    assert detail["deleted"] == len(old) and detail["calls"] == 3 and detail["more"] is False


def test_retention_never_deletes_ticks_the_analysis_has_not_read(writer: Stack) -> None:
    """A replay of old ticks (a CSV file of last quarter's) while the analysis worker was behind, down or
    restarting: the next retention run deleted the acknowledged ticks before the analysis read them,
    so their bars were never built and the history was gone, with retention saying "ok, deleted 600"
    (fault hunt on the jobs worker). The README promises their bars kept. Retention deletes only ticks
    the analysis cursor has passed, and says how many it keeps for it."""
    def analyse() -> None:
        proc = subprocess.run([sys.executable, "-m", "workers.analysis", "--until-idle"], env=writer.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr

    now = int(time.time() * 1000)
    insert_ticks(writer, [now - 1000 + i for i in range(100)], "live")
    analyse()  # the analysis has run in this database: its cursor is past the live ticks
    old = 40 * DAY_MS
    with WriterClient(settings=writer.settings, deadline=30) as client:
        client.call("insert_ticks", ticks={"symbol": ["OLDX"] * 600, "ts": [now - old + i * 1000 for i in range(600)],
                                           "bid": [1.0] * 600, "ask": [1.1] * 600, "source": ["replay"] * 600,
                                           "seq": list(range(600))})
    proc = run_jobs(writer, "--run", "retention")
    assert proc.returncode == 0, proc.stderr
    assert query(writer.settings, "SELECT count(*) FROM ticks WHERE symbol = 'OLDX'") == [(600,)]
    detail = json.loads(job_runs(writer)[-1]["detail"])
    assert detail["deleted"] == 0 and detail["kept_for_analysis"] == 600, detail
    # For an operator who reads no log (a stopped analysis worker keeps every old tick: the file grows).
    # In a zone 5 h behind UTC (no tzdata needed): its times all in UTC, the run's as the cutoff's.
    said = db_command(writer, "doctor", tz="EST+5")
    assert re.search(r"\[WARN\] Retention kept 600 tick\(s\) older than [-\d]+ [:\d]+ UTC in its last run "
                     r"\([-\d]+ [:\d]+ UTC\): the analysis "
                     r"has not read them.* The analysis worker is behind or not running "
                     r"\(`.*circusctl --endpoint \S+ status analysis` on the host that leads it",
                     said.stdout), said.stdout
    analyse()
    assert query(writer.settings, "SELECT sum(tick_count) FROM bars WHERE symbol = 'OLDX' AND timeframe = '1m'") \
        == [(600,)]
    proc = run_jobs(writer, "--run", "retention")
    assert proc.returncode == 0, proc.stderr
    assert query(writer.settings, "SELECT count(*) FROM ticks WHERE symbol = 'OLDX'") == [(0,)]
    detail = json.loads(job_runs(writer)[-1]["detail"])
    assert detail["deleted"] == 600 and detail["kept_for_analysis"] == 0, detail
    assert "Retention kept" not in db_command(writer, "doctor").stdout
    assert query(writer.settings, "SELECT sum(tick_count) FROM bars WHERE symbol = 'OLDX' AND timeframe = '1m'") \
        == [(600,)]



def test_a_clock_far_ahead_of_the_ticks_makes_retention_delete_a_day_a_run_not_the_window(writer: Stack) -> None:
    """Retention goes by the wall clock: set 40 days forward, one run deleted every tick of the 30-day
    window the analysis had read (13,716 in a fault hunt, some written seconds before). Here the
    ticks are what such a clock sees: a month of them, the newest 40 days before now (what a jobs
    worker stopped for 40 days sees too). A run moves its cutoff at most a day past the oldest tick
    kept (twice the time between runs when longer), says so in a WARNING and in its record, and the
    next run goes on from there: the catch-up after a downtime takes a run a day, and a clock set
    forward costs a day a run, not the window, until it is set right."""
    now = int(time.time() * 1000)
    newest = now - 40 * DAY_MS
    days = 30
    ticks = [newest - day * DAY_MS - i * 60_000 for day in range(days) for i in range(10)]  # 10 ticks a day
    insert_ticks(writer, sorted(ticks), "feed")  # ids in time order, as a live feed writes them
    oldest = min(ticks)

    proc = run_jobs(writer, "--run", "retention")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"WARNING .*retention: .*days past the oldest tick", proc.stderr), proc.stderr
    detail = json.loads(job_runs(writer)[-1]["detail"])
    assert detail["before_ts"] == oldest + DAY_MS and detail["held_back_from"] > newest, detail
    assert detail["deleted"] == 10, detail  # the oldest day's 10 ticks: the cutoff is 9 minutes into the next day
    said = db_command(writer, "doctor")  # for an operator who reads no log: the held-back run, in its words
    # On PostgreSQL retention goes by the database server's clock (JobsWorker.now), not this host's: the
    # doctor of any host said "this host's clock", and sent an operator to set a clock retention never read.
    clock = "this host's clock" if writer.settings.database_path is not None else "the database server's clock"
    assert re.search(rf"Retention was held back in its last run \(.*\): {clock} asked to delete the ticks "
                     r"before .*, far past the oldest tick it may delete, so it deleted only those before .*\. If "
                     rf"{clock} is ahead, set it right", said.stdout), said.stdout
    left = sorted(ticks)[10:]
    assert query(writer.settings, "SELECT count(*), min(ts) FROM ticks") == [(len(left), left[0])]

    proc = run_jobs(writer, "--run", "retention")  # the next run: a day past the oldest tick left
    assert proc.returncode == 0, proc.stderr
    detail = json.loads(job_runs(writer)[-1]["detail"])
    assert detail["before_ts"] == left[0] + DAY_MS and detail["deleted"] == 10, detail
    assert query(writer.settings, "SELECT count(*) FROM ticks") == [(len(ticks) - 20,)]


def test_old_history_within_one_step_is_deleted_without_saying_the_run_was_held_back(writer: Stack) -> None:
    """The README's CSV replay (ticks of 2 January 2024), then ``--run retention`` (a worker with no
    mark of an earlier run: a day past the oldest tick at most): the run deleted every one of them,
    nothing was left between its cutoff and the clock's, yet it warned that the clock may be ahead
    ("1040.6 days past the oldest tick ... this run deletes only those before ...") and doctor said
    "Retention was held back" (a new user's run-through). A run held back is one that left ticks the
    clock would have deleted: only that is said."""
    old = 1_704_186_000_000  # 2024-01-02 09:00 UTC, as the README's example file
    insert_ticks(writer, [old, old + 60_000, old + 120_000], "csv")

    proc = run_jobs(writer, "--run", "retention")
    assert proc.returncode == 0, proc.stderr
    detail = json.loads(job_runs(writer)[-1]["detail"])
    assert detail["deleted"] == 3 and detail["before_ts"] == old + DAY_MS, detail
    assert query(writer.settings, "SELECT count(*) FROM ticks") == [(0,)]
    assert "held_back_from" not in detail, detail
    assert "days past the oldest tick" not in proc.stderr, proc.stderr
    assert "held back" not in db_command(writer, "doctor").stdout


def test_a_run_stopped_before_its_cutoff_is_not_said_to_be_held_back(
        writer: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The run that deleted the README's replayed ticks of 2 January 2024 (all within one step), asked
    to stop (SIGTERM) after its first bounded batch: the ticks it had not reached, before its own
    cutoff, made it say it was held back, in a WARNING ("this run deleted only those before ...", the
    clock may be ahead) and in its record, for doctor (a review). What the cutoff holds back lies
    between it and the clock's; what a stop leaves is older than it and goes at the next run."""
    import workers.jobs

    old = 1_704_186_000_000  # 2024-01-02 09:00 UTC, as the README's example file
    insert_ticks(writer, [old + i * 60_000 for i in range(5)], "csv")
    monkeypatch.setattr(workers.jobs, "PRUNE_BATCH", 2)
    worker = JobsWorker(writer.settings, only="retention")
    worker.setup()
    try:
        assert worker.client is not None
        call = worker.client.call

        def then_stopped(op: str, /, **args: Any) -> Any:
            answer = call(op, **args)
            worker.handle_stop(signal.SIGTERM, None)  # the stop comes while the first batch is written
            return answer

        monkeypatch.setattr(worker.client, "call", then_stopped)
        with caplog.at_level(logging.WARNING, logger="tickstack.jobs"):
            ok, detail = worker.retention()
    finally:
        worker.teardown()
    done = json.loads(detail)
    assert ok and done["deleted"] == 2 and done["more"] is True and done["before_ts"] == old + DAY_MS, done
    assert "held_back_from" not in done, done
    assert "days past the oldest tick" not in caplog.text, caplog.text
    assert query(writer.settings, "SELECT count(*) FROM ticks") == [(3,)]


def test_a_clock_far_ahead_deletes_a_day_a_run_when_the_oldest_ticks_came_after_the_live_ones(
        writer: Stack) -> None:
    """The clock guard went by the tick of the lowest id: a stack started a day ago, then the month
    before replayed from a CSV file (ids after the live ticks', times before them), and a clock set
    40 days forward; the run's cutoff was a day past the first live tick, and it deleted the whole
    replayed month at once (ticks the analysis had read, inside the window). The guard goes by the
    oldest tick retention may delete, whatever its id: a day a run, as with ids in time order. Here,
    as in the test above, the ticks are what such a clock sees: the newest 40 days before now."""
    now = int(time.time() * 1000)
    newest = now - 40 * DAY_MS
    live = [newest - i * 60_000 for i in range(10)]  # the stack's first day: the lowest ids
    replayed = [newest - day * DAY_MS - i * 60_000 for day in range(1, 30) for i in range(10)]  # the month before
    insert_ticks(writer, sorted(live), "feed")
    insert_ticks(writer, sorted(replayed), "csv")
    oldest = min(replayed)

    proc = run_jobs(writer, "--run", "retention")
    assert proc.returncode == 0, proc.stderr
    detail = json.loads(job_runs(writer)[-1]["detail"])
    assert detail["before_ts"] == oldest + DAY_MS and detail["held_back_from"] > newest, detail
    assert detail["deleted"] == 10, detail  # the oldest replayed day's ticks, not the month
    assert query(writer.settings, "SELECT count(*) FROM ticks") == [(len(live) + len(replayed) - 10,)]


def test_a_running_jobs_worker_deletes_replayed_history_at_its_next_run_but_not_the_window_for_a_clock_jump(
        writer: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The clock guard held a running stack's retention to a day a run for history older than the
    window replayed into it (a year of it: 365 runs, two weeks, the live ticks past the window
    waiting behind it; a review). A running worker also goes by where its last run left the cutoff,
    moved on by the monotonic clock: the replayed history goes at the next run, while the wall clock
    set 40 days forward (``JobsWorker.now`` here: the clock the worker reads, the wall clock, or on
    PostgreSQL the server's) still costs a day."""
    now = int(time.time() * 1000)
    live = [now - day * DAY_MS - i * 60_000 for day in range(29) for i in range(10)]  # the window's ticks
    insert_ticks(writer, sorted(live), "feed")
    worker = JobsWorker(writer.settings, only="retention")
    worker.setup()
    try:
        ok, detail = worker.retention()
        assert ok and json.loads(detail)["deleted"] == 0 and "held_back_from" not in json.loads(detail), detail
        history = [now - 40 * DAY_MS - day * DAY_MS - i * 60_000 for day in range(30) for i in range(10)]
        insert_ticks(writer, sorted(history), "csv")  # a month, older than the window, replayed now
        ok, detail = worker.retention()
        assert ok and json.loads(detail)["deleted"] == len(history), detail  # at once, not a day of it
        assert "held_back_from" not in json.loads(detail), detail
        assert query(writer.settings, "SELECT count(*) FROM ticks") == [(len(live),)]

        ahead = 40 * DAY_MS
        monkeypatch.setattr(JobsWorker, "now", lambda self, conn=None: time.time() + ahead / 1000)
        ok, detail = worker.retention()
        done = json.loads(detail)
        oldest_day = [ts for ts in live if ts < min(live) + DAY_MS]
        assert ok and done["deleted"] == len(oldest_day) == 10 and done["held_back_from"] > now, done
        assert query(writer.settings, "SELECT count(*) FROM ticks") == [(len(live) - 10,)]
    finally:
        worker.teardown()


def test_a_running_jobs_worker_that_found_nothing_to_delete_still_holds_a_clock_set_forward_to_a_day(
        writer: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run with no tick it may delete (an empty database, or the analysis behind every tick) set
    its cutoff to what the wall clock asked, unguarded, and the worker kept that as where its last run
    left the cutoff: with the clock 40 days ahead, the next run, the window's ticks in the database
    (or read by the analysis since), deleted every one of them at once. A run that has no oldest tick
    to go by leaves no mark of the clock's word; the next goes by the oldest tick: a day a run."""
    ahead = 40 * DAY_MS
    monkeypatch.setattr(JobsWorker, "now", lambda self, conn=None: time.time() + ahead / 1000)
    worker = JobsWorker(writer.settings, only="retention")
    worker.setup()
    try:
        ok, detail = worker.retention()  # nothing to delete: no tick at all
        assert ok and json.loads(detail)["deleted"] == 0, detail
        now = int(time.time() * 1000)
        live = [now - day * DAY_MS - i * 60_000 for day in range(29) for i in range(10)]  # the window's ticks
        insert_ticks(writer, sorted(live), "feed")
        ok, detail = worker.retention()
        done = json.loads(detail)
        assert ok and done["deleted"] == 10 and done["held_back_from"] > now, done  # the oldest day's, not all
        assert done["before_ts"] == min(live) + DAY_MS, done
        assert query(writer.settings, "SELECT count(*) FROM ticks") == [(len(live) - 10,)]
    finally:
        worker.teardown()


def test_retention_runs_that_failed_with_the_writer_down_do_not_let_a_clock_set_forward_delete_more(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run moved the worker's mark a step on before it asked the writer to delete: with the
    writer down, each failed run added a day, and with the clock 40 days ahead the first run after
    deleted that many days of the window at once (3 failed runs: 4 days, 40 ticks; a review of
    stop 48 found it). A run that failed moves no mark: the next deletes a day, as the one before."""
    proc = stack.start_writer()
    now = int(time.time() * 1000)
    live = [now - day * DAY_MS - i * 60_000 for day in range(29) for i in range(10)]  # the window's ticks
    insert_ticks(stack, sorted(live), "feed")
    monkeypatch.setattr(JobsWorker, "now", lambda self, conn=None: time.time() + 40 * DAY_MS / 1000)
    worker = JobsWorker(stack.settings, only="retention")
    worker.setup()
    try:
        assert stack.stop(proc) == 0
        with WriterClient(settings=stack.settings, deadline=1) as quick:  # the writer down: each run fails soon
            worker.client, patient = quick, worker.client
            for _ in range(3):
                with pytest.raises(WriterError):
                    worker.retention()
            worker.client = patient
        stack.start_writer()
        ok, detail = worker.retention()
        done = json.loads(detail)
        assert ok and done["deleted"] == 10 and done["before_ts"] == min(live) + DAY_MS, done  # a day, not four
        assert query(stack.settings, "SELECT count(*) FROM ticks") == [(len(live) - 10,)]
    finally:
        worker.teardown()


def test_backup_is_a_valid_copy_and_rotation_keeps_k(writer: Stack) -> None:
    insert_ticks(writer, [int(time.time() * 1000) - i for i in range(500)], "feed")
    keep = 2
    (writer.settings.backup_dir / "tickstack-manual.db").write_bytes(b"mine")
    for _ in range(keep + 2):
        proc = run_jobs(writer, "--run", "backup", TICKSTACK_BACKUP_KEEP=str(keep))
        assert proc.returncode == 0, proc.stderr
    runs = job_runs(writer)
    assert len(runs) == keep + 2
    paths = [json.loads(r["detail"])["path"] for r in runs]
    for r in runs:
        check_run(r, "backup")
    assert len(set(paths)) == keep + 2  # same-second runs waited for a fresh name
    assert backups(writer) == sorted(p.rsplit("/", 1)[1] for p in paths[-keep:])
    assert (writer.settings.backup_dir / "tickstack-manual.db").read_bytes() == b"mine"
    assert json.loads(runs[-1]["detail"])["removed"] == [paths[1].rsplit("/", 1)[1]]
    if writer.settings.database_path is not None:  # a SQLite file: sound, with every tick
        con = connect_read_only(paths[-1])
        try:
            assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert con.execute("SELECT count(*) FROM ticks").fetchone() == (500,)
        finally:
            con.close()
    else:  # a pg_dump archive whose table of contents has the ticks' data (restored in test_postgres_health)
        listed = subprocess.run([pg_program("pg_restore"), "--list", paths[-1]], capture_output=True, text=True,
                                timeout=60)
        assert listed.returncode == 0 and "TABLE DATA public ticks" in listed.stdout, listed.stderr


def test_a_backups_folder_made_by_a_backup_run_by_hand_is_private(writer: Stack) -> None:
    """``python -m workers.jobs --run backup`` (the README's) run from a login shell, umask 022, with the
    backups folder gone (removed to free space, a new disk mounted elsewhere): the folder was made
    0755, every backup's name and size readable by all, where the home's folders are 0700."""
    shutil.rmtree(writer.settings.backup_dir)
    proc = subprocess.run([sys.executable, "-m", "workers.jobs", "--run", "backup"], env=writer.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(writer.settings.backup_dir.stat().st_mode) == 0o700
    (made,) = backups(writer)
    assert stat.S_IMODE((writer.settings.backup_dir / made).stat().st_mode) == 0o600


def test_doctor_warns_when_the_last_backup_failed_and_says_what_to_run(writer: Stack) -> None:
    """Every scheduled backup failed (the backups folder a link to a mount that is gone) and doctor
    said "No problem found": the one tool users are told to run never looked at the backups it
    names for a restore. It warns with the failed run's time and reason, the newest backup there is,
    and the command that makes one once mended; a backup that goes well ends the warning."""
    def doctor() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "db", "doctor"], env=writer.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    assert run_jobs(writer, "--run", "backup").returncode == 0
    (kept,) = backups(writer)
    folder = writer.settings.backup_dir
    folder.rename(writer.home / "backups-away")
    folder.symlink_to("/proc/1/no-such-mount")  # a folder no one can make
    assert run_jobs(writer, "--run", "backup").returncode == 1
    said = doctor()
    warned = [line for line in said.stdout.splitlines() if "last backup" in line]
    assert len(warned) == 1 and warned[0].startswith("[WARN] The last backup failed"), said.stdout
    assert f"{folder} is a link to /proc/1/no-such-mount, which is not there" in warned[0], warned
    assert f"there is no backup in {folder} to restore" in warned[0], warned
    assert warned[0].endswith("Mend the cause, then make one now: `python -m workers.jobs --run backup`."), warned
    assert "No problem found" not in said.stdout, said.stdout
    folder.unlink()
    (writer.home / "backups-away").rename(folder)
    assert run_jobs(writer, "--run", "backup").returncode == 0
    said = doctor()
    assert "last backup" not in said.stdout and kept in backups(writer), said.stdout


def test_backups_named_by_a_clock_since_set_back_go_first_and_are_never_the_latest(writer: Stack) -> None:
    """Backups made while the clock was ahead (a VM's clock a year fast, then corrected by NTP) are
    named after now. They were ordered by name alone: rotation kept them, as the newest, and deleted
    every backup made since but the one just written, and doctor's restore advice (and the console's
    "last backup") named one of them, a year-old copy, as "the latest backup". They are older than any
    backup made since the clock was set back: they go first, in rotation and in "the latest"."""
    insert_ticks(writer, [int(time.time() * 1000) - i for i in range(300)], "feed")
    keep = 2
    made = []
    proc = run_jobs(writer, "--run", "backup", TICKSTACK_BACKUP_KEEP=str(keep))
    assert proc.returncode == 0, proc.stderr
    first = Path(json.loads(job_runs(writer)[-1]["detail"])["path"])
    made.append(first.name)
    ahead = [f"tickstack-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(time.time() + 365 * 86400 + i))}{first.suffix}"
             for i in range(3)]
    for name in ahead:  # what the clock a year fast named; their content is a real backup's
        shutil.copy2(first, writer.settings.backup_dir / name)
    insert_ticks(writer, [int(time.time() * 1000) - i for i in range(50)], "feed-2")
    for _ in range(2):
        proc = run_jobs(writer, "--run", "backup", TICKSTACK_BACKUP_KEEP=str(keep))
        assert proc.returncode == 0, proc.stderr
        made.append(Path(json.loads(job_runs(writer)[-1]["detail"])["path"]).name)
    assert backups(writer) == sorted(made[-keep:]), backups(writer)
    removed = [name for run in job_runs(writer) for name in json.loads(run["detail"])["removed"]]
    assert sorted(removed) == sorted([*ahead, made[0]]), removed
    if writer.settings.database_path is not None:  # what doctor says to restore when the file is damaged
        latest = writer.settings.backup_dir / made[-1]
        assert f"`python -m db restore {latest}`" in restore_advice(writer.settings)


def test_a_backup_due_while_another_is_written_waits_and_one_asked_for_fails_saying_why(writer: Stack) -> None:
    """One backup of the backups folder at a time (db.backups.BACKUP_LOCK, held from the name's choice
    to the rename). While another process holds it (the console's backup): the scheduled backup is no
    run (nothing recorded) and is due again in BACKUP_RETRY_S, not a whole period later (the other may
    yet fail); ``--run backup`` is a failed run saying why (exit 1). Neither writes a file, and the
    lock file is private whoever made it. The console's side:
    tests/test_console.py::test_a_backup_of_the_same_second_already_there_does_not_fail_the_consoles."""
    s = writer.settings
    s.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(s.run_dir / BACKUP_LOCK, "a") as held:  # mode 0644 under this umask
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        worker = JobsWorker(s)
        worker.setup()
        try:
            assert "backup" in worker.due()
            assert worker.run_job("backup") is None
            now = time.time()
            assert "backup" not in worker.due(now) and "backup" in worker.due(now + BACKUP_RETRY_S + 1)
        finally:
            worker.teardown()
        asked = subprocess.run([sys.executable, "-m", "workers.jobs", "--run", "backup"], env=writer.env,
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert asked.returncode == 1, asked.stderr
    assert (s.run_dir / BACKUP_LOCK).stat().st_mode & 0o777 == 0o600
    (run,) = job_runs(writer)
    check_run(run, "backup", ok=False)
    assert run["detail"].startswith("another backup is being written now"), run
    assert backups(writer) == []


def test_a_failure_whose_message_holds_a_nul_is_still_recorded(writer: Stack) -> None:
    """A job's failure is recorded with its message, which can quote another program's output
    (pg_dump's stderr on a server). A NUL in it would make the writer refuse the whole record (no
    text holds one), so the worker writes it as \\x00: the run is on record, its reason readable."""
    worker = JobsWorker(writer.settings, until_idle=True, only="backup")

    def failing(_force: bool) -> None:
        raise RuntimeError("pg_dump: error: bad byte \x00 in its output")

    worker._jobs["backup"] = failing  # the failure an external program's output can bring
    worker.setup()
    try:
        assert worker.run_job("backup", force=True) is False
    finally:
        worker.teardown()
    (run,) = job_runs(writer)
    check_run(run, "backup", ok=False)
    assert run["detail"] == "RuntimeError: pg_dump: error: bad byte \\x00 in its output"


def test_a_job_that_fails_by_a_bug_is_logged_with_its_traceback(writer: Stack,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """An exception no job expects (a bug) keeps its traceback, where one expected in operation (the
    disk, a program, the writer: test_a_failing_job_is_recorded_and_the_others_still_run) is one line."""
    worker = JobsWorker(writer.settings, until_idle=True, only="backup")

    def buggy(_force: bool) -> None:
        raise KeyError("path")

    worker._jobs["backup"] = buggy
    worker.setup()
    try:
        with caplog.at_level("INFO", logger="tickstack.jobs"):
            assert worker.run_job("backup", force=True) is False
    finally:
        worker.teardown()
    (bug,) = [r for r in caplog.records if r.exc_info]
    assert bug.levelname == "ERROR" and bug.getMessage() == "jobs: backup failed" and bug.exc_info[0] is KeyError
    (run,) = job_runs(writer)
    assert run["detail"] == "KeyError: 'path'"


def test_a_backup_never_writes_over_the_database_or_a_folder_whatever_the_path_says(writer: Stack) -> None:
    """``db backup --force PATH`` overwrites a file, never one the running stack uses: not the live
    database by another spelling of its path (``run/../``, a symlink), not its WAL or shared-memory
    file, not the writer's lock, a secret file or anything in ``run/``. A folder as PATH is refused
    with the reason, not a traceback. Nothing is written in any of these cases."""
    insert_ticks(writer, [int(time.time() * 1000) - i for i in range(200)], "feed")

    def backup(path: Path | str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "db", "backup", "--force", str(path)], env=writer.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    lock = writer.settings.writer_lock_path
    held = lock.stat().st_ino
    secrets = [writer.home / name for name in ("admin-password", "secret-key", "api-token")]
    for path in secrets:  # as the console and the API make them: a backup over one locked every login out
        path.write_text("a-secret-of-the-stack\n")
        path.chmod(0o600)
    for path in (lock, writer.home / "run" / "writer.sock", writer.home / "run" / "new-file.db", *secrets):
        refused = backup(path)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr, (path, refused.stderr)
        assert re.search(r"is a file of the running stack|is in the stack's run folder", refused.stderr), refused.stderr
    assert lock.stat().st_ino == held  # a new lock file would let a second writer start beside this one
    assert [p.read_text() for p in secrets] == ["a-secret-of-the-stack\n"] * 3
    folder = writer.home / "a-folder"
    folder.mkdir()
    refused = backup(folder)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
    assert re.search(r"is a folder; give the backup file's path", refused.stderr), refused.stderr
    assert list(folder.iterdir()) == []
    # An empty path is said so (it was "<the current folder> is a folder"; fault hunt, round 38).
    refused = backup("")
    assert refused.returncode == 2 and "'' is empty: give a file's path" in refused.stderr, refused.stderr
    # A folder that is not there yet, said with its slash: the copy was written as a file of that name
    # (a new user's `db backup /tmp/nu-bk/`).
    refused = backup(f"{writer.home / 'no-folder'}/")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
    assert re.search(r"no-folder/ names a folder \(it ends in /\), and there is none; give the backup file's path "
                     r"\(e\.g\. .*/no-folder/tickstack-\d{8}T\d{6}Z\.(db|dump)\)", refused.stderr), refused.stderr
    assert not (writer.home / "no-folder").exists()
    database = writer.settings.database_path
    if database is None:  # a server's database has no file to write over
        return
    link = writer.home / "link.db"
    link.symlink_to(database)
    before = database.stat().st_ino
    for path in (writer.home / "run" / ".." / database.name, link, Path(f"{database}-wal"), Path(f"{database}-shm")):
        refused = backup(path)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr, (path, refused.stderr)
        assert "is a file of the running stack" in refused.stderr, (path, refused.stderr)
    assert database.stat().st_ino == before
    con = connect_read_only(database)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("SELECT count(*) FROM ticks").fetchone() == (200,)
    finally:
        con.close()


def test_two_backups_to_one_path_at_once_never_share_a_part_file_or_write_over_each_other(writer: Stack) -> None:
    """``db backup PATH`` without ``--force``: of two run at once to one path, exactly one writes it and
    the other fails with "exists" (both failed before, one with a traceback: they wrote one part file,
    ``.NAME.part``, and each removed it under the other). A part file of a backup still running is
    left alone, one of a process that died (and its journal) is removed; nothing else is left."""
    insert_ticks(writer, [int(time.time() * 1000) - i for i in range(2000)], "feed")
    folder = writer.home / "manual"
    folder.mkdir(mode=0o700)
    suffix = ".db" if writer.settings.database_path is not None else ".dump"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for attempt in range(3):
        dest = folder / f"copy-{attempt}{suffix}"
        running = folder / f".{dest.name}.{os.getpid()}.abcd1234.part"  # a backup in progress: this process
        orphans = [folder / f".{dest.name}.{dead.pid}.efgh5678.part{end}" for end in ("", "-journal")]
        for path in (running, *orphans):
            path.write_bytes(b"half-written")
        runs = [subprocess.Popen([sys.executable, "-m", "db", "backup", str(dest)], env=writer.env, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        done = [(run.wait(timeout=120), *run.communicate()) for run in runs]
        assert sorted(code for code, _, _ in done) == [0, 1], done
        (_, _, refused), = [d for d in done if d[0] == 1]
        assert f"{dest} exists; choose another path or pass --force" in refused and "Traceback" not in refused
        assert running.read_bytes() == b"half-written"
        running.unlink()
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"copy-{i}{suffix}" for i in range(attempt + 1))
        assert dest.stat().st_mode & 0o777 == 0o600


@pytest.mark.database_independent("files only: the step that names a finished backup, on this filesystem")
def test_a_backup_takes_its_name_in_one_step_that_fails_when_the_name_is_taken(tmp_path: Path) -> None:
    """What makes two backups of one path safe (:func:`db.files.put_in_place`): a file that took the name
    after the part file was made is kept as it is and the backup fails with "exists" (a check, then
    a rename, replaced it); with ``overwrite`` it is replaced. Part files are private and short-named
    whatever the destination's length (a name of 250 bytes left no room for the old ``.NAME.part``'s
    SQLite journal: a traceback)."""
    dest = tmp_path / "copy.db"
    part = part_file(dest)
    assert part.parent == tmp_path and part.stat().st_mode & 0o777 == 0o600
    part.write_bytes(b"mine")
    dest.write_bytes(b"another's, made meanwhile")
    with pytest.raises(FileExistsError, match="copy.db exists; choose another path or pass --force"):
        put_in_place(part, dest)
    assert dest.read_bytes() == b"another's, made meanwhile" and part.read_bytes() == b"mine"
    put_in_place(part, dest, overwrite=True)
    assert dest.read_bytes() == b"mine" and not part.exists()
    long_dest = tmp_path / ("x" * 247 + ".db")
    long_part = part_file(long_dest)
    assert len(f"{long_part.name}-journal") < 255
    long_part.write_bytes(b"whole")
    put_in_place(long_part, long_dest)
    assert long_dest.read_bytes() == b"whole" and sorted(p.name for p in tmp_path.iterdir()) == [
        "copy.db", long_dest.name]


def test_db_backup_says_what_is_wrong_with_a_path_it_cannot_write(writer: Stack) -> None:
    """A path the backup cannot be written to (a file as its folder, a name over 255 bytes) is an error
    with the reason, exit 1, not a traceback (only some OSErrors were caught)."""
    blocker = writer.home / "a-file"
    blocker.write_text("not a folder")
    cases = ((blocker / "copy.db", "is not a folder (a file is in the way)"),
             (writer.home / ("y" * 300 + ".db"), "File name too long"))
    for path, reason in cases:
        proc = subprocess.run([sys.executable, "-m", "db", "backup", str(path)], env=writer.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("python -m db backup: ") and reason in proc.stderr, proc.stderr


def test_db_backup_force_replaces_only_a_file(writer: Stack) -> None:
    """``--force`` writes over a file, never over a FIFO, a socket or a device: a review's
    ``db backup /dev/null --force``, run as root, replaced the machine's /dev/null with a copy of
    the database."""
    import socket as sockets

    fifo = writer.home / "a-fifo"
    os.mkfifo(fifo)
    sock_path = writer.home / "a.sock"
    listener = sockets.socket(sockets.AF_UNIX)
    listener.bind(str(sock_path))
    try:
        for path, kind in ((fifo, "a FIFO (named pipe)"), (sock_path, "a socket")):  # db.files.FILE_KINDS
            proc = subprocess.run([sys.executable, "-m", "db", "backup", "--force", str(path)], env=writer.env,
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert f"{path} is {kind}, not a file" in proc.stderr, proc.stderr
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        assert not [p for p in writer.home.iterdir() if p.name.endswith(".part")]  # refused before writing
        plain = writer.home / "plain.db"
        plain.write_text("an old backup")
        proc = subprocess.run([sys.executable, "-m", "db", "backup", "--force", str(plain)], env=writer.env,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    finally:
        listener.close()


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_quick_check_runs_amcheck_and_is_skipped_not_failed_without_it")
def test_quick_check_and_forced_checkpoint(writer: Stack) -> None:
    insert_ticks(writer, [int(time.time() * 1000) - i for i in range(3000)], "feed")
    path = writer.settings.database_path
    proc = run_jobs(writer, "--run", "quick_check")
    assert proc.returncode == 0, proc.stderr
    before = file_sizes(path)["wal"]
    assert before > 0
    proc = run_jobs(writer, "--run", "checkpoint")  # far under the 64 MB threshold: forced anyway
    assert proc.returncode == 0, proc.stderr
    # Truncated to 0, then the run's own record_job_run commit started a small new WAL.
    assert file_sizes(path)["wal"] < before
    qc, cp = job_runs(writer)
    check_run(qc, "quick_check")
    assert json.loads(qc["detail"])["messages"] == ["ok"]
    check_run(cp, "checkpoint")
    detail = json.loads(cp["detail"])
    assert detail["wal_before"] > 0 and detail["wal_after"] == 0 and detail["busy"] == 0 and detail["forced"]


@pytest.mark.sqlite_only("tests/test_jobs.py::test_no_checkpoint_job_runs_on_a_server")
def test_checkpoint_follows_the_threshold(writer: Stack) -> None:
    insert_ticks(writer, [int(time.time() * 1000) - i for i in range(3000)], "feed")
    path = writer.settings.database_path
    wal = file_sizes(path)["wal"]
    over = {"TICKSTACK_CHECKPOINT_WAL_MB": str(wal * 2 / 2**20)}  # WAL under the threshold: checked, not run
    assert run_jobs(writer, "--until-idle", **over).returncode == 0
    assert "checkpoint" not in [r["job"] for r in job_runs(writer)]
    assert file_sizes(path)["wal"] > 0
    under = {"TICKSTACK_CHECKPOINT_WAL_MB": str(wal / 2 / 2**20)}
    assert run_jobs(writer, "--until-idle", **under).returncode == 0
    (cp,) = [r for r in job_runs(writer) if r["job"] == "checkpoint"]
    check_run(cp, "checkpoint")
    detail = json.loads(cp["detail"])
    assert detail["forced"] is False and detail["wal_before"] >= wal and detail["wal_after"] == 0


@pytest.mark.sqlite_only("tests/test_jobs.py::test_no_checkpoint_job_runs_on_a_server")
def test_a_checkpoint_a_reader_holds_back_is_logged_as_held_back_not_as_a_failure(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """A reader with a read transaction open keeps a TRUNCATE checkpoint from emptying the WAL (SQLite's
    busy = 1): nothing is broken, the next check retries. It was an INFO line until every failed run
    became an ERROR one; it is INFO again, WARNING from the second in a row, and the run is still
    recorded as not ok (the WAL is still there); a real failure stays an ERROR."""
    stack.start_writer(TICKSTACK_BUSY_TIMEOUT_MS="300")  # how long the writer waits for the reader
    insert_ticks(stack, [int(time.time() * 1000) - i for i in range(3000)], "feed")
    reader = connect_read_only(stack.settings.database_path)
    worker = JobsWorker(stack.settings, until_idle=True)
    worker.setup()
    try:
        with caplog.at_level("INFO", logger="tickstack.jobs"):
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM ticks").fetchone() == (3000,)  # reads the WAL
            assert worker.run_job("checkpoint", force=True) is False
            assert worker.run_job("checkpoint", force=True) is False
            reader.execute("COMMIT")
            assert worker.run_job("checkpoint", force=True) is True
    finally:
        reader.close()
        worker.teardown()
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("jobs: checkpoint")]
    assert [level for level, _ in said] == ["INFO", "WARNING", "INFO"], said
    assert said[0][1].startswith("jobs: checkpoint held back in ") and "a reader kept part of the WAL in use" \
        in said[0][1] and ", 2 runs in a row (" in said[1][1] and said[2][1].startswith("jobs: checkpoint ok"), said
    runs = job_runs(stack)
    assert [(bool(r["ok"]), json.loads(r["detail"])["busy"]) for r in runs] == [(False, 1), (False, 1), (True, 0)]


@pytest.mark.sqlite_only("tests/test_jobs.py::test_no_checkpoint_job_runs_on_a_server")
def test_a_checkpoint_asked_while_a_reader_holds_a_snapshot_is_answered_partial_and_holds_no_write_up(
        writer: Stack) -> None:
    """The checkpoint op runs between two batches. It waited for the reader the connection's whole
    busy_timeout (5 s), as long as a client waits before it sends a request again: each resend was a
    new checkpoint that waited too, `db checkpoint` (the command doctor gives for a large WAL) got no
    answer within its 30 s, and every write waited behind them (fault hunt, round 40). It waits for
    readers a moment now (db.ops.CHECKPOINT_OP_WAIT_MS), answers ``busy``, and the writes go on."""
    insert_ticks(writer, [int(time.time() * 1000) - i for i in range(3000)], "feed")
    reader = connect_read_only(writer.settings.database_path)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM ticks").fetchone() == (3000,)  # a snapshot on the WAL
        done = subprocess.run([sys.executable, "-m", "db", "checkpoint", "--json", "--timeout", "30"], env=writer.env,
                              cwd=ROOT, capture_output=True, text=True, timeout=90)
        assert done.returncode == 1 and json.loads(done.stdout)["busy"] == 1, done.stdout + done.stderr
        assert "partial: a reader held the checkpoint back" in done.stderr, done.stderr
        with WriterClient(settings=writer.settings, deadline=30) as client:  # once per request asked, in order
            answers = [client.call("checkpoint", mode="TRUNCATE") for _ in range(3)]
            assert [a["busy"] for a in answers] == [1, 1, 1], answers
            assert client.call("audit", actor="me", action="after")["id"] >= 1
    finally:
        reader.close()
    with WriterClient(settings=writer.settings, deadline=30) as client:
        assert client.call("checkpoint", mode="TRUNCATE")["busy"] == 0  # the reader gone: done whole


@pytest.mark.postgres_only
def test_no_checkpoint_job_runs_on_a_server(writer: Stack) -> None:
    """A server checkpoints its own WAL: the jobs worker never asks, whatever the threshold, and
    its other database jobs run as on SQLite."""
    insert_ticks(writer, [int(time.time() * 1000) - i for i in range(3000)], "feed")
    assert run_jobs(writer, "--until-idle", TICKSTACK_CHECKPOINT_WAL_MB="0.000001").returncode == 0
    assert sorted(r["job"] for r in job_runs(writer)) == ["backup", "quick_check", "retention"]


# --------------------------------------------------------------------------- scheduling


def test_until_idle_runs_due_jobs_once_and_a_restart_runs_none(writer: Stack) -> None:
    proc = run_jobs(writer, "--until-idle")
    assert proc.returncode == 0, proc.stderr
    runs = job_runs(writer)
    assert sorted(r["job"] for r in runs) == ["backup", "quick_check", "retention"]  # checkpoint: WAL small
    for r in runs:
        check_run(r, r["job"])
    assert len(backups(writer)) == 1
    proc = run_jobs(writer, "--until-idle")
    assert proc.returncode == 0, proc.stderr
    assert job_runs(writer) == runs and len(backups(writer)) == 1  # last runs read back: nothing due
    time.sleep(1.1)
    proc = run_jobs(writer, "--until-idle", TICKSTACK_RETENTION_EVERY_S="1")
    assert proc.returncode == 0, proc.stderr
    assert [r["job"] for r in job_runs(writer)[len(runs):]] == ["retention"]


def assert_one_line_failure(stderr: str, job: str, *words: str) -> None:
    """The job's failure is one ERROR line saying what and why, with no traceback (it had 14 lines)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"jobs: {job} FAILED in " in errors[0], stderr
    assert all(word in errors[0] for word in words), (words, stderr)


def test_a_failing_job_is_recorded_and_the_others_still_run(writer: Stack) -> None:
    bdir = writer.settings.backup_dir
    bdir.rmdir()
    bdir.write_text("not a folder")  # backups cannot be written (even as root)
    proc = run_jobs(writer, "--run", "backup")
    assert proc.returncode == 1
    assert_one_line_failure(proc.stderr, "backup", f"NotADirectoryError: {bdir} is not a folder")
    (run,) = job_runs(writer)
    check_run(run, "backup", ok=False)
    assert "Error" in run["detail"] and str(bdir) in run["detail"]
    time.sleep(0.01)
    proc = run_jobs(writer, "--until-idle", TICKSTACK_BACKUP_EVERY_H="0.0000001")
    assert proc.returncode == 0, proc.stderr
    assert_one_line_failure(proc.stderr, "backup", str(bdir))
    later = {r["job"]: bool(r["ok"]) for r in job_runs(writer)[1:]}
    assert later == {"retention": True, "backup": False, "quick_check": True}


def test_the_loop_repeats_jobs_on_schedule_and_stops_on_sigterm(writer: Stack) -> None:
    env = {**writer.env, "TICKSTACK_RETENTION_EVERY_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "workers.jobs"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    writer.procs.append(proc)
    deadline = time.monotonic() + 60
    while sum(r["job"] == "retention" for r in job_runs(writer)) < 3 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.2)
    assert writer.stop(proc, signal.SIGTERM, timeout=15) == 0
    counts: dict[str, int] = {}
    for r in job_runs(writer):
        counts[r["job"]] = counts.get(r["job"], 0) + 1
    assert counts["retention"] >= 3 and counts["backup"] == 1 and counts["quick_check"] == 1


# --------------------------------------------------------------------------- metrics (the console's samples)


def test_metrics_job_samples_the_writer_and_files_and_skips_circus_when_it_is_not_there(writer: Stack) -> None:
    assert JobSchedule.from_env({"TICKSTACK_SAMPLE_EVERY_S": "2.5"}).every_s("metrics") == 2.5
    with pytest.raises(ConfigError, match="TICKSTACK_SAMPLE_EVERY_S"):
        JobSchedule.from_env({"TICKSTACK_SAMPLE_EVERY_S": "0"})
    proc = run_jobs(writer, "--run", "metrics")
    assert proc.returncode == 0, proc.stderr
    assert "circusd" in proc.stderr  # said once that the watcher series are left out
    insert_ticks(writer, [int(time.time() * 1000) - i for i in range(1000)], "feed")
    time.sleep(0.2)
    proc = run_jobs(writer, "--run", "metrics")  # resumes the counters from the first run's samples
    assert proc.returncode == 0, proc.stderr
    # Asked for once, it says how it went in one line, as every other job: it said nothing (a new user's
    # run of the README, round 47; its scheduled runs, every few seconds, stay at DEBUG).
    said = [line for line in proc.stderr.splitlines() if "jobs: metrics ok in " in line]
    assert len(said) == 1 and " INFO " in said[0], proc.stderr
    names = {name for (name,) in query(writer.settings, "SELECT DISTINCT name FROM samples")}
    assert {"writer.queue_depth", "writer.mean_batch", "writer.requests_ok", "writer.ticks_inserted",
            "writer.uptime_s", "writer.lock_errors", "db.bytes", "writer.ticks_per_s",
            "writer.requests_per_s"} <= names
    # SQLite's WAL file is measured; a server's size is pg_database_size and it has no WAL of ours.
    assert ("db.wal_bytes" in names) == (writer.settings.database_path is not None)
    assert not any(n.startswith("watcher.") for n in names)  # no circus here: those series are skipped
    (rate,) = query(writer.settings, "SELECT value FROM samples WHERE name = 'writer.ticks_per_s'")
    assert rate[0] > 0  # 1000 ticks between the two samples
    assert query(writer.settings, "SELECT count(*) FROM samples WHERE name = 'writer.ticks_inserted'") == [(2,)]
    assert job_runs(writer) == []  # sampling is not recorded in job_runs


def test_a_jobs_worker_taking_over_runs_each_job_when_it_is_due_after_the_last_leaders_run(writer: Stack) -> None:
    """A standby that takes over the jobs reads when each job last ran (``job_runs``) then, not only at
    its start: it ran retention (and would have run a backup) again at once, moments after the leader
    it replaces had."""
    every = 4.0
    env = {**writer.env, "TICKSTACK_RETENTION_EVERY_S": str(every)}
    logs = [writer.home / "log" / f"jobs-{k}.log" for k in "ab"]
    procs = []
    for log in logs:
        with open(log, "ab") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "workers.jobs"], env=env, cwd=ROOT, stdout=out,
                                          stderr=subprocess.STDOUT))
        writer.procs.append(procs[-1])
        if len(procs) == 1:
            wait_for("the first to lead", lambda: "jobs: leading" in logs[0].read_text(), timeout=60)
    leader, standby = procs
    wait_for("the second to stand by", lambda: "standing by for the database's jobs" in logs[1].read_text(), timeout=60)
    wait_for("the leader's second retention run", lambda: sum(
        r["job"] == "retention" for r in job_runs(writer)) >= 2, timeout=60)
    leader.kill()
    leader.wait(30)
    wait_for("the standby to take over", lambda: "jobs: leading" in logs[1].read_text(), timeout=60)
    wait_for("a retention run of the new leader", lambda: sum(
        r["job"] == "retention" for r in job_runs(writer)) >= 3, timeout=60)
    assert writer.stop(standby, signal.SIGTERM, timeout=15) == 0
    runs = [r for r in job_runs(writer) if r["job"] == "retention"]
    taken_over = next(i for i, r in enumerate(runs) if r["started_at"] > runs[1]["started_at"])
    gap_s = (runs[taken_over]["started_at"] - runs[taken_over - 1]["started_at"]) / 1000
    assert gap_s >= every - 0.05, runs  # the schedule, from the last leader's run on; not at once
    assert sum(r["job"] == "backup" for r in job_runs(writer)) == 1


def test_one_jobs_worker_of_a_home_samples_the_metrics_and_another_takes_over_when_it_dies(writer: Stack) -> None:
    """The ``metrics`` job samples this home's processes: a second jobs worker (``circusctl incr jobs``,
    or one run by hand beside the stack) stored every series a second time each interval. One worker
    of a home samples (``run/metrics.lock``); another takes over when it dies."""
    logs = [writer.home / "log" / f"jobs-metrics-{k}.log" for k in "ab"]
    procs = []
    for log in logs:
        procs.append(writer.start_worker("workers.jobs", log, "--log-level", "DEBUG", TICKSTACK_SAMPLE_EVERY_S="1"))
        if len(procs) == 1:
            wait_for("the first to sample", lambda: "jobs: metrics ok" in logs[0].read_text(), timeout=60)
    first, second = procs

    def sampled(log: Path) -> int:
        return log.read_text().count("jobs: metrics ok")

    wait_for("the second to stand by", lambda: "standing by" in logs[1].read_text(), timeout=60)
    more = sampled(logs[0]) + 3
    wait_for("three more samples of the first", lambda: sampled(logs[0]) >= more, timeout=60)
    assert sampled(logs[1]) == 0, logs[1].read_text()
    said = logs[1].read_text()
    assert f"metrics are sampled by pid {first.pid}" in said, said
    first.kill()
    first.wait(30)
    wait_for("the second to sample", lambda: sampled(logs[1]) >= 2, timeout=60)
    assert writer.stop(second, signal.SIGTERM, timeout=15) == 0
    # One sample of each series per run, whoever ran it.
    runs = sampled(logs[0]) + sampled(logs[1])
    assert query(writer.settings, "SELECT count(*) FROM samples WHERE name = 'writer.uptime_s'") == [(runs,)]


@pytest.mark.sqlite_only("tests/test_postgres_leader.py::test_one_monitor_leads_and_a_standby_takes_over_when_it_is_killed")
def test_a_leader_lock_that_cannot_be_opened_stops_the_worker_saying_which_file(writer: Stack) -> None:
    """A leader lock the worker cannot open (here a folder in its place; a file left by another user)
    is an error naming the file and the reason, exit 1: it stood by for ever, "the database server
    does not answer", and jobs skipped its database jobs without a word."""
    lock = leader_lock_path(writer.settings.database_path, "monitor")
    lock.mkdir()
    for args in ([], ["--until-idle"]):
        proc = subprocess.run([sys.executable, "-m", "workers.monitor", *args], env=writer.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert f"monitor: cannot use the monitor leader lock {lock}: Is a directory; not running" in proc.stderr
    leader_lock_path(writer.settings.database_path, "jobs").mkdir()
    jobs = run_jobs(writer, "--until-idle", timeout=60)
    assert jobs.returncode == 0, jobs.stderr
    assert "cannot use the jobs leader lock" in jobs.stderr and "retention, backups and checks do not run here" \
        in jobs.stderr and "jobs: retention" not in jobs.stderr, jobs.stderr


@pytest.mark.sqlite_only(
    "tests/test_postgres_keepalives.py::test_a_silently_dead_hosts_writer_lock_and_leadership_pass_to_another_host_by_keepalives")
def test_a_leader_whose_lock_file_is_removed_stops_so_that_no_second_leader_runs(writer: Stack) -> None:
    """A leader lock file removed (or replaced) under its holder: the next process would lock a new file
    and lead beside it. The holder sees it within its check and stops (circus starts it again, as a
    leader or a standby); ``db backup --force`` over a leader lock is refused like the writer's."""
    lock = leader_lock_path(writer.settings.database_path, "analysis")
    log = writer.home / "log" / "analysis-removed.log"
    proc = writer.start_worker("workers.analysis", log)
    wait_for("the worker to lead", lambda: "analysis: leading" in log.read_text(), timeout=60)
    refused = subprocess.run([sys.executable, "-m", "db", "backup", "--force", str(lock)], env=writer.env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "is a file of the running stack" in refused.stderr, refused.stderr
    lock.unlink()
    assert proc.wait(timeout=60) == 1
    assert f"analysis: lost the leadership ({lock} was removed or replaced)" in log.read_text()


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_the_backup_job_writes_a_private_restorable_pg_dump")
def test_db_restore_puts_a_backup_in_place_only_with_the_stack_stopped(stack: Stack) -> None:
    """The README had no way back from a backup: ``python -m db restore BACKUP`` checks it, refuses
    while the writer runs or anything holds the database open, keeps the database it replaces (with
    its WAL, which left beside the restored file would be replayed into it), and the writer then
    serves the backup's rows, private, its new writes on top."""
    def db(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "db", *args], env=stack.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    database = stack.settings.database_path
    assert database is not None
    writer = stack.start_writer()
    now = int(time.time() * 1000)
    insert_ticks(stack, [now - i for i in range(100)], "before")
    backup = stack.home / "kept.db"
    assert db("backup", str(backup)).returncode == 0
    insert_ticks(stack, [now - 1000 - i for i in range(50)], "after")  # not in the backup

    refused = db("restore", str(backup))
    assert refused.returncode == 1 and f"the writer is running (pid {writer.pid}, " in refused.stderr, refused.stderr
    assert "a second one" not in refused.stderr, refused.stderr  # the second writer's words were quoted
    assert stack.stop(writer) == 0
    reader = connect_read_only(database)  # a process that would go on with the old file
    try:
        refused = db("restore", str(backup))
        assert refused.returncode == 1 and f"{database} is open in pid {os.getpid()}" in refused.stderr, \
            refused.stderr
    finally:
        reader.close()
    not_ours = stack.home / "not-ours.db"
    other = sqlite3.connect(not_ours)
    other.execute("CREATE TABLE t (x)")
    other.close()
    for bad, said in ((stack.home / "missing.db", "no such file"), (not_ours, "not tickstack's"),
                      (stack.home / "admin-password", "is not an SQLite database"), (database, "the database itself")):
        if bad.name == "admin-password":
            bad.write_text("a-password-of-sorts\n")
        refused = db("restore", str(bad))
        assert refused.returncode == 1 and said in refused.stderr and "Traceback" not in refused.stderr, \
            (bad, refused.stderr)
    Path(f"{database}-wal").write_bytes(b"a WAL of the old database")  # as a crash would leave one

    done = db("restore", str(backup))
    assert done.returncode == 0, done.stdout + done.stderr
    (aside,) = [p for p in database.parent.iterdir() if p.name.startswith(f"{database.name}.replaced-")
                and not p.name.endswith(("-wal", "-shm"))]
    assert f"restored {backup} into {database}" in done.stdout and str(aside) in done.stdout, done.stdout
    assert Path(f"{aside}-wal").read_bytes() == b"a WAL of the old database"
    assert not Path(f"{database}-wal").exists()
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    writer = stack.start_writer()
    assert query(stack.settings, "SELECT source, count(*) FROM ticks GROUP BY source") == [("before", 100)]
    insert_ticks(stack, [now + 1], "later")
    assert query(stack.settings, "SELECT count(*) FROM ticks")[0][0] == 101
    assert stack.stop(writer) == 0

    # A second restore within the same second keeps what it replaces under another name (a review
    # found the first one's kept database written over).
    assert db("restore", str(backup)).returncode == 0
    asides = sorted(p.name for p in database.parent.iterdir() if p.name.startswith(f"{database.name}.replaced-")
                    and not p.name.endswith(("-wal", "-shm")))
    assert len(asides) == 2 and aside.name in asides, asides
    assert Path(f"{aside}-wal").read_bytes() == b"a WAL of the old database"
    # Nothing removes what a restore kept (each the size of a database): doctor says so.
    kept = [p for p in database.parent.iterdir() if p.name.startswith(f"{database.name}.replaced-")]
    said = db("doctor").stdout
    newest = re.escape(max(asides))
    assert re.search(rf"\[OK  \] {len(kept)} file\(s\) kept by `db restore` of the databases it replaced take "
                     rf"\S+ \S+ in {re.escape(str(database.parent))} \(the newest {newest}\); nothing removes them: "
                     r"delete them once you no longer need them\.", said), said
    # Through a symbolic link to the home, a reader is seen as well (it was not: paths compared as written).
    link = Path(tempfile.mkdtemp(prefix="ts-link-")) / "home"
    link.symlink_to(stack.home)
    try:
        via_link = {**stack.env, "TICKSTACK_HOME": str(link)}
        reader = connect_read_only(database)
        try:
            refused = subprocess.run([sys.executable, "-m", "db", "restore", str(backup)], env=via_link, cwd=ROOT,
                                     capture_output=True, text=True, timeout=120)
            assert refused.returncode == 1 and f"is open in pid {os.getpid()}" in refused.stderr, refused.stderr
        finally:
            reader.close()
    finally:
        shutil.rmtree(link.parent)
    # Into a home not made yet (a new machine's): made, as init makes it.
    fresh = stack.home / "fresh"
    done = subprocess.run([sys.executable, "-m", "db", "restore", str(backup)], env={**stack.env, "TICKSTACK_HOME":
                          str(fresh)}, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "restored" in done.stdout, done.stdout + done.stderr
    assert stat.S_IMODE((fresh / "tickstack.db").stat().st_mode) == 0o600


def db_command(stack: Stack, *args: str, tz: str | None = None) -> subprocess.CompletedProcess:
    """``python -m db ARGS``; ``tz``: the local time zone it runs in (TZ), to show what it says in UTC."""
    env = stack.env if tz is None else {**stack.env, "TZ": tz}
    return subprocess.run([sys.executable, "-m", "db", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def open_paper_trade(stack: Stack, side: str) -> int:
    with WriterClient(settings=stack.settings, deadline=30) as client:
        return client.call("open_trade", symbol="EURUSD", side=side, size=1.0, entry_price=1.1)["id"]


def test_a_restore_names_the_trades_it_puts_back_open(stack: Stack) -> None:
    """Trades closed after the backup are open in it: the restore put them back open saying only
    which trades opened after the backup it lost, and the monitor then managed them again, stops and
    all (a new user's run-through: a trade closed by hand came back open). It names them, on either
    database; a trade open or closed in both is not named."""
    from db.backups import backup_suffix

    writer = stack.start_writer()
    insert_ticks(stack, [int(time.time() * 1000)], "before")
    still_open = open_paper_trade(stack, "buy")
    closed_before = open_paper_trade(stack, "sell")
    reopened = [open_paper_trade(stack, "buy") for _ in range(2)]
    with WriterClient(settings=stack.settings, deadline=30) as client:
        client.call("close_trade", trade_id=closed_before, price=1.2)
        backup = stack.home / f"kept{backup_suffix(stack.settings)}"
        assert db_command(stack, "backup", str(backup)).returncode == 0
        for trade in reopened:
            client.call("close_trade", trade_id=trade, price=1.3, reason="by hand")
    assert stack.stop(writer) == 0

    done = db_command(stack, "restore", str(backup))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (f"WARNING: trades {reopened[0]} and {reopened[1]}, closed after the backup, are open in it: the monitor "
            "manages them again (stops, targets) once the stack runs; close them again if they are to stay "
            "closed") in done.stdout, done.stdout
    assert done.stdout.count("closed after the backup") == 1, done.stdout  # the two named, no other
    stack.start_writer()
    assert query(stack.settings, "SELECT id FROM trades WHERE status = 'open' ORDER BY id") == \
        [(still_open,), *((t,) for t in reopened)]


@pytest.mark.sqlite_only("tests/test_jobs.py::test_a_restore_names_the_trades_it_puts_back_open")
def test_a_restore_that_cannot_read_the_replaced_trades_says_so(stack: Stack) -> None:
    """A replaced database damaged in the pages of its trades' states (their ids still read): the
    restore looked for the trades it closed after the backup, met the damage, and said nothing of them,
    as if none had been closed (a review). It says their states could not be read, and what that
    means: a trade closed since may be open again."""
    writer = stack.start_writer()
    with WriterClient(settings=stack.settings, deadline=30) as client:
        ids = [client.call("open_trade", symbol="EURUSD", side="buy", size=1.0, entry_price=1.1,
                           stop_loss=1.0, take_profit=1.3)["id"] for _ in range(400)]
        backup = stack.home / "kept.db"
        assert db_command(stack, "backup", str(backup)).returncode == 0
        for trade in ids[::7]:
            client.call("close_trade", trade_id=trade, price=1.2, reason="by hand")
    assert stack.stop(writer) == 0
    database = stack.settings.database_path
    assert database is not None
    con = sqlite3.connect(database)
    try:
        assert con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0  # the pages in the file alone
        size = con.execute("PRAGMA page_size").fetchone()[0]
        index = [n for (n,) in con.execute("SELECT pageno FROM dbstat WHERE name = (SELECT name FROM sqlite_master "
                                           "WHERE tbl_name = 'trades' AND sql LIKE '%(status)%')")]
    finally:
        con.close()
    assert index, "no index of the trades' status"
    with open(database, "r+b") as f:  # their status index, where the states are read: max(id) still reads
        for page in index:
            f.seek((page - 1) * size)
            f.write(b"\xff" * size)

    done = db_command(stack, "restore", str(backup))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "closed after the backup" in done.stdout and "could not be read" in done.stdout, done.stdout


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_the_backup_job_writes_a_private_restorable_pg_dump")
def test_a_restore_continues_tick_and_trade_ids_and_names_the_lost_trades(stack: Stack) -> None:
    """A restored backup's ids are the backup's: the tick ids the replaced database gave after the
    backup (which never go back: consumers resume from the last id they processed) were given again,
    and a trade opened after the backup (its id acknowledged to the client) was lost with the restore,
    as the README says, and its id then given to the next trade opened, so the client's
    ``close_trade`` of its trade closed someone else's. The restore continues the tick and trade ids
    after the replaced database's (trades have a counter since schema v5) and names the trades lost;
    a client's close of one is told it does not exist."""
    def db(*args: str) -> subprocess.CompletedProcess:
        return db_command(stack, *args)

    def open_trade(side: str) -> int:
        return open_paper_trade(stack, side)

    writer = stack.start_writer()
    now = int(time.time() * 1000)
    insert_ticks(stack, [now - i for i in range(100)], "before")
    backup = stack.home / "kept.db"
    assert db("backup", str(backup)).returncode == 0
    lost_trade = open_trade("buy")  # acknowledged after the backup: lost by the restore
    insert_ticks(stack, [now - 1000 - i for i in range(50)], "after")
    lost_top_tick = query(stack.settings, "SELECT max(id) FROM ticks")[0][0]
    assert stack.stop(writer) == 0

    done = db("restore", str(backup))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (f"ids continue after the replaced database's (ticks {lost_top_tick}, trade_events {lost_trade}, "
            f"trades {lost_trade})") in done.stdout, done.stdout
    assert (f"WARNING: trade {lost_trade}, opened after the backup, is not in it (a client holding one is told it "
            "does not exist; its id is not given to a new trade)") in done.stdout, done.stdout
    writer = stack.start_writer()
    assert query(stack.settings, "SELECT count(*) FROM trades") == [(0,)]  # lost, as said
    with WriterClient(settings=stack.settings, deadline=30) as client:
        with pytest.raises(NotFound):
            client.call("close_trade", trade_id=lost_trade, price=1.2)
    assert open_trade("sell") == lost_trade + 1  # not given again
    insert_ticks(stack, [now + 1], "later")
    assert query(stack.settings, "SELECT min(id) FROM ticks WHERE source = 'later'")[0][0] > lost_top_tick
    assert query(stack.settings, "PRAGMA integrity_check") == [("ok",)]
    assert stack.stop(writer) == 0


def by_hand(path: Path, *statements: str) -> None:
    """``statements`` in one transaction, as sqlite3's shell runs them: foreign keys off."""
    con = sqlite3.connect(path)
    try:
        with con:
            for sql in statements:
                con.execute(sql)
    finally:
        con.close()


def as_schema_v4(path: Path) -> None:
    """The database at ``path`` as schema v4 made it: trades and trade_events without AUTOINCREMENT
    (no counter: a new row takes the highest id + 1), their indexes as they were, no version 5."""
    con = sqlite3.connect(path, isolation_level=None)  # foreign keys off: the drops check nothing
    try:
        con.execute("BEGIN IMMEDIATE")
        for name in ("trades", "trade_events"):
            sql, = con.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
            indexes = [i for (i,) in con.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
                                                 "AND sql IS NOT NULL", (name,))]
            assert "PRIMARY KEY AUTOINCREMENT" in sql, sql
            con.execute(sql.replace(f"CREATE TABLE {name} (", f"CREATE TABLE {name}_v4 (", 1)
                        .replace("PRIMARY KEY AUTOINCREMENT", "PRIMARY KEY"))
            con.execute(f"INSERT INTO {name}_v4 SELECT * FROM {name}")
            con.execute(f"DROP TABLE {name}")
            con.execute(f"ALTER TABLE {name}_v4 RENAME TO {name}")
            for index in indexes:
                con.execute(index)
            con.execute("DELETE FROM sqlite_sequence WHERE name = ?", (name,))
        con.execute("DELETE FROM schema_version WHERE version >= 5")
        con.execute("COMMIT")
    finally:
        con.close()


@pytest.mark.sqlite_only("tests/test_postgres.py::test_two_migrations_at_once_wait_for_each_other")
def test_a_backup_from_before_schema_v5_restored_gives_no_trade_id_again(stack: Stack) -> None:
    """Schema v5 gives trades and trade_events AUTOINCREMENT (made again, as SQLite cannot add it):
    a database of v4 migrates with its rows, events, indexes and foreign keys as they were; and a
    v4 backup restored over a v5 database (a backup from before the upgrade) continues the trade ids
    after the replaced database's, though the backup's trades have no counter until the writer's
    migration makes one: the migration keeps the counter the restore wrote."""
    writer = stack.start_writer()
    first, second = open_paper_trade(stack, "buy"), open_paper_trade(stack, "sell")
    assert stack.stop(writer) == 0
    path = stack.settings.database_path
    as_schema_v4(path)
    indexes = query(stack.settings, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name LIKE 'trade%' "
                                    "ORDER BY name")
    backup = stack.home / "v4.db"
    with sqlite3.connect(path) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    dst.close()
    src.close()

    writer = stack.start_writer()  # migrates the v4 database
    assert query(stack.settings, "SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]
    assert query(stack.settings, "SELECT id, side FROM trades ORDER BY id") == [(first, "buy"), (second, "sell")]
    assert query(stack.settings, "SELECT trade_id, kind FROM trade_events ORDER BY id") == [
        (first, "opened"), (second, "opened")]
    assert query(stack.settings, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name LIKE 'trade%' "
                                 "ORDER BY name") == indexes
    lost = open_paper_trade(stack, "buy")
    assert lost == second + 1
    assert stack.stop(writer) == 0
    with sqlite3.connect(path) as con:
        assert "AUTOINCREMENT" in con.execute("SELECT sql FROM sqlite_master WHERE name = 'trades'").fetchone()[0]
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        with pytest.raises(sqlite3.IntegrityError):  # the events' foreign key still points at trades
            con.execute("PRAGMA foreign_keys = ON")
            con.execute("INSERT INTO trade_events (trade_id, ts, kind, detail) VALUES (999, 0, 'x', '')")
    con.close()

    done = db_command(stack, "restore", str(backup))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"WARNING: trade {lost}, opened after the backup, is not in it" in done.stdout, done.stdout
    writer = stack.start_writer()  # migrates the restored v4 backup
    assert query(stack.settings, "SELECT id FROM trades ORDER BY id") == [(first,), (second,)]
    assert open_paper_trade(stack, "sell") == lost + 1  # not the lost trade's id again
    assert query(stack.settings, "PRAGMA integrity_check") == [("ok",)]
    assert stack.stop(writer) == 0


@pytest.mark.sqlite_only("tests/test_postgres.py::test_two_migrations_at_once_wait_for_each_other")
def test_a_v4_database_replaced_by_its_v4_backup_gives_no_trade_or_event_id_again(stack: Stack) -> None:
    """A v4 backup restored over a v4 database (the code upgraded, the writer not started since): the
    replaced database has no counters for trades and events, only its highest ids; the restore makes
    counters of them, which the v5 migration keeps. The events' was missed (only the trades' was
    made): a new trade's first event took an id the replaced database had given (a review)."""
    writer = stack.start_writer()
    open_paper_trade(stack, "buy")
    assert stack.stop(writer) == 0
    path = stack.settings.database_path
    as_schema_v4(path)
    backup = stack.home / "v4.db"
    with sqlite3.connect(path) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    dst.close()
    src.close()
    by_hand(path, "INSERT INTO trades (id, symbol, side, size, entry_price, status, opened_at, last_tick_id) "
                  "VALUES (7, 'EURUSD', 'buy', 1.0, 1.1, 'open', 0, 0)",  # after the backup, in the v4 database
            "INSERT INTO trade_events (id, trade_id, ts, kind, detail) VALUES (8, 7, 0, 'opened', '')",
            "INSERT INTO trade_events (id, trade_id, ts, kind, detail) VALUES (9, 7, 0, 'moved', '')")
    done = db_command(stack, "restore", str(backup))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "trade_events 9, trades 7" in done.stdout, done.stdout
    writer = stack.start_writer()
    assert open_paper_trade(stack, "sell") == 8
    assert query(stack.settings, "SELECT id FROM trade_events WHERE trade_id = 8") == [(10,)]
    assert stack.stop(writer) == 0


@pytest.mark.sqlite_only("tests/test_postgres.py::test_two_migrations_at_once_wait_for_each_other")
def test_schema_v5_refuses_trade_events_of_no_trade_in_words_and_leaves_v4_as_it_was(stack: Stack) -> None:
    """Events whose trade is gone (deleted by hand in sqlite3, foreign keys off by default there) made
    the v5 migration's copy fail with SQLite's bare "FOREIGN KEY constraint failed": the writer
    restarted again and again and db init said the same (a review). The migration says which events
    and what to do, and leaves the database at v4; once they are deleted, it migrates."""
    writer = stack.start_writer()
    open_paper_trade(stack, "buy")
    assert stack.stop(writer) == 0
    path = stack.settings.database_path
    as_schema_v4(path)
    by_hand(path, "INSERT INTO trade_events (id, trade_id, ts, kind, detail) VALUES (50, 999, 0, 'opened', '')")
    refused = db_command(stack, "init")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "1 of them point at trades that do not exist (rowids 50" in refused.stderr, refused.stderr
    assert "DELETE FROM trade_events WHERE trade_id NOT IN (SELECT id FROM trades)" in refused.stderr
    assert query(stack.settings, "SELECT max(version) FROM schema_version") == [(4,)]
    by_hand(path, "DELETE FROM trade_events WHERE trade_id NOT IN (SELECT id FROM trades)")
    done = db_command(stack, "init")
    assert done.returncode == 0, done.stdout + done.stderr
    assert query(stack.settings, "SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]
    assert query(stack.settings, "SELECT count(*) FROM trade_events") == [(1,)]


def test_a_last_run_dated_ahead_of_the_clock_does_not_stop_the_job(writer: Stack,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A clock set back after it ran ahead (a host's clock corrected; job_runs rows dated 60 days on):
    every job waited until that time came, 60 days without a backup, retention or check. A last run
    more than CLOCK_SLACK_S after now is no reason to wait: the job is due, and the log says why."""
    worker = JobsWorker(writer.settings)
    worker.setup()
    try:
        now = time.time()
        for job in ("backup", "retention"):
            worker.last_run[job] = now + 60 * 86_400
        worker.last_run["quick_check"] = now + 10  # a few seconds ahead (hosts' clocks differ): not due
        with caplog.at_level(logging.WARNING, logger=worker.log.name):
            due = worker.due(now)
        assert "backup" in due and "retention" in due and "quick_check" not in due, due
        assert any("ahead of this clock" in r.getMessage() and "backup" in r.getMessage() for r in caplog.records), \
            [r.getMessage() for r in caplog.records]
    finally:
        worker.teardown()
    # The same read back from job_runs by a new worker (a restart, or a new leader).
    ahead = int((time.time() + 60 * 86_400) * 1000)
    with WriterClient(settings=writer.settings, deadline=30) as client:
        client.call("record_job_run", job="backup", started_at=ahead, finished_at=ahead, ok=True)
    restarted = JobsWorker(writer.settings)
    restarted.setup()
    try:
        assert "backup" in restarted.due()
    finally:
        restarted.teardown()


@pytest.mark.database_independent("how a failed read is logged: its engine is an empty SQLite file's on either run")
def test_a_failed_read_of_the_last_runs_on_taking_over_is_one_line_without_the_statement(
        writer: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A jobs worker that takes over the lead and cannot read ``job_runs`` (its database dropped and made
    again empty under it in the PostgreSQL fault hunt) logged SQLAlchemy's whole text: the SELECT, its
    parameters and a link, over four lines. The database's words, in one line."""
    from sqlalchemy import create_engine

    worker = JobsWorker(writer.settings, until_idle=True)
    worker.setup()
    try:
        worker.engine = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")  # no job_runs table in it
        with caplog.at_level("WARNING", logger="tickstack.jobs"):
            worker._taken_over()
    finally:
        worker.teardown()
    (said,) = [r.getMessage() for r in caplog.records if "could not read the last runs" in r.getMessage()]
    assert "no such table: job_runs" in said and "\n" not in said, said
    assert "SELECT" not in said and "sqlalche.me" not in said and "parameters" not in said, said
