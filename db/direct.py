"""Small writes straight into PostgreSQL, beside the writer (``TICKSTACK_DIRECT_WRITES``, off by default).

Why: on PostgreSQL, 8 processes each committing one small write at a time beat the writer by about
4x (`python -m bench contention --database postgresql`: the server commits their transactions in
parallel and shares their WAL flushes, while the writer serialises them and spends ~0.4 ms of its
own CPU per request). PostgreSQL has no "database is locked": the one-writer rule is SQLite's
need, not the server's. So with this setting a :class:`db.client.WriterClient`'s ``call`` (one
acknowledged op at a time: the small-write path) runs the op in a transaction of the caller's
own; pipelines (``submit``: high-rate producers, bulk ingest) still go to the writer, which
group-commits them (COPY), as does every non-transactional op.

The same promises as through the writer, from the same code:

* the same ops, validators and errors (:func:`db.ops.prepare`, :func:`db.ops.execute`), on the
  arguments exactly as the writer would decode them (packed and unpacked as on the wire);
* acknowledged means committed: ``call`` returns after COMMIT;
* retries apply once: the (client id, seq) is recorded as applied in the op's own transaction
  (:func:`db.ops.record_applied`), and a retry of the same seq gets the recorded result back;
* a lost connection, a server that refuses or drops new sessions (restarting, starting up), a
  deadlock, a serialisation failure or a lock wait over
  ``TICKSTACK_LOCK_TIMEOUT_MS`` is retried (same seq) until the call's deadline; a full disk is
  :class:`~db.errors.StorageFull` with the server's reason.

What it gives up: the writer's one queue (each caller holds a connection of its own while it
writes: size ``max_connections`` for it), and its counters (``stats`` counts only what went
through it). Readers are unaffected: they already read safely beside several writers
(:class:`db.tick_horizon.TickHorizon`). Refused on SQLite, where only the writer may write.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgpack
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from db import ops
from db.config import Settings
from db.engine import (
    make_write_engine,
    schema_behind_reason,
    server_unreachable,
    storage_full_reason,
    transient_reason,
)
from db.errors import OpFailed, StorageFull, WriterError, WriterUnavailable, database_words
from db.protocol import decode_request, encode_request, pack_columns, request_digest


class DirectWrites:
    """One caller's transactions (see the module docstring); made by ``WriterClient`` when the
    setting is on, and owned by it (not thread-safe, as the client is not)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings  # load_settings refused the setting on SQLite
        self._engine: Engine | None = None
        #: Kept open between calls (a pool checkout pings the server: a round trip per call).
        self._conn: Connection | None = None

    @staticmethod
    def takes(op: Any) -> bool:
        """Whether ``op`` runs here: a transactional op of the registry (the others go to the writer)."""
        spec = ops.OPS.get(op) if isinstance(op, str) else None
        return spec is not None and spec.transactional

    def call(self, client_id: str, seq: int, op: str, args: dict[str, Any], deadline: Callable[[], float]) -> Any:
        """Run ``op`` once as (client id, seq); return its result once committed, or raise its error.
        Retries what is nobody's fault (a lost connection, a deadlock) until ``deadline()``
        (monotonic), read before each retry: a stop may bring it forward (``WriterClient.give_up_by``)."""
        # The arguments as the writer would see them: encoded and decoded as on the wire.
        message, _ = decode_request(encode_request(client_id, seq, op, pack_columns(op, args)))
        digest = request_digest(op, message["args"])  # before prepare, as the writer takes it
        spec, prepared = ops.prepare(op, message["args"])  # ValidationError, as from the writer
        backoff, retry = 0.01, False
        while True:
            try:
                return self._once(client_id, seq, spec, prepared, digest, retry)
            except WriterError:
                raise
            except DBAPIError as e:
                reason = storage_full_reason(e)
                if reason is not None:
                    error: WriterError = StorageFull(f"the database's disk is full ({reason}): nothing of the "
                                                     "request was written; it succeeds once space is freed")
                elif e.connection_invalidated or transient_reason(e) is not None or server_unreachable(e):
                    # Also a new session the server refused or dropped (restarting, starting up): a
                    # call failed at once with 500 while the server was away for a few seconds.
                    error = WriterUnavailable(f"{op}: {type(e.orig).__name__}: {database_words(e)}")
                elif (behind := schema_behind_reason(e)) is not None:
                    # This code is newer than the database's schema: the writer upgrades it as it starts
                    # (a web app restarted on new code before the writer), so wait for that, as for a writer.
                    error = WriterUnavailable(f"{op}: the database's schema is older than this code's, until the "
                                              f"writer upgrades it at its start ({behind})")
                else:
                    raise OpFailed(f"{op} failed: {database_words(e)}") from None
                self.close()  # a new connection for the retry
                retry = True
            if time.monotonic() + backoff > deadline():
                raise error
            time.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _once(self, client_id: str, seq: int, spec: ops.Op, prepared: dict[str, Any], digest: bytes,
              retry: bool) -> Any:
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            if self._engine is None:
                self._engine = make_write_engine(self.settings)
            self._conn = self._engine.connect()
        with self._conn.begin():
            # A first attempt's seq is new (a client's seqs only grow); a retry may have committed
            # before its answer was lost: then its first result, not a second run.
            # Its own retry: the same request, so no digest to compare.
            prior = ops.lookup_applied(self._conn, client_id, seq) if retry else None
            if prior is not None:
                return msgpack.unpackb(prior[1], raw=False)
            result = ops.execute(self._conn, spec, prepared)
            # The digest the writer would record (same op, same decoded arguments): a resend of this
            # id through the writer is then compared as any other.
            ops.record_applied(self._conn, client_id, seq, msgpack.packb(result), digest)
        return result

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except DBAPIError:  # it is being replaced
                pass
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
