"""Field validators for the ops registry: (field name, value) -> cleaned value.

Every validator raises :class:`~db.errors.ValidationError` with a message that
names the field (and the index in a batch) and says what is wrong, so a bad
request fails alone and says why. The ops registry (:mod:`db.ops`) declares
its fields with these; the API and the workers use the same functions, so a
rule such as "what is a symbol" is written once. A batch of ticks is checked
whole, a column at a time, by :mod:`db.tick_validation` with these rules.
"""
from __future__ import annotations

import math
import re
import reprlib
from array import array
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from db.errors import ValidationError
from db.timestamps import MAX_TS, ahead, latest_allowed_ts, time_problem, utc
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


def is_finite_number(v: Any) -> bool:
    """:func:`is_number`, and finite (an int past a float's range is not)."""
    try:
        return is_number(v) and math.isfinite(v)
    except OverflowError:  # an int past a float's range
        return False


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
    if not is_finite_number(v):
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



# --- columns objects (every bulk op's: ticks in db.tick_validation, bars and indicators in db.columns) ---


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


def packed_view(col: array) -> Any:
    """A packed number column (``array('d')`` or ``array('q')``) as a numpy array over its memory, not
    a copy: how every check of packed columns reads them. numpy is imported here, not at the top:
    only the writer validates packed columns, and a producer imports this module without it."""
    import numpy as np

    return np.frombuffer(col, np.float64 if col.typecode == "d" else np.int64)



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
