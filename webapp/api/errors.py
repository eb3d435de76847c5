"""Errors of the API: the one place responses for failures are made.

Every failure under ``/api`` and ``/metrics`` answers ``{"error": {"code",
"message"}}`` (:func:`webapp.errors.json_error`), Flask's own 404/405/413 and
unhandled 500s included; so does every other path of an app that serves only
the API (its port answers JSON everywhere, ``/`` included), and so do the
requests gunicorn refuses itself there (:func:`server_refusal`). Only the
console's paths, in an app that also serves the console, keep their own handling.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import NoReturn

from flask import Flask, Response, current_app, request
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import OperationalError, ProgrammingError
from werkzeug.exceptions import HTTPException, MethodNotAllowed, SecurityError
from werkzeug.http import HTTP_STATUS_CODES

from db.errors import (
    CommitFailed,
    Conflict,
    NotFound,
    StorageFull,
    ValidationError,
    WriterError,
    WriterUnavailable,
    failed_connection_words,
    lock_wait_words,
    read_refusal,
)
from webapp.api.limits import RETRY_AFTER
from webapp.api.state import api_state, bp
from webapp.errors import json_error, wrong_host_message

log = logging.getLogger("tickstack.api")

#: Paths whose errors are JSON (the API's and its metrics).
API_PATHS = ("/api", "/metrics")
#: The console's blueprint: its paths keep their own error pages when it is served beside the API.
CONSOLE_BLUEPRINT = "console"
#: The code of each HTTP status in the error body; any other status: its name in snake_case (:func:`error_code`).
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 414: "uri_too_long",
              415: "unsupported_media_type", 500: "internal_error", 503: "unavailable", 507: "storage_full"}
#: The message of every 500 the API answers: what went wrong is for its log, not for the client.
INTERNAL_ERROR = "internal error; the API log has the details"


class ApiError(Exception):
    """A failure with its HTTP status, error code and message."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def bad_param(message: str) -> NoReturn:
    """Stop with 400 ``invalid_parameter`` and ``message``."""
    raise ApiError(400, "invalid_parameter", message)


def error_code(status: int) -> str:
    """The code of the error body for an HTTP ``status``: :data:`HTTP_CODES`, else the status's name in
    snake_case (431: ``request_header_fields_too_large``)."""
    return HTTP_CODES.get(status) or "_".join(HTTP_STATUS_CODES.get(status, "error").lower().split())


def json_everywhere(app: Flask) -> bool:
    """Whether ``app`` answers every error in JSON at any path: it serves the API without the console
    (``create_app("api")``: the API's port is JSON only)."""
    return bp.name in app.blueprints and CONSOLE_BLUEPRINT not in app.blueprints


def server_refusal(app: Flask, status: int, reason: str) -> Response:
    """The error body of a request the server refused before ``app`` saw it (gunicorn's 400, 414,
    431, ...: :class:`webapp.gunicorn_worker.HeadersFirstWorker`), with its ``status`` and ``reason``."""
    with app.app_context():
        return json_error(status, INTERNAL_ERROR if status == 500 else reason, error_code(status))


def _json_errors_for(path: str) -> bool:
    """Whether an error at ``path`` is answered in JSON: under /api and /metrics always, and at
    any path of an app without the console (:func:`json_everywhere`)."""
    return any(path == p or path.startswith(p + "/") for p in API_PATHS) or json_everywhere(current_app)


@bp.app_errorhandler(HTTPException)
def _http_error(e: HTTPException) -> ResponseReturnValue:
    """Flask's and Werkzeug's own errors, as JSON under /api and /metrics
    and anywhere in the API-only app; on the console's paths Flask's page."""
    if not _json_errors_for(request.path) or e.code is None:
        return e
    code = error_code(e.code)
    headers: dict[str, str] = {}
    message = e.description or e.name
    if isinstance(e, SecurityError):
        message = wrong_host_message()
    elif e.code == 404:
        message = f"no such endpoint: {request.path} (the routes are in /api/openapi.json)"
    elif isinstance(e, MethodNotAllowed):
        allowed = ", ".join(e.valid_methods or ())
        headers["Allow"] = allowed
        message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    elif e.code == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        message = f"the body is larger than the limit of {limit} bytes; send fewer ticks per request"
    elif e.code == 500:
        message = INTERNAL_ERROR
    return json_error(e.code, message, code, headers)


@bp.app_errorhandler(ApiError)
def _api_error(e: ApiError) -> ResponseReturnValue:
    return json_error(e.status, e.message, e.code, e.headers)


@bp.errorhandler(WriterError)
def _writer_error(e: WriterError) -> ResponseReturnValue:
    """The writer's typed errors (and the local validation that mirrors it)."""
    if isinstance(e, ValidationError):
        # Top-level fields come out of db.ops as ": missing field 'x'" (an empty path before the colon).
        return json_error(400, str(e).removeprefix(": "), "invalid_body")
    if isinstance(e, NotFound):
        return json_error(404, str(e), "not_found")
    if isinstance(e, Conflict):
        return json_error(409, str(e), "conflict")
    if isinstance(e, StorageFull):
        # Before WriterUnavailable (its base): the writer knows why, and says so; nothing was written.
        return json_error(507, str(e), "storage_full", {"Retry-After": str(RETRY_AFTER)})
    if isinstance(e, WriterUnavailable | CommitFailed):
        return json_error(
            503,
            f"the writer did not answer within {api_state().deadline:g} s ("
            + ("no writer is running: it is stopped, and an operator must start it"
               if getattr(e, "no_writer", False) else "it may be restarting") + "); the write may or "
            "may not have been applied: ticks with source and seq can be resent safely, and GET /api/trades "
            "shows whether a trade was opened or closed", "writer_unavailable", {"Retry-After": str(RETRY_AFTER)})
    log.error("writer call failed: %s", e)
    return json_error(500, f"the writer could not apply the request: {e}", "write_failed")


@bp.errorhandler(OperationalError)
def _database_error(e: OperationalError) -> ResponseReturnValue:
    """A read that failed for the database's reasons (locked past the busy
    timeout, file missing): transient, so 503."""
    log.warning("read failed: %s", e.orig)
    locked = lock_wait_words(e)
    if locked is not None:
        return json_error(503, f"the database could not be read: {locked}", "database_locked",
                          {"Retry-After": str(RETRY_AFTER)})
    said = failed_connection_words(e) or e.orig  # the log above has libpq's words: they name the role
    return json_error(503, f"the database could not be read: {said}", "database_unavailable",
                      {"Retry-After": str(RETRY_AFTER)})


@bp.errorhandler(ProgrammingError)
def _read_refused(e: ProgrammingError) -> ResponseReturnValue:
    """A read the readers' role may not make (a missed GRANT, :func:`db.errors.read_refusal`): the
    service is misconfigured, not the request, and it stays so until someone grants it: 503 with
    what to grant. Any other statement the database refused is a bug of ours: the 500 of
    :func:`_http_error`, its traceback in the log."""
    refusal = read_refusal(e, api_state().settings.read_url_variable)
    if refusal is None:
        raise e
    log.error("read refused: %s", refusal)
    return json_error(503, refusal, "read_refused")
