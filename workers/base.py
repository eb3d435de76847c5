"""What every worker shares: one loop, signals, a bounded mode, start-up.

Modelled on gunicorn's ``workers/base.py``: ``__init__`` only keeps settings;
:meth:`Worker.setup` opens connections (after any fork); :meth:`Worker.run`
is the one loop; SIGTERM only sets ``alive = False`` so the loop finishes the
unit of work in hand and :meth:`Worker.teardown` flushes before exit. Under
circus, the loop also tends the process's :class:`~supervision.lifeline.Lifeline`
(stop when circusd dies; heartbeats for the watchdog), and so does the
writer's IO loop through :func:`tend_lifeline`.
"""
from __future__ import annotations

import argparse
import logging
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from db.client import WriterClient
from db.config import ConfigError, Settings, check_home, load_settings
from db.engine import display_url, make_read_engine
from db.errors import WriterError, database_words, read_refusal, server_trouble
from db.leader import Leadership, LeadershipUnusable
from supervision.lifeline import Lifeline
from supervision.start_up import freeze_start_up_objects

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(message)s"


def command_line(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser every tickstack process starts from: named as the user typed it
    (``python -m workers.x``), described by its module docstring, with ``--log-level``."""
    if module == "__main__":  # run as python -m workers.x: name it as the user typed it
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else module
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or "").strip().split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    return parser


def configure_logging(level: str) -> None:
    """One log line format for every process (circus writes stderr to the watcher's log file)."""
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT)


_lifeline: Lifeline | None = None


def tend_lifeline(settings: Settings) -> None:
    """Call from a process's main loop (the writer's IO loop), as often as it likes: stop when circusd
    dies, heartbeats for circus's watchdog (see :mod:`supervision.lifeline`). The first call
    attaches, so the stop signal's handler must be installed by then."""
    global _lifeline
    if _lifeline is None:
        spec = getattr(sys.modules["__main__"], "__spec__", None)  # python -m workers.writer: "writer"
        name = spec.name.rsplit(".", 1)[-1] if spec is not None else None
        _lifeline = Lifeline(settings.watchdog_port, settings.log_dir, name).attach()
    _lifeline.tend()


def raise_open_file_limit() -> tuple[int, int]:
    """This process's open-file limit raised to its hard limit (``ulimit -Sn`` to ``-Hn``); returns
    (soft, hard) as they are now. For the writer: each client connection holds a descriptor, and
    libzmq 4.3 aborts the whole process (``Too many open files (src/ipc_listener.cpp)``, SIGABRT)
    when an ``ipc://`` accept finds none left: 1,100 connections killed a writer run under a soft
    limit of 1,024 (fault hunt, round 38), a common default for a login shell."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # a hard limit the kernel caps lower (nr_open): keep the soft one
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


#: Signals that ask a process to stop (:func:`on_stop_signals`), and signals it takes no action on.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
UNUSED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def on_stop_signals(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """SIGTERM (circus's stop), SIGINT (Ctrl-C), SIGHUP (a terminal closed; the console's HUP) and
    SIGQUIT (Ctrl-\\) only ask to stop: ``handler`` sets a flag, and the process finishes the work in
    hand (a worker flushes, the writer drains) before it exits. SIGHUP's default action ended the
    process at once, with no drain; there is nothing to reload, and a process whose terminal is gone
    should end. SIGUSR1 and SIGUSR2 (a log-reopen habit of other servers) are logged and ignored: by
    default they ended the process at once with not a word in its log (fault hunt, round 39). Returns
    the handlers it replaced, to give back with :func:`restore_signals`."""
    previous = {sig: signal.getsignal(sig) for sig in (*STOP_SIGNALS, *UNUSED_SIGNALS)}
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    for sig in UNUSED_SIGNALS:
        signal.signal(sig, _ignored)
    return previous


def _ignored(signum: int, _frame: Any) -> None:
    logging.getLogger(__name__).warning("%s received: ignored (it has no use here; SIGTERM stops this process)",
                                        signal.Signals(signum).name)


#: Seconds a leader on a server goes on leading while its host's writer does not answer. Everything it
#: changes goes through that writer, so the database's work (every host's bars, stops and exits) stopped
#: with it, for as long as it was stopped (``circusctl stop writer``, circus's flapping): then it gives the
#: leadership up, for a host whose writer answers. Longer than the writer's watchdog timeout (20 s in
#: circus.ini: a stuck writer has been restarted by then) and a restart's start.
WRITER_GONE_S = 30.0
#: Seconds a ping of this host's writer waits for its answer (:class:`WriterWatch`).
WRITER_PING_S = 2.0


class WriterWatch:
    """Whether this host's writer answers, for a worker that leads on a server (or would): every host
    writes through its own writer, so a leader whose writer is gone changes nothing, for any host."""

    def __init__(self, settings: Settings, every: float = 2.0) -> None:
        self.settings, self.every = settings, every
        self.answered_at = time.monotonic()
        self.asked_at = 0.0
        #: Why the last ping got no answer (the client's words), None when it got one.
        self.silence: str | None = None
        self._client: WriterClient | None = None

    def answers(self) -> bool:
        """Ping the writer now: whether it answered (within :data:`WRITER_PING_S`)."""
        self.asked_at = time.monotonic()
        if self._client is None:
            self._client = WriterClient(settings=self.settings, deadline=WRITER_PING_S)
        try:
            self._client.ping(timeout=WRITER_PING_S)
        except WriterError as e:
            self.silence = str(e) or type(e).__name__
            return False
        self.answered_at, self.silence = time.monotonic(), None
        return True

    def silent_for(self) -> float:
        """While leading, as often as the loop likes (a ping every ``every`` seconds at most): for how
        many seconds the writer has not answered; 0 while it does."""
        if time.monotonic() - self.asked_at >= self.every:
            self.answers()
        return 0.0 if self.silence is None else time.monotonic() - self.answered_at

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def restore_signals(previous: dict[int, Any]) -> None:
    """Give back the handlers :func:`on_stop_signals` replaced: a worker run inside another
    program (a test, a script) leaves that program's SIGTERM and Ctrl-C as they were."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class Worker:
    #: Used in log lines and as the cursor name where a worker keeps one.
    name = "worker"
    #: Seconds to sleep when a step found nothing to do.
    idle_sleep = 0.5
    #: Run once per database, whatever the hosts (:mod:`db.leader`): wait as a standby while
    #: another process leads, stop leading (exit 1: circus starts a standby) when the lock is lost.
    leader_only = False
    #: Seconds between two tries of a standby.
    standby_poll = 1.0
    #: Seconds from a stop signal within which the worker's requests to the writer give up (those in
    #: flight, and those it sends after, in its step or its flush: then retryably failed, as when
    #: the writer is away; :meth:`WriterClient.give_up_by`), so that it exits before circus's SIGKILL:
    #: its watcher's ``graceful_timeout`` in circus.ini, less room for the rest of the exit
    #: (tests/test_supervision.py checks the two).
    stop_budget = 10.0
    #: Of :attr:`stop_budget`, what the flush keeps for itself after its requests gave up.
    stop_reserve = 0.0
    #: The worker's client of the writer, once :meth:`setup` made one.
    client: WriterClient | None = None

    def __init__(self, settings: Settings, until_idle: bool = False) -> None:
        """Keep settings; open nothing."""
        self.settings = settings
        self.until_idle = until_idle
        self.alive = True
        #: The signal that asked this worker to stop, if one did.
        self.stopped_by: int | None = None
        #: When a stop's flush must end (monotonic), from the stop signal on (:attr:`stop_budget`).
        self.stop_by: float | None = None
        self._wake = threading.Event()
        self.log = logging.getLogger(f"tickstack.{self.name}")

    def init_signals(self) -> dict[int, Any]:
        return on_stop_signals(self.handle_stop)

    def handle_stop(self, signum: int, _frame: Any) -> None:
        """Only ask the loop to stop: work in hand is finished and flushed, within
        :attr:`stop_budget` of the first signal as far as the writer is concerned (a request blocked
        on a silent writer gives up in time for the loop to reach the flush, and the flush its end)."""
        if self.alive:
            self.log.info("%s: %s received; finishing", self.name, signal.Signals(signum).name)
        self.stopped_by = self.stopped_by or signum
        self.alive = False
        if self.stop_by is None:
            self.stop_by = time.monotonic() + self.stop_budget
            self._bound_requests()
        self._wake.set()

    def _bound_requests(self) -> None:
        """After a stop signal: the client's requests give up by :attr:`stop_by` less
        :attr:`stop_reserve` (only attributes change: safe in a signal handler)."""
        if self.stop_by is not None and self.client is not None:
            self.client.give_up_by(max(0.0, self.stop_by - self.stop_reserve - time.monotonic()))

    def setup(self) -> None:
        """Open engines and clients. Runs in the process that does the work."""

    def step(self) -> bool:
        """Do one unit of work; return False when there was nothing to do."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Flush and close; runs however the loop ended."""

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on SIGTERM."""
        self._wake.wait(seconds)

    def run(self) -> int:
        """Serve until idle (``until_idle``) or asked to stop; the exit code. The signal handlers
        it installs are given back when it returns, and a stop signal it took is passed on to the
        handler it replaced, if the program had installed one: run inside another program (a
        test), the signal stops that program too, once the work in hand is stored. Run as its own
        process (under circus, or by hand) there is none: the worker exits with its own code."""
        previous = self.init_signals()
        leadership: Leadership | None = None
        try:
            self.log.info("%s started", self.name)
            leadership = Leadership(self.settings, self.name) if self.leader_only else None
            try:
                leads = leadership is None or self._wait_to_lead(leadership)
            except LeadershipUnusable as e:  # waiting would never end: say why and exit
                self.log.error("%s: %s; not running", self.name, e)
                return 1
            if not leads:
                assert leadership is not None
                if self.until_idle and self.alive:
                    self.log.error("%s: another process leads (%s); a run to its end (--until-idle, --count) "
                                   "does not wait for it",
                                   self.name, leadership.holder())
                    return 3
                self.log.info("%s stopped (a standby)", self.name)
                return 0
            return self._serve(leadership)
        finally:
            if leadership is not None:
                leadership.release()
            restore_signals(previous)
            outer = previous.get(self.stopped_by) if self.stopped_by is not None else None
            # The interpreter's own Ctrl-C handler is nobody's choice: a worker run by hand and
            # stopped with Ctrl-C finishes and exits 0, as under circus.
            if callable(outer) and outer is not signal.default_int_handler:
                outer(self.stopped_by, None)

    def _wait_to_lead(self, leadership: Leadership) -> bool:
        """Stand by until this process leads (True) or is asked to stop (False). While the database's
        folder is not there, nobody can lead (the lock file is in it): that is no database yet, waited
        for as :func:`wait_for_database` waits, then :class:`NoDatabase`. On a server, the lead is taken
        only while this host's writer answers (:class:`WriterWatch`)."""
        watch = self._writer_watch(leadership)
        try:
            return self._stand_by(leadership, watch)
        finally:
            if watch is not None:
                watch.close()

    def _stand_by(self, leadership: Leadership, watch: WriterWatch | None) -> bool:
        said = None
        started = time.monotonic()
        folder = self.settings.database_path.parent if self.settings.database_path is not None else None
        while self.alive:
            tend_lifeline(self.settings)
            if watch is not None and not watch.answers():
                if said != "silent writer":
                    self.log.info("%s: standing by: %s's writer does not answer (%s); this host takes the lead "
                                  "only once it does (a leader here could change nothing)", self.name,
                                  self.settings.host, watch.silence)
                    if said is None:
                        self.standing_by()
                    said = "silent writer"
                self.sleep(self.standby_poll)
                continue
            holder = leadership.attempt()
            if holder is None:
                self.log.info("%s: leading (the one %s of this database)", self.name, self.name)
                return True
            if folder is not None and not folder.is_dir():
                if time.monotonic() - started > DATABASE_WAIT_S:
                    raise no_database(self.settings, DATABASE_WAIT_S)
                if said != str(folder):
                    self.log.info("%s: waiting for the writer to make %s and the database in it", self.name, folder)
                    said = str(folder)
                self.sleep(0.2)
                continue
            if self.until_idle:
                return False
            if holder != said:
                self.log.info("%s: standing by; the leader is %s", self.name, holder)
                if said is None:
                    self.standing_by()
                said = holder
            self.sleep(self.standby_poll)
        return False

    def leads_through_writer(self) -> bool:
        """Whether this worker's work as a leader goes through its host's writer (on a server, it gives
        the leadership up when that writer is gone, and takes it only while it answers: :class:`WriterWatch`).
        The monitor's calls go to the database themselves with ``TICKSTACK_DIRECT_WRITES``."""
        return True

    def _writer_watch(self, leadership: Leadership) -> WriterWatch | None:
        """A :class:`WriterWatch` for a leadership on a server, unless this is a bounded run (by hand)."""
        if not leadership.shared or self.until_idle or not self.leads_through_writer():
            return None
        return WriterWatch(self.settings, leadership.check_every)

    def standing_by(self) -> None:
        """Called once, when this process first stands by: what it may do without leading (nothing,
        unless a worker says otherwise)."""

    def _serve(self, leadership: Leadership | None) -> int:
        watch = self._writer_watch(leadership) if leadership is not None else None
        self.setup()
        try:
            while self.alive:
                tend_lifeline(self.settings)
                if leadership is not None and not leadership.still_held():
                    self.log.error("%s: lost the leadership (%s); stopping so that a standby takes over",
                                   self.name, leadership.lost)
                    return 1
                if watch is not None and (silent := watch.silent_for()) >= WRITER_GONE_S:
                    self.log.error("%s: %s's writer has not answered for %.0f s (%s): every change of this leader "
                                   "goes through it, so none is made, for any host; giving the leadership up so "
                                   "that a host whose writer answers takes over (circus starts this one again, "
                                   "a standby)", self.name, self.settings.host, silent, watch.silence)
                    return 1
                if not self.step():
                    if self.until_idle:
                        self.log.info("%s: nothing left to do (--until-idle)", self.name)
                        break
                    self.sleep(self.idle_sleep)
        finally:
            self._bound_requests()  # a client made after the signal too
            self.teardown()
            if watch is not None:
                watch.close()
        self.log.info("%s stopped", self.name)
        return 0


#: Seconds a worker waits for the writer to create the database (:func:`wait_for_database`).
DATABASE_WAIT_S = 60.0


class NoDatabase(RuntimeError):
    """No database after :data:`DATABASE_WAIT_S`: a state of the stack (no writer), said in one line
    by :func:`main`, not a bug's traceback."""


class StoppedWaiting(RuntimeError):
    """Asked to stop while it waited for the database: a stop, not a failure (:func:`main`: exit 0)."""


def wait_for_database(settings: Settings, timeout: float | None = None,
                      alive: Callable[[], bool] = lambda: True) -> Engine:
    """A read engine, once the writer has created the schema, else :class:`NoDatabase` after
    ``timeout`` seconds (:data:`DATABASE_WAIT_S`); :class:`StoppedWaiting` as soon as ``alive()``
    turns false (a SIGTERM waited out the whole minute, past circus's graceful_timeout).

    Workers may start before the writer finished its first start (when run
    by hand); circus orders them, but nothing should depend on it."""
    timeout = DATABASE_WAIT_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        path = settings.database_path
        if path is None or path.exists():
            engine = make_read_engine(settings, pool_size=2)
            try:
                with engine.connect() as conn:
                    if inspect(conn).has_table("schema_version"):
                        return engine
                last = None  # it answers: the schema is not there yet (the writer is creating it)
            except Exception as e:  # not there yet, or the server does not let the readers in
                last = e
            engine.dispose()
        if not alive():
            raise StoppedWaiting("asked to stop while it waited for the database")
        if time.monotonic() > deadline:
            if last is not None and path is None:  # a server that refused or did not answer the readers' URL
                reason = database_words(last, 300)
                raise NoDatabase(f"the database server {server_trouble(reason)} at "
                                 f"{display_url(settings.database_read_url)} ({settings.read_url_variable}, the "
                                 "readers' URL), "
                                 f"tried for {timeout:g} s: {reason}")
            raise no_database(settings, timeout)
        time.sleep(0.2)


def no_database(settings: Settings, waited: float) -> NoDatabase:
    """The one line of a worker that found no database after ``waited`` seconds."""
    return NoDatabase(f"no database at {display_url(settings.database_url)} after {waited:g} s: is the writer running?")


def main(worker_cls: type[Worker], argv: list[str] | None,
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
         make: Callable[[Settings, argparse.Namespace], Worker] | None = None) -> int:
    """Parse the common flags (``--until-idle``, ``--log-level``) plus the
    worker's own, load settings, and run. Bad flags or settings exit 2 with
    the reason; no database once the wait for it is over (:class:`NoDatabase`) exits 1 with it."""
    # Named and described as the module that was run (``python -m workers.ticks`` runs the class of
    # workers.tick_ingestor, and its --help said "usage: python -m workers.tick_ingestor": round 40).
    ran = getattr(sys.modules.get("__main__"), "__spec__", None)
    if ran is not None and ran.name.startswith("workers."):
        parser = command_line(ran.name, sys.modules["__main__"].__doc__)
    else:
        parser = command_line(worker_cls.__module__, sys.modules[worker_cls.__module__].__doc__)
    parser.add_argument("--until-idle", action="store_true",
                        help="process everything available, then exit 0 (for tests and scripts); analysis "
                             "and monitor exit 3 when another process of theirs leads (db.leader)")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        settings = load_settings()
        check_home(settings, subfolders=False)  # a file as TICKSTACK_HOME: one line, not a minute's wait
        worker = make(settings, args) if make else worker_cls(settings, until_idle=args.until_idle)
    except (ConfigError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    freeze_start_up_objects()
    try:
        return worker.run()
    except NoDatabase as e:  # circus starts the worker again; by hand, the line says what to start
        worker.log.error("%s: %s", worker.name, e)
        return 1
    except StoppedWaiting:
        worker.log.info("%s stopped (while it waited for the database)", worker.name)
        return 0
    except DBAPIError as e:
        refusal = read_refusal(e, settings.read_url_variable)
        if refusal is not None:  # a missed GRANT: every start fails alike until it is granted
            worker.log.error("%s: %s; exiting, to be started again", worker.name, refusal)
            return 1
        if not isinstance(e, OperationalError):
            raise  # a statement of ours the database cannot run: a bug, with its traceback
        # A server down or restarting, a file gone: a state, said in one line.
        reason = database_words(e)  # libpq never quotes a password
        worker.log.error("%s: the database did not answer or refused a read (%s: %s); exiting, to be started "
                         "again", worker.name, type(e.orig).__name__, reason)
        return 1
