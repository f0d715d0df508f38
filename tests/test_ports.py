"""``meridian.ports``: ports outside the kernel's ephemeral range, leased across processes."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from meridian import ports


def test_ports_come_from_outside_the_ephemeral_range_and_are_free_for_tcp_and_udp() -> None:
    low, high = ports.ephemeral_range()
    taken = [ports.free_port() for _ in range(20)]
    assert len(set(taken)) == 20
    for port in taken:
        assert not low <= port <= high
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as sock:
                sock.bind(("127.0.0.1", port))


def test_a_leased_port_is_not_leased_by_another_process() -> None:
    port = ports.free_port()
    probe = (
        "from meridian import ports; "
        f"fd = ports._lease({port}); print('free' if fd is not None else 'held')"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "held", out.stderr


@pytest.mark.parametrize(
    ("ephemeral", "expected"),
    [((32768, 60999), (10000, 32767)), ((1024, 60000), (60001, 65535))],
)
def test_the_band_avoids_the_ephemeral_range(
    ephemeral: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert ports.band(ephemeral) == expected


def test_no_room_is_said() -> None:
    with pytest.raises(RuntimeError, match="ephemeral"):
        ports.band((1024, 65000))
