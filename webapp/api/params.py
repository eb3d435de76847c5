"""Input of the API: the one place query parameters and JSON bodies are parsed.

Query parameters are checked with the writer's own validators
(:mod:`db.validation`: symbol, timeframe, indicator names) and the shared
integer parser (:func:`webapp.parsing.parse_int`), so each rule and its
message is written once; their :class:`~db.errors.ValidationError` becomes a
400 ``invalid_parameter`` here. Unknown parameters are rejected, so typos do
not pass silently; an empty value counts as absent.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn

from flask import request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import RequestEntityTooLarge

from db import validation
from db.errors import ValidationError
from db.vocabulary import INDICATORS
from webapp.api.errors import ApiError, bad_param
from webapp.api.limits import LIMIT_DEFAULT, LIMIT_MAX, MAX_ID, MAX_JSON_CONTAINERS, MAX_JSON_VALUES
from webapp.parsing import parse_int

#: A parser of one query parameter: (name, text) -> value; raises ValidationError.
Parser = Callable[[str, str], Any]


@dataclass(frozen=True)
class Param:
    """A query parameter: its parser, whether it is required, its default."""

    parse: Parser
    required: bool = False
    default: Any = None


def integer(minimum: int, maximum: int, what: str = "an integer") -> Parser:
    """A parser of whole numbers in ``minimum..maximum``."""
    def parse(name: str, raw: str) -> int:
        return parse_int(name, raw, minimum, maximum, what)

    return parse


SYMBOL = Param(validation.symbol, required=True)
TIMEFRAME = Param(validation.timeframe, required=True)
INDICATOR = Param(validation.one_of(*INDICATORS), required=True)
TIMESTAMP = Param(integer(0, validation.MAX_TS, "epoch milliseconds (an integer)"))
LIMIT = Param(integer(1, LIMIT_MAX), default=LIMIT_DEFAULT)
ROW_ID = Param(integer(0, MAX_ID, "an id (an integer)"))
#: A page of a series whose ts is unique (bars, indicator values): the oldest ``limit`` rows from
#: ``since``, else the newest up to ``until`` (:func:`db.queries._series_page`).
SERIES = {"since": TIMESTAMP, "until": TIMESTAMP, "limit": LIMIT}
#: A page of ticks, which can share a ts: the cursor is (ts, id), ``since`` with ``after_id`` or
#: ``until`` with ``before_id``.
TICK_SERIES = {**SERIES, "after_id": ROW_ID, "before_id": ROW_ID}


def query(**spec: Param) -> dict[str, Any]:
    """The query parameters of ``spec``, parsed; 400 ``invalid_parameter``
    for an unknown, repeated, missing or bad one, since > until, or half a
    cursor."""
    unknown = sorted(set(request.args) - set(spec))
    if unknown:
        bad_param(f"unknown parameter {unknown[0]!r}; parameters are {', '.join(spec) or 'none'}")
    out: dict[str, Any] = {}
    for name, param in spec.items():
        values = request.args.getlist(name)
        if len(values) > 1:
            bad_param(f"{name}: given {len(values)} times; give it once")
        if not values or values[0] == "":
            if param.required:
                bad_param(f"{name}: required")
            out[name] = param.default
            continue
        try:
            out[name] = param.parse(name, values[0])
        except ValidationError as e:
            bad_param(str(e))
    if out.get("since") is not None and out.get("until") is not None and out["since"] > out["until"]:
        bad_param(f"since {out['since']} is after until {out['until']}")
    if "since" in spec:
        _check_cursor(out)
    return out


def _check_cursor(q: dict[str, Any]) -> None:
    """A series cursor is whole: ``after_id`` continues a forward page, so it needs ``since``;
    ``before_id`` continues a backward one, so it needs ``until`` and no ``since`` (with ``since``
    the page goes forward)."""
    if q.get("after_id") is not None and q.get("since") is None:
        bad_param("after_id: give it with since (the cursor is the tick at since with that id); "
                  "copy the response's next into the query")
    if q.get("before_id") is not None and (q.get("until") is None or q.get("since") is not None):
        bad_param("before_id: give it with until and without since (the cursor is the tick at until with that "
                  "id; with since the page goes forward); copy the response's next into the query")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def read_body() -> bytes:
    """The request body, whole: the one place the API reads it. 413 beyond MAX_CONTENT_LENGTH however
    it is sent, with a Content-Length (Werkzeug refuses it before reading) or chunked; 400
    ``bad_request`` when the server cannot decode it (a malformed chunk), not a 500."""
    try:
        raw = request.get_data(cache=False)
        limit = request.max_content_length
        # Werkzeug stops reading a chunked body at the limit and returns what it read, cut: one byte
        # more from the server's stream is a body over the limit.
        if (limit is not None and request.content_length is None and len(raw) >= limit
                and request.environ["wsgi.input"].read(1)):
            raise RequestEntityTooLarge()
    except ParseException as e:  # gunicorn's, as it decodes the chunked transfer coding
        raise ApiError(400, "bad_request", f"the body cannot be read: {e}") from None
    return raw


def json_object(*, optional: bool = False) -> dict[str, Any]:
    """The request body (:func:`read_body`) as a JSON object. 413 beyond
    MAX_CONTENT_LENGTH; 415 unless ``Content-Type: application/json``; 400
    when it is not strict JSON (``NaN``, ``Infinity`` refused) or not an
    object. With ``optional``, an empty body is ``{}`` whatever its content type."""
    raw = read_body()
    if optional and not raw.strip():
        return {}
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type",
                       f"send the body as JSON with 'Content-Type: application/json' (got {request.mimetype!r})")
    if not raw.strip():
        raise ApiError(400, "invalid_json", "the body is empty; expected a JSON object")
    _check_size_in_items(raw)
    twice: list[tuple[dict[str, Any], str]] = []
    try:
        body = json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=partial(_object, twice))
    except ValueError as e:  # JSONDecodeError, bad UTF-8, NaN/Infinity
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from None
    except RecursionError:  # nesting past the interpreter's recursion limit (~1,000 levels)
        raise ApiError(400, "invalid_json", "the body is not valid JSON: nested too deeply") from None
    if type(body) is not dict:
        raise ApiError(400, "invalid_body", f"the body must be a JSON object, got {_json_type(body)}")
    if twice:
        obj, key = twice[0]
        where = _path_to(body, obj)
        raise ApiError(400, "invalid_body", f"{where + ': ' if where else ''}the key {key!r} is given twice "
                       "in one object; give each once")
    return body


def _object(twice: list[tuple[dict[str, Any], str]], pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: the object; in ``twice`` each one that gives a key twice, with
    that key (JSON allows it and json.loads keeps the last value, where the sender may have meant
    either: a tick stored at its second bid)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                twice.append((obj, key))
                break
            seen.add(key)
    return obj


def _path_to(body: Any, target: object) -> str:
    """Where ``target`` is in ``body``, as validation messages name it (``ticks[0]``, ``a.b``; the
    body itself ""). Only once a body is refused: it walks it all, without recursion (a body nests
    as deep as json.loads allows)."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, where = stack.pop()
        if value is target:
            return where
        if type(value) is dict:  # a key that is not a plain name is shown as the string it is
            stack.extend((item, (f"{where}.{key}" if where else key) if key.isidentifier() else f"{where}[{key!r}]")
                         for key, item in value.items())
        elif type(value) is list:
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
    return "(somewhere in the body)"  # pragma: no cover - the hook marked an object of this body


def _check_size_in_items(raw: bytes) -> None:
    """400 ``invalid_body`` when ``raw`` holds more JSON objects and arrays than
    :data:`MAX_JSON_CONTAINERS`, or more commas than :data:`MAX_JSON_VALUES`: counted in the
    bytes (at C speed, a few ms for 8 MiB) before json.loads builds a Python object for each, which
    for a body of tiny items costs 10 to 25 times its size. Characters inside strings count too:
    the limits leave room for that (see :mod:`webapp.api.limits`)."""
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_JSON_CONTAINERS:
        raise ApiError(400, "invalid_body", f"the body holds {containers:,} JSON objects and arrays (counted as its "
                       f"'{{' and '['); at most {MAX_JSON_CONTAINERS:,} JSON objects and arrays are read, as a write "
                       f"takes at most {validation.MAX_ROWS:,} rows; send fewer ticks per request")
    commas = raw.count(b",")
    if commas > MAX_JSON_VALUES:
        raise ApiError(400, "invalid_body", f"the body holds {commas:,} JSON values (counted as its commas); at most "
                       f"{MAX_JSON_VALUES:,} are read, as a write takes at most {validation.MAX_ROWS:,} rows of "
                       f"{len(validation.TICK_FIELDS)} fields; send fewer ticks per request")


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)
