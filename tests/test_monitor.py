"""The trade monitor: the pure rule (:func:`workers.monitor.evaluate`) for buys and sells, then the
worker end to end against a real writer on a deterministic price path."""
from __future__ import annotations

import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import update

from db import queries
from db.client import WriterClient
from db.config import load_settings
from db.engine import make_read_engine, make_write_engine
from db.errors import ValidationError
from db.models import trades_table
from testkit.env import ROOT
from testkit.postgres import ReadConnection, read_connection
from testkit.writer import Stack
from webapp import create_app
from workers.monitor import Decision, Exit, MonitorWorker, PriceTick, TradeState, evaluate

T0 = 1_704_153_600_000
SPREAD = 0.5


def buy(**kw: object) -> TradeState:
    return TradeState(**{"id": 1, "symbol": "S", "side": "buy", "entry_price": 100.0, "best_price": 100.0, **kw})


def sell(**kw: object) -> TradeState:
    return TradeState(**{"id": 2, "symbol": "S", "side": "sell", "entry_price": 100.0, "best_price": 100.0, **kw})


def bids(*prices: float, first_id: int = 1) -> list[PriceTick]:
    """Ticks quoting these bids (ask = bid + SPREAD): what a buy exits on."""
    return [PriceTick(first_id + i, T0 + i * 1000, p, p + SPREAD) for i, p in enumerate(prices)]


def asks(*prices: float, first_id: int = 1) -> list[PriceTick]:
    """Ticks quoting these asks (bid = ask - SPREAD): what a sell exits on."""
    return [PriceTick(first_id + i, T0 + i * 1000, p - SPREAD, p) for i, p in enumerate(prices)]


# --------------------------------------------------------------------------- the rule, buys


def test_buy_stop_loss_on_the_bid() -> None:
    d = evaluate(buy(stop_loss=95.0, take_profit=110.0), bids(99.0, 95.5, 94.75, 90.0))
    assert d.exit == Exit(94.75, "stop_loss", 3, T0 + 2000)
    assert (d.last_tick_id, d.best_price, d.stop_loss, d.stop_moved) == (3, 100.0, 95.0, False)


def test_buy_take_profit_and_best_price() -> None:
    d = evaluate(buy(stop_loss=95.0, take_profit=110.0), bids(104.0, 109.0, 110.0))
    assert d.exit == Exit(110.0, "take_profit", 3, T0 + 2000) and d.best_price == 109.0
    # The ask reaching the target does not count for a buy.
    d = evaluate(buy(take_profit=110.0), bids(109.75))
    assert d.exit is None and d.best_price == 109.75 and d.last_tick_id == 1


def test_buy_trailing_moves_then_trailing_stop() -> None:
    d = evaluate(buy(stop_loss=90.0, trailing_distance=5.0), bids(101.0, 104.0, 103.0))
    assert (d.stop_loss, d.stop_rule, d.stop_moved_ts, d.best_price, d.exit) == (99.0, "trailing", T0 + 1000,
                                                                                 104.0, None)
    d = evaluate(buy(stop_loss=90.0, trailing_distance=5.0), bids(101.0, 104.0, 103.0, 99.5, 99.0, 98.0))
    assert d.exit == Exit(99.0, "trailing_stop", 5, T0 + 4000)


def test_buy_breakeven_then_breakeven_stop() -> None:
    d = evaluate(buy(stop_loss=95.0, breakeven_trigger=3.0), bids(102.0, 102.75))
    assert (d.stop_loss, d.stop_rule, d.stop_moved) == (95.0, None, False)
    d = evaluate(buy(stop_loss=95.0, breakeven_trigger=3.0), bids(102.0, 103.0, 101.0))
    assert (d.stop_loss, d.stop_rule, d.stop_moved_ts, d.exit) == (100.0, "breakeven", T0 + 1000, None)
    d = evaluate(buy(stop_loss=95.0, breakeven_trigger=3.0), bids(102.0, 103.0, 101.0, 100.0))
    assert d.exit == Exit(100.0, "breakeven_stop", 4, T0 + 3000)


def test_buy_breakeven_then_trailing_takes_over() -> None:
    trade = buy(stop_loss=95.0, breakeven_trigger=2.0, trailing_distance=4.0)
    d = evaluate(trade, bids(102.0))
    assert (d.stop_loss, d.stop_rule) == (100.0, "breakeven")  # trailing's 98 would be looser
    d = evaluate(trade, bids(102.0, 106.5, 103.0, 102.5))
    assert (d.stop_loss, d.stop_rule, d.exit) == (102.5, "trailing", Exit(102.5, "trailing_stop", 4, T0 + 3000))


# --------------------------------------------------------------------------- the rule, sells


def test_sell_stop_loss_on_the_ask() -> None:
    d = evaluate(sell(stop_loss=105.0, take_profit=90.0), asks(101.0, 104.75, 105.0))
    assert d.exit == Exit(105.0, "stop_loss", 3, T0 + 2000) and d.best_price == 100.0
    # A bid above the stop does not stop a sell out while the ask is below it.
    d = evaluate(sell(stop_loss=105.0), [PriceTick(1, T0, 104.0, 104.9)])
    assert d.exit is None


def test_sell_take_profit() -> None:
    d = evaluate(sell(stop_loss=105.0, take_profit=90.0), asks(95.0, 91.0, 89.5))
    assert d.exit == Exit(89.5, "take_profit", 3, T0 + 2000) and d.best_price == 91.0


def test_sell_trailing_moves_then_trailing_stop() -> None:
    trade = sell(stop_loss=110.0, trailing_distance=5.0)
    d = evaluate(trade, asks(99.0, 95.0, 96.0))
    assert (d.stop_loss, d.stop_rule, d.best_price, d.exit) == (100.0, "trailing", 95.0, None)
    d = evaluate(trade, asks(99.0, 95.0, 96.0, 99.75, 100.25))
    assert d.exit == Exit(100.25, "trailing_stop", 5, T0 + 4000)


def test_sell_breakeven_then_breakeven_stop() -> None:
    trade = sell(stop_loss=104.0, breakeven_trigger=2.0)
    d = evaluate(trade, asks(98.5, 98.0, 99.0))
    assert (d.stop_loss, d.stop_rule, d.exit) == (100.0, "breakeven", None)
    d = evaluate(trade, asks(98.5, 98.0, 99.0, 100.0))
    assert d.exit == Exit(100.0, "breakeven_stop", 4, T0 + 3000)


def test_a_trail_that_is_not_a_price_is_not_set() -> None:
    """A sell's trail at or over the price limit is no stop update_trade takes: left out (and why is
    told), until the ask has fallen far enough for it to be one. A buy's trail at or below 0 is only
    not in force yet: nothing to tell."""
    trade = sell(stop_loss=110.0, trailing_distance=1e12 - 50.0)
    d = evaluate(trade, asks(99.5))
    assert (d.stop_loss, d.stop_rule, d.stop_moved, d.best_price) == (110.0, None, False, 99.5)
    d = evaluate(replace(trade, stop_loss=None), asks(99.5))
    assert (d.stop_loss, d.stop_moved) == (None, False)
    assert d.trail_problem == "stop_loss: 1000000000049.5 is not a price (must be > 0 and < 1e+12)"
    d = evaluate(replace(trade, stop_loss=None), asks(99.5, 49.0))
    assert (d.stop_loss, d.stop_rule, d.stop_moved_ts) == (999_999_999_999.0, "trailing", T0 + 1000)
    d = evaluate(buy(trailing_distance=150.0), bids(120.0, 160.0))
    assert (d.stop_loss, d.trail_problem) == (10.0, None)


# --------------------------------------------------------------------------- replay and state


def test_applied_ticks_are_skipped_and_a_replay_changes_nothing() -> None:
    trade = buy(stop_loss=90.0, trailing_distance=5.0, breakeven_trigger=1.0)
    ticks = bids(101.0, 106.0, 104.0)
    d = evaluate(trade, ticks)
    after = TradeState(1, "S", "buy", 100.0, d.stop_loss, None, 5.0, 1.0, d.best_price, d.last_tick_id, d.stop_rule)
    assert evaluate(after, ticks) == Decision(1, 3, 106.0, 101.0, "trailing")  # nothing new: no move
    # A restart replays from an older last_tick_id with the stored state: same result.
    older = TradeState(1, "S", "buy", 100.0, d.stop_loss, None, 5.0, 1.0, d.best_price, 1, d.stop_rule)
    assert evaluate(older, ticks).stop_loss == d.stop_loss and not evaluate(older, ticks).stop_moved
    # The rule that set the stop decides the close reason, even when it was set in an earlier step.
    assert evaluate(after, bids(100.5, first_id=4)).exit == Exit(100.5, "trailing_stop", 4, T0)
    assert evaluate(buy(stop_loss=100.0, stop_rule="breakeven"), bids(99.0)).exit.reason == "breakeven_stop"


def test_no_ticks_no_change() -> None:
    d = evaluate(sell(stop_loss=105.0, last_tick_id=7), [])
    assert d == Decision(2, 7, 100.0, 105.0, None)


# --------------------------------------------------------------------------- end to end


def db(stack: Stack) -> sqlite3.Connection | ReadConnection:
    return read_connection(stack.settings)


class Market:
    def __init__(self, stack: Stack) -> None:
        self.client = WriterClient(settings=stack.settings, deadline=30)
        self.seq = 0
        self.ts = T0

    def quote(self, symbol: str, *bid_prices: float) -> list[int]:
        ticks = []
        for p in bid_prices:
            self.seq += 1
            self.ts += 1000
            ticks.append({"symbol": symbol, "ts": self.ts, "bid": p, "ask": p + SPREAD, "source": "m",
                          "seq": self.seq})
        self.client.call("insert_ticks", ticks=ticks)
        return [t["ts"] for t in ticks]


def run_monitor(stack: Stack) -> str:
    proc = subprocess.run([sys.executable, "-m", "workers.monitor", "--until-idle"], env=stack.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "nothing left to do" in proc.stderr
    return proc.stderr


def test_monitor_trails_and_closes_trades_through_the_writer(writer: Stack) -> None:
    m = Market(writer)
    m.quote("AAA", 99.5)
    m.quote("BBB", 50.0)
    m.quote("ZZZ", 10.0)
    c = m.client
    long_id = c.call("open_trade", symbol="AAA", side="buy", size=2.0, entry_price=100.0, stop_loss=95.0,
                     take_profit=130.0, trailing_distance=5.0, breakeven_trigger=3.0, ts=T0)["id"]
    short_id = c.call("open_trade", symbol="BBB", side="sell", size=10.0, stop_loss=55.0, take_profit=45.0,
                      ts=T0)["id"]  # opens at the bid, 50.0; exits on the ask
    idle_id = c.call("open_trade", symbol="ZZZ", side="buy", size=1.0, ts=T0)["id"]
    m.quote("CCC", 100.0)
    quick_id = c.call("open_trade", symbol="CCC", side="buy", size=1.0, stop_loss=95.0, trailing_distance=2.0,
                      ts=T0)["id"]  # at the ask, 100.5

    be_ts = m.quote("AAA", 101.0, 103.0)[1]  # break-even: stop 95 -> 100
    quick_ts = m.quote("CCC", 103.0, 105.0, 102.5)  # trails to 103 and is stopped out, all in one step
    m.quote("BBB", 48.0)
    run_monitor(writer)
    tr1_ts = m.quote("AAA", 108.0)[0]  # trailing: 103
    run_monitor(writer)
    m.quote("AAA", 109.0)
    tr2_ts = m.quote("AAA", 110.0)[0]  # trailing: 105, one event for the step
    m.quote("BBB", 46.0, 44.0)  # ask 44.5 <= 45: take profit
    run_monitor(writer)
    close_ts = m.quote("AAA", 107.0, 104.5, 120.0)[1]  # 104.5 <= 105: trailing stop; 120 comes too late
    log = run_monitor(writer)
    assert f"trade {long_id} closed at 104.5 (trailing_stop)" in log

    con = db(writer)
    try:
        trades = {r[0]: r[1:] for r in con.execute(
            "SELECT id, status, close_reason, exit_price, pnl, best_price, stop_loss, closed_at FROM trades")}
        events = [r for r in con.execute(
            "SELECT kind, price, ts, pnl FROM trade_events WHERE trade_id = ? ORDER BY id", (long_id,))]
        short_events = [k for (k,) in con.execute(
            "SELECT kind FROM trade_events WHERE trade_id = ? ORDER BY id", (short_id,))]
        quick_events = [r for r in con.execute(
            "SELECT kind, price, ts FROM trade_events WHERE trade_id = ? ORDER BY id", (quick_id,))]
        max_tick = con.execute("SELECT max(id) FROM ticks").fetchone()[0]
        last_ids = dict(con.execute("SELECT id, last_tick_id FROM trades"))
    finally:
        con.close()
    assert trades[long_id] == ("closed", "trailing_stop", 104.5, 9.0, 110.0, 105.0, close_ts)
    assert events == [("opened", 100.0, T0, None), ("breakeven", 100.0, be_ts, None),
                      ("trailing", 103.0, tr1_ts, None), ("trailing", 105.0, tr2_ts, None),
                      ("closed", 104.5, close_ts, 9.0)]
    assert trades[short_id][:5] == ("closed", "take_profit", 44.5, 55.0, 46.5)
    assert short_events == ["opened", "closed"]  # best price moves alone are no events
    # The stop move of the step that also closed the trade is on record before the close.
    assert trades[quick_id][:6] == ("closed", "trailing_stop", 102.5, 2.0, 105.0, 103.0)
    assert quick_events == [("opened", 100.5, T0), ("trailing", 103.0, quick_ts[1]), ("closed", 102.5, quick_ts[2])]
    assert trades[idle_id][0] == "open"
    # The exit tick is the closed trades' last; the open one's progress is stored at exit.
    assert last_ids[long_id] == max_tick - 1 and last_ids[idle_id] == max_tick

    # Nothing new: the monitor finds nothing to do and writes nothing.
    assert "stop ->" not in run_monitor(writer)


def history(stack: Stack, trade_id: int) -> tuple[Any, list[Any]]:
    """The trade and its events as every reader gets them (:func:`db.queries.trade_events`: by time,
    oldest first; the API's and the console's history)."""
    engine = make_read_engine(stack.settings)
    try:
        with engine.connect() as conn:
            return queries.trade(conn, trade_id), queries.trade_events(conn, trade_id)
    finally:
        engine.dispose()


def assert_in_order_from_its_opening(trade: Any, events: list[Any], kinds: list[str]) -> None:
    """The history reads ``kinds`` in the order they were recorded (by id), every event stamped at
    or after the opening, and the trade closed at or after it was opened."""
    assert [e.kind for e in events] == kinds, [(e.kind, e.ts) for e in events]
    assert [e.id for e in events] == sorted(e.id for e in events), [(e.id, e.kind, e.ts) for e in events]
    assert all(e.ts >= trade.opened_at for e in events), (trade.opened_at, [(e.kind, e.ts) for e in events])
    assert trade.closed_at is None or trade.closed_at >= trade.opened_at, (trade.opened_at, trade.closed_at)


def test_a_trail_on_ticks_stamped_before_the_opening_is_recorded_after_it(writer: Stack) -> None:
    """A tick's ts is its feed's clock (here a replay of 2024, as a CSV replay or an exchange feed
    behind the writer's clock gives), a trade's opening the writer's (open_trade without ts). The
    monitor stamped each stop move and the close with the tick's ts: before the opening, so the
    trade's history read trailing, closed, then opened."""
    m = Market(writer)
    m.quote("CCC", 100.0)
    trade_id = m.client.call("open_trade", symbol="CCC", side="buy", size=1.0, stop_loss=95.0,
                             trailing_distance=2.0)["id"]  # at the ask, 100.5, now
    m.quote("CCC", 103.0, 105.0, 102.5)  # trails to 103 and is stopped out, all in one step
    assert f"trade {trade_id} closed at 102.5 (trailing_stop)" in run_monitor(writer)
    trade, events = history(writer, trade_id)
    assert (trade.status, trade.close_reason) == ("closed", "trailing_stop")
    assert_in_order_from_its_opening(trade, events, ["opened", "trailing", "closed"])


def test_a_change_by_the_writer_clock_is_recorded_after_an_opening_given_later(writer: Stack) -> None:
    """open_trade takes the opening's ts from its caller (another host's clock, on PostgreSQL, may
    be ahead of this writer's); a stop moved or a trade closed without a ts was stamped at this
    writer's now, before that opening."""
    m = Market(writer)
    m.quote("AAA", 100.0)
    # Ahead by an hour: the most ahead another host's clock may be is a day (db.validation.FUTURE_SLACK_MS).
    ahead = int(time.time() * 1000) + 3_600_000
    trade_id = m.client.call("open_trade", symbol="AAA", side="buy", size=1.0, stop_loss=95.0, ts=ahead)["id"]
    m.client.call("update_trade", trade_id=trade_id, stop_loss=96.0, reason="manual")
    m.client.call("close_trade", trade_id=trade_id, reason="manual")
    trade, events = history(writer, trade_id)
    assert_in_order_from_its_opening(trade, events, ["opened", "manual", "closed"])


def test_a_stop_move_sent_again_with_a_new_request_records_one_event(writer: Stack) -> None:
    """A monitor stopped while the writer is slow gives up on its last update_trade, which the writer
    may still apply; the monitor circus starts next reads the trade before it is and sends the same
    move again, a new request (not a retry the writer knows): it records no second event. A move of
    the other level alone is recorded with that level alone."""
    m = Market(writer)
    m.quote("AAA", 100.0)
    trade_id = m.client.call("open_trade", symbol="AAA", side="buy", size=1.0, stop_loss=95.0,
                             take_profit=110.0, ts=T0)["id"]
    for _ in range(2):
        m.client.call("update_trade", trade_id=trade_id, stop_loss=96.0, best_price=100.0, reason="trailing")
    m.client.call("update_trade", trade_id=trade_id, stop_loss=96.0, take_profit=112.0, reason="manual")
    trade, events = history(writer, trade_id)
    # An event's price is the stop it set, and only a moved stop sets one: the monitor takes its rule
    # (here trailing) from the last event with a price.
    assert [(e.kind, e.detail, e.price) for e in events[1:]] == [
        ("trailing", "stop_loss 95.0 -> 96.0", 96.0), ("manual", "take_profit 110.0 -> 112.0", None)]
    assert (trade.stop_loss, trade.take_profit, trade.best_price) == (96.0, 112.0, 100.0)


def test_a_close_at_an_older_tick_is_recorded_after_a_change_made_before_it(writer: Stack) -> None:
    """The monitor closes at its tick's ts, which may be older than a stop moved by hand just before
    (stamped at the writer's now): the close read before the change that preceded it."""
    m = Market(writer)
    m.quote("AAA", 100.0)
    trade_id = m.client.call("open_trade", symbol="AAA", side="buy", size=1.0, stop_loss=95.0, ts=T0)["id"]
    m.client.call("update_trade", trade_id=trade_id, stop_loss=96.0, reason="manual")  # now
    m.client.call("close_trade", trade_id=trade_id, price=96.0, reason="stop_loss", ts=T0 + 1000)
    trade, events = history(writer, trade_id)
    assert_in_order_from_its_opening(trade, events, ["opened", "manual", "closed"])
    assert trade.closed_at == events[-1].ts


def test_trade_closed_by_hand_meanwhile_is_logged_not_fatal(writer: Stack, caplog: pytest.LogCaptureFixture) -> None:
    m = Market(writer)
    m.quote("AAA", 100.0)
    trade_id = m.client.call("open_trade", symbol="AAA", side="buy", size=1.0, stop_loss=95.0, ts=T0)["id"]
    m.quote("AAA", 94.0)
    worker = MonitorWorker(writer.settings, until_idle=True)
    worker.setup()
    try:
        trades, ticks, through = worker.read()
        decision = evaluate(trades[0], ticks["AAA"])
        assert decision.exit is not None and decision.exit.reason == "stop_loss"
        m.client.call("close_trade", trade_id=trade_id, reason="manual")  # between read and write
        with caplog.at_level(logging.WARNING, logger="tickstack.monitor"):
            worker.apply(trades[0], decision, through)
        assert f"trade {trade_id} not updated" in caplog.text and "already closed" in caplog.text
        assert worker.step() is False  # no open trade left
    finally:
        worker.teardown()
    con = db(writer)
    assert con.execute("SELECT close_reason, exit_price FROM trades").fetchall() == [("manual", 94.0)]
    con.close()


# --------------------------------------------------------------------------- a trail that is not a price

#: A sell's trailing distance that puts its trail past the price limit (the reviewer's reproduction):
#: the ask 99.5 + this = 1000000000098.5, which update_trade refuses as a stop.
HUGE = 999_999_999_999.0


def store_as_before_the_check(stack: Stack, trade_id: int, trailing_distance: float) -> None:
    """Give a stored trade a trailing distance open_trade now refuses, as a trade opened before it
    did is stored: straight into the database, since no op writes one any more."""
    engine = make_write_engine(stack.settings)
    try:
        with engine.begin() as conn:
            conn.execute(update(trades_table).where(trades_table.c.id == trade_id)
                         .values(trailing_distance=trailing_distance))
    finally:
        engine.dispose()


def open_sell_with_an_impossible_trail(m: Market, stack: Stack) -> tuple[int, int]:
    """The reproduction, with a second trade beside it: a sell on MON at the bid 100.0 whose trailing
    distance is HUGE, and a buy on AAA with a stop at 95; then the ask of MON falls to 99.5 (its trail
    would be 1000000000098.5) and the bid of AAA to 94 (its stop is hit). (sell id, buy id)."""
    m.quote("MON", 100.0)
    m.quote("AAA", 100.0)
    bad = m.client.call("open_trade", symbol="MON", side="sell", size=1.0, trailing_distance=5.0, ts=T0)["id"]
    store_as_before_the_check(stack, bad, HUGE)
    good = m.client.call("open_trade", symbol="AAA", side="buy", size=1.0, stop_loss=95.0, ts=T0)["id"]
    m.quote("MON", 99.0)
    m.quote("AAA", 94.0)
    return bad, good


def test_a_stored_trail_that_is_not_a_price_does_not_stop_the_monitor(writer: Stack) -> None:
    """The reviewer's reproduction, with the trade stored as before open_trade refused it: the monitor
    proposed the trail 1000000000098.5 as a stop, the writer refused it, and the ValidationError ended
    every run (rc 1; under circus a crash loop, then no trade's stops enforced). Now the trail is not
    proposed, the monitor says so once, and the other trade's stop closes it."""
    m = Market(writer)
    bad, good = open_sell_with_an_impossible_trail(m, writer)
    log = run_monitor(writer)
    assert f"trade {good} closed at 94.0 (stop_loss)" in log
    said = [line for line in log.splitlines() if f"trade {bad}: trailing stop not set" in line]
    assert len(said) == 1 and "stop_loss: 1000000000098.5 is not a price (must be > 0 and < 1e+12)" in said[0], log
    con = db(writer)
    try:
        trades = {r[0]: r[1:] for r in con.execute(
            "SELECT id, status, close_reason, stop_loss, best_price FROM trades")}
        kinds = [k for (k,) in con.execute("SELECT kind FROM trade_events WHERE trade_id = ? ORDER BY id", (bad,))]
    finally:
        con.close()
    assert trades[good][:3] == ("closed", "stop_loss", 95.0)
    assert trades[bad] == ("open", None, None, 99.5)  # its best price followed the ask; no stop was set
    assert kinds == ["opened"]
    # Its stop and target still apply, and a second run finds nothing left to do.
    assert "stop ->" not in run_monitor(writer)


def refused_stop(trade: TradeState, ticks: list[PriceTick]) -> tuple[Decision, PriceTick]:
    """What the monitor proposed for the reproduction's trade before trails were checked (a stop the
    writer refuses, moved at the last tick), and that tick."""
    fall = ticks[-1]
    return replace(evaluate(trade, ticks), stop_loss=fall.ask + HUGE, stop_rule="trailing",
                   stop_moved_ts=fall.ts), fall


def test_a_change_the_writer_refuses_skips_that_trade_and_the_others_go_on(
        writer: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """Whatever the monitor proposes that the writer refuses (here the stop it proposed for the
    reproduction's trade before trails were checked) costs that trade its step, with one line saying
    which and why, not the process: the next trade is still closed by its stop, and the skipped one
    waits for new ticks (it is not redone at once, step after step)."""
    m = Market(writer)
    bad, good = open_sell_with_an_impossible_trail(m, writer)
    worker = MonitorWorker(writer.settings, until_idle=True)
    worker.setup()
    try:
        trades, ticks, through = worker.read()
        assert [t.id for t in trades] == [bad, good]
        refused, _fall = refused_stop(trades[0], ticks["MON"])
        with caplog.at_level(logging.INFO, logger="tickstack.monitor"):
            worker.apply(trades[0], refused, through)
            worker.apply(trades[1], evaluate(trades[1], ticks["AAA"]), through)
            assert worker.step() is False  # nothing pending: the skipped trade waits for new ticks
        skipped = [r for r in caplog.records if f"trade {bad} skipped" in r.getMessage()]
        assert len(skipped) == 1 and skipped[0].levelno == logging.ERROR
        assert "update_trade" in skipped[0].getMessage()
        assert "stop_loss: 1000000000098.5 is not a price (must be > 0 and < 1e+12)" in skipped[0].getMessage()
        assert f"trade {good} closed at 94.0 (stop_loss)" in caplog.text
    finally:
        worker.teardown()
    con = db(writer)
    try:
        rows = dict(con.execute("SELECT id, status FROM trades"))
        stop = con.execute("SELECT stop_loss FROM trades WHERE id = ?", (bad,)).fetchone()[0]
    finally:
        con.close()
    assert rows == {bad: "open", good: "closed"} and stop is None


def test_a_refused_update_does_not_drop_the_exit_of_the_same_step(writer: Stack,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A step that moved the stop and then reached an exit takes two calls. When the writer refuses the
    update, the close is still sent: these ticks reached the exit, and later ones may never come back
    to it."""
    m = Market(writer)
    bad, _good = open_sell_with_an_impossible_trail(m, writer)
    worker = MonitorWorker(writer.settings, until_idle=True)
    worker.setup()
    try:
        trades, ticks, through = worker.read()
        refused, fall = refused_stop(trades[0], ticks["MON"])
        refused_then_exit = replace(refused, exit=Exit(fall.ask, "take_profit", fall.id, fall.ts))
        with caplog.at_level(logging.INFO, logger="tickstack.monitor"):
            worker.apply(trades[0], refused_then_exit, through)
        assert any(f"trade {bad} skipped" in r.getMessage() and "update_trade" in r.getMessage()
                   for r in caplog.records)
        assert f"trade {bad} closed at {fall.ask} (take_profit)" in caplog.text
    finally:
        worker.teardown()
    con = db(writer)
    try:
        status, reason = con.execute("SELECT status, close_reason FROM trades WHERE id = ?", (bad,)).fetchone()
    finally:
        con.close()
    assert (status, reason) == ("closed", "take_profit")


def test_open_trade_refuses_a_trailing_distance_whose_stop_could_never_be_a_price(
        writer: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the source: a sell's trailing stop starts at entry + trailing_distance and only falls from
    there; at or over the price limit it is no stop the writer takes. Refused, naming the field and
    why, through the writer and the API (the reproduction's 201). A buy's trail, best - distance,
    is never over the limit; at or below 0 it is not in force until the bid passes the distance,
    which is a (wide) trailing stop, not an impossible one: accepted as before."""
    m = Market(writer)
    m.quote("MON", 100.0)  # a sell opens at the bid, 100.0
    message = ("trailing_distance: the trailing stop of a sell at 100.0 (entry + 999999999999.0): "
               "1000000000099.0 is not a price (must be > 0 and < 1e+12)")
    with pytest.raises(ValidationError, match=re.escape(message)):
        m.client.call("open_trade", symbol="MON", side="sell", size=1.0, trailing_distance=HUGE)
    with pytest.raises(ValidationError, match=r"^trailing_distance: the trailing stop of a sell at 5\.0 "):
        m.client.call("open_trade", symbol="MON", side="sell", size=1.0, entry_price=5.0,
                      trailing_distance=1e12 - 5.0)

    monkeypatch.delenv("TICKSTACK_API_TOKEN", raising=False)
    http = create_app("api", load_settings(writer.env)).test_client()
    auth = {"Authorization": f"Bearer {(writer.home / 'api-token').read_text().strip()}"}
    resp = http.post("/api/trades", json={"symbol": "MON", "side": "sell", "size": 1, "trailing_distance": HUGE},
                     headers=auth)
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert resp.get_json()["error"]["message"] == message

    con = db(writer)
    assert con.execute("SELECT count(*) FROM trades").fetchone()[0] == 0
    con.close()
    # The widest trail a sell at 100.0 can have, and a buy's trail that starts below 0.
    sell = m.client.call("open_trade", symbol="MON", side="sell", size=1.0, trailing_distance=1e12 - 101.0)
    buy = m.client.call("open_trade", symbol="MON", side="buy", size=1.0, trailing_distance=HUGE)
    assert sell["entry_price"] == 100.0 and buy["entry_price"] == 100.5


def test_small_chunks_reach_the_same_result_as_one_pass(writer: Stack) -> None:
    m = Market(writer)
    m.quote("AAA", 100.0)
    m.quote("BBB", 100.0)
    trade_id = m.client.call("open_trade", symbol="AAA", side="buy", size=1.0, entry_price=100.0, stop_loss=90.0,
                             trailing_distance=3.0, breakeven_trigger=2.0, ts=T0)["id"]
    path = [100.0 + (i % 7) * 0.5 + i * 0.25 for i in range(40)] + [108.0, 104.0]
    for p in path:  # interleaved with another symbol's ticks, which the trade must skip
        m.quote("AAA", p)
        m.quote("BBB", 200.0 - p)
    con = db(writer)
    ticks = [PriceTick(*r) for r in con.execute("SELECT id, ts, bid, ask FROM ticks WHERE symbol = 'AAA' ORDER BY id")]
    con.close()
    want = evaluate(TradeState(trade_id, "AAA", "buy", 100.0, 90.0, None, 3.0, 2.0, 100.0, ticks[0].id), ticks)
    assert want.exit is not None and want.exit.reason == "trailing_stop"
    assert MonitorWorker(writer.settings, until_idle=True, chunk=1).run() == 0
    con = db(writer)
    row = con.execute("SELECT status, close_reason, exit_price, last_tick_id, closed_at FROM trades").fetchone()
    kinds = [k for (k,) in con.execute("SELECT kind FROM trade_events ORDER BY id")]
    con.close()
    assert row == ("closed", want.exit.reason, want.exit.price, want.exit.tick_id, want.exit.ts)
    # One tick per step: each stop move is an event of its own.
    assert kinds[0] == "opened" and kinds[-1] == "closed" and set(kinds[1:-1]) == {"trailing", "breakeven"}
    assert len(kinds) > 10


def test_a_worker_run_in_process_gives_back_the_signal_handlers_it_found(writer: Stack) -> None:
    """A worker's run installs its own SIGTERM and SIGINT handlers (they only ask it to stop). Run
    inside another program, here pytest, it must give that program's back: they were left, and
    SIGTERM and Ctrl-C no longer stopped the rest of the suite (make test's stop of its background
    run included)."""
    found = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert MonitorWorker(writer.settings, until_idle=True).run() == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == found


class StoppedWhileRunning(MonitorWorker):
    """A monitor asked to stop (SIGTERM to this process) at its first step."""

    def step(self) -> bool:
        if not self.stopped_by:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().step()


def test_a_stop_signal_taken_by_an_in_process_worker_reaches_the_handler_it_replaced(writer: Stack) -> None:
    """SIGTERM during an in-process run stops the worker as under circus (the step in hand
    finishes, run returns 0), then goes on to the program's own handler (pytest's stops the suite:
    conftest.py), instead of ending with the worker."""
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    try:
        worker = StoppedWhileRunning(writer.settings, until_idle=True)
        assert worker.run() == 0
        assert worker.stopped_by == signal.SIGTERM and got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_worker_run_by_hand_and_stopped_with_ctrl_c_finishes_and_exits_0(writer: Stack) -> None:
    """Ctrl-C (SIGINT) to a worker run as its own process, not under circus: it finishes the step
    in hand and exits 0, with no traceback (the interpreter's own Ctrl-C handler, the one the
    worker replaced, is not handed the signal afterwards)."""
    # As from a terminal: Python's own Ctrl-C handler installed (make test's PostgreSQL run is started
    # in the background, where SIGINT is ignored, and its children would inherit that).
    as_from_a_terminal = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                          "sys.argv = ['workers.monitor']; runpy.run_module('workers.monitor', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", as_from_a_terminal], env=writer.env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    writer.procs.append(proc)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # its stop handlers are installed before it says it started
        seen.append(line)
        if "monitor started" in line:
            break
    proc.send_signal(signal.SIGINT)
    out = "".join(seen) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert "SIGINT received; finishing" in out and "Traceback" not in out, out
