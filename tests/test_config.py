"""Config loading: every class of bad input is reported as FILE: path: reason, all at once."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from meridian.config import ConfigError, load_config, parse_config
from meridian.units import format_size, parse_duration, parse_size

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "demo.yaml"
GLOBAL = ROOT / "config" / "global.yaml"


def demo_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(DEMO.read_text())
    return data


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "t.yaml")
    return info.value.problems


def test_shipped_configs_load() -> None:
    demo = load_config(DEMO)
    assert {p.name for p in demo.pops} >= {"gru", "fra", "iad", "sin", "syd"}
    assert {r.name for r in demo.regions} == {"us-east", "eu-central", "ap-southeast"}
    assert demo.dns.zone == "meridian.test"
    assert str(demo.listeners.edge) == "127.0.0.1:8080"
    world = load_config(GLOBAL)
    assert len(world.pops) == 20
    assert len(world.regions) >= 3
    assert any(r.residency == "eu" for r in world.regions)
    rule = world.residency_zone_for("DE", "EU")
    assert rule is not None and rule.zone == "eu"
    assert world.residency_zone_for("US", "NA") is None
    assert world.health.interval == 10.0 and world.health.fall == 3 and world.health.rise == 2


def test_config_is_frozen() -> None:
    config = load_config(DEMO)
    with pytest.raises(AttributeError):
        config.dns = None  # type: ignore[misc,assignment]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(bogus=1), "t.yaml: bogus: unknown key"),
        (
            lambda d: d["health"].update(intervall="5s"),
            "t.yaml: health.intervall: unknown key (did you mean interval?)",
        ),
        (
            lambda d: d["health"].update(interval="soon"),
            "t.yaml: health.interval: 'soon' is not a duration",
        ),
        (
            lambda d: d["health"].update(fall="three"),
            "t.yaml: health.fall: expected an integer, got the string 'three'",
        ),
        (
            lambda d: d["edge"]["cache"].update(memory="lots"),
            "t.yaml: edge.cache.memory: 'lots' is not a size",
        ),
        (
            lambda d: d["pops"]["iad"].update(regions=["mars-1"]),
            "t.yaml: pops.iad.regions[0]: unknown region 'mars-1'",
        ),
        (
            lambda d: d["regions"]["us-east"]["location"].update(lat=123),
            "t.yaml: regions.us-east.location: lat 123.0 is outside -90..90",
        ),
        (
            lambda d: d["regions"]["us-east"].update(backends=["ftp://x"]),
            "t.yaml: regions.us-east.backends[0]: 'ftp://x' is not an http(s) URL",
        ),
        (
            lambda d: d["geo"].update(overrides=[{"network": "10.0.0.0/33", "region": "us-east"}]),
            "t.yaml: geo.overrides[0].network: '10.0.0.0/33' is not a CIDR network",
        ),
        (
            lambda d: d["geo"].update(overrides=[{"network": "10.0.0.1/8", "region": "us-east"}]),
            "t.yaml: geo.overrides[0].network: '10.0.0.1/8' is not a CIDR network",
        ),
        (
            lambda d: d["pops"]["iad"].update(addresses=["999.1.1.1"]),
            "t.yaml: pops.iad.addresses[0]: '999.1.1.1' is not an IP address",
        ),
        (
            lambda d: d["residency"]["eu-data"].update(zone="mars"),
            "t.yaml: residency.eu-data.zone: no region has residency 'mars'",
        ),
        (
            lambda d: d["residency"]["eu-data"].update(countries=["Germany"]),
            "t.yaml: residency.eu-data.countries[0]: expected an ISO 3166 country code",
        ),
        (
            lambda d: d["dns"].update(all_down="panic"),
            "t.yaml: dns.all_down: must be one of fail_open, empty, servfail, got 'panic'",
        ),
        (lambda d: d["dns"].pop("zone"), "t.yaml: dns.zone: is required"),
        (
            lambda d: d["edge"]["routes"].append({"name": "x", "service": "nope"}),
            "t.yaml: edge.routes[3].service: unknown service 'nope'",
        ),
        (
            lambda d: d["listeners"].update(edge="localhost"),
            "t.yaml: listeners.edge: expected HOST:PORT",
        ),
        (
            lambda d: d["edge"]["cache"].update(enabled="yes"),
            "t.yaml: edge.cache.enabled: expected true or false, got the string 'yes'",
        ),
        (
            lambda d: d["health"].update(timeout="20s"),
            "t.yaml: health.timeout: must not exceed health.interval",
        ),
        (
            lambda d: d["edge"]["routes"].append(dict(d["edge"]["routes"][0])),
            "t.yaml: edge.routes[3].name: duplicate route name 'api'",
        ),
    ],
)
def test_each_class_of_bad_input_is_named(mutate: Any, expected: str) -> None:
    data = demo_data()
    mutate(data)
    problems = problems_of(data)
    assert any(p.startswith(expected) for p in problems), problems


def test_cache_targets_are_lower_case_tokens_listed_once() -> None:
    data = demo_data()
    data["edge"]["cache"]["targets"] = ["meridian", "CDN", "cdn", "cdn"]
    assert problems_of(data) == [
        "t.yaml: edge.cache.targets[1]: 'CDN' is not a lower-case token (a-z, 0-9, -)",
        "t.yaml: edge.cache.targets: a target is listed twice",
    ]
    data["edge"]["cache"]["targets"] = ["meridian", "cdn"]
    assert parse_config(data, "t.yaml").edge.cache.targets == ("meridian", "cdn")


def test_all_problems_are_reported_not_just_the_first() -> None:
    data = demo_data()
    data["health"]["fall"] = "x"
    data["health"]["rise"] = "y"
    data["bogus"] = True
    data["pops"]["gru"]["location"]["lon"] = "west"
    problems = problems_of(data)
    assert len(problems) == 4, problems


def test_duplicate_names_in_yaml_are_rejected(tmp_path: Path) -> None:
    text = DEMO.read_text().replace(
        "pops:\n", "pops:\n  gru: {location: {lat: 1, lon: 1}, addresses: [127.0.9.9]}\n", 1
    )
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "duplicate key 'gru'" in info.value.problems[0]
    assert info.value.problems[0].startswith(f"{path}: line ")


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert "cannot read" in info.value.problems[0]
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: <top>: expected a mapping, got a list"]


def test_units() -> None:
    assert parse_duration("10s") == 10.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("1.5m") == 90.0
    assert parse_duration(3) == 3.0
    assert parse_size("256MiB") == 256 * 1024 * 1024
    assert parse_size("64k") == 64000
    assert parse_size(512) == 512
    for bad in ("", "10 parsecs", "-1s", True):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_size("1.5 furlongs")


@given(st.integers(min_value=0, max_value=2**40))
def test_size_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=20,
    )
)
def test_any_yaml_value_gives_a_config_or_config_error(data: object) -> None:
    try:
        parse_config(data)
    except ConfigError as exc:
        assert exc.problems
        assert all(p.startswith("<memory>: ") for p in exc.problems)


@given(
    st.sampled_from(["health", "dns", "edge", "geo", "listeners"]), st.text(min_size=1, max_size=10)
)
def test_unknown_keys_anywhere_are_named(section: str, key: str) -> None:
    data = demo_data()
    sub = data.setdefault(section, {})
    if key in sub:
        return
    sub[key] = 1
    problems = problems_of(copy.deepcopy(data))
    assert any(f"{section}.{key}: unknown key" in p for p in problems)


def test_meridian_check_cli(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "meridian.cli", "check", str(GLOBAL)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "pops (20)" in ok.stdout and "residency eu-gdpr" in ok.stdout
    broken = tmp_path / "broken.yaml"
    text = (
        GLOBAL.read_text()
        .replace("fall: 3", "fall: many")
        .replace("interval: 10s", "interval: 10 parsecs")
    )
    text = text.replace("    market: {}", "    market: {regions: [us-east, atlantis]}")
    broken.write_text(text)
    bad = subprocess.run(
        [sys.executable, "-m", "meridian.cli", "check", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert all(line.startswith(f"{broken}: ") for line in lines), lines
    assert any("health.fall: expected an integer" in line for line in lines)
    assert any("health.interval: '10 parsecs' is not a duration" in line for line in lines)
    # Structural problems are reported together; cross-references are checked once those pass.
    assert len(lines) == 2, lines
    broken.write_text(
        GLOBAL.read_text().replace("    market: {}", "    market: {regions: [us-east, atlantis]}")
    )
    bad = subprocess.run(
        [sys.executable, "-m", "meridian.cli", "check", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        == f"{broken}: edge.services.market.regions[1]: unknown region 'atlantis'"
    )
