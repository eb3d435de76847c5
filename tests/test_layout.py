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


def test_every_sqlite_only_test_names_a_postgresql_counterpart_that_exists() -> None:
    """A test of SQLite's own machinery (``@pytest.mark.sqlite_only("path::name")``) is left out of
    the PostgreSQL run; the test it names must exist and run there (not be SQLite-only itself)."""
    defined: dict[str, dict[str, set[str]]] = {}  # file -> test name -> its markers
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marks = {m for node in tree.body if isinstance(node, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
                        for m in re.findall(r"mark\.(\w+)", ast.unparse(node.value))}
        tests = defined[f"tests/{path.name}"] = {}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                tests[node.name] = module_marks | {m for d in node.decorator_list
                                                   for m in re.findall(r"mark\.(\w+)", ast.unparse(d))}
    pairs, problems = [], []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        if "sqlite_only" in {m for n in tree.body if isinstance(n, ast.Assign) for m in re.findall(
                r"mark\.(\w+)", ast.unparse(n.value)) if any(getattr(t, "id", "") == "pytestmark" for t in n.targets)}:
            problems.append(f"{path.name}: a whole module sqlite_only names no counterpart; mark each test")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                for d in node.decorator_list:
                    if not isinstance(d, ast.Call) and ast.unparse(d).endswith("mark.sqlite_only"):
                        problems.append(f"{path.name}::{node.name} is sqlite_only without naming its counterpart")
                    if isinstance(d, ast.Call) and ast.unparse(d.func).endswith("mark.sqlite_only"):
                        counterpart = d.args[0].value if d.args and isinstance(d.args[0], ast.Constant) else None
                        file, _, name = str(counterpart).partition("::")
                        marks = defined.get(file, {}).get(name)
                        if marks is None:
                            problems.append(f"{path.name}::{node.name} names {counterpart!r}: no such test")
                        elif "sqlite_only" in marks:
                            problems.append(f"{path.name}::{node.name} names {counterpart}, SQLite-only too")
                        pairs.append(node.name)
    assert not problems, problems
    assert pairs, "no sqlite_only test found: the marker's spelling changed?"
