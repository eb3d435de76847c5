"""Tests for workers.feeds and workers.csvfiles: the simulated market, CSV parsing and validation, bar replay,
pacing."""
from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

import pytest

from db.vocabulary import TIMEFRAMES
from workers.bar_builder import BarBuilder
from workers.bar_timeframe import MAX_GAPS, infer_timeframe
from workers.csvfiles import (
    CsvFeed,
    CsvFormatError,
    bar_to_ticks,
    file_digest,
    read_bar_csv,
    read_tick_csv,
)
from workers.feeds import SimFeed, pace, parse_speed

pytestmark = pytest.mark.database_independent(
    "the feeds read CSV files and make ticks in memory, and never open a database")

T0 = 1_704_153_600_000  # 2024-01-02T00:00:00Z


def write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- SimFeed


def test_simfeed_is_deterministic_and_resumable() -> None:
    a = SimFeed(seed=7, start_ts=T0).ticks(500)
    assert a == SimFeed(seed=7, start_ts=T0).ticks(500)
    assert a != SimFeed(seed=8, start_ts=T0).ticks(500)
    feed = SimFeed(seed=7, start_ts=T0)
    assert feed.ticks(200) + feed.ticks(300) == a


def test_simfeed_ticks_are_valid_and_realistic() -> None:
    rate = 20.0
    ticks = SimFeed(seed=1, start_ts=T0, rate_hz=rate).ticks(4000)
    assert {t["symbol"] for t in ticks} == {"BTCUSD", "EURUSD"}
    assert ticks[0]["ts"] >= T0
    assert all(b["ts"] >= a["ts"] for a, b in zip(ticks, ticks[1:], strict=False))
    for t in ticks:
        assert set(t) == {"symbol", "ts", "bid", "ask", "volume"}
        assert isinstance(t["ts"], int)
        assert 0 < t["bid"] <= t["ask"] and t["volume"] > 0
        if t["symbol"] == "BTCUSD":
            assert 50_000 < t["bid"] < 70_000 and 0.99 <= t["ask"] - t["bid"] <= 10.01
            assert round(t["bid"], 2) == t["bid"]
        else:
            assert 1.0 < t["bid"] < 1.2 and 0.00004 <= t["ask"] - t["bid"] <= 0.00021
            assert round(t["bid"], 5) == t["bid"]
    mean_gap = (ticks[-1]["ts"] - ticks[0]["ts"]) / (len(ticks) - 1)
    assert mean_gap == pytest.approx(1000 / rate, rel=0.1)
    assert len({t["bid"] for t in ticks if t["symbol"] == "BTCUSD"}) > 100  # it moves


def test_simfeed_defaults_start_now_and_rejects_bad_args() -> None:
    tick = SimFeed(seed=3).ticks(1)[0]
    assert abs(tick["ts"] - time.time() * 1000) < 60_000
    other = SimFeed(symbols=("XYZ",), seed=3, start_ts=0).ticks(10)
    assert all(t["symbol"] == "XYZ" and 0 < t["bid"] <= t["ask"] for t in other)
    with pytest.raises(ValueError):
        SimFeed(symbols=())
    with pytest.raises(ValueError):
        SimFeed(rate_hz=0)
    # Slower than a tick every 1,000 s, the first tick's random wait reached past 2100, or past what
    # can be encoded (1e-300); it was dated by it, and sent at once.
    for rate in (1e-9, 1e-300, 2e6):
        with pytest.raises(ValueError, match="rate_hz must be a number from 0.001 to 1,000,000"):
            SimFeed(rate_hz=rate)


# --------------------------------------------------------------------------- tick CSV

GOOD_TICKS = """ts,symbol,bid,ask,volume
2024-01-02T00:00:00,EURUSD,1.1,1.1002,5

2024-01-02T00:00:01Z,EURUSD,1.1001,1.1003,0
2024-01-02T01:00:02+01:00,BTCUSD,60000,60001.5,0.25
1704153603000,BTCUSD,60000.5,60000.5,1e-3
1704153500000,BTCUSD,59999,60000,2
"""


def test_read_tick_csv_parses_times_and_line_numbers(tmp_path: Path) -> None:
    rows = list(read_tick_csv(write(tmp_path, GOOD_TICKS)))
    assert [line for line, _ in rows] == [2, 4, 5, 6, 7]  # blank line 3 skipped, lines kept
    assert [t["ts"] for _, t in rows] == [T0, T0 + 1000, T0 + 2000, T0 + 3000, T0 - 100_000]
    assert rows[2][1] == {"symbol": "BTCUSD", "ts": T0 + 2000, "bid": 60000.0, "ask": 60001.5, "volume": 0.25}
    assert rows[3][1]["bid"] == rows[3][1]["ask"] and rows[3][1]["volume"] == 0.001


def test_read_tick_csv_tells_epoch_seconds_from_ms_as_bar_files_do(tmp_path: Path) -> None:
    # Epoch seconds were read as ms: a file of them was stored as January 1970, where a bar file's
    # were read as seconds. One rule for both: an integer under 1e11 is seconds (1e11 ms is 1973).
    path = write(tmp_path, f"ts,symbol,bid,ask\n{T0 // 1000},EURUSD,1.1,1.2\n{T0 + 1000},EURUSD,1.1,1.2\n"
                           f" {T0 // 1000 + 2}\t,EURUSD,1.1,1.2\n")
    assert [t["ts"] for _, t in read_tick_csv(path)] == [T0, T0 + 1000, T0 + 2000]


def test_read_tick_csv_symbol_argument(tmp_path: Path) -> None:
    overridden = [t["symbol"] for _, t in read_tick_csv(write(tmp_path, GOOD_TICKS), symbol="X")]
    assert overridden == ["X"] * 5
    no_col = write(tmp_path, "TS, Bid ,ASK\n2024-01-02,1,2\n", "nosym.csv")  # names are case/space-free
    assert list(read_tick_csv(no_col, symbol="EURUSD")) == [
        (2, {"symbol": "EURUSD", "ts": T0, "bid": 1.0, "ask": 2.0, "volume": 0.0})
    ]
    with pytest.raises(CsvFormatError) as err:
        list(read_tick_csv(no_col))
    assert err.value.line == 1 and "symbol" in err.value.reason
    with pytest.raises(CsvFormatError, match="line 1: empty file"):
        list(read_tick_csv(write(tmp_path, "", "empty.csv")))


GOOD = "2024-01-02T00:00:00,EURUSD,1.1,1.2,1"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("2024-01-02T00:00:00,EURUSD,1.1,1.2", "expected 5 columns, got 4"),
        ("2024-01-02T00:00:00,EURUSD,1.1,1.2,1,9", "expected 5 columns, got 6"),
        ("2024-01-02T00:00:00,EURUSD,abc,1.2,1", "bid 'abc' is not a number"),
        ("2024-01-02T00:00:00,EURUSD,1.1,,1", "ask '' is not a number"),
        ("2024-01-02T00:00:00,EURUSD,1.1,1.2,x", "volume 'x' is not a number"),
        ("2024-01-02T00:00:00,EURUSD,nan,1.2,1", "bid 'nan' is not a finite number"),
        ("2024-01-02T00:00:00,EURUSD,1.1,inf,1", "ask 'inf' is not a finite number"),
        ("2024-01-02T00:00:00,EURUSD,1.1,1.2,-inf", "volume '-inf' is not a finite number"),
        ("2024-01-02T00:00:00,EURUSD,0,1.2,1", "bid '0' must be > 0"),
        ("2024-01-02T00:00:00,EURUSD,-1.1,1.2,1", "bid '-1.1' must be > 0"),
        ("2024-01-02T00:00:00,EURUSD,1.1,-1,1", "ask '-1' must be > 0"),
        ("2024-01-02T00:00:00,EURUSD,1.3,1.2,1", "bid 1.3 is above ask 1.2"),
        ("2024-01-02T00:00:00,EURUSD,1.1,1.2,-0.5", "volume '-0.5' must be >= 0"),
        ("yesterday,EURUSD,1.1,1.2,1", "ts 'yesterday' is not an ISO-8601 time or epoch seconds/ms"),
        ("2024-13-01T00:00:00,EURUSD,1.1,1.2,1", "ts '2024-13-01T00:00:00' is not an ISO-8601"),
        (",EURUSD,1.1,1.2,1", "ts '' is not an ISO-8601"),
        ("2024-01-02T00:00:00, ,1.1,1.2,1", "symbol is empty"),
        # What float() and int() read but no export writes: '_' between digits (1_0 was stored as 10),
        # digits of other scripts (Arabic-Indic, full width), white space other than spaces and tabs.
        ("2024-01-02T00:00:00,EURUSD,1_0,1_2,1", "bid '1_0' is not a number as CSV files write one (the digits 0-9"),
        ("2024-01-02T00:00:00,EURUSD,1.1,1.2,1_000", "volume '1_000' is not a number as CSV files write one"),
        ("2024-01-02T00:00:00,EURUSD,\u0661.1,1.2,1", "bid '\u0661.1' is not a number as CSV files write one"),
        ("2024-01-02T00:00:00,EURUSD,1.1,\uff11.2,1", "ask '\uff11.2' is not a number as CSV files write one"),
        ("2024-01-02T00:00:00,EURUSD,1.1,1.2,\u00a01", "volume '\\xa01' is not a number as CSV files write one"),
        ("\u0661\u0667\u0660\u0664\u0661\u0665\u0663\u0666\u0660\u0660\u0660\u0660\u0660,EURUSD,1.1,1.2,1",
         "ts '\u0661\u0667\u0660\u0664\u0661\u0665\u0663\u0666\u0660\u0660\u0660\u0660\u0660' is not an ISO-8601 time"),

        # What the writer refuses, by its own rules (db.validation), refused here at the line:
        ("2024-01-02T00:00:00,eurusd,1.1,1.2,1", "symbol 'eurusd' is not a symbol (1-32 characters"),
        ("2200-01-01T00:00:00,EURUSD,1.1,1.2,1", "ts '2200-01-01T00:00:00' is out of range: 1970..2100"),
        # Named as the file writes them, not as the milliseconds they were read as (a bad-input hunt, round 38).
        ("-5,EURUSD,1.1,1.2,1", "ts '-5' (epoch seconds: 1969-12-31T23:59:55Z) is out of range: 1970..2100"),
        ("5000000000,EURUSD,1.1,1.2,1", "ts '5000000000' (epoch seconds: 2128-06-11T08:53:20Z) is out of range"),
        ("-99999999999,EURUSD,1.1,1.2,1", "ts '-99999999999' (epoch seconds) is out of range: 1970..2100"),
        ("2024-01-02T00:00:00,EURUSD,1e12,1e12,1", "bid 1000000000000.0 is not a price"),
        ("2024-01-02T00:00:00,EURUSD,1.1,1.2,1e12", "volume 1000000000000.0 is not a volume"),
        # What Python itself refuses, as an error at the line instead of a traceback:
        ("9" * 5000 + ",EURUSD,1.1,1.2,1", "ts '999999999999999999999999999999999999999... has 5000 characters"),
        ("2024-01-02T00:00:00,EURUSD,1.1,1.2," + "1" * 140_000, "not readable as CSV: field larger than field limit"),
        # A record is read at most MAX_RECORD_CHARS characters in, on one line or over several (quoted
        # line breaks), so a replay's memory does not grow with it: the whole line was read first.
        ("2024-01-02T00:00:00,EURUSD,1.1,1.2," + "1," * 600_000,
         "the row is longer than 1,048,576 characters, which no row of ticks or bars is"),
        ('2024-01-02T00:00:00,EURUSD,1.1,1.2,' + '"a\nb",' * 300_000, "the row is longer than 1,048,576"),
        # A record over several lines (a quoted field with a line break) is named by its first line,
        # where a user looks for it, not its last; a quote never closed likewise.
        ('2024-01-02T00:00:00,"EUR\nUSD",1.1,1.2,1', "symbol 'EUR\\nUSD' is not a symbol"),
        # ... and said to be the likely cause (it read as a column count alone: a bad-input hunt, round 38).
        ('2024-01-02T00:00:00,"EURUSD,1.1,1.2,1',
         'expected 5 columns, got 2; a field holds a line break or a comma, as no field of ticks or bars does: '
         'is a quote (") left open?'),
        # Eight digits that make a date out of range were read as epoch seconds: 1970-09-01 (a review, round 39).
        ("21000102,EURUSD,1.1,1.2,1", "ts '21000102' is out of range: 1970..2100"),
        ("19650101,EURUSD,1.1,1.2,1", "ts '19650101' is out of range: 1970..2100"),
        # A time the writer refuses as a likely one in seconds, said in the file's terms.
        ("1000000,EURUSD,1.1,1.2,1", "ts '1000000' (epoch seconds: 1970-01-12T13:46:40Z) is from January to April "
                                     "1970, which the writer refuses"),
        ("1970-03-01T00:00:00,EURUSD,1.1,1.2,1", "ts '1970-03-01T00:00:00' is from January to April 1970"),
    ],
)
def test_read_tick_csv_bad_rows(tmp_path: Path, row: str, reason: str) -> None:
    # Line 1 header, 2 good, 3 blank, 4 good, 5 bad, 6 good: the error names line 5 after 2 ticks.
    path = write(tmp_path, f"ts,symbol,bid,ask,volume\n{GOOD}\n\n{GOOD}\n{row}\n{GOOD}\n")
    seen = []
    with pytest.raises(CsvFormatError) as err:
        for line, _tick in read_tick_csv(path):
            seen.append(line)
    assert seen == [2, 4]
    assert err.value.line == 5 and err.value.reason.startswith(reason)
    assert str(err.value) == f"line 5: {err.value.reason}"
    assert isinstance(err.value, ValueError)


def test_a_quote_left_open_on_a_files_last_line_is_said_as_the_likely_cause(tmp_path: Path) -> None:
    """With no line break after it (a file's last row), the field a quote left open holds the rest of
    the row, commas and all: still said (a review, round 39)."""
    path = write(tmp_path, f'ts,symbol,bid,ask,volume\n{GOOD}\n2024-01-02T00:00:00,"EURUSD,1.1,1.2,1')
    with pytest.raises(CsvFormatError, match=r'^line 3: expected 5 columns, got 2; .* is a quote \("\) left open\?$'):
        list(read_tick_csv(path))


def test_read_tick_csv_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    # UTF-8 (a BOM, an accent in an extra column) is read; a byte that is not UTF-8 stops the read at
    # its line after every row before it, wherever it falls in the file's 8 KB blocks.
    ok = tmp_path / "utf8.csv"
    ok.write_text(f"ts,symbol,bid,ask,volume,note\n{GOOD},café\n", encoding="utf-8-sig")
    assert [line for line, _ in read_tick_csv(ok)] == [2]
    for good in (1, 2000):
        bad = tmp_path / f"latin1-{good}.csv"
        rows = f"{GOOD}\n" * good
        bad.write_bytes(f"ts,symbol,bid,ask,volume\n{rows}".encode() + b"2024-01-02,EUR\xe9,1,1,1\n")
        seen = []
        with pytest.raises(CsvFormatError) as err:
            for line, _tick in read_tick_csv(bad):
                seen.append(line)
        assert seen == list(range(2, good + 2))
        assert (err.value.line, err.value.reason) == (good + 2, "symbol holds byte 0xe9, which is not UTF-8 "
                                                                "(save the file as UTF-8)")
    header = tmp_path / "header.csv"
    header.write_bytes(b"ts,symbol,bid,\xffask\n")
    with pytest.raises(CsvFormatError, match=r"^line 1: the header holds byte 0xff"):
        CsvFeed(header)


def test_a_tick_header_that_cannot_give_a_tick_is_refused_at_once_naming_every_column_it_lacks(
        tmp_path: Path) -> None:
    """A newcomer's ``time,sym,price`` file read "no symbol column: pass a symbol"; given a symbol,
    the feed started and only then said what else it lacked. A time column named as bar files name
    it (``Time``, ``Date``...) was refused as lacking ``ts``."""
    bad = write(tmp_path, "time,sym,price\n2024-01-02,EURUSD,1.1\n", "bad.csv")
    for symbol, lacks in ((None, "symbol (or pass a symbol, which fills it); bid; ask"), ("EURUSD", "bid; ask")):
        with pytest.raises(CsvFormatError) as err:
            CsvFeed(bad, symbol)  # made before the writer is asked anything
        assert (err.value.line, err.value.reason) == (1, f"header lacks column(s) {lacks}; expected "
                                                         "ts,symbol,bid,ask,volume"), symbol
    with pytest.raises(CsvFormatError) as err:
        list(read_tick_csv(write(tmp_path, "when,symbol,bid,ask\n2024-01-02,EURUSD,1,2\n", "when.csv")))
    assert err.value.reason == ("header lacks column(s) ts (a time column: ts, timestamp, datetime, time, date, or a "
                                "date and a time); expected ts,symbol,bid,ask,volume")
    tick = {"symbol": "EURUSD", "ts": T0, "bid": 1.1, "ask": 1.2, "volume": 3.0}
    for header in ("Time,Symbol,Bid,Ask,Volume", "Date,Symbol,Bid,Ask,Volume", "timestamp,symbol,bid,ask,volume"):
        named = write(tmp_path, f"{header}\n2024-01-02T00:00:00,EURUSD,1.1,1.2,3\n", "named.csv")
        assert list(CsvFeed(named)) == [(2, tick)], header
    # ts wins over another time column, wherever it is
    both = write(tmp_path, f"time,ts,symbol,bid,ask\n1999-01-01,{T0},EURUSD,1.1,1.2\n", "both.csv")
    assert [t["ts"] for _, t in read_tick_csv(both)] == [T0]
    # A date and a time of day in two columns (a common forex export) are read together; picking one
    # by name stored 20240102,120000 as 120000 s after 1970, and a stop-gap refused them.
    for text in ("Date,Time,Symbol,Bid,Ask,Volume\n20240102,120000,EURUSD,1.1,1.2,1\n",
                 "time,symbol,bid,ask,volume,date\n 12:00 ,EURUSD,1.1,1.2,1,2024-01-02\n"):
        split = write(tmp_path, text, "split.csv")
        assert [t["ts"] for _, t in CsvFeed(split, "EURUSD")] == [T0 + 12 * 3_600_000], text
    # Each in its own form: joined as they came, an epoch in the time column read as a time of day
    # with a fraction (2024-01-02 1704186000000: 17:04:18.6), an empty cell as midnight or epoch seconds.
    for date, time_of_day in (("2024.01.02", "12:00"), ("2024-01-02", "1704186000000"), ("2024-01-02", ""),
                              ("20240102", " "), ("", "120000"), ("2024-01-02 12:00", "12:00")):
        odd = write(tmp_path, f"Date,Time,Symbol,Bid,Ask\n{date},{time_of_day},EURUSD,1.1,1.2\n", "odd.csv")
        with pytest.raises(CsvFormatError) as err:
            list(read_tick_csv(odd))
        assert (err.value.line, err.value.reason) == (
            2, f"date {date.strip()!r} and time {time_of_day.strip()!r} are not a date (YYYY-MM-DD or YYYYMMDD) and a "
               "time of day (HH:MM[:SS] or HHMM[SS]); a column that holds the whole time is named ts")
    with pytest.raises(CsvFormatError) as err:
        list(read_tick_csv(write(tmp_path, "Date,Time,Symbol,Bid,Ask\n2024-13-02,12:00,EURUSD,1.1,1.2\n", "odd.csv")))
    assert err.value.reason == "date '2024-13-02' and time '12:00' are no time: month must be in 1..12"
    offset = write(tmp_path, "Date,Time,Symbol,Bid,Ask\n20240102,1300+01:00,EURUSD,1.1,1.2\n", "offset.csv")
    assert [t["ts"] for _, t in read_tick_csv(offset)] == [T0 + 12 * 3_600_000]
    with pytest.raises(CsvFormatError) as err:  # every reason at once; two whole timestamps are no one time
        CsvFeed(write(tmp_path, "Datetime,Timestamp,Symbol,Price\n2024-01-02,2024-01-02,EURUSD,1.1\n", "price.csv"))
    assert err.value.reason == ("header lacks column(s) bid; ask and has several time columns (datetime, timestamp) "
                                "and no ts (a tick's time is one column, ISO-8601 or epoch, or a date and a time of "
                                "day: name the one that holds it ts); expected ts,symbol,bid,ask,volume")
    # A whole timestamp beside a date or a time of day is the time (ts, then timestamp or datetime, then
    # time or date); a quote export with the day's high and low (two OHLC names) is a tick file.
    for header in ("timestamp,time,symbol,bid,ask,high,low", "datetime,date,symbol,bid,ask,open,close"):
        quotes = write(tmp_path, f"{header}\n2024-01-02T00:00:00,x,EURUSD,1.1,1.2,1.3,1.0\n", "quotes.csv")
        feed = CsvFeed(quotes)
        assert feed.kind == "ticks" and [t["ts"] for _, t in feed] == [T0], header
    # A bar file that lacks an OHLC column is told so as a bar file, not as ticks lacking bid and ask.
    bars = write(tmp_path, "Date,Open,High,Low,Volume\n2024-01-02,1,2,1,5\n", "bars.csv")
    with pytest.raises(CsvFormatError) as err:
        CsvFeed(bars, "EURUSD")
    assert err.value.reason == "header lacks close; expected Date,Open,High,Low,Close,Volume"
    # A column read twice is refused, naming where (the first was used without a word; fault hunt, round
    # 38); a column the rows are not read from may repeat.
    for header, kind, said in (
            ("ts,symbol,bid,ask,BID,note,note", "tick", "header has bid 2 times (columns 3, 5: keep one); expected "
                                                       "ts,symbol,bid,ask,volume"),
            ("Date,Open,High,Low,Close,Volume,Close", "bar", "header has close 2 times (columns 5, 7: keep one); "
                                                            "expected Date,Open,High,Low,Close,Volume")):
        path = write(tmp_path, f"{header}\n" + ",".join(["2024-01-02", *["1"] * (header.count(",") - 1), "1"]) + "\n",
                     f"twice-{kind}.csv")
        with pytest.raises(CsvFormatError) as err:
            CsvFeed(path, "EURUSD")
        assert (err.value.line, err.value.reason) == (1, said), header


# --------------------------------------------------------------------------- bar CSV


def test_read_bar_csv_pandas_style_unnamed_index_naive_utc(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        ",open,HIGH,Low,Close,Adj Close,Volume\n"
        "2024-01-02 09:30:00,10,11,9,10.5,99,100\n"
        "2024-01-02 09:31:00,10.5,10.5,10.5,10.5,99,0\n",
    )
    bars = read_bar_csv(path)
    t = T0 + (9 * 60 + 30) * 60_000
    assert bars == [
        (2, {"ts": t, "open": 10.0, "high": 11.0, "low": 9.0, "close": 10.5, "volume": 100.0}),
        (3, {"ts": t + 60_000, "open": 10.5, "high": 10.5, "low": 10.5, "close": 10.5, "volume": 0.0}),
    ]
    assert infer_timeframe(bars) == "1m"


def test_read_bar_csv_time_formats(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "Datetime,Open,High,Low,Close\n"
        "2024-01-02,1,1,1,1\n"  # date only: midnight UTC
        "2024-01-02T09:30:00-05:00,1,1,1,1\n"  # offset honoured: 14:30Z
        "2024-01-02T15:00:00Z,1,1,1,1\n"
        f"{(T0 + 16 * 3_600_000) // 1000},1,1,1,1\n"  # epoch seconds
        f"{T0 + 17 * 3_600_000},1,1,1,1\n",  # epoch ms
    )
    hours = [(b["ts"] - T0) / 3_600_000 for _, b in read_bar_csv(path)]
    assert hours == [0, 14.5, 15, 16, 17]
    assert all(b["volume"] == 0.0 for _, b in read_bar_csv(path))  # no Volume column


def test_a_bar_files_date_and_time_of_day_in_two_columns_are_read_together(tmp_path: Path) -> None:
    """``Date,Time,Open,...`` (an intraday export): the date alone was read, so every bar of a day
    had the same time and the replay refused the second as "not after" the first."""
    path = write(tmp_path, "Date,Time,Open,High,Low,Close,Volume\n"
                           "2024-01-02,09:00,1,2,1,1.5,10\n2024-01-02,10:00,1.5,2,1,1,11\n2024-01-03,00:00,1,1,1,1,0\n")
    assert [(line, (b["ts"] - T0) / 3_600_000) for line, b in read_bar_csv(path)] == [(2, 9), (3, 10), (4, 24)]
    feed = CsvFeed(path, "EURUSD")
    assert (feed.kind, feed.timeframe) == ("bars", "1h")
    assert {t["ts"] // 3_600_000 * 3_600_000 - T0 for _, t in feed} == {9 * 3_600_000, 10 * 3_600_000, 24 * 3_600_000}
    both = write(tmp_path, "Timestamp,Datetime,Open,High,Low,Close\n2024-01-02,2024-01-02,1,1,1,1\n", "both.csv")
    with pytest.raises(CsvFormatError) as err:
        read_bar_csv(both)
    assert (err.value.line, err.value.reason) == (1, "header has several time columns (timestamp, datetime): name the "
                                                     "one that holds the time ts; expected Date,Open,High,Low,Close,"
                                                     "Volume")


def test_eight_digits_that_make_a_calendar_date_are_that_date_not_epoch_seconds(tmp_path: Path) -> None:
    """``20240102`` alone in a time column was read as 20,240,102 seconds after 1970 (1970-08-23) and
    stored so; a daily bar file of such dates was refused as "1000 ms apart". Eight digits that make a
    date (YYYYMMDD, ISO-8601's basic form, as in a date column beside a time) are that date; eight
    that make none stay epoch seconds."""
    for header in ("Date,Symbol,Bid,Ask", "ts,symbol,bid,ask", "time,symbol,bid,ask"):
        path = write(tmp_path, f"{header}\n20240102,EURUSD,1.1,1.2\n20240103,EURUSD,1.1,1.2\n", "d.csv")
        assert [t["ts"] for _, t in read_tick_csv(path)] == [T0, T0 + 86_400_000], header
    path = write(tmp_path, "ts,symbol,bid,ask\n12345678,EURUSD,1.1,1.2\n20241301,EURUSD,1.1,1.2\n", "e.csv")
    assert [t["ts"] for _, t in read_tick_csv(path)] == [12_345_678_000, 20_241_301_000]
    daily = write(tmp_path, "Date,Open,High,Low,Close,Volume\n20240102,1,2,1,1.5,10\n20240103,1.5,2,1,1,11\n")
    assert [b["ts"] for _, b in read_bar_csv(daily)] == [T0, T0 + 86_400_000]
    assert CsvFeed(daily, "EURUSD").timeframe == "1d"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("2024-01-03,10,9.5,9,9.8,1", "high 9.5 is below max(open, close, low) = 10.0"),
        ("2024-01-03,10,11,9,8,1", "low 9.0 is above min(open, close) = 8.0"),
        ("2024-01-03,10,11,12,10,1", "high 11.0 is below max(open, close, low) = 12.0"),
        ("2024-01-03,0,11,9,10,1", "open '0' must be > 0"),
        ("2024-01-03,10,11,9,10,-1", "volume '-1' must be >= 0"),
        ("2024-01-03,10,11,9,null,1", "close 'null' is not a number"),
        ("2024-01-02,10,11,9,10,1", "time 2024-01-02T00:00:00Z is not after 2024-01-02T00:00:00Z (line 2)"),
        ("2024-01-01,10,11,9,10,1", "time 2024-01-01T00:00:00Z is not after"),
        ("2024-01-03,10,11,9,10", "expected 6 columns, got 5"),
        ("someday,10,11,9,10,1", "time 'someday' is not an ISO-8601 time or epoch seconds/ms"),
        ("2024-01-03,10,1e12,9,10,1", "high 1000000000000.0 is not a price (must be > 0 and < 1e+12)"),
        ("2200-01-03,10,11,9,10,1", "time '2200-01-03' is out of range: 1970..2100"),
    ],
)
def test_read_bar_csv_bad_rows(tmp_path: Path, row: str, reason: str) -> None:
    path = write(tmp_path, f"Date,Open,High,Low,Close,Volume\n2024-01-02,10,11,9,10,1\n{row}\n")
    with pytest.raises(CsvFormatError) as err:
        read_bar_csv(path)
    assert err.value.line == 3 and err.value.reason.startswith(reason)


def test_bar_file_replays_the_bars_before_a_bad_row_then_names_it(tmp_path: Path) -> None:
    # The timeframe comes from the bars before the bad row; the bars' ticks pass the writer's checks
    # too (a volume it refuses, a last tick after 2100), each at its bar's line.
    bars = random_bars("1d", 5, 3)
    bars[3]["volume"] = 1e12
    feed = CsvFeed(write_bars(tmp_path, bars, "vol.csv"), "S")
    seen = []
    with pytest.raises(CsvFormatError) as err:
        for line, _tick in feed:
            seen.append(line)
    assert feed.timeframe == "1d" and seen == [2] * 4 + [3] * 4 + [4] * 4
    assert (err.value.line, err.value.reason) == (5, "volume 1000000000000.0 is not a volume (a finite number >= 0 "
                                                     "and < 1e+12)")
    # Daily bars of two days ago, yesterday, and the day after tomorrow: its ticks are more than a day ahead.
    days = [time.strftime("%Y-%m-%d", time.gmtime(time.time() + n * 86_400)) for n in (-2, -1, 2)]
    path = write(tmp_path, "Date,Open,High,Low,Close\n" + "".join(f"{day},1,1,1,1\n" for day in days))
    with pytest.raises(CsvFormatError, match=r"^line 4: ts \d+ is more than a day ahead of now \("):
        list(CsvFeed(path, "S"))
    path = write(tmp_path, "Date,Open,High,Low,Close\n2024-01-02,1,1,1,1\n2024-01-03,1,2,1,1\n2024-01-04,1,.5,1,1\n")
    feed = CsvFeed(path, "S")
    assert feed.timeframe == "1d"
    with pytest.raises(CsvFormatError, match=r"^line 4: high 0.5 is below"):
        list(feed)
    with pytest.raises(CsvFormatError, match=r"^line 3: high 2.0 is below"):  # too few bars to tell the timeframe
        CsvFeed(write(tmp_path, "Date,Open,High,Low,Close\n2024-01-02,1,1,1,1\n2024-01-03,3,2,1,1\n"), "S")


def test_read_bar_csv_bad_header(tmp_path: Path) -> None:
    with pytest.raises(CsvFormatError, match=r"line 1: header lacks low, a time column"):
        read_bar_csv(write(tmp_path, "When,Open,High,Close\n"))


@pytest.mark.parametrize(("sep", "word"), [(";", "semicolons"), ("\t", "tabs"), ("|", "vertical bars")])
def test_a_file_separated_by_something_else_than_commas_is_told_so(tmp_path: Path, sep: str, word: str) -> None:
    """A spreadsheet's export in a locale that writes decimal commas separates its fields by
    semicolons: its header is one field, which used to read as "no symbol column" or as a header
    that lacks every column."""
    ticks = sep.join(["ts", "symbol", "bid", "ask"]) + "\n" + sep.join(["1700000000000", "EURUSD", "1.1", "1.2"]) + "\n"
    bars = sep.join(["Date", "Open", "High", "Low", "Close", "Volume"]) + "\n" + sep.join(
        ["2024-01-02", "1", "1", "1", "1", "1"]) + "\n"
    for text, reader in ((ticks, lambda p: list(CsvFeed(p, None))), (ticks, lambda p: list(CsvFeed(p, "EURUSD"))),
                         (bars, lambda p: list(CsvFeed(p, "S"))), (bars, read_bar_csv)):
        with pytest.raises(CsvFormatError, match=rf"^line 1: the header's fields are separated by {word}, not "
                                                 r"commas: save the file as comma-separated values"):
            reader(write(tmp_path, text))


# --------------------------------------------------------------------------- timeframes


def bars_at(times: list[int]) -> list[dict]:
    return [{"ts": t, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": 0.0} for t in times]


@pytest.mark.parametrize("tf", list(TIMEFRAMES))
def test_infer_timeframe_uses_the_most_common_gap(tf: str) -> None:
    length = TIMEFRAMES[tf]
    steps = [0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 14]  # weekday-like holes do not matter
    assert infer_timeframe(bars_at([T0 + s * length for s in steps])) == tf


def test_infer_timeframe_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 bars"):
        infer_timeframe(bars_at([T0]))
    with pytest.raises(ValueError, match="most often 120000 ms apart"):
        infer_timeframe(bars_at([T0, T0 + 120_000, T0 + 240_000]))
    with pytest.raises(ValueError, match="not aligned to 1h"):
        infer_timeframe(bars_at([T0 + 1_800_000 + i * 3_600_000 for i in range(3)]))


def test_infer_timeframe_in_bounded_memory_past_max_gaps_different_gaps() -> None:
    # Past bar_timeframe.MAX_GAPS different gaps the counts are summed up: a timeframe that stands out is
    # still told; a file with no regular interval at all is refused, never guessed.
    times, t = [], T0
    for k in range(2, MAX_GAPS + 2000):  # minute bars in pairs, then a hole of k minutes, each other
        times += [t, t + 60_000]
        t += 60_000 + k * 60_000
    assert infer_timeframe(bars_at(times)) == "1m"
    irregular = [T0 + 60_000 * (k * (k + 1) // 2) for k in range(MAX_GAPS + 2000)]  # every gap different
    with pytest.raises(ValueError, match="bars are at irregular intervals"):
        infer_timeframe(bars_at(irregular))
    # Found by a review of the first bounded version (its summed-up counts): a regular part after the
    # irregular one raised TypeError (a traceback), exactly MAX_GAPS + 1 different gaps "max() arg is
    # an empty sequence" (when exactly as many went), and the verdict on the same gaps depended on their order.
    regular = [irregular[-1] + 60_000 * (i + 1) for i in range(2 * MAX_GAPS)]
    assert infer_timeframe(bars_at(irregular + regular)) == "1m"
    with pytest.raises(ValueError, match="bars are at irregular intervals"):
        infer_timeframe(bars_at(irregular[:MAX_GAPS + 10]))  # just past MAX_GAPS gaps of no timeframe
    minutes = [T0 + 60_000 * i for i in range(101)]
    odd = [minutes[-1] + 60_000 * (k * (k + 1) // 2 + k) for k in range(1, MAX_GAPS + 10)]
    with pytest.raises(ValueError, match="bars are at irregular intervals"):
        infer_timeframe(bars_at(minutes + odd))
    shifted = [t - odd[-1] + T0 - 60_000 for t in odd]
    with pytest.raises(ValueError, match="bars are at irregular intervals"):
        infer_timeframe(bars_at(shifted + [shifted[-1] + 60_000 * (i + 1) for i in range(100)]))


def test_a_file_that_changed_after_its_first_read_is_not_replayed(tmp_path: Path) -> None:
    """A bar file is read twice (its timeframe, then the replay) and a tick file's digest names its
    source: rewritten or replaced in between, the replay would be of other bars than the timeframe
    and the source were taken from. Refused, saying so; as it was, it replays."""
    text = "Date,Open,High,Low,Close\n2024-01-02,1,1,1,1\n2024-01-03,1,1,1,1\n2024-01-04,1,1,1,1\n"
    path = write(tmp_path, text)
    assert len(list(CsvFeed(path, "X"))) == 12
    feed = CsvFeed(path, "X")
    path.write_text(text + "2024-01-05T06:00:00Z,1,1,1,1\n")  # not on a day's boundary: a 1d replay misplaces it
    with pytest.raises(ValueError, match="changed since it was first read"):
        iter(feed)
    ticks = write(tmp_path, "ts,symbol,bid,ask\n1704153600000,X,1,1.1\n", "ticks.csv")
    feed = CsvFeed(ticks, None)
    ticks.rename(tmp_path / "old.csv")
    write(tmp_path, "ts,symbol,bid,ask\n1704153600000,Y,2,2.1\n", "ticks.csv")
    with pytest.raises(ValueError, match="changed since it was first read"):
        iter(feed)


def test_misaligned_daily_file_names_the_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "Date,Open,High,Low,Close\n2024-01-02,1,1,1,1\n2024-01-03,1,1,1,1\n"
        "2024-01-04T00:00:00-05:00,1,1,1,1\n2024-01-05,1,1,1,1\n2024-01-06,1,1,1,1\n",
    )
    with pytest.raises(CsvFormatError) as err:
        CsvFeed(path, "X")
    assert err.value.line == 4 and "not aligned to 1d" in err.value.reason


# --------------------------------------------------------------------------- bar replay


def random_bars(tf: str, count: int, seed: int) -> list[dict]:
    """Random OHLCV bars with every shape: up, down, doji, flat open == close with wicks."""
    rng, length, price, out = random.Random(seed), TIMEFRAMES[tf], 100.0, []
    start = T0 + 10 * length if tf != "1d" else T0
    for i in range(count):
        o = round(price, 4)
        shape = i % 4
        c = o if shape in (2, 3) else round(o * rng.uniform(0.97, 1.03), 4)
        if shape == 2:  # doji: all four equal
            h = lo = o
        else:
            h = round(max(o, c) * rng.uniform(1.0, 1.02), 4)
            lo = round(min(o, c) * rng.uniform(0.98, 1.0), 4)
        vol = 0.0 if i % 7 == 0 else round(rng.uniform(0, 5000), 3)
        out.append({"ts": start + i * length, "open": o, "high": h, "low": lo, "close": c, "volume": vol})
        price = c * rng.uniform(0.99, 1.01)
    return out


def write_bars(tmp_path: Path, bars: list[dict], name: str) -> Path:
    lines = ["Date,Open,High,Low,Close,Volume"]
    for b in bars:
        lines.append(f"{b['ts']},{b['open']!r},{b['high']!r},{b['low']!r},{b['close']!r},{b['volume']!r}")
    return write(tmp_path, "\n".join(lines) + "\n", name)


@pytest.mark.parametrize("tf", ["1m", "5m", "1h", "1d"])
def test_bar_file_replay_rebuilds_identical_bars(tmp_path: Path, tf: str) -> None:
    original = random_bars(tf, 60, seed=len(tf) + TIMEFRAMES[tf] % 97)
    assert any(b["close"] < b["open"] for b in original) and any(b["close"] > b["open"] for b in original)
    assert any(b["open"] == b["high"] == b["low"] == b["close"] for b in original)
    feed = CsvFeed(write_bars(tmp_path, original, f"{tf}.csv"), "SYM")
    assert (feed.kind, feed.timeframe) == ("bars", tf)
    builder = BarBuilder()
    lines = []
    for line, tick in feed:
        lines.append(line)
        assert tick["symbol"] == "SYM" and tick["bid"] == tick["ask"]
        builder.add(tick["symbol"], tick["ts"], tick["bid"], tick["volume"])
    assert lines == [n for n in range(2, 62) for _ in range(4)]
    rebuilt = [b for b in builder.take_dirty() if b["timeframe"] == tf]
    assert [{k: b[k] for k in ("ts", "open", "high", "low", "close", "volume")} for b in rebuilt] == original
    assert all(b["tick_count"] == 4 for b in rebuilt)
    assert builder.late_ticks == 0


def test_bar_to_ticks_path_and_timestamps() -> None:
    length = TIMEFRAMES["1m"]
    up = {"ts": T0, "open": 10.0, "high": 12.0, "low": 9.0, "close": 11.0, "volume": 7.5}
    down = {**up, "close": 9.5}
    ticks = bar_to_ticks(up, length, "S")
    assert [t["bid"] for t in ticks] == [10.0, 9.0, 12.0, 11.0]
    assert [t["bid"] for t in bar_to_ticks(down, length, "S")] == [10.0, 12.0, 9.0, 9.5]
    times = [t["ts"] for t in ticks]
    assert times == sorted(set(times)) and times[0] == T0 and times[-1] == T0 + length - 1
    assert [t["volume"] for t in ticks] == [0.0, 0.0, 0.0, 7.5]


def test_csvfeed_ticks_and_errors(tmp_path: Path) -> None:
    feed = CsvFeed(write(tmp_path, GOOD_TICKS), None)
    assert (feed.kind, feed.timeframe) == ("ticks", None)
    assert [line for line, _ in feed] == [2, 4, 5, 6, 7]
    assert {t["symbol"] for _, t in CsvFeed(write(tmp_path, GOOD_TICKS), "Z")} == {"Z"}
    with pytest.raises(ValueError, match="only applies to bar files"):
        CsvFeed(write(tmp_path, GOOD_TICKS), None, timeframe="1m")
    bars = write_bars(tmp_path, random_bars("1m", 5, 1), "bars.csv")
    with pytest.raises(ValueError, match="pass a symbol"):
        CsvFeed(bars, None)
    with pytest.raises(ValueError, match="unknown timeframe '2m'"):
        CsvFeed(bars, "S", timeframe="2m")
    with pytest.raises(CsvFormatError, match="line 2: .* not aligned to 1h"):
        CsvFeed(bars, "S", timeframe="1h")
    one_bar = write_bars(tmp_path, random_bars("1d", 1, 1)[:1], "one.csv")
    assert CsvFeed(one_bar, "S", timeframe="1d").timeframe == "1d"
    with pytest.raises(ValueError, match="at least 2 bars"):
        CsvFeed(one_bar, "S")


# --------------------------------------------------------------------------- pacing


@pytest.mark.parametrize("text,expected", [("max", "max"), (" MAX ", "max"), ("1", 1.0), ("10", 10.0), ("0.5", 0.5)])
def test_parse_speed_valid(text: str, expected: object) -> None:
    assert parse_speed(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "abc", "", "nan", "inf", "1e-300", "0.0009", "1e7", "9" * 5000,
                                  "\u0661", "1\u0660"])  # digits of another script: float() reads them
def test_parse_speed_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="invalid replay speed .*'max' or a number from 0.001 to 1,000,000") as e:
        parse_speed(text)
    assert len(str(e.value)) < 200


def test_a_gap_longer_than_one_sleep_can_take_is_slept_in_steps() -> None:
    """A replay at a thousandth of real time over a century's gap is due in 3.2e12 s, more than one
    ``time.sleep`` takes (it raised OverflowError, a traceback that stopped the replay; at a speed
    of 1e-300, which was accepted, on the second tick of any file): it sleeps in steps of an hour."""
    clock = FakeClock()

    class Enough(Exception):
        pass

    def sleep(seconds: float) -> None:
        if len(clock.sleeps) == 3:
            raise Enough
        clock.sleep(seconds)

    out = pace(iter([{"ts": 0}, {"ts": 100 * 365 * 86_400_000}]), parse_speed("0.001"), clock=clock, sleep=sleep)
    assert next(out) == {"ts": 0}
    with pytest.raises(Enough):
        next(out)
    assert clock.sleeps == [3600.0] * 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_pace_replays_time_differences_k_times_faster() -> None:
    ticks = [(i, {"ts": ts}) for i, ts in enumerate([5000, 6000, 6000, 9000, 8000, 13000])]
    clock = FakeClock()
    out = []
    for item in pace(ticks, 2.0, clock=clock, sleep=clock.sleep):
        out.append((item, clock.now - 100.0))
    assert [item for item, _ in out] == ticks
    assert [at for _, at in out] == [0.0, 0.5, 0.5, 2.0, 2.0, 4.0]  # backwards tick: no wait
    assert len(clock.sleeps) == 3


def test_pace_from_a_start_ts_waits_for_the_first_item_too() -> None:
    # A simulated market's first tick is dated by its first random wait after the market's start: sent
    # at once, it was stored that much ahead of real time (by about 30 years at --rate 1e-9), and
    # every later tick with it.
    clock = FakeClock()
    ticks = [{"ts": T0 + 5000}, {"ts": T0 + 6000}, {"ts": T0 + 6000}]
    at = [clock.now - 100.0 for _ in pace(ticks, 1.0, start_ts=T0, clock=clock, sleep=clock.sleep)]
    assert at == [5.0, 6.0, 6.0]


def test_pace_max_never_sleeps_and_bad_speed_fails_early() -> None:
    clock = FakeClock()
    ticks = [{"ts": 0}, {"ts": 10_000}]
    assert list(pace(ticks, "max", clock=clock, sleep=clock.sleep)) == ticks and clock.sleeps == []
    with pytest.raises(ValueError):
        pace(ticks, 0)


def test_a_tick_file_that_grows_while_it_is_replayed_gives_the_rows_its_source_names_then_says_so(
        tmp_path: Path) -> None:
    """A replay's source is the digest of the file as it was first looked at. Rows appended while it
    was replayed were read and stored under that digest, which named the file without them; replaying
    the file again (another digest) stored every row a second time: 6,000 rows for a file of 3,000
    (a fault hunt). The replay now reads the bytes its source names, and then says the file changed."""
    rows = [f"{T0 + i},BTCUSD,100.0,100.5,1" for i in range(3000)]
    path = write(tmp_path, "ts,symbol,bid,ask,volume\n" + "\n".join(rows[:2000]) + "\n")
    first = path.read_bytes()
    source = file_digest(path)
    ticks = iter(CsvFeed(path))
    got = [next(ticks) for _ in range(10)]
    with path.open("a") as f:
        f.write("\n".join(rows[2000:]) + "\n")
    with pytest.raises(CsvFormatError, match=r"line 2002: .* changed while it was replayed: its first 70,025 bytes, "
                                             r"which its source names, are stored, and nothing written since"):
        for item in ticks:
            got.append(item)
    assert [line for line, _ in got] == list(range(2, 2002))  # the 2,000 rows of the file as it was digested
    assert hashlib.sha256(first).hexdigest()[:16] == source and len(first) == 70_025
