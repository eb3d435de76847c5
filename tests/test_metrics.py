"""``/metrics`` under the real stack (issue 9, point 6): the real ``circusd circus.ini`` runs the
API under real gunicorn with two workers, and one scrape counts the requests of both
(prometheus-client's multiprocess mode, set up by ``webapp.gunicorn_conf``). Counted per worker,
each scrape showed the worker that answered it, so Prometheus series came and went."""
from __future__ import annotations

import http.client
import json
import os
import signal
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from testkit.circus import WATCHERS, CircusStack
from testkit.helpers import wait_for

#: Every test here: counts of requests no database serves, and circus's watchers (tests/conftest.py).
pytestmark = pytest.mark.database_independent(
    "the counts of requests that read no database, across gunicorn's workers and masters, and circus's "
    "watchers are the same whatever the database")

ROUTE = "/api/openapi.json"  # no writer call, and nothing else in the stack requests it


@pytest.fixture(scope="module")
def live() -> Iterator[CircusStack]:
    stack = CircusStack()
    try:
        stack.start()
        wait_for("the API to answer", lambda: get(stack.api_port, "/api/health")[0] == 200)
        yield stack
    finally:
        stack.close()


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    """(status, content type, body) of one request on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


def requests_counted(port: int, route: str) -> float:
    """The sum of tickstack_http_requests_total{route, GET, 200} over every series of one scrape."""
    status, _, body = get(port, "/metrics")
    assert status == 200
    return sum(s.value for family in text_string_to_metric_families(body.decode())
               for s in family.samples
               if s.name == "tickstack_http_requests_total" and s.labels.get("route") == route
               and s.labels.get("method") == "GET" and s.labels.get("status") == "200")


def send(port: int, n: int) -> int:
    """``n`` requests of :data:`ROUTE` from 8 threads at once, so both workers take some."""
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: get(port, ROUTE)[0], range(n)))
    assert statuses == [200] * n
    return n


def send_until_each_took_some(port: int, counts: Callable[[], dict[int, float]]) -> tuple[int, dict[int, float]]:
    """Requests of :data:`ROUTE` in rounds of 100 until each process of ``counts()`` (pid -> requests
    it counted) took some, for up to 60 s; (requests sent, the last counts). Which worker takes a
    connection is the kernel's choice: on a loaded machine one took all of a first 400."""
    n, deadline = 0, time.monotonic() + 60
    while True:
        n += send(port, 100)
        by_pid = counts()
        if (by_pid and all(by_pid.values())) or time.monotonic() > deadline:
            break
    assert by_pid and all(by_pid.values()), f"not every process took one of {n} requests in 60 s: {by_pid}"
    return n, by_pid


def api_master(stack: CircusStack) -> psutil.Process:
    (pid,) = stack.pids_of("api")
    return psutil.Process(pid)


def api_workers(stack: CircusStack) -> set[int]:
    return {p.pid for p in api_master(stack).children()}


def counted_by_file(folder: Path, route: str) -> dict[int, float]:
    """Worker pid -> requests of ``route`` in its own counter file (read with prometheus_client)."""
    out = {}
    for path in folder.glob("counter_*.db"):
        pid = int(path.stem.removeprefix("counter_"))
        out[pid] = sum(s.value for m in MultiProcessCollector.merge([str(path)]) for s in m.samples
                       if s.name == "tickstack_http_requests_total" and s.labels.get("route") == route)
    return out


def test_one_scrape_counts_the_requests_of_every_worker(live: CircusStack) -> None:
    port = live.api_port
    workers = api_workers(live)
    assert len(workers) == 2
    # Both workers really serve some (else the sum below would prove nothing), each in its own file
    # in the master's folder, private to the user.
    folder = live.home / "run" / "metrics" / str(api_master(live).pid)
    n, by_worker = send_until_each_took_some(port, lambda: {w: counted_by_file(folder, ROUTE).get(w, 0)
                                                            for w in workers})
    assert requests_counted(port, ROUTE) == n  # one scrape, both workers' requests
    assert set(counted_by_file(folder, ROUTE)) == workers
    assert sum(by_worker.values()) == n
    for path in (folder.parent, folder):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())

    # A worker that dies keeps its counts in the totals: counters never go down while the API runs.
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    wait_for("gunicorn to replace the worker", lambda: len(api_workers(live) - workers) == 1, timeout=60)
    m = send(port, 100)
    assert requests_counted(port, ROUTE) == n + m


def test_the_api_restarts_its_counts_from_zero_in_a_new_folder(live: CircusStack) -> None:
    port = live.api_port
    old_master = api_master(live).pid
    send(port, 20)
    assert requests_counted(port, ROUTE) >= 20
    # --waiting, as every restart the stack prints: without it circusctl answers at once, and the old
    # master, still finishing its graceful stop, answered the health check (seen on a loaded machine).
    done = live.circusctl("restart", "api", "--waiting")
    assert done.returncode == 0, done.stdout + done.stderr
    new_master = wait_for("a new api master", lambda: (pid := api_master(live).pid) != old_master and pid)
    wait_for("the restarted API to answer", lambda: get(port, "/api/health")[0] == 200)
    assert requests_counted(port, ROUTE) == 0
    # One folder per gunicorn master that runs (the API's and the console's); the old one is gone.
    (console_master,) = live.pids_of("console")
    names = {p.name for p in (live.home / "run" / "metrics").iterdir()}
    assert names == {str(new_master), str(console_master)}
    assert send(port, 30) == requests_counted(port, ROUTE)


def test_every_scrape_counts_the_requests_of_every_api_master(live: CircusStack) -> None:
    """``circusctl incr api`` (the console's +1 process) runs a second gunicorn master on the API's
    port, with a folder of its own: a scrape showed the counts of the master whose worker took it,
    so the totals jumped down and up from scrape to scrape. A scrape merges the folders of every
    master that runs."""
    port = live.api_port
    base = requests_counted(port, ROUTE)
    done = live.circusctl("incr", "api", "--waiting")
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        wait_for("two API masters with their workers", lambda: len(live.pids_of("api")) == 2 and all(
            len(psutil.Process(pid).children()) == 2 for pid in live.pids_of("api")), timeout=60)
        # A new worker is a child of its master before it accepts (it still imports the app).
        n, by_master = send_until_each_took_some(port, lambda: {
            pid: sum(counted_by_file(live.home / "run" / "metrics" / str(pid), ROUTE).values())
            for pid in live.pids_of("api")})
        assert sum(by_master.values()) == base + n, by_master
        totals = [requests_counted(port, ROUTE) for _ in range(30)]
        assert set(totals) == {base + n}, (totals, by_master)
    finally:
        done = live.circusctl("decr", "api", "--waiting")
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for("one API master again", lambda: len(live.pids_of("api")) == 1, timeout=60)


def test_the_api_port_answers_json_errors_at_every_path(live: CircusStack) -> None:
    port = live.api_port
    for method, path, status in (("GET", "/", 404), ("GET", "/api/nope", 404), ("GET", "/metrics/extra", 404),
                                 ("POST", "/metrics", 405), ("DELETE", "/api/ticks", 405)):
        code, content_type, body = get(port, path, method)
        assert (code, content_type) == (status, "application/json"), (method, path, code, content_type, body[:200])
        assert b'"error"' in body


def test_made_up_methods_are_counted_under_one_label(live: CircusStack) -> None:
    """Each made-up method (``QZXWV /api/health``, no token needed) was a label of its own: 2,000 of
    them took the metrics' files from 274 KB to 11 MB and a scrape to 1.5 s, without end (a security
    review, round 41). The known methods keep their names; any other is ``other``."""
    port = live.api_port
    made_up = [f"X{i:04d}QZ" for i in range(40)]
    for method in made_up:
        assert get(port, "/api/health", method)[0] == 405
    status, _, body = get(port, "/metrics")
    assert status == 200
    methods = {s.labels["method"] for family in text_string_to_metric_families(body.decode())
               for s in family.samples if s.name == "tickstack_http_requests_total"}
    assert "other" in methods and "GET" in methods and not methods & set(made_up), methods


# --- a watcher without its processes is down (a new user's finding) ---------------------------------------------


def health(port: int) -> tuple[int, dict]:
    """(HTTP status, body) of ``/api/health``."""
    status, _, body = get(port, "/api/health")
    return status, json.loads(body)


def watcher_gauges(port: int) -> dict[str, dict[str, float]]:
    """``tickstack_watcher_*`` sample name -> {watcher: value} of one scrape."""
    status, _, body = get(port, "/metrics")
    assert status == 200
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name.startswith("tickstack_watcher_"):
                out.setdefault(s.name, {})[s.labels["watcher"]] = s.value
    return out


def test_a_watcher_stopped_or_without_its_processes_is_down_in_health_and_metrics(live: CircusStack) -> None:
    """``circusctl decr analysis`` to 0 left circus calling analysis ``active`` with no process, and
    ``circusctl stop analysis`` (as the flapping plugin stops a watcher) left it stopped: /api/health
    said ``ok`` (or a bare ``degraded``) and ``tickstack_watcher_up{watcher="analysis"}`` read 1.
    A watcher is up only when active with at least the processes circus was asked for, at least one;
    health names each one that is not (200 still: the writer answers, the stack is degraded)."""
    port = live.api_port
    wait_for("health ok", lambda: health(port)[1]["status"] == "ok")
    code, body = health(port)
    assert code == 200
    assert watcher_gauges(port)["tickstack_watcher_up"] == {w: 1.0 for w in WATCHERS}
    try:
        done = live.circusctl("decr", "analysis")
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for("analysis to have no process", lambda: live.status()["analysis"] == "active"
                 and live.pids_of("analysis") == [])
        code, body = health(port)
        assert (code, body["status"]) == (200, "degraded"), body
        assert body["circus"]["watchers"]["analysis"] == "active"  # circus's own word, as circus says it
        assert body["circus"]["down"] == {"analysis": "0 of 1 processes (circus was asked for 0)"}, body
        assert body["circus"]["processes"]["analysis"] == 0
        gauges = watcher_gauges(port)
        assert gauges["tickstack_watcher_up"] == {w: 0.0 if w == "analysis" else 1.0 for w in WATCHERS}
        assert gauges["tickstack_watcher_processes"]["analysis"] == 0.0

        done = live.circusctl("incr", "analysis")
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for("health ok again", lambda: health(port)[1]["status"] == "ok")
        assert health(port)[1]["circus"]["down"] == {}
        gauges = watcher_gauges(port)
        assert gauges["tickstack_watcher_up"] == {w: 1.0 for w in WATCHERS}
        assert gauges["tickstack_watcher_processes"] == {w: 1.0 for w in WATCHERS}

        done = live.circusctl("stop", "analysis")
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for("analysis stopped", lambda: live.status()["analysis"] == "stopped")
        code, body = health(port)
        assert (code, body["status"]) == (200, "degraded"), body
        assert body["circus"]["down"] == {"analysis": "stopped"}, body
        assert body["circus"]["processes"]["analysis"] == 0
        gauges = watcher_gauges(port)
        assert gauges["tickstack_watcher_up"]["analysis"] == 0.0
        assert gauges["tickstack_watcher_processes"]["analysis"] == 0.0
    finally:  # the module's stack as the other tests expect it: analysis running one process
        if live.status().get("analysis") != "active":
            live.circusctl("start", "analysis")
        if not live.pids_of("analysis"):
            live.circusctl("incr", "analysis")
    wait_for("health ok at the end", lambda: health(port)[1]["status"] == "ok")
    assert watcher_gauges(port)["tickstack_watcher_up"] == {w: 1.0 for w in WATCHERS}
