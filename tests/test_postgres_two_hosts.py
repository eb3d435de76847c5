"""Two hosts on one PostgreSQL database, on one machine: two whole stacks (the real circus.ini,
separate homes and ports, ``TICKSTACK_HOST`` ``host-a`` and ``host-b``) on the session's server.
Each host writes through its own writer; the simulated market, analysis, monitor and the database's
jobs run on one leader; when the leading host dies (circusd and every process SIGKILLed) the other
takes over, and every tick of both hosts is in the bars exactly once."""
from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator

import psutil
import pytest
from sqlalchemy import create_engine, text

from db.client import WriterClient
from db.config import load_settings
from db.leader import leaders
from testkit.circus import CircusStack
from testkit.helpers import wait_for
from testkit.postgres import HomeDatabases
from tests.test_postgres import Browser

#: A server's own promises: run by ``pytest --database postgresql`` (the suite's PostgreSQL run).
pytestmark = pytest.mark.postgres_only

SINGLETONS = ("analysis", "monitor", "jobs", "ticks")


@pytest.fixture
def two_hosts(home_databases: HomeDatabases) -> Iterator[tuple[CircusStack, CircusStack]]:
    a = CircusStack(TICKSTACK_HOST="host-a")
    urls = home_databases(a.home)
    a.env.update(urls)
    b = CircusStack(TICKSTACK_HOST="host-b")
    b.env.update(urls)
    try:
        yield a, b
    finally:
        b.close()
        a.close()


def test_two_hosts_share_one_database_with_one_leader_each_and_survive_the_leaders_death(
        two_hosts: tuple[CircusStack, CircusStack]) -> None:
    a, b = two_hosts
    engine = create_engine(a.env["DATABASE_URL"])

    def scalar(sql: str) -> object:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar()

    def led_by() -> dict[str, str | None]:
        with engine.connect() as conn:
            return leaders(conn, SINGLETONS)

    try:
        a.start()
        wait_for("host-a to lead", lambda: all(v and v.endswith("on host-a") for v in led_by().values()), timeout=90)
        b.start()  # its writer takes host-b's lock; its analysis, monitor and simulated market stand by
        for name in ("analysis", "monitor", "ticks"):
            wait_for(f"host-b's {name} to stand by", lambda n=name: "standing by; the leader is tickstack leader "
                     f"{n} pid" in b.log(n), timeout=90)
        # One simulated market for the database (host-a's): host-b's would interleave a second random
        # walk into the same symbols. host-b writes through its own writer (a client of its home).
        with WriterClient(settings=load_settings(b.env), deadline=60) as client:
            client.call("insert_ticks", ticks=[{"symbol": "BTCUSD", "ts": int(time.time() * 1000) - 120_000,
                                                "bid": 60_000.0, "ask": 60_001.0, "volume": 1.0,
                                                "source": "by-hand-host-b", "seq": 1}])
        wait_for("ticks of host-a's feed",
                 lambda: scalar("SELECT count(*) FROM ticks WHERE source LIKE 'sim-host-a-%'"), timeout=90)
        assert scalar("SELECT count(*) FROM ticks WHERE source LIKE 'sim-host-b-%'") == 0
        assert scalar("SELECT count(*) FROM ticks WHERE source = 'by-hand-host-b'") == 1
        assert all(v.endswith("on host-a") for v in led_by().values() if v), led_by()
        # Every session is named for its host's TICKSTACK_HOST (both run on one machine), so the
        # server's sessions by application tell the two hosts' writers apart.
        writers = scalar("SELECT string_agg(application_name, '|') FROM pg_stat_activity "
                         "WHERE application_name LIKE 'tickstack writer pid %'")
        assert re.search(r"tickstack writer pid \d+ on host-a", writers or "") and re.search(
            r"tickstack writer pid \d+ on host-b", writers or ""), writers

        # host-a dies: circusd and every process it started, SIGKILLed at once.
        doomed = [a.proc.pid, *(p.pid for p in psutil.Process(a.proc.pid).children(recursive=True))]
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        a.proc.wait(30)
        wait_for("host-b to take over", lambda: all(v and v.endswith("on host-b") for v in led_by().values()),
                 timeout=90)
        assert all(f"{name}: leading" in b.log(name) for name in SINGLETONS if name != "jobs")
        # host-b's console names the writers and leaders that are left.
        console = Browser(f"http://127.0.0.1:{b.console_port}")
        # circus calls the console active once gunicorn's master runs; the app, and with it the
        # password file, is made in its worker, seconds later on a loaded machine.
        wait_for("host-b's console to answer", lambda: console.fetch("/console/login")[0] == 200, timeout=90)
        password = (b.home / "admin-password").read_text().strip()
        assert console.form("/console/login", "/console/login", username="admin", password=password)[0] == 200
        status, page = console.fetch("/console/database")
        assert status == 200
        hosts = page[page.index('id="hosts"'):page.index("</section>", page.index('id="hosts"'))]
        assert "this host is host-b" in hosts and "writer-lock pid" in hosts and "on host-b" in hosts, hosts
        assert "on host-a" not in hosts, hosts
        for name in SINGLETONS:
            assert re.search(rf'data-leader="{name}".*?tickstack leader {name} pid \d+ on host-b', hosts, re.S), hosts

        # host-b's ticks keep coming; stop its feed, let its analysis catch up, then count.
        before = scalar("SELECT count(*) FROM ticks")
        wait_for("more ticks after the takeover", lambda: scalar("SELECT count(*) FROM ticks") > before, timeout=60)
        b.circusctl("stop", "ticks")
        wait_for("host-b's feed to have stopped (its last batch flushed)", lambda: not b.pids_of("ticks"))
        cursor_sql = "SELECT value FROM cursors WHERE name = 'analysis'"
        try:
            wait_for("analysis to catch up", lambda: scalar(cursor_sql) == scalar("SELECT max(id) FROM ticks"),
                     timeout=120)
        except AssertionError as e:
            raise AssertionError(f"{e}: cursor {scalar(cursor_sql)}, last tick {scalar('SELECT max(id) FROM ticks')}"
                                 f"\n{b.log('analysis')[-3000:]}") from None
        with engine.connect() as conn:
            ticks = dict(conn.execute(text("SELECT symbol, count(*) FROM ticks GROUP BY symbol")).all())
            counted = dict(conn.execute(text(
                "SELECT symbol, sum(tick_count) FROM bars WHERE timeframe = '1m' GROUP BY symbol")).all())
            wrong = conn.execute(text(
                "SELECT b.symbol, b.ts, b.tick_count, (SELECT count(*) FROM ticks t WHERE t.symbol = b.symbol AND "
                "t.ts >= b.ts AND t.ts < b.ts + 60000), (SELECT string_agg(t.id || ':' || t.source || ':' || t.ts, ' "
                "' ORDER BY t.id) FROM ticks t WHERE t.symbol = b.symbol AND t.ts >= b.ts AND t.ts < b.ts + 60000) "
                "FROM bars b WHERE b.timeframe = '1m'")).all()
        wrong = [w for w in wrong if w[2] != w[3]]
        assert ticks and {s: int(n) for s, n in counted.items()} == ticks, (
            counted, ticks, wrong, b.log("analysis")[-3000:], a.log("analysis")[-3000:])
    finally:
        engine.dispose()
