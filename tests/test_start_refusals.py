"""A start refused because something else holds what the stack needs names who holds it and how to
stop it, as a user can paste it: another stack's circusd (not its gunicorn worker) and its
circusctl ``quit``; a gunicorn run by hand by its master; a home whose circus sockets' paths do not
fit a Unix socket's 107 bytes, before circusd meets it.

Real circusd with the real circus.ini, real gunicorn; every process is stopped by pid.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from supervision.circus import Circus, CircusError
from testkit.circus import Circusd, CircusStack
from testkit.env import ROOT, isolated_env, new_home, remove_home
from testkit.helpers import backticked, run_as_printed, wait_for
from tests import test_supervision
from tests.test_supervision import port_free, prepare

#: The tests of this module whose promise is the same whatever the database (tests/conftest.py).
DATABASE_INDEPENDENT = pytest.mark.database_independent(
    "a taken port is found, and refused, before any database is opened")
#: Those of them about the home's path, as circus uses it.
DATABASE_INDEPENDENT_PATHS = pytest.mark.database_independent(
    "the home's path is checked for circus's sockets and circus.ini before any database is opened")

stack = test_supervision.stack  # the fixture: a CircusStack of the real circus.ini, stopped by pid


def _gunicorn_pids(stack: CircusStack, watcher: str) -> list[int]:
    """The watcher's gunicorn master and its workers, once both workers booted."""
    master = psutil.Process(stack.pids_of(watcher)[0])
    workers = wait_for(f"{watcher}'s workers", lambda: len(c := master.children()) == 2 and c, timeout=60)
    return [master.pid, *(w.pid for w in workers)]


@DATABASE_INDEPENDENT
def test_a_port_held_by_another_stack_names_its_circusd_and_how_to_quit_it(stack: CircusStack) -> None:
    """Another stack's API port and watchdog port: the refusal names that stack's circusd, which owns
    the listening socket (its gunicorn master and workers only inherit it; its watchdog plugin would
    be started again), with the circusctl command that stops it, runnable as printed. It used to
    name a gunicorn worker and suggest `kill` of it."""
    stack.start()
    gunicorns = _gunicorn_pids(stack, "api")
    udp = int(stack.env["TICKSTACK_WATCHDOG_PORT"])
    wait_for("the watchdog's port", lambda: not port_free(udp, socket.SOCK_DGRAM), timeout=60)
    plugins = stack.pids_of("plugin:watchdog")
    home = new_home()
    try:
        env = {**isolated_env(home, ports=True), "TICKSTACK_API_PORT": str(stack.api_port),
               "TICKSTACK_WATCHDOG_PORT": str(udp)}
        refused = prepare(env)
        err = refused.stderr
        assert refused.returncode == 1, refused.stdout + err
        assert f"pid {stack.proc.pid} (" in err and "circusd" in err, err
        assert f"127.0.0.1:{stack.api_port}/TCP, the API's port" in err, err
        assert f"127.0.0.1:{udp}/UDP, the watchdog's port (TICKSTACK_WATCHDOG_PORT)" in err, err
        assert f"`.venv/bin/circusctl --endpoint {stack.endpoint} --timeout 120 quit --waiting`" in err, err
        assert "kill" not in err, err
        for pid in gunicorns:
            assert not re.search(rf"\bpid {pid}\b", err), (pid, err)
        # Named (it holds the UDP port) but only as that circusd's process: not a line of its own.
        assert not any(line.startswith(f"  - pid {p} ") for p in plugins for line in err.splitlines()), err
        # In the stack's own home, run without the venv on PATH (`.venv/bin/python -m db prepare`), it
        # said that `python` on PATH lacks our packages, not that the stack runs already.
        again = prepare({**stack.env, "PATH": "/usr/bin:/bin"})
        assert again.returncode == 1 and f"tickstack is already running in {stack.home}" in again.stderr, again.stderr

        quit_ = run_as_printed(backticked(err, "quit"))
        assert quit_.returncode == 0 and "ok" in quit_.stdout, quit_.stdout + quit_.stderr
        assert stack.wait_exit(90) == 0
        wait_for("the ports let go", lambda: port_free(stack.api_port) and port_free(udp, socket.SOCK_DGRAM),
                 timeout=60)
        done = prepare(env)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        remove_home(home)


@DATABASE_INDEPENDENT
def test_a_circusd_whose_control_socket_a_second_one_removed_is_named_with_how_to_stop_it(
        stack: CircusStack) -> None:
    """A new user's second ``circusd circus.ini`` is refused by circus: "pid file ... is stale, current pid
    N" (N its own pid). They remove the pid file and try again: that circusd binds the control and
    pub/sub sockets over the running stack's, fails on the API's port and exits, removing them. The
    stack runs on, out of circusctl's and the console's reach; `make run` refused with "free those
    ports first" and no way to stop it, the console and the API said "circusd is not running ...
    start the stack with `make run`" and doctor found no problem (a new user's run of the README,
    round 37). Each now names that circusd and its graceful stop, which works as printed."""
    stack.start()
    (stack.home / "run" / "circusd.pid").unlink()
    status, out = test_supervision.plain_circusd(stack.env)
    assert status not in (None, 0), out  # circus's own "Could not bind": not ours to word
    assert not (stack.home / "run" / "circus.sock").exists()
    assert stack.proc.poll() is None  # the stack runs on

    refused = prepare(stack.env)
    err = refused.stderr
    assert refused.returncode == 1, refused.stdout + err
    assert f"pid {stack.proc.pid} (" in err and "control socket" in err, err
    assert "free those ports first" not in err, err

    with pytest.raises(CircusError) as told:  # the console's and the API's words
        Circus(stack.endpoint, timeout=2).call("status")
    assert f"circusd pid {stack.proc.pid}" in str(told.value) and "`kill " in str(told.value), told.value
    assert "start the stack with `make run`" not in str(told.value), told.value
    doctor = subprocess.run([sys.executable, "-m", "db", "doctor"], env=stack.env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert doctor.returncode == 1 and f"circusd pid {stack.proc.pid}" in doctor.stdout, doctor.stdout

    stop = run_as_printed(backticked(err, "kill"))
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert stack.wait_exit(90) == 0  # circus's SIGTERM is its graceful quit: every watcher stopped
    assert prepare(stack.env).returncode == 0


@DATABASE_INDEPENDENT
def test_another_projects_circusd_with_this_home_in_its_environment_is_not_offered_a_kill(
        stack: CircusStack) -> None:
    """A circusd of another project, started from a shell whose profile exports this stack's
    ``TICKSTACK_HOME``, holding the API's port: its environment alone made it "circusd pid N of this
    stack ... `kill N`" for make run and doctor (review of round 37). Only a circusd whose command
    line names a tickstack circus.ini is ours; this one is another circusd, with no kill offered."""
    other = Path(tempfile.mkdtemp(prefix="ts-other-"))
    try:
        other.chmod(0o700)
        (other / "other.ini").write_text(
            f"[circus]\nendpoint = ipc://{other}/c.sock\npubsub_endpoint = ipc://{other}/p.sock\n"
            "statsd = False\n\n[watcher:idle]\ncmd = sleep 600\n\n"
            f"[socket:web]\nhost = 127.0.0.1\nport = {stack.api_port}\n")
        daemon = Circusd(stack.env, other / "other.ini", cwd=other, call_timeout=10)
        daemon.endpoint = f"ipc://{other}/c.sock"
        daemon.start(wait_active=("idle",))
        try:
            refused = prepare(stack.env)
            assert refused.returncode == 1, refused.stdout + refused.stderr
            err = refused.stderr
            assert f"pid {daemon.proc.pid} (" in err and f"{stack.api_port}/TCP" in err, err
            assert "of this stack" not in err and f"`kill {daemon.proc.pid}`" not in err, err
            doctor = subprocess.run([sys.executable, "-m", "db", "doctor"], env=stack.env, cwd=ROOT,
                                    capture_output=True, text=True, timeout=120)
            assert f"kill {daemon.proc.pid}" not in doctor.stdout, doctor.stdout
            assert f"circusd pid {daemon.proc.pid} of this stack" not in doctor.stdout, doctor.stdout
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(other, ignore_errors=True)


@DATABASE_INDEPENDENT
def test_a_port_held_by_a_gunicorn_run_by_hand_names_its_master(stack: CircusStack) -> None:
    """Outside circus, the owner of a listening socket is its topmost holder: gunicorn's master,
    never one of its workers (which the master would only replace)."""
    from testkit.gunicorn import serving

    with serving(stack.env, "console", ready_path="/console/login") as served:
        master = psutil.Process(served.proc.pid)
        workers = wait_for("the workers", lambda: len(c := master.children()) == 2 and c, timeout=60)
        env = {**stack.env, "TICKSTACK_CONSOLE_PORT": str(served.port)}
        refused = prepare(env)
        err = refused.stderr
        assert refused.returncode == 1, refused.stdout + err
        assert f"  - pid {master.pid} (" in err and f"`kill {master.pid}`" in err, err
        assert f"127.0.0.1:{served.port}/TCP, the console's port" in err, err
        for worker in workers:
            assert not re.search(rf"\bpid {worker.pid}\b|\b{worker.pid}`", err), (worker.pid, err)


def _home_with_pubsub_path_of(length: int) -> Path:
    """A new runtime folder whose circus-pubsub.sock (circus.ini's longest ipc:// path, 7 bytes
    longer than the writer's writer.sock) is ``length`` bytes long."""
    base = new_home()
    tail = len(os.fsencode(f"/{'x'}/run/circus-pubsub.sock")) - 1
    home = base / ("h" * (length - len(os.fsencode(str(base))) - tail))
    assert len(os.fsencode(f"{home}/run/circus-pubsub.sock")) == length
    home.mkdir(mode=0o700)  # made, as a user's is: on PostgreSQL the home's own database is keyed by it
    return home


@DATABASE_INDEPENDENT_PATHS
def test_prepare_refuses_a_home_too_long_for_circus_sockets_and_circus_runs_at_the_limit() -> None:
    """`python -m db prepare` checked the writer's socket only: circus's sockets (circus-pubsub.sock
    is the longest) are longer, so a home that passed could not run circusd. At 107 bytes, the
    limit, circusd runs the stack; at 108 prepare refuses, naming that socket."""
    over = _home_with_pubsub_path_of(108)
    fits = _home_with_pubsub_path_of(107)
    daemon: Circusd | None = None
    try:
        env = isolated_env(over, ports=True)
        refused = prepare(env)
        pubsub = f"{over}/run/circus-pubsub.sock"
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"{pubsub!r} is 108 bytes, over the 107-byte limit" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr, refused.stderr

        env = isolated_env(fits, ports=True)
        done = prepare(env)
        assert done.returncode == 0, done.stdout + done.stderr
        daemon = Circusd(env, "circus.ini")
        daemon.start(wait_active=("writer",))
        assert Path(f"{fits}/run/circus-pubsub.sock").is_socket()
    finally:
        if daemon is not None:
            daemon.stop()
        for home in (over, fits):
            shutil.rmtree(home.parent, ignore_errors=True)


@DATABASE_INDEPENDENT_PATHS
@pytest.mark.parametrize("written", ["~/var", "var", " "], ids=["tilde", "relative", "blank"])
def test_prepare_refuses_a_home_circus_ini_cannot_use_as_written(written: str) -> None:
    """circus.ini takes TICKSTACK_HOME as it is written (``$(circus.env.TICKSTACK_HOME)/log/...``):
    circus expands no ``~`` and reads a relative path from its own folder. A home of ``~/var`` passed
    prepare (which expands it, and made that folder) and circusd then died on a traceback, opening
    ``<checkout>/~/var/log/circusd.log``. Refused now, naming the absolute path, making nothing."""
    user_home = Path(tempfile.mkdtemp(prefix="ts-user-"))
    base = new_home()  # the stack's environment (and on PostgreSQL its database) is made for a home
    try:
        env = isolated_env(base, ports=True)
        env.update(HOME=str(user_home), TICKSTACK_HOME=written)
        refused = prepare(env)
        expanded = (user_home / "var") if written.startswith("~") else (ROOT / "var")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        if written.strip():
            assert (f"TICKSTACK_HOME={written!r}: circus.ini uses it as written" in refused.stderr
                    and f"give its absolute path ({expanded})" in refused.stderr), refused.stderr
        else:  # our processes take a blank one as unset (the default); circus as "" (/log/circusd.log)
            assert (f"TICKSTACK_HOME is set but blank: circus.ini uses it as written; unset it (the default is "
                    f"{expanded})") in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert list(user_home.iterdir()) == []
    finally:
        shutil.rmtree(user_home, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def test_a_refused_make_run_leaves_no_folders_in_a_home_it_would_have_made() -> None:
    """prepare made the home and its five folders, then refused (a port taken): a user who chose a
    new home found it made, empty, with nothing run. Made only once nothing refuses now."""
    base = new_home()
    api = socket.socket()
    try:
        env = isolated_env(base, ports=True)
        home = base / "not-made-yet"
        env["TICKSTACK_HOME"] = str(home)
        api.bind(("127.0.0.1", int(env["TICKSTACK_API_PORT"])))
        api.listen()
        refused = prepare(env)
        assert refused.returncode == 1 and "the API's port" in refused.stderr, refused.stdout + refused.stderr
        assert not home.exists()
        api.close()
        done = prepare(env)
        assert done.returncode == 0 and home.is_dir() and (home / "log" / "circusd.log").is_file(), done.stderr
    finally:
        api.close()
        shutil.rmtree(base, ignore_errors=True)


def _prepare_started(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """``python -m db prepare`` (as ``make run`` runs it), once it says it waits for a stack stopping."""
    proc = subprocess.Popen([sys.executable, "-m", "db", "prepare"], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    return proc, first


@DATABASE_INDEPENDENT
@pytest.mark.parametrize("command", ["quit", "stop"])
def test_make_run_while_circus_stops_watchers_waits_for_a_quit_and_refuses_a_stop(stack: CircusStack,
                                                                                   command: str) -> None:
    """``circusctl quit`` (without ``--waiting``) answers while circus stops the watchers: a ``make run``
    then was refused, "tickstack is already running", a second before it would not have been (a new
    user's first hour). ``prepare`` now waits while circus stops watchers and starts once circusd has
    exited. A stop of the watchers (or a restart) leaves circusd running: that is refused once the
    stop is done, not after the whole wait (a review found it waited 60 s, then refused). The jobs
    worker is held (SIGSTOP) through the stop, so ``prepare`` meets it stopping whatever the timing."""
    stack.start()
    (held,) = stack.pids_of("jobs")
    os.kill(held, signal.SIGSTOP)
    try:
        asked = stack.circusctl(command)
        assert asked.returncode == 0 and "ok" in asked.stdout, asked.stdout + asked.stderr
        proc, first = _prepare_started(stack.env)
        assert f"tickstack in {stack.home} is stopping watchers (circusd pid {stack.proc.pid}); waiting" in first, \
            first + (proc.stderr.read() if proc.stderr else "")
    finally:
        os.kill(held, signal.SIGCONT)  # its SIGTERM, pending, then ends it
    out, err = proc.communicate(timeout=45)  # well within the wait's 60 s: a stop is refused when done
    if command == "quit":
        assert proc.returncode == 0 and "already running" not in err, out + err
        assert stack.wait_exit(90) == 0
    else:
        assert proc.returncode == 1 and f"tickstack is already running in {stack.home}" in err, out + err
        assert stack.proc.poll() is None
