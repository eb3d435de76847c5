"""The writer's wire protocol, in one place for both ends.

A request is one msgpack map in one ZeroMQ frame::

    {"v": 1, "cid": "<client id, 1-64 printable chars>", "seq": <int, 0 <= seq < 2**63>, "op": "<name>", "args": {...}}

``(cid, seq)`` names the request for idempotent retries. A reply is one map::

    {"v": 1, "seq": <the request's seq>, "ok": true, "result": ..., "batch": <commit batch no>}
    {"v": 1, "seq": ..., "ok": false, "error": {"type": "ValidationError", "message": "..."}}
    {"v": 1, "seq": ..., "ok": false, "busy": true, "error": {...}}     queue full: back off, resend

:class:`db.client.WriterClient` encodes requests with :func:`encode_request`;
the writer (:mod:`workers.writer`) checks them with :func:`envelope_problem`
and answers with :func:`encode_reply`.

Decoding is bounded in memory, not only in bytes (:func:`decode_request`):
msgpack builds a Python object for every item, and an item may take one byte
on the wire but 60-80 bytes decoded (an empty map, a two-letter string), so a
16 MiB frame of empty maps once took the writer from 52 MiB to 1.2 GiB. Each
array or map may hold at most :data:`MAX_CONTAINER_LEN` items (msgpack's own
``max_*_len`` limits, refused before anything is built) and a request at most
:data:`MAX_ITEMS` in all (counted as containers are built), which is twice
the largest request any op accepts; :func:`decode_request` also returns what
the request may cost in memory, for the writer's queue budget.

**Packed columns.** In the columns form of bulk ops (:data:`PACKED_ARGS`), a
column of numbers may travel as one msgpack extension value: little-endian
float64 (:data:`EXT_FLOAT64`) or int64 (:data:`EXT_INT64`), 8 bytes a value,
decoded into an ``array.array`` with one copy. It means exactly the list it
was packed from (``array.tolist()``), so the validators give the same verdict
and the same message for either; what it saves is a Python object per value
to decode and to type-check, which is most of the writer's cost per tick.
:func:`pack_columns` packs a column only when every value has the one type
(all ``float`` or all ``int`` within 64 bits), so anything unusual still goes
as a list and gets its precise error. Plain msgpack lists stay valid.
"""
from __future__ import annotations

import hashlib
import sys
from array import array
from typing import Any

import msgpack

from db.errors import ValidationError
from db.validation import MAX_ROWS, MAX_TICKS, shown

PROTOCOL = 1
ENVELOPE_FIELDS = frozenset({"v", "op", "seq", "cid", "args"})
#: ``seq`` is stored in a signed 64-bit column (the record of applied requests).
MAX_SEQ = 2**63 - 1
#: Ops the writer's IO thread answers itself (workers/writer.py): never recorded as applied, so
#: their ids need not be new.
UNRECORDED_OPS = frozenset({"ping", "stats"})
#: Items in one array or map: the largest batch an op takes, with room for
#: its own clear "too many" message.
MAX_CONTAINER_LEN = 4 * max(MAX_TICKS, MAX_ROWS)
#: Items in one request (each container, array element, map key and map
#: value): the largest op request (``store_analysis`` with 10,000 bars of 9
#: fields and 10,000 indicator values of 5) counts about 320,000.
MAX_ITEMS = 64 * MAX_ROWS
#: What one decoded item may take in memory, at most (a short string or an
#: empty map, with its slot in the container that holds it).
ITEM_BYTES = 80
#: Bytes over its ``writer_max_message`` a frame may have and still be read and answered by the writer
#: (that it is too big); a longer one closes its peer's connection unread (ZeroMQ's ``MAXMSGSIZE``).
MAX_MESSAGE_SLACK = 64 * 1024


#: msgpack extension types of packed columns, and the ``array`` type code each decodes into.
EXT_FLOAT64 = 1
EXT_INT64 = 2
_TYPECODE = {EXT_FLOAT64: "d", EXT_INT64: "q"}
_EXT = {"d": EXT_FLOAT64, "q": EXT_INT64}
#: Ops and the arguments of theirs that may hold columns (an object of equal-length lists).
PACKED_ARGS = {"insert_ticks": ("ticks",), "store_analysis": ("bars", "indicators")}
#: Shorter columns go as lists: packing them saves less than it costs.
PACK_MIN = 16
_SWAP = sys.byteorder != "little"


def encode_request(cid: str, seq: int, op: str, args: dict[str, Any]) -> bytes:
    """One request frame; raises TypeError/ValueError/OverflowError for arguments msgpack cannot
    carry. ``array.array`` values of type ``d`` or ``q`` go as packed columns."""
    return msgpack.packb({"v": PROTOCOL, "cid": cid, "seq": seq, "op": op, "args": args}, default=_pack_array)


def _pack_array(obj: Any) -> msgpack.ExtType:
    if type(obj) is array and obj.typecode in _EXT:
        if _SWAP:
            obj = array(obj.typecode, obj)
            obj.byteswap()
        return msgpack.ExtType(_EXT[obj.typecode], obj.tobytes())
    raise TypeError(f"can not serialize {type(obj).__name__!r} object")


def request_digest(op: str, args: Any) -> bytes:
    """What a request asks for, in 16 bytes, recorded with it as applied: another request under the
    same (client id, seq) is told apart from a resend of it by this (:class:`db.errors.RequestIdReused`).

    Of the op and the arguments as :func:`decode_request` gave them, with their number columns as
    :func:`pack_columns` makes them, packed again as :func:`encode_request` packs: so a column sent
    packed once and as a plain list (or a tuple, or a numpy array made a list) the next time is the
    same request, as the writer runs both the same. The frame's own bytes cannot be hashed without
    the envelope. What it does not absorb is a map's keys in another order: that counts as another
    request (``WriterClient`` sends the same bytes again). SHA-256 cut to 16 bytes: about twice as
    fast as BLAKE2 here (``timeit``), and no accidental collision to fear."""
    # No args and empty args are the same request (the writer runs both with none).
    body = msgpack.packb((op, pack_columns(op, args) if type(args) is dict else {} if args is None else args),
                         default=_pack_array)
    return hashlib.sha256(body).digest()[:16]


def pack_columns(op: str, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with the number columns of :data:`PACKED_ARGS` as arrays (packed on the wire): a
    column of floats as float64, of ints as int64; any other column (mixed types, None, bool, an
    int beyond 64 bits, fewer than :data:`PACK_MIN` values) as it is. Never changes the caller's
    objects."""
    names = PACKED_ARGS.get(op)
    if not names:
        return args
    out = None
    for name in names:
        value = args.get(name)
        if type(value) is not dict:
            continue
        packed = {key: _packed(col) for key, col in value.items()}
        if any(packed[k] is not value[k] for k in packed):
            out = dict(args) if out is None else out
            out[name] = packed
    return args if out is None else out


def _packed(col: Any) -> Any:
    if type(col) is not list or len(col) < PACK_MIN:
        return col
    # Packed only if every value is a float, or every one an int: a column whose first value is
    # neither (text: symbol, timeframe) is not, and its thousands of values need no look (the client
    # packs every bulk request, and the writer again for its digest).
    first = type(col[0])
    if first is not float and first is not int:
        return col
    types = set(map(type, col))
    if types == {float}:
        return array("d", col)
    if types == {int}:
        try:
            return array("q", col)
        except OverflowError:  # beyond 64 bits: the writer says what is wrong with it
            return col
    return col


def client_id_problem(cid: Any) -> str | None:
    """What is wrong with a client id, in words; None when it is one: 1-64 printable characters. Printable:
    a NUL SQLite stored, and PostgreSQL's text refused with an error naming its SQL; a newline or an escape
    sequence went raw into the writer's log lines that name a client (fault hunt, stop 53)."""
    if type(cid) is not str or not 1 <= len(cid) <= 64:
        return f"client id {shown(cid)} is not 1-64 characters of text"
    if not cid.isprintable():
        return f"client id {shown(cid)} holds a character that is not printable (a control, format or separator one)"
    return None


def envelope_problem(msg: Any) -> str | None:
    """What is wrong with a decoded request's envelope, in words; None when it is well formed."""
    if type(msg) is not dict:
        return f"request must be a map, got {type(msg).__name__}"
    if type(msg.get("op")) is not str or not 1 <= len(msg["op"]) <= 64:
        return "request has no op name (op, 1-64 characters)"
    if type(msg.get("seq")) is not int or not 0 <= msg["seq"] <= MAX_SEQ:
        return f"request has no sequence number (seq, an integer 0..{MAX_SEQ}, i.e. below 2^63)"
    cid = msg.get("cid")
    if type(cid) is not str or not 1 <= len(cid) <= 64:
        return "request has no client id (cid, 1-64 characters)"
    said = client_id_problem(cid)
    if said is not None:
        return said
    if msg.get("args") is not None and type(msg["args"]) is not dict:
        return "args must be a map"
    if "v" in msg and (type(msg["v"]) is not int or msg["v"] != PROTOCOL):  # true == 1 in Python
        return f"protocol version {shown(msg['v'])} is not supported (this writer speaks {PROTOCOL})"
    extra = set(msg) - ENVELOPE_FIELDS
    if extra:
        return f"unexpected request field {shown(min(map(str, extra)))}"
    return None


def decode_request(payload: bytes) -> tuple[Any, int]:
    """Decode a request frame within the decode limits; returns the message and
    the most memory it may take (its bytes plus :data:`ITEM_BYTES` per item).
    Raises ValidationError when the frame is not msgpack or is over a limit."""
    items = 0

    def count(container: Any) -> Any:
        nonlocal items
        items += 1 + len(container) * (2 if type(container) is dict else 1)
        if items > MAX_ITEMS:
            raise ValidationError(f"request has over {MAX_ITEMS} items (containers, array elements, map keys and "
                                  "values); the largest op request counts about 320,000")
        return container

    def unpack(code: int, data: bytes) -> Any:
        nonlocal items
        items += 1
        typecode = _TYPECODE.get(code)
        if typecode is None:
            return msgpack.ExtType(code, data)  # no validator takes one: the op says what it expected
        if len(data) % 8:
            raise ValidationError(f"a packed column of {len(data)} bytes is not a whole number of 8-byte values")
        if len(data) // 8 > MAX_CONTAINER_LEN:
            raise ValidationError(f"request is over the decode limits: a packed column of {len(data) // 8} values "
                                  f"(an array or map holds at most {MAX_CONTAINER_LEN} items)")
        column = array(typecode)
        column.frombytes(data)
        if _SWAP:
            column.byteswap()
        return column

    limit = min(len(payload), MAX_CONTAINER_LEN)
    try:
        msg = msgpack.unpackb(payload, raw=False, strict_map_key=False, object_hook=count, list_hook=count,
                              ext_hook=unpack, max_array_len=limit, max_map_len=limit)
    except ValidationError:
        raise
    except ValueError as e:
        if "exceeds max_" in str(e):
            raise ValidationError(f"request is over the decode limits: {e} "
                                  f"(an array or map holds at most {MAX_CONTAINER_LEN} items)") from None
        raise ValidationError(f"request is not valid msgpack: {type(e).__name__} {e}".rstrip()) from None
    except Exception as e:  # any garbage: msgpack raises several types
        raise ValidationError(f"request is not valid msgpack: {type(e).__name__} {e}".rstrip()) from None
    return msg, len(payload) + ITEM_BYTES * items


def reply_seq(msg: Any) -> int | None:
    """The seq to echo in a reply to ``msg``, even a malformed one: only an
    integer (never echo an arbitrary object back)."""
    seq = msg.get("seq") if type(msg) is dict else None
    return seq if type(seq) is int else None


#: How much of a frame :func:`salvage_seq` reads: the envelope before ``args`` (a cid and an op are
#: at most 64 characters each, :func:`envelope_problem`).
SALVAGE_BYTES = 512


def salvage_seq(payload: bytes) -> int | None:
    """The seq of a request that is not decoded whole (over the size or decode limits), read from
    the head of its envelope, which :func:`encode_request` writes before ``args``: so its client
    is answered with the reason, where a reply without a seq matched none of its requests and it
    sent the request again until its deadline. None when the head does not give one."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=SALVAGE_BYTES,
                                max_array_len=8, max_map_len=8, max_str_len=SALVAGE_BYTES,
                                max_bin_len=SALVAGE_BYTES, max_ext_len=SALVAGE_BYTES)
    unpacker.feed(payload[:SALVAGE_BYTES])
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key == "args":
                return None
            value = unpacker.unpack()
            if key == "seq":
                return reply_seq({"seq": value})
    except Exception:  # not msgpack, not an envelope, or cut short: there is no seq to give
        return None
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
