"""PostgreSQL foundations (issue 11): secrets never shown, readers that cannot write, one database
per private home.

These tests (and the other ``test_postgres_*`` files) run in the suite's PostgreSQL run
(``pytest --database postgresql``; ``make test`` runs it beside the SQLite one), on a throwaway
server (:class:`testkit.postgres.PostgresServer`, started once per session by ``tests/conftest.py``;
skipped with the reason without Debian's binaries, a failure in CI), where the rest of the suite
runs too, each private home with a database of its own.
"""
from __future__ import annotations

import http.cookiejar
import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from db.client import WriterClient
from db.config import load_settings
from db.engine import database_location, display_url, make_read_engine
from db.models import ticks_table
from testkit.circus import WATCHERS, CircusStack
from testkit.env import ROOT, isolated_env, new_home
from testkit.helpers import CSRF_RE, wait_for
from testkit.postgres import ROLES, HomeDatabases, PostgresServer
from testkit.writer import Stack

#: A server's own promises: run by ``pytest --database postgresql`` (the suite's PostgreSQL run).
pytestmark = pytest.mark.postgres_only

NOW_TS = 1_704_067_200_000  # 2024-01-01T00:00:00Z


# --------------------------------------------------------------------------- helpers


def stack_on(database: str, request: pytest.FixtureRequest) -> Stack:
    """A private home on ``database``: ``sqlite`` (a file in the home, whatever ``--database``
    says), ``postgresql`` (its own database; readers as ts_reader) or ``postgresql-owner`` (the same,
    but readers with DATABASE_URL's role, the owner: only the read-only sessions keep them from
    writing)."""
    home = new_home()
    env = {k: v for k, v in isolated_env(home).items() if not k.startswith("DATABASE_")}
    if database.startswith("postgresql"):
        env.update(request.getfixturevalue("home_databases")(home))
        if database == "postgresql-owner":
            del env["DATABASE_READ_URL"]
    return Stack(home, env)


class Browser:
    """A client of the real gunicorn: a cookie jar, and every body it was sent (to search them)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.seen: list[tuple[str, str]] = []

    def fetch(self, path: str, data: dict[str, str] | bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, str]:
        body = urllib.parse.urlencode(data).encode() if isinstance(data, dict) else data
        req = urllib.request.Request(self.base + path, data=body, headers=headers or {})
        try:
            with self.opener.open(req, timeout=60) as resp:
                status, text_ = resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            status, text_ = e.code, e.read().decode(errors="replace")
        self.seen.append((path, text_))
        return status, text_

    def form(self, page: str, action: str, **fields: str) -> tuple[int, str]:
        """POST ``action`` with the CSRF token of ``page``'s form, as a browser submits it."""
        _, html = self.fetch(page)
        return self.fetch(action, {"csrf_token": CSRF_RE.search(html).group(1), **fields})


def places_with(secret: str, texts: list[tuple[str, str]]) -> list[str]:
    return [where for where, body in texts if secret in body]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def pg_stack(postgres_server: PostgresServer, home_databases: HomeDatabases) -> Iterator[CircusStack]:
    """The whole stack (the real circus.ini) on a database of its own on the session's server, with
    passwords in DATABASE_URL (ts_owner) and DATABASE_READ_URL (ts_reader). Without amcheck, so the
    jobs worker's quick_check takes its error path (the server's words, which must not carry a URL)."""
    stack = CircusStack()
    stack.env.update(home_databases(stack.home))
    postgres_server.psql(str(make_url(stack.env["DATABASE_URL"]).database), "postgres", "DROP EXTENSION amcheck")
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


# --------------------------------------------------------------------------- secrets


def test_display_url_hides_the_password_wherever_a_url_carries_it() -> None:
    url = "postgresql+psycopg://ts_owner:s3cr%40t%3Aw@db.example:5433/tickstack?sslmode=require"
    assert display_url(url) == "postgresql+psycopg://ts_owner:***@db.example:5433/tickstack?sslmode=require"
    assert "s3cr" not in display_url("postgresql://u@/tickstack?host=/run/pg&password=s3cret")
    # libpq's other secret: the client key's passphrase (a review saw it printed by db health).
    assert "KEYPASS9" not in display_url("postgresql://u@h/tickstack?sslkey=/k.pem&sslpassword=KEYPASS9")
    assert "s3cret" not in display_url("postgresql://u:s3cret@[broken/x")  # unparseable: nothing after ://
    assert display_url("sqlite:////var/lib/tickstack.db") == "sqlite:////var/lib/tickstack.db"
    assert database_location(url) == {"dialect": "postgresql", "host": "db.example"}
    assert database_location("postgresql+psycopg://u:pw@/tickstack?host=/run/pg") == {
        "dialect": "postgresql", "host": "/run/pg"}
    settings = load_settings({"TICKSTACK_HOME": "/tmp/x", "DATABASE_URL": url,
                              "DATABASE_READ_URL": "postgresql://ts_reader:r34d3r@db.example/tickstack"})
    assert "s3cr" not in repr(settings) and "r34d3r" not in repr(settings)
    assert load_settings({"TICKSTACK_HOME": "/tmp/x", "DATABASE_URL": url}).database_read_url == url


def test_no_password_in_any_log_response_page_or_job_record(pg_stack: CircusStack,
                                                            postgres_server: PostgresServer) -> None:
    """The whole stack with passwords in its URLs: every log file, every API response, every
    console page (logs included), the CLI's output and every job and audit record hold no password,
    and /api/health (no login) shows the dialect and host only."""
    stack, env = pg_stack, pg_stack.env
    passwords = {role: postgres_server.passwords[role] for role in ROLES}
    assert passwords["ts_owner"] in env["DATABASE_URL"] and passwords["ts_reader"] in env["DATABASE_READ_URL"]
    seen: list[tuple[str, str]] = []

    # The command line: init (from a home of its own: in the stack's, the running writer's lock
    # makes it a no-op), health (text and JSON), doctor.
    other = new_home()
    try:
        for args, home in ((["init"], other), (["health"], stack.home), (["health", "--json"], stack.home),
                           (["doctor"], stack.home)):
            done = subprocess.run([sys.executable, "-m", "db", *args], env={**env, "TICKSTACK_HOME": str(home)},
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            seen.append((f"python -m db {' '.join(args)}", done.stdout + done.stderr))
    finally:
        shutil.rmtree(other, ignore_errors=True)
    assert "ts_owner:***@" in seen[0][1], seen[0][1]  # init names the database, password hidden
    assert "Journal mode" not in seen[3][1], seen[3][1]  # doctor: no SQLite journal warning on a server

    # Every API route, with data in it (the token from its file, as a user does).
    api = Browser(f"http://127.0.0.1:{stack.api_port}")
    token = (stack.home / "api-token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    ticks = [{"symbol": "BTCUSD", "ts": NOW_TS + i * 1000, "bid": 100.0 + i, "ask": 100.5 + i, "volume": 1.0,
              "source": "leak-test", "seq": i} for i in range(5)]
    assert api.fetch("/api/ticks", json.dumps({"ticks": ticks}).encode(), auth)[0] == 200
    status, body = api.fetch("/api/trades", json.dumps({"symbol": "BTCUSD", "side": "buy", "size": 1,
                                                        "entry_price": 101.0}).encode(), auth)
    assert status in (200, 201), body
    status, body = api.fetch("/api/health")
    assert status == 200, body
    database = json.loads(body)["database"]  # dialect, host and the server's figures: no user, no name
    assert database["dialect"] == "postgresql" and database["host"] == str(postgres_server.socket_dir), database
    assert database["reachable"] is True and set(database) == {"dialect", "host", "reachable", "size_bytes",
                                                               "connections", "ping_ms"}, database
    for path in ("/api/openapi.json", "/api/ticks?symbol=BTCUSD", "/api/bars?symbol=BTCUSD&timeframe=1m",
                 "/api/indicators?symbol=BTCUSD&timeframe=1m&name=sma_20", "/api/trades", "/api/trades/1",
                 "/metrics", "/api/nowhere"):
        api.fetch(path)

    # The jobs worker's quick_check is recorded (amcheck is not installed in this database: skipped).
    owner = create_engine(env["DATABASE_URL"])
    try:
        wait_for("a recorded quick_check run", lambda: _rows(owner, "SELECT 1 FROM job_runs WHERE job = 'quick_check'"))

        # Every console page, every log file through the Logs page, and the database actions.
        console = Browser(f"http://127.0.0.1:{stack.console_port}")
        password = (stack.home / "admin-password").read_text().strip()
        status, _ = console.form("/console/login", "/console/login", username="admin", password=password)
        db_status, db_page = console.fetch("/console/database")
        assert status == 200 and db_status == 200, "\n".join(
            p.read_text(errors="replace")[-3000:] for p in (stack.home / "log").glob("console*.log"))
        # A check that could not be made reads "skipped", not "ok" (nor "failed"), where it shows.
        assert '<span class="pill pill-warn">skipped</span>' in db_page, db_page
        # SQLite's card of the processes holding its file open has nothing to say of a server's sessions.
        assert "Processes holding the database open" not in db_page and "Sessions" in db_page, db_page
        for action in ("quick_check", "backup", "checkpoint"):
            console.form("/console/database", f"/console/database/{action}")
        # The console's own quick_check, skipped too, is now the last one: "skipped ... by admin".
        last_check = re.search(r"<dt>Last quick_check</dt>\s*<dd>(.*?)</dd>", console.fetch("/console/database")[1],
                               re.S)
        assert last_check and '<span class="pill pill-warn">skipped</span>' in last_check.group(1) and \
            "by admin" in last_check.group(1), last_check and last_check.group(1)
        # ... and so in the audit log: its row's result is "skipped", not "ok".
        audit_page = console.fetch("/console/audit")[1]
        audit_row = re.search(r"<tr>(?:(?!</tr>).)*db\.quick_check(?:(?!</tr>).)*</tr>", audit_page, re.S)
        assert audit_row and '<span class="pill pill-result-skipped">skipped</span>' in audit_row.group(0), \
            audit_row and audit_row.group(0)
        for page in ("/console/", "/console/watchers", "/console/database", "/console/charts", "/console/market",
                     "/console/audit", "/console/api/watchers", "/console/api/database",
                     "/console/api/series?name=db.bytes", "/console/api/trades", "/console/logs",
                     # A watcher's page shows its command line and environment (DATABASE_URL among them).
                     *(f"/console/watchers/{name}" for name in WATCHERS)):
            console.fetch(page)
        logs = sorted(p.name for p in (stack.home / "log").iterdir() if p.name.endswith(".log"))
        for name in logs:
            console.fetch(f"/console/logs?file={name}")
            console.fetch(f"/console/api/log?file={name}")
        assert any("***" in body for where, body in console.seen if where == "/console/database")

        # What the stack stored: every job run and audit entry.
        records = [(f"job_runs {job}", detail or "") for job, detail in
                   _rows(owner, "SELECT job, detail FROM job_runs")]
        records += [(f"audit_log {action}", f"{target} {detail}") for action, target, detail in
                    _rows(owner, "SELECT action, target, detail FROM audit_log")]
    finally:
        owner.dispose()
    assert any(where == "job_runs quick_check" and detail.startswith("skipped: amcheck not installed")
               for where, detail in records), records

    # Every file the stack wrote in its home (logs, rotated logs, spool, run state).
    files = [(str(p), p.read_bytes().decode(errors="replace")) for p in stack.home.rglob("*")
             if p.is_file() and not p.is_socket()]
    writer_log = (stack.home / "log" / "writer.log").read_text(errors="replace")
    assert "writer ready" in writer_log and "ts_owner:***@" in writer_log, writer_log[-2000:]

    everything = seen + api.seen + console.seen + records + files
    leaks = {role: places_with(pw, everything) for role, pw in passwords.items()}
    assert not any(leaks.values()), f"a password is in: {json.dumps(leaks, indent=1)}"


def _rows(engine: Any, sql: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql)).all())


# --------------------------------------------------------------------------- read-only


@pytest.mark.parametrize("database", ["sqlite", "postgresql", "postgresql-owner"])
def test_the_web_app_and_read_engines_cannot_write(database: str, request: pytest.FixtureRequest) -> None:
    """An INSERT through the web app's ``db.session`` or a read engine fails and stores nothing, on
    SQLite (``mode=ro``, ``query_only``) and on PostgreSQL (every read session read-only), even when
    the readers' role is the owner (no DATABASE_READ_URL)."""
    from webapp import create_app
    from webapp.extensions import db

    stack = stack_on(database, request)
    try:
        stack.start_writer()
        settings = stack.settings
        row = {"symbol": "X", "ts": NOW_TS, "bid": 1.0, "ask": 1.0, "volume": 0.0, "source": "x", "seq": 1}
        refused = r"readonly|read-only|query_only"
        app = create_app("all", settings)
        with app.app_context():
            with pytest.raises(DBAPIError, match=refused):
                db.session.execute(insert(ticks_table).values(**row))
                db.session.commit()
            db.session.rollback()
            if database.startswith("postgresql"):
                role = "ts_owner" if database == "postgresql-owner" else "ts_reader"
                assert db.session.execute(text("SELECT current_user")).scalar() == role
            db.session.remove()
        engine = make_read_engine(settings, pool_size=1)
        try:
            with engine.connect() as conn:
                with pytest.raises(DBAPIError, match=refused):
                    conn.execute(insert(ticks_table).values(**row))
                    conn.commit()
            # Nothing got in; the writer still writes.
            with WriterClient(settings=settings, deadline=20) as client:
                assert client.call("insert_ticks", ticks=[{**row, "seq": 2}]) == {"inserted": 1, "duplicates": 0}
            with engine.connect() as conn:
                assert conn.execute(select(func.count()).select_from(ticks_table)).scalar() == 1
        finally:
            engine.dispose()
    finally:
        stack.close()


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_trade_reason_of_64_characters_is_stored_on_both_databases(database: str,
                                                                     request: pytest.FixtureRequest) -> None:
    """update_trade and close_trade accept a reason of 64 characters (the API documents it): schema
    v1 declared those columns VARCHAR(32), which SQLite ignores and PostgreSQL enforced (the request
    failed; schemathesis met it as a 500). Schema v2 widens them; on PostgreSQL it is checked on a
    database made at v1 too."""
    stack = stack_on(database, request)
    try:
        if database == "postgresql":
            _downgrade_to_v1(stack)
        stack.start_writer()
        reason = "r" * 64
        with WriterClient(settings=stack.settings, deadline=20) as client:
            trade = client.call("open_trade", symbol="BTCUSD", side="buy", size=1.0, entry_price=100.0)
            client.call("update_trade", trade_id=trade["id"], stop_loss=90.0, reason=reason)
            client.call("close_trade", trade_id=trade["id"], price=101.0, reason=reason)
        engine = make_read_engine(stack.settings, pool_size=1)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT close_reason FROM trades")).scalar() == reason
                events = conn.execute(text("SELECT count(*) FROM trade_events WHERE kind = :r"), {"r": reason})
                assert events.scalar() == 1
        finally:
            engine.dispose()
    finally:
        stack.close()


def test_two_migrations_at_once_wait_for_each_other(request: pytest.FixtureRequest) -> None:
    """Two processes migrating one empty PostgreSQL database together (two ``db init``, two writers
    starting): the second waits for the first to commit, then finds the schema current. Without a
    lock it creates the same tables and fails with a duplicate key. Deterministic: the first commits
    only once the second is seen waiting on a lock."""
    import threading

    from db.engine import make_write_engine
    from db.schema import SCHEMA_VERSION, migrate

    stack = stack_on("postgresql", request)
    first, second = make_write_engine(stack.settings), make_write_engine(stack.settings)
    watcher = create_engine(stack.env["DATABASE_URL"])
    outcome: dict[str, Any] = {}

    def run_second() -> None:
        try:
            with second.begin() as conn:
                outcome["versions"] = migrate(conn)
        except Exception as e:  # the failure is the test's finding
            outcome["error"] = e

    try:
        with first.begin() as conn:
            assert migrate(conn) == (0, SCHEMA_VERSION)
            thread = threading.Thread(target=run_second)
            thread.start()
            wait_for("the second migration to wait on a lock", lambda: _rows(
                watcher, "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                         "AND wait_event_type = 'Lock'"), timeout=30)
        thread.join(60)
        assert outcome == {"versions": (SCHEMA_VERSION, SCHEMA_VERSION)}, outcome
        assert [v for (v,) in _rows(watcher, "SELECT version FROM schema_version ORDER BY version")] == list(
            range(1, SCHEMA_VERSION + 1))
    finally:
        for engine in (first, second, watcher):
            engine.dispose()
        stack.close()


def _downgrade_to_v1(stack: Stack) -> None:
    """A PostgreSQL database as schema v1 left it: the two reason columns VARCHAR(32)."""
    from db.engine import make_write_engine
    from db.schema import migrate

    engine = make_write_engine(stack.settings)
    try:
        with engine.begin() as conn:
            migrate(conn)
            conn.exec_driver_sql("ALTER TABLE trades ALTER COLUMN close_reason TYPE VARCHAR(32)")
            conn.exec_driver_sql("ALTER TABLE trade_events ALTER COLUMN kind TYPE VARCHAR(32)")
            conn.exec_driver_sql("DELETE FROM schema_version WHERE version > 1")
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- the harness


def test_every_home_gets_its_own_database_and_finished_ones_are_dropped(home_databases: HomeDatabases,
                                                                      postgres_server: PostgresServer) -> None:
    """``--database postgresql`` plumbing: two homes, two databases; a removed home's is dropped."""
    first, second = new_home(), new_home()
    try:
        urls = [home_databases(first), home_databases(second)]
        assert home_databases(first) == urls[0]  # asked again (a test builds the env twice): the same
        names = [load_url_database(u["DATABASE_URL"]) for u in urls]
        assert names[0] != names[1] and all(u["DATABASE_READ_URL"].startswith("postgresql+psycopg://ts_reader:")
                                            for u in urls)
        shutil.rmtree(first)
        home_databases.drop_finished()
        listed = postgres_server.psql("postgres", "postgres", "SELECT datname FROM pg_database").split()
        assert names[0] not in listed and names[1] in listed
    finally:
        _rmtree(first)
        _rmtree(second)


def load_url_database(url: str) -> str:
    from sqlalchemy.engine import make_url

    return str(make_url(url).database)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
