"""The one place settings come from.

Every process (writer, workers, web apps, tests, a user's own bot) reads its
settings here, from the environment with defaults, so that a test can run a
whole stack beside the user's by changing ``TICKSTACK_HOME`` alone.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_IPC_PATH = 107

SUBDIRS = ("run", "log", "spool", "backups")


class ConfigError(ValueError):
    """A setting is missing or wrong; the message says which and what to do."""


def _env_float(env: dict[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not value >= minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _env_int(env: dict[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Build with :func:`load_settings`, not directly."""

    home: Path
    database_url: str
    writer_endpoint: str
    #: SQLite ``synchronous`` for the write connection: NORMAL is consistent
    #: after a process crash; FULL also survives a power loss, at a cost.
    synchronous: str
    #: How long a read connection waits on a lock (checkpoints, recovery).
    busy_timeout_ms: int
    #: WAL bytes kept after a checkpoint (SQLite ``journal_size_limit``).
    journal_size_limit: int
    #: How long a :class:`~db.client.WriterClient` call keeps retrying.
    client_deadline: float
    #: Group commit: at most this many requests per transaction.
    writer_max_batch: int
    #: Group commit: wait this long for more requests before committing
    #: (0 commits as soon as anything is pending).
    writer_batch_wait: float
    #: Back-pressure: requests queued beyond this get a busy reply.
    writer_max_queue: int
    #: A request larger than this gets an error reply.
    writer_max_message: int
    #: On SIGTERM: stop once no request came for this long ...
    writer_drain_idle: float
    #: ... or after this long in any case (producers that keep sending, as
    #: during ``circusctl restart writer``, retry against the next writer).
    writer_drain_deadline: float
    #: How long the record of applied requests is kept for retries.
    dedup_ttl: float

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


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Read settings from ``env`` (default ``os.environ``) and check them."""
    env = dict(os.environ if env is None else env)
    home = Path(env.get("TICKSTACK_HOME") or "var").expanduser().absolute()
    database_url = env.get("DATABASE_URL") or f"sqlite:///{home / 'tickstack.db'}"
    writer_endpoint = env.get("WRITER_ENDPOINT") or f"ipc://{home / 'run' / 'writer.sock'}"
    if writer_endpoint.startswith("ipc://"):
        check_ipc_path(writer_endpoint[len("ipc://"):], "WRITER_ENDPOINT")
    elif not writer_endpoint.startswith(("tcp://127.", "tcp://localhost:", "inproc://")):
        raise ConfigError(f"WRITER_ENDPOINT={writer_endpoint!r}: use ipc:// or a loopback tcp:// address")
    synchronous = (env.get("TICKSTACK_SYNCHRONOUS") or "NORMAL").upper()
    if synchronous not in ("NORMAL", "FULL"):
        raise ConfigError(f"TICKSTACK_SYNCHRONOUS={synchronous!r} must be NORMAL or FULL")
    return Settings(
        home=home,
        database_url=database_url,
        writer_endpoint=writer_endpoint,
        synchronous=synchronous,
        busy_timeout_ms=_env_int(env, "TICKSTACK_BUSY_TIMEOUT_MS", 5000),
        journal_size_limit=_env_int(env, "TICKSTACK_JOURNAL_SIZE_LIMIT", 64 * 1024 * 1024),
        client_deadline=_env_float(env, "TICKSTACK_CLIENT_DEADLINE", 60.0, minimum=0.1),
        writer_max_batch=_env_int(env, "TICKSTACK_WRITER_MAX_BATCH", 256, minimum=1),
        writer_batch_wait=_env_float(env, "TICKSTACK_WRITER_BATCH_WAIT", 0.0),
        writer_max_queue=_env_int(env, "TICKSTACK_WRITER_MAX_QUEUE", 2048, minimum=1),
        writer_max_message=_env_int(env, "TICKSTACK_WRITER_MAX_MESSAGE", 16 * 1024 * 1024, minimum=1024),
        writer_drain_idle=_env_float(env, "TICKSTACK_WRITER_DRAIN_IDLE", 1.0),
        writer_drain_deadline=_env_float(env, "TICKSTACK_WRITER_DRAIN_DEADLINE", 5.0),
        dedup_ttl=_env_float(env, "TICKSTACK_DEDUP_TTL", 3600.0, minimum=60.0),
    )


def check_ipc_path(path: str, what: str) -> None:
    """Fail with advice when a Unix socket path cannot be bound."""
    if len(os.fsencode(path)) > MAX_IPC_PATH:
        raise ConfigError(
            f"{what}: the socket path {path!r} is {len(os.fsencode(path))} bytes, over the "
            f"{MAX_IPC_PATH}-byte limit of Unix sockets; set TICKSTACK_HOME to a shorter folder "
            "(e.g. TICKSTACK_HOME=~/.tickstack)"
        )


def ensure_home(settings: Settings) -> Path:
    """Create the runtime folder and its subfolders, private to this user."""
    for path in (settings.home, *(settings.home / d for d in SUBDIRS)):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    return settings.home


def read_or_create_secret(path: Path, generate: Callable[[], str]) -> tuple[str, bool]:
    """The secret stored at ``path``; on first use, ``generate()`` one and
    store it with mode 0600. Returns (secret, created). Safe when several
    processes (gunicorn workers) race to create it: one wins, all read it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # the winner may still be writing it
            value = path.read_text().strip()
            if value:
                return value, False
            time.sleep(0.02)
        raise ConfigError(f"{path} is empty; delete it to generate a new secret") from None
    value = generate()
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value, True
