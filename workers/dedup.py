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
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from sqlalchemy.engine import Connection

from db import ops
from db.errors import RequestIdReused
from db.validation import shown

#: A request's digest (None: not known) and its packed result, as recorded.
Applied = tuple[bytes | None, bytes]


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
