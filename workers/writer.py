"""The single designated writer: ``python -m workers.writer``.

Exactly one process writes the database. Every other process sends it named
ops (:mod:`db.ops`) over a ZeroMQ ROUTER socket as msgpack messages, and it
answers each one only after the op's effects are committed.

Two threads, one job each:

* the **IO thread** (main) owns the socket: it decodes requests within the
  decode limits of :func:`db.protocol.decode_request`, answers ``ping`` and
  ``stats`` itself, queues ops in a queue bounded in requests and in bytes (a
  full queue gets a *busy* reply, so memory stays bounded under any load) and
  sends the replies the commit thread hands back;
* the **commit thread** (:mod:`workers.commit`) owns the one write connection (lent to the IO
  thread for a small batch while the commit thread is idle, below): it takes every pending
  request (up to a bound), runs them in one ``BEGIN IMMEDIATE`` transaction
  (with no savepoint per request unless one of them fails: then the batch runs
  again with one each, so one bad request fails alone), records them as
  applied in the same transaction, commits, and only then replies.

One exception, for speed: on SQLite, a small batch read while the commit thread is idle is
committed by the IO thread itself, through the same code (:meth:`workers.intake.Intake.dispatch`): handing it
over and back cost more than committing it. The two never use the connection at once, and the IO
thread never waits on a lock (a batch that would goes to the commit thread).

Neither thread ends for a request, a checkpoint or a database error, of any
class: the request fails with a reply that says why, and the writer serves
on. A full disk is a state, not a crash: every write is answered with
:class:`~db.errors.StorageFull` (SQLite's own reason, e.g. ``SQLITE_FULL``)
until space returns, and writes then succeed again by themselves.

Memory is bounded in bytes: a frame over ``writer_max_message`` gets an error
reply, and ZeroMQ's ``MAXMSGSIZE`` (that and :data:`MAX_MESSAGE_SLACK`) closes the
connection of a peer sending more, before the frame is read; ZeroMQ reads at most
:data:`READ_AHEAD_MESSAGES` frames of a peer ahead. Nothing can be answered then (ZeroMQ
does not say which peer it dropped, and reading the frame to answer it would
hold it all in memory), so :class:`db.client.WriterClient` refuses such a
request itself, before sending it, with a clear error. Queued requests may
take at most ``QUEUE_BUDGET_MESSAGES`` x ``writer_max_message`` as estimated
by the decoder; beyond that, *busy*.

A third thread (:mod:`workers.checkpointer`) copies the WAL into the database
ahead of SQLite's automatic checkpoint, so that a commit seldom pays for one.

Lifecycle, as in gunicorn's workers: ``__init__`` opens nothing;
:meth:`Writer.run` takes the writer lock, opens the database, binds, serves
until SIGTERM, then drains (see :meth:`Writer._serve`) and exits 0.
"""
from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Packed columns (bulk ticks, the analysis worker's stores) are checked with numpy, which
# db.validation and db.columns import only where they use it, so that the readers never load it.
# The writer loads it here, at start: else its first bulk request paid for the import (about 60 ms),
# and gc.freeze() in Writer.run keeps its objects out of the collector's way.
import numpy  # noqa: F401
import zmq
from sqlalchemy.exc import DBAPIError

from db.client import MAX_PIPELINE_WINDOW
from db.config import DEFAULT_DATABASE, ConfigError, Settings, ensure_home, load_settings
from db.engine import display_url, is_sqlite, make_write_engine, storage_full_reason
from db.errors import OpFailed, server_trouble
from db.files import new_database_refusal, not_sqlite_words, remove_stale_restore_mark
from db.lock import WriterLock, WriterLocked
from db.protocol import MAX_MESSAGE_SLACK, encode_reply, salvage_seq
from db.served_database import record_database
from db.server_lock import SERVER_WAIT_S, ServerWriterLock, take_server_lock
from db.server_wait import (
    clear_refused,
    done_waiting,
    login_refused,
    refused_file,
    say_host_taken,
    say_refused,
    say_waiting,
    wait_file,
)
from supervision.start_up import freeze_start_up_objects
from workers.base import command_line, configure_logging, on_stop_signals, raise_open_file_limit, tend_lifeline
from workers.checkpointer import Checkpointer
from workers.commit import DOORBELL, STOP, Committer, Request
from workers.endpoint_guard import EndpointGuard
from workers.intake import Intake
from workers.journal_guard import JournalGuard
from workers.write_connection import make_database_private
from workers.writer_stats import Stats

log = logging.getLogger("tickstack.writer")

EXIT_LOCKED = 3
#: Seconds between two checks that the writer lock's path still names the file this writer locked.
LOCK_CHECK_EVERY_S = 1.0
#: Below this open-file limit (after raising the soft one to the hard one) the writer warns: with a hard
#: limit of 64, 120 clients ended it at each start (SIGABRT in libzmq's accept), a crash loop the
#: flapping plugin then stops (fault hunt, round 40).
MIN_OPEN_FILES = 1024
#: Frames ZeroMQ reads ahead from one peer before the writer takes them (``RCVHWM``; its default is
#: 1,000): a client's pipeline window (16) and the writer's queue hold the rest.
READ_AHEAD_MESSAGES = 16
#: Answers ZeroMQ keeps for one peer that does not read them (``SNDHWM``; it was 100,000: about 50 MB
#: of ``stats`` answers a connection): four times what a :class:`db.client.Pipeline` can have in
#: flight. Past it an answer is dropped; a client that reads after all asks again and gets it.
REPLY_BACKLOG_MESSAGES = 4 * MAX_PIPELINE_WINDOW
#: The longest the IO thread reads frames before it sends the answers it has, commits the small batch
#: it read and beats the watchdog's heart: frames slow to decode (each within the limits, tens of ms)
#: made a round of 1,000 last a minute, every other client's answers waiting for its end.
IO_ROUND_S = 0.02

__all__ = ["Stats", "Writer", "main"]


class EndpointUnusable(RuntimeError):
    """The writer's endpoint cannot be bound (another program holds the port): said in one line."""


class Writer:
    def __init__(self, settings: Settings) -> None:
        """Keep the settings; open nothing (that is :meth:`run`'s job)."""
        self.settings = settings
        self.alive = True
        self.stop_requested_at: float | None = None
        #: The writer lock's file was removed or replaced while it served (:meth:`_check_lock`).
        self.lock_lost = False
        #: What the writer does when its database files are removed or moved under it (SQLite).
        self.journal_guard: JournalGuard | None = None
        self.stats = Stats()
        self.queue: queue.Queue[Request | object] = queue.Queue(maxsize=settings.writer_max_queue)
        #: The IO thread's requests: read, answered or queued, committed here when small.
        self.intake = Intake(settings, self.stats, self.queue)
        self.committer: Committer | None = None
        self.lock = WriterLock(settings.writer_lock_path)

    # --- lifecycle ---------------------------------------------------------------------

    def init_signals(self) -> None:
        """SIGTERM and SIGINT only ask to stop: the loop drains and finishes."""
        on_stop_signals(self.handle_stop)

    def handle_stop(self, signum: int, _frame: Any) -> None:
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
            log.info("writer: %s received; draining", signal.Signals(signum).name)

    def stopping(self) -> bool:
        """Whether a stop was asked for (a signal): the waits for the locks end at once."""
        return self.stop_requested_at is not None

    def _waits_on(self) -> bool:
        """What the waits for the locks poll (several times a second): a writer that waits for its
        server (down, or with no free connection slot) or for a lock is alive, and says so to circus's
        watchdog, which restarted one after 20 s of such a wait at a stack's start as "stuck"; True
        once a stop was asked, which ends the wait."""
        tend_lifeline(self.settings)
        return self.stopping()

    def run(self) -> int:
        """Take the lock, open and upgrade the database, serve, drain, exit."""
        os.umask(0o077)  # database, WAL, lock and socket files: this user only
        self.open_files, _ = raise_open_file_limit()
        if self.open_files < MIN_OPEN_FILES:  # a hard limit: libzmq aborts the writer when they run out
            log.warning("writer: at most %d open files (a hard limit: ulimit -Hn): each client connection takes "
                        "one, and ZeroMQ ends the writer (SIGABRT, 'Too many open files') when none is left; raise "
                        "it to at least %d (LimitNOFILE, limits.conf)", self.open_files, MIN_OPEN_FILES)
        ensure_home(self.settings)
        not_sqlite = not_sqlite_words(self.settings.database_path)
        if not_sqlite is not None:  # before a lock file beside it, its mode changed, or SQLite opens it
            log.error("writer: %s. If DATABASE_URL names the wrong file, set it to the stack's database (unset, "
                      "it is %s); if this is the stack's database, its first page is damaged: `python -m db "
                      "doctor` says how to restore it", not_sqlite, self.settings.home / DEFAULT_DATABASE)
            return 1
        self.server_lock: ServerWriterLock | None = None
        # Before the lock's wait: a stop or a stray signal meanwhile is handled, not the default action.
        self.init_signals()
        try:
            self.lock.acquire(wait=self.settings.writer_lock_wait, stopping=self._waits_on)
            # The home's writer now: which database it writes, for `db health` and `db init` run while
            # no writer answers (stopped, or waiting for its server below), which refuse a shell whose
            # settings name another kind (they made a stray SQLite file in a PostgreSQL home).
            record_database(self.settings)
            # The file lock is per home; on PostgreSQL one writer per database, across homes and
            # hosts, is a session-level advisory lock (db.server_lock.ServerWriterLock).
            # A server that does not answer is said in run/ at each try too: circusd's readiness
            # hooks stop waiting for a writer that cannot serve before its server answers.
            waiting = wait_file(self.settings.run_dir)
            try:
                self.server_lock = take_server_lock(self.settings.database_url, self.settings.host,
                                                    on_lost=self._stop_now, wait=SERVER_WAIT_S,
                                                    held_wait=self.settings.writer_lock_wait, stopping=self._waits_on,
                                                    on_unreachable=lambda said: self._waits_for_server(waiting, said))
            except WriterLocked:  # the server's lock of this host, held past the wait: another home's writer
                if not self.stopping():
                    say_host_taken(refused_file(self.settings.run_dir), self.settings.host)
                raise
            finally:
                done_waiting(waiting)
            if self.server_lock is not None:  # in: an earlier writer's refused login is over
                clear_refused(refused_file(self.settings.run_dir))
        except WriterLocked as e:
            self.lock.release()
            if self.stopping():  # asked to stop while it waited: nothing was begun
                log.info("writer: stopped while it waited for the lock (%s); exiting", e)
                return 0
            log.error("writer: %s", e)
            return EXIT_LOCKED
        except Exception as e:
            self.lock.release()
            if isinstance(e, OSError):
                full = storage_full_reason(e)
                if full is not None:
                    log.error("writer: cannot write its pid into %s, the disk is full (%s); free space and "
                              "start again", self.lock.path, full)
                else:  # no such folder, no right to it: the database's folder is wrong
                    log.error("writer: cannot take the writer lock %s: %s; check DATABASE_URL and the folder",
                              self.lock.path, e.strerror or e)
                return 1
            if not self.settings.database_url.startswith("sqlite"):
                # libpq's reason names the host and the role, never the password.
                reason = " ".join(str(e).split())
                if server_trouble(reason) == "refuses the login":
                    # It answered, and refused: "cannot reach" sent a new user looking at a server that
                    # runs. Said in run/ too, for doctor, /api/health and circus's flapping plugin.
                    from db.circusd import circusctl_command, new_database_url_words

                    said = say_refused(refused_file(self.settings.run_dir), self.settings.database_url, reason)
                    log.error("writer: %s, then restart the writer (`%s`) or `make run`%s; at %s", said,
                              circusctl_command(self.settings.circus_endpoint, "restart", "writer"),
                              new_database_url_words(self.settings, login_refused(reason, "DATABASE_URL", None)[1]),
                              display_url(self.settings.database_url))
                    return 1
                log.error("writer: cannot reach the database server %s to take the writer lock: %s",
                          display_url(self.settings.database_url), str(e).strip())
                return 1
            raise
        try:
            orphaned = new_database_refusal(self.settings.database_path)
            if orphaned is not None:
                log.error("writer: %s", orphaned)
                return 1
            if remove_stale_restore_mark(self.settings.database_path):
                log.info("writer: removed the mark of a `python -m db restore` stopped before it moved the "
                         "database or after the backup took its name (the database is in place)")
            make_database_private(self.settings.database_path)
            self.engine = make_write_engine(self.settings)
            self.intake.commits_here = is_sqlite(self.engine) and not self.settings.writer_batch_wait  # see dispatch
            if self.server_lock is not None:  # a reconnection must prove the lock is still ours
                self.server_lock.fence(self.engine)
            self.checkpointer = Checkpointer(self.settings, self.engine, self.stats)
            try:
                conn = self.engine.connect()
                self.committer = Committer(self.settings, self.engine, conn, self.stats, self.queue,
                                           on_fatal=self._stop_now, on_commit=self.checkpointer.poke,
                                           before_commit=self.server_lock.check_held if self.server_lock else None)
                self.intake.committer = self.committer
                before, after = self.committer.link.open_database()
            except Exception as e:
                reason = storage_full_reason(e)
                if reason is not None:
                    log.error("writer: cannot open the database, its disk is full (%s); free space and start "
                              "again", reason)
                    return 1
                if self.settings.database_path is None or not isinstance(e, DBAPIError):
                    raise
                # A folder, a file that is not SQLite's, no right to it: SQLite's reason, in one line.
                said = f"writer: cannot open the database {self.settings.database_path}: {e.orig}"
                if getattr(e.orig, "sqlite_errorname", None) == "SQLITE_READONLY":
                    said += (f" (it, its -wal or -shm file, or its folder is not writable by this process, uid "
                             f"{os.geteuid()}, or is on a read-only mount: make them writable; circus starts the "
                             "writer again)")
                log.error("%s", said)
                return 1
            if before != after:
                log.info("writer: schema upgraded from version %d to %d", before, after)
            if self.settings.database_path is not None:  # what its connection opened, seen before it serves
                self.journal_guard = JournalGuard(self.settings, self.committer, self.checkpointer, self.stats,
                                                  self.queue)
                self.committer.before_commit = self.journal_guard.before_commit  # a WAL cut short: no COMMIT
            # Ingest decodes thousands of short-lived containers per request;
            # at the default threshold (700) the collector walks them over and
            # over. Long-lived startup objects are frozen out of its way.
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 20, 20)
            self.checkpointer.start()
            try:
                self._serve()
            except EndpointUnusable as e:
                log.error("writer: %s", e)
                return 1
            finally:
                self.checkpointer.stop()
            guard = self.journal_guard
            copy = guard.saved_copy if guard is not None else None
            cut = guard.cut_short() if guard is not None and not guard.gone else None  # a cut since the last look
            if cut is not None:  # a checkpoint would copy what the cut took into the database file as damage
                log.critical("writer: no final checkpoint: %s; exiting", cut)
                saved = False
            elif copy is not None:  # the removed file's last checkpoint would copy into nothing kept
                log.info("writer: its database file was removed under it; every write it acknowledged is in the "
                         "copy it saved, %s; exiting", copy)
                saved = True
            else:
                saved = self.committer.link.final_checkpoint(self.committer.refusing is not None)  # type: ignore[union-attr]
            lost = self.lock_lost or (self.server_lock is not None and self.server_lock.lost)
            return EXIT_LOCKED if lost else 0 if saved else 1
        finally:
            conn = self.committer.conn if self.committer is not None else None
            for what, close in (("connection", getattr(conn, "close", None)),
                                ("engine", getattr(getattr(self, "engine", None), "dispose", None))):
                try:
                    if close is not None:
                        close()
                except Exception as e:  # e.g. a full disk: every commit is already in the WAL
                    log.warning("writer: closing the database %s failed: %s", what, e)
            if self.server_lock is not None:  # after the write connection: no commit once another may write
                self.server_lock.release()
            self.lock.release()

    def _serve(self) -> None:
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        # Hard cap: beyond it ZeroMQ drops the peer without reading the message into memory. Between
        # max_message and the cap we reply. With ZeroMQ's read-ahead (RCVHWM messages a peer), what a
        # peer can make the writer hold before it reads is (RCVHWM + 1) x the cap: 4 x max_message with
        # ZeroMQ's default of 1,000 let 8 peers sending 60 MiB frames take it to 0.6-2.4 GB.
        router.setsockopt(zmq.MAXMSGSIZE, self.settings.writer_max_message + MAX_MESSAGE_SLACK)
        router.setsockopt(zmq.RCVHWM, READ_AHEAD_MESSAGES)
        router.setsockopt(zmq.SNDHWM, REPLY_BACKLOG_MESSAGES)
        router.setsockopt(zmq.LINGER, 2000)
        replies_in = ctx.socket(zmq.PULL)
        replies_in.bind(DOORBELL)
        endpoint = self.settings.writer_endpoint
        committer: threading.Thread | None = None
        try:
            try:
                router.bind(endpoint)
            except zmq.ZMQError as e:  # taken (another program's port), or a folder that cannot hold a socket
                raise EndpointUnusable(f"cannot bind {endpoint}: {e.strerror}; set WRITER_ENDPOINT to a free "
                                       "one") from None
            assert self.committer is not None
            committer = threading.Thread(target=self.committer.run, args=(ctx,), name="commit", daemon=True)
            committer.start()
            log.info("writer ready: pid %d, endpoint %s, database %s; at most %d open files (connections)",
                     os.getpid(), endpoint, display_url(self.settings.database_url), self.open_files)
            endpoint_guard = EndpointGuard(endpoint, self.settings.run_dir)
            poller = zmq.Poller()
            poller.register(router, zmq.POLLIN)
            poller.register(replies_in, zmq.POLLIN)
            lock_checked = time.monotonic()
            while True:
                tend_lifeline(self.settings)  # stop if circusd died; heartbeat for the watchdog
                if time.monotonic() - lock_checked >= LOCK_CHECK_EVERY_S:
                    lock_checked = time.monotonic()
                    self._check_lock()
                    endpoint_guard.check(router)
                    self.intake.flush_logs()
                    if self.journal_guard is not None:
                        self.journal_guard.check()
                events = dict(poller.poll(50))
                if replies_in in events:
                    self.intake.forward_replies(replies_in, router)
                if router in events:
                    round_ends = time.monotonic() + IO_ROUND_S
                    for _ in range(1000):
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        except MemoryError:  # escaped the loop, whose teardown then hung: round 40
                            self.intake.out_of_memory(router)
                            break
                        try:
                            self.intake.accept(router, frames)
                        except MemoryError:  # read, then too large to handle now: it may be sent again
                            self.intake.out_of_memory(router, frames)
                        except Exception as e:  # the IO thread serves on, whatever a request does
                            log.exception("writer: handling a request failed")
                            self.intake.send(router, frames[0], encode_reply(salvage_seq(frames[-1]), error=OpFailed(
                                f"the writer could not handle the request: {type(e).__name__}: {e}")))
                        if time.monotonic() > round_ends:
                            break
                    self.intake.dispatch(router, replies_in)
                if self.stop_requested_at is not None and self._drained():
                    break
            # Stop reading new requests; let the commit thread finish the
            # queue and forward its last replies. A full queue makes room as the thread works on
            # (a thread that died takes nothing, and there is nothing to wait for).
            while committer.is_alive():
                try:
                    self.queue.put(STOP, timeout=0.05)
                    break
                except queue.Full:
                    self.intake.forward_replies(replies_in, router)
            while committer.is_alive() or self.committer.outbox:
                replies_in.poll(50)
                self.intake.forward_replies(replies_in, router)
            self.intake.forward_replies(replies_in, router)
        finally:
            router.close()
            replies_in.close()
            if committer is not None and committer.is_alive():  # an error ended the loop: end the thread too
                try:
                    self.queue.put(STOP, timeout=1.0)
                except queue.Full:
                    pass
                committer.join(self.settings.writer_drain_deadline)
            if committer is None or not committer.is_alive():
                ctx.term()  # waits for every socket: the commit thread's too
            else:  # the process exits anyway; waiting for that socket hung it, silent, for good
                log.error("writer: the commit thread did not end; exiting without waiting for it")

    def _waits_for_server(self, waiting: Path, said: str) -> None:
        """At each try its server did not answer: said in run/ for circusd's hooks, and an earlier
        writer's refused login, if any, is no longer the news (the password may have been mended
        since: doctor and the flapping plugin must not blame it for a server that is down)."""
        say_waiting(waiting, said)
        clear_refused(refused_file(self.settings.run_dir))

    def _drained(self) -> bool:
        """On stop, keep serving for ``writer_drain_idle`` seconds (circus stops every watcher at
        the same moment, and producers flush their last batches in that time), then stop as soon
        as nothing is queued or in hand, or at the drain deadline in any case. A lone restart with
        producers running never goes quiet: waiting for quiet would hold it to the deadline while
        every request it refuses is resent to the next writer anyway."""
        now = time.monotonic()
        assert self.stop_requested_at is not None
        if now - self.stop_requested_at >= self.settings.writer_drain_deadline:
            log.warning("writer: drain deadline reached with %d requests queued", self.queue.qsize())
            return True
        busy = self.committer is not None and self.committer.busy
        return now - self.stop_requested_at >= self.settings.writer_drain_idle and self.queue.empty() and not busy

    def _check_lock(self) -> None:
        """The lock file removed or replaced (a person tidying the folder): the next writer would lock
        another file and serve beside this one, both committing. Drain and exit, as for SIGTERM,
        with :data:`EXIT_LOCKED`: circus starts a writer, which takes the lock, or is refused by the
        one that took the new file."""
        if self.stop_requested_at is None and not self.lock.still_ours():
            self.lock_lost = True
            log.error("writer: the writer lock %s was removed or replaced: another writer could start beside "
                      "this one; draining and exiting", self.lock.path)
            self.stop_requested_at = time.monotonic()

    def _stop_now(self) -> None:
        """The commit thread cannot go on (a bug of its own loop, never a
        request's): stop at once instead of queueing requests nobody commits."""
        self.stop_requested_at = time.monotonic() - self.settings.writer_drain_deadline


def main(argv: list[str] | None = None) -> int:
    args = command_line(__name__, __doc__).parse_args(argv)
    configure_logging(args.log_level)
    try:
        settings = load_settings()
        # Here as well as in Writer.run: a home that cannot be made (a file in the way, no permission)
        # is a bad TICKSTACK_HOME, to be said in one line like any bad setting, not as a traceback.
        ensure_home(settings)
    except ConfigError as e:
        log.error("writer: %s", e)
        return 2
    freeze_start_up_objects()  # and again in Writer.run, once the database is open (see there)
    return Writer(settings).run()


if __name__ == "__main__":
    sys.exit(main())
