"""Audit log: every console action (who, when, what, on what, how it went), newest first."""
from __future__ import annotations

from flask import render_template, request
from flask.typing import ResponseReturnValue
from sqlalchemy import func, select

from db.models import audit_log_table
from webapp.console.common import bp, int_arg, send_spool_if_writer_answers
from webapp.extensions import db

PER_PAGE = 50


@bp.get("/audit")
def audit_log() -> ResponseReturnValue:
    send_spool_if_writer_answers()  # what was recorded while the writer was away, before it is read
    total = db.session.execute(select(func.count()).select_from(audit_log_table)).scalar() or 0
    pages = max(1, -(-total // PER_PAGE))
    page = int_arg(request.args.get("page"), "page", 1, pages, 1)
    entries = db.session.execute(select(audit_log_table).order_by(audit_log_table.c.id.desc())
                                 .limit(PER_PAGE).offset((page - 1) * PER_PAGE)).all()
    return render_template("console/audit.html", entries=entries, page=page, pages=pages, total=total)
