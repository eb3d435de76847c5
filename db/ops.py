"""The registry of named write operations: the only code that changes data.

The writer looks an op up by name, checks its arguments against the op's
fields (:func:`prepare`) and runs it inside the batch transaction, each op in
a savepoint of its own (:func:`execute`). Ops are plain functions of a
SQLAlchemy ``Connection``; they stay portable SQL (SQLite or PostgreSQL).

Every op validates what it gets and raises :class:`ValidationError` with a
message naming the field and what is wrong with it, so a bad request fails
alone and says why.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import le
from typing import Any

from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from db import engine as engines
from db.errors import Conflict, NotFound, ValidationError
from db.models import (
    INDICATORS,
    TIMEFRAMES,
    AppliedRequest,
    AuditEntry,
    Bar,
    Cursor,
    IndicatorValue,
    JobRun,
    Sample,
    Tick,
    Trade,
    TradeEvent,
)
from db.models import now_ms_default as now_ms

SYMBOL_RE = re.compile(r"[A-Z0-9][A-Z0-9._:/-]{0,31}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,63}")
#: Epoch milliseconds between 1970 and 2100: catches seconds-vs-ms slips
#: only at the far end, but keeps every value a valid 64-bit integer.
MAX_TS = 4_102_444_800_000
MAX_PRICE = 1e12
MAX_TICKS = 10_000
MAX_ROWS = 10_000
TICK_FIELDS = ("symbol", "ts", "bid", "ask", "volume", "source", "seq")
TICK_REQUIRED = ("symbol", "ts", "bid", "ask")
DEFAULT_SOURCE = "external"


# --- field validators: (field name, value) -> cleaned value -----------------

Validator = Callable[[str, Any], Any]


def _is_number(v: Any) -> bool:
    return type(v) in (int, float)


def symbol(name: str, v: Any) -> str:
    if type(v) is not str or not SYMBOL_RE.fullmatch(v):
        raise ValidationError(
            f"{name}: {v!r} is not a symbol (1-32 characters of A-Z 0-9 . _ : / -, upper case)"
        )
    return v


def label(name: str, v: Any) -> str:
    if type(v) is not str or not NAME_RE.fullmatch(v):
        raise ValidationError(f"{name}: {v!r} is not a name (1-64 characters of letters, digits . _ : / @ -)")
    return v


def text(max_len: int) -> Validator:
    def check(name: str, v: Any) -> str:
        if type(v) is not str:
            raise ValidationError(f"{name}: expected text, got {type(v).__name__}")
        if len(v) > max_len:
            raise ValidationError(f"{name}: {len(v)} characters, at most {max_len}")
        return v

    return check


def price(name: str, v: Any) -> float:
    if not _is_number(v):
        raise ValidationError(f"{name}: expected a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValidationError(f"{name}: {v} is not a finite number")
    if not 0 < v < MAX_PRICE:
        raise ValidationError(f"{name}: {v} is not a price (must be > 0)")
    return float(v)


def amount(name: str, v: Any) -> float:
    """A finite number >= 0 (volume, distance)."""
    if not _is_number(v):
        raise ValidationError(f"{name}: expected a number, got {type(v).__name__}")
    if not math.isfinite(v) or v < 0:
        raise ValidationError(f"{name}: {v} must be a finite number >= 0")
    return float(v)


def positive(name: str, v: Any) -> float:
    v = amount(name, v)
    if v <= 0:
        raise ValidationError(f"{name}: {v} must be > 0")
    return v


def finite(name: str, v: Any) -> float:
    if not _is_number(v):
        raise ValidationError(f"{name}: expected a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValidationError(f"{name}: {v} is not a finite number")
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


def boolean(name: str, v: Any) -> bool:
    if type(v) is not bool:
        raise ValidationError(f"{name}: expected true or false, got {type(v).__name__}")
    return v


def one_of(*choices: str) -> Validator:
    def check(name: str, v: Any) -> str:
        if v not in choices:
            raise ValidationError(f"{name}: {v!r} is not one of {', '.join(choices)}")
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
        return [_check_fields(f"{name}[{i}]", item, fields) for i, item in enumerate(v)]

    return check


def _check_fields(where: str, obj: Any, fields: Mapping[str, tuple[Validator, bool]]) -> dict[str, Any]:
    prefix = f"{where}: " if where else ""
    if type(obj) is not dict:
        raise ValidationError(f"{prefix}expected an object, got {type(obj).__name__}")
    extra = sorted(set(obj) - set(fields), key=str)
    if extra:
        raise ValidationError(f"{prefix}unexpected field {extra[0]!r}; fields are {', '.join(fields)}")
    out = {}
    for key, (validator, required) in fields.items():
        if key not in obj:
            if required:
                raise ValidationError(f"{prefix}missing field {key!r}")
            continue
        out[key] = validator(f"{where}.{key}" if where else key, obj[key])
    return out


# --- the registry --------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    name: str
    fn: Callable[..., Any]
    fields: Mapping[str, tuple[Validator, bool]]
    #: False for ops that must run outside a transaction (checkpoint).
    transactional: bool
    doc: str


OPS: dict[str, Op] = {}


def op(name: str, *, transactional: bool = True, **fields: Validator | tuple[Validator, bool]) -> Callable:
    """Register ``fn(conn, **args)`` as op ``name``. A field given as a bare
    validator is required; ``(validator, False)`` is optional."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = {k: (v if isinstance(v, tuple) else (v, True)) for k, v in fields.items()}
        OPS[name] = Op(name, fn, spec, transactional, (fn.__doc__ or "").strip())
        return fn

    return register


def prepare(name: Any, args: Any) -> tuple[Op, dict[str, Any]]:
    """Look the op up and validate its arguments; raises ValidationError."""
    if type(name) is not str or name not in OPS:
        raise ValidationError(f"unknown op {name!r}; known ops: {', '.join(sorted(OPS))}")
    spec = OPS[name]
    if args is None:
        args = {}
    return spec, _check_fields("", args, spec.fields)


def execute(conn: Connection, spec: Op, args: dict[str, Any]) -> Any:
    """Run a prepared op on ``conn`` (inside the caller's transaction)."""
    return spec.fn(conn, **args)


# --- portable helpers ------------------------------------------------------------

_compiled: dict[tuple[str, str], tuple[str, Sequence[str] | None]] = {}


def _dialect_insert(conn: Connection) -> Callable[[Table], Any]:
    if conn.dialect.name == "sqlite":
        return sqlite.insert
    if conn.dialect.name == "postgresql":
        return postgresql.insert
    raise NotImplementedError(f"no upsert support for {conn.dialect.name}")


def _insert_ignoring_duplicates(conn: Connection, table: Table, columns: Sequence[str],
                                values: Iterable[tuple]) -> int:
    """executemany an INSERT that skips rows whose unique key exists; returns
    the number inserted. Compiled once per dialect and passed to the driver
    as plain tuples: the hot path of tick ingest, with no per-row Python."""
    key = (conn.dialect.name, table.name + ":" + ",".join(columns))
    if key not in _compiled:
        stmt = _dialect_insert(conn)(table).on_conflict_do_nothing()
        compiled = stmt.compile(dialect=conn.dialect, column_keys=list(columns))
        order = compiled.positiontup if compiled.positional else None
        _compiled[key] = (str(compiled), order)
    sql, order = _compiled[key]
    if conn.dialect.name == "sqlite" and order is not None and list(order) == list(columns):
        # The ingest hot path: stream the tuples into the driver (no list of
        # thousands kept alive for the garbage collector to walk), on the same
        # connection and inside the caller's savepoint.
        cursor = engines.raw_dbapi(conn).cursor()
        try:
            cursor.executemany(sql, values)
            return cursor.rowcount
        except conn.dialect.loaded_dbapi.Error as e:  # as SQLAlchemy would raise it
            raise DBAPIError.instance(sql, None, e, conn.dialect.loaded_dbapi.Error) from e
        finally:
            cursor.close()
    params: list = list(values)
    if order is None:
        params = [dict(zip(columns, row, strict=True)) for row in params]
    elif list(order) != list(columns):
        index = [columns.index(c) for c in order]
        params = [tuple(row[i] for i in index) for row in params]
    result = conn.exec_driver_sql(sql, params)
    return result.rowcount


def _upsert(conn: Connection, table: Table, rows_: list[dict[str, Any]], keys: Sequence[str]) -> int:
    if not rows_:
        return 0
    stmt = _dialect_insert(conn)(table)
    updates = {c: getattr(stmt.excluded, c) for c in rows_[0] if c not in keys}
    conn.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=updates), rows_)
    return len(rows_)


def _first_bad(where: str, column: Sequence[Any], ok: Callable[[Any], bool], what: str) -> ValidationError:
    for i, v in enumerate(column):
        if not ok(v):
            return ValidationError(f"{where}[{i}]: {v!r} {what}")
    return ValidationError(f"{where}: {what}")  # pragma: no cover - callers found a bad value first


def _finite_number(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


# --- ticks ------------------------------------------------------------------------


def tick_columns(name: str, value: Any) -> dict[str, list[Any]]:
    """Validate a batch of ticks and return it as columns.

    Accepts a list of tick objects, or the same as columns (an object of
    equal-length lists, the compact form high-rate producers send). The
    checks run over whole columns with builtins (``min``, ``map``, ``fsum``)
    so a batch of thousands costs microseconds; the slow search for the
    offending row runs only once something is wrong.
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
                    raise ValidationError(f"{name}[{i}]: unexpected field {extra[0]!r}; "
                                          f"fields are {', '.join(TICK_FIELDS)}")
                missing = sorted(required - set(keys))
                raise ValidationError(f"{name}[{i}]: missing field {missing[0]!r}")
        cols = {f: [t.get(f) for t in value] for f in TICK_FIELDS}
        n = len(value)
    elif type(value) is dict:
        extra = sorted(set(value) - set(TICK_FIELDS), key=str)
        if extra:
            raise ValidationError(f"{name}: unexpected column {extra[0]!r}; "
                                  f"columns are {', '.join(TICK_FIELDS)}")
        for f in TICK_REQUIRED:
            if f not in value:
                raise ValidationError(f"{name}: missing column {f!r}")
        for f, col in value.items():
            if type(col) is not list:
                raise ValidationError(f"{name}.{f}: expected a list, got {type(col).__name__}")
        n = len(value["ts"])
        if not 1 <= n <= MAX_TICKS:
            raise ValidationError(f"{name}: {n} ticks; a batch must hold 1..{MAX_TICKS}")
        for f, col in value.items():
            if len(col) != n:
                raise ValidationError(f"{name}.{f}: {len(col)} values, expected {n} like ts")
        cols = {f: value.get(f) or [None] * n for f in TICK_FIELDS}
    else:
        raise ValidationError(f"{name}: expected a list of ticks, got {type(value).__name__}")

    try:
        _check_tick_columns(name, cols)
    except (TypeError, OverflowError, ValueError) as e:  # a value no check foresaw: still the caller's
        if isinstance(e, ValidationError):
            raise
        raise ValidationError(f"{name}: invalid value ({e})") from None
    return cols


_NUMBER = frozenset((int, float))
_NONE = type(None)


def _check_tick_columns(name: str, cols: dict[str, list[Any]]) -> None:
    """Whole-column checks (builtins over lists, no per-row Python); fills
    defaults for volume and source. ``sum`` is NaN or inf as soon as one value
    is, and bounded values cannot overflow it."""
    ts, bid, ask = cols["ts"], cols["bid"], cols["ask"]
    if set(map(type, ts)) != {int}:
        raise _first_bad(f"{name}.ts", ts, lambda v: type(v) is int, "is not epoch milliseconds (an integer)")
    if min(ts) < 0 or max(ts) > MAX_TS:
        raise _first_bad(f"{name}.ts", ts, lambda v: 0 <= v <= MAX_TS, "is out of range (epoch ms 1970..2100)")
    for f in ("bid", "ask"):
        col = cols[f]
        if not set(map(type, col)) <= _NUMBER:
            raise _first_bad(f"{name}.{f}", col, _is_number, "is not a number")
        if not math.isfinite(sum(col)) or not 0 < min(col) or max(col) >= MAX_PRICE:
            raise _first_bad(f"{name}.{f}", col, lambda v: _finite_number(v) and 0 < v < MAX_PRICE,
                             "is not a price (a finite number > 0)")
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
        raise _first_bad(f"{name}.volume", vol, _is_number, "is not a number")
    if not math.isfinite(sum(vol)) or min(vol) < 0 or max(vol) >= MAX_PRICE:
        raise _first_bad(f"{name}.volume", vol, lambda v: _finite_number(v) and 0 <= v < MAX_PRICE,
                         "is not a volume (a finite number >= 0)")
    for s in set(cols["symbol"]):
        if type(s) is not str or not SYMBOL_RE.fullmatch(s):
            raise _first_bad(f"{name}.symbol", cols["symbol"],
                             lambda v: type(v) is str and bool(SYMBOL_RE.fullmatch(v)),
                             "is not a symbol (1-32 characters of A-Z 0-9 . _ : / -, upper case)")
    sources = set(cols["source"])
    if None in sources:
        cols["source"] = [DEFAULT_SOURCE if v is None else v for v in cols["source"]]
        sources = set(cols["source"])
    for s in sources:
        if type(s) is not str or not NAME_RE.fullmatch(s):
            raise _first_bad(f"{name}.source", cols["source"],
                             lambda v: type(v) is str and bool(NAME_RE.fullmatch(v)),
                             "is not a source name (1-64 characters of letters, digits . _ : / @ -)")
    seq = cols["seq"]
    types = set(map(type, seq))
    if not types <= {int, _NONE}:
        raise _first_bad(f"{name}.seq", seq, lambda v: v is None or type(v) is int, "is not an integer")
    present = [v for v in seq if v is not None] if _NONE in types else seq
    if present and (min(present) < 0 or max(present) > 2**63 - 1):
        raise _first_bad(f"{name}.seq", seq, lambda v: v is None or 0 <= v <= 2**63 - 1,
                         "is out of range (0..2^63-1)")


@op("insert_ticks", ticks=tick_columns)
def insert_ticks(conn: Connection, ticks: dict[str, list[Any]]) -> dict[str, int]:
    """Store a batch of ticks. A tick whose (source, seq) is already stored is
    skipped and counted as a duplicate, so replays never store it twice."""
    n = len(ticks["ts"])
    values = zip(*(ticks[f] for f in TICK_FIELDS), strict=True)
    inserted = _insert_ignoring_duplicates(conn, Tick.__table__, TICK_FIELDS, values)
    return {"inserted": inserted, "duplicates": n - inserted}


@op("prune_ticks", before_ts=timestamp, limit=(integer(1, 1_000_000), False))
def prune_ticks(conn: Connection, before_ts: int, limit: int = 100_000) -> dict[str, int]:
    """Delete up to ``limit`` ticks older than ``before_ts`` (bars are kept).
    Bounded so one retention run cannot hold the writer for long: call again
    while ``more`` is true."""
    ids = select(Tick.id).where(Tick.ts < before_ts).order_by(Tick.id).limit(limit).scalar_subquery()
    deleted = conn.execute(delete(Tick).where(Tick.id.in_(ids))).rowcount
    # A full batch may have left more behind; checking with a query would
    # scan the table (no index on ts alone, which ingest would pay for).
    return {"deleted": deleted, "more": deleted == limit}


# --- bars, indicators, analysis progress -------------------------------------------


def _timeframe(name: str, v: Any) -> str:
    return one_of(*TIMEFRAMES)(name, v)


BAR_FIELDS = {
    "symbol": (symbol, True), "timeframe": (_timeframe, True), "ts": (timestamp, True),
    "open": (price, True), "high": (price, True), "low": (price, True), "close": (price, True),
    "volume": (amount, True), "tick_count": (integer(0), False),
}
INDICATOR_FIELDS = {
    "symbol": (symbol, True), "timeframe": (_timeframe, True), "name": (one_of(*INDICATORS), True),
    "ts": (timestamp, True), "value": (finite, True),
}


def _bars(name: str, v: Any) -> list[dict[str, Any]]:
    bars = rows(BAR_FIELDS)(name, v)
    for i, b in enumerate(bars):
        if b["ts"] % TIMEFRAMES[b["timeframe"]]:
            raise ValidationError(f"{name}[{i}].ts: {b['ts']} is not the start of a {b['timeframe']} bucket")
        if not (b["low"] <= min(b["open"], b["close"]) and b["high"] >= max(b["open"], b["close"])):
            raise ValidationError(f"{name}[{i}]: low {b['low']} / high {b['high']} do not bound "
                                  f"open {b['open']} and close {b['close']}")
        b.setdefault("tick_count", 0)
    return bars


def _indicators(name: str, v: Any) -> list[dict[str, Any]]:
    return rows(INDICATOR_FIELDS)(name, v)


def _optional_list(validator: Validator) -> Validator:
    def check(name: str, v: Any) -> list[dict[str, Any]]:
        return [] if v == [] else validator(name, v)

    return check


@op("upsert_bars", bars=_bars)
def upsert_bars(conn: Connection, bars: list[dict[str, Any]]) -> dict[str, int]:
    """Insert or replace whole bars (values, not increments: idempotent)."""
    return {"upserted": _upsert(conn, Bar.__table__, bars, ("symbol", "timeframe", "ts"))}


@op("put_indicators", values=_indicators)
def put_indicators(conn: Connection, values: list[dict[str, Any]]) -> dict[str, int]:
    """Insert or replace indicator values."""
    keys = ("symbol", "timeframe", "name", "ts")
    return {"upserted": _upsert(conn, IndicatorValue.__table__, values, keys)}


def _bytes(name: str, v: Any) -> bytes:
    if type(v) is not bytes:
        raise ValidationError(f"{name}: expected bytes, got {type(v).__name__}")
    if len(v) > 8 * 1024 * 1024:
        raise ValidationError(f"{name}: {len(v)} bytes, at most 8 MiB")
    return v


@op("store_analysis", cursor=label, position=integer(0), bars=(_optional_list(_bars), False),
    indicators=(_optional_list(_indicators), False), state=(optional(_bytes), False))
def store_analysis(conn: Connection, cursor: str, position: int, bars: list | None = None,
                   indicators: list | None = None, state: bytes | None = None) -> dict[str, int]:
    """Store bars and indicators together with the worker's cursor, in one
    savepoint: after a crash the worker resumes from a position whose bars
    are stored, so no tick is counted twice. The cursor never moves back."""
    current = conn.execute(select(Cursor.value).where(Cursor.name == cursor)).scalar()
    if current is not None and position < current:
        raise Conflict(f"cursor {cursor!r} is at {current}; refusing to move it back to {position}")
    n_bars = _upsert(conn, Bar.__table__, bars or [], ("symbol", "timeframe", "ts"))
    n_ind = _upsert(conn, IndicatorValue.__table__, indicators or [], ("symbol", "timeframe", "name", "ts"))
    _upsert(conn, Cursor.__table__, [{"name": cursor, "value": position, "state": state}], ("name",))
    return {"bars": n_bars, "indicators": n_ind, "position": position}


# --- trades ------------------------------------------------------------------------------


def _latest_price(conn: Connection, sym: str, side: str, opening: bool) -> float:
    """The price a market order gets: a buy opens at the ask and closes at the
    bid; a sell the other way round."""
    row = conn.execute(
        select(Tick.bid, Tick.ask).where(Tick.symbol == sym).order_by(Tick.ts.desc(), Tick.id.desc()).limit(1)
    ).first()
    if row is None:
        raise ValidationError(f"no price given and no tick stored for {sym}")
    use_ask = (side == "buy") == opening
    return float(row.ask if use_ask else row.bid)


def trade_pnl(side: str, entry: float, exit_price: float, size: float) -> float:
    return (exit_price - entry) * size if side == "buy" else (entry - exit_price) * size


def _event(conn: Connection, trade_id: int, ts: int, kind: str, price_: float | None,
           pnl: float | None = None, detail: str = "") -> None:
    conn.execute(insert(TradeEvent), dict(trade_id=trade_id, ts=ts, kind=kind, price=price_, pnl=pnl, detail=detail))


def _open_trade_row(conn: Connection, trade_id: int) -> Any:
    row = conn.execute(select(Trade).where(Trade.id == trade_id)).first()
    if row is None:
        raise NotFound(f"trade {trade_id} does not exist")
    if row.status != "open":
        raise Conflict(f"trade {trade_id} is already {row.status}")
    return row


def _check_levels(side: str, entry: float, stop: float | None, target: float | None) -> None:
    sign = 1 if side == "buy" else -1
    if stop is not None and not sign * (entry - stop) > 0:
        raise ValidationError(f"stop_loss {stop} must be {'below' if sign > 0 else 'above'} "
                              f"the entry {entry} for a {side}")
    if target is not None and not sign * (target - entry) > 0:
        raise ValidationError(f"take_profit {target} must be {'above' if sign > 0 else 'below'} "
                              f"the entry {entry} for a {side}")


@op("open_trade", symbol=symbol, side=one_of("buy", "sell"), size=positive,
    entry_price=(optional(price), False), stop_loss=(optional(price), False),
    take_profit=(optional(price), False), trailing_distance=(optional(positive), False),
    breakeven_trigger=(optional(positive), False), ts=(optional(timestamp), False))
def open_trade(conn: Connection, symbol: str, side: str, size: float, entry_price: float | None = None,
               stop_loss: float | None = None, take_profit: float | None = None,
               trailing_distance: float | None = None, breakeven_trigger: float | None = None,
               ts: int | None = None) -> dict[str, Any]:
    """Open a paper trade at ``entry_price`` or, without one, at the latest
    tick. The monitor applies its exits only to ticks that come after it.

    ``trailing_distance``: the stop follows the best price at this distance.
    ``breakeven_trigger``: once the price moved this far in favour, the stop
    moves to the entry."""
    entry = entry_price if entry_price is not None else _latest_price(conn, symbol, side, opening=True)
    _check_levels(side, entry, stop_loss, take_profit)
    ts = now_ms() if ts is None else ts
    last_tick = conn.execute(select(func.max(Tick.id))).scalar() or 0
    trade_id = conn.execute(insert(Trade), dict(
        symbol=symbol, side=side, size=size, entry_price=entry, stop_loss=stop_loss, take_profit=take_profit,
        trailing_distance=trailing_distance, breakeven_trigger=breakeven_trigger, best_price=entry,
        status="open", opened_at=ts, last_tick_id=last_tick,
    )).inserted_primary_key[0]
    _event(conn, trade_id, ts, "opened", entry, detail=f"{side} {size:g} {symbol}")
    return {"id": trade_id, "entry_price": entry}


@op("update_trade", trade_id=integer(1), stop_loss=(optional(price), False),
    take_profit=(optional(price), False), best_price=(optional(price), False),
    last_tick_id=(optional(integer(0)), False), reason=(text(64), False), ts=(optional(timestamp), False))
def update_trade(conn: Connection, trade_id: int, stop_loss: float | None = None,
                 take_profit: float | None = None, best_price: float | None = None,
                 last_tick_id: int | None = None, reason: str = "update",
                 ts: int | None = None) -> dict[str, Any]:
    """Move a trade's stop or target, or record the monitor's progress. A
    change of stop or target is recorded as a trade event with ``reason``."""
    row = _open_trade_row(conn, trade_id)
    values: dict[str, Any] = {}
    if stop_loss is not None:
        values["stop_loss"] = stop_loss
    if take_profit is not None:
        _check_levels(row.side, row.entry_price, None, take_profit)
        values["take_profit"] = take_profit
    if best_price is not None:
        values["best_price"] = best_price
    if last_tick_id is not None:
        values["last_tick_id"] = max(last_tick_id, row.last_tick_id)
    if not values:
        raise ValidationError("update_trade: nothing to change")
    conn.execute(update(Trade).where(Trade.id == trade_id).values(**values))
    if stop_loss is not None or take_profit is not None:
        detail = ", ".join(f"{k} {row_v} -> {values[k]}" for k, row_v in
                           (("stop_loss", row.stop_loss), ("take_profit", row.take_profit)) if k in values)
        _event(conn, trade_id, now_ms() if ts is None else ts, reason, stop_loss, detail=detail)
    return {"id": trade_id}


@op("close_trade", trade_id=integer(1), price=(optional(price), False), reason=(text(64), False),
    ts=(optional(timestamp), False), last_tick_id=(optional(integer(0)), False))
def close_trade(conn: Connection, trade_id: int, price: float | None = None, reason: str = "manual",
                ts: int | None = None, last_tick_id: int | None = None) -> dict[str, Any]:
    """Close a trade at ``price`` (or the latest tick) and record its P&L."""
    row = _open_trade_row(conn, trade_id)
    exit_price = price if price is not None else _latest_price(conn, row.symbol, row.side, opening=False)
    pnl = trade_pnl(row.side, row.entry_price, exit_price, row.size)
    ts = now_ms() if ts is None else ts
    values: dict[str, Any] = dict(status="closed", closed_at=ts, exit_price=exit_price, pnl=pnl,
                                  close_reason=reason)
    if last_tick_id is not None:
        values["last_tick_id"] = max(last_tick_id, row.last_tick_id)
    conn.execute(update(Trade).where(Trade.id == trade_id).values(**values))
    _event(conn, trade_id, ts, "closed", exit_price, pnl, detail=reason)
    return {"id": trade_id, "exit_price": exit_price, "pnl": pnl}


# --- jobs, audit, maintenance -------------------------------------------------------------


@op("record_job_run", job=label, started_at=timestamp, finished_at=timestamp, ok=boolean,
    detail=(text(4000), False))
def record_job_run(conn: Connection, job: str, started_at: int, finished_at: int, ok: bool,
                   detail: str = "") -> dict[str, int]:
    """Record one run of a maintenance job."""
    if finished_at < started_at:
        raise ValidationError(f"finished_at {finished_at} is before started_at {started_at}")
    run_id = conn.execute(insert(JobRun), dict(job=job, started_at=started_at, finished_at=finished_at,
                                                duration_ms=finished_at - started_at, ok=ok,
                                                detail=detail)).inserted_primary_key[0]
    return {"id": run_id}


@op("audit", actor=label, action=label, target=(text(128), False),
    result=(one_of("ok", "error", "denied"), False), detail=(text(4000), False),
    ts=(optional(timestamp), False))
def audit(conn: Connection, actor: str, action: str, target: str = "", result: str = "ok",
          detail: str = "", ts: int | None = None) -> dict[str, int]:
    """Append to the audit log: who did what to what, and how it went."""
    entry_id = conn.execute(insert(AuditEntry), dict(
        ts=now_ms() if ts is None else ts, actor=actor, action=action, target=target, result=result,
        detail=detail)).inserted_primary_key[0]
    return {"id": entry_id}


SAMPLE_FIELDS = {"ts": (timestamp, True), "name": (label, True), "labels": (text(128), False),
                 "value": (finite, True)}


@op("record_samples", samples=rows(SAMPLE_FIELDS), keep_ms=(optional(integer(60_000)), False))
def record_samples(conn: Connection, samples: list[dict[str, Any]], keep_ms: int | None = None) -> dict[str, int]:
    """Store measurements for the charts; with ``keep_ms``, forget samples
    older than that (the series stay bounded)."""
    for s in samples:
        s.setdefault("labels", "")
    conn.execute(insert(Sample), samples)
    pruned = 0
    if keep_ms is not None:
        pruned = conn.execute(delete(Sample).where(Sample.ts < now_ms() - keep_ms)).rowcount
    return {"stored": len(samples), "pruned": pruned}


@op("checkpoint", transactional=False, mode=(one_of("PASSIVE", "FULL", "RESTART", "TRUNCATE"), False))
def checkpoint(conn: Connection, mode: str = "TRUNCATE") -> dict[str, int]:
    """Checkpoint the WAL into the database (TRUNCATE also empties it). Runs
    between batches, outside any transaction; ``busy`` = 1 means a reader
    held it back and it is partial."""
    return engines.checkpoint(conn, mode)


# --- the writer's record of applied requests (not ops: the writer calls these) ----------------


def last_applied_seq(conn: Connection, client_id: str) -> int:
    """The highest request seq of ``client_id`` on record (0 for none)."""
    return conn.execute(select(func.max(AppliedRequest.seq)).where(AppliedRequest.client_id == client_id)
                        ).scalar() or 0


def lookup_applied(conn: Connection, client_id: str, seq: int) -> bytes | None:
    return conn.execute(select(AppliedRequest.result).where(
        AppliedRequest.client_id == client_id, AppliedRequest.seq == seq)).scalar()


def record_applied(conn: Connection, entries: list[tuple[str, int, bytes]]) -> None:
    if entries:
        ts = now_ms()
        conn.execute(insert(AppliedRequest), [
            {"client_id": c, "seq": s, "committed_at": ts, "result": r} for c, s, r in entries])


def prune_applied(conn: Connection, older_than_ms: int) -> int:
    return conn.execute(delete(AppliedRequest).where(AppliedRequest.committed_at < older_than_ms)).rowcount
