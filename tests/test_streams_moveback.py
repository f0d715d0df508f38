"""Upstream subscriptions moving back to a nearer region once it has recovered, without
sockets: the pure policy (``nearer_region``), the uptime record, and ``UpstreamLinks`` driven
by an injected clock and a health view the test sets (no sleeps).  The end-to-end run, with
real origins and real health checks, is in ``tests.test_streams_e2e``."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.state import EdgeState
from edge.streams.moveback import RegionUptime, nearer_region
from edge.streams.stats import StreamStats
from edge.streams.upstream import UpstreamLinks
from edge.upstream import Attempt
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


# --------------------------------------------------------------------------------------------
# The links, with an injected clock


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Services:
    state: EdgeState
    health: Any
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    upstream: Any = None


@dataclass
class HealthSource:
    snapshot: Health

    def report(self, backend_url: str, ok: bool) -> None:
        pass


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def links_at_fra(
    loop: asyncio.AbstractEventLoop, **streams: Any
) -> tuple[UpstreamLinks, Health, Clock, list[tuple[str, Attempt | None]]]:
    """Links of a worker at fra (eu-central, then us-east, then ap-southeast), its
    subscriptions' reopening recorded instead of run."""
    data = demo_data()
    data["edge"]["streams"] = {"channels": [{"pattern": "trades:*"}], **streams}
    config = parse_config(data)
    health = Health({r.name: r.backends[0] for r in config.regions})
    clock = Clock()
    services = Services(EdgeState.build(config, "fra", 1), HealthSource(health))
    links = UpstreamLinks(services, lambda: None, StreamStats(clock), loop, clock=clock)  # type: ignore[arg-type]
    opened: list[tuple[str, Attempt | None]] = []
    links.open = lambda name, first=None: opened.append((name, first))  # type: ignore[method-assign]
    return links, health, clock, opened


def on_us_east(links: UpstreamLinks, health: Health, *names: str) -> None:
    for name in names:
        links.attempts[name] = Attempt("us-east", health.backends["us-east"])
        links.connected[name] = "us-east"


def test_a_subscription_moves_back_only_after_the_hold(loop: asyncio.AbstractEventLoop) -> None:
    links, health, clock, opened = links_at_fra(loop, move_back_after="30s")
    health.down.add("eu-central")
    links.on_health(health)
    on_us_east(links, health, "trades:BTC-USD")
    health.down.clear()
    links.on_health(health)  # eu-central up from 1000
    clock.now = 1029.9
    links.move_back_nearer()
    assert opened == [] and links.moves == {}
    clock.now = 1030.0
    links.move_back_nearer()
    assert opened == [("trades:BTC-USD", Attempt("eu-central", health.backends["eu-central"]))]
    assert links.moves == {"nearer_region_back": 1}
    assert "trades:BTC-USD" not in links.attempts  # closed: the new task reconnects


def test_a_flapping_region_takes_no_subscription_back(loop: asyncio.AbstractEventLoop) -> None:
    links, health, clock, opened = links_at_fra(loop, move_back_after="30s")
    on_us_east(links, health, "trades:BTC-USD")
    for _ in range(10):  # up 20 s, down 1 s, for 210 s: never up 30 s in a row
        health.down.discard("eu-central")
        links.on_health(health)
        for _ in range(20):
            clock.now += 1.0
            links.move_back_nearer()
        health.down.add("eu-central")
        links.on_health(health)
        clock.now += 1.0
        links.move_back_nearer()
    assert opened == []
    health.down.clear()
    links.on_health(health)
    clock.now += 30.0
    links.move_back_nearer()
    assert [first.region for _, first in opened if first is not None] == ["eu-central"]


def test_the_sweep_times_regions_without_a_health_subscription(
    loop: asyncio.AbstractEventLoop,
) -> None:
    links, health, clock, opened = links_at_fra(loop, move_back_after="5s")
    health.down.add("eu-central")
    links.move_back_nearer()
    on_us_east(links, health, "trades:BTC-USD")
    health.down.clear()
    clock.now += 1.0
    links.move_back_nearer()  # seen up here, at 1001
    clock.now += 4.9
    links.move_back_nearer()
    assert opened == []
    clock.now += 0.1
    links.move_back_nearer()
    assert len(opened) == 1


def test_moves_are_spread_over_sweeps(loop: asyncio.AbstractEventLoop) -> None:
    links, health, clock, opened = links_at_fra(loop, move_back_after="1s", move_back_rate=50)
    health.down.add("eu-central")
    links.on_health(health)
    names = [f"trades:S{i}-USD" for i in range(120)]
    on_us_east(links, health, *names)
    health.down.clear()
    links.on_health(health)
    clock.now += 1.0
    moved = []
    for _ in range(3):
        links.move_back_nearer()
        moved.append(len(opened))
    assert moved == [50, 100, 120]
    assert sorted(name for name, _ in opened) == sorted(names)
    assert links.moves == {"nearer_region_back": 120}


def test_a_subscription_on_the_nearest_region_stays(loop: asyncio.AbstractEventLoop) -> None:
    links, health, clock, opened = links_at_fra(loop, move_back_after="0s")
    links.attempts["trades:BTC-USD"] = Attempt("eu-central", health.backends["eu-central"])
    links.on_health(health)
    clock.now += 100
    links.move_back_nearer()
    assert opened == []


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
