"""The console's Database page in plain words (issue 12, part B): job runs as a readable table with
absolute UTC times and what each run did, checkpoint results that say what was copied and what the
WAL went from and to, and each table's rows and size.

A real writer (:class:`testkit.writer.Stack`), the real jobs worker run once per job
(``python -m workers.jobs --run JOB``, as an operator would) and the console app on them through
Flask's test client, CSRF on as in production.
"""
from __future__ import annotations

import dataclasses
import html
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from db.backups import backup_suffix, list_backups
from db.client import WriterClient
from testkit.env import ROOT
from testkit.helpers import ConsoleClient, query
from testkit.writer import Stack
from webapp import create_app
from webapp.console.dbwords import checkpoint_words, job_words

TICKS = 120


Console = ConsoleClient  # the name the tests (and their importers) use


def text_of(page: Any) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page.text)))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    st = Stack.create()
    try:
        st.start_writer()
        now = int(time.time() * 1000)
        with WriterClient(settings=st.settings, deadline=20) as client:
            client.call("insert_ticks", ticks=[
                {"symbol": "BTCUSD", "ts": now - 1000 * i, "bid": 100.0 + i, "ask": 100.5 + i, "source": "t", "seq": i}
                for i in range(TICKS)])
        for job in ("retention", "backup", "quick_check", "checkpoint"):
            done = subprocess.run([sys.executable, "-m", "workers.jobs", "--run", job], env=st.env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (job, done.stderr[-2000:])
        yield st
    finally:
        st.close()


@pytest.fixture(scope="module")
def console(stack: Stack) -> Console:
    return Console.logged_in(create_app("console", stack.settings))


def test_job_runs_read_as_sentences_with_absolute_utc_times(console: Console, stack: Stack) -> None:
    page = console.get("/console/database")
    assert page.status_code == 200
    runs = page.text.split("data-job-runs", 1)[1].split("</table>", 1)[0]
    text = text_of(type("P", (), {"text": runs}))
    assert re.search(r"retention .*deleted 0 ticks older than \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC in 1 call", text)
    if stack.settings.database_path is not None:
        assert re.search(r"backup .*wrote tickstack-\S+\.db \(\d", text)
        assert re.search(r"quick_check .*integrity ok \(quick_check in \d+ ms\)", text)
        assert re.search(r"checkpoint .*TRUNCATE: (every page of the WAL copied into the database and the WAL "
                         r"emptied \(the WAL went from [\d.]+ \w+ to 0 B\)|nothing to copy, the WAL was already "
                         r"empty)", text), text
    else:  # pg_dump; amcheck; no checkpoint
        assert re.search(r"backup .*wrote tickstack-\S+\.dump \(\d", text)
        assert re.search(r"quick_check .*integrity ok \(amcheck of \d+ indexes in \d+ ms\)", text), text
        assert "checkpoint" not in text
    assert '"deleted":' not in text.split("raw", 1)[0]  # the JSON is there only under "raw"
    # Started and finished are absolute UTC; started has the relative time beside it.
    jobs = 4 if stack.settings.database_path is not None else 3
    assert len(re.findall(r"<time datetime=\"[\dT:-]+Z\">\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</time>", runs)) >= jobs
    assert len(re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", runs)) >= 2 * jobs


@pytest.mark.sqlite_only("tests/test_console.py::test_database_page_and_buttons_are_audited")
def test_a_checkpoint_from_the_console_says_what_it_did(console: Console, stack: Stack) -> None:
    with WriterClient(settings=stack.settings, deadline=20) as client:  # something in the WAL
        client.call("audit", actor="test", action="fill", target="wal", result="ok", detail="x" * 2000)
    r = console.post("/console/database/checkpoint")
    assert r.status_code == 303
    page = console.get("/console/database")
    flash = re.search(r'class="flash flash-ok"[^>]*>([^<]*)<', page.text).group(1)
    assert re.fullmatch(r"Checkpoint done: TRUNCATE: (every page of the WAL copied into the database and the WAL "
                        r"emptied \(the WAL went from [\d.]+ \w+ to 0 B\)|nothing to copy, the WAL was already "
                        r"empty)\.", html.unescape(flash)), flash
    assert "0 of 0 pages" not in page.text


def test_tables_show_their_rows_and_size(console: Console, stack: Stack) -> None:
    page = console.get("/console/database")
    tables = page.text.split("data-tables", 1)[1].split("</table>", 1)[0]
    rows = dict(re.findall(r'data-table="(\w+)">.*?data-field="rows">([\d,]+)<', tables, re.S))
    assert int(rows["ticks"].replace(",", "")) == query(stack.settings, "SELECT count(*) FROM ticks")[0][0] == TICKS
    assert int(rows["job_runs"].replace(",", "")) >= (4 if stack.settings.database_path is not None else 3)
    sizes = dict(re.findall(r'data-table="(\w+)">.*?data-field="bytes">([^<]+)<', tables, re.S))
    assert re.fullmatch(r"[\d.]+ (KiB|MiB)", sizes["ticks"]), sizes


def test_words_for_results_seen_in_the_wild() -> None:
    assert checkpoint_words({"mode": "TRUNCATE", "busy": 0, "log": 0, "checkpointed": 0, "wal_before": 0,
                             "wal_after": 0}) == "TRUNCATE: nothing to copy, the WAL was already empty"
    assert checkpoint_words({"mode": "PASSIVE", "busy": 0, "log": 300, "checkpointed": 250}) == (
        "PASSIVE: 250 pages of the WAL's 300 copied into the database (50 wait for readers to move on)")
    assert "partial: a reader held part of the WAL back (10 pages of 40 copied)" in checkpoint_words(
        {"mode": "TRUNCATE", "busy": 1, "log": 40, "checkpointed": 10})
    assert job_words("retention", True, '{"deleted": 1, "calls": 2, "before_ts": 0, "more": true}') == (
        "deleted 1 tick older than 1970-01-01 00:00:00 UTC in 2 calls; more remain, the next run goes on")
    assert job_words("retention", True, '{"deleted": 10, "calls": 1, "before_ts": 0, "more": false, '
                     '"held_back_from": 86400000}') == (
        "deleted 10 ticks older than 1970-01-01 00:00:00 UTC in 1 call (held back from 1970-01-02 00:00:00 UTC, "
        "too far past the oldest tick: the next runs catch up, unless the clock is ahead)")
    assert job_words("retention", True, '{"deleted": 0, "calls": 1, "before_ts": 0, "more": false, '
                                        '"kept_for_analysis": 600}') == (
        "deleted 0 ticks older than 1970-01-01 00:00:00 UTC in 1 call; kept 600 older ticks the analysis has not "
        "read (it is behind, or not running)")
    assert job_words("quick_check", False, '{"ok": false, "messages": ["a", "b"], "ms": 3}') == (
        "integrity problems found in 3 ms: a; b")
    assert job_words("quick_check", True, "skipped: amcheck not installed") == "skipped: amcheck not installed"


def test_the_backup_button_rotates_the_backups_as_the_jobs_worker_does(stack: Stack) -> None:
    """The button's backups are rotated to ``TICKSTACK_BACKUP_KEEP`` as the jobs worker's are (the same
    :func:`db.backups.new_backup`): they piled up until the next scheduled backup. The flash and the
    audit record name what was removed; a file of another name is never touched."""
    s = dataclasses.replace(stack.settings, backup_keep=2)
    console = Console.logged_in(create_app("console", s))
    suffix = backup_suffix(s)
    old = [s.backup_dir / f"tickstack-2020010{d}T000000Z{suffix}" for d in (1, 2, 3)]
    for path in old:
        path.write_bytes(b"an old backup")
    mine = s.backup_dir / f"tickstack-manual{suffix}"
    mine.write_bytes(b"a person's copy")
    before = list_backups(s.backup_dir)  # the fixture's jobs backup, then these three
    r = console.post("/console/database/backup")
    assert r.status_code == 303
    page = console.get("/console/database")
    flash = html.unescape(re.search(r'class="flash flash-ok"[^>]*>([^<]*)<', page.text).group(1))
    names = ", ".join(p.name for p in old)
    # Its size said as python -m db says it (db.sizes: "1.5 KiB"); it was "659,456 bytes".
    assert re.match(r"Backup written: \S+ \(\d+\.\d (KiB|MiB), \d+ ms\)\.", flash) and flash.endswith(
        f" Removed 3 older backups (keeping the newest 2, TICKSTACK_BACKUP_KEEP): {names}."), flash
    after = list_backups(s.backup_dir)
    assert len(after) == 2 and after[0] == before[-1] not in old and after[1] not in before, (before, after)
    assert mine.read_bytes() == b"a person's copy"
    (detail,) = query(s, "SELECT detail FROM audit_log WHERE action = 'db.backup' ORDER BY id DESC LIMIT 1")[0]
    assert json.loads(detail)["removed"] == [p.name for p in old]
