"""One chaos producer: ``python -m bench.chaos.producer --mode single|pipeline ...``.

It writes through :class:`db.client.WriterClient` as fast as the writer
takes it, alternating ``insert_ticks`` (its own ``source``, each ``seq``
sent in exactly one request) and ``audit`` (no unique key, so a request the
writer applied twice would be two rows), and appends one line per
*acknowledged* request to its ack log:

``t FIRST_SEQ COUNT INSERTED DUPLICATES``
    an ``insert_ticks`` of seqs ``FIRST_SEQ .. FIRST_SEQ+COUNT-1``; every seq
    is new, so ``DUPLICATES > 0`` means the writer ran the request twice;
``a DETAIL``
    an ``audit`` whose ``detail`` is unique to the request;
``e MESSAGE``
    a request that failed (none should: the client's deadline outlasts any
    restart here).

Each line is one ``write(2)`` to a file opened with ``O_APPEND``: once the
write returns, the kernel has it, so a SIGKILL of this process loses at most
the ack it was about to record (that request then shows as stored but not
acknowledged, which is allowed). SIGTERM stops it cleanly: it sends nothing
new, waits for every request in flight, and exits 0. It also stops when its
parent (the benchmark) goes away.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

from db.client import MAX_PIPELINE_WINDOW, Ticket, WriterClient
from db.config import load_settings
from db.parsers import MAX_CLIENT_DEADLINE_S, number_flag, whole_flag
from db.validation import MAX_TICKS

#: The longest gap, pause or settle of a chaos run, in seconds (the benchmark's flags, and the pause it
#: passes here): an hour with no kill (or no request from a producer) is already a run that tests
#: nothing; beyond it a typo (past about 9e9 time.sleep refuses it: OverflowError).
MAX_SECONDS = 3600.0
#: Every row the chaos benchmark writes is tagged with this, to find them again.
SOURCE_PREFIX = "chaos-"
AUDIT_ACTOR = "chaos"
SYMBOL = "CHAOS"
TS0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z


class AckLog:
    """The producer's record of acknowledged requests (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def line(self, text: str) -> None:
        os.write(self.fd, (text.replace("\n", " ") + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


def tick_args(source: str, first_seq: int, n: int) -> dict[str, Any]:
    """``insert_ticks`` arguments for seqs ``first_seq .. first_seq+n-1`` (columns form)."""
    seqs = list(range(first_seq, first_seq + n))
    bid = [100.0 + (s % 100) * 0.01 for s in seqs]
    return {"ticks": {"symbol": [SYMBOL] * n, "ts": [TS0 + s for s in seqs], "bid": bid,
                      "ask": [b + 0.01 for b in bid], "source": [source] * n, "seq": seqs}}


def audit_args(detail: str) -> dict[str, Any]:
    return {"actor": AUDIT_ACTOR, "action": "chaos", "target": "bench", "detail": detail}


class Producer:
    """Alternates ticks and audits until asked to stop; see the module docstring."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.source = opts.source
        self.log = AckLog(opts.ack_log)
        self.parent = os.getppid()
        self.running = True
        self.next_seq = 0
        self.k = 0

    def stop(self, _signum: int = 0, _frame: Any = None) -> None:
        self.running = False

    def alive(self) -> bool:
        return self.running and os.getppid() == self.parent

    def next_request(self) -> tuple[str, dict[str, Any], str]:
        """The next request (op, args) and the ack line it earns, less its result."""
        self.k += 1
        if self.k % 2:
            first, n = self.next_seq, self.opts.ticks
            self.next_seq += n
            return "insert_ticks", tick_args(self.source, first, n), f"t {first} {n}"
        detail = f"{self.source}:{self.k}"
        return "audit", audit_args(detail), f"a {detail}"

    def record(self, line: str, result: Any = None, error: BaseException | None = None) -> None:
        if error is not None:
            self.log.line(f"e {type(error).__name__}: {error}")
        elif line.startswith("t "):
            self.log.line(f"{line} {result['inserted']} {result['duplicates']}")
        else:
            self.log.line(line)

    def run_single(self, client: WriterClient) -> None:
        while self.alive():
            op, args, line = self.next_request()
            try:
                result = client.call(op, **args)
            except Exception as e:  # recorded: the benchmark reports every failed request
                self.record(line, error=e)
            else:
                self.record(line, result)
            if self.opts.pause:
                time.sleep(self.opts.pause)

    def run_pipeline(self, client: WriterClient) -> None:
        lines: dict[int, str] = {}

        def done(ticket: Ticket) -> None:
            self.record(lines.pop(ticket.seq), None if ticket.error else ticket.result(), ticket.error)

        with client.pipeline(window=self.opts.window, on_done=done) as pipe:
            while self.alive():
                op, args, line = self.next_request()
                ticket = pipe.submit(op, **args)
                lines[ticket.seq] = line
                if self.opts.pause:
                    time.sleep(self.opts.pause)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        with WriterClient(settings=load_settings(), deadline=self.opts.deadline) as client:
            if self.opts.mode == "single":
                self.run_single(client)
            else:
                self.run_pipeline(client)
        self.log.close()
        return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.chaos.producer", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("single", "pipeline"), required=True)
    p.add_argument("--source", required=True, help=f"tick source, starting with {SOURCE_PREFIX!r}")
    p.add_argument("--ack-log", required=True, help="file the acknowledged requests are appended to")
    p.add_argument("--ticks", type=whole_flag(1, MAX_TICKS), default=5,
                   help=f"ticks per insert_ticks request (at most {MAX_TICKS:,}, the writer's limit)")
    p.add_argument("--window", type=whole_flag(1, MAX_PIPELINE_WINDOW), default=8,
                   help="pipeline: requests in flight")
    p.add_argument("--pause", type=number_flag(0, MAX_SECONDS), default=0.0, help="seconds between two requests")
    p.add_argument("--deadline", type=number_flag(0, MAX_CLIENT_DEADLINE_S, above=True), default=300.0,
                   help="seconds a request keeps retrying")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    opts = p.parse_args(argv)
    if not opts.source.startswith(SOURCE_PREFIX):
        p.error(f"--source must start with {SOURCE_PREFIX!r}")
    return Producer(opts).run()


if __name__ == "__main__":
    sys.exit(main())
