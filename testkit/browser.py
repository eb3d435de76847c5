"""The one way tests drive a browser: Debian's Chromium under Playwright (``playwright install``
cannot download its own browsers here), headless, with nothing reaching outside the machine."""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
#: Where the browser tests write their screenshots and logs (git-ignored); the suite's PostgreSQL run
#: writes under ``test-output/postgresql/`` (set by ``tests/conftest.py``), so the two runs of
#: ``make test``, side by side, never write one file.
OUTPUT_ROOT = Path(__file__).resolve().parent.parent / "test-output"
_SQLITE_OUTPUT_ROOT = OUTPUT_ROOT


def output_dir(name: str) -> Path:
    """``test-output/<name>`` of this run (see :data:`OUTPUT_ROOT`)."""
    return OUTPUT_ROOT / name


#: The widths (px) and colour schemes the pages are checked at.
WIDTHS = (390, 1400)
SCHEMES = ("light", "dark")
#: The one of them the PostgreSQL run checks too: the narrowest, dark.
ON_BOTH_DATABASES = (390, "dark")


def widths_and_schemes(test: str) -> list[Any]:
    """``(width, scheme)`` parameter sets for ``test`` ("path::name"): every one in the SQLite run,
    :data:`ON_BOTH_DATABASES` alone in the PostgreSQL run (the others are ``sqlite_only``, naming
    ``test`` itself). For checks of the stylesheet (contrast, layout), which is the same whatever
    the database; the pages differ only in what they say of it, and one set checks that."""
    return [pytest.param(w, s, marks=() if (w, s) == ON_BOTH_DATABASES else pytest.mark.sqlite_only(test))
            for w in WIDTHS for s in SCHEMES]


def update_docs(variable: str) -> bool:
    """Whether this run copies its screenshots into ``docs/`` (``variable`` set to 1): the SQLite
    run only, so the PostgreSQL run beside it never overwrites the pictures the README shows."""
    return os.environ.get(variable) == "1" and OUTPUT_ROOT == _SQLITE_OUTPUT_ROOT
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
#: The charts of a page whose first request is not answered yet (see :meth:`ConsoleView.settle`).
CHARTS_PENDING = "[data-chart]:not([data-loaded]), [data-candles]:not([data-loaded])"
#: Everything that makes the document wider than the window (what would scroll sideways).
TOO_WIDE_JS = """
() => {
  const width = document.documentElement.clientWidth;
  return {scrollWidth: document.documentElement.scrollWidth, width: width,
          culprits: Array.from(document.querySelectorAll("body *"))
                         .filter(e => e.getBoundingClientRect().right > width + 1)
                         .slice(0, 5).map(e => e.tagName.toLowerCase() + "." + e.className)};
}
"""


def require_chromium() -> None:
    """Skip the test when Debian's chromium is missing, with how to get it; in CI (``CI`` set),
    where ``.ci/run`` installs it, fail instead."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium, closed afterwards (see :func:`require_chromium`)."""
    require_chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def watch(context: BrowserContext, page: Page, outside: list[str], js_errors: list[str]) -> None:
    """Stop every request of ``context`` that leaves 127.0.0.1 (its URL goes to ``outside``), and
    collect ``page``'s uncaught exceptions and console errors into ``js_errors``. Routes added
    later take precedence (Playwright tries the last one first), e.g. a file served to the page."""
    def guard(route: Any, request: Any) -> None:
        if urlsplit(request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(request.url)
            route.abort("blockedbyclient")

    context.route("**/*", guard)
    page.on("pageerror", lambda e: js_errors.append(f"{page.url}: {e}"))
    page.on("console", lambda m: m.type == "error" and js_errors.append(f"{page.url}: {m.text}"))


@dataclass
class ConsoleView:
    """A browser context on the console, and what it must never do (reach outside 127.0.0.1,
    raise in JavaScript: the tests that make one collect those into the two lists)."""

    context: BrowserContext
    page: Page
    base: str
    #: The stack's home: the admin password is there once the console made it (on its first request).
    home: Path
    outside: list[str] = field(default_factory=list, kw_only=True)
    js_errors: list[str] = field(default_factory=list, kw_only=True)

    def watch(self) -> None:
        """See :func:`watch`."""
        watch(self.context, self.page, self.outside, self.js_errors)

    def assert_clean(self) -> None:
        assert self.outside == [], f"requests to outside 127.0.0.1: {self.outside}"
        assert self.js_errors == [], f"JavaScript errors: {self.js_errors}"

    def goto(self, path: str) -> None:
        response = self.page.goto(self.base + path)
        assert response is not None and response.ok, f"{path}: {response and response.status}"

    def settle(self, path: str) -> None:
        """Open ``path`` and let its scripts draw: a page of charts until each chart's first request
        is answered (``charts.js`` then marks it ``data-loaded``), any other until its live poll's
        first answer (the live mark then reads "live · <time> UTC"), then a moment for the layout
        and the charts' next frame. Waits for the event, not a fixed time: a fixed 1.5 s was too
        long on an idle machine and, on a loaded one, could let a check run over an empty chart."""
        self.goto(path)
        if self.page.locator("[data-chart], [data-candles]").count():
            expect(self.page.locator(CHARTS_PENDING)).to_have_count(0)
        else:
            live = self.page.locator("[data-live-text]")
            if live.count():
                expect(live.first).to_contain_text("live \u00b7")
        self.page.wait_for_timeout(400)

    def login(self) -> None:
        self.goto("/console/login")
        self.page.fill("#username", "admin")
        self.page.fill("#password", (self.home / "admin-password").read_text().strip())
        self.page.click("button[type=submit]")
        self.page.wait_for_url(re.compile(r"/console/watchers$"))
