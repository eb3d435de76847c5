"""Private files for circus: what circusd writes for tickstack is mode 0600, whatever the umask.

Why ``umask = 077`` in circus.ini is not enough on its own (circus 0.19, ``circus/circusd.py``):

1. ``main()`` opens circusd's own log (``logoutput``, a ``WatchedFileHandler``) in
   ``configure_logger`` before it reads the ``umask`` option;
2. it builds every watcher while loading the config (``Arbiter.load_from_config``), and a
   ``FileStream`` opens its file in its constructor: also before ``os.umask`` is called;
3. its pid file is created with a fixed mode 0644 and chmod-ed to it (``circus.pidfile.Pidfile``),
   whatever the umask.

From then on the umask holds: the processes circusd starts, its sockets and any file opened later
(a rotated log) are private. So:

* :class:`PrivateFileStream` creates its file 0600 and narrows an existing one (``fchmod``),
  whatever the umask, at start and at each rotation; circus.ini uses it for every watcher's stdout
  and stderr. It also survives a full disk: output that cannot be written is counted, the log
  says how much was lost once the disk takes writes again, and circusd never sees the error;
* what a process wrote last before it was stopped is written too (:func:`drain_before_removal`):
  circus stopped reading its pipes as soon as it saw the process gone, and lost that output about
  one stop in ten (the ticks worker's summary line, the writer's "final checkpoint done"); and
  before circus closes the pipes of a process that ended by itself (:func:`drain_before_close`);
* :func:`private_circusd_files` is a circus hook (``after_start`` of the writer, the first watcher
  circusd starts) that narrows circusd's own log and pid file to 0600, the two files circus creates
  before (or against) the umask. They are in ``$TICKSTACK_HOME/log`` and ``run`` (both 0700), so
  nobody else could read them in the meantime either.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import select
from typing import Any

from circus.process import Process
from circus.stream import FileStream
from circus.stream.redirector import Redirector

log = logging.getLogger("tickstack.streams")

PRIVATE = 0o600
#: The most a stopped process's pipe is read of at its removal: all a pipe buffer holds many times
#: over, and a bound should a child of the process still hold it open and write on.
DRAIN_LIMIT = 4 << 20


def _drain(redirector: Redirector, process: Any) -> None:
    """Write what ``process`` left unread in its pipes to its streams, as circus's reader would
    have: everything there now, never waiting for more (the pipes are blocking; ``poll`` says
    what is there)."""
    for name, pipe in redirector.get_process_pipes(process):
        try:  # each pipe on its own: a stream that fails on stdout still gets stderr drained
            fd = pipe.fileno()
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            left = DRAIN_LIMIT
            while left > 0 and poller.poll(0):
                data = os.read(fd, min(left, 1 << 16))
                if not data:  # its end: every writer has closed it
                    break
                left -= len(data)
                redirector.redirect[name]({"data": data, "pid": process.pid, "name": name})
        except ValueError:  # closed already
            continue
        except Exception as e:  # the stop goes on: a lost line is all it costs
            log.warning("the last %s of pid %s could not be read: %s", name, getattr(process, "pid", "?"), e)


def drain_before_removal(redirector: Redirector, process: Any) -> None:
    """circus's ``Redirector.remove_redirections``, once :func:`_drain` has written what ``process``
    wrote last. circus (0.19, ``Watcher.kill_process``) removes a stopped process's pipes from its
    loop as soon as it sees the process gone, polling every 0.1 s, and closes them: output written
    just before the exit and not yet read was lost (4 lines of 39 stops, a process that writes a
    line as SIGTERM ends it). Installed in place of circus's method when circusd loads this module
    (circus.ini names its stream class): circus makes its redirectors itself. A failure of the
    drain is logged (:func:`_drain`, pipe by pipe), never the stop's."""
    _drain(redirector, process)
    _circus_remove_redirections(redirector, process)


def drain_before_close(process: Any) -> None:
    """circus's ``Process.close_output_channels``, once the process's pipes, if its watcher's
    redirector still reads them, went through :func:`drain_before_removal`. circus (0.19) closes the
    pipes of a process that ended by itself (a crash) when its periodic check reaps it
    (``Watcher.reap_process``, every ``check_delay``), without removing them: the drain never saw
    them, and what its loop had not read (1 KiB a turn: a traceback's end) was lost. A stop by
    ``kill_process`` removed them first: nothing is left to do then. A failure is logged, never the
    reap's."""
    redirector = getattr(getattr(process, "watcher", None), "stream_redirector", None)
    if redirector is not None and getattr(process, "redirected", False):
        try:
            redirector.remove_redirections(process)
        except Exception as e:  # the reap goes on: a lost line is all it costs
            log.warning("the last output of pid %s could not be read: %s", getattr(process, "pid", "?"), e)
    _circus_close_output_channels(process)


# circus's own methods, kept once: a reload of this module (circus reloads a stream's module when an
# option of it is set) finds ours in their place.
_circus_remove_redirections = getattr(Redirector.remove_redirections, "circus_own", Redirector.remove_redirections)
drain_before_removal.circus_own = _circus_remove_redirections  # type: ignore[attr-defined]
Redirector.remove_redirections = drain_before_removal  # type: ignore[method-assign]
_circus_close_output_channels = getattr(Process.close_output_channels, "circus_own", Process.close_output_channels)
drain_before_close.circus_own = _circus_close_output_channels  # type: ignore[attr-defined]
Process.close_output_channels = drain_before_close  # type: ignore[method-assign]


class PrivateFileStream(FileStream):
    """circus's :class:`~circus.stream.FileStream` (same options: ``filename``, ``max_bytes``,
    ``backup_count``, ``time_format``), with files that are private and a full disk that is a state.
    """

    def __init__(self, filename: str | None = None, max_bytes: int = 0, backup_count: int = 0,
                 time_format: str | None = None, **kwargs: Any) -> None:
        #: Bytes of output that could not be written (disk full), not yet reported in the file.
        self.lost = 0
        self._lost_reason = ""
        super().__init__(filename, max_bytes, backup_count, time_format, **kwargs)

    def _open(self) -> Any:
        # The log folder moved or removed while circusd runs: made again, as circusd's own log's is
        # (CircusdLog), so the process's output goes on where the README says, not lost.
        os.makedirs(os.path.dirname(self._filename) or ".", mode=0o700, exist_ok=True)
        fd = os.open(self._filename, os.O_RDWR | os.O_APPEND | os.O_CREAT, PRIVATE)
        os.fchmod(fd, PRIVATE)  # a file made before (by circus's own stream, or under another umask)
        return os.fdopen(fd, "a+")

    def open(self) -> None:
        if self._file is not None and not self._file.closed and not self._still_named():
            self._discard()  # moved or removed (logrotate, a person): the output goes on at the path
        if self._file is None or self._file.closed:
            self._file = self._open()

    def _still_named(self) -> bool:
        """Whether the path still names the open file, as the stdlib's WatchedFileHandler checks
        before each line (one ``stat``): a log folder moved away kept every watcher's output
        going into the moved files, while circusd's own log was made again at its path."""
        try:
            named, held = os.stat(self._filename), os.fstat(self._file.fileno())
        except OSError:
            return False
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def __call__(self, data: dict[str, Any]) -> None:
        """Write one chunk of a process's output. On a full disk (any ``OSError``) the chunk is
        dropped and counted, the file is closed (with what its buffers held) and opened again at
        the next chunk; the first chunk written after says how many bytes were lost and why."""
        try:
            self.open()
            if self.lost:
                note = f"[circus: about {self.lost} bytes of this output were lost: {self._lost_reason}]\n"
                super().write_data({**data, "data": note.encode()})
                self.lost = 0
            super().__call__(data)
        except OSError as e:
            self.lost += len(data.get("data") or b"")
            self._lost_reason = f"{type(e).__name__}: {e}"
            self._discard()

    def close(self) -> None:
        """Close the file (circus does when the watcher stops); a full disk loses what is buffered."""
        self._discard()

    def _discard(self) -> None:
        """Close the file, dropping what its buffers hold (it could not be written)."""
        if self._file is None:
            return
        try:
            self._file.close()
        except OSError:
            pass  # closed all the same: CPython closes the descriptor even when the flush fails


def private_circusd_files(watcher: Any, arbiter: Any, hook_name: str, **kwargs: Any) -> bool:
    """circus hook: narrow circusd's own log (``logoutput``) and pid file (``pidfile``) to 0600.

    Always returns True: circus stops a watcher whose ``after_start`` hook returns something false
    or raises, and the writer must not stop over a file mode. A file that is not there (no
    ``pidfile`` option, a log to stdout or syslog) is skipped; a failure is logged."""
    for path in (getattr(arbiter, "pidfile", None), getattr(arbiter, "logoutput", None)):
        if not isinstance(path, str) or path in ("", "-", "stdout") or "://" in path:
            continue
        try:
            os.chmod(path, PRIVATE)
        except FileNotFoundError:
            continue
        except Exception as e:  # never the writer's end: see above
            log.warning("cannot make %s private: %s", path, e)
    return True


class CircusdLog(logging.handlers.WatchedFileHandler):
    """circusd's own log (``logoutput``), which circus opens as a stdlib ``WatchedFileHandler``:
    the same, but a log folder moved or removed under a running circusd is made again (0700) and
    the file in it (0600, circusd's umask), and a line that still cannot be written is dropped as
    logging drops any. The stdlib's reopens the file outside its own error handling (Python 3.11,
    ``reopenIfNeeded`` in ``emit``), so the ``FileNotFoundError`` reached circus's loop at the next
    line circusd logged (a ``circusctl restart``), and circus stopped every watcher (fault hunt)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            folder = os.path.dirname(self.baseFilename)
            if not os.path.isdir(folder):
                os.makedirs(folder, mode=0o700, exist_ok=True)
            self.reopenIfNeeded()
            logging.FileHandler.emit(self, record)
        except Exception:
            self.handleError(record)


def guard_circusd_log() -> None:
    """Make circusd's file log a :class:`CircusdLog` (it is the root logger's handler; circus made it
    before it read circus.ini, which imports this through :mod:`supervision.hooks`)."""
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.handlers.WatchedFileHandler:
            handler.__class__ = CircusdLog
