"""Doctor's findings from the jobs' own records (``job_runs``): what the jobs worker found and said
in its log, which an operator who only runs ``db doctor`` would otherwise not see.

* the last backup failed: when, why, the newest backup there is (the one a restore would take), and
  what makes one once the cause is mended;
* the last retention run was held back (:mod:`workers.retention_cutoff`): the clock it goes by (this
  host's, on PostgreSQL the server's) asked to delete far past the oldest tick, which a clock set
  forward does, a day of the window a run, until it is set right;
* the last retention run kept ticks older than the window because the analysis has not read them
  (``prune_ticks`` never deletes one it has not folded into bars): with the analysis worker stopped,
  or far behind, nothing old is deleted and the database grows without a bound.

One read engine and one query per job for both; nothing when the database cannot be read now (said
by doctor's other findings).
"""
from __future__ import annotations

import json
from typing import Any

from db.backups import list_backups
from db.circusd import circusctl_command
from db.config import Settings
from db.timestamps import utc

#: The jobs whose last run doctor reads.
READ = ("backup", "retention")


def _latest_runs(settings: Settings) -> dict[str, Any] | None:
    """The last recorded run of each job of :data:`READ` (by start time, then id), None when the
    database cannot be read."""
    from sqlalchemy.exc import SQLAlchemyError

    from db import queries
    from db.engine import make_read_engine

    try:
        engine = make_read_engine(settings, pool_size=1)
        try:
            with engine.connect() as conn:
                return {job: queries.last_job_run(conn, job) for job in READ}
        finally:
            engine.dispose()
    except (SQLAlchemyError, OSError):
        return None


def _when(run: Any) -> str:
    return utc(run.started_at, seconds=True)


def _failed_backup(settings: Settings, run: Any) -> tuple[str, str] | None:
    if run is None or run.ok:
        return None
    try:
        found = list_backups(settings.backup_dir)
    except OSError:  # a folder this user may not list: the restore advice says so where it matters
        found = []
    newest = (f"the newest backup, the one a restore would take, is {found[-1]}" if found
              else f"there is no backup in {settings.backup_dir} to restore")
    return ("warn", f"The last backup failed ({_when(run)}: {' '.join((run.detail or '').split())[:300]}); {newest}. "
                    "Mend the cause, then make one now: `python -m workers.jobs --run backup`.")


def _detail(run: Any) -> dict[str, Any] | None:
    """The detail of a run that went well, when it is a JSON object (as the retention job writes)."""
    try:
        detail = json.loads(run.detail) if run is not None and run.ok and run.detail else None
    except ValueError:
        return None
    return detail if isinstance(detail, dict) else None


def _held_back_retention(settings: Settings, run: Any) -> tuple[str, str] | None:
    detail = _detail(run)
    if detail is None or not isinstance(detail.get("held_back_from"), int) \
            or not isinstance(detail.get("before_ts"), int):
        return None
    # The clock retention goes by (workers.jobs.JobsWorker.now): on PostgreSQL the server's, whichever host leads
    clock = "this host's clock" if settings.database_path is not None else "the database server's clock"
    return ("warn", f"Retention was held back in its last run ({_when(run)}): {clock} asked to delete the "
                    f"ticks before {utc(detail['held_back_from'])}, far past the oldest tick it may delete, so it "
                    f"deleted only those before {utc(detail['before_ts'])}. If {clock} is ahead, set it right: "
                    "each run deletes a day more of the window by it. If it is right (the jobs worker was stopped "
                    "a long time, TICKSTACK_RETENTION_DAYS lowered, or older history replayed), the next runs "
                    "catch up.")


def _kept_for_analysis(settings: Settings, run: Any) -> tuple[str, str] | None:
    detail = _detail(run)
    kept = detail.get("kept_for_analysis") if detail is not None else None
    if type(kept) is not int or kept <= 0 or not isinstance(detail.get("before_ts"), int):
        return None
    status = circusctl_command(settings.circus_endpoint, "status", "analysis")
    return ("warn", f"Retention kept {kept:,} tick(s) older than {utc(detail['before_ts'])} in its last run "
                    f"({_when(run)}): the analysis has not read them, and a tick is deleted only once its bars "
                    f"are built. The analysis worker is behind or not running (`{status}` on the host that "
                    "leads it, which `db health` names); the ticks it has not read are kept until it has, so "
                    "while it is stopped the database grows.")


def job_findings(settings: Settings) -> list[tuple[str, str]]:
    """Doctor's warnings from the last backup and retention runs (see the module docstring)."""
    latest = _latest_runs(settings)
    if latest is None:
        return []
    found = (_failed_backup(settings, latest["backup"]), _held_back_retention(settings, latest["retention"]),
             _kept_for_analysis(settings, latest["retention"]))
    return [finding for finding in found if finding is not None]
