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

The record is pruned of what is older than ``TICKSTACK_DEDUP_TTL`` (:meth:`AppliedRequests.prune`,
once a minute), by a clock of its own (:meth:`AppliedRequests.clock_ms`): milliseconds that advance
only while a writer runs (the monotonic clock), on from the newest record a writer left. By the wall
clock, a jump forward made every record old: two hours forward and the next prune forgot them all,
and a request applied seconds before, sent again after a writer restart, was applied twice (fault
hunt, round 40; a suspended and resumed machine does the same). A record so outlives a writer's
downtime, which only keeps it for the retries that come after it.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Protocol

from sqlalchemy.engine import Connection

from db import ops
from db.errors import RequestIdReused
from db.validation import shown

#: A request's digest (None: not known) and its packed result, as recorded.
Applied = tuple[bytes | None, bytes]
#: Seconds between two prunes of the record (:meth:`AppliedRequests.prune`).
PRUNE_EVERY_S = 60.0

log = logging.getLogger("tickstack.writer")


class Identified(Protocol):
    """What of a request the look-up needs (:class:`workers.commit.Request` has it)."""

    cid: str
    seq: int
    op: str
    digest: bytes | None


class AppliedRequests:
    """The recent results and each client's highest seq on record, bounded to ``most`` entries each
    (the oldest forgotten first: they are looked up in the database again)."""

    def __init__(self, most: int = 100_000) -> None:
        self.most = most
        # Results of recently committed requests, for retries without a query.
        self.recent: OrderedDict[tuple[str, int], Applied] = OrderedDict()
        # Per client, the highest seq that may be on record: requests above it are new.
        self.known_top: OrderedDict[str, int] = OrderedDict()
        #: The record's clock (:meth:`clock_ms`): its value at ``_since`` (monotonic), once read.
        self._clock_at: int | None = None
        self._since = 0.0
        self.last_prune = 0.0

    def clock_ms(self, conn: Connection) -> int:
        """Now by the record's clock (see the module docstring): read once from the newest record
        (the wall clock's now for an empty record), then on with the monotonic clock."""
        if self._clock_at is None:
            newest = ops.newest_applied(conn)
            self._clock_at, self._since = (ops.now_ms() if newest is None else newest + 1), time.monotonic()
        return self._clock_at + int((time.monotonic() - self._since) * 1000)

    def prune_due(self) -> bool:
        """Whether the record is due for its prune (once every :data:`PRUNE_EVERY_S`)."""
        return time.monotonic() - self.last_prune >= PRUNE_EVERY_S

    def prune(self, conn: Connection, ttl: float) -> int:
        """Forget the requests applied more than ``ttl`` seconds ago by the record's clock, in ``conn``'s
        transaction (a batch's: it costs no commit of its own); how many."""
        self.last_prune = time.monotonic()
        pruned = ops.prune_applied(conn, self.clock_ms(conn) - int(ttl * 1000))
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
        """After a batch committed: its requests are the most recent, and raise their clients' tops."""
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
