"""The store side of a fill, second pass: each shortcut against the general path it replaces.

* ``Admission.storable_head``: a plain request's verdict taken from its shape
  (``StoredShape.plain``) is ``uncacheable_reason``'s, whatever the requests and statuses
  before it;
* ``MemoryStore.put``: the key and URL read from the entry's aliases are ``entry.key`` and
  ``entry.url`` (the entry stored and indexed under them);
* ``HttpCache.replay_hit``: the key a memo took from its entry is the one it is stored under.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.cache import HttpCache
from edge.cache.admission import Admission
from edge.cache.entry import Entry, StoredResponse
from edge.cache.key import negotiate_coding
from edge.cache.lookups import HitMemo
from edge.cache.messages import RequestInfo
from edge.cache.policy import NO_DIRECTIVES, Freshness, parse_cache_control
from edge.cache.store import MemoryStore, url_path
from edge.http1 import rewrite_response_headers
from edge.stages.fill_read import HeadShapes, shape_key
from meridian.config import CacheConfig, CacheRule
from tests.test_fill_shapes import NOW, RULES, STATE, cache_key, heads, response_of

PLAIN = RequestInfo([], NO_DIRECTIVES, "identity", False, False, None, None)
#: Requests whose own fields take part in the verdict (the shape's memo is not theirs).
OTHERS = [
    RequestInfo([], NO_DIRECTIVES, "identity", False, True, None, None),  # Authorization
    RequestInfo([], NO_DIRECTIVES, "identity", False, False, None, None, True),  # Cookie
    RequestInfo([], parse_cache_control(b"no-store"), "identity", False, False, None, None),
    RequestInfo([], parse_cache_control(b"max-age=0"), "gzip", False, False, None, None),
]
REQUESTS = st.sampled_from([PLAIN, PLAIN, *OTHERS])
STATUSES = st.sampled_from([200, 203, 206, 301, 302, 404, 500])


@settings(max_examples=300, deadline=None)
@given(
    head=heads(),
    rule=RULES,
    targets=st.sampled_from([(), ("cdn",), ("surrogate", "cdn")]),
    sights=st.lists(st.tuples(STATUSES, REQUESTS, st.booleans()), min_size=1, max_size=12),
)
def test_a_plain_requests_verdict_is_its_shapes(
    head: tuple[list[bool], list[tuple[bytes, bytes]], list[list[bytes]]],
    rule: CacheRule,
    targets: tuple[str, ...],
    sights: list[tuple[int, RequestInfo, bool]],
) -> None:
    volatile, lines, values = head
    admission = Admission(targets, compressor=None, extra_head=b"", negotiate=negotiate_coding)
    plain_admission = Admission(
        targets, compressor=None, extra_head=b"", negotiate=negotiate_coding
    )
    key = cache_key(rule)
    shapes = HeadShapes()
    made = None
    for status, request, second in sights:
        raw = response_of(volatile, lines, values[second])
        shape_of, found = shape_key(raw, status, "us-east", "api", rule)
        assert shape_of is not None
        if made is None:  # one shape for every status: its memo is keyed by status
            made = shapes.make(shape_of, raw, status, STATE, "us-east", "api", admission, rule)
        stored = made.stored
        assert stored is not None  # (at most 12 lines: never too long for a shape)
        plain = rewrite_response_headers(
            raw, dropped=STATE.dropped_response_headers, via=STATE.via, region="us-east"
        )
        assert admission.storable_head(
            key, request, status, made.headers(found), NOW, stored
        ) == plain_admission.storable_head(key, request, status, plain, NOW)
    assert made is not None and made.stored is not None
    assert len(made.stored.plain) <= 4


def _entry(key: bytes, primary: bytes, url: bytes) -> Entry:
    freshness = Freshness(NOW, 0.0, 60.0, 0.0, 0.0, False, False)
    response = StoredResponse(200, b"OK", ((b"content-type", b"text/plain"),), b"x", freshness)
    return Entry(response, key=key, primary=primary, url=url)


URLS = st.sampled_from(
    [
        b"http://h/p",
        b"https://h.example/a/b/c?x=1&y=2",
        b"http://h",
        b"http://h?q",
        b"http://h//",
        b"/bare/path",
        b"no-scheme",
        b"http:/h/p",
    ]
)


@settings(max_examples=200, deadline=None)
@given(url=URLS, other=URLS, varies=st.booleans(), own_url=st.booleans())
def test_put_stores_and_indexes_under_the_entrys_key_and_url(
    url: bytes, other: bytes, varies: bool, own_url: bool
) -> None:
    primary = b"G|" + url
    key = primary + b"\x00accept-language=en" if varies else primary
    entry = _entry(key, primary, other if own_url else url)
    store = MemoryStore(1 << 20, 1 << 16)
    assert store.put(entry)
    assert store.get_key(entry.key) is entry
    path = url_path(entry.url)
    if path is not None:
        assert store._paths.under(path) == [entry.key]
        assert store.with_path_prefix(path) == [entry]
    assert store.with_url_prefix(entry.url) == [entry]
    assert store.remove(entry.key)
    assert len(store) == 0 and store.bytes == 0
    if path is not None:
        assert store._paths.under(path) == []


@settings(max_examples=50, deadline=None)
@given(url=URLS, varies=st.booleans(), own_url=st.booleans())
def test_a_replayed_hit_asks_the_store_for_its_entrys_own_key(
    url: bytes, varies: bool, own_url: bool
) -> None:
    """``replay_hit`` looks up the key the memo took from its entry (``HitMemo.key``), which
    is ``entry.key`` whether or not the entry keeps aliases: replayed while that entry is
    stored under it, never once another is."""
    cache = HttpCache(CacheConfig())
    primary = b"G|" + url
    key = primary + b"\x00accept-language=en" if varies else primary
    entry = _entry(key, primary, b"http://other/p" if own_url else url)
    assert cache.store.put(entry)
    for _ in range(2):  # asked twice in one Age second: its bytes kept (slot 0)
        wire = entry.wire("identity", NOW)
    memo = HitMemo(cache.keys, entry, 0, NOW, NOW + 1)
    assert memo.key == entry.key and memo.entry is entry
    assert cache.replay_hit(memo, NOW) is wire
    assert cache.store.put(_entry(key, primary, url))  # another entry under the same key
    assert cache.replay_hit(memo, NOW) is None
