"""Stopping what the harness started: always by pid, never by name, so a
test or benchmark cannot touch the user's own processes (or another test's)."""
from __future__ import annotations

import signal
import subprocess

import psutil


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
