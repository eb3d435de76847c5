"""The console's password file (``$TICKSTACK_HOME/admin-password``) follows the same rule as
``TICKSTACK_ADMIN_PASSWORD``, and a bad one never crash-loops the console.

A file that is empty, blank, shorter than the variable's minimum or unreadable used to be either
accepted (3 characters) or fatal: ``read_or_create_secret`` raised in every gunicorn worker, the
workers failed to boot, gunicorn exited and circus respawned it until its flapping plugin gave up,
the reason only inside a traceback in ``console.log``. Now the console starts, logs one line per
worker saying which file is wrong, what is wrong and how to fix it, shows that on the login page,
and refuses every login (throttled as any other) until the file is fixed and the console restarted.

Real processes: the console's own gunicorn command line from ``circus.ini``
(:func:`testkit.gunicorn.serving`) and a real writer for the audit log, one for the module; each
case rewrites the password file and starts a new gunicorn, as an administrator fixing it would.
"""
from __future__ import annotations

import html
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from db.config import SETTING_BY_ENV, ConfigError
from testkit.gunicorn import Served, serving
from testkit.helpers import wait_for
from testkit.writer import Stack
from tests.test_web_faults import Browser
from webapp.auth_state import Schedule

pytestmark = pytest.mark.database_independent(
    "the console reads its password file before it opens any database, and a refused login is audited by "
    "the same audit op either way")

BOOT_LINE = "Booting worker"
#: The restart the message asks for, runnable as printed (tests/test_circusctl_hints.py).
RESTART = r"\.venv/bin/circusctl --endpoint ipc://\S+/run/circus\.sock --timeout \d+ restart console --waiting"
#: Text of a good password (its length is set per test from the variable's rule).
GOOD = "Good-Password-Of-Enough-Length-"


def variable_minimum() -> int:
    """The fewest characters ``TICKSTACK_ADMIN_PASSWORD`` may have, from its own rule's refusal."""
    with pytest.raises(ConfigError) as refused:
        SETTING_BY_ENV["TICKSTACK_ADMIN_PASSWORD"].parse("TICKSTACK_ADMIN_PASSWORD", "x")
    return int(re.search(r"at least (\d+) characters", str(refused.value)).group(1))


MINIMUM = variable_minimum()


@pytest.fixture(scope="module")
def wstack() -> Iterator[Stack]:
    """A writer, so that each refused login is audited at once (not after the audit deadline)."""
    st = Stack.create()
    try:
        st.start_writer()
        yield st
    finally:
        for proc in st.procs:
            st.stop(proc)
        st.close()


@pytest.fixture
def fresh(wstack: Stack) -> Stack:
    """The module's stack with no password file, and no failed logins nor sessions left by another test."""
    home = wstack.home
    path = home / "admin-password"
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    for name in ("console-login-throttle.json", "console-sessions.json"):
        (home / "run" / name).unlink(missing_ok=True)
    return wstack


@contextmanager
def console(stack: Stack) -> Iterator[tuple[Served, Browser, Path]]:
    """The console's gunicorn (as circus runs it), a browser on it, and the log file it writes;
    yields once ``/console/health`` answers 200 (raises if gunicorn exits first)."""
    log_path = stack.home / "log" / "console-test.log"
    log_path.unlink(missing_ok=True)  # this start's log only
    with serving(stack.env, "console", "/console/health") as served:
        yield served, Browser(served.port), log_path


def page_text(body: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", body))


# (what the file holds, a pattern of what the message says is wrong, the password it holds if any)
BAD_FILES = {
    "three-characters": (b"Kx9\n", r"is too short", "Kx9"),
    "one-short-of-the-variables-minimum": (("Qv" * MINIMUM)[:MINIMUM - 1].encode() + b"\n",
                                           r"is too short", ("Qv" * MINIMUM)[:MINIMUM - 1]),
    "empty": (b"", r"is empty", None),
    "only-whitespace": (b"  \n\t \n", r"is empty", None),
    "not-text": (b"\xff\xfe\xfa-not-utf8-Zr4\n", r"cannot be read", "Zr4"),
    "a-folder": (None, r"cannot be read", None),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_password_file_starts_the_console_that_refuses_every_login_and_says_why(fresh: Stack,
                                                                                       case: str) -> None:
    content, wrong, password = BAD_FILES[case]
    path = fresh.home / "admin-password"
    if content is None:
        path.mkdir(mode=0o700)
    else:
        path.write_bytes(content)
        path.chmod(0o600)
    expected = [re.escape(str(path)), wrong, rf"at least {MINIMUM} characters", r"delete it",
                RESTART]

    with console(fresh) as (served, browser, log_path):  # today: "gunicorn exited with 3"
        # The login page says what is wrong with which file, and how to fix it.
        status, _, body = browser.request("GET", "/console/login")
        assert status == 200
        for pattern in expected:
            assert re.search(pattern, page_text(body)), (pattern, page_text(body)[:2000])
        # Nothing of the password itself on this page, which needs no login: not even its length (a
        # new user's run, round 44: "too short (5 characters)").
        assert not re.search(r"\(\d+ characters\)", page_text(body)), page_text(body)[:2000]

        # No password gets in, not even the file's own; each attempt is throttled as any failed login.
        tries = [password or "whatever", GOOD + "x" * MINIMUM, ""]
        for i in range(Schedule().free):
            status, headers, body = browser.login(tries[i % len(tries)])
            assert status == 503 and "Location" not in headers, (status, body[:500])
            assert re.search(wrong, page_text(body)) and re.search(RESTART, page_text(body))
        status, headers, body = browser.login(password or "whatever")
        assert status == 429 and int(headers["Retry-After"]) > 0, (status, body[:500])

        # Nothing that needs a login is served; what needs none still is.
        status, headers, _ = browser.request("GET", "/console/watchers")
        assert status == 302 and headers["Location"].startswith("/console/login")
        assert browser.request("GET", "/console/api/watchers")[0] == 401
        assert browser.request("GET", "/console/health")[0] == 200
        assert served.proc.poll() is None  # gunicorn is still up

        # One clear line per worker in the log: no traceback, no respawned worker, never the password.
        # (A worker logs its line once it has loaded the app, after the master logged its boot: wait
        # for the two counts to meet, as a busy machine may not have got there yet.)
        def refusals() -> tuple[str, list[str]] | None:
            log = log_path.read_text(errors="replace")
            found = [line for line in log.splitlines() if str(path) in line and "refuse" in line]
            return (log, found) if found and len(found) == log.count(BOOT_LINE) else None

        log, lines = wait_for("one refusal line per booted worker", refusals, timeout=60)
        for pattern in expected:
            assert all(re.search(pattern, line) for line in lines), (pattern, lines)
        assert "Traceback" not in log and "Worker failed to boot" not in log, log[-3000:]
        if password:
            assert password not in log


def test_a_file_fixed_to_the_variables_minimum_lets_the_owner_in_after_a_restart(fresh: Stack) -> None:
    path = fresh.home / "admin-password"
    short = GOOD[:MINIMUM - 1]
    path.write_text(short + "\n")
    path.chmod(0o600)
    with console(fresh) as (_, browser, _log):
        assert browser.login(short)[0] == 503

    # Fixed as the message says: a password of exactly the minimum, then a restart. The file is
    # readable by others (0644): accepted, with a warning (today's behaviour).
    good = GOOD[:MINIMUM]
    path.write_text(good + "\n")
    path.chmod(0o644)
    with console(fresh) as (_, browser, log_path):
        status, _, body = browser.request("GET", "/console/login")
        assert status == 200 and not re.search(RESTART, page_text(body))
        assert browser.login("not the password, but long enough")[0] == 200
        status, headers, _ = browser.login(good)
        assert status == 302 and headers["Location"] == "/console/watchers"
        assert browser.request("GET", "/console/watchers")[0] == 200
        log = log_path.read_text(errors="replace")
        assert "is open to other users (mode 644)" in log and "chmod 600" in log
        assert "refuse" not in log and "Traceback" not in log and good not in log


def test_the_generated_password_line_carries_gunicorns_time_pid_and_level(fresh: Stack) -> None:
    """The console's own log lines go through gunicorn's error log as the API's do: they had no time,
    pid nor level (Python's last-resort handler, which also dropped every INFO line of the console)."""
    with console(fresh) as (_, _browser, log_path):
        def generated() -> str | None:
            lines = log_path.read_text(errors="replace").splitlines()
            return next((line for line in lines if "generated the password" in line), None)

        line = wait_for("the console's generated-password line", generated, timeout=60)
    assert re.fullmatch(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[WARNING\] console: generated the "
                        r"password of user 'admin' into \S+/admin-password \(mode 0600\); log in with it", line), line
