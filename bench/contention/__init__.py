"""``python -m bench contention``: many writers on one SQLite file, measured.

The question: users ran several processes that each wrote the shared SQLite
file directly (WAL, 60 s busy timeout) and got ``database is locked`` and
multi-second stalls. tickstack's answer is one writer process that every
other process sends named ops to. This benchmark measures the old way, the
obvious patch, and the writer, each on a fresh temporary database with the
project's own schema (``db.schema.migrate``), all at the same durability
(``synchronous`` from the settings, NORMAL by default, as the writer uses):

``seed``
    ``--procs`` processes each loop for ``--seconds``: in one *deferred*
    transaction (``BEGIN``), read (``SELECT count(*), max(bid) FROM ticks``),
    insert a tick, insert an audit row, commit; directly with ``sqlite3``,
    WAL, busy timeout 60 s. This is the users' setup
    (``shared/reference/seed_contention.py``). A deferred transaction that
    read and then tries to write fails at once with "database is locked" when
    another process committed in between (SQLite skips the busy handler,
    since waiting could deadlock), so errors show up however long the
    timeout. Every error is counted by its message.
``immediate``
    The same with ``BEGIN IMMEDIATE``: the write lock is taken first, so
    nothing fails, but waiting writers sit in SQLite's busy handler, which
    polls with growing sleeps (up to 100 ms) and serves them unfairly: the
    tail latency (max) is the cost of the patch.
``writer-single``
    ``--procs`` producer processes send single-row acknowledged writes to
    the writer (``WriterClient.call``), alternating ``insert_ticks`` with one
    tick (each producer its own ``source``, so ``(source, seq)`` is unique)
    and ``audit``, for ``--seconds``. Latency is measured in the producer,
    per call, from before sending to the committed answer. Targets: no error
    at all, a max latency at most 1/20 of ``immediate``'s, at least 4 times
    ``immediate``'s ops/s, and a p99 of at most 5 ms.
``writer-pipelined``
    The ops of ``writer-single``, each still acknowledged only after its commit, from the same
    ``--procs`` producers, with up to ``--pipeline-window`` (16) of them in flight per producer
    (``WriterClient.pipeline``): what the writer commits of small writes when producers do not
    wait for one answer before sending the next, as a feed handler can. Latency is per op, from
    its first send to its committed answer. No target of its own:
    ``ratios.writer_pipelined_over_immediate`` puts it beside writer-single's, whose producers
    each wait for every answer (their rate is the round trip's, not the writer's).
``bare-single``
    writer-single's producers, unchanged, against :mod:`bench.contention.bare_writer`: one thread,
    one ROUTER socket, msgpack, the ops' INSERTs, one commit for every request waiting, and none of
    the writer's promises (no validation, no record of applied requests, no budgets). No target:
    the floor of the transport on this machine. ``ratios.bare_single_over_immediate`` is as far as
    any writer that keeps the promises could go against ``immediate``;
    ``ratios.writer_single_over_bare_single`` is what keeping them costs.
``bare-recorded``
    The same bare writer keeping one promise more, the one a safe retry needs: each request's
    (client id, seq), packed result and digest recorded in ``applied_requests`` in its batch's
    transaction (one ``executemany`` a batch, as the writer records them), a retry answered from
    memory. No target: ``ratios.bare_recorded_over_immediate`` is as far as a writer whose retries
    are safe across a restart can go here, and ``ratios.writer_single_over_bare_recorded`` is what
    the rest of the promises (validation, budgets, a commit thread, the look-ups) cost.
``raw-single``
    The same small writes with no writer and no contention: one process, one
    ``sqlite3`` connection from the writer's own ``make_write_engine`` (its
    pragmas), ``BEGIN IMMEDIATE``, one tick or one audit row (alternately, with
    the statements the ops compile), ``COMMIT``, for ``--seconds``: what
    SQLite commits one row at a time on this disk. Goal: writer-single reaches
    a quarter of it.
``writer-batched``
    Bulk ingest through the writer: ``--batch-producers`` processes (default
    1) send ``--rows`` ticks, generated before the clock starts, as
    ``insert_ticks`` requests in the compact *columns* form, ``--batch`` rows
    each, with ``--window`` requests in flight (``WriterClient.pipeline``).
    rows/s = rows / (first submit .. last acknowledgement).
``raw``
    The ceiling for the same work: one process, one ``sqlite3`` connection
    opened by the writer's own ``make_write_engine`` (so exactly its pragmas:
    WAL, same ``synchronous``, ...), inserting the same rows (pre-built as
    columns before the clock starts) in the statements the writer runs for
    ``insert_ticks``: the statement the op compiles (``INSERT ... ON CONFLICT
    (source, seq) DO NOTHING``) with 100 rows of ``VALUES`` each, through the
    writer's own :func:`db.statements.executemany_columns`, per batch, timed
    around the inserts and commits only. It runs twice, committing after every
    batch and after every 16 batches, each on a fresh database, and reports the
    faster, saying which (both are in the JSON; neither wins reliably on this
    machine). Target: writer-batched reaches at least 0.9 of it.
``raw-row``
    The same as ``raw`` with the rows pre-built as tuples and ``executemany`` of
    the one-row statement, a row per statement: what a program writing straight
    to SQLite would do, and what the writer did until it ran 100 rows a
    statement. It runs once (its two commit variants, the faster kept);
    ``ratios.batched_over_raw_row`` (no target) is writer-batched's best run
    over it.

The compared runs (``immediate``, ``writer-single``, ``bare-single`` and ``bare-recorded``; ``writer-batched`` and
``raw``) run ``--repeat`` times (default 3), interleaved; the table keeps the
best run of each (all are in the JSON). ``ratios.batched_over_raw`` and
``ratios.writer_single_over_immediate`` compare the best runs (rows/s, ops/s);
``ratios.batched_over_raw_median`` and
``ratios.writer_single_over_immediate_median`` are the medians, over the
repeats, of each run over the one run right beside it: on a shared 2-core
machine one run of either can be 30 % off. Every other repeat runs the pairs in
the reverse order. The latency and error checks (``writer_single_p99_ms``,
``writer_single_zero_errors``, ``immediate_max_over_writer_max``) take the worst
of every run. ``ratios.writer_single_over_raw_single`` compares writer-single's
best run with raw-single's one run. Every
percentile (the table's, the writer's commit p50/p99) is nearest-rank,
:func:`db.stats.percentile`. The JSON also has the load average before and
after the run (``load_average``): others' work on the machine counts in it.

For the writer scenarios the writer is started with
``testkit.writer.spawn`` on a fresh ``TICKSTACK_HOME``, its RSS is sampled
every 50 ms (peak reported, with the kernel's ``VmHWM`` in the JSON), its own
``stats()`` (commit p50/p99, mean batch) are taken at the end, and it is
stopped with SIGTERM. Worker processes are started with the ``spawn`` method
and wait at a common gate, so the measured window is one of real contention.
"""
from __future__ import annotations

# The parts: bench.contention.procs (the worker processes), .bare_writer
# (bare-single's writer), .scenarios (each scenario's run), .report (ratios,
# checks, the printed table), .cli (options and the run itself).
from bench.contention.cli import build_parser, main

__all__ = ["build_parser", "main"]
