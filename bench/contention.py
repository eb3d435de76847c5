"""``python -m bench contention``: many writers on one SQLite file, measured.

The question: users ran several processes that each wrote the shared SQLite
file directly (WAL, 60 s busy timeout) and got ``database is locked`` and
multi-second stalls. tickstack's answer is one writer process that every
other process sends named ops to. This benchmark measures the old way, the
obvious patch, and the writer, each on a fresh temporary database with the
project's own schema (``db.schema.migrate``), all at the same durability
(``synchronous`` from the settings, NORMAL by default, as the writer uses):

``seed``
    ``--procs`` processes each loop for ``--seconds``: in one *deferred*
    transaction (``BEGIN``), read (``SELECT count(*), max(bid) FROM ticks``),
    insert a tick, insert an audit row, commit; directly with ``sqlite3``,
    WAL, busy timeout 60 s. This is the users' setup
    (``shared/reference/seed_contention.py``). A deferred transaction that
    read and then tries to write fails at once with "database is locked" when
    another process committed in between (SQLite skips the busy handler,
    since waiting could deadlock), so errors show up however long the
    timeout. Every error is counted by its message.
``immediate``
    The same with ``BEGIN IMMEDIATE``: the write lock is taken first, so
    nothing fails, but waiting writers sit in SQLite's busy handler, which
    polls with growing sleeps (up to 100 ms) and serves them unfairly: the
    tail latency (max) is the cost of the patch.
``writer-single``
    ``--procs`` producer processes send single-row acknowledged writes to
    the writer (``WriterClient.call``), alternating ``insert_ticks`` with one
    tick (each producer its own ``source``, so ``(source, seq)`` is unique)
    and ``audit``, for ``--seconds``. Latency is measured in the producer,
    per call, from before sending to the committed answer. Target: no error
    at all, and a max latency at most 1/20 of ``immediate``'s.
``writer-batched``
    Bulk ingest through the writer: ``--batch-producers`` processes (default
    1) send ``--rows`` ticks, generated before the clock starts, as
    ``insert_ticks`` requests in the compact *columns* form, ``--batch`` rows
    each, with ``--window`` requests in flight (``WriterClient.pipeline``).
    rows/s = rows / (first submit .. last acknowledgement).
``raw``
    The ceiling for the same work: one process, one ``sqlite3`` connection
    opened by the writer's own ``make_write_engine`` (so exactly its pragmas:
    WAL, same ``synchronous``, ...), inserting the same rows (pre-built as
    tuples before the clock starts) with the same statement the
    ``insert_ticks`` op compiles (``INSERT ... ON CONFLICT DO NOTHING``), by
    ``executemany`` per batch, timed around the inserts and commits only. It
    runs twice, committing after every batch and after every 16 batches,
    each on a fresh database, and reports the faster, saying which (both are
    in the JSON; neither wins reliably on this machine). Target:
    writer-batched reaches at least 0.9 of it.

The throughput pair (``writer-batched``, ``raw``) runs ``--repeat`` times
(default 2), interleaved, and the best run of each is kept (all are in the
JSON): on a shared 2-core machine one run of either can be 30 % off.

For the writer scenarios the writer is started with
``workers.writer.spawn`` on a fresh ``TICKSTACK_HOME``, its RSS is sampled
every 50 ms (peak reported, with the kernel's ``VmHWM`` in the JSON), its own
``stats()`` (commit p50/p99, mean batch) are taken at the end, and it is
stopped with SIGTERM. Worker processes are started with the ``spawn`` method
and wait at a common gate, so the measured window is one of real contention.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    Gate,
    count_rows,
    create_schema,
    fresh_home,
    int_between,
    latency_summary,
    name_list,
    positive_float,
    positive_int,
    run_group,
    running_writer,
    tick_batches,
    writable_file,
)

SCENARIO_HELP = {
    "seed": "--procs processes: BEGIN; read; insert tick + audit row; COMMIT (direct sqlite3, as the users did)",
    "immediate": "the same with BEGIN IMMEDIATE",
    "writer-single": "--procs producers: one acknowledged single-row op per call through the writer",
    "writer-batched": "--rows ticks through the writer: pipelined insert_ticks in columns form",
    "raw": "the same rows straight into one sqlite3 connection (the ceiling)",
}
SCENARIOS = tuple(SCENARIO_HELP)
#: Targets: batched ingest reaches this share of raw sqlite3 ...
BATCHED_OVER_RAW_TARGET = 0.9
#: ... and immediate's worst latency is at least this many times the writer's.
IMMEDIATE_OVER_WRITER_MAX_TARGET = 20.0
#: Commit after this many batches in the raw scenario's two variants.
RAW_TXN_VARIANTS = (1, 16)
SEED_BUSY_TIMEOUT_S = 60.0
MAX_BATCH = 10_000  # db.ops.MAX_TICKS: the writer refuses larger requests
SYNCHRONOUS_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


# --- worker processes (top level: the spawn start method pickles them by name) ------------


def _error_key(e: BaseException) -> str:
    message = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {message[:160]}"


def sqlite_producer(index: int, db_path: str, seconds: float, begin: str, synchronous: str, *,
                    gate: Gate) -> dict[str, Any]:
    """The seed's pattern: read, then write, in one transaction, directly."""
    con = sqlite3.connect(db_path, timeout=SEED_BUSY_TIMEOUT_S, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute(f"PRAGMA synchronous = {synchronous}")
    begin_sql = "BEGIN IMMEDIATE" if begin == "immediate" else "BEGIN"
    source = f"bench-{begin}-{index}"
    insert_tick = ("INSERT INTO ticks (symbol, ts, bid, ask, volume, source, seq) VALUES (?, ?, ?, ?, ?, ?, ?)")
    insert_audit = ("INSERT INTO audit_log (ts, actor, action, target, result, detail) VALUES (?, ?, ?, ?, ?, ?)")
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    commits = 0
    start = gate.wait()
    end = start + seconds
    last = start
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            con.execute(begin_sql)
            count, max_bid = con.execute("SELECT count(*), max(bid) FROM ticks").fetchone()
            bid = 100.0 + (commits % 1000) * 0.01
            ts = int(time.time() * 1000)
            con.execute(insert_tick, ("BTCUSD", ts, bid, bid + 0.02, 1.0, source, commits))
            con.execute(insert_audit, (ts, source, "analyse", "BTCUSD", "ok", f"n={count} max_bid={max_bid}"))
            con.execute("COMMIT")
        except sqlite3.Error as e:
            errors[_error_key(e)] += 1
            if con.in_transaction:
                try:
                    con.execute("ROLLBACK")
                except sqlite3.Error as e2:
                    errors[_error_key(e2) + " (on rollback)"] += 1
        else:
            latencies.append(time.perf_counter() - t0)
            commits += 1
        last = time.monotonic()
    con.close()
    return {"ops": commits, "rows": commits, "latencies": latencies, "errors": dict(errors), "last": last}


def writer_single_producer(index: int, env: dict[str, str], seconds: float, *, gate: Gate) -> dict[str, Any]:
    """One acknowledged op per call: a one-tick ``insert_ticks``, then an ``audit``."""
    from db.client import WriterClient
    from db.config import load_settings

    source = f"bench-single-{index}"
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    ops = rows = n = 0
    with WriterClient(settings=load_settings(env)) as client:
        client.ping(timeout=30.0)  # connected before the clock starts
        start = gate.wait()
        end = start + seconds
        last = start
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                if n % 2 == 0:
                    bid = 100.0 + (n % 1000) * 0.01
                    tick = {"symbol": "BTCUSD", "ts": int(time.time() * 1000), "bid": bid, "ask": bid + 0.02,
                            "volume": 1.0, "source": source, "seq": n}
                    result = client.call("insert_ticks", ticks=[tick])
                    rows += result["inserted"]
                else:
                    client.call("audit", actor=source, action="analyse", target="BTCUSD", detail=f"n={n}")
            except Exception as e:  # every failure counts, whatever its type
                errors[_error_key(e)] += 1
            else:
                latencies.append(time.perf_counter() - t0)
                ops += 1
            n += 1
            last = time.monotonic()
    return {"ops": ops, "rows": rows, "latencies": latencies, "errors": dict(errors), "last": last}


def writer_batched_producer(index: int, env: dict[str, str], rows: int, first_seq: int, batch: int, window: int,
                            *, gate: Gate) -> dict[str, Any]:
    """Pipelined column batches, generated before the clock starts."""
    from db.client import Ticket, WriterClient
    from db.config import load_settings

    batches = tick_batches(rows, batch, f"bench-batch-{index}", first_seq)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    inserted = 0

    def on_done(ticket: Ticket) -> None:
        nonlocal inserted
        if ticket.error is not None:
            errors[_error_key(ticket.error)] += 1
            return
        inserted += ticket.result()["inserted"]
        if ticket.latency is not None:
            latencies.append(ticket.latency)

    with WriterClient(settings=load_settings(env)) as client:
        client.ping(timeout=30.0)
        gate.wait()
        first, cpu0 = time.monotonic(), time.process_time()
        with client.pipeline(window=window, on_done=on_done) as pipe:
            for columns in batches:
                pipe.submit("insert_ticks", ticks=columns)
        last, cpu = time.monotonic(), time.process_time() - cpu0
    return {"ops": len(batches) - sum(errors.values()), "rows": inserted, "latencies": latencies,
            "errors": dict(errors), "first": first, "last": last, "cpu_s": cpu}


def raw_inserter(index: int, env: dict[str, str], db_paths: list[str], plan: list[tuple[str, int, int]],
                 batch: int, txn_variants: list[int], *, gate: Gate) -> list[dict[str, Any]]:
    """The same rows, statement and batches, straight into sqlite3, once per
    commit interval in ``txn_variants``, each into its own fresh database.

    The connection comes from the writer's own ``make_write_engine``, so it
    has exactly the writer's connect-time pragmas (WAL, synchronous, ...)."""
    from sqlalchemy.dialects import sqlite as sqlite_dialect

    from db.config import load_settings
    from db.engine import make_write_engine
    from db.models import Tick
    from db.ops import TICK_FIELDS

    # The statement exactly as db.ops._insert_ignoring_duplicates compiles it.
    compiled = sqlite_dialect.insert(Tick.__table__).on_conflict_do_nothing().compile(
        dialect=sqlite_dialect.dialect(), column_keys=list(TICK_FIELDS))
    assert list(compiled.positiontup or ()) == list(TICK_FIELDS), compiled.positiontup
    sql = str(compiled)
    batches = [list(zip(*(cols[f] for f in TICK_FIELDS), strict=True))
               for source, first_seq, n in plan for cols in tick_batches(n, batch, source, first_seq)]
    gate.wait()
    out = []
    for db_path, txn_batches in zip(db_paths, txn_variants, strict=True):
        settings = load_settings({**env, "DATABASE_URL": f"sqlite:///{db_path}"})
        engine = make_write_engine(settings)
        pooled = engine.raw_connection()
        con: sqlite3.Connection = pooled.driver_connection  # type: ignore[assignment]
        pragmas = {name: con.execute(f"PRAGMA {name}").fetchone()[0]
                   for name in ("journal_mode", "synchronous", "wal_autocheckpoint", "cache_size")}
        pragmas["synchronous"] = SYNCHRONOUS_NAMES.get(pragmas["synchronous"], pragmas["synchronous"])
        latencies: list[float] = []
        inserted = 0
        first = time.monotonic()
        for i in range(0, len(batches), txn_batches):
            t0 = time.perf_counter()
            con.execute("BEGIN IMMEDIATE")
            for rows in batches[i:i + txn_batches]:
                inserted += con.executemany(sql, rows).rowcount
            con.execute("COMMIT")
            latencies.append(time.perf_counter() - t0)
        last = time.monotonic()
        pooled.close()
        engine.dispose()
        out.append({"ops": len(batches), "rows": inserted, "latencies": latencies, "errors": {}, "first": first,
                    "last": last, "sql": sql, "pragmas": pragmas, "txn_batches": txn_batches})
    return out


# --- scenarios ------------------------------------------------------------------------------


def _combine(name: str, procs: int, start: float, results: list[dict[str, Any]], *,
             timed_from_first_op: bool = False) -> dict[str, Any]:
    """Add up the workers' results of one scenario."""
    begin = min(r["first"] for r in results) if timed_from_first_op else start
    elapsed = max(r["last"] for r in results) - begin
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    ops = sum(r["ops"] for r in results)
    rows = sum(r["rows"] for r in results)
    return {
        "scenario": name, "procs": procs, "ops": ops, "rows": rows, "elapsed_s": round(elapsed, 4),
        "ops_per_s": round(ops / elapsed, 1) if elapsed > 0 else None,
        "rows_per_s": round(rows / elapsed, 1) if elapsed > 0 else None,
        "errors": sum(errors.values()), "errors_by_message": dict(errors.most_common()),
        "latency": latency_summary([x for r in results for x in r["latencies"]]),
        "per_process_ops": [r["ops"] for r in results],
    }


def _plan(rows: int, producers: int) -> list[tuple[str, int, int]]:
    """Split ``rows`` among producers: (source, first seq, rows) each."""
    share, extra = divmod(rows, producers)
    return [(f"bench-batch-{i}", 0, share + (1 if i < extra else 0)) for i in range(producers)]


def _synchronous(env: dict[str, str]) -> str:
    from db.config import load_settings

    return load_settings(env).synchronous


def run_sqlite(opts: argparse.Namespace, begin: str) -> dict[str, Any]:
    name = "seed" if begin == "deferred" else "immediate"
    with fresh_home() as (_home, env):
        db_path = create_schema(env)
        sync = _synchronous(env)
        args = [(str(db_path), opts.seconds, begin, sync) for _ in range(opts.procs)]
        start, results = run_group(sqlite_producer, args, run_timeout=opts.seconds + SEED_BUSY_TIMEOUT_S + 60)
        out = _combine(name, opts.procs, start, results)
        out["notes"] = f"direct sqlite3, BEGIN {begin.upper()}, WAL, busy timeout 60 s, synchronous={sync}"
        out["stored_ticks"] = count_rows(db_path, "ticks")
    return out


def run_writer_single(opts: argparse.Namespace) -> dict[str, Any]:
    with fresh_home() as (_home, env), running_writer(env) as writer:
        args = [(env, opts.seconds) for _ in range(opts.procs)]
        start, results = run_group(writer_single_producer, args, run_timeout=opts.seconds + 180,
                                   on_start=writer.sampler.mark_start)
        writer.finish_measuring()
        out = _combine("writer-single", opts.procs, start, results)
        out["notes"] = "WriterClient.call: insert_ticks (1 tick) and audit, alternately"
    out["writer"] = writer.summary()
    return out


def run_writer_batched(opts: argparse.Namespace) -> dict[str, Any]:
    plan = _plan(opts.rows, opts.batch_producers)
    with fresh_home() as (_home, env):
        with running_writer(env) as writer:
            args = [(env, n, first_seq, opts.batch, opts.window) for _source, first_seq, n in plan]
            start, results = run_group(writer_batched_producer, args, run_timeout=600,
                                       on_start=writer.sampler.mark_start)
            writer.finish_measuring()
            out = _combine("writer-batched", opts.batch_producers, start, results, timed_from_first_op=True)
            out["producer_cpu_s"] = [round(r["cpu_s"], 3) for r in results]
        db_path = Path(env["TICKSTACK_HOME"]) / "tickstack.db"
        out["stored_ticks"] = count_rows(db_path, "ticks")
    out["writer"] = writer.summary()
    out["notes"] = f"pipeline window {opts.window}, columns form, batches of {opts.batch}"
    _check_stored(out, opts.rows)
    return out


def run_raw(opts: argparse.Namespace) -> dict[str, Any]:
    plan = _plan(opts.rows, opts.batch_producers)
    with fresh_home() as (home, env):
        db_paths = []
        for txn_batches in RAW_TXN_VARIANTS:  # one fresh database per variant, same schema
            variant_env = {**env, "DATABASE_URL": f"sqlite:///{home / f'raw-{txn_batches}.db'}"}
            db_paths.append(str(create_schema(variant_env)))
        start, (results,) = run_group(raw_inserter, [(env, db_paths, plan, opts.batch, list(RAW_TXN_VARIANTS))],
                                      run_timeout=600)
        variants = []
        for db_path, result in zip(db_paths, results, strict=True):
            out = _combine("raw", 1, start, [result], timed_from_first_op=True)
            out["stored_ticks"] = count_rows(Path(db_path), "ticks")
            out["txn_batches"] = n = result["txn_batches"]
            out["sql"] = result["sql"]
            out["pragmas"] = result["pragmas"]
            out["notes"] = (f"one sqlite3 connection with the write engine's pragmas "
                            f"(synchronous={result['pragmas']['synchronous']}), executemany per batch of "
                            f"{opts.batch}, commit every {n} batch{'es' if n > 1 else ''}")
            _check_stored(out, opts.rows)
            variants.append(out)
    best = dict(max(variants, key=lambda v: v["rows_per_s"] or 0))
    best["variants"] = [{k: v[k] for k in ("txn_batches", "rows_per_s", "elapsed_s", "latency")} for v in variants]
    return best


def _check_stored(out: dict[str, Any], expected: int) -> None:
    """A benchmark that lost rows measured nothing: say so as an error."""
    if out["stored_ticks"] != expected or out["rows"] != expected:
        message = (f"stored {out['stored_ticks']} ticks and acknowledged {out['rows']}, "
                   f"expected {expected}")
        out["errors_by_message"][message] = 1
        out["errors"] += 1


#: Scenarios --repeat runs again; their best run (most rows/s) is kept.
REPEATABLE = ("writer-batched", "raw")


def _best(name: str, runs: list[dict[str, Any]], failures: list[str]) -> dict[str, Any]:
    if not runs:
        return {"scenario": name, "failed": failures[-1] if failures else "did not run"}
    best = dict(max(runs, key=lambda r: r["rows_per_s"] or 0))
    if len(runs) > 1:
        best["runs"] = [{"rows_per_s": r["rows_per_s"], "elapsed_s": r["elapsed_s"], "errors": r["errors"]}
                        for r in runs]
    if failures:
        best["failed_runs"] = failures
    return best


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "seed": lambda o: run_sqlite(o, "deferred"),
    "immediate": lambda o: run_sqlite(o, "immediate"),
    "writer-single": run_writer_single,
    "writer-batched": run_writer_batched,
    "raw": run_raw,
}


# --- report ---------------------------------------------------------------------------------


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


def evaluate(results: dict[str, dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, dict[str, Any]]]:
    """The two ratios and the three checks against their targets."""
    ratios = {
        "batched_over_raw": _ratio(_get(results, "writer-batched", "rows_per_s"), _get(results, "raw", "rows_per_s")),
        "immediate_max_over_writer_max": _ratio(_get(results, "immediate", "latency", "max_ms"),
                                                _get(results, "writer-single", "latency", "max_ms")),
    }

    def verdict(value: Any, ok: bool) -> str:
        return "n/a" if value is None else ("PASS" if ok else "MISS")

    single_errors = _get(results, "writer-single", "errors")
    b, m = ratios["batched_over_raw"], ratios["immediate_max_over_writer_max"]
    b_ok = b is not None and b >= BATCHED_OVER_RAW_TARGET
    m_ok = m is not None and m >= IMMEDIATE_OVER_WRITER_MAX_TARGET
    checks = {
        "batched_over_raw": {"value": b, "target": f">= {BATCHED_OVER_RAW_TARGET}",
                             "result": verdict(b, b_ok)},
        "immediate_max_over_writer_max": {"value": m, "target": f">= {IMMEDIATE_OVER_WRITER_MAX_TARGET:g}",
                                          "result": verdict(m, m_ok)},
        "writer_single_zero_errors": {"value": single_errors, "target": "== 0",
                                      "result": verdict(single_errors, single_errors == 0)},
    }
    return ratios, checks


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render(results: dict[str, dict[str, Any]], ratios: dict[str, float | None],
           checks: dict[str, dict[str, Any]]) -> str:
    header = ("scenario", "procs", "ops/s", "rows/s", "errors", "p50 ms", "p99 ms", "max ms", "writer RSS MB")
    rows = []
    for name, r in results.items():
        if "failed" in r:
            rows.append((name, "-", "FAILED", "-", "-", "-", "-", "-", "-"))
            continue
        lat = r["latency"]
        rows.append((name, _fmt(r["procs"]), _fmt(r["ops_per_s"]), _fmt(r["rows_per_s"]), _fmt(r["errors"]),
                     _fmt(lat["p50_ms"], 2), _fmt(lat["p99_ms"], 2), _fmt(lat["max_ms"], 1),
                     _fmt(_get(results, name, "writer", "peak_rss_mb"), 1)))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: tuple) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        return "  ".join([first, *(f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True))])

    out = [line(header), line(tuple("-" * w for w in widths)), *map(line, rows), ""]
    for key, c in checks.items():
        value = "-" if c["value"] is None else f"{c['value']:g}"
        out.append(f"{key:<32} {value:>10}   target {c['target']:<8} {c['result']}")
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
        if "producer_cpu_s" in r:
            notes.append(f"    producer CPU {r['producer_cpu_s']} s")
        if "runs" in r:
            notes.append(f"    rows/s of each run: {', '.join(_fmt(x['rows_per_s']) for x in r['runs'])} (best kept)")
        for v in r.get("variants", []):
            notes.append(f"    commit every {v['txn_batches']} batch(es): {_fmt(v['rows_per_s'])} rows/s"
                         + ("  <- used" if v["txn_batches"] == r.get("txn_batches") else ""))
    out += ["", "notes:", *notes]
    return "\n".join(out)


# --- command line ---------------------------------------------------------------------------


def build_parser(prog: str = "python -m bench contention") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Many writers on one SQLite file: direct sqlite3 (deferred and immediate transactions) "
                    "against the single writer, and bulk ingest through the writer against raw sqlite3. "
                    "Each scenario runs on a fresh temporary database.",
        epilog="scenarios:\n" + "\n".join(f"  {n:<15} {h}" for n, h in SCENARIO_HELP.items())
               + "\n\nSee the module docstring of bench/contention.py for why each exists.")
    p.add_argument("--procs", type=int_between(1, 256), default=8,
                   help="writing processes in seed, immediate and writer-single (default 8)")
    p.add_argument("--seconds", type=positive_float, default=3.0,
                   help="measured window of seed, immediate and writer-single (default 3)")
    p.add_argument("--rows", type=positive_int, default=1_000_000,
                   help="ticks inserted by writer-batched and raw (default 1,000,000)")
    p.add_argument("--batch", type=int_between(1, MAX_BATCH), default=5000,
                   help=f"ticks per insert_ticks request / executemany (default 5000, at most {MAX_BATCH:,})")
    p.add_argument("--window", type=int_between(1, 1024), default=16,
                   help="writer-batched: requests in flight per producer (default 16)")
    p.add_argument("--batch-producers", type=int_between(1, 64), default=1,
                   help="writer-batched: producer processes sharing --rows (default 1)")
    p.add_argument("--repeat", type=int_between(1, 20), default=2,
                   help="run writer-batched and raw this many times, interleaved, and keep the best of each "
                        "(default 2)")
    p.add_argument("--only", type=name_list(SCENARIOS), default=None, metavar="NAMES",
                   help="comma-separated scenarios to run (default: all)")
    p.add_argument("--json", type=writable_file, default=None, metavar="PATH",
                   help="also write the results as JSON to PATH")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m bench contention") -> int:
    parser = build_parser(prog)
    opts = parser.parse_args(argv)
    if opts.batch_producers > opts.rows:
        parser.error(f"--rows {opts.rows} is fewer than --batch-producers {opts.batch_producers}")
    chosen = [n for n in SCENARIOS if opts.only is None or n in opts.only]
    # The throughput pair runs --repeat times, interleaved, best of each kept:
    # on a shared 2-core machine one run can be slowed by someone else's load.
    order = [n for n in chosen if n not in REPEATABLE]
    order += [n for _ in range(opts.repeat) for n in chosen if n in REPEATABLE]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in chosen}
    failures: dict[str, list[str]] = {n: [] for n in chosen}
    started = time.monotonic()
    for name in order:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            runs[name].append(RUNNERS[name](opts))
        except Exception:
            failures[name].append(traceback.format_exc())
            print(f"[bench] {name} FAILED:\n{failures[name][-1]}", file=sys.stderr, flush=True)
        else:
            r = runs[name][-1]
            print(f"[bench] {name} done in {time.monotonic() - t0:.1f} s: {_fmt(r['ops_per_s'])} ops/s, "
                  f"{_fmt(r['rows_per_s'])} rows/s, {r['errors']} errors", file=sys.stderr, flush=True)
    results = {name: _best(name, runs[name], failures[name]) for name in chosen}
    ratios, checks = evaluate(results)
    print(render(results, ratios, checks))
    if opts.json is not None:
        doc = {
            "benchmark": "contention",
            "config": {"procs": opts.procs, "seconds": opts.seconds, "rows": opts.rows, "batch": opts.batch,
                       "window": opts.window, "batch_producers": opts.batch_producers, "repeat": opts.repeat,
                       "scenarios": chosen},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "sqlite": sqlite3.sqlite_version, "platform": platform.platform()},
            "total_s": round(time.monotonic() - started, 2),
            "scenarios": results,
            "ratios": ratios,
            "checks": checks,
        }
        opts.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {opts.json}")
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
