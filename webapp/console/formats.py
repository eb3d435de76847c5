"""Jinja filters: numbers as people read them. Every filter accepts None and shows a dash."""
from __future__ import annotations

import time
from typing import Any

from db import sizes
from db.queries import decimals

DASH = "–"


def human_bytes(n: Any) -> str:
    """1536 -> "1.5 KiB" (:func:`db.sizes.human_bytes`)."""
    return sizes.human_bytes(n) if isinstance(n, int | float) else DASH


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


def exact(value: Any, minimum: int = 0) -> str:
    """A number with every decimal it has (at least ``minimum``), never rounded: a trade size 0.35 ->
    "0.35", 100000.0 -> "100,000"; None -> dash."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return DASH
    return number(float(value), max(minimum, decimals(value)))


def price(value: Any, digits: int | None = None) -> str:
    """A price with its symbol's decimals (``digits``, from :func:`db.queries.price_decimals`):
    1.0823 with 5 -> "1.08230"; without them, every decimal it has, at least 2 (59245.04 ->
    "59,245.04", 1.08231 -> "1.08231"): never rounded to fewer than the price has. None -> dash."""
    if digits is None or isinstance(value, bool) or not isinstance(value, int | float):
        return exact(value, 2)
    return number(float(value), digits)


def pnl(value: Any) -> str:
    """A profit or loss, exact (:func:`db.models.trade_pnl` gives at most the decimals of the prices
    and the size), at least 2 decimals, signed: -207.0 -> "-207.00", 3.6925 -> "+3.6925"."""
    text = exact(value, 2)
    return f"+{text}" if text != DASH and value > 0 else text


def iso(ms: Any) -> str:
    """Epoch ms -> "2026-11-27T15:52:01Z" (a ``<time datetime>``); None -> ""."""
    if not isinstance(ms, int | float):
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


FILTERS = {"bytes": human_bytes, "timestamp": timestamp, "duration": duration, "ago": ago, "number": number,
           "price": price, "pnl": pnl, "exact": exact, "iso": iso}
