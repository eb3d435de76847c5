"""A file we name for keeps (a backup, a restored database, a spooled batch) keeps its name through a
power cut: its folder is fsynced after the rename (:func:`db.files.sync_folder`). A file's own fsync
keeps its bytes, not its name, and these were reported written (or acknowledged to a feed) while
their names sat in the filesystem's journal for seconds. No test can cut the power; these watch the
system calls the real commands make (strace, which `.ci/run` installs) and check the folder's fsync
comes after the name was given."""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.env import ROOT
from testkit.writer import Stack

#: linkat/renameat2 and their older forms, then fsync: what put_in_place and the spool do; mkdir for
#: the folders they make.
TRACED = "trace=link,linkat,rename,renameat,renameat2,mkdir,mkdirat,fsync,fdatasync"


def traced(args: list[str], env: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    """``python ARGS`` under strace (``-f``: threads and children; ``-y``: an fd's path), the calls in ``log``."""
    strace = shutil.which("strace")
    if strace is None:  # as the browser tests without Chromium: skipped, but in CI, which installs it
        message = "strace is missing: install Debian's strace package (apt-get install strace)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run([strace, "-f", "-y", "-qq", "-e", TRACED, "-o", str(log), sys.executable, *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def last_name_given_then_folder_synced(log: Path, dest: Path) -> bool:
    """Whether the last call that gave a file the name ``dest`` (a link or rename to it) is followed
    by an fsync of ``dest``'s folder (an fd the trace shows as that folder's path)."""
    lines = log.read_text().splitlines()
    targets = {f'"{dest}"', f'"{dest.resolve()}"'}
    named = [i for i, line in enumerate(lines)
             if re.search(r"\b(link|linkat|rename|renameat|renameat2)\(", line) and re.search(r"= 0$", line)
             and (re.findall(r'"[^"]*"', line) or [""])[-1] in targets]
    assert named, f"no call gave a file the name {dest}: {lines[-20:]}"
    folder = re.escape(str(dest.parent.resolve()))
    return any(re.search(rf"\bfsync\(\d+<{folder}>\) += 0$", line) for line in lines[named[-1] + 1:])


def new_folders_named_then_parents_synced(log: Path, folders: list[Path]) -> list[str]:
    """What is wrong with each of ``folders`` (made by the traced command, a mkdir each): it must be
    made, and its parent synced after, as the files in it are."""
    lines = log.read_text().splitlines()
    problems = []
    for folder in folders:
        made = [i for i, line in enumerate(lines)
                if re.search(r"\bmkdir(at)?\(", line) and re.search(r"= 0$", line)
                and (re.findall(r'"[^"]*"', line) or [""])[-1] in {f'"{folder}"', f'"{folder.resolve()}"'}]
        if not made:
            problems.append(f"no mkdir of {folder}")
            continue
        parent = re.escape(str(folder.parent.resolve()))
        if not any(re.search(rf"\bfsync\(\d+<{parent}>\) += 0$", line) for line in lines[made[-1] + 1:]):
            problems.append(f"{folder} made, its parent {folder.parent} never synced after")
    return problems


def test_a_backup_reported_written_has_its_name_synced_to_disk(writer: Stack, tmp_path: Path) -> None:
    """``python -m db backup`` (an SQLite copy, or a pg_dump archive) names the finished file with a
    link (or a rename with ``--force``) and then syncs its folder, before it says it is done."""
    suffix = ".db" if writer.settings.database_path is not None else ".dump"
    for force in (False, True):
        dest, log = writer.home / f"kept{suffix}", tmp_path / f"backup-{force}.trace"
        done = traced(["-m", "db", "backup", str(dest), *(["--force"] if force else [])], writer.env, log)
        assert done.returncode == 0, done.stderr
        assert last_name_given_then_folder_synced(log, dest), log.read_text()[-3000:]
    # Into folders the backup makes: their names are synced too, or a power cut takes the backup
    # with them.
    dest, log = writer.home / "new" / "deeper" / f"kept{suffix}", tmp_path / "backup-new-folders.trace"
    done = traced(["-m", "db", "backup", str(dest)], writer.env, log)
    assert done.returncode == 0, done.stderr
    assert last_name_given_then_folder_synced(log, dest), log.read_text()[-3000:]
    assert not new_folders_named_then_parents_synced(log, [dest.parent.parent, dest.parent]), log.read_text()[-3000:]
    assert oct(dest.parent.parent.stat().st_mode & 0o777) == oct(0o700)


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_db_restore_puts_a_dump_back_and_continues_the_tick_and_trade_ids")
def test_a_restored_database_keeps_its_name_and_the_replaced_ones_through_a_power_cut(stack: Stack,
                                                                                       tmp_path: Path) -> None:
    """``python -m db restore`` moves the database (and its WAL) aside and puts the copy in its place:
    without a sync of the folder after, a power cut could keep the moves aside and lose the copy's
    name, leaving no database at all. (On PostgreSQL the restore is the server's transaction.)"""
    database = stack.settings.database_path
    assert database is not None
    writer = stack.start_writer()
    backup = stack.home / "kept.db"
    made = subprocess.run([sys.executable, "-m", "db", "backup", str(backup)], env=stack.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert stack.stop(writer) == 0
    log = tmp_path / "restore.trace"
    done = traced(["-m", "db", "restore", str(backup)], stack.env, log)
    assert done.returncode == 0, done.stderr
    assert last_name_given_then_folder_synced(log, database), log.read_text()[-3000:]


@pytest.mark.database_independent("the spool is files in the home; no database is read or written")
def test_a_spooled_batch_keeps_its_name_through_a_power_cut(tmp_path: Path) -> None:
    """The tick ingestor spools a batch the writer has not acknowledged (its feed has moved past it):
    the batch file is synced, renamed into place, and then its folder synced."""
    folder = tmp_path / "spool" / "EURUSD"  # both made by the spool
    script = ("import sys; from pathlib import Path; from workers.spool import Spool; "
              "cols = dict(symbol=['EURUSD'], ts=[1], bid=[1.0], ask=[1.0], volume=[0.0], source=['t'], seq=[1]); "
              "s = Spool(Path(sys.argv[1])); print(s.write(cols, s.name_of(cols)))")
    log = tmp_path / "spool.trace"
    done = traced(["-c", script, str(folder)], {"PATH": "/usr/bin:/bin"}, log)
    assert done.returncode == 0, done.stderr
    batch = Path(done.stdout.strip())
    assert batch.parent == folder and batch.exists()
    assert last_name_given_then_folder_synced(log, batch), log.read_text()[-3000:]
    assert not new_folders_named_then_parents_synced(log, [folder.parent, folder]), log.read_text()[-3000:]


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_db_restore_killed_as_its_pg_restore_ends_never_leaves_"
                         "the_dumps_ids_to_be_given_again")
def test_a_restore_killed_between_its_moves_leaves_no_empty_database_to_start_on(stack: Stack,
                                                                                 tmp_path: Path) -> None:
    """``python -m db restore`` killed (SIGKILL, by strace at the system call that gives the backup's
    copy the database's name) after it moved the database aside: no file had the database's name, and
    the next writer made a new, empty database there and served on it (trade and tick ids from 1
    again), doctor saying "start the writer (it creates it)". The writer, ``db init`` and doctor now
    refuse, saying the restore was stopped and how to finish it; done as said, the restored copy
    serves, its ids after the replaced database's."""
    from db.client import WriterClient

    database = stack.settings.database_path
    assert database is not None

    def open_trade() -> int:
        with WriterClient(settings=stack.settings, deadline=20) as client:
            return client.call("open_trade", symbol="EURUSD", side="buy", size=1.0, entry_price=1.1)["id"]

    def db(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "db", *args], env=stack.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    writer = stack.start_writer()
    kept = [open_trade() for _ in range(3)]
    backup = stack.home / "kept.db"
    assert db("backup", str(backup)).returncode == 0
    lost = open_trade()  # after the backup
    assert stack.stop(writer) == 0
    strace = shutil.which("strace")
    if strace is None:
        traced(["-c", "pass"], {}, tmp_path / "none.trace")  # skips, or fails in CI, saying why
    killed = subprocess.run([strace, "-f", "-qq", "-o", str(tmp_path / "restore.trace"), "-e", "trace=link,linkat",
                             "-e", "inject=link,linkat:error=EIO:signal=SIGKILL:when=1", sys.executable, "-m", "db",
                             "restore", str(backup)], env=stack.env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode != 0 and not database.exists(), (killed.returncode, killed.stdout + killed.stderr)

    with pytest.raises(RuntimeError, match="exited with code 1"):
        stack.start_writer()
    said = stack.writer_log()
    assert f"the database {database} is missing: a `python -m db restore` was stopped" in said, said[-3000:]
    assert not database.exists()
    refused = db("init")
    assert refused.returncode == 1 and "a `python -m db restore` was stopped" in refused.stderr, refused.stderr
    assert not database.exists()
    doctor = db("doctor").stdout
    move = re.search(r"put the backup's checked copy in place, `(mv (\S+) (\S+) && rm (\S+))`", doctor)
    assert move is not None and move[3] == str(database), doctor
    assert subprocess.run(move[1], shell=True, cwd=stack.home, timeout=30).returncode == 0  # as doctor says

    writer = stack.start_writer()
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as con:
        assert [i for (i,) in con.execute("SELECT id FROM trades ORDER BY id")] == kept
    con.close()
    assert open_trade() == lost + 1  # not an id the replaced database gave
    assert stack.stop(writer) == 0
