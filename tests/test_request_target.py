"""The one decision about a request (``edge.request_target``), the chunked-body scanner and the
prefix rules, without sockets (issue 21: defects 1, 2, 5, 6, 10, 13, 15)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.cache.key import KeyBuilder
from edge.cache.key import prefix_matches as rule_prefix_matches
from edge.cache.policy import parse_cache_control, response_meta, uncacheable_reason
from edge.http1 import ChunkedScanner, ForwardingContext, RequestRejected, head_end
from edge.request_target import (
    check_path,
    check_trailer,
    decide_target,
    forward_headers,
    parse_host,
    screen_headers,
)
from edge.router import prefix_matches
from meridian.config import CacheRule

CTX = ForwardingContext(
    client_ip="192.0.2.9",
    scheme=b"http",
    pop="fra",
    http_version="1.1",
    trusted=False,
    request_id_header=b"x-request-id",
    request_id=b"rid",
)
TRUSTED = CTX._replace(trusted=True)


def _status(call, *args, **kwargs) -> tuple[int, str] | None:
    try:
        call(*args, **kwargs)
    except RequestRejected as exc:
        return exc.status, exc.reason
    return None


# --------------------------------------------------------------------------------------------
# Host


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"api.test", b"api.test"),
        (b"API.Test.", b"api.test"),
        (b"api.test:80", b"api.test"),
        (b"api.test:0080", b"api.test"),
        (b"api.test:8080", b"api.test:8080"),
        (b"api.test:", b"api.test"),
        (b"127.0.0.1:80", b"127.0.0.1"),
        (b"[::1]", b"[::1]"),
        (b"[2001:DB8::1]:8443", b"[2001:db8::1]:8443"),
        (b"under_score.internal", b"under_score.internal"),
    ],
)
def test_valid_hosts_are_normalised(raw, expected):
    assert parse_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"good.test/victim",
        b"good.test\\victim",
        b"user@good.test",
        b"good.test victim",
        b"good..test",
        b".good.test",
        b".",
        b"good.test:99999",
        b"good.test:8a",
        b"good.test:80:80",
        b"good.test%2fvictim",
        b"good.test,evil.test",
        b"[::1",
        b"[::1]x",
        b"[fe80::1%25eth0]",
        b"[v1.fe]",
        b"0x7f.1",
        b"127.1",
        b"2130706433",
        b"a" * 300,
        b"\xe2\x98\x83.test",
    ],
)
def test_invalid_hosts_are_refused(raw):
    assert parse_host(raw) is None


@given(st.binary(max_size=40))
def test_a_host_is_either_refused_or_safe_and_stable(raw):
    host = parse_host(raw)
    if host is None:
        return
    assert not any(c in host for c in b"/\\@?# \t,;%")
    assert host == host.lower()
    assert parse_host(host) == host  # normalising twice changes nothing


# --------------------------------------------------------------------------------------------
# Request-target


def test_an_absolute_form_authority_is_the_host_and_host_is_ignored():
    decided = decide_target(b"http://Victim.Test/p?q=1", b"evil.test", "1.1")
    assert decided == (b"/p?q=1", "/p", b"victim.test")
    assert decide_target(b"HTTPS://victim.test:443", b"a", "1.1") == (b"/", "/", b"victim.test")
    assert decide_target(b"http://victim.test?x", b"a", "1.1") == (b"/?x", "/", b"victim.test")
    # The edge speaks one scheme: https://h/ keys and forwards like http://h/.
    assert decide_target(b"http://victim.test:80/x", b"a", "1.1").host == b"victim.test"


def test_the_host_header_is_validated_and_normalised():
    assert decide_target(b"/x", b"API.test.:80", "1.1").host == b"api.test"
    assert _status(decide_target, b"/x", b"good.test/victim", "1.1") == (400, "invalid_host")
    assert _status(decide_target, b"/x", None, "1.1") == (400, "missing_host")
    assert decide_target(b"/x", None, "1.0").host is None  # HTTP/1.0 may omit Host
    # Host is still validated next to an absolute-form target.
    assert _status(decide_target, b"http://a.test/", b"a b", "1.1") == (400, "invalid_host")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (b"ftp://victim.test/x", "unsupported_scheme"),
        (b"file:///etc/passwd", "unsupported_scheme"),
        (b"gopher://victim.test/", "unsupported_scheme"),
        (b"http://user:pw@victim.test/", "userinfo_in_target"),
        (b"http://evil.test@victim.test/", "userinfo_in_target"),
        (b"http:///x", "invalid_host"),
        (b"http://victim.test/victim/x", None),
        (b"http://victim.test/p#frag", "fragment_in_target"),
        (b"*", "asterisk_form"),
        (b"/a/../orders", "dot_segment_in_target"),
        (b"/a/%2e%2E/orders", "dot_segment_in_target"),
        (b"/a/.%2e/orders", "dot_segment_in_target"),
        (b"/a/./b", "dot_segment_in_target"),
        (b"/a/..", "dot_segment_in_target"),
        (b"/a%00b", "invalid_target"),
        (b"/a%5c..%5cb", "invalid_target"),
        (b"/a/..b/...", None),
        (b"/a?next=/../x", None),  # the query is not a path
    ],
)
def test_targets_the_origin_could_read_differently_are_refused(url, reason):
    got = _status(decide_target, url, b"victim.test", "1.1")
    assert got == (None if reason is None else (400, reason))


@given(st.binary(min_size=1, max_size=30).map(lambda b: b"/" + b))
def test_an_accepted_path_has_no_dot_segment_nor_control(path):
    try:
        check_path(path)
    except RequestRejected:
        return
    segments = path.split(b"?", 1)[0].lower().split(b"/")
    assert not {b".", b"..", b"%2e", b"%2e%2e"} & set(segments)
    assert all(c > 0x20 and c != 0x7F for c in path.split(b"?", 1)[0])


# --------------------------------------------------------------------------------------------
# Headers


def test_screening_writes_the_decided_host_and_drops_underscore_names():
    headers = [
        (b"host", b"API.Test.:80"),
        (b"x_forwarded_for", b"6.6.6.6"),
        (b"x_forwarded_host", b"evil.test"),
        (b"accept", b"*/*"),
    ]
    assert screen_headers(headers, b"api.test") == [(b"host", b"api.test"), (b"accept", b"*/*")]
    unchanged = [(b"host", b"api.test"), (b"accept", b"*/*")]
    assert screen_headers(unchanged, b"api.test") is unchanged
    # An absolute-form target's host is written in (HTTP/1.0 without Host gets one).
    assert screen_headers([(b"host", b"evil.test")], b"victim.test") == [(b"host", b"victim.test")]
    assert screen_headers([], b"victim.test") == [(b"host", b"victim.test")]


@pytest.mark.parametrize("name", [b"transfer_encoding", b"content_length"])
def test_underscore_spellings_of_framing_fields_are_refused(name):
    assert _status(screen_headers, [(b"host", b"a"), (name, b"chunked")], b"a") == (
        400,
        "underscore_in_header_name",
    )


def test_connection_nominations_are_removed_once_for_key_and_origin_alike():
    headers = [
        (b"host", b"a"),
        (b"connection", b"keep-alive, X-Lang"),
        (b"x-lang", b"fr"),
        (b"cookie", b"c=1"),
    ]
    screened = screen_headers(headers, b"a")
    assert (b"x-lang", b"fr") not in screened and (b"cookie", b"c=1") in screened
    # What goes upstream is what the cache keyed on: nothing more is removed there.
    sent = forward_headers(screened, CTX)
    assert [n for n, _ in sent if n in (b"x-lang", b"cookie")] == [b"cookie"]
    for protected in (b"host", b"Content-Length", b"keep-alive, HOST"):
        assert _status(screen_headers, [(b"host", b"a"), (b"connection", protected)], b"a") == (
            400,
            "connection_nominates_protected",
        )


def test_forwarded_headers_come_from_the_decision():
    headers = screen_headers(
        [
            (b"host", b"evil.test"),
            (b"x-forwarded-host", b"evil.test"),
            (b"x-original-url", b"/admin"),
            (b"x-host", b"evil.test"),
            (b"forwarded", b"host=evil.test"),
            (b"x-http-method-override", b"DELETE"),
        ],
        b"victim.test",
    )
    sent = dict(forward_headers(headers, CTX))
    assert sent[b"host"] == sent[b"x-forwarded-host"] == b"victim.test"
    for dropped in (b"x-original-url", b"x-host", b"forwarded"):
        assert dropped not in sent
    assert sent[b"x-http-method-override"] == b"DELETE"  # not stored: may pass on BYPASS
    filled = dict(forward_headers(headers, CTX, fill=True))
    assert b"x-http-method-override" not in filled and filled[b"host"] == b"victim.test"
    # A trusted proxy's routing headers pass on uncached requests, never on fills.
    assert dict(forward_headers(headers, TRUSTED))[b"x-original-url"] == b"/admin"
    assert b"x-original-url" not in dict(forward_headers(headers, TRUSTED, fill=True))
    # Underscore names never pass, even unscreened.
    assert b"x_a" not in dict(forward_headers([(b"x_a", b"1")], CTX))


def test_trailer_fields_that_could_only_be_an_attack_are_refused():
    for name in (b"host", b"x-forwarded-host", b"authorization", b"content-length", b"x_a"):
        assert _status(check_trailer, name) == (400, "forbidden_trailer")
    assert check_trailer(b"x-checksum") is None


# --------------------------------------------------------------------------------------------
# Chunked scanner


def _no_trailer_check(name: bytes) -> None:
    return None


def _encode(chunks: list[bytes], ext: bytes, trailers: list[bytes]) -> bytes:
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(c), ext, c) for c in chunks if c)
    return out + b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"


@settings(max_examples=300)
@given(
    chunks=st.lists(st.binary(max_size=40), max_size=6),
    ext=st.sampled_from([b"", b";a=b", b";name"]),
    trailers=st.lists(st.sampled_from([b"x-sum: 1", b"x-b: two words"]), max_size=2),
    tail=st.binary(max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=5),
)
def test_the_scanner_finds_the_end_of_any_chunked_body_however_it_is_split(
    chunks, ext, trailers, tail, cuts
):
    body = _encode(chunks, ext, trailers)
    data = body + tail
    scanner = ChunkedScanner(10_000, _no_trailer_check)
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    found = None
    for lo, hi in itertools.pairwise(bounds):
        end = scanner.feed(data[lo:hi])
        if end is not None:
            found = lo + end
            break
    assert found == len(body)
    assert scanner.done


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"ffffffffffffffff\r\nhello\r\n0\r\n\r\n", (400, "invalid_chunk_size")),
        (b"8000000000000000\r\n", (400, "invalid_chunk_size")),
        (b"00000000000000000005\r\nhello\r\n0\r\n\r\n", (400, "invalid_chunk_size")),
        (b"zz\r\n", (400, "invalid_chunk_size")),
        (b"5" + b";e" * 3000 + b"\r\n", (400, "chunk_line_too_long")),
        (b"400\r\n", (413, "body_too_large")),  # declared: refused before its bytes arrive
        (b"200\r\n" + b"x" * 512 + b"\r\n200\r\n", (413, "body_too_large")),
        (b"5\r\nhello\r\n0\r\nHost: evil.test\r\n\r\n", (400, "forbidden_trailer")),
        (b"0\r\nX-Forwarded-Host: evil\r\n\r\n", (400, "forbidden_trailer")),
        (b"0\r\n" + b"x-a: b\r\n" * 2000 + b"\r\n", (400, "trailers_too_large")),
    ],
)
def test_the_scanner_refuses_sizes_and_trailers_before_the_parser_passes_bytes_on(body, expected):
    scanner = ChunkedScanner(1000, check_trailer)
    assert _status(scanner.feed, body) == expected


def test_head_end_finds_the_end_of_a_head_in_any_chunk():
    data = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nPOST /b HTTP/1.1\r\n\r\n"
    first = head_end(data, 0, b"")
    assert data[:first].endswith(b"\r\n\r\n") and data[first:].startswith(b"POST")
    assert head_end(data, first, b"") == len(data)
    assert head_end(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", 0, b"") == 22  # empty lines first
    assert head_end(b"\nrest", -1, b"a\r\n\r") == 1  # the CRLFCRLF straddles two chunks
    assert head_end(b"Host: a\r\n", 0, b"") == -1


# --------------------------------------------------------------------------------------------
# Prefixes and personalised answers (defect 15)


@pytest.mark.parametrize("matches", [prefix_matches, rule_prefix_matches])
def test_prefixes_match_on_segment_boundaries(matches):
    assert matches("/api/v1/symbols", "/api/v1/symbols")
    assert matches("/api/v1/symbols/x", "/api/v1/symbols")
    assert not matches("/api/v1/symbolsX", "/api/v1/symbols")
    assert not matches("/api/v1/symbols.json", "/api/v1/symbols")
    assert matches("/api/v1/ticker/BTC", "/api/v1/ticker/")
    assert not matches("/api/v1/ticker", "/api/v1/ticker/")
    assert matches("/anything", "/")


def test_a_cache_rule_covers_its_own_segment_only():
    keys = KeyBuilder([CacheRule(path_prefix="/api/v1/symbols", ttl=300.0)])
    assert keys.rule_for(b"/api/v1/symbols").ttl == 300.0
    assert keys.rule_for(b"/api/v1/symbols-private").ttl is None


def test_a_rule_ttl_never_stores_the_answer_to_a_request_with_a_cookie():
    rule = CacheRule(path_prefix="/", ttl=60.0)
    forced = CacheRule(path_prefix="/", ttl=60.0, force_ttl=True)
    silent = response_meta([(b"content-type", b"application/json")])
    explicit = response_meta([(b"cache-control", b"max-age=5")])
    no_cc = parse_cache_control(None)
    for r in (rule, forced):
        assert uncacheable_reason(b"GET", 200, no_cc, False, silent, r, True) == "cookie"
        assert uncacheable_reason(b"GET", 200, no_cc, False, silent, r, False) is None
        # The origin's own shared lifetime is its consent.
        assert uncacheable_reason(b"GET", 200, no_cc, False, explicit, r, True) is None
