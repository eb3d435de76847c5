"""Restart counts that do not mix restarts with scaling (issue 12): on the real stack under circusd
(:class:`testkit.circus.CircusStack`, sampled every second by the jobs worker), a process killed
(by its pid) and replaced by circus counts 1 restart of its watcher; adding a process (incr) and
removing one (decr) count none. The Watchers page and the watcher's page show the count and say
what is counted. Counts are read after samples taken after each event, never by wall-clock time.
"""
from __future__ import annotations

import html
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from supervision.procstats import ProcessMeter, _process, create_time_lag
from supervision.sampler import Sampler
from testkit.circus import CircusStack
from testkit.helpers import query, wait_for
from tests.test_console_watcher_page import Console, gone
from webapp import create_app

#: The tests of this module whose promise is the same whatever the database (tests/conftest.py).
DATABASE_INDEPENDENT = pytest.mark.database_independent(
    "the restart rule is applied to samples made in memory here, and nothing is stored")

WATCHER = "monitor"


@pytest.fixture(scope="module")
def cstack() -> Iterator[CircusStack]:
    stack = CircusStack(TICKSTACK_SAMPLE_EVERY_S="1")
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def console(cstack: CircusStack) -> Console:
    return Console.logged_in(create_app("console", cstack.settings))


def restarts(cstack: CircusStack, name: str) -> int:
    return int(query(cstack.settings, "SELECT coalesce(sum(value), 0) FROM samples WHERE name = 'watcher.restarts' "
                                      "AND labels = ?", (name,))[0][0])


def settled(cstack: CircusStack, name: str, processes: int) -> None:
    """Wait until two samples taken from now on see ``name`` with ``processes`` processes: whatever
    happened before is counted by then."""
    since = int(time.time() * 1000)
    wait_for(f"two samples of {name} with {processes} processes", lambda: query(
        cstack.settings, "SELECT count(*) FROM samples WHERE name = 'watcher.processes' AND labels = ? AND ts > ? "
                         "AND value = ?", (name, since, processes))[0][0] >= 2, timeout=90)


def test_a_killed_process_counts_one_restart(console: Console, cstack: CircusStack) -> None:
    (old,) = wait_for("one monitor process", lambda: cstack.pids_of(WATCHER) or None, timeout=60)
    settled(cstack, WATCHER, 1)
    before = restarts(cstack, WATCHER)
    os.kill(old, signal.SIGKILL)
    wait_for("the killed process to end", lambda: gone(old), timeout=30)
    wait_for("circus to replace it", lambda: [p for p in cstack.pids_of(WATCHER) if p != old] or None, timeout=60)
    settled(cstack, WATCHER, 1)
    assert restarts(cstack, WATCHER) == before + 1
    listing = console.get("/console/watchers")
    row = listing.text.split(f'data-watcher="{WATCHER}"', 1)[1].split("</tr>", 1)[0]
    assert f'data-field="restarts">{before + 1}<' in row
    words = html.unescape(listing.text)
    assert "+1/−1 process and a stop then start are not restarts" in words
    page = html.unescape(console.get(f"/console/watchers/{WATCHER}").text)
    assert f'data-field="restarts">{before + 1}<' in page
    assert "processes replaced after they died or were restarted; +1/−1 and stop/start not counted" in page


def test_a_resumed_sampler_knows_when_the_stacks_circusd_started(cstack: CircusStack) -> None:
    """What the resume rule compares the last stored sample with (see the next tests): circusd's
    start, on the wall clock (psutil's create time alone read up to a second before it)."""
    from db.engine import make_read_engine

    sampler = Sampler(cstack.settings)
    engine = make_read_engine(cstack.settings)
    try:
        with engine.connect() as conn:
            sampler.resume(conn)
    finally:
        engine.dispose()
    assert cstack.proc is not None and cstack.started_at is not None and sampler.circusd_started_ms is not None
    assert cstack.started_at - 0.02 <= sampler.circusd_started_ms / 1000 <= time.time()
    assert sampler.circusd_started_ms >= int(psutil.Process(cstack.proc.pid).create_time() * 1000)


def test_incr_and_decr_count_no_restart(console: Console, cstack: CircusStack) -> None:
    settled(cstack, WATCHER, 1)
    before = restarts(cstack, WATCHER)
    r = console.post(f"/console/watchers/{WATCHER}/incr")
    assert r.status_code == 303
    wait_for("two monitor processes", lambda: len(cstack.pids_of(WATCHER)) == 2, timeout=60)
    settled(cstack, WATCHER, 2)
    assert restarts(cstack, WATCHER) == before
    r = console.post(f"/console/watchers/{WATCHER}/decr")
    assert r.status_code == 303
    wait_for("one monitor process", lambda: len(cstack.pids_of(WATCHER)) == 1, timeout=60)
    settled(cstack, WATCHER, 1)
    assert restarts(cstack, WATCHER) == before


def test_a_stop_then_start_counts_none_and_a_restart_counts_each_process(console: Console, cstack: CircusStack
                                                                         ) -> None:
    settled(cstack, WATCHER, 1)
    before = restarts(cstack, WATCHER)
    r = console.post(f"/console/watchers/{WATCHER}/stop", {"confirm": "yes"})
    assert r.status_code == 303
    settled(cstack, WATCHER, 0)  # samples saw it stopped
    r = console.post(f"/console/watchers/{WATCHER}/start")
    assert r.status_code == 303
    settled(cstack, WATCHER, 1)
    assert restarts(cstack, WATCHER) == before
    (old,) = cstack.pids_of(WATCHER)
    r = console.post(f"/console/watchers/{WATCHER}/restart")
    assert r.status_code == 303 and cstack.pids_of(WATCHER) != [old]
    settled(cstack, WATCHER, 1)
    assert restarts(cstack, WATCHER) == before + 1


def watcher_row(name: str, status: str, pids: set[int], listed: int | None = None) -> dict:
    """A row as collect_watchers gives it: processes read (all created at 1.0), and how many
    circus lists (more when one of them ended before it was read)."""
    return {"name": name, "status": status, "numprocesses": len(pids) if listed is None else listed,
            "processes": [{"pid": p, "create_time": 1.0} for p in sorted(pids)]}


@DATABASE_INDEPENDENT
def test_the_rule_over_samples_that_fall_inside_a_restart_or_a_scaling() -> None:
    """The counting rule alone, sample after sample: (status, asked-for, pids read[, processes
    circus lists: more when one of them ended before it was read]) -> restarts."""
    sampler = Sampler.__new__(Sampler)
    sampler.previous_procs, sampler.previous_wanted, sampler.gone = None, {}, {}
    sampler.previous_watchers_ms, sampler.previous_counts = None, {}

    def run(*steps: tuple) -> list[int]:
        sampler.previous_procs, sampler.previous_wanted, sampler.gone = None, {}, {}
        sampler.previous_watchers_ms = None
        return [sampler.restarts([watcher_row("w", status, pids, *listed)], {"w": asked}, 0)["w"]
                for status, asked, pids, *listed in steps]
    # circus too busy to say how many processes it wants, for one sample (a console restart or
    # stop runs): not a scaling; a crash replaced then, and a restart seen half-way, count.
    assert run(("active", 1, {1}), ("active", None, {2}), ("active", 1, {2})) == [0, 1, 0]
    assert run(("active", 2, {1, 2}), ("stopping", None, {2}), ("active", 2, {3, 4})) == [0, 0, 2]
    # Not known at the first sample, known at the next: no scaling either.
    assert run(("active", None, {1}), ("active", 1, {2})) == [0, 1]
    # A watcher added (reloadconfig) where one of its name was removed with a process gone: no restart.
    sampler.previous_procs, sampler.previous_wanted, sampler.gone = {"other": set()}, {}, {"w": 1}
    assert sampler._replaced("w", {(5, 1.0)}, 1, "active", 1) == 0
    # A restart seen half-way as circus's listing of a process that has ended, once with the count
    # asked for unknown (circus did not say), once at the first sample: one restart each.
    assert run(("active", None, {1}), ("active", None, set(), 1), ("active", None, {2})) == [0, 0, 1]
    assert run(("active", 1, set(), 1), ("active", 1, {2})) == [0, 1]
    # A restart of two processes seen half-way (stopping, one left), then active with two new ones.
    assert run(("active", 2, {1, 2}), ("stopping", 2, {2}), ("active", 2, {3, 4})) == [0, 0, 2]
    # A crash replaced within one interval.
    assert run(("active", 1, {1}), ("active", 1, {2})) == [0, 1]
    # incr, then decr (its process gone a sample later), then incr again: never a restart.
    assert run(("active", 1, {1}), ("active", 2, {1}), ("active", 2, {1, 2}), ("active", 1, {1, 2}),
               ("active", 1, {1}), ("active", 2, {1, 3})) == [0, 0, 0, 0, 0, 0]
    # A stop seen stopped, then a start.
    assert run(("active", 1, {1}), ("stopping", 1, set()), ("stopped", 1, set()), ("active", 1, {2})) == [0, 0, 0, 0]


@DATABASE_INDEPENDENT
def test_a_restart_of_the_jobs_worker_itself_is_counted(console: Console, cstack: CircusStack) -> None:
    """The jobs worker samples the watchers; a new one counts its own start as a restart when its
    process began after the last stored sample. psutil's create times read up to a second early
    (its boot time is whole seconds), so a jobs worker restarted within a second of a sample seemed
    to predate it and went uncounted (after "Restart all", jobs showed 0 restarts and the others 1: a
    new user's run, round 40; with a sample a second, as here, every time)."""
    settled(cstack, "jobs", 1)
    before, old = restarts(cstack, "jobs"), cstack.pids_of("jobs")
    assert console.post("/console/watchers/jobs/restart").status_code == 303
    assert cstack.pids_of("jobs") != old
    settled(cstack, "jobs", 1)
    assert restarts(cstack, "jobs") == before + 1


@DATABASE_INDEPENDENT
def test_create_times_corrected_by_their_lag_are_not_before_the_process_began() -> None:
    """psutil's create time plus :func:`create_time_lag` is not earlier than a clock read before the
    process was started (psutil's alone was, by up to a second)."""
    began = time.time()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        created = psutil.Process(proc.pid).create_time() + create_time_lag()
        assert began - 0.02 <= created <= time.time(), (began, created)  # the kernel's clock ticks are 10 ms
    finally:
        proc.kill()
        proc.wait()


def test_the_first_sample_after_the_jobs_worker_restarts_counts_from_the_last_stored_one() -> None:
    """The resume rule (no previous sample in memory, the last stored one ``since``): processes
    created since then are replacements, if the watcher still lists as many as that sample stored;
    a listed one that has already ended is gone, and its replacement counts at the next sample."""
    sampler = Sampler.__new__(Sampler)
    since_s = 1_000.0
    old_a, old_b, new = (11, since_s - 50), (12, since_s - 50), (13, since_s + 5)

    def resume(*steps: tuple[list, int], circusd_started_s: float = since_s - 3600) -> list[int]:
        sampler.previous_procs, sampler.previous_wanted, sampler.gone = None, {}, {}
        sampler.previous_watchers_ms, sampler.previous_counts = int(since_s * 1000), {"w": 2}
        sampler.circusd_started_ms = int(circusd_started_s * 1000)
        rows = ({"name": "w", "status": "active", "numprocesses": listed,
                 "processes": [{"pid": pid, "create_time": created} for pid, created in procs]}
                for procs, listed in steps)
        return [sampler.restarts([row], {"w": 2}, int(since_s * 1000) + 10_000)["w"] for row in rows]
    assert resume(([old_a, new], 2)) == [1]  # replaced while the jobs worker was away
    assert resume(([old_a], 2), ([old_a, new], 2)) == [0, 1]  # half-way at the first sample
    assert resume(([old_a, old_b], 2), ([old_a, old_b], 2)) == [0, 0]
    assert resume(([old_a, new], 3)) == [0]  # scaled since: not told from an incr
    # The whole stack stopped and started since (`circusctl quit`, `make run`): its circusd is new,
    # and so is every process, none a replacement; each watcher counted one restart per start (a new
    # user's run of the README, round 37).
    new_b = (14, since_s + 5)
    assert resume(([new, new_b], 2)) == [2]
    assert resume(([new, new_b], 2), circusd_started_s=since_s + 4) == [0]


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


class OneProcessWatcher:
    """Samples of a one-process watcher as the jobs worker takes them, from circus's listing of a
    process (``info``, the shape of a ``stats`` answer) and psutil's measure of it; and real
    processes to list, stopped by pid at the end."""

    def __init__(self) -> None:
        self.sampler = Sampler.__new__(Sampler)
        self.sampler.previous_procs, self.sampler.previous_wanted, self.sampler.gone = {}, {}, {}
        self.meter = ProcessMeter()
        self.counts: list[int] = []
        self.identities: list[set] = []
        self.procs: list[subprocess.Popen] = []

    def start(self) -> tuple[subprocess.Popen, dict]:
        """A new process, and circus's listing of it: its own clock read before the fork, no
        create time (circusd's, when a test adds it)."""
        started = time.time()
        self.procs.append(_sleeper())
        return self.procs[-1], {"pid": self.procs[-1].pid, "started": started, "cpu": 0.0, "mem_info1": "1M"}

    def sample(self, info: dict, meter: ProcessMeter | None = None) -> dict:
        measured = _process(info, meter or self.meter)
        row = {"name": "w", "status": "active", "numprocesses": 1, "processes": [measured]}
        self.counts.append(self.sampler.restarts([row], {"w": 1}, 0)["w"])
        self.identities.append(self.sampler.previous_procs["w"])
        return measured

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def _ended_after_listing(keep: str) -> OneProcessWatcher:
    """A restart sampled half-way: circus still lists the old process, which has ended by the time
    psutil measures it; the next sample sees the new one. ``keep``: what the jobs worker still has
    of the old process's create time at the middle sample: "ours" (it measured it before), "circusd"
    (a fresh measurer, as after its own restart, and circus's answer with circusd's create time),
    or "none" (a fresh measurer, and no create time in circus's answer)."""
    watcher = OneProcessWatcher()
    try:
        old, listed = watcher.start()
        assert watcher.sample(listed)["started"] == psutil.Process(old.pid).create_time()
        if keep == "circusd":
            listed["create_time"] = psutil.Process(old.pid).create_time()  # as circusd's psutil reads it
        old.kill()
        old.wait()
        ended = watcher.sample(listed, meter=None if keep == "ours" else ProcessMeter())
        assert ended["started"] == listed["started"]  # psutil could not read it: circus's numbers
        new, listed_new = watcher.start()
        watcher.sample(listed_new)
    finally:
        watcher.close()
    return watcher


@DATABASE_INDEPENDENT
def test_a_process_that_ended_after_circus_listed_it_keeps_the_create_time_read_before() -> None:
    """circus's own start time (its clock, read before it forked) is not psutil's (the boot time in
    whole seconds plus the kernel's ticks; here 0.3 to 0.5 s apart): with it, the old process would
    read as gone and new at once, two restarts. Ours or circusd's create time keeps its identity."""
    for keep in ("ours", "circusd"):
        watcher = _ended_after_listing(keep)
        assert watcher.identities[1] == watcher.identities[0], keep
        assert watcher.counts == [0, 0, 1], keep


@DATABASE_INDEPENDENT
def test_a_process_that_ended_after_circus_listed_it_with_no_create_time_counts_as_gone() -> None:
    """With no create time anywhere, the ended process is left out: gone at the middle sample, its
    replacement one restart at the next."""
    watcher = _ended_after_listing("none")
    assert watcher.identities[1] == set() and watcher.sampler.gone == {"w": 0}
    assert watcher.counts == [0, 0, 1]
