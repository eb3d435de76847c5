"""The writer's commit thread (:class:`Committer`): group commit on the one write connection
(:mod:`workers.write_connection`), the record of applied requests (whether an id was applied already, and to what:
:mod:`workers.dedup`), and when a request is answered with an error (what it is answered:
:mod:`workers.answers`).

It takes every pending request (up to ``writer_max_batch``) from the queue the
IO thread (:mod:`workers.writer`) fills and runs them in one ``BEGIN
IMMEDIATE`` transaction, commits, and only then hands the replies back to the
IO thread, a batch's at once (its outbox and one ring of a doorbell). The IO thread
may run a small batch itself, while this thread is idle (:meth:`Committer.commit_here`).
Two ways to run a batch, same results:

* **fast** (every batch first): the ops one after another with no savepoint,
  then the record of every applied request in one ``executemany``. A
  savepoint costs two statements per request through SQLAlchemy, more than a
  small op itself; this path costs what the work needs.
* **careful** (a batch in which anything failed): nothing of the fast run is
  kept (rolled back) and the batch runs again, each request with its record in
  a savepoint of its own, so one bad request fails alone (:mod:`workers.careful_run`).

Nothing a request, a checkpoint or the database does ends the thread: a
request that fails gets its error; a batch that cannot commit gets a
retryable error for each of its requests (:class:`~db.errors.StorageFull` on
a full disk, with SQLite's own reason), and the next batch starts on a clean
connection.
"""
from __future__ import annotations

import logging
import queue
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack
import zmq
from sqlalchemy.engine import Connection, Engine

from db import ops
from db.config import Settings
from db.engine import storage_full_reason
from db.errors import (
    CommitFailed,
    OpFailed,
    RequestIdReused,
    StorageFull,
    ValidationError,
    WriterError,
    database_words,
    named_database_words,
)
from db.protocol import encode_reply
from db.validation import shown
from workers.answers import Answers
from workers.careful_run import TransactionLost, run_in_savepoint, take_out
from workers.dedup import Applied, AppliedRequests
from workers.journal_guard import SaveCopy
from workers.write_connection import WriteConnection, transaction_ended
from workers.write_request import Request
from workers.writer_stats import Stats

log = logging.getLogger("tickstack.writer")

#: Put on the queue to end the commit thread once it is empty.
STOP = object()
#: Rung (an empty message) by the commit thread after it put a batch's replies in its outbox.
DOORBELL = "inproc://replies"


class _FastRunFailed(Exception):
    """Something failed in a batch's fast run (an op, or the record of applied requests): the
    batch is rolled back and runs again carefully (see the module's docstring)."""

    def __init__(self, what: str, cause: BaseException, request: Request | None = None) -> None:
        super().__init__(f"{what}: {type(cause).__name__}: {cause}")
        self.cause = cause
        #: The request whose op failed (None: the record of applied requests did).
        self.request = request


class _HandOver(Exception):
    """A batch the IO thread runs (:meth:`Committer.commit_here`) must go to the commit thread
    (nothing of it committed)."""


class Committer:
    """The commit thread's state: the write connection, the dedup caches, and
    the bytes of requests it has finished with (the IO thread's queue budget). The IO thread runs
    a small batch through it too, while the commit thread is idle (:meth:`commit_here`)."""

    def __init__(self, settings: Settings, engine: Engine, conn: Connection, stats: Stats,
                 requests: queue.Queue, on_fatal: Callable[[], None],
                 on_commit: Callable[[], None] = lambda: None,
                 before_commit: Callable[[Connection], None] | None = None) -> None:
        """``on_commit`` is called after each batch that committed (the checkpointer's poke);
        ``before_commit`` in each batch's transaction just before its COMMIT, and may raise to
        commit nothing (on PostgreSQL: :meth:`db.server_lock.ServerWriterLock.check_held`)."""
        self.settings = settings
        self.on_commit = on_commit
        self.before_commit = before_commit
        #: The one write connection (replaced after a failure that leaves it unusable).
        self.link = WriteConnection(settings, engine, conn)
        self.stats = stats
        self.requests = requests
        self.on_fatal = on_fatal
        #: Set by the writer when every write must be refused (its WAL was removed): the batches
        #: queued then are answered with it, retryably, and run no more.
        self.refusing: str | None = None
        #: True while a batch is in hand (the drain waits for it).
        self.busy = False
        #: True while the IO thread runs a batch (:meth:`commit_here`).
        self.here = False
        self._losses: set[str] = set()
        #: Bytes (estimated) of the requests it has answered; only this thread writes it.
        self.released_bytes = 0
        #: Which ids were applied, to what, with what result (recent ones without a query).
        self.applied = AppliedRequests()
        self.batch_no = 0
        self.answers = Answers(settings, stats)
        #: The replies of committed batches, (ident, reply) pairs, for the IO thread to send: each
        #: batch's list is appended, then the doorbell (:data:`DOORBELL`) rings once. A message
        #: per batch on a ZeroMQ socket would cost libzmq's command processing (system calls) for
        #: every frame; a deque costs none.
        self.outbox: deque[list[tuple[bytes, bytes]]] = deque()
        #: A :class:`SaveCopy` taken from the queue with a batch, done after it.
        self._save_after: SaveCopy | None = None
        #: This run's transaction waits on no lock any more (:meth:`_wait_no_more`).
        self._waits_no_more = False

    @property
    def conn(self) -> Connection:
        return self.link.conn

    def run(self, ctx: zmq.Context) -> None:
        """The commit thread: batches from the queue until the stop marker."""
        out = ctx.socket(zmq.PUSH)
        out.setsockopt(zmq.SNDHWM, 0)
        out.connect(DOORBELL)
        wait = self.settings.writer_batch_wait
        try:
            while True:
                first = self.requests.get()
                if type(first) is not Request:  # a control item: STOP, or a SaveCopy
                    if first is STOP:
                        return
                    self._save(first)  # type: ignore[arg-type]
                    continue
                self.busy = True
                batch, stop_after = self._take_batch(first, wait)  # type: ignore[arg-type]
                first = None  # the requests' memory goes back after the batch, not at the next one
                # One hand-over to the IO thread per batch, not per request.
                self.outbox.append(self._commit_or_fail(batch))
                self.released_bytes += sum(req.cost for req in batch)
                taken, batch = len(batch), []
                self.busy = False
                for _ in range(taken):  # after its replies are in the outbox: see idle()
                    self.requests.task_done()
                # Rung last: a client answered before this thread was idle again sent its next
                # request to a busy thread (on a loaded machine, the first after one this thread committed).
                out.send(b"", zmq.NOBLOCK)
                if self._save_after is not None:
                    self._save(self._save_after)
                    self._save_after = None
                if stop_after:
                    return
        except Exception:  # only a bug of this loop itself gets here: requests never do
            log.exception("writer: commit thread failed; stopping")
            self.on_fatal()
            raise
        finally:
            self.busy = False
            out.close(linger=1000)

    def _save(self, item: SaveCopy) -> None:
        """:class:`SaveCopy`, on this thread (the connection's owner), marked done on the queue after."""
        self.busy = True
        try:
            self.link.wait_when_busy()
            item.result = self.link.save_copy(item.path)
            log.info("writer: saved the database whole as %s", item.result)
        except Exception as e:  # a full disk, the folder gone: the writer's words then say how to copy it
            item.result = str(e) if isinstance(e, OSError) else named_database_words(e)
        finally:
            self.busy = False
            self.requests.task_done()

    def idle(self) -> bool:
        """Whether every request put on the queue is answered (its replies in the outbox): nothing
        queued, nothing in hand, the thread waiting for the next. Only the IO thread puts requests,
        so while it does not put any, the thread stays idle, and the IO thread may run a batch
        itself (:meth:`commit_here`): after every request it queued before, in order."""
        return self.requests.unfinished_tasks == 0

    def commit_here(self, batch: list[Request]) -> list[tuple[bytes, bytes]] | None:
        """Run ``batch`` as the thread does (group commit, acknowledged after COMMIT) on the
        calling thread, which has seen :meth:`idle` and puts nothing on the queue until this
        returns; the replies to send now. None, with nothing committed, for a batch that would
        wait, which the caller then queues for this thread: when the record of applied requests is
        due for its prune (a delete that grows with the traffic), when another connection holds
        SQLite's write lock (the batch's ``BEGIN IMMEDIATE`` is taken here with ``busy_timeout`` 0,
        and kept for the batch, so no other program can take the lock in between), or when an op or
        the record of applied requests fails in its fast run (the careful run would begin again, and
        could wait; a request refused before it runs, e.g. an unknown op, is answered here), or when
        a failure here left the connection closed (the IO thread opens none: :meth:`WriteConnection.recover`)."""
        if self.prune_due():
            return None
        raw = self.link.begin_without_waiting()
        if raw is None:
            return None
        self.busy = self.here = True
        try:
            return self._commit_or_fail(batch)  # its BEGIN is the one taken above
        except _HandOver:
            return None
        finally:
            self.busy = self.here = False
            try:
                if raw.in_transaction:  # nothing may stay begun behind SQLAlchemy's back
                    raw.rollback()
            except sqlite3.Error as e:  # closed: a failure replaced the connection
                log.debug("writer: the IO thread's batch left its connection so: %s", e)

    def prune_due(self) -> bool:
        """Whether the next batch prunes the record of applied requests (:meth:`_maybe_prune`)."""
        return self.applied.prune_due()

    def _take_batch(self, first: Request, wait: float) -> tuple[list[Request], bool]:
        """``first`` and whatever else is queued (waiting up to ``wait`` s for
        more), up to ``writer_max_batch``; and whether the stop marker came."""
        batch = [first]
        deadline = time.monotonic() + wait
        while len(batch) < self.settings.writer_max_batch:
            try:
                remaining = deadline - time.monotonic()
                item = self.requests.get(timeout=remaining) if remaining > 0 else self.requests.get_nowait()
            except queue.Empty:
                break
            if type(item) is not Request:  # a control item: STOP, or a SaveCopy (done after this batch: run)
                if item is STOP:
                    return batch, True
                self._save_after = item  # type: ignore[assignment]
                break
            batch.append(item)
        return batch, False

    def _commit_or_fail(self, batch: list[Request]) -> list[tuple[bytes, bytes]]:
        """:meth:`_commit`, or a retryable error for every request of the batch
        when anything escapes it (the commit thread never ends for a batch)."""
        self._losses = set()  # the errors that took this batch's transaction (:func:`~workers.careful_run.take_out`)
        if not self.here:
            self.link.wait_when_busy()
        if self.refusing is not None:
            return [(req.ident, encode_reply(req.seq, error=CommitFailed(self.refusing))) for req in batch]
        if not self.here and self.link.closed:
            # The IO thread left it closed (it opens none), or the last open failed: open it now, and
            # when that fails, the batch's answer says why (a full disk: StorageFull), tried once.
            failed = self._recover_connection()
            if failed is not None:
                self.stats.commit_failures += 1
                error = self.answers.batch_error(failed)
                return [(req.ident, encode_reply(req.seq, error=error)) for req in batch]
        try:
            return self._commit(batch)
        except _HandOver:
            raise
        except Exception as e:
            log.exception("writer: batch of %d requests failed", len(batch))
            self._recover_connection()
            error = self.answers.batch_error(e)
            return [(req.ident, encode_reply(req.seq, error=error)) for req in batch]

    def _commit(self, batch: list[Request],
                answered: dict[int, WriterError] | None = None) -> list[tuple[bytes, bytes]]:
        """Run a batch in one IMMEDIATE transaction, fast and, if anything failed in that, carefully
        (see the module's docstring; on the IO thread a failed fast run raises :class:`_HandOver`
        instead); return the replies to send, which must go out only now that the batch is
        committed. ``answered``: requests (by id) answered with that error instead of running (they
        lost a race in an earlier run of the same batch)."""
        self.batch_no += 1
        batch_no = self.batch_no
        started = time.perf_counter()
        try:
            try:
                run = self._run(batch, batch_no, careful=False, answered=answered)
            except _FastRunFailed as e:
                self._recover_connection()
                if self.here:  # a careful run begins again, and could wait: the commit thread runs it,
                    self.batch_no = batch_no - 1  # under this number (nothing of this run was committed)
                    raise _HandOver from e
                self.stats.careful_batches += 1
                log.debug("writer: batch %d runs again with a savepoint per request (%s)", batch_no, e)
                lost = e.request and self.answers.lost_race(e.cause, e.request.op, e.request.cid)
                answered = {**(answered or {}), **({id(e.request): lost} if lost else {})}
                run = self._run(batch, batch_no, careful=True, answered=answered)
        except _HandOver:
            raise
        except Exception as e:
            # Nothing of the batch is committed: every request in it gets a
            # retryable error, and its client sends it again.
            cause = e.cause if isinstance(e, TransactionLost) else e
            self.answers.count_race(cause)
            self._recover_connection()
            if isinstance(e, TransactionLost) and storage_full_reason(cause) is None:
                return take_out(batch, e, self._losses, self.stats, self.answers,
                                lambda rest: self._commit(rest, answered))
            self.stats.commit_failures += 1
            error = self.answers.batch_error(cause)
            if not isinstance(error, StorageFull):  # a full disk is logged when it fills and when it frees
                log.error("writer: commit of batch %d (%d requests) failed: %s", batch_no, len(batch),
                          database_words(cause))
            return [(req.ident, encode_reply(req.seq, error=error, batch=batch_no)) for req in batch]
        replies, outside, committed, tally = run
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.on_commit()
        self.answers.committed(bool(committed))
        self.applied.remember(committed)
        st = self.stats
        st.batches += 1
        st.io_batches += self.here
        st.batched_requests += len(batch)
        st.max_batch = max(st.max_batch, len(batch))
        st.commit_ms.append(elapsed_ms)
        st.requests_ok += tally["ok"]
        st.requests_failed += tally["failed"]
        st.ticks_inserted += tally["ticks"]
        st.dedup_hits += tally["dedup"]
        # Ops outside the transaction run now, in request order; each takes
        # the place its request holds in ``replies``. The same request (op and arguments) asked again in
        # the batch is answered by its first run, done after it came: such an op (a checkpoint, which
        # waits up to 200 ms for readers) is never recorded as applied, and 100 of them from one client,
        # run one by one and resent while they ran, held every write for minutes (fault hunt, stop 53).
        later = []
        ran: dict[tuple[str, bytes | None], tuple[Any, WriterError | None]] = {}
        for req, spec, args in outside:
            key = (spec.name, req.digest)
            if key in ran:
                result, error = ran[key]
                self.stats.requests_ok += error is None
            else:
                result, error = ran[key] = self._run_outside(spec, args)
            later.append(encode_reply(req.seq, result=result, error=error, batch=batch_no))
        in_order = iter(later)
        return [(r.ident, next(in_order)) if isinstance(r, Request) else (batch[i].ident, r)
                for i, r in enumerate(replies)]

    def _run(self, batch: list[Request], batch_no: int, careful: bool,
             answered: dict[int, WriterError] | None = None) -> tuple[
            list[bytes | Request], list[tuple[Request, ops.Op, dict]], dict[tuple[str, int], Applied], dict[str, int]]:
        """One run of a batch in one transaction, committed: the replies in request order (a
        Request holds the place of an op that runs outside the transaction), those ops, the
        packed results of the requests applied, and the counts. Raises :class:`_FastRunFailed`
        (fast run) or :class:`~workers.careful_run.TransactionLost` (careful run); the caller rolls back. ``answered``:
        requests (by id) answered with the given error instead of running."""
        replies: list[bytes | Request] = []
        outside: list[tuple[Request, ops.Op, dict]] = []
        committed: dict[tuple[str, int], Applied] = {}
        tally = {"ok": 0, "failed": 0, "ticks": 0, "dedup": 0}
        conn = self.conn
        conn.begin()
        stamp = self.applied.begin_batch(conn)  # the records' time; after a jump of the clock, older ones moved
        self._waits_no_more = False
        if careful and answered:  # the fast run lost a race: the lock may still be held
            self._wait_no_more(conn)
        for req in batch:
            if answered and id(req) in answered:
                tally["failed"] += 1
                replies.append(encode_reply(req.seq, batch=batch_no, error=answered[id(req)]))
                continue
            try:
                done = self._apply(conn, req, batch_no, committed, tally, careful, stamp)
            except TransactionLost as lost:
                lost.request = req
                raise
            except _FastRunFailed:
                raise
            except Exception as e:  # the writer's own handling failed: this request fails alone
                if transaction_ended(conn):  # ...unless it took the batch's transaction with it
                    if careful:
                        lost = TransactionLost(e)
                        lost.request = req
                        raise lost from e
                    raise _FastRunFailed(f"{shown(req.op)} of client {req.cid}", e, req) from e
                log.exception("writer: request %s of %s failed", req.op, req.cid)
                tally["failed"] += 1
                done = encode_reply(req.seq, batch=batch_no, error=OpFailed(
                    f"{shown(req.op)} failed: {type(e).__name__}: {e}"))
            if isinstance(done, bytes):
                replies.append(done)
            else:
                outside.append((req, *done))
                replies.append(req)  # its place: replies go out in request order
        if not careful and committed:
            try:
                ops.record_applied_many(conn, [(cid, seq, packed, digest)
                                               for (cid, seq), (digest, packed) in committed.items()], stamp)
            except Exception as e:
                raise _FastRunFailed("recording the applied requests failed", e) from e
        self._maybe_prune(conn)
        if self.before_commit is not None:
            self.before_commit(conn)
        conn.commit()
        return replies, outside, committed, tally

    def _apply(self, conn: Connection, req: Request, batch_no: int, committed: dict[tuple[str, int], Applied],
               tally: dict[str, int], careful: bool, stamp: int) -> bytes | tuple[ops.Op, dict]:
        """One request inside the batch transaction: its reply, or its op and
        arguments when the op runs outside the transaction (checkpoint). Fast, an
        op's error of any kind raises :class:`_FastRunFailed`; careful, it fails
        this request alone (:func:`~workers.careful_run.run_in_savepoint`)."""
        try:
            prior = self.applied.prior(conn, req, committed)
        except RequestIdReused as e:  # the first request's answer would drop this one silently
            tally["failed"] += 1
            return encode_reply(req.seq, error=e, batch=batch_no)
        if prior is not None:
            tally["dedup"] += 1
            return encode_reply(req.seq, result=msgpack.unpackb(prior), batch=batch_no)
        try:
            spec, args = ops.prepare(req.op, req.args)
        except ValidationError as e:
            tally["failed"] += 1
            return encode_reply(req.seq, error=e, batch=batch_no)
        except Exception as e:  # a validator's bug fails its request, never the writer
            log.exception("writer: validating %s failed", shown(req.op))
            tally["failed"] += 1
            return encode_reply(req.seq, batch=batch_no, error=ValidationError(
                f"{req.op}: invalid arguments ({type(e).__name__}: {e})"))
        if not spec.transactional:
            return spec, args
        if careful:
            result, packed, error = run_in_savepoint(conn, req, spec, args, stamp, self.answers)
            if error is not None:
                if isinstance(error, CommitFailed):  # in a careful run, only a lost race (Answers.op_error)
                    self._wait_no_more(conn)
                tally["failed"] += 1
                return encode_reply(req.seq, error=error, batch=batch_no)
        else:
            try:
                result = ops.execute(conn, spec, args)
                packed = msgpack.packb(result)
            except Exception as e:
                raise _FastRunFailed(f"{spec.name} of client {req.cid}", e, req) from e
        committed[(req.cid, req.seq)] = (req.digest, packed)
        tally["ok"] += 1
        if spec.name == "insert_ticks":
            tally["ticks"] += result["inserted"]
        return encode_reply(req.seq, result=result, batch=batch_no)

    def _wait_no_more(self, conn: Connection) -> None:
        """PostgreSQL: for the rest of this careful run's transaction, a request that waits on a lock
        fails at once (retryably, as the one that lost the race). A table locked by another session (a
        DBA's ``LOCK TABLE``) made every request of the batch on it wait the whole lock timeout in turn:
        200 queued inserts held the writer, and every client on any other table, over three minutes.
        At the transaction's level, not in a request's savepoint, whose rollback would undo it; once
        a transaction (every later request that loses a wait would set it again)."""
        if self.settings.database_path is None and self.settings.lock_timeout_ms and not self._waits_no_more:
            conn.exec_driver_sql("SET LOCAL lock_timeout = '1ms'")
            self._waits_no_more = True

    def _run_outside(self, spec: ops.Op, args: dict) -> tuple[Any, WriterError | None]:
        try:
            result = ops.execute(self.conn, spec, args)
        except Exception as e:
            return None, self.answers.op_error(spec, e)
        finally:
            # A PRAGMA may open an implicit transaction in SQLAlchemy's view.
            self._recover_connection()
        if spec.name == "checkpoint":
            self.stats.last_checkpoint = {"at_ms": ops.now_ms(), "mode": args.get("mode", "TRUNCATE"), **result}
        self.stats.requests_ok += 1
        return result, None

    def _recover_connection(self) -> Exception | None:
        """:meth:`WriteConnection.recover`, opening no connection on the IO thread (it never waits)."""
        return self.link.recover(open_new=not self.here)

    def _maybe_prune(self, conn: Connection) -> None:
        """Forget applied requests older than the dedup window, once a minute,
        inside a batch transaction (so it costs no extra commit)."""
        # Not on the IO thread (it may have become due while its batch ran): the next batch of the
        # commit thread prunes, and commit_here hands that one over.
        if self.here or not self.prune_due():
            return
        self.applied.prune(conn, self.settings.dedup_ttl)

