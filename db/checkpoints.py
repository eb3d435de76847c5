"""A checkpoint asked of the writer, measured and said in words, one way for ``python -m db
checkpoint``, the console's button and the jobs worker.

SQLite answers ``(busy, log, checkpointed)``, which after a TRUNCATE that emptied the WAL reads
"0 of 0 pages" as if nothing happened (``db checkpoint`` printed exactly that): what a checkpoint
did is said from the WAL's size before and after.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from db.files import file_sizes
from db.sizes import human_bytes


def wal_bytes(path: Path) -> int:
    """The size of the database's WAL; 0 when there is none."""
    return file_sizes(path)["wal"] or 0


def measured_checkpoint(call: Callable[..., dict[str, Any]], path: Path, mode: str = "TRUNCATE") -> dict[str, Any]:
    """``call("checkpoint", mode=mode)`` (a writer client's ``call``), with the WAL's size around it:
    SQLite's answer plus ``mode``, ``wal_before`` and ``wal_after``, as :func:`checkpoint_words` reads it.
    Raises what ``call`` raises."""
    before = wal_bytes(path)
    result = call("checkpoint", mode=mode)
    return {"mode": mode, "wal_before": before, "wal_after": wal_bytes(path), **result}


def _pages(n: int) -> str:
    return f"{n:,} page{'' if n == 1 else 's'}"


def checkpoint_words(result: dict[str, Any] | None) -> str:
    """A checkpoint's result (the writer's ``last_checkpoint``, :func:`measured_checkpoint`'s, a job
    run's detail: ``mode``, ``busy``, ``log``, ``checkpointed``, optionally ``wal_before``/``wal_after``)."""
    if not result:
        return "none yet"
    mode = str(result.get("mode") or "TRUNCATE").upper()
    busy, log, done = result.get("busy"), result.get("log"), result.get("checkpointed")
    before, after = result.get("wal_before"), result.get("wal_after")
    sizes = (f"the WAL went from {human_bytes(before)} to {human_bytes(after)}"
             if isinstance(before, int) and isinstance(after, int) else None)
    if busy:
        counted = isinstance(done, int) and isinstance(log, int)
        copied = f"{_pages(done)} of {log:,} copied" if counted else "part copied"
        return f"{mode}, partial: a reader held part of the WAL back ({copied}); " + (
            sizes or "the next checkpoint copies the rest")
    if mode == "TRUNCATE":
        if isinstance(before, int) and before == 0:
            return "TRUNCATE: nothing to copy, the WAL was already empty"
        return "TRUNCATE: every page of the WAL copied into the database and the WAL emptied" + (
            f" ({sizes})" if sizes else "")
    if isinstance(log, int) and log == 0:
        return f"{mode}: nothing to copy, the WAL held no page"
    if isinstance(log, int) and isinstance(done, int):
        rest = "all of them" if done >= log else f"{log - done:,} wait for readers to move on"
        return f"{mode}: {_pages(done)} of the WAL's {log:,} copied into the database ({rest})"
    return f"{mode}: done"
