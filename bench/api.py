"""``python -m bench api``: the REST API under real gunicorn, read while the writer ingests.

The question: does reading through the API stay fast while the single writer
ingests at full speed? Readers (gunicorn workers on read-only engines) and
the writer share one SQLite file in WAL mode, and on a small machine they
also share the CPU. This benchmark serves the API exactly as production does
(``circus.ini``: gunicorn, 2 sync workers, ``--no-control-socket``,
``--graceful-timeout 10``, access log on), in front of the real writer
(``workers.writer.spawn``), on one fresh ``TICKSTACK_HOME`` made by
``bench.common.fresh_home``, and measures from outside over HTTP.

Setup (not measured)
    The writer is started; ``--seed-ticks`` ticks of BTCUSD and ETHUSD, one
    per symbol per second (so there are enough 1m bars to read: 200k ticks
    give ~1,660 per symbol), are sent through the writer's pipeline (columns
    form, batches of 5000, window 16); then ``python -m workers.analysis
    --until-idle`` runs once and stores the bars and indicators. gunicorn
    serves ``webapp:create_app('api')`` on a socket the benchmark binds to
    127.0.0.1 on a free port and hands over as ``fd://`` (as circus does, so
    no other process can take the port in between), with a known
    ``TICKSTACK_API_TOKEN``. The benchmark waits for ``/api/health`` to
    answer 200 and for every worker to finish loading the app, and checks
    that both read routes return data.

``idle``
    ``--clients`` client processes, each with one ``http.client`` connection
    (HTTP/1.1, keep-alive requested), alternate ``GET
    /api/ticks?symbol=BTCUSD&limit=100`` and ``GET
    /api/bars?symbol=BTCUSD&timeframe=1m`` as fast as answers come, for
    ``--seconds``. Latency is per request, from sending it to the last byte
    of the answer. Processes rather than threads, so the clients' own GIL
    does not add to the latency measured.
``under-load``
    The same read load while a separate producer process runs full batched
    ingest through the writer: ``insert_ticks`` in columns form, batches of
    ``--ingest-batch`` (5000) with ``--window`` (16) in flight
    (``WriterClient.pipeline``), new ticks of BTCUSD and ETHUSD that are
    newer than the seed (so ``/api/ticks`` reads what is being written), each
    run under its own ``source``. The producer starts :data:`INGEST_LEAD` s
    before the readers and stops after them, so the whole read window is one
    of steady ingest; the ingest rate reported counts the rows acknowledged
    within the read window. Target: each read route's p99 under load is at
    most :data:`P99_RATIO_TARGET` times its idle p99.
``write``
    ``--clients`` processes ``POST /api/ticks`` with ``Authorization: Bearer``
    for ``--seconds``, each request ``--post-batch`` ticks as a JSON list of
    tick objects (what an HTTP client sends), each client its own ``source``
    and increasing ``seq`` (so every tick is unique). Afterwards the rows of
    each source are counted with a read-only ``sqlite3`` connection: the
    stored ticks must equal the acknowledged ones (and the seed's and the
    producer's rows are checked the same way).

``--repeat N`` runs idle and under-load N times, interleaved (so a slow
drift of the machine hits both alike); the ratio then compares all idle
latencies with all under-load ones. ``--writer-nice N`` runs the writer (all
its threads) at nice N: an experiment in giving the readers CPU priority.

Why the ratio can miss, and how a run tells the causes apart. On 2 cores,
producer, writer, gunicorn and clients contend for the CPU, and the clients
are closed-loop (each sends its next request when the last is answered), so
even ``idle`` keeps both cores busy: under load the writer's CPU share comes
out of the readers'. For every measured window the benchmark records the
machine's CPU time by kind (steal included: on a VM the host can take CPUs
away), Linux CPU pressure (PSI), the CPU time and run-queue wait (the
kernel's ``schedstat``: runnable, but waiting for a CPU) of the writer and
the gunicorn workers, the CPU time other processes on the machine used (a
window where more than :data:`NOISY_PCT` % of the machine was not ours is
flagged), the writer's counters (commits, requests resent after a client
timeout, busy replies, lock errors) and the WAL's size. Per request served,
the gunicorn workers' time splits into on-CPU, waiting for a CPU, and
neither (blocked: network, SQLite's busy handler, disk; or idle). On-CPU
time per request that stays flat while run-queue wait grows is CPU
contention; on-CPU or blocked time that grows points at SQLite itself (a
longer WAL to search, lock waits, checkpoints).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    REPO_ROOT,
    Gate,
    WriterRun,
    fresh_home,
    int_between,
    latency_summary,
    positive_float,
    positive_int,
    run_group,
    running_writer,
    stop_process,
    writable_file,
)
from db.health import connect_read_only

#: The read routes, alternated by every read client.
READ_ROUTES: dict[str, str] = {
    "GET /api/ticks": "/api/ticks?symbol=BTCUSD&limit=100",
    "GET /api/bars": "/api/bars?symbol=BTCUSD&timeframe=1m",
}
POST_ROUTE = "POST /api/ticks"
#: Target: p99 under load / p99 idle, per read route.
P99_RATIO_TARGET = 2.0
#: A window in which more than this share of the machine's CPU went to
#: anything but this benchmark is flagged: it measured someone else too.
NOISY_PCT = 10.0
SYMBOLS = ("BTCUSD", "ETHUSD")
#: Seed ticks: one per symbol per second from 2024-01-01T00:00:00Z.
SEED_T0 = 1_704_067_200_000
SEED_SPACING_MS = 1000
SEED_SOURCE = "bench-seed"
INGEST_SOURCE = "bench-ingest-"  # + the run number: every run stores new (source, seq)
POST_SOURCE = "bench-post-"
#: The producer runs this long before the read window (and a little after it).
INGEST_LEAD = 1.0
INGEST_TAIL = 0.2
MAX_TICKS = 10_000  # db.ops.MAX_TICKS: the writer refuses larger batches
HTTP_TIMEOUT = 30.0
GUNICORN_READY_TIMEOUT = 60.0
GUNICORN_STOP_TIMEOUT = 20.0
RUN_GROUP_LEAD = 0.1  # bench.common.run_group's default lead


# --- tick data ------------------------------------------------------------------------------


def tick_columns(first: int, n: int, source: str, ts0: int, spacing_ms: int) -> dict[str, list[Any]]:
    """``n`` ticks in ``insert_ticks``' columns form, alternating BTCUSD and
    ETHUSD, ``seq`` from ``first``; tick ``i`` has ``ts = ts0 + (i // 2) *
    spacing_ms``. (``bench.common.tick_batches`` spreads 8 symbols 1 ms
    apart: far too few 1m bars per symbol for ``/api/bars``.)"""
    idx = range(first, first + n)
    bid = [100.0 + (i * 7919 % 1000) * 0.01 for i in idx]  # jumps about, so bars have real ranges
    return {
        "symbol": [SYMBOLS[i % 2] for i in idx],
        "ts": [ts0 + (i // 2) * spacing_ms for i in idx],
        "bid": bid,
        "ask": [b + 0.02 for b in bid],
        "volume": [float(i % 10) for i in idx],
        "source": [source] * n,
        "seq": list(idx),
    }


# --- measuring processes ----------------------------------------------------------------------


def schedstat_self() -> tuple[int, int]:
    """(ns on CPU, ns runnable but waiting for a CPU) of this process, all threads."""
    return schedstat(os.getpid()) or (0, 0)


def schedstat(pid: int) -> tuple[int, int] | None:
    """The kernel's ``/proc/PID/task/*/schedstat`` summed: (ns on CPU, ns in the run queue)."""
    cpu = wait = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                on_cpu, waiting, _slices = f.read().split()
        except (OSError, ValueError):
            continue  # a thread that just ended
        cpu += int(on_cpu)
        wait += int(waiting)
    return cpu, wait


def _error_key(e: BaseException) -> str:
    message = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {message[:160]}"


def _http_error_key(status: int, body: bytes) -> str:
    try:
        code = json.loads(body)["error"]["code"]
    except Exception:  # not our error shape: the status says enough
        code = body[:80].decode(errors="replace")
    return f"HTTP {status}: {code}"


class HttpClient:
    """One ``http.client`` connection (HTTP/1.1, so keep-alive is asked for);
    counts the TCP connections it had to open (a server that closes after
    each answer costs a connect per request)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
        self.connects = 0

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        if self.conn.sock is None:
            self.connects += 1
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            response = self.conn.getresponse()
            return response.status, response.read()
        except BaseException:
            self.conn.close()  # start the next request on a fresh connection
            raise

    def close(self) -> None:
        self.conn.close()


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _reader(index: int, port: int, seconds: float, lead: float, *, gate: Gate) -> dict[str, Any]:
    """Alternate the read routes for ``seconds``, starting ``lead`` s after the gate."""
    client = HttpClient(port)
    for route, path in READ_ROUTES.items():  # warm up, and check there is something to read
        status, body = client.request("GET", path)
        if status != 200:
            raise RuntimeError(f"{route} answered {status} before the run: {body[:300]!r}")
        doc = json.loads(body)
        rows = doc.get("ticks", doc.get("bars"))
        if not rows:
            raise RuntimeError(f"{route} returned no rows before the run: {body[:300]!r}")
    routes = list(READ_ROUTES)
    latencies: dict[str, list[float]] = {r: [] for r in routes}
    errors: dict[str, Counter[str]] = {r: Counter() for r in routes}
    first = gate.wait() + lead
    _sleep_until(first)
    end = first + seconds
    connects0, cpu0, (sched_cpu0, sched_wait0) = client.connects, time.process_time(), schedstat_self()
    n = index  # clients start on different routes
    while time.monotonic() < end:
        route = routes[n % len(routes)]
        n += 1
        t0 = time.perf_counter()
        try:
            status, body = client.request("GET", READ_ROUTES[route])
        except Exception as e:  # every failure counts, whatever its type
            errors[route][_error_key(e)] += 1
            continue
        elapsed = time.perf_counter() - t0
        if status == 200:
            latencies[route].append(elapsed)
        else:
            errors[route][_http_error_key(status, body)] += 1
    last = time.monotonic()
    sched_cpu, sched_wait = schedstat_self()
    client.close()
    return {"role": "reader", "first": first, "last": last, "latencies": latencies,
            "errors": {r: dict(c) for r, c in errors.items()}, "connects": client.connects - connects0,
            "cpu_s": time.process_time() - cpu0, "runq_wait_s": (sched_wait - sched_wait0) / 1e9,
            "sched_cpu_s": (sched_cpu - sched_cpu0) / 1e9}


def _producer(index: int, env: dict[str, str], seconds: float, batch: int, window: int, first_ts: int,
              source: str, *, gate: Gate) -> dict[str, Any]:
    """Full-speed pipelined ingest through the writer for ``seconds`` after the gate."""
    from db.client import Ticket, WriterClient
    from db.config import load_settings

    acks: list[tuple[float, int]] = []
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    duplicates = 0
    # The columns that do not change from batch to batch are built once: the
    # producer should cost what a real feed handler costs, not what list
    # building in Python costs.
    template = tick_columns(0, batch, source, 0, 1)

    def on_done(ticket: Ticket) -> None:
        nonlocal duplicates
        if ticket.error is not None:
            errors[_error_key(ticket.error)] += 1
            return
        result = ticket.result()
        acks.append((time.monotonic(), result["inserted"]))
        duplicates += result["duplicates"]
        if ticket.latency is not None:
            latencies.append(ticket.latency)

    sent = 0
    with WriterClient(settings=load_settings(env)) as client:
        client.ping(timeout=30.0)
        start = gate.wait()
        end = start + seconds
        cpu0 = time.process_time()
        with client.pipeline(window=window, on_done=on_done) as pipe:
            while time.monotonic() < end:
                ts = first_ts + sent
                pipe.submit("insert_ticks", ticks={**template, "ts": list(range(ts, ts + batch)),
                                                   "seq": list(range(sent, sent + batch))})
                sent += batch
        cpu = time.process_time() - cpu0
    return {"role": "producer", "first": start, "last": time.monotonic(), "acks": acks, "sent": sent,
            "duplicates": duplicates, "latencies": latencies, "errors": dict(errors), "cpu_s": cpu}


def _poster(index: int, port: int, token: str, seconds: float, batch: int, first_ts: int, *,
            gate: Gate) -> dict[str, Any]:
    """POST batches of unique ticks for ``seconds``; count what was acknowledged."""
    source = f"{POST_SOURCE}{index}"
    client = HttpClient(port)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    inserted = duplicates = unacknowledged = seq = 0
    first = gate.wait()
    end = first + seconds
    cpu0, (sched_cpu0, sched_wait0) = time.process_time(), schedstat_self()
    while time.monotonic() < end:
        ticks = [{"symbol": SYMBOLS[i % 2], "ts": first_ts + i, "bid": 100.0 + i % 1000 * 0.01,
                  "ask": 100.02 + i % 1000 * 0.01, "volume": 1.0, "source": source, "seq": i}
                 for i in range(seq, seq + batch)]
        body = json.dumps({"ticks": ticks}).encode()
        seq += batch
        t0 = time.perf_counter()
        try:
            status, answer = client.request("POST", "/api/ticks", body=body, headers=headers)
        except Exception as e:  # every failure counts, whatever its type
            errors[_error_key(e)] += 1
            unacknowledged += batch
            continue
        elapsed = time.perf_counter() - t0
        if status != 200:
            errors[_http_error_key(status, answer)] += 1
            unacknowledged += batch
            continue
        doc = json.loads(answer)
        inserted += doc["inserted"]
        duplicates += doc["duplicates"]
        latencies.append(elapsed)
    last = time.monotonic()
    sched_cpu, sched_wait = schedstat_self()
    client.close()
    return {"role": "poster", "source": source, "first": first, "last": last, "latencies": latencies,
            "errors": dict(errors), "sent": seq, "inserted": inserted, "duplicates": duplicates,
            "unacknowledged": unacknowledged, "connects": client.connects, "cpu_s": time.process_time() - cpu0,
            "runq_wait_s": (sched_wait - sched_wait0) / 1e9, "sched_cpu_s": (sched_cpu - sched_cpu0) / 1e9}


ROLES = {"reader": _reader, "producer": _producer, "poster": _poster}


def load_process(index: int, role: str, args: tuple, *, gate: Gate) -> dict[str, Any]:
    """Entry point of every load process (``run_group`` runs one function):
    ``role`` picks reader, producer or poster."""
    return ROLES[role](index, *args, gate=gate)


# --- gunicorn -------------------------------------------------------------------------------


@dataclass
class Gunicorn:
    """A running gunicorn master serving the API on ``port``."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    workers: int
    extra: dict[str, Any] = field(default_factory=dict)

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.worker_processes()]

    def worker_processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of gunicorn's own log (access log lines left out)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join([line for line in text if '"GET /' not in line and '"POST /' not in line][-lines:])


def _get_json(port: int, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, body[:300]


def _wait_ready(gun: Gunicorn, timeout: float) -> None:
    """Until ``/api/health`` answers 200, then until every worker has finished
    loading the app (its CPU time stops growing: the app is loaded after the
    fork, in each worker)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        if gun.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with code {gun.proc.returncode} before it was ready:\n"
                               f"{gun.log_tail()}")
        try:
            status, last = _get_json(gun.port, "/api/health")
            if status == 200:
                gun.extra["health"] = last
                break
        except (OSError, http.client.HTTPException) as e:
            last = _error_key(e)
        if time.monotonic() > deadline:
            raise RuntimeError(f"gunicorn: /api/health did not answer 200 within {timeout} s; last: {last}\n"
                               f"{gun.log_tail()}")
        time.sleep(0.2)
    quiet_for: dict[int, float] = {}
    cpu: dict[int, float] = {}
    while time.monotonic() < deadline:
        pids = gun.worker_pids()
        now = time.monotonic()
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            used = t.user + t.system
            if cpu.get(pid) != used:
                cpu[pid], quiet_for[pid] = used, now
        if len(pids) >= gun.workers and all(now - quiet_for.get(p, now) >= 0.5 for p in pids):
            return
        time.sleep(0.1)
    gun.extra["ready_note"] = "workers still busy after the ready timeout; measured anyway"


@contextmanager
def running_gunicorn(env: dict[str, str], workers: int, log_path: Path) -> Iterator[Gunicorn]:
    """gunicorn as in ``circus.ini``, on a socket bound here (127.0.0.1, a free
    port) and passed as ``fd://``; stopped with SIGTERM, then SIGKILL, on exit."""
    gunicorn = Path(sys.executable).parent / "gunicorn"
    if not gunicorn.exists():
        raise RuntimeError(f"{gunicorn} does not exist: install gunicorn in the venv")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    cmd = [str(gunicorn), "--bind", f"fd://{sock.fileno()}", "--workers", str(workers), "--graceful-timeout", "10",
           "--no-control-socket", "--access-logfile", "-", "webapp:create_app('api')"]
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, pass_fds=(sock.fileno(),), stdout=log,
                                    stderr=subprocess.STDOUT)
    finally:
        sock.close()  # gunicorn holds its own copy
    gun = Gunicorn(proc=proc, port=port, log_path=log_path, workers=workers, extra={"cmd": cmd[1:]})
    known_workers: dict[int, psutil.Process] = {}
    try:
        _wait_ready(gun, GUNICORN_READY_TIMEOUT)
        known_workers.update((p.pid, p) for p in gun.worker_processes())
        yield gun
    finally:
        known_workers.update((p.pid, p) for p in gun.worker_processes())
        if stop_process(proc, GUNICORN_STOP_TIMEOUT):
            gun.extra["killed"] = True
        # Only gunicorn's own workers, by pid, if any outlived their master
        # (psutil checks the pid still names the same process).
        for worker in known_workers.values():
            try:
                if worker.is_running():
                    worker.kill()
                    worker.wait(5)
                    gun.extra["workers_killed"] = gun.extra.get("workers_killed", 0) + 1
            except psutil.Error:
                pass
        gun.extra["exit_code"] = proc.returncode


# --- the measured window, seen from the machine ----------------------------------------------


def _psi_cpu_some_us() -> int | None:
    """Linux CPU pressure: total µs some task was runnable but waiting for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpu_s(pid: int) -> float | None:
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


#: CPU time categories of ``psutil.cpu_times()`` reported for the whole machine
#: (guest time is already inside user time on Linux).
CPU_KINDS = {"user": ("user", "nice"), "system": ("system",), "irq": ("irq", "softirq"), "steal": ("steal",),
             "idle": ("idle", "iowait")}


def _process_cpu_table() -> dict[int, tuple[str, float]]:
    """Every process's (label, CPU seconds) now."""
    table = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        t = proc.info["cpu_times"]
        if t is None:
            continue
        cmd = " ".join(proc.info["cmdline"] or []) or f"[{proc.info['name']}]"
        table[proc.pid] = (cmd[:70], t.user + t.system)
    return table


class WindowMonitor(threading.Thread):
    """From ``start_at`` for ``seconds``: the machine's CPU time by kind
    (steal included: on a VM the host can take CPUs away) and Linux CPU
    pressure; CPU time and run-queue wait of each server process group; what
    every other process on the machine used (the benchmark's own processes
    are this one and its descendants); the WAL's size."""

    def __init__(self, groups: dict[str, list[int]], wal_path: Path, start_at: float, seconds: float) -> None:
        super().__init__(name="window-monitor", daemon=True)
        self.groups = groups
        self.wal_path = wal_path
        self.start_at = start_at
        self.seconds = seconds
        self.wal_max = 0
        self.wal_at_start = 0
        self.result: dict[str, Any] = {}

    def _wal_size(self) -> int:
        try:
            return self.wal_path.stat().st_size
        except OSError:
            return 0

    def _snapshot(self) -> dict[str, Any]:
        pids = [pid for group in self.groups.values() for pid in group]
        me = psutil.Process()
        return {"t": time.monotonic(), "sys": psutil.cpu_times(), "psi": _psi_cpu_some_us(),
                "cpu": {pid: _cpu_s(pid) for pid in pids}, "sched": {pid: schedstat(pid) for pid in pids},
                "ours": {me.pid, *(c.pid for c in me.children(recursive=True))}, "all": _process_cpu_table()}

    def run(self) -> None:
        _sleep_until(self.start_at)
        before = self._snapshot()
        self.wal_at_start = self._wal_size()
        end = self.start_at + self.seconds
        while time.monotonic() < end:
            self.wal_max = max(self.wal_max, self._wal_size())
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        after = self._snapshot()
        self.result = self._compare(before, after)

    def _compare(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        elapsed = after["t"] - before["t"]
        kinds = {kind: round(sum(getattr(after["sys"], f, 0.0) - getattr(before["sys"], f, 0.0) for f in fields), 3)
                 for kind, fields in CPU_KINDS.items()}
        total = sum(kinds.values())
        busy = total - kinds["idle"]
        groups: dict[str, Any] = {}
        for name, pids in self.groups.items():
            cpu = wait = 0.0
            for pid in pids:
                c0, c1 = before["cpu"].get(pid), after["cpu"].get(pid)
                s0, s1 = before["sched"].get(pid), after["sched"].get(pid)
                if c0 is not None and c1 is not None:
                    cpu += c1 - c0
                if s0 is not None and s1 is not None:
                    wait += (s1[1] - s0[1]) / 1e9
            groups[name] = {"pids": pids, "cpu_s": round(cpu, 3), "runq_wait_s": round(wait, 3)}
        ours_pids = before["ours"] | after["ours"]
        used: dict[int, tuple[str, float]] = {}
        for pid, (label, cpu) in after["all"].items():
            if pid in ours_pids:
                continue
            # A process that started during the window: all of its CPU time counts.
            delta = cpu - before["all"][pid][1] if pid in before["all"] else cpu
            if delta > 0:
                used[pid] = (label, delta)
        ours_cpu = sum(after["all"][p][1] - before["all"][p][1] for p in ours_pids
                       if p in after["all"] and p in before["all"])
        top = sorted(used.items(), key=lambda kv: -kv[1][1])[:5]
        capacity = (psutil.cpu_count() or 1) * elapsed
        psi = None
        if before["psi"] is not None and after["psi"] is not None and elapsed > 0:
            psi = round((after["psi"] - before["psi"]) / 1e6 / elapsed * 100, 1)
        return {
            "elapsed_s": round(elapsed, 3), "cpus": psutil.cpu_count() or 1,
            "system_cpu_s": kinds, "system_busy_pct": round(busy / total * 100, 1) if total > 0 else None,
            "system_busy_cpu_s": round(busy, 3),
            "cpu_pressure_some_pct": psi,
            "groups": groups,
            "ours_cpu_s": round(ours_cpu, 3),
            # Everything busy that was not this benchmark: other processes, short-lived ones, the kernel.
            "not_ours_pct": round(max(0.0, busy - ours_cpu) / capacity * 100, 1) if capacity > 0 else None,
            "others_cpu_s": round(sum(cpu for _label, cpu in used.values()), 3),
            "others_top": [{"pid": pid, "cpu_s": round(cpu, 3), "cmd": label} for pid, (label, cpu) in top],
            "wal_start_mb": round(self.wal_at_start / 2**20, 2),
            "wal_max_mb": round(self.wal_max / 2**20, 2),
        }


# --- setup ---------------------------------------------------------------------------------


def seed(env: dict[str, str], ticks: int, batch: int, window: int) -> dict[str, Any]:
    """Store ``ticks`` seed ticks through the writer's pipeline."""
    from db.client import Ticket, WriterClient
    from db.config import load_settings

    inserted = 0
    failures: list[str] = []

    def on_done(ticket: Ticket) -> None:
        nonlocal inserted
        if ticket.error is not None:
            failures.append(_error_key(ticket.error))
        else:
            inserted += ticket.result()["inserted"]

    t0 = time.monotonic()
    with WriterClient(settings=load_settings(env)) as client, client.pipeline(window=window, on_done=on_done) as pipe:
        for first in range(0, ticks, batch):
            n = min(batch, ticks - first)
            pipe.submit("insert_ticks", ticks=tick_columns(first, n, SEED_SOURCE, SEED_T0, SEED_SPACING_MS))
    if failures or inserted != ticks:
        raise RuntimeError(f"seeding stored {inserted} of {ticks} ticks; errors: {Counter(failures).most_common(3)}")
    return {"ticks": inserted, "seconds": round(time.monotonic() - t0, 2)}


def run_analysis(env: dict[str, str], log_path: Path, timeout: float = 300.0) -> dict[str, Any]:
    """``python -m workers.analysis --until-idle``, once: bars and indicators from the seed."""
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.run([sys.executable, "-m", "workers.analysis", "--until-idle", "--log-level", "WARNING"],
                              env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              check=False)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"workers.analysis --until-idle exited with code {proc.returncode}:\n{tail}")
    return {"seconds": round(time.monotonic() - t0, 2)}


def table_counts(db_path: Path) -> dict[str, Any]:
    """Rows per tick source, and bars/indicators, read with a read-only sqlite3 connection."""
    con = connect_read_only(db_path)
    try:
        by_source = dict(con.execute("SELECT source, count(*) FROM ticks GROUP BY source").fetchall())
        bars = dict(con.execute("SELECT timeframe, count(*) FROM bars WHERE symbol = 'BTCUSD' GROUP BY timeframe"))
        indicators = con.execute("SELECT count(*) FROM indicators").fetchone()[0]
    finally:
        con.close()
    return {"ticks_by_source": by_source, "btcusd_bars": bars, "indicators": indicators}


# --- scenarios ------------------------------------------------------------------------------


@dataclass
class Bench:
    """What every scenario needs: options, environment, the servers."""

    opts: argparse.Namespace
    env: dict[str, str]
    writer: WriterRun
    gunicorn: Gunicorn
    token: str
    db_path: Path
    #: ts of the next ingest tick, so each run's ticks are newer than the last
    next_ts: int = 0

    def monitor(self, start_at: float) -> WindowMonitor:
        groups = {"writer": [self.writer.pid], "gunicorn master": [self.gunicorn.proc.pid],
                  "gunicorn workers": self.gunicorn.worker_pids()}
        wal = self.db_path.with_name(self.db_path.name + "-wal")
        return WindowMonitor(groups, wal, start_at, self.opts.seconds)


def _route_stats(latencies: list[float], errors: Counter[str], elapsed: float) -> dict[str, Any]:
    n = len(latencies)
    return {"requests": n, "req_per_s": round(n / elapsed, 1) if elapsed > 0 else None,
            "errors": sum(errors.values()), "errors_by_message": dict(errors.most_common()),
            "latency": latency_summary(latencies)}


def _workers_per_request(window: dict[str, Any], requests: int) -> dict[str, Any]:
    """The gunicorn workers' time per request they served: on a CPU, runnable
    but waiting for one, and neither (blocked: network, SQLite's busy
    handler, disk; or idle, waiting for a request)."""
    g = window["groups"]["gunicorn workers"]
    if not requests:
        return {}
    off_cpu = len(g["pids"]) * window["elapsed_s"] - g["cpu_s"] - g["runq_wait_s"]
    return {"requests": requests, "cpu_ms_per_request": round(g["cpu_s"] / requests * 1000, 3),
            "runq_wait_ms_per_request": round(g["runq_wait_s"] / requests * 1000, 3),
            "blocked_or_idle_ms_per_request": round(max(0.0, off_cpu) / requests * 1000, 3)}


def _clients_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"processes": len(results), "cpu_s": round(sum(r["cpu_s"] for r in results), 3),
            "runq_wait_s": round(sum(r["runq_wait_s"] for r in results), 3),
            "tcp_connects": sum(r["connects"] for r in results)}


def _run_measured(b: Bench, args: list[tuple], lead: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the load processes; the window monitor covers the measured window."""
    holder: dict[str, WindowMonitor] = {}

    def on_start() -> None:  # run_group lets the processes go RUN_GROUP_LEAD s from now
        holder["monitor"] = b.monitor(time.monotonic() + RUN_GROUP_LEAD + lead)
        holder["monitor"].start()

    before = writer_stats(b.env)
    _start, results = run_group(load_process, args, lead=RUN_GROUP_LEAD, on_start=on_start,
                                run_timeout=b.opts.seconds + lead + 120)
    monitor = holder["monitor"]
    monitor.join(b.opts.seconds + 30)
    after = writer_stats(b.env)
    window = dict(monitor.result)
    if before and after:
        window["writer_counters"] = {k: after[k] - before[k] for k in WRITER_COUNTERS if k in before and k in after}
    return results, window


#: The writer's counters (``stats()``) compared before and after each run.
WRITER_COUNTERS = ("batches", "requests_ok", "requests_failed", "dedup_hits", "busy_replies", "lock_errors",
                   "commit_failures", "ticks_inserted")


def writer_stats(env: dict[str, str]) -> dict[str, Any] | None:
    """The writer's ``stats()``, or None if it does not answer (the run is measured anyway)."""
    from db.client import WriterClient
    from db.config import load_settings

    try:
        with WriterClient(settings=load_settings(env)) as client:
            return client.stats(timeout=10.0)
    except Exception:  # reported as missing counters
        return None


def run_reads(b: Bench, name: str, run: int, with_ingest: bool) -> dict[str, Any]:
    """``idle`` or ``under-load``: the read clients, and the producer if ``with_ingest``."""
    opts = b.opts
    lead = INGEST_LEAD if with_ingest else 0.0
    args: list[tuple] = [("reader", (b.gunicorn.port, opts.seconds, lead)) for _ in range(opts.clients)]
    first_ts = b.next_ts
    if with_ingest:
        args.append(("producer", (b.env, lead + opts.seconds + INGEST_TAIL, opts.ingest_batch, opts.window,
                                  first_ts, f"{INGEST_SOURCE}{run}")))
    results, window = _run_measured(b, args, lead)
    readers = [r for r in results if r["role"] == "reader"]
    first = min(r["first"] for r in readers)
    elapsed = max(r["last"] for r in readers) - first
    raw: dict[str, tuple[list[float], Counter[str]]] = {}
    for route in READ_ROUTES:
        errors: Counter[str] = Counter()
        for r in readers:
            errors.update(r["errors"][route])
        raw[route] = ([x for r in readers for x in r["latencies"][route]], errors)
    routes = {route: _route_stats(lat, errors, elapsed) for route, (lat, errors) in raw.items()}
    requests = sum(s["requests"] + s["errors"] for s in routes.values())
    out: dict[str, Any] = {"scenario": name, "clients": opts.clients, "elapsed_s": round(elapsed, 3),
                           "routes": routes, "window": window, "clients_load": _clients_summary(readers),
                           "gunicorn_workers": _workers_per_request(window, requests), "_raw": raw}
    if with_ingest:
        (producer,) = [r for r in results if r["role"] == "producer"]
        in_window = sum(n for t, n in producer["acks"] if first <= t <= first + elapsed)
        b.next_ts = first_ts + producer["sent"]
        out["ingest"] = {
            "rows_in_window": in_window, "rows_per_s": round(in_window / elapsed, 1) if elapsed > 0 else None,
            "rows_total": sum(n for _t, n in producer["acks"]), "rows_sent": producer["sent"],
            "duplicates": producer["duplicates"],
            "producer_cpu_s": round(producer["cpu_s"], 3),
            "errors": sum(producer["errors"].values()), "errors_by_message": producer["errors"],
            "request_latency": latency_summary(producer["latencies"]),
            "batch": opts.ingest_batch, "window": opts.window,
        }
    return out


def run_writes(b: Bench) -> dict[str, Any]:
    """``write``: POST /api/ticks from every client; the stored rows are checked at the end."""
    opts = b.opts
    args: list[tuple] = [("poster", (b.gunicorn.port, b.token, opts.seconds, opts.post_batch, b.next_ts))
                         for _ in range(opts.clients)]
    results, window = _run_measured(b, args, 0.0)
    first = min(r["first"] for r in results)
    elapsed = max(r["last"] for r in results) - first
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    stats = _route_stats([x for r in results for x in r["latencies"]], errors, elapsed)
    inserted = sum(r["inserted"] for r in results)
    return {
        "scenario": "write", "clients": opts.clients, "elapsed_s": round(elapsed, 3), "routes": {POST_ROUTE: stats},
        "post_batch": opts.post_batch, "ticks_acknowledged": inserted,
        "ticks_per_s": round(inserted / elapsed, 1) if elapsed > 0 else None,
        "duplicates_reported": sum(r["duplicates"] for r in results),
        "ticks_unacknowledged": sum(r["unacknowledged"] for r in results),
        "acknowledged_by_source": {r["source"]: r["inserted"] for r in results},
        "window": window, "clients_load": _clients_summary(results),
        "gunicorn_workers": _workers_per_request(window, stats["requests"] + stats["errors"]),
    }


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The read runs of one scenario taken together (latencies pooled)."""
    ok = [r for r in runs if "failed" not in r]
    if not ok:
        return None
    elapsed = sum(r["elapsed_s"] for r in ok)
    routes = {}
    for route in READ_ROUTES:
        errors: Counter[str] = Counter()
        latencies: list[float] = []
        for r in ok:
            lat, err = r["_raw"][route]
            latencies += lat
            errors.update(err)
        routes[route] = _route_stats(latencies, errors, elapsed)
    return {"runs": len(ok), "elapsed_s": round(elapsed, 3), "routes": routes}


def renice_all_threads(pid: int, niceness: int) -> list[int]:
    """Set ``niceness`` on every thread of ``pid`` (on Linux it is per thread); returns the thread ids."""
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    for tid in tids:
        os.setpriority(os.PRIO_PROCESS, tid, niceness)
    return tids


# --- report ---------------------------------------------------------------------------------


def verify(runs: list[dict[str, Any]], counts: dict[str, Any], seed_ticks: int) -> list[dict[str, Any]]:
    """Stored rows per source against what was acknowledged."""
    by_source = counts["ticks_by_source"]
    checks: list[dict[str, Any]] = [{"what": "seed ticks", "stored": by_source.get(SEED_SOURCE, 0),
                                     "expected": seed_ticks}]
    ingests = [r["ingest"] for r in runs if "ingest" in r]
    if ingests:
        checks.append({"what": "ingested ticks (under-load producer)",
                       "stored": sum(n for s, n in by_source.items() if s.startswith(INGEST_SOURCE)),
                       "expected": sum(i["rows_total"] for i in ingests),
                       "duplicates_reported": sum(i["duplicates"] for i in ingests)})
    for write in (r for r in runs if r["scenario"] == "write" and "failed" not in r):
        stored = sum(n for s, n in by_source.items() if s.startswith(POST_SOURCE))
        checks.append({"what": "POSTed ticks (acknowledged)", "stored": stored, "expected": write["ticks_acknowledged"],
                       "unacknowledged_sent": write["ticks_unacknowledged"],
                       "duplicates_reported": write["duplicates_reported"]})
    for c in checks:
        # A request that failed (e.g. 503 after the writer deadline) may or may not have been applied.
        slack = c.get("unacknowledged_sent", 0)
        c["ok"] = c["expected"] <= c["stored"] <= c["expected"] + slack and not c.get("duplicates_reported")
    return checks


def evaluate(summary: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """p99 under load over p99 idle, per read route, against the target; not
    reliable when another process took a noticeable share of the machine in
    any idle or under-load window."""
    noisy = [r for r in runs if r["scenario"] in ("idle", "under-load")
             and ((r.get("window") or {}).get("not_ours_pct") or 0) > NOISY_PCT]
    checks = {}
    for route in READ_ROUTES:
        def p99(name: str, route: str = route) -> float | None:
            s = summary.get(name)
            return None if s is None else s["routes"][route]["latency"]["p99_ms"]

        idle, load = p99("idle"), p99("under-load")
        value = round(load / idle, 3) if idle and load is not None else None
        result = "n/a" if value is None else ("PASS" if value <= P99_RATIO_TARGET else "MISS")
        checks[route] = {"idle_p99_ms": idle, "under_load_p99_ms": load, "value": value,
                         "target": f"<= {P99_RATIO_TARGET:g}", "result": result, "reliable": not noisy}
    return checks


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _label(run: dict[str, Any], repeat: int) -> str:
    return run["scenario"] if repeat == 1 or run["scenario"] == "write" else f"{run['scenario']} #{run['run']}"


def table_rows(runs: list[dict[str, Any]], summary: dict[str, Any], repeat: int) -> list[dict[str, Any]]:
    """The printed table, one row per scenario run and route (then the pooled runs)."""
    labelled = [(_label(r, repeat), r) for r in runs]
    if repeat > 1:
        labelled += [(f"{name} (all {s['runs']})", s) for name, s in summary.items() if s is not None]
    rows = []
    for label, r in labelled:
        if "failed" in r:
            rows.append({"scenario": label, "route": "FAILED"})
            continue
        for route, s in r["routes"].items():
            lat = s["latency"]
            rows.append({"scenario": label, "route": route, "requests": s["requests"], "req_per_s": s["req_per_s"],
                         "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], "max_ms": lat["max_ms"],
                         "errors": s["errors"]})
    return rows


def render(doc: dict[str, Any]) -> str:
    runs = doc["runs"]
    header = ("scenario", "route", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "errors")
    cells = [(r["scenario"], r["route"], _fmt(r.get("requests")), _fmt(r.get("req_per_s"), 1),
              _fmt(r.get("p50_ms"), 2), _fmt(r.get("p99_ms"), 2), _fmt(r.get("max_ms"), 1), _fmt(r.get("errors")))
             for r in doc["table"]]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells, strict=True)]

    def line(row: tuple) -> str:
        left = [f"{row[0]:<{widths[0]}}", f"{row[1]:<{widths[1]}}"]
        return "  ".join(left + [f"{c:>{w}}" for c, w in zip(row[2:], widths[2:], strict=True)])

    out = [line(header), line(tuple("-" * w for w in widths)), *map(line, cells), ""]
    for route, c in doc["checks"].items():
        value = "-" if c["value"] is None else f"{c['value']:.2f}"
        out.append(f"p99_under_load_over_idle  {route:<15} {value:>6}   (p99 {_fmt(c['idle_p99_ms'], 2)} -> "
                   f"{_fmt(c['under_load_p99_ms'], 2)} ms)   target {c['target']}   {c['result']}"
                   + ("" if c["reliable"] else " (unreliable: noisy windows, see the warning)"))
    noisy = [f"{_label(r, doc['config']['repeat'])} ({r['window']['not_ours_pct']:g} %)" for r in runs
             if (r.get("window") or {}).get("not_ours_pct") is not None and r["window"]["not_ours_pct"] > NOISY_PCT]
    if noisy:
        out.append(f"WARNING: in {', '.join(noisy)} more than {NOISY_PCT:g} % of the machine's CPU went to other "
                   "processes: those windows measured them too (see below); rerun on a quiet machine, or with --repeat")
    for r in runs:
        if "ingest" in r:
            i, lat = r["ingest"], r["ingest"]["request_latency"]
            out.append(f"ingest during {_label(r, doc['config']['repeat'])}: {_fmt(i['rows_per_s'])} rows/s "
                       f"({_fmt(i['rows_in_window'])} rows acknowledged in the {r['elapsed_s']} s read window; "
                       f"batches of {i['batch']}, window {i['window']}; request p50 {_fmt(lat['p50_ms'], 0)} ms, "
                       f"p99 {_fmt(lat['p99_ms'], 0)} ms; {i['errors']} errors)")
        if "ticks_per_s" in r:
            s = r["routes"][POST_ROUTE]
            out.append(f"write: {_fmt(s['req_per_s'], 1)} requests/s, {_fmt(r['ticks_per_s'])} ticks/s "
                       f"({r['post_batch']} per request), p50 {_fmt(s['latency']['p50_ms'], 2)} ms, "
                       f"p99 {_fmt(s['latency']['p99_ms'], 2)} ms")
    out += ["", "stored rows:"]
    for c in doc["verification"]:
        extra = (f"; {c['unacknowledged_sent']:,} sent unacknowledged" if "unacknowledged_sent" in c else "")
        extra += f"; {c['duplicates_reported']} duplicates" if "duplicates_reported" in c else ""
        out.append(f"  {c['what']:<38} stored {c['stored']:>10,}  expected {c['expected']:>10,}{extra}  "
                   f"{'OK' if c['ok'] else 'MISMATCH'}")
    errors = [f"  {_label(r, doc['config']['repeat'])} {route}: {n:,} x {message}" for r in runs if "routes" in r
              for route, s in r["routes"].items() for message, n in s["errors_by_message"].items()]
    errors += [f"  {_label(r, doc['config']['repeat'])} ingest: {n:,} x {message}" for r in runs if "ingest" in r
               for message, n in r["ingest"]["errors_by_message"].items()]
    errors += [f"  {_label(r, doc['config']['repeat'])}: FAILED: {r['failed'].strip().splitlines()[-1]}"
               for r in runs if "failed" in r]
    out += ["", "errors by message:", *(errors or ["  none"])]
    out += ["", "where the time went, in each measured window (CPU-s = CPU seconds):"]
    for r in runs:
        w = r.get("window")
        if not w:
            continue
        k = w["system_cpu_s"]
        out.append(f"  {_label(r, doc['config']['repeat'])}: machine {_fmt(w['system_busy_pct'], 1)} % busy "
                   f"({w['system_busy_cpu_s']:.2f} of {w['cpus'] * w['elapsed_s']:.2f} CPU-s: user {k['user']:.2f}, "
                   f"system {k['system']:.2f}, irq {k['irq']:.2f}, steal {k['steal']:.2f}); CPU pressure "
                   f"{_fmt(w['cpu_pressure_some_pct'], 1)} %; this benchmark {w['ours_cpu_s']:.2f} CPU-s, "
                   f"other processes {w['others_cpu_s']:.2f}, unattributed "
                   f"{max(0.0, w['system_busy_cpu_s'] - w['ours_cpu_s'] - w['others_cpu_s']):.2f} (processes that "
                   f"came and went, kernel): {_fmt(w['not_ours_pct'], 1)} % of the machine not ours")
        groups = ", ".join(f"{g} {v['cpu_s']:.2f} (waited {v['runq_wait_s']:.2f})" for g, v in w["groups"].items())
        clients = r["clients_load"]
        producer = f", producer {r['ingest']['producer_cpu_s']:.2f}" if "ingest" in r else ""
        out.append(f"    CPU-s (run-queue wait s): {groups}, clients {clients['cpu_s']:.2f} "
                   f"(waited {clients['runq_wait_s']:.2f}){producer}")
        gw = r.get("gunicorn_workers") or {}
        out.append(f"    gunicorn workers, per request: on CPU {_fmt(gw.get('cpu_ms_per_request'), 2)} ms, waiting "
                   f"for a CPU {_fmt(gw.get('runq_wait_ms_per_request'), 2)} ms, blocked or idle "
                   f"{_fmt(gw.get('blocked_or_idle_ms_per_request'), 2)} ms; TCP connects {clients['tcp_connects']:,};"
                   f" WAL {w['wal_start_mb']} -> max {w['wal_max_mb']} MB")
        wc = w.get("writer_counters")
        if wc:
            out.append(f"    writer: {wc['batches']:,} commits, {wc['requests_ok']:,} requests, "
                       f"{wc['ticks_inserted']:,} ticks; {wc['dedup_hits']} resent requests answered from its "
                       f"record, {wc['busy_replies']} busy replies, {wc['lock_errors']} lock errors")
        busiest = [o for o in w["others_top"] if o["cpu_s"] >= 0.05 * w["elapsed_s"]]
        if busiest:
            out.append("    other processes: " + "; ".join(f"{o['cpu_s']:.2f} CPU-s pid {o['pid']} {o['cmd'][:50]}"
                                                           for o in busiest[:3]))
    stats = (doc.get("writer") or {}).get("stats") or {}
    if stats:
        out.append(f"  writer over the whole run: commit p50 {stats.get('commit_p50_ms')} ms, p99 "
                   f"{stats.get('commit_p99_ms')} ms, max {stats.get('commit_max_ms')} ms (its last 4096 commits); "
                   f"mean batch {stats.get('mean_batch')} requests; busy replies {stats.get('busy_replies')}; "
                   f"lock errors {stats.get('lock_errors')}; nice {doc['config']['writer_nice']}")
    out.append(f"  machine: {doc['machine']['cpus']} CPUs, load average before the run "
               f"{doc['machine']['loadavg_before']}")
    return "\n".join(out)


def _public(value: Any) -> Any:
    """``value`` without the keys that start with ``_`` (raw latencies), for JSON."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


# --- command line ---------------------------------------------------------------------------


def build_parser(prog: str = "python -m bench api") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The REST API under real gunicorn in front of the real writer, on a fresh temporary "
                    "database: read latency idle and while the writer ingests at full speed, and POST "
                    "throughput.",
        epilog="scenarios:\n"
               "  idle        --clients processes alternate GET /api/ticks and GET /api/bars\n"
               "  under-load  the same while a producer ingests through the writer at full speed\n"
               "  write       --clients processes POST /api/ticks; stored rows checked afterwards\n"
               "\nSee the module docstring of bench/api.py for why each exists.")
    p.add_argument("--seconds", type=positive_float, default=5.0,
                   help="measured window of each scenario run (default 5, at most 600)")
    p.add_argument("--clients", type=int_between(1, 64), default=4,
                   help="client processes, one connection each (default 4)")
    p.add_argument("--post-batch", type=int_between(1, MAX_TICKS), default=500,
                   help=f"ticks per POST /api/ticks request (default 500, at most {MAX_TICKS:,})")
    p.add_argument("--repeat", type=int_between(1, 20), default=1,
                   help="run idle and under-load this many times, interleaved; the ratio uses all runs' "
                        "latencies together (default 1)")
    p.add_argument("--seed-ticks", type=positive_int, default=200_000,
                   help="ticks stored before the run, BTCUSD and ETHUSD, one per symbol per second "
                        "(default 200,000; at least 240)")
    p.add_argument("--ingest-batch", type=int_between(1, MAX_TICKS), default=5000,
                   help="under-load: ticks per insert_ticks request of the producer (default 5000)")
    p.add_argument("--window", type=int_between(1, 1024), default=16,
                   help="under-load: the producer's requests in flight (default 16)")
    p.add_argument("--workers", type=int_between(1, 32), default=2,
                   help="gunicorn workers (default 2, as circus.ini)")
    p.add_argument("--writer-nice", type=int_between(0, 19), default=0,
                   help="run the writer at this nice level, every thread (default 0; an experiment: does "
                        "giving the readers CPU priority keep their latency?)")
    p.add_argument("--json", type=writable_file, default=None, metavar="PATH",
                   help="also write the results as JSON to PATH")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m bench api") -> int:
    parser = build_parser(prog)
    opts = parser.parse_args(argv)
    if opts.seconds > 600:
        parser.error(f"argument --seconds: {opts.seconds:g} is over the limit of 600")
    if opts.seed_ticks < 240:
        parser.error(f"argument --seed-ticks: {opts.seed_ticks} is too few; give at least 240 "
                     "(2 minutes of both symbols, so there are 1m bars to read)")
    if not Path(sys.executable).with_name("gunicorn").exists():
        parser.error(f"{Path(sys.executable).with_name('gunicorn')} does not exist: run with the venv's "
                     "python, with gunicorn installed")
    # SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so gunicorn and the
    # writer are stopped and the temporary home is removed.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return run(opts)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def run(opts: argparse.Namespace) -> int:
    """The whole benchmark, with validated options; returns the exit code."""
    started = time.monotonic()
    doc: dict[str, Any] = {
        "benchmark": "api",
        "config": {"seconds": opts.seconds, "clients": opts.clients, "post_batch": opts.post_batch,
                   "repeat": opts.repeat, "seed_ticks": opts.seed_ticks, "ingest_batch": opts.ingest_batch,
                   "window": opts.window, "gunicorn_workers": opts.workers, "writer_nice": opts.writer_nice,
                   "read_routes": READ_ROUTES, "p99_ratio_target": P99_RATIO_TARGET},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
                    "platform": platform.platform(), "loadavg_before": [round(x, 2) for x in os.getloadavg()]},
    }
    runs: list[dict[str, Any]] = []
    token = secrets.token_urlsafe(32)
    with fresh_home() as (home, env):
        env["TICKSTACK_API_TOKEN"] = token
        db_path = home / "tickstack.db"
        logs = home / "log"
        try:
            with running_writer(env) as writer:
                if opts.writer_nice:
                    renice_all_threads(writer.pid, opts.writer_nice)
                print(f"[bench] seeding {opts.seed_ticks:,} ticks ...", file=sys.stderr, flush=True)
                doc["setup"] = {"seed": seed(env, opts.seed_ticks, 5000, 16)}
                print("[bench] workers.analysis --until-idle ...", file=sys.stderr, flush=True)
                doc["setup"]["analysis"] = run_analysis(env, logs / "bench-analysis.log")
                doc["setup"]["counts"] = table_counts(db_path)
                print("[bench] starting gunicorn ...", file=sys.stderr, flush=True)
                t0 = time.monotonic()
                with running_gunicorn(env, opts.workers, logs / "bench-gunicorn.log") as gun:
                    doc["setup"]["gunicorn_start_s"] = round(time.monotonic() - t0, 2)
                    b = Bench(opts, env, writer, gun, token, db_path,
                              next_ts=SEED_T0 + (opts.seed_ticks // 2 + 1) * SEED_SPACING_MS)
                    plan = [(name, i + 1) for i in range(opts.repeat) for name in ("idle", "under-load")]
                    plan.append(("write", 1))
                    for name, i in plan:
                        print(f"[bench] {name}{f' #{i}' if opts.repeat > 1 and name != 'write' else ''} ...",
                              file=sys.stderr, flush=True)
                        try:
                            result = (run_writes(b) if name == "write"
                                      else run_reads(b, name, i, name == "under-load"))
                        except Exception:
                            result = {"scenario": name, "failed": traceback.format_exc()}
                            print(f"[bench] {name} FAILED:\n{result['failed']}", file=sys.stderr, flush=True)
                        result["run"] = i
                        runs.append(result)
                    writer.finish_measuring()
                doc["gunicorn"] = {k: v for k, v in gun.extra.items() if k != "health"}
                doc["gunicorn"]["port"] = gun.port
            doc["writer"] = writer.summary()
            counts = table_counts(db_path)
        except Exception:
            traceback.print_exc()
            print(f"[bench] setup or teardown failed\ngunicorn log tail:\n{_tail(logs / 'bench-gunicorn.log')}\n"
                  f"writer log tail:\n{_tail(logs / 'bench-writer.log')}", file=sys.stderr)
            return 1
    summary = {name: pooled([r for r in runs if r["scenario"] == name]) for name in ("idle", "under-load")}
    doc["total_s"] = round(time.monotonic() - started, 2)
    doc["runs"] = runs
    doc["pooled"] = summary
    doc["checks"] = evaluate(summary, runs)
    doc["verification"] = verify(runs, counts, opts.seed_ticks)
    doc["counts_after"] = counts
    doc["table"] = table_rows(runs, summary, opts.repeat)
    print(render(doc))
    if opts.json is not None:
        opts.json.write_text(json.dumps(_public(doc), indent=2, default=str) + "\n")
        print(f"\nwrote {opts.json}")
    failed = any("failed" in r for r in runs) or not all(c["ok"] for c in doc["verification"])
    return 1 if failed else 0


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(none)"


if __name__ == "__main__":
    sys.exit(main())
