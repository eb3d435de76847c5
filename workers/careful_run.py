"""The careful run of a batch on the writer's commit thread (:mod:`workers.commit`): each request with
its record as applied in a savepoint of its own (:func:`run_in_savepoint`), and a request whose error
took the whole transaction with it taken out of its batch (:func:`take_out`).

A batch runs carefully when any op or the record of applied requests raised in its fast run: nothing
of the fast run is kept (rolled back) and the batch runs again, each request with its record in a
savepoint of its own, so one bad request fails alone, with the error it gets when it runs after the
same requests before it, and a request is never applied without its record. The failing request runs
again too, on purpose: its error then comes from the same place as ever (a full disk, a lost
transaction, a bug of the op are told apart as :func:`run_in_savepoint` does), not from a guess about
the first run. The batch keeps its number. One exception: a request that lost a race with another
session (PostgreSQL: a lock held past ``TICKSTACK_LOCK_TIMEOUT_MS``, a deadlock) is answered
retryably without running again, since it would most likely wait out the timeout a second time with
the whole batch behind it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgpack
from sqlalchemy.engine import Connection

from db import ops
from db.errors import OpFailed, WriterError, named_database_words
from db.protocol import encode_reply
from db.validation import shown
from workers.answers import Answers
from workers.write_request import Request
from workers.writer_stats import Stats

log = logging.getLogger("tickstack.writer")


class TransactionLost(Exception):
    """A request's error took the batch's transaction with it (its savepoint
    cannot roll back): see :func:`take_out`."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.request: Request | None = None


def run_in_savepoint(conn: Connection, req: Request, spec: ops.Op, args: dict, stamp: int,
                     answers: Answers) -> tuple[Any, bytes, WriterError | None]:
    """The op and its record as applied, in a savepoint of their own: any error of any class rolls
    back both and fails this request alone (answered as ``answers`` says)."""
    savepoint = conn.begin_nested()
    try:
        result = ops.execute(conn, spec, args)
        packed = msgpack.packb(result)
        ops.record_applied(conn, req.cid, req.seq, packed, req.digest, stamp)
    except Exception as e:
        try:
            savepoint.rollback()
        except Exception:  # the transaction went with it (SQLite may roll it all back on a full disk)
            raise TransactionLost(e) from e
        return None, b"", answers.op_error(spec, e)
    try:
        savepoint.commit()
    except Exception as e:
        raise TransactionLost(e) from e
    return result, packed, None


def take_out(batch: list[Request], lost: TransactionLost, losses: set[str], stats: Stats, answers: Answers,
             run_rest: Callable[[list[Request]], list[tuple[bytes, bytes]]]) -> list[tuple[bytes, bytes]]:
    """One request's error rolled back the whole transaction (a trigger's
    RAISE(ROLLBACK), an I/O error): that request fails for good, since
    running it again would do the same, and the others run again at once
    in a new transaction (``run_rest``), so one bad request never holds up its batch. When a second
    request of the same batch does it with the same error (``losses``: the errors that took this
    batch's transaction so far), the database is failing (a disk failing every read), not the
    requests: the rest are answered retryably, and the recursion (one level per request taken out)
    stays shallow whatever the batch's size. The replies of the whole batch, in request order."""
    i = next(i for i, req in enumerate(batch) if req is lost.request)
    culprit = batch[i]
    said = named_database_words(lost.cause)
    if said in losses:  # a second request lost the transaction the same way: not a request's doing
        log.error("writer: a second request of the batch (%s of client %s) rolled it back with the same error "
                  "(%s): the database fails, not a request; the %d left are answered retryably",
                  shown(culprit.op), culprit.cid, said, len(batch))
        stats.commit_failures += 1
        error = answers.batch_error(lost.cause)
        return [(req.ident, encode_reply(req.seq, error=error)) for req in batch]
    losses.add(said)
    log.error("writer: %s of client %s rolled back its whole batch (%s); it fails, the other %d run again",
              shown(culprit.op), culprit.cid, said, len(batch) - 1)
    stats.requests_failed += 1
    failed = (culprit.ident, encode_reply(culprit.seq, error=OpFailed(
        f"{shown(culprit.op)} failed and rolled back its transaction: {said}")))
    rest = run_rest(batch[:i] + batch[i + 1:]) if len(batch) > 1 else []
    return [*rest[:i], failed, *rest[i:]]
