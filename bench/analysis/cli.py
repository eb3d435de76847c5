"""The command line of ``python -m bench analysis``, and the run in order."""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Any

from bench.analysis.report import count_problems, evaluate, render, summarize
from bench.analysis.scenarios import HOUR_MS, RUNNERS, SCENARIO_HELP, SCENARIOS
from bench.common import (
    MAX_REPEAT,
    MAX_RUN_TICKS,
    SYMBOLS,
    add_json_option,
    benchmark_parser,
    machine_info,
    name_list,
    whole_flag,
    write_json,
)
from db.client import MAX_PIPELINE_WINDOW
from db.validation import MAX_TICKS, latest_allowed_ts
from testkit.helpers import T0

#: Hourly bars replayed (``--bars``): each is 4 ticks (workers.csvfiles.bar_to_ticks), and the file's bars
#: run an hour apart from testkit's T0 (2024), so the last must end by the latest time a tick may have
#: (a day from now: db.validation.latest_allowed_ts); about 25,000 bars in December 2026.
MAX_BARS = min(MAX_RUN_TICKS // 4, (latest_allowed_ts() - T0) // HOUR_MS - 1)


def build_parser(prog: str = "python -m bench analysis") -> argparse.ArgumentParser:
    p = benchmark_parser(
        prog,
        description="The analysis worker against ingest: catch-up rate on dense ticks against the writer's "
                    "batched ingest rate, and the time to analyse an hourly history against the time to replay "
                    "it. Each run is on a fresh temporary database.",
        epilog="scenarios:\n" + "\n".join(f"  {n:<8} {h}" for n, h in SCENARIO_HELP.items())
               + "\n\nSee the module docstring of bench/analysis/__init__.py for the targets.")
    p.add_argument("--ticks", type=whole_flag(1, MAX_RUN_TICKS), default=1_000_000,
                   help=f"dense: ticks (default 1,000,000, at most {MAX_RUN_TICKS:,})")
    p.add_argument("--symbols", type=whole_flag(1, len(SYMBOLS)), default=4,
                   help=f"dense: symbols (default 4, at most {len(SYMBOLS)})")
    p.add_argument("--batch", type=whole_flag(1, MAX_TICKS), default=5000,
                   help=f"dense: ticks per insert_ticks request (default 5000, at most {MAX_TICKS:,})")
    p.add_argument("--window", type=whole_flag(1, MAX_PIPELINE_WINDOW), default=16,
                   help="dense: requests in flight (default 16)")
    p.add_argument("--bars", type=whole_flag(1, MAX_BARS), default=5000,
                   help=f"hourly: 1h bars replayed (default 5,000, at most {MAX_BARS:,})")
    p.add_argument("--repeat", type=whole_flag(1, MAX_REPEAT), default=3,
                   help="runs of each scenario, interleaved; the ratios use their medians (default 3)")
    p.add_argument("--only", type=name_list(SCENARIOS), default=None, metavar="NAMES",
                   help="comma-separated scenarios to run (default: all)")
    add_json_option(p)
    return p


def main(argv: list[str] | None = None, prog: str = "python -m bench analysis") -> int:
    opts = build_parser(prog).parse_args(argv)
    chosen = [n for n in SCENARIOS if opts.only is None or n in opts.only]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in chosen}
    problems: list[str] = []
    started = time.monotonic()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    for i in range(opts.repeat):
        for name in chosen:
            print(f"[bench] {name} run {i + 1}/{opts.repeat} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                run = RUNNERS[name](opts)
            except Exception:
                problems.append(f"{name} run {i + 1} FAILED: {traceback.format_exc().strip().splitlines()[-1]}")
                print(f"[bench] {name} FAILED:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                continue
            runs[name].append(run)
            problems += [f"{name} run {i + 1}: {p}" for p in run["problems"]]
            print(f"[bench] {name} done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    problems += count_problems(runs)
    summary = summarize(runs)
    ratios, checks = evaluate(summary)
    load = {"start": load_at_start, "end": [round(x, 2) for x in os.getloadavg()]}
    print(render(summary, ratios, checks, problems))
    print(f"\nload average (1, 5, 15 min) at start {load['start']}, at end {load['end']}, on {os.cpu_count()} CPUs: "
          "wall times stretch with it, CPU seconds much less")
    if opts.json is not None:
        write_json(opts.json, {
            "benchmark": "analysis",
            "config": {"ticks": opts.ticks, "symbols": opts.symbols, "batch": opts.batch, "window": opts.window,
                       "bars": opts.bars, "repeat": opts.repeat, "scenarios": chosen},
            "machine": {**machine_info(), "load_average": load},
            "total_s": round(time.monotonic() - started, 2),
            "summary": summary,
            "ratios": ratios,
            "checks": checks,
            "problems": problems,
            "runs": runs,
        })
    return 1 if problems else 0
