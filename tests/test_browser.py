"""The admin console in a real browser (Debian's Chromium driven by Playwright) against the real
stack under circusd (:class:`testkit.circus.CircusStack`, one for the module).

What a person sees: the login redirect, every watcher active and updating live, a restart from the
page changing the pid (and landing in the audit log), the database's lock errors at 0, the charts
and the candlesticks really drawn (pixels of the series' colours on the chart's pane), the writer's
log followed live; all without any request leaving 127.0.0.1 (every other one is blocked, and that
must not happen) and without a JavaScript error (a CSP violation is one). A traceback in the
stack's logs meanwhile is reported as a warning.

Screenshots of every page go to ``test-output/browser/`` (git-ignored). With
``TICKSTACK_UPDATE_SCREENSHOT=1`` the watchers page, at 1280x800, is also copied to
``docs/console.png`` for the README.
"""
from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from testkit.browser import chromium, output_dir, update_docs, watch
from testkit.circus import WATCHERS, CircusStack
from testkit.env import ROOT
from testkit.helpers import query, wait_for
from webapp.console.charts import charts_for

OUT = output_dir("browser")
DOCS_SCREENSHOT = ROOT / "docs" / "console.png"
VIEWPORT = {"width": 1280, "height": 800}
TIMEOUT_MS = 20_000
#: The watcher restarted from the page.
RESTARTED = "analysis"
#: The symbol replayed from a 1-minute OHLCV file, and how many bars.
SYMBOL, N_BARS = "TESTX", 40
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
#: charts.js draws rising candles in this green and falling ones in this red (market page).
UP_RGB, DOWN_RGB = (0x1A, 0x9A, 0x55), (0xD1, 0x3C, 0x3C)
#: Pixels of its series' colours a chart's pane must show: a 2 px line across a fifth of it (a
#: drawn chart shows thousands; axes, grid and labels none).
MIN_LINE_PIXELS = 200

# Counts the pixels of the given colours (each channel within `tol`) on a chart's pane: the largest
# canvases inside the element. The price axis, where the last value is written in the series' colour,
# is a smaller canvas and not counted, so only lines and candles drawn on the pane count.
PANE_PIXELS_JS = """
([el, colors, tol]) => {
  const canvases = Array.from(el.querySelectorAll("canvas")).filter(c => c.width > 0 && c.height > 0);
  const area = c => c.width * c.height;
  const biggest = Math.max(0, ...canvases.map(area));
  const counts = colors.map(() => 0);
  let painted = 0, panes = 0, width = 0;
  for (const c of canvases.filter(c => area(c) === biggest)) {
    const ctx = c.getContext("2d");
    if (!ctx) continue;
    panes++;
    width = c.width;
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i + 3] === 0) continue;
      if (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250) painted++;
      colors.forEach((rgb, k) => {
        if (Math.abs(d[i] - rgb[0]) <= tol && Math.abs(d[i + 1] - rgb[1]) <= tol &&
            Math.abs(d[i + 2] - rgb[2]) <= tol) counts[k]++;
      });
    }
  }
  return {panes: panes, width: width, painted: painted, counts: counts};
}
"""
# The colours of a chart's series, from its legend's swatches ("rgb(47, 111, 237)").
LEGEND_COLORS_JS = """
card => Array.from(card.querySelectorAll(".legend-swatch")).map(s => getComputedStyle(s).backgroundColor)
"""


# --------------------------------------------------------------------------- helpers


def write_bar_csv(path: Path, n: int = N_BARS, seed: int = 11) -> None:
    """A 1-minute OHLCV export like pandas writes it, alternating runs of rising and falling bars
    so that the chart has candles of both colours."""
    rng = random.Random(seed)
    price, lines = 100.0, [",Open,High,Low,Close,Volume"]
    for i in range(n):
        ts = T0 + i * 60_000
        o = round(price, 2)
        step = rng.uniform(0.4, 1.2) * (1 if (i // 4) % 2 == 0 else -1)
        c = round(max(1.0, o + step), 2)
        h = round(max(o, c) + rng.uniform(0.1, 0.5), 2)
        low = round(min(o, c) - rng.uniform(0.1, 0.5), 2)
        price = c
        stamp = datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"{stamp},{o},{h},{low},{c},{float(rng.randint(1, 1000))}")
    path.write_text("\n".join(lines) + "\n")


def rgb(css: str) -> tuple[int, int, int]:
    r, g, b = (int(x) for x in re.findall(r"\d+", css)[:3])
    return r, g, b


def pids_on_page(page: Page, watcher: str) -> list[int]:
    """The watcher's own pids as the page shows them (not its children, listed after a '+')."""
    text = page.locator(f'tr[data-watcher="{watcher}"] [data-field="pids"]').inner_text()
    return [int(p) for p in re.findall(r"\d+", text.split("+")[0])]


@dataclass
class Session:
    """The browser on the console, and what it must never do."""

    stack: CircusStack
    context: BrowserContext
    page: Page
    base: str
    #: URLs of requests not to 127.0.0.1 (blocked).
    outside: list[str] = field(default_factory=list)
    #: Uncaught exceptions and console errors of the pages.
    js_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def goto(self, path: str) -> None:
        response = self.page.goto(self.base + path)
        assert response is not None and response.ok, f"{path}: {response and response.status}"

    def shot(self, name: str, full_page: bool = True) -> Path:
        path = OUT / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def wait_live(self) -> None:
        """Until the page's poll has answered twice (its 'live' badge shows a new time)."""
        badge = self.page.locator("[data-live-text]")
        expect(badge).to_have_text(re.compile(r"^live · \d\d:\d\d:\d\d UTC$"))
        first = badge.inner_text()
        expect(badge).not_to_have_text(first)
        expect(badge).to_have_text(re.compile(r"^live · "))

    def assert_clean(self) -> None:
        assert self.outside == [], f"requests to outside 127.0.0.1: {self.outside}"
        assert self.js_errors == [], f"JavaScript errors: {self.js_errors}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def stack(browser: Browser) -> Iterator[CircusStack]:
    """The real stack, sampling every second. Its logs are kept next to the screenshots (its home
    goes with it), and a traceback in them is worth a warning even when every page looked right."""
    stack = CircusStack(TICKSTACK_SAMPLE_EVERY_S="1")
    try:
        stack.start()
        yield stack
    finally:
        logs = OUT / "logs"
        shutil.rmtree(logs, ignore_errors=True)
        if (stack.home / "log").is_dir():
            shutil.copytree(stack.home / "log", logs, dirs_exist_ok=True)
        stack.close()
        crashed = sorted(p.name for p in logs.glob("*.log") if "Traceback" in p.read_text(errors="replace"))
        if crashed:
            warnings.warn(f"tracebacks in the stack's logs during the browser test: {', '.join(crashed)} "
                          f"(kept in {logs})", stacklevel=1)


@pytest.fixture(scope="module")
def replay(stack: CircusStack) -> Iterator[subprocess.Popen]:
    """A replay of TESTX 1-minute bars into the running stack, started early to run meanwhile."""
    csv_path = stack.home / "bars.csv"
    write_bar_csv(csv_path)
    with (stack.home / "log" / "replay.out").open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "workers.ticks", "--feed", "csv", "--file", str(csv_path),
                                 "--symbol", SYMBOL, "--speed", "max"], env=stack.env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def session(browser: Browser, stack: CircusStack, replay: subprocess.Popen) -> Iterator[Session]:
    OUT.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport=VIEWPORT, locale="en-US", timezone_id="UTC")
    context.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    s = Session(stack, context, context.new_page(), f"http://127.0.0.1:{stack.console_port}")
    watch(context, s.page, s.outside, s.js_errors)

    def on_dialog(dialog: Any) -> None:
        s.dialogs.append(dialog.message)
        dialog.accept()

    s.page.on("dialog", on_dialog)
    # The guard itself: a request to any other host is seen and stopped. The probe goes to another
    # loopback address, so even a broken guard sends nothing off this machine.
    s.page.goto("about:blank")
    s.page.evaluate("fetch('http://127.0.0.2:9/probe').catch(() => null)")
    wait_for("the guard to see the probe", lambda: s.outside == ["http://127.0.0.2:9/probe"], timeout=10)
    s.outside.clear()
    s.js_errors.clear()
    try:
        yield s
    finally:
        context.close()


# --------------------------------------------------------------------------- the scenario, in order


# On both databases, though its own promise is the same on each: it logs the scenario's session in,
# and every test after it is logged in by it (left out of the PostgreSQL run, each met the login page).
def test_console_asks_to_log_in_first(session: Session) -> None:
    page = session.page
    session.goto("/console/")
    assert urlsplit(page.url).path == "/console/login", page.url
    expect(page.locator("h1")).to_have_text("Log in")
    session.shot("login")
    password = (session.stack.home / "admin-password").read_text().strip()
    page.fill("#username", "admin")
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/console/watchers$"))
    expect(page.locator(".topbar .user")).to_have_text("admin")
    session.assert_clean()


def test_watchers_all_active_live(session: Session) -> None:
    page = session.page
    session.goto("/console/watchers")
    session.wait_live()
    rows = page.locator("tr[data-watcher]")
    shown = rows.evaluate_all("rows => rows.map(r => r.dataset.watcher)")
    assert set(WATCHERS) <= set(shown), shown
    for name in WATCHERS:
        expect(page.locator(f'tr[data-watcher="{name}"] [data-field="status"]')).to_have_text("active")
        assert len(pids_on_page(page, name)) == 1, name
    writer_pid = pids_on_page(page, "writer")
    assert len(writer_pid) == 1 and writer_pid == session.stack.pids_of("writer")
    session.shot("watchers")
    session.assert_clean()


def test_restart_from_the_page_changes_the_pid_and_is_audited(session: Session) -> None:
    page, stack = session.page, session.stack
    session.goto("/console/watchers")
    old = pids_on_page(page, RESTARTED)
    assert old == stack.pids_of(RESTARTED)
    button = page.locator(f'tr[data-watcher="{RESTARTED}"] button[data-action="restart"]')
    expect(button).to_be_enabled()
    with page.expect_navigation():
        button.click()
    expect(page.locator(".flash-ok")).to_contain_text(f"Restart {RESTARTED}: done.")
    session.wait_live()
    new = wait_for("the new pid on the page", lambda: (p := pids_on_page(page, RESTARTED)) and p != old and p)
    assert new == stack.pids_of(RESTARTED) and stack.status()[RESTARTED] == "active"
    expect(page.locator(f'tr[data-watcher="{RESTARTED}"] [data-field="status"]')).to_have_text("active")
    session.shot("watchers-restarted")

    page.click(".nav >> text=Audit log")
    page.wait_for_url(re.compile(r"/console/audit$"))
    first = page.locator("table tbody tr").first.locator("td")
    cells = [c.strip() for c in first.all_inner_texts()]
    assert cells[1:5] == ["admin", "watcher.restart", RESTARTED, "ok"], cells
    assert str(new[0]) in cells[5], cells  # circus's answer names the new process
    session.shot("audit")
    session.assert_clean()


def test_database_lock_errors_read_zero(session: Session) -> None:
    page = session.page
    session.goto("/console/database")
    session.wait_live()  # the figure below is the poll's, not only the server's first render
    expect(page.locator('[data-kpi="lock_errors"]')).to_have_text("0")
    expect(page.locator('[data-kpi-box="lock_errors"]')).to_have_class(re.compile(r"\bkpi-good\b"))
    if session.stack.settings.database_path is not None:
        expect(page.locator(".facts .pill").first).to_have_text("wal")  # journal mode
    else:  # a server: it answers, its size (pg_database_size) and its sessions, ours named
        expect(page.locator("[data-server] .pill").first).to_have_text("up")
        expect(page.locator("[data-server-size]")).to_contain_text("pg_database_size")
        expect(page.locator("[data-application^='tickstack writer on']")).to_have_count(1)
    session.shot("database")
    session.assert_clean()


def assert_lines_drawn(page: Page, chart: Any, title: str) -> None:
    """The chart's pane shows pixels in the colours of its series (from the legend)."""
    card = chart.locator("xpath=ancestor::section[contains(@class, 'card')]")
    expect(card.locator(".legend-item").first).to_be_visible()
    expect(chart.locator("[data-chart-empty]")).to_be_hidden()
    colors = [rgb(c) for c in card.evaluate(LEGEND_COLORS_JS)]
    assert colors, title
    handle = chart.element_handle()
    seen: list[dict] = []

    def drawn() -> bool:  # painted on the next animation frame after the data came
        seen.append(page.evaluate(PANE_PIXELS_JS, [handle, colors, 8]))
        return seen[-1]["panes"] >= 1 and seen[-1]["width"] > 200 and sum(seen[-1]["counts"]) >= MIN_LINE_PIXELS

    try:
        wait_for(f"lines on the {title} chart", drawn, timeout=10)
    except AssertionError:
        raise AssertionError(f"{title}: no line drawn in its series' colours {colors}: {seen[-1:]}") from None


def test_charts_are_drawn(session: Session) -> None:
    page, stack = session.page, session.stack
    shown = charts_for(stack.settings.database_path is None)  # a server's size chart has no WAL line
    names = sorted({n for c in shown for n in c.series})

    def enough_samples() -> bool:
        counts = dict(query(stack.settings, "SELECT name, count(DISTINCT ts) FROM samples GROUP BY name"))
        return all(counts.get(n, 0) >= 3 for n in names)

    wait_for("three samples of every series", enough_samples, timeout=30)
    session.goto("/console/charts")
    charts = page.locator("[data-chart]")
    expect(charts).to_have_count(len(shown))
    for i in range(len(shown)):
        chart = charts.nth(i)
        title = chart.locator("xpath=ancestor::section[1]//h2").inner_text()
        assert_lines_drawn(page, chart, title)
    session.shot("charts")
    session.assert_clean()


def test_market_candles_are_drawn(session: Session, replay: subprocess.Popen) -> None:
    page, stack = session.page, session.stack
    assert replay.wait(60) == 0, (stack.home / "log" / "replay.out").read_text(errors="replace")
    wait_for(f"{N_BARS} bars of {SYMBOL}", lambda: query(
        stack.settings, "SELECT count(*) FROM bars WHERE symbol = ? AND timeframe = '1m'", (SYMBOL,))[0][0] == N_BARS)
    session.goto("/console/market")
    page.click(f"nav.tabs >> text={SYMBOL}")
    page.wait_for_url(re.compile(rf"symbol={SYMBOL}"))
    chart = page.locator("[data-candles]")
    expect(chart).to_be_visible()
    expect(page.locator(".chart-card h2")).to_contain_text(SYMBOL)

    def drawn() -> dict | None:
        pixels = page.evaluate(PANE_PIXELS_JS, [chart.element_handle(), [UP_RGB, DOWN_RGB], 8])
        return pixels if min(pixels["counts"]) >= 100 else None

    try:
        wait_for("candles of both colours", drawn, timeout=15)
    finally:
        session.shot("market")
    expect(chart.locator("[data-chart-empty]")).to_be_hidden()
    session.assert_clean()


def test_logs_page_follows_the_writer_log(session: Session) -> None:
    page = session.page
    session.goto("/console/logs?file=writer.log")
    log = page.locator("pre[data-log]")
    expect(log).to_contain_text("writer ready")
    expect(page.locator("[data-follow-status]")).to_have_text(re.compile(r"^following · "))
    session.shot("logs")
    session.assert_clean()


def test_watchers_screenshot(session: Session) -> None:
    """Last: the watchers page with some history (a restart, samples), for the README."""
    page = session.page
    session.goto("/console/watchers")
    session.wait_live()
    restarts = page.locator(f'tr[data-watcher="{RESTARTED}"] [data-field="restarts"]')
    expect(restarts).to_have_text(re.compile(r"^[1-9]"))  # the sampler saw the restart
    time.sleep(1.2)  # the highlight of cells the poll changed fades in 1 s
    path = session.shot("console", full_page=False)
    if update_docs("TICKSTACK_UPDATE_SCREENSHOT"):
        others = {w: page.locator(f'tr[data-watcher="{w}"] [data-field="restarts"]').inner_text()
                  for w in WATCHERS if w != RESTARTED}
        assert all(n == "0" for n in others.values()), (
            f"not updating {DOCS_SCREENSHOT}: a watcher restarted on its own during the run: {others} "
            f"(see {OUT / 'logs'})")
        shutil.copyfile(path, DOCS_SCREENSHOT)
    session.assert_clean()
