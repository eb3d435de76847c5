"""The admin console blueprint (server-rendered)."""
from __future__ import annotations

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue

bp = Blueprint("console", __name__, url_prefix="/console")


@bp.get("/health")
def health() -> ResponseReturnValue:
    """The console itself is up (it stays up when the writer is not)."""
    return jsonify({"status": "ok"})
