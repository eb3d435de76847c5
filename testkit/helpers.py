"""Small pieces the tests share: polling for a condition, read-only queries
of a test's database, and test data."""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from db.config import Settings
from db.health import connect_read_only

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def query(settings: Settings, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of ``sql`` from the test's database, read-only."""
    con = connect_read_only(settings.database_path)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll ``check`` until it returns something true; an exception counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def write_bar_csv(path: Path, n: int = 60, seed: int = 7) -> list[tuple[int, float, float, float, float, float]]:
    """A 1-minute OHLCV export like pandas writes it: unnamed first column."""
    rng = random.Random(seed)
    price, bars = 100.0, []
    lines = [",Open,High,Low,Close,Volume"]
    for i in range(n):
        ts = T0 + i * 60_000
        o = round(price, 2)
        c = round(max(1.0, o + rng.uniform(-1, 1)), 2)
        h = round(max(o, c) + rng.uniform(0, 0.5), 2)
        low = round(min(o, c) - rng.uniform(0, 0.5), 2)
        v = float(rng.randint(1, 1000))
        price = c
        bars.append((ts, o, h, low, c, v))
        stamp = datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"{stamp},{o},{h},{low},{c},{v}")
    path.write_text("\n".join(lines) + "\n")
    return bars
