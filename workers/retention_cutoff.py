"""How far one retention run may delete: the wall clock's cutoff, held back when that clock may be wrong.

Retention deletes the ticks older than ``TICKSTACK_RETENTION_DAYS`` by the wall clock (on PostgreSQL
the server's: ``JobsWorker.now``; those the analysis has read), and one run with the clock set 40
days forward deleted every tick of the window (fault hunt). So a run's cutoff moves at most a step
(a day, or twice the time between runs when that is longer, so the runs keep up) past the later of:

* the oldest tick it may delete, by time whatever its id (:func:`db.queries.oldest_deletable_tick_ts`);
* where this worker's last run put it, moved on by the monotonic clock since (which no setting of the
  wall clock moves). While the worker runs, history older than the window replayed into the database
  goes at its next run, as the README says; a worker just started (or ``--run retention``) has no such
  mark and deletes it a day a run, as after a downtime or a lowered retention. A run with no tick it
  may delete leaves no mark: its cutoff is the wall clock's, unguarded, which must not carry over.
  Nor does a run that failed (:meth:`RetentionCutoff.ran` is told only of one that did its deletes):
  with the writer down, each failed run moved the mark a step on, and the first run after let the
  clock's cutoff that many steps past the oldest tick.

A clock set forward costs a day a run, said in a WARNING, until it is set right; a run held back that
left no tick the clock would have deleted (all of it within the step) says nothing.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from db.timestamps import utc

DAY_MS = 86_400_000
#: The least a run may move its cutoff past the oldest tick it may delete or its last cutoff (ms).
RETENTION_STEP_MS = DAY_MS


@dataclass(frozen=True)
class Cutoff:
    """One run's cutoff (``before``, epoch ms), the wall clock's (``wanted``), and why they differ."""

    before: int
    wanted: int
    oldest: int | None
    step: int
    #: The monotonic clock when it was made; None: a cutoff that leaves no mark (nothing to go by).
    at: float | None = None

    @property
    def held_back(self) -> bool:
        return self.before < self.wanted

    def words(self) -> str:
        """The WARNING of a run held back: what the clock asked, how far the data allows, what to do."""
        past = "" if self.oldest is None else f", {(self.wanted - self.oldest) / DAY_MS:.1f} days past the oldest " \
            f"tick it may delete ({utc(self.oldest)})"
        return (f"jobs: retention: the clock says to delete ticks before {utc(self.wanted)}{past}; this run deleted "
                f"only those before {utc(self.before)}. If the clock is right (the jobs worker was stopped, "
                "TICKSTACK_RETENTION_DAYS lowered, or older history replayed while it was stopped), the next runs "
                f"catch up, {self.step / DAY_MS:.1f} days a run; if it is ahead, set it right: by it, ticks still "
                "in the window would be deleted")


class RetentionCutoff:
    """The cutoffs of one jobs worker's retention runs (see the module docstring)."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        #: This worker's last cutoff (epoch ms) and the monotonic clock then; None before its first run.
        self._mark: tuple[int, float] | None = None

    def next(self, wanted: int, oldest: int | None, every_s: float) -> Cutoff:
        """The cutoff of a run now: ``wanted`` (now less the retention, by the wall clock), held back
        to a step past the later of ``oldest`` (the oldest deletable tick's time, None: none) and the
        last cutoff of a run that did its deletes (:meth:`ran`), moved on by the time since;
        ``every_s``: the seconds between runs."""
        step = max(RETENTION_STEP_MS, round(2 * every_s * 1000))
        allowed = [oldest + step] if oldest is not None else []
        if self._mark is not None:
            last, at = self._mark
            allowed.append(last + round((self._monotonic() - at) * 1000) + step)
        if not allowed:  # nothing to go by (no tick it may delete): the clock's word, but no mark of it,
            # or a clock set forward now would let the next run, the window's ticks there by then,
            # delete every one of them at once
            return Cutoff(wanted, wanted, oldest, step)
        return Cutoff(min(wanted, max(allowed)), wanted, oldest, step, self._monotonic())

    def ran(self, cutoff: Cutoff) -> None:
        """The run of ``cutoff`` did its deletes: the next run goes on from it (see the module docstring)."""
        if cutoff.at is not None:
            self._mark = (cutoff.before, cutoff.at)
