"""Geo lookups against MaxMind's synthetic test databases and the shipped database."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import maxminddb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meridian.config import GeoConfig, GeoOverride, Location
from meridian.geo import GeoError, GeoLocator, builtin_database, distance_km, nearest_first

DATA = Path(__file__).parent / "data"
ASHBURN = Location(39.04, -77.49, "US", "NA")


@pytest.fixture(scope="module")
def shipped() -> GeoLocator:
    return GeoLocator(GeoConfig(), ASHBURN)


@pytest.mark.parametrize(
    ("ip", "country", "continent", "network"),
    [
        ("8.8.8.8", "US", "NA", "8.0.0.0/12"),
        ("200.160.2.3", "BR", "SA", "200.160.0.0/15"),
        ("80.80.80.80", "NL", "EU", "80.80.80.0/23"),
        ("77.88.8.8", "RU", "EU", None),
        ("1.1.1.1", "AU", "OC", "1.1.1.0/24"),
        ("2001:4860:4860::8888", "US", "NA", "2001:4860::/32"),
        ("::ffff:8.8.8.8", "US", "NA", "8.0.0.0/12"),
    ],
)
def test_shipped_database_known_answers(
    shipped: GeoLocator, ip: str, country: str, continent: str, network: str | None
) -> None:
    result = shipped.locate(ip)
    assert result.source == "database"
    assert (result.country, result.continent) == (country, continent)
    if network:
        assert str(result.network) == network


@pytest.mark.parametrize("ip", ["203.0.113.5", "192.168.1.1", "127.0.0.1", "::1"])
def test_not_found_uses_the_default_location(shipped: GeoLocator, ip: str) -> None:
    result = shipped.locate(ip)
    assert not result.found
    assert result.source == "default"
    assert (result.lat, result.lon) == (ASHBURN.lat, ASHBURN.lon)
    assert ipaddress.ip_address(ip) in result.network


@pytest.mark.parametrize(
    ("db", "ip", "country", "lat", "lon"),
    [
        ("GeoIP2-City-Test.mmdb", "81.2.69.160", "GB", 51.5142, -0.0931),
        ("GeoIP2-City-Test.mmdb", "89.160.20.128", "SE", 58.4167, 15.6167),
        ("GeoIP2-City-Test.mmdb", "216.160.83.56", "US", 47.2513, -122.3149),
        ("GeoIP2-City-Test.mmdb", "2001:218::1", "JP", 35.68536, 139.75309),
    ],
)
def test_maxmind_city_test_database(db: str, ip: str, country: str, lat: float, lon: float) -> None:
    locator = GeoLocator(GeoConfig(database=str(DATA / db)), ASHBURN)
    result = locator.locate(ip)
    assert result.country == country
    assert (result.lat, result.lon) == pytest.approx((lat, lon))


def test_country_database_places_clients_at_the_country_centroid() -> None:
    locator = GeoLocator(GeoConfig(database=str(DATA / "GeoLite2-Country-Test.mmdb")), ASHBURN)
    result = locator.locate("81.2.69.160")
    assert result.country == "GB" and result.continent == "EU"
    # Population centroid of the United Kingdom (England's Midlands), not London.
    assert distance_km(result.lat, result.lon, 52.5, -1.5) < 100


def test_wrong_or_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GeoError, match="cannot open"):
        GeoLocator(GeoConfig(database=str(tmp_path / "nope.mmdb")), ASHBURN)
    bogus = tmp_path / "bogus.mmdb"
    bogus.write_bytes(b"not a database")
    with pytest.raises(GeoError, match="cannot open"):
        GeoLocator(GeoConfig(database=str(bogus)), ASHBURN)


def test_overrides_win_and_narrow_the_network(shipped: GeoLocator) -> None:
    paris = Location(48.86, 2.35, "FR", "EU")
    config = GeoConfig(
        overrides=(
            GeoOverride(network=ipaddress.ip_network("8.8.8.0/28"), location=paris),
            GeoOverride(network=ipaddress.ip_network("200.160.0.0/16"), region="us-east"),
        )
    )
    locator = GeoLocator(config, ASHBURN)
    inside = locator.locate("8.8.8.5")
    assert inside.source == "override" and inside.country == "FR"
    assert str(inside.network) == "8.8.8.0/28"
    # Same /24 as the override but outside it: the database answer, with a scope that cannot
    # cover the override's addresses.
    outside = locator.locate("8.8.8.200")
    assert outside.country == "US"
    assert not outside.network.overlaps(ipaddress.ip_network("8.8.8.0/28"))
    pinned = locator.locate("200.160.2.3")
    assert pinned.region == "us-east" and pinned.source == "override"
    # A repeat is served from the prefix cache with the same answer.
    assert locator.locate("8.8.8.200") == outside
    assert locator.locate("8.8.8.5") == inside


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_cache_never_changes_an_answer(n: int) -> None:
    cached = _CACHED
    fresh = GeoLocator(GeoConfig(cache_size=16), ASHBURN)
    ip = ipaddress.IPv4Address(n)
    first = cached.locate(ip)
    assert first == cached.locate(ip)
    assert first == fresh.locate(ip)
    assert ip in first.network
    fresh.close()


_CACHED = GeoLocator(GeoConfig(cache_size=64), ASHBURN)


# ------------------------------------------------------------------- integer IPv4 lookups

DATABASES = [
    builtin_database(),
    DATA / "GeoIP2-City-Test.mmdb",
    DATA / "GeoIP2-Country-Test.mmdb",
    DATA / "GeoLite2-Country-Test.mmdb",
]
#: Addresses the test databases hold (their networks are small: random ints mostly miss).
_NEAR = [0, 0x51024500, 0x59A01400, 0xD8A05300, 0x027DA000, 0x432B9C00, 0xAF10C700, 0x08080800]


def _near_addresses() -> st.SearchStrategy[int]:
    return st.builds(
        lambda base, offset: (base + offset) % 2**32 if base else offset,
        st.sampled_from(_NEAR),
        st.integers(0, 2**32 - 1) | st.integers(0, 0xFFFF),
    )


_OPEN = {path: GeoLocator(GeoConfig(database=str(path)), ASHBURN) for path in DATABASES}
_READERS = {path: maxminddb.open_database(str(path)) for path in DATABASES}


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(DATABASES), _near_addresses())
def test_tree_walk_gives_the_readers_network_and_record(path: Path, value: int) -> None:
    """The in-place search tree walk (directory + per-bit walk) ends where libmaxminddb's does:
    same prefix length, and the placement of the record the reader decodes."""
    locator = _OPEN[path]
    placement, prefix_len = locator.locate_v4(value)
    record, reader_prefix = _READERS[path].get_with_prefix_len(ipaddress.IPv4Address(value))
    assert prefix_len == reader_prefix
    expected = locator.locate(ipaddress.IPv4Address(value))
    assert placement.at(expected.network) == expected
    if record is None:
        assert placement.source == "default"


_PARIS = Location(48.86, 2.35, "FR", "EU")
_OVERRIDDEN_CONFIG = GeoConfig(
    overrides=(
        GeoOverride(network=ipaddress.ip_network("8.8.8.0/28"), location=_PARIS),
        GeoOverride(network=ipaddress.ip_network("200.160.0.0/16"), region="us-east"),
        GeoOverride(network=ipaddress.ip_network("200.160.4.0/24"), pop="gru"),
        GeoOverride(network=ipaddress.ip_network("81.2.69.128/25"), pop="fra"),
        GeoOverride(network=ipaddress.ip_network("2001:db8::/32"), pop="iad"),
    )
)
_OVERRIDDEN = GeoLocator(_OVERRIDDEN_CONFIG, ASHBURN)


@settings(max_examples=1500, deadline=None)
@given(
    st.builds(
        lambda base, offset: (base + offset) % 2**32 if base else offset,
        st.sampled_from([0, 0x08080800, 0xC8A00000, 0x51024500, 0x08000000]),
        st.integers(0, 0x3FFFF) | st.integers(0, 2**32 - 1),
    )
)
def test_integer_lookup_answers_as_locate(value: int) -> None:
    """``locate_v4`` is ``locate`` without objects: overrides (nested ones too) win, and a
    database network that holds an override is narrowed exactly as ``locate`` narrows it."""
    for locator in (_OVERRIDDEN, _OVERRIDDEN_SMALL_CACHE):
        placement, prefix_len = locator.locate_v4(value)
        expected = locator.locate(ipaddress.IPv4Address(value))
        assert expected.network.prefixlen == prefix_len
        assert ipaddress.IPv4Address(value) in expected.network
        assert placement.at(expected.network) == expected


_OVERRIDDEN_SMALL_CACHE = GeoLocator(
    dataclasses.replace(_OVERRIDDEN_CONFIG, cache_size=16), ASHBURN
)


def test_integer_lookup_of_overrides_and_unknown_addresses() -> None:
    pinned, prefix_len = _OVERRIDDEN.locate_v4(int(ipaddress.IPv4Address("200.160.4.9")))
    assert (pinned.pop, pinned.source, prefix_len) == ("gru", "override", 24)
    wider, prefix_len = _OVERRIDDEN.locate_v4(int(ipaddress.IPv4Address("200.160.9.9")))
    assert (wider.region, prefix_len) == ("us-east", 16)
    # Beside the /28 override, in its /24: never a scope that covers the override.
    beside, prefix_len = _OVERRIDDEN.locate_v4(int(ipaddress.IPv4Address("8.8.8.200")))
    assert (beside.country, beside.source, prefix_len) == ("US", "database", 32)
    # Elsewhere in the database's 8.0.0.0/12, which holds the override: narrowed to a /24.
    elsewhere, prefix_len = _OVERRIDDEN.locate_v4(int(ipaddress.IPv4Address("8.9.1.1")))
    assert (elsewhere.country, prefix_len) == ("US", 24)
    private, prefix_len = _OVERRIDDEN.locate_v4(int(ipaddress.IPv4Address("192.168.1.1")))
    assert private.source == "default" and (private.lat, private.lon) == (39.04, -77.49)
    assert ipaddress.IPv4Address("192.168.1.1") in ipaddress.ip_network(
        f"192.168.1.1/{prefix_len}", strict=False
    )


def test_placements_are_shared_by_networks_with_the_same_record(shipped: GeoLocator) -> None:
    """One placement per distinct answer: a cold lookup allocates nothing new, and the DNS
    fast path can key its answers by placement identity."""
    first, first_len = shipped.locate_v4(int(ipaddress.IPv4Address("8.8.8.8")))
    other, other_len = shipped.locate_v4(int(ipaddress.IPv4Address("99.1.2.3")))
    assert first.country == other.country == "US"
    assert first is other  # two networks of the same record (US, country level)
    assert ipaddress.ip_network(f"8.8.8.8/{first_len}", strict=False) != ipaddress.ip_network(
        f"99.1.2.3/{other_len}", strict=False
    )
    seen = {
        id(shipped.locate_v4(value)[0])
        for value in range(0x01000000, 0xE0000000, 0x00010100)  # ~57,000 spread addresses
    }
    assert len(seen) < 300  # the shipped database has about 160 distinct answers


def test_distance_and_ordering() -> None:
    assert distance_km(0, 0, 0, 0) == 0
    london, new_york = (51.5074, -0.1278), (40.7128, -74.0060)
    assert distance_km(*london, *new_york) == pytest.approx(5570, rel=0.01)
    assert distance_km(0, 0, 0, 180) == pytest.approx(20015, rel=0.001)
    pops = {
        "iad": Location(39.04, -77.49),
        "fra": Location(50.11, 8.68),
        "sin": Location(1.35, 103.82),
        "gru": Location(-23.55, -46.63),
        "syd": Location(-33.87, 151.21),
    }
    order = nearest_first(-17.47, -45.82, pops, where=pops.__getitem__)  # a Brazilian client
    assert [name for name, _ in order] == ["gru", "iad", "fra", "syd", "sin"]
    assert [d for _, d in order] == sorted(d for _, d in order)
    london_order = nearest_first(*london, pops, where=pops.__getitem__)
    assert london_order[0][0] == "fra"


@given(st.floats(-90, 90), st.floats(-180, 180), st.floats(-90, 90), st.floats(-180, 180))
def test_distance_is_a_symmetric_bounded_metric(a: float, b: float, c: float, d: float) -> None:
    there = distance_km(a, b, c, d)
    assert there == pytest.approx(distance_km(c, d, a, b), abs=1e-6)
    assert 0 <= there <= 20016
