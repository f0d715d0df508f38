"""The plan of ``meridian world`` (pure: ports from a counter, places from a table), the
fault timeline's arithmetic, and the supervisor's retire (pure policy, fake clock)."""

from __future__ import annotations

import ipaddress
import itertools
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from meridian.certs import issue_demo_certificate
from meridian.config import ConfigError, IPNetwork
from meridian.demo import packaged_demo_config
from meridian.geo import distance_km
from meridian.supervise_policy import Kill, Policy, Spawn, Timing
from meridian.world import health_overrides
from meridian.world_faults import Observation, summarize
from meridian.world_plan import (
    Place,
    Wan,
    WorldClient,
    WorldSection,
    build_plan,
    client_tag,
    one_way_delay,
)

PLACES = {
    "200.160.2.0/24": Place(-17.47, -45.82, "BR", "SA"),
    "217.0.0.0/24": Place(51.0, 9.0, "DE", "EU"),
    "8.8.8.0/24": Place(37.75, -97.82, "US", "NA"),
}


def locate(subnet: IPNetwork) -> Place:
    return PLACES[str(subnet)]


def section(*names: tuple[str, str]) -> WorldSection:
    clients = tuple(WorldClient(n, ipaddress.ip_network(s)) for n, s in names)
    return WorldSection(clients)


def topology() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(packaged_demo_config().read_text(encoding="utf-8"))
    return data


def plan(pops: tuple[str, ...] = (), **kwargs: Any) -> Any:
    ports = itertools.count(20000)
    return build_plan(
        section(("BR", "200.160.2.0/24"), ("DE", "217.0.0.0/24"), ("US", "8.8.8.0/24")),
        topology(),
        source="world.yaml",
        pops=pops,
        locate=locate,
        port=lambda: next(ports),
        **kwargs,
    )


def test_every_pop_listens_on_its_own_address_and_reaches_regions_through_the_wan() -> None:
    world = plan()
    assert [(p.name, p.address) for p in world.pops] == [
        ("iad", "127.0.1.1"),
        ("gru", "127.0.1.2"),
        ("fra", "127.0.1.3"),
        ("sin", "127.0.1.4"),
        ("syd", "127.0.1.5"),
    ]
    gru = world.pop("gru")
    assert gru.config["listeners"]["edge"] == str(gru.edge)
    assert {p.edge.host for p in world.pops} == {p.address for p in world.pops}
    for region in world.regions:
        link = world.link("gru", region.name)
        assert gru.config["regions"][region.name]["backends"] == [f"http://{link.listen}"]
        assert link.target == region.origin
        assert link.listen.host == region.origin.host and link.listen.port != region.origin.port
    # Every GeoDNS checks every POP's edge itself, and its readiness for the service.
    fra = world.pop("fra")
    spec = gru.config["pops"]["fra"]
    assert spec["health_url"] == f"http://{fra.edge_admin}/healthz"
    assert spec["ready_url"] == f"http://{fra.edge_admin}/readyz"
    assert len({str(k.listen) for k in world.links}) == len(world.links)


def test_links_are_delayed_by_great_circle_distance() -> None:
    world = plan()
    link = world.link("gru", "us-east")
    km = distance_km(-23.55, -46.63, 39.04, -77.49)
    assert link.delay == pytest.approx(km / 100 / 1000)
    assert one_way_delay(0.0, Wan()) == 0.001  # the floor
    assert world.link(client_tag("BR"), "gru").delay < world.link(client_tag("BR"), "iad").delay


def test_clients_expect_their_nearest_pop_inside_their_residency_zone() -> None:
    world = plan()
    assert [(c.name, c.nearest_pop, c.nearest_region, c.zone) for c in world.clients] == [
        ("BR", "gru", "us-east", None),
        ("DE", "fra", "eu-central", "eu"),
        ("US", "iad", "us-east", None),
    ]
    # Without fra, DE may only fall back (its rule says so) to the nearest of the rest.
    subset = plan(pops=("iad", "gru"))
    assert [p.name for p in subset.pops] == ["iad", "gru"]
    assert subset.client("DE").nearest_pop == "iad" and subset.client("DE").fallback
    assert set(subset.pop("iad").config["pops"]) == {"iad", "gru"}


def test_bad_worlds_are_one_line_each() -> None:
    with pytest.raises(ConfigError) as found:
        plan(pops=("gru", "mars"))
    assert found.value.problems == ["world.yaml: --pops: 'mars' is not a POP of the topology"]
    ports = itertools.count(20000)
    with pytest.raises(ConfigError) as found:
        build_plan(
            section(("AU", "200.160.2.0/24")),
            topology(),
            source="world.yaml",
            locate=locate,
            port=lambda: next(ports),
        )
    assert found.value.problems == [
        "world.yaml: world.clients.AU.subnet: the geo database places 200.160.2.0/24 in BR, not AU"
    ]
    with pytest.raises(ConfigError) as found:
        plan(health={"interval": "500ms", "timeout": "300ms"})
    assert found.value.problems[0].startswith(
        "world.yaml: health.timeout: 0.3s is shorter than a check over a new connection"
    )


def test_settings_from_the_command_line() -> None:
    world = plan(health=health_overrides("1s", 2), ttl=5.0)
    health = world.topology.health
    assert (health.interval, health.fast_interval, health.timeout, health.fall) == (
        1.0,
        1.0,
        1.0,
        2,
    )
    assert (world.topology.dns.ttl, world.topology.dns.min_ttl) == (5.0, 5.0)
    assert world.topology.dns.rate_limit.enabled is False  # one loopback address for all


def test_a_timeline_is_the_last_bad_and_first_good_observation() -> None:
    observed = [
        Observation(0.1, "DE", "dns iad", True, "answered fra, which the fault took out"),
        Observation(0.2, "DE", "http fra", True, "closed via fra"),
        Observation(1.5, "DE", "dns gru", True, "answered iad outside residency zone eu"),
        Observation(1.6, "DE", "dns iad", False, "answered iad"),
        Observation(1.7, "DE", "http iad", False, "200 via iad"),
        Observation(2.0, "BR", "dns iad", False, "answered gru"),
    ]
    t = summarize("pop-killed", "fra killed", observed)
    assert (t.last_bad_answer, t.first_good_answer, t.bad_answers, t.answers) == (1.5, 1.6, 2, 4)
    assert (t.last_failed_request, t.first_good_request, t.failed_requests) == (0.2, 1.7, 1)
    assert t.recovery == 1.5 and t.residency_violations == 1
    quiet = summarize("region-killed", "", [Observation(1.0, "US", "http iad", False, "200")])
    assert quiet.recovery == 0.0 and quiet.last_bad_answer is None


def test_a_retired_child_is_signalled_by_pid_and_never_replaced() -> None:
    policy = Policy(Timing(drain=5.0))
    assert policy.add("origin us-east", False, 0.0) == [Spawn("origin us-east", "start")]
    policy.spawned("origin us-east", 41, 0.0)
    assert policy.retire("origin us-east", 1.0, signal.SIGKILL) == [
        Kill("origin us-east", 41, signal.SIGKILL, "retired")
    ]
    assert policy.pids() == [41]  # until reaped
    assert policy.exited(41, 1.1) == []  # not replaced
    assert policy.pids() == [] and policy.tick(100.0) == []
    # The slot may be started again (a restored region).
    assert policy.add("origin us-east", False, 2.0) == [Spawn("origin us-east", "start")]


def test_with_a_certificate_every_edge_listens_with_tls_and_clients_have_a_link_to_it(
    tmp_path: Path,
) -> None:
    made = issue_demo_certificate(tmp_path, ["*.meridian.test"], ["127.0.0.1"])
    world = plan(tls=(str(made.cert), str(made.key), str(made.ca)))
    assert world.ca == str(made.ca)
    for pop in world.pops:
        assert pop.tls is not None and pop.tls.host == pop.address
        assert pop.config["edge"]["tls"]["listen"] == str(pop.tls)
        link = world.link(client_tag("BR"), pop.name, tls=True)
        assert link.target == pop.tls
        assert link.delay == world.link(client_tag("BR"), pop.name).delay
