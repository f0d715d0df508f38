"""Prometheus metrics of the health engine, registered once per registry."""

from __future__ import annotations

from dataclasses import dataclass
from weakref import WeakKeyDictionary

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

CHECK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class HealthMetrics:
    target_up: Gauge
    region_up: Gauge
    region_panic: Gauge
    transitions: Counter
    check_seconds: Histogram
    ejections: Counter
    redis_connected: Gauge
    check_local_errors: Counter


# Registering a name twice in one registry raises; two monitors sharing a registry (GeoDNS and
# the edge in one process) share these instead.  Their label values keep them apart only when
# they watch different targets, so one monitor per process is the better arrangement.
_BY_REGISTRY: WeakKeyDictionary[CollectorRegistry, HealthMetrics] = WeakKeyDictionary()


def metrics_for(registry: CollectorRegistry) -> HealthMetrics:
    found = _BY_REGISTRY.get(registry)
    if found is None:
        found = HealthMetrics(
            target_up=Gauge(
                "meridian_target_up",
                "1 when the target may receive traffic (up, or unknown before its first check)",
                ["target", "region", "pop"],
                registry=registry,
            ),
            region_up=Gauge(
                "meridian_region_up",
                "1 when at least min_healthy backends of the region are usable",
                ["region", "pop"],
                registry=registry,
            ),
            region_panic=Gauge(
                "meridian_region_panic",
                "1 when the region's pool spreads over all backends (too few healthy)",
                ["region", "pop"],
                registry=registry,
            ),
            transitions=Counter(
                "meridian_health_transitions",
                "Target state changes, by new state",
                ["target", "to"],
                registry=registry,
            ),
            check_seconds=Histogram(
                "meridian_health_check_seconds",
                "Duration of active health checks",
                ["target"],
                buckets=CHECK_BUCKETS,
                registry=registry,
            ),
            ejections=Counter(
                "meridian_outlier_ejections",
                "Targets ejected by passive outlier detection",
                ["target"],
                registry=registry,
            ),
            # Labelled by channel so that a process without Redis exports no misleading 0.
            redis_connected=Gauge(
                "meridian_health_redis_connected",
                "1 while health sharing through Redis is connected",
                ["channel"],
                registry=registry,
            ),
            check_local_errors=Counter(
                "meridian_health_check_local_errors",
                "Active checks that could not run for want of a local resource (EMFILE, "
                "ENFILE, ENOBUFS, ...): no evidence about the target, its state is kept",
                ["target"],
                registry=registry,
            ),
        )
        _BY_REGISTRY[registry] = found
    return found
