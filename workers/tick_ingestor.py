"""The tick ingestor's work (:class:`TickIngestor`): ticks from a feed into the writer, in batches,
none lost; ``python -m workers.ticks`` (:mod:`workers.ticks`) makes it from its command line.

Batches go out pipelined and stay in memory until acknowledged. A batch the
writer does not take (no answer within the client's deadline, or a retryable
refusal such as ``StorageFull``) is written to the spool
(``$TICKSTACK_HOME/spool``) and replayed when the writer answers again, and at
the next start. When the disk refuses the spool too (full), the batch is held
in memory (bounded: the feed pauses at ``--memory-limit`` ticks), moved to
disk once it takes files again and replayed to the writer meanwhile: a full
disk is a state the ingestor waits out, never a crash. On SIGTERM the
ingestor stops reading its feed, waits for its acknowledgements and spools
what is left.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from db.client import Pipeline, Ticket, WriterClient
from db.config import Settings
from db.errors import WriterError
from db.validation import MAX_TICKS
from workers.base import Worker
from workers.csvfiles import CsvFormatError
from workers.feeds import Speed, pace
from workers.spool import COLUMNS, Spool

#: A stop's flush (SIGTERM, SIGINT: not the end of a replay), writer-facing, at most: circus gives the
#: ticks watcher ``graceful_timeout = 20`` s before SIGKILL (the watchdog's restart 15 s), which would
#: lose the ticks in memory and the summary line; the rest is for the spool's writes and exit on a
#: loaded machine. Requests in flight gave up at the client deadline (15 s) before, and a window
#: blocked on a silent writer as long again, then the last chance took up to 6 s more.
STOP_BUDGET_S = 10.0
#: Of it, the last chance given to batches held in memory (the disk refused them).
LAST_CHANCE_S = 3.0
#: The last chance at the end of a replay (no stop to beat): a ping of 1 s, then 5 s.
LAST_CHANCE_AT_END_S = 6.0


def _columns(ticks: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {c: [t[c] for t in ticks] for c in COLUMNS}


class FeedStopped(Exception):
    """Raised out of a paced feed's wait once the ingestor is asked to stop (:meth:`TickIngestor._wait_for_tick`)."""


#: Where a batch in flight came from: None (read from the feed), a spool file, or a memory key.
Origin = Path | int | None


#: Seconds a standby's send of its spool waits for the writer's answer (:meth:`TickIngestor.standing_by`).
STANDBY_SEND_S = 2.0
#: A feed that begins when the worker starts serving: (ticks, source, start_ts) (:class:`TickIngestor`).
Opening = Callable[[], tuple[Iterator[tuple[int, dict[str, Any]]], str, int]]


class TickIngestor(Worker):
    name = "ticks"
    idle_sleep = 0.05
    #: Seconds between two attempts to replay the spool (and to move memory to disk).
    replay_every = 2.0
    stop_budget = STOP_BUDGET_S
    stop_reserve = LAST_CHANCE_S

    def __init__(self, settings: Settings, ticks: Iterator[tuple[int, dict[str, Any]]], source: str, *,
                 until_idle: bool = False, batch: int = 1000, flush_interval: float = 0.25,
                 window: int = 8, deadline: float = 15.0, seq_per_line: int = 1,
                 memory_limit: int = 200_000, speed: Speed = "max", opening: Opening | None = None,
                 lead: bool = False) -> None:
        """``ticks`` yields (line or counter, tick); seq = line * seq_per_line + position.
        ``memory_limit``: ticks held in memory while the disk refuses the spool, before the feed
        is paused. ``speed``: the ticks are read paced (:func:`workers.feeds.pace`), waiting in a sleep
        that a stop ends. ``opening``: a feed that begins when the worker starts serving, in place of
        ``ticks`` and ``source``, paced in real time from the start it gives (a simulated market: its
        clock starts then, from the last stored prices). ``lead``: serve only while this process leads the
        database's ``ticks`` (:mod:`db.leader`), standing by meanwhile: one simulated market per
        database, whatever the hosts."""
        super().__init__(settings, until_idle)
        self.leader_only = lead
        self.opening = opening
        if not 1 <= batch <= MAX_TICKS:
            raise ValueError(f"--batch {batch}: must be 1..{MAX_TICKS}")
        if memory_limit < batch:
            raise ValueError(f"--memory-limit {memory_limit}: must be at least --batch ({batch})")
        self.ticks = pace(ticks, speed, sleep=self._wait_for_tick)
        self.source = source
        self.batch = batch
        self.flush_interval = flush_interval
        self.window = window
        self.deadline = deadline
        self.seq_per_line = seq_per_line
        self.memory_limit = memory_limit
        self.exhausted = False
        #: The feed was ended by a stop in its pacing's wait (:class:`FeedStopped`), not by its end.
        self.cut_short = False
        self.bad_row: CsvFormatError | None = None
        self.received = self.acked = self.duplicates = self.spooled = self.failed = self.lost = 0
        #: Ticks of spool files this run did not write (an earlier run's) acknowledged, and of those duplicates.
        self.earlier_acked = self.earlier_duplicates = 0
        self._last_line: int | None = None
        self._pos = 0
        self._pending: list[dict[str, Any]] = []
        #: When the oldest of ``_pending`` was read (monotonic).
        self._pending_since = 0.0
        self._in_flight: dict[int, tuple[dict[str, list[Any]], Origin]] = {}
        self._last_spool_try = 0.0
        self._last_report = time.monotonic()
        self._paused = False
        self._last_keep_log = -10.0

    def setup(self) -> None:
        if self.opening is not None:  # after the wait to lead, which may have lasted hours
            ticks, self.source, start_ts = self.opening()
            self.ticks = pace(ticks, 1.0, start_ts=start_ts, sleep=self._wait_for_tick)
        self.spool = Spool(self.settings.spool_dir, self.memory_limit)
        if self.spool.stale_removed:
            self.log.warning("ticks: removed %d half-written spool files of an earlier run (their batches were "
                             "still held by it, and are in the spool or the database)", self.spool.stale_removed)
        self.client = WriterClient(settings=self.settings, deadline=self.deadline)
        self.pipe = Pipeline(self.client, self.window, on_done=self._on_done)
        self.log.info("ticks: source %s, %d spooled batches to replay", self.source, len(self.spool.files()))
        self._replay_spool(force=True)

    def standing_by(self) -> None:
        """A standby (``--lead``) sends what its home's spool holds (batches of a run of it that led, or
        of a replay whose writer was away): that needs no lead, and the spool may otherwise wait for a
        lead that never comes to this host."""
        spooled = lambda: sorted(self.settings.spool_dir.glob("ticks-*.msgpack"))  # noqa: E731
        before = spooled()
        while before and self.alive:  # a window of files each round, while the writer takes them
            # A short deadline: a writer away (or refusing) must not hold a stop or a takeover.
            sender = TickIngestor(self.settings, iter(()), "spool", until_idle=True, deadline=STANDBY_SEND_S)
            sender.setup()
            try:
                while self.alive and sender.alive:
                    sender.step()
            finally:
                sender.teardown()
            after = spooled()
            if after == before:  # none went: the next start, or the lead, sends them
                return
            before = after

    def step(self) -> bool:
        started = time.monotonic()
        self._pause_feed(self.spool.memory_full)
        while not self.exhausted and not self._paused and len(self._pending) < self.batch and self.alive:
            try:
                line, tick = next(self.ticks)
            except StopIteration:
                self.exhausted = True
                break
            except FeedStopped:  # a stop, in the pacing's wait: the feed ends here, before its end
                self.exhausted = self.cut_short = True
                break
            except CsvFormatError as e:
                self.bad_row = e
                self.exhausted = True
                break
            self._pos = self._pos + 1 if line == self._last_line else 0
            self._last_line = line
            tick["source"] = self.source
            tick["seq"] = line * self.seq_per_line + self._pos
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.append(tick)
            self.received += 1
            if time.monotonic() - started >= self.flush_interval:
                break
        did = self._send_pending()
        self.pipe.collect()
        self._replay_spool()
        self._report()
        if self.exhausted and not did:
            if self.spool.memory or any(origin is None for _, origin in self._in_flight.values()):
                # Finish only once every batch read is acknowledged or safe in a spool file.
                self.pipe.collect(self.idle_sleep)
                return True
            if self.until_idle or self.bad_row is not None:
                self.alive = False  # finished: teardown waits for the acks
                return True
            return False
        if self._paused and not did:
            self.pipe.collect(self.idle_sleep)
            if not self.client.in_flight:
                self.sleep(self.idle_sleep)
        return True

    def _send_pending(self) -> bool:
        """Submit the ticks read and not sent yet as one batch; whether there were any."""
        if not self._pending:
            return False
        self._submit(_columns(self._pending), None)
        self._pending = []
        return True

    def _wait_for_tick(self, seconds: float) -> None:
        """The pacing's sleep, which a stop ends at once, ending the feed there (:class:`FeedStopped`):
        a slow feed's next tick may be due in an hour, and a stop waited for it (circus kills what
        has not stopped after its graceful_timeout). The ticks read are sent first when the wait would
        hold them past ``flush_interval``: a replay at real-time speed held each tick until the next
        one was due, a minute later for minute ticks."""
        if self._pending and time.monotonic() + seconds - self._pending_since >= self.flush_interval:
            self._send_pending()
            self.pipe.collect()
        self.sleep(seconds)
        if not self.alive:
            raise FeedStopped

    def teardown(self) -> None:
        """Flush: submit what was read, wait for every ack (each bounded by the client deadline);
        what the writer did not take goes to the spool. Batches held in memory (the disk was full)
        go to disk if it takes them now, else to the writer once more; what neither takes is lost,
        and the log says which ticks. A stop (not the end of a replay) does all of it within
        :data:`STOP_BUDGET_S` of its signal: what the writer has not answered by then is spooled."""
        stop_by = self.stop_by  # the requests are bounded by then (Worker.handle_stop, Worker.run)
        self._send_pending()
        self.pipe.drain()
        self.spool.flush_memory()
        if self.spool.memory:
            budget = LAST_CHANCE_AT_END_S if stop_by is None else min(LAST_CHANCE_S, stop_by - time.monotonic())
            self._last_chance(budget)
            self.spool.flush_memory()
        for columns in self.spool.memory.values():
            seqs = columns["seq"]
            self.lost += len(seqs)
            self.log.error("ticks: lost %d ticks of source %s, seq %d..%d: the writer did not take them and the "
                           "disk refused them (%s)", len(seqs), columns["source"][0], min(seqs), max(seqs),
                           self.spool.disk_error)
        self.client.close()
        self.log.info("ticks: source %s received %d, acked %d (duplicates %d), spooled %d, rejected %d, lost %d%s",
                      self.source, self.received, self.acked, self.duplicates, self.spooled, self.failed, self.lost,
                      f"; and {self.earlier_acked} ticks an earlier run spooled, acked (duplicates "
                      f"{self.earlier_duplicates})" if self.earlier_acked else "")
        if self.spool.written:  # a replay exits 1 for them: what becomes of them is said
            self.log.log(logging.WARNING if self.until_idle else logging.INFO,
                         "ticks: %d spooled batch(es) of this run are in %s, not stored yet: the `ticks` watcher, "
                         "or any `python -m workers.ticks` on this home, sends them once the writer answers",
                         len(self.spool.written), self.spool.folder)
        if self.bad_row is not None:
            self.log.error("ticks: %s (every row before it is stored)", self.bad_row)

    @property
    def stopped_early(self) -> bool:
        """A run to the end of its feed (a CSV file, ``--count``) stopped before it (a signal): not a
        success, though what it read is stored or spooled. Not the spool's sender (a standby's)."""
        return self.until_idle and self.source != "spool" and (self.cut_short or not self.exhausted)

    def stopped_early_words(self) -> str:
        """What a run stopped before the end of its feed says as it exits 1 (:attr:`stopped_early`)."""
        again = ("a CSV replay run again with the same file sends the rest (what is stored already is dropped "
                 "as duplicates)" if self.source.startswith("csv-") else
                 "a simulated feed run again walks anew: its --count ticks are new ones, not the rest")
        return f"ticks: stopped before the end of its feed, after {self.received} ticks: {again}"

    def _last_chance(self, budget: float) -> None:
        """At stop, batches held in memory go to the writer if it answers now, for at most
        ``budget`` seconds, its ping included (circus waits ``graceful_timeout``, 20 s, for the whole stop)."""
        end = time.monotonic() + budget
        if budget < 0.5:
            return
        try:
            self.client.ping(timeout=min(1.0, budget / 2))
        except WriterError:
            return
        for key, columns in list(self.spool.memory.items()):
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            self.client.deadline = remaining  # of the requests sent from now on
            self._submit(columns, key)
        self.pipe.drain()

    def _submit(self, columns: dict[str, list[Any]], origin: Origin) -> None:
        ticket = self.pipe.submit("insert_ticks", ticks=columns)
        self._in_flight[ticket.seq] = (columns, origin)

    def _on_done(self, ticket: Ticket) -> None:
        columns, origin = self._in_flight.pop(ticket.seq)
        n = len(columns["seq"])
        error = ticket.error
        if error is not None and error.retryable:
            # The writer is away, or cannot store it now (disk full): keep it and send it again later.
            if origin is None:
                self._keep(columns, error)
            return
        earlier = origin is not None and not self.spool.settled(origin)
        if error is None:
            result = ticket.result()
            if earlier:
                self.earlier_acked += n
                self.earlier_duplicates += result["duplicates"]
            else:
                self.acked += n
                self.duplicates += result["duplicates"]
            return
        # The writer refused the batch: retrying cannot help. Keep it for
        # a person to look at instead of dropping it.
        self.failed += n
        name = f"rejected-{time.time_ns()}.msgpack"
        try:
            kept = str(self.spool.write(columns, name))
        except OSError as e:
            kept = f"nowhere: the disk refused {name} ({e}); seq {min(columns['seq'])}..{max(columns['seq'])}"
        self.log.error("ticks: writer rejected %d ticks (%s); kept in %s", n, error, kept)

    def _keep(self, columns: dict[str, list[Any]], error: WriterError) -> None:
        """Spool a batch the writer did not take; say so at most every 10 s (a full disk is a state
        that lasts, not an event per batch)."""
        n = len(columns["seq"])
        path = self.spool.put(columns)
        if path is not None:
            self.spooled += n
        now = time.monotonic()
        if now - self._last_keep_log < 10:
            return
        self._last_keep_log = now
        why = f"{type(error).__name__}: {error}"
        if path is not None:
            self.log.warning("ticks: writer did not take %d ticks (%s); spooled to %s", n, why, path.name)
        else:
            self.log.warning("ticks: writer did not take %d ticks (%s) and the disk refused the spool (%s); "
                             "holding %d ticks in memory until one of them takes them", n, why,
                             self.spool.disk_error, self.spool.memory_ticks)

    def _pause_feed(self, pause: bool) -> None:
        """Stop reading the feed while memory holds its limit (back-pressure: nothing is dropped)."""
        if pause != self._paused:
            self._paused = pause
            if pause:
                self.log.warning("ticks: %d ticks held in memory (the limit): feed paused until the writer or the "
                                 "disk takes them", self.spool.memory_ticks)
            else:
                self.log.info("ticks: feed resumed")

    def _replay_spool(self, force: bool = False) -> None:
        """Every ``replay_every`` seconds: move batches held in memory to disk, then resubmit spooled
        batches (disk files, then what is still in memory) into the free places of the window."""
        now = time.monotonic()
        if not force and now - self._last_spool_try < self.replay_every:
            return
        self._last_spool_try = now
        busy = {origin for _, origin in self._in_flight.values() if origin is not None}
        if self.spool.memory:
            moved = self.spool.flush_memory(skip=busy)
            if moved:
                self.spooled += moved
                self.log.info("ticks: the disk takes the spool again: moved %d ticks from memory to it", moved)
        free = self.window - self.pipe.outstanding
        for path in self.spool.files():
            if free <= 0:
                return
            if path in busy:
                continue
            try:
                columns = Spool.load(path)
            except FileNotFoundError:  # another ingestor replayed it meanwhile
                continue
            except (OSError, ValueError) as e:  # msgpack's errors are ValueErrors
                self._set_aside(path, e)
                continue
            self._submit(columns, path)
            free -= 1
        for key, columns in list(self.spool.memory.items()):
            if free <= 0:
                return
            if key not in busy:
                self._submit(columns, key)
                free -= 1

    def _set_aside(self, path: Path, error: Exception) -> None:
        """A spool file that cannot be read is renamed out of the replay, for a person to look at."""
        bad = path.with_name(f"unreadable-{path.name}")
        try:
            path.rename(bad)
        except OSError as e:
            self.log.error("ticks: spool file %s cannot be read (%s) nor set aside (%s)", path.name, error, e)
            return
        self.log.error("ticks: spool file %s cannot be read (%s); set aside as %s", path.name, error, bad.name)

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._last_report >= 10:
            self._last_report = now
            self.log.info("ticks: received %d, acked %d, in flight %d, spool %d files, %d ticks in memory",
                          self.received, self.acked, self.pipe.outstanding, len(self.spool.files()),
                          self.spool.memory_ticks)
