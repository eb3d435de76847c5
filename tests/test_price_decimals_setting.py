"""Precision "learned from its data or configured" (issue 12): ``TICKSTACK_PRICE_DECIMALS`` names
the decimals of some symbols; the console shows their prices with them (its pages and the JSON its
charts and tables poll), and learns the others from their data. A bad value stops the app with a
message naming the variable. A real writer (:class:`testkit.writer.Stack`) and the console through
Flask's test client.
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from db.client import WriterClient
from db.config import ConfigError, load_settings
from testkit.env import ROOT
from testkit.writer import Stack
from tests.test_console_database_page import Console, text_of
from webapp import create_app


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    st = Stack.create()
    try:
        st.start_writer()
        now = int(time.time() * 1000)
        with WriterClient(settings=st.settings, deadline=20) as client:
            # Prices whose stored digits understate the quote (1.08230 is stored as 1.0823).
            client.call("insert_ticks", ticks=[
                {"symbol": "EURUSD", "ts": now - 1000, "bid": 1.0823, "ask": 1.0824, "source": "t", "seq": 1},
                {"symbol": "BTCUSD", "ts": now - 1000, "bid": 59245.04, "ask": 59246.5, "source": "t", "seq": 2},
                {"symbol": "ETHUSD", "ts": now - 1000, "bid": 3021.5, "ask": 3021.75, "source": "t", "seq": 3}])
        yield st
    finally:
        st.close()


def console_with(stack: Stack, value: str | None) -> Console:
    env = dict(stack.env)
    if value is not None:
        env["TICKSTACK_PRICE_DECIMALS"] = value
    c = Console(create_app("console", load_settings(env)))
    c.login()
    return c


def test_configured_decimals_win_over_the_learned_ones(stack: Stack) -> None:
    learned = console_with(stack, None).get("/console/api/trades").json["decimals"]
    assert learned == {"BTCUSD": 2, "ETHUSD": 2, "EURUSD": 4}
    console = console_with(stack, "EURUSD=5, BTCUSD=3")
    assert console.get("/console/api/trades").json["decimals"] == {"BTCUSD": 3, "ETHUSD": 2, "EURUSD": 5}
    market = text_of(console.get("/console/market?symbol=EURUSD"))
    assert "1.08230" in market and "1.08240" in market and "59,245.040" in market and "3,021.75" in market
    assert "3,021.750" not in market  # ETHUSD is not configured: learned, 2 decimals


@pytest.mark.parametrize(("value", "message"), [
    ("eurusd=5", "TICKSTACK_PRICE_DECIMALS: 'eurusd' is not a symbol"),
    ("EURUSD=9", "TICKSTACK_PRICE_DECIMALS: EURUSD='9': decimals must be a whole number from 0 to 8"),
    ("EURUSD", "TICKSTACK_PRICE_DECIMALS: 'EURUSD' is not SYMBOL=DECIMALS"),
    ("EURUSD=5,EURUSD=4", "TICKSTACK_PRICE_DECIMALS: EURUSD is given twice"),
    # A digit of another script (Arabic-Indic five) was taken as 5, where every other number is refused.
    ("EURUSD=\u0665", "TICKSTACK_PRICE_DECIMALS: EURUSD='\u0665': decimals must be a whole number from 0 to 8"),
])
def test_a_bad_value_is_refused_naming_the_variable(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings({"TICKSTACK_HOME": "/tmp/ts-never-made", "TICKSTACK_PRICE_DECIMALS": value})
    assert str(e.value).startswith(message)


def test_a_bad_value_stops_the_console_at_start(stack: Stack) -> None:
    done = subprocess.run([sys.executable, "-c", "from webapp import create_app; create_app('console')"],
                          env={**stack.env, "TICKSTACK_PRICE_DECIMALS": "EURUSD=-1"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "ConfigError: TICKSTACK_PRICE_DECIMALS: EURUSD='-1': decimals must be a whole number from 0 to 8" in (
        done.stderr)
