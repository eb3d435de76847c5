"""Logs: the last lines of each watcher's log files in ``$TICKSTACK_HOME/log``, and follow.

A file is chosen by name from the listing of that folder, and only a name in that listing is
accepted (regular files named ``*.log``, no symlinks): a name is never joined into a path before it
is found there, so ``../`` or an absolute path cannot reach anything else. Follow polls
``/console/api/log`` with the byte offset it has read to.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from flask import jsonify, render_template, request
from flask.typing import ResponseReturnValue

from webapp.console.common import bad_request, bp, int_arg, settings

LOG_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.log")
MAX_LINES = 5000
DEFAULT_LINES = 200
#: Bytes read at most: for a tail (very long lines), and per follow poll.
MAX_TAIL_BYTES = 8 * 1024 * 1024
MAX_FOLLOW_BYTES = 256 * 1024
BLOCK = 64 * 1024


def list_logs() -> list[dict[str, Any]]:
    """The ``*.log`` regular files (not symlinks) in the log folder: name, size, mtime, sorted by name."""
    out = []
    try:
        with os.scandir(settings().log_dir) as entries:
            for entry in entries:
                if LOG_NAME_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    out.append({"name": entry.name, "bytes": st.st_size, "mtime_ms": int(st.st_mtime * 1000)})
    except FileNotFoundError:
        return []
    return sorted(out, key=lambda f: f["name"])


def resolve(name: str | None) -> Path:
    """The path of log file ``name`` if it is in :func:`list_logs`; else 400 naming the choices."""
    names = [f["name"] for f in list_logs()]
    if not name or name not in names:
        bad_request(f"no log file named {(name or '')[:80]!r}; choose one of: {', '.join(names) or 'none yet'}")
    return settings().log_dir / name


def tail(path: Path, n: int) -> tuple[list[str], int]:
    """The last ``n`` lines of ``path`` and the byte offset they end at (the size when read)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos, data = end, b""
        while pos > 0 and data.count(b"\n") <= n and end - pos < MAX_TAIL_BYTES:
            step = min(BLOCK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines()
    if pos > 0 and lines:
        lines = lines[1:]  # the first one is cut
    return lines[-n:], end


def read_from(path: Path, offset: int) -> dict[str, Any]:
    """What was appended since ``offset``, complete lines only, at most :data:`MAX_FOLLOW_BYTES`.
    A file now shorter than ``offset`` was rotated or truncated: ``reset`` and its last lines."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if offset > size:
            lines, end = tail(path, DEFAULT_LINES)
            return {"reset": True, "lines": lines, "offset": end, "size": end}
        f.seek(offset)
        data = f.read(min(size - offset, MAX_FOLLOW_BYTES))
    cut = data.rfind(b"\n") + 1
    if cut == 0 and len(data) == MAX_FOLLOW_BYTES:
        cut = len(data)  # one enormous line: pass it on in pieces
    return {"reset": False, "lines": data[:cut].decode("utf-8", errors="replace").splitlines(),
            "offset": offset + cut, "size": size}


@bp.get("/logs")
def logs() -> ResponseReturnValue:
    files = list_logs()
    name = request.args.get("file")
    if name is None and files:
        name = next((f["name"] for f in files if f["name"] == "writer.log"), files[0]["name"])
    n = int_arg(request.args.get("n"), "n", 1, MAX_LINES, DEFAULT_LINES)
    lines: list[str] = []
    offset = 0
    if name is not None:
        lines, offset = tail(resolve(name), n)
    return render_template("console/logs.html", files=files, current=name, n=n, lines=lines, offset=offset,
                           max_lines=MAX_LINES)


@bp.get("/api/log")
def api_log() -> ResponseReturnValue:
    """``?file=NAME&offset=BYTES``: the lines appended since ``offset`` (see :func:`read_from`)."""
    path = resolve(request.args.get("file"))
    offset = int_arg(request.args.get("offset"), "offset", 0, 2**62, 0)
    return jsonify(read_from(path, offset))
