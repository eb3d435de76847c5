"""The command line of ``python -m bench contention``, and the run in order."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench.common import (
    MAX_REPEAT,
    MAX_RUN_TICKS,
    MAX_WINDOW_S,
    add_json_option,
    benchmark_parser,
    fmt,
    machine_info,
    name_list,
    number_flag,
    postgres_homes,
    whole_flag,
    write_json,
)
from bench.contention.postgres import (
    PG_REPEATABLE,
    PG_SCENARIO_HELP,
    PG_SCENARIOS,
    pg_ratios,
    run_client_direct,
    run_copy,
    run_direct,
)
from bench.contention.report import evaluate, render
from bench.contention.scenarios import REPEATABLE, RUNNERS, SCENARIO_HELP, SCENARIOS, best_run
from db.client import MAX_PIPELINE_WINDOW
from db.validation import MAX_TICKS


def build_parser(prog: str = "python -m bench contention") -> argparse.ArgumentParser:
    p = benchmark_parser(
        prog,
        description="Many writers on one SQLite file: direct sqlite3 (deferred and immediate transactions) "
                    "against the single writer, and bulk ingest through the writer against raw sqlite3. "
                    "Each scenario runs on a fresh temporary database.",
        epilog="scenarios:\n" + "\n".join(f"  {n:<15} {h}" for n, h in SCENARIO_HELP.items())
               + "\n\nwith --database postgresql:\n" + "\n".join(f"  {n:<15} {h}" for n, h in PG_SCENARIO_HELP.items())
               + "\n\nSee the module docstring of bench/contention/__init__.py for why each exists.")
    p.add_argument("--procs", type=whole_flag(1, 256), default=8,
                   help="writing processes of the small-writes scenarios: seed, immediate, writer-single, "
                        "writer-pipelined; direct and client-direct on postgresql (default 8)")
    p.add_argument("--seconds", type=number_flag(0, MAX_WINDOW_S, above=True), default=3.0,
                   help=f"measured window of the small-writes scenarios and raw-single (default 3, at most "
                        f"{MAX_WINDOW_S:g})")
    p.add_argument("--pipeline-window", type=whole_flag(1, MAX_PIPELINE_WINDOW), default=16,
                   help="writer-pipelined: single-row ops in flight per producer (default 16)")
    p.add_argument("--rows", type=whole_flag(1, MAX_RUN_TICKS), default=1_000_000,
                   help=f"ticks inserted by writer-batched and raw (default 1,000,000, at most {MAX_RUN_TICKS:,})")
    p.add_argument("--batch", type=whole_flag(1, MAX_TICKS), default=5000,
                   help=f"ticks per insert_ticks request / executemany (default 5000, at most {MAX_TICKS:,})")
    p.add_argument("--window", type=whole_flag(1, MAX_PIPELINE_WINDOW), default=16,
                   help="writer-batched: requests in flight per producer (default 16)")
    p.add_argument("--batch-producers", type=whole_flag(1, 64), default=1,
                   help="writer-batched: producer processes sharing --rows (default 1)")
    p.add_argument("--repeat", type=whole_flag(1, MAX_REPEAT), default=3,
                   help="run the compared pairs this many times, interleaved (immediate and writer-single, "
                        "writer-batched and raw; on postgresql writer-batched and copy); the table keeps the best "
                        "of each, and the _median ratios are the medians of the pairs (default 3)")
    p.add_argument("--only", type=name_list((*SCENARIOS, *PG_SCENARIOS)), default=None, metavar="NAMES",
                   help="comma-separated scenarios to run (default: all of the database's)")
    p.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                   help="sqlite (default), or postgresql: a throwaway server from Debian's binaries and the "
                        "scenarios " + ", ".join(PG_SCENARIOS) + " (bench/contention/postgres.py)")
    add_json_option(p)
    return p


def main(argv: list[str] | None = None, prog: str = "python -m bench contention") -> int:
    parser = build_parser(prog)
    opts = parser.parse_args(argv)
    if opts.batch_producers > opts.rows:
        parser.error(f"--rows {opts.rows} is fewer than --batch-producers {opts.batch_producers}")
    postgres = opts.database == "postgresql"
    scenarios, repeatable = (PG_SCENARIOS, PG_REPEATABLE) if postgres else (SCENARIOS, REPEATABLE)
    runners = {**RUNNERS, "direct": run_direct, "copy": run_copy, "client-direct": run_client_direct}
    if opts.only is not None and set(opts.only) - set(scenarios):
        parser.error(f"--only {','.join(sorted(set(opts.only) - set(scenarios)))}: not a scenario on "
                     f"{opts.database} (its scenarios: {', '.join(scenarios)})")
    chosen = [n for n in scenarios if opts.only is None or n in opts.only]
    # The compared pairs run --repeat times, interleaved, best of each kept: on a shared 2-core
    # machine one run can be slowed by someone else's load. Every other repeat runs them in the
    # reverse order, so that neither side of a pair always runs first (or right after bulk ingest).
    # Each entry: a scenario and the repeat it runs in (what pairs a run with the one beside it).
    order = [(n, 0) for n in chosen if n not in repeatable]
    paired = [n for n in chosen if n in repeatable]
    order += [(n, i) for i in range(opts.repeat) for n in (paired if i % 2 == 0 else paired[::-1])]
    with postgres_homes() if postgres else contextlib.nullcontext():
        return _run(opts, chosen, order, runners)


def _run(opts: argparse.Namespace, chosen: list[str], order: list[tuple[str, int]],
         runners: dict[str, Callable[[argparse.Namespace], dict[str, Any]]]) -> int:
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in chosen}
    failures: dict[str, list[str]] = {n: [] for n in chosen}
    started = time.monotonic()
    load_before = os.getloadavg()
    for name, repeat in order:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            runs[name].append({**runners[name](opts), "repeat": repeat})
        except Exception:
            failures[name].append(traceback.format_exc())
            print(f"[bench] {name} FAILED:\n{failures[name][-1]}", file=sys.stderr, flush=True)
        else:
            r = runs[name][-1]
            print(f"[bench] {name} done in {time.monotonic() - t0:.1f} s: {fmt(r['ops_per_s'])} ops/s, "
                  f"{fmt(r['rows_per_s'])} rows/s, {r['errors']} errors", file=sys.stderr, flush=True)
    results = {name: best_run(name, runs[name], failures[name]) for name in chosen}
    ratios, checks = pg_ratios(results) if opts.database == "postgresql" else evaluate(results)
    load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    print(render(results, ratios, checks))
    print(f"\nload average (1, 5, 15 min) before: {load['before']}, after: {load['after']} "
          f"({os.cpu_count()} CPUs; others' work on a shared machine counts in it)")
    if opts.json is not None:
        doc = {
            "benchmark": "contention",
            "config": {"database": opts.database, "procs": opts.procs, "seconds": opts.seconds, "rows": opts.rows,
                       "batch": opts.batch, "window": opts.window, "pipeline_window": opts.pipeline_window,
                       "batch_producers": opts.batch_producers,
                       "repeat": opts.repeat,
                       "scenarios": chosen},
            "machine": machine_info(),
            "load_average": load,
            "total_s": round(time.monotonic() - started, 2),
            "scenarios": results,
            "ratios": ratios,
            "checks": checks,
        }
        write_json(opts.json, doc)
    return 1 if any(failures.values()) else 0

