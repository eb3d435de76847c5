"""Circus plugins of ours.

``Flapping``: circus's own flapping plugin sends ``stop`` fire-and-forget.
circusd runs one command at a time and rejects a concurrent one ("arbiter is
already running ... command", circus #1154); the rejection goes back to a
caller that is not listening, so a crash-looping watcher can go on being
respawned forever. This subclass sends stop and start as calls and retries
them while circusd is busy. The plugin runs in a process of its own, so the
short blocking retry stalls nobody; a lock keeps its timer thread and its
event loop from using the one socket at once.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from circus.plugins.flapping import Flapping as CircusFlapping

from supervision.circus import is_busy, retry_while_busy

log = logging.getLogger("circus")


class Flapping(CircusFlapping):
    retry_for = 15.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._socket_lock = threading.Lock()

    def call(self, command: str, **props: Any) -> dict[str, Any]:
        with self._socket_lock:
            return super().call(command, **props)

    def cast(self, command: str, **props: Any) -> None:
        answer = retry_while_busy(lambda: self.call(command, **props), self.retry_for, pause=0.2)
        if answer.get("status") == "ok":
            return
        reason = str(answer.get("reason", ""))
        if is_busy(answer):
            log.error("flapping: gave up on %s %s: circusd stayed busy (%s)", command, props.get("name"), reason)
        else:
            log.error("flapping: %s %s failed: %s", command, props.get("name"), reason)
