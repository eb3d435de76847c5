"""The registry of named write operations: the only code that changes data.

The writer looks an op up by name, checks its arguments against the op's
fields (:func:`prepare`) and runs it inside the batch transaction
(:func:`execute`; the writer decides about savepoints, see
:mod:`workers.commit`). Ops are plain functions of a SQLAlchemy
``Connection``; they stay portable SQL (SQLite or PostgreSQL). The hot ones
(ticks, audit, bars and indicators, the record of applied requests) run
statements compiled once per dialect, on the DB-API cursor where the driver
takes them as they are (:func:`~db.statements.compile_insert`), with SQLAlchemy Core as the
fallback for any other database.

Every op declares its fields with the validators of :mod:`db.validation`,
which raise :class:`ValidationError` with a message naming the field and what
is wrong with it, so a bad request fails alone and says why.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection

from db import engine as engines
from db import queries
from db.columns import BAR_COLUMNS, INDICATOR_COLUMNS, bars_in_columns, indicators_in_columns
from db.errors import Conflict, NotFound, ValidationError
from db.models import (
    AUDIT_RESULTS,
    TICK_KEY,
    applied_requests_table,
    audit_log_table,
    bars_table,
    cursors_table,
    job_runs_table,
    now_ms,
    samples_table,
    ticks_table,
    trade_events_table,
    trade_pnl,
    trades_table,
)
from db.schema import BAR_INDICATORS
from db.server_clock import server_now_ms
from db.statements import (
    COPY_MIN_TICKS,
    compile_insert,
    copy_ticks,
    insert_columns,
    insert_many,
    insert_row,
    upsert_columns,
    upsert_rows,
)
from db.tick_validation import tick_columns
from db.validation import (
    SAMPLE_FIELDS,
    TICK_FIELDS,
    Validator,
    bar_rows,
    blob,
    boolean,
    check_fields,
    check_levels,
    distance,
    indicator_rows,
    integer,
    label,
    moment,
    one_of,
    optional,
    price,
    rows,
    sent_moment,
    shown,
    size,
    symbol,
    text,
    timestamp,
)
from db.vocabulary import INDICATORS

# --- the registry --------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    name: str
    fn: Callable[..., Any]
    fields: Mapping[str, tuple[Validator, bool]]
    #: False for ops that must run outside a transaction (checkpoint).
    transactional: bool
    doc: str
    #: False for ops whose work grows with what the tables hold, not with the request alone (a
    #: delete by age): the writer runs them on its commit thread only (workers.intake.Intake).
    quick: bool = True


OPS: dict[str, Op] = {}


def op(name: str, *, transactional: bool = True, quick: bool = True,
       **fields: Validator | tuple[Validator, bool]) -> Callable:
    """Register ``fn(conn, **args)`` as op ``name``. A field given as a bare
    validator is required; ``(validator, False)`` is optional."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = {k: (v if isinstance(v, tuple) else (v, True)) for k, v in fields.items()}
        OPS[name] = Op(name, fn, spec, transactional, (fn.__doc__ or "").strip(), quick)
        return fn

    return register


def prepare(name: Any, args: Any) -> tuple[Op, dict[str, Any]]:
    """Look the op up and validate its arguments; raises ValidationError."""
    if type(name) is not str or name not in OPS:
        raise ValidationError(f"unknown op {shown(name)}; known ops: {', '.join(sorted(OPS))}")
    spec = OPS[name]
    if args is None:
        args = {}
    return spec, check_fields("", args, spec.fields)


def execute(conn: Connection, spec: Op, args: dict[str, Any]) -> Any:
    """Run a prepared op on ``conn`` (inside the caller's transaction)."""
    return spec.fn(conn, **args)


# --- ticks ------------------------------------------------------------------------


@op("insert_ticks", ticks=tick_columns)
def insert_ticks(conn: Connection, ticks: dict[str, list[Any]]) -> dict[str, int]:
    """Store a batch of ticks. A tick whose (source, seq) is already stored is
    skipped and counted as a duplicate, so replays never store it twice."""
    n = len(ticks["ts"])
    if conn.dialect.name == "postgresql" and n >= COPY_MIN_TICKS:
        inserted = copy_ticks(conn, ticks)
    else:
        inserted = insert_columns(conn, ticks_table, TICK_FIELDS, [ticks[f] for f in TICK_FIELDS],
                                  skip_on=TICK_KEY)
    return {"inserted": inserted, "duplicates": n - inserted}


@op("prune_ticks", quick=False, before_ts=timestamp, limit=(integer(1, 1_000_000), False))
def prune_ticks(conn: Connection, before_ts: int, limit: int = 100_000) -> dict[str, int]:
    """Delete up to ``limit`` ticks older than ``before_ts`` (bars are kept) that the analysis has
    read (up to its cursor, :data:`ANALYSIS_CURSOR`, when it has one: a tick after it has no bar yet,
    and deleted it never would; a replay of old ticks while the analysis was behind lost them all).
    Bounded so one retention run cannot hold the writer for long: call again while ``more`` is true.
    ``kept_for_analysis``: in the last call (``more`` false), the ticks older than ``before_ts`` kept
    because the analysis has not read them yet."""
    old = ticks_table.c.ts < before_ts
    analysed = queries.analysed_through(conn)
    if analysed is not None:  # none: the analysis never ran in this database, and nothing waits for it
        old = old & (ticks_table.c.id <= analysed)
    ids = select(ticks_table.c.id).where(old).order_by(ticks_table.c.id).limit(limit).scalar_subquery()
    deleted = conn.execute(delete(ticks_table).where(ticks_table.c.id.in_(ids))).rowcount
    # A full batch may have left more behind; checking with a query would
    # scan the table (no index on ts alone, which ingest would pay for).
    more = deleted == limit
    kept = 0
    if not more and analysed is not None:  # the ticks after the cursor only: what the analysis has to read
        kept = conn.execute(select(func.count()).select_from(ticks_table)
                            .where(ticks_table.c.id > analysed, ticks_table.c.ts < before_ts)).scalar() or 0
    return {"deleted": deleted, "more": more, "kept_for_analysis": kept}


# --- bars, indicators, analysis progress -------------------------------------------


@op("upsert_bars", bars=bar_rows)
def upsert_bars(conn: Connection, bars: list[dict[str, Any]]) -> dict[str, int]:
    """Insert or replace whole bars (values, not increments: idempotent)."""
    return {"upserted": upsert_rows(conn, bars_table, bars, ("symbol", "timeframe", "ts"))}


@op("put_indicators", values=indicator_rows)
def put_indicators(conn: Connection, values: list[dict[str, Any]]) -> dict[str, int]:
    """Insert or replace indicator values."""
    return {"upserted": _upsert_indicators(conn, {f: [r[f] for r in values] for f in INDICATOR_COLUMNS})}


@op("store_analysis", cursor=label, position=integer(0), bars=(bars_in_columns, False),
    indicators=(indicators_in_columns, False), state=(optional(blob), False), expect=(optional(integer(0)), False))
def store_analysis(conn: Connection, cursor: str, position: int, bars: dict[str, list] | None = None,
                   indicators: dict[str, list] | None = None, state: bytes | None = None,
                   expect: int | None = None) -> dict[str, int]:
    """Store bars and indicators together with the worker's cursor, in one
    savepoint: after a crash the worker resumes from a position whose bars
    are stored, so no tick is counted twice. The cursor never moves back.
    Bars and indicators come as rows or, in bulk, as columns (:mod:`db.columns`;
    indicators also one row per bar, a column per indicator).
    ``expect``: the cursor position these values were computed from; if the
    cursor is elsewhere (an earlier request of a pipelined worker failed),
    nothing is stored (Conflict), so no store lands on a gap."""
    # FOR UPDATE: during a change of leader two hosts' writers may store the same cursor at once;
    # the second waits (up to TICKSTACK_LOCK_TIMEOUT_MS, then retried), then sees the first's
    # position (left out on SQLite: one writer).
    current = conn.execute(select(cursors_table.c.value).where(cursors_table.c.name == cursor)
                           .with_for_update()).scalar()
    if expect is not None and (current or 0) != expect:
        raise Conflict(f"cursor {cursor!r} is at {current or 0}, not at {expect} as this store expects")
    if current is not None and position < current:
        raise Conflict(f"cursor {cursor!r} is at {current}; refusing to move it back to {position}")
    n_bars = upsert_columns(conn, bars_table, bars, BAR_COLUMNS, ("symbol", "timeframe", "ts"))
    n_ind = _upsert_indicators(conn, indicators) if indicators else 0
    upsert_rows(conn, cursors_table, [{"name": cursor, "value": position, "state": state}], ("name",))
    return {"bars": n_bars, "indicators": n_ind, "position": position}


def _upsert_indicators(conn: Connection, cols: dict[str, list[Any]]) -> int:
    """Indicator values as columns into ``bar_indicators`` (:data:`db.schema.BAR_INDICATORS`); returns
    the values stored. One value per row (``name``, ``value``: :data:`INDICATOR_COLUMNS`) goes into
    its name's column, the others of that row untouched; one row per bar (a column per indicator,
    None where there is no value) sets the values it has and leaves the stored ones where it has
    none: either way only the values given change, as rows of the old ``indicators`` table did."""
    if not cols["ts"]:
        return 0
    keys = ("symbol", "timeframe", "ts")
    if "name" not in cols:
        names = tuple(n for n in INDICATORS if n in cols)
        insert_columns(conn, BAR_INDICATORS, keys + names, [cols[c] for c in keys + names], update_on=keys,
                       keep=True)
        return sum(len(cols[n]) - cols[n].count(None) for n in names)
    by_name: dict[str, list[int]] = {}
    for i, name in enumerate(cols["name"]):
        by_name.setdefault(name, []).append(i)
    sym, tf, ts, value = cols["symbol"], cols["timeframe"], cols["ts"], cols["value"]
    for name, rows_ in by_name.items():  # in order: a value given twice ends as the later one
        insert_many(conn, BAR_INDICATORS, (*keys, name), ((sym[i], tf[i], ts[i], value[i]) for i in rows_),
                     update_on=keys)
    return len(ts)


# --- trades ------------------------------------------------------------------------------


def _latest_price(conn: Connection, sym: str, side: str, opening: bool) -> float:
    """The price a market order gets now: :func:`db.queries.market_price` at
    the latest tick (read inside the writer's transaction, so it is the tick
    this batch sees)."""
    tick = queries.latest_tick(conn, sym)
    if tick is None:
        raise ValidationError(f"no price given and no tick stored for {sym}")
    return queries.market_price(tick, side, opening=opening)


def _event_ts(conn: Connection, trade_id: int, ts: int | None) -> int:
    """When the next event of trade ``trade_id`` is stamped: at ``ts`` (the monitor's, the time of
    the tick that moved the stop or reached the exit) or now, but never before the trade's last
    event (its opening, at least). A tick's ts is its feed's clock (a replayed file's, an
    exchange's), now is this writer's host's, and the opening's ts may be its caller's or another
    host's clock: any of them may be older than an event already recorded, and the history, read by
    time (:func:`db.queries.trade_events`), then showed the trade trailed or closed before it was
    opened, or closed before the change that preceded the close. One look-up on the events' trade
    index. ``closed_at`` is the closing event's ts."""
    last = conn.execute(select(func.max(trade_events_table.c.ts))
                        .where(trade_events_table.c.trade_id == trade_id)).scalar()
    stamp = now_ms() if ts is None else ts
    return stamp if last is None else max(stamp, last)


def _event(conn: Connection, trade_id: int, ts: int, kind: str, price_: float | None,
           pnl: float | None = None, detail: str = "") -> None:
    insert_row(conn, trade_events_table, dict(trade_id=trade_id, ts=ts, kind=kind, price=price_, pnl=pnl,
                                                 detail=detail))


def _open_trade_row(conn: Connection, trade_id: int) -> Any:
    # FOR UPDATE: on PostgreSQL writers of several hosts may close or change one trade at once; the
    # second waits for the first (up to TICKSTACK_LOCK_TIMEOUT_MS, then retried) and then sees it
    # closed (SQLite: one writer, the clause is left out).
    row = conn.execute(select(trades_table).where(trades_table.c.id == trade_id).with_for_update()).first()
    if row is None:
        raise NotFound(f"trade {trade_id} does not exist")
    if row.status != "open":
        raise Conflict(f"trade {trade_id} is already {row.status}")
    return row


def _check_trail(side: str, entry: float, trailing_distance: float) -> None:
    """Refuse a sell whose trailing stop starts as no price: entry + trailing_distance at or over
    the price limit, by the rule update_trade applies to the stops the monitor proposes
    (:func:`db.validation.price` on ``stop_loss``).

    A sell's trail is best ask + distance, and the best ask only falls from the entry: a distance
    that passes here gives a stop the writer takes at every tick. One that does not gives stops the
    writer refuses (they crashed the monitor at every start); they would become prices only once the
    ask fell below limit - distance, and then sit just under the limit, no stop at all. A buy's
    trail, best bid - distance, is never over the limit (a bid is a price); at or below 0 it is not
    in force until the bid passes the distance, a wide trailing stop that later works: accepted."""
    if side == "sell":
        price(f"trailing_distance: the trailing stop of a sell at {entry} (entry + {trailing_distance})",
              entry + trailing_distance)


@op("open_trade", symbol=symbol, side=one_of("buy", "sell"), size=size,
    entry_price=(optional(price), False), stop_loss=(optional(price), False),
    take_profit=(optional(price), False), trailing_distance=(optional(distance), False),
    breakeven_trigger=(optional(distance), False), ts=(optional(sent_moment), False))
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
    check_levels(side, entry, stop_loss, take_profit)
    if trailing_distance is not None:
        _check_trail(side, entry, trailing_distance)
    ts = now_ms() if ts is None else ts
    last_tick = conn.execute(select(func.max(ticks_table.c.id))).scalar() or 0
    trade_id = conn.execute(insert(trades_table), dict(
        symbol=symbol, side=side, size=size, entry_price=entry, stop_loss=stop_loss, take_profit=take_profit,
        trailing_distance=trailing_distance, breakeven_trigger=breakeven_trigger, best_price=entry,
        status="open", opened_at=ts, last_tick_id=last_tick,
    )).inserted_primary_key[0]
    _event(conn, trade_id, ts, "opened", entry, detail=f"{side} {size:g} {symbol}")
    return {"id": trade_id, "entry_price": entry}


@op("update_trade", trade_id=integer(1), stop_loss=(optional(price), False),
    take_profit=(optional(price), False), best_price=(optional(price), False),
    last_tick_id=(optional(integer(0)), False), reason=(text(64), False), ts=(optional(moment), False))
def update_trade(conn: Connection, trade_id: int, stop_loss: float | None = None,
                 take_profit: float | None = None, best_price: float | None = None,
                 last_tick_id: int | None = None, reason: str = "update",
                 ts: int | None = None) -> dict[str, Any]:
    """Move a trade's stop or target, or record the monitor's progress. A
    change of stop or target is recorded as a trade event with ``reason``; a level sent at the value
    it has is no change: a monitor that gave up on a move the writer then applied sends it again,
    as a new request, and recorded it twice."""
    row = _open_trade_row(conn, trade_id)
    values: dict[str, Any] = {}
    if stop_loss is not None:
        values["stop_loss"] = stop_loss
    if take_profit is not None:
        check_levels(row.side, row.entry_price, None, take_profit)
        values["take_profit"] = take_profit
    if best_price is not None:
        values["best_price"] = best_price
    if last_tick_id is not None:
        values["last_tick_id"] = max(last_tick_id, row.last_tick_id)
    if not values:
        raise ValidationError("update_trade: nothing to change")
    conn.execute(update(trades_table).where(trades_table.c.id == trade_id).values(**values))
    moved = {k: values[k] for k in ("stop_loss", "take_profit") if k in values and values[k] != getattr(row, k)}
    if moved:  # the event's price is the stop it set, if it moved it: the monitor reads its rule from it
        detail = ", ".join(f"{k} set to {value}" if getattr(row, k) is None else f"{k} {getattr(row, k)} -> {value}"
                           for k, value in moved.items())
        _event(conn, trade_id, _event_ts(conn, trade_id, ts), reason, moved.get("stop_loss"), detail=detail)
    return {"id": trade_id}


@op("close_trade", trade_id=integer(1), price=(optional(price), False), reason=(text(64), False),
    ts=(optional(moment), False), last_tick_id=(optional(integer(0)), False))
def close_trade(conn: Connection, trade_id: int, price: float | None = None, reason: str = "manual",
                ts: int | None = None, last_tick_id: int | None = None) -> dict[str, Any]:
    """Close a trade at ``price`` (or the latest tick) and record its P&L."""
    row = _open_trade_row(conn, trade_id)
    exit_price = price if price is not None else _latest_price(conn, row.symbol, row.side, opening=False)
    pnl = trade_pnl(row.side, row.entry_price, exit_price, row.size)
    ts = _event_ts(conn, trade_id, ts)
    values: dict[str, Any] = dict(status="closed", closed_at=ts, exit_price=exit_price, pnl=pnl,
                                  close_reason=reason)
    if last_tick_id is not None:
        values["last_tick_id"] = max(last_tick_id, row.last_tick_id)
    conn.execute(update(trades_table).where(trades_table.c.id == trade_id).values(**values))
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
    run_id = insert_row(conn, job_runs_table, dict(job=job, started_at=started_at, finished_at=finished_at,
                                                     duration_ms=finished_at - started_at, ok=ok, detail=detail))
    return {"id": run_id}


@op("audit", actor=label, action=label, target=(text(128), False),
    result=(one_of(*AUDIT_RESULTS), False), detail=(text(4000), False),
    ts=(optional(timestamp), False))
def audit(conn: Connection, actor: str, action: str, target: str = "", result: str = "ok",
          detail: str = "", ts: int | None = None) -> dict[str, int]:
    """Append to the audit log: who did what to what, and how it went."""
    entry_id = insert_row(conn, audit_log_table, dict(
        ts=now_ms() if ts is None else ts, actor=actor, action=action, target=target, result=result,
        detail=detail))
    return {"id": entry_id}


_SAMPLE_COLUMNS = ("ts", "name", "labels", "value")


@op("record_samples", quick=False, samples=rows(SAMPLE_FIELDS), keep_ms=(optional(integer(60_000)), False))
def record_samples(conn: Connection, samples: list[dict[str, Any]], keep_ms: int | None = None) -> dict[str, int]:
    """Store measurements for the charts; with ``keep_ms``, forget samples
    older than that (the series stay bounded)."""
    insert_many(conn, samples_table, _SAMPLE_COLUMNS,
                 ((s["ts"], s["name"], s.get("labels", ""), s["value"]) for s in samples))
    pruned = 0
    if keep_ms is not None:
        pruned = conn.execute(delete(samples_table).where(samples_table.c.ts < now_ms() - keep_ms)).rowcount
    return {"stored": len(samples), "pruned": pruned}


#: How long the checkpoint op waits for readers (SQLite's ``busy_timeout`` for it): it runs between two
#: batches, so every write waits as long. With the connection's 5 s, a reader holding a snapshot made
#: each asked checkpoint wait 5 s, as long as a client waits before it sends again (a new copy, which
#: waited too): writes took 10 to 52 s, the jobs worker's checkpoint never got its answer, and `db
#: checkpoint` none within its 30 s (fault hunt, round 40). Partial now, ``busy`` saying so, tried
#: again at the next run.
CHECKPOINT_OP_WAIT_MS = 200


@op("checkpoint", transactional=False, mode=(one_of("PASSIVE", "FULL", "RESTART", "TRUNCATE"), False))
def checkpoint(conn: Connection, mode: str = "TRUNCATE") -> dict[str, int]:
    """Checkpoint the WAL into the database (TRUNCATE also empties it). Runs
    between batches, outside any transaction; ``busy`` = 1 means a reader
    held it back (more than :data:`CHECKPOINT_OP_WAIT_MS`) and it is partial."""
    return engines.checkpoint(conn, mode, CHECKPOINT_OP_WAIT_MS)


# --- the writer's record of applied requests (not ops: the writer calls these) ----------------


def last_applied_seq(conn: Connection, client_id: str) -> int:
    """The highest request seq of ``client_id`` on record (0 for none)."""
    return conn.execute(select(func.max(applied_requests_table.c.seq))
                        .where(applied_requests_table.c.client_id == client_id)).scalar() or 0


def lookup_applied(conn: Connection, client_id: str, seq: int) -> tuple[bytes | None, bytes] | None:
    """The request applied as (client id, seq): its digest (None: recorded before schema v4) and its
    packed result; None when no request was."""
    row = conn.execute(select(applied_requests_table.c.digest, applied_requests_table.c.result).where(
        applied_requests_table.c.client_id == client_id, applied_requests_table.c.seq == seq)).first()
    return None if row is None else (row[0], row[1])


_APPLIED_COLUMNS = ("client_id", "seq", "committed_at", "result", "digest")


def record_clock_ms(conn: Connection) -> int:
    """Now, by the clock of the record of applied requests (epoch ms): on PostgreSQL the server's, the
    one clock that every host's writer and direct writes share (each prunes the others' records by it,
    and a host's own clock may be hours off: :mod:`workers.dedup`); on SQLite this host's (one per file)."""
    return server_now_ms(conn) if conn.dialect.name == "postgresql" else now_ms()


def record_applied(conn: Connection, client_id: str, seq: int, result: bytes, digest: bytes | None = None,
                   at: int | None = None) -> None:
    """Record one request as applied, with its packed result and its digest
    (:func:`db.protocol.request_digest`; None: not compared). The writer's careful path calls it
    in the request's own savepoint, so a request whose record cannot be stored fails alone and
    leaves no effect behind (a second record of the same request is an IntegrityError, never
    ignored). ``at``: when, by the record's clock (the writer's: :mod:`workers.dedup`; else
    :func:`record_clock_ms`)."""
    record_applied_many(conn, [(client_id, seq, result, digest)], at)


def record_applied_many(conn: Connection, records: Iterable[tuple[str, int, bytes, bytes | None]],
                        at: int | None = None) -> None:
    """Record many requests as applied, ``(client id, seq, packed result, digest)`` each, in one
    executemany: the writer's fast path, one statement per batch. Any error fails the whole
    statement, and the writer then runs the batch again with a record per request
    (:func:`record_applied`). ``at``: the records' time (:func:`record_clock_ms` when not given)."""
    at = record_clock_ms(conn) if at is None else at
    insert_many(conn, applied_requests_table, _APPLIED_COLUMNS,
                 ((cid, seq, at, result, digest) for cid, seq, result, digest in records))


def shift_applied(conn: Connection, until: int, by: int, after: int | None = None) -> int:
    """Move the records made at or before ``until`` (ms), and after ``after`` if given, ``by`` ms later
    (earlier if negative); how many (the wall clock jumped: :mod:`workers.dedup`)."""
    stamp = applied_requests_table.c.committed_at
    made = stamp <= until if after is None else (stamp <= until) & (stamp > after)
    return conn.execute(update(applied_requests_table).where(made).values(committed_at=stamp + by)).rowcount


def newest_applied(conn: Connection) -> int | None:
    """The newest record's time (``committed_at``), None for an empty record."""
    return conn.execute(select(func.max(applied_requests_table.c.committed_at))).scalar()


def compile_applied_records(conn: Connection) -> None:
    """Have the statements of the record of applied requests (both look-ups, the record, the prune)
    compiled for ``conn``'s dialect, changing nothing (the prune's cutoff is 0): the writer does it
    before it serves, so that its first batch, often full of requests resent after a restart, does
    not."""
    last_applied_seq(conn, "")
    lookup_applied(conn, "", 0)
    newest_applied(conn)  # the record's clock, read at the first batch (workers.dedup)
    compile_insert(conn.dialect, applied_requests_table, _APPLIED_COLUMNS)  # record_applied_many's
    prune_applied(conn, 0)


def prune_applied(conn: Connection, older_than_ms: int) -> int:
    applied = applied_requests_table
    return conn.execute(delete(applied).where(applied.c.committed_at < older_than_ms)).rowcount
