"""The REST API blueprint: JSON in, JSON out, under ``/api`` (and ``/metrics``).

Contracts shared by every route (the OpenAPI document, ``GET
/api/openapi.json``, spells each one out):

* **Errors** all have one shape, ``{"error": {"code": "<snake_case>",
  "message": "<reason>"}}``, including Flask's own 404/405/413 and unhandled
  500s, for paths under ``/api`` and ``/metrics``, and for every path of the
  API-only app (``/`` on the API's port included); only the console's paths
  keep Flask's default HTML errors. Codes: 400 ``invalid_parameter`` (query),
  ``invalid_json`` (body not JSON, ``NaN``/``Infinity`` included),
  ``invalid_body`` (the writer's validation message, naming the field),
  ``bad_request`` (a body the server cannot decode: a malformed chunk);
  401 ``unauthorized``; 403 ``forbidden``; 404 ``not_found``;
  405 ``method_not_allowed``; 409 ``conflict``; 413 ``payload_too_large``
  (with a Content-Length or chunked alike);
  415 ``unsupported_media_type``; 500 ``internal_error`` / ``write_failed``;
  503 ``writer_unavailable`` / ``database_unavailable`` with ``Retry-After``,
  ``token_file_unusable`` (a write while the token file is unusable),
  ``read_refused`` (PostgreSQL: the readers' role may not read a table; what to grant),
  ``database_locked`` with ``Retry-After`` (PostgreSQL: a table locked by another session).
* **Writes** (POST) need ``Authorization: Bearer <token>``. The token is
  ``TICKSTACK_API_TOKEN`` (``settings.api_token``) when set, else the content
  of ``$TICKSTACK_HOME/api-token`` (mode 0600, generated when the API app is
  first created; while it is unusable, every write is 503, saying why:
  :func:`~webapp.api.tokens.load_token`). Missing or malformed header: 401;
  wrong token: 403 (compared in constant time). Writes go only through the writer
  (:mod:`db.client`), with a deadline of :data:`~webapp.api.limits.WRITER_DEADLINE`
  seconds: when it passes, 503 and the write may or may not have been applied
  (ticks that carry ``source`` and ``seq`` can be resent safely; the writer
  drops duplicates). Bodies are validated here with the writer's own
  validators (:func:`db.ops.prepare`), so a bad body costs no writer round
  trip and gets exactly the writer's message; the writer validates again.
* **Reads** go through Flask-SQLAlchemy on the read-only engine and the
  shared queries of :mod:`db.queries`. Lists are pages of ``limit`` rows
  (1..5000, default 500), as exchange APIs page: a series (ticks, bars,
  indicators) gives the oldest rows from ``since``, else the newest up to
  ``until`` (inclusive, epoch ms UTC), always oldest first; every list says
  whether ``more`` rows exist and the query parameters of the ``next`` page
  (:func:`db.queries._series_page`). Unknown query parameters are rejected
  on every route (health, the OpenAPI document and ``/metrics`` included),
  so typos do not pass silently; an empty value counts as absent.

The package, along its seams: :mod:`~webapp.api.state` (the blueprint and
per-app state), :mod:`~webapp.api.errors`, :mod:`~webapp.api.params` (query
parameters and bodies), :mod:`~webapp.api.tokens` (the write token),
:mod:`~webapp.api.routes` (status and market data), :mod:`~webapp.api.trades`
and :mod:`~webapp.api.openapi`; this module wires them into an app.
"""
from __future__ import annotations

import logging

from flask.blueprints import BlueprintSetupState

from db.config import Settings
from webapp.api import errors, routes, trades  # noqa: F401 - their handlers and routes register on bp
from webapp.api.limits import WRITER_DEADLINE
from webapp.api.state import EXTENSION, ApiState, bp, metrics_bp
from webapp.api.tokens import load_token
from webapp.metrics import init_metrics

__all__ = ["bp"]

log = logging.getLogger("tickstack.api")


@bp.record_once
def _setup(setup: BlueprintSetupState) -> None:
    app = setup.app
    settings: Settings = app.config["TICKSTACK"]
    token, token_problem = load_token(settings)
    api = ApiState(settings, token, min(settings.client_deadline, WRITER_DEADLINE), token_problem)
    app.extensions[EXTENSION] = api
    init_metrics(app, api.probe)
    app.register_blueprint(metrics_bp)
