"""``edge.rate_limits``: the schema, and one line per bad field."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meridian.config import EdgeRateLimit, parse_config
from meridian.units import parse_rate
from tests.test_config import demo_data, problems_of


def with_limits(limits: dict[str, Any]) -> dict[str, Any]:
    data = demo_data()
    data["edge"]["rate_limits"] = limits
    return data


def test_a_full_limit_loads() -> None:
    config = parse_config(
        with_limits(
            {
                "api-keys": {
                    "rate": "600/m",
                    "burst": 20,
                    "key": "both",
                    "header": "X-Api-Key",
                    "routes": ["api"],
                    "ipv4_prefix": 24,
                    "ipv6_prefix": 56,
                    "allow": ["192.0.2.0/24", "2001:db8::/32"],
                    "dry_run": True,
                    "max_keys": 5000,
                },
                "everyone": {"rate": 100},
            }
        )
    )
    first, second = config.edge.rate_limits
    assert first == EdgeRateLimit(
        name="api-keys",
        rate=10.0,
        burst=20,
        key="both",
        header="X-Api-Key",
        routes=("api",),
        ipv4_prefix=24,
        ipv6_prefix=56,
        allow=(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")),
        dry_run=True,
        max_keys=5000,
    )
    assert second == EdgeRateLimit(name="everyone", rate=100.0)
    assert parse_config(demo_data()).edge.rate_limits == ()


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        ({}, "edge.rate_limits.l.rate: is required"),
        ({"rate": "fast"}, "edge.rate_limits.l.rate: 'fast' is not a rate"),
        ({"rate": "10/fortnight"}, "edge.rate_limits.l.rate: '10/fortnight' is not a rate"),
        ({"rate": 0}, "edge.rate_limits.l.rate: a rate must be above 0"),
        ({"rate": "0/s"}, "edge.rate_limits.l.rate: a rate must be above 0"),
        ({"rate": -5}, "edge.rate_limits.l.rate: a rate must be above 0"),
        ({"rate": True}, "edge.rate_limits.l.rate: expected a rate"),
        ({"rate": 1, "burst": 0}, "edge.rate_limits.l.burst: must be 1..1000000"),
        ({"rate": 1, "burst": "lots"}, "edge.rate_limits.l.burst: expected an integer"),
        ({"rate": 1, "key": "ip"}, "edge.rate_limits.l.key: must be one of client, header, both"),
        ({"rate": 1, "key": "header"}, "edge.rate_limits.l.header: key header needs"),
        ({"rate": 1, "key": "both"}, "edge.rate_limits.l.header: key both needs"),
        ({"rate": 1, "header": "x-api-key"}, "edge.rate_limits.l.header: only used with key"),
        (
            {"rate": 1, "key": "header", "header": "x api"},
            "edge.rate_limits.l.header: 'x api' is not a header field name",
        ),
        (
            {"rate": 1, "key": "header", "header": "x_api_key"},
            "edge.rate_limits.l.header: names with an underscore",
        ),
        ({"rate": 1, "ipv4_prefix": 33}, "edge.rate_limits.l.ipv4_prefix: must be 0..32"),
        ({"rate": 1, "ipv6_prefix": -1}, "edge.rate_limits.l.ipv6_prefix: must be 0..128"),
        ({"rate": 1, "max_keys": 0}, "edge.rate_limits.l.max_keys: must be 1..10000000"),
        ({"rate": 1, "routes": ["nope"]}, "edge.rate_limits.l.routes[0]: unknown route 'nope'"),
        (
            {"rate": 1, "services": ["nope"]},
            "edge.rate_limits.l.services[0]: unknown service 'nope'",
        ),
        ({"rate": 1, "routes": "api"}, "edge.rate_limits.l.routes: expected a list"),
        (
            {"rate": 1, "allow": ["10.0.0.1/8"]},
            "edge.rate_limits.l.allow[0]: '10.0.0.1/8' is not a CIDR network",
        ),
        ({"rate": 1, "dryrun": True}, "edge.rate_limits.l.dryrun: unknown key (did you mean"),
        ({"rate": 1, "dry_run": "yes"}, "edge.rate_limits.l.dry_run: expected true or false"),
        ({"rate": 1, "shared": True}, "edge.rate_limits.l.shared: needs the POP's Redis"),
    ],
)
def test_each_bad_field_is_one_line_naming_it(limit: dict[str, Any], expected: str) -> None:
    problems = problems_of(with_limits({"l": limit}))
    assert len(problems) == 1, problems
    assert problems[0].startswith("t.yaml: " + expected), problems


def test_rate_limits_must_be_a_mapping_of_names() -> None:
    problems = problems_of(with_limits([{"name": "l", "rate": 1}]))  # type: ignore[arg-type]
    assert problems == ["t.yaml: edge.rate_limits: expected a mapping of names, got a list"]


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("10/s", 10.0), ("600/m", 10.0), ("3600/h", 1.0), ("8640/d", 0.1), (5, 5.0), ("2.5 / s", 2.5)],
)
def test_rates(text: object, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@given(st.one_of(st.text(max_size=12), st.floats(), st.integers(), st.none(), st.booleans()))
def test_any_rate_value_parses_or_says_why(value: object) -> None:
    try:
        rate = parse_rate(value)
    except ValueError as exc:
        assert str(exc)
    else:
        assert 0.0 < rate <= 1e9
