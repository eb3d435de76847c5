"""How much of an HTTP/1.1 request has come: where its head ends, how its body is framed (as
gunicorn reads it), whether the client waits for ``100 Continue``, where a chunked body ends. Pure
functions over the bytes read so far, for :mod:`webapp.gunicorn_worker`'s poller, which reads a
whole request before a thread takes it.
"""
from __future__ import annotations

import re

#: Header bytes read in the poller at most; a head longer, with no end, is refused (431).
MAX_HEADER_BYTES = 64 * 1024
#: A chunk's size as HTTP/1.1 writes it: hex digits only (RFC 9112, 7.1), as many as the line holds.
CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]+")
#: The request line's version, as gunicorn reads it.
VERSION_RE = re.compile(rb"HTTP/(\d)\.(\d)")
#: Bytes of a chunk's size line at most (its extensions included), as gunicorn's own limit.
MAX_CHUNK_LINE = 1024


def head_length(buf: bytes | bytearray) -> int | None:
    """Bytes of the request line and headers at the start of ``buf``, blank line included; None
    while they are not all in."""
    end = buf.find(b"\r\n\r\n")
    if end >= 0:
        return end + 4
    end = buf.find(b"\n\n")
    return end + 2 if end >= 0 else None


def request_version(head: bytes | bytearray) -> tuple[int, int] | None:
    """The request's HTTP version, its request line read as gunicorn reads it (one CRLF before it
    skipped, RFC 9112 2.2); None when it has none gunicorn takes."""
    data = bytes(head)
    if data.startswith(b"\r\n"):
        data = data[2:]
    parts = data.split(b"\n", 1)[0].rstrip(b"\r").split(b" ", 2)
    match = VERSION_RE.fullmatch(parts[2]) if len(parts) == 3 else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def body_framing(head: bytes | bytearray) -> int | str | None:
    """How the request's body is framed, as gunicorn reads it (``Message.set_body_reader``): its
    Content-Length, ``"chunked"``, or None when gunicorn refuses the head (two lengths, a length with
    chunks, chunks in HTTP/1.0, an unknown coding: it answers 400 from the head alone, at once). Read
    more strictly, heads gunicorn takes (``identity, chunked``, a length of 17 digits, HTTP/1.2, a
    CRLF before the request line) went to a thread, which waited for their bodies (the second and
    third reviews of round 41); the poller now refuses a None itself."""
    lines = bytes(head).split(b"\n")
    lengths, chunked, codings = [], False, False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == b"content-length":
            lengths.append(value.strip(b" \t\r"))
        elif name == b"transfer-encoding":
            codings = True
            for coding in (v.strip(b" \t\r").lower() for v in value.split(b",")):
                if chunked or coding not in (b"chunked", b"identity", b"gzip", b"deflate", b"compress"):
                    return None  # anything after chunked, or a coding gunicorn does not know
                chunked = coding == b"chunked"
    if codings:
        version = request_version(head)
        return "chunked" if chunked and not lengths and version is not None and (1, 1) <= version < (2, 0) else None
    if not lengths:
        return 0
    if len(lengths) > 1 or not lengths[0].decode("latin-1").isnumeric():
        return None
    try:
        return int(lengths[0])
    except ValueError:
        return None


def expects_continue(head: bytes | bytearray) -> bool:
    """Whether an HTTP/1.1 request waits for ``100 Continue`` before it sends its body (curl does for
    large ones): the poller, which now waits for the body, sends it. gunicorn's thread sends one too,
    later; a client reads any number of 1xx answers before the final one (RFC 9110, 15.2)."""
    version = request_version(head)
    rest = bytes(head).lstrip(b"\r\n").partition(b"\n")[2]
    return version is not None and version >= (1, 1) and any(
        line.partition(b":")[0].strip().lower() == b"expect" and line.partition(b":")[2].strip().lower()
        == b"100-continue" for line in rest.split(b"\n"))


def chunked_end(buf: bytes | bytearray, pos: int, done: int) -> tuple[int | None, int, int, int]:
    """A chunked body's scan from ``pos``, ``done`` bytes of data in the chunks before it: (where the
    body ends, or None; where the next scan starts; the data of the whole chunks so far; that and the
    size the chunk in progress declares: the body's size at least). ValueError, saying why, for what
    is no chunk: handed to a thread, gunicorn's parser read some of those as chunks and waited for
    their data (a size of 20 digits: the third review of round 41)."""
    while True:
        line_end = buf.find(b"\r\n", pos, pos + MAX_CHUNK_LINE)
        if line_end < 0:
            if len(buf) - pos >= MAX_CHUNK_LINE:  # searched from here again at every read: bounded
                raise ValueError(f"a chunk's size line is longer than {MAX_CHUNK_LINE} bytes")
            return None, pos, done, done
        size_text, *extension = bytes(buf[pos:line_end]).split(b";", 1)
        if extension:  # white space before an extension only, as gunicorn
            size_text = size_text.rstrip(b" \t")
        if not CHUNK_SIZE_RE.fullmatch(size_text):  # int(x, 16) takes "-6", "0x5", "1_0": a "-6" looped
            raise ValueError("a chunk's size is not hex digits")  # here for ever (the review of round 41)
        size = int(size_text, 16)
        if size == 0:  # the last chunk: trailers, then a blank line
            trailers_end = buf.find(b"\r\n\r\n", line_end, line_end + MAX_HEADER_BYTES)
            if trailers_end < 0 and len(buf) - line_end >= MAX_HEADER_BYTES:
                raise ValueError(f"the body's trailers are longer than {MAX_HEADER_BYTES} bytes")
            return (trailers_end + 4 if trailers_end >= 0 else None), pos, done, done
        next_pos = line_end + 2 + size + 2
        if next_pos > len(buf):
            return None, pos, done, done + size
        pos, done = next_pos, done + size
