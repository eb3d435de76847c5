"""Console actions tell the truth (issue 9, points 3, 4 and 7): on the real stack under circusd
(:class:`testkit.circus.CircusStack`, one for the module) and in a real browser (Debian's Chromium
driven by Playwright, as in tests/test_browser.py).

* gunicorn watchers read "starting, N of 2 workers" until their workers are forked;
* the writer (a singleton) offers no +1/−1 and the server refuses scaling it with 400; ticks (one
  simulated feed) neither;
* a watcher decreased to 0 processes reads "no processes", on the page and after the page's poll;
  its restart and start end as circus ends them (stopped: circus starts none) and say how to run one;
* restarting and stopping the writer from the page is followed to the end ("done", the new state),
  with one audit row per click and its real outcome;
* circusd.log has no traceback after a writer restart and a quit;
* one login while the writer is down is one audit row once it is back.

The tests run in file order on the shared stack; the last one quits it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from db.client import WriterClient
from supervision.circus import Circus
from testkit.browser import chromium
from testkit.circus import CircusStack
from testkit.helpers import CSRF_RE, query, wait_for
from testkit.writer import Stack
from webapp import create_app
from webapp.console.watchers import gunicorn_workers, run_and_follow, unavailable_actions

#: A writer restart drains its producers (about a second) and waits out the other watchers' hooks;
#: a generous bound for "did it happen" on a loaded machine.
FOLLOW_MS = 120_000


class Console:
    """Flask's test client on the console, logged in, with its session's CSRF token."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.client = app.test_client()

    def token(self, url: str = "/console/audit") -> str:
        return CSRF_RE.search(self.client.get(url).text).group(1)

    def login(self, password: str) -> Any:
        token = self.token("/console/login")
        return self.client.post("/console/login", data={"csrf_token": token, "username": "admin",
                                                       "password": password})

    def post(self, url: str, data: dict[str, str] | None = None) -> Any:
        return self.client.post(url, data={"csrf_token": self.token(), **(data or {})})


def audit_rows(settings: Any, since: int, action: str | None = None) -> list[tuple]:
    rows = query(settings, "SELECT action, target, result, detail FROM audit_log WHERE id > ? ORDER BY id",
                 (since,))
    return [r for r in rows if action is None or r[0] == action]


def last_audit_id(settings: Any) -> int:
    return query(settings, "SELECT coalesce(max(id), 0) FROM audit_log")[0][0]


def watcher(console: Console, name: str) -> dict[str, Any]:
    return next(w for w in console.client.get("/console/api/watchers").json["watchers"] if w["name"] == name)


@pytest.fixture(scope="module")
def cstack() -> Iterator[CircusStack]:
    stack = CircusStack()
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


@pytest.fixture
def console(cstack: CircusStack) -> Console:
    c = Console(create_app("console", cstack.settings))
    assert c.login((cstack.home / "admin-password").read_text().strip()).status_code == 302
    return c


# --------------------------------------------------------------------------- no stack needed


def test_gunicorn_worker_count_is_read_from_the_command_line() -> None:
    ini = (Path(__file__).resolve().parent.parent / "circus.ini").read_text()
    cmd = re.search(r"^\[watcher:console\]\n(?:#.*\n)*cmd = (.*)$", ini, re.M).group(1)
    assert gunicorn_workers(cmd) == 2
    assert gunicorn_workers("/x/.venv/bin/gunicorn -w 3 app:app") == 3
    assert gunicorn_workers("gunicorn --workers=4 app:app") == 4
    assert gunicorn_workers("gunicorn app:app") == 1
    assert gunicorn_workers("python -m workers.ticks --workers 9") is None


def test_one_login_while_the_writer_is_down_is_one_audit_row() -> None:
    """ZeroMQ keeps a request for an absent writer and delivers it when the writer is back: the
    timed-out record, then each failed flush of the spool, were stored besides the spooled copy."""
    st = Stack.create()
    try:
        st.start_writer()
        st.stop(st.procs[-1])
        app = create_app("console", st.settings)  # no circusd: the writer is simply not answering
        app.config["CONSOLE_AUDIT_DEADLINE"] = 0.5
        c = Console(app)
        password = (st.home / "admin-password").read_text().strip()
        assert c.login(password).status_code == 302  # audited: spooled
        c.client.post("/console/logout", data={"csrf_token": c.token()})  # a flush attempt, then spooled
        st.start_writer()
        assert c.login(password).status_code == 302  # flushes the spool, then its own record
        rows = wait_for("the spooled records", lambda: (r := audit_rows(st.settings, 0)) and len(r) >= 3 and r)
        assert [(a, res) for a, _, res, _ in rows] == [("login", "ok"), ("logout", "ok"), ("login", "ok")], rows
        assert not (st.home / "run" / "console-audit-spool.jsonl").read_text().strip()
    finally:
        st.close()


def test_an_audit_record_the_writer_took_and_did_not_answer_is_stored_once() -> None:
    """The writer takes the record and stops before answering (here: SIGSTOP, then SIGCONT once
    the console spooled it). The spooled copy goes again under the request id it was first sent
    with, so the writer answers it from its record of applied requests instead of storing it again."""
    st = Stack.create()
    try:
        writer = st.start_writer()
        app = create_app("console", st.settings)  # no circusd: only the writer's answers count
        app.config["CONSOLE_AUDIT_DEADLINE"] = 0.5
        c = Console(app)
        password = (st.home / "admin-password").read_text().strip()
        assert c.login(password).status_code == 302
        token = c.token("/console/logs")  # not the audit log's page: it sends the spool, the writer up
        os.kill(writer.pid, signal.SIGSTOP)
        try:
            c.client.post("/console/logout", data={"csrf_token": token})  # sent, unanswered: spooled
        finally:
            os.kill(writer.pid, signal.SIGCONT)
        spool = st.home / "run" / "console-audit-spool.jsonl"
        assert '"action": "logout"' in spool.read_text()
        # The writer read the request from its socket when it woke up, and applied it.
        wait_for("the writer to apply the unanswered record", lambda: len(audit_rows(st.settings, 0)) == 2)
        assert c.login(password).status_code == 302  # flushes the spool, then its own record
        rows = wait_for("the spooled records", lambda: (r := audit_rows(st.settings, 0)) and len(r) >= 3 and r)
        assert [(a, res) for a, _, res, _ in rows] == [("login", "ok"), ("logout", "ok"), ("login", "ok")], rows
        assert not spool.read_text().strip()
    finally:
        st.close()


def test_with_the_writer_down_ops_per_s_shows_its_age() -> None:
    st = Stack.create()
    try:
        st.start_writer()
        at = int(time.time() * 1000) - 40_000
        with WriterClient(settings=st.settings, deadline=20) as client:
            client.call("record_samples", samples=[{"ts": at, "name": "writer.requests_per_s", "value": 123.0},
                                                   {"ts": at, "name": "writer.ticks_per_s", "value": 77.0}])
        c = Console(create_app("console", st.settings))
        assert c.login((st.home / "admin-password").read_text().strip()).status_code == 302
        assert "data-kpi-age" not in c.client.get("/console/database").text  # the writer answers: current
        st.stop(st.procs[-1])
        page = c.client.get("/console/database").text
        age = re.search(r'data-kpi-age>(.*?)</div>', page, re.S)
        assert age and "as of" in age.group(1) and f'data-ago="{at}"' in age.group(1), page[:3000]
        assert "123.0" in page
    finally:
        st.close()


def test_a_spooled_record_sent_and_not_answered_keeps_the_id_it_was_sent_under() -> None:
    """A record spooled before it was ever sent (the writer was down) goes out under a new request
    id at the next flush; if that flush is not answered either, the line goes back to the spool with
    that id, so the writer that took it answers the next resend from its record instead of storing
    it twice."""
    st = Stack.create()
    try:
        writer = st.start_writer()
        app = create_app("console", st.settings)
        app.config["CONSOLE_AUDIT_DEADLINE"] = 0.5
        c = Console(app)
        password = (st.home / "admin-password").read_text().strip()
        assert c.login(password).status_code == 302
        spool = st.home / "run" / "console-audit-spool.jsonl"
        spool.write_text(json.dumps({"actor": "admin", "action": "manual", "target": "", "result": "ok",
                                     "detail": "", "ts": int(time.time() * 1000)}) + "\n")
        token = c.token("/console/logs")  # not the audit log's page: it sends the spool, the writer up
        os.kill(writer.pid, signal.SIGSTOP)
        try:
            c.client.post("/console/logout", data={"csrf_token": token})  # the flush of "manual" times out
        finally:
            os.kill(writer.pid, signal.SIGCONT)
        kept = [json.loads(line) for line in spool.read_text().splitlines()]
        assert kept[0]["action"] == "manual" and isinstance(kept[0].get("request"), list), kept
        wait_for("the writer to apply the unanswered record", lambda: len(audit_rows(st.settings, 0)) == 2)
        assert c.login(password).status_code == 302
        rows = wait_for("every record", lambda: (r := audit_rows(st.settings, 0)) and len(r) >= 4 and r)
        assert [a for a, _, _, _ in rows] == ["login", "manual", "logout", "login"], rows
    finally:
        st.close()


def test_a_spool_line_that_is_not_a_record_is_dropped_and_the_console_goes_on() -> None:
    st = Stack.create()
    try:
        st.start_writer()
        c = Console(create_app("console", st.settings))
        spool = st.home / "run" / "console-audit-spool.jsonl"
        spool.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        spool.write_text('"x"\n1\nnull\n[1, 2]\n{"action": 5}\nnot json\n')
        assert c.login((st.home / "admin-password").read_text().strip()).status_code == 302
        assert spool.read_text() == ""
        assert [a for a, _, _, _ in audit_rows(st.settings, 0)] == ["login"]
    finally:
        st.close()


def test_charts_say_since_when_no_sample_came() -> None:
    """With the writer (or the jobs worker) down the charts simply end: the page says since when."""
    st = Stack.create()
    try:
        st.start_writer()
        at = int(time.time() * 1000) - 300_000
        with WriterClient(settings=st.settings, deadline=20) as client:
            client.call("record_samples", samples=[{"ts": at, "name": "writer.ticks_per_s", "value": 5.0}])
        st.stop(st.procs[-1])
        c = Console(create_app("console", st.settings))
        assert c.login((st.home / "admin-password").read_text().strip()).status_code == 302
        page = c.client.get("/console/charts").text
        latest = re.search(r'<p data-latest-sample class="warn">(.*?)</p>', page, re.S)
        assert latest and "No new samples since" in latest.group(1) and f'data-ago="{at}"' in latest.group(1), \
            page[:3000]
    finally:
        st.close()


# --------------------------------------------------------------------------- on the real stack


def test_gunicorn_watchers_read_starting_until_their_workers_run(console: Console, cstack: CircusStack) -> None:
    cstack.call("restart", name="api", waiting=False)
    seen: list[tuple[str, int]] = []

    def workers_up() -> bool:
        w = watcher(console, "api")
        seen.append((w["status"], w["detail"], len(w["children"])))
        return w["status"] == "active" and len(w["children"]) == 2 and w["pids"] == cstack.pids_of("api")

    wait_for("the api's workers", workers_up, timeout=120)
    # Never "active" without its workers; "starting" says how many of them run.
    assert not [s for s in seen if s[0] == "active" and s[2] < 2], seen
    assert all(d is None or d == f"{n} of 2 workers" or d.endswith("processes")  # None: circus's own "starting"
               for st, d, n in seen if st == "starting"), seen
    page = console.client.get("/console/watchers").text
    assert re.search(r'data-watcher="api".*?pill-active" data-field="status">active<', page, re.S), seen


def test_the_writer_offers_no_scaling_and_refuses_it(console: Console, cstack: CircusStack) -> None:
    s = cstack.settings
    since, pids = last_audit_id(s), cstack.pids_of("writer")
    page = console.client.get("/console/watchers").text
    assert "/console/watchers/writer/restart" in page and "/console/watchers/analysis/incr" in page
    assert "/console/watchers/writer/incr" not in page and "/console/watchers/writer/decr" not in page
    for action in ("incr", "decr"):
        r = console.post(f"/console/watchers/writer/{action}", {"confirm": "yes"})
        assert r.status_code == 400 and "singleton" in r.text, (action, r.status_code)
    assert cstack.pids_of("writer") == pids and cstack.call("numprocesses", name="writer")["numprocesses"] == 1
    assert audit_rows(s, since) == []


def test_ticks_offers_no_scaling_and_refuses_it_a_second_feed(console: Console, cstack: CircusStack) -> None:
    """A second ticks process runs a second, independent simulated feed into the same symbols (two
    random walks interleaved): the console treats ticks as it treats a singleton."""
    s = cstack.settings
    since, pids = last_audit_id(s), cstack.pids_of("ticks")
    listing = console.client.get("/console/watchers").text
    assert "/console/watchers/ticks/restart" in listing and "/console/watchers/analysis/incr" in listing
    page = console.client.get("/console/watchers/ticks").text
    for html in (listing, page):
        assert "/console/watchers/ticks/incr" not in html and "/console/watchers/ticks/decr" not in html
    assert "a second process would run a second, independent random walk" in page
    for action in ("incr", "decr"):
        for form in ({}, {"confirm": "yes"}):  # refused, not first confirmed
            r = console.post(f"/console/watchers/ticks/{action}", form)
            assert r.status_code == 400 and "simulated feed" in r.text, (action, form, r.status_code)
    refused = cstack.circusctl("incr", "ticks")  # circus itself: a singleton in circus.ini
    assert "Singleton" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    assert cstack.pids_of("ticks") == pids and cstack.call("numprocesses", name="ticks")["numprocesses"] == 1
    assert audit_rows(s, since) == []


def test_unavailable_actions_follow_circus_status_and_the_processes_asked_for() -> None:
    """The one rule of the disabled buttons (the table, its poll, a watcher's page), by circus's word."""
    assert unavailable_actions("w", "active", 1) == {"start": "Start: circus calls w active, not stopped"}
    assert set(unavailable_actions("w", "stopped", 1)) == {"stop", "restart", "decr"}
    assert set(unavailable_actions("w", "stopped", 0)) == {"start", "stop", "restart", "decr"}
    assert unavailable_actions("w", "stopping", 1) == {}  # a start waits for the stop, then starts it


def test_a_watcher_at_zero_processes_reads_no_processes(console: Console, cstack: CircusStack) -> None:
    assert console.post("/console/watchers/monitor/decr", {"confirm": "yes"}).status_code == 303
    wait_for("monitor's process gone", lambda: cstack.pids_of("monitor") == [])
    assert cstack.status()["monitor"] == "active"  # circus's word for it
    w = watcher(console, "monitor")
    assert w["status"] == "no processes" and w["numprocesses"] == 0, w
    page = console.client.get("/console/watchers").text
    row = re.search(r'<tr data-watcher="monitor">.*?</tr>', page, re.S).group(0)
    assert 'class="pill pill-no-processes"' in row and "pill-active" not in row
    assert re.search(r'data-action="start"\s+disabled', row)  # circus's start would do nothing: +1 does
    assert console.post("/console/watchers/monitor/incr").status_code == 303
    wait_for("monitor back", lambda: watcher(console, "monitor")["status"] == "active" and cstack.pids_of("monitor"))


def test_plus_and_minus_one_process_say_how_many_processes_run_now(console: Console, cstack: CircusStack) -> None:
    """circus's answer to incr/decr carries no ``numprocesses``: the flash and the audit row said
    "? process(es) now". They say the count circus runs the watcher with after the action."""
    s = cstack.settings
    since = last_audit_id(s)
    assert console.post("/console/watchers/analysis/incr").status_code == 303
    assert "+1 process analysis: done. 2 process(es) now" in console.client.get("/console/watchers").text
    assert console.post("/console/watchers/analysis/decr").status_code == 303  # one of two: not confirmed
    assert "−1 process analysis: done. 1 process(es) now" in console.client.get("/console/watchers").text
    rows = wait_for("two audit rows", lambda: (r := audit_rows(s, since, None)) and len(r) >= 2 and r)
    assert [(a, t, res, d) for a, t, res, d in rows if a.startswith("watcher.")] == [
        ("watcher.incr", "analysis", "ok", "2 process(es) now"),
        ("watcher.decr", "analysis", "ok", "1 process(es) now")]
    wait_for("analysis back to one process", lambda: len(cstack.pids_of("analysis")) == 1, timeout=60)


def test_restart_and_start_of_a_watcher_at_zero_processes_end_as_circus_does_and_say_how_to_run_one(
        console: Console, cstack: CircusStack) -> None:
    """circus asked for 0 processes of a watcher (``circusctl set NAME numprocesses 0``, or −1 to 0)
    keeps it active with none; its restart then stops it and starts none, and circus stops a watcher
    whose start runs no process: it ends stopped, and a Start leaves it stopped. The console followed
    both until circus ran new processes, which never come: a minute, then "still stopped", recorded
    as an error. It ends with circus, says what circus did and how to run a process again."""
    s = cstack.settings
    since = last_audit_id(s)
    done = cstack.circusctl("set", "monitor", "numprocesses", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for("monitor's process gone", lambda: cstack.pids_of("monitor") == [])
    assert watcher(console, "monitor")["status"] == "no processes"

    def flash_after(action: str) -> str:
        assert console.post(f"/console/watchers/monitor/{action}").status_code == 303
        page = unescape(console.client.get("/console/watchers").text)
        return re.search(r'<div class="flash flash-(\w+)"[^>]*>(.*?)</div>', page, re.S).group(0)

    def start_button(url: str) -> tuple[str, str | None]:
        """(``disabled`` or "", its title) of monitor's Start button on the page at ``url``."""
        page = console.client.get(url).text
        if url == "/console/watchers":
            page = re.search(r'<tr data-watcher="monitor">.*?</tr>', page, re.S).group(0)
        form = re.search(r'<form[^>]*action="/console/watchers/monitor/start".*?</form>', page, re.S).group(0)
        button = re.search(r"<button[^>]*>", form, re.S).group(0)
        title = re.search(r'title="([^"]*)"', button)
        return ("disabled" if re.search(r"\sdisabled[\s>]", button) else "",
                unescape(title.group(1)) if title else None)

    for action, label in (("restart", "Restart"), ("start", "Start")):
        said = flash_after(action)
        assert f"{label} monitor: done. monitor is stopped: circus runs it with 0 processes" in said, said
        assert "then Start" in said and "+1 process" in said, said
        assert cstack.status()["monitor"] == "stopped" and cstack.pids_of("monitor") == []
        # Its Start would run none: disabled, saying so, on the table, in its JSON (the table's script
        # reads it on each poll) and on its page; Stop, Restart and −1 too (it is stopped); +1 is the way.
        assert start_button("/console/watchers") == start_button("/console/watchers/monitor") == (
            "disabled", "Start: circus runs monitor with 0 processes, so a start runs none: +1 process first, "
            "then Start")
        assert watcher(console, "monitor")["unavailable"]["start"] == start_button("/console/watchers")[1]
        assert set(watcher(console, "monitor")["unavailable"]) == {"start", "stop", "restart", "decr"}
    said = flash_after("incr")  # the advice, followed: +1 on a stopped watcher runs nothing yet
    assert "+1 process monitor: done. 1 process(es) once started; monitor is stopped: Start runs them" in said, said
    assert start_button("/console/watchers") == start_button("/console/watchers/monitor") == ("", None)
    said = flash_after("start")
    assert "Start monitor: done. monitor is active (pid " in said, said
    assert cstack.status()["monitor"] == "active" and len(cstack.pids_of("monitor")) == 1
    rows = wait_for("four audit rows", lambda: (r := audit_rows(s, since)) and len(r) >= 4 and r)
    assert [(a, t, res) for a, t, res, _ in rows if a.startswith("watcher.")] == [
        ("watcher.restart", "monitor", "ok"), ("watcher.start", "monitor", "ok"), ("watcher.incr", "monitor", "ok"),
        ("watcher.start", "monitor", "ok")], rows


def test_restart_and_stop_of_the_writer_from_the_page(cstack: CircusStack) -> None:
    """In a browser: each click is followed until circus reports the new state, the page says "done"
    with the state, shows its progress meanwhile, and the audit log has one row per click."""
    from playwright.sync_api import expect

    s = cstack.settings
    since = last_audit_id(s)
    old = cstack.pids_of("writer")
    with chromium() as browser:
        page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
        page.set_default_timeout(FOLLOW_MS)
        page.on("dialog", lambda d: d.accept())
        base = f"http://127.0.0.1:{cstack.console_port}"
        page.goto(base + "/console/login")
        page.fill("#username", "admin")
        page.fill("#password", (cstack.home / "admin-password").read_text().strip())
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r"/console/watchers$"))
        progress = page.locator("[data-action-progress]")
        expect(progress).to_be_hidden()

        # What the progress line said while the POST was followed (it may last under a second),
        # kept across the navigation that ends it.
        page.evaluate("""() => { const el = document.querySelector("[data-action-progress]");
            new MutationObserver(() => { if (!el.hidden) sessionStorage.setItem("progress", el.textContent); })
              .observe(el, {attributes: true, childList: true, characterData: true, subtree: true}); }""")
        restart = page.locator('tr[data-watcher="writer"] button[data-action="restart"]')
        with page.expect_navigation(timeout=FOLLOW_MS):
            restart.click()
        assert page.evaluate("() => sessionStorage.getItem('progress')") == "Restarting writer…"
        expect(page.locator(".flash-ok")).to_contain_text("Restart writer: done. writer is active")
        new = cstack.pids_of("writer")
        assert new and new != old and cstack.status()["writer"] == "active"

        stop = page.locator('tr[data-watcher="writer"] button[data-action="stop"]')
        with page.expect_navigation(timeout=FOLLOW_MS):
            stop.click()
        expect(page.locator(".flash-ok")).to_contain_text("Stop writer: done. writer is stopped")
        expect(page.locator('tr[data-watcher="writer"] [data-field="status"]')).to_have_text("stopped")
        assert cstack.status()["writer"] == "stopped" and cstack.pids_of("writer") == []

        start = page.locator('tr[data-watcher="writer"] button[data-action="start"]')
        with page.expect_navigation(timeout=FOLLOW_MS):
            start.click()
        expect(page.locator(".flash-ok")).to_contain_text("Start writer: done.")

        # −1 process to 0 (confirmed in a dialog): "no processes", and still so after the page's poll.
        with page.expect_navigation(timeout=FOLLOW_MS):
            page.locator('tr[data-watcher="monitor"] button[data-action="decr"]').click()
        pill = page.locator('tr[data-watcher="monitor"] [data-field="status"]')
        expect(pill).to_have_text("no processes")
        badge = page.locator("[data-live-text]")
        expect(badge).to_have_text(re.compile(r"^live · "))
        first = badge.inner_text()
        expect(badge).not_to_have_text(first)  # polled again since
        expect(pill).to_have_text("no processes")
        expect(pill).to_have_class(re.compile(r"(^|\s)pill-no-processes(\s|$)"))
        start_monitor = page.locator('tr[data-watcher="monitor"] button[data-action="start"]')
        expect(start_monitor).to_be_disabled()  # the poll's rule is the server's (unavailable_actions)
        expect(start_monitor).to_have_attribute("title", "Start: circus calls monitor active, not stopped")
        with page.expect_navigation(timeout=FOLLOW_MS):
            page.locator('tr[data-watcher="monitor"] button[data-action="incr"]').click()
        expect(page.locator(".flash-ok")).to_contain_text("+1 process monitor: done.")

    # The stop's row was spooled (it took the writer away) and sent with the start's.
    def actions() -> list[tuple]:
        return [r for r in audit_rows(s, since) if r[0].startswith("watcher.")]  # the browser's login too

    rows = wait_for("five audit rows", lambda: (r := actions()) and len(r) >= 5 and r)
    assert [(a, t, res) for a, t, res, _ in rows] == [
        ("watcher.restart", "writer", "ok"), ("watcher.stop", "writer", "ok"), ("watcher.start", "writer", "ok"),
        ("watcher.decr", "monitor", "ok"), ("watcher.incr", "monitor", "ok")], rows


@pytest.mark.database_independent("the console's follow of circusd; the held write lock is SQLite's")
def test_a_writer_restart_that_holds_circusd_past_its_answer_time_is_followed_to_its_end() -> None:
    """The writer's ``after_start`` hook waits (up to 10 s) until the new writer answers, and circusd
    answers nothing meanwhile. A user's ``sqlite3`` shell holding the database's write lock (the
    seed's own fault) keeps a new writer from opening it for ``TICKSTACK_BUSY_TIMEOUT_MS`` (9 s
    here), past the console's 3 s per circus call (``CONSOLE_CIRCUS_TIMEOUT``): its Restart said
    "failed: circusd does not answer ... is the stack running?" while the restart went on. It follows
    the restart through circusd's silence: once the shell lets go, circus's next writer serves, and
    it says done. With circusd held before the restart is sent (a start sent by circusctl), it
    said "failed ... try again" and the restart ran later anyway; it now sends nothing and says so."""
    stack = CircusStack(TICKSTACK_BUSY_TIMEOUT_MS="9000")
    shell = None
    try:
        stack.start()
        app = create_app("console", stack.settings)
        console = Console(app)
        assert console.login((stack.home / "admin-password").read_text().strip()).status_code == 302
        shell = sqlite3.connect(str(stack.settings.database_path), isolation_level=None, timeout=30,
                                check_same_thread=False)

        def locked_until_a_writer_refuses() -> threading.Thread:
            """The shell takes the write lock, and its user lets go once a new writer said it cannot
            open the database."""
            refusals = stack.log("writer").count("cannot open the database")
            shell.execute("BEGIN EXCLUSIVE")

            def let_go() -> None:
                wait_for("a new writer refused",
                         lambda: stack.log("writer").count("cannot open the database") > refusals, 120)
                shell.execute("ROLLBACK")

            letting_go = threading.Thread(target=let_go, daemon=True)
            letting_go.start()
            return letting_go

        # A poll not answered: from the page.
        since, before = last_audit_id(stack.settings), set(stack.pids_of("writer"))
        letting_go = locked_until_a_writer_refuses()
        assert console.post("/console/watchers/writer/restart").status_code == 303
        letting_go.join(5)
        said = unescape(console.client.get("/console/watchers").text)
        said = re.search(r'<div class="flash flash-(\w+)"[^>]*>(.*?)</div>', said, re.S).group(0)
        assert "Restart writer: done. writer is active (pid " in said and "It answers (pid " in said, said
        assert "does not answer at" not in said, said
        # circusd was held past the console's circus timeout: the new writer exited on the lock, or (on a
        # loaded machine, its start and the 9 s wait) the 10 s wait ran out first.
        held = re.search(r"after_start: the writer at \S+ (exited before it was ready|did not answer within 10 s)",
                         stack.circusd_log())
        assert held, stack.circusd_log()[-2000:]
        now = set(stack.pids_of("writer"))
        assert now and not now & before
        rows = audit_rows(stack.settings, since, "watcher.restart")
        assert [(t, r) for _, t, r, _ in rows] == [("writer", "ok")], rows

        # circusd held before anything is sent (a writer started by circusctl waits in its hook): a
        # restart sent then ran once circusd was free, after the console had said "failed ... try
        # again", and a retry ran it twice. Nothing is sent now, and it says so; no restart follows.
        assert stack.circusctl("stop", "writer", "--waiting").returncode == 0
        letting_go = locked_until_a_writer_refuses()
        sent = stack.circusctl("start", "writer")  # answered at once; its after_start then waits
        assert sent.returncode == 0, sent.stdout + sent.stderr
        started = len(stack.circusd_log())
        with app.app_context():
            result, message = run_and_follow(Circus(stack.endpoint, timeout=1.0), "writer", "restart")
        assert result == "error" and message.startswith("not sent: circusd did not answer within 1 s"), message
        letting_go.join(60)
        serving = wait_for("the started writer", lambda: WriterClient(settings=stack.settings, deadline=2).ping())
        assert "writer stopped" not in stack.circusd_log()[started:], stack.circusd_log()[started:]
        assert serving["pid"] in stack.pids_of("writer")
    finally:
        if shell is not None:
            shell.close()
        stack.close()


def test_circusd_log_has_no_traceback_after_a_restart_and_a_quit(console: Console, cstack: CircusStack) -> None:
    """Last: it quits the module's stack. A restart of the writer takes a second or more (it drains), so
    circusd's periodic check meets the running command; so does it on quit."""
    assert console.post("/console/watchers/writer/restart").status_code == 303
    assert cstack.status()["writer"] == "active"
    cstack.stop()
    assert cstack.proc is not None and cstack.proc.returncode is not None
    log = cstack.circusd_log()
    assert "writer stopped" in log or "writer started" in log, log[-2000:]  # the log is the real one
    assert log.count("Traceback") == 0, log[log.find("Traceback") - 300:][:3000]
