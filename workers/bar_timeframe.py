"""A bar file's interval (:func:`infer_timeframe`, :class:`BarGaps`): the timeframe whose length is the
most common gap between its bars, every bar on that timeframe's boundaries, decided one bar at a time
in bounded memory, for the CSV replays of :mod:`workers.csvfiles`."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from db.vocabulary import TIMEFRAMES
from workers.csvrows import CsvFormatError, ms_to_iso

#: A bar as :mod:`workers.csvfiles` reads it: only its "ts" is read here.
Bar = Mapping[str, Any]
_TF_BY_MS = {ms: name for name, ms in TIMEFRAMES.items()}


def _with_lines(bars: Iterable[Bar | tuple[int, Bar]]) -> Iterator[tuple[int | None, Bar]]:
    return (item if isinstance(item, tuple) else (None, item) for item in bars)


def misaligned(line: int | None, ts: int, timeframe: str) -> ValueError:
    """The error of a bar at ``ts`` off ``timeframe``'s boundaries: a :class:`CsvFormatError` at its
    ``line`` when that is known."""
    reason = f"bar time {ms_to_iso(ts)} is not aligned to {timeframe} bars (UTC boundaries)"
    return ValueError(reason) if line is None else CsvFormatError(line, reason)


#: The most distinct gaps between bars, other than the timeframes', that :class:`BarGaps` counts: its
#: memory, whatever the file. Past it only a timeframe that is more than half of all the gaps is
#: told (a majority is the most common gap for sure, in any order of the bars); any other file is
#: refused as irregular, never guessed.
MAX_GAPS = 10_000


class BarGaps:
    """What the timeframe of bars is decided from, taken one bar at a time in bounded memory (a replay
    reads a bar file twice rather than hold it): the gaps between consecutive bars, counted, and the
    first bar off each timeframe's boundaries."""

    def __init__(self) -> None:
        self.bars = 0
        self._last: int | None = None
        self._known = dict.fromkeys(_TF_BY_MS, 0)  # counted exactly
        #: The other gaps, counted exactly; None once there are more than MAX_GAPS of them.
        self._other: Counter[int] | None = Counter()
        self._misaligned: dict[str, tuple[int | None, int]] = {}

    def add(self, line: int | None, ts: int) -> None:
        if self._last is not None:
            gap = ts - self._last
            if gap in self._known:
                self._known[gap] += 1
            elif self._other is not None:
                self._other[gap] += 1
                if len(self._other) > MAX_GAPS:
                    self._other = None
        self._last = ts
        self.bars += 1
        for name, length in TIMEFRAMES.items():
            if ts % length and name not in self._misaligned:
                self._misaligned[name] = (line, ts)

    def check(self, timeframe: str) -> None:
        """ValueError unless ``timeframe`` is known and every bar starts on its boundary (ts % length
        == 0): replayed ticks must rebuild the same buckets; a daily file whose times carry a non-UTC
        offset fails here. A :class:`CsvFormatError` when the line is known."""
        if timeframe not in TIMEFRAMES:
            raise ValueError(f"unknown timeframe {timeframe!r}; known: {', '.join(TIMEFRAMES)}")
        if timeframe in self._misaligned:
            raise misaligned(*self._misaligned[timeframe], timeframe)

    def timeframe(self) -> str:
        """The timeframe whose length is the most common gap (:func:`infer_timeframe`)."""
        if self.bars < 2:
            raise ValueError(f"need at least 2 bars to infer the timeframe, got {self.bars}; pass it explicitly")
        if self._other is None:
            gap, n = max(self._known.items(), key=lambda kv: (kv[1], -kv[0]))
            if 2 * n <= self.bars - 1:  # of all the gaps, one fewer than the bars
                raise ValueError(f"bars are at irregular intervals: more than {MAX_GAPS:,} different gaps between "
                                 "them, and no timeframe's length is more than half of them; pass the timeframe "
                                 "explicitly")
        else:
            counts = {**self._other, **{g: n for g, n in self._known.items() if n}}
            gap, n = max(counts.items(), key=lambda kv: (kv[1], -kv[0]))
        if gap not in _TF_BY_MS:
            known = ", ".join(f"{name}={ms}" for name, ms in TIMEFRAMES.items())
            raise ValueError(f"bars are most often {gap} ms apart, which is no known timeframe ({known} ms)")
        self.check(_TF_BY_MS[gap])
        return _TF_BY_MS[gap]


def infer_timeframe(bars: Iterable[Bar | tuple[int, Bar]]) -> str:
    """The timeframe name whose length is the most common gap between consecutive bars.

    Accepts bars or ``(line, bar)`` pairs. The mode (not the minimum) tolerates weekends and holes in
    daily data. Raises ValueError if there are fewer than 2 bars, if the gap is not one of
    ``db.vocabulary.TIMEFRAMES``, or if the bars are not aligned to it.
    """
    gaps = BarGaps()
    for line, bar in _with_lines(bars):
        gaps.add(line, bar["ts"])
    return gaps.timeframe()
