"""The times of ticks and trades: epoch milliseconds UTC, within 1970..2100 (:data:`MAX_TS`), at most
a day ahead of now (:func:`latest_allowed_ts`), and not a time in another unit (:func:`time_problem`).
The rules, their words and the API document's phrases for them, in one place; :mod:`db.validation`
applies them to each form a value or a batch takes.
"""
from __future__ import annotations

import time

#: Epoch milliseconds between 1970 and 2100: every value a valid 64-bit integer (a value past it in
#: microseconds or nanoseconds is named as such, a time in seconds within it too: OTHER_UNITS).
MAX_TS = 4_102_444_800_000
#: How far ahead of the writer's clock a tick's or a trade's time may be: hosts' clocks differ by
#: seconds, and a day takes a local time sent as UTC. A later one was stored as it came: a tick
#: dated 2100 was its symbol's latest price until then (trades opened at it, the simulated feed
#: went on from it; fault hunt, round 38).
FUTURE_SLACK_MS = 86_400_000
AHEAD = "is more than a day ahead of now"


def latest_allowed_ts() -> int:
    """The latest tick or trade time taken now (epoch ms): :data:`FUTURE_SLACK_MS` from now."""
    return int(time.time() * 1000) + FUTURE_SLACK_MS


def utc(ms: float, *, seconds: bool = False) -> str:
    """Epoch milliseconds as a message shows them (to the minute, or the second, UTC): every time one
    message gives is in the same zone, whatever the host's."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000))


def ahead(latest: int, why: str = "") -> str:
    """:data:`AHEAD`, with now (``latest`` less the slack) and ``why`` in its parentheses."""
    return f"{AHEAD} ({utc(latest - FUTURE_SLACK_MS)} by this host's clock{why})"


#: Integers that are most likely a time in another unit than milliseconds: (from, to, unit, values a
#: millisecond). From 1e9 to 1e10 a time in seconds (2001-09-09 to 2286) is, read as milliseconds,
#: January to April 1970, when no market of ours ticked: a bot sending ``int(time.time())`` had its
#: ticks stored in January 1970 (a new user's run, round 38). Past :data:`MAX_TS`, microseconds and
#: nanoseconds of the same years. A CSV replay tells seconds from milliseconds by its whole file
#: (workers.csvrows); one JSON number has nothing else to be judged by.
OTHER_UNITS = ((10**9, 10**10, "seconds", 0.001), (10**14, 10**17, "microseconds", 1000),
               (10**17, 10**20, "nanoseconds", 1_000_000))
#: The rule as the API's document states it (webapp.api.openapi) and the words of its 400.
SECONDS_FROM, SECONDS_TO = OTHER_UNITS[0][:2]
UNITS_RULE = "not a time in seconds"
IN_SECONDS = "looks like a time in seconds"


def time_problem(v: int, *, seconds: bool = True) -> str | None:
    """What is wrong with the integer ``v`` as a tick's or a trade's time (epoch milliseconds 1970..2100,
    and with ``seconds`` not a time in seconds), in the words after the value; None when nothing is.
    The later-than-now rule is the caller's (:func:`latest_allowed_ts`)."""
    if SECONDS_TO <= v <= MAX_TS:  # any time from April 1970 in milliseconds, the usual one: at once
        return None
    unit = next(((name, per_ms) for low, high, name, per_ms in OTHER_UNITS if low <= v < high), None)
    if unit is not None and unit[0] == "seconds" and seconds:
        return (f"{IN_SECONDS} ({utc(v * 1000)} as seconds, {utc(v)} as milliseconds): send epoch "
                "milliseconds (seconds x 1000)")
    if 0 <= v <= MAX_TS:
        return None
    said = "is out of range (epoch ms 1970..2100)"
    if unit is not None:
        said += f"; it looks like {unit[0]} ({utc(v // unit[1])}): send epoch milliseconds"
    return said
