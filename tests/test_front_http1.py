"""The HTTP/1.1 front end (``edge.protocol.EdgeConnection``) in memory: bytes in through
``data_received``, bytes out captured from a fake transport, the pipeline behind it scripted
(``tests.stage_support``).  Modelled on uvicorn's MockTransport tests."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.protocol import Connections, EdgeConnection
from tests.stage_support import FakeTransport, Reply, World, world

TICKER = b'{"symbol":"BTC-USD","price":"97000.12"}'
CACHEABLE = [(b"Content-Type", b"application/json"), (b"Cache-Control", b"max-age=60")]
GET = b"GET /api/ticker HTTP/1.1\r\nHost: example.test\r\n\r\n"


def responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Complete HTTP/1.1 responses in ``data`` (Content-Length or chunked bodies)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            size = int(headers[b"content-length"])
            body, data = rest[:size], rest[size:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                body, rest = body + rest[:size], rest[size + 2 :]
                if size == 0:
                    break
            data = rest
        else:
            body, data = rest, b""
        out.append((status, headers, body))
    return out


class Client:
    def __init__(self, w: World) -> None:
        self.world = w
        self.connections = Connections(w.pipeline, asyncio.get_running_loop())
        self.transport = FakeTransport()
        self.connection: EdgeConnection = self.connections.factory()
        self.connection.connection_made(self.transport)

    def send(self, data: bytes) -> None:
        self.connection.data_received(data)

    async def until(self, check: Callable[[], bool], turns: int = 200) -> None:
        for _ in range(turns):
            if check():
                return
            await asyncio.sleep(0)
        raise AssertionError(f"not reached; written: {bytes(self.transport.written)!r}")

    async def responses(self, count: int) -> list[tuple[int, dict[bytes, bytes], bytes]]:
        await self.until(lambda: len(responses(bytes(self.transport.written))) >= count)
        return responses(bytes(self.transport.written))

    def close(self) -> None:
        self.connection.connection_lost(None)


@pytest.fixture
async def client() -> Any:
    w = world({"http://u1": [Reply(headers=CACHEABLE, chunks=(TICKER,))]})
    c = Client(w)
    yield c
    c.close()


async def test_a_miss_then_a_hit_answered_inside_data_received(client: Client) -> None:
    client.send(GET)
    ((status, headers, body),) = await client.responses(1)
    assert status == 200 and body == TICKER and headers[b"x-cache"] == b"MISS"
    before = len(client.transport.written)
    client.send(GET)  # a hit: written before data_received returns, no task
    assert len(client.transport.written) > before
    status, headers, body = responses(bytes(client.transport.written))[1]
    assert headers[b"x-cache"] == b"HIT" and body == TICKER
    assert not client.transport.closed  # keep-alive
    assert len(client.world.upstream.sent) == 1


async def test_pipelined_requests_are_answered_in_order(client: Client) -> None:
    client.send(GET + b"GET /api/other HTTP/1.1\r\nHost: example.test\r\n\r\n" + GET)
    answers = await client.responses(3)
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [a[2] for a in answers] == [TICKER, TICKER, TICKER]
    assert [s.target for s in client.world.upstream.sent] == ["/api/ticker", "/api/other"]


async def test_connection_close_is_honoured(client: Client) -> None:
    client.send(b"GET /api/ticker HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
    ((status, headers, _),) = await client.responses(1)
    assert status == 200 and headers[b"connection"] == b"close"
    await client.until(lambda: client.transport.closed)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /api/ticker HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /api/ticker HTTP/1.1\r\nHost: example.test\r\nContent-Length: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"GET /api/ticker HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"\x00\x01garbage\r\n\r\n",
    ],
    ids=["two-hosts", "cl-and-te", "space-in-name", "garbage"],
)
async def test_a_malformed_request_is_a_400_and_the_connection_closes(
    client: Client, raw: bytes
) -> None:
    client.send(raw)
    ((status, headers, _),) = await client.responses(1)
    assert status == 400 and headers[b"connection"] == b"close"
    await client.until(lambda: client.transport.closed)
    assert client.world.upstream.sent == []


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=1, max_value=len(GET) - 1))
async def test_a_head_split_anywhere_is_the_same_request(client: Client, cut: int) -> None:
    # Warm the cache once, then every split of the same head is the same hit.
    if not client.world.upstream.sent:
        client.send(GET)
        await client.responses(1)
    before = len(responses(bytes(client.transport.written)))
    client.send(GET[:cut])
    client.send(GET[cut:])
    answers = await client.responses(before + 1)
    assert answers[-1][0] == 200 and answers[-1][2] == TICKER


async def test_a_closed_connection_is_freed_by_reference_counting_alone() -> None:
    # Its parser holds the connection's bound callbacks: a cycle, unless connection_lost
    # lets go of the parser.  With the cycle every closed connection (13 objects) waited for
    # the cyclic collector, in memory no longer in cache, instead of being freed at once.
    w = world({"http://u1": [Reply(headers=CACHEABLE, chunks=(TICKER,))]})
    gc.disable()
    try:
        c = Client(w)
        c.send(GET)
        await c.responses(1)
        gone = weakref.ref(c.connection)
        c.close()
        del c
        assert gone() is None
    finally:
        gc.enable()


async def _a_leader_and_its_waiter() -> tuple[World, asyncio.Event, Client, Client]:
    """Two clients asking for one key: the first leads the fill (the origin holds its answer
    until the event is set), the second waits on it."""
    gate = asyncio.Event()
    w = world({"http://u1": [Reply(headers=CACHEABLE, chunks=(TICKER,), gate=gate)]})
    cache = w.pipeline.cache
    assert cache is not None
    leader, waiter = Client(w), Client(w)
    leader.send(GET)
    await leader.until(lambda: len(w.upstream.sent) == 1)
    waiter.send(GET)
    await waiter.until(lambda: cache.metrics.coalesced_waiters == 1)
    return w, gate, leader, waiter


async def test_a_fill_leader_whose_client_goes_away_still_fills_for_its_waiters() -> None:
    # The leader's fetch runs in its own request task: its client going away must not cancel
    # it (``edge.cache.coalesce.leads_fill``), or the request waiting on it would fetch again.
    w, gate, leader, waiter = await _a_leader_and_its_waiter()
    leader.close()  # its client goes away while the origin is still answering
    gate.set()
    ((status, headers, body),) = await waiter.responses(1)
    assert status == 200 and body == TICKER and headers[b"x-cache"] == b"HIT"
    assert len(w.upstream.sent) == 1
    assert leader.transport.written == bytearray()  # nothing for the client that left
    third = Client(w)  # and the fill was stored
    third.send(GET)
    ((_, headers, body),) = await third.responses(1)
    assert headers[b"x-cache"] == b"HIT" and body == TICKER
    assert len(w.upstream.sent) == 1
    waiter.close()
    third.close()


async def test_a_fill_leader_past_its_deadline_is_cancelled_and_its_waiter_fetches() -> None:
    # The total deadline still ends a leader (its 504 goes out on time); the request waiting
    # on it then leads a fetch of its own.
    w, gate, leader, waiter = await _a_leader_and_its_waiter()
    leader.connection._response.request_deadline = 1.0  # long passed
    leader.connection.check_deadline(asyncio.get_running_loop().time())
    ((status, _, _),) = await leader.responses(1)
    assert status == 504
    await waiter.until(lambda: len(w.upstream.sent) == 2)
    gate.set()
    ((status, headers, body),) = await waiter.responses(1)
    assert status == 200 and body == TICKER and headers[b"x-cache"] == b"MISS"
    leader.close()
    waiter.close()
