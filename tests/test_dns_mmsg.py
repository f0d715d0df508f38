"""GeoDNS's UDP a batch per system call (``geodns.mmsg``): real sockets, real kernel calls.

The batched read loop must answer exactly what the ``recvfrom``/``sendto`` loop answers, to
the same senders, and keep the hostile-input and full-send-buffer behaviour of the plain one.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from geodns import mmsg
from geodns.server import DnsServer
from meridian.config import HostPort
from meridian.lifecycle import ConfigHolder
from tests.dns_support import base_config, make_query, write_config

ZONE = "meridian.test"  # tests/dns_support.py's base_config
pytestmark = pytest.mark.skipif(not mmsg.AVAILABLE, reason="recvmmsg/sendmmsg need Linux")


def _pair(family: socket.AddressFamily, host: str) -> tuple[socket.socket, list[socket.socket]]:
    server = socket.socket(family, socket.SOCK_DGRAM)
    server.bind((host, 0))
    server.setblocking(False)
    clients = []
    for _ in range(3):
        client = socket.socket(family, socket.SOCK_DGRAM)
        client.bind((host, 0))
        client.settimeout(5.0)
        clients.append(client)
    return server, clients


@pytest.fixture(params=["v4", "v6"])
def sockets(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    family, host = (
        (socket.AF_INET, "127.0.0.1") if request.param == "v4" else (socket.AF_INET6, "::1")
    )
    try:
        server, clients = _pair(family, host)
    except OSError as exc:
        pytest.skip(f"{request.param} loopback unavailable: {exc}")
    yield server, clients
    for sock in (server, *clients):
        sock.close()


def _receive_all(batch: mmsg.DatagramBatch, expected: int) -> list[Any]:
    """Loopback delivers a datagram before ``sendto`` returns: every one is queued already."""
    got: list[Any] = []
    while len(got) < expected:
        count = batch.receive()
        assert count > 0, f"only {len(got)} of {expected} datagrams arrived"
        got.extend(batch.datagram(i) for i in range(count))
    return got


def test_a_batch_reads_each_datagram_and_its_sender_and_answers_each_sender(
    sockets: tuple[socket.socket, list[socket.socket]],
) -> None:
    server, clients = sockets
    batch = mmsg.DatagramBatch(server)
    sent = {}
    for n, client in enumerate(clients):
        for k in range(5):
            payload = bytes([n, k]) + b"q" * (k * 97)
            client.sendto(payload, server.getsockname()[:2])
            sent[payload] = client.getsockname()[:2]
    received = _receive_all(batch, len(sent))
    assert len(received) == len(sent)
    for data, (host, port, _slot) in received:
        assert sent[data] == (host, port)
    replies = [(b"R" + data, address) for data, address in received]
    assert batch.send(replies) == []
    for client in clients:
        answers = {client.recv(65535) for _ in range(5)}
        mine = {b"R" + d for d, a in sent.items() if a == client.getsockname()[:2]}
        assert answers == mine


def test_a_datagram_longer_than_a_slot_is_never_answered_as_if_whole(
    sockets: tuple[socket.socket, list[socket.socket]],
) -> None:
    server, clients = sockets
    batch = mmsg.DatagramBatch(server)
    clients[0].sendto(b"x" * (mmsg.SLOT_BYTES + 1), server.getsockname()[:2])
    clients[0].sendto(b"short", server.getsockname()[:2])
    received = _receive_all(batch, 2)
    assert received[0] is None and batch.truncated == 1
    assert received[1] is not None and received[1][0] == b"short"


def test_a_reply_longer_than_a_slot_is_handed_back_for_the_plain_call(
    sockets: tuple[socket.socket, list[socket.socket]],
) -> None:
    server, clients = sockets
    batch = mmsg.DatagramBatch(server)
    clients[0].sendto(b"a", server.getsockname()[:2])
    clients[1].sendto(b"b", server.getsockname()[:2])
    (_, first), (_, second) = _receive_all(batch, 2)
    failed = batch.send([(b"x" * (mmsg.SLOT_BYTES + 1), first), (b"ok", second)])
    assert failed == [(0, 0)]
    assert clients[1].recv(100) == b"ok"


def _queries() -> list[bytes]:
    """Every shape the UDP path distinguishes: memoized, ECS (IPv4, IPv6, scope set),
    no ECS, other types, unknown names, and garbage."""
    wires: list[bytes] = []
    for i, ecs in enumerate(
        [None, "1.1.1.0/24", "200.160.2.0/24", "2001:db8::/56", "81.2.69.0/24", "1.1.1.0/24"]
    ):
        for name, rdtype in ((f"api.{ZONE}", "A"), (f"api.{ZONE}", "AAAA"), (ZONE, "SOA")):
            query = make_query(name, rdtype, ecs=ecs)
            query.id = 1000 + len(wires) + i
            wires.append(query.to_wire())
    nowhere = make_query(f"nowhere.{ZONE}")
    nowhere.id = 7
    wires.append(nowhere.to_wire())
    wires += [b"\x00\x09" + b"\xff" * 10, b"\x00\x0a", b"\x00\x0b\x01\x00\x00\x01" + b"\x00" * 30]
    return wires


async def _answers(tmp_path: Path, batched: bool) -> dict[int, bytes]:
    config = base_config()
    holder = ConfigHolder.from_file(str(write_config(tmp_path / f"b{batched}.yaml", config)))
    server = DnsServer(holder, "iad", listen=HostPort("127.0.0.1", 0), admin=None, tcp=False)
    server.batch_syscalls = batched
    await server.start()
    assert (server._batch is not None) is batched
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    answers: dict[int, bytes] = {}
    try:
        assert server.udp_address is not None
        for _ in range(2):  # the second pass is answered from the memos
            for wire in _queries():
                client.sendto(wire, server.udp_address)
            while True:
                try:
                    reply = await asyncio.wait_for(loop.sock_recv(client, 65535), 1.0)
                except TimeoutError:
                    break
                ident = int.from_bytes(reply[:2], "big")
                assert answers.setdefault(ident, reply) == reply
    finally:
        client.close()
        await server.stop()
    return answers


async def test_the_batched_loop_answers_byte_for_byte_what_the_plain_loop_answers(
    tmp_path: Path,
) -> None:
    plain = await _answers(tmp_path, batched=False)
    batched = await _answers(tmp_path, batched=True)
    assert len(plain) >= 18  # every well-formed query and the FORMERR-able garbage answered
    assert batched == plain


def test_answer_writes_memoized_and_computed_replies_over_their_queries(
    sockets: tuple[socket.socket, list[socket.socket]],
) -> None:
    """``DatagramBatch.answer``: a reply keeps its query's first two bytes (the DNS ID) and
    goes to its own sender, from the shared memo, the per-sender memo or ``compute``; a
    datagram without a reply moves the later ones down; a reply longer than a slot is handed
    back for ``sendto``."""
    server, clients = sockets
    batch = mmsg.DatagramBatch(server)
    target = server.getsockname()[:2]
    clients[0].sendto(b"\x00\x01drop", target)  # compute says: no reply
    clients[1].sendto(b"\x00\x02shared", target)
    clients[2].sendto(b"\x00\x03mine", target)
    clients[0].sendto(b"\x00\x04new", target)
    clients[1].sendto(b"\x00\x05huge", target)
    clients[1].sendto(b"\x00\x06mine", target)  # the same address: the same memo (by host)
    raw = [
        socket.inet_pton(server.family, client.getsockname()[0])
        for client in (clients[0], clients[1], clients[2])
    ]
    senders = [
        int.from_bytes(address, sys.byteorder) if server.family == socket.AF_INET else address
        for address in raw
    ]
    shared = {b"shared": (b"S", 0)}
    by_sender: dict[tuple[bytes, Any], tuple[bytes, int]] = {(b"mine", senders[2]): (b"M", 1)}
    hits = [0, 0]
    asked: list[tuple[bytes, Any]] = []

    def compute(i: int, key: bytes, sender: Any) -> bytes | None:
        asked.append((key, sender))
        data = batch.datagram(i)
        assert data is not None and data[0][2:] == key
        if key == b"drop":
            return None
        if key == b"huge":
            return b"h" * mmsg.SLOT_BYTES
        return b"C" + key

    got, unsent = batch.answer(shared, by_sender, hits, compute)
    assert got == 6
    assert asked == [
        (b"drop", senders[0]),
        (b"new", senders[0]),
        (b"huge", senders[1]),
    ]
    assert senders[1] == senders[2]  # loopback: one address, several ports
    assert hits == [1, 2]
    assert [(reply, address[0]) for reply, address, _ in unsent] == [
        (b"\x00\x05" + b"h" * mmsg.SLOT_BYTES, clients[1].getsockname()[0])
    ]
    assert unsent[0][1][1] == clients[1].getsockname()[1] and unsent[0][2] == 0
    assert clients[0].recv(100) == b"\x00\x04Cnew"
    assert {clients[1].recv(100) for _ in range(2)} == {b"\x00\x02S", b"\x00\x06M"}
    assert clients[2].recv(100) == b"\x00\x03M"
