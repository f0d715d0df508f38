"""The sans-I/O cores: wire parser, responder (fast == slow, byte for byte), selection, RRL."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import random
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geodns import wire
from geodns.ratelimit import ResponseRateLimiter, Verdict
from geodns.responder import Responder, truncate_for_slip
from geodns.selection import select
from geodns.wire import WireError, parse_query
from geodns.zone import Zone
from meridian.config import Config, RateLimitConfig, parse_config
from meridian.geo import ClientLocation, GeoLocator
from tests.dns_support import CITY_TEST_DB, base_config, make_query, with_many_answers

LOOPBACK = ipaddress.ip_address("127.0.0.1")


@dataclass(frozen=True)
class FakeHealth:
    """A health snapshot as plain data: the input of the pure functions under test."""

    down: frozenset[str] = frozenset()
    hints: Mapping[str, float] = field(default_factory=dict)
    generation: int = 1

    def pop_up(self, name: str) -> bool:
        return name not in self.down

    def pop_serves(self, pop: str, service: str) -> bool:
        return f"{pop}/{service}" not in self.down

    def region_up(self, name: str) -> bool:
        return name not in self.down

    def ttl_hint(self, target: str) -> float | None:
        return self.hints.get(target)


ALL_UP = FakeHealth()


@pytest.fixture(scope="module")
def config() -> Config:
    return parse_config(with_many_answers(base_config()))


@pytest.fixture(scope="module")
def plain() -> Config:
    return parse_config(base_config())


@pytest.fixture(scope="module")
def responder(config: Config) -> Responder:
    locator = GeoLocator(config.geo, config.pops[0].location)
    return Responder(Zone.build(config), locator)


@pytest.fixture(scope="module")
def responder_by_address(config: Config) -> Responder:
    """A second responder over its own locator (its compiled answers are its own)."""
    locator = GeoLocator(config.geo, config.pops[0].location)
    return Responder(Zone.build(config), locator)


# ---------------------------------------------------------------------------------- parser


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_wire_error(data: bytes) -> None:
    try:
        query = parse_query(data)
    except WireError:
        return
    assert query.question == data[12 : 12 + len(query.question)]


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=80), st.integers(0, 600))
def test_mutated_valid_queries_parse_or_raise_wire_error(junk: bytes, at: int) -> None:
    good = dns.message.make_query(
        "api.meridian.test", "A", use_edns=0, options=[dns.edns.ECSOption("1.2.3.0", 24)]
    ).to_wire()
    at %= len(good)
    for data in (good[:at] + junk + good[at:], good[:at] + junk, good[:at]):
        with contextlib.suppress(WireError):
            parse_query(data)


def test_parse_query_reads_ecs_and_edns_flags() -> None:
    query = dns.message.make_query(
        "API.Meridian.Test",
        "AAAA",
        use_edns=0,
        payload=4000,
        want_dnssec=True,
        options=[dns.edns.ECSOption("2001:db8:ab00::", 40)],
    )
    parsed = parse_query(query.to_wire())
    assert parsed.qname_key == b"\x03api\x08meridian\x04test\x00"
    assert parsed.qtype == wire.TYPE_AAAA and parsed.only_question_and_opt
    assert parsed.edns is not None and parsed.edns.do_bit and parsed.edns.payload == 4000
    assert parsed.edns.ecs == wire.ClientSubnet(2, 40, bytes.fromhex("20010db8ab"))


def test_compression_loops_and_forward_pointers_are_rejected() -> None:
    header = struct.pack("!HHHHHH", 1, 0, 1, 1, 0, 0)
    question = b"\x01a\x00" + struct.pack("!HH", 1, 1)
    loop = header + question + b"\xc0\x15" + b"\x00" * 10  # points at itself (offset 21)
    with pytest.raises(WireError):
        parse_query(loop)
    pointer_in_question = header[:5] + b"\x01" + header[6:] + b"\xc0\x00" + b"\x00\x01\x00\x01"
    with pytest.raises(WireError):
        parse_query(pointer_in_question)


# ----------------------------------------------------------------- fast path == slow path

NAMES = ["api", "two", "origin", "many", "deep.sub", "API", "Two", "oRiGiN"]
V4_SUBNETS = [
    "200.160.2.0",
    "81.2.69.160",
    "8.8.8.0",
    "1.1.1.0",
    "165.21.0.0",
    "10.1.0.0",
    "10.2.3.0",
    "5.9.0.0",
    "203.0.113.0",
    "0.0.0.0",
]


@st.composite
def fast_queries(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(NAMES)) + draw(
        st.sampled_from([".meridian.test", ".MERIDIAN.test"])
    )
    rdtype = draw(st.sampled_from(["A", "AAAA", "ANY"]))
    edns = draw(st.booleans())
    if not edns:
        query = dns.message.make_query(name, rdtype, use_edns=False)
    else:
        options: list[dns.edns.Option] = []
        if draw(st.booleans()):
            if draw(st.booleans()):
                prefix = draw(st.integers(0, 32))
                address = draw(st.sampled_from(V4_SUBNETS))
            else:
                prefix = draw(st.integers(0, 128))
                address = draw(
                    st.sampled_from(["2001:4860:4860::", "2a02:d180::", "::ffff:1.1.1.1"])
                )
            options.append(dns.edns.ECSOption(address, prefix))
        query = dns.message.make_query(
            name,
            rdtype,
            use_edns=0,
            payload=draw(st.integers(0, 65535)),
            options=options,
            want_dnssec=draw(st.booleans()),
        )
    query.id = draw(st.integers(0, 65535))
    if not draw(st.booleans()):
        query.flags &= ~dns.flags.RD
    return query.to_wire()


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=fast_queries(),
    tcp=st.booleans(),
    down=st.sets(
        st.sampled_from(["iad", "gru", "fra", "sin", "syd", "big", "eu-central", "us-east"])
    ),
)
def test_fast_and_slow_paths_are_byte_identical(
    responder: Responder, data: bytes, tcp: bool, down: set[str]
) -> None:
    health = FakeHealth(frozenset(down), generation=hash(frozenset(down)))
    fast = responder.respond(data, LOOPBACK, tcp=tcp, health=health)
    slow = responder.respond_slow(data, LOOPBACK, tcp=tcp, health=health)
    assert fast is not None and slow is not None
    assert fast.fast and not slow.fast
    assert fast.wire == slow.wire
    assert (fast.rcode, fast.truncated, fast.targets) == (slow.rcode, slow.truncated, slow.targets)
    # And a memo hit (same generation) gives the same bytes again.
    again = responder.respond(data, LOOPBACK, tcp=tcp, health=health)
    assert again is not None and again.wire == fast.wire


@st.composite
def v4_ecs_queries(draw: st.DrawFn) -> bytes:
    """Any IPv4 subnet (overrides and their neighbours included): the located-network cache
    must place every address exactly as the locator does."""
    near = draw(st.sampled_from([0, 0x0A010000, 0x0A020000, 0x0A030000, 0xC8A00000, 0x51024500]))
    value = (near + draw(st.integers(0, 0x3FFFF))) if near else draw(st.integers(0, 2**32 - 1))
    prefix = draw(st.integers(1, 32))
    value &= (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    name = draw(st.sampled_from(["api", "two", "origin", "deep.sub"])) + ".meridian.test"
    query = dns.message.make_query(
        name,
        draw(st.sampled_from(["A", "AAAA"])),
        use_edns=0,
        options=[dns.edns.ECSOption(str(ipaddress.IPv4Address(value)), prefix)],
    )
    return query.to_wire()


@settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=v4_ecs_queries())
def test_fast_path_places_any_ipv4_subnet_as_the_slow_path(
    responder: Responder, responder_by_address: Responder, data: bytes
) -> None:
    fast = responder.respond(data, LOOPBACK, tcp=False, health=ALL_UP)
    slow = responder.respond_slow(data, LOOPBACK, tcp=False, health=ALL_UP)
    by_address = responder_by_address.respond(data, LOOPBACK, tcp=False, health=ALL_UP)
    assert fast is not None and slow is not None and fast.fast
    assert fast.wire == slow.wire
    assert by_address is not None and by_address.fast and by_address.wire == fast.wire


@st.composite
def v6_ecs_queries(draw: st.DrawFn) -> bytes:
    """Any IPv6 subnet: IPv4-mapped (the IPv4 map, overrides included), the IPv4-compatible
    and 6to4 aliases of the database's IPv4 tree (no IPv4 overrides), an IPv6 override, the
    database's IPv6 networks and what lies between them."""
    near = draw(
        st.sampled_from(
            [
                0,
                0xFFFF << 32,  # ::ffff:0:0/96
                (0xFFFF << 32) | 0x0A010000,  # ::ffff:10.1.0.0 (an IPv4 override)
                0x0A010000,  # ::10.1.0.0 (the database, not the override)
                0x2002 << 112,
                int(ipaddress.IPv6Address("2001:4860:4860::")),
                int(ipaddress.IPv6Address("2a02:d180::")),
                int(ipaddress.IPv6Address("2001:db8:77::")),
            ]
        )
    )
    spread = draw(st.integers(0, 96))
    value = near ^ (draw(st.integers(0, 2**20 - 1)) << spread) if near else 0
    if not near:
        value = draw(st.integers(0, 2**128 - 1))
    prefix = draw(st.integers(1, 128))
    value &= ((1 << 128) - 1) ^ ((1 << (128 - prefix)) - 1)
    name = draw(st.sampled_from(["api", "two", "origin", "deep.sub"])) + ".meridian.test"
    query = dns.message.make_query(
        name,
        draw(st.sampled_from(["A", "AAAA", "ANY"])),
        use_edns=0,
        options=[dns.edns.ECSOption(str(ipaddress.IPv6Address(value)), prefix)],
    )
    return query.to_wire()


@settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=v6_ecs_queries())
def test_fast_path_places_any_ipv6_subnet_as_the_slow_path(
    responder_v6: Responder, data: bytes
) -> None:
    """The compiled IPv6 map (aliases, mapped block, overrides) answers as the locator does,
    with the same scope, byte for byte; a repeat of the shape does too."""
    fast = responder_v6.respond(data, LOOPBACK, tcp=False, health=ALL_UP)
    slow = responder_v6.respond_slow(data, LOOPBACK, tcp=False, health=ALL_UP)
    assert fast is not None and slow is not None and fast.fast
    assert fast.wire == slow.wire
    shaped = responder_v6.shaped(data[2:], ALL_UP.generation)
    assert shaped is None or data[:2] + shaped[0] == fast.wire


@pytest.fixture(scope="module")
def responder_v6() -> Responder:
    """The demo world plus an IPv6 override, over MaxMind's City test database (its tree
    aliases ``::/96``, ``::ffff:0:0/96``, ``2001::/32`` and ``2002::/16`` to IPv4)."""
    data = base_config()
    data["geo"]["database"] = str(CITY_TEST_DB)
    data["geo"]["overrides"].append({"network": "2001:db8:77::/48", "pop": "gru"})
    config = parse_config(data)
    locator = GeoLocator(config.geo, config.pops[0].location)
    return Responder(Zone.build(config), locator)


def test_scopes_are_the_widest_range_with_one_answer(responder: Responder) -> None:
    """Two US networks (8.0.0.0/12 and 99.0.0.0/13 in the database) answer alike and their
    scopes are far wider than the database's networks when the neighbours answer alike."""

    def ask(subnet: str) -> dns.message.Message:
        network = ipaddress.ip_network(subnet)
        query = dns.message.make_query(
            "api.meridian.test",
            "A",
            use_edns=0,
            options=[dns.edns.ECSOption(str(network.network_address), network.prefixlen)],
        )
        reply = responder.respond(query.to_wire(), LOOPBACK, tcp=False, health=ALL_UP)
        assert reply is not None and reply.fast
        return dns.message.from_wire(reply.wire)

    answers = [ask(s) for s in ("8.8.8.0/24", "99.1.2.0/24")]
    assert answers[0].answer[0] == answers[1].answer[0]
    scopes = [
        next(o for o in m.options if isinstance(o, dns.edns.ECSOption)).scopelen for m in answers
    ]
    assert all(scope <= 13 for scope in scopes), scopes


OTHER_NAMES = [
    "nope.meridian.test",  # NXDOMAIN
    "x.api.meridian.test",  # below a geo name: NXDOMAIN
    "sub.meridian.test",  # empty non-terminal (deep.sub exists): NODATA
    "SUB.Meridian.TEST",
    "api.meridian.test",
    "deep.sub.meridian.test",
    "ns1.meridian.test",  # glue owner
    "NS1.meridian.TEST",
    "ns2.meridian.test",  # glue owner (odd zone: duplicate addresses)
    "ns3.deep.sub.meridian.test",  # glue owner with IPv6 only (odd zone)
    "meridian.test",  # apex
    "MeRiDiAn.TeSt",
    "meridian.test.example",  # outside: REFUSED
    "example.com",
    "test",
    ".",
    "a" * 63 + ".b" * 80 + ".meridian.test",  # 240 octets: with the SOA, over 512
]
#: Types an attacker or a fuzzer asks for: apex and meta types, zone transfers, unknown ones.
OTHER_TYPES = [1, 2, 6, 13, 15, 16, 28, 41, 43, 64, 65, 99, 128, 200, 249, 250, 251, 252, 255]


@st.composite
def other_queries(draw: st.DrawFn) -> bytes:
    """Fast-shaped questions that are not geo answers: every one has a pre-rendered body."""
    name = draw(st.sampled_from(OTHER_NAMES))
    rdtype = draw(st.one_of(st.sampled_from(OTHER_TYPES), st.integers(0, 65535)))
    rdclass = draw(st.sampled_from([1, 1, 1, 3, 4, 254, 255, 0, 2, 65535]))
    options: list[dns.edns.Option] = []
    if draw(st.booleans()):
        if draw(st.booleans()):
            address, bits = draw(st.sampled_from(V4_SUBNETS)), 32
        else:
            address, bits = draw(st.sampled_from(["2001:4860:4860::", "::"])), 128
        options.append(dns.edns.ECSOption(address, draw(st.integers(0, bits))))
    if draw(st.booleans()):
        query = dns.message.make_query(name, rdtype, rdclass, use_edns=False)
    else:
        query = dns.message.make_query(
            name,
            rdtype,
            rdclass,
            use_edns=0,
            payload=draw(st.integers(0, 4096)),
            options=options,
            want_dnssec=draw(st.booleans()),
        )
    query.id = draw(st.integers(0, 65535))
    if not draw(st.booleans()):
        query.flags &= ~dns.flags.RD
    return query.to_wire()


def _odd_config() -> Config:
    """A zone with the corner cases of static answers: a geo name at the apex and one that is
    also a glue owner, glue with duplicate addresses, glue with IPv6 only, a long NS list."""
    data = with_many_answers(base_config())
    data["dns"]["names"]["@"] = {"targets": "regions", "answers": 1}
    data["dns"]["names"]["ns1"] = {"targets": "pops", "answers": 2}
    data["dns"]["ns"] += [
        {"name": "ns2", "addresses": ["127.0.0.54", "127.0.0.54", "2001:db8::54"]},
        {"name": "ns3.deep.sub", "addresses": ["2001:db8::55"]},
        *({"name": f"ns{i}.elsewhere-{i}.example"} for i in range(4, 24)),
    ]
    return parse_config(data)


@pytest.fixture(scope="module", params=["plain", "odd"])
def static_responder(request: pytest.FixtureRequest, config: Config) -> Responder:
    chosen = config if request.param == "plain" else _odd_config()
    locator = GeoLocator(chosen.geo, chosen.pops[0].location)
    return Responder(Zone.build(chosen), locator)


@settings(
    max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=other_queries(), tcp=st.booleans())
def test_static_answers_fast_and_slow_are_byte_identical(
    static_responder: Responder, data: bytes, tcp: bool
) -> None:
    """REFUSED, NXDOMAIN, NODATA, apex SOA / NS / ANY, glue, HINFO: every fast-shaped question
    is answered from a pre-rendered body (never dnspython), byte for byte as the strict path
    renders it, for any type and class."""
    fast = static_responder.respond(data, LOOPBACK, tcp=tcp, health=ALL_UP)
    slow = static_responder.respond_slow(data, LOOPBACK, tcp=tcp, health=ALL_UP)
    assert fast is not None and slow is not None
    assert slow.error is None
    assert fast.wire == slow.wire
    info = (fast.qtype, fast.rcode, fast.truncated, fast.ecs, fast.targets)
    assert info == (slow.qtype, slow.rcode, slow.truncated, slow.ecs, slow.targets)
    assert fast.fast and not slow.fast
    again = static_responder.respond(data, LOOPBACK, tcp=tcp, health=ALL_UP)
    assert again is not None and again.wire == fast.wire


def test_quick_reply_is_shared_only_when_ecs_gave_a_subnet(responder: Responder) -> None:
    with_subnet = make_query("api.meridian.test", ecs="1.1.1.0/24").to_wire()
    source_zero = make_query("api.meridian.test", ecs="0.0.0.0/0").to_wire()
    no_ecs = make_query("api.meridian.test").to_wire()
    results = [
        responder.quick(q, LOOPBACK, False, ALL_UP) for q in (with_subnet, source_zero, no_ecs)
    ]
    assert [(r.shared, r.reusable) for r in results if r is not None] == [
        (True, True),
        (False, True),
        (False, True),
    ]
    # The apex SOA does not depend on the client: shared.
    soa = responder.quick(make_query("meridian.test", "SOA").to_wire(), LOOPBACK, False, ALL_UP)
    assert soa is not None and (soa.shared, soa.reusable) == (True, True)
    # Not the fast shape (an EDNS option other than ECS): the general path decides.
    cookie = dns.message.make_query(
        "api.meridian.test", "A", use_edns=0, options=[dns.edns.CookieOption(b"12345678", b"")]
    )
    assert responder.quick(cookie.to_wire(), LOOPBACK, False, ALL_UP) is None


@settings(
    max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=700))
def test_respond_never_raises_and_replies_parse(responder: Responder, data: bytes) -> None:
    reply = responder.respond(data, LOOPBACK, tcp=False, health=ALL_UP)
    if reply is None:
        return
    assert reply.error is None
    assert len(reply.wire) <= 1232
    assert reply.wire[:2] == data[:2]
    dns.message.from_wire(reply.wire)


def test_fast_path_case_and_id_are_the_querys(responder: Responder) -> None:
    for name, ident in (("api.meridian.test", 1), ("API.MERIDIAN.TEST", 2)):
        query = dns.message.make_query(name, "A", use_edns=0)
        query.id = ident
        reply = responder.respond(query.to_wire(), LOOPBACK, tcp=False, health=ALL_UP)
        assert reply is not None and reply.fast
        parsed = dns.message.from_wire(reply.wire)
        assert parsed.id == ident and parsed.question[0].name.to_text() == name + "."


def test_slip_reply_is_header_and_question_with_tc(responder: Responder) -> None:
    query = dns.message.make_query("api.meridian.test", "A", use_edns=0)
    reply = responder.respond(query.to_wire(), LOOPBACK, tcp=False, health=ALL_UP)
    assert reply is not None
    slipped = dns.message.from_wire(truncate_for_slip(reply.wire))
    assert slipped.flags & dns.flags.TC and not slipped.answer and slipped.edns == -1
    assert slipped.question == query.question


# ------------------------------------------------------------------------------- selection


def _client(
    lat: float,
    lon: float,
    country: str | None = None,
    continent: str | None = None,
    pop: str | None = None,
) -> ClientLocation:
    return ClientLocation(
        lat,
        lon,
        country,
        continent,
        None,
        ipaddress.ip_network("192.0.2.0/24"),
        "database",
        pop=pop,
    )


def _name(plain: Config, label: str):  # type: ignore[no-untyped-def]
    zone = Zone.build(plain)
    return next(g for g in zone.geo_names.values() if g.spec.name == label)


def test_nearest_healthy_first_then_next(plain: Config) -> None:
    api = _name(plain, "api")
    sao_paulo = _client(-23.5, -46.6)
    assert [t.name for t in select(plain, api, 4, sao_paulo, ALL_UP).chosen] == ["gru"]
    moved = select(plain, api, 4, sao_paulo, FakeHealth(frozenset({"gru"})))
    assert [t.name for t in moved.chosen] == ["iad"]
    assert "skipped nearer unhealthy gru" in moved.reason


def test_override_pin_comes_first(plain: Config) -> None:
    pinned = select(plain, _name(plain, "two"), 4, _client(-23.5, -46.6, pop="syd"), ALL_UP)
    assert [t.name for t in pinned.chosen] == ["syd", "gru"]


def test_residency_refuse_and_fallback(plain: Config) -> None:
    api = _name(plain, "api")
    berlin = _client(52.5, 13.4, "DE", "EU")
    fra_down = FakeHealth(frozenset({"fra"}))
    fallback = select(plain, api, 4, berlin, fra_down)
    assert fallback.outcome == "answer" and fallback.chosen[0].name != "fra"
    refuse_rule = dataclasses.replace(plain.residency[0], on_failure="refuse")
    strict = dataclasses.replace(plain, residency=(refuse_rule,))
    assert select(strict, api, 4, berlin, fra_down).outcome == "refused"
    assert [t.name for t in select(strict, api, 4, berlin, ALL_UP).chosen] == ["fra"]


@pytest.mark.parametrize(
    ("policy", "outcome", "count"),
    [("fail_open", "answer", 1), ("empty", "empty", 0), ("servfail", "servfail", 0)],
)
def test_all_down_policy(
    plain: Config, policy: Literal["fail_open", "empty", "servfail"], outcome: str, count: int
) -> None:
    every = frozenset(p.name for p in plain.pops)
    cfg = dataclasses.replace(plain, dns=dataclasses.replace(plain.dns, all_down=policy))
    result = select(cfg, _name(cfg, "api"), 4, _client(-23.5, -46.6), FakeHealth(every))
    assert result.outcome == outcome and len(result.chosen) == count


def test_ttl_shortened_as_a_transition_nears_with_a_floor(plain: Config) -> None:
    api = _name(plain, "api")
    sao_paulo = _client(-23.5, -46.6)
    assert select(plain, api, 4, sao_paulo, FakeHealth(hints={"pop:gru": 12.2})).ttl == 13
    assert select(plain, api, 4, sao_paulo, FakeHealth(hints={"pop:gru": 0.5})).ttl == 5
    # A far POP's transition cannot change this answer: no shortening.
    assert select(plain, api, 4, sao_paulo, FakeHealth(hints={"pop:syd": 1.0})).ttl == 30


def test_shortened_ttl_is_not_memoized(plain: Config) -> None:
    locator = GeoLocator(plain.geo, plain.pops[0].location)
    responder = Responder(Zone.build(plain), locator)
    query = dns.message.make_query("api.meridian.test", "A").to_wire()
    pending = FakeHealth(hints={"pop:iad": 9.0})
    first = responder.respond(query, LOOPBACK, tcp=False, health=pending)
    stable = responder.respond(query, LOOPBACK, tcp=False, health=ALL_UP)
    assert first is not None and stable is not None
    assert dns.message.from_wire(first.wire).answer[0].ttl == 9
    assert dns.message.from_wire(stable.wire).answer[0].ttl == 30


@dataclass
class Ticking:
    """A pending transition whose deadline nears as the test advances ``now``."""

    deadline: float
    now: float = 0.0
    generation: int = 7

    def pop_up(self, name: str) -> bool:
        return True

    def pop_serves(self, pop: str, service: str) -> bool:
        return True

    def region_up(self, name: str) -> bool:
        return True

    def ttl_hint(self, target: str) -> float | None:
        return self.deadline - self.now if target == "pop:iad" else None


def test_ttl_bound_by_a_pending_transition_follows_the_clock(plain: Config) -> None:
    locator = GeoLocator(plain.geo, plain.pops[0].location)
    responder = Responder(Zone.build(plain), locator)
    query = dns.message.make_query("api.meridian.test", "A").to_wire()
    health = Ticking(deadline=40.0)
    ttls = []
    for now in (0.0, 15.0, 28.5, 39.0):
        health.now = now
        fast = responder.respond(query, LOOPBACK, tcp=False, health=health)
        slow = responder.respond_slow(query, LOOPBACK, tcp=False, health=health)
        assert fast is not None and slow is not None
        assert fast.fast and fast.wire == slow.wire
        assert not fast.reusable  # never memoized as bytes
        ttls.append(dns.message.from_wire(fast.wire).answer[0].ttl)
    # 40 s away: not shortened yet (30), then 25, 12 (ceil 11.5), then the 5 s floor.
    assert ttls == [30, 25, 12, 5]


def test_a_compilation_lagging_the_health_answers_strictly_or_with_the_floor_ttl(
    plain: Config,
) -> None:
    """A server compiles off the hot path and answers from the previous compilation meanwhile.
    While no candidate's up/down verdict changed, the compiled choice is the strict one: the
    strict answer, TTL included (a first failed check shortens it at once).  When one changed,
    the choice may be about to change: the floor TTL.  (Before: the full 30 s went out until
    the recompile landed - for a region just gone down, its answer with 30 s, which resolvers
    then held past the failover bound.)"""
    locator = GeoLocator(plain.geo, plain.pops[0].location)
    responder = Responder(Zone.build(plain), locator, compile_inline=False)
    stable = FakeHealth(generation=1)
    responder.install(responder.compile(stable))
    failing = FakeHealth(hints={"pop:iad": 9.0}, generation=2)  # first failed check of iad
    down = FakeHealth(frozenset({"iad"}), generation=3)  # iad down: no hint left
    for ecs in (None, "198.51.100.0/24"):
        query = make_query("api.meridian.test", "A", ecs=ecs).to_wire()

        def answer(health: FakeHealth, query: bytes = query) -> tuple[int, str]:
            reply = responder.respond(query, LOOPBACK, tcp=False, health=health)
            assert reply is not None and responder.compiled is not None
            lagging = responder.compiled.health is not health
            assert not (reply.reusable and lagging)  # never memoised while lagging
            rrset = dns.message.from_wire(reply.wire).answer[0]
            return int(rrset.ttl), str(rrset[0])

        ttl, iad = answer(stable)
        assert ttl == 30
        assert answer(failing) == (9, iad)  # no recompile yet: still the strict answer
        fast = responder.respond(query, LOOPBACK, tcp=False, health=failing)
        slow = responder.respond_slow(query, LOOPBACK, tcp=False, health=failing)
        assert fast is not None and slow is not None and fast.wire == slow.wire
        assert answer(down) == (5, iad)  # the old choice, told to be asked again soon
        responder.install(responder.compile(down))
        ttl, elsewhere = answer(down)
        assert ttl == 30 and elsewhere != iad
        responder.install(responder.compile(stable))


# ------------------------------------------------------------------------- rate limiting


def test_rate_limiter_bucket_slip_and_prefixes() -> None:
    limiter = ResponseRateLimiter(RateLimitConfig(responses_per_second=3, slip=2))
    client = ipaddress.ip_address("198.51.100.7")
    neighbour = ipaddress.ip_address("198.51.100.200")  # same /24
    other = ipaddress.ip_address("198.51.101.1")
    verdicts = [
        limiter.check(c, 100.0) for c in (client, neighbour, client, client, client, client, client)
    ]
    assert verdicts == [Verdict.SEND] * 3 + [Verdict.DROP, Verdict.SLIP, Verdict.DROP, Verdict.SLIP]
    assert limiter.check(other, 100.0) is Verdict.SEND
    assert limiter.check(client, 100.34) is Verdict.SEND  # one token refilled after 1/3 s
    v6 = ResponseRateLimiter(RateLimitConfig(responses_per_second=1, slip=0))
    a, b = ipaddress.ip_address("2001:db8:0:ff::1"), ipaddress.ip_address("2001:db8:0:1::1")
    assert [v6.check(a, 0.0), v6.check(b, 0.0)] == [Verdict.SEND, Verdict.DROP]  # same /56
    disabled = ResponseRateLimiter(RateLimitConfig(enabled=False, responses_per_second=1))
    assert all(disabled.check(client, 0.0) is Verdict.SEND for _ in range(10))


@pytest.mark.parametrize("policy", ["empty", "servfail", "fail_open"])
@pytest.mark.parametrize("rdtype", ["ANY", "A", "AAAA"])
def test_geo_answers_with_every_target_down_fast_and_slow_agree(
    plain: Config, policy: Literal["fail_open", "empty", "servfail"], rdtype: str
) -> None:
    """With nothing to answer, ANY gets the RFC 8482 HINFO (A and AAAA a NODATA SOA); SERVFAIL
    and REFUSED outcomes carry no AA, whichever path renders them."""
    cfg = dataclasses.replace(plain, dns=dataclasses.replace(plain.dns, all_down=policy))
    locator = GeoLocator(cfg.geo, cfg.pops[0].location)
    responder = Responder(Zone.build(cfg), locator)
    every = FakeHealth(frozenset(p.name for p in cfg.pops) | {r.name for r in cfg.regions})
    for name in ("api", "origin", "two"):
        data = make_query(f"{name}.meridian.test", rdtype, ecs="200.160.2.0/24").to_wire()
        fast = responder.respond(data, LOOPBACK, tcp=False, health=every)
        slow = responder.respond_slow(data, LOOPBACK, tcp=False, health=every)
        assert fast is not None and slow is not None and fast.fast
        assert fast.wire == slow.wire, (name, rdtype, policy)
        parsed = dns.message.from_wire(fast.wire)
        if policy == "empty" and rdtype == "ANY":
            assert parsed.answer[0].rdtype == dns.rdatatype.HINFO


@settings(
    max_examples=800, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    labels=st.lists(
        st.sampled_from(["x", "ns1", "NS1", "hostmaster", "abc", "api", "sub", "y" * 9]),
        min_size=1,
        max_size=4,
    ),
    rdtype=st.sampled_from(["A", "AAAA", "MX", "ANY", "TXT"]),
)
def test_nxdomain_bodies_shared_by_length_match_the_slow_path(
    responder: Responder, labels: list[str], rdtype: str
) -> None:
    """NXDOMAIN bodies are shared by names of one length (their SOA points at the origin in
    the question) except for names ending in the SOA's MNAME or RNAME, which compress against
    themselves: whichever name of a length comes first, every reply equals the slow path's."""
    name = ".".join(labels) + ".meridian.test"
    data = make_query(name, rdtype).to_wire()
    fast = responder.respond(data, LOOPBACK, tcp=False, health=ALL_UP)
    slow = responder.respond_slow(data, LOOPBACK, tcp=False, health=ALL_UP)
    assert fast is not None and slow is not None and fast.fast
    assert fast.wire == slow.wire, name


def test_a_resolver_never_seen_before_is_answered_from_the_compiled_ranges_as_the_slow_path(
    responder_v6: Responder,
) -> None:
    """No ECS, a sender never seen before: :meth:`Responder.plain` (one range lookup on the
    sender, the reply :meth:`Responder.quick` rendered for an earlier sender with the same
    answer) gives the strict path's bytes, for IPv4 and IPv6 senders, with and without EDNS,
    for every query type the fast path takes; and it answers nearly all of them."""
    rng = random.Random(19)
    queries = []
    for rdtype in ("A", "AAAA", "ANY"):
        for use_edns in (False, 0):
            query = dns.message.make_query("api.meridian.test", rdtype, use_edns=use_edns)
            query.flags &= ~dns.flags.RD
            queries.append(query.to_wire())

    def sender(n: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        if n % 4:
            return ipaddress.IPv4Address(rng.randrange(1 << 24, 224 << 24))
        return ipaddress.IPv6Address(rng.randrange(1 << 128))

    for n in range(600):  # earlier senders: the replies are rendered once per answer
        responder_v6.respond(rng.choice(queries), sender(n), tcp=False, health=ALL_UP)
    answered = 0
    for n in range(600):
        data, source = rng.choice(queries), sender(n)
        address = int(source)
        plain = responder_v6.plain(data[2:], source.version == 4, address, ALL_UP.generation)
        slow = responder_v6.respond_slow(data, source, tcp=False, health=ALL_UP)
        assert slow is not None
        if plain is not None:
            answered += 1
            assert data[:2] + plain[0] == slow.wire, (source, data)
    assert answered >= 550
