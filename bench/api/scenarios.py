"""The setup (seed, analysis) and the four scenarios of ``python -m bench
api``: ``idle``, ``under-load`` and ``slow-clients`` (:func:`run_reads`) and
``write`` (:func:`run_writes`)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.api.data import (
    INGEST_LEAD,
    INGEST_SOURCE,
    INGEST_TAIL,
    POST_ROUTE,
    READ_GRACE,
    READ_ROUTES,
    RUN_GROUP_LEAD,
    SEED_SOURCE,
    SEED_SPACING_MS,
    SEED_T0,
    SLOW_LEAD,
    tick_columns,
)
from bench.api.load import load_process
from bench.api.server import Gunicorn
from bench.api.window import WindowMonitor
from bench.common import error_key, latency_summary, merged_errors, run_group
from bench.writer_run import WriterRun
from db.engine import connect_read_only
from testkit.env import ROOT

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
            failures.append(error_key(ticket.error))
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
                              env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
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
    #: In the tick sources of this server's runs: each server's are its own.
    tag: str = "0"

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


def run_reads(b: Bench, name: str, run: int, with_ingest: bool, slow: int = 0) -> dict[str, Any]:
    """``idle``, ``under-load`` or ``slow-clients``: the read clients, and the producer if
    ``with_ingest``, or ``slow`` held connections that never finish a request."""
    opts = b.opts
    lead = INGEST_LEAD if with_ingest else SLOW_LEAD if slow else 0.0
    args: list[tuple] = [("reader", (b.gunicorn.port, opts.seconds, lead)) for _ in range(opts.clients)]
    first_ts = b.next_ts
    if with_ingest:
        args.append(("producer", (b.env, lead + opts.seconds + INGEST_TAIL, opts.ingest_batch, opts.window,
                                  first_ts, f"{INGEST_SOURCE}{b.tag}-{run}")))
    if slow:
        # Held until every read of the window was answered or failed (READ_GRACE).
        args.append(("slow", (b.gunicorn.port, lead + opts.seconds + READ_GRACE + INGEST_TAIL, slow)))
    results, window = _run_measured(b, args, lead)
    readers = [r for r in results if r["role"] == "reader"]
    first = min(r["first"] for r in readers)
    elapsed = max(r["last"] for r in readers) - first
    raw: dict[str, tuple[list[float], Counter[str]]] = {}
    for route in READ_ROUTES:
        errors = merged_errors(r["errors"][route] for r in readers)
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
    if slow:
        (holder,) = [r for r in results if r["role"] == "slow"]
        out["slow_clients"] = {k: v for k, v in holder.items() if k != "role"}
    return out


def run_writes(b: Bench) -> dict[str, Any]:
    """``write``: POST /api/ticks from every client; the stored rows are checked at the end."""
    opts = b.opts
    args: list[tuple] = [("poster", (b.gunicorn.port, b.token, opts.seconds, opts.post_batch, b.next_ts, b.tag))
                         for _ in range(opts.clients)]
    results, window = _run_measured(b, args, 0.0)
    first = min(r["first"] for r in results)
    elapsed = max(r["last"] for r in results) - first
    errors = merged_errors(r["errors"] for r in results)
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
