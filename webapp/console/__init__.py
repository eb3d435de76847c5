"""The admin console: a server-rendered blueprint at ``/console``, served by gunicorn in its own
circus watcher. Every action works as a plain HTML form without JavaScript; where JavaScript runs,
pages update themselves by polling JSON endpoints under ``/console/api/``. No asset comes from
the network (the chart library is vendored under ``static/vendor/``), so it works offline.

Pages: ``/console/watchers`` (and ``/console/watchers/<name>``, a page per watcher:
:mod:`~webapp.console.watcher_page`; restart-all and signals: :mod:`~webapp.console.watcher_actions`),
``/console/database``, ``/console/charts``, ``/console/market``, ``/console/logs`` (what is read and
how: :mod:`~webapp.console.logfiles`), ``/console/audit``; login in :mod:`webapp.auth`. The console reads the database
through the read-only ``db`` and changes it only through the writer's ops; every action it takes is
recorded in the audit log (:func:`webapp.console.common.audit`).
"""
from __future__ import annotations

from flask import Response, jsonify, redirect, render_template, request, url_for
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError
from gunicorn.http.errors import ParseException
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException, MethodNotAllowed, SecurityError

from db.errors import WriterError, lock_wait_words, read_refusal
from supervision.circus import CircusError
from webapp import auth
from webapp.console.common import audit, bp, log, settings, wants_json, writer_stopped
from webapp.console.formats import FILTERS
from webapp.errors import json_error, wrong_host_message

auth.register(bp, audit)  # first: its session check runs before anything else of the console's

from webapp.console import (  # noqa: E402,F401 - routes
    audit_log,
    charts,
    database,
    logs,
    market,
    watcher_actions,
    watcher_page,
    watchers,
)

for _name, _filter in FILTERS.items():
    bp.add_app_template_filter(_filter, _name)

NAV = (("console.watchers", "Watchers"), ("console.database", "Database"), ("console.charts", "Charts"),
       ("console.market", "Market"), ("console.logs", "Logs"), ("console.audit_log", "Audit log"))


@bp.context_processor
def _template_globals() -> dict:
    user = auth.logged_in_user()
    # With TICKSTACK_ADMIN_PASSWORD set no file is made or read (one left from before is not it).
    current = settings()
    password_file = None if current.admin_password else current.home / auth.PASSWORD_FILE
    return {"nav": NAV, "user": user, "password_file": password_file,
            "writer_down": writer_stopped() if user else None}


@bp.record_once
def _root_redirect(state: BlueprintSetupState) -> None:
    """``/`` on the console's port leads to the console (a bare 404 there was the first thing a
    new user saw); left alone when the app serves ``/`` itself."""
    if not any(rule.rule == "/" for rule in state.app.url_map.iter_rules()):
        state.app.add_url_rule("/", "console_root", lambda: redirect(url_for("console.index")))


@bp.get("/health")
def health() -> ResponseReturnValue:
    """The console itself is up (it stays up when the writer is not). No login needed."""
    return jsonify({"status": "ok"})


@bp.after_request
def _security_headers(response: Response) -> Response:
    """Scripts only from this origin (no inline script: data reaches them through data-* attributes
    and JSON), no framing, no caching of pages that show the stack's state (the headers of every
    answer of the app: ``webapp._security_headers``)."""
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _error(status: int, title: str, message: str) -> ResponseReturnValue:
    if wants_json():
        return json_error(status, message)
    return render_template("console/error.html", status=status, title=title, message=message), status


@bp.record_once
def _no_route_page(state: BlueprintSetupState) -> None:
    """An address or a method no route has fails in routing, before any blueprint, so the handlers
    below never see it: Werkzeug's bare page was the answer (a new user's run, round 40). In the
    console's own app, the console's page; an app with the API keeps the API's answer."""
    if "api" not in state.app.blueprints:
        state.app.register_error_handler(HTTPException, _no_route)


def _no_route(e: HTTPException) -> ResponseReturnValue:
    if isinstance(e, SecurityError):  # another name in Host: no page, whose links would use that name
        return Response(f"Bad request: {wrong_host_message()}\n", 400, mimetype="text/plain")
    if e.code not in (404, 405):
        return e
    headers = {"Allow": ", ".join(e.valid_methods)} if isinstance(e, MethodNotAllowed) and e.valid_methods else {}
    if e.code == 404:
        title, message = "Page not found", f"There is no console page at {request.path}."
        short = f"no such console API path: {request.path}"
    else:
        title = "Method not allowed"
        message = short = f"{request.method} is not allowed on {request.path}; allowed: {headers.get('Allow', 'none')}"
    if wants_json():
        return json_error(e.code, short, headers=headers)
    page = render_template("console/error.html", status=e.code, title=title, message=message, **_template_globals())
    return page, e.code, headers


@bp.errorhandler(CSRFError)
def _csrf_error(e: CSRFError) -> ResponseReturnValue:
    return _error(400, "Form expired", f"{e.description} Reload the page and try again; nothing was changed.")


@bp.app_errorhandler(ParseException)  # app-wide: the CSRF check reads the form before any view
def _unreadable_body(e: ParseException) -> ResponseReturnValue:
    """gunicorn cannot decode the body (a malformed chunk): the client's fault, said as such (a 500
    and a traceback in the log before)."""
    return _error(400, "Bad request", f"The request's body cannot be read: {e}. Nothing was changed.")


@bp.errorhandler(HTTPException)
def _http_error(e: HTTPException) -> ResponseReturnValue:
    return _error(e.code or 500, e.name, e.description or e.name)


@bp.errorhandler(SQLAlchemyError)
def _database_error(e: SQLAlchemyError) -> ResponseReturnValue:
    refusal = read_refusal(e, settings().read_url_variable)
    if refusal is not None:  # not the writer's absence: a GRANT missed (db.errors.read_refusal)
        log.error("console: read refused: %s", refusal)
        return _error(503, "Read refused", refusal)
    log.warning("console: database read failed: %s", e)
    locked = lock_wait_words(e)
    if locked is not None:
        return _error(503, "Database locked", f"The database cannot be read now: {locked}.")
    return _error(503, "Database unavailable", f"The database cannot be read: {getattr(e, 'orig', e)}. "
                                               "Is the writer running (it creates the database)?")


@bp.errorhandler(CircusError)
def _circus_error(e: CircusError) -> ResponseReturnValue:
    return _error(503, "circusd unavailable", str(e))


@bp.errorhandler(WriterError)
def _writer_error(e: WriterError) -> ResponseReturnValue:
    return _error(503, "Writer unavailable", str(e))
