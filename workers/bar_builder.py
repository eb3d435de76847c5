"""Ticks folded into OHLCV bars one at a time (:class:`BarBuilder`), exactly: the textbook form of
the rule that :mod:`workers.bars` implements on arrays for the analysis worker (tests hold the two to
each other, bit for bit; ``CsvFeed`` tests use it to check a replay rebuilds a file's bars). Pure
logic, no database."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from db.vocabulary import TIMEFRAMES
from workers.bars import OpenBar


def bucket_start(ts: int, timeframe_ms: int) -> int:
    """Start of the bucket holding ``ts``: floor division, so it is right for negative ts too."""
    return ts // timeframe_ms * timeframe_ms


class BarBuilder:
    """Current OHLCV bars per (symbol, timeframe), fed tick by tick (the reference fold).

    Bars are on the price the caller passes (the bid, by convention). Within a bucket, open and close
    are the prices of the earliest and latest tick by ts (ties: first arrival opens, last arrival
    closes). A tick for a bucket older than the current one cannot be folded here (the bucket's other
    ticks are gone): it is skipped for that timeframe and counted in ``late_ticks``. The analysis
    worker does not skip it: it recomputes that bar from the stored ticks (:mod:`workers.analyzer`).
    """

    def __init__(self, timeframes: Mapping[str, int] | None = None) -> None:
        self.timeframes = dict(TIMEFRAMES if timeframes is None else timeframes)
        self.late_ticks = 0
        self._current: dict[tuple[str, str], OpenBar] = {}
        self._dirty: dict[tuple[str, str, int], tuple[str, str, OpenBar]] = {}

    def add(self, symbol: str, ts: int, price: float, volume: float = 0.0) -> None:
        """Fold one tick into the current bar of every timeframe."""
        for tf, length in self.timeframes.items():
            start = bucket_start(ts, length)
            bar = self._current.get((symbol, tf))
            if bar is None or start > bar.ts:
                bar = OpenBar(start, price, price, price, price, volume, 1, ts, ts)
                self._current[(symbol, tf)] = bar
            elif start < bar.ts:
                self.late_ticks += 1
                continue
            else:
                bar.high = max(bar.high, price)
                bar.low = min(bar.low, price)
                if ts < bar.first_ts:
                    bar.open, bar.first_ts = price, ts
                if ts >= bar.last_ts:
                    bar.close, bar.last_ts = price, ts
                bar.volume += volume
                bar.tick_count += 1
            self._dirty[(symbol, tf, start)] = (symbol, tf, bar)

    def take_dirty(self) -> list[dict[str, Any]]:
        """Bars changed since the previous call, as new dicts, in order of first change.

        A bar that closed since the last call is included in its final state, before its successor,
        so per (symbol, timeframe) the list is in ts order.
        """
        out = [_public(symbol, tf, bar) for symbol, tf, bar in self._dirty.values()]
        self._dirty.clear()
        return out

    def load(self, bar: Mapping[str, Any]) -> None:
        """Make a stored bar the current one for its (symbol, timeframe), before any :meth:`add`.

        After a restart the partially built bar continues: later ticks in its bucket update it. A bar
        from :meth:`snapshot` carries the times of its open and close ticks, so even a tick that
        arrives out of order after the restart lands where it would have without one. A bar without
        them (e.g. from the bars table) keeps its open, and the next tick becomes the close (right
        when ticks come in order).
        """
        tf = bar["timeframe"]
        if tf not in self.timeframes:
            raise ValueError(f"unknown timeframe {tf!r}; known: {', '.join(self.timeframes)}")
        ts = int(bar["ts"])
        if ts % self.timeframes[tf]:
            raise ValueError(f"bar ts {ts} is not a {tf} bucket start")
        self._current[(bar["symbol"], tf)] = OpenBar.from_dict(bar)

    def current(self, symbol: str, timeframe: str) -> dict[str, Any] | None:
        """The bar currently being built for (symbol, timeframe), or None."""
        bar = self._current.get((symbol, timeframe))
        return None if bar is None else _public(symbol, timeframe, bar)

    def snapshot(self, symbol: str, timeframe: str) -> dict[str, Any] | None:
        """:meth:`current` plus the times of its open and close ticks: what :meth:`load` needs to
        continue the bar exactly after a restart."""
        bar = self._current.get((symbol, timeframe))
        return None if bar is None else {"symbol": symbol, "timeframe": timeframe, **bar.to_dict()}


def _public(symbol: str, timeframe: str, bar: OpenBar) -> dict[str, Any]:
    """A bar as the worker stores it: without the times of its first and last tick."""
    d = bar.to_dict()
    del d["first_ts"], d["last_ts"]
    return {"symbol": symbol, "timeframe": timeframe, **d}
