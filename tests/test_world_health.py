"""Cross-layer health, pure: a POP is down for a name while its edge has no healthy region for
the name's service; residency holds through it; the failover budget is the settings' sum.
Health book inputs carry their time (no clock, no sleeps)."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
import yaml

from geodns.budget import failover_budget
from geodns.explain import StaticHealth, explain
from geodns.selection import Selection, select
from geodns.zone import GeoName, Zone
from meridian.config import Config, ConfigError, HealthConfig, parse_config
from meridian.demo import packaged_demo_config
from meridian.geo import ClientLocation
from meridian.health import HealthBook, pop_service_target, pop_target
from meridian.health.budget import detection

BR = ClientLocation(
    -17.47, -45.82, "BR", "SA", None, ipaddress.ip_network("200.160.0.0/15"), "database"
)
DE = ClientLocation(51.0, 9.0, "DE", "EU", None, ipaddress.ip_network("217.0.0.0/14"), "database")


def world_data(on_failure: str = "fallback") -> dict[str, Any]:
    """The demo topology with every POP's health and readiness URLs, and a second POP name
    that serves no edge service."""
    data = yaml.safe_load(packaged_demo_config().read_text(encoding="utf-8"))
    for i, pop in enumerate(data["pops"].values()):
        pop["health_url"] = f"http://127.0.1.{i + 1}:9100/healthz"
        pop["ready_url"] = f"http://127.0.1.{i + 1}:9100/readyz"
    data["dns"]["names"]["plain"] = {"targets": "pops", "answers": 1}
    data["residency"]["eu-data"]["on_failure"] = on_failure
    data["health"] = {"interval": 10, "fast_interval": 2, "timeout": 2, "fall": 3, "rise": 2}
    return data


@pytest.fixture
def config() -> Config:
    return parse_config(world_data())


def geo(config: Config, name: str) -> GeoName:
    return next(g for g in Zone.build(config).geo_names.values() if g.spec.name == name)


def fail(book: HealthBook, target: str, now: float = 1.0) -> None:
    for i in range(book.config.health.fall):
        book.check(target, False, "status 503", now + i)


def chosen(selection: Selection) -> list[str]:
    return [t.name for t in selection.chosen]


def test_geodns_checks_every_pops_readiness_for_each_served_service(config: Config) -> None:
    book = HealthBook(config, now=0.0, check_backends=False, check_pops=True)
    ready = {name: info for name, info in book.targets.items() if info.service is not None}
    assert set(ready) == {pop_service_target(p.name, "market") for p in config.pops}
    fra = ready["pop:fra/market"]
    assert (fra.kind, fra.pop, fra.url) == ("pop", "fra", "http://127.0.1.3:9100/readyz/market")
    assert pop_target("fra") in book.targets  # the process check stays


def test_a_pop_whose_edge_lost_its_regions_is_down_for_its_service_names_only(
    config: Config,
) -> None:
    book = HealthBook(config, now=0.0, check_backends=False, check_pops=True)
    before = book.snapshot(1, clock=lambda: 10.0)
    assert chosen(select(config, geo(config, "api"), 4, BR, before)) == ["gru"]

    fail(book, "pop:gru/market")
    snapshot = book.snapshot(2, clock=lambda: 10.0)
    assert snapshot.pop_up("gru") and not snapshot.pop_serves("gru", "market")
    api = select(config, geo(config, "api"), 4, BR, snapshot)
    assert chosen(api) == ["iad"]
    assert "skipped nearer unhealthy gru" in api.reason
    # A name with no service still answers gru: its edge process is up.
    assert chosen(select(config, geo(config, "plain"), 4, BR, snapshot)) == ["gru"]

    # Ready again after rise passed checks.
    for i in range(config.health.rise):
        book.check("pop:gru/market", True, "status 200", 20.0 + i)
    assert chosen(select(config, geo(config, "api"), 4, BR, book.snapshot(3))) == ["gru"]


def test_a_pending_readiness_transition_shortens_the_ttl(config: Config) -> None:
    book = HealthBook(config, now=0.0, check_backends=False, check_pops=True)
    book.check("pop:gru/market", True, "status 200", 0.0)
    book.check("pop:gru/market", False, "status 503", 1.0)  # one of fall=3
    snapshot = book.snapshot(2, clock=lambda: 1.0)
    assert snapshot.ttl_hint("pop:gru/market") == pytest.approx(4.0)
    selection = select(config, geo(config, "api"), 4, BR, snapshot)
    assert chosen(selection) == ["gru"] and selection.ttl == 5 and selection.timed


def test_an_eu_client_stays_in_the_eu_unless_its_rule_says_fallback() -> None:
    for on_failure, outcome, answer in (("fallback", "answer", ["iad"]), ("refuse", "refused", [])):
        config = parse_config(world_data(on_failure))
        book = HealthBook(config, now=0.0, check_backends=False, check_pops=True)
        assert chosen(select(config, geo(config, "api"), 4, DE, book.snapshot(1))) == ["fra"]
        fail(book, "pop:fra/market")
        selection = select(config, geo(config, "api"), 4, DE, book.snapshot(2))
        assert (selection.outcome, chosen(selection)) == (outcome, answer)
        assert "residency rule eu-data" in selection.reason


def test_a_service_on_a_name_must_be_an_edge_service_of_a_pop_name() -> None:
    data = world_data()
    data["dns"]["names"]["api"]["service"] = "nope"
    with pytest.raises(ConfigError) as found:
        parse_config(data)
    assert found.value.problems == ["<memory>: dns.names.api.service: unknown edge service 'nope'"]
    data = world_data()
    data["dns"]["names"]["origin"]["service"] = "market"
    with pytest.raises(ConfigError) as found:
        parse_config(copy.deepcopy(data))
    assert found.value.problems == [
        "<memory>: dns.names.origin.service: only a name that targets pops serves an edge service"
    ]


def test_detection_follows_the_monitor_schedule() -> None:
    defaults = detection(HealthConfig())  # 10 s checks, fast 2 s, timeout 2 s, fall 3, 10%
    assert defaults.refused == pytest.approx(11.0 + 2 * 2.2)
    assert defaults.hung == pytest.approx(11.0 + 2 * 2.2 + 2.0)
    fast = detection(HealthConfig(interval=1.0, fast_interval=1.0, timeout=1.0))
    assert fast.refused == pytest.approx(3.3) and fast.hung == pytest.approx(4.3)
    # A timeout longer than the fast period stretches every later check.
    slow = detection(HealthConfig(interval=1.0, fast_interval=0.2, timeout=0.8, jitter=0.0))
    assert slow.hung == pytest.approx(1.0 + 2 * 0.8 + 0.8)


def test_the_budget_adds_the_ttl_and_for_a_service_name_the_edges_detection(
    config: Config,
) -> None:
    plain = failover_budget(config, geo(config, "plain"))
    assert plain.seconds == pytest.approx(17.4 + 30)
    api = failover_budget(config, geo(config, "api"))
    assert api.detection == pytest.approx(17.4 + 15.4) and api.ttl == 30
    assert api.path == "edge lost its regions"
    text = explain(config, "200.160.2.1", BR, StaticHealth(), ["api"])
    assert "api.meridian.test. failover budget 62.8 s = detection 32.8 s" in text


def test_explain_takes_a_pops_readiness_from_the_status_view(config: Config) -> None:
    text = explain(config, "200.160.2.1", BR, StaticHealth({"gru/market": False}), ["api"])
    assert "pop gru" in text and "=> answer 127.0.1.1" in text  # iad, gru skipped


def test_each_names_budget_is_a_metric_and_follows_reloads(config: Config) -> None:
    from prometheus_client import CollectorRegistry

    from geodns.server import DnsMetrics

    registry = CollectorRegistry()
    metrics = DnsMetrics(registry)
    metrics.set_budgets(config)

    def budget(name: str) -> float | None:
        return registry.get_sample_value("meridian_dns_failover_budget_seconds", {"name": name})

    assert budget("api.meridian.test.") == pytest.approx(62.8)
    assert budget("plain.meridian.test.") == pytest.approx(47.4)
    assert registry.get_sample_value(
        "meridian_dns_failover_detection_seconds", {"name": "plain.meridian.test."}
    ) == pytest.approx(17.4)
    data = world_data()
    del data["dns"]["names"]["plain"]
    data["health"]["interval"] = 1
    data["health"]["fast_interval"] = 1
    data["health"]["timeout"] = 1
    metrics.set_budgets(parse_config(data))
    assert budget("plain.meridian.test.") is None  # the name is gone
    assert budget("api.meridian.test.") == pytest.approx(4.3 + 3.3 + 30)
