"""The report of ``python -m bench api``: stored rows checked against what
was acknowledged, the p99 ratios (under load, with slow clients held) against
their targets, and the printed table."""
from __future__ import annotations

from typing import Any

from bench.api.data import (
    INGEST_SOURCE,
    NOISY_PCT,
    P99_RATIO_TARGET,
    POST_ROUTE,
    POST_SOURCE,
    READ_ROUTES,
    SEED_SOURCE,
    SLOW_P99_RATIO_TARGET,
)
from bench.common import fmt


def verify(runs: list[dict[str, Any]], counts: dict[str, Any], seed_ticks: int) -> list[dict[str, Any]]:
    """Stored rows per source against what was acknowledged."""
    by_source = counts["ticks_by_source"]
    checks: list[dict[str, Any]] = [{"what": "seed ticks", "stored": by_source.get(SEED_SOURCE, 0),
                                     "expected": seed_ticks}]
    ingests = [r["ingest"] for r in runs if "ingest" in r]
    if ingests:
        checks.append({"what": "ingested ticks (under-load producer)",
                       "stored": sum(n for s, n in by_source.items() if s.startswith(INGEST_SOURCE)),
                       "expected": sum(i["rows_total"] for i in ingests),
                       "duplicates_reported": sum(i["duplicates"] for i in ingests)})
    writes = [r for r in runs if r["scenario"] == "write" and "failed" not in r]
    if writes:
        stored = sum(n for s, n in by_source.items() if s.startswith(POST_SOURCE))
        checks.append({"what": "POSTed ticks (acknowledged)", "stored": stored,
                       "expected": sum(w["ticks_acknowledged"] for w in writes),
                       "unacknowledged_sent": sum(w["ticks_unacknowledged"] for w in writes),
                       "duplicates_reported": sum(w["duplicates_reported"] for w in writes)})
    for c in checks:
        # A request that failed (e.g. 503 after the writer deadline) may or may not have been applied.
        slack = c.get("unacknowledged_sent", 0)
        c["ok"] = c["expected"] <= c["stored"] <= c["expected"] + slack and not c.get("duplicates_reported")
    return checks


#: The ratio checks: name, the scenario compared with ``idle``, target.
RATIOS = (("p99_under_load_over_idle", "under-load", P99_RATIO_TARGET),
          ("p99_slow_clients_over_idle", "slow-clients", SLOW_P99_RATIO_TARGET))


def _noisy(run: dict[str, Any]) -> bool:
    return ((run.get("window") or {}).get("not_ours_pct") or 0) > NOISY_PCT


def evaluate(summary: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One server's checks: p99 of each read route under load, and with slow clients held, over its
    p99 idle, against their targets (not reliable when another process took a noticeable share of
    the machine in a window compared); and no failed read while slow clients were held."""
    checks: list[dict[str, Any]] = []
    for name, scenario, target in RATIOS:
        if not any(r["scenario"] == scenario for r in runs):
            continue
        noisy = any(_noisy(r) for r in runs if r["scenario"] in ("idle", scenario))
        for route in READ_ROUTES:
            def p99(which: str, route: str = route) -> float | None:
                s = summary.get(which)
                return None if s is None else s["routes"][route]["latency"]["p99_ms"]

            idle, other = p99("idle"), p99(scenario)
            value = round(other / idle, 3) if idle and other is not None else None
            result = "n/a" if value is None else ("PASS" if value <= target else "MISS")
            checks.append({"name": name, "route": route, "idle_p99_ms": idle, "p99_ms": other, "value": value,
                           "target": f"<= {target:g}", "result": result, "reliable": not noisy})
    slow = [r for r in runs if r["scenario"] == "slow-clients"]
    if slow:
        errors = sum(s["errors"] for r in slow if "routes" in r for s in r["routes"].values())
        result = "n/a" if any("failed" in r for r in slow) else "PASS" if errors == 0 else "MISS"
        checks.append({"name": "slow_clients_errors", "route": "reads", "value": errors, "target": "== 0",
                       "result": result, "reliable": True})
    return checks


def _label(run: dict[str, Any], config: dict[str, Any]) -> str:
    label = (run["scenario"] if config["repeat"] == 1 or run["scenario"] == "write"
             else f"{run['scenario']} #{run['run']}")
    return f"{run['server']}: {label}" if len(config["servers"]) > 1 else label


def table_rows(runs: list[dict[str, Any]], summaries: dict[str, dict[str, Any]],
               config: dict[str, Any]) -> list[dict[str, Any]]:
    """The printed table, one row per scenario run and route (then the pooled runs of each server)."""
    labelled = [(_label(r, config), r) for r in runs]
    if config["repeat"] > 1:
        multi = len(config["servers"]) > 1
        labelled += [(f"{server + ': ' if multi else ''}{name} (all {s['runs']})", s)
                     for server, summary in summaries.items() for name, s in summary.items() if s is not None]
    rows = []
    for label, r in labelled:
        if "failed" in r:
            rows.append({"scenario": label, "route": "FAILED"})
            continue
        for route, s in r["routes"].items():
            lat = s["latency"]
            rows.append({"scenario": label, "route": route, "requests": s["requests"], "req_per_s": s["req_per_s"],
                         "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], "max_ms": lat["max_ms"],
                         "errors": s["errors"]})
    return rows


def _check_line(c: dict[str, Any], multi: bool) -> str:
    prefix = f"{c['server']}: " if multi else ""
    if c["name"] == "slow_clients_errors":
        return f"{prefix}{c['name']:<26} {c['route']:<15} {c['value']:>6}   target {c['target']}   {c['result']}"
    value = "-" if c["value"] is None else f"{c['value']:.2f}"
    return (f"{prefix}{c['name']:<26} {c['route']:<15} {value:>6}   (p99 {fmt(c['idle_p99_ms'], 2)} -> "
            f"{fmt(c['p99_ms'], 2)} ms)   target {c['target']}   {c['result']}"
            + ("" if c["reliable"] else " (unreliable: noisy windows, see the warning)"))


def render(doc: dict[str, Any]) -> str:
    runs = doc["runs"]
    header = ("scenario", "route", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "errors")
    cells = [(r["scenario"], r["route"], fmt(r.get("requests")), fmt(r.get("req_per_s"), 1),
              fmt(r.get("p50_ms"), 2), fmt(r.get("p99_ms"), 2), fmt(r.get("max_ms"), 1), fmt(r.get("errors")))
             for r in doc["table"]]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells, strict=True)]

    def line(row: tuple) -> str:
        left = [f"{row[0]:<{widths[0]}}", f"{row[1]:<{widths[1]}}"]
        return "  ".join(left + [f"{c:>{w}}" for c, w in zip(row[2:], widths[2:], strict=True)])

    out = [line(header), line(tuple("-" * w for w in widths)), *map(line, cells), ""]
    multi = len(doc["config"]["servers"]) > 1
    out += [_check_line(c, multi) for c in doc["checks"]]
    noisy = [f"{_label(r, doc['config'])} ({r['window']['not_ours_pct']:g} %)" for r in runs if _noisy(r)]
    if noisy:
        out.append(f"WARNING: in {', '.join(noisy)} more than {NOISY_PCT:g} % of the machine's CPU went to other "
                   "processes: those windows measured them too (see below); rerun on a quiet machine, or with --repeat")
    for r in runs:
        if "slow_clients" in r:
            h = r["slow_clients"]
            counts = ", ".join(f"{k} {v:,}" for k, v in sorted(h["counts"].items()) if k != "opened") or "none"
            out.append(f"slow clients during {_label(r, doc['config'])}: {h['connections']} connections held "
                       "(nothing sent / half a request line / half a header, in turn), "
                       f"{h['counts'].get('opened', 0):,} opened in all; by the server: {counts} (each reopened at "
                       f"once); {h['held_at_end']} open at the end")
        if "ingest" in r:
            i, lat = r["ingest"], r["ingest"]["request_latency"]
            out.append(f"ingest during {_label(r, doc['config'])}: {fmt(i['rows_per_s'])} rows/s "
                       f"({fmt(i['rows_in_window'])} rows acknowledged in the {r['elapsed_s']} s read window; "
                       f"batches of {i['batch']}, window {i['window']}; request p50 {fmt(lat['p50_ms'], 0)} ms, "
                       f"p99 {fmt(lat['p99_ms'], 0)} ms; {i['errors']} errors)")
        if "ticks_per_s" in r:
            s = r["routes"][POST_ROUTE]
            out.append(f"write: {fmt(s['req_per_s'], 1)} requests/s, {fmt(r['ticks_per_s'])} ticks/s "
                       f"({r['post_batch']} per request), p50 {fmt(s['latency']['p50_ms'], 2)} ms, "
                       f"p99 {fmt(s['latency']['p99_ms'], 2)} ms")
    out += ["", "stored rows:"]
    for c in doc["verification"]:
        extra = (f"; {c['unacknowledged_sent']:,} sent unacknowledged" if "unacknowledged_sent" in c else "")
        extra += f"; {c['duplicates_reported']} duplicates" if "duplicates_reported" in c else ""
        out.append(f"  {c['what']:<38} stored {c['stored']:>10,}  expected {c['expected']:>10,}{extra}  "
                   f"{'OK' if c['ok'] else 'MISMATCH'}")
    errors = [f"  {_label(r, doc['config'])} {route}: {n:,} x {message}" for r in runs if "routes" in r
              for route, s in r["routes"].items() for message, n in s["errors_by_message"].items()]
    errors += [f"  {_label(r, doc['config'])} ingest: {n:,} x {message}" for r in runs if "ingest" in r
               for message, n in r["ingest"]["errors_by_message"].items()]
    errors += [f"  {_label(r, doc['config'])}: FAILED: {r['failed'].strip().splitlines()[-1]}"
               for r in runs if "failed" in r]
    out += ["", "errors by message:", *(errors or ["  none"])]
    out += ["", "where the time went, in each measured window (CPU-s = CPU seconds):"]
    for r in runs:
        w = r.get("window")
        if not w:
            continue
        k = w["system_cpu_s"]
        out.append(f"  {_label(r, doc['config'])}: machine {fmt(w['system_busy_pct'], 1)} % busy "
                   f"({w['system_busy_cpu_s']:.2f} of {w['cpus'] * w['elapsed_s']:.2f} CPU-s: user {k['user']:.2f}, "
                   f"system {k['system']:.2f}, irq {k['irq']:.2f}, steal {k['steal']:.2f}); CPU pressure "
                   f"{fmt(w['cpu_pressure_some_pct'], 1)} %; this benchmark {w['ours_cpu_s']:.2f} CPU-s, "
                   f"other processes {w['others_cpu_s']:.2f}, unattributed "
                   f"{max(0.0, w['system_busy_cpu_s'] - w['ours_cpu_s'] - w['others_cpu_s']):.2f} (processes that "
                   f"came and went, kernel): {fmt(w['not_ours_pct'], 1)} % of the machine not ours")
        groups = ", ".join(f"{g} {v['cpu_s']:.2f} (waited {v['runq_wait_s']:.2f})" for g, v in w["groups"].items())
        clients = r["clients_load"]
        producer = f", producer {r['ingest']['producer_cpu_s']:.2f}" if "ingest" in r else ""
        out.append(f"    CPU-s (run-queue wait s): {groups}, clients {clients['cpu_s']:.2f} "
                   f"(waited {clients['runq_wait_s']:.2f}){producer}")
        gw = r.get("gunicorn_workers") or {}
        out.append(f"    gunicorn workers, per request: on CPU {fmt(gw.get('cpu_ms_per_request'), 2)} ms, waiting "
                   f"for a CPU {fmt(gw.get('runq_wait_ms_per_request'), 2)} ms, blocked or idle "
                   f"{fmt(gw.get('blocked_or_idle_ms_per_request'), 2)} ms; TCP connects {clients['tcp_connects']:,};"
                   f" WAL {w['wal_start_mb']} -> max {w['wal_max_mb']} MB")
        wc = w.get("writer_counters")
        if wc:
            out.append(f"    writer: {wc['batches']:,} commits, {wc['requests_ok']:,} requests, "
                       f"{wc['ticks_inserted']:,} ticks; {wc['dedup_hits']} resent requests answered from its "
                       f"record, {wc['busy_replies']} busy replies, {wc['lock_errors']} lock errors")
        busiest = [o for o in w["others_top"] if o["cpu_s"] >= 0.05 * w["elapsed_s"]]
        if busiest:
            out.append("    other processes: " + "; ".join(f"{o['cpu_s']:.2f} CPU-s pid {o['pid']} {o['cmd'][:50]}"
                                                           for o in busiest[:3]))
    stats = (doc.get("writer") or {}).get("stats") or {}
    if stats:
        out.append(f"  writer over the whole run: commit p50 {stats.get('commit_p50_ms')} ms, p99 "
                   f"{stats.get('commit_p99_ms')} ms, max {stats.get('commit_max_ms')} ms (its last 4096 commits); "
                   f"mean batch {stats.get('mean_batch')} requests; busy replies {stats.get('busy_replies')}; "
                   f"lock errors {stats.get('lock_errors')}; nice {doc['config']['writer_nice']}")
    out.append(f"  machine: {doc['machine']['cpus']} CPUs, load average before the run "
               f"{doc['machine']['loadavg_before']}")
    return "\n".join(out)


def public(value: Any) -> Any:
    """``value`` without the keys that start with ``_`` (raw latencies), for JSON."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items() if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(value, list):
        return [public(v) for v in value]
    return value
