"""The cache's byte count covers what it really holds (issue 21, 14): entries with their
objects, headers, variants and cached responses; the key memo; hit memos of evicted entries.

Measured with tracemalloc (every Python allocation the cache makes), in process and without
sleeps; the RSS of a real edge is ``test_reliability_cache.py``'s.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

from edge.cache import HttpCache, LookupKind, UpstreamResponse
from edge.cache.key import KeyBuilder
from edge.cache.policy import parse_http_date
from edge.cache.testing import FakeClock
from edge.compress import compress
from meridian.config import CacheConfig, CacheRule

HOST = b"api.example"


def _compressor(body: bytes, coding: str) -> bytes:
    return compress(body, coding, 6)  # type: ignore[arg-type]


def _cache(memory: int, clock: FakeClock) -> HttpCache:
    return HttpCache(
        CacheConfig(memory=memory, rules=(CacheRule(path_prefix="/", ttl=3600.0),)),
        clock=clock,
        extra_headers=[(b"via", b"1.1 meridian-iad")],
        compressor=_compressor,
    )


async def _fill(cache: HttpCache, keys: range, size: int, codings: tuple[str, ...]) -> None:
    """One miss per key (an origin-like answer), then a hit per coding in ``codings``."""
    for n in keys:
        target = b"/api/v1/ticker/K%d?size=%d" % (n, size)
        headers = [(b"host", HOST)]
        lookup = cache.lookup(b"GET", b"https", HOST, target, headers)
        body = (b'{"n": %d, "pad": "' % n).ljust(size - 2, b"p") + b'"}'

        async def fetch(
            validators: list[tuple[bytes, bytes]], body: bytes = body, n: int = n
        ) -> UpstreamResponse:
            return UpstreamResponse(
                200,
                [
                    (b"content-type", b"application/json; charset=utf-8"),
                    (b"date", b"Sun, 06 Dec 2026 07:02:%02d GMT" % (n % 60)),
                    (b"server", b"Python/3.11 aiohttp/3.9.5"),
                    (b"cache-control", b"public, max-age=3600"),
                    (b"etag", b'"%d"' % n),
                    (b"x-meridian-region", b"us-east"),
                ],
                body,
                compressible=True,
            )

        await cache.fill(lookup, fetch)
        for coding in codings:
            hit = cache.lookup(
                b"GET", b"https", HOST, target, [*headers, (b"accept-encoding", coding.encode())]
            )
            # A bounded cache may evict it while it grows (every entry is hit, so CLOCK
            # goes round); the unbounded one must not.
            assert hit.kind is LookupKind.HIT or cache.store.evictions


def _traced_growth(cache: HttpCache, keys: range, size: int, codings: tuple[str, ...]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        asyncio.run(_fill(cache, keys, size, codings))
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_the_count_covers_what_entries_really_hold() -> None:
    """No eviction: every byte allocated for the entries must be in ``store.bytes``.  Before,
    hit responses, heads and variants were counted by length only and the key memo not at
    all: 2,000 entries of 200 B with three codings took ~14% more than counted."""
    for size, codings in ((200, ("gzip", "br", "identity")), (2000, ("gzip",)), (200, ())):
        cache = _cache(1 << 40, FakeClock())
        asyncio.run(_fill(cache, range(10**6, 10**6 + 50), size, codings))  # warm the pools
        counted_before = cache.store.bytes
        traced = _traced_growth(cache, range(2000), size, codings)
        counted = cache.store.bytes - counted_before
        print(
            f"\nbody {size} B, hits {codings}: counted {counted / 2000:.0f} B per entry, "
            f"allocated {traced / 2000:.0f} B per entry"
        )
        assert traced <= counted, (size, codings, traced / 2000, counted / 2000)
        assert counted <= 1.3 * traced  # and not wildly over (capacity is wasted then)


def test_a_full_cache_allocates_no_more_than_its_bound_with_five_times_the_keys() -> None:
    """5x more keys than fit, each hit in two codings: what stays allocated after the churn
    (entries, the key memo, the store's dicts) is within the bound plus 1 MiB (the key memo
    is 1/16 of the bound here)."""
    bound = 4 << 20
    cache = _cache(bound, FakeClock())
    traced = _traced_growth(cache, range(5 * bound // 2000), 1000, ("gzip", "identity"))
    assert cache.store.bytes <= bound and cache.store.evictions > 0
    assert traced <= bound + (1 << 20), f"{traced / (1 << 20):.1f} MiB for a 4 MiB cache"


def test_the_key_memo_is_bounded_in_bytes() -> None:
    """65,536 memoised keys of long URLs were ~60 MB outside the cache's bound."""
    keys = KeyBuilder((), memo_bytes=1 << 20)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(20_000):
            keys.build(b"https", HOST, b"/api/v1/symbols/%d?%s" % (n, b"q" * 500))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2 << 20, f"{held / (1 << 20):.1f} MiB"


def test_a_hit_memo_does_not_keep_an_evicted_entry_alive() -> None:
    date = parse_http_date(b"Sun, 06 Dec 2026 07:02:00 GMT")
    assert date is not None
    clock = FakeClock(date)  # the origin's Date: Age 0 (a memo needs a known Age)
    cache = _cache(1 << 30, clock)
    asyncio.run(_fill(cache, range(1), 5000, ("identity",)))
    clock.advance(0.1)
    headers = [(b"host", HOST), (b"accept-encoding", b"identity")]
    prepared = cache.prepare(b"GET", b"https", HOST, b"/api/v1/ticker/K0?size=5000", headers)
    lookup = cache.lookup_prepared(prepared)
    memo = cache.memo_hit(prepared, lookup, clock())
    assert memo is not None and memo.entry is lookup.entry
    assert cache.replay_hit(memo, clock()) and memo.wire == lookup.wire
    del lookup
    cache.store.clear()  # evicted (or purged)
    gc.collect()
    assert memo.entry is None  # freed: the memo held it weakly, and no copy of its bytes
    assert not cache.replay_hit(memo, clock())
