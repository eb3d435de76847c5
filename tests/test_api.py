"""The REST API against a real writer process: Flask's test client for HTTP,
a real SQLite file read back through a read-only sqlite3 connection, real
ZeroMQ to the writer, and (for watcher status) a real circusd.

Over 500 lines on purpose: every route and each of its bad inputs sits beside the one module-scoped
writer and API app they share (starting those per file would cost more than the tests); sections
follow the API package's modules (reads, writes, trades, errors, OpenAPI, metrics)."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.test import TestResponse

from db.client import WriterClient
from db.config import load_settings
from db.ops import OPS
from testkit.postgres import read_connection
from testkit.writer import Stack
from webapp import MAX_BODY, create_app
from webapp.api import openapi as openapi_module

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
TABLES = ("ticks", "trades", "trade_events", "bars", "indicators")


@dataclass
class Api:
    stack: Stack
    app: Flask
    client: FlaskClient
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def post(self, path: str, body: Any = None, *, raw: bytes | str | None = None, auth: bool = True,
             headers: dict[str, str] | None = None, content_type: str = "application/json") -> TestResponse:
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        hdrs = {**(self.auth if auth else {}), **(headers or {})}
        return self.client.post(path, data=data, headers=hdrs, content_type=content_type if data is not None else None)

    def get(self, path: str, **params: Any) -> TestResponse:
        return self.client.get(path, query_string=params)

    def counts(self) -> dict[str, int]:
        """Row counts, read with a read-only sqlite3 connection of our own."""
        con = read_connection(self.stack.settings)
        try:
            return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
        finally:
            con.close()


@pytest.fixture
def api(writer: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    monkeypatch.delenv("TICKSTACK_API_TOKEN", raising=False)
    app = create_app("api", load_settings(writer.env))
    token = (writer.home / "api-token").read_text().strip()
    yield Api(writer, app, app.test_client(), token)


def tick(ts: int, bid: float = 100.0, ask: float = 100.5, symbol: str = "BTCUSD", **extra: Any) -> dict[str, Any]:
    return {"symbol": symbol, "ts": ts, "bid": bid, "ask": ask, **extra}


def assert_error(resp: TestResponse, status: int, code: str, message: str = "") -> dict[str, Any]:
    """The one error shape, with ``message`` (a regex) in the message."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert re.search(message, body["error"]["message"]), body
    return body


def metric_samples(text: str) -> dict[str, list[Any]]:
    """Samples by sample name (``x_total``, ``x_bucket``, ...) from the text exposition."""
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


# --- token ------------------------------------------------------------------------------------


def test_token_file_is_private_and_env_token_wins(writer: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TICKSTACK_API_TOKEN", raising=False)
    create_app("api", load_settings(writer.env))
    path = writer.home / "api-token"
    assert path.stat().st_mode & 0o777 == 0o600
    file_token = path.read_text().strip()
    assert len(file_token) >= 32
    create_app("api", load_settings(writer.env))  # a second app (gunicorn's other worker) reads the same one
    assert path.read_text().strip() == file_token

    # The app reads the token from its settings (db.config), made from the environment it runs with.
    env = {**writer.env, "TICKSTACK_API_TOKEN": "from-the-environment-0123456789"}
    client = create_app("api", load_settings(env)).test_client()
    body = {"ticks": [tick(T0)]}
    assert_error(client.post("/api/ticks", json=body, headers={"Authorization": f"Bearer {file_token}"}),
                 403, "forbidden")
    resp = client.post("/api/ticks", json=body, headers={"Authorization": "Bearer from-the-environment-0123456789"})
    assert resp.status_code == 200, resp.get_json()


# --- ticks ----------------------------------------------------------------------------------------


def test_post_ticks_then_read_them_newest_limited_oldest_first(api: Api) -> None:
    ticks = [tick(T0 + i * 1000, 100 + i, 100.5 + i, source="feed", seq=i) for i in range(10)]
    ticks.append(tick(T0, 10, 11, symbol="ETHUSD"))
    resp = api.post("/api/ticks", {"ticks": ticks})
    assert resp.status_code == 200 and resp.get_json() == {"inserted": 11, "duplicates": 0}
    # Resending ticks that carry (source, seq) stores nothing twice.
    resp = api.post("/api/ticks", {"ticks": ticks[:10]})
    assert resp.get_json() == {"inserted": 0, "duplicates": 10}
    assert api.counts()["ticks"] == 11

    body = api.get("/api/ticks", symbol="BTCUSD").get_json()
    assert body["symbol"] == "BTCUSD" and [t["ts"] for t in body["ticks"]] == [T0 + i * 1000 for i in range(10)]
    first = body["ticks"][0]
    assert set(first) == {"id", "symbol", "ts", "bid", "ask", "volume", "source", "seq"}
    assert first | {"id": 0} == {"id": 0, "symbol": "BTCUSD", "ts": T0, "bid": 100.0, "ask": 100.5, "volume": 0.0,
                                 "source": "feed", "seq": 0}
    # limit keeps the newest, still oldest first; since/until are inclusive.
    assert [t["seq"] for t in api.get("/api/ticks", symbol="BTCUSD", limit=3).get_json()["ticks"]] == [7, 8, 9]
    window = api.get("/api/ticks", symbol="BTCUSD", since=T0 + 2000, until=T0 + 5000).get_json()["ticks"]
    assert [t["seq"] for t in window] == [2, 3, 4, 5]
    # With since, the oldest from since (issue 9: pages go forward from since, as exchange APIs do).
    assert [t["seq"] for t in api.get("/api/ticks", symbol="BTCUSD", since=T0 + 2000, until=T0 + 5000,
                                      limit=2).get_json()["ticks"]] == [2, 3]
    assert api.get("/api/ticks", symbol="ETHUSD").get_json()["ticks"][0]["source"] == "external"
    assert api.get("/api/ticks", symbol="NOPE").get_json() == {"symbol": "NOPE", "ticks": [], "more": False,
                                                               "next": None}
    # The columnar form the writer accepts works too.
    resp = api.post("/api/ticks", {"ticks": {"symbol": ["XAU"], "ts": [T0], "bid": [1.0], "ask": [1.0]}})
    assert resp.get_json() == {"inserted": 1, "duplicates": 0}


BAD_TICK_BODIES = [
    ("malformed JSON", '{"ticks": [', 400, "invalid_json", r"not valid JSON"),
    ("empty body", "", 400, "invalid_json", r"empty"),
    ("array body", json.dumps([tick(T0)]), 400, "invalid_body", r"must be a JSON object, got an array"),
    ("string body", '"ticks"', 400, "invalid_body", r"must be a JSON object, got a string"),
    ("NaN bid", '{"ticks": [{"symbol": "BTCUSD", "ts": 1, "bid": NaN, "ask": 2}]}', 400, "invalid_json", r"NaN"),
    ("Infinity ask", '{"ticks": [{"symbol": "BTCUSD", "ts": 1, "bid": 1, "ask": Infinity}]}', 400, "invalid_json",
     r"Infinity"),
    ("bid above ask", json.dumps({"ticks": [tick(T0), tick(T0 + 1, 2.0, 1.0)]}), 400, "invalid_body",
     r"^ticks\[1\]: bid 2\.0 is above ask 1\.0$"),
    ("bad symbol", json.dumps({"ticks": [tick(T0, symbol="btc")]}), 400, "invalid_body", r"'btc' is not a symbol"),
    ("ts in float", json.dumps({"ticks": [tick(1.5)]}), 400, "invalid_body",
     r"ticks\[0\]\.ts: 1\.5 is not epoch milliseconds"),
    ("negative price", json.dumps({"ticks": [tick(T0, -1.0)]}), 400, "invalid_body", r"not a price"),
    # int(time.time()) was stored as January 1970 (a new user's run, round 38).
    ("ts in seconds", json.dumps({"ticks": [tick(T0), tick(T0 // 1000)]}), 400, "invalid_body",
     r"^ticks\[1\]\.ts: 1704067200 looks like a time in seconds \(2024-01-01 00:00 UTC as seconds, "
     r"1970-01-20 17:21 UTC as milliseconds\): send epoch milliseconds \(seconds x 1000\)$"),
    ("ts in microseconds", json.dumps({"ticks": [tick(T0 * 1000)]}), 400, "invalid_body",
     r"^ticks\[0\]\.ts: 1704067200000000 is out of range \(epoch ms 1970\.\.2100\); it looks like microseconds"),
    ("no ticks field", json.dumps({"tick": []}), 400, "invalid_body", r"^unexpected field 'tick'; fields are ticks$"),
    ("missing ticks", "{}", 400, "invalid_body", r"^missing field 'ticks'$"),
    ("empty batch", json.dumps({"ticks": []}), 400, "invalid_body", r"a batch must hold 1\.\.10000"),
    ("too many", json.dumps({"ticks": [tick(T0)] * 10_001}), 400, "invalid_body", r"a batch must hold 1\.\.10000"),
    ("unknown tick field", json.dumps({"ticks": [tick(T0, price=1)]}), 400, "invalid_body",
     r"unexpected field 'price'"),
    ("client option smuggled", json.dumps({"ticks": [tick(T0)], "_deadline": 0}), 400, "invalid_body",
     r"unexpected field '_deadline'"),
    ("huge integer", json.dumps({"ticks": [tick(T0, seq=2**70, source="s")]}), 400, "invalid_body",
     r"out of range"),
    # JSON carries any integer; past a float's range math.isfinite raised OverflowError: a 500 on trades.
    ("integer past a float", json.dumps({"ticks": [tick(T0, 10**400)]}), 400, "invalid_body",
     r"^ticks\[0\]\.bid: 10{39}\.\.\. is not a price"),
    ("not UTF-8", b'{"ticks": "\xff"}', 400, "invalid_json", r"not valid JSON"),
    # Past the recursion limit (~1,000 levels) json.loads raises RecursionError: refused as not JSON.
    ("deep nesting", "[" * 10_000 + "]" * 10_000, 400, "invalid_json", r"not valid JSON: nested too deeply"),
    # More brackets than any write holds are refused before parsing, however they are arranged.
    ("deeper nesting", "[" * 100_000 + "]" * 100_000, 400, "invalid_body",
     r"^the body holds 100,000 JSON objects and arrays .* at most 50,000 JSON objects and arrays are read"),
    ("a million numbers", "[" + "0.5," * 1_000_000 + "0.5]", 400, "invalid_body",
     r"^the body holds 1,000,000 JSON values \(counted as its commas\); at most 280,000 are read"),
    # A key twice in one object: json.loads kept the last and the tick was stored at the second bid,
    # where the sender may have meant either.
    ("a key twice in a tick", f'{{"ticks": [{{"symbol": "BTCUSD", "ts": {T0}, "bid": 1.0, "bid": 2.0, "ask": 3.0}}]}}',
     400, "invalid_body", r"^ticks\[0\]: the key 'bid' is given twice in one object; give each once$"),
    ("a key twice in the body", f'{{"ticks": [], "ticks": [{{"symbol": "BTCUSD", "ts": {T0}, "bid": 1, "ask": 2}}]}}',
     400, "invalid_body", r"^the key 'ticks' is given twice in one object; give each once$"),
    ("a key twice, deep", '{"a": ' * 500 + '{"k": 1, "k": 2}' + "}" * 500, 400, "invalid_body",
     r"^a(\.a){499}: the key 'k' is given twice in one object; give each once$"),
    ("a key twice under an odd key", '{"x.y\\n": {"k": 1, "k": 2}}', 400, "invalid_body",
     r"^\['x\.y\\n'\]: the key 'k' is given twice in one object; give each once$"),
    ("a key twice in an array body", '[{"k": 1, "k": 2}]', 400, "invalid_body",
     r"^the body must be a JSON object, got an array$"),
]


@pytest.mark.parametrize("raw,status,code,message", [c[1:] for c in BAD_TICK_BODIES],
                         ids=[c[0] for c in BAD_TICK_BODIES])
def test_bad_tick_bodies_are_rejected_with_the_reason_and_change_nothing(
        api: Api, raw: str | bytes, status: int, code: str, message: str) -> None:
    before = api.counts()
    assert_error(api.post("/api/ticks", raw=raw), status, code, message)
    assert api.counts() == before


def test_tick_body_needs_json_content_type(api: Api) -> None:
    before = api.counts()
    resp = api.post("/api/ticks", raw=json.dumps({"ticks": [tick(T0)]}), content_type="text/plain")
    assert_error(resp, 415, "unsupported_media_type", r"Content-Type: application/json")
    assert api.counts() == before


def test_oversize_body_is_413_and_changes_nothing(api: Api) -> None:
    before = api.counts()
    raw = b'{"ticks": [' + b" " * MAX_BODY + b"]}"
    assert_error(api.post("/api/ticks", raw=raw), 413, "payload_too_large", str(MAX_BODY))
    assert api.counts() == before


# --- auth --------------------------------------------------------------------------------------------


WRITES = [("/api/ticks", {"ticks": [tick(T0)]}), ("/api/trades", {"symbol": "BTCUSD", "side": "buy", "size": 1,
                                                                   "entry_price": 100.0}),
          ("/api/trades/1/close", {"price": 101.0})]


@pytest.mark.parametrize("path,body", WRITES, ids=["ticks", "open", "close"])
def test_writes_need_the_bearer_token(api: Api, path: str, body: dict[str, Any]) -> None:
    if path.endswith("/close"):
        assert api.post("/api/trades", WRITES[1][1]).status_code == 201
    before = api.counts()
    resp = api.post(path, body, auth=False)
    assert_error(resp, 401, "unauthorized", r"missing bearer token")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    for header in ("Basic dXNlcjpwYXNz", f"Bearer {api.token} extra", api.token):
        assert_error(api.post(path, body, auth=False, headers={"Authorization": header}), 401, "unauthorized",
                     r"malformed")
    # No token after the scheme: the README's `Bearer $(cat var/api-token)` with an empty file. It read
    # "malformed Authorization header", which pointed at the header, not at the empty token (a new
    # user's run of the README, round 37).
    for header in ("Bearer", "Bearer ", "bearer  "):
        assert_error(api.post(path, body, auth=False, headers={"Authorization": header}), 401, "unauthorized",
                     r"^no token after 'Bearer': .*api-token file in TICKSTACK_HOME.*empty")
    for wrong in ("x" * len(api.token), api.token[:-1], api.token + "x", "é" * 10):
        assert_error(api.post(path, body, auth=False, headers={"Authorization": f"Bearer {wrong}"}),
                     403, "forbidden", r"^invalid token: not the one in the api-token file in TICKSTACK_HOME")
    # The token is checked before the body is even read.
    assert_error(api.post(path, raw="{not json", auth=False), 401, "unauthorized")
    assert api.counts() == before
    # The scheme is case-insensitive.
    ok = api.post(path, body, auth=False, headers={"Authorization": f"bearer {api.token}"})
    assert ok.status_code in (200, 201), ok.get_json()


# --- query parameters ------------------------------------------------------------------------------

SERIES_ROUTES = {
    "/api/ticks": {"symbol": "BTCUSD"},
    "/api/bars": {"symbol": "BTCUSD", "timeframe": "1m"},
    "/api/indicators": {"symbol": "BTCUSD", "timeframe": "1m", "name": "sma_20"},
}
BAD_PARAMS = [
    ({"symbol": "btcusd"}, r"symbol: 'btcusd' is not a symbol"),
    ({"symbol": "BTC USD"}, r"is not a symbol"),
    ({"symbol": "A" * 33}, r"is not a symbol"),
    ({"limit": "0"}, r"limit: 0 is out of range 1\.\.5000"),
    ({"limit": "5001"}, r"limit: 5001 is out of range 1\.\.5000"),
    ({"limit": "abc"}, r"limit: 'abc' is not an integer"),
    ({"limit": "1.5"}, r"limit: '1\.5' is not an integer"),
    ({"limit": "-1"}, r"limit: -1 is out of range"),
    ({"since": "abc"}, r"since: 'abc' is not epoch milliseconds"),
    ({"since": "-5"}, r"since: -5 is out of range"),
    ({"until": "9" * 30}, r"until: '9+' is not epoch milliseconds"),
    ({"since": str(T0 + 1), "until": str(T0)}, rf"since {T0 + 1} is after until {T0}"),
    ({"bogus": "1"}, r"unknown parameter 'bogus'"),
]


@pytest.mark.parametrize("route", list(SERIES_ROUTES))
def test_bad_query_parameters_are_400_with_the_reason(api: Api, route: str) -> None:
    good = SERIES_ROUTES[route]
    assert api.get(route, **good).status_code == 200
    for bad, message in BAD_PARAMS:
        assert_error(api.get(route, **{**good, **bad}), 400, "invalid_parameter", message)
    for name in good:
        assert_error(api.get(route, **{k: v for k, v in good.items() if k != name}), 400, "invalid_parameter",
                     rf"^{name}: required$")
    assert_error(api.client.get(f"{route}?symbol=BTCUSD&symbol=ETHUSD", query_string=None), 400,
                 "invalid_parameter", r"symbol: given 2 times")
    if "timeframe" in good:
        assert_error(api.get(route, **{**good, "timeframe": "2m"}), 400, "invalid_parameter",
                     r"timeframe: '2m' is not one of 1m, 5m, 1h, 1d")
    if "name" in good:
        assert_error(api.get(route, **{**good, "name": "macd"}), 400, "invalid_parameter",
                     r"name: 'macd' is not one of sma_20")
    # An empty value is absent: the default limit applies.
    assert api.get(route, **good, limit="", since="").status_code == 200


def test_bars_and_indicators_newest_limited_oldest_first(api: Api) -> None:
    bars = [{"symbol": "BTCUSD", "timeframe": "1m", "ts": T0 + i * 60_000, "open": 100.0 + i, "high": 102.0 + i,
             "low": 99.0 + i, "close": 101.0 + i, "volume": 5.0} for i in range(6)]
    bars.append({**bars[0], "timeframe": "5m"})
    values = [{"symbol": "BTCUSD", "timeframe": "1m", "name": "sma_20", "ts": T0 + i * 60_000, "value": 1.0 + i}
              for i in range(6)]
    values.append({**values[0], "name": "rsi_14", "value": 55.0})
    with WriterClient(settings=api.stack.settings, deadline=10) as writer:
        writer.call("upsert_bars", bars=bars)
        writer.call("put_indicators", values=values)

    body = api.get("/api/bars", symbol="BTCUSD", timeframe="1m").get_json()
    assert body["symbol"] == "BTCUSD" and body["timeframe"] == "1m"
    assert body["bars"][0] == {"ts": T0, "open": 100.0, "high": 102.0, "low": 99.0, "close": 101.0, "volume": 5.0}
    assert [b["ts"] for b in body["bars"]] == [T0 + i * 60_000 for i in range(6)]
    limited = api.get("/api/bars", symbol="BTCUSD", timeframe="1m", limit=2).get_json()["bars"]
    assert [b["open"] for b in limited] == [104.0, 105.0]
    ranged = api.get("/api/bars", symbol="BTCUSD", timeframe="1m", since=T0 + 60_000, until=T0 + 120_000)
    assert [b["ts"] for b in ranged.get_json()["bars"]] == [T0 + 60_000, T0 + 120_000]
    assert len(api.get("/api/bars", symbol="BTCUSD", timeframe="5m").get_json()["bars"]) == 1

    body = api.get("/api/indicators", symbol="BTCUSD", timeframe="1m", name="sma_20", limit=3).get_json()
    assert body == {"symbol": "BTCUSD", "timeframe": "1m", "name": "sma_20",
                    "values": [{"ts": T0 + i * 60_000, "value": 1.0 + i} for i in (3, 4, 5)],
                    "more": True, "next": {"until": T0 + 3 * 60_000 - 1}}
    assert api.get("/api/indicators", symbol="BTCUSD", timeframe="1m", name="rsi_14").get_json()["values"] == [
        {"ts": T0, "value": 55.0}]
    assert api.get("/api/indicators", symbol="BTCUSD", timeframe="1h", name="sma_20").get_json()["values"] == []


# --- trades -----------------------------------------------------------------------------------------------


def test_trade_lifecycle_with_live_and_realised_pnl(api: Api) -> None:
    assert api.post("/api/ticks", {"ticks": [tick(T0, 100.0, 101.0), tick(T0 + 1, 104.0, 105.0)]}).status_code == 200
    resp = api.post("/api/trades", {"symbol": "BTCUSD", "side": "buy", "size": 2, "entry_price": 100.0,
                                    "stop_loss": 90.0, "ts": T0 + 2})
    assert resp.status_code == 201, resp.get_json()
    trade = resp.get_json()
    assert resp.headers["Location"] == f"/api/trades/{trade['id']}"
    assert trade["status"] == "open" and trade["entry_price"] == 100.0 and trade["stop_loss"] == 90.0
    # Live P&L at the latest tick's bid for a buy: (104 - 100) * 2.
    assert trade["pnl"] == 8.0 and trade["pnl_kind"] == "unrealised"
    assert trade["mark"]["price"] == 104.0 and trade["mark"]["ts"] == T0 + 1
    assert [e["kind"] for e in trade["events"]] == ["opened"]

    # A sell without entry price opens at the latest bid and is marked at the ask (where it would close).
    sell = api.post("/api/trades", {"symbol": "BTCUSD", "side": "sell", "size": 1}).get_json()
    assert sell["entry_price"] == 104.0 and sell["pnl"] == -1.0 and sell["mark"]["price"] == 105.0
    assert api.post("/api/ticks", {"ticks": [tick(T0 + 3, 95.0, 96.0)]}).status_code == 200
    assert api.get(f"/api/trades/{sell['id']}").get_json()["pnl"] == 8.0  # (104 - 96) * 1
    assert api.get(f"/api/trades/{trade['id']}").get_json()["pnl"] == -10.0  # (95 - 100) * 2

    listed = api.get("/api/trades").get_json()["trades"]
    assert [t["id"] for t in listed] == [sell["id"], trade["id"]]  # newest first
    assert [t["pnl"] for t in listed] == [8.0, -10.0]

    resp = api.post(f"/api/trades/{trade['id']}/close", {"price": 110.0, "reason": "target"})
    assert resp.status_code == 200, resp.get_json()
    closed = resp.get_json()
    assert closed["status"] == "closed" and closed["exit_price"] == 110.0 and closed["close_reason"] == "target"
    assert closed["pnl"] == 20.0 and closed["pnl_kind"] == "realised" and closed["mark"] is None
    assert [e["kind"] for e in closed["events"]] == ["opened", "closed"]
    assert api.get(f"/api/trades/{trade['id']}").get_json() == closed

    before = api.counts()
    assert_error(api.post(f"/api/trades/{trade['id']}/close", {"price": 111.0}), 409, "conflict",
                 rf"trade {trade['id']} is already closed")
    assert api.counts() == before

    # Without a body: closed at the latest tick's ask for a sell.
    resp = api.client.post(f"/api/trades/{sell['id']}/close", headers=api.auth)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["exit_price"] == 96.0 and resp.get_json()["close_reason"] == "manual"

    assert [t["id"] for t in api.get("/api/trades", status="closed").get_json()["trades"]] == [sell["id"],
                                                                                               trade["id"]]
    assert api.get("/api/trades", status="open").get_json()["trades"] == []
    assert len(api.get("/api/trades", limit=1).get_json()["trades"]) == 1
    assert api.get("/api/trades", symbol="ETHUSD").get_json()["trades"] == []
    assert_error(api.get("/api/trades", status="pending"), 400, "invalid_parameter",
                 r"status: 'pending' is not one of open, closed")
    assert_error(api.get("/api/trades", limit="0"), 400, "invalid_parameter", r"limit")


def test_open_trade_without_a_tick_has_no_live_pnl(api: Api) -> None:
    trade = api.post("/api/trades", {"symbol": "ETHUSD", "side": "buy", "size": 1, "entry_price": 10.0}).get_json()
    assert trade["pnl"] is None and trade["mark"] is None and trade["pnl_kind"] == "unrealised"


BAD_TRADES = [
    ("stop above entry for a buy", {"symbol": "BTCUSD", "side": "buy", "size": 1, "entry_price": 100.0,
                                    "stop_loss": 110.0}, r"stop_loss 110\.0 must be below the entry 100\.0"),
    ("no price and no tick", {"symbol": "BTCUSD", "side": "buy", "size": 1},
     r"no price given and no tick stored for BTCUSD"),
    ("bad side", {"symbol": "BTCUSD", "side": "long", "size": 1, "entry_price": 1.0},
     r"side: 'long' is not one of buy, sell"),
    ("zero size", {"symbol": "BTCUSD", "side": "buy", "size": 0, "entry_price": 1.0}, r"size: 0(\.0)? must be > 0"),
    ("missing size", {"symbol": "BTCUSD", "side": "buy"}, r"missing field 'size'"),
    ("unknown field", {"symbol": "BTCUSD", "side": "buy", "size": 1, "leverage": 100}, r"unexpected field 'leverage'"),
    ("bad symbol", {"symbol": "btc", "side": "buy", "size": 1, "entry_price": 1.0}, r"'btc' is not a symbol"),
    ("opened in seconds", {"symbol": "BTCUSD", "side": "buy", "size": 1, "entry_price": 1.0, "ts": T0 // 1000},
     r"^ts: 1704067200 looks like a time in seconds \(2024-01-01 00:00 UTC as seconds"),
    ("integer past a float", {"symbol": "BTCUSD", "side": "buy", "size": 10**400, "entry_price": 1.0},
     r"^size: an integer too large for a number"),
]


@pytest.mark.parametrize("body,message", [c[1:] for c in BAD_TRADES], ids=[c[0] for c in BAD_TRADES])
def test_bad_trades_are_rejected_with_the_writers_reason(api: Api, body: dict[str, Any], message: str) -> None:
    before = api.counts()
    assert_error(api.post("/api/trades", body), 400, "invalid_body", message)
    assert api.counts() == before


def test_trade_bodies_nan_and_non_objects_and_unknown_ids(api: Api) -> None:
    before = api.counts()
    assert_error(api.post("/api/trades", raw='{"symbol": "BTCUSD", "side": "buy", "size": NaN}'), 400,
                 "invalid_json", "NaN")
    assert_error(api.post("/api/trades", raw="[]"), 400, "invalid_body", "JSON object")
    assert_error(api.post("/api/trades", raw="null"), 400, "invalid_body", "got null")
    assert_error(api.post("/api/trades/7/close", {"price": 1.0}), 404, "not_found", r"trade 7 does not exist")
    assert_error(api.get("/api/trades/7"), 404, "not_found", r"trade 7 does not exist")
    assert_error(api.get(f"/api/trades/{2**64}"), 404, "not_found", r"does not exist")
    assert_error(api.post(f"/api/trades/{2**64}/close"), 404, "not_found", r"does not exist")
    assert_error(api.get("/api/trades/abc"), 404, "not_found", r"no such endpoint")
    assert_error(api.get("/api/trades/7", verbose="1"), 400, "invalid_parameter", r"unknown parameter 'verbose'")
    trade = api.post("/api/trades", {"symbol": "BTCUSD", "side": "buy", "size": 1, "entry_price": 5.0}).get_json()
    after_open = api.counts()
    assert after_open["trades"] == before["trades"] + 1
    close = f"/api/trades/{trade['id']}/close"
    assert_error(api.post(close, raw='{"price": NaN}'), 400, "invalid_json", "NaN")
    assert_error(api.post(close, raw='{"price": -1}'), 400, "invalid_body", r"price: -1 is not a price")
    assert_error(api.post(close, {"price": 1.0, "trade_id": 99}), 400, "invalid_body",
                 r"unexpected field 'trade_id'; fields are price, reason")
    assert_error(api.post(close, raw="[1]"), 400, "invalid_body", "JSON object")
    assert api.counts() == after_open
    assert api.get(f"/api/trades/{trade['id']}").get_json()["status"] == "open"


def test_writes_refuse_query_parameters_and_change_nothing(api: Api) -> None:
    """A write's fields travel in its body only. A field put in the query (``?price=...``) by mistake
    is refused with the reason, as on the reads, not dropped while the write goes on without it
    (a close at the market price and reason "manual" where the caller asked for 123.45 and "tp")."""
    assert api.post("/api/ticks", {"ticks": [tick(T0)]}).status_code == 200
    trade = api.post("/api/trades", {"symbol": "BTCUSD", "side": "buy", "size": 1, "entry_price": 5.0}).get_json()
    before = api.counts()
    close = f"/api/trades/{trade['id']}/close"
    assert_error(api.post(f"{close}?price=123.45&reason=tp"), 400, "invalid_parameter",
                 r"unknown parameter 'price'; parameters are none")
    assert_error(api.post("/api/trades?size=2", {"symbol": "BTCUSD", "side": "buy", "size": 1}), 400,
                 "invalid_parameter", r"unknown parameter 'size'")
    assert_error(api.post("/api/ticks?symbol=ZZZ", {"ticks": [tick(T0 + 1)]}), 400, "invalid_parameter",
                 r"unknown parameter 'symbol'")
    assert api.counts() == before
    assert api.get(f"/api/trades/{trade['id']}").get_json()["status"] == "open"


def test_every_read_route_refuses_an_unknown_query_parameter(api: Api) -> None:
    """The one rule of query parameters (:func:`webapp.api.params.query`) on every GET route of the API's
    port: /api/health, /api/openapi.json and /metrics answered 200 to ``?x=1`` while the others refused it."""
    routes = [rule.rule for rule in api.app.url_map.iter_rules()
              if "GET" in (rule.methods or ()) and rule.rule.startswith(("/api", "/metrics"))]
    assert {"/api/health", "/api/openapi.json", "/metrics", "/api/ticks"} <= set(routes)
    for route in routes:
        path = re.sub(r"<[^>]+>", "1", route)
        assert_error(api.client.get(f"{path}?x=1"), 400, "invalid_parameter", r"^unknown parameter 'x'; parameters")
    for path in ("/api/health", "/api/openapi.json", "/metrics"):
        assert_error(api.client.get(f"{path}?x=1"), 400, "invalid_parameter", r"parameters are none$")
        assert api.client.get(path).status_code == 200


# --- errors of Flask's own, outside the routes ------------------------------------------------------------


def test_unknown_routes_and_methods_answer_json_under_api_and_metrics_only(api: Api) -> None:
    assert_error(api.get("/api/nope"), 404, "not_found", r"no such endpoint: /api/nope")
    assert_error(api.get("/api"), 404, "not_found")
    assert_error(api.get("/metrics/extra"), 404, "not_found")
    resp = api.client.delete("/api/ticks")
    assert_error(resp, 405, "method_not_allowed", r"DELETE is not allowed on /api/ticks")
    assert set(resp.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert_error(api.client.post("/api/health"), 405, "method_not_allowed")
    assert_error(api.client.post("/metrics"), 405, "method_not_allowed")
    # The API-only app answers JSON at every path (issue 9: its port is JSON everywhere); where the
    # console is served too, the console's paths keep Flask's own HTML errors.
    assert_error(api.client.get("/nope"), 404, "not_found", r"no such endpoint: /nope")
    both = create_app("all", load_settings(api.stack.env)).test_client()
    assert both.get("/console/nope").mimetype == "text/html"
    assert both.post("/console/health").mimetype == "text/html"
    assert_error(both.get("/api/nope"), 404, "not_found")


# --- writer down --------------------------------------------------------------------------------------------


def test_writer_down_gives_503_with_retry_after_quickly_and_reads_keep_working(api: Api) -> None:
    assert api.post("/api/ticks", {"ticks": [tick(T0)]}).status_code == 200
    api.stack.stop(api.stack.procs[0])
    before = api.counts()
    resp = api.post("/api/ticks", {"ticks": [tick(T0 + 1)]})
    # Stopped (nobody holds its lock), not restarting: it said "it may be restarting" (round 40).
    # Answered at the API's own writer deadline (5 s), which it names, not at the client's.
    assert_error(resp, 503, "writer_unavailable", r"did not answer within 5 s \(no writer is running: it is "
                 r"stopped, and an operator must start it\)")
    assert resp.headers["Retry-After"] == "5"
    assert_error(api.post("/api/trades", {"symbol": "BTCUSD", "side": "buy", "size": 1, "entry_price": 1.0}),
                 503, "writer_unavailable")
    # Bad input is still refused as bad input, before the writer is asked (it would have been a 503).
    assert_error(api.post("/api/ticks", {"ticks": [tick(T0, 2.0, 1.0)]}), 400, "invalid_body")
    assert api.counts() == before
    # Reads do not need the writer.
    assert len(api.get("/api/ticks", symbol="BTCUSD").get_json()["ticks"]) == 1
    health = api.get("/api/health")
    assert health.status_code == 503
    assert health.get_json()["status"] == "unavailable" and health.get_json()["writer"]["up"] is False
    samples = metric_samples(api.get("/metrics").get_data(as_text=True))
    assert samples["tickstack_writer_up"][0].value == 0.0
    assert "tickstack_writer_queue_depth" not in samples

    api.stack.start_writer()
    assert api.post("/api/ticks", {"ticks": [tick(T0 + 1)]}).get_json() == {"inserted": 1, "duplicates": 0}
    assert api.get("/api/health").status_code == 200


# --- health, metrics, openapi -----------------------------------------------------------------------------------


def test_health_reports_writer_database_and_missing_circus(api: Api) -> None:
    resp = api.get("/api/health")
    assert resp.status_code == 200
    assert resp.headers["X-Content-Type-Options"] == "nosniff" and resp.headers["X-Frame-Options"] == "DENY"
    body = resp.get_json()
    assert body["status"] == "ok"
    assert body["writer"]["up"] is True and body["writer"]["pid"] == api.stack.procs[0].pid
    assert body["writer"]["ping_ms"] >= 0 and "queue_depth" in body["writer"]["stats"]
    db_health = body["database"]
    if api.stack.settings.database_path is not None:
        assert db_health["journal_mode"] == "wal" and db_health["size_bytes"] > 0 and db_health["lock_errors"] == 0
    else:  # a server: where it is and that it answers, never who logs in
        assert db_health["dialect"] == "postgresql" and db_health["reachable"] is True
        assert db_health["size_bytes"] > 0 and db_health["connections"] >= 1 and "path" not in db_health
        assert "ts_owner" not in resp.get_data(as_text=True) and "ts_reader" not in resp.get_data(as_text=True)
    # The body is what the OpenAPI document says, on either database (no field it does not list).
    Draft202012Validator(openapi_module.document()["components"]["schemas"]["Health"]).validate(body)
    assert body["circus"] == {"reachable": False, "watchers": {}, "processes": {}, "down": {},
                              "error": body["circus"]["error"]} and "not running" in body["circus"]["error"]


def test_metrics_expose_requests_by_route_and_stack_gauges(api: Api) -> None:
    api.post("/api/ticks", {"ticks": [tick(T0)]})
    trade = api.post("/api/trades", {"symbol": "BTCUSD", "side": "buy", "size": 1, "entry_price": 1.0}).get_json()
    api.get(f"/api/trades/{trade['id']}")
    api.get("/api/trades/999")
    api.get("/api/nowhere")
    resp = api.get("/metrics")
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    samples = metric_samples(resp.get_data(as_text=True))
    requests = {(s.labels["route"], s.labels["method"], s.labels["status"]): s for s in
                samples["tickstack_http_requests_total"]}
    assert requests[("/api/ticks", "POST", "200")].value == 1
    assert requests[("/api/trades/<int:trade_id>", "GET", "200")].value == 1
    assert requests[("/api/trades/<int:trade_id>", "GET", "404")].value == 1
    assert requests[("unmatched", "GET", "404")].value == 1
    assert not any(str(trade["id"]) in route for route, _, _ in requests)  # ids never become labels
    # No worker label (issue 9): under gunicorn the workers' counts are merged (tests/test_metrics.py).
    assert not any("worker" in s.labels for s in samples["tickstack_http_requests_total"])
    buckets = [s for s in samples["tickstack_http_request_duration_seconds_bucket"]
               if s.labels["route"] == "/api/ticks" and s.labels["le"] == "+Inf"]
    assert buckets and buckets[0].value == 1
    assert samples["tickstack_writer_up"][0].value == 1.0
    assert samples["tickstack_writer_queue_depth"][0].value == 0.0
    assert samples["tickstack_writer_commit_p50_seconds"][0].value > 0
    assert samples["tickstack_writer_commit_p99_seconds"][0].value >= samples[
        "tickstack_writer_commit_p50_seconds"][0].value
    assert {s.labels["result"] for s in samples["tickstack_writer_requests_total"]} == {"ok", "failed", "busy"}
    assert samples["tickstack_writer_ticks_inserted_total"][0].value >= 1
    assert samples["tickstack_database_size_bytes"][0].value > 0
    if api.stack.settings.database_path is not None:  # SQLite's WAL file
        assert samples["tickstack_wal_size_bytes"][0].value >= 0
    else:  # a server: up, and its sessions by application (ours are all named)
        assert samples["tickstack_database_up"][0].value == 1.0
        assert "tickstack_wal_size_bytes" not in samples
        assert any(s.labels["application"].startswith("tickstack ") for s in
                   samples["tickstack_database_connections"])
    assert samples["tickstack_circus_up"][0].value == 0.0
    assert "tickstack_watcher_up" not in samples  # no circus, no watchers
    # Scrapes of /metrics are counted too, and an app's registry is its own.
    other = create_app("api", load_settings(api.stack.env)).test_client()
    other_samples = metric_samples(other.get("/metrics").get_data(as_text=True))
    assert "tickstack_http_requests_total" not in other_samples
    openmetrics = api.client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.mimetype == "application/openmetrics-text"


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def test_openapi_document_matches_the_routes(api: Api) -> None:
    resp = api.get("/api/openapi.json")
    assert resp.status_code == 200
    doc = resp.get_json()
    assert doc["openapi"].startswith("3.1") and doc == openapi_module.document()
    routes: dict[str, set[str]] = {}
    for rule in api.app.url_map.iter_rules():
        if rule.rule.startswith(("/api", "/metrics")):
            routes.setdefault(_openapi_path(rule.rule), set()).update(
                m.lower() for m in (rule.methods or ()) if m not in ("HEAD", "OPTIONS"))
    documented = {path: set(ops) - {"parameters", "summary", "description"} for path, ops in doc["paths"].items()}
    assert documented == routes

    def resolve(ref: str) -> Any:
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(node["$ref"])  # raises KeyError if dangling
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            params = [resolve(p["$ref"]) if "$ref" in p else p for p in op.get("parameters", [])]
            assert {p["name"] for p in params if p["in"] == "path"} == set(re.findall(r"{(\w+)}", path)), path
            assert op["responses"], (path, method)
            assert ("security" in op) == (method == "post"), (path, method)


def test_openapi_document_is_valid_openapi_3_1() -> None:
    validate_openapi(openapi_module.document())  # raises OpenAPIValidationError with the path of what is wrong


#: Each write (POST) route: the op it calls, the op fields it takes from the path, and the op
#: fields it does not take at all (close_trade's ts and last_tick_id are the monitor's).
WRITE_OPS = {
    "insertTicks": ("insert_ticks", set(), set()),
    "openTrade": ("open_trade", set(), set()),
    "closeTrade": ("close_trade", {"trade_id"}, {"ts", "last_tick_id"}),
}


def test_openapi_write_bodies_list_exactly_the_fields_of_their_op() -> None:
    doc = openapi_module.document()

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = doc
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    posts = {op["operationId"]: op for path_ops in doc["paths"].values()
             for method, op in path_ops.items() if method == "post"}
    assert set(posts) == set(WRITE_OPS)
    for operation_id, (op_name, from_path, withheld) in WRITE_OPS.items():
        fields = OPS[op_name].fields
        assert not any(fields[f][1] for f in withheld), (operation_id, "a required op field must be taken")
        schema = resolve(posts[operation_id]["requestBody"]["content"]["application/json"]["schema"])
        body_fields = set(schema["properties"])
        path_params = {resolve(p)["name"] for p in posts[operation_id].get("parameters", [])
                       if resolve(p)["in"] == "path"}
        assert path_params == from_path, operation_id
        assert body_fields | from_path == set(fields) - withheld, operation_id
        assert not body_fields & from_path, operation_id
        required = {name for name, (_, is_required) in fields.items() if is_required}
        assert set(schema.get("required", [])) == required - from_path, operation_id
        assert schema.get("additionalProperties") is False, operation_id


# --- a real circusd, for watcher status (the circusd fixture is in conftest.py) ---------------------------------


def test_health_and_metrics_report_circus_watchers(circusd: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TICKSTACK_API_TOKEN", raising=False)
    client = create_app("api", load_settings(circusd.env)).test_client()
    resp = client.get("/api/health")
    assert resp.status_code == 200  # the writer is up; a stopped watcher degrades, it does not fail
    body = resp.get_json()
    assert body["circus"]["reachable"] is True and "error" not in body["circus"]
    watchers = body["circus"]["watchers"]
    assert watchers["sleeper"] == "active" and watchers["idle"] == "stopped"
    assert not any(name.startswith("plugin:") for name in watchers)
    assert body["status"] == "degraded"
    # Each watcher that is down is named, with what is wrong (real stack: tests/test_metrics.py).
    assert body["circus"]["down"] == {"idle": "stopped"}
    processes = body["circus"]["processes"]
    assert set(processes) == set(watchers) and (processes["sleeper"], processes["idle"]) == (1, 0)
    Draft202012Validator(openapi_module.document()["components"]["schemas"]["Health"]).validate(body)
    samples = metric_samples(client.get("/metrics").get_data(as_text=True))
    up = {s.labels["watcher"]: s.value for s in samples["tickstack_watcher_up"]}
    assert up == {name: 1.0 if status == "active" else 0.0 for name, status in watchers.items()}
    assert up["sleeper"] == 1.0 and up["idle"] == 0.0
    running = {s.labels["watcher"]: s.value for s in samples["tickstack_watcher_processes"]}
    assert running == {name: float(n) for name, n in processes.items()}
    assert samples["tickstack_circus_up"][0].value == 1.0
