"""``WriterClient``: how every process other than the writer changes data.

    from db.client import WriterClient
    with WriterClient() as writer:
        writer.call("insert_ticks", ticks=[{"symbol": "BTCUSD", "ts": ts, "bid": b, "ask": a}])

``call`` returns once the op is committed, or raises a typed error
(:mod:`db.errors`): ``ValidationError`` for bad input (a request over the
writer's message size is refused here, before it is sent), ``NotFound``,
``Conflict``, or ``WriterUnavailable`` once the deadline passes without an
answer. A full disk is answered with ``StorageFull`` (a ``WriterUnavailable``
that says why): the client retries it until the deadline, as it does every
retryable answer, then raises it with the writer's own words. While the
writer restarts, the client resends the *same* request
(same client id and sequence number) with exponential backoff; the writer
records applied requests in the transaction that applies them, so a request
is applied at most once however often it is sent.

High-rate producers keep many requests in flight with :meth:`pipeline`. The
number columns of bulk ops (ticks, bars, indicator values in columns form) go
packed (:func:`db.protocol.pack_columns`): the caller passes plain lists.

A client owns a ZeroMQ socket and is not thread-safe: use one per thread
(:func:`thread_client` keeps one per thread for you). After ``fork()`` the
child gets a fresh socket on first use.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from db.config import Settings, load_settings
from db.errors import ERROR_TYPES, ValidationError, WriterError, WriterUnavailable
from db.inflight import FIRST_ATTEMPT_TIMEOUT, MAX_PIPELINE_WINDOW, Pipeline, Ticket
from db.parsers import check_seconds
from db.protocol import (
    MAX_MESSAGE_SLACK,
    MAX_SEQ,
    UNRECORDED_OPS,
    client_id_problem,
    encode_request,
    pack_columns,
)
from db.silence import Silence

#: ``Ticket``, ``Pipeline`` and the window's bound live in :mod:`db.inflight`; importable from here too.
__all__ = ["MAX_PIPELINE_WINDOW", "Pipeline", "Ticket", "WriterClient", "thread_client"]

log = logging.getLogger("tickstack.client")
#: The longest wait for an answer before a request is sent again (from db.inflight.FIRST_ATTEMPT_TIMEOUT,
#: doubled each time), and the longest back-off after a *busy* answer.
MAX_ATTEMPT_TIMEOUT = 5.0
MAX_BUSY_BACKOFF = 1.0
#: Seconds a request sent after :meth:`WriterClient.give_up_by`'s time still gets (a writer that
#: answers does so in milliseconds: a record after a long job is not given up unsent).
LAST_TRY_S = 1.0
#: The longest a client waits for the writer's ping that says its message limit (a request too big
#: for it: :meth:`WriterClient._refuse_too_big`); its loop reads no answer meanwhile.
LIMIT_PING_S = 0.5


class WriterClient:
    def __init__(self, endpoint: str | None = None, *, deadline: float | None = None,
                 settings: Settings | None = None, client_id: str | None = None) -> None:
        """Nothing connects until the first call. ``deadline`` (seconds) bounds
        how long one call keeps retrying before ``WriterUnavailable``.
        ``client_id``: the id of an earlier client whose unanswered requests
        this one sends again (see :meth:`submit`'s ``_seq``); a new one by default."""
        settings = settings or load_settings()
        self.endpoint = endpoint or settings.writer_endpoint
        #: Its home: the limit probe's (:meth:`_writer_limit_now`); what a silence says (db.silence).
        self._settings = settings
        self._silence = Silence(settings, self.endpoint)
        self.deadline = settings.client_deadline if deadline is None else deadline  # checked: see the property
        self.max_message = settings.writer_max_message
        if client_id is not None and (said := client_id_problem(client_id)) is not None:
            raise ValueError(f"client_id: {said}")  # the writer would refuse its every request
        self.client_id = client_id or uuid.uuid4().hex
        #: Made with an earlier client's id: it only sends that client's requests again (see _next_seq).
        self._sends_again_only = bool(client_id)
        self._seq = 0
        self._pending: dict[int, Ticket] = {}
        #: When every request gives up at the latest (monotonic; :meth:`give_up_by`); None: no bound.
        self._give_up_at: float | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._pid = os.getpid()
        self._owner: int | None = None
        #: When the writer last answered one of our ops from a commit: while
        #: it keeps answering, a slow request is queued, not lost.
        self._progress_at = 0.0
        self._wait_ms = -1
        #: ``TICKSTACK_DIRECT_WRITES`` (PostgreSQL): ``call`` runs transactional ops itself (db/direct.py).
        self._direct: Any = None
        if settings.direct_writes:
            from db.direct import DirectWrites  # here: it loads SQLAlchemy and the ops, which a client needs not

            self._direct = DirectWrites(settings)

    @property
    def deadline(self) -> float:
        """Seconds each call keeps retrying unless it is given its own ``_deadline``. Checked when
        set, here and by callers that shorten it (the tick ingestor's last chance at stop)."""
        return self._deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._deadline = check_seconds("deadline", value)

    # --- public API ------------------------------------------------------------------

    def call(self, op: str, /, _deadline: float | None = None, **args: Any) -> Any:
        """Run ``op`` on the writer; return its result once committed. ``_deadline`` (seconds)
        bounds this call alone (default: the client's ``deadline``). With ``TICKSTACK_DIRECT_WRITES``
        on PostgreSQL a transactional op runs in a transaction of this client's own, with the same
        promises (:mod:`db.direct`)."""
        if _deadline is not None:
            check_seconds(f"{op}: _deadline", _deadline)
        if self._direct is not None and self._direct.takes(op):
            self._check_owner()
            started = time.monotonic()
            deadline = started + (self.deadline if _deadline is None else _deadline)
            return self._direct.call(self.client_id, self._next_seq(op), op, args,
                                     lambda: self._bounded(deadline, started))
        ticket = self.submit(op, _deadline=_deadline, **args)
        self.wait(ticket)
        return ticket.result()

    def wait_ready(self, timeout: float, is_alive: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Ping until the writer answers; return the ping. Raises :class:`WriterUnavailable` after
        ``timeout`` seconds, or at once when ``is_alive()`` (e.g. "the writer process still
        runs") turns false. The one "wait until the writer answers" rule: circus's readiness
        hook, the harness that spawns writers, and ``db health`` use it."""
        deadline = time.monotonic() + check_seconds("wait_ready: timeout", timeout)
        while True:
            try:
                return self.ping(timeout=max(0.05, min(0.5, deadline - time.monotonic())))
            except WriterUnavailable:
                if time.monotonic() >= deadline:
                    raise WriterUnavailable(f"the writer at {self.endpoint} did not answer within {timeout:g} s"
                                            ) from None
                if is_alive is not None and not is_alive():
                    raise WriterUnavailable(f"the writer at {self.endpoint} exited before it was ready") from None

    def ping(self, timeout: float = 1.0) -> dict[str, Any]:
        """Whether the writer is up and serving: its pid and the round trip
        in ms. Raises WriterUnavailable after ``timeout`` seconds."""
        started = time.monotonic()
        ticket = self.submit("ping", _deadline=check_seconds("ping: timeout", timeout))
        self.wait(ticket)
        result = dict(ticket.result())
        result["latency_ms"] = round((time.monotonic() - started) * 1000, 3)
        return result

    def stats(self, timeout: float = 2.0) -> dict[str, Any]:
        """The writer's counters: queue depth, batches, commit latency, ..."""
        ticket = self.submit("stats", _deadline=check_seconds("stats: timeout", timeout))
        self.wait(ticket)
        return ticket.result()

    def submit(self, op: str, /, _deadline: float | None = None, _seq: int | None = None, **args: Any) -> Ticket:
        """Send ``op`` without waiting; :meth:`wait` or :meth:`pipeline`
        collects the answer. ``_seq``: send it again under the sequence number
        it had (with this client's ``client_id``, the one it was sent with), for
        a caller that kept an unanswered request, e.g. on disk, and sends it
        later: the writer applies a (client id, seq) once, so a request it took
        and did not answer is not applied twice (within ``TICKSTACK_DEDUP_TTL``)."""
        if _deadline is not None:  # before anything is numbered or sent
            check_seconds(f"{op}: _deadline", _deadline)
        self._check_owner()
        if _seq is None:
            _seq = self._next_seq(op)
        elif type(_seq) is not int or not 0 <= _seq <= MAX_SEQ:  # the writer could not answer it by number
            raise ValueError(f"{op}: _seq must be a whole number from 0 to 2^63-1 (the protocol's), not "
                             f"{_seq!r:.40}")
        elif _seq in self._pending:
            raise ValueError(f"request {_seq} of this client is still in flight")
        else:  # a new request after it must not take its number again
            self._seq = max(self._seq, _seq)
        try:
            payload = encode_request(self.client_id, _seq, op, pack_columns(op, args))
        except (TypeError, ValueError, OverflowError) as e:
            raise ValidationError(f"{op}: arguments cannot be sent: {e}") from None
        if len(payload) > self.max_message:
            # The writer answers "over the limit" up to 64 KiB past its limit and
            # cannot answer beyond (ZeroMQ closes the connection unread): a writer
            # given a lower TICKSTACK_WRITER_MAX_MESSAGE than this client times it out.
            raise ValidationError(f"{op}: the request is {len(payload)} bytes, over the writer's limit of "
                                  f"{self.max_message} (TICKSTACK_WRITER_MAX_MESSAGE); send it in smaller batches")
        deadline = time.monotonic() + (self.deadline if _deadline is None else _deadline)
        ticket = Ticket(_seq, op, payload, deadline)
        self._pending[ticket.seq] = ticket
        self._send(ticket)
        return ticket

    def wait(self, ticket: Ticket) -> None:
        """Block until ``ticket`` is answered (or its deadline passes)."""
        while not ticket.done:
            self._pump(0.05)

    def pipeline(self, window: int = 32, on_done: Callable[[Ticket], None] | None = None) -> Pipeline:
        """Keep up to ``window`` requests in flight (see :class:`Pipeline`)."""
        return Pipeline(self, window, on_done)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def give_up_by(self, seconds: float) -> None:
        """Every request in flight, and every one sent from now on, gives up ``seconds`` from now
        at the latest (not past its own deadline; one sent after that time still gets
        :data:`LAST_TRY_S`, enough for a writer that answers): a producer that stops bounds its last
        flush to its stop's time (circus's ``graceful_timeout``), whatever the writer does meanwhile.
        Only attributes change, and the bound is read when each request is pumped: safe from a
        signal handler, at any point of a call."""
        limit = time.monotonic() + check_seconds("give_up_by: seconds", seconds)
        self._give_up_at = limit if self._give_up_at is None else min(self._give_up_at, limit)

    def _bounded(self, deadline: float, first_sent: float) -> float:
        """A request's ``deadline`` under :meth:`give_up_by`'s bound (a direct write's too)."""
        if self._give_up_at is None:
            return deadline
        return min(deadline, max(self._give_up_at, first_sent + LAST_TRY_S))

    def close(self) -> None:
        if self._direct is not None and self._pid == os.getpid():
            self._direct.close()
        if self._sock is not None and self._pid == os.getpid():
            self._sock.close(linger=0)
        self._sock = None
        self._ctx = None

    def __enter__(self) -> WriterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------

    def _next_seq(self, op: str) -> int:
        """The sequence number of a new request. A client made with an earlier client's id would
        number from 1 again, and the writer answers an id it has applied with that request's
        result: the new request would be answered and never applied. So such a client sends no
        new request (a ping or stats is never recorded, so those may go)."""
        if self._sends_again_only and op not in UNRECORDED_OPS:
            raise ValueError(f"{op}: a client made with client_id= only sends earlier requests again "
                             "(submit(op, _seq=N, ...) with the arguments they had); a new request needs a "
                             "client of its own")
        if self._seq >= MAX_SEQ:  # 2^63 would be refused unanswerably: the call would wait out its deadline
            raise ValueError(f"{op}: this client has used every sequence number (its last, 2^63-1, was given "
                             "as _seq): a new request needs a new client")
        self._seq += 1
        return self._seq

    def _check_owner(self) -> None:
        if self._pid != os.getpid():
            # A forked child: the parent's socket is not ours to use or close, and its request ids
            # are not ours to reuse (the writer would answer the child with the parent's results).
            self._pid, self._sock, self._ctx, self._pending, self._owner = os.getpid(), None, None, {}, None
            self.client_id, self._seq, self._sends_again_only = uuid.uuid4().hex, 0, False
            if self._direct is not None:  # the parent's connection is not ours either
                self._direct = type(self._direct)(self._direct.settings)
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        elif self._owner != me:
            raise RuntimeError("WriterClient is not thread-safe: create one per thread "
                               "(db.client.thread_client() does that)")

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            if self._ctx is None:
                self._ctx = zmq.Context.instance()
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.connect(self.endpoint)
            self._sock = sock
            self._wait_ms = -1  # RCVTIMEO as set on this socket (-1: ZeroMQ's default, wait for ever)
        return self._sock

    def _reconnect(self) -> None:
        """The lazy-pirate step: a silent writer may be a dead one, and the old
        socket's queue may be stuck on its corpse; start over."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _send(self, ticket: Ticket) -> None:
        now = time.monotonic()
        try:
            self._socket().send(ticket.payload, zmq.NOBLOCK)
        except zmq.Again:  # our own queue is full: try again shortly
            self._back_off(ticket)
            return
        ticket.awaiting = True
        ticket.sent_at = now
        ticket.resend_at = now + ticket.attempt_timeout

    @staticmethod
    def _back_off(ticket: Ticket) -> None:
        ticket.awaiting = False
        ticket.resend_at = time.monotonic() + ticket.backoff
        ticket.backoff = min(ticket.backoff * 2, MAX_BUSY_BACKOFF)

    def _resolve(self, ticket: Ticket, result: Any = None, error: WriterError | None = None) -> None:
        ticket.done = True
        ticket._result = result
        ticket._error = error
        ticket.latency = time.monotonic() - ticket.first_sent
        self._pending.pop(ticket.seq, None)

    def _pump(self, timeout: float) -> None:
        """Read replies for up to ``timeout`` seconds; resend what timed out
        or was refused as busy; fail what passed its deadline."""
        sock = self._socket()
        wait_ms = max(0, int(timeout * 1000))
        if wait_ms != self._wait_ms:
            sock.setsockopt(zmq.RCVTIMEO, wait_ms)
            self._wait_ms = wait_ms
        try:
            # A receive that waits (ZeroMQ's own timeout), not a poll then a receive: a poller
            # per call costs as much as the rest of a small call. Then whatever else arrived,
            # while requests are open.
            raw = sock.recv()
            while True:
                self._on_reply(raw)
                if not self._pending:
                    break
                raw = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            pass
        now = time.monotonic()
        due: list[Ticket] = []
        timed_out = False
        for ticket in list(self._pending.values()):
            limit = self._bounded(ticket.deadline, ticket.first_sent)
            if now >= limit:
                if (ticket.awaiting and ticket.last_error is not None
                        and now < self._bounded(min(ticket.sent_at, ticket.deadline) + LAST_TRY_S, ticket.first_sent)):
                    # Sent again after a retryable answer, and that send is unanswered: the writer that
                    # answered in milliseconds is given LAST_TRY_S to say what became of it (a full disk
                    # then gets its StorageFull), not a guess from the earlier answer. Not past a stop's
                    # bound (give_up_by), whose time is the worker's exit's, even when the deadline came
                    # first; never past deadline + LAST_TRY_S, however often it is sent again meanwhile
                    # (an answer to a later request resends it: _on_reply).
                    continue
                self._resolve(ticket, error=self._silence.deadline_error(ticket))
            elif now >= ticket.resend_at:
                if ticket.awaiting and now - self._progress_at < ticket.attempt_timeout:
                    # Answers keep coming: it waits its turn behind our own
                    # earlier requests. Resending would only add work.
                    ticket.resend_at = now + ticket.attempt_timeout
                    continue
                due.append(ticket)
                timed_out = timed_out or ticket.awaiting
        if timed_out:
            self._refuse_too_big([t for t in due if t.awaiting])
            due = [t for t in due if not t.done]
            timed_out = any(t.awaiting for t in due)
        if timed_out:
            log.info("writer at %s did not answer; reconnecting and resending %d requests",
                     self.endpoint, len(self._pending))
            self._silence.tell(now - min(t.first_sent for t in self._pending.values()) if self._pending else 0.0)
            self._reconnect()
            due = list(self._pending.values())
        for ticket in due:
            if timed_out and ticket.awaiting:
                ticket.attempt_timeout = min(ticket.attempt_timeout * 2, MAX_ATTEMPT_TIMEOUT)
                ticket.last_error = None  # its last answer is older than this silence
                ticket.went_unanswered = True
            self._send(ticket)

    def _refuse_too_big(self, late: list[Ticket]) -> None:
        """Fail the ``late`` requests larger than the writer takes (ZeroMQ closes the connection of a
        frame :data:`MAX_MESSAGE_SLACK` over its limit unread), which a client with a larger limit
        waited its deadline for. The writer's ping says its limit: asked once per silence, for the
        requests at their second silence or later (at the first the writer is most often restarting),
        never kept (a writer restarted with a larger one read what an old answer refused). Nothing is
        failed when the writer does not say (away, or older)."""
        big = [t for t in late if len(t.payload) > MAX_MESSAGE_SLACK and t.op not in UNRECORDED_OPS
               and t.attempt_timeout > FIRST_ATTEMPT_TIMEOUT]
        if not big:
            return
        limit = self._writer_limit_now(min(self._bounded(t.deadline, t.first_sent) for t in big))
        if limit is None:
            return
        for ticket in big:
            if len(ticket.payload) > limit + MAX_MESSAGE_SLACK:
                self._resolve(ticket, error=ValidationError(
                    f"{ticket.op}: the request is {len(ticket.payload)} bytes, over the writer's limit of {limit} "
                    f"(its TICKSTACK_WRITER_MAX_MESSAGE; this client's is {self.max_message}): the writer closes "
                    "the connection of such a request unread, so nothing of it was applied; send it in smaller "
                    "batches, or give the writer and this client the same limit"))

    def _writer_limit_now(self, give_up_at: float) -> int | None:
        """The writer's ``max_message`` as its ping says it now, or None (no answer within
        :data:`LIMIT_PING_S`, a writer that serves answers one in milliseconds, nor by ``give_up_at``,
        the late request's own bound; a writer too old to say it)."""
        wait = min(LIMIT_PING_S, give_up_at - time.monotonic())
        if wait <= 0:
            return None
        try:
            with WriterClient(self.endpoint, settings=self._settings, deadline=1.0) as probe:
                limit = probe.ping(timeout=max(0.05, wait)).get("max_message")
        except WriterError:
            return None
        return limit if type(limit) is int else None

    def _on_reply(self, raw: bytes) -> None:
        try:
            msg = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            ticket = self._pending.get(msg.get("seq"))
        except Exception:  # a reply we cannot read is one we did not ask for
            log.warning("ignoring an unreadable reply from the writer")
            return
        if ticket is None:
            return  # the answer to a request already answered (a resend)
        ticket.batch = msg.get("batch")
        self._silence.heard()
        if ticket.batch is not None:
            self._progress_at = time.monotonic()
            # The writer answers one client's requests in the order they
            # arrived: an earlier one still open, sent before this one, was
            # lost (a writer restart between them). Send it again now.
            for other in list(self._pending.values()):
                if other.seq < ticket.seq and other.awaiting and other.sent_at <= ticket.sent_at:
                    self._send(other)
        if msg.get("ok"):
            self._resolve(ticket, result=msg.get("result"))
            return
        if msg.get("busy"):
            self._back_off(ticket)
            return
        err = msg.get("error") or {}
        cls = ERROR_TYPES.get(err.get("type"), WriterError)
        error = cls(err.get("message", "unknown error"))
        if error.retryable:
            ticket.last_error = error
            self._back_off(ticket)
            return
        self._resolve(ticket, error=error)


_local = threading.local()


def thread_client(settings: Settings | None = None, deadline: float | None = None) -> WriterClient:
    """This thread's client for the writer of ``settings`` (default: from the
    environment) with this ``deadline``, made on first use. After fork the
    client itself starts over with a fresh socket."""
    settings = settings or load_settings()
    clients: dict[tuple[str, float | None], WriterClient] = _local.__dict__.setdefault("clients", {})
    key = (settings.writer_endpoint, deadline)
    client = clients.get(key)
    if client is None:
        client = clients[key] = WriterClient(settings=settings, deadline=deadline)
    return client
