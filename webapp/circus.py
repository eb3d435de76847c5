"""Talking to circusd from the web apps: status, stats and commands.

circusd runs one command at a time and answers a concurrent one with
"arbiter is already running X command" (circus #1154); :meth:`Circus.call`
retries that briefly and otherwise raises :class:`CircusError` with a plain
message, never a stack trace for the operator.
"""
from __future__ import annotations

import time
from typing import Any

from circus.client import CircusClient
from circus.exc import CallError

#: Commands the console may send, with the watcher they apply to.
ACTIONS = ("start", "stop", "restart", "incr", "decr")


class CircusError(RuntimeError):
    """circusd did not do what was asked; the message says why in words."""


class Circus:
    def __init__(self, endpoint: str, timeout: float = 5.0, busy_retry: float = 3.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.busy_retry = busy_retry

    def call(self, command: str, **props: Any) -> dict[str, Any]:
        deadline = time.monotonic() + self.busy_retry
        client = CircusClient(endpoint=self.endpoint, timeout=self.timeout)
        try:
            while True:
                try:
                    answer = client.call({"command": command, "properties": props})
                except CallError as e:
                    raise CircusError(f"circusd does not answer at {self.endpoint} ({e}); is the stack running?"
                                      ) from None
                if answer.get("status") == "ok":
                    return answer
                reason = str(answer.get("reason", "unknown error"))
                if "already running" in reason and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                if "already running" in reason:
                    raise CircusError(f"circusd is busy with another command ({reason}); try again in a moment")
                raise CircusError(f"circusd refused {command}: {reason}")
        finally:
            client.stop()

    def statuses(self) -> dict[str, str]:
        """Every watcher's status (active, stopped, starting, stopping)."""
        return self.call("status")["statuses"]

    def watchers(self) -> list[dict[str, Any]]:
        """Every watcher with its processes and their CPU, memory and age."""
        statuses = self.statuses()
        out = []
        for name in sorted(statuses):
            if name.startswith("plugin:"):
                continue
            info: dict[str, Any] = {"name": name, "status": statuses[name], "processes": []}
            try:
                stats = self.call("stats", name=name, extended=False).get("info", {})
            except CircusError:
                stats = {}
            for pid, proc in sorted(stats.items(), key=lambda kv: str(kv[0])):
                if not isinstance(proc, dict) or "cpu" not in proc:
                    continue
                info["processes"].append({
                    "pid": int(pid), "cpu": _number(proc.get("cpu")), "mem": _number(proc.get("mem")),
                    "rss": _number(proc.get("mem_info1")), "age": _number(proc.get("age")),
                })
            info["numprocesses"] = len(info["processes"])
            info["cpu"] = round(sum(p["cpu"] or 0 for p in info["processes"]), 1)
            info["rss"] = sum(p["rss"] or 0 for p in info["processes"])
            ages = [p["age"] for p in info["processes"] if p["age"] is not None]
            info["uptime"] = round(max(ages), 1) if ages else None
            out.append(info)
        return out

    def act(self, action: str, watcher: str) -> dict[str, Any]:
        """start/stop/restart/incr/decr one watcher, waiting for the result."""
        if action not in ACTIONS:
            raise CircusError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        if watcher not in self.statuses():
            raise CircusError(f"no watcher named {watcher!r}")
        props: dict[str, Any] = {"name": watcher}
        if action in ("start", "stop", "restart"):
            props["waiting"] = True
        if action in ("incr", "decr"):
            props["nb"] = 1
        return self.call(action, **props)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # circus reports "N/A" for a process it cannot read
        return None
