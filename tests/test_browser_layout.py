"""The console as it reads on a phone (390 px) and a wide screen (1400 px), light and dark, in
Debian's Chromium driven by Playwright, against the real stack under circusd (the stack, the TESTX
replay and the browser are :mod:`test_browser`'s fixtures; this module gets its own).

What a person sees, checked on what is painted where it can be:
* every page's navigation is reachable (each link visible, hit-testable, and it navigates) and no
  page scrolls sideways;
* EURUSD prices with its 5 decimals on the chart's price axis (the text the chart paints, recorded
  from the canvas) and in the tables, an open trade's P&L that reconciles with its entry and mark,
  and a closed trade's message with the symbol's decimals;
* the indicator overlays painted (pixels of their colours): SMA and EMA over the candles, RSI and ATR
  each in a pane below, the volume on a scale of its own, the candles filling the chart's width;
* the sample charts: whole numbers on a count's axis, a unit on every value axis, memory ticks at
  round MiB, no time label cut at an edge, legend toggles that hide a line, a range selector, zoom
  with a way back;
* absolute UTC times beside the relative ones;
* no WCAG 2.1 A/AA violation found by axe-core on any page, light and dark, at both widths (axe is
  vendored for the tests only, in ``tests/vendor/``, and loaded from that file through a route on the
  console's own origin, so the page's strict CSP stays on);
* and, all along, no request leaving 127.0.0.1 and no JavaScript error (a CSP violation is one).

Screenshots of every page at both widths, light and dark, go to ``test-output/browser-layout/``;
with ``TICKSTACK_UPDATE_SCREENSHOTS=1`` also to ``docs/screenshots/`` (the README shows some).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, expect
from test_browser import (  # noqa: F401 - browser, playwright, replay and stack are fixtures used here
    N_BARS,
    SYMBOL,
    browser,
    query,
    replay,
    stack,
    wait_for,
)

from db.client import WriterClient
from testkit.browser import TOO_WIDE_JS, WIDTHS, ConsoleView, output_dir, update_docs, widths_and_schemes
from webapp.console.charts import charts_for

ROOT = Path(__file__).resolve().parent.parent
OUT = output_dir("browser-layout")
DOCS = ROOT / "docs" / "screenshots"
AXE = Path(__file__).resolve().parent / "vendor" / "axe-core-4.14.1" / "axe.min.js"
#: Where the page loads axe from: a path on the console's own origin that the test serves from AXE.
AXE_PATH = "/__test__/axe.min.js"
TIMEOUT_MS = 20_000
#: Every page, as (screenshot name, path); the first is shown before logging in.
PAGES = (("login", "/console/login"), ("watchers", "/console/watchers"), ("database", "/console/database"),
         ("charts", "/console/charts"), ("market", "/console/market?symbol=EURUSD"),
         ("market-indicators", f"/console/market?symbol={SYMBOL}"), ("logs", "/console/logs?file=writer.log"),
         ("audit", "/console/audit"))
NAV = ("Watchers", "Database", "Charts", "Market", "Logs", "Audit log")
FIVE = re.compile(r"^\d\.\d{5}$")
#: The price chart's colours in the light theme (console.css): SMA, EMA, RSI, ATR, rising and falling candles.
OVERLAY_RGB = {"--chart-sma": [0xF5, 0x9E, 0x0B], "--chart-ema": [0x7C, 0x3A, 0xED], "--chart-rsi": [0x08, 0x91, 0xB2],
               "--chart-atr": [0xDB, 0x27, 0x77], "--chart-up": [0x1A, 0x9A, 0x55], "--chart-down": [0xD1, 0x3C, 0x3C]}
UTC_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$")

# Records the text every canvas paints (what a chart's axes say), in the canvas's own pixels, since
# that canvas was last cleared whole. Added before any page script runs (not subject to the CSP).
CANVAS_TEXT_JS = """
(() => {
  const texts = new WeakMap();
  const proto = CanvasRenderingContext2D.prototype;
  const wrap = (name, before) => {
    const original = proto[name];
    proto[name] = function (...args) { before(this, args); return original.apply(this, args); };
  };
  const clearsAll = (ctx, [x, y, w, h]) => {
    const m = ctx.getTransform(), c = ctx.canvas;
    const left = m.a * x + m.e, top = m.d * y + m.f;
    const whole = left <= 0.5 && top <= 0.5 && left + m.a * w >= c.width - 0.5 && top + m.d * h >= c.height - 0.5;
    if (whole) texts.set(c, []);
  };
  wrap("clearRect", clearsAll);
  wrap("fillRect", clearsAll);
  wrap("fillText", (ctx, [text, x, y]) => {
    const m = ctx.getTransform(), width = ctx.measureText(String(text)).width, align = ctx.textAlign;
    const start = align === "center" ? x - width / 2 : (align === "right" || align === "end") ? x - width : x;
    const list = texts.get(ctx.canvas) || [];
    list.push({text: String(text), left: m.a * start + m.e, right: m.a * (start + width) + m.e, y: m.d * y + m.f});
    texts.set(ctx.canvas, list);
  });
  window.__canvasTexts = canvas => texts.get(canvas) || [];
})();
"""
# A chart's canvases by role (lightweight-charts lays a chart out as a table: a row per pane, with
# the pane's cell and its price axis's cell, then the time axis's row): per pane, top to bottom, the
# texts of its price axis and, for each colour asked, the pixels of that colour painted on the pane,
# the leftmost column where one is, and the pane's width; and the texts of the time axis.
CHART_JS = """
([el, colors, tol]) => {
  const rows = Array.from(el.querySelectorAll("tr"));
  const last = rows[rows.length - 1];
  const panes = [];
  let time = [];
  for (const tr of rows) {
    const cells = Array.from(tr.children);
    const canvases = i => Array.from(cells[i] ? cells[i].querySelectorAll("canvas") : [])
                               .filter(c => c.width && c.height);
    if (tr === last) {
      time = canvases(1).flatMap(c => window.__canvasTexts(c).map(t => ({...t, width: c.width})));
      continue;
    }
    const pane = canvases(1);
    if (!pane.length) continue;  // a separator
    const counts = colors.map(() => 0), leftmost = colors.map(() => Infinity);
    for (const c of pane) {
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      for (let i = 0; i < d.length; i += 4) {
        if (d[i + 3] === 0) continue;
        colors.forEach((rgb, k) => {
          const near = (j, v) => Math.abs(d[i + j] - v) <= tol;
          if (near(0, rgb[0]) && near(1, rgb[1]) && near(2, rgb[2])) {
            counts[k]++;
            leftmost[k] = Math.min(leftmost[k], (i / 4) % c.width);
          }
        });
      }
    }
    panes.push({width: pane[0].width, counts: counts, leftmost: leftmost.map(x => x === Infinity ? null : x),
                axis: canvases(2).flatMap(c => window.__canvasTexts(c).map(t => t.text))});
  }
  return {panes: panes, time: time};
}
"""
# The stylesheet's value of a colour variable, as [r, g, b].
CSS_RGB_JS = """
name => {
  const probe = document.createElement("span");
  probe.style.color = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  document.body.appendChild(probe);
  const rgb = getComputedStyle(probe).color.match(/\\d+/g).slice(0, 3).map(Number);
  probe.remove();
  return rgb;
}
"""
# A link is reachable when it has a size, lies in the window and is what a click on its centre hits.
REACHABLE_JS = """
a => {
  const r = a.getBoundingClientRect();
  const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  return {width: r.width, height: r.height, inside: r.left >= 0 && r.right <= document.documentElement.clientWidth,
          hit: hit === a || a.contains(hit)};
}
"""


# --------------------------------------------------------------------------- a browsing context


@dataclass
class View(ConsoleView):
    """A logged-in browser context at one width and colour scheme, and what it must never do."""

    width: int
    scheme: str

    def shot(self, name: str) -> None:
        """A full-page screenshot (no highlight of cells a poll changed: the context asks for reduced
        motion, so the console draws none, and nothing needs to fade first)."""
        path = OUT / f"{name}-{self.width}-{self.scheme}.png"
        self.page.screenshot(path=str(path), full_page=True)
        if update_docs("TICKSTACK_UPDATE_SCREENSHOTS"):
            DOCS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS / path.name)

    def chart(self, selector: str, colors: list[list[int]] | None = None) -> dict[str, Any]:
        return self.page.evaluate(CHART_JS, [self.page.locator(selector).first.element_handle(), colors or [], 10])

    def css_rgb(self, name: str) -> list[int]:
        return self.page.evaluate(CSS_RGB_JS, name)



@pytest.fixture(scope="module")
def ready(stack: Any, replay: subprocess.Popen) -> Any:  # noqa: F811
    """The stack, once it has what the pages show: EURUSD bars, and TESTX's bars and indicators."""
    wait_for("the analysis worker's first EURUSD bar", lambda: query(
        stack.settings, "SELECT count(*) FROM bars WHERE symbol = 'EURUSD' AND timeframe = '1m'")[0][0] > 0, timeout=90)
    assert replay.wait(60) == 0, (stack.home / "log" / "replay.out").read_text(errors="replace")
    wait_for(f"{SYMBOL}'s indicators", lambda: query(
        stack.settings, "SELECT count(DISTINCT name) FROM indicators WHERE symbol = ? AND timeframe = '1m'",
        (SYMBOL,))[0][0] == 4, timeout=60)
    return stack


@pytest.fixture
def views(browser: Browser, ready: Any) -> Iterator[Any]:  # noqa: F811
    """Opens a :class:`View` (logged in unless ``login=False``); closes the test's views after it."""
    OUT.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=TIMEOUT_MS)
    opened: list[View] = []
    base = f"http://127.0.0.1:{ready.console_port}"

    def open_view(width: int, scheme: str = "light", login: bool = True) -> View:
        context = browser.new_context(viewport={"width": width, "height": 900}, locale="en-US", timezone_id="UTC",
                                      color_scheme=scheme, reduced_motion="reduce")
        context.set_default_timeout(TIMEOUT_MS)
        view = View(context, context.new_page(), base, ready.home, width, scheme)
        opened.append(view)
        view.watch()
        context.route(base + AXE_PATH, lambda route: route.fulfill(path=str(AXE), content_type="text/javascript"))
        context.add_init_script(CANVAS_TEXT_JS)
        view.page.on("dialog", lambda dialog: dialog.accept())
        if login:
            view.login()
        return view

    try:
        yield open_view
    finally:
        for view in opened:
            view.context.close()


# --------------------------------------------------------------------------- layout


def test_every_page_has_its_navigation_reachable_and_never_scrolls_sideways(views: Any) -> None:
    for width in WIDTHS:
        view = views(width)
        for name, path in PAGES[1:]:
            view.settle(path)
            wide = view.page.evaluate(TOO_WIDE_JS)
            assert wide["scrollWidth"] <= wide["width"], f"{width} px, {name}: the page scrolls sideways: {wide}"
            links = view.page.locator("nav.nav a")
            assert links.all_inner_texts() == list(NAV), f"{width} px, {name}"
            for i, label in enumerate(NAV):
                seen = links.nth(i).evaluate(REACHABLE_JS)
                assert seen["width"] >= 24 and seen["height"] >= 24 and seen["inside"] and seen["hit"], (
                    f"{width} px, {name}: the {label!r} link cannot be reached: {seen}")
        # And each link does take you there, from the page before it.
        for label in NAV:
            with view.page.expect_navigation():
                view.page.locator("nav.nav a", has_text=re.compile(f"^{label}$")).click()
            expect(view.page.locator("nav.nav a.active")).to_have_text(label)
        view.assert_clean()
    login = views(390, login=False)
    login.goto("/console/login")
    wide = login.page.evaluate(TOO_WIDE_JS)
    assert wide["scrollWidth"] <= wide["width"], f"the login page scrolls sideways: {wide}"


# --------------------------------------------------------------------------- prices


def as_number(text: str) -> float:
    return float(text.replace(",", "").replace("+", "").replace("−", "-"))


def test_eurusd_shows_its_5_decimals_on_the_axis_in_the_tables_and_messages(views: Any, stack: Any) -> None:  # noqa: F811
    with WriterClient(settings=stack.settings, deadline=20) as client:
        eur = client.call("open_trade", symbol="EURUSD", side="buy", size=100000.0, entry_price=1.08231)["id"]
        btc = client.call("open_trade", symbol="BTCUSD", side="sell", size=0.35, entry_price=60000.5)["id"]
    view = views(1400)
    view.goto("/console/market?symbol=EURUSD")
    page = view.page
    for field_ in ("bid", "ask"):
        expect(page.locator(f'tr[data-symbol="EURUSD"] [data-field="{field_}"]')).to_have_text(FIVE)
    row = page.locator(f'tr[data-trade="{eur}"]')
    expect(row.locator('[data-field="entry"]')).to_have_text("1.08231")
    expect(row.locator('[data-field="mark"]')).to_have_text(FIVE)

    def reconciled() -> bool:  # read in one go: the poll may change the mark between two reads
        mark, pnl = (row.locator(f'[data-field="{f}"]').inner_text() for f in ("mark", "pnl"))
        return abs(as_number(pnl) - (as_number(mark) - 1.08231) * 100000) < 0.005
    wait_for("the P&L to equal (mark - entry) x size", reconciled, timeout=10)

    def axis() -> list[str]:
        labels = view.chart("[data-candles]")["panes"][0]["axis"]
        return labels if len(set(labels)) >= 2 and all(FIVE.match(t) for t in labels) else []
    try:
        labels = wait_for("5-decimal labels on the EURUSD price axis", axis, timeout=15)
    except AssertionError:
        raise AssertionError(f"EURUSD price axis: {view.chart('[data-candles]')['panes'][:1]}") from None
    assert len(set(labels)) >= 2, labels
    expect(page.locator(".chart-card h2")).to_contain_text("5 decimals")

    # A BTCUSD trade closed from the page: the message has the symbol's 2 decimals ("closed at 59245"
    # beside 59,245.04 before).
    view.goto("/console/market?symbol=BTCUSD")
    with page.expect_navigation():
        page.locator(f'tr[data-trade="{btc}"] button[type=submit]').click()
    message = page.locator(".flash-ok").inner_text()
    assert re.search(rf"Trade {btc} closed at \d{{1,3}}(,\d{{3}})*\.\d\d, P&L [+-]?[\d,]+\.\d\d", message), message
    exit_price = query(stack.settings, "SELECT exit_price FROM trades WHERE id = ?", (btc,))[0][0]
    assert f"{exit_price:,.2f}" in message, (exit_price, message)
    view.assert_clean()


# --------------------------------------------------------------------------- charts


def test_indicator_overlays_volume_scale_and_fitted_candles_are_painted(views: Any) -> None:
    view = views(1400)
    view.goto(f"/console/market?symbol={SYMBOL}&timeframe=1m")
    colors = list(OVERLAY_RGB.values())
    sma, ema, rsi, atr, up, down = range(len(colors))
    seen: list[dict] = []

    def painted() -> bool:
        seen.append(view.chart("[data-candles]", colors))
        panes = seen[-1]["panes"]
        return (len(panes) == 4 and min(panes[0]["counts"][k] for k in (sma, ema, up, down)) >= 100
                and panes[2]["counts"][rsi] >= 100 and panes[3]["counts"][atr] >= 100)

    try:
        wait_for("SMA and EMA over the candles, RSI and ATR in panes below", painted, timeout=20)
    except AssertionError:
        raise AssertionError(f"{SYMBOL} chart: {[(p['counts'], p['axis']) for p in seen[-1]['panes']]}") from None
    price, volume, rsi_pane, atr_pane = seen[-1]["panes"]
    # Each overlay in its own place only: RSI and ATR not on the price pane, SMA not below it.
    assert price["counts"][rsi] < 20 and price["counts"][atr] < 20, price["counts"]
    assert rsi_pane["counts"][sma] < 20 and atr_pane["counts"][ema] < 20
    # The volume has its own scale (labels on its pane's axis), the candles fill the width from the left.
    assert volume["axis"] and all(re.match(r"^[\d.]+[KMB]?$", t) for t in volume["axis"]), volume["axis"]
    first_candle = min(price["leftmost"][up], price["leftmost"][down])
    assert first_candle < 0.06 * price["width"], f"{N_BARS} candles squeezed to the right: first at {first_candle} px"
    # The colours above are the stylesheet's (light theme), which charts.js draws with.
    assert {n: view.css_rgb(n) for n in OVERLAY_RGB} == OVERLAY_RGB
    legend = view.page.locator("[data-candles] ~ .chart-foot .legend-item")
    expect(legend).to_have_text([re.compile(f"^{n}") for n in ("SMA 20", "EMA 20", "Volume", "RSI 14", "ATR 14")])
    view.assert_clean()


def nice(step: float) -> bool:
    """1, 2, 2.5, 4 or 5 times a power of ten: a step a person reads (not 47.6)."""
    while step >= 10:
        step /= 10
    while step < 1:
        step *= 10
    return any(abs(step - n) < 1e-6 for n in (1, 2, 2.5, 4, 5))


def test_sample_charts_have_units_whole_counts_round_ticks_toggles_ranges_and_zoom(views: Any, stack: Any) -> None:  # noqa: F811
    charts_shown = charts_for(stack.settings.database_path is None)  # a server's size chart: no WAL line
    names = {n for c in charts_shown for n in c.series}
    wait_for("three samples of every series", lambda: all(dict(query(
        stack.settings, "SELECT name, count(DISTINCT ts) FROM samples GROUP BY name")).get(n, 0) >= 3 for n in names))
    view = views(1400)
    view.settle("/console/charts")
    page = view.page
    charts = {c.id: f'[data-chart][data-series="{",".join(c.series)}"]' for c in charts_shown}
    units = {"ingest": r"/s$", "latency": r" ms$", "queue": r"^\d[\d,]* req$", "cpu": r" %$", "memory": r" MiB$",
             "dbsize": r" (B|KiB|MiB|GiB)$"}

    def axes_read_right() -> dict[str, list[str]] | None:
        got = {cid: view.chart(sel)["panes"][0]["axis"] for cid, sel in charts.items()}
        return got if all(got[c] and all(re.search(units[c], t) for t in got[c]) for c in charts) else None

    try:
        axes = wait_for("a unit on every value axis", axes_read_right, timeout=25)
    except AssertionError:
        got = {c: view.chart(s)["panes"][0]["axis"] for c, s in charts.items()}
        raise AssertionError(f"value axes: {got}") from None
    ticks = sorted({as_number(t.removesuffix(" MiB")) for t in axes["memory"]})
    steps = {round(b - a, 6) for a, b in zip(ticks, ticks[1:], strict=False)}
    # Lightweight Charts picks the smallest nice step at least its minimum spacing apart, measured
    # over the pane's height, but places the marks over one pixel less, a hair closer; it then leaves
    # out any mark closer than that spacing to the last one it kept: every other mark may go (40,
    # 120, 200 MiB for a step of 40), as regular, and multiples of a nice step still.
    assert len(steps) == 1, f"memory ticks are not evenly spaced: {axes['memory']}"
    step = steps.pop()
    assert any(nice(base) and all(abs(t / base - round(t / base)) < 1e-6 for t in ticks)
               for base in (step, step / 2)), f"memory ticks are not round MiB: {axes['memory']}"
    for cid, sel in charts.items():  # no time label cut at an edge of its axis (the chart rounds to a pixel)
        for label in view.chart(sel)["time"]:
            assert label["left"] >= -1 and label["right"] <= label["width"] + 1, f"{cid}: time label cut: {label}"

    # A legend entry hides its line and shows it again: the entry whose line shows most (idle
    # watchers' lines lie on top of each other along 0 %, and the last drawn covers the others).
    cpu = page.locator(charts["cpu"])
    card = cpu.locator("xpath=ancestor::section[1]")
    items = card.locator(".legend-item")
    colors = [[int(x) for x in re.findall(r"\d+", items.nth(i).locator(".legend-swatch").evaluate(
        "s => getComputedStyle(s).backgroundColor"))[:3]] for i in range(items.count())]

    def most_shown() -> tuple[int] | None:
        counts = view.chart(charts["cpu"], colors)["panes"][0]["counts"]
        best = max(range(len(colors)), key=lambda i: counts[i])
        return (best,) if counts[best] >= 50 else None

    (index,) = wait_for("a CPU line drawn", most_shown, timeout=30)
    item, color = items.nth(index), colors[index]
    shown = lambda: view.chart(charts["cpu"], [color])["panes"][0]["counts"][0]  # noqa: E731
    item.click()
    expect(item).to_have_attribute("aria-pressed", "false")
    wait_for("the line hidden", lambda: shown() < 5, timeout=30)
    item.click()
    wait_for("the line back", lambda: shown() >= 50, timeout=30)

    # Zoom with the wheel changes the time axis; "Reset zoom" fits the data again.
    before = [t["text"] for t in view.chart(charts["cpu"])["time"]]
    box = cpu.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -600)
    wait_for("zoomed in", lambda: [t["text"] for t in view.chart(charts["cpu"])["time"]] != before, timeout=30)
    card.locator("[data-fit]").click()
    wait_for("zoom reset", lambda: [t["text"] for t in view.chart(charts["cpu"])["time"]] == before, timeout=30)

    # The range selector: plain links (they work without JavaScript), the charts reload their range.
    asked: list[str] = []
    page.on("request", lambda r: "/console/api/series" in r.url and asked.append(r.url))
    expect(page.locator('nav[aria-label="Range"] a')).to_have_text(["15 min", "1 h", "6 h", "24 h", "7 days"])
    with page.expect_navigation():
        page.locator('nav[aria-label="Range"] a', has_text="24 h").click()
    expect(page.locator("h1")).to_have_text("Last 24 h")
    # A bound on the wait, not a timing: 10 s ran out once with two other suites on the machine's 2 cores.
    wait_for("the charts asking for 24 h", lambda: sum("range=24h" in u for u in asked) >= len(charts_shown),
             timeout=60)
    view.assert_clean()


# --------------------------------------------------------------------------- times


def test_times_show_absolute_utc_beside_relative(views: Any) -> None:
    view = views(1400)
    for path, where in (("/console/market?symbol=EURUSD", "[data-ticks-table]"), ("/console/database", "main")):
        view.goto(path)
        whens = view.page.locator(f"{where} .when")
        expect(whens.first).to_be_visible()
        for i in range(min(whens.count(), 10)):
            when = whens.nth(i)
            expect(when.locator("time")).to_have_text(UTC_TIME)
            expect(when.locator("[data-ago]")).to_have_text(re.compile(r"^\d+ (s|min \d+ s|h \d+ min|d \d+ h) ago$"))
    view.assert_clean()


# --------------------------------------------------------------------------- contrast, and the screenshots


@pytest.mark.parametrize(("width", "scheme"), widths_and_schemes(
    "tests/test_browser_layout.py::test_no_wcag_aa_violation_on_any_page_with_screenshots"))
def test_no_wcag_aa_violation_on_any_page_with_screenshots(views: Any, width: int, scheme: str) -> None:
    found: list[str] = []
    view = views(width, scheme, login=False)
    for name, path in PAGES:
        view.settle(path)
        view.page.add_script_tag(url=view.base + AXE_PATH)
        result = view.page.evaluate("() => axe.run(document, {runOnly: {type: 'tag', values: "
                                    "['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}})")
        for v in result["violations"]:
            nodes = "; ".join(f"{n['target']}: {n['failureSummary'][:160]}" for n in v["nodes"][:3])
            found.append(f"{name}: {v['id']} ({len(v['nodes'])}): {nodes}")
        view.shot(name)
        if name == "login":
            view.login()
    view.assert_clean()
    assert not found, "axe-core found WCAG A/AA violations:\n" + "\n".join(found)
