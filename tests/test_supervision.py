"""Supervision that survives its supervisor, and liveness (issue 8, points 5 and 8).

Real circusd with the real circus.ini (or a minimal ini for the flapping plugin), real writer, real
gunicorn; every process is stopped by pid. Bounds are generous: they ask whether something happened
at all, not how fast.
"""
from __future__ import annotations

import configparser
import importlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from db.client import WriterClient
from db.engine import connect_read_only
from db.health import integrity
from db.lock import read_lock_holder
from db.preflight import orphans
from supervision.circus import STACK_WATCHERS
from testkit.circus import WATCHERS, Circusd, CircusStack
from testkit.env import BIN, ROOT, isolated_env, new_home
from testkit.helpers import T0, backticked, query, run_as_printed, wait_for
from testkit.postgres import read_connection
from workers.base import Worker


@pytest.fixture
def stack() -> Iterator[CircusStack]:
    st = CircusStack()
    try:
        yield st
    finally:
        for proc in (st.children.known.values() if st.children else []):
            try:
                proc.send_signal(signal.SIGCONT)  # a test may leave one stopped
            except psutil.Error:
                pass
        st.close()


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def started_processes(stack: CircusStack) -> list[psutil.Process]:
    """Every process circusd started, by circus's own list (plugins included), with their children
    (gunicorn's workers)."""
    procs = []
    for watcher in stack.call("list")["watchers"]:
        for pid in stack.pids_of(watcher):
            proc = psutil.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
    return procs


def prepare(env: dict[str, str]) -> subprocess.CompletedProcess:
    """What ``make run`` runs before circusd."""
    return subprocess.run([sys.executable, "-m", "db", "prepare"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def plain_circusd(env: dict[str, str], timeout: float = 60) -> tuple[int | None, str]:
    """``circusd circus.ini`` as a user types it: its exit status (None if it did not exit in time:
    then it is stopped, with whatever it started) and its output."""
    status, out, _ = circusd_on_a_terminal(env, timeout, stderr=subprocess.STDOUT)
    return status, out


def circusd_on_a_terminal(env: dict[str, str], timeout: float = 60,
                          stderr: int = subprocess.PIPE) -> tuple[int | None, str, str]:
    """``circusd circus.ini`` as a user types it: its exit status (None if it did not exit in time:
    then it is stopped, with whatever it started), its stdout and its stderr."""
    proc = subprocess.Popen([str(BIN / "circusd"), "circus.ini"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err or ""
    except subprocess.TimeoutExpired:
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        out, err = proc.communicate()
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        return None, out, err or ""


def port_free(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def health(stack: CircusStack) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.api_port}/api/health", timeout=30) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        return json.load(e)


def wal_bytes(stack: CircusStack) -> int:
    wal = Path(f"{stack.settings.database_path}-wal")
    return wal.stat().st_size if wal.exists() else 0


# --- point 5: nothing outlives circusd ---------------------------------------------------------------------------


def test_every_process_stops_gracefully_when_circusd_is_killed(stack: CircusStack) -> None:
    # The writer drains 4 s after its SIGTERM: still stopping when `make run` looks, below.
    stack.env["TICKSTACK_WRITER_DRAIN_IDLE"] = "4"
    stack.start()
    wait_for("sim ticks", lambda: query(stack.settings, "SELECT count(*) FROM ticks")[0][0] > 0)
    # 7 watchers and 2 plugins, and each gunicorn master's 2 workers once they booted.
    procs = wait_for("every process", lambda: len(p := started_processes(stack)) >= 13 and p, timeout=60)

    os.kill(stack.proc.pid, signal.SIGKILL)
    stack.proc.wait(30)
    # `make run` at once: the processes stop by themselves, and it waits for them. It was refused, with
    # `kill` advice for processes gone a second or two later (fault hunt as an operator).
    again = prepare(stack.env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "tickstack processes of a circusd that is gone are stopping" in again.stdout, again.stdout
    assert orphans(stack.home) == []
    wait_for("every process circusd started to exit", lambda: not any(alive(p) for p in procs), timeout=90)

    writer_log = stack.log("writer")
    assert f"circusd (pid {stack.proc.pid}) is gone" in writer_log, writer_log[-2000:]
    assert "SIGTERM received; draining" in writer_log, writer_log[-2000:]
    assert "ticks: SIGTERM received" in stack.log("ticks"), stack.log("ticks")[-2000:]
    assert read_lock_holder(stack.settings.writer_lock_path) is None
    if stack.settings.database_path is not None:  # SQLite: checkpointed and sound (a server does its own)
        assert "final checkpoint done" in writer_log, writer_log[-2000:]
        assert wal_bytes(stack) == 0, "the WAL was checkpointed"
        con = connect_read_only(stack.settings.database_path)
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        con.close()
    else:  # the writer's sessions are gone with it, its server lock too
        assert "a server checkpoints its own WAL); exiting" in writer_log, writer_log[-2000:]
        assert not [a for (a,) in query(stack.settings, "SELECT application_name FROM pg_stat_activity")
                    if a.startswith("tickstack writer")]
        check = integrity(stack.settings)
        assert check["ok"] and "skipped" not in check, check
    assert port_free(stack.api_port) and port_free(stack.console_port)
    assert port_free(int(stack.env["TICKSTACK_WATCHDOG_PORT"]), socket.SOCK_DGRAM)

    # `make run` again: the dead circusd's pid file is cleared, and the stack starts.
    stack.start()
    assert all(stack.status()[w] == "active" for w in WATCHERS)


@pytest.mark.database_independent("circusd's handling of its stop signals while a command runs; the "
                                  "writer's own stop on each database is checked by test_writer.py "
                                  "and test_postgres_writer_lock.py")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_a_stop_signal_while_circusd_runs_a_command_stops_the_stack_once_it_is_done(
        stack: CircusStack, sig: signal.Signals) -> None:
    """Ctrl-C where ``make run`` runs (SIGINT) or ``kill PID`` of circusd (SIGTERM) while circusd
    runs another command (here a ``restart writer`` held open by a stopped writer; in a new user's
    run, the start of the watchers in ``make run``'s first second) was dropped: circus's quit met
    "arbiter is already running ..." and answered it to nobody, and the stack ran on. The quit now
    waits for that command, then stops the stack (:mod:`supervision.signals`)."""
    stack.start()
    procs = started_processes(stack)
    writer = psutil.Process(stack.pids_of("writer")[0])
    writer.suspend()  # its restart below cannot end before it is continued: the command runs meanwhile
    try:
        restart = stack.circusctl("restart", "writer")  # without --waiting: answered while it runs
        assert restart.returncode == 0 and "ok" in restart.stdout, restart.stdout + restart.stderr
        os.kill(stack.proc.pid, sig)
        wait_for("circusd to take the signal", lambda: f"Got signal SIG_{sig.name[3:]}" in stack.circusd_log(),
                 timeout=30)
    finally:
        writer.resume()
    try:
        assert stack.wait_exit(timeout=60) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"circusd ignored its {sig.name}: {stack.circusd_log()[-3000:]}")
    wait_for("every process circusd started to exit", lambda: not any(alive(p) for p in procs), timeout=90)
    assert "final checkpoint done" in stack.log("writer")  # SQLite only: the test is database_independent


def test_a_hung_orphan_blocks_make_run_and_plain_circusd_until_it_is_gone(stack: CircusStack) -> None:
    stack.start()
    wait_for("sim ticks", lambda: query(stack.settings, "SELECT count(*) FROM ticks")[0][0] > 0)
    writer = psutil.Process(stack.pids_of("writer")[0])
    others = [p for p in started_processes(stack) if p.pid != writer.pid]
    writer.send_signal(signal.SIGSTOP)  # hung: it cannot act on circusd's death
    os.kill(stack.proc.pid, signal.SIGKILL)
    stack.proc.wait(30)
    # The web servers let go of their ports (workers may wait for the stopped writer meanwhile).
    wait_for("the web ports", lambda: port_free(stack.api_port) and port_free(stack.console_port), timeout=90)
    assert alive(writer)

    refused = prepare(stack.env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"pid {writer.pid}" in refused.stderr and "writer lock" in refused.stderr, refused.stderr
    assert "left running by a circusd that is gone" in refused.stderr, refused.stderr
    # A stopped process acts on no SIGTERM until it is continued: the advice said `kill` alone.
    assert f"pid {writer.pid} is stopped (SIGSTOP): `kill -CONT {writer.pid}` after lets it act on it" in \
        refused.stderr, refused.stderr

    status, out = plain_circusd(stack.env)
    assert status == 1, out
    assert f"pid {writer.pid}" in out and "writer lock" in out, out
    assert read_lock_holder(stack.settings.writer_lock_path) == writer.pid
    assert not (stack.home / "run" / "circusd.pid").exists()

    writer.send_signal(signal.SIGCONT)  # it handles the SIGTERM it got when circusd died
    writer.wait(60)
    assert ("final checkpoint done" if stack.settings.database_path is not None else
            "a server checkpoints its own WAL); exiting") in stack.log("writer")
    wait_for("every process to exit", lambda: not any(alive(p) for p in others), timeout=120)
    done = prepare(stack.env)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.database_independent('a taken port is found, and refused, before any database is opened')
def test_make_run_and_circusd_refuse_taken_ports(stack: CircusStack) -> None:
    api = socket.socket()
    api.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    api.bind(("127.0.0.1", stack.api_port))
    api.listen()
    heartbeats = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    heartbeats.bind(("127.0.0.1", int(stack.env["TICKSTACK_WATCHDOG_PORT"])))
    try:
        refused = prepare(stack.env)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"pid {os.getpid()}" in refused.stderr, refused.stderr
        assert f"127.0.0.1:{stack.api_port}/TCP, the API's port" in refused.stderr, refused.stderr
        assert f"127.0.0.1:{stack.env['TICKSTACK_WATCHDOG_PORT']}/UDP, the watchdog's port" in refused.stderr
        # Held by what is not in this home's way: free ports to use instead come first, and they do.
        assert "ports it needs are taken" in refused.stderr and "not alone" not in refused.stderr, refused.stderr
        advice = re.search(r"Give this stack other ports, in every shell that starts or manages it: `export "
                           r"(TICKSTACK_API_PORT=\d+) (TICKSTACK_WATCHDOG_PORT=\d+)`", refused.stderr)
        assert advice is not None, refused.stderr
        moved = dict(pair.split("=") for pair in advice.groups())
        assert prepare({**stack.env, **moved}).returncode == 0
        # circusd binds the web ports itself, before any hook: it stopped there, "Could not bind" in its
        # log only, nothing on its terminal, and exited 0, which a script reads as started.
        status, out = plain_circusd(stack.env)
        assert status == 1, out
        assert f"circusd: did not start: Could not bind 127.0.0.1:{stack.api_port}" in out, out
        assert "python -m db prepare" in out and "Traceback" not in out, out
        left = {p.name for p in (stack.home / "run").iterdir()} & {"circusd.pid", "circus.sock", "circus-pubsub.sock"}
        assert left == set(), left  # a circusctl would wait on a socket file with no circusd behind it
        api.close()
        # The watchdog's port is checked by the writer's hook.
        status, out = plain_circusd(stack.env)
        assert status == 1, out
        assert "the watchdog's port" in out, out
    finally:
        api.close()
        heartbeats.close()


@pytest.mark.parametrize("name, value, said", [("TICKSTACK_API_PORT", "abc", "is not a whole number"),
                                               ("TICKSTACK_API_PORT", "70000", "must be a whole number"),
                                               ("TICKSTACK_READY_TIMEOUT", "soon", "is not a number")])
@pytest.mark.database_independent("a bad setting is refused by circusd's start hook before any database is opened")
def test_plain_circusd_stops_on_a_bad_setting_with_the_reason_on_its_terminal(
        stack: CircusStack, name: str, value: str, said: str) -> None:
    """``circusd circus.ini`` with a setting that does not load: circusd exits 1 with the one-line
    reason on stderr, as ``make run`` refuses it. It used to stay up with no watcher started and the
    reason in circusd.log only. (The 60 s bound only stops a circusd that sits there.)"""
    env = {**stack.env, name: value}
    refused = prepare(env)
    assert refused.returncode == 1 and f"{name}={value!r} {said}" in refused.stderr, refused.stderr

    old = os.umask(0o022)
    try:
        status, out, err = circusd_on_a_terminal(env)
    finally:
        os.umask(old)
    assert status == 1, (status, out, err, stack.circusd_log()[-2000:])
    assert f"{name}={value!r} {said}" in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in out + err, out + err
    left = {p.name for p in (stack.home / "run").iterdir()} & {"circusd.pid", "circus.sock", "circus-pubsub.sock"}
    assert left == set(), left  # a circusctl would wait on a socket file with no circusd behind it
    assert f"{name}={value!r} {said}" in stack.circusd_log()
    # circus opens its log before any hook of ours, under circusd's umask (a shell's 022 here): the
    # writer's after_start hook makes it private, which a refused start never reached (it stayed 0644).
    assert oct(stat.S_IMODE((stack.home / "log" / "circusd.log").stat().st_mode)) == oct(0o600)


@pytest.mark.database_independent("the Python on PATH is checked by circusd's start hook before any database is opened")
def test_plain_circusd_without_the_venv_on_path_stops_saying_so(stack: CircusStack, tmp_path: Path) -> None:
    """``.venv/bin/circusd circus.ini`` typed without the venv activated: circus.ini's bare ``python``
    and ``gunicorn`` are found on circusd's PATH, here a Python without tickstack's packages (this
    venv's base interpreter). Every watcher crash-looped on an import error until the flapping
    plugin gave up; now circusd exits 1 at once saying what is wrong and what to do, and so does
    ``python -m db prepare`` run with that PATH. (On the real PATH both pass: every other test.)"""
    foreign = tmp_path / "bin"
    foreign.mkdir()
    (foreign / "python").symlink_to(sys._base_executable)  # type: ignore[attr-defined]
    gunicorn = foreign / "gunicorn"
    gunicorn.write_text(f"#!{sys._base_executable}\nimport sys\nsys.exit('not this one')\n")  # type: ignore[attr-defined]
    gunicorn.chmod(0o755)
    env = {**stack.env, "PATH": f"{foreign}:/usr/bin:/bin"}
    status, out, err = circusd_on_a_terminal(env)
    assert status == 1, (status, out, err, stack.circusd_log()[-2000:])
    # circusd's own Python (its #! line) is the venv named: BIN itself, or what a symbolic link to it names.
    venv = Path((BIN / "circusd").read_text().splitlines()[0][2:].strip()).parent
    for said in (f"`python` on PATH is {foreign}/python", f"`gunicorn` on PATH is {gunicorn}",
                 "lacks tickstack's packages", f"source {venv}/activate"):
        assert said in err, (said, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in out + err, out + err
    refused = prepare(env)
    assert refused.returncode == 1 and f"`python` on PATH is {foreign}/python" in refused.stderr, refused.stderr


@pytest.mark.database_independent("circus's web sockets come from circusd's environment, checked by its start hook "
                                  "before any database is opened")
def test_plain_circusd_with_the_web_ports_unset_stops_saying_which_and_how(stack: CircusStack) -> None:
    """``circusd circus.ini`` with ``TICKSTACK_HOME`` exported but not the ports (the venv not
    activated, which exports make run's defaults): circus.ini's ``[socket:api]`` and
    ``[socket:console]`` take theirs from circusd's environment, and circus, finding
    ``$(circus.env.TICKSTACK_API_PORT)`` left as written, logged a traceback per socket and went on
    without them; the writer and the workers started, the API and the console crash-looped until the
    flapping plugin stopped them, and circusd ran on (a new user's run-through). It now exits 1 at once
    saying which are not set, their defaults and what to do."""
    env = {k: v for k, v in stack.env.items() if k not in ("TICKSTACK_API_PORT", "TICKSTACK_CONSOLE_PORT")}
    status, out, err = circusd_on_a_terminal(env, timeout=30)
    assert status == 1, (status, out, err, stack.circusd_log()[-3000:])
    venv = Path((BIN / "circusd").read_text().splitlines()[0][2:].strip()).parent
    for said in ("circus made no socket api, console", "takes TICKSTACK_API_PORT, TICKSTACK_CONSOLE_PORT",
                 "`export TICKSTACK_API_PORT=8000 TICKSTACK_CONSOLE_PORT=8001`", f"source {venv}/activate"):
        assert said in err, (said, err)
    assert len(err.strip().splitlines()) == 1, err
    assert "writer started" not in stack.circusd_log(), stack.circusd_log()[-3000:]  # nothing was started


@pytest.mark.database_independent("which sockets circus left unmade is read from circus.ini alone")
def test_a_socket_whose_port_is_not_from_the_environment_is_not_said_to_be_unset(tmp_path: Path) -> None:
    """A circus.ini edited by hand whose ``[socket:api]`` has its port written out (``port = 80OO``, a
    typo), or no such section: circus made no socket, and the start hook said circus.ini "takes its
    port from circusd's environment, where they are not set" and to run "`export ` (make run's
    defaults)", an empty command (a review). It says the section takes no port from the environment and
    where circus's reason is; a port that does come from it is still named, with its default."""
    from db.preflight import unmade_sockets

    ini = tmp_path / "circus.ini"
    ini.write_text("[socket:api]\nhost = 127.0.0.1\nport = 80OO\n\n"
                   "[socket:console]\nhost = 127.0.0.1\nport = $(circus.env.TICKSTACK_CONSOLE_PORT)\n")
    for commands, unmade in ((["api $(circus.sockets.api)"], "api"), (["api $(circus.sockets.web)"], "web")):
        said = unmade_sockets(set(), commands, ini)
        assert said is not None and said.startswith(f"circus made no socket {unmade}: "), said
        assert "export" not in said and "not set" not in said and "environment" in said, said
        assert "log/circusd.log" in said, said
    both = unmade_sockets({"api"}, ["api $(circus.sockets.api)", "console $(circus.sockets.console)"], ini)
    assert both is not None and "`export TICKSTACK_CONSOLE_PORT=8001`" in both, both
    assert unmade_sockets({"api"}, ["api $(circus.sockets.api)"], ini) is None


@pytest.mark.database_independent("circusd's pid file and the process that holds its pid are the same"
                                  " whatever the database")
@pytest.mark.parametrize("holder", ["gone", "zombie", "unrelated", "newer-circusd"])
def test_make_run_clears_a_stale_pid_file(stack: CircusStack, holder: str, tmp_path: Path) -> None:
    pidfile = stack.home / "run" / "circusd.pid"
    other: subprocess.Popen | Circusd | None = None
    try:
        if holder == "gone":  # a circusd SIGKILLed and reaped: its pid names no process ("not the circusd
            ended = subprocess.Popen(["true"])  # that wrote it" said there was one)
            ended.wait()
            pid = ended.pid
        elif holder == "zombie":
            other = subprocess.Popen(["true"])
            wait_for("a zombie", lambda: psutil.Process(other.pid).status() == psutil.STATUS_ZOMBIE, timeout=10)
            pid = other.pid
        elif holder == "unrelated":
            other = subprocess.Popen(["sleep", "120"])
            pid = other.pid
        else:  # a circusd of another home that got the pid after the file was written
            home = new_home()
            ini = home / "circus.ini"
            ini.write_text(f"[circus]\nendpoint = ipc://{home}/run/circus.sock\npubsub_endpoint = ipc://{home}/run/pubsub.sock\n"
                           "statsd = False\n\n[watcher:sleeper]\ncmd = sleep 600\n")
            other = Circusd(isolated_env(home), ini, cwd=home, call_timeout=5)
            other.start(wait_active=("sleeper",), timeout=30, poll=0.2)
            pid = other.proc.pid
        pidfile.write_text(f"{pid}\n")
        if holder != "gone":
            written = psutil.Process(pid).create_time() - 100
            os.utime(pidfile, (written, written))

        done = prepare(stack.env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"removed the stale pid file {pidfile}: pid {pid}" in done.stdout
        said = "runs no more" if holder == "gone" else "is not the circusd that wrote it"
        assert f"removed the stale pid file {pidfile}: pid {pid} {said}" in done.stdout, done.stdout
        stack.start(wait_active=("writer",))
        assert stack.status()["writer"] == "active"
    finally:
        if isinstance(other, Circusd):
            other.stop(quit_timeout=30, term_timeout=10)
            shutil.rmtree(other.env["TICKSTACK_HOME"], ignore_errors=True)
        elif other is not None:
            other.kill()
            other.wait()


@pytest.mark.database_independent("health's verdict on an unanswering circusd is read from circus, "
                                  "whatever the database")
def test_health_is_degraded_while_circusd_does_not_answer(stack: CircusStack) -> None:
    stack.start()
    wait_for("health ok", lambda: health(stack)["status"] == "ok", timeout=60)
    os.kill(stack.proc.pid, signal.SIGSTOP)
    try:
        body = health(stack)
        assert body["status"] == "degraded" and body["circus"]["reachable"] is False, body
        assert body["writer"]["up"] is True
    finally:
        os.kill(stack.proc.pid, signal.SIGCONT)
    wait_for("health ok again", lambda: health(stack)["status"] == "ok", timeout=60)


@pytest.mark.database_independent("the start hook reads circus's writer watcher and pings the writer over ZeroMQ, "
                                   "whatever the database")
def test_a_dependent_never_waits_for_a_stopped_writer_and_once_for_a_silent_one() -> None:
    """The dependents' ``before_start`` hook waits for the writer's readiness on circusd's own event
    loop. With the writer stopped on purpose it pinged nobody for TICKSTACK_READY_TIMEOUT (30 s by
    default; circusd answered no one meanwhile), then refused: a restart of the console (the page
    that starts the writer again) left it stopped, and the console's Restart all left every
    dependent stopped, each after its own wait. A stopped writer is not waited for: the dependent
    starts (each tolerates a missing writer), and the log says so. A writer process that runs but
    does not answer (SIGSTOP here; a hung start) is waited for once, up to the timeout; the next
    dependents only ping it briefly, and once it answers again the next start finds it ready."""
    stack = CircusStack(TICKSTACK_READY_TIMEOUT="5")
    writer = None
    try:
        stack.start()
        stopped = stack.circusctl("stop", "writer", "--waiting")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        done = stack.circusctl("restart", "console", "--waiting")
        assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr
        assert stack.status()["console"] == "active", (stack.status(), stack.circusd_log()[-3000:])
        assert "the writer is stopped; starting console without waiting for it" in stack.circusd_log()
        assert stack.status()["writer"] == "stopped"
        page = urllib.request.urlopen(f"http://127.0.0.1:{stack.console_port}/console/health", timeout=30)
        assert page.status == 200

        # Silent (once it answers again, the last step finds a dependent waiting for it, as at start).
        started = stack.circusctl("start", "writer", "--waiting")
        assert started.returncode == 0, started.stdout + started.stderr
        writer = psutil.Process(stack.pids_of("writer")[0])
        writer.send_signal(signal.SIGSTOP)
        seen = len(stack.circusd_log())
        for name in ("console", "monitor"):
            done = stack.circusctl("restart", name, "--waiting")
            assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr
            assert stack.status()[name] == "active", (name, stack.status(), stack.circusd_log()[seen:])
        log = stack.circusd_log()[seen:]
        assert re.search(r"did not answer within 5 s; starting console without it", log), log
        # The watchdog replaces a writer silent for 20 s: on a very slow run the monitor's start may
        # have found a new writer, which it then waited for like any other.
        if stack.pids_of("writer") == [writer.pid]:
            assert f"the writer pid {writer.pid} still does not answer; starting monitor without it" in log, log
        writer.send_signal(signal.SIGCONT)
        client = WriterClient(settings=stack.settings, deadline=5.0)
        try:
            client.wait_ready(60)
        finally:
            client.close()
        seen = len(stack.circusd_log())
        done = stack.circusctl("restart", "jobs", "--waiting")
        assert done.returncode == 0 and stack.status()["jobs"] == "active", done.stdout + done.stderr
        assert re.search(r"writer pid \d+ ready \([\d.]+ ms\); starting jobs", stack.circusd_log()[seen:])
    finally:
        if writer is not None:
            try:
                writer.send_signal(signal.SIGCONT)
            except psutil.Error:
                pass
        stack.close()


@pytest.mark.database_independent("the watchers circus has after a reloadconfig are circus's, whatever the database")
def test_a_watcher_a_reloadconfig_dropped_is_missing_and_down_in_health_and_metrics(stack: CircusStack) -> None:
    """``[watcher:monitor`` without its closing bracket, then ``circusctl reloadconfig --waiting``:
    circusctl says ok and circus removes the monitor watcher. Health judged only the watchers circus
    had (``ok``, ``down: {}``); it compares with the stack's watchers and calls monitor missing."""
    ini = stack.home / "circus.ini"
    ini.write_text((ROOT / "circus.ini").read_text())
    stack.ini = ini
    stack.start()
    wait_for("health ok", lambda: health(stack)["status"] == "ok", timeout=60)
    ini.write_text(ini.read_text().replace("[watcher:monitor]", "[watcher:monitor"))
    done = stack.circusctl("reloadconfig", "--waiting")
    assert done.returncode == 0 and "ok" in done.stdout, (done.stdout, done.stderr)
    wait_for("monitor removed", lambda: "monitor" not in stack.status(), timeout=60)
    body = wait_for("health degraded", lambda: (b := health(stack))["status"] == "degraded" and b, timeout=60)
    assert body["circus"]["down"] == {"monitor": body["circus"]["down"]["monitor"]}, body["circus"]
    assert body["circus"]["down"]["monitor"].startswith("missing"), body["circus"]
    assert body["circus"]["watchers"]["monitor"] == "missing" and body["circus"]["processes"]["monitor"] is None
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.api_port}/metrics", timeout=30) as resp:
        metrics = resp.read().decode()
    assert 'tickstack_watcher_up{watcher="monitor"} 0.0' in metrics
    assert 'tickstack_watcher_up{watcher="analysis"} 1.0' in metrics


def test_the_stacks_watchers_are_circus_ini_s() -> None:
    """What health expects (and the tests wait for: testkit.circus.WATCHERS is it) is what circus.ini runs."""
    sections = re.findall(r"^\[watcher:([^\]]+)\]$", (ROOT / "circus.ini").read_text(), re.M)
    assert sorted(STACK_WATCHERS) == sorted(sections)


# --- flapping: retries stop after max_retry ---------------------------------------------------------------------


@pytest.mark.database_independent("a watcher of its own that crashes: circus's flapping plugin, with "
                                  "no stack and no database")
def test_flapping_retries_stop_after_max_retry() -> None:
    home = new_home()
    env = isolated_env(home)
    plugin = "supervision.plugins.Flapping"
    if not (ROOT / "supervision" / "plugins.py").exists():  # the tree before supervision/ existed
        plugin = "workers.circus_plugins.Flapping"
    # Processes that die 0.5 s after they start, reaped every second (check_delay): three deaths
    # within the window (plus the plugin's check_delay of 5 s), every time.
    ini = home / "circus.ini"
    ini.write_text(f"""[circus]
endpoint = ipc://{home}/run/circus.sock
pubsub_endpoint = ipc://{home}/run/circus-pubsub.sock
statsd = False
check_delay = 1
logoutput = {home}/log/circusd.log

[plugin:flapping]
use = {plugin}
attempts = 3
window = 1
retry_in = 6
max_retry = 1

[watcher:crasher]
cmd = {sys.executable} -c "import time; time.sleep(0.5); raise SystemExit(1)"
""")
    daemon = Circusd(env, ini, cwd=home, call_timeout=10)
    log = home / "log" / "circusd.log"
    try:
        daemon.start(wait_active=(), timeout=30, poll=0.2)
        wait_for("flapping to give up", lambda: "reached max retry limit" in log.read_text(), timeout=90)
        wait_for("crasher stopped", lambda: daemon.status()["crasher"] == "stopped", timeout=30)
        time.sleep(10)  # longer than retry_in: nothing starts it again
        assert daemon.status()["crasher"] == "stopped"
        text = log.read_text()
        assert text.count("crasher: flapping detected: retry in") == 1, text[-3000:]
        # The log says how to start it again, runnable as printed from the checkout.
        given_up = next(line for line in text.splitlines() if "reached max retry limit" in line)
        start = run_as_printed(backticked(given_up, "start crasher"))
        assert start.returncode == 0 and "ok" in start.stdout, (given_up, start.stdout, start.stderr)
    finally:
        daemon.stop(quit_timeout=30, term_timeout=10)
        shutil.rmtree(home, ignore_errors=True)


# --- point 8: a hung process is restarted -----------------------------------------------------------------------


@pytest.mark.database_independent("circusd's own log handler and its log folder are the same whatever the database")
def test_a_log_folder_moved_away_is_made_again_and_circusd_serves_on(stack: CircusStack) -> None:
    """``mv $TICKSTACK_HOME/log ...`` under a running stack, then a ``circusctl restart``: circusd's
    own log handler (the stdlib's WatchedFileHandler) raised FileNotFoundError into circus's loop at
    the next line it logged, and circus stopped every watcher, the writer's last lines lost with them
    (fault hunt as an operator). The folder is made again (0700), circusd and the watcher's output go
    on in it, and every watcher still runs."""
    stack.start()
    logs = stack.home / "log"
    logs.rename(stack.home / "log.moved")
    restarted = stack.circusctl("restart", "monitor", "--waiting")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert stack.proc is not None and stack.proc.poll() is None, "circusd exited"
    statuses = stack.status()
    assert set(statuses.values()) == {"active"}, statuses
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    wait_for("circusd's log made again", lambda: "monitor" in (logs / "circusd.log").read_text(errors="replace")
             if (logs / "circusd.log").exists() else False, timeout=30)
    wait_for("the monitor's output in the new folder", lambda: (logs / "monitor.log").exists() and
             (logs / "monitor.log").stat().st_size > 0, timeout=60)


def test_a_home_moved_under_the_stack_gets_no_new_database(stack: CircusStack) -> None:
    """``mv $TICKSTACK_HOME ...`` under a running stack: the writer lost its lock file and exited, circus
    started another, and it made a new home and an empty database, which every process then wrote to
    and was acknowledged (fault hunt as an operator). circusd now starts no writer there and says why."""
    stack.start()
    moved = stack.home.with_name(stack.home.name + ".moved")
    stack.home.rename(moved)
    try:
        said = "writer: not starting one: its home " + str(stack.home) + " is not the folder it was"
        wait_for("circusd to refuse a new writer", lambda: any(
            said in (folder / "log" / "circusd.log").read_text(errors="replace")
            for folder in (stack.home, moved) if (folder / "log" / "circusd.log").exists()), timeout=90)
        # A refused spawn leaves the watcher stopped: no writer, no database, however long. (circusd's
        # socket moved with the home.)
        moved_circus = Circusd({**stack.env, "TICKSTACK_HOME": str(moved)}, stack.ini)
        wait_for("the writer's watcher stopped", lambda: moved_circus.status()["writer"] == "stopped", timeout=30)
        assert not (stack.home / "tickstack.db").exists() and moved_circus.pids_of("writer") == []
        assert stack.proc is not None and stack.proc.poll() is None
    finally:
        stack.stop()  # by pid: its socket moved with the home
        shutil.rmtree(moved, ignore_errors=True)


@pytest.mark.database_independent("what circusd's log says of a killed worker is circus's reaping, "
                                  "whatever the database")
def test_a_process_killed_under_circus_is_said_in_circusds_log(stack: CircusStack) -> None:
    """kill -9 of a worker: circusd.log said nothing, and the worker's own log only its successor's
    start (fault hunt as an operator). Now circusd says which process ended, and how."""
    stack.start()
    (pid,) = stack.pids_of("monitor")
    os.kill(pid, signal.SIGKILL)
    wait_for("the kill in circusd's log", lambda: f"monitor pid {pid} was killed by SIGKILL (signal 9) while it ran; "
             "circus starts another" in stack.circusd_log(), timeout=60)
    wait_for("another monitor", lambda: (p := stack.pids_of("monitor")) and p != [pid], timeout=60)


def test_a_stopped_writer_is_restarted_by_the_watchdog_and_nothing_acknowledged_is_lost(stack: CircusStack) -> None:
    stack.start()
    settings = stack.settings
    acked: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        client = WriterClient(settings=settings, deadline=120)
        seq = 0
        while not stop.is_set():
            tick = {"symbol": "WDUSD", "ts": T0 + seq, "bid": 1.0, "ask": 1.1, "source": "watchdog-test", "seq": seq}
            try:
                client.call("insert_ticks", ticks=[tick])
                acked.append(seq)
            except Exception as e:  # the test wants none
                errors.append(f"{type(e).__name__}: {e}")
            seq += 1
            time.sleep(0.02)
        client.close()

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_for("writes", lambda: len(acked) > 20, timeout=60)
        old = stack.pids_of("writer")
        # Hung only once the watchdog watches it (circusd's log says so): a hang before that is
        # another test's question, and a race here (the plugin starts last).
        wait_for("the watchdog to watch the writer", lambda: re.search(
            rf"watchdog: writer pid {old[0]}: (first heartbeat|running); watched from now on", stack.log("circusd")),
            timeout=60)
        os.kill(old[0], signal.SIGSTOP)
        # Another local user's beats for the stopped writer kept it from being restarted (a security
        # review, round 41), from a port of its own and from the writer's own port on 127.0.0.2 (a
        # table lookup by port alone took that one for the writer's): sent now, as nobody, both are
        # ignored. Only root can be another user here.
        spoofer = None
        if os.getuid() == 0:
            (beat_port,) = {c.laddr.port for c in psutil.Process(old[0]).net_connections(kind="udp")}
            spoofer = subprocess.Popen(["/usr/bin/python3", "-c", (
                "import socket, sys, time\nmine = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "theirs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "theirs.bind(('127.0.0.2', int(sys.argv[3])))\nwhile True:\n    for s in (mine, theirs):\n"
                "        s.sendto(f'{sys.argv[1]};{time.time():.3f}'.encode(), ('127.0.0.1', int(sys.argv[2])))\n"
                "    time.sleep(0.3)"), str(old[0]), str(settings.watchdog_port), str(beat_port)], user=65534)
        try:
            new = wait_for("a new writer", lambda: (p := stack.pids_of("writer")) and p != old and p, timeout=180)
        except AssertionError as e:  # say what circus did meanwhile: the failure is otherwise mute
            raise AssertionError(f"{e}\ncircusd.log:\n{stack.log('circusd')[-4000:]}\nwriter log:\n"
                                 f"{stack.log('writer')[-2000:]}") from None
        finally:
            if spoofer is not None:
                spoofer.kill()
                spoofer.wait()
        if spoofer is not None:
            said = stack.log("circusd")
            assert re.search(rf"watchdog: a heartbeat for pid {old[0]} from port \d+, a socket of user 65534: ignored",
                             said) and f"a heartbeat for pid {old[0]} from 127.0.0.2, not 127.0.0.1: ignored" in said, \
                said[-3000:]
        assert not psutil.pid_exists(old[0]) or not alive(psutil.Process(old[0]))
        served = len(acked)
        wait_for("writes again", lambda: len(acked) > served + 20, timeout=120)
    finally:
        stop.set()
        producer.join(150)
    assert not errors, errors[:5]
    assert WriterClient(settings=settings, deadline=30).ping()["pid"] == new[0]
    circusd_log = stack.log("circusd")
    assert f"watchdog: writer pid {old[0]} sent no heartbeat" in circusd_log, circusd_log[-3000:]
    con = read_connection(settings)
    stored = [s for (s,) in con.execute("SELECT seq FROM ticks WHERE source = 'watchdog-test' ORDER BY seq")]
    assert set(acked) <= set(stored) and len(stored) == len(set(stored)), "every acknowledged tick stored once"
    audit = wait_for("the restart in the audit log", lambda: con.execute(
        "SELECT target, result, detail FROM audit_log WHERE actor = 'watchdog' AND action = 'restart'").fetchall())
    assert audit[0][0] == "writer" and audit[0][1] == "ok" and str(old[0]) in audit[0][2], audit
    con.close()


def test_a_writer_stopping_gracefully_is_not_watched_again_by_its_last_heartbeats(stack: CircusStack) -> None:
    """A process circus stops (a restart, a stop) is not watched from then on: a long graceful stop is no
    hang. Its heartbeats while it drains made the watchdog look for it in circus's list, where it still
    was, and watch it again ("first heartbeat; watched from now on", seen at each writer restart): a
    drain then silent past the timeout would have restarted the new writer."""
    stack.start()
    old = stack.pids_of("writer")
    watched = rf"watchdog: writer pid {old[0]}: (first heartbeat|running); watched from now on"
    wait_for("the watchdog to watch the writer", lambda: re.search(watched, stack.log("circusd")), timeout=60)
    before = stack.log("circusd")
    restart = stack.circusctl("restart", "writer", "--waiting")
    assert restart.returncode == 0, restart.stdout + restart.stderr
    new = wait_for("a new writer", lambda: (p := stack.pids_of("writer")) and p != old and p, timeout=60)
    wait_for("the new writer watched", lambda: re.search(
        rf"watchdog: writer pid {new[0]}: first heartbeat; watched from now on", stack.log("circusd")), timeout=60)
    after = stack.log("circusd")[len(before):]
    assert not psutil.pid_exists(old[0]) or not alive(psutil.Process(old[0]))
    assert f"pid {old[0]}: first heartbeat" not in after and f"pid {old[0]}: running" not in after, after[-3000:]


@pytest.mark.database_independent("how long circus waits for a stop and how long a worker's stop takes are not the "
                                  "database's")
def test_every_workers_stop_budget_fits_in_the_time_circus_gives_it() -> None:
    """A worker's requests to the writer give up within its ``stop_budget`` of a stop signal
    (``Worker.handle_stop``), then it flushes and exits; circus kills it ``graceful_timeout`` after
    the signal (the watchdog plugin's restart, ``watchers_graceful_timeout``). Each budget, with 5 s
    for the rest of the exit, within both in the real circus.ini. (The feed's waited 15 s a request,
    and a window as long again: SIGKILL.)"""
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ROOT / "circus.ini")
    checked = {}
    for section in ini.sections():
        cmd = ini[section].get("cmd", "")
        module = re.fullmatch(r"python -m (workers\.\w+)(?: .*)?", cmd)
        if not section.startswith("watcher:") or module is None:
            continue
        # The worker class the command runs: defined there, or imported (workers.ticks runs
        # workers.tick_ingestor's).
        workers = [c for c in vars(importlib.import_module(module[1])).values()
                   if isinstance(c, type) and issubclass(c, Worker) and c is not Worker
                   and c.__module__.startswith("workers.")]
        if not workers:  # the writer: not a Worker (its drain has settings of its own)
            continue
        (worker,) = workers
        graceful = float(ini[section]["graceful_timeout"])
        if re.search(ini["plugin:watchdog"]["watchers_regex"], section.removeprefix("watcher:")):
            graceful = min(graceful, float(ini["plugin:watchdog"]["watchers_graceful_timeout"]))  # its restarts
        assert worker.stop_budget + 5 <= graceful and 0 <= worker.stop_reserve < worker.stop_budget, (section, graceful)
        checked[section] = worker.stop_budget
    assert set(checked) == {"watcher:ticks", "watcher:analysis", "watcher:monitor", "watcher:jobs"}, checked
