"""First contact (issue 9): what a new user meets on a fresh clone, tried as they would.

The checkout is copied (tracked and new files, as a clone of this working tree would have them) into
a short temporary folder with a venv of its own that shares this venv's packages (no download), and
the Makefile's ``install`` makes it as ``make run`` would (its pip step is already done). Then, in an
environment emptied with ``env -i``, ``source .venv/bin/activate; circusd circus.ini --daemon;
circusctl status`` runs exactly as the README says. Only the ports are exported: the defaults
(8000, 8001, 8002) may be taken by the user's own stack on this machine; the test does not rely on
the README's defaults for them, but on everything else (home ``./var``, the circusctl endpoint).

Self-contained (no testkit), so it runs against an older checkout too.
"""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.env import free_port, free_udp_port, remove_home

ROOT = Path(__file__).resolve().parent.parent
WATCHERS = ("writer", "api", "console", "ticks", "analysis", "monitor", "jobs")


def _clone(dest: Path) -> None:
    """The files a clone of this working tree has (tracked, and new ones not ignored)."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _venv(dest: Path) -> None:
    """``dest/.venv`` as ``make install`` leaves it, with this venv's packages instead of pip's
    download: a new venv, a .pth that adds this venv's site-packages, this venv's console scripts
    (circusd, circusctl, gunicorn) pointed at the new python, then the Makefile's install."""
    venv = dest / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "tickstack.pth").write_text(f"{dest}\n")
    (site / "zz_shared_packages.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    here = Path(sys.executable).parent
    for script in ("circusd", "circusctl", "gunicorn"):
        lines = (here / script).read_text().splitlines(keepends=True)
        (venv / "bin" / script).write_text(f"#!{py}\n" + "".join(lines[1:]))
        (venv / "bin" / script).chmod(0o755)
    checksum = subprocess.run("cksum < requirements.lock", shell=True, cwd=dest, check=True, capture_output=True,
                              text=True).stdout.split()[0]
    (venv / f".installed-{checksum}").touch()  # pip's part of the install is done
    subprocess.run(["make", "-s", "install"], cwd=dest, check=True, capture_output=True, timeout=120)


@pytest.fixture()
def clone() -> Iterator[Path]:
    dest = Path(tempfile.mkdtemp(prefix="ts-"))
    try:
        _clone(dest)
        _venv(dest)
        yield dest
    finally:
        pidfile = dest / "var" / "run" / "circusd.pid"
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)  # a graceful quit of what this test started, by its pid
            for _ in range(600):
                os.kill(pid, 0)
                time.sleep(0.1)
        except (OSError, ValueError):
            pass
        shutil.rmtree(dest, ignore_errors=True)


def _shell(clone: Path, env: dict[str, str], script: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``script`` in bash with ``env`` only, after ``source .venv/bin/activate`` in the clone."""
    return subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in env.items()), "bash", "-c",
                           f"source .venv/bin/activate && {script}"], cwd=clone, capture_output=True, text=True,
                          timeout=timeout)


def _statuses(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def test_plain_circusd_and_circusctl_from_a_fresh_clone(clone: Path) -> None:
    env = {"HOME": str(clone), "PATH": "/usr/local/bin:/usr/bin:/bin",
           "TICKSTACK_API_PORT": str(free_port()), "TICKSTACK_CONSOLE_PORT": str(free_port()),
           "TICKSTACK_WATCHDOG_PORT": str(free_udp_port())}
    started = _shell(clone, env, "circusd circus.ini --daemon")
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 90
    statuses: dict[str, str] = {}
    while time.monotonic() < deadline:
        status = _shell(clone, env, "circusctl --timeout 3 status", timeout=30)
        statuses = _statuses(status.stdout)
        if status.returncode == 0 and all(statuses.get(w) == "active" for w in WATCHERS):
            break
        log = clone / "var" / "log" / "circusd.log"
        assert log.exists(), f"circusd did not start: no {log}; circusctl said {status.stdout}{status.stderr}"
        time.sleep(1)
    assert all(statuses.get(w) == "active" for w in WATCHERS), statuses
    run = clone / "var" / "run"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert (run / "circus.sock").is_socket()  # ipc://, in the private folder
    quit_ = _shell(clone, env, "circusctl quit", timeout=90)
    assert quit_.returncode == 0 and "ok" in quit_.stdout, quit_.stdout + quit_.stderr


def _empty_home() -> Path:
    return Path(tempfile.mkdtemp(prefix="ts-"))


@pytest.mark.database_independent("what the Makefile exports to the processes it runs is not the database's")
def test_make_run_passes_the_stack_its_defaults_and_no_script_of_its_own() -> None:
    """``make run``'s circusd, and so every watcher, had the Makefile's 1.5 KB activate script in its
    environment (``ACTIVATE_DEFAULTS``, exported to every recipe): the console listed it first among
    a watcher's environment. A recipe of the real Makefile shows what ``run``'s circusd is given."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["make", "-s", "--eval", "probe-environment: ; @env", "probe-environment"], cwd=root,
                         capture_output=True, text=True, timeout=60, check=True)
    names = {line.split("=", 1)[0] for line in out.stdout.splitlines() if "=" in line}
    assert {"TICKSTACK_HOME", "TICKSTACK_API_PORT", "TICKSTACK_CONSOLE_PORT"} <= names, sorted(names)
    assert "ACTIVATE_DEFAULTS" not in names


def test_console_port_root_redirects_and_login_names_the_real_password_file() -> None:
    from db.config import load_settings
    from webapp import create_app

    home = _empty_home()
    try:
        app = create_app("console", load_settings({"TICKSTACK_HOME": str(home)}))
        client = app.test_client()
        r = client.get("/")
        assert r.status_code in (301, 302, 303, 308) and r.headers["Location"].endswith("/console/"), r.status_code
        page = client.get("/console/login").get_data(as_text=True)
        assert str(home / "admin-password") in page and "$TICKSTACK_HOME" not in page
    finally:
        remove_home(home)


def test_with_the_admin_password_set_make_run_and_the_login_page_name_the_setting_not_a_file() -> None:
    """With ``TICKSTACK_ADMIN_PASSWORD`` set (as a second host must), ``make run`` said the password was
    in ``admin-password``, "made on first start", and the login page that it was generated there: no
    file is made, and one left from an earlier start holds a password that is now refused (a new
    user's run on PostgreSQL). Both name the setting; ``make run`` also names the database the stack
    will use, without its password."""
    from db.__main__ import first_contact
    from db.config import load_settings
    from webapp import create_app

    home = _empty_home()
    try:
        (home / "admin-password").write_text("an-old-generated-password\n")
        secret = "set-by-the-operator-42"
        url = f"postgresql+psycopg://ts_owner:{secret}@127.0.0.1:5999/tickstack"
        settings = load_settings({"TICKSTACK_HOME": str(home), "TICKSTACK_ADMIN_PASSWORD": secret,
                                  "DATABASE_URL": url})
        said = first_contact(settings)
        console = next(line for line in said.splitlines() if line.startswith("console "))
        assert "TICKSTACK_ADMIN_PASSWORD" in console and "admin-password" not in console, said
        database = next(line for line in said.splitlines() if line.startswith("database "))
        assert "postgresql+psycopg://ts_owner:***@127.0.0.1:5999/tickstack" in database, said
        assert secret not in said
        page = create_app("console", settings).test_client().get("/console/login").get_data(as_text=True)
        assert "TICKSTACK_ADMIN_PASSWORD" in page and "generated on first start" not in page, page
        assert str(home / "admin-password") not in page and secret not in page
        # Without the setting, both still name the file, and the database is the home's SQLite file.
        plain = load_settings({"TICKSTACK_HOME": str(home)})
        said = first_contact(plain)
        assert str(home / "admin-password") in said and f"sqlite:///{home / 'tickstack.db'}" in said, said
    finally:
        remove_home(home)


def test_health_fails_and_doctor_says_make_run_when_the_stack_is_down() -> None:
    home = _empty_home()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TICKSTACK_", "WRITER_", "DATABASE_"))}
    env.update(TICKSTACK_HOME=str(home), PYTHONPATH=str(ROOT))
    try:
        health = subprocess.run([sys.executable, "-m", "db", "health"], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert health.returncode != 0 and "DOWN" in health.stdout, health.stdout + health.stderr
        # A ping applies nothing: it said "it may or may not have been applied (a retry with this client ...)".
        assert "ping: no answer from the writer" in health.stdout and "applied" not in health.stdout, health.stdout
        doctor = subprocess.run([sys.executable, "-m", "db", "doctor"], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        writer_lines = [line for line in doctor.stdout.splitlines() if "writer is not running" in line]
        assert writer_lines and "make run" in writer_lines[0] and "start writer" not in writer_lines[0], doctor.stdout
        # By hand, as the README says it: prepare first (it left prepare out, which clears a stale pid file).
        assert "`python -m db prepare && circusd circus.ini --daemon`" in writer_lines[0], doctor.stdout
        # checkpoint asks the writer: with none running it says so at once, as doctor does, not after
        # waiting out --timeout (30 s by default; an hour here, which the test's bound would catch).
        checkpoint = subprocess.run([sys.executable, "-m", "db", "checkpoint", "--timeout", "3600"], env=env, cwd=ROOT,
                                    capture_output=True, text=True, timeout=60)
        assert checkpoint.returncode == 1, checkpoint.stdout + checkpoint.stderr
        assert "python -m db checkpoint: The writer is not running, nor is the stack" in checkpoint.stderr, \
            checkpoint.stderr
    finally:
        remove_home(home)


def test_a_bot_whose_writer_is_stopped_is_told_so_while_it_waits_and_when_it_gives_up() -> None:
    """A program using ``WriterClient`` as the README's bot does (no logging set up) while no writer
    runs: it waited out its whole deadline, a minute, without a word, then said only "no answer" (a
    new user's run, round 40). It warns after a few seconds that no writer is running and how to start
    one (Python prints a WARNING of a program that set up no logging), and its error says so too. With
    no circusd either (the stack stopped), only `make run` starts one: the circusctl command it also
    gave timed out against no circusd (a new user's run, round 44)."""
    home = _empty_home()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TICKSTACK_", "WRITER_", "DATABASE_"))}
    env.update(TICKSTACK_HOME=str(home), PYTHONPATH=str(ROOT))
    bot = ("from db.client import WriterClient\n"
           "with WriterClient(deadline=6) as client:\n"
           "    client.call('audit', actor='bot', action='hello')\n")
    try:
        done = subprocess.run([sys.executable, "-c", bot], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
    finally:
        remove_home(home)
    assert done.returncode == 1, done.stderr
    said = f"no writer is running in {home} (nothing holds its lock tickstack.db.writer.lock), nor is the stack " \
           "(no circusd): start it (`make run`)"
    assert "circusctl" not in done.stderr, done.stderr
    warning, error = done.stderr.find(said + "; requests wait for one"), done.stderr.rfind("WriterUnavailable: ")
    assert 0 <= warning < error, done.stderr
    assert said in done.stderr[error:], done.stderr


@pytest.mark.parametrize("flags", [["--until-idle"], []], ids=["until-idle", "as-circus-runs-it"])
@pytest.mark.parametrize("made", [True, False], ids=["empty-home", "no-home"])
@pytest.mark.parametrize("worker", ["analysis", "monitor", "jobs"])
def test_a_worker_started_without_a_writer_gives_up_in_one_line(worker: str, made: bool, flags: list[str]) -> None:
    """``python -m workers.analysis --until-idle`` (monitor, jobs) in an empty home waits for the writer
    to create the database, then says there is none in one line and exits 1: it was a traceback. Run
    as ``python -m`` does (runpy), with the wait (60 s) cut to 1 s by its constant, which no setting
    sets (workers.base.DATABASE_WAIT_S). In a home not made yet, analysis and monitor (one process
    leads) stood by for ever ("the leader is nobody known: the lock cannot be taken yet"), or with
    ``--until-idle`` exited 3, "another process leads"."""
    parent = _empty_home()
    home = parent if made else parent / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TICKSTACK_", "WRITER_", "DATABASE_"))}
    env.update(TICKSTACK_HOME=str(home), PYTHONPATH=str(ROOT))
    code = (f"import runpy, sys, workers.base; workers.base.DATABASE_WAIT_S = 1.0; "
            f"sys.argv = ['workers.{worker}', *{flags!r}]; "
            f"runpy.run_module('workers.{worker}', run_name='__main__', alter_sys=True)")
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"{worker}: no database at sqlite:///{home}/tickstack.db after 1 s: is the writer running?"), done.stderr


def test_a_restarted_simulated_feed_continues_from_the_last_stored_prices() -> None:
    """Each symbol's first simulated tick is within a few spreads of its last stored one: after
    prices stored by someone else, and again after the ingestor itself was stopped and restarted."""
    from db.client import WriterClient
    from testkit.helpers import query
    from testkit.writer import Stack

    st = Stack.create()
    try:
        st.start_writer()
        now = int(time.time() * 1000)
        with WriterClient(settings=st.settings, deadline=20) as client:
            client.call("insert_ticks", ticks=[
                {"symbol": "BTCUSD", "ts": now - 1000, "bid": 50_000.0, "ask": 50_004.0, "source": "t", "seq": 1},
                {"symbol": "EURUSD", "ts": now - 1000, "bid": 1.2, "ask": 1.2001, "source": "t", "seq": 2}])
        spreads = {"BTCUSD": 10.0, "EURUSD": 0.0002}  # the widest each symbol quotes
        for run in range(2):
            before = {s: query(st.settings, "SELECT bid, ask, source FROM ticks WHERE symbol = ? "
                               "ORDER BY ts DESC, id DESC LIMIT 1", (s,))[0] for s in spreads}
            done = subprocess.run([sys.executable, "-m", "workers.ticks", "--feed", "sim", "--count", "40"],
                                  env=st.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]
            for symbol, spread in spreads.items():
                (bid, ask, source), = query(
                    st.settings, "SELECT bid, ask, source FROM ticks WHERE symbol = ? AND source LIKE 'sim-%' "
                    "ORDER BY source DESC, seq LIMIT 1", (symbol,))
                last_mid = (before[symbol][0] + before[symbol][1]) / 2
                assert source != before[symbol][2], (run, symbol, source)
                assert abs((bid + ask) / 2 - last_mid) <= 5 * spread, (run, symbol, bid, ask, last_mid)
    finally:
        st.close()


@pytest.mark.sqlite_only("tests/test_first_contact.py::test_a_worker_started_without_a_writer_gives_up_in_one_line")
def test_a_read_the_database_refuses_stops_a_worker_in_one_line_not_a_traceback() -> None:
    """analysis and monitor met a server gone down (PostgreSQL stopped for 30 s) with three chained
    tracebacks in their logs; a read the database refuses is a state of the stack, said in one line
    (exit 1: circus starts the worker again), as the writer and jobs say theirs. Here a read SQLite
    refuses: the tables they read gone under them."""
    from db.client import WriterClient
    from testkit.writer import Stack

    st = Stack.create()
    try:
        writer = st.start_writer()
        with WriterClient(settings=st.settings, deadline=30) as client:
            client.call("ping")
        st.stop(writer)
        con = sqlite3.connect(st.settings.database_path)
        con.execute("DROP TABLE ticks")
        con.execute("DROP TABLE trade_events")
        con.execute("DROP TABLE trades")
        con.commit()
        con.close()
        st.start_writer()
        for worker in ("analysis", "monitor"):
            done = subprocess.run([sys.executable, "-m", f"workers.{worker}", "--until-idle"], env=st.env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
            errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
            said = f"{worker}: the database did not answer or refused a read (OperationalError: no such table: "
            assert len(errors) == 1 and said in errors[0], done.stderr[-3000:]
    finally:
        st.close()


@pytest.mark.parametrize("worker", ["analysis", "monitor", "jobs"])
def test_a_worker_waiting_for_the_database_stops_at_once_on_sigterm(worker: str) -> None:
    """A worker waiting for the database (no writer yet, or a readers' URL the server refuses) waited
    its whole minute after a SIGTERM: circus's graceful_timeout (30 s for jobs) SIGKILLed it, and a
    quit took that long (a new user's PostgreSQL run). It stops at once now, exit 0."""
    home = _empty_home()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TICKSTACK_", "WRITER_", "DATABASE_"))}
    env.update(TICKSTACK_HOME=str(home), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", f"workers.{worker}"], env=env, cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        # In its wait for the database: analysis and monitor once they lead (a stop before is a standby's).
        marker = f"{worker}: leading" if worker in ("analysis", "monitor") else f"{worker} started"
        while marker not in proc.stderr.readline():  # its handlers are set by then
            assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # the wait is 60 s: a worker that waited it out fails here
        said = proc.stderr.read()
        # jobs may take the signal a moment before its wait begins: stopped either way, at once.
        assert (f"{worker} stopped (while it waited for the database)" in said if marker.endswith("leading")
                else f"{worker} stopped" in said), said
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        remove_home(home)


@pytest.mark.database_independent("which Python runs a command is asked before any database is opened")
def test_a_command_run_by_a_python_without_the_venvs_packages_says_to_use_the_venv() -> None:
    """``python3 -m db health`` with the system's Python (no SQLAlchemy, pyzmq, ...) was a traceback
    ending in ``ModuleNotFoundError: No module named 'psutil'`` (a new user's run). It now says, in one
    line and no traceback, which packages are missing and to use the checkout's venv. ``-S`` leaves
    the venv's site-packages off the path: the venv's own base Python, as the system's would be."""
    home = _empty_home()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TICKSTACK_", "WRITER_", "DATABASE_"))}
    env.update(TICKSTACK_HOME=str(home), PYTHONPATH=str(ROOT))
    try:
        # bench's commands import db once their own module runs (sys.argv[0] is no longer "-m" then).
        for command in (["-m", "db", "health"], ["-m", "workers.writer"], ["-m", "bench", "chaos"]):
            done = subprocess.run([sys.executable, "-S", *command], env=env, cwd=ROOT, capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
            assert "are not installed for" in done.stderr and "`.venv/bin/python -m ...`" in done.stderr, done.stderr
            assert "sqlalchemy" in done.stderr, done.stderr
        # Imported as a library (a user's bot), the same words as the error's.
        done = subprocess.run([sys.executable, "-S", "-c", "import db.client"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        assert done.stderr.splitlines()[-1].startswith("ModuleNotFoundError: tickstack's packages"), done.stderr
        assert not list(home.iterdir()), "nothing written into the home"
    finally:
        remove_home(home)
