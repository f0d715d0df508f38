"""Writes Meridian's Grafana dashboards (edge, GeoDNS, health, world overview) as JSON next to
this file: `python deploy/grafana/build.py`.  The JSON is what operators import (Dashboards >
Import, or a provisioning directory); this script is its source, so the panels stay uniform and
tests/test_monitoring.py can check that the committed files are its output.

Every dashboard has a Prometheus data source variable and a `namespace` variable (one per POP).
Queries use the recording rules of deploy/prometheus/rules.yml where one exists.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
NS = 'namespace=~"$namespace"'
RATE = "$__rate_interval"


def _variables(*, namespace: bool = True) -> dict[str, Any]:
    variables: list[dict[str, Any]] = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}
    ]
    if namespace:
        variables.append(
            {
                "name": "namespace",
                "label": "POP namespace",
                "type": "query",
                "datasource": DS,
                "query": "label_values(meridian_region_up, namespace)",
                "includeAll": True,
                "multi": True,
                "current": {"text": "All", "value": "$__all"},
                "refresh": 2,
            }
        )
    return {"list": variables}


class Board:
    """Panels laid out left to right, 24 grid units wide, in rows of ``height``."""

    def __init__(self, uid: str, title: str, description: str) -> None:
        self.uid = uid
        self.title = title
        self.description = description
        self.panels: list[dict[str, Any]] = []
        self._x = 0
        self._y = 0
        self._row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "id": len(self.panels) + 1,
                "collapsed": False,
                "gridPos": {"x": 0, "y": self._y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        self._y += 1

    def _newline(self) -> None:
        if self._x:
            self._x = 0
            self._y += self._row_height
            self._row_height = 0

    def panel(
        self,
        title: str,
        targets: list[tuple[str, str]],
        *,
        unit: str = "short",
        kind: str = "timeseries",
        width: int = 8,
        height: int = 8,
        description: str = "",
        thresholds: list[tuple[float | None, str]] | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> None:
        if self._x + width > 24:
            self._newline()
        defaults: dict[str, Any] = {"unit": unit}
        if minimum is not None:
            defaults["min"] = minimum
        if maximum is not None:
            defaults["max"] = maximum
        if thresholds:
            defaults["thresholds"] = {
                "mode": "absolute",
                "steps": [{"value": value, "color": color} for value, color in thresholds],
            }
        panel: dict[str, Any] = {
            "type": kind,
            "title": title,
            "id": len(self.panels) + 1,
            "datasource": DS,
            "gridPos": {"x": self._x, "y": self._y, "w": width, "h": height},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {},
            "targets": [
                {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        if description:
            panel["description"] = description
        if kind == "timeseries":
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}}
        if kind == "table":
            panel["targets"] = [{**t, "format": "table", "instant": True} for t in panel["targets"]]
        self.panels.append(panel)
        self._x += width
        self._row_height = max(self._row_height, height)

    def document(self, *, namespace: bool = True) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["meridian"],
            "timezone": "utc",
            "editable": True,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "templating": _variables(namespace=namespace),
            "annotations": {"list": []},
            "panels": self.panels,
        }


UP_DOWN: list[tuple[float | None, str]] = [(None, "red"), (1.0, "green")]


def edge() -> dict[str, Any]:
    b = Board("meridian-edge", "Meridian edge", "The edge proxy and its cache, per POP.")
    b.row("Traffic")
    b.panel(
        "Requests/s", [(f"meridian:edge_requests:rate5m{{{NS}}}", "{{namespace}}")], unit="reqps"
    )
    b.panel(
        "Cache hit ratio (target 90%)",
        [(f"meridian:edge_hit_ratio:rate5m{{{NS}}}", "{{namespace}}")],
        unit="percentunit",
        thresholds=[(None, "red"), (0.9, "green")],
        minimum=0,
        maximum=1,
    )
    b.panel(
        "Latency p50 / p99",
        [
            (f"meridian:edge_latency:p50_5m{{{NS}}}", "p50 {{namespace}}"),
            (f"meridian:edge_latency:p99_5m{{{NS}}}", "p99 {{namespace}}"),
            (f"max by (namespace) (meridian_edge_latency_target_seconds{{{NS}}})", "target"),
        ],
        unit="s",
    )
    b.panel(
        "5xx ratio (SLO 0.1%)",
        [
            (f"meridian:edge_errors:ratio_rate5m{{{NS}}}", "5m {{namespace}}"),
            (f"meridian:edge_errors:ratio_rate1h{{{NS}}}", "1h {{namespace}}"),
        ],
        unit="percentunit",
    )
    b.panel(
        "Edge-generated responses by cause",
        [
            (
                f"sum by (status, reason) (rate(meridian_edge_errors_total{{{NS}}}[{RATE}]))",
                "{{status}} {{reason}}",
            )
        ],
        unit="reqps",
    )
    b.panel(
        "Top routes",
        [
            (
                f"topk(10, sum by (route) (rate(meridian_edge_requests_total{{{NS}}}[{RATE}])))",
                "{{route}}",
            )
        ],
        unit="reqps",
    )
    b.row("Upstream")
    b.panel(
        "Upstream latency p99 by region",
        [
            (
                "histogram_quantile(0.99, sum by (region, le) "
                f"(rate(meridian_edge_upstream_duration_seconds_bucket{{{NS}}}[{RATE}])))",
                "{{region}}",
            )
        ],
        unit="s",
    )
    b.panel(
        "Upstream failures by region and kind",
        [
            (
                "sum by (region, kind) "
                f"(rate(meridian_edge_upstream_failures_total{{{NS}}}[{RATE}]))",
                "{{region}} {{kind}}",
            )
        ],
        unit="ops",
    )
    b.panel(
        "Retries and failovers",
        [
            (f"sum(rate(meridian_edge_retries_total{{{NS}}}[{RATE}]))", "retries"),
            (
                "sum by (from_region, to_region) "
                f"(rate(meridian_edge_failovers_total{{{NS}}}[{RATE}]))",
                "{{from_region}} -> {{to_region}}",
            ),
        ],
        unit="ops",
    )
    b.row("Cache")
    b.panel(
        "Cache memory",
        [(f"sum by (namespace) (meridian_cache_bytes{{{NS}}})", "{{namespace}}")],
        unit="bytes",
    )
    b.panel(
        "Evictions/s",
        [
            (
                f"sum by (namespace) (rate(meridian_cache_evictions_total{{{NS}}}[{RATE}]))",
                "{{namespace}}",
            )
        ],
        unit="ops",
    )
    b.panel(
        "Purges pending (Redis down)",
        [(f"max by (namespace) (meridian_cache_purges_pending{{{NS}}})", "{{namespace}}")],
    )
    b.row("Capacity and scaling")
    b.panel(
        "CPU of limit",
        [(f"meridian_edge_cpu_utilisation{{{NS}}}", "{{pod}}")],
        unit="percentunit",
        thresholds=[(None, "green"), (0.8, "orange")],
    )
    b.panel(
        "Memory of limit",
        [(f"meridian_edge_memory_utilisation{{{NS}}}", "{{pod}}")],
        unit="percentunit",
        thresholds=[(None, "green"), (0.85, "orange")],
    )
    b.panel(
        "Scale hint vs instances",
        [
            (f"meridian:edge_scale_hint:ceil{{{NS}}}", "wanted {{namespace}}"),
            (f"meridian:edge_instances:count{{{NS}}}", "running {{namespace}}"),
        ],
        description="ceil(sum of each instance's load x 1.5) against the instances reporting.",
    )
    b.panel(
        "Queue depth (accepted, not answered)",
        [(f"meridian_edge_queue_depth{{{NS}}}", "{{pod}}")],
    )
    b.panel(
        "p99 over latency target",
        [(f"meridian_edge_latency_p99_over_target{{{NS}}}", "{{pod}}")],
        thresholds=[(None, "green"), (1, "red")],
    )
    b.panel(
        "Connections",
        [
            (
                f"sum by (namespace) (meridian_edge_client_connections{{{NS}}})",
                "clients {{namespace}}",
            ),
            (
                f"sum by (namespace) (meridian_edge_websocket_sessions{{{NS}}})",
                "websockets {{namespace}}",
            ),
            (
                f"sum by (namespace) (meridian_edge_process_open_fds{{{NS}}})",
                "descriptors {{namespace}}",
            ),
        ],
    )
    b.panel(
        "Config generation",
        [(f"max by (pod) (meridian_edge_config_generation{{{NS}}})", "{{pod}}")],
        kind="stat",
    )
    return b.document()


def geodns() -> dict[str, Any]:
    b = Board("meridian-geodns", "Meridian GeoDNS", "The authoritative GeoDNS servers, per POP.")
    b.row("Queries")
    b.panel("Queries/s", [(f"meridian:dns_queries:rate5m{{{NS}}}", "{{namespace}}")], unit="qps")
    b.panel(
        "Queries by rcode",
        [(f"sum by (rcode) (rate(meridian_dns_queries_total{{{NS}}}[{RATE}]))", "{{rcode}}")],
        unit="qps",
    )
    b.panel(
        "SERVFAIL ratio",
        [(f"meridian:dns_servfail:ratio_rate5m{{{NS}}}", "{{namespace}}")],
        unit="percentunit",
        thresholds=[(None, "green"), (0.001, "orange"), (0.01, "red")],
    )
    b.panel(
        "Queries by type and transport",
        [
            (
                f"sum by (qtype, transport) (rate(meridian_dns_queries_total{{{NS}}}[{RATE}]))",
                "{{qtype}} {{transport}}",
            )
        ],
        unit="qps",
    )
    b.panel(
        "Answers by POP chosen",
        [(f"sum by (target) (rate(meridian_dns_answers_total{{{NS}}}[{RATE}]))", "{{target}}")],
        unit="qps",
    )
    b.panel(
        "Answers by client country (top 10)",
        [
            (
                "topk(10, sum by (country) "
                f"(rate(meridian_dns_answers_by_country_total{{{NS}}}[{RATE}])))",
                "{{country}}",
            )
        ],
        unit="qps",
    )
    b.panel(
        "Answer time p99",
        [
            (
                "histogram_quantile(0.99, sum by (transport, le) "
                f"(rate(meridian_dns_answer_seconds_bucket{{{NS}}}[{RATE}])))",
                "{{transport}}",
            )
        ],
        unit="s",
    )
    b.row("Protection and health of the server")
    b.panel(
        "Rate and cost limited",
        [
            (f"sum(rate(meridian_dns_rate_limited_total{{{NS}}}[{RATE}]))", "rate limited"),
            (f"sum(rate(meridian_dns_cost_limited_total{{{NS}}}[{RATE}]))", "cost limited"),
            (f"sum(rate(meridian_dns_truncated_total{{{NS}}}[{RATE}]))", "truncated"),
        ],
        unit="ops",
    )
    b.panel(
        "Errors",
        [
            (f"sum(rate(meridian_dns_errors_total{{{NS}}}[{RATE}]))", "raised (SERVFAIL)"),
            (f"sum(rate(meridian_dns_send_errors_total{{{NS}}}[{RATE}]))", "send errors"),
            (f"sum(rate(meridian_dns_unanswered_total{{{NS}}}[{RATE}]))", "unanswered"),
        ],
        unit="ops",
    )
    b.panel(
        "Memo hits and ECS",
        [
            (f"sum(rate(meridian_dns_memo_hits_total{{{NS}}}[{RATE}]))", "memo hits"),
            (f"sum(rate(meridian_dns_ecs_queries_total{{{NS}}}[{RATE}]))", "with ECS"),
        ],
        unit="qps",
    )
    b.panel(
        "Config generation",
        [(f"max by (pod) (meridian_dns_config_generation{{{NS}}})", "{{pod}}")],
        kind="stat",
    )
    return b.document()


def health() -> dict[str, Any]:
    b = Board(
        "meridian-health",
        "Meridian health",
        "Health checks and passive ejection: what every POP thinks of every region and backend.",
    )
    b.panel(
        "Regions up, per POP",
        [(f"min by (pop, region) (meridian_region_up{{{NS}}})", "{{pop}} / {{region}}")],
        kind="state-timeline",
        width=24,
        thresholds=UP_DOWN,
    )
    b.panel(
        "Backends up",
        [(f"min by (region, target) (meridian_target_up{{{NS}}})", "{{region}} {{target}}")],
        kind="state-timeline",
        width=24,
        height=10,
        thresholds=UP_DOWN,
    )
    b.panel(
        "Transitions by new state",
        [
            (
                f"sum by (to) (increase(meridian_health_transitions_total{{{NS}}}[{RATE}]))",
                "{{to}}",
            )
        ],
    )
    b.panel(
        "Passive ejections",
        [
            (
                f"sum by (target) (increase(meridian_outlier_ejections_total{{{NS}}}[{RATE}]))",
                "{{target}}",
            )
        ],
    )
    b.panel(
        "Regions in panic mode",
        [(f"max by (pop, region) (meridian_region_panic{{{NS}}})", "{{pop}} / {{region}}")],
    )
    b.panel(
        "Check duration p99",
        [
            (
                "histogram_quantile(0.99, sum by (le) "
                f"(rate(meridian_health_check_seconds_bucket{{{NS}}}[{RATE}])))",
                "p99",
            )
        ],
        unit="s",
    )
    b.panel(
        "Health sharing over Redis",
        [(f"min by (pod) (meridian_health_redis_connected{{{NS}}})", "{{pod}}")],
        thresholds=UP_DOWN,
    )
    b.panel(
        "Checks not run (local errors)",
        [(f"sum(rate(meridian_health_check_local_errors_total{{{NS}}}[{RATE}]))", "local errors")],
        unit="ops",
    )
    return b.document()


def world() -> dict[str, Any]:
    b = Board(
        "meridian-world",
        "Meridian world overview",
        "Every POP and region at a glance: the first dashboard to open.",
    )
    b.panel(
        "Regions (up from any POP)",
        [("max by (region) (meridian_region_up)", "{{region}}")],
        kind="stat",
        width=24,
        height=5,
        thresholds=UP_DOWN,
    )
    b.panel(
        "Requests/s by POP",
        [("meridian:edge_requests:rate5m", "{{namespace}}")],
        unit="reqps",
        width=12,
    )
    b.panel(
        "DNS answers by POP chosen",
        [(f"sum by (target) (rate(meridian_dns_answers_total[{RATE}]))", "{{target}}")],
        unit="qps",
        width=12,
    )
    b.panel(
        "Per POP",
        [
            ("meridian:edge_requests:rate5m", "requests/s"),
            ("meridian:edge_hit_ratio:rate5m", "hit ratio"),
            ("meridian:edge_latency:p99_5m", "p99"),
            ("meridian:edge_errors:ratio_rate1h", "5xx 1h"),
            ("meridian:edge_scale_hint:ceil", "instances wanted"),
            ("meridian:edge_instances:count", "instances"),
        ],
        kind="table",
        width=24,
        height=9,
    )
    b.panel(
        "Regions down as seen by each POP",
        [("min by (pop, region) (meridian_region_up) == 0", "{{pop}} / {{region}}")],
        kind="table",
        width=12,
    )
    b.panel(
        "SERVFAIL ratio by POP",
        [("meridian:dns_servfail:ratio_rate5m", "{{namespace}}")],
        unit="percentunit",
        width=12,
    )
    return b.document(namespace=False)


DASHBOARDS = {"edge": edge, "geodns": geodns, "health": health, "world": world}


def render() -> dict[str, str]:
    """File name -> JSON text, as committed."""
    return {
        f"{name}.json": json.dumps(build(), indent=2, sort_keys=True) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main() -> int:
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
