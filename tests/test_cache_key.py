"""Cache keys: normalisation, memoisation, Vary secondary keys, no poisoning via unkeyed headers."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from edge.cache.key import (
    DEFAULT_RULE,
    KeyBuilder,
    negotiate_coding,
    normalise_host,
    normalise_query,
    normalise_value,
    split_target,
    vary_key,
)
from meridian.config import CacheRule

TICKER = CacheRule(path_prefix="/api/v1/ticker/", ttl=1.0, drop_params=("utm_*", "fbclid"))
SYMBOLS = CacheRule(path_prefix="/api/v1/symbols", ttl=300.0, sort_query=False)
API = CacheRule(path_prefix="/api/", ttl=5.0)


def builder() -> KeyBuilder:
    return KeyBuilder([API, TICKER, SYMBOLS])


def test_primary_key_shape() -> None:
    key = builder().build(b"https", b"API.Example.COM", b"/api/v1/ticker/BTC?b=2&a=1")
    assert key.primary == b"G|https://api.example.com/api/v1/ticker/BTC?a=1&b=2"
    assert key.url == b"https://api.example.com/api/v1/ticker/BTC?a=1&b=2"
    assert key.target == b"/api/v1/ticker/BTC?a=1&b=2"
    assert key.path == b"/api/v1/ticker/BTC"


def test_longest_prefix_rule_wins_regardless_of_order() -> None:
    keys = builder()
    assert keys.rule_for(b"/api/v1/ticker/ETH") is TICKER
    assert keys.rule_for(b"/api/v2/other") is API
    assert keys.rule_for(b"/static/x") is DEFAULT_RULE


def test_host_normalisation() -> None:
    assert normalise_host(b"Example.COM.:443", b"https") == b"example.com"
    assert normalise_host(b"example.com:80", b"http") == b"example.com"
    assert normalise_host(b"example.com:443", b"http") == b"example.com:443"
    assert normalise_host(b"example.com:0080", b"http") == b"example.com"
    assert normalise_host(b"[::1]:443", b"https") == b"[::1]"
    assert normalise_host(b"[::1]:8443", b"https") == b"[::1]:8443"


def test_query_sort_is_stable_for_repeated_names() -> None:
    # The origin may read the first or the last "a": their order is kept.
    assert normalise_query(b"b=1&a=2&a=1", TICKER) == b"a=2&a=1&b=1"


def test_drop_params_exact_and_prefix() -> None:
    query = b"utm_source=x&symbol=BTC&utm_medium=y&fbclid=z&fbclid2=k"
    assert normalise_query(query, TICKER) == b"fbclid2=k&symbol=BTC"


def test_sort_can_be_disabled() -> None:
    key = builder().build(b"https", b"h", b"/api/v1/symbols?z=1&a=2")
    assert key.target == b"/api/v1/symbols?z=1&a=2"


def test_empty_query_and_empty_members_collapse() -> None:
    keys = builder()
    plain = keys.build(b"https", b"h", b"/api/v1/ticker/BTC")
    assert keys.build(b"https", b"h", b"/api/v1/ticker/BTC?").primary == plain.primary
    assert keys.build(b"https", b"h", b"/api/v1/ticker/BTC?&&utm_source=a").primary == plain.primary


def test_path_is_never_decoded_or_resolved() -> None:
    keys = builder()
    base = keys.build(b"https", b"h", b"/api/A").primary
    assert keys.build(b"https", b"h", b"/api/%41").primary != base
    assert keys.build(b"https", b"h", b"/api/x/../A").primary != base


def test_absolute_form_target_replaces_host() -> None:
    key = builder().build(b"http", b"ignored.example", b"https://API.example:443/api/x?b=1&a=2")
    assert key.url == b"https://api.example/api/x?a=2&b=1"
    assert split_target(b"http://h.example?x=1") == (b"/?x=1", b"http", b"h.example")


def test_memo_returns_the_same_object_and_is_bounded() -> None:
    keys = KeyBuilder([TICKER], memo_size=4)
    first = keys.build(b"https", b"h", b"/api/v1/ticker/BTC")
    assert keys.build(b"https", b"h", b"/api/v1/ticker/BTC") is first
    for i in range(10):
        keys.build(b"https", b"h", b"/x%d" % i)
    assert len(keys._memo) <= 4


def test_from_url_matches_request_keys() -> None:
    keys = builder()
    request = keys.build(b"https", b"api.example", b"/api/v1/ticker/BTC?utm_source=a&z=1&a=2")
    assert keys.from_url("https://API.example/api/v1/ticker/BTC?a=2&z=1").primary == request.primary


# Hypothesis: normalisation properties

_NAME = st.text(alphabet="abcdefguz_", min_size=1, max_size=6)
_VALUE = st.text(alphabet="0123456789xyz%", max_size=5)
_PARAMS = st.lists(st.tuples(_NAME, _VALUE), max_size=8)


def _query(params: list[tuple[str, str]]) -> bytes:
    return "&".join(f"{n}={v}" for n, v in params).encode()


def _plain_normalise(query: bytes, rule: CacheRule) -> bytes:
    """``normalise_query`` without its shortcut for one member: split, drop, sort, join."""
    params = [p for p in query.split(b"&") if p]
    if rule.drop_params:
        exact = {p.encode() for p in rule.drop_params if not p.endswith("*")}
        prefixes = tuple(p[:-1].encode() for p in rule.drop_params if p.endswith("*"))
        params = [
            p
            for p in params
            if not (p.partition(b"=")[0] in exact or p.partition(b"=")[0].startswith(prefixes))
        ]
    if rule.sort_query:
        params.sort(key=lambda p: p.partition(b"=")[0])
    return b"&".join(params)


@given(
    st.one_of(
        _PARAMS.map(_query),
        st.sampled_from([b"", b"&", b"=", b"utm_", b"utm_x", b"utm_x=", b"fbclid", b"fbclid=1"]),
        st.binary(max_size=12),
    ),
    st.sampled_from([TICKER, SYMBOLS, API, DEFAULT_RULE]),
)
def test_normalise_query_is_the_plain_split_drop_sort_join(query: bytes, rule: CacheRule) -> None:
    assert normalise_query(query, rule) == _plain_normalise(query, rule)


@given(_PARAMS)
def test_normalisation_is_idempotent(params: list[tuple[str, str]]) -> None:
    once = normalise_query(_query(params), TICKER)
    assert normalise_query(once, TICKER) == once


@given(_PARAMS, st.randoms())
def test_order_of_distinct_names_does_not_matter(
    params: list[tuple[str, str]], rnd: random.Random
) -> None:
    distinct = list({n: (n, v) for n, v in params}.values())
    shuffled = distinct[:]
    rnd.shuffle(shuffled)
    assert normalise_query(_query(distinct), TICKER) == normalise_query(_query(shuffled), TICKER)


@given(_PARAMS, st.lists(st.tuples(st.sampled_from(["utm_source", "utm_x", "fbclid"]), _VALUE)))
def test_dropped_parameters_never_change_the_key(
    params: list[tuple[str, str]], tracking: list[tuple[str, str]]
) -> None:
    keys = builder()
    clean = [(n, v) for n, v in params if not n.startswith("utm_") and n != "fbclid"]
    mixed = clean + tracking
    a = keys.build(b"https", b"h", b"/api/v1/ticker/X?" + _query(clean))
    b = keys.build(b"https", b"h", b"/api/v1/ticker/X?" + _query(mixed))
    assert a.primary == b.primary
    assert b"utm_" not in b.target and b"fbclid=" not in b.target


@given(st.text(alphabet="abcXYZ.-", min_size=1, max_size=20), st.sampled_from([b"http", b"https"]))
def test_host_case_and_default_port_never_matter(name: str, scheme: bytes) -> None:
    default = b"443" if scheme == b"https" else b"80"
    host = name.encode()
    assert normalise_host(host.upper() + b":" + default, scheme) == normalise_host(
        host.lower(), scheme
    )


# --------------------------------------------------------------------------------------------
# Vary secondary keys


def test_vary_values_are_normalised() -> None:
    a = [(b"accept-language", b"en-US,  fr;q=0.5")]
    b = [(b"accept-language", b"en-us"), (b"accept-language", b"fr;q=0.5")]
    assert vary_key([b"accept-language"], a) == vary_key([b"accept-language"], b)


def test_case_sensitive_values_keep_their_case() -> None:
    # Tokens (e.g. Authorization) differ by case: folding them would share private variants.
    assert normalise_value(b"authorization", b"Bearer AbC") != normalise_value(
        b"authorization", b"Bearer abc"
    )
    assert normalise_value(b"x-api-version", b" 2 ,  beta ") == b"2,beta"


def test_absent_and_empty_headers_differ() -> None:
    assert vary_key([b"x-flag"], []) != vary_key([b"x-flag"], [(b"x-flag", b"")])


def test_accept_encoding_reduces_to_the_coding_class() -> None:
    names = [b"accept-encoding"]
    br = vary_key(names, [(b"accept-encoding", b"gzip, deflate, br")])
    assert br == vary_key(names, [(b"accept-encoding", b"br;q=1.0, gzip;q=0.8")])
    gzip = vary_key(names, [(b"accept-encoding", b"gzip")])
    assert gzip == vary_key(names, [(b"accept-encoding", b"x-gzip, deflate")])
    assert len({br, gzip, vary_key(names, [])}) == 3


def test_negotiate_coding() -> None:
    assert negotiate_coding(None) == "identity"
    assert negotiate_coding(b"gzip, br") == "br"
    assert negotiate_coding(b"br;q=0, gzip") == "gzip"
    assert negotiate_coding(b"br;q=0.5, gzip;q=0.9") == "gzip"
    assert negotiate_coding(b"*") == "br"
    assert negotiate_coding(b"deflate") == "identity"
    assert negotiate_coding(b"gzip;q=bogus") == "identity"


@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"x-forwarded-host", b"x-original-url", b"user-agent", b"cookie"]),
            st.binary(max_size=20),
        ),
        max_size=6,
    )
)
def test_headers_outside_the_key_never_change_it(extra: list[tuple[bytes, bytes]]) -> None:
    base = [(b"accept-language", b"en")]
    names = [b"accept-language"]
    assert vary_key(names, base + extra) == vary_key(names, base)


@given(
    st.sampled_from([b"/api/v1/ticker/BTC", b"/api/v1/symbols", b"/api/x", b"/other", b"/"]),
    st.one_of(
        st.none(),
        st.lists(
            st.sampled_from([b"a=1", b"b=2", b"utm_source=x", b"fbclid=1", b"", b"k=9", b"z"]),
            max_size=4,
        ).map(b"&".join),
    ),
    st.sampled_from([b"Example.COM", b"example.com:80", b"example.com."]),
)
def test_build_origin_keys_a_split_origin_form_target_as_build_once(
    path: bytes, query: bytes | None, host: bytes
) -> None:
    # The front end's shortcut (edge.h1fast) splits the target itself; the key must not care.
    keys = builder()
    target = path if query is None else path + b"?" + query
    assert keys.build_origin(b"http", host, target, path) == keys.build_once(b"http", host, target)


def test_build_origin_reuses_a_target_the_rule_leaves_as_it_is() -> None:
    target = b"/api/v1/symbols?k=42"
    key = builder().build_origin(b"http", b"example.com", target, b"/api/v1/symbols")
    assert key.target is target and key.primary == b"G|http://example.com/api/v1/symbols?k=42"
