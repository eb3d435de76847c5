"""The lifeline's parent-death stop, with real processes and the kernel's real signal."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from testkit.helpers import wait_for

pytestmark = pytest.mark.database_independent(
    "the lifeline watches the parent process and its log files, and never opens a database")

# A stand-in for circusd: a main thread that forks the child, and a second thread (circusd has
# ZeroMQ's) that outlives it. The main thread then exits alone (pthread_exit), as it may when
# circusd is SIGKILLed: the kernel hands the child to the other thread, same pid, and sends the
# parent-death SIGTERM while getppid() still names the parent.
PARENT = textwrap.dedent("""
    import ctypes, os, sys, threading, time
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        os.set_inheritable(w, True)
        os.execv(sys.executable, [sys.executable, "-c", sys.argv[1], sys.argv[2], str(w)])
    os.close(w)
    os.read(r, 1)  # the child is ready
    ctypes.CDLL(None).pthread_exit(None)
""")

CHILD = textwrap.dedent("""
    import ctypes, logging, os, signal, sys, time
    from pathlib import Path
    from supervision.lifeline import Lifeline
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(message)s")
    out, ready = Path(sys.argv[1]), int(sys.argv[2])
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)
    parent = os.getppid()
    seen = []
    def on_stop(signum, frame):
        seen.append(os.getppid() == parent)
        logging.getLogger("test").info("SIGTERM received; draining")
    signal.signal(signal.SIGTERM, on_stop)
    lifeline = Lifeline(None, out, "child")
    lifeline.ppid, lifeline.supervised = parent, True
    lifeline.attach()
    os.write(ready, b"x")
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    (out / "result").write_text(repr(seen[:1]))
""")


def test_the_stop_is_logged_to_the_files_when_the_signal_comes_before_getppid_changes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(tmp_path)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = wait_for("the child's result", lambda: (tmp_path / "result").exists(), timeout=30)
        assert result
        # The case under test: the signal came while getppid() still named the dying parent.
        assert (tmp_path / "result").read_text() == "[True]"
        log = (tmp_path / "child.log").read_text()
        assert "is gone; stopping" in log and "SIGTERM received; draining" in log, log
        assert log.index("is gone") < log.index("draining"), log
    finally:
        if parent.poll() is None:
            os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
