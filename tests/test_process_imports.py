"""What the stack's own processes load as they run: not SQLAlchemy's ORM.

The schema is Core tables (``db.models``) and every read and write a Core statement; the ORM is the
web apps' alone (Flask-SQLAlchemy's session). Loaded, it cost each writer, worker and ``python -m db``
command about 40 to 80 ms of CPU at start on this machine, on every start and restart under circus.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from db.client import WriterClient
from testkit.env import ROOT
from testkit.helpers import wait_for, write_bar_csv
from testkit.writer import Stack

#: Loaded into every Python process of the test (``sitecustomize`` on its PYTHONPATH): at exit, the
#: process's command line and which of SQLAlchemy's packages it had loaded, one JSON file per pid.
REPORT_AT_EXIT = """
import atexit, json, os, sys

def _report():
    loaded = sorted({m.split(".")[1] for m in sys.modules if m.startswith("sqlalchemy.") and m.count(".") >= 1})
    path = os.path.join(os.environ["TS_IMPORT_REPORTS"], f"{os.getpid()}.json")
    with open(path, "w") as out:
        json.dump({"argv": sys.argv, "sqlalchemy": "sqlalchemy" in sys.modules, "packages": loaded}, out)

atexit.register(_report)
"""


def reported(stack: Stack, reports: Path, *args: str) -> None:
    """``python -m args`` in the stack's environment, run to its end."""
    done = subprocess.run([sys.executable, "-m", *args], env=stack.env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"python -m {' '.join(args)}: {done.stderr[-2000:]}"


def test_the_writer_the_workers_and_db_commands_do_their_work_without_loading_sqlalchemys_orm(
        stack: Stack, tmp_path: Path) -> None:
    hook, reports = tmp_path / "hook", tmp_path / "reports"
    hook.mkdir()
    reports.mkdir()
    (hook / "sitecustomize.py").write_text(REPORT_AT_EXIT)
    stack.env["PYTHONPATH"] = os.pathsep.join((str(hook), stack.env["PYTHONPATH"]))
    stack.env["TS_IMPORT_REPORTS"] = str(reports)
    writer = stack.start_writer()
    client = WriterClient(settings=stack.settings)
    try:
        wait_for("the writer to answer", client.ping)
        csv = tmp_path / "bars.csv"
        write_bar_csv(csv, n=30)
        # Work for each: a trade for the monitor to follow, ticks stored after it, bars built from
        # them, a job run, and the database's health read.
        client.call("open_trade", symbol="EURUSD", side="buy", size=1.0, entry_price=1.0, trailing_distance=0.5)
        reported(stack, reports, "workers.ticks", "--feed", "csv", "--file", str(csv), "--symbol", "EURUSD",
                 "--speed", "max")
        reported(stack, reports, "workers.analysis", "--until-idle")
        reported(stack, reports, "workers.monitor", "--until-idle")
        reported(stack, reports, "workers.jobs", "--run", "quick_check")
        reported(stack, reports, "db", "health")
    finally:
        client.close()
    assert stack.stop(writer) == 0, stack.writer_log()[-2000:]
    # Every report, not one per program's name: a second process of a name (a child, a restart)
    # would otherwise hide the first's.
    every = [json.loads(p.read_text()) for p in reports.glob("*.json")]
    names = {report["argv"][0].rsplit("/", 1)[-1] for report in every}
    ran = {"writer.py", "ticks.py", "analysis.py", "monitor.py", "jobs.py", "__main__.py"}
    assert ran <= names, f"a process made no report at exit: {sorted(ran - names)} of {sorted(names)}"
    for report in every:
        name = report["argv"][0].rsplit("/", 1)[-1]
        if name in ran:
            assert report["sqlalchemy"], f"{name} never loaded SQLAlchemy: the check saw no database work"
        assert "orm" not in report["packages"], f"{name} ({' '.join(report['argv'])}) loaded SQLAlchemy's ORM"
