"""Tick feeds for the tick ingestor: a simulated market and CSV replays.

A tick is ``{"symbol": str, "ts": int, "bid": float, "ask": float, "volume": float}`` with ``ts`` in
epoch milliseconds UTC. Everything here is pure logic (files in, dicts out, no database), so that the
ingestor only decides where ticks go and the parsing rules can be tested on their own.

CSV rows are validated one by one and the first bad row raises :class:`CsvFormatError` naming its file
line, because a user fixing an export needs the line, not a stack trace.
"""
from __future__ import annotations

import csv
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

from db.models import TIMEFRAMES

Tick = dict[str, Any]
Bar = dict[str, Any]
Speed = float | Literal["max"]
T = TypeVar("T")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_MS_PER_YEAR = 365.25 * 86_400_000
#: Integer bar times below this are epoch seconds, above it epoch ms (1e11 ms is 1973, 1e11 s is 5138).
_SECONDS_CUTOFF = 10**11
_INT_RE = re.compile(r"[+-]?\d+")
_TF_BY_MS = {ms: name for name, ms in TIMEFRAMES.items()}


# --------------------------------------------------------------------------- simulated market


@dataclass(frozen=True)
class _SymbolSpec:
    price: float  # starting mid price
    sigma: float  # annualised volatility of the GBM
    spread: tuple[float, float]  # quoted spread range (uniform)
    decimals: int  # price rounding
    volume: float  # mean trade size (exponential)
    volume_decimals: int


_SPECS = {
    "BTCUSD": _SymbolSpec(60_000.0, 0.60, (1.0, 10.0), 2, 0.05, 4),
    "EURUSD": _SymbolSpec(1.08, 0.07, (0.00005, 0.0002), 5, 100_000.0, 0),
}
_DEFAULT_SPEC = _SymbolSpec(100.0, 0.30, (0.01, 0.05), 2, 100.0, 0)


def _usable(price: float | None) -> float | None:
    """``price`` when it can start a random walk (finite, > 0), else None."""
    return float(price) if isinstance(price, int | float) and math.isfinite(price) and price > 0 else None


class SimFeed:
    """A seedable simulated market: zero-drift geometric Brownian motion per symbol.

    Ticks arrive as a Poisson process of ``rate_hz`` ticks per second over all symbols (exponential
    inter-arrival times, each tick for a uniformly chosen symbol), starting at ``start_ts`` (now if
    None). Each symbol's mid moves by GBM over the real time since its previous tick, so volatility is
    realistic whatever the rate; ``vol_scale`` multiplies it for livelier demos. Known symbols (BTCUSD,
    EURUSD) get realistic prices, spreads and rounding; others start at 100.

    ``start_mids`` (symbol -> mid price) continues a market where it was: the ingestor passes each
    symbol's last stored price, so a restarted feed does not jump back to its starting price (a jump
    that closed a paper trade by trailing stop).

    Guarantees: prices > 0, bid <= ask, volume > 0, ts non-decreasing, and the same ticks for the same
    ``seed``, ``start_ts`` and ``start_mids`` (so a test or a demo can be replayed).
    """

    def __init__(
        self,
        symbols: Sequence[str] = ("BTCUSD", "EURUSD"),
        seed: int | None = None,
        start_ts: int | None = None,
        rate_hz: float = 10.0,
        vol_scale: float = 1.0,
        start_mids: Mapping[str, float] | None = None,
    ) -> None:
        if not symbols:
            raise ValueError("SimFeed needs at least one symbol")
        if not (math.isfinite(rate_hz) and rate_hz > 0):
            raise ValueError(f"rate_hz must be a positive number, got {rate_hz!r}")
        self.symbols = tuple(symbols)
        self.rate_hz = float(rate_hz)
        self.vol_scale = float(vol_scale)
        self._rng = random.Random(seed)
        start = int(time.time() * 1000) if start_ts is None else int(start_ts)
        self._clock = float(start)  # fractional ms, so rounding never accumulates
        self._specs = {s: _SPECS.get(s, _DEFAULT_SPEC) for s in self.symbols}
        starts = start_mids or {}
        self._mid = {s: _usable(starts.get(s)) or spec.price for s, spec in self._specs.items()}
        self._last = dict.fromkeys(self.symbols, self._clock)

    def ticks(self, n: int) -> list[Tick]:
        """Return the next ``n`` ticks (continuing where the previous call stopped)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng, out = self._rng, []
        for _ in range(n):
            self._clock += rng.expovariate(self.rate_hz) * 1000.0
            symbol = self.symbols[rng.randrange(len(self.symbols))]
            spec = self._specs[symbol]
            dt = (self._clock - self._last[symbol]) / _MS_PER_YEAR
            self._last[symbol] = self._clock
            sigma = spec.sigma * self.vol_scale
            mid = self._mid[symbol] * math.exp(-0.5 * sigma * sigma * dt + sigma * math.sqrt(dt) * rng.gauss())
            self._mid[symbol] = mid
            half = rng.uniform(*spec.spread) / 2
            unit = 10.0**-spec.decimals
            bid = max(round(mid - half, spec.decimals), unit)
            ask = max(round(mid + half, spec.decimals), bid)
            volume = max(round(rng.expovariate(1 / spec.volume), spec.volume_decimals), 10.0**-spec.volume_decimals)
            out.append({"symbol": symbol, "ts": int(self._clock), "bid": bid, "ask": ask, "volume": volume})
        return out

    def __iter__(self) -> Iterator[Tick]:
        """Endless ticks; wrap in :func:`pace` to emit them in real time."""
        while True:
            yield from self.ticks(1)


# --------------------------------------------------------------------------- CSV parsing


class CsvFormatError(ValueError):
    """A CSV file is malformed; ``line`` is the 1-based file line and ``reason`` what is wrong there."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[int, str]]:  # picklable across processes
        return (type(self), (self.line, self.reason))


def _rows(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(file line, fields) for every non-blank row; utf-8-sig drops the BOM of Excel exports."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        for row in reader:
            if row:
                yield reader.line_num, row


def _header(rows: Iterator[tuple[int, list[str]]], expected: str) -> tuple[int, list[str]]:
    """The header row with names stripped and lower-cased."""
    first = next(rows, None)
    if first is None:
        raise CsvFormatError(1, f"empty file, expected a header like {expected}")
    return first[0], [name.strip().lower() for name in first[1]]


def _number(line: int, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CsvFormatError(line, f"{name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise CsvFormatError(line, f"{name} {text!r} is not a finite number")
    return value


def _price(line: int, name: str, text: str) -> float:
    value = _number(line, name, text)
    if value <= 0:
        raise CsvFormatError(line, f"{name} {text!r} must be > 0")
    return value


def _volume(line: int, text: str) -> float:
    value = _number(line, "volume", text)
    if value < 0:
        raise CsvFormatError(line, f"volume {text!r} must be >= 0")
    return value


def iso_to_ms(text: str) -> int:
    """ISO-8601 time to epoch ms: naive means UTC, an offset or 'Z' is honoured; ValueError if not ISO."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MS  # exact integer arithmetic, no float timestamp()


def ms_to_iso(ts: int) -> str:
    """Epoch ms to an ISO-8601 UTC string, for error messages."""
    return (_EPOCH + ts * _MS).isoformat().replace("+00:00", "Z")


def _timestamp(line: int, name: str, text: str, *, seconds_ok: bool) -> int:
    text = text.strip()
    if _INT_RE.fullmatch(text):
        value = int(text)
        return value * 1000 if seconds_ok and abs(value) < _SECONDS_CUTOFF else value
    try:
        return iso_to_ms(text)
    except ValueError:
        unit = "epoch seconds/ms" if seconds_ok else "epoch ms"
        raise CsvFormatError(line, f"{name} {text!r} is not an ISO-8601 time or {unit}") from None


def read_tick_csv(path: str | Path, symbol: str | None = None) -> Iterator[tuple[int, Tick]]:
    """Yield ``(file line, tick)`` from a CSV with header ``ts,symbol,bid,ask,volume`` (any order).

    ``ts`` is ISO-8601 (naive = UTC) or integer epoch ms. ``symbol``, if given, overrides the file's
    symbol column, which may then be absent; ``volume`` may be absent (0). Rows are validated as they
    are read: the first bad row raises :class:`CsvFormatError` after every earlier row was yielded, so
    an ingestor can commit the good prefix. Time going backwards is allowed (feeds do that).
    """
    expected = "ts,symbol,bid,ask,volume"
    rows = _rows(path)
    line, names = _header(rows, expected)
    col = {name: i for i, name in reversed(list(enumerate(names)))}  # first occurrence wins
    missing = [c for c in ("ts", "symbol", "bid", "ask") if c not in col and not (c == "symbol" and symbol)]
    if missing:
        raise CsvFormatError(line, f"header lacks column(s) {', '.join(missing)}; expected {expected}")
    for line, row in rows:
        if len(row) != len(names):
            raise CsvFormatError(line, f"expected {len(names)} columns, got {len(row)}")
        ts = _timestamp(line, "ts", row[col["ts"]], seconds_ok=False)
        bid = _price(line, "bid", row[col["bid"]])
        ask = _price(line, "ask", row[col["ask"]])
        if bid > ask:
            raise CsvFormatError(line, f"bid {bid!r} is above ask {ask!r}")
        volume = _volume(line, row[col["volume"]]) if "volume" in col else 0.0
        sym = symbol or row[col["symbol"]].strip()
        if not sym:
            raise CsvFormatError(line, "symbol is empty")
        yield line, {"symbol": sym, "ts": ts, "bid": bid, "ask": ask, "volume": volume}


_TIME_NAMES = ("date", "datetime", "time", "timestamp", "ts")
_OHLC = ("open", "high", "low", "close")


def read_bar_csv(path: str | Path) -> list[tuple[int, Bar]]:
    """Read an OHLCV export (``Date,Open,High,Low,Close,Volume``) as ``[(file line, bar), ...]``.

    Header names are case-insensitive; the time column is the one named date/datetime/time/timestamp/ts,
    or an unnamed first column (pandas writes that); other columns such as 'Adj Close' are ignored and
    a missing Volume means 0. Times are ISO-8601 (naive = UTC) or integer epoch seconds/ms (told apart
    by magnitude). Each bar ``{"ts", "open", "high", "low", "close", "volume"}`` must have positive
    prices, low <= open, close <= high, volume >= 0, and a time strictly after the previous bar's,
    else :class:`CsvFormatError` names the line. The whole file is read because replay needs the
    timeframe, which is inferred from all the bars.
    """
    rows = _rows(path)
    line, names = _header(rows, "Date,Open,High,Low,Close,Volume")
    time_col = next((i for i, n in enumerate(names) if n in _TIME_NAMES), 0 if names[0] == "" else None)
    missing = [c for c in _OHLC if c not in names]
    if time_col is None or missing:
        what = ", ".join(missing + (["a time column (Date)"] if time_col is None else []))
        raise CsvFormatError(line, f"header lacks {what}; expected Date,Open,High,Low,Close,Volume")
    col = {c: names.index(c) for c in (*_OHLC, "volume") if c in names}
    bars: list[tuple[int, Bar]] = []
    for line, row in rows:
        if len(row) != len(names):
            raise CsvFormatError(line, f"expected {len(names)} columns, got {len(row)}")
        ts = _timestamp(line, "time", row[time_col], seconds_ok=True)
        o, h, lo, c = (_price(line, name, row[col[name]]) for name in _OHLC)
        volume = _volume(line, row[col["volume"]]) if "volume" in col else 0.0
        if h < max(o, c, lo):
            raise CsvFormatError(line, f"high {h!r} is below max(open, close, low) = {max(o, c, lo)!r}")
        if lo > min(o, c):
            raise CsvFormatError(line, f"low {lo!r} is above min(open, close) = {min(o, c)!r}")
        if bars and ts <= bars[-1][1]["ts"]:
            prev = bars[-1]
            raise CsvFormatError(
                line, f"time {ms_to_iso(ts)} is not after {ms_to_iso(prev[1]['ts'])} (line {prev[0]})"
            )
        bars.append((line, {"ts": ts, "open": o, "high": h, "low": lo, "close": c, "volume": volume}))
    return bars


def _with_lines(bars: Sequence[Bar | tuple[int, Bar]]) -> list[tuple[int | None, Bar]]:
    return [item if isinstance(item, tuple) else (None, item) for item in bars]


def check_aligned(bars: Sequence[Bar | tuple[int, Bar]], timeframe: str) -> None:
    """Raise ValueError unless every bar starts on a ``timeframe`` boundary (ts % length == 0).

    Bars must be aligned so that replayed ticks rebuild the same buckets; a daily file whose times
    carry a non-UTC offset fails here. The error is a :class:`CsvFormatError` when the line is known.
    """
    if timeframe not in TIMEFRAMES:
        raise ValueError(f"unknown timeframe {timeframe!r}; known: {', '.join(TIMEFRAMES)}")
    length = TIMEFRAMES[timeframe]
    for line, bar in _with_lines(bars):
        if bar["ts"] % length:
            reason = f"bar time {ms_to_iso(bar['ts'])} is not aligned to {timeframe} bars (UTC boundaries)"
            raise ValueError(reason) if line is None else CsvFormatError(line, reason)


def infer_timeframe(bars: Sequence[Bar | tuple[int, Bar]]) -> str:
    """The timeframe name whose length is the most common gap between consecutive bars.

    Accepts bars or ``(line, bar)`` pairs. The mode (not the minimum) tolerates weekends and holes in
    daily data. Raises ValueError if there are fewer than 2 bars, if the gap is not one of
    ``db.models.TIMEFRAMES``, or if the bars are not aligned to it.
    """
    items = _with_lines(bars)
    if len(items) < 2:
        raise ValueError(f"need at least 2 bars to infer the timeframe, got {len(items)}; pass it explicitly")
    gaps = Counter(b["ts"] - a["ts"] for (_, a), (_, b) in zip(items, items[1:], strict=False))
    gap = max(gaps.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    if gap not in _TF_BY_MS:
        known = ", ".join(f"{name}={ms}" for name, ms in TIMEFRAMES.items())
        raise ValueError(f"bars are most often {gap} ms apart, which is no known timeframe ({known} ms)")
    check_aligned(items, _TF_BY_MS[gap])
    return _TF_BY_MS[gap]


def bar_to_ticks(bar: Mapping[str, Any], timeframe_ms: int, symbol: str) -> list[Tick]:
    """Replay one bar as 4 ticks at distinct ms inside ``[ts, ts + timeframe_ms)``.

    The path is open -> low -> high -> close for an up (or flat) bar and open -> high -> low -> close
    for a down bar, the order the close suggests. bid = ask = price; only the close tick carries the
    bar's volume. Rebuilding bars of the same timeframe from these ticks (first, max, min, last, sum)
    gives back exactly the same floats.
    """
    length = int(timeframe_ms)
    if length < 4:
        raise ValueError(f"timeframe_ms must be >= 4, got {timeframe_ms}")
    ts = int(bar["ts"])
    o, h, lo, c = (float(bar[k]) for k in _OHLC)
    path = (o, lo, h, c) if c >= o else (o, h, lo, c)
    offsets = (0, length // 4, length // 2, length - 1)
    ticks = [
        {"symbol": symbol, "ts": ts + off, "bid": p, "ask": p, "volume": 0.0}
        for off, p in zip(offsets, path, strict=True)
    ]
    ticks[-1]["volume"] = float(bar["volume"])
    return ticks


class CsvFeed:
    """Ticks from a CSV file, either ticks or OHLCV bars (detected from the header).

    Iterating gives ``(file line, tick)`` in file order. ``kind`` is "ticks" or "bars"; for bars,
    ``timeframe`` is the given name or the inferred one and each bar is replayed by
    :func:`bar_to_ticks` (bars are read and validated up front); for ticks it is None and rows are
    read lazily, so a bad row raises :class:`CsvFormatError` mid-iteration. ``symbol`` is required for
    bar files and overrides the symbol column of tick files.
    """

    def __init__(self, path: str | Path, symbol: str | None = None, timeframe: str | None = None) -> None:
        self.path = Path(path)
        self.symbol = symbol
        rows = _rows(self.path)
        try:
            line, names = _header(rows, "ts,symbol,bid,ask,volume or Date,Open,High,Low,Close,Volume")
        finally:
            rows.close()
        self.kind: Literal["ticks", "bars"] = "bars" if set(_OHLC) <= set(names) else "ticks"
        self.timeframe: str | None = None
        self._bars: list[tuple[int, Bar]] = []
        if self.kind == "ticks":
            if timeframe is not None:
                raise ValueError(f"{self.path} holds ticks: a timeframe only applies to bar files")
            if "symbol" not in names and not symbol:
                raise CsvFormatError(line, "no symbol column: pass a symbol")
            return
        if not symbol:
            raise ValueError(f"{self.path} holds bars, which have no symbol column: pass a symbol")
        self._bars = read_bar_csv(self.path)
        if timeframe is None:
            self.timeframe = infer_timeframe(self._bars)
        else:
            check_aligned(self._bars, timeframe)
            self.timeframe = timeframe

    def __iter__(self) -> Iterator[tuple[int, Tick]]:
        if self.kind == "ticks":
            return read_tick_csv(self.path, self.symbol)
        return self._bar_ticks()

    def _bar_ticks(self) -> Iterator[tuple[int, Tick]]:
        assert self.timeframe is not None and self.symbol
        length = TIMEFRAMES[self.timeframe]
        for line, bar in self._bars:
            for tick in bar_to_ticks(bar, length, self.symbol):
                yield line, tick


# --------------------------------------------------------------------------- replay speed


def parse_speed(text: str) -> Speed:
    """Parse a replay speed: 'max' (no waiting) or a positive finite multiple of real time."""
    cleaned = str(text).strip().lower()
    if cleaned == "max":
        return "max"
    try:
        value = float(cleaned)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"invalid replay speed {text!r}: use 'max' or a positive number such as 1, 10 or 0.5")
    return value


def _ts_of(item: Any) -> int:
    return (item[1] if isinstance(item, tuple) else item)["ts"]


def pace(
    items: Iterable[T],
    speed: Speed,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[T]:
    """Yield ticks (or ``(line, tick)`` pairs) unchanged, sleeping so they come out ``speed`` times
    faster than their ``ts`` differences; ``"max"`` never sleeps.

    Deadlines are measured from the first item against one clock reading, so sleep overshoot does not
    accumulate; a tick whose ts goes backwards or is already late is yielded at once.
    """
    if speed != "max" and not (isinstance(speed, int | float) and math.isfinite(speed) and speed > 0):
        raise ValueError(f"invalid replay speed {speed!r}: use 'max' or a positive number")
    if speed == "max":
        return iter(items)
    return _paced(items, float(speed), clock, sleep)


def _paced(
    items: Iterable[T], speed: float, clock: Callable[[], float], sleep: Callable[[float], None]
) -> Iterator[T]:
    start: float | None = None
    first_ts = 0
    for item in items:
        ts = _ts_of(item)
        if start is None:
            start, first_ts = clock(), ts
        else:
            delay = start + (ts - first_ts) / 1000.0 / speed - clock()
            if delay > 0:
                sleep(delay)
        yield item
