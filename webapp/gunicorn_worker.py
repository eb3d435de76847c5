"""The gunicorn worker class of the API and the console: threads that are never given a request
before its headers are in, so slow, idle or half-open connections cannot stop either app.

Used as ``--worker-class webapp.gunicorn_worker.HeadersFirstWorker --threads 8`` on the circus.ini
command lines (``python -m bench api`` runs the same). Why not one of gunicorn's own workers
(measured with ``python -m bench api --slow-clients 50``; the table is in the README's
``bench api`` section):

* ``sync`` serves one connection at a time per worker: with 2 workers, two clients that connect
  and send half a request line stop the app until ``--timeout`` (30 s for the API, 300 s for the
  console), and anyone on the machine can do that again and again.
* ``gthread`` keeps idle kept-alive connections in a poller, but gives every *new* connection to a
  thread at once: a connection that sends nothing holds its thread for 5 s (gunicorn's
  ``DEFAULT_WORKER_DATA_TIMEOUT``), and one that sends a partial request line holds it with no
  time limit at all (the parser's ``recv`` has none). A few dozen such connections take every
  thread, for as long as they stay open.
* ``tornado`` reads requests asynchronously but runs the WSGI app on its only thread, so a console
  backup (minutes) stops the worker, heartbeat included: the arbiter kills it at ``--timeout``.
* ``gevent``/``eventlet`` are not installed (a new dependency, and monkey-patching under ZeroMQ
  and SQLite); gunicorn's ASGI worker needs an ASGI app.

:class:`HeadersFirstWorker` is ``gthread`` with one change of policy, on its own hooks: a
connection (new, or kept alive) waits in the worker's poller, costing no thread, until its request
headers are complete (a blank line, or :data:`MAX_HEADER_BYTES`), and is closed if they are not in
within :data:`HEADER_TIMEOUT` s; then, in the poller still, until the body they declare is in
(by Content-Length or in chunks, as gunicorn reads them), closed if it is not within
:data:`REQUEST_READ_TIMEOUT` s. Only then does a thread take it, with the bytes read so far, served
to gunicorn's parser as reads of the socket (:meth:`BoundedSocket.prefetch`). Refused from the
poller, unread, each then read away for :data:`LINGER_S` without a thread: a body over the app's
``MAX_CONTENT_LENGTH`` (413), one more than the worker's :data:`POLLED_BODIES_BUDGET` (503), a head
over :data:`MAX_HEADER_BYTES` with no end (431), chunks gunicorn would refuse or mostly framing
(400). Bytes of a next request read ahead go back to the poller too (:meth:`finish_request`). A
thread's reads end at :data:`REQUEST_READ_TIMEOUT` s, and each send of the answer too
(:class:`BoundedSocket`), so a client that never reads its answer holds a thread that long at most.
Idle and half-open connections are then limited only by ``worker_connections`` (1000 per worker; beyond
it a worker stops accepting until some close, and every waiting one closes within
:data:`HEADER_TIMEOUT`).

Two repairs besides. On the API's port every answer is the one JSON error body, the requests
gunicorn refuses itself included (a request line or a header over its limits: 414, 431; a bad
Content-Length or request line: 400): gunicorn decides their status and logs them, the worker
writes the JSON body instead of gunicorn's HTML page (:meth:`HeadersFirstWorker.handle_error`;
the console keeps gunicorn's page). And a body the app left unread (a write refused 401 before
its body is read) is read away by gthread to keep the connection; when it cannot be decoded (a
malformed chunk) gunicorn wrote its own 400 on the same connection after the app's answer. The
connection is closed instead (:meth:`HeadersFirstWorker._keepalive_after`).

``--timeout`` means something else with threads: the arbiter kills a worker whose *main loop*
stops (it beats every second whatever its threads do), never one whose request is merely long. A
console backup or quick_check may run as long as it needs (under ``sync`` they needed
``--timeout 300``, which also let a half-open connection hold a worker for 5 minutes).

Thread safety of the apps (checked): Flask-SQLAlchemy's session is scoped to the app context, one
per request; its engine's pool is thread-safe and larger than the thread count (5 + 10 overflow;
pysqlite with ``check_same_thread=False``); writer clients are one per thread
(:func:`db.client.thread_client`); the console's process meter is per thread; files shared between
workers (login throttle, sessions, audit spool, backup lock) are opened per call and ``flock``-ed,
which serialises the threads of one process as well as the processes.
"""
from __future__ import annotations

import errno
import logging
import selectors
import socket
import time
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from typing import Any

from gunicorn import util
from gunicorn.http.errors import ParseException
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

from webapp.http_framing import MAX_HEADER_BYTES, body_framing, chunked_end, expects_continue, head_length

#: Seconds a connection may take to send its request headers (from accept, or from its first byte
#: after the previous answer on a kept-alive connection); then it is closed.
HEADER_TIMEOUT = 10.0
#: Seconds a thread may spend reading one request once its headers are in (the body), and that each
#: send of an answer may take: a client that trickles or stops reading holds a thread that long.
REQUEST_READ_TIMEOUT = 30.0
#: A body is read in the poller too, costing no thread, when it declares at most this many bytes
#: (the API's largest body and some; the app's ``MAX_CONTENT_LENGTH`` when it is smaller); a larger
#: one is refused from the poller, 413, unread. A few dozen clients that sent their headers and then a byte a second
#: of their bodies held every thread of both apps (a security review, round 41).
MAX_POLLED_BODY = 8 * 1024 * 1024 + 64 * 1024
#: Seconds a refused connection is read away (and dropped) before it is closed.
LINGER_S = 2.0
#: Bytes of bodies a worker holds in its poller at most, all connections together; past it a body
#: still on its way is refused, 503 (a thread would wait for it).
POLLED_BODIES_BUDGET = 64 * 1024 * 1024


class BoundedSocket(socket.socket):
    """A client socket whose blocking mode has a time limit (:data:`REQUEST_READ_TIMEOUT` per call),
    and whose reads stop at :attr:`read_deadline` (the whole request, however it trickles)."""

    io_timeout = REQUEST_READ_TIMEOUT
    read_deadline: float | None = None
    #: What the poller read and the thread has not (see :meth:`prefetch`), and how far it is read.
    _prefetched: memoryview | None = None
    _prefetched_at = 0

    def prefetch(self, data: bytes) -> None:
        """Serve ``data`` first, as reads of the socket. Put back into gunicorn's parser whole, a body
        of many small chunks cost time quadratic in its length, for each chunk copies the parser's
        whole buffer (600,000 chunks: 288 s of a thread, no deadline met, no read made: the second
        review of round 41); served as reads, at most as many bytes as each read asks are copied."""
        self._prefetched, self._prefetched_at = memoryview(data), 0

    def take_prefetched(self) -> bytes:
        """What the parser has not read of what the poller read, taken back."""
        rest = bytes(self._prefetched[self._prefetched_at:]) if self._prefetched is not None else b""
        self._prefetched = None
        return rest

    def setblocking(self, flag: bool) -> None:
        """gunicorn switches to blocking mode in the thread: blocking with a limit instead."""
        if flag:
            self.settimeout(self.io_timeout)
        else:
            super().setblocking(False)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        deadline, timeout = self.read_deadline, self.gettimeout()
        if deadline is None or not timeout:  # the poller's non-blocking reads
            return super().recv(bufsize, flags)
        if self._prefetched is not None and self._prefetched_at < len(self._prefetched):
            start = self._prefetched_at  # already here: served whatever the time
            self._prefetched_at = min(len(self._prefetched), start + bufsize)
            return bytes(self._prefetched[start:self._prefetched_at])
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            # A reset to gthread (a debug line), said here once: a TimeoutError was a traceback at
            # ERROR for every slow client (the second review of round 41).
            logging.getLogger("gunicorn.error").info("Closing a connection whose request was not in within %g s",
                                                     self.io_timeout)
            raise ConnectionResetError(errno.ECONNRESET, f"the request was not received within {self.io_timeout:g} s")
        if remaining >= timeout:
            return super().recv(bufsize, flags)
        self.settimeout(remaining)
        try:
            return super().recv(bufsize, flags)
        finally:
            self.settimeout(timeout)


class _ErrorPage:
    """Stands in for the client socket while gunicorn's ``handle_error`` writes its HTML error page:
    keeps the page's status line, sends nothing. Everything else (the access log's look at it) goes
    to the real socket."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.status_line: str | None = None

    def gettimeout(self) -> float:
        return 0.0  # gunicorn's write_nonblock then writes at once, without switching modes

    def sendall(self, data: bytes) -> None:
        self.status_line = data.split(b"\r\n", 1)[0].decode("latin-1")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class HeadersFirstWorker(ThreadWorker):
    """``gthread`` that hands a connection to a thread only once its request headers are complete
    (see the module docstring)."""

    #: Makes the JSON answer to a request gunicorn refuses, from (status, reason); None: gunicorn's page.
    refusal: Callable[[int, str], Any] | None = None
    #: Bytes of bodies in the poller now, every connection's together (see :data:`POLLED_BODIES_BUDGET`).
    polled_bytes = 0
    #: The app's largest body (Flask's ``MAX_CONTENT_LENGTH``, read in :meth:`load_wsgi`): a larger
    #: one is refused from the poller.
    body_limit = MAX_POLLED_BODY

    def accept(self, listener: Any) -> None:
        try:
            client, addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        sock = BoundedSocket(client.family, client.type, client.proto, fileno=client.detach())
        self.nr_conns += 1
        self._await_headers(TConn(self.cfg, sock, addr, listener.getsockname()))

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        """A kept-alive connection has data: wait for its next request's headers, as for a new one."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._await_headers(conn)
        self._read_headers(conn)

    def _await_headers(self, conn: TConn) -> None:
        conn.sock.setblocking(False)
        conn.sock.read_deadline = None
        conn.head = bytearray()
        conn.framing = conn.head_end = None  # known once the headers are in
        conn.chunk_scan = conn.chunk_data = conn.polled = 0
        conn.timeout = time.monotonic() + HEADER_TIMEOUT
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn: TConn, _sock: Any) -> None:
        self._read_headers(conn)

    def _read_headers(self, conn: TConn) -> None:
        """In the main loop: take what the client sent; to a thread once the headers are in, and the
        body they declare (see :data:`MAX_POLLED_BODY`)."""
        data = self._receive(conn)
        if data is None:
            return
        if not data:  # closed (or reset) before a whole request
            self._drop(conn)
            return
        self._take(conn, data)

    def _take(self, conn: TConn, data: bytes) -> None:
        """``data`` from the client, on the main loop: the request's head and body so far."""
        start = max(0, len(conn.head) - 3)
        conn.head += data
        if conn.head_end is None:
            conn.head_end = head_length(conn.head[max(0, start - 1):])
            if conn.head_end is None:
                if len(conn.head) < MAX_HEADER_BYTES:
                    return
            else:
                conn.head_end += max(0, start - 1)
                conn.framing = body_framing(conn.head[:conn.head_end])
                conn.chunk_scan = conn.head_end
                conn.timeout = time.monotonic() + REQUEST_READ_TIMEOUT  # now for the body, if any
                conn.polled = len(conn.head) - conn.head_end
                self.polled_bytes += conn.polled
                if conn.framing and self._verdict(conn) is None and expects_continue(conn.head[:conn.head_end]):
                    try:
                        conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                    except OSError:
                        pass  # gone: the next read says so
        elif conn.framing is not None:
            conn.polled += len(data)
            self.polled_bytes += len(data)
        verdict = self._verdict(conn)
        if verdict is None:
            return
        self._unpoll(conn)
        if verdict != "thread":
            self._refuse(conn, *verdict)
            return
        conn.data_ready = True  # gthread's handle() must not wait for data again
        self.enqueue_req(conn)

    def _verdict(self, conn: TConn) -> str | tuple[int, str] | None:
        """What becomes of ``conn`` now: None, the poller reads on; ``"thread"``, a thread takes the
        request (its head and body are in); (status, reason), refused from the poller: a head too
        long (431), a framing it cannot read (400: a thread would wait if gunicorn read it otherwise),
        a body over the app's limit (413, unread: a thread drained it for 5 s before, so declaring a
        large body and trickling it held threads again) or one more than the worker may hold (503)."""
        # MAX_HEADER_BYTES and no end yet: a thread would wait for the rest. One whose end came in the
        # same read is as long: refused the same, whatever way its bytes were cut on the way (gunicorn's
        # own 431, with other words, answered it when they came in two reads).
        if conn.head_end is None or conn.head_end > MAX_HEADER_BYTES:
            return 431, f"the request's head is longer than {MAX_HEADER_BYTES} bytes"
        if conn.framing is None:  # never to a thread, which would wait if gunicorn read it otherwise
            return 400, "the request's Content-Length or Transfer-Encoding cannot be read (RFC 9112, 6)"
        received = len(conn.head) - conn.head_end
        if conn.framing == "chunked":
            try:
                end, conn.chunk_scan, conn.chunk_data, declared = chunked_end(conn.head, conn.chunk_scan,
                                                                              conn.chunk_data)
            except ValueError as e:
                return 400, str(e)
            complete = end is not None
            too_large = declared > self.body_limit
            # Their framing bounded too: a byte a chunk is six on the wire, and one connection filled
            # the worker's whole budget with a body of no data (the second review of round 41).
            if not too_large and received > 2 * declared + MAX_HEADER_BYTES:
                return 400, "the body's chunks are mostly framing: send it in larger chunks"
        else:
            complete, too_large = received >= conn.framing, conn.framing > self.body_limit
        if too_large:
            return 413, f"the body is larger than the limit of {self.body_limit} bytes"
        if complete:
            return "thread"
        if self.polled_bytes > POLLED_BODIES_BUDGET:
            return 503, "the server holds as many request bodies as it may now; send it again in a moment"
        return None

    def _refuse(self, conn: TConn, status: int, reason: str) -> None:
        """Answer ``status`` from the poller, then read away what the client still sends for
        :data:`LINGER_S` at most (closing with unread bytes resets the connection, and the client may
        lose the answer), costing no thread."""
        body, content_type = f"{reason}\n".encode(), "text/plain; charset=utf-8"
        if self.refusal is not None:  # the API's one JSON error body
            response = self.refusal(status, reason)
            body, content_type = response.get_data(), response.content_type
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                f"{'Retry-After: 1' + chr(13) + chr(10) if status == 503 else ''}\r\n")
        try:
            conn.sock.send(head.encode("latin-1") + body)  # small: a fresh socket's buffer takes it
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.nr_conns -= 1
            conn.close()
            return
        conn.timeout = time.monotonic() + LINGER_S
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._discard, conn))

    def _discard(self, conn: TConn, _sock: Any) -> None:
        if self._receive(conn) == b"":
            self._drop(conn)

    @staticmethod
    def _receive(conn: TConn) -> bytes | None:
        """What the client sent (b"" once it closed, or reset), or None when nothing is there yet."""
        try:
            return conn.sock.recv(MAX_HEADER_BYTES)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def _unpoll(self, conn: TConn) -> None:
        """Take a connection out of the poller and the pending list, its polled bytes with it."""
        self.pending_conns.remove(conn)
        try:
            self.poller.unregister(conn.sock)
        except (OSError, KeyError, ValueError):
            pass  # already unregistered
        self._forget_polled(conn)

    def _drop(self, conn: TConn) -> None:
        """Close a connection the poller holds."""
        self._unpoll(conn)
        self.nr_conns -= 1
        conn.close()

    def _forget_polled(self, conn: TConn) -> None:
        self.polled_bytes -= getattr(conn, "polled", 0)
        conn.polled = 0

    def murder_pending(self) -> None:
        """Close the connections whose request did not come in time (its headers within
        :data:`HEADER_TIMEOUT`, then its body within :data:`REQUEST_READ_TIMEOUT`); when the worker is
        stopping, within gthread's kept-alive linger (a client may be sending its request right now).
        gthread's own stops at the first connection not yet due, its list being sorted: a body's
        longer time would hold the others back."""
        now = time.monotonic()
        if not self.alive:  # those still without headers; a body on its way has its time, as before
            for conn in self.pending_conns:
                if getattr(conn, "head_end", None) is None:
                    conn.timeout = min(conn.timeout, now + STOP_KEEPALIVE_LINGER)
        for conn in [c for c in self.pending_conns if c.timeout <= now]:
            self._drop(conn)

    def load_wsgi(self) -> None:
        """Load the app, then see whether its errors are JSON everywhere (the API's)."""
        super().load_wsgi()
        # Imported here, in the worker once the app is loaded: the master imports this module before it
        # sets PROMETHEUS_MULTIPROC_DIR (webapp.multiprocess), and webapp.api imports prometheus_client,
        # whose mode is chosen at its first import.
        from flask import Flask

        from webapp.api.errors import json_everywhere, server_refusal

        if isinstance(self.wsgi, Flask) and json_everywhere(self.wsgi):
            self.refusal = partial(server_refusal, self.wsgi)
        if isinstance(self.wsgi, Flask) and isinstance(self.wsgi.config.get("MAX_CONTENT_LENGTH"), int):
            self.body_limit = min(self.wsgi.config["MAX_CONTENT_LENGTH"], MAX_POLLED_BODY)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """A request gunicorn refuses itself (a request line or header over its limits, a bad
        Content-Length, a malformed chunk, ...) is answered with its HTML page, from a function with no
        hook (``gunicorn.util.write_error``). On the API's port every answer is the one JSON error body
        (:func:`webapp.api.errors.server_refusal`), so there gunicorn's ``handle_error`` still decides the
        status and logs (its warning, its access line), but writes its page to a stand-in
        (:class:`_ErrorPage`); the JSON body goes out instead, with the same status line. Other apps
        (the console) keep gunicorn's page."""
        if self.refusal is None:
            super().handle_error(req, client, addr, exc)
            return
        page = _ErrorPage(client)
        super().handle_error(req, page, addr, exc)
        if page.status_line is None:  # gunicorn had nothing to write
            return
        _, status, reason = page.status_line.split(" ", 2)
        response = self.refusal(int(status), f"{reason}: {exc}")
        head = [page.status_line, "Connection: close", *(f"{k}: {v}" for k, v in response.headers.items())]
        try:
            util.write_nonblock(client, "\r\n".join([*head, "", ""]).encode("latin-1") + response.get_data())
        except Exception:  # the client went away: as gunicorn does with its own page
            self.log.debug("Failed to send error message.")

    def _keepalive_after(self, conn: TConn, keepalive: bool) -> bool:
        """After an answer, gthread reads away the body the app left unread, to keep the connection;
        a body it cannot decode (a malformed chunk) raised, and gunicorn wrote a second answer, its
        HTML 400, on the same connection after the app's (a 401 given before the body was read).
        The connection closes instead: where the next request would start is unknown."""
        try:
            return super()._keepalive_after(conn, keepalive)
        except ParseException as e:
            self.log.debug("Closing the connection: the body left unread cannot be read: %s", e)
            return False

    def finish_request(self, conn: TConn, fs: Any) -> None:
        """On the main loop, after a request: gthread gives a kept-alive connection whose parser
        holds the start of its next request straight back to a thread, which then waited for the
        rest for 30 s: one byte after a request held a thread (8 such connections, every thread of
        a worker: the second review of round 41). Those bytes wait in the poller like any others."""
        try:
            keep = not fs.cancelled() and fs.exception() is None and fs.result() is True
        except Exception:
            keep = False
        ahead = b""
        if keep and conn.parser is not None:
            ahead = conn.parser.unreader.take_buffered() + conn.sock.take_prefetched()
        if not ahead or not self.alive:  # stopping: gthread answers it, "Connection: close"
            if ahead:
                conn.parser.unreader.unread(ahead)
            super().finish_request(conn, fs)
            return
        conn.sock.setblocking(False)
        self._await_headers(conn)
        self._take(conn, ahead)

    def handle(self, conn: TConn) -> Any:
        """In a thread: give the parser the bytes read in the poller, bound the rest of the read."""
        head = getattr(conn, "head", None)
        if head:
            conn.head = bytearray()
            conn.sock.setblocking(True)
            conn.init()
            conn.sock.prefetch(bytes(head))
        conn.sock.read_deadline = time.monotonic() + REQUEST_READ_TIMEOUT
        return super().handle(conn)
