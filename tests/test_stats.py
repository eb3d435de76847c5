"""Percentiles: one nearest-rank definition for the writer's stats and the benchmarks."""
from __future__ import annotations

import pytest

from db.sizes import human_bytes
from db.stats import percentile
from webapp.console import formats
from workers.writer import Stats


def test_writer_stats_report_true_nearest_rank_percentiles() -> None:
    stats = Stats()
    stats.commit_ms.extend(float(v) for v in range(100, 0, -1))  # 100 known latencies, 1..100 ms, unsorted
    report = stats.report(queue_depth=0)
    # Nearest rank: p50 of 1..100 is the 50th value, p99 the 99th, the maximum is 100.
    assert (report["commit_p50_ms"], report["commit_p99_ms"], report["commit_max_ms"]) == (50.0, 99.0, 100.0)


def test_writer_stats_report_without_commits_has_no_percentiles() -> None:
    report = Stats().report(queue_depth=3)
    assert (report["commit_p50_ms"], report["commit_p99_ms"], report["queue_depth"]) == (None, None, 3)


@pytest.mark.parametrize("values, p, expected", [
    ([1.0], 0.5, 1.0), ([1.0], 0.99, 1.0),
    ([1.0, 2.0], 0.5, 1.0), ([1.0, 2.0], 0.51, 2.0),
    ([float(v) for v in range(1, 11)], 0.9, 9.0), ([float(v) for v in range(1, 11)], 0.91, 10.0),
    ([float(v) for v in range(1, 1001)], 0.99, 990.0), ([float(v) for v in range(1, 1001)], 1.0, 1000.0),
])
def test_percentile_is_nearest_rank(values: list[float], p: float, expected: float) -> None:
    assert percentile(values, p) == expected


def test_percentile_refuses_a_fraction_out_of_range() -> None:
    assert percentile([], 0.5) is None
    for p in (0, -0.1, 1.5, 50):
        with pytest.raises(ValueError, match="must be in"):
            percentile([1.0], p)


@pytest.mark.parametrize("n, words", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (8 * 2**20, "8.0 MiB"),
                                      (int(78.2 * 2**30), "78.2 GiB"), (3 * 2**40, "3.0 TiB"), (2**52, "4096.0 TiB")])
def test_a_byte_count_is_said_one_way_by_the_cli_health_and_the_console(n: int, words: str) -> None:
    """``db health`` said "78.2 GB" where ``db doctor`` and the console said "78.2 GiB" for the same
    figure: three helpers, two units. Now one (:func:`db.sizes.human_bytes`), the console's filter on it."""
    assert human_bytes(n) == words
    assert formats.human_bytes(n) == words and formats.human_bytes(None) == formats.DASH


@pytest.mark.parametrize("step_s", [-7200.0, 7200.0], ids=["set-back-two-hours", "set-forward-two-hours"])
def test_the_writers_uptime_is_not_moved_by_the_wall_clock(monkeypatch: pytest.MonkeyPatch, step_s: float) -> None:
    """The writer's ``uptime_s`` (its ``stats``, the metric ``tickstack_writer_uptime_seconds``, and the
    sampler's test of a restart between two samples) was the wall clock's now less its start: the clock
    set two hours back under a running writer made it -7,200 s, two hours forward +7,200 s at once
    (fault hunt, stop 53, with a real writer whose clock a preloaded library moved). It is the time
    the process has run."""
    import time

    stats = Stats()
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + step_s)
    assert 0 <= stats.report(queue_depth=0)["uptime_s"] < 3600
