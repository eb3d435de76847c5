"""Parsing of request text the API and the console share (query strings, path segments).

Text from a URL is not JSON, so the writer's validators (:mod:`db.validation`, which check typed
JSON values) cannot read it; what turns such text into a value is here, once. Failures raise
:class:`~db.errors.ValidationError` with the one message, which each app turns into its own 400.
"""
from __future__ import annotations

from db.errors import ValidationError
from db.validation import shown

#: Digits in the largest 64-bit integer: longer input is refused before ``int()`` has to read it.
MAX_DIGITS = 19


def parse_int(name: str, raw: str, minimum: int, maximum: int, what: str = "an integer") -> int:
    """``raw`` as an integer in ``minimum..maximum``. Only ASCII digits with an optional leading
    ``-`` are read (no spaces, ``+`` or ``_``, which ``int()`` would take), so what is accepted is
    exactly what the messages and the OpenAPI document say. ``what`` names the expected value in the
    message ("epoch milliseconds (an integer)")."""
    digits = raw[1:] if raw.startswith("-") else raw
    if not (digits.isascii() and digits.isdigit() and len(digits) <= MAX_DIGITS):
        raise ValidationError(f"{name}: {shown(raw)} is not {what}")
    value = int(raw)
    if not minimum <= value <= maximum:
        raise ValidationError(f"{name}: {value} is out of range {minimum}..{maximum}")
    return value
