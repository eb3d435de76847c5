"""The writer lock: what makes "exactly one writer" a fact, not a hope.

An exclusive ``flock`` on a file beside the database, holding the holder's
pid. The kernel drops it when the holder dies, however it dies, so a killed
writer never leaves a stale lock behind. Anything that writes the database
(the writer, ``python -m db init``) holds it while it does.

A file lock is per folder, so on PostgreSQL (one database, several homes or
hosts) the writer also holds :class:`db.server_lock.ServerWriterLock`, a session-level
advisory lock on the server, one per host (``TICKSTACK_HOST``), that ends with
its session: a second writer for the same host on that database refuses to
start, naming the first. Writers of different hosts share the database (each
host's feeds write through their own); the readers that follow tick ids wait
for every writer's open transactions (:class:`db.tick_horizon.TickHorizon`).
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger("tickstack.writer")


class WriterLocked(RuntimeError):
    """Another writer holds the lock; the message names its pid."""


#: How long :meth:`PidLock.try_acquire` tries again while the lock is taken: a reader's shared hold
#: lasts microseconds, a holder's for as long as it lives.
CONTENDED_S = 0.2


class PidLock:
    """An exclusive ``flock`` on a file, holding the holder's pid.

    The kernel drops the lock when its holder dies, however it dies, so a
    killed holder never leaves a stale lock behind (:func:`read_lock_holder`
    names the live one).
    """

    def __init__(self, path: os.PathLike[str] | str) -> None:
        self.path = os.fspath(path)
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it (True), or leave it (False) within :data:`CONTENDED_S`:
        :func:`read_lock_holder` (``db health``, the console) holds it shared for a moment, which
        alone must not make a writer refuse to start or a worker stand by."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)  # one made by someone else (flock(1), another umask) is private from now on
            deadline = time.monotonic() + CONTENDED_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        return False
                    time.sleep(0.002)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:  # a full disk at the pid's write: the lock must not stay held by a lost fd
            try:
                os.close(fd)
            except OSError:  # closed above
                pass
            raise
        self.fd = fd
        return True

    def still_ours(self) -> bool:
        """Whether the path still names the file this process locked: removed or replaced (a
        ``db backup --force`` over it, a person tidying the folder), the next process would lock
        another file and run beside this one."""
        if self.fd is None:
            return False
        mine = os.fstat(self.fd)
        try:
            there = os.stat(self.path)
        except FileNotFoundError:
            return False
        except OSError:  # cannot tell now (an I/O error): not a reason to stop leading
            return True
        return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:  # a disk turned read-only, failing: the pid stays; the lock goes with the close
                pass
            os.close(self.fd)
            self.fd = None


class WriterLock(PidLock):
    """The writer's :class:`PidLock`, beside the database (``Settings.writer_lock_path``)."""

    def acquire(self, wait: float = 0.0, stopping: Callable[[], bool] = lambda: False) -> None:
        """Take the lock, waiting up to ``wait`` seconds for its holder to end (said once, at INFO),
        and no longer once ``stopping()``; else raise :class:`WriterLocked` naming the holder. circus's
        reload starts a new writer before it stops the old one, whose drain and last checkpoint then
        take seconds."""
        def holder() -> tuple[str, str]:  # who holds it, and what a start refuses; read for the words only
            pid, command = lock_holder_words(self.path)
            if command is not None:  # a restore: "another writer" sent people looking for one
                return f"`{command}` (pid {pid}) holds {self.path}", "while it does"
            return f"another writer (pid {pid or 'unknown'}) holds {self.path}", "a second one"

        def why() -> str:  # a reload's words only of a writer: a restore's wait was said as one
            return RELOAD_WHY if lock_holder_words(self.path)[1] is None else NOT_A_WRITER_WHY

        held = HeldLockWait(wait, stopping, every=0.1, why=why)
        while not self.try_acquire():
            if not held.goes_on(lambda: holder()[0]):
                said, refusing = holder()
                raise WriterLocked(f"{said}; refusing to start {refusing}, since exactly one process may write "
                                   "the database")


#: Why a writer may find its home's file lock held: this home's previous writer, still draining.
RELOAD_WHY = ("it may be this home's previous writer, draining: circus's reload starts the new writer before it "
              "stops the old one; a writer that runs on is not waited for longer")
#: Why a writer may find its home's file lock held by a command that is not a writer (a restore).
NOT_A_WRITER_WHY = "not a writer: it holds the lock for as long as it runs, and this writer refuses if it runs on"
#: Why a writer may find its host's lock on the server held once it holds its home's file lock: not a
#: reload (that writer would hold the file lock too), but a stack of another home with the same
#: TICKSTACK_HOST on this database (or this home's previous writer's session, for a moment).
HOST_TAKEN_WHY = ("a writer with the same TICKSTACK_HOST in another home (another stack) holds it: give this "
                  "stack its own TICKSTACK_HOST, or stop that stack's writer")
#: Seconds of a wait for the server's lock before it is said: the session of this home's previous
#: writer ends a moment after that writer let the file lock go (review: a reload's wait, said as
#: another stack's, would send the reader looking for a stack that is not there).
HOST_TAKEN_SAY_AFTER_S = 1.0


class HeldLockWait:
    """The wait of a starting writer for a lock another writer holds (the file's, the server's): at
    most ``wait`` seconds, and no longer once ``stopping()``, trying again every ``every`` seconds; said
    once, at INFO, with ``why`` (or what it returns, asked then), once it has lasted ``say_after``
    seconds: :data:`RELOAD_WHY` for the file lock held by a writer (circus's reload starts the new
    writer before it stops the old one, whose drain and last checkpoint then take seconds),
    :data:`NOT_A_WRITER_WHY` held by a restore, :data:`HOST_TAKEN_WHY` for the server's."""

    def __init__(self, wait: float, stopping: Callable[[], bool], every: float,
                 why: str | Callable[[], str] = RELOAD_WHY, say_after: float = 0.0) -> None:
        self.wait, self.stopping, self.every = wait, stopping, every
        self.why, self.say_after = why, say_after
        self.started = time.monotonic()
        self.deadline = self.started + wait
        self.said = False

    def goes_on(self, holder: Callable[[], str]) -> bool:
        """After a try that found the lock held (``holder()``: who holds it, in words, asked only to say
        it): False when the wait is over; else wait ``every`` seconds and True."""
        if time.monotonic() >= self.deadline or self.stopping():
            return False
        if not self.said and time.monotonic() - self.started >= self.say_after:
            log.info("writer: %s; waiting up to %g s for it to end (%s)", holder(), self.wait,
                     self.why() if callable(self.why) else self.why)
            self.said = True
        time.sleep(self.every)
        return True


def read_lock_holder(path: os.PathLike[str] | str) -> int | None:
    """The pid of the process holding the :class:`PidLock` at ``path`` (the writer's, a leader's), or
    None. It takes the lock shared for a moment to tell (:meth:`PidLock.try_acquire` waits that out)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def holder_command(pid: int | None) -> str | None:
    """What holds a :class:`PidLock` when it is not a writer, for words: ``python -m db restore`` (a
    restore holds the writer lock for as long as it runs), ``python -m db init``, another program's
    name; None for a writer, a pid that is gone or unknown, or a command line that cannot be read
    (then the words stay a writer's)."""
    if pid is None:
        return None
    import psutil

    try:
        process = psutil.Process(pid)
        argv = process.cmdline()
        name = process.name()
    except (psutil.Error, OSError):
        return None
    run = _module_run(argv)
    if run is not None:
        module, after = run
        if module == "workers.writer":
            return None
        if module == "db":
            command = next((arg for arg in after if not arg.startswith("-")), None)
            return f"python -m db {command}" if command else "python -m db"
        return f"python -m {module}"
    return name or None


def _module_run(argv: list[str]) -> tuple[str, list[str]] | None:
    """The module of the first ``-m`` in ``argv`` and the arguments after it, in every form Python
    takes: ``-m mod``, ``-mmod``, and run together with other options (``-um mod``, ``-Im mod``; a
    ``-um workers.writer`` writer was taken for another program). None without one."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-") or arg.startswith("--"):
            continue
        for j, flag in enumerate(arg[1:], start=2):
            if flag in "cWX":  # an option's value follows (here or as the next argument): not a -m
                break
            if flag == "m":
                if arg[j:]:
                    return arg[j:], argv[i + 1:]
                return (argv[i + 1], argv[i + 2:]) if i + 1 < len(argv) else None
    return None


def lock_holder_words(path: os.PathLike[str] | str) -> tuple[int | None, str | None]:
    """The pid holding the writer lock at ``path`` (:func:`read_lock_holder`) and, when it is not a
    writer, what it is (:func:`holder_command`)."""
    pid = read_lock_holder(path)
    return pid, holder_command(pid)
