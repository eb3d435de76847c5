"""The numbers the API promises: the routes enforce them and the OpenAPI document
(:mod:`webapp.api.openapi`, :mod:`webapp.api.openapi_components`) states them, so both import them from here."""
from __future__ import annotations

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
