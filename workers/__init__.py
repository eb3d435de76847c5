"""Worker processes and the pure logic they run (feeds, bars, indicators)."""
# First of all, in a worker run as a command: no collection while it loads (supervision.start_up).
from supervision.start_up import pause_collection_while_loading

pause_collection_while_loading()

# Before anything can import numpy (the writer and the analysis worker do): see db.config.
from db.config import one_blas_thread  # noqa: E402

one_blas_thread()

# Then, first of what matters in every worker process: note the parent (circusd) before the heavy
# imports, so that a circusd that dies while this process starts is noticed (see supervision.lifeline).
import supervision.lifeline  # noqa: E402,F401
