"""``python -m bench chaos``, short: a few SIGKILLs of the writer (each with
a producer) and one whole-stack kill under single-call and pipelined
producers, then nothing acknowledged is missing, nothing is applied twice,
and the database passes ``PRAGMA integrity_check`` (amcheck on PostgreSQL: the suite's PostgreSQL
run runs the benchmark with ``--database postgresql``). The full run (20 writer
kills, 2 whole-stack rounds) is in the README's Reliability section."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sqlalchemy import text

from bench.chaos.fleet import TICKS_PER_REQUEST
from bench.chaos.ledger import Acks, verdict
from bench.common import fresh_home, migrate_database
from db.engine import make_write_engine
from testkit.env import ROOT
from testkit.process import run_to_its_end

WRITER_KILLS = 3
STACK_ROUNDS = 1


def test_chaos_short_run_loses_nothing_and_applies_nothing_twice(tmp_path: Path, database_under_test: str) -> None:
    """On the run's database: ``--database postgresql`` starts a throwaway server of its own."""
    out = tmp_path / "chaos.json"
    done = run_to_its_end(
        [sys.executable, "-m", "bench", "chaos", "--producers", "4", "--writer-kills", str(WRITER_KILLS),
         "--stack-rounds", str(STACK_ROUNDS), "--producer-kill-chance", "1", "--min-gap", "0.5", "--max-gap", "1.5",
         "--seed", "8", "--database", database_under_test, "--json", str(out)],
        cwd=ROOT, timeout=280)
    report = f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    assert out.exists(), report
    assert json.loads(out.read_text())["config"]["database"] == database_under_test
    variants = json.loads(out.read_text())["variants"]
    assert set(variants) == {"writer", "stack"}, report
    for name, kills in (("writer", WRITER_KILLS), ("stack", STACK_ROUNDS)):
        r = variants[name]
        assert "failed" not in r, f"{name}: {r.get('failed')}"
        assert r["kills"] == kills and len(r["ready_s"]) == kills, (name, r["kill_log"])
        # It did write through the kills: thousands of acknowledged rows, none lost, none doubled.
        assert r["acknowledged_ticks"] > 1000 and r["acknowledged_audits"] > 10, (name, r)
        assert r["missing"] == 0, (name, r["missing_examples"], r.get("writer_log_tail"))
        assert r["applied_twice"] == 0, (name, r)
        assert r["stored"] == r["acknowledged"], (name, r)
        assert r["integrity"] == "ok", (name, r["integrity"])
        assert r["failed_requests"] == 0, (name, r["errors_by_message"], r.get("writer_log_tail"))
        assert r["producer_exit_codes"] == [0] * r["producers"], (name, r["producer_exit_codes"])
    # Producers died too (one with each writer kill); what they had in flight may be stored unacknowledged,
    # at most a pipeline's window of requests (8, half of them 250 ticks) each. Nothing else is.
    writer = variants["writer"]
    assert writer["producer_kills"] == WRITER_KILLS
    assert writer["stored_not_acknowledged"] <= writer["producer_kills"] * 8 * TICKS_PER_REQUEST["pipeline"], writer
    assert variants["stack"]["stored_not_acknowledged"] == 0, variants["stack"]
    assert variants["stack"]["kill_log"][0]["processes_killed"] >= 9  # every watcher, plugins, gunicorn workers
    assert done.returncode == 0, report
    for column in ("acknowledged", "stored", "missing", "applied twice", "integrity", "ready p50 s"):
        assert column in done.stdout, report


def test_the_ledger_counts_what_is_missing_and_what_was_applied_twice(tmp_path: Path) -> None:
    """The counters can fail: a database that lost an acknowledged tick and
    audit, holds an audit twice, and a tick ack that counted a duplicate."""
    with fresh_home() as (_home, env):  # the run's database: a file, or a server's
        settings = migrate_database(env)
        engine = make_write_engine(settings)
        try:
            with engine.begin() as con:
                con.execute(text("INSERT INTO ticks (symbol, ts, bid, ask, volume, source, seq) "
                                 "VALUES ('X', 1, 1, 1, 0, :source, :seq)"),
                            [{"source": "chaos-a", "seq": q} for q in (0, 1, 3, 4)])
                con.execute(text("INSERT INTO audit_log (ts, actor, action, target, result, detail) "
                                 "VALUES (1, 'chaos', 'chaos', 'bench', 'ok', :detail)"),
                            [{"detail": d} for d in ("a:1", "a:2", "a:2")])
        finally:
            engine.dispose()
        log = tmp_path / "a.acks"
        # Ticks 0-2 acked (2 is lost), 3-4 acked with one duplicate counted; audits a:1, a:2 (doubled), a:3 (lost).
        log.write_text("t 0 3 3 0\nt 3 2 1 1\na a:1\na a:2\na a:3\ne WriterUnavailable: gave up\nt 9 1")
        acks = Acks()
        acks.read("chaos-a", log)
        v = verdict(acks, settings)
    assert (v.acknowledged, v.missing, v.applied_twice, v.failed_requests) == (8, 2, 2, 1), v
    assert v.stored == 6 and v.stored_not_acknowledged == 0 and not v.ok
    assert v.integrity == "ok"  # SQLite's integrity_check, or amcheck on a server
    assert v.missing_examples == ["tick chaos-a/2", "audit a:3"]
