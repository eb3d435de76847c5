"""The console's Logs page (issue 12, part B): levels in every format the stack writes, rotated
files, search with highlighting, a level filter, download of a whole file, the merged tail of every
watcher, and follow with the same filters; absolute UTC beside relative times on the audit page.

One real writer for the module (:class:`testkit.writer.Stack`, logging to ``log/writer-test.log``)
and the console app on it through Flask's test client, CSRF on as in production. The line searched
for is one the writer itself writes when a request cannot be decoded.
"""
from __future__ import annotations

import html
import re
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from testkit.helpers import ConsoleClient, wait_for
from testkit.writer import Stack
from webapp import create_app

#: Each line of the page's log: its level class and its text (marks and the watcher label kept).
LINE_RE = re.compile(r'<span class="l-(\w+)"[^>]*>(.*?)\n</span>', re.S)

FORMATS = """\
2026-12-02 00:28:46,316 INFO [4242] writer ready: pid 4242
2026-12-02 00:28:47,001 WARNING [4242] writer: drain deadline reached with 3 requests queued
2026-12-02 00:28:48,002 ERROR [4242] writer: cannot open the database
Traceback (most recent call last):
  File "x.py", line 1, in <module>
ValueError: boom
2026-12-02 00:28:49 circus[77] [INFO] ticks started
2026-12-02 00:28:50 circus[77] [ERROR] ticks: flapping detected: reached max retry limit (3)
2026-12-02 00:28:51 circus[77] [WARNING] watchdog: writer pid 9 sent no heartbeat
[2026-12-02 00:28:52 +0000] [88] [INFO] Booting worker with pid: 89
[2026-12-02 00:28:53 +0000] [88] [ERROR] Worker (pid:89) was sent SIGKILL! Perhaps out of memory?
[2026-12-02 00:28:54 +0000] [88] [WARNING] Worker with pid 90 was terminated due to signal 15
127.0.0.1 - - [02/Dec/2026:00:28:55 +0000] "GET /api/health HTTP/1.1" 200 15 "-" "curl/8"
127.0.0.1 - - [02/Dec/2026:00:28:56 +0000] "GET /api/boom HTTP/1.1" 500 15 "-" "curl/8"
"""
EXPECTED_LEVELS = ["info", "warning", "error", "error", "error", "error", "info", "error", "warning", "info",
                   "error", "warning", "info", "error"]


Console = ConsoleClient  # the name the tests (and their importers) use


def lines_of(page: Any) -> list[tuple[str, str]]:
    """(level, text) of each line in the page's log, as the page shows it (marks and labels read as text)."""
    body = page.text.split("data-log", 1)[1].split("</pre>", 1)[0]
    return [(level, html.unescape(re.sub(r"<[^>]+>", "", text))) for level, text in LINE_RE.findall(body)]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    st = Stack.create()
    try:
        st.start_writer()
        yield st
    finally:
        st.close()


@pytest.fixture(scope="module")
def console(stack: Stack) -> Console:
    return Console.logged_in(create_app("console", stack.settings))


def undecodable_request(stack: Stack, size: int) -> None:
    """Send the writer ``size`` bytes that are no request: it logs a warning naming the size, and answers."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(stack.settings.writer_endpoint)
        sock.send(b"\xc1" * size)  # 0xc1: a byte msgpack never uses
        assert sock.poll(20_000), "the writer did not answer"
        sock.recv_multipart()
    finally:
        sock.close()


def test_search_finds_a_line_the_writer_wrote_moments_before(console: Console, stack: Stack) -> None:
    size = 3000 + secrets.randbelow(5000)
    needle = f"undecodable request ({size} bytes)"
    undecodable_request(stack, size)
    wait_for("the writer's warning in its log", lambda: needle in stack.writer_log(), timeout=30)

    page = console.get("/console/logs", query_string={"file": "writer-test.log", "q": needle.upper()})  # any case
    assert page.status_code == 200
    found = lines_of(page)
    assert len(found) == 1 and found[0][0] == "warning", found
    assert f"<mark>{html.escape(needle)}</mark>" in page.text  # highlighted as written, not as typed
    assert "1 line matches" in page.text

    # The level filter: a warning is kept from "warning" down, not by "error".
    args = {"file": "writer-test.log", "q": needle}
    assert len(lines_of(console.get("/console/logs", query_string={**args, "level": "warning"}))) == 1
    assert lines_of(console.get("/console/logs", query_string={**args, "level": "error"})) == []
    errors_only = lines_of(console.get("/console/logs?file=writer-test.log&level=error"))
    assert all(level == "error" for level, _ in errors_only)

    # The merged view of every watcher finds it too, named by the log it came from.
    merged = console.get("/console/logs", query_string={"file": "all", "q": needle})
    assert merged.status_code == 200
    assert [t for _, t in lines_of(merged)] == [
        f"writer-test {line}" for line in stack.writer_log().splitlines() if needle in line]
    assert '<span class="l-w">writer-test</span>' in merged.text


def test_every_format_we_write_gets_its_level_and_a_traceback_is_an_error(console: Console) -> None:
    (console.home / "log" / "formats.log").write_text(FORMATS)
    page = console.get("/console/logs?file=formats.log&n=100")
    assert page.status_code == 200
    assert [level for level, _ in lines_of(page)] == EXPECTED_LEVELS
    errors = lines_of(console.get("/console/logs?file=formats.log&level=error"))
    assert [t for _, t in errors] == [line for line, lvl in zip(FORMATS.splitlines(), EXPECTED_LEVELS, strict=True)
                                      if lvl == "error"]
    warnings = lines_of(console.get("/console/logs?file=formats.log&level=warning"))
    assert {level for level, _ in warnings} == {"error", "warning"} and len(warnings) == 10


def test_rotated_files_are_listed_and_read_and_nothing_else_is(console: Console) -> None:
    log_dir = console.home / "log"
    (log_dir / "rot.log").write_text("current\n")
    (log_dir / "rot.log.1").write_text("2026-12-02 00:00:01,000 ERROR [1] older one\n")
    (log_dir / "rot.log.2").write_text("oldest\n")
    (log_dir / "rot.log.0").write_text("not circus's naming\n")
    page = console.get("/console/logs?file=rot.log")
    assert page.status_code == 200
    for name in ("rot.log.1", "rot.log.2"):
        assert f'value="{name}"' in page.text and f"file={name}" in page.text
    assert "2 older files" in page.text and "rot.log.0" not in page.text
    older = console.get("/console/logs?file=rot.log.1")
    assert lines_of(older) == [("error", "2026-12-02 00:00:01,000 ERROR [1] older one")]
    for bad in ("rot.log.0", "rot.log.1/../rot.log", "../admin-password", "rot.log.1%00"):
        r = console.get(f"/console/logs?file={bad}")
        assert r.status_code == 400 and "no log file named" in r.text, bad


def test_download_streams_the_whole_file_and_only_a_listed_one(console: Console, stack: Stack) -> None:
    log_dir = console.home / "log"
    big = "".join(f"2026-12-02 00:00:00,000 INFO [1] line {i} {'x' * 80}\n" for i in range(4000)).encode()
    (log_dir / "big.log").write_bytes(big)  # 380 KiB: several 64 KiB reads
    r = console.get("/console/logs/download?file=big.log")
    assert r.status_code == 200 and r.data == big
    assert r.headers["Content-Disposition"] == 'attachment; filename="big.log"'
    assert r.headers["Content-Length"] == str(len(big)) and r.mimetype == "text/plain"
    (log_dir / "link.log").symlink_to(console.home / "admin-password")
    for bad in ("link.log", "../admin-password", "/etc/passwd", "", "tickstack.db"):
        r = console.get(f"/console/logs/download?file={bad}")
        assert r.status_code == 400 and "no log file named" in r.text, bad
    page = console.get("/console/logs?file=big.log&n=1")
    assert 'href="/console/logs/download?file=big.log"' in page.text


def test_inputs_are_checked_with_a_clear_message(console: Console) -> None:
    cases = {
        "/console/logs?file=formats.log&level=loud": "is not a level",
        f"/console/logs?file=formats.log&q={'a' * 201}": "at most 200",
        "/console/logs?file=formats.log&q=a%0Ab": "control characters",
        "/console/logs?file=formats.log&n=0": "out of range",
        "/console/api/log?file=formats.log&offset=0&level=loud": "is not a level",
        "/console/api/logs/all?cursor=../x.log:0": "not FILE:OFFSET",
        "/console/api/logs/all?cursor=formats.log:ten": "not a whole number",
    }
    for url, message in cases.items():
        r = console.get(url)
        assert r.status_code == 400 and message in html.unescape(r.text), (url, r.text[:300])


def test_follow_gets_new_lines_with_their_level_and_the_filters(console: Console) -> None:
    path = console.home / "log" / "follow.log"
    path.write_text("2026-12-02 00:00:00,000 INFO [1] start\n")
    offset = path.stat().st_size
    with path.open("a") as f:
        f.write("2026-12-02 00:00:01,000 INFO [1] calm\n2026-12-02 00:00:02,000 ERROR [1] broke\n  detail\n")
    got = console.get(f"/console/api/log?file=follow.log&offset={offset}").json
    assert got["lines"][1:] == ["2026-12-02 00:00:02,000 ERROR [1] broke", "  detail"]
    assert got["levels"] == ["info", "error", "error"]
    only = console.get(f"/console/api/log?file=follow.log&offset={offset}&level=error").json
    assert only["levels"] == ["error", "error"] and only["offset"] == got["offset"]
    searched = console.get(f"/console/api/log?file=follow.log&offset={offset}&q=CALM").json
    assert searched["lines"] == ["2026-12-02 00:00:01,000 INFO [1] calm"]

    # The merged view: a cursor of offsets, then what each watcher's log got since, named.
    page = console.get("/console/logs?file=all")
    cursor = re.search(r'data-cursor="([^"]*)"', page.text).group(1)
    assert "follow.log:" in cursor and "writer-test.log:" in cursor
    with path.open("a") as f:
        f.write("2026-12-02 00:00:03,000 WARNING [1] merged and followed\n")
    after = console.get("/console/api/logs/all", query_string={"cursor": cursor}).json
    assert [(x["watcher"], x["level"], x["text"]) for x in after["lines"] if x["watcher"] == "follow"] == [
        ("follow", "warning", "2026-12-02 00:00:03,000 WARNING [1] merged and followed")]
    again = console.get("/console/api/logs/all", query_string={"cursor": after["cursor"], "q": "merged and followed"})
    assert again.json["lines"] == []


def test_audit_and_logs_show_absolute_utc_beside_relative_times(console: Console) -> None:
    for url in ("/console/audit", "/console/logs?file=formats.log"):
        page = console.get(url)
        assert page.status_code == 200
        assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ">\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</time> '
                         r'<span class="ago" data-ago="\d+">[^<]* ago</span>', page.text), url
