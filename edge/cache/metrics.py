"""The cache's metrics: plain integers bumped on the hot path (``l1_hits += 1``), turned into
Prometheus families only when the registry is scraped."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .purging import Purges
from .redis_l2 import RedisL2
from .store import MemoryStore


class Gauged(Protocol):
    """What the gauges read on scrape (``HttpCache``)."""

    @property
    def store(self) -> MemoryStore: ...

    @property
    def purges(self) -> Purges: ...

    @property
    def l2(self) -> RedisL2 | None: ...


class CacheMetrics(Collector):
    """Plain integers bumped on the hot path, turned into Prometheus families on scrape."""

    def __init__(self, cache: Gauged) -> None:
        self._cache = cache
        self.l1_hits = 0
        self.l2_hits = 0
        self.coalesced_hits = 0
        self.misses = 0
        self.stale: dict[str, int] = {}
        self.bypass: dict[str, int] = {}
        self.coalesced_waiters = 0
        self.redis_errors: dict[str, int] = {}
        self.purge_retries = 0

    @property
    def hits(self) -> dict[str, int]:
        return {"l1": self.l1_hits, "l2": self.l2_hits, "coalesced": self.coalesced_hits}

    def count_stale(self, reason: str) -> None:
        self.stale[reason] = self.stale.get(reason, 0) + 1

    def count_bypass(self, reason: str) -> None:
        self.bypass[reason] = self.bypass.get(reason, 0) + 1

    def count_redis_error(self, reason: str) -> None:
        self.redis_errors[reason] = self.redis_errors.get(reason, 0) + 1

    def count_waiter(self) -> None:
        self.coalesced_waiters += 1

    def count_purge_retry(self) -> None:
        self.purge_retries += 1

    def collect(self) -> Iterable[Metric]:
        store = self._cache.store
        yield _labelled(
            CounterMetricFamily(
                "meridian_cache_hits", "Requests served fresh from the cache.", labels=["layer"]
            ),
            self.hits,
        )
        yield CounterMetricFamily(
            "meridian_cache_misses", "Requests that needed an upstream fetch.", value=self.misses
        )
        yield _labelled(
            CounterMetricFamily(
                "meridian_cache_stale_served", "Stale responses served.", labels=["reason"]
            ),
            self.stale,
        )
        yield _labelled(
            CounterMetricFamily(
                "meridian_cache_bypass", "Requests not handled by the cache.", labels=["reason"]
            ),
            self.bypass,
        )
        yield CounterMetricFamily(
            "meridian_cache_coalesced_waiters",
            "Requests that waited for another request's upstream fetch.",
            value=self.coalesced_waiters,
        )
        yield CounterMetricFamily(
            "meridian_cache_evictions", "L1 entries evicted for space.", value=store.evictions
        )
        yield _labelled(
            CounterMetricFamily(
                "meridian_cache_redis_errors", "Redis calls failed or timed out.", labels=["reason"]
            ),
            self.redis_errors,
        )
        yield GaugeMetricFamily("meridian_cache_bytes", "Bytes held by L1.", value=store.bytes)
        yield GaugeMetricFamily(
            "meridian_cache_purges_pending",
            "Purges Redis has not taken yet (stalled or down), retried with backoff.",
            value=len(self._cache.purges.backlog),
        )
        yield CounterMetricFamily(
            "meridian_cache_purge_retries",
            "Attempts to apply pending purges to Redis.",
            value=self.purge_retries,
        )
        yield GaugeMetricFamily("meridian_cache_entries", "Entries held by L1.", value=len(store))
        hits = sum(self.hits.values())
        lookups = hits + self.misses
        yield GaugeMetricFamily(
            "meridian_cache_hit_ratio",
            "Fresh hits over hits plus misses since start.",
            value=hits / lookups if lookups else 0.0,
        )
        l2 = self._cache.l2
        yield GaugeMetricFamily(
            "meridian_cache_redis_circuit_open",
            "1 while Redis is being skipped after repeated errors.",
            value=1.0 if l2 is not None and not l2.available else 0.0,
        )

    def describe(self) -> Iterable[Metric]:
        return []  # families are dynamic; registering must not call collect() early


def _labelled(family: CounterMetricFamily, values: dict[str, int]) -> CounterMetricFamily:
    for label, value in sorted(values.items()):
        family.add_metric([label], value)
    return family


__all__ = ["CacheMetrics", "Gauged"]
