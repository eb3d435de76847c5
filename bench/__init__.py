"""Benchmarks for tickstack: ``python -m bench <command>`` (see :mod:`bench.__main__`)."""
