"""The writer under test of a benchmark (:func:`running_writer`): ``python -m workers.writer`` started
on a benchmark's home, its resident set size and CPU time sampled through the measured window, its
counters taken at the end of it (:class:`WriterRun`), and the writer stopped as circus would stop it.
"""
from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from testkit.process import stop_process
from testkit.writer import spawn


class RssSampler(threading.Thread):
    """Samples a process's resident set size every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(name=f"rss-{pid}", daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.cpu_s: float | None = None
        self._cpu0 = self._cpu()
        self._stop_event = threading.Event()

    def mark_start(self) -> None:
        """Count CPU time from now on (the measured window starts)."""
        self._cpu0 = self._cpu()

    def _cpu(self) -> float | None:
        try:
            t = self.process.cpu_times()
        except psutil.Error:
            return None
        return t.user + t.system

    def sample(self) -> None:
        try:
            rss = self.process.memory_info().rss
        except psutil.Error:
            return
        self.samples += 1
        self.peak = max(self.peak, rss)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling; ``cpu_s`` is then the CPU time (user + system) the
        process used while sampled."""
        self._stop_event.set()
        self.join()
        self.sample()
        cpu = self._cpu()
        if cpu is not None and self._cpu0 is not None:
            self.cpu_s = cpu - self._cpu0


def vm_hwm(pid: int) -> int | None:
    """The kernel's own peak RSS of ``pid`` (Linux ``VmHWM``), in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class WriterRun:
    """A running ``python -m workers.writer`` and what was measured of it."""

    proc: subprocess.Popen
    env: dict[str, str]
    log_path: Path
    sampler: RssSampler
    stats: dict[str, Any] | None = None
    stats_error: str | None = None
    peak_rss: int | None = None
    vm_hwm: int | None = None
    exit_code: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def finish_measuring(self) -> None:
        """Stop sampling and take the writer's counters: call at the end of the
        measured window, before stopping the writer."""
        from db.client import WriterClient
        from db.config import load_settings

        self.sampler.stop()
        self.peak_rss = self.sampler.peak
        self.vm_hwm = vm_hwm(self.pid)
        try:
            with WriterClient(settings=load_settings(self.env)) as client:
                self.stats = client.stats(timeout=10.0)
        except Exception as e:  # the measurement stands; an unresponsive writer is reported with it
            self.stats_error = f"{type(e).__name__}: {e}"
            self.extra["alive_after_stats"] = self.proc.poll() is None
            self.extra["log_tail"] = self.log_tail(30)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def summary(self) -> dict[str, Any]:
        mb = 1024 * 1024
        return {
            "pid": self.pid,
            "peak_rss_mb": None if self.peak_rss is None else round(self.peak_rss / mb, 1),
            "vm_hwm_mb": None if self.vm_hwm is None else round(self.vm_hwm / mb, 1),
            "rss_samples": self.sampler.samples,
            "cpu_s": None if self.sampler.cpu_s is None else round(self.sampler.cpu_s, 3),
            "exit_code": self.exit_code,
            "stats": self.stats,
            "stats_error": self.stats_error,
            **self.extra,
        }


@contextmanager
def running_writer(env: dict[str, str], *, ready_timeout: float = 30.0,
                   stop_timeout: float = 60.0) -> Iterator[WriterRun]:
    """Start the writer with :func:`testkit.writer.spawn` (it returns once the
    writer answers a ping), sample its RSS until :meth:`WriterRun.finish_measuring`,
    and on exit stop it with SIGTERM (it drains and exits 0) and wait."""
    log_path = Path(env["TICKSTACK_HOME"]) / "log" / "bench-writer.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = spawn(env, timeout=ready_timeout, stdout=log, stderr=subprocess.STDOUT)
    run = WriterRun(proc=proc, env=env, log_path=log_path, sampler=RssSampler(proc.pid))
    run.sampler.start()
    try:
        yield run
    finally:
        if run.sampler.is_alive():
            run.sampler.stop()
        stop_process(proc, stop_timeout)
        run.exit_code = proc.returncode
        if run.exit_code != 0 and "log_tail" not in run.extra:
            run.extra["log_tail"] = run.log_tail(30)
