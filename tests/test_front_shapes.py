"""Heads read by their shape (``edge.h1fast``, step 3): a head seen for the first time whose
fields but User-Agent, Cookie and the request ID were seen before, with another target.  Only
its request line is read, and only a cache hit is answered that way; these tests hold it to
what the full parse of the same bytes decides.  In memory: bytes in through ``data_received``,
the pipeline behind it scripted (``tests.stage_support``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import edge.h1fast
import edge.stages.fill
from edge.cache import LookupKind
from edge.exchange import ProxyRequest
from edge.fasthead import parse_simple_head
from edge.h1fast import HeadShortcuts
from edge.protocol import EdgeConnection
from tests.stage_support import Reply, world
from tests.test_front_http1 import Client as Http1Client
from tests.test_front_http1 import responses

BODY = b'{"symbols":["BTC-USD","ETH-USD"]}'
CACHEABLE = [(b"Content-Type", b"application/json"), (b"Cache-Control", b"max-age=60")]


def head(target: bytes, n: int, *, cookie: bytes = b"theme=dark", rid: bool = True) -> bytes:
    """A browser-like head whose User-Agent, Cookie and request ID are new each time."""
    return (
        b"GET " + target + b" HTTP/1.1\r\nHost: example.test\r\nAccept: application/json\r\n"
        b"User-Agent: sdk/%d\r\nCookie: session=%d; "
        % (n, n)
        + cookie
        + b"\r\n"
        + (b"X-Request-Id: req-%d\r\n" % n if rid else b"")
        + b"Accept-Language: en\r\n\r\n"
    )


class Client(Http1Client):
    async def ask(self, data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send ``data``; its response (the next one written)."""
        count = len(responses(bytes(self.transport.written))) + 1
        self.send(data)
        return (await self.responses(count))[count - 1]


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Heads ``parse_simple_head`` read in full."""
    seen: list[bytes] = []
    real: Callable[..., Any] = edge.h1fast.parse_simple_head

    def counting(data: bytes, **limits: Any) -> Any:
        seen.append(data)
        return real(data, **limits)

    monkeypatch.setattr(edge.h1fast, "parse_simple_head", counting)
    return seen


@pytest.fixture
async def client() -> Any:
    w = world({"http://u1": [Reply(headers=CACHEABLE, chunks=(BODY,))]})
    c = Client(w)
    yield c
    c.connection.connection_lost(None)


async def fill(client: Client, targets: list[bytes]) -> None:
    for target in targets:
        status, headers, _ = await client.ask(
            b"GET " + target + b" HTTP/1.1\r\nHost: example.test\r\n\r\n"
        )
        assert status == 200 and headers[b"x-cache"] == b"MISS"


async def test_first_sight_hits_of_a_known_shape_skip_the_parse_and_answer_as_it_would(
    client: Client, parses: list[bytes]
) -> None:
    targets = [b"/api/v1/symbols?k=%d" % k for k in range(5)]
    await fill(client, targets)
    hits_before = client.world.pipeline.cache.metrics.l1_hits  # type: ignore[union-attr]
    parses.clear()
    # The first head of the shape is parsed in full; the others are read by their shape.
    answers = [await client.ask(head(target, n)) for n, target in enumerate(targets)]
    assert parses == [head(targets[0], 0)]
    for n, (status, headers, body) in enumerate(answers):
        assert status == 200 and body == BODY
        assert headers[b"x-cache"] == b"HIT" and b"age" in headers
        assert headers[b"x-request-id"] == b"req-%d" % n  # this request's, echoed
    # Each hit counted once; nothing went upstream.
    assert client.world.pipeline.cache.metrics.l1_hits == hits_before + 5  # type: ignore[union-attr]
    assert len(client.world.upstream.sent) == 5
    # Without a request ID, the edge makes one (never another request's).
    await fill(client, [b"/api/v1/symbols?k=9"])
    _, headers, _ = await client.ask(head(b"/api/v1/symbols?k=9", 9, rid=False))
    assert headers[b"x-cache"] == b"HIT" and b"x-request-id" not in headers


async def test_a_key_hit_again_is_read_by_its_shape_until_its_third_sight_memoises_it(
    client: Client, parses: list[bytes]
) -> None:
    # Traffic spread over many keys hits each now and then: a second sight is read by its
    # shape (a full parse and a memo would not pay), a third is parsed and memoised whole.
    targets = [b"/api/v1/symbols?k=%d" % k for k in range(2)]
    await fill(client, targets)
    await client.ask(head(targets[0], 0))  # learns the shape
    parses.clear()
    heads = client.world.pipeline.state.request_heads
    memoised = len(heads)
    for n in (1, 2):
        status, headers, body = await client.ask(head(targets[1], n))
        assert status == 200 and body == BODY and headers[b"x-cache"] == b"HIT"
        assert headers[b"x-request-id"] == b"req-%d" % n
    assert parses == [] and len(heads) == memoised
    third = head(targets[1], 3)
    status, headers, _ = await client.ask(third)
    assert headers[b"x-cache"] == b"HIT" and headers[b"x-request-id"] == b"req-3"
    assert parses == [third] and len(heads) == memoised + 1


async def test_a_miss_of_a_known_shape_goes_upstream_as_the_full_parse_reads_it(
    client: Client, parses: list[bytes]
) -> None:
    await fill(client, [b"/api/v1/symbols?k=0"])
    await client.ask(head(b"/api/v1/symbols?k=0", 0))  # learns the shape
    parses.clear()
    data = head(b"/api/v1/symbols?k=77", 77)
    status, headers, _ = await client.ask(data)
    assert status == 200 and headers[b"x-cache"] == b"MISS"
    assert headers[b"x-request-id"] == b"req-77"
    # A first sight that misses goes upstream from its shape: no full parse.
    assert parses == []
    sent = client.world.upstream.sent[-1]
    assert sent.target == "/api/v1/symbols?k=77"
    assert sent.headers["user-agent"] == "sdk/77"
    assert sent.headers["cookie"] == "session=77; theme=dark"
    # Header order as the client sent it (the shape's own order puts volatile fields last).
    names = [name.lower() for name in sent.headers]
    assert names.index("user-agent") < names.index("accept-language")
    # The very request the full parse makes of it: the same bytes where no shape is known.
    w = world({"http://u1": [Reply(headers=CACHEABLE, chunks=(BODY,))]})
    other = Client(w)
    parses.clear()
    assert (await other.ask(data))[1][b"x-cache"] == b"MISS"
    assert parses == [data]
    parsed = w.upstream.sent[-1]
    assert parsed.target == sent.target
    assert list(parsed.headers.items()) == list(sent.headers.items())
    other.connection.connection_lost(None)


async def test_a_miss_of_a_known_shape_seen_before_is_read_in_full_and_memoised(
    parses: list[bytes],
) -> None:
    # Uncacheable: each sight of the head goes upstream.
    private = [(b"Content-Type", b"application/json"), (b"Cache-Control", b"private")]
    w = world({"http://u1": [Reply(headers=private, chunks=(BODY,))]})
    client = Client(w)
    await fill(client, [b"/api/v1/symbols?k=0"])
    await client.ask(head(b"/api/v1/symbols?k=0", 0))  # learns the shape
    heads = w.pipeline.state.request_heads
    memoised = len(heads)
    parses.clear()
    first = head(b"/api/v1/symbols?k=5", 5)
    status, headers, _ = await client.ask(first)  # a first sight: from its shape
    assert status == 200 and headers[b"x-cache"] == b"MISS" and parses == []
    again = head(b"/api/v1/symbols?k=5", 5)
    status, headers, _ = await client.ask(again)  # seen before: read in full, memoised
    assert status == 200 and headers[b"x-cache"] == b"MISS" and parses == [again]
    assert len(heads) == memoised + 1
    sent = w.upstream.sent[-2:]
    assert [s.target for s in sent] == ["/api/v1/symbols?k=5"] * 2
    assert list(sent[0].headers.items()) == list(sent[1].headers.items())
    client.connection.connection_lost(None)


async def test_a_miss_of_a_known_shape_keeps_its_cookie_from_the_fill(
    parses: list[bytes],
) -> None:
    # A response the origin says nothing about caching (freshness by heuristic) is not stored
    # for a request with a Cookie: the shape (made without the Cookie) must not hide it.
    heuristic = [
        (b"Content-Type", b"application/json"),
        (b"Last-Modified", b"Sun, 06 Nov 1994 08:49:37 GMT"),
    ]
    w = world({"http://u1": [Reply(headers=heuristic, chunks=(BODY,))]})
    client = Client(w)
    state = w.pipeline.state

    async def first_sight(data: bytes) -> bytes:
        state.first_sights.clear()
        state.request_heads.clear()
        return (await client.ask(data))[1][b"x-cache"]

    await client.ask(head(b"/api/v1/symbols?k=0", 0))  # learns the shape
    parses.clear()
    target = b"/api/v1/symbols?k=1"
    assert [await first_sight(head(target, n)) for n in (1, 2)] == [b"MISS", b"MISS"]
    assert parses == [] and len(w.upstream.sent) == 3
    # Without a Cookie (another shape, parsed once), the same answer is stored.
    plain = b"GET /api/v1/symbols?k=2 HTTP/1.1\r\nHost: example.test\r\nUser-Agent: a\r\n\r\n"
    assert [await first_sight(plain) for _ in range(2)] == [b"MISS", b"HIT"]
    client.connection.connection_lost(None)


@pytest.mark.parametrize(
    ("target", "status"),
    [(b"/api/v1/../orders?k=1", 400), (b"/api/v1/%2e%2e/x", 400), (b"/api/v1/a%00b", 400)],
)
async def test_a_target_the_full_parse_refuses_is_refused_in_a_known_shape(
    client: Client, target: bytes, status: int
) -> None:
    await fill(client, [b"/api/v1/symbols?k=0"])
    await client.ask(head(b"/api/v1/symbols?k=0", 0))  # learns the shape
    answer, _, _ = await client.ask(head(target, 1))
    assert answer == status
    await asyncio.sleep(0)
    assert client.transport.closed


async def test_a_response_varying_on_cookie_is_matched_on_this_requests_cookie(
    parses: list[bytes],
) -> None:
    vary = [*CACHEABLE, (b"Vary", b"Cookie")]
    w = world(
        {
            "http://u1": [
                Reply(headers=vary, chunks=(b"for a",)),
                Reply(headers=vary, chunks=(b"for b",)),
            ]
        }
    )
    client = Client(w)
    target = b"/api/v1/symbols?k=1"

    def with_cookie(n: int, cookie: bytes) -> bytes:
        return head(target, n, cookie=cookie).replace(b"session=%d; " % n, b"")

    assert (await client.ask(with_cookie(1, b"a")))[2] == b"for a"
    assert (await client.ask(with_cookie(2, b"b")))[2] == b"for b"
    state = w.pipeline.state
    parses.clear()
    for n, cookie in ((3, b"b"), (4, b"a"), (5, b"b")):
        # Forgotten as the memos' bounds would forget them: read by its shape again.
        state.first_sights.clear()
        state.request_heads.clear()
        status, headers, body = await client.ask(with_cookie(n, cookie))
        assert status == 200 and headers[b"x-cache"] == b"HIT"
        assert body == b"for " + cookie
    assert parses == []  # each read by its shape, with its own Cookie
    assert len(w.upstream.sent) == 2
    client.connection.connection_lost(None)


async def test_a_stale_answer_of_a_known_shape_is_read_in_full_and_refreshed_with_its_cookie(
    parses: list[bytes],
) -> None:
    stale = [
        (b"Content-Type", b"application/json"),
        (b"Cache-Control", b"max-age=1, stale-while-revalidate=60"),
    ]
    w = world({"http://u1": [Reply(headers=stale, chunks=(BODY,))]})
    client = Client(w)
    cache = w.pipeline.cache
    assert cache is not None
    await fill(client, [b"/api/v1/symbols?k=0", b"/api/v1/symbols?k=1"])
    status, headers, _ = await client.ask(head(b"/api/v1/symbols?k=0", 0))  # learns the shape
    assert headers[b"x-cache"] == b"HIT"
    w.cache_clock.advance(5.0)
    parses.clear()
    data = head(b"/api/v1/symbols?k=1", 1, cookie=b"theme=light")
    status, headers, body = await client.ask(data)
    assert status == 200 and headers[b"x-cache"] == b"STALE" and body == BODY
    # Not answered by its shape: the full read decides it, and counts it once.
    assert parses == [data]
    assert sum(cache.metrics.stale.values()) == 1
    for _ in range(50):
        if len(w.upstream.sent) == 3:
            break
        await asyncio.sleep(0)
    refresh = w.upstream.sent[-1]  # the background refresh, with this request's own fields
    assert refresh.target == "/api/v1/symbols?k=1"
    assert refresh.headers["cookie"] == "session=1; theme=light"
    # Refreshed, it is a fresh hit again: read by its shape once its head is forgotten.
    w.pipeline.state.first_sights.clear()
    w.pipeline.state.request_heads.clear()
    parses.clear()
    status, headers, _ = await client.ask(head(b"/api/v1/symbols?k=1", 2))
    assert headers[b"x-cache"] == b"HIT" and parses == []
    client.connection.connection_lost(None)


async def test_misses_of_a_shape_without_volatile_fields_reuse_its_upstream_lines_per_scheme(
    parses: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fields of such heads are the shape's list itself: a fill's upstream lines are made
    # once per client address and scheme (edge.state.FillHeaders), never across schemes.
    w = world({"http://u1": [Reply(headers=CACHEABLE, chunks=(BODY,))]})
    plain = Client(w)
    tls = Client(w)
    tls.connection = EdgeConnection(plain.connections, tls_version="TLSv1.3")
    tls.connection.connection_made(tls.transport)

    def bare(k: int) -> bytes:
        return b"GET /api/v1/symbols?k=%d HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\n\r\n" % k

    built: list[object] = []
    real: Callable[..., Any] = edge.stages.fill.forward_headers

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(edge.stages.fill, "forward_headers", counting)
    await plain.ask(bare(0))  # learns the shape (parsed in full)
    parses.clear()
    for k, client in ((1, plain), (2, plain), (3, tls), (4, plain), (5, tls)):
        status, headers, _ = await client.ask(bare(k))
        assert status == 200 and headers[b"x-cache"] == b"MISS"
    assert parses == []
    sent = w.upstream.sent
    assert [s.target for s in sent] == [f"/api/v1/symbols?k={k}" for k in range(6)]
    protos = [s.headers["x-forwarded-proto"] for s in sent]
    assert protos == ["http", "http", "http", "https", "http", "https"]

    def without_id(headers: Any) -> list[tuple[str, str]]:
        return [(n, v) for n, v in headers.items() if n != "x-request-id"]

    # What the full parse forwarded for the first, the memo forwards for the others.
    assert all(without_id(s.headers) == without_id(sent[0].headers) for s in sent[1:3])
    # Built for the parsed head, the shape's first fill (the memo is made on the second), then
    # once per scheme: the last two came from the memo.
    assert len(built) == 4
    ids = [s.headers["x-request-id"] for s in sent]
    assert len(set(ids)) == len(ids)  # each request's own ID
    plain.close()
    tls.close()


@pytest.mark.parametrize("volatile", [True, False])
def test_a_miss_read_by_its_shape_is_pending_as_the_full_parse_and_lookup_make_it(
    volatile: bool,
) -> None:
    # With volatile fields the shape's read is made this request's own; without, the shape's
    # read (and the lookup made of it) is this request's already: both as the long way has it.
    w = world()
    shortcuts = HeadShortcuts(w.pipeline)
    cache = w.pipeline.cache
    assert cache is not None

    def data(k: int) -> bytes:
        target = b"/api/v1/symbols?k=%d" % k
        if volatile:
            return head(target, k)
        return b"GET " + target + b" HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\n\r\n"

    learnt = shortcuts.answer(data(0), "10.0.0.7", b"http", None)  # parsed in full
    assert isinstance(learnt, ProxyRequest) and w.pipeline.take_pending(learnt) is not None
    for k in (1, 2):
        request = shortcuts.answer(data(k), "10.0.0.7", b"http", None)
        assert isinstance(request, ProxyRequest)
        pending = w.pipeline.take_pending(request)
        simple = parse_simple_head(
            data(k),
            request_id_header=b"x-request-id",
            max_headers=100,
            max_header_bytes=65536,
            max_url=8192,
        )
        assert simple is not None
        assert request.headers == simple.headers and request.target == simple.target
        assert request.request_id_supplied is volatile
        expected = cache.lookup(b"GET", b"http", b"example.test", simple.target, simple.headers)
        assert pending is not None and pending.kind is LookupKind.MISS
        assert pending.key == expected.key and pending.request == expected.request
