"""Which processes are in a read transaction (:mod:`db.wal_readers`), on file systems whose ``stat()``
does not give a file the device number ``/proc/locks`` prints for its locks."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from db.client import WriterClient
from testkit.helpers import T0
from testkit.writer import Stack
from tests.test_writer_fastpath import _READER  # a reader in a read transaction ("hold") until stdin closes

ROOT = Path(__file__).resolve().parent.parent

#: Run in a mount namespace of its own, the database on the overlay mounted there: two readers of it,
#: one in a read transaction, the other between transactions; prints what pids_in_read_transactions
#: found, who reads, and the -shm's device as stat() gives it and as /proc/locks prints it.
_ON_THE_OVERLAY = """
import json, os, sqlite3, subprocess, sys
from pathlib import Path
from db.wal_readers import pids_in_read_transactions
db = Path(sys.argv[1]) / "tickstack.db"
con = sqlite3.connect(db, isolation_level=None)
con.execute("PRAGMA journal_mode=WAL")
con.execute("CREATE TABLE ticks (id INTEGER PRIMARY KEY)")
con.execute("INSERT INTO ticks DEFAULT VALUES")
reader = '''
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
if sys.argv[2] == "hold":
    con.execute("BEGIN")
con.execute("SELECT count(*) FROM ticks").fetchall()
print("reading", flush=True)
sys.stdin.read()
'''
readers = {how: subprocess.Popen([sys.executable, "-c", reader, str(db), how], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for how in ("hold", "idle")}
for proc in readers.values():
    assert proc.stdout.readline().strip() == "reading"
shm = Path(f"{db}-shm")
st = os.stat(shm)
locked = sorted({line.split()[5].rsplit(":", 1)[0] for line in Path("/proc/locks").read_text().splitlines()
                 if line.split()[4:5] == [str(readers["hold"].pid)] and line.endswith(" 128 128")})
found = pids_in_read_transactions(shm)
for proc in readers.values():
    proc.communicate("")
print(json.dumps({"found": sorted(found) if found is not None else None, "hold": readers["hold"].pid,
                  "stat": f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", "locks": locked}))
"""


@pytest.mark.sqlite_only("tests/test_postgres_health.py::"
                         "test_health_doctor_api_and_metrics_report_the_server_and_fail_while_it_is_down")
def test_a_read_transaction_is_found_on_a_file_system_whose_stat_names_another_device(tmp_path: Path) -> None:
    """On overlayfs over two file systems (a container's, a home in a bind-mounted volume) and on a
    btrfs subvolume, ``stat()`` gives a file a device number of its own, while ``/proc/locks`` prints
    the file system's (its superblock's, as ``/proc/self/mountinfo`` does). The locks were matched by
    ``stat()``'s device only: none was found, and ``db doctor`` said of a WAL a reader held back "no
    reader is in a read transaction now: `python -m db checkpoint` shrinks it". The overlay here is
    mounted in a user and mount namespace of its own (nothing outside it sees it): its lower layer a
    folder of the test's, its upper one a tmpfs."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount an overlay in a namespace of its own")
    lower, up, merged = tmp_path / "lower", tmp_path / "up", tmp_path / "merged"
    for folder in (lower, up, merged):
        folder.mkdir()
    mount = (f"mount -t tmpfs tmpfs {up} && mkdir {up}/upper {up}/work && mount -t overlay overlay -o "
             f"lowerdir={lower},upperdir={up}/upper,workdir={up}/work {merged} || exit 77; "
             f'exec "$0" -c "$1" "$2"')
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, sys.executable,
                           _ON_THE_OVERLAY, str(merged)], cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    if done.returncode == 77 or "unshare failed" in done.stderr:
        pytest.skip(f"no overlay in a namespace of its own here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout.splitlines()[-1])
    # The case itself: stat() and /proc/locks disagree on this file's device (else the test shows nothing).
    assert said["locks"] and said["stat"] not in said["locks"], said
    assert said["found"] == [said["hold"]], said


@pytest.mark.sqlite_only("tests/test_postgres_health.py::"
                         "test_health_doctor_api_and_metrics_report_the_server_and_fail_while_it_is_down")
def test_doctor_names_a_reader_in_a_read_transaction_whose_open_files_it_cannot_see(stack: Stack) -> None:
    """A reader doctor cannot list (in a container, the home a volume mounted at another path; or
    another user's process): ``/proc/locks`` names it, but only the listed processes were looked up in
    it, and doctor said of the WAL it held back "no reader is in a read transaction now: `python -m db
    checkpoint` shrinks it", which it could not. It now names that pid too. The reader here runs in a
    mount namespace of its own, the home bind-mounted at another path (its open files are named so)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to run a reader in a mount namespace of its own")
    stack.env["TICKSTACK_JOURNAL_SIZE_LIMIT"] = "0"  # any WAL left after a checkpoint is "large"
    stack.start_writer()
    with WriterClient(settings=stack.settings, deadline=30) as client:
        client.call("insert_ticks", ticks=[{"symbol": "WALUSD", "ts": T0, "bid": 1.0, "ask": 1.1}])
    elsewhere = Path(tempfile.mkdtemp(prefix="ts-volume-"))
    bind = f'mount --bind {stack.home} {elsewhere} || exit 77; exec "$0" -c "$1" "$2" "$3"'
    reader = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", bind, sys.executable,
                               _READER, str(elsewhere / stack.settings.database_path.name), "hold"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if reader.stdout.readline().strip() != "reading":
            _, err = reader.communicate(timeout=30)
            pytest.skip(f"no mount namespace of its own here: {err.strip()[-300:]}")
        with WriterClient(settings=stack.settings, deadline=30) as client:
            for n in range(1, 5):
                client.call("insert_ticks", ticks=[{"symbol": "WALUSD", "ts": T0 + n, "bid": 1.0, "ask": 1.1}])
            client.call("checkpoint", mode="TRUNCATE")  # partial: the held read keeps the WAL
        health = json.loads(subprocess.run([sys.executable, "-m", "db", "health", "--json"], env=stack.env, cwd=ROOT,
                                           capture_output=True, text=True, timeout=120).stdout)
        assert reader.pid not in [p["pid"] for p in health["processes"]], health["processes"]  # the case itself
        said = subprocess.run([sys.executable, "-m", "db", "doctor"], env=stack.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120).stdout
        line = next((line for line in said.splitlines() if "The WAL is" in line), said)
        assert "no reader is in a read transaction" not in line, said
        assert f"pid {reader.pid} (" in line and "a read transaction held open" in line, said
    finally:
        if reader.returncode is None:
            reader.communicate(timeout=30)
        elsewhere.rmdir()


@pytest.mark.sqlite_only("tests/test_postgres_health.py::"
                         "test_health_doctor_api_and_metrics_report_the_server_and_fail_while_it_is_down")
def test_the_wal_warning_says_only_what_it_knows() -> None:
    """The review of round 45 left these as Low: with no ``/proc/locks`` and no reader listed, the
    warning said "no reader is in a read transaction" without knowing; a WAL under 1 MB was "0 MB"; a
    pid 0 (a process of another pid namespace) was named "pid 0"; several readers were told "End that
    read". Read off doctor's own words for each case (a snapshot's processes as ``db.health`` lists them)."""
    from db.health import _wal_words

    def reader(pid: int, held: bool | None) -> dict:
        return {"pid": pid, "cmdline": f"python -m workers.analysis {pid}", "in_read_transaction": held}

    quiet = _wal_words(500_000, [], [])
    assert quiet.startswith("The WAL is 488.3 KiB, and no reader is in a read transaction now"), quiet
    unknown = _wal_words(500_000, [], None)
    assert "no reader" not in unknown and "pids" not in unknown and "not keeping up" in unknown, unknown
    unknown = _wal_words(500_000, [reader(11, None)], [])
    assert "(pids [11])" in unknown, unknown
    two = _wal_words(10**8, [reader(11, True), reader(12, True), reader(13, False)], [0, 14])
    assert "pid 11 (python -m workers.analysis 11)" in two and "pid 12 (" in two and "pid 13" not in two, two
    assert "pid 0" not in two and "a process of another pid namespace" in two and "pid 14 (a process" in two, two
    assert "End those reads (or restart those processes)" in two and two.startswith("The WAL is 95.4 MiB"), two
    one = _wal_words(10**8, [reader(11, True)], [])
    assert "End that read (or restart that process)" in one, one
