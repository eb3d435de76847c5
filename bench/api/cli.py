"""The command line of ``python -m bench api``, and the whole run in order."""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.api.data import (
    P99_RATIO_TARGET,
    READ_ROUTES,
    SEED_SPACING_MS,
    SEED_T0,
    SLOW_P99_RATIO_TARGET,
)
from bench.api.report import evaluate, public, render, table_rows, verify
from bench.api.scenarios import (
    Bench,
    pooled,
    renice_all_threads,
    run_analysis,
    run_reads,
    run_writes,
    seed,
    table_counts,
)
from bench.api.server import WorkerSpec, running_gunicorn
from bench.common import (
    MAX_REPEAT,
    MAX_RUN_TICKS,
    MAX_WINDOW_S,
    add_json_option,
    benchmark_parser,
    fresh_home,
    machine_info,
    name_list,
    number_flag,
    whole_flag,
    write_json,
)
from bench.writer_run import running_writer
from db.client import MAX_PIPELINE_WINDOW
from db.validation import MAX_TICKS
from testkit.env import BIN

#: The fewest seed ticks (``--seed-ticks``): 2 minutes of both symbols, so there are 1m bars to read.
MIN_SEED_TICKS = 240


def build_parser(prog: str = "python -m bench api") -> argparse.ArgumentParser:
    p = benchmark_parser(
        prog,
        description="The REST API under real gunicorn in front of the real writer, on a fresh temporary "
                    "database: read latency idle and while the writer ingests at full speed, and POST "
                    "throughput.",
        epilog="scenarios:\n"
               "  idle          --clients processes alternate GET /api/ticks and GET /api/bars\n"
               "  under-load    the same while a producer ingests through the writer at full speed\n"
               "  slow-clients  the same while --slow-clients connections never finish a request\n"
               "  write         --clients processes POST /api/ticks; stored rows checked afterwards\n"
               "\nworker classes (--worker-class, several separated by commas are compared in one run):\n"
               "  circus (circus.ini's, the default), sync, gthread[:THREADS], tornado, headers-first[:THREADS]\n"
               "\nSee the module docstring of bench/api/__init__.py for why each exists.")
    p.add_argument("--seconds", type=number_flag(0, MAX_WINDOW_S, above=True), default=5.0,
                   help=f"measured window of each scenario run (default 5, at most {MAX_WINDOW_S:g})")
    p.add_argument("--clients", type=whole_flag(1, 64), default=4,
                   help="client processes, one connection each (default 4)")
    p.add_argument("--post-batch", type=whole_flag(1, MAX_TICKS), default=500,
                   help=f"ticks per POST /api/ticks request (default 500, at most {MAX_TICKS:,})")
    p.add_argument("--repeat", type=whole_flag(1, MAX_REPEAT), default=1,
                   help="run idle and under-load this many times, interleaved; the ratio uses all runs' "
                        "latencies together (default 1)")
    p.add_argument("--seed-ticks", type=whole_flag(MIN_SEED_TICKS, MAX_RUN_TICKS), default=200_000,
                   help="ticks stored before the run, BTCUSD and ETHUSD, one per symbol per second "
                        f"(default 200,000; at least {MIN_SEED_TICKS}, 2 minutes of both symbols, so there are "
                        f"1m bars to read; at most {MAX_RUN_TICKS:,})")
    p.add_argument("--ingest-batch", type=whole_flag(1, MAX_TICKS), default=5000,
                   help="under-load: ticks per insert_ticks request of the producer (default 5000)")
    p.add_argument("--window", type=whole_flag(1, MAX_PIPELINE_WINDOW), default=16,
                   help="under-load: the producer's requests in flight (default 16)")
    p.add_argument("--workers", type=whole_flag(1, 32), default=2,
                   help="gunicorn workers (default 2, as circus.ini)")
    p.add_argument("--slow-clients", type=whole_flag(0, 1000), default=50,
                   help="slow-clients: connections held open that never finish a request (default 50; "
                        "0 leaves the scenario out)")
    p.add_argument("--worker-class", type=_worker_specs, default=[WorkerSpec("circus.ini")], metavar="SPEC[,SPEC]",
                   help="gunicorn worker class(es) to serve with, each its own gunicorn, the scenarios run "
                        "for each (default: circus, as circus.ini)")
    p.add_argument("--only", type=name_list(SCENARIOS), default=None, metavar="NAMES",
                   help=f"run only these scenarios, comma-separated (default all: {','.join(SCENARIOS)})")
    p.add_argument("--writer-nice", type=whole_flag(0, 19), default=0,
                   help="run the writer at this nice level, every thread (default 0; an experiment: does "
                        "giving the readers CPU priority keep their latency?)")
    add_json_option(p)
    return p


#: Every scenario, in the order of a run.
SCENARIOS = ("idle", "under-load", "slow-clients", "write")
#: The scenarios with read clients, pooled over --repeat runs.
READ_SCENARIOS = ("idle", "under-load", "slow-clients")


def _worker_specs(text: str) -> list[WorkerSpec]:
    try:
        return [WorkerSpec.parse(part) for part in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None, prog: str = "python -m bench api") -> int:
    parser = build_parser(prog)
    opts = parser.parse_args(argv)
    if not (BIN / "gunicorn").exists():
        parser.error(f"{BIN / 'gunicorn'} does not exist: run with the venv's "
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
    scenarios = [n for n in SCENARIOS if (opts.only is None or n in opts.only)
                 and (n != "slow-clients" or opts.slow_clients)]
    doc: dict[str, Any] = {
        "benchmark": "api",
        "config": {"seconds": opts.seconds, "clients": opts.clients, "post_batch": opts.post_batch,
                   "repeat": opts.repeat, "seed_ticks": opts.seed_ticks, "ingest_batch": opts.ingest_batch,
                   "window": opts.window, "gunicorn_workers": opts.workers, "writer_nice": opts.writer_nice,
                   "slow_clients": opts.slow_clients, "scenarios": scenarios,
                   "servers": [spec.label for spec in opts.worker_class],
                   "read_routes": READ_ROUTES, "p99_ratio_target": P99_RATIO_TARGET,
                   "slow_p99_ratio_target": SLOW_P99_RATIO_TARGET},
        "machine": {**machine_info(), "loadavg_before": [round(x, 2) for x in os.getloadavg()]},
    }
    runs: list[dict[str, Any]] = []
    token = secrets.token_urlsafe(32)
    plan = [(name, i + 1) for i in range(opts.repeat) for name in scenarios if name in READ_SCENARIOS]
    plan += [(name, 1) for name in scenarios if name not in READ_SCENARIOS]
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
                next_ts = SEED_T0 + (opts.seed_ticks // 2 + 1) * SEED_SPACING_MS
                doc["servers"] = []
                for index, spec in enumerate(opts.worker_class):
                    b = _serve(opts, env, writer, token, db_path, logs, index, spec, next_ts, plan, runs, doc)
                    next_ts = b.next_ts
                writer.finish_measuring()
            doc["writer"] = writer.summary()
            counts = table_counts(db_path)
        except Exception:
            traceback.print_exc()
            print(f"[bench] setup or teardown failed\ngunicorn log tail:\n{_tail(logs / 'bench-gunicorn-0.log')}\n"
                  f"writer log tail:\n{_tail(logs / 'bench-writer.log')}", file=sys.stderr)
            return 1
    summaries = {label: {name: pooled([r for r in runs if r["server"] == label and r["scenario"] == name])
                         for name in READ_SCENARIOS if name in scenarios}
                 for label in doc["config"]["servers"]}
    doc["total_s"] = round(time.monotonic() - started, 2)
    doc["runs"] = runs
    doc["pooled"] = summaries
    doc["checks"] = [{"server": label, **c} for label, summary in summaries.items()
                     for c in evaluate(summary, [r for r in runs if r["server"] == label])]
    doc["verification"] = verify(runs, counts, opts.seed_ticks)
    doc["counts_after"] = counts
    doc["table"] = table_rows(runs, summaries, doc["config"])
    print(render(doc))
    if opts.json is not None:
        write_json(opts.json, public(doc), default=str)
    failed = any("failed" in r for r in runs) or not all(c["ok"] for c in doc["verification"])
    return 1 if failed else 0


def _serve(opts: argparse.Namespace, env: dict[str, str], writer: Any, token: str, db_path: Path, logs: Path,
           index: int, spec: WorkerSpec, next_ts: int, plan: list[tuple[str, int]], runs: list[dict[str, Any]],
           doc: dict[str, Any]) -> Bench:
    """One gunicorn with ``spec``'s worker class, and every scenario of ``plan`` against it."""
    print(f"[bench] starting gunicorn ({spec.label}) ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with running_gunicorn(env, opts.workers, logs / f"bench-gunicorn-{index}.log", spec) as gun:
        start_s = round(time.monotonic() - t0, 2)
        b = Bench(opts, env, writer, gun, token, db_path, next_ts=next_ts, tag=str(index))
        for name, i in plan:
            print(f"[bench] {spec.label}: {name}{f' #{i}' if opts.repeat > 1 and name != 'write' else ''} ...",
                  file=sys.stderr, flush=True)
            try:
                result = (run_writes(b) if name == "write"
                          else run_reads(b, name, i, name == "under-load",
                                         opts.slow_clients if name == "slow-clients" else 0))
            except Exception:
                result = {"scenario": name, "failed": traceback.format_exc()}
                print(f"[bench] {name} FAILED:\n{result['failed']}", file=sys.stderr, flush=True)
            result["run"] = i
            result["server"] = spec.label
            runs.append(result)
    doc["servers"].append({"label": spec.label, "start_s": start_s, "port": gun.port,
                           **{k: v for k, v in gun.extra.items() if k != "health"}})
    return b


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(none)"

