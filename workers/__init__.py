"""Worker processes and the pure logic they run (feeds, bars, indicators)."""
