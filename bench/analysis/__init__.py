"""``python -m bench analysis``: does the analysis worker keep up with ingest?

Two scenarios, each on a fresh ``TICKSTACK_HOME`` with a real writer (``bench.writer_run.running_writer``),
and ``python -m workers.analysis --until-idle`` run as its own process, timed from start to exit
(start-up included, as an operator would see it):

``dense``
    ``--ticks`` ticks (default 1,000,000) round-robin over ``--symbols`` symbols (default 4), 25 ms
    apart (each symbol ticks every 100 ms: hundreds of ticks per 1m bar), sent through the writer as
    pipelined ``insert_ticks`` in columns form (the ``writer-batched`` scenario of ``bench
    contention``): ingest rows/s. Then the analysis worker catches up on all of them: ticks/s.
    Target: ``ratios.analysis_over_ingest`` (analysis ticks/s / ingest rows/s) >= 0.5.
``hourly``
    ``--bars`` hourly OHLCV bars (default 5,000; ``testkit.helpers.write_bar_csv``) replayed with
    ``python -m workers.ticks --feed csv --speed max`` (4 ticks per bar: 20,000 ticks), timed; then
    the analysis worker, timed. Few ticks per bar, so this is the per-bar cost: 1m, 5m, 1h and 1d bars
    with four indicators each, about 45,000 bars and 180,000 values. Target:
    ``ratios.analysis_over_replay_time`` (analysis seconds / replay seconds) <= 1. The 1h bars stored
    are checked against the file, exactly. Also timed, before the replay: the worker with nothing to
    do (``startup``: its imports, connections and exit, the floor of its time), and, for the replay
    and the analysis, the writer's CPU seconds over the same span (``writer_cpu_s``).

Each scenario runs ``--repeat`` times (default 3), interleaved; the ratios use the median of the runs
(each run's figures are in the JSON). Benchmarks are not tests: nothing here fails on a time.
"""
from __future__ import annotations

from bench.analysis.cli import build_parser, main

__all__ = ["build_parser", "main"]
