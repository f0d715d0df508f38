"""The fill chain's short path: a fill led in ``Fills.fill`` itself (``Coalescer.lead``, ``led``,
``abandon``; ``Filling.fill_once`` handing back ``_fetch``'s coroutine without L2) answers,
stores, counts and coalesces exactly as the same fill led through ``Coalescer.run``.

In memory: a ``FakeClock`` and a gated scripted origin, no sockets, no sleeps (the loop is only
yielded to)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.cache import Filled, HttpCache, Lookup, LookupKind, UpstreamResponse
from edge.cache.coalesce import Coalescer, Role, leads_fill
from edge.cache.policy import format_http_date
from edge.cache.testing import FakeClock
from meridian.config import CacheConfig, CacheRule

Header = tuple[bytes, bytes]
HOST = b"api.example"
RULE = CacheRule(path_prefix="/api/", ttl=5.0, stale_if_error=30.0)

#: What the origin answers in one step of a scenario.
ANSWERS: dict[str, tuple[int, list[Header]]] = {
    "fresh": (200, [(b"cache-control", b"max-age=5"), (b"etag", b'"v1"')]),
    "other-etag": (200, [(b"cache-control", b"max-age=5"), (b"etag", b'"v2"')]),
    "no-store": (200, [(b"cache-control", b"no-store")]),
    "private": (200, [(b"cache-control", b"private, max-age=5")]),
    "vary": (200, [(b"cache-control", b"max-age=5"), (b"vary", b"accept-language")]),
    "error": (503, [(b"cache-control", b"no-store")]),
    "not-modified": (304, [(b"etag", b'"v1"'), (b"cache-control", b"max-age=5")]),
    "raise": (0, []),
}


class Origin:
    """A gated scripted origin: every fetch waits for ``gate``, then answers ``answer``."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.answer = "fresh"
        self.gate = asyncio.Event()
        self.calls: list[list[Header]] = []

    async def fetch(self, validators: list[Header]) -> UpstreamResponse:
        self.calls.append(validators)
        await self.gate.wait()
        status, headers = ANSWERS[self.answer]
        if not status:
            raise ConnectionError("origin down")
        lines = [(b"date", format_http_date(self.clock())), *headers]
        return UpstreamResponse(status, lines, b"" if status == 304 else b"body %d" % status)


def make_cache(clock: FakeClock, *, through_run: bool) -> HttpCache:
    cache = HttpCache(CacheConfig(rules=(RULE,), hit_for_miss=10.0, lock_timeout=5.0), clock=clock)
    if through_run:  # the general path: every fill goes through ``Coalescer.run``
        cache.fills._coalescer.lead = lambda key: None  # type: ignore[method-assign]
    return cache


def lookup(cache: HttpCache, language: bytes) -> Lookup:
    headers: Sequence[Header] = [(b"host", HOST), (b"accept-language", language)]
    return cache.lookup(b"GET", b"https", HOST, b"/api/thing", list(headers))


async def yield_to_loop(turns: int = 8) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


def outcome(result: Filled | BaseException) -> object:
    if isinstance(result, BaseException):
        return type(result).__name__, str(result)
    response = result.response
    return (
        result.wire,
        result.x_cache,
        None if response is None else (response.status, response.headers, response.body),
        result.entry is not None,
    )


#: One step: the origin's answer, the languages of the concurrent requests, whether the first
#: request (the leader) is cancelled while it fetches, and the seconds the clock moves after.
STEPS = st.lists(
    st.tuples(
        st.sampled_from(sorted(ANSWERS)),
        st.lists(st.sampled_from([b"en", b"de"]), min_size=1, max_size=4),
        st.booleans(),
        st.sampled_from([0.0, 6.0, 50.0]),
    ),
    min_size=1,
    max_size=5,
)


async def play(steps: list[tuple[str, list[bytes], bool, float]], *, through_run: bool) -> Any:
    clock = FakeClock()
    cache = make_cache(clock, through_run=through_run)
    origin = Origin(clock)
    trace: list[object] = []
    for answer, languages, cancel, advance in steps:
        origin.answer = answer
        origin.gate = asyncio.Event()
        lookups = [lookup(cache, language) for language in languages]
        trace.append([found.kind for found in lookups])
        fills = [
            asyncio.create_task(cache.fill(found, origin.fetch))
            for found in lookups
            if found.kind in (LookupKind.MISS, LookupKind.REVALIDATE)
        ]
        await yield_to_loop()
        trace.append([leads_fill(task) for task in fills])
        if cancel and fills:
            fills[0].cancel()
            await yield_to_loop()
        origin.gate.set()
        results = await asyncio.gather(*fills, return_exceptions=True)
        trace.append([outcome(result) for result in results])
        trace.append([leads_fill(task) for task in fills])
        trace.append((len(cache.fills), sorted(cache.fills._coalescer.hit_for_miss._until)))
        clock.advance(advance)
    metrics = cache.metrics
    trace.append(
        (
            metrics.misses,
            metrics.l1_hits,
            metrics.coalesced_hits,
            metrics.coalesced_waiters,
            metrics.stale,
        )
    )
    trace.append(origin.calls)
    trace.append(sorted(entry.key for entry in cache.store.entries()))
    return trace


@settings(max_examples=200, deadline=None)
@given(STEPS)
def test_a_fill_led_in_fills_is_one_led_through_run(
    steps: list[tuple[str, list[bytes], bool, float]],
) -> None:
    short = asyncio.run(play(steps, through_run=False))
    general = asyncio.run(play(steps, through_run=True))
    assert short == general


async def test_a_first_miss_leads_without_run_and_is_known_to_lead() -> None:
    clock = FakeClock()
    cache = make_cache(clock, through_run=False)

    async def no_run(key: bytes, fetch: object) -> tuple[object, Role]:
        raise AssertionError("a first miss went through Coalescer.run")

    cache.fills._coalescer.run = no_run  # type: ignore[method-assign, assignment]
    origin = Origin(clock)
    fill = asyncio.create_task(cache.fill(lookup(cache, b"en"), origin.fetch))
    await yield_to_loop()
    assert leads_fill(fill) and len(cache.fills) == 1
    origin.gate.set()
    filled = await fill
    assert filled.x_cache == b"MISS" and filled.wire is not None
    assert not leads_fill(fill) and len(cache.fills) == 0


@pytest.mark.parametrize("error", [ConnectionError("down"), asyncio.CancelledError()])
async def test_an_abandoned_lead_settles_its_waiters_as_run_does(error: BaseException) -> None:
    co: Coalescer[str] = Coalescer(lock_timeout=5.0, hit_for_miss=10.0, clock=FakeClock())
    flight = co.lead(b"k")
    assert flight is not None and co.lead(b"k") is None  # one leader per key
    answered = asyncio.Event()

    async def second() -> tuple[str, bool]:
        answered.set()
        return "second", True

    waiter = asyncio.create_task(co.run(b"k", second))
    await yield_to_loop()
    co.abandon(b"k", flight, error)
    if isinstance(error, asyncio.CancelledError):
        assert await waiter == ("second", Role.LEADER)  # coalesced again, and led this time
    else:
        with pytest.raises(ConnectionError):
            await waiter
        assert not answered.is_set()
    assert not co.in_flight(b"k")


async def test_lead_defers_to_run_for_a_key_remembered_uncacheable() -> None:
    clock = FakeClock()
    co: Coalescer[str] = Coalescer(lock_timeout=5.0, hit_for_miss=10.0, clock=clock)
    flight = co.lead(b"k")
    assert flight is not None
    co.led(b"k", flight, "private", False)
    assert co.lead(b"k") is None and co.hit_for_miss.active(b"k", clock())
    clock.advance(11.0)
    assert co.lead(b"k") is None  # expired, but ``run`` is the one to forget it
    assert await co.run(b"k", _answer("fresh")) == ("fresh", Role.LEADER)
    flight = co.lead(b"k")
    assert flight is not None
    co.led(b"k", flight, "fresh", True)
    assert b"k" not in co.hit_for_miss


def _answer(value: str) -> Any:
    async def fetch() -> tuple[str, bool]:
        return value, True

    return fetch
