"""The one percentile definition of the stack: nearest rank.

The writer's ``stats`` (commit p50/p99), the console's figures and every
benchmark report percentiles with :func:`percentile`, so a p99 means the same
thing everywhere: the smallest value that at least 99 % of the values are at
or below (with 100 values, the 99th smallest; the maximum is the p100).
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values, ``p`` a fraction (0 < p <= 1):
    the value at 1-based rank ``ceil(p * n)``. None for no values."""
    if not 0 < p <= 1:
        raise ValueError(f"percentile: p={p} must be in (0, 1]")
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]
