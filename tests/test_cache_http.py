"""The HttpCache facade (L1 only): the edge's call sequence against a scripted origin."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edge.cache import (
    Filled,
    HitMemo,
    HttpCache,
    Lookup,
    LookupKind,
    Prepared,
    UpstreamResponse,
    lookup_read,
)
from edge.cache.policy import format_http_date
from edge.cache.testing import FakeClock
from meridian.config import CacheConfig, CacheRule

Header = tuple[bytes, bytes]
HOST = b"api.example"
TICKER = CacheRule(
    path_prefix="/api/v1/ticker/",
    ttl=1.0,
    stale_while_revalidate=2.0,
    stale_if_error=60.0,
    drop_params=("utm_*",),
)
SYMBOLS = CacheRule(path_prefix="/api/v1/symbols", ttl=300.0)
COOKIES = CacheRule(path_prefix="/api/v1/cookies", ttl=10.0, store_set_cookie=True)
NOCACHE = CacheRule(path_prefix="/api/v1/orders", bypass=True)


def gzip_only(body: bytes, coding: str) -> bytes:
    return gzip.compress(body, mtime=0)


def make_cache(clock: FakeClock, **overrides: object) -> HttpCache:
    config = CacheConfig(rules=(TICKER, SYMBOLS, COOKIES, NOCACHE), hit_for_miss=10.0)
    options: dict[str, object] = {
        "clock": clock,
        "extra_headers": [(b"via", b"1.1 meridian-test")],
    }
    options.update(overrides)
    return HttpCache(config, **options)  # type: ignore[arg-type]


class Origin:
    """A scripted upstream: answers ``response`` (or raises ``error``), records validators."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[list[Header]] = []
        self.status = 200
        self.headers: list[Header] = [(b"content-type", b"application/json")]
        self.body = b'{"price":"1"}'
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.compressible = False

    def answer(self, status: int = 200, headers: Sequence[Header] = (), body: bytes = b"") -> None:
        self.status, self.headers, self.body = status, list(headers), body

    async def fetch(self, validators: list[Header]) -> UpstreamResponse:
        self.calls.append(validators)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        headers = [(b"date", format_http_date(self.clock())), *self.headers]
        return UpstreamResponse(self.status, headers, self.body, compressible=self.compressible)


def parse(wire: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = wire.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return int(status.split()[1]), dict(line.split(b": ", 1) for line in lines), body


def get(
    cache: HttpCache, target: bytes, headers: Sequence[Header] = (), method: bytes = b"GET"
) -> Lookup:
    return cache.lookup(method, b"https", HOST, target, [(b"host", HOST), *headers])


async def request(
    cache: HttpCache,
    origin: Origin,
    target: bytes,
    headers: Sequence[Header] = (),
    method: bytes = b"GET",
) -> tuple[str, bytes]:
    """The edge's sequence; returns (how it was answered, the response bytes or body)."""
    found = get(cache, target, headers, method)
    if found.kind in (LookupKind.HIT, LookupKind.STALE, LookupKind.ONLY_IF_CACHED):
        if found.refresh:
            cache.refresh(found, origin.fetch)
        return found.kind.value, found.wire
    assert found.kind in (LookupKind.MISS, LookupKind.REVALIDATE), found
    filled: Filled = await cache.fill(found, origin.fetch)
    if filled.wire is not None:
        return filled.x_cache.decode(), filled.wire
    assert filled.response is not None
    return "pass", filled.response.body


# --------------------------------------------------------------------------------------------
# Miss, hit, Age, HEAD, conditionals


async def test_miss_then_hit_with_age() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=10")], b"tick")
    how, wire = await request(cache, origin, b"/api/v1/ticker/BTC")
    assert how == "MISS"
    status, headers, body = parse(wire)
    assert (status, headers[b"x-cache"], headers[b"age"], body) == (200, b"MISS", b"0", b"tick")
    assert headers[b"via"] == b"1.1 meridian-test"
    clock.advance(4.5)
    how, wire = await request(cache, origin, b"/api/v1/ticker/BTC")
    assert how == "hit"
    assert parse(wire)[1][b"age"] == b"4" and parse(wire)[1][b"x-cache"] == b"HIT"
    assert len(origin.calls) == 1
    assert cache.metrics.l1_hits == 1 and cache.metrics.misses == 1


async def test_fill_target_is_normalised() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    found = get(cache, b"/api/v1/ticker/BTC?utm_source=mail&b=2&a=1")
    assert found.key is not None and found.key.target == b"/api/v1/ticker/BTC?a=1&b=2"
    await cache.fill(found, origin.fetch)
    assert get(cache, b"/api/v1/ticker/BTC?a=1&b=2&utm_campaign=x").kind is LookupKind.HIT


async def test_head_is_served_from_a_stored_get() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=10")], b"0123456789")
    await request(cache, origin, b"/api/v1/ticker/BTC")
    found = get(cache, b"/api/v1/ticker/BTC", method=b"HEAD")
    assert found.kind is LookupKind.HIT
    status, headers, body = parse(found.wire)
    assert status == 200 and headers[b"content-length"] == b"10" and body == b""


async def test_head_miss_fills_with_the_get_and_answers_without_body() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=10")], b"0123456789")
    how, wire = await request(cache, origin, b"/api/v1/ticker/BTC", method=b"HEAD")
    assert how == "MISS" and parse(wire)[2] == b"" and parse(wire)[1][b"content-length"] == b"10"
    assert parse(get(cache, b"/api/v1/ticker/BTC").wire)[2] == b"0123456789"


async def test_client_conditionals_are_answered_304_from_cache() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=60"), (b"etag", b'"v7"')], b"data")
    how, wire = await request(cache, origin, b"/api/v1/ticker/BTC", [(b"if-none-match", b'"v7"')])
    assert how == "MISS" and parse(wire)[0] == 304  # filled whole, answered 304
    assert origin.calls == [[]]  # the client's validator was not forwarded
    found = get(cache, b"/api/v1/ticker/BTC", [(b"if-none-match", b'W/"v7", "v8"')])
    assert found.kind is LookupKind.HIT and parse(found.wire)[0] == 304
    found = get(cache, b"/api/v1/ticker/BTC", [(b"if-none-match", b'"v6"')])
    assert parse(found.wire)[0] == 200
    found = get(cache, b"/api/v1/ticker/BTC", [(b"if-modified-since", format_http_date(clock()))])
    assert parse(found.wire)[0] == 304  # no Last-Modified: the stored Date decides


# --------------------------------------------------------------------------------------------
# Revalidation


async def test_stale_entry_is_revalidated_with_validators_and_updated_by_304() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    last_modified = format_http_date(clock() - 3600)
    origin.answer(
        200,
        [
            (b"cache-control", b"max-age=5"),
            (b"etag", b'"v1"'),
            (b"last-modified", last_modified),
            (b"x-version", b"1"),
        ],
        b"body-v1",
    )
    await request(cache, origin, b"/api/v1/symbols")
    clock.advance(6)
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.REVALIDATE
    origin.answer(
        304, [(b"cache-control", b"max-age=100"), (b"etag", b'"v1"'), (b"x-version", b"2")]
    )
    how, wire = await request(cache, origin, b"/api/v1/symbols")
    assert how == "REVALIDATED"
    assert origin.calls[-1] == [(b"if-none-match", b'"v1"'), (b"if-modified-since", last_modified)]
    status, headers, body = parse(wire)
    assert (status, body, headers[b"x-version"], headers[b"age"]) == (200, b"body-v1", b"2", b"0")
    clock.advance(50)
    found = get(cache, b"/api/v1/symbols")
    assert found.kind is LookupKind.HIT  # the 304's max-age=100 now applies
    assert parse(found.wire)[1][b"cache-control"] == b"max-age=100"


async def test_a_304_sets_its_cookie_where_the_rule_stores_cookies_and_keeps_the_digest() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    first = [(b"cache-control", b"max-age=5"), (b"etag", b'"v1"'), (b"set-cookie", b"a=b")]
    origin.answer(200, [*first, (b"content-md5", b"rL0Y20zC+Fzt72VPzMSk2A==")], b"c")
    await request(cache, origin, b"/api/v1/cookies")
    clock.advance(6)
    update = [(b"cache-control", b"max-age=5"), (b"etag", b'"v1"'), (b"set-cookie", b"a=c")]
    origin.answer(304, [*update, (b"content-md5", b"N7UdGUp1E+RbVvZSTy1R8g==")])
    how, wire = await request(cache, origin, b"/api/v1/cookies")
    headers = parse(wire)[1]
    assert how == "REVALIDATED"
    assert headers[b"set-cookie"] == b"a=c"  # the client that triggered it gets its cookie
    assert headers[b"content-md5"] == b"rL0Y20zC+Fzt72VPzMSk2A=="  # a digest of the kept body


async def test_a_304_cookie_reaches_only_the_client_that_triggered_it_elsewhere() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)  # /api/v1/symbols: cookies not stored
    origin.answer(200, [(b"cache-control", b"max-age=5"), (b"etag", b'"v1"')], b"s")
    await request(cache, origin, b"/api/v1/symbols")
    clock.advance(6)
    origin.answer(304, [(b"etag", b'"v1"'), (b"set-cookie", b"sid=1"), (b"set-cookie", b"t=2")])
    origin.gate = asyncio.Event()
    leader = asyncio.ensure_future(request(cache, origin, b"/api/v1/symbols"))
    waiter = asyncio.ensure_future(request(cache, origin, b"/api/v1/symbols"))
    await asyncio.sleep(0)
    origin.gate.set()
    (how, wire), (_, waited) = await leader, await waiter
    assert how == "REVALIDATED" and len(origin.calls) == 2
    assert wire.count(b"set-cookie: ") == 2 and b"set-cookie: sid=1\r\n" in wire
    assert b"set-cookie" not in waited  # a coalesced request never gets another's cookie
    found = get(cache, b"/api/v1/symbols")
    assert found.kind is LookupKind.HIT and b"set-cookie" not in found.wire


async def test_a_must_understand_response_of_an_unknown_status_is_not_stored() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(599, [(b"cache-control", b"max-age=3600, must-understand")], b"x")
    assert (await request(cache, origin, b"/api/v1/symbols"))[0] == "pass"
    origin.answer(200, [(b"cache-control", b"max-age=3600, must-understand, no-store")], b"y")
    assert (await request(cache, origin, b"/api/v1/symbols"))[0] == "MISS"
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.HIT


async def test_targeted_fields_steer_the_edge_and_never_leave_it() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)  # default targets: cdn, surrogate
    origin.answer(
        200,
        [
            (b"cache-control", b"no-store"),
            (b"cdn-cache-control", b"max-age=5"),
            (b"surrogate-control", b"max-age=1"),
            (b"etag", b'"v1"'),
        ],
        b"body",
    )
    how, wire = await request(cache, origin, b"/api/v1/symbols")
    headers = parse(wire)[1]
    assert how == "MISS" and headers[b"cache-control"] == b"no-store"
    assert b"cdn-cache-control" not in headers and b"surrogate-control" not in headers
    clock.advance(4)
    found = get(cache, b"/api/v1/symbols")
    assert found.kind is LookupKind.HIT and b"cdn-cache-control" not in found.wire
    clock.advance(2)
    origin.answer(304, [(b"etag", b'"v1"')])  # says nothing new: the stored policy holds
    assert (await request(cache, origin, b"/api/v1/symbols"))[0] == "REVALIDATED"
    clock.advance(4)
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.HIT
    assert len(origin.calls) == 2
    # Not stored (the edge's field says so): still stripped on the way out.
    origin.answer(200, [(b"cache-control", b"max-age=60"), (b"cdn-cache-control", b"private")])
    how, _ = await request(cache, origin, b"/api/v1/ticker/ETH")
    assert how == "pass"


async def test_304_for_another_etag_leads_to_a_full_fetch() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=1"), (b"etag", b'"v1"')], b"old")
    await request(cache, origin, b"/api/v1/symbols")
    clock.advance(2)
    answers = iter(
        [
            UpstreamResponse(304, [(b"etag", b'"v9"')], b""),
            UpstreamResponse(200, [(b"cache-control", b"max-age=9"), (b"etag", b'"v9"')], b"new"),
        ]
    )
    seen: list[list[Header]] = []

    async def fetch(validators: list[Header]) -> UpstreamResponse:
        seen.append(validators)
        return next(answers)

    filled = await cache.fill(get(cache, b"/api/v1/symbols"), fetch)
    assert seen == [[(b"if-none-match", b'"v1"')], []]
    assert parse(filled.wire or b"")[2] == b"new"


async def test_request_no_cache_revalidates_a_fresh_entry() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=60"), (b"etag", b'"a"')], b"x")
    await request(cache, origin, b"/api/v1/symbols")
    found = get(cache, b"/api/v1/symbols", [(b"cache-control", b"no-cache")])
    assert found.kind is LookupKind.REVALIDATE
    origin.answer(304, [(b"etag", b'"a"')])
    filled = await cache.fill(found, origin.fetch)
    assert filled.x_cache == b"REVALIDATED" and origin.calls[-1] == [(b"if-none-match", b'"a"')]


async def test_no_cache_from_origin_always_revalidates() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"no-cache, max-age=60"), (b"etag", b'"n"')], b"x")
    await request(cache, origin, b"/api/v1/symbols")
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.REVALIDATE


# --------------------------------------------------------------------------------------------
# Stale-while-revalidate and stale-if-error


async def test_stale_while_revalidate_serves_stale_and_refreshes_once() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [], b"v1")  # the rule: ttl 1 s, swr 2 s
    await request(cache, origin, b"/api/v1/ticker/ETH")
    clock.advance(1.5)
    origin.gate = asyncio.Event()
    origin.answer(200, [], b"v2")
    for _ in range(50):
        how, wire = await request(cache, origin, b"/api/v1/ticker/ETH")
        assert how == "stale" and parse(wire)[2] == b"v1"
        assert parse(wire)[1][b"x-cache"] == b"STALE"
    origin.gate.set()
    await cache.drain()
    assert len(origin.calls) == 2  # the first fill and exactly one background refresh
    assert cache.metrics.stale == {"while_revalidate": 50}
    assert cache.metrics.misses == 1  # a background refresh is no client's miss
    found = get(cache, b"/api/v1/ticker/ETH")
    assert found.kind is LookupKind.HIT and parse(found.wire)[2] == b"v2"


async def test_beyond_swr_the_request_waits_for_revalidation() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    await request(cache, origin, b"/api/v1/ticker/ETH")
    clock.advance(3.5)  # ttl 1 + swr 2 passed
    assert get(cache, b"/api/v1/ticker/ETH").kind is LookupKind.REVALIDATE


@pytest.mark.parametrize("failure", ["raise", "503"])
async def test_stale_if_error_within_the_window_then_error(failure: str) -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [], b"good")
    await request(cache, origin, b"/api/v1/ticker/SOL")
    if failure == "raise":
        origin.error = ConnectionError("no healthy region")
    else:
        origin.answer(503, [], b"down")
    clock.advance(30)  # ttl 1 s, stale-if-error 60 s
    how, wire = await request(cache, origin, b"/api/v1/ticker/SOL")
    assert how == "STALE" and parse(wire)[2] == b"good" and parse(wire)[1][b"age"] == b"30"
    assert cache.metrics.stale == {"if_error": 1}
    clock.advance(32)  # 62 s stale: beyond the window
    if failure == "raise":
        with pytest.raises(ConnectionError):
            await request(cache, origin, b"/api/v1/ticker/SOL")
    else:
        assert await request(cache, origin, b"/api/v1/ticker/SOL") == ("pass", b"down")


async def test_must_revalidate_is_never_served_stale_on_error() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=1, must-revalidate")], b"strict")
    await request(cache, origin, b"/api/v1/ticker/XRP")
    origin.error = ConnectionError("down")
    clock.advance(2)
    with pytest.raises(ConnectionError):
        await request(cache, origin, b"/api/v1/ticker/XRP")


async def test_an_error_response_does_not_evict_the_stale_entry() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=1")], b"good")
    await request(cache, origin, b"/api/v1/symbols")
    clock.advance(2)
    origin.answer(500, [], b"oops")  # no stale-if-error from the origin: passed through
    assert await request(cache, origin, b"/api/v1/symbols") == ("pass", b"oops")
    assert get(cache, b"/api/v1/symbols").entry is not None


# --------------------------------------------------------------------------------------------
# Request directives


async def test_only_if_cached() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    only = [(b"cache-control", b"only-if-cached")]
    found = get(cache, b"/api/v1/ticker/ADA", only)
    assert found.kind is LookupKind.ONLY_IF_CACHED and parse(found.wire)[0] == 504
    await request(cache, origin, b"/api/v1/ticker/ADA")
    assert get(cache, b"/api/v1/ticker/ADA", only).kind is LookupKind.HIT
    clock.advance(10)
    assert get(cache, b"/api/v1/ticker/ADA", only).kind is LookupKind.ONLY_IF_CACHED


async def test_request_no_store_bypasses_a_miss() -> None:
    cache = make_cache(FakeClock())
    found = get(cache, b"/api/v1/ticker/DOT", [(b"cache-control", b"no-store")])
    assert found.kind is LookupKind.BYPASS and found.reason == "request-no-store"


async def test_request_no_store_on_a_stale_entry_bypasses_and_keeps_it() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=1"), (b"etag", b'"e"')], b"kept")
    await request(cache, origin, b"/api/v1/symbols")
    clock.advance(2)
    found = get(cache, b"/api/v1/symbols", [(b"cache-control", b"no-store")])
    assert (found.kind, found.reason) == (LookupKind.BYPASS, "request-no-store")
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.REVALIDATE


async def test_a_truncated_body_is_never_stored() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=60"), (b"content-length", b"100")], b"short")
    assert await request(cache, origin, b"/api/v1/symbols") == ("pass", b"short")
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.MISS
    origin.answer(200, [(b"cache-control", b"max-age=60"), (b"content-length", b"5")], b"whole")
    assert (await request(cache, origin, b"/api/v1/symbols"))[0] == "MISS"
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.HIT


@pytest.mark.parametrize(
    ("method", "headers", "reason"),
    [
        (b"POST", [], "method"),
        (b"GET", [(b"content-length", b"12")], "request-body"),
        (b"GET", [(b"transfer-encoding", b"chunked")], "request-body"),
        (b"GET", [(b"if-match", b'"x"')], "precondition"),
    ],
)
def test_bypass_reasons(method: bytes, headers: list[Header], reason: str) -> None:
    cache = make_cache(FakeClock())
    found = get(cache, b"/api/v1/ticker/BTC", headers, method)
    assert (found.kind, found.reason) == (LookupKind.BYPASS, reason)
    assert cache.metrics.bypass == {reason: 1}


def test_rule_bypass_and_disabled_cache() -> None:
    cache = make_cache(FakeClock())
    assert get(cache, b"/api/v1/orders/1").reason == "rule"
    disabled = HttpCache(CacheConfig(enabled=False), clock=FakeClock())
    assert get(disabled, b"/x").kind is LookupKind.BYPASS


# --------------------------------------------------------------------------------------------
# Privacy: Authorization, Set-Cookie, private


async def test_authorized_requests_are_not_served_anonymous_entries() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=60")], b"public data")
    await request(cache, origin, b"/api/v1/symbols")
    auth = [(b"authorization", b"Bearer alice")]
    assert get(cache, b"/api/v1/symbols", auth).kind is LookupKind.MISS
    origin.answer(200, [(b"cache-control", b"max-age=60")], b"alice's view")
    assert await request(cache, origin, b"/api/v1/symbols", auth) == ("pass", b"alice's view")
    # ...and the anonymous entry is untouched
    assert parse(get(cache, b"/api/v1/symbols").wire)[2] == b"public data"


async def test_authorized_response_marked_public_is_shared() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"public, max-age=60")], b"shared")
    await request(cache, origin, b"/api/v1/symbols", [(b"authorization", b"Bearer a")])
    assert get(cache, b"/api/v1/symbols", [(b"authorization", b"Bearer b")]).kind is LookupKind.HIT
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.HIT


async def test_set_cookie_responses_pass_unless_the_rule_stores_them() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"set-cookie", b"s=1"), (b"cache-control", b"max-age=60")], b"c")
    assert (await request(cache, origin, b"/api/v1/symbols"))[0] == "pass"
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.MISS
    how, wire = await request(cache, origin, b"/api/v1/cookies")
    assert how == "MISS" and parse(wire)[1][b"set-cookie"] == b"s=1"
    assert get(cache, b"/api/v1/cookies").kind is LookupKind.HIT


async def test_private_and_no_store_pass_and_remove_the_old_entry() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=1")], b"v1")
    await request(cache, origin, b"/api/v1/symbols")
    clock.advance(2)
    origin.answer(200, [(b"cache-control", b"private")], b"v2")
    assert await request(cache, origin, b"/api/v1/symbols") == ("pass", b"v2")
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.MISS


# --------------------------------------------------------------------------------------------
# Vary and poisoning


async def test_vary_keeps_one_variant_per_header_value() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    for lang in (b"en", b"fr"):
        origin.answer(
            200,
            [(b"vary", b"Accept-Language"), (b"cache-control", b"max-age=60")],
            b"hello-" + lang,
        )
        await request(cache, origin, b"/api/v1/symbols", [(b"accept-language", lang)])
    for lang in (b"en", b"fr"):
        found = get(cache, b"/api/v1/symbols", [(b"accept-language", lang.upper() + b" ")])
        assert found.kind is LookupKind.HIT and parse(found.wire)[2] == b"hello-" + lang
    assert get(cache, b"/api/v1/symbols", [(b"accept-language", b"de")]).kind is LookupKind.MISS
    assert len(origin.calls) == 2


async def test_vary_star_is_never_stored() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"vary", b"*"), (b"cache-control", b"max-age=60")], b"x")
    assert (await request(cache, origin, b"/api/v1/symbols"))[0] == "pass"
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.MISS


async def test_vary_accept_encoding_does_not_split_an_identity_entry() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock, compressor=gzip_only), Origin(clock)
    origin.compressible = True
    body = b'{"symbols": ["BTC-USD"]}' * 50
    origin.answer(200, [(b"vary", b"accept-encoding"), (b"cache-control", b"max-age=60")], body)
    await request(cache, origin, b"/api/v1/symbols", [(b"accept-encoding", b"gzip")])
    plain = get(cache, b"/api/v1/symbols")
    zipped = get(cache, b"/api/v1/symbols", [(b"accept-encoding", b"gzip, deflate")])
    assert plain.kind is zipped.kind is LookupKind.HIT
    assert parse(plain.wire)[2] == body
    assert gzip.decompress(parse(zipped.wire)[2]) == body
    assert parse(zipped.wire)[1][b"content-encoding"] == b"gzip"
    assert len(origin.calls) == 1


async def test_unkeyed_headers_cannot_poison_the_cache() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=60")], b"canonical")
    evil = [(b"x-forwarded-host", b"evil.example"), (b"x-original-url", b"/admin")]
    await request(cache, origin, b"/api/v1/symbols", evil)
    for headers in ([], [(b"x-forwarded-host", b"other.example")], evil):
        found = get(cache, b"/api/v1/symbols", headers)
        assert found.kind is LookupKind.HIT and parse(found.wire)[2] == b"canonical"
    assert (
        get(cache, b"/api/v1/symbols", [], b"GET").key == get(cache, b"/api/v1/symbols", evil).key
    )


# --------------------------------------------------------------------------------------------
# Coalescing through the facade


async def test_thousand_concurrent_misses_one_origin_request() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.gate = asyncio.Event()
    origin.answer(200, [(b"cache-control", b"max-age=5")], b"once")
    tasks = [
        asyncio.create_task(request(cache, origin, b"/api/v1/ticker/BTC")) for _ in range(1000)
    ]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while cache.metrics.coalesced_waiters < 999:
        assert loop.time() < deadline
        await asyncio.sleep(0)
    origin.gate.set()
    results = await asyncio.gather(*tasks)
    assert len(origin.calls) == 1
    assert {parse(wire)[2] for _, wire in results} == {b"once"}
    assert sorted({how for how, _ in results}) == ["HIT", "MISS"]
    assert cache.metrics.coalesced_hits == 999


async def test_coalesced_waiters_of_another_variant_get_their_own() -> None:
    clock = FakeClock()
    cache = make_cache(clock)
    gate = asyncio.Event()
    calls_by_lang: dict[bytes, int] = {}

    async def one(lang: bytes) -> bytes:
        found = get(cache, b"/api/v1/symbols", [(b"accept-language", lang)])
        if found.kind is LookupKind.HIT:
            return parse(found.wire)[2]

        async def fetch(validators: list[Header]) -> UpstreamResponse:
            calls_by_lang[lang] = calls_by_lang.get(lang, 0) + 1
            await gate.wait()
            headers = [(b"vary", b"accept-language"), (b"cache-control", b"max-age=60")]
            return UpstreamResponse(200, headers, b"in-" + lang)

        filled = await cache.fill(found, fetch)
        return parse(filled.wire or b"")[2]

    # First ever request: the Vary names are unknown, so all twenty queue behind one leader.
    tasks = [asyncio.create_task(one(lang)) for lang in [b"en"] * 10 + [b"fr"] * 10]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while cache.metrics.coalesced_waiters < 19:
        assert loop.time() < deadline
        await asyncio.sleep(0)
    gate.set()
    bodies = await asyncio.gather(*tasks)
    assert bodies == [b"in-en"] * 10 + [b"in-fr"] * 10
    # The other language's waiters re-queued under their own variant: one fetch each.
    assert sum(calls_by_lang.values()) == 2 and set(calls_by_lang) == {b"en", b"fr"}


async def test_uncacheable_key_is_remembered_for_hit_for_miss() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"private")], b"mine")
    await request(cache, origin, b"/api/v1/symbols")
    origin.gate = asyncio.Event()
    tasks = [asyncio.create_task(request(cache, origin, b"/api/v1/symbols")) for _ in range(5)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while len(origin.calls) < 6:  # all five go upstream at once: nobody queues
        assert loop.time() < deadline
        await asyncio.sleep(0)
    origin.gate.set()
    assert [how for how, _ in await asyncio.gather(*tasks)] == ["pass"] * 5
    assert cache.metrics.coalesced_waiters == 0


# --------------------------------------------------------------------------------------------
# Invalidation and purges


async def test_unsafe_request_invalidates_uri_and_location() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=60")], b"x")
    await request(cache, origin, b"/api/v1/symbols")
    await request(cache, origin, b"/api/v1/symbols/BTC")
    await request(cache, origin, b"/api/v1/symbols/ETH")
    removed = cache.invalidate(
        b"POST", 201, b"https", HOST, b"/api/v1/symbols", [(b"location", b"/api/v1/symbols/BTC")]
    )
    assert removed == 2
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.MISS
    assert get(cache, b"/api/v1/symbols/BTC").kind is LookupKind.MISS
    assert get(cache, b"/api/v1/symbols/ETH").kind is LookupKind.HIT
    assert cache.invalidate(b"DELETE", 500, b"https", HOST, b"/api/v1/symbols/ETH", []) == 0


async def test_purges_by_url_prefix_and_tag() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    for path, tags in (
        (b"/api/v1/ticker/BTC", b"btc ticker"),
        (b"/api/v1/ticker/ETH", b"eth ticker"),
        (b"/api/v1/symbols", b"meta"),
    ):
        origin.answer(200, [(b"cache-control", b"max-age=60"), (b"surrogate-key", tags)], b"x")
        await request(cache, origin, path)
    assert b"surrogate-key" not in get(cache, b"/api/v1/symbols").wire  # not shown to clients
    assert (await cache.purges.purge_tag("btc")).local == 1
    purged = await cache.purges.purge_url("https://API.example/api/v1/ticker/ETH?utm_source=x")
    assert purged.local == 1
    await request(cache, origin, b"/api/v1/ticker/BTC")
    assert (await cache.purges.purge_prefix("https://api.example/api/v1/")).local == 2
    assert len(cache.store) == 0
    with pytest.raises(ValueError):
        await cache.purges.purge_prefix("api/v1")


async def test_a_soft_purge_of_a_hot_key_serves_stale_while_one_refresh_runs() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=600, stale-while-revalidate=30")], b"v1")
    await request(cache, origin, b"/api/v1/symbols")
    clock.advance(1)
    result = await cache.purges.purge_url("https://api.example/api/v1/symbols", soft=True)
    assert (result.local, result.kind) == (1, "soft_primary")
    clock.advance(0.01)
    origin.gate = asyncio.Event()
    origin.answer(200, [(b"cache-control", b"max-age=600, stale-while-revalidate=30")], b"v2")
    answers = [await request(cache, origin, b"/api/v1/symbols") for _ in range(200)]
    assert {how for how, _ in answers} == {"stale"}  # not one MISS
    assert {parse(wire)[2] for _, wire in answers} == {b"v1"}
    origin.gate.set()
    await cache.drain()
    assert len(origin.calls) == 2  # the first fill and exactly one refresh
    found = get(cache, b"/api/v1/symbols")
    assert found.kind is LookupKind.HIT and parse(found.wire)[2] == b"v2"


async def test_soft_purges_by_tag_and_prefix_mark_stale_and_hard_ones_remove() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    for path, tags in ((b"/static/btc", b"btc"), (b"/api/v1/symbols", b"meta")):
        origin.answer(
            200, [(b"cache-control", b"max-age=60"), (b"etag", b'"e"'), (b"surrogate-key", tags)]
        )
        await request(cache, origin, path)
    assert (await cache.purges.purge_tag("btc", soft=True)).local == 1
    assert (await cache.purges.purge_tag("btc", soft=True)).local == 0  # stale already
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.HIT
    # No stale window: the next request revalidates (coalesced), it does not miss.
    assert get(cache, b"/static/btc").kind is LookupKind.REVALIDATE
    assert (await cache.purges.purge_prefix("/api/v1/sym", soft=True)).local == 1
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.REVALIDATE
    clock.advance(0.01)
    origin.answer(304, [(b"cache-control", b"max-age=60"), (b"etag", b'"e"')])
    assert (await request(cache, origin, b"/api/v1/symbols"))[0] == "REVALIDATED"
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.HIT
    assert len(cache.store) == 2
    assert (await cache.purges.purge_prefix("https://api.example/")).local == 2
    assert len(cache.store) == 0


async def test_a_fill_racing_a_purge_is_not_stored() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.gate = asyncio.Event()
    origin.answer(200, [(b"cache-control", b"max-age=60")], b"pre-purge")
    task = asyncio.create_task(request(cache, origin, b"/api/v1/symbols"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not origin.calls:
        assert loop.time() < deadline
        await asyncio.sleep(0)
    await cache.purges.purge_prefix("/api/v1/")
    origin.gate.set()
    how, _ = await task
    assert how == "MISS"  # the requester gets its answer...
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.MISS  # ...but it is not kept


def test_purge_token() -> None:
    cache = HttpCache(CacheConfig(purge_token="s3cret"), clock=FakeClock())
    assert cache.check_purge_token("s3cret") and cache.check_purge_token(b"s3cret")
    assert not cache.check_purge_token("s3cret ")
    assert not HttpCache(CacheConfig(), clock=FakeClock()).check_purge_token("")


# --------------------------------------------------------------------------------------------
# Compression offload, metrics


async def test_large_bodies_get_variants_built_off_the_loop() -> None:
    clock = FakeClock()
    cache = make_cache(clock, compressor=gzip_only, compress_offload_above=1000)
    origin = Origin(clock)
    origin.compressible = True
    origin.answer(200, [(b"cache-control", b"max-age=60")], b"0123456789" * 1000)
    await request(cache, origin, b"/api/v1/symbols")
    await cache.drain()
    entry = get(cache, b"/api/v1/symbols").entry
    assert entry is not None and not entry.needs_variant("gzip")


async def test_metrics_exposition() -> None:
    registry = CollectorRegistry()
    clock = FakeClock()
    cache, origin = make_cache(clock, registry=registry), Origin(clock)
    await request(cache, origin, b"/api/v1/ticker/BTC")
    await request(cache, origin, b"/api/v1/ticker/BTC")
    get(cache, b"/x", method=b"POST")
    text = generate_latest(registry).decode()
    assert 'meridian_cache_hits_total{layer="l1"} 1.0' in text
    assert "meridian_cache_misses_total 1.0" in text
    assert 'meridian_cache_bypass_total{reason="method"} 1.0' in text
    assert "meridian_cache_entries 1.0" in text
    assert f"meridian_cache_bytes {float(cache.store.bytes)}" in text
    assert "meridian_cache_hit_ratio 0.5" in text
    for name in ("evictions_total", "coalesced_waiters_total", "redis_circuit_open"):
        assert f"meridian_cache_{name}" in text


async def test_reconfigure_applies_rules_and_limits_keeping_entries() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [], b"x" * 100)
    for i in range(3):
        await request(cache, origin, b"/api/v1/symbols/%d" % i)
    assert len(cache.store) == 3
    bypass_all = CacheRule(path_prefix="/api/", bypass=True)
    smaller = cache.store.bytes - 1
    cache.reconfigure(CacheConfig(rules=(bypass_all,), memory=smaller, lock_timeout=1.0))
    assert cache.store.bytes <= smaller and len(cache.store) == 2
    assert get(cache, b"/api/v1/symbols/2").reason == "rule"
    cache.reconfigure(CacheConfig(rules=(SYMBOLS,)))
    assert get(cache, b"/api/v1/symbols/2").kind is LookupKind.HIT


async def test_an_encoded_body_is_keyed_by_coding_class() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    encoded = gzip.compress(b"payload", mtime=0)
    origin.answer(200, [(b"cache-control", b"max-age=60"), (b"content-encoding", b"gzip")], encoded)
    await request(cache, origin, b"/api/v1/symbols", [(b"accept-encoding", b"gzip")])
    found = get(cache, b"/api/v1/symbols", [(b"accept-encoding", b"gzip")])
    assert found.kind is LookupKind.HIT and parse(found.wire)[2] == encoded
    assert parse(found.wire)[1][b"content-encoding"] == b"gzip"
    # No Vary from the origin, yet a client that cannot decode gzip is not served it.
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.MISS


async def test_per_request_lines_and_max_stale() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=10")], b"v")
    await request(cache, origin, b"/api/v1/symbols")
    found = cache.lookup(
        b"GET", b"https", HOST, b"/api/v1/symbols", [], extra=b"x-request-id: 42\r\n"
    )
    assert parse(found.wire)[1][b"x-request-id"] == b"42"
    clock.advance(15)
    stale = get(cache, b"/api/v1/symbols", [(b"cache-control", b"max-stale=10")])
    assert (stale.kind, stale.reason) == (LookupKind.STALE, "max_stale")
    assert parse(stale.wire)[1][b"age"] == b"15"
    assert get(cache, b"/api/v1/symbols").kind is LookupKind.REVALIDATE


# --------------------------------------------------------------------------------------------
# Memoised hits (the edge replays the bytes of a fresh hit for a repeated request)


def prepared_hit(
    cache: HttpCache, target: bytes, headers: Sequence[Header] = ()
) -> tuple[Prepared, Lookup, HitMemo | None]:
    """A request asked twice within one Age second (a memo needs the entry's kept bytes,
    which it keeps from the second ask on), then memoised."""
    prepared = cache.prepare(b"GET", b"https", HOST, target, [(b"host", HOST), *headers])
    now = cache.clock()
    cache.lookup_prepared(prepared, now)
    lookup = cache.lookup_prepared(prepared, now)
    return prepared, lookup, cache.memo_hit(prepared, lookup, now)


async def test_a_memoised_hit_holds_until_age_ticks() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=10")], b"tick")
    await request(cache, origin, b"/api/v1/ticker/BTC")
    clock.advance(2.25)
    _, lookup, memo = prepared_hit(cache, b"/api/v1/ticker/BTC")
    assert lookup.kind is LookupKind.HIT and memo is not None and memo.wire == lookup.wire
    hits = cache.metrics.l1_hits
    clock.advance(0.5)
    assert cache.replay_hit(memo, clock())  # Age is still 2: the same bytes
    assert cache.metrics.l1_hits == hits + 1  # and it counts as a hit
    clock.advance(0.3)
    assert not cache.replay_hit(memo, clock())  # Age 3 now: the bytes would differ
    _, again, _ = prepared_hit(cache, b"/api/v1/ticker/BTC")
    assert parse(again.wire)[1][b"age"] == b"3"


async def test_a_memoised_hit_never_outlives_its_entry() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=60")], b"old")
    await request(cache, origin, b"/api/v1/symbols")
    clock.advance(0.1)
    memo = prepared_hit(cache, b"/api/v1/symbols")[2]
    assert memo is not None and cache.replay_hit(memo, clock())
    await cache.purges.purge_url("https://api.example/api/v1/symbols")
    assert not cache.replay_hit(memo, clock())  # purged: never replayed

    clock.advance(0.1)  # a fill that started before a purge is not stored
    await request(cache, origin, b"/api/v1/symbols")
    clock.advance(0.1)
    memo = prepared_hit(cache, b"/api/v1/symbols")[2]
    assert memo is not None
    origin.answer(200, [(b"cache-control", b"max-age=60")], b"new")
    # An unsafe request invalidates; the next GET stores a new entry under the same key.
    assert cache.invalidate(b"POST", 200, b"https", HOST, b"/api/v1/symbols", []) == 1
    clock.advance(0.1)
    await request(cache, origin, b"/api/v1/symbols")
    assert not cache.replay_hit(memo, clock())
    clock.advance(0.1)
    memo = prepared_hit(cache, b"/api/v1/symbols")[2]
    assert memo is not None and memo.wire.endswith(b"new")
    cache.reconfigure(cache.config)  # a reload: rules may have changed
    assert not cache.replay_hit(memo, clock())


async def test_stale_answers_are_memoised_until_the_window_or_the_age_moves() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=1, stale-while-revalidate=5")], b"t")
    await request(cache, origin, b"/api/v1/ticker/ETH")
    clock.advance(0.2)
    assert prepared_hit(cache, b"/api/v1/ticker/ETH", [(b"cache-control", b"max-age=5")])[2] is None
    assert prepared_hit(cache, b"/api/v1/ticker/ETH")[2] is not None
    clock.advance(1.5)  # stale, served while revalidating
    _, lookup, memo = prepared_hit(cache, b"/api/v1/ticker/ETH")
    assert lookup.kind is LookupKind.STALE and memo is not None and memo.stale
    assert parse(memo.wire)[1][b"x-cache"] == b"STALE"
    stale_before = dict(cache.metrics.stale)
    assert cache.replay_hit(memo, clock() + 0.1)
    assert sum(cache.metrics.stale.values()) == sum(stale_before.values()) + 1
    assert not cache.replay_hit(memo, clock() + 0.4)  # the Age moves on
    clock.advance(5.0)  # past the stale-while-revalidate window: must revalidate
    _, lookup, memo = prepared_hit(cache, b"/api/v1/ticker/ETH")
    assert lookup.kind is LookupKind.REVALIDATE and memo is None


def fresh(value: bytes) -> bytes:
    return bytes(bytearray(value))


async def test_stored_entries_share_the_header_fields_they_have_in_common() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    entries = []
    for symbol in (b"BTC", b"ETH"):
        origin.answer(
            200,
            [  # new objects for every response, as a parser makes them
                (fresh(b"content-type"), fresh(b"application/json")),
                (fresh(b"cache-control"), fresh(b"max-age=60")),
                (fresh(b"etag"), b'"' + symbol + b'"'),
            ],
            symbol,
        )
        await request(cache, origin, b"/api/v1/ticker/" + symbol)
        entry = get(cache, b"/api/v1/ticker/" + symbol).entry
        assert entry is not None
        entries.append({name: field for field in entry.response.headers for name in field[:1]})
    first, second = entries
    assert first[b"content-type"] is second[b"content-type"]  # one copy for both entries
    assert first[b"cache-control"] is second[b"cache-control"]
    assert first[b"etag"] != second[b"etag"]
    assert parse(get(cache, b"/api/v1/ticker/ETH").wire)[1][b"etag"] == b'"ETH"'


async def test_lookup_read_answers_only_fresh_hits_and_counts_nothing_else() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=10, stale-while-revalidate=60")], b"tick")
    await request(cache, origin, b"/api/v1/ticker/BTC")
    headers = [(b"host", HOST), (b"accept", b"application/json")]
    read = cache.reader.read(False, headers)
    assert not isinstance(read, str)
    asked: list[int] = []

    def own_headers() -> list[Header]:
        asked.append(1)
        return []

    extra = b"x-request-id: r1\r\n"
    found = lookup_read(
        cache, b"https", HOST, b"/api/v1/ticker/BTC", read, headers, own_headers, extra
    )
    assert found is not None and found.kind is LookupKind.HIT
    assert found.wire == get(cache, b"/api/v1/ticker/BTC").wire.replace(
        b"x-cache: ", extra + b"x-cache: "
    )
    assert cache.metrics.l1_hits == 2 and asked == []  # no Vary: its headers never read
    # A miss, a bypassed rule and a stale answer: None, and nothing counted.
    for target in (b"/api/v1/ticker/ETH", b"/api/v1/orders"):
        assert lookup_read(cache, b"https", HOST, target, read, headers, own_headers) is None
    clock.advance(20)
    found = lookup_read(cache, b"https", HOST, b"/api/v1/ticker/BTC", read, headers, own_headers)
    assert found is None
    assert cache.metrics.l1_hits == 2 and cache.metrics.stale == {}


async def test_lookup_read_chooses_a_variant_by_the_requests_own_headers() -> None:
    clock = FakeClock()
    cache, origin = make_cache(clock), Origin(clock)
    origin.answer(200, [(b"cache-control", b"max-age=10"), (b"vary", b"x-tier")], b"gold")
    await request(cache, origin, b"/api/v1/ticker/BTC", [(b"x-tier", b"gold")])
    read = cache.reader.read(False, [(b"host", HOST)])
    assert not isinstance(read, str)
    for tier, answered in ((b"gold", True), (b"free", False)):
        found = lookup_read(
            cache,
            b"https",
            HOST,
            b"/api/v1/ticker/BTC",
            read,
            [(b"host", HOST)],
            lambda tier=tier: [(b"x-tier", tier)],  # type: ignore[misc]
        )
        assert (found is not None) is answered
        if found is not None:
            assert parse(found.wire)[2] == b"gold"
