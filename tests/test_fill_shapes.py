"""A fill's response head read by its shape (``edge.stages.fill_read.HeadShapes``, the cache's
``StoredShape``) is read exactly as the plain per-response path reads it: the rewritten headers,
the coding, compressibility, the cache's verdict and the stored entry, for every response of the
shape whatever its volatile values."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.cache.admission import Admission
from edge.cache.entry import Compressor, HeadTemplate
from edge.cache.key import CacheKey, negotiate_coding
from edge.cache.messages import RequestInfo, UpstreamResponse
from edge.cache.policy import NO_DIRECTIVES, parse_cache_control, response_meta
from edge.compress import is_compressible
from edge.http1 import rewrite_response_headers
from edge.stages.fill_read import HeadShapes, shape_key
from edge.state import EdgeState
from edge.transcode import content_coding
from meridian.config import CacheRule
from tests.stage_support import make_config

#: Stable lines an origin head may carry (names in several spellings), some that the edge
#: drops, hop-by-hop ones and ones a Connection header may name.
STABLE = st.sampled_from(
    [
        (b"Content-Type", b"application/json"),
        (b"content-type", b"text/html; charset=utf-8"),
        (b"Content-Type", b"image/png"),
        (b"Cache-Control", b"public, max-age=1"),
        (b"Cache-Control", b"max-age=60, stale-while-revalidate=30"),
        (b"cache-control", b"no-store"),
        (b"Cache-Control", b"private"),
        (b"Cache-Control", b"s-maxage=5, no-transform"),
        (b"Cache-Control", b"no-cache"),
        (b"CDN-Cache-Control", b"max-age=30"),
        (b"Surrogate-Control", b"max-age=9"),
        (b"Vary", b"Accept-Encoding"),
        (b"Vary", b"Accept-Language"),
        (b"Vary", b"*"),
        (b"Set-Cookie", b"s=1"),
        (b"Content-Encoding", b"gzip"),
        (b"Content-Encoding", b"identity"),
        (b"Content-Range", b"bytes 0-1/2"),
        (b"Surrogate-Key", b"btc ticker"),
        (b"Via", b"1.1 origin"),
        (b"Connection", b"keep-alive"),
        (b"Connection", b"close, X-Secret"),
        (b"Connection", b"date, etag"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Transfer-Encoding", b"chunked"),
        (b"X-Secret", b"s"),
        (b"X-Cache", b"HIT"),
        (b"Server", b"aiohttp"),
        (b"Accept-Ranges", b"bytes"),
        (b"X-Origin-Region", b"bench"),
    ]
)
#: Volatile fields (spelled as origins do) and the values a response may give them.
VOLATILE_NAMES = st.sampled_from(
    [
        b"Date",
        b"date",
        b"ETag",
        b"Etag",
        b"Last-Modified",
        b"Expires",
        b"Age",
        b"Content-Length",
        b"Set-Cookie",
        b"X-Request-Id",
        b"traceparent",
        b"Content-MD5",
    ]
)
VOLATILE_VALUES = st.sampled_from(
    [
        b"Mon, 07 Dec 2026 03:52:41 GMT",
        b"Mon, 07 Dec 2026 03:52:42 GMT",
        b"Sun, 06 Dec 2026 03:52:41 GMT",
        b"0",
        b"5",
        b"7200, 0",
        b"-1",
        b"junk",
        b"",
        b'"e07928b4"',
        b'W/"x"',
        b"  ",
        b"1963",
    ]
)
RULES = st.sampled_from(
    [
        CacheRule("/"),
        CacheRule("/", ttl=5.0),
        CacheRule("/", store_set_cookie=True),
        CacheRule("/", ttl=2.0, force_ttl=True, stale_if_error=10.0),
        CacheRule("/", bypass=True),
    ]
)
STATE = EdgeState.build(make_config(), "iad", 1)
NOW = 1_796_615_561.0


@st.composite
def heads(draw: Any) -> tuple[list[bool], list[tuple[bytes, bytes]], list[list[bytes]]]:
    """A shape (which lines are volatile, the names and stable values) and two responses of
    it: each a list of volatile values."""
    lines: list[tuple[bytes, bytes]] = []
    volatile: list[bool] = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.booleans()):
            lines.append((draw(VOLATILE_NAMES), b""))
            volatile.append(True)
        else:
            lines.append(draw(STABLE))
            volatile.append(False)
    count = sum(volatile)
    values = [draw(st.lists(VOLATILE_VALUES, min_size=count, max_size=count)) for _ in range(2)]
    return volatile, lines, values


def response_of(
    volatile: list[bool], lines: list[tuple[bytes, bytes]], values: list[bytes]
) -> list[tuple[bytes, bytes]]:
    taken = iter(values)
    # Each value a bytes object of its own, as the parser makes them.
    return [
        (name, bytes(bytearray(next(taken)))) if is_volatile else (name, bytes(bytearray(value)))
        for is_volatile, (name, value) in zip(volatile, lines, strict=True)
    ]


def cache_key(rule: CacheRule) -> CacheKey:
    return CacheKey(b"G|http://h/p", b"http://h/p", b"/p", b"/p", rule)


def halve(body: bytes, coding: str) -> bytes:
    """A compressor for the tests: any bytes shorter than the body will do."""
    return body[: len(body) // 2]


REQUEST = RequestInfo([], NO_DIRECTIVES, "identity", False, False, None, None)
COOKIE_REQUEST = RequestInfo(
    [(b"cookie", b"a=1")], parse_cache_control(b"no-cache"), "gzip", False, True, None, None, True
)


@settings(max_examples=300, deadline=None)
@given(
    head=heads(),
    status=st.sampled_from([200, 203, 206, 301, 302, 404, 500]),
    rule=RULES,
    region=st.sampled_from(["us-east", "eu-central"]),
    route=st.sampled_from(["api", "static"]),
    targets=st.sampled_from([(), ("cdn",), ("surrogate", "cdn")]),
    body=st.sampled_from([b"", b"x" * 10, b"{}" * 400]),
    request=st.sampled_from([REQUEST, COOKIE_REQUEST]),
    compressor=st.sampled_from([None, halve]),
    reasons=st.lists(st.sampled_from([b"OK", b"Fine", b""]), min_size=4, max_size=4),
)
def test_a_shape_reads_every_response_of_it_as_the_plain_path(
    head: tuple[list[bool], list[tuple[bytes, bytes]], list[list[bytes]]],
    status: int,
    rule: CacheRule,
    region: str,
    route: str,
    targets: tuple[str, ...],
    body: bytes,
    request: RequestInfo,
    compressor: Compressor | None,
    reasons: list[bytes],
) -> None:
    volatile, lines, values = head
    compression = STATE.config.edge.compression
    shapes = HeadShapes()
    extra = b"x-pop: iad\r\n"
    plain_admission = Admission(
        targets, compressor=compressor, extra_head=extra, negotiate=negotiate_coding
    )
    admission = Admission(
        targets, compressor=compressor, extra_head=extra, negotiate=negotiate_coding
    )
    key = cache_key(rule)
    for sight, own in enumerate([values[0], values[0], values[1], values[0]]):
        reason = reasons[sight]
        raw = response_of(volatile, lines, own)
        shape_of, found = shape_key(raw, status, region, route, rule)
        assert shape_of is not None
        shape, seen = shapes.find(STATE, admission, shape_of)
        assert seen == (sight > 0)
        if shape is None and seen:
            shape = shapes.make(shape_of, raw, status, STATE, region, route, admission, rule)
        plain = rewrite_response_headers(
            raw, dropped=STATE.dropped_response_headers, via=STATE.via, region=region
        )
        if shape is None:
            continue
        headers = shape.headers(found)
        assert headers == plain
        assert shape.coding == content_coding(plain)
        assert (shape.compressible and len(body) >= compression.min_size) == is_compressible(
            status, plain, compression, route=route, body_size=len(body)
        )
        assert shape.stored is not None
        # The cache's verdict and entry, with the shape and without.
        assert admission.storable_head(
            key, request, status, headers, NOW, shape.stored
        ) == plain_admission.storable_head(key, request, status, plain, NOW)
        assert admission._head_meta is not None and plain_admission._head_meta is not None
        assert admission._head_meta.meta == response_meta(plain, plain_admission._targeted)
        assert admission._head_meta.meta == plain_admission._head_meta.meta
        compressible = shape.compressible and len(body) >= compression.min_size
        response = UpstreamResponse(status, headers, body, reason, compressible=compressible)
        plain_response = UpstreamResponse(status, plain, body, reason, compressible=compressible)
        entry, why = admission.admit(key, request, response, NOW - 0.01, NOW)
        plain_entry, plain_why = plain_admission.admit(
            key, request, plain_response, NOW - 0.01, NOW
        )
        assert why == plain_why
        if plain_entry is None:
            assert entry is None
            continue
        assert entry is not None
        assert entry.response == plain_entry.response
        assert (entry.size, entry.etag, entry.last_modified_raw, entry.key) == (
            plain_entry.size,
            plain_entry.etag,
            plain_entry.last_modified_raw,
            plain_entry.key,
        )
        for coding in ("identity", "gzip"):
            assert entry.wire(coding, NOW + 0.5) == plain_entry.wire(coding, NOW + 0.5)
        assert entry.size == plain_entry.size


def test_a_ticker_is_stored_and_answered_by_its_shape() -> None:
    """The common case takes the shaped path all the way (the head from its template)."""
    rule = CacheRule("/", ttl=1.0)
    shapes = HeadShapes()
    admission = Admission((), compressor=halve, extra_head=b"", negotiate=negotiate_coding)
    plain_admission = Admission((), compressor=halve, extra_head=b"", negotiate=negotiate_coding)
    key = cache_key(rule)
    for n in range(3):
        raw = [
            (b"ETag", b'"e%d"' % n),
            (b"Last-Modified", b"Mon, 07 Dec 2026 03:52:4%d GMT" % n),
            (b"Cache-Control", b"public, max-age=1"),
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"400"),
            (b"Date", b"Mon, 07 Dec 2026 03:52:4%d GMT" % n),
            (b"Server", b"Python/3.11 aiohttp/3.14.5"),
        ]
        shape_of, volatile = shape_key(raw, 200, "us-east", "api", rule)
        assert shape_of is not None
        shape, seen = shapes.find(STATE, admission, shape_of)
        if n == 0:
            assert (shape, seen) == (None, False)
            continue
        if shape is None:
            shape = shapes.make(shape_of, raw, 200, STATE, "us-east", "api", admission, rule)
        assert shape.stored is not None and shape.compressible
        headers = shape.headers(volatile)
        assert admission.storable_head(key, REQUEST, 200, headers, NOW, shape.stored) is None
        body = b"{}" * 200
        entry, _ = admission.admit(
            key, REQUEST, UpstreamResponse(200, headers, body, b"OK", True), NOW, NOW
        )
        plain = rewrite_response_headers(
            raw, dropped=STATE.dropped_response_headers, via=STATE.via, region="us-east"
        )
        plain_admission.storable_head(key, REQUEST, 200, plain, NOW)
        plain_entry, _ = plain_admission.admit(
            key, REQUEST, UpstreamResponse(200, plain, body, b"OK", True), NOW, NOW
        )
        assert entry is not None and plain_entry is not None
        assert isinstance(entry._head0, HeadTemplate)
        assert entry.wire("identity", NOW) == plain_entry.wire("identity", NOW)
        assert entry.size == plain_entry.size and entry._head0 == plain_entry._head0


def test_a_shape_is_keyed_on_every_stable_value_and_the_context() -> None:
    rule = CacheRule("/")
    raw = [(b"Content-Type", b"application/json"), (b"Date", b"Mon, 07 Dec 2026 03:52:41 GMT")]
    key, volatile = shape_key(raw, 200, "us-east", "api", rule)
    assert key is not None and volatile == [b"Mon, 07 Dec 2026 03:52:41 GMT"]
    other_date = [raw[0], (b"date", b"Tue, 08 Dec 2026 03:52:41 GMT")]
    assert shape_key(other_date, 200, "us-east", "api", rule)[0] == key
    for different in (
        shape_key([(b"Content-Type", b"text/html"), raw[1]], 200, "us-east", "api", rule),
        shape_key([raw[1], raw[0]], 200, "us-east", "api", rule),
        shape_key(raw, 203, "us-east", "api", rule),
        shape_key(raw, 200, "eu-central", "api", rule),
        shape_key(raw, 200, "us-east", "static", rule),
        shape_key(raw, 200, "us-east", "api", CacheRule("/", ttl=1.0)),
    ):
        assert different[0] != key


def test_another_state_or_cache_forgets_the_shapes() -> None:
    rule = CacheRule("/")
    raw = [(b"Content-Type", b"application/json")]
    key, _ = shape_key(raw, 200, "us-east", "api", rule)
    assert key is not None
    shapes = HeadShapes()
    admission = Admission((), compressor=None, extra_head=b"", negotiate=negotiate_coding)
    shapes.find(STATE, admission, key)
    shapes.make(key, raw, 200, STATE, "us-east", "api", admission, rule)
    assert shapes.find(STATE, admission, key)[0] is not None
    other = Admission((), compressor=None, extra_head=b"", negotiate=negotiate_coding)
    assert shapes.find(STATE, other, key) == (None, False)
    state = EdgeState.build(make_config(), "iad", 2)
    shapes.make(key, raw, 200, STATE, "us-east", "api", other, rule)
    assert shapes.find(state, other, key) == (None, False)


def test_a_stored_shape_serves_only_its_rule_and_targets() -> None:
    admission = Admission((), compressor=None, extra_head=b"", negotiate=negotiate_coding)
    headers = [(b"cache-control", b"max-age=5"), (b"date", b"Mon, 07 Dec 2026 03:52:41 GMT")]
    stored = admission.stored_shape(headers, CacheRule("/"))
    assert stored is not None
    key = cache_key(CacheRule("/", bypass=True))
    assert admission.storable_head(key, REQUEST, 200, headers, NOW, stored) == "rule-bypass"
    assert admission._head_meta is not None and admission._head_meta.shape is None
    admission.set_targets(("cdn",))
    key = cache_key(stored.rule)
    admission.storable_head(key, REQUEST, 200, headers, NOW, stored)
    assert admission._head_meta is not None and admission._head_meta.shape is None


def test_long_heads_take_the_plain_path() -> None:
    raw = [(b"x-n", b"%d" % i) for i in range(60)]
    assert shape_key(raw, 200, "us-east", "api", CacheRule("/"))[0] is None
    admission = Admission((), compressor=None, extra_head=b"", negotiate=negotiate_coding)
    assert admission.stored_shape(raw, CacheRule("/")) is None
