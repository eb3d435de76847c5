"""The server's clock, read seldom: what several hosts on one PostgreSQL database date shared records by.

Each host's wall clock may be off by minutes or hours (one kept in local time, a host without NTP),
and the records every host writes and reads by time (the writer's record of applied requests, the
jobs' runs) went by the clock of the host at hand: another host's were then hours old when just made,
or ahead of now when a moment old. So on a server they go by its clock. Read once a query per use
would cost a round trip per writer batch; a :class:`ServerClock` keeps this host's offset from it
instead, read again once a minute, and at once when this host's wall clock strays from its monotonic
one (a step of it, either way, is not taken for the server's).
"""
from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy.engine import Connection

#: The server's own clock, in epoch ms.
_SERVER_NOW_MS = "SELECT CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT)"
#: Seconds between two reads of the server's clock.
READ_EVERY_S = 60.0
#: How far this host's wall clock may stray from its monotonic one since the last read (ms) before the
#: server's is read again.
STRAY_MS = 1_000


def server_now_ms(conn: Connection) -> int:
    """The PostgreSQL server's clock now, in epoch ms (one small query on ``conn``)."""
    return int(conn.exec_driver_sql(_SERVER_NOW_MS).scalar_one())


class ServerClock:
    """This host's wall clock (``wall_clock``, epoch s) plus its offset from the server's (``read``, on a
    connection): :meth:`stale` says when to :meth:`read` it again; :meth:`now_ms` goes by the last one
    read (none yet: this host's clock)."""

    def __init__(self, wall_clock: Callable[[], float] = time.time,
                 read: Callable[[Connection], int] = server_now_ms) -> None:
        self._wall_clock, self._read = wall_clock, read
        #: The offset (ms), and this host's wall (ms) and monotonic clocks when it was read.
        self._offset: tuple[int, int, float] | None = None

    def stale(self) -> bool:
        """Whether the offset is to be read again: never read, a minute old, or this host's clock strayed."""
        if self._offset is None:
            return True
        offset, wall, mono = self._offset
        elapsed = time.monotonic() - mono
        return elapsed >= READ_EVERY_S or abs(self._wall_ms() - wall - int(elapsed * 1000)) > STRAY_MS

    def read(self, conn: Connection | None) -> None:
        """Read the server's clock on ``conn``; None (the server does not answer now): go on from the
        server's clock as last read, by the monotonic clock (not the offset from this host's wall clock,
        which a step of it, that made the read, moved by as much), and ask again once it is stale again."""
        wall = self._wall_ms()
        if conn is None:
            offset = 0
            if self._offset is not None:
                last, wall_then, mono_then = self._offset
                offset = wall_then + last + int((time.monotonic() - mono_then) * 1000) - wall
        else:
            offset = self._read(conn) - wall
        self._offset = (offset, wall, time.monotonic())

    def now_ms(self) -> int:
        """Now by the server's clock, as far as this host knows it (ms)."""
        return self._wall_ms() + (self._offset[0] if self._offset is not None else 0)

    def _wall_ms(self) -> int:
        return int(self._wall_clock() * 1000)
