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
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import make_url

from db.lock import holder_command
from testkit.env import ROOT, isolated_env, new_home
from testkit.helpers import wait_for
from testkit.postgres import PostgresServer, read_connection
from testkit.process import default_sigint
from testkit.writer import Stack

#: linkat/renameat2 and their older forms, then fsync: what put_in_place and the spool do; mkdir for
#: the folders they make.
TRACED = "trace=link,linkat,rename,renameat,renameat2,mkdir,mkdirat,fsync,fdatasync"


def insert_ticks(stack: Stack, n: int, first: int = 0) -> None:
    """``n`` ticks through the writer, seq ``first`` on."""
    from db.client import WriterClient

    ticks = [{"symbol": "BTCUSD", "ts": 1_704_067_200_000 + i, "bid": 100.0, "ask": 100.5, "volume": 1.0,
              "source": "t", "seq": i} for i in range(first, first + n)]
    with WriterClient(settings=stack.settings, deadline=20) as client:
        assert client.call("insert_ticks", ticks=ticks)["inserted"] == n


def backup_of_ten_then_five_more(stack: Stack, name: str) -> Path:
    """``db backup`` to ``name`` in the home once the database has 10 ticks; then 5 more, and the
    writer stopped."""
    writer = stack.start_writer()
    insert_ticks(stack, 10)
    backup = stack.home / name
    made = subprocess.run([sys.executable, "-m", "db", "backup", str(backup)], env=stack.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    insert_ticks(stack, 5, first=10)
    assert stack.stop(writer) == 0
    return backup


def strace_program() -> str:
    """strace's path; the test skipped without it, as the browser tests without Chromium, but in CI,
    which installs it."""
    strace = shutil.which("strace")
    if strace is None:
        message = "strace is missing: install Debian's strace package (apt-get install strace)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return strace


def traced(args: list[str], env: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    """``python ARGS`` under strace (``-f``: threads and children; ``-y``: an fd's path), the calls in ``log``."""
    return subprocess.run([strace_program(), "-f", "-y", "-qq", "-e", TRACED, "-o", str(log), sys.executable, *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def signalled_at(call: str, n: int, signal_name: str, args: list[str], env: dict[str, str], log: Path,
                 *more: str) -> subprocess.CompletedProcess:
    """``python ARGS``, sent ``signal_name`` by strace (the kernel, as a ``kill`` by pid) as its main
    thread makes its ``n``-th ``call`` system call (done, or with ``more``, such as ``error=EIO``, not);
    children and other threads untraced."""
    inject = ":".join((f"inject={call}", *more, f"signal={signal_name}", f"when={n}"))
    return subprocess.run([strace_program(), "-qq", "-o", str(log), "-e", f"trace={call}", "-e", inject,
                           sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def held_at_the_lock_while_a_restore_is_killed_mid_swap(stack: Stack, backup: Path, args: list[str], n: int,
                                                      tmp_path: Path) -> subprocess.CompletedProcess:
    """``python ARGS``, its ``n``-th ``flock`` (its take of the writer lock) held 8 s by strace, and
    meanwhile a ``db restore`` of ``backup`` killed (SIGKILL) as it gives its copy the database's name:
    its mark left, no database, its lock free for the held one."""
    held = subprocess.Popen([strace_program(), "-qq", "-o", str(tmp_path / "held.trace"), "-e", "trace=flock",
                             "-e", f"inject=flock:delay_enter=8000000:when={n}", sys.executable, *args],
                            env=stack.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the command to wait at its flock", lambda: "LOCK_EX" in (tmp_path / "held.trace").read_text(),
                 timeout=60)
        killed = signalled_at("link", 1, "SIGKILL", ["-m", "db", "restore", str(backup)], stack.env,
                              tmp_path / "killed.trace", "error=EIO")
        assert killed.returncode != 0 and not stack.settings.database_path.exists(), (killed.returncode, killed.stderr)
        out, err = held.communicate(timeout=120)
    finally:
        if held.poll() is None:
            held.kill()
            held.wait()
    return subprocess.CompletedProcess(held.args, held.returncode, out, err)


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
    killed = signalled_at("link", 1, "SIGKILL", ["-m", "db", "restore", str(backup)], stack.env,
                          tmp_path / "restore.trace", "error=EIO")
    assert killed.returncode != 0 and not database.exists(), (killed.returncode, killed.stdout + killed.stderr)

    with pytest.raises(RuntimeError, match="exited with code 1"):
        stack.start_writer()
    said = stack.writer_log()
    assert f"the database {database} is missing: a `python -m db restore` was stopped" in said, said[-3000:]
    assert not database.exists()
    for command in ("init", "prepare"):  # prepare: make run's
        refused = db(command)
        assert refused.returncode == 1 and "a `python -m db restore` was stopped" in refused.stderr, \
            (command, refused.stdout + refused.stderr)
        assert not database.exists()
    doctor = db("doctor").stdout
    move = re.search(r"put the backup's checked copy in place, `(mv (\S+) (\S+) && rm (\S+))`", doctor)
    assert move is not None and move[3] == str(database), doctor
    # The replaced database is the only copy of it until one way is taken (the other way puts it back):
    # doctor listed it with the copies of finished restores, "delete them once you no longer need them".
    kept_line = "kept by `db restore` of the databases it replaced"
    assert kept_line not in doctor, doctor
    assert subprocess.run(move[1], shell=True, cwd=stack.home, timeout=30).returncode == 0  # as doctor says
    assert kept_line in db("doctor").stdout  # finished: the replaced one is a copy to delete once not needed

    writer = stack.start_writer()
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as con:
        assert [i for (i,) in con.execute("SELECT id FROM trades ORDER BY id")] == kept
    con.close()
    assert open_trade() == lost + 1  # not an id the replaced database gave
    assert stack.stop(writer) == 0


@pytest.mark.sqlite_only("tests/test_durable_names.py::test_a_postgresql_restore_stopped_by_sigterm_says_so_and_"
                         "changes_nothing")
def test_an_sqlite_restore_stopped_by_sigterm_is_the_old_database_or_the_new_one_and_says_which(
        stack: Stack, tmp_path: Path) -> None:
    """SIGTERM by pid (or Ctrl-C) to ``python -m db restore``: it ended at once, without a word (Ctrl-C:
    a traceback), and in the swap with no database of the name at all. Stopped as it checks the
    backup, it says nothing was changed and leaves no part file; stopped in the swap, it finishes the
    swap first and says the backup is restored (not "nothing was changed")."""
    database = stack.settings.database_path
    assert database is not None
    backup = backup_of_ten_then_five_more(stack, "kept.db")
    restore = ["-m", "db", "restore", str(backup)]

    def ticks() -> int:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as con:
            count = con.execute("SELECT count(*) FROM ticks").fetchone()[0]
        con.close()
        return count

    # The first open of the backup (its integrity check) is the restore's own: a path no other call names.
    stopped = subprocess.run([strace_program(), "-qq", "-o", str(tmp_path / "open.trace"), "-P", str(backup),
                              "-e", "trace=openat", "-e", "inject=openat:signal=SIGTERM:when=1", sys.executable,
                              *restore], env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 1, (stopped.returncode, stopped.stdout + stopped.stderr)
    assert "python -m db restore: stopped before it changed anything: the database is the one it was" in \
        stopped.stderr and "Traceback" not in stopped.stderr, stopped.stderr
    assert ticks() == 15 and not list(stack.home.glob(".*.part")), sorted(stack.home.iterdir())

    # The second rename is the database's, moved aside (the first gives the restore's mark its name).
    swapped = signalled_at("rename", 2, "SIGTERM", restore, stack.env, tmp_path / "swap.trace")
    assert swapped.returncode == 1 and "python -m db restore: stopped as it ended, the backup restored " in \
        swapped.stderr, (swapped.returncode, swapped.stdout + swapped.stderr)
    # What went unsaid includes the trades it put back open (closed after the backup), not only the ids.
    assert "of trades closed after the backup that it has open" in swapped.stderr, swapped.stderr
    assert ticks() == 10 and not database.with_name(f"{database.name}.restoring").exists()


@pytest.mark.sqlite_only("tests/test_durable_names.py::test_a_postgresql_restore_stopped_by_sigterm_says_so_and_"
                         "changes_nothing")
def test_a_restore_run_under_nohup_goes_on_through_a_hangup(stack: Stack, tmp_path: Path) -> None:
    """``nohup python -m db restore`` (a long restore over SSH, which must outlive the session): the
    restore made SIGHUP a Ctrl-C whatever it was, and the hangup stopped it ("stopped before it changed
    anything"). A signal ignored when it starts stays ignored, in the swap too; SIGTERM still stops it."""
    database = stack.settings.database_path
    assert database is not None
    backup = backup_of_ten_then_five_more(stack, "kept.db")
    restore = ["-m", "db", "restore", str(backup)]
    for where in (["-P", str(backup), "-e", "trace=openat", "-e", "inject=openat:signal=SIGHUP:when=1"],
                  ["-e", "trace=rename", "-e", "inject=rename:signal=SIGHUP:when=2"]):  # its check; its swap
        went_on = subprocess.run(["nohup", strace_program(), "-qq", "-o", str(tmp_path / "hup.trace"), *where,
                                  sys.executable, *restore], env=stack.env, cwd=ROOT, capture_output=True,
                                 text=True, timeout=300)
        assert went_on.returncode == 0 and "restored " in went_on.stdout, \
            (where, went_on.returncode, went_on.stdout + went_on.stderr)
    stopped = subprocess.run(["nohup", strace_program(), "-qq", "-o", str(tmp_path / "term.trace"), "-P", str(backup),
                              "-e", "trace=openat", "-e", "inject=openat:signal=SIGTERM:when=1", sys.executable,
                              *restore], env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 1 and "stopped before it changed anything" in stopped.stderr, \
        (stopped.returncode, stopped.stderr)
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as con:
        assert con.execute("SELECT count(*) FROM ticks").fetchone()[0] == 10
    con.close()

@pytest.mark.postgres_only
def test_a_postgresql_restore_stopped_by_sigterm_says_so_and_changes_nothing(stack: Stack, tmp_path: Path) -> None:
    """SIGTERM by pid to ``python -m db restore FILE.dump`` ended it at once, without a word, and left
    its private folder with the password file in ``run/``. It says nothing was changed, stops its
    children (the transaction rolled back) and removes the folder. Here at the link that names the
    copy of the database it would replace, just before it starts pg_restore."""
    dump = backup_of_ten_then_five_more(stack, "kept.dump")
    stopped = signalled_at("link", 1, "SIGTERM", ["-m", "db", "restore", str(dump)], stack.env,
                           tmp_path / "restore.trace")
    assert stopped.returncode == 1, (stopped.returncode, stopped.stdout + stopped.stderr)
    assert "python -m db restore: stopped before it changed anything: the database is the one it was" in \
        stopped.stderr, stopped.stderr
    with read_connection(stack.settings) as conn:
        assert conn.execute("SELECT count(*) FROM ticks").fetchone()[0] == 15
        assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                            "'tickstack restore%'").fetchone()[0] == 0
    assert not list(stack.settings.run_dir.glob("ts-pgpass-*")), sorted(stack.settings.run_dir.iterdir())


@pytest.mark.postgres_only
def test_a_postgresql_restore_stopped_by_ctrl_c_as_it_commits_says_what_the_server_did(
        stack: Stack, postgres_server: PostgresServer) -> None:
    """Ctrl-C in the restore's terminal reaches its psql too. Once our COMMIT was sent, the restore held
    the stop until psql ended; psql, stopped, sent the server a cancel and exited 3, but the COMMIT it
    had sent was done (a cancel ends only a commit's wait for a standby, or comes too late), and the
    restore said "stopped before it changed anything: the database is the one it was" of a database
    that held the dump. It asks the server what became of its transaction (txid_status). Here the
    COMMIT waits for a synchronous standby that never comes, so the Ctrl-C comes as it commits."""
    dump = backup_of_ten_then_five_more(stack, "kept.dump")
    database = make_url(stack.env["DATABASE_URL"]).database
    quoted = '"' + database.replace('"', '""') + '"'
    postgres_server.psql(database, "postgres", f"ALTER DATABASE {quoted} SET synchronous_commit = on")
    postgres_server.psql("postgres", "postgres", "ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
    postgres_server.psql("postgres", "postgres", "SELECT pg_reload_conf()")
    try:
        restore = subprocess.Popen([sys.executable, "-m", "db", "restore", str(dump)], env=stack.env, cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                   preexec_fn=default_sigint)  # as a terminal's job: make test's runs ignore SIGINT
        stack.procs.append(restore)
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
        wait_for("the restore's COMMIT waiting for the standby", lambda: restore.poll() is not None
                 or postgres_server.psql(database, "postgres", waiting).strip() == "1", timeout=120)
        assert restore.poll() is None, restore.communicate()
        os.killpg(restore.pid, signal.SIGINT)  # a terminal's Ctrl-C: to the restore's process group
        out, err = restore.communicate(timeout=120)
    finally:
        postgres_server.psql("postgres", "postgres", "ALTER SYSTEM RESET synchronous_standby_names")
        postgres_server.psql("postgres", "postgres", "SELECT pg_reload_conf()")
        postgres_server.psql(database, "postgres", f"ALTER DATABASE {quoted} RESET synchronous_commit")
    with read_connection(stack.settings) as conn:
        ticks = conn.execute("SELECT count(*) FROM ticks").fetchone()[0]
    assert ticks == 10, (ticks, out, err)  # committed, the standby's wait cancelled
    assert "stopped before it changed anything" not in err and "the backup restored" in err, (restore.returncode,
                                                                                             out + err)

@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_db_restore_killed_as_its_pg_restore_ends_never_leaves_"
                         "the_dumps_ids_to_be_given_again")
def test_a_restore_mark_that_is_not_one_the_restore_wrote_is_refused_without_hanging_or_naming_other_files(
        stack: Stack) -> None:
    """``tickstack.db.restoring`` beside a missing database is read by the writer, ``db init`` and
    doctor. A FIFO of that name hung them all (its open waited for a writer); a mark naming other
    paths was given back as commands to paste (``$(...)`` in one ran in the shell); one of one line
    let the writer make a new database. Each is refused, said, and no command names a file
    elsewhere."""
    database = stack.settings.database_path
    assert database is not None
    marker = database.with_name(f"{database.name}.restoring")
    elsewhere = stack.home / "elsewhere"
    evil = f"{stack.home}/$(touch {elsewhere})"
    replaced = database.with_name(f"{database.name}.replaced-20250101T000000Z")
    copy = database.with_name(f".{database.name}.4242.abcdefgh.part")
    for content in ("fifo", f"/etc/passwd\n{replaced}\n", f"{evil}\n{replaced}\n", f"{copy}\n", "x" * 100_000,
                    f"{copy}\n{stack.home}/other-file\n"):
        marker.unlink(missing_ok=True)
        if content == "fifo":
            os.mkfifo(marker, 0o600)
        else:
            marker.write_text(content)
        for command in (["init"], ["doctor"]):
            done = subprocess.run([sys.executable, "-m", "db", *command], env=stack.env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)
            said = done.stdout + done.stderr
            assert done.returncode == 1 and "is not one that restore wrote" in said, (content[:80], command, said)
            assert "/etc/passwd" not in said and "$(" not in said and not elsewhere.exists(), said
        assert not database.exists()
    # One the restore wrote, moved with the home: its commands name the files beside the database.
    marker.unlink()
    copy.write_bytes(b"")
    marker.write_text(f"/another/home/{copy.name}\n/another/home/{replaced.name}\n")
    said = subprocess.run([sys.executable, "-m", "db", "init"], env=stack.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60).stderr
    assert f"`mv {copy} {database} && rm {marker}`" in said and "/another/home" not in said, said


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_db_restore_killed_as_its_pg_restore_ends_never_leaves_"
                         "the_dumps_ids_to_be_given_again")
def test_the_moves_doctor_gives_after_a_restore_killed_between_the_database_and_its_wal_finish_it(
        tmp_path: Path) -> None:
    """A restore killed after it moved the database aside but before its WAL (the writer was killed:
    its WAL was left): the commands doctor gave, pasted into a shell, failed in a home whose path has
    a space or a quote (unquoted: "Unterminated quoted string"), and the copy put in place as they said
    had the replaced database's WAL beside it, replayed into it at the next open: the restored
    database held the replaced one's 15 ticks, not the backup's 10. Both ways now work as given."""
    for way in ("put the backup's checked copy in place", "go back to the replaced database"):
        home = new_home(prefix="ts- it's ")
        stack = Stack(home, isolated_env(home))
        try:
            database = stack.settings.database_path
            assert database is not None
            writer = stack.start_writer()
            insert_ticks(stack, 10)
            backup = home / "kept.db"
            assert subprocess.run([sys.executable, "-m", "db", "backup", str(backup)], env=stack.env, cwd=ROOT,
                                  capture_output=True, timeout=120).returncode == 0
            insert_ticks(stack, 5, first=10)
            assert stack.stop(writer, signal.SIGKILL) != 0 and Path(f"{database}-wal").stat().st_size > 0
            # The renames: the mark's, the database's, then its WAL's (not done: killed there).
            killed = signalled_at("rename", 3, "SIGKILL", ["-m", "db", "restore", str(backup)], stack.env,
                                  tmp_path / "restore.trace", "error=EIO")
            assert killed.returncode != 0 and not database.exists() and Path(f"{database}-wal").exists(), \
                (killed.returncode, killed.stderr, sorted(home.iterdir()))
            doctor = subprocess.run([sys.executable, "-m", "db", "doctor"], env=stack.env, cwd=ROOT,
                                    capture_output=True, text=True, timeout=120).stdout
            command = re.search(rf"{re.escape(way)}, `([^`]+)`", doctor)
            assert command is not None, doctor
            moved = subprocess.run(command[1], shell=True, cwd="/", capture_output=True, text=True, timeout=30)
            assert moved.returncode == 0, (command[1], moved.stderr)
            assert not database.with_name(f"{database.name}.restoring").exists()
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as con:
                assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
                ticks = con.execute("SELECT count(*) FROM ticks").fetchone()[0]
            con.close()
            assert ticks == (10 if way.startswith("put") else 15), (way, ticks)
        finally:
            stack.close()


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_db_restore_refuses_a_dump_of_another_database_and_names_"
                         "a_session_whose_lock_it_would_wait_for")
def test_what_holds_the_writer_lock_during_a_restore_is_named_as_the_restore(stack: Stack, tmp_path: Path) -> None:
    """A restore holds the writer lock while it runs. A second restore was told "the writer is
    running (pid <the first restore's>)" and to stop the stack; ``db init`` said "the writer (pid
    ...) is running and keeps the schema current: nothing to do" and exited 0; a writer said
    "another writer (pid ...)". Each now names the restore, and ``db init`` does not say all is
    well while the database is being replaced."""
    backup = backup_of_ten_then_five_more(stack, "kept.db")
    # Stopped (SIGSTOP, by strace as it makes its first fsync: the lock is held then) until SIGCONT.
    first = subprocess.Popen([strace_program(), "-qq", "-o", str(tmp_path / "first.trace"), "-e", "trace=fsync",
                              "-e", "inject=fsync:signal=SIGSTOP:when=1", sys.executable, "-m", "db", "restore",
                              str(backup)], env=stack.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    holder = None
    try:
        from db.lock import read_lock_holder

        holder = wait_for("the first restore to hold the writer lock",
                          lambda: read_lock_holder(stack.settings.writer_lock_path))
        named = f"`python -m db restore` (pid {holder})"
        for args, code in ((["-m", "db", "restore", str(backup)], 1), (["-m", "db", "init"], 1),
                           (["-m", "workers.writer"], 3),  # 3: the lock is held (circus tries again)
                           (["-m", "db", "doctor"], 1)):  # it said "The writer (pid ...) ... may be stuck", restart it
            done = subprocess.run([sys.executable, *args], env={**stack.env, "TICKSTACK_WRITER_LOCK_WAIT": "1"},
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            said = done.stdout + done.stderr
            assert done.returncode == code and named in said, (args, done.returncode, said[-2000:])
            assert "the writer is running" not in said and "another writer" not in said, (args, said[-2000:])
            assert "nothing to do" not in said, (args, said)
            assert "previous writer" not in said, (args, said[-2000:])  # the wait's words were a reload's
            assert "may be stuck" not in said and "restart writer" not in said, (args, said[-2000:])
        os.kill(holder, signal.SIGCONT)
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, out + err
    finally:
        if first.poll() is None:  # the restore (stopped: only SIGKILL ends it), then strace, by pid
            if holder is not None:
                os.kill(holder, signal.SIGKILL)
            first.kill()
            first.wait()


def listed_roles(stack: Stack, pid: int) -> tuple[list[str], str]:
    """The roles ``db health``'s process list gives ``pid`` (one per line of it), and all it said."""
    done = subprocess.run([sys.executable, "-m", "db", "health"], env=stack.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    said = done.stdout + done.stderr
    return [line.split()[2] for line in said.splitlines() if line.split()[:2] == ["process", str(pid)]], said


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_db_restore_refuses_a_dump_of_another_database_and_names_"
                         "a_session_whose_lock_it_would_wait_for")
def test_health_lists_what_holds_the_writer_lock_with_the_database_open_as_a_lock_holder_not_the_writer(
        writer: Stack) -> None:
    """A restore holds the writer lock while it runs, and reads the replaced database's ids with it open
    (``db.restore._ids_given``): ``db health``'s process list (and the console's database page) called
    it ``writer``, while doctor said it holds the lock and is not one. Here a process in that state
    (the real lock, the database open read-only) after the writer it keeps out; the list calls it
    ``lock-holder``, and the writer started after it ``writer``."""
    assert writer.stop(writer.procs[-1]) == 0
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from db.engine import connect_read_only\n"
        "from db.lock import WriterLock\n"
        "WriterLock(sys.argv[1]).acquire()\n"
        "con = connect_read_only(sys.argv[2])\n"
        "con.execute('SELECT count(*) FROM ticks').fetchone()\n"
        "print('holding', flush=True)\n"
        "time.sleep(120)\n"), str(writer.settings.writer_lock_path), str(writer.settings.database_path)],
        env=writer.env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"

        roles, said = listed_roles(writer, holder.pid)
        assert roles == ["lock-holder"], said[-3000:]
    finally:
        holder.kill()
        holder.wait()
    serving = writer.start_writer()
    roles, said = listed_roles(writer, serving.pid)
    assert roles == ["writer"], said[-3000:]


@pytest.mark.database_independent("a writer's command line, read by db.lock.holder_command, is the same on both; the "
                                  "process list is SQLite's (who has the file open)")
@pytest.mark.parametrize("argv", [["-um", "workers.writer"], ["-mworkers.writer"]])
def test_a_writer_started_with_its_python_options_run_together_is_listed_as_the_writer(
        writer: Stack, argv: list[str]) -> None:
    """db.lock.holder_command found a writer only by a ``-m`` argument of its own followed by
    ``workers.writer``: one started ``python -um workers.writer`` (unbuffered, as supervisors run
    Python) or ``python -mworkers.writer``, which Python runs alike, was 'python', not a writer, so
    ``db health`` listed the writer serving there as ``lock-holder`` (a review), and doctor, had it
    stopped answering, would have called it something else that holds the lock, to wait for."""
    from db.client import WriterClient

    assert writer.stop(writer.procs[-1]) == 0
    with open(writer.home / "log" / "writer-test.log", "ab") as log:
        serving = subprocess.Popen([sys.executable, *argv], env=writer.env, cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
    writer.procs.append(serving)  # stopped with the stack, by its pid
    with WriterClient(settings=writer.settings, deadline=0.5) as client:
        client.wait_ready(20, is_alive=lambda: serving.poll() is None)
    assert holder_command(serving.pid) is None
    roles, said = listed_roles(writer, serving.pid)
    assert roles == ["writer"], said[-3000:]


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_db_restore_puts_a_dump_into_a_new_empty_database")
def test_a_restore_through_a_symbolic_link_replaces_the_file_it_names(tmp_path: Path) -> None:
    """The database's path a symbolic link to a file on another disk (SQLite follows it, and keeps the
    WAL beside the file): ``db restore`` moved the link aside and put the backup in its place as a
    file, on the link's disk; the replaced database stayed where it was, under its own name, and the
    restore's mark and its copy were beside the link, where a writer killed mid-swap would not look.
    It now replaces the file the link names, beside it, and the link stays."""
    stack = Stack.linked(tmp_path / "disk")
    try:
        home, disk = stack.home, tmp_path / "disk"
        real = disk / "ticks.db"
        link = stack.settings.database_path
        assert link is not None
        backup = backup_of_ten_then_five_more(stack, "kept.db")
        assert real.is_file() and link.resolve() == real

        def ticks(path: Path) -> int:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
                count = con.execute("SELECT count(*) FROM ticks").fetchone()[0]
            con.close()
            return count

        # Killed as it gives the copy the database's name: the link dangles, and the writer, which
        # opens through it, must find the mark beside the file.
        killed = signalled_at("link", 1, "SIGKILL", ["-m", "db", "restore", str(backup)], stack.env,
                              tmp_path / "restore.trace", "error=EIO")
        assert killed.returncode != 0 and not real.exists() and link.is_symlink(), sorted(os.listdir(disk))
        with pytest.raises(RuntimeError, match="exited with code 1"):
            stack.start_writer()
        assert f"the database {real} is missing: a `python -m db restore` was stopped" in stack.writer_log()
        assert not real.exists()
        doctor = subprocess.run([sys.executable, "-m", "db", "doctor"], env=stack.env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120).stdout
        move = re.search(r"put the backup's checked copy in place, `([^`]+)`", doctor)
        assert move is not None, doctor
        assert subprocess.run(move[1], shell=True, cwd="/", timeout=30).returncode == 0
        assert link.is_symlink() and ticks(real) == 10

        # And whole: the file the link names replaced, the replaced one kept beside it, the link left.
        writer = stack.start_writer()
        insert_ticks(stack, 5, first=10)  # 15 again, ids 16 to 20 (the ids continue after a restore)
        assert stack.stop(writer) == 0
        restored = subprocess.run([sys.executable, "-m", "db", "restore", str(backup)], env=stack.env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=120)
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert link.is_symlink() and link.resolve() == real, sorted(os.listdir(home))
        replaced = sorted(p for p in disk.glob("ticks.db.replaced-*") if not p.name.endswith(("-wal", "-shm")))
        assert len(replaced) == 2 and all(p.is_file() for p in replaced), sorted(os.listdir(disk))
        assert not [p for p in home.iterdir() if ".replaced-" in p.name or p.name.endswith((".part", ".restoring"))], \
            sorted(os.listdir(home))
        assert ticks(real) == 10 and ticks(replaced[-1]) == 15
        writer = stack.start_writer()
        insert_ticks(stack, 1, first=100)
        assert stack.stop(writer) == 0
        with sqlite3.connect(f"file:{real}?mode=ro", uri=True) as con:
            assert con.execute("SELECT count(*), max(id) FROM ticks").fetchone() == (11, 21)  # ids continue
        con.close()
    finally:
        stack.close()


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_db_restore_puts_a_dump_into_a_new_empty_database")
def test_a_restore_through_a_symbolic_link_whose_folder_is_not_there_makes_no_folder(tmp_path: Path) -> None:
    """The database's path a symbolic link into a folder that is not there (a disk not mounted, a link
    mistyped): the writer cannot open it ("unable to open database file"), and ``db restore``, since it
    went by the file the link names, made that folder, on whatever disk held its parent, and restored
    into it, "Start the stack again": once the disk is mounted, the restored file is under the mount
    and the writer on the database it replaced. It refuses now, making nothing."""
    stack = Stack.linked(tmp_path / "disk")
    try:
        backup = backup_of_ten_then_five_more(stack, "kept.db")
        link = stack.settings.database_path
        assert link is not None
        link.unlink()
        target = tmp_path / "unmounted" / "data" / "ticks.db"
        link.symlink_to(target)
        restored = subprocess.run([sys.executable, "-m", "db", "restore", str(backup)], env=stack.env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=120)
        assert restored.returncode == 1, restored.stdout + restored.stderr
        assert f"the folder {target.parent} of the file it names is not there" in restored.stderr, restored.stderr
        assert not (tmp_path / "unmounted").exists() and link.is_symlink()
    finally:
        stack.close()


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_db_restore_killed_as_its_pg_restore_ends_never_leaves_"
                         "the_dumps_ids_to_be_given_again")
def test_the_mark_of_a_restore_killed_before_it_moved_anything_does_not_outlive_the_next_writer(
        stack: Stack, tmp_path: Path) -> None:
    """A restore killed after it wrote its mark but before it moved the database (nothing lost: the
    writer starts on the database in place) left the mark, and the writer ran on beside it. When that
    database later went missing (moved after the writer was killed, its WAL left), every refusal was
    the stopped restore's: "put the backup's checked copy in place", a stale copy of the backup, after
    moving the WAL of the writes since aside, or "go back to the replaced database", a file that was
    never made (mv: cannot stat). The writer, holding the lock no restore runs without, removes a mark
    beside a database in place: the refusal is then the missing database's, put it back."""
    database = stack.settings.database_path
    assert database is not None
    backup = backup_of_ten_then_five_more(stack, "kept.db")
    mark = database.with_name(f"{database.name}.restoring")
    # The renames: the mark's, then the database's (not done: killed there).
    killed = signalled_at("rename", 2, "SIGKILL", ["-m", "db", "restore", str(backup)], stack.env,
                          tmp_path / "restore.trace", "error=EIO")
    assert killed.returncode != 0 and database.exists() and mark.exists(), sorted(os.listdir(stack.home))
    writer = stack.start_writer()
    insert_ticks(stack, 5, first=15)
    assert stack.stop(writer, signal.SIGKILL) != 0 and Path(f"{database}-wal").stat().st_size > 0
    assert not mark.exists()
    moved = tmp_path / "moved.db"
    os.rename(database, moved)
    refused = subprocess.run([sys.executable, "-m", "db", "init"], env=stack.env, cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 1 and "is missing but its WAL tickstack.db-wal is there" in refused.stderr, \
        refused.stderr
    os.rename(moved, database)
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as con:
        assert con.execute("SELECT count(*) FROM ticks").fetchone() == (20,)
    con.close()


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_db_restore_killed_as_its_pg_restore_ends_never_leaves_"
                         "the_dumps_ids_to_be_given_again")
def test_db_init_asks_whether_it_may_make_a_database_once_it_holds_the_writer_lock(stack: Stack,
                                                                                     tmp_path: Path) -> None:
    """``db init`` asked :func:`db.files.new_database_refusal` before it took the writer lock: a restore
    killed mid-swap in between (its lock then free) left no database and its mark, and ``db init``
    made a new, empty database there (schema 0 -> 5), the writer then serving on it. It asks once it
    holds the lock, as the writer does. Here strace holds its ``flock`` for 8 s, the restore killed
    meanwhile as it gives the backup's copy the database's name."""
    database = stack.settings.database_path
    assert database is not None
    backup = backup_of_ten_then_five_more(stack, "kept.db")
    init = held_at_the_lock_while_a_restore_is_killed_mid_swap(stack, backup, ["-m", "db", "init"], 1, tmp_path)
    out, err = init.stdout, init.stderr
    assert init.returncode == 1 and "a `python -m db restore` was stopped" in err, (init.returncode, out + err)
    assert not database.exists(), out


@pytest.mark.sqlite_only("tests/test_postgres_health.py::test_db_restore_killed_as_its_pg_restore_ends_never_leaves_"
                         "the_dumps_ids_to_be_given_again")
def test_a_restore_asks_whether_one_was_stopped_mid_swap_once_it_holds_the_writer_lock(stack: Stack,
                                                                                        tmp_path: Path) -> None:
    """A second ``db restore`` asked whether a restore was stopped mid-swap before it took the writer
    lock (then checked its backup, which takes minutes for a large one): the first, killed mid-swap
    in between, left its mark and no database, and the second put its copy in place without reading
    the replaced database's ids (given again, without a word) and removed the first's mark. It asks
    once it holds the lock. Here strace holds the second's ``flock`` of the lock for 8 s, the first
    killed meanwhile as it gives its copy the database's name."""
    database = stack.settings.database_path
    assert database is not None
    backup = backup_of_ten_then_five_more(stack, "kept.db")
    # Its third flock: the first two are a look at who holds the lock.
    second = held_at_the_lock_while_a_restore_is_killed_mid_swap(stack, backup, ["-m", "db", "restore", str(backup)],
                                                                 3, tmp_path)
    out, err = second.stdout, second.stderr
    assert second.returncode == 1 and "a `python -m db restore` was stopped" in err, (second.returncode, out + err)
    assert not database.exists() and database.with_name(f"{database.name}.restoring").exists(), out
