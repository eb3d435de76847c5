"""A session outside the stack holding a lock the stack needs (a ``psql`` left in a transaction after
``LOCK TABLE ticks IN ACCESS EXCLUSIVE MODE``), on PostgreSQL: the writer serves the other tables
meanwhile, and ``db doctor`` answers, naming the session, instead of waiting as long as it lives."""
from __future__ import annotations

import psycopg
import pytest

from db.client import WriterClient
from testkit.postgres import PostgresServer
from testkit.writer import Stack
from tests.test_analysis import T0
from tests.test_postgres_faults import _database, holder, writer_session  # noqa: F401 (a fixture)

pytestmark = pytest.mark.postgres_only


def test_a_locked_table_costs_a_batch_one_lock_wait_not_one_per_request(
        stack: Stack, holder: psycopg.Connection, postgres_server: PostgresServer) -> None:  # noqa: F811
    """``ticks`` is locked by a session of the test while 200 insert_ticks requests are queued. Each
    batch's fast run waits ``TICKSTACK_LOCK_TIMEOUT_MS`` once and fails; its careful run must not wait
    that long again for every other request of the batch on the same locked table: before, it did
    (200 requests: over three minutes of a writer answering nobody; a DBA's minute-long ``LOCK
    TABLE`` left the feed spooling and every other client, on other tables, timing out). An audit
    sent behind them is acknowledged while the table is still locked, within a deadline far under
    what one wait per request would take; the ticks are applied once each when the lock is gone."""
    from testkit.helpers import wait_for

    writer = stack.start_writer(TICKSTACK_LOCK_TIMEOUT_MS="1000")
    holder.execute("LOCK TABLE ticks IN ACCESS EXCLUSIVE MODE")
    feed = WriterClient(settings=stack.settings, deadline=600)
    tickets = [feed.submit("insert_ticks", ticks=[{"symbol": "BTCUSD", "ts": T0 + i, "bid": 1.0, "ask": 1.5,
                                                   "source": "locked", "seq": i}]) for i in range(200)]
    try:
        wait_for("the writer to wait on the locked table", lambda: writer_session(postgres_server, writer.pid, True),
                 timeout=30)
        with WriterClient(settings=stack.settings, deadline=60) as client:
            # Queued behind the ticks; one lock wait per request would take 200 s.
            assert client.call("audit", actor="test", action="while-ticks-locked")["id"] >= 1
        assert writer_session(postgres_server, writer.pid, False)  # still serving, the table still locked
    finally:
        holder.rollback()
    for ticket in tickets:
        feed.wait(ticket)
        assert ticket.error is None and ticket.result() == {"inserted": 1, "duplicates": 0}, (ticket.error,
                                                                                          ticket.result())
    feed.close()
    database = _database(stack)
    stored = postgres_server.psql(database, "postgres", "SELECT count(*), count(DISTINCT seq) FROM ticks "
                                                        "WHERE source = 'locked'")
    assert stored.split() == ["200|200"], stored
    assert writer.poll() is None, stack.writer_log()[-2000:]


def test_doctor_names_a_session_that_holds_a_table_locked_instead_of_waiting_for_it(
        stack: Stack, postgres_server: PostgresServer) -> None:
    """A ``psql`` holds ``ticks`` locked (ACCESS EXCLUSIVE) and stays in its transaction. ``db doctor``
    must answer while it does, saying which session holds the table and what to do: before, its
    amcheck waited on the lock with a statement timeout of ten minutes per index, so doctor said
    nothing for as long as the operator needed it."""
    import subprocess
    import sys

    from sqlalchemy.engine import make_url

    from testkit.env import ROOT

    writer = stack.start_writer()
    url = make_url(stack.env["DATABASE_URL"])
    with psycopg.connect(host=url.query["host"], dbname=url.database, user=url.username, password=url.password,
                         application_name="psql") as session:
        session.execute("LOCK TABLE ticks IN ACCESS EXCLUSIVE MODE")
        pid = session.info.backend_pid
        try:
            done = subprocess.run([sys.executable, "-m", "db", "doctor"], env=stack.env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
        finally:
            session.rollback()
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert f"server pid {pid} (psql, role {url.username}, idle in transaction)" in out, out
    assert "pg_terminate_backend" in out, out
    assert "corrupt" not in out.lower() and url.password not in out, out
    assert writer.poll() is None


def test_a_backup_behind_a_locked_table_gives_up_saying_so_instead_of_waiting_for_it(
        stack: Stack, holder: psycopg.Connection) -> None:  # noqa: F811
    """A session holds ``ticks`` locked (ACCESS EXCLUSIVE) and stays in its transaction: ``db backup``
    (pg_dump, the jobs worker's daily backup and the console's button too) waited on the lock for as
    long as that session lived, the jobs worker's other jobs behind it (up to the dump's hour). It
    now gives up after :data:`db.server.MAINTENANCE_LOCK_WAIT_S`, saying a table was locked and by
    whom, and leaves no file; once the lock is gone, the backup is made."""
    import subprocess
    import sys

    from testkit.env import ROOT

    stack.start_writer()  # the schema made
    holder.execute("LOCK TABLE ticks IN ACCESS EXCLUSIVE MODE")
    dest = stack.home / "kept.dump"
    backup = [sys.executable, "-m", "db", "backup", str(dest)]
    try:
        done = subprocess.run(backup, env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("db backup waited for a lock another session held, and was still waiting after 120 s")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "LOCK TABLE public.ticks IN ACCESS SHARE MODE" in done.stderr, done.stderr  # pg_dump's words
    assert f"a table is locked (ACCESS EXCLUSIVE) by another session: server pid {holder.info.backend_pid} " \
           f"((unnamed), role {holder.info.user}, idle in transaction), and pg_dump waited 10 s for it. End that " \
           "session's transaction" in done.stderr, done.stderr
    assert not dest.exists() and not [p for p in stack.home.iterdir() if p.name.endswith(".part")]
    # The jobs worker's scheduled backup: a failed run, tried again soon, not a period (a day) later.
    import time

    from testkit.helpers import query
    from workers.jobs import BACKUP_LOCKED_RETRY_S, JobsWorker

    worker = JobsWorker(stack.settings, only="backup")
    worker.setup()
    try:
        assert worker.run_job("backup") is False
        again_in = worker.last_run["backup"] + worker.schedule.every_s("backup") - time.time()
        assert 0 < again_in <= BACKUP_LOCKED_RETRY_S < worker.schedule.every_s("backup"), again_in
    finally:
        worker.teardown()
    (run,) = query(stack.settings, "SELECT ok, detail FROM job_runs WHERE job = 'backup'")
    assert run[0] is False and f"server pid {holder.info.backend_pid}" in run[1] \
        and run[1].endswith(f"; tried again in {BACKUP_LOCKED_RETRY_S} s"), run
    holder.rollback()
    done = subprocess.run(backup, env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and dest.exists(), done.stderr


def test_a_web_read_of_a_locked_table_is_answered_503_saying_so_not_held_until_the_lock_goes(
        stack: Stack, holder: psycopg.Connection) -> None:  # noqa: F811
    """With ``ticks`` locked by a session left in its transaction, ``GET /api/ticks`` and the console's
    market page waited on the lock for as long as that session lived (90 s and more in the hunt; 30
    such reads took every thread of the API, ``/api/health`` included). A web read now waits
    ``TICKSTACK_LOCK_TIMEOUT_MS`` at most, then is answered 503 with Retry-After, saying a table is
    locked and where to find by whom: retryable, as the writer's answer to a write of that table."""
    import threading

    from testkit.helpers import ConsoleClient
    from webapp import create_app

    stack.start_writer(TICKSTACK_LOCK_TIMEOUT_MS="1000")
    settings = stack.settings
    api = create_app("api", settings).test_client()
    console = ConsoleClient.logged_in(create_app("console", settings))
    holder.execute("LOCK TABLE ticks IN ACCESS EXCLUSIVE MODE")
    answers: dict[str, object] = {}
    reads = {"api": lambda: api.get("/api/ticks?symbol=BTCUSD&limit=5"),
             "console": lambda: console.get("/console/market")}
    threads = [threading.Thread(target=lambda n=name, read=read: answers.__setitem__(n, read()), daemon=True)
               for name, read in reads.items()]
    for thread in threads:
        thread.start()
    for thread in threads:  # the bound is the promise: a read is not held for as long as the lock is
        thread.join(timeout=60)
    holder.rollback()
    assert set(answers) == {"api", "console"}, f"held on the lock: {set(reads) - set(answers)}"
    said = answers["api"]
    assert said.status_code == 503 and said.headers.get("Retry-After"), (said.status_code, said.get_data(True))
    body = said.get_json()["error"]
    assert body["code"] == "database_locked" and "locked by another session" in body["message"], body
    assert "python -m db doctor" in body["message"], body
    page = answers["console"]
    assert page.status_code == 503 and "locked by another session" in page.get_data(True), page.get_data(True)
    assert api.get("/api/ticks?symbol=BTCUSD&limit=5").status_code == 200  # the lock gone, reads as before


def test_a_backup_behind_a_locked_table_says_so_whatever_language_pg_dump_speaks(
        stack: Stack, holder: psycopg.Connection) -> None:  # noqa: F811
    """An operator whose environment asks for another language (``LANGUAGE=de``; Debian's pg_dump
    carries its translations) got pg_dump's German words only ("Anfrage war: LOCK TABLE ..."): the
    backup's failure was matched on pg_dump's English "Query was:", so it did not say a table was
    locked, nor by whom."""
    import subprocess
    import sys

    from testkit.env import ROOT

    stack.start_writer()  # the schema made
    holder.execute("SET application_name = 'psql'")
    holder.execute("LOCK TABLE ticks IN ACCESS EXCLUSIVE MODE")
    pid = holder.info.backend_pid
    dest = stack.home / "kept.dump"
    done = subprocess.run([sys.executable, "-m", "db", "backup", str(dest)], env={**stack.env, "LANGUAGE": "de"},
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"locked (ACCESS EXCLUSIVE) by another session: server pid {pid} (psql, role {holder.info.user}, " \
           "idle in transaction)" \
        in done.stderr, done.stderr
    assert not dest.exists()


def test_a_backup_that_may_not_read_a_table_is_not_said_to_wait_for_a_lock(
        stack: Stack, postgres_server: PostgresServer) -> None:
    """A table in the stack's database that DATABASE_URL's role may not read (a DBA's own): pg_dump
    fails at once at its ``LOCK TABLE``, "permission denied". That was said as "another session held a
    table of the stack locked for over 10 s", sending the operator to look for a session that is not
    there; only a lock that is held is said to be."""
    import subprocess
    import sys

    from testkit.env import ROOT

    stack.start_writer()  # the schema made
    postgres_server.psql(_database(stack), "postgres", "CREATE TABLE dba_notes (note text)")
    dest = stack.home / "kept.dump"
    done = subprocess.run([sys.executable, "-m", "db", "backup", str(dest)], env=stack.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "permission denied for table dba_notes" in done.stderr, done.stderr
    assert "locked" not in done.stderr.replace("LOCK TABLE", ""), done.stderr
    assert not dest.exists()


def test_a_backup_behind_a_table_a_superuser_locked_names_the_session_without_a_state_it_may_not_see(
        stack: Stack, postgres_server: PostgresServer) -> None:
    """The usual holder of a table's lock is a DBA's psql as a superuser, another role than the stack's:
    PostgreSQL hides another role's session state (NULL in pg_stat_activity) from a role without
    pg_read_all_stats, and the words named the session "(psql, None)"; now its role, as the restore's do."""
    import subprocess
    import sys

    from testkit.env import ROOT

    stack.start_writer()  # the schema made
    with psycopg.connect(host=str(postgres_server.socket_dir), port=postgres_server.port, dbname=_database(stack),
                         user="postgres", password=postgres_server.passwords["postgres"],
                         application_name="psql") as dba:
        dba.execute("LOCK TABLE ticks IN ACCESS EXCLUSIVE MODE")
        pid = dba.info.backend_pid
        try:
            done = subprocess.run([sys.executable, "-m", "db", "backup", str(stack.home / "kept.dump")],
                                  env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        finally:
            dba.rollback()
    assert done.returncode == 1, done.stderr
    assert f"by another session: server pid {pid} (psql, role postgres), and pg_dump waited" in done.stderr, \
        done.stderr
    assert "None" not in done.stderr, done.stderr
