"""The trade monitor: applies each open trade's exit rules to the ticks after it (``python -m workers.monitor``).

Per tick, on the exit-side price (bid for a buy, ask for a sell), in this order:

1. exits, against the stop and target in force when the tick arrives: stop hit (buy: price <= stop;
   sell: price >= stop) closes at the tick's price with reason ``stop_loss``, or ``trailing_stop`` /
   ``breakeven_stop`` when that rule set the stop; target hit closes with ``take_profit``;
2. best price (highest bid for a buy, lowest ask for a sell);
3. break-even: once best is ``breakeven_trigger`` in favour of the entry, stop -> entry if that is tighter;
4. trailing: stop -> best -/+ ``trailing_distance`` if that is tighter and a price (the only stop
   update_trade takes). A buy's trail at or below 0 is not in force until the bid passes the distance;
   a sell's at or over the price limit (open_trade refuses one since it could never be stored, but an
   older row may hold one) is not set either, and the worker says so once per trade.

Ticks are read by id; on PostgreSQL only up to :class:`db.tick_horizon.TickHorizon`'s bound, below which
no tick can still commit (several writers commit out of id order), so that no trade passes over one.

The rules are level-based (a function of the best price, not of crossings), so replaying ticks that
were already applied changes nothing: after a restart the monitor may redo ticks since the last stored
``last_tick_id`` and reach the same state. :func:`evaluate` is the pure rule; the worker reads, calls
it, and sends one writer call per changed trade per step (two when an exit follows a stop move in
the same step: see :meth:`MonitorWorker.apply`). A change the writer refuses costs its trade the
step (logged), never the process: the monitor guards every other open trade.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import NamedTuple

from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine

from db.client import WriterClient
from db.config import Settings
from db.errors import Conflict, NotFound, ValidationError, WriterUnavailable
from db.models import ticks_table, trade_events_table, trades_table
from db.tick_horizon import TickHorizon
from db.validation import price as valid_price
from workers.base import Worker, main, wait_for_database

DEFAULT_CHUNK = 5000
#: Store a trade's progress (last_tick_id) at least this often even when nothing else changed, which
#: bounds the replay after a restart.
PROGRESS_EVERY = 60.0
#: A trade whose changes the writer refuses is refused again at each step with new ticks: its error
#: line is repeated at most this often (with the count of refusals in between), not at every step.
REFUSED_LOG_EVERY = 60.0
#: Close reason for a stop hit, by the rule that last set the stop (None: the initial or a manual stop).
STOP_REASONS = {None: "stop_loss", "trailing": "trailing_stop", "breakeven": "breakeven_stop"}


class PriceTick(NamedTuple):
    id: int
    ts: int
    bid: float
    ask: float


@dataclass(frozen=True)
class TradeState:
    """What the rules need of an open trade. ``stop_rule``: the rule that set ``stop_loss``
    ("trailing", "breakeven") or None for the initial or a manual stop."""

    id: int
    symbol: str
    side: str
    entry_price: float
    stop_loss: float | None = None
    take_profit: float | None = None
    trailing_distance: float | None = None
    breakeven_trigger: float | None = None
    best_price: float | None = None
    last_tick_id: int = 0
    stop_rule: str | None = None


@dataclass(frozen=True)
class Exit:
    price: float
    reason: str
    tick_id: int
    ts: int


@dataclass(frozen=True)
class Decision:
    """The trade after the ticks: ``last_tick_id`` is the last tick applied (the exit tick if it
    closed); ``stop_moved_ts`` the ts of the tick that last moved the stop, None if it did not move
    (the writer stamps the event no earlier than the trade's opening: a tick's clock is its feed's);
    ``trail_problem`` why a trail that would have tightened the stop was not set (it is not a price),
    None if none was left out."""

    trade_id: int
    last_tick_id: int
    best_price: float
    stop_loss: float | None
    stop_rule: str | None
    stop_moved_ts: int | None = None
    exit: Exit | None = None
    trail_problem: str | None = None

    @property
    def stop_moved(self) -> bool:
        return self.stop_moved_ts is not None


def _price_problem(value: float) -> str | None:
    """Why update_trade would refuse ``value`` as a stop (:func:`db.validation.price`, the writer's
    own rule, not a copy of it), or None if it takes it."""
    try:
        valid_price("stop_loss", value)
    except ValidationError as e:
        return str(e)
    return None


def evaluate(trade: TradeState, ticks: Iterable[PriceTick]) -> Decision:
    """Apply the exit rules to ``ticks`` (this trade's symbol, in id order); ticks with
    ``id <= trade.last_tick_id`` are skipped, ticks after an exit are ignored. Pure."""
    buy = trade.side == "buy"
    sign = 1.0 if buy else -1.0
    entry, target = trade.entry_price, trade.take_profit
    best = trade.best_price if trade.best_price is not None else entry
    stop, rule, moved_ts, last = trade.stop_loss, trade.stop_rule, None, trade.last_tick_id
    problem = None
    for t in ticks:
        if t.id <= trade.last_tick_id:
            continue
        price = t.bid if buy else t.ask
        last = t.id
        if stop is not None and sign * (price - stop) <= 0:
            return Decision(trade.id, last, best, stop, rule, moved_ts, Exit(price, STOP_REASONS[rule], t.id, t.ts),
                            problem)
        if target is not None and sign * (price - target) >= 0:
            return Decision(trade.id, last, best, stop, rule, moved_ts, Exit(price, "take_profit", t.id, t.ts),
                            problem)
        if sign * (price - best) > 0:
            best = price
        if (trade.breakeven_trigger is not None and sign * (best - entry) >= trade.breakeven_trigger
                and (stop is None or sign * (entry - stop) > 0)):
            stop, rule, moved_ts = entry, "breakeven", t.ts
        if trade.trailing_distance is not None:
            trail = best - sign * trade.trailing_distance
            # A buy's trail at or below 0 is simply not in force yet (until the bid passes the distance).
            if trail > 0 and (stop is None or sign * (trail - stop) > 0):
                # Checked only when it would move the stop, not at every tick: a stop the writer refuses
                # would fail the whole update (best price and progress with it), at every step.
                refused = _price_problem(trail)
                if refused is None:
                    stop, rule, moved_ts = trail, "trailing", t.ts
                else:
                    problem = refused
    return Decision(trade.id, last, best, stop, rule, moved_ts, None, problem)


class MonitorWorker(Worker):
    """Reads open trades and their new ticks; one writer call per changed trade per step."""

    name = "monitor"
    leader_only = True  # once per database, whatever the hosts (db.leader)

    def __init__(self, settings: Settings, until_idle: bool = False, chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__(settings, until_idle)
        self.chunk = chunk
        self.engine: Engine | None = None
        self.client: WriterClient | None = None
        #: Ticks applied to a trade without anything to store (in memory; replayed after a restart).
        self.progress: dict[int, int] = {}
        self._stored: dict[int, int] = {}  # last_tick_id as stored, per open trade
        self._progress_saved_at = time.monotonic()
        #: PostgreSQL: how far ids are final (several writers may commit out of id order).
        self.horizon = TickHorizon()
        #: Open trades whose trail was left out as not a price, already said (once per trade).
        self._trail_said: set[int] = set()
        #: Per open trade the writer refused a change of: when that was last logged, refusals since.
        self._refused: dict[int, tuple[float, int]] = {}

    def setup(self) -> None:
        self.engine = wait_for_database(self.settings, alive=lambda: self.alive)
        self.client = WriterClient(settings=self.settings)

    def leads_through_writer(self) -> bool:
        """Its changes are single calls: with ``TICKSTACK_DIRECT_WRITES`` they go to the database themselves."""
        return not self.settings.direct_writes

    def read(self) -> tuple[list[TradeState], dict[str, list[PriceTick]], int]:
        """Open trades (last_tick_id advanced by in-memory progress), their symbols' ticks after the
        lowest last_tick_id (one chunk, by symbol), and the tick id up to which those are complete."""
        assert self.engine is not None
        with self.engine.connect() as conn:  # one snapshot: trades, events and ticks agree
            # First: on PostgreSQL it ends its transaction, so the reads below see every tick up to it.
            safe = self.horizon.advance(conn)
            trades = _open_trades(conn)
            self._stored = {t.id: t.last_tick_id for t in trades}
            self._trail_said &= self._stored.keys()  # closed trades are forgotten
            self._refused = {k: v for k, v in self._refused.items() if k in self._stored}
            self.progress = {t.id: p for t in trades if (p := self.progress.get(t.id, 0)) > t.last_tick_id}
            trades = [replace(t, last_tick_id=self.progress.get(t.id, t.last_tick_id)) for t in trades]
            if not trades:
                return [], {}, 0
            start = min(t.last_tick_id for t in trades)
            tick = ticks_table.c
            top = conn.execute(select(func.max(tick.id))).scalar() or 0
            if safe is not None:  # PostgreSQL: never past a tick that may still commit
                top = min(top, safe)
            if top <= start:
                return trades, {}, top
            rows = conn.execute(
                select(*ticks_table.c["id", "symbol", "ts", "bid", "ask"])
                .where(tick.id > start, tick.id <= top, tick.symbol.in_({t.symbol for t in trades}))
                .order_by(tick.id).limit(self.chunk)
            ).all()
        by_symbol: dict[str, list[PriceTick]] = {}
        for r in rows:
            by_symbol.setdefault(r.symbol, []).append(PriceTick(r.id, r.ts, r.bid, r.ask))
        # A short chunk holds every tick of these symbols up to top; a full one only up to its last id.
        through = rows[-1].id if len(rows) == self.chunk else top
        return trades, by_symbol, through

    def step(self) -> bool:
        trades, by_symbol, through = self.read()
        pending = [t for t in trades if t.last_tick_id < through]
        try:
            for trade in pending:
                self.apply(trade, evaluate(trade, by_symbol.get(trade.symbol, ())), through)
            self._save_progress()
        except WriterUnavailable as e:
            # Whether or not it committed, the next step re-reads the trade and redoes its ticks.
            self.log.warning("%s: writer unavailable (%s); retrying", self.name, e)
            self.sleep(1.0)
        return bool(pending)

    def apply(self, trade: TradeState, d: Decision, through: int) -> None:
        """Store a decision: update_trade if the stop or best price changed, close_trade if it exited,
        else only remember the progress in memory. Conflict/NotFound (the trade was closed or removed
        meanwhile) are logged, not raised; so is a ValidationError (the writer refused the change):
        the trade is skipped for these ticks and the step goes on with the others.

        An exit whose step also moved the stop or best price takes two calls: the update first, so the
        stop move is on record (trade event) and best_price is final, then the close. The update then
        leaves last_tick_id alone: if the close is lost, the exit tick is simply replayed."""
        assert self.client is not None
        done = max(d.last_tick_id, through)
        if d.trail_problem is not None and trade.id not in self._trail_said:
            # Once per trade: its trail stays out at every step until it becomes a price, if ever.
            self._trail_said.add(trade.id)
            self.log.warning("%s: trade %d: trailing stop not set: the writer takes no such stop (%s); its other "
                             "exits still apply", self.name, trade.id, d.trail_problem)
        try:
            if d.stop_moved or d.best_price != trade.best_price:
                try:
                    self.client.call("update_trade", trade_id=trade.id, best_price=d.best_price,
                                     last_tick_id=None if d.exit else done,
                                     stop_loss=d.stop_loss if d.stop_moved else None, reason=d.stop_rule or "update",
                                     ts=d.stop_moved_ts)
                except ValidationError as e:
                    # Retrying cannot help (a value in this trade's row that no op stores any more, or a
                    # bug here), and raising would end the step, and under circus the process at every
                    # start, for every other trade. What these ticks changed is not stored; an exit they
                    # reached is still sent below, since a close left out here may never come again.
                    self._say_refused(trade.id, "update_trade", e)
                    if d.exit is None:
                        # Not redone at once: step after step it would be refused again, and
                        # --until-idle would never be idle.
                        self.progress[trade.id] = done
                        return
                else:
                    if d.stop_moved:
                        self.log.info("%s: trade %d stop -> %s (%s)", self.name, trade.id, d.stop_loss, d.stop_rule)
                    if d.exit is None:
                        self._stored[trade.id] = done
            if d.exit is not None:
                x = d.exit
                try:
                    r = self.client.call("close_trade", trade_id=trade.id, price=x.price, reason=x.reason, ts=x.ts,
                                         last_tick_id=x.tick_id)
                except ValidationError as e:  # as above; the next ticks may close it
                    self._say_refused(trade.id, "close_trade", e)
                    self.progress[trade.id] = done
                    return
                self.log.info("%s: trade %d closed at %s (%s), pnl %s", self.name, trade.id, x.price, x.reason,
                              r["pnl"])
                self.progress.pop(trade.id, None)
                return
            self.progress[trade.id] = done
        except (Conflict, NotFound) as e:
            self.log.warning("%s: trade %d not updated: %s", self.name, trade.id, e)
            self.progress.pop(trade.id, None)

    def _say_refused(self, trade_id: int, call: str, e: ValidationError) -> None:
        """One error line for a refused change, then at most one per REFUSED_LOG_EVERY for the same
        trade, counting the refusals in between: each is said, none floods the log."""
        now = time.monotonic()
        said_at, since = self._refused.get(trade_id, (None, 0))
        if said_at is not None and now - said_at < REFUSED_LOG_EVERY:
            self._refused[trade_id] = (said_at, since + 1)
            return
        more = f" (and {since} times since the last such line)" if since else ""
        self.log.error("%s: trade %d skipped: the writer refused its %s: %s%s (not stored)", self.name,
                       trade_id, call, e, more)
        self._refused[trade_id] = (now, 0)

    def _save_progress(self, force: bool = False) -> None:
        """Store last_tick_id of trades whose progress is only in memory, at most every PROGRESS_EVERY s."""
        if not force and time.monotonic() - self._progress_saved_at < PROGRESS_EVERY:
            return
        assert self.client is not None
        for trade_id, done in list(self.progress.items()):
            if done > self._stored.get(trade_id, done):
                try:
                    self.client.call("update_trade", trade_id=trade_id, last_tick_id=done)
                    self._stored[trade_id] = done
                except (Conflict, NotFound):
                    self.progress.pop(trade_id, None)
        self._progress_saved_at = time.monotonic()

    def teardown(self) -> None:
        try:
            if self.client is not None:
                self._save_progress(force=True)
        except WriterUnavailable as e:
            self.log.warning("%s: progress not stored at exit (%s); it will be replayed", self.name, e)
        finally:
            if self.client is not None:
                self.client.close()
            if self.engine is not None:
                self.engine.dispose()


def _open_trades(conn: Connection) -> list[TradeState]:
    """Open trades, each with the rule that set its stop: the kind of its latest event that set a stop
    (update_trade records the new stop as the event's price; its reason as the kind)."""
    trade, event = trades_table.c, trade_events_table.c
    latest = (
        select(func.max(event.id))
        .join(trades_table, trade.id == event.trade_id)
        .where(trade.status == "open", event.price.is_not(None), event.kind.not_in(("opened", "closed")))
        .group_by(event.trade_id)
    )
    rules = {tid: kind for tid, kind in conn.execute(select(event.trade_id, event.kind).where(event.id.in_(latest)))}
    rows = conn.execute(select(trades_table).where(trade.status == "open").order_by(trade.id))
    return [
        TradeState(t.id, t.symbol, t.side, t.entry_price, t.stop_loss, t.take_profit, t.trailing_distance,
                   t.breakeven_trigger, t.best_price, t.last_tick_id,
                   rules.get(t.id) if rules.get(t.id) in ("trailing", "breakeven") else None)
        for t in rows
    ]


if __name__ == "__main__":
    sys.exit(main(MonitorWorker, None))
