"""A request as the writer's threads hold it (:class:`Request`): taken from the wire by the IO thread
(:mod:`workers.intake`), run in a batch by the commit thread (:mod:`workers.commit`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from db.protocol import request_digest


@dataclass
class Request:
    ident: bytes
    cid: str
    seq: int
    op: str
    args: Any
    #: The most memory it may hold, as :func:`db.protocol.decode_request` estimates it.
    cost: int = 0
    #: What it asks for (:func:`db.protocol.request_digest`), recorded with it as applied. Made with
    #: the request, on the IO thread: the commit thread, the writer's bottleneck, only compares it.
    digest: bytes | None = None

    def __post_init__(self) -> None:
        if self.digest is None:
            self.digest = request_digest(self.op, self.args)
