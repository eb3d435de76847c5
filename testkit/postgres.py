"""A throwaway PostgreSQL server for tests and benchmarks, from Debian's binaries.

pytest-postgresql and testing.postgresql refuse to run as root (``initdb`` and ``pg_ctl`` "cannot be
run as root"), and CI runs as root: so the server runs as the ``postgres`` user (``runuser``) when
we are root, as ourselves otherwise, in a private temporary folder, listening on a Unix socket only
(``listen_addresses=''``: no TCP port to collide with or to expose; ``tcp_port`` adds 127.0.0.1 for
the one test of what only TCP has, in a network namespace of its own), with durability off (a test
server). Authentication is scram-sha-256 with generated passwords even on the socket, so tests can
check that no password leaks into a log, a page or a response.

Three roles, as a production set-up would have them: ``ts_owner`` owns the database and runs
migrations, ``ts_writer`` may write (granted by the migration), ``ts_reader`` only reads
(``default_transaction_read_only``). :meth:`PostgresServer.url` gives each role's URL.

:class:`HomeDatabases` gives every private runtime folder the harness makes a database of its own
on one server (``pytest --database postgresql``: see :func:`testkit.env.use_database`).
"""
from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from db.config import Settings

ROLES = ("ts_owner", "ts_writer", "ts_reader")
DATABASE = "tickstack"


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` with ``initdb``, or None (not installed)."""
    base = Path("/usr/lib/postgresql")
    versions = sorted((p for p in base.glob("*/bin") if (p / "initdb").exists()),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return versions[-1] if versions else None


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or the server would not start; the message says which."""


class PostgresServer:
    """Start with :meth:`start`, stop with :meth:`stop` (by the postmaster's pid, via pg_ctl)."""

    def __init__(self, tcp_port: int | None = None) -> None:
        """``tcp_port``: also listen on 127.0.0.1 at that port (password logins, as on the socket),
        for a test of what only TCP has (keepalives: ``tests/silent_host.py``, in a network
        namespace of its own). By default no TCP at all."""
        binaries = postgres_bin()
        if binaries is None:
            raise PostgresUnavailable("PostgreSQL is not installed (apt-get install postgresql postgresql-contrib)")
        self.bin = binaries
        self.as_postgres = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="ts-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.tcp_port = tcp_port
        self.port = tcp_port or 5432  # the socket's name (.s.PGSQL.<port>) follows the port
        self.passwords = {role: secrets.token_urlsafe(18) for role in (*ROLES, "postgres")}
        if self.as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        os.chmod(self.root, 0o700)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> PostgresServer:
        """initdb, start on the socket, create the roles and the database; on any failure the
        half-made server is stopped and its folder removed before the error is raised."""
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> PostgresServer:
        pwfile = self.root / "pw"
        pwfile.write_text(self.passwords["postgres"] + "\n")
        os.chmod(pwfile, 0o600)
        if self.as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        try:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--no-sync",
                      "--auth-local=scram-sha-256", f"--auth-host={'scram-sha-256' if self.tcp_port else 'reject'}",
                      f"--pwfile={pwfile}")
        finally:
            pwfile.unlink(missing_ok=True)
        self._pg_ctl_start(timeout)
        for statement in (*(f"CREATE ROLE {r} LOGIN PASSWORD '{self.passwords[r]}'" for r in ROLES),
                          "ALTER ROLE ts_reader SET default_transaction_read_only = on",
                          f"CREATE DATABASE {DATABASE} OWNER ts_owner"):
            self.psql("postgres", "postgres", statement)
        self.psql(DATABASE, "postgres", "CREATE EXTENSION IF NOT EXISTS amcheck")
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its folder."""
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            except PostgresUnavailable:
                pid = int((self.data / "postmaster.pid").read_text().split()[0])
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.root, ignore_errors=True)

    def socket_gone(self) -> bool:
        """Whether the server's socket file is gone: it is stopped (or stopping)."""
        return not any(self.socket_dir.glob(".s.PGSQL.*"))

    def restart(self, down_for: float = 0.0, until: threading.Event | None = None) -> None:
        """Stop the same server, wait ``down_for`` seconds, start it again (its data kept): for
        tests of a server going away. With ``until``, it stays down until that event is set (at most
        ``down_for`` seconds): a test whose checks of the outage take longer on a loaded machine
        than any fixed time it could choose says itself when they are done."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        if until is None:
            time.sleep(down_for)
        else:
            until.wait(down_for)
        self._pg_ctl_start(60.0)

    def _pg_ctl_start(self, timeout: float) -> None:
        # -l: the server's output goes to its log, not to our pipe (which would then never close).
        listen = "127.0.0.1" if self.tcp_port else ""
        options = (f"-c listen_addresses='{listen}' -p {self.port} -k {self.socket_dir} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"),
                  "-w", "-t", str(int(timeout)), "start")

    # --- use --------------------------------------------------------------------------------------

    def url(self, role: str = "ts_owner", *, database: str = DATABASE, driver: str = "postgresql+psycopg") -> str:
        """The SQLAlchemy URL of ``role`` on ``database`` (the tickstack one by default), over the Unix
        socket."""
        port = f"&port={self.port}" if self.port != 5432 else ""
        return f"{driver}://{role}:{quote(self.passwords[role], safe='')}@/{database}?host={self.socket_dir}{port}"

    def tcp_url(self, role: str = "ts_owner", *, database: str = DATABASE) -> str:
        """:meth:`url` over TCP to 127.0.0.1 (a server started with ``tcp_port``)."""
        assert self.tcp_port, "this server listens on its socket only"
        password = quote(self.passwords[role], safe="")
        return f"postgresql+psycopg://{role}:{password}@127.0.0.1:{self.tcp_port}/{database}"

    def create_database(self, name: str, *, amcheck: bool = False) -> None:
        """``CREATE DATABASE name OWNER ts_owner``, with the privileges a deployment grants: tables
        the owner creates (the migrations) are readable by ts_reader and writable by ts_writer.
        ``amcheck``: the extension too, and the owner's right to run its check (as a DBA would)."""
        import psycopg  # here: the harness imports this module on SQLite-only machines too

        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: lower-case letters, digits and _ only")
        with psycopg.connect(**self._params("postgres", "postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER ts_owner")
        if amcheck:
            with psycopg.connect(**self._params("postgres", name), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
                conn.execute("GRANT EXECUTE ON FUNCTION bt_index_check(regclass, boolean) TO ts_owner")
        with psycopg.connect(**self._params("ts_owner", name), autocommit=True) as conn:
            for grant in ("GRANT SELECT ON TABLES TO ts_reader, ts_writer",
                          "GRANT INSERT, UPDATE, DELETE ON TABLES TO ts_writer",
                          "GRANT USAGE, SELECT ON SEQUENCES TO ts_writer"):
                conn.execute(f"ALTER DEFAULT PRIVILEGES FOR ROLE ts_owner IN SCHEMA public {grant}")

    def drop_database(self, name: str) -> None:
        """``DROP DATABASE name WITH (FORCE)``: its sessions are ended first."""
        import psycopg

        with psycopg.connect(**self._params("postgres", "postgres"), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _params(self, role: str, database: str) -> dict[str, str]:
        return {"host": str(self.socket_dir), "port": str(self.port), "dbname": database, "user": role,
                "password": self.passwords[role]}

    def psql(self, database: str, role: str, sql: str) -> str:
        """Run ``sql`` with psql as ``role``; return its output (tuples only, unaligned)."""
        env = {**os.environ, "PGPASSWORD": self.passwords[role]}
        return self._run("psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
                         "-p", str(self.port), "-U", role, "-d", database, "-c", sql, env=env, as_server_user=False)

    def _run(self, program: str, *args: str, env: dict[str, str] | None = None, as_server_user: bool = True) -> str:
        """Run a PostgreSQL program; the server's own (initdb, pg_ctl) as the postgres user when root."""
        command = [str(self.bin / program), *args]
        if self.as_postgres and as_server_user:
            command = ["runuser", "-u", "postgres", "--", *command]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=self.root, timeout=120)
        if proc.returncode != 0:
            raise PostgresUnavailable(f"{program} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._run("pg_isready", "-h", str(self.socket_dir), "-p", str(self.port), "-d", DATABASE,
                          as_server_user=False)
                return
            except PostgresUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)



class HomeDatabases:
    """A database of its own for every private runtime folder, on one server: called with a home, it
    returns the ``DATABASE_URL`` (ts_owner: the writer runs the migrations) and ``DATABASE_READ_URL``
    (ts_reader) of a database made for that home on first use. Databases of homes that are gone
    (their test is over) are dropped when the next one is made, so a whole suite stays small."""

    def __init__(self, server: PostgresServer, *, amcheck: bool = False) -> None:
        self.server = server
        #: Each new database gets amcheck, and its owner the right to run it, so integrity checks
        #: are real ones (the suite's and the chaos benchmark's; the amcheck test drops it first).
        self.amcheck = amcheck
        self.count = 0
        #: home -> (database, the home's inode: a folder name reused later gets a new database)
        self.made: dict[Path, tuple[str, int]] = {}

    def __call__(self, home: Path) -> dict[str, str]:
        home = Path(home).absolute()
        inode = home.stat().st_ino
        known = self.made.get(home)
        if known is None or known[1] != inode:
            self.drop_finished()
            self.count += 1
            name = f"ts_{self.count}_{re.sub(r'[^a-z0-9]', '_', home.name.lower())}"[:63]
            self.server.create_database(name, amcheck=self.amcheck)
            self.made[home] = known = (name, inode)
        return {"DATABASE_URL": self.server.url("ts_owner", database=known[0]),
                "DATABASE_READ_URL": self.server.url("ts_reader", database=known[0])}

    def drop_finished(self) -> None:
        """Drop the databases whose home folder was removed."""
        for home, (name, inode) in list(self.made.items()):
            try:
                alive = home.stat().st_ino == inode
            except FileNotFoundError:
                alive = False
            if not alive:
                self.server.drop_database(name)
                del self.made[home]


class ReadConnection:
    """A read-only psycopg connection that takes the sqlite3 way of asking: ``execute(sql, params)``
    with ``?`` placeholders, returning a cursor (``fetchone``/``fetchall``), ``close()``. So a test's
    plain SQL reads the same on both databases (:func:`read_connection`)."""

    def __init__(self, url: str) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        params = {k: v for k, v in {"host": parsed.host or parsed.query.get("host"), "port": parsed.port,
                                    "dbname": parsed.database, "user": parsed.username,
                                    "password": parsed.password}.items() if v is not None}
        self.conn = psycopg.connect(**params, autocommit=True,
                                    options="-c default_transaction_read_only=on")

    def execute(self, sql: str, params: tuple | list = ()) -> Any:
        if params:
            sql = sql.replace("%", "%%").replace("?", "%s")
            return self.conn.execute(sql, tuple(params))
        return self.conn.execute(sql)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ReadConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_connection(settings: Settings) -> sqlite3.Connection | ReadConnection:
    """A read-only connection to ``settings``' database for a test's own SQL: SQLite's file
    (:func:`db.health.connect_read_only`), or the server's (:class:`ReadConnection`, as the readers'
    role)."""
    from db.engine import connect_read_only

    if settings.database_path is not None:
        return connect_read_only(settings.database_path)
    return ReadConnection(settings.database_read_url)
