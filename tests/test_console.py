"""The admin console through Flask's test client, with CSRF protection on as in production.

Every page and action is tried three ways: without a session (redirected to the login page, nothing
changes), without a CSRF token (400, nothing changes) and logged in with the token (it works, and is
in the audit log). Actions on circus run against the real circusd with the real circus.ini
(:class:`testkit.circus.CircusStack`, one for the module); the others need only a writer (one for the
module too). Tests share those stacks, so they compare counts before and after rather than totals.
Over 500 lines for the same reason: one file per shared stack, sections per console page.
"""
from __future__ import annotations

import dataclasses
import fcntl
import html
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from db.backups import BACKUP_LOCK, BACKUP_RE, backup_suffix
from db.client import WriterClient
from db.config import ConfigError, load_settings
from db.engine import connect_read_only
from db.server import pg_program
from testkit.circus import WATCHERS, CircusStack
from testkit.env import ROOT, new_home
from testkit.env import isolated_env as stack_env
from testkit.gunicorn import get_json
from testkit.helpers import CSRF_RE, query, wait_for
from testkit.writer import Stack
from webapp import create_app
from webapp.auth_state import LoginThrottle, Schedule

FLASH_RE = re.compile(r'class="flash flash-(\w+)"[^>]*>([^<]*)<')
PAGES = ("/console/", "/console/watchers", "/console/database", "/console/charts", "/console/market",
         "/console/logs", "/console/audit")
APIS = ("/console/api/watchers", "/console/api/database", "/console/api/series?name=db.bytes",
        "/console/api/bars?symbol=BTCUSD&timeframe=1m", "/console/api/trades", "/console/api/log?file=writer.log")
DB_ACTIONS = ("/console/database/checkpoint", "/console/database/backup", "/console/database/quick_check")
NOW = int(time.time() * 1000)


# --------------------------------------------------------------------------- helpers


class Console:
    """A browser on the console: a cookie jar, a remote address, the CSRF token of its session."""

    def __init__(self, app: Flask, addr: str = "127.0.0.1") -> None:
        self.app = app
        self.client = app.test_client()
        self.addr = addr
        self.home: Path = app.config["TICKSTACK"].home

    def get(self, url: str, **kw: Any) -> Any:
        return self.client.get(url, environ_base={"REMOTE_ADDR": self.addr}, **kw)

    def post(self, url: str, data: dict[str, Any] | None = None, csrf: bool = True, **kw: Any) -> Any:
        data = dict(data or {})
        if csrf:
            data.setdefault("csrf_token", self.token())
        return self.client.post(url, data=data, environ_base={"REMOTE_ADDR": self.addr}, **kw)

    def token(self) -> str:
        """The session's CSRF token, from a page's form (the login page when logged out)."""
        page = self.get("/console/audit")
        if page.status_code != 200:
            page = self.get("/console/login")
        return CSRF_RE.search(page.text).group(1)

    def password(self) -> str:
        return (self.home / "admin-password").read_text().strip()

    def login(self, username: str = "admin", password: str | None = None, **data: str) -> Any:
        token = CSRF_RE.search(self.get("/console/login").text).group(1)
        return self.client.post("/console/login", environ_base={"REMOTE_ADDR": self.addr}, data={
            "csrf_token": token, "username": username,
            "password": self.password() if password is None else password, **data})


def flashes(response: Any) -> list[tuple[str, str]]:
    return FLASH_RE.findall(response.text)


def audit_rows(settings: Any, since_id: int = 0) -> list[tuple]:
    return query(settings, "SELECT id, actor, action, target, result, detail FROM audit_log WHERE id > ? ORDER BY id",
                 (since_id,))


def last_audit_id(settings: Any) -> int:
    return query(settings, "SELECT coalesce(max(id), 0) FROM audit_log")[0][0]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def wstack() -> Iterator[Stack]:
    """One writer for the module's tests that need no circus; seeded with market data."""
    home = new_home()
    st = Stack(home, stack_env(home))
    try:
        st.start_writer()
        with WriterClient(settings=st.settings, deadline=20) as client:
            client.call("insert_ticks", ticks=[
                {"symbol": "BTCUSD", "ts": NOW - 2000, "bid": 100.0, "ask": 100.4, "source": "t", "seq": 1},
                {"symbol": "BTCUSD", "ts": NOW - 1000, "bid": 101.0, "ask": 101.5, "source": "t", "seq": 2},
                {"symbol": "EURUSD", "ts": NOW - 1000, "bid": 1.1, "ask": 1.1002, "source": "t", "seq": 3}])
            start = (NOW // 60_000 - 30) * 60_000
            client.call("upsert_bars", bars=[
                {"symbol": "BTCUSD", "timeframe": "1m", "ts": start + i * 60_000, "open": 100.0 + i, "high": 101.5 + i,
                 "low": 99.5 + i, "close": 101.0 + i, "volume": 5.0} for i in range(30)])
        yield st
    finally:
        for proc in st.procs:
            st.stop(proc)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def console(wstack: Stack) -> Console:
    """Logged in as admin, on the module's writer."""
    c = Console(create_app("console", wstack.settings))
    assert c.login().status_code == 302
    return c


@pytest.fixture(scope="module")
def cstack() -> Iterator[CircusStack]:
    """The real stack under circusd, sampling every second."""
    stack = CircusStack(TICKSTACK_SAMPLE_EVERY_S="1")
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


@pytest.fixture
def cconsole(cstack: CircusStack) -> Console:
    c = Console(create_app("console", cstack.settings))
    assert c.login().status_code == 302
    return c


# --------------------------------------------------------------------------- login


def test_password_is_generated_0600_logged_by_path_only_and_reused(caplog: pytest.LogCaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    home = new_home()
    try:
        env = stack_env(home)
        settings = load_settings(env)
        with caplog.at_level(logging.INFO, logger="tickstack.console"):
            create_app("console", settings)
        path = home / "admin-password"
        password = path.read_text().strip()
        assert len(password) >= 20
        assert (path.stat().st_mode & 0o777) == 0o600
        assert str(path) in caplog.text and password not in caplog.text
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tickstack.console"):
            create_app("console", settings)
        assert path.read_text().strip() == password and "generated" not in caplog.text
        c = Console(create_app("console", load_settings({**env, "TICKSTACK_ADMIN_USER": "ops@desk"})))
        c.app.config["CONSOLE_AUDIT_DEADLINE"] = 0.2  # no writer here: audit records are spooled
        assert c.login("admin").status_code == 200  # the user name is now ops@desk
        assert c.login("ops@desk").status_code == 302
        with pytest.raises(ConfigError, match="TICKSTACK_ADMIN_USER"):
            create_app("console", load_settings({**env, "TICKSTACK_ADMIN_USER": "no spaces"}))
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_wrong_password_fails_and_is_rate_limited_per_address_and_user() -> None:
    home = new_home()  # a home of its own: the limit would lock admin out of the other tests
    try:
        st = Stack(home, stack_env(home))
        app = create_app("console", st.settings)
        app.config["CONSOLE_AUDIT_DEADLINE"] = 0.2  # no writer: denied logins are spooled for later
        attacker = Console(app, "10.1.1.1")
        for _ in range(5):
            r = attacker.login(password="hunter2-guess")
            assert r.status_code == 200 and "Wrong user name or password" in r.text
            assert attacker.get("/console/watchers").status_code == 302
        r = attacker.login()  # the right password, but too late
        assert r.status_code == 429 and "Too many failed logins" in r.text
        assert 0 < int(r.headers["Retry-After"]) <= 300
        assert attacker.get("/console/watchers").status_code == 302
        assert Console(app, "10.2.2.2").login().status_code == 302  # another peer is not locked out (issue 8)
        assert Console(app, "10.1.1.1").login("someone", "x").status_code == 429  # per address
        other = Console(app, "10.3.3.3")
        assert other.login("someone", "x").status_code == 200  # a new address and name may try
        spool = (home / "run" / "console-audit-spool.jsonl").read_text()
        assert spool.count('"action": "login"') == 7 and '"result": "denied"' in spool  # 10.2.2.2's login too
        assert "hunter2" not in spool  # the password tried is never recorded
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_login_throttle_counts_per_peer_and_starts_afresh(tmp_path: Path) -> None:
    throttle = LoginThrottle(tmp_path / "throttle.json", Schedule(free=2, base_s=0.5, cap_s=1.0, forget_s=0.6))
    assert throttle.admit("a") == 0 and throttle.admit("a") == 0  # the free checks
    assert 0 < throttle.admit("a") <= 0.5 and throttle.admit("b") == 0  # per peer
    time.sleep(0.7)
    assert throttle.admit("a") == 0 and throttle.failures("a") == 1  # forgotten after forget_s
    (tmp_path / "throttle.json").write_text("{not json")
    assert throttle.admit("a") == 0  # a damaged file starts afresh


def test_login_redirects_to_next_inside_the_console_only_and_logout_ends_the_session(wstack: Stack) -> None:
    c = Console(create_app("console", wstack.settings))
    r = c.get("/console/audit?page=1")
    assert r.status_code == 302 and r.headers["Location"] == "/console/login?next=/console/audit?page%3D1"
    assert c.login(next="/console/audit?page=1").headers["Location"] == "/console/audit?page=1"
    # A CR or LF in the target was a 500 after the login was made (a security review, round 41).
    for evil in ("//evil.example/", "https://evil.example/console/", "/elsewhere", "/console/\\evil",
                 "/console/\r\nSet-Cookie: x=y", "/console/\n", "/console/\x7f"):
        assert Console(c.app).login(next=evil).headers["Location"] == "/console/watchers", evil
    r = c.get("/console/login?next=/console/%0a")  # logged in: straight on, to a safe place
    assert r.status_code == 302 and r.headers["Location"] == "/console/watchers"
    since = last_audit_id(wstack.settings)
    assert c.post("/console/logout", csrf=False).status_code == 400  # logout needs the token too
    assert c.get("/console/watchers").status_code == 200
    r = c.post("/console/logout")
    assert r.status_code == 302 and r.headers["Location"] == "/console/login"
    assert c.get("/console/watchers").status_code == 302
    assert [(a, act, res) for _, a, act, _, res, _ in audit_rows(wstack.settings, since)] == [
        ("admin", "logout", "ok")]


# --------------------------------------------------------------------------- no session, no token


def test_every_page_needs_a_session(wstack: Stack) -> None:
    c = Console(create_app("console", wstack.settings))
    for url in PAGES:
        r = c.get(url)
        assert r.status_code == 302 and r.headers["Location"].startswith("/console/login"), url
    for url in APIS:
        r = c.get(url)
        assert r.status_code == 401 and r.json == {"error": "login required"}, url
    assert c.get("/console/health").json == {"status": "ok"}
    login = c.get("/console/login")
    assert login.status_code == 200 and "Log in" in login.text
    assert "default-src 'self'" in login.headers["Content-Security-Policy"]
    css = c.get("/static/console/console.css")
    assert css.status_code == 200 and css.headers["X-Content-Type-Options"] == "nosniff"
    assert login.headers["X-Frame-Options"] == "DENY" and login.headers["X-Content-Type-Options"] == "nosniff"
    root = c.get("/")  # the redirect to the console, as the static files, had none (round 41)
    assert root.status_code == 302 and root.headers["X-Frame-Options"] == "DENY"


def test_a_path_or_method_no_route_has_gets_the_consoles_own_error_page(wstack: Stack) -> None:
    """A mistyped console address answered Werkzeug's bare 404 page, without the console's look or a
    way back (a new user's run, round 40); a wrong method its bare 405. Now the console's error page
    (JSON under /console/api/), logged in or not, saying the path."""
    for logged_in in (False, True):
        c = Console(create_app("console", wstack.settings))
        if logged_in:
            assert c.login().status_code == 302
        r = c.get("/console/watcherz")
        assert r.status_code == 404 and "console.css" in r.text, r.text[:300]
        assert "Page not found" in r.text and "/console/watcherz" in r.text
        assert ('aria-label="Console pages"' in r.text) is logged_in  # the pages' links, once logged in
        r = c.get("/nothing/<script>")
        assert r.status_code == 404 and "<script>" not in r.text and "&lt;script&gt;" in r.text
        r = c.get("/console/api/nothing")
        assert r.status_code == 404 and r.json["error"].startswith("no such console API path"), r.text
        r = c.client.delete("/console/login")
        assert r.status_code == 405 and "console.css" in r.text and "DELETE" in r.text, r.text[:300]
        assert "GET" in r.headers["Allow"]


def _state(st: Stack) -> tuple:
    s = st.settings
    return (last_audit_id(s), sorted(p.name for p in s.backup_dir.iterdir()),
            query(s, "SELECT id, status FROM trades ORDER BY id"))


def test_actions_without_a_session_or_without_the_token_change_nothing(wstack: Stack) -> None:
    with WriterClient(settings=wstack.settings, deadline=20) as client:
        trade = client.call("open_trade", symbol="BTCUSD", side="buy", size=1.0)["id"]
    actions = [*DB_ACTIONS, f"/console/trades/{trade}/close", "/console/watchers/writer/restart",
               "/console/watchers/writer/stop"]
    before = _state(wstack)
    anonymous = Console(create_app("console", wstack.settings))
    for url in actions:
        r = anonymous.post(url, {"confirm": "yes"})  # a valid token of a session that is not logged in
        assert r.status_code == 302 and r.headers["Location"] == "/console/login", url
        r = anonymous.post(url, {"confirm": "yes"}, csrf=False)
        assert r.status_code == 400, url
    assert _state(wstack) == before
    admin = Console(create_app("console", wstack.settings))
    assert admin.login().status_code == 302
    before = _state(wstack)  # the login is audited
    for url in actions:
        r = admin.post(url, {"confirm": "yes"}, csrf=False)
        assert r.status_code == 400 and "CSRF token" in r.text and "Traceback" not in r.text, url
        r = admin.post(url, {"confirm": "yes", "csrf_token": "forged"})
        assert r.status_code == 400, url
    assert _state(wstack) == before


# --------------------------------------------------------------------------- database


def test_database_page_and_buttons_are_audited(console: Console, wstack: Stack) -> None:
    s = wstack.settings
    on_server = s.database_path is None
    page = console.get("/console/database")
    assert page.status_code == 200
    assert 'data-kpi="lock_errors">0<' in page.text and "kpi-good" in page.text
    if on_server:  # the server's card; no WAL of ours, no checkpoint button
        assert "data-server" in page.text and "pg_database_size" in page.text and "journal" not in page.text.lower()
        assert "Checkpoint (TRUNCATE)" not in page.text and "the server checkpoints its own WAL" in page.text
    else:
        assert "pill-role-writer" in page.text and "journal" in page.text.lower()
    api = console.get("/console/api/database").json
    assert api["writer"]["lock_errors"] == 0 and (api["files"] is None if on_server else api["files"]["db"] > 0)
    since = last_audit_id(s)

    r = console.post("/console/database/checkpoint", follow_redirects=True)
    if on_server:
        assert flashes(r) == [("warn", "A PostgreSQL server checkpoints its own WAL: there is nothing to do here.")]
    else:
        assert any(k == "ok" and "Checkpoint done" in m for k, m in flashes(r)), flashes(r)
    r = console.post("/console/database/backup", follow_redirects=True)
    assert any(k == "ok" and "Backup written" in m for k, m in flashes(r)), flashes(r)
    r = console.post("/console/database/quick_check", follow_redirects=True)
    if on_server:  # amcheck's bt_index_check of every index
        assert any(k == "ok" and re.fullmatch(r"amcheck of \d+ indexes: ok \(\d+ ms\)\.", m) for k, m in flashes(r)), \
            flashes(r)
    else:
        assert any(k == "ok" and "quick_check: ok" in m for k, m in flashes(r)), flashes(r)
    rows = audit_rows(s, since)
    assert [(actor, action, result) for _, actor, action, _, result, _ in rows] == [
        *([] if on_server else [("admin", "db.checkpoint", "ok")]), ("admin", "db.backup", "ok"),
        ("admin", "db.quick_check", "ok")]
    suffix = "dump" if on_server else "db"
    backups = [p for p in s.backup_dir.iterdir() if re.fullmatch(rf"tickstack-\d{{8}}T\d{{6}}Z\.{suffix}", p.name)]
    assert len(backups) == 1 and rows[-2][3] == backups[0].name
    if on_server:  # a pg_dump archive with the ticks' data
        listed = subprocess.run([pg_program("pg_restore"), "--list", str(backups[0])], capture_output=True,
                                text=True, timeout=60)
        assert "TABLE DATA public ticks" in listed.stdout, listed.stderr
    else:
        con = connect_read_only(backups[0])
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute("SELECT count(*) FROM ticks").fetchone()[0] >= 3
        con.close()
    page = console.get("/console/database").text
    assert backups[0].name in page and "by admin" in page  # last backup and last quick_check


def test_a_restart_of_every_watcher_runs_one_at_a_time(console: Console, wstack: Stack) -> None:
    """Two restart-alls at once (two tabs, a double submit): every watcher was restarted twice, and
    the first to restart this console killed the other request midway, unanswered and unaudited
    (fault hunt as an operator). While one runs (its lock held, by any worker of the console),
    another is told so and runs nothing."""
    since = last_audit_id(wstack.settings)
    fd = os.open(wstack.home / "run" / "console-restart-all.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the running one holds it
        r = console.post("/console/watchers/restart-all", {"confirm": "yes"})
    finally:
        os.close(fd)
    assert r.status_code in (302, 303), r.status_code
    shown = flashes(console.get(r.headers["Location"]))
    assert any("A restart of every watcher is already running" in text for _level, text in shown), shown
    assert [row for row in audit_rows(wstack.settings, since) if row[2] == "watchers.restart_all"] == []


def test_a_backup_of_the_same_second_already_there_does_not_fail_the_consoles(console: Console,
                                                                            wstack: Stack) -> None:
    """Backups are named by the second they start in. One of this second and the next already there (the
    jobs worker's, made a moment before) leaves the console's to the second after, as the jobs worker's
    does: never an error, never over another backup. On PostgreSQL the console looked for a ``.db`` of
    this second, found none, and its ``.dump`` of the same name then failed: "exists; choose another
    path or pass --force" (seen in the suite's PostgreSQL run, the jobs worker's first backup and the
    console's in one second). And one backup at a time."""
    s = wstack.settings
    suffix = backup_suffix(s)
    s.backup_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    before = set(s.backup_dir.iterdir())  # the module's stack: earlier tests' backups
    now = time.time()
    taken = {s.backup_dir / f"tickstack-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now + k))}{suffix}"
             for k in (0, 1)}
    for path in taken:
        path.write_bytes(b"another backup")
    r = console.post("/console/database/backup", follow_redirects=True)
    assert any(k == "ok" and "Backup written" in m for k, m in flashes(r)), flashes(r)
    assert all(path.read_bytes() == b"another backup" for path in taken)
    written = [p for p in s.backup_dir.iterdir() if BACKUP_RE.fullmatch(p.name) and p not in taken | before]
    assert len(written) == 1 and written[0].suffix == suffix, sorted(p.name for p in s.backup_dir.iterdir())
    # One at a time: while another process writes one (db.backups.BACKUP_LOCK), the console's is refused,
    # and the audit log says so (an operator's action that did nothing is still an action).
    since = last_audit_id(s)
    with open(s.run_dir / BACKUP_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = console.post("/console/database/backup", follow_redirects=True)
    assert flashes(r) == [("warn", "A backup is already running; wait for it to finish.")]
    assert set(s.backup_dir.iterdir()) == before | taken | set(written)
    assert [row[1:] for row in audit_rows(s, since)] == [
        ("admin", "db.backup", str(s.backup_dir), "skipped", "another backup was being written (run/backup.lock held)")]


def test_audit_spools_while_the_writer_is_away_and_sends_later(wstack: Stack) -> None:
    away = dataclasses.replace(wstack.settings, writer_endpoint=f"ipc://{wstack.home}/run/nobody.sock")
    lost = Console(create_app("console", away))
    lost.app.config.update(CONSOLE_AUDIT_DEADLINE=0.2, CONSOLE_WRITER_DEADLINE=0.2)
    assert lost.login().status_code == 302
    spool = wstack.home / "run" / "console-audit-spool.jsonl"
    assert '"action": "login"' in spool.read_text()
    since = last_audit_id(wstack.settings)
    back = Console(create_app("console", wstack.settings))
    assert back.login().status_code == 302  # sends the spooled record first, then its own
    rows = audit_rows(wstack.settings, since)
    assert [(a, act) for _, a, act, _, _, _ in rows] == [("admin", "login"), ("admin", "login")]
    assert spool.read_text() == ""


def test_the_audit_log_page_sends_what_was_spooled_once_the_writer_is_back(wstack: Stack) -> None:
    """A record spooled while the writer was away reached the writer only with the operator's next
    action: the audit log's page, looked at after the writer came back, went on without it (round
    36's operator hunt, left then). The page sends the spool first, once the writer answers; while
    it does not, the page is served at once, the record kept."""
    away = dataclasses.replace(wstack.settings, writer_endpoint=f"ipc://{wstack.home}/run/nobody.sock")
    lost = Console(create_app("console", away))
    lost.app.config.update(CONSOLE_AUDIT_DEADLINE=0.2, CONSOLE_WRITER_DEADLINE=0.2)
    assert lost.login().status_code == 302
    spool = wstack.home / "run" / "console-audit-spool.jsonl"
    assert spool.read_text().count('"action": "login"') == 1
    page = lost.get("/console/audit")  # the writer still away: served, the record kept
    assert page.status_code == 200 and spool.read_text().count('"action": "login"') == 1
    since = last_audit_id(wstack.settings)

    # The same console's processes, with the writer back (as after a start of it through circusctl):
    # the page itself, no action, sends the record and shows it.
    back = Console(create_app("console", wstack.settings))
    cookie = lost.app.config["SESSION_COOKIE_NAME"]
    back.client.set_cookie(cookie, lost.client.get_cookie(cookie).value)
    page = back.get("/console/audit")
    assert page.status_code == 200, page.status_code
    assert spool.read_text() == ""
    rows = audit_rows(wstack.settings, since)
    assert [(a, act) for _, a, act, _, _, _ in rows] == [("admin", "login")], rows


# --------------------------------------------------------------------------- logs


def test_log_tail_rejects_anything_not_listed_and_follows_by_offset(console: Console, wstack: Stack) -> None:
    log_dir = wstack.home / "log"
    app_log = log_dir / "app.log"
    app_log.write_text("".join(f"line {i}\n" for i in range(1, 301)))
    (log_dir / "notes.txt").write_text("not a log")
    (log_dir / "evil.log").symlink_to(wstack.home / "secret-key")
    for bad in ("../secret-key", "../log/app.log", "/etc/passwd", "app.log/../../secret-key", "notes.txt",
                "evil.log", "app.log\x00", "", "%2e%2e%2fsecret-key"):
        for url in (f"/console/logs?file={bad}", f"/console/api/log?file={bad}&offset=0"):
            r = console.get(url)
            assert r.status_code == 400 and "no log file named" in r.text and "Traceback" not in r.text, url
    for n in ("0", "5001", "-1", "ten"):
        assert console.get(f"/console/logs?file=app.log&n={n}").status_code == 400, n
    page = console.get("/console/logs?file=app.log&n=5")
    assert page.status_code == 200
    assert re.findall(r">(line \d+)\n<", page.text) == [f"line {i}" for i in range(296, 301)]
    assert "evil.log" not in page.text and "notes.txt" not in page.text and "writer-test.log" in page.text
    offset = int(re.search(r'data-offset="(\d+)"', page.text).group(1))
    assert offset == app_log.stat().st_size
    with app_log.open("a") as f:
        f.write("line 301\nline 302\npartial")
    r = console.get(f"/console/api/log?file=app.log&offset={offset}").json
    assert r["lines"] == ["line 301", "line 302"] and r["reset"] is False
    assert console.get(f"/console/api/log?file=app.log&offset={r['offset']}").json["lines"] == []
    app_log.write_text("rotated\n")
    r = console.get(f"/console/api/log?file=app.log&offset={r['offset']}").json
    assert r["reset"] is True and r["lines"] == ["rotated"]
    assert console.get("/console/api/log?file=app.log&offset=-5").status_code == 400


# --------------------------------------------------------------------------- market, charts, audit


def test_market_page_live_pnl_and_closing_a_trade(console: Console, wstack: Stack) -> None:
    with WriterClient(settings=wstack.settings, deadline=20) as client:
        buy = client.call("open_trade", symbol="BTCUSD", side="buy", size=2.0, entry_price=100.0)["id"]
        sell = client.call("open_trade", symbol="BTCUSD", side="sell", size=1.0, entry_price=102.0)["id"]
    page = console.get("/console/market?symbol=BTCUSD&timeframe=1m")
    assert page.status_code == 200 and "EURUSD" in page.text and f'data-trade="{buy}"' in page.text
    trades = {t["id"]: t for t in console.get("/console/api/trades").json["trades"]}
    assert trades[buy]["mark"] == 101.0 and trades[buy]["pnl"] == pytest.approx(2.0)  # marked at the bid
    assert trades[sell]["mark"] == 101.5 and trades[sell]["pnl"] == pytest.approx(0.5)  # at the ask
    bars = console.get("/console/api/bars?symbol=BTCUSD&timeframe=1m&limit=10").json["bars"]
    assert len(bars) == 10 and bars[0]["time"] < bars[-1]["time"] and bars[-1]["close"] == 130.0
    for url in ("/console/market?symbol=btc usd", "/console/market?timeframe=2m",
                "/console/api/bars?symbol=BTCUSD&timeframe=1m&limit=0", "/console/api/bars?symbol=BTCUSD"):
        assert console.get(url).status_code == 400, url
    # A parameter not given is said to be required (it read "timeframe: None is not one of ...").
    assert "timeframe: required" in console.get("/console/api/bars?symbol=BTCUSD").text
    assert "symbol: required" in console.get("/console/api/bars?timeframe=1m").text

    since = last_audit_id(wstack.settings)
    confirm = console.post(f"/console/trades/{buy}/close")
    assert confirm.status_code == 200 and "Close trade #" in confirm.text
    assert query(wstack.settings, "SELECT status FROM trades WHERE id = ?", (buy,)) == [("open",)]
    r = console.post(f"/console/trades/{buy}/close?symbol=BTCUSD", {"confirm": "yes"})
    assert r.status_code == 303 and r.headers["Location"] == "/console/market?symbol=BTCUSD"
    assert query(wstack.settings, "SELECT status, exit_price, close_reason FROM trades WHERE id = ?", (buy,)) == [
        ("closed", 101.0, "console")]
    again = console.post(f"/console/trades/{buy}/close", {"confirm": "yes"}, follow_redirects=True)
    assert any(k == "error" and "already closed" in m for k, m in flashes(again)), flashes(again)
    assert [(act, target, res) for _, _, act, target, res, _ in audit_rows(wstack.settings, since)] == [
        ("trade.close", str(buy), "ok"), ("trade.close", str(buy), "error")]
    for bad in ("abc", "0", "-3"):
        assert console.post(f"/console/trades/{bad}/close", {"confirm": "yes"}).status_code == 400
    assert console.post("/console/trades/999999/close").status_code == 400  # confirm page of no trade


def test_series_api_and_charts_page(console: Console, wstack: Stack) -> None:
    now = int(time.time() * 1000)
    with WriterClient(settings=wstack.settings, deadline=20) as client:
        client.call("record_samples", samples=[
            *({"ts": now - i * 10_000, "name": "writer.ticks_per_s", "value": float(i)} for i in range(5)),
            {"ts": now - 7_200_000, "name": "writer.ticks_per_s", "value": 99.0},  # older than the hour
            *({"ts": now - i * 10_000, "name": "watcher.cpu_percent", "labels": w, "value": 1.5}
              for i in range(3) for w in ("api", "jobs"))])
    r = console.get("/console/api/series?name=writer.ticks_per_s&name=watcher.cpu_percent&minutes=60").json
    got = {(s["name"], s["label"]): s["points"] for s in r["series"]}
    assert [v for _, v in got[("writer.ticks_per_s", "")]] == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert len(got[("watcher.cpu_percent", "api")]) == 3 and ("watcher.cpu_percent", "jobs") in got
    times = [t for t, _ in got[("writer.ticks_per_s", "")]]
    assert times == sorted(times) and times[-1] == now // 1000
    for bad in ("", "?name=a&" + "&".join(f"name=s{i}" for i in range(9)), "?name=no%20spaces",
                "?name=db.bytes&minutes=0", "?name=db.bytes&minutes=1441", "?name=db.bytes&minutes=x"):
        assert console.get(f"/console/api/series{bad}").status_code == 400, bad
    page = console.get("/console/charts")
    assert page.status_code == 200 and page.text.count("data-chart ") == 6
    assert "lightweight-charts-5.2.1/lightweight-charts.standalone.production.js" in page.text
    assert "//cdn" not in page.text and "https://unpkg" not in page.text


def test_audit_log_is_newest_first_and_paginated(console: Console, wstack: Stack) -> None:
    with WriterClient(settings=wstack.settings, deadline=20) as client:
        for i in range(60):
            client.call("audit", actor="tester", action="test.page", target=f"t{i}", detail="<b>x</b>")
    first = console.get("/console/audit")
    assert first.status_code == 200
    targets = re.findall(r'<td class="mono">(t\d+)</td>', first.text)
    assert targets[:3] == ["t59", "t58", "t57"]
    assert "&lt;b&gt;x&lt;/b&gt;" in first.text and "<b>x</b>" not in first.text  # escaped
    pages = int(re.search(r"Page 1 of (\d+)", first.text).group(1))
    assert pages >= 2 and console.get(f"/console/audit?page={pages}").status_code == 200
    for bad in (pages + 1, 0, "x"):
        r = console.get(f"/console/audit?page={bad}")
        assert r.status_code == 400 and "page" in r.text, bad


def test_a_skipped_quick_check_reads_skipped_whether_recorded_so_or_as_ok_before(console: Console,
                                                                                  wstack: Stack) -> None:
    """The audit op takes "skipped" (a check that could not be made: amcheck not installed). The
    database page reads the last quick_check as skipped when its record says so, and when it is an
    "ok" whose detail says skipped (as it was recorded before "skipped" was a result); else ok."""
    skipped = '{"method": "amcheck", "ok": true, "skipped": "amcheck not installed"}'
    with WriterClient(settings=wstack.settings, deadline=20) as client:
        for result, detail, pill in (("skipped", skipped, '<span class="pill pill-warn">skipped</span>'),
                                     ("ok", skipped, '<span class="pill pill-warn">skipped</span>'),
                                     ("ok", '{"method": "quick_check", "ok": true}',
                                      '<span class="pill pill-active">ok</span>')):
            client.call("audit", actor="tester", action="db.quick_check", target="db", result=result, detail=detail)
            last = re.search(r"<dt>Last quick_check</dt>\s*<dd>(.*?)</dd>", console.get("/console/database").text,
                             re.S)
            assert last and pill in last.group(1) and "by tester" in last.group(1), (result, last and last.group(1))
    assert '<span class="pill pill-result-skipped">skipped</span>' in console.get("/console/audit").text


def test_pages_render_without_circus(console: Console) -> None:
    for url in PAGES:
        r = console.get(url, follow_redirects=True)
        assert r.status_code == 200 and "Traceback" not in r.text, url
    assert "circusd is not running" in console.get("/console/watchers").text
    r = console.post("/console/watchers/writer/restart", follow_redirects=True)
    assert any(k == "error" and "circusd is not running" in m for k, m in flashes(r)), flashes(r)
    assert console.post("/console/watchers/writer/explode").status_code == 400


# --------------------------------------------------------------------------- watchers, on the real stack


def test_watchers_page_and_api_show_every_watcher(cconsole: Console, cstack: CircusStack) -> None:
    def settled() -> dict[str, Any] | None:
        """The table once every watcher is up, gunicorn's workers forked (circus calls a gunicorn
        watcher active before: the page says "starting, 0 of 2 workers" meanwhile)."""
        data = cconsole.get("/console/api/watchers").json
        statuses = {w["name"]: w["status"] for w in data["watchers"]}
        return data if all(statuses.get(name) == "active" for name in WATCHERS) else None

    data = wait_for("every watcher active, gunicorn's workers forked", settled, timeout=120)
    assert data["error"] is None
    by_name = {w["name"]: w for w in data["watchers"]}
    assert set(WATCHERS) <= set(by_name)
    for name in WATCHERS:
        w = by_name[name]
        assert w["status"] == "active" and w["numprocesses"] == 1 and w["pids"] == cstack.pids_of(name), w
        assert w["rss"] > 1_000_000 and w["cpu"] >= 0 and w["uptime"] >= 0
    assert len(by_name["console"]["children"]) == 2  # gunicorn's workers
    page = cconsole.get("/console/watchers").text
    for name in WATCHERS:
        assert f'data-watcher="{name}"' in page and f"/console/watchers/{name}/restart" in page


def test_restart_all_asks_listing_the_watchers_in_the_order_it_restarts_them(cconsole: Console) -> None:
    """The confirmation said "the writer first" above a list by name (analysis, api, console, ...);
    the audit row's target was that list too (a new user's run of the README, round 37)."""
    page = cconsole.post("/console/watchers/restart-all")
    assert page.status_code == 200 and "Restart every watcher?" in page.text, page.status_code
    listed = re.search(r"each followed until circus runs its new processes: <code>([^<]*)</code>", page.text)
    assert listed is not None, page.text
    # By circus.ini's priorities, as circus starts them (the console serving a request would come last).
    assert listed.group(1).split(", ") == ["writer", "api", "console", "ticks", "analysis", "monitor", "jobs"]


def test_restart_changes_the_pid_is_audited_and_counted(cconsole: Console, cstack: CircusStack) -> None:
    s = cstack.settings
    # The sampler counts a process replaced since its previous sample: one must have seen this one
    # (run alone, with a stack just started, the restart came before the jobs worker's first sample).
    wait_for("a sample that saw the monitor", lambda: query(
        s, "SELECT count(*) FROM samples WHERE name = 'watcher.processes' AND labels = 'monitor' AND value >= 1"
    )[0][0] > 0)
    old = cstack.pids_of("monitor")
    since = last_audit_id(s)
    r = cconsole.post("/console/watchers/monitor/restart")
    assert r.status_code == 303 and r.headers["Location"] == "/console/watchers"
    new = cstack.pids_of("monitor")
    assert new and new != old
    (row,) = audit_rows(s, since)
    assert row[1:5] == ("admin", "watcher.restart", "monitor", "ok")
    assert str(new[0]) in row[5]  # circus's answer: which pid started
    assert any(k == "ok" and "Restart monitor: done" in m for k, m in flashes(cconsole.get("/console/watchers")))
    # The jobs worker's sampler (every second here) sees the new process as a restart.
    wait_for("restart counted", lambda: next(w for w in cconsole.get("/console/api/watchers").json["watchers"]
                                             if w["name"] == "monitor")["restarts"] >= 1)


def test_stop_asks_first_then_stops_and_start_brings_it_back(cconsole: Console, cstack: CircusStack) -> None:
    s = cstack.settings
    since = last_audit_id(s)
    confirm = cconsole.post("/console/watchers/analysis/stop")
    assert confirm.status_code == 200 and 'name="confirm" value="yes"' in confirm.text
    assert cstack.status()["analysis"] == "active"
    assert cconsole.post("/console/watchers/analysis/stop", {"confirm": "yes"}).status_code == 303
    assert cstack.status()["analysis"] == "stopped"
    stopped = next(w for w in cconsole.get("/console/api/watchers").json["watchers"] if w["name"] == "analysis")
    assert stopped["numprocesses"] == 0 and stopped["cpu"] is None
    assert cconsole.post("/console/watchers/analysis/start").status_code == 303
    assert cstack.status()["analysis"] == "active" and cstack.pids_of("analysis")
    assert [(a, t, res) for _, _, a, t, res, _ in audit_rows(s, since)] == [
        ("watcher.stop", "analysis", "ok"), ("watcher.start", "analysis", "ok")]


def test_a_watcher_at_zero_processes_is_down_in_the_console_as_in_health(cconsole: Console,
                                                                        cstack: CircusStack) -> None:
    """``circusctl decr`` to 0 leaves circus calling the watcher active with no process: /api/health
    called it down ("0 of 1 processes (circus was asked for 0)") while the console showed "no
    processes" in the neutral grey of a stopped watcher, as if nothing were wrong. One rule now
    (:class:`supervision.circus.WatcherState`): the console marks it down, with health's words."""
    problem = "0 of 1 processes (circus was asked for 0)"
    try:
        done = cstack.circusctl("decr", "analysis")
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for("analysis without a process",
                 lambda: cstack.status()["analysis"] == "active" and cstack.pids_of("analysis") == [])
        code, health = get_json(cstack.api_port, "/api/health")
        assert code == 200 and health["circus"]["down"].get("analysis") == problem, health
        data = cconsole.get("/console/api/watchers").json
        w = next(w for w in data["watchers"] if w["name"] == "analysis")
        assert (w["status"], w["detail"], w["up"], w["problem"]) == ("no processes", None, False, problem), w
        # Never shown as up where health says down (the console may be stricter: gunicorn's workers).
        assert set(health["circus"]["down"]) <= {w["name"] for w in data["watchers"] if not w["up"]}
        page = cconsole.get("/console/watchers").text
        row = re.search(r'<tr data-watcher="analysis">.*?</tr>', page, re.S).group(0)
        assert 'data-up="no"' in row and f"down: {problem}" in html.unescape(row), row
        assert 'class="pill pill-no-processes"' in row
        # Styled as a problem, not in the neutral grey of a stopped watcher.
        css = (ROOT / "webapp" / "static" / "console" / "console.css").read_text()
        rule = next(line for line in css.splitlines() if ".pill-no-processes" in line)
        assert "var(--danger)" in rule and "var(--neutral)" not in rule, rule
        own = cconsole.get("/console/watchers/analysis").text
        assert 'data-up="no"' in own and f"down: {problem}" in html.unescape(own)
    finally:
        if not cstack.pids_of("analysis"):
            cstack.circusctl("incr", "analysis")
    wait_for("analysis up in the console", lambda: next(
        w for w in cconsole.get("/console/api/watchers").json["watchers"] if w["name"] == "analysis")["up"])
    assert "analysis" not in get_json(cstack.api_port, "/api/health")[1]["circus"]["down"]
    assert 'data-up="yes"' in cconsole.get("/console/watchers/analysis").text


def test_bad_watcher_actions_are_400_and_refused_ones_change_nothing(cconsole: Console, cstack: CircusStack) -> None:
    s = cstack.settings
    pids = {w: cstack.pids_of(w) for w in WATCHERS}
    since = last_audit_id(s)
    r = cconsole.post("/console/watchers/nosuch/restart")
    assert r.status_code == 400 and "no watcher named 'nosuch'" in html.unescape(r.text)
    assert "Traceback" not in r.text
    r = cconsole.post("/console/watchers/ticks/explode")
    assert r.status_code == 400 and "unknown action 'explode'" in html.unescape(r.text)
    assert cconsole.post("/console/watchers/plugin:flapping/stop", {"confirm": "yes"}).status_code == 400
    assert cconsole.get("/console/watchers/ticks/restart").status_code == 405
    assert cconsole.post("/console/watchers/ticks/restart", csrf=False).status_code == 400
    anonymous = Console(cconsole.app)
    r = anonymous.post("/console/watchers/ticks/restart")
    assert r.status_code == 302 and r.headers["Location"] == "/console/login"
    assert {w: cstack.pids_of(w) for w in WATCHERS} == pids
    assert audit_rows(s, since) == []


def test_a_busy_circusd_is_retried_or_reported_plainly(cconsole: Console, cstack: CircusStack) -> None:
    """circusd runs one command at a time: a restart sent while it restarts the writer (which drains
    for a second first) meets "already running"; the console retries briefly, else says so in words."""
    done = threading.Event()
    thread = threading.Thread(target=lambda: (cstack.call("restart", name="writer", waiting=True), done.set()))
    thread.start()
    try:
        time.sleep(0.05)
        r = cconsole.post("/console/watchers/ticks/restart", follow_redirects=True)
        assert r.status_code == 200 and "Traceback" not in r.text
        messages = flashes(r)
        assert any(("Restart ticks: done" in m) or ("busy" in m) for _, m in messages), messages
    finally:
        thread.join(60)
    assert done.is_set()
    wait_for("writer serving again", lambda: WriterClient(settings=cstack.settings, deadline=1).ping())


def test_sampler_stores_every_series_in_the_running_stack(cconsole: Console, cstack: CircusStack) -> None:
    s = cstack.settings

    def names() -> set[tuple[str, str]]:
        return set(query(s, "SELECT DISTINCT name, labels FROM samples"))

    expected = {("writer.queue_depth", ""), ("writer.commit_p99_ms", ""), ("writer.ticks_per_s", ""),
                ("writer.requests_per_s", ""), ("db.bytes", ""),
                *(("watcher.cpu_percent", w) for w in WATCHERS), *(("watcher.rss_bytes", w) for w in WATCHERS)}
    if s.database_path is not None:  # SQLite's WAL file; a server has no WAL of ours to measure
        expected.add(("db.wal_bytes", ""))
    wait_for("samples", lambda: expected <= names())
    assert query(s, "SELECT count(*) FROM job_runs WHERE job = 'metrics'") == [(0,)]
    rates = [v for (v,) in query(s, "SELECT value FROM samples WHERE name = 'writer.ticks_per_s'")]
    assert all(v >= 0 for v in rates) and max(rates) > 0  # the simulated feed ingests
    series = cconsole.get("/console/api/series?name=watcher.rss_bytes").json["series"]
    assert {x["label"] for x in series} >= set(WATCHERS)


