"""A PostgreSQL server's health, backup and integrity check: what :mod:`db.health` does for a SQLite
file, done the server's way.

* :func:`server_status`: reachable or not (and why), ``pg_database_size``, connections by
  ``application_name`` (every tickstack session names its program, pid and host:
  :func:`db.engine.application_name`), and who holds the writer lock (:mod:`db.lock`).
* :func:`dump`: ``pg_dump -Fc`` into a private file (0600), verified with ``pg_restore --list``
  before it is renamed into place. The password goes to pg_dump in a ``PGPASSFILE`` (0600, in a
  private folder, removed after), never on its command line, where ``ps`` would show it.
* :func:`amcheck`: ``bt_index_check`` on every B-tree index of the schema when the ``amcheck``
  extension is there (or can be created); otherwise a result that says it was skipped and how to
  enable it, not a failure.

Every error text that leaves here has the URL's password cut out (libpq's messages name the host
and role, not the password; this is a second guard).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from db.config import Settings
from db.engine import HIDDEN, application_name, psycopg_connect_args, psycopg_params
from db.errors import MaintenanceFailed, TableLocked
from db.files import part_file, put_in_place
from db.leader import LEADER_NAMES, leaders
from db.server_lock import LOCK_APP, describe_holder, server_lock_holder, server_lock_holders

#: Connections by application_name are grouped without their pid (one series per program and
#: host, not per process: /metrics labels stay few).
_PID_PART = " pid "


def scrub(text: str, url: str) -> str:
    """``text`` with ``url``'s password (if any) replaced by ``***``."""
    try:
        password = make_url(url).password
    except Exception:  # an unparseable URL: nothing to look for
        return text
    return text.replace(password, HIDDEN) if password else text


def connect(url: str, purpose: str, host: str, timeout: float = 3.0, read_only: bool = True) -> Any:
    """A psycopg connection (autocommit) for ``purpose`` on ``host`` (its application_name), failing within
    about ``timeout`` seconds when the server does not answer; read-only unless told."""
    import psycopg

    conn = psycopg.connect(**psycopg_connect_args(
        url, options=f"-c statement_timeout={int(max(timeout, 1) * 10_000)}", autocommit=True,
        connect_timeout=max(1, round(timeout)), application_name=application_name(purpose, host)))
    if read_only:
        # Set once connected, not in the startup options: libpq checks a URL's
        # ``target_session_attrs=read-write`` against the session those options made read-only, and
        # refused every probe of a server that was up ("session is read-only").
        try:
            conn.execute("SET default_transaction_read_only = on")
        except BaseException:
            conn.close()
            raise
    return conn


def group_name(app: str | None) -> str:
    """``tickstack writer pid 12 on host`` -> ``tickstack writer on host``; unnamed -> ``(unnamed)``."""
    if not app:
        return "(unnamed)"
    head, sep, tail = app.partition(_PID_PART)
    return f"{head} {tail.split(' ', 1)[1]}" if sep and " " in tail else head if sep else app


#: A client's session in ``pg_stat_activity``, as any role sees it: a role without pg_read_all_stats
#: sees another role's sessions with ``backend_type`` NULL (the server's own processes too), so those
#: are told by having a database and a user, which the server's own processes have not.
CLIENT_SESSION = ("backend_type = 'client backend' OR (backend_type IS NULL AND datid IS NOT NULL AND "
                  "usesysid IS NOT NULL)")


def server_status(settings: Settings, timeout: float = 3.0) -> dict[str, Any]:
    """The server as the readers see it (``DATABASE_READ_URL``): ``reachable`` (and ``error`` when
    not), ``size_bytes``, ``connections`` (this database's sessions, total and by application_name
    without pids), ``server_connections`` and ``max_connections``, ``version``, ``ping_ms``, and
    ``writer_lock`` (its holder's application_name, None when free). Never raises."""
    url = settings.database_read_url
    started = time.perf_counter()
    try:
        with connect(url, "health", settings.host, timeout) as conn:
            size, version, max_conn, everyone = conn.execute(
                "SELECT pg_database_size(current_database()), current_setting('server_version'), "
                "current_setting('max_connections')::int, (SELECT count(*) FROM pg_stat_activity "
                f"WHERE {CLIENT_SESSION})").fetchone()
            # Client sessions only, as the server's count: an autovacuum worker on this database was
            # counted, as "(unnamed)", and made the database's sessions outnumber the server's.
            rows = conn.execute("SELECT application_name, count(*) FROM pg_stat_activity "
                                f"WHERE datname = current_database() AND ({CLIENT_SESSION}) GROUP BY 1").fetchall()
            schema = None  # a database the schema was never applied to has no such table
            unreadable: list[str] = []
            if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is not None:
                schema = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
                # The stack's tables the readers' role may not read: a missed GRANT crashed the monitor
                # with tracebacks and made the API answer 500, while doctor found nothing (fault hunt).
                unreadable = [name for (name,) in conn.execute(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'v', 'p') "
                    "AND NOT has_table_privilege(c.oid, 'SELECT') ORDER BY 1").fetchall()]
            holder = server_lock_holder(conn, settings.host)
            writers = server_lock_holders(conn)
            led = leaders(conn, LEADER_NAMES)
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        return {"reachable": False, "error": scrub(reason, url), "ms": round((time.perf_counter() - started) * 1000, 1)}
    by_app: dict[str, int] = {}
    for app, count in rows:
        by_app[group_name(app)] = by_app.get(group_name(app), 0) + int(count)
    lock: dict[str, Any] = {"held": holder is not None, "host": settings.host,
                            "writers": [app for _pid, app, _since in writers]}  # every host's
    if holder is not None:
        lock.update(holder=holder[1], backend_pid=holder[0], text=describe_holder(holder),
                    writer_pid=writer_pid_of(holder[1]))
    return {"reachable": True, "ping_ms": round((time.perf_counter() - started) * 1000, 1), "version": version,
            "size_bytes": int(size), "connections": sum(by_app.values()),
            "by_application": dict(sorted(by_app.items())), "server_connections": int(everyone),
            "max_connections": int(max_conn), "schema_version": schema, "writer_lock": lock, "leaders": led,
            "unreadable": unreadable}


def writer_pid_of(app: str | None) -> int | None:
    """The writer's pid in its lock session's application_name (``tickstack writer-lock pid 12 on h``)."""
    if not app or not app.startswith(LOCK_APP + _PID_PART):
        return None
    word = app[len(LOCK_APP + _PID_PART):].split(" ", 1)[0]
    return int(word) if word.isdigit() else None


# --- pg_dump ------------------------------------------------------------------------------------


def pg_program(name: str) -> str:
    """The newest Debian ``/usr/lib/postgresql/N/bin/<name>`` (pg_dump must be at least as new as
    the server), else ``<name>`` on PATH; FileNotFoundError when neither exists."""
    base = Path("/usr/lib/postgresql")
    found = sorted((p for p in base.glob(f"*/bin/{name}") if p.parent.parent.name.isdigit()),
                   key=lambda p: int(p.parent.parent.name))
    if found:
        return str(found[-1])
    on_path = shutil.which(name)
    if on_path is None:
        raise FileNotFoundError(f"{name} is not installed (apt-get install postgresql-client)")
    return on_path


def libpq_env(url: str, private: Path, host: str, purpose: str = "backup") -> tuple[str, dict[str, str]]:
    """A connection string without the password, and an environment whose ``PGPASSFILE`` (0600,
    in ``private``) holds it: pg_dump's or pg_restore's command line (visible in ``ps``) and its logs
    never do; ``PGAPPNAME`` names the session's ``purpose``. A URL
    without a password leaves libpq's own sources (``PGPASSFILE``, ``~/.pgpass``) as every other
    connection of the stack has them."""
    from psycopg.conninfo import make_conninfo

    params = {k: str(v) for k, v in psycopg_params(make_url(url)).items()}
    password = params.pop("password", None)
    env = os.environ.copy()  # passed through to pg_dump as it is (not a setting of ours)
    if password is not None:  # the URL's is the only password source: libpq's others would not be used
        for name in ("PGPASSWORD", "PGPASSFILE"):
            env.pop(name, None)
        passfile = private / "pgpass"
        fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

        def esc(v: str) -> str:
            return v.replace("\\", "\\\\").replace(":", "\\:")
        with os.fdopen(fd, "w") as f:  # host:port:database:user:password, wildcards for the first three
            f.write(f"*:*:*:{esc(params.get('user', '*'))}:{esc(password)}\n")
        env["PGPASSFILE"] = str(passfile)
    env["PGAPPNAME"] = application_name(purpose, host)
    return make_conninfo(**params), env


def private_folder(settings: Settings) -> Path:
    """A new private (0700) folder for a ``PGPASSFILE``, removed by its caller when done: in the home's
    ``run/`` when it is there, so that a process killed in the middle (no ``finally``) leaves the
    password inside the private home, where a test's removal of its home takes it too, not in the
    system's temporary folder, where nothing ever removed it."""
    where = settings.run_dir if settings.run_dir.is_dir() else None
    return Path(tempfile.mkdtemp(prefix="ts-pgpass-", dir=where))


#: Seconds a maintenance command (amcheck, pg_dump) waits for a table's lock (AccessShareLock: only an
#: ACCESS EXCLUSIVE lock of another session, a DBA's psql left in a transaction after LOCK TABLE, holds
#: it up), then gives up saying so: waiting without end held doctor silent, and a backup the jobs
#: worker (every other job behind it) or a console request for as long as that session lived.
MAINTENANCE_LOCK_WAIT_S = 10.0


def _dump_locked_out(settings: Settings, stderr: str) -> str:
    """What to add to pg_dump's words when it stopped at a ``LOCK TABLE`` (``--lock-wait-timeout``): the
    sessions that hold a table of the database locked, and what to do; nothing when none does. Asked of
    the server, not read from pg_dump's words: those are in the operator's language (``LANGUAGE=de``:
    "Anfrage war:"), the server's error in its ``lc_messages``, and a table the role may not read
    ("permission denied") stops pg_dump at its ``LOCK TABLE`` too, with no lock held by anyone. The
    statement pg_dump echoes is SQL, in no language."""
    if "LOCK TABLE " not in stderr:
        return ""
    import psycopg

    try:
        with connect(settings.database_url, "backup", settings.host) as conn:
            who = _exclusive_lock_holders(conn)
    except psycopg.Error:  # pg_dump's words say why it failed; this only adds who held a lock
        return ""
    if who is None:
        return ""
    return (f"; a table is locked (ACCESS EXCLUSIVE) by another session: {who}, and pg_dump waited "
            f"{MAINTENANCE_LOCK_WAIT_S:g} s for it. End that session's transaction (as a superuser: SELECT "
            "pg_terminate_backend(PID)), then back up again")


def dump(settings: Settings, dest: Path, timeout: float = 3600.0, *, overwrite: bool = False) -> dict[str, Any]:
    """``pg_dump -Fc`` of the database (as ``DATABASE_URL``'s role: the readers' may not read the
    sequences) to ``dest``: written to a private temporary file, listed with ``pg_restore --list``
    (a dump it cannot read is no backup), then renamed into place (:func:`db.files.put_in_place`:
    FileExistsError when ``dest`` exists, unless ``overwrite``). Raises RuntimeError with pg_dump's
    words (password cut out) and leaves nothing behind."""
    url = settings.database_url
    dest = Path(dest).absolute()
    private = private_folder(settings)
    started = time.perf_counter()
    tmp: Path | None = None
    try:
        tmp = part_file(dest)  # private from its first byte, and this dump's own
        conninfo, env = libpq_env(url, private, settings.host)
        # --extension=plpgsql (built in, never dumped): no extension in the dump. tickstack's schema
        # needs none, and amcheck, which a DBA installs as a superuser for quick_check, would stop
        # a restore as the owner role at CREATE EXTENSION (permission denied).
        for command in ([pg_program("pg_dump"), "-Fc", "--no-password", "--extension=plpgsql", "-f", str(tmp),
                         f"--lock-wait-timeout={int(MAINTENANCE_LOCK_WAIT_S * 1000)}", "-d", conninfo],
                        [pg_program("pg_restore"), "--list", str(tmp)]):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
            if done.returncode != 0:
                locked = _dump_locked_out(settings, done.stderr)
                failed = TableLocked if locked else MaintenanceFailed
                raise failed(f"{Path(command[0]).name} failed ({done.returncode}): "
                             f"{scrub(done.stderr.strip()[-1500:], url)}{locked}")
        entries = sum(1 for line in done.stdout.splitlines() if line and not line.startswith(";"))
        os.chmod(tmp, 0o600)
        put_in_place(tmp, dest, overwrite=overwrite)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        shutil.rmtree(private, ignore_errors=True)
    return {"path": str(dest), "bytes": dest.stat().st_size, "entries": entries,
            "ms": round((time.perf_counter() - started) * 1000, 1)}


# --- amcheck ------------------------------------------------------------------------------------

#: The B-tree indexes of the schema the check covers (valid, ready, not temporary).
_INDEXES_SQL = """
SELECT c.oid::regclass::text FROM pg_index i
  JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE a.amname = 'btree' AND n.nspname = current_schema() AND c.relpersistence <> 't'
   AND i.indisvalid AND i.indisready
 ORDER BY 1"""
ENABLE_AMCHECK = ("as a superuser, in this database: CREATE EXTENSION amcheck; GRANT EXECUTE ON FUNCTION "
                  "bt_index_check(regclass, boolean) TO <DATABASE_URL's role> (Debian: postgresql-contrib)")


#: The other sessions holding an ACCESS EXCLUSIVE lock on a relation of this database (on ``index``
#: or its table, or on any when ``index`` is NULL), with their role. Another role's session's state
#: is NULL to a role without pg_read_all_stats (a DBA's psql as a superuser, the usual holder, was
#: "(psql, None)"): left out then, as db.server_restore's query does.
_HOLDERS_SQL = """SELECT DISTINCT a.pid, concat_ws(', ', coalesce(nullif(a.application_name, ''), '(unnamed)'),
                                 'role ' || a.usename, a.state)
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.granted AND l.mode = 'AccessExclusiveLock' AND a.pid <> pg_backend_pid() AND l.locktype = 'relation'
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND (%(index)s::regclass IS NULL OR l.relation IN
        (%(index)s::regclass, (SELECT indrelid FROM pg_index WHERE indexrelid = %(index)s::regclass)))
 ORDER BY 1"""


def _exclusive_lock_holders(conn: Any, index: str | None = None) -> str | None:
    """The sessions holding ``index``'s table (any table, without ``index``) locked ACCESS EXCLUSIVE,
    in words (``server pid 12 (psql, role dba, idle in transaction)``); None when none does."""
    held = conn.execute(_HOLDERS_SQL, {"index": index}).fetchall()
    return ", ".join(f"server pid {pid} ({about})" for pid, about in held) or None


def _lock_holders(conn: Any, index: str) -> str:
    """What to say when amcheck could not lock ``index``'s table: the sessions holding it, and what to do."""
    who = _exclusive_lock_holders(conn, index) or "a session now gone"
    return (f"its table is locked (ACCESS EXCLUSIVE) by another session: {who}; the stack's writes to "
            "it are answered retryably and its reads of it wait meanwhile. End that session's transaction "
            "(as a superuser: SELECT pg_terminate_backend(PID)), then check again")


def amcheck(settings: Settings, timeout: float = 600.0, create: bool = True) -> dict[str, Any]:
    """``bt_index_check`` (heapallindexed off: a quick check, AccessShareLock only) on every B-tree
    index, as ``DATABASE_URL``'s role. ``{"ok", "indexes", "problems", "ms"}``, or ``{"ok": True,
    "skipped": why}`` when amcheck is not installed and cannot be created, or may not be run by
    this role: a check we cannot make is not a failed one, and the reason says how to enable it.
    ``timeout`` bounds the connection and each statement; ``create``: try CREATE EXTENSION when
    it is missing (the jobs worker does; the console does not)."""
    import psycopg

    url = settings.database_url
    started = time.perf_counter()
    with connect(url, "quick_check", settings.host, timeout, read_only=False) as conn:
        installed = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'").fetchone()
        if installed is None:
            if not create:  # the console: no DDL from a web request
                return {"ok": True, "skipped": f"amcheck not installed; {ENABLE_AMCHECK}"}
            try:
                conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
            except psycopg.Error as e:
                why = " ".join(str(e).split())
                return {"ok": True, "skipped": f"amcheck not installed ({scrub(why, url)}); {ENABLE_AMCHECK}"}
        conn.execute("SET default_transaction_read_only = on")  # from here on, only reads
        # A table locked by another session (a psql left in a transaction after LOCK TABLE) held doctor
        # silent for as long as that session lived: its statement_timeout is ten times ``timeout``.
        conn.execute(f"SET lock_timeout = '{int(min(timeout, MAINTENANCE_LOCK_WAIT_S) * 1000)}ms'")
        indexes = [name for (name,) in conn.execute(_INDEXES_SQL).fetchall()]
        problems: list[str] = []
        for index in indexes:
            try:
                conn.execute("SELECT bt_index_check(index => %s::regclass, heapallindexed => false)", (index,))
            except psycopg.errors.InsufficientPrivilege as e:
                why = " ".join(str(e).split())
                return {"ok": True, "skipped": f"amcheck installed but not allowed ({why}); {ENABLE_AMCHECK}"}
            except psycopg.errors.LockNotAvailable:
                raise MaintenanceFailed(f"amcheck stopped at index {index}, {len(problems)} problems found before "
                                        f"it: {_lock_holders(conn, index)}") from None
            except psycopg.Error as e:
                words = " ".join(str(e).split())
                if (e.sqlstate or "")[:2] != "XX":
                    # Not what amcheck finds (XX002 index_corrupted, XX001 data_corrupted, XX000): the
                    # session ended, a timeout, the index dropped meanwhile. The check is not made,
                    # which is no corruption: said as corruption, with advice to restore a backup, a
                    # terminated session made every index after it "a problem" (fault hunt).
                    raise MaintenanceFailed(f"amcheck stopped at index {index}, {len(problems)} problems found before "
                                            f"it: {scrub(words, url)}") from None
                problems.append(f"{index}: {words}"[:500])
    return {"ok": not problems, "indexes": len(indexes), "problems": problems[:20],
            "ms": round((time.perf_counter() - started) * 1000, 1)}
