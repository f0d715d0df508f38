"""GeoDNS's memory: :func:`geodns.compiled.settled` remakes the address map's IPv6 range starts
as the same values (one object per value, shared as before), and the compiled world of the
compare benchmark (demo.yaml, the shipped database) stays well under what it held when those
integers were left scattered among the build's freed temporaries."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geodns.compiled import AddressMap, _halves, _joined, build_address_map, settled
from geodns.zone import Zone
from meridian.config import parse_config
from meridian.geo import GeoLocator
from tests.dns_support import CITY_TEST_DB, base_config
from tests.test_geodns_compiled import RSS_PROBE_PRELUDE, run_rss_probe

_V6 = st.one_of(
    st.integers(0, (1 << 128) - 1),
    st.sampled_from([0, 1, (1 << 64) - 1, 1 << 64, (1 << 128) - 1, 0xFFFF << 32]),
)


@given(st.lists(_V6, max_size=200), st.lists(_V6, max_size=200))
def test_halves_join_back_to_the_same_values_one_object_per_value(
    first: list[int], second: list[int]
) -> None:
    canonical: dict[int, int] = {}
    one, two = _joined(_halves(first), canonical), _joined(_halves(second), canonical)
    assert one == first and two == second
    by_value = {id(v): v for v in one + two}
    assert len(by_value) == len(set(one + two))


def _built(database: str) -> AddressMap:
    data = base_config()
    data["geo"]["database"] = database
    data["geo"]["overrides"].append({"network": "2001:db8:77::/48", "pop": "gru"})
    config = parse_config(data)
    locator = GeoLocator(config.geo, config.pops[0].location)
    names = list(Zone.build(config).geo_names.values())
    return build_address_map(locator, locator.tree_ranges(), config, names)


@pytest.mark.parametrize("database", ["builtin", str(CITY_TEST_DB)])
def test_a_settled_map_is_the_built_map(database: str) -> None:
    """Every field equal; the IPv6 starts the same values, lists and tuple as before, each
    value one object across the groups and the country map (as the build shares them)."""
    built = _built(database)
    expected = {key: list(group.v6_starts) for key, group in built.groups.items()}
    expected_countries = built.countries
    result = settled(built)  # (built stays referenced: equal, but nothing is saved)
    assert result.groups.keys() == built.groups.keys()
    for key, group in result.groups.items():
        old = built.groups[key]
        assert type(group.v6_starts) is list and group.v6_starts == expected[key]
        for field in ("targets", "v4_signatures", "v6_signatures", "representatives"):
            assert getattr(group, field) == getattr(old, field)
        assert group.v4_starts == old.v4_starts and group.signatures == old.signatures
    countries = result.countries
    assert type(countries.v6_starts) is tuple
    assert countries.v6_starts == expected_countries.v6_starts
    for field in ("names", "v4_starts", "v4_numbers", "v6_numbers", "v6_embedded", "v4_blocks"):
        assert getattr(countries, field) == getattr(expected_countries, field)
    assert (result.leaves, result.placements) == (built.leaves, built.placements)
    everything = [v for g in result.groups.values() for v in g.v6_starts]
    everything += countries.v6_starts
    assert len({id(v) for v in everything}) == len(set(everything))


_RSS_PROBE = (
    RSS_PROBE_PRELUDE
    + """
gc.collect()
before = rss()
serving = build_serving(config, 1, "iad")
serving.responder.install(_compile_and_trim(serving.responder, ALL_UP))
gc.collect()
print(before, rss(), trim_heap())
"""
)


def test_the_compiled_world_holds_under_95_mib() -> None:
    """The address map, country map and answer tables of the compare benchmark's world, built
    and compiled in a fresh process (imports excluded): 73 MiB with the IPv6 starts settled,
    121 MiB when they stayed scattered among the build's freed temporaries (pymalloc keeps an
    arena while one object in it lives)."""
    before, after = run_rss_probe(_RSS_PROBE)
    assert after - before <= 95, (before, after)
