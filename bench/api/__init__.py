"""``python -m bench api``: the REST API under real gunicorn, read while the writer ingests.

The question: does reading through the API stay fast while the single writer
ingests at full speed? And do connections that never finish a request stop
it? Readers (gunicorn workers on read-only engines) and the writer share one
SQLite file in WAL mode, and on a small machine they also share the CPU.
This benchmark serves the API exactly as production does (circus.ini's
``api`` command line, read by ``testkit.gunicorn.watcher_command``: 2
workers of ``webapp.gunicorn_worker.HeadersFirstWorker``, 8 threads each),
or with another worker class to compare (``--worker-class sync,gthread:8,
tornado,...``: each its own gunicorn, every scenario run against each), in
front of the real writer (``testkit.writer.spawn``), on one fresh
``TICKSTACK_HOME`` made by ``bench.common.fresh_home``, and measures from
outside over HTTP.

Setup (not measured)
    The writer is started; ``--seed-ticks`` ticks of BTCUSD and ETHUSD, one
    per symbol per second (so there are enough 1m bars to read: 200k ticks
    give ~1,660 per symbol), are sent through the writer's pipeline (columns
    form, batches of 5000, window 16); then ``python -m workers.analysis
    --until-idle`` runs once and stores the bars and indicators. gunicorn
    serves ``webapp:create_app('api')`` on a socket the benchmark binds to
    127.0.0.1 on a free port and hands over as ``fd://`` (as circus does, so
    no other process can take the port in between), with a known
    ``TICKSTACK_API_TOKEN``. The benchmark waits for ``/api/health`` to
    answer 200 and for every worker to finish loading the app, and checks
    that both read routes return data.

``idle``
    ``--clients`` client processes, each with one ``http.client`` connection
    (HTTP/1.1, keep-alive requested), alternate ``GET
    /api/ticks?symbol=BTCUSD&limit=100`` and ``GET
    /api/bars?symbol=BTCUSD&timeframe=1m`` as fast as answers come, for
    ``--seconds``. Latency is per request, from sending it to the last byte
    of the answer. Processes rather than threads, so the clients' own GIL
    does not add to the latency measured.
``under-load``
    The same read load while a separate producer process runs full batched
    ingest through the writer: ``insert_ticks`` in columns form, batches of
    ``--ingest-batch`` (5000) with ``--window`` (16) in flight
    (``WriterClient.pipeline``), new ticks of BTCUSD and ETHUSD that are
    newer than the seed (so ``/api/ticks`` reads what is being written), each
    run under its own ``source``. The producer starts :data:`INGEST_LEAD` s
    before the readers and stops after them, so the whole read window is one
    of steady ingest; the ingest rate reported counts the rows acknowledged
    within the read window. Target: each read route's p99 under load is at
    most :data:`P99_RATIO_TARGET` times its idle p99.
``slow-clients``
    The same read load while one process holds ``--slow-clients`` (50)
    connections that never finish a request: in turn, one sends nothing, one
    half a request line, one a request line and half a header, then nothing
    more (what a stalled or malicious client leaves behind; no authentication
    is needed). One the server closes is opened again at once, so the pressure
    lasts the whole window. Held from :data:`~bench.api.data.SLOW_LEAD` s
    before the readers start until :data:`~bench.api.data.READ_GRACE` s after
    they stop; a read still unanswered by then counts as an error. Targets: no
    failed read, and each read route's p99 at most
    :data:`~bench.api.data.SLOW_P99_RATIO_TARGET` times its idle p99. Why the
    worker class matters here: :mod:`webapp.gunicorn_worker`.
``write``
    ``--clients`` processes ``POST /api/ticks`` with ``Authorization: Bearer``
    for ``--seconds``, each request ``--post-batch`` ticks as a JSON list of
    tick objects (what an HTTP client sends), each client its own ``source``
    and increasing ``seq`` (so every tick is unique). Afterwards the rows of
    each source are counted with a read-only ``sqlite3`` connection: the
    stored ticks must equal the acknowledged ones (and the seed's and the
    producer's rows are checked the same way).

``--repeat N`` runs idle, under-load and slow-clients N times, interleaved (so a slow
drift of the machine hits both alike); the ratio then compares all idle
latencies with all under-load ones. ``--writer-nice N`` runs the writer (all
its threads) at nice N: an experiment in giving the readers CPU priority.

Why the ratio can miss, and how a run tells the causes apart. On 2 cores,
producer, writer, gunicorn and clients contend for the CPU, and the clients
are closed-loop (each sends its next request when the last is answered), so
even ``idle`` keeps both cores busy: under load the writer's CPU share comes
out of the readers'. For every measured window the benchmark records the
machine's CPU time by kind (steal included: on a VM the host can take CPUs
away), Linux CPU pressure (PSI), the CPU time and run-queue wait (the
kernel's ``schedstat``: runnable, but waiting for a CPU) of the writer and
the gunicorn workers, the CPU time other processes on the machine used (a
window where more than :data:`NOISY_PCT` % of the machine was not ours is
flagged), the writer's counters (commits, requests resent after a client
timeout, busy replies, lock errors) and the WAL's size. Per request served,
the gunicorn workers' time splits into on-CPU, waiting for a CPU, and
neither (blocked: network, SQLite's busy handler, disk; or idle). On-CPU
time per request that stays flat while run-queue wait grows is CPU
contention; on-CPU or blocked time that grows points at SQLite itself (a
longer WAL to search, lock waits, checkpoints).
"""
from __future__ import annotations

# The parts, in the order a run uses them: bench.api.data (routes, sources,
# ticks), .load (the client and producer processes), .server (gunicorn),
# .window (the machine during a measured window), .scenarios (setup and the
# four scenarios), .report (checks and the printed table), .cli (options and
# the run itself).
from bench.api.cli import build_parser, main, run

__all__ = ["build_parser", "main", "run"]
