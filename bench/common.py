"""Shared pieces of the benchmarks: throwaway homes, synchronised worker
processes, tick data, latency summaries, the command line's common options,
and the report's formatting. The writer under test is :mod:`bench.writer_run`'s.

Every benchmark runs against a fresh ``TICKSTACK_HOME`` made with
:func:`fresh_home`, never against the user's database: its environment is
:func:`testkit.env.isolated_env`'s, which inherits no ``TICKSTACK_*``,
``WRITER_*`` or ``DATABASE_*`` variable.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import sqlite3
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from db.config import Settings
from db.engine import connect_read_only

# The finite-number flag parsers live in db (``python -m db`` needs one, and db imports nothing
# above it); re-exported here beside the benchmarks' other argparse types.
from db.parsers import number_flag as number_flag
from db.parsers import positive_float as positive_float
from db.parsers import whole_flag as whole_flag
from db.stats import percentile
from testkit.env import isolated_env, new_home

#: Start method for worker processes: never fork a process that has used
#: ZeroMQ or SQLite.
MP_CONTEXT = mp.get_context("spawn")


# --- argparse types ------------------------------------------------------------------

# Bounds of the numeric flags that several benchmarks share, each with its reason (a bound of one
# flag is beside it; a batch of ticks is db's :data:`db.validation.MAX_TICKS`, the most the writer takes
# in one request). Every numeric flag has an upper bound: without one, ``contention --seconds 1e16``
# ran for ever and ``--rows 1e16`` built its ticks in memory until the machine ran out.

#: The longest measured window of a scenario run, in seconds (``--seconds``): ten minutes measure any
#: rate this stack has (the README's runs measure 3 and 5 s); a longer window is a typo.
MAX_WINDOW_S = 600.0
#: The most ticks one run stores (``--rows``, ``--ticks``, ``--seed-ticks``): ten times the README's
#: largest runs. They are built in memory before the run (about 220 MB a million, in each process that
#: sends them).
MAX_RUN_TICKS = 10_000_000
#: Runs of each compared scenario (``--repeat``).
MAX_REPEAT = 20


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated list of names from ``choices``."""

    def check(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names:
            raise argparse.ArgumentTypeError("give at least one name")
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown name {bad[0]!r}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(names))

    return check


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """``--json PATH``, which every benchmark has: the path is checked before a long run."""
    parser.add_argument("--json", type=writable_file, default=None, metavar="PATH",
                        help="also write the results as JSON to PATH")


def benchmark_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A benchmark's parser; its ``epilog`` (the scenarios) is printed as written."""
    return argparse.ArgumentParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   description=description, epilog=epilog)


def writable_file(text: str) -> Path:
    """argparse type: a file path whose folder exists (checked before a long run)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {path.parent} is not writable")
    return path


# --- statistics ----------------------------------------------------------------------


def latency_summary(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """p50, p99 and max of latencies given in seconds, in milliseconds
    (percentiles as everywhere in the stack: :func:`db.stats.percentile`)."""
    values = sorted(seconds)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {"n": len(values), "p50_ms": ms(percentile(values, 0.50)), "p99_ms": ms(percentile(values, 0.99)),
            "max_ms": ms(values[-1] if values else None)}


# --- results ----------------------------------------------------------------------------


def error_key(e: BaseException) -> str:
    """An exception as one short line, to count errors by message."""
    message = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {message[:160]}"


def fmt(value: Any, digits: int = 0) -> str:
    """A number for the printed table: thousands separated, ``-`` for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def merged_errors(counts: Iterable[Mapping[str, int]]) -> Counter[str]:
    """The error counts of several processes (message -> count) added up."""
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return total


def machine_info() -> dict[str, Any]:
    """What a result depends on besides the code: CPUs, Python, SQLite, platform."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "platform": platform.platform()}


def write_json(path: Path, doc: dict[str, Any], **dumps: Any) -> None:
    """Write ``doc`` to the ``--json`` path and say so."""
    path.write_text(json.dumps(doc, indent=2, **dumps) + "\n")
    print(f"\nwrote {path}")


# --- homes, schema ---------------------------------------------------------------------


@contextmanager
def postgres_homes(amcheck: bool = False) -> Iterator[Any]:
    """A throwaway server for the run; every home the harness makes meanwhile gets a database of
    its own on it (:func:`testkit.env.use_database`). With ``amcheck``, each such database has the
    extension and its owner may run ``bt_index_check`` (an integrity verdict needs it)."""
    from testkit.env import use_database
    from testkit.postgres import HomeDatabases, PostgresServer

    server = PostgresServer().start()
    homes = HomeDatabases(server, amcheck=amcheck)
    use_database(homes)
    try:
        yield server
    finally:
        use_database(None)
        server.stop()


@contextmanager
def fresh_home(prefix: str = "ts-") -> Iterator[tuple[Path, dict[str, str]]]:
    """A new, empty ``TICKSTACK_HOME`` and the isolated environment that
    points at it (both from :mod:`testkit.env`); removed afterwards."""
    home = new_home(prefix)
    env = isolated_env(home)
    try:
        yield home, env
    finally:
        shutil.rmtree(home, ignore_errors=True)


def migrate_database(env: dict[str, str]) -> Settings:
    """Create the project's schema as the writer would (``migrate`` in a write
    transaction on the write engine), on SQLite or a server; returns the settings."""
    from db.config import ensure_home, load_settings
    from db.engine import make_write_engine
    from db.schema import migrate

    settings = load_settings(env)
    ensure_home(settings)
    engine = make_write_engine(settings)
    try:
        with engine.connect() as conn, conn.begin():
            migrate(conn)
    finally:
        engine.dispose()
    return settings


def create_schema(env: dict[str, str]) -> Path:
    """:func:`migrate_database` on SQLite; returns the database file."""
    path = migrate_database(env).database_path
    assert path is not None, "create_schema is SQLite's; on a server use migrate_database"
    return path


def count_rows(db_path: Path, table: str) -> int:
    """Rows in ``table``, read with plain sqlite3 after a scenario."""

    con = connect_read_only(db_path)
    try:
        return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        con.close()


# --- tick data ---------------------------------------------------------------------------

SYMBOLS = ("BTCUSD", "ETHUSD", "EURUSD", "GBPUSD", "USDJPY", "XAUUSD", "SPX500", "NDX100")
TS_BASE = 1_700_000_000_000


def tick_batches(rows: int, batch: int, source: str, first_seq: int = 0, symbols: int | None = None,
                 spacing_ms: int = 1) -> list[dict[str, list[Any]]]:
    """``rows`` ticks as column batches of at most ``batch`` rows, in the
    compact form ``insert_ticks`` accepts: round-robin over the first
    ``symbols`` of :data:`SYMBOLS` (all by default), ``spacing_ms`` apart.
    Deterministic, so two scenarios given the same arguments insert exactly
    the same rows."""
    n_symbols = len(SYMBOLS) if symbols is None else symbols
    out = []
    for start in range(first_seq, first_seq + rows, batch):
        idx = range(start, min(start + batch, first_seq + rows))
        bid = [100.0 + (i % 1000) * 0.01 for i in idx]
        out.append({
            "symbol": [SYMBOLS[i % n_symbols] for i in idx],
            "ts": [TS_BASE + i * spacing_ms for i in idx],
            "bid": bid,
            "ask": [b + 0.02 for b in bid],
            "volume": [float(i % 10) for i in idx],
            "source": [source] * len(idx),
            "seq": list(idx),
        })
    return out


# --- synchronised worker processes ---------------------------------------------------------


class Gate:
    """Handed to every worker of a group: ``wait()`` reports the worker ready,
    blocks until all are, and returns the common start time (a
    ``time.monotonic()`` value, system-wide on Linux) a moment in the future,
    so the measured window is one of real contention."""

    def __init__(self, index: int, messages: Any, go: Any, start_at: Any) -> None:
        self.index = index
        self._messages = messages
        self._go = go
        self._start_at = start_at

    def wait(self, timeout: float = 120.0) -> float:
        self._messages.put(("ready", self.index, None))
        if not self._go.wait(timeout):
            raise TimeoutError("the benchmark never gave the start signal")
        start = self._start_at.value
        sleep_until(start)
        return start


def sleep_until(t: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``t`` (at once if it has)."""
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _worker_entry(fn: Callable[..., Any], index: int, args: tuple, messages: Any, go: Any, start_at: Any) -> None:
    try:
        result = fn(index, *args, gate=Gate(index, messages, go, start_at))
    except BaseException:  # reported to the parent, which fails the scenario
        messages.put(("error", index, traceback.format_exc()))
        return
    messages.put(("done", index, result))


class WorkerFailed(RuntimeError):
    """A benchmark process raised; the message holds its traceback."""


def run_group(fn: Callable[..., Any], args: Sequence[tuple], *, ready_timeout: float = 120.0,
              run_timeout: float = 600.0, lead: float = 0.1,
              on_start: Callable[[], None] | None = None) -> tuple[float, list[Any]]:
    """Run ``fn(index, *args[index], gate=Gate)`` in ``len(args)`` spawned
    processes. Each does its setup, calls ``gate.wait()``, works, and returns
    a picklable result. ``on_start`` is called once all are ready, just
    before they are let go. Returns (start time, results in index order)."""
    messages = MP_CONTEXT.Queue()
    go = MP_CONTEXT.Event()
    start_at = MP_CONTEXT.Value("d", 0.0)
    procs = [MP_CONTEXT.Process(target=_worker_entry, args=(fn, i, a, messages, go, start_at),
                                name=f"bench-{fn.__name__}-{i}", daemon=True)
             for i, a in enumerate(args)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        ready: set[int] = set()
        deadline = time.monotonic() + ready_timeout
        while len(ready) < len(procs):
            kind, index, payload = _next_message(messages, procs, deadline, "to get ready")
            if kind == "error":
                raise WorkerFailed(f"worker {index} failed during setup:\n{payload}")
            if kind == "ready":
                ready.add(index)
            else:  # done without waiting at the gate
                results[index] = payload
        if on_start is not None:
            on_start()
        start_at.value = time.monotonic() + lead
        go.set()
        deadline = time.monotonic() + run_timeout
        while len(results) < len(procs):
            kind, index, payload = _next_message(messages, procs, deadline, "to finish")
            if kind == "error":
                raise WorkerFailed(f"worker {index} failed:\n{payload}")
            if kind == "done":
                results[index] = payload
        for p in procs:
            p.join(10)
        return start_at.value, [results[i] for i in range(len(procs))]
    finally:
        for p in procs:  # only on failure are any still alive
            if p.is_alive():
                p.terminate()
                p.join(5)
        messages.close()


def _next_message(messages: Any, procs: list[Any], deadline: float, what: str) -> tuple[str, int, Any]:
    while True:
        try:
            return messages.get(timeout=0.2)
        except queue.Empty:
            pass
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead:
            raise WorkerFailed(f"{dead[0].name} died with exit code {dead[0].exitcode}")
        if time.monotonic() > deadline:
            raise WorkerFailed(f"workers took too long {what}")
