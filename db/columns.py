"""Bars and indicators as columns: the compact form ``store_analysis`` takes in bulk.

The analysis worker stores tens of thousands of bars and indicator values per second. As rows (a
list of objects) each value costs a validator call in the writer, about 3 us a row, more than SQLite
takes to store it; as columns (an object of equal-length lists, like the ``insert_ticks`` columns
form) whole columns are checked with builtins. The rules are not restated here: they are the field
validators of :data:`db.validation.BAR_FIELDS` and :data:`db.validation.INDICATOR_FIELDS`.

Why that is exact: every numeric field's validator is a range check on a number of a given type
(price, amount, measured value, timestamp, count), so once every value of a column has the right
type and none is NaN, the column passes if and only if its minimum and its maximum do. Text columns
hold few distinct values (symbol, timeframe, indicator name): each distinct one is checked once. When
a column fails, the values are checked one by one to name the first bad one, as rows would be.

Indicator values come one per row (``name``, ``value``) or one row per bar: ``symbol``, ``timeframe``,
``ts`` and a column per indicator (any of :data:`db.vocabulary.INDICATORS`), None where the bar has no
value (a series' first bars), each present value checked as ``value`` is.

A number column may come packed (an ``array.array`` of float64 or int64, :mod:`db.protocol`): it
stands for exactly the list ``tolist()`` gives, all of one type, so the same min/max rule applies,
taken with numpy (NaN propagates through its min and max, and fails every validator); a column that
does not pass is checked as that list, which names the first bad value. The one exception: a packed
column of indicator values per bar cannot hold None, so there NaN stands for None (no value).
"""
from __future__ import annotations

import math
from array import array
from collections.abc import Mapping
from operator import ge, le, mod
from typing import Any

from db.errors import ValidationError
from db.validation import (
    BAR_FIELDS,
    INDICATOR_FIELDS,
    MAX_ROWS,
    Validator,
    bar_rows,
    column_shapes,
    indicator_rows,
    not_bucket_start,
    packed_view,
    shown,
)
from db.vocabulary import INDICATORS, TIMEFRAMES

#: Column order, as the tables' upserts take them.
BAR_COLUMNS = tuple(BAR_FIELDS)
INDICATOR_COLUMNS = tuple(INDICATOR_FIELDS)
_TEXT = frozenset(("symbol", "timeframe", "name"))
_INTEGER = frozenset(("ts", "tick_count"))
_NUMBER = frozenset((int, float))


def _columns(name: str, value: Any, fields: Mapping[str, tuple[Validator, bool]],
             defaults: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Shape checks of a columns object (:func:`db.validation.column_shapes`), then each column
    against its field's validator."""
    n = column_shapes(name, value, fields, [f for f, (_v, required) in fields.items() if required], MAX_ROWS,
                      "rows; must be")
    cols = {f: value[f] if f in value else [defaults[f]] * n for f in fields}
    for f, (validator, _required) in fields.items():
        col = cols[f]
        if type(col) is array:
            passed = _packed_passes(col, validator, f)
            col = cols[f] = col.tolist()
            if passed:
                continue
        _check_column(f"{name}.{f}", col, validator, f)
    return cols


def _packed_passes(col: array, validator: Validator, field: str) -> bool:
    """Whether a packed column passes: the rule of :func:`_check_column` (right type, and its
    minimum and maximum pass the validator), on the array with numpy."""
    if field in _TEXT or (field in _INTEGER and col.typecode != "q"):
        return False
    values = packed_view(col)
    return _passes(validator, values.min().item()) and _passes(validator, values.max().item())


def _check_column(where: str, col: list[Any], validator: Validator, field: str) -> None:
    if field in _TEXT:
        try:
            distinct = set(col)
        except TypeError:  # a list or an object among them: not text, found below
            distinct = {None}
        if all(_passes(validator, v) for v in distinct):
            return
    else:
        types = set(map(type, col))
        ok_types = types == {int} if field in _INTEGER else types <= _NUMBER
        if ok_types and (field in _INTEGER or not any(map(math.isnan, col))) \
                and _passes(validator, min(col)) and _passes(validator, max(col)):
            return
    for i, v in enumerate(col):  # find the first bad value and say what is wrong with it
        validator(f"{where}[{i}]", v)


def _passes(validator: Validator, v: Any) -> bool:
    try:
        validator("", v)
    except ValidationError:
        return False
    return True


def _table(name: str, value: Any, rows: Validator, fields: Mapping[str, tuple[Validator, bool]],
           defaults: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Rows (checked by ``rows``) or columns, as columns in ``fields`` order; empty lists for []."""
    if value == []:
        return {f: [] for f in fields}
    if type(value) is list:
        checked = rows(name, value)
        return {f: [r[f] for r in checked] for f in fields}
    if type(value) is not dict:
        raise ValidationError(f"{name}: expected a list of objects or an object of columns, "
                              f"got {type(value).__name__}")
    return _columns(name, value, fields, defaults)


def bars_in_columns(name: str, value: Any) -> dict[str, list[Any]]:
    """Bars as rows (a list of objects, :func:`db.validation.bar_rows`) or as columns; returns columns
    in :data:`BAR_COLUMNS` order, with the same checks as rows: bucket starts, low <= open, close <= high."""
    cols = _table(name, value, bar_rows, BAR_FIELDS, {"tick_count": 0})
    if type(value) is not dict:
        return cols
    _check_bucket_starts(name, value, cols)
    ts = cols["ts"]
    o, h, lo, c = cols["open"], cols["high"], cols["low"], cols["close"]
    if not _bounds_pass(value, o, h, lo, c):
        i = next(i for i in range(len(ts)) if not lo[i] <= min(o[i], c[i]) <= max(o[i], c[i]) <= h[i])
        raise ValidationError(f"{name}[{i}]: low {lo[i]} / high {h[i]} do not bound open {o[i]} and close {c[i]}")
    return cols


def _check_bucket_starts(name: str, value: dict[str, Any], cols: dict[str, list[Any]]) -> None:
    """Every ts of the columns the start of its timeframe's bucket, or the first that is not named."""
    ts, tf = cols["ts"], cols["timeframe"]
    if not _buckets_pass(value, ts, tf):
        i = next(i for i, (t, f) in enumerate(zip(ts, tf, strict=True)) if t % TIMEFRAMES[f])
        raise not_bucket_start(f"{name}[{i}]", ts[i], tf[i])


def _buckets_pass(value: dict[str, Any], ts: list[int], tf: list[str]) -> bool:
    """Whether every ts is the start of its timeframe's bucket. On a packed ts column with numpy, the
    same test (``%`` of int64 floors as Python's does; every ts is a valid timestamp by now): the
    writer checks the analysis worker's tens of thousands of bars a second."""
    packed = value.get("ts")
    if type(packed) is array and packed.typecode == "q":
        import numpy as np  # here, not at the top: only the writer validates packed columns

        lengths = np.fromiter(map(TIMEFRAMES.__getitem__, tf), np.int64, len(tf))
        return not (packed_view(packed) % lengths).any()
    return not any(map(mod, ts, map(TIMEFRAMES.__getitem__, tf)))


def _bounds_pass(value: dict[str, Any], o: list[float], h: list[float], lo: list[float], c: list[float]) -> bool:
    """Whether every bar's low <= open, close <= high. On packed float64 columns with numpy: the
    same comparisons, as every value passed its validator by now (none is NaN)."""
    packed = [value.get(f) for f in ("open", "high", "low", "close")]
    if all(type(p) is array and p.typecode == "d" for p in packed):
        po, ph, pl, pc = map(packed_view, packed)
        return bool((pl <= po).all() and (pl <= pc).all() and (ph >= po).all() and (ph >= pc).all())
    return all(map(le, lo, o)) and all(map(le, lo, c)) and all(map(ge, h, o)) and all(map(ge, h, c))


def indicators_in_columns(name: str, value: Any) -> dict[str, list[Any]]:
    """Indicator values as rows (:func:`db.validation.indicator_rows`) or as columns; returns columns
    in :data:`INDICATOR_COLUMNS` order, or, for the one-row-per-bar form, :data:`BAR_INDICATOR_KEYS`
    and the indicators given (lists, None where a bar has no value)."""
    if type(value) is dict and "name" not in value and any(n in value for n in INDICATORS):
        cols = _per_bar(name, value)
    else:
        cols = _table(name, value, indicator_rows, INDICATOR_FIELDS, {})
    if type(value) is dict:  # rows are checked as rows (indicator_rows)
        _check_bucket_starts(name, value, cols)
    return cols


#: The keys of the one-row-per-bar form of indicator values (then a column per indicator).
BAR_INDICATOR_KEYS = ("symbol", "timeframe", "ts")
_KEY_FIELDS = {k: INDICATOR_FIELDS[k] for k in BAR_INDICATOR_KEYS}


def _per_bar(name: str, value: dict[str, Any]) -> dict[str, list[Any]]:
    extra = sorted(set(value) - set(BAR_INDICATOR_KEYS) - set(INDICATORS), key=str)
    if extra:
        raise ValidationError(f"{name}: unexpected column {shown(extra[0])}; columns are "
                              f"{', '.join(BAR_INDICATOR_KEYS)} and any of {', '.join(INDICATORS)}")
    cols = _columns(name, {k: value[k] for k in BAR_INDICATOR_KEYS if k in value}, _KEY_FIELDS, {})
    n = len(cols["ts"])
    validator = INDICATOR_FIELDS["value"][0]
    for f in INDICATORS:
        if f not in value:
            continue
        col, where = value[f], f"{name}.{f}"
        if type(col) is not list and type(col) is not array:
            raise ValidationError(f"{where}: expected a list, got {type(col).__name__}")
        if len(col) != n:
            raise ValidationError(f"{where}: {len(col)} values, expected {n} like ts")
        if type(col) is array and col.typecode == "d":
            col, passed = _packed_values(col, validator)
            if passed:
                cols[f] = col
                continue
        elif type(col) is array:
            col = col.tolist()
        present = [v for v in col if v is not None]
        try:
            if present:
                _check_column(where, present, validator, "value")
        except ValidationError:
            for i, v in enumerate(col):  # the same check, to name the bad value by its index in the column
                if v is not None:
                    validator(f"{where}[{i}]", v)
            raise
        cols[f] = col
    return cols


def _packed_values(col: array, validator: Validator) -> tuple[list[float | None], bool]:
    """A packed column of indicator values as a list (NaN as None), and whether its values pass
    (the min/max rule of :func:`_check_column`, over the values present)."""
    import numpy as np  # here, not at the top: only the writer validates packed columns

    values = packed_view(col)
    missing = np.isnan(values)
    out = col.tolist()
    if missing.any():
        for i in np.flatnonzero(missing).tolist():
            out[i] = None
        values = values[~missing]
    passed = not len(values) or (_passes(validator, values.min().item()) and _passes(validator, values.max().item()))
    return out, passed
