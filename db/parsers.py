"""What a setting's or a flag's text may be: the parsers of :mod:`db.config`'s registry (each
``(variable name, raw text) -> value``, or a :class:`ConfigError` naming both), their shared bounds
with the reason for each, and argparse types built on the same rules (nan and inf never pass).

Apart from the registry so that a rule is written once for both a setting and a flag, and so that
each module stays one job; only :mod:`db.config` reads the environment.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from db.validation import NAME_RE, SYMBOL_RE

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_IPC_PATH = 107
#: A random seed on a command line (``--seed``): any 32-bit number, for a repeatable run.
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A setting is missing or wrong; the message says which and what to do."""


# --- parsers: (variable name, raw text) -> value, or ConfigError naming both -----------------

Parser = Callable[[str, str], Any]


#: Bounds shared by several settings (and flags), each with its reason.
#: A C ``int``: SQLite's ``busy_timeout`` and PostgreSQL's ``lock_timeout`` (milliseconds) are one.
#: Above it SQLite silently sets 0, i.e. no waiting at all, and PostgreSQL refuses the session.
C_INT_MAX = 2**31 - 1
#: A terabyte: no WAL, kept or waited for, is meant to be bigger (SQLite checkpoints it itself at
#: about 4 MB); a larger value turns the limit off in effect, and is a typo more likely than a wish.
TIB = 2**40
#: The longest interval of a maintenance job: a job that runs less often than yearly is a job that
#: does not run (there is no setting for that), so a larger value is refused rather than guessed at.
YEAR_S = 365 * 86400
#: The longest a writer client call keeps retrying (``TICKSTACK_CLIENT_DEADLINE``, ``python -m db
#: checkpoint --timeout``): a writer silent for a day is not restarting; finite, so every timer takes it.
MAX_CLIENT_DEADLINE_S = 86400.0


def _shown(x: float) -> str:
    """``x`` as a user types it: 86400, not 86400.0 or 8.64e+04 (the README's table shows it)."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _range_text(minimum: float, maximum: float | None, above: bool) -> str:
    """The allowed range in words, as errors and the README's table say it."""
    low = f"greater than {_shown(minimum)}" if above else f"at least {_shown(minimum)}"
    if maximum is None:
        return low
    return f"{low} and at most {_shown(maximum)}" if above else f"from {_shown(minimum)} to {_shown(maximum)}"


def quoted(raw: str, limit: int = 40) -> str:
    """``raw`` as an error message repeats it: its repr, cut to ``limit`` characters with its length
    said when longer, so a 5,000-digit flag gets a one-line error of reasonable size."""
    if len(raw) <= limit:
        return repr(raw)
    return f"{raw[:limit]!r}... ({len(raw):,} characters)"


def _plain(raw: str) -> str:
    """``raw`` unless it holds what Python's ``int()`` and ``float()`` take but a number written for a
    setting or a flag does not: ``_`` between digits (``1_000``) and any non-ASCII character (digits
    of other scripts, such as ``١٢``, and other spaces); a ValueError for those."""
    if "_" in raw or not raw.isascii():
        raise ValueError(raw)
    return raw


def _finite_number(raw: str, minimum: float, maximum: float | None, above: bool) -> float:
    """``raw`` as a finite number in range; else a ValueError whose text follows ``'raw' ``. The one
    rule for settings (:func:`number`) and flags (:func:`number_flag`): nan and inf are refused,
    since no timer, sleep or SQL column can take them (``now >= nan`` is never true: a wait for ever)."""
    bound = _range_text(minimum, maximum, above)
    try:
        value = float(_plain(raw))
    except ValueError:
        raise ValueError(f"is not a number {bound}") from None
    if not (math.isfinite(value) and (value > minimum if above else value >= minimum)
            and (maximum is None or value <= maximum)):
        raise ValueError(f"must be a number {bound}")
    return value


def number(minimum: float = 0.0, maximum: float | None = None, *, above: bool = False) -> Parser:
    """A finite number in ``minimum..maximum`` (above ``minimum`` with ``above``)."""

    def parse(name: str, raw: str) -> float:
        try:
            return _finite_number(raw, minimum, maximum, above)
        except ValueError as e:
            raise ConfigError(f"{name}={quoted(raw)} {e}") from None

    parse.__doc__ = f"a number {_range_text(minimum, maximum, above)}"
    return parse


def whole(minimum: int = 0, maximum: int | None = None, *, above: bool = False) -> Parser:
    """A whole number in ``minimum..maximum`` (above ``minimum`` with ``above``)."""
    low = minimum + 1 if above else minimum
    bound = _range_text(minimum, maximum, above)

    def parse(name: str, raw: str) -> int:
        text = raw.strip()
        try:
            value = int(_plain(text))
        except ValueError:
            # int() refuses over 4300 digits (CPython's guard): such a number is out of range, not text.
            said = "must be" if text.isascii() and text.lstrip("+-").isdigit() else "is not"
            raise ConfigError(f"{name}={quoted(raw)} {said} a whole number {bound}") from None
        if value < low or (maximum is not None and value > maximum):
            raise ConfigError(f"{name}={quoted(raw)} must be a whole number {bound}")
        return value

    parse.__doc__ = f"a whole number {bound}"
    return parse


def number_flag(minimum: float = 0.0, maximum: float | None = None, *,
                above: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in range, by :func:`number`'s rule (nan, inf refused). Here,
    not in ``bench``: ``python -m db`` needs it too, and db imports nothing above it."""
    bound = _range_text(minimum, maximum, above)

    def parse(text: str) -> float:
        try:
            return _finite_number(text, minimum, maximum, above)
        except ValueError as e:
            import argparse  # only to say why: the settings' users need not load it

            raise argparse.ArgumentTypeError(f"{quoted(text)} {e}") from None

    parse.__doc__ = f"argparse type: a number {bound}"
    return parse


def whole_flag(low: int, high: int) -> Callable[[str], int]:
    """argparse type: a whole number in ``low..high``, by :func:`number_flag`'s rule (finite, in
    range, the range said in the error), then whole ("1e3" is 1000, "2.5" is refused). Both bounds
    are below 2**53, so every number in range is exact."""
    if max(abs(low), abs(high)) >= 2**53:
        raise ValueError(f"whole_flag({low}, {high}): a bound of 2**53 or more is not exact as a number")
    in_range = number_flag(low, high)

    def parse(text: str) -> int:
        import argparse

        try:
            value = in_range(text)
        except argparse.ArgumentTypeError:
            value = math.nan
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"{quoted(text)} must be a whole number from {low} to {high}")
        return int(value)

    parse.__doc__ = f"argparse type: a whole number from {low} to {high}"
    return parse


_positive = number_flag(0.0, above=True)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (``nan``, ``inf``, ``0`` and ``-1`` refused)."""
    return _positive(text)


def choice(*choices: str) -> Parser:
    """One of ``choices`` (case-insensitive; stored upper case)."""

    def parse(name: str, raw: str) -> str:
        value = raw.strip().upper()
        if value not in choices:
            raise ConfigError(f"{name}={quoted(raw)} must be {' or '.join(choices)}")
        return value

    parse.__doc__ = " or ".join(choices)
    return parse


def flag(name: str, raw: str) -> bool:
    """`1`/`0` (also `true`/`false`, `yes`/`no`, `on`/`off`)"""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={quoted(raw)} must be 1 or 0 (true/false, yes/no, on/off)")


def user_name(name: str, raw: str) -> str:
    """1-64 characters of letters, digits and ``. _ : / @ -``"""
    if not NAME_RE.fullmatch(raw):
        raise ConfigError(f"{name}={raw[:70]!r} is not a user name (1-64 characters of letters, digits . _ : / @ -)")
    return raw


def host_name(name: str, raw: str) -> str:
    """1-64 characters of letters, digits and ``. _ -`` (a host name as PostgreSQL sessions show it)"""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", raw):
        raise ConfigError(f"{name}={raw[:70]!r} is not a host name (1-64 characters of letters, digits . _ -)")
    return raw


#: Decimals a price may be configured with (``TICKSTACK_PRICE_DECIMALS``).
MAX_PRICE_DECIMALS = 8


def price_decimals(name: str, raw: str) -> dict[str, int]:
    """``SYMBOL=DECIMALS`` pairs separated by commas (``EURUSD=5,BTCUSD=2``), decimals 0-8"""
    out: dict[str, int] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        symbol, sep, digits = (x.strip() for x in item.partition("="))
        if not sep:
            raise ConfigError(f"{name}: {item[:40]!r} is not SYMBOL=DECIMALS (e.g. {name}=EURUSD=5,BTCUSD=2)")
        if not SYMBOL_RE.fullmatch(symbol):
            raise ConfigError(f"{name}: {symbol[:40]!r} is not a symbol (1-32 characters of A-Z 0-9 . _ : / -, "
                              "upper case)")
        if not (digits.isascii() and digits.isdigit()) or int(digits) > MAX_PRICE_DECIMALS:
            raise ConfigError(f"{name}: {symbol}={digits[:20]!r}: decimals must be a whole number from 0 to "
                              f"{MAX_PRICE_DECIMALS}")
        if symbol in out:
            raise ConfigError(f"{name}: {symbol} is given twice")
        out[symbol] = int(digits)
    return out


def secret_text(name: str, raw: str) -> str:
    """any text (blank means unset); never printed"""
    return raw.strip()


def strong_secret(minimum: int) -> Parser:
    def parse(name: str, raw: str) -> str:
        value = raw.strip()
        if len(value) < minimum:
            raise ConfigError(f"{name} must be at least {minimum} characters (it has {len(value)}): a secret "
                              "anyone could guess is no secret; leave it unset to have one generated")
        return value

    parse.__doc__ = f"a secret of at least {minimum} characters (blank means unset); never printed"
    return parse


def path(name: str, raw: str) -> Path:
    """a folder (``~`` expanded)"""
    try:
        return Path(raw).expanduser().absolute()
    except RuntimeError:  # ~name of no user (or no home): "Could not determine home directory."
        user = raw.split("/", 1)[0]
        raise ConfigError(f"{name}={quoted(raw)}: {user} cannot be expanded (no such user, or no home "
                          "folder); give the folder's absolute path") from None


#: The databases tickstack runs on (an SQLAlchemy URL's dialect, before any ``+driver``).
DATABASES = ("sqlite", "postgresql")
#: A server's URL schemes: psycopg 3 (SQLAlchemy 2.1's default driver for a bare ``postgresql``), the
#: driver of the COPY paths (:mod:`db.statements`).
SERVER_SCHEMES = ("postgresql", "postgresql+psycopg")


def database_url(name: str, raw: str) -> str:
    """an SQLAlchemy URL: SQLite's file by its absolute path, or a PostgreSQL server"""
    if "://" not in raw:
        raise ConfigError(f"{name}: not a database URL (expected e.g. sqlite:////path/to.db)")
    scheme, rest = raw.split("://", 1)
    dialect = scheme.split("+", 1)[0].lower()
    if dialect not in DATABASES:  # only the scheme is quoted: the rest may hold a password
        raise ConfigError(f"{name}: the database {dialect[:32]!r} is not supported; use sqlite:////path/to.db "
                          "or postgresql+psycopg://user@host/name")
    problem = _sqlite_url_problem(scheme, rest) if dialect == "sqlite" else _server_url_problem(raw)
    if problem:  # said without the URL, which may hold a password
        raise ConfigError(f"{name}: {problem}")
    return raw


def _sqlite_url_problem(scheme: str, rest: str) -> str | None:
    """What is wrong with SQLite's URL (``scheme://rest``) for the stack, or None. Every process must
    open the one file: an in-memory database is each connection's own and ends with the writer (every
    acknowledged write lost), and a relative path is each process's working folder's."""
    example = "e.g. sqlite:////home/me/tickstack.db (four slashes before an absolute path)"
    if scheme != "sqlite":
        return f"give SQLite's URL with no driver after sqlite ({example})"
    path, _, query = rest[1:].partition("?") if rest.startswith("/") else ("", "", "")
    if path in ("", ":memory:") or "mode=memory" in query:
        return ("an SQLite database in memory is each connection's own and is lost with the writer, with every "
                f"write it acknowledged; give a file ({example})")
    if not path.startswith("/"):
        return f"give the SQLite file's absolute path, not one relative to each process's folder ({example})"
    if path.endswith("/"):
        return f"give the SQLite file's path, not a folder's ({example})"
    if query:  # the engines set the connection's own (busy timeout, WAL, synchronous, read-only) from settings
        return ("SQLite's URL takes no parameters (?...): the stack opens the file its own way, from the "
                f"TICKSTACK_* settings (busy timeout, synchronous; readers read-only) ({example})")
    return None


AT_IN_USERINFO = ("the user name or password holds an '@': percent-encode it (%40; ':' is %3A, '/' %2F, '%' %25), "
                  "else part of the password is read as the host")


def _server_url_problem(raw: str) -> str | None:
    """What is wrong with a server's URL, or None. SQLAlchemy ends the password at its first '@': a
    second one before the host left the rest of the password in the host, which logs, ``db health``
    and ``/api/health`` (no login) then showed. An '@' in the query (``?user=a@corp``) is no host's."""
    from sqlalchemy.engine import make_url  # here: most settings' users never parse a server's URL

    scheme = raw.split("://", 1)[0].lower()
    if scheme not in SERVER_SCHEMES:  # any other was taken, then a traceback in every process (no such
        # driver), or a driver the COPY paths do not speak; the name only: the URL may hold a password
        return (f"the driver {quoted(scheme)} is not the one tickstack runs PostgreSQL with; use "
                "postgresql+psycopg://user@host/name (psycopg 3)")
    at_signs = raw.split("://", 1)[1].split("?", 1)[0].count("@") > 1  # before the query: a host's part
    try:
        url = make_url(raw)
    except ValueError:  # SQLAlchemy's one: a port that is no whole number. Its words quote the text
        if at_signs:  # "p@ss:w/rd@host": the ':' after the password's '@' was read as the port's
            return AT_IN_USERINFO
        return "the port after the host is not a whole number (e.g. postgresql+psycopg://user@host:5432/name)"
    except Exception as e:  # said by its type alone, its words may quote the URL, password and all
        return f"not a URL SQLAlchemy can read ({type(e).__name__}); e.g. postgresql+psycopg://user@host/name"
    # A '/' in it ends the host there: the rest, the '@' with it, is read as the database's name.
    if "@" in (url.host or "") or "@" in (url.database or ""):
        return AT_IN_USERINFO
    if url.port is not None and not 1 <= url.port <= 65535:
        return f"the port {url.port} is not from 1 to 65535"
    return _libpq_option_problem(url.query)


#: libpq's options whose values are a set, and those that are whole numbers. libpq refuses any other
#: value only when it connects, in words every reader took for a server that does not answer (and the
#: writer waited its whole server wait for a typo).
LIBPQ_CHOICES = {"sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
                 "gssencmode": ("disable", "prefer", "require"), "channel_binding": ("disable", "prefer", "require"),
                 "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")}
LIBPQ_WHOLE = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
               "tcp_user_timeout")


def _libpq_option_problem(query: Any) -> str | None:
    """What is wrong with a server URL's parameters (``?sslmode=...``) as libpq reads them, or None.
    Never a ``password`` parameter's value: only the option's name is said for it."""
    if not query:  # most URLs: psycopg not imported for them (circusd's hooks load the settings too)
        return None
    from psycopg import ProgrammingError
    from psycopg.conninfo import make_conninfo

    for key, values in query.items():
        value = values[-1] if isinstance(values, tuple) else values  # the last of a repeated one counts
        if key in LIBPQ_CHOICES and value not in LIBPQ_CHOICES[key]:
            return f"{key}={quoted(value)} is not one of {', '.join(LIBPQ_CHOICES[key])}"
        if key in LIBPQ_WHOLE and not re.fullmatch(r"-?[0-9]+", value.strip()):
            return f"{key}={quoted(value)} is not a whole number"
        try:
            make_conninfo("", **{key: value})
        except ProgrammingError:  # libpq's parser: no such option (its words quote only the name)
            return f"{quoted(key)} is not a connection option libpq knows (e.g. ?sslmode=require)"
    return None


def writer_endpoint(name: str, raw: str) -> str:
    """ipc://PATH, or tcp:// on a loopback address (127.x.x.x, localhost) and a port"""
    if raw.startswith("ipc://"):
        if not raw[len("ipc://"):]:
            raise ConfigError(f"{name}={quoted(raw)}: give a socket path after ipc://")
        check_ipc_path(raw[len("ipc://"):], name)
        return raw
    if raw.startswith("inproc://"):
        raise ConfigError(f"{name}={quoted(raw)}: other processes cannot reach an inproc:// endpoint; use ipc:// "
                          "or a loopback tcp:// address")
    # IPv4 only: none of our sockets sets ZeroMQ's IPV6 option, without which [::1] cannot be bound.
    match = re.fullmatch(r"tcp://(127(?:\.[0-9]{1,3}){3}|localhost)(?::([^:]*))?", raw)
    if match is None or not all(int(octet) <= 255 for octet in re.findall(r"\d+", match[1])):
        raise ConfigError(f"{name}={quoted(raw)}: use ipc:// or a loopback tcp:// address (127.0.0.1 or localhost, "
                          "with a port)")
    port = match[2] or ""
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(f"{name}={quoted(raw)}: give a port from 1 to 65535 (the writer's clients must know it: "
                          "not 0 or *, which ZeroMQ would choose)")
    return raw


def check_ipc_path(path: str, what: str) -> None:
    """Fail with advice when a Unix socket path cannot be bound."""
    if len(os.fsencode(path)) > MAX_IPC_PATH:
        raise ConfigError(
            f"{what}: the socket path {path!r} is {len(os.fsencode(path))} bytes, over the "
            f"{MAX_IPC_PATH}-byte limit of Unix sockets; set TICKSTACK_HOME to a shorter folder "
            "(e.g. TICKSTACK_HOME=~/.tickstack)"
        )


def check_seconds(what: str, value: float) -> float:
    """``value`` when it is a finite number of seconds, 0 or more; else a ValueError naming ``what``.
    A deadline of nan is never reached (``now >= nan`` is false), nor one of inf, and a negative one
    has passed before the first send: each would be a wait for ever or a call that never tries."""
    try:
        ok = math.isfinite(value) and value >= 0
    except (TypeError, OverflowError):  # not a number, or an int too large for a float
        ok = False
    if not ok:
        raise ValueError(f"{what} must be a finite number of seconds, 0 or more; got {value!r}")
    return value


def path_flag(text: str) -> str:
    """argparse type: a path that is not empty (``''`` is the current folder to ``Path``: a backup
    to ``''`` said "/work/main is a folder"; fault hunt, round 38)."""
    if not text.strip():
        import argparse

        raise argparse.ArgumentTypeError(f"{quoted(text)} is {'empty' if not text else 'blank'}: give a file's path")
    return text
