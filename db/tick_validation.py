"""A batch of ticks checked by the writer's rules (:func:`tick_columns`, the ``insert_ticks`` op's
validator): whole columns at once, packed ones with numpy, and the first bad value found and named
only once something is wrong. The rules of each field are :mod:`db.validation`'s."""
from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Collection, Sequence
from operator import le
from typing import Any

from db.errors import ValidationError
from db.timestamps import MAX_TS, SECONDS_FROM, SECONDS_TO, ahead, latest_allowed_ts, time_problem
from db.validation import (
    DEFAULT_SOURCE,
    MAX_PRICE,
    MAX_TICKS,
    NAME_RE,
    SYMBOL_RE,
    TICK_FIELDS,
    TICK_REQUIRED,
    column_shapes,
    is_finite_number,
    is_number,
    packed_view,
    shown,
)


def tick_columns(name: str, value: Any) -> dict[str, list[Any]]:
    """Validate a batch of ticks and return it as columns.

    Accepts a list of tick objects, or the same as columns (an object of
    equal-length lists, the compact form high-rate producers send), whose
    number columns may be packed arrays (:mod:`db.protocol`). The checks run
    over whole columns: on packed arrays with numpy (:func:`_packed_ticks_ok`,
    nanoseconds a tick), else with builtins (``min``, ``map``, ``sum``); the
    slow search for the offending row runs only once something is wrong.
    """
    if type(value) is list:
        if not 1 <= len(value) <= MAX_TICKS:
            raise ValidationError(f"{name}: {len(value)} ticks; a batch must hold 1..{MAX_TICKS}")
        allowed = frozenset(TICK_FIELDS)
        required = frozenset(TICK_REQUIRED)
        for i, t in enumerate(value):
            if type(t) is not dict:
                raise ValidationError(f"{name}[{i}]: expected a tick object, got {type(t).__name__}")
            keys = t.keys()
            if not (required <= keys <= allowed):
                extra = sorted(set(keys) - allowed, key=str)
                if extra:
                    raise ValidationError(f"{name}[{i}]: unexpected field {shown(extra[0])}; "
                                          f"fields are {', '.join(TICK_FIELDS)}")
                missing = sorted(required - set(keys))
                raise ValidationError(f"{name}[{i}]: missing field {missing[0]!r}")
        if len(value) <= FEW_TICKS:
            few = _few_ticks(value)
            if few is not None:
                return few
        cols = {f: [t.get(f) for t in value] for f in TICK_FIELDS}
        n = len(value)
        at = _in_rows(name)
    elif type(value) is dict:
        n = column_shapes(name, value, TICK_FIELDS, TICK_REQUIRED, MAX_TICKS, "ticks; a batch must hold")
        cols = {f: value[f] if f in value else [None] * n for f in TICK_FIELDS}
        at = _in_columns(name)
    else:
        raise ValidationError(f"{name}: expected a list of ticks, got {type(value).__name__}")

    numbers_ok = _packed_ticks_ok(cols)
    for f, col in cols.items():
        if type(col) is array:  # the list it stands for, as the driver takes it
            cols[f] = col.tolist()
    try:
        if not numbers_ok:
            _check_tick_numbers(name, at, cols)
        _check_tick_text(at, cols)
        if not numbers_ok:
            _check_tick_seq(at, cols)
    except (TypeError, OverflowError, ValueError) as e:  # a value no check foresaw: still the caller's
        if isinstance(e, ValidationError):
            raise
        raise ValidationError(f"{name}: invalid value ({e})") from None
    return cols


_NUMBER = frozenset((int, float))
_NONE = type(None)
#: A list of at most this many ticks (a bot's tick or two a call) is checked row by row first
#: (:func:`_few_ticks`): the column checks cost about 20 us for one tick, in fixed costs.
FEW_TICKS = 8
_MAX_SEQ = 2**63 - 1


def _few_ticks(rows: list[dict[str, Any]]) -> dict[str, list[Any]] | None:
    """The columns of a few ticks (their fields already checked) when every value passes on the
    plainest reading of the rules: a time in milliseconds from April 1970 (:data:`SECONDS_TO`) to the
    latest allowed, prices and volumes in range, a symbol and a source that match, a seq in range.
    None as soon as one does not, or may not: the column checks then decide, and name the value, so
    the verdict and the words are theirs either way. Defaults filled as they fill them."""
    latest = min(latest_allowed_ts(), MAX_TS)
    symbol_ok, name_ok = SYMBOL_RE.fullmatch, NAME_RE.fullmatch
    rows_seen: list[tuple[Any, ...]] = []
    for t in rows:
        ts, bid, ask, symbol = t["ts"], t["bid"], t["ask"], t["symbol"]
        volume, source, seq = t.get("volume"), t.get("source"), t.get("seq")
        if volume is None:
            volume = 0.0
        if source is None:
            source = DEFAULT_SOURCE
        if not (type(ts) is int and SECONDS_TO <= ts <= latest
                and type(bid) in _NUMBER and type(ask) in _NUMBER and 0 < bid <= ask < MAX_PRICE
                and type(volume) in _NUMBER and 0 <= volume < MAX_PRICE
                and (seq is None or (type(seq) is int and 0 <= seq <= _MAX_SEQ))
                and type(symbol) is str and symbol_ok(symbol) and type(source) is str and name_ok(source)):
            return None
        rows_seen.append((symbol, ts, bid, ask, volume, source, seq))  # in TICK_FIELDS' order
    return {f: list(col) for f, col in zip(TICK_FIELDS, zip(*rows_seen, strict=True), strict=True)}


def _packed_ticks_ok(cols: dict[str, Any]) -> bool:
    """True when ts, bid, ask and volume (and seq, unless absent) are packed arrays that pass every
    check of :func:`_check_tick_numbers`: the same rules on whole arrays with numpy, about a
    hundred times faster than builtins over lists. False sends the columns the slow way, which
    finds the first bad value and names it, so a packed column and the list it stands for get the
    same verdict and the same message. NaN fails every comparison and numpy's min and max
    propagate it; in range, every int64 value is exact as a float64 (below 2^53)."""
    ts, bid, ask, vol, seq = (cols[f] for f in ("ts", "bid", "ask", "volume", "seq"))
    if not all(type(c) is array for c in (ts, bid, ask, vol)) or ts.typecode != "q":
        return False
    if type(seq) is array:
        if seq.typecode != "q":
            return False
    elif seq.count(None) != len(seq):  # absent (all None) is the only other form that passes as it is
        return False
    import numpy as np  # here, not at the top: only the writer validates packed columns

    view = packed_view
    t, b, a, v = view(ts), view(bid), view(ask), view(vol)
    first = t.min()
    return bool(first >= 0 and t.max() <= latest_allowed_ts()
                and (first >= SECONDS_TO or not ((t >= SECONDS_FROM) & (t < SECONDS_TO)).any())
                and b.min() > 0 and b.max() < MAX_PRICE and a.min() > 0 and a.max() < MAX_PRICE
                and np.less_equal(b, a).all()
                and v.min() >= 0 and v.max() < MAX_PRICE and (type(seq) is not array or view(seq).min() >= 0))


#: Where a tick's value is, as the caller sent it: ``ticks[3].bid`` in rows, ``ticks.bid[3]`` in columns
#: (a row-form batch is checked as columns: its errors named a path the caller never sent).
Place = Callable[[str, int], str]


def _in_rows(name: str) -> Place:
    return lambda field, i: f"{name}[{i}].{field}"


def _in_columns(name: str) -> Place:
    return lambda field, i: f"{name}.{field}[{i}]"


def _check_tick_numbers(name: str, at: Place, cols: dict[str, list[Any]]) -> None:
    """Whole-column checks of the number columns (builtins over lists, no per-row Python); fills
    the default volume. ``sum`` is NaN or inf as soon as one value is, and bounded values cannot
    overflow it."""
    ts, bid, ask = cols["ts"], cols["bid"], cols["ask"]
    if set(map(type, ts)) != {int}:
        raise _first_bad(at, "ts", ts, lambda v: type(v) is int, "is not epoch milliseconds (an integer)")
    first, last = min(ts), max(ts)
    if first < 0 or last > MAX_TS or (first < SECONDS_TO and last >= SECONDS_FROM):  # else none is wrong
        for i, v in enumerate(ts):
            if (said := time_problem(v)) is not None:
                raise ValidationError(f"{at('ts', i)}: {shown(v)} {said}")
    latest = latest_allowed_ts()
    if last > latest:
        raise _first_bad(at, "ts", ts, lambda v: v <= latest,
                         ahead(latest, "; a tick dated later would stand as its symbol's latest price until then"))
    for f in ("bid", "ask"):
        col = cols[f]
        if not set(map(type, col)) <= _NUMBER:
            raise _first_bad(at, f, col, is_number, "is not a number")
        if not _finite_sum(col) or not 0 < min(col) or max(col) >= MAX_PRICE:
            raise _first_bad(at, f, col, lambda v: is_finite_number(v) and 0 < v < MAX_PRICE,
                             f"is not a price (a finite number > 0 and < {MAX_PRICE:g})")
    if not all(map(le, bid, ask)):
        for i, (b, a) in enumerate(zip(bid, ask, strict=True)):
            if b > a:
                raise ValidationError(f"{name}[{i}]: bid {b} is above ask {a}")
    vol = cols["volume"]
    types = set(map(type, vol))
    if _NONE in types:
        vol = cols["volume"] = [0.0 if v is None else v for v in vol]
        types = set(map(type, vol))
    if not types <= _NUMBER:
        raise _first_bad(at, "volume", vol, is_number, "is not a number")
    if not _finite_sum(vol) or min(vol) < 0 or max(vol) >= MAX_PRICE:
        raise _first_bad(at, "volume", vol, lambda v: is_finite_number(v) and 0 <= v < MAX_PRICE,
                         f"is not a volume (a finite number >= 0 and < {MAX_PRICE:g})")


def _check_tick_seq(at: Place, cols: dict[str, list[Any]]) -> None:
    """The seq column: integers 0..2^63-1, or None (no dedup key)."""
    seq = cols["seq"]
    types = set(map(type, seq))
    if not types <= {int, _NONE}:
        raise _first_bad(at, "seq", seq, lambda v: v is None or type(v) is int, "is not an integer")
    present = [v for v in seq if v is not None] if _NONE in types else seq
    if present and (min(present) < 0 or max(present) > 2**63 - 1):
        raise _first_bad(at, "seq", seq, lambda v: v is None or 0 <= v <= 2**63 - 1,
                         "is out of range (0..2^63-1)")


def _distinct(column: list[Any]) -> Collection[Any]:
    """The column's distinct values; the column itself when one cannot be in a set (a list, a map),
    so that each value is checked in turn and the error names the first bad one's index."""
    try:
        return set(column)
    except TypeError:
        return column


def _check_tick_text(at: Place, cols: dict[str, list[Any]]) -> None:
    """The symbol and source columns: each distinct value checked once; fills the default source."""
    for s in _distinct(cols["symbol"]):
        if type(s) is not str or not SYMBOL_RE.fullmatch(s):
            raise _first_bad(at, "symbol", cols["symbol"],
                             lambda v: type(v) is str and bool(SYMBOL_RE.fullmatch(v)),
                             "is not a symbol (1-32 characters of A-Z 0-9 . _ : / -, upper case)")
    sources = _distinct(cols["source"])
    if None in sources:
        cols["source"] = [DEFAULT_SOURCE if v is None else v for v in cols["source"]]
        sources = _distinct(cols["source"])
    for s in sources:
        if type(s) is not str or not NAME_RE.fullmatch(s):
            raise _first_bad(at, "source", cols["source"],
                             lambda v: type(v) is str and bool(NAME_RE.fullmatch(v)),
                             "is not a source name (1-64 characters of letters, digits . _ : / @ -)")


def _first_bad(at: Place, field: str, column: Sequence[Any], ok: Callable[[Any], bool],
               what: str) -> ValidationError:
    for i, v in enumerate(column):
        if not ok(v):
            return ValidationError(f"{at(field, i)}: {shown(v)} {what}")
    return ValidationError(f"{field}: {what}")  # pragma: no cover - callers found a bad value first


def _finite_sum(column: list[Any]) -> bool:
    """Whether a column of numbers sums to a finite number: NaN or inf as soon as one value is, and an
    int past a float's range raises (bounded values cannot overflow the sum)."""
    try:
        return math.isfinite(sum(column))
    except OverflowError:
        return False
