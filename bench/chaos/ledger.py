"""What the producers were told against what the database holds.

The producers' ack logs (:mod:`bench.chaos.producer`) say which requests
were acknowledged; the database, read afterwards with a read-only
connection, says what is stored. From the two:

* **acknowledged**: ticks and audit entries whose request was acknowledged;
* **stored**: those of them found in the database;
* **missing**: acknowledged but not stored (the writer's promise broken);
* **applied twice**: audit entries stored more than once, plus ticks whose
  acknowledgement counted duplicates (every seq is sent in one request only,
  so a duplicate means the writer ran that request twice);
* **stored, not acknowledged**: requests in flight when their producer was
  killed: applied, but nobody was told (allowed: nobody was promised either);
* **integrity**: ``PRAGMA integrity_check``, or on PostgreSQL amcheck's ``bt_index_check`` of
  every index (:func:`db.health.integrity`).

The same on both databases: the rows are read with :func:`testkit.postgres.read_connection`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.chaos.producer import AUDIT_ACTOR, SOURCE_PREFIX
from db.config import Settings
from db.health import integrity, integrity_check
from testkit.postgres import read_connection


@dataclass
class Acks:
    """Everything the producers' ack logs say."""

    ticks: set[tuple[str, int]] = field(default_factory=set)
    audits: Counter[str] = field(default_factory=Counter)
    duplicate_ticks: int = 0
    tick_requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def read(self, source: str, path: Path) -> None:
        """Add the ack log of the producer that wrote ticks as ``source``."""
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return
        for line in text.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "t":
                parts = rest.split()
                if len(parts) != 4:  # the last line of a killed producer may be cut
                    continue
                first, n, _inserted, dups = map(int, parts)
                self.ticks.update((source, s) for s in range(first, first + n))
                self.duplicate_ticks += dups
                self.tick_requests += 1
            elif kind == "a":
                self.audits[rest] += 1
            elif kind == "e":
                self.errors[rest[:160]] += 1


@dataclass
class Verdict:
    """The figures of one run (see the module docstring)."""

    acknowledged: int
    stored: int
    missing: int
    applied_twice: int
    stored_not_acknowledged: int
    failed_requests: int
    integrity: str
    acknowledged_ticks: int
    acknowledged_audits: int
    tick_requests: int
    errors_by_message: dict[str, int]
    missing_examples: list[str]

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.applied_twice == 0 and self.integrity == "ok"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def stored_rows(settings: Settings) -> tuple[set[tuple[str, int]], Counter[str]]:
    """The chaos ticks (source, seq) and audit details (with their counts) in the database."""
    con = read_connection(settings)
    try:
        # The range on source uses the (source, seq) unique index.
        ticks = {(s, q) for s, q in con.execute(
            "SELECT source, seq FROM ticks WHERE source >= ? AND source < ?",
            (SOURCE_PREFIX, SOURCE_PREFIX[:-1] + chr(ord(SOURCE_PREFIX[-1]) + 1)))}
        audits = Counter({d: n for d, n in con.execute(
            "SELECT detail, count(*) FROM audit_log WHERE actor = ? GROUP BY detail", (AUDIT_ACTOR,))})
        return ticks, audits
    finally:
        con.close()


def verdict(acks: Acks, settings: Settings) -> Verdict:
    """Compare the acks with ``settings``' database (read-only; no writer needs to run)."""
    ticks, audits = stored_rows(settings)
    missing_ticks = acks.ticks - ticks
    missing_audits = [d for d in acks.audits if audits[d] == 0]
    twice = acks.duplicate_ticks + sum(n - 1 for n in audits.values() if n > 1)
    # An audit acknowledged twice would be the producer's bug, not the writer's: still counted.
    twice += sum(n - 1 for n in acks.audits.values() if n > 1)
    acked = len(acks.ticks) + len(acks.audits)
    examples = [f"tick {s}/{q}" for s, q in sorted(missing_ticks)[:5]] + [f"audit {d}" for d in missing_audits[:5]]
    if settings.database_path is not None:
        check = integrity_check(settings.database_path)
    else:
        found = integrity(settings)
        check = ["ok"] if found["ok"] and "skipped" not in found else found["messages"] or [found.get("skipped", "?")]
    return Verdict(
        acknowledged=acked,
        stored=acked - len(missing_ticks) - len(missing_audits),
        missing=len(missing_ticks) + len(missing_audits),
        applied_twice=twice,
        stored_not_acknowledged=len(ticks - acks.ticks) + sum(1 for d in audits if d not in acks.audits),
        failed_requests=sum(acks.errors.values()),
        integrity="ok" if check == ["ok"] else "; ".join(check[:5]),
        acknowledged_ticks=len(acks.ticks),
        acknowledged_audits=len(acks.audits),
        tick_requests=acks.tick_requests,
        errors_by_message=dict(acks.errors.most_common(10)),
        missing_examples=examples,
    )
