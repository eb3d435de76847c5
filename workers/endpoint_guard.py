"""The writer's socket file (:class:`EndpointGuard`; the IO thread calls :meth:`EndpointGuard.check`
once a second).

Removed under a running writer (``rm run/writer.sock``, a tidy-up of the run folder): the clients
already connected went on, and every new one, a restarted worker, the API's next request, ``db
doctor``, waited out its deadline; the writer said nothing, and its heartbeats went on, so nothing
restarted it (fault hunt, round 40). It binds its endpoint again, which makes the file anew and keeps
every connection it has, and says so. A file of another put at the path is not touched: said once.
Its folder removed with it (``rm -r run/``), the bind failed and the writer served on unreachable, saying
"restart it" once (fault hunt, round 41): the home's run folder, which the writer made at its start, is
made again (private) first; not a home removed whole, nor a folder of another endpoint.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq

log = logging.getLogger("tickstack.writer")


class EndpointGuard:
    """The socket file of ``endpoint`` (``ipc://`` only: a TCP endpoint has none), as bound."""

    def __init__(self, endpoint: str, run_dir: Path | None = None) -> None:
        """``run_dir``: the home's run folder, made again when it holds the socket and is removed."""
        self.endpoint = endpoint
        self.path = Path(endpoint.removeprefix("ipc://")) if endpoint.startswith("ipc://") else None
        self.run_dir = run_dir
        self.bound = self._identity()
        self.said_replaced = False

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path) if self.path is not None else None
        except OSError:
            return None
        return None if st is None else (st.st_dev, st.st_ino)

    def check(self, router: zmq.Socket) -> None:
        """Bind again if the socket file is gone; say once if another file took its path."""
        if self.path is None or self.bound is None:
            return
        now = self._identity()
        if now == self.bound:
            return
        if now is not None:
            if not self.said_replaced:
                self.said_replaced = True
                log.error("writer: its socket %s was replaced by another file, which it leaves alone: new clients "
                          "reach that, not this writer; restart the writer", self.path)
            return
        try:
            router.unbind(self.endpoint)
        except zmq.ZMQError:  # its file is gone already: nothing else to undo
            pass
        self._make_run_dir()
        try:
            router.bind(self.endpoint)
        except zmq.ZMQError as e:  # the folder is gone or not writable: the words say which
            log.error("writer: its socket %s was removed, and binding it again failed (%s): clients not yet "
                      "connected cannot reach this writer; restart it", self.path, e.strerror)
            self.bound = None
            return
        self.bound = self._identity()
        log.error("writer: its socket %s was removed (clients not yet connected could not reach it); bound "
                  "again", self.path)

    def _make_run_dir(self) -> None:
        """The home's run folder again, private, when the socket was in it and it was removed; only
        inside a home that is still there (one moved whole gets nothing new at its old path)."""
        if self.path is None or self.run_dir is None or self.path.parent != self.run_dir:
            return
        try:
            self.run_dir.mkdir(mode=0o700)  # no parents: not a home removed whole
        except OSError:  # there, or the home is gone or not writable (the bind's failure says so)
            return
        log.error("writer: its run folder %s was removed; made again", self.run_dir)
