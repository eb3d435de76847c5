"""The measured window seen from the machine: where the CPU time went
(by kind, by process group, to other processes), CPU pressure, the WAL."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.api.load import schedstat
from bench.common import sleep_until


def _psi_cpu_some_us() -> int | None:
    """Linux CPU pressure: total µs some task was runnable but waiting for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpu_s(pid: int) -> float | None:
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


#: CPU time categories of ``psutil.cpu_times()`` reported for the whole machine
#: (guest time is already inside user time on Linux).
CPU_KINDS = {"user": ("user", "nice"), "system": ("system",), "irq": ("irq", "softirq"), "steal": ("steal",),
             "idle": ("idle", "iowait")}


def _process_cpu_table() -> dict[int, tuple[str, float]]:
    """Every process's (label, CPU seconds) now."""
    table = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        t = proc.info["cpu_times"]
        if t is None:
            continue
        cmd = " ".join(proc.info["cmdline"] or []) or f"[{proc.info['name']}]"
        table[proc.pid] = (cmd[:70], t.user + t.system)
    return table


class WindowMonitor(threading.Thread):
    """From ``start_at`` for ``seconds``: the machine's CPU time by kind
    (steal included: on a VM the host can take CPUs away) and Linux CPU
    pressure; CPU time and run-queue wait of each server process group; what
    every other process on the machine used (the benchmark's own processes
    are this one and its descendants); the WAL's size."""

    def __init__(self, groups: dict[str, list[int]], wal_path: Path, start_at: float, seconds: float) -> None:
        super().__init__(name="window-monitor", daemon=True)
        self.groups = groups
        self.wal_path = wal_path
        self.start_at = start_at
        self.seconds = seconds
        self.wal_max = 0
        self.wal_at_start = 0
        self.result: dict[str, Any] = {}

    def _wal_size(self) -> int:
        try:
            return self.wal_path.stat().st_size
        except OSError:
            return 0

    def _snapshot(self) -> dict[str, Any]:
        pids = [pid for group in self.groups.values() for pid in group]
        me = psutil.Process()
        return {"t": time.monotonic(), "sys": psutil.cpu_times(), "psi": _psi_cpu_some_us(),
                "cpu": {pid: _cpu_s(pid) for pid in pids}, "sched": {pid: schedstat(pid) for pid in pids},
                "ours": {me.pid, *(c.pid for c in me.children(recursive=True))}, "all": _process_cpu_table()}

    def run(self) -> None:
        sleep_until(self.start_at)
        before = self._snapshot()
        self.wal_at_start = self._wal_size()
        end = self.start_at + self.seconds
        while time.monotonic() < end:
            self.wal_max = max(self.wal_max, self._wal_size())
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        after = self._snapshot()
        self.result = self._compare(before, after)

    def _compare(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        elapsed = after["t"] - before["t"]
        kinds = {kind: round(sum(getattr(after["sys"], f, 0.0) - getattr(before["sys"], f, 0.0) for f in fields), 3)
                 for kind, fields in CPU_KINDS.items()}
        total = sum(kinds.values())
        busy = total - kinds["idle"]
        groups: dict[str, Any] = {}
        for name, pids in self.groups.items():
            cpu = wait = 0.0
            for pid in pids:
                c0, c1 = before["cpu"].get(pid), after["cpu"].get(pid)
                s0, s1 = before["sched"].get(pid), after["sched"].get(pid)
                if c0 is not None and c1 is not None:
                    cpu += c1 - c0
                if s0 is not None and s1 is not None:
                    wait += (s1[1] - s0[1]) / 1e9
            groups[name] = {"pids": pids, "cpu_s": round(cpu, 3), "runq_wait_s": round(wait, 3)}
        ours_pids = before["ours"] | after["ours"]
        used: dict[int, tuple[str, float]] = {}
        for pid, (label, cpu) in after["all"].items():
            if pid in ours_pids:
                continue
            # A process that started during the window: all of its CPU time counts.
            delta = cpu - before["all"][pid][1] if pid in before["all"] else cpu
            if delta > 0:
                used[pid] = (label, delta)
        ours_cpu = sum(after["all"][p][1] - before["all"][p][1] for p in ours_pids
                       if p in after["all"] and p in before["all"])
        top = sorted(used.items(), key=lambda kv: -kv[1][1])[:5]
        capacity = (psutil.cpu_count() or 1) * elapsed
        psi = None
        if before["psi"] is not None and after["psi"] is not None and elapsed > 0:
            psi = round((after["psi"] - before["psi"]) / 1e6 / elapsed * 100, 1)
        return {
            "elapsed_s": round(elapsed, 3), "cpus": psutil.cpu_count() or 1,
            "system_cpu_s": kinds, "system_busy_pct": round(busy / total * 100, 1) if total > 0 else None,
            "system_busy_cpu_s": round(busy, 3),
            "cpu_pressure_some_pct": psi,
            "groups": groups,
            "ours_cpu_s": round(ours_cpu, 3),
            # Everything busy that was not this benchmark: other processes, short-lived ones, the kernel.
            "not_ours_pct": round(max(0.0, busy - ours_cpu) / capacity * 100, 1) if capacity > 0 else None,
            "others_cpu_s": round(sum(cpu for _label, cpu in used.values()), 3),
            "others_top": [{"pid": pid, "cpu_s": round(cpu, 3), "cmd": label} for pid, (label, cpu) in top],
            "wal_start_mb": round(self.wal_at_start / 2**20, 2),
            "wal_max_mb": round(self.wal_max / 2**20, 2),
        }
