"""circusd without a traceback for a routine skip: a circus hook that installs a logging filter.

circusd runs ``Arbiter.manage_watchers`` every ``check_delay`` seconds from a tornado
``PeriodicCallback``. It takes the arbiter's one-command lock (``@synchronized``); when a command
holds it (a restart or stop that waits for a draining writer, a ``quit``) it raises
``ConflictError: arbiter is already running X command``, and tornado logs that at ERROR with a
full traceback ("Exception in callback ...") on ``tornado.application``. Nothing went wrong:
that round of checks is skipped and the next one runs ``check_delay`` later (the running command
manages the watcher it acts on meanwhile). One traceback per restart, stop and quit buried the
real errors in circusd.log.

Why a logging filter rather than wrapping ``manage_watchers`` so that it skips by itself while a
command runs: plugins run in processes of their own and cannot reach the arbiter, so a wrapper
would have to replace the bound method already held by the controller's periodic callback
(``arbiter.ctrl.caller.callback``), a private attribute chain of circus, and re-implement the lock
test of ``circus.util.synchronized``; a circus upgrade could silently undo it or skip checks it
should not. The filter changes no behaviour: it drops exactly that record (a ``ConflictError``
raised by ``manage_watchers``, identified by the exception type and the callback's name) and logs
one DEBUG line in its place; every other exception in a tornado callback is logged as before.

Installed by a hook that runs in circusd's own process (``hooks.before_spawn`` of the writer in
circus.ini, the first watcher to start); installing it again is a no-op.
"""
from __future__ import annotations

import logging
from typing import Any

#: tornado's logger for exceptions in callbacks (tornado.log.app_log).
TORNADO_APP_LOG = "tornado.application"
log = logging.getLogger("circus")


class ManageWatchersConflict(logging.Filter):
    """Drops tornado's "Exception in callback" record of a ``ConflictError`` from
    ``manage_watchers`` (circusd's periodic check that found a command running), logging one DEBUG
    line instead; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc).__name__ != "ConflictError" or "manage_watchers" not in str(record.args):
            return True
        log.debug("periodic manage_watchers skipped (%s); the next check runs as usual", exc)
        return False


def quiet_circusd(watcher: Any = None, arbiter: Any = None, hook_name: str = "", **kwargs: Any) -> bool:
    """circus hook: install :class:`ManageWatchersConflict` on tornado's callback logger in this
    process (circusd) once. Returns True: a falsy hook result would stop the watcher."""
    logger = logging.getLogger(TORNADO_APP_LOG)
    if not any(isinstance(f, ManageWatchersConflict) for f in logger.filters):
        logger.addFilter(ManageWatchersConflict())
    return True
