"""The fill chain's short path: a fill led in ``Fills.fill`` itself (``Coalescer.lead``, ``led``,
``abandon``; ``Filling.fill_once`` handing back ``_fetch``'s coroutine without L2; a first fill
fetched in ``Fills.fill`` and stored by ``Filling.fetched``) answers, stores, counts and
coalesces exactly as the same fill led through ``Coalescer.run`` and ``Filling._fetch``.

In memory: a ``FakeClock`` and a gated scripted origin, no sockets, no sleeps (the loop is only
yielded to)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.cache import Filled, HttpCache, Lookup, LookupKind, UpstreamResponse
from edge.cache.coalesce import Coalescer, Role, leads_fill
from edge.cache.entry import X_CACHE_HIT
from edge.cache.filling import FROM_STALE
from edge.cache.fills import Fills, _fill_pair
from edge.cache.messages import Fetch
from edge.cache.policy import STALE_IF_ERROR, format_http_date
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


def make_cache(clock: FakeClock) -> HttpCache:
    return HttpCache(CacheConfig(rules=(RULE,), hit_for_miss=10.0, lock_timeout=5.0), clock=clock)


async def through_run(fills: Fills, lookup: Lookup, fetch: Fetch, extra: bytes = b"") -> Filled:
    """``Fills.fill`` as it was before its short path: every fill through ``Coalescer.run``,
    led or joined, onto ``Filling.fill_once`` (its ``_fetch`` frame and all)."""
    key, request = lookup.key, lookup.request
    assert key is not None and request is not None
    filling = fills._filling
    for _round in range(2):
        coalesce_key = filling.coalesce_key(key, request)
        outcome, role = await fills._coalescer.run(
            coalesce_key, lambda: _fill_pair(filling, key, request, lookup.entry, fetch)
        )
        entry = outcome.entry
        if role is not Role.WAITER or entry is None:
            fills._count(outcome)
            return fills._deliver(outcome, request, extra + outcome.leader_lines)
        if filling.usable_by(entry, request):
            if outcome.source == FROM_STALE:
                fills._metrics.count_stale(STALE_IF_ERROR)
                return fills._deliver(outcome, request, extra)
            fills._metrics.coalesced_hits += 1
            return fills._deliver(outcome._replace(x_cache=X_CACHE_HIT), request, extra)
    outcome, _, _ = await filling.fill_once(key, request, lookup.entry, fetch)
    fills._count(outcome)
    return fills._deliver(outcome, request, extra + outcome.leader_lines)


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


#: One step: the origin's answer; the requests, each a language and whether it is late (looked
#: up with the others, filled after they end: another fill landed meanwhile); whether the first
#: request (the leader) is cancelled while it fetches; the seconds the clock moves after.
STEPS = st.lists(
    st.tuples(
        st.sampled_from(sorted(ANSWERS)),
        st.lists(st.tuples(st.sampled_from([b"en", b"de"]), st.booleans()), min_size=1, max_size=4),
        st.booleans(),
        st.sampled_from([0.0, 6.0, 50.0]),
    ),
    min_size=1,
    max_size=5,
)


Step = tuple[str, list[tuple[bytes, bool]], bool, float]


async def play(steps: list[Step], *, general: bool) -> Any:
    clock = FakeClock()
    cache = make_cache(clock)
    fill = partial(through_run, cache.fills) if general else cache.fill
    origin = Origin(clock)
    trace: list[object] = []
    for answer, requests, cancel, advance in steps:
        origin.answer = answer
        origin.gate = asyncio.Event()
        lookups = [(lookup(cache, language), late) for language, late in requests]
        trace.append([found.kind for found, _ in lookups])
        fillable = [
            (found, late)
            for found, late in lookups
            if found.kind in (LookupKind.MISS, LookupKind.REVALIDATE)
        ]
        fills = [
            asyncio.create_task(fill(found, origin.fetch)) for found, late in fillable if not late
        ]
        await yield_to_loop()
        trace.append([leads_fill(task) for task in fills])
        if cancel and fills:
            fills[0].cancel()
            await yield_to_loop()
        origin.gate.set()
        results: list[Filled | BaseException] = list(
            await asyncio.gather(*fills, return_exceptions=True)
        )
        for found, late in fillable:
            if late:
                try:
                    results.append(await fill(found, origin.fetch))
                except Exception as error:
                    results.append(error)
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
def test_a_fill_led_in_fills_is_one_led_through_run(steps: list[Step]) -> None:
    short = asyncio.run(play(steps, general=False))
    general = asyncio.run(play(steps, general=True))
    assert short == general


async def test_a_first_miss_leads_without_run_or_fetch_frame_and_is_known_to_lead() -> None:
    clock = FakeClock()
    cache = make_cache(clock)

    async def no_run(key: bytes, fetch: object) -> tuple[object, Role]:
        raise AssertionError("a first miss went through Coalescer.run")

    def no_fetch_frame(*args: object) -> object:
        raise AssertionError("a first miss went through Filling._fetch")

    cache.fills._coalescer.run = no_run  # type: ignore[method-assign, assignment]
    cache.fills._filling._fetch = no_fetch_frame  # type: ignore[method-assign, assignment]
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
