"""Producer and reader processes for the writer tests (started with the
``spawn`` method, so they import this module fresh)."""
from __future__ import annotations

import time
import traceback
from typing import Any

from sqlalchemy import func, select

from db.client import WriterClient
from db.config import load_settings
from db.engine import make_read_engine
from db.models import audit_log_table, ticks_table

TICKS_PER_OP = 3


def producer(env: dict[str, str], index: int, n_ops: int, out: Any, pause: float = 0.0) -> None:
    """Alternate insert_ticks (unique source/seq) and audit (no unique key:
    a request applied twice would show as two rows). Report what was acked."""
    acked_seqs: list[int] = []
    acked_audits: list[str] = []
    errors: list[str] = []
    try:
        client = WriterClient(settings=load_settings(env), deadline=60)
        source = f"p{index}"
        for k in range(n_ops):
            try:
                if k % 2 == 0:
                    seqs = [k * TICKS_PER_OP + j for j in range(TICKS_PER_OP)]
                    ticks = [{"symbol": "BTCUSD", "ts": 1_700_000_000_000 + s, "bid": 100.0 + j, "ask": 100.5 + j,
                              "volume": 1.0, "source": source, "seq": s} for j, s in enumerate(seqs)]
                    result = client.call("insert_ticks", ticks=ticks)
                    if result != {"inserted": TICKS_PER_OP, "duplicates": 0}:
                        errors.append(f"unexpected result {result}")
                    acked_seqs.extend(seqs)
                else:
                    target = f"{index}:{k}"
                    client.call("audit", actor=source, action="test", target=target)
                    acked_audits.append(target)
            except Exception as e:  # every error counts: the test wants none
                errors.append(f"{type(e).__name__}: {e}")
            if pause:
                time.sleep(pause)
        client.close()
    except Exception:
        errors.append(traceback.format_exc())
    out.put({"index": index, "seqs": acked_seqs, "audits": acked_audits, "errors": errors})


def reader(env: dict[str, str], stop: Any, out: Any) -> None:
    """Read counts through a read-only engine while writes commit; counts
    must never go down, and reads must never fail."""
    reads = 0
    errors: list[str] = []
    seen: set[int] = set()
    last = -1
    try:
        engine = make_read_engine(load_settings(env), pool_size=1)
        while not stop.is_set():
            try:
                with engine.connect() as conn:
                    n = conn.execute(select(func.count()).select_from(ticks_table)).scalar_one()
                    conn.execute(select(func.count()).select_from(audit_log_table)).scalar_one()
                    conn.execute(select(ticks_table).order_by(ticks_table.c.id.desc()).limit(50)).all()
                reads += 1
                if n < last:
                    errors.append(f"count went back from {last} to {n}")
                last = n
                seen.add(n)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
            time.sleep(0.002)
        engine.dispose()
    except Exception:
        errors.append(traceback.format_exc())
    out.put({"reads": reads, "distinct_counts": len(seen), "errors": errors})


def pipelined_producer(env: dict[str, str], batches: int, batch: int, out: Any, started: Any) -> None:
    """Pipelined column batches; reports how many rows were acknowledged."""
    acked = 0
    errors: list[str] = []
    try:
        client = WriterClient(settings=load_settings(env), deadline=60)
        with client.pipeline(window=8) as pipe:
            for i in range(batches):
                base = i * batch
                pipe.submit("insert_ticks", ticks={
                    "symbol": ["EURUSD"] * batch, "ts": list(range(base, base + batch)),
                    "bid": [1.08] * batch, "ask": [1.0801] * batch, "source": ["pipe"] * batch,
                    "seq": list(range(base, base + batch))})
                if i == 8:
                    started.set()
        for ticket in pipe.failed:
            errors.append(f"{type(ticket.error).__name__}: {ticket.error}")
        acked = (pipe.completed - len(pipe.failed)) * batch
    except Exception:
        errors.append(traceback.format_exc())
    out.put({"acked_rows": acked, "errors": errors})
