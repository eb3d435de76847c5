"""A PostgreSQL home whose writer does not answer, and logins the server refuses for want of a right.

* ``db health`` and ``db init`` from a shell without the stack's ``DATABASE_URL`` refused a PostgreSQL
  home only while its writer answered a ping. With the writer stopped, or waiting for a server that is
  down (no socket yet), ``db health`` advised ``db init`` and ``db init`` made ``tickstack.db`` and its
  lock file in the PostgreSQL home. The writer now records in ``run/database`` which database it writes,
  at each start, and they refuse by that record when no writer answers.
* A role without LOGIN, or without CONNECT on the database, was taken for a server that does not
  answer: ``db prepare`` let the start through and the writer waited 5 minutes per try.
"""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from db.engine import display_url
from testkit.env import ROOT, isolated_env, new_home
from testkit.helpers import wait_for
from testkit.postgres import HomeDatabases, PostgresServer
from testkit.writer import Stack, no_writer_words

pytestmark = pytest.mark.postgres_only

LAST = "This home's writer last wrote postgresql"


def run_db(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "db", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def no_database(env: dict[str, str]) -> dict[str, str]:
    """A shell with the home set and not the stack's URLs: its settings name the home's SQLite file."""
    return {k: v for k, v in env.items() if not k.startswith("DATABASE_")}


def sqlite_files(home: Path) -> list[Path]:
    return sorted(home.glob("*.db*"))


def assert_refused(stack: Stack, shell: dict[str, str], postgres_server: PostgresServer) -> str:
    """db health (both forms) and db init refuse in doctor's words, and make no SQLite file; returns the words."""
    doctor = run_db(shell, "doctor")
    rule = next((x for x in doctor.stdout.splitlines() if LAST in x), "")
    assert rule.startswith("[FAIL] "), doctor.stdout + doctor.stderr
    words = rule.removeprefix("[FAIL] ")
    assert display_url(stack.env["DATABASE_URL"]) in words, words
    for args in (("health",), ("health", "--json"), ("init",)):
        done = run_db(shell, *args)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert done.stderr.strip() == f"python -m db {args[0]}: {words}", (args, done.stderr)
        assert "db init" not in done.stdout, (args, done.stdout)
        assert sqlite_files(stack.home) == [], (args, sqlite_files(stack.home))
        out = done.stdout + done.stderr
        for password in postgres_server.passwords.values():
            assert password not in out and quote(password, safe="") not in out
    assert sqlite_files(stack.home) == []
    return words


def test_a_postgresql_home_whose_writer_stopped_is_refused_by_db_health_and_init(
        stack: Stack, postgres_server: PostgresServer) -> None:
    assert stack.env["DATABASE_URL"].startswith("postgresql"), "this test needs a PostgreSQL home"
    writer = stack.start_writer()
    assert stack.stop(writer) == 0, stack.writer_log()[-2000:]
    shell = no_database(stack.env)
    words = assert_refused(stack, shell, postgres_server)
    assert "DATABASE_URL" in words and "make run" in words, words
    record = stack.settings.run_dir / "database"  # what the refusal went by: the URL without its password
    assert record.is_file() and stat.S_IMODE(record.stat().st_mode) == 0o600
    assert record.read_text().strip() == display_url(stack.env["DATABASE_URL"])

    # A record the user (or a full disk) broke is no record: no crash, no hang (a FIFO is never read).
    for broken in ("garbage", "x" * 100_000, "fifo"):
        record.unlink()
        if broken == "fifo":
            os.mkfifo(record, 0o600)
        else:
            record.write_text(broken)
        done = run_db(shell, "health", timeout=30)
        assert "Traceback" not in done.stderr, done.stderr
    record.unlink()


def test_a_move_to_sqlite_is_refused_by_db_init_and_done_by_the_writer(
        stack: Stack, postgres_server: PostgresServer) -> None:
    """The user who moves the home to SQLite on purpose: db init refuses (naming make run), the
    writer (make run's) starts on SQLite, records it, and from then on db health and init agree."""
    stack.stop(stack.start_writer())
    shell = no_database(stack.env)
    words = assert_refused(stack, shell, postgres_server)
    assert "make run" in words and "SQLite" in words, words
    prepared = run_db(shell, "prepare")
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    sqlite = Stack(stack.home, shell)
    writer = sqlite.start_writer()
    wait_for("the SQLite writer to answer", lambda: run_db(shell, "health").returncode == 0, timeout=60)
    record = stack.settings.run_dir / "database"
    assert record.read_text().strip() == display_url(sqlite.settings.database_url)
    assert sqlite.stop(writer) == 0
    health = run_db(shell, "health")  # exit 1: no writer answers; but about this database, unrefused
    assert health.stderr == "" and "database   " in health.stdout, health.stdout + health.stderr
    assert run_db(shell, "init").returncode == 0
    # And back: the PostgreSQL shell is now the one told.
    back = run_db(stack.env, "health")
    assert back.returncode == 1 and "This home's writer last wrote sqlite" in back.stderr, back.stderr


def test_a_writer_waiting_for_its_server_leaves_no_room_for_a_stray_sqlite_file(
        stack: Stack, postgres_server: PostgresServer) -> None:
    """A writer started while its server is down waits for it without a socket: the home is still a
    PostgreSQL one."""
    down = stack.env["DATABASE_URL"].replace(f"host={postgres_server.socket_dir}", "host=/nonexistent-ts-socket")
    assert down != stack.env["DATABASE_URL"]
    stack.env["DATABASE_URL"] = down
    writer = stack.start_worker("workers.writer", stack.home / "log" / "writer-test.log")  # never ready: not waited for
    wait_for("the writer to wait for its server", (stack.settings.run_dir / "writer.server-wait").exists, timeout=60)
    assert_refused(stack, no_database(stack.env), postgres_server)
    assert stack.stop(writer, signal.SIGTERM) in (0, 1)


# --- Logins refused for want of a right -------------------------------------------------------------


@pytest.fixture
def role_without(home_databases: HomeDatabases, postgres_server: PostgresServer) -> Iterator[tuple[str, str, Stack]]:
    """A role of its own that may not log in (``nologin``) or may not connect to the home's database
    (``noconnect``), as a stack's DATABASE_URL: yields a maker of (role, database, stack)."""
    made: list[tuple[str, Stack]] = []

    def make(kind: str) -> tuple[str, str, Stack]:
        home = new_home()
        env = isolated_env(home, ports=True)
        urls = home_databases(home)
        database = urls["DATABASE_URL"].split("@/", 1)[1].split("?", 1)[0]
        # A name with capitals: the fix said must quote it (unquoted, PostgreSQL folds it to lower case).
        role, password = f"TS_{kind}_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        grant = "NOLOGIN" if kind == "nologin" else "LOGIN"
        postgres_server.psql("postgres", "postgres", f'CREATE ROLE "{role}" {grant} PASSWORD \'{password}\'')
        if kind == "noconnect":
            postgres_server.psql("postgres", "postgres", f"REVOKE CONNECT ON DATABASE {database} FROM PUBLIC")
        url = urls["DATABASE_URL"].replace(f"ts_owner:{quote(postgres_server.passwords['ts_owner'], safe='')}@",
                                           f"{role}:{password}@")
        assert url != urls["DATABASE_URL"]
        stack = Stack(home, {**env, "DATABASE_URL": url, "DATABASE_READ_URL": url})
        made.append((role, stack))
        return role, database, stack

    yield make  # type: ignore[misc]
    for role, stack in made:
        stack.close()
        # DROP OWNED: the GRANT CONNECT a test pasted (privileges on databases, which are shared objects).
        postgres_server.psql("postgres", "postgres", f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')


@pytest.mark.parametrize("kind", ["nologin", "noconnect"])
def test_a_role_without_login_or_connect_is_a_refused_login_not_a_server_that_does_not_answer(
        role_without, postgres_server: PostgresServer, kind: str) -> None:  # type: ignore[no-untyped-def]
    role, database, stack = role_without(kind)
    fix = f'ALTER ROLE "{role}" LOGIN' if kind == "nologin" else f'GRANT CONNECT ON DATABASE "{database}" TO "{role}"'
    prepared = run_db(stack.env, "prepare")
    assert prepared.returncode == 1, prepared.stdout + prepared.stderr
    assert len(prepared.stderr.strip().splitlines()) == 1, prepared.stderr
    assert "refused DATABASE_URL's login" in prepared.stderr and fix in prepared.stderr, prepared.stderr

    # The writer, past prepare: it exits on the refusal, never waiting as for a server that is down.
    writer = stack.start_worker("workers.writer", stack.home / "log" / "writer-test.log")
    waiting = stack.settings.run_dir / "writer.server-wait"
    wait_for("the writer to exit or wait", lambda: writer.poll() is not None or waiting.exists(), timeout=60)
    assert not waiting.exists(), stack.writer_log()[-2000:]
    assert writer.wait() == 1, stack.writer_log()[-2000:]
    log = stack.writer_log()
    assert "does not answer" not in log and "cannot reach" not in log, log[-2000:]
    assert fix in log, log[-2000:]

    # Its clients (/api/health, no login): the refusal and its fix, naming no role nor database.
    told = no_writer_words(stack.settings)
    assert "refused the writer's login" in told and role not in told and database not in told, told
    assert fix.replace(f'"{role}"', "that_role").replace(f'"{database}"', "that_database") in told, told

    # The statement said mends it, pasted as it is.
    postgres_server.psql("postgres", "postgres", fix)
    mended = run_db(stack.env, "prepare")
    assert mended.returncode == 0, mended.stdout + mended.stderr


def test_the_grant_said_for_a_database_named_with_a_double_quote_names_that_database(
        postgres_server: PostgresServer) -> None:
    """PostgreSQL writes a database's name between double quotes in "permission denied for database", without
    doubling a double quote in it: the name was read up to its first one, and the GRANT said named another
    database (``"ts "`` of ``ts "q" ...``), one that may exist. The statement, pasted as said, must let the
    role in (a review)."""
    suffix = uuid.uuid4().hex[:8]
    database, role, password = f'ts "q" {suffix}', f"TS_q_{suffix}", uuid.uuid4().hex
    named = database.replace('"', '""')
    postgres_server.psql("postgres", "postgres", f'CREATE DATABASE "{named}"')
    home = new_home()
    try:
        postgres_server.psql("postgres", "postgres", f'REVOKE CONNECT ON DATABASE "{named}" FROM PUBLIC')
        postgres_server.psql("postgres", "postgres", f'CREATE ROLE "{role}" LOGIN PASSWORD \'{password}\'')
        env = isolated_env(home, ports=True)
        url = postgres_server.url().replace(f"ts_owner:{quote(postgres_server.passwords['ts_owner'], safe='')}@/"
                                            "tickstack?", f"{role}:{password}@/{quote(database, safe='')}?")
        assert url != postgres_server.url(), url
        env = {**env, "DATABASE_URL": url, "DATABASE_READ_URL": url}
        prepared = run_db(env, "prepare")
        assert prepared.returncode == 1, prepared.stdout + prepared.stderr
        fix = f'GRANT CONNECT ON DATABASE "{named}" TO "{role}"'
        assert fix in prepared.stderr, prepared.stderr
        postgres_server.psql("postgres", "postgres", fix)
        postgres_server.psql(database, "postgres", f'GRANT CREATE ON SCHEMA public TO "{role}"')
        mended = run_db(env, "prepare")
        assert mended.returncode == 0, mended.stdout + mended.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)
        postgres_server.psql("postgres", "postgres", f'DROP DATABASE IF EXISTS "{named}" WITH (FORCE)')
        postgres_server.psql("postgres", "postgres", f'DROP ROLE IF EXISTS "{role}"')  # its grant: with the database


def test_a_restore_in_a_postgresql_home_from_a_shell_without_its_url_is_refused(
        stack: Stack, postgres_server: PostgresServer, tmp_path: Path) -> None:
    """``db restore`` from a shell without the stack's ``DATABASE_URL`` (the stack stopped, as a restore
    wants it): of the jobs worker's ``.dump`` it said "this stack's database is an SQLite file, which
    takes .db backups", of a PostgreSQL stack; and an SQLite backup it restored into ``tickstack.db`` in
    the home, which the stack does not use, then said "Start the stack again: make run", the server's
    database unchanged. It refuses as ``db init`` does, by the writer's record, and makes no file."""
    writer = stack.start_writer()
    done = subprocess.run([sys.executable, "-m", "workers.jobs", "--run", "backup"], env=stack.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert stack.stop(writer) == 0
    (dump,) = (stack.home / "backups").iterdir()
    sqlite_home = new_home()
    try:
        sqlite_env = no_database(isolated_env(sqlite_home))
        assert run_db(sqlite_env, "init").returncode == 0
        backup = tmp_path / "from-sqlite.db"
        made = run_db(sqlite_env, "backup", str(backup))
        assert made.returncode == 0, made.stderr
    finally:
        shutil.rmtree(sqlite_home, ignore_errors=True)
    shell = no_database(stack.env)
    words = assert_refused(stack, shell, postgres_server)
    for source in (dump, backup):
        refused = run_db(shell, "restore", str(source))
        assert refused.returncode == 1 and refused.stderr.strip() == f"python -m db restore: {words}", \
            (source, refused.stdout + refused.stderr)
        assert sqlite_files(stack.home) == [], sqlite_files(stack.home)
    done = run_db(stack.env, "restore", str(dump))  # with the stack's URLs: restored
    assert done.returncode == 0, done.stdout + done.stderr
