"""The console's "Slowest reads" (issue 12: PgHero's second page), on a real writer, the API served
by gunicorn as circus serves it (two worker processes) and the console through Flask's test client.

A read made slow deterministically (a page of many ticks) by the API is timed in the API worker's
read engine, written to that worker's private file under ``run/slow-reads`` and shown on the
Database page as the API's, with its text and without any value the request carried. A file left by
a process that is gone is not shown and is deleted. No wall-clock time is asserted.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from db import slowreads
from db.client import WriterClient
from testkit.env import ROOT
from testkit.gunicorn import get_json, serving
from testkit.helpers import wait_for
from testkit.writer import Stack
from tests.test_console_database_page import Console, text_of
from webapp import create_app

SYMBOL = "SLOWQX"  # a value the request carries: it must not reach the page nor a file
TICKS = 6000


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    st = Stack.create()
    try:
        st.start_writer()
        now = int(time.time() * 1000)
        with WriterClient(settings=st.settings, deadline=30) as client:
            for start in range(0, TICKS, 2000):
                client.call("insert_ticks", ticks=[
                    {"symbol": SYMBOL, "ts": now - 10 * i, "bid": 1.08231 + i * 1e-5, "ask": 1.08241 + i * 1e-5,
                     "source": "t", "seq": i} for i in range(start, start + 2000)])
        yield st
    finally:
        st.close()


def slow_section(page_text: str) -> str:
    return page_text.split("data-slow-reads", 1)[1].split("</table>", 1)[0]


def test_a_slow_api_read_is_shown_on_the_database_page_without_its_values(stack: Stack) -> None:
    since = int(time.time() * 1000) - 10 * TICKS - 5000
    with serving(stack.env, "api") as api:
        status, body = get_json(api.port, f"/api/ticks?symbol={SYMBOL}&since={since}&limit=5000", timeout=30)
        assert status == 200 and len(body["ticks"]) == 5000
        folder = stack.settings.run_dir / slowreads.FOLDER
        console = Console(create_app("console", stack.settings))
        console.login()

        def api_rows() -> str | None:
            # The API's reads alone: the console's own reads (its row counts) may outrank them.
            section = slow_section(console.get("/console/database?reads_of=api").text)
            return section if "FROM ticks" in section else None
        section = wait_for("the API's reads on the page", api_rows, timeout=30)
        rows = re.findall(r'<tr data-slow-read="(\w+)">(.*?)</tr>', section, re.S)
        tick_reads = [body for kind, body in rows if kind == "api" and "FROM ticks" in body]
        assert tick_reads, section
        sql = text_of(type("P", (), {"text": re.search(r'data-field="sql">(.*?)</code>', tick_reads[0], re.S)
                                     .group(1)}))
        assert re.search(r"WHERE ticks\.symbol = \?(::VARCHAR)? AND", sql), sql  # PostgreSQL's with its cast
        assert int(re.search(r'data-field="count">([\d,]+)<', tick_reads[0]).group(1).replace(",", "")) >= 1
        assert re.search(r'data-field="max_ms">[\d.,]+ ms<', tick_reads[0])
        # Neither the symbol nor the times the request carried, on the page or in a file.
        page = console.get("/console/database?reads_of=api").text
        assert 'data-slow-read="pytest"' not in slow_section(page)
        assert SYMBOL not in slow_section(page) and str(since) not in slow_section(page)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        files = list(folder.glob("*.json"))
        assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
        for f in files:
            text = f.read_text()
            assert SYMBOL not in text and str(since) not in text
        kinds = {json.loads(f.read_text())["kind"] for f in files}
        assert "api" in kinds
        # Ordered by total time on request; the API's tick read is still there.
        assert "FROM ticks" in slow_section(console.get("/console/database?slow=total&reads_of=api").text)
        # A value the page does not take is refused, saying which, as every other parameter's: it was
        # served with the defaults (slow=foo, reads_of=%00).
        for query, said in (("slow=foo", "slow: 'foo' is not an order of the slowest reads; max or total"),
                            ("reads_of=%00", "reads_of: '\\x00' is not a kind of process")):
            r = console.get(f"/console/database?{query}")
            assert r.status_code == 400 and said in html.unescape(r.text), (query, r.status_code, r.text[-500:])
        # Any program's name is a kind the page may link to, in any script.
        assert console.get("/console/database?reads_of=rapport_donn%C3%A9es.py").status_code == 200


def test_the_file_of_a_process_that_is_gone_is_ignored_and_removed(stack: Stack) -> None:
    folder = stack.settings.run_dir / slowreads.FOLDER
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    dead = int(done.stdout)
    stale = folder / f"{dead}.json"
    fd = os.open(stale, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": dead, "started": 1.0, "kind": "ghost", "updated_ms": 0,
                   "statements": [{"sql": "SELECT ghost", "count": 1, "total_ms": 9e9, "max_ms": 9e9}]}, f)
    console = Console(create_app("console", stack.settings))
    console.login()
    section = slow_section(console.get("/console/database").text)
    assert "ghost" not in section.lower()
    assert not stale.exists()


def test_the_record_is_bounded_and_values_are_left_out() -> None:
    assert slowreads.normalise("SELECT a FROM t WHERE s = 'x''y' AND ts > 17 AND v IN (?, ?, ?) LIMIT %(p_1)s") == (
        "SELECT a FROM t WHERE s = ? AND ts > ? AND v IN (?, ...) LIMIT ?")
    assert slowreads.normalise("SELECT anon_1.ts, t2.x FROM t2") == "SELECT anon_1.ts, t2.x FROM t2"
    rec = slowreads.Recorder(ROOT / "nonexistent-never-written", kind="test")
    rec.last_flush = time.monotonic() + 3600  # no flush: only the bound is under test
    rec.timer = object()  # type: ignore[assignment]  # nor a timer
    for i in range(slowreads.KEEP * 5):
        rec.record(f"SELECT c{'x' * (i % 7)} FROM t{chr(97 + i % 26)}{i}", float(i))
    assert len(rec.stats) <= 2 * slowreads.KEEP
    assert f"SELECT c{'x' * ((slowreads.KEEP * 5 - 1) % 7)} FROM t" in next(
        k for k, v in rec.stats.items() if v[2] == slowreads.KEEP * 5 - 1)


def test_a_flush_returns_only_when_a_write_the_timer_began_is_on_disk(tmp_path: Path) -> None:
    """The first statement starts a flush timer with no delay; a flush called meanwhile (the one at
    exit, where the daemon timer thread is then killed) found nothing dirty and returned while the
    timer thread was still writing: the record was lost at exit, and a test looking just after its
    own flush could find no file."""
    began = threading.Event()

    class SlowToWrite(slowreads.Recorder):
        def snapshot(self) -> dict:
            if threading.current_thread() is not threading.main_thread():
                began.set()
                time.sleep(0.5)  # the timer thread's write, caught in the middle
            return super().snapshot()

    (tmp_path / "run").mkdir(mode=0o700)
    rec = SlowToWrite(tmp_path / "run" / slowreads.FOLDER, kind="test")
    rec.record("SELECT 1", 5.0)
    assert began.wait(10), "the first statement started no flush timer"
    rec.flush()
    assert (tmp_path / "run" / slowreads.FOLDER / f"{os.getpid()}.json").exists()


def test_a_record_whose_home_is_gone_is_dropped_not_written_into_a_new_folder(tmp_path: Path) -> None:
    """A process may flush its record (at exit, or from its timer) after its home was removed (a
    test's temporary home, an operator's cleanup). It must not create the home's folders again: they
    would be left behind, and not private (only the last folder of a ``mkdir -p`` gets the mode)."""
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True, mode=0o700)
    rec = slowreads.Recorder(home / "run" / slowreads.FOLDER, kind="test")
    rec.record("SELECT 1", 5.0)
    rec.flush()
    written = home / "run" / slowreads.FOLDER / f"{os.getpid()}.json"
    assert written.exists() and stat.S_IMODE(written.parent.stat().st_mode) == 0o700
    shutil.rmtree(home)
    rec.record("SELECT 2", 6.0)
    rec.flush()
    assert not home.exists(), sorted(str(p) for p in home.rglob("*"))


def test_a_home_removed_with_remove_home_is_not_written_into_again_by_a_pending_flush(tmp_path: Path) -> None:
    """A test's home left behind in a fresh clone's run, holding only ``run/slow-reads/<pid>.json``:
    the test process had read there in-process (a console's database page, its doctor findings),
    and the record's timer wrote up to 3 s later, making the folder again while the home was being
    removed. ``testkit.env.remove_home`` forgets this process's recorder first (``slowreads.forget``:
    its timer cancelled, nothing more written), then removes the home."""
    from testkit.env import remove_home

    home = tmp_path / "home"
    (home / "run").mkdir(parents=True, mode=0o700)
    rec = slowreads.recorder(home / "run" / slowreads.FOLDER)
    rec.last_flush = time.perf_counter()  # the first write FLUSH_EVERY_S from now, by the timer
    rec.record("SELECT 1", 5.0)
    assert rec.timer is not None
    slowreads.forget(home / "run")
    time.sleep(slowreads.FLUSH_EVERY_S + 0.5)  # past the timer's time: nothing was written
    assert not (home / "run" / slowreads.FOLDER).exists()
    assert slowreads.recorder(home / "run" / slowreads.FOLDER) is not rec  # forgotten: a new one if read again
    slowreads.forget(home / "run")
    remove_home(home)
    assert not home.exists()
