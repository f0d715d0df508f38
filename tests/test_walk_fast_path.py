"""The upstream walk's and client's short paths: the same answers as the general ones.

The walk takes a request's first attempt from a per-snapshot memo (``_live_in``) instead of
``next_attempt``; the client sends on a kept-alive connection without a coroutine of its own
(``Connection.begin``/``head_in``) and ``UpstreamPool.send`` returns the client's coroutine,
mapping errors through ``OriginClient.failure``.  In memory: scripted upstreams and fake
transports, no sockets, no sleeps."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.stages.walk import _first_pick, _live_in
from edge.upstream import FailureKind, UpstreamFailure, UpstreamPool, next_attempt
from edge.upstream_client import BackendPool, Connection
from edge.upstream_wire import encode_head
from meridian.config import EdgeTimeouts
from tests.stage_support import FakeSnapshot, FakeTransport, Reply, request, world

REGIONS = ("a", "b", "c")
BACKENDS = ("http://a1", "http://a2", "http://b1", "http://c1", "http://c2", "http://c3")


class Snapshot:
    """A health snapshot: usable backends per region, regions up or only ejected."""

    def __init__(self, usable: dict[str, tuple[str, ...]], up: set[str], ejected: set[str]):
        self.usable, self.up, self.ejected = usable, up, ejected

    def region_up(self, name: str) -> bool:
        return name in self.up

    def ejected_only(self, name: str) -> bool:
        return name in self.ejected

    def usable_backends(self, region: str) -> tuple[str, ...]:
        return self.usable.get(region, ())


SNAPSHOTS = st.builds(
    Snapshot,
    st.fixed_dictionaries(
        {
            region: st.lists(
                st.sampled_from([b for b in BACKENDS if b.startswith(f"http://{region}")]),
                unique=True,
            ).map(tuple)
            for region in REGIONS
        }
    ),
    st.sets(st.sampled_from(REGIONS)),
    st.sets(st.sampled_from(REGIONS)),
)


@settings(max_examples=300)
@given(
    SNAPSHOTS,
    st.lists(st.sampled_from(REGIONS), unique=True, min_size=1).map(tuple),
    st.dictionaries(st.sampled_from(BACKENDS), st.integers(0, 3)),
    st.integers(0, 2**32),
)
def test_the_memoised_first_attempt_is_next_attempts(
    health: Snapshot, names: tuple[str, ...], outstanding: dict[str, int], seed: int
) -> None:
    live = _live_in(names, health)
    regions = live[0]
    expected = next_attempt(regions, health, [], outstanding, random.Random(seed))
    assert _first_pick(live, outstanding, random.Random(seed)) == expected
    # Made once per snapshot: the same answer for every request while it lasts.
    if live[3] is not None:
        assert live[3] == expected


async def test_the_first_attempt_follows_each_new_health_snapshot() -> None:
    w = world({"http://u1": [Reply()], "http://e1": [Reply()]}, cached=False)
    regions = []
    for down in (frozenset(), frozenset({"http://u1"}), frozenset()):
        w.health.snapshot = FakeSnapshot(down)
        sink = await w.run(request())
        regions.append(sink.header(b"x-meridian-region"))
    assert regions == [b"us-east", b"eu-central", b"us-east"]
    assert [sent.backend for sent in w.upstream.sent] == ["http://u1", "http://e1", "http://u1"]


# -- the client's inline exchange -------------------------------------------------------------


class Origin(FakeTransport):
    """An upstream connection's transport answering each request written with ``reply()``
    (bytes, or None: closed without a word) on the loop's next turn."""

    def __init__(self, protocol: Connection, reply: Callable[[], bytes | None]) -> None:
        super().__init__(keep=True)
        self.protocol = protocol
        self.reply = reply
        self.requests: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.requests.append(bytes(data))
        answer = self.reply()
        loop = asyncio.get_running_loop()
        if answer is None:
            loop.call_soon(self.protocol.connection_lost, None)
        elif answer:
            loop.call_soon(self.protocol.data_received, answer)


class MemoryBackend(BackendPool):
    __slots__ = ("made", "reply")
    reply: Callable[[], bytes | None]
    made: list[Origin]

    async def connect(self) -> Connection:
        connection = Connection(self)
        transport = Origin(connection, self.reply)
        self.made.append(transport)
        connection.connection_made(transport)
        self.open.add(connection)
        return connection


def _pool(replies: list[bytes | None]) -> tuple[UpstreamPool, MemoryBackend]:
    upstream = UpstreamPool(pool_size=4, timeouts=EdgeTimeouts())
    client = upstream.client
    real = client.pool("http://o")
    pool = MemoryBackend(real.backend, real.limits, real.loop, client.stats)
    pool.reply = lambda: replies.pop(0)
    pool.made = []
    client._pools["http://o"] = pool
    return upstream, pool


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


async def test_a_kept_alive_connection_carries_the_next_request_inline() -> None:
    upstream, pool = _pool([OK, OK])
    for _ in range(2):
        response = await upstream.send("http://o", "GET", "/x", b"host: h\r\n", None)
        assert response.status == 200 and response.content.read_nowait() == b"hi"
        response.release()
    assert len(pool.made) == 1 and len(pool.made[0].requests) == 2
    assert upstream.client.stats.reused == {"http://o": 1}
    assert upstream.client.stats.first_byte_seconds["http://o"][1] == 2.0


async def test_a_stale_kept_alive_connection_is_retried_once_when_replayable_only() -> None:
    upstream, pool = _pool([OK, None, OK])
    (await upstream.send("http://o", "GET", "/x", b"", None)).release()
    response = await upstream.send("http://o", "GET", "/x", b"", None, replayable=True)
    assert response.status == 200 and len(pool.made) == 2
    response.release()
    assert upstream.client.stats.stale == {"http://o": 1}

    upstream, pool = _pool([OK, None])
    (await upstream.send("http://o", "POST", "/x", b"", b"{}")).release()
    with pytest.raises(UpstreamFailure) as failed:  # mapped by the client: the walk's kind
        await upstream.send("http://o", "POST", "/x", b"", b"{}")
    assert failed.value.kind is FailureKind.RESET  # never sent again
    assert len(pool.made) == 1


async def test_a_lying_origin_on_a_kept_alive_connection_is_a_protocol_failure() -> None:
    lying = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    upstream, pool = _pool([OK, lying])
    (await upstream.send("http://o", "GET", "/x", b"", None)).release()
    with pytest.raises(UpstreamFailure) as failed:
        await upstream.send("http://o", "GET", "/x", b"", None, replayable=True)
    assert failed.value.kind is FailureKind.PROTOCOL
    assert not pool.idle and not pool.open


async def test_a_cancelled_inline_exchange_closes_its_connection() -> None:
    upstream, pool = _pool([OK, b""])  # the second request is never answered
    (await upstream.send("http://o", "GET", "/x", b"", None)).release()
    task = asyncio.ensure_future(upstream.send("http://o", "GET", "/x", b"", None))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.made[0].closed and not pool.idle and not pool.open


async def test_the_first_byte_deadline_of_an_inline_exchange_is_a_timeout() -> None:
    upstream, pool = _pool([OK, b""])
    (await upstream.send("http://o", "GET", "/x", b"", None)).release()
    task = asyncio.ensure_future(upstream.send("http://o", "GET", "/x", b"", None))
    await asyncio.sleep(0)
    (connection,) = pool.open
    assert connection.deadline_kind == "first byte"
    pool.sweep(connection.due + 0.001)  # what the client's sweep does once it has passed
    with pytest.raises(UpstreamFailure) as failed:
        await task
    assert failed.value.kind is FailureKind.TIMEOUT
    assert not pool.open


def test_a_request_head_gets_the_backends_host_only_when_its_lines_carry_none() -> None:
    for lines in (b"host: a.test\r\nx: 1\r\n", b"x: 1\r\nhost: a.test\r\n"):
        head = encode_head(b"GET", b"/", lines, b"origin:8080", b"")
        assert head.count(b"host:") == 1 and b"origin:8080" not in head
    head = encode_head(b"GET", b"/", b"x-host: 1\r\n", b"origin:8080", b"")
    assert head == b"GET / HTTP/1.1\r\nhost: origin:8080\r\nx-host: 1\r\n\r\n"
