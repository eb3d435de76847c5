"""The two scenarios of ``python -m bench analysis``, each on a fresh database."""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import fresh_home, latency_summary, run_group
from bench.contention.procs import writer_batched_producer
from bench.writer_run import running_writer
from db.engine import connect_read_only
from testkit.env import ROOT
from testkit.helpers import write_bar_csv

SCENARIO_HELP = {
    "dense": "--ticks ticks over --symbols symbols through the writer, then the analysis worker catches up",
    "hourly": "--bars hourly OHLCV bars replayed as ticks (workers.ticks --feed csv), then the analysis worker",
}
SCENARIOS = tuple(SCENARIO_HELP)
#: Dense: ticks this far apart, round-robin over the symbols (each of 4 ticks every 100 ms).
DENSE_SPACING_MS = 25
HOUR_MS = 3_600_000


def timed(args: list[str], env: dict[str, str], log_path: Path, timeout: float = 900.0) -> dict[str, Any]:
    """Run ``python -m ARGS`` from the checkout: wall seconds (start-up included) and its CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.run([sys.executable, "-m", *args], env=env, cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout, check=False)
    seconds = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"python -m {' '.join(args)} exited with code {proc.returncode}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": round(seconds, 3), "cpu_s": round(cpu, 3)}


def counts(db_path: Path) -> dict[str, int]:
    con = connect_read_only(db_path)
    try:
        one = lambda sql: int(con.execute(sql).fetchone()[0] or 0)  # noqa: E731
        return {"ticks": one("SELECT count(*) FROM ticks"), "max_id": one("SELECT max(id) FROM ticks"),
                "bars": one("SELECT count(*) FROM bars"), "indicators": one("SELECT count(*) FROM indicators"),
                "cursor": one("SELECT max(value) FROM cursors WHERE name = 'analysis'")}
    finally:
        con.close()


def writer_cpu(pid: int) -> float:
    """CPU seconds the writer has used so far (user + system)."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def timed_with_writer(args: list[str], env: dict[str, str], log_path: Path, writer_pid: int) -> dict[str, Any]:
    """:func:`timed`, plus the writer's CPU seconds over the same span (``writer_cpu_s``): the work a
    step hands to the writer is part of its cost, and on a busy machine it competes for the same CPUs."""
    before = writer_cpu(writer_pid)
    run = timed(args, env, log_path)
    return {**run, "writer_cpu_s": round(writer_cpu(writer_pid) - before, 3)}


def _analysis(env: dict[str, str], home: Path, out: dict[str, Any], ticks: int, writer_pid: int) -> None:
    """The analysis worker over everything stored, timed; its figures and problems into ``out``."""
    run = timed_with_writer(["workers.analysis", "--until-idle"], env, home / "log" / "bench-analysis.log",
                            writer_pid)
    stored = counts(home / "tickstack.db")
    out["analysis"] = {**run, "ticks_per_s": round(ticks / run["seconds"], 1), "bars": stored["bars"],
                       "indicators": stored["indicators"]}
    if stored["cursor"] != stored["max_id"] or stored["ticks"] != ticks:
        out["problems"].append(f"analysis stopped at tick {stored['cursor']} of {stored['max_id']}; "
                               f"{stored['ticks']} ticks stored, {ticks} sent")


def run_dense(opts: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": "dense", "ticks": opts.ticks, "symbols": opts.symbols, "problems": []}
    with fresh_home() as (home, env):
        with running_writer(env) as writer:
            args = (env, opts.ticks, 0, opts.batch, opts.window, opts.symbols, DENSE_SPACING_MS)
            _start, (res,) = run_group(writer_batched_producer, [args], run_timeout=900,
                                       on_start=writer.sampler.mark_start)
            elapsed = res["last"] - res["first"]
            out["ingest"] = {"rows": res["rows"], "seconds": round(elapsed, 3),
                             "rows_per_s": round(res["rows"] / elapsed, 1),
                             "latency": latency_summary(res["latencies"]), "errors": res["errors"]}
            if res["errors"] or res["rows"] != opts.ticks:
                out["problems"].append(f"ingest stored {res['rows']} of {opts.ticks} ticks; errors {res['errors']}")
            _analysis(env, home, out, opts.ticks, writer.pid)
            writer.finish_measuring()
        out["writer"] = writer.summary()
    return out


def run_hourly(opts: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": "hourly", "bars": opts.bars, "ticks": 4 * opts.bars, "problems": []}
    with fresh_home() as (home, env):
        with running_writer(env) as writer:
            csv = home / "hourly.csv"
            bars = write_bar_csv(csv, n=opts.bars, seed=11, step_ms=HOUR_MS)
            replay = ["workers.ticks", "--feed", "csv", "--symbol", "EURUSD", "--speed", "max", "--file"]
            # Each process with nothing to do yet: its start-up and exit alone, the floor of its time (the
            # replay's: the same worker and flags on a file with no bars, and its timeframe, which the
            # real replay infers from the bars, given).
            out["startup"] = timed(["workers.analysis", "--until-idle"], env, home / "log" / "bench-startup.log")
            empty = home / "empty.csv"
            write_bar_csv(empty, n=0)
            out["replay_startup"] = timed([*replay, str(empty), "--timeframe", "1h"], env,
                                          home / "log" / "bench-replay-startup.log")
            out["replay"] = timed_with_writer([*replay, str(csv)], env, home / "log" / "bench-replay.log", writer.pid)
            _analysis(env, home, out, 4 * opts.bars, writer.pid)
            writer.finish_measuring()
        con = connect_read_only(home / "tickstack.db")
        try:
            rebuilt = con.execute("SELECT ts, open, high, low, close, volume FROM bars WHERE symbol = 'EURUSD' "
                                  "AND timeframe = '1h' ORDER BY ts").fetchall()
        finally:
            con.close()
        if rebuilt != bars:
            out["problems"].append("the 1h bars stored differ from the file's")
        out["writer"] = writer.summary()
    return out


RUNNERS = {"dense": run_dense, "hourly": run_hourly}
