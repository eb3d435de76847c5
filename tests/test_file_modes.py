"""Every file that tickstack or circus creates under ``TICKSTACK_HOME`` is private: files 0600,
folders 0700, sockets open to their owner only, whatever the umask of whoever started circusd.

circus.ini's ``umask = 077`` alone left circusd's log, its pid file and every watcher's log 0644
(circus opens them before it applies the umask, and writes its pid file with a fixed mode): see
:mod:`supervision.streams`.
"""
from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from db.client import WriterClient
from supervision.streams import PrivateFileStream
from testkit.circus import WATCHERS, CircusStack
from testkit.env import ROOT, isolated_env, new_home
from testkit.helpers import query, wait_for
from testkit.writer import Stack


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask of a login shell, under which circusd is started (``make run``)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(home: Path) -> dict[str, tuple[str, int]]:
    """Every path under ``home`` (``home`` included): its kind and permission bits."""
    found = {".": ("dir", stat.S_IMODE(home.stat().st_mode))}
    for root, dirs, files in os.walk(home):
        for name in dirs + files:
            path = Path(root) / name
            st = path.lstat()
            kind = ("dir" if stat.S_ISDIR(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
                    else "file" if stat.S_ISREG(st.st_mode) else "other")
            found[str(path.relative_to(home))] = (kind, stat.S_IMODE(st.st_mode))
    return found


def not_private(found: dict[str, tuple[str, int]]) -> dict[str, str]:
    """Paths whose mode is not the private one: files 0600, folders 0700, sockets owner-only (their
    execute bit means nothing: circus's and ZeroMQ's sockets are 0777 & ~umask = 0700)."""
    bad = {}
    for path, (kind, mode) in found.items():
        ok = {"file": mode == 0o600, "dir": mode == 0o700, "socket": mode & 0o077 == 0}.get(kind, False)
        if not ok:
            bad[path] = f"{kind} {mode:o}"
    return bad


def test_every_file_and_socket_of_the_running_stack_is_private(umask_022: None) -> None:
    """Files 0600, folders 0700; and no process of the stack listens beyond the loopback address:
    circusd answered any host's datagram on UDP 0.0.0.0:12027 with its control socket's path, the
    home's (circus's cluster discovery, on unless circus.ini turns it off: a security review, round 41)."""
    stack = CircusStack()
    try:
        stack.start()
        # Let every watcher write: the web apps answer requests (access logs, metrics files),
        # ticks come in, analysis builds bars, jobs take a backup; every process logs at start.
        token = wait_for("the API's token", lambda: (stack.home / "api-token").read_text().strip())
        api = f"http://127.0.0.1:{stack.api_port}"
        post = urllib.request.Request(f"{api}/api/ticks", method="POST", headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"}, data=json.dumps({"ticks": [
                {"symbol": "BTCUSD", "ts": 1_704_067_200_000, "bid": 1.0, "ask": 1.5}]}).encode())
        with urllib.request.urlopen(post, timeout=30) as resp:
            assert resp.status == 200
        for url in (f"{api}/api/health", f"{api}/metrics", f"http://127.0.0.1:{stack.console_port}/console/login"):
            with urllib.request.urlopen(url, timeout=30) as resp:
                assert resp.status == 200
        wait_for("ticks, bars and a backup", lambda: query(stack.settings, "SELECT count(*) FROM ticks")[0][0] > 5
                 and query(stack.settings, "SELECT count(*) FROM bars")[0][0] > 0
                 and any(stack.settings.backup_dir.iterdir()), timeout=90)
        for name in WATCHERS:
            wait_for(f"{name}'s log", lambda name=name: stack.log(name).strip())
        wait_for("the access logs", lambda: stack.log("api.access").strip() and stack.log("console.access").strip())

        found = modes(stack.home)
        # SQLite's database files, or on a server the pg_dump backup (its password file is gone by now)
        database = ("tickstack.db", "tickstack.db-wal") if stack.settings.database_path is not None else (
            next(f"backups/{p.name}" for p in stack.settings.backup_dir.iterdir() if p.suffix == ".dump"),)
        for expected in ("run/circusd.pid", "log/circusd.log", "log/writer.log", "log/writer.stdout.log",
                         "log/api.access.log", *database, "run/circus.sock", "run/writer.sock"):
            assert expected in found, sorted(found)
        assert not_private(found) == {}
        assert stack.proc is not None
        processes = [psutil.Process(stack.proc.pid), *psutil.Process(stack.proc.pid).children(recursive=True)]
        assert len(processes) > len(WATCHERS)
        beyond = []
        for proc in processes:
            try:
                sockets = proc.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            beyond += [(proc.pid, proc.name(), c.laddr) for c in sockets
                       if (c.status == psutil.CONN_LISTEN or c.type == socket.SOCK_DGRAM)
                       and c.laddr and c.laddr.ip not in ("127.0.0.1", "::1")]
        assert beyond == [], beyond
    finally:
        stack.close()


def test_log_streams_are_private_and_stay_so_when_they_rotate(tmp_path: Path, umask_022: None) -> None:
    older = tmp_path / "old.log"
    older.write_text("made 0644 by circus's own FileStream\n")
    older.chmod(0o644)
    PrivateFileStream(str(older)).close()
    assert stat.S_IMODE(older.stat().st_mode) == 0o600

    path = tmp_path / "w.log"
    stream = PrivateFileStream(str(path), max_bytes=100, backup_count=2)
    for i in range(12):
        stream({"data": f"line {i:02d} of the process's output\n".encode(), "pid": 1})
    stream.close()
    logs = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("w.log"))
    assert logs == ["w.log", "w.log.1", "w.log.2"]
    assert {p: stat.S_IMODE((tmp_path / p).stat().st_mode) for p in logs} == dict.fromkeys(logs, 0o600)
    assert "line 11" in path.read_text()


def test_make_runs_prepare_makes_circusds_log_private_before_circus_opens_it(umask_022: None) -> None:
    """circus opens its log (``logoutput``) before any hook of ours, under circusd's umask; a start
    circus itself gives up (a web port taken after prepare's check) left it 0644. ``python -m db
    prepare`` makes it first, private; circus appends to it and keeps its mode."""
    stack = Stack.create()
    try:
        env = isolated_env(stack.home, ports=True)
        done = subprocess.run([sys.executable, "-m", "db", "prepare"], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        found = modes(stack.home)
        assert "log/circusd.log" in found, sorted(found)
        assert not_private(found) == {}
    finally:
        stack.close()


def test_db_init_under_a_login_shells_umask_leaves_every_file_private(umask_022: None) -> None:
    """``python -m db init`` made the database 0644 (the shell's umask), and SQLite gives its WAL and
    shared-memory files the database's mode: the whole stack started on it kept them so."""
    stack = Stack.create()
    try:
        done = subprocess.run([sys.executable, "-m", "db", "init"], env=stack.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert not_private(modes(stack.home)) == {}
    finally:
        stack.close()


@pytest.mark.sqlite_only("tests/test_file_modes.py::test_every_file_and_socket_of_the_running_stack_is_private")
def test_a_writer_makes_a_database_file_others_may_read_private_and_says_so(umask_022: None) -> None:
    """A database file with group or other bits (an older ``db init``'s, a copy restored by hand):
    the writer makes it 0600 before it opens it, so its WAL and shared-memory files are 0600 too."""
    stack = Stack.create()
    try:
        db = stack.settings.database_path
        assert db is not None
        done = subprocess.run([sys.executable, "-m", "db", "init"], env=stack.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        db.chmod(0o644)
        proc = stack.start_writer()
        with WriterClient(settings=stack.settings) as client:
            client.call("audit", actor="test", action="mode", target="", result="ok", detail="")
        # db init beside it: nothing to do, said as such, not as the refusal of a second writer (it
        # said "refusing to start a second one", exit 0: a new user's run, round 44).
        again = subprocess.run([sys.executable, "-m", "db", "init"], env=stack.env, cwd=ROOT, capture_output=True,
                               text=True, timeout=120, check=False)
        assert again.returncode == 0, again.stdout + again.stderr
        said = f"the writer (pid {proc.pid}) is running and keeps the schema current: nothing to do\n"
        assert again.stdout == said, again.stdout
        found = modes(stack.home)
        del found["log/writer-test.log"]  # the test's own, made under its umask
        assert "tickstack.db-wal" in found and "tickstack.db-shm" in found, sorted(found)
        assert not_private(found) == {}
        said = stack.writer_log()
        assert "tickstack.db was open to other users (mode 644): made private (600)" in said, said
        assert stack.stop(proc) == 0
    finally:
        stack.close()


@pytest.mark.database_independent("the secret files and the home are files of the home, whatever the database")
def test_doctor_warns_of_secret_files_and_a_home_other_users_may_read() -> None:
    """``db doctor`` said nothing of an ``admin-password`` of mode 0644 (copied in by hand, or made
    under another tool's umask): only the console's log warned, where nobody looks (a new user's run).
    It now names each secret file and the home that others may read, with the command that fixes it;
    and says nothing of them once they are private."""
    stack = Stack.create()
    try:
        doctor = [sys.executable, "-m", "db", "doctor"]
        home = stack.home
        (home / "admin-password").write_text("correct horse battery staple\n")
        (home / "api-token").write_text("t" * 40 + "\n")
        os.chmod(home / "admin-password", 0o644)
        os.chmod(home / "api-token", 0o640)
        os.chmod(home, 0o755)
        said = subprocess.run(doctor, env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
        for name, mode in (("admin-password", "644"), ("api-token", "640")):
            line = next((line for line in said.splitlines() if str(home / name) in line), "")
            assert line.startswith("[WARN]") and f"mode {mode}" in line, said
            assert f"chmod 600 {home / name}" in line, said
        home_line = next((line for line in said.splitlines() if line.startswith("[WARN]")
                          and f"chmod 700 {home}" in line), "")
        assert "mode 755" in home_line, said
        os.chmod(home / "admin-password", 0o600)
        os.chmod(home / "api-token", 0o600)
        os.chmod(home, 0o700)
        said = subprocess.run(doctor, env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
        assert "chmod" not in said, said
    finally:
        stack.close()


@pytest.mark.database_independent("the secret files and the home are files of the home, whatever the database")
def test_doctors_chmod_commands_run_as_printed_in_a_home_with_a_space_in_its_path() -> None:
    """Doctor's ``chmod`` advice was the path as it is: in a home with a space in its path (``~/my
    stack``) the command pasted as two arguments, and changed nothing (chmod: cannot access ...).
    Quoted for the shell now, as every command the stack prints: each one, run as printed, fixes
    what it is printed for."""
    home = new_home(prefix="ts- a space ")
    stack = Stack(home, isolated_env(home))
    try:
        doctor = [sys.executable, "-m", "db", "doctor"]
        (home / "admin-password").write_text("correct horse battery staple\n")
        os.chmod(home / "admin-password", 0o644)
        os.chmod(home, 0o755)
        said = subprocess.run(doctor, env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
        commands = re.findall(r"`(chmod [^`]+)`", said)
        assert len(commands) == 2, said
        for command in commands:
            done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, (command, done.stderr)
        assert stat.S_IMODE((home / "admin-password").stat().st_mode) == 0o600
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        said = subprocess.run(doctor, env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
        assert "chmod" not in said, said
    finally:
        stack.close()


@pytest.mark.database_independent("the modes doctor reads are those of the home's files, whatever the database")
def test_doctor_says_a_mode_with_its_three_digits(tmp_path: Path) -> None:
    """A secret file of mode 0044 was said to be "mode 44" (the review of round 45)."""
    from db.config import load_settings
    from db.private_files import private_file_findings

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    token = home / "api-token"
    token.write_text("t" * 40 + "\n")
    token.chmod(0o044)
    said = private_file_findings(load_settings({"TICKSTACK_HOME": str(home)}))
    assert [level for level, _ in said] == ["warn"] and "(mode 044)" in said[0][1], said
