"""The write token: where it comes from, and the bearer check of every write."""
from __future__ import annotations

import functools
import hmac
import logging
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

from flask import request
from flask.typing import ResponseReturnValue

from db.circusd import circusctl_command
from db.config import TOKEN_FILE, Settings
from webapp.api.errors import ApiError
from webapp.api.state import api_state
from webapp.secret_files import read_secret_file, unusable

log = logging.getLogger("tickstack.api")

TOKEN_ENV = "TICKSTACK_API_TOKEN"

F = TypeVar("F", bound=Callable[..., ResponseReturnValue])

# Token sources already logged by this process: each is logged once.
_announced: set[str] = set()


def load_token(settings: Settings) -> tuple[str, str | None]:
    """The write token and None: ``TICKSTACK_API_TOKEN`` if set and not
    blank, else the one stored in ``$TICKSTACK_HOME/api-token`` (generated on
    first use, mode 0600). Logs where it comes from once per process, never
    the token. When the file is unusable (empty, a folder, a FIFO, not text,
    unreadable): ("", what is wrong with it and how to fix it), logged as an
    error; the API starts all the same, serves reads and refuses every write
    with that message (:func:`requires_token`), and the file is left as it is."""
    from_env = settings.api_token
    if from_env:
        if TOKEN_ENV not in _announced:
            _announced.add(TOKEN_ENV)
            log.info("API write token: from %s", TOKEN_ENV)
            if len(from_env) < 16:
                log.warning("%s is shorter than 16 characters; use a long random token", TOKEN_ENV)
        return from_env, None
    path = settings.home / TOKEN_FILE
    token = read_secret_file(path, lambda: secrets.token_urlsafe(32))
    if token.wrong is not None:
        problem = unusable("API's token file", path, token.wrong, "every write is refused",
                           f"Write a token into it (one line), or delete it to have a new one generated (clients then "
                           f"need the new one), or set {TOKEN_ENV}",
                           circusctl_command(settings.circus_endpoint, "restart", "api"))
        log.error("API write token: %s", problem)
        return "", problem
    if token.created or str(path) not in _announced:
        _announced.add(str(path))
        log.info("API write token: %s %s (send it as 'Authorization: Bearer <token>')",
                 "generated in" if token.created else "read from", path)
    return token.value, None


def requires_token(view: F) -> F:
    """401 without a well-formed ``Authorization: Bearer <token>``; then 503 ``token_file_unusable``
    while the token file is unusable (:func:`load_token`; its words name the file: never to a client
    that sent no token); 403 when the token is wrong. Checked before the body is read."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> ResponseReturnValue:
        header = request.headers.get("Authorization", "")
        challenge = {"WWW-Authenticate": 'Bearer realm="tickstack"'}
        if not header:
            raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>' "
                           f"(the token is in the {TOKEN_FILE} file in TICKSTACK_HOME, or {TOKEN_ENV})", challenge)
        scheme, _, credentials = header.partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer" and not credentials:
            raise ApiError(401, "unauthorized", f"no token after 'Bearer': send the token that is in the {TOKEN_FILE} "
                           f"file in TICKSTACK_HOME (or {TOKEN_ENV}); `$(cat {TOKEN_FILE})` of an empty file gives "
                           "none", challenge)
        if scheme.lower() != "bearer" or not credentials or " " in credentials:
            raise ApiError(401, "unauthorized", "malformed Authorization header: expected 'Bearer <token>'",
                           challenge)
        problem = api_state().token_problem
        if problem is not None:  # no token to compare with: the server's fault; told (with the file's path)
            raise ApiError(503, "token_file_unusable", problem)  # only to a client that sent one
        if not hmac.compare_digest(credentials.encode(), api_state().token):
            raise ApiError(403, "forbidden", f"invalid token: not the one in the {TOKEN_FILE} file in TICKSTACK_HOME "
                           f"(or {TOKEN_ENV}) the API started with")
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
