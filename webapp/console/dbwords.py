"""The Database page's results in plain words: job runs, table sizes (checkpoints:
:func:`db.checkpoints.checkpoint_words`).

A job's ``detail`` is JSON (``workers/jobs.py``); a person reads "deleted 1,204 ticks older than
2026-11-01 00:00:00 UTC", not ``{"deleted": 1204, "before_ts": 1761955200000}``.
"""
from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from db import queries
from db.checkpoints import checkpoint_words
from webapp.console.formats import human_bytes, number, timestamp
from webapp.extensions import db

#: Seconds table figures are kept (counting and measuring read the whole database).
TABLES_TTL = 60.0
#: Above this size the page counts rows but does not measure tables on each view (dbstat reads every page).
MEASURE_MAX_BYTES = 2 * 1024**3
_tables_cache: dict[str, Any] = {}


def _plural(n: int, word: str) -> str:
    return f"{number(n)} {word}{'' if n == 1 else 's'}"


def _json(detail: str | None) -> Any:
    if not detail or detail[:1] not in "{[":
        return None
    try:
        return json.loads(detail)
    except ValueError:
        return None


def job_words(job: str, ok: bool, detail: str | None) -> str:
    """What a job run did, in a sentence (the raw detail when it is not one we know)."""
    data = _json(detail)
    if not isinstance(data, dict):
        return detail or ("done" if ok else "failed, without a detail")
    if job == "retention" and "deleted" in data:
        text = f"deleted {_plural(int(data['deleted']), 'tick')}"
        if isinstance(data.get("before_ts"), int):
            text += f" older than {timestamp(data['before_ts'])}"
        if data.get("calls"):
            text += f" in {_plural(int(data['calls']), 'call')}"
        if isinstance(data.get("held_back_from"), int):
            text += (f" (held back from {timestamp(data['held_back_from'])}, too far past the oldest tick: the "
                     "next runs catch up, unless the clock is ahead)")
        if isinstance(data.get("kept_for_analysis"), int) and data["kept_for_analysis"] > 0:
            text += (f"; kept {_plural(data['kept_for_analysis'], 'older tick')} the analysis has not read (it is "
                     "behind, or not running)")
        return text + ("; more remain, the next run goes on" if data.get("more") else "")
    if job == "backup" and "path" in data:
        name = str(data["path"]).rsplit("/", 1)[-1]
        text = f"wrote {name} ({human_bytes(data.get('bytes'))}"
        text += f", {number(data['ms'], 0)} ms)" if isinstance(data.get("ms"), int | float) else ")"
        removed = data.get("removed") or []
        if removed:
            text += f"; removed {_plural(len(removed), 'older backup')} ({', '.join(map(str, removed[:3]))}" + (
                ", …)" if len(removed) > 3 else ")")
        return text
    if job == "quick_check" and "ok" in data:
        took = f" in {number(data['ms'], 0)} ms" if isinstance(data.get("ms"), int | float) else ""
        n = int(data.get("indexes") or 0)
        method = f"amcheck of {number(n)} {'index' if n == 1 else 'indexes'}" if "indexes" in data else "quick_check"
        if data["ok"]:
            return f"integrity ok ({method}{took})"
        messages = [str(m) for m in data.get("messages") or data.get("problems") or []]  # problems: before v3
        return f"integrity problems found{took}: " + "; ".join(messages[:3]) + ("; …" if len(messages) > 3 else "")
    if job == "checkpoint" and ("busy" in data or "checkpointed" in data):
        why = "asked for" if data.get("forced") else "the WAL passed its limit"
        return f"{checkpoint_words({'mode': 'TRUNCATE', **data})} ({why})"
    return ", ".join(f"{k}: {v}" for k, v in data.items())


def job_rows(jobs: list[Any]) -> list[dict[str, Any]]:
    """Job runs as the page's table shows them: job, start and end (ms), duration, ok, skipped, words, raw
    detail."""
    return [{"job": r.job, "started_at": r.started_at, "finished_at": r.finished_at,
             "duration_ms": r.finished_at - r.started_at if r.finished_at and r.started_at else None,
             "ok": r.ok, "skipped": r.skipped, "words": job_words(r.job, r.ok, r.detail), "detail": r.detail}
            for r in jobs]


def table_figures(key: str, db_bytes: int | None) -> dict[str, Any]:
    """Rows and bytes per table (:func:`db.queries.table_stats`), kept :data:`TABLES_TTL` seconds
    in this process for the database ``key`` names: ``tables``, ``at`` (ms), ``measured`` (sizes
    read), ``error``."""
    now = time.time()
    cached = _tables_cache.get(key)
    if cached is not None and now - cached["at"] / 1000 < TABLES_TTL:
        return cached
    measured = db_bytes is None or db_bytes <= MEASURE_MAX_BYTES
    try:
        tables = queries.table_stats(db.session, sizes=measured)
        figures = {"tables": tables, "at": int(now * 1000), "measured": measured, "error": None}
    except SQLAlchemyError as e:
        db.session.rollback()
        return {"tables": [], "at": int(now * 1000), "measured": False, "error": str(getattr(e, "orig", e))}
    _tables_cache[key] = figures
    return figures
