"""Health and maintenance on PostgreSQL (issue 11): ``db health``/``db doctor``, ``/api/health`` and
``/metrics`` report the server (reachable, size, connections by application_name, the writer lock's
holder) and fail when it is down; the backup job is ``pg_dump -Fc`` (restorable, 0600, no password
anywhere); quick_check is amcheck, or says it was skipped.

On the session's throwaway server (:class:`testkit.postgres.PostgresServer`); each test has a
database of its own.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, make_url, text

from db.client import WriterClient
from db.config import load_settings
from db.engine import psycopg_params
from db.errors import NotFound, server_trouble
from db.server import libpq_env, pg_program
from testkit.env import ROOT, isolated_env, new_home
from testkit.helpers import ConsoleClient, wait_for
from testkit.postgres import HomeDatabases, PostgresServer
from testkit.writer import Stack

#: A server's own promises: run by ``pytest --database postgresql`` (the suite's PostgreSQL run).
pytestmark = pytest.mark.postgres_only

NOW_TS = 1_704_067_200_000
HOST = socket.gethostname()


@pytest.fixture
def pg(home_databases: HomeDatabases) -> Iterator[Stack]:
    """A private home on a database of its own (passwords in both URLs), whatever ``--database`` says."""
    home = new_home()
    env = {k: v for k, v in isolated_env(home).items() if not k.startswith("DATABASE_")}
    stack = Stack(home, {**env, **home_databases(home)})
    try:
        yield stack
    finally:
        stack.close()


def run(stack: Stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=stack.env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def rows(stack: Stack, sql: str) -> list[Any]:
    engine = create_engine(stack.env["DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql)).all()]
    finally:
        engine.dispose()


def no_password(texts: str, server: PostgresServer) -> None:
    for role, password in server.passwords.items():
        assert password not in texts, f"{role}'s password is in the output"


def insert_ticks(stack: Stack, n: int, first: int = 0) -> None:
    ticks = [{"symbol": "BTCUSD", "ts": NOW_TS + i, "bid": 100.0, "ask": 100.5, "volume": 1.0, "source": "t",
              "seq": i} for i in range(first, first + n)]
    with WriterClient(settings=stack.settings, deadline=20) as client:
        assert client.call("insert_ticks", ticks=ticks)["inserted"] == n


# --------------------------------------------------------------------------- health


def test_health_doctor_api_and_metrics_report_the_server_and_fail_while_it_is_down(
        pg: Stack, postgres_server: PostgresServer) -> None:
    """Up: size, connections by application_name (the writer's and its lock's named with this
    host), the writer lock's holder, exit 0. Server stopped: ``db health`` and ``db doctor`` exit 1
    saying the server does not answer, ``/api/health`` is 503 with ``reachable: false``, /metrics
    ``tickstack_database_up 0``. Nothing shows a password."""
    from webapp import create_app

    writer = pg.start_writer()
    insert_ticks(pg, 100)
    health = run(pg, "-m", "db", "health", "--json")
    assert health.returncode == 0, health.stdout + health.stderr
    snap = json.loads(health.stdout)
    server = snap["server"]
    assert server["reachable"] and server["size_bytes"] > 1_000_000, server
    assert server["by_application"].get(f"tickstack writer on {HOST}") == 1, server["by_application"]
    assert server["by_application"].get(f"tickstack writer-lock on {HOST}") == 1, server["by_application"]
    # Counted as the reader (ts_reader) sees them: the server's count was its own sessions only, as
    # pg_stat_activity hides other roles' backend_type ("6 of 200 on the server" beside 11 on this
    # database).
    assert server["server_connections"] >= server["connections"] >= 3, server
    assert server["writer_lock"]["writer_pid"] == writer.pid and snap["writer"]["pid"] == writer.pid
    assert "pragmas" not in snap and "journal" not in health.stdout
    text_health = run(pg, "-m", "db", "health")
    assert text_health.returncode == 0 and f"writer lock held by tickstack writer-lock pid {writer.pid}" in \
        text_health.stdout, text_health.stdout
    doctor = run(pg, "-m", "db", "doctor")
    assert doctor.returncode == 0 and "The database server answers" in doctor.stdout, doctor.stdout
    assert re.search(r"\[OK  \] amcheck of \d+ indexes: ok\.", doctor.stdout), doctor.stdout  # as SQLite's
    # A shell with the home set and not the database's URLs: its settings name a SQLite file that is not
    # there, and doctor advised `db init`, which would make one (a new user's run, round 40).
    elsewhere = subprocess.run([sys.executable, "-m", "db", "doctor"], cwd=ROOT, capture_output=True, text=True,
                               timeout=120, env={k: v for k, v in pg.env.items() if not k.startswith("DATABASE_URL")})
    assert elsewhere.returncode == 1, elsewhere.stdout + elsewhere.stderr
    assert "This home's writer writes postgresql" in elsewhere.stdout and "set DATABASE_URL" in elsewhere.stdout
    assert "db init" not in elsewhere.stdout, elsewhere.stdout
    no_password(elsewhere.stdout + elsewhere.stderr, postgres_server)

    app = create_app("api", load_settings(pg.env))
    client = app.test_client()
    response = client.get("/api/health")
    assert response.status_code == 200, response.json
    database = response.json["database"]
    assert database["reachable"] is True and database["size_bytes"] == pytest.approx(server["size_bytes"], rel=0.5)
    assert set(database) == {"dialect", "host", "reachable", "size_bytes", "connections", "ping_ms"}, database
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "tickstack_database_up 1.0" in metrics
    assert re.search(r"^tickstack_database_size_bytes \d", metrics, re.M), metrics
    assert f'tickstack_database_connections{{application="tickstack writer on {HOST}"}} 1.0' in metrics

    seen = [health.stdout, text_health.stdout, doctor.stdout, json.dumps(response.json), metrics]
    # Down until the checks below are done (each is a process or a request against a server that does
    # not answer: 12 s of fixed outage was once too short for them on a loaded machine).
    checked = threading.Event()
    restart = threading.Thread(target=postgres_server.restart, kwargs={"down_for": 120.0, "until": checked})
    restart.start()
    try:
        wait_for("the server to stop", postgres_server.socket_gone, timeout=30)
        down = run(pg, "-m", "db", "health")
        assert down.returncode == 1 and "server     DOWN (" in down.stdout, down.stdout + down.stderr
        down_json = run(pg, "-m", "db", "health", "--json")
        assert down_json.returncode == 1 and json.loads(down_json.stdout)["server"]["reachable"] is False
        doctor_down = run(pg, "-m", "db", "doctor")
        assert doctor_down.returncode == 1 and "[FAIL] The database server does not answer" in doctor_down.stdout, \
            doctor_down.stdout
        response_down = client.get("/api/health")
        assert response_down.status_code == 503 and response_down.json["status"] == "unavailable"
        assert response_down.json["database"]["reachable"] is False, response_down.json
        metrics_down = client.get("/metrics").get_data(as_text=True)
        assert "tickstack_database_up 0.0" in metrics_down
        assert postgres_server.socket_gone(), "the server came back before the checks ended"
        seen += [down.stdout + down.stderr, down_json.stdout, doctor_down.stdout, json.dumps(response_down.json),
                 metrics_down]
    finally:
        checked.set()
        restart.join(120)
    back = run(pg, "-m", "db", "health", "--json")
    assert json.loads(back.stdout)["server"]["reachable"] is True  # the writer lost its lock: exit 1 for that
    no_password("\n".join(seen) + pg.writer_log(), postgres_server)
    # One line per event: SQLAlchemy's text ran on over a second line ("(Background on this error at:
    # ...)") in "the write connection did not roll back (...)" and others (fault hunt on PostgreSQL mode).
    stray = [line for line in pg.writer_log().splitlines()
             if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \[\d+\] ", line)]
    assert not stray, pg.writer_log()[-3000:]


# --------------------------------------------------------------------------- backup


def test_libpq_parameters_in_the_urls_are_kept_beside_the_stacks_own(pg: Stack) -> None:
    """A URL may carry libpq's own parameters (the README's carry ``?host=``). With
    ``?application_name=`` the writer could not take its lock and crash-looped ("got multiple values for
    keyword argument 'application_name'", said as a server it "cannot reach"), as did every leader;
    with ``?connect_timeout=`` ``db health`` and doctor said the server was down, and with
    ``?target_session_attrs=read-write`` they did too ("session is read-only": their probe's session
    was made read-only as it started). The stack's own session names win over the URL's: doctor,
    the console and a second writer go by them (fault hunt on PostgreSQL mode)."""
    # (A read-write target on the readers' URL is refused by libpq itself: their role's sessions are
    # read-only, README "PostgreSQL".)
    for name, extra in (("DATABASE_URL", "application_name=mine&connect_timeout=10&target_session_attrs=read-write"),
                        ("DATABASE_READ_URL", "application_name=mine&connect_timeout=10")):
        url = pg.env[name]
        pg.env[name] = f"{url}{'&' if '?' in url else '?'}{extra}"
    writer = pg.start_writer()
    insert_ticks(pg, 10)
    health = run(pg, "-m", "db", "health", "--json")
    assert health.returncode == 0, health.stdout + health.stderr
    server = json.loads(health.stdout)["server"]
    assert server["reachable"] and server["writer_lock"]["writer_pid"] == writer.pid, server
    assert server["by_application"].get(f"tickstack writer-lock on {HOST}") == 1, server["by_application"]
    doctor = run(pg, "-m", "db", "doctor")
    assert doctor.returncode == 0 and "The database server answers" in doctor.stdout, doctor.stdout
    # A leader's session (db.leader) too: the analysis worker leads, reads the ticks and stores its bars.
    analysis = run(pg, "-m", "workers.analysis", "--until-idle")
    assert analysis.returncode == 0, analysis.stdout + analysis.stderr
    assert rows(pg, "SELECT count(*) FROM bars")[0][0] > 0


def test_a_wrong_read_password_is_said_as_a_refused_login_of_the_read_url(
        pg: Stack, postgres_server: PostgresServer) -> None:
    """A wrong DATABASE_READ_URL password (a new user's PostgreSQL run): doctor said "The database server
    does not answer ... check ... DATABASE_URL", /api/health "the database server does not answer". The
    server answered, refusing the login of the readers' URL: said so, naming that variable."""
    from webapp import create_app

    writer = pg.start_writer()
    right = pg.env["DATABASE_READ_URL"]
    wrong = right.replace(postgres_server.passwords["ts_reader"], "Wrong-Reader-Password")
    assert wrong != right
    bad = Stack(pg.home, {**pg.env, "DATABASE_READ_URL": wrong})
    doctor = run(bad, "-m", "db", "doctor")
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "The database server refuses the login of DATABASE_READ_URL" in doctor.stdout, doctor.stdout
    assert "password authentication failed" in doctor.stdout and "does not answer" not in doctor.stdout, doctor.stdout
    response = create_app("api", load_settings(bad.env)).test_client().get("/api/health")
    assert response.json["database"]["error"] == "the database server refuses the login", response.json
    # A worker said "no database at <DATABASE_URL> after 60 s: is the writer running?" (the writer ran).
    code = ("import runpy, sys, workers.base; workers.base.DATABASE_WAIT_S = 1.0; "
            "sys.argv = ['workers.jobs', '--until-idle']; "
            "runpy.run_module('workers.jobs', run_name='__main__', alter_sys=True)")
    jobs = run(bad, "-c", code)
    assert jobs.returncode == 1 and "Traceback" not in jobs.stderr, jobs.stderr[-3000:]
    assert ("jobs: the database server refuses the login at postgresql+psycopg://ts_reader:***@" in jobs.stderr
            and "(DATABASE_READ_URL, the readers' URL), tried for 1 s: " in jobs.stderr
            and "is the writer running" not in jobs.stderr), jobs.stderr[-3000:]
    no_password(doctor.stdout + json.dumps(response.json) + jobs.stderr, postgres_server)
    assert pg.stop(writer) == 0


def test_a_server_with_no_free_connection_slot_is_said_as_such_not_as_down(
        pg: Stack, postgres_server: PostgresServer) -> None:
    """Every connection slot taken (max_connections reached while the stack runs; here the database's
    CONNECTION LIMIT, the same refusal, SQLSTATE 53300): doctor said "The database server does not
    answer ... is it running? `pg_isready`", `db health` "server DOWN", /api/health and the workers
    "does not answer", for a server that runs (fault hunt). Said as a server with no free slot, with
    who to look for; the writer's session works on, so writes are still stored."""
    from webapp import create_app

    for libpq in ('FATAL:  sorry, too many clients already',
                  'FATAL:  remaining connection slots are reserved for non-replication superuser connections',
                  'FATAL:  too many connections for role "ts_reader"'):
        assert server_trouble(libpq) == "has no free connection slot", libpq
    writer = pg.start_writer()
    insert_ticks(pg, 1)
    database = make_url(pg.env["DATABASE_URL"]).database
    postgres_server.psql("postgres", "postgres", f"ALTER DATABASE {database} CONNECTION LIMIT 0")
    try:
        with WriterClient(settings=pg.settings, deadline=20) as client:  # on the writer's own session
            assert client.call("insert_ticks", ticks=[{"symbol": "BTCUSD", "ts": NOW_TS + 1, "bid": 100.0,
                                                       "ask": 100.5, "source": "t", "seq": 1}])["inserted"] == 1
        doctor = run(pg, "-m", "db", "doctor")
        health = run(pg, "-m", "db", "health")
        response = create_app("api", load_settings(pg.env)).test_client().get("/api/health")
        code = ("import runpy, sys, workers.base; workers.base.DATABASE_WAIT_S = 1.0; "
                "sys.argv = ['workers.jobs', '--until-idle']; "
                "runpy.run_module('workers.jobs', run_name='__main__', alter_sys=True)")
        jobs = run(pg, "-c", code)
    finally:
        postgres_server.psql("postgres", "postgres", f"ALTER DATABASE {database} CONNECTION LIMIT -1")
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "The database server has no free connection slot (" in doctor.stdout, doctor.stdout
    assert "pg_stat_activity" in doctor.stdout and "does not answer" not in doctor.stdout, doctor.stdout
    assert "server     up, but it has no free connection slot (" in health.stdout, health.stdout
    assert response.status_code == 503, response.json
    assert response.json["database"]["error"] == "the database server has no free connection slot", response.json
    assert "jobs: the database server has no free connection slot at postgresql+psycopg://ts_reader:***@" in \
        jobs.stderr and "Traceback" not in jobs.stderr, jobs.stderr[-3000:]
    no_password(doctor.stdout + health.stdout + json.dumps(response.json) + jobs.stderr, postgres_server)
    assert rows(pg, "SELECT count(*) FROM ticks") == [(2,)]
    assert pg.stop(writer) == 0


def test_a_read_the_server_refuses_to_connect_names_no_database_role_nor_host_to_the_api_caller(
        pg: Stack, postgres_server: PostgresServer) -> None:
    """A read of the API (no login) whose connection the server refused (its database renamed by a DBA,
    every connection slot taken: the fault hunt) was answered 503 with libpq's words, which name the
    server's socket or host, the database and the role. The kind of trouble only, as /api/health says
    it; the log keeps libpq's words."""
    from webapp import create_app

    url = make_url(pg.env["DATABASE_READ_URL"])
    gone = url.set(database="ts_renamed_away").render_as_string(hide_password=False)
    response = create_app("api", load_settings({**pg.env, "DATABASE_READ_URL": gone})).test_client().get(
        "/api/ticks?symbol=BTCUSD&limit=1")
    assert response.status_code == 503, response.json
    error = response.json["error"]
    assert error == {"code": "database_unavailable",
                     "message": "the database could not be read: the database server refuses the login"}, error
    body = response.get_data(as_text=True)
    for named in ("ts_renamed_away", "ts_reader", str(postgres_server.socket_dir), "does not exist"):
        assert named not in body, body
    no_password(body, postgres_server)


def test_doctor_says_a_writer_waiting_for_the_server_runs_not_that_none_does(pg: Stack) -> None:
    """A writer that took its home's lock and waits for the server's (the server down, or refusing its
    login): doctor and the console said "The writer is not running ... start writer", which circus
    answers with "already active". Here this process holds the home's writer lock as such a writer
    does, and no server lock is held."""
    from db.lock import WriterLock

    lock = WriterLock(pg.settings.writer_lock_path)
    lock.acquire()
    try:
        doctor = run(pg, "-m", "db", "doctor")
    finally:
        lock.release()
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert f"The writer (pid {os.getpid()}) runs but does not serve yet: it waits for the database server" in \
        doctor.stdout, doctor.stdout
    assert "The writer is not running" not in doctor.stdout, doctor.stdout


def test_doctor_says_how_many_sessions_its_list_of_names_leaves_out(pg: Stack) -> None:
    """doctor names the six busiest application names; with more, "9 connections (... 6 names)" left the
    reader counting: the rest is said, with how many sessions."""
    engines = [create_engine(pg.env["DATABASE_URL"], connect_args={"application_name": f"probe-{i}"})
               for i in range(8)]
    conns = [e.connect() for e in engines]
    try:
        doctor = run(pg, "-m", "db", "doctor")
    finally:
        for conn in conns:
            conn.close()
        for engine in engines:
            engine.dispose()
    line = next(line for line in doctor.stdout.splitlines() if "The database server answers" in line)
    total = int(re.search(r"(\d+) connections \(", line).group(1))
    names = line.split(" connections (", 1)[1].split(", and ", 1)[0].split(", ")
    listed = sum(int(name.split(" ", 1)[0]) for name in names)
    more = re.search(r"and (\d+) more under (\d+) other names", line)
    assert more and listed + int(more.group(1)) == total, line


def test_the_backup_job_writes_a_private_restorable_pg_dump(pg: Stack, postgres_server: PostgresServer) -> None:
    """``python -m workers.jobs --run backup`` on PostgreSQL: ``backups/tickstack-<stamp>.dump``, mode
    0600, that ``pg_restore`` restores into another database with every tick; recorded ok; rotation
    keeps TICKSTACK_BACKUP_KEEP of them. No password in its output, record or the dump's name."""
    pg.env["TICKSTACK_BACKUP_KEEP"] = "1"
    pg.start_writer()
    insert_ticks(pg, 500)
    outputs = []
    for _ in range(2):
        done = run(pg, "-m", "workers.jobs", "--run", "backup")
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, outputs[-1][-3000:]
    dumps = sorted((pg.home / "backups").iterdir())
    assert len(dumps) == 1 and re.fullmatch(r"tickstack-\d{8}T\d{6}Z\.dump", dumps[0].name), dumps
    assert stat.S_IMODE(dumps[0].stat().st_mode) == 0o600
    records = rows(pg, "SELECT ok, detail FROM job_runs WHERE job = 'backup' ORDER BY id")
    assert [ok for ok, _ in records] == [True, True], records
    detail = json.loads(records[-1][1])
    assert detail["path"] == str(dumps[0]) and detail["entries"] > 10 and len(detail["removed"]) == 1, detail

    postgres_server.create_database("ts_restored")
    try:
        owner = psycopg_params_of(postgres_server.url("ts_owner", database="ts_restored"))
        restore = subprocess.run([pg_program("pg_restore"), "--no-owner", "-d", owner["conninfo"], str(dumps[0])],
                                 env={**os.environ, "PGPASSWORD": owner["password"]}, capture_output=True, text=True,
                                 timeout=120)
        assert restore.returncode == 0, restore.stderr
        count = postgres_server.psql("ts_restored", "postgres", "SELECT count(*) FROM ticks").strip()
        assert count == "500"
    finally:
        postgres_server.drop_database("ts_restored")
    no_password("\n".join(outputs) + json.dumps(records), postgres_server)


def test_db_restore_puts_a_dump_back_and_continues_the_tick_and_trade_ids(pg: Stack,
                                                                         postgres_server: PostgresServer) -> None:
    """``python -m db restore FILE.dump`` on PostgreSQL: the README had the user type ``pg_restore
    --clean --if-exists``, which sets the id sequences back to the dump's, so the tick ids given after
    the dump were given again (a consumer resuming from the last id it read skips the new ticks) and
    so was a lost trade's id (a client's close of it closed another trade), as on SQLite before
    schema v5. The restore refuses while the stack has a session on the database, and a file that is
    not a dump, changing nothing; it restores in one transaction, sets the sequences on from the
    replaced database's, names the trades lost, and says no password."""
    def open_trade() -> int:
        with WriterClient(settings=pg.settings, deadline=20) as client:
            return client.call("open_trade", symbol="BTCUSD", side="buy", size=1.0, entry_price=100.0)["id"]

    writer = pg.start_writer()
    insert_ticks(pg, 300)
    kept = open_trade()
    done = run(pg, "-m", "workers.jobs", "--run", "backup")
    assert done.returncode == 0, done.stderr[-3000:]
    (dump,) = (pg.home / "backups").iterdir()
    insert_ticks(pg, 200, first=300)  # after the dump: lost by the restore
    lost = open_trade()
    top_tick = rows(pg, "SELECT max(id) FROM ticks")[0][0]
    outputs = []

    refused = run(pg, "-m", "db", "restore", str(dump))
    outputs.append(refused.stdout + refused.stderr)
    assert refused.returncode == 1 and "stop it on every host first" in outputs[-1] \
        and "tickstack writer" in outputs[-1], outputs[-1]
    assert pg.stop(writer) == 0
    not_a_dump = pg.home / "notes.dump"
    not_a_dump.write_text("not a dump\n")
    refused = run(pg, "-m", "db", "restore", str(not_a_dump))
    outputs.append(refused.stdout + refused.stderr)
    assert refused.returncode == 1 and "is not a PostgreSQL dump" in outputs[-1], outputs[-1]
    assert rows(pg, "SELECT count(*) FROM ticks") == [(500,)]  # nothing changed by either

    # Another restore's copies, under the names of this minute's seconds (a restore within the same
    # second was refused for want of a name for its copy): kept as they are, the copy named apart.
    start = int(time.time())
    others = [pg.home / f"tickstack.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(start + i))}.dump"
              for i in range(120)]
    for other in others:
        other.write_bytes(b"another restore's copy")
    done = run(pg, "-m", "db", "restore", str(dump))
    outputs.append(done.stdout + done.stderr)
    assert done.returncode == 0, outputs[-1]
    assert "ids continue after the replaced database's (" in done.stdout and f"ticks_id_seq {top_tick}" in done.stdout \
        and f"trades_id_seq {lost}" in done.stdout, done.stdout
    assert f"WARNING: trade {lost}, opened after the backup, is not in it" in done.stdout, done.stdout
    assert rows(pg, "SELECT count(*), max(id) FROM ticks")[0][0] == 300
    assert all(other.read_bytes() == b"another restore's copy" for other in others)
    for other in others:
        other.unlink()
    (replaced,) = pg.home.glob("tickstack.replaced-*.dump")  # the database as it was, dumped first
    assert re.fullmatch(r"tickstack\.replaced-\d{8}T\d{6}Z\.2\.dump", replaced.name), replaced.name
    assert f"the database it replaced is kept as {replaced}" in done.stdout, done.stdout
    assert stat.S_IMODE(replaced.stat().st_mode) == 0o600
    said = run(pg, "-m", "db", "doctor").stdout  # nothing removes it (each the size of a database): doctor says so
    assert "1 file(s) kept by `db restore` of the databases it replaced take " in said \
        and f"in {pg.home} (the newest {replaced.name}); nothing removes them" in said, said
    postgres_server.create_database("ts_replaced")
    try:  # it holds what the restore replaced: the lost trade and the ticks after the dump
        owner = psycopg_params_of(postgres_server.url("ts_owner", database="ts_replaced"))
        put = subprocess.run([pg_program("pg_restore"), "--no-owner", "-d", owner["conninfo"], str(replaced)],
                             env={**os.environ, "PGPASSWORD": owner["password"]}, capture_output=True, text=True,
                             timeout=120)
        assert put.returncode == 0, put.stderr
        assert postgres_server.psql("ts_replaced", "postgres", "SELECT string_agg(id::text, ',' ORDER BY id) "
                                    "FROM trades").strip() == f"{kept},{lost}"
        assert postgres_server.psql("ts_replaced", "postgres", "SELECT count(*) FROM ticks").strip() == "500"
    finally:
        postgres_server.drop_database("ts_replaced")
    assert rows(pg, "SELECT id FROM trades") == [(kept,)]

    writer = pg.start_writer()
    with WriterClient(settings=pg.settings, deadline=20) as client:
        with pytest.raises(NotFound):
            client.call("close_trade", trade_id=lost, price=101.0)
    assert open_trade() == lost + 1  # not the lost trade's id again
    insert_ticks(pg, 1, first=1000)
    assert rows(pg, "SELECT id FROM ticks WHERE seq = 1000")[0][0] > top_tick
    assert pg.stop(writer) == 0
    no_password("\n".join(outputs), postgres_server)


#: ``python -m db restore --no-copy DUMP`` whose pg_restore is the program ``argv[1]`` (a wrapper of
#: the real one): ``db.server.pg_program`` finds the server's own binaries, not a program on PATH.
RESTORE_WITH_PG_RESTORE = """
import sys
import db.server_restore
from db.__main__ import main
real = db.server_restore.pg_program
db.server_restore.pg_program = lambda name: sys.argv[1] if name == "pg_restore" else real(name)
sys.exit(main(["restore", "--no-copy", sys.argv[2]]))
"""


def dump_by_hand(stack: Stack) -> tuple[Path, str]:
    """``by-hand.dump`` in the home: ``pg_dump -Fc`` of the stack's database as a DBA makes one (as
    ``DATABASE_URL``'s role; all of it, extensions and large objects too), and its ``pg_restore --list``."""
    owner = psycopg_params_of(stack.env["DATABASE_URL"])
    dump = stack.home / "by-hand.dump"
    made = subprocess.run([pg_program("pg_dump"), "-Fc", "-f", str(dump), "-d", owner["conninfo"]],
                          env={**os.environ, "PGPASSWORD": owner["password"]}, capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr
    listed = subprocess.run([pg_program("pg_restore"), "--list", str(dump)], capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    return dump, listed.stdout


def cut_after_its_list(dump: Path, damaged: Path) -> Path:
    """``damaged``: ``dump`` cut short right after its list of entries (the custom format's start),
    which ``pg_restore --list`` reads whole, so that a restore fails at the first data it reads."""
    data = dump.read_bytes()
    listed, unlisted = len(data), 0  # the shortest cut found that pg_restore lists, the longest it does not
    while listed - unlisted > 1:
        cut = (listed + unlisted) // 2
        damaged.write_bytes(data[:cut])
        done = subprocess.run([pg_program("pg_restore"), "--list", str(damaged)], capture_output=True, timeout=60)
        listed, unlisted = (cut, unlisted) if done.returncode == 0 else (listed, cut)
    assert listed < len(data) - 100, f"{dump}'s list is all of it: no data to cut"
    damaged.write_bytes(data[:listed])
    return damaged


def test_db_restore_killed_as_its_pg_restore_ends_never_leaves_the_dumps_ids_to_be_given_again(
        pg: Stack, postgres_server: PostgresServer, tmp_path: Path) -> None:
    """The restore committed ``pg_restore --single-transaction``, then set the id sequences on from
    the replaced database's in a second transaction: killed between the two (kill -9, a lost
    connection, the server stopped), it left the dump's rows with the dump's sequences, so the tick
    and trade ids given after the dump were to be given again, and nobody was told. Killed (by its
    pid) once its pg_restore has ended well (the real one, in a wrapper that holds its output open
    meanwhile) and what it restored is done, the database is as it was, or restored with its ids
    continued: never restored with them set back. The dump has a DBA's large object, whose data
    pg_restore's script wraps in a COMMIT of its own. A damaged dump, pg_restore failing midway,
    changes nothing and is said in pg_restore's words. Not killed, the restore says the ids it continued."""
    def sequences() -> dict[str, int]:
        return dict(rows(pg, "SELECT sequencename, last_value FROM pg_sequences WHERE last_value IS NOT NULL"))

    writer = pg.start_writer()
    insert_ticks(pg, 300)
    with WriterClient(settings=pg.settings, deadline=20) as client:
        client.call("open_trade", symbol="BTCUSD", side="buy", size=1.0, entry_price=100.0)
    database = make_url(pg.env["DATABASE_URL"]).database
    postgres_server.psql(database, "ts_owner", "SELECT lo_from_bytea(0, 'a DBA''s notes')")
    dump, listed = dump_by_hand(pg)  # the jobs worker's dumps have no large objects (--extension=plpgsql)
    assert " BLOBS - BLOBS" in listed, listed  # the large object's data, in the dump
    insert_ticks(pg, 200, first=300)  # after the dump: ids the restore must not give again
    with WriterClient(settings=pg.settings, deadline=20) as client:
        client.call("open_trade", symbol="BTCUSD", side="buy", size=1.0, entry_price=100.0)
    assert pg.stop(writer) == 0
    before = sequences()
    assert before["ticks_id_seq"] == 500 and before["trades_id_seq"] == 2, before
    outputs = []

    damaged = cut_after_its_list(dump, pg.home / "damaged.dump")
    refused = run(pg, "-m", "db", "restore", "--no-copy", str(damaged))
    outputs.append(refused.stdout + refused.stderr)
    assert refused.returncode == 1 and "pg_restore failed" in refused.stderr \
        and "(one transaction: nothing was changed)" in refused.stderr, outputs[-1]
    assert rows(pg, "SELECT count(*) FROM ticks") == [(500,)] and sequences() == before

    # The real pg_restore; once it has restored (--clean) and ended well, the wrapper writes down its
    # arguments and holds its output open until the restore's process is gone, which waits meanwhile.
    ended = tmp_path / "pg_restore-ended"
    wrapper = tmp_path / "pg_restore"
    wrapper.write_text(f"""#!/bin/sh
{shlex.quote(pg_program("pg_restore"))} "$@"
status=$?
case " $* " in *" --clean "*) if [ $status -eq 0 ]; then
  echo " $* " > {shlex.quote(str(ended))}
  while kill -0 $PPID 2>/dev/null; do sleep 0.05; done
fi;; esac
exit $status
""")
    wrapper.chmod(0o700)
    restore = subprocess.Popen([sys.executable, "-c", RESTORE_WITH_PG_RESTORE, str(wrapper), str(dump)],
                               env=pg.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the restore's pg_restore to end", lambda: ended.exists() or restore.poll() is not None)
        if ended.exists() and " -d " not in ended.read_text():  # pg_restore wrote a script (-f) for a session
            # of the restore's own: killed once that session has run all it was sent, and waits for more
            # (idle for a second: not caught between two statements).
            wait_for("the restore's session to have run pg_restore's script", lambda: rows(
                pg, "SELECT count(*) FILTER (WHERE state IN ('idle', 'idle in transaction') AND state_change < "
                    "now() - interval '1 second'), count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name LIKE 'tickstack restore%'") == [(1, 1)])
    finally:  # (pg_restore -d: its session committed the restore and ended)
        restore.kill()
        out, err = restore.communicate(timeout=60)
    outputs.append(out + err)
    assert restore.returncode == -signal.SIGKILL, outputs[-1]
    wait_for("the killed restore's sessions to end", lambda: rows(
        pg, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'tickstack restore%'") == [(0,)])
    ticks, after = rows(pg, "SELECT count(*) FROM ticks")[0][0], sequences()
    assert (ticks, after) == (500, before) or (ticks == 300 and all(
        after.get(name, 0) >= value for name, value in before.items())), \
        f"{ticks} ticks, sequences {after}, before the restore {before}"

    done = run(pg, "-m", "db", "restore", "--no-copy", str(dump))  # not killed: restored, its ids continued
    outputs.append(done.stdout + done.stderr)
    assert done.returncode == 0, outputs[-1]
    assert "ids continue after the replaced database's (" in done.stdout and "ticks_id_seq 500" in done.stdout \
        and "trades_id_seq 2" in done.stdout and "WARNING: trade 2, opened after the backup" in done.stdout, done.stdout
    assert rows(pg, "SELECT count(*) FROM ticks") == [(300,)] and sequences() == before
    assert rows(pg, "SELECT count(*) FROM pg_largeobject_metadata") == [(1,)]  # the DBA's, left as it is
    no_password("\n".join(outputs), postgres_server)


def test_db_restore_refuses_a_dump_of_another_database_and_names_a_session_whose_lock_it_would_wait_for(
        pg: Stack, postgres_server: PostgresServer) -> None:
    """A ``pg_dump -Fc`` of another program's database was "restored" (its tables put beside the
    stack's, none of the stack's changed) and the stack told to start again; and a session of
    another program left in a transaction that read a table (a DBA's psql) made the restore wait
    without a word (pg_restore's script sets ``lock_timeout = 0``) for the hour it may take. Both are
    refused, in words that say what is in the way, with nothing changed."""
    writer = pg.start_writer()
    insert_ticks(pg, 10)
    assert run(pg, "-m", "workers.jobs", "--run", "backup").returncode == 0
    (dump,) = (pg.home / "backups").iterdir()
    assert pg.stop(writer) == 0
    postgres_server.create_database("ts_elsewhere")
    try:
        postgres_server.psql("ts_elsewhere", "ts_owner", "CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        other = pg.home / "elsewhere.dump"
        owner = psycopg_params_of(postgres_server.url("ts_owner", database="ts_elsewhere"))
        made = subprocess.run([pg_program("pg_dump"), "-Fc", "-f", str(other), "-d", owner["conninfo"]],
                              env={**os.environ, "PGPASSWORD": owner["password"]}, capture_output=True, text=True,
                              timeout=120)
        assert made.returncode == 0, made.stderr
    finally:
        postgres_server.drop_database("ts_elsewhere")
    outputs = []
    refused = run(pg, "-m", "db", "restore", str(other))
    outputs.append(refused.stdout + refused.stderr)
    assert refused.returncode == 1 and "is a PostgreSQL dump, but not of a tickstack database (it has no " \
        "schema_version or ticks table)" in outputs[-1], outputs[-1]
    assert rows(pg, "SELECT to_regclass('notes')") == [(None,)]

    import psycopg
    reader = psycopg_params_of(pg.env["DATABASE_READ_URL"])
    with psycopg.connect(reader["conninfo"], password=reader["password"], application_name="psql") as dba:
        dba.execute("SELECT count(*) FROM ticks").fetchall()  # its transaction left open: a lock on ticks
        pid = dba.info.backend_pid
        refused = run(pg, "-m", "db", "restore", str(dump), timeout=300)  # a give-up bound, not a timing
        outputs.append(refused.stdout + refused.stderr)
        assert refused.returncode == 1 and "another session holds a lock on the stack's tables" in outputs[-1] \
            and f"server pid {pid} (psql, role ts_reader" in outputs[-1] \
            and "nothing was changed" in outputs[-1], outputs[-1]
    assert not list(pg.home.glob("tickstack.replaced-*.dump"))  # refused before the copy
    assert rows(pg, "SELECT count(*) FROM ticks") == [(10,)]
    database = make_url(pg.env["DATABASE_URL"]).database
    postgres_server.psql(database, "postgres", "CREATE TABLE dba_notes (body text); "  # not the stack's
                         "GRANT SELECT ON dba_notes TO ts_owner")  # pg_dump's copy of the database reads it
    dba = psycopg.connect(**postgres_server._params("postgres", database), application_name="psql")
    try:  # a lock on a table the dump does not have (one pg_dump's read waits not for) is in no one's way
        dba.execute("INSERT INTO dba_notes VALUES ('kept')")
        done = run(pg, "-m", "db", "restore", str(dump), timeout=300)  # the session on ticks gone: restored
    finally:
        dba.close()
    outputs.append(done.stdout + done.stderr)
    assert done.returncode == 0, outputs[-1]
    no_password("\n".join(outputs), postgres_server)


def test_db_restore_takes_a_hand_made_dump_of_a_database_with_amcheck_installed(
        pg: Stack, postgres_server: PostgresServer) -> None:
    """``pg_dump -Fc`` of the database, by hand (or by the jobs worker before it left extensions
    out), has amcheck in it when a DBA installed it for quick_check, as README says to: the restore,
    as the tables' owner, failed at ``DROP EXTENSION IF EXISTS amcheck`` ("must be owner of extension
    amcheck"), whatever the dump. Extensions are the server administrator's, and the stack's schema
    needs none: the restore leaves them as they are, and restores the rest."""
    database = make_url(pg.env["DATABASE_URL"]).database
    postgres_server.psql(database, "postgres", "CREATE EXTENSION IF NOT EXISTS amcheck")
    writer = pg.start_writer()
    insert_ticks(pg, 10)
    assert pg.stop(writer) == 0
    dump, listed = dump_by_hand(pg)
    assert " EXTENSION - amcheck" in listed, listed  # what the restore met
    writer = pg.start_writer()
    insert_ticks(pg, 5, first=10)
    assert pg.stop(writer) == 0
    done = run(pg, "-m", "db", "restore", str(dump))
    assert done.returncode == 0, done.stdout + done.stderr
    assert rows(pg, "SELECT count(*) FROM ticks") == [(10,)]
    assert rows(pg, "SELECT count(*) FROM pg_extension WHERE extname = 'amcheck'") == [(1,)]  # left as it was
    no_password(done.stdout + done.stderr, postgres_server)


def psycopg_params_of(url: str) -> dict[str, str]:
    from psycopg.conninfo import make_conninfo
    from sqlalchemy.engine import make_url

    params = {k: str(v) for k, v in psycopg_params(make_url(url)).items()}
    password = params.pop("password")
    return {"conninfo": make_conninfo(**params), "password": password}


def test_a_dumps_password_file_is_made_in_the_private_home_and_removed_after(pg: Stack) -> None:
    """pg_dump's and pg_restore's PGPASSFILE was made in the system's temporary folder: a backup or a
    restore killed in the middle (kill -9: no ``finally``) left the password there, where nothing
    removes it (one was found after this round's test runs). It is made in the home's private
    ``run/`` (0700), which a test's removal of its home takes too, and removed after each dump."""
    from db.server import private_folder

    private = private_folder(pg.settings)
    try:
        assert private.parent == pg.settings.run_dir and stat.S_IMODE(private.stat().st_mode) == 0o700
    finally:
        private.rmdir()
    pg.start_writer()
    done = run(pg, "-m", "workers.jobs", "--run", "backup")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(pg.settings.run_dir.glob("ts-pgpass-*")), list(pg.settings.run_dir.iterdir())


def test_pg_dump_gets_its_password_from_a_private_passfile_not_its_command_line(
        tmp_path: Path, postgres_server: PostgresServer) -> None:
    """What pg_dump is started with: a connection string without the password (``ps`` shows a command
    line to every user) and a PGPASSFILE of mode 0600 that holds it."""
    url = postgres_server.url("ts_owner")
    private = tmp_path / "p"
    private.mkdir(mode=0o700)
    conninfo, env = libpq_env(url, private, "host-a")
    password = postgres_server.passwords["ts_owner"]
    assert password not in conninfo and "password" not in conninfo
    assert "PGPASSWORD" not in env and env["PGAPPNAME"].endswith(" on host-a"), env.get("PGAPPNAME")
    passfile = Path(env["PGPASSFILE"])
    assert stat.S_IMODE(passfile.stat().st_mode) == 0o600 and password in passfile.read_text()
    listed = subprocess.run([pg_program("psql"), "-X", "-tA", "-w", "-d", conninfo, "-c", "SELECT current_user"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert listed.stdout.strip() == "ts_owner", listed.stderr

    # A URL without a password leaves libpq's own sources as they are: the user's PGPASSFILE, which
    # every connection of the stack uses (pg_dump alone was stripped of it: "no password supplied").
    from sqlalchemy.engine import make_url

    users = tmp_path / "users-pgpass"
    users.write_text(f"*:*:*:ts_owner:{password}\n")
    users.chmod(0o600)
    bare = make_url(url)._replace(password=None).render_as_string(hide_password=False)
    saved = os.environ.get("PGPASSFILE")
    os.environ["PGPASSFILE"] = str(users)
    try:
        conninfo, env = libpq_env(bare, private, "host-a")
    finally:
        if saved is None:
            del os.environ["PGPASSFILE"]
        else:
            os.environ["PGPASSFILE"] = saved
    assert env["PGPASSFILE"] == str(users)
    listed = subprocess.run([pg_program("psql"), "-X", "-tA", "-w", "-d", conninfo, "-c", "SELECT current_user"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert listed.stdout.strip() == "ts_owner", listed.stderr


# --------------------------------------------------------------------------- amcheck


def test_doctor_names_the_tables_the_readers_role_may_not_read(pg: Stack, postgres_server: PostgresServer) -> None:
    """A GRANT missed in the README's role setup (``REVOKE SELECT ON trades``): the monitor crashed with
    tracebacks and the API answered 500, while doctor said "No problem found" (fault hunt on
    PostgreSQL mode). Doctor now names the tables and the GRANT."""
    from sqlalchemy.engine import make_url

    pg.start_writer()
    database = make_url(pg.env["DATABASE_URL"]).database
    reader = make_url(pg.env["DATABASE_READ_URL"]).username
    postgres_server.psql(database, "postgres", f"REVOKE SELECT ON trades, trade_events FROM {reader}")
    doctor = run(pg, "-m", "db", "doctor")
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "[FAIL] DATABASE_READ_URL's role may not read 2 of the stack's tables (trade_events, trades)" in \
        doctor.stdout, doctor.stdout
    assert "GRANT SELECT ON ALL TABLES IN SCHEMA public TO that role" in doctor.stdout, doctor.stdout


def test_a_read_the_readers_role_may_not_make_is_said_in_one_line_where_it_fails(
        pg: Stack, postgres_server: PostgresServer) -> None:
    """The same missed GRANT, where it bites: the monitor died with a traceback (again and again under
    circus), ``GET /api/trades`` answered 500 "internal error" with a traceback in the log, and the
    console's market page said "Is the writer running?" (fault hunt on PostgreSQL mode, left in round 36).
    Each now says in one line that the readers' role may not read the table and what to grant."""
    from sqlalchemy.engine import make_url

    from webapp import create_app

    pg.start_writer()
    database = make_url(pg.env["DATABASE_URL"]).database
    reader = make_url(pg.env["DATABASE_READ_URL"]).username
    postgres_server.psql(database, "postgres", f"REVOKE SELECT ON trades, trade_events FROM {reader}")
    grant = "GRANT SELECT ON ALL TABLES IN SCHEMA public TO that role"

    monitor = run(pg, "-m", "workers.monitor", "--until-idle")
    assert monitor.returncode == 1, monitor.stdout + monitor.stderr
    assert "Traceback" not in monitor.stderr, monitor.stderr[-3000:]
    refused = [line for line in monitor.stderr.splitlines() if " ERROR " in line]
    assert len(refused) == 1 and "DATABASE_READ_URL's role may not read" in refused[0], monitor.stderr
    assert "permission denied for table trade" in refused[0] and grant in refused[0], refused

    api = create_app("api", load_settings(pg.env)).test_client()
    response = api.get("/api/trades")
    assert response.status_code == 503, (response.status_code, response.json)
    assert response.json["error"]["code"] == "read_refused", response.json
    message = response.json["error"]["message"]
    assert "permission denied for table trades" in message and grant in message, message

    console = ConsoleClient.logged_in(create_app("console", load_settings(pg.env)))
    page = console.get("/console/market")
    assert page.status_code == 503, page.status_code
    assert "permission denied for table trades" in page.text and "GRANT SELECT ON ALL TABLES" in page.text
    assert "Is the writer running" not in page.text
    no_password(monitor.stdout + monitor.stderr + json.dumps(response.json) + page.text, postgres_server)


def test_an_integrity_check_that_cannot_be_made_is_not_called_corruption(pg: Stack) -> None:
    """``DATABASE_URL`` with a wrong password (the readers' right): doctor said "amcheck found problems:
    connection failed: ... password authentication failed ... Restore the latest backup", advice that
    can cost a user their data; a session ended under the check made every index after it "a
    problem" likewise (fault hunt on PostgreSQL mode). A check not made is said as not made."""
    from sqlalchemy.engine import make_url

    pg.start_writer()
    wrong = make_url(pg.env["DATABASE_URL"]).set(password="not-the-password").render_as_string(hide_password=False)
    doctor = subprocess.run([sys.executable, "-m", "db", "doctor"], env={**pg.env, "DATABASE_URL": wrong}, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "[FAIL] amcheck could not be made (it logs in as DATABASE_URL's role): " in doctor.stdout, doctor.stdout
    assert "password authentication failed" in doctor.stdout, doctor.stdout
    assert "found problems" not in doctor.stdout and "Restore the latest backup" not in doctor.stdout, doctor.stdout
    assert "not-the-password" not in doctor.stdout + doctor.stderr


def test_quick_check_runs_amcheck_and_is_skipped_not_failed_without_it(pg: Stack,
                                                                      postgres_server: PostgresServer) -> None:
    """No amcheck in the database (and no right to create it): the run is ok, "skipped: amcheck not
    installed". Installed but not granted: skipped, saying so. Granted: every B-tree index checked."""
    pg.start_writer()
    insert_ticks(pg, 200)
    database = str(psycopg_params_of(pg.env["DATABASE_URL"])["conninfo"]).split("dbname=")[1].split()[0]
    postgres_server.psql(database, "postgres", "DROP EXTENSION amcheck")  # the suite's databases have it
    details = []
    for setup in (None, "CREATE EXTENSION amcheck",
                  "GRANT EXECUTE ON FUNCTION bt_index_check(regclass, boolean) TO ts_owner"):
        if setup:
            postgres_server.psql(database, "postgres", setup)
        done = run(pg, "-m", "workers.jobs", "--run", "quick_check")
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        details.append(rows(pg, "SELECT ok, detail FROM job_runs WHERE job = 'quick_check' ORDER BY id DESC")[0])
    assert details[0][0] and details[0][1].startswith("skipped: amcheck not installed ("), details[0]
    assert details[1][0] and details[1][1].startswith("skipped: amcheck installed but not allowed"), details[1]
    checked = json.loads(details[2][1])
    assert details[2][0] and checked["ok"] and checked["indexes"] >= 5 and not checked["messages"], checked
    no_password(json.dumps(details), postgres_server)


def test_api_health_says_commits_fail_without_the_servers_words_which_name_the_database(
        pg: Stack, postgres_server: PostgresServer) -> None:
    """The writer's write session ended and the database closed to new sessions: every batch fails
    with libpq's words, which name the database (and, for a refused login, the role). /api/health
    serves the writer's stats without a login: it said them as they were (an adversarial review,
    round 40). It says the writer's commits fail, and where to read why."""
    from sqlalchemy.engine import make_url

    from testkit.writer import RawPeer
    from tests.test_writer_faults import request
    from webapp import create_app

    writer = pg.start_writer()
    database = make_url(pg.env["DATABASE_URL"]).database
    peer = RawPeer(pg.settings.writer_endpoint)
    try:
        assert peer.ask(request("audit", {"actor": "me", "action": "before"}, seq=1))["ok"] is True
        postgres_server.psql("postgres", "postgres", f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        postgres_server.psql("postgres", "postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                             f"application_name = 'tickstack writer pid {writer.pid} on {HOST}'")
        for seq in (2, 3, 4):
            reply = peer.ask(request("audit", {"actor": "me", "action": "refused"}, seq=seq), timeout=60)
            assert reply["ok"] is False, reply
        health = wait_for("the failing commits to last", lambda: (
            lambda r: r if "writes_refused" in r.json["writer"] else None)(
            create_app("api", load_settings(pg.env)).test_client().get("/api/health")), timeout=30)
        assert health.json["status"] == "unavailable", health.json  # closed to the API's reads too
        served = json.dumps(health.json)
        assert database not in served and "ts_owner" not in served, served
        assert "the writer's log says why" in served, served
    finally:
        postgres_server.psql("postgres", "postgres", f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        peer.close()


def jobs_backup_of(stack: Stack, ticks: int) -> Path:
    """The jobs worker's backup (its only one) of ``stack``'s database with ``ticks`` ticks, the writer
    stopped after."""
    writer = stack.start_writer()
    insert_ticks(stack, ticks)
    done = run(stack, "-m", "workers.jobs", "--run", "backup")
    assert done.returncode == 0, done.stderr[-3000:]
    assert stack.stop(writer) == 0
    (dump,) = (stack.home / "backups").iterdir()
    return dump


def ten_more_ticks_follow(stack: Stack, stored: int) -> None:
    """A writer started on ``stack``'s restored database (``stored`` ticks, ids 1 to ``stored``) stores
    ten more, their ids next."""
    writer = stack.start_writer()
    insert_ticks(stack, 10, first=stored)
    assert rows(stack, "SELECT count(*), max(id) FROM ticks") == [(stored + 10, stored + 10)]
    assert stack.stop(writer) == 0


def test_db_restore_puts_a_dump_into_a_new_empty_database(pg: Stack, home_databases: HomeDatabases) -> None:
    """Disaster recovery on a new server: the dump restored into a database made empty for it, before
    any writer ran there (no table, no sequence). Its ids continue from the dump's."""
    dump = jobs_backup_of(pg, 300)
    home = new_home()
    env = {k: v for k, v in isolated_env(home).items() if not k.startswith("DATABASE_")}
    fresh = Stack(home, {**env, **home_databases(home)})
    try:
        assert rows(fresh, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
        done = run(fresh, "-m", "db", "restore", str(dump))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "the database had none of its tables (a new one), so nothing was replaced and no copy was kept" \
            in done.stdout and "kept as" not in done.stdout, done.stdout
        assert not list(home.glob("tickstack.replaced-*")), list(home.iterdir())
        assert rows(fresh, "SELECT count(*), max(id) FROM ticks") == [(300, 300)]
        ten_more_ticks_follow(fresh, 300)
    finally:
        fresh.close()


def test_db_restore_puts_back_a_dump_from_before_a_schema_upgrade(pg: Stack) -> None:
    """A dump taken at schema v2 (``indicators`` a table; v3 made it a view of ``bar_indicators``),
    restored after the upgrade, as one goes back from an upgrade gone wrong: pg_restore's script
    stopped at ``ALTER TABLE ... indicators DROP CONSTRAINT`` (a view has none), so no dump from before
    v3 could be restored; and a table of a later version the dump has not (``bar_indicators``) would
    be left with the replaced database's rows, which made the writer's v3 migration skip its step.
    The restore takes the dump's schema as it was; the writer migrates it, the dump's rows with it."""
    from sqlalchemy import insert

    from db.engine import make_write_engine
    from db.models import now_ms, schema_version_table
    from db.schema import MIGRATIONS, SCHEMA_VERSION

    engine = make_write_engine(pg.settings)
    try:
        with engine.begin() as conn:  # the database as tickstack's schema v2 left it, with rows
            for version, _what, step in MIGRATIONS[:2]:
                step(conn)
                conn.execute(insert(schema_version_table).values(version=version, applied_at=now_ms()))
            conn.exec_driver_sql("INSERT INTO indicators (symbol, timeframe, name, ts, value) "
                                 f"VALUES ('BTCUSD', '1m', 'sma_20', {NOW_TS}, 42.0)")
            conn.exec_driver_sql("INSERT INTO ticks (symbol, ts, bid, ask, volume, source, seq) SELECT 'BTCUSD', "
                                 f"{NOW_TS} + g, 100, 100.5, 1, 'v2', g FROM generate_series(1, 100) g")
    finally:
        engine.dispose()
    dump = pg.home / "v2.dump"
    done = run(pg, "-m", "db", "backup", str(dump))
    assert done.returncode == 0, done.stdout + done.stderr
    writer = pg.start_writer()  # the upgrade: v2 to now
    insert_ticks(pg, 50)  # after the dump
    assert pg.stop(writer) == 0
    assert rows(pg, "SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]
    engine = make_write_engine(pg.settings)
    try:  # a value the upgraded database computed after the dump
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO bar_indicators (symbol, timeframe, ts, sma_20) VALUES ('BTCUSD', '1m', "
                                 f"{NOW_TS + 60_000}, 43.0)")
    finally:
        engine.dispose()

    done = run(pg, "-m", "db", "restore", str(dump))
    assert done.returncode == 0, done.stdout + done.stderr
    assert rows(pg, "SELECT max(version) FROM schema_version") == [(2,)]
    writer = pg.start_writer()  # migrates the restored v2 database
    assert rows(pg, "SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]
    assert rows(pg, "SELECT symbol, timeframe, name, ts, value FROM indicators") == [
        ("BTCUSD", "1m", "sma_20", NOW_TS, 42.0)]
    assert rows(pg, "SELECT count(*), max(id) FROM ticks") == [(100, 100)]
    insert_ticks(pg, 1, first=1000)
    assert rows(pg, "SELECT max(id) FROM ticks") == [(151,)]  # after the replaced database's 150
    assert pg.stop(writer) == 0


def test_db_restore_into_a_new_server_whose_owner_role_has_another_name(pg: Stack,
                                                                        postgres_server: PostgresServer) -> None:
    """Disaster recovery on a new server where the database's owner role is not named as on the old
    one (a managed server's, or a site's naming): pg_restore's script set every table's owner back to
    the dump's (``ALTER TABLE ... OWNER TO ts_owner``), which a role that is not a member of it may not
    do ("must be member of role"), and the default privileges for that role likewise: no dump could be
    restored there. DATABASE_URL's role now owns what it restores, as the writer's migrations need;
    the grants to the readers' role come with the dump."""
    dump = jobs_backup_of(pg, 100)
    role, database = f"app_owner_{os.getpid()}", f"app_{os.getpid()}"
    password = secrets.token_urlsafe(18)
    postgres_server.psql("postgres", "postgres", f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    postgres_server.psql("postgres", "postgres", f"CREATE DATABASE {database} OWNER {role}")
    home = new_home()
    url = postgres_server.url("ts_owner", database=database).replace(
        f"ts_owner:{quote(postgres_server.passwords['ts_owner'], safe='')}@", f"{role}:{password}@")
    env = {k: v for k, v in isolated_env(home).items() if not k.startswith("DATABASE_")}
    fresh = Stack(home, {**env, "DATABASE_URL": url,
                         "DATABASE_READ_URL": postgres_server.url("ts_reader", database=database)})
    try:
        done = run(fresh, "-m", "db", "restore", str(dump))
        assert done.returncode == 0, done.stdout + done.stderr
        assert password not in done.stdout + done.stderr
        assert postgres_server.psql(database, "postgres", "SELECT DISTINCT tableowner FROM pg_tables WHERE "
                                                          "schemaname = 'public'").split() == [role]
        assert postgres_server.psql(database, "ts_reader", "SELECT count(*), max(id) FROM ticks").strip() == "100|100"
        ten_more_ticks_follow(fresh, 100)
    finally:
        fresh.close()
        postgres_server.drop_database(database)
        postgres_server.psql("postgres", "postgres", f"DROP ROLE {role}")
