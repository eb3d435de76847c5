"""Issue 10: a request of a few ticks (a bot's tick a call) is checked row by row first
(:func:`db.tick_validation._few_ticks`), and the column checks decide whatever that does not pass.
The promise: the same verdict, the same columns stored and the same words as the column checks
alone, for any value. Pure functions: no database, no writer.
"""
from __future__ import annotations

import math
import random
import re
from typing import Any

import pytest

from db import tick_validation
from db.errors import ValidationError
from db.timestamps import MAX_TS, SECONDS_FROM, SECONDS_TO, latest_allowed_ts
from db.validation import MAX_PRICE, TICK_FIELDS
from testkit.helpers import T0

#: How an error says this host's clock's "now" (db.timestamps.ahead).
NOW_SAID = re.compile(r"\(\d{4}-\d\d-\d\d \d\d:\d\d UTC by this host's clock")

pytestmark = pytest.mark.database_independent("validation of a request's ticks, before any database")

#: Values each field is drawn from: good ones, each bound on both sides, and wrong types (the times,
#: of :func:`drawn`, about now).
PRICES = [1.0, 100.0, 100.02, 3, 0, 0.0, -1.0, 1e-300, MAX_PRICE, MAX_PRICE - 1, math.nan, math.inf, -math.inf,
          True, "1.0", None, 2**80]
VOLUMES = [None, 0, 0.0, -0.0, 1.5, 7, MAX_PRICE, math.nan, math.inf, -1, True, "1"]
SYMBOLS = ["BTCUSD", "EUR/USD", "btcusd", "", "A" * 32, "A" * 33, 5, None, "BTC USD"]
SOURCES = [None, "bot-1", "feed@host", "", "bad name", 5, "x" * 64, "x" * 65]
SEQS = [None, 0, 1, 2**63 - 1, 2**63, -1, True, 1.0, "1"]


def drawn() -> dict[str, list[Any]]:
    """Each field's values; the times around the latest allowed *now* (a minute either side, so that
    both passes of a test, a second apart, judge them alike)."""
    day_ahead = latest_allowed_ts()
    times = [T0, T0 + 1, SECONDS_TO, SECONDS_TO - 1, SECONDS_FROM, 1_700_000_000, 5, 0, -1, MAX_TS, MAX_TS + 1,
             day_ahead - 60_000, day_ahead + 60_000, 2**63, True, float(T0), None, "1700000000000"]
    return {"symbol": SYMBOLS, "ts": times, "bid": PRICES, "ask": PRICES, "volume": VOLUMES, "source": SOURCES,
            "seq": SEQS}


def verdict(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """What ``tick_columns`` makes of ``rows``: its columns (each value's repr, so 0 and 0.0 differ)
    or its error's words."""
    try:
        cols = tick_validation.tick_columns("ticks", [dict(r) for r in rows])
    except ValidationError as e:
        # "now", as a tick too far ahead is told it, to the minute: the two runs of the cases compared
        # may straddle a minute's end (a failure seen once in a full run).
        return "error", NOW_SAID.sub("(NOW by this host's clock", str(e))
    return "ok", repr({f: cols[f] for f in TICK_FIELDS})


def some_rows(rng: random.Random, values: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """A few ticks, each good but for none, one or two fields drawn from ``values`` (or left out)."""
    rows = []
    for _ in range(rng.randint(1, tick_validation.FEW_TICKS)):
        bid = round(rng.uniform(1, 1000), 2)
        row = {"symbol": "BTCUSD", "ts": T0 + rng.randint(0, 10**9), "bid": bid, "ask": bid + 0.02,
               "volume": rng.choice((1.5, 2, None)), "source": rng.choice(("bot-1", None)), "seq": rng.randint(0, 99)}
        for _ in range(rng.choice((0, 0, 1, 1, 2))):
            field = rng.choice(tuple(values))
            if field in ("volume", "source", "seq") and rng.random() < 0.2:
                row.pop(field, None)  # an optional field left out
            else:
                row[field] = rng.choice(values[field])
        rows.append(row)
    return rows


def test_a_few_ticks_get_the_verdict_and_the_words_of_the_column_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(10)
    values = drawn()
    cases = [some_rows(rng, values) for _ in range(6000)]
    taken_row_by_row = 0
    real_few_ticks = tick_validation._few_ticks

    def counting(rows: list[dict[str, Any]]) -> dict[str, list[Any]] | None:
        nonlocal taken_row_by_row
        found = real_few_ticks(rows)
        taken_row_by_row += found is not None
        return found

    monkeypatch.setattr(tick_validation, "_few_ticks", counting)
    row_first = [verdict(rows) for rows in cases]
    monkeypatch.setattr(tick_validation, "FEW_TICKS", 0)  # the column checks alone, as before
    columns_only = [verdict(rows) for rows in cases]
    for rows, mine, theirs in zip(cases, row_first, columns_only, strict=True):
        assert mine == theirs, rows
    passed = sum(kind == "ok" for kind, _ in columns_only)
    # Both kinds of outcome were drawn, and every request that passes was taken row by row, but for
    # a time before April 1970 (in milliseconds, right only when no other tick's is in seconds).
    assert 500 < passed < len(cases) - 500, passed
    early = sum(kind == "ok" and min(r["ts"] for r in rows) < SECONDS_TO
                for rows, (kind, _) in zip(cases, columns_only, strict=True))
    assert 0 < early < 50 and taken_row_by_row == passed - early, (taken_row_by_row, passed, early)


def test_defaults_are_filled_as_the_column_checks_fill_them() -> None:
    cols = tick_validation.tick_columns("ticks", [{"symbol": "BTCUSD", "ts": T0, "bid": 1, "ask": 2.5}])
    assert cols == {"symbol": ["BTCUSD"], "ts": [T0], "bid": [1], "ask": [2.5], "volume": [0.0],
                    "source": ["external"], "seq": [None]}
    assert type(cols["volume"][0]) is float and type(cols["bid"][0]) is int
