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


def small_op(n: int, source: str) -> tuple[str, dict[str, Any]]:
    """The ``n``-th op of a small-writes producer: a one-tick ``insert_ticks`` (even ``n``; ``source``
    and ``n`` make its (source, seq) key unique) or an ``audit`` row (odd ``n``)."""
    if n % 2 == 0:
        bid = 100.0 + (n % 1000) * 0.01
        return "insert_ticks", {"ticks": [{"symbol": "BTCUSD", "ts": int(time.time() * 1000), "bid": bid,
                                           "ask": bid + 0.02, "volume": 1.0, "source": source, "seq": n}]}
    return "audit", {"actor": source, "action": "analyse", "target": "BTCUSD", "detail": f"n={n}"}


def writer_single_producer(index: int, env: dict[str, str], seconds: float, *, gate: Gate) -> dict[str, Any]:
    """One acknowledged op per call: a one-tick ``insert_ticks``, then an ``audit``."""
    from db.client import WriterClient
    from db.config import load_settings

    source = f"bench-single-{index}"
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    ops = rows = n = 0
    settings = load_settings(env)
    with WriterClient(settings=settings) as client:
        if settings.direct_writes:  # its own connection (db/direct.py), made before the clock starts
            client.call("audit", actor=source, action="connect")
        else:
            client.ping(timeout=30.0)  # connected before the clock starts
        start = gate.wait()
        end = start + seconds
        last = start
        cpu0 = time.process_time()
        while time.monotonic() < end:
            t0 = time.perf_counter()
            op, args = small_op(n, source)
            try:
                result = client.call(op, **args)
                if op == "insert_ticks":
                    rows += result["inserted"]
            except Exception as e:  # every failure counts, whatever its type
                errors[error_key(e)] += 1
            else:
                latencies.append(time.perf_counter() - t0)
                ops += 1
            n += 1
            last = time.monotonic()
        cpu = time.process_time() - cpu0
    return {"ops": ops, "rows": rows, "latencies": latencies, "errors": dict(errors), "last": last, "cpu_s": cpu}


def writer_pipelined_producer(index: int, env: dict[str, str], seconds: float, window: int, *,
                              gate: Gate) -> dict[str, Any]:
    """The ops of :func:`writer_single_producer`, each still acknowledged after its commit, with up to
    ``window`` in flight (``WriterClient.pipeline``): the producer does not wait for one answer before
    it sends the next. Latency is per op, from its first send to its committed answer."""
    from db.client import Ticket, WriterClient
    from db.config import load_settings
    from db.errors import WriterError

    source = f"bench-pipelined-{index}"
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    ops = rows = n = 0

    def on_done(ticket: Ticket) -> None:
        nonlocal ops, rows
        if ticket.error is not None:
            errors[error_key(ticket.error)] += 1
            return
        ops += 1
        if ticket.op == "insert_ticks":
            rows += ticket.result()["inserted"]
        if ticket.latency is not None:
            latencies.append(ticket.latency)

    with WriterClient(settings=load_settings(env)) as client:
        client.ping(timeout=30.0)  # connected before the clock starts
        start = gate.wait()
        end = start + seconds
        cpu0 = time.process_time()
        with client.pipeline(window=window, on_done=on_done) as pipe:
            while time.monotonic() < end:
                op, args = small_op(n, source)
                try:
                    pipe.submit(op, **args)
                except WriterError as e:  # refused before it was sent (too large, not encodable): a failure
                    errors[error_key(e)] += 1
                n += 1
        last = time.monotonic()  # the last answer is in: the window ends with it
        cpu = time.process_time() - cpu0
    return {"ops": ops, "rows": rows, "latencies": latencies, "errors": dict(errors), "last": last, "cpu_s": cpu}


def writer_batched_producer(index: int, env: dict[str, str], rows: int, first_seq: int, batch: int, window: int,
                            symbols: int | None = None, spacing_ms: int = 1, *, gate: Gate) -> dict[str, Any]:
    """Pipelined column batches, generated before the clock starts (``symbols`` and ``spacing_ms``:
    the shape of :func:`bench.common.tick_batches`; ``bench analysis`` asks for denser series)."""
    from db.client import Ticket, WriterClient
    from db.config import load_settings

    batches = tick_batches(rows, batch, f"bench-batch-{index}", first_seq, symbols, spacing_ms)
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


#: The columns of the audit op's insert (every column but the id, as ``db.ops.audit`` passes them).
AUDIT_COLUMNS = ("ts", "actor", "action", "target", "result", "detail")


def insert_sql(table: Any, columns: tuple[str, ...], skip_on: tuple[str, ...] | None = None) -> str:
    """An INSERT exactly as ``db.ops`` compiles it for SQLite (``skip_on``: ON CONFLICT (key) DO NOTHING)."""
    from sqlalchemy.dialects import sqlite as sqlite_dialect

    from db.statements import compile_insert

    sql, order = compile_insert(sqlite_dialect.dialect(), table, columns, skip_on=skip_on)
    assert order == columns, order
    return sql


def writer_connection(env: dict[str, str], db_path: str) -> tuple[Any, Any, sqlite3.Connection, dict[str, Any]]:
    """A sqlite3 connection from the writer's own ``make_write_engine`` (exactly its connect-time
    pragmas: WAL, synchronous, autocheckpoint, ...): the engine, the pooled connection (close both),
    the driver connection, and the pragmas it has."""
    from db.config import load_settings
    from db.engine import make_write_engine

    settings = load_settings({**env, "DATABASE_URL": f"sqlite:///{db_path}"})
    engine = make_write_engine(settings)
    pooled = engine.raw_connection()
    con: sqlite3.Connection = pooled.driver_connection  # type: ignore[assignment]
    pragmas = {name: con.execute(f"PRAGMA {name}").fetchone()[0]
               for name in ("journal_mode", "synchronous", "wal_autocheckpoint", "cache_size")}
    pragmas["synchronous"] = SYNCHRONOUS_NAMES.get(pragmas["synchronous"], pragmas["synchronous"])
    return engine, pooled, con, pragmas


def raw_single_inserter(index: int, env: dict[str, str], db_path: str, seconds: float, *,
                        gate: Gate) -> dict[str, Any]:
    """What writer-single does, with no writer and no other process: one connection with the
    writer's pragmas, one row per transaction (``BEGIN IMMEDIATE``, insert, ``COMMIT``),
    alternating a tick and an audit row, with the statements the ops compile. The per-commit
    ceiling of SQLite on this disk."""
    from db.models import TICK_KEY, audit_log_table, ticks_table
    from db.ops import TICK_FIELDS

    tick_sql = insert_sql(ticks_table, tuple(TICK_FIELDS), skip_on=TICK_KEY)
    audit_sql = insert_sql(audit_log_table, AUDIT_COLUMNS)
    engine, pooled, con, pragmas = writer_connection(env, db_path)
    source = f"bench-raw-single-{index}"
    latencies: list[float] = []
    ops = rows = 0
    start = gate.wait()
    end = start + seconds
    last = start
    while time.monotonic() < end:
        t0 = time.perf_counter()
        ts = int(time.time() * 1000)
        con.execute("BEGIN IMMEDIATE")
        if ops % 2 == 0:
            bid = 100.0 + (ops % 1000) * 0.01
            rows += con.execute(tick_sql, ("BTCUSD", ts, bid, bid + 0.02, 1.0, source, ops)).rowcount
        else:
            con.execute(audit_sql, (ts, source, "analyse", "BTCUSD", "ok", f"n={ops}"))
        con.execute("COMMIT")
        latencies.append(time.perf_counter() - t0)
        ops += 1
        last = time.monotonic()
    pooled.close()
    engine.dispose()
    return {"ops": ops, "rows": rows, "latencies": latencies, "errors": {}, "last": last, "pragmas": pragmas}


def raw_inserter(index: int, env: dict[str, str], db_paths: list[str], plan: list[tuple[str, int, int]],
                 batch: int, txn_variants: list[int], statement: str = "writer", *, gate: Gate) -> list[dict[str, Any]]:
    """The same rows and batches, straight into sqlite3, once per commit interval in
    ``txn_variants``, each into its own fresh database, on a connection with exactly the writer's
    pragmas (:func:`writer_connection`). ``statement``: ``writer``, the statements the writer runs
    for ``insert_ticks`` (its INSERT, :data:`db.statements.BULK_ROWS` rows each, through the writer's
    own :func:`db.statements.executemany_columns`), or ``row``, that INSERT a row at a time
    (``executemany`` of the one-row statement, as a program writing straight to SQLite would)."""
    from db.models import TICK_KEY, ticks_table
    from db.ops import TICK_FIELDS
    from db.statements import executemany_columns

    # The statement exactly as db.ops compiles it for insert_ticks.
    sql = insert_sql(ticks_table, tuple(TICK_FIELDS), skip_on=TICK_KEY)
    by_row = statement == "row"
    batches: list[Any] = [list(zip(*(cols[f] for f in TICK_FIELDS), strict=True)) if by_row
                          else [cols[f] for f in TICK_FIELDS]
                          for source, first_seq, n in plan for cols in tick_batches(n, batch, source, first_seq)]
    gate.wait()
    out = []
    for db_path, txn_batches in zip(db_paths, txn_variants, strict=True):
        engine, pooled, con, pragmas = writer_connection(env, db_path)
        cursor = con.cursor()
        latencies: list[float] = []
        inserted = 0
        first = time.monotonic()
        for i in range(0, len(batches), txn_batches):
            t0 = time.perf_counter()
            con.execute("BEGIN IMMEDIATE")
            for rows in batches[i:i + txn_batches]:
                inserted += con.executemany(sql, rows).rowcount if by_row else executemany_columns(cursor, sql, rows)
            con.execute("COMMIT")
            latencies.append(time.perf_counter() - t0)
        last = time.monotonic()
        cursor.close()
        pooled.close()
        engine.dispose()
        out.append({"ops": len(batches), "rows": inserted, "latencies": latencies, "errors": {}, "first": first,
                    "last": last, "sql": sql, "pragmas": pragmas, "txn_batches": txn_batches})
    return out
