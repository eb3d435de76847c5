"""The printed report of ``python -m bench chaos``: one row per variant, and
the time to ready after each kill."""
from __future__ import annotations

from typing import Any

from bench.common import fmt
from db.stats import percentile

HEADER = ("variant", "kills", "producer kills", "acknowledged", "stored", "missing", "applied twice",
          "stored, not acked", "failed", "integrity", "ready p50 s", "ready max s")


def _row(name: str, r: dict[str, Any]) -> tuple[str, ...]:
    if isinstance(r.get("failed"), str):
        return (name, "FAILED", *["-"] * (len(HEADER) - 2))
    ready = sorted(r["ready_s"])
    return (name, fmt(r["kills"]), fmt(r["producer_kills"]), fmt(r["acknowledged"]), fmt(r["stored"]),
            fmt(r["missing"]), fmt(r["applied_twice"]), fmt(r["stored_not_acknowledged"]),
            fmt(r["failed_requests"]), r["integrity"], fmt(percentile(ready, 0.5), 2),
            fmt(ready[-1] if ready else None, 2))


def render(results: dict[str, dict[str, Any]]) -> str:
    rows = [_row(name, r) for name, r in results.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(HEADER, *rows, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{c:<{w}}" if h == "integrity" else f"{c:>{w}}"
                for c, w, h in zip(cells[1:], widths[1:], HEADER[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    out = [line(HEADER), line(tuple("-" * w for w in widths)), *map(line, rows), "",
           "time to ready after each kill (s):"]
    for name, r in results.items():
        if isinstance(r.get("failed"), str):
            out.append(f"  {name}: FAILED: {r['failed'].strip().splitlines()[-1]}")
            continue
        out.append(f"  {name}: " + " ".join(f"{x:.2f}" for x in r["ready_s"]))
    problems = []
    for name, r in results.items():
        if isinstance(r.get("failed"), str):
            continue
        if r["missing_examples"]:
            problems.append(f"  {name}: missing, e.g. {', '.join(r['missing_examples'])}")
        for message, n in r["errors_by_message"].items():
            problems.append(f"  {name}: {n:,} failed requests: {message}")
        if any(c not in (0, None) for c in r["producer_exit_codes"]):
            problems.append(f"  {name}: producer exit codes {r['producer_exit_codes']}")
    out += ["", "problems:", *(problems or ["  none"])]
    return "\n".join(out)
