"""The analysis worker: ticks in, OHLCV bars and indicators out (``python -m workers.analysis``).

Each step reads the next chunk of ticks after its cursor (``id > cursor``, in id order; on PostgreSQL
only up to :class:`db.tick_horizon.TickHorizon`'s bound, so that a tick whose transaction commits late is
never passed over) as arrays,
folds them with :class:`workers.analyzer.Analyzer` (numpy aggregation for ticks in order, bars
recomputed from the stored ticks for late ones: see that module) and stores the changed bars, their
indicator values, the new cursor position and the fold's state with ``store_analysis``, in columns.

Why that gives exactly-once counting: the stored state is always the state *after* the stored
position. A worker that starts (or dies at any point and restarts) loads both and redoes whatever came
after; work it did in memory but never stored is simply done again from the same state. Bars and
indicator values are written as whole values (upserts), never as increments, so a chunk whose output
is too large for one request is stored in several: every part but the last leaves the cursor where it
was, and only the last moves it (with the bars merged into retention-pruned ones, the one kind of write
that must not happen twice). A crash between the parts redoes the chunk and writes the same values.

Stores are pipelined (a few requests in flight, so folding the next chunk overlaps the writer
storing the last one); each names the cursor position it was computed from (``expect``), so after a
failed one every later one is refused too and the worker resumes from the stored cursor. Within a
chunk of ticks in order, full requests go as soon as they are full (the bars are ready long before
the indicators, which take a Python loop per bar): the writer stores them while the rest is computed.

Backfills (late ticks folded into older bars) are logged, kept as running totals in the state, and
recorded as samples (``analysis_backfill_ticks`` / ``_bars`` per symbol) for the console.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import zip_longest
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine

from db import queries
from db.client import Pipeline, Ticket, WriterClient
from db.config import Settings
from db.errors import Conflict, WriterError, WriterUnavailable
from db.models import ANALYSIS_CURSOR, cursors_table, now_ms
from db.parsers import whole_flag
from db.tick_horizon import TickHorizon
from db.validation import MAX_ROWS
from workers.analyzer import Analyzer, Chunk, Flush, Output, Table
from workers.base import Worker, main, wait_for_database

DEFAULT_CHUNK = 20_000
#: ``--chunk``: ticks read into memory per step (as arrays, about 60 bytes a tick).
MAX_CHUNK = 1_000_000
#: store_analysis requests in flight.
DEFAULT_WINDOW = 4
#: Seconds between two progress lines of a running worker (as the tick ingestor's): at live rates a chunk
#: is stored every second, and a line for each made 3,600 lines an hour of the same words.
LOG_EVERY = 10.0


class DbHistory:
    """:class:`workers.analyzer.History` on the worker's read connection.

    Before its first read it calls ``settle`` (the worker waits there for its stores in flight) and
    ends the connection's read transaction: each one is a snapshot, and the one that read the chunk
    may predate those stores. Nothing is submitted while a chunk with late ticks is folded, so one
    wait is enough (early requests go only for chunks without; their reads, if any, are of bars the
    chunk itself replaces, so a snapshot with or without those requests reads the same).
    """

    def __init__(self, conn: Connection, settle: Callable[[], None] = lambda: None) -> None:
        self.conn = conn
        self.settle: Callable[[], None] | None = settle

    def before_read(self) -> None:
        if self.settle is not None:
            self.settle()
            self.settle = None
            self.conn.rollback()  # the next read starts a new snapshot, with every store in it

    def ticks(self, symbol: str, ranges: Sequence[tuple[int, int]], max_id: int) -> list[tuple]:
        self.before_read()
        rows: list[tuple] = []
        for since, until in ranges:
            rows += queries.symbol_ticks_between(self.conn, symbol, since, until, max_id)
        return rows

    def bars(self, symbol: str, timeframe: str, since: int, until: int) -> list[tuple]:
        self.before_read()
        return queries.bars_between(self.conn, symbol, timeframe, since, until) if since <= until else []

    def series(self, symbol: str, timeframe: str) -> list[tuple]:
        self.before_read()
        return queries.bar_hlc(self.conn, symbol, timeframe)


def _slices(cols: dict[str, list[Any]], size: int) -> list[dict[str, list[Any]]]:
    n = len(cols["ts"])
    return [{k: v[i:i + size] for k, v in cols.items()} for i in range(0, n, size)]


def parts(out: Output, size: int = MAX_ROWS) -> Iterator[tuple[dict[str, list], dict[str, list], bool]]:
    """(bars, indicators, last) per ``store_analysis`` call for ``out``: at most ``size`` of each per
    call; the merged bars go in the last one, the one that moves the cursor."""
    pairs = list(zip_longest(_slices(out.bars, size), _slices(out.indicators, size)))
    if out.merged["ts"]:
        if len(out.merged["ts"]) > size:
            raise ValueError(f"{len(out.merged['ts'])} merged bars do not fit in one request")
        pairs.append((out.merged, None))
    if not pairs:
        pairs.append((None, None))
    for i, (bars, inds) in enumerate(pairs):
        yield bars or [], inds or [], i == len(pairs) - 1


class AnalysisWorker(Worker):
    """Reads ticks after the ``analysis`` cursor; bars and indicators stored with the cursor.

    Stores are pipelined (``window`` requests in flight) so that folding the next chunk overlaps the
    writer storing the last one. Each request names the cursor position it was computed from
    (``expect``): after a failed one, every later one is refused too, and the worker resumes from
    the stored cursor. Reads of stored bars and ticks (late ticks only) wait for the stores in flight.
    """

    name = "analysis"
    leader_only = True  # once per database, whatever the hosts (db.leader)
    cursor = ANALYSIS_CURSOR

    def __init__(self, settings: Settings, until_idle: bool = False, chunk: int = DEFAULT_CHUNK,
                 rows_per_store: int = MAX_ROWS, window: int = DEFAULT_WINDOW) -> None:
        super().__init__(settings, until_idle)
        if chunk < 1:
            raise ValueError(f"--chunk must be at least 1, got {chunk}")
        if not 1 <= rows_per_store <= MAX_ROWS:
            raise ValueError(f"rows_per_store must be 1..{MAX_ROWS}, got {rows_per_store}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.chunk = chunk
        self.rows_per_store = rows_per_store
        self.window = window
        self.engine: Engine | None = None
        self.client: WriterClient | None = None
        self.pipe: Pipeline | None = None
        self.analyzer = Analyzer()
        self._stored_state: bytes | None = None
        self._failed: WriterError | None = None
        #: Parts of the current chunk sent before its last (see :meth:`_submit`).
        self._parts_sent = 0
        self._stats = {"chunks": 0, "ticks": 0, "bars": 0, "indicators": 0, "late": 0, "recomputed": 0}
        self._logged_at = 0.0
        #: PostgreSQL: how far ids are final (several writers may commit out of id order).
        self.horizon = TickHorizon()

    def setup(self) -> None:
        self.engine = wait_for_database(self.settings, alive=lambda: self.alive)
        self.client = WriterClient(settings=self.settings)
        self.pipe = Pipeline(self.client, self.window, on_done=self._on_done)
        self.restore()

    def restore(self) -> None:
        """Load position and state from the cursor row: what was last committed is the truth."""
        assert self.engine is not None
        with self.engine.connect() as conn:
            row = conn.execute(select(cursors_table.c.value, cursors_table.c.state)
                               .where(cursors_table.c.name == self.cursor)).first()
        position, state = row if row is not None else (0, None)
        self.analyzer = Analyzer(position, state)
        self._stored_state = state
        self.log.info("%s: resuming after tick %d (%d series; so far %d late ticks folded in, %d bars recomputed)",
                      self.name, position, len(self.analyzer.open), self.analyzer.totals["late_ticks"],
                      self.analyzer.totals["bars_recomputed"])

    def _on_done(self, ticket: Ticket) -> None:
        """Answers arrive in submit order; the first failed store decides where to resume."""
        if ticket.error is None:
            return
        if ticket.op != "store_analysis":  # a backfill sample: only a console line is lost
            self.log.warning("%s: %s failed (%s)", self.name, ticket.op, ticket.error)
        elif self._failed is None:
            self._failed = ticket.error

    def settle(self) -> None:
        """Wait until every request in flight is answered (before reading what they store)."""
        assert self.pipe is not None
        self.pipe.drain()

    def _recovered(self) -> bool:
        """After a failed store: wait for the rest, resume from the stored cursor, and say so."""
        assert self.pipe is not None
        self.pipe.collect(0)
        if self._failed is None:
            return False
        self.settle()
        error, self._failed = self._failed, None
        if not isinstance(error, WriterUnavailable | Conflict):
            raise error  # a store the writer refused as invalid: a bug, not a state to resume from
        # Stored or not, the cursor row says where we are: continue from there.
        self.log.warning("%s: store failed (%s); resuming from the stored cursor", self.name, error)
        self.restore()
        return True

    def step(self) -> bool:
        assert self.engine is not None
        if self._recovered():
            return True
        limit, before = self.chunk, self.analyzer.position
        with self.engine.connect() as conn:
            rows = queries.ticks_after(conn, before, limit, self.horizon.advance(conn))
            if not rows:
                self.settle()  # idle: everything is stored before the worker sleeps or exits
                recovered = self._recovered()
                self._log_progress()
                return recovered
            history = DbHistory(conn, settle=self.settle)
            out = self.analyzer.process(Chunk.from_rows(rows), history, self._flush(before))
            while len(out.merged["ts"]) > self.rows_per_store:  # rare: retention-pruned bars, by thousands
                rows = rows[:max(1, len(rows) // 2)]
                self.settle()
                self.restore()
                out = self.analyzer.process(Chunk.from_rows(rows), history)
        if self._recovered():  # a store failed while this chunk was folded: it was folded on sand
            return True
        self._submit(out, before)
        self._log_progress()
        return True

    def _flush(self, before: int) -> Flush:
        """Store a request as soon as either table holds ``rows_per_store`` rows (with at most as many
        of the other) while the fold goes on, so the writer stores the bars while the indicators are
        computed, and each series' values while the next ones are (it waited for as many bars as
        values, and the bars, all made first, ran out after the first series: the last 135,000 of the
        hourly benchmark's 180,000 values were all sent at the end). Each keeps the cursor at
        ``before`` with its stored state, as every part but the last does (see the module docstring)."""
        assert self.pipe is not None
        size = self.rows_per_store

        def flush(bars: Table, indicators: Table) -> None:
            while len(bars) >= size or len(indicators) >= size:
                nb, ni = min(size, len(bars)), min(size, len(indicators))
                self._store(bars.take(nb) if nb else [], indicators.take(ni) if ni else [], before, before,
                            self._stored_state)

        return flush

    def _store(self, bars: dict[str, Any], inds: dict[str, Any], before: int, position: int,
               state: bytes | None) -> None:
        assert self.pipe is not None
        if position == before:  # a part that leaves the cursor: the chunk's last part waits for it
            self._parts_sent += 1
        self.pipe.submit("store_analysis", cursor=self.cursor, bars=bars, indicators=inds, expect=before,
                         position=position, state=state)
        self._count(chunks=1, bars=len(bars["ts"]) if bars else 0, indicators=len(inds["ts"]) if inds else 0)

    def _submit(self, out: Output, before: int) -> None:
        """``out`` in as many ``store_analysis`` requests as its rows need; every one but the last keeps
        the cursor at ``before`` with its stored state, the last one moves both.

        The last part goes only once every earlier part of the chunk is answered, and not at all if
        one failed: a part whose batch failed (retryably) is sent again after a later part may have
        been stored, and were that the last, the cursor would pass the failed part's bars for good
        (its resend is then refused: the cursor is no longer at ``expect``). Without the last part
        the cursor stays at ``before`` and the next step redoes the chunk from there."""
        assert self.pipe is not None
        for bars, inds, last in parts(out, self.rows_per_store):
            if last and self._parts_sent:
                self.settle()
                if self._failed is not None:
                    self._parts_sent = 0
                    return  # step() resumes from the stored cursor (_recovered)
            if last:
                self._parts_sent = 0
            self._store(bars, inds, before, out.position if last else before,
                        out.state if last else self._stored_state)
        self._stored_state = out.state
        self._count(ticks=out.ticks, late=out.late, recomputed=out.recomputed)
        if out.backfill:
            self._record_backfill(out)

    def _record_backfill(self, out: Output) -> None:
        """One sample per symbol and count, for the console; a lost sample loses no data, only a line."""
        assert self.pipe is not None
        ts = now_ms()
        samples = [{"ts": ts, "name": name, "labels": sym, "value": float(n)}
                   for sym, counts in out.backfill.items()
                   for name, n in zip((queries.BACKFILL_TICKS, queries.BACKFILL_BARS), counts, strict=True)]
        self.pipe.submit("record_samples", samples=samples)
        self.log.debug("%s: backfill: %s", self.name, ", ".join(
            f"{sym} {late} late ticks folded into {bars} recomputed bars"
            for sym, (late, bars) in out.backfill.items()))

    def _count(self, **counts: int) -> None:
        for key, n in counts.items():
            self._stats[key] += n

    def _log_progress(self, force: bool = False) -> None:
        """One INFO line every :data:`LOG_EVERY` seconds at most (and at the end of a run), summing the chunks
        stored since the previous one."""
        now = time.monotonic()
        if self._stats["chunks"] and (force or now - self._logged_at >= LOG_EVERY):
            s = self._stats
            self.log.info("%s: stored %d chunk(s): %d ticks, %d bars, %d indicators; position %d "
                          "(late ticks folded in %d, bars recomputed %d)", self.name, s["chunks"], s["ticks"],
                          s["bars"], s["indicators"], self.analyzer.position, s["late"], s["recomputed"])
            self._stats = dict.fromkeys(s, 0)
            self._logged_at = now

    def teardown(self) -> None:
        if self.pipe is not None:
            try:
                self.settle()
            except WriterError as e:  # pragma: no cover - drain itself does not raise; be safe at exit
                self.log.warning("%s: stores in flight at exit: %s", self.name, e)
            if self._failed is not None:
                self.log.warning("%s: a store failed at exit (%s); the next start resumes from the stored "
                                 "cursor", self.name, self._failed)
        self._log_progress(force=True)
        if self.client is not None:
            self.client.close()
        if self.engine is not None:
            self.engine.dispose()


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk", type=whole_flag(1, MAX_CHUNK), default=DEFAULT_CHUNK,
                        help="ticks read per step (default %(default)s)")
    parser.add_argument("--rows-per-store", type=whole_flag(1, MAX_ROWS), default=MAX_ROWS,
                        help="bars (and indicator values) per store_analysis request (default %(default)s)")


def _make(settings: Settings, args: argparse.Namespace) -> AnalysisWorker:
    return AnalysisWorker(settings, until_idle=args.until_idle, chunk=args.chunk, rows_per_store=args.rows_per_store)


if __name__ == "__main__":
    sys.exit(main(AnalysisWorker, None, _add_arguments, _make))
