"""The tick ingestor: ticks from a feed into the writer, in batches, none lost.

    python -m workers.ticks                      # simulated market (the default)
    python -m workers.ticks --feed csv --file ticks.csv --symbol EURUSD --speed max

Every tick gets a (source, seq) pair, unique in the database, so a replayed
or retried tick is stored once:

* ``sim``: source ``sim-<start ms>`` (one per run of the ingestor), seq 0, 1, ...
* ``csv``: source ``csv-<symbol>-<hash of the file>``, seq = file line * 4 +
  position in the bar, so replaying the same file again stores nothing twice.

Batches go out pipelined and stay in memory until acknowledged. A batch the
writer does not acknowledge within the client's deadline (writer down) is
written to the spool (``$TICKSTACK_HOME/spool``) and replayed when the writer
answers again, and at the next start. On SIGTERM the ingestor stops reading
its feed, waits for its acknowledgements and spools what is left.

A CSV replay exits 0 once every tick of the file is acknowledged. On a
malformed row it commits every row before it, then exits 1 naming the line
and the reason.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

from db.client import Pipeline, Ticket, WriterClient
from db.config import Settings
from db.errors import ValidationError, WriterUnavailable
from db.validation import symbol as valid_symbol
from workers.base import Worker, main
from workers.feeds import CsvFeed, CsvFormatError, SimFeed, pace, parse_speed

COLUMNS = ("symbol", "ts", "bid", "ask", "volume", "source", "seq")
EXIT_BAD_ROW = 1


def _columns(ticks: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {c: [t[c] for t in ticks] for c in COLUMNS}


class Spool:
    """Batches the writer has not acknowledged, one msgpack file each.

    Files are written whole and renamed into place, so a crash never leaves
    half a batch; replaying a batch twice is harmless ((source, seq))."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def put(self, columns: dict[str, list[Any]]) -> Path:
        name = f"ticks-{columns['source'][0]}-{columns['seq'][0]}-{len(columns['seq'])}.msgpack".replace("/", "_")
        path = self.folder / name
        tmp = path.with_suffix(".part")
        tmp.write_bytes(msgpack.packb(columns))
        os.replace(tmp, path)
        return path

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("ticks-*.msgpack"))

    @staticmethod
    def load(path: Path) -> dict[str, list[Any]]:
        return msgpack.unpackb(path.read_bytes())


class TickIngestor(Worker):
    name = "ticks"
    idle_sleep = 0.05

    def __init__(self, settings: Settings, ticks: Iterator[tuple[int, dict[str, Any]]], source: str, *,
                 until_idle: bool = False, batch: int = 1000, flush_interval: float = 0.25,
                 window: int = 8, deadline: float = 15.0, seq_per_line: int = 1) -> None:
        """``ticks`` yields (line or counter, tick); seq = line * seq_per_line + position."""
        super().__init__(settings, until_idle)
        if not 1 <= batch <= 10_000:
            raise ValueError(f"--batch {batch}: must be 1..10000")
        self.ticks = ticks
        self.source = source
        self.batch = batch
        self.flush_interval = flush_interval
        self.window = window
        self.deadline = deadline
        self.seq_per_line = seq_per_line
        self.exhausted = False
        self.bad_row: CsvFormatError | None = None
        self.received = self.acked = self.duplicates = self.spooled = self.failed = 0
        self._last_line: int | None = None
        self._pos = 0
        self._pending: list[dict[str, Any]] = []
        self._in_flight: dict[int, tuple[dict[str, list[Any]], Path | None]] = {}
        self._last_spool_try = 0.0
        self._last_report = time.monotonic()

    def setup(self) -> None:
        self.spool = Spool(self.settings.spool_dir)
        self.client = WriterClient(settings=self.settings, deadline=self.deadline)
        self.pipe = Pipeline(self.client, self.window, on_done=self._on_done)
        self.log.info("ticks: source %s, %d spooled batches to replay", self.source, len(self.spool.files()))
        self._replay_spool(force=True)

    def step(self) -> bool:
        started = time.monotonic()
        while not self.exhausted and len(self._pending) < self.batch and self.alive:
            try:
                line, tick = next(self.ticks)
            except StopIteration:
                self.exhausted = True
                break
            except CsvFormatError as e:
                self.bad_row = e
                self.exhausted = True
                break
            self._pos = self._pos + 1 if line == self._last_line else 0
            self._last_line = line
            tick["source"] = self.source
            tick["seq"] = line * self.seq_per_line + self._pos
            self._pending.append(tick)
            self.received += 1
            if time.monotonic() - started >= self.flush_interval:
                break
        did = bool(self._pending)
        if self._pending:
            self._submit(_columns(self._pending), None)
            self._pending = []
        self.pipe.collect()
        self._replay_spool()
        self._report()
        if self.exhausted and not did:
            if self.until_idle or self.bad_row is not None:
                self.alive = False  # finished: teardown waits for the acks
                return True
            return False
        return True

    def teardown(self) -> None:
        """Flush: submit what was read, wait for every ack (each bounded by
        the client deadline); what the writer did not take goes to the spool."""
        if self._pending:
            self._submit(_columns(self._pending), None)
            self._pending = []
        self.pipe.drain()
        self.client.close()
        self.log.info("ticks: source %s received %d, acked %d (duplicates %d), spooled %d, rejected %d",
                      self.source, self.received, self.acked, self.duplicates, self.spooled, self.failed)
        if self.bad_row is not None:
            self.log.error("ticks: %s (every row before it is stored)", self.bad_row)

    def _submit(self, columns: dict[str, list[Any]], spool_path: Path | None) -> None:
        ticket = self.pipe.submit("insert_ticks", ticks=columns)
        self._in_flight[ticket.seq] = (columns, spool_path)

    def _on_done(self, ticket: Ticket) -> None:
        columns, spool_path = self._in_flight.pop(ticket.seq)
        n = len(columns["seq"])
        if ticket.error is None:
            result = ticket.result()
            self.acked += n
            self.duplicates += result["duplicates"]
            if spool_path is not None:
                spool_path.unlink(missing_ok=True)
        elif isinstance(ticket.error, WriterUnavailable):
            if spool_path is None:
                path = self.spool.put(columns)
                self.spooled += n
                self.log.warning("ticks: writer unavailable; spooled %d ticks to %s", n, path.name)
        else:
            # The writer refused the batch: retrying cannot help. Keep it for
            # a person to look at instead of dropping it.
            self.failed += n
            path = self.spool.put(columns).rename(self.spool.folder / f"rejected-{time.time_ns()}.msgpack")
            self.log.error("ticks: writer rejected %d ticks (%s); kept in %s", n, ticket.error, path)

    def _replay_spool(self, force: bool = False) -> None:
        """Resubmit spooled batches, at most every 2 s, when none is in flight."""
        now = time.monotonic()
        if not force and now - self._last_spool_try < 2:
            return
        self._last_spool_try = now
        busy = {str(p) for _, p in self._in_flight.values() if p is not None}
        for path in self.spool.files()[: self.window]:
            if str(path) not in busy:
                self._submit(Spool.load(path), path)

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._last_report >= 10:
            self._last_report = now
            self.log.info("ticks: received %d, acked %d, in flight %d, spool %d files",
                          self.received, self.acked, self.pipe.outstanding, len(self.spool.files()))


def _symbols(text: str) -> list[str]:
    symbols = [s.strip() for s in text.split(",") if s.strip()]
    if not symbols:
        raise ValueError(f"--symbols {text!r}: give symbols like BTCUSD,EURUSD (upper case)")
    try:
        return [valid_symbol("--symbols", s) for s in symbols]
    except ValidationError as e:
        raise ValueError(f"{e}; give symbols like BTCUSD,EURUSD") from None


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--feed", choices=["sim", "csv"], default="sim")
    parser.add_argument("--symbols", default="BTCUSD,EURUSD", help="sim: comma-separated symbols")
    parser.add_argument("--rate", type=float, default=20.0, help="sim: ticks per second over all symbols")
    parser.add_argument("--seed", type=int, default=None, help="sim: random seed (repeatable runs)")
    parser.add_argument("--count", type=int, default=None, help="sim: stop after this many ticks")
    parser.add_argument("--vol-scale", type=float, default=20.0, help="sim: volatility multiplier (livelier demo)")
    parser.add_argument("--file", type=Path, help="csv: the tick or OHLCV file")
    parser.add_argument("--symbol", help="csv: the symbol (required for bar files)")
    parser.add_argument("--timeframe", help="csv: bar interval (default: inferred from the file)")
    parser.add_argument("--speed", default="max", help="csv: 'max' or real time x k (e.g. 1, 10)")
    parser.add_argument("--batch", type=int, default=1000, help="ticks per writer request (1..10000)")
    parser.add_argument("--deadline", type=float, default=15.0,
                        help="seconds a batch waits for the writer before it is spooled to disk")


def _make(settings: Settings, args: argparse.Namespace) -> TickIngestor:
    if not args.deadline > 0:
        raise ValueError("--deadline must be positive")
    if args.feed == "sim":
        if not args.rate > 0 or not args.vol_scale > 0:
            raise ValueError("--rate and --vol-scale must be positive")
        if args.count is not None and args.count < 0:
            raise ValueError("--count must be >= 0")
        feed = SimFeed(_symbols(args.symbols), seed=args.seed, rate_hz=args.rate, vol_scale=args.vol_scale)
        ticks: Iterator[dict[str, Any]] = pace(iter(feed), 1.0)
        if args.count is not None:
            ticks = itertools.islice(ticks, args.count)
        source = f"sim-{int(time.time() * 1000)}"
        return TickIngestor(settings, enumerate(ticks), source, until_idle=args.until_idle or args.count is not None,
                            batch=args.batch, deadline=args.deadline)
    if args.file is None:
        raise ValueError("--feed csv needs --file PATH")
    if not args.file.is_file():
        raise ValueError(f"--file {args.file}: no such file")
    if args.symbol is not None:
        try:
            valid_symbol("--symbol", args.symbol)
        except ValidationError as e:
            raise ValueError(f"{e}; e.g. EURUSD") from None
    speed = parse_speed(args.speed)
    try:
        feed = CsvFeed(args.file, args.symbol, args.timeframe)
    except CsvFormatError as e:
        raise ValueError(f"{args.file}: {e}") from None
    digest = hashlib.sha256(args.file.read_bytes()).hexdigest()[:16]
    source = f"csv-{args.symbol or 'file'}-{digest}"
    # Bars become 4 ticks each: seq = line * 4 + position keeps them unique.
    return TickIngestor(settings, iter(pace(iter(feed), speed)), source, until_idle=True, batch=args.batch,
                        deadline=args.deadline, seq_per_line=4)


def run(argv: list[str] | None = None) -> int:
    holder: dict[str, TickIngestor] = {}

    def make(settings: Settings, args: argparse.Namespace) -> TickIngestor:
        holder["w"] = _make(settings, args)
        return holder["w"]

    code = main(TickIngestor, argv, _add_arguments, make)
    ingestor = holder.get("w")
    if code == 0 and ingestor is not None:
        if ingestor.bad_row is not None:
            return EXIT_BAD_ROW
        if ingestor.failed or (ingestor.until_idle and ingestor.spooled):
            return 1
    return code


if __name__ == "__main__":
    raise SystemExit(run())
