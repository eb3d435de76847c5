"""The console's operator pages in a real browser (issue 12, part B): Debian's Chromium driven by
Playwright, as in tests/test_browser.py, against the real stack under circusd (one for the module).

* log search finds a line the writer wrote moments before, highlighted, and the merged view of
  every watcher names it and follows new lines;
* a signal sent from a watcher's page (asked in a dialog) reaches the process: the api's gunicorn
  master logs the SIGHUP;
* restart-all from the Watchers page restarts every watcher once, this console last, with one audit
  row;
* a watcher circus lost (a reloadconfig of a broken circus.ini) becomes a missing row as the page
  polls, without actions, and comes back with them once restored;
* the new pages (a watcher's page, the logs searched, the merged logs, the confirmations) have no
  WCAG 2.1 A/AA violation found by axe-core, light and dark, at 390 and 1400 px, and never scroll
  sideways; screenshots of each go to ``test-output/browser-ops/``;
* and, all along, no request leaving 127.0.0.1 and no JavaScript error (a CSP violation is one).
"""
from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq
from playwright.sync_api import Browser, expect

from testkit.browser import TOO_WIDE_JS, ConsoleView, chromium, output_dir, widths_and_schemes
from testkit.circus import WATCHERS, CircusStack
from testkit.helpers import query, wait_for

#: The tests of this module whose promise is the same whatever the database (tests/conftest.py).
DATABASE_INDEPENDENT = pytest.mark.database_independent(
    "log files, signals and restarts go through the home's files and circus, whatever the database")

ROOT = Path(__file__).resolve().parent.parent
OUT = output_dir("browser-ops")
AXE = Path(__file__).resolve().parent / "vendor" / "axe-core-4.14.1" / "axe.min.js"
AXE_PATH = "/__test__/axe.min.js"
TIMEOUT_MS = 20_000
#: restart-all follows each watcher in turn (the writer drains first): the answer takes a while.
RESTART_ALL_MS = 240_000


@dataclass
class View(ConsoleView):
    dialogs: list[str] = field(default_factory=list, kw_only=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def stack(browser: Browser) -> Iterator[CircusStack]:
    stack = CircusStack()
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


@pytest.fixture
def views(browser: Browser, stack: CircusStack) -> Iterator[Any]:
    OUT.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=TIMEOUT_MS)
    opened: list[View] = []
    base = f"http://127.0.0.1:{stack.console_port}"

    def open_view(width: int = 1400, scheme: str = "light") -> View:
        context = browser.new_context(viewport={"width": width, "height": 900}, locale="en-US", timezone_id="UTC",
                                      color_scheme=scheme)
        context.set_default_timeout(TIMEOUT_MS)
        view = View(context, context.new_page(), base, stack.home)
        opened.append(view)
        view.watch()
        context.route(base + AXE_PATH, lambda route: route.fulfill(path=str(AXE), content_type="text/javascript"))

        def on_dialog(dialog: Any) -> None:
            view.dialogs.append(dialog.message)
            dialog.accept()

        view.page.on("dialog", on_dialog)
        view.login()
        return view

    try:
        yield open_view
    finally:
        for view in opened:
            view.context.close()


def undecodable_request(stack: CircusStack, size: int) -> None:
    """``size`` bytes that are no request: the writer logs a warning naming the size, and answers."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(stack.settings.writer_endpoint)
        sock.send(b"\xc1" * size)
        assert sock.poll(20_000), "the writer did not answer"
        sock.recv_multipart()
    finally:
        sock.close()


@DATABASE_INDEPENDENT
def test_log_search_finds_a_line_written_moments_before_and_the_merged_view_follows(
        views: Any, stack: CircusStack) -> None:
    size = 3000 + secrets.randbelow(5000)
    needle = f"undecodable request ({size} bytes)"
    undecodable_request(stack, size)
    wait_for("the writer's warning in its log", lambda: needle in stack.log("writer"), timeout=30)
    view = views()
    page = view.page
    view.goto("/console/logs?file=writer.log")
    page.fill("[data-log-query]", needle.upper())
    with page.expect_navigation():
        page.click("form.toolbar button[type=submit]")
    hit = page.locator("pre[data-log] mark")
    expect(hit).to_have_count(1)
    expect(hit).to_have_text(needle)
    expect(page.locator("pre[data-log] span.l-warning")).to_have_count(1)
    expect(page.locator("[data-search-summary]")).to_contain_text("1 line matches")

    # Every watcher's log, merged, with the same search: the line is named by its watcher, and a
    # line written after the page was drawn comes in by itself (follow), highlighted too.
    page.select_option("select[name=file]", "all")
    page.fill("[data-log-query]", "undecodable request")
    with page.expect_navigation():
        page.click("form.toolbar button[type=submit]")
    first = page.locator("pre[data-merged] > span", has_text=needle)
    expect(first.locator(".l-w")).to_have_text("writer")
    size2 = size + 1
    undecodable_request(stack, size2)
    later = page.locator("pre[data-merged] > span", has_text=f"undecodable request ({size2} bytes)")
    expect(later).to_have_count(1)
    expect(later.locator(".l-w")).to_have_text("writer")
    expect(later.locator("mark")).to_have_text("undecodable request")
    expect(page.locator("[data-follow-status]")).to_contain_text("following every watcher")
    view.assert_clean()


@DATABASE_INDEPENDENT
def test_a_signal_sent_from_a_watchers_page_reaches_the_process(views: Any, stack: CircusStack) -> None:
    (master,) = stack.pids_of("api")
    # A process circus calls active may not have set its handlers yet: HUP would end it.
    wait_for("the api's master serving", lambda: f"[{master}] [INFO] Listening at" in stack.log("api"), timeout=60)
    before = stack.log("api").count("Handling signal: hup")
    since = query(stack.settings, "SELECT coalesce(max(id), 0) FROM audit_log")[0][0]
    view = views()
    page = view.page
    view.goto("/console/watchers")
    with page.expect_navigation():
        page.click('tr[data-watcher="api"] td.name a')
    expect(page.locator(f'tr[data-pid="{master}"]')).to_contain_text("gunicorn master")
    expect(page.locator("[data-watcher-charts] [data-chart] canvas").first).to_be_visible()  # CPU and memory
    page.select_option("select[name=signal]", "HUP")
    page.select_option("select[name=pid]", str(master))
    with page.expect_navigation():
        page.click("form.signal-form button[type=submit]")
    assert view.dialogs and view.dialogs[-1].startswith(f"Send SIGHUP to api, pid {master}?"), view.dialogs
    expect(page.locator(".flash-ok")).to_contain_text(f"Sent SIGHUP to api (pid {master})")
    wait_for("the master's log of the HUP", lambda: re.search(rf"\[{master}\] \[INFO\] Handling signal: hup",
                                                                 stack.log("api"))
             and stack.log("api").count("Handling signal: hup") == before + 1, timeout=60)
    rows = query(stack.settings, "SELECT target, result FROM audit_log WHERE id > ? AND action = 'watcher.signal'",
                 (since,))
    assert rows == [("api", "ok")]
    view.assert_clean()


@DATABASE_INDEPENDENT
def test_a_watcher_circus_lost_becomes_a_missing_row_as_the_page_polls_and_comes_back_restored(
        browser: Browser) -> None:
    """A page open while a ``reloadconfig`` of a broken circus.ini drops monitor (a stack of its own:
    the ini is a copy in its home): the page's poll draws monitor's row again, missing, with no
    action and what to do, and keeps it so; once the section is back and reloaded, the row has its
    actions again. (The page listed only what circus had; the row simply stayed as it was.)"""
    lost = CircusStack()
    context = None
    try:
        ini = lost.home / "circus.ini"
        ini.write_text((ROOT / "circus.ini").read_text())
        lost.ini = ini
        lost.start()
        context = browser.new_context(viewport={"width": 1400, "height": 900}, locale="en-US", timezone_id="UTC")
        context.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        view = View(context, context.new_page(), f"http://127.0.0.1:{lost.console_port}", lost.home)
        view.watch()
        view.login()
        row = view.page.locator('tr[data-watcher="monitor"]')
        expect(row.locator('button[data-action="restart"]')).to_have_count(1)
        ini.write_text(ini.read_text().replace("[watcher:monitor]", "[watcher:monitor"))
        assert lost.circusctl("reloadconfig", "--waiting").returncode == 0
        status = row.locator('[data-field="status"]')
        expect(status).to_have_text("missing")
        expect(status).to_have_class(re.compile(r"(^|\s)pill-missing(\s|$)"))
        expect(row.locator("form")).to_have_count(0)
        expect(row.locator("[data-missing-advice]")).to_contain_text("reloadconfig --waiting")
        badge = view.page.locator("[data-live-text]")
        expect(badge).to_have_text(re.compile(r"^live · "))
        first = badge.inner_text()
        expect(badge).not_to_have_text(first)  # polled again since: still the missing row
        expect(status).to_have_text("missing")
        expect(row.locator("form")).to_have_count(0)
        ini.write_text((ROOT / "circus.ini").read_text())
        assert lost.circusctl("reloadconfig", "--waiting").returncode == 0
        expect(row.locator('button[data-action="restart"]')).to_have_count(1)
        expect(status).not_to_have_text("missing")
        view.assert_clean()
    finally:
        if context is not None:
            context.close()
        lost.close()

@pytest.mark.parametrize(("width", "scheme"), widths_and_schemes(
    "tests/test_browser_console_ops.py::test_new_pages_have_no_wcag_aa_violation_and_never_scroll_sideways"))
def test_new_pages_have_no_wcag_aa_violation_and_never_scroll_sideways(views: Any, width: int, scheme: str) -> None:
    view = views(width, scheme)
    pages = (("watcher-api", "/console/watchers/api"), ("watcher-writer", "/console/watchers/writer"),
             ("logs-search", "/console/logs?file=writer.log&q=ready&level=info"),
             ("logs-all", "/console/logs?file=all"))
    found: list[str] = []
    for name, path in pages:
        view.settle(path)
        wide = view.page.evaluate(TOO_WIDE_JS)
        assert wide["scrollWidth"] <= wide["width"], f"{width} px, {name}: the page scrolls sideways: {wide}"
        view.page.add_script_tag(url=view.base + AXE_PATH)
        result = view.page.evaluate("() => axe.run(document, {runOnly: {type: 'tag', values: "
                                    "['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}})")
        for v in result["violations"]:
            nodes = "; ".join(f"{n['target']}: {n['failureSummary'][:160]}" for n in v["nodes"][:3])
            found.append(f"{name}: {v['id']} ({len(v['nodes'])}): {nodes}")
        view.page.screenshot(path=str(OUT / f"{name}-{width}-{scheme}.png"), full_page=True)
    view.assert_clean()
    assert not found, "axe-core found WCAG A/AA violations:\n" + "\n".join(found)


def test_restart_all_from_the_page_restarts_every_watcher_once(views: Any, stack: CircusStack) -> None:
    """Last: it restarts the console serving the page too (after recording the audit row)."""
    wait_for("every watcher active", lambda: all(stack.status().get(w) == "active" for w in WATCHERS), timeout=90)
    before = {w: set(stack.pids_of(w)) for w in WATCHERS}
    since = query(stack.settings, "SELECT coalesce(max(id), 0) FROM audit_log")[0][0]
    view = views()
    page = view.page
    view.goto("/console/watchers")
    # The click waits for the navigation it starts too, by its own timeout (the context's 20 s unless
    # given): on a loaded machine the restart-all answer took longer than that.
    with page.expect_navigation(timeout=RESTART_ALL_MS):
        page.click("form[action$='/watchers/restart-all'] button", timeout=RESTART_ALL_MS)
    assert view.dialogs and "Restart every watcher" in view.dialogs[-1]
    expect(page.locator("div.flash-warn")).to_contain_text("this console, restarts now")

    def all_new() -> bool:
        now = {w: set(stack.pids_of(w)) for w in WATCHERS}
        return all(now[w] and not now[w] & before[w] for w in WATCHERS) and all(
            s == "active" for s in stack.status().values())
    wait_for("every watcher restarted", all_new, timeout=120)
    rows = query(stack.settings, "SELECT target, result, detail FROM audit_log WHERE id > ? AND action LIKE "
                                 "'watcher%'", (since,))
    spool = stack.home / "run" / "console-audit-spool.jsonl"
    assert len(rows) == 1, (rows, spool.read_text() if spool.exists() else None, query(
        stack.settings, "SELECT * FROM audit_log WHERE id > ?", (since,)),
        [x for x in stack.log("console").splitlines() if "audit" in x or "ERROR" in x or "WARN" in x])
    target, result, detail = rows[0]
    # In the order they restarted, as the confirmation says (it listed them by name).
    assert target.split(", ") == ["writer", "api", "ticks", "analysis", "monitor", "jobs", "console"], target
    assert result == "ok" and [line.split(":")[0] for line in detail.splitlines()] == target.split(", "), detail
    assert "console: sent (this console restarts last)" in detail
    assert all(f"{w}: ok" in detail for w in WATCHERS if w != "console"), detail
    view.goto("/console/audit")  # the console is back
    expect(page.locator("td", has_text="watchers.restart_all")).to_have_count(1)
    view.assert_clean()
