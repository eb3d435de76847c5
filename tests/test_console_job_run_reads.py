"""The console's Database page reads its job runs (the last 15, the last quick_check, the jobs
worker's last checkpoint) without sorting the table: ``job_runs`` is never pruned, and with a
checkpoint recorded every 30 s under load it holds some 100,000 rows a month. Read newest recorded
first, by id, each read is a walk of an index over the rows it returns; by start time it sorted every
run (or every checkpoint) at each view of the page, about 0.1 s per read at 300,000 runs.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from db.client import WriterClient
from testkit.helpers import ConsoleClient, wait_for
from testkit.writer import Stack
from webapp import create_app


@pytest.fixture
def statements() -> Iterator[list[tuple[str, Any]]]:
    """Every statement any engine of this process runs, with its parameters, while the test runs."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


@pytest.mark.sqlite_only("tests/test_console_database_page.py::test_job_runs_read_as_sentences_with_absolute_utc_times")
def test_the_database_page_reads_its_job_runs_without_sorting_the_table(
        stack: Stack, statements: list[tuple[str, Any]]) -> None:
    stack.start_writer()
    with WriterClient(settings=stack.settings, deadline=20) as client:
        wait_for("the writer to answer", client.ping)
        for i, job in enumerate(("checkpoint", "quick_check", "checkpoint", "backup", "checkpoint")):
            client.call("record_job_run", job=job, started_at=1_000 + i, finished_at=1_001 + i, ok=True,
                        detail="{}")
    console = ConsoleClient.logged_in(create_app("console", stack.settings))
    page = console.get("/console/database")
    assert page.status_code == 200
    # Doctor's findings on the page read the last backup and retention by start time (a few runs a
    # day each, the rule on PostgreSQL with several hosts): not these.
    reads = [(sql, params) for sql, params in statements
             if "FROM job_runs" in sql and "ORDER BY" in sql and not {"backup", "retention"} & set(params)]
    assert len(reads) == 3, reads  # the last 15 runs, the last quick_check, the last checkpoint
    assert stack.settings.database_path is not None
    db = sqlite3.connect(f"file:{stack.settings.database_path}?mode=ro", uri=True)
    try:
        for sql, params in reads:
            plan = " / ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))
            assert "TEMP B-TREE" not in plan, f"{sql} ({params}): {plan}"
    finally:
        db.close()
