"""The README's code layout names every module, so a reader finds each job in one place."""
from __future__ import annotations

import ast
import re

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


def _own_marks(decorators: list[ast.expr]) -> set[str]:
    """The marks a test function carries itself (``@pytest.mark.NAME`` or ``@pytest.mark.NAME(...)``),
    not those of single parameter sets inside a ``parametrize``."""
    names = (ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in decorators)
    return {m.group(1) for n in names if (m := re.search(r"mark\.(\w+)$", n))}


def test_every_sqlite_only_test_names_a_postgresql_counterpart_that_exists() -> None:
    """A test of SQLite's own machinery (``@pytest.mark.sqlite_only("path::name")``, on the test or
    on some of its parameter sets) is left out of the PostgreSQL run; the test it names must exist
    and run there (not be SQLite-only itself)."""
    defined: dict[str, dict[str, set[str]]] = {}  # file -> test name -> its own markers
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marks = {m for node in tree.body if isinstance(node, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
                        for m in re.findall(r"mark\.(\w+)", ast.unparse(node.value))}
        tests = defined[f"tests/{path.name}"] = {}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                tests[node.name] = module_marks | _own_marks(node.decorator_list)
    pairs, problems = [], []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        if "sqlite_only" in {m for n in tree.body if isinstance(n, ast.Assign) for m in re.findall(
                r"mark\.(\w+)", ast.unparse(n.value)) if any(getattr(t, "id", "") == "pytestmark" for t in n.targets)}:
            problems.append(f"{path.name}: a whole module sqlite_only names no counterpart; mark each test")
        for node in ast.walk(tree):
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            inside = [n for d in node.decorator_list for n in ast.walk(d)]
            called = {id(n.func) for n in inside if isinstance(n, ast.Call)}
            for n in inside:
                if id(n) not in called and isinstance(n, ast.Attribute) and ast.unparse(n).endswith("mark.sqlite_only"):
                    problems.append(f"{path.name}::{node.name} is sqlite_only without naming its counterpart")
                if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("mark.sqlite_only"):
                    counterpart = n.args[0].value if n.args and isinstance(n.args[0], ast.Constant) else None
                    file, _, name = str(counterpart).partition("::")
                    marks = defined.get(file, {}).get(name)
                    if marks is None:
                        problems.append(f"{path.name}::{node.name} names {counterpart!r}: no such test")
                    elif "sqlite_only" in marks:
                        problems.append(f"{path.name}::{node.name} names {counterpart}, SQLite-only too")
                    pairs.append(node.name)
    assert not problems, problems
    assert pairs, "no sqlite_only test found: the marker's spelling changed?"
