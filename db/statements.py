"""How rows get into tables fast, on each dialect: the INSERT statements the ops run, compiled
once per dialect, executed on the driver's cursor where that is safe, and on PostgreSQL ticks by
COPY. The ops (:mod:`db.ops`) say *what* changes; this module only how rows travel.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Table, UniqueConstraint, func, insert
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError

from db import engine as engines
from db.models import TICK_KEY, ticks_table
from db.validation import TICK_FIELDS

#: (dialect, table, columns, upsert key, skip key, keep) -> (SQL text, positional parameter order or None).
_compiled: dict[tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[str, ...], bool],
                tuple[str, tuple[str, ...] | None]] = {}


def _dialect_insert(dialect: Dialect) -> Callable[[Table], Any]:
    # Imported here: each dialect's module only in a process that runs on it (PostgreSQL's alone
    # was about 0.03 s of every SQLite process's start).
    if dialect.name == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.insert
    if dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    raise NotImplementedError(f"no upsert support for {dialect.name}")


def compile_insert(dialect: Dialect, table: Table, columns: Sequence[str], update_on: Sequence[str] | None = None,
                   skip_on: Sequence[str] | None = None, keep: bool = False) -> tuple[str, tuple[str, ...] | None]:
    """``INSERT INTO table (columns)``, compiled once per dialect: SQLAlchemy's compile and execute
    path costs tens of microseconds a statement, more than SQLite takes to run a small one. Plain,
    or skipping rows whose unique key ``skip_on`` exists (no other constraint: a clash on the id is
    an error, never a row quietly skipped), or replacing them (``update_on``, the unique key's
    columns: an upsert; with ``keep``, a NULL given leaves the stored value as it is). Returns the
    SQL and the order of its positional parameters (None for a driver with named ones)."""
    key = (dialect.name, table.name, tuple(columns), tuple(update_on or ()), tuple(skip_on or ()), keep)
    found = _compiled.get(key)
    if found is None:
        if update_on or skip_on:
            stmt = _dialect_insert(dialect)(table)
            stmt = (stmt.on_conflict_do_update(index_elements=list(update_on), set_={
                c: func.coalesce(stmt.excluded[c], table.c[c]) if keep else stmt.excluded[c]
                for c in columns if c not in update_on})
                if update_on else stmt.on_conflict_do_nothing(index_elements=list(skip_on or ())))
        else:
            stmt = insert(table)
        compiled = stmt.compile(dialect=dialect, column_keys=list(columns))
        order = tuple(compiled.positiontup) if compiled.positional and compiled.positiontup else None
        found = _compiled[key] = (str(compiled), order)
    return found


def _direct(conn: Connection, order: tuple[str, ...] | None, columns: Sequence[str]) -> bool:
    """Whether rows of ``columns`` go to the DB-API cursor as they are: SQLite, whose compiled
    statement takes exactly these positional parameters in this order (no defaults filled in)."""
    return conn.dialect.name == "sqlite" and order == tuple(columns)


def _driver_error(conn: Connection, sql: str, e: Exception) -> DBAPIError:
    """A driver error as SQLAlchemy would raise it (the writer classifies errors by that)."""
    return DBAPIError.instance(sql, None, e, conn.dialect.loaded_dbapi.Error)


#: Rows per INSERT statement of a bulk write on SQLite (:func:`insert_columns`: ticks, bars and
#: indicator values in columns), within :data:`MAX_PARAMETERS`. One statement of many ``VALUES``
#: rows costs SQLite and the driver far less per row than a statement per row: each statement's
#: step, reset and bindings' setup (and for ticks the AUTOINCREMENT counter's update) is paid once
#: for all its rows. Measured with raw ``sqlite3``, CPU seconds: the rows of ``bench analysis
#: --only hourly`` (45,209 bars and as many rows of indicator values, 5 transactions), 0.45 a row
#: per statement, 0.24 with 100 rows (200: the same; 10: 0.31); 500,000 ticks of one symbol in
#: batches of 5,000 with the writer's ON CONFLICT DO NOTHING, 1.25 a row per statement, 0.50 with
#: 50 or 100 rows (10: 0.61); a review's run on the bench's ticks (four symbols in turn) on a busier
#: machine, 1.34 to 1.41 and 0.75 to 0.86 (10: 1.24 to 1.33).
BULK_ROWS = 100
#: Parameters per statement at most: SQLite's limit before 3.32 (later ones allow 32,766).
MAX_PARAMETERS = 999
#: (SQL, columns, rows) -> the same INSERT with that many ``VALUES`` rows.
_multi: dict[tuple[str, int, int], str | None] = {}


def _multi_row_sql(sql: str, width: int, rows: int) -> str | None:
    """``sql`` (an INSERT of one ``VALUES`` row of ``width`` positional parameters, then perhaps an
    ON CONFLICT clause) with ``rows`` rows of parameters; None when its text is not of that form."""
    key = (sql, width, rows)
    if key not in _multi:
        one = "VALUES (" + ", ".join(["?"] * width) + ")"
        if sql.count(one) != 1 or sql.count("?") != width:
            _multi[key] = None
        else:
            _multi[key] = sql.replace(one, "VALUES " + ", ".join([one[7:]] * rows))
    return _multi[key]


def executemany_columns(cursor: Any, sql: str, cols: Sequence[Sequence[Any]]) -> int:
    """executemany ``sql`` (one row of ``len(cols)`` parameters) on rows given as columns,
    :data:`BULK_ROWS` rows per statement, the last rows one per statement; returns the rows changed.

    Rows go in the order given, each as it would alone: SQLite inserts a statement's ``VALUES`` rows
    one after another, the ON CONFLICT clause applying to each in turn (a key given twice ends as
    its later row in an upsert, as its first with DO NOTHING; ids are taken in the rows' order), so
    the rows stored and the count are those of a row per statement. An error
    fails the statement, and with it the caller's request, as a row's error did. Each statement's
    parameters are a slice of one flat list, filled a column at a time (a slice assignment each),
    which costs half what gathering them row by row does."""
    width, n = len(cols), len(cols[0])
    rows = max(1, min(BULK_ROWS, MAX_PARAMETERS // width))
    # Fewer rows than a statement's (every small request in the commit loop): one per statement,
    # with no look-up of the bulk statement and no copy of the columns.
    multi = _multi_row_sql(sql, width, rows) if 1 < rows <= n else None
    full = n // rows * rows if multi is not None else 0
    changed = 0
    if full:
        flat: list[Any] = [None] * (full * width)
        for j, col in enumerate(cols):
            flat[j::width] = col if full == n else col[:full]
        step = rows * width
        cursor.executemany(multi, (flat[i:i + step] for i in range(0, full * width, step)))
        changed = cursor.rowcount
    if full < n:
        cursor.executemany(sql, zip(*(col[full:] if full else col for col in cols), strict=True))
        changed += cursor.rowcount
    return changed


def insert_columns(conn: Connection, table: Table, columns: Sequence[str], cols: Sequence[Sequence[Any]], *,
                   update_on: Sequence[str] | None = None, skip_on: Sequence[str] | None = None,
                   keep: bool = False) -> int:
    """:func:`insert_many` for rows given as columns (``cols``, in ``columns`` order, of equal
    length): on SQLite :data:`BULK_ROWS` rows per statement (:func:`executemany_columns`), the way
    of the bulk writes given as columns (``insert_ticks``, ``store_analysis``'s bars and indicator
    values); elsewhere as :func:`insert_many` sends rows."""
    sql, order = compile_insert(conn.dialect, table, columns, update_on, skip_on, keep)
    if not _direct(conn, order, columns):
        return insert_many(conn, table, columns, zip(*cols, strict=True), update_on=update_on, skip_on=skip_on,
                           keep=keep)
    cursor = engines.raw_dbapi(conn).cursor()
    try:
        return executemany_columns(cursor, sql, cols)
    except conn.dialect.loaded_dbapi.Error as e:
        # The statement of one row, as the caller compiled it: a bulk statement's text is that
        # row's VALUES a hundred times over.
        raise _driver_error(conn, sql, e) from e
    finally:
        cursor.close()


def insert_many(conn: Connection, table: Table, columns: Sequence[str], values: Iterable[tuple], *,
                 update_on: Sequence[str] | None = None, skip_on: Sequence[str] | None = None,
                 keep: bool = False) -> int:
    """executemany the compiled INSERT (see :func:`compile_insert`) with rows given as tuples in
    ``columns`` order; returns the rows inserted (or replaced). On SQLite the tuples stream into
    the DB-API cursor of the same connection, inside the caller's transaction, with no per-row
    Python and no list of thousands kept alive for the garbage collector to walk; elsewhere
    (PostgreSQL) through SQLAlchemy's driver-level executemany."""
    sql, order = compile_insert(conn.dialect, table, columns, update_on, skip_on, keep)
    if _direct(conn, order, columns):
        cursor = engines.raw_dbapi(conn).cursor()
        try:
            cursor.executemany(sql, values)
            return cursor.rowcount
        except conn.dialect.loaded_dbapi.Error as e:
            raise _driver_error(conn, sql, e) from e
        finally:
            cursor.close()
    params: list = list(values)
    if order is None:
        params = [dict(zip(columns, row, strict=True)) for row in params]
    elif order != tuple(columns):
        index = [columns.index(c) for c in order]
        params = [tuple(row[i] for i in index) for row in params]
    return conn.exec_driver_sql(sql, params).rowcount


def insert_row(conn: Connection, table: Table, values: Mapping[str, Any]) -> int:
    """Insert one row (every column but the id given) and return its id: the compiled statement
    and ``lastrowid`` on SQLite, SQLAlchemy Core (``RETURNING``) elsewhere."""
    columns = tuple(values)
    sql, order = compile_insert(conn.dialect, table, columns)
    if not _direct(conn, order, columns):
        return conn.execute(insert(table), dict(values)).inserted_primary_key[0]
    cursor = engines.raw_dbapi(conn).cursor()
    try:
        cursor.execute(sql, tuple(values.values()))
        return cursor.lastrowid
    except conn.dialect.loaded_dbapi.Error as e:
        raise _driver_error(conn, sql, e) from e
    finally:
        cursor.close()


def upsert_columns(conn: Connection, table: Table, cols: dict[str, list[Any]] | None, names: Sequence[str],
                    keys: Sequence[str]) -> int:
    """Upsert rows given as columns (validated by :mod:`db.columns`) through the compiled statement."""
    if not cols or not cols["ts"]:
        return 0
    return insert_columns(conn, table, names, [cols[c] for c in names], update_on=keys)


def upsert_rows(conn: Connection, table: Table, rows_: list[dict[str, Any]], keys: Sequence[str]) -> int:
    """Upsert rows given as objects (every row with the same fields) through the compiled statement."""
    if not rows_:
        return 0
    names = tuple(rows_[0])
    insert_many(conn, table, names, (tuple(r[c] for c in names) for r in rows_), update_on=keys)
    return len(rows_)


#: From this many ticks a batch goes by COPY on PostgreSQL: below, its round trips (savepoint, COPY,
#: release; a temporary table and an INSERT ... SELECT more for a batch with duplicates) cost more
#: than the INSERTs they save.
COPY_MIN_TICKS = 32
#: PostgreSQL's types of :data:`TICK_FIELDS`, for COPY's binary format (which carries no types).
TICK_COPY_TYPES = ("text", "int8", "float8", "float8", "float8", "text", "int8")
_TICK_COPY_STRAIGHT = f"COPY ticks ({', '.join(TICK_FIELDS)}) FROM STDIN (FORMAT BINARY)"
_TICK_COPY_SQL = (f"COPY pg_temp.ticks_in ({', '.join(TICK_FIELDS)}) FROM STDIN (FORMAT BINARY)",
                  f"INSERT INTO ticks ({', '.join(TICK_FIELDS)}) SELECT {', '.join(TICK_FIELDS)} "
                  "FROM pg_temp.ticks_in ORDER BY n ON CONFLICT (source, seq) DO NOTHING")
#: The (source, seq) key's constraint, named by the models' convention: a COPY that breaks it is a
#: replay; one that breaks another (the id's, after a restore that did not move the sequence on)
#: is an error, never ticks quietly counted as duplicates.
_TICK_KEY_NAME = next(c.name for c in ticks_table.constraints
                      if isinstance(c, UniqueConstraint) and tuple(c.columns.keys()) == TICK_KEY)


def _copy_rows(cursor: Any, sql: str, rows: Iterable[tuple]) -> None:
    with cursor.copy(sql) as copy:
        copy.set_types(TICK_COPY_TYPES)
        for row in rows:
            copy.write_row(row)


def copy_ticks(conn: Connection, columns: Mapping[str, Sequence[Any]]) -> int:
    """PostgreSQL: store a batch of ticks (columns of :data:`TICK_FIELDS`) by ``COPY ... FORMAT
    BINARY`` and return how many were inserted; ids follow the batch's order.

    First straight into ``ticks``, under a savepoint: a batch with no (source, seq) stored already,
    the common case, is then one COPY at the server's full speed. ``ON CONFLICT DO NOTHING`` costs
    the server about as much again as the insert (measured here: 143,000 rows/s against 268,000 for
    the same batches by COPY), and no COPY skips duplicates. If a tick's key is taken (a replay, or a
    key twice in the batch) the COPY fails whole: the savepoint is rolled back (those rows never
    existed; the ids they drew stay unused) and the batch goes by COPY into a session's temporary
    table, then one ``INSERT ... SELECT ... ON CONFLICT (source, seq) DO NOTHING``, which keeps the
    dedup and counts exactly what it inserted. (An ``executemany`` of that INSERT is row by row: SQLAlchemy
    turns insertmanyvalues off for ON CONFLICT without RETURNING.) The transaction keeps its lock on
    ``ticks`` across the rollback if an earlier statement took it, and otherwise takes it again
    before drawing new ids, which is all :class:`db.tick_horizon.TickHorizon` relies on."""
    def rows() -> Iterator[tuple]:
        return zip(*(columns[f] for f in TICK_FIELDS), strict=True)

    errors = conn.dialect.loaded_dbapi
    cursor = engines.raw_dbapi(conn).cursor()
    sql = _TICK_COPY_STRAIGHT
    try:
        cursor.execute("SAVEPOINT tick_copy")
        try:
            _copy_rows(cursor, sql, rows())
        except errors.IntegrityError as e:
            diag = getattr(e, "diag", None)
            if getattr(e, "sqlstate", None) != "23505" or getattr(diag, "constraint_name", None) != _TICK_KEY_NAME:
                raise  # not a replay: the batch's error
            cursor.execute("ROLLBACK TO SAVEPOINT tick_copy")
        else:
            cursor.execute("RELEASE SAVEPOINT tick_copy")
            return len(columns["ts"])
        cursor.execute("RELEASE SAVEPOINT tick_copy")
        cursor.execute("CREATE TEMP TABLE IF NOT EXISTS ticks_in (n bigserial, symbol text, ts int8, bid float8, "
                       "ask float8, volume float8, source text, seq int8) ON COMMIT DELETE ROWS")
        cursor.execute("TRUNCATE pg_temp.ticks_in")  # another op of the same batch may have filled it
        sql = _TICK_COPY_SQL[0]
        _copy_rows(cursor, sql, rows())
        sql = _TICK_COPY_SQL[1]
        cursor.execute(sql)
        return cursor.rowcount
    except errors.Error as e:
        raise _driver_error(conn, sql, e) from e
    finally:
        cursor.close()
