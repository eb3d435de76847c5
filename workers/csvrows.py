"""Reading the rows and fields of CSV files of ticks and bars (:mod:`workers.csvfiles`): records bounded
in length, bytes that are not UTF-8, numbers and times as exports write them, each refusal a
:class:`CsvFormatError` naming its file line."""
from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from db import validation
from db.errors import ValidationError
from db.timestamps import time_problem

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


class CsvFormatError(ValueError):
    """A CSV file is malformed; ``line`` is the 1-based file line and ``reason`` what is wrong there."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[int, str]]:  # picklable across processes
        return (type(self), (self.line, self.reason))


def read_rows(path: str | Path, limit: int | None = None) -> Iterator[tuple[int, list[str]]]:
    """(file line, fields) for every non-blank row; utf-8-sig drops the BOM of Excel exports. With
    ``limit``, of the file's first ``limit`` bytes only (a replay reads what its source's digest named,
    not what was appended to the file since).

    A byte that is not UTF-8, a row the csv module cannot read (a field over its limit), or a record
    over :data:`MAX_RECORD_CHARS` raises :class:`CsvFormatError` at its line once every row before it
    was yielded. Strict decoding would fail for the whole 8 KB block the file object decodes at once,
    losing the good rows before the byte in that block; surrogateescape keeps the byte in its row,
    where it is found."""
    raw = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the text wrapper it is given to
    source = raw if limit is None else _Prefix(raw, limit)
    with io.TextIOWrapper(io.BufferedReader(source), encoding="utf-8-sig", errors="surrogateescape",
                          newline="") as f:
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


class _Prefix(io.RawIOBase):
    """The first ``limit`` bytes of a raw binary file."""

    def __init__(self, raw: io.RawIOBase, limit: int) -> None:
        self._raw, self._left = raw, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        n = self._raw.readinto(memoryview(buffer)[:self._left]) or 0
        self._left -= n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class _RecordTooLong(Exception):
    """A record grew past :data:`MAX_RECORD_CHARS` (:class:`_BoundedLines`); :func:`read_rows` names its line."""


class _BoundedLines:
    """The lines of a text file for ``csv.reader``, read at most :data:`MAX_RECORD_CHARS` characters
    into the current record (:func:`read_rows` sets ``record_chars`` back to 0 after each one), then
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


#: Separators of files that are not comma-separated, as spreadsheets export them (a locale with
#: decimal commas separates fields by semicolons), with their names.
OTHER_SEPARATORS = ((";", "semicolons"), ("\t", "tabs"), ("|", "vertical bars"))


def read_header(rows: Iterator[tuple[int, list[str]]], expected: str) -> tuple[int, list[str]]:
    """The header row with names stripped and lower-cased. A header of one field that holds
    another separator is refused as such: its file would otherwise read as one that lacks every
    column."""
    first = next(rows, None)
    if first is None:
        raise CsvFormatError(1, f"empty file, expected a header like {expected}")
    line, names = first
    if len(names) == 1:
        for separator, name in OTHER_SEPARATORS:
            if separator in names[0]:
                raise CsvFormatError(line, f"the header's fields are separated by {name}, not commas: save the "
                                           f"file as comma-separated values (expected a header like {expected})")
    return line, [name.strip().lower() for name in names]


def parse_number(line: int, name: str, text: str) -> float:
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


def parse_price(line: int, name: str, text: str) -> float:
    value = parse_number(line, name, text)
    if value <= 0:
        raise CsvFormatError(line, f"{name} {validation.shown(text)} must be > 0")
    return value


def parse_volume(line: int, text: str) -> float:
    value = parse_number(line, "volume", text)
    if value < 0:
        raise CsvFormatError(line, f"volume {validation.shown(text)} must be >= 0")
    return value


def writer_rule(line: int, check: validation.Validator, name: str, value: Any) -> None:
    """``check`` (a :mod:`db.validation` field validator) as a :class:`CsvFormatError` at ``line``."""
    try:
        check(name, value)
    except ValidationError as e:
        raise CsvFormatError(line, str(e).replace(f"{name}: ", f"{name} ", 1)) from None


def iso_to_ms(text: str) -> int:
    """ISO-8601 time to epoch ms: naive means UTC, an offset or 'Z' is honoured; ValueError if not ISO."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MS  # exact integer arithmetic, no float timestamp()


def ms_to_iso(ts: int) -> str:
    """Epoch ms to an ISO-8601 UTC string, for error messages."""
    return (_EPOCH + ts * _MS).isoformat().replace("+00:00", "Z")


#: A date and a time of day in two columns (:func:`parse_date_and_time`): ISO-8601's forms, extended
#: or basic; the time with seconds, a fraction and an offset if it has them.
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{8}")
_TIME_OF_DAY_RE = re.compile(r"(?:[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:[.,][0-9]+)?)?|[0-9]{4}(?:[0-9]{2}(?:[.,][0-9]+)?)?)"
                             r"(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?")


def column_count_error(line: int, expected: int, row: list[str]) -> CsvFormatError:
    """A row of another width than its header's. A quote left open makes one: the csv module reads on,
    over commas and line breaks, to the next quote or the file's end, and the row it gives has too few
    columns; no field of ticks or bars holds either, so one in the row says where to look."""
    said = f"expected {expected} columns, got {len(row)}"
    if any("\n" in field or "," in field for field in row):
        said += '; a field holds a line break or a comma, as no field of ticks or bars does: is a quote (") left open?'
    return CsvFormatError(line, said)


def parse_date_and_time(line: int, date_text: str, time_text: str) -> int:
    """A time given as a date and a time of day in two columns (``2024-01-02,13:00``) as epoch ms.
    Each must have its own form: joined as they come, an epoch in the time column read as a time of
    day with a fraction, and an empty cell as midnight or as epoch seconds."""
    date, time_of_day = date_text.strip(" \t"), time_text.strip(" \t")
    if not (_DATE_RE.fullmatch(date) and _TIME_OF_DAY_RE.fullmatch(time_of_day)):
        raise CsvFormatError(line, f"date {validation.shown(date)} and time {validation.shown(time_of_day)} are not a "
                                   "date (YYYY-MM-DD or YYYYMMDD) and a time of day (HH:MM[:SS] or HHMM[SS]); a "
                                   "column that holds the whole time is named ts")
    try:
        ms = iso_to_ms(f"{date}T{time_of_day}")
    except ValueError as e:
        raise CsvFormatError(line, f"date {validation.shown(date)} and time {validation.shown(time_of_day)} are no "
                                   f"time: {e}") from None
    return _in_range(line, "date and time", f"{date} {time_of_day}", ms)


def parse_time(line: int, name: str, text: str) -> int:
    """A time of a tick or bar file as epoch ms: ISO-8601 (naive = UTC), or an integer of epoch seconds
    or ms told apart by magnitude (:data:`_SECONDS_CUTOFF`), the one rule for both kinds of file. Eight
    digits that make a calendar date are that date (YYYYMMDD, ISO-8601's basic form, as in a date
    column beside a time): read as seconds, ``20240102`` was 1970-08-23."""
    text = text.strip(" \t")
    if len(text) == 8 and text.isascii() and text.isdigit():
        try:
            ms = iso_to_ms(text)
        except ValueError:
            pass  # no date (20241301): epoch seconds, as any other integer
        else:
            return _in_range(line, name, text, ms)
    if _INT_RE.fullmatch(text):
        if len(text) > _MAX_INT_CHARS:
            raise CsvFormatError(line, f"{name} {validation.shown(text)} has {len(text)} characters, too many "
                                       "for epoch seconds/ms")
        value = int(text)
        seconds = abs(value) < _SECONDS_CUTOFF
        return _in_range(line, name, text, value * 1000 if seconds else value,
                         "epoch seconds" if seconds else "epoch ms")
    try:
        ms = iso_to_ms(text)
    except ValueError:
        raise CsvFormatError(line, f"{name} {validation.shown(text)} is not an ISO-8601 time or epoch "
                                   "seconds/ms") from None
    return _in_range(line, name, text, ms)


def _in_range(line: int, name: str, text: str, ms: int, unit: str | None = None) -> int:
    """``ms``, read from ``text``, if the writer takes it as a time (:func:`db.timestamps.time_problem`:
    1970..2100, and not January to April 1970, which it refuses as a likely time in seconds); else the
    error names the value as the file wrote it, and how it was read (epoch seconds are multiplied into
    milliseconds: the writer's words would name the product, and advise sending milliseconds, which a
    file does not choose). Every row's time comes here: the words are made only for a bad one."""
    if time_problem(ms) is None:
        return ms
    try:
        read = f" ({unit}: {ms_to_iso(ms)})" if unit else ""
    except (OverflowError, ValueError):  # before year 1 or after 9999
        read = f" ({unit})"
    if 0 <= ms <= validation.MAX_TS:  # in range, so refused as a time in seconds
        raise CsvFormatError(line, f"{name} {validation.shown(text)}{read} is from January to April 1970, which "
                                   "the writer refuses: as epoch milliseconds, such a time is most likely one in "
                                   "seconds")
    raise CsvFormatError(line, f"{name} {validation.shown(text)}{read} is out of range: 1970..2100")
