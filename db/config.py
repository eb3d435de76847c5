"""The one place settings come from.

Every process (writer, workers, web apps, tests, a user's own bot) reads its
settings here, from the environment with defaults, so that a test can run a
whole stack beside the user's by changing ``TICKSTACK_HOME`` alone.

Modelled on gunicorn's ``config.py``: every setting is declared once in
:data:`SETTINGS` (variable, attribute, parser with its check, default, help);
one parser reads them all, and a bad value stops the process at start with a
:class:`ConfigError` naming the variable. The README's table is made from the
registry (``python -m db settings``).
"""
from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db.files import FILE_KINDS, make_folder
from db.parsers import (
    C_INT_MAX,
    MAX_CLIENT_DEADLINE_S,
    TIB,
    YEAR_S,
    ConfigError,
    Parser,
    choice,
    database_url,
    flag,
    host_name,
    number,
    path,
    price_decimals,
    quoted,
    secret_text,
    strong_secret,
    user_name,
    whole,
    writer_endpoint,
)

SUBDIRS = ("run", "log", "spool", "backups")
#: The checkout this code runs from: its ``var/`` is the home when ``TICKSTACK_HOME`` is unset, whatever
#: folder a command runs in (as ``make run`` and the venv's activate script set it).
CHECKOUT = Path(__file__).resolve().parent.parent


def _default_host(_: Mapping[str, Any]) -> str:
    import socket

    return host_name("TICKSTACK_HOST (the machine's host name)", socket.gethostname()[:64] or "localhost")


# --- the registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One setting: the variable it is read from, the :class:`Settings` attribute it fills, how
    its text is parsed and checked, its default (a value, or a function of the settings read
    before it), how the README shows that default, and what it is for."""

    env: str
    attr: str
    parse: Parser
    default: Any
    shown_default: str
    help: str
    secret: bool = False

    def read(self, env: Mapping[str, str], before: Mapping[str, Any]) -> Any:
        raw = env.get(self.env)
        if raw is None or raw.strip() == "":
            return self.default(before) if callable(self.default) else self.default
        return self.parse(self.env, raw)


#: The database file in the home when DATABASE_URL is not set.
DEFAULT_DATABASE = "tickstack.db"


def _default_url(s: Mapping[str, Any]) -> str:
    return f"sqlite:///{s['home'] / DEFAULT_DATABASE}"


def _default_endpoint(s: Mapping[str, Any]) -> str:
    endpoint = f"ipc://{s['home'] / 'run' / 'writer.sock'}"
    writer_endpoint("WRITER_ENDPOINT (from TICKSTACK_HOME)", endpoint)
    return endpoint


#: The fewest characters of the console's password, wherever it comes from: ``TICKSTACK_ADMIN_PASSWORD``
#: or the ``admin-password`` file.
ADMIN_PASSWORD_MIN = 12
#: The one rule of the console's password (ConfigError when broken), for the variable and, in
#: :mod:`webapp.auth`, the file.
admin_password = strong_secret(ADMIN_PASSWORD_MIN)

S = Setting
#: Every setting, declared once, in the order the README lists them. Only this module reads the
#: environment; a test checks that every ``TICKSTACK_*`` name in the code is declared here and
#: that the README's table is :func:`markdown_table`.
SETTINGS: tuple[Setting, ...] = (
    S("TICKSTACK_HOME", "home", path, lambda _: CHECKOUT / "var", "`var/` of the checkout",
      "runtime folder: database, sockets, logs, spool, backups (mode 0700); `make run` and circusd refuse a `~` in "
      "it (circus.ini uses it as written, and circus expands none)"),
    S("DATABASE_URL", "database_url", database_url, _default_url, "`sqlite:///$TICKSTACK_HOME/tickstack.db`",
      "the database (the writer's and migrations' URL; never shown with its password)"),
    S("DATABASE_READ_URL", "database_read_url", database_url, lambda s: s["database_url"], "`DATABASE_URL`",
      "the readers' URL on PostgreSQL (API, console, workers' reads), e.g. a read-only role; every read "
      "session is read-only whatever the role. SQLite readers open `DATABASE_URL`'s file read-only"),
    S("WRITER_ENDPOINT", "writer_endpoint", writer_endpoint, _default_endpoint,
      "`ipc://$TICKSTACK_HOME/run/writer.sock`", "the writer's socket (an ipc path must fit in 107 bytes)"),
    S("TICKSTACK_API_PORT", "api_port", whole(1, 65535), 8000, "8000", "the API's port (127.0.0.1)"),
    S("TICKSTACK_CONSOLE_PORT", "console_port", whole(1, 65535), 8001, "8001", "the console's port (127.0.0.1)"),
    S("TICKSTACK_WATCHDOG_PORT", "watchdog_port", whole(1, 65535), 8002, "8002",
      "the UDP port (127.0.0.1) of circus's watchdog: supervised processes send it heartbeats"),
    S("TICKSTACK_SYNCHRONOUS", "synchronous", choice("NORMAL", "FULL"), "NORMAL", "`NORMAL`",
      "SQLite `synchronous` for the writer: `FULL` also survives power loss, at a cost per commit"),
    S("TICKSTACK_BUSY_TIMEOUT_MS", "busy_timeout_ms", whole(0, C_INT_MAX), 5000, "5000",
      "SQLite: how long a connection (a reader, the writer) waits on a lock another holds (`busy_timeout`)"),
    S("TICKSTACK_LOCK_TIMEOUT_MS", "lock_timeout_ms", whole(0, C_INT_MAX), 1000, "1000",
      "PostgreSQL: how long a write, or a read of the API or the console, waits on a lock another "
      "session holds (`lock_timeout`), then it is answered retryably (a read: 503); 0: no limit"),
    S("TICKSTACK_JOURNAL_SIZE_LIMIT", "journal_size_limit", whole(0, TIB), 64 * 1024 * 1024, "64 MiB",
      "WAL bytes kept after a checkpoint (SQLite `journal_size_limit`)"),
    S("TICKSTACK_CLIENT_DEADLINE", "client_deadline", number(0.1, MAX_CLIENT_DEADLINE_S), 60.0, "60",
      "seconds a writer client call keeps retrying"),
    # circusd runs the start hook in its own loop: for this long it answers nothing else (a status,
    # a stop), so an hour at most.
    S("TICKSTACK_READY_TIMEOUT", "ready_timeout", number(0.1, 3600), 30.0, "30",
      ("seconds a watcher's start waits for a running writer to answer (once per writer process); "
       "then the watcher starts without it")),
    # A million requests: the queue is bounded in bytes too (QUEUE_BUDGET_MESSAGES x max message), which
    # binds long before; a larger count is a typo.
    S("TICKSTACK_WRITER_MAX_BATCH", "writer_max_batch", whole(1, 1_000_000), 256, "256", "requests per transaction"),
    # Half the client's first wait for an answer (db.client.FIRST_ATTEMPT_TIMEOUT, 1 s), the other half
    # left for the commit: a longer wait has every first request resent before it is answered. (1e300
    # overflowed the commit thread's queue wait, time_t, and killed it.)
    S("TICKSTACK_WRITER_BATCH_WAIT", "writer_batch_wait", number(0, 0.5), 0.0, "0",
      "seconds to wait for more requests before committing"),
    S("TICKSTACK_WRITER_MAX_QUEUE", "writer_max_queue", whole(1, 1_000_000), 2048, "2048",
      "requests queued before *busy* replies"),
    # 1 GiB: the writer may hold 16 times this in its queue (workers.intake.QUEUE_BUDGET_MESSAGES), and
    # ZeroMQ's MAXMSGSIZE is 4 times it, a C long (a 25-digit value stopped the writer at its start).
    S("TICKSTACK_WRITER_MAX_MESSAGE", "writer_max_message", whole(1024, 2**30), 16 * 1024 * 1024, "16 MiB",
      "largest request, in bytes"),
    # An hour each: circus kills the writer after its graceful_timeout (45 s) anyway; a writer run by
    # hand (a test, a script) may be given longer, not for ever.
    S("TICKSTACK_WRITER_DRAIN_IDLE", "writer_drain_idle", number(0, 3600), 1.0, "1",
      "on SIGTERM the writer serves this many seconds more (producers flush), then stops once caught up ..."),
    S("TICKSTACK_WRITER_DRAIN_DEADLINE", "writer_drain_deadline", number(0, 3600), 5.0, "5",
      "... or after this many seconds in any case (producers retry against the next writer)"),
    # circus's reload starts the new writer before it stops the old one: the new one exited at once
    # (another writer holds the lock), and circus started another only once the whole reload was done,
    # 22 s without a writer (fault hunt, round 39). The old one's drain and last checkpoint fit in it.
    S("TICKSTACK_WRITER_LOCK_WAIT", "writer_lock_wait", number(0, 3600), 15.0, "15",
      "a writer started while another holds the lock waits this many seconds for it to end, then refuses (on "
      "PostgreSQL as long again for the server's lock)"),
    # Ten years: the prune's cutoff (now - TTL, in ms) must be an SQLite INTEGER (1e18 s overflowed it and
    # failed a batch every minute); a client resends within its deadline (a day at most), a spool once
    # the writer is back.
    S("TICKSTACK_DEDUP_TTL", "dedup_ttl", number(60, 10 * YEAR_S), 3600.0, "3600",
      "seconds applied requests are remembered for retries (a jump of the wall clock forward ages none)"),
    # A century: tick times count from 1970, so 100 years keeps every tick there is (the test stacks use it).
    S("TICKSTACK_RETENTION_DAYS", "retention_days", number(0, 36500, above=True), 30.0, "30",
      "ticks older than this many days are pruned (bars are kept), once the analysis has read them"),
    S("TICKSTACK_RETENTION_EVERY_S", "retention_every_s", number(0, YEAR_S, above=True), 3600.0, "3600",
      "seconds between retention runs"),
    S("TICKSTACK_BACKUP_EVERY_H", "backup_every_h", number(0, YEAR_S / 3600, above=True), 6.0, "6",
      "hours between backups"),
    # Each backup is a whole copy of the database: ten thousand is years of them at any sane interval.
    S("TICKSTACK_BACKUP_KEEP", "backup_keep", whole(0, 10_000, above=True), 7, "7", "backups kept"),
    S("TICKSTACK_QUICK_CHECK_EVERY_H", "quick_check_every_h", number(0, YEAR_S / 3600, above=True), 24.0, "24",
      "hours between integrity quick checks"),
    S("TICKSTACK_CHECKPOINT_WAL_MB", "checkpoint_wal_mb", number(0, TIB / 2**20, above=True), 64.0, "64",
      "checkpoint when the WAL passes this many MB"),
    S("TICKSTACK_CHECKPOINT_EVERY_S", "checkpoint_every_s", number(0, YEAR_S, above=True), 30.0, "30",
      "seconds between two WAL size checks"),
    S("TICKSTACK_SAMPLE_EVERY_S", "sample_every_s", number(0, YEAR_S, above=True), 10.0, "10",
      "seconds between two samples for the console's charts"),
    S("TICKSTACK_DISK_WARN_PCT", "disk_warn_pct", number(0, 100), 10.0, "10",
      "`db doctor` and the console warn when the database's disk has less than this percent free "
      "(and report a problem below a tenth of it); 0 turns the warning off"),
    S("TICKSTACK_PRICE_DECIMALS", "price_decimals", price_decimals, lambda _: {}, "learned from the data",
      "decimals each symbol's prices are shown with, e.g. `EURUSD=5,BTCUSD=2` (0-8); a symbol not "
      "named here shows the most decimals of its latest prices"),
    S("TICKSTACK_API_TOKEN", "api_token", secret_text, "", "generated into `$TICKSTACK_HOME/api-token`",
      "the API's bearer token; unset, a generated one is kept in the file (0600)", secret=True),
    S("TICKSTACK_ADMIN_USER", "admin_user", user_name, "admin", "`admin`",
      "the console's user name (its password is generated into `$TICKSTACK_HOME/admin-password`, 0600)"),
    S("TICKSTACK_ADMIN_PASSWORD", "admin_password", admin_password, "",
      "generated into `$TICKSTACK_HOME/admin-password`",
      "the console's password; set the same on every host of one database so any host's console "
      "accepts it (unset: generated per home into the file, 0600)", secret=True),
    S("TICKSTACK_SECRET_KEY", "secret_key", strong_secret(32), "", "generated into `$TICKSTACK_HOME/secret-key`",
      "the web apps' secret key (signs the console's session cookies and forms); may be set with "
      "`TICKSTACK_ADMIN_PASSWORD` on every host (unset: generated per home into the file, 0600)", secret=True),
    S("TICKSTACK_HOST", "host", host_name, _default_host, "the machine's host name",
      "this stack's name among the stacks sharing one PostgreSQL database: one writer per host, and "
      "what its sessions (application_name), leaders, locks and sim feed's source are named by"),
    S("TICKSTACK_DIRECT_WRITES", "direct_writes", flag, False, "`0`",
      "PostgreSQL only: `1` runs each single acknowledged write (`WriterClient.call`) in the caller's own "
      "transaction, recorded for retries as the writer does, instead of through the writer (faster for small "
      "writes from many processes; pipelines still go to the writer); refused on SQLite (`db/direct.py`)"),
)
del S
SETTING_BY_ENV = {s.env: s for s in SETTINGS}
JOB_ATTRS = ("retention_days", "retention_every_s", "backup_every_h", "backup_keep", "quick_check_every_h",
             "checkpoint_wal_mb", "checkpoint_every_s", "sample_every_s")


def read(env: Mapping[str, str], settings: Iterable[Setting] = SETTINGS) -> dict[str, Any]:
    """Parse ``settings`` from ``env``: {attr: value}. The one parser."""
    values: dict[str, Any] = {}
    for setting in settings:
        values[setting.attr] = setting.read(env, values)
    return values


def markdown_table() -> str:
    """The README's table of settings, made from the registry; "allowed" is each parser's own
    description, so a range stated there is the range checked."""
    lines = ["| variable | default | allowed | what it is |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        lines.append(f"| `{s.env}` | {s.shown_default} | {s.parse.__doc__} | {s.help} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class JobSchedule:
    """How often each maintenance job runs and with what limits (``TICKSTACK_*`` job settings).
    Every value is a finite number > 0 (``backup_keep`` a whole one) up to its setting's maximum:
    zero or negative intervals, retention or keep counts mean nothing sensible, nor does a job that
    runs less often than yearly, so they are refused rather than guessed."""

    retention_days: float = 30.0
    retention_every_s: float = 3600.0
    backup_every_h: float = 6.0
    backup_keep: int = 7
    quick_check_every_h: float = 24.0
    checkpoint_wal_mb: float = 64.0
    checkpoint_every_s: float = 30.0
    sample_every_s: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JobSchedule:
        """The job settings alone (default ``os.environ``), through the one parser."""
        env = os.environ if env is None else env
        return cls(**read(env, (s for s in SETTINGS if s.attr in JOB_ATTRS)))

    def every_s(self, job: str) -> float:
        """Seconds between two runs of ``job`` (for checkpoint: between two WAL size checks)."""
        return {"retention": self.retention_every_s, "backup": self.backup_every_h * 3600,
                "quick_check": self.quick_check_every_h * 3600, "checkpoint": self.checkpoint_every_s,
                "metrics": self.sample_every_s}[job]


@dataclass(frozen=True)
class Settings:
    """Resolved settings; build with :func:`load_settings`. Each attribute is declared, with its
    variable, default and meaning, in :data:`SETTINGS`."""

    home: Path
    database_url: str = field(repr=False)
    database_read_url: str = field(repr=False)
    writer_endpoint: str
    api_port: int
    console_port: int
    watchdog_port: int
    synchronous: str
    busy_timeout_ms: int
    lock_timeout_ms: int
    journal_size_limit: int
    client_deadline: float
    ready_timeout: float
    writer_max_batch: int
    writer_batch_wait: float
    writer_max_queue: int
    writer_max_message: int
    writer_drain_idle: float
    writer_drain_deadline: float
    writer_lock_wait: float
    dedup_ttl: float
    retention_days: float
    retention_every_s: float
    backup_every_h: float
    backup_keep: int
    quick_check_every_h: float
    checkpoint_wal_mb: float
    checkpoint_every_s: float
    sample_every_s: float
    disk_warn_pct: float
    price_decimals: dict[str, int] = field(hash=False)  # symbol -> decimals (a dict cannot be hashed)
    api_token: str = field(repr=False)
    admin_user: str = "admin"
    admin_password: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    host: str = "localhost"
    direct_writes: bool = False

    @property
    def jobs(self) -> JobSchedule:
        return JobSchedule(**{a: getattr(self, a) for a in JOB_ATTRS})

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def backup_dir(self) -> Path:
        return self.home / "backups"

    @property
    def circus_endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'circus.sock'}"

    @property
    def circus_pubsub_endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'circus-pubsub.sock'}"

    @property
    def circus_stats_endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'circus-stats.sock'}"

    @property
    def read_url_variable(self) -> str:
        """The variable that gives the readers' URL: ``DATABASE_READ_URL`` when it is another than
        ``DATABASE_URL`` (what a message about the readers' connection names)."""
        return "DATABASE_READ_URL" if self.database_read_url != self.database_url else "DATABASE_URL"

    @property
    def database_path(self) -> Path | None:
        """The SQLite file, or None when DATABASE_URL names another database."""
        prefix = "sqlite:///"
        if not self.database_url.startswith(prefix):
            return None
        return Path(self.database_url[len(prefix):].split("?", 1)[0])

    @property
    def writer_lock_path(self) -> Path:
        db_path = self.database_path
        if db_path is not None:
            return db_path.with_name(db_path.name + ".writer.lock")
        return self.run_dir / "writer.lock"


#: The secret files in ``TICKSTACK_HOME``, each made on first use (0600) unless its variable is set:
#: the console's password, the key that signs its sessions and forms, the API's bearer token. Named
#: here, at the bottom, for every layer that must know them (``db backup`` never writes over one).
PASSWORD_FILE = "admin-password"
SECRET_KEY_FILE = "secret-key"
TOKEN_FILE = "api-token"
SECRET_FILES = (PASSWORD_FILE, SECRET_KEY_FILE, TOKEN_FILE)


def one_blas_thread() -> None:
    """``OPENBLAS_NUM_THREADS=1`` in this process's environment unless it is set: call it before
    numpy is first imported. numpy's OpenBLAS starts a thread for every other core when it loads,
    and that thread spins for a while: about 0.14 s of CPU in every process at every start (median
    of 8 here: importing the writer's modules 0.78 s of CPU, 0.64 s with one thread), taken from
    the writer and the rest on a 2-core machine. No worker calls a BLAS routine (sorts, sums and
    searches only), so one thread loses nothing. Not a tickstack setting: a value the user set wins."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def search_path() -> str:
    """This process's ``PATH``: where circusd's watchers find circus.ini's bare ``python`` and
    ``gunicorn`` (``copy_env``). Not a setting (the shell's, read here as every variable is)."""
    return os.environ.get("PATH", "")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read every setting from ``env`` (default ``os.environ``) and check it; a bad value raises
    :class:`ConfigError` naming the variable."""
    settings = Settings(**read(os.environ if env is None else env))
    if settings.direct_writes and settings.database_path is not None:
        raise ConfigError("TICKSTACK_DIRECT_WRITES works on PostgreSQL only: on SQLite only the writer may "
                          "write (unset it, or point DATABASE_URL at a PostgreSQL server)")
    if settings.api_port == settings.console_port:  # circus would bind one and fail on the other
        raise ConfigError(f"TICKSTACK_API_PORT and TICKSTACK_CONSOLE_PORT are both {settings.api_port}: the API "
                          "and the console each need a port of their own")
    return settings


def _not_a_folder(path: Path) -> bool:
    """``path`` exists and is no folder (a file, a socket, ...). Not Path.exists(): it raises on a
    folder this user may not search, and that question is only asked while reporting another error."""
    try:
        return not stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _home_error(home: Path, path: Path, e: OSError) -> ConfigError:
    """A folder of the runtime folder cannot be made or used: a ConfigError naming TICKSTACK_HOME
    (the setting to change), the folder that failed and why, in words rather than an errno."""
    blocker = next((p for p in (path, *path.parents) if _not_a_folder(p)), None)
    if blocker is not None:  # FileExistsError, NotADirectoryError: a file where a folder must be
        reason = f"{blocker} is a file, not a folder"
    else:  # permission, a read-only or full file system, ...
        reason = e.strerror or str(e)
    what = "the runtime folder" if path == home else "a folder of the runtime folder"
    return ConfigError(f"TICKSTACK_HOME={str(home)!r}: cannot use {path} as {what}: {reason}; set "
                       "TICKSTACK_HOME to a folder this user may create and write (or move what is in the way)")


def home_for_circus_problem() -> str | None:
    """What makes ``TICKSTACK_HOME``, as written, unusable in circus.ini, or None. circus.ini takes it
    as it is (``$(circus.env.TICKSTACK_HOME)/log/circusd.log``): circus expands no ``~`` and reads a
    relative path from its own folder, while every process of ours expands both (:func:`db.parsers.path`)."""
    raw = os.environ.get("TICKSTACK_HOME")
    if raw is not None and not raw.strip():  # our processes take it as unset (the default); circus as ""
        return (f"TICKSTACK_HOME is set but blank: circus.ini uses it as written; unset it (the default is "
                f"{SETTING_BY_ENV['TICKSTACK_HOME'].default(None)}) or give an absolute path")
    if raw is None or (os.path.isabs(raw) and not raw.startswith("~")):
        return None
    try:
        expanded = path("TICKSTACK_HOME", raw)
    except ConfigError as e:
        return str(e)
    return (f"TICKSTACK_HOME={quoted(raw)}: circus.ini uses it as written, and circus expands no ~ "
            f"and reads a relative path from its own folder: give its absolute path ({expanded})")


def ensure_home(settings: Settings) -> Path:
    """Create the runtime folder and its subfolders, private to this user. Raises ConfigError
    when it cannot: a home that cannot be made is a bad TICKSTACK_HOME, said in one line."""
    for folder in (settings.home, *(settings.home / d for d in SUBDIRS)):
        try:
            make_folder(folder)  # a power cut soon after must not take the new database with its folder
            os.chmod(folder, 0o700)
        except OSError as e:
            raise _home_error(settings.home, folder, e) from e
    return settings.home


def check_home(settings: Settings, *, subfolders: bool = True) -> Path:
    """Without making anything: raise ConfigError when TICKSTACK_HOME cannot be the runtime folder
    (a file, or below one), for commands that only read it (``python -m db health``). A home not
    made yet is fine: the writer, or ``python -m db prepare``, makes it. ``subfolders=False``
    checks the home alone: a worker meets a broken subfolder (``backups/``) in the one job that
    uses it, which records the failure and lets the others run."""
    for folder in (settings.home, *(settings.home / d for d in SUBDIRS if subfolders)):
        try:
            if not stat.S_ISDIR(os.stat(folder).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise _home_error(settings.home, folder, e) from e
    return settings.home


def read_or_create_secret(path: Path, generate: Callable[[], str]) -> tuple[str, bool]:
    """The secret stored at ``path``; on first use, ``generate()`` one and
    store it with mode 0600. Returns (secret, created). Safe when several
    processes (gunicorn workers) race to create it: one wins, all read it.
    A file that is there is never written over: ConfigError when it stays
    blank, OSError when it cannot be read or is no regular file (a FIFO is
    not waited on), UnicodeError when it is not UTF-8."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # the winner may still be writing it
            value = _read_regular_file(path).strip()
            if value:
                return value, False
            time.sleep(0.02)
        raise ConfigError(f"{path} is empty; delete it to generate a new secret") from None
    value = generate()
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value, True


def _read_regular_file(path: Path) -> str:
    """The text of ``path`` (UTF-8; UnicodeError otherwise), which must be a regular file: anything
    else raises OSError saying what it is ("it is a FIFO (named pipe), not a regular file"). Opened
    without blocking, and checked before it is read: a FIFO put in a secret's place blocked its
    reader (the web app, at its start) until something wrote into it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    kind = stat.S_IFMT(os.fstat(fd).st_mode)
    if kind != stat.S_IFREG:
        os.close(fd)
        raise OSError(errno.EINVAL, f"it is {FILE_KINDS.get(kind, 'no file')}, not a regular file", str(path))
    with os.fdopen(fd, "rb") as f:
        return f.read().decode()
