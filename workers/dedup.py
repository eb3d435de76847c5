"""The writer's memory of applied requests (:class:`AppliedRequests`, used by whichever thread
commits a batch): whether a request's (client id, seq) was applied already, and if so whether by
this same request (a resend: the first answer again) or by a different one
(:class:`~db.errors.RequestIdReused`, nothing applied).

Three places to look, cheapest first: the results of recently committed requests (no query), the
batch's own requests committed before this one, and the database's record (``applied_requests``),
which it asks only for a seq at or below the highest it knows of for the client: a client's seqs only
grow, so anything above is new (the common case, saving a query each). Each place keeps the
request's digest (:func:`db.protocol.request_digest`) beside its packed result; a record without one
(made before schema v4) is not compared.

The record is pruned of what is older than ``TICKSTACK_DEDUP_TTL`` by the wall clock
(:meth:`AppliedRequests.prune`, once a minute), the clock every writer and direct write stamps it
with, whatever the host. A jump of that clock forward made every record old: two hours forward and
the next prune forgot them all, and a request applied seconds before, sent again after a writer
restart, was applied twice (fault hunt, round 40). So each batch looks at the wall clock against the
monotonic one (:meth:`AppliedRequests.begin_batch`): after a jump forward of more than
:data:`JUMP_MS`, the records made before it are moved forward as far, in the batch's transaction,
and stay as young as they are. And a writer prunes nothing that was among the newest records when it
started until it has run ``TICKSTACK_DEDUP_TTL`` itself: a jump while no writer ran, or a writer
killed between a jump and its next batch, does not make them old either. (A first version aged the
records by the writer's run time alone; an adversarial review showed that direct writes, other
hosts' writers and a record stamped in the future by an old jump then disagreed with it.) That held
in the writer's memory only: the writer after it, started seconds later, went by its newest record,
stamped after the jump, and forgot every record made before, seconds old (fault hunt, stop 53). So
the time since the newest record when a writer starts (more than :data:`JUMP_MS`: a downtime, or a
jump while none ran) moves the records as far too, in its first batch. And a step of the clock back
seen between two batches moves back as far the records stamped after its new now (all made before
the step): they stayed the newest, and the writer after it, started once the clock was put forward
again, pruned by them every record made after the step (fault hunt, stop 53). So does a writer's
first batch, for a step back while no writer ran (records stamped ahead of its now).

On PostgreSQL that clock is the server's (:func:`db.ops.record_clock_ms`): every host's writer prunes the
one record, and each stamped and pruned it by its own host's clock, so with one host's clock two hours
slow (or another's two hours fast: a clock kept in local time) the other's next prune forgot every
request the first had applied a moment before, and a resend after its writer's restart was applied
twice (an adversarial review of several hosts). A writer goes by its own clock plus its offset from
the server's (:class:`db.server_clock.ServerClock`, read once a minute): no query per batch.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from sqlalchemy.engine import Connection

from db import ops
from db.errors import RequestIdReused
from db.server_clock import ServerClock, server_now_ms
from db.validation import shown

#: A request's digest (None: not known) and its packed result, as recorded.
Applied = tuple[bytes | None, bytes]
#: Seconds between two prunes of the record (:meth:`AppliedRequests.prune`).
PRUNE_EVERY_S = 60.0
#: A jump of the wall clock forward, against the monotonic clock between two batches, that moves the
#: records made before it (ms): more than a clock's correction by NTP, less than any TTL (60 s at least).
JUMP_MS = 30_000

log = logging.getLogger("tickstack.writer")


class Identified(Protocol):
    """What of a request the look-up needs (:class:`workers.write_request.Request` has it)."""

    cid: str
    seq: int
    op: str
    digest: bytes | None


class AppliedRequests:
    """The recent results and each client's highest seq on record, bounded to ``most`` entries each
    (the oldest forgotten first: they are looked up in the database again)."""

    def __init__(self, most: int = 100_000, wall_clock: Callable[[], float] = time.time,
                 server_clock: Callable[[Connection], int] = server_now_ms) -> None:
        self.most = most
        # Results of recently committed requests, for retries without a query.
        self.recent: OrderedDict[tuple[str, int], Applied] = OrderedDict()
        # Per client, the highest seq that may be on record: requests above it are new.
        self.known_top: OrderedDict[str, int] = OrderedDict()
        self.last_prune = 0.0
        self._wall_clock = wall_clock
        #: On a server, the record's clock: the server's (:meth:`_now_ms`).
        self._server = ServerClock(wall_clock, server_clock)
        #: The wall clock (ms) and the monotonic clock at the last batch that committed; the seed, the
        #: newest record when this writer started (not after the wall clock then) and when it was read
        #: (monotonic); both as the batch in hand has them, until it commits (:meth:`remember`).
        self._seen: tuple[int, float] | None = None
        self._seed: tuple[int, float] | None = None
        self._batch: tuple[tuple[int, float], tuple[int, float]] | None = None

    def begin_batch(self, conn: Connection) -> int:
        """In a batch's transaction, before its records: the wall clock's now in ms (their stamp). After a
        jump of the wall clock forward since the last batch, or in a writer's first, the time since the newest
        record, the records made before it are moved as far; after a step back (or in a writer's first batch,
        records stamped ahead of now), those stamped after the new now are moved back as far (see the module
        docstring). In this transaction: a batch that does not commit moves nothing."""
        wall, mono = self._now_ms(conn), time.monotonic()
        seed = self._seed
        if seed is None:
            newest = ops.newest_applied(conn)
            if newest is not None and self._follow_clock(conn, newest, wall, "the newest record (no writer ran, or "
                                                         "the clock stepped meanwhile)", logging.INFO):
                newest = wall
            seed = (wall if newest is None else min(newest, wall), mono)
        elif self._seen is not None:
            expected = self._seen[0] + int((mono - self._seen[1]) * 1000)
            jump = self._follow_clock(conn, expected, wall, "where the monotonic clock puts it since the last "
                                      "batch", logging.WARNING)
            if jump > 0:
                seed = (seed[0] + jump, seed[1])
        self._batch = ((wall, mono), seed)
        return wall

    @staticmethod
    def _follow_clock(conn: Connection, expected: int, wall: int, where: str, forward_level: int) -> int:
        """The records moved as far as the record clock's now, ``wall``, stands from ``expected`` (ms), when
        that is more than :data:`JUMP_MS` either way (see the module docstring): forward, those stamped at or
        before ``expected``; back, only those stamped after ``wall`` (made before the step). Returns the move
        (ms; 0: none). ``where``: what ``expected`` is, for the log line; ``forward_level``: its level when the
        clock is ahead (a step back is always a WARNING)."""
        jump = wall - expected
        if abs(jump) <= JUMP_MS:
            return 0
        moved = ops.shift_applied(conn, expected, jump, after=None if jump > 0 else wall)
        log.log(forward_level if jump > 0 else logging.WARNING,
                "writer: the wall clock is %.0f s %s %s; the %d records of applied requests %s are moved as far, so "
                "that none is forgotten early and the newest record is the newest made", abs(jump) / 1000,
                "ahead of" if jump > 0 else "behind", where, moved,
                "made before" if jump > 0 else "stamped after its time")
        return jump

    def _now_ms(self, conn: Connection) -> int:
        """The record's clock now (ms): this host's wall clock on SQLite, the server's on a server (its
        offset read in this batch's transaction when stale)."""
        if conn.dialect.name == "sqlite":
            return int(self._wall_clock() * 1000)
        if self._server.stale():
            self._server.read(conn)
        return self._server.now_ms()

    def prune_due(self) -> bool:
        """Whether the record is due for its prune (once every :data:`PRUNE_EVERY_S`)."""
        return time.monotonic() - self.last_prune >= PRUNE_EVERY_S

    def prune(self, conn: Connection, ttl: float) -> int:
        """In a batch's transaction (after :meth:`begin_batch`; it costs no commit of its own): forget the
        requests applied more than ``ttl`` seconds ago by the wall clock, and none of the newest at this
        writer's start until it has run ``ttl`` itself; how many."""
        assert self._batch is not None, "prune runs in a batch, after begin_batch"
        (wall, mono), (seed, seeded_at) = self._batch
        self.last_prune = time.monotonic()
        ttl_ms = int(ttl * 1000)
        pruned = ops.prune_applied(conn, min(wall - ttl_ms, seed - ttl_ms + int((mono - seeded_at) * 1000)))
        if pruned:
            log.info("writer: forgot %d applied requests older than %.0f s", pruned, ttl)
        return pruned

    def prior(self, conn: Connection, req: Identified, committed: dict[tuple[str, int], Applied]) -> bytes | None:
        """The packed result of the request applied under ``req``'s id (``committed``: the batch's so
        far), or None when the id is new. Raises :class:`RequestIdReused` when that request asked
        for something else than ``req``."""
        key = (req.cid, req.seq)
        found = self.recent.get(key) or committed.get(key)
        if found is None and req.seq <= self._known_top(conn, req.cid):
            found = ops.lookup_applied(conn, req.cid, req.seq)
        if found is None:
            return None
        digest, packed = found
        if digest is not None and req.digest is not None and digest != req.digest:
            raise RequestIdReused(f"request {req.seq} of client {req.cid} ({shown(req.op)}) reuses an id already "
                                  "applied to a different request: nothing of it was applied, and a new request "
                                  "needs a new (client id, seq)")
        return packed

    def remember(self, committed: dict[tuple[str, int], Applied]) -> None:
        """After a batch committed: its requests are the most recent, and raise their clients' tops; the
        clocks it read (:meth:`begin_batch`) are the ones the next batch compares with."""
        if self._batch is not None:
            self._seen, self._seed = self._batch
            self._batch = None
        for key, applied in committed.items():
            self.recent[key] = applied
            cid, seq = key
            self.known_top[cid] = max(self.known_top.get(cid, 0), seq)
        while len(self.recent) > self.most:
            self.recent.popitem(last=False)

    def _known_top(self, conn: Connection, cid: str) -> int:
        top = self.known_top.get(cid)
        if top is None:
            top = self.known_top[cid] = ops.last_applied_seq(conn, cid)
            while len(self.known_top) > self.most:
                self.known_top.popitem(last=False)  # forgotten clients are looked up again
        else:
            self.known_top.move_to_end(cid)
        return top
