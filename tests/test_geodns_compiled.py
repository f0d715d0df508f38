"""Compiled answers: the ECS scope is the widest prefix around the client whose every address
gets the same answer, checked against the locator and selection (not the compiled tables),
for IPv4 and IPv6, on the shipped database and MaxMind's City test database."""

from __future__ import annotations

import bisect
import ipaddress
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.message
import pytest

from geodns.compiled import block_index, widest_scope, widest_scope_plain
from geodns.responder import Responder
from geodns.selection import select
from geodns.zone import GeoName, Zone
from meridian.config import Config, parse_config
from meridian.geo import GeoLocator
from tests.dns_support import CITY_TEST_DB, base_config
from tests.test_dns_core import ALL_UP, FakeHealth

LOOPBACK = ipaddress.ip_address("127.0.0.1")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Networks walked per check before the check samples instead (a /1 of one answer may hold
#: thousands of database networks).
WALK_LIMIT = 4000


def _world(database: str) -> tuple[Config, Responder]:
    data = base_config()
    data["geo"]["database"] = database
    data["geo"]["overrides"].append({"network": "2001:db8:77::/48", "pop": "gru"})
    config = parse_config(data)
    locator = GeoLocator(config.geo, config.pops[0].location)
    return config, Responder(Zone.build(config), locator)


@pytest.fixture(scope="module", params=["builtin", "city-test"])
def world(request: pytest.FixtureRequest) -> tuple[Config, Responder]:
    return _world("builtin" if request.param == "builtin" else str(CITY_TEST_DB))


def _geo(config: Config, label: str) -> GeoName:
    return next(g for g in Zone.build(config).geo_names.values() if g.spec.name == label)


def _answer(
    config: Config, responder: Responder, geo: GeoName, family: int, address: int, version: int
) -> tuple[tuple[object, ...], IPNetwork]:
    """What selection answers a client at ``address`` (from the locator, as the strict path
    does), and the network the locator says that holds for."""
    ip = ipaddress.IPv4Address(address) if version == 4 else ipaddress.IPv6Address(address)
    location = responder.locate(ip)
    selection = select(config, geo, family, location, ALL_UP)
    what = (selection.outcome, selection.addresses(family), selection.ttl)
    network = location.network
    if network.version != version:  # an IPv4-mapped address, located as IPv4
        mapped = int(ipaddress.IPv6Address(f"::ffff:{network.network_address}"))
        network = ipaddress.IPv6Network((mapped, 96 + network.prefixlen))
    return what, network


def _networks(
    config: Config, responder: Responder, geo: GeoName, family: int, block: IPNetwork
) -> Iterator[tuple[object, ...]]:
    """The answers over ``block``, one per located network (every address is covered)."""
    address = int(block.network_address)
    last = int(block.broadcast_address)
    for _ in range(WALK_LIMIT):
        what, network = _answer(config, responder, geo, family, address, block.version)
        yield what
        address = int(network.broadcast_address) + 1
        if address > last:
            return
    raise _TooMany


class _TooMany(Exception):
    pass


def _scope_of(responder: Responder, name: str, rdtype: str, subnet: IPNetwork) -> int:
    query = dns.message.make_query(
        name,
        rdtype,
        use_edns=0,
        options=[dns.edns.ECSOption(str(subnet.network_address), subnet.prefixlen)],
    )
    reply = responder.respond(query.to_wire(), LOOPBACK, tcp=False, health=ALL_UP)
    assert reply is not None and reply.fast
    slow = responder.respond_slow(query.to_wire(), LOOPBACK, tcp=False, health=ALL_UP)
    assert slow is not None and slow.wire == reply.wire
    option = next(
        o for o in dns.message.from_wire(reply.wire).options if isinstance(o, dns.edns.ECSOption)
    )
    return int(option.scopelen)


def _subnets(seed: int, count: int) -> list[IPNetwork]:
    rng = random.Random(seed)
    interesting_v4 = [0x51024500, 0xC8A00200, 0x08080800, 0x0A010000, 0x0A020000, 0x59A01400]
    interesting_v6 = [
        int(ipaddress.IPv6Address(a))
        for a in ("2001:4860:4860::", "2a02:d180::", "2001:db8:77::", "2002:5102:45a0::", "::")
    ]
    subnets: list[IPNetwork] = []
    for i in range(count):
        if i % 2:
            base = rng.choice(interesting_v4) if rng.random() < 0.5 else rng.getrandbits(32)
            base ^= rng.getrandbits(12)
            prefix = rng.choice([8, 16, 20, 24, 24, 24, 28, 32])
            subnets.append(ipaddress.IPv4Network((base, prefix), strict=False))
        else:
            if rng.random() < 0.5:
                base = rng.choice(interesting_v6) ^ (rng.getrandbits(20) << 80)
            elif rng.random() < 0.5:  # IPv4-mapped
                base = int(
                    ipaddress.IPv6Address(f"::ffff:{ipaddress.IPv4Address(rng.getrandbits(32))}")
                )
            else:
                base = rng.getrandbits(128)
            prefix = rng.choice([32, 48, 56, 64, 104, 120])
            subnets.append(ipaddress.IPv6Network((base, prefix), strict=False))
    return subnets


@pytest.mark.parametrize("label", ["api", "origin", "two"])
def test_scope_is_the_widest_prefix_with_one_answer(
    world: tuple[Config, Responder], label: str
) -> None:
    """For sampled client subnets: every address inside the returned scope gets the answer the
    client got (walked network by network through the locator), and the network one bit wider
    holds an address that does not - so no narrower scope was returned than the data allow."""
    config, responder = world
    geo = _geo(config, label)
    checked = 0
    for subnet in _subnets(hash(label) & 0xFFFF, 40):
        bits = subnet.max_prefixlen
        scope = _scope_of(responder, geo.fqdn, "A", subnet)
        address = int(subnet.network_address)
        expected, _ = _answer(config, responder, geo, 4, address, subnet.version)
        block = ipaddress.ip_network((address >> (bits - scope) << (bits - scope), scope))
        try:
            assert all(what == expected for what in _networks(config, responder, geo, 4, block)), (
                subnet,
                scope,
            )
            if scope:
                wider = block.supernet()
                differs = any(
                    what != expected for what in _networks(config, responder, geo, 4, wider)
                )
                assert differs, (subnet, scope, "a wider scope holds one answer")
            checked += 1
        except _TooMany:
            continue
    assert checked >= 20


def test_a_health_change_relabels_only_what_it_changes() -> None:
    """gru down: Brazil gets iad, fast and strict paths agree on bytes and scope, and the
    regions' table (no POP in it) is the very same arrays as before."""
    _, responder = _world("builtin")
    origin = b"\x06origin\x08meridian\x04test\x00"
    address = int(ipaddress.IPv4Address("200.160.2.0"))
    _scope_of(responder, "api.meridian.test", "A", ipaddress.IPv4Network("200.160.2.0/24"))
    responder.answer_range(origin, 4, 1, address, ALL_UP)
    before = responder.compiled
    assert before is not None
    down = FakeHealth(frozenset({"gru"}), generation=2)
    query = dns.message.make_query(
        "api.meridian.test", "A", use_edns=0, options=[dns.edns.ECSOption("200.160.2.0", 24)]
    )
    fast = responder.respond(query.to_wire(), LOOPBACK, tcp=False, health=down)
    slow = responder.respond_slow(query.to_wire(), LOOPBACK, tcp=False, health=down)
    assert fast is not None and slow is not None and fast.wire == slow.wire
    assert fast.targets == ("iad",)
    responder.answer_range(origin, 4, 1, address, down)
    after = responder.compiled
    assert after is not None and after is not before
    number = responder._names[origin][0]
    assert after.tables[number][4].v4_starts is before.tables[number][4].v4_starts


@pytest.mark.parametrize("bits", [32, 128])
def test_widest_scope_bit_trick_equals_the_plain_loop(bits: int) -> None:
    rng = random.Random(bits)
    for _ in range(3000):
        a, b = sorted(rng.getrandbits(bits) >> rng.randrange(bits) for _ in range(2))
        address = rng.randint(a, b)
        following = b + 1
        assert widest_scope(address, a, following, bits) == widest_scope_plain(address, a, b, bits)


def _block_index_plain(starts: list[int]) -> list[int]:
    """The definition: for each /16 (and one past the end), the range holding its first
    address."""
    return [bisect.bisect_right(starts, block << 16) - 1 for block in range(65537)]


@pytest.mark.parametrize("ranges", [1, 2, 50, 3000, 70_000])
def test_block_index_is_the_range_holding_each_16s_first_address(ranges: int) -> None:
    rng = random.Random(ranges)
    starts = sorted({0, *(rng.getrandbits(32) for _ in range(ranges - 1))})
    if ranges > 2:  # ranges starting exactly on a /16 boundary, and a /16 split in several
        starts = sorted({*starts, 5 << 16, 6 << 16, (6 << 16) + 9, (6 << 16) + 99})
    assert list(block_index(starts)) == _block_index_plain(starts)


@pytest.mark.parametrize("database", ["builtin", "city-test"])
def test_every_compiled_table_carries_its_block_index(database: str) -> None:
    """The /16 index is made with the table, in the compilation (off the hot path: a first
    query after a health change once paid ~15 ms for it, which rate limiting then charged to
    the client's network)."""
    _, responder = _world(database if database == "builtin" else str(CITY_TEST_DB))
    tables = [t for by_family in responder.compile(ALL_UP).tables for t in by_family.values()]
    assert tables
    for table in tables:
        assert list(table.v4_blocks) == _block_index_plain(list(table.v4_starts))


#: The start of a probe run in a fresh process: the demo config loaded, and ``rss()`` in MiB.
RSS_PROBE_PRELUDE = """
import gc
from geodns.server import _compile_and_trim, build_serving
from meridian.config import load_config
from meridian.lifecycle import trim_heap
from tests.test_dns_core import ALL_UP

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024

config = load_config("config/demo.yaml")
"""


def run_rss_probe(source: str) -> tuple[int, int]:
    """The two RSS figures (MiB) a probe printed, run in a fresh process from the repository's
    root; skipped where the C library has no ``malloc_trim`` (freed memory stays in the heap,
    and RSS says nothing of what was freed)."""
    out = subprocess.run(
        [sys.executable, "-c", source],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    if out[2] != "True":
        pytest.skip("this C library has no malloc_trim")
    return int(out[0]), int(out[1])


_TRIM_PROBE = (
    RSS_PROBE_PRELUDE
    + """
serving = build_serving(config, 1, config.pops[0].name)
gc.collect()
built = rss()
serving.responder.install(_compile_and_trim(serving.responder, ALL_UP))
gc.collect()
print(built, rss(), trim_heap())
"""
)


def test_the_address_maps_build_gives_its_freed_memory_back() -> None:
    """Walking the shipped database into the address map frees temporaries that glibc would
    keep (RSS 187-204 MiB after the build, 141 MiB after ``trim_heap``; before the IPv6 starts
    were settled into fresh arenas, ``compiled.settled``, 220 -> 139 MiB of a larger heap):
    the server trims after every build and compilation.  In a fresh process, to see RSS
    alone; the RSS that is left is bounded by ``tests/test_geodns_memory.py``."""
    built, trimmed = run_rss_probe(_TRIM_PROBE)
    assert trimmed <= built - 25, (built, trimmed)
