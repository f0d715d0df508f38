"""Pure parts of the edge, without sockets: framing rules, header rewriting, routing, backend
choice and the failover walk."""

from __future__ import annotations

import random
from collections import Counter
from ipaddress import ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.http1 import (
    BodyKind,
    ForwardingContext,
    RequestRejected,
    check_header_section,
    check_request_framing,
    check_url_length,
    error_response,
    is_trusted,
    response_framing,
    rewrite_response_headers,
    serialize_head,
    valid_request_id,
)
from edge.request_target import forward_headers
from edge.router import Router, normalise_host, order_regions
from edge.upstream import (
    MAX_ATTEMPTS,
    Attempt,
    FailureKind,
    live_regions,
    next_attempt,
    pick_backend,
    retry_allowed,
)
from meridian.config import EdgeLimits, parse_config

LIMITS = EdgeLimits(max_header_bytes=1000, max_headers=10, max_url=100, max_body=1000)


# -- framing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "version", "reason"),
    [
        (
            [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
            "1.1",
            "content_length_with_transfer_encoding",
        ),
        ([(b"content-length", b"5"), (b"content-length", b"5")], "1.1", "duplicate_content_length"),
        ([(b"content-length", b"5"), (b"content-length", b"6")], "1.1", "duplicate_content_length"),
        ([(b"content-length", b"5, 5")], "1.1", "invalid_content_length"),
        ([(b"content-length", b"-1")], "1.1", "invalid_content_length"),
        ([(b"content-length", b"+5")], "1.1", "invalid_content_length"),
        ([(b"transfer-encoding", b"gzip, chunked")], "1.1", "unsupported_transfer_encoding"),
        (
            [(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")],
            "1.1",
            "unsupported_transfer_encoding",
        ),
        ([(b"transfer-encoding", b"chunked")], "1.0", "transfer_encoding_in_http10"),
    ],
)
def test_ambiguous_framing_is_rejected(headers, version, reason):
    with pytest.raises(RequestRejected) as caught:
        check_request_framing(headers, version, LIMITS)
    assert (caught.value.status, caught.value.reason) == (400, reason)


def test_framing_of_valid_requests():
    assert check_request_framing([], "1.1", LIMITS).kind is BodyKind.NONE
    assert check_request_framing([(b"content-length", b"0")], "1.1", LIMITS).kind is BodyKind.NONE
    framing = check_request_framing([(b"content-length", b"12")], "1.1", LIMITS)
    assert (framing.kind, framing.length) == (BodyKind.LENGTH, 12)
    assert (
        check_request_framing([(b"transfer-encoding", b"Chunked")], "1.1", LIMITS).kind
        is BodyKind.CHUNKED
    )


def test_limits_give_the_right_status():
    with pytest.raises(RequestRejected) as caught:
        check_request_framing([(b"content-length", b"1001")], "1.1", LIMITS)
    assert caught.value.status == 413
    with pytest.raises(RequestRejected) as caught:
        check_url_length(101, LIMITS)
    assert caught.value.status == 414
    check_url_length(100, LIMITS)
    with pytest.raises(RequestRejected) as caught:
        check_header_section(11, 10, LIMITS)
    assert caught.value.status == 431
    with pytest.raises(RequestRejected) as caught:
        check_header_section(1, 1001, LIMITS)
    assert caught.value.status == 431


@given(st.integers(min_value=0, max_value=10**25))
def test_any_content_length_is_accepted_or_413(length):
    headers = [(b"content-length", str(length).encode())]
    if length > LIMITS.max_body:
        with pytest.raises(RequestRejected) as caught:
            check_request_framing(headers, "1.1", LIMITS)
        assert caught.value.status in (400, 413)
    else:
        framing = check_request_framing(headers, "1.1", LIMITS)
        assert framing.length == length or (length == 0 and framing.kind is BodyKind.NONE)


# -- header rewriting --------------------------------------------------------------------------

CTX = ForwardingContext(
    client_ip="203.0.113.9",
    scheme=b"http",
    pop="fra",
    http_version="1.1",
    trusted=False,
    request_id_header=b"x-request-id",
    request_id=b"abc123",
)


def test_hop_by_hop_and_connection_named_headers_are_stripped():
    headers = [
        (b"host", b"api.example"),
        (b"connection", b"keep-alive, X-Secret"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"trailer", b"x"),
        (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic x"),
        (b"proxy-connection", b"keep-alive"),
        (b"x-secret", b"1"),
        (b"x-kept", b"  odd  Value\t"),
        (b"accept", b"*/*"),
        (b"expect", b"100-continue"),
    ]
    out = forward_headers(headers, CTX)
    names = [n for n, _ in out]
    for gone in (
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-connection",
        b"x-secret",
        b"expect",
    ):
        assert gone not in names
    assert (b"x-kept", b"  odd  Value\t") in out  # byte-faithful
    assert (b"host", b"api.example") in out
    assert (b"via", b"1.1 meridian-fra") in out
    assert (b"x-request-id", b"abc123") in out


def test_forwarded_headers_from_untrusted_clients_are_replaced():
    headers = [
        (b"host", b"a"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"evil"),
        (b"x-request-id", b"client-id"),
    ]
    out = dict(forward_headers(headers, CTX))
    assert out[b"x-forwarded-for"] == b"203.0.113.9"
    assert out[b"x-forwarded-proto"] == b"http"
    assert out[b"x-forwarded-host"] == b"a"
    assert out[b"x-request-id"] == b"abc123"


def test_forwarded_headers_from_trusted_proxies_are_extended():
    trusted = CTX._replace(trusted=True)
    headers = [
        (b"host", b"a"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"api.example"),
        (b"via", b"1.1 lb"),
    ]
    out = dict(forward_headers(headers, trusted))
    assert out[b"x-forwarded-for"] == b"1.2.3.4, 203.0.113.9"
    assert out[b"x-forwarded-proto"] == b"https"
    assert out[b"x-forwarded-host"] == b"api.example"
    assert out[b"via"] == b"1.1 lb, 1.1 meridian-fra"
    assert is_trusted("10.1.2.3", [ip_network("10.0.0.0/8")])
    assert not is_trusted("11.1.2.3", [ip_network("10.0.0.0/8")])
    assert not is_trusted("not-an-ip", [ip_network("10.0.0.0/8")])


def test_websocket_handshake_keeps_upgrade():
    headers = [
        (b"host", b"a"),
        (b"connection", b"Upgrade"),
        (b"upgrade", b"websocket"),
        (b"sec-websocket-key", b"k"),
    ]
    out = forward_headers(headers, CTX, keep_upgrade=True)
    assert (b"upgrade", b"websocket") in out
    assert (b"connection", b"upgrade") in out
    assert (b"sec-websocket-key", b"k") in out


_token = st.binary(min_size=1, max_size=12).map(lambda b: bytes(97 + c % 26 for c in b))


@given(
    st.lists(st.tuples(_token, st.binary(max_size=20)), max_size=20), st.lists(_token, max_size=3)
)
def test_rewriting_never_forwards_hop_by_hop(headers, named):
    headers = [*headers, (b"connection", b", ".join(named))]
    out = forward_headers(headers, CTX)
    names = {n for n, _ in out}
    assert not names & {b"connection", b"keep-alive", b"te", b"transfer-encoding", b"upgrade"}
    assert not names & set(named) - {
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"via",
        b"x-request-id",
    }
    assert sum(1 for n, _ in out if n == b"x-request-id") == 1


def test_response_headers_drop_hop_by_hop_and_framing():
    out = rewrite_response_headers(
        [
            (b"Content-Length", b"5"),
            (b"Connection", b"X-Private"),
            (b"X-Private", b"1"),
            (b"ETag", b'"v1"'),
            (b"Transfer-Encoding", b"chunked"),
        ]
    )
    assert out == [(b"etag", b'"v1"')]


def test_response_framing_and_head_serialisation():
    assert response_framing("HEAD", 200, 10, True).kind is BodyKind.NONE
    assert response_framing("GET", 304, 10, True).kind is BodyKind.NONE
    assert response_framing("GET", 200, 10, True).length == 10
    assert response_framing("GET", 200, None, True).kind is BodyKind.CHUNKED
    assert response_framing("GET", 200, None, False).kind is BodyKind.UNTIL_CLOSE
    head = serialize_head(
        200, b"OK", [(b"a", b"b")], response_framing("GET", 200, None, True), keep_alive=True
    )
    assert head == b"HTTP/1.1 200 OK\r\na: b\r\ntransfer-encoding: chunked\r\n\r\n"


def test_error_response_is_small_json_naming_pop_and_reason():
    raw = error_response(503, "fra", "no_healthy_region", b"rid", retry_after=5)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"retry-after: 5" in head and b"connection: close" in head
    assert b'"pop":"fra"' in body and b'"reason":"no_healthy_region"' in body
    assert f"content-length: {len(body)}".encode() in head


def test_request_ids_from_clients_are_validated():
    assert valid_request_id(b"abc-123")
    assert not valid_request_id(b"")
    assert not valid_request_id(b"a b")
    assert not valid_request_id(b"x" * 200)


@given(st.binary(max_size=140))
def test_request_id_validation_is_the_printable_ascii_rule(value: bytes) -> None:
    """Kept: 1-128 bytes, each visible ASCII (0x21-0x7e); the compiled pattern says exactly
    that (no trailing-newline or Unicode leniency)."""
    assert valid_request_id(value) == (0 < len(value) <= 128 and all(33 <= c <= 126 for c in value))


# -- routing -----------------------------------------------------------------------------------


def _config(edge_extra=None, pops=None):
    data = {
        "regions": {
            "us-east": {
                "location": {"lat": 39.04, "lon": -77.49},
                "backends": ["http://u1", "http://u2"],
            },
            "eu-central": {
                "location": {"lat": 50.11, "lon": 8.68},
                "backends": ["http://e1", "http://e2"],
                "residency": "eu",
            },
            "eu-west": {
                "location": {"lat": 53.35, "lon": -6.26},
                "backends": ["http://w1"],
                "residency": "eu",
            },
            "ap-southeast": {"location": {"lat": 1.35, "lon": 103.82}, "backends": ["http://a1"]},
        },
        "pops": pops
        or {
            "fra": {"location": {"lat": 50.11, "lon": 8.68}, "addresses": ["127.0.1.3"]},
            "sin": {"location": {"lat": 1.35, "lon": 103.82}, "addresses": ["127.0.1.4"]},
            "iad": {
                "location": {"lat": 39.04, "lon": -77.49},
                "addresses": ["127.0.1.1"],
                "regions": ["ap-southeast"],
            },
        },
        "dns": {
            "zone": "m.test",
            "soa": {"mname": "ns1.m.test", "rname": "h.m.test"},
            "ns": [{"name": "ns1.m.test", "addresses": ["127.0.0.1"]}],
            "names": {"api": {"targets": "pops"}},
        },
        "edge": {
            "services": {"market": {}, "accounts": {"residency": "eu"}},
            "routes": [
                {"name": "default", "service": "market", "path_prefix": "/"},
                {"name": "api", "service": "market", "path_prefix": "/api/"},
                {"name": "accounts", "service": "accounts", "path_prefix": "/api/v1/accounts"},
                {
                    "name": "admin-host",
                    "service": "accounts",
                    "host": "admin.example",
                    "path_prefix": "/",
                },
                {"name": "wild", "service": "market", "host": "*.example", "path_prefix": "/"},
            ],
            **(edge_extra or {}),
        },
    }
    return parse_config(data)


def test_regions_are_ordered_nearest_first_per_pop():
    config = _config()
    assert Router(config, "fra").match("x", "/api/v1/ticker/BTC").regions == (
        "eu-central",
        "eu-west",
        "us-east",
        "ap-southeast",
    )
    assert Router(config, "sin").match("x", "/").regions[0] == "ap-southeast"
    # An explicit order in the POP comes first, the rest follow by distance.
    assert Router(config, "iad").match("x", "/").regions == (
        "ap-southeast",
        "us-east",
        "eu-west",
        "eu-central",
    )


def test_residency_keeps_an_eu_service_in_eu_regions_from_any_pop():
    config = _config()
    for pop in ("fra", "sin", "iad"):
        target = Router(config, pop).match("x", "/api/v1/accounts/7")
        assert target is not None and target.service.name == "accounts"
        assert set(target.regions) == {"eu-central", "eu-west"}
    service = config.edge.services[1]
    assert order_regions(config.pop("sin"), config.regions, service) == ("eu-central", "eu-west")


def test_routes_match_by_host_then_longest_prefix():
    router = Router(_config(), "fra")
    assert router.match("api.other", "/api/v1/x").route.name == "api"
    assert router.match("api.other", "/health").route.name == "default"
    assert router.match("admin.example", "/api/v1/x").route.name == "admin-host"
    assert router.match("a.example", "/api/v1/x").route.name == "wild"
    assert router.match("example", "/api/v1/x").route.name == "api"
    assert normalise_host(b"API.Example:8080") == "api.example"
    assert normalise_host(b"[::1]:80") == "[::1]"
    assert normalise_host(None) == ""


# -- backend choice and failover -------------------------------------------------------------


class FakeHealth:
    def __init__(
        self,
        regions: dict[str, tuple[str, ...]],
        down: set[str] = frozenset(),
        ejected: set[str] = frozenset(),
    ) -> None:
        self.regions = regions
        self.down = down | ejected
        self.ejected = ejected

    def region_up(self, name: str) -> bool:
        return name not in self.down

    def ejected_only(self, name: str) -> bool:
        return name in self.ejected

    def usable_backends(self, region: str) -> tuple[str, ...]:
        return self.regions[region]


def test_regions_down_only_through_ejection_serve_when_no_region_is_up():
    backends = {"eu": ("e1",), "us": ("u1",), "ap": ("a1",)}
    order = ("eu", "us", "ap")
    assert live_regions(order, FakeHealth(backends, down={"eu"})) == ("us", "ap")
    # An ejected region is skipped while another is up...
    assert live_regions(order, FakeHealth(backends, down={"us"}, ejected={"eu"})) == ("ap",)
    # ...and tried (in order) when nothing is: panic beats a 503 for the ejection's length.
    health = FakeHealth(backends, down={"us"}, ejected={"eu", "ap"})
    assert live_regions(order, health) == ("eu", "ap")
    assert live_regions(order, FakeHealth(backends, down={"eu", "us", "ap"})) == ()


def test_power_of_two_choices_prefers_the_less_loaded_backend():
    rng = random.Random(1)
    outstanding = {"a": 10, "b": 0, "c": 10, "d": 10}
    picks = Counter(pick_backend(["a", "b", "c", "d"], outstanding, rng) for _ in range(4000))
    # "b" wins every sample that contains it: 1 - C(3,2)/C(4,2) = 50% of draws.
    assert 0.45 < picks["b"] / 4000 < 0.55
    assert pick_backend(["a", "b"], {"a": 3, "b": 1}, rng) == "b"
    assert pick_backend(["a"], {}, rng) == "a"
    assert pick_backend(["a", "b"], {}, rng, frozenset({"a", "b"})) is None


def test_power_of_two_choices_spreads_equal_load():
    rng = random.Random(2)
    picks = Counter(pick_backend(["a", "b", "c"], {}, rng) for _ in range(3000))
    assert all(800 < picks[b] < 1200 for b in "abc")


def test_failover_walk_retries_another_backend_then_the_next_region():
    health = FakeHealth({"eu": ("e1", "e2", "e3"), "us": ("u1", "u2"), "ap": ("a1",)})
    rng = random.Random(3)
    tried: list[Attempt] = []
    while (attempt := next_attempt(("eu", "us", "ap"), health, tried, {}, rng)) is not None:
        tried.append(attempt)
    assert [a.region for a in tried] == ["eu", "eu", "us", "us"]
    assert len(tried) == MAX_ATTEMPTS
    assert len({a.backend for a in tried}) == len(tried)


def test_failover_walk_skips_to_the_next_region_when_a_region_has_one_backend():
    health = FakeHealth({"eu": ("e1",), "us": ("u1", "u2")})
    first = next_attempt(("eu", "us"), health, [], {}, random.Random(0))
    assert first == Attempt("eu", "e1")
    second = next_attempt(("eu", "us"), health, [first], {}, random.Random(0))
    assert second is not None and second.region == "us"


def test_only_idempotent_bodiless_requests_are_retried():
    methods = frozenset({"GET", "HEAD"})
    assert retry_allowed("GET", methods, False, FailureKind.CONNECT)
    assert retry_allowed("HEAD", methods, False, FailureKind.TIMEOUT)
    assert not retry_allowed("POST", methods, False, FailureKind.RESET)
    assert not retry_allowed("POST", methods, False, FailureKind.TIMEOUT)
    assert not retry_allowed("GET", methods, True, FailureKind.RESET)
    assert retry_allowed("PUT", frozenset({"PUT"}), False, FailureKind.RESET)
