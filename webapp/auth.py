"""Console login: one administrator, a generated password, rate-limited failures.

* **No default password.** On its first start the console generates a random password into
  ``$TICKSTACK_HOME/admin-password`` (mode 0600, :func:`db.config.read_or_create_secret`, safe when
  both gunicorn workers race) and logs that path, never the password. The user name is ``admin``,
  or ``TICKSTACK_ADMIN_USER``. Only a werkzeug hash of the password is kept in memory, made at
  start: to change the password, write a new one into the file and restart the console.
* **Sessions** are Flask's signed cookie (HttpOnly, SameSite=Lax) holding the user, the login time
  and a fingerprint of the password (:attr:`Credentials.fingerprint`): a session ends at logout,
  after :data:`SESSION_MAX_AGE_S`, or when the password changes (and the console restarts). Every
  console page but the login page and ``/console/health`` needs one: a page asked for without one
  redirects to the login page (302), a POST action too (and is not performed), a ``/console/api/``
  endpoint answers 401.
* **Audit**: logins (ok and denied) and logouts are recorded with the audit function the console
  passes to :func:`register` (this module does not import the console, which imports it).
* **Failed logins** are limited to :data:`MAX_FAILURES` per :data:`WINDOW_S` per remote address and
  per user name; beyond that the login answers 429 without checking the password. Failures are
  counted in ``$TICKSTACK_HOME/run/console-login-failures.json`` under an exclusive lock, so every
  gunicorn worker shares one count and a console restart does not reset it. The remote address is
  the TCP peer: gunicorn listens on 127.0.0.1 itself and no proxy header is trusted.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue
from werkzeug.security import check_password_hash, generate_password_hash

from db.config import Settings, read_or_create_secret
from webapp.errors import json_error

log = logging.getLogger("tickstack.console")

PASSWORD_FILE = "admin-password"
FAILURES_FILE = "console-login-failures.json"
MAX_FAILURES = 5
WINDOW_S = 300.0
SESSION_MAX_AGE_S = 12 * 3600
#: Failure records kept at most (oldest dropped), so a flood cannot grow the file without bound.
MAX_RECORDS = 10_000
#: Endpoints served without a session.
PUBLIC_ENDPOINTS = frozenset({"console.login", "console.health"})
#: Key of the audit function in ``app.extensions``.
AUDIT_EXTENSION = "tickstack_auth_audit"

#: Records a console action: ``audit(action, target, result, detail, actor=...)``
#: (:func:`webapp.console.common.audit`).
AuditFn = Callable[..., Any]


@dataclass(frozen=True)
class Credentials:
    """The administrator: user name and werkzeug hash of the password in :attr:`path`."""

    username: str
    password_hash: str
    path: Path
    #: Stored in the session: a new password ends every session made with the old one. An HMAC of
    #: the password under the app's secret key, the same in every gunicorn worker (the salted hash
    #: differs per worker), and telling nothing about the password without the key.
    fingerprint: str

    def check(self, username: str, password: str) -> bool:
        """Constant work whatever is wrong: the hash is checked even for an unknown user name."""
        user_ok = hmac.compare_digest(username.encode(), self.username.encode())
        password_ok = check_password_hash(self.password_hash, password)
        return user_ok and password_ok

    @classmethod
    def load(cls, settings: Settings, secret_key: str) -> Credentials:
        """Read (or on first use generate) the password file and hash it. The user name is
        ``settings.admin_user`` (``TICKSTACK_ADMIN_USER``, checked by :mod:`db.config`)."""
        username = settings.admin_user
        path = settings.home / PASSWORD_FILE
        password, created = read_or_create_secret(path, lambda: secrets.token_urlsafe(18))
        if created:
            log.warning("console: generated the password of user %r into %s (mode 0600); log in with it",
                        username, path)
        elif path.stat().st_mode & 0o077:
            log.warning("console: %s is readable by other users (mode %o); chmod 600 it", path,
                        path.stat().st_mode & 0o777)
        fingerprint = hmac.new(secret_key.encode(), password.encode(), hashlib.sha256).hexdigest()[:32]
        return cls(username, generate_password_hash(password), path, fingerprint)


class LoginLimiter:
    """Failed logins per remote address and per user name in a sliding window, in a JSON file
    shared by every process under an exclusive ``flock``."""

    def __init__(self, path: Path, max_failures: int = MAX_FAILURES, window_s: float = WINDOW_S) -> None:
        self.path = path
        self.max_failures = max_failures
        self.window_s = window_s

    def _with_records(self, change: Callable[[list[list[Any]]], bool]) -> list[list[Any]]:
        """Read the records younger than the window under the lock; ``change`` may edit the list in
        place and returns whether to write it back."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                records = json.loads(f.read() or "[]")
                assert isinstance(records, list)
            except (ValueError, AssertionError):
                records = []  # a damaged file is started afresh rather than locking everyone out
            oldest = time.time() - self.window_s
            records = [r for r in records if isinstance(r, list) and len(r) == 3 and r[0] >= oldest]
            if change(records):
                f.seek(0)
                f.truncate()
                f.write(json.dumps(records[-MAX_RECORDS:]))
        return records

    def retry_after(self, addr: str, username: str) -> int:
        """Seconds until ``addr`` and ``username`` may try again; 0 when they may now."""
        records = self._with_records(lambda _records: False)
        wait = 0.0
        for index, key in ((1, addr), (2, username)):
            times = sorted(r[0] for r in records if r[index] == key)
            if len(times) >= self.max_failures:
                wait = max(wait, times[-self.max_failures] + self.window_s - time.time())
        return int(wait) + 1 if wait > 0 else 0

    def record_failure(self, addr: str, username: str) -> None:
        self._with_records(lambda records: records.append([time.time(), addr, username]) or True)

    def reset(self, addr: str, username: str) -> None:
        """Forget the failures of ``addr`` and ``username`` (after a successful login)."""
        def drop(records: list[list[Any]]) -> bool:
            records[:] = [r for r in records if r[1] != addr and r[2] != username]
            return True

        self._with_records(drop)


# --- wiring into the console blueprint ------------------------------------------------------------


def register(bp: Blueprint, audit: AuditFn) -> None:
    """Add the login and logout views and the session check to ``bp`` (before its other hooks);
    logins and logouts are recorded with ``audit``."""
    bp.record_once(functools.partial(_init_app, audit=audit))
    bp.before_request(require_login)
    bp.add_url_rule("/login", "login", login, methods=["GET", "POST"])
    bp.add_url_rule("/logout", "logout", logout, methods=["POST"])


def _init_app(state: BlueprintSetupState, audit: AuditFn) -> None:
    """At app creation, so the password file exists (and its path is logged) before anyone asks."""
    settings: Settings = state.app.config["TICKSTACK"]
    state.app.extensions[AUDIT_EXTENSION] = audit
    state.app.extensions["tickstack_auth"] = (
        Credentials.load(settings, state.app.config["SECRET_KEY"]), LoginLimiter(settings.run_dir / FAILURES_FILE))


def _auth() -> tuple[Credentials, LoginLimiter]:
    return current_app.extensions["tickstack_auth"]


def logged_in_user() -> str | None:
    """The session's user while the session is valid (see the module docstring), else None."""
    creds, _ = _auth()
    user = session.get("user")
    if user is None or user != creds.username or session.get("auth") != creds.fingerprint:
        return None
    if not 0 <= time.time() - float(session.get("at", 0)) < SESSION_MAX_AGE_S:
        return None
    return user


def require_login() -> ResponseReturnValue | None:
    """Before every console request: let it through with a valid session, else turn it away."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    if logged_in_user() is not None:
        return None
    if "user" in session:
        session.clear()  # expired, or the password changed
    if request.path.startswith("/console/api/"):
        return json_error(401, "login required")
    if request.method == "GET":
        return redirect(url_for("console.login", next=request.full_path.rstrip("?")))
    flash("Log in to continue; the action was not performed.", "error")
    return redirect(url_for("console.login"))


def safe_next(target: str | None) -> str | None:
    """``target`` when it is a path inside the console (no open redirect), else None."""
    if not target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/console/") or "\\" in target \
            or target.startswith("//"):
        return None
    return target


def _audit(action: str, target: str, result: str, detail: str, actor: str) -> None:
    current_app.extensions[AUDIT_EXTENSION](action, target, result, detail, actor=actor)


def login() -> ResponseReturnValue:
    """GET: the form. POST: check the rate limit, then the credentials; on success a fresh session."""
    next_url = safe_next(request.values.get("next"))
    if request.method == "GET":
        if logged_in_user() is not None:
            return redirect(next_url or url_for("console.watchers"))
        return render_template("console/login.html", next=next_url)
    creds, limiter = _auth()
    username = request.form.get("username", "")[:64]
    password = request.form.get("password", "")
    addr = request.remote_addr or "unknown"
    wait = limiter.retry_after(addr, username)
    if wait:
        message = f"Too many failed logins. Try again in {wait} s."
        body = render_template("console/login.html", next=next_url, error=message, username=username)
        return body, 429, {"Retry-After": str(wait)}
    if not creds.check(username, password):
        limiter.record_failure(addr, username)
        _audit("login", addr, "denied", f"wrong user name or password for {username!r}", "anonymous")
        return render_template("console/login.html", next=next_url, username=username,
                               error="Wrong user name or password."), 200
    limiter.reset(addr, username)
    session.clear()
    session.update(user=creds.username, auth=creds.fingerprint, at=int(time.time()))
    _audit("login", addr, "ok", "", creds.username)
    return redirect(next_url or url_for("console.watchers"))


def logout() -> ResponseReturnValue:
    """POST (with the CSRF token): end the session."""
    user = logged_in_user()
    session.clear()
    if user is not None:
        _audit("logout", request.remote_addr or "unknown", "ok", "", user)
    flash("Logged out.", "ok")
    return redirect(url_for("console.login"))
