"""Requests in flight from one :class:`db.client.WriterClient`: each one's :class:`Ticket` (its
payload, its timers, its answer), and a :class:`Pipeline` that keeps many in flight, for high-rate
producers (the tick ingestor, the analysis worker, bulk loads). The client sends, resends and reads;
these hold what it needs to."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from db.errors import WriterError
from db.parsers import check_seconds

#: The most requests a :class:`Pipeline` keeps in flight (each holds its request and its answer).
MAX_PIPELINE_WINDOW = 1024
#: A request's first wait for an answer before it is sent again (doubled each time, up to the client's
#: ``MAX_ATTEMPT_TIMEOUT``), and its first back-off after a *busy* answer.
FIRST_ATTEMPT_TIMEOUT = 1.0
FIRST_BUSY_BACKOFF = 0.005


class Ticket:
    """One request in flight: resolved with a result or an exception."""

    __slots__ = ("seq", "op", "payload", "deadline", "attempt_timeout", "resend_at", "awaiting", "backoff",
                 "done", "_result", "_error", "first_sent", "sent_at", "latency", "batch", "last_error",
                 "went_unanswered")

    def __init__(self, seq: int, op: str, payload: bytes, deadline: float) -> None:
        self.seq = seq
        self.op = op
        self.payload = payload
        self.deadline = deadline
        self.attempt_timeout = FIRST_ATTEMPT_TIMEOUT
        self.resend_at = 0.0
        #: True while an answer is due: past resend_at that is a timeout.
        #: False while backing off after a busy or retryable answer.
        self.awaiting = False
        self.backoff = FIRST_BUSY_BACKOFF
        self.done = False
        self._result: Any = None
        self._error: WriterError | None = None
        self.first_sent = time.monotonic()
        self.sent_at = self.first_sent
        #: Seconds from first send to answer, once done.
        self.latency: float | None = None
        #: The writer's number of the batch (transaction) that answered it.
        self.batch: int | None = None
        #: The writer's last retryable answer (e.g. StorageFull), while it retries.
        self.last_error: WriterError | None = None
        #: A send of it went unanswered (a silence): it may have been applied, whatever later sends are
        #: answered (db.silence.Silence.deadline_error).
        self.went_unanswered = False

    def result(self) -> Any:
        """The op's result; raises its error. Only once ``done``."""
        if not self.done:
            raise RuntimeError(f"request {self.seq} ({self.op}) is still in flight")
        if self._error is not None:
            raise self._error
        return self._result

    @property
    def error(self) -> WriterError | None:
        return self._error


class Client(Protocol):
    """What a :class:`Pipeline` needs of its client (:class:`db.client.WriterClient`)."""

    @property
    def in_flight(self) -> int: ...

    def submit(self, op: str, /, **args: Any) -> Ticket: ...

    def _pump(self, timeout: float) -> None: ...


class Pipeline:
    """Many requests in flight from one client, for high-rate producers.

        with writer.pipeline(window=16, on_done=ack) as pipe:
            for batch in batches:
                pipe.submit("insert_ticks", ticks=batch)
        # on exit every request is answered; failures are in pipe.failed

    ``submit`` blocks while ``window`` requests are unanswered, so memory
    and the writer's queue stay bounded. ``on_done(ticket)`` is called for
    each answered request, in submit order.
    """

    def __init__(self, client: Client, window: int, on_done: Callable[[Ticket], None] | None = None) -> None:
        if not 1 <= window <= MAX_PIPELINE_WINDOW:
            raise ValueError(f"window must be 1..{MAX_PIPELINE_WINDOW}")
        self.client = client
        self.window = window
        self.on_done = on_done
        self.failed: list[Ticket] = []
        self.completed = 0
        self._queue: deque[Ticket] = deque()

    def submit(self, op: str, /, **args: Any) -> Ticket:
        # Collect before sending, never after: on_done must only ever see
        # tickets the caller already holds (it may key its own records on
        # them right after this returns).
        self.collect(0)
        while self.outstanding >= self.window:
            self.collect(0.05)
        ticket = self.client.submit(op, **args)
        self._queue.append(ticket)
        return ticket

    def drain(self) -> None:
        """Wait until every submitted request is answered."""
        while self._queue:
            self.collect(0.05)

    @property
    def outstanding(self) -> int:
        return sum(1 for t in self._queue if not t.done)

    def collect(self, timeout: float = 0) -> None:
        """Take in the answers that arrived (waiting up to ``timeout``) and
        report, in submit order, every request answered so far."""
        check_seconds("collect: timeout", timeout)  # nan or inf would reach ZeroMQ's receive timeout
        if self.client.in_flight:
            self.client._pump(timeout)
        while self._queue and self._queue[0].done:
            ticket = self._queue.popleft()
            self.completed += 1
            if ticket.error is not None:
                self.failed.append(ticket)
            if self.on_done is not None:
                self.on_done(ticket)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.drain()
