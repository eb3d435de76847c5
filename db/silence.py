"""What a writer's client says of a silence: a request its writer did not answer by its deadline
(:meth:`Silence.deadline_error`), and, while one goes on, that no writer runs in its home
(:meth:`Silence.tell`, a WARNING; the same words end the request's error). The client
(:class:`db.client.WriterClient`) sends, resends and reads; this words what it could not get."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from db.config import Settings
from db.errors import StorageFull, WriterError, WriterUnavailable
from db.inflight import Ticket
from db.lock import read_lock_holder
from db.protocol import UNRECORDED_OPS

log = logging.getLogger("tickstack.client")
#: Seconds without an answer after which a client says so when no writer runs in its home (a WARNING).
SAY_NO_WRITER_AFTER_S = 3.0
#: Seconds nobody must hold the writer lock, seen twice, before a client says no writer runs.
NO_WRITER_FOR_S = 2.0
#: What a request whose fate the client cannot know is said to be.
MAYBE_APPLIED = "may or may not have been applied (a retry with this client applies it at most once)"


class Silence:
    """The words of one client's silences, for the writer at ``endpoint`` of ``settings``' home."""

    def __init__(self, settings: Settings, endpoint: str) -> None:
        self.settings = settings
        self.endpoint = endpoint
        #: The writer lock of this home, whose holder is the writer at ``endpoint`` (None: another endpoint).
        self.lock_path: Path | None = settings.writer_lock_path if endpoint == settings.writer_endpoint else None
        #: Since when nobody holds it, as seen (:meth:`no_writer`); whether that was said in this silence.
        self.absent_since: float | None = None
        self.said = False

    def heard(self) -> None:
        """The writer answered: a later silence is said again."""
        self.said = False

    def tell(self, silent: float) -> None:
        """Requests unanswered for ``silent`` seconds: say once per silence, past
        :data:`SAY_NO_WRITER_AFTER_S`, when no writer runs. Said where a program that set up no logging
        sees it (Python prints a WARNING): a bot waited its whole deadline, a minute, without a word
        while the writer was stopped (a new user's run, round 40). After a few seconds: a restart's gap
        is not worth a line."""
        no_writer = self.no_writer()  # each silence: it counts NO_WRITER_FOR_S from the first
        if silent >= SAY_NO_WRITER_AFTER_S and not self.said and no_writer is not None:
            self.said = True
            log.warning("writer at %s: %s; requests wait for one until their deadline", self.endpoint, no_writer)

    def deadline_error(self, ticket: Ticket) -> WriterError:
        """What a request that passed its deadline raises: the writer's last
        retryable answer when it gave one (a full disk: StorageFull, with its
        reason) and every send of it was answered, else WriterUnavailable
        (whether it was applied is then not known, and said so)."""
        last = ticket.last_error
        waited = time.monotonic() - ticket.first_sent
        if last is not None and (ticket.awaiting or (ticket.went_unanswered and ticket.op not in UNRECORDED_OPS)):
            # Its last answer was to another send than one that may be with the writer, applied or about
            # to be: the one in flight (it said "not applied" and StorageFull, "nothing written", of a
            # request the writer then applied, and a caller who sent it again as a new request had it
            # twice), or one a silence left unanswered, whose later sends a writer refusing writes, or a
            # batch whose commit failed, answers without a look at its record (review, round 44).
            if ticket.awaiting:
                said, answer = (f"no answer from the writer at {self.endpoint} to its last send within its deadline "
                                f"({waited:.1f} s); it", "its answer to an earlier send")
            else:
                said, answer = (f"not answered by the writer at {self.endpoint} within its deadline ({waited:.1f} s): "
                                "a send of it went unanswered, so it", "its last answer")
            return WriterUnavailable(f"{ticket.op}: {said} {MAYBE_APPLIED}; {answer}: {type(last).__name__}: {last}")
        if isinstance(last, StorageFull):
            return StorageFull(f"{ticket.op}: {last} (still so after {waited:.1f} s of retries)")
        if last is not None:
            return WriterUnavailable(
                f"{ticket.op}: not applied by the writer at {self.endpoint} within its deadline ({waited:.1f} s); "
                f"its last answer: {type(last).__name__}: {last}")
        no_writer = self.no_writer()
        why = f" ({no_writer})" if no_writer is not None else ""
        if ticket.op in UNRECORDED_OPS:  # it changes nothing: whether it was applied is no question
            error = WriterUnavailable(f"{ticket.op}: no answer from the writer at {self.endpoint} within "
                                      f"{waited:.1f} s{why}")
        else:
            error = WriterUnavailable(f"{ticket.op}: no answer from the writer at {self.endpoint} within its "
                                      f"deadline{why}; it {MAYBE_APPLIED}")
        error.no_writer = no_writer is not None
        return error

    def no_writer(self) -> str | None:
        """Why nothing answers, when it is that no writer has run in this home (nobody held its lock) for
        :data:`NO_WRITER_FOR_S` at least, seen by this call and an earlier one (a writer circus is
        starting again after a crash is gone for a moment: review, round 40); None when one runs (it
        may be starting, busy or stuck) or the endpoint is another home's."""
        if self.lock_path is None or read_lock_holder(self.lock_path) is not None:
            self.absent_since = None
            return None
        now = time.monotonic()
        if self.absent_since is None:
            self.absent_since = now
        if now - self.absent_since < NO_WRITER_FOR_S:
            return None
        from db.circusd import MAKE_RUN, new_database_url_words, writer_restart_command
        from db.server_wait import last_refusal, public_words

        home = self.settings.home
        # What starts one: circusctl only where circusd runs (against none it timed out; a new user's
        # run, round 44), `make run` only where it does not (it refuses while circusd runs). Nothing
        # holds the lock: no writer runs, and circus is not asked.
        command = writer_restart_command(self.settings, writer_runs=False)
        stack = ", nor is the stack (no circusd)" if command == MAKE_RUN else ""
        start = f"start it ({command})"
        refused = last_refusal(self.settings)
        if refused is not None:
            # Why its last writer exited, naming no role nor database: this reaches /api/health (no login).
            what, fix = public_words(refused)
            return (f"no writer is running in {home}{stack}: at its last start, {what} (`python -m db doctor` and "
                    f"log/writer.log say more){': ' + fix if fix else ''}; then {start}"
                    f"{new_database_url_words(self.settings, fix or '')}")
        return f"no writer is running in {home} (nothing holds its lock {self.lock_path.name}){stack}: {start}"
