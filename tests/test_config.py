"""The settings registry: every variable declared once, one parser, the README's table made from it,
and a bad value stopping each process at start with a message naming the variable."""
from __future__ import annotations

import math
import os
import re
import shlex
import stat
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from db.client import WriterClient
from db.config import SETTINGS, ConfigError, JobSchedule, Settings, ensure_home, load_settings, markdown_table
from testkit.env import isolated_env, new_home, remove_home
from testkit.writer import Stack

pytestmark = pytest.mark.database_independent(
    "settings and flags are parsed, and refused, before any process opens a database")

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = ("db", "supervision", "workers", "webapp")
NAME_RE = re.compile(r"\b(TICKSTACK_[A-Z0-9_]*[A-Z0-9]|DATABASE_URL|WRITER_ENDPOINT)\b")


def production_files() -> list[Path]:
    files = [p for package in PRODUCTION for p in (ROOT / package).rglob("*.py")]
    return [*files, ROOT / "circus.ini", ROOT / "Makefile"]


def test_registry_fills_every_settings_field_once() -> None:
    attrs = [s.attr for s in SETTINGS]
    envs = [s.env for s in SETTINGS]
    assert len(set(attrs)) == len(attrs) and len(set(envs)) == len(envs)
    assert attrs == [f.name for f in fields(Settings)]
    assert all(s.help and s.shown_default for s in SETTINGS)


def test_every_variable_the_code_names_is_declared() -> None:
    declared = {s.env for s in SETTINGS}
    named = {(m.group(1), path.relative_to(ROOT).as_posix())
             for path in production_files() for m in NAME_RE.finditer(path.read_text())}
    assert named, "the scan found no variable at all: the pattern is wrong"
    assert sorted(n for n in named if n[0] not in declared) == []


def test_only_the_registry_reads_the_environment() -> None:
    readers = re.compile(r"os\.environ\b(?!\.copy)|os\.getenv\(|environ\.get\(")
    found = sorted(p.relative_to(ROOT).as_posix() for p in production_files()
                   if p.suffix == ".py" and readers.search(p.read_text()))
    assert found == ["db/config.py"]


def test_readme_table_is_made_from_the_registry() -> None:
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- settings:begin -->\n", "\n<!-- settings:end -->"
    assert begin in readme and end in readme
    assert readme[readme.index(begin) + len(begin):readme.index(end)] == markdown_table()
    printed = subprocess.run([sys.executable, "-m", "db", "settings"], capture_output=True, text=True, cwd=ROOT,
                             timeout=60)
    assert printed.returncode == 0 and printed.stdout.strip() == markdown_table()


@pytest.mark.database_independent("the settings table it prints into a closed pipe is the same on either database")
def test_db_output_into_a_pipe_its_reader_closed_is_no_error() -> None:
    """``python -m db settings | head -2`` printed "python -m db settings: [Errno 32] Broken pipe" and
    exited 1 (whenever head closed the pipe before the last line was written)."""
    for unbuffered in ("1", None):  # unbuffered (this machine's default), and buffered (the last block at exit)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        env.update({"PYTHONUNBUFFERED": unbuffered} if unbuffered else {})
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first line: every write meets a closed pipe
        try:
            printed = subprocess.run([sys.executable, "-m", "db", "settings"], stdout=write, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT, timeout=60, env=env)
        finally:
            os.close(write)
        assert printed.stderr == "" and printed.returncode == 1, (unbuffered, printed.stderr)
    # Started with stdout closed (`>&-`: Python's sys.stdout is None), it prints nothing and says nothing.
    closed = subprocess.run(f"{shlex.quote(sys.executable)} -m db settings >&-", shell=True, cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, timeout=60)
    assert closed.stderr == "" and closed.returncode == 0, closed.stderr


def test_defaults_and_blank_values() -> None:
    s = load_settings({"TICKSTACK_HOME": "/tmp/ts-config-test", "TICKSTACK_API_PORT": " "})
    assert s.database_url == "sqlite:////tmp/ts-config-test/tickstack.db"
    assert s.writer_endpoint == "ipc:///tmp/ts-config-test/run/writer.sock"
    assert (s.api_port, s.console_port, s.ready_timeout, s.admin_user, s.api_token) == (8000, 8001, 30.0, "admin", "")
    assert s.jobs == JobSchedule() == JobSchedule.from_env({})
    assert "secret-token-value" not in repr(load_settings({"TICKSTACK_API_TOKEN": "secret-token-value"}))


def test_an_unset_home_is_the_checkouts_var_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README says the home is ``var/`` of the checkout when ``TICKSTACK_HOME`` is unset; it was
    ``./var`` of the folder a command ran in: ``python -m db health`` from /tmp looked at /tmp/var, and
    ``doctor`` run from ``db/`` found no stack beside the running one (a new user's first hour)."""
    monkeypatch.chdir(tmp_path)
    assert load_settings({}).home == ROOT / "var"
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("name, value, message", [
    ("TICKSTACK_READY_TIMEOUT", "soon", "is not a number"),
    ("TICKSTACK_READY_TIMEOUT", "0", "from 0.1 to 3600"),
    ("TICKSTACK_API_PORT", "70000", "from 1 to 65535"),
    ("TICKSTACK_CONSOLE_PORT", "http", "is not a whole number"),
    ("TICKSTACK_SYNCHRONOUS", "OFF", "must be NORMAL or FULL"),
    ("TICKSTACK_WRITER_MAX_BATCH", "0", "from 1 to 1000000"),
    ("TICKSTACK_CLIENT_DEADLINE", "inf", "from 0.1 to 86400"),
    ("TICKSTACK_ADMIN_USER", "no spaces", "is not a user name"),
    ("DATABASE_URL", "tickstack.db", "not a database URL"),
    # Another database is refused by name, and the URL, which may hold a password, is not repeated.
    ("DATABASE_URL", "mysql://me:hunter2@localhost/y", r"the database 'mysql' is not supported; use sqlite:"),
    ("DATABASE_READ_URL", "oracle+cx://me:hunter2@h/y", r"the database 'oracle' is not supported"),
    ("WRITER_ENDPOINT", "tcp://0.0.0.0:5555", "loopback"),
    # A review's finds: each was taken, then failed later (a traceback, a wait for ever) or did harm.
    ("WRITER_ENDPOINT", "tcp://127.attacker.example:5555", "loopback"),  # passed a prefix test
    ("WRITER_ENDPOINT", "tcp://127.0.0.1", "a port from 1 to 65535"),
    ("WRITER_ENDPOINT", "tcp://[::1]:5555", "loopback"),  # no socket of ours sets ZeroMQ's IPV6: cannot bind
    ("WRITER_ENDPOINT", "tcp://127.\u0661.0.1:5555", "loopback"),
    ("WRITER_ENDPOINT", "tcp://127.0.0.1:abc", "a port from 1 to 65535"),
    ("WRITER_ENDPOINT", "tcp://127.0.0.1:99999", "a port from 1 to 65535"),
    ("WRITER_ENDPOINT", "tcp://127.0.0.1:*", "a port from 1 to 65535"),
    ("WRITER_ENDPOINT", "tcp://localhost:0", "a port from 1 to 65535"),
    ("WRITER_ENDPOINT", "inproc://writer", "other processes cannot reach"),
    ("WRITER_ENDPOINT", "ipc://", "a socket path"),
    ("DATABASE_URL", "sqlite:///:memory:", "in memory"),  # every acknowledged write lost with the writer
    ("DATABASE_URL", "sqlite://", "in memory"),
    ("DATABASE_URL", "sqlite:////tmp/x.db?mode=memory&uri=true", "in memory"),
    ("DATABASE_URL", "sqlite:///relative/x.db", "absolute path"),
    ("DATABASE_URL", "sqlite+pysqlite:////tmp/x.db", "no driver"),
    # An '@' of the password, not percent-encoded: the rest of it was read as the host, and served.
    ("DATABASE_URL", "postgresql://bob:hunter2@3xyz@127.0.0.1:1/db", "percent-encode"),
    # ... with a '/' in it too: the host was "ss" and the database "w@127.0.0.1:1/db", so the '@' check
    # passed it, and `db health` showed "...:***@ss/w%40127..." (fault hunt on PostgreSQL mode).
    ("DATABASE_URL", "postgresql+psycopg://bob:Own3r:p@ss/w@127.0.0.1:1/db", "percent-encode"),
    # ... and one where a ':' after the first '@' reads as a port: it said the port was no whole number
    # (a new user's run of the README, round 41).
    ("DATABASE_URL", "postgresql+psycopg://ts_owner:p@ss:w/rd@127.0.0.1:55433/tickstack", "percent-encode"),
    # Taken, then a traceback in every process that opened it (jobs, the API), or a writer saying the
    # server does not answer: a port that is no number, a driver that is not there, no file's name,
    # SQLite parameters the stack does not take (timeout=abc crashed the writer; mode=ro was ignored).
    ("DATABASE_URL", "postgresql+psycopg://u:hunter2@127.0.0.1:abc/db", "the port after the host is not a whole"),
    ("DATABASE_READ_URL", "postgresql+psycopg://u:hunter2@127.0.0.1:99999/db", "the port 99999 is not from 1 to"),
    ("DATABASE_URL", "postgresql+nodriver://u:hunter2@127.0.0.1:5/db", "driver 'postgresql.nodriver' is not the one"),
    ("DATABASE_URL", "postgresql+pg8000://u:hunter2@127.0.0.1:5/db", "driver 'postgresql.pg8000' is not the one"),
    # libpq's options: one it does not know, or a value outside its set, was said as a server that does not
    # answer, and the writer waited its whole server wait for a typo (the PostgreSQL hunt, round 45).
    ("DATABASE_URL", "postgresql+psycopg://u:hunter2@127.0.0.1:5/db?sslmode=requir",
     "sslmode='requir' is not one of disable, allow, prefer, require, verify-ca, verify-full"),
    ("DATABASE_READ_URL", "postgresql+psycopg://u:hunter2@127.0.0.1:5/db?sslmod=require",
     "'sslmod' is not a connection option libpq knows"),
    ("DATABASE_URL", "postgresql+psycopg://u:hunter2@127.0.0.1:5/db?connect_timeout=abc",
     "connect_timeout='abc' is not a whole number"),
    ("DATABASE_URL", "sqlite:////", "the SQLite file's path"),
    ("DATABASE_URL", "sqlite:////tmp/x/", "the SQLite file's path"),
    ("DATABASE_URL", "sqlite:////tmp/x.db?timeout=abc", "takes no parameters"),
    ("DATABASE_URL", "sqlite:////tmp/x.db?mode=ro", "takes no parameters"),
    ("TICKSTACK_HOME", "~nosuchuser-tickstack/x", "no such user"),
    ("TICKSTACK_API_PORT", "1_000", "is not a whole number"),
    ("TICKSTACK_API_PORT", "\u0661\u0662", "is not a whole number"),
    ("TICKSTACK_READY_TIMEOUT", "1_0", "is not a number"),
])
def test_a_bad_value_names_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}.*{message}") as refused:
        load_settings({name: value})
    assert "hunter2" not in str(refused.value)


def test_the_api_and_the_console_cannot_share_a_port() -> None:
    """Both ports passed every check (make run printed its banner with both at the same address),
    then circus could not bind the second and circusd exited 0 with the reason in its log only."""
    with pytest.raises(ConfigError, match="TICKSTACK_API_PORT and TICKSTACK_CONSOLE_PORT are both 18420"):
        load_settings({"TICKSTACK_API_PORT": "18420", "TICKSTACK_CONSOLE_PORT": "18420"})
    assert load_settings({"TICKSTACK_API_PORT": "18420", "TICKSTACK_CONSOLE_PORT": "18421"}).console_port == 18421


def test_an_at_sign_of_a_server_urls_query_or_encoded_password_is_taken() -> None:
    for url in ("postgresql+psycopg://host/db?user=a@corp&password=p@ss",
                "postgresql+psycopg:///db?host=/run/pg&password=x@y@z",
                "postgresql+psycopg://bob:p%40ss@127.0.0.1:5432/db",
                # A password with a raw '/' or '?' (SQLAlchemy reads it whole): refused by the port check
                # of a review's first version, which printed its first part.
                "postgresql+psycopg://tick:hunter2/Xy@127.0.0.1:5432/tick",
                "postgresql+psycopg://u:pa?ss@h:5432/db", "postgresql://u@[::1]:5432/db"):
        assert load_settings({"DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize("module", ["workers.writer", "workers.ticks", "workers.analysis", "workers.monitor",
                                    "workers.jobs"])
def test_every_process_refuses_a_bad_setting_at_start(module: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKSTACK_") and k not in
           ("DATABASE_URL", "WRITER_ENDPOINT")}
    env.update(TICKSTACK_HOME=str(tmp_path), TICKSTACK_READY_TIMEOUT="soon")
    proc = subprocess.run([sys.executable, "-m", module, "--until-idle"] if module != "workers.writer"
                          else [sys.executable, "-m", module], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "TICKSTACK_READY_TIMEOUT='soon' is not a number" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.sqlite_only("tests/test_postgres_messages.py::"
                         "test_a_wrong_owner_password_is_said_as_a_refused_login_by_prepare_the_writer_doctor_and_health")
def test_a_database_url_naming_a_file_that_is_not_sqlite_is_said_so_not_called_damaged() -> None:
    """DATABASE_URL naming the wrong file (a CSV file of prices here): doctor said "the database file is
    damaged", with a restore to mend it (which moves the file aside), and the writer made the file
    private (0600) and said only SQLite's "file is not a database". Both now say what the file begins
    with and both readings (a wrong URL; a first page destroyed), and the writer changes nothing."""
    home = new_home()
    try:
        prices = home / "prices.csv"
        prices.write_text("ts,bid,ask\n1,2,3\n")
        prices.chmod(0o644)
        env = {**isolated_env(home), "DATABASE_URL": f"sqlite:///{prices}"}
        said = f"{prices} is not an SQLite database: it begins with b'ts,bid,ask\\n1,2,3', where every SQLite " \
               "database begins with the 16 bytes b'SQLite format 3\\x00'. If DATABASE_URL names the wrong file, set it"
        writer = subprocess.run([sys.executable, "-m", "workers.writer"], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert writer.returncode == 1 and said in writer.stderr and "Traceback" not in writer.stderr, writer.stderr
        assert f"unset, it is {home / 'tickstack.db'}" in writer.stderr, writer.stderr
        assert prices.stat().st_mode & 0o777 == 0o644 and prices.read_text() == "ts,bid,ask\n1,2,3\n"
        assert sorted(p.name for p in home.iterdir() if p.name.startswith("prices")) == ["prices.csv"]  # no lock
        doctor = subprocess.run([sys.executable, "-m", "db", "doctor"], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        lines = doctor.stdout.splitlines()
        assert doctor.returncode == 1 and any(said in line and "its first page is damaged" in line
                                              for line in lines), doctor.stdout
        assert "the database file is damaged" not in doctor.stdout, doctor.stdout
        assert any("the database file is not an SQLite database, or its first page is damaged (below)" in line
                   for line in lines), doctor.stdout
        backup = subprocess.run([sys.executable, "-m", "db", "backup", str(home / "kept.db")], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert backup.returncode == 1 and f"failed: {said.split('. If ')[0]}; " in backup.stderr \
            and "does DATABASE_URL name the wrong file?" in backup.stderr, backup.stderr
    finally:
        remove_home(home)


@pytest.mark.sqlite_only("tests/test_postgres_messages.py::"
                         "test_a_wrong_owner_password_is_said_as_a_refused_login_by_prepare_the_writer_doctor_and_health")
def test_a_database_url_naming_a_fifo_is_refused_not_waited_on_for_ever() -> None:
    """DATABASE_URL naming a FIFO (a named pipe, a mistyped path into a tool's folder): the writer and
    ``db init`` refused it with SQLite's "disk I/O error", until the check for a file that is not
    SQLite's read its first bytes with a plain open, which waits for a FIFO's writer: both hung for
    as long as nobody wrote to it (the writer under circus, never started and never saying why)."""
    home = new_home()
    try:
        fifo = home / "prices.fifo"
        os.mkfifo(fifo, 0o600)
        env = {**isolated_env(home), "DATABASE_URL": f"sqlite:///{fifo}"}
        for command in (["workers.writer"], ["db", "init"]):
            try:
                done = subprocess.run([sys.executable, "-m", *command], env=env, cwd=ROOT, capture_output=True,
                                      text=True, timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"python -m {' '.join(command)} waited on the FIFO {fifo} for 60 s")
            assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
            assert str(fifo) in done.stderr or "disk I/O error" in done.stderr, done.stderr
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    finally:
        remove_home(home)


@pytest.mark.parametrize("head", [b"SQLite format 3", b"SQLite format 3X", b"SQLite"])
def test_a_file_cut_short_or_one_byte_off_sqlites_header_is_not_said_to_begin_as_sqlite_does(tmp_path: Path,
                                                                                             head: bytes) -> None:
    """A database cut short within its first 16 bytes, or with its 16th byte changed: the words said
    "it begins with b'SQLite format 3', where every SQLite database begins with 'SQLite format 3'",
    two equal things an operator could only read as a contradiction (the 16th byte, a NUL, left out)."""
    from db.files import not_sqlite_words

    path = tmp_path / "tickstack.db"
    path.write_bytes(head)
    said = not_sqlite_words(path)
    assert said is not None and f"it begins with {head!r}" in said, said
    assert "b'SQLite format 3\\x00'" in said, said
    if len(head) < 16:
        assert f"the whole file: {len(head)} bytes" in said, said


def test_direct_writes_are_refused_on_sqlite_naming_the_variable() -> None:
    """Only the writer may write SQLite: TICKSTACK_DIRECT_WRITES there stops every process at start."""
    with pytest.raises(ConfigError, match="TICKSTACK_DIRECT_WRITES works on PostgreSQL only"):
        load_settings({"TICKSTACK_HOME": "/tmp/ts-config-test", "TICKSTACK_DIRECT_WRITES": "1"})
    with pytest.raises(ConfigError, match="TICKSTACK_DIRECT_WRITES='maybe' must be 1 or 0"):
        load_settings({"TICKSTACK_HOME": "/tmp/ts-config-test", "TICKSTACK_DIRECT_WRITES": "maybe"})
    off = load_settings({"TICKSTACK_HOME": "/tmp/ts-config-test", "TICKSTACK_DIRECT_WRITES": "0"})
    assert off.direct_writes is False


# --- every number has bounds: a value no consumer can take is refused at start, naming its range ----

NUMBER_SETTINGS = [s for s in SETTINGS if (s.parse.__doc__ or "").startswith(("a number", "a whole number"))]
#: Values that overflow what the settings feed (time_t, a C long, an SQLite INTEGER) or are no number.
OUT_OF_ANY_RANGE = ("1e300", "-1e300", "nan", "inf", "-inf", "1" + "0" * 24, "-1" + "0" * 24)


def test_every_numeric_setting_has_a_range_with_its_default_inside() -> None:
    """Each numeric setting states a maximum (a setting without one let 1e300 or a 25-digit number
    through to the writer, which then died of an OverflowError, or failed every batch)."""
    assert len(NUMBER_SETTINGS) >= 24, [s.env for s in NUMBER_SETTINGS]  # the scan found them
    unbounded = [(s.env, s.parse.__doc__) for s in NUMBER_SETTINGS if " to " not in s.parse.__doc__
                 and "at most" not in s.parse.__doc__]
    assert unbounded == []
    for s in NUMBER_SETTINGS:
        assert s.parse(s.env, str(s.default)) == s.default, s.env


@pytest.mark.parametrize("setting", NUMBER_SETTINGS, ids=lambda s: s.env)
def test_a_numeric_setting_out_of_its_range_is_refused_naming_variable_value_and_range(setting: Any) -> None:
    for raw in OUT_OF_ANY_RANGE:
        with pytest.raises(ConfigError) as e:
            load_settings({"TICKSTACK_HOME": "/tmp/ts-config-test", setting.env: raw})
        assert str(e.value).startswith(f"{setting.env}={raw!r} "), str(e.value)
        # The range, as the README's table shows it (e.g. "from 0 to 0.5").
        assert re.sub(r"^a (whole )?number ", "", setting.parse.__doc__) in str(e.value), str(e.value)


@pytest.mark.parametrize("name, value, message", [
    ("TICKSTACK_WRITER_BATCH_WAIT", "1e300", "TICKSTACK_WRITER_BATCH_WAIT='1e300' must be a number from 0 to 0.5"),
    ("TICKSTACK_WRITER_MAX_MESSAGE", "1" + "0" * 24,
     f"TICKSTACK_WRITER_MAX_MESSAGE='1{'0' * 24}' must be a whole number from 1024 to 1073741824"),
    ("TICKSTACK_DEDUP_TTL", "1e18", "TICKSTACK_DEDUP_TTL='1e18' must be a number from 60 to 315360000"),
])
def test_the_writer_refuses_a_setting_it_cannot_use_at_start(stack: Stack, name: str, value: str,
                                                             message: str) -> None:
    """These three passed the checks, then the writer died at start (max message: OverflowError at
    ZeroMQ's MAXMSGSIZE), lost its commit thread at the first request (batch wait: OverflowError
    in the queue's wait) or failed every batch (dedup TTL: the prune's cutoff overflowed SQLite's
    INTEGER). The 30 s is a hang guard only: a writer that starts serves until killed."""
    try:
        proc = subprocess.run([sys.executable, "-m", "workers.writer"], env={**stack.env, name: value}, cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the writer started with {name}={value}: {(e.stderr or b'')[-500:]!r}")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.sqlite_only("tests/test_postgres_writer_lock.py::test_a_server_restart_ends_the_writer_and_its_successor_waits_for_the_server")
def test_the_writer_says_in_one_line_why_it_cannot_open_the_database_or_bind(stack: Stack, tmp_path: Path) -> None:
    """A database the writer cannot open (a folder, a file that is not SQLite's, a folder that does
    not exist) and an endpoint it cannot bind (taken) stopped it with a traceback of 36 frames."""
    import zmq

    folder = tmp_path / "a-folder.db"
    folder.mkdir()
    not_sqlite = tmp_path / "notes.db"
    not_sqlite.write_text("these are not the pages of an SQLite database\n" * 200)
    taken = zmq.Context.instance().socket(zmq.REP)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    cases = [({"DATABASE_URL": f"sqlite:///{folder}"}, f"cannot open the database {folder}"),
             ({"DATABASE_URL": f"sqlite:///{not_sqlite}"}, f"{not_sqlite} is not an SQLite database: it begins with"),
             ({"DATABASE_URL": f"sqlite:///{tmp_path}/no-such-folder/x.db"}, "no-such-folder"),
             ({"WRITER_ENDPOINT": f"tcp://127.0.0.1:{port}"}, f"cannot bind tcp://127.0.0.1:{port}")]
    try:
        for env, said in cases:
            proc = subprocess.run([sys.executable, "-m", "workers.writer"], env={**stack.env, **env}, cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 1, (env, proc.returncode, proc.stderr[-2000:])
            assert said in proc.stderr and "Traceback" not in proc.stderr, (env, proc.stderr[-2000:])
            if "DATABASE_URL" in env:  # and python -m db, which opens it too
                init = subprocess.run([sys.executable, "-m", "db", "init"], env={**stack.env, **env}, cwd=ROOT,
                                      capture_output=True, text=True, timeout=60)
                assert init.returncode == 1 and init.stderr.startswith("python -m db init: "), init.stderr[-2000:]
                assert "Traceback" not in init.stderr and len(init.stderr.splitlines()) == 1, init.stderr[-2000:]
                if "is not an SQLite database" in said:
                    assert said in init.stderr and "does DATABASE_URL name the wrong file?" in init.stderr, init.stderr
    finally:
        taken.close(0)
    assert not_sqlite.read_text().startswith("these are not")  # refused, not written over


# --- command-line numbers: one finite-number parser (db.config), nan/inf/negative refused ----------


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "1e300"])
def test_db_checkpoint_refuses_a_timeout_that_is_no_finite_positive_number(stack: Stack, value: str) -> None:
    """With the writer down, ``--timeout nan`` waited for ever (``now >= nan`` is never true) and -1
    was taken. The 30 s is a hang guard only."""
    try:
        proc = subprocess.run([sys.executable, "-m", "db", "checkpoint", "--timeout", value], env=stack.env,
                              cwd=ROOT, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"python -m db checkpoint --timeout {value} hung with no writer")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert f"argument --timeout: {value!r} must be a number greater than 0 and at most 86400" in proc.stderr, \
        proc.stderr[-2000:]


@pytest.mark.parametrize("flag, value", [("--pause", "nan"), ("--pause", "inf"), ("--pause", "-1"),
                                         ("--min-gap", "inf"), ("--max-gap", "nan"), ("--settle", "1e300"),
                                         ("--producer-kill-chance", "nan"), ("--producer-kill-chance", "2")])
def test_bench_chaos_refuses_a_flag_that_is_no_usable_number(flag: str, value: str) -> None:
    """``--pause nan`` or ``inf`` passed, then every producer called time.sleep(nan) (ValueError) or
    never woke. ``--only nobody`` is a safety net: were the value taken, the run still stops
    before it starts (argparse reads the flags in order, so the first bad one is the one named)."""
    proc = subprocess.run([sys.executable, "-m", "bench", "chaos", flag, value, "--only", "nobody"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert f"argument {flag}: {value!r} must be a number " in proc.stderr and "Traceback" not in proc.stderr, \
        proc.stderr[-2000:]


def test_bench_takes_its_number_parser_from_db() -> None:
    """One parser for finite numbers on every command line: db's (db cannot import bench)."""
    import bench.common
    import db.parsers

    assert bench.common.positive_float is db.parsers.positive_float


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_writer_client_refuses_a_deadline_or_timeout_that_is_no_finite_number(bad: float) -> None:
    """Nothing connects before the first call: each refusal comes before any waiting."""
    settings = load_settings({"TICKSTACK_HOME": "/tmp/ts-config-test"})
    with pytest.raises(ValueError, match="deadline"):
        WriterClient(settings=settings, deadline=bad)
    client = WriterClient(settings=settings, deadline=1)
    with pytest.raises(ValueError, match="deadline"):
        client.deadline = bad
    for call in (lambda: client.call("ping", _deadline=bad), lambda: client.submit("ping", _deadline=bad),
                 lambda: client.ping(timeout=bad), lambda: client.stats(timeout=bad),
                 lambda: client.wait_ready(bad)):
        with pytest.raises(ValueError, match="deadline|timeout"):
            call()
    assert client.in_flight == 0
    client.close()


# --- TICKSTACK_HOME that cannot be the runtime folder: one line naming it, no traceback -------------


def test_ensure_home_names_tickstack_home_when_a_file_is_in_the_way(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for home, where in ((blocker, blocker), (blocker / "below", blocker / "below")):
        with pytest.raises(ConfigError, match=f"^TICKSTACK_HOME='{re.escape(str(home))}': .*{re.escape(str(where))}.*"
                                              "not a folder"):
            ensure_home(load_settings({"TICKSTACK_HOME": str(home)}))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "run").write_text("a file where the sockets' folder goes")
    home = tmp_path / "home"
    with pytest.raises(ConfigError, match=f"^TICKSTACK_HOME='{re.escape(str(home))}': .*{re.escape(str(home / 'run'))}"
                                          ".*not a folder"):
        ensure_home(load_settings({"TICKSTACK_HOME": str(tmp_path / "home")}))


@pytest.mark.parametrize("feed", [["--feed", "sim", "--count", "3"], ["--feed", "csv", "--file", "ticks.csv"]])
def test_a_spool_that_cannot_be_a_folder_stops_the_feed_with_one_line(stack: Stack, feed: list[str]) -> None:
    """A file where the spool folder goes: the feed died with a traceback from the spool, once it
    served (a fault hunt), where the writer and ``db prepare`` refuse such a home in one line."""
    home = stack.home / "home"
    home.mkdir()
    (home / "spool").write_text("a file where the spool goes")
    (stack.home / "ticks.csv").write_text("ts,symbol,bid,ask,volume\n1700000000000,BTCUSD,1.0,1.1,1\n")
    env = {**stack.env, "TICKSTACK_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "workers.ticks", *feed], env=env, cwd=stack.home,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert f"TICKSTACK_HOME='{home}'" in proc.stderr and f"{home / 'spool'}" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]


@pytest.mark.parametrize("command", [["workers.writer"], ["workers.ticks", "--until-idle"],
                                     ["workers.analysis", "--until-idle"], ["workers.monitor", "--until-idle"],
                                     ["workers.jobs", "--until-idle"], ["db", "prepare"], ["db", "init"],
                                     ["db", "health"], ["db", "doctor"], ["db", "checkpoint", "--timeout", "5"],
                                     ["db", "backup", "copy.db"]])
def test_a_tickstack_home_that_is_a_file_stops_each_command_with_one_line(stack: Stack, command: list[str]) -> None:
    home = stack.home / "not-a-folder"
    home.write_text("a file")
    proc = subprocess.run([sys.executable, "-m", *command], env={**stack.env, "TICKSTACK_HOME": str(home)},
                          cwd=stack.home, capture_output=True, text=True, timeout=60)
    assert proc.returncode == (2 if command[0].startswith("workers.") else 1), (proc.returncode, proc.stderr[-2000:])
    assert f"TICKSTACK_HOME='{home}'" in proc.stderr and "not a folder" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
