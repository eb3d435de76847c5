"""Worker processes and the pure logic they run (feeds, bars, indicators)."""
# First thing in every worker process: note the parent (circusd) before the heavy imports, so that
# a circusd that dies while this process starts is noticed (see supervision.lifeline).
import os

import supervision.lifeline  # noqa: F401

# Before numpy is first imported (the writer and the analysis worker import it): its OpenBLAS starts
# a thread for every other core when it loads, and that thread spins for a while, about 0.1 s of CPU
# in every process at every start (measured here: `import numpy` 0.18 to 0.26 s of user CPU, 0.08 to
# 0.15 with one thread), taken from the writer and the rest on a 2-core machine. No worker calls a
# BLAS routine (sorts, sums, searches only), so one thread loses nothing. A value the user set wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
