"""Every circusctl command the stack prints for its user runs as printed, from the checkout, without
the venv activated: `.venv/bin/circusctl --endpoint ipc://.../circus.sock ...`. A bare `circusctl`
is "command not found" there, and without the endpoint circusctl talks to tcp://127.0.0.1:5555,
never to this stack. Real circusd with the real circus.ini; each hint is run as a user pastes it.
"""
from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import threading
from html import unescape
from pathlib import Path

import pytest

from db.health import diagnose
from testkit.circus import CircusStack
from testkit.env import ROOT
from testkit.gunicorn import get_json
from testkit.helpers import ConsoleClient, backticked, run_as_printed, wait_for
from testkit.writer import no_writer_words
from tests.test_supervision import prepare
from webapp import create_app

#: The tests of this module whose promise is the same whatever the database (tests/conftest.py).
DATABASE_INDEPENDENT = pytest.mark.database_independent(
    "it reads the code's string literals and the console's templates, and starts nothing")

#: The modules that print hints (command lines, logs, the console's messages).
HINTING = [*sorted((ROOT / "db").glob("*.py")), *sorted((ROOT / "supervision").glob("*.py")),
           *sorted((ROOT / "webapp").rglob("*.py"))]
#: The console's pages, read as text: a hint there is markup, not a string literal.
TEMPLATES = sorted((ROOT / "webapp" / "templates").rglob("*.html"))
#: circusctl as printed anywhere but from the venv's bin: an offender.
BARE = re.compile(r"(?<!\.venv/bin/)\bcircusctl\b")


def _texts(path: Path) -> list[str]:
    """Every string literal of ``path`` (f-strings' literal parts too), docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


@DATABASE_INDEPENDENT
def test_no_hint_names_a_bare_circusctl() -> None:
    found = [(path.relative_to(ROOT).as_posix(), text) for path in HINTING for text in _texts(path)
             if BARE.search(text)]
    found += [(path.relative_to(ROOT).as_posix(), line.strip()) for path in TEMPLATES
              for line in path.read_text().splitlines() if BARE.search(line)]
    assert found == []


def doctor_run(stack: CircusStack) -> subprocess.CompletedProcess:
    """``python -m db doctor`` in the stack's environment."""
    return subprocess.run([sys.executable, "-m", "db", "doctor"], env=stack.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def circusctl_each(stack: CircusStack, *commands: tuple[str, ...]) -> None:
    """Each circusctl command in turn, each answered ok."""
    for args in commands:
        done = stack.circusctl(*args)
        assert done.returncode == 0, (args, done.stdout + done.stderr)


def test_the_circusctl_hints_of_make_run_doctor_and_health_run_as_printed() -> None:
    stack = CircusStack()
    try:
        first = prepare(stack.env)  # what `make run` prints before circusd takes the terminal
        assert first.returncode == 0, first.stdout + first.stderr
        status_hint = backticked(first.stdout, "status")
        quit_hint = backticked(first.stdout, "quit")
        ready = next(line for line in first.stdout.splitlines() if line.startswith("ready "))
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/api/health", ready).group(1))
        assert str(stack.home / "log" / "circusd.log") in ready, ready
        stack.start()
        # What "ready" says to watch says so once the stack runs.
        wait_for("the printed health URL to say ok", lambda: get_json(port, "/api/health")[1].get("status") == "ok",
                 timeout=60)

        status = run_as_printed(status_hint)
        assert status.returncode == 0 and "writer: active" in status.stdout, (status_hint, status.stdout,
                                                                              status.stderr)
        again = prepare(stack.env)  # a second `make run`: already running, and how to manage it
        assert again.returncode == 1 and "already running" in again.stderr, again.stderr
        status = run_as_printed(backticked(again.stderr, "status"))
        assert status.returncode == 0 and "writer: active" in status.stdout, (again.stderr, status.stdout,
                                                                              status.stderr)

        # Workers circus stopped (its flapping plugin, after their processes kept exiting: a REVOKE of the
        # readers' SELECT in the PostgreSQL fault hunt) stay stopped once the cause is mended: doctor said
        # every check was ok. It names them, with the commands that start them.
        for name in ("analysis", "monitor"):
            stopped = stack.circusctl("stop", name, "--waiting")
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        doctor = doctor_run(stack)
        advice = next((line for line in doctor.stdout.splitlines() if "circus runs no process of" in line), None)
        assert advice is not None, doctor.stdout
        assert advice.startswith("[WARN] circus runs no process of analysis, monitor: "), advice
        for name in ("analysis", "monitor"):
            start = run_as_printed(backticked(advice, f"start {name}"))
            assert start.returncode == 0 and "ok" in start.stdout, (advice, start.stdout, start.stderr)
            assert stack.status()[name] == "active", stack.status()
        # A worker told to run no process (`decr` to 0) is active to circus with none: /api/health said
        # degraded, "0 of 1 processes (circus was asked for 0)", and doctor "No problem found" (a new
        # user's run of the README, round 47). It names it, with the command that gives it one again.
        decr = stack.circusctl("decr", "analysis", "--waiting")
        assert decr.returncode == 0, decr.stdout + decr.stderr
        wait_for("no analysis process", lambda: stack.pids_of("analysis") == [], timeout=90)
        doctor = doctor_run(stack)
        advice = next((line for line in doctor.stdout.splitlines() if "asked for 0 processes" in line), None)
        assert advice is not None and advice.startswith("[WARN] circus was asked for 0 processes of analysis"), \
            doctor.stdout
        one = run_as_printed(backticked(advice, "set analysis numprocesses 1"))
        assert one.returncode == 0 and "ok" in one.stdout, (advice, one.stdout, one.stderr)
        wait_for("an analysis process again", lambda: stack.pids_of("analysis") != [], timeout=60)
        # Stopped and at 0: a start alone answers ok and runs nothing, so the number comes first (review, round 47).
        circusctl_each(stack, ("set", "monitor", "numprocesses", "0"), ("stop", "monitor", "--waiting"))
        doctor = doctor_run(stack)
        advice = next(line for line in doctor.stdout.splitlines() if "circus runs no process of monitor" in line)
        assert "asked for 0 processes" not in doctor.stdout, doctor.stdout  # said once, in the stopped line
        for command in (backticked(advice, "set monitor numprocesses 1"), backticked(advice, "start monitor")):
            done = run_as_printed(command)
            assert done.returncode == 0 and "ok" in done.stdout, (advice, done.stdout, done.stderr)
        wait_for("a monitor process again", lambda: stack.pids_of("monitor") != [], timeout=60)
        assert stack.status()["monitor"] == "active", stack.status()

        stopped = stack.circusctl("stop", "writer", "--waiting")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        doctor = doctor_run(stack)
        advice = next(line for line in doctor.stdout.splitlines() if "writer is not running" in line)
        # The console's database page gives doctor's advice: it offered `make run` beside it, which
        # refuses while circusd runs (a new user's run of the README, round 37).
        page = unescape(ConsoleClient.logged_in(create_app("console", stack.settings)).get("/console/database").text)
        assert advice.split("] ", 1)[1] in page and "make run" not in page, page[-3000:]
        # A client's (a bot's WARNING, /api/health, the API's 503) says the same command, not `make run`,
        # which refuses while circusd runs; with circusd gone too, `make run` alone (test_first_contact).
        told = no_writer_words(stack.settings)
        assert "make run" not in told and backticked(told, "start writer") == backticked(advice, "start writer"), \
            (told, advice)
        start = run_as_printed(backticked(advice, "start writer"))
        assert start.returncode == 0 and "ok" in start.stdout, (advice, start.stdout, start.stderr)
        wait_for("the writer started as printed", lambda: stack.status()["writer"] == "active", timeout=60)
        # Told to run no writer (`set writer numprocesses 0`): `start writer` answered ok and started
        # none, and doctor gave it again (fault hunt as an operator); a singleton refuses `incr`.
        none = stack.circusctl("set", "writer", "numprocesses", "0")
        assert none.returncode == 0, none.stdout + none.stderr
        wait_for("no writer process", lambda: stack.pids_of("writer") == [], timeout=90)
        doctor = doctor_run(stack)
        advice = next(line for line in doctor.stdout.splitlines() if "writer is not running" in line)
        one = run_as_printed(backticked(advice, "set writer numprocesses 1"))
        assert one.returncode == 0 and "ok" in one.stdout, (advice, one.stdout, one.stderr)
        wait_for("a writer again", lambda: stack.pids_of("writer") != [], timeout=60)
        wait_for("the writer active again", lambda: stack.status()["writer"] == "active", timeout=60)
        # At 0 and stopped (a restart or a stop of it since): the number alone starts nothing, so the
        # advice starts it too (review of round 36).
        circusctl_each(stack, ("set", "writer", "numprocesses", "0"), ("stop", "writer", "--waiting"))
        doctor = doctor_run(stack)
        advice = next(line for line in doctor.stdout.splitlines() if "writer is not running" in line)
        # The console's disabled Start says so too, with that command: it said "+1 process first", a
        # button the console offers no singleton (round 36's operator hunt, left then).
        console = ConsoleClient.logged_in(create_app("console", stack.settings))
        for page in ("/console/watchers", "/console/watchers/writer"):
            html = unescape(console.get(page).text)
            start = re.search(r'disabled title="(Start: circus runs writer with 0 processes[^"]*)"', html)
            assert start is not None and "+1" not in start.group(1), (page, html[-3000:])
            assert backticked(start.group(1), "set writer numprocesses 1") == \
                backticked(advice, "set writer numprocesses 1"), (start.group(1), advice)
        for needle in ("set writer numprocesses 1", "start writer"):
            done = run_as_printed(backticked(advice, needle))
            assert done.returncode == 0 and "ok" in done.stdout, (advice, done.stdout, done.stderr)
        wait_for("the writer active once more", lambda: stack.status()["writer"] == "active" and
                 stack.pids_of("writer") != [], timeout=60)

        for snap, needle in (({"writer": {"up": False, "pid": 1}}, "restart writer"),
                             ({"writer": {"up": False}}, "start writer")):
            (level, text), = diagnose(snap, stack.settings)
            before = stack.pids_of("writer")
            if needle == "restart writer":
                # The stuck writer this hint is printed for: stopped, it drains only once it runs
                # again, so the restart takes longer than circusctl's own 5 s time-out.
                os.kill(before[0], signal.SIGSTOP)
                threading.Timer(6, os.kill, (before[0], signal.SIGCONT)).start()
            done = run_as_printed(backticked(text, needle))
            assert done.returncode == 0 and "ok" in done.stdout, (text, done.stdout, done.stderr)
            # The hint waits until its command is done (--waiting): without it circusctl answered
            # at once, and circus refused the next command until the restart was done ("arbiter is
            # already running watcher_restart command").
            assert "--waiting" in text, text
            assert stack.status()["writer"] == "active", (text, stack.status())
            assert needle != "restart writer" or stack.pids_of("writer") not in ([], before), (before, text)

        quit_ = run_as_printed(quit_hint)
        assert quit_.returncode == 0 and "ok" in quit_.stdout, (quit_hint, quit_.stdout, quit_.stderr)
        assert stack.wait_exit(90) == 0
    finally:
        stack.close()


def test_a_restart_of_the_writer_waits_until_it_serves_and_a_second_one_stops_it_gracefully() -> None:
    """`circusctl restart writer --waiting` returned once circus had started the new process, before
    it answered (its "ready" came 0.26 s later), and a second restart right after killed it while it
    still started: "writer pid N was killed by SIGTERM (signal 15) as it was stopped", never ready (a
    new user's run of the README, round 37, 4 times of 4). The README says a change waits until it is
    done: the writer's start now ends once it answers."""
    from db.lock import read_lock_holder

    stack = CircusStack()
    try:
        stack.start()
        for _ in range(2):
            done = stack.circusctl("restart", "writer", "--waiting")
            assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr
            (pid,) = stack.pids_of("writer")
            # Done means serving: its ready line is written and it holds the lock.
            assert f"writer ready: pid {pid}," in stack.log("writer"), stack.log("writer")[-3000:]
            assert read_lock_holder(stack.settings.writer_lock_path) == pid
        assert "killed by SIGTERM" not in stack.circusd_log(), stack.circusd_log()[-3000:]
    finally:
        stack.close()

