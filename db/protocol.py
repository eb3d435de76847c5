"""The writer's wire protocol, in one place for both ends.

A request is one msgpack map in one ZeroMQ frame::

    {"v": 1, "cid": "<client id, 1-64 chars>", "seq": <int >= 0>, "op": "<name>", "args": {...}}

``(cid, seq)`` names the request for idempotent retries. A reply is one map::

    {"v": 1, "seq": <the request's seq>, "ok": true, "result": ..., "batch": <commit batch no>}
    {"v": 1, "seq": ..., "ok": false, "error": {"type": "ValidationError", "message": "..."}}
    {"v": 1, "seq": ..., "ok": false, "busy": true, "error": {...}}     queue full: back off, resend

:class:`db.client.WriterClient` encodes requests with :func:`encode_request`;
the writer (:mod:`workers.writer`) checks them with :func:`envelope_problem`
and answers with :func:`encode_reply`.
"""
from __future__ import annotations

from typing import Any

import msgpack

PROTOCOL = 1
ENVELOPE_FIELDS = frozenset({"v", "op", "seq", "cid", "args"})


def encode_request(cid: str, seq: int, op: str, args: dict[str, Any]) -> bytes:
    """One request frame; raises TypeError/ValueError/OverflowError for arguments msgpack cannot carry."""
    return msgpack.packb({"v": PROTOCOL, "cid": cid, "seq": seq, "op": op, "args": args})


def envelope_problem(msg: Any) -> str | None:
    """What is wrong with a decoded request's envelope, in words; None when it is well formed."""
    if type(msg) is not dict:
        return f"request must be a map, got {type(msg).__name__}"
    if type(msg.get("op")) is not str:
        return "request has no op name"
    if type(msg.get("seq")) is not int or msg["seq"] < 0:
        return "request has no sequence number (seq, an integer >= 0)"
    cid = msg.get("cid")
    if type(cid) is not str or not 1 <= len(cid) <= 64:
        return "request has no client id (cid, 1-64 characters)"
    if msg.get("args") is not None and type(msg["args"]) is not dict:
        return "args must be a map"
    extra = set(msg) - ENVELOPE_FIELDS
    if extra:
        return f"unexpected request field {sorted(map(str, extra))[0]!r}"
    return None


def encode_reply(seq: Any, *, result: Any = None, error: BaseException | None = None, busy: bool = False,
                 batch: int | None = None) -> bytes:
    """One reply frame: the result, the error (its class name is the type the client raises), or busy."""
    msg: dict[str, Any] = {"v": PROTOCOL, "seq": seq, "ok": error is None and not busy}
    if busy:
        msg["busy"] = True
        msg["error"] = {"type": "Busy", "message": "writer queue is full; retry with backoff"}
    elif error is not None:
        msg["error"] = {"type": type(error).__name__, "message": str(error)}
    else:
        msg["result"] = result
    if batch is not None:
        msg["batch"] = batch
    return msgpack.packb(msg)
