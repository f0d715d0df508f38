"""L2 in a real redis-server: sharing between instances, breaker, purge propagation, codec."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from edge.cache import HttpCache, LookupKind, UpstreamResponse
from edge.cache.entry import StoredResponse
from edge.cache.policy import Freshness
from edge.cache.redis_guard import Backlogged, Unhurried
from edge.cache.redis_l2 import (
    CircuitBreaker,
    DecodeError,
    PurgeMessage,
    RedisL2,
    decode,
    encode,
    glob_escape,
    redis_key,
)
from edge.cache.testing import FakeClock, RedisServer, huge_replier
from meridian.config import CacheConfig, CacheRule
from meridian.redis_conn import RedisConnection, RedisTarget

Header = tuple[bytes, bytes]
HOST = b"api.example"
RULES = (
    CacheRule(
        path_prefix="/api/v1/ticker/", ttl=1.0, stale_while_revalidate=2.0, stale_if_error=30.0
    ),
    CacheRule(path_prefix="/api/v1/symbols", ttl=300.0),
)
TIMEOUT = 0.05


# --------------------------------------------------------------------------------------------
# Pure parts: codec, breaker, messages

_HEADER_NAME = st.binary(min_size=1, max_size=20).filter(lambda b: b"\x00" not in b)
_FRESHNESS = st.builds(
    Freshness,
    response_time=st.floats(0, 2e9),
    initial_age=st.floats(0, 1e6),
    lifetime=st.floats(0, 1e7),
    stale_while_revalidate=st.floats(0, 1e5),
    stale_if_error=st.floats(0, 1e5),
    no_stale=st.booleans(),
    always_revalidate=st.booleans(),
)
_RESPONSES = st.builds(
    StoredResponse,
    status=st.integers(100, 599),
    reason=st.binary(max_size=40),
    headers=st.lists(st.tuples(_HEADER_NAME, st.binary(max_size=300)), max_size=20).map(tuple),
    body=st.binary(max_size=2000),
    freshness=_FRESHNESS,
    vary=st.lists(st.sampled_from([b"accept", b"accept-language", b"x-v"]), unique=True).map(tuple),
    surrogate_keys=st.lists(
        st.text(alphabet="abcxyz-_0123456789é", min_size=1, max_size=8), unique=True
    ).map(tuple),
    content_coding=st.sampled_from([None, b"gzip", b"br"]),
    compressible=st.booleans(),
    auth_ok=st.booleans(),
)


@given(_RESPONSES)
def test_codec_round_trips_any_response(response: StoredResponse) -> None:
    assert decode(encode(response)) == response


@given(_RESPONSES, st.data())
def test_codec_rejects_truncation_and_garbage(
    response: StoredResponse, data: st.DataObject
) -> None:
    blob = encode(response)
    cut = data.draw(st.integers(0, len(blob) - len(response.body) - 1))
    with pytest.raises(DecodeError):
        decode(blob[:cut])


def test_codec_rejects_other_versions_and_pickles() -> None:
    blob = bytearray(
        encode(StoredResponse(200, b"", (), b"x", Freshness(0, 0, 1, 0, 0, False, False)))
    )
    blob[2] = 99
    with pytest.raises(DecodeError):
        decode(bytes(blob))
    with pytest.raises(DecodeError):
        decode(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.")


def test_glob_escape() -> None:
    assert glob_escape(b"/a*b?c[d]e\\f") == b"/a\\*b\\?c\\[d\\]e\\\\f"


def test_breaker_opens_after_threshold_and_probes_once_per_cooldown() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=10.0)
    assert not breaker.record_failure(0.0) and not breaker.record_failure(0.0)
    assert breaker.record_failure(0.0)  # the third opens it: reported once
    assert not breaker.allow(5.0)
    assert breaker.allow(10.0)  # the probe
    assert not breaker.allow(10.1)  # everyone else keeps skipping meanwhile
    assert not breaker.record_failure(10.2)  # the probe failed: open again, no new report
    assert not breaker.allow(15.0)
    assert breaker.allow(20.3)
    assert breaker.record_success()  # closed, reported once
    assert breaker.allow(20.4) and not breaker.is_open


def test_breaker_needs_consecutive_failures() -> None:
    breaker = CircuitBreaker(threshold=2, cooldown=1.0)
    breaker.record_failure(0.0)
    breaker.record_success()
    assert not breaker.record_failure(0.0)
    assert breaker.allow(0.0)


async def test_a_call_past_its_deadline_finishes_in_the_background() -> None:
    """The caller stops waiting; the call is not cancelled (cancelled mid-reply, a Redis
    connection would be torn down and remade under the next deadline)."""
    unhurried = Unhurried(limit=2)
    reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    finished: list[str] = []

    async def slow_call() -> str:
        finished.append(await reply)
        return finished[-1]

    with pytest.raises(TimeoutError):
        await unhurried.wait(slow_call(), 0.0)
    assert unhurried.running == 1
    reply.set_result("late")
    await asyncio.sleep(0)  # the straggler's step
    await asyncio.sleep(0)  # its done callback
    assert finished == ["late"] and unhurried.running == 0

    async def prompt() -> str:
        return "now"

    assert await unhurried.wait(prompt(), 1.0) == "now"


async def test_stragglers_are_bounded_and_cancelled_on_close() -> None:
    unhurried = Unhurried(limit=2)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def stuck() -> None:
        await never

    for _ in range(2):
        with pytest.raises(TimeoutError):
            await unhurried.wait(stuck(), 0.0)
    with pytest.raises(Backlogged):  # a timeout to the guard: counted, breaker fed
        await unhurried.wait(stuck(), 1.0)
    await unhurried.aclose()
    assert unhurried.running == 0


async def test_a_failing_straggler_is_read_and_forgotten() -> None:
    """Its error is retrieved (no "exception was never retrieved" at exit)."""
    unhurried = Unhurried()
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def fails_late() -> None:
        await gate
        raise ConnectionError("reset")

    with pytest.raises(TimeoutError):
        await unhurried.wait(fails_late(), 0.0)
    gate.set_result(None)
    for _ in range(3):
        await asyncio.sleep(0)
    assert unhurried.running == 0


def test_purge_message_round_trip_and_garbage() -> None:
    message = PurgeMessage("primary", b"G|https://h/\xe9?a=1", "node-1")
    assert PurgeMessage.decode(message.encode()) == message
    assert PurgeMessage.decode(b"not json") is None
    assert PurgeMessage.decode(b'{"kind": 1}') is None


# --------------------------------------------------------------------------------------------
# A POP: two HttpCache instances sharing one redis-server


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


class Origin:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls = 0
        self.headers: list[Header] = [(b"cache-control", b"max-age=60")]
        self.body = b"payload"
        self.gate: asyncio.Event | None = None

    async def fetch(self, validators: list[Header]) -> UpstreamResponse:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return UpstreamResponse(200, list(self.headers), self.body)


class Pop:
    def __init__(self, url: str, clock: FakeClock, monotonic: Callable[[], float]) -> None:
        self.clock = clock
        self.origin = Origin(clock)
        config = CacheConfig(redis_url=url, redis_timeout=TIMEOUT, rules=RULES, lock_timeout=2.0)
        self.caches = [
            HttpCache(
                config,
                clock=clock,
                l2=RedisL2(
                    url,
                    timeout=TIMEOUT,
                    max_value=config.redis_max_value,
                    clock=clock,
                    monotonic=monotonic,
                    instance_id=name,
                    breaker=CircuitBreaker(threshold=3, cooldown=30.0),
                ),
            )
            for name in ("edge-a", "edge-b")
        ]

    async def start(self) -> None:
        for cache in self.caches:
            await cache.start()
        for cache in self.caches:
            assert cache.l2 is not None
            await asyncio.wait_for(cache.l2.subscribed.wait(), 5)
            await asyncio.wait_for(cache.l2.connected.wait(), 5)

    async def request(
        self, cache: HttpCache, target: bytes, headers: Sequence[Header] = ()
    ) -> tuple[str, bytes]:
        found = cache.lookup(b"GET", b"https", HOST, target, [(b"host", HOST), *headers])
        if found.kind is LookupKind.HIT:
            return "hit", body_of(found.wire)
        if found.kind is LookupKind.ONLY_IF_CACHED:  # the 504 at once: no L2 to ask
            return "504", body_of(found.wire)
        if found.kind is LookupKind.ONLY_IF_CACHED_L2:  # as the edge's fill stage does
            filled = await cache.stored_only(found)
            assert filled.wire is not None
            if filled.wire.startswith(b"HTTP/1.1 504 "):
                return "504-after-l2", body_of(filled.wire)
            return filled.x_cache.decode(), body_of(filled.wire)
        filled = await cache.fill(found, self.origin.fetch)
        if filled.wire is None:
            assert filled.response is not None
            return "pass", filled.response.body
        return filled.x_cache.decode(), body_of(filled.wire)

    async def close(self) -> None:
        for cache in self.caches:
            await cache.aclose()


def body_of(wire: bytes) -> bytes:
    return wire.partition(b"\r\n\r\n")[2]


class Monotonic:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
async def pop(server: RedisServer) -> AsyncIterator[Pop]:
    running = Pop(server.url, FakeClock(time.time()), Monotonic())
    await running.start()
    try:
        yield running
    finally:
        await running.close()


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll (the other side is another connection, so let the loop run I/O) until true."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def raw(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


async def test_a_store_in_one_instance_is_a_hit_in_the_other(pop: Pop) -> None:
    a, b = pop.caches
    assert await pop.request(a, b"/api/v1/symbols") == ("MISS", b"payload")
    await a.drain()  # the L2 write happens in the background
    assert await pop.request(b, b"/api/v1/symbols") == ("HIT", b"payload")
    assert pop.origin.calls == 1
    assert b.metrics.l2_hits == 1
    assert await pop.request(b, b"/api/v1/symbols") == ("hit", b"payload")  # now in b's L1


ONLY_IF_CACHED = [(b"cache-control", b"only-if-cached")]


async def test_only_if_cached_is_answered_from_the_other_instances_store(pop: Pop) -> None:
    """RFC 9111 5.2.1.7: a response stored in the POP's L2 is stored; no origin call."""
    a, b = pop.caches
    assert await pop.request(a, b"/api/v1/symbols") == ("MISS", b"payload")
    await a.drain()
    assert await pop.request(b, b"/api/v1/symbols", ONLY_IF_CACHED) == ("HIT", b"payload")
    assert pop.origin.calls == 1
    assert b.metrics.l2_hits == 1
    assert b.metrics.misses == 0
    # Put in b's L1, as a fill's L2 hit is: the next one is answered by the lookup itself.
    assert await pop.request(b, b"/api/v1/symbols", ONLY_IF_CACHED) == ("hit", b"payload")
    assert b.metrics.l2_hits == 1


async def test_only_if_cached_with_nothing_stored_is_a_504_and_fills_nothing(pop: Pop) -> None:
    a, b = pop.caches
    for cache in (a, b):
        assert await pop.request(cache, b"/api/v1/symbols", ONLY_IF_CACHED) == (
            "504-after-l2",
            b"",
        )
    assert pop.origin.calls == 0
    assert (a.metrics.l2_hits, a.metrics.misses, len(a.fills), len(a.store)) == (0, 0, 0, 0)
    # No hit-for-miss mark, no lock left behind: a normal request fills as usual.
    assert await pop.request(b, b"/api/v1/symbols") == ("MISS", b"payload")
    assert pop.origin.calls == 1


async def test_only_if_cached_and_a_normal_fill_do_not_share_answers(pop: Pop) -> None:
    """A fill in flight for the key is neither joined (its answer may come from the origin)
    nor told of the only-if-cached request's 504."""
    b = pop.caches[1]
    pop.origin.gate = asyncio.Event()
    filling = asyncio.create_task(pop.request(b, b"/api/v1/symbols"))
    await until(lambda: pop.origin.calls == 1)
    assert await pop.request(b, b"/api/v1/symbols", ONLY_IF_CACHED) == ("504-after-l2", b"")
    pop.origin.gate.set()
    assert await filling == ("MISS", b"payload")
    assert pop.origin.calls == 1
    assert await pop.request(b, b"/api/v1/symbols", ONLY_IF_CACHED) == ("hit", b"payload")


async def test_only_if_cached_with_a_stale_copy_takes_a_fresher_one_from_l2(pop: Pop) -> None:
    a, b = pop.caches
    pop.origin.headers = []  # the ticker rule: ttl 1 s, swr 2 s
    path = b"/api/v1/ticker/BTC"
    await pop.request(a, path)
    await a.drain()
    assert await pop.request(b, path) == ("HIT", b"payload")  # in b's L1 too
    pop.clock.advance(5)  # past stale-while-revalidate in both: to be validated first
    pop.origin.body = b"newer"
    assert await pop.request(a, path) == ("MISS", b"newer")
    await a.drain()
    assert await pop.request(b, path, ONLY_IF_CACHED) == ("HIT", b"newer")
    assert (pop.origin.calls, b.metrics.l2_hits) == (2, 2)


async def test_only_if_cached_is_not_answered_with_a_purged_copy(
    pop: Pop, server: RedisServer
) -> None:
    a, b = pop.caches
    path = b"/api/v1/symbols"
    await pop.request(a, path)
    await a.drain()
    assert await pop.request(b, path, ONLY_IF_CACHED) == ("HIT", b"payload")
    stored = redis_key(b"meridian:cache:", b"e:", b"G|https://api.example/api/v1/symbols")
    blob = raw(server).get(stored)
    assert blob is not None
    result = await a.purges.purge_url("https://api.example/api/v1/symbols")
    assert (result.local, result.shared, result.propagated) == (1, 1, True)
    await until(lambda: len(b.store) == 0)
    assert await pop.request(b, path, ONLY_IF_CACHED) == ("504-after-l2", b"")
    # A copy from before the purge back in Redis (a write that raced the DEL) is not served.
    raw(server).set(stored, blob)
    assert await pop.request(b, path, ONLY_IF_CACHED) == ("504-after-l2", b"")
    assert (pop.origin.calls, b.metrics.l2_hits) == (1, 1)


async def test_only_if_cached_with_redis_paused_is_a_504_within_the_deadline(
    pop: Pop, server: RedisServer
) -> None:
    a, b = pop.caches
    await pop.request(a, b"/api/v1/symbols")
    await a.drain()
    server.pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        started = time.monotonic()
        answer = await pop.request(b, b"/api/v1/symbols", ONLY_IF_CACHED)
        assert answer == ("504-after-l2", b"")
        assert time.monotonic() - started < TIMEOUT + 0.5
        assert b.metrics.redis_errors.get("timeout", 0) == 1
        # Once the breaker opens, the 504 is answered by the lookup, without asking Redis.
        for i in range(5):
            await pop.request(b, b"/api/v1/symbols/%d" % i, ONLY_IF_CACHED)
        assert b.l2 is not None and not b.l2.available
        assert await pop.request(b, b"/api/v1/symbols", ONLY_IF_CACHED) == ("504", b"")
        assert pop.origin.calls == 1
    finally:
        server.resume()


async def test_vary_variants_are_shared_too(pop: Pop) -> None:
    a, b = pop.caches
    pop.origin.headers.append((b"vary", b"accept-language"))
    for lang in (b"en", b"fr"):
        pop.origin.body = b"in-" + lang
        await pop.request(a, b"/api/v1/symbols", [(b"accept-language", lang)])
    await a.drain()
    for lang in (b"fr", b"en"):
        assert await pop.request(b, b"/api/v1/symbols", [(b"accept-language", lang)]) == (
            "HIT",
            b"in-" + lang,
        )
    assert pop.origin.calls == 2


async def test_redis_ttl_is_freshness_plus_stale_window(pop: Pop, server: RedisServer) -> None:
    a = pop.caches[0]
    pop.origin.headers = []  # the ticker rule: ttl 1 s, swr 2 s, sie 30 s
    await pop.request(a, b"/api/v1/ticker/BTC")
    await a.drain()
    ttl = raw(server).pttl(
        redis_key(b"meridian:cache:", b"e:", b"G|https://api.example/api/v1/ticker/BTC")
    )
    assert 30_000 < ttl <= 31_000


async def test_values_over_the_limit_stay_out_of_redis(server: RedisServer) -> None:
    clock = FakeClock(time.time())
    config = CacheConfig(redis_url=server.url, redis_max_value=1000, rules=RULES)
    cache = HttpCache(config, clock=clock)
    origin = Origin(clock)
    origin.body = b"x" * 2000
    found = cache.lookup(b"GET", b"https", HOST, b"/api/v1/symbols", [])
    await cache.fill(found, origin.fetch)
    await cache.drain()
    assert raw(server).dbsize() == 0
    assert len(cache.store) == 1
    await cache.aclose()


async def test_corrupt_values_are_misses(pop: Pop, server: RedisServer) -> None:
    symbols = b"G|https://api.example/api/v1/symbols"
    raw(server).set(redis_key(b"meridian:cache:", b"e:", symbols), b"\x00garbage")
    assert await pop.request(pop.caches[0], b"/api/v1/symbols") == ("MISS", b"payload")
    assert pop.origin.calls == 1


async def test_concurrent_misses_on_two_instances_make_one_origin_request(pop: Pop) -> None:
    a, b = pop.caches
    pop.origin.gate = asyncio.Event()
    tasks = [
        asyncio.create_task(pop.request(cache, b"/api/v1/symbols"))
        for cache in (a, b)
        for _ in range(50)
    ]
    await until(lambda: pop.origin.calls >= 1 and b.metrics.coalesced_waiters == 49)
    # b's leader found a's lock and is polling Redis rather than calling the origin
    assert pop.origin.calls == 1
    pop.origin.gate.set()
    results = await asyncio.gather(*tasks)
    assert pop.origin.calls == 1
    assert {body for _, body in results} == {b"payload"}


async def test_redis_killed_requests_keep_succeeding_quickly(pop: Pop, server: RedisServer) -> None:
    a, b = pop.caches
    await pop.request(a, b"/api/v1/symbols")
    await a.drain()
    server.kill()
    started = time.monotonic()
    for i in range(30):
        how, body = await pop.request(b, b"/api/v1/symbols/%d" % i)
        assert (how, body) == ("MISS", b"payload")
    assert await pop.request(a, b"/api/v1/symbols") == ("hit", b"payload")  # L1 unaffected
    await b.drain()
    assert time.monotonic() - started < 2.0
    assert b.l2 is not None and not b.l2.available  # breaker open: Redis skipped
    errors = sum(b.metrics.redis_errors.values())
    assert 3 <= errors <= 6  # counted until the breaker opened, then not tried at all


async def test_slow_redis_costs_at_most_a_few_timeouts(pop: Pop, server: RedisServer) -> None:
    b = pop.caches[1]
    server.pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        started = time.monotonic()
        for i in range(20):
            assert await pop.request(b, b"/api/v1/symbols/%d" % i) == ("MISS", b"payload")
        await b.drain()
        elapsed = time.monotonic() - started
        assert elapsed < 3 * TIMEOUT * 3 + 1.0  # three timed-out calls, then skipped
        assert b.metrics.redis_errors.get("timeout", 0) >= 3
        assert b.l2 is not None and not b.l2.available
    finally:
        server.resume()


async def test_start_opens_the_command_connection_before_any_request(server: RedisServer) -> None:
    """A cold instance's first lookups would otherwise pay the connect inside their deadline
    (50 ms here): on a loaded machine they missed L2 and went to the origin."""
    client = raw(server)

    def connections() -> int:
        opened: int = client.info("stats")["total_connections_received"]
        return opened

    connection = RedisConnection(
        RedisTarget.standalone(server.url), timeout=1.0, connect_timeout=1.0
    )
    try:
        before = connections()
        await connection.prepare()
        assert connections() == before + 1
        assert await connection.client.get(b"absent") is None
        assert connections() == before + 1  # the command went over the one prepared
    finally:
        await connection.aclose()
    l2 = RedisL2(server.url, timeout=TIMEOUT, max_value=1 << 20, clock=time.time)
    l2.start(lambda message: None, lambda: None)
    try:
        await asyncio.wait_for(l2.connected.wait(), 5)
    finally:
        await l2.aclose()


async def test_a_reply_announcing_a_huge_string_is_refused_before_it_is_read() -> None:
    """Whatever answers on Redis's address is untrusted: a GET answered with a 4 GB string
    (sent for as long as the edge reads) is an L2 miss at once, not memory."""
    async with huge_replier() as hostile:
        url = f"redis://127.0.0.1:{hostile.port}"
        l2 = RedisL2(url, timeout=1.0, max_value=1 << 20, clock=time.time)
        try:
            assert await l2.get(b"GET https://api.example/x", []) is None
            assert hostile.sent < 8 << 20  # refused on the length line, not after the string
        finally:
            await l2.aclose()


async def test_redis_down_at_start_connects_once_it_answers(server: RedisServer) -> None:
    server.pause()
    l2 = RedisL2(server.url, timeout=TIMEOUT, max_value=1 << 20, clock=time.time, admin_timeout=0.2)
    l2.start(lambda message: None, lambda: None)
    try:
        await asyncio.sleep(0.5)
        assert not l2.connected.is_set()
        server.resume()
        await asyncio.wait_for(l2.connected.wait(), 5)
    finally:
        await l2.aclose()


async def test_breaker_closes_after_redis_returns(server: RedisServer) -> None:
    clock, monotonic = FakeClock(time.time()), Monotonic()
    running = Pop(server.url, clock, monotonic)
    await running.start()
    try:
        b = running.caches[1]
        assert b.l2 is not None
        server.pause()
        for i in range(4):
            await running.request(b, b"/api/v1/symbols/%d" % i)
        await b.drain()
        assert not b.l2.available
        server.resume()
        await running.request(b, b"/api/v1/symbols/x")
        assert not b.l2.available  # still cooling down
        monotonic.offset += 31.0
        await running.request(b, b"/api/v1/symbols/y")  # the probe succeeds
        await b.drain()
        assert b.l2.available
    finally:
        await running.close()


async def test_purges_propagate_to_every_instance_and_redis(pop: Pop, server: RedisServer) -> None:
    a, b = pop.caches
    pop.origin.headers.append((b"surrogate-key", b"btc ticker"))
    for path in (b"/api/v1/ticker/BTC", b"/api/v1/ticker/ETH", b"/api/v1/symbols"):
        await pop.request(a, path)
        await a.drain()
        assert (await pop.request(b, path))[0] == "HIT"  # b holds it in L1 now
    assert len(b.store) == 3

    result = await a.purges.purge_url("https://api.example/api/v1/ticker/ETH")
    assert (result.local, result.shared, result.propagated) == (1, 1, True)
    await until(lambda: len(b.store) == 2)

    result = await a.purges.purge_prefix("/api/v1/ticker/")
    assert result.local == 1 and result.shared == 1
    await until(lambda: len(b.store) == 1)

    result = await b.purges.purge_tag("btc")
    assert result.local == 1
    await until(lambda: len(a.store) == 0)
    assert raw(server).keys(b"meridian:cache:e:*") == []
    calls = pop.origin.calls
    assert (await pop.request(b, b"/api/v1/symbols"))[0] == "MISS"
    assert pop.origin.calls == calls + 1


async def test_unsafe_requests_invalidate_across_instances(pop: Pop) -> None:
    a, b = pop.caches
    await pop.request(a, b"/api/v1/symbols")
    await a.drain()
    await pop.request(b, b"/api/v1/symbols")
    assert len(b.store) == 1
    assert a.invalidate(b"PUT", 204, b"https", HOST, b"/api/v1/symbols", []) == 1
    await until(lambda: len(b.store) == 0)
    await a.drain()
    assert (await pop.request(b, b"/api/v1/symbols"))[0] == "MISS"  # gone from Redis too


async def test_lost_subscription_clears_l1_when_restored(pop: Pop, server: RedisServer) -> None:
    a = pop.caches[0]
    await pop.request(a, b"/api/v1/symbols")
    assert len(a.store) == 1
    port = server.port
    server.kill()
    assert a.l2 is not None
    await until(lambda: a.l2 is not None and not a.l2.subscribed.is_set())
    restarted = RedisServer()
    try:
        restarted.start(port=port)
    except RuntimeError:
        pytest.skip("the port was taken meanwhile")
    try:
        await until(lambda: a.l2 is not None and a.l2.subscribed.is_set(), within=10.0)
        assert len(a.store) == 0  # purges sent meanwhile may have been missed
    finally:
        restarted.kill()
