"""The README's code layout names every module, so a reader finds each job in one place."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from testkit.env import ROOT

PACKAGES = ("db", "supervision", "workers", "webapp", "webapp/api", "testkit", "bench")


def layout_rows() -> dict[str, str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Code layout"):readme.index("## Tests")]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w/]+)` \| (.*) \|$", section, re.M)}


def test_every_module_is_named_in_the_readme_layout() -> None:
    rows = layout_rows()
    missing = []
    for package in PACKAGES:
        row = rows.get(package, "")
        names = [p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__"]
        names += [f"{p.name}/" for p in (ROOT / package).iterdir() if (p / "__init__.py").exists()]
        missing += [f"{package}: {n}" for n in sorted(names) if f"`{n}`" not in row]
    assert not missing, f"modules the README's code layout does not name: {missing}"


#: Collects the suite as ``pytest --database DATABASE`` would and writes, for every test it keeps,
#: the arguments of each of its ``sqlite_only`` marks (wherever set: module, class, function,
#: parameter set) as JSON into PATH.
_COLLECT = """
import json, sys
import pytest

class Marks:
    def pytest_collection_finish(self, session):
        marks = {item.nodeid: [list(m.args) for m in item.iter_markers("sqlite_only")] for item in session.items}
        with open(sys.argv[1], "w") as out:
            json.dump(marks, out)

sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--database", sys.argv[2], "tests"],
                     plugins=[Marks()]))
"""


def _collected(tmp_path: Path, *databases: str) -> list[dict[str, list[list]]]:
    """What each run keeps (see :data:`_COLLECT`), the collections side by side."""
    outs = [tmp_path / f"{database}.json" for database in databases]
    procs = [subprocess.Popen([sys.executable, "-c", _COLLECT, str(out), database], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for out, database in zip(outs, databases, strict=True)]
    try:
        for proc in procs:
            output = proc.communicate(timeout=120)[0]
            assert proc.returncode == 0, output[-3000:]
    finally:
        for proc in procs:  # stopped by pid, if a collection hung
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [json.loads(out.read_text()) for out in outs]


def test_every_sqlite_only_test_names_a_postgresql_counterpart_that_exists(tmp_path: Path) -> None:
    """A test of SQLite's own machinery (``@pytest.mark.sqlite_only("path::name")``, on the test or
    on some of its parameter sets) is left out of the PostgreSQL run; the test it names must run
    there, in at least one of its parameter sets. Read from the two runs' own collections (pytest
    applies the marks, wherever and however they are written; conftest leaves the tests out)."""
    on_sqlite, on_postgresql = _collected(tmp_path, "sqlite", "postgresql")
    runs_there = {nodeid.split("[", 1)[0] for nodeid in on_postgresql}
    problems, pairs = [], []
    for nodeid, marks in on_sqlite.items():
        if marks and nodeid in on_postgresql:
            problems.append(f"{nodeid} is sqlite_only but the PostgreSQL run keeps it")
        for args in marks:
            if len(args) != 1 or not isinstance(args[0], str):
                problems.append(f"{nodeid} is sqlite_only without naming its counterpart (path::name): {args}")
            elif args[0] not in runs_there:
                problems.append(f"{nodeid} names {args[0]}: no such test runs on PostgreSQL")
            pairs.append(nodeid)
    assert not problems, problems
    assert pairs, "no sqlite_only test found: the marker's spelling changed?"
