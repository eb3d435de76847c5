"""The analysis worker: ticks in, OHLCV bars and indicators out (``python -m workers.analysis``).

Each step reads the next chunk of ticks after its cursor (``id > cursor``, in id order), folds their
bids into a :class:`~workers.indicators.BarBuilder` for every timeframe and an
:class:`~workers.indicators.IndicatorState` per (symbol, timeframe), and stores the changed bars, their
indicator values, the new cursor position and the builder/indicator state in ONE ``store_analysis``
call, so all of it commits atomically.

Why that gives exactly-once counting: the stored state is always the state *after* the stored
position. A worker that starts (or dies at any point and restarts) loads both and redoes whatever came
after; work it did in memory but never stored is simply done again from the same state. Bars are
written as whole values (upserts), never as increments.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
from sqlalchemy import select
from sqlalchemy.engine import Engine

from db.client import WriterClient
from db.config import Settings
from db.errors import Conflict, WriterUnavailable
from db.models import INDICATORS, TIMEFRAMES, Cursor, Tick
from db.validation import MAX_ROWS
from workers.base import Worker, main, wait_for_database
from workers.indicators import BarBuilder, IndicatorState, bucket_start

DEFAULT_CHUNK = 5000
STATE_VERSION = 1
#: Bars per store call such that their indicator rows (at most one per indicator) also fit MAX_ROWS.
BAR_BUDGET = MAX_ROWS // len(INDICATORS)
LOG_EVERY = 1.0


@dataclass(frozen=True)
class Batch:
    """What one ``store_analysis`` call stores: everything up to and including tick ``position``."""

    position: int
    ticks: int
    bars: list[dict[str, Any]]
    indicators: list[dict[str, Any]]
    state: bytes


class Analyzer:
    """Pure fold of ticks into bars and indicators (no database), resumable from :meth:`flush` state.

    Feed ticks in id order with :meth:`add`; :meth:`flush` returns the bars changed since the previous
    flush, the indicator values at those bars and the state to store with them. :meth:`fits` says
    whether one more tick keeps the pending bars within ``bar_budget`` (each tick can open at most one
    new bar per timeframe), so a caller can flush before a batch would exceed the writer's row limits.
    """

    def __init__(self, position: int = 0, state: bytes | None = None, bar_budget: int = BAR_BUDGET) -> None:
        if bar_budget < len(TIMEFRAMES):
            raise ValueError(f"bar_budget {bar_budget} must be at least {len(TIMEFRAMES)} (one tick's bars)")
        self.position = position
        self.bar_budget = bar_budget
        self.builder = BarBuilder()
        self.states: dict[tuple[str, str], IndicatorState] = {}
        self._pending: set[tuple[str, str, int]] = set()
        self._ticks = 0
        if state is not None:
            self._restore(state)
        elif position:
            raise ValueError(f"cursor at {position} but no state stored: cannot resume the open bars")

    def _restore(self, blob: bytes) -> None:
        data = msgpack.unpackb(blob)
        if data.get("v") != STATE_VERSION:
            raise ValueError(f"unsupported analysis state version {data.get('v')!r}")
        self.builder.late_ticks = int(data.get("late_ticks", 0))
        for sym, tf, bar, ind in data["series"]:
            if tf in TIMEFRAMES:  # a timeframe dropped from the schema is forgotten
                self.builder.load(bar)
                self.states[(sym, tf)] = IndicatorState.from_dict(ind)

    def fits(self, symbol: str, ts: int) -> bool:
        """Whether adding this tick keeps the pending bars within the budget."""
        new = sum((symbol, tf, bucket_start(ts, n)) not in self._pending for tf, n in TIMEFRAMES.items())
        return len(self._pending) + new <= self.bar_budget

    def add(self, tick_id: int, symbol: str, ts: int, price: float, volume: float) -> None:
        """Fold one tick (ids must increase)."""
        if tick_id <= self.position:
            raise ValueError(f"tick {tick_id} is not after position {self.position}")
        self.builder.add(symbol, ts, price, volume)
        self._pending.update((symbol, tf, bucket_start(ts, n)) for tf, n in TIMEFRAMES.items())
        self.position = tick_id
        self._ticks += 1

    def flush(self) -> Batch:
        """Bars changed since the last flush with their indicators, and the state as of ``position``."""
        bars = self.builder.take_dirty()  # per (symbol, timeframe) in ts order, as IndicatorState needs
        indicators = []
        for bar in bars:
            key = (bar["symbol"], bar["timeframe"])
            state = self.states.get(key)
            if state is None:
                state = self.states[key] = IndicatorState()
            for name, value in state.update(bar).items():
                indicators.append({"symbol": key[0], "timeframe": key[1], "name": name, "ts": bar["ts"],
                                   "value": value})
        series = [[sym, tf, self.builder.snapshot(sym, tf), st.to_dict()] for (sym, tf), st in self.states.items()]
        blob = msgpack.packb({"v": STATE_VERSION, "late_ticks": self.builder.late_ticks, "series": series})
        batch = Batch(self.position, self._ticks, bars, indicators, blob)
        self._pending.clear()
        self._ticks = 0
        return batch


class AnalysisWorker(Worker):
    """Reads ticks after the ``analysis`` cursor; one atomic ``store_analysis`` per batch."""

    name = "analysis"
    cursor = "analysis"

    def __init__(self, settings: Settings, until_idle: bool = False, chunk: int = DEFAULT_CHUNK,
                 bar_budget: int = BAR_BUDGET) -> None:
        super().__init__(settings, until_idle)
        if chunk < 1:
            raise ValueError(f"--chunk must be at least 1, got {chunk}")
        self.chunk = chunk
        self.bar_budget = bar_budget
        self.engine: Engine | None = None
        self.client: WriterClient | None = None
        self.analyzer = Analyzer(bar_budget=bar_budget)
        self._stats = {"chunks": 0, "ticks": 0, "bars": 0, "indicators": 0}
        self._logged_at = 0.0

    def setup(self) -> None:
        self.engine = wait_for_database(self.settings)
        self.client = WriterClient(settings=self.settings)
        self.restore()

    def restore(self) -> None:
        """Load position and state from the cursor row: what was last committed is the truth."""
        assert self.engine is not None
        with self.engine.connect() as conn:
            row = conn.execute(select(Cursor.value, Cursor.state).where(Cursor.name == self.cursor)).first()
        self.analyzer = Analyzer(*(row if row is not None else (0, None)), bar_budget=self.bar_budget)
        self.log.info("%s: resuming after tick %d (%d series)", self.name, self.analyzer.position,
                      len(self.analyzer.states))

    def read(self) -> list[Any]:
        """The next chunk of ticks after the position, in id order."""
        assert self.engine is not None
        with self.engine.connect() as conn:
            return list(conn.execute(
                select(Tick.id, Tick.symbol, Tick.ts, Tick.bid, Tick.volume)
                .where(Tick.id > self.analyzer.position).order_by(Tick.id).limit(self.chunk)
            ))

    def step(self) -> bool:
        ticks = self.read()
        if not ticks:
            self._log_progress()
            return False
        try:
            self._store_all(ticks)
        except (WriterUnavailable, Conflict) as e:
            # Stored or not, the cursor row says where we are: continue from there.
            self.log.warning("%s: store failed (%s); resuming from the stored cursor", self.name, e)
            self.restore()
        self._log_progress()
        return True

    def _store_all(self, ticks: Iterable[Any]) -> None:
        an = self.analyzer
        for t in ticks:
            if not an.fits(t.symbol, t.ts):
                self._store(an.flush())
            an.add(t.id, t.symbol, t.ts, t.bid, t.volume)
        self._store(an.flush())

    def _store(self, batch: Batch) -> None:
        assert self.client is not None
        self.client.call("store_analysis", cursor=self.cursor, position=batch.position, bars=batch.bars,
                         indicators=batch.indicators, state=batch.state)
        for key, n in (("chunks", 1), ("ticks", batch.ticks), ("bars", len(batch.bars)),
                       ("indicators", len(batch.indicators))):
            self._stats[key] += n

    def _log_progress(self, force: bool = False) -> None:
        """One INFO line per second at most, summing the chunks stored since the previous one."""
        now = time.monotonic()
        if self._stats["chunks"] and (force or now - self._logged_at >= LOG_EVERY):
            s = self._stats
            self.log.info("%s: stored %d chunk(s): %d ticks, %d bars, %d indicators; position %d (late ticks %d)",
                          self.name, s["chunks"], s["ticks"], s["bars"], s["indicators"], self.analyzer.position,
                          self.analyzer.builder.late_ticks)
            self._stats = dict.fromkeys(s, 0)
            self._logged_at = now

    def teardown(self) -> None:
        self._log_progress(force=True)
        if self.client is not None:
            self.client.close()
        if self.engine is not None:
            self.engine.dispose()


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="ticks read per step (default %(default)s)")


def _make(settings: Settings, args: argparse.Namespace) -> AnalysisWorker:
    return AnalysisWorker(settings, until_idle=args.until_idle, chunk=args.chunk)


if __name__ == "__main__":
    sys.exit(main(AnalysisWorker, None, _add_arguments, _make))
