"""The API pages as trading APIs do, errors are JSON at every path of its port, and money carries
no float noise (issue 9, point 6). A real writer stores the rows; the API app reads them back from
the real SQLite file through Flask's test client.

Paging: ``since`` alone gives the oldest ``limit`` rows from ``since`` (ccxt's
``fetch_ohlcv(since, limit)``, Binance's startTime), ``until`` alone or neither the newest ``limit``;
every list says whether ``more`` rows exist and gives ``next``, the query parameters of the next
page. A client that merges ``next`` into its query until ``more`` is false must see every row
exactly once, in either direction, also when many rows share a ts (a ts cursor alone would split or
repeat them at a page boundary)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from db.client import WriterClient
from db.config import load_settings
from testkit.helpers import query
from testkit.writer import Stack
from webapp import create_app

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
ROWS = 5_000
PAGE = 1_000


@pytest.fixture
def client(writer: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlaskClient]:
    monkeypatch.delenv("TICKSTACK_API_TOKEN", raising=False)
    yield create_app("api", load_settings(writer.env)).test_client()


def write(stack: Stack, op: str, **args: Any) -> Any:
    with WriterClient(settings=stack.settings, deadline=30) as writer:
        return writer.call(op, **args)


def store_ticks(stack: Stack) -> list[tuple[int, int]]:
    """5,000 BTCUSD ticks, three per ts (so 1,000-row pages cut through a ts), stored in an order
    that makes ids disagree with ts; plus ticks of another symbol and ticks before the window.
    Returns the (ts, id) of the 5,000 in (ts, id) order."""
    ticks = [{"symbol": "BTCUSD", "ts": T0 + (i // 3) * 1000, "bid": 100.0 + i % 7, "ask": 101.0 + i % 7,
              "source": "paging", "seq": i} for i in range(ROWS)]
    ticks.reverse()  # later ts first: ids descend where ts ascends
    others = [{"symbol": "ETHUSD", "ts": T0 + i * 500, "bid": 10.0, "ask": 10.5} for i in range(300)]
    early = [{"symbol": "BTCUSD", "ts": T0 - 1 - i, "bid": 1.0, "ask": 1.5} for i in range(50)]
    for start in range(0, ROWS, 2500):
        assert write(stack, "insert_ticks", ticks=ticks[start:start + 2500])["inserted"] == 2500
    write(stack, "insert_ticks", ticks=others + early)
    return query(stack.settings, "SELECT ts, id FROM ticks WHERE symbol = 'BTCUSD' AND source = 'paging' "
                                 "ORDER BY ts, id")


def walk(client: FlaskClient, path: str, key: str, params: dict[str, Any], forward: bool) -> tuple[list[Any], int]:
    """Every row a client gets by following ``next`` until ``more`` is false, in time order;
    and the number of pages."""
    rows: list[Any] = []
    pages = 0
    while True:
        resp = client.get(path, query_string=params)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        body = resp.get_json()
        pages += 1
        page = body[key]
        assert pages <= ROWS // PAGE + 2, "paging does not end"
        assert "more" in body and "next" in body, f"a list must say whether more rows exist, and where: {sorted(body)}"
        rows = rows + page if forward else page + rows
        if not body["more"]:
            assert body["next"] is None
            return rows, pages
        assert len(page) == params["limit"], "a page that is not full must be the last"
        params = {**params, **body["next"]}


def tick_keys(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(t["ts"], t["id"]) for t in rows]


def test_paging_forward_from_since_returns_every_tick_once(writer: Stack, client: FlaskClient) -> None:
    expected = store_ticks(writer)
    # The first page from since is the oldest: a client paging forward starts where it asked.
    first = client.get("/api/ticks", query_string={"symbol": "BTCUSD", "since": T0, "limit": PAGE}).get_json()
    assert tick_keys(first["ticks"]) == expected[:PAGE], "since must give the oldest rows from since"

    rows, pages = walk(client, "/api/ticks", "ticks", {"symbol": "BTCUSD", "since": T0, "limit": PAGE}, True)
    assert tick_keys(rows) == expected  # every row once, in (ts, id) order, ts ties across page cuts included
    assert pages == ROWS // PAGE
    assert {t["symbol"] for t in rows} == {"BTCUSD"}
    # until bounds a forward walk too.
    last = T0 + 999 * 1000
    rows, _ = walk(client, "/api/ticks", "ticks", {"symbol": "BTCUSD", "since": T0, "until": last, "limit": 700},
                   True)
    assert tick_keys(rows) == [k for k in expected if k[0] <= last]


def test_paging_backward_from_until_and_from_the_newest_returns_every_tick_once(
        writer: Stack, client: FlaskClient) -> None:
    expected = store_ticks(writer)
    until = expected[-1][0]
    newest = client.get("/api/ticks", query_string={"symbol": "BTCUSD", "until": until, "limit": PAGE}).get_json()
    assert tick_keys(newest["ticks"]) == expected[-PAGE:]  # the newest, oldest first
    assert newest["more"] is True and newest["next"] == {"until": expected[-PAGE][0], "before_id": expected[-PAGE][1]}

    rows, pages = walk(client, "/api/ticks", "ticks", {"symbol": "BTCUSD", "until": until, "limit": PAGE}, False)
    early = 50  # the ticks before the window are older still: a backward walk reaches them last
    assert tick_keys(rows[early:]) == expected and len(rows) == ROWS + early
    assert pages == ROWS // PAGE + 1
    # Neither bound: the newest of all, then backward.
    rows, _ = walk(client, "/api/ticks", "ticks", {"symbol": "BTCUSD", "limit": 999}, False)
    assert tick_keys(rows[early:]) == expected


def test_bars_indicators_and_trades_page_with_their_cursor(writer: Stack, client: FlaskClient) -> None:
    n = 2_500
    bars = [{"symbol": "BTCUSD", "timeframe": "1m", "ts": T0 + i * 60_000, "open": 100.0, "high": 101.0, "low": 99.0,
             "close": 100.5, "volume": 1.0} for i in range(n)]
    values = [{"symbol": "BTCUSD", "timeframe": "1m", "name": "sma_20", "ts": b["ts"], "value": float(i)}
              for i, b in enumerate(bars)]
    for start in range(0, n, 500):
        write(writer, "upsert_bars", bars=bars[start:start + 500])
        write(writer, "put_indicators", values=values[start:start + 500])
    stamps = [b["ts"] for b in bars]
    for path, key, extra in (("/api/bars", "bars", {}), ("/api/indicators", "values", {"name": "sma_20"})):
        base = {"symbol": "BTCUSD", "timeframe": "1m", "limit": PAGE, **extra}
        forward, pages = walk(client, path, key, {**base, "since": T0 + 60_000}, True)
        assert [r["ts"] for r in forward] == stamps[1:] and pages == 3
        backward, _ = walk(client, path, key, {**base, "until": stamps[-2]}, False)
        assert [r["ts"] for r in backward] == stamps[:-1]
        first = client.get(path, query_string={**base, "since": T0}).get_json()
        assert first["more"] is True and first["next"] == {"since": stamps[PAGE - 1] + 1}

    for i in range(25):
        write(writer, "open_trade", symbol="BTCUSD", side="buy", size=1.0, entry_price=100.0 + i, ts=T0 + i)
    trades, pages = walk(client, "/api/trades", "trades", {"limit": 10}, True)  # newest first, by id
    ids = [t["id"] for t in trades]
    assert len(ids) == 25 and ids == sorted(ids, reverse=True) and pages == 3


def test_half_a_cursor_is_refused_with_the_reason(client: FlaskClient) -> None:
    for params, message in (({"after_id": 5}, "after_id: give it with since"),
                            ({"before_id": 5}, "before_id: give it with until and without since"),
                            ({"since": T0, "until": T0 + 1, "before_id": 5}, "before_id: give it with until")):
        resp = client.get("/api/ticks", query_string={"symbol": "BTCUSD", **params})
        assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_parameter"
        assert message in resp.get_json()["error"]["message"]


# --- errors: JSON at every path of the API's port ---------------------------------------------------


def assert_json_error(resp: Any, status: int, code: str) -> None:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json", (resp.mimetype, resp.get_data(as_text=True)[:200])
    body = resp.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body


def test_404_and_405_are_json_at_every_path_of_the_api(client: FlaskClient) -> None:
    for path in ("/", "/nope", "/api/nope", "/api", "/metrics/extra", "/favicon.ico"):
        assert_json_error(client.get(path), 404, "not_found")
    assert "/api/openapi.json" in client.get("/").get_json()["error"]["message"]
    assert_json_error(client.delete("/api/ticks"), 405, "method_not_allowed")
    assert_json_error(client.post("/metrics"), 405, "method_not_allowed")
    assert_json_error(client.put("/api/health"), 405, "method_not_allowed")
    assert_json_error(client.post("/"), 404, "not_found")


# --- money: no float noise --------------------------------------------------------------------------


def test_pnl_is_exact_decimal_without_float_noise(writer: Stack, client: FlaskClient) -> None:
    token = (writer.home / "api-token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = client.post(path, data=json.dumps(body), headers=auth, content_type="application/json")
        assert resp.status_code in (200, 201), resp.get_data(as_text=True)
        return resp.get_json()

    post("/api/ticks", {"ticks": [{"symbol": "BTCUSD", "ts": T0, "bid": 97012.35, "ask": 97012.5}]})
    # In floats: (97001.8 - 97012.35) * 0.35 = -3.692500000001018; the money is -3.6925.
    buy = post("/api/trades", {"symbol": "BTCUSD", "side": "buy", "size": 0.35, "entry_price": 97012.35, "ts": T0})
    # (97013.7 - 97000.5) * 2 = 26.39999999999418 in floats.
    big = post("/api/trades", {"symbol": "BTCUSD", "side": "buy", "size": 2, "entry_price": 97000.5, "ts": T0})
    # (97013.85 - 97013.7) * 3 = 0.4500000000043656 in floats (a sell marked at the ask).
    sell = post("/api/trades", {"symbol": "BTCUSD", "side": "sell", "size": 3, "entry_price": 97013.85, "ts": T0})
    post("/api/ticks", {"ticks": [{"symbol": "BTCUSD", "ts": T0 + 1, "bid": 97013.7, "ask": 97013.7}]})
    marked = {t["id"]: t for t in client.get("/api/trades").get_json()["trades"]}
    assert marked[big["id"]]["pnl"] == 26.4 and marked[big["id"]]["mark"]["price"] == 97013.7
    assert marked[sell["id"]]["pnl"] == 0.45

    closed = post(f"/api/trades/{buy['id']}/close", {"price": 97001.8})
    assert closed["pnl"] == -3.6925 and closed["exit_price"] == 97001.8 and closed["entry_price"] == 97012.35
    assert [e["pnl"] for e in closed["events"] if e["kind"] == "closed"] == [-3.6925]
    raw = client.get(f"/api/trades/{buy['id']}").get_data(as_text=True)
    assert '"pnl":-3.6925' in raw.replace(" ", ""), raw
