"""How far tick ids are final: on PostgreSQL, the id below which no tick can still appear
(:class:`TickHorizon`), for the readers that follow ticks by id (the analysis and the monitor)."""
from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from db.models import ticks_table

#: The transactions that may be writing ``ticks`` now: every holder of ROW EXCLUSIVE on it. An INSERT
#: or COPY takes that mode on its table before it draws the first id, whatever stronger mode its
#: transaction holds already (each mode held is its own lock, and its own row here), and any table
#: lock is held until its transaction ends (PostgreSQL's documented locking), so a transaction that
#: drew a tick id is either over or listed here. That mode only: autovacuum's VACUUM or ANALYZE of
#: ``ticks`` (SHARE UPDATE EXCLUSIVE) or a SELECT ... FOR UPDATE (ROW SHARE) draws no id, and, counted
#: as writers, one that ran at a new reader's first call left its bound at 0: an ``--until-idle`` run
#: then analysed nothing ("nothing left to do"), now and then, right after a bulk insert (autovacuum's
#: moment). Virtual ids, because a transaction has one from its start (a real xid only from its first
#: write; see TickHorizon for why xids do not do).
_TICK_WRITERS_SQL = ("SELECT DISTINCT virtualtransaction FROM pg_locks WHERE locktype = 'relation' AND granted "
                     "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                     "AND relation = CAST('ticks' AS regclass) AND mode = 'RowExclusiveLock'")
#: The id sequence must hand out each value when it is drawn: with CACHE n a session holds values
#: drawn earlier and uses them later, without touching the sequence, which the proof below excludes.
_TICK_ID_CACHE_SQL = ("SELECT seqcache FROM pg_sequence "
                      "WHERE seqrelid = CAST(pg_get_serial_sequence('ticks', 'id') AS regclass)")


class TickHorizon:
    """PostgreSQL: the highest tick id below which no tick can still appear, for the readers that
    follow ticks by ``id > cursor`` (analysis, monitor), so that none skips a tick forever.

    Why it is needed: with several writers (hosts), a transaction that drew id 10 may commit after
    one that drew id 11 is already visible; a reader that took 11 and moved its cursor past it never
    reads 10. On SQLite there is one writer and commits are serial: :meth:`advance` returns None and
    runs nothing.

    How: each call samples (``top``: the largest visible id, then ``writers``: the virtual ids of the
    transactions holding ROW EXCLUSIVE on ``ticks``, :data:`_TICK_WRITERS_SQL`), and the bound becomes
    the ``top`` of the latest sample none of whose ``writers`` holds the lock any more.

    Why nothing below the bound can still appear: ids come from one sequence with CACHE 1 (checked),
    so every id <= ``top`` was drawn before ``top`` was, so before the sample's lock read. The
    transaction that drew it did so inside an INSERT or COPY on ``ticks``, holding its lock from
    before the draw to its end. At the lock read it was therefore either over (committed: visible to
    every later snapshot; aborted: the tick never exists) or in ``writers``. When a later read no
    longer lists any of ``writers``, those are over too. So every tick with id <= ``top`` is in every
    snapshot taken after that read, or never will be; :meth:`advance` ends the connection's
    transaction, so the caller's next reads take such a snapshot. A collision of virtual ids can only
    make the bound wait longer, never move early.

    Cost and lag: two small reads per call (an index's last entry, ``pg_locks``), no schema change,
    nothing on the write path. With no write in flight the bound is the latest id at once; under
    steady ingest it is the previous call's ``top`` (a writer's batch transaction ends between two
    calls). A transaction that inserted a tick and stays open holds the bound below its id (on
    purpose: it may still commit); an open transaction that never wrote ``ticks`` does not, nor
    does a VACUUM or ANALYZE of it (autovacuum's) or a row lock taken on it.

    Why not a transaction-id horizon (an xid8 per tick, read ``id > cursor`` among ticks with xid <
    ``pg_snapshot_xmin``): ids and xids are not in the same order. T1 gets its xid, T2 gets a larger
    one and inserts id 10, T1 inserts id 11 and commits: 11 is below the horizon (T2 runs, so xmin is
    T2's), 10 is invisible, and nothing visible says that a smaller id is still coming. Ordering the
    readers by (xid, id) instead would be skip-free, but the cursors (``store_analysis``,
    ``last_tick_id``) are tick ids that never move back."""

    #: Samples kept while the bound waits (a long transaction); dropping one only delays the bound.
    MAX_PENDING = 32

    def __init__(self) -> None:
        self.safe = 0
        self._pending: list[tuple[int, frozenset[str]]] = []
        self._checked = False

    def advance(self, conn: Connection) -> int | None:
        """The bound now (None on SQLite: no bound needed). Call it before the reads it bounds, with
        no transaction of the caller's open on ``conn``: it ends the one it used (PostgreSQL only)."""
        if conn.dialect.name != "postgresql":
            return None
        try:
            if not self._checked:
                cache = conn.exec_driver_sql(_TICK_ID_CACHE_SQL).scalar()
                if cache is not None and cache > 1:
                    raise RuntimeError(f"the ticks id sequence has CACHE {cache}: readers need CACHE 1 to "
                                       "know that no smaller id can still appear (ALTER SEQUENCE ... CACHE 1)")
                self._checked = True
            top = conn.execute(select(func.max(ticks_table.c.id))).scalar() or 0
            writers = frozenset(row[0] for row in conn.exec_driver_sql(_TICK_WRITERS_SQL))  # after top: see above
        finally:
            conn.rollback()  # the caller's reads start a snapshot after the lock read
        if top > self.safe:
            self._pending.append((top, writers))
        # A sample is ready when none of its writers is among those now (its own: when it had none).
        ready = [t for t, w in self._pending if not w & writers]
        if ready:
            self.safe = max(self.safe, *ready)
        self._pending = [(t, w) for t, w in self._pending if t > self.safe]
        if len(self._pending) > self.MAX_PENDING:
            del self._pending[1]  # keep the oldest: it is the next to become ready
        return self.safe
