"""What ``python -m bench api`` sends and reads: the routes, the tick
sources, the limits and timeouts, and the ticks themselves."""
from __future__ import annotations

from typing import Any

#: The read routes, alternated by every read client.
READ_ROUTES: dict[str, str] = {
    "GET /api/ticks": "/api/ticks?symbol=BTCUSD&limit=100",
    "GET /api/bars": "/api/bars?symbol=BTCUSD&timeframe=1m",
}
POST_ROUTE = "POST /api/ticks"
#: Target: p99 under load / p99 idle, per read route.
P99_RATIO_TARGET = 2.0
#: A window in which more than this share of the machine's CPU went to
#: anything but this benchmark is flagged: it measured someone else too.
NOISY_PCT = 10.0
SYMBOLS = ("BTCUSD", "ETHUSD")
#: Seed ticks: one per symbol per second from 2024-01-01T00:00:00Z.
SEED_T0 = 1_704_067_200_000
SEED_SPACING_MS = 1000
SEED_SOURCE = "bench-seed"
INGEST_SOURCE = "bench-ingest-"  # + the run number: every run stores new (source, seq)
POST_SOURCE = "bench-post-"
#: The producer runs this long before the read window (and a little after it).
INGEST_LEAD = 1.0
INGEST_TAIL = 0.2
HTTP_TIMEOUT = 30.0
#: A read sent in the measured window must be answered at most this long after the window ends,
#: else it counts as an error: the load of the window (slow clients) kept it from being served.
READ_GRACE = 5.0
GUNICORN_READY_TIMEOUT = 60.0
GUNICORN_STOP_TIMEOUT = 20.0
RUN_GROUP_LEAD = 0.1  # bench.common.run_group's default lead


def tick_columns(first: int, n: int, source: str, ts0: int, spacing_ms: int) -> dict[str, list[Any]]:
    """``n`` ticks in ``insert_ticks``' columns form, alternating BTCUSD and
    ETHUSD, ``seq`` from ``first``; tick ``i`` has ``ts = ts0 + (i // 2) *
    spacing_ms``. (``bench.common.tick_batches`` spreads 8 symbols 1 ms
    apart: far too few 1m bars per symbol for ``/api/bars``.)"""
    idx = range(first, first + n)
    bid = [100.0 + (i * 7919 % 1000) * 0.01 for i in idx]  # jumps about, so bars have real ranges
    return {
        "symbol": [SYMBOLS[i % 2] for i in idx],
        "ts": [ts0 + (i // 2) * spacing_ms for i in idx],
        "bid": bid,
        "ask": [b + 0.02 for b in bid],
        "volume": [float(i % 10) for i in idx],
        "source": [source] * n,
        "seq": list(idx),
    }


# --- slow-clients -----------------------------------------------------------------------------

#: The held connections are opened this long before the readers start.
SLOW_LEAD = 1.0
#: Target: p99 with the slow connections held / p99 idle, per read route (and no errors).
SLOW_P99_RATIO_TARGET = 2.0
#: What each held connection sends, in turn, and then nothing more: nothing at all, half a request
#: line, a request line and half a header (what a stalled or malicious client leaves behind).
SLOW_OPENINGS = (b"", b"GET /api/ticks?symbol=BTC", b"GET /api/bars HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Wait: ")

#: ``--worker-class`` names: gunicorn's own classes, and ours (what circus.ini runs).
OUR_WORKER = "webapp.gunicorn_worker.HeadersFirstWorker"
WORKER_NAMES = {"sync": "sync", "gthread": "gthread", "tornado": "tornado", "headers-first": OUR_WORKER}
