"""The README's Python examples run as written, against a real writer, and do what the text around
them says: a new user pastes them into a file and runs it (first contact: the bot example raised
``NameError: name 'batches' is not defined`` after it had written a BTCUSD tick at 97,000 into a
stack whose simulated BTCUSD was near 60,000, spiking its chart and closing a paper trade by its
trailing stop; a new user's run of the README, round 37)."""
from __future__ import annotations

import re
import subprocess
import sys

from testkit.env import ROOT
from testkit.helpers import query
from testkit.writer import Stack

#: The symbols of the simulated feed (circus.ini's ticks watcher): an example must leave them alone.
FEED_SYMBOLS = ("BTCUSD", "EURUSD")


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"### {title}\n")
    end = text.index("\n#", start + 1)
    return text[start:end]


def python_blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section, re.S)


def run_example(stack: Stack, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=stack.env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_the_bots_examples_run_as_written_and_touch_only_their_own_symbol(writer: Stack) -> None:
    stack = writer
    write, read = python_blocks(readme_section("Writing from your own bot"))
    done = run_example(stack, write)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "{'inserted': 1, 'duplicates': 0}\n", done.stdout  # as its comment says; no failure
    stored = query(stack.settings, "SELECT symbol, count(*), count(DISTINCT seq) FROM ticks GROUP BY symbol")
    assert len(stored) == 1 and stored[0][0] not in FEED_SYMBOLS, stored
    _symbol, n, distinct = stored[0]
    assert n == distinct > 1, stored  # the single tick and the pipelined batches, each stored once
    again = run_example(stack, write)  # a bot run twice: its (source, seq) ticks are dropped as duplicates
    assert again.returncode == 0 and "{'inserted': 0, 'duplicates': 1}" in again.stdout, again.stdout + again.stderr
    assert query(stack.settings, "SELECT count(*) FROM ticks")[0][0] == n

    shown = run_example(stack, read + "\nprint(len(bars))\n")
    assert shown.returncode == 0, shown.stdout + shown.stderr
