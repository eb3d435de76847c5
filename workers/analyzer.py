"""The analysis worker's fold: a chunk of ticks in, the bars and indicator values it changes out.

Pure logic over arrays (:mod:`workers.bars`, :class:`workers.indicators.IndicatorState`); the only
reads it makes go through a :class:`History` (the stored ticks and bars), which the worker backs with
the database and tests may back with anything.

For each symbol of a chunk, ticks (in arrival order) split in two:

* **In order** (ts at least that of every tick folded before): they extend the series. They are
  aggregated with numpy, continuing each timeframe's latest bar, and the indicators step once per
  new bar from their saved state. This is the whole path of a live feed or a replay.
* **Late** (an earlier ts than a tick already folded: a backfill, a historical file replayed into a
  live symbol, a feed that delivers out of order): every bar they belong to is recomputed from the
  stored ticks of its bucket (ids up to the chunk's end), with the same aggregation, so it is exactly
  the bar a clean, in-order replay gives. If a series changed before its latest bar, its indicators
  are recomputed from the first changed bar on (Wilder's averages depend on the whole history, so
  the series is replayed from its first stored bar; only values from the changed bar on are written).

A bar whose stored tick count is above what its bucket's stored ticks give had ticks deleted by
retention: recomputing it would lose them, so the late ticks are folded into the stored bar instead
(high, low, volume and count grow, open stays, the late ticks close it). Such bars are ``merged``;
the worker stores them only with the cursor, because folding twice would count twice.

Nothing is dropped: the counts of late ticks folded in and bars recomputed are in :class:`Output`.
"""
from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import numpy as np

from workers.bars import ORDERED, Bars, OpenBar, aggregate, concat, empty_bars, in_order, sequential_sums
from workers.indicators import SERIES, IndicatorState

STATE_VERSION = 2  # 1: before backfill (same series layout, a count of dropped late ticks)
TIMEFRAME_NAMES = tuple(tf for tf, _ in ORDERED)
LONGEST = ORDERED[-1][1]  # every bucket of every timeframe lies within one bucket of this length


class History(Protocol):
    """What the fold reads of the stored data, only for late ticks."""

    def ticks(self, symbol: str, ranges: Sequence[tuple[int, int]], max_id: int) -> list[tuple]:
        """(ts, price, volume) of ``symbol``'s stored ticks with ts in the [since, until) ranges (in
        ascending order) and id <= ``max_id``, in (ts, id) order."""

    def bars(self, symbol: str, timeframe: str, since: int, until: int) -> list[tuple]:
        """(ts, open, high, low, close, volume, tick_count) of the stored bars with since <= ts <= until."""

    def series(self, symbol: str, timeframe: str) -> list[tuple]:
        """(ts, high, low, close) of every stored bar of the series, in ts order."""


_ROW = np.dtype([("id", "i8"), ("symbol", "O"), ("ts", "i8"), ("price", "f8"), ("volume", "f8")])


@dataclass
class Chunk:
    """Ticks read after the cursor, as arrays in id order, with each symbol's positions."""

    ids: np.ndarray
    ts: np.ndarray
    price: np.ndarray
    volume: np.ndarray
    symbols: dict[str, np.ndarray]

    @classmethod
    def from_rows(cls, rows: Sequence[tuple]) -> Chunk:
        """From (id, symbol, ts, bid, volume) rows in id order."""
        arr = np.array(rows, dtype=_ROW)
        names = arr["symbol"].tolist()
        # Each symbol's code in order of first appearance, by builtins (no Python call per tick).
        codes = {s: i for i, s in enumerate(dict.fromkeys(names))}
        if len(codes) == 1:
            groups = {next(iter(codes)): np.arange(len(rows))}
        else:
            code = np.fromiter(map(codes.__getitem__, names), dtype=np.int64, count=len(rows))
            order = np.argsort(code, kind="stable")  # each symbol's positions, still in id order
            bounds = np.searchsorted(code[order], np.arange(len(codes) + 1))
            groups = {s: order[bounds[c]:bounds[c + 1]] for s, c in codes.items()}
        return cls(arr["id"].copy(), arr["ts"].copy(), arr["price"].copy(), arr["volume"].copy(), groups)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Output:
    """What one chunk changes, as columns for ``store_analysis``, and the state after it."""

    position: int
    ticks: int
    bars: dict[str, Any]  # columns (see Table)
    merged: dict[str, Any]  # stored only together with the cursor (see the module docstring)
    indicators: dict[str, Any]  # one row per bar, a column per indicator (see db.columns.indicators_in_columns)
    state: bytes
    #: symbol -> (late ticks folded in, bars recomputed or merged)
    backfill: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def late(self) -> int:
        return sum(n for n, _ in self.backfill.values())

    @property
    def recomputed(self) -> int:
        return sum(n for _, n in self.backfill.values())


class Table:
    """Rows gathered part by part (each part: one label per text column, arrays of numbers), handed
    over as columns: text columns as lists, number columns as ``array('q')`` / ``array('d')``, which
    :mod:`db.protocol` sends as packed columns, so no number becomes a Python object on the way."""

    def __init__(self, text: Sequence[str], numbers: Sequence[tuple[str, str]]) -> None:
        self.text, self.numbers = tuple(text), tuple(numbers)  # numbers: (name, array typecode)
        self._text: dict[str, list[str]] = {name: [] for name in self.text}
        self._parts: dict[str, list[np.ndarray]] = {name: [] for name, _ in self.numbers}
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def add(self, labels: tuple[str, ...], **numbers: np.ndarray) -> None:
        n = len(numbers[self.numbers[0][0]])
        if n:
            for name, label in zip(self.text, labels, strict=True):
                self._text[name] += [label] * n
            for name, _ in self.numbers:
                self._parts[name].append(numbers[name])
            self._rows += n

    def take(self, n: int) -> dict[str, Any]:
        """The first ``n`` rows as columns, removed from the table (the rest stay, in order)."""
        out: dict[str, Any] = {}
        for name in self.text:
            out[name], self._text[name] = self._text[name][:n], self._text[name][n:]
        for name, code in self.numbers:
            parts = self._parts[name]
            values = (np.concatenate(parts) if parts else np.empty(0)).astype(np.int64 if code == "q" else np.float64)
            out[name] = array(code, values[:n].tobytes())
            self._parts[name] = [values[n:]]
        self._rows = max(0, self._rows - n)
        return out

    def columns(self) -> dict[str, Any]:
        """Every row, as columns (the table is left empty)."""
        return self.take(self._rows)


#: What :meth:`Analyzer.process` calls with its tables of bars and indicator values as they fill
#: (ticks in order only): it may :meth:`Table.take` rows out and store them early.
Flush = Callable[[Table, Table], None]


def bar_table() -> Table:
    return Table(("symbol", "timeframe"), (("ts", "q"), ("open", "d"), ("high", "d"), ("low", "d"), ("close", "d"),
                                           ("volume", "d"), ("tick_count", "q")))


def indicator_table() -> Table:
    """Indicator values one row per bar (``store_analysis``'s per-bar form), NaN where there is none."""
    return Table(("symbol", "timeframe"), (("ts", "q"), *((name, "d") for name in SERIES)))


def _add_bars(table: Table, sym: str, tf: str, bars: Bars) -> None:
    table.add((sym, tf), ts=bars.ts, open=bars.open, high=bars.high, low=bars.low, close=bars.close,
              volume=bars.volume, tick_count=bars.tick_count)


class Analyzer:
    """The fold's state: per (symbol, timeframe) the latest bar and the indicator state, as of tick
    ``position``; :meth:`process` moves it over a chunk and returns what to store with it."""

    def __init__(self, position: int = 0, state: bytes | None = None) -> None:
        self.position = position
        self.open: dict[tuple[str, str], OpenBar] = {}
        self.indicators: dict[tuple[str, str], IndicatorState] = {}
        #: Since the worker first ran: late ticks folded in, bars recomputed, bars merged, series rewound.
        self.totals = {"late_ticks": 0, "bars_recomputed": 0, "bars_merged": 0, "series_rewound": 0}
        if state is not None:
            self._restore(state)
        elif position:
            raise ValueError(f"cursor at {position} but no state stored: cannot resume the open bars")

    # --- state -----------------------------------------------------------------------------

    def _restore(self, blob: bytes) -> None:
        data = msgpack.unpackb(blob)
        if data.get("v") not in (1, STATE_VERSION):
            raise ValueError(f"unsupported analysis state version {data.get('v')!r}")
        self.totals.update(data.get("totals", {}))
        for sym, tf, bar, ind in data["series"]:
            if tf in TIMEFRAME_NAMES:  # a timeframe dropped from the schema is forgotten
                self.open[(sym, tf)] = OpenBar.from_dict(bar)
                self.indicators[(sym, tf)] = IndicatorState.from_dict(ind)

    def state(self) -> bytes:
        series = [[sym, tf, bar.to_dict(), self.indicators[(sym, tf)].to_dict()]
                  for (sym, tf), bar in self.open.items()]
        return msgpack.packb({"v": STATE_VERSION, "totals": self.totals, "series": series})

    def watermark(self, symbol: str) -> int | None:
        """The latest ts folded for ``symbol`` (its latest bars all hold that tick), or None."""
        bar = self.open.get((symbol, TIMEFRAME_NAMES[0]))
        return None if bar is None else bar.last_ts

    # --- the fold --------------------------------------------------------------------------

    def process(self, chunk: Chunk, history: History, flush: Flush | None = None) -> Output:
        """Fold ``chunk`` (ticks after ``position``, in id order); returns what to store.

        Bars first (numpy, quick), then the indicators series by series (a Python loop per bar).
        ``flush``, when the chunk has no late ticks, is called with the tables of bars and indicator
        values after the bars and after each series, so that the caller can store full requests
        while the rest is computed; what it leaves in them is in the Output."""
        if len(chunk) and int(chunk.ids[0]) <= self.position:
            raise ValueError(f"tick {int(chunk.ids[0])} is not after position {self.position}")
        position = int(chunk.ids[-1]) if len(chunk) else self.position
        bars, merged = bar_table(), bar_table()
        inds = indicator_table()
        backfill: dict[str, tuple[int, int]] = {}
        series: list[tuple[str, str, Bars]] = []
        for sym, idx in chunk.symbols.items():
            changed, merged_tf, late, redone = self._symbol(sym, chunk, idx, position, history)
            for tf, part in changed.items():
                if len(part):
                    series.append((sym, tf, part))
                    _add_bars(bars, sym, tf, part.take(~np.isin(part.ts, merged_tf[tf].ts)))
                    _add_bars(merged, sym, tf, merged_tf[tf])
            if late:
                backfill[sym] = (late, redone)
        # Late ticks read stored bars (a snapshot after every store in flight): nothing early then.
        early = flush if not backfill else None
        if early is not None:
            early(bars, inds)
        for sym, tf, part in series:
            self._indicators(sym, tf, part, history, inds)
            if early is not None:
                early(bars, inds)
        self.position = position
        self.totals["late_ticks"] += sum(late for late, _ in backfill.values())
        self.totals["bars_recomputed"] += sum(redone for _, redone in backfill.values())
        merged_columns = merged.columns()
        self.totals["bars_merged"] += len(merged_columns["ts"])
        return Output(position, len(chunk), bars.columns(), merged_columns, inds.columns(), self.state(), backfill)

    def _symbol(self, sym: str, chunk: Chunk, idx: np.ndarray, position: int,
                history: History) -> tuple[dict[str, Bars], dict[str, Bars], int, int]:
        """The bars of ``sym`` this chunk changes, per timeframe in ts order (merged ones included, and
        also returned apart); updates the latest bars."""
        ts, price, volume = chunk.ts[idx], chunk.price[idx], chunk.volume[idx]
        ok = in_order(ts, self.watermark(sym))
        carries = {tf: self.open.get((sym, tf)) for tf in TIMEFRAME_NAMES}
        changed = aggregate(ts[ok], price[ok], volume[ok], carries)
        merged = {tf: empty_bars() for tf in TIMEFRAME_NAMES}
        late = int(len(ts) - np.count_nonzero(ok))
        redone = 0
        if late:
            order = np.lexsort((chunk.ids[idx], ts))  # the chunk's ticks of sym in (ts, id) order
            recomputed = self._recompute(sym, ts[~ok], position, history)
            for tf, length in ORDERED:
                rec, fold = _split_pruned(recomputed[tf], history.bars(sym, tf, *_span(recomputed[tf])))
                merged[tf] = _fold_into(fold, ts[order], price[order], volume[order], length)
                fresh = changed[tf]
                redo = concat([rec, merged[tf]])
                fresh = fresh.take(~np.isin(fresh.ts, redo.ts))
                both = concat([fresh, redo])
                changed[tf] = both.take(np.argsort(both.ts, kind="stable"))
                redone += len(redo)
        for tf in TIMEFRAME_NAMES:
            part = changed[tf]
            latest = self.open.get((sym, tf))
            if len(part) and (latest is None or int(part.ts[-1]) >= latest.ts):
                self.open[(sym, tf)] = part.bar(len(part) - 1)
        return changed, merged, late, redone

    def _recompute(self, sym: str, late_ts: np.ndarray, position: int, history: History) -> dict[str, Bars]:
        """Every bar holding a late tick, from the stored ticks of its bucket (ids <= position)."""
        days = np.unique(late_ts // LONGEST * LONGEST)
        ranges: list[tuple[int, int]] = []
        for d in days.tolist():  # consecutive days read as one range
            if ranges and ranges[-1][1] == d:
                ranges[-1] = (ranges[-1][0], d + LONGEST)
            else:
                ranges.append((d, d + LONGEST))
        rows = history.ticks(sym, ranges, position)
        arr = np.array(rows, dtype=np.float64).reshape(-1, 3)
        every = aggregate(arr[:, 0].astype(np.int64), arr[:, 1], arr[:, 2])
        out = {}
        for tf, length in ORDERED:
            out[tf] = every[tf].take(np.isin(every[tf].ts, np.unique(late_ts // length * length)))
        return out

    def _indicators(self, sym: str, tf: str, part: Bars, history: History, out: Table) -> None:
        """Indicator values at the changed bars ``part`` (ts order): one step per bar from the saved
        state, or, when a bar before the latest one changed, the series again from its start."""
        key = (sym, tf)
        state = self.indicators.get(key)
        first = int(part.ts[0])
        if state is None or state.current is None or first >= state.current[0]:
            state = self.indicators.setdefault(key, IndicatorState())
            ts, h, lo, c = part.ts, part.high, part.low, part.close
            emit_from = 0
        else:
            stored = np.array(history.series(sym, tf), dtype=np.float64).reshape(-1, 4)
            keep = ~np.isin(stored[:, 0].astype(np.int64), part.ts)
            ts = np.concatenate([stored[keep, 0].astype(np.int64), part.ts])
            order = np.argsort(ts, kind="stable")
            ts = ts[order]
            h, lo, c = (np.concatenate([stored[keep, k], col])[order] for k, col in
                        ((1, part.high), (2, part.low), (3, part.close)))
            state = self.indicators[key] = IndicatorState()
            emit_from = int(np.searchsorted(ts, first))
            self.totals["series_rewound"] += 1
        values = state.extend(ts.tolist(), h.tolist(), lo.tolist(), c.tolist())
        # One row per bar from the first with a value: None only before a value is first computable
        # (a series' warm-up), never after; numpy turns it into NaN, which the columns form reads as
        # "no value" (db.columns).
        start = min(next((i for i, v in enumerate(series) if v is not None), len(series)) for series in values)
        start = max(start, emit_from)
        out.add((sym, tf), ts=ts[start:], **{name: np.array(series[start:], dtype=np.float64)
                                             for name, series in zip(SERIES, values, strict=True)})


def _span(bars: Bars) -> tuple[int, int]:
    return (int(bars.ts[0]), int(bars.ts[-1])) if len(bars) else (0, -1)


def _split_pruned(rec: Bars, stored: list[tuple]) -> tuple[Bars, list[OpenBar]]:
    """(recomputed bars to keep, stored bars whose ticks were partly deleted by retention: the stored
    count is above what the stored ticks give)."""
    if not len(rec) or not stored:
        return rec, []
    counts = {int(r[0]): (int(r[6]), r) for r in stored}
    pruned = np.array([counts.get(t, (0, None))[0] > n for t, n in zip(rec.ts.tolist(), rec.tick_count.tolist(),
                                                                          strict=True)], dtype=bool)
    fold = [OpenBar.from_dict(dict(zip(("ts", "open", "high", "low", "close", "volume", "tick_count"),
                                       counts[t][1], strict=True))) for t in rec.ts[pruned].tolist()]
    return rec.take(~pruned), fold


def _fold_into(stored: list[OpenBar], ts: np.ndarray, price: np.ndarray, volume: np.ndarray,
               length: int) -> Bars:
    """Each stored bar with the chunk's ticks of its bucket folded in after it (ticks in (ts, id) order)."""
    parts = []
    buckets = ts // length * length
    for bar in stored:
        sel = buckets == bar.ts
        p, v = price[sel], volume[sel]
        parts.append(Bars(*(np.array([x]) for x in (
            bar.ts, bar.open, max(bar.high, float(p.max())), min(bar.low, float(p.min())), float(p[-1]),
            float(sequential_sums(v, np.zeros(1, np.int64), bar.volume)[0]), bar.tick_count + len(p),
            bar.first_ts, int(ts[sel][-1])))))
    return concat(parts)
