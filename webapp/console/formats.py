"""Jinja filters: numbers as people read them. Every filter accepts None and shows a dash."""
from __future__ import annotations

import time
from typing import Any

DASH = "–"


def human_bytes(n: Any) -> str:
    """1536 -> "1.5 KiB"."""
    if not isinstance(n, int | float):
        return DASH
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return DASH  # pragma: no cover


def timestamp(ms: Any) -> str:
    """Epoch ms -> "2026-11-27 15:52:01 UTC" (every time on the console is UTC, like the database)."""
    if not isinstance(ms, int | float):
        return DASH
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def duration(seconds: Any) -> str:
    """3725 -> "1 h 2 min"; 42.3 -> "42 s"."""
    if not isinstance(seconds, int | float):
        return DASH
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def ago(ms: Any) -> str:
    """Epoch ms -> "3 min 2 s ago"."""
    if not isinstance(ms, int | float):
        return DASH
    return f"{duration(max(0.0, time.time() - ms / 1000))} ago"


def number(value: Any, digits: int = 2) -> str:
    """12345.678 -> "12,345.68"; None -> dash."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return DASH
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def price(value: Any) -> str:
    """A price with the decimals its size needs: 59287.16 -> "59,287.16", 1.08512 -> "1.0851",
    0.012345 -> "0.01235" (2 decimals from 1000, 4 from 1, else 5); None -> dash."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return DASH
    size = abs(value)
    return number(float(value), 2 if size >= 1000 else 4 if size >= 1 else 5)


FILTERS = {"bytes": human_bytes, "timestamp": timestamp, "duration": duration, "ago": ago, "number": number,
           "price": price}
