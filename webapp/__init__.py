"""The web apps: the REST API and the admin console, from one app factory.

``create_app("api")`` and ``create_app("console")`` are served by gunicorn,
each in its own circus watcher, so the console stays up while the API is
saturated or crash-looping. Reads go through Flask-SQLAlchemy on a read-only
engine; every write goes through the writer (:mod:`db.client`). Nothing here
opens a writable connection.

gunicorn loads the app in each worker after the fork, so every worker builds
its own engine and writer client.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response

from db.config import Settings, load_settings
from db.engine import configure_read_only, is_sqlite, reader_url
from webapp.extensions import csrf, db

#: Largest request body accepted (413 beyond): 10,000 ticks fit easily.
MAX_BODY = 8 * 1024 * 1024
#: The console's: its forms are under 1 KB. Its 8 MB before let one URL-encoded form, parsed whole
#: before the CSRF check, cost a worker 400 MB, with no login (a security review, round 41).
MAX_CONSOLE_BODY = 64 * 1024
#: The names the apps answer to (the port aside): they listen on 127.0.0.1 only, so any other name in
#: ``Host`` is a page that rebound its own name to 127.0.0.1 (DNS rebinding) to read the API, or to
#: send wrong logins that delay the owner's: answered 400 (a security review, round 41).
LOCAL_HOSTS = ("127.0.0.1", "localhost")


def _log_through_gunicorn() -> None:
    """Under gunicorn nothing configures the root logger: our records (``tickstack.*``: the API's,
    the console's, the writer client's, the slow reads') went to Python's last-resort handler, bare
    and WARNING and above only. Send them to gunicorn's error log instead, at its level, in its
    format (time, pid, level). Outside gunicorn (tests, a shell) nothing changes."""
    gunicorn = logging.getLogger("gunicorn.error")
    ours = logging.getLogger("tickstack")
    if gunicorn.handlers and not ours.handlers:
        ours.handlers = list(gunicorn.handlers)
        ours.setLevel(gunicorn.level)
        ours.propagate = False


def _host_normalised(wsgi_app: Any) -> Any:
    """``Host`` as the trusted-host check wants it: host names are case-insensitive and may end in a
    dot (``LOCALHOST:8000``, ``localhost.:8000``, as curl sends what is typed), which the check, exact,
    refused (the review of round 41)."""
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        host = environ["HTTP_HOST"] if "HTTP_HOST" in environ else ""  # the request's, not the process's
        if host:
            name, colon, port = host.lower().rpartition(":")
            if not port.isdigit():  # no port (an IPv6 literal's last group is no port either)
                name, colon, port = host.lower(), "", ""
            environ["HTTP_HOST"] = f"{name.rstrip('.')}{colon}{port}"
        return wsgi_app(environ, start_response)
    return app


def _security_headers(response: Response) -> Response:
    """On every answer of either app (the console adds its own policy for its pages): no guessing of
    content types, no framing, no referrer beyond this origin. The API and the console's static files
    and redirects had none (a security review, round 41)."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


def create_app(kind: str = "api", settings: Settings | None = None) -> Flask:
    """Build the ``api`` or ``console`` app (``all`` serves both, for tests)."""
    if kind not in ("api", "console", "all"):
        raise ValueError(f"create_app: kind {kind!r} must be api, console or all")
    settings = settings or load_settings()
    _log_through_gunicorn()
    app = Flask(__name__)
    read_url = reader_url(settings)
    app.config.update(
        TICKSTACK=settings,  # SECRET_KEY: the console sets its own (webapp.auth); the API signs nothing
        MAX_CONTENT_LENGTH=MAX_CONSOLE_BODY if kind == "console" else MAX_BODY,
        TRUSTED_HOSTS=list(LOCAL_HOSTS),
        SQLALCHEMY_DATABASE_URI=read_url,
        # A server may restart under us: check a pooled connection before use (a file cannot).
        SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": not is_sqlite(read_url)},
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_NAME=f"tickstack_{kind}",
        WTF_CSRF_TIME_LIMIT=None,  # the session's lifetime bounds it
        JSON_SORT_KEYS=False,
    )
    db.init_app(app)
    with app.app_context():
        # Sessions named "tickstack api pid N on host"; a lock another session holds waited for at most
        # TICKSTACK_LOCK_TIMEOUT_MS (a request is not held for as long as that session lives).
        configure_read_only(db.engine, settings, role=kind, bounded_lock_wait=True)
    csrf.init_app(app)
    app.after_request(_security_headers)
    app.wsgi_app = _host_normalised(app.wsgi_app)  # type: ignore[method-assign]
    if kind in ("api", "all"):
        from webapp.api import bp as api_bp

        csrf.exempt(api_bp)  # bearer tokens, not cookies: no CSRF to protect against
        app.register_blueprint(api_bp)
    if kind in ("console", "all"):
        from webapp.console import bp as console_bp

        app.register_blueprint(console_bp)
    return app
