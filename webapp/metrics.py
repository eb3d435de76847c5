"""Prometheus metrics for the API app (``GET /metrics``) and the probes of
the stack that ``/metrics`` and ``GET /api/health`` share.

Two kinds of series:

* **Per request**, of every gunicorn worker together:
  ``tickstack_http_requests_total`` and
  ``tickstack_http_request_duration_seconds`` (a histogram), labelled
  ``route`` (the URL rule, e.g. ``/api/trades/<int:trade_id>``, never the raw
  path, so ids cannot blow up the label set; ``unmatched`` for 404/405 on no
  route), ``method`` and ``status``.
* **Of the stack**, read at scrape time and the same from every process: the
  writer's queue depth, commit latency p50/p99 and counters (from its
  ``stats`` reply), the database and WAL file sizes, and per circus watcher
  ``tickstack_watcher_up{watcher=...}`` (1 when circus calls it active and it runs at least the
  processes circus was asked for, at least one: :class:`~supervision.circus.WatcherState`; 0 when
  stopped, or active with fewer, as after ``circusctl decr`` to 0) and
  ``tickstack_watcher_processes{watcher=...}`` (the processes it runs).

Several workers, one count: gunicorn runs the API with 2 workers and a scrape
lands on whichever accepts it. Under gunicorn with ``--config
python:webapp.gunicorn_conf`` (as circus.ini runs it) prometheus_client is in
multiprocess mode (:mod:`webapp.multiprocess`): each worker's request series
go to files in its master's folder, and every scrape merges the files of all
workers of every master that runs (:class:`webapp.multiprocess.EveryMaster`;
two after ``circusctl incr api``), so one scrape shows the API's totals and a
series never jumps between workers or masters. The counts start at zero when the API
starts. Elsewhere (Flask's test client, one process) the series are counted in
memory. Which mode is on is prometheus_client's own decision, made at its
import (:func:`multiprocess_mode`); this module follows it.

Each app gets its own :class:`~prometheus_client.CollectorRegistry` (never the
global one), so tests that build many apps do not collide (in multiprocess
mode the files are per process, so gunicorn runs one app per worker).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from db.client import WriterClient
from db.config import Settings
from db.errors import WriterError
from db.health import file_sizes
from db.server import server_status
from supervision.circus import Circus, CircusError, WatcherState
from webapp.multiprocess import EveryMaster, preallocate_value_files

log = logging.getLogger("tickstack.api")

#: How long a probe waits for the writer or circusd before reporting it down.
PROBE_TIMEOUT = 1.0
#: Label of requests that matched no URL rule (404, and 405 on no method).
UNMATCHED = "unmatched"
#: The methods counted by name; any other is counted as ``other`` (each made-up method was a label,
#: and a file's worth of series, of its own: anyone on the machine could grow them without end).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass
class CircusStatus:
    """The watchers as circusd describes them (plugins left out), or why there are none."""

    reachable: bool
    watchers: dict[str, WatcherState]
    error: str | None = None

    @property
    def statuses(self) -> dict[str, str]:
        """circus's own word for each watcher (active, stopped, ...)."""
        return {name: w.status for name, w in self.watchers.items()}

    @property
    def down(self) -> dict[str, str]:
        """Each watcher that is not up, with what is wrong ("stopped", "0 of 1 processes")."""
        return {name: w.problem for name, w in self.watchers.items() if w.problem is not None}


class Probe:
    """Looks at the stack without changing it: writer stats, database files,
    circus watchers. Never raises for a component that is down; reports it."""

    def __init__(self, settings: Settings, client: Callable[[], WriterClient]) -> None:
        """``client`` returns the calling thread's writer client."""
        self.settings = settings
        self.client = client

    def writer(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
        """(ping, stats, error): ping and stats are None when the writer does
        not answer within :data:`PROBE_TIMEOUT`, and error says why."""
        try:
            client = self.client()
            ping = client.ping(timeout=PROBE_TIMEOUT)
            stats = client.stats(timeout=PROBE_TIMEOUT)
        except WriterError as e:
            return None, None, str(e)
        return ping, stats, None

    def database_files(self) -> dict[str, int | None]:
        """Sizes in bytes of the database, WAL and shm files (None: missing);
        empty for a database that is not a SQLite file."""
        path = self.settings.database_path
        return {} if path is None else file_sizes(path)

    def database_server(self) -> dict[str, Any] | None:
        """A PostgreSQL server's reachability, size and connections (:func:`db.server.server_status`);
        None for a SQLite file."""
        if self.settings.database_path is not None:
            return None
        return server_status(self.settings, timeout=PROBE_TIMEOUT)

    def circus(self) -> CircusStatus:
        """Every watcher's status, processes and asked-for count (:meth:`Circus.watchers`); when
        circusd is not running (the API outside circus: tests, development) it says so at once."""
        try:
            watchers = Circus(self.settings.circus_endpoint, timeout=PROBE_TIMEOUT,
                              busy_retry=PROBE_TIMEOUT).watchers()
        except CircusError as e:
            return CircusStatus(False, {}, str(e))
        return CircusStatus(True, watchers)


class StackCollector:
    """Gauges and counters of the stack, read from :class:`Probe` at each
    scrape. ``describe`` returns nothing so registering it probes nothing."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        _, stats, _ = self.probe.writer()
        yield GaugeMetricFamily("tickstack_writer_up", "1 when the writer answered this scrape's stats request",
                                value=0.0 if stats is None else 1.0)
        stats = stats or {}
        gauges = [
            ("tickstack_writer_queue_depth", "Requests queued in the writer, waiting for a commit",
             stats.get("queue_depth"), 1.0),
            ("tickstack_writer_commit_p50_seconds", "Median commit latency over the writer's recent batches",
             stats.get("commit_p50_ms"), 0.001),
            ("tickstack_writer_commit_p99_seconds", "99th percentile commit latency over recent batches",
             stats.get("commit_p99_ms"), 0.001),
            ("tickstack_writer_uptime_seconds", "Seconds since the writer process started",
             stats.get("uptime_s"), 1.0),
        ]
        for name, doc, value, scale in gauges:
            family = GaugeMetricFamily(name, doc)
            if value is not None:  # no sample rather than a made-up one (no commit yet, writer down)
                family.add_metric([], float(value) * scale)
            yield family
        requests = CounterMetricFamily("tickstack_writer_requests", "Requests the writer answered, by result "
                                       "(resets when the writer restarts)", labels=["result"])
        for result, key in (("ok", "requests_ok"), ("failed", "requests_failed"), ("busy", "busy_replies")):
            if key in stats:
                requests.add_metric([result], float(stats[key]))
        yield requests
        for name, doc, key in (
            ("tickstack_writer_ticks_inserted", "Ticks the writer stored since it started", "ticks_inserted"),
            ("tickstack_writer_lock_errors", "'database is locked' errors the writer met", "lock_errors"),
            ("tickstack_writer_lost_races", "Times the writer lost a race with another session (PostgreSQL: a "
             "deadlock, a serialisation failure, a lock timeout); each request or batch was answered retryably",
             "lost_races"),
            ("tickstack_writer_commit_failures", "Batches the writer could not commit", "commit_failures"),
        ):
            family = CounterMetricFamily(name, doc)
            if key in stats:
                family.add_metric([], float(stats[key]))
            yield family

        files = self.probe.database_files()
        server = self.probe.database_server()
        if server is not None:  # PostgreSQL: the database's size as the server counts it (pg_database_size)
            files = {"db": server.get("size_bytes")}
        for name, doc, kind in (("tickstack_database_size_bytes", "Size of the database (SQLite: its file; "
                                 "PostgreSQL: pg_database_size)", "db"),
                                ("tickstack_wal_size_bytes", "Size of the SQLite WAL file (0 when absent)", "wal")):
            family = GaugeMetricFamily(name, doc)
            if files and files.get(kind) is not None or (kind == "wal" and files and server is None):
                family.add_metric([], float(files.get(kind) or 0))
            yield family
        if server is not None:
            yield GaugeMetricFamily("tickstack_database_up", "1 when the PostgreSQL server answered this scrape",
                                    value=1.0 if server["reachable"] else 0.0)
            connections = GaugeMetricFamily("tickstack_database_connections", "Sessions on the database by "
                                            "application_name, pids left out (PostgreSQL)", labels=["application"])
            for app, n in (server.get("by_application") or {}).items():
                connections.add_metric([app], float(n))
            yield connections

        circus = self.probe.circus()
        yield GaugeMetricFamily("tickstack_circus_up", "1 when circusd answered this scrape's status request",
                                value=1.0 if circus.reachable else 0.0)
        up = GaugeMetricFamily("tickstack_watcher_up", "1 when the circus watcher is active and runs at least the "
                               "processes circus was asked for (at least 1), else 0", labels=["watcher"])
        running = GaugeMetricFamily("tickstack_watcher_processes", "Processes circus runs for the watcher now "
                                    "(gunicorn's workers not counted)", labels=["watcher"])
        for name, watcher in circus.watchers.items():
            up.add_metric([name], 1.0 if watcher.up else 0.0)
            if watcher.processes is not None:  # no sample rather than a made-up one (circusd did not say)
                running.add_metric([name], float(watcher.processes))
        yield up
        yield running


def multiprocess_mode() -> bool:
    """Whether prometheus_client counts in files shared by the processes (it decided when it was
    imported, from ``PROMETHEUS_MULTIPROC_DIR``, which :mod:`webapp.multiprocess` sets in the
    gunicorn master)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class Metrics:
    """The per-app registry with the request series and the stack collector. In multiprocess mode
    the request series are not registered here (their values live in the shared files, and the
    registry reads them back, merged, through a ``MultiProcessCollector``), so nothing is counted
    twice."""

    def __init__(self, probe: Probe) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        shared = multiprocess_mode()
        if shared:
            preallocate_value_files()
        self._count_lost = False
        own = None if shared else self.registry
        labels = ["route", "method", "status"]
        self.requests = Counter("tickstack_http_requests", "HTTP requests answered by the API (all workers)",
                                labels, registry=own)
        self.latency = Histogram("tickstack_http_request_duration_seconds",
                                 "Time from request start to response (all workers)", labels, registry=own)
        if shared:
            self.registry.register(EveryMaster(probe.settings))  # type: ignore[arg-type]  # a collector
        self.registry.register(StackCollector(probe))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count a request. A values file that cannot grow (a full disk, :func:`preallocate_value_files`)
        loses the count (said once per worker), never the request's answer."""
        labels = (route, method, str(status))
        try:
            self.requests.labels(*labels).inc()
            self.latency.labels(*labels).observe(seconds)
        except OSError as e:
            if not self._count_lost:  # once per worker: counts of known labels go on meanwhile
                log.warning("metrics: requests are not counted while the metrics' files cannot grow: %s", e)
            self._count_lost = True


def init_metrics(app: Flask, probe: Probe) -> Metrics:
    """Attach a :class:`Metrics` to ``app``: time every request of the app,
    and count it when its response is ready. The API serves them at
    ``GET /metrics`` (:func:`exposition`, from :mod:`webapp.api.routes`, where
    the API's rules of a request apply to it too)."""
    metrics = Metrics(probe)
    app.extensions["tickstack_metrics"] = metrics

    @app.before_request
    def _start_timer() -> None:
        g.tickstack_started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        started = g.get("tickstack_started")
        if started is not None:
            rule = request.url_rule
            method = request.method if request.method in KNOWN_METHODS else "other"
            metrics.observe(rule.rule if rule is not None else UNMATCHED, method, response.status_code,
                            time.perf_counter() - started)
        return response

    return metrics


def exposition(accept: str) -> Response:
    """The current app's metrics in Prometheus's text format, or OpenMetrics when ``accept`` (the
    scraper's ``Accept``) asks for it."""
    metrics: Metrics = current_app.extensions["tickstack_metrics"]
    encoder, content_type = choose_encoder(accept)
    return Response(encoder(metrics.registry), status=200, headers={"Content-Type": content_type})
