"""Shared rate limits (``edge.ratelimit_redis``) against a real redis-server: two pipelines (two
instances of a POP) draw on one budget; Redis gone or stalled -> each limits on its own, and
says so."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from edge.cache.testing import RedisServer
from edge.ratelimit import Gcra
from edge.ratelimit_redis import SCRIPT, redis_key
from tests.health_support import captured_logs
from tests.stage_support import Reply, World, make_config, world
from tests.test_cache_redis import until
from tests.test_front_http1 import CACHEABLE, TICKER, responses
from tests.test_front_ratelimit import GET, Peer, scrape


class RedisPeer(Peer):
    """A ``Peer`` whose requests may wait on Redis: real I/O, so it waits in real time."""

    async def get(self, data: bytes = GET) -> tuple[int, dict[bytes, bytes], bytes]:
        before = len(responses(bytes(self.transport.written)))
        self.connection.data_received(data)
        await asyncio.wait_for(_answered(self, before + 1), timeout=5.0)
        return responses(bytes(self.transport.written))[-1]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


def shared_world(server: RedisServer, **limit: Any) -> World:
    config = make_config(
        cache={"redis_url": server.url, "redis_timeout": "200ms"},
        rate_limits={"api": {"rate": "1/m", "burst": 3, "shared": True, **limit}},
    )
    return world({"http://u1": [Reply(headers=CACHEABLE, chunks=(TICKER,))]}, config=config)


def fallbacks(w: World) -> float:
    total = 0.0
    for family in w.pipeline.metrics.registry.collect():
        if family.name == "meridian_edge_rate_limit_fallbacks":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


async def test_two_instances_share_one_budget(server: RedisServer) -> None:
    one, two = shared_world(server), shared_world(server)
    a1, a2 = RedisPeer(one, "192.0.2.1"), RedisPeer(two, "192.0.2.1")
    # The same client on two instances: three requests in all, hits included.
    assert (await a1.get())[0] == 200
    assert (await a2.get())[0] == 200
    assert (await a1.get())[0] == 200  # a hit, decided through Redis like the rest
    status, headers, _ = await a2.get()
    assert status == 429
    assert headers[b"ratelimit"].startswith(b'"api";r=0;t=')
    assert (await a1.get())[0] == 429
    # Another client is untouched on either instance.
    assert (await RedisPeer(one, "192.0.2.2").get())[0] == 200
    assert fallbacks(one) == fallbacks(two) == 0
    keys = redis.Redis.from_url(server.url).keys("meridian:rl:*")
    assert len(keys) == 2 and all(b"{api:" in key for key in keys)  # hash-tagged
    for w in (one, two):
        await w.pipeline.limiter.aclose()


async def test_installed_limits_open_redis_before_the_first_request(server: RedisServer) -> None:
    """The edge builds its limits when it installs a config: a shared one then connects and
    loads its script at once, so the first decisions do not pay both inside their deadline."""
    w = shared_world(server)
    sha = hashlib.sha1(SCRIPT.encode()).hexdigest()
    client = redis.Redis.from_url(server.url)
    assert not client.script_exists(sha)[0]
    w.pipeline.limiter.current(w.pipeline.state)
    await until(lambda: bool(client.script_exists(sha)[0]))
    assert (await RedisPeer(w, "192.0.2.1").get())[0] == 200
    assert fallbacks(w) == 0
    await w.pipeline.limiter.aclose()


async def test_redis_gone_each_instance_limits_alone_and_says_so(server: RedisServer) -> None:
    w = shared_world(server)
    peer = RedisPeer(w, "192.0.2.1")
    assert (await peer.get())[0] == 200  # through Redis
    server.kill()
    with captured_logs() as events:
        statuses = [(await peer.get())[0] for _ in range(4)]
        lines = [e for e in events() if e["event"] == "rate_limit_local_fallback"]
    # The local table starts full: three more, then refused -- limited, never unlimited.
    assert statuses == [200, 200, 200, 429]
    assert fallbacks(w) == 4
    assert len(lines) == 1 and lines[0]["limit"] == "api"  # once per interval
    await w.pipeline.limiter.aclose()


async def test_a_stalled_redis_costs_at_most_its_timeout(server: RedisServer) -> None:
    w = shared_world(server)
    peer = RedisPeer(w, "192.0.2.1")
    assert (await peer.get())[0] == 200
    server.pause()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        peer.connection.data_received(b"GET /api/ticker HTTP/1.1\r\nHost: example.test\r\n\r\n")
        await asyncio.wait_for(_answered(peer, 2), timeout=5.0)
        assert loop.time() - started < 1.0  # the 200 ms deadline, not Redis's stall
        assert fallbacks(w) == 1
        counts = scrape(w)
        assert counts[("api", "market", "allowed")] == 2
    finally:
        server.resume()
    await w.pipeline.limiter.aclose()


async def _answered(peer: Peer, count: int) -> None:
    # The answer waits on Redis's socket: polling the fake transport is the simplest wait.
    while len(responses(bytes(peer.transport.written))) < count:  # noqa: ASYNC110
        await asyncio.sleep(0.005)


def test_the_script_is_gcra(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url)
    gcra = Gcra(1 / 60, 3, 10)
    key = redis_key("api", 42)
    args = (repr(gcra.interval), repr(gcra.span))
    replies = [client.eval(SCRIPT, 1, key, *args) for _ in range(4)]
    assert [int(r[0]) for r in replies] == [1, 1, 1, 0]
    wait = float(replies[3][1])
    assert 55.0 < wait <= 60.0  # one interval, less the time the calls took
    ttl = client.pttl(key)
    assert 0 < ttl <= 180_001  # expires once the burst is back
    assert redis_key("api", (b"h", b"k\xff")) == "meridian:rl:{api:h6bff}"
    assert redis_key("api", (7, b"k")) == "meridian:rl:{api:n7:6b}"
