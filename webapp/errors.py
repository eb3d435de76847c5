"""The one JSON error response of the web apps, for the REST API and the console's JSON endpoints.

Two bodies, one function, so a change of how errors are sent (headers, content type) is made once:

* the API's documented contract, ``{"error": {"code": "<snake_case>", "message": "<reason>"}}``:
  clients branch on the code (see :mod:`webapp.api.errors`);
* the console's endpoints under ``/console/api/``, ``{"error": "<reason>"}``: read by the console's
  own scripts, which only show the reason.
"""
from __future__ import annotations

from collections.abc import Mapping

from flask import Response, jsonify, request


def json_error(status: int, message: str, code: str | None = None,
               headers: Mapping[str, str] | None = None) -> Response:
    """A JSON error with ``status`` and ``headers``: ``{"error": {"code", "message"}}`` with a
    ``code`` (the API), else ``{"error": message}`` (the console)."""
    response = jsonify({"error": {"code": code, "message": message} if code is not None else message})
    response.status_code = status
    response.headers.update(dict(headers or {}))
    return response


def wrong_host_message() -> str:
    """Why a request whose ``Host`` names another server is refused (``TRUSTED_HOSTS``), and where the
    app answers instead."""
    port = request.server[1] if request.server else ""
    return (f"this server answers as 127.0.0.1 or localhost only, not as {request.headers.get('Host', '')!r}: "
            f"open http://127.0.0.1:{port}/ (another name that leads here would let any web page read it)")
