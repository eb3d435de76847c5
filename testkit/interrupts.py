"""A test run stopped by a signal (Ctrl-C, or SIGTERM: ``make test``'s trap) stops what its tests
started, then ends: a pytest plugin (``tests/conftest.py`` loads it).

Under pytest-xdist the controller runs no test: its children are the workers, each of which stops
what its tests started as its session ends, then says so, and the controller ends once every
worker did. So the controller passes a signal on to its workers rather than raising at once: xdist
ends a worker 10 to 25 s after its controller ends, in the middle of stopping a stack or the
throwaway server. A worker stops as at Ctrl-C, except inside a test's setup or teardown: there the
stop waits for its end (a KeyboardInterrupt inside a teardown skipped the rest of it, and every
fixture's teardown after it: a writer was left running; inside a setup, it left a fixture made but
not yet given its teardown: an empty home was left). The session stops after that test too, if
something swallows the interrupt. Ctrl-C reaches a worker twice (from the terminal and from its
controller), which counts once; a second Ctrl-C ends everything at once, teardown or not. A plain
run (no workers) stops so too.

A signal the shell started a run with ignored (SIGINT in ``make test``'s background runs) stays
ignored.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Generator
from typing import Any

import psutil
import pytest

#: The signal that ends a process at once, teardown or not: a second Ctrl-C (an xdist worker counts
#: two per Ctrl-C, from the terminal and from its controller; its controller and a plain run one).
FORCE_AT = {"controller": 2, "worker": 3, "plain": 2}


class _Stop:
    """What this process was told: how many signals, and one that waits for a teardown's end."""

    signals = 0
    force_at = FORCE_AT["plain"]
    #: Inside a test's setup or teardown, or the session's end: a stop waits.
    deferring = False
    pending: int | None = None
    session: pytest.Session | None = None


_stop = _Stop()


def _force(signum: int) -> None:
    """End this process by ``signum``'s own default action (teardowns are not run)."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _in_tests(signum: int, _frame: object) -> None:
    """A process that runs tests (an xdist worker, a plain run): stop as at Ctrl-C, once."""
    _stop.signals += 1
    if _stop.signals >= _stop.force_at:
        _force(signum)
    if _stop.signals > 1:
        return
    if _stop.session is not None:  # the run ends after this test even if something swallows the interrupt
        _stop.session.shouldstop = f"signal {signum}"
    if _stop.deferring:
        _stop.pending = signum
        return
    raise KeyboardInterrupt(f"signal {signum}")


def _in_controller(signum: int, _frame: object) -> None:
    """xdist's controller: tell the workers, then wait for them (xdist's loop, as for any end)."""
    _stop.signals += 1
    workers = psutil.Process().children()
    if not workers:  # none started yet: nothing to wait for
        raise KeyboardInterrupt(f"signal {signum}")
    if _stop.signals >= _stop.force_at:
        for worker in workers:
            _send(worker, signal.SIGKILL)
        _force(signum)
    for worker in workers:
        _send(worker, signal.SIGTERM)


def _send(process: psutil.Process, signum: int) -> None:
    try:
        process.send_signal(signum)
    except psutil.NoSuchProcess:
        pass


def _controls_workers(config: pytest.Config) -> bool:
    """Whether this process is xdist's controller: xdist's own test (``_is_distribution_mode``,
    options it has set by now), not whether it registered its controller yet, which depends on the
    order the plugins' ``pytest_configure`` run in (its runs last, as a conftest's may)."""
    return (not hasattr(config, "workerinput") and not config.getoption("collectonly")
            and config.getoption("dist", "no") != "no" and bool(config.getoption("tx", None)))


def pytest_configure(config: pytest.Config) -> None:
    role = "controller" if _controls_workers(config) else "worker" if hasattr(config, "workerinput") else "plain"
    handler, _stop.force_at = _in_controller if role == "controller" else _in_tests, FORCE_AT[role]
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, handler)


def pytest_sessionstart(session: pytest.Session) -> None:
    _stop.session = session


def _deferring() -> Generator[None, Any, Any]:
    """Run a hook with a stop waiting for its end, then stop the run if one came."""
    _stop.deferring = True
    try:
        return (yield)
    finally:
        _stop.deferring = False
        if _stop.pending is not None:
            signum, _stop.pending = _stop.pending, None
            raise KeyboardInterrupt(f"signal {signum}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    """A stop waits for the end of a test's setup (its fixtures, each then given its teardown)."""
    return (yield from _deferring())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, Any, Any]:
    """A stop waits for the end of a test's teardown (its fixtures', and a module's or a file's
    shared ones after its last test)."""
    return (yield from _deferring())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Generator[None, Any, Any]:
    """The session's own fixtures (the throwaway server, the browser, whatever an interrupted test
    left) are stopped here: a signal now is for a run that is ending already."""
    _stop.deferring = True
    return (yield)
