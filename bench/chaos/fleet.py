"""The producer processes of a chaos run: started, killed, restarted and
stopped by pid, and their ack logs read back.

A producer that is SIGKILLed is replaced by a new one with a new ``source``
(its *generation*), as an operator's restart would: the old source's acks
stay valid, and a request the dead one had in flight is never resent.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.chaos.ledger import Acks
from bench.chaos.producer import SOURCE_PREFIX
from testkit.env import ROOT

#: Producer modes, alternated: single acknowledged calls, and pipelines.
MODES = ("single", "pipeline")
#: Ticks per insert_ticks request of each mode. A pipeline's 250 go into SQLite as two statements of
#: 100 rows and 50 of one (db.statements.BULK_ROWS), so both ways of inserting are killed mid-way.
TICKS_PER_REQUEST = {"single": 5, "pipeline": 250}


@dataclass
class Slot:
    """One producer position: its mode, its current process, its generations so far."""

    index: int
    mode: str
    proc: subprocess.Popen | None = None
    generation: int = 0
    sources: list[tuple[str, Path]] = field(default_factory=list)


class Fleet:
    """``n`` producers (alternately single-call and pipelined) writing to the
    writer of ``env``, their ack logs in ``folder``."""

    def __init__(self, env: dict[str, str], folder: Path, n: int, *, window: int = 8, pause: float = 0.0,
                 tag: str = "") -> None:
        self.env = env
        self.folder = folder
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.window = window
        self.pause = pause
        self.tag = tag
        self.slots = [Slot(i, MODES[i % len(MODES)]) for i in range(n)]
        self.kills = 0

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        source = f"{SOURCE_PREFIX}{self.tag}p{slot.index}g{slot.generation}"
        log = self.folder / f"{source}.acks"
        cmd = [sys.executable, "-m", "bench.chaos.producer", "--mode", slot.mode, "--source", source,
               "--ack-log", str(log), "--ticks", str(TICKS_PER_REQUEST[slot.mode]), "--window", str(self.window),
               "--pause", str(self.pause)]
        with open(self.folder / f"{source}.log", "wb") as out:
            slot.proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        slot.sources.append((source, log))

    def kill_and_replace(self, index: int) -> str:
        """SIGKILL producer ``index`` and start its next generation; returns the killed source."""
        slot = self.slots[index]
        assert slot.proc is not None
        slot.proc.kill()
        slot.proc.wait()
        self.kills += 1
        killed = slot.sources[-1][0]
        slot.generation += 1
        self._spawn(slot)
        return killed

    def check_alive(self) -> None:
        """Raise if a producer died on its own (its log says why)."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is not None:
                source = slot.sources[-1][0]
                tail = (self.folder / f"{source}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"producer {source} exited with code {slot.proc.returncode}:\n{tail}")

    def stop(self, timeout: float = 120.0) -> list[int | None]:
        """SIGTERM every producer (each waits for its requests in flight) and
        wait; SIGKILL those still running ``timeout`` seconds later. Returns the exit codes."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes = []
        for slot in self.slots:
            if slot.proc is None:
                continue
            try:  # one SIGTERM only: a second one may land while Python exits, with the default action
                slot.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                slot.proc.wait()
            codes.append(slot.proc.returncode)
        return codes

    def acks(self) -> Acks:
        """Every producer's ack log, read back."""
        acks = Acks()
        for slot in self.slots:
            for source, log in slot.sources:
                acks.read(source, log)
        return acks

    def kill_all(self) -> None:
        """On failure: SIGKILL whatever still runs, by pid."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.kill()
                slot.proc.wait()
