"""The API's blueprint and what it keeps per app: settings, the write token,
the probe of the stack, and one writer client per thread."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app

from db import ops
from db.client import WriterClient, thread_client
from db.config import Settings
from webapp.metrics import Probe

bp = Blueprint("api", __name__, url_prefix="/api")
#: ``GET /metrics``, the API's route outside ``/api`` (:func:`webapp.api.routes.metrics`).
metrics_bp = Blueprint("metrics", __name__)

#: Key of the :class:`ApiState` in ``app.extensions``.
EXTENSION = "tickstack_api"


class ApiState:
    """What the API keeps per app: settings, the write token, the probe, and
    one writer client per thread (a client is not thread-safe)."""

    def __init__(self, settings: Settings, token: str, deadline: float, token_problem: str | None = None) -> None:
        self.settings = settings
        self.token = token.encode()
        #: Why no write can be checked (the token file is unusable: :func:`webapp.api.tokens.load_token`).
        self.token_problem = token_problem
        self.deadline = deadline
        self.probe = Probe(settings, self.client)

    def client(self) -> WriterClient:
        """This thread's writer client for this app (made on first use)."""
        return thread_client(self.settings, self.deadline)


def api_state() -> ApiState:
    """The current app's :class:`ApiState` (made when the blueprint is registered)."""
    return current_app.extensions[EXTENSION]


def write(op: str, args: dict[str, Any]) -> Any:
    """Validate ``args`` for ``op`` here (the writer's validators, so its
    messages) and run it through the writer; returns the committed result."""
    _, clean = ops.prepare(op, args)
    return api_state().client().call(op, **clean)
