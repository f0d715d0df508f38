"""Observability: the edge's Prometheus metrics and the aiohttp admin listener.

Endpoints: ``/metrics`` (Prometheus text), ``/healthz`` (the process answers; 503 while
draining), ``/readyz`` (at least one region up in the health snapshot), ``/readyz/<service>``
(a region of that service up: what GeoDNS checks per name), ``/status`` (JSON),
``/`` (the live status page: ``/status/events`` pushes the JSON every ``SAMPLE_EVERY`` seconds and
at once on a health change) and ``/status/public`` (per service state, uptime and latency: HTML
for browsers, JSON otherwise).  The pages are files of this package, inline CSS and JS only.
With ``--workers N`` the listener is worker 0's, and ``/metrics`` and ``/status`` include the
other workers too (``meridian.workers``: every sample then carries a ``worker`` label).
The cache's purge endpoint is added at integration through ``AdminServer.app`` (a route added
before ``start()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from edge.statusboard import (
    CACHE_FOUND,
    SAMPLE_EVERY,
    StatusBoard,
    TrafficSample,
    combine_traffic,
)
from meridian.workers import WorkerPeers

#: Event streams open at once on the admin listener; more are refused (the page then polls).
MAX_EVENT_STREAMS = 32

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class _Histogram:
    """One label's latency histogram as plain numbers: counts per bucket (last: +Inf), then
    the sum of seconds."""

    __slots__ = ("_bounds", "labels", "values")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        #: Bucket label values, ``le`` of each count in ``values``.
        self.labels = (*(repr(float(b)) for b in bounds), "+Inf")
        self.values = [0.0] * (len(bounds) + 2)

    def observe(self, seconds: float) -> None:
        values = self.values
        values[bisect_left(self._bounds, seconds)] += 1
        values[-1] += seconds

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = 0.0
        out = []
        for label, count in zip(self.labels, self.values, strict=False):
            cumulative += count
            out.append((label, cumulative))
        return out


class RequestStats(Collector):
    """``meridian_edge_requests_total``, ``meridian_edge_request_duration_seconds`` and
    ``meridian_edge_requests_over_latency_target_total`` as plain integers: ``observe`` is a
    dict update and a bisect (under a microsecond), where prometheus_client's labelled
    Counter and Histogram cost about three per request, a tenth of a cache hit."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self._bounds = buckets
        self._counts: dict[tuple[str, int, str, str], int] = {}
        self._durations: dict[str, _Histogram] = {}
        self._over: dict[str, int] = {}

    def observe(
        self, route: str, status: int, cache: str, region: str, seconds: float, target: float
    ) -> None:
        key = (route, status, cache, region)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        durations = self._durations.get(route)
        if durations is None:
            durations = self._durations[route] = _Histogram(self._bounds)
        values = durations.values  # _Histogram.observe, inlined: this runs on every hit
        values[bisect_left(self._bounds, seconds)] += 1
        values[-1] += seconds
        if seconds > target:
            self._over[route] = self._over.get(route, 0) + 1

    def traffic(self, at: float, errors: Mapping[str, float]) -> TrafficSample:
        """The cumulative counters as one sample for the status page's window."""
        requests = found = missed = 0
        routes: dict[str, int] = {}
        for (route, _status, cache, _region), count in self._counts.items():
            requests += count
            routes[route] = routes.get(route, 0) + count
            if cache in CACHE_FOUND:
                found += count
            elif cache == "MISS":
                missed += count
        buckets = [0] * (len(self._bounds) + 1)
        for durations in self._durations.values():
            for index, observed in enumerate(durations.values[:-1]):
                buckets[index] += int(observed)
        return TrafficSample(
            at, requests, found, missed, tuple(buckets), self._bounds, dict(errors), routes
        )

    def route_latency(self) -> dict[str, tuple[float, int]]:
        """Per route: cumulative seconds and requests."""
        return {
            route: (durations.values[-1], int(sum(durations.values[:-1])))
            for route, durations in self._durations.items()
        }

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "meridian_edge_requests",
            "Requests answered, by route, status, cache status and region.",
            labels=["route", "status", "cache", "region"],
        )
        for (route, status, cache, region), value in sorted(self._counts.items()):
            requests.add_metric([route, str(status), cache, region], value)
        yield requests
        histogram = HistogramMetricFamily(
            "meridian_edge_request_duration_seconds",
            "Client-side latency: request head received to last response byte written.",
            labels=["route"],
        )
        for route, durations in sorted(self._durations.items()):
            histogram.add_metric([route], durations.buckets(), durations.values[-1])
        yield histogram
        over = CounterMetricFamily(
            "meridian_edge_requests_over_latency_target",
            "Requests slower than edge.latency_target.",
            labels=["route"],
        )
        for route, value in sorted(self._over.items()):
            over.add_metric([route], value)
        yield over

    def describe(self) -> Iterable[Metric]:
        return []


class UpstreamStats(Collector):
    """What the request path counts per upstream attempt and per request, as plain numbers
    (prometheus_client's labelled Histogram and Gauge cost a few microseconds per call, with a
    lock each): ``meridian_edge_upstream_duration_seconds{region}``,
    ``meridian_edge_in_flight_requests`` and, read at scrape time,
    ``meridian_edge_upstream_active_requests{backend}``."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self._bounds = buckets
        self._durations: dict[str, _Histogram] = {}
        #: Requests being handled off the fast path (the request queue depth).
        self.in_flight = 0
        #: Requests in flight per backend, read on scrape (``UpstreamPool.outstanding``).
        self.outstanding: Callable[[], Mapping[str, int]] | None = None

    def observe_upstream(self, region: str, seconds: float) -> None:
        durations = self._durations.get(region)
        if durations is None:
            durations = self._durations[region] = _Histogram(self._bounds)
        values = durations.values  # _Histogram.observe, inlined: once per upstream attempt
        values[bisect_left(self._bounds, seconds)] += 1
        values[-1] += seconds

    def collect(self) -> Iterable[Metric]:
        histogram = HistogramMetricFamily(
            "meridian_edge_upstream_duration_seconds",
            "Upstream-side latency: attempt start to response head, per region.",
            labels=["region"],
        )
        for region, durations in sorted(self._durations.items()):
            histogram.add_metric([region], durations.buckets(), durations.values[-1])
        yield histogram
        yield GaugeMetricFamily(
            "meridian_edge_in_flight_requests",
            "Requests being handled (the request queue depth autoscaling watches).",
            value=self.in_flight,
        )
        active = GaugeMetricFamily(
            "meridian_edge_upstream_active_requests",
            "Requests in flight per backend (each holds one pooled connection).",
            labels=["backend"],
        )
        if self.outstanding is not None:
            for backend, value in sorted(self.outstanding().items()):
                active.add_metric([backend], value)
        yield active

    def describe(self) -> Iterable[Metric]:
        return []


class EdgeMetrics:
    """Every edge metric, registered in the registry handed in (one per process)."""

    def __init__(self, registry: CollectorRegistry, *, pop: str, latency_target: float) -> None:
        self.registry = registry
        #: Requests, their latency histogram and the over-target count: plain integers bumped
        #: on every request (a cache hit included), turned into Prometheus families on scrape.
        self.request_stats = RequestStats()
        registry.register(self.request_stats)
        #: Upstream latency, requests in flight and per-backend activity: plain numbers too.
        self.upstream_stats = UpstreamStats()
        registry.register(self.upstream_stats)
        self.connections = Gauge(
            "meridian_edge_client_connections", "Open client connections.", registry=registry
        )
        self.retries = Counter(
            "meridian_edge_retries",
            "Attempts repeated on another backend after a failure.",
            ("service",),
            registry=registry,
        )
        self.failovers = Counter(
            "meridian_edge_failovers",
            "Attempts moved to another region than the first choice.",
            ("service", "from_region", "to_region"),
            registry=registry,
        )
        self.upstream_failures = Counter(
            "meridian_edge_upstream_failures",
            "Upstream attempts without a response head, by region and kind.",
            ("region", "kind"),
            registry=registry,
        )
        self.errors = Counter(
            "meridian_edge_errors",
            "Responses generated by the edge itself, by status and reason.",
            ("status", "reason"),
            registry=registry,
        )
        self.upstream_pool_limit = Gauge(
            "meridian_edge_upstream_pool_limit",
            "Connection pool bound per backend.",
            registry=registry,
        )
        self.latency_target = Gauge(
            "meridian_edge_latency_target_seconds",
            "Latency objective (edge.latency_target) exported for autoscaling.",
            registry=registry,
        )
        self.websockets = Gauge(
            "meridian_edge_websocket_sessions", "Open WebSocket tunnels.", registry=registry
        )
        self.config_generation = Gauge(
            "meridian_edge_config_generation", "Config snapshot in force.", registry=registry
        )
        # CPU seconds and resident memory: the autoscaling signals for this process.
        ProcessCollector(namespace="meridian_edge", registry=registry)
        self.latency_target.set(latency_target)
        self.pop = pop
        self.observe_request = self.request_stats.observe

    def error_counts(self) -> dict[str, float]:
        """Edge-generated responses so far, by "status reason"."""
        out: dict[str, float] = {}
        for family in self.errors.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = f"{sample.labels['status']} {sample.labels['reason']}"
                    out[key] = sample.value
        return out


class AdminServer:
    """The admin listener; ``status`` and ``ready`` are read at request time."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        status: Callable[[], dict[str, Any]],
        ready: Callable[[], bool],
        draining: Callable[[], bool],
        peers: WorkerPeers | None = None,
        board: StatusBoard | None = None,
        service_ready: Callable[[str], bool | None] | None = None,
    ) -> None:
        """``service_ready(name)``: whether a healthy region serves that edge service (None
        for a service the edge does not know), for ``/readyz/<service>``."""
        self.registry = registry
        self._status = status
        #: The public page's data; None serves it without uptime (a bare listener in tests).
        self._board = board
        #: One event per open ``/status/events`` stream, set to push the status at once.
        self._streams: set[asyncio.Event] = set()
        self._closing = False
        self._ready = ready
        self._service_ready = service_ready
        self._draining = draining
        #: Worker 0 of ``--workers N``: /metrics and /status speak for every worker.
        self._peers = peers
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/readyz/{service}", self._service_readyz)
        self.app.router.add_get("/status", self._status_handler)
        self.app.router.add_get("/", self._page)
        self.app.router.add_get("/status/events", self._events)
        self.app.router.add_get("/status/public", self._public)
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, *, sock: socket.socket | None = None) -> None:
        """Listen on ``host:port``, or on ``sock`` when the supervisor bound it already."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(self._runner, sock)
        else:
            site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()

    def notify(self) -> None:
        """Something changed (a health transition): every event stream sends the status now."""
        for event in self._streams:
            event.set()

    async def stop(self) -> None:
        # Open event streams would otherwise hold the runner's cleanup for its whole timeout.
        self._closing = True
        self.notify()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        if self._peers is not None:
            body = await self._peers.metrics(body)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        if self._draining():
            return web.Response(status=503, text="draining\n")
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._draining():
            return web.Response(status=503, text="draining\n")
        if self._ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="no region up\n")

    async def _service_readyz(self, request: web.Request) -> web.Response:
        """Ready for one service: GeoDNS stops answering this POP for the service's names
        while this says 503 (its edge has no healthy region left for it)."""
        if self._draining():
            return web.Response(status=503, text="draining\n")
        ready = self._service_ready(request.match_info["service"]) if self._service_ready else None
        if ready is None:
            return web.Response(status=404, text="no such service\n")
        if ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="no region up for the service\n")

    async def _document(self) -> dict[str, Any]:
        document = self._status()
        if self._peers is not None:
            workers = await self._peers.statuses()
            document["workers"] = {str(slot): workers[slot] for slot in sorted(workers)}
            # The page's traffic is the process group's: this worker's window plus each
            # sibling's that answered (``worker_traffic`` keeps this worker's own).
            own = document.get("traffic")
            if isinstance(own, dict):
                siblings = [w.get("traffic") for w in workers.values()]
                document["worker_traffic"] = own
                document["traffic"] = combine_traffic(
                    [own, *(t for t in siblings if isinstance(t, dict))]
                )
        return document

    async def _status_handler(self, request: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(await self._document(), default=str, indent=1),
            content_type="application/json",
        )

    async def _page(self, request: web.Request) -> web.Response:
        return _html("status.html")

    async def _public(self, request: web.Request) -> web.Response:
        if "text/html" in request.headers.get("Accept", ""):
            return _html("public.html")
        document = self._board.public() if self._board is not None else {"services": {}}
        return web.Response(
            text=json.dumps(document, indent=1),
            content_type="application/json",
            headers={"Cache-Control": "no-store", "Access-Control-Allow-Origin": "*"},
        )

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if len(self._streams) >= MAX_EVENT_STREAMS or self._closing:
            return web.Response(status=503, text="too many status streams\n")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        changed = asyncio.Event()
        self._streams.add(changed)
        try:
            while not self._closing:
                changed.clear()
                data = json.dumps(await self._document(), default=str)
                await response.write(f"data: {data}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), SAMPLE_EVERY)
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self._streams.discard(changed)
        return response


def _html(name: str) -> web.Response:
    # Read per request: a few kilobytes, and an edited page shows without a restart in dev.
    body = resources.files("edge").joinpath("pages", name).read_text(encoding="utf-8")
    return web.Response(
        text=body,
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            # Inline script and style only: nothing may be fetched from outside the listener.
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; img-src data:",
            "X-Content-Type-Options": "nosniff",
        },
    )
