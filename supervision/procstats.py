"""CPU, memory, pids and uptime of each circus watcher, measured with psutil.

circus's own ``stats`` numbers are not used as they come: it formats memory as text ("24.02M"), and
it reads the CPU of a watcher's children (gunicorn's workers) through a fresh ``psutil.Process``
each time, so their CPU always reads 0. Here circus says which processes belong to which watcher,
and a :class:`ProcessMeter` measures them; it keeps its ``psutil.Process`` objects as long as the
measuring process lives (a gunicorn worker, the jobs worker), so CPU % is the CPU used since the
previous measurement, and on the first measurement of a process its average since it started.

Memory is RSS summed over the watcher's processes and their children (shared pages count once per
process, as in ``ps``).
"""
from __future__ import annotations

import re
import time
from typing import Any

import psutil

from db.validation import is_number
from supervision.circus import Circus, CircusError

_SIZE_RE = re.compile(r"([0-9.]+)\s*([KMGTP]?)B?")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}


def parse_size(text: Any) -> int | None:
    """circus's human size ("24.02M") in bytes; None for "N/A" or anything else unreadable."""
    match = _SIZE_RE.fullmatch(str(text).strip())
    if not match:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def create_time_lag() -> float:
    """How much earlier than the truth psutil's create times read, in seconds. On Linux a create time
    is the process's start in clock ticks since boot plus ``btime`` of ``/proc/stat``, which is whole
    seconds, truncated: so up to a second early (0.89 s on the machine where a restart of the jobs
    worker went uncounted: it seemed to start before the sample it had come after). Add it to a create
    time before comparing it with a wall-clock time; 0 where the boot clock is not known."""
    boot_clock = getattr(time, "CLOCK_BOOTTIME", None)
    if boot_clock is None:
        return 0.0
    lag = time.time() - time.clock_gettime(boot_clock) - psutil.boot_time()
    return lag if 0.0 <= lag < 1.0 else 0.0  # outside: a clock step between the two reads; no guess


class ProcessMeter:
    """Measures processes by pid, remembering them between calls (see the module docstring).

    Not thread-safe; use one per thread or guard it (``cpu_percent`` keeps state per object)."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        #: The create time last measured of each pid, kept after the process is gone (until
        #: :meth:`forget_others`): what identified it, for as long as circus still lists it.
        self._created: dict[int, float] = {}

    def measure(self, pid: int) -> dict[str, Any] | None:
        """``{"pid", "cpu", "rss", "started"}`` of one process; None if it is gone or not readable."""
        proc = self._procs.get(pid)
        if proc is not None and not proc.is_running():  # exited, or the pid was reused
            proc = None
        try:
            fresh = proc is None
            if proc is None:
                proc = psutil.Process(pid)
            with proc.oneshot():
                started = proc.create_time()
                if fresh:
                    proc.cpu_percent(None)  # start the interval the next call measures
                    times = proc.cpu_times()
                    cpu = 100.0 * (times.user + times.system) / max(time.time() - started, 0.001)
                else:
                    cpu = proc.cpu_percent(None)
                rss = proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            self._procs.pop(pid, None)
            if len(self._created) > 2 * len(self._procs) + 64:  # a user that never calls forget_others
                self._created = {p: self._created[p] for p in self._procs if p in self._created}
            return None
        self._procs[pid] = proc
        self._created[pid] = started
        return {"pid": pid, "cpu": round(cpu, 1), "rss": rss, "started": started}

    def last_create_time(self, pid: int) -> float | None:
        """The create time :meth:`measure` last read for ``pid``, if it ever read one."""
        return self._created.get(pid)

    def forget_others(self, pids: set[int]) -> None:
        """Drop the processes not in ``pids`` (they exited): the cache stays bounded."""
        for cache in (self._procs, self._created):
            for pid in [p for p in cache if p not in pids]:
                del cache[pid]


def _process(info: dict[str, Any], meter: ProcessMeter) -> dict[str, Any]:
    """One circus process with its children, measured; circus's numbers when psutil cannot read it.

    ``started`` (shown as its age) falls back to circus's own start time; ``create_time`` is
    psutil's only. For a process that ended since circus listed it, it is the one we read at an
    earlier measure, else the one circusd's psutil read for its answer (None if neither has it):
    ours first, the value that identified it before (each psutil ``Process`` object reads the boot
    time once, at its first ``create_time()``: a clock step between circusd's read and ours would
    set the two a second apart). What identifies a process is the latter
    (see :func:`supervision.sampler.live_processes`): circus's ``started`` is ``time.time()`` read
    before it forks, psutil adds the kernel's start ticks to the boot time in whole seconds
    (``btime``), so the two differ by up to a second, the same for every process of a boot (0.3 to
    0.5 s here), and one process read once each way would look like two."""
    pid = int(info["pid"])
    children = [c for c in info.get("children") or [] if isinstance(c, dict) and "pid" in c]
    cpu = rss = 0.0
    started: float | None = None
    create_time: float | None = None
    for raw in [info, *children]:
        measured = meter.measure(int(raw["pid"]))
        if measured is None:
            cpu += float(raw["cpu"]) if is_number(raw.get("cpu")) else 0.0
            rss += parse_size(raw.get("mem_info1")) or 0
            if raw is info and is_number(info.get("started")):
                started = float(info["started"])
            if raw is info:
                create_time = meter.last_create_time(pid)
                if create_time is None and is_number(info.get("create_time")):
                    create_time = float(info["create_time"])  # psutil's, read by circusd
            continue
        cpu += measured["cpu"]
        rss += measured["rss"]
        if raw is info:
            started = create_time = measured["started"]
    return {"pid": pid, "children": sorted(int(c["pid"]) for c in children), "cpu": round(cpu, 1),
            "rss": int(rss), "started": started, "create_time": create_time,
            "age": round(time.time() - started, 1) if started is not None else None}


def collect_watchers(circus: Circus, meter: ProcessMeter, require_processes: bool = False) -> list[dict[str, Any]]:
    """Every watcher (circus plugins left out), sorted by name::

        {"name", "status", "numprocesses", "pids", "children", "cpu", "rss", "uptime",
         "processes": [{"pid", "children", "cpu", "rss", "started", "create_time", "age"}]}

    ``numprocesses`` counts circus's processes (gunicorn's master, not its workers, which are in
    ``children``); ``cpu`` is % of one core summed over all; ``cpu``, ``rss`` and ``uptime`` (the
    oldest process's age in seconds) are None with no process. Two circus calls; raises
    :class:`CircusError` when the first fails. When the second (``stats``) fails, for instance
    while circusd is busy restarting every watcher, the watchers come without their processes (a
    page still shows them), or, with ``require_processes``, it raises too: to the restart counts,
    watchers without processes would read as every process gone, then every one replaced."""
    statuses = circus.statuses()
    try:
        infos = circus.call("stats").get("infos") or {}
    except CircusError:
        if require_processes:
            raise
        infos = {}
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for name in sorted(statuses):
        if name.startswith("plugin:"):
            continue
        procs = []
        for info in (infos.get(name) or {}).values():
            if isinstance(info, dict) and "pid" in info:  # circus says "No such process" for one just gone
                procs.append(_process(info, meter))
        procs.sort(key=lambda p: p["pid"])
        for p in procs:
            seen.update([p["pid"], *p["children"]])
        ages = [p["age"] for p in procs if p["age"] is not None]
        out.append({
            "name": name, "status": statuses[name], "numprocesses": len(procs),
            "pids": [p["pid"] for p in procs], "children": [c for p in procs for c in p["children"]],
            "cpu": round(sum(p["cpu"] for p in procs), 1) if procs else None,
            "rss": sum(p["rss"] for p in procs) if procs else None,
            "uptime": max(ages) if ages else None, "processes": procs,
        })
    meter.forget_others(seen)
    return out



def takes_default_action(pid: int, signum: int) -> bool | None:
    """Whether ``signum`` would take its default action in process ``pid``: neither caught (the
    kernel's ``SigCgt`` mask in ``/proc/PID/status``) nor ignored (``SigIgn``). None when that
    cannot be told: no such process, a zombie (its masks are empty: it has ended), not Linux.

    A process that has not set its handler yet takes the default action: SIGHUP ends a gunicorn
    master that is still importing, where a running one reloads its workers on it."""
    fields: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("State", "").startswith(("Z", "X")):
            return None
        bit = 1 << (signum - 1)
        return not (int(fields["SigCgt"], 16) & bit or int(fields["SigIgn"], 16) & bit)
    except (OSError, KeyError, ValueError):
        return None
