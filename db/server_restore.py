"""Put a PostgreSQL backup (the jobs worker's ``pg_dump -Fc`` ``.dump``) back into the database,
``python -m db restore FILE.dump``, with the stack stopped on every host: what :mod:`db.restore`
does for an SQLite file, done the server's way.

The steps a DBA would take, each with its trap closed:

* the archive is listed first (``pg_restore --list``): a file that is not one is refused before
  anything is dropped;
* the archive must be a tickstack database's (its ``schema_version`` and ``ticks`` tables): any
  other dump restored "successfully" put its tables beside the stack's and changed none of them;
  its extensions (a DBA's amcheck, in a dump made by hand) are left out, and left as they are in
  the database: the owner role may not drop or create them, and the schema needs none;
* no tickstack session of any host may be connected to the database: a writer would go on writing
  into tables being dropped and made again, and a reader's open transaction holds the locks the
  drops wait for. Sessions of other programs are not refused, but one holding a lock on the stack's
  tables (a DBA's psql left in a transaction) is: the tables are locked for
  :data:`db.server.MAINTENANCE_LOCK_WAIT_S` first and the holders named, where pg_restore (its
  script sets ``lock_timeout = 0``) waited without a word for the hour the restore may take;
* the database as it is is dumped first, to ``tickstack.replaced-<UTC time>.dump`` in the home, as
  :mod:`db.restore` keeps the SQLite file it replaces (``keep=False``, ``--no-copy``: a database
  pg_dump cannot read, its copy refused with pg_dump's words);
* ``pg_restore --clean --if-exists`` (without ``--clean`` nothing is restored: every table exists)
  sets the id sequences back to the dump's values, so the tick and trade ids given after the dump
  would be given again: a consumer that resumes from the last tick id it read would skip the new
  ticks, and a client's ``close_trade`` of a trade opened after the dump would close another. The
  sequences are read before and set on from the higher value after, as :mod:`db.restore`
  continues SQLite's AUTOINCREMENT counters, in the restore's own transaction: pg_restore writes
  its script (``-f -``), psql runs it between our ``BEGIN`` and, once pg_restore has ended well,
  the sequences' ``setval`` and our ``COMMIT``. Done in a second transaction after pg_restore's, a restore
  killed between the two (or its connection lost, or the server stopped) left the dump's rows with
  the dump's sequences, without a word. Not ``psql --single-transaction``: it commits at the end of
  its input, and a restore killed while it writes that input ends it. A dump's large objects are
  left out, and left as they are in the database: pg_restore's script commits their data in a
  transaction of its own (the stack stores none).

As ``DATABASE_URL``'s role (the tables' owner), its password in a private ``PGPASSFILE``
(:func:`db.server.libpq_env`), never on a command line; every error text has it cut out.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from db.backups import replaced_copy
from db.circusd import circusctl_command
from db.config import Settings
from db.engine import display_url
from db.errors import MaintenanceFailed
from db.restore import stop_signals_held
from db.server import MAINTENANCE_LOCK_WAIT_S, connect, dump, libpq_env, pg_program, private_folder, scrub

#: The sequences of the schema and their values (None: never used), by name.
_SEQUENCES_SQL = ("SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = current_schema() "
                  "ORDER BY 1")
#: tickstack's other sessions on this database (every one names itself: db.engine.application_name).
_OURS_SQL = ("SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
             "AND pid <> pg_backend_pid() AND application_name LIKE 'tickstack %' ORDER BY 1")
_TOP_TRADE_SQL = "SELECT max(id) FROM trades"
#: The tables a tickstack dump has whatever its schema version (db.schema's v1 made them).
_OUR_TABLES = ("schema_version", "ticks")
#: The schema's tables and views of the given names, each one's name as the schema qualifies it, its
#: kind and its bare name: those of the dump's names are what pg_restore --clean drops (each needs its
#: ACCESS EXCLUSIVE lock; a table of the DBA's own, which the restore leaves alone, is not in the
#: way), and the stack's that a dump of another schema version has not, or has as the other kind, are
#: dropped before its script.
_RELATIONS_SQL = ("SELECT format('%%I.%%I', n.nspname, c.relname), "
                  "CASE c.relkind WHEN 'v' THEN 'VIEW' ELSE 'TABLE' END, c.relname "
                  "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() "
                  "AND c.relkind IN ('r', 'p', 'v') AND c.relname = ANY(%s) ORDER BY 1")
#: The other sessions holding a lock on one of those relations. (Another role's session's state is
#: NULL unless this role may read all stats: left out then.)
_HOLDERS_SQL = ("SELECT DISTINCT a.pid, concat_ws(', ', coalesce(nullif(a.application_name, ''), '(unnamed)'), "
                "'role ' || a.usename, a.state) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.granted AND l.locktype = 'relation' AND l.relation = ANY(%s::regclass[]) "
                "AND a.pid <> pg_backend_pid() ORDER BY 1")


def _list(source: Path, env: dict[str, str], timeout: float) -> tuple[list[str], dict[str, str]]:
    """The archive's entries (``pg_restore --list``'s lines) and its tables and views, each name's
    kind (``TABLE`` or ``VIEW``); ValueError when it is not one it can read, or not a tickstack
    database's."""
    if not source.is_file():
        raise ValueError(f"{source}: no such file" if not source.exists() else f"{source} is not a file")
    with open(source, "rb") as f:
        if f.read(5) != b"PGDMP":
            raise ValueError(f"{source} is not a PostgreSQL dump (pg_dump -Fc, the jobs worker's .dump backups): "
                             "on PostgreSQL, db restore takes those")
    done = subprocess.run([pg_program("pg_restore"), "--list", str(source)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise ValueError(f"{source} cannot be read by pg_restore: {done.stderr.strip()[-500:]} (nothing was changed)")
    entries = [line for line in done.stdout.splitlines() if line and not line.startswith(";")]
    listed = [line.split() for line in entries]  # "12; 1259 163 TABLE public ticks owner"
    tables = {parts[5] for parts in listed if len(parts) > 5 and parts[3] == "TABLE" and parts[4] != "DATA"}
    views = {parts[5] for parts in listed if len(parts) > 5 and parts[3] == "VIEW"}
    missing = [name for name in _OUR_TABLES if name not in tables]
    if missing:
        raise ValueError(f"{source} is a PostgreSQL dump, but not of a tickstack database (it has no "
                         f"{' or '.join(missing)} table): restoring it would put its tables beside the stack's and "
                         "change none of them (nothing was changed)")
    return entries, {**{name: "TABLE" for name in tables}, **{name: "VIEW" for name in views}}


def _restorable(entries: list[str], role: str) -> list[str]:
    """The entries but the extensions and the large objects, with their comments and grants, left as
    they are in the database. Extensions: a DBA's (amcheck, for quick_check), which a dump made by
    hand has and the owner role may not drop or create ("must be owner of extension"). Large objects
    (a DBA's too: the stack stores none): pg_restore's script restores their data between a BEGIN
    and a COMMIT of its own, which would commit the restore's transaction halfway. And the default
    privileges of roles other than ``role`` (the restoring one, DATABASE_URL's, which owns what it
    restores: ``--no-owner``): on a new server whose owner role has another name, ``ALTER DEFAULT
    PRIVILEGES FOR ROLE ts_owner`` is refused ("must be member of role"); the DBA set its own."""
    def left_out(parts: list[str]) -> bool:  # "5; 3079 16384 EXTENSION - amcheck", "COMMENT - EXTENSION x",
        # "7; 2613 16500 BLOB - 16500 owner", "8; 0 0 BLOBS - BLOBS", "9; 0 0 ACL - LARGE OBJECT 16500 owner"
        # (PostgreSQL 17: "BLOB METADATA - 16500..16599 owner")
        # "6; 826 16396 DEFAULT ACL public DEFAULT PRIVILEGES FOR TABLES ts_owner" (its role last)
        return parts[3:4] in (["EXTENSION"], ["BLOB"], ["BLOBS"]) \
            or (parts[4:5] == ["-"] and parts[5:6] in (["EXTENSION"], ["LARGE"])) \
            or (parts[3:5] == ["DEFAULT", "ACL"] and parts[-1] != role)
    return [line for line in entries if not left_out(line.split())]


def _relations(conn: Any, kinds: dict[str, str]) -> tuple[list[str], list[str], str]:
    """Of the database's tables and views: those of the dump (its relations' ``kinds``), as the schema
    qualifies them (none in a database made empty for the restore, a new server's); the stack's that
    the dump has not as they are; and the statements that drop the latter, views first, in the
    restore's transaction. A dump of an older schema version: before v3, ``indicators`` was a table,
    and pg_restore's script of it stopped at the view of that name (``ALTER TABLE ... DROP
    CONSTRAINT``: a view has none), so no such dump could be restored; and ``bar_indicators``, which it
    has not, kept the replaced database's rows (and made the v3 migration skip its step). Without
    them, the database holds the dump's schema as it was, and the writer migrates it."""
    from psycopg import sql

    from db.models import metadata
    from db.schema import BAR_INDICATORS

    ours = {*metadata.tables, BAR_INDICATORS.name}
    found = conn.execute(_RELATIONS_SQL, (sorted(ours | set(kinds)),)).fetchall()
    present = [name for name, _kind, bare in found if bare in kinds]
    stale = [(name, kind) for name, kind, bare in found if bare in ours and kinds.get(bare) != kind]
    views = [sql.SQL(name) for name, kind in stale if kind == "VIEW"]  # schema-qualified, quoted by the server
    tables = [sql.SQL(name) for name, kind in stale if kind == "TABLE"]
    statements = [sql.SQL("DROP {} {};").format(sql.SQL(what), sql.SQL(", ").join(names))
                  for what, names in (("VIEW", views), ("TABLE", tables)) if names]
    return present, [name for name, _kind in stale], "".join(statement.as_string(conn) + "\n"
                                                             for statement in statements)


def _locks_in_the_way(conn: Any, relations: list[str]) -> str | None:
    """The sessions holding a lock on ``relations`` (:func:`_relations`) that the restore would wait
    for, said, once it has waited :data:`db.server.MAINTENANCE_LOCK_WAIT_S` to lock them all itself
    (then let go); None when none (or when it may not lock one: pg_restore says why)."""
    import psycopg

    if not relations:
        return None
    try:
        with conn.transaction():
            conn.execute(f"SET LOCAL lock_timeout = '{int(MAINTENANCE_LOCK_WAIT_S * 1000)}ms'")
            conn.execute(f"LOCK TABLE {', '.join(relations)} IN ACCESS EXCLUSIVE MODE")
            raise _LetGo
    except _LetGo:
        return None
    except psycopg.errors.LockNotAvailable:
        held = conn.execute(_HOLDERS_SQL, (relations,)).fetchall()
        who = ", ".join(f"server pid {pid} ({what})" for pid, what in held[:5])
        return (f"another session holds a lock on the stack's tables, which the restore would wait for without end: "
                f"{who or 'a session now gone'}. End its transaction (or, as a superuser: SELECT "
                "pg_terminate_backend(PID)), then restore again (nothing was changed)")
    except psycopg.errors.InsufficientPrivilege:  # not the owner of one: pg_restore's drop of it says so
        return None


class _LetGo(Exception):
    """Rolls back the transaction that took the locks, once they are had."""


def _ids(conn: Any, has_trades: bool) -> tuple[dict[str, int | None], int]:
    """The schema's sequences and their values, and the highest trade id (0: none, or no ``trades``
    table: a database made empty for the restore, on a new server; PostgreSQL resolves a table's name
    as it parses a statement, so the statement that reads it cannot guard itself)."""
    sequences = {name: None if value is None else int(value) for name, value in conn.execute(_SEQUENCES_SQL)}
    return sequences, int(conn.execute(_TOP_TRADE_SQL).fetchone()[0] or 0) if has_trades else 0


#: How the restore's own statements' rows begin in psql's output, told from the rows of the script's.
_RAISED = "tickstack raised "
_TOP_TRADE = "tickstack top trade "
_REOPENED = "tickstack reopened trade "
#: The replaced database's closed trades, kept in the restore's transaction for :data:`_REOPENED`.
_CLOSED_BEFORE = "tickstack_closed_trades"
#: What psql prints once it has run all the restore but its COMMIT.
_READY = "tickstack ready to commit"
#: How the restore's transaction id begins in psql's output (asked of the server when psql's end
#: does not say whether our COMMIT was done).
_TXID = "tickstack transaction "


def _closed_before(conn: Any) -> str:
    """What psql runs first in the restore's transaction, before pg_restore's script drops ``trades``:
    the replaced database's closed trades' ids into a temporary table, for :func:`_last_statements`'
    trades the dump has open. Quoted as ``conn``'s server quotes."""
    from psycopg import sql

    schema = conn.execute("SELECT current_schema()").fetchone()[0]
    return sql.SQL("CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT id FROM {} WHERE status = 'closed';\n").format(
        sql.Identifier(_CLOSED_BEFORE), sql.Identifier(schema, "trades")).as_string(conn)


def _last_statements(conn: Any, before: dict[str, int | None], has_trades: bool, closed_before: bool) -> str:
    """What psql runs after pg_restore's script, in its transaction, before our COMMIT: each sequence
    the dump set lower than the replaced database had it set on to that value (``setval``: its next
    id is one more; one the replaced database never used, or the dump has not, is left as the dump
    has it), a row ``tickstack raised VALUE NAME`` each; ``tickstack top trade ID``, the highest
    trade id the dump has (0: none); and with ``closed_before`` (:func:`_closed_before` ran), a row
    ``tickstack reopened trade ID`` for each trade the dump has open that the replaced database had
    closed. Quoted as ``conn``'s server quotes."""
    from psycopg import sql

    schema = conn.execute("SELECT current_schema()").fetchone()[0]  # the script sets search_path to ''
    statements = [sql.SQL(
        "SELECT pg_catalog.format({}, pg_catalog.setval(pg_catalog.format('%I.%I', s.schemaname, s.sequencename)"
        "::regclass, {}), s.sequencename) FROM pg_catalog.pg_sequences s WHERE s.schemaname = {} "
        "AND s.sequencename = {} AND coalesce(s.last_value, 0) < {};").format(
            _RAISED + "%s %s", value, schema, name, value)
        for name, value in sorted(before.items()) if value is not None]
    if has_trades:
        statements.append(sql.SQL("SELECT pg_catalog.format({}, coalesce(max(id), 0)) FROM {};").format(
            _TOP_TRADE + "%s", sql.Identifier(schema, "trades")))
    if has_trades and closed_before:
        statements.append(sql.SQL("SELECT pg_catalog.format({}, t.id) FROM {} t JOIN pg_temp.{} c ON c.id = t.id "
                                  "WHERE t.status = 'open' ORDER BY t.id;").format(
            _REOPENED + "%s", sql.Identifier(schema, "trades"), sql.Identifier(_CLOSED_BEFORE)))
    return "".join(statement.as_string(conn) + "\n" for statement in statements)


def _asked(printed: list[str], status: Callable[[int], str | None]) -> str | None:
    """What the server says of the restore's transaction (its id as psql printed it): ``committed``,
    ``aborted``, or None when it cannot say (or cannot be asked)."""
    txid = next((int(line[len(_TXID):]) for line in printed if line.startswith(_TXID)), None)
    try:
        return None if txid is None else status(txid)
    except Exception:  # the server gone: its answer is not known
        return None


def _in_one_transaction(script: list[str], psql: list[str], env: dict[str, str], first: str, last: str,
                        timeout: float, url: str, committed: threading.Event,
                        status: Callable[[int], str | None]) -> str:
    """Runs ``script`` (pg_restore writing its SQL to stdout) into ``psql`` (reading stdin, stopping at
    the first error) between a ``BEGIN`` and ``first``, and, only when pg_restore ended well, ``last`` and then, once
    psql has run all of that (it prints :data:`_READY`), ``COMMIT``; psql's output. Anything else ends
    psql's session before its input does, so the server rolls the transaction back: pg_restore
    failing midway (psql killed, its input never ended), psql stopping at an error (pg_restore
    killed), ``timeout`` passed (both), this process killed (psql's input ends without COMMIT).
    MaintenanceFailed with pg_restore's or psql's words, the password cut out. ``committed`` is set
    once psql has run our COMMIT without an error, or once the server, asked by ``status`` (the
    transaction's txid_status), says it committed what psql ended without saying (a stop asked for
    meanwhile is taken after that). Ctrl-C in a terminal reaches psql too: stopped, it sends the
    server a cancel and exits 3, its COMMIT done or not, and the stop the restore took after it said
    "nothing changed" of a database that held the dump."""
    runner = subprocess.Popen(psql, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        writer = subprocess.Popen(script, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except BaseException:
        runner.kill()
        runner.wait()
        raise
    said: dict[str, bytes] = {}
    printed: list[str] = []
    ready = threading.Event()

    def drain(name: str, stream: Any) -> None:
        said[name] = stream.read()

    def read_printed() -> None:
        for line in runner.stdout:
            printed.append(line.decode(errors="replace").rstrip("\n"))
            if printed[-1] == _READY:
                ready.set()
    readers = [threading.Thread(target=read_printed, daemon=True)] + [
        threading.Thread(target=drain, args=item, daemon=True)
        for item in (("psql", runner.stderr), ("pg_restore", writer.stderr))]
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        runner.kill()
        writer.kill()
    watchdog = threading.Timer(timeout, stop)
    committing = writer_stopped = False
    for thread in (*readers, watchdog):
        thread.start()
    try:
        try:
            runner.stdin.write(f"BEGIN;\n{first}".encode())
            while chunk := writer.stdout.read1(1 << 16):  # what there is, as it comes: a COPY's rows too
                runner.stdin.write(chunk)
                runner.stdin.flush()
            if writer.wait() == 0:
                runner.stdin.write(f"{last}SELECT '{_TXID}' || pg_catalog.txid_current();\n"
                                   f"SELECT '{_READY}';\n".encode())
                runner.stdin.flush()
                while not ready.wait(0.1) and runner.poll() is None:
                    pass
                if ready.is_set() and not timed_out.is_set():
                    try:
                        with stop_signals_held():  # Ctrl-C now is taken once the outcome is known
                            runner.stdin.write(b"COMMIT;\n")
                            committing = True
                            runner.stdin.close()  # the end of psql's input: it commits
                            if runner.wait() == 0:
                                committed.set()
                            else:
                                said = _asked(printed, status)
                                if said == "committed":
                                    committed.set()
                                elif said == "aborted":
                                    committing = False  # the server rolled it back: nothing was changed
                    except KeyboardInterrupt:
                        if committing and not committed.is_set():
                            raise MaintenanceFailed("stopped as it committed, and the server could not be asked "
                                                    "whether it did (one transaction: all of it or nothing was "
                                                    "committed); look at the database before starting the "
                                                    "stack") from None
                        raise
        except BrokenPipeError:  # psql stopped reading: it stopped at an error, or the watchdog killed it
            writer_stopped = writer.poll() is None
        if not committing:
            runner.kill()  # before its input ends: psql (not --single-transaction) commits nothing then
        writer.kill()  # it ended, or psql did: it would wait for ever to write on
        runner.wait()
        writer.wait()
    finally:
        watchdog.cancel()
        for proc in (runner, writer):
            if proc.poll() is None:  # an exception of ours (KeyboardInterrupt): nothing committed
                proc.kill()
                proc.wait()
        for thread in readers:
            thread.join(10)
        for stream in (runner.stdin, writer.stdout):
            try:
                stream.close()
            except BrokenPipeError:
                pass
    if committed.is_set():
        return "\n".join(printed)
    # psql had run all but our COMMIT without an error: a session lost (or stopped) then may have
    # committed first, and is said so.
    outcome = ("(one transaction: all of it or nothing was committed, as its COMMIT ended)" if committing else
               "(one transaction: nothing was changed)")
    if timed_out.is_set():
        raise MaintenanceFailed(f"the restore did not end within {timeout:g} s and was stopped {outcome}")
    if writer.returncode != 0 and not writer_stopped:
        name, code = "pg_restore", writer.returncode
    else:
        name, code = "psql", runner.returncode
    text = said.get(name, b"").decode(errors="replace").strip()
    # psql's "psql:<stdin>:N: ERROR:  ...", then the statement it stopped at (--echo-errors), however
    # long: from the first, as the statement or a COPY's context may hold "ERROR:" too.
    error_at = text.find(": ERROR:")
    words = scrub(text[error_at + 2:][:1500] if error_at >= 0 else text[-1500:], url)
    raise MaintenanceFailed(f"{name} failed ({code}): {words} {outcome}")


def restore_dump(settings: Settings, source: Path, timeout: float = 3600.0, *, keep: bool = True,
                 done: threading.Event | None = None) -> dict[str, Any]:
    """``pg_restore --clean --if-exists`` of ``source`` into ``DATABASE_URL``'s database (see the
    module docstring); returns ``restored`` (the database, no password), ``source``, ``entries``,
    ``replaced`` (the dump of the database it replaced, None with ``keep=False`` or when ``empty``),
    ``empty`` (the database had none of the dump's tables: a new server's, nothing was replaced),
    ``ids_continued`` (the sequences set on to the replaced database's values, by name) and
    ``trades_lost`` (the first and last id of the trades it had and the dump has not, else None) and
    ``trades_reopened`` (the ids of the trades it had closed and the dump has open).
    ``done`` is set once the restore's transaction is committed (a stop asked for as it commits is
    taken after: the caller's words on a stop go by it).
    Raises ValueError (what is in the way, said: nothing was changed) or MaintenanceFailed (the
    restore itself failed: pg_restore's or psql's words)."""
    url = settings.database_url
    source = Path(source).absolute()
    private = private_folder(settings)
    try:
        conninfo, env = libpq_env(url, private, settings.host, "restore")
        listed, kinds = _list(source, env, timeout)
        entries = len(listed)
        chosen = private / "entries.list"  # pg_restore -L: what it restores (0600, in the 0700 folder)
        # --no-owner: DATABASE_URL's role owns what it restores, as the writer's migrations need it to,
        # whatever the dump's owner was named (ALTER ... OWNER TO ts_owner failed on a new server whose
        # owner role has another name: "must be member of role").
        script = [pg_program("pg_restore"), "--clean", "--if-exists", "--no-owner", "-L", str(chosen), "-f", "-",
                  str(source)]
        # psql stops at the first error and says which statement it was (--echo-errors); rows unadorned.
        psql = [pg_program("psql"), "--no-psqlrc", "--no-password", "--quiet", "--echo-errors", "--no-align",
                "--tuples-only", "-v", "ON_ERROR_STOP=1", "-d", conninfo]  # found before anything is done
        try:
            conn = connect(url, "restore", settings.host, timeout=10, read_only=False)
        except Exception as e:
            raise ValueError(f"cannot connect to the database as DATABASE_URL's role: "
                             f"{scrub(' '.join(str(e).split()), url)} (nothing was changed)") from None
        with conn:
            ours = [app for (app,) in conn.execute(_OURS_SQL)]
            if ours:
                raise ValueError(f"the stack still has {len(ours)} session(s) on the database ({', '.join(ours[:5])}"
                                 f"{', ...' if len(ours) > 5 else ''}): stop it on every host first "
                                 f"(`{circusctl_command(settings.circus_endpoint, 'quit')}` on each), then restore, "
                                 "then `make run`")
            present, stale, first = _relations(conn, kinds)
            in_the_way = _locks_in_the_way(conn, sorted({*present, *stale}))
            if in_the_way is not None:
                raise ValueError(in_the_way)
            had_trades = any(name.split(".")[-1] == "trades" for name in present)
            before, replaced_top_trade = _ids(conn, had_trades)
            if had_trades:
                first = _closed_before(conn) + first
            last = _last_statements(conn, before, "trades" in kinds, had_trades)
            role = conn.execute("SELECT current_user").fetchone()[0]
        fd = os.open(chosen, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(_restorable(listed, role)) + "\n")
        replaced = None
        if keep and (present or stale):  # a database without the stack's tables replaces nothing: no copy of it
            aside = replaced_copy(settings)  # a restore within the same second: the first one's copy is kept
            try:
                replaced = Path(dump(settings, aside, timeout)["path"])
            except (MaintenanceFailed, OSError) as e:
                raise ValueError(f"the database could not be dumped before it is replaced ({e}); to restore "
                                 "without that copy: python -m db restore --no-copy "
                                 f"{shlex.quote(str(source))} (nothing was changed)") from None
        def status(txid: int) -> str | None:
            with connect(url, "restore", settings.host, timeout=10, read_only=False) as asking:
                return asking.execute("SELECT txid_status(%s)", (txid,)).fetchone()[0]
        printed = _in_one_transaction(script, psql, env, first, last, timeout, url, done or threading.Event(), status)
        # What the committed transaction did, as its own statements printed it (each setval that ran,
        # the dump's top trade): not worked out again from values read before or after it.
        raised: dict[str, int] = {}
        top_trade = 0
        reopened: list[int] = []
        for line in printed.splitlines():
            if line.startswith(_RAISED):
                value, name = line[len(_RAISED):].split(" ", 1)
                raised[name] = int(value)
            elif line.startswith(_TOP_TRADE):
                top_trade = int(line[len(_TOP_TRADE):])
            elif line.startswith(_REOPENED):
                reopened.append(int(line[len(_REOPENED):]))
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return {"restored": display_url(url), "source": str(source), "entries": entries,
            "replaced": None if replaced is None else str(replaced), "empty": not (present or stale),
            "ids_continued": raised,
            "trades_lost": [top_trade + 1, replaced_top_trade] if replaced_top_trade > top_trade else None,
            "trades_reopened": reopened}
