"""The API's answers where gunicorn reads the request: request bodies it decodes (chunked) and the
requests it refuses itself, answered as everywhere else on the API's port: the one JSON error body
(``{"error": {"code", "message"}}``), one answer per request.

Real gunicorn with the API's own command line from ``circus.ini`` (:func:`testkit.gunicorn.serving`),
one for the module with a real writer, spoken to over raw sockets: what is under test is what the
server does with bytes no HTTP client library would send.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from db.validation import MAX_ROWS, MAX_TICKS
from testkit.gunicorn import Answer, Served, chunked, exchange, request_head, serving
from testkit.process import peak_rss
from testkit.writer import Stack
from webapp import MAX_BODY

pytestmark = pytest.mark.database_independent(
    "what gunicorn and the API make of a request's bytes is decided before any database is asked")

#: "Answered well within its timeouts": a did-it-happen bound, not a timing assertion.
ANSWER_WITHIN = 20.0
TICK = {"symbol": "BTCUSD", "ts": 1_704_067_200_000, "bid": 1.0, "ask": 1.0}

@pytest.fixture(scope="module")
def api() -> Iterator[tuple[Served, str]]:
    """The API under gunicorn as circus runs it, with a writer; and its write token."""
    st = Stack.create()
    try:
        st.start_writer()
        with serving(st.env, "api") as served:
            yield served, (st.home / "api-token").read_text().strip()
    finally:
        for proc in st.procs:
            st.stop(proc)
        st.close()


def one_json_error(answers: list[Answer], status: int, code: str) -> dict[str, Any]:
    """The only answer is ``status`` with the one error body of ``code``; returns the error."""
    assert [a[0] for a in answers] == [status], answers
    _, headers, body = answers[0]
    assert headers["content-type"] == "application/json", (headers, body[:300])
    error = json.loads(body)
    assert set(error) == {"error"} and set(error["error"]) == {"code", "message"}, error
    assert error["error"]["code"] == code, error
    return error["error"]


# --------------------------------------------------------------------------- bodies gunicorn decodes


def test_a_malformed_chunked_body_is_400_in_json_and_logged_without_a_traceback(api: tuple[Served, str]) -> None:
    served, token = api
    head = request_head("POST", "/api/ticks", f"Authorization: Bearer {token}", "Content-Type: application/json",
                        "Transfer-Encoding: chunked")
    error = one_json_error(exchange(served.port, head, b"zz\r\n"), 400, "bad_request")  # today: 500 internal_error
    assert "chunk" in error["message"], error
    assert "InvalidChunkSize" not in served.log() and "Traceback" not in served.log(), served.log()[-3000:]
    # A well-formed chunked body is read as any other.
    good = exchange(served.port, head, chunked(json.dumps({"ticks": [TICK]}).encode(), size=7))
    assert [a[0] for a in good] == [200], good


def test_a_body_left_unread_and_malformed_gets_no_second_answer(api: tuple[Served, str]) -> None:
    """A write without a token is answered 401 before its body is read; gunicorn then reads the body
    away to keep the connection, met the bad chunk and wrote a second answer (an HTML 400) on the
    same connection after the first. Now one answer: the worker's poller, which reads the body before
    the app, refuses the chunk itself (400), and closes."""
    served, _ = api
    head = request_head("POST", "/api/ticks", "Content-Type: application/json", "Transfer-Encoding: chunked",
                        keep_alive=True)
    assert "not hex digits" in one_json_error(exchange(served.port, head, b"zz\r\n"), 400, "bad_request")["message"]


def test_a_chunked_body_over_the_limit_is_413_as_with_a_content_length(api: tuple[Served, str]) -> None:
    served, token = api
    body = b'{"ticks": "' + b"x" * (MAX_BODY + 1024 * 1024) + b'"}'  # 9 MiB, valid JSON
    auth = (f"Authorization: Bearer {token}", "Content-Type: application/json")
    sized = exchange(served.port, request_head("POST", "/api/ticks", *auth, f"Content-Length: {len(body)}"), body)
    assert "8388608" in one_json_error(sized, 413, "payload_too_large")["message"]
    # Today: cut at 8 MiB and read as JSON, 400 invalid_json "Unterminated string".
    streamed = exchange(served.port, request_head("POST", "/api/ticks", *auth, "Transfer-Encoding: chunked"),
                        chunked(body))
    assert one_json_error(streamed, 413, "payload_too_large") == one_json_error(sized, 413, "payload_too_large")
    # Up to the limit itself, a chunked body is read whole (here: valid JSON, not a tick batch).
    exact = b'{"ticks": "' + b"x" * (MAX_BODY - 13) + b'"}'
    assert len(exact) == MAX_BODY
    at_limit = exchange(served.port, request_head("POST", "/api/ticks", *auth, "Transfer-Encoding: chunked"),
                        chunked(exact))
    one_json_error(at_limit, 400, "invalid_body")


def workers_peaks(served: Served) -> dict[int, int]:
    """The peak resident memory (VmHWM) of each of the gunicorn master's workers, by pid."""
    return {p.pid: peak_rss(p.pid) for p in psutil.Process(served.proc.pid).children()}


#: What 8 MiB bodies of tiny JSON objects and arrays may add to a worker's peak memory. Measured: any
#: 8 MiB body costs a worker up to ~40 MiB (its copies as it is read, and the string of an 8 MiB JSON
#: string), and so do these with the bound; without it each took a worker from ~60 to ~295 MiB.
CONTAINERS_PEAK_BOUND = 100 * 1024 * 1024


def test_a_body_of_millions_of_tiny_containers_is_refused_before_it_is_built(api: tuple[Served, str]) -> None:
    """8 MiB of ``{},{},...`` is 2.8 million dicts: json.loads built them all, ~235 MiB of a worker's
    memory for one request of a token holder, and 16 such requests at once (2 workers x 8 threads)
    gigabytes, where no write takes more than 10,000 rows. The body's objects and arrays are counted
    before it is parsed; too many is a 400 that says how many are accepted."""
    served, token = api
    auth = (f"Authorization: Bearer {token}", "Content-Type: application/json")

    def post(body: bytes) -> list[Answer]:
        return exchange(served.port, request_head("POST", "/api/ticks", *auth, f"Content-Length: {len(body)}"), body)

    n = (MAX_BODY - 16) // 3
    hostile = {"ticks in an object": b'{"ticks": [' + b"{}," * (n - 1) + b"{}]}", "objects": b"[" + b"{}," * n + b"{}]",
               "arrays": b"[" + b"[]," * n + b"[]]"}
    assert all(MAX_BODY - 64 < len(body) <= MAX_BODY for body in hostile.values())
    before = workers_peaks(served)
    answers = {kind: post(body) for kind, body in hostile.items()}
    grown = {pid: peak - before[pid] for pid, peak in workers_peaks(served).items()}
    shown = ", ".join(f"{g / 2**20:.0f} MiB" for g in grown.values())
    print(f"the workers' peak memory grew {shown} with 3 bodies of {MAX_BODY / 2**20:.0f} MiB")
    assert max(grown.values()) < CONTAINERS_PEAK_BOUND, f"the workers' peak memory grew {shown}"
    for kind, answer in answers.items():
        message = one_json_error(answer, 400, "invalid_body")["message"]
        most = re.search(r"at most ([\d,]+) JSON objects and arrays", message)
        assert most and MAX_ROWS < int(most.group(1).replace(",", "")) < 100 * MAX_ROWS, (kind, message)
    # The largest write there is still goes through: a full batch of ticks, each with every field.
    ticks = [{**TICK, "ts": TICK["ts"] + i, "volume": 1.0, "source": "bound-test", "seq": i} for i in range(MAX_TICKS)]
    full = post(json.dumps({"ticks": ticks}).encode())
    assert [a[0] for a in full] == [200], full


# --------------------------------------------------------------------------- requests gunicorn refuses itself

#: Requests gunicorn refuses before the app sees them: (the request's bytes, the status it keeps, the
#: code of the JSON body, a pattern of its message). Each was answered with gunicorn's HTML page.
REFUSED = {
    "url-over-4094-bytes": (request_head("GET", "/api/" + "a" * 9000), 414, "uri_too_long", r"too large"),
    "header-of-9-kb": (request_head("GET", "/api/health", "X-Big: " + "a" * 9000), 431,
                       "request_header_fields_too_large", r"header"),
    "over-100-headers": (request_head("GET", "/api/health", *(f"X-H{i}: 1" for i in range(101))), 431,
                         "request_header_fields_too_large", r"header"),
    "bad-content-length": (request_head("POST", "/api/ticks", "Content-Length: abc"), 400, "bad_request",
                           r"Content-Length|CONTENT-LENGTH"),
    "two-content-lengths": (request_head("POST", "/api/ticks", "Content-Length: 1", "Content-Length: 2") + b"x",
                            400, "bad_request", r"CONTENT-LENGTH|Content-Length"),
    "bad-request-line": (b"GARBAGE\r\n\r\n", 400, "bad_request", r"request line.*GARBAGE"),
    "bad-http-version": (b"GET /api/health HTTP/9.9\r\nHost: x\r\n\r\n", 400, "bad_request", r"HTTP Version"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_gunicorn_refuses_itself_is_answered_with_the_one_json_error_body(api: tuple[Served, str],
                                                                                case: str) -> None:
    served, _ = api
    raw, status, code, message = REFUSED[case]
    answers = exchange(served.port, raw)
    error = one_json_error(answers, status, code)  # today: gunicorn's HTML page (text/html)
    assert re.search(message, error["message"], re.IGNORECASE), error
    assert answers[0][1]["connection"] == "close"  # as gunicorn closes it after its own answer
    # gunicorn still says what it refused in its log, as a warning, with no traceback.
    assert "Invalid request from ip=127.0.0.1" in served.log() and "Traceback" not in served.log()
    # ... and the next connection is served as ever.
    assert [a[0] for a in exchange(served.port, request_head("GET", "/api/openapi.json"))] == [200]


def test_a_malformed_chunked_body_to_a_console_form_is_a_400_page_not_a_500() -> None:
    """The console reads its forms through gunicorn too: a bad chunk was a 500 page and a traceback in
    its log (the API's body reader was mended; the console's forms read the body elsewhere)."""
    st = Stack.create()
    try:
        st.start_writer()
        with serving(st.env, "console", ready_path="/console/login") as served:
            head = request_head("POST", "/console/login", "Content-Type: application/x-www-form-urlencoded",
                                "Transfer-Encoding: chunked")
            ((status, _, body),) = exchange(served.port, head, b"zz\r\n")
            assert status == 400 and b"not hex digits" in body, (status, body[:2000])  # refused by the poller
            assert "Traceback" not in served.log() and "InvalidChunkSize" not in served.log(), served.log()[-3000:]
    finally:
        for proc in st.procs:
            st.stop(proc)
        st.close()
