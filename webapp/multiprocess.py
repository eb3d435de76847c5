"""prometheus-client's multiprocess mode under gunicorn, so that one scrape of ``/metrics`` counts
the requests of every worker (:mod:`webapp.metrics`), and the gunicorn hooks that run it.

gunicorn serves the API with several worker processes and a scrape lands on whichever accepts
it. Counted per process, each scrape would show one worker's counters, a different one each time:
Prometheus would see counters jump down and up. In multiprocess mode every worker writes its
values to memory-mapped files (``counter_<pid>.db``, ...) in one folder, and the scraping worker
sums the files of all workers (``MultiProcessCollector``); the files of a worker that exited stay,
so its counts stay in the totals (counters never go down while the API runs).

Why an environment variable, when only :mod:`db.config` reads the environment: prometheus_client
chooses its mode once, when it is first imported, from ``PROMETHEUS_MULTIPROC_DIR``, and takes its
files' folder from it. gunicorn's workers import it when they load the app, after the fork, so the
variable must be in the master's environment before the first worker is forked. The folder comes
from the settings (``$TICKSTACK_HOME/run/metrics``), and gunicorn itself sets the variable: the
config module gives :func:`environment` as gunicorn's ``raw_env``, which gunicorn applies to the
master's environment before ``on_starting``; nothing here reads it back. This module must not
import prometheus_client at its top: the master imports it before any of this runs.

Why one folder per gunicorn master (``run/metrics/<master pid>``, mode 0700): the API and the
console share one gunicorn config module (:mod:`webapp.gunicorn_conf`), so both masters run these
hooks; a single shared folder emptied at each start would let the console's start wipe the API's
live counters. Each master's folder is made empty at its start and removed at its exit; folders of
masters that no longer run (one killed by SIGKILL) are removed at the next start. The console
writes no metrics, so its folder stays empty. A scrape reads the folders of every master that
runs (:class:`EveryMaster`): ``circusctl incr api`` runs two on the API's port. The folder is
named when gunicorn reads its config, by that process's pid: the master's, as gunicorn runs in
the foreground under circus (never with ``--daemon``, which would fork a master of another pid).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

from db.config import Settings

log = logging.getLogger("gunicorn.error")

#: The variable prometheus_client reads at import to choose multiprocess mode and find its folder.
ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
#: Under ``$TICKSTACK_HOME/run``: one subfolder per gunicorn master.
FOLDER = "metrics"


def root_of(settings: Settings) -> Path:
    """The folder of every gunicorn master's metric folder."""
    return settings.run_dir / FOLDER


def folder_of(settings: Settings, master_pid: int) -> Path:
    """The metric files' folder of the gunicorn master ``master_pid``."""
    return root_of(settings) / str(master_pid)


def _of_a_live_master(folder: Path) -> bool:
    """Whether ``folder`` is a master's (named by its pid) and that master runs."""
    return folder.name.isdigit() and psutil.pid_exists(int(folder.name))


def environment(folder: Path) -> list[str]:
    """gunicorn's ``raw_env`` that points prometheus_client at ``folder``."""
    return [f"{ENV_VAR}={folder}"]


def start(folder: Path) -> None:
    """In the gunicorn master, before any worker (``on_starting``): remove the folders of masters
    that no longer run, and make ``folder`` new and empty (0700)."""
    root = folder.parent
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    for child in root.iterdir():
        if child != folder and child.name.isdigit() and not _of_a_live_master(child):
            shutil.rmtree(child, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)  # a pid reused from an earlier master: start from zero
    folder.mkdir(mode=0o700)
    if "prometheus_client" in sys.modules:
        log.error("prometheus_client was imported in the gunicorn master before on_starting: if it was "
                  "imported before gunicorn set %s, workers count per process and /metrics does not merge them",
                  ENV_VAR)


def worker_exited(folder: Path, pid: int) -> None:
    """In the master, after worker ``pid`` exited (gunicorn's ``child_exit``): prometheus_client's
    bookkeeping for a dead process (it drops the worker's live gauges; its counters stay)."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, str(folder))


def stop(folder: Path) -> None:
    """In the master as it exits (gunicorn's ``on_exit``): remove its folder."""
    shutil.rmtree(folder, ignore_errors=True)


class EveryMaster:
    """A collector for the API's registry: prometheus_client's merge of the files of every gunicorn
    master that runs, not of this worker's master only. ``circusctl incr api`` (the console's +1
    process) runs a second master on the API's port, each with its folder: a scrape showed the
    counts of the master whose worker took it, so the totals jumped down and up from scrape to
    scrape. The console's master writes no files, so its folder adds nothing."""

    def __init__(self, settings: Settings) -> None:
        self.root = root_of(settings)

    def collect(self) -> Iterable[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        for _ in range(3):
            files = [str(path) for folder in self._masters() for path in folder.glob("*.db")]
            try:
                return MultiProcessCollector.merge(files, accumulate=True)
            except FileNotFoundError:  # a master exited (its folder removed) while it was read: again
                continue
        return MultiProcessCollector.merge([], accumulate=True)

    def _masters(self) -> list[Path]:
        try:
            folders = list(self.root.iterdir())
        except OSError:
            return []
        # A folder left by a master killed with SIGKILL stays until the next start: not counted.
        return [f for f in folders if _of_a_live_master(f)]


#: Bytes an entry of a values file takes at most beyond its key's (prometheus_client's ``mmap_dict``:
#: a 4-byte length, up to 8 of padding, a value and a timestamp of 8 each).
_ENTRY_SLACK = 28


def preallocate_value_files() -> None:
    """Make prometheus_client take the disk blocks of each values file before it maps them. It makes a
    file by ``truncate`` (sparse) and writes through a memory map: on a full disk the first write to
    a page with no block behind it was a SIGBUS, which killed each API worker at its first request,
    every request answered with a closed connection (fault hunt as an operator). ``posix_fallocate``
    says ENOSPC as an ``OSError`` instead, which :meth:`webapp.metrics.Metrics.observe` drops. Called
    where the app's metrics are made, in the worker; once is enough (prometheus_client reads the
    class from its ``values`` module each time it opens a file)."""
    from prometheus_client import mmap_dict, values

    if getattr(values.MmapedDict, "preallocated", False):
        return
    initial = mmap_dict._INITIAL_MMAP_SIZE

    class PreallocatedMmapedDict(mmap_dict.MmapedDict):  # type: ignore[misc]
        preallocated = True

        def __init__(self, filename: str, read_mode: bool = False) -> None:
            if not read_mode:
                _take_blocks(filename, initial)
            super().__init__(filename, read_mode)

        def _init_value(self, key: str) -> None:
            capacity = self._capacity
            while self._used + len(key.encode("utf-8")) + _ENTRY_SLACK > capacity:
                capacity *= 2
            if capacity != self._capacity:  # the file grows: its blocks first
                _take_blocks(self._fname, capacity)
            super()._init_value(key)

    values.MmapedDict = PreallocatedMmapedDict


def _take_blocks(path: str, size: int) -> None:
    """The disk blocks of the file at ``path`` (made 0600 if need be) up to ``size`` bytes, at least
    its own size: ``OSError`` (ENOSPC) when the disk has not got them. On a descriptor of its own:
    prometheus_client's is O_APPEND, which glibc's emulation of ``posix_fallocate`` refuses."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(os.fstat(fd).st_size, size))
    finally:
        os.close(fd)
