"""Tests for workers.indicators and workers.bar_builder: bar building, batch indicators, incremental IndicatorState."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from db.vocabulary import INDICATORS, TIMEFRAMES
from workers.bar_builder import BarBuilder, bucket_start
from workers.bars import OpenBar, aggregate, in_order, sequential_sums
from workers.feeds import SimFeed
from workers.indicators import (
    BULK_MIN,
    SERIES,
    IndicatorState,
    _window_sums,
    atr_wilder,
    ema,
    rsi_wilder,
    sma,
)

pytestmark = pytest.mark.database_independent(
    "bars and indicators are computed in memory here, and never stored")

T0 = 1_704_153_600_000  # 2024-01-02T00:00:00Z, a 1d boundary
MIN = 60_000


def test_bucket_start() -> None:
    assert bucket_start(T0 + 59_999, MIN) == T0
    assert bucket_start(T0 + 60_000, MIN) == T0 + MIN
    assert bucket_start(T0 + 299_999, 300_000) == T0
    assert bucket_start(-1, MIN) == -MIN  # floor, not truncation


# --------------------------------------------------------------------------- BarBuilder


def test_barbuilder_aggregates_every_timeframe() -> None:
    b = BarBuilder()
    for ts, price, vol in [(T0 + 1000, 10.0, 1.0), (T0 + 2000, 12.0, 2.0), (T0 + 3000, 9.0, 0.5)]:
        b.add("S", ts, price, vol)
    bars = b.take_dirty()
    assert [bar["timeframe"] for bar in bars] == list(TIMEFRAMES)
    for bar in bars:
        assert bar == {
            "symbol": "S", "timeframe": bar["timeframe"], "ts": T0, "open": 10.0, "high": 12.0,
            "low": 9.0, "close": 9.0, "volume": 3.5, "tick_count": 3,
        }  # fmt: skip
    assert b.take_dirty() == []
    b.add("S", T0 + 4000, 11.0, 0.0)
    b.add("T", T0 + 4000, 1.0, 0.0)
    assert len(b.take_dirty()) == 2 * len(TIMEFRAMES)


def test_barbuilder_hands_out_a_closed_bar_before_its_successor() -> None:
    b = BarBuilder({"1m": MIN})
    b.add("S", T0 + 1000, 10.0, 1.0)
    b.take_dirty()
    b.add("S", T0 + 2000, 11.0, 1.0)  # last change to the first bar
    b.add("S", T0 + MIN, 12.0, 1.0)  # opens the next bar
    b.add("S", T0 + 3 * MIN, 13.0, 1.0)  # a gap: no bar for the empty minute
    bars = b.take_dirty()
    assert [(x["ts"], x["close"], x["tick_count"]) for x in bars] == [
        (T0, 11.0, 2),
        (T0 + MIN, 12.0, 1),
        (T0 + 3 * MIN, 13.0, 1),
    ]


def test_barbuilder_out_of_order_ticks() -> None:
    b = BarBuilder({"1m": MIN, "5m": 300_000})
    b.add("S", T0 + 30_000, 2.0, 1.0)
    b.add("S", T0 + 10_000, 1.0, 1.0)  # earlier in the same bucket: becomes the open
    b.add("S", T0 + 20_000, 3.0, 1.0)  # not the latest: close stays 2.0
    assert b.current("S", "1m") == {
        "symbol": "S", "timeframe": "1m", "ts": T0, "open": 1.0, "high": 3.0, "low": 1.0,
        "close": 2.0, "volume": 3.0, "tick_count": 3,
    }  # fmt: skip
    b.add("S", T0 + MIN + 1, 5.0, 1.0)  # 1m bucket T0 closes
    b.add("S", T0 + 40_000, 0.5, 1.0)  # late for 1m: dropped there, still in the current 5m bar
    assert b.late_ticks == 1
    assert b.current("S", "1m")["low"] == 5.0  # type: ignore[index]
    five = b.current("S", "5m")
    assert five is not None and (five["low"], five["close"], five["tick_count"]) == (0.5, 5.0, 5)


def test_barbuilder_load_continues_a_partial_bar() -> None:
    b = BarBuilder()
    stored = {
        "symbol": "S", "timeframe": "1h", "ts": T0, "open": 10.0, "high": 11.0, "low": 9.0,
        "close": 10.5, "volume": 4.0, "tick_count": 7,
    }  # fmt: skip
    b.load(stored)
    assert b.take_dirty() == []  # loading is not a change
    b.add("S", T0 + 1_800_000, 11.5, 1.0)
    hour = [x for x in b.take_dirty() if x["timeframe"] == "1h"]
    assert hour == [{**stored, "high": 11.5, "close": 11.5, "volume": 5.0, "tick_count": 8}]
    with pytest.raises(ValueError, match="unknown timeframe"):
        b.load({**stored, "timeframe": "2h"})
    with pytest.raises(ValueError, match="not a 1h bucket start"):
        b.load({**stored, "ts": T0 + 1})


# --------------------------------------------------------------------------- batch, hand-checked


def test_hand_checked_values() -> None:
    # SMA(3) of 1..5: (1+2+3)/3 = 2, (2+3+4)/3 = 3, (3+4+5)/3 = 4.
    assert sma([1, 2, 3, 4, 5], 3) == [None, None, 2, 3, 4]
    # EMA(3), alpha = 0.5: seed (2+4+6)/3 = 4; then 4 + 0.5*(8-4) = 6; 6 + 0.5*(12-6) = 9.
    assert ema([2, 4, 6, 8, 12], 3) == [None, None, 4, 6, 9]
    # RSI(3) of 10, 11, 10.5, 11.5, 11: changes +1, -0.5, +1, -0.5.
    # First: avg gain (1+0+1)/3 = 2/3, avg loss 0.5/3 = 1/6, RS = 4, RSI = 100 - 100/5 = 80.
    # Next: gain (2/3*2 + 0)/3 = 4/9, loss (1/6*2 + 0.5)/3 = 5/18, RS = 1.6, RSI = 100 - 100/2.6.
    rsi = rsi_wilder([10, 11, 10.5, 11.5, 11], 3)
    assert rsi[:3] == [None, None, None]
    assert rsi[3] == pytest.approx(80.0, rel=1e-12) and rsi[4] == pytest.approx(61.538461538461, rel=1e-12)
    # ATR(2): TR = 2 (h-l), max(2, |11-9|, |9-9|) = 2, max(1.5, |14-10|, |12.5-10|) = 4.
    # First ATR = (2+2)/2 = 2; next (2*1 + 4)/2 = 3.
    assert atr_wilder([10, 11, 14], [8, 9, 12.5], [9, 10, 13], 2) == [None, 2.0, 3.0]
    assert rsi_wilder([1, 2, 3, 4], 3)[3] == 100.0  # no losses
    assert rsi_wilder([5, 5, 5, 5], 3)[3] == 100.0  # avg loss 0 counts as 100 too


def test_rsi14_on_the_stockcharts_example_data() -> None:
    # The closes of StockCharts' RSI(14) worked example. The 14 changes are
    # -0.25 +0.06 -0.54 +0.72 +0.50 +0.27 +0.32 +0.42 +0.24 -0.19 +0.14 -0.42 +0.67 0.00:
    # gains sum to 3.34, losses to 1.40, so RS = 3.34 / 1.40 and RSI = 100 - 100 / (1 + RS) = 70.4641...
    # (StockCharts prints 70.53 from rounded averages). Next change -0.28: avg gain 3.34/14 * 13/14,
    # avg loss (1.40/14 * 13 + 0.28) / 14, RSI = 66.2496...
    closes = [44.34, 44.09, 44.15, 43.61, 44.33, 44.83, 45.10, 45.42, 45.84, 46.08, 45.89, 46.03, 45.61]
    closes += [46.28, 46.28, 46.00]
    rsi = rsi_wilder(closes, 14)
    assert rsi[:14] == [None] * 14
    gain, loss = 3.34 / 14 * 13 / 14, (1.40 / 14 * 13 + 0.28) / 14
    assert rsi[14:] == pytest.approx([100 - 100 / (1 + 3.34 / 1.40), 100 - 100 / (1 + gain / loss)], rel=1e-9)
    assert rsi[14:] == pytest.approx([70.4641, 66.2496], abs=1e-4)


def test_short_series_and_bad_periods() -> None:
    assert sma([1.0], 2) == ema([1.0], 2) == [None]
    assert rsi_wilder([1.0, 2.0], 2) == [None, None]
    assert atr_wilder([], [], [], 3) == []
    with pytest.raises(ValueError):
        sma([1.0], 0)
    with pytest.raises(ValueError, match="same length"):
        atr_wilder([1.0], [1.0, 2.0], [1.0], 1)


# --------------------------------------------------------------------------- batch vs textbook loops


def textbook_sma(xs: list[float], n: int) -> list[float | None]:
    out: list[float | None] = []
    for i in range(len(xs)):
        if i + 1 < n:
            out.append(None)
        else:
            total = 0.0
            for j in range(i - n + 1, i + 1):
                total += xs[j]
            out.append(total / n)
    return out


def textbook_ema(xs: list[float], n: int) -> list[float | None]:
    alpha, out, prev = 2 / (n + 1), [], None
    for i, x in enumerate(xs):
        if i + 1 < n:
            out.append(None)
            continue
        prev = sum(xs[:n]) / n if i + 1 == n else alpha * x + (1 - alpha) * prev
        out.append(prev)
    return out


def textbook_rsi(xs: list[float], n: int) -> list[float | None]:
    out: list[float | None] = [None] * len(xs)
    gains = [max(xs[i] - xs[i - 1], 0) for i in range(1, len(xs))]
    losses = [max(xs[i - 1] - xs[i], 0) for i in range(1, len(xs))]
    avg_g = avg_l = 0.0
    for i in range(n, len(xs)):
        if i == n:
            avg_g, avg_l = sum(gains[:n]) / n, sum(losses[:n]) / n
        else:
            avg_g = (avg_g * (n - 1) + gains[i - 1]) / n
            avg_l = (avg_l * (n - 1) + losses[i - 1]) / n
        out[i] = 100.0 if avg_l == 0 else 100 * avg_g / (avg_g + avg_l)
    return out


def textbook_atr(hs: list[float], ls: list[float], cs: list[float], n: int) -> list[float | None]:
    trs = [hs[0] - ls[0]] + [
        max(hs[i] - ls[i], abs(hs[i] - cs[i - 1]), abs(ls[i] - cs[i - 1])) for i in range(1, len(hs))
    ]
    out: list[float | None] = [None] * len(hs)
    for i in range(n - 1, len(hs)):
        out[i] = sum(trs[:n]) / n if i == n - 1 else (out[i - 1] * (n - 1) + trs[i]) / n  # type: ignore[operator]
    return out


def random_walk(count: int, seed: int) -> tuple[list[float], list[float], list[float]]:
    rng, price, hs, ls, cs = random.Random(seed), 100.0, [], [], []
    for i in range(count):
        o = price
        c = o if i % 9 == 0 else o * rng.uniform(0.97, 1.03)  # some flat bars
        hs.append(max(o, c) * rng.uniform(1, 1.01))
        ls.append(min(o, c) * rng.uniform(0.99, 1))
        cs.append(c)
        price = c * rng.uniform(0.98, 1.02)  # gaps, so |h - prev close| can be the true range
    return hs, ls, cs


def assert_series_close(got: list[float | None], want: list[float | None]) -> None:
    assert [g is None for g in got] == [w is None for w in want]
    assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None], rel=1e-9)


@pytest.mark.parametrize("n", [1, 2, 3, 14, 20])
def test_batch_matches_textbook_loops(n: int) -> None:
    hs, ls, cs = random_walk(300, seed=n)
    assert_series_close(sma(cs, n), textbook_sma(cs, n))
    assert_series_close(ema(cs, n), textbook_ema(cs, n))
    assert_series_close(rsi_wilder(cs, n), textbook_rsi(cs, n))
    assert_series_close(atr_wilder(hs, ls, cs, n), textbook_atr(hs, ls, cs, n))


# --------------------------------------------------------------------------- IndicatorState


def batch_at(bars: list[dict], i: int) -> dict[str, float]:
    """Indicators at bar i, computed by the batch functions over the whole series up to i."""
    hs, ls, cs = ([b[k] for b in bars[: i + 1]] for k in ("high", "low", "close"))
    values = {"sma_20": sma(cs, 20)[i], "ema_20": ema(cs, 20)[i], "rsi_14": rsi_wilder(cs, 14)[i]}
    values["atr_14"] = atr_wilder(hs, ls, cs, 14)[i]
    return {k: v for k, v in values.items() if v is not None}


def versions(bar: dict, rng: random.Random) -> list[dict]:
    """How a bar looks as it is built: just opened, half way, final."""
    o = bar["open"]
    first = {**bar, "high": o, "low": o, "close": o}
    mid_close = rng.uniform(bar["low"], bar["high"])
    mid = {**bar, "high": max(o, mid_close), "low": min(o, mid_close), "close": mid_close}
    return [first, mid, bar]


def make_bars(count: int, seed: int) -> list[dict]:
    hs, ls, cs = random_walk(count, seed)
    opens = [cs[0]] + cs[:-1]
    return [
        {"ts": T0 + i * MIN, "open": min(max(opens[i], ls[i]), hs[i]), "high": hs[i], "low": ls[i], "close": cs[i]}
        for i in range(count)
    ]


@pytest.mark.parametrize("restore_at", [None, 3, 13, 14, 19, 20, 60])
def test_indicator_state_incremental_equals_batch(restore_at: int | None) -> None:
    bars, rng = make_bars(120, seed=5), random.Random(1)
    state = IndicatorState()
    for i, bar in enumerate(bars):
        for step, version in enumerate(versions(bar, rng)):
            if i == restore_at and step == 1:  # mid-bar: the current bar is part of the saved state
                state = IndicatorState.from_dict(json.loads(json.dumps(state.to_dict())))
            got = state.update(version)
            want = batch_at([*bars[:i], version], i)
            assert set(got) == set(want), (i, step)
            assert got == pytest.approx(want, rel=1e-9), (i, step)
            assert state.latest == got
    assert set(got) == set(INDICATORS)
    saved = state.to_dict()
    assert len(saved["closes"]) == IndicatorState.WINDOW == 19  # bounded
    assert saved["count"] == 119 and saved["current"][0] == bars[-1]["ts"]


def test_indicator_state_rejects_older_bars_and_other_versions() -> None:
    state = IndicatorState()
    state.update({"ts": T0 + MIN, "high": 2.0, "low": 1.0, "close": 1.5})
    with pytest.raises(ValueError, match="before the current bar"):
        state.update({"ts": T0, "high": 2.0, "low": 1.0, "close": 1.5})
    with pytest.raises(ValueError, match="version"):
        IndicatorState.from_dict({**state.to_dict(), "version": 99})
    empty = IndicatorState.from_dict(IndicatorState().to_dict())
    assert empty.current is None and empty.update({"ts": T0, "high": 1.0, "low": 1.0, "close": 1.0}) == {}


def test_ticks_to_bars_to_indicators_pipeline() -> None:
    """SimFeed -> BarBuilder -> IndicatorState, draining dirty bars every 37 ticks, equals batch."""
    feed = SimFeed(seed=11, start_ts=T0, rate_hz=0.5, vol_scale=30.0)
    builder = BarBuilder({"1m": MIN, "5m": 300_000})
    states: dict[tuple[str, str], IndicatorState] = {}
    final: dict[tuple[str, str], dict[int, dict]] = {}
    seen: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for n in range(300):
        for tick in feed.ticks(37):
            builder.add(tick["symbol"], tick["ts"], tick["bid"], tick["volume"])
        for bar in builder.take_dirty():
            key = (bar["symbol"], bar["timeframe"])
            if n == 150:  # a worker restart: state round-trips through storage
                states = {k: IndicatorState.from_dict(json.loads(json.dumps(s.to_dict()))) for k, s in states.items()}
            seen.setdefault(key, {})[bar["ts"]] = states.setdefault(key, IndicatorState()).update(bar)
            final.setdefault(key, {})[bar["ts"]] = bar
    assert builder.late_ticks == 0
    assert set(states) == {(s, tf) for s in ("BTCUSD", "EURUSD") for tf in ("1m", "5m")}
    for key, by_ts in final.items():
        bars = [by_ts[ts] for ts in sorted(by_ts)]
        assert len(bars) > 40
        for i, bar in enumerate(bars):
            assert seen[key][bar["ts"]] == pytest.approx(batch_at(bars, i), rel=1e-9), (key, i)


def test_restored_bar_folds_an_out_of_order_tick_as_if_never_restarted() -> None:
    def build(ticks: list[tuple[int, float]], restart_after: int | None) -> dict:
        builder = BarBuilder({"1m": 60_000})
        for i, (ts, price) in enumerate(ticks):
            if i == restart_after:
                saved = builder.snapshot("X", "1m")
                builder = BarBuilder({"1m": 60_000})
                builder.load(saved)
            builder.add("X", ts, price, 1.0)
        return builder.current("X", "1m")

    # After the restart a tick older than the close arrives (it must not become the close), then
    # one older than the open (it must become the open).
    ticks = [(1_000, 10.0), (50_000, 12.0), (30_000, 11.0), (500, 9.5)]
    assert build(ticks, restart_after=2) == build(ticks, restart_after=None)
    assert build(ticks, restart_after=None)["open"] == 9.5 and build(ticks, restart_after=None)["close"] == 12.0


# --------------------------------------------------------------------------- arrays (workers.bars)


def test_sequential_sums_add_left_to_right_like_a_loop() -> None:
    rng = random.Random(12)
    lengths = [1, 2, 3, 31, 32, 33, 500, 1, 7] + [rng.randint(1, 80) for _ in range(200)]
    values = np.array([rng.uniform(0, 10) * 10 ** rng.randint(-3, 5) for _ in range(sum(lengths))])
    starts = np.cumsum([0, *lengths[:-1]])
    want = []
    for s, n in zip(starts, lengths, strict=True):
        total = 100.125 if s == 0 else float(values[s])  # the first segment continues a carried total
        for v in values[s + (0 if s == 0 else 1): s + n]:
            total += float(v)
        want.append(total)
    assert sequential_sums(values, starts, first=100.125).tolist() == want  # exactly, not approximately
    # numpy's own segment sums add pairwise: they differ, which is why the worker does not use them
    assert np.add.reduceat(values, starts)[1:].tolist() != want[1:]
    assert sequential_sums(np.array([-0.0, -0.0]), np.array([0])).tolist() == [-0.0]


def test_in_order_marks_ticks_older_than_one_already_seen() -> None:
    ts = np.array([100, 50, 120, 120, 119, 200])
    assert in_order(ts, None).tolist() == [True, False, True, True, False, True]
    assert in_order(ts, 110).tolist() == [False, False, True, True, False, True]
    assert in_order(np.array([], dtype=np.int64), 5).tolist() == []


def random_ticks(n: int, seed: int, start: int = T0 + 1234) -> list[tuple[int, float, float]]:
    """In ts order, with ties, gaps across every timeframe, flat stretches and order-sensitive volumes."""
    rng, ts, price, out = random.Random(seed), start, 100.0, []
    for _ in range(n):
        ts += rng.choice([0, 1, 500, 7_000, 61_000, 290_000, 3_700_000, 90_000_000])
        price = price if rng.random() < 0.2 else round(price * rng.uniform(0.99, 1.01), 4)
        out.append((ts, price, round(rng.uniform(0, 3), 3)))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_aggregate_equals_the_tick_by_tick_fold_bit_for_bit_however_chunked(seed: int) -> None:
    ticks = random_ticks(3000, seed)
    builder = BarBuilder()
    for ts, price, vol in ticks:
        builder.add("S", ts, price, vol)
    want = {(b["timeframe"], b["ts"]): b for b in builder.take_dirty()}
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(ticks)), 40))
    got: dict[tuple[str, int], dict] = {}
    carries: dict[str, OpenBar | None] = {}
    for a, b in zip([0, *cuts], [*cuts, len(ticks)], strict=True):
        ts, price, vol = (np.array(col) for col in zip(*ticks[a:b], strict=True))
        for tf, bars in aggregate(ts.astype(np.int64), price, vol, carries).items():
            for bar in bars.rows():
                got[(tf, bar.ts)] = {"symbol": "S", "timeframe": tf, **{k: v for k, v in bar.to_dict().items()
                                                                        if k not in ("first_ts", "last_ts")}}
            carries[tf] = bars.bar(len(bars) - 1)
    assert got == want  # volume included: the same additions in the same order


def test_indicator_state_extend_equals_update_bar_by_bar() -> None:
    bars, rng = make_bars(150, seed=8), random.Random(2)
    one, many = IndicatorState(), IndicatorState()
    fed: list[dict] = []
    for i, bar in enumerate(bars):
        fed += versions(bar, rng) if i % 3 else [bar]
    expected = [one.update(b) for b in fed]
    for a, b in ((0, 5), (5, 6), (6, 40), (40, len(fed))):
        part = fed[a:b]
        values = many.extend([x["ts"] for x in part], [x["high"] for x in part], [x["low"] for x in part],
                             [x["close"] for x in part])
        for k, want in enumerate(expected[a:b]):
            assert {n: v[k] for n, v in zip(("sma_20", "ema_20", "rsi_14", "atr_14"), values, strict=True)
                    if v[k] is not None} == want
        if a == 6:
            many = IndicatorState.from_dict(json.loads(json.dumps(many.to_dict())))
    assert many.to_dict() == one.to_dict() and many.latest == one.latest
    before = many.to_dict()
    with pytest.raises(ValueError, match="before the current bar"):
        many.extend([bars[-1]["ts"] + MIN, bars[0]["ts"]], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0])
    assert many.to_dict() == before  # a refused batch changes nothing


def test_indicator_state_in_bulk_equals_bar_by_bar() -> None:
    """A long run of new bars (the analysis worker's catch-up, computed in bulk: numpy for the steps
    of one bar, integer sums for the SMA) gives the floats bar-by-bar updates give, bit for bit (repr
    tells -0.0 from 0.0), from a fresh state and from a restored one mid-bar."""
    bars = make_bars(700, seed=9)  # flat bars and gaps among them
    one = IndicatorState()
    expected = [one.update(b) for b in bars]
    for cut in (0, 25, 300):
        many = IndicatorState()
        if cut:
            for b in bars[:cut]:
                many.update(b)
            many = IndicatorState.from_dict(json.loads(json.dumps(many.to_dict())))
        part = bars[cut:]
        assert len(part) >= BULK_MIN
        values = many.extend([b["ts"] for b in part], [b["high"] for b in part], [b["low"] for b in part],
                             [b["close"] for b in part])
        got = [{n: v[k] for n, v in zip(SERIES, values, strict=True) if v[k] is not None}
               for k in range(len(part))]
        assert [{n: repr(v) for n, v in d.items()} for d in got] == \
               [{n: repr(v) for n, v in d.items()} for d in expected[cut:]]
        assert many.to_dict() == one.to_dict() and many.latest == one.latest


def test_window_sums_are_fsum_exactly_or_none() -> None:
    rng = random.Random(4)
    samples = [
        [round(rng.uniform(1.0, 1.3), 5) for _ in range(300)],  # prices
        [rng.uniform(1, 31) * 1e-4 for _ in range(300)],  # a factor of 31 apart
        # odd 53-bit mantissas at neighbouring exponents: sums halfway between doubles, rounded to even
        [float(rng.randrange(2 ** 52, 2 ** 53) | 1) * 2.0 ** rng.choice([-52, -51, -49]) for _ in range(300)],
        [7.25] * 40,
    ]
    for values in samples:
        got = _window_sums(np.array(values), 20)
        assert got is not None
        assert [repr(x) for x in got.tolist()] == [repr(math.fsum(values[i:i + 20])) for i in range(len(values) - 19)]
    for values in ([1e-3, 1e3] * 20, [0.0] * 20, [-1.0] * 20, [math.nan] * 20, [5e-320] * 20, [1.0] * 19,
                   [1e307] * 20):  # the last: fsum overflows
        assert _window_sums(np.array(values), 20) is None  # the caller sums each window with fsum
