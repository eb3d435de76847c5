"""What a new user on PostgreSQL is told when the stack cannot write (a new user's run, round 41).

* A wrong password in ``DATABASE_URL`` (the owner's role): ``db prepare`` passed it, the writer's log
  said "cannot reach the database server ... password authentication failed", circus stopped the
  writer after 3 retries, ``/api/health`` and doctor advised starting the writer. Now each says the
  server refused ``DATABASE_URL``'s login (the user named, never a password) and what to fix, and
  ``db prepare`` (``make run``) refuses to start with it, without waiting for a server that is down.
* Two stacks (two homes) with one ``TICKSTACK_HOST`` on one database: doctor said writes "go to that
  stack's writer", and the writer's waiting line blamed circus's reload; the server's writer lock is
  per host, so this stack's writes reach no writer. Both now say to give the stack its own host name.
* ``db health`` (and ``db init``) in a PostgreSQL stack's home, from a shell without its URLs: they
  read (or would make) the home's SQLite file; they refuse as doctor does, in doctor's words.
"""
from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from db.config import load_settings
from testkit.env import ROOT, isolated_env, new_home
from testkit.helpers import wait_for
from testkit.postgres import HomeDatabases, PostgresServer
from testkit.writer import Stack, no_writer_words, stacks_on_one_database

#: A server's own promises: run by ``pytest --database postgresql``.
pytestmark = pytest.mark.postgres_only

WRONG = "wrongpass"
REFUSED = "the database server refused DATABASE_URL's login (user 'ts_owner')"
FIX = "fix the password in DATABASE_URL or in ~/.pgpass"
#: What /api/health may say of it (no login there: no role named).
REFUSED_PUBLIC = "the database server refused the writer's login"


def run_db(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "db", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_no_password(text: str, server: PostgresServer) -> None:
    assert WRONG not in text, "the URL's (wrong) password is in the output"
    for role, password in server.passwords.items():
        assert password not in text and quote(password, safe="") not in text, f"{role}'s password is in the output"


@pytest.fixture
def wrong_password(home_databases: HomeDatabases, postgres_server: PostgresServer) -> Iterator[Stack]:
    """A home on a database of its own whose DATABASE_URL has ts_owner with a wrong password (the
    readers' URL is right: only the owner's login is refused)."""
    home = new_home()
    env = {k: v for k, v in isolated_env(home, ports=True).items() if not k.startswith("DATABASE_")}
    urls = home_databases(home)
    right = quote(postgres_server.passwords["ts_owner"], safe="")
    assert right in urls["DATABASE_URL"]
    env.update(urls, DATABASE_URL=urls["DATABASE_URL"].replace(right, WRONG))
    stack = Stack(home, env)
    try:
        yield stack
    finally:
        stack.close()


def test_a_wrong_owner_password_is_said_as_a_refused_login_by_prepare_the_writer_doctor_and_health(
        wrong_password: Stack, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = wrong_password
    # make run's first step refuses to start, naming the login and the fix.
    prepared = run_db(stack.env, "prepare")
    assert prepared.returncode == 1, prepared.stdout + prepared.stderr
    assert REFUSED in prepared.stderr and FIX in prepared.stderr and "make run" in prepared.stderr, prepared.stderr
    assert len(prepared.stderr.strip().splitlines()) == 1, prepared.stderr
    assert_no_password(prepared.stdout + prepared.stderr, postgres_server)

    # The writer (as circus starts it, past prepare): the refused login, not "cannot reach".
    writer = subprocess.run([sys.executable, "-m", "workers.writer"], cwd=ROOT, env=stack.env, capture_output=True,
                            text=True, timeout=60)
    assert writer.returncode == 1, writer.stderr[-2000:]
    assert "cannot reach" not in writer.stderr, writer.stderr[-2000:]
    line = next((x for x in writer.stderr.splitlines() if REFUSED in x), None)
    assert line is not None and "password authentication failed" in line and FIX in line, writer.stderr[-2000:]
    assert "restart writer" in line, line
    assert_no_password(writer.stderr, postgres_server)
    assert (stack.settings.run_dir / "writer.refused").exists()

    # doctor: the cause and the fix, in one line, instead of "start it" and an amcheck line.
    doctor = run_db(stack.env, "doctor")
    assert doctor.returncode == 1, doctor.stdout
    said = [x for x in doctor.stdout.splitlines() if REFUSED in x]
    assert len(said) == 1 and said[0].startswith("[FAIL] The writer cannot start"), doctor.stdout
    assert FIX.lower() in said[0].lower(), said[0]
    assert "`make run`" in said[0], said[0]  # no circusd here: the whole stack
    assert "amcheck could not be made" not in doctor.stdout and "Start it with" not in doctor.stdout, doctor.stdout
    assert_no_password(doctor.stdout + doctor.stderr, postgres_server)
    # circus's next try holds the writer lock as it starts, until the server refuses it again: doctor
    # said only that a writer waits for the server, and left the refusal out (once in a make test run).
    hold = ("import time\nfrom db.config import load_settings\nfrom db.lock import WriterLock\n"
            "WriterLock(load_settings().writer_lock_path).acquire()\nprint('held', flush=True)\ntime.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, env=stack.env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        doctor = run_db(stack.env, "doctor")
        said = [x for x in doctor.stdout.splitlines() if REFUSED in x]
        assert len(said) == 1 and f"The writer (pid {holder.pid}) runs but does not serve yet" in said[0], doctor.stdout
        assert FIX.lower() in said[0].lower() and "`make run`" in said[0], said[0]
    finally:
        holder.kill()
        holder.wait()

    # circus's flapping plugin's last line on the writer says it too.
    from supervision.plugins import _last_words

    # As circusd has it: the stack's home and its database (a refusal counts on PostgreSQL only).
    monkeypatch.setenv("TICKSTACK_HOME", str(stack.home))
    monkeypatch.setenv("DATABASE_URL", stack.settings.database_url)
    assert REFUSED in _last_words("writer") and FIX in _last_words("writer")
    assert _last_words("api") == ""

    # /api/health: the refused login, without the role's name or libpq's words.
    from webapp import create_app

    monkeypatch.delenv("TICKSTACK_API_TOKEN", raising=False)
    client = create_app("api", load_settings(stack.env)).test_client()
    seen: list[dict] = []

    def says_refused() -> bool:
        answer = client.get("/api/health")
        seen.append(answer.get_json())
        return answer.status_code == 503 and REFUSED_PUBLIC in str(answer.get_json()["writer"].get("error"))

    wait_for("/api/health to say the login was refused", says_refused, timeout=30)
    body = str(seen[-1])
    assert "ts_owner" not in body and "password authentication" not in body and FIX in body, body
    assert_no_password(body, postgres_server)

    # Mended: prepare passes and clears the writer's last words; a writer serves.
    right = quote(postgres_server.passwords["ts_owner"], safe="")
    stack.env["DATABASE_URL"] = stack.env["DATABASE_URL"].replace(WRONG, right)
    prepared = run_db(stack.env, "prepare")
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    assert not (stack.settings.run_dir / "writer.refused").exists()
    stack.start_writer()
    doctor = run_db(stack.env, "doctor")
    assert "refused" not in doctor.stdout, doctor.stdout


def test_a_refused_login_under_circusd_says_a_new_database_url_takes_a_new_circusd(
        postgres_server: PostgresServer) -> None:
    """The owner's password changed while the stack ran (a DBA's ALTER ROLE), the writer restarted:
    its log, doctor and the clients said "fix the password in DATABASE_URL ..., then restart the
    writer". circusd gives the writer the environment it was started with, so a user who fixed
    DATABASE_URL in their shell and restarted the writer was refused again, and told the same (fault
    hunt). Each now says what a new DATABASE_URL takes: a quit, then `make run` with it."""
    from testkit.circus import Circusd, CircusStack

    stack = CircusStack()
    try:
        right = quote(postgres_server.passwords["ts_owner"], safe="")
        stack.env["DATABASE_URL"] = stack.env["DATABASE_URL"].replace(right, WRONG)
        Circusd.start(stack, wait_active=("api",), timeout=60)  # as `circusd circus.ini`: no `db prepare`
        wait_for("the writer to say its login was refused", lambda: REFUSED in stack.log("writer"), timeout=60)
        quit_then_make_run = (f"after a change of DATABASE_URL, `.venv/bin/circusctl --endpoint {stack.endpoint} "
                              "--timeout 120 quit --waiting`, then `make run` with the new one")
        line = next(x for x in stack.log("writer").splitlines() if REFUSED in x)
        assert FIX in line and quit_then_make_run in line, line
        doctor = run_db(stack.env, "doctor")
        said = [x for x in doctor.stdout.splitlines() if REFUSED in x]
        assert len(said) == 1 and quit_then_make_run in said[0], doctor.stdout
        told = no_writer_words(stack.settings)  # the clients', /api/health's and the API's 503's words
        assert REFUSED_PUBLIC in told and quit_then_make_run in told, told
        assert_no_password(line + doctor.stdout + told, postgres_server)
    finally:
        stack.close()


def test_prepare_does_not_wait_for_a_server_that_does_not_answer(wrong_password: Stack) -> None:
    """The writer waits for a server that is down (and circus's hooks do not wait for that writer):
    prepare's login check must not hold ``make run`` for it either."""
    stack = wrong_password
    stack.env["DATABASE_URL"] = re.sub(r"host=[^&]*", "host=/nonexistent-ts-socket-dir", stack.env["DATABASE_URL"])
    # Were prepare to wait for the server as the writer does (db.server_lock.SERVER_WAIT_S, 300 s), run_db's
    # timeout (60 s) would end it: it tries the login once (LOGIN_CHECK_S) and leaves the wait to the writer.
    prepared = run_db(stack.env, "prepare")
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr


@pytest.fixture
def same_host(home_databases: HomeDatabases) -> Iterator[tuple[Stack, Stack]]:
    """Two homes on one database with one TICKSTACK_HOST: two stacks of one host name."""
    with stacks_on_one_database(home_databases, TICKSTACK_HOST="shared-host") as stacks:
        yield stacks


def test_a_second_stack_with_the_same_host_name_is_told_to_take_its_own(same_host: tuple[Stack, Stack],
                                                                        postgres_server: PostgresServer) -> None:
    a, b = same_host
    writer_a = a.start_writer()
    # b's writer waits for the host's lock on the server, then refuses: the waiting line says why.
    second = subprocess.run([sys.executable, "-m", "workers.writer"], cwd=ROOT, capture_output=True, text=True,
                            env={**b.env, "TICKSTACK_WRITER_LOCK_WAIT": "3"}, timeout=60)
    assert second.returncode == 3, second.stderr[-2000:]
    waiting = next((x for x in second.stderr.splitlines() if "waiting up to 3 s" in x), "")
    assert "a writer with the same TICKSTACK_HOST in another home" in waiting, second.stderr[-2000:]
    assert "give this stack its own TICKSTACK_HOST" in waiting and "reload" not in waiting, waiting
    assert f"pid {writer_a.pid} on shared-host" in waiting, waiting
    # doctor in b's home: the same cause and fix, not "writes go to that stack's writer".
    doctor = run_db(b.env, "doctor")
    assert doctor.returncode == 1, doctor.stdout
    line = next((x for x in doctor.stdout.splitlines() if "This stack's writer cannot run" in x), "")
    assert "a writer with the same TICKSTACK_HOST ('shared-host') in another home" in line, doctor.stdout
    assert "Give this stack its own TICKSTACK_HOST" in line and "stop the other stack's writer" in line, line
    assert "Writes go to that stack's writer" not in doctor.stdout, doctor.stdout
    # b's clients (/api/health, the API's 503): the same, where they said "start the stack" to one running.
    told = no_writer_words(b.settings)
    assert "same TICKSTACK_HOST" in told and "give this stack its own TICKSTACK_HOST" in told, told
    # `make run` again in b: its prepare's login works, which says nothing of the lock: the reason stays.
    prepared = run_db(b.env, "prepare")
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    assert "same TICKSTACK_HOST" in no_writer_words(b.settings)
    assert_no_password(second.stderr + doctor.stdout + told, postgres_server)


def test_db_health_and_init_refuse_a_postgresql_home_from_a_shell_without_its_urls(
        stack: Stack, postgres_server: PostgresServer) -> None:
    """doctor's rule (the home's writer writes a server's database; this shell's settings name SQLite),
    applied by ``db health`` and ``db init``, in doctor's words; no SQLite file is made."""
    assert stack.env["DATABASE_URL"].startswith("postgresql"), "this test needs a PostgreSQL home"
    stack.start_writer()
    shell = {k: v for k, v in stack.env.items() if not k.startswith("DATABASE_")}

    def sqlite_files() -> list[Path]:
        return sorted(stack.home.glob("*.db*"))

    doctor = run_db(shell, "doctor")
    rule = next((x for x in doctor.stdout.splitlines() if "This home's writer writes postgresql" in x), "")
    assert rule.startswith("[FAIL] "), doctor.stdout
    words = rule.removeprefix("[FAIL] ")
    for args in (("health",), ("health", "--json"), ("init",)):
        done = run_db(shell, *args)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert done.stderr.strip() == f"python -m db {args[0]}: {words}", (args, done.stderr)
        assert "nobody" not in done.stdout and "db init" not in done.stdout, (args, done.stdout)
        assert sqlite_files() == [], (args, sqlite_files())
        assert_no_password(done.stdout + done.stderr, postgres_server)
