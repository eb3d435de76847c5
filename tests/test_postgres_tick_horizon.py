"""A cursor that cannot skip (issue 11): with several writers, a tick with a smaller id may commit
after a larger one is visible; analysis and monitor follow ticks by ``id > cursor`` and must not pass
over it (:class:`db.tick_horizon.TickHorizon`).

"Two writers racing" are two direct connections to the database (our writer takes a server-wide lock,
so a second one would wait): the first inserts a tick and holds its transaction open, the second
inserts one (a larger id) and commits. Deterministic: no timing, the open transaction is the race.
"""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import create_engine, event, func, insert, select
from sqlalchemy.engine import Connection, Engine

from db.client import WriterClient
from db.engine import make_read_engine
from db.models import bars_table, cursors_table, ticks_table, trades_table
from db.queries import ticks_after
from db.tick_horizon import TickHorizon
from testkit.env import ROOT
from testkit.writer import Stack
from tests.test_postgres import stack_on
from workers.bars import ORDERED

#: A server's own promises: run by ``pytest --database postgresql`` (the suite's PostgreSQL run).
pytestmark = pytest.mark.postgres_only

NOW_TS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
SYMBOL = "EURUSD"


def add_tick(conn: Connection, seq: int, bid: float, ts: int) -> int:
    """One tick as a writer stores it (the id from the column's default); returns its id."""
    return conn.execute(insert(ticks_table).values(symbol=SYMBOL, ts=ts, bid=bid, ask=bid + 2e-4, volume=1.0,
                                            source="race", seq=seq).returning(ticks_table.c.id)).scalar_one()


def run(module: str, env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", module, "--until-idle"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def scalar(engine: Engine, stmt: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(stmt).scalar()


def test_analysis_and_monitor_do_not_skip_a_tick_that_commits_after_a_larger_id(
        request: pytest.FixtureRequest) -> None:
    stack = stack_on("postgresql", request)
    engine = create_engine(stack.env["DATABASE_URL"])
    held = None
    try:
        stack.start_writer()
        with WriterClient(settings=stack.settings, deadline=30) as client:
            trade = client.call("open_trade", symbol=SYMBOL, side="buy", size=1.0, entry_price=1.10,
                                stop_loss=1.05, ts=NOW_TS)["id"]
        held = engine.connect()
        small = add_tick(held, 1, 1.00, NOW_TS + 1_000)  # hits the stop; its transaction stays open
        with engine.begin() as conn:
            big = add_tick(conn, 2, 1.12, NOW_TS + 2_000)  # committed: visible, with the larger id
        assert small < big

        # The race as the readers meet it: id `big` is there, id `small` is not yet.
        run("workers.analysis", stack.env)
        run("workers.monitor", stack.env)
        assert (scalar(engine, select(cursors_table.c.value).where(cursors_table.c.name == "analysis")) or 0) < small
        assert scalar(engine, select(trades_table.c.last_tick_id).where(trades_table.c.id == trade)) < small

        held.commit()  # the smaller id commits last
        held.close()
        held = None
        run("workers.analysis", stack.env)
        run("workers.monitor", stack.env)

        # Both ticks are in the bars, once each, and the analysis cursor is past both.
        assert finest_tick_count(engine) == 2
        assert scalar(engine, select(cursors_table.c.value).where(cursors_table.c.name == "analysis")) == big
        # The monitor saw the smaller id first, as its id says: the stop was hit there.
        with engine.connect() as conn:
            closed = conn.execute(select(trades_table.c.status, trades_table.c.close_reason, trades_table.c.exit_price)
                                  .where(trades_table.c.id == trade)).one()
        assert tuple(closed) == ("closed", "stop_loss", 1.00)
    finally:
        if held is not None:
            held.close()
        engine.dispose()
        stack.close()


def test_the_bound_waits_for_every_writer_of_its_sample_and_only_for_those(request: pytest.FixtureRequest) -> None:
    """The bound, read by the readers' role: it stays below a tick whose transaction is open, moves
    once the writers of its sample are over even while a newer one writes, and the reads up to it are
    complete."""
    stack = stack_on("postgresql", request)
    engine = create_engine(stack.env["DATABASE_URL"])
    reader = make_read_engine(stack.settings)
    first = third = None
    horizon = TickHorizon()

    def bound_and_ticks() -> tuple[int | None, list[int]]:
        with reader.connect() as conn:
            through = horizon.advance(conn)
            return through, [row[0] for row in ticks_after(conn, 0, 100, through)]

    try:
        stack.start_writer()  # creates the schema
        assert bound_and_ticks() == (0, [])
        first = engine.connect()
        a = add_tick(first, 1, 1.08, NOW_TS)
        with engine.begin() as conn:
            b = add_tick(conn, 2, 1.09, NOW_TS + 1)
        assert bound_and_ticks() == (0, [])  # b is visible, but a may still commit below it

        third = engine.connect()
        c = add_tick(third, 3, 1.10, NOW_TS + 2)  # a newer writer, still open
        first.commit()
        # The sample that saw b had only `first` writing: it is over, so everything up to b is final,
        # though `third` (whose id is above b) still writes.
        assert bound_and_ticks() == (b, [a, b])

        third.rollback()  # an aborted tick never exists: the bound moves past its id all the same
        with engine.begin() as conn:
            d = add_tick(conn, 4, 1.11, NOW_TS + 3)
        assert c < d
        assert bound_and_ticks() == (d, [a, b, d])
        assert bound_and_ticks() == (d, [a, b, d])  # nothing new: it stays
    finally:
        for conn in (first, third):
            if conn is not None:
                conn.close()
        reader.dispose()
        engine.dispose()
        stack.close()


@contextmanager
def open_transaction(request: pytest.FixtureRequest, *statements: str) -> Iterator[tuple[Stack, Engine, Connection]]:
    """A stack with its writer on its own database, its owner's engine, and a connection of the owner's
    whose transaction ran ``statements`` and stays open until the end (then all is closed)."""
    stack = stack_on("postgresql", request)
    engine = create_engine(stack.env["DATABASE_URL"])
    try:
        stack.start_writer()  # creates the schema
        with engine.connect() as held:
            for statement in statements:
                held.exec_driver_sql(statement)
            yield stack, engine, held
    finally:
        engine.dispose()
        stack.close()


def finest_tick_count(engine: Engine) -> int:
    """The ticks counted in the shortest timeframe's bars of SYMBOL (each tick is in exactly one)."""
    bar = bars_table.c
    return scalar(engine, select(func.sum(bar.tick_count)).where(bar.symbol == SYMBOL, bar.timeframe == ORDERED[0][0]))


@pytest.mark.parametrize("holder", ["ANALYZE ticks", "LOCK TABLE ticks IN SHARE UPDATE EXCLUSIVE MODE",
                                    "SELECT id FROM ticks ORDER BY id LIMIT 1 FOR UPDATE"])
def test_a_lock_on_ticks_that_draws_no_id_does_not_hold_the_bound(request: pytest.FixtureRequest,
                                                                   holder: str) -> None:
    """Only a transaction that may still add a tick (INSERT or COPY: ROW EXCLUSIVE on ``ticks``) holds
    the bound back. Autovacuum's ANALYZE or VACUUM of ``ticks`` (SHARE UPDATE EXCLUSIVE), or a
    SELECT ... FOR UPDATE (ROW SHARE), draws no id: counted as writers, one running as an analysis
    --until-idle started left it with a bound of 0, so it analysed nothing and said "nothing left to
    do" (test_backfill's SIGKILL test failed so, now and then, in the full PostgreSQL run, where
    autovacuum visits a test's database right after its bulk inserts)."""
    with open_transaction(request) as (stack, engine, held):
        with WriterClient(settings=stack.settings, deadline=30) as client:
            client.call("insert_ticks", ticks=[{"symbol": SYMBOL, "ts": NOW_TS + i, "bid": 1.1, "ask": 1.1002,
                                                "volume": 1.0, "source": "held", "seq": i} for i in range(50)])
        top = scalar(engine, select(func.max(ticks_table.c.id)))
        held.exec_driver_sql(holder)  # its lock is held until the end of the test
        reader = make_read_engine(stack.settings)
        try:
            with reader.connect() as conn:
                assert TickHorizon().advance(conn) == top  # a new reader's first call: final at once
        finally:
            reader.dispose()
        run("workers.analysis", stack.env)
        assert scalar(engine, select(cursors_table.c.value).where(cursors_table.c.name == "analysis")) == top
        assert finest_tick_count(engine) == 50


def test_a_writer_that_took_another_lock_on_ticks_first_still_holds_the_bound(request: pytest.FixtureRequest) -> None:
    """The bound counts ROW EXCLUSIVE holders only; a transaction that holds SHARE UPDATE EXCLUSIVE
    (it lets other writers in) before it inserts holds ROW EXCLUSIVE too, so it still holds the bound
    below its tick while a larger id commits."""
    with open_transaction(request, "LOCK TABLE ticks IN SHARE UPDATE EXCLUSIVE MODE") as (stack, engine, held):
        a = add_tick(held, 1, 1.08, NOW_TS)
        with engine.begin() as conn:
            b = add_tick(conn, 2, 1.09, NOW_TS + 1)
        assert a < b
        reader = make_read_engine(stack.settings)
        try:
            with reader.connect() as conn:
                through = TickHorizon().advance(conn)
                assert through is not None and through < a
                assert ticks_after(conn, 0, 100, through) == []
        finally:
            reader.dispose()


def test_on_sqlite_there_is_no_bound_and_no_query(request: pytest.FixtureRequest) -> None:
    """One writer, serial commits: the readers' statements are the ones they always were."""
    stack = stack_on("sqlite", request)
    try:
        stack.start_writer()
        engine = make_read_engine(stack.settings)
        statements: list[str] = []
        try:
            with engine.connect() as conn:
                event.listen(conn, "before_cursor_execute", lambda *a: statements.append(a[2]))
                assert TickHorizon().advance(conn) is None
                assert statements == []
                ticks_after(conn, 0, 10, None)
            assert "<=" not in statements[-1] and "ticks.id >" in statements[-1]
        finally:
            engine.dispose()
    finally:
        stack.close()
