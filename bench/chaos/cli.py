"""The command line of ``python -m bench chaos``, and the run in order."""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback
from typing import Any

from bench.chaos.producer import MAX_SECONDS
from bench.chaos.report import render
from bench.chaos.scenarios import Plan, stack_chaos, writer_chaos
from bench.common import (
    add_json_option,
    benchmark_parser,
    machine_info,
    name_list,
    number_flag,
    postgres_homes,
    whole_flag,
    write_json,
)
from db.parsers import MAX_SEED

VARIANT_HELP = {
    "writer": "--producers producers write; the writer is SIGKILLed --writer-kills times (and, by chance, "
              "a producer with it) and restarted at once",
    "stack": "the real circus.ini under --producers producers; --stack-rounds times circusd is SIGKILLed, every "
             "process it started is killed -9, and the stack is restarted as `make run` does",
}
VARIANTS = tuple(VARIANT_HELP)
#: The largest ``--seed``: a seed only has to differ from another's, and 2**32 seeds are more runs than
#: anyone makes (a number that large is a typo); below 2**53, so the one number rule reads it exactly.
#: Flag types, all by db's one finite-number rule: nan and inf are refused (the producers called
#: time.sleep(nan), a ValueError, or slept for ever). MAX_SECONDS is the producers' (they get ``--pause``).
SECONDS = number_flag(0, MAX_SECONDS, above=True)
SECONDS_OR_ZERO = number_flag(0, MAX_SECONDS)
CHANCE = number_flag(0, 1)


def build_parser(prog: str = "python -m bench chaos") -> argparse.ArgumentParser:
    p = benchmark_parser(
        prog,
        description="Kill -9 the writer, producers and the whole stack at random (seeded) moments under load, "
                    "and count what the producers were told against what the database holds: acknowledged, "
                    "stored, missing, applied twice, integrity, and the time to ready after each kill.",
        epilog="variants:\n" + "\n".join(f"  {n:<7} {h}" for n, h in VARIANT_HELP.items())
               + "\n\nSee the module docstring of bench/chaos/__init__.py for what each figure means.")
    p.add_argument("--producers", type=whole_flag(1, 64), default=4,
                   help="producer processes, alternately single calls and pipelines (default 4)")
    p.add_argument("--writer-kills", type=whole_flag(0, 10_000), default=20,
                   help="SIGKILLs of the writer in the writer variant (default 20)")
    p.add_argument("--stack-rounds", type=whole_flag(0, 100), default=2,
                   help="whole-stack kills in the stack variant (default 2)")
    p.add_argument("--seed", type=whole_flag(0, MAX_SEED), default=1,
                   help=f"seed of the kill moments and victims (default 1, 0 to {MAX_SEED})")
    p.add_argument("--min-gap", type=SECONDS, default=0.5,
                   help=f"shortest time between two kills, in seconds (default 0.5, at most {MAX_SECONDS:g})")
    p.add_argument("--max-gap", type=SECONDS, default=2.0,
                   help=f"longest time between two kills, in seconds (default 2, at most {MAX_SECONDS:g})")
    p.add_argument("--producer-kill-chance", type=CHANCE, default=0.3,
                   help="chance that a writer kill also kills a random producer, 0 to 1 (default 0.3)")
    p.add_argument("--pause", type=SECONDS_OR_ZERO, default=0.0,
                   help="seconds each producer waits between two requests (default 0: as fast as it can; "
                        f"at most {MAX_SECONDS:g})")
    p.add_argument("--settle", type=SECONDS, default=1.0,
                   help="seconds of writing after the last kill, before the producers stop (default 1, at most "
                        f"{MAX_SECONDS:g})")
    p.add_argument("--only", type=name_list(VARIANTS), default=None, metavar="NAMES",
                   help="comma-separated variants to run (default: all)")
    p.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                   help="sqlite (a file in each run's home, the default) or postgresql (a throwaway server "
                        "from Debian's binaries, a database per run; integrity by amcheck)")
    add_json_option(p)
    return p


def plan_of(opts: argparse.Namespace) -> Plan:
    return Plan(seed=opts.seed, producers=opts.producers, writer_kills=opts.writer_kills,
                stack_rounds=opts.stack_rounds, min_gap=opts.min_gap, max_gap=opts.max_gap,
                producer_kill_chance=opts.producer_kill_chance, pause=opts.pause, settle=opts.settle)


RUNNERS = {"writer": writer_chaos, "stack": stack_chaos}


def main(argv: list[str] | None = None, prog: str = "python -m bench chaos") -> int:
    parser = build_parser(prog)
    opts = parser.parse_args(argv)
    if opts.min_gap > opts.max_gap:
        parser.error(f"--min-gap {opts.min_gap} is larger than --max-gap {opts.max_gap}")
    plan = plan_of(opts)
    chosen = [n for n in VARIANTS if opts.only is None or n in opts.only]
    with postgres_homes(amcheck=True) if opts.database == "postgresql" else contextlib.nullcontext():
        return _run(opts, plan, chosen)


def _run(opts: argparse.Namespace, plan: Plan, chosen: list[str]) -> int:
    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    for name in chosen:
        print(f"[chaos] {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = RUNNERS[name](plan)
        except Exception:
            results[name] = {"failed": traceback.format_exc()}
            print(f"[chaos] {name} FAILED:\n{results[name]['failed']}", file=sys.stderr, flush=True)
    print(render(results))
    if opts.json is not None:
        write_json(opts.json, {"benchmark": "chaos", "config": {**vars(plan), "variants": chosen,
                                                               "database": opts.database},
                               "machine": machine_info(), "total_s": round(time.monotonic() - started, 1),
                               "variants": results})
    return 0 if all(r.get("ok") for r in results.values()) else 1
