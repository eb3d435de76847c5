"""A full disk is a state, not a crash, outside the writer: the tick ingestor keeps its ticks (in
memory while the disk refuses its spool, bounded) and delivers each exactly once when space
returns; the API answers 507 with the writer's reason; ``db health``, ``db doctor`` and the
console's database page show the free space and warn before it runs out.

The disk is real: a small tmpfs (:func:`testkit.helpers.small_disk`, root only) holding
``TICKSTACK_HOME``, filled with a filler file and given back by deleting it. Without root (or when
``mount`` is refused) the tests that need it skip, except under CI, where they fail. Logs of the
processes go outside the small disk, so a full disk never hides what they said.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgpack
import pytest

from db.client import WriterClient
from db.config import ensure_home, load_settings
from db.errors import StorageFull
from supervision.streams import PrivateFileStream
from testkit.env import ROOT, isolated_env
from testkit.helpers import DiskUnavailable, fill_disk, query, small_disk, wait_for
from testkit.process import stop_process
from testkit.writer import Stack, spawn
from webapp import create_app
from webapp.api.openapi import document

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
SUMMARY_RE = re.compile(r"source (\S+) received (\d+), acked (\d+) \(duplicates (\d+)\), spooled (\d+), "
                        r"rejected (\d+), lost (\d+)")


@dataclass
class SmallHome:
    """``TICKSTACK_HOME`` on a small real disk, and the processes a test started in it."""

    home: Path
    env: dict[str, str]
    logs: Path  # outside the small disk
    procs: list[subprocess.Popen]

    @property
    def settings(self):  # noqa: ANN201 - db.config.Settings
        return load_settings(self.env)

    @property
    def filler(self) -> Path:
        return self.home / "filler"

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _out(self, name: str) -> IO[bytes]:
        return open(self.logs / f"{name}.log", "ab")

    def start_writer(self) -> subprocess.Popen:
        with self._out("writer") as out:
            proc = spawn(self.env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start_ingestor(self, *args: str) -> subprocess.Popen:
        with self._out("ticks") as out:
            proc = subprocess.Popen([sys.executable, "-m", "workers.ticks", "--feed", "sim", *args], env=self.env,
                                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def spool(self) -> list[Path]:
        return sorted(self.settings.spool_dir.iterdir())


@pytest.fixture
def small() -> Iterator[SmallHome]:
    """A runtime folder on an 8 MiB tmpfs; its processes are killed (by pid) before it is unmounted."""
    logs = Path(tempfile.mkdtemp(prefix="ts-logs-"))
    try:
        with small_disk("8m") as home:
            env = isolated_env(home)
            ensure_home(load_settings(env))
            st = SmallHome(home, env, logs, [])
            try:
                yield st
            finally:
                for proc in st.procs:
                    stop_process(proc, 10, signal.SIGKILL)
    except DiskUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"the full-disk tests must run in CI: {e}")
        pytest.skip(f"needs a real small disk: {e}")
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def replay_spool(env: dict[str, str]) -> subprocess.CompletedProcess:
    """An ingestor that reads nothing: it starts (cleaning and replaying the spool), then stops."""
    return subprocess.run([sys.executable, "-m", "workers.ticks", "--feed", "sim", "--count", "0"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def stored(st: SmallHome, source: str) -> tuple[int, int, int, int]:
    """Ticks of ``source`` in the database: (count, distinct seqs, min seq, max seq)."""
    return query(st.settings, "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM ticks WHERE source = ?",
                 (source,))[0]


def stop_ingestor(st: SmallHome, proc: subprocess.Popen) -> tuple[str, int, int, int]:
    """SIGTERM the ingestor; it must exit 0 having lost nothing. Returns (source, received, acked, lost)."""
    assert stop_process(proc, 60) is False, "the ingestor did not stop on SIGTERM"
    log = st.log("ticks")
    assert proc.returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    summary = SUMMARY_RE.search(log)
    assert summary, log[-3000:]
    return summary.group(1), int(summary.group(2)), int(summary.group(3)), int(summary.group(7))


def assert_exactly_once(st: SmallHome, proc: subprocess.Popen) -> int:
    """Stop the ingestor, let the next start replay what it spooled meanwhile (as circus would
    restart it), and check that every tick it read is stored exactly once."""
    source, received, _acked, lost = stop_ingestor(st, proc)
    assert received > 0 and lost == 0
    replay = replay_spool(st.env)
    assert replay.returncode == 0, replay.stderr
    assert st.spool() == []
    assert stored(st, source) == (received, received, 0, received - 1), st.log("ticks")[-6000:]
    return received


# --- the ingestor -------------------------------------------------------------------------------------------


def test_stale_part_files_are_removed_at_start_but_not_a_live_writers(stack: Stack) -> None:
    stack.start_writer()
    spool = stack.settings.spool_dir
    dead = subprocess.Popen(["true"])
    dead.wait()
    legacy = spool / "ticks-sim-1-0-50.part"  # named by earlier versions: no pid, nobody writes it any more
    orphan = spool / f".ticks-sim-1-50-50.msgpack.{dead.pid}.part"  # its process died mid-write
    live = spool / f".ticks-sim-1-100-50.msgpack.{os.getpid()}.part"  # a live process is writing it
    for path in (legacy, orphan, live):
        path.write_bytes(b"\x85half a batch")
    done = replay_spool(stack.env)
    assert done.returncode == 0, done.stderr
    assert sorted(spool.iterdir()) == [live]
    assert "removed 2 half-written spool files" in done.stderr


def test_an_unreadable_spool_file_is_set_aside_and_the_rest_is_replayed(stack: Stack) -> None:
    stack.start_writer()
    spool = stack.settings.spool_dir
    (spool / "ticks-sim-1-0-50.msgpack").write_bytes(b"")  # renamed into place, then power lost before its data
    (spool / "ticks-sim-1-50-1.msgpack").write_bytes(msgpack.packb(
        {"symbol": ["BTCUSD"], "ts": [T0], "bid": [1.0], "ask": [1.5], "volume": [1.0], "source": ["sim-1"],
         "seq": [50]}))
    done = replay_spool(stack.env)
    assert done.returncode == 0, done.stderr
    assert "spool file ticks-sim-1-0-50.msgpack cannot be read" in done.stderr
    assert [p.name for p in spool.iterdir()] == ["unreadable-ticks-sim-1-0-50.msgpack"]
    assert query(stack.settings, "SELECT source, seq FROM ticks") == [("sim-1", 50)]


def test_ingestor_keeps_ticks_in_memory_while_disk_and_writer_are_away_then_stores_each_once(
        small: SmallHome) -> None:
    fill_disk(small.filler)
    ingestor = small.start_ingestor("--rate", "400", "--batch", "40", "--deadline", "1", "--seed", "5",
                                    "--memory-limit", "200")
    wait_for("the ingestor to hold ticks in memory", lambda: "disk refused the spool" in small.log("ticks"))
    wait_for("memory to reach its limit", lambda: "feed paused" in small.log("ticks"))  # bounded: back-pressure
    assert ingestor.poll() is None, small.log("ticks")[-3000:]
    assert "No space left on device" in small.log("ticks")
    assert small.spool() == []  # nothing half-written left behind

    small.filler.unlink()  # space returns: memory goes to disk, whole files, private
    wait_for("memory moved to the spool", lambda: "moved" in small.log("ticks") and small.spool())
    wait_for("the feed to resume", lambda: "feed resumed" in small.log("ticks"))
    for path in small.spool():
        assert path.suffix == ".msgpack" and (path.stat().st_mode & 0o777) == 0o600, path
    small.start_writer()  # the writer returns: the spool drains into it
    wait_for("the spool to drain", lambda: small.spool() == [])
    received = assert_exactly_once(small, ingestor)
    assert received >= 40


def test_stopped_while_neither_disk_nor_writer_takes_its_ticks_the_ingestor_says_which_it_lost(
        small: SmallHome) -> None:
    fill_disk(small.filler)
    ingestor = small.start_ingestor("--rate", "400", "--batch", "40", "--deadline", "1")
    wait_for("the ingestor to hold ticks in memory", lambda: "disk refused the spool" in small.log("ticks"))
    assert stop_process(ingestor, 60) is False
    log = small.log("ticks")
    assert ingestor.returncode == 1 and "Traceback" not in log, log[-3000:]
    lost = [int(n) for n in re.findall(r"lost (\d+) ticks of source sim-[A-Za-z0-9._-]+, seq \d+\.\.\d+: the writer "
                                       r"did not take them and the disk refused them \(\[Errno 28\]", log)]
    summary = SUMMARY_RE.search(log)
    assert lost and summary and sum(lost) == int(summary.group(7)) == int(summary.group(2)), log[-3000:]


@pytest.mark.sqlite_only("tests/test_postgres_faults.py::test_a_full_disk_on_the_server_is_storage_full_and_writes_resume_once_space_is_freed")
def test_ingestor_waits_out_a_full_disk_under_the_writer_and_resumes_by_itself(small: SmallHome) -> None:
    writer = small.start_writer()
    ingestor = small.start_ingestor("--rate", "400", "--batch", "40", "--deadline", "2", "--seed", "6")
    wait_for("ticks to arrive", lambda: query(small.settings, "SELECT count(*) FROM ticks")[0][0] > 100)

    fill_disk(small.filler)
    wait_for("the ingestor to hold ticks in memory", lambda: "disk refused the spool" in small.log("ticks"))
    log = small.log("ticks")
    assert "StorageFull" in log and "disk is full" in log, log[-3000:]  # the writer's reason, not a timeout
    assert writer.poll() is None and ingestor.poll() is None, (small.log("writer")[-2000:], log[-3000:])
    assert small.spool() == []

    small.filler.unlink()  # nothing else to do: writes resume by themselves
    before = query(small.settings, "SELECT count(*) FROM ticks")[0][0]
    wait_for("writes to resume", lambda: query(small.settings, "SELECT count(*) FROM ticks")[0][0] > before + 800)
    assert_exactly_once(small, ingestor)
    assert writer.poll() is None


def test_a_backup_on_a_full_disk_fails_with_the_reason_and_leaves_nothing_behind(small: SmallHome) -> None:
    small.start_writer()
    with WriterClient(settings=small.settings, deadline=20) as client:
        client.call("insert_ticks", ticks={"symbol": ["BTCUSD"] * 5000, "ts": [T0 + i for i in range(5000)],
                                           "bid": [1.0] * 5000, "ask": [1.5] * 5000, "source": ["b"] * 5000,
                                           "seq": list(range(5000))})
        client.call("checkpoint")
    on_server = small.settings.database_path is None  # pg_dump writes its archive to this disk all the same
    size = 65536 if on_server else small.settings.database_path.stat().st_size
    fill_disk(small.filler, leave=size // 4)
    dest = small.settings.backup_dir / ("copy.dump" if on_server else "copy.db")
    done = subprocess.run([sys.executable, "-m", "db", "backup", str(dest)], env=small.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    if on_server:
        assert "pg_dump failed" in done.stderr and "No space left on device" in done.stderr, done.stderr
    else:
        assert f"backup to {dest} failed: database or disk is full (nothing left behind)" in done.stderr
    assert list(small.settings.backup_dir.iterdir()) == []


# --- the API, health, doctor and the console ----------------------------------------------------------------


@pytest.mark.sqlite_only("tests/test_postgres_faults.py::test_a_full_disk_on_the_server_is_storage_full_and_writes_resume_once_space_is_freed")
def test_api_answers_507_with_the_writers_reason_on_a_full_disk(small: SmallHome) -> None:
    small.start_writer()
    app = create_app("api", small.settings)
    http = app.test_client()
    auth = {"Authorization": f"Bearer {(small.home / 'api-token').read_text().strip()}"}
    body = {"ticks": [{"symbol": "BTCUSD", "ts": T0, "bid": 100.0, "ask": 100.5, "source": "api", "seq": 1}]}
    assert http.post("/api/ticks", json=body, headers=auth).status_code == 200

    fill_disk(small.filler)
    body["ticks"][0]["seq"] = 2
    resp = http.post("/api/ticks", json=body, headers=auth)
    assert resp.status_code == 507, resp.get_data(as_text=True)
    error = resp.get_json()
    assert set(error) == {"error"} and set(error["error"]) == {"code", "message"}, error
    assert error["error"]["code"] == "storage_full"
    assert "disk is full" in error["error"]["message"] and "restarting" not in error["error"]["message"]
    assert resp.headers["Retry-After"]
    trade = http.post("/api/trades", json={"symbol": "BTCUSD", "side": "buy", "size": 1, "entry_price": 100.0},
                      headers=auth)
    assert trade.status_code == 507 and trade.get_json()["error"]["code"] == "storage_full"
    assert "507" in document()["paths"]["/api/ticks"]["post"]["responses"]

    small.filler.unlink()
    assert http.post("/api/ticks", json=body, headers=auth).get_json() == {"inserted": 1, "duplicates": 0}
    assert stored(small, "api") == (2, 2, 1, 2)


#: An API worker in prometheus_client's multiprocess mode (as under gunicorn) answering three requests,
#: each printing its status.
_WORKER = """
from webapp import create_app
from db.config import load_settings
http = create_app("api", load_settings()).test_client()
for path in ("/api/health", "/api/nothing-here", "/metrics"):
    print(path, http.get(path).status_code, flush=True)
"""


def test_an_api_worker_on_a_full_disk_answers_instead_of_dying_of_sigbus(small: SmallHome) -> None:
    """prometheus_client makes its values files sparse and writes through a memory map: on a full disk
    each API worker died of SIGBUS at its first request ("Worker was sent SIGBUS!", every request a
    closed connection; fault hunt as an operator). Now the files' blocks are taken first, the count
    is lost (said once), and the requests are answered."""
    small.start_writer()
    metrics = small.home / "run" / "metrics" / "1"
    metrics.mkdir(parents=True, mode=0o700)
    fill_disk(small.filler)
    worker = subprocess.run([sys.executable, "-c", _WORKER], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**small.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics)})
    assert worker.returncode == 0, (worker.returncode, worker.stdout, worker.stderr[-3000:])
    assert [line.split()[0] for line in worker.stdout.splitlines()] == ["/api/health", "/api/nothing-here", "/metrics"]
    assert "requests are not counted while the metrics' files cannot grow" in worker.stderr, worker.stderr[-3000:]
    assert worker.stderr.count("requests are not counted") == 1, worker.stderr[-3000:]


def _console_login(console: Any, password: str) -> Any:
    page = console.get("/console/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    return console.post("/console/login", data={"csrf_token": token, "username": "admin", "password": password})


def test_a_console_login_on_a_full_disk_is_refused_with_the_reason_and_loses_no_session(small: SmallHome) -> None:
    """A login on a full disk was a 500 (the login throttle's file could not be written; fault hunt as
    an operator), and that file and the sessions' were emptied before they were written again, so a
    write the disk refused left one empty. Now 507 with the reason, the files as they were, and the
    session already open goes on. (The throttle's file is made new here, so its write needs a block
    the full disk has not.)"""
    console = create_app("console", small.settings).test_client()
    other = create_app("console", small.settings).test_client()
    password = (small.home / "admin-password").read_text().strip()
    assert _console_login(console, password).status_code == 302
    sessions = small.home / "run" / "console-sessions.json"
    before = sessions.read_bytes()
    (small.home / "run" / "console-login-throttle.json").unlink()
    fill_disk(small.filler)
    refused = _console_login(other, password)
    assert refused.status_code == 507, refused.status_code
    assert "The console cannot record a login: No space left on device" in refused.text, refused.text
    assert sessions.read_bytes() == before
    assert console.get("/console/watchers").status_code == 200  # the open session goes on
    small.filler.unlink()
    assert _console_login(other, password).status_code == 302


def test_health_doctor_and_console_show_free_space_and_warn_before_it_runs_out(small: SmallHome) -> None:
    small.start_writer()
    console = create_app("console", small.settings).test_client()  # its secrets are written now, not on a full disk
    password = (small.home / "admin-password").read_text().strip()
    login = console.get("/console/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', login).group(1)
    assert console.post("/console/login", data={"csrf_token": token, "username": "admin",
                                                "password": password}).status_code == 302

    def db(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "db", *args], env={**small.env, **env}, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    # The database's disk on SQLite; on a server, the runtime folder's (spool, logs, backups) is ours.
    on_server = small.settings.database_path is None
    what = "runtime folder" if on_server else "database"
    health = db("health")
    assert re.search(rf"disk +{what}: .* free of 8\.0 MiB \(\d+\.\d %\) at " + re.escape(str(small.home)) + r"$",
                     health.stdout, re.M), health.stdout
    assert "<-- LOW" not in health.stdout

    total = shutil.disk_usage(small.home).total
    fill_disk(small.filler, leave=total // 20)  # 5 % free: below the default warning (10 %), not yet full
    health = db("health")
    assert re.search(rf"disk +{what}: .*\((\d\.\d) %\).*<-- LOW \(warning below 10 %\)", health.stdout), \
        health.stdout
    doctor = db("doctor")
    assert doctor.returncode == 0, doctor.stdout  # a warning, not yet a problem
    assert re.search(rf"\[WARN\] Disk of the {what} .* is filling up: .* \(\d\.\d %, warning below 10 %",
                     doctor.stdout), doctor.stdout
    page = console.get("/console/database").text
    assert 'data-disk-level="warn"' in page and "is filling up" in page
    assert console.get("/console/api/database").get_json()["disk"][0]["level"] == "warn"

    lenient = db("doctor", TICKSTACK_DISK_WARN_PCT="1")  # the threshold is a setting
    assert "filling up" not in lenient.stdout and f"[OK  ] Disk of the {what}" in lenient.stdout

    fill_disk(small.filler.with_name("filler2"))  # now full: the writer refuses (SQLite), doctor reports a problem
    if not on_server:
        with WriterClient(settings=small.settings, deadline=2) as client, \
                pytest.raises(StorageFull, match="disk is full"):
            client.call("insert_ticks", ticks=[{"symbol": "BTCUSD", "ts": T0, "bid": 1.0, "ask": 1.0}])
    doctor = db("doctor")
    assert doctor.returncode == 1, doctor.stdout
    assert re.search(rf"\[FAIL\] Disk of the {what} .* is almost full", doctor.stdout), doctor.stdout
    if not on_server:
        assert re.search(r"\[FAIL\] The writer refused \d+ writes since it started because the disk was full",
                         doctor.stdout), doctor.stdout
    page = console.get("/console/database").text
    assert 'data-disk-level="fail"' in page and "almost full" in page


def test_circus_log_streams_lose_output_on_a_full_disk_without_failing_and_say_so_after(small: SmallHome) -> None:
    path = small.home / "log" / "worker.log"
    stream = PrivateFileStream(str(path), max_bytes=10_485_760, backup_count=5)
    stream({"data": b"before the disk filled\n", "pid": 1})
    fill_disk(small.filler)
    for i in range(100):  # circusd's redirector calls the stream: an exception here would reach circusd
        stream({"data": f"{i:04d} {'x' * 1000}\n".encode(), "pid": 1})
    assert stream.lost > 0
    small.filler.unlink()
    stream({"data": b"after space returned\n", "pid": 1})
    stream.close()
    text = path.read_text()
    assert text.startswith("before the disk filled\n") and text.endswith("after space returned\n")
    assert re.search(r"\[circus: about \d+ bytes of this output were lost: OSError: \[Errno 28\] No space left on "
                     r"device\]\nafter space returned\n$", text), text[-300:]


@pytest.mark.sqlite_only("tests/test_postgres_faults.py::test_a_full_disk_on_the_server_is_storage_full_and_writes_resume_once_space_is_freed")
def test_the_copy_of_a_removed_database_is_not_begun_without_room_and_leaves_nothing(small: SmallHome) -> None:
    """The writer's copy of a database removed under it (``VACUUM INTO``): one that failed for want of
    room left a part-written copy and its hot journal, which emptied a good file later put at its name,
    and filled the disk the feeds' spool needed (review of round 39). It is not begun without room for
    the database's pages, and a copy that fails leaves nothing; one with room is whole."""
    import sqlite3

    from db.engine import make_write_engine
    from workers.write_connection import WriteConnection

    settings = load_settings(small.env)
    path = settings.database_path
    assert path is not None
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE filler (b BLOB)")
    con.executemany("INSERT INTO filler VALUES (randomblob(4096))", [()] * 100)  # about 400 KiB
    con.commit()
    con.close()
    engine = make_write_engine(settings)
    link = WriteConnection(settings, engine, engine.connect())
    filler = small.home / "filler"
    try:
        fill_disk(filler, leave=100_000)
        with pytest.raises(OSError, match=r"the copy needs about [\d.]+ KiB and .* has [\d.]+ KiB free"):
            link.save_copy(path)
        assert sorted(p.name for p in path.parent.iterdir() if ".saved" in p.name) == []
        filler.unlink()
        copy = link.save_copy(path)
    finally:
        link.conn.close()
        engine.dispose()
    assert copy == path.with_name(path.name + ".saved")
    saved = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    try:
        assert saved.execute("SELECT count(*) FROM filler").fetchone() == (100,)
    finally:
        saved.close()
