"""CSV files of ticks and bars for the tick ingestor's replays: reading, checking, and bars replayed as ticks.

A tick is ``{"symbol": str, "ts": int, "bid": float, "ask": float, "volume": float}`` with ``ts`` in
epoch milliseconds UTC. Pure logic (files in, dicts out, no database), so the parsing rules can be
tested on their own.

Rows are parsed one by one, then checked by the writer's own rules (:mod:`db.validation`, not a copy
of them) a chunk at a time, and the first bad row raises :class:`CsvFormatError` naming its file line
once every row before it was given, because a user fixing an export needs the line, not a stack trace.
A row the writer refused would take its whole batch down with it, the good rows before it included,
and name no line. A record over several lines (a quoted field with a line break) is named by its
first line. Rows and fields are read by :mod:`workers.csvrows`; a bar file's timeframe is told by
:mod:`workers.bar_timeframe`.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

from db import tick_validation, validation
from db.errors import ValidationError
from db.vocabulary import TIMEFRAMES
from workers.bar_timeframe import BarGaps, misaligned
from workers.csvrows import (
    CsvFormatError,
    column_count_error,
    ms_to_iso,
    parse_date_and_time,
    parse_price,
    parse_time,
    parse_volume,
    read_header,
    read_rows,
    writer_rule,
)

Tick = dict[str, Any]
Bar = dict[str, Any]

#: Rows per call of the writer's tick check: its per-call cost vanishes, and a replay reads that few
#: rows ahead of what it sends.
_CHECK_ROWS = 1000
_TICK_KEYS = ("symbol", "ts", "bid", "ask", "volume")


#: How the writer's tick check names the value of a one-tick batch (rows) called "tick": "tick[0].bid: ",
#: "tick[0]: " (a rule over the row) or "tick: ".
_ONE_TICK_RE = re.compile(r"tick(?:\[0\])?(?:\.(\w+))?: ")


def _writer_verdict(chunk: Sequence[tuple[int, Tick]]) -> CsvFormatError | None:
    """None if the writer takes every tick of ``chunk``, else its refusal of the first one it refuses,
    at that tick's line. The whole chunk goes through the writer's own batch check (as columns,
    its cheaper form); only a refused chunk is checked tick by tick, to find the line."""
    if not chunk:
        return None
    ticks = list(map(itemgetter(1), chunk))
    try:
        tick_validation.tick_columns("ticks", {k: list(map(itemgetter(k), ticks)) for k in _TICK_KEYS})
        return None
    except ValidationError as e:
        refused = e
    for line, tick in chunk:
        try:
            tick_validation.tick_columns("tick", [tick])
        except ValidationError as e:
            message = str(e)
            named = _ONE_TICK_RE.match(message)
            if named:
                message = f"{named[1]} {message[named.end():]}" if named[1] else message[named.end():]
            return CsvFormatError(line, message)
    # No tick alone is refused, so the refusal is of the batch as a whole (no such rule today).
    return CsvFormatError(chunk[0][0], str(refused))


def _checked(items: Iterable[tuple[int, Tick]]) -> Iterator[tuple[int, Tick]]:
    """``items`` as they come, up to the first line the writer would refuse (or ``items`` raises
    :class:`CsvFormatError` for), then that error. Checked ``_CHECK_ROWS`` at a time, each chunk
    ending with a line (a bar's 4 ticks share one), so that no line is sent in part."""
    chunk: list[tuple[int, Tick]] = []
    error: CsvFormatError | None = None
    try:
        for item in items:
            if len(chunk) >= _CHECK_ROWS and item[0] != chunk[-1][0]:
                if _writer_verdict(chunk) is not None:
                    break  # refused: the chunk's good part and the refusal go out below
                yield from chunk
                chunk = []
            chunk.append(item)
    except CsvFormatError as e:
        error = e
    refused = _writer_verdict(chunk)
    if refused is not None:
        yield from (item for item in chunk if item[0] < refused.line)
        raise refused
    yield from chunk
    if error is not None:
        raise error


def read_tick_csv(path: str | Path, symbol: str | None = None, limit: int | None = None) -> Iterator[tuple[int, Tick]]:
    """Yield ``(file line, tick)`` from a CSV with header ``ts,symbol,bid,ask,volume`` (any order, any
    case; the time as a bar file's: :func:`time_columns`).

    ``ts`` is ISO-8601 (naive = UTC) or integer epoch seconds or ms, told apart by magnitude as in
    bar files (:func:`workers.csvrows.parse_time`). ``symbol``, if given, overrides the file's
    symbol column, which may then be absent; ``volume`` may be absent (0). Rows are validated as they
    are read, by this reader's rules and then by the writer's (symbol format, time and price ranges):
    the first bad row raises :class:`CsvFormatError` after every earlier row was yielded, so an
    ingestor can commit the good prefix. Time going backwards is allowed (feeds do that). ``limit``:
    of the file's first ``limit`` bytes only (:func:`workers.csvrows.read_rows`).
    """
    return _checked(_parse_ticks(path, symbol, limit))


_TICK_HEADER = "ts,symbol,bid,ask,volume"
#: The names a time column may have, by rank: ``ts``, then a whole timestamp, then a date or a time
#: of day (:func:`time_columns`).
_TIME_RANKS = (("ts",), ("timestamp", "datetime"), ("time", "date"))
_TIME_NAMES = tuple(name for rank in _TIME_RANKS for name in rank)


def _first_columns(names: list[str]) -> dict[str, int]:
    """Name -> column of a header's ``names``; the first of a repeated name wins."""
    return {name: i for i, name in reversed(list(enumerate(names)))}


def _repeated(names: list[str], read: Iterable[str]) -> list[str]:
    """The header's reasons for each name of ``read`` (the columns a row is read from) that it has
    more than once: which one holds the value is anybody's guess (``ts,bid,ask,bid`` used the first
    bid without a word; fault hunt, round 38). Other columns may repeat: they are not read."""
    out = []
    for name in dict.fromkeys(read):
        where = [i + 1 for i, n in enumerate(names) if n == name]
        if len(where) > 1:
            out.append(f"has {name} {len(where)} times (columns {', '.join(map(str, where))}: keep one)")
    return out


def time_columns(names: list[str]) -> tuple[list[str], tuple[int, ...]]:
    """Where the rows of a file with header ``names`` (:func:`read_header`'s) have their time, the
    one rule of tick and bar files: the column named ``ts``, else the one named ``timestamp`` or
    ``datetime``, else the one named ``time`` or ``date``, or both read together as one time (``Date,
    Time,...``: a date and a time of day in two columns, a common export). Returns the names found at
    that rank (in file order) and the columns to read; none when they do not make one time
    (``timestamp`` and ``datetime``), or when no column has such a name. The first of a repeated
    name wins."""
    col = _first_columns(names)
    found = next(([n for n in rank if n in col] for rank in _TIME_RANKS if any(n in col for n in rank)), [])
    found.sort(key=col.__getitem__)
    if len(found) == 1:
        return found, (col[found[0]],)
    if set(found) == {"date", "time"}:
        return found, (col["date"], col["time"])
    return found, ()


def read_time(line: int, row: list[str], where: tuple[int, ...], name: str) -> int:
    """The time of ``row`` read from the columns ``where`` (:func:`time_columns`): one column by
    :func:`parse_time`, a date and a time of day by :func:`parse_date_and_time`."""
    if len(where) == 1:
        return parse_time(line, name, row[where[0]])
    return parse_date_and_time(line, row[where[0]], row[where[1]])


def tick_header_columns(line: int, names: list[str], symbol: str | None) -> tuple[dict[str, int], tuple[int, ...]]:
    """Where each column of a tick file's header ``names`` (:func:`read_header`'s) is: ``symbol``
    (unless ``symbol`` is given), ``bid``, ``ask`` and, if there, ``volume`` (each once: a repeated
    one is refused), and the columns of its time (:func:`time_columns`). A header that cannot give a tick
    is refused before a row is read, with every reason."""
    col = _first_columns(names)
    times, where = time_columns(names)
    missing = [c for c in ("bid", "ask") if c not in col]
    if "symbol" not in col and not symbol:
        missing.insert(0, "symbol (or pass a symbol, which fills it)")
    if not times:
        missing.insert(0, f"ts (a time column: {', '.join(_TIME_NAMES)}, or a date and a time)")
    reasons = [f"lacks column(s) {'; '.join(missing)}"] if missing else []
    reasons += _repeated(names, [*times, *([] if symbol else ["symbol"]), "bid", "ask", "volume"])
    if times and not where:
        reasons.append(f"has several time columns ({', '.join(times)}) and no ts (a tick's time is one column, "
                       "ISO-8601 or epoch, or a date and a time of day: name the one that holds it ts)")
    if reasons:
        raise CsvFormatError(line, f"header {' and '.join(reasons)}; expected {_TICK_HEADER}")
    return col, where


def _parse_ticks(path: str | Path, symbol: str | None, limit: int | None = None) -> Iterator[tuple[int, Tick]]:
    rows = read_rows(path, limit)
    line, names = read_header(rows, _TICK_HEADER)
    col, when = tick_header_columns(line, names, symbol)
    for line, row in rows:
        if len(row) != len(names):
            raise column_count_error(line, len(names), row)
        ts = read_time(line, row, when, "ts")
        bid = parse_price(line, "bid", row[col["bid"]])
        ask = parse_price(line, "ask", row[col["ask"]])
        if bid > ask:
            raise CsvFormatError(line, f"bid {bid!r} is above ask {ask!r}")
        volume = parse_volume(line, row[col["volume"]]) if "volume" in col else 0.0
        sym = symbol or row[col["symbol"]].strip()
        if not sym:
            raise CsvFormatError(line, "symbol is empty")
        yield line, {"symbol": sym, "ts": ts, "bid": bid, "ask": ask, "volume": volume}


_OHLC = ("open", "high", "low", "close")


def read_bar_csv(path: str | Path) -> list[tuple[int, Bar]]:
    """Read an OHLCV export (``Date,Open,High,Low,Close,Volume``) as ``[(file line, bar), ...]``.

    Header names are case-insensitive; the time is as a tick file's (:func:`time_columns`: ts, a
    timestamp, a date or a time, or a date and a time of day in two columns), else an unnamed first
    column (pandas writes that); other columns such as 'Adj Close' are ignored and
    a missing Volume means 0. Times are ISO-8601 (naive = UTC) or integer epoch seconds/ms (told apart
    by magnitude). Each bar ``{"ts", "open", "high", "low", "close", "volume"}`` must have positive
    prices (below the writer's price limit), low <= open, close <= high, volume >= 0, and a time in the
    writer's range strictly after the previous bar's, else :class:`CsvFormatError` names the line. A
    list of the whole file: a replay (:class:`CsvFeed`) reads the bars as it goes instead.
    """
    return list(_bar_rows(path))


def _identity(path: Path) -> tuple[int, int, int, int]:
    """Which file ``path`` is, and as written: device, inode, size, modification time (ns)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _bar_rows(path: str | Path) -> Iterator[tuple[int, Bar]]:
    """The bars of ``path`` (:func:`read_bar_csv`'s rules), read as they are asked for, then the first
    bad row's :class:`CsvFormatError`; a bad header raises at once, as no bar can be read then."""
    rows = read_rows(path)
    try:
        line, names = read_header(rows, "Date,Open,High,Low,Close,Volume")
        times, when = time_columns(names)
        if not times and names[0] == "":  # pandas writes its index so
            when = (0,)
        missing = [c for c in _OHLC if c not in names] + (["a time column (Date)"] if not when and not times else [])
        reasons = [f"lacks {', '.join(missing)}"] if missing else []
        reasons += _repeated(names, [*times, *_OHLC, "volume"])
        if times and not when:
            reasons.append(f"has several time columns ({', '.join(times)}): name the one that holds the time ts")
        if reasons:
            raise CsvFormatError(line, f"header {' and '.join(reasons)}; expected Date,Open,High,Low,Close,Volume")
    except BaseException:
        rows.close()
        raise
    first = _first_columns(names)
    col = {c: first[c] for c in (*_OHLC, "volume") if c in first}
    return _bars(rows, len(names), when, col)


def _bars(rows: Iterator[tuple[int, list[str]]], width: int, when: tuple[int, ...],
          col: dict[str, int]) -> Iterator[tuple[int, Bar]]:
    with closing(rows):  # closed with this generator, wherever its reader stops
        prev: tuple[int, Bar] | None = None
        for line, row in rows:
            prev = line, _bar(line, row, width, when, col, prev)
            yield prev


def _bar(line: int, row: list[str], width: int, when: tuple[int, ...], col: dict[str, int],
         prev: tuple[int, Bar] | None) -> Bar:
    if len(row) != width:
        raise column_count_error(line, width, row)
    ts = read_time(line, row, when, "time")
    writer_rule(line, validation.timestamp, "time", ts)
    o, h, lo, c = (parse_price(line, name, row[col[name]]) for name in _OHLC)
    for name, value in zip(_OHLC, (o, h, lo, c), strict=True):
        writer_rule(line, validation.price, name, value)
    volume = parse_volume(line, row[col["volume"]]) if "volume" in col else 0.0
    if h < max(o, c, lo):
        raise CsvFormatError(line, f"high {h!r} is below max(open, close, low) = {max(o, c, lo)!r}")
    if lo > min(o, c):
        raise CsvFormatError(line, f"low {lo!r} is above min(open, close) = {min(o, c)!r}")
    if prev is not None and ts <= prev[1]["ts"]:
        raise CsvFormatError(line, f"time {ms_to_iso(ts)} is not after {ms_to_iso(prev[1]['ts'])} (line {prev[0]})")
    return {"ts": ts, "open": o, "high": h, "low": lo, "close": c, "volume": volume}


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

    Iterating gives ``(file line, tick)`` in file order, and a bad row raises :class:`CsvFormatError`
    once every tick of the rows before it was given (an ingestor stores them, as the README promises).
    ``kind`` is "ticks" or "bars"; for bars, ``timeframe`` is the given name or the one inferred from
    the bars before the first bad row (a first pass over the file, which keeps only what
    :class:`~workers.bar_timeframe.BarGaps` needs), and iterating reads the bars again, each replayed
    by :func:`bar_to_ticks`;
    for ticks it is None. Either way rows are read as they are sent (memory bounded, whatever the
    file), and the ticks given are ones the writer takes. ``symbol`` is required for bar files and
    overrides the symbol column of tick files.
    """

    def __init__(self, path: str | Path, symbol: str | None = None, timeframe: str | None = None) -> None:
        self.path = Path(path)
        self.symbol = symbol
        self._identity = _identity(self.path)
        rows = read_rows(self.path)
        try:
            line, names = read_header(rows, "ts,symbol,bid,ask,volume or Date,Open,High,Low,Close,Volume")
        finally:
            rows.close()
        # Every OHLC name, or two and no bid and ask: a bar file (one that lacks a column is told so as
        # one; a quote file with the day's high and low is ticks).
        ohlc = set(_OHLC) & set(names)
        bars = ohlc == set(_OHLC) or (len(ohlc) >= 2 and not {"bid", "ask"} <= set(names))
        self.kind: Literal["ticks", "bars"] = "bars" if bars else "ticks"
        self.timeframe: str | None = None
        if self.kind == "ticks":
            if timeframe is not None:
                raise ValueError(f"{self.path} holds ticks: a timeframe only applies to bar files")
            tick_header_columns(line, names, symbol)  # a header that cannot give a tick is refused now, not at row 2
            return
        if not symbol:
            raise ValueError(f"{self.path} holds bars, which have no symbol column: pass a symbol")
        # A first pass decides the timeframe, the replay (iterating) a second: memory bounded, not the file's.
        gaps, bars = BarGaps(), _bar_rows(self.path)  # a bad header raises here, at once
        bad_row: CsvFormatError | None = None  # raised again by the replay, at its line
        try:
            for line, bar in bars:
                gaps.add(line, bar["ts"])
        except CsvFormatError as e:
            bad_row = e
        if timeframe is None:
            try:
                self.timeframe = gaps.timeframe()
            except CsvFormatError:
                raise
            except ValueError:
                # Too few bars before the bad row to tell the timeframe: that row is what to fix.
                if bad_row is not None:
                    raise bad_row from None
                raise
        else:
            gaps.check(timeframe)
            self.timeframe = timeframe

    def __iter__(self) -> Iterator[tuple[int, Tick]]:
        # Read again by path: a file replaced or rewritten since the first look (the timeframe, the
        # header, the source's digest came from it) is not replayed as if it were the same.
        if _identity(self.path) != self._identity:
            raise ValueError(f"{self.path} changed since it was first read (another file, size or time); "
                             "replay it again once it is written")
        if self.kind == "ticks":
            return self._ticks()
        return _checked(self._bar_ticks())

    @property
    def size(self) -> int:
        """The file's size when first looked at: what a replay reads of a tick file."""
        return self._identity[2]

    def _ticks(self) -> Iterator[tuple[int, Tick]]:
        """The file's ticks as it was when first looked at (its size then: the source's digest names
        that content), then :class:`CsvFormatError` if it changed while they were read: rows appended
        during a replay were stored under the digest of the file without them, and replaying the
        file again stored every row a second time (a fault hunt)."""
        line = 1
        for line, tick in read_tick_csv(self.path, self.symbol, self.size):
            yield line, tick
        if _identity(self.path) != self._identity:
            raise CsvFormatError(line + 1, f"{self.path} changed while it was replayed: its first "
                                 f"{self.size:,} bytes, which its source names, are stored, and "
                                 "nothing written since; replay a file of the rows added")

    def _bar_ticks(self) -> Iterator[tuple[int, Tick]]:
        assert self.timeframe is not None and self.symbol
        length = TIMEFRAMES[self.timeframe]
        for line, bar in _bar_rows(self.path):  # then the bad row's error, if any
            if bar["ts"] % length:  # the file changed since the first pass: no bar is replayed off its bucket
                raise misaligned(line, bar["ts"], self.timeframe)
            for tick in bar_to_ticks(bar, length, self.symbol):
                yield line, tick


def file_digest(path: Path, limit: int | None = None) -> str:
    """The first 16 hex digits of the SHA-256 of the file's bytes (its first ``limit``, the size a
    :class:`CsvFeed` replays: :attr:`CsvFeed.size`): a CSV replay's source. Read in chunks, so that a
    file larger than memory can be replayed (the whole file read at once took as much memory as the
    file); the digest is that of the whole file's bytes as before, so a file replayed before keeps its
    source and is not stored twice."""
    digest, left = hashlib.sha256(), math.inf if limit is None else limit
    with open(path, "rb") as f:
        while left > 0 and (chunk := f.read(int(min(left, 1 << 20)))):
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()[:16]
