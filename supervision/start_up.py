"""What a tickstack process does while its modules load and once they are loaded, before its work
(workers and web apps)."""
from __future__ import annotations

import gc
import sys


def pause_collection_while_loading(command_only: bool = True) -> None:
    """Pause the garbage collector while this process loads its modules; :func:`freeze_start_up_objects`
    resumes it. Loading makes some 60,000 to 80,000 objects that live as long as the process, and no
    cyclic garbage (a full collection right after frees nothing), yet the collector walked them over
    and over as they were made: ``import workers.writer`` and a freeze, 15 runs each here, 0.41 s of
    CPU in the median, 0.35 s with the collector paused (0.38 s with only its thresholds raised).

    ``command_only``: only in a process run as a command (``python -m workers.x``: while ``runpy``
    imports the command's packages, ``sys.argv[0]`` is ``"-m"``), whose ``main`` freezes; a program or
    a test that imports a worker module keeps its collector as it is. gunicorn's ``post_fork`` hook
    passes False: it is a worker about to load its app, whose ``post_worker_init`` freezes."""
    if not command_only or sys.argv[:1] == ["-m"]:
        gc.disable()


def freeze_start_up_objects() -> None:
    """Move every object made so far into the garbage collector's permanent generation, which it
    never walks again. Call once a process's modules are loaded (and its app made), before its work.

    Why: those objects (the modules', SQLAlchemy's most of them: some 64,000 in the analysis worker,
    80,000 in a web worker with its app) live as long as the process anyway, and every full
    collection walked them all: about 40 ms each time here, the last one at exit. Measured:

    * ``bench analysis --only hourly``, medians of 6 runs: a worker's start and exit with nothing to
      do 0.52 to 0.44 s, the analysis of 5,000 bars 0.75 to 0.67 s (the replay's as much: it is
      the same start-up);
    * ``bench api``, the full collections in each gunicorn worker over one run: 3 to 4 of them,
      250 to 300 ms in all and up to 120 ms each (every thread of the worker waits: a p99 read),
      against 6 to 8 of 1.5 to 3 ms at most once the app's objects are frozen.

    A collection just before would free nothing: it finds no cyclic garbage at that point, and
    costs a full walk.

    The cost: an object made before the freeze that later ends in a reference cycle is never
    collected, nor finalized (a review of round 44 found each worker object so, with its client,
    engine and pool). Nothing relies on a finalizer: every ``teardown()`` closes what it opened,
    and what is opened before the freeze must be closed the same way.

    Resumes the collector :func:`pause_collection_while_loading` paused (or turns it on)."""
    gc.freeze()
    gc.enable()
