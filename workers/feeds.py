"""Tick feeds for the tick ingestor: a simulated market, and the pacing of any feed's replay.

A tick is ``{"symbol": str, "ts": int, "bid": float, "ask": float, "volume": float}`` with ``ts`` in
epoch milliseconds UTC. Everything here is pure logic (no files, no database), so that the ingestor
only decides where ticks go, but for :func:`last_mids`, the one read: where a restarted simulated
market continues. CSV replays (reading, checking and bars as ticks) are
:mod:`workers.csvfiles`.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from db import queries
from db.config import Settings
from db.engine import make_read_engine
from db.errors import ValidationError
from db.parsers import quoted
from db.validation import symbol as valid_symbol

log = logging.getLogger("tickstack.ticks")

Tick = dict[str, Any]
Speed = float | Literal["max"]
T = TypeVar("T")

_MS_PER_YEAR = 365.25 * 86_400_000
#: A simulated market's rates, in ticks per second over all its symbols. At least a tick every 1,000 s
#: on average: slower is no market to watch, and the random waits grow with 1/rate (the first tick
#: was dated 30 years ahead at 1e-9, past 2100 at 1e-12: refused, too far to be sent at all at
#: 1e-300). At most a million, more than the feed makes (about 100,000 a second here): its ticks
#: then fall behind real time.
MIN_RATE_HZ, MAX_RATE_HZ = 0.001, 1_000_000.0


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
        if not (math.isfinite(rate_hz) and MIN_RATE_HZ <= rate_hz <= MAX_RATE_HZ):
            raise ValueError(f"rate_hz must be a number from {MIN_RATE_HZ:g} to {MAX_RATE_HZ:,.0f}, got {rate_hz!r}")
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


# --------------------------------------------------------------------------- replay speed


#: Replay speeds (multiples of real time): a thousandth (an hour's gap takes 42 days) to a million.
MIN_SPEED, MAX_SPEED = 0.001, 1_000_000.0
#: The longest single sleep of a paced replay.
MAX_SLEEP_S = 3600.0


def parse_speed(text: str) -> Speed:
    """Parse a replay speed: 'max' (no waiting) or a positive finite multiple of real time."""
    cleaned = str(text).strip().lower()
    if cleaned == "max":
        return "max"
    try:
        value = float(cleaned) if cleaned.isascii() else math.nan  # float() reads other scripts' digits
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and MIN_SPEED <= value <= MAX_SPEED):
        raise ValueError(f"invalid replay speed {quoted(str(text))}: use 'max' or a number from {MIN_SPEED:g} to "
                         f"{MAX_SPEED:,.0f} such as 1, 10 or 0.5")
    return value


def _ts_of(item: Any) -> int:
    return (item[1] if isinstance(item, tuple) else item)["ts"]


def pace(
    items: Iterable[T],
    speed: Speed,
    *,
    start_ts: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[T]:
    """Yield ticks (or ``(line, tick)`` pairs) unchanged, sleeping so they come out ``speed`` times
    faster than their ``ts`` differences; ``"max"`` never sleeps.

    Deadlines are measured against one clock reading, taken when the first item is asked for, so
    sleep overshoot does not accumulate; ``start_ts`` is the ts due then (a simulated market's start:
    its first tick comes when its ts is due, not at once dated ahead of the time it is sent), by
    default the first item's. A tick whose ts goes backwards or is already late is yielded at once.
    """
    if speed != "max" and not (isinstance(speed, int | float) and math.isfinite(speed) and speed > 0):
        raise ValueError(f"invalid replay speed {speed!r}: use 'max' or a positive number")
    if speed == "max":
        return iter(items)
    return _paced(items, float(speed), start_ts, clock, sleep)


def _paced(
    items: Iterable[T], speed: float, start_ts: int | None, clock: Callable[[], float],
    sleep: Callable[[float], None]
) -> Iterator[T]:
    start: float | None = None
    first_ts = 0
    for item in items:
        ts = _ts_of(item)
        if start is None:
            start, first_ts = clock(), ts if start_ts is None else start_ts
        due = start + (ts - first_ts) / 1000.0 / speed
        # In steps: one sleep of a century's gap would overflow (sleep takes at most ~292 years).
        while (delay := due - clock()) > 0:
            sleep(min(delay, MAX_SLEEP_S))
        yield item


def sim_symbols(text: str) -> list[str]:
    """``--symbols``: the simulated market's symbols, each checked as the writer checks one."""
    symbols = [s.strip() for s in text.split(",") if s.strip()]
    if not symbols:
        raise ValueError(f"--symbols {text!r}: give symbols like BTCUSD,EURUSD (upper case)")
    try:
        symbols = [valid_symbol("--symbols", s) for s in symbols]
    except ValidationError as e:
        raise ValueError(f"{e}; give symbols like BTCUSD,EURUSD") from None
    if len(set(symbols)) < len(symbols):  # it would get twice the share of --rate, not a second market
        twice = next(s for i, s in enumerate(symbols) if s in symbols[:i])
        raise ValueError(f"--symbols {text!r}: {twice} is given twice; give each symbol once")
    return symbols


def last_mids(settings: Settings, symbols: list[str]) -> dict[str, float]:
    """Symbol -> the mid of its last stored tick, where a restarted simulated market continues
    (:class:`~workers.feeds.SimFeed` ``start_mids``); {} when the database cannot be read yet (a
    first start: the feed then starts at its defaults)."""
    try:
        engine = make_read_engine(settings, pool_size=1)
    except Exception as e:  # no database file yet, a bad URL: start from the defaults
        log.info("ticks: no stored prices to continue from (%s)", e)
        return {}
    try:
        with engine.connect() as conn:
            return {s: (t.bid + t.ask) / 2 for s, t in queries.latest_ticks(conn, symbols).items()}
    except SQLAlchemyError as e:
        log.info("ticks: no stored prices to continue from (%s)", e)
        return {}
    finally:
        engine.dispose()
