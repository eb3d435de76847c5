"""A run stopped by a signal stops what its tests started (:mod:`testkit.interrupts`): a real pytest
with real xdist workers, on a test file of fixtures that record their setup and teardown, stopped as
``make test``'s trap stops it (SIGTERM to the controller) and as Ctrl-C does (SIGINT to every
process of the run)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.helpers import wait_for
from testkit.process import default_sigint

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.database_independent("the test runner's own handling of signals, whatever the database")

#: Fixtures that take a while to set up or tear down, each recording what it did.
FIXTURES = '''
import os, pathlib, time
import pytest

MARKS = pathlib.Path(os.environ["MARKS"])

def mark(name):
    (MARKS / name).write_text("")

def signalled():
    """Waits for the test's signal (it marks "signalled" once it sent it), then a moment for its
    delivery: the stop lands inside this setup or teardown however loaded the machine."""
    deadline = time.monotonic() + 60
    while not (MARKS / "signalled").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)

@pytest.fixture
def outer():
    yield
    mark("outer torn down")

@pytest.fixture
def slow_teardown(outer):
    yield
    mark("teardown started")
    signalled()
    mark("slow teardown done")

@pytest.fixture
def slow_setup(outer):
    mark("setup started")
    signalled()
    yield
    mark("slow setup torn down")

def test_{phase}({fixture}):
    mark("body ran")

def test_later():
    mark("later ran")
'''


def run_and_stop(tmp_path: Path, phase: str, fixture: str, how: str) -> tuple[subprocess.CompletedProcess, set]:
    """Run the fixtures' file, stop it in ``phase``: ``sigterm`` to xdist's controller (``make
    test``'s trap), ``ctrl-c`` to every process of an xdist run, ``plain`` Ctrl-C to a run without
    workers."""
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "test_slow.py").write_text(FIXTURES.format(phase=phase, fixture=fixture))
    env = {**os.environ, "MARKS": str(marks), "PYTHONPATH": str(ROOT)}
    workers = ["-p", "no:xdist"] if how == "plain" else ["-n", "1", "--max-worker-restart", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *workers, "-p", "testkit.interrupts", "-p",
                             "no:cacheprovider", "test_slow.py"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=default_sigint)
    try:
        wait_for(f"the {phase} to start", lambda: (marks / f"{phase} started").exists(), timeout=60)
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: every process of the run
        (marks / "signalled").write_text("")
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out), {p.name for p in marks.iterdir()}


HOW = ["sigterm", "ctrl-c", "plain"]


@pytest.mark.parametrize("how", HOW)
def test_a_stop_during_a_teardown_waits_for_every_fixtures_teardown_then_ends_the_run(tmp_path: Path,
                                                                                      how: str) -> None:
    """A KeyboardInterrupt raised inside a fixture's teardown skipped the rest of it and every
    teardown after it (a writer was left running, its home too)."""
    done, marks = run_and_stop(tmp_path, "teardown", "slow_teardown", how)
    assert {"body ran", "slow teardown done", "outer torn down"} <= marks, (marks, done.stdout[-3000:])
    assert "later ran" not in marks, done.stdout[-3000:]
    assert done.returncode == 2 and "INTERNALERROR" not in done.stdout, done.stdout[-3000:]  # 2: interrupted


@pytest.mark.parametrize("how", HOW)
def test_a_stop_during_a_setup_lets_it_end_and_tears_it_down_without_running_the_test(tmp_path: Path,
                                                                                      how: str) -> None:
    """A KeyboardInterrupt inside a fixture's setup left what it had made without a teardown."""
    done, marks = run_and_stop(tmp_path, "setup", "slow_setup", how)
    assert {"slow setup torn down", "outer torn down"} <= marks, (marks, done.stdout[-3000:])
    assert not {"body ran", "later ran"} & marks, done.stdout[-3000:]
    assert done.returncode == 2 and "INTERNALERROR" not in done.stdout, done.stdout[-3000:]
