"""``python -m bench <command> [options]``: run one benchmark.

Each command lives in its own module, imported only when it runs (so a
command that needs e.g. Flask costs nothing to the others), and exposes
``main(argv: list[str], prog: str) -> int``. To add a command, add a line to
:data:`COMMANDS`.
"""
from __future__ import annotations

import importlib
import sys

#: command name -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "contention": ("bench.contention",
                   "many writers on one SQLite file: direct sqlite3 vs the single writer, and ingest rate"),
    "api": ("bench.api", "the REST API under gunicorn: read latency idle and during full ingest, POST throughput"),
    "chaos": ("bench.chaos", "kill -9 the writer, producers and the whole stack under load: lost and doubled writes"),
    "analysis": ("bench.analysis", "the analysis worker against ingest: dense catch-up rate, hourly history time"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m bench <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_mod, help_) in COMMANDS.items()]
    lines += ["", "python -m bench <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"python -m bench: unknown command {name!r}; commands: {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest, prog=f"python -m bench {name}") or 0)


if __name__ == "__main__":
    sys.exit(main())
