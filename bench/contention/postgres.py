"""``python -m bench contention --database postgresql``: the writer against what PostgreSQL does
without it, on a throwaway server (:class:`testkit.postgres.PostgresServer`, Debian's binaries,
a Unix socket; every scenario on a database of its own).

``direct``
    ``--procs`` processes writing straight into the database with psycopg 3, one row per
    transaction, a tick and an audit row alternately (PostgreSQL has no "database is locked":
    this is the fair rival of ``writer-single`` there).
``writer-single``, ``writer-pipelined``, ``writer-batched``
    As on SQLite (:mod:`bench.contention.scenarios`), the writer pointed at the server.
``copy``
    The same rows as ``writer-batched`` straight into ``ticks`` from one process: ``COPY ...
    FROM STDIN (FORMAT BINARY)`` per batch, one transaction per batch, no dedup (the raw ceiling).

Ratios in the same run: ``batched_over_copy`` (best runs) and ``batched_over_copy_median`` (the
median over the repeats of each writer-batched run over the copy run right after it), target 0.5,
and ``writer_single_over_direct`` (target 1); ``writer_pipelined_over_direct`` is reported, with no
target of its own.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any

from bench.common import Gate, error_key, fresh_home, run_group, tick_batches

PG_SCENARIO_HELP = {
    "direct": "--procs processes: one tick or one audit row per transaction, straight into PostgreSQL (psycopg 3)",
    "writer-single": "--procs producers: one acknowledged single-row op per call through the writer",
    "writer-pipelined": "the same ops, each acknowledged, with --pipeline-window of them in flight per producer",
    "client-direct": "the same producers with TICKSTACK_DIRECT_WRITES=1: each call in the producer's own "
                     "transaction, recorded for retries (db/direct.py); no writer",
    "writer-batched": "--rows ticks through the writer (insert_ticks: COPY straight into ticks under a "
                      "savepoint; a batch with a stored key by a temporary table and ON CONFLICT (source, seq) "
                      "DO NOTHING)",
    "copy": "the same rows straight into ticks with COPY FROM STDIN (FORMAT BINARY), one process (the ceiling)",
}
PG_SCENARIOS = tuple(PG_SCENARIO_HELP)
PG_REPEATABLE = ("writer-batched", "copy")
PG_TARGETS = {"batched_over_copy": 0.5, "writer_single_over_direct": 1.0, "client_direct_over_direct": 1.0}


def count_ticks(env: dict[str, str]) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(env["DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM ticks")).scalar_one())
    finally:
        engine.dispose()


def _connect(env: dict[str, str]) -> Any:
    import psycopg
    from sqlalchemy.engine import make_url

    from db.engine import psycopg_params

    return psycopg.connect(**psycopg_params(make_url(env["DATABASE_URL"])))


def direct_producer(index: int, env: dict[str, str], seconds: float, *, gate: Gate) -> dict[str, Any]:
    """One row per transaction, straight into PostgreSQL: a tick, then an audit row."""
    import psycopg

    con = _connect(env)
    source = f"bench-direct-{index}"
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    ops = rows = n = 0
    start = gate.wait()
    end = start + seconds
    last = start
    while time.monotonic() < end:
        t0 = time.perf_counter()
        ts = int(time.time() * 1000)
        inserted = 0
        try:
            with con.transaction():
                if n % 2 == 0:
                    bid = 100.0 + (n % 1000) * 0.01
                    inserted = con.execute(
                        "INSERT INTO ticks (symbol, ts, bid, ask, volume, source, seq) VALUES (%s, %s, %s, %s, %s, "
                        "%s, %s) ON CONFLICT DO NOTHING", ("BTCUSD", ts, bid, bid + 0.02, 1.0, source, n)).rowcount
                else:
                    con.execute("INSERT INTO audit_log (ts, actor, action, target, result, detail) VALUES "
                                "(%s, %s, %s, %s, %s, %s)", (ts, source, "analyse", "BTCUSD", "ok", f"n={n}"))
        except psycopg.Error as e:
            errors[error_key(e)] += 1
        else:  # committed: only now are its rows acknowledged
            latencies.append(time.perf_counter() - t0)
            ops += 1
            rows += inserted
        n += 1
        last = time.monotonic()
    con.close()
    return {"ops": ops, "rows": rows, "latencies": latencies, "errors": dict(errors), "last": last}


def copy_inserter(index: int, env: dict[str, str], plan: list[tuple[str, int, int]], batch: int, *,
                  gate: Gate) -> dict[str, Any]:
    """The batches of ``writer-batched``, each a ``COPY ... FORMAT BINARY`` and a commit."""
    from db.statements import TICK_COPY_TYPES
    from db.validation import TICK_FIELDS

    batches = [list(zip(*(cols[f] for f in TICK_FIELDS), strict=True))
               for source, first_seq, n in plan for cols in tick_batches(n, batch, source, first_seq)]
    con = _connect(env)
    sql = f"COPY ticks ({', '.join(TICK_FIELDS)}) FROM STDIN (FORMAT BINARY)"
    latencies: list[float] = []
    inserted = 0
    gate.wait()
    first = time.monotonic()
    for rows in batches:
        t0 = time.perf_counter()
        with con.transaction(), con.cursor() as cur, cur.copy(sql) as copy:
            copy.set_types(TICK_COPY_TYPES)
            for row in rows:
                copy.write_row(row)
        inserted += len(rows)
        latencies.append(time.perf_counter() - t0)
    last = time.monotonic()
    con.close()
    return {"ops": len(batches), "rows": inserted, "latencies": latencies, "errors": {}, "first": first,
            "last": last, "sql": sql}


def _run_small_writes(opts: argparse.Namespace, name: str, producer: Any, notes: str,
                      extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """``--procs`` processes of ``producer`` for ``--seconds`` on a fresh database, no writer; a stored
    tick not acknowledged, or acknowledged and not stored, is an error."""
    from bench.common import migrate_database
    from bench.contention.scenarios import check_stored, combine

    with fresh_home() as (_home, env):
        env.update(extra_env or {})
        migrate_database(env)
        start, results = run_group(producer, [(env, opts.seconds) for _ in range(opts.procs)],
                                   run_timeout=opts.seconds + 180)
        out = combine(name, opts.procs, start, results)
        out["notes"] = notes
        out["stored_ticks"] = count_ticks(env)
        check_stored(out, out["rows"])  # a tick stored and not acknowledged, or the reverse, is an error
    return out


def run_direct(opts: argparse.Namespace) -> dict[str, Any]:
    return _run_small_writes(opts, "direct", direct_producer,
                             "psycopg 3, autocommit off, one INSERT per transaction (tick or audit row, alternately)")


def run_client_direct(opts: argparse.Namespace) -> dict[str, Any]:
    """writer-single's producers and calls, with ``TICKSTACK_DIRECT_WRITES=1`` and no writer running:
    what a user who turns the setting on gets for small writes (same ops, same retry record)."""
    from bench.contention.procs import writer_single_producer

    return _run_small_writes(opts, "client-direct", writer_single_producer,
                             "WriterClient.call with TICKSTACK_DIRECT_WRITES=1: insert_ticks (1 tick) and audit, "
                             "alternately", {"TICKSTACK_DIRECT_WRITES": "1"})


def run_copy(opts: argparse.Namespace) -> dict[str, Any]:
    from bench.common import migrate_database
    from bench.contention.scenarios import check_stored, combine, plan_rows

    plan = plan_rows(opts.rows, opts.batch_producers)
    with fresh_home() as (_home, env):
        migrate_database(env)
        start, (result,) = run_group(copy_inserter, [(env, plan, opts.batch)], run_timeout=600)
        out = combine("copy", 1, start, [result], timed_from_first_op=True)
        out["sql"] = result["sql"]
        out["notes"] = f"COPY FORMAT BINARY per batch of {opts.batch}, a commit per batch, straight into ticks"
        out["stored_ticks"] = count_ticks(env)
        check_stored(out, opts.rows)
    return out


def pg_ratios(results: dict[str, dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, dict[str, Any]]]:
    """The two ratios of the PostgreSQL run, and whether each meets its target."""
    def rate(name: str, key: str) -> float | None:
        return results.get(name, {}).get(key)

    def ratio(num: float | None, den: float | None) -> float | None:
        return round(num / den, 3) if num is not None and den else None

    from bench.contention.report import info, paired_median

    ratios = {"batched_over_copy": ratio(rate("writer-batched", "rows_per_s"), rate("copy", "rows_per_s")),
              "batched_over_copy_median": paired_median(results, "writer-batched", "copy"),
              "writer_single_over_direct": ratio(rate("writer-single", "ops_per_s"), rate("direct", "ops_per_s")),
              "client_direct_over_direct": ratio(rate("client-direct", "ops_per_s"), rate("direct", "ops_per_s"))}
    checks = {name: {"value": value, "target": f">= {PG_TARGETS[name.removesuffix('_median')]:g}",
                     "result": "n/a" if value is None else
                     ("PASS" if value >= PG_TARGETS[name.removesuffix("_median")] else "MISS")}
              for name, value in ratios.items()}
    # No target of its own: the same small writes when producers do not wait for each answer.
    ratios["writer_pipelined_over_direct"] = ratio(rate("writer-pipelined", "ops_per_s"), rate("direct", "ops_per_s"))
    checks["writer_pipelined_over_direct"] = info(ratios["writer_pipelined_over_direct"])
    return ratios, checks
