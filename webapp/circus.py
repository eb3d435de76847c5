"""Talking to circusd from the web apps: status, stats and commands.

Per-process figures (CPU, memory of gunicorn's workers too) are measured by
:mod:`webapp.console.procstats`. circusd runs one command at a time and answers a concurrent one with
"arbiter is already running X command" (circus #1154); :meth:`Circus.call`
retries that briefly and otherwise raises :class:`CircusError` with a plain
message, never a stack trace for the operator.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

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
        # Imported here: importing circus configures the root logger
        # (logging.basicConfig) as a side effect, which must not happen to a
        # worker that merely imports this module.
        from circus.client import CircusClient
        from circus.exc import CallError

        if self.endpoint.startswith("ipc://") and not Path(self.endpoint[len("ipc://"):]).exists():
            # Say so at once instead of waiting the timeout for no answer.
            raise CircusError(f"circusd is not running (no socket at {self.endpoint[len('ipc://'):]}); start "
                              "the stack with `make run`")
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

