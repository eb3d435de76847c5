"""The two records a PostgreSQL writer leaves in ``run/`` (:mod:`db.server_wait`): that it waits for its
server (read by circusd's readiness hooks, on circusd's own loop) and that its server refused its login
(read by doctor, the clients' "no writer" message that ``/api/health`` shows, and circus's flapping
plugin). A review of round 42 found a file nested deeper than the recursion limit raised out of the
hooks' reader (circus then left the watcher stopped), and a refusal left before the home moved to
SQLite said to the API and circus that a server it no longer has refused the writer's login.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from db.config import load_settings
from db.run_records import MAX_RECORD_BYTES
from db.server_wait import (
    last_refusal,
    refused_file,
    say_refused,
    say_waiting,
    wait_file,
    waiting_reason,
)
from testkit.env import new_home

REFUSED = 'FATAL:  password authentication failed for user "ts_owner"'
PG_URL = "postgresql+psycopg://ts_owner:x@127.0.0.1:1/tickstack"


@pytest.mark.database_independent("the home is made SQLite's or a server's by its own settings, whatever --database")
def test_a_refused_login_left_before_the_home_moved_to_sqlite_is_not_said() -> None:
    from db.client import WriterClient
    from db.errors import WriterUnavailable
    from supervision.plugins import _last_words

    home = new_home()
    try:
        sqlite = load_settings({"TICKSTACK_HOME": str(home)})
        server = load_settings({"TICKSTACK_HOME": str(home), "DATABASE_URL": PG_URL})
        refused_file(sqlite.run_dir).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # What the home's PostgreSQL writer said as the server refused it, before the home moved to SQLite.
        say_refused(refused_file(sqlite.run_dir), PG_URL, REFUSED)
        assert last_refusal(server) is not None and "refused" in last_refusal(server)["what"]
        assert last_refusal(sqlite) is None
        client = WriterClient(settings=sqlite, deadline=4.0)
        try:
            with pytest.raises(WriterUnavailable) as raised:
                client.call("audit", actor="review", action="probe", detail="x")
        finally:
            client.close()
        assert "no writer is running" in str(raised.value) and "refused" not in str(raised.value), raised.value
        assert "refused" not in _last_words("writer")
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.database_independent("the files are read the same way whatever the database")
def test_no_file_in_place_of_a_record_raises_blocks_or_is_read_whole(tmp_path: Path) -> None:
    home = new_home()
    try:
        settings = load_settings({"TICKSTACK_HOME": str(home), "DATABASE_URL": PG_URL})
        settings.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        waiting, refused = wait_file(settings.run_dir), refused_file(settings.run_dir)
        # Well formed, they are read (so what follows can fail): this process waits, its login was refused.
        say_waiting(waiting, "the database server does not answer at postgresql+psycopg://ts_owner:***@...")
        say_refused(refused, PG_URL, REFUSED)
        assert waiting_reason(waiting, [os.getpid()]) is not None and last_refusal(settings) is not None
        assert oct(waiting.stat().st_mode & 0o777) == oct(0o600) == oct(refused.stat().st_mode & 0o777)
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        deep = json.dumps({"pid": os.getpid(), "reason": "x"})[:-1] + ', "n": ' + "[" * 100_000 + "}"
        bad = {
            "nested past the recursion limit (RecursionError)": lambda p: p.write_text("[" * 100_000),
            "a record nested past the limit": lambda p: p.write_text(deep),
            "larger than a record": lambda p: p.write_text(json.dumps({
                "pid": os.getpid(), "reason": "x" * MAX_RECORD_BYTES, "what": "x", "fix": "x", "at": 1})),
            "a symlink to a FIFO (a read would block circusd's loop)": lambda p: p.symlink_to(fifo),
            "a symlink to /dev/zero": lambda p: p.symlink_to("/dev/zero"),
            "a folder": lambda p: p.mkdir(),
            "not UTF-8": lambda p: p.write_bytes(b"\xff\xfe{"),
            "a list": lambda p: p.write_text("[1, 2]"),
            "a refusal whose time is text": lambda p: p.write_text(json.dumps({"what": "w", "fix": "f", "at": "x",
                                                                              "pid": os.getpid(), "reason": 1})),
            # doctor shows the time as a date: one past the year 5138, or NaN, stopped it (OverflowError)
            "a refusal whose time no date can show": lambda p: p.write_text(json.dumps({
                "what": "w", "fix": "f", "at": 1e300, "pid": os.getpid(), "reason": 1})),
            "a refusal whose time is NaN": lambda p: p.write_text(json.dumps({
                "what": "w", "fix": "f", "at": float("nan"), "pid": os.getpid(), "reason": 1})),
        }
        for what, make in bad.items():
            for path in (waiting, refused):
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink(missing_ok=True)
                make(path)
            assert waiting_reason(waiting, [os.getpid()]) is None, what
            assert last_refusal(settings) is None, what
    finally:
        shutil.rmtree(home, ignore_errors=True)
