"""Field validators for the ops registry: (field name, value) -> cleaned value.

Every validator raises :class:`~db.errors.ValidationError` with a message that
names the field (and the index in a batch) and says what is wrong, so a bad
request fails alone and says why. The ops registry (:mod:`db.ops`) declares
its fields with these; the API and the workers use the same functions, so a
rule such as "what is a symbol" is written once.
"""
from __future__ import annotations

import math
import re
import reprlib
from array import array
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from operator import le
from typing import Any

from db.errors import ValidationError
from db.timestamps import MAX_TS, SECONDS_FROM, SECONDS_TO, ahead, latest_allowed_ts, time_problem, utc
from db.vocabulary import INDICATORS, TIMEFRAMES

SYMBOL_RE = re.compile(r"[A-Z0-9][A-Z0-9._:/-]{0,31}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,63}")
#: Bounds of every number an op stores, so that nothing derived from them can
#: overflow to infinity (which strict JSON cannot carry): a P&L is
#: (exit - entry) * size < MAX_PRICE * MAX_SIZE = 1e24; a stop moved by a
#: distance stays within 2 * MAX_PRICE; sums and means of measured values
#: (samples, indicators, bar volumes) stay finite for any count of them.
MAX_PRICE = 1e12
MAX_SIZE = 1e12
MAX_VALUE = 1e30
MAX_TICKS = 10_000
MAX_ROWS = 10_000
TICK_FIELDS = ("symbol", "ts", "bid", "ask", "volume", "source", "seq")
TICK_REQUIRED = ("symbol", "ts", "bid", "ask")
DEFAULT_SOURCE = "external"


# --- field validators: (field name, value) -> cleaned value -----------------

Validator = Callable[[str, Any], Any]


def shown(v: Any, limit: int = 40) -> str:
    """``repr(v)`` cut to ``limit`` characters: error messages quote what
    they got without echoing a megabyte back."""
    try:
        text_ = repr(v)
    except RecursionError:  # nested deeper than repr can go from here (the decoder allows ~1,000 levels)
        text_ = _SHALLOW.repr(v)
    except ValueError:  # an int of over 4,300 digits: CPython's guard on int-to-text conversion
        text_ = f"an integer of {v.bit_length():,} bits"
    return text_ if len(text_) <= limit else text_[:limit] + "..."


#: :func:`shown`'s way with a value too deep for ``repr``: a few levels, then ``...``.
_SHALLOW = reprlib.Repr()
_SHALLOW.maxlevel = 4


def is_number(v: Any) -> bool:
    """An int or a float, not a bool (nor anything else that claims to be one)."""
    return type(v) in (int, float)


def symbol(name: str, v: Any) -> str:
    if type(v) is not str or not SYMBOL_RE.fullmatch(v):
        raise ValidationError(
            f"{name}: {shown(v)} is not a symbol (1-32 characters of A-Z 0-9 . _ : / -, upper case)"
        )
    return v


def label(name: str, v: Any) -> str:
    if type(v) is not str or not NAME_RE.fullmatch(v):
        raise ValidationError(f"{name}: {shown(v)} is not a name (1-64 characters of letters, digits . _ : / @ -)")
    return v


def without_nul(v: str) -> str:
    """``v`` with each NUL shown as ``\\x00``: for text a program wrote (pg_dump's stderr, an
    exception's message) that goes into a record, which :func:`text` would refuse whole."""
    return v.replace("\x00", "\\x00")


def text(max_len: int) -> Validator:
    def check(name: str, v: Any) -> str:
        if type(v) is not str:
            raise ValidationError(f"{name}: expected text, got {type(v).__name__}")
        if len(v) > max_len:
            raise ValidationError(f"{name}: {len(v)} characters, at most {max_len}")
        if "\x00" in v:  # PostgreSQL's text cannot hold it: refused on both databases alike
            raise ValidationError(f"{name}: {shown(v)} holds a NUL character (\\x00), which no text may hold")
        return v

    return check


#: What an integer past a float's range (JSON carries any) is told: math.isfinite raised OverflowError
#: for one, a 500 where it came over HTTP.
TOO_LARGE = "an integer too large for a number (beyond about 1.8e308)"


def finite(name: str, v: Any) -> float:
    if not is_number(v):
        raise ValidationError(f"{name}: expected a number, got {type(v).__name__}")
    if not _finite_number(v):
        raise ValidationError(f"{name}: {TOO_LARGE if type(v) is int else f'{v} is not a finite number'}")
    return float(v)


def bounded(low: float, high: float, what: str = "") -> Validator:
    """A finite number strictly between ``low`` and ``high``; ``what`` ("a price") names it in the message."""
    says = f"is not {what} (must be" if what else "must be"

    def check(name: str, v: Any) -> float:
        finite(name, v)
        if not low < v < high:
            raise ValidationError(f"{name}: {v} {says} > {low:g} and < {high:g}{')' if what else ''}")
        return float(v)

    return check


price = bounded(0, MAX_PRICE, "a price")
#: A trade's size: its P&L is then below MAX_PRICE * MAX_SIZE.
size = bounded(0, MAX_SIZE)
#: A price distance (trailing stop, break-even trigger): like a price.
distance = bounded(0, MAX_PRICE)
#: A measured value (indicator, sample): sums and means of any count of them stay finite.
measured = bounded(-MAX_VALUE, MAX_VALUE)


def amount(name: str, v: Any) -> float:
    """A finite number >= 0 and < MAX_VALUE (a bar's volume)."""
    if not is_number(v):
        raise ValidationError(f"{name}: expected a number, got {type(v).__name__}")
    if not math.isfinite(v) or not 0 <= v < MAX_VALUE:
        raise ValidationError(f"{name}: {v} must be a finite number >= 0 and < {MAX_VALUE:g}")
    return float(v)


def integer(minimum: int = 0, maximum: int = 2**63 - 1) -> Validator:
    def check(name: str, v: Any) -> int:
        if type(v) is not int:
            raise ValidationError(f"{name}: expected an integer, got {type(v).__name__}")
        if not minimum <= v <= maximum:
            raise ValidationError(f"{name}: {v} is out of range {minimum}..{maximum}")
        return v

    return check


timestamp = integer(0, MAX_TS)


def _moment(name: str, v: Any, seconds: bool) -> int:
    if type(v) is int and (said := time_problem(v, seconds=seconds)) is not None:
        raise ValidationError(f"{name}: {shown(v)} {said}")
    v = timestamp(name, v)
    latest = latest_allowed_ts()
    if v > latest:
        raise ValidationError(f"{name}: {v} ({utc(v)}) {ahead(latest)}")
    return v


def moment(name: str, v: Any) -> int:
    """A :data:`timestamp` no later than :func:`latest_allowed_ts` (a trade's update or close: the
    monitor sends the time of a stored tick, which may be one stored before :func:`sent_moment`)."""
    return _moment(name, v, seconds=False)


def sent_moment(name: str, v: Any) -> int:
    """:func:`moment`, and not a time in seconds (:func:`db.timestamps.time_problem`): the time of
    something new (a trade opened), as a client sends it."""
    return _moment(name, v, seconds=True)


def boolean(name: str, v: Any) -> bool:
    if type(v) is not bool:
        raise ValidationError(f"{name}: expected true or false, got {type(v).__name__}")
    return v


def one_of(*choices: str) -> Validator:
    def check(name: str, v: Any) -> str:
        if v not in choices:
            raise ValidationError(f"{name}: {shown(v)} is not one of {', '.join(choices)}")
        return v

    return check


def optional(validator: Validator) -> Validator:
    def check(name: str, v: Any) -> Any:
        return None if v is None else validator(name, v)

    return check


def rows(fields: Mapping[str, tuple[Validator, bool]], max_rows: int = MAX_ROWS) -> Validator:
    """A non-empty list of objects, each with ``fields`` (validator, required)."""

    def check(name: str, v: Any) -> list[dict[str, Any]]:
        if type(v) is not list:
            raise ValidationError(f"{name}: expected a list, got {type(v).__name__}")
        if not 1 <= len(v) <= max_rows:
            raise ValidationError(f"{name}: {len(v)} items; must be 1..{max_rows}")
        return [check_fields(f"{name}[{i}]", item, fields) for i, item in enumerate(v)]

    return check


def check_fields(where: str, obj: Any, fields: Mapping[str, tuple[Validator, bool]]) -> dict[str, Any]:
    prefix = f"{where}: " if where else ""
    if type(obj) is not dict:
        raise ValidationError(f"{prefix}expected an object, got {type(obj).__name__}")
    extra = sorted(set(obj) - set(fields), key=str)
    if extra:
        raise ValidationError(f"{prefix}unexpected field {shown(extra[0])}; fields are {', '.join(fields)}")
    out = {}
    for key, (validator, required) in fields.items():
        if key not in obj:
            if required:
                raise ValidationError(f"{prefix}missing field {key!r}")
            continue
        out[key] = validator(f"{where}.{key}" if where else key, obj[key])
    return out


def _first_bad(where: str, column: Sequence[Any], ok: Callable[[Any], bool], what: str) -> ValidationError:
    for i, v in enumerate(column):
        if not ok(v):
            return ValidationError(f"{where}[{i}]: {shown(v)} {what}")
    return ValidationError(f"{where}: {what}")  # pragma: no cover - callers found a bad value first


def _finite_number(v: Any) -> bool:
    try:
        return is_number(v) and math.isfinite(v)
    except OverflowError:  # an int past a float's range
        return False


def _finite_sum(column: list[Any]) -> bool:
    """Whether a column of numbers sums to a finite number: NaN or inf as soon as one value is, and an
    int past a float's range raises (bounded values cannot overflow the sum)."""
    try:
        return math.isfinite(sum(column))
    except OverflowError:
        return False



# --- ticks ------------------------------------------------------------------------


def column_shapes(name: str, value: Mapping[str, Any], fields: Iterable[str], required: Iterable[str],
                  limit: int, counted: str) -> int:
    """The shape of a columns object (every bulk op's): only known columns, the required ones there,
    each a list (or a packed array) of the same length as ``ts``, 1..``limit`` rows. Returns the
    number of rows. ``counted`` names them in the message ("ticks; a batch must hold")."""
    fields = tuple(fields)
    extra = sorted(set(value) - set(fields), key=str)
    if extra:
        raise ValidationError(f"{name}: unexpected column {shown(extra[0])}; columns are {', '.join(fields)}")
    for f in required:
        if f not in value:
            raise ValidationError(f"{name}: missing column {f!r}")
    for f, col in value.items():
        if type(col) is not list and type(col) is not array:
            raise ValidationError(f"{name}.{f}: expected a list, got {type(col).__name__}")
    n = len(value["ts"])
    if not 1 <= n <= limit:
        raise ValidationError(f"{name}: {n} {counted} 1..{limit}")
    for f, col in value.items():
        if len(col) != n:
            raise ValidationError(f"{name}.{f}: {len(col)} values, expected {n} like ts")
    return n


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
        cols = {f: [t.get(f) for t in value] for f in TICK_FIELDS}
        n = len(value)
    elif type(value) is dict:
        n = column_shapes(name, value, TICK_FIELDS, TICK_REQUIRED, MAX_TICKS, "ticks; a batch must hold")
        cols = {f: value[f] if f in value else [None] * n for f in TICK_FIELDS}
    else:
        raise ValidationError(f"{name}: expected a list of ticks, got {type(value).__name__}")

    numbers_ok = _packed_ticks_ok(cols)
    for f, col in cols.items():
        if type(col) is array:  # the list it stands for, as the driver takes it
            cols[f] = col.tolist()
    try:
        if not numbers_ok:
            _check_tick_numbers(name, cols)
        _check_tick_text(name, cols)
        if not numbers_ok:
            _check_tick_seq(name, cols)
    except (TypeError, OverflowError, ValueError) as e:  # a value no check foresaw: still the caller's
        if isinstance(e, ValidationError):
            raise
        raise ValidationError(f"{name}: invalid value ({e})") from None
    return cols


_NUMBER = frozenset((int, float))
_NONE = type(None)


def packed_view(col: array) -> Any:
    """A packed number column (``array('d')`` or ``array('q')``) as a numpy array over its memory, not
    a copy: how every check of packed columns reads them. numpy is imported here, not at the top:
    only the writer validates packed columns, and a producer imports this module without it."""
    import numpy as np

    return np.frombuffer(col, np.float64 if col.typecode == "d" else np.int64)


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


def _check_tick_numbers(name: str, cols: dict[str, list[Any]]) -> None:
    """Whole-column checks of the number columns (builtins over lists, no per-row Python); fills
    the default volume. ``sum`` is NaN or inf as soon as one value is, and bounded values cannot
    overflow it."""
    ts, bid, ask = cols["ts"], cols["bid"], cols["ask"]
    if set(map(type, ts)) != {int}:
        raise _first_bad(f"{name}.ts", ts, lambda v: type(v) is int, "is not epoch milliseconds (an integer)")
    first, last = min(ts), max(ts)
    if first < 0 or last > MAX_TS or (first < SECONDS_TO and last >= SECONDS_FROM):  # else none is wrong
        for i, v in enumerate(ts):
            if (said := time_problem(v)) is not None:
                raise ValidationError(f"{name}.ts[{i}]: {shown(v)} {said}")
    latest = latest_allowed_ts()
    if last > latest:
        raise _first_bad(f"{name}.ts", ts, lambda v: v <= latest,
                         ahead(latest, "; a tick dated later would stand as its symbol's latest price until then"))
    for f in ("bid", "ask"):
        col = cols[f]
        if not set(map(type, col)) <= _NUMBER:
            raise _first_bad(f"{name}.{f}", col, is_number, "is not a number")
        if not _finite_sum(col) or not 0 < min(col) or max(col) >= MAX_PRICE:
            raise _first_bad(f"{name}.{f}", col, lambda v: _finite_number(v) and 0 < v < MAX_PRICE,
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
        raise _first_bad(f"{name}.volume", vol, is_number, "is not a number")
    if not _finite_sum(vol) or min(vol) < 0 or max(vol) >= MAX_PRICE:
        raise _first_bad(f"{name}.volume", vol, lambda v: _finite_number(v) and 0 <= v < MAX_PRICE,
                         f"is not a volume (a finite number >= 0 and < {MAX_PRICE:g})")


def _check_tick_seq(name: str, cols: dict[str, list[Any]]) -> None:
    """The seq column: integers 0..2^63-1, or None (no dedup key)."""
    seq = cols["seq"]
    types = set(map(type, seq))
    if not types <= {int, _NONE}:
        raise _first_bad(f"{name}.seq", seq, lambda v: v is None or type(v) is int, "is not an integer")
    present = [v for v in seq if v is not None] if _NONE in types else seq
    if present and (min(present) < 0 or max(present) > 2**63 - 1):
        raise _first_bad(f"{name}.seq", seq, lambda v: v is None or 0 <= v <= 2**63 - 1,
                         "is out of range (0..2^63-1)")


def _distinct(column: list[Any]) -> Collection[Any]:
    """The column's distinct values; the column itself when one cannot be in a set (a list, a map),
    so that each value is checked in turn and the error names the first bad one's index."""
    try:
        return set(column)
    except TypeError:
        return column


def _check_tick_text(name: str, cols: dict[str, list[Any]]) -> None:
    """The symbol and source columns: each distinct value checked once; fills the default source."""
    for s in _distinct(cols["symbol"]):
        if type(s) is not str or not SYMBOL_RE.fullmatch(s):
            raise _first_bad(f"{name}.symbol", cols["symbol"],
                             lambda v: type(v) is str and bool(SYMBOL_RE.fullmatch(v)),
                             "is not a symbol (1-32 characters of A-Z 0-9 . _ : / -, upper case)")
    sources = _distinct(cols["source"])
    if None in sources:
        cols["source"] = [DEFAULT_SOURCE if v is None else v for v in cols["source"]]
        sources = _distinct(cols["source"])
    for s in sources:
        if type(s) is not str or not NAME_RE.fullmatch(s):
            raise _first_bad(f"{name}.source", cols["source"],
                             lambda v: type(v) is str and bool(NAME_RE.fullmatch(v)),
                             "is not a source name (1-64 characters of letters, digits . _ : / @ -)")



# --- bars, indicators, samples, blobs ----------------------------------------------


def timeframe(name: str, v: Any) -> str:
    return one_of(*TIMEFRAMES)(name, v)


BAR_FIELDS = {
    "symbol": (symbol, True), "timeframe": (timeframe, True), "ts": (timestamp, True),
    "open": (price, True), "high": (price, True), "low": (price, True), "close": (price, True),
    "volume": (amount, True), "tick_count": (integer(0), False),
}
INDICATOR_FIELDS = {
    "symbol": (symbol, True), "timeframe": (timeframe, True), "name": (one_of(*INDICATORS), True),
    "ts": (timestamp, True), "value": (measured, True),
}


def not_bucket_start(where: str, ts: int, timeframe: str) -> ValidationError:
    """The error of a bar's or an indicator value's time that is not the start of its timeframe's bucket
    (where a bar of the timeframe starts: no bar is found at any other)."""
    return ValidationError(f"{where}.ts: {ts} is not the start of a {timeframe} bucket")


def _check_bucket_starts(name: str, values: list[dict[str, Any]]) -> None:
    for i, r in enumerate(values):
        if r["ts"] % TIMEFRAMES[r["timeframe"]]:
            raise not_bucket_start(f"{name}[{i}]", r["ts"], r["timeframe"])


def bar_rows(name: str, v: Any) -> list[dict[str, Any]]:
    bars = rows(BAR_FIELDS)(name, v)
    _check_bucket_starts(name, bars)
    for i, b in enumerate(bars):
        if not (b["low"] <= min(b["open"], b["close"]) and b["high"] >= max(b["open"], b["close"])):
            raise ValidationError(f"{name}[{i}]: low {b['low']} / high {b['high']} do not bound "
                                  f"open {b['open']} and close {b['close']}")
        b.setdefault("tick_count", 0)
    return bars


def indicator_rows(name: str, v: Any) -> list[dict[str, Any]]:
    """Indicator values as rows, each dated at the start of its timeframe's bucket (its bar's time)."""
    values = rows(INDICATOR_FIELDS)(name, v)
    _check_bucket_starts(name, values)
    return values


def optional_list(validator: Validator) -> Validator:
    def check(name: str, v: Any) -> list[dict[str, Any]]:
        return [] if v == [] else validator(name, v)

    return check


def blob(name: str, v: Any) -> bytes:
    if type(v) is not bytes:
        raise ValidationError(f"{name}: expected bytes, got {type(v).__name__}")
    if len(v) > 8 * 1024 * 1024:
        raise ValidationError(f"{name}: {len(v)} bytes, at most 8 MiB")
    return v


SAMPLE_FIELDS = {"ts": (timestamp, True), "name": (label, True), "labels": (text(128), False),
                 "value": (measured, True)}



# --- trades -------------------------------------------------------------------------


def check_levels(side: str, entry: float, stop: float | None, target: float | None) -> None:
    sign = 1 if side == "buy" else -1
    if stop is not None and not sign * (entry - stop) > 0:
        raise ValidationError(f"stop_loss {stop} must be {'below' if sign > 0 else 'above'} "
                              f"the entry {entry} for a {side}")
    if target is not None and not sign * (target - entry) > 0:
        raise ValidationError(f"take_profit {target} must be {'above' if sign > 0 else 'below'} "
                              f"the entry {entry} for a {side}")
