"""Circus hooks: start only when alone in the home; start dependents only once the writer is ready.

``refuse_unless_alone`` is the writer's ``before_start`` hook. The writer starts first (highest
priority), so at circusd's start it is the first of our code circusd calls, before any process is
spawned: if a setting does not load (``TICKSTACK_API_PORT=abc``), circus made no socket for the API or
the console (their ports unset in its environment), or an earlier stack's processes
still run in this home (the writer lock held, an orphan, the watchdog's port taken; see
:mod:`db.preflight`), circusd exits 1 with the one-line reason on its stderr (the terminal of a
plain ``circusd circus.ini``) and in its log, as ``make run`` refuses, instead of sitting there with
no watcher started or starting a second stack beside them. circus offers no earlier hook (it only
imports the modules and builds the log streams that circus.ini names while it reads it, and again
at each ``reloadconfig``); it binds the API's and the console's ports itself, before any hook, and a
taken port makes circusd stop there, with "Could not bind" in its log and exit status 0, circus's
own way (``python -m db prepare``, run by ``make run``, checks them first and says so). So this
module, imported by circusd as it reads circus.ini, also keeps circus's error lines until the first
hook runs (:class:`_StartErrors`): a circusd that exits before it started any watcher, after one,
says it on its stderr and exits 1.

``wait_for_writer`` is every dependent's ``before_start`` hook: circus starts watchers in priority
order but never waits for one to be ready, so it pings the writer until it answers, bounded by
``TICKSTACK_READY_TIMEOUT``, because hooks run on circusd's own event loop and stall the whole
daemon while they run (no command is answered, no process reaped). So it waits only for a writer
process that runs, and once per process: a writer stopped on purpose, gone, or silent past the
timeout is not waited for, and the dependent starts anyway, since each tolerates a missing writer.
Nor is a writer that says it waits for its database server (:mod:`db.server_wait`): it cannot
answer before the server does, which may take minutes; it serves once the server answers.
Circus reads a falsy return (None included) as failure and leaves the watcher stopped, so hooks
return True or False, never None.

Here, not in :mod:`workers`: importing that package sets ``OPENBLAS_NUM_THREADS`` in the importing
process, and circusd's own environment must not change once it runs, since ``circusctl
reloadconfig`` compares it (copied, ``copy_env``) with each watcher's and restarts every watcher
that differs.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from supervision.circus import WRITER_START_WAIT_S
from supervision.signals import quit_when_free
from supervision.streams import guard_circusd_log, private_circusd_files

log = logging.getLogger("circus")


class _StartErrors(logging.Handler):
    """circus's ERROR lines of this circusd until its first watcher starts (the writer's
    ``before_start`` hook runs): ``Could not bind 127.0.0.1:8000``, then "exception [Errno 98]
    Address already in use caught". At circusd's exit, if there are some and no watcher started,
    they are said on its stderr and it exits 1 (circusd exits 0 whatever ended its start)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []
        self.started = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.started and len(self.lines) < 10:
            self.lines.append(record.getMessage())

    def exit_if_start_failed(self) -> None:
        if self.started or not self.lines:
            return
        print(f"circusd: did not start: {'; '.join(self.lines)} (circusd.log says more; `python -m db prepare`, "
              "which make run runs first, names what holds a port)", file=sys.stderr, flush=True)
        from db.config import ConfigError, load_settings

        try:
            settings = load_settings()
            _remove_socket_files(settings.circus_endpoint, settings.circus_pubsub_endpoint)
        except ConfigError:
            pass
        logging.shutdown()
        os._exit(1)


def _remove_socket_files(*endpoints: str | None) -> None:
    """The control sockets' files of a circusd that stops at its start: left behind, a circusctl or
    the console would wait for its time-out on them instead of being told at once that none runs."""
    for endpoint in endpoints:
        if endpoint and endpoint.startswith("ipc://"):
            try:
                os.unlink(endpoint[len("ipc://"):])
            except OSError:
                pass


# Once per circusd: circus imports the module again at a reloadconfig, which finds it in sys.modules.
_start_errors: _StartErrors | None = None
if os.path.basename(sys.argv[0]) == "circusd":
    guard_circusd_log()
    quit_when_free()  # before circus registers its signal handlers: a Ctrl-C while it starts is kept
    _start_errors = _StartErrors()
    log.addHandler(_start_errors)
    atexit.register(_start_errors.exit_if_start_failed)


def refuse_unless_alone(watcher: Any, arbiter: Any, hook_name: str, **kwargs: Any) -> bool:
    """At circusd's start: exit circusd (status 1) when a setting does not load or anything of an
    earlier start is in the way. Later (``circusctl start writer``, a flapping retry) circusd stays
    up: the writer is not started while another process holds the writer lock."""
    from db.config import ConfigError, load_settings
    from db.preflight import CIRCUS_INI, blockers, foreign_commands, refusal, unmade_sockets

    if _start_errors is not None:  # circus got as far as starting a watcher: its start did not fail
        _start_errors.started = True
    starting = not arbiter.running
    try:
        settings = load_settings()  # reads circusd's environment, never changes it
    except ConfigError as e:
        if starting:
            _exit_circusd(arbiter, hook_name, str(e))
        log.error("%s: %s; not starting %s", hook_name, e, watcher.name)
        return False
    if starting:
        problem = foreign_commands() or unmade_sockets(
            arbiter.sockets, (w.cmd for w in arbiter.iter_watchers() if w.use_sockets),
            Path(getattr(arbiter, "config_file", None) or CIRCUS_INI))
        if problem:
            _exit_circusd(arbiter, hook_name, problem)
    # circus holds the web ports already (its own sockets); the watchdog binds its port after this.
    found = blockers(settings, tcp_ports=False, udp_port=starting, leftovers=starting)
    if not found:
        return True
    message = refusal(settings, found)
    if starting:
        _exit_circusd(arbiter, hook_name, message)
    log.error("%s: %s", hook_name, message)
    return False


#: This circusd's stack as its first writer found it: the home's (device, inode), and the database
#: file once it was there (at a spawn, or when a writer was ready): :func:`spawn_writer`.
_home_seen: tuple[int, int] | None = None
_database_seen: str | None = None


def _remember_database(path: Any) -> None:
    global _database_seen
    if path is not None and _database_seen is None and path.exists():
        _database_seen = str(path)


def spawn_writer(watcher: Any, arbiter: Any, hook_name: str, **kwargs: Any) -> bool:
    """circus hook (``before_spawn`` of the writer): :func:`supervision.quiet.quiet_circusd`, then no
    writer that would make a new, empty database under this circusd: its home is not the folder it
    was (moved, removed, made again), or the database its writers used is gone from its path. The
    home moved (``mv $TICKSTACK_HOME ...``) under a running stack: the writer lost its lock file and
    exited, and circus started another, which made a new home and database that every process then
    wrote to, acknowledged (fault hunt as an operator). The refusal is said in circusd.log, with what
    to do; circus then leaves the writer's watcher stopped (a refused spawn stops it), and a later
    ``start writer`` asks this hook again."""
    global _home_seen
    from db.config import ConfigError, load_settings
    from supervision.quiet import quiet_circusd

    quiet_circusd(watcher, arbiter, hook_name)
    try:
        settings = load_settings()
    except ConfigError:  # refuse_unless_alone says it at the watcher's start
        return True
    home = str(settings.home)
    try:
        st = os.stat(home)
        now: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        now = None
    if _home_seen is None:
        _home_seen = now
        _remember_database(settings.database_path)
        return True
    problem = None
    if now != _home_seen:
        problem = (f"its home {home} is not the folder it was when this circusd started (moved, removed or made "
                   "again)")
    elif _database_seen is not None and not os.path.exists(_database_seen):
        problem = f"the database {_database_seen} its writers used is gone from its path (moved or removed)"
    if problem is None:
        _remember_database(settings.database_path)
        return True
    # The processes still running may have made parts of a new home at the old path meanwhile (logs,
    # spool, secrets): put back, the old home would land inside it.
    log.error("writer: not starting one: %s, and it would make a new, empty database there while the "
              "acknowledged writes are in the old one; the writer's watcher stays stopped. Stop this stack "
              "(kill %d, circusd's pid: everything it runs stops gracefully), move aside what was made at "
              "the old path meanwhile, put the home (or the database) back, and start again", problem, os.getpid())
    return False


def said_exit(watcher: Any, arbiter: Any, hook_name: str, **kwargs: Any) -> bool:
    """circus hook (``after_reap`` of every watcher in circus.ini): a line in circusd.log for a process
    that ended while its watcher was active (a kill -9, the kernel's OOM killer, a crash: circus
    starts another), or that ended badly while it was stopped (killed at its graceful_timeout). A
    killed writer left no trace but the next one's "writer ready" (fault hunt as an operator). A
    process that exited 0 as it was stopped is the quiet case. Always True (circus ignores it)."""
    pid, code = kwargs.get("process_pid"), kwargs.get("exit_code")
    how = (f"was killed by {_signal_name(-code)}" if isinstance(code, int) and code < 0
           else f"exited with code {code}" if code is not None else "ended (its exit code was taken elsewhere)")
    try:
        state = watcher.status()
    except Exception:  # a hook must not fail over its words
        state = "unknown"
    if state == "active":
        then = "; circus starts another" if getattr(watcher, "respawn", True) else ""
        log.warning("%s pid %s %s while it ran%s", watcher.name, pid, how, then)
    elif code not in (0, None):
        log.warning("%s pid %s %s as it was stopped", watcher.name, pid, how)
    return True


def _signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} (signal {number})"
    except ValueError:
        return f"signal {number}"


def _exit_circusd(arbiter: Any, hook_name: str, message: str) -> NoReturn:
    """Stop circusd at its start, status 1, with ``message`` on its stderr and in its log."""
    log.error("%s: %s", hook_name, message)
    print(f"circusd: {message}", file=sys.stderr, flush=True)
    pidfile = arbiter.pidfile  # circus.ini's; circusd leaves it on this way out
    if pidfile and os.path.exists(pidfile):
        with open(pidfile) as f:
            if f.read().strip() == str(os.getpid()):
                os.unlink(pidfile)
    _remove_socket_files(arbiter.endpoint, arbiter.pubsub_endpoint)
    # Its log, opened before any hook under circusd's umask: the writer's after_start hook, which
    # makes it private, is not reached this way.
    private_circusd_files(None, arbiter, hook_name)
    # Out of circus's event loop (a hook's exception is only logged): circusd closes its sockets
    # and exits 1, before it has started anything.
    raise SystemExit(1)


def writer_started(watcher: Any, arbiter: Any, hook_name: str, **kwargs: Any) -> bool:
    """The writer's ``after_start``: circusd's own files made private
    (:func:`supervision.streams.private_circusd_files`), then a wait until the writer answers, as
    its dependents wait (:func:`wait_for_writer`): a start or a restart of it, circusctl's with
    ``--waiting`` and the console's, is done once it serves, not once its process exists. A
    second restart right after one killed the new writer while it still imported its modules
    (SIGTERM's default then: no drain, though nothing was in flight yet). At most
    :data:`WRITER_START_WAIT_S`: circusd answers nothing meanwhile, and a writer that waits for its
    PostgreSQL server would hold it for the whole ready timeout at every restart; its dependents
    still wait theirs at a start of the stack. A writer that says it waits for its server
    (:mod:`db.server_wait`) is not waited for at all. Never refuses: circus stops a watcher whose
    ``after_start`` returns false."""
    from db.config import ConfigError, load_settings

    private_circusd_files(watcher, arbiter, hook_name, **kwargs)
    try:
        settings = load_settings()
    except ConfigError as e:  # the writer says it in its own log, and exits
        log.error("%s: %s; not waiting for the writer", hook_name, e)
        return True
    _wait_guarded(settings, arbiter, hook_name, "its start is done",
                  "circus goes on without waiting more (it serves once it is ready)",
                  timeout=min(settings.ready_timeout, WRITER_START_WAIT_S))
    return True


def wait_for_writer(watcher: Any, arbiter: Any, hook_name: str, **kwargs: Any) -> bool:
    """Start ``watcher`` once the writer answers a ping, or at once when waiting is pointless: the
    writer's watcher is stopped (on purpose: the console, the API and the spooling feed are wanted
    without it, and the console is how an operator starts it again), its process is gone, or it
    did not answer in ``TICKSTACK_READY_TIMEOUT`` (then the next dependents ping that process once,
    briefly, instead of waiting again: each wait stalls circusd). Never refuses: every dependent
    tolerates a missing writer by itself; only a setting that does not load leaves it stopped."""
    # Imported here: circusd imports this module at start, before any watcher's environment matters.
    from db.circusd import circusctl_command
    from db.config import ConfigError, load_settings

    try:
        settings = load_settings()
    except ConfigError as e:
        log.error("%s: %s; not starting %s", hook_name, e, watcher.name)
        return False
    pids = _writer_pids(arbiter)
    if pids is None:
        log.warning("%s: the writer is stopped; starting %s without waiting for it (its writes fail until "
                    "`%s`)", hook_name, watcher.name, circusctl_command(arbiter.endpoint, "start", "writer"))
        return True
    if not pids:
        log.warning("%s: the writer has no process; starting %s without waiting for it", hook_name, watcher.name)
        return True
    _wait_guarded(settings, arbiter, hook_name, f"starting {watcher.name}",
                  f"starting {watcher.name} without it (it waits for the writer by itself)", pids)
    return True


def _wait_guarded(settings: Any, arbiter: Any, hook_name: str, then: str, otherwise: str,
                  pids: list[int] | None = None, timeout: float | None = None) -> None:
    """:func:`_wait_ready`, whose failure is logged and gone past: a hook that raises leaves its
    watcher stopped, and a wait for the writer is never a reason to (a record in run/ that its
    reader could not take raised out of here once: review of round 42)."""
    try:
        _wait_ready(settings, arbiter, hook_name, then, otherwise, pids, timeout=timeout)
    except Exception:
        log.exception("%s: waiting for the writer failed; %s", hook_name, otherwise)


def _wait_ready(settings: Any, arbiter: Any, hook_name: str, then: str, otherwise: str,
                pids: list[int] | None = None, timeout: float | None = None) -> None:
    """Wait until the writer's process (``pids``, else circus's list) answers a ping, at most
    ``timeout`` (``TICKSTACK_READY_TIMEOUT`` when None); said in circusd's log, ending with ``then``,
    or ``otherwise`` when it did not answer. A process that already let one wait run the whole ready
    timeout gets one short ping: answered, it is waited for no more; silent, the next waits do not
    stall circusd for it again (a shorter ``timeout`` run out marks nothing)."""
    from db.client import WriterClient
    from db.errors import WriterUnavailable
    from db.server_wait import wait_file, waiting_reason

    global _unready_writer
    pids = _writer_pids(arbiter) if pids is None else pids
    if not pids:
        return
    # A writer that waits for its database server cannot answer before the server does (up to
    # minutes): no wait for it, which would hold circusd's loop (40 s at a start with the server down).
    said = wait_file(settings.run_dir)
    if _server_wait(said, pids, hook_name, otherwise):
        return
    again = set(pids) == {_unready_writer}
    client = WriterClient(settings=settings, deadline=1.0)
    try:
        ping = client.wait_ready(UNREADY_PING_S if again else timeout or settings.ready_timeout,
                                 is_alive=lambda: any(map(_alive, pids)) and waiting_reason(said, pids) is None)
    except WriterUnavailable as e:
        if _server_wait(said, pids, hook_name, otherwise):
            return
        exited = not any(map(_alive, pids))
        if timeout is None or again or exited:
            _unready_writer = pids[0] if len(pids) == 1 and not exited else None
        log.warning("%s: %s; %s", hook_name,
                    f"the writer pid {pids[0]} still does not answer" if again and not exited else e, otherwise)
        return
    finally:
        client.close()
    _unready_writer = None
    _remember_database(settings.database_path)  # a ready writer has made it: it is the stack's from now on
    log.info("%s: writer pid %s ready (%.1f ms); %s", hook_name, ping["pid"], ping["latency_ms"], then)


def _server_wait(said: Path, pids: list[int], hook_name: str, otherwise: str) -> bool:
    """Whether the writer (``pids``) says in ``said`` (:mod:`db.server_wait`) that it waits for its
    database server; if so, said in circusd's log, and once on circusd's stderr (the terminal of a
    plain ``circusd circus.ini``, which showed nothing while circusctl went unanswered)."""
    from db.server_wait import waiting_reason

    global _told_terminal, _told_wait
    reason = waiting_reason(said, pids)
    if reason is None:
        return False
    if _told_wait == pids[0]:  # the reason once per writer process: the next dependents only say they go on
        log.warning("%s: the writer pid %s still waits for its database server; %s", hook_name, pids[0], otherwise)
    else:
        _told_wait = pids[0]
        log.warning("%s: the writer pid %s waits for its database server: %s; %s", hook_name, pids[0], reason,
                    otherwise)
    if not _told_terminal:
        _told_terminal = True
        print(f"circusd: the writer waits for its database server: {reason}. The other watchers start without it "
              "and the writer serves once the server answers (it tries every second; log/writer.log)",
              file=sys.stderr, flush=True)
    return True


#: Whether this circusd said on its stderr that the writer waits for its server (once is enough).
_told_terminal = False
#: The writer process whose wait for its server circusd's log gave the reason of.
_told_wait: int | None = None
#: How long a writer process that was silent for a whole ready timeout is pinged at a later start.
UNREADY_PING_S = 0.5
#: The writer process that did not answer within the ready timeout: later dependents only ping it.
_unready_writer: int | None = None


def _writer_pids(arbiter: Any) -> list[int] | None:
    """The pids of the writer's processes, as circus knows them; None when its watcher is stopped,
    stopping, or not in circus.ini."""
    try:
        writer = arbiter.get_watcher("writer")
    except KeyError:
        return None
    if writer.status() in ("stopped", "stopping"):
        return None
    return [pid for pid in writer.processes if _alive(pid)]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not). Not ``Popen.poll()``: that would reap circus's child
    behind its back."""
    import psutil

    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False
