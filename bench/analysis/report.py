"""The report of ``python -m bench analysis``: medians of the runs, the two ratios against their
targets, and the printed table."""
from __future__ import annotations

import statistics
from typing import Any

from bench.common import fmt

#: Targets: analysis catches up at least at half the ingest rate ...
ANALYSIS_OVER_INGEST_TARGET = 0.5
#: ... and rebuilds an hourly history no slower than it is replayed.
ANALYSIS_OVER_REPLAY_TIME_TARGET = 1.0


def _median(runs: list[dict[str, Any]], *path: str) -> float | None:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float):
            values.append(float(value))
    return round(statistics.median(values), 3) if values else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else round(num / den, 3)


#: Per scenario: summary key -> where each run has the figure; and the ratio each run contributes.
_FIGURES = {
    "dense": {"ingest_rows_per_s": ("ingest", "rows_per_s"), "ingest_seconds": ("ingest", "seconds"),
              "analysis_ticks_per_s": ("analysis", "ticks_per_s"), "analysis_seconds": ("analysis", "seconds"),
              "analysis_cpu_s": ("analysis", "cpu_s"), "analysis_writer_cpu_s": ("analysis", "writer_cpu_s")},
    "hourly": {"startup_seconds": ("startup", "seconds"), "startup_cpu_s": ("startup", "cpu_s"),
               "replay_startup_seconds": ("replay_startup", "seconds"),
               "replay_startup_cpu_s": ("replay_startup", "cpu_s"),
               "replay_seconds": ("replay", "seconds"), "replay_cpu_s": ("replay", "cpu_s"),
               "replay_writer_cpu_s": ("replay", "writer_cpu_s"),
               "analysis_seconds": ("analysis", "seconds"), "analysis_cpu_s": ("analysis", "cpu_s"),
               "analysis_writer_cpu_s": ("analysis", "writer_cpu_s"),
               "analysis_ticks_per_s": ("analysis", "ticks_per_s")},
}
#: What the analysis stored: counts, the same in every run of a scenario (the same ticks in, the same
#: bars out), so not a median: each run's must agree (:func:`count_problems`).
_COUNTS = ("bars", "indicators")
_RATIO = {"dense": (("analysis", "ticks_per_s"), ("ingest", "rows_per_s")),
          "hourly": (("analysis", "seconds"), ("replay", "seconds"))}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per scenario, the median of each figure over its runs, and each run's ratio."""
    out: dict[str, dict[str, Any]] = {}
    for name, done in runs.items():
        if not done:
            continue
        num, den = _RATIO[name]
        out[name] = {"runs": len(done), "ticks": done[0]["ticks"],
                     **({"bars_replayed": done[0]["bars"]} if name == "hourly" else {}),
                     **{key: _median(done, *path) for key, path in _FIGURES[name].items()},
                     **{key: done[0]["analysis"][key] for key in _COUNTS},
                     "ratio_each_run": [_ratio(_median([r], *num), _median([r], *den)) for r in done]}
        if name == "hourly":
            out[name]["cpu_ratio_each_run"] = [_ratio(_cpu(r, "analysis"), _cpu(r, "replay")) for r in done]
    return out


def count_problems(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """A scenario whose runs stored different numbers of bars or indicator values: the same ticks
    folded twice gave different results, a defect whatever the timings say."""
    out = []
    for name, done in runs.items():
        for key in _COUNTS:
            each = [r["analysis"][key] for r in done]
            if len(set(each)) > 1:
                out.append(f"{name}: the runs stored different numbers of {key}: {each}")
    return out


def _past_startup(total: float | None, startup: float | None) -> float | None:
    """Seconds past a process's own start-up (its run with nothing to do); None when it took no longer
    (a small run, within the start-up's own noise)."""
    return None if total is None or startup is None or total <= startup else total - startup


def _cpu(run: dict[str, Any], step: str) -> float | None:
    """CPU seconds of a step: its process's and the writer's over the same span (what a busy machine
    has to find for it, which load does not stretch as it stretches wall time)."""
    own, writer = _median([run], step, "cpu_s"), _median([run], step, "writer_cpu_s")
    return None if own is None or writer is None else own + writer


def _sum(figures: dict[str, Any], *keys: str) -> float | None:
    values = [figures.get(k) for k in keys]
    return None if any(v is None for v in values) else sum(values)


def evaluate(summary: dict[str, dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, dict[str, Any]]]:
    dense, hourly = summary.get("dense", {}), summary.get("hourly", {})
    ratios = {
        "analysis_over_ingest": _ratio(dense.get("analysis_ticks_per_s"), dense.get("ingest_rows_per_s")),
        "analysis_over_replay_time": _ratio(hourly.get("analysis_seconds"), hourly.get("replay_seconds")),
        # No target: the same comparison in CPU seconds (process + writer), as a check on the wall
        # times when other work on the machine stretched one step more than the other.
        "analysis_over_replay_cpu": _ratio(_sum(hourly, "analysis_cpu_s", "analysis_writer_cpu_s"),
                                           _sum(hourly, "replay_cpu_s", "replay_writer_cpu_s")),
        # No target: the same comparison past each process's own start-up, what the work itself costs
        # whatever loading Python, SQLAlchemy and numpy costs. Of the medians: one run's is a difference
        # of two differences of separate processes, too noisy alone.
        "analysis_over_replay_work": _ratio(
            _past_startup(hourly.get("analysis_seconds"), hourly.get("startup_seconds")),
            _past_startup(hourly.get("replay_seconds"), hourly.get("replay_startup_seconds"))),
    }

    def verdict(value: float | None, ok: bool) -> str:
        return "n/a" if value is None else ("PASS" if ok else "MISS")

    a, b = ratios["analysis_over_ingest"], ratios["analysis_over_replay_time"]
    checks = {
        "analysis_over_ingest": {"value": a, "target": f">= {ANALYSIS_OVER_INGEST_TARGET}",
                                 "result": verdict(a, a is not None and a >= ANALYSIS_OVER_INGEST_TARGET)},
        "analysis_over_replay_time": {"value": b, "target": f"<= {ANALYSIS_OVER_REPLAY_TIME_TARGET:g}",
                                      "result": verdict(b, b is not None and b <= ANALYSIS_OVER_REPLAY_TIME_TARGET)},
    }
    return ratios, checks


def render(summary: dict[str, dict[str, Any]], ratios: dict[str, float | None], checks: dict[str, dict[str, Any]],
           problems: list[str]) -> str:
    header = ("scenario", "step", "ticks", "seconds", "ticks/s", "CPU s", "writer CPU s", "bars", "indicators")
    rows = []
    d, h = summary.get("dense"), summary.get("hourly")
    if d:
        rows.append(("dense", "ingest (writer-batched)", fmt(d["ticks"]), fmt(d["ingest_seconds"], 2),
                     fmt(d["ingest_rows_per_s"]), "-", "-", "-", "-"))
        rows.append(("dense", "analysis catch-up", fmt(d["ticks"]), fmt(d["analysis_seconds"], 2),
                     fmt(d["analysis_ticks_per_s"]), fmt(d["analysis_cpu_s"], 2),
                     fmt(d.get("analysis_writer_cpu_s"), 2), fmt(d["bars"]), fmt(d["indicators"])))
    if h:
        rows.append(("hourly", "analysis start-up (no ticks)", "0", fmt(h.get("startup_seconds"), 2), "-",
                     fmt(h.get("startup_cpu_s"), 2), "-", "-", "-"))
        rows.append(("hourly", "replay start-up (no bars)", "0", fmt(h.get("replay_startup_seconds"), 2), "-",
                     fmt(h.get("replay_startup_cpu_s"), 2), "-", "-", "-"))
        rows.append(("hourly", f"replay ({h['bars_replayed']:,} 1h bars)", fmt(h["ticks"]), fmt(h["replay_seconds"], 2),
                     fmt(h["ticks"] / h["replay_seconds"] if h["replay_seconds"] else None), fmt(h["replay_cpu_s"], 2),
                     fmt(h.get("replay_writer_cpu_s"), 2), "-", "-"))
        rows.append(("hourly", "analysis", fmt(h["ticks"]), fmt(h["analysis_seconds"], 2),
                     fmt(h["analysis_ticks_per_s"]), fmt(h["analysis_cpu_s"], 2),
                     fmt(h.get("analysis_writer_cpu_s"), 2), fmt(h["bars"]), fmt(h["indicators"])))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: tuple) -> str:
        left = [f"{cells[0]:<{widths[0]}}", f"{cells[1]:<{widths[1]}}"]
        return "  ".join([*left, *(f"{c:>{w}}" for c, w in zip(cells[2:], widths[2:], strict=True))])

    out = [line(header), line(tuple("-" * w for w in widths)), *map(line, rows), "",
           "medians of the runs; seconds are wall time of the process, start-up included; writer CPU s: the "
           "writer's CPU over the same span", ""]
    for key, c in checks.items():
        value = "-" if c["value"] is None else f"{c['value']:g}"
        out.append(f"{key:<28} {value:>8}   target {c['target']:<6} {c['result']}")
    cpu = ratios.get("analysis_over_replay_cpu")
    if cpu is not None:
        out.append(f"{'analysis_over_replay_cpu':<28} {cpu:>8g}   (no target: CPU s of process + writer, which "
                   "load does not stretch)")
    work = ratios.get("analysis_over_replay_work")
    if work is not None:
        out.append(f"{'analysis_over_replay_work':<28} {work:>8g}   (no target: the medians' seconds past each "
                   "process's own start-up)")
    for name, s in summary.items():
        out.append(f"  {name}: ratio of each run {s['ratio_each_run']}")
        if "cpu_ratio_each_run" in s:
            out.append(f"  {name}: CPU ratio of each run {s['cpu_ratio_each_run']}")
    out += ["", "problems:", *(f"  {p}" for p in problems or ["none"])]
    return "\n".join(out)
