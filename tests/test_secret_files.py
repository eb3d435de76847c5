"""An unusable ``api-token`` or ``secret-key`` file in ``$TICKSTACK_HOME`` never stops the API or the
console: each starts, refuses only what needs the secret, and says which file is wrong, what is wrong
with it and how to fix it (as ``admin-password`` already did: tests/test_console_password_file.py).

Before, ``read_or_create_secret`` raised in every gunicorn worker (``ConfigError: ...api-token is
empty``; ``IsADirectoryError`` for a folder) and blocked for ever on a FIFO: the workers failed to
boot, gunicorn exited, circus respawned it until "flapping detected", and the port refused
connections. Now: the API serves reads and answers every write 503 ``token_file_unusable`` naming the
file; the console (which cannot sign a session or a form without its key) answers every page but
``/console/health`` 503 naming the file. No file is ever written over.

The app's own behaviour through Flask's test client, one writer for the module; the start under the
real gunicorn command lines of ``circus.ini`` (:func:`testkit.gunicorn.serving`) for one case each.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from db.config import load_settings
from testkit.gunicorn import serving
from testkit.helpers import wait_for
from testkit.writer import Stack
from tests.test_console_password_file import page_text, wstack  # noqa: F401 - wstack: the module's writer, a fixture
from tests.test_web_faults import Browser
from webapp import create_app

pytestmark = pytest.mark.database_independent(
    "the secret files are read when the app is made, before any database is opened; the reads served "
    "meanwhile are the same reads either way")

#: The restart each message asks for, runnable as printed (tests/test_circusctl_hints.py).
RESTART = r"\.venv/bin/circusctl --endpoint ipc://\S+/run/circus\.sock --timeout \d+ restart {} --waiting"
#: A case: how the bad file is made in place of the secret, and what the message says is wrong.
BAD_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty": (lambda p: p.write_bytes(b""), r"is empty"),
    "only-whitespace": (lambda p: p.write_bytes(b" \n\t\n"), r"is empty"),
    "not-text": (lambda p: p.write_bytes(b"\xff\xfe-not-utf8\n"), r"cannot be read \(it is not UTF-8 text\)"),
    "a-folder": (lambda p: p.mkdir(mode=0o700), r"cannot be read \(it is a folder, not a regular file\)"),
    "a-fifo": (lambda p: os.mkfifo(p, 0o600), r"cannot be read \(it is a FIFO \(named pipe\), not a regular file\)"),
}
#: How long making an app may take before it counts as blocked (on a FIFO).
BLOCKED_AFTER = 10.0


def bad_file(stack: Stack, name: str, case: str) -> Path:
    """``$TICKSTACK_HOME/name`` replaced by the bad file of ``case``."""
    path = stack.home / name
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    BAD_FILES[case][0](path)
    return path


def snapshot(path: Path) -> tuple[int, bytes | None]:
    """What is at ``path``: its type and, for a regular file, its bytes (read without blocking)."""
    mode = os.lstat(path).st_mode
    return (mode & 0o170000, path.read_bytes() if path.is_file() else None)


def made_in_time(kind: str, env: dict[str, str], fifo: Path) -> Flask:
    """``create_app(kind)``, which must not block: on a FIFO the old code waited for a writer for ever.
    After :data:`BLOCKED_AFTER` s the FIFO gets a writer (so the thread ends) and the test fails."""
    made: dict[str, object] = {}

    def make() -> None:
        try:
            made["app"] = create_app(kind, load_settings(env))
        except BaseException as e:  # reported below
            made["error"] = e

    thread = threading.Thread(target=make, daemon=True)
    thread.start()
    thread.join(BLOCKED_AFTER)
    if thread.is_alive():
        try:  # a writer that goes away at once: the blocked open returns and reads nothing
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as e:
            assert e.errno in (errno.ENXIO, errno.ENOENT), e
        thread.join(BLOCKED_AFTER)
        pytest.fail(f"create_app({kind!r}) blocked on {fifo} for {BLOCKED_AFTER:g} s")
    if "error" in made:
        raise made["error"]  # type: ignore[misc]
    return made["app"]  # type: ignore[return-value]


def json_error(response: object, status: int, code: str) -> str:
    """The message of the API's one error body, after checking its status and code."""
    assert response.status_code == status, response.get_data(as_text=True)  # type: ignore[attr-defined]
    body = response.get_json()  # type: ignore[attr-defined]
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"} and body["error"]["code"] == code, body
    return body["error"]["message"]


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_an_unusable_api_token_file_starts_the_api_that_serves_reads_and_refuses_writes_saying_why(
        wstack: Stack, case: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    monkeypatch.delenv("TICKSTACK_API_TOKEN", raising=False)
    path = bad_file(wstack, "api-token", case)
    before = snapshot(path)
    wrong = BAD_FILES[case][1]
    with caplog.at_level(logging.INFO, logger="tickstack.api"):
        client = made_in_time("api", wstack.env, path).test_client()  # today: ConfigError, IsADirectoryError, blocked

    # Reads are served ...
    assert client.get("/api/ticks", query_string={"symbol": "BTCUSD"}).status_code == 200
    assert client.get("/api/health").status_code == 200
    assert client.get("/api/openapi.json").status_code == 200
    # ... every write is refused, whatever token is sent, naming the file, what is wrong and the fix.
    tick = {"ticks": [{"symbol": "BTCUSD", "ts": 1_704_067_200_000, "bid": 1.0, "ask": 1.0}]}
    message = json_error(client.post("/api/ticks", json=tick, headers={"Authorization": "Bearer anything-0123"}),
                         503, "token_file_unusable")
    for pattern in (re.escape(str(path)), wrong, r"delete it", RESTART.format("api")):
        assert re.search(pattern, message), (pattern, message)
    # A client that sent no token is told it needs one, not where the stack's files are.
    said = json_error(client.post("/api/ticks", json=tick), 401, "unauthorized")
    assert str(wstack.home) not in said, said
    json_error(client.post("/api/trades/1/close", headers={"Authorization": "Bearer x"}), 503, "token_file_unusable")

    # Said once in the log (with the fix); the file is left as it was, never written over.
    said = [r for r in caplog.records if str(path) in r.getMessage()]
    assert len(said) == 1 and said[0].levelno >= logging.WARNING, [r.getMessage() for r in said]
    assert re.search(wrong, said[0].getMessage()) and re.search(RESTART.format("api"), said[0].getMessage())
    assert snapshot(path) == before


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_an_unusable_secret_key_file_starts_the_console_that_refuses_every_page_saying_why(
        wstack: Stack, case: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    path = bad_file(wstack, "secret-key", case)
    before = snapshot(path)
    wrong = BAD_FILES[case][1]
    with caplog.at_level(logging.INFO, logger="tickstack.console"):
        client = made_in_time("console", wstack.env, path).test_client()

    expected = (re.escape(str(path)), wrong, r"delete it", RESTART.format("console"))
    for url in ("/console/login", "/console/watchers", "/console/"):
        page = client.get(url)
        assert page.status_code == 503 and page.mimetype == "text/html", (url, page.status_code, page.text[:500])
        for pattern in expected:
            assert re.search(pattern, page_text(page.text)), (url, pattern, page_text(page.text)[:2000])
    # A login (no form could be signed, so there is no token to send) is refused the same way, not a 400 or 500.
    assert client.post("/console/login", data={"username": "admin", "password": "x" * 20}).status_code == 503
    endpoint = client.get("/console/api/watchers")
    assert endpoint.status_code == 503 and re.search(re.escape(str(path)), endpoint.get_json()["error"])
    assert client.get("/console/health").status_code == 200  # the console itself is up

    said = [r for r in caplog.records if str(path) in r.getMessage()]
    assert len(said) == 1 and said[0].levelno >= logging.WARNING, [r.getMessage() for r in said]
    assert all(re.search(p, said[0].getMessage()) for p in expected), said[0].getMessage()
    assert snapshot(path) == before

    # The API signs nothing: the same bad key file does not touch it.
    token = "a-token-of-the-environment-0123456789"
    api = made_in_time("api", {**wstack.env, "TICKSTACK_API_TOKEN": token}, path).test_client()
    tick = {"ticks": [{"symbol": "BTCUSD", "ts": 1_704_067_200_000, "bid": 1.0, "ask": 1.0}]}
    assert api.post("/api/ticks", json=tick, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert snapshot(path) == before


def test_under_gunicorn_an_empty_token_or_key_file_stops_neither_app(wstack: Stack) -> None:  # noqa: F811
    """The case of the report, as circus runs the apps: ``: > api-token`` and ``: > secret-key``, then a
    start. Both gunicorns stay up (before: "gunicorn exited with 3"), each worker logs one line naming
    the file, and no traceback."""
    token = bad_file(wstack, "api-token", "empty")
    key = bad_file(wstack, "secret-key", "empty")
    for name, watcher, ready in ((token, "api", "/api/health"), (key, "console", "/console/health")):
        log_path = wstack.home / "log" / f"{watcher}-test.log"
        log_path.unlink(missing_ok=True)
        with serving(wstack.env, watcher, ready) as served:
            browser = Browser(served.port)
            if watcher == "api":
                status, _, body = browser.request("POST", "/api/ticks")  # no token: 401 (503 only to one who sent one)
                assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized", body
                assert browser.request("GET", "/api/ticks?symbol=BTCUSD")[0] == 200
            else:
                status, _, body = browser.request("GET", "/console/login")
                assert status == 503 and str(name) in page_text(body), body[:2000]

            def said(log_path: Path = log_path, name: Path = name) -> str | None:
                log = log_path.read_text(errors="replace")
                lines = [line for line in log.splitlines() if str(name) in line and "is empty" in line]
                return log if lines and len(lines) == log.count("Booting worker") else None

            log = wait_for(f"one line per {watcher} worker naming {name}", said, timeout=60)
            assert "Traceback" not in log and "Worker failed to boot" not in log, log[-3000:]
            assert served.proc.poll() is None
        assert name.read_bytes() == b""  # never written over
