"""Console login: one administrator, a generated password, throttled failures, sessions that end.

* **No default password.** On its first start the console generates a random password into
  ``$TICKSTACK_HOME/admin-password`` (mode 0600, :func:`db.config.read_or_create_secret`, safe when
  both gunicorn workers race) and logs that path, never the password. The user name is ``admin``,
  or ``TICKSTACK_ADMIN_USER``. The console keeps a werkzeug hash of the password, made at start (the
  settings of a process hold it in plain text only when it comes from ``TICKSTACK_ADMIN_PASSWORD``,
  as every process's environment does): to change the password, write a new one into the file (or
  the variable) and restart the console. Several
  hosts on one database set the same ``TICKSTACK_ADMIN_PASSWORD`` (and ``TICKSTACK_SECRET_KEY``)
  instead, so any host's console accepts it; no file is written then. Sessions stay per host (each
  host's session file): log in on each.
* **One rule for the password, wherever it comes from**: at least
  :data:`db.config.ADMIN_PASSWORD_MIN` characters, leading and trailing blanks aside, in the file
  as in the variable (whose parser refuses a shorter one at start). A file that is empty, blank,
  shorter or unreadable does not stop the console (gunicorn's workers failing to boot made circus
  respawn it until its flapping plugin gave up, the reason in a traceback): the console starts,
  each worker logs one line saying what is wrong with which file and how to fix it (never the
  password), the login page shows it, and every login is refused (:attr:`Credentials.problem`),
  through the throttle as any failed one, until the file is fixed and the console restarted. A file
  other users may read is used, with a warning.
* **No secret key, no console.** Sessions and forms are signed with ``TICKSTACK_SECRET_KEY``, else
  the key in ``$TICKSTACK_HOME/secret-key`` (generated on first use, mode 0600; the API signs
  nothing and never reads it). While that file is unusable (empty, a folder, a FIFO, not text:
  :mod:`webapp.secret_files`) the console starts all the same, logs one line per worker saying
  what is wrong and how to fix it, and answers every request but ``/console/health`` 503 with that
  (:func:`require_secret_key`); the file is never written over.
* **Sessions end for real.** A login makes a random session id, kept server-side in
  ``$TICKSTACK_HOME/run/console-sessions.json`` (:class:`~webapp.auth_state.SessionStore`, shared by
  both workers) and in Flask's signed cookie (HttpOnly, SameSite=Lax) with the user, the login time
  and a fingerprint of the password (:attr:`Credentials.fingerprint`). A request is logged in only
  while its id is in that file: logout removes it, so a copy of the cookie taken before is refused
  afterwards (and an action sent with it is not performed). A session also ends after
  :data:`SESSION_MAX_AGE_S`, or when the password changes (and the console restarts). Every console
  page but the login page and ``/console/health`` needs one: a page asked for without one redirects
  to the login page (302), a POST action too (and is not performed), a ``/console/api/`` endpoint
  answers 401.
* **Failed logins are throttled, and nobody can lock the administrator out.** The console listens
  on 127.0.0.1 only, so every client's address is 127.0.0.1: counting failures per address or per
  user name (as this module did) let anyone on the machine lock the administrator out with five
  wrong passwords, again and again. Failures are counted instead per *local user* who opened the
  connection, which the kernel knows (:func:`~webapp.auth_state.peer_key`: the uid that owns the
  client socket in ``/proc/net/tcp``; a peer it does not show, e.g. a reverse proxy, is counted by
  address). Another user's failures therefore never delay the administrator's login; a user who
  can read ``admin-password`` needs no guessing. Within one peer, each failure after the first
  :attr:`~webapp.auth_state.Schedule.free` five makes the next check wait longer (10 s, 20 s, 40 s,
  then :attr:`~webapp.auth_state.Schedule.cap_s`, 60 s): an attempt before then is answered 429
  with ``Retry-After`` *without checking the password* (checking it, and accepting it when right,
  would give a guesser an unthrottled oracle), and nothing is counted for it. So a wrong-password
  spree costs its own peer at most a minute's wait, never the 5-minute lockout, and a right
  password is accepted as soon as that wait is over. The count is shared by both gunicorn workers
  in ``$TICKSTACK_HOME/run/console-login-throttle.json`` under ``flock``, and cannot race: an
  attempt is counted as a failure under the lock *before* its password is checked (and forgotten
  if the password was right), so 20 parallel attempts get the free five checks, not six.
* **Audit**: logins (ok and denied, with the peer) and logouts are recorded with the audit function
  the console passes to :func:`register` (this module does not import the console, which imports
  it). Throttled attempts are not (an attacker could flood the audit log with them); they are
  logged.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import logging
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
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue
from werkzeug.security import check_password_hash, generate_password_hash

from db.circusd import circusctl_command
from db.config import ADMIN_PASSWORD_MIN, PASSWORD_FILE, SECRET_KEY_FILE, ConfigError, Settings, admin_password
from db.private_files import open_mode
from webapp.auth_state import LoginThrottle, SessionStore, peer_key, retry_after
from webapp.errors import json_error
from webapp.secret_files import read_secret_file, unusable

log = logging.getLogger("tickstack.console")

#: Served even while the secret key is unusable: the console itself is up.
HEALTH_ENDPOINT = "console.health"
#: In ``$TICKSTACK_HOME/run``: failed logins per peer, and the live sessions (module docstring).
THROTTLE_FILE = "console-login-throttle.json"
SESSIONS_FILE = "console-sessions.json"
SESSION_MAX_AGE_S = 12 * 3600
#: Endpoints served without a session.
PUBLIC_ENDPOINTS = frozenset({"console.login", HEALTH_ENDPOINT})
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
    #: Why no login is accepted, in the words the log and the login page show (what is wrong with
    #: which file, and how to fix it); None when the password is good.
    problem: str | None = None

    def check(self, username: str, password: str) -> bool:
        """Constant work whatever is wrong: the hash is checked even for an unknown user name.
        Always False while there is a :attr:`problem`."""
        if self.problem is not None:
            return False
        user_ok = hmac.compare_digest(username.encode(), self.username.encode())
        password_ok = check_password_hash(self.password_hash, password)
        return user_ok and password_ok

    @classmethod
    def load(cls, settings: Settings, secret_key: str) -> Credentials:
        """Read (or on first use generate) the password file and hash it. The user name is
        ``settings.admin_user`` (``TICKSTACK_ADMIN_USER``, checked by :mod:`db.config`). A file
        that breaks the password rule gives credentials that refuse every login (:attr:`problem`,
        logged here), never an exception: the console still starts."""
        username = settings.admin_user
        path = settings.home / PASSWORD_FILE
        if settings.admin_password:  # TICKSTACK_ADMIN_PASSWORD: the same on every host, no file
            password = settings.admin_password  # its parser checked ADMIN_PASSWORD_MIN
        else:
            restart = circusctl_command(settings.circus_endpoint, "restart", "console")
            password, problem = _read_password_file(path, username, restart)
            if problem is not None:
                log.error("console: %s", problem)
                return cls(username, "", path, "", problem)
        fingerprint = hmac.new(secret_key.encode(), password.encode(), hashlib.sha256).hexdigest()[:32]
        return cls(username, generate_password_hash(password), path, fingerprint)


def _read_password_file(path: Path, username: str, restart: str) -> tuple[str, str | None]:
    """(the password in ``path``, generated on first use; None), or ("", what is wrong with the
    file and how to fix it, ``restart`` being the command that restarts the console) when it breaks
    the rule of ``TICKSTACK_ADMIN_PASSWORD``."""
    secret = read_secret_file(path, lambda: secrets.token_urlsafe(18))
    password, wrong = secret.value, secret.wrong
    if wrong is None:
        try:
            admin_password(str(path), password)
        except ConfigError:
            wrong = "is too short"  # not its length: the login page, which needs no login, says it
        else:
            if secret.created:
                log.warning("console: generated the password of user %r into %s (mode 0600); log in with it",
                            username, path)
            else:
                _warn_if_shared(path)
            return password, None
    return "", unusable("password file", path, wrong, "every login is refused",
                        f"Write a password of at least {ADMIN_PASSWORD_MIN} characters into it, or delete it to "
                        "have a new one generated", restart)


def _warn_if_shared(path: Path) -> None:
    """A warning when other users may read the password file (it is used all the same)."""
    mode = open_mode(path)
    if mode is not None:
        log.warning("console: %s is open to other users (mode %o); chmod 600 it", path, mode)


# --- wiring into the console blueprint ------------------------------------------------------------


def register(bp: Blueprint, audit: AuditFn) -> None:
    """Add the login and logout views and the session check to ``bp`` (before its other hooks);
    logins and logouts are recorded with ``audit``."""
    bp.record_once(functools.partial(_init_app, audit=audit))
    bp.before_request(require_secret_key)
    bp.before_request(require_login)
    bp.add_url_rule("/login", "login", login, methods=["GET", "POST"])
    bp.add_url_rule("/logout", "logout", logout, methods=["POST"])


def _init_app(state: BlueprintSetupState, audit: AuditFn) -> None:
    """At app creation, so the secret key and password files exist (and their paths are logged)
    before anyone asks. The app's secret key is set here: only the console signs anything."""
    settings: Settings = state.app.config["TICKSTACK"]
    state.app.extensions[AUDIT_EXTENSION] = audit
    key, key_problem = _secret_key(settings)
    if key_problem is None:
        state.app.secret_key = key
        credentials = Credentials.load(settings, key)
    else:  # no session can be signed: no login either (the password file is read once the key is fixed)
        log.error("console: %s", key_problem)
        credentials = Credentials(settings.admin_user, "", settings.home / PASSWORD_FILE, "", key_problem)
        # Every console request is refused before it is served (require_secret_key), so there is no form
        # to protect, and Flask-WTF's check, which runs first, would fail for want of a key (a 500).
        state.app.config["WTF_CSRF_CHECK_DEFAULT"] = False
    state.app.extensions["tickstack_auth"] = Auth(
        credentials, LoginThrottle(settings.run_dir / THROTTLE_FILE),
        SessionStore(settings.run_dir / SESSIONS_FILE, SESSION_MAX_AGE_S), key_problem)


def _secret_key(settings: Settings) -> tuple[str, str | None]:
    """(the console's secret key, None): ``TICKSTACK_SECRET_KEY``, else the secret-key file (generated on first
    use, mode 0600); ("", what is wrong with the file and how to fix it) when the file is unusable."""
    if settings.secret_key:
        return settings.secret_key, None
    key = read_secret_file(settings.home / SECRET_KEY_FILE, lambda: secrets.token_hex(32))
    if key.wrong is None:
        return key.value, None
    return "", unusable("secret key file", key.path, key.wrong,
                        "every console page is refused (no session or form can be signed without it)",
                        "Write a key of at least 32 characters into it (or set TICKSTACK_SECRET_KEY), or delete it to "
                        "have a new one generated (sessions made with the old one end)",
                        circusctl_command(settings.circus_endpoint, "restart", "console"))


@dataclass(frozen=True)
class Auth:
    """What the console's login keeps per app."""

    credentials: Credentials
    throttle: LoginThrottle
    sessions: SessionStore
    #: Why the console has no secret key (its file is unusable: :func:`_secret_key`); None when it has one.
    key_problem: str | None = None


def _auth() -> Auth:
    return current_app.extensions["tickstack_auth"]


def logged_in_user() -> str | None:
    """The session's user while the session is valid (see the module docstring), else None. Asked
    once per request (the file of live sessions is read then)."""
    if "tickstack_user" not in g:
        g.tickstack_user = _session_user()
    return g.tickstack_user


def _session_user() -> str | None:
    auth = _auth()
    user = session.get("user")
    if auth.credentials.problem is not None:  # no password: no session is valid
        return None
    if user is None or user != auth.credentials.username or session.get("auth") != auth.credentials.fingerprint:
        return None
    if not 0 <= time.time() - float(session.get("at", 0)) < SESSION_MAX_AGE_S:
        return None
    return user if auth.sessions.user_of(session.get("sid")) == user else None


def require_secret_key() -> ResponseReturnValue | None:
    """Before every console request: while the secret key is unusable, refuse it (503) saying which file is
    wrong and how to fix it, on a page or, under ``/console/api/``, in JSON; ``/console/health`` still answers."""
    problem = _auth().key_problem
    if problem is None or request.endpoint == HEALTH_ENDPOINT:
        return None
    if request.path.startswith("/console/api/"):
        return json_error(503, problem)
    return render_template("console/error.html", status=503, title="Secret key unusable", message=problem), 503


def require_login() -> ResponseReturnValue | None:
    """Before every console request: let it through with a valid session, else turn it away."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    if logged_in_user() is not None:
        return None
    if "user" in session:
        session.clear()  # expired, logged out elsewhere, or the password changed
    if request.path.startswith("/console/api/"):
        return json_error(401, "login required")
    if request.method == "GET":
        return redirect(url_for("console.login", next=request.full_path.rstrip("?")))
    flash("Log in to continue; the action was not performed.", "error")
    return redirect(url_for("console.login"))


def safe_next(target: str | None) -> str | None:
    """``target`` when it is a path inside the console (no open redirect), else None. No control
    character either: a CR or LF in a redirect's Location is refused by Werkzeug, a 500 with a
    login already made (a security review, round 41)."""
    if not target or any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/console/") or "\\" in target \
            or target.startswith("//"):
        return None
    return target


def _audit(action: str, target: str, result: str, detail: str, actor: str) -> None:
    current_app.extensions[AUDIT_EXTENSION](action, target, result, detail, actor=actor)


def _login_page(next_url: str | None, **context: Any) -> str:
    """The login form; with the password file's problem, if any, above it."""
    return render_template("console/login.html", next=next_url, problem=_auth().credentials.problem, **context)


def login() -> ResponseReturnValue:
    """GET: the form. POST: ask the throttle, then check the credentials; on success a fresh session.
    While the password file is unusable every attempt the throttle admits is refused (503) and
    stays counted as a failure, so guessing is throttled as ever."""
    next_url = safe_next(request.values.get("next"))
    if request.method == "GET":
        if logged_in_user() is not None:
            return redirect(next_url or url_for("console.watchers"))
        return _login_page(next_url)
    auth = _auth()
    username = request.form.get("username", "")[:64]
    password = request.form.get("password", "")
    addr = request.remote_addr or "unknown"
    peer = peer_key(request.environ)
    try:
        wait = auth.throttle.admit(peer)
    except OSError as e:
        return _unrecorded(next_url, username, e)
    if wait:
        seconds = retry_after(wait)
        log.warning("console: login of %r from %s refused unchecked: %d s to wait after failed logins", username,
                    peer, seconds)
        message = f"Too many failed logins. Try again in {seconds} s."
        body = _login_page(next_url, error=message, username=username)
        return body, 429, {"Retry-After": str(seconds)}
    if auth.credentials.problem is not None:
        _audit("login", addr, "denied", f"{auth.credentials.path} is unusable: no login accepted ({peer})",
               "anonymous")
        return _login_page(next_url, username=username), 503
    if not auth.credentials.check(username, password):
        _audit("login", addr, "denied", f"wrong user name or password for {username!r} ({peer})", "anonymous")
        return _login_page(next_url, username=username, error="Wrong user name or password."), 200
    try:
        sid = auth.sessions.create(auth.credentials.username)
    except OSError as e:
        return _unrecorded(next_url, username, e)
    auth.throttle.succeeded(peer)  # shrinks its file: takes no space
    session.clear()
    session.update(user=auth.credentials.username, auth=auth.credentials.fingerprint, at=int(time.time()),
                   sid=sid)
    g.pop("tickstack_user", None)
    _audit("login", addr, "ok", peer, auth.credentials.username)
    return redirect(next_url or url_for("console.watchers"))


def _unrecorded(next_url: str | None, username: str, e: OSError) -> ResponseReturnValue:
    """A login the console cannot record (its throttle's or its sessions' file cannot be written: a full
    disk): refused with the reason, 507, and nothing of either file lost. It was a 500 (fault hunt)."""
    log.warning("console: a login could not be recorded (%s: %s)", type(e).__name__, e.strerror or e)
    message = (f"The console cannot record a login: {e.strerror or e} in TICKSTACK_HOME. Free space there "
               "(python -m db health says how much is left); sessions already open go on.")
    return _login_page(next_url, username=username, error=message), 507


def logout() -> ResponseReturnValue:
    """POST (with the CSRF token): end the session, here and in the server's list (a copy of the
    cookie is refused from now on)."""
    user = logged_in_user()
    _auth().sessions.revoke(session.get("sid"))
    session.clear()
    g.pop("tickstack_user", None)
    if user is not None:
        _audit("logout", request.remote_addr or "unknown", "ok", "", user)
    flash("Logged out.", "ok")
    return redirect(url_for("console.login"))
