"""A page per watcher, signals and restart-all from the console (issue 12, part B), on the real
stack under circusd (:class:`testkit.circus.CircusStack`, one for the module, with a secret or two
in its environment) through Flask's test client, CSRF on as in production.

* the page shows the command line, each process (a gunicorn master and its workers apart), the
  environment without a secret, the flapping plugin's state and the watcher's last log lines;
* a signal sent from the console reaches the process: SIGHUP makes the api's gunicorn master log
  it, SIGTERM makes the ticks worker's handler log it (with its pid) and exit, SIGKILL ends a
  monitor process; each asks first, and is one audit row;
* restart-all asks first, then restarts every watcher once (every pid changes), one audit row;
* a watcher circus lost (a reloadconfig of a broken circus.ini) is a row, missing, with what to do.

Tests run in file order on the shared stack; processes are told apart by pid only.
"""
from __future__ import annotations

import html
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from db.client import WriterClient
from db.config import load_settings
from supervision.circus import WatcherState
from supervision.procstats import takes_default_action
from testkit.circus import WATCHERS, Circusd, CircusStack
from testkit.env import ROOT, free_port, isolated_env, new_home, remove_home
from testkit.gunicorn import get_json
from testkit.helpers import ConsoleClient, query, wait_for
from webapp import create_app
from webapp.console.watcher_page import command_line, flapping_state, safe_environment
from webapp.console.watchers import NO_PROCESSES, shown_state

#: The tests of this module whose promise is the same whatever the database (tests/conftest.py).
DATABASE_INDEPENDENT = pytest.mark.database_independent(
    "a watcher's page shows what circus and psutil say of its processes, and signals go through circus")

SECRET_TOKEN = "tok-4f1d9c-never-shown"
SECRET_PASSWORD = "hunter2-never-shown"


Console = ConsoleClient  # the name the tests (and their importers) use


def audit_rows(settings: Any, since: int, action: str) -> list[tuple]:
    return query(settings, "SELECT action, target, result, detail FROM audit_log WHERE id > ? AND action = ? "
                           "ORDER BY id", (since, action))


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie not yet reaped by circus has)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def last_audit_id(settings: Any) -> int:
    return query(settings, "SELECT coalesce(max(id), 0) FROM audit_log")[0][0]


@pytest.fixture(scope="module")
def cstack() -> Iterator[CircusStack]:
    stack = CircusStack(TICKSTACK_SAMPLE_EVERY_S="1", TICKSTACK_API_TOKEN=SECRET_TOKEN, BROKER_PASSWORD=SECRET_PASSWORD,
                        EXTRA_SERVICE_URL=f"https://svc:{SECRET_PASSWORD}@example.invalid/x")
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def console(cstack: CircusStack) -> Console:
    return Console.logged_in(create_app("console", cstack.settings))


@DATABASE_INDEPENDENT
def test_a_watchers_page_shows_its_processes_command_and_environment_without_secrets(
        console: Console, cstack: CircusStack) -> None:
    (master,) = cstack.pids_of("api")
    workers = wait_for("the api's two workers", lambda: [c.pid for c in psutil.Process(master).children()]
                       if len(psutil.Process(master).children()) == 2 else None, timeout=60)
    page = console.get("/console/watchers/api")
    assert page.status_code == 200
    text = html.unescape(page.text)
    assert "gunicorn --bind fd://" in text and "webapp:create_app('api')" in text
    assert f'data-pid="{master}"' in page.text and "gunicorn master" in text
    for pid in workers:
        assert f'data-pid="{pid}"' in page.text
    assert text.count("gunicorn worker") >= 2
    # The environment: what circus gives the processes, secrets hidden.
    assert "TICKSTACK_HOME" in text and str(cstack.home) in text
    assert SECRET_TOKEN not in text and SECRET_PASSWORD not in text
    assert "TICKSTACK_API_TOKEN" in text and "BROKER_PASSWORD" in text and "EXTRA_SERVICE_URL" in text
    assert "not a setting of tickstack's" in text and "example.invalid" not in text  # not ours: its value hidden
    assert 'data-flapping="calm"' in page.text
    # circus's max_retry (5 by default: failed starts) beside the flapping plugin's 3 read as two answers
    # to one question (a new user's run-through): the page says which is which.
    assert re.search(r"<dt>max_retry</dt><dd class=\"mono\">\d+ <span[^>]*>\(circus's: failed starts only; a crash "
                     r"loop is the flapping plugin's", page.text), page.text
    assert "Booting worker" in text  # its last log lines
    listing = console.get("/console/watchers").text
    assert 'href="/console/watchers/api"' in listing
    assert '<strong>flapping</strong> <span class="pill pill-active">active</span>' in listing  # the plugins
    r = console.get("/console/watchers/nosuch")
    assert r.status_code == 404 and "no watcher named 'nosuch'" in html.unescape(r.text)
    r = console.get("/console/watchers/plugin:flapping")
    assert r.status_code == 404


def test_a_watchers_cpu_and_memory_history_and_the_database_holders_named_by_watcher(
        console: Console, cstack: CircusStack) -> None:
    page = console.get("/console/watchers/api")
    assert 'data-src="/console/api/series?label=api"' in page.text  # its charts: this watcher's lines only
    def api_only() -> list[dict] | None:
        got = console.get("/console/api/series?label=api&name=watcher.cpu_percent&name=watcher.rss_bytes").json
        return got["series"] if len(got["series"]) == 2 else None
    series = wait_for("the api's samples", api_only, timeout=60)
    assert {(s["name"], s["label"]) for s in series} == {("watcher.cpu_percent", "api"), ("watcher.rss_bytes", "api")}
    assert console.get("/console/api/series?label=a%20b&name=watcher.cpu_percent").status_code == 400
    # The processes holding the database open, each named by its watcher (the api's gunicorn and
    # the console's are told apart), linked to the watcher's page. On a server: its sessions by
    # application_name, the api's and the console's apart, linked the same way.
    if cstack.settings.database_path is None:
        def sessions() -> str | None:
            assert get_json(cstack.api_port, "/api/bars?symbol=BTCUSD&timeframe=1m")[0] == 200  # an api worker reads
            card = console.get("/console/database").text.split("data-server", 1)[1].split("</dl>", 1)[0]
            return card if re.search(r'href="/console/watchers/api">tickstack api on ', card) else None
        card = wait_for("the api's sessions on the server", sessions, timeout=60)
        assert re.search(r'href="/console/watchers/writer">tickstack writer on ', card), card
        assert re.search(r'href="/console/watchers/console">tickstack console on ', card), card
        return
    (api_master,) = cstack.pids_of("api")

    def holders() -> str | None:
        assert get_json(cstack.api_port, "/api/bars?symbol=BTCUSD&timeframe=1m")[0] == 200  # an api worker reads
        table = console.get("/console/database").text.split("Processes holding the database open", 1)[1]
        table = table.split("</table>", 1)[0]
        return table if f'href="/console/watchers/api">api (worker of {api_master})</a>' in table else None
    table = wait_for("an api worker among the holders", holders, timeout=60)
    assert 'href="/console/watchers/writer">writer</a>' in table


@DATABASE_INDEPENDENT
def test_sighup_from_the_console_reaches_the_api_master(console: Console, cstack: CircusStack) -> None:
    (master,) = cstack.pids_of("api")
    # A process circus calls active may not have set its handlers yet: HUP would end it.
    wait_for("the api's master serving", lambda: f"[{master}] [INFO] Listening at" in cstack.log("api"), timeout=60)
    since = last_audit_id(cstack.settings)
    before = cstack.log("api").count("Handling signal: hup")
    ask = console.post("/console/watchers/api/signal", {"signal": "HUP"})
    assert ask.status_code == 200 and 'name="confirm" value="yes"' in ask.text and f"{master}" in ask.text
    assert audit_rows(cstack.settings, since, "watcher.signal") == []
    r = console.post("/console/watchers/api/signal", {"signal": "HUP", "confirm": "yes"})
    assert r.status_code == 303 and r.headers["Location"] == "/console/watchers/api"
    wait_for("gunicorn's master to log the HUP", lambda: re.search(
        rf"\[{master}\] \[INFO\] Handling signal: hup", cstack.log("api")) and
        cstack.log("api").count("Handling signal: hup") == before + 1, timeout=60)
    assert cstack.pids_of("api") == [master]  # HUP reloads the workers, the master stays
    ((action, target, result, detail),) = audit_rows(cstack.settings, since, "watcher.signal")
    assert (action, target, result) == ("watcher.signal", "api", "ok") and f"SIGHUP to api (pid {master})" in detail


@DATABASE_INDEPENDENT
def test_sighup_to_a_gunicorn_master_still_starting_is_refused_not_sent(console: Console, cstack: CircusStack) -> None:
    """circus calls a gunicorn master active as soon as it runs; until the master sets its handlers,
    HUP's default action ends it. The console sent it anyway ("Sent SIGHUP", the master dead, circus
    starting another): it refuses now and says why. A real gunicorn master held before its handlers
    by its own ``on_starting`` hook, added to circus for this test."""
    config, held = cstack.home / "held-gunicorn.py", cstack.home / "held-gunicorn.in-hook"
    config.write_text(f"import pathlib, time\n\ndef on_starting(server):\n    pathlib.Path({str(held)!r}).touch()\n"
                      "    time.sleep(300)\n")
    gunicorn = Path(sys.executable).parent / "gunicorn"
    cstack.call("add", name="heldapi", cmd=f"{gunicorn} -c {config} --bind 127.0.0.1:{free_port()} nothing:app",
                start=True)
    try:
        (master,) = wait_for("the held master", lambda: cstack.pids_of("heldapi"), timeout=30)
        wait_for("the master in its on_starting hook", held.exists, timeout=30)
        assert takes_default_action(master, signal.SIGHUP) is True
        since = last_audit_id(cstack.settings)
        # The confirmation page says so before the operator confirms, not only the answer after.
        ask = html.unescape(console.post("/console/watchers/heldapi/signal", {"signal": "HUP"}).text)
        assert f"heldapi's gunicorn master (pid {master}) is still starting" in ask, ask[-3000:]
        r = console.post("/console/watchers/heldapi/signal", {"signal": "HUP", "confirm": "yes"})
        assert r.status_code == 303 and r.headers["Location"] == "/console/watchers/heldapi"
        page = html.unescape(console.get(r.headers["Location"]).text)
        assert f"SIGHUP not sent: heldapi's gunicorn master (pid {master}) is still starting" in page, page[-3000:]
        # A refusal after a confirmed action is in the audit log too, as not done.
        ((action, target, result, detail),) = audit_rows(cstack.settings, since, "watcher.signal")
        assert (action, target, result) == ("watcher.signal", "heldapi", "skipped"), (result, detail)
        assert f"SIGHUP not sent: heldapi's gunicorn master (pid {master}) is still starting" in detail
        time.sleep(0.5)  # a HUP sent would have ended it by now (its default action, at once)
        assert psutil.Process(master).status() != psutil.STATUS_ZOMBIE
        assert cstack.pids_of("heldapi") == [master]
        # A running master (the stack's own) catches it: the console's rule tells the two apart.
        wait_for("the stack's api master to catch HUP", lambda: takes_default_action(
            cstack.pids_of("api")[0], signal.SIGHUP) is False, timeout=60)
    finally:
        cstack.call("rm", name="heldapi", waiting=True)


@DATABASE_INDEPENDENT
def test_a_signal_takes_its_default_action_only_in_a_process_that_neither_catches_nor_ignores_it() -> None:
    """The console's rule for a HUP it refuses (:func:`supervision.procstats.takes_default_action`), on
    real processes: one that has set no handler, one that catches HUP, one that ignores it (``nohup``);
    a zombie has ended (its masks read empty): not told."""
    wait = "print('ready', flush=True); time.sleep(120)"
    code = {"default": f"import time; {wait}",
            "caught": f"import signal, time; signal.signal(signal.SIGHUP, lambda *_: None); {wait}",
            "ignored": f"import signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); {wait}"}
    procs = {k: subprocess.Popen([sys.executable, "-c", c], stdout=subprocess.PIPE, text=True) for k, c in code.items()}
    try:
        for proc in procs.values():
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        seen = {k: takes_default_action(proc.pid, signal.SIGHUP) for k, proc in procs.items()}
        assert seen == {"default": True, "caught": False, "ignored": False}, seen
        # Python catches SIGINT itself (KeyboardInterrupt) and leaves SIGTERM to its default action.
        assert {takes_default_action(proc.pid, signal.SIGINT) for proc in procs.values()} == {False}
        assert {takes_default_action(proc.pid, signal.SIGTERM) for proc in procs.values()} == {True}
        ended = procs["default"]
        ended.kill()  # not reaped yet: a zombie
        wait_for("a zombie", lambda: psutil.Process(ended.pid).status() == psutil.STATUS_ZOMBIE, timeout=30)
        assert takes_default_action(ended.pid, signal.SIGHUP) is None
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(30)


@DATABASE_INDEPENDENT
def test_sigterm_reaches_the_ticks_workers_handler_and_circus_replaces_it(console: Console, cstack: CircusStack
                                                                          ) -> None:
    (old,) = cstack.pids_of("ticks")
    since = last_audit_id(cstack.settings)
    r = console.post("/console/watchers/ticks/signal", {"signal": "TERM", "pid": str(old), "confirm": "yes"})
    assert r.status_code == 303
    assert gone(old)  # the console waited for it
    # Its own handler wrote it down (circus copies the output into the file as it reads it).
    wait_for("the handler's line", lambda: f"[{old}] ticks: SIGTERM received" in cstack.log("ticks"), timeout=30)
    new = wait_for("a new ticks process", lambda: [p for p in cstack.pids_of("ticks") if p != old], timeout=60)
    assert new and old not in new
    ((_, target, result, detail),) = audit_rows(cstack.settings, since, "watcher.signal")
    assert (target, result) == ("ticks", "ok") and f"Exited: {old}" in detail


@DATABASE_INDEPENDENT
def test_sighup_ends_the_writer_gracefully_and_the_console_follows_it_as_it_does_a_term(
        console: Console, cstack: CircusStack) -> None:
    """SIGHUP is a graceful stop for the writer and our workers (gunicorn alone reloads on it): the
    console waits for the writer to exit and says so, and does not hold the request on an audit
    record the exiting writer cannot take: it spools it, and the next record sends it."""
    (old,) = cstack.pids_of("writer")
    since = last_audit_id(cstack.settings)
    spool = cstack.home / "run" / "console-audit-spool.jsonl"
    r = console.post("/console/watchers/writer/signal", {"signal": "HUP", "confirm": "yes"})
    assert r.status_code == 303
    assert gone(old)  # the console waited for it
    assert '"action": "watcher.signal"' in spool.read_text()  # spooled at once, not sent to the exiting writer
    wait_for("a new writer process", lambda: [p for p in cstack.pids_of("writer") if p != old], timeout=60)
    with WriterClient(settings=cstack.settings, deadline=1) as client:
        wait_for("the new writer to answer", client.ping, timeout=60)
    r = console.post("/console/watchers/api/signal", {"signal": "HUP", "confirm": "yes"})  # the next record
    assert r.status_code == 303
    rows = audit_rows(cstack.settings, since, "watcher.signal")
    assert [(t, res) for _, t, res, _ in rows] == [("writer", "ok"), ("api", "ok")], rows
    assert f"SIGHUP to writer (pid {old})" in rows[0][3] and f"Exited: {old}" in rows[0][3]


@DATABASE_INDEPENDENT
def test_sigkill_ends_one_monitor_process_and_bad_signals_are_refused(console: Console, cstack: CircusStack) -> None:
    (old,) = cstack.pids_of("monitor")
    since = last_audit_id(cstack.settings)
    for data, message in (({"signal": "INT"}, "is not one the console sends"),
                          ({"signal": "KILL", "pid": "1"}, "is not a process of monitor"),
                          ({"signal": "KILL", "pid": "abc"}, "is not a process of monitor")):
        r = console.post("/console/watchers/monitor/signal", {**data, "confirm": "yes"})
        assert r.status_code == 400 and message in html.unescape(r.text), data
    r = console.post("/console/watchers/nosuch/signal", {"signal": "HUP", "confirm": "yes"})
    assert r.status_code == 404
    no_csrf = console.client.post("/console/watchers/monitor/signal", data={"signal": "KILL", "confirm": "yes"})
    assert no_csrf.status_code == 400 and cstack.pids_of("monitor") == [old]
    r = console.post("/console/watchers/monitor/signal", {"signal": "KILL", "pid": str(old), "confirm": "yes"})
    assert r.status_code == 303 and gone(old)
    wait_for("a new monitor process", lambda: [p for p in cstack.pids_of("monitor") if p != old], timeout=60)
    rows = audit_rows(cstack.settings, since, "watcher.signal")
    assert [(t, res) for _, t, res, _ in rows] == [("monitor", "ok")] and "SIGKILL" in rows[0][3]


def test_restart_all_asks_then_restarts_every_watcher_once_with_one_audit_row(console: Console,
                                                                              cstack: CircusStack) -> None:
    wait_for("every watcher active", lambda: all(cstack.status().get(w) == "active" for w in WATCHERS), timeout=90)
    before = {w: set(cstack.pids_of(w)) for w in WATCHERS}
    since = last_audit_id(cstack.settings)
    ask = console.post("/console/watchers/restart-all")
    assert ask.status_code == 200 and 'name="confirm" value="yes"' in ask.text
    assert {w: set(cstack.pids_of(w)) for w in WATCHERS} == before
    r = console.post("/console/watchers/restart-all", {"confirm": "yes"})
    assert r.status_code == 303 and r.headers["Location"] == "/console/watchers"
    after = {w: set(cstack.pids_of(w)) for w in WATCHERS}
    for w in WATCHERS:
        assert after[w] and not after[w] & before[w], (w, before[w], after[w])
    ((action, target, result, detail),) = audit_rows(cstack.settings, since, "watchers.restart_all")
    assert result == "ok", detail
    assert sorted(target.split(", ")) == sorted(WATCHERS)
    assert all(f"{w}: ok" in detail for w in WATCHERS), detail
    # Each once: no other restart was recorded, and the writer went first.
    assert detail.splitlines()[0].startswith("writer: ok")
    assert audit_rows(cstack.settings, since, "watcher.restart") == []



@DATABASE_INDEPENDENT
def test_a_watcher_a_reloadconfig_dropped_is_listed_missing_without_actions_saying_what_to_do() -> None:
    """``[watcher:monitor`` without its bracket, then ``circusctl reloadconfig --waiting``: circus
    drops monitor and says ok (as in tests/test_supervision.py, where /api/health and /metrics call
    it missing and down). The watchers page listed only what circus had: monitor was simply not
    there. It is a row, ``missing``, down, with no action (circus has nothing to act on) and what to
    do; once the section is back and reloaded, the row is monitor's as before."""
    stack = CircusStack()
    try:
        ini = stack.home / "circus.ini"
        ini.write_text((ROOT / "circus.ini").read_text())
        stack.ini = ini
        stack.start()
        console = Console.logged_in(create_app("console", stack.settings))
        ini.write_text(ini.read_text().replace("[watcher:monitor]", "[watcher:monitor"))
        done = stack.circusctl("reloadconfig", "--waiting")
        assert done.returncode == 0 and "ok" in done.stdout, (done.stdout, done.stderr)
        wait_for("monitor removed", lambda: "monitor" not in stack.status(), timeout=60)

        polled = {w["name"]: w for w in console.get("/console/api/watchers").json["watchers"]}
        assert sorted(polled) == sorted(WATCHERS), sorted(polled)
        monitor = polled["monitor"]
        assert monitor["status"] == "missing" and monitor["missing"] and not monitor["up"], monitor
        assert monitor["unavailable"] == {}, monitor  # no action is drawn: none is said to be unavailable
        assert monitor["problem"] == WatcherState("missing", None, None).problem  # health's words
        assert not any(w["missing"] for n, w in polled.items() if n != "monitor")
        page = console.get("/console/watchers").text
        row = re.search(r'<tr data-watcher="monitor".*?</tr>', page, re.S).group(0)
        assert 'data-up="no"' in row and 'class="pill pill-missing"' in row, row
        assert "<form" not in row and "/console/watchers/monitor" not in row, row  # no action, no page to link
        said = html.unescape(row)
        assert "[watcher:monitor]" in said and "reloadconfig --waiting" in said and "quit --waiting" in said, said
        assert f"--endpoint {stack.endpoint}" in said, said  # commands that run as printed
        r = console.post("/console/watchers/monitor/restart", {"confirm": "yes"})
        assert r.status_code == 400 and "reloadconfig" in html.unescape(r.text), r.text[:2000]
        r = console.get("/console/watchers/monitor")
        assert r.status_code == 404 and "monitor is missing" in html.unescape(r.text), r.text[:2000]
        ask = html.unescape(console.post("/console/watchers/restart-all", {}).text)  # asks, changes nothing
        assert "monitor is missing, and no restart brings it back" in ask and "[watcher:monitor]" in ask, ask[:3000]

        ini.write_text((ROOT / "circus.ini").read_text())  # what the page says to do
        done = stack.circusctl("reloadconfig", "--waiting")
        assert done.returncode == 0, (done.stdout, done.stderr)
        wait_for("monitor back", lambda: stack.status().get("monitor") == "active", timeout=60)
        row = re.search(r'<tr data-watcher="monitor".*?</tr>', console.get("/console/watchers").text, re.S).group(0)
        assert "/console/watchers/monitor/restart" in row and "pill-missing" not in row, row
    finally:
        stack.close()

@DATABASE_INDEPENDENT
def test_a_crash_loop_is_shown_as_the_flapping_plugin_handles_it() -> None:
    """circusd with our flapping plugin and a watcher whose processes die 0.5 s after they start (as
    in tests/test_supervision.py): its page says it is stopped for a crash loop and when circus
    retries it, then, after the last retry, that it stays stopped until someone starts it."""
    home = new_home()
    env = isolated_env(home)
    ini = home / "circus.ini"
    ini.write_text(f"""[circus]
endpoint = ipc://{home}/run/circus.sock
pubsub_endpoint = ipc://{home}/run/circus-pubsub.sock
statsd = False
check_delay = 1
logoutput = {home}/log/circusd.log

[plugin:flapping]
use = supervision.plugins.Flapping
attempts = 3
window = 1
retry_in = 10
max_retry = 1

[watcher:crasher]
cmd = {sys.executable} -c "import time; time.sleep(0.5); raise SystemExit(1)"
""")
    daemon = Circusd(env, ini, cwd=home, call_timeout=10)
    try:
        daemon.start(wait_active=(), timeout=30, poll=0.2)
        app = create_app("console", load_settings(env))
        app.config["CONSOLE_AUDIT_DEADLINE"] = 0.5  # no writer here: the login's record is spooled
        console = Console(app)
        console.login()

        def state() -> str:
            page = console.get("/console/watchers/crasher")
            assert page.status_code == 200, page.text[:500]
            return re.search(r'data-flapping="([\w-]+)"', page.text).group(1)
        wait_for("the page to say it is retried", lambda: state() == "retrying", timeout=60)
        page = html.unescape(console.get("/console/watchers/crasher").text)
        assert "stopped for a crash loop; circus starts it again (attempt 1 of 1): at" in page
        wait_for("the page to say it gave up", lambda: state() == "given-up", timeout=90)
        page = html.unescape(console.get("/console/watchers/crasher").text)
        assert "stays stopped until someone starts it" in page and "reached max retry limit" in page
    finally:
        daemon.stop(quit_timeout=30, term_timeout=10)
        remove_home(home)


def circusd_lines(*messages: tuple[float, str]) -> str:
    """Lines as circusd writes them (``circus.util.configure_logger``'s format, local time), each
    ``(seconds ago, message)``."""
    return "".join(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(time.time() - ago))} circus[4242] "
                   f"[INFO] {message}\n" for ago, message in messages)


@DATABASE_INDEPENDENT
def test_a_start_after_the_plugins_last_retry_ends_its_given_up_state() -> None:
    """The plugin gave up on ticks (``reached max retry limit``), then an operator started it and
    later stopped it: that stop is the operator's, not the plugin's "stopped until someone starts
    it". Without the start the plugin's word stands; a start also ends a pending retry."""
    home = new_home()
    try:
        settings = load_settings(isolated_env(home))
        log = settings.log_dir / "circusd.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        gave_up = [(90, "ticks: flapping detected: reached max retry limit (3); stopped until `circusctl start "
                        "ticks`"), (89, "ticks stopped")]
        app = create_app("console", settings)

        def state() -> dict[str, Any]:
            with app.test_request_context():
                return flapping_state("ticks", "stopped", "active")

        log.write_text(circusd_lines(*gave_up))
        assert state()["state"] == "given-up"
        log.write_text(circusd_lines(*gave_up, (60, "ticks started"), (30, "analysis started"),
                                     (10, "ticks stopped")))
        shown = state()
        assert shown["state"] == "recent" and "stays stopped" not in shown["text"], shown
        assert [e["limit"] for e in shown["events"]] == [True]  # the plugin's decision is still listed
        log.write_text(circusd_lines((20, "ticks: flapping detected: retry in 15s (attempt number 1 of 3)"),
                                     (19, "ticks stopped"), (10, "ticks started"), (5, "ticks stopped")))
        assert state()["state"] == "recent"
        log.write_text(circusd_lines((20, "ticks: flapping detected: retry in 15s (attempt number 1 of 3)"),
                                     (19, "ticks stopped")))
        assert state()["state"] == "retrying"
    finally:
        remove_home(home)


@DATABASE_INDEPENDENT
def test_no_secret_in_an_environment_or_a_command_line_as_the_page_shows_them() -> None:
    """Values are shown for tickstack's settings and a few harmless names only: secrets under names
    no list of secret words knows (a DSN, a URL whose password holds a slash, a key as the user of
    a URL) were shown (a security review, round 41)."""
    rows = {r["name"]: r for r in safe_environment({
        "DATABASE_URL": "postgresql+psycopg://ts_owner:s3cret@db:5432/tickstack",
        "DATABASE_READ_URL": "postgresql://reader@/tickstack?host=/run/pg&password=s3cret",
        "TICKSTACK_API_TOKEN": "s3cret", "PGPASSWORD": "s3cret", "AWS_SECRET_ACCESS_KEY": "s3cret",
        "SESSION_KEY": "s3cret", "OTHER_URL": "redis://:s3cret@cache:6379/0", "HOME": "/root", "EMPTY_TOKEN": "",
        "MY_DSN": "host=db password=s3cret", "BROKER": "amqp://u:pa/s3cret@h/", "SENTRY": "https://s3cret@sentry.io/1",
        "TICKSTACK_WRITER_BATCH_WAIT": "0.002", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHON_DSN": "host=db password=s3cret", "CIRCUS_BROKER": "amqp://u:pa/s3cret@h/"})}
    assert all("s3cret" not in r["value"] for r in rows.values()), rows
    assert rows["DATABASE_URL"]["value"] == "postgresql+psycopg://ts_owner:***@db:5432/tickstack"
    assert rows["HOME"] == {"name": "HOME", "value": "/root", "hidden": False}
    assert [rows[n]["value"] for n in ("TICKSTACK_WRITER_BATCH_WAIT", "LC_ALL", "PYTHONDONTWRITEBYTECODE")] == [
        "0.002", "C.UTF-8", "1"]
    assert rows["MY_DSN"]["hidden"] and rows["BROKER"]["hidden"] and rows["SENTRY"]["hidden"]
    assert rows["PYTHON_DSN"]["hidden"] and rows["CIRCUS_BROKER"]["hidden"]  # a prefix is no name
    assert rows["TICKSTACK_API_TOKEN"]["hidden"] and rows["PGPASSWORD"]["hidden"] and rows["SESSION_KEY"]["hidden"]
    assert rows["EMPTY_TOKEN"]["value"] == "(empty)"
    assert command_line({"cmd": "python", "args": ["-m", "x", "--db", "postgresql://u:s3cret@h/d"]}) == (
        "python -m x --db postgresql://u:***@h/d")


@DATABASE_INDEPENDENT
def test_the_console_judges_a_watcher_by_healths_rule_plus_gunicorns_workers() -> None:
    """The console's status of a watcher is built on :class:`WatcherState`, the rule of /api/health
    and /metrics: wherever health calls a watcher down, the console does too, in the same words. It
    adds one refinement of its own: a gunicorn watcher is ``starting`` (not up) until its master runs
    its ``--workers`` (circus calls it active seconds before they are forked)."""
    plain = {"cmd": "python", "args": "-m workers.ticks"}
    gunicorn = {"cmd": "gunicorn", "args": "--workers 2 webapp:create_app('api')"}
    for status in ("active", "stopped", "starting", "stopping"):
        for running in (0, 1, 2):
            for asked in (0, 1, 2, None):
                for cmd in (plain, gunicorn):
                    opts = cmd if asked is None else {**cmd, "numprocesses": asked}
                    shown = shown_state({"status": status, "numprocesses": running, "children": [0] * (2 * running)},
                                        opts)
                    health = WatcherState(status, running, asked)
                    assert shown.up == health.up and shown.problem == health.problem, (status, running, asked, shown)
    one = {**plain, "numprocesses": 1}
    assert shown_state({"status": "active", "numprocesses": 1, "children": []}, one) == ("active", None, None)
    assert shown_state({"status": "active", "numprocesses": 0, "children": []}, {**plain, "numprocesses": 0}) == (
        NO_PROCESSES, None, "0 of 1 processes (circus was asked for 0)")
    assert shown_state({"status": "active", "numprocesses": 1, "children": []}, {**plain, "numprocesses": 2}) == (
        "starting", "1 of 2 processes", "1 of 2 processes")
    assert shown_state({"status": "stopped", "numprocesses": 0, "children": []}, one) == ("stopped", None, "stopped")
    # Up for health, not yet for the console: the master runs one of its two workers.
    assert WatcherState("active", 1, 1).up
    shown = shown_state({"status": "active", "numprocesses": 1, "children": [11]}, {**gunicorn, "numprocesses": 1})
    assert shown == ("starting", "1 of 2 workers", "1 of 2 workers") and not shown.up
    # circus's asked-for count as it comes (anything but an int is unknown: judged by the processes alone).
    assert WatcherState.of("active", 0, True) == WatcherState("active", 0, None)
    assert WatcherState.of("active", 0, "0") == WatcherState("active", 0, None)
    assert WatcherState.of("active", 0, 0).problem == "0 of 1 processes (circus was asked for 0)"
