"""The nine SQLite scenarios of ``python -m bench contention``, each on a fresh
database, and which of them ``--repeat`` runs again."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import (
    MP_CONTEXT,
    count_rows,
    create_schema,
    fresh_home,
    latency_summary,
    merged_errors,
    run_group,
)
from bench.contention import bare_writer
from bench.contention.procs import (
    SEED_BUSY_TIMEOUT_S,
    raw_inserter,
    raw_single_inserter,
    sqlite_producer,
    writer_batched_producer,
    writer_pipelined_producer,
    writer_single_producer,
)
from bench.writer_run import running_writer
from db.config import load_settings
from db.statements import BULK_ROWS

SCENARIO_HELP = {
    "seed": "--procs processes: BEGIN; read; insert tick + audit row; COMMIT (direct sqlite3, as the users did)",
    "immediate": "the same with BEGIN IMMEDIATE",
    "writer-single": "--procs producers: one acknowledged single-row op per call through the writer",
    "writer-pipelined": "the same ops, each acknowledged, with --pipeline-window of them in flight per producer",
    "bare-single": "writer-single's producers against a bare writer: one thread, ZeroMQ, group commit, no promises",
    "bare-recorded": "the same bare writer keeping one promise: the record of applied requests (retries safe)",
    "raw-single": "the same ops in one process, one row per transaction, straight into sqlite3 (the ceiling)",
    "writer-batched": "--rows ticks through the writer: pipelined insert_ticks in columns form",
    "raw": "the same rows straight into one sqlite3 connection, in the writer's statements (the ceiling)",
    "raw-row": "the same rows straight into sqlite3, one row per INSERT statement (a plain executemany)",
}
SCENARIOS = tuple(SCENARIO_HELP)
#: Commit after this many batches in the raw scenario's two variants.
RAW_TXN_VARIANTS = (1, 16)


def combine(name: str, procs: int, start: float, results: list[dict[str, Any]], *,
             timed_from_first_op: bool = False) -> dict[str, Any]:
    """Add up the workers' results of one scenario."""
    begin = min(r["first"] for r in results) if timed_from_first_op else start
    elapsed = max(r["last"] for r in results) - begin
    errors = merged_errors(r["errors"] for r in results)
    ops = sum(r["ops"] for r in results)
    rows = sum(r["rows"] for r in results)
    return {
        "scenario": name, "procs": procs, "ops": ops, "rows": rows, "elapsed_s": round(elapsed, 4),
        "ops_per_s": round(ops / elapsed, 1) if elapsed > 0 else None,
        "rows_per_s": round(rows / elapsed, 1) if elapsed > 0 else None,
        "errors": sum(errors.values()), "errors_by_message": dict(errors.most_common()),
        "latency": latency_summary([x for r in results for x in r["latencies"]]),
        "per_process_ops": [r["ops"] for r in results],
    }


def plan_rows(rows: int, producers: int) -> list[tuple[str, int, int]]:
    """Split ``rows`` among producers: (source, first seq, rows) each."""
    share, extra = divmod(rows, producers)
    return [(f"bench-batch-{i}", 0, share + (1 if i < extra else 0)) for i in range(producers)]


def _synchronous(env: dict[str, str]) -> str:
    return load_settings(env).synchronous


def run_sqlite(opts: argparse.Namespace, begin: str) -> dict[str, Any]:
    name = "seed" if begin == "deferred" else "immediate"
    with fresh_home() as (_home, env):
        db_path = create_schema(env)
        sync = _synchronous(env)
        args = [(str(db_path), opts.seconds, begin, sync) for _ in range(opts.procs)]
        start, results = run_group(sqlite_producer, args, run_timeout=opts.seconds + SEED_BUSY_TIMEOUT_S + 60)
        out = combine(name, opts.procs, start, results)
        out["notes"] = f"direct sqlite3, BEGIN {begin.upper()}, WAL, busy timeout 60 s, synchronous={sync}"
        out["stored_ticks"] = count_rows(db_path, "ticks")
    return out


def _small_writes_through_writer(opts: argparse.Namespace, name: str, producer: Callable[..., dict[str, Any]],
                                 extra: tuple, notes: str) -> dict[str, Any]:
    """``--procs`` processes of ``producer`` (its arguments: the env, ``--seconds``, then ``extra``)
    against a writer on a fresh database; a tick stored that was not acknowledged, or acknowledged and
    not stored, is an error."""
    with fresh_home() as (_home, env), running_writer(env) as writer:
        args = [(env, opts.seconds, *extra) for _ in range(opts.procs)]
        start, results = run_group(producer, args, run_timeout=opts.seconds + 180, on_start=writer.sampler.mark_start)
        writer.finish_measuring()
        out = combine(name, opts.procs, start, results)
        out["notes"] = notes
        out["producer_cpu_s"] = [round(r["cpu_s"], 3) for r in results]
        out["stored_ticks"] = stored_ticks(env)
        check_stored(out, out["rows"])
    out["writer"] = writer.summary()
    return out


def run_writer_single(opts: argparse.Namespace) -> dict[str, Any]:
    return _small_writes_through_writer(opts, "writer-single", writer_single_producer, (),
                                        "WriterClient.call: insert_ticks (1 tick) and audit, alternately")


def run_writer_pipelined(opts: argparse.Namespace) -> dict[str, Any]:
    return _small_writes_through_writer(
        opts, "writer-pipelined", writer_pipelined_producer, (opts.pipeline_window,),
        f"WriterClient.pipeline(window={opts.pipeline_window}): insert_ticks (1 tick) and audit, alternately, "
        "each acknowledged after its commit")


@contextmanager
def running_bare_writer(env: dict[str, str], record: bool = False) -> Iterator[dict[str, Any]]:
    """:mod:`bench.contention.bare_writer` serving the home of ``env`` (its schema made first) in a
    process of its own (``record``: with the record of applied requests); yields a dict that holds
    its counters once it has stopped."""
    db_path = create_schema(env)
    ready, stop, results = MP_CONTEXT.Event(), MP_CONTEXT.Event(), MP_CONTEXT.Queue()
    proc = MP_CONTEXT.Process(target=bare_writer.serve, args=(env, str(db_path), ready, stop, results, record),
                              name="bench-bare-writer", daemon=True)
    proc.start()
    summary: dict[str, Any] = {}
    try:
        if not ready.wait(60):
            raise RuntimeError("the bare writer did not bind its socket within 60 s")
        yield summary
        stop.set()
        summary.update(results.get(timeout=30))
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():  # only when it failed: the process object's own pid
            proc.terminate()
            proc.join(5)
        results.close()


def run_bare_single(opts: argparse.Namespace, record: bool = False) -> dict[str, Any]:
    """writer-single's producers, unchanged, against :mod:`bench.contention.bare_writer` (``record``:
    bare-recorded, with the record of applied requests)."""
    name = "bare-recorded" if record else "bare-single"
    with fresh_home() as (_home, env):
        with running_bare_writer(env, record) as writer:
            args = [(env, opts.seconds) for _ in range(opts.procs)]
            start, results = run_group(writer_single_producer, args, run_timeout=opts.seconds + 180)
        out = combine(name, opts.procs, start, results)
        out["notes"] = ("writer-single's producers (WriterClient.call) against one thread: ZeroMQ ROUTER, msgpack, "
                        "the ops' INSERTs, one commit for every request waiting; no validation, "
                        + ("the record of applied requests (one executemany a batch), " if record else
                           "no record of applied requests, ") + "no budgets")
        out["producer_cpu_s"] = [round(r["cpu_s"], 3) for r in results]
        out["stored_ticks"] = stored_ticks(env)
        check_stored(out, out["rows"])
        if record:  # a record for each request it applied
            out["recorded"] = count_rows(load_settings(env).database_path, "applied_requests")
    out["writer"] = writer
    return out


def run_raw_single(opts: argparse.Namespace) -> dict[str, Any]:
    with fresh_home() as (_home, env):
        db_path = create_schema(env)
        start, results = run_group(raw_single_inserter, [(env, str(db_path), opts.seconds)],
                                   run_timeout=opts.seconds + 120)
        out = combine("raw-single", 1, start, results)
        out["pragmas"] = pragmas = results[0]["pragmas"]
        out["notes"] = (f"one sqlite3 connection with the write engine's pragmas (synchronous="
                        f"{pragmas['synchronous']}, wal_autocheckpoint={pragmas['wal_autocheckpoint']}): "
                        "BEGIN IMMEDIATE, one tick or one audit row, COMMIT")
        out["stored_ticks"] = count_rows(db_path, "ticks")
    return out


def run_writer_batched(opts: argparse.Namespace) -> dict[str, Any]:
    plan = plan_rows(opts.rows, opts.batch_producers)
    with fresh_home() as (_home, env):
        with running_writer(env) as writer:
            args = [(env, n, first_seq, opts.batch, opts.window) for _source, first_seq, n in plan]
            start, results = run_group(writer_batched_producer, args, run_timeout=600,
                                       on_start=writer.sampler.mark_start)
            writer.finish_measuring()
            out = combine("writer-batched", opts.batch_producers, start, results, timed_from_first_op=True)
            out["producer_cpu_s"] = [round(r["cpu_s"], 3) for r in results]
        out["stored_ticks"] = stored_ticks(env)
    out["writer"] = writer.summary()
    out["notes"] = f"pipeline window {opts.window}, columns form, batches of {opts.batch}"
    check_stored(out, opts.rows)
    return out


def run_raw(opts: argparse.Namespace, statement: str = "writer") -> dict[str, Any]:
    """``raw`` (``statement="writer"``) or ``raw-row`` (``"row"``): see :func:`raw_inserter`."""
    name = "raw" if statement == "writer" else "raw-row"
    plan = plan_rows(opts.rows, opts.batch_producers)
    with fresh_home() as (home, env):
        db_paths = []
        for txn_batches in RAW_TXN_VARIANTS:  # one fresh database per variant, same schema
            variant_env = {**env, "DATABASE_URL": f"sqlite:///{home / f'raw-{txn_batches}.db'}"}
            db_paths.append(str(create_schema(variant_env)))
        args = (env, db_paths, plan, opts.batch, list(RAW_TXN_VARIANTS), statement)
        start, (results,) = run_group(raw_inserter, [args], run_timeout=600)
        variants = []
        for db_path, result in zip(db_paths, results, strict=True):
            out = combine(name, 1, start, [result], timed_from_first_op=True)
            out["stored_ticks"] = count_rows(Path(db_path), "ticks")
            out["txn_batches"] = n = result["txn_batches"]
            out["sql"] = result["sql"]
            out["pragmas"] = result["pragmas"]
            out["notes"] = (f"one sqlite3 connection with the write engine's pragmas "
                            f"(synchronous={result['pragmas']['synchronous']}), executemany per batch of "
                            f"{opts.batch}, " + ("one row per statement" if statement == "row" else
                                                  f"{BULK_ROWS} rows per statement as the writer runs them")
                            + f", commit every {n} batch{'es' if n > 1 else ''}")
            check_stored(out, opts.rows)
            variants.append(out)
    best = dict(max(variants, key=lambda v: v["rows_per_s"] or 0))
    best["variants"] = [{k: v[k] for k in ("txn_batches", "rows_per_s", "elapsed_s", "latency")} for v in variants]
    return best


def stored_ticks(env: dict[str, str]) -> int:
    """Ticks in the scenario's database, SQLite's file or a PostgreSQL database."""
    path = load_settings(env).database_path
    if path is not None:
        return count_rows(path, "ticks")
    from bench.contention.postgres import count_ticks

    return count_ticks(env)


def check_stored(out: dict[str, Any], expected: int) -> None:
    """A benchmark that lost rows measured nothing: say so as an error."""
    if out["stored_ticks"] != expected or out["rows"] != expected:
        message = (f"stored {out['stored_ticks']} ticks and acknowledged {out['rows']}, "
                   f"expected {expected}")
        out["errors_by_message"][message] = 1
        out["errors"] += 1


#: Scenarios --repeat runs again, interleaved, in pairs each measured against the other one run beside
#: it (immediate and writer-single, writer-batched and raw: the ``_median`` ratios); the table keeps
#: each one's best run.
REPEATABLE = ("immediate", "writer-single", "bare-single", "bare-recorded", "writer-batched", "raw")
#: The scenarios of small writes, whose runs are compared by ops/s.
_BY_OPS = frozenset(("immediate", "writer-single", "bare-single", "bare-recorded"))


def compared_by(name: str) -> str:
    """The rate a scenario's runs are compared by (the best one kept, the pairs' medians): ops/s
    (``ops_per_s``) for small writes, rows/s (``rows_per_s``) for bulk ingest."""
    return "ops_per_s" if name in _BY_OPS else "rows_per_s"


def run_figures(run: dict[str, Any], repeat: int = 0) -> dict[str, Any]:
    """What is kept of each run of a repeated scenario: the repeat it ran in (for pairing), its rates,
    and its errors and latencies, which the checks take from every run
    (:func:`bench.contention.report.worst`)."""
    return {"repeat": run.get("repeat", repeat), "ops_per_s": run["ops_per_s"], "rows_per_s": run["rows_per_s"],
            "elapsed_s": run["elapsed_s"], "errors": run["errors"],
            **{k: (run.get("latency") or {}).get(k) for k in ("p99_ms", "max_ms")}}


def best_run(name: str, runs: list[dict[str, Any]], failures: list[str]) -> dict[str, Any]:
    """The run with the highest :func:`compared_by` rate, with every run's :func:`run_figures` under
    ``runs`` when there were several."""
    if not runs:
        return {"scenario": name, "failed": failures[-1] if failures else "did not run"}
    rate = compared_by(name)
    best = dict(max(runs, key=lambda r: r[rate] or 0))
    if len(runs) > 1:
        best["runs"] = [run_figures(r, i) for i, r in enumerate(runs)]
    if failures:
        best["failed_runs"] = failures
    return best


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "seed": lambda o: run_sqlite(o, "deferred"),
    "immediate": lambda o: run_sqlite(o, "immediate"),
    "writer-single": run_writer_single,
    "writer-pipelined": run_writer_pipelined,
    "bare-single": run_bare_single,
    "bare-recorded": lambda o: run_bare_single(o, record=True),
    "raw-single": run_raw_single,
    "writer-batched": run_writer_batched,
    "raw": run_raw,
    "raw-row": lambda o: run_raw(o, "row"),
}
