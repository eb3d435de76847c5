"""Stopping what the harness started: always by pid, never by name, so a
test or benchmark cannot touch the user's own processes (or another test's)."""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil

#: How long a program run by :func:`run_to_its_end` has to clean up after a stop of the test run.
CLEAN_UP_S = 15


def stop_process(proc: subprocess.Popen, timeout: float, sig: int = signal.SIGTERM) -> bool:
    """Send ``sig`` (SIGTERM: the graceful stop), wait up to ``timeout``, then
    SIGKILL this pid. Returns True if it had to be killed."""
    if proc.poll() is not None:
        return False
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes: catches a spike that is gone by the time we look."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def default_sigint() -> None:
    """SIGINT's default action, as a terminal's foreground job has it: for ``preexec_fn`` (``make
    test``'s runs inherit SIGINT ignored, and so would their children)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_to_its_end(args: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)`` for a
    program that cleans up at Ctrl-C (a benchmark removes its home as it ends): when the test run
    stops meanwhile (:mod:`testkit.interrupts`), or the timeout passes, the program gets SIGINT and
    up to :data:`CLEAN_UP_S` to clean up, then SIGKILL. ``subprocess.run`` SIGKILLed it 0.25 s
    after a stop, and under ``make test``, whose runs ignore SIGINT, it had none: its home was
    left in /tmp. It runs in a process group of its own, so that a terminal's Ctrl-C does not reach
    it too (a second SIGINT would cut its cleanup short), with SIGINT's default action."""
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0,
                          preexec_fn=default_sigint, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            try:
                proc.send_signal(signal.SIGINT)
                proc.communicate(timeout=CLEAN_UP_S)  # reads its output meanwhile: a full pipe would block it
            finally:  # also when the test's own timeout (pytest-timeout) lands here
                if proc.poll() is None:
                    proc.kill()
            raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


class Descendants:
    """The processes a parent started (gunicorn's workers, circusd's
    watchers), remembered as :class:`psutil.Process` objects: each knows its
    pid's start time, so a survivor is killed only if the pid still names the
    same process, never a newcomer that reused it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.known: dict[int, psutil.Process] = {}

    def remember(self, recursive: bool = True) -> list[psutil.Process]:
        """Add the parent's current children; returns them."""
        try:
            children = psutil.Process(self.pid).children(recursive=recursive)
        except psutil.NoSuchProcess:
            return []
        self.known.update((c.pid, c) for c in children)
        return children

    def kill_survivors(self, wait: float = 5.0) -> int:
        """SIGKILL every remembered process still running (call after the
        parent stopped); returns how many there were."""
        killed = 0
        for proc in self.known.values():
            try:
                if proc.is_running():
                    proc.kill()
                    proc.wait(wait)
                    killed += 1
            except psutil.Error:
                pass
        return killed
