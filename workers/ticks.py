"""The tick ingestor's command: ticks from a feed into the writer, in batches, none lost
(:class:`workers.tick_ingestor.TickIngestor` does the work).

    python -m workers.ticks                      # simulated market (the default)
    python -m workers.ticks --feed csv --file ticks.csv --symbol EURUSD --speed max

Every tick gets a (source, seq) pair, unique in the database, so a replayed
or retried tick is stored once:

* ``sim``: source ``sim-<host>-<start ms>`` (one per host and run of the ingestor), seq 0, 1, ...
* ``csv``: source ``csv-<symbol>-<hash of the file>``, seq = file line * 4 +
  position in the bar, so replaying the same file again stores nothing twice.

A CSV replay exits 0 once every tick of the file is acknowledged; stopped before its end, it says so
and exits 1. On a malformed row it commits every row before it, then exits 1 naming the line and the
reason. A flag of one feed given to the other is refused.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from db.config import Settings, ensure_home
from db.errors import ValidationError
from db.files import FILE_KINDS
from db.parsers import MAX_CLIENT_DEADLINE_S, MAX_SEED, number_flag, path_flag, whole_flag
from db.validation import MAX_TICKS
from db.validation import symbol as valid_symbol
from workers.base import main
from workers.csvfiles import CsvFeed, CsvFormatError, file_digest
from workers.feeds import MAX_RATE_HZ, MIN_RATE_HZ, SimFeed, last_mids, parse_speed, sim_symbols
from workers.tick_ingestor import STOP_BUDGET_S, TickIngestor

EXIT_BAD_ROW = 1
#: The simulated market's default pace: ticks per second per symbol.
SIM_RATE_PER_SYMBOL = 10.0
#: ``--count``: a trillion ticks, three thousand years of the simulated market at its default rate.
MAX_COUNT = 10**12
#: ``--memory-limit``: ticks held while the disk refuses the spool (a tick is about 200 bytes held).
MAX_HELD = 10_000_000
#: ``--deadline``'s least, as ``TICKSTACK_CLIENT_DEADLINE``'s (db.config): shorter, no batch was ever
#: answered in time (1e-300 spooled every tick, and the replay of the spool timed out likewise).
MIN_DEADLINE_S = 0.1
log = logging.getLogger("tickstack.ticks")

def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--feed", choices=["sim", "csv"], default="sim")
    parser.add_argument("--lead", action="store_true",
                        help="run the feed only while this process leads the database's ticks, standing by "
                             "meanwhile (the ticks watcher: one simulated market per database, whatever the hosts; "
                             "a standby takes over within seconds of the leader's end)")
    parser.add_argument("--symbols", default=None, help=f"sim: comma-separated symbols (default {SIM_SYMBOLS})")
    parser.add_argument("--rate", type=number_flag(MIN_RATE_HZ, MAX_RATE_HZ), default=None,
                        help=f"sim: ticks per second over all symbols, {MIN_RATE_HZ:g} to {MAX_RATE_HZ:,.0f} (default: "
                             f"{SIM_RATE_PER_SYMBOL:g} per symbol, a tick about every 100 ms for each)")
    parser.add_argument("--seed", type=whole_flag(0, MAX_SEED), default=None,
                        help="sim: random seed (repeatable runs)")
    parser.add_argument("--count", type=whole_flag(0, MAX_COUNT), default=None,
                        help="sim: stop after this many ticks")
    parser.add_argument("--vol-scale", type=number_flag(0.0, 1000.0, above=True), default=None,
                        help="sim: volatility multiplier; 1 is realistic (BTCUSD ~60,000 with 2 decimals, 60 %% a "
                             "year; EURUSD ~1.08 with 5 decimals, 7 %% a year; spreads per symbol), more for a "
                             "livelier demo (default 1). A restarted feed continues from each symbol's last stored "
                             "price")
    parser.add_argument("--file", type=lambda text: Path(path_flag(text)), help="csv: the tick or OHLCV file")
    parser.add_argument("--symbol", help="csv: the symbol (required for bar files)")
    parser.add_argument("--timeframe", help="csv: bar interval (default: inferred from the file)")
    parser.add_argument("--speed", default=None, help="csv: 'max' (the default) or real time x k (e.g. 1, 10)")
    parser.add_argument("--batch", type=whole_flag(1, MAX_TICKS), default=1000,
                        help=f"ticks per writer request (1..{MAX_TICKS})")
    parser.add_argument("--deadline", type=number_flag(MIN_DEADLINE_S, MAX_CLIENT_DEADLINE_S), default=15.0,
                        help="seconds a batch waits for the writer before it is spooled to disk; at a stop "
                             f"(SIGTERM, Ctrl-C) what is unanswered is spooled within {STOP_BUDGET_S:g} s, whatever "
                             "this says")
    parser.add_argument("--memory-limit", type=whole_flag(1, MAX_HELD), default=200_000,
                        help="ticks held in memory while the disk refuses the spool (full); beyond it the feed "
                             "pauses until the writer or the disk takes them")


#: Each feed's own flags (their ``argparse`` dests): given to the other feed, they are refused, not
#: ignored (``--file ticks.csv`` without ``--feed csv`` ran the simulated market; fault hunt, round 38).
FEED_FLAGS = {"sim": ("symbols", "rate", "seed", "count", "vol_scale"), "csv": ("file", "symbol", "timeframe", "speed")}
SIM_SYMBOLS = "BTCUSD,EURUSD"


def _check_feed_flags(args: argparse.Namespace) -> None:
    """Refuse the other feed's flags (:data:`FEED_FLAGS`), naming them and the feed they are for."""
    other = "csv" if args.feed == "sim" else "sim"
    given = [f"--{dest.replace('_', '-')}" for dest in FEED_FLAGS[other] if getattr(args, dest) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --feed {other}, and this run "
                         f"is --feed {args.feed}{' (the default)' if args.feed == 'sim' else ''}: add --feed {other}, "
                         f"or leave {'it' if len(given) == 1 else 'them'} out")


def _make(settings: Settings, args: argparse.Namespace) -> TickIngestor:
    _check_feed_flags(args)
    if args.feed == "sim":
        symbols = sim_symbols(SIM_SYMBOLS if args.symbols is None else args.symbols)
        rate = SIM_RATE_PER_SYMBOL * len(symbols) if args.rate is None else args.rate
        vol_scale = 1.0 if args.vol_scale is None else args.vol_scale

        def opening() -> tuple[Iterator[tuple[int, dict[str, Any]]], str, int]:
            mids = last_mids(settings, symbols)
            start_ts = int(time.time() * 1000)
            feed = SimFeed(symbols, seed=args.seed, start_ts=start_ts, rate_hz=rate, vol_scale=vol_scale,
                           start_mids=mids)
            ticks: Iterator[dict[str, Any]] = iter(feed)
            if args.count is not None:
                ticks = itertools.islice(ticks, args.count)
            # Unique across hosts and runs. In real time from the feed's start: each tick is sent when
            # its ts is due, the first one too (it was sent at once, dated by the feed's first random
            # wait: at a low rate, years ahead).
            return enumerate(ticks), f"sim-{settings.host[:40]}-{start_ts}", start_ts

        return TickIngestor(settings, iter(()), "sim", until_idle=args.until_idle or args.count is not None,
                            batch=args.batch, deadline=args.deadline, memory_limit=args.memory_limit,
                            opening=opening, lead=args.lead)
    if args.lead:
        raise ValueError("--lead is for the simulated feed (--feed sim): a CSV replay runs where it is asked to")
    if args.file is None:
        raise ValueError("--feed csv needs --file PATH")
    try:
        kind = FILE_KINDS.get(stat.S_IFMT(args.file.stat().st_mode))
    except FileNotFoundError:
        raise ValueError(f"--file {args.file}: no such file") from None
    except OSError as e:
        raise ValueError(f"--file {args.file}: {e.strerror or e}") from None
    if kind is not None:
        raise ValueError(f"--file {args.file}: is {kind}, not a CSV file")
    if args.symbol is not None:
        try:
            valid_symbol("--symbol", args.symbol)
        except ValidationError as e:
            raise ValueError(f"{e}; e.g. EURUSD") from None
    speed = parse_speed("max" if args.speed is None else args.speed)
    try:
        feed = CsvFeed(args.file, args.symbol, args.timeframe)
    except CsvFormatError as e:
        raise ValueError(f"{args.file}: {e}") from None
    if feed.timeframe is not None:
        how = "--timeframe" if args.timeframe else "inferred from the file; --timeframe to say otherwise"
        log.info("ticks: %s: %s bars of %s (%s)", args.file, feed.timeframe, feed.symbol, how)
    # Of the bytes the replay reads (a tick file's size when first looked at), not of what was added since.
    source = f"csv-{args.symbol or 'file'}-{file_digest(args.file, feed.size)}"
    # Bars become 4 ticks each: seq = line * 4 + position keeps them unique.
    return TickIngestor(settings, iter(feed), source, until_idle=True, batch=args.batch, deadline=args.deadline,
                        seq_per_line=4, memory_limit=args.memory_limit, speed=speed)


def run(argv: list[str] | None = None) -> int:
    holder: dict[str, TickIngestor] = {}

    def make(settings: Settings, args: argparse.Namespace) -> TickIngestor:
        # Its spool is where what the writer does not take goes: a folder that cannot be made is a bad
        # TICKSTACK_HOME, said in one line now (it was a traceback from the spool, once serving).
        ensure_home(settings)
        holder["w"] = _make(settings, args)
        return holder["w"]

    code = main(TickIngestor, argv, _add_arguments, make)
    ingestor = holder.get("w")
    if code == 0 and ingestor is not None:
        if ingestor.bad_row is not None:
            return EXIT_BAD_ROW
        if ingestor.stopped_early:  # said here: a standby stopped before it led never ran its teardown
            ingestor.log.warning(ingestor.stopped_early_words())
        if ingestor.failed or ingestor.lost or (ingestor.until_idle and ingestor.spooled) or ingestor.stopped_early:
            return 1
    return code


if __name__ == "__main__":
    raise SystemExit(run())
