"""The pipeline's stages in memory: a fake sink, a scripted upstream, injected clocks.

Each test drives ``Pipeline.fast_response`` / ``handle`` as ``edge.protocol`` does and reads
what the sink got and what the upstream was sent.  No sockets, no processes, no sleeps."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.cache.policy import upstream_request_headers
from edge.http1 import BodyKind, rewrite_response_headers
from edge.stages.fill import fill_header_block
from edge.upstream import FailureKind, upstream_headers
from tests.stage_support import (
    Fail,
    FakeBody,
    FakeSink,
    FakeSnapshot,
    MemoryL2,
    Reply,
    make_config,
    request,
    world,
)

TICKER = b'{"symbol":"BTC-USD","price":"97000.12"}'
CACHEABLE = [(b"Content-Type", b"application/json"), (b"Cache-Control", b"max-age=60")]


def reply(*chunks: bytes, headers=CACHEABLE, **kwargs) -> Reply:
    return Reply(headers=list(headers), chunks=chunks or (TICKER,), **kwargs)


# -- hit, miss, fill -------------------------------------------------------------------------


async def test_miss_fills_the_cache_and_the_next_request_is_a_fast_hit() -> None:
    w = world({"http://u1": [reply()]})
    miss = await w.run(request())
    assert miss.status == 200 and bytes(miss.body) == TICKER
    assert miss.header(b"x-cache") == b"MISS"
    assert miss.header(b"x-meridian-region") == b"us-east"
    hit = w.pipeline.fast_response(request())
    assert hit is not None and hit.endswith(TICKER)
    assert b"x-cache: HIT" in hit and b"x-meridian-region: us-east" in hit
    assert len(w.upstream.sent) == 1
    assert w.pipeline.metrics.upstream_stats.in_flight == 0


ONLY_IF_CACHED = [(b"cache-control", b"only-if-cached")]


async def test_only_if_cached_without_l2_is_the_lookups_504() -> None:
    w = world({"http://u1": [reply()]})
    answer = await w.run(request(headers=ONLY_IF_CACHED))
    assert (answer.status, answer.header(b"x-cache")) == (504, b"MISS")
    assert w.upstream.sent == []


@pytest.mark.parametrize("version", ["1.1", "2"])
async def test_only_if_cached_is_answered_from_what_another_instance_put_in_l2(version) -> None:
    """Through the fast path's pending lookup (HTTP/1.1) or the slow path's own (h2)."""
    shared = MemoryL2()
    a, b = world({"http://u1": [reply()]}, l2=shared), world({"http://u1": [reply()]}, l2=shared)
    await a.run(request())
    assert a.pipeline.cache is not None
    await a.pipeline.cache.drain()  # the L2 write is in the background
    only = request(headers=ONLY_IF_CACHED)._replace(http_version=version)
    hit = await b.run(only)
    assert (hit.status, hit.header(b"x-cache"), bytes(hit.body)) == (200, b"HIT", TICKER)
    assert hit.header(b"x-meridian-region") == b"us-east"
    assert b.pipeline.cache is not None and b.pipeline.cache.metrics.l2_hits == 1
    missing = await b.run(
        request("/api/other", headers=ONLY_IF_CACHED)._replace(http_version=version)
    )
    assert (missing.status, missing.header(b"x-cache")) == (504, b"MISS")
    assert b.upstream.sent == [] and shared.reads == 3  # a's fill, then b's two


async def test_a_fill_sends_no_conditionals_and_the_forwarding_headers() -> None:
    w = world({"http://u1": [reply()]})
    await w.run(request(headers=[(b"if-none-match", b'"x"'), (b"x-request-id", b"abc")]))
    (sent,) = w.upstream.sent
    assert sent.method == "GET" and sent.target == "/api/ticker"
    assert "if-none-match" not in sent.headers
    assert sent.headers["x-forwarded-for"] == "192.0.2.7"


async def test_stale_while_revalidate_answers_stale_and_refreshes_once_in_the_background() -> None:
    swr = [(b"Cache-Control", b"max-age=1, stale-while-revalidate=30")]
    w = world({"http://u1": [reply(b"v1", headers=swr), reply(b"v2", headers=swr)]})
    await w.run(request())
    w.cache_clock.advance(5)
    stale = w.pipeline.fast_response(request())
    assert stale is not None and b"x-cache: STALE" in stale and stale.endswith(b"v1")
    again = w.pipeline.fast_response(request())  # one refresh per key, not one per request
    assert again is not None and again.endswith(b"v1")
    await w.settle()
    assert len(w.upstream.sent) == 2
    fresh = w.pipeline.fast_response(request())
    assert fresh is not None and b"x-cache: HIT" in fresh and fresh.endswith(b"v2")


async def test_coalesced_misses_make_one_upstream_request() -> None:
    gate = asyncio.Event()
    w = world({"http://u1": [reply(gate=gate)]})
    first = asyncio.create_task(w.run(request()))
    second = asyncio.create_task(w.run(request()))
    for _ in range(10):
        await asyncio.sleep(0)
    gate.set()
    sinks = await asyncio.gather(first, second)
    assert [bytes(s.body) for s in sinks] == [TICKER, TICKER]
    assert len(w.upstream.sent) == 1


async def test_revalidation_sends_the_validator_and_a_304_refreshes_the_entry() -> None:
    tagged = [*CACHEABLE[:1], (b"Cache-Control", b"max-age=1"), (b"ETag", b'"v1"')]
    not_modified = Reply(status=304, headers=tagged, chunks=(), length=False)
    w = world({"http://u1": [reply(headers=tagged), not_modified]})
    await w.run(request())
    w.cache_clock.advance(5)
    sink = await w.run(request())
    assert w.upstream.sent[1].headers.get("if-none-match") == '"v1"'
    assert sink.status == 200 and bytes(sink.body) == TICKER
    assert sink.header(b"x-cache") == b"REVALIDATED"


async def test_a_response_the_cache_will_not_store_is_streamed_as_a_miss() -> None:
    private = [(b"Cache-Control", b"private")]
    w = world({"http://u1": [reply(b"a", b"b", b"c", headers=private, whole=False)]})
    sink = await w.run(request())
    assert sink.status == 200 and bytes(sink.body) == b"abc" and sink.ended
    assert sink.header(b"x-cache") == b"MISS"
    assert all(r.released for r in w.upstream.responses)
    assert w.upstream.outstanding == {"http://u1": 0}


# -- bypass ----------------------------------------------------------------------------------


async def test_post_is_forwarded_with_its_body_and_invalidates_the_cached_get() -> None:
    w = world({"http://u1": [reply(b"v1"), Reply(status=201, chunks=(b"done",)), reply(b"v2")]})
    await w.run(request())
    post = await w.run(request(method="POST", body=b"order=1"), FakeBody(b"order=", b"1"))
    assert post.status == 201 and bytes(post.body) == b"done"
    assert post.header(b"x-cache") == b"BYPASS"
    assert w.upstream.sent[1].method == "POST" and w.upstream.sent[1].body == b"order=1"
    after = await w.run(request())
    assert bytes(after.body) == b"v2" and after.header(b"x-cache") == b"MISS"


async def test_without_a_cache_a_get_is_forwarded_as_a_miss() -> None:
    w = world({"http://u1": [reply()]}, cached=False)
    sink = await w.run(request())
    assert sink.status == 200 and bytes(sink.body) == TICKER
    assert sink.header(b"x-cache") == b"MISS"


# -- the upstream walk -----------------------------------------------------------------------


async def test_connect_failure_fails_over_to_the_next_region() -> None:
    w = world({"http://u1": [Fail(FailureKind.CONNECT)], "http://e1": [reply()]})
    sink = await w.run(request())
    assert sink.status == 200 and sink.header(b"x-meridian-region") == b"eu-central"
    assert [s.backend for s in w.upstream.sent] == ["http://u1", "http://e1"]
    assert ("http://u1", False) in w.health.reports and ("http://e1", True) in w.health.reports


@pytest.mark.parametrize(
    ("kind", "status", "reason"),
    [
        (FailureKind.CONNECT, 502, b"upstream_connect"),
        (FailureKind.RESET, 502, b"upstream_reset"),
        (FailureKind.TIMEOUT, 504, b"upstream_timeout"),
    ],
)
async def test_every_backend_failing_is_answered_by_the_edge(kind, status, reason) -> None:
    w = world({"http://u1": [Fail(kind)], "http://e1": [Fail(kind)]})
    sink = await w.run(request())
    assert sink.status == status and reason in bytes(sink.body)
    assert sink.header(b"x-cache") == b"MISS"


async def test_no_healthy_region_is_a_503_with_retry_after() -> None:
    w = world({"http://u1": [reply()]})
    w.health.snapshot = FakeSnapshot(frozenset({"http://u1", "http://e1"}))
    sink = await w.run(request())
    assert sink.status == 503 and sink.header(b"retry-after") == b"5"
    assert b"no_healthy_region" in bytes(sink.body)
    assert w.upstream.sent == []


async def test_no_route_is_a_404() -> None:
    w = world()
    sink = await w.run(request("/elsewhere"))
    assert sink.status == 404 and b"no_route" in bytes(sink.body)


async def test_a_fill_broken_mid_body_is_a_502_that_closes_and_blames_the_backend() -> None:
    w = world({"http://u1": [reply(b"a", b"b", whole=False, broken_after=1)]})
    sink = await w.run(request())
    assert sink.status == 502 and sink.closed
    assert b"upstream_broke_mid_body" in bytes(sink.body)
    assert ("http://u1", False) in w.health.reports
    assert w.upstream.outstanding == {"http://u1": 0}


async def test_a_stream_broken_mid_body_aborts_the_client_connection() -> None:
    broken = Reply(chunks=(b"a", b"b", b"c"), whole=False, broken_after=2, length=False)
    w = world({"http://u1": [broken]}, cached=False)
    sink = await w.run(request())
    assert sink.status == 200 and sink.framing is not None
    assert sink.framing.kind is BodyKind.CHUNKED
    assert bytes(sink.body) == b"ab" and sink.aborted and not sink.ended


async def test_the_total_deadline_cancels_into_a_504() -> None:
    never = asyncio.Event()
    w = world({"http://u1": [reply(gate=never)]})
    sink = FakeSink()
    task = asyncio.create_task(w.run(request(), sink=sink))
    for _ in range(5):
        await asyncio.sleep(0)
    assert sink.expires_after == w.pipeline.state.config.edge.timeouts.total
    sink.deadline_expired = True  # what the connection's sweep does when it passes
    task.cancel()
    await task
    assert sink.status == 504 and b"deadline_exceeded" in bytes(sink.body)
    assert w.pipeline.metrics.upstream_stats.in_flight == 0


async def test_a_backend_leaving_rotation_is_given_up_on_and_retried_elsewhere() -> None:
    never = asyncio.Event()
    w = world({"http://u1": [reply(gate=never)], "http://e1": [reply()]})
    task = asyncio.create_task(w.run(request()))
    for _ in range(5):
        await asyncio.sleep(0)
    w.pipeline.on_health(FakeSnapshot(frozenset({"http://u1"})))
    sink = await task
    assert sink.status == 200 and sink.header(b"x-meridian-region") == b"eu-central"
    assert ("http://u1", False) not in w.health.reports  # abandoned, not blamed


async def test_a_request_with_nowhere_else_to_go_is_not_watched_for_rotation() -> None:
    """With one backend in all the service's regions, ``on_health`` could never send the
    request elsewhere: the walk does not register it (no task lookup per request), and the
    backend leaving rotation leaves it waiting for its answer."""
    gate = asyncio.Event()
    config = make_config(services={"market": {"regions": ["us-east"]}})
    w = world({"http://u1": [reply(gate=gate)]}, config=config)
    task = asyncio.create_task(w.run(request()))
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(w.upstream.sent) == 1 and not w.pipeline.walker._waiting
    w.pipeline.on_health(FakeSnapshot(frozenset({"http://u1"})))
    gate.set()
    sink = await task
    assert sink.status == 200 and sink.header(b"x-meridian-region") == b"us-east"


# -- response headers: one function for the edge and for its tests ---------------------------


HEADER = st.tuples(
    st.sampled_from(
        [b"Via", b"Connection", b"Keep-Alive", b"Proxy-X", b"X-Cache", b"ETag", b"X-Private"]
    ),
    st.binary(min_size=1, max_size=5).map(lambda b: b.replace(b",", b"x")),
)


@settings(max_examples=200)
@given(st.lists(HEADER, max_size=8))
def test_response_header_rewrite_drops_hop_by_hop_and_joins_via(lines) -> None:
    out = rewrite_response_headers(
        lines, dropped=frozenset({b"x-cache"}), via=b"1.1 meridian-iad", region="us-east"
    )
    names = [name for name, _ in out]
    assert not {b"connection", b"keep-alive", b"x-cache"} & set(names)
    assert not any(name.startswith(b"proxy") for name in names)
    assert names[-2:] == [b"via", b"x-meridian-region"] and names.count(b"via") == 1
    assert out[-2][1].endswith(b"1.1 meridian-iad")
    plain = rewrite_response_headers(lines)
    assert [n for n in names[:-2]] == [
        n for n in (x for x, _ in plain) if n not in (b"via", b"x-cache")
    ]


def _rewrite_reference(
    lines: list[tuple[bytes, bytes]], dropped: frozenset[bytes], via: bytes | None
) -> list[tuple[bytes, bytes]]:
    """``rewrite_response_headers`` as its docstring states it, in three plain passes."""
    lowered = [(name.lower(), value) for name, value in lines]
    named = {
        token.strip().lower()
        for name, value in lowered
        if name == b"connection"
        for token in value.split(b",")
        if token.strip()
    }
    hop = {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
    kept = [
        (name, value)
        for name, value in lowered
        if name not in hop
        and name != b"content-length"
        and name not in dropped
        and not name.startswith(b"proxy")
        and name not in named
    ]
    if via is None:
        return kept
    prior = [value for name, value in kept if name == b"via"]
    return [line for line in kept if line[0] != b"via"] + [(b"via", b", ".join([*prior, via]))]


CONNECTION_VALUE = st.lists(
    st.sampled_from([b"close", b"Keep-Alive", b"x-private", b"VIA", b"etag", b" ", b"upgrade"]),
    max_size=3,
).map(b",".join)


@settings(max_examples=300)
@given(
    st.lists(
        st.one_of(
            HEADER, st.tuples(st.sampled_from([b"Connection", b"connection"]), CONNECTION_VALUE)
        ),
        max_size=10,
    ),
    st.booleans(),
)
def test_response_header_rewrite_matches_the_plain_reading(lines, with_via) -> None:
    """The one-pass rewrite drops exactly what the three-pass reading does, in the same order,
    whatever the Connection lines name (Via and end-to-end fields included)."""
    via = b"1.1 meridian-iad" if with_via else None
    dropped = frozenset({b"x-cache"})
    assert rewrite_response_headers(lines, dropped=dropped, via=via) == _rewrite_reference(
        lines, dropped, via
    )


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [b"host", b"if-none-match", b"range", b"content-length", b"if-range", b"accept"]
            ),
            st.binary(min_size=0, max_size=4),
        ),
        max_size=8,
    )
)
def test_fill_header_block_is_the_composed_reading(lines) -> None:
    """The one-pass fill header block is what the three steps it replaces make."""
    assert fill_header_block(lines) == upstream_headers(upstream_request_headers(lines, ()))


def test_config_for_the_stages_routes_market_paths() -> None:
    config = make_config()
    assert [r.name for r in config.edge.routes] == ["market"]
