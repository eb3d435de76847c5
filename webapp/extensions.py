"""Flask extensions, created once and bound to each app in ``create_app``."""
from __future__ import annotations

from flask_sqlalchemy import SQLAlchemy
from flask_wtf import CSRFProtect

from db.models import metadata

#: Read-only: ``create_app`` points it at a ``mode=ro`` URL and makes every
#: connection ``query_only``. Writes go through the writer.
db = SQLAlchemy(metadata=metadata)
csrf = CSRFProtect()
