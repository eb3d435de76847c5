"""The numbers the API promises: the routes enforce them and the OpenAPI document
(:mod:`webapp.api.openapi`, :mod:`webapp.api.openapi_components`) states them, so both import them from here."""
from __future__ import annotations

from db.validation import MAX_ROWS, MAX_TICKS, TICK_FIELDS

#: Longest an API request waits for the writer (the client's own deadline,
#: 60 s by default, is for producers that must not give up).
WRITER_DEADLINE = 5.0
#: What a 503 tells the client to wait before retrying, in seconds.
RETRY_AFTER = 5
#: Rows of a series (and trades of a list) returned when ``limit`` is absent, and at most.
LIMIT_DEFAULT = 500
LIMIT_MAX = 5000
#: The largest id a row can have (a 64-bit integer): larger ones cannot exist, so 404.
MAX_ID = 2**63 - 1
#: JSON objects and arrays a request body may hold, counted as its ``{`` and ``[`` before it is parsed
#: (:func:`webapp.api.params.json_object`): json.loads builds every one, ~75 bytes each, so 8 MiB of
#: ``{},{},...`` cost a worker ~200 MB. The largest write, 10,000 ticks as objects, holds 10,002; the
#: bytes count braces inside strings too, but no tick field may hold one (symbols and sources are
#: names) and a trade's only text, ``reason``, is 64 characters: 5 x that is never reached by a
#: request the API takes, and a batch of over 10,000 ticks still gets its own "1..10000" message.
MAX_JSON_CONTAINERS = 5 * MAX_ROWS
#: Values (and keys) a body may hold beyond its containers, counted as its commas: 8 MiB of
#: ``0.5,0.5,...`` is 2 million floats, ~100 MB while json.loads builds them. The largest write
#: holds 70,000 commas (10,000 ticks of 7 fields, as objects or as columns; a trade's ``reason`` adds
#: 64 at most): 4 x that.
MAX_JSON_VALUES = 4 * MAX_TICKS * len(TICK_FIELDS)
