"""The load processes of ``python -m bench api`` (started by
``bench.common.run_group``, so top level: the spawn start method pickles
them by name): HTTP readers and posters, and the producer that ingests
through the writer. Each measures itself, including the kernel's account of
its CPU time and run-queue wait."""
from __future__ import annotations

import http.client
import json
import os
import selectors
import socket
import time
from collections import Counter
from typing import Any

from bench.api.data import HTTP_TIMEOUT, POST_SOURCE, READ_GRACE, READ_ROUTES, SLOW_OPENINGS, SYMBOLS, tick_columns
from bench.common import Gate, error_key, sleep_until


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


def _httperror_key(status: int, body: bytes) -> str:
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
                headers: dict[str, str] | None = None, timeout: float = HTTP_TIMEOUT) -> tuple[int, bytes]:
        if self.conn.sock is None:
            self.connects += 1
        self.conn.timeout = timeout
        if self.conn.sock is not None:
            self.conn.sock.settimeout(timeout)
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            response = self.conn.getresponse()
            return response.status, response.read()
        except BaseException:
            self.conn.close()  # start the next request on a fresh connection
            raise

    def close(self) -> None:
        self.conn.close()


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
    sleep_until(first)
    end = first + seconds
    connects0, cpu0, (sched_cpu0, sched_wait0) = client.connects, time.process_time(), schedstat_self()
    n = index  # clients start on different routes
    while time.monotonic() < end:
        route = routes[n % len(routes)]
        n += 1
        t0 = time.perf_counter()
        try:
            # A request still unanswered READ_GRACE s after the window fails: it was not served
            # while the window's load (e.g. the slow clients) lasted.
            status, body = client.request("GET", READ_ROUTES[route],
                                          timeout=max(0.1, min(HTTP_TIMEOUT, end + READ_GRACE - time.monotonic())))
        except Exception as e:  # every failure counts, whatever its type
            errors[route][error_key(e)] += 1
            continue
        elapsed = time.perf_counter() - t0
        if status == 200:
            latencies[route].append(elapsed)
        else:
            errors[route][_httperror_key(status, body)] += 1
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
            errors[error_key(ticket.error)] += 1
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


def _poster(index: int, port: int, token: str, seconds: float, batch: int, first_ts: int, tag: str, *,
            gate: Gate) -> dict[str, Any]:
    """POST batches of unique ticks for ``seconds``; count what was acknowledged. ``tag`` makes the
    sources of each run unique (a second run's ticks would be duplicates otherwise)."""
    source = f"{POST_SOURCE}{tag}-{index}"
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
            errors[error_key(e)] += 1
            unacknowledged += batch
            continue
        elapsed = time.perf_counter() - t0
        if status != 200:
            errors[_httperror_key(status, answer)] += 1
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


def _slow(index: int, port: int, seconds: float, connections: int, *, gate: Gate) -> dict[str, Any]:
    """Hold ``connections`` connections that never finish a request for ``seconds`` after the gate,
    each sending one of :data:`SLOW_OPENINGS` in turn; one the server closes (or answers) is opened
    again at once, so the pressure lasts the whole window."""
    sel = selectors.DefaultSelector()
    counts: Counter[str] = Counter()

    def open_one(kind: int) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if SLOW_OPENINGS[kind]:
                sock.sendall(SLOW_OPENINGS[kind])
        except OSError as e:
            counts[f"open failed: {error_key(e)}"] += 1
            return
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, kind)
        counts["opened"] += 1

    start = gate.wait()
    for k in range(connections):
        open_one(k % len(SLOW_OPENINGS))
    end = start + seconds
    while (left := end - time.monotonic()) > 0:
        for key, _ in sel.select(timeout=min(0.2, left)):
            sock = key.fileobj
            try:
                data = sock.recv(256)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            counts["answered by the server" if data else "closed by the server"] += 1
            sel.unregister(sock)
            sock.close()
            open_one(key.data)
    held = len(sel.get_map())
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    sel.close()
    return {"role": "slow", "connections": connections, "held_at_end": held, "counts": dict(counts)}


ROLES = {"reader": _reader, "producer": _producer, "poster": _poster, "slow": _slow}


def load_process(index: int, role: str, args: tuple, *, gate: Gate) -> dict[str, Any]:
    """Entry point of every load process (``run_group`` runs one function):
    ``role`` picks reader, producer, poster or slow (the held connections)."""
    return ROLES[role](index, *args, gate=gate)
