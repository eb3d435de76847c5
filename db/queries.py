"""The reads more than one place needs: the read side's counterpart of :mod:`db.ops`.

Each query is a plain function of a SQLAlchemy ``Connection`` or ``Session``
(the web apps pass Flask-SQLAlchemy's ``db.session`` on the read-only engine,
the workers their own read connections, and the writer its connection inside
the batch transaction), takes plain values and returns rows (attribute access
by column name, ``_asdict()`` for JSON), a :class:`Page` of rows (lists a
client pages through) or plain values. So a rule such as
"the latest tick of a symbol" or "what an open trade is worth now" is written
once, and the API, the console and the writer cannot drift apart.

Like the ops, queries stay portable SQL (SQLite or PostgreSQL).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, Select, and_, func, or_, select
from sqlalchemy.engine import Connection

from db.columns import BAR_INDICATOR_KEYS
from db.models import (
    ANALYSIS_CURSOR,
    SKIPPED,
    bars_table,
    cursors_table,
    job_runs_table,
    samples_table,
    ticks_table,
    trade_events_table,
    trade_pnl,
    trades_table,
)
from db.schema import BAR_INDICATORS

if TYPE_CHECKING:  # the ORM's Session is the web apps' (Flask-SQLAlchemy); the workers never load the ORM
    from sqlalchemy.orm import Session

    #: What a query runs on: a connection (workers, the writer) or a session (the web apps).
    Reader = Connection | Session

TICK_COLUMNS = tuple(ticks_table.c["id", "symbol", "ts", "bid", "ask", "volume", "source", "seq"])
BAR_COLUMNS = tuple(bars_table.c["ts", "open", "high", "low", "close", "volume"])
#: A trade as callers show it (``last_tick_id`` is the monitor's bookkeeping, left out).
TRADE_COLUMNS = tuple(trades_table.c[
    "id", "symbol", "side", "size", "entry_price", "stop_loss", "take_profit", "trailing_distance",
    "breakeven_trigger", "best_price", "status", "opened_at", "closed_at", "exit_price", "pnl", "close_reason"])
EVENT_COLUMNS = tuple(trade_events_table.c["id", "ts", "kind", "price", "pnl", "detail"])


@dataclass(frozen=True)
class Page:
    """One page of a list: its ``rows`` (in the order the list is shown), whether ``more`` rows lie
    beyond it in the direction of paging, and ``next``: the query parameters of the next page (merge
    them into the request's own), None when there is none. A page is cut at ``limit`` rows, so a
    caller always learns that a result was cut, and where to go on from."""

    rows: list[Row]
    more: bool
    next: dict[str, int] | None


def _cut(rows: Sequence[Row], limit: int | None) -> tuple[list[Row], bool]:
    """``rows`` (read with ``limit + 1``) cut to ``limit``, and whether there were more."""
    if limit is None or len(rows) <= limit:
        return list(rows), False
    return list(rows[:limit]), True


def _series_page(conn: Reader, stmt: Select, ts_column: Any, *, since: int | None, until: int | None, limit: int,
                 id_column: Any = None, after_id: int | None = None, before_id: int | None = None) -> Page:
    """A page of the series ``stmt`` (rows with a ``ts`` column, and an ``id`` with ``id_column``),
    always returned oldest first.

    Direction, as exchange APIs page (ccxt's ``fetch_ohlcv(since, limit)``, Binance's startTime):
    with ``since``, the *oldest* ``limit`` rows with ts >= since (paging forward); without it, the
    *newest* ``limit`` rows with ts <= until, or of all (paging backward). ``until`` bounds a forward
    page too.

    Rows are ordered by (ts, id). When ts is unique in the series (bars, indicator values), the
    cursor is ts alone: ``next`` is ``{"since": last ts + 1}`` forward, ``{"until": first ts - 1}``
    backward. When rows can share a ts (ticks), a ts alone would split or repeat the rows of that ts
    at a page boundary, so the cursor is (ts, id): ``{"since": ts, "after_id": id}`` means the rows
    after that row in (ts, id) order (ts > since, or ts = since and id > after_id), and
    ``{"until": ts, "before_id": id}`` the rows before it."""
    forward = since is not None
    if after_id is not None and (since is None or id_column is None):
        raise ValueError("after_id goes with since, on a series with ids")
    if before_id is not None and (until is None or forward or id_column is None):
        raise ValueError("before_id goes with until (and no since), on a series with ids")
    if since is not None:
        stmt = stmt.where(ts_column >= since)
        if after_id is not None:
            stmt = stmt.where(or_(ts_column > since, id_column > after_id))
    if until is not None:
        stmt = stmt.where(ts_column <= until)
        if before_id is not None:
            stmt = stmt.where(or_(ts_column < until, id_column < before_id))
    keys = (ts_column,) if id_column is None else (ts_column, id_column)
    order = [k.asc() if forward else k.desc() for k in keys]
    rows, more = _cut(conn.execute(stmt.order_by(*order).limit(limit + 1)).all(), limit)
    if not forward:
        rows.reverse()
    following: dict[str, int] | None = None
    if more:
        edge = rows[-1] if forward else rows[0]
        if id_column is None:
            following = {"since": edge.ts + 1} if forward else {"until": edge.ts - 1}
        else:
            following = ({"since": edge.ts, "after_id": edge.id} if forward
                         else {"until": edge.ts, "before_id": edge.id})
    return Page(rows, more, following)


# --- ticks and prices ------------------------------------------------------------------------


def latest_tick(conn: Reader, symbol: str) -> Row | None:
    """The latest tick of ``symbol`` (by ts, then id), or None when it has none."""
    return conn.execute(select(*TICK_COLUMNS).where(ticks_table.c.symbol == symbol)
                        .order_by(ticks_table.c.ts.desc(), ticks_table.c.id.desc()).limit(1)).first()


def latest_ticks(conn: Reader, symbols: Iterable[str]) -> dict[str, Row]:
    """Symbol -> its latest tick, for the symbols that have one (one index seek each)."""
    out = {}
    for symbol in symbols:
        tick = latest_tick(conn, symbol)
        if tick is not None:
            out[symbol] = tick
    return out


#: How many of a symbol's latest ticks tell its price precision, and the most decimals believed.
PRECISION_TICKS = 200
MAX_DECIMALS = 8


def decimals(value: float) -> int:
    """The decimals of the shortest decimal that gives ``value`` back (``repr``, as
    :func:`db.models.trade_pnl` reads prices): 1.08231 -> 5, 59245.0 -> 0; at most :data:`MAX_DECIMALS`."""
    exponent = Decimal(repr(float(value))).normalize().as_tuple().exponent
    return min(MAX_DECIMALS, max(0, -exponent)) if isinstance(exponent, int) else 0


def price_decimals(conn: Reader, symbols: Iterable[str], sample: int = PRECISION_TICKS,
                   configured: Mapping[str, int] | None = None) -> dict[str, int]:
    """Symbol -> the decimals its prices are quoted with: as ``configured`` (the settings'
    ``TICKSTACK_PRICE_DECIMALS``) when it names the symbol, else learned from its data: the most
    decimals of any bid or ask among its latest ``sample`` ticks (one tick is not enough: 1.08230
    is stored as 1.0823), or of its latest bars' prices when it has no tick. A symbol with neither is
    left out. The one precision rule: the console's tables, messages and chart axes all show prices
    with it."""
    out: dict[str, int] = {}
    for symbol in symbols:
        if configured and symbol in configured:
            out[symbol] = int(configured[symbol])  # an operator's word wins over a guess from the data
            continue
        tick, bar = ticks_table.c, bars_table.c
        rows = conn.execute(select(tick.bid, tick.ask).where(tick.symbol == symbol)
                            .order_by(tick.ts.desc(), tick.id.desc()).limit(sample)).all()
        if not rows:
            rows = conn.execute(select(bar.open, bar.high, bar.low, bar.close).where(bar.symbol == symbol)
                                .order_by(bar.ts.desc()).limit(sample)).all()
        if rows:
            out[symbol] = max(decimals(v) for row in rows for v in row)
    return out


def market_price(tick: Any, side: str, *, opening: bool) -> float:
    """The price a market order gets at ``tick``: a buy opens at the ask and closes at the bid, a
    sell the other way round. Marking an open trade to market uses the closing price (what closing
    it now would get)."""
    return float(tick.ask if (side == "buy") == opening else tick.bid)


def tick_series(conn: Reader, symbol: str, *, since: int | None = None, until: int | None = None, limit: int,
                after_id: int | None = None, before_id: int | None = None) -> Page:
    """A page of ``symbol``'s ticks by (ts, id), oldest first: from ``since`` (after the tick
    ``since, after_id``) forward, else the newest up to ``until`` (before the tick ``until,
    before_id``); see :func:`_series_page`."""
    stmt = select(*TICK_COLUMNS).where(ticks_table.c.symbol == symbol)
    return _series_page(conn, stmt, ticks_table.c.ts, since=since, until=until, limit=limit, id_column=ticks_table.c.id,
                        after_id=after_id, before_id=before_id)


# --- bars and indicators ---------------------------------------------------------------------


def bar_series(conn: Reader, symbol: str, timeframe: str, *, since: int | None = None, until: int | None = None,
               limit: int) -> Page:
    """A page of the bars of ``symbol`` and ``timeframe`` (ts: bucket start, unique), oldest first:
    the oldest ``limit`` from ``since``, else the newest up to ``until``; see :func:`_series_page`."""
    stmt = select(*BAR_COLUMNS).where(bars_table.c.symbol == symbol, bars_table.c.timeframe == timeframe)
    return _series_page(conn, stmt, bars_table.c.ts, since=since, until=until, limit=limit)


def indicator_series(conn: Reader, symbol: str, timeframe: str, name: str, *, since: int | None = None,
                     until: int | None = None, limit: int) -> Page:
    """A page of the values of indicator ``name`` for ``symbol`` and ``timeframe`` (ts: the bar's
    bucket start, unique), oldest first, as :func:`bar_series`: rows of (ts, value), read from its
    column of ``bar_indicators``: one range scan of its primary key."""
    table = BAR_INDICATORS
    if name not in table.c or name in BAR_INDICATOR_KEYS:  # not an indicator: it has no values
        return Page([], False, None)
    value = table.c[name]
    stmt = select(table.c.ts, value.label("value")).where(table.c.symbol == symbol, table.c.timeframe == timeframe,
                                                           value.is_not(None))
    return _series_page(conn, stmt, table.c.ts, since=since, until=until, limit=limit)


# --- the analysis worker's reads (plain tuples: it turns them into arrays) ------------------------


def _tuples(conn: Connection, stmt: Select) -> list[tuple]:
    """All rows of ``stmt`` as the driver's plain tuples: the statement is compiled for the dialect
    as usual, only SQLAlchemy's Row objects (about 0.5 us each) are skipped."""
    result = conn.execute(stmt)
    try:
        return result.cursor.fetchall()
    finally:
        result.close()


def analysed_through(conn: Reader) -> int | None:
    """The last tick id the analysis has read (its cursor, :data:`db.models.ANALYSIS_CURSOR`), None when
    it never ran in this database: retention deletes no tick after it (``prune_ticks``)."""
    return conn.execute(select(cursors_table.c.value).where(cursors_table.c.name == ANALYSIS_CURSOR)).scalar()


def oldest_deletable_tick_ts(conn: Reader, since: int | None = None) -> int | None:
    """The time of the oldest tick retention may delete (read by the analysis: id up to its cursor,
    when it has one, as ``prune_ticks`` deletes), dated ``since`` or later when given, None without
    one: how far retention may go in one run, and whether its cutoff held ticks back
    (:meth:`workers.jobs.JobsWorker.retention`). By time, not by id: a CSV replay of last month
    after the live ticks has ids after theirs, and a guard that went by the lowest id's time let a
    clock set forward delete the whole replayed month in one run. Symbol by symbol, each an index
    seek on ``ix_ticks_symbol_ts`` (no index on ts alone: ingest would pay for it), so no scan."""
    read_through = analysed_through(conn)
    oldest = None
    symbol = conn.execute(select(func.min(ticks_table.c.symbol))).scalar()
    while symbol is not None:
        first = select(ticks_table.c.ts).where(ticks_table.c.symbol == symbol)
        if since is not None:
            first = first.where(ticks_table.c.ts >= since)
        if read_through is not None:
            first = first.where(ticks_table.c.id <= read_through)
        ts = conn.execute(first.order_by(ticks_table.c.ts).limit(1)).scalar()
        if ts is not None and (oldest is None or ts < oldest):
            oldest = ts
        symbol = conn.execute(select(func.min(ticks_table.c.symbol)).where(ticks_table.c.symbol > symbol)).scalar()
    return oldest


def ticks_after(conn: Connection, after_id: int, limit: int, through: int | None = None) -> list[tuple]:
    """(id, symbol, ts, bid, volume) of the first ``limit`` ticks with id > ``after_id``, in id order;
    only ids up to ``through`` when given (:meth:`db.tick_horizon.TickHorizon.advance`: none of them
    can still come)."""
    stmt = select(*ticks_table.c["id", "symbol", "ts", "bid", "volume"]).where(ticks_table.c.id > after_id)
    if through is not None:  # None (SQLite): the very statement as before, so nothing changes there
        stmt = stmt.where(ticks_table.c.id <= through)
    return _tuples(conn, stmt.order_by(ticks_table.c.id).limit(limit))


def symbol_ticks_between(conn: Connection, symbol: str, since: int, until: int, max_id: int) -> list[tuple]:
    """(ts, bid, volume) of ``symbol``'s ticks with since <= ts < until and id <= ``max_id``, in (ts, id)
    order: the order that defines a bar (one range scan of the (symbol, ts) index)."""
    tick = ticks_table.c
    return _tuples(conn, select(tick.ts, tick.bid, tick.volume)
                   .where(tick.symbol == symbol, tick.ts >= since, tick.ts < until, tick.id <= max_id)
                   .order_by(tick.ts, tick.id))


def bars_between(conn: Connection, symbol: str, timeframe: str, since: int, until: int) -> list[tuple]:
    """(ts, open, high, low, close, volume, tick_count) of the stored bars with since <= ts <= until."""
    bar = bars_table.c
    return _tuples(conn, select(*BAR_COLUMNS, bar.tick_count)
                   .where(bar.symbol == symbol, bar.timeframe == timeframe, bar.ts >= since, bar.ts <= until)
                   .order_by(bar.ts))


def bar_hlc(conn: Connection, symbol: str, timeframe: str) -> list[tuple]:
    """(ts, high, low, close) of every stored bar of the series, oldest first: what its indicators need."""
    bar = bars_table.c
    return _tuples(conn, select(bar.ts, bar.high, bar.low, bar.close)
                   .where(bar.symbol == symbol, bar.timeframe == timeframe).order_by(bar.ts))


#: Samples the analysis worker records when late ticks were folded into bars (labels: the symbol).
BACKFILL_TICKS = "analysis_backfill_ticks"
BACKFILL_BARS = "analysis_backfill_bars"


def backfills(conn: Reader, since_ms: int) -> list[dict[str, Any]]:
    """Per symbol, the late ticks folded in and bars recomputed since ``since_ms``, with the time of the
    latest backfill; most recent first. From the samples the analysis worker records."""
    sample = samples_table.c
    stmt = (select(sample.labels, sample.name, func.sum(sample.value), func.max(sample.ts))
            .where(sample.name.in_((BACKFILL_TICKS, BACKFILL_BARS)), sample.ts >= since_ms)
            .group_by(sample.labels, sample.name))
    out: dict[str, dict[str, Any]] = {}
    for symbol, name, total, latest in conn.execute(stmt).all():
        row = out.setdefault(symbol, {"symbol": symbol, "ticks": 0, "bars": 0, "latest": 0})
        row["ticks" if name == BACKFILL_TICKS else "bars"] = int(total or 0)
        row["latest"] = max(row["latest"], int(latest or 0))
    return sorted(out.values(), key=lambda r: r["latest"], reverse=True)


# --- trades ----------------------------------------------------------------------------------


def trade(conn: Reader, trade_id: int) -> Row | None:
    """The trade with id ``trade_id``, or None."""
    return conn.execute(select(*TRADE_COLUMNS).where(trades_table.c.id == trade_id)).first()


def trade_events(conn: Reader, trade_id: int) -> list[Row]:
    """The events of trade ``trade_id``, oldest first."""
    return list(conn.execute(select(*EVENT_COLUMNS).where(trade_events_table.c.trade_id == trade_id)
                             .order_by(trade_events_table.c.ts, trade_events_table.c.id)).all())


def trades(conn: Reader, *, status: str | None = None, symbol: str | None = None, limit: int | None = None,
           before_id: int | None = None) -> Page:
    """A page of trades newest first (by id, unique), only ``status`` and ``symbol`` when given and
    only ids below ``before_id``; at most ``limit`` (None: all). ``next`` is ``{"before_id": the last
    id}``."""
    stmt = select(*TRADE_COLUMNS)
    if status is not None:
        stmt = stmt.where(trades_table.c.status == status)
    if symbol is not None:
        stmt = stmt.where(trades_table.c.symbol == symbol)
    if before_id is not None:
        stmt = stmt.where(trades_table.c.id < before_id)
    rows, more = _cut(conn.execute(stmt.order_by(trades_table.c.id.desc())
                                   .limit(None if limit is None else limit + 1)).all(), limit)
    return Page(rows, more, {"before_id": rows[-1].id} if more else None)


@dataclass(frozen=True)
class Mark:
    """An open trade marked to market: the price closing it now would get (from the latest tick of
    its symbol) and the unrealised P&L at that price (:func:`db.models.trade_pnl`, the rule that
    ``close_trade`` realises)."""

    price: float
    ts: int
    tick_id: int
    pnl: float


def marks(conn: Reader, trades_: Sequence[Any]) -> dict[int, Mark | None]:
    """Trade id -> its :class:`Mark` for each open trade of ``trades_`` (rows with id, symbol, side,
    size, entry_price, status); None for one whose symbol has no tick. The latest tick of each
    symbol is read once."""
    open_ = [t for t in trades_ if t.status == "open"]
    ticks = latest_ticks(conn, sorted({t.symbol for t in open_}))
    out: dict[int, Mark | None] = {}
    for t in open_:
        tick = ticks.get(t.symbol)
        if tick is None:
            out[t.id] = None
            continue
        price = market_price(tick, t.side, opening=False)
        out[t.id] = Mark(price, tick.ts, tick.id, trade_pnl(t.side, t.entry_price, price, t.size))
    return out


# --- samples (the console's charts) ------------------------------------------------------------


def samples_since(conn: Reader, names: Sequence[str], since_ms: int) -> list[Row]:
    """Samples (name, labels, ts, value) of the series ``names`` since ``since_ms``, in time order."""
    sample = samples_table.c
    return list(conn.execute(select(sample.name, sample.labels, sample.ts, sample.value)
                             .where(sample.name.in_(names), sample.ts >= since_ms)
                             .order_by(sample.ts, sample.id)).all())


def latest_sample(conn: Reader, name: str, since_ms: int) -> Row | None:
    """The latest sample (ts, value) of series ``name`` since ``since_ms``, or None."""
    sample = samples_table.c
    return conn.execute(select(sample.ts, sample.value).where(sample.name == name, sample.ts >= since_ms)
                        .order_by(sample.ts.desc()).limit(1)).first()


#: A job run as the console and doctor read it, with ``skipped``: an ok run whose check could not be
#: made (its detail starts with :data:`db.models.SKIPPED`), neither passed nor failed. Compared by
#: substring, not LIKE, which SQLite matches without regard to case.
JOB_RUN_COLUMNS = (*job_runs_table.c, and_(job_runs_table.c.ok,
                                            func.substr(job_runs_table.c.detail, 1, len(SKIPPED)) == SKIPPED)
                   .label("skipped"))


def job_runs(conn: Reader, limit: int, job: str | None = None) -> list[Row]:
    """The last ``limit`` job runs recorded (of ``job`` when given), the last recorded first
    (:data:`JOB_RUN_COLUMNS`): by id, an index's order, so that only those rows are read. The table is
    never pruned (a checkpoint every 30 s under load); ordered by start time, each read sorted every
    run of it, or of the job (about 0.1 s at 300,000 runs, at each view of the console's page)."""
    run = job_runs_table.c
    stmt = select(*JOB_RUN_COLUMNS)
    if job is not None:
        stmt = stmt.where(run.job == job)
    return list(conn.execute(stmt.order_by(run.id.desc()).limit(limit)))


def last_recorded_job_run(conn: Reader, job: str) -> Row | None:
    """The last run of ``job`` recorded (:func:`job_runs`), or None: the console's, fast however many
    runs the table holds."""
    runs = job_runs(conn, 1, job)
    return runs[0] if runs else None


def last_job_run(conn: Reader, job: str) -> Row | None:
    """The last recorded run of ``job`` (by start time, then id: on PostgreSQL several hosts' jobs
    workers record runs, and ids are not given in start order), or None: doctor's, of the jobs that
    run a few times a day (it reads, and sorts, every run of ``job``)."""
    run = job_runs_table.c
    return conn.execute(select(*JOB_RUN_COLUMNS).where(run.job == job)
                        .order_by(run.started_at.desc(), run.id.desc()).limit(1)).first()


def sample_totals(conn: Reader, name: str, since_ms: int) -> dict[str, float]:
    """Label -> the sum of series ``name``'s values since ``since_ms`` (e.g. restarts per watcher)."""
    sample = samples_table.c
    rows = conn.execute(select(sample.labels, func.sum(sample.value))
                        .where(sample.name == name, sample.ts >= since_ms).group_by(sample.labels)).all()
    return {label: float(total or 0) for label, total in rows}


def table_stats(conn: Reader, sizes: bool = True) -> list[dict[str, Any]]:
    """Each table of the schema with its row count (``rows``) and the bytes it takes with its
    indexes (``bytes``; ``index_bytes`` of them in indexes), largest first. Sizes come from SQLite's
    ``dbstat`` (which reads every page: pass ``sizes=False`` on a large file) or PostgreSQL's
    ``pg_total_relation_size``; None where the database cannot say. Counts are exact (``count(*)``)."""
    from sqlalchemy import text

    from db.models import metadata
    from db.schema import BAR_INDICATORS

    dialect = conn.get_bind().dialect.name if hasattr(conn, "get_bind") else conn.dialect.name
    # Since schema v3 ``indicators`` is a view of ``bar_indicators`` (one row per bar): the table is
    # what takes the space.
    schema_tables = [t for t in metadata.sorted_tables if t.name != "indicators"] + [BAR_INDICATORS]
    tables = [t.name for t in schema_tables]
    out = {name: {"name": name, "rows": None, "bytes": None, "index_bytes": None} for name in tables}
    for t in schema_tables:
        out[t.name]["rows"] = conn.execute(select(func.count()).select_from(t)).scalar_one()
    if sizes and dialect == "sqlite":
        owner = dict(conn.execute(text("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')")
                                  ).all())
        for name, size in conn.execute(text("SELECT name, sum(pgsize) FROM dbstat GROUP BY name")).all():
            table = owner.get(name, name)
            if table in out:
                entry = out[table]
                entry["bytes"] = (entry["bytes"] or 0) + int(size or 0)
                if name != table:
                    entry["index_bytes"] = (entry["index_bytes"] or 0) + int(size or 0)
        for entry in out.values():
            if entry["bytes"] is not None and entry["index_bytes"] is None:
                entry["index_bytes"] = 0
    elif sizes and dialect == "postgresql":
        for name in tables:
            total, rel = conn.execute(text("SELECT pg_total_relation_size(CAST(:t AS regclass)), "
                                           "pg_relation_size(CAST(:t AS regclass))"), {"t": name}).one()
            out[name]["bytes"], out[name]["index_bytes"] = int(total), int(total) - int(rel)
    return sorted(out.values(), key=lambda e: (-(e["bytes"] or 0), -(e["rows"] or 0), e["name"]))
