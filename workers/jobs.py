"""Scheduled maintenance: tick retention, online backups, quick_check and WAL checkpoints, and the
samples behind the console's charts.

    python -m workers.jobs                 run forever, each job on its schedule
    python -m workers.jobs --until-idle    run every job that is due once, then exit 0
    python -m workers.jobs --run backup    run one job now (exit 0 ok, 1 failed)

Like every reader, this worker never writes the database itself: deletions, checkpoints and the
record of each run (``job_runs``, via ``record_job_run``) go to the writer as ops, and backups and
checks read through read-only connections. When each job last ran is read back from ``job_runs``
at start, so a restart does not run everything again at once.

On PostgreSQL the backup is ``pg_dump -Fc`` (``backups/tickstack-<stamp>.dump``, 0600, the password
in a private PGPASSFILE), quick_check is amcheck's ``bt_index_check`` (skipped, not failed, where
amcheck is not installed), and there is no WAL to checkpoint (the server checkpoints itself).

The ``metrics`` job samples the writer's counters, the database file sizes and every watcher's CPU
and memory (:mod:`supervision.sampler`) every ``TICKSTACK_SAMPLE_EVERY_S`` seconds (10) into
``samples`` via ``record_samples``; its runs are not recorded in ``job_runs`` (a row every 10 s
would drown the table), and circusd not answering only leaves the watcher series out. One jobs
worker of a home samples (:data:`METRICS_LOCK`); another stands by for it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from db import backups, health
from db.checkpoints import measured_checkpoint, wal_bytes
from db.client import WriterClient
from db.config import JobSchedule, Settings
from db.engine import display_url
from db.errors import MaintenanceFailed, TableLocked, ValidationError, WriterError, named_database_words
from db.leader import Leadership, LeadershipUnusable
from db.models import SKIPPED, job_runs_table
from db.queries import oldest_deletable_tick_ts
from db.server_clock import ServerClock
from db.timestamps import utc
from db.validation import without_nul
from supervision.sampler import Sampler
from workers.base import WRITER_GONE_S, Worker, WriterWatch, main, wait_for_database
from workers.job_turns import HomeLock, Turn
from workers.retention_cutoff import DAY_MS, RetentionCutoff

#: Jobs in the order they run when several are due (retention first: it shrinks what is backed up
#: and checked, and grows the WAL the checkpoint then empties; metrics last, measuring the result).
JOBS = ("retention", "backup", "quick_check", "checkpoint", "metrics")
#: Jobs whose runs are logged but not recorded in job_runs.
UNRECORDED = frozenset({"metrics"})
#: Jobs that work on the shared database: with several hosts on one PostgreSQL database they run on
#: one host at a time, the one whose jobs worker leads (:mod:`db.leader`); ``metrics`` samples this
#: home's processes and runs on every host, in one jobs worker of each home (:data:`METRICS_LOCK`).
LEADER_JOBS = frozenset({"retention", "backup", "quick_check", "checkpoint"})
#: Held by the one jobs worker of a home that runs ``metrics`` (in ``run/``): the samples are this
#: home's processes, and a second jobs worker (``circusctl incr jobs``) stored every series twice.
METRICS_LOCK = "metrics.lock"
#: Ticks deleted per ``prune_ticks`` call: each call is one writer transaction, kept short so
#: producers never wait long behind retention.
PRUNE_BATCH = 5_000
MAX_DETAIL = 4000  # record_job_run's limit on detail
#: Seconds until a scheduled backup that found another being written (db.backups.new_backup) tries again.
BACKUP_RETRY_S = 60
#: Seconds until a scheduled backup that a table another session held locked stopped tries again
#: (db.errors.TableLocked): once that session ends it can be made, and a period (a day) is long to wait.
BACKUP_LOCKED_RETRY_S = 600
#: A last run dated more than this after now is taken as never run (a clock set back kept every job
#: waiting for that time); less is hosts' clocks differing a little, waited out as usual.
CLOCK_SLACK_S = 300
MB = 1024 * 1024

#: What a job meets in operation, each with words that say what and why, so one line tells it: the
#: disk or a path (OSError), another program (its timeout; pg_dump's or the server's words:
#: MaintenanceFailed), a database that cannot be used now (the OperationalErrors of sqlite3 and
#: SQLAlchemy: locked, unreachable, no such file), the writer (WriterError). A traceback there points
#: at nothing to fix. Not the other database errors (bad SQL, a constraint) nor Python's own
#: RuntimeErrors: those are bugs, logged with their traceback.
OPERATIONAL_ERRORS = (OSError, subprocess.SubprocessError, sqlite3.OperationalError, OperationalError, WriterError,
                      MaintenanceFailed)
#: ... but a request the writer finds malformed is this code's bug.
BUG_ERRORS = (ValidationError,)


class Result(NamedTuple):
    """A job's run: whether it did its work, and what it did (recorded in ``job_runs``)."""

    ok: bool
    detail: str
    #: Not ok, yet nothing is broken, in words (why, and what comes next): a checkpoint a reader held
    #: back, which the next check retries. Logged at INFO, WARNING from the second such run in a row,
    #: never as a failure (ERROR).
    held_back: str = ""


#: What a job returns: a :class:`Result` or (ok, detail), or None when it had nothing to do and
#: records no run.
Outcome = Result | tuple[bool, str] | None


class JobsWorker(Worker):
    """Runs each due job, one per :meth:`step`, and records it through the writer.

    A job that raises is recorded as ok=False with the error and the worker carries on, saying it
    in one line when the error is one of operation (:data:`OPERATIONAL_ERRORS`), with a traceback
    when it is a bug; a failed run still counts as a run for the schedule, so a broken job is
    retried at its interval, not in a tight loop. ``only`` runs that one job once (forced) instead
    of the loop: see :meth:`run`."""

    name = "jobs"

    def __init__(self, settings: Settings, until_idle: bool = False, schedule: JobSchedule | None = None,
                 only: str | None = None) -> None:
        super().__init__(settings, until_idle)
        if only is not None and only not in JOBS:
            raise ValueError(f"unknown job {only!r}; jobs are {', '.join(JOBS)}")
        self.schedule = schedule or JobSchedule()
        self.only = only
        self.engine: Engine | None = None
        self.client: WriterClient | None = None
        self._retention_cutoff = RetentionCutoff()
        #: Epoch seconds each job last started (from job_runs at start, then in memory).
        self.last_run: dict[str, float] = {}
        self._ran: set[str] = set()
        self._sampler: Sampler | None = None
        self.leadership = Leadership(settings, self.name)
        self._leading = Turn(self.leadership, taken="jobs: leading: retention, backups and checks of this database "
                              "run here", lost="jobs: lost the leadership (%s); the database's jobs run where it is "
                              "taken again", holder="jobs: standing by for the database's jobs; the leader is %s",
                              unusable="jobs: %s; retention, backups and checks do not run here")
        self.metrics_lock = HomeLock(settings.run_dir / METRICS_LOCK)
        self._sampling = Turn(self.metrics_lock, taken="jobs: sampling the metrics of this home",
                               lost="jobs: %s; metrics are sampled where it is taken again",
                               holder="jobs: metrics are sampled by %s", unusable="jobs: %s; metrics are not sampled")
        #: On PostgreSQL, the schedule's clock: the server's (:meth:`now`).
        self._server_clock = ServerClock(lambda: time.time())  # looked up at each call, as due()'s is
        #: On a server, whether this host's writer answers: the database's jobs record their runs and
        #: delete through it, so a leader whose writer is gone gives the lead up (:meth:`leads`).
        self._writer_watch: WriterWatch | None = None
        #: Runs held back in a row, by job (:attr:`Result.held_back`).
        self._held_back: dict[str, int] = {}
        self._jobs: dict[str, Callable[[bool], Outcome]] = {
            "retention": self.retention, "backup": self.backup, "quick_check": self.quick_check,
            "checkpoint": self.checkpoint, "metrics": self.metrics}

    def setup(self) -> None:
        self.engine = wait_for_database(self.settings, alive=lambda: self.alive)
        self.client = WriterClient(settings=self.settings)
        if self.leadership.shared and not self.until_idle:
            self._writer_watch = WriterWatch(self.settings, self.leadership.check_every)
        self._read_last_runs()

    def _taken_over(self) -> None:
        """Just leading: when did the last leader run each job (:meth:`_read_last_runs`)."""
        try:
            self._read_last_runs()
        except Exception as e:  # the database does not answer: the jobs go by what this process knows
            # The database's words only: SQLAlchemy's text adds the statement and its parameters over lines.
            self.log.warning("jobs: could not read the last runs of the jobs (%s); going by this process's own",
                             named_database_words(e))

    def _read_last_runs(self) -> None:
        """When each job last started, from ``job_runs``: at start, and on taking over the leadership
        (the last leader may have run a job a moment ago; running it again would double a backup)."""
        assert self.engine is not None
        ahead = int((self.now() + CLOCK_SLACK_S) * 1000)  # runs dated after it are not waited for (due())
        with self.engine.connect() as conn:
            run = job_runs_table.c
            rows = conn.execute(select(run.job, func.max(run.started_at))
                                .where(run.job.in_(JOBS), run.started_at <= ahead).group_by(run.job)).all()
        for job, started in rows:  # never back: a run (or a retry time) this process knows may be later
            self.last_run[job] = max(self.last_run.get(job, 0.0), started / 1000)

    def now(self, conn: Connection | None = None) -> float:
        """Now (epoch s) by the clock of ``job_runs``: on PostgreSQL the server's
        (:class:`db.server_clock.ServerClock`; not answering: as last read), by which every host's
        leader dates its runs and reads the last one's. A leader whose own clock was ten minutes behind
        took a run of a moment before for one of a clock set back since, and ran it again at once.
        ``conn``: read on it now (retention: as last read, after a step of this host's clock, hours off)."""
        if self.settings.database_path is not None or self.engine is None:
            return time.time()
        if conn is not None:
            self._server_clock.read(conn)
        elif self._server_clock.stale():
            try:
                with self.engine.connect() as conn:
                    self._server_clock.read(conn)
            except OperationalError as e:
                self.log.debug("jobs: could not read the server's clock (%s)", named_database_words(e))
                self._server_clock.read(None)
        return self._server_clock.now_ms() / 1000

    def teardown(self) -> None:
        self.leadership.release()
        self.metrics_lock.release()
        if self._writer_watch is not None:
            self._writer_watch.close()
        if self.client is not None:
            self.client.close()
        if self.engine is not None:
            self.engine.dispose()

    def due(self, now: float | None = None) -> list[str]:
        """Jobs due at ``now`` (epoch s), in run order. A job never run is due; with --until-idle a
        job already run by this process is not due again, so the run ends."""
        now = self.now() if now is None else now
        for job, last in self.last_run.items():
            if last > now + CLOCK_SLACK_S:  # the clock was set back since (or another host's runs ahead)
                self.log.warning("jobs: %s last ran at %s, %.0f s ahead of this clock: taken as never run, so "
                                 "it runs now (a clock set back kept every job waiting for that time)", job,
                                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)), last - now)
                self.last_run[job] = 0.0

        def pending() -> list[str]:
            return [job for job in JOBS
                    if not (self.until_idle and job in self._ran)
                    and (job not in self.last_run or now - self.last_run[job] >= self.schedule.every_s(job))]

        due = pending()
        if any(job in LEADER_JOBS for job in due):
            # Leading now may mean just taken over, with job_runs read again: what is due then.
            due = pending() if self.leads() else [job for job in due if job not in LEADER_JOBS]
        if "metrics" in due and not self.runs_metrics():
            due.remove("metrics")
        return due

    def runs_metrics(self) -> bool:
        """Whether this worker runs ``metrics``: while it holds this home's :data:`METRICS_LOCK`
        (:meth:`_holds`)."""
        return self._holds(self._sampling)

    def leads(self) -> bool:
        """Whether this worker runs the database's jobs (:data:`LEADER_JOBS`): while it holds the jobs
        leadership (:mod:`db.leader`, :meth:`_holds`); on taking it, when each job last ran is read again.
        On a server, only while this host's writer answers, as the analysis and the monitor lead
        (:class:`workers.base.WriterWatch`): a leader whose writer was stopped (``circusctl stop
        writer``, flapping) recorded no run and deleted nothing, for every host, while it kept the lead."""
        watch = self._writer_watch
        if watch is not None and (silent := watch.silent_for()) > 0:
            if self.leadership.held and silent >= WRITER_GONE_S:
                self.log.error("jobs: %s's writer has not answered for %.0f s (%s): the database's jobs record "
                               "their runs and delete through it, so none is done; giving the leadership up so "
                               "that a host whose writer answers takes over", self.settings.host, silent,
                               watch.silence)
                self.leadership.release()
            if not self.leadership.held:  # taken only while this host's writer answers
                return False
        was_leading = self.leadership.held
        leads = self._holds(self._leading)
        if leads and not was_leading:
            self._taken_over()
        return leads

    def _holds(self, turn: Turn) -> bool:
        """Whether this worker holds ``turn``'s lock: proven still held while it does, else tried at most
        every ``standby_poll`` seconds. Logged when it changes: taken, lost (then tried again at the next
        call), who holds it instead, or why it cannot be used (said once each)."""
        lock = turn.lock
        if lock.held:
            if lock.still_held():
                return True
            self.log.error(turn.lost, lock.lost)
            return False
        now = time.monotonic()
        if now - turn.tried_at < self.standby_poll:
            return False
        turn.tried_at = now
        try:
            holder = lock.attempt()
        except LeadershipUnusable as e:  # not a wait that ends by itself: an error, said once
            if str(e) != turn.said:
                self.log.error(turn.unusable, e)
                turn.said = str(e)
            return False
        if holder is None:
            self.log.info(turn.taken)
            turn.said = None
            return True
        if holder != turn.said:
            self.log.info(turn.holder, holder)
            turn.said = holder
        return False

    def step(self) -> bool:
        due = self.due()
        if not due:
            return False
        self.run_job(due[0])
        return True

    def run(self) -> int:
        """The scheduling loop, or with ``only`` that job once: 0 if it succeeded, else 1."""
        if self.only is None:
            return super().run()
        self.init_signals()
        self.setup()
        try:
            ok = self.run_job(self.only, force=True)
        finally:
            self.teardown()
        return 0 if ok or ok is None else 1  # None: nothing to do (a checkpoint on a server)

    def run_job(self, job: str, force: bool = False) -> bool | None:
        """Run ``job`` and record it with ``record_job_run``. Returns whether it succeeded (and was
        recorded), or None for a run that did not happen: a checkpoint check that found nothing to do
        (a row every 30 s would drown the table), a scheduled backup while another is written; not
        recorded, nor are :data:`UNRECORDED` jobs, only logged. ``force`` checkpoints even under the
        threshold."""
        started = int(self.now() * 1000)
        self.last_run[job] = started / 1000
        self._ran.add(job)
        try:
            outcome = self._jobs[job](force)
        except Exception as e:  # any failure is the run's result, not the worker's end
            if isinstance(e, OPERATIONAL_ERRORS) and not isinstance(e, BUG_ERRORS):
                # Said in the run's one line below; the traceback only when asked for (--log-level DEBUG).
                self.log.debug("jobs: %s failed", job, exc_info=True)
            else:
                self.log.exception("jobs: %s failed", job)
            outcome = False, f"{type(e).__name__}: {e}"
        if outcome is None:
            self._held_back.pop(job, None)  # a check with nothing to do ends a row of held-back runs
            return None
        ok, detail, held_back = Result(*outcome)
        finished = max(int(self.now() * 1000), started)  # the wall clock may step back
        if job in UNRECORDED:
            # Scheduled, every few seconds: DEBUG when it went well, and asked for once (--run), INFO (it said
            # nothing); a failed sample stays a WARNING (a sampling gap, not a failed job: nothing is recorded).
            level = logging.WARNING if not ok else logging.INFO if job == self.only else logging.DEBUG
            self.log.log(level, "jobs: %s %s in %d ms: %s", job, "ok" if ok else "FAILED", finished - started, detail)
            return ok
        assert self.client is not None
        try:
            self.client.call("record_job_run", job=job, started_at=started, finished_at=finished, ok=ok,
                             detail=without_nul(detail)[:MAX_DETAIL])
        except Exception as e:
            self.log.error("jobs: could not record the %s run (ok=%s, %s): %s", job, ok, detail, e)
            return False
        self._say(job, ok, held_back, finished - started, detail)
        return ok

    def _say(self, job: str, ok: bool, held_back: str, ms: int, detail: str) -> None:
        """A recorded run's one line: ok at INFO, a failure at ERROR; a run held back (nothing broken,
        retried by itself) at INFO, and at WARNING from the second in a row (something holds it back
        for long: a reader's long transaction)."""
        if ok or not held_back:
            self._held_back.pop(job, None)
            (self.log.info if ok else self.log.error)("jobs: %s %s in %d ms: %s", job, "ok" if ok else "FAILED",
                                                      ms, detail)
            return
        times = self._held_back[job] = self._held_back.get(job, 0) + 1
        if times == 1:
            self.log.info("jobs: %s held back in %d ms (%s): %s", job, ms, held_back, detail)
        else:
            self.log.warning("jobs: %s held back in %d ms, %d runs in a row (%s): %s", job, ms, times, held_back,
                             detail)

    # --- the jobs: each returns (ok, detail) or None, or raises -------------------------

    def _database_path(self) -> Path:
        path = self.settings.database_path
        if path is None:
            raise ValueError(f"this job works on a SQLite database, not {display_url(self.settings.database_url)}")
        return path

    def retention(self, force: bool = False) -> Outcome:
        """Delete ticks older than ``retention_days`` (bars are kept) that the analysis has read, in
        bounded ``prune_ticks`` calls while the writer says there are ``more``; stops early (and says
        so) on SIGTERM. The detail's ``kept_for_analysis``: old ticks kept for the analysis."""
        assert self.client is not None and self.engine is not None
        with self.engine.connect() as conn:
            # By the schedule's clock, read now: a leader's own, hours fast, deleted ticks inside the window
            wanted = max(0, round(self.now(conn) * 1000) - round(self.schedule.retention_days * DAY_MS))
            oldest = oldest_deletable_tick_ts(conn)
        cutoff = self._retention_cutoff.next(wanted, oldest, self.schedule.retention_every_s)
        before = cutoff.before
        deleted = calls = kept = 0
        more = True
        while more and self.alive:
            result = self.client.call("prune_ticks", before_ts=before, limit=PRUNE_BATCH)
            deleted += result["deleted"]
            kept = result.get("kept_for_analysis", 0)  # the last call's
            calls += 1
            more = bool(result["more"]) and result["deleted"] > 0  # never loop on a batch that did nothing
        self._retention_cutoff.ran(cutoff)  # not before: a run the writer failed moves no mark
        # Held back: the clock may be ahead (workers.retention_cutoff). Said only of a run whose cutoff left
        # a tick the clock would have deleted: history replayed from a day long past, all of it within the
        # step, went whole, and the warning (and doctor's) told a new user to check the clock. Ticks older
        # than the cutoff (a stop between batches, the analysis reading on since) are not its doing.
        held_back = cutoff.held_back and self._deletable_between(cutoff.before, cutoff.wanted)
        if held_back:
            self.log.warning("%s", cutoff.words())
        if kept:  # deleted once the analysis has read them, by a later run
            self.log.info("jobs: retention: %d ticks older than %s are kept until the analysis has read them (its "
                          "cursor is behind them: the analysis worker is behind, or not running)", kept, utc(before))
        detail = {"deleted": deleted, "calls": calls, "before_ts": before, "more": more, "kept_for_analysis": kept}
        if held_back:
            detail["held_back_from"] = wanted
        return True, json.dumps(detail)

    def _deletable_between(self, since: int, before: int) -> bool:
        """Whether a tick retention may delete is dated from ``since`` to before ``before`` (epoch ms)."""
        assert self.engine is not None
        with self.engine.connect() as conn:
            oldest = oldest_deletable_tick_ts(conn, since)
        return oldest is not None and oldest < before

    def backup(self, force: bool = False) -> Outcome:
        """Online backup to ``backups/tickstack-<UTC stamp>.db`` (integrity-checked by
        :func:`db.backups.backup`), or on PostgreSQL ``.dump`` (``pg_dump -Fc``, listed by
        ``pg_restore --list``), then keep the newest ``backup_keep`` (the console's button rotates
        the same way: both are :func:`db.backups.new_backup`). While another process writes
        one (:func:`db.backups.new_backup`): on schedule, no run, tried again :data:`BACKUP_RETRY_S`
        later; asked for (``--run backup``), a failed run saying why. Stopped by a table another
        session held locked (PostgreSQL): a failed run, and on schedule tried again
        :data:`BACKUP_LOCKED_RETRY_S` later."""
        try:
            result = backups.new_backup(self.settings, keep=self.schedule.backup_keep)
        except TableLocked as e:
            if force:
                raise
            self._backup_again_in(BACKUP_LOCKED_RETRY_S)
            return False, f"{e}; tried again in {BACKUP_LOCKED_RETRY_S} s"
        if result is None:  # another process writes one now (the console's button, another jobs worker)
            if force:
                return False, "another backup is being written now (run/backup.lock is held); try again when it is done"
            # Not a run (nothing recorded), and due again soon, not a whole period later: the other
            # backup may yet fail.
            self._backup_again_in(BACKUP_RETRY_S)
            self.log.info("jobs: backup: another backup is being written now; trying again in %d s", BACKUP_RETRY_S)
            return None
        if "rotation_error" in result:  # written all the same: older ones pile up until it clears
            self.log.warning("jobs: backup written, but older backups could not be removed: %s",
                             result["rotation_error"])
        return True, json.dumps({k: result[k] for k in ("path", "bytes", "ms", "entries", "removed", "rotation_error")
                                 if k in result})

    def _backup_again_in(self, seconds: float) -> None:
        """A scheduled backup due again in ``seconds``, not a whole period later."""
        self.last_run["backup"] = self.now() - self.schedule.every_s("backup") + seconds

    def quick_check(self, force: bool = False) -> Outcome:
        """:func:`db.health.integrity`: ``PRAGMA quick_check`` on a read-only connection, or on
        PostgreSQL amcheck's ``bt_index_check`` on every index; any problem fails the run. Without
        amcheck the run is ok and its detail starts "skipped: amcheck not installed"."""
        check = health.integrity(self.settings)
        if "skipped" in check:
            return True, f"{SKIPPED}{check['skipped']}"
        return bool(check["ok"]), json.dumps(check)

    def checkpoint(self, force: bool = False) -> Outcome:
        """When the WAL is over ``checkpoint_wal_mb`` (or ``force``), ask the writer for a TRUNCATE
        checkpoint. Not ok when a reader held it back (SQLite's ``busy`` = 1, the writer having waited
        its busy timeout for the readers): the WAL is then still large, and the next check retries.
        That is a reader's doing, not a failure: held back (:attr:`Result.held_back`)."""
        path = self.settings.database_path
        if path is None:  # a server checkpoints its own WAL; asked for anyway (--run), say so
            if force:
                self.log.info("jobs: checkpoint: nothing to do, the PostgreSQL server checkpoints its own WAL")
            return None
        if not force and wal_bytes(path) <= self.schedule.checkpoint_wal_mb * MB:
            return None
        assert self.client is not None
        result = measured_checkpoint(self.client.call, path)
        detail = json.dumps({**result, "forced": force})
        if result["busy"]:
            return Result(False, detail, "a reader kept part of the WAL in use; the next check retries")
        return Result(True, detail)

    def metrics(self, force: bool = False) -> Outcome:
        """One sample of everything the console charts, stored with ``record_samples`` (not in job_runs).
        Not ok when the writer does not answer: then nothing can be stored, and the next run retries."""
        assert self.client is not None and self.engine is not None
        if self._sampler is None:
            self._sampler = Sampler(self.settings)
            with self.engine.connect() as conn:
                self._sampler.resume(conn)
        try:
            samples, summary = self._sampler.collect(self.client)
            if samples:
                summary.update(self._sampler.store(self.client, samples))
        except WriterError as e:
            return False, f"writer: {e}"
        return True, json.dumps(summary)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", choices=JOBS, metavar="JOB",
                        help=f"run one job now ({', '.join(JOBS)}), record it, exit 0 if it succeeded, else 1")


def make(settings: Settings, args: argparse.Namespace) -> JobsWorker:
    return JobsWorker(settings, until_idle=args.until_idle, schedule=settings.jobs, only=args.run)


def cli(argv: list[str] | None = None) -> int:
    """Entry point; bad flags or schedule variables exit 2 with the reason (see workers.base.main)."""
    return main(JobsWorker, argv, add_arguments, make)


if __name__ == "__main__":
    # Through the importable module, not __main__: base.main() names the program and reads the
    # description from the worker class's module.
    from workers import jobs

    sys.exit(jobs.cli())
