"""Upstream subscriptions moving back to a nearer region once it has recovered, without
sockets: the pure policy (``nearer_region``), the uptime record and the config.  The
end-to-end run, with real origins and real health checks, is in ``tests.test_streams_e2e``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.streams.moveback import RegionUptime, nearer_region
from meridian.config import parse_config
from tests.test_config import demo_data, problems_of

# --------------------------------------------------------------------------------------------
# The policy

ORDER = ("eu-central", "us-east", "ap-southeast")


@pytest.mark.parametrize(
    ("current", "regions", "up_since", "now", "expected"),
    [
        # Already on the first choice: stay.
        ("eu-central", ORDER, {"eu-central": 0.0, "us-east": 0.0}, 100.0, None),
        # The nearer region has held for 30 s: back to it.
        ("us-east", ORDER, {"eu-central": 70.0, "us-east": 0.0}, 100.0, "eu-central"),
        # Up, but not for long enough yet.
        ("us-east", ORDER, {"eu-central": 70.1, "us-east": 0.0}, 100.0, None),
        # Live but never seen up (an ejected-only fallback region): not a move target.
        ("us-east", ORDER, {"us-east": 0.0}, 100.0, None),
        # The nearest has just come back, the middle one has held: the middle one now.
        ("ap-southeast", ORDER, {"eu-central": 99.0, "us-east": 10.0}, 100.0, "us-east"),
        # Both held: the nearest.
        ("ap-southeast", ORDER, {"eu-central": 0.0, "us-east": 0.0}, 100.0, "eu-central"),
        # A region farther than the current one never counts.
        ("us-east", ("us-east", "ap-southeast"), {"ap-southeast": 0.0}, 100.0, None),
        # The current region is not live (down): move_off_unhealthy's business.
        ("us-east", ("eu-central", "ap-southeast"), {"eu-central": 0.0}, 100.0, None),
        # No live region at all.
        ("us-east", (), {}, 100.0, None),
    ],
)
def test_nearer_region_table(
    current: str,
    regions: tuple[str, ...],
    up_since: dict[str, float],
    now: float,
    expected: str | None,
) -> None:
    assert nearer_region(current, regions, up_since, now, 30.0) == expected


@given(
    order=st.permutations(ORDER),
    live=st.lists(st.booleans(), min_size=3, max_size=3),
    ups=st.lists(st.one_of(st.none(), st.floats(0, 200)), min_size=3, max_size=3),
    current=st.sampled_from(ORDER),
    now=st.floats(0, 300),
    hold=st.floats(0, 100),
)
def test_nearer_region_only_moves_nearer_to_a_region_that_held(
    order: list[str],
    live: list[bool],
    ups: list[float | None],
    current: str,
    now: float,
    hold: float,
) -> None:
    regions = tuple(r for r, on in zip(order, live, strict=True) if on)
    up_since = {r: t for r, t in zip(ORDER, ups, strict=True) if t is not None}
    chosen = nearer_region(current, regions, up_since, now, hold)
    held = [r for r in regions if r in up_since and now - up_since[r] >= hold]
    if current not in regions:
        assert chosen is None
        return
    ahead = [r for r in regions[: regions.index(current)] if r in held]
    assert chosen == (ahead[0] if ahead else None)


@dataclass
class Health:
    """A health view the test sets: regions down, the others up with their one backend."""

    backends: dict[str, str]
    down: set[str] = field(default_factory=set)

    def region_up(self, name: str) -> bool:
        return name in self.backends and name not in self.down

    def ejected_only(self, name: str) -> bool:
        return False

    def usable_backends(self, region: str) -> tuple[str, ...]:
        backend = self.backends.get(region)
        return (backend,) if backend is not None and region not in self.down else ()

    def backend_up(self, url: str) -> bool:
        return any(b == url and r not in self.down for r, b in self.backends.items())


def test_uptime_keeps_the_first_time_seen_up_and_forgets_a_region_seen_down() -> None:
    health = Health({"a": "http://a", "b": "http://b"}, down={"a"})
    uptime = RegionUptime()
    uptime.observe(["a", "b"], health, 1.0)
    assert uptime.since == {"b": 1.0}
    health.down.clear()
    uptime.observe(["a", "b"], health, 2.0)
    uptime.observe(["a", "b"], health, 3.0)
    assert uptime.since == {"a": 2.0, "b": 1.0}
    health.down.add("a")
    uptime.observe(["a", "b"], health, 4.0)
    health.down.clear()
    uptime.observe(["a", "b"], health, 5.0)  # a flap starts the hold again
    assert uptime.since == {"a": 5.0, "b": 1.0}
    uptime.observe(["b"], health, 6.0)  # a region gone from the config is dropped
    assert uptime.since == {"b": 1.0}


def test_a_failure_in_a_region_restarts_its_hold() -> None:
    health = Health({"a": "http://a", "b": "http://b"}, down={"b"})
    uptime = RegionUptime()
    uptime.observe(["a", "b"], health, 1.0)
    uptime.setback("a", 7.0)
    uptime.setback("b", 7.0)  # not seen up: nothing to restart
    uptime.observe(["a", "b"], health, 8.0)
    assert uptime.since == {"a": 7.0}
    assert nearer_region("c", ("a", "c"), uptime.since, 36.9, 30.0) is None
    assert nearer_region("c", ("a", "c"), uptime.since, 37.0, 30.0) == "a"


@pytest.mark.parametrize(
    ("field_value", "expected"),
    [
        ({"move_back_after": -1}, "edge.streams.move_back_after: a duration cannot be negative"),
        ({"move_back_after": "soon"}, "edge.streams.move_back_after"),
        ({"move_back_rate": 0}, "edge.streams.move_back_rate: must be 1..100000"),
        ({"move_back_rate": 100_001}, "edge.streams.move_back_rate: must be 1..100000"),
    ],
)
def test_bad_move_back_settings_name_the_field(field_value: dict[str, Any], expected: str) -> None:
    data = demo_data()
    data["edge"]["streams"] = {"channels": [{"pattern": "trades:*"}], **field_value}
    problems = problems_of(data)
    assert len(problems) == 1, problems
    assert expected in problems[0]


def test_move_back_defaults() -> None:
    data = demo_data()
    data["edge"]["streams"] = {"channels": [{"pattern": "trades:*"}]}
    streams = parse_config(data).edge.streams
    assert streams is not None
    assert streams.move_back_after == 30.0 and streams.move_back_rate == 50
