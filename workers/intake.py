"""The writer's IO thread's requests (:class:`Intake`): each frame read from the socket is decoded
within the limits of :func:`db.protocol.decode_request`; ``ping`` and ``stats`` are answered at once,
errors too; ops are taken into the queue of the commit thread (:mod:`workers.commit`), bounded in
requests and in bytes (a full queue gets a *busy* reply), or, on SQLite, a small batch read while
the commit thread is idle is committed here (:meth:`Intake.dispatch`). The replies the commit thread
hands back are sent from here (:meth:`Intake.forward_replies`). :class:`workers.writer.Writer` owns
the socket and the loop, and calls these.
"""
from __future__ import annotations

import logging
import os
import queue
from typing import Any

import zmq

from db.config import Settings
from db.engine import display_url
from db.errors import CommitFailed, ValidationError, WriterUnavailable
from db.ops import OPS
from db.protocol import PROTOCOL, decode_request, encode_reply, envelope_problem, reply_seq, salvage_seq
from workers.commit import Committer, Request
from workers.seldom import Seldom
from workers.writer_stats import Stats

log = logging.getLogger("tickstack.writer")

#: The queue's byte budget, in maximum-size messages (estimated decoded size).
QUEUE_BUDGET_MESSAGES = 16
#: The largest batch (estimated decoded bytes) the IO thread commits itself when the commit thread
#: is idle (:meth:`Intake.dispatch`): a few dozen small requests (an ``audit`` counts about 1,300,
#: a one-tick ``insert_ticks`` 2,600), never a bulk insert's columns.
IO_BATCH_BYTES = 64 * 1024
_MORE = zmq.SNDMORE | zmq.NOBLOCK


class Intake:
    """The IO thread's half of the writer: what it took, what it queued, what it answers. Only the IO
    thread calls it."""

    def __init__(self, settings: Settings, stats: Stats, requests: queue.Queue[Any]) -> None:
        self.settings = settings
        self.stats = stats
        self.queue = requests
        #: What a ping answers: with the database it writes (no password; not in its stats, which
        #: /api/health serves without a login), so that ``db doctor`` in a shell whose settings name
        #: another database says so.
        #: And its message limit: a client set with a larger one learns why a request got no answer
        #: (:meth:`db.client.WriterClient._refuse_too_big`).
        self.ping_result = {"pid": os.getpid(), "protocol": PROTOCOL, "database": display_url(settings.database_url),
                            "max_message": settings.writer_max_message}
        # Bytes queued = accepted (here) - released (by the commit thread):
        # each counter has one writing thread, so neither needs a lock.
        self.queue_budget = QUEUE_BUDGET_MESSAGES * settings.writer_max_message
        self.accepted_bytes = 0
        #: Requests taken in the current read of the socket, not yet committed or queued.
        self.pending: list[Request] = []
        self.pending_bytes = 0
        #: Whether small batches may be committed on the IO thread (:meth:`dispatch`); set at start.
        self.commits_here = False
        #: The writer's commit thread's state, once the database is open.
        self.committer: Committer | None = None
        #: Lines of what a client can make happen thousands of times a second, now and then.
        self._undecodable = Seldom(log, logging.WARNING, 10.0)
        self._out_of_memory_said = Seldom(log, logging.ERROR, 60.0, burst=1)

    def forward_replies(self, replies_in: zmq.Socket, router: zmq.Socket) -> None:
        """Send the replies of the batches the commit thread committed: take the doorbell's
        rings first, then the outbox, so a batch whose ring comes later is sent now or at that
        ring (never left behind)."""
        try:
            while True:
                replies_in.recv(zmq.NOBLOCK)
        except zmq.Again:
            pass
        assert self.committer is not None
        outbox = self.committer.outbox
        while outbox:
            for ident, payload in outbox.popleft():
                self.send(router, ident, payload)

    def accept(self, router: zmq.Socket, frames: list[bytes]) -> None:
        """Decode one request; answer ping/stats/errors now, queue ops."""
        ident = frames[0]
        if len(frames) != 2:
            self.stats.malformed += 1
            self.send(router, ident, encode_reply(None, error=ValidationError(
                f"expected one message frame, got {len(frames) - 1}")))
            return
        payload = frames[1]
        if len(payload) > self.settings.writer_max_message:
            self.stats.malformed += 1
            self.send(router, ident, encode_reply(salvage_seq(payload), error=ValidationError(
                f"message of {len(payload)} bytes is over the limit of {self.settings.writer_max_message} "
                "(TICKSTACK_WRITER_MAX_MESSAGE)")))
            return
        try:
            msg, cost = decode_request(payload)
        except ValidationError as e:
            self.stats.malformed += 1
            self._undecodable.say("writer: undecodable request (%d bytes): %s", len(payload), e)
            self.send(router, ident, encode_reply(salvage_seq(payload), error=e))
            return
        seq = reply_seq(msg)
        problem = envelope_problem(msg)
        if problem:
            self.stats.malformed += 1
            self.send(router, ident, encode_reply(seq, error=ValidationError(problem)))
            return
        name = msg["op"]
        if name == "ping":
            self.send(router, ident, encode_reply(seq, result=self.ping_result))
        elif name == "stats":
            self.send(router, ident, encode_reply(seq, result=self.stats.report(self.queue.qsize(),
                                                                                   self.queued_bytes)))
        elif self.committer is not None and self.committer.refusing is not None:
            self.stats.requests_failed += 1
            self.send(router, ident, encode_reply(seq, error=CommitFailed(self.committer.refusing)))
        elif not self._enqueue(Request(ident, msg["cid"], seq, name, msg.get("args"), cost)):
            self.stats.busy_replies += 1
            self.send(router, ident, encode_reply(seq, busy=True))

    @property
    def queued_bytes(self) -> int:
        """Estimated bytes of the requests taken and not yet answered (in this read's batch, queued,
        or in the batch being committed)."""
        return self.accepted_bytes - (self.committer.released_bytes if self.committer is not None else 0)

    def _enqueue(self, req: Request) -> bool:
        """Take ``req`` unless the queue (with this read's requests) is full in requests or in bytes
        (when it is empty any request is taken, so a large one is never refused for ever). It joins
        this read's batch (:attr:`pending`), which the IO thread may commit itself
        (:meth:`dispatch`); as soon as the batch cannot be, it goes to the commit thread, which
        starts on it while this thread reads on."""
        queued = self.queued_bytes
        if queued > 0 and queued + req.cost > self.queue_budget:
            return False
        if self.queue.qsize() + len(self.pending) >= self.queue.maxsize:
            return False
        self.accepted_bytes += req.cost  # before the commit thread can release it
        self.pending.append(req)
        self.pending_bytes += req.cost
        spec = OPS.get(req.op)
        if not (self.commits_here and self.pending_bytes <= IO_BATCH_BYTES
                and len(self.pending) <= self.settings.writer_max_batch
                and (spec is None or (spec.transactional and spec.quick))  # unknown: answered at once
                and self.committer is not None and self.committer.idle()):
            self._queue_pending()
        return True

    def _queue_pending(self) -> None:
        for req in self.pending:
            self.queue.put_nowait(req)  # room checked in _enqueue; only this thread puts
        self.pending.clear()
        self.pending_bytes = 0

    def dispatch(self, router: zmq.Socket, replies_in: zmq.Socket) -> None:
        """At the end of a read of the socket: commit the requests :meth:`_enqueue` kept here.

        Only on SQLite, only a small batch (at most ``IO_BATCH_BYTES`` as decoded), of ops whose
        work grows with the request alone (``db.ops.Op.quick``; not a checkpoint), with no
        ``writer_batch_wait`` to wait for more, and only while the commit thread is idle: then it
        is committed here, by the same code, acknowledged only after its COMMIT. Handing it to the
        commit thread and its replies back cost two hand-overs between Python threads (about 90 us
        each on this machine), more than such a batch's whole commit, and when producers wait for
        each answer they set the rate (README, Benchmarks). The replies the commit thread gave
        before are sent first, so a client's answers keep their order. Nothing here waits on a lock or
        on work that grows with the tables: a batch goes to the commit thread, nothing of it
        committed, when a program that is not the writer holds SQLite's write lock (its BEGIN is
        taken with busy_timeout 0 and kept for the batch), when the record of applied requests is
        due for its prune, when an op fails in the fast run (the careful run begins again), or
        when a failure here left the connection closed (opening one sets pragmas that can wait:
        :meth:`Committer.commit_here`). Everything else went to the commit thread as it came: a
        bulk write's commit runs there while this thread decodes the next, and no ping waits behind
        a bulk commit or a lock. A PostgreSQL commit is a round trip to a server that may stall:
        every one stays there."""
        if not self.pending:
            return
        committer = self.committer
        assert committer is not None
        batch, cost = self.pending, self.pending_bytes
        try:
            if committer.outbox:  # the replies of what was committed before first (none: no ring to take)
                self.forward_replies(replies_in, router)
            replies = committer.commit_here(batch)
        except Exception:  # a bug of this path: the commit thread takes the batch, as before it
            log.exception("writer: committing %d requests on the IO thread failed; the commit thread "
                          "takes them", len(batch))
            replies = None
        if replies is None:
            self._queue_pending()
            return
        self.pending, self.pending_bytes = [], 0
        for ident, payload in replies:
            self.send(router, ident, payload)
        self.accepted_bytes -= cost

    @staticmethod
    def send(router: zmq.Socket, ident: bytes, payload: bytes) -> None:
        # Two sends, as send_multipart makes them, without its checks of each part (a third of a
        # small reply's cost). A ROUTER socket drops a reply to a peer that is gone or full, whole.
        try:
            router.send(ident, _MORE)
            router.send(payload, zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.debug("writer: reply dropped: %s", e)

    def flush_logs(self) -> None:
        """Say what the throttled lines left unsaid once their period is over (:meth:`Seldom.flush`)."""
        self._undecodable.flush()
        self._out_of_memory_said.flush()

    def out_of_memory(self, router: zmq.Socket, frames: list[bytes] | None = None) -> None:
        """A request the process had no memory for (a memory limit, many large requests at once), and
        the writer serves on; said once a minute at most. Reading it (``frames`` None): the rest of its
        frames are dropped without a copy, and its client sends it again when no answer comes.
        Handling it, read (``frames``: its digest is as large again): answered that it may be sent
        again (:class:`db.errors.WriterUnavailable`), as it may: it was not queued."""
        self.stats.malformed += 1
        if frames is None:
            while router.getsockopt(zmq.RCVMORE):
                router.recv(zmq.NOBLOCK, copy=False)
            self._say_out_of_memory("reading", "dropped, its client sends it again")
            return
        self._say_out_of_memory("handling", "refused, its client may send it again")
        try:
            self.send(router, frames[0], encode_reply(salvage_seq(frames[-1]), error=WriterUnavailable(
                "the writer ran out of memory handling this request (a memory limit, or many large requests "
                "at once); send it again")))
        except MemoryError:  # not even for the answer: its client sends it again when none comes
            pass

    def _say_out_of_memory(self, doing: str, outcome: str) -> None:
        self._out_of_memory_said.say("writer: out of memory %s a request (a memory limit, or many requests near "
                                     "TICKSTACK_WRITER_MAX_MESSAGE at once); %s", doing, outcome)
