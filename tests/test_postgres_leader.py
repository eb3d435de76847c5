"""One leader per database for the workers that must run once (analysis, monitor): on PostgreSQL,
with several hosts' stacks on one database, a standby waits and takes over when the leader dies
(:mod:`db.leader`). Two processes of one home stand for two hosts: leadership is per database."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import create_engine

from db.client import WriterClient
from db.config import Settings
from db.leader import leaders
from testkit.env import ROOT
from testkit.helpers import query, wait_for
from testkit.postgres import HomeDatabases
from testkit.process import stop_process
from testkit.writer import Stack, stacks_on_one_database
from tests.test_postgres import stack_on

if TYPE_CHECKING:
    from workers.jobs import JobsWorker

#: A server's own promises: run by ``pytest --database postgresql`` (the suite's PostgreSQL run).
pytestmark = pytest.mark.postgres_only


def start(module: str, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)


def leader_of(url: str, name: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return leaders(conn, (name,))[name]
    finally:
        engine.dispose()


def test_one_monitor_leads_and_a_standby_takes_over_when_it_is_killed(request: pytest.FixtureRequest) -> None:
    stack = stack_on("postgresql", request)
    procs: list[subprocess.Popen] = []
    try:
        stack.start_writer()
        first_log, second_log = stack.home / "log" / "monitor-a.log", stack.home / "log" / "monitor-b.log"
        first = start("workers.monitor", stack.env, first_log)
        procs.append(first)
        wait_for("the first monitor to lead", lambda: "monitor: leading" in first_log.read_text(), timeout=60)
        second = start("workers.monitor", stack.env, second_log)
        procs.append(second)
        wait_for("the second monitor to stand by", lambda: "standing by" in second_log.read_text(), timeout=60)
        said = second_log.read_text()
        assert f"the leader is tickstack leader monitor pid {first.pid} on" in said, said
        assert "monitor started" in said and "leading" not in said, said
        assert f"pid {first.pid}" in (leader_of(stack.env["DATABASE_URL"], "monitor") or "")

        os.kill(first.pid, signal.SIGKILL)  # the leader's host dies: its session ends with it
        first.wait(30)
        wait_for("the standby to take over", lambda: "monitor: leading" in second_log.read_text(), timeout=60)
        assert f"pid {second.pid}" in (leader_of(stack.env["DATABASE_URL"], "monitor") or "")

        # A bounded run does not wait behind a leader: it says who leads and exits 3.
        bounded = subprocess.run([sys.executable, "-m", "workers.monitor", "--until-idle"], env=stack.env,
                                 cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert bounded.returncode == 3, bounded.stderr
        assert f"another process leads (tickstack leader monitor pid {second.pid}" in bounded.stderr

        stop_process(second, 30, signal.SIGTERM)
        assert second.returncode == 0
        assert leader_of(stack.env["DATABASE_URL"], "monitor") is None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stack.close()


def test_on_sqlite_the_one_monitor_leads_at_once(request: pytest.FixtureRequest) -> None:
    """On SQLite leadership is a file lock beside the database (the standby case:
    ``tests/test_analysis.py::test_a_second_analysis_worker_stands_by_and_takes_over_when_the_leader_dies``)."""
    stack = stack_on("sqlite", request)
    try:
        stack.start_writer()
        run = subprocess.run([sys.executable, "-m", "workers.monitor", "--until-idle"], env=stack.env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "standing by" not in run.stderr and "monitor: leading" in run.stderr
        lock = stack.settings.database_path.with_name("tickstack.db.leader-monitor.lock")
        assert lock.stat().st_mode & 0o777 == 0o600 and lock.read_text() == ""  # let go on the way out
    finally:
        stack.close()


def test_the_database_jobs_run_on_the_leading_host_only(request: pytest.FixtureRequest) -> None:
    """Retention, backups and checks work on the shared database: one jobs worker runs them; the
    others sample their own host (``metrics``) and stand by, and one of them takes over."""
    stack = stack_on("postgresql", request)
    procs: list[subprocess.Popen] = []
    try:
        stack.start_writer()
        leader_log = stack.home / "log" / "jobs-a.log"
        leader = start("workers.jobs", stack.env, leader_log)
        procs.append(leader)
        wait_for("the first jobs worker to lead", lambda: "jobs: leading" in leader_log.read_text(), timeout=60)
        wait_for("its retention run", lambda: "jobs: retention ok" in leader_log.read_text(), timeout=60)

        due = {**stack.env, "TICKSTACK_RETENTION_EVERY_S": "0.001"}  # retention is due at once
        standby = subprocess.run([sys.executable, "-m", "workers.jobs", "--until-idle"], env=due, cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)
        assert standby.returncode == 0, standby.stderr
        assert f"standing by for the database's jobs; the leader is tickstack leader jobs pid {leader.pid}" \
            in standby.stderr, standby.stderr
        assert "jobs: retention" not in standby.stderr and "jobs: backup" not in standby.stderr, standby.stderr

        os.kill(leader.pid, signal.SIGKILL)
        leader.wait(30)
        taking_over = subprocess.run([sys.executable, "-m", "workers.jobs", "--until-idle"], env=due,
                                     cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert taking_over.returncode == 0, taking_over.stderr
        assert "jobs: leading" in taking_over.stderr and "jobs: retention ok" in taking_over.stderr, \
            taking_over.stderr
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stack.close()


def test_a_monitor_and_jobs_whose_hosts_writer_is_gone_give_way_to_a_host_whose_writer_answers(
        home_databases: HomeDatabases) -> None:
    """Two hosts on one database, each with its writer and its monitor. Host A's monitor leads; host A's
    writer stops (``circusctl stop writer`` there, or circus's flapping gave up on it) while host A's
    monitor, its session and its leadership live on. Every change the monitor makes goes through its
    own host's writer, so it moved no stop and closed no trade, of any host, for as long as that lasted:
    it went on leading, and host B's monitor, whose writer answers, stood by for good. Now a leader on a
    server whose writer has not answered for :data:`workers.base.WRITER_GONE_S` gives the leadership up
    (exit 1: circus starts it again, as a standby), a standby takes it only while its own writer answers,
    and host B's monitor closes a trade at its stop. So do the database's jobs (retention, backups,
    checks: recorded and deleted through the writer), whose worker lives on, sampling its home."""
    with stacks_on_one_database(home_databases) as (a, b):
        a.env["TICKSTACK_HOST"], b.env["TICKSTACK_HOST"] = "host-a", "host-b"
        url = a.env["DATABASE_URL"]
        writer_a = a.start_writer()
        b.start_writer()
        log_a, log_b = a.home / "log" / "monitor-a.log", b.home / "log" / "monitor-b.log"
        monitor_a = a.start_worker("workers.monitor", log_a)
        wait_for("host A's monitor to lead", lambda: "monitor: leading" in log_a.read_text(), timeout=60)
        monitor_b = b.start_worker("workers.monitor", log_b)
        wait_for("host B's monitor to stand by", lambda: "standing by" in log_b.read_text(), timeout=60)
        # The jobs' leader asks again at every due job of the leader's: a checkpoint check each second.
        jobs_log_a, jobs_log_b = a.home / "log" / "jobs-a.log", b.home / "log" / "jobs-b.log"
        jobs_a = a.start_worker("workers.jobs", jobs_log_a, TICKSTACK_CHECKPOINT_EVERY_S="1")
        wait_for("host A's jobs to lead", lambda: "jobs: leading" in jobs_log_a.read_text(), timeout=60)
        jobs_b = b.start_worker("workers.jobs", jobs_log_b, TICKSTACK_CHECKPOINT_EVERY_S="1")
        wait_for("host B's jobs to stand by", lambda: "standing by for the database's jobs" in jobs_log_b.read_text(),
                 timeout=60)
        assert a.stop(writer_a) == 0  # host A's writer stops; its monitor and jobs run on

        wait_for("host B's monitor to lead", lambda: "monitor: leading" in log_b.read_text(), timeout=150)
        assert (leader_of(url, "monitor") or "").endswith("on host-b"), leader_of(url, "monitor")
        assert monitor_a.wait(30) == 1, log_a.read_text()
        assert "host-a's writer has not answered" in log_a.read_text(), log_a.read_text()
        wait_for("host B's jobs to lead", lambda: "jobs: leading" in jobs_log_b.read_text(), timeout=60)
        assert (leader_of(url, "jobs") or "").endswith("on host-b"), leader_of(url, "jobs")
        assert "host-a's writer has not answered" in jobs_log_a.read_text(), jobs_log_a.read_text()
        assert jobs_a.poll() is None and jobs_b.poll() is None, jobs_log_a.read_text()[-2000:]
        # Stops are enforced again: a trade opened through host B's writer is closed at its stop.
        with WriterClient(settings=b.settings, deadline=30) as client:
            client.call("insert_ticks", ticks=[{"symbol": "AAA", "ts": 1_704_067_200_000, "bid": 100.0,
                                                "ask": 100.5, "source": "m", "seq": 1}])
            trade = client.call("open_trade", symbol="AAA", side="buy", size=1.0, entry_price=100.0,
                                stop_loss=95.0)["id"]
            client.call("insert_ticks", ticks=[{"symbol": "AAA", "ts": 1_704_067_201_000, "bid": 90.0,
                                                "ask": 90.5, "source": "m", "seq": 2}])
        wait_for("host B's monitor to close the trade at its stop",
                 lambda: query(b.settings, "SELECT status FROM trades WHERE id = ?", (trade,))[0][0] == "closed",
                 timeout=60)
        assert monitor_b.poll() is None, log_b.read_text()


class SkewedClock:
    """The ``time`` module as a host whose wall clock is ``by`` seconds off sees it (the monotonic
    clock is not a wall clock, and stays)."""

    def __init__(self, by: float) -> None:
        self.by = by

    def time(self) -> float:
        return time.time() + self.by

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@contextmanager
def leading_jobs_worker(settings: Settings, **options: Any) -> Iterator[JobsWorker]:
    """A jobs worker of this process, set up and leading; torn down after (its leadership ends with it)."""
    from workers.jobs import JobsWorker

    host = JobsWorker(settings, **options)
    host.setup()
    try:
        assert host.leads()
        yield host
    finally:
        host.teardown()


def test_a_jobs_leader_whose_clock_is_behind_does_not_run_again_what_the_last_leader_just_ran(
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Host A's jobs worker leads and runs quick_check; host A goes, and host B's, whose clock is ten
    minutes slow, takes over. It went by its own clock: host A's run a moment before was dated more
    than CLOCK_SLACK_S after its now, taken for a clock set back since, and left out, so host B ran
    retention, the backup and quick_check again at once, and at each change of leader between hosts
    whose clocks differ so. On PostgreSQL the jobs go by the server's clock (read once a minute)."""
    from workers import jobs

    stack = stack_on("postgresql", request)
    try:
        stack.start_writer()
        with leading_jobs_worker(stack.settings) as host_a:
            assert host_a.run_job("quick_check") is True
        monkeypatch.setattr(jobs, "time", SkewedClock(-600.0))
        host_b = jobs.JobsWorker(stack.settings)
        host_b.setup()
        try:
            due = host_b.due()
            assert host_b.leadership.held, "host B should have taken the lead"
            assert "quick_check" not in due, (due, host_b.last_run)
        finally:
            host_b.teardown()
    finally:
        stack.close()


def ticks_across_the_window(stack: Stack) -> tuple[int, int]:
    """Two ticks by this host's clock: one 12 hours outside the retention window, one 3 hours inside."""
    now = int(time.time() * 1000)
    window = round(stack.settings.retention_days * 86_400_000)
    outside, inside = now - window - 12 * 3_600_000, now - window + 3 * 3_600_000
    with WriterClient(settings=stack.settings) as client:
        client.call("insert_ticks", ticks=[{"symbol": "RTUSD", "ts": ts, "bid": 1.0, "ask": 1.1, "source": "rt",
                                            "seq": seq} for seq, ts in enumerate((outside, inside))])
    return outside, inside


def kept_ticks(stack: Stack) -> list[int]:
    return [ts for (ts,) in query(stack.settings, "SELECT ts FROM ticks WHERE symbol = 'RTUSD' ORDER BY ts")]


def skew_this_hosts_clock(monkeypatch: pytest.MonkeyPatch, by: float) -> SkewedClock:
    """This host's wall clock ``by`` seconds off, as the jobs worker and ``db.models.now_ms`` read it."""
    from db import models
    from workers import jobs

    skewed = SkewedClock(by)
    monkeypatch.setattr(jobs, "time", skewed)
    monkeypatch.setattr(models, "time", skewed)
    return skewed


def test_a_jobs_leader_whose_clock_is_hours_fast_deletes_no_tick_inside_the_retention_window(
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention deleted the ticks older than now less TICKSTACK_RETENTION_DAYS by the leader's own
    clock, which on several hosts may be hours off the others' (the schedule went by the server's
    since 14d3edd, this not): a leader whose clock was six hours fast deleted six hours of ticks still
    inside the window, too few to be held back (workers.retention_cutoff holds back a day or more).
    On PostgreSQL its now is the server's, as the schedule's."""
    stack = stack_on("postgresql", request)
    try:
        stack.start_writer()
        outside, inside = ticks_across_the_window(stack)
        skew_this_hosts_clock(monkeypatch, 6 * 3600.0)
        with leading_jobs_worker(stack.settings) as host:
            assert host.run_job("retention") is True
        assert kept_ticks(stack) == [inside], (outside, inside)
    finally:
        stack.close()


def test_retention_goes_by_the_servers_clock_read_now_not_as_last_read_after_this_hosts_clock_stepped(
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """JobsWorker.now keeps the server's clock as last read when the server does not answer its read
    (db.server_clock.ServerClock.read(None)), and then trusts it a minute: this host's clock set six
    hours forward just as the read went unanswered made the server's 'as last read' six hours fast,
    and a retention run in that minute, the server answering again, deleted six hours of ticks still
    inside the window (a review). Retention reads the server's clock on the connection it reads the
    oldest tick with: a server that answers that answers its clock too."""
    stack = stack_on("postgresql", request)
    try:
        stack.start_writer()
        outside, inside = ticks_across_the_window(stack)
        skewed = skew_this_hosts_clock(monkeypatch, 0.0)
        with leading_jobs_worker(stack.settings, only="retention") as host:  # its setup read the server's clock
            skewed.by = 6 * 3600.0  # this host's clock set forward, and the server's read then went unanswered
            host._server_clock.read(None)  # what JobsWorker.now does on an OperationalError
            assert host.run_job("retention") is True
        assert kept_ticks(stack) == [inside], (outside, inside)
    finally:
        stack.close()


def test_the_servers_clock_as_last_read_is_not_moved_by_a_step_of_this_hosts_clock(
        request: pytest.FixtureRequest) -> None:
    """ServerClock.read(None) (the server did not answer: JobsWorker.now's schedule goes on 'as last
    read') kept the offset last read from this host's wall clock, so a step of that clock (what made
    the read happen: db.server_clock.STRAY_MS) moved the 'server's' clock with it, six hours for a host
    set six hours forward, for a minute (a review). It goes on from the server's clock as last read,
    by the monotonic clock."""
    from db.server_clock import ServerClock, server_now_ms

    stack = stack_on("postgresql", request)
    try:
        skewed = SkewedClock(0.0)
        clock = ServerClock(skewed.time)
        engine = create_engine(stack.settings.database_url)
        try:
            with engine.connect() as conn:
                clock.read(conn)
                skewed.by = 6 * 3600.0
                assert clock.stale()  # this host's clock strayed: read again, and the server does not answer
                clock.read(None)
                assert abs(clock.now_ms() - server_now_ms(conn)) < 5_000, clock.now_ms() - server_now_ms(conn)
        finally:
            engine.dispose()
    finally:
        stack.close()
