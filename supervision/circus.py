"""Talking to circusd: status, stats and commands (console, API health, jobs' sampler).

Per-process figures (CPU, memory of gunicorn's workers too) are measured by
:mod:`supervision.procstats`. circusd runs one command at a time and answers a concurrent one with
"arbiter is already running X command" (circus #1154); :func:`retry_while_busy` is the one rule for
that answer (retry briefly, then give up), used by :meth:`Circus.call` and by our flapping plugin.
:meth:`Circus.call` raises :class:`CircusError` with a plain message, never a stack trace for the
operator. :class:`WatcherState` is the one judgement of whether a watcher is up (active with the
processes circus was asked for): :meth:`Circus.watchers` gives it to the API's health and metrics,
and the console builds its status of a watcher on it (:func:`webapp.console.watchers.shown_state`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db.circusd import unreachable_circusd

#: Commands the console may send, with the watcher they apply to.
ACTIONS = ("start", "stop", "restart", "incr", "decr")
#: The watchers of circus.ini, the ones the stack needs (tests/test_supervision.py checks that they are
#: circus.ini's sections). Kept here rather than read from circus.ini: a ``reloadconfig`` of a broken
#: file (``[watcher:monitor`` without its bracket) makes circus drop a watcher and say ok, and the
#: file then names the same watchers circus has, so health had nothing to compare with.
STACK_WATCHERS = ("writer", "api", "console", "ticks", "analysis", "monitor", "jobs")
#: The status of an expected watcher circus does not have (:meth:`Circus.watchers`).
MISSING = "missing"


#: The longest the writer's own start holds circusd while it waits for the writer to answer
#: (:func:`supervision.hooks.writer_started`): a start takes about 0.5 s here, a few seconds on a
#: loaded machine. Here, for what a client of a held circusd is told.
WRITER_START_WAIT_S = 10.0
#: Who may hold circusd's loop, and how long, in words.
HELD_BY = (f"held by a start hook (the writer's waits up to {WRITER_START_WAIT_S:g} s for a new writer to answer, "
           "a dependent's up to TICKSTACK_READY_TIMEOUT)")


class CircusError(RuntimeError):
    """circusd did not do what was asked; the message says why in words."""


class CircusSilent(CircusError):
    """circusd did not answer within the client's timeout: its loop may be held by a hook (the
    writer's ``after_start``: :data:`WRITER_START_WAIT_S`), or it hangs. A command it did not
    answer is in its socket nonetheless, and runs once its loop is free."""


def is_busy(answer: dict[str, Any]) -> bool:
    """Whether circusd refused a command only because it is running another one."""
    return answer.get("status") != "ok" and "already running" in str(answer.get("reason", ""))


def retry_while_busy(send: Callable[[], dict[str, Any]], within: float, pause: float = 0.1) -> dict[str, Any]:
    """``send()`` a command until circusd answers anything but "already running", for at most
    ``within`` seconds; return the last answer (still busy when time ran out)."""
    deadline = time.monotonic() + within
    while True:
        answer = send()
        if not is_busy(answer) or time.monotonic() >= deadline:
            return answer
        time.sleep(pause)


@dataclass(frozen=True)
class WatcherState:
    """One watcher as the API's health and metrics judge it: up only when circus calls it active
    *and* it runs at least the processes circus was asked for, at least one. circus calls a watcher
    active with no process at all after ``circusctl decr`` to 0; one the flapping plugin or
    ``circusctl stop`` stopped reads ``stopped``; one the stack expects and circus does not have,
    :data:`MISSING`. The console's status of a watcher is built on it
    (:meth:`of`), adding only a refinement of its own: so what health calls down, the console does too."""

    #: circus's word: active, stopped, starting, stopping.
    status: str
    #: Processes running now (circus's, not gunicorn's workers); None when circusd did not say.
    processes: int | None
    #: circus's asked-for ``numprocesses`` (what incr/decr change); None when circusd did not say.
    asked: int | None

    @classmethod
    def of(cls, status: Any, processes: int | None, asked: Any) -> WatcherState:
        """The state of a watcher from circus's words as they come: its ``status``, the processes
        it runs (None: not known) and its ``numprocesses`` option (from ``get`` or ``options``;
        anything but an int, a bool included, is not known)."""
        return cls(str(status), processes, _count(asked))

    @property
    def wanted(self) -> int:
        """The processes the watcher must run to be up: what circus was asked for, at least one."""
        return max(self.asked or 0, 1)

    @property
    def problem(self) -> str | None:
        """What is wrong, in words ("stopped", "0 of 1 processes"); None when it is up. A watcher
        whose processes circusd did not report is judged by its status alone."""
        if self.status == MISSING:
            return "missing (circus has no such watcher: a reloadconfig removed it or circusd runs another ini)"
        if self.status != "active":
            return self.status
        if self.processes is None or self.processes >= self.wanted:
            return None
        text = f"{self.processes} of {self.wanted} processes"
        return f"{text} (circus was asked for 0)" if self.asked == 0 else text

    @property
    def up(self) -> bool:
        return self.problem is None


class Circus:
    def __init__(self, endpoint: str, timeout: float = 5.0, busy_retry: float = 3.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.busy_retry = busy_retry

    def call(self, command: str, **props: Any) -> dict[str, Any]:
        """One command on a client of its own (:meth:`_call` says what it raises)."""
        client = self._client()
        try:
            return self._call(client, command, **props)
        finally:
            client.stop()

    def _client(self) -> Any:
        """A new ``CircusClient``; :class:`CircusError` at once when circusd's socket is not there."""
        # Imported here: importing circus configures the root logger
        # (logging.basicConfig) as a side effect, which must not happen to a
        # worker that merely imports this module.
        from circus.client import CircusClient

        if self.endpoint.startswith("ipc://") and not Path(self.endpoint[len("ipc://"):]).exists():
            # Say so at once instead of waiting the timeout for no answer; or that it runs, out of reach.
            raise CircusError(unreachable_circusd(self.endpoint) or (
                f"circusd is not running (no socket at {self.endpoint[len('ipc://'):]}); start the stack with "
                "`make run`"))
        return CircusClient(endpoint=self.endpoint, timeout=self.timeout)

    def _call(self, client: Any, command: str, **props: Any) -> dict[str, Any]:
        """``command`` on ``client`` (retried while circusd is busy with another, for at most
        ``busy_retry`` seconds): circusd's answer, or :class:`CircusError` saying why not."""
        from circus.exc import CallError

        try:
            answer = retry_while_busy(lambda: client.call({"command": command, "properties": props}),
                                      self.busy_retry)
        except CallError as e:
            if "timed out" not in str(e).lower():
                raise CircusError(f"circusd at {self.endpoint} could not be asked {command}: {e}") from None
            raise CircusSilent(f"circusd does not answer at {self.endpoint} ({e}): {HELD_BY} or hung; what was sent "
                               "runs once it is free; try again in a moment") from None
        if answer.get("status") == "ok":
            return answer
        reason = str(answer.get("reason", "unknown error"))
        if is_busy(answer):
            raise CircusError(f"circusd is busy with another command ({reason}); try again in a moment")
        raise CircusError(f"circusd refused {command}: {reason}")

    def statuses(self) -> dict[str, str]:
        """Every watcher's status (active, stopped, starting, stopping)."""
        return self.call("status")["statuses"]

    def asked_for(self, watcher: str) -> int | None:
        """circus's asked-for ``numprocesses`` of ``watcher`` (None when it says something else)."""
        return _count(_numprocesses(self.call("get", name=watcher, keys=["numprocesses"])))

    def watchers(self) -> dict[str, WatcherState]:
        """Every watcher (circus's plugins left out), sorted by name, as :class:`WatcherState`.

        ``status``, then each watcher's pids (``list``) and, for an active one, its asked-for
        ``numprocesses`` (``get``): 15 small calls for the 7 watchers of circus.ini, all on one
        client (a new client per call, connecting each time, took twice as long: a median of 19 ms
        against 10 on a loaded machine; what is left is circusd handling each command). Raises
        :class:`CircusError` when the first fails. When a later one fails (it timed out, circusd's
        loop held by a start hook; or the watcher is gone, removed by a ``reloadconfig``), what it
        would have said is None and nothing more is asked: each further call could wait as long.
        When circus runs any of :data:`STACK_WATCHERS` (it runs the stack), each of them it does not
        have is there too, :data:`MISSING` (down: :func:`missing_watchers`)."""
        client = self._client()
        try:
            statuses = self._call(client, "status")["statuses"]
            out: dict[str, WatcherState] = {}
            asking = True
            for name in sorted(n for n in statuses if not n.startswith("plugin:")):
                status = str(statuses[name])
                processes = asked = None
                if asking:
                    try:
                        processes = len(_pids(self._call(client, "list", name=name)))
                        if status == "active":  # one that is not active is down whatever it was asked for
                            asked = _numprocesses(self._call(client, "get", name=name, keys=["numprocesses"]))
                    except CircusError:
                        asking = False
                out[name] = WatcherState.of(status, processes, asked)
            for name in missing_watchers(out):
                out[name] = WatcherState(MISSING, None, None)
            return dict(sorted(out.items()))
        finally:
            client.stop()

    def act(self, action: str, watcher: str) -> dict[str, Any]:
        """start/stop/restart/incr/decr one watcher, waiting for the result."""
        if action not in ACTIONS:
            raise CircusError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        if watcher not in self.statuses():
            raise CircusError(f"no watcher named {watcher!r}")
        props: dict[str, Any] = {"name": watcher}
        if action in ("start", "stop", "restart"):
            props["waiting"] = True
        if action in ("incr", "decr"):
            props["nb"] = 1
        return self.call(action, **props)


def missing_watchers(names: Collection[str], expected: Collection[str] = STACK_WATCHERS) -> list[str]:
    """The watchers of ``expected`` that a circusd whose watchers are ``names`` does not have, in
    ``expected``'s order: :data:`MISSING` for health, metrics and the console. None when it has none
    of them: that circusd runs another ini (a test's), and nothing is expected of it."""
    have = set(names)
    return [name for name in expected if name not in have] if have & set(expected) else []


def _pids(answer: dict[str, Any]) -> list[int]:
    """The pids in circusd's answer to ``list`` of one watcher."""
    return [int(pid) for pid in answer.get("pids") or []]


def _numprocesses(answer: dict[str, Any]) -> Any:
    """``numprocesses`` as circusd's answer to ``get`` gives it, unchecked."""
    return (answer.get("options") or {}).get("numprocesses")


def _count(value: Any) -> int | None:
    """``value`` when it is a count (an int, not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None
