"""What the status pages show beyond ``/status``: traffic over a sliding window and per-service
availability over the last hour and day.  Pure numbers on an injected clock; the edge samples
them on a timer every ``SAMPLE_EVERY`` seconds (never on a request: many open pages must not
shorten the window), so memory is bounded by ``TrafficWindow.keep`` samples and
``Availability``'s one bucket per minute for a day, per service.  Both live in memory: a restart
starts the uptime history again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Seconds between two samples of the board (the page polls every 2 s too).
SAMPLE_EVERY = 2.0
#: Cache labels that found the response stored (hit ratio = these / these + MISS).
CACHE_FOUND = frozenset({"HIT", "STALE", "REVALIDATED"})
#: Busiest routes a summary lists, and those whose counts it carries for adding up workers.
TOP_ROUTES = 5
COUNTED_ROUTES = 32
#: Error causes and latency buckets read from a sibling worker's summary (bounded input).
_MAX_CAUSES = 64
_MAX_BUCKETS = 64


@dataclass(frozen=True, slots=True)
class TrafficSample:
    """Monotonic counters read at ``at``; two samples make a rate."""

    at: float
    requests: int
    #: Responses found in the cache (HIT, STALE, REVALIDATED) and looked up but not (MISS).
    found: int
    missed: int
    #: Requests per latency bucket (not cumulative), the last one +Inf; ``bounds`` their edges.
    buckets: tuple[int, ...]
    bounds: tuple[float, ...]
    #: Responses the edge generated itself, by "status reason".
    errors: Mapping[str, float] = field(default_factory=dict)
    #: Requests per route.
    routes: Mapping[str, int] = field(default_factory=dict)


def quantile(q: float, buckets: Sequence[float], bounds: Sequence[float]) -> float | None:
    """The ``q`` quantile of a histogram (counts per bucket, last +Inf), interpolated linearly
    inside its bucket as Prometheus's histogram_quantile does; None without observations.
    A quantile in the +Inf bucket reads as the last finite bound."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index >= len(bounds):
                return bounds[-1] if bounds else None
            lower = bounds[index - 1] if index > 0 else 0.0
            return lower + (bounds[index] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1] if bounds else None


class TrafficWindow:
    """Rates over the last ``window`` seconds from cumulative samples (at most ``keep``)."""

    def __init__(self, *, window: float = 60.0, keep: int = 64) -> None:
        self.window = window
        self._samples: deque[TrafficSample] = deque(maxlen=keep)

    def add(self, sample: TrafficSample) -> None:
        samples = self._samples
        samples.append(sample)
        # Keep one sample at or beyond the window's start, so a rate always spans it.
        while len(samples) > 2 and samples[1].at <= sample.at - self.window:
            samples.popleft()

    def __len__(self) -> int:
        return len(self._samples)

    def summary(self) -> dict[str, Any]:
        """requests/s, hit ratio, p50/p99 (seconds), errors by cause and the busiest routes,
        between the oldest and newest sample; zeros and None before two samples."""
        if len(self._samples) < 2:
            return {
                "window": 0.0,
                "requests_per_second": 0.0,
                "hit_ratio": None,
                "p50": None,
                "p99": None,
                "errors": {},
                "top_routes": [],
                "counts": _counts(0.0, 0, 0, 0, [], (), {}),
            }
        first, last = self._samples[0], self._samples[-1]
        span = max(last.at - first.at, 1e-9)
        found = last.found - first.found
        looked_up = found + last.missed - first.missed
        if len(first.buckets) == len(last.buckets):
            delta = [b - a for a, b in zip(first.buckets, last.buckets, strict=True)]
        else:
            delta = list(last.buckets)
        errors = {
            cause: value - first.errors.get(cause, 0.0)
            for cause, value in last.errors.items()
            if value - first.errors.get(cause, 0.0) > 0
        }
        routes = {
            route: count - first.routes.get(route, 0)
            for route, count in last.routes.items()
            if count - first.routes.get(route, 0) > 0
        }
        ranked = sorted(routes.items(), key=lambda item: (-item[1], item[0]))
        top = ranked[:TOP_ROUTES]
        return {
            "window": round(span, 3),
            "requests_per_second": round((last.requests - first.requests) / span, 3),
            "hit_ratio": round(found / looked_up, 4) if looked_up > 0 else None,
            "p50": quantile(0.5, delta, last.bounds),
            "p99": quantile(0.99, delta, last.bounds),
            "errors": errors,
            "top_routes": [{"route": r, "per_second": round(n / span, 3)} for r, n in top],
            "counts": _counts(
                span,
                last.requests - first.requests,
                found,
                looked_up,
                delta,
                last.bounds,
                {r: n / span for r, n in ranked[:COUNTED_ROUTES]},
            ),
        }


def _counts(
    span: float,
    requests: int,
    found: int,
    looked_up: int,
    buckets: Sequence[int],
    bounds: Sequence[float],
    route_rates: Mapping[str, float],
) -> dict[str, Any]:
    """A summary's raw numbers over its window: what :func:`combine_traffic` adds up."""
    return {
        "seconds": round(span, 3),
        "requests": requests,
        "found": found,
        "looked_up": looked_up,
        "buckets": list(buckets),
        "bounds": list(bounds),
        "route_rates": dict(route_rates),
    }


def _number(value: object) -> float:
    """A finite, non-negative number from a sibling's JSON, else 0 (bool is no number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if 0.0 <= value < float("inf") else 0.0


def combine_traffic(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The summary of several workers' windows (``--workers N``): requests/s, route rates and
    errors add up; the hit ratio is all hits over all lookups; p50/p99 come from the sum of
    the latency histograms (workers share the bucket bounds; a summary with other bounds is
    left out of the quantiles).  Each worker samples on its own timer, so the windows end up
    to ``SAMPLE_EVERY`` seconds apart: rates are each worker's over its own window, added.

    The summaries are siblings' JSON: anything malformed counts as zero, and what is read is
    bounded (``_MAX_CAUSES`` causes, ``_MAX_BUCKETS`` buckets, ``COUNTED_ROUTES`` routes)."""
    rps = 0.0
    found = looked_up = requests = 0
    seconds = 0.0
    buckets: list[int] = []
    bounds: list[float] | None = None
    errors: dict[str, float] = {}
    route_rates: dict[str, float] = {}
    for summary in summaries:
        counts = summary.get("counts")
        if not isinstance(counts, Mapping):
            continue
        rps += _number(summary.get("requests_per_second"))
        seconds = max(seconds, _number(counts.get("seconds")))
        requests += int(_number(counts.get("requests")))
        found += int(_number(counts.get("found")))
        looked_up += int(_number(counts.get("looked_up")))
        these = counts.get("buckets")
        edges = counts.get("bounds")
        if isinstance(these, list) and isinstance(edges, list) and len(these) <= _MAX_BUCKETS:
            edges = [_number(b) for b in edges[:_MAX_BUCKETS]]
            if bounds is None and any(these):
                bounds = edges
                buckets = [0] * len(these)
            if bounds == edges and len(these) == len(buckets):
                buckets = [a + int(_number(b)) for a, b in zip(buckets, these, strict=True)]
        causes = summary.get("errors")
        if isinstance(causes, Mapping):
            for cause, value in list(causes.items())[:_MAX_CAUSES]:
                if isinstance(cause, str) and (cause in errors or len(errors) < _MAX_CAUSES):
                    errors[cause] = errors.get(cause, 0.0) + _number(value)
        rates = counts.get("route_rates")
        if isinstance(rates, Mapping):
            for route, rate in list(rates.items())[:COUNTED_ROUTES]:
                if isinstance(route, str):
                    route_rates[route] = route_rates.get(route, 0.0) + _number(rate)
    edges_used = tuple(bounds or ())
    ranked = sorted(route_rates.items(), key=lambda item: (-item[1], item[0]))
    return {
        "window": round(seconds, 3),
        "requests_per_second": round(rps, 3),
        "hit_ratio": round(found / looked_up, 4) if looked_up > 0 else None,
        "p50": quantile(0.5, buckets, edges_used),
        "p99": quantile(0.99, buckets, edges_used),
        "errors": errors,
        "top_routes": [{"route": r, "per_second": round(n, 3)} for r, n in ranked[:TOP_ROUTES]],
        "counts": _counts(
            seconds,
            requests,
            found,
            looked_up,
            buckets,
            edges_used,
            dict(ranked[:COUNTED_ROUTES]),
        ),
        "workers": sum(1 for s in summaries if isinstance(s.get("counts"), Mapping)),
    }


@dataclass(slots=True)
class _Minute:
    minute: int
    samples: int = 0
    up: int = 0
    degraded: int = 0
    latency_sum: float = 0.0
    latency_count: int = 0


class Availability:
    """Per service: state samples and mean latency in one bucket per minute, for a day.

    Uptime over a span is the share of samples in it that were not down (degraded counts as
    up: users are served); latency is the mean request latency.  A service keeps at most
    ``minutes`` buckets, so memory is bounded by services x a day's minutes.
    """

    def __init__(self, clock: Callable[[], float], *, minutes: int = 24 * 60) -> None:
        self._clock = clock
        self._minutes = minutes
        self._series: dict[str, deque[_Minute]] = {}

    def _bucket(self, service: str) -> _Minute:
        minute = int(self._clock() // 60)
        series = self._series.get(service)
        if series is None:
            series = self._series[service] = deque(maxlen=self._minutes)
        if not series or series[-1].minute != minute:
            series.append(_Minute(minute))
        return series[-1]

    def record(self, service: str, state: str) -> None:
        """``state`` is up, degraded or down."""
        bucket = self._bucket(service)
        bucket.samples += 1
        bucket.up += state != "down"
        bucket.degraded += state == "degraded"

    def latency(self, service: str, seconds: float, count: int) -> None:
        """``count`` requests took ``seconds`` in all."""
        if count <= 0:
            return
        bucket = self._bucket(service)
        bucket.latency_sum += seconds
        bucket.latency_count += count

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the series of services no longer configured."""
        kept = set(keep)
        for service in [s for s in self._series if s not in kept]:
            del self._series[service]

    def over(self, service: str, seconds: float) -> dict[str, float | None]:
        """Uptime (0..1) and mean latency over the last ``seconds``; None without data."""
        since = int((self._clock() - seconds) // 60)
        samples = up = count = 0
        total = 0.0
        for bucket in self._series.get(service, ()):
            if bucket.minute > since:
                samples += bucket.samples
                up += bucket.up
                total += bucket.latency_sum
                count += bucket.latency_count
        return {
            "uptime": round(up / samples, 5) if samples else None,
            "latency": total / count if count else None,
        }


def service_state(regions: Sequence[str], region_up: Callable[[str], bool]) -> str:
    """up when every region of the service can serve, down when none can, else degraded."""
    up = sum(1 for region in regions if region_up(region))
    if regions and up == len(regions):
        return "up"
    return "down" if up == 0 else "degraded"


class StatusBoard:
    """Samples traffic and service availability (``sample``, every ``SAMPLE_EVERY`` seconds)
    and answers the status pages.

    ``traffic`` reads the cumulative counters; ``services`` maps each service to its regions;
    ``route_latency`` gives per-route cumulative (seconds, count) and ``route_service`` the
    service of each route, so a service's latency is its routes' requests.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        traffic: Callable[[], TrafficSample],
        services: Callable[[], Mapping[str, Sequence[str]]],
        region_up: Callable[[str], bool],
        route_latency: Callable[[], Mapping[str, tuple[float, int]]],
        route_service: Callable[[], Mapping[str, str]],
    ) -> None:
        self._clock = clock
        self._traffic = traffic
        self._services = services
        self._region_up = region_up
        self._route_latency = route_latency
        self._route_service = route_service
        self.window = TrafficWindow()
        self.availability = Availability(clock)
        self._last_latency: dict[str, tuple[float, int]] = {}

    def sample(self) -> None:
        self.window.add(self._traffic())
        services = self._services()
        for service, regions in services.items():
            self.availability.record(service, service_state(regions, self._region_up))
        self.availability.forget(services)
        owners = self._route_service()
        latencies = self._route_latency()
        for gone in [route for route in self._last_latency if route not in latencies]:
            del self._last_latency[gone]  # bounded by the routes that exist
        for route, (seconds, count) in latencies.items():
            before = self._last_latency.get(route, (0.0, 0))
            self._last_latency[route] = (seconds, count)
            owner = owners.get(route)
            if owner is not None:
                self.availability.latency(owner, seconds - before[0], count - before[1])

    def public(self) -> dict[str, Any]:
        """Per service: state now, uptime and mean latency over the last hour and day."""
        out: dict[str, Any] = {}
        for service, regions in sorted(self._services().items()):
            out[service] = {
                "state": service_state(regions, self._region_up),
                "hour": self.availability.over(service, 3600.0),
                "day": self.availability.over(service, 86400.0),
            }
        return {"services": out}
