"""The slowest reads: every statement of a read engine timed, the slowest kept, shared across processes.

PgHero's "slow queries" for a stack whose API and console run as several gunicorn worker processes.
:func:`db.engine.configure_read_only` hooks :func:`instrument` onto every read engine
(SQLAlchemy's ``before_cursor_execute`` / ``after_cursor_execute`` events), so each statement is
timed around the driver's ``execute`` (the fetch of its rows is not in it).

* **No user data.** A statement is recorded as its normalised text: string and number literals
  become ``?``, a bound parameter (``%(symbol_1)s``) becomes ``?``, lists of ``?`` fold to
  one, whitespace is collapsed, and the text is cut at :data:`MAX_SQL` characters. Parameters are
  never looked at: they hold what users sent.
* **Bounded.** A process keeps at most :data:`KEEP` statements (the slowest by max and by total
  survive a prune), each ``{sql, count, total_ms, max_ms}``; the normalisation of a statement's
  text is cached (:data:`NORMALISED_CACHE` entries; SQLAlchemy reuses the same compiled strings).
* **Shared like prometheus' multiprocess mode.** Each process writes its record to
  ``$TICKSTACK_HOME/run/slow-reads/<pid>.json`` (folder 0700, file 0600, replaced atomically), at
  most every :data:`FLUSH_EVERY_S` seconds, from a timer thread started by the first statement
  after a write (so a request never waits on the file, and the last reads of a process that then
  stays idle reach it too).
  :func:`read_all` merges every live process's file; the file of a pid that is gone (or reused
  by another process: its start time differs) is deleted.
* **Cheap.** Two ``perf_counter`` calls, a cached dict lookup and a few additions per statement,
  under a lock (gunicorn's threads share the record). Measured on this project's 2-core box: about
  6.5 µs per statement (a trivial SQLite SELECT through SQLAlchemy took 35 µs, 41.5 µs timed;
  2.5 µs of it is SQLAlchemy dispatching the two events at all), 16 µs on a 100-tick page read of
  about 650 µs (2.5 %).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

log = logging.getLogger("tickstack.slowreads")

FOLDER = "slow-reads"
#: Statements kept per process; pruned back to this once it holds twice as many.
KEEP = 100
#: Longest statement text kept, in characters.
MAX_SQL = 2000
#: Seconds between two writes of a process's file.
FLUSH_EVERY_S = 3.0
#: Distinct raw statement texts whose normalisation is remembered.
NORMALISED_CACHE = 1024
#: Files read at most (the newest first): a bound on the page's work whatever is in the folder.
MAX_FILES = 256

_STRING_RE = re.compile(r"'(?:[^']|'')*'")
_NUMBER_RE = re.compile(r"(?<![\w.$])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b")
# The paramstyles of our drivers: sqlite3's qmark, psycopg's pyformat.
_PARAM_RE = re.compile(r"%\(\w+\)s|%s|\?")
_LIST_RE = re.compile(r"\?(?:\s*,\s*\?)+")
_SPACE_RE = re.compile(r"\s+")
# A name with digits (``ticks_1``, ``anon_2``) must keep them: only free-standing numbers are literals.


@lru_cache(maxsize=NORMALISED_CACHE)
def normalise(sql: str) -> str:
    """``sql`` without a literal value: ``SELECT ... WHERE symbol = 'X' LIMIT 10`` reads
    ``SELECT ... WHERE symbol = ? LIMIT ?`` (module docstring)."""
    text = _STRING_RE.sub("?", sql)
    text = _PARAM_RE.sub("?", text)
    text = _NUMBER_RE.sub("?", text)
    text = _LIST_RE.sub("?, ...", text)
    text = _SPACE_RE.sub(" ", text).strip()
    return text if len(text) <= MAX_SQL else text[:MAX_SQL - 1] + "…"


def process_kind() -> str:
    """What this process is, as the page names it: ``api`` or ``console`` for a gunicorn serving
    ``webapp:create_app('api')`` (the app spec on its command line; ``all`` serves both), else the
    program (``analysis``, ``pytest``...)."""
    for arg in sys.argv[1:]:
        m = re.search(r"create_app\(\s*['\"](\w+)['\"]\s*\)", arg)
        if m:
            return m.group(1)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__").rsplit(".", 1)[-1]
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"


def _start_time(pid: int) -> float | None:
    """The start time of process ``pid`` (None when it is gone): a reused pid is another process."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


class Recorder:
    """This process's slowest statements and their file (module docstring). Thread-safe: gunicorn's
    threads share it."""

    def __init__(self, folder: Path, kind: str | None = None) -> None:
        self.folder = folder
        self.kind = kind or process_kind()
        self.pid = os.getpid()
        self.started = _start_time(self.pid)
        #: normalised sql -> [count, total ms, max ms]
        self.stats: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        #: held while the file is written: a flush that finds nothing dirty because the timer thread
        #: took it waits for that write (at exit, the daemon timer thread is killed mid-write).
        self.writing = threading.Lock()
        self.dirty = False
        self.last_flush = 0.0
        self.timer: threading.Timer | None = None
        self.flushed = False

    def record(self, sql: str, ms: float, now: float | None = None) -> None:
        """One run of ``sql`` that took ``ms``; ``now`` is ``time.perf_counter()`` if the caller has it."""
        key = normalise(sql)
        with self.lock:
            entry = self.stats.get(key)
            if entry is None:
                if len(self.stats) >= 2 * KEEP:
                    self._prune()
                self.stats[key] = [1, ms, ms]
            else:
                entry[0] += 1
                entry[1] += ms
                if ms > entry[2]:
                    entry[2] = ms
            self.dirty = True
            if self.timer is None:
                # The file is written by a timer thread, never by the request running the statement
                # (no file I/O on its path), at most every FLUSH_EVERY_S, and also after the last
                # read of a process that then stays idle.
                if now is None:
                    now = time.perf_counter()
                self.timer = threading.Timer(max(0.0, FLUSH_EVERY_S - (now - self.last_flush)), self.flush)
                self.timer.daemon = True
                self.timer.start()

    def _prune(self) -> None:
        """Keep the :data:`KEEP` // 2 slowest by max and by total (under the lock)."""
        by_max = sorted(self.stats, key=lambda k: self.stats[k][2], reverse=True)[:KEEP // 2]
        by_total = sorted(self.stats, key=lambda k: self.stats[k][1], reverse=True)[:KEEP // 2]
        keep = set(by_max) | set(by_total)
        self.stats = {k: v for k, v in self.stats.items() if k in keep}

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            rows = [{"sql": k, "count": int(v[0]), "total_ms": round(v[1], 3), "max_ms": round(v[2], 3)}
                    for k, v in self.stats.items()]
        return {"pid": self.pid, "started": self.started, "kind": self.kind, "updated_ms": int(time.time() * 1000),
                "statements": rows}

    def flush(self) -> None:
        """Write the record to this process's file now (atomically; private); on return, every
        statement recorded before the call is on disk (or could not be written)."""
        with self.writing:
            self._write()

    def _write(self) -> None:
        with self.lock:
            self.timer = None
            if not self.dirty or os.getpid() != self.pid:
                return
            self.dirty = False
            self.last_flush = time.perf_counter()
        try:
            # Not parents=True: a home removed under a running process is not made again (its folders
            # would be left behind, and not private: only the last of a mkdir -p gets the mode).
            self.folder.mkdir(mode=0o700, exist_ok=True)
            if not self.flushed:  # once per process: what dead processes left goes, even unread
                self.flushed = True
                _live_files(self.folder, clean=True)
            path = self.folder / f"{self.pid}.json"
            tmp = self.folder / f".{self.pid}.{threading.get_ident()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(self.snapshot(), f, separators=(",", ":"))
            os.replace(tmp, path)
        except OSError as e:  # a full disk or a removed home: the reads themselves go on
            log.debug("slow reads: cannot write %s: %s", self.folder, e)


#: str(folder) -> this process's recorder (a str key: hashing a Path costs more, per statement).
_recorders: dict[str, Recorder] = {}
_recorders_lock = threading.Lock()


def recorder(folder: Path) -> Recorder:
    """This process's recorder for ``folder`` (a new one after a fork: the parent's is not ours)."""
    with _recorders_lock:
        rec = _recorders.get(str(folder))
        if rec is None or rec.pid != os.getpid():
            rec = _recorders[str(folder)] = Recorder(folder)
        return rec


def forget(run_dir: Path) -> None:
    """Drop this process's recorder under ``run_dir``: its timer cancelled, a write in progress
    waited for, nothing more written. For a program that removes a home it read from in-process (the
    tests' homes): the timer's write, up to :data:`FLUSH_EVERY_S` later, made ``run/slow-reads`` again
    inside a home being removed, and the home was left behind (a fresh clone's run)."""
    with _recorders_lock:
        rec = _recorders.pop(str(run_dir / FOLDER), None)
    if rec is None:
        return
    with rec.lock:
        rec.dirty = False
        if rec.timer is not None:
            rec.timer.cancel()
            rec.timer = None
    with rec.writing:  # a write the timer had begun ends before the caller removes the folder
        pass


def _forget_after_fork() -> None:
    global _recorders_lock
    _recorders_lock = threading.Lock()  # a thread of the parent may have held it at fork()
    _recorders.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


@atexit.register
def _flush_at_exit() -> None:
    for rec in list(_recorders.values()):
        if rec.pid == os.getpid():
            rec.flush()


def instrument(engine: Engine, run_dir: Path) -> None:
    """Time every statement ``engine`` runs into this process's record under ``run_dir``."""
    folder = run_dir / FOLDER
    key = str(folder)
    perf = time.perf_counter

    # The start time rides on the statement's execution context (one per statement, so a nested
    # or failed statement cannot mix two up); Connection.info would cost a pool lookup each time.
    @event.listens_for(engine, "before_cursor_execute")
    def _before(_conn: Any, _cursor: Any, _statement: str, _params: Any, context: Any, _many: bool) -> None:
        if context is not None:
            context._slowreads_t0 = perf()

    @event.listens_for(engine, "after_cursor_execute")
    def _after(_conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: bool) -> None:
        t0 = getattr(context, "_slowreads_t0", None)
        if t0 is not None:
            now = perf()
            # Without the lock, which is only needed to make one; after a fork the table is empty.
            rec = _recorders.get(key) or recorder(folder)
            rec.record(statement, (now - t0) * 1000.0, now)


def _live_files(folder: Path, clean: bool) -> list[tuple[Path, float]]:
    """(file, start time of its process) of each process alive under ``folder``, newest first; the
    files of processes that are gone, and temporary files they left, are deleted (``clean``)."""
    found: list[tuple[float, Path, float]] = []
    try:
        names = list(folder.iterdir())
    except OSError:
        return []
    for path in names:
        stem = path.name.split(".")[1] if path.name.startswith(".") else path.stem
        if not stem.isdigit():
            continue
        started = _start_time(int(stem))
        try:
            if started is None:
                if clean:
                    path.unlink(missing_ok=True)
                continue
            if path.suffix == ".json":
                found.append((path.stat().st_mtime, path, started))
        except OSError:  # removed meanwhile (another reader cleaning): nothing to read
            continue
    found.sort(key=lambda f: f[0], reverse=True)
    return [(path, started) for _, path, started in found[:MAX_FILES]]


def read_all(run_dir: Path, clean: bool = True) -> list[dict[str, Any]]:
    """Every live process's record (this process's own, fresh from memory), as written by
    :meth:`Recorder.flush`; the files of processes that are gone are deleted (``clean``), and so is
    a file whose pid now belongs to another process (its start time differs)."""
    folder = run_dir / FOLDER
    mine = _recorders.get(str(folder))
    out: list[dict[str, Any]] = []
    if mine is not None and mine.pid == os.getpid():
        out.append(mine.snapshot())
    for path, started in _live_files(folder, clean):
        try:
            pid = int(path.stem)
            if mine is not None and pid == mine.pid:
                continue
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or record.get("pid") != pid:
            continue
        if isinstance(record.get("started"), int | float) and abs(started - record["started"]) > 1:
            if clean:  # the pid was reused: the process that wrote it is gone
                path.unlink(missing_ok=True)
            continue
        out.append(record)
    return out


def slowest(records: list[dict[str, Any]], by: str = "max", limit: int = 20,
            kind: str | None = None) -> list[dict[str, Any]]:
    """The ``limit`` slowest statements by ``max`` or ``total`` ms (of processes of ``kind`` only,
    when given), merged per (process kind, statement) over every process:
    ``{kind, sql, count, total_ms, max_ms, mean_ms, processes}``."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        of = str(record.get("kind") or "?")
        if kind is not None and of != kind:
            continue
        for st in record.get("statements") or []:
            try:
                sql, count, total, top = str(st["sql"]), int(st["count"]), float(st["total_ms"]), float(st["max_ms"])
            except (KeyError, TypeError, ValueError):
                continue
            row = merged.setdefault((of, sql), {"kind": of, "sql": sql, "count": 0, "total_ms": 0.0,
                                                  "max_ms": 0.0, "processes": 0})
            row["count"] += count
            row["total_ms"] += total
            row["max_ms"] = max(row["max_ms"], top)
            row["processes"] += 1
    for row in merged.values():
        row["mean_ms"] = row["total_ms"] / row["count"] if row["count"] else 0.0
    key = "total_ms" if by == "total" else "max_ms"
    return sorted(merged.values(), key=lambda r: r[key], reverse=True)[:limit]
