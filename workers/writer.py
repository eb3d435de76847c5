"""The single designated writer: ``python -m workers.writer``.

Exactly one process writes the database. Every other process sends it named
ops (:mod:`db.ops`) over a ZeroMQ ROUTER socket as msgpack messages, and it
answers each one only after the op's effects are committed.

Two threads, one job each:

* the **IO thread** (main) owns the socket: it decodes requests, answers
  ``ping`` and ``stats`` itself, queues ops in a bounded queue (a full queue
  gets a *busy* reply, so memory stays bounded under any load) and sends the
  replies the commit thread hands back;
* the **commit thread** owns the one write connection: it takes every pending
  request (up to a bound), runs them in one ``BEGIN IMMEDIATE`` transaction,
  each in a savepoint so one bad request fails alone, records them as applied
  in that same transaction, commits, and only then replies.

Lifecycle, as in gunicorn's workers: ``__init__`` opens nothing;
:meth:`Writer.run` takes the writer lock, opens the database, binds, serves
until SIGTERM, then drains (see :meth:`Writer._serve`) and exits 0.
"""
from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from db import ops
from db.config import ConfigError, Settings, ensure_home, load_settings
from db.engine import checkpoint, make_write_engine
from db.errors import CommitFailed, OpFailed, ValidationError, WriterError
from db.lock import WriterLock, WriterLocked
from db.protocol import PROTOCOL, encode_reply, envelope_problem
from db.schema import migrate
from db.stats import percentile
from workers.base import command_line, configure_logging, on_stop_signals

log = logging.getLogger("tickstack.writer")

EXIT_LOCKED = 3
_STOP = object()


@dataclass
class Request:
    ident: bytes
    cid: str
    seq: int
    op: str
    args: Any


class Stats:
    """Counters the IO thread reports and the commit thread updates. Plain
    attribute updates under the GIL; a report is a consistent-enough copy."""

    def __init__(self) -> None:
        self.started = time.time()
        self.batches = 0
        self.batched_requests = 0
        self.max_batch = 0
        self.requests_ok = 0
        self.requests_failed = 0
        self.busy_replies = 0
        self.malformed = 0
        self.dedup_hits = 0
        self.lock_errors = 0
        self.commit_failures = 0
        self.ticks_inserted = 0
        self.commit_ms: deque[float] = deque(maxlen=4096)
        self.last_checkpoint: dict[str, Any] | None = None

    def report(self, queue_depth: int) -> dict[str, Any]:
        lat = sorted(self.commit_ms)

        def pct(p: float) -> float | None:
            value = percentile(lat, p)
            return None if value is None else round(value, 3)

        return {
            "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3), "queue_depth": queue_depth,
            "batches": self.batches, "max_batch": self.max_batch,
            "mean_batch": round(self.batched_requests / self.batches, 2) if self.batches else 0.0,
            "commit_p50_ms": pct(0.50), "commit_p99_ms": pct(0.99), "commit_max_ms": pct(1.0),
            "requests_ok": self.requests_ok, "requests_failed": self.requests_failed,
            "busy_replies": self.busy_replies, "malformed": self.malformed, "dedup_hits": self.dedup_hits,
            "lock_errors": self.lock_errors, "commit_failures": self.commit_failures,
            "ticks_inserted": self.ticks_inserted, "last_checkpoint": self.last_checkpoint,
        }


class Writer:
    def __init__(self, settings: Settings) -> None:
        """Keep the settings; open nothing (that is :meth:`run`'s job)."""
        self.settings = settings
        self.alive = True
        self.stop_requested_at: float | None = None
        self.stats = Stats()
        self.queue: queue.Queue[Request | object] = queue.Queue(maxsize=settings.writer_max_queue)
        self.lock = WriterLock(settings.writer_lock_path)
        # Results of recently committed requests, for retries without a query.
        self.recent: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.recent_max = 100_000
        # Per client, the highest seq that may be on record: requests above it
        # are new and need no lookup (the common case, saving a query each).
        self.known_top: OrderedDict[str, int] = OrderedDict()
        self.commit_busy = False
        self.batch_no = 0
        self._last_prune = 0.0

    # --- lifecycle ---------------------------------------------------------------------

    def init_signals(self) -> None:
        """SIGTERM and SIGINT only ask to stop: the loop drains and finishes."""
        on_stop_signals(self.handle_stop)

    def handle_stop(self, signum: int, _frame: Any) -> None:
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
            log.info("writer: %s received; draining", signal.Signals(signum).name)

    def run(self) -> int:
        """Take the lock, open and upgrade the database, serve, drain, exit."""
        os.umask(0o077)  # database, WAL, lock and socket files: this user only
        ensure_home(self.settings)
        try:
            self.lock.acquire()
        except WriterLocked as e:
            log.error("writer: %s", e)
            return EXIT_LOCKED
        try:
            self.init_signals()
            self.engine = make_write_engine(self.settings)
            self.conn = self.engine.connect()
            with self.conn.begin():
                before, after = migrate(self.conn)
            if before != after:
                log.info("writer: schema upgraded from version %d to %d", before, after)
            # Ingest decodes thousands of short-lived containers per request;
            # at the default threshold (700) the collector walks them over and
            # over. Long-lived startup objects are frozen out of its way.
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 20, 20)
            self._serve()
            self._final_checkpoint()
            return 0
        finally:
            conn = getattr(self, "conn", None)
            if conn is not None:
                conn.close()
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.dispose()
            self.lock.release()

    def _serve(self) -> None:
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        # Hard cap: beyond it ZeroMQ drops the peer without reading the
        # message into memory. Between max_message and the cap we reply.
        router.setsockopt(zmq.MAXMSGSIZE, self.settings.writer_max_message * 4)
        router.setsockopt(zmq.SNDHWM, 100_000)
        router.setsockopt(zmq.LINGER, 2000)
        replies_in = ctx.socket(zmq.PULL)
        replies_in.bind("inproc://replies")
        endpoint = self.settings.writer_endpoint
        router.bind(endpoint)
        committer = threading.Thread(target=self._commit_loop, args=(ctx,), name="commit", daemon=True)
        committer.start()
        log.info("writer ready: pid %d, endpoint %s, database %s", os.getpid(), endpoint,
                 self.settings.database_url)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies_in, zmq.POLLIN)
        last_request = time.monotonic()
        try:
            while True:
                events = dict(poller.poll(50))
                if replies_in in events:
                    self._forward_replies(replies_in, router)
                if router in events:
                    for _ in range(1000):
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        last_request = time.monotonic()
                        self._accept(router, frames)
                if self.stop_requested_at is not None and self._drained(last_request):
                    break
            # Stop reading new requests; let the commit thread finish the
            # queue and forward its last replies.
            self.queue.put(_STOP)
            while committer.is_alive() or replies_in.poll(0):
                if replies_in.poll(50):
                    self._forward_replies(replies_in, router)
            self._forward_replies(replies_in, router)
        finally:
            router.close()
            replies_in.close()
            ctx.term()

    def _drained(self, last_request: float) -> bool:
        """On stop, keep serving while clients flush: until no request came
        for ``writer_drain_idle`` seconds and nothing is pending, or until the
        drain deadline (circus stops every watcher at the same moment)."""
        now = time.monotonic()
        assert self.stop_requested_at is not None
        if now - self.stop_requested_at >= self.settings.writer_drain_deadline:
            log.warning("writer: drain deadline reached with %d requests queued", self.queue.qsize())
            return True
        quiet_since = max(last_request, self.stop_requested_at)
        return now - quiet_since >= self.settings.writer_drain_idle and self.queue.empty() and not self.commit_busy

    def _final_checkpoint(self) -> None:
        """TRUNCATE the WAL on the way out. A reader mid-transaction makes it
        partial (busy): retry briefly, since circus is stopping them too."""
        deadline = time.monotonic() + 3.0
        while True:
            try:
                result = checkpoint(self.conn, "TRUNCATE")
            except SQLAlchemyError as e:
                log.error("writer: final checkpoint failed: %s", e)
                return
            if not result["busy"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        log.info("writer: final checkpoint %s; exiting", "done" if not result["busy"] else f"partial {result}")

    # --- IO thread ---------------------------------------------------------------------

    def _forward_replies(self, replies_in: zmq.Socket, router: zmq.Socket) -> None:
        while True:
            try:
                frames = replies_in.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                router.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError as e:  # peer gone or its queue full: it retries
                log.debug("writer: reply dropped: %s", e)

    def _accept(self, router: zmq.Socket, frames: list[bytes]) -> None:
        """Decode one request; answer ping/stats/errors now, queue ops."""
        ident = frames[0]
        if len(frames) != 2:
            self.stats.malformed += 1
            self._send(router, ident, encode_reply(None, error=ValidationError(
                f"expected one message frame, got {len(frames) - 1}")))
            return
        payload = frames[1]
        if len(payload) > self.settings.writer_max_message:
            self.stats.malformed += 1
            self._send(router, ident, encode_reply(None, error=ValidationError(
                f"message of {len(payload)} bytes is over the limit of {self.settings.writer_max_message}")))
            return
        try:
            msg = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as e:  # any garbage: msgpack raises several types
            self.stats.malformed += 1
            log.warning("writer: undecodable request (%d bytes): %s", len(payload), e)
            self._send(router, ident, encode_reply(None, error=ValidationError(f"request is not valid msgpack: {e}")))
            return
        seq = msg.get("seq") if type(msg) is dict else None
        problem = envelope_problem(msg)
        if problem:
            self.stats.malformed += 1
            self._send(router, ident, encode_reply(seq, error=ValidationError(problem)))
            return
        name = msg["op"]
        if name == "ping":
            self._send(router, ident, encode_reply(seq, result={"pid": os.getpid(), "protocol": PROTOCOL}))
        elif name == "stats":
            self._send(router, ident, encode_reply(seq, result=self.stats.report(self.queue.qsize())))
        else:
            try:
                self.queue.put_nowait(Request(ident, msg["cid"], seq, name, msg.get("args")))
            except queue.Full:
                self.stats.busy_replies += 1
                self._send(router, ident, encode_reply(seq, busy=True))

    @staticmethod
    def _send(router: zmq.Socket, ident: bytes, payload: bytes) -> None:
        try:
            router.send_multipart([ident, payload], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.debug("writer: reply dropped: %s", e)

    # --- commit thread ----------------------------------------------------------------

    def _commit_loop(self, ctx: zmq.Context) -> None:
        out = ctx.socket(zmq.PUSH)
        out.setsockopt(zmq.SNDHWM, 0)
        out.connect("inproc://replies")
        wait = self.settings.writer_batch_wait
        try:
            while True:
                first = self.queue.get()
                if first is _STOP:
                    return
                self.commit_busy = True
                batch = [first]
                deadline = time.monotonic() + wait
                stop_after = False
                while len(batch) < self.settings.writer_max_batch:
                    try:
                        remaining = deadline - time.monotonic()
                        item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop_after = True
                        break
                    batch.append(item)
                for ident, payload in self._commit(batch):  # type: ignore[arg-type]
                    out.send_multipart([ident, payload])
                self.commit_busy = False
                if stop_after:
                    return
        except Exception:
            log.exception("writer: commit thread failed; stopping")
            self.stop_requested_at = time.monotonic() - self.settings.writer_drain_deadline
            raise
        finally:
            self.commit_busy = False
            out.close(linger=1000)

    def _commit(self, batch: list[Request]) -> list[tuple[bytes, bytes]]:
        """Run a batch in one IMMEDIATE transaction; return the replies to
        send, which must go out only now that the batch is committed."""
        self.batch_no += 1
        batch_no = self.batch_no
        replies: list[tuple[bytes, bytes] | Request] = []
        outside: list[tuple[Request, ops.Op, dict]] = []
        applied: list[tuple[str, int, bytes]] = []
        committed: dict[tuple[str, int], bytes] = {}
        ok_count = failed = ticks = 0
        started = time.perf_counter()
        conn = self.conn
        try:
            with conn.begin():
                for req in batch:
                    key = (req.cid, req.seq)
                    prior = self.recent.get(key) or committed.get(key)
                    if prior is None and req.seq <= self._known_top(conn, req.cid):
                        prior = ops.lookup_applied(conn, req.cid, req.seq)
                    if prior is not None:
                        self.stats.dedup_hits += 1
                        replies.append((req.ident, encode_reply(req.seq, result=msgpack.unpackb(prior),
                                                                batch=batch_no)))
                        continue
                    try:
                        spec, args = ops.prepare(req.op, req.args)
                    except ValidationError as e:
                        failed += 1
                        replies.append((req.ident, encode_reply(req.seq, error=e, batch=batch_no)))
                        continue
                    except Exception as e:  # a validator's bug fails its request, never the writer
                        log.exception("writer: validating %s failed", req.op)
                        failed += 1
                        replies.append((req.ident, encode_reply(req.seq, batch=batch_no, error=ValidationError(
                            f"{req.op}: invalid arguments ({type(e).__name__}: {e})"))))
                        continue
                    if not spec.transactional:
                        outside.append((req, spec, args))
                        replies.append(req)  # its place: replies go out in request order
                        continue
                    result, error = self._run_in_savepoint(conn, spec, args)
                    if error is not None:
                        failed += 1
                        replies.append((req.ident, encode_reply(req.seq, error=error, batch=batch_no)))
                        continue
                    packed = msgpack.packb(result)
                    applied.append((req.cid, req.seq, packed))
                    committed[key] = packed
                    ok_count += 1
                    if spec.name == "insert_ticks":
                        ticks += result["inserted"]
                    replies.append((req.ident, encode_reply(req.seq, result=result, batch=batch_no)))
                ops.record_applied(conn, applied)
                self._maybe_prune(conn)
        except SQLAlchemyError as e:
            # Nothing of the batch is committed: every request in it gets a
            # retryable error, and its client sends it again.
            self._count_lock_error(e)
            self.stats.commit_failures += 1
            log.error("writer: commit of batch %d (%d requests) failed: %s", batch_no, len(batch), e)
            error = CommitFailed(f"commit failed, nothing applied; retry: {e.__class__.__name__}: {e.orig}"
                                 if hasattr(e, "orig") else f"commit failed, nothing applied; retry: {e}")
            return [(req.ident, encode_reply(req.seq, error=error, batch=batch_no)) for req in batch]
        elapsed_ms = (time.perf_counter() - started) * 1000
        for key, packed in committed.items():
            self.recent[key] = packed
            cid, seq = key
            self.known_top[cid] = max(self.known_top.get(cid, 0), seq)
        while len(self.recent) > self.recent_max:
            self.recent.popitem(last=False)
        st = self.stats
        st.batches += 1
        st.batched_requests += len(batch)
        st.max_batch = max(st.max_batch, len(batch))
        st.commit_ms.append(elapsed_ms)
        st.requests_ok += ok_count
        st.requests_failed += failed
        st.ticks_inserted += ticks
        # Ops outside the transaction run now, in request order; each takes
        # the place its request holds in ``replies``.
        later = []
        for req, spec, args in outside:
            result, error = self._run_outside(spec, args)
            later.append((req.ident, encode_reply(req.seq, result=result, error=error, batch=batch_no)))
        in_order = iter(later)
        return [next(in_order) if isinstance(r, Request) else r for r in replies]

    def _known_top(self, conn: Connection, cid: str) -> int:
        top = self.known_top.get(cid)
        if top is None:
            top = self.known_top[cid] = ops.last_applied_seq(conn, cid)
            while len(self.known_top) > self.recent_max:
                self.known_top.popitem(last=False)  # forgotten clients are looked up again
        else:
            self.known_top.move_to_end(cid)
        return top

    def _run_in_savepoint(self, conn: Connection, spec: ops.Op, args: dict) -> tuple[Any, WriterError | None]:
        savepoint = conn.begin_nested()
        try:
            result = ops.execute(conn, spec, args)
        except WriterError as e:
            savepoint.rollback()
            return None, e
        except SQLAlchemyError as e:
            savepoint.rollback()
            self._count_lock_error(e)
            log.warning("writer: op %s failed: %s", spec.name, e)
            return None, OpFailed(f"{spec.name} failed: {getattr(e, 'orig', e)}")
        except Exception as e:  # an op's bug fails its request, never the writer
            savepoint.rollback()
            log.exception("writer: op %s raised", spec.name)
            return None, OpFailed(f"{spec.name} failed: {type(e).__name__}: {e}")
        savepoint.commit()
        return result, None

    def _run_outside(self, spec: ops.Op, args: dict) -> tuple[Any, WriterError | None]:
        try:
            result = ops.execute(self.conn, spec, args)
        except WriterError as e:
            return None, e
        except SQLAlchemyError as e:
            self._count_lock_error(e)
            return None, OpFailed(f"{spec.name} failed: {getattr(e, 'orig', e)}")
        finally:
            # A PRAGMA may open an implicit transaction in SQLAlchemy's view.
            if self.conn.in_transaction():
                self.conn.rollback()
        if spec.name == "checkpoint":
            self.stats.last_checkpoint = {"at_ms": ops.now_ms(), "mode": args.get("mode", "TRUNCATE"), **result}
        self.stats.requests_ok += 1
        return result, None

    def _count_lock_error(self, e: SQLAlchemyError) -> None:
        if isinstance(e, OperationalError) and "locked" in str(e.orig):
            self.stats.lock_errors += 1

    def _maybe_prune(self, conn: Connection) -> None:
        """Forget applied requests older than the dedup window, once a minute,
        inside a batch transaction (so it costs no extra commit)."""
        now = time.monotonic()
        if now - self._last_prune < 60:
            return
        self._last_prune = now
        pruned = ops.prune_applied(conn, ops.now_ms() - int(self.settings.dedup_ttl * 1000))
        if pruned:
            log.info("writer: forgot %d applied requests older than %.0f s", pruned, self.settings.dedup_ttl)


def main(argv: list[str] | None = None) -> int:
    args = command_line(__name__, __doc__).parse_args(argv)
    configure_logging(args.log_level)
    try:
        settings = load_settings()
    except ConfigError as e:
        log.error("writer: %s", e)
        return 2
    return Writer(settings).run()


if __name__ == "__main__":
    sys.exit(main())
