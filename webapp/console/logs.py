"""Logs: each log file of ``$TICKSTACK_HOME/log`` (rotated ones too), a search, a level filter, the
download of a whole file, and the merged tail of every watcher (``pm2 logs``), with follow.

What is read, and how it is bounded, is in :mod:`webapp.console.logfiles`; a file is chosen by name
from the folder's listing only. Follow polls ``/console/api/log`` with the byte offset it has read to
(``/console/api/logs/all`` with one offset per file for the merged view), with the same filters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Response, jsonify, render_template, request
from flask.typing import ResponseReturnValue

from webapp.console import logfiles
from webapp.console.common import bad_request, bp, int_arg, settings

MAX_LINES = 5000
DEFAULT_LINES = 200
MAX_QUERY = 200
#: The level filter: a line at this level or above is shown.
LEVEL_CHOICES = {"": "All levels", "debug": "Debug and above", "info": "Info and above",
                 "warning": "Warnings and errors", "error": "Errors only"}
#: The merged view's file parameter.
ALL = "all"


def list_logs() -> list[dict[str, Any]]:
    """The log files (:func:`webapp.console.logfiles.list_logs`) of the app's stack."""
    return logfiles.list_logs(settings().log_dir)


def resolve(name: str | None, files: list[dict[str, Any]] | None = None) -> Path:
    """The path of log file ``name`` if it is in :func:`list_logs`; else 400 naming the choices."""
    names = [f["name"] for f in (files if files is not None else list_logs())]
    if not name or name not in names:
        shown = ", ".join(n for n in names if not n[-1].isdigit()) or "none yet"
        bad_request(f"no log file named {(name or '')[:80]!r}; choose one of: {shown} (or a rotated one, "
                    "such as writer.log.1)")
    return settings().log_dir / name


def filters() -> tuple[str | None, str | None]:
    """The ``level`` and ``q`` arguments, checked: (level or None, query or None)."""
    level = request.args.get("level", "")
    if level not in LEVEL_CHOICES:
        bad_request(f"level: {level[:40]!r} is not a level; use one of {', '.join(k for k in LEVEL_CHOICES if k)} "
                    "(or leave it empty for all)")
    query = request.args.get("q", "")
    if len(query) > MAX_QUERY:
        bad_request(f"q: the search text is {len(query)} characters long; at most {MAX_QUERY}")
    if any(ord(ch) < 32 for ch in query):
        bad_request("q: the search text cannot hold control characters (a line is searched, one at a time)")
    return level or None, query or None


def _lines_arg() -> int:
    return int_arg(request.args.get("n"), "n", 1, MAX_LINES, DEFAULT_LINES)


def _render(**ctx: Any) -> str:
    files = ctx["files"]
    return render_template("console/logs.html", groups=logfiles.grouped(files), level_choices=LEVEL_CHOICES,
                           max_lines=MAX_LINES, highlight=logfiles.highlight, all_view=ALL,
                           has_main_logs=bool(logfiles.main_logs(files)), **ctx)


@bp.get("/logs")
def logs() -> ResponseReturnValue:
    files = list_logs()
    name = request.args.get("file")
    if name is None and files:
        name = next((f["name"] for f in files if f["name"] == "writer.log"), files[0]["name"])
    n = _lines_arg()
    level, query = filters()
    if name == ALL:
        return merged_page(files, n, level, query)
    lines: list[logfiles.Line] = []
    offset = 0
    found = None
    if name is not None:
        path = resolve(name, files)
        if level is None and query is None:
            lines, offset = logfiles.tail(path, n)
        else:
            found = logfiles.scan(path, n, level, query)
            lines, offset = found.lines, found.size
    return _render(files=files, current=name, n=n, level=level or "", q=query or "", lines=lines, offset=offset,
                   found=found, merged=False)


def merged_page(files: list[dict[str, Any]], n: int, level: str | None, query: str | None) -> str:
    lines, cursor = logfiles.merged(settings().log_dir, files, n, level, query)
    return _render(files=files, current=ALL, n=n, level=level or "", q=query or "", lines=lines, offset=0,
                   found=None, merged=True, cursor=format_cursor(cursor))


@bp.get("/logs/download")
def download() -> ResponseReturnValue:
    """The whole file, as it is when asked (streamed in 64 KiB reads, never more than its size then)."""
    name = request.args.get("file")
    path = resolve(name)
    size, chunks = logfiles.stream(path)
    assert name is not None  # resolve() stops on None
    return Response(chunks, mimetype="text/plain", headers={
        "Content-Disposition": f'attachment; filename="{name}"', "Content-Length": str(size),
        "X-Content-Type-Options": "nosniff"})


@bp.get("/api/log")
def api_log() -> ResponseReturnValue:
    """``?file=NAME&offset=BYTES[&level=&q=]``: the lines appended since ``offset`` (see
    :func:`webapp.console.logfiles.read_from`), those that pass the filters."""
    path = resolve(request.args.get("file"))
    offset = int_arg(request.args.get("offset"), "offset", 0, 2**62, 0)
    level, query = filters()
    got = logfiles.read_from(path, offset)
    if level is not None or query is not None:
        q = logfiles.fold(query)
        kept = [i for i, (t, lvl) in enumerate(zip(got["lines"], got["levels"], strict=True))
                if logfiles.keeps(logfiles.Line(t, lvl, None), level, q)]
        for key in ("lines", "levels", "ts"):
            got[key] = [got[key][i] for i in kept]
    return jsonify(got)


def parse_cursor(raw: str | None, files: list[dict[str, Any]]) -> dict[str, int]:
    """``name:offset,name:offset`` (the merged view's follow cursor), each name a listed file."""
    names = {f["name"] for f in files}
    out: dict[str, int] = {}
    for part in (raw or "").split(","):
        if not part:
            continue
        name, sep, offset = part.rpartition(":")
        if not sep or name not in names:
            bad_request(f"cursor: {part[:80]!r} is not FILE:OFFSET with a listed log file")
        out[name] = int_arg(offset, f"cursor offset of {name}", 0, 2**62)
    return out


def format_cursor(cursor: dict[str, int]) -> str:
    return ",".join(f"{name}:{offset}" for name, offset in sorted(cursor.items()))


@bp.get("/api/logs/all")
def api_logs_all() -> ResponseReturnValue:
    """``?cursor=FILE:OFFSET,...[&level=&q=]``: what every watcher's log got since the cursor, in
    time order, each line with its watcher; and the next cursor."""
    files = list_logs()
    cursor = parse_cursor(request.args.get("cursor"), files)
    level, query = filters()
    got = logfiles.merged_from(settings().log_dir, files, cursor)
    q = logfiles.fold(query)
    lines = [x for x in got["lines"] if logfiles.keeps(logfiles.Line(x["text"], x["level"], None), level, q)]
    return jsonify({"lines": lines, "cursor": format_cursor(got["cursor"])})
