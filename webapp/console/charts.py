"""Charts: the stack's samples (the ``samples`` table the jobs worker's ``metrics`` job fills) and a
symbol's candles with their stored indicators.

The charts page lists the sample charts; its script draws each from ``/console/api/series``
(vendored lightweight-charts, no CDN) over a range of :data:`RANGES` (15 min to 7 days: what the
samples already stored cover), chosen by plain links so that it works without JavaScript too: the
page then shows, per series, the latest value and the range's minimum and maximum.

The market page's chart comes from :func:`price_chart`: the bars of a range, the indicators the
analysis worker stored for the same bars (SMA and EMA drawn over the price, RSI and ATR in panes
below) and the symbol's price decimals (:func:`db.queries.price_decimals`), so that its price axis
shows what the tables show.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from flask import jsonify, render_template, request
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import SQLAlchemyError

from db import queries
from db.models import now_ms
from db.validation import NAME_RE
from db.vocabulary import INDICATORS, TIMEFRAMES
from webapp.console.common import bad_request, bp, int_arg, settings
from webapp.extensions import db

MAX_SERIES = 8
#: Points per series beyond which a response is averaged into buckets.
MAX_POINTS = 1200
#: Bars in one price chart at most.
MAX_BARS = 1000

#: The ranges a chart shows (key -> minutes), and how the page names them.
RANGES = {"15m": 15, "1h": 60, "6h": 360, "24h": 1440, "7d": 10080}
RANGE_NAMES = {"15m": "15 min", "1h": "1 h", "6h": "6 h", "24h": "24 h", "7d": "7 days"}
DEFAULT_RANGE = "1h"
#: The range a price chart opens with per timeframe: a few hundred bars at most.
DEFAULT_BAR_RANGE = {"1m": "6h", "5m": "24h", "1h": "7d", "1d": "7d"}


@dataclass(frozen=True)
class Chart:
    """One chart: its series (by name; a per-watcher name gives one line per watcher) and how to show values."""

    id: str
    title: str
    series: tuple[str, ...]
    #: How the page formats values, on the axis too: count (whole numbers), ms, bytes (in the one
    #: unit that fits the largest value: B, KiB, MiB or GiB), percent, rate (per second).
    unit: str
    note: str = ""
    #: What a count counts, written after the numbers on the axis ("3 req").
    counts: str = ""


CHARTS = (
    Chart("ingest", "Ingest rate", ("writer.ticks_per_s", "writer.requests_per_s"), "rate",
          "ticks and requests committed per second"),
    Chart("latency", "Commit latency", ("writer.commit_p50_ms", "writer.commit_p99_ms"), "ms",
          "p50 and p99 over the writer's last 4096 commits"),
    Chart("queue", "Writer queue depth", ("writer.queue_depth",), "count", "requests waiting for a batch", "req"),
    Chart("cpu", "CPU per watcher", ("watcher.cpu_percent",), "percent", "% of one core, children included"),
    Chart("memory", "Memory per watcher", ("watcher.rss_bytes",), "bytes", "resident memory, children included"),
    Chart("dbsize", "Database and WAL size", ("db.bytes", "db.wal_bytes"), "bytes"),
)
CHART_BY_ID = {c.id: c for c in CHARTS}
#: On a server the database's size is pg_database_size, and its WAL is the server's, not ours to chart.
SERVER_DBSIZE = Chart("dbsize", "Database size", ("db.bytes",), "bytes", "pg_database_size")


def charts_for(on_server: bool) -> tuple[Chart, ...]:
    """The charts of the stack's database: :data:`CHARTS`, with a server's own size chart."""
    return tuple(SERVER_DBSIZE if on_server and c.id == "dbsize" else c for c in CHARTS)
#: Legend names of the series with no label (per-watcher series are named by their watcher).
SERIES_LABELS = {
    "writer.ticks_per_s": "ticks/s", "writer.requests_per_s": "requests/s", "writer.commit_p50_ms": "p50",
    "writer.commit_p99_ms": "p99", "writer.queue_depth": "queued", "db.bytes": "database", "db.wal_bytes": "WAL",
}


def sample_every() -> str:
    """How often the jobs worker samples, as the page says it ("10 s"): ``TICKSTACK_SAMPLE_EVERY_S``
    from the same settings registry the worker reads."""
    return f"{settings().sample_every_s:g} s"


def load_series(names: list[str], since_ms: int) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(name, label) -> [(ts ms, value)] in time order, since ``since_ms``."""
    out: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for name, label, ts, value in queries.samples_since(db.session, names, since_ms):
        out[(name, label)].append((ts, value))
    return out


def downsample(points: list[tuple[int, float]], max_points: int = MAX_POINTS) -> list[tuple[int, float]]:
    """At most ``max_points``: consecutive points averaged in equal-time buckets."""
    if len(points) <= max_points:
        return points
    first, last = points[0][0], points[-1][0]
    width = (last - first) / max_points or 1
    buckets: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for ts, value in points:
        buckets[min(int((ts - first) / width), max_points - 1)].append((ts, value))
    return [(b[-1][0], sum(v for _, v in b) / len(b)) for _, b in sorted(buckets.items())]


def summaries(charts: tuple[Chart, ...], since_ms: int) -> dict[str, list[dict[str, Any]]]:
    """Per chart: each series' latest value, minimum and maximum (what the page shows without JS)."""
    names = sorted({n for c in charts for n in c.series})
    try:
        series = load_series(names, since_ms)
    except SQLAlchemyError:
        db.session.rollback()
        return {c.id: [] for c in charts}
    out: dict[str, list[dict[str, Any]]] = {}
    for chart in charts:
        rows = []
        for (name, label), points in sorted(series.items()):
            if name in chart.series and points:
                values = [v for _, v in points]
                rows.append({"name": name, "label": label, "latest": values[-1], "min": min(values),
                             "max": max(values), "at": points[-1][0], "count": len(points)})
        out[chart.id] = rows
    return out


def range_arg(raw: str | None, default: str = DEFAULT_RANGE) -> str:
    """``raw`` as a key of :data:`RANGES` (``default`` when absent); else 400 naming the choices."""
    if raw is None or raw == "":
        return default
    if raw not in RANGES:
        bad_request(f"range={raw[:20]!r} is not one of {', '.join(RANGES)}")
    return raw


#: Sampling periods after which the newest sample reads as stale (the jobs worker or the writer is down).
STALE_AFTER_PERIODS = 3


def latest_sample(summary: dict[str, list[dict[str, Any]]]) -> tuple[int | None, bool]:
    """The newest sample's time (ms) across the charts, and whether it is stale: older than
    :data:`STALE_AFTER_PERIODS` sampling periods (at least a minute). With the writer or the jobs
    worker down the charts simply end; the page says since when."""
    latest = max((r["at"] for rows in summary.values() for r in rows), default=None)
    if latest is None:
        return None, False
    return latest, now_ms() - latest > max(STALE_AFTER_PERIODS * settings().sample_every_s, 60) * 1000


@bp.get("/charts")
def charts() -> ResponseReturnValue:
    key = range_arg(request.args.get("range"))
    charts = charts_for(settings().database_path is None)
    summary = summaries(charts, now_ms() - RANGES[key] * 60_000)
    latest, stale = latest_sample(summary)
    return render_template("console/charts.html", charts=charts, summary=summary, series_labels=SERIES_LABELS,
                           sample_every=sample_every(), range_key=key, ranges=RANGE_NAMES, latest=latest,
                           stale=stale)


@bp.get("/api/series")
def api_series() -> ResponseReturnValue:
    """``?name=...&name=...&range=1h[&label=WATCHER]``: the points of up to 8 series (every label of
    each, or only ``label``) over a
    range of :data:`RANGES` (or the last ``minutes``, 1..1440), time in epoch seconds, as
    ``{"series": [{"name", "label", "points"}]}``; at most :data:`MAX_POINTS` points per series."""
    names = request.args.getlist("name")
    if not 1 <= len(names) <= MAX_SERIES:
        bad_request(f"give 1..{MAX_SERIES} series names (name=...), got {len(names)}")
    for name in names:
        if not NAME_RE.fullmatch(name):
            bad_request(f"name={name[:70]!r} is not a series name")
    if request.args.get("range"):
        minutes = RANGES[range_arg(request.args.get("range"))]
    else:
        minutes = int_arg(request.args.get("minutes"), "minutes", 1, 1440, 60)
    label_only = request.args.get("label")
    if label_only is not None and not NAME_RE.fullmatch(label_only):
        bad_request(f"label={label_only[:70]!r} is not a series label (a watcher's name)")
    now = now_ms()
    series = load_series(names, now - minutes * 60_000)
    out = []
    for (name, label), points in sorted(series.items()):
        if label_only is not None and label != label_only:
            continue
        seconds: dict[int, float] = {}
        for ts, value in downsample(points):
            seconds[ts // 1000] = value  # the chart wants one point per second, ascending
        out.append({"name": name, "label": label, "points": sorted(seconds.items())})
    return jsonify({"from": now - minutes * 60_000, "to": now, "series": out})


def price_chart(symbol: str, timeframe: str, range_key: str, limit: int | None = None) -> dict[str, Any]:
    """A price chart's data: the bars of ``symbol`` and ``timeframe`` over the last ``range_key`` of
    its data (before its latest bar, so that a replayed history shows too; at most
    :data:`MAX_BARS`), or its latest ``limit`` bars; the stored indicators over the same bars; the
    symbol's price decimals. Times in epoch seconds."""
    span = RANGES[range_key] * 60_000
    rows = queries.bar_series(db.session, symbol, timeframe,
                              limit=limit or min(MAX_BARS, -(-span // TIMEFRAMES[timeframe]))).rows
    if limit is None and rows:
        rows = [b for b in rows if b.ts > rows[-1].ts - span]
    indicators: dict[str, list[tuple[int, float]]] = {}
    if rows:
        for name in INDICATORS:
            values = queries.indicator_series(db.session, symbol, timeframe, name, since=rows[0].ts,
                                              until=rows[-1].ts, limit=len(rows)).rows
            indicators[name] = [(v.ts // 1000, v.value) for v in values]
    return {"symbol": symbol, "timeframe": timeframe, "range": None if limit else range_key,
            "decimals": queries.price_decimals(db.session, [symbol],
                                               configured=settings().price_decimals).get(symbol),
            "bars": [{"time": b.ts // 1000, "open": b.open, "high": b.high, "low": b.low, "close": b.close,
                      "volume": b.volume} for b in rows],
            "indicators": indicators}
