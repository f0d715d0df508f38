"""Purges during a Redis stall (issue 21, 8): two HttpCache instances sharing a real redis-server
that the test stops (SIGSTOP: Redis accepts connections and answers nothing) and resumes.

Before: the purge's Redis half (delete from L2, broadcast) failed once and was dropped: the
other instance kept serving its copy, and the copy stayed in Redis to refill any instance.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest

from edge.cache import HttpCache, LookupKind
from edge.cache.purge_queue import PurgeBacklog
from edge.cache.redis_l2 import CircuitBreaker, RedisL2
from edge.cache.testing import FakeClock, RedisServer
from meridian.config import CacheConfig
from tests.test_cache_redis import RULES, TIMEOUT, Monotonic, Pop, raw, until

SYMBOLS = b"/api/v1/symbols"
SYMBOLS_URL = "https://api.example/api/v1/symbols"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


def _pop(url: str, clock: FakeClock, backlog_delay: float | None = None) -> Pop:
    pop = Pop(url, clock, Monotonic())
    if backlog_delay is not None:
        # The same pop, its first instance retrying only after ``backlog_delay`` seconds.
        config = CacheConfig(redis_url=url, redis_timeout=TIMEOUT, rules=RULES, lock_timeout=2.0)
        pop.caches[0] = HttpCache(
            config,
            clock=clock,
            l2=RedisL2(
                url,
                timeout=TIMEOUT,
                max_value=config.redis_max_value,
                clock=clock,
                instance_id="edge-a",
                breaker=CircuitBreaker(threshold=3, cooldown=30.0),
            ),
            purge_backlog=PurgeBacklog(min_delay=backlog_delay, max_delay=backlog_delay),
        )
    return pop


@pytest.fixture
async def pop(server: RedisServer) -> AsyncIterator[Pop]:
    running = _pop(server.url, FakeClock(time.time()))
    await running.start()
    try:
        yield running
    finally:
        server.resume()
        await running.close()


async def _spread(pop: Pop, path: bytes) -> None:
    """``path`` stored by a, shared through Redis, held in b's L1."""
    a, b = pop.caches
    assert (await pop.request(a, path))[0] == "MISS"
    await a.drain()
    assert (await pop.request(b, path))[0] == "HIT"
    assert (await pop.request(b, path))[0] == "hit"


async def test_a_purge_during_a_stall_reaches_redis_and_the_other_instance_after_it(
    pop: Pop, server: RedisServer
) -> None:
    a, b = pop.caches
    pop.origin.body = b"old"
    await _spread(pop, SYMBOLS)
    pop.origin.body = b"new"

    server.pause()
    started = time.monotonic()
    result = await a.purges.purge_url(SYMBOLS_URL)
    answered = time.monotonic() - started
    assert (result.local, result.propagated, result.queued) == (1, False, True)
    assert len(a.purges.backlog) == 1
    assert answered < 1.0  # the admin answer does not wait for Redis
    # During the stall b cannot be told (Redis is the POP's only channel): its copy stays.
    assert await pop.request(b, SYMBOLS) == ("hit", b"old")
    # Several retries fail meanwhile (each takes Redis for stalled after SOCKET_TIMEOUT).
    await until(lambda: a.metrics.purge_retries >= 2, within=3.0)
    assert len(a.purges.backlog) == 1

    server.resume()
    resumed = time.monotonic()
    await until(lambda: len(b.store) == 0 and not a.purges.backlog, within=5.0)
    print(f"\npurge reached b {time.monotonic() - resumed:.2f} s after Redis resumed")
    assert raw(server).keys(b"meridian:cache:e:*") == []  # deleted from L2, not refillable
    assert await pop.request(b, SYMBOLS) == ("MISS", b"new")
    assert await pop.request(a, SYMBOLS) in (("MISS", b"new"), ("HIT", b"new"))


async def test_purges_pile_up_coalesced_and_bounded_during_a_stall(
    pop: Pop, server: RedisServer
) -> None:
    a, b = pop.caches
    await _spread(pop, SYMBOLS)
    server.pause()
    for _ in range(3):
        assert (await a.purges.purge_url(SYMBOLS_URL)).queued
    assert a.invalidate(b"POST", 204, b"https", b"api.example", SYMBOLS, []) == 0
    await a.drain()  # the invalidation's own attempt fails after one Redis timeout
    assert len(a.purges.backlog) == 1  # four purges of one URL: one pending item
    server.resume()
    await until(lambda: len(b.store) == 0 and not a.purges.backlog, within=5.0)


async def test_a_pending_purge_keeps_the_l2_copy_out_after_the_race_window(
    server: RedisServer,
) -> None:
    """Redis comes back before the purge is retried (its retry is 60 s away here) and far
    more than the 30-s race window after it: the copy still in Redis is not used."""
    clock = FakeClock(time.time())
    pop = _pop(server.url, clock, backlog_delay=60.0)
    await pop.start()
    try:
        a = pop.caches[0]
        pop.origin.body = b"old"
        await _spread(pop, SYMBOLS)
        pop.origin.body = b"new"
        server.pause()
        result = await a.purges.purge_prefix("/api/v1/")
        assert result.queued and result.local == 1
        server.resume()
        clock.advance(120.0)  # still fresh (ttl 300 s): in Redis and usable
        assert raw(server).keys(b"meridian:cache:e:*") != []  # not deleted yet
        assert await pop.request(a, SYMBOLS) == ("MISS", b"new")
    finally:
        server.resume()
        await pop.close()


async def test_a_soft_purge_marks_the_other_instance_stale_and_leaves_l2_unread(
    pop: Pop, server: RedisServer
) -> None:
    a, b = pop.caches
    pop.origin.body = b"old"
    await _spread(pop, SYMBOLS)
    pop.origin.body = b"new"
    calls = pop.origin.calls
    result = await a.purges.purge_url(SYMBOLS_URL, soft=True)
    assert (result.local, result.shared, result.propagated) == (1, 0, True)

    def stale_in_b() -> bool:
        found = b.lookup(b"GET", b"https", b"api.example", SYMBOLS, [(b"host", b"api.example")])
        return found.kind is LookupKind.REVALIDATE

    await until(stale_in_b, within=5.0)
    assert len(b.store) == 1  # marked stale, not removed
    assert raw(server).keys(b"meridian:cache:e:*") != []  # L2 keeps its copy...
    pop.clock.advance(0.01)
    assert (await pop.request(b, SYMBOLS))[1] == b"new"  # ...but b does not take it for fresh
    assert pop.origin.calls == calls + 1
