"""The benchmarks (``python -m bench ...``) run small, each checked for what it reports, never for how
fast: every scenario runs with no error and stores exactly the rows it acknowledged, the ratios and
their targets are in the JSON and the table, and nothing secret is printed or written. ``contention``
runs on the database of the suite's run (SQLite's scenarios, or PostgreSQL's with ``--database
postgresql``); ``api`` and ``analysis`` are SQLite's only (they take no ``--database``). The chaos
benchmark has its own file (tests/test_chaos.py).
"""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from testkit.env import ROOT
from testkit.process import run_to_its_end
from webapp.console.watcher_page import USERINFO_RE
from workers.indicators import SERIES

#: The tests of this module whose promise is the same whatever the database (tests/conftest.py).
DATABASE_INDEPENDENT = pytest.mark.database_independent(
    "the bench's rules on figures and its flags are checked before any benchmark opens a database")

#: bench analysis: runs of each scenario.
REPEAT = 2


def bench(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], str]:
    """``python -m bench NAME ARGS --json``, which must exit 0: the finished process, its JSON and
    that JSON's text (for the checks of what it must not hold)."""
    out = tmp_path / f"{name}.json"
    run = run_to_its_end([sys.executable, "-m", "bench", name, *args, "--json", str(out)], cwd=ROOT, timeout=280)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = out.read_text()
    return run, json.loads(text), text


def passwords_shown(text: str) -> list[str]:
    """URLs' user:password parts in ``text`` that are not hidden as db.engine.display_url hides them
    (``***``), found by the console's own pattern for them."""
    return [m.group(0) for m in USERINFO_RE.finditer(text) if not m.group(0).endswith(":***@")]


# --- contention --------------------------------------------------------------------------------------------------


@DATABASE_INDEPENDENT
def test_the_bench_pairs_runs_of_the_same_repeat_and_checks_every_run() -> None:
    """``bench contention``'s rules on figures as its runs leave them (no process is started): a pair
    is two runs of the same repeat, a repeat in which one side failed is left out, small writes are
    compared by ops/s and bulk ingest by rows/s, and the latency and error checks take the worst run,
    not the one the table keeps; a run that failed fails the error check."""
    from bench.contention.report import evaluate, paired_median, worst
    from bench.contention.scenarios import best_run

    def run(repeat: int, ops: float, rows: float, p99: float, errors: int = 0) -> dict[str, Any]:
        return {"repeat": repeat, "ops_per_s": ops, "rows_per_s": rows, "elapsed_s": 1.0, "errors": errors,
                "latency": {"p99_ms": p99, "max_ms": 2 * p99}}

    single = best_run("writer-single", [run(0, 400, 200, 3.0), run(1, 900, 450, 2.0), run(2, 500, 250, 7.0)], [])
    # immediate's repeat 1 failed: that pair is left out, the others pair by repeat, not by position.
    immediate = best_run("immediate", [run(0, 100, 100, 1.0), run(2, 100, 100, 1.0)], ["Traceback: repeat 1"])
    results = {"writer-single": single, "immediate": immediate}
    assert single["ops_per_s"] == 900 and [r["repeat"] for r in single["runs"]] == [0, 1, 2]
    assert paired_median(results, "writer-single", "immediate") == 4.5  # (400/100 + 500/100) / 2
    assert worst(results, "writer-single", "p99_ms") == 7.0 and worst(results, "writer-single", "max_ms") == 14.0
    ratios, checks = evaluate(results)
    assert ratios["writer_single_over_immediate"] == 9.0 and ratios["writer_single_over_immediate_median"] == 4.5
    assert checks["writer_single_p99_ms"] == {"value": 7.0, "target": "<= 5 ms", "result": "MISS"}
    assert checks["writer_single_zero_errors"]["result"] == "PASS"
    failed = best_run("writer-single", [run(0, 400, 200, 3.0)], ["Traceback: repeat 1"])
    assert evaluate({"writer-single": failed, "immediate": immediate})[1]["writer_single_zero_errors"]["result"] \
        == "MISS"
    bulk = {"writer-batched": best_run("writer-batched", [run(0, 1, 90, 1.0), run(1, 2, 80, 1.0)], []),
            "raw": best_run("raw", [run(0, 1, 100, 1.0), run(1, 1, 100, 1.0)], [])}
    assert bulk["writer-batched"]["rows_per_s"] == 90  # bulk ingest: the best by rows/s, not ops/s
    assert paired_median(bulk, "writer-batched", "raw") == 0.85


@pytest.mark.sqlite_only("tests/test_bench.py::"
                         "test_the_postgresql_contention_benchmark_reports_its_ratios_and_stores_every_acknowledged_row")
def test_the_contention_benchmark_reports_the_ratios_of_issue_10(tmp_path: Path) -> None:
    run, doc, _ = bench(tmp_path, "contention", "--only",
                        "immediate,writer-single,writer-pipelined,bare-single,bare-recorded,raw-single,writer-batched,"
                        "raw,raw-row",
                        "--procs", "2", "--seconds", "0.5", "--pipeline-window", "4", "--rows", "6000",
                        "--batch", "1000", "--repeat", "3")
    assert set(doc["scenarios"]) == {"immediate", "writer-single", "writer-pipelined", "bare-single", "bare-recorded",
                                     "raw-single", "writer-batched", "raw", "raw-row"}
    for key in ("writer_single_over_immediate", "writer_single_over_immediate_median",
                "writer_single_over_raw_single", "batched_over_raw", "batched_over_raw_median",
                "batched_over_raw_row", "writer_pipelined_over_immediate", "bare_single_over_immediate",
                "bare_single_over_immediate_median", "writer_single_over_bare_single",
                "writer_single_over_bare_single_median", "bare_recorded_over_immediate",
                "bare_recorded_over_immediate_median", "writer_single_over_bare_recorded",
                "writer_single_over_bare_recorded_median"):
        assert doc["ratios"][key] is not None and doc["ratios"][key] > 0, (key, doc["ratios"])
    # The compared pairs ran --repeat times each; each median is that of the pairs run side by side
    # (the same repeat); the latency and error checks hold for every run, not only the one kept.
    for name in ("immediate", "writer-single", "bare-single", "bare-recorded", "writer-batched", "raw"):
        assert [r["repeat"] for r in doc["scenarios"][name]["runs"]] == [0, 1, 2], name
    single, immediate = doc["scenarios"]["writer-single"]["runs"], doc["scenarios"]["immediate"]["runs"]
    pairs = sorted(a["ops_per_s"] / b["ops_per_s"] for a, b in zip(single, immediate, strict=True))
    assert doc["ratios"]["writer_single_over_immediate_median"] == round(pairs[1], 3)
    assert doc["checks"]["writer_single_over_immediate_median"]["target"] == ">= 4"
    assert doc["checks"]["writer_single_p99_ms"]["value"] == max(r["p99_ms"] for r in single)
    assert doc["checks"]["writer_single_zero_errors"]["value"] == max(r["errors"] for r in single) == 0
    single = doc["scenarios"]["raw-single"]
    assert single["errors"] == 0 and single["ops"] > 0 and single["stored_ticks"] == single["rows"]
    assert single["pragmas"]["journal_mode"] == "wal" and len(doc["load_average"]["before"]) == 3
    assert "writer_single_over_raw_single" in run.stdout and "raw-single" in run.stdout
    # Bulk: raw runs the writer's own statements (100 rows each), raw-row one row per statement; both
    # store every row once.
    for name, statements in (("raw", "100 rows per statement as the writer runs them"),
                             ("raw-row", "one row per statement")):
        raw = doc["scenarios"][name]
        assert raw["errors"] == 0 and raw["stored_ticks"] == raw["rows"] == 6000 and statements in raw["notes"], raw
    assert "batched_over_raw_row" in run.stdout
    # Pipelined small writes: each acknowledged op committed, none lost or doubled, the window as asked.
    piped = doc["scenarios"]["writer-pipelined"]
    assert piped["errors"] == 0 and piped["ops"] > 0 and piped["stored_ticks"] == piped["rows"] > 0, piped
    assert piped["latency"]["n"] == piped["ops"] and doc["config"]["pipeline_window"] == 4
    assert "window=4" in piped["notes"] and "writer_pipelined_over_immediate" in run.stdout
    # The bare writer (the transport's floor) answers writer-single's own producers: every op it
    # acknowledged is stored once, and its counters say how it committed them.
    bare = doc["scenarios"]["bare-single"]
    assert bare["errors"] == 0 and bare["ops"] > 0 and bare["stored_ticks"] == bare["rows"] > 0, bare
    assert bare["writer"]["requests"] >= bare["ops"] and bare["writer"]["commits"] > 0, bare["writer"]
    assert "bare writer: mean batch" in run.stdout
    # With the record of applied requests: the same, and one record for each request it applied (the
    # producers' ops and each one's first audit, which the producers do not count).
    recorded = doc["scenarios"]["bare-recorded"]
    assert recorded["errors"] == 0 and recorded["stored_ticks"] == recorded["rows"] > 0, recorded
    assert recorded["writer"]["recorded"] == recorded["recorded"] >= recorded["ops"], recorded
    assert "the record of applied requests" in recorded["notes"] and "no record" in bare["notes"]


@pytest.mark.postgres_only
def test_the_postgresql_contention_benchmark_reports_its_ratios_and_stores_every_acknowledged_row(
        tmp_path: Path) -> None:
    """``bench contention --database postgresql`` (its own throwaway server): every scenario of the
    README's PostgreSQL table runs, stores exactly the rows it reports, with no error; the ratios
    and their targets are in the JSON and the table; the pairs ran ``--repeat`` times; and neither
    the table nor the JSON holds a database URL (it would carry the server's password)."""
    from bench.contention.postgres import PG_SCENARIOS, PG_TARGETS
    run, doc, text = bench(tmp_path, "contention", "--database", "postgresql", "--procs", "2", "--seconds", "0.5",
                           "--pipeline-window", "4", "--rows", "6000", "--batch", "1000", "--repeat", "3")
    assert doc["config"]["database"] == "postgresql" and set(doc["scenarios"]) == set(PG_SCENARIOS)
    for name, result in doc["scenarios"].items():
        assert result["errors"] == 0 and result["ops"] > 0, (name, result["errors_by_message"])
        # What a scenario reports stored is what is in its database afterwards: none lost, none doubled.
        assert result["stored_ticks"] == result["rows"] > 0, (name, result)
    for name in ("writer-batched", "copy"):
        runs = doc["scenarios"][name]["runs"]
        assert [r["repeat"] for r in runs] == [0, 1, 2] and all(r["errors"] == 0 for r in runs), (name, runs)
        assert doc["scenarios"][name]["rows"] == 6000, name
    batched, copy = doc["scenarios"]["writer-batched"]["runs"], doc["scenarios"]["copy"]["runs"]
    pairs = sorted(a["rows_per_s"] / b["rows_per_s"] for a, b in zip(batched, copy, strict=True))
    assert doc["ratios"]["batched_over_copy_median"] == round(pairs[1], 3)
    for name, target in PG_TARGETS.items():
        assert doc["ratios"][name] is not None and doc["ratios"][name] > 0, (name, doc["ratios"])
        assert doc["checks"][name]["target"] == f">= {target:g}" and name in run.stdout
    assert doc["ratios"]["writer_pipelined_over_direct"] > 0 and "client-direct" in run.stdout
    for where, content in (("table", run.stdout + run.stderr), ("JSON", text)):
        assert passwords_shown(content) == [], where


# --- api ---------------------------------------------------------------------------------------------------------


@pytest.mark.sqlite_only("tests/test_api.py::test_post_ticks_then_read_them_newest_limited_oldest_first")
def test_the_api_benchmark_serves_every_scenario_and_stores_every_acknowledged_tick(tmp_path: Path) -> None:
    """``python -m bench api``, small: real gunicorn with circus.ini's command line beside the real
    writer. Every read scenario answered both routes with no error, the POSTs and the producer's
    batches are all stored exactly once (the bench's own count of the database), the checks are in
    the JSON, and the API's token appears nowhere in what it prints or writes."""
    run, doc, text = bench(tmp_path, "api", "--seconds", "0.5", "--clients", "2", "--seed-ticks", "2000",
                           "--slow-clients", "5")
    assert {r["scenario"] for r in doc["runs"]} == {"idle", "under-load", "slow-clients", "write"}
    for r in doc["runs"]:
        assert "failed" not in r, r
        for route, figures in r["routes"].items():
            assert figures["requests"] > 0 and figures["errors"] == 0, (r["scenario"], route, figures)
    assert [v["what"] for v in doc["verification"]] == ["seed ticks", "ingested ticks (under-load producer)",
                                                       "POSTed ticks (acknowledged)"]
    for v in doc["verification"]:
        assert v["ok"] and v["stored"] == v["expected"] > 0 and v.get("duplicates_reported", 0) == 0, v
    assert {c["name"] for c in doc["checks"]} == {"p99_under_load_over_idle", "p99_slow_clients_over_idle",
                                                   "slow_clients_errors"}
    assert doc["writer"]["exit_code"] == 0 and "POSTed ticks" in run.stdout
    # The token is made inside the bench (secrets.token_urlsafe(32): 43 characters of [A-Za-z0-9_-]).
    for where, content in (("output", run.stdout + run.stderr), ("JSON", text)):
        assert not re.search(r"Bearer \S|(?<![\w-])[\w-]{43}(?![\w-])", content), where

# --- analysis ----------------------------------------------------------------------------------------------------


@pytest.mark.sqlite_only("tests/test_analysis.py::test_bars_and_indicators_exact_across_runs_and_restarts")
def test_the_analysis_benchmark_catches_up_on_everything_and_reports_both_ratios(tmp_path: Path) -> None:
    """``python -m bench analysis``, small (the README's run is 1,000,000 ticks and 5,000 bars): each
    run ingests or replays every tick, the worker catches up on all of them, the replayed 1h bars come
    back exactly (the bench's own check), both runs of a scenario store the same bars and values, and
    the ratios and their targets are in the JSON and the table. Timings are reported, not asserted."""
    run, doc, _ = bench(tmp_path, "analysis", "--ticks", "20000", "--bars", "300", "--repeat", str(REPEAT))
    assert doc["problems"] == [] and "problems:\n  none" in run.stdout, doc["problems"]
    dense, hourly = doc["summary"]["dense"], doc["summary"]["hourly"]
    assert dense["runs"] == hourly["runs"] == REPEAT and hourly["ticks"] == 4 * 300
    for r in doc["runs"]["dense"]:
        assert r["ingest"]["rows"] == 20000 and r["ingest"]["errors"] == {}, r["ingest"]
    # 300 hourly bars: 300 1h bars, their 1m and 5m bars (one per replayed tick), 13 days; a row of
    # indicator values per bar once the first one is past its warm-up.
    assert hourly["bars"] > 300 + 300 // 24 and 0 < hourly["indicators"] < len(SERIES) * hourly["bars"], hourly
    assert dense["bars"] > 0 and all(isinstance(v, int) for v in (dense["bars"], hourly["bars"], hourly["indicators"]))
    for name, target in (("analysis_over_ingest", ">= 0.5"), ("analysis_over_replay_time", "<= 1")):
        assert doc["ratios"][name] is not None and doc["ratios"][name] > 0, doc["ratios"]
        assert doc["checks"][name]["target"] == target and name in run.stdout
    # Each run's ratio is of that run's own two figures; the summary takes the medians of the runs.
    runs = doc["runs"]["hourly"]
    assert hourly["ratio_each_run"] == [round(r["analysis"]["seconds"] / r["replay"]["seconds"], 3) for r in runs]
    assert hourly["analysis_seconds"] == round(statistics.median(r["analysis"]["seconds"] for r in runs), 3)
    # And past each process's own start-up (each run with nothing to do: the replay's of a file with no
    # bars), of the medians; none when a side took no longer than its start-up (a small run, noise).
    a, b = (hourly["analysis_seconds"] - hourly["startup_seconds"],
            hourly["replay_seconds"] - hourly["replay_startup_seconds"])
    assert doc["ratios"]["analysis_over_replay_work"] == (round(a / b, 3) if a > 0 and b > 0 else None)
    assert "replay start-up (no bars)" in run.stdout


@DATABASE_INDEPENDENT
def test_the_analysis_benchmark_refuses_bad_flags_with_the_reason() -> None:
    for args, reason in ((["--bars", "0"], "--bars"), (["--only", "nightly"], "nightly"),
                         (["--repeat", "21"], "--repeat"), (["--symbols", "x"], "--symbols")):
        run = subprocess.run([sys.executable, "-m", "bench", "analysis", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 2 and reason in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)


@DATABASE_INDEPENDENT
def test_the_analysis_benchmark_calls_runs_that_stored_different_results_a_problem() -> None:
    from bench.analysis.report import count_problems
    same = {"analysis": {"bars": 56, "indicators": 0}}
    assert count_problems({"dense": [same, same], "hourly": [same]}) == []
    other = {"analysis": {"bars": 57, "indicators": 0}}
    assert count_problems({"dense": [same, other]}) == ["dense: the runs stored different numbers of bars: [56, 57]"]
    fewer = {"analysis": {"bars": 56, "indicators": 9}}
    assert count_problems({"hourly": [same, same, fewer]}) == [
        "hourly: the runs stored different numbers of indicators: [0, 0, 9]"]


# --- every numeric flag is bounded -------------------------------------------------------------------------------

#: Each benchmark's module (its ``main(argv)``, what ``python -m bench NAME`` runs; the chaos producer is
#: the process the chaos bench starts) and every numeric flag it takes. A flag without an upper bound took
#: any value: ``contention --seconds 1e16`` ran for ever, ``--rows 10000000000000000`` built its ticks in
#: memory until it ran out.
NUMERIC_FLAGS = {
    "bench.contention.cli": ("--procs", "--seconds", "--pipeline-window", "--rows", "--batch", "--window",
                             "--batch-producers", "--repeat"),
    "bench.analysis.cli": ("--ticks", "--symbols", "--batch", "--window", "--bars", "--repeat"),
    "bench.api.cli": ("--seconds", "--clients", "--post-batch", "--repeat", "--seed-ticks", "--ingest-batch",
                      "--window", "--workers", "--slow-clients", "--writer-nice"),
    "bench.chaos.cli": ("--producers", "--writer-kills", "--stack-rounds", "--seed", "--min-gap", "--max-gap",
                        "--producer-kill-chance", "--pause", "--settle"),
    "bench.chaos.producer": ("--ticks", "--window", "--pause", "--deadline"),
}
#: The options of each that are no number, and what stops a run before it starts were a bad number taken
#: (argparse reads the flags in order, so the first bad one is the one named): no benchmark runs here.
OTHER_OPTIONS = {"--only", "--json", "--database", "--worker-class", "--mode", "--source", "--ack-log", "--help"}
STOP = {"bench.chaos.producer": ["--mode", "nobody"]}
TOO_LARGE = ("1" + "0" * 16, "1e16", "9" * 5000)


def refusal(capsys: pytest.CaptureFixture[str], module: str, *args: str) -> str:
    """``module``'s main on ``args`` (then a flag that stops it) must exit 2 with one argparse error line
    and no traceback; that line."""
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stopped:
        main([*args, *STOP.get(module, ["--only", "nobody"])])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert stopped.value.code == 2 and len(errors) == 1 and "Traceback" not in err, (args, err)
    assert err.rstrip().endswith(errors[0]), err
    return errors[0]


@DATABASE_INDEPENDENT
@pytest.mark.parametrize(("module", "flag"), [(m, f) for m, flags in NUMERIC_FLAGS.items() for f in flags])
def test_every_numeric_bench_flag_refuses_a_value_over_its_bound_or_below_it(
        capsys: pytest.CaptureFixture[str], module: str, flag: str) -> None:
    """Too large (also 5,000 digits, which int() refuses), negative, nan: each a one-line argparse error
    naming the flag and its range, by db's one number rule (db.parsers.number_flag)."""
    for value in (*TOO_LARGE, "-1", "nan"):
        line = refusal(capsys, module, flag, value)
        assert f"error: argument {flag}: " in line, (value, line)
        assert re.search(r" to -?\d|at most \d", line), (value, line)


@DATABASE_INDEPENDENT
@pytest.mark.parametrize("module", list(NUMERIC_FLAGS))
def test_the_list_of_numeric_bench_flags_is_complete_and_their_defaults_are_in_range(module: str) -> None:
    """A new numeric flag is not left out of the test above; each default passes its own flag's rule."""
    import importlib

    actions = importlib.import_module(module).build_parser()._actions
    options = {a.option_strings[-1]: a for a in actions if a.option_strings}
    assert set(options) - OTHER_OPTIONS == set(NUMERIC_FLAGS[module])
    for flag in NUMERIC_FLAGS[module]:
        action = options[flag]
        assert action.type(str(action.default)) == action.default, (flag, action.default)


@DATABASE_INDEPENDENT
@pytest.mark.parametrize("value", ["1e16", "-1"])
def test_bench_contention_refuses_seconds_that_never_end_or_never_start(value: str) -> None:
    """``python -m bench contention --seconds 1e16`` ran for ever (and ``--rows`` that large exhausted
    memory building its ticks); now, as every bench number: one line, exit 2, before anything runs.
    (``--only nobody``: were the value taken, the run still stops before it starts.)"""
    for flag in ("--seconds", "--rows"):
        run = subprocess.run([sys.executable, "-m", "bench", "contention", flag, value, "--only", "nobody"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        errors = [line for line in run.stderr.splitlines() if "error:" in line]
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert len(errors) == 1 and errors[0].startswith(f"python -m bench contention: error: argument {flag}: "), \
            run.stderr[-2000:]
