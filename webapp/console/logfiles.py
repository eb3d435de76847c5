"""Reading the stack's log files: which files there are, the level and time of each line, tails,
searches and the merged tail of every watcher. No Flask here: :mod:`webapp.console.logs` serves it.

**Which files.** Only names in the listing of ``$TICKSTACK_HOME/log`` are read: regular files (no
symlinks) named ``*.log``, or ``*.log.N``, the older files circus's ``FileStream`` rotates to
(``writer.log.1`` is the newest of them). A name is never joined into a path before it is found in
that listing, so ``../`` or an absolute path cannot reach anything else.

**Levels.** Each format the stack writes has a header that carries its level:

* ours (every worker, :data:`workers.base.LOG_FORMAT`): ``2026-12-02 00:28:46,316 INFO [123] ...``
* circusd's: ``2026-12-02 00:28:46 circus[123] [ERROR] ...``
* gunicorn's: ``[2026-12-02 00:28:46 +0000] [123] [ERROR] ...``
* gunicorn's access log: ``127.0.0.1 - - [02/Dec/2026:00:28:46 +0000] "GET / HTTP/1.1" 500 ...``
  (5xx read as an error, 4xx as a warning)

A line without a header (a traceback's lines, a message over several lines) belongs to the record
above it and takes its level and time; ``Traceback (most recent call last):`` makes what follows an
error, whatever the record above said (a process that crashed writes its traceback bare).

**Bounds.** Every read is bounded: a tail reads at most :data:`MAX_TAIL_BYTES` back, a search or a
level filter scans at most the last :data:`MAX_SCAN_BYTES` of a file, a line is cut at
:data:`MAX_LINE_BYTES`, a follow poll reads at most :data:`MAX_FOLLOW_BYTES`.
"""
from __future__ import annotations

import os
import re
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

LOG_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.log(?:\.[1-9][0-9]{0,2})?")
#: A watcher's own log (its stderr) or circusd's: a name with no other dot (not ``.stdout.log``,
#: ``.access.log`` or a rotated file). These make the merged "all watchers" view.
MAIN_LOG_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_-]{0,63})\.log")

MAX_TAIL_BYTES = 8 * 1024 * 1024
MAX_SCAN_BYTES = 32 * 1024 * 1024
MAX_FOLLOW_BYTES = 256 * 1024
MAX_LINE_BYTES = 64 * 1024
BLOCK = 64 * 1024

#: Levels, most severe first; a filter keeps a line at its level or above.
LEVELS = ("error", "warning", "info", "debug")
RANK = {"error": 3, "warning": 2, "info": 1, "debug": 0}
_LEVEL_WORDS = {"CRITICAL": "error", "FATAL": "error", "ERROR": "error", "EXCEPTION": "error",
                "WARNING": "warning", "WARN": "warning", "INFO": "info", "DEBUG": "debug"}

_OURS = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ([A-Z]+) \[\d+\] ")
_CIRCUS = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) [\w.-]+\[\d+\] \[([A-Z]+)\] ")
_GUNICORN = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4})\] \[\d+\] \[([A-Z]+)\] ")
_ACCESS = re.compile(r"\S+ \S+ \S+ \[(\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] \"[^\"]*\" (\d{3}) ")
_TRACEBACK = "Traceback (most recent call last):"
_BARE_LEVEL = re.compile(r"\b(CRITICAL|FATAL|ERROR|WARNING)\b")


@dataclass
class Line:
    """One line of a log: its text, level (None when it says none) and time in epoch ms (None
    when neither it nor a record above it carries one)."""

    text: str
    level: str | None
    ts: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "level": self.level, "ts": self.ts}


def _local_ms(text: str, fmt: str) -> int | None:
    """A naive time as the processes wrote it (their local time, UTC on a server) in epoch ms."""
    try:
        return int(datetime.strptime(text, fmt).timestamp() * 1000)
    except ValueError:
        return None


def header(text: str) -> tuple[str, int | None] | None:
    """(level, epoch ms) of a line that starts a record in one of the formats above; else None."""
    m = _OURS.match(text)
    if m:
        ms = _local_ms(m.group(1), "%Y-%m-%d %H:%M:%S")
        return _LEVEL_WORDS.get(m.group(3), "info"), None if ms is None else ms + int(m.group(2))
    m = _CIRCUS.match(text)
    if m:
        return _LEVEL_WORDS.get(m.group(2), "info"), _local_ms(m.group(1), "%Y-%m-%d %H:%M:%S")
    m = _GUNICORN.match(text)
    if m:
        return _LEVEL_WORDS.get(m.group(2), "info"), _local_ms(m.group(1), "%Y-%m-%d %H:%M:%S %z")
    m = _ACCESS.match(text)
    if m:
        status = int(m.group(2))
        level = "error" if status >= 500 else "warning" if status >= 400 else "info"
        return level, _local_ms(m.group(1), "%d/%b/%Y:%H:%M:%S %z")
    return None


class Classifier:
    """Gives each line of a file, read in order, its level and time (see the module docstring)."""

    def __init__(self) -> None:
        self.level: str | None = None
        self.ts: int | None = None
        self.seen_header = False

    def __call__(self, text: str) -> Line:
        found = header(text)
        if found is not None:
            self.level, self.ts = found
            self.seen_header = True
        elif text.startswith(_TRACEBACK):
            self.level = "error"
        elif text.startswith("[circus: "):  # PrivateFileStream's note of output lost on a full disk
            return Line(text, "warning", self.ts)
        elif not self.seen_header:  # a file of bare lines (a stdout log): a level word is all there is
            bare = _BARE_LEVEL.search(text)
            return Line(text, _LEVEL_WORDS[bare.group(1)] if bare else self.level, self.ts)
        return Line(text, self.level, self.ts)


def classify(texts: list[str]) -> list[Line]:
    c = Classifier()
    return [c(t) for t in texts]


def keeps(line: Line, level: str | None, query: str | None) -> bool:
    """Whether ``line`` is at ``level`` or above and contains ``query`` (ignoring case, as given
    folded by :func:`fold`)."""
    if level is not None and RANK.get(line.level or "", -1) < RANK[level]:
        return False
    return query is None or query in line.text.casefold()


def fold(query: str | None) -> str | None:
    return query.casefold() if query else None


# --- files --------------------------------------------------------------------------------------------------


def list_logs(log_dir: Path) -> list[dict[str, Any]]:
    """The log files (see the module docstring): name, size, mtime (ms), ``base`` (the file a
    rotated one came from) and ``rotation`` (0 for the current file), current files by name, each
    followed by its rotated ones, newest first."""
    out = []
    try:
        with os.scandir(log_dir) as entries:
            for entry in entries:
                if LOG_NAME_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    base, _, n = entry.name.rpartition(".log")
                    out.append({"name": entry.name, "bytes": st.st_size, "mtime_ms": int(st.st_mtime * 1000),
                                "base": f"{base}.log", "rotation": int(n[1:]) if n else 0})
    except FileNotFoundError:
        return []
    return sorted(out, key=lambda f: (f["base"], f["rotation"]))


def grouped(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The current files, each with ``rotated``: its older files (``.1`` first). A rotated file
    whose current one is gone is listed on its own."""
    current: dict[str, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    for f in files:
        if f["rotation"] == 0 or f["base"] not in current:
            entry = {**f, "rotated": []}
            if f["rotation"] == 0:
                current[f["base"]] = entry
            out.append(entry)
        else:
            current[f["base"]]["rotated"].append(f)
    return out


def main_logs(files: list[dict[str, Any]]) -> dict[str, str]:
    """{watcher: file name} of the files of the merged view (each watcher's log and circusd's)."""
    out = {}
    for f in files:
        m = MAIN_LOG_RE.fullmatch(f["name"])
        if m:
            out[m.group(1)] = f["name"]
    return out


def _readline(f: Any, end: int) -> bytes:
    """The next line of ``f`` up to byte ``end``, at most :data:`MAX_LINE_BYTES` (a longer line
    comes in pieces)."""
    left = end - f.tell()
    return f.readline(min(left, MAX_LINE_BYTES)) if left > 0 else b""


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\r\n")


def tail(path: Path, n: int) -> tuple[list[Line], int]:
    """The last ``n`` lines of ``path``, classified, and the byte offset they end at (the size
    when read). Reads back at most :data:`MAX_TAIL_BYTES`; the lines read before the last ``n``
    give the first of them their level (a traceback's record)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos, data = end, b""
        while pos > 0 and data.count(b"\n") <= n + 50 and end - pos < MAX_TAIL_BYTES:
            step = min(BLOCK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    texts = data.decode("utf-8", errors="replace").splitlines()
    if pos > 0 and texts:
        texts = texts[1:]  # the first one is cut
    return classify(texts)[-n:], end


@dataclass
class Scan:
    """What :func:`scan` found: the last ``n`` lines that passed, how many did, how many bytes were
    read and whether the file's start was reached (else only its last :data:`MAX_SCAN_BYTES`)."""

    lines: list[Line]
    matched: int
    scanned: int
    whole: bool
    size: int


def scan(path: Path, n: int, level: str | None = None, query: str | None = None,
         window: int = MAX_SCAN_BYTES, pattern: re.Pattern[str] | None = None) -> Scan:
    """The last ``n`` lines of ``path`` at ``level`` or above that contain ``query`` (any case) and,
    when given, match ``pattern`` (searched), read forward over the file's last ``window`` bytes
    (memory: ``n`` lines)."""
    q = fold(query)
    kept: deque[Line] = deque(maxlen=n)
    matched = 0
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - window)
        f.seek(start)
        if start:
            f.readline(MAX_LINE_BYTES)  # most likely cut
        c = Classifier()
        while raw := _readline(f, size):
            line = c(_decode(raw))
            if keeps(line, level, q) and (pattern is None or pattern.search(line.text)):
                matched += 1
                kept.append(line)
    return Scan(list(kept), matched, size - start, start == 0, size)


def read_from(path: Path, offset: int, reset_lines: int = 200) -> dict[str, Any]:
    """What was appended since ``offset``, complete lines only, at most :data:`MAX_FOLLOW_BYTES`:
    ``lines`` (texts), ``levels`` (one per line), ``offset`` to ask from next, ``size``. A file now
    shorter than ``offset`` was rotated or truncated: ``reset`` and its last ``reset_lines`` lines."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if offset > size:
            lines, end = tail(path, reset_lines)
            return {"reset": True, "lines": [x.text for x in lines], "levels": [x.level for x in lines],
                    "ts": [x.ts for x in lines], "offset": end, "size": end}
        f.seek(offset)
        data = f.read(min(size - offset, MAX_FOLLOW_BYTES))
    cut = data.rfind(b"\n") + 1
    if cut == 0 and len(data) == MAX_FOLLOW_BYTES:
        cut = len(data)  # one enormous line: pass it on in pieces
    lines = classify(data[:cut].decode("utf-8", errors="replace").splitlines())
    return {"reset": False, "lines": [x.text for x in lines], "levels": [x.level for x in lines],
            "ts": [x.ts for x in lines], "offset": offset + cut, "size": size}


def merged(log_dir: Path, files: list[dict[str, Any]], n: int, level: str | None = None,
           query: str | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The last ``n`` lines of every watcher's log and circusd's, in time order, each with its
    ``watcher``; and {file: size} where they end (the follow cursor). A line with no time (a file of
    bare lines) sorts by its file's modification time."""
    rows: list[tuple[int, int, int, dict[str, Any]]] = []
    cursor: dict[str, int] = {}
    mtimes = {f["name"]: f["mtime_ms"] for f in files}
    for i, (watcher, name) in enumerate(sorted(main_logs(files).items())):
        path = log_dir / name
        try:
            if level is None and query is None:
                lines, size = tail(path, n)
            else:
                found = scan(path, n, level, query)
                lines, size = found.lines, found.size
        except FileNotFoundError:
            continue
        cursor[name] = size
        for j, line in enumerate(lines):
            ts = line.ts if line.ts is not None else mtimes.get(name, 0)
            rows.append((ts, i, j, {**line.as_dict(), "watcher": watcher, "file": name}))
    rows.sort(key=lambda r: r[:3])
    return [r[3] for r in rows[-n:]], cursor


def merged_from(log_dir: Path, files: list[dict[str, Any]], cursor: dict[str, int]) -> dict[str, Any]:
    """What every main log got since ``cursor`` ({file: offset}; a file not in it is new, and read
    from its start), in time order: ``lines`` (dicts with ``watcher``) and the next ``cursor``."""
    out: list[tuple[int, int, int, dict[str, Any]]] = []
    new_cursor: dict[str, int] = {}
    for i, (watcher, name) in enumerate(sorted(main_logs(files).items())):
        path = log_dir / name
        try:
            offset = cursor.get(name, 0)
            got = read_from(path, offset, reset_lines=20)
        except FileNotFoundError:
            continue
        new_cursor[name] = got["offset"]
        now = int(time.time() * 1000)
        for j, (text, lvl, ts) in enumerate(zip(got["lines"], got["levels"], got["ts"], strict=True)):
            out.append((ts if ts is not None else now, i, j,
                        {"text": text, "level": lvl, "ts": ts, "watcher": watcher, "file": name}))
    out.sort(key=lambda r: r[:3])
    return {"lines": [r[3] for r in out], "cursor": new_cursor}


def highlight(text: str, query: str | None) -> list[tuple[str, bool]]:
    """``text`` cut into (piece, is_match) around each occurrence of ``query``, ignoring case."""
    if not query:
        return [(text, False)]
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for m in re.finditer(re.escape(query), text, re.IGNORECASE):
        if m.start() > pos:
            pieces.append((text[pos:m.start()], False))
        pieces.append((m.group(0), True))
        pos = m.end()
    if pos < len(text):
        pieces.append((text[pos:], False))
    return pieces or [(text, False)]


def stream(path: Path, chunk: int = BLOCK) -> tuple[int, Any]:
    """(size, generator of the file's bytes up to that size in ``chunk``-byte reads). The file is
    opened here (not a symlink), so a rotation while it is sent changes nothing."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    f = os.fdopen(fd, "rb")
    size = os.fstat(fd).st_size

    def chunks() -> Any:
        with f:
            left = size
            while left > 0:
                data = f.read(min(chunk, left))
                if not data:
                    return
                left -= len(data)
                yield data

    return size, chunks()
