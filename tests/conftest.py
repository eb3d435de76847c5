"""Fixtures that start real processes in a private runtime folder.

Fixtures only: what they are built from (the isolated environment, the
writer, circusd, helpers) lives in :mod:`testkit`, and tests import it from
there. Every test gets its own short ``TICKSTACK_HOME`` (Unix socket paths
are limited to 107 bytes, so not pytest's deep tmp_path) and stops what it
started by pid.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The checkout on sys.path, so ``testkit`` imports however pytest was started.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testkit.circus import Circusd  # noqa: E402
from testkit.writer import Stack  # noqa: E402


@pytest.fixture
def stack() -> Iterator[Stack]:
    """A fresh runtime folder; whatever the test started in it is killed after."""
    st = Stack.create()
    try:
        yield st
    finally:
        st.close()


@pytest.fixture
def writer(stack: Stack) -> Iterator[Stack]:
    """A running writer in a fresh runtime folder."""
    stack.start_writer()
    yield stack


@pytest.fixture
def circusd(writer: Stack) -> Iterator[Stack]:
    """A minimal circusd on the stack's own endpoint, with one running and
    one stopped watcher; stopped (and only what it started, by pid) after."""
    run = writer.home / "run"
    ini = writer.home / "circus-test.ini"
    ini.write_text(f"""[circus]
endpoint = ipc://{run}/circus.sock
pubsub_endpoint = ipc://{run}/circus-pubsub.sock
stats_endpoint = ipc://{run}/circus-stats.sock
statsd = False

[watcher:sleeper]
cmd = sleep 600

[watcher:idle]
cmd = sleep 600
autostart = False
""")
    daemon = Circusd(writer.env, ini, cwd=writer.home, log_path=writer.home / "log" / "circusd-test.log",
                     call_timeout=5)
    try:
        daemon.start(wait_active=("sleeper",), timeout=30, poll=0.2)
        yield writer
    finally:
        daemon.stop(quit_timeout=30, term_timeout=10)
