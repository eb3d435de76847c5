"""``python -m bench chaos``: kill -9 under load, and count what was lost.

The promise under test: *an acknowledged write is committed, and a retried
request is applied once*, whatever dies and whenever. Producers
(:mod:`bench.chaos.producer`, half of them single acknowledged calls, half
pipelines) alternate ``insert_ticks`` (unique ``(source, seq)``) and the
non-idempotent ``audit`` (each with a unique ``detail``), as fast as the
writer takes them, and append every acknowledged request to an ack log that
survives their own SIGKILL. Kill moments and victims come from ``--seed``.

``writer``
    The writer alone (``python -m workers.writer``, as ``testkit`` spawns
    it) under ``--producers`` producers. ``--writer-kills`` times, after a
    random pause: SIGKILL the writer and start a new one at once (as circus
    would); by chance (``--producer-kill-chance``) a random producer is
    SIGKILLed just before or after it and replaced by a new one with a new
    source (what the dead one had in flight is never resent).
``stack``
    The whole stack: the real ``circus.ini`` through ``testkit``'s
    ``CircusStack`` (free ports, private home), the same producers writing
    to its writer. ``--stack-rounds`` times: record every process circusd
    started (its ``list`` command, watcher by watcher, plugins and
    circusd-stats included, with their children such as gunicorn's
    workers), SIGKILL circusd, SIGKILL each recorded process still running,
    then restart as ``make run`` does (``python -m db prepare``, then
    circusd) and wait until it serves.

After the last kill the producers stop cleanly (each waits for its requests
in flight), the writer or stack stops, and :mod:`bench.chaos.ledger`
compares the ack logs with the database: **acknowledged**, **stored**,
**missing** (acknowledged, not stored: must be 0), **applied twice** (must
be 0), **stored, not acked** (in flight when a producer died: allowed),
**failed** requests (a client that gave up: should be 0), **integrity**
(``PRAGMA integrity_check``) and the **time to ready** after each kill
(writer: from SIGKILL to the new writer's first answer; stack: from the
SIGKILL of circusd to every watcher active, the writer answering and
``/api/health`` answering 200). Exit status 0 only when every variant ran
with nothing missing, nothing applied twice and integrity ok.
"""
from __future__ import annotations

# Nothing is imported here at module level: ``python -m bench.chaos.producer``
# imports this package first, and must not import itself twice through it.


def main(argv: list[str] | None = None, prog: str = "python -m bench chaos") -> int:
    """The command (:func:`bench.chaos.cli.main`)."""
    from bench.chaos.cli import main as run

    return run(argv, prog)
