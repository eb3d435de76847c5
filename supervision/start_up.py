"""What a tickstack process does once its modules are loaded, before its work (workers and web apps)."""
from __future__ import annotations

import gc


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
    and what is opened before the freeze must be closed the same way."""
    gc.freeze()
