"""The README's code layout names every module, so a reader finds each job in one place."""
from __future__ import annotations

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
