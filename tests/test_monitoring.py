"""The operators' side of issue 18: deploy/prometheus/rules.yml passes `promtool check rules`
and its unit tests (`promtool test rules`), those tests fail when a threshold is wrong, the
Grafana dashboards are the output of their builder, and every metric a rule or a dashboard
reads is in the /metrics of a running edge or GeoDNS."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import dns_support
from tests.edge_support import (
    LOCATIONS,
    Edge,
    Origin,
    http_request,
    processes,
    region,
    write_config,
)

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tests.yml"
GRAFANA = ROOT / "deploy" / "grafana"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")

#: A metric name in PromQL (recording rule names, with colons, are not metrics).
METRIC = re.compile(r"(?<![\w:])(meridian_[a-z0-9_]+)")
RECORDED = re.compile(r"(?<![\w:])(meridian:[a-z0-9_:]+)")


def _promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd
    )


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("meridian:edge_hit_ratio:rate5m < 0.9", "meridian:edge_hit_ratio:rate5m < 0.5"),
        ("meridian:dns_servfail:ratio_rate5m > 0.01", "meridian:dns_servfail:ratio_rate5m > 0.5"),
        ("max by (region) (meridian_region_up) == 0", "min by (region) (meridian_region_up) == 0"),
        (
            "meridian:edge_scale_hint:ceil > meridian",
            "meridian:edge_scale_hint:ceil > 1 + meridian",
        ),
        ("meridian:edge_errors:ratio_rate1h > (14.4", "meridian:edge_errors:ratio_rate1h > (90"),
    ],
)
def test_the_unit_tests_catch_a_wrong_rule(tmp_path: Path, before: str, after: str) -> None:
    text = RULES.read_text()
    assert before in text
    (tmp_path / "rules.yml").write_text(text.replace(before, after))
    shutil.copyfile(RULE_TESTS, tmp_path / "tests.yml")
    result = _promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert result.returncode != 0, result.stdout


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_alert_has_a_level_and_a_runbook() -> None:
    alerts = [rule for rule in _rules() if "alert" in rule]
    levels = {rule["labels"]["severity"] for rule in alerts}
    assert levels == {"critical", "warning", "info"}
    for rule in alerts:
        assert len(rule["annotations"]["runbook"]) > 80, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def _dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(GRAFANA.glob("*.json"))}


def _dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for board in _dashboards().values()
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboards_are_the_builders_output_and_well_formed() -> None:
    sys.path.insert(0, str(GRAFANA))
    try:
        import build  # deploy/grafana/build.py
    finally:
        sys.path.remove(str(GRAFANA))
    rendered = build.render()
    assert set(rendered) == {"edge.json", "geodns.json", "health.json", "world.json"}
    for name, text in rendered.items():
        assert (GRAFANA / name).read_text() == text, f"run python deploy/grafana/build.py ({name})"
    for name, board in _dashboards().items():
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, (name, panel["title"])
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    used = {name for expr in _dashboard_exprs() for name in RECORDED.findall(expr)}
    assert used and used <= recorded, used - recorded


def _names(text: str) -> set[str]:
    """Every series name a scrape of ``text`` can give, declared families without samples yet
    (a labelled counter before its first increment) included."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    tmp = tmp_path_factory.mktemp("monitoring")
    with processes() as procs:
        origin = Origin("eu-central", tmp)
        procs.append(origin)
        origin.ready()
        config = write_config(
            tmp / "edge.yaml", {"eu-central": region(*LOCATIONS["eu-central"], [origin.url])}
        )
        edge = Edge(config, "fra", tmp)
        procs.append(edge)
        edge.ready()
        for _ in range(3):
            http_request(edge.port, "GET", "/api/v1/ticker/BTC-USD")
        edge_text = edge.admin("/metrics")[1].decode()
        dns_config = dns_support.write_config(tmp / "dns.yaml", dns_support.base_config())
        with dns_support.running_server(dns_config) as dns:
            dns_support.ask(dns.port, "api.meridian.test")
            status, _, body = http_request(dns.admin_port, "GET", "/metrics")
            assert status == 200
        yield _names(edge_text) | _names(body.decode())


def test_every_metric_the_rules_and_dashboards_read_is_exported(scraped: set[str]) -> None:
    exprs = [rule["expr"] for rule in _rules()] + _dashboard_exprs()
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert len(used) > 40  # the regex found the queries' metrics, not nothing
    missing = sorted(used - scraped)
    assert not missing, f"not in a running edge's or GeoDNS's /metrics: {missing}"
    # The new scaling signals are among them.
    assert {"meridian_edge_scale_hint", "meridian_edge_cpu_utilisation"} <= used
