"""Indicators over bars, computed in batch and incrementally, exactly (pure logic, no database).

The batch functions (:func:`sma`, :func:`ema`, :func:`rsi_wilder`, :func:`atr_wilder`) define the
indicators over a whole series; :class:`IndicatorState` computes the same values bar after bar from a
small, serialisable state. Batch and incremental share the same arithmetic steps, so they agree bit
for bit, which is what lets a worker restart from stored state, or recompute a series after a
backfill, without its numbers drifting from a recomputation.

The bars they are computed over are built by :mod:`workers.bars` (on arrays) and
:mod:`workers.bar_builder` (tick by tick).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from operator import lt
from typing import Any

import numpy as np

from db.vocabulary import INDICATORS

SMA_N, EMA_N, RSI_N, ATR_N = 20, 20, 14, 14
_SMA, _EMA, _RSI, _ATR = f"sma_{SMA_N}", f"ema_{EMA_N}", f"rsi_{RSI_N}", f"atr_{ATR_N}"
#: From this many bars an :meth:`IndicatorState.extend` call computes those after the seeds in bulk
#: (:meth:`_Run.bulk`); fewer go bar by bar, as fast.
BULK_MIN = 64
#: The order of :meth:`IndicatorState.extend`'s value lists.
SERIES = (_SMA, _EMA, _RSI, _ATR)
if {_SMA, _EMA, _RSI, _ATR} != set(INDICATORS):  # fail loudly if the schema's list changes
    raise ImportError(f"db.vocabulary.INDICATORS is {INDICATORS}; workers.indicators computes other ones")


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
    """The indicators of one (symbol, timeframe), bar after bar.

    Feed bars in ts order with :meth:`extend` (many at once) or :meth:`update` (one); the first bar
    fed may be the current one again, while it is still being built. The state holds only the last
    ``WINDOW`` closed bars (enough for every seed and SMA window) plus the EMA / Wilder averages as of
    the last closed bar, so its values equal the batch functions over the whole series while staying
    small. :meth:`to_dict` / :meth:`from_dict` turn it into plain lists and floats for storage.

    One loop (:meth:`extend`) does the arithmetic for both entry points, with the batch functions'
    own steps, so the values are the same floats however the bars are fed.
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
        self.extend([int(bar["ts"])], [float(bar["high"])], [float(bar["low"])], [float(bar["close"])])
        return dict(self.latest)

    def extend(self, ts: Sequence[int], highs: Sequence[float], lows: Sequence[float],
               closes: Sequence[float]) -> tuple[list[float | None], ...]:
        """Apply bars in ts order; returns (sma, ema, rsi, atr) lists with each bar's values, None where
        a value is not computable yet. Same rules as :meth:`update`, one call for a whole chunk.

        Every seed happens while the series is at most ``WINDOW + 1`` bars long, so the window then
        holds the whole series and the seed is the batch seed; after that only the averages step.
        The steps are :func:`_ema_step`, :func:`_wilder_step`, :func:`_rsi` and :func:`_true_range`
        written out (same expressions, same order of operations, so the same floats: the tests hold
        them to the batch functions exactly): this runs once per bar of every series. A long run of
        new bars past the seeds (a history caught up on) goes in bulk, :meth:`_Run.bulk`: the same
        floats, about a third of the time (0.055 s instead of 0.157 s for the 45,209 bars of
        ``bench analysis --only hourly``).
        """
        n = len(ts)
        if not n == len(highs) == len(lows) == len(closes):
            raise ValueError(f"ts, highs, lows and closes must have the same length, got {len(ts)}, "
                             f"{len(highs)}, {len(lows)} and {len(closes)}")
        run = _Run(self)
        # Bar by bar until every average is seeded (a series' first EMA_N bars at most); then, when
        # the rest are all new bars, in bulk (a history caught up on), else bar by bar to the end.
        head = n if n < BULK_MIN else min(n, max(1, EMA_N - self.count))
        run.fold(ts[:head], highs[:head], lows[:head], closes[:head])
        if head < n:
            if run.steady() and all(map(lt, ts[head - 1:n - 1], ts[head:])):
                run.bulk(ts[head:], highs[head:], lows[head:], closes[head:])
            else:
                run.fold(ts[head:], highs[head:], lows[head:], closes[head:])
        out_sma, out_ema, out_rsi, out_atr = run.out
        if not out_sma:
            return out_sma, out_ema, out_rsi, out_atr
        window = self.WINDOW
        self.count, self.current, self._next = run.count, run.current, run.nxt
        self.highs, self.lows, self.closes = run.hs[-window:], run.ls[-window:], run.cs[-window:]
        self.ema, self.avg_gain, self.avg_loss, self.atr = run.ema_c, run.gain_c, run.loss_c, run.atr_c
        latest = (out_sma[-1], out_ema[-1], out_rsi[-1], out_atr[-1])
        self.latest = {name: v for name, v in zip(SERIES, latest, strict=True) if v is not None}
        return out_sma, out_ema, out_rsi, out_atr

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
            state.extend([int(ts)], [float(h)], [float(lo)], [float(c)])  # the values at the current bar
        return state


class _Run:
    """One :meth:`IndicatorState.extend` call's working state: the state's fields as locals, the
    closed bars' lists grown as bars close, and the four output lists."""

    __slots__ = ("count", "hs", "ls", "cs", "ema_c", "gain_c", "loss_c", "atr_c", "current", "nxt", "out")

    def __init__(self, state: IndicatorState) -> None:
        self.count = state.count
        self.hs, self.ls, self.cs = list(state.highs), list(state.lows), list(state.closes)
        self.ema_c, self.gain_c, self.loss_c, self.atr_c = state.ema, state.avg_gain, state.avg_loss, state.atr
        self.current, self.nxt = state.current, state._next
        self.out: tuple[list[float | None], ...] = ([], [], [], [])

    def steady(self) -> bool:
        """Whether the next new bar's values need the steady steps only (every average known)."""
        return self.current is not None and self.count + 2 >= SMA_N and all(v is not None for v in self.nxt)

    def fold(self, ts: Sequence[int], highs: Sequence[float], lows: Sequence[float],
             closes: Sequence[float]) -> None:
        """Bar after bar: every case (a bar replacing the current one, the seeds, the steady steps)."""
        count, hs, ls, cs = self.count, self.hs, self.ls, self.cs
        ema_c, gain_c, loss_c, atr_c = self.ema_c, self.gain_c, self.loss_c, self.atr_c
        current, nxt = self.current, self.nxt
        out_sma, out_ema, out_rsi, out_atr = self.out
        alpha, rsi_keep, atr_keep = 2.0 / (EMA_N + 1), RSI_N - 1, ATR_N - 1
        fsum, sma_tail = math.fsum, SMA_N - 1
        for t, h, lo, c in zip(ts, highs, lows, closes, strict=True):
            if current is not None and t != current[0]:
                if t < current[0]:
                    raise ValueError(f"bar ts {t} is before the current bar's {current[0]}")
                hs.append(current[1])
                ls.append(current[2])
                cs.append(current[3])
                count += 1
                ema_c, gain_c, loss_c, atr_c = nxt
            current = (t, h, lo, c)
            k = count + 1  # bars in the series, the current one included
            if ema_c is not None:
                ema_ = ema_c + alpha * (c - ema_c)  # _ema_step
            elif k == EMA_N:
                ema_ = _mean([*cs[-(EMA_N - 1):], c])
            else:
                ema_ = None
            if gain_c is not None and loss_c is not None:
                d = c - cs[-1]
                # max(d, 0.0) and max(-d, 0.0) exactly (signed zeros included), then _wilder_step
                gain = (gain_c * rsi_keep + (0.0 if 0.0 > d else d)) / RSI_N
                loss = (loss_c * rsi_keep + (0.0 if d > 0.0 else -d)) / RSI_N
                rsi_ = 100.0 if loss == 0 else 100.0 - 100.0 / (1.0 + gain / loss)  # _rsi
            elif k == RSI_N + 1:
                gain, loss = _rsi_seed([*cs[-RSI_N:], c])
                rsi_ = _rsi(gain, loss)
            else:
                gain = loss = rsi_ = None
            if atr_c is not None:
                pc = cs[-1]
                atr_ = (atr_c * atr_keep + max(h - lo, abs(h - pc), abs(lo - pc))) / ATR_N  # _true_range
            elif k == ATR_N:
                bh, bl, bc = [*hs[-(ATR_N - 1):], h], [*ls[-(ATR_N - 1):], lo], cs[-(ATR_N - 1):]
                atr_ = _mean([_true_range(bh[i], bl[i], bc[i - 1] if i else None) for i in range(ATR_N)])
            else:
                atr_ = None
            if k >= SMA_N:
                window = cs[-sma_tail:]
                window.append(c)
                out_sma.append(fsum(window) / SMA_N)  # _mean
            else:
                out_sma.append(None)
            nxt = (ema_, gain, loss, atr_)
            out_ema.append(ema_)
            out_rsi.append(rsi_)
            out_atr.append(atr_)
        self.count, self.current, self.nxt = count, current, nxt
        self.ema_c, self.gain_c, self.loss_c, self.atr_c = ema_c, gain_c, loss_c, atr_c

    @np.errstate(divide="ignore", invalid="ignore", over="ignore")  # silent, as Python's floats are
    def bulk(self, ts: Sequence[int], highs: Sequence[float], lows: Sequence[float],
             closes: Sequence[float]) -> None:
        """Bars that are all new (ts rising from the current bar's), every average seeded
        (:meth:`steady`): each bar closes the one before. The same floats as :meth:`fold`'s steady
        steps: the steps that depend only on the bar and the close before it (the change, its gain
        and loss, the true range, the RSI from the averages) as numpy's float64 operations, which
        are IEEE's as Python's are, written as :meth:`fold` writes them (``np.where`` for its
        conditionals and for ``max``, which keeps the first of equal values); the averages, each the
        previous one stepped, in a loop of their own; each SMA the ``fsum`` of its window, by
        :func:`_window_sums` when it can."""
        m = len(ts)
        assert self.current is not None
        alpha, rsi_keep, atr_keep = 2.0 / (EMA_N + 1), RSI_N - 1, ATR_N - 1
        ema, gain, loss, atr = self.nxt  # the current bar's, which the first of these closes
        c = np.array(closes, dtype=np.float64)
        h = np.array(highs, dtype=np.float64)
        lo = np.array(lows, dtype=np.float64)
        pc = np.empty(m)  # each bar's previous close
        pc[0] = self.current[3]
        pc[1:] = c[:-1]
        d = c - pc
        ups = np.where(0.0 > d, 0.0, d).tolist()  # (0.0 if 0.0 > d else d)
        downs = np.where(d > 0.0, 0.0, -d).tolist()  # (0.0 if d > 0.0 else -d)
        tr = h - lo  # max(h - lo, abs(h - pc), abs(lo - pc))
        for other in (np.abs(h - pc), np.abs(lo - pc)):
            tr = np.where(other > tr, other, tr)
        out_sma, out_ema, out_rsi, out_atr = self.out
        emas = []
        for x in closes:
            ema = ema + alpha * (x - ema)
            emas.append(ema)
        gains, losses = [], []
        for up, down in zip(ups, downs, strict=True):
            gain = (gain * rsi_keep + up) / RSI_N
            loss = (loss * rsi_keep + down) / RSI_N
            gains.append(gain)
            losses.append(loss)
        atrs = []
        for x in tr.tolist():
            atr = (atr * atr_keep + x) / ATR_N
            atrs.append(atr)
        g, lo_avg = np.array(gains), np.array(losses)
        rsis = np.where(lo_avg == 0, 100.0, 100.0 - 100.0 / (1.0 + g / lo_avg)).tolist()  # loss 0: 100
        before = [*self.cs, self.current[3]][-(SMA_N - 1):]  # the closed closes, the current bar's last
        seq = [*before, *closes]
        sums = _window_sums(np.array(seq, dtype=np.float64), SMA_N)
        if sums is not None:
            out_sma.extend((sums / SMA_N).tolist())
        else:
            fsum = math.fsum
            out_sma.extend([fsum(seq[i:i + SMA_N]) / SMA_N for i in range(m)])
        out_ema.extend(emas)
        out_rsi.extend(rsis)
        out_atr.extend(atrs)
        # The state after them: the current bar and those before the last closed, the averages as of
        # the last closed bar (the one before the last; the current bar's when only one came).
        window = IndicatorState.WINDOW
        self.hs = [*self.hs, self.current[1], *highs[max(0, m - 1 - window):m - 1]]
        self.ls = [*self.ls, self.current[2], *lows[max(0, m - 1 - window):m - 1]]
        self.cs = [*self.cs, self.current[3], *closes[max(0, m - 1 - window):m - 1]]
        self.count += m
        if m > 1:
            self.ema_c, self.gain_c, self.loss_c, self.atr_c = emas[-2], gains[-2], losses[-2], atrs[-2]
        else:
            self.ema_c, self.gain_c, self.loss_c, self.atr_c = self.nxt
        self.current = (ts[-1], highs[-1], lows[-1], closes[-1])
        self.nxt = (emas[-1], gains[-1], losses[-1], atrs[-1])


def _window_sums(values: np.ndarray, n: int) -> np.ndarray | None:
    """The sum of every ``n`` consecutive ``values``, each as ``math.fsum`` gives it (the exact sum,
    rounded once, half to even), or None when they are not all positive, finite and within a
    factor of 32 or so of each other (then the caller sums each window with ``fsum``).

    Why it is exact: every such double is an integer times 2 ** ``scale`` (the smallest exponent less
    53), the integer below 2 ** 58, so ``n`` of them add up exactly in int64 (a window's sum is below
    2 ** 63; the running sums may wrap, their differences are still exact, modulo 2 ** 64). Each sum
    is then rounded once to a double (a conversion rounds half to even, as ``fsum`` does), and
    scaled back by a power of two, which is exact. ``fsum`` per window costs about 0.9 us; this,
    0.1 us."""
    if not len(values) >= n >= 1 or not (np.isfinite(values).all() and (values > 0).all()):
        return None
    _, exponents = np.frexp(values)
    lo, hi = int(exponents.min()), int(exponents.max())
    # No int64 window may wrap; no result may be subnormal (ldexp would round it again) or overflow
    # (each value is below 2 ** hi: fsum raises there, and so does the caller's fallback to it).
    if n << (53 + hi - lo) >= 1 << 63 or lo < -960 or hi + n.bit_length() > 1023:
        return None
    scale = lo - 53
    ints = np.ldexp(values, -scale).astype(np.int64)
    running = np.zeros(len(ints) + 1, dtype=np.int64)
    np.cumsum(ints, out=running[1:])
    return np.ldexp((running[n:] - running[:-n]).astype(np.float64), scale)
