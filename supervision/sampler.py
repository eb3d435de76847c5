"""The series the console charts, and the :class:`Sampler` that measures them.

The jobs worker's ``metrics`` job calls :meth:`Sampler.collect` every ``TICKSTACK_SAMPLE_EVERY_S``
(10 s) and stores the result with the writer's ``record_samples`` op; the console only reads the
``samples`` table. Both sides use the names below, so they cannot drift apart.

Rates are computed here, from the previous sample of each writer counter: ``(now - before) / dt``,
or, when the writer restarted in between (its uptime is shorter than ``dt``, its counters started
again at 0), ``now / uptime``. The previous values are read back from ``samples`` on the first
call, so a restart of the jobs worker leaves no gap in the rates.

``watcher.restarts`` counts, per watcher, the processes **replaced** since the previous sample: a
process that died (crashed, killed, a signal) or was restarted, and that circus replaced by a new
one while the watcher stayed running with the same number of processes asked for. A process is its
pid and create time (a reused pid is still a new process), as psutil reads it, here or in circusd
for one that ended after circus listed it (:func:`live_processes`). Each sample adds the
processes gone since the previous one to the watcher's *gone* count, and counts as restarts the
new processes that replace them (at most as many as are gone): so a restart whose stop and start
fall on either side of a sample counts each process once. Not restarts: an ``incr`` or ``decr``
(circus's asked-for ``numprocesses`` changed: that interval counts 0 and the gone count starts
over; while circus does not answer it, the last count it said stands: :func:`known_wanted`), a
stop and a start (a sample saw the watcher ``stopped``: the gone count starts over). Not told apart: a stop
and a start no sample saw stopped (they read as a restart); a process that starts and dies between
two samples (not seen). gunicorn replacing its own workers is not counted (only circus's processes
are). After a restart of the jobs worker, the first sample counts the processes created since the
last stored sample (by create time: psutil's, corrected by
:func:`supervision.procstats.create_time_lag`) of a watcher that still runs as many processes as
that sample stored; with no sample within :data:`RESUME_WINDOW_MS`, or with a circusd started since
(the whole stack was stopped and started: its processes are new, not replacements; every watcher
counted one restart per start), it is the baseline and counts nothing.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import psutil
from sqlalchemy import select
from sqlalchemy.engine import Connection

from db import health, queries
from db.circusd import circusd_pidfile, live_circusd
from db.client import WriterClient
from db.config import Settings
from db.models import now_ms, samples_table
from db.server import server_status
from db.validation import is_number
from supervision.circus import Circus, CircusError
from supervision.procstats import ProcessMeter, collect_watchers, create_time_lag

log = logging.getLogger("tickstack.metrics")

#: Series with no label, as (name, title, unit) in the order the console lists them.
WRITER_GAUGES = ("queue_depth", "commit_p50_ms", "commit_p99_ms", "mean_batch", "uptime_s")
WRITER_COUNTERS = ("requests_ok", "ticks_inserted", "requests_failed", "lock_errors")
#: Counter -> the rate series computed from it.
RATES = {"requests_ok": "writer.requests_per_s", "ticks_inserted": "writer.ticks_per_s"}
#: Per-watcher series (labels = the watcher's name).
WATCHER_SERIES = ("watcher.cpu_percent", "watcher.rss_bytes", "watcher.processes", "watcher.restarts")
#: How long samples are kept (record_samples' keep_ms), and how often old ones are pruned: pruning
#: deletes by ts, which has no index of its own, so it runs once a minute rather than every sample.
KEEP_MS = 86_400_000
PRUNE_EVERY_S = 60.0
#: A previous sample older than this is not resumed from (rates, restarts).
RESUME_WINDOW_MS = 600_000


def asked_for(c: Circus, watcher: str) -> int | None:
    """circus's asked-for ``numprocesses`` of ``watcher`` (what incr/decr change); None when it does
    not say (or the watcher went away since circus listed it)."""
    try:
        return c.asked_for(watcher)
    except CircusError:
        return None


def live_processes(processes: list[dict[str, Any]]) -> set[tuple[int, float]]:
    """A watcher's processes as a sample compares them: (pid, psutil's create time to 0.1 s), ours
    or, for one that ended after circus listed it (mid-restart), circusd's
    (:func:`supervision.procstats._process`). One with neither is left out: it counts as gone now,
    and its replacement as one restart later. With circus's ``started`` in its place (its own clock,
    read before the fork: up to a second from psutil's), the same process would have been both gone
    and new: two restarts."""
    return {(p["pid"], round(p["create_time"], 1)) for p in processes if p.get("create_time") is not None}


def known_wanted(asked: dict[str, int | None], previous: dict[str, int | None]) -> dict[str, int | None]:
    """circus's asked-for numprocesses per watcher (:func:`asked_for`), the last known one where it
    did not answer this time (a timeout, on a loaded machine: often during a restart or a stop from
    the console, the very moments the counts are about). Unknown read as a change, each would count
    as scaling. Not told apart: a decr and then an incr, each at a sample circus did not answer,
    from a crash and a slow respawn (one restart)."""
    return {name: n if n is not None else previous.get(name) for name, n in asked.items()}


class Sampler:
    """One measurement of the writer, the database files and every watcher per :meth:`collect`.

    Keeps what rates and restart counts need between calls; not thread-safe (one per worker)."""

    #: Epoch ms at which this stack's circusd started, read by :meth:`resume` (None: unknown).
    circusd_started_ms: int | None = None

    def __init__(self, settings: Settings, circus_timeout: float = 1.0) -> None:
        self.settings = settings
        self.circus_timeout = circus_timeout
        self.meter = ProcessMeter()
        #: Counter name -> (epoch ms, value) of its previous sample.
        self.previous: dict[str, tuple[int, float]] = {}
        #: Watcher -> its processes as (pid, create time) at the previous sample; None before the first.
        self.previous_procs: dict[str, set[tuple[int, float]]] | None = None
        #: Watcher -> circus's asked-for numprocesses at the previous sample (None: it did not say).
        self.previous_wanted: dict[str, int | None] = {}
        #: Watcher -> processes gone and not replaced yet (see the module docstring).
        self.gone: dict[str, int] = {}
        #: Epoch ms of the last stored watcher sample and each watcher's process count then, read back
        #: by :meth:`resume` (used once, when there is no ``previous_procs`` yet).
        self.previous_watchers_ms: int | None = None
        self.previous_counts: dict[str, int] = {}
        self._last_prune = 0.0
        self._circus_error: str | None = None

    def resume(self, conn: Connection) -> None:
        """Read the previous counters and watcher sample time back from ``samples`` (read-only)."""
        since = now_ms() - RESUME_WINDOW_MS
        names = [f"writer.{c}" for c in (*WRITER_COUNTERS, "uptime_s")]
        for name in names:
            row = queries.latest_sample(conn, name, since)
            if row is not None:
                self.previous[name.removeprefix("writer.")] = (int(row.ts), float(row.value))
        last = queries.latest_sample(conn, "watcher.restarts", since)
        self.previous_watchers_ms = int(last.ts) if last is not None else None
        circusd = live_circusd(circusd_pidfile(self.settings))
        try:
            self.circusd_started_ms = (int((psutil.Process(circusd).create_time() + create_time_lag()) * 1000)
                                       if circusd else None)
        except psutil.Error:
            self.circusd_started_ms = None
        if last is not None:
            rows = conn.execute(select(samples_table.c.labels, samples_table.c.value).where(
                samples_table.c.name == "watcher.processes", samples_table.c.ts == int(last.ts))).all()
            self.previous_counts = {str(label): int(value) for label, value in rows}

    def collect(self, client: WriterClient, writer_timeout: float = 2.0) -> tuple[list[dict[str, Any]], dict]:
        """Measure everything; return (samples for ``record_samples``, a summary for the log).

        Raises :class:`WriterError` when the writer does not answer (nothing could be stored anyway);
        circusd not answering only leaves the watcher series out (``summary["circus"]`` says why)."""
        stats = client.stats(timeout=writer_timeout)
        ts = now_ms()
        samples: list[dict[str, Any]] = []

        def add(name: str, value: Any, label: str = "", at: int = ts) -> None:
            if is_number(value):
                samples.append({"ts": at, "name": name, "labels": label, "value": float(value)})

        for key in WRITER_GAUGES:
            add(f"writer.{key}", stats.get(key))
        uptime_ms = float(stats.get("uptime_s") or 0) * 1000
        for key in WRITER_COUNTERS:
            value = stats.get(key)
            if not isinstance(value, int | float):
                continue
            add(f"writer.{key}", value)
            before = self.previous.get(key)
            if key in RATES and before is not None and ts > before[0]:
                dt_ms = ts - before[0]
                if uptime_ms >= dt_ms and value >= before[1]:
                    add(RATES[key], (value - before[1]) * 1000 / dt_ms)
                elif uptime_ms > 0:  # the writer restarted since: its counters began again at 0
                    add(RATES[key], value * 1000 / uptime_ms)
            self.previous[key] = (ts, float(value))
        path = self.settings.database_path
        if path is not None:
            sizes = health.file_sizes(path)
            add("db.bytes", sizes["db"])
            add("db.wal_bytes", sizes["wal"] or 0)
        else:  # a server: pg_database_size (no WAL of ours to measure); nothing while it is down
            server = server_status(self.settings, timeout=2.0)
            if server["reachable"]:
                add("db.bytes", server["size_bytes"])
        summary: dict[str, Any] = {"circus": "ok"}
        try:
            c = Circus(self.settings.circus_endpoint, self.circus_timeout, 1.0)
            watchers = collect_watchers(c, self.meter, require_processes=True)
            asked = {w["name"]: asked_for(c, w["name"]) for w in watchers}
            # Once they are listed: a process created while circus was asked, and seen, is older than
            # the sample, so a jobs worker started next does not count it a second time (the review of
            # round 41; before, psutil's create times read up to a second early and hid it).
            watchers_at = now_ms()
        except CircusError as e:
            summary["circus"] = str(e)
            if self._circus_error != str(e):
                log.warning("metrics: no watcher series while circusd does not answer: %s", e)
            self._circus_error = str(e)
        else:
            if self._circus_error is not None:
                log.info("metrics: circusd answers again")
            self._circus_error = None
            restarts = self.restarts(watchers, asked, watchers_at)
            for w in watchers:
                add("watcher.cpu_percent", w["cpu"], w["name"], watchers_at)
                add("watcher.rss_bytes", w["rss"], w["name"], watchers_at)
                add("watcher.processes", w["numprocesses"], w["name"], watchers_at)
                add("watcher.restarts", restarts[w["name"]], w["name"], watchers_at)
        summary["samples"] = len(samples)
        return samples, summary

    def restarts(self, watchers: list[dict[str, Any]], asked: dict[str, int | None], at_ms: int) -> dict[str, int]:
        """Each watcher's processes replaced since the previous call, from the rows of
        :func:`supervision.procstats.collect_watchers` and circus's asked-for counts
        (:func:`asked_for`) taken at ``at_ms``; keeps what the next call compares with."""
        wanted = known_wanted(asked, self.previous_wanted)
        procs = {w["name"]: live_processes(w["processes"]) for w in watchers}
        counts = {w["name"]: self._replaced(w["name"], procs[w["name"]], w["numprocesses"], w["status"],
                                            wanted[w["name"]]) for w in watchers}
        self.previous_procs, self.previous_wanted, self.previous_watchers_ms = procs, wanted, at_ms
        return counts

    def _replaced(self, watcher: str, procs: set[tuple[int, float]], listed: int, status: str,
                  wanted: int | None) -> int:
        """How many of ``watcher``'s processes were replaced since the previous sample (see the
        module docstring): neither scaling nor a stop and start is a restart. ``procs``: the
        processes identified (:func:`live_processes`); ``listed``: how many circus lists (one
        without a create time included; one circus itself found gone it does not list)."""
        if self.previous_procs is not None:
            before = self.previous_procs.get(watcher)
            if before is None:  # new since (reloadconfig, or removed and added): what was gone is not
                self.gone[watcher], before = 0, set()
            was = self.previous_wanted.get(watcher)
            if status == "stopped" or (was is not None and wanted is not None and wanted != was):
                self.gone[watcher] = 0  # a stop, or an incr/decr: what follows is no replacement
                return 0
            gone = self.gone.get(watcher, 0) + len(before - procs)
            replaced = min(gone, len(procs - before))
            # Bounded by the processes asked for: a decr's leftover cannot turn a later incr into restarts.
            self.gone[watcher] = min(gone - replaced, wanted if wanted is not None else listed)
            return replaced
        if status == "stopped":
            return 0
        # The first sample: a process circus lists that has already ended is gone, mid-restart; the
        # next sample counts its replacement.
        self.gone[watcher] = listed - len(procs)
        since = self.previous_watchers_ms
        if since is None or self.previous_counts.get(watcher) != listed:
            return 0  # the baseline, or scaled since: no way to tell a replacement from an incr
        if self.circusd_started_ms is not None and self.circusd_started_ms > since:
            return 0  # a new stack since: its processes are its first, none replaced
        lag = create_time_lag()
        return sum(1 for _, started in procs if (started + lag) * 1000 > since)

    def store(self, client: WriterClient, samples: list[dict[str, Any]], deadline: float = 5.0) -> dict[str, Any]:
        """``record_samples`` through the writer, pruning samples older than a day once a minute."""
        args: dict[str, Any] = {"samples": samples}
        if time.monotonic() - self._last_prune >= PRUNE_EVERY_S:
            args["keep_ms"] = KEEP_MS
        ticket = client.submit("record_samples", _deadline=deadline, **args)
        client.wait(ticket)
        result = ticket.result()
        if "keep_ms" in args:
            self._last_prune = time.monotonic()
        return result

