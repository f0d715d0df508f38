"""The streams benchmark's own readings (``benchmarks.streams``): a core's busy share with the
kernel's softirq work, the bytes left unread in the edge's upstream sockets, the origin's
lateness histogram, which side limited a run, the loopback steering it may set, and the frames
a load generator's clients hold unread."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import sys
import termios
from pathlib import Path
from typing import Any

import pytest

from benchmarks.streams import (
    connect,
    core_shares,
    core_ticks,
    limited_by,
    loopback_rx_on,
    ms_quantile,
    ss_unread,
    unread_frames,
)
from edge.streams.frames import text_frame
from meridian.origin_streams import LATE_CAP_MS, Lateness

STAT = """cpu  100 0 100 800 0 0 20 0 0 0
cpu0 60 0 30 100 10 0 15 0 7 0
cpu1 40 0 70 700 0 0 5 0 0 0
intr 1 2 3
"""


def test_core_ticks_count_softirq_as_busy_and_idle_and_iowait_as_not() -> None:
    # user nice system idle iowait irq softirq steal (guest, already in user, not added)
    assert core_ticks(STAT, 0) == (60 + 30 + 15, 15, 60 + 30 + 100 + 10 + 15)
    assert core_ticks(STAT, 1) == (40 + 70 + 5, 5, 40 + 70 + 700 + 5)
    with pytest.raises(ValueError, match="cpu2"):
        core_ticks(STAT, 2)


def test_core_shares_are_the_window_between_two_readings() -> None:
    assert core_shares((100, 10, 1000), (190, 30, 1100)) == (0.9, 0.2)
    assert core_shares((5, 1, 10), (5, 1, 10)) == (0.0, 0.0)


def test_unread_bytes_are_the_receive_queues_of_the_listed_sockets() -> None:
    listing = (
        "0      0      127.0.0.1:40001 127.0.0.1:9000\n"
        "2920   0      127.0.0.1:40002 127.0.0.1:9000\n"
        "145    17     127.0.0.1:40003 127.0.0.1:9000\n"
        "\n"
    )
    assert ss_unread(listing) == 2920 + 145
    assert ss_unread("") == 0


def test_ms_quantile_reads_only_the_window() -> None:
    before = {"0": 50, "1": 0, "250": 1000}  # the late ones came before the window
    after = {"0": 149, "1": 0, "2": 1, "250": 1000}
    assert ms_quantile(before, after, 0.5) == 1.0
    assert ms_quantile(before, after, 0.99) == 1.0
    assert ms_quantile(before, after, 1.0) == 3.0
    assert ms_quantile(after, after, 0.5) != ms_quantile(after, after, 0.5)  # nan: no counts


def _figures(**values: Any) -> dict[str, Any]:
    return {"expected_rate": 1000, "rate": 1000.0, **values}


def test_a_server_whose_core_is_full_with_softirq_is_the_limit() -> None:
    # 82% for the process alone looked like headroom; the core's softirq fills the rest.
    full = _figures(server_cpu_share=0.82, edge_core_softirq_share=0.15)
    assert limited_by(full) == "server (its core full: its own 82%, softirq 15%)"
    assert limited_by(_figures(server_cpu_share=0.82, edge_core_softirq_share=0.02)) == "none"


def test_limited_by_names_every_saturated_side() -> None:
    both = _figures(server_cpu_share=0.9, edge_core_softirq_share=0.1, core1_busy_share=0.99)
    assert limited_by(both).split("; ")[0].startswith("the load generators' core")
    assert limited_by(both).split("; ")[1].startswith("server")
    assert limited_by(_figures(loadgen_cpu_share=0.95)).startswith("load generator (")
    waited = _figures(server_cpu_share=0.5, server_cpu_wait_share=0.3)
    assert limited_by(waited).startswith("CPU contention (the server waited for a CPU 30%")
    short = _figures(server_cpu_share=0.5, rate=500.0)
    assert limited_by(short).startswith("neither at a full core")


def test_loopback_steering_is_set_for_the_block_and_put_back(tmp_path: Path) -> None:
    control = tmp_path / "rps_cpus"
    control.write_text("0\n")
    with loopback_rx_on(1, control):
        assert control.read_text() == "2\n"
    assert control.read_text() == "0\n"
    with pytest.raises(RuntimeError), loopback_rx_on(3, control):
        assert control.read_text() == "8\n"
        raise RuntimeError("the run failed")
    assert control.read_text() == "0\n"
    with loopback_rx_on(None, control):
        assert control.read_text() == "0\n"


def test_origin_lateness_is_counted_per_millisecond_and_bounded() -> None:
    late = Lateness()
    late.record(0.0004)
    late.record(0.0016, 3)
    late.record(-0.5)  # a clock step back: counted as on time
    late.record(3600.0)  # a suspended process: the last bucket
    assert late.snapshot() == {"0": 2, "1": 3, str(LATE_CAP_MS): 1}


async def test_frames_waiting_unread_in_a_clients_socket_are_counted() -> None:
    """A client read only once many bytes wait (SO_RCVLOWAT) holds frames the window would
    otherwise miss or count late: they are counted from the socket's unread bytes."""
    frame = text_frame(b"x" * 141)
    more = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + frame * 4)
        await more.wait()
        writer.write(frame * 6)
        await writer.drain()
        await reader.read()  # until the client closes

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await connect(port, keep=False)
    try:
        await client.wait_for(4, within=5.0)
        assert client.transport is not None
        sock = client.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1 << 20)  # nothing more is read
        assert unread_frames([client]) == 0.0
        more.set()
        for _ in range(500):
            waiting = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
            if int.from_bytes(waiting, sys.byteorder) == 6 * len(frame):
                break
            await asyncio.sleep(0.01)
        assert client.received == 4
        assert unread_frames([client]) == 6.0
        assert unread_frames([]) == 0.0
    finally:
        assert client.transport is not None
        client.transport.close()
        server.close()
        await server.wait_closed()
