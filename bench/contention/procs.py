"""The worker processes of ``python -m bench contention`` (top level: the
spawn start method pickles them by name). Each waits at the common gate,
works for its share, and returns what it measured."""
from __future__ import annotations

import sqlite3
import time
from collections import Counter
from typing import Any

from bench.common import (
    Gate,
    error_key,
    tick_batches,
)

SEED_BUSY_TIMEOUT_S = 60.0
SYNCHRONOUS_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


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
            errors[error_key(e)] += 1
            if con.in_transaction:
                try:
                    con.execute("ROLLBACK")
                except sqlite3.Error as e2:
                    errors[error_key(e2) + " (on rollback)"] += 1
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
                errors[error_key(e)] += 1
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
            errors[error_key(ticket.error)] += 1
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
