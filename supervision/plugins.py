"""Circus plugins of ours: circus's flapping and watchdog plugins, made safe to rely on.

Each plugin runs in a process of its own, started by circusd; both die with circusd
(:class:`~supervision.lifeline.Lifeline`). They send commands as calls retried while circusd is
busy: circus's own send them fire-and-forget, and circusd, which runs one command at a time,
rejects a concurrent one ("arbiter is already running ... command", circus #1154) to a caller that
is not listening. A lock keeps a plugin's timer threads and its event loop from using its one
socket at once.

``Flapping``: a watcher whose processes die ``attempts`` times within ``window`` seconds (plus
circus's ``check_delay``) is stopped, started again ``retry_in`` seconds later, at most
``max_retry`` times; then it stays stopped until someone starts it. circus's plugin counted the
death of the process its own ``stop`` killed into the next window, and reset its count of retries
whenever ``attempts`` deaths spanned more than the window, so its retries never stopped. Here a
process that circus killed (a stop, a restart, the watchdog) is not a crash, deaths are counted
over a sliding window, and the count of retries starts over only after ``reset_after`` seconds
without flapping.

``WatchDog``: circus's plugin restarts a process that stopped sending heartbeats (UDP on
127.0.0.1; see :mod:`supervision.lifeline`), which circus alone cannot see: a SIGSTOPped or stuck
process stays "active". Changed here: the port comes from the settings (``TICKSTACK_WATCHDOG_PORT``,
so stacks side by side use their own); a process is watched from its first heartbeat on (a slow
start is not a hang; those already running when the plugin starts, last, from then on) until
circus stops it (a long graceful stop is not a hang either); a watcher may
set its own ``watchdog.timeout``; a restart is the watcher's graceful stop followed by SIGCONT (a
stopped process then handles it: the writer drains and checkpoints), SIGKILL after
``graceful_timeout``; each restart is logged in circusd's log and recorded in the audit log;
without its port the plugin watches nothing (circus's would kill every process for silence).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from circus.fixed_threading import Timer
from circus.plugins.flapping import Flapping as CircusFlapping
from circus.plugins.watchdog import WatchDog as CircusWatchDog
from circus.util import configure_logger, to_bool

from db.circusd import circusctl_command
from supervision.circus import is_busy, retry_while_busy
from supervision.lifeline import Lifeline

log = logging.getLogger("circus")


def log_where_circusd_logs() -> None:
    """circus starts a plugin with circusd's ``--log-output``, but one it starts again on ``circusctl
    reloadconfig`` without it (circus 0.19, ``Arbiter.get_plugin_config``): its lines then went to
    circusd's stderr, a terminal, or nowhere under ``--daemon``. Such a plugin logs where circus.ini's
    ``logoutput`` says, ``$TICKSTACK_HOME/log/circusd.log`` (only its first three lines, logged
    before the plugin is made, are not there)."""
    from db.config import ConfigError, load_settings

    if "--log-output" in sys.argv:
        return
    try:
        log_dir = load_settings().log_dir
    except ConfigError:  # said by every process of the stack; this one logs where circus left it
        return
    configure_logger(log, output=str(log_dir / "circusd.log"))


class CallsNotCasts:
    """Mixin: ``cast`` becomes a call retried while circusd is busy, under a socket lock."""

    retry_for = 15.0
    _socket_lock: threading.Lock

    def call(self, command: str, **props: Any) -> dict[str, Any]:
        with self._socket_lock:
            return super().call(command, **props)  # type: ignore[misc]

    def cast(self, command: str, **props: Any) -> None:
        self.command(command, **props)

    def command(self, command: str, **props: Any) -> bool:
        """Send ``command``; log and return False if circusd refused it."""
        answer = retry_while_busy(lambda: self.call(command, **props), self.retry_for, pause=0.2)
        if answer.get("status") == "ok":
            return True
        reason = str(answer.get("reason", ""))
        what = f"{self.name}: {command} {props.get('name')}"  # type: ignore[attr-defined]
        log.error("%s: gave up, circusd stayed busy (%s)" if is_busy(answer) else "%s failed: %s", what, reason)
        return False


class Flapping(CallsNotCasts, CircusFlapping):
    def __init__(self, *args: Any, **config: Any) -> None:
        log_where_circusd_logs()
        super().__init__(*args, **config)
        self._socket_lock = threading.Lock()
        self.reset_after = float(config.get("reset_after", 300))
        self.last_flap: dict[str, float] = {}
        self.killed: set[int] = set()

    def handle_init(self) -> None:
        Lifeline().attach()
        super().handle_init()

    def handle_recv(self, data: tuple[bytes, bytes]) -> None:
        watcher_name, action, msg = self.split_data(data)
        if action not in ("kill", "reap"):
            super().handle_recv(data)
            return
        pid = self.load_message(msg).get("process_pid")
        if action == "kill":
            self.killed.add(pid)
        elif pid in self.killed:  # killed by circus: a stop, a restart, the watchdog; not a crash
            self.killed.discard(pid)
        else:
            self.timelines.setdefault(watcher_name, []).append(time.time())
            self.check(watcher_name)

    def check(self, watcher_name: str) -> None:
        conf = self.configs.get(watcher_name) or self.update_conf(watcher_name)
        if not to_bool(self._get_conf(conf, "active")):
            return
        now = time.time()
        span = float(self._get_conf(conf, "window")) + self.check_delay
        timeline = [t for t in self.timelines.get(watcher_name, []) if now - t <= span]
        self.timelines[watcher_name] = timeline
        if len(timeline) < int(self._get_conf(conf, "attempts")):
            return
        self.timelines[watcher_name] = []
        if now - self.last_flap.get(watcher_name, now) > self.reset_after:
            self.tries[watcher_name] = 0
        self.last_flap[watcher_name] = now
        tries, max_retry = self.tries.get(watcher_name, 0), int(self._get_conf(conf, "max_retry"))
        retry_in = float(self._get_conf(conf, "retry_in"))
        if tries < max_retry or max_retry == -1:
            self.tries[watcher_name] = tries + 1
            log.info("%s: flapping detected: retry in %.0fs (attempt number %d of %s)", watcher_name, retry_in,
                     tries + 1, max_retry)
            self.command("stop", name=watcher_name)
            timer = Timer(retry_in, lambda: self.command("start", name=watcher_name))
            timer.start()
            self.timers[watcher_name] = timer
        else:
            log.info("%s: flapping detected: reached max retry limit (%d); stopped until `%s`%s", watcher_name,
                     max_retry, circusctl_command(self.endpoint, "start", watcher_name), _last_words(watcher_name))
            self.tries[watcher_name] = 0
            self.last_flap.pop(watcher_name, None)
            self.command("stop", name=watcher_name)


class WatchDog(CallsNotCasts, CircusWatchDog):
    def __init__(self, *args: Any, **config: Any) -> None:
        from db.config import load_settings

        log_where_circusd_logs()
        super().__init__(*args, **config)
        self._socket_lock = threading.Lock()
        self.settings = load_settings()
        self.watchdog_port = int(config.get("port", self.settings.watchdog_port))
        self.timeout = float(config.get("timeout", self.loop_rate * self.max_count))
        #: pid -> [watcher, monotonic time of its last heartbeat, or None before its first]
        self.watched: dict[int, list[Any]] = {}
        #: pids circus is stopping (its "kill" event, until "reap"): their heartbeats while they drain
        #: must not make them watched again (circus still lists them until they are gone).
        self.stopping: set[int] = set()
        self.timeouts: dict[str, float] = {}
        self._last_discovery = 0.0
        #: Sending port -> the pid whose beats it was found to carry, checked once (see :meth:`_ours`).
        self.senders: dict[int, int] = {}

    def handle_init(self) -> None:
        Lifeline().attach()
        super().handle_init()
        if self.sock is None:
            log.error("watchdog: UDP port 127.0.0.1:%d unavailable; NO liveness checks in this stack "
                      "(set TICKSTACK_WATCHDOG_PORT to a free port)", self.watchdog_port)
        else:
            self.sock.setblocking(False)  # receive_udp_socket reads until nothing is left

    def handle_stop(self) -> None:
        if self.period is not None:
            self.period.stop()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def handle_recv(self, data: tuple[bytes, bytes]) -> None:
        watcher_name, action, msg = self.split_data(data)
        if action == "updated":
            self.timeouts.pop(watcher_name, None)
            return
        if action not in ("spawn", "kill", "reap") or not self._match_watcher_name(watcher_name):
            return
        pid = self.load_message(msg).get("process_pid")
        if action == "spawn":
            self.watched[pid] = [watcher_name, None]
            self.stopping.discard(pid)  # a pid used again
        else:  # stopped by circus (its graceful timeout applies now) or gone
            self.watched.pop(pid, None)
            if action == "kill":
                self.stopping.add(pid)
            else:
                self.stopping.discard(pid)

    def receive_udp_socket(self, fd: int, events: int) -> None:
        """Read every waiting heartbeat ("pid;time"); anything else is ignored."""
        while True:
            try:
                data, sender = self.sock.recvfrom(1024)
            except (BlockingIOError, TimeoutError, OSError):
                return
            beat = self._decode(data)
            if beat is None or beat in self.stopping or not self._ours(beat, sender):
                continue
            if beat not in self.watched and time.monotonic() - self._last_discovery >= 1.0:
                self._discover()  # spawned before this plugin subscribed to circus's events
            if beat in self.watched:
                if self.watched[beat][1] is None:
                    log.info("watchdog: %s pid %d: first heartbeat; watched from now on", self.watched[beat][0], beat)
                self.watched[beat][1] = time.monotonic()

    def look_after(self) -> None:
        if self.sock is None:  # no heartbeats can come: silence means nothing
            return
        now = time.monotonic()
        if self.starting:  # what runs already (the plugin starts last) is watched from now on
            # circusd may still be busy starting the stack (a loaded machine): then ask again at the
            # next look, or a process that hangs before its next heartbeat is never watched.
            self.starting = not self._discover(armed_at=now)
        for pid, (watcher_name, last) in list(self.watched.items()):
            if last is not None and now - last > self._timeout(watcher_name):
                del self.watched[pid]
                self._restart(watcher_name, pid, now - last)

    def _restart(self, watcher_name: str, pid: int, silent_s: float) -> None:
        detail = (f"pid {pid} sent no heartbeat for {silent_s:.0f} s (limit {self._timeout(watcher_name):.0f} s): "
                  "stuck or stopped; restarting it")
        log.warning("watchdog: %s %s", watcher_name, detail)
        props: dict[str, Any] = {"name": watcher_name, "pid": pid}
        if self.stop_signal is not None:
            props["signum"] = self.stop_signal
        if self.graceful_timeout is not None:
            props["graceful_timeout"] = self.graceful_timeout
        ok = self.command("kill", **props)
        if ok:  # a SIGSTOPped process handles the stop signal once continued
            self.command("signal", name=watcher_name, pid=pid, signum=int(signal.SIGCONT))
        self._audit(watcher_name, "ok" if ok else "error", detail)

    def _timeout(self, watcher_name: str) -> float:
        if watcher_name not in self.timeouts:
            try:
                options = self.call("options", name=watcher_name).get("options", {})
                self.timeouts[watcher_name] = float(options.get("watchdog.timeout", self.timeout))
            except (ValueError, TypeError) as e:
                log.error("watchdog: %s: bad watchdog.timeout (%s); using %.0f s", watcher_name, e, self.timeout)
                self.timeouts[watcher_name] = self.timeout
        return self.timeouts[watcher_name]

    def _discover(self, armed_at: float | None = None) -> bool:
        """Learn the pids of the watched watchers from circus; False when circusd did not answer
        them all (busy: "arbiter is already running ..."), so the caller asks again."""
        self._last_discovery = time.monotonic()
        answer = self.call("list")
        if answer.get("status") != "ok":
            log.info("watchdog: circusd did not list its watchers (%s); asking again", answer.get("reason", answer))
            return False
        complete = True
        for watcher_name in answer.get("watchers", []):
            if self._match_watcher_name(watcher_name):
                pids = self.call("list", name=watcher_name)
                complete = complete and pids.get("status") == "ok"
                for known in pids.get("pids", []):
                    if int(known) in self.stopping:  # listed until circus has reaped it
                        continue
                    if int(known) not in self.watched and armed_at is not None:
                        log.info("watchdog: %s pid %d: running; watched from now on", watcher_name, int(known))
                    self.watched.setdefault(int(known), [watcher_name, armed_at])
        return complete

    def _ours(self, pid: int, sender: tuple[str, int]) -> bool:
        """Whether a beat for ``pid`` from ``sender`` (address, port) comes from a socket of this
        user's: any local user could send "pid;time" and keep a hung writer from being restarted
        (a security review, round 41). Our sockets are bound to 127.0.0.1 (:mod:`supervision.lifeline`),
        and no other user can bind that address and port while we hold it; from another loopback
        address (127.0.0.2) the same port is anyone's, so only 127.0.0.1 counts. Checked once per
        port and pid (the sending sockets live as long as their processes)."""
        address, port = sender[0], sender[1]
        if address != "127.0.0.1":
            log.warning("watchdog: a heartbeat for pid %d from %s, not 127.0.0.1: ignored", pid, address)
            return False
        if self.senders.get(port) == pid:
            return True
        owner = udp_socket_owner(port)
        if owner != os.getuid():
            log.warning("watchdog: a heartbeat for pid %d from port %d, a socket of %s: ignored", pid, port,
                        f"user {owner}" if owner is not None else "no one now")
            return False
        if len(self.senders) > 4096:  # ports of processes long gone
            self.senders.clear()
        self.senders[port] = pid
        return True

    def _decode(self, data: bytes) -> int | None:
        try:
            match = self._decode_received_udp_message(data)
            return int(match["pid"]) if match else None
        except (UnicodeDecodeError, ValueError, KeyError):
            return None

    def _audit(self, watcher_name: str, result: str, detail: str) -> None:
        """Record the restart in the audit log (the console's Audit page), in a thread: the writer may
        be the process being restarted, and the client waits for the next one."""
        run_in_thread(lambda: _record(self.settings, watcher_name, result, detail))


def _last_words(watcher_name: str) -> str:
    """Why the writer kept exiting, when it said so in its run folder (:mod:`db.server_wait`: the server
    refused its login), as the end of the flapping plugin's last line; else nothing."""
    if watcher_name != "writer":
        return ""
    try:
        from db.config import load_settings
        from db.server_wait import last_refusal

        said = last_refusal(load_settings())
    except Exception:  # a setting that does not load: the writer's log says it
        return ""
    return f": {said['what']}; {said['fix']} first (log/writer.log)" if said else ""


def _record(settings: Any, watcher_name: str, result: str, detail: str) -> None:
    from db.client import WriterClient
    from db.errors import WriterError

    try:
        with WriterClient(settings=settings) as client:
            client.call("audit", actor="watchdog", action="restart", target=watcher_name, result=result,
                        detail=detail)
    except WriterError as e:
        log.error("watchdog: could not record the restart of %s in the audit log: %s", watcher_name, e)


def udp_socket_owner(port: int, table: str = "/proc/net/udp") -> int | None:
    """The uid owning the UDP socket bound to 127.0.0.1:``port`` (or the wildcard address's, which no other
    user can bind beside it), from the kernel's table; None when there is none, or the table cannot be
    read."""
    wanted = {f"{address}:{port:04X}" for address in ("0100007F", "7F000001", "00000000")}  # either byte order
    try:
        with open(table) as rows:
            next(rows, None)  # the header
            for row in rows:
                fields = row.split()
                if len(fields) > 7 and fields[1] in wanted:
                    return int(fields[7])
    except (OSError, ValueError):
        return None
    return None


def run_in_thread(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, name="watchdog-audit", daemon=True).start()
