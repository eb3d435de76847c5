"""A byte count in words, said one way everywhere: ``python -m db``, health's findings and the
console (its ``bytes`` filter) all print 1,536 bytes as ``1.5 KiB`` (units of 1,024, named so)."""
from __future__ import annotations

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    """1536 -> ``1.5 KiB``; whole bytes below 1 KiB, one decimal above, TiB at most."""
    value = float(n)
    for unit in UNITS:
        if abs(value) < 1024 or unit == UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
