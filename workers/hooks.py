"""Circus hooks: start dependents only once the writer is ready.

Circus starts watchers in priority order but never waits for one to be
ready. ``wait_for_writer`` is every dependent's ``before_start`` hook: it
pings the writer until it answers, bounded by ``TICKSTACK_READY_TIMEOUT``,
because hooks run on circusd's own event loop and stall the whole daemon
while they run. Circus reads a falsy return (None included) as failure and
leaves the watcher stopped, so it returns True or False, never None.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("circus")


def wait_for_writer(watcher: Any, arbiter: Any, hook_name: str, **kwargs: Any) -> bool:
    # Imported here: circusd imports this module at start, before any watcher's environment matters.
    from db.client import WriterClient
    from db.config import ConfigError, load_settings
    from db.errors import WriterUnavailable

    try:
        settings = load_settings()
    except ConfigError as e:
        log.error("%s: %s; not starting %s", hook_name, e, watcher.name)
        return False
    client = WriterClient(settings=settings, deadline=1.0)
    try:
        ping = client.wait_ready(settings.ready_timeout)
    except WriterUnavailable:
        log.error("%s: writer not ready after %.0f s; not starting %s (circusctl start %s retries)",
                  hook_name, settings.ready_timeout, watcher.name, watcher.name)
        return False
    finally:
        client.close()
    log.info("%s: writer pid %s ready (%.1f ms); starting %s", hook_name, ping["pid"], ping["latency_ms"],
             watcher.name)
    return True
