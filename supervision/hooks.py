"""Circus hooks: start only when alone in the home; start dependents only once the writer is ready.

``refuse_unless_alone`` is the writer's ``before_start`` hook. The writer starts first (highest
priority), so at circusd's start it runs before any process is spawned: if an earlier stack's
processes still run in this home (the writer lock held, an orphan, the watchdog's port taken; see
:mod:`db.preflight`), circusd exits 1 with the reason on its stderr and in its log, instead of
starting a second stack beside them. circus offers no earlier hook; it binds the API's and the
console's ports itself, before any hook, and a taken port makes circusd stop there, with "Could not
bind" in its log and exit status 0, circus's own way (``python -m db prepare``, run by ``make
run``, checks them first and says so).

``wait_for_writer`` is every dependent's ``before_start`` hook: circus starts watchers in priority
order but never waits for one to be ready, so it pings the writer until it answers, bounded by
``TICKSTACK_READY_TIMEOUT``, because hooks run on circusd's own event loop and stall the whole
daemon while they run. Circus reads a falsy return (None included) as failure and leaves the
watcher stopped, so hooks return True or False, never None.

Here, not in :mod:`workers`: importing that package sets ``OPENBLAS_NUM_THREADS`` in the importing
process, and circusd's own environment must not change once it runs, since ``circusctl
reloadconfig`` compares it (copied, ``copy_env``) with each watcher's and restarts every watcher
that differs.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger("circus")


def refuse_unless_alone(watcher: Any, arbiter: Any, hook_name: str, **kwargs: Any) -> bool:
    """At circusd's start: exit circusd (status 1) when anything of an earlier start is in the way.
    Later (``circusctl start writer``, a flapping retry) circusd stays up: the writer is not started
    while another process holds the writer lock."""
    from db.config import ConfigError, load_settings
    from db.preflight import blockers, circusd_pidfile, refusal

    try:
        settings = load_settings()
    except ConfigError as e:
        log.error("%s: %s; not starting %s", hook_name, e, watcher.name)
        return False
    starting = not arbiter.running
    # circus holds the web ports already (its own sockets); the watchdog binds its port after this.
    found = blockers(settings, tcp_ports=False, udp_port=starting, leftovers=starting)
    if not found:
        return True
    message = refusal(settings, found)
    log.error("%s: %s", hook_name, message)
    if starting:
        print(f"circusd: {message}", file=sys.stderr, flush=True)
        pidfile = circusd_pidfile(settings)  # circusd leaves it on this way out
        if pidfile.exists() and pidfile.read_text().strip() == str(os.getpid()):
            pidfile.unlink()
        # Out of circus's event loop (a hook's exception is only logged): circusd closes its
        # sockets and exits 1, before it has started anything.
        raise SystemExit(1)
    return False


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
