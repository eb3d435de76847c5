"""What every console view shares: the blueprint, settings, the writer, circus, the audit log and
input checks.

The console never writes the database: every change goes to the writer as an op, through one
:class:`~db.client.WriterClient` per thread (a client is not thread-safe), built from the app's
own settings rather than the process environment so a test can point an app at any stack.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, NoReturn

from flask import Blueprint, abort, current_app, request, session

from db.circusd import circusctl_command
from db.client import WriterClient, thread_client
from db.config import Settings
from db.errors import ValidationError, WriterError, WriterUnavailable
from db.models import now_ms
from db.validation import without_nul
from supervision.circus import Circus, CircusError
from supervision.procstats import ProcessMeter
from webapp.parsing import parse_int

log = logging.getLogger("tickstack.console")

bp = Blueprint("console", __name__, url_prefix="/console")

#: Defaults of the app.config keys the console reads (set them on the app to change them).
DEFAULTS: dict[str, Any] = {
    # Seconds a console action waits for the writer (the operator is looking at a spinner).
    "CONSOLE_WRITER_DEADLINE": 10.0,
    # Seconds an audit record waits for the writer before it is spooled to a file and sent later.
    "CONSOLE_AUDIT_DEADLINE": 3.0,
    # Seconds to wait for circusd to answer.
    "CONSOLE_CIRCUS_TIMEOUT": 3.0,
}
AUDIT_SPOOL = "console-audit-spool.jsonl"
MAX_SPOOL_LINES = 10_000

_local = threading.local()


def config(key: str) -> Any:
    return current_app.config.get(key, DEFAULTS[key])


def settings() -> Settings:
    """The app's settings (``create_app(..., settings)``)."""
    return current_app.config["TICKSTACK"]


def current_user() -> str | None:
    return session.get("user")


def bad_request(message: str) -> NoReturn:
    """Stop with 400 and ``message`` in words (rendered as a page, or JSON under /console/api/)."""
    abort(400, description=message)


def wants_json() -> bool:
    return request.path.startswith("/console/api/")


# --- the writer ------------------------------------------------------------------------------------


def writer() -> WriterClient:
    """This thread's client for the app's writer (made on first use)."""
    return thread_client(settings(), config("CONSOLE_WRITER_DEADLINE"))


def call_writer(op: str, deadline: float | None = None, **args: Any) -> Any:
    """Run ``op`` on the writer and return its result; raises :mod:`db.errors` errors. ``deadline``
    (seconds) bounds the wait, :data:`DEFAULTS` ``CONSOLE_WRITER_DEADLINE`` by default."""
    stopped = writer_stopped()
    if stopped:
        raise WriterUnavailable(f"{stopped}; nothing was written")
    client = writer()
    ticket = client.submit(op, _deadline=config("CONSOLE_WRITER_DEADLINE") if deadline is None else deadline,
                           **args)
    client.wait(ticket)
    return ticket.result()


def writer_stopped() -> str | None:
    """Why writes cannot succeed now, in words, when circus says the writer is stopped (a
    restart is waited out, not reported); None otherwise, and when circusd does not answer."""
    try:
        status = circus().call("status", name="writer").get("status")
    except CircusError:
        return None
    if status == "stopped":
        return ("the writer is stopped (circus says so): start it on the Watchers page or with "
                f"`{circusctl_command(settings().circus_endpoint, 'start', 'writer')}`")
    return None


# --- circus ------------------------------------------------------------------------------------------


def circus() -> Circus:
    """circusd of the app's stack; raises CircusError at once when it is not running."""
    return Circus(settings().circus_endpoint, timeout=config("CONSOLE_CIRCUS_TIMEOUT"))


def meter() -> ProcessMeter:
    """This thread's process meter (CPU % is measured between two of its calls)."""
    return _local.__dict__.setdefault("meter", ProcessMeter())


# --- the audit log -------------------------------------------------------------------------------


def audit(action: str, target: str = "", result: str = "ok", detail: str = "", actor: str | None = None,
          writer_down: bool = False) -> bool:
    """Record a console action in ``audit_log`` through the writer (``audit`` op).

    Returns True once written. When the writer does not answer within ``CONSOLE_AUDIT_DEADLINE``
    (it is stopped or restarting) the record, with its time, goes to a spool file in the run folder
    and is sent before the next one, so no action goes unrecorded. Stored once: what was sent and
    not answered is dropped from the client's queue first (:func:`_forget_unanswered`), and a
    record that was sent is spooled with the request id it was sent under (client id, seq) and sent
    again under it, so a writer that took it and stopped before answering does not store it twice.
    Returns False then, and when the writer refused it (logged). ``writer_down`` (the action just
    stopped it): spooled without waiting."""
    entry: dict[str, Any] = {"actor": actor or current_user() or "anonymous", "action": action,
                             "target": without_nul(target)[:128], "result": result,
                             "detail": without_nul(detail)[:4000], "ts": now_ms()}
    try:
        if writer_down:
            raise WriterUnavailable("the writer was just stopped")
        if flush_audit_spool() is None:
            raise WriterUnavailable("the writer does not take the spooled records")  # not worth a second wait
        _send_audit(entry)  # sets entry["request"]: from then on it may have been applied
        return True
    except WriterUnavailable:
        _forget_unanswered()
        try:
            _spool(entry)
        except OSError as e:  # a full disk: the action itself went on; say what is not recorded
            log.error("console: the writer did not answer and the audit spool cannot be written (%s); "
                      "not recorded: %s", e, entry)
            return False
        log.warning("console: the writer did not answer; audit record of %s %s spooled", action, target)
    except WriterError as e:
        log.error("console: the writer refused the audit record %s: %s", entry, e)
    return False


def _forget_unanswered() -> None:
    """Drop what this thread's client still holds for a writer that did not answer. ZeroMQ queues
    a request for an absent writer and delivers it when the writer comes back, so an audit record
    that timed out (then spooled) would be stored once from that queue and again from the spool:
    one login while the writer was down gave three rows (the login, one flush attempt, the flush).
    A new socket is made on the next call."""
    writer().close()


def _spool_path() -> Path:
    return settings().run_dir / AUDIT_SPOOL


def _spool(entry: dict[str, Any]) -> None:
    path = _spool_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(entry) + "\n")


#: Seconds a page waits for the writer's ping before it sends the spool (:func:`send_spool_if_writer_answers`):
#: a page, not an action, so not an action's deadline while the writer is away.
SPOOL_PING_S = 0.5


def send_spool_if_writer_answers() -> None:
    """Send the spooled audit records if there are any and the writer answers a ping at once: the
    audit log's page shows what was recorded while the writer was away as soon as it is back (only
    the next action sent them). A ``stat`` when nothing is spooled; at most :data:`SPOOL_PING_S`
    while the writer is away, the records kept."""
    if not _spooled():
        return
    try:
        writer().ping(timeout=SPOOL_PING_S)
    except WriterUnavailable:
        _forget_unanswered()
        return
    flush_audit_spool()


def _spooled() -> bool:
    try:
        return _spool_path().stat().st_size > 0
    except FileNotFoundError:
        return False


def flush_audit_spool() -> int | None:
    """Send spooled audit records to the writer, oldest first; returns how many were sent, or None
    when the writer did not answer (the rest stay spooled). Cheap when there is nothing spooled."""
    if not _spooled():
        return 0
    path = _spool_path()
    sent = 0
    blocked = False
    with open(path, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one process at a time; appenders wait
        lines = f.read().splitlines()[-MAX_SPOOL_LINES:]
        remaining: list[str] = []
        for i, line in enumerate(lines):
            entry: Any = None
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict):
                    raise ValueError("not a JSON object")
                _send_audit(entry)
                sent += 1
            except WriterUnavailable:
                _forget_unanswered()
                # Kept with the request id it was just sent under: the writer may have taken it.
                remaining = [json.dumps(entry), *lines[i + 1:]]
                blocked = True
                break
            except Exception as e:  # unreadable, refused, anything: dropped and said, never a console
                log.error("console: dropping spooled audit record %r: %s", line[:200], e)  # that cannot log in
        f.seek(0)
        f.truncate()
        f.write("".join(f"{line}\n" for line in remaining))
    if sent:
        log.info("console: sent %d spooled audit records", sent)
    return None if blocked else sent


def _send_audit(entry: dict[str, Any]) -> None:
    """Send one audit record, new or from the spool: under the request id it was first sent with,
    if it was sent (the writer then answers "already applied" with the first result instead of
    storing it again); else under a new one, which is written into ``entry`` before the wait, so that a record that
    is not answered now goes back to the spool with the id it may have been taken under."""
    fields = {k: v for k, v in entry.items() if k != "request"}
    request = entry.get("request")
    if request is None:
        stopped = writer_stopped()
        if stopped:
            raise WriterUnavailable(stopped)
        client = writer()
        ticket = client.submit("audit", _deadline=config("CONSOLE_AUDIT_DEADLINE"), **fields)
        entry["request"] = [client.client_id, ticket.seq]
        client.wait(ticket)
        ticket.result()
        return
    if not (isinstance(request, list) and len(request) == 2 and isinstance(request[0], str)
            and type(request[1]) is int):
        raise ValueError(f"the spooled request id {request!r} is not [client id, seq]")
    with WriterClient(settings=settings(), deadline=config("CONSOLE_AUDIT_DEADLINE"), client_id=request[0]) as client:
        ticket = client.submit("audit", _seq=request[1], **fields)
        client.wait(ticket)
        ticket.result()


# --- input --------------------------------------------------------------------------------------------


def int_arg(raw: str | None, name: str, minimum: int, maximum: int, default: int | None = None) -> int:
    """``raw`` as a whole number in ``minimum..maximum`` (read like the API reads its integers,
    :func:`webapp.parsing.parse_int`); ``default`` when absent; else 400 with the reason."""
    if raw is None or raw == "":
        if default is None:
            bad_request(f"{name} is required (a whole number {minimum}..{maximum})")
        return default
    try:
        return parse_int(name, raw, minimum, maximum, f"a whole number ({minimum}..{maximum})")
    except ValidationError as e:
        bad_request(str(e))
