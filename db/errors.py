"""Errors a writer call can raise, shared by the writer (which names them in
its replies) and :class:`db.client.WriterClient` (which raises them)."""
from __future__ import annotations


class WriterError(Exception):
    """Base of every error a writer call raises."""

    #: Whether the client may retry the same request (same id) and succeed.
    retryable = False


class ValidationError(WriterError, ValueError):
    """The request is malformed: unknown op, missing or extra field, wrong
    type or value. Nothing was written; retrying cannot help."""


class NotFound(WriterError, LookupError):
    """The request names something that does not exist (e.g. a trade id)."""


class Conflict(WriterError):
    """The request contradicts stored state (e.g. closing a closed trade)."""


class OpFailed(WriterError):
    """The op failed for a reason of the database's; nothing was written."""


class RequestIdReused(WriterError):
    """The request's (client id, seq) was already applied to a different request (another op or
    other arguments): nothing of this one was written, and retrying it cannot help. A resend of the
    same request gets the first answer; a new request needs an id of its own."""


class CommitFailed(WriterError):
    """The batch holding the request could not be committed (disk full, I/O
    error). Nothing of it was written; the client retries."""

    retryable = True


class WriterUnavailable(WriterError):
    """No answer from the writer within the client's deadline. The request
    may or may not have been applied: retry it with the same client and
    request id (``WriterClient`` does) and it is applied at most once."""

    retryable = True
    #: Set by the client when no writer ran in its home either (nobody held the writer lock): stopped,
    #: not restarting.
    no_writer = False


class StorageFull(WriterUnavailable):
    """The database's disk is full: nothing of the request was written. A state, not a crash: the
    writer keeps serving and answers this until space returns; the client may retry later.

    A kind of :class:`WriterUnavailable` (the writer cannot take writes for now, and a retry is
    safe), so code that waits out an unavailable writer (spooling, retrying later) does the same
    on a full disk, and code that wants to say "disk full" (the API's 507) tests for it first."""


ERROR_TYPES: dict[str, type[WriterError]] = {
    cls.__name__: cls for cls in (ValidationError, NotFound, Conflict, OpFailed, RequestIdReused, CommitFailed,
                                 StorageFull)
}


class MaintenanceFailed(RuntimeError):
    """A backup, a dump or a check failed for a reason outside this code (pg_dump's or the server's
    words, a copy that failed its integrity check): the message says what and why. Raised by
    :mod:`db.health` and :mod:`db.server`; the jobs worker logs it in one line (a traceback would
    point at nothing to fix), unlike Python's own RuntimeErrors, which are bugs."""


class TableLocked(MaintenanceFailed):
    """A backup gave up waiting for a table another session holds locked (``db.server``'s
    ``MAINTENANCE_LOCK_WAIT_S``), that session named: it may be made once that session ends, so the
    jobs worker tries a scheduled one again soon, not a period later."""


#: libpq's words for a login the server refused: it answered (a wrong password, an unknown role or
#: database, pg_hba.conf, a role made without LOGIN, one without CONNECT on the database), which
#: "does not answer" would send the reader looking at the wrong thing (and the writer waited for it).
LOGIN_REFUSED = ("authentication failed", "no password supplied", "pg_hba.conf", "does not exist",
                 "is not permitted to log in", "permission denied for database")


#: What the readers' role needs when it may not read the stack's tables (a GRANT missed in the README's
#: role set-up): said by doctor, which names the tables, and by every read that fails for it.
READ_GRANT = "GRANT SELECT ON ALL TABLES IN SCHEMA public TO that role"


def read_refusal(error: BaseException, variable: str) -> str | None:
    """One line for a read the database refused for want of a privilege (SQLSTATE 42501,
    insufficient_privilege: the role of ``variable``, the readers' URL, lacks SELECT), with the
    GRANT that mends it; None for any other error. Such a read fails every time until someone
    grants it: a traceback (the monitor's) or "internal error" (the API's) pointed at nothing."""
    if getattr(getattr(error, "orig", None), "sqlstate", None) != "42501":
        return None
    return (f"{variable}'s role may not read a table the stack needs ({database_words(error, 200)}); as a "
            f"superuser, in the database: {READ_GRANT} (`python -m db doctor` names every table it may not read)")


def lock_wait_words(error: BaseException) -> str | None:
    """One line for a read that waited past ``TICKSTACK_LOCK_TIMEOUT_MS`` on a lock another session
    holds (SQLSTATE 55P03, lock_not_available: a ``LOCK TABLE`` in a session left open, a schema
    change), and where to find which; None for any other error. Retryable: it ends with the lock."""
    if getattr(getattr(error, "orig", None), "sqlstate", None) != "55P03":
        return None
    return ("a table this read needs is locked by another session (held past TICKSTACK_LOCK_TIMEOUT_MS: a LOCK "
            "TABLE in a session left open, or a schema change); try again, and `python -m db doctor` names "
            "the session holding it")


#: libpq's words for a server with no connection slot left for a new session (SQLSTATE 53300,
#: too_many_connections: max_connections reached, its last slots kept for superusers, or a CONNECTION
#: LIMIT of the role or the database). It runs and answers: "does not answer ... is it running?" sent
#: the reader to a server that runs (fault hunt: max_connections reached). Waiting mends it.
NO_FREE_SLOT = ("too many clients already", "remaining connection slots are reserved", "too many connections for")


def server_trouble(reason: str) -> str:
    """``has no free connection slot``, ``refuses the login`` or ``does not answer``: what a failed
    connection's ``reason`` (libpq's words) says the database server did."""
    said = reason.lower()
    if any(w in said for w in NO_FREE_SLOT):
        return "has no free connection slot"
    return "refuses the login" if any(w in said for w in LOGIN_REFUSED) else "does not answer"


def failed_connection_words(error: BaseException) -> str | None:
    """``the database server ...`` (:func:`server_trouble`) when ``error`` is a connection to a server
    that failed (psycopg gives those no SQLSTATE), for an answer to a caller with no login: libpq's
    words name the server's host, the database and the role (the API's 503 of a read served them to
    anyone during the fault hunt's max_connections and renamed database). None for any other error."""
    orig = getattr(error, "orig", None) or error
    if type(orig).__module__.split(".")[0] != "psycopg" or getattr(orig, "sqlstate", None) is not None:
        return None
    return f"the database server {server_trouble(str(orig))}"


def server_trouble_words(reason: str, variable: str) -> str:
    """doctor's line for a server that ``variable``'s URL could not connect to (libpq's ``reason``), with
    what to do: each of :func:`server_trouble`'s kinds has its own."""
    trouble = server_trouble(reason)
    if trouble == "refuses the login":
        return (f"The database server refuses the login of {variable} ({reason}): the readers (API, console, "
                "workers) cannot read. Check that URL's user, password and database name.")
    if trouble == "has no free connection slot":
        return (f"The database server has no free connection slot ({reason}): it runs, but lets no new session "
                "in (max_connections reached, or a CONNECTION LIMIT on the role or the database). Sessions the "
                "stack holds work on (the writer's: writes are stored); anything needing a new one (a read of the "
                "API or the console, a process starting) waits or fails. As a superuser (max_connections keeps "
                "superuser_reserved_connections for them), `SELECT usename, application_name, state, count(*) "
                "FROM pg_stat_activity GROUP BY 1, 2, 3 ORDER BY 4 DESC` names who holds them: end what should "
                "not (pg_terminate_backend), or raise max_connections.")
    return (f"The database server does not answer ({reason}): nothing can be written or read until it is back. "
            "The writer waits for it and serves again once it is; check the server (is it running? "
            f"`pg_isready`), its host and {variable}.")


def named_database_words(error: BaseException, limit: int = 400) -> str:
    """``Type: words``: the driver's error class (``LockNotAvailable``, ``OperationalError``; SQLAlchemy's
    wrapper says only its own) and :func:`database_words`, in one line."""
    return f"{type(getattr(error, 'orig', None) or error).__name__}: {database_words(error, limit)}"


def database_words(error: BaseException, limit: int = 400) -> str:
    """The database's own words for ``error`` in one line of at most ``limit`` characters: the
    driver's message (SQLAlchemy's ``orig``), never SQLAlchemy's text around it, which adds the
    statement (an insert of 100 rows of ``VALUES``) and often its parameters (the rows themselves)
    to a log line or an answer. A server's message may run over lines (PostgreSQL's ``CONTEXT``)."""
    words = " ".join(str(getattr(error, "orig", None) or error).split())
    return words if len(words) <= limit else words[:limit - 1] + "…"
