"""OHLCV bars from arrays of ticks, with numpy: the analysis worker's aggregation (pure, no database).

The rule, everywhere in the stack: a bar is a function of the ticks in its bucket (``floor(ts / length)
* length``) taken in (ts, id) order. open is the first price, close the last, high and low the max and
min, tick_count the number of ticks and volume their volumes added one after another in that order.
Ties in ts go by id, i.e. by arrival.

Why "one after another": float addition is not associative, so the volume of a bar depends on the order
of its additions. The tick-by-tick fold the worker used before (and
:class:`workers.indicators.BarBuilder`) adds left to right; numpy's ``sum`` and ``add.reduceat`` add
pairwise, which rounds differently in the last bits. :func:`sequential_sums` adds left to right with
array operations, so the worker's bars are bit for bit those of the tick-by-tick fold, whatever the
chunking, and a bar recomputed from stored ticks equals the one built as they came.

Higher timeframes are derived from lower ones (every length divides the next): open, high, low, close
and tick_count of a 5m bar come from its 1m bars, and so on up. Only volume is summed from the ticks,
for the reason above.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from db.vocabulary import TIMEFRAMES

#: Timeframes shortest first; each one's length divides the next one's, so buckets nest.
ORDERED: tuple[tuple[str, int], ...] = tuple(sorted(TIMEFRAMES.items(), key=lambda kv: kv[1]))
if any(b % a for (_, a), (_, b) in zip(ORDERED, ORDERED[1:], strict=False)):  # pragma: no cover - schema guard
    raise ImportError(f"timeframe lengths must nest (each divides the next): {TIMEFRAMES}")

#: Segments up to this long are summed together, position by position; longer ones one by one.
_SHORT = 32


@dataclass(slots=True)
class OpenBar:
    """One bar as plain values, with the times of its first and last tick (``first_ts``, ``last_ts``)
    so that it can be continued exactly: the form of a series' latest bar in the worker's state."""

    ts: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    tick_count: int
    first_ts: int
    last_ts: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OpenBar:
        ts = int(d["ts"])
        return cls(ts, float(d["open"]), float(d["high"]), float(d["low"]), float(d["close"]), float(d["volume"]),
                   int(d.get("tick_count", 0)), int(d.get("first_ts", ts)), int(d.get("last_ts", ts)))


@dataclass(slots=True)
class Bars:
    """Bars of one timeframe as columns, in bucket order."""

    ts: np.ndarray  # int64 bucket starts
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    tick_count: np.ndarray  # int64
    first_ts: np.ndarray  # int64
    last_ts: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.ts)

    def bar(self, i: int) -> OpenBar:
        return OpenBar(int(self.ts[i]), float(self.open[i]), float(self.high[i]), float(self.low[i]),
                       float(self.close[i]), float(self.volume[i]), int(self.tick_count[i]), int(self.first_ts[i]),
                       int(self.last_ts[i]))

    def take(self, index: np.ndarray) -> Bars:
        """The bars at ``index`` (positions or a boolean mask)."""
        return Bars(*(getattr(self, f)[index] for f in _FIELDS))

    def rows(self) -> Iterator[OpenBar]:
        cols = [getattr(self, f).tolist() for f in _FIELDS]
        return (OpenBar(*values) for values in zip(*cols, strict=True))


_FIELDS = tuple(OpenBar.__slots__)  # type: ignore[attr-defined]


def empty_bars() -> Bars:
    i, f = np.empty(0, np.int64), np.empty(0, np.float64)
    return Bars(i, f, f, f, f, f, i, i, i)


def concat(parts: list[Bars]) -> Bars:
    if not parts:
        return empty_bars()
    return Bars(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))


def segment_starts(keys: np.ndarray) -> np.ndarray:
    """Positions where a run of equal values starts in ``keys`` (which is sorted)."""
    if len(keys) == 0:
        return np.empty(0, np.int64)
    change = np.empty(len(keys), dtype=bool)
    change[0] = True
    np.not_equal(keys[1:], keys[:-1], out=change[1:])
    return np.flatnonzero(change)


def sequential_sums(values: np.ndarray, starts: np.ndarray, first: float | None = None) -> np.ndarray:
    """The sum of each segment ``values[starts[i]:starts[i + 1]]``, added left to right exactly as
    ``total = v0; total += v1; ...`` would (``first``, when given, is added before the first segment's
    values: a bar continued from an earlier chunk).

    Short segments are summed together: position k of every segment longer than k is added in one
    array operation, so the cost is one operation per position, not per segment. Longer segments use
    ``np.add.accumulate``, which is sequential by definition (every prefix is a result).
    """
    n = len(values)
    if len(starts) == 0:
        return np.empty(0, np.float64)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = n
    lengths = ends - starts
    out = values[starts].astype(np.float64, copy=True)
    if first is not None:
        out[0] = first + out[0]
    short = np.flatnonzero(lengths <= _SHORT)
    if len(short):
        s_starts, s_lengths = starts[short], lengths[short]
        for k in range(1, int(s_lengths.max())):
            alive = s_lengths > k
            if not alive.all():
                short, s_starts, s_lengths = short[alive], s_starts[alive], s_lengths[alive]
            out[short] += values[s_starts + k]
    for i in np.flatnonzero(lengths > _SHORT).tolist():
        s, e = int(starts[i]), int(ends[i])
        head = out[i : i + 1]  # values[s] (+ first), already in place
        out[i] = np.add.accumulate(np.concatenate([head, values[s + 1 : e]]))[-1]
    return out


def aggregate(ts: np.ndarray, price: np.ndarray, volume: np.ndarray,
              carries: Mapping[str, OpenBar | None] | None = None) -> dict[str, Bars]:
    """Bars of every timeframe from ticks of ONE symbol given in (ts, id) order.

    ``carries``: per timeframe, the series' latest bar before these ticks (from the state). When the
    first tick falls in its bucket, the bar continues it: open and first_ts stay, volume goes on adding.
    The caller guarantees the ticks come after it (ts >= its last_ts); an older carry bar is simply not
    part of the result.
    """
    carries = carries or {}
    out: dict[str, Bars] = {}
    n = len(ts)
    if n == 0:
        return {tf: empty_bars() for tf, _ in ORDERED}
    lower: Bars | None = None
    tick_starts = np.empty(0, np.int64)
    for tf, length in ORDERED:
        if lower is None:  # the shortest timeframe, from the ticks
            buckets = ts // length * length
            tick_starts = segment_starts(buckets)
            ends = np.append(tick_starts[1:], n)
            bars = Bars(buckets[tick_starts], price[tick_starts], np.maximum.reduceat(price, tick_starts),
                        np.minimum.reduceat(price, tick_starts), price[ends - 1], np.empty(0),
                        np.diff(np.append(tick_starts, n)), ts[tick_starts], ts[ends - 1])
        else:  # from the timeframe below: its bars group into ours
            group = segment_starts(lower.ts // length * length)
            last = np.append(group[1:], len(lower)) - 1
            tick_starts = tick_starts[group]
            bars = Bars(lower.ts[group] // length * length, lower.open[group],
                        np.maximum.reduceat(lower.high, group), np.minimum.reduceat(lower.low, group),
                        lower.close[last], np.empty(0), np.add.reduceat(lower.tick_count, group),
                        lower.first_ts[group], lower.last_ts[last])
        carry = carries.get(tf)
        joined = carry is not None and carry.ts == int(bars.ts[0])
        bars.volume = sequential_sums(volume, tick_starts, carry.volume if joined else None)
        lower = bars
        if joined:
            assert carry is not None
            bars = _continue(bars, carry)
        out[tf] = bars
    return out


def _continue(bars: Bars, carry: OpenBar) -> Bars:
    """``bars`` with its first bar continuing ``carry`` (volume already includes it)."""
    cols = {f: getattr(bars, f).copy() for f in _FIELDS}
    cols["open"][0] = carry.open
    cols["first_ts"][0] = carry.first_ts
    cols["high"][0] = max(carry.high, float(cols["high"][0]))
    cols["low"][0] = min(carry.low, float(cols["low"][0]))
    cols["tick_count"][0] += carry.tick_count
    return Bars(**cols)


def in_order(ts: np.ndarray, watermark: int | None) -> np.ndarray:
    """Mask of the ticks (in arrival order) whose ts is at least every earlier one's and ``watermark``
    (the latest ts already folded): those extend the series; the others are late."""
    if len(ts) == 0:
        return np.empty(0, dtype=bool)
    previous = np.empty_like(ts)
    previous[0] = np.iinfo(np.int64).min if watermark is None else watermark
    if len(ts) > 1:
        np.maximum.accumulate(ts[:-1], out=previous[1:])
        if watermark is not None:
            np.maximum(previous[1:], watermark, out=previous[1:])
    return ts >= previous
