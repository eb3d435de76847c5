"""Circus hooks: start dependents only once the writer is ready.

Circus starts watchers in priority order but never waits for one to be
ready. ``wait_for_writer`` is every dependent's ``before_start`` hook: it
pings the writer until it answers, bounded, because hooks run on circusd's
own event loop and stall the whole daemon while they run. Circus reads a
falsy return (None included) as failure and leaves the watcher stopped, so
it returns True or False, never None.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("circus")

#: Seconds a dependent waits for the writer before circus gives up on it.
READY_TIMEOUT = float(os.environ.get("TICKSTACK_READY_TIMEOUT", "30"))


def wait_for_writer(watcher: Any, arbiter: Any, hook_name: str, **kwargs: Any) -> bool:
    from db.client import WriterClient
    from db.config import load_settings
    from db.errors import WriterUnavailable

    deadline = time.monotonic() + READY_TIMEOUT
    client = WriterClient(settings=load_settings(), deadline=1.0)
    try:
        while True:
            try:
                ping = client.ping(timeout=0.5)
                log.info("%s: writer pid %s ready (%.1f ms); starting %s", hook_name, ping["pid"],
                         ping["latency_ms"], watcher.name)
                return True
            except WriterUnavailable:
                if time.monotonic() >= deadline:
                    log.error("%s: writer not ready after %.0f s; not starting %s (circusctl start %s retries)",
                              hook_name, READY_TIMEOUT, watcher.name, watcher.name)
                    return False
    finally:
        client.close()
