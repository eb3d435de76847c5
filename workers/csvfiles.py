"""CSV files of ticks and bars for the tick ingestor's replays: reading, checking, and bars replayed as ticks.

A tick is ``{"symbol": str, "ts": int, "bid": float, "ask": float, "volume": float}`` with ``ts`` in
epoch milliseconds UTC. Pure logic (files in, dicts out, no database), so the parsing rules can be
tested on their own.

Rows are parsed one by one, then checked by the writer's own rules (:mod:`db.validation`, not a copy
of them) a chunk at a time, and the first bad row raises :class:`CsvFormatError` naming its file line
once every row before it was given, because a user fixing an export needs the line, not a stack trace.
A row the writer refused would take its whole batch down with it, the good rows before it included,
and name no line. A record over several lines (a quoted field with a line break) is named by its
first line.
"""
from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal, TextIO

from db import validation
from db.errors import ValidationError
from db.vocabulary import TIMEFRAMES

Tick = dict[str, Any]
Bar = dict[str, Any]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
#: Integer times (of ticks and bars) below this are epoch seconds, above it epoch ms (1e11 ms is 1973,
#: 1e11 s is 5138).
_SECONDS_CUTOFF = 10**11
#: An integer time: ASCII digits only (``\d`` took Arabic-Indic and other digits too, which int() reads).
_INT_RE = re.compile(r"[+-]?[0-9]+")
#: A number as an export writes it, spaces or tabs around: float() also takes '_' between digits ("1_0"
#: is 10), digits of other scripts and other white space, so a typo or a foreign file read as a price.
_DECIMAL_RE = re.compile(r"[ \t]*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t]*")
#: An int64 with its sign: a longer integer is no epoch time, and int() refuses 4,300 digits and more.
_MAX_INT_CHARS = 20
#: The most characters one record (a row, with the line breaks of any quoted field in it) may have:
#: a row of ticks or bars is well under a hundred, and csv's own limit is 131,072 per field. It bounds
#: what a replay holds in memory for one row, whatever the file.
MAX_RECORD_CHARS = 1 << 20
#: What surrogateescape decodes a byte that is not UTF-8 into (U+DC80..U+DCFF).
_UNDECODED_RE = re.compile("[\udc80-\udcff]")
#: Rows per call of the writer's tick check: its per-call cost vanishes, and a replay reads that few
#: rows ahead of what it sends.
_CHECK_ROWS = 1000
_TICK_KEYS = ("symbol", "ts", "bid", "ask", "volume")
_TF_BY_MS = {ms: name for name, ms in TIMEFRAMES.items()}


class CsvFormatError(ValueError):
    """A CSV file is malformed; ``line`` is the 1-based file line and ``reason`` what is wrong there."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[int, str]]:  # picklable across processes
        return (type(self), (self.line, self.reason))


def _rows(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(file line, fields) for every non-blank row; utf-8-sig drops the BOM of Excel exports.

    A byte that is not UTF-8, a row the csv module cannot read (a field over its limit), or a record
    over :data:`MAX_RECORD_CHARS` raises :class:`CsvFormatError` at its line once every row before it
    was yielded. Strict decoding would fail for the whole 8 KB block the file object decodes at once,
    losing the good rows before the byte in that block; surrogateescape keeps the byte in its row,
    where it is found."""
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        lines = _BoundedLines(f)
        reader = csv.reader(lines)
        header: list[str] = []
        line = 1  # where the next record starts (a quoted field may hold line breaks)
        try:
            for row in reader:
                if row:
                    if not "".join(row).isascii():  # one C call for the usual all-ASCII row
                        _check_decoded(line, row, header)
                    if not header:
                        header = [name.strip().lower() for name in row]
                    yield line, row
                line = reader.line_num + 1
                lines.record_chars = 0
        except csv.Error as e:
            raise CsvFormatError(line, f"not readable as CSV: {e}") from None
        except _RecordTooLong:
            raise CsvFormatError(line, f"the row is longer than {MAX_RECORD_CHARS:,} characters, which no row of "
                                       "ticks or bars is (is this the right file?)") from None


class _RecordTooLong(Exception):
    """A record grew past :data:`MAX_RECORD_CHARS` (:class:`_BoundedLines`); :func:`_rows` names its line."""


class _BoundedLines:
    """The lines of a text file for ``csv.reader``, read at most :data:`MAX_RECORD_CHARS` characters
    into the current record (:func:`_rows` sets ``record_chars`` back to 0 after each one), then
    :class:`_RecordTooLong`. Iterating the file itself reads a whole line whatever its length: a
    500 MB line took a gigabyte before the csv module saw it and refused its field."""

    def __init__(self, f: TextIO) -> None:
        self._readline = f.readline
        #: Characters read into the current record so far.
        self.record_chars = 0

    def __iter__(self) -> _BoundedLines:
        return self

    def __next__(self) -> str:
        text = self._readline(MAX_RECORD_CHARS - self.record_chars + 1)
        if not text:
            raise StopIteration
        self.record_chars += len(text)
        if self.record_chars > MAX_RECORD_CHARS:
            raise _RecordTooLong
        return text


def _check_decoded(line: int, row: list[str], header: list[str]) -> None:
    for i, field in enumerate(row):
        bad = _UNDECODED_RE.search(field)
        if bad:
            where = "the header" if not header else header[i] if i < len(header) and header[i] else f"column {i + 1}"
            raise CsvFormatError(line, f"{where} holds byte 0x{ord(bad[0]) - 0xDC00:02x}, which is not UTF-8 "
                                       "(save the file as UTF-8)")


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
        raise CsvFormatError(line, f"{name} {validation.shown(text)} is not a number") from None
    if not math.isfinite(value):
        raise CsvFormatError(line, f"{name} {validation.shown(text)} is not a finite number")
    if not _DECIMAL_RE.fullmatch(text):
        raise CsvFormatError(line, f"{name} {validation.shown(text)} is not a number as CSV files write one "
                                   "(the digits 0-9, a sign, a point and an exponent such as 1.0825 or 1e-3)")
    return value


def _price(line: int, name: str, text: str) -> float:
    value = _number(line, name, text)
    if value <= 0:
        raise CsvFormatError(line, f"{name} {validation.shown(text)} must be > 0")
    return value


def _volume(line: int, text: str) -> float:
    value = _number(line, "volume", text)
    if value < 0:
        raise CsvFormatError(line, f"volume {validation.shown(text)} must be >= 0")
    return value


def _writer_rule(line: int, check: validation.Validator, name: str, value: Any) -> None:
    """``check`` (a :mod:`db.validation` field validator) as a :class:`CsvFormatError` at ``line``."""
    try:
        check(name, value)
    except ValidationError as e:
        raise CsvFormatError(line, str(e).replace(f"{name}: ", f"{name} ", 1)) from None


#: How the writer's tick check names the value of a one-tick batch called "tick": "tick.bid[0]: ",
#: "tick[0]: " (a rule over the row) or "tick: ".
_ONE_TICK_RE = re.compile(r"tick(?:\.(\w+))?(?:\[0\])?: ")


def _writer_verdict(chunk: Sequence[tuple[int, Tick]]) -> CsvFormatError | None:
    """None if the writer takes every tick of ``chunk``, else its refusal of the first one it refuses,
    at that tick's line. The whole chunk goes through the writer's own batch check (as columns,
    its cheaper form); only a refused chunk is checked tick by tick, to find the line."""
    if not chunk:
        return None
    ticks = list(map(itemgetter(1), chunk))
    try:
        validation.tick_columns("ticks", {k: list(map(itemgetter(k), ticks)) for k in _TICK_KEYS})
        return None
    except ValidationError as e:
        refused = e
    for line, tick in chunk:
        try:
            validation.tick_columns("tick", [tick])
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


def iso_to_ms(text: str) -> int:
    """ISO-8601 time to epoch ms: naive means UTC, an offset or 'Z' is honoured; ValueError if not ISO."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MS  # exact integer arithmetic, no float timestamp()


def ms_to_iso(ts: int) -> str:
    """Epoch ms to an ISO-8601 UTC string, for error messages."""
    return (_EPOCH + ts * _MS).isoformat().replace("+00:00", "Z")


def _timestamp(line: int, name: str, text: str) -> int:
    """A time of a tick or bar file as epoch ms: ISO-8601 (naive = UTC), or an integer of epoch seconds
    or ms told apart by magnitude (:data:`_SECONDS_CUTOFF`), the one rule for both kinds of file."""
    text = text.strip(" \t")
    if _INT_RE.fullmatch(text):
        if len(text) > _MAX_INT_CHARS:
            raise CsvFormatError(line, f"{name} {validation.shown(text)} has {len(text)} characters, too many "
                                       "for epoch seconds/ms")
        value = int(text)
        return value * 1000 if abs(value) < _SECONDS_CUTOFF else value
    try:
        return iso_to_ms(text)
    except ValueError:
        raise CsvFormatError(line, f"{name} {validation.shown(text)} is not an ISO-8601 time or epoch "
                                   "seconds/ms") from None


def read_tick_csv(path: str | Path, symbol: str | None = None) -> Iterator[tuple[int, Tick]]:
    """Yield ``(file line, tick)`` from a CSV with header ``ts,symbol,bid,ask,volume`` (any order).

    ``ts`` is ISO-8601 (naive = UTC) or integer epoch seconds or ms, told apart by magnitude as in
    bar files (:func:`_timestamp`). ``symbol``, if given, overrides the file's
    symbol column, which may then be absent; ``volume`` may be absent (0). Rows are validated as they
    are read, by this reader's rules and then by the writer's (symbol format, time and price ranges):
    the first bad row raises :class:`CsvFormatError` after every earlier row was yielded, so an
    ingestor can commit the good prefix. Time going backwards is allowed (feeds do that).
    """
    return _checked(_parse_ticks(path, symbol))


def _parse_ticks(path: str | Path, symbol: str | None) -> Iterator[tuple[int, Tick]]:
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
        ts = _timestamp(line, "ts", row[col["ts"]])
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
    prices (below the writer's price limit), low <= open, close <= high, volume >= 0, and a time in the
    writer's range strictly after the previous bar's, else :class:`CsvFormatError` names the line. The
    whole file is read because replay needs the timeframe, which is inferred from all the bars.
    """
    bars, error = _read_bars(path)
    if error is not None:
        raise error
    return bars


def _read_bars(path: str | Path) -> tuple[list[tuple[int, Bar]], CsvFormatError | None]:
    """The bars before the first bad row, and that row's error (None if there is none); a bad header
    raises, as no bar can be read then."""
    with closing(_rows(path)) as rows:
        line, names = _header(rows, "Date,Open,High,Low,Close,Volume")
        time_col = next((i for i, n in enumerate(names) if n in _TIME_NAMES), 0 if names[0] == "" else None)
        missing = [c for c in _OHLC if c not in names]
        if time_col is None or missing:
            what = ", ".join(missing + (["a time column (Date)"] if time_col is None else []))
            raise CsvFormatError(line, f"header lacks {what}; expected Date,Open,High,Low,Close,Volume")
        col = {c: names.index(c) for c in (*_OHLC, "volume") if c in names}
        bars: list[tuple[int, Bar]] = []
        try:
            for line, row in rows:
                bars.append((line, _bar(line, row, len(names), time_col, col, bars[-1] if bars else None)))
        except CsvFormatError as e:
            return bars, e
    return bars, None


def _bar(line: int, row: list[str], width: int, time_col: int, col: dict[str, int],
         prev: tuple[int, Bar] | None) -> Bar:
    if len(row) != width:
        raise CsvFormatError(line, f"expected {width} columns, got {len(row)}")
    ts = _timestamp(line, "time", row[time_col])
    _writer_rule(line, validation.timestamp, "time", ts)
    o, h, lo, c = (_price(line, name, row[col[name]]) for name in _OHLC)
    for name, value in zip(_OHLC, (o, h, lo, c), strict=True):
        _writer_rule(line, validation.price, name, value)
    volume = _volume(line, row[col["volume"]]) if "volume" in col else 0.0
    if h < max(o, c, lo):
        raise CsvFormatError(line, f"high {h!r} is below max(open, close, low) = {max(o, c, lo)!r}")
    if lo > min(o, c):
        raise CsvFormatError(line, f"low {lo!r} is above min(open, close) = {min(o, c)!r}")
    if prev is not None and ts <= prev[1]["ts"]:
        raise CsvFormatError(line, f"time {ms_to_iso(ts)} is not after {ms_to_iso(prev[1]['ts'])} (line {prev[0]})")
    return {"ts": ts, "open": o, "high": h, "low": lo, "close": c, "volume": volume}


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
    ``db.vocabulary.TIMEFRAMES``, or if the bars are not aligned to it.
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

    Iterating gives ``(file line, tick)`` in file order, and a bad row raises :class:`CsvFormatError`
    once every tick of the rows before it was given (an ingestor stores them, as the README promises).
    ``kind`` is "ticks" or "bars"; for bars, ``timeframe`` is the given name or the one inferred from
    the bars before the first bad row (read up front), and each bar is replayed by
    :func:`bar_to_ticks`; for ticks it is None and rows are read lazily. Either way the ticks given
    are ones the writer takes. ``symbol`` is required for bar files and overrides the symbol column of
    tick files.
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
        self._bad_row: CsvFormatError | None = None
        if self.kind == "ticks":
            if timeframe is not None:
                raise ValueError(f"{self.path} holds ticks: a timeframe only applies to bar files")
            if "symbol" not in names and not symbol:
                raise CsvFormatError(line, "no symbol column: pass a symbol")
            return
        if not symbol:
            raise ValueError(f"{self.path} holds bars, which have no symbol column: pass a symbol")
        self._bars, self._bad_row = _read_bars(self.path)
        if timeframe is None:
            try:
                self.timeframe = infer_timeframe(self._bars)
            except CsvFormatError:
                raise
            except ValueError:
                # Too few bars before the bad row to tell the timeframe: that row is what to fix.
                if self._bad_row is not None:
                    raise self._bad_row from None
                raise
        else:
            check_aligned(self._bars, timeframe)
            self.timeframe = timeframe

    def __iter__(self) -> Iterator[tuple[int, Tick]]:
        if self.kind == "ticks":
            return read_tick_csv(self.path, self.symbol)
        return _checked(self._bar_ticks())

    def _bar_ticks(self) -> Iterator[tuple[int, Tick]]:
        assert self.timeframe is not None and self.symbol
        length = TIMEFRAMES[self.timeframe]
        for line, bar in self._bars:
            for tick in bar_to_ticks(bar, length, self.symbol):
                yield line, tick
        if self._bad_row is not None:
            raise self._bad_row
