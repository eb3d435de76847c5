"""The names the stored data is made of: bar timeframes and indicators.

Plain Python, no SQLAlchemy: the validators (:mod:`db.validation`, :mod:`db.columns`) need them,
and the writer's client (:mod:`db.client`), which every producer imports, loads the validators.
Importing SQLAlchemy there cost a producer about 0.5 s of CPU at each start on this machine, for
two constants.
"""
from __future__ import annotations

#: Bar timeframes and their length in milliseconds.
TIMEFRAMES: dict[str, int] = {"1m": 60_000, "5m": 300_000, "1h": 3_600_000, "1d": 86_400_000}

#: Indicators the analysis worker computes.
INDICATORS = ("sma_20", "ema_20", "rsi_14", "atr_14")
