"""Talking to circusd: status, stats and commands (console, API health, jobs' sampler).

Per-process figures (CPU, memory of gunicorn's workers too) are measured by
:mod:`supervision.procstats`. circusd runs one command at a time and answers a concurrent one with
"arbiter is already running X command" (circus #1154); :func:`retry_while_busy` is the one rule for
that answer (retry briefly, then give up), used by :meth:`Circus.call` and by our flapping plugin.
:meth:`Circus.call` raises :class:`CircusError` with a plain message, never a stack trace for the
operator.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Commands the console may send, with the watcher they apply to.
ACTIONS = ("start", "stop", "restart", "incr", "decr")


class CircusError(RuntimeError):
    """circusd did not do what was asked; the message says why in words."""


def is_busy(answer: dict[str, Any]) -> bool:
    """Whether circusd refused a command only because it is running another one."""
    return answer.get("status") != "ok" and "already running" in str(answer.get("reason", ""))


def retry_while_busy(send: Callable[[], dict[str, Any]], within: float, pause: float = 0.1) -> dict[str, Any]:
    """``send()`` a command until circusd answers anything but "already running", for at most
    ``within`` seconds; return the last answer (still busy when time ran out)."""
    deadline = time.monotonic() + within
    while True:
        answer = send()
        if not is_busy(answer) or time.monotonic() >= deadline:
            return answer
        time.sleep(pause)


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
        client = CircusClient(endpoint=self.endpoint, timeout=self.timeout)
        try:
            try:
                answer = retry_while_busy(lambda: client.call({"command": command, "properties": props}),
                                          self.busy_retry)
            except CallError as e:
                raise CircusError(f"circusd does not answer at {self.endpoint} ({e}); is the stack running?"
                                  ) from None
        finally:
            client.stop()
        if answer.get("status") == "ok":
            return answer
        reason = str(answer.get("reason", "unknown error"))
        if is_busy(answer):
            raise CircusError(f"circusd is busy with another command ({reason}); try again in a moment")
        raise CircusError(f"circusd refused {command}: {reason}")

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

