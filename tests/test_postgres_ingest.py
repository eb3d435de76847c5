"""``insert_ticks`` on PostgreSQL goes by COPY straight into ``ticks``, or, for a batch with a
stored key, into a temporary table then one INSERT ... SELECT ... ON CONFLICT (source, seq) DO
NOTHING (:func:`db.statements.copy_ticks`): the same answers as on SQLite."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from db.client import WriterClient
from db.statements import COPY_MIN_TICKS
from tests.test_postgres import stack_on

#: A server's own promises: run by ``pytest --database postgresql`` (the suite's PostgreSQL run).
pytestmark = pytest.mark.postgres_only

NOW_TS = 1_704_067_200_000


_filled = iter(range(1_000_000))


def columns(seqs: list[int | None], source: str = "feed", fill: int = 0) -> dict[str, list]:
    """Ticks of ``source`` with these seqs, then ``fill`` new ticks of source "fill" (to make the
    batch large enough for the COPY path)."""
    sources = [source] * len(seqs) + ["fill"] * fill
    seqs = [*seqs, *(next(_filled) for _ in range(fill))]
    return {"symbol": ["EURUSD"] * len(seqs), "ts": [NOW_TS + i for i in range(len(seqs))],
            "bid": [1.08 + i * 1e-5 for i in range(len(seqs))], "ask": [1.0801 + i * 1e-5 for i in range(len(seqs))],
            "volume": [1.5] * len(seqs), "source": sources, "seq": seqs}


@pytest.mark.parametrize("fill", [0, COPY_MIN_TICKS], ids=["small", "copy"])
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_insert_ticks_counts_duplicates_exactly_and_keeps_the_batch_order(database: str, fill: int,
                                                                         request: pytest.FixtureRequest) -> None:
    """Small batches are INSERTed on both databases; from COPY_MIN_TICKS ticks, PostgreSQL's go by
    COPY. Either way the same answers."""
    stack = stack_on(database, request)
    try:
        stack.start_writer()
        with WriterClient(settings=stack.settings, deadline=30) as client:
            # A repeated (source, seq) inside the batch, and ticks without seq (never duplicates).
            assert client.call("insert_ticks", ticks=columns([5, 3, 5, 9, None, None], fill=fill)) == {
                "inserted": 5 + fill, "duplicates": 1}
            assert client.call("insert_ticks", ticks=columns([5, 3, 9], fill=fill)) == {
                "inserted": fill, "duplicates": 3}
            # Two requests in flight together usually share one batch transaction: each counts its own.
            first = client.submit("insert_ticks", ticks=columns([20, 21, 22], source="b", fill=fill))
            second = client.submit("insert_ticks", ticks=columns([22, 23], source="b", fill=fill))
            client.wait(first)
            client.wait(second)
            assert first.result() == {"inserted": 3 + fill, "duplicates": 0}
            assert second.result() == {"inserted": 1 + fill, "duplicates": 1}
        engine = create_engine(stack.settings.database_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT source, seq, bid, volume FROM ticks WHERE source <> 'fill' "
                                         "ORDER BY id")).all()
                fills = conn.execute(text("SELECT seq FROM ticks WHERE source = 'fill' ORDER BY id")).scalars().all()
        finally:
            engine.dispose()
        assert [(s, q) for s, q, _, _ in rows] == [
            ("feed", 5), ("feed", 3), ("feed", 9), ("feed", None), ("feed", None),
            ("b", 20), ("b", 21), ("b", 22), ("b", 23)]
        assert rows[0][2] == 1.08 and rows[1][2] == 1.08 + 1e-5 and rows[0][3] == 1.5  # doubles, bit for bit
        assert fills == sorted(fills) and len(fills) == 4 * fill  # the batch's order, every one once
    finally:
        stack.close()


def test_a_batch_with_no_stored_key_goes_straight_into_ticks_and_one_with_a_replay_is_deduplicated(
        request: pytest.FixtureRequest) -> None:
    """The fast path is one COPY into ``ticks`` (no temporary table made); a batch that repeats a
    stored (source, seq) falls back to the temporary table and ON CONFLICT, with exact counts, and
    the ids the failed COPY drew are never seen as ticks."""
    stack = stack_on("postgresql", request)
    temp_tables = "SELECT count(*) FROM pg_class WHERE relname = 'ticks_in' AND relpersistence = 't'"
    try:
        stack.start_writer()
        engine = create_engine(stack.settings.database_url)
        try:
            with WriterClient(settings=stack.settings, deadline=30) as client:
                fresh = columns(list(range(100, 100 + COPY_MIN_TICKS)), source="clean")
                assert client.call("insert_ticks", ticks=fresh) == {"inserted": COPY_MIN_TICKS, "duplicates": 0}
                with engine.connect() as conn:
                    assert conn.execute(text(temp_tables)).scalar() == 0
                # The replay's last tick is new: the straight COPY fails on its first tick, not before.
                replay = columns([*range(100, 100 + COPY_MIN_TICKS), 500], source="clean")
                assert client.call("insert_ticks", ticks=replay) == {"inserted": 1, "duplicates": COPY_MIN_TICKS}
                with engine.connect() as conn:
                    assert conn.execute(text(temp_tables)).scalar() == 1
                    seqs = conn.execute(text("SELECT seq FROM ticks WHERE source = 'clean' ORDER BY id")
                                        ).scalars().all()
                    ids = conn.execute(text("SELECT id FROM ticks ORDER BY id")).scalars().all()
        finally:
            engine.dispose()
        assert seqs == [*range(100, 100 + COPY_MIN_TICKS), 500]
        assert ids[:COPY_MIN_TICKS] == list(range(1, COPY_MIN_TICKS + 1)) and len(ids) == COPY_MIN_TICKS + 1
    finally:
        stack.close()


@pytest.mark.parametrize("fill", [0, COPY_MIN_TICKS], ids=["small", "copy"])
def test_new_ticks_that_clash_on_the_id_are_never_counted_as_duplicates(fill: int,
                                                                        request: pytest.FixtureRequest) -> None:
    """After a restore that did not move the id sequence on, new ticks draw ids already stored.
    Before, ``ON CONFLICT DO NOTHING`` (any constraint) skipped them and answered "duplicates": new
    ticks lost. Now only a taken (source, seq) skips a tick; a clash on the id is an error naming
    it, or, where the failed attempt moved the sequence past the stored ids (a COPY draws its whole
    batch's ids before it fails), the careful run stores them. Either way every tick is counted
    for what it is."""
    from db.errors import OpFailed

    stack = stack_on("postgresql", request)
    try:
        stack.start_writer()
        with WriterClient(settings=stack.settings, deadline=30) as client:
            first = client.call("insert_ticks", ticks=columns([1, 2, 3], source="first", fill=fill))
            assert first == {"inserted": 3 + fill, "duplicates": 0}
            engine = create_engine(stack.settings.database_url)
            try:
                with engine.begin() as conn:  # the sequence back at 1, as a careless restore leaves it
                    conn.execute(text("SELECT setval(pg_get_serial_sequence('ticks', 'id'), 1, false)"))
                try:
                    second = client.call("insert_ticks", ticks=columns([1, 2, 3], source="second", fill=fill))
                except OpFailed as e:
                    assert "pk_ticks" in str(e), e
                    second = {"inserted": 0, "duplicates": 0}
                with engine.connect() as conn:
                    stored = conn.execute(text("SELECT count(*) FROM ticks WHERE source = 'second' OR "
                                               f"(source = 'fill' AND id > {3 + fill})")).scalar()
            finally:
                engine.dispose()
        assert second["duplicates"] == 0 and second["inserted"] == stored, (second, stored)
    finally:
        stack.close()
