"""The two variants of ``python -m bench chaos``: the writer killed under
load, and the whole stack killed under load. Each runs on a fresh
``TICKSTACK_HOME`` and returns its figures (see :mod:`bench.chaos.ledger`)."""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.chaos.fleet import Fleet
from bench.chaos.ledger import verdict
from bench.common import fresh_home
from db.client import WriterClient
from db.config import Settings, load_settings
from supervision.circus import Circus
from testkit.circus import CircusStack
from testkit.gunicorn import get_json
from testkit.process import stop_process
from testkit.writer import spawn

#: How long a restarted writer or stack may take to be ready before the run fails.
READY_TIMEOUT = 120.0


@dataclass(frozen=True)
class Plan:
    """What a run does (from the command line)."""

    seed: int
    producers: int
    writer_kills: int
    stack_rounds: int
    min_gap: float
    max_gap: float
    producer_kill_chance: float
    pause: float
    settle: float


def _say(text: str) -> None:
    print(f"[chaos] {text}", file=sys.stderr, flush=True)


def _wait_gap(rng: random.Random, plan: Plan, fleet: Fleet) -> float:
    """Sleep a random moment (seeded) while the producers write; raise if one died."""
    gap = rng.uniform(plan.min_gap, plan.max_gap)
    end = time.monotonic() + gap
    while time.monotonic() < end:
        fleet.check_alive()
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))
    return gap


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _finish(fleet: Fleet, stop_service: Callable[[], None], settings: Settings, kills: list[dict[str, Any]],
            started: float, writer_log: Path, **extra: Any) -> dict[str, Any]:
    """Stop the producers (each waits for its requests in flight), then the
    writer or stack (it drains and checkpoints), then compare the acks with
    the database. When anything is wrong, the writer's log tail goes with it."""
    codes = fleet.stop()
    stop_service()
    result = verdict(fleet.acks(), settings).as_dict()
    result.update(kills=len(kills), producer_kills=fleet.kills, producers=len(fleet.slots),
                  producer_exit_codes=codes, ready_s=[k["ready_s"] for k in kills], kill_log=kills,
                  elapsed_s=round(time.monotonic() - started, 1), **extra)
    if not result["ok"] or result["failed_requests"]:
        result["writer_log_tail"] = _tail(writer_log)
    return result


# --- the writer alone ---------------------------------------------------------------------------


def _writer_log(home: Path) -> Path:
    path = home / "log" / "chaos-writer.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _start_writer(env: dict[str, str], home: Path) -> subprocess.Popen:
    with open(_writer_log(home), "ab") as log:
        return spawn(env, timeout=READY_TIMEOUT, stdout=log, stderr=subprocess.STDOUT)


def writer_chaos(plan: Plan, kills: int | None = None) -> dict[str, Any]:
    """``plan.producers`` producers write through the writer; ``kills`` times,
    at a random moment, the writer is SIGKILLed (and, by chance, a producer
    too) and started again at once, as circus would; time to ready is from
    the kill to the new writer's first answer."""
    kills = plan.writer_kills if kills is None else kills
    rng = random.Random(plan.seed)
    started = time.monotonic()
    with fresh_home("ts-chaos-") as (home, env):
        writer = _start_writer(env, home)
        fleet = Fleet(env, home / "chaos", plan.producers, pause=plan.pause, tag="w")
        log: list[dict[str, Any]] = []
        try:
            fleet.start()
            _wait_gap(rng, plan, fleet)
            for n in range(1, kills + 1):
                gap = _wait_gap(rng, plan, fleet)
                victim = rng.randrange(plan.producers) if rng.random() < plan.producer_kill_chance else None
                before = rng.random() < 0.5
                killed_source = fleet.kill_and_replace(victim) if victim is not None and before else None
                t0 = time.monotonic()
                writer.kill()
                writer.wait()
                if victim is not None and not before:
                    killed_source = fleet.kill_and_replace(victim)
                old_pid = writer.pid
                writer = _start_writer(env, home)
                ready = time.monotonic() - t0
                log.append({"kill": n, "after_s": round(gap, 3), "writer_pid": old_pid, "new_pid": writer.pid,
                            "producer_killed": killed_source, "ready_s": round(ready, 3)})
                _say(f"writer kill {n}/{kills}: ready again in {ready:.2f} s"
                     + (f" (and producer {killed_source} killed)" if killed_source else ""))
            time.sleep(plan.settle)
            return _finish(fleet, lambda: stop_process(writer, 60), load_settings(env), log, started, _writer_log(home))
        finally:
            fleet.kill_all()
            stop_process(writer, 60)


# --- the whole stack ----------------------------------------------------------------------------


def stack_ready(stack: CircusStack, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
    """Until the stack serves: every watcher is up (:class:`~supervision.circus.WatcherState`, the
    rule of ``/api/health``: active with the processes circus was asked for, at least one), the
    writer answers a ping, and ``/api/health`` answers 200. Returns what it saw."""
    deadline = time.monotonic() + timeout
    last: Any = None
    circus = Circus(stack.endpoint)
    with WriterClient(settings=load_settings(stack.env), deadline=1.0) as client:
        while time.monotonic() < deadline:
            try:
                watchers = circus.watchers()
                statuses = {name: w.status for name, w in watchers.items()}
                down = {name: w.problem for name, w in watchers.items() if not w.up}
                ping = client.ping(timeout=1.0)
                code, health = get_json(stack.api_port, "/api/health")
                if code == 200 and watchers and not down:
                    return {"writer_pid": ping.get("pid"), "health": health.get("status"), "statuses": statuses}
                last = {"statuses": statuses, "down": down, "health_code": code}
            except Exception as e:  # not up yet
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.2)
    raise RuntimeError(f"the stack was not ready within {timeout:g} s; last: {last}")


def stack_processes(stack: CircusStack) -> list[psutil.Process]:
    """Every process circusd started, by the pids its ``list`` command gives
    for each watcher (plugins and circusd-stats included), with their own
    children (gunicorn's workers): as :class:`psutil.Process`, so a pid
    reused later is never killed."""
    procs: dict[int, psutil.Process] = {}
    for watcher in stack.call("list")["watchers"]:
        for pid in stack.pids_of(watcher):
            try:
                p = psutil.Process(pid)
                procs[pid] = p
                procs.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    return list(procs.values())


def kill_stack(stack: CircusStack) -> tuple[int, int]:
    """SIGKILL circusd, then every process it had started (recorded first),
    and wait until each is gone. Returns (processes recorded, still running
    when their SIGKILL came)."""
    procs = stack_processes(stack)
    assert stack.proc is not None
    stack.proc.kill()
    stack.proc.wait()
    alive = 0
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive += 1
                p.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 10
    for p in procs:  # gone, or a zombie its new parent has not reaped yet (dead for our purposes)
        while time.monotonic() < deadline:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
    return len(procs), alive


def stack_chaos(plan: Plan, rounds: int | None = None) -> dict[str, Any]:
    """The real ``circus.ini`` under ``plan.producers`` producers; ``rounds``
    times, at a random moment: SIGKILL circusd, kill -9 every process it had
    started, restart as ``make run`` does (``python -m db prepare``, then
    circusd) and wait until it serves. Time to ready is from the SIGKILL of
    circusd to the stack serving again."""
    rounds = plan.stack_rounds if rounds is None else rounds
    rng = random.Random(plan.seed + 1)
    started = time.monotonic()
    stack = CircusStack()
    fleet = Fleet(stack.env, stack.home / "chaos", plan.producers, pause=plan.pause, tag="s")
    log: list[dict[str, Any]] = []
    try:
        stack.start()
        first = stack_ready(stack)
        fleet.start()
        _wait_gap(rng, plan, fleet)
        for n in range(1, rounds + 1):
            gap = _wait_gap(rng, plan, fleet)
            t0 = time.monotonic()
            recorded, alive = kill_stack(stack)
            killed_at = time.monotonic() - t0
            stack.start()
            seen = stack_ready(stack)
            ready = time.monotonic() - t0
            log.append({"kill": n, "after_s": round(gap, 3), "processes_killed": recorded,
                        "running_at_kill": alive, "kill_s": round(killed_at, 3), "ready_s": round(ready, 3),
                        "writer_pid": seen["writer_pid"], "health": seen["health"]})
            _say(f"stack kill {n}/{rounds}: {recorded} processes killed, serving again in {ready:.2f} s "
                 f"(health {seen['health']})")
        time.sleep(plan.settle)
        return _finish(fleet, stack.stop, stack.settings, log, started, stack.home / "log" / "writer.log",
                       first_health=first["health"])
    finally:
        fleet.kill_all()
        stack.stop()
        shutil.rmtree(stack.home, ignore_errors=True)
