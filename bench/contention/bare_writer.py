"""``bare-single``'s writer: the floor of a single writer on this machine's ZeroMQ, msgpack and SQLite.

One thread, one ROUTER socket on the writer's own endpoint, one sqlite3 connection with the writer's
pragmas (:func:`bench.contention.procs.writer_connection`). It takes every request waiting, runs each
as its one INSERT (the statements the ops compile), commits them together, and answers each in the
reply form :class:`db.client.WriterClient` reads, so writer-single's own producers drive it
unchanged. What it leaves out is everything the real writer promises: validation, the record of
applied requests (idempotent retries), budgets and back-pressure, acknowledgements that survive the
writer's own faults, a commit thread apart from the socket's. So no writer that keeps those promises
can be faster on this machine: writer-single's targets are read against it (``bare_single_over_immediate``
is what the transport itself leaves of the 4x target).

With ``record`` (``bare-recorded``) it keeps one promise more, the one a retry needs: each request's
(client id, seq), its packed result and its digest (:func:`db.protocol.request_digest`) go into
``applied_requests`` in the batch's transaction, one ``executemany`` a batch, as the writer records
them; a (client id, seq) it applied already is answered from memory, not applied again. Still no
validation, no look-up in the database, no budgets: what it reaches is as far as a writer whose
retries are safe across a restart can go here (``bare_recorded_over_immediate``).
"""
from __future__ import annotations

import os
import time
from typing import Any

import msgpack
import zmq

from db.protocol import encode_reply

#: How long one wait for requests lasts, so the stop event is looked at this often.
POLL_MS = 100


def serve(env: dict[str, str], db_path: str, ready: Any, stop: Any, results: Any, record: bool = False) -> None:
    """Serve until ``stop`` is set (``ready`` is set once the socket is bound); put the writer's
    counters and CPU seconds on ``results``. ``record``: keep the record of applied requests (see
    the module docstring). A process's entry point (spawned by name)."""
    from bench.contention.procs import AUDIT_COLUMNS, insert_sql, writer_connection
    from db.config import load_settings
    from db.models import TICK_KEY, applied_requests_table, audit_log_table, ticks_table
    from db.ops import TICK_FIELDS
    from db.protocol import request_digest

    tick_sql = insert_sql(ticks_table, tuple(TICK_FIELDS), skip_on=TICK_KEY)
    audit_sql = insert_sql(audit_log_table, AUDIT_COLUMNS)
    applied_sql = insert_sql(applied_requests_table, ("client_id", "seq", "committed_at", "result", "digest"))
    #: The packed result of each (client id, seq) applied: a retry's answer.
    done: dict[tuple[str, int], bytes] = {}
    engine, pooled, con, pragmas = writer_connection(env, db_path)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(load_settings(env).writer_endpoint)
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    commits = requests = applied = 0
    ready.set()
    cpu0 = time.process_time()
    while not stop.is_set():
        if not poller.poll(POLL_MS):
            continue
        batch: list[tuple[bytes, dict[str, Any]]] = []
        while True:
            try:
                ident, payload = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            batch.append((ident, msgpack.unpackb(payload)))
        answers: list[tuple[bytes, int, Any]] = []
        writes = [(ident, msg) for ident, msg in batch if msg["op"] != "ping"]
        if writes:
            con.execute("BEGIN IMMEDIATE")
            now = int(time.time() * 1000)
            records = []
            for ident, msg in writes:
                args, cid, seq = msg["args"], msg["cid"], msg["seq"]
                if record and (cid, seq) in done:  # a retry: its first answer, nothing applied
                    answers.append((ident, seq, msgpack.unpackb(done[cid, seq])))
                    continue
                if msg["op"] == "insert_ticks":
                    row = args["ticks"][0]
                    result = {"inserted": con.execute(tick_sql, tuple(row[f] for f in TICK_FIELDS)).rowcount}
                else:
                    cursor = con.execute(audit_sql, (now, args["actor"], args["action"], args.get("target", ""),
                                                     args.get("result", "ok"), args.get("detail", "")))
                    result = {"id": cursor.lastrowid}
                answers.append((ident, seq, result))
                if record:
                    records.append((cid, seq, now, msgpack.packb(result), request_digest(msg["op"], args)))
            if records:
                con.executemany(applied_sql, records)
                applied += len(records)
            con.execute("COMMIT")
            done.update(((cid, seq), packed) for cid, seq, _now, packed, _digest in records)
            commits += 1
            requests += len(writes)
        answers += [(ident, msg["seq"], {"pid": os.getpid()}) for ident, msg in batch if msg["op"] == "ping"]
        for ident, seq, result in answers:
            router.send_multipart([ident, encode_reply(seq, result=result)])
    cpu = time.process_time() - cpu0
    router.close()
    ctx.term()
    pooled.close()
    engine.dispose()
    results.put({"commits": commits, "requests": requests, "recorded": applied, "cpu_s": round(cpu, 3),
                 "pragmas": pragmas, "mean_batch": round(requests / commits, 2) if commits else None})
