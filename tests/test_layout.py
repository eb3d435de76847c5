"""The README's code layout names every module, so a reader finds each job in one place."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.env import ROOT

pytestmark = pytest.mark.database_independent(
    "it reads the code, the README and the suite's own collections, and starts no stack")

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


def test_every_test_the_readme_names_exists() -> None:
    """The README's Evidence table (and any other place) names tests as ``test_x.py::name`` or
    ``path::name``, a ``::name`` after one in the same cell, or a file alone: each must be there,
    or a renamed test leaves a guarantee pointing at nothing."""
    readme = (ROOT / "README.md").read_text()
    missing = []
    for cell in re.findall(r"`(?:tests/)?(test_\w+\.py)(?:::(\w+))?`((?:, `::\w+`)*)", readme):
        path = ROOT / "tests" / cell[0]
        names = [n for n in (cell[1], *re.findall(r"::(\w+)", cell[2])) if n]
        if not path.exists():
            missing.append(cell[0])
            continue
        text = path.read_text()
        missing += [f"{cell[0]}::{n}" for n in names if not re.search(rf"^(?:async )?def {n}\(", text, re.M)]
    assert not missing, f"tests the README names that are not there: {missing}"


#: The marks that leave a test out of the PostgreSQL run, each with its arguments.
RUN_MARKS = ("sqlite_only", "database_independent")
#: Collects the suite as ``pytest --database DATABASE`` would and writes, for every test it keeps,
#: the arguments of each of its :data:`RUN_MARKS` (wherever set: module, class, function,
#: parameter set) as JSON into PATH: ``{nodeid: {mark: [args, ...]}}``. Arguments: PATH,
#: DATABASE and the marks' names joined by commas.
_COLLECT = """
import json, sys
import pytest

class Marks:
    def pytest_collection_finish(self, session):
        marks = {item.nodeid: {name: [list(m.args) for m in item.iter_markers(name)]
                               for name in sys.argv[3].split(",")}
                 for item in session.items}
        with open(sys.argv[1], "w") as out:
            json.dump(marks, out)

sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--database", sys.argv[2], "tests"],
                     plugins=[Marks()]))
"""


def _collected(tmp_path: Path, *databases: str) -> list[dict[str, dict[str, list[list]]]]:
    """What each run keeps (see :data:`_COLLECT`), the collections side by side."""
    outs = [tmp_path / f"{database}.json" for database in databases]
    procs = [subprocess.Popen([sys.executable, "-c", _COLLECT, str(out), database, ",".join(RUN_MARKS)], cwd=ROOT,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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


def test_every_sqlite_only_test_names_a_postgresql_counterpart_and_every_database_independent_one_says_why(
        tmp_path: Path) -> None:
    """A test of SQLite's own machinery (``@pytest.mark.sqlite_only("path::name")``, on the test or
    on some of its parameter sets) is left out of the PostgreSQL run; the test it names must run
    there, in at least one of its parameter sets. A test whose promise is the same whatever the
    database (``@pytest.mark.database_independent("why")``) is left out of it too, and must say why.
    Read from the two runs' own collections (pytest
    applies the marks, wherever and however they are written; conftest leaves the tests out)."""
    on_sqlite, on_postgresql = _collected(tmp_path, "sqlite", "postgresql")
    runs_there = {nodeid.split("[", 1)[0] for nodeid in on_postgresql}
    problems, pairs, independent = [], [], []
    for nodeid, marks in on_sqlite.items():
        if any(marks.values()) and nodeid in on_postgresql:
            problems.append(f"{nodeid} is {' and '.join(m for m in marks if marks[m])} but the PostgreSQL run keeps it")
        for args in marks["sqlite_only"]:
            if len(args) != 1 or not isinstance(args[0], str):
                problems.append(f"{nodeid} is sqlite_only without naming its counterpart (path::name): {args}")
            elif args[0] not in runs_there:
                problems.append(f"{nodeid} names {args[0]}: no such test runs on PostgreSQL")
            pairs.append(nodeid)
        # Why the database does not matter to it, in words a reviewer can dispute: a reason of a few
        # words is none.
        for args in marks["database_independent"]:
            if len(args) != 1 or not isinstance(args[0], str) or len(args[0].split()) < 6:
                problems.append(f"{nodeid} is database_independent without saying why (a sentence): {args}")
            independent.append(nodeid)
    assert not problems, problems
    assert pairs, "no sqlite_only test found: the marker's spelling changed?"
    assert independent, "no database_independent test found: the marker's spelling changed?"


def test_a_producer_loads_the_writers_client_without_sqlalchemy_flask_or_numpy() -> None:
    """``db.client`` is what a producer (the user's bot, the ingestor's spool replay, a benchmark's
    producers) imports to write: loading SQLAlchemy with it cost each one about 0.5 s of CPU at start
    on this machine, for two constants the validators needed (now in ``db.vocabulary``). Direct
    writes (PostgreSQL) still load SQLAlchemy, when a client is made for them."""
    heavy = ("sqlalchemy", "flask", "numpy")
    done = subprocess.run([sys.executable, "-c", "import sys, db.client; print(' '.join(sorted(m for m in "
                           f"sys.modules if m.split('.')[0] in {heavy!r})))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], f"importing db.client loads: {done.stdout.split()[:10]}"
