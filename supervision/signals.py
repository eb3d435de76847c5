"""circusd's stop signals are never lost: SIGINT/SIGTERM/SIGQUIT's quit waits for the command that
holds the arbiter, then stops the stack.

circus (0.19) turns those signals into one ``quit`` command, dispatched once. circusd runs one command
at a time (``circus.util.synchronized``): while another holds the arbiter (the start of every watcher,
the first second or so of ``make run``; a ``restart writer`` waiting for the writer to drain; a
reload), the quit is refused with a ``ConflictError`` answered to nobody, and the signal is dropped.
Ctrl-C where ``make run`` runs, or ``kill PID`` of circusd, then did nothing: circusd logged "Got
signal SIG_INT" and the stack came up (or ran on) with ``make run``'s terminal held (a new user's
run). Here the quit is asked again every :data:`RETRY_S` seconds until the arbiter takes it, that is
once the running command is done, as a ``circusctl quit`` sent again would be.

Installed in circusd as it reads circus.ini (:mod:`supervision.hooks` is imported then, before circus
registers its signal handlers), by replacing ``circus.sighandler.SysHandler.quit``, the method its
SIGINT, SIGTERM and SIGQUIT handlers call, in that process only. It uses no private part of circus:
the handler's controller, its loop and arbiter, and ``Arbiter.stop``, which raises ``ConflictError``
while another command runs.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("circus")

#: Seconds between two attempts of a quit that found another command running.
RETRY_S = 0.2


def quit_when_free() -> None:
    """Make circus's signal handler's quit wait for a running command (see the module); once."""
    from circus.sighandler import SysHandler

    if getattr(SysHandler, "tickstack_quit_when_free", False):
        return
    SysHandler.quit = _quit
    SysHandler.tickstack_quit_when_free = True


def _quit(handler: Any) -> None:
    """``SysHandler.quit``, called from a signal handler: the loop makes the attempt. A signal while
    a quit waits or runs adds nothing."""
    if getattr(handler, "tickstack_quit_asked", False):
        return
    handler.tickstack_quit_asked = True
    handler.controller.loop.add_callback_from_signal(_attempt, handler, True)


def _attempt(handler: Any, first: bool) -> None:
    from circus.exc import ConflictError

    try:
        handler.controller.arbiter.stop()
    except ConflictError as e:
        if first:
            log.info("quit (a stop signal) waits for the command circusd runs (%s), then stops the stack", e)
        handler.controller.loop.call_later(RETRY_S, _attempt, handler, False)
    except Exception:  # circus's own failure, logged by its loop: the next stop signal tries again
        handler.tickstack_quit_asked = False
        raise
