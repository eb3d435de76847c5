"""The REST API blueprint (JSON everywhere)."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue

from db.client import thread_client
from db.errors import WriterError

bp = Blueprint("api", __name__, url_prefix="/api")


@bp.get("/health")
def health() -> ResponseReturnValue:
    """200 when the writer answers, 503 otherwise."""
    try:
        ping = thread_client().ping(timeout=1.0)
    except WriterError as e:
        return jsonify({"status": "unavailable", "writer": {"up": False, "error": str(e)}}), 503
    return jsonify({"status": "ok", "writer": {"up": True, **ping},
                    "database": current_app.config["TICKSTACK"].database_url})
