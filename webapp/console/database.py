"""Database: in the spirit of PgHero, everything a person asks when the database feels slow.

Journal mode, file sizes (and their last hour), free space of the database's disk (warned about
below ``TICKSTACK_DISK_WARN_PCT``), the writer's queue, commit latency, batch size, throughput,
failures and lock errors (which must read 0), the last checkpoint, backup and
quick_check, recent job runs, the slowest reads of the API and the console (:mod:`db.slowreads`)
and the processes holding the file open, with any unknown or rogue one
flagged (:func:`db.health.snapshot` and :func:`db.health.diagnose`). Buttons: checkpoint (the
writer's op), backup (:func:`db.backups.new_backup` into ``backups/``, named and rotated to
``TICKSTACK_BACKUP_KEEP`` as the jobs worker's) and quick_check (a read-only PRAGMA, or amcheck on PostgreSQL:
:func:`db.health.integrity`); each is audited.

A backup or quick_check runs inside the request: seconds on a database of a few GB. One backup at a
time, the console's or the jobs worker's: one asked for while another is written is refused with a
message (:data:`db.backups.BACKUP_LOCK`, a lock file in ``run/``).
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from flask import flash, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from db import backups, health, queries, slowreads
from db.checkpoints import checkpoint_words, measured_checkpoint
from db.engine import display_url
from db.errors import WriterError
from db.leader import NOBODY
from db.models import audit_log_table, now_ms
from db.sizes import human_bytes
from supervision.circus import CircusError
from webapp.console.charts import SERIES_LABELS, charts_for, sample_every, summaries
from webapp.console.common import audit, bad_request, bp, call_writer, circus, log, settings, writer
from webapp.console.dbwords import job_rows, job_words, table_figures
from webapp.extensions import db

#: Seconds the console's quick_check on PostgreSQL may take to connect and per index (a request).
QUICK_CHECK_TIMEOUT = 30.0
#: Rows of the "Slowest reads" table.
SLOW_ROWS = 20


def milliseconds(ms: float) -> str:
    """A duration of a statement: ``0.042 ms``, ``3.1 ms``, ``1,204 ms``."""
    if ms < 1:
        return f"{ms:.3f} ms"
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:,.0f} ms"


def slow_reads(by: str, kind: str | None) -> dict[str, Any]:
    """The page's "Slowest reads": :data:`SLOW_ROWS` statements by ``max`` or ``total`` ms, merged
    per process kind over every live process's record (:mod:`db.slowreads`), of one kind of
    process (``api``, ``console``...) when ``kind`` names one that has a record."""
    if by not in ("max", "total"):
        bad_request(f"slow: {by[:20]!r} is not an order of the slowest reads; max or total")
    if kind is not None and not (kind.isprintable() and len(kind) <= 255):  # a program's name, any script
        bad_request(f"reads_of: {kind[:20]!r} is not a kind of process (api, console, ...)")
    records = slowreads.read_all(settings().run_dir)
    kinds = sorted({str(r.get("kind")) for r in records})
    kind = kind if kind in kinds else None
    rows = slowreads.slowest(records, by=by, limit=SLOW_ROWS, kind=kind)
    return {"rows": rows, "by": by, "kind": kind, "kinds": kinds, "limit": SLOW_ROWS, "ms": milliseconds,
            "keep": slowreads.KEEP, "every": slowreads.FLUSH_EVERY_S}


def known_pids() -> set[int]:
    """Every process circus runs for the stack (and their children): readers we know."""
    return set(pid_watchers())


def pid_watchers() -> dict[int, str]:
    """pid -> the watcher it belongs to, for every process circus runs (a child, such as a
    gunicorn worker, as "api (worker of 123)"): the page names the holders of the file by it, so
    the api's and the console's gunicorn processes can be told apart."""
    try:
        infos = circus().call("stats").get("infos") or {}
    except CircusError:
        return {}
    out: dict[int, str] = {}
    for watcher, procs in infos.items():
        for info in (procs or {}).values():
            if isinstance(info, dict) and "pid" in info:
                out[int(info["pid"])] = str(watcher)
                for c in info.get("children") or []:
                    if isinstance(c, dict) and "pid" in c:
                        out[int(c["pid"])] = f"{watcher} (worker of {info['pid']})"
    return out


def last_backup() -> dict[str, Any] | None:
    """The newest backup (:func:`db.backups.list_backups`: named by its UTC time), and how many there are."""
    found = backups.list_backups(settings().backup_dir)
    if not found:
        return None
    path = found[-1]
    stat = path.stat()
    return {"name": path.name, "bytes": stat.st_size, "mtime_ms": int(stat.st_mtime * 1000), "count": len(found)}


def _latest_rate(name: str) -> tuple[float | None, int | None]:
    """(value, time in ms) of the latest sample of rate ``name`` of the last two minutes (older is
    no rate of now); (None, None) without one."""
    row = queries.latest_sample(db.session, name, now_ms() - 120_000)
    return (float(row.value), int(row.ts)) if row is not None else (None, None)


def recent_history() -> dict[str, Any]:
    """Job runs, the last quick_check (the jobs worker's or the console's), the jobs worker's last
    checkpoint (the writer only knows its own since it started) and the sampled rates."""
    out: dict[str, Any] = {"jobs": [], "quick_check": None, "checkpoint_job": None, "ops_per_s": None,
                           "ticks_per_s": None, "rates_at": None, "error": None}
    try:
        out["jobs"] = queries.job_runs(db.session, 15)
        job = queries.last_recorded_job_run(db.session, "quick_check")
        audit = audit_log_table.c
        mine = db.session.execute(select(audit_log_table).where(audit.action == "db.quick_check")
                                  .order_by(audit.id.desc()).limit(1)).first()
        candidates = []
        # A check that could not be made (amcheck not installed) is "skipped", neither ok nor failed.
        if job is not None:
            candidates.append({"ts": job.finished_at, "ok": job.ok, "by": "jobs worker", "detail": job.detail,
                               "skipped": job.skipped})
        if mine is not None:  # "skipped" in its detail: a record written as "ok" before skipped was a result
            skipped = mine.result == "skipped" or (mine.result == "ok" and '"skipped"' in (mine.detail or ""))
            candidates.append({"ts": mine.ts, "ok": mine.result in ("ok", "skipped"), "by": mine.actor,
                               "detail": mine.detail, "skipped": skipped})
        out["quick_check"] = max(candidates, key=lambda c: c["ts"]) if candidates else None
        out["checkpoint_job"] = queries.last_recorded_job_run(db.session, "checkpoint")
        # With their time: the page shows how old they are when the writer does not answer (they
        # are its last figures then, not current ones).
        out["ops_per_s"], out["rates_at"] = _latest_rate("writer.requests_per_s")
        out["ticks_per_s"], _ = _latest_rate("writer.ticks_per_s")
    except SQLAlchemyError as e:
        db.session.rollback()
        out["error"] = str(getattr(e, "orig", e))
    return out


@bp.get("/database")
def database() -> ResponseReturnValue:
    s = settings()
    owners = pid_watchers()
    snap = health.snapshot(s, writer_timeout=1.0, known_pids=set(owners))
    findings = health.diagnose(snap, s)
    chart = next(c for c in charts_for(s.database_path is None) if c.id == "dbsize")
    history = recent_history()
    files = health.file_sizes(s.database_path) if s.database_path is not None else {}
    cj = history["checkpoint_job"]
    return render_template("console/database.html", snap=snap, findings=findings, history=history, owners=owners,
                           nobody=NOBODY,
                           jobs=job_rows(history["jobs"]), checkpoint_words=checkpoint_words(snap["last_checkpoint"]),
                           checkpoint_job_words=job_words("checkpoint", cj.ok, cj.detail) if cj is not None else None,
                           tables=table_figures(s.database_url, files.get("db")),
                           backup=last_backup(), stats=snap["writer"].get("stats") or {}, chart=chart,
                           watcher_names={o.split(" ", 1)[0] for o in owners.values()},
                           summary=summaries((chart,), now_ms() - 3_600_000), series_labels=SERIES_LABELS,
                           sample_every=sample_every(), slow=slow_reads(request.args.get("slow", "max"),
                                                                          request.args.get("reads_of")))


@bp.get("/api/database")
def api_database() -> ResponseReturnValue:
    """The live figures of the page (the writer's counters and the file sizes), for its poll."""
    s = settings()
    out: dict[str, Any] = {"ts": now_ms(), "writer": None, "error": None, "files": None}
    try:
        out["writer"] = writer().stats(timeout=1.0)
    except WriterError as e:
        out["error"] = str(e)
    if s.database_path is not None:
        out["files"] = health.file_sizes(s.database_path)
    out["disk"] = health.disk_space(s)
    return jsonify(out)


# --- actions ----------------------------------------------------------------------------------------


def _done(kind: str, message: str) -> ResponseReturnValue:
    flash(message, kind)
    return redirect(url_for("console.database"), 303)


@bp.post("/database/checkpoint")
def checkpoint() -> ResponseReturnValue:
    """A TRUNCATE checkpoint by the writer (between two batches). Not on a server, which
    checkpoints its own WAL (the page shows no button there)."""
    path = settings().database_path
    if path is None:
        return _done("warn", "A PostgreSQL server checkpoints its own WAL: there is nothing to do here.")
    try:
        detail = measured_checkpoint(call_writer, path)
    except WriterError as e:
        audit("db.checkpoint", "TRUNCATE", "error", str(e))
        return _done("error", f"Checkpoint failed: {e}")
    ok = detail.get("busy") == 0
    audit("db.checkpoint", "TRUNCATE", "ok" if ok else "error", json.dumps(detail))
    if not ok:
        return _done("warn", f"Checkpoint partial: {checkpoint_words(detail)}; the jobs worker retries it.")
    return _done("ok", f"Checkpoint done: {checkpoint_words(detail)}.")


@bp.post("/database/backup")
def backup() -> ResponseReturnValue:
    """An online, checked copy into backups/tickstack-<UTC stamp>.db (.dump on PostgreSQL), then the
    backups rotated as the jobs worker's are (:func:`db.backups.new_backup`): the flash and the audit
    record name the ones removed."""
    s = settings()
    try:
        result = backups.new_backup(s)
    except (OSError, ValueError, RuntimeError, sqlite3.Error) as e:
        log.warning("console: backup failed: %s", e)
        audit("db.backup", str(s.backup_dir), "error", f"{type(e).__name__}: {e}")
        return _done("error", f"Backup failed: {e}")
    if result is None:  # neither done nor failed: skipped, and said so in the audit log too
        audit("db.backup", str(s.backup_dir), "skipped",
              f"another backup was being written (run/{backups.BACKUP_LOCK} held)")
        return _done("warn", "A backup is already running; wait for it to finish.")
    audit("db.backup", Path(result["path"]).name, "ok", json.dumps(result))  # with the names it removed
    removed = result["removed"]
    kept = (f" Removed {len(removed)} older backup{'s' if len(removed) != 1 else ''} (keeping the newest "
            f"{s.backup_keep}, TICKSTACK_BACKUP_KEEP): {', '.join(removed[:5])}{', …' if len(removed) > 5 else ''}."
            if removed else "")
    written = f"Backup written: {result['path']} ({human_bytes(result['bytes'])}, {result['ms']:.0f} ms).{kept}"
    if "rotation_error" in result:
        return _done("warn", f"{written} Older backups could not be removed: {result['rotation_error']}.")
    return _done("ok", written)


@bp.post("/database/quick_check")
def quick_check() -> ResponseReturnValue:
    """The jobs worker's integrity check, now (:func:`db.health.integrity`): ``PRAGMA quick_check``
    on a read-only connection, or amcheck on PostgreSQL."""
    s = settings()
    target = s.database_path.name if s.database_path is not None else display_url(s.database_url)
    try:
        check = health.integrity(s, timeout=QUICK_CHECK_TIMEOUT, create=False)  # a web request: bounded, no DDL
    except (sqlite3.Error, OSError, RuntimeError) as e:
        audit("db.quick_check", target, "error", str(e))
        return _done("error", f"quick_check failed: {e}")
    if "skipped" in check:  # neither ok nor failed, in the audit log too
        audit("db.quick_check", target, "skipped", json.dumps(check))
        return _done("warn", f"quick_check skipped: {check['skipped']}")
    audit("db.quick_check", target, "ok" if check["ok"] else "error", json.dumps(check))
    what = f"{check['method']}" + (f" of {check['indexes']} indexes" if "indexes" in check else "")
    if check["ok"]:
        return _done("ok", f"{what}: ok ({check['ms']:.0f} ms).")
    return _done("error", f"{what} found problems: {'; '.join(check['messages'][:3])}")
