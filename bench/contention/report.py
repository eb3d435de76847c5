"""The report of ``python -m bench contention``: the ratios against their
targets, and the printed table."""
from __future__ import annotations

import statistics
from typing import Any

from bench.common import (
    fmt,
)
from bench.contention.scenarios import compared_by, run_figures

#: Targets: batched ingest reaches this share of raw sqlite3 (best runs, and the median of the repeats) ...
BATCHED_OVER_RAW_TARGET = 0.9
#: ... immediate's worst latency is at least this many times the writer's ...
IMMEDIATE_OVER_WRITER_MAX_TARGET = 20.0
#: ... small acknowledged writes through the writer: this many times immediate's ops/s (best runs,
#: and the median of the repeats) ...
WRITER_SINGLE_OVER_IMMEDIATE_TARGET = 4.0
#: ... with a p99 latency (nearest rank, :func:`db.stats.percentile`) of at most this many ms ...
WRITER_SINGLE_P99_MS_TARGET = 5.0
#: ... and, as a goal, this share of one process committing one row per transaction.
WRITER_SINGLE_OVER_RAW_SINGLE_GOAL = 0.25


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return round(num / den, 3)


def _get(results: dict[str, dict[str, Any]], name: str, *path: str) -> Any:
    value: Any = results.get(name)
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def info(value: Any) -> dict[str, Any]:
    """A figure reported beside the checks, with no target of its own."""
    return {"value": value, "target": "(none)", "result": "info"}


def paired_median(results: dict[str, dict[str, Any]], num: str, den: str) -> float | None:
    """The median, over the repeats, of ``num``'s rate over ``den``'s in the same repeat (the two run
    one right after the other, so each pair saw the same machine; a failed run leaves its repeat
    out). The rate is what they are compared by (:func:`~bench.contention.scenarios.compared_by`)."""
    rate = compared_by(num)

    def by_repeat(name: str) -> dict[int, float]:
        return {r["repeat"]: r[rate] for r in each_run(results, name) if r.get(rate)}

    a, b = by_repeat(num), by_repeat(den)
    pairs = [_ratio(a[i], b[i]) for i in sorted(a.keys() & b.keys())]
    return round(statistics.median(pairs), 3) if pairs else None


def each_run(results: dict[str, dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The :func:`~bench.contention.scenarios.run_figures` of every run of ``name`` that finished: its
    ``runs``, or the one run it had (none when it failed)."""
    result = results.get(name)
    if not result or "failed" in result:
        return []
    return result.get("runs") or [run_figures(result)]


def worst(results: dict[str, dict[str, Any]], name: str, key: str) -> Any:
    """The highest ``key`` (``p99_ms``, ``max_ms``, ``errors``) over every run of ``name``, not only
    the one the table keeps: a latency or an error target holds for every run or not at all."""
    values = [r[key] for r in each_run(results, name) if r[key] is not None]
    return max(values) if values else None


def evaluate(results: dict[str, dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, dict[str, Any]]]:
    """The ratios, and the checks against their targets (a goal is reported as a check too)."""
    single_ops = _get(results, "writer-single", "ops_per_s")
    ratios = {
        "batched_over_raw": _ratio(_get(results, "writer-batched", "rows_per_s"), _get(results, "raw", "rows_per_s")),
        "batched_over_raw_median": paired_median(results, "writer-batched", "raw"),
        # No target: against the same rows a row per statement, as a program writing straight to SQLite would.
        "batched_over_raw_row": _ratio(_get(results, "writer-batched", "rows_per_s"),
                                       _get(results, "raw-row", "rows_per_s")),
        "writer_single_over_immediate": _ratio(single_ops, _get(results, "immediate", "ops_per_s")),
        "writer_single_over_immediate_median": paired_median(results, "writer-single", "immediate"),
        "writer_single_over_raw_single": _ratio(single_ops, _get(results, "raw-single", "ops_per_s")),
        # No target: the floor of the transport (bench/contention/bare_writer.py), the same producers
        # against a writer that keeps none of the promises. What it reaches over immediate is as far as
        # any writer that keeps them could go on this machine.
        "bare_single_over_immediate": _ratio(_get(results, "bare-single", "ops_per_s"),
                                             _get(results, "immediate", "ops_per_s")),
        "bare_single_over_immediate_median": paired_median(results, "bare-single", "immediate"),
        "writer_single_over_bare_single": _ratio(single_ops, _get(results, "bare-single", "ops_per_s")),
        "writer_single_over_bare_single_median": paired_median(results, "writer-single", "bare-single"),
        # No target: the same with the record of applied requests, the one promise a safe retry needs.
        "bare_recorded_over_immediate": _ratio(_get(results, "bare-recorded", "ops_per_s"),
                                               _get(results, "immediate", "ops_per_s")),
        "bare_recorded_over_immediate_median": paired_median(results, "bare-recorded", "immediate"),
        "writer_single_over_bare_recorded": _ratio(single_ops, _get(results, "bare-recorded", "ops_per_s")),
        "writer_single_over_bare_recorded_median": paired_median(results, "writer-single", "bare-recorded"),
        # No target of its own: what the same small writes give when producers do not wait for each answer.
        "writer_pipelined_over_immediate": _ratio(_get(results, "writer-pipelined", "ops_per_s"),
                                                  _get(results, "immediate", "ops_per_s")),
        "immediate_max_over_writer_max": _ratio(worst(results, "immediate", "max_ms"),
                                                worst(results, "writer-single", "max_ms")),
    }

    def check(value: Any, target: float, at_least: bool = True, unit: str = "") -> dict[str, Any]:
        ok = value is not None and (value >= target if at_least else value <= target)
        return {"value": value, "target": f"{'>=' if at_least else '<='} {target:g}{unit}",
                "result": "n/a" if value is None else ("PASS" if ok else "MISS")}

    single_errors = worst(results, "writer-single", "errors")
    # A run that failed (no figures) fails the check too: its errors were never counted.
    single_ok = single_errors == 0 and not _get(results, "writer-single", "failed_runs")
    checks = {
        "writer_single_over_immediate": check(ratios["writer_single_over_immediate"],
                                              WRITER_SINGLE_OVER_IMMEDIATE_TARGET),
        "writer_single_over_immediate_median": check(ratios["writer_single_over_immediate_median"],
                                                     WRITER_SINGLE_OVER_IMMEDIATE_TARGET),
        "writer_single_p99_ms": check(worst(results, "writer-single", "p99_ms"),
                                      WRITER_SINGLE_P99_MS_TARGET, at_least=False, unit=" ms"),
        "writer_single_zero_errors": {"value": single_errors, "target": "== 0", "result": "n/a"
                                      if single_errors is None else ("PASS" if single_ok else "MISS")},
        "writer_single_over_raw_single": check(ratios["writer_single_over_raw_single"],
                                               WRITER_SINGLE_OVER_RAW_SINGLE_GOAL) | {"goal": True},
        "batched_over_raw": check(ratios["batched_over_raw"], BATCHED_OVER_RAW_TARGET),
        "batched_over_raw_median": check(ratios["batched_over_raw_median"], BATCHED_OVER_RAW_TARGET),
        "batched_over_raw_row": info(ratios["batched_over_raw_row"]),
        "immediate_max_over_writer_max": check(ratios["immediate_max_over_writer_max"],
                                               IMMEDIATE_OVER_WRITER_MAX_TARGET),
        "bare_single_over_immediate": info(ratios["bare_single_over_immediate"]),
        "bare_single_over_immediate_median": info(ratios["bare_single_over_immediate_median"]),
        "writer_single_over_bare_single": info(ratios["writer_single_over_bare_single"]),
        "writer_single_over_bare_single_median": info(ratios["writer_single_over_bare_single_median"]),
        "bare_recorded_over_immediate": info(ratios["bare_recorded_over_immediate"]),
        "bare_recorded_over_immediate_median": info(ratios["bare_recorded_over_immediate_median"]),
        "writer_single_over_bare_recorded": info(ratios["writer_single_over_bare_recorded"]),
        "writer_single_over_bare_recorded_median": info(ratios["writer_single_over_bare_recorded_median"]),
        "writer_pipelined_over_immediate": info(ratios["writer_pipelined_over_immediate"]),
        "writer_pipelined_p99_ms": info(_get(results, "writer-pipelined", "latency", "p99_ms")),
    }
    return ratios, checks


def render(results: dict[str, dict[str, Any]], ratios: dict[str, float | None],
           checks: dict[str, dict[str, Any]]) -> str:
    header = ("scenario", "procs", "ops/s", "rows/s", "errors", "p50 ms", "p99 ms", "max ms", "writer RSS MB")
    rows = []
    for name, r in results.items():
        if "failed" in r:
            rows.append((name, "-", "FAILED", "-", "-", "-", "-", "-", "-"))
            continue
        lat = r["latency"]
        rows.append((name, fmt(r["procs"]), fmt(r["ops_per_s"]), fmt(r["rows_per_s"]), fmt(r["errors"]),
                     fmt(lat["p50_ms"], 2), fmt(lat["p99_ms"], 2), fmt(lat["max_ms"], 1),
                     fmt(_get(results, name, "writer", "peak_rss_mb"), 1)))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: tuple) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        return "  ".join([first, *(f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True))])

    out = [line(header), line(tuple("-" * w for w in widths)), *map(line, rows), ""]
    key_width = max(map(len, checks), default=0)
    for key, c in checks.items():
        value = "-" if c["value"] is None else f"{c['value']:g}"
        kind = "goal  " if c.get("goal") else "target"
        out.append(f"{key:<{key_width}} {value:>10}   {kind} {c['target']:<10} {c['result']}")
    details = []
    for name, r in results.items():
        if "failed" in r:
            details.append(f"  {name}: FAILED: {r['failed'].strip().splitlines()[-1]}")
            continue
        for message, n in r["errors_by_message"].items():
            details.append(f"  {name}: {n:,} x {message}")
    out += ["", "errors by message:", *(details or ["  none"])]
    notes = []
    for name, r in results.items():
        if "failed" in r:
            continue
        notes.append(f"  {name}: {r.get('notes', '')}; {r['ops']:,} ops, {r['rows']:,} rows in {r['elapsed_s']} s"
                     + (f"; ops per process {r['per_process_ops']}" if r["procs"] > 1 else ""))
        writer = r.get("writer") or {}
        if writer.get("stats_error") or writer.get("exit_code") not in (None, 0):
            notes.append(f"    WRITER PROBLEM: exit code {writer.get('exit_code')}, stats: {writer.get('stats_error')}"
                         f"; alive when asked: {writer.get('alive_after_stats')}; log tail in the JSON")
        stats = writer.get("stats")
        if stats:
            notes.append(f"    writer: commit p50 {stats['commit_p50_ms']} ms, p99 {stats['commit_p99_ms']} ms, "
                         f"max {stats['commit_max_ms']} ms; mean batch {stats['mean_batch']} requests over "
                         f"{stats['batches']:,} commits; busy replies {stats['busy_replies']}, lock errors "
                         f"{stats['lock_errors']}, commit failures {stats['commit_failures']}; peak RSS "
                         f"{r['writer']['peak_rss_mb']} MB (VmHWM {r['writer']['vm_hwm_mb']} MB); "
                         f"CPU {r['writer']['cpu_s']} s in the window")
        if "requests" in writer:  # bare-single's writer (bench/contention/bare_writer.py)
            per_request = writer["cpu_s"] / writer["requests"] * 1e6 if writer["requests"] else None
            notes.append(f"    bare writer: mean batch {writer['mean_batch']} requests over {writer['commits']:,} "
                         f"commits; CPU {writer['cpu_s']} s from its start"
                         + (f" ({per_request:.0f} us per request)" if per_request is not None else ""))
        if "producer_cpu_s" in r:
            per_op = sum(r["producer_cpu_s"]) / r["ops"] * 1e6 if r["ops"] else None
            notes.append(f"    producer CPU {r['producer_cpu_s']} s"
                         + (f" ({per_op:.0f} us per op)" if per_op is not None and r["procs"] > 1 else ""))
        if "runs" in r:
            rate = compared_by(name)
            notes.append(f"    {rate.replace('_per_', '/')} of each run: "
                         f"{', '.join(fmt(x[rate]) for x in r['runs'])} (best kept)")
        for v in r.get("variants", []):
            notes.append(f"    commit every {v['txn_batches']} batch(es): {fmt(v['rows_per_s'])} rows/s"
                         + ("  <- used" if v["txn_batches"] == r.get("txn_batches") else ""))
    out += ["", "notes:", *notes]
    return "\n".join(out)
