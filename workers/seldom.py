"""A few log lines now and then for what may happen thousands of times a second (:class:`Seldom`).

The writer logged a WARNING for every undecodable request: 3,000 of them from one local program
filled its stderr pipe while circusd, which reads it, was stopped, and its IO thread then waited in
the logging call, answering no one for as long (fault hunt, round 40). At most ``burst`` lines a
period, the next one counting what was not said, keeps the news and bounds the output.
"""
from __future__ import annotations

import logging
import time
from typing import Any


class Seldom:
    """Log at most ``burst`` lines every ``every`` seconds; the first line of a later period says how
    many were not logged before it, and so does :meth:`flush` once a period ends with none after it
    (a flood that stopped would otherwise leave its count unsaid)."""

    def __init__(self, log: logging.Logger, level: int, every: float, burst: int = 10) -> None:
        self.log, self.level, self.every, self.burst = log, level, every, burst
        self._period_from = -float("inf")
        self._said = self._unsaid = 0
        self._last: tuple[str, tuple[Any, ...]] = ("", ())

    def say(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._period_from >= self.every:
            self._period_from, self._said = now, 0
        if self._said >= self.burst:
            self._unsaid += 1
            self._last = (msg, args)
            return
        self._log(msg, args, "before")

    def flush(self) -> None:
        """Once the period of lines not logged has ended: the last of them, with their count. Call it
        now and then (the writer: every second)."""
        if self._unsaid and time.monotonic() - self._period_from >= self.every:
            self._period_from, self._said = time.monotonic(), 0
            msg, args = self._last
            self._unsaid -= 1
            self._log(msg, args, "before it")

    def _log(self, msg: str, args: tuple[Any, ...], when: str) -> None:
        if self._unsaid:
            msg += (f" (and {self._unsaid} more like it {when}, not logged: at most {self.burst} in "
                    f"{self.every:g} s)")
            self._unsaid = 0
        self._said += 1
        self.log.log(self.level, msg, *args)
