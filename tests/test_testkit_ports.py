"""The harness's free ports: ``make test`` runs two pytest processes side by side, and a port one
of them was given must never be given to the other (its server may not have bound it yet)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from testkit.env import FIRST_PORT, ROOT, _claim, ephemeral_range, free_port, free_udp_port, port_stretch

pytestmark = pytest.mark.database_independent(
    "it checks the harness's own port allocation, and starts no stack")

HOLDER = """
import sys
from testkit.env import free_port, free_udp_port
print(*(free_port() for _ in range(20)), free_udp_port(), flush=True)
sys.stdin.read()  # hold them until told to exit
"""


def test_a_port_given_to_one_process_is_never_given_to_another_while_it_lives() -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        *tcp, udp = (int(p) for p in holder.stdout.readline().split())  # type: ignore[union-attr]
        assert len(set(tcp)) == 20
        assert not any(_claim("tcp", p) for p in tcp) and not _claim("udp", udp)
        mine = {free_port() for _ in range(50)}
        assert len(mine) == 50 and not mine & set(tcp) and free_udp_port() != udp
    finally:
        holder.communicate("", timeout=30)
    assert _claim("tcp", tcp[0]) and not _claim("tcp", tcp[0])  # free once it exited; then ours alone


def test_ports_are_given_from_outside_the_kernels_ephemeral_range() -> None:
    """The kernel draws outgoing connections' source ports from its ephemeral range: a port handed
    out from there could be taken by a client's connection before its server binds it."""
    low, high = ephemeral_range()
    assert port_stretch(low, high) is not None, (f"the ephemeral range {low}-{high} leaves no 1,000 ports outside "
                                                 "it: a port given here may be taken by a client connection")
    given = [free_port() for _ in range(30)] + [free_udp_port() for _ in range(5)]
    assert not any(low <= p <= high for p in given), ((low, high), given)
    # Below the range where it leaves room, else above it, else (no room) the kernel's own pick.
    assert port_stretch(32768, 60999) == (FIRST_PORT, 32768)
    assert port_stretch(10500, 60999) == (61000, 65536)
    assert port_stretch(5000, 9000) == (FIRST_PORT, 65536)
    assert port_stretch(1024, 64999) is None
