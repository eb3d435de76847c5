"""Worker processes and the pure logic they run (feeds, bars, indicators)."""
# First thing in every worker process: note the parent (circusd) before the heavy imports, so that
# a circusd that dies while this process starts is noticed (see supervision.lifeline).
import supervision.lifeline  # noqa: F401
