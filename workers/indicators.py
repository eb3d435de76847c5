"""Bars and indicators, built incrementally and exactly (pure logic, no database).

:class:`BarBuilder` folds ticks into OHLCV bars for every timeframe; the batch functions
(:func:`sma`, :func:`ema`, :func:`rsi_wilder`, :func:`atr_wilder`) define the indicators over a whole
series; :class:`IndicatorState` computes the same values one bar at a time from a small, serialisable
state. Batch and incremental share the same arithmetic steps, so they agree bit for bit, which is
what lets a worker restart from stored state without its numbers drifting from a recomputation.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

from db.models import INDICATORS, TIMEFRAMES

SMA_N, EMA_N, RSI_N, ATR_N = 20, 20, 14, 14
_SMA, _EMA, _RSI, _ATR = f"sma_{SMA_N}", f"ema_{EMA_N}", f"rsi_{RSI_N}", f"atr_{ATR_N}"
if {_SMA, _EMA, _RSI, _ATR} != set(INDICATORS):  # fail loudly if the schema's list changes
    raise ImportError(f"db.models.INDICATORS is {INDICATORS}; workers.indicators computes other ones")


def bucket_start(ts: int, timeframe_ms: int) -> int:
    """Start of the bucket holding ``ts``: floor division, so it is right for negative ts too."""
    return ts // timeframe_ms * timeframe_ms


# --------------------------------------------------------------------------- bars


@dataclass(slots=True)
class _Bar:
    symbol: str
    timeframe: str
    ts: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    tick_count: int
    first_ts: int  # ts of the tick that set open / close, so out-of-order ticks land right
    last_ts: int

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        del d["first_ts"], d["last_ts"]
        return d


class BarBuilder:
    """Current OHLCV bars per (symbol, timeframe), fed tick by tick.

    Bars are on the price the caller passes (the bid, by convention). Within a bucket, open and close
    are the prices of the earliest and latest tick by ts (ties: first arrival opens, last arrival
    closes), so ticks arriving out of order inside the current bucket are folded in correctly. A tick
    for a bucket older than the current one is dropped for that timeframe and counted in
    ``late_ticks`` (one count per timeframe that dropped it): the bar was already handed out as final.
    """

    def __init__(self, timeframes: Mapping[str, int] | None = None) -> None:
        self.timeframes = dict(TIMEFRAMES if timeframes is None else timeframes)
        self.late_ticks = 0
        self._current: dict[tuple[str, str], _Bar] = {}
        self._dirty: dict[tuple[str, str, int], _Bar] = {}

    def add(self, symbol: str, ts: int, price: float, volume: float = 0.0) -> None:
        """Fold one tick into the current bar of every timeframe."""
        for tf, length in self.timeframes.items():
            start = bucket_start(ts, length)
            bar = self._current.get((symbol, tf))
            if bar is None or start > bar.ts:
                bar = _Bar(symbol, tf, start, price, price, price, price, volume, 1, ts, ts)
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
            self._dirty[(symbol, tf, start)] = bar

    def take_dirty(self) -> list[dict[str, Any]]:
        """Bars changed since the previous call, as new dicts, in order of first change.

        A bar that closed since the last call is included in its final state, before its successor,
        so per (symbol, timeframe) the list is in ts order.
        """
        out = [bar.public() for bar in self._dirty.values()]
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
        self._current[(bar["symbol"], tf)] = _Bar(
            bar["symbol"], tf, ts, float(bar["open"]), float(bar["high"]), float(bar["low"]),
            float(bar["close"]), float(bar["volume"]), int(bar.get("tick_count", 0)),
            int(bar.get("first_ts", ts)), int(bar.get("last_ts", ts)),
        )  # fmt: skip

    def current(self, symbol: str, timeframe: str) -> dict[str, Any] | None:
        """The bar currently being built for (symbol, timeframe), or None."""
        bar = self._current.get((symbol, timeframe))
        return None if bar is None else bar.public()

    def snapshot(self, symbol: str, timeframe: str) -> dict[str, Any] | None:
        """:meth:`current` plus the times of its open and close ticks: what :meth:`load` needs to
        continue the bar exactly after a restart."""
        bar = self._current.get((symbol, timeframe))
        return None if bar is None else asdict(bar)


# --------------------------------------------------------------------------- shared arithmetic
# Batch and incremental code call exactly these, so both produce identical floats.


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _ema_step(prev: float, value: float, n: int) -> float:
    return prev + 2.0 / (n + 1) * (value - prev)


def _wilder_step(prev: float, value: float, n: int) -> float:
    return (prev * (n - 1) + value) / n


def _rsi_seed(closes: Sequence[float]) -> tuple[float, float]:
    """Average gain and loss over the changes of ``closes`` (n + 1 closes give n changes)."""
    changes = [b - a for a, b in pairwise(closes)]
    return _mean([max(d, 0.0) for d in changes]), _mean([max(-d, 0.0) for d in changes])


def _rsi(avg_gain: float, avg_loss: float) -> float:
    return 100.0 if avg_loss == 0 else 100.0 - 100.0 / (1.0 + avg_gain / avg_loss)


def _true_range(high: float, low: float, prev_close: float | None) -> float:
    if prev_close is None:
        return high - low
    return max(high - low, abs(high - prev_close), abs(low - prev_close))


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"period must be >= 1, got {n}")


# --------------------------------------------------------------------------- batch indicators


def sma(values: Sequence[float], n: int) -> list[float | None]:
    """Simple moving average of the last ``n`` values; None for the first n - 1 entries."""
    _check_n(n)
    values = list(values)
    return [None if i < n - 1 else _mean(values[i - n + 1 : i + 1]) for i in range(len(values))]


def ema(values: Sequence[float], n: int) -> list[float | None]:
    """Exponential moving average, alpha = 2 / (n + 1), seeded with the SMA of the first n values
    (entry n - 1); None before that."""
    _check_n(n)
    values = list(values)
    out: list[float | None] = [None] * len(values)
    if len(values) >= n:
        e = out[n - 1] = _mean(values[:n])
        for i in range(n, len(values)):
            e = out[i] = _ema_step(e, values[i], n)
    return out


def rsi_wilder(values: Sequence[float], n: int = 14) -> list[float | None]:
    """Wilder's RSI: the first averages are the plain means of the first n gains/losses (entry n),
    then avg = (prev * (n - 1) + cur) / n; RSI = 100 when the average loss is 0. None before entry n."""
    _check_n(n)
    values = list(values)
    out: list[float | None] = [None] * len(values)
    if len(values) > n:
        gain, loss = _rsi_seed(values[: n + 1])
        out[n] = _rsi(gain, loss)
        for i in range(n + 1, len(values)):
            d = values[i] - values[i - 1]
            gain, loss = _wilder_step(gain, max(d, 0.0), n), _wilder_step(loss, max(-d, 0.0), n)
            out[i] = _rsi(gain, loss)
    return out


def atr_wilder(
    highs: Sequence[float], lows: Sequence[float], closes: Sequence[float], n: int = 14
) -> list[float | None]:
    """Wilder's ATR: true range max(h - l, |h - prev close|, |l - prev close|), the first one h - l;
    the first ATR (entry n - 1) is the mean of the first n true ranges, then Wilder smoothing."""
    _check_n(n)
    if not len(highs) == len(lows) == len(closes):
        raise ValueError("highs, lows and closes must have the same length")
    trs = [_true_range(highs[i], lows[i], closes[i - 1] if i else None) for i in range(len(highs))]
    out: list[float | None] = [None] * len(trs)
    if len(trs) >= n:
        a = out[n - 1] = _mean(trs[:n])
        for i in range(n, len(trs)):
            a = out[i] = _wilder_step(a, trs[i], n)
    return out


# --------------------------------------------------------------------------- incremental


class IndicatorState:
    """The indicators of one (symbol, timeframe), one bar at a time.

    Feed bars with :meth:`update` in ts order; the last bar may be fed again and again while it is
    still being built. The state holds only the bars since the start or the last ``WINDOW`` closed
    bars (enough for every seed and SMA window) plus the EMA / Wilder averages as of the last closed
    bar, so its values equal the batch functions over the whole series while staying small.
    :meth:`to_dict` / :meth:`from_dict` turn it into plain lists and floats for storage.
    """

    WINDOW = max(SMA_N, EMA_N, RSI_N + 1, ATR_N) - 1
    VERSION = 1

    def __init__(self) -> None:
        self.count = 0  # closed bars folded in
        self.highs: list[float] = []  # the last WINDOW closed bars
        self.lows: list[float] = []
        self.closes: list[float] = []
        self.ema: float | None = None  # as of the last closed bar
        self.avg_gain: float | None = None
        self.avg_loss: float | None = None
        self.atr: float | None = None
        self.current: tuple[int, float, float, float] | None = None  # (ts, high, low, close)
        self.latest: dict[str, float] = {}  # values for the current bar
        self._next: tuple[float | None, ...] = (None,) * 4  # the averages once the current bar closes

    def update(self, bar: Mapping[str, Any]) -> dict[str, float]:
        """Apply a bar (``ts``, ``high``, ``low``, ``close``) and return the indicators computable at it.

        A bar with the current ts replaces the current bar; a later ts closes it first. An earlier ts
        raises ValueError: a bar cannot change once a later one exists.
        """
        ts = int(bar["ts"])
        if self.current is not None and ts != self.current[0]:
            if ts < self.current[0]:
                raise ValueError(f"bar ts {ts} is before the current bar's {self.current[0]}")
            self._close_current()
        self.current = (ts, float(bar["high"]), float(bar["low"]), float(bar["close"]))
        self._evaluate()
        return dict(self.latest)

    def _close_current(self) -> None:
        assert self.current is not None
        _, h, lo, c = self.current
        for window, value in ((self.highs, h), (self.lows, lo), (self.closes, c)):
            window.append(value)
            del window[: -self.WINDOW]
        self.count += 1
        self.ema, self.avg_gain, self.avg_loss, self.atr = self._next

    def _evaluate(self) -> None:
        """Values at the current bar from the closed-bar state.

        Every seed happens while the series is at most ``WINDOW + 1`` bars long, so the window then
        holds the whole series and the seed is the batch seed; after that only the averages step.
        """
        assert self.current is not None
        _, h, lo, c = self.current
        k = self.count + 1  # bars in the series, the current one included
        closes = [*self.closes, c]
        ema_, gain, loss, atr_ = self.ema, self.avg_gain, self.avg_loss, self.atr
        if k == EMA_N:
            ema_ = _mean(closes[-EMA_N:])
        elif ema_ is not None:
            ema_ = _ema_step(ema_, c, EMA_N)
        if k == RSI_N + 1:
            gain, loss = _rsi_seed(closes[-(RSI_N + 1) :])
        elif gain is not None and loss is not None:
            d = c - self.closes[-1]
            gain, loss = _wilder_step(gain, max(d, 0.0), RSI_N), _wilder_step(loss, max(-d, 0.0), RSI_N)
        if k == ATR_N:
            bars = list(zip([*self.highs, h], [*self.lows, lo], closes, strict=True))[-ATR_N:]
            atr_ = _mean([_true_range(bh, bl, bars[i - 1][2] if i else None) for i, (bh, bl, _) in enumerate(bars)])
        elif atr_ is not None:
            atr_ = _wilder_step(atr_, _true_range(h, lo, self.closes[-1]), ATR_N)
        values: dict[str, float] = {}
        if k >= SMA_N:
            values[_SMA] = _mean(closes[-SMA_N:])
        if ema_ is not None:
            values[_EMA] = ema_
        if gain is not None and loss is not None:
            values[_RSI] = _rsi(gain, loss)
        if atr_ is not None:
            values[_ATR] = atr_
        self.latest = values
        self._next = (ema_, gain, loss, atr_)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (ints, floats, lists, None) that :meth:`from_dict` restores exactly."""
        return {
            "version": self.VERSION,
            "count": self.count,
            "highs": list(self.highs),
            "lows": list(self.lows),
            "closes": list(self.closes),
            "ema": self.ema,
            "avg_gain": self.avg_gain,
            "avg_loss": self.avg_loss,
            "atr": self.atr,
            "current": None if self.current is None else list(self.current),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IndicatorState:
        """Rebuild a state saved by :meth:`to_dict` (ValueError for another format version)."""
        if data.get("version") != cls.VERSION:
            raise ValueError(f"unsupported IndicatorState version {data.get('version')!r}")
        state = cls()
        state.count = int(data["count"])
        state.highs, state.lows, state.closes = (list(map(float, data[k])) for k in ("highs", "lows", "closes"))
        state.ema, state.avg_gain, state.avg_loss, state.atr = (
            None if data[k] is None else float(data[k]) for k in ("ema", "avg_gain", "avg_loss", "atr")
        )
        if data["current"] is not None:
            ts, h, lo, c = data["current"]
            state.current = (int(ts), float(h), float(lo), float(c))
            state._evaluate()
        return state
