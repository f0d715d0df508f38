"""Rate limits through the HTTP/1.1 front end in memory: requests in through ``data_received``
from several peers, bytes out of fake transports; the cache fills from a scripted upstream,
so every case covers hits answered on the fast path as well as misses."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client import CollectorRegistry

from edge.protocol import Connections, EdgeConnection
from edge.state import EdgeState
from tests.health_support import captured_logs
from tests.stage_support import FakeTransport, Reply, World, make_config, world
from tests.test_front_http1 import CACHEABLE, TICKER, responses

GET = b"GET /api/ticker HTTP/1.1\r\nHost: example.test\r\n\r\n"
UNCACHEABLE = [(b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store")]


class PeerTransport(FakeTransport):
    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 50000) if name == "peername" else default


class Peer:
    """One client connection from ``address``."""

    def __init__(self, w: World, address: str) -> None:
        self.connections = Connections(w.pipeline, asyncio.get_running_loop())
        self.transport = PeerTransport(address)
        self.connection: EdgeConnection = self.connections.factory()
        self.connection.connection_made(self.transport)

    async def get(self, data: bytes = GET) -> tuple[int, dict[bytes, bytes], bytes]:
        before = len(responses(bytes(self.transport.written)))
        self.connection.data_received(data)
        for _ in range(200):
            answered = responses(bytes(self.transport.written))
            if len(answered) > before:
                return answered[-1]
            await asyncio.sleep(0)
        raise AssertionError(f"no answer; written: {bytes(self.transport.written)!r}")

    def close(self) -> None:
        self.connection.connection_lost(None)


def limited_world(limit: dict[str, Any], headers: list[tuple[bytes, bytes]] = CACHEABLE) -> World:
    config = make_config(rate_limits={"api": limit})
    return world({"http://u1": [Reply(headers=headers, chunks=(TICKER,))]}, config=config)


def scrape(w: World) -> dict[tuple[str, str, str], float]:
    registry: CollectorRegistry = w.pipeline.metrics.registry
    found = {}
    for family in registry.collect():
        if family.name == "meridian_edge_rate_limit_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    labels = sample.labels
                    found[(labels["limit"], labels["route"], labels["outcome"])] = sample.value
    return found


async def test_over_its_rate_a_client_gets_429_with_the_fields_and_another_is_served() -> None:
    w = limited_world({"rate": "1/s", "burst": 3})
    a, b = Peer(w, "192.0.2.1"), Peer(w, "198.51.100.2")
    statuses = [(await a.get())[0] for _ in range(3)]
    assert statuses == [200, 200, 200]  # one fill, then hits on the fast path
    assert len(w.upstream.sent) == 1
    status, headers, body = await a.get()
    assert status == 429
    assert headers[b"retry-after"] == b"1"
    assert headers[b"ratelimit-policy"] == b'"api";q=3;w=3'
    assert headers[b"ratelimit"] == b'"api";r=0;t=1'
    assert headers[b"cache-control"] == b"no-store"
    assert headers[b"x-cache"] == b"BYPASS"
    assert json.loads(body)["reason"] == "rate_limited"
    assert headers.get(b"connection") != b"close"  # the connection stays usable
    assert not a.transport.closed
    # The other client on the same route is served from the cache, untouched.
    assert [(await b.get())[0] for _ in range(3)] == [200, 200, 200]
    assert len(w.upstream.sent) == 1  # nothing refused ever reached the origin
    # A second later the first client has one request again.
    w.clock.advance(1.0)
    assert (await a.get())[0] == 200
    assert (await a.get())[0] == 429
    counts = scrape(w)
    assert counts[("api", "market", "allowed")] == 7
    assert counts[("api", "market", "limited")] == 2
    a.close()
    b.close()


async def test_misses_are_limited_before_they_reach_the_origin() -> None:
    w = limited_world({"rate": "1/s", "burst": 2}, headers=UNCACHEABLE)
    peer = Peer(w, "192.0.2.1")
    assert [(await peer.get())[0] for _ in range(4)] == [200, 200, 429, 429]
    assert len(w.upstream.sent) == 2
    # A POST on the slow path too, and HEAD gets the head alone.
    post = b"POST /api/order HTTP/1.1\r\nHost: example.test\r\nContent-Length: 2\r\n\r\n{}"
    assert (await peer.get(post))[0] == 429
    peer.connection.data_received(b"HEAD /api/ticker HTTP/1.1\r\nHost: example.test\r\n\r\n")
    for _ in range(50):
        await asyncio.sleep(0)
    assert bytes(peer.transport.written).count(b"HTTP/1.1 429") >= 3
    assert len(w.upstream.sent) == 2
    peer.close()


async def test_dry_run_serves_everything_and_counts_what_it_would_refuse() -> None:
    w = limited_world({"rate": "1/s", "burst": 2, "dry_run": True})
    peer = Peer(w, "192.0.2.1")
    with captured_logs() as events:
        assert [(await peer.get())[0] for _ in range(6)] == [200] * 6
        lines = [e for e in events() if e["event"] == "rate_limit_would_refuse"]
    counts = scrape(w)
    assert counts[("api", "market", "allowed")] == 2
    assert counts[("api", "market", "would_limit")] == 4
    assert counts[("api", "market", "limited")] == 0
    # Logged once for the key in the interval, not once per request.
    assert len(lines) == 1 and lines[0]["client"] == "192.0.2.1"
    peer.close()


async def test_refusals_are_logged_once_per_client_per_interval() -> None:
    w = limited_world({"rate": "1/s", "burst": 1})
    a, b = Peer(w, "192.0.2.1"), Peer(w, "192.0.2.2")
    with captured_logs() as events:
        for peer in (a, b):
            for _ in range(5):
                await peer.get()
        w.clock.advance(11.0)  # past LOG_INTERVAL: the next refusal is logged with its count
        await a.get()
        await a.get()
        lines = [e for e in events() if e["event"] == "rate_limited"]
    assert [(e["client"], e["refused"]) for e in lines] == [
        ("192.0.2.1", 1),
        ("192.0.2.2", 1),
        ("192.0.2.1", 4),  # the three held back, and the one after the interval
    ]
    a.close()
    b.close()


async def test_allow_listed_clients_are_never_limited() -> None:
    w = limited_world({"rate": "1/s", "burst": 1, "allow": ["192.0.2.0/24"]})
    allowed, other = Peer(w, "192.0.2.77"), Peer(w, "203.0.113.5")
    assert [(await allowed.get())[0] for _ in range(10)] == [200] * 10
    assert [(await other.get())[0] for _ in range(2)] == [200, 429]
    assert scrape(w)[("api", "market", "exempt")] == 10
    allowed.close()
    other.close()


async def test_a_header_key_limits_the_key_not_the_address() -> None:
    w = limited_world({"rate": "1/s", "burst": 2, "key": "header", "header": "X-Api-Key"})
    with_key = b"GET /api/ticker HTTP/1.1\r\nHost: example.test\r\nX-Api-Key: %s\r\n\r\n"
    one, two, three = Peer(w, "192.0.2.1"), Peer(w, "192.0.2.2"), Peer(w, "192.0.2.3")
    assert (await one.get(with_key % b"k1"))[0] == 200
    assert (await two.get(with_key % b"k1"))[0] == 200
    assert (await three.get(with_key % b"k1"))[0] == 429  # k1 is spent, whoever sends it
    assert (await three.get(with_key % b"k2"))[0] == 200  # another key is untouched
    for peer in (one, two, three):
        peer.close()


async def test_a_limit_on_another_route_does_not_apply() -> None:
    config = make_config(
        routes=[
            {"name": "market", "service": "market", "path_prefix": "/api/"},
            {"name": "static", "service": "market", "path_prefix": "/static/"},
        ],
        rate_limits={"api": {"rate": "1/s", "burst": 1, "routes": ["static"]}},
    )
    w = world({"http://u1": [Reply(headers=CACHEABLE, chunks=(TICKER,))]}, config=config)
    peer = Peer(w, "192.0.2.1")
    assert [(await peer.get())[0] for _ in range(5)] == [200] * 5
    static = b"GET /static/app.js HTTP/1.1\r\nHost: example.test\r\n\r\n"
    assert [(await peer.get(static))[0] for _ in range(2)] == [200, 429]
    peer.close()


async def test_a_reload_keeps_the_state_of_an_unchanged_limit() -> None:
    w = limited_world({"rate": "1/s", "burst": 2})
    peer = Peer(w, "192.0.2.1")
    assert [(await peer.get())[0] for _ in range(3)] == [200, 200, 429]
    config = w.pipeline.state.config
    w.pipeline.state = EdgeState.build(config, "iad", 2)
    assert (await peer.get())[0] == 429  # no fresh burst for a reload
    changed = make_config(rate_limits={"api": {"rate": "1/s", "burst": 5}})
    w.pipeline.state = EdgeState.build(changed, "iad", 3)
    assert (await peer.get())[0] == 200  # a changed limit starts afresh
    w.pipeline.state = EdgeState.build(make_config(), "iad", 4)
    assert [(await peer.get())[0] for _ in range(10)] == [200] * 10  # and none at all
    peer.close()


async def test_a_websocket_handshake_over_the_rate_is_refused_before_any_upstream() -> None:
    w = limited_world({"rate": "1/m", "burst": 1})
    peer = Peer(w, "192.0.2.1")
    assert (await peer.get())[0] == 200
    peer.connection.data_received(
        b"GET /api/ws HTTP/1.1\r\nHost: example.test\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    for _ in range(50):
        if peer.transport.closed:
            break
        await asyncio.sleep(0)
    status, headers, _ = responses(bytes(peer.transport.written))[-1]
    assert status == 429 and headers[b"connection"] == b"close"
    assert headers[b"ratelimit"].startswith(b'"api";r=0;t=')
    assert peer.transport.closed
    assert len(w.upstream.sent) == 1  # the first GET's fill only
    peer.close()


async def test_http2_streams_are_limited_like_http1_requests() -> None:
    from tests.test_h2_front import Peer as H2Peer

    w = limited_world({"rate": "1/m", "burst": 2})
    peer = H2Peer(w)
    try:
        statuses = []
        for _ in range(3):
            stream = peer.get("/api/ticker")
            await peer.settle()
            headers, _, ended = peer.response(stream)
            assert ended
            statuses.append(headers[b":status"])
            if headers[b":status"] == b"429":
                assert headers[b"ratelimit-policy"] == b'"api";q=2;w=120'
                assert int(headers[b"retry-after"]) > 0
        assert statuses == [b"200", b"200", b"429"]  # a fill, a hit, then refused
        assert len(w.upstream.sent) == 1
    finally:
        peer.close()


async def test_requests_no_route_matches_count_against_limits_on_every_route() -> None:
    w = limited_world({"rate": "1/m", "burst": 2})
    peer = Peer(w, "192.0.2.1")
    nowhere = b"GET /elsewhere HTTP/1.1\r\nHost: example.test\r\n\r\n"
    assert [(await peer.get(nowhere))[0] for _ in range(3)] == [404, 404, 429]
    assert (await peer.get())[0] == 429  # one budget for the client, routed or not
    assert scrape(w)[("api", "-", "limited")] == 1
    # A limit scoped to routes leaves them alone.
    scoped = limited_world({"rate": "1/m", "burst": 1, "routes": ["market"]})
    other = Peer(scoped, "192.0.2.1")
    assert [(await other.get(nowhere))[0] for _ in range(3)] == [404] * 3
    peer.close()
    other.close()


async def test_the_hit_path_benchmark_checks_a_limit_that_never_bites() -> None:
    import gc

    from benchmarks.hitpath import measure

    thresholds = gc.get_threshold()
    try:
        # ``measure`` raises when a request was not a hit, or the limit was not checked or bit.
        figures = await measure(300, 10, 1, rate_limit=True)
    finally:
        # It tunes the collector as an edge worker does: not for the rest of the session.
        gc.set_threshold(*thresholds)
        gc.unfreeze()
    assert set(figures) == {"identity", "varied", "spread"}
