"""Every memo of the edge request path is named in ``edge.memos`` and stays within its bound."""

from __future__ import annotations

from collections.abc import Callable
from functools import _lru_cache_wrapper
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from edge import compress, memos, request_target
from edge.accesslog import AccessLog
from edge.cache import HttpCache
from edge.cache import key as cache_key
from edge.cache import policy as cache_policy
from edge.cache.testing import FakeClock
from edge.memos import MEMOS, BoundedMemo, MemoSpec
from edge.state import EdgeState, RequestHead
from meridian.config import CacheConfig
from tests.stage_support import make_config


@given(
    bound=st.integers(min_value=1, max_value=8),
    keys=st.lists(st.integers(min_value=0, max_value=20), max_size=60),
    policy=st.sampled_from(["clear", "oldest"]),
)
def test_remember_never_grows_past_the_bound(bound: int, keys: list[int], policy: Any) -> None:
    memo: BoundedMemo[int, int] = BoundedMemo(MemoSpec("t", "o", "k", "v", "c", bound, policy))
    for key in keys:
        assert memo.remember(key, key * 2) == key * 2
        assert len(memo) <= bound
        assert memo[key] == key * 2  # what was just remembered is there


def test_oldest_policy_keeps_the_newest() -> None:
    memo: BoundedMemo[int, int] = BoundedMemo(MemoSpec("t", "o", "k", "v", "c", 2, "oldest"))
    for key in (1, 2, 3):
        memo.remember(key, key)
    assert list(memo) == [2, 3]


def test_every_memo_is_documented_once() -> None:
    names = [spec.name for spec in MEMOS]
    assert len(names) == len(set(names))
    for spec in MEMOS:
        assert spec.bound > 0 and spec.owner and spec.key and spec.value and spec.cleared_by


def _state() -> EdgeState:
    return EdgeState.build(make_config(), "iad", 1)


def _fill_route(state: EdgeState, n: int) -> BoundedMemo[Any, Any]:
    for i in range(n):
        state.route(b"example.test", f"/p{i}")
    return state.route_memo


def _fill_request_heads(state: EdgeState, n: int) -> BoundedMemo[Any, Any]:
    from edge.protocol import remember_head

    head = RequestHead("GET", b"/", "/", b"h", [], None)
    for i in range(n):
        remember_head(state.request_heads, b"GET /%d HTTP/1.1\r\n\r\n" % i, head)
    return state.request_heads


def _fill_first_sights(state: EdgeState, n: int) -> BoundedMemo[Any, Any]:
    from edge.protocol import seen_before

    for i in range(n):
        assert not seen_before(state.first_sights, b"GET /%d HTTP/1.1\r\n\r\n" % i)
    return state.first_sights


def _fill_fill_headers(n: int) -> BoundedMemo[Any, Any]:
    head = RequestHead("GET", b"/", "/", b"h", [], None)
    memo = head.new_fill_headers()
    for i in range(n):
        memo.remember(f"10.0.0.{i}", None)
    return memo


def _cache() -> HttpCache:
    return HttpCache(CacheConfig(), CollectorRegistry(), clock=FakeClock())


def _fill_codings(n: int) -> BoundedMemo[Any, Any]:
    cache = _cache()
    for i in range(n):
        cache.prepare(b"GET", b"http", b"h", b"/", [(b"accept-encoding", b"gzip, x%d" % i)])
    return cache.reader._codings


def _fill_bypass(n: int) -> BoundedMemo[Any, Any]:
    cache = _cache()
    for i in range(n):
        cache._bypassed(f"reason-{i}")
    return cache._bypass


def _fill_shared_fields(n: int) -> BoundedMemo[Any, Any]:
    admission = _cache().admission
    for i in range(n):
        admission.fields.pooled([(b"x-field", b"%d" % i)])
    return admission.fields._pool


def _fill_response_shapes(n: int) -> BoundedMemo[Any, Any]:
    from edge.stages.fill_read import HeadShapes, shape_key
    from meridian.config import CacheRule

    shapes, state, admission, rule = HeadShapes(), _state(), _cache().admission, CacheRule("/")
    for i in range(n):
        raw = [(b"X-N", b"%d" % i), (b"Date", b"Mon, 07 Dec 2026 03:52:41 GMT")]
        key, _volatile = shape_key(raw, 200, "r", "route", rule)
        assert key is not None
        for _sight in range(2):  # made on the second sight
            shape, seen = shapes.find(state, admission, key)
            if shape is None and seen:
                shapes.make(key, raw, 200, state, "r", "route", admission, rule)
    return shapes.memo


def _fill_hosts(n: int) -> BoundedMemo[Any, Any]:
    for i in range(n):
        request_target.parse_host(b"h%d.example" % i)
    return request_target._HOST_MEMO


def _fill_negotiations(n: int) -> BoundedMemo[Any, Any]:
    for i in range(n):
        compress.negotiate(b"gzip, x%d" % i)
    return compress._memo


def _fill_middles(n: int) -> BoundedMemo[Any, Any]:
    log = AccessLog()
    for i in range(n):
        log._middle((f"/p{i}", 200, 1, "HIT", "-", "GET", "-", 0))
    return log._middles


def _fill_cache_keys(n: int) -> BoundedMemo[Any, Any]:
    builder = cache_key.KeyBuilder((), memo_size=64)
    for i in range(n):
        builder.build(b"http", b"h", b"/p%d" % i)
    return builder._memo


def _fill_cache_rules(n: int) -> BoundedMemo[Any, Any]:
    builder = cache_key.KeyBuilder(())
    for i in range(n):
        builder.build_once(b"http", b"h", b"/p%d?q=1" % i)
    return builder._by_path


def _fill_head_shapes(n: int) -> BoundedMemo[Any, Any]:
    from edge.h1fast import HeadShortcuts
    from tests.stage_support import world

    shortcuts = HeadShortcuts(world().pipeline)
    for i in range(n):  # heads of a new shape each: parsed, remembered, not cached
        shortcuts.answer(b"GET / HTTP/1.1\r\nHost: h\r\nX-%d: 1\r\n\r\n" % i, "-", b"http", None)
    return shortcuts._shapes


def _fill_checked_paths(n: int) -> BoundedMemo[Any, Any]:
    from edge.h1fast import HeadShortcuts
    from tests.stage_support import world

    shortcuts = HeadShortcuts(world().pipeline)
    for i in range(n + 1):  # the first learns the shape; the others are read by it
        head = b"GET /p%d?q=1 HTTP/1.1\r\nHost: h\r\nUser-Agent: %d\r\n\r\n" % (i, i)
        shortcuts.answer(head, "-", b"http", None)
    return shortcuts._paths


def _fill_rate_limit_keys(n: int) -> BoundedMemo[Any, Any]:
    from edge.ratelimit import Gcra

    gcra = Gcra(1.0, 1, max_keys=64)
    for i in range(n):
        gcra.check(i, 0.0)  # every key busy: the flood case
    return gcra.buckets


def _fill_rate_limit_clients(n: int) -> BoundedMemo[Any, Any]:
    from edge.ratelimit import RateLimits
    from meridian.config import EdgeRateLimit

    limits = RateLimits.build((EdgeRateLimit("l", 1.0),), {"r": "s"}, ())
    assert limits is not None
    for i in range(n):
        limits.client(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", [])
    return limits._clients


def _fill_rate_limit_lanes(n: int) -> BoundedMemo[Any, Any]:
    from edge.ratelimit import RateLimits
    from meridian.config import EdgeRateLimit

    limits = RateLimits.build((EdgeRateLimit("l", 1.0, max_keys=1_000_000),), {"r": "s"}, ())
    assert limits is not None
    for i in range(n):
        limits.check("r", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", [], 0.0)
    lanes = limits._plans["r"].lanes
    assert lanes is not None
    return lanes


def _fill_hpack_blocks(n: int) -> BoundedMemo[Any, Any]:
    from edge.h2hpack import HeaderDecoder

    decoder = HeaderDecoder(65536)
    for i in range(n):  # static :method GET, :scheme http, then a literal :path without indexing
        path = b"/%d" % i
        decoder.request(b"\x82\x86\x04" + bytes([len(path)]) + path)
    return decoder.memo


def _fill_response_heads(n: int) -> BoundedMemo[Any, Any]:
    from edge.h2streams import response_head
    from edge.hpack_literal import LiteralEncoder

    memo: BoundedMemo[Any, Any] = BoundedMemo(memos.RESPONSE_HEADS)
    encoder = LiteralEncoder()
    for i in range(n):
        response_head(b"HTTP/1.1 200 OK\r\nx-n: %d\r\n\r\n" % i, memo, encoder)
    return memo


def _fill_response_objects(n: int) -> BoundedMemo[Any, Any]:
    from edge.h2streams import PrebuiltResponses

    responses = PrebuiltResponses()
    kept = [b"HTTP/1.1 200 OK\r\nx-n: %d\r\n\r\n" % i for i in range(n)]
    for wire in kept:
        responses.read(wire, True)
    return responses.by_object


#: Each dict memo, filled past its bound through its owner's own code path.
DICT_MEMOS: dict[MemoSpec, Callable[[int], BoundedMemo[Any, Any]]] = {
    memos.ROUTES: lambda n: _fill_route(_state(), n),
    memos.REQUEST_HEADS: lambda n: _fill_request_heads(_state(), n),
    memos.FIRST_SIGHTS: lambda n: _fill_first_sights(_state(), n),
    memos.FILL_HEADERS: _fill_fill_headers,
    memos.SERVED_CODINGS: _fill_codings,
    memos.BYPASS_LOOKUPS: _fill_bypass,
    memos.SHARED_FIELDS: _fill_shared_fields,
    memos.CACHE_KEYS: _fill_cache_keys,
    memos.CACHE_RULES: _fill_cache_rules,
    memos.HEAD_SHAPES: _fill_head_shapes,
    memos.CHECKED_PATHS: _fill_checked_paths,
    memos.HOSTS: _fill_hosts,
    memos.NEGOTIATIONS: _fill_negotiations,
    memos.RESPONSE_SHAPES: _fill_response_shapes,
    memos.ACCESS_LOG_MIDDLES: _fill_middles,
    memos.RATE_LIMIT_KEYS: _fill_rate_limit_keys,
    memos.RATE_LIMIT_CLIENTS: _fill_rate_limit_clients,
    memos.RATE_LIMIT_LANES: _fill_rate_limit_lanes,
    memos.HPACK_BLOCKS: _fill_hpack_blocks,
    memos.RESPONSE_HEADS: _fill_response_heads,
    memos.RESPONSE_OBJECTS: _fill_response_objects,
}
LRU_MEMOS: dict[MemoSpec, _lru_cache_wrapper[Any]] = {
    memos.CACHE_CONTROL_PARSES: cache_policy.parse_cache_control,
    memos.TARGETED_CACHE_CONTROL_PARSES: cache_policy._targeted_value,
    memos.HTTP_DATES: cache_policy._parse_http_date,
    memos.CACHE_CODINGS: cache_key.negotiate_coding,
    memos.CACHE_KEY_HOSTS: cache_key._scheme_and_host,
    memos.DROP_MATCHERS: cache_key._drop_matcher,
    memos.MEDIA_TYPE_PATTERNS: compress._type_patterns,
}


def test_every_memo_has_a_bound_check() -> None:
    checked = {*DICT_MEMOS, *LRU_MEMOS, memos.HIT_REPLAYS}  # a slot: one per RequestHead
    assert checked == set(MEMOS)


@pytest.mark.parametrize("spec", list(DICT_MEMOS), ids=lambda spec: spec.name)
def test_dict_memos_stay_bounded(spec: MemoSpec) -> None:
    memo = DICT_MEMOS[spec](0)
    assert isinstance(memo, BoundedMemo) and memo.spec is spec
    limit = memo.bound
    assert limit <= spec.bound
    filled = DICT_MEMOS[spec](limit + 10)
    assert 0 < len(filled) <= limit


@pytest.mark.parametrize("spec", list(LRU_MEMOS), ids=lambda spec: spec.name)
def test_lru_memos_are_sized_from_their_spec(spec: MemoSpec) -> None:
    assert LRU_MEMOS[spec].cache_info().maxsize == spec.bound
