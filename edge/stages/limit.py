"""The limit stage: ``edge.rate_limits`` enforced on every routed request, cache hits included.

The hit stage asks ``RateLimits.check`` before it answers from the cache (``fast_response``,
``replay_hit``), the pipeline before anything else on the slow path (``refused``), a WebSocket
handshake before it connects upstream (``answer``), so a client over its rate is answered
``429`` at the edge: never forwarded, never served from the cache.  The answer is the edge's
usual small JSON error with ``Retry-After`` and the IETF httpapi ``RateLimit-Policy`` /
``RateLimit`` fields (draft-ietf-httpapi-ratelimit-headers: the policy's quota ``q`` is its
burst, its window ``w`` the seconds a burst takes to come back; ``r`` what remains, ``t`` the
seconds until the next request would be admitted).  They are sent on refusals only: adding
them to every hit would rebuild the cache's prebuilt bytes.

The limits' state is the stage's, not the config snapshot's: on reload a limit whose config
is unchanged keeps its table of keys (``RateLimits.build``), so a reload never hands every
client a fresh burst.  A refusal is logged at most once per key per ``LOG_INTERVAL``, with
the count it stands for; outcomes are counted per limit and route
(``meridian_edge_rate_limit_requests_total``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.exchange import Exchange, ProxyRequest
from edge.fdlimit import LOG_INTERVAL
from edge.http1 import Headers, error_response
from edge.ratelimit import RateLimits, Refusal
from edge.ratelimit_redis import SharedLimits
from edge.stages.services import EdgeServices
from edge.state import EdgeState
from meridian.log import get_logger
from meridian.redis_conn import RedisTarget

log = get_logger("edge")

REASON: Final = "rate_limited"
#: The route name of a request no route matched (``ExchangeRecord.route``'s default).
NO_ROUTE: Final = "-"
_OUTCOMES: Final = ("allowed", "limited", "would_limit", "exempt")


class Limiter:
    """The rate limits of the worker, rebuilt when the config snapshot changes."""

    __slots__ = ("_closing", "limits", "services", "shared", "state")

    def __init__(self, services: EdgeServices) -> None:
        self.services = services
        #: The snapshot ``limits`` was built for, and the limits (None: none configured).
        self.state: EdgeState | None = None
        self.limits: RateLimits | None = None
        #: The shared limits' Redis side (None: no limit is shared).
        self.shared: SharedLimits | None = None
        self._closing: asyncio.Task[None] | None = None
        services.metrics.registry.register(RateLimitStats(self))

    async def aclose(self) -> None:
        """Release the shared limits' Redis connections."""
        if self.shared is not None:
            await self.shared.aclose()
            self.shared = None

    def current(self, state: EdgeState) -> RateLimits | None:
        """The limits of snapshot ``state`` (built when the edge installs it, else on its first
        request; a reload keeps the tables of unchanged limits)."""
        if state is not self.state:
            edge = state.config.edge
            self.limits = RateLimits.build(
                edge.rate_limits,
                # "-": requests no route matched (a limit on every route counts them too).
                {**{route.name: route.service for route in edge.routes}, NO_ROUTE: ""},
                state.trusted_proxies,
                previous=self.limits,
            )
            self.state = state
            self._share(state)
        return self.limits

    def _share(self, state: EdgeState) -> None:
        """The Redis side for the shared limits of ``state`` (kept while its target holds)."""
        cache = state.config.edge.cache
        target = RedisTarget.from_config(cache)
        wanted = target is not None and any(limit.shared for limit in state.config.edge.rate_limits)
        shared = self.shared
        if shared is not None and (not wanted or shared.target != target):
            # Closed in the background: a reload is not a request to wait on.
            self._closing = asyncio.get_running_loop().create_task(shared.aclose())
            self.shared = shared = None
        if wanted and shared is None and target is not None:
            self.shared = SharedLimits(target, timeout=cache.redis_timeout)
            self.shared.start()

    def shares(self, exchange: Exchange) -> bool:
        """Whether the exchange's route has a shared limit (``refused_shared`` decides it)."""
        limits = self.current(exchange.state)
        return limits is not None and exchange.record.route in limits.shared_routes

    async def refused_shared(self, exchange: Exchange) -> bool:
        """``refused`` for the shared limits (a Redis round trip; local while Redis cannot)."""
        limits, shared = self.current(exchange.state), self.shared
        if limits is None or shared is None:
            return False
        request = exchange.request
        now = request.received_at
        route = exchange.record.route
        refusal = await shared.check(limits, route, request.client_ip, request.headers, now)
        return self._send(exchange, self._refusal(exchange.state, route, request, refusal))

    def refused(self, exchange: Exchange) -> bool:
        """The slow path's check, once the route is known: True when the request was answered
        429 (through the sink; the pipeline accounts it as usual)."""
        return self._send(
            exchange, self.answer(exchange.state, exchange.record.route, exchange.request)
        )

    @staticmethod
    def _send(exchange: Exchange, wire: bytes | None) -> bool:
        if wire is None:
            return False
        record = exchange.record
        record.status = 429
        record.cache = "BYPASS"
        exchange.sink.write_complete(wire, close=not exchange.request.keep_alive)
        return True

    def answer(
        self, state: EdgeState, route: str, request: ProxyRequest, *, close: bool = False
    ) -> bytes | None:
        """Check ``request`` on ``route``: the 429's bytes when a limit refuses it, else None
        (admitted; a dry run's would-be refusal is logged).  ``close``: the connection ends
        after the answer (a WebSocket handshake's)."""
        limits = self.current(state)
        if limits is None:
            return None
        refusal = limits.check(route, request.client_ip, request.headers, request.received_at)
        return self._refusal(state, route, request, refusal, close=close)

    def _refusal(
        self,
        state: EdgeState,
        route: str,
        request: ProxyRequest,
        refusal: Refusal | None,
        *,
        close: bool = False,
    ) -> bytes | None:
        if refusal is None:
            return None
        now = request.received_at
        self.note(refusal, route, now)
        if refusal.rule.dry_run:
            return None
        self.services.metrics.errors.labels("429", REASON).inc()
        return self.response(
            state,
            refusal,
            request.request_id,
            now,
            keep_alive=request.keep_alive and not close,
            head_only=request.method == "HEAD",
        )

    def check_hit(
        self, limits: RateLimits, state: EdgeState, route: str, request: ProxyRequest
    ) -> bytes | None:
        """``refuse_hit``'s bytes when ``request``'s client is over its rate on ``route``,
        else None (the hit is served)."""
        refusal = limits.check(route, request.client_ip, request.headers, request.received_at)
        if refusal is None:
            return None
        return self.refuse_hit(
            refusal,
            state,
            route,
            request.method,
            request.path,
            request.request_id,
            request.client_ip,
            request.received_at,
            request.protocol,
        )

    def refuse_hit(
        self,
        refusal: Refusal,
        state: EdgeState,
        route: str,
        method: str,
        path: str,
        request_id: bytes,
        client_ip: str,
        started: float,
        protocol: str | None = None,
    ) -> bytes | None:
        """A cache hit's refusal (the hit stage's fast path, HTTP/1.1 keep-alive): the 429's
        bytes, accounted like the hit would have been; None in dry run (serve the hit).
        ``protocol``: the connection's access-line fields (``ProxyRequest.protocol``)."""
        self.note(refusal, route, started)
        if refusal.rule.dry_run:
            return None
        services = self.services
        wire = self.response(
            state, refusal, request_id, started, keep_alive=True, head_only=method == "HEAD"
        )
        metrics = services.metrics
        metrics.errors.labels("429", REASON).inc()
        total = services.clock() - started
        metrics.observe_request(route, 429, "BYPASS", "-", total, state.config.edge.latency_target)
        access_log = services.access_log
        if access_log.enabled:
            access_log.record_request(
                method,
                path,
                429,
                "BYPASS",
                "-",
                "-",
                0,
                0.0,
                len(wire),
                total,
                request_id,
                client_ip,
                protocol,
            )
        return wire

    @staticmethod
    def response(
        state: EdgeState,
        refusal: Refusal,
        request_id: bytes,
        now: float,
        *,
        keep_alive: bool,
        head_only: bool,
    ) -> bytes:
        """The 429: small JSON, Retry-After, RateLimit-Policy and RateLimit, never stored."""
        rule = refusal.rule
        seconds = max(1, math.ceil(refusal.wait))
        remaining = refusal.remaining
        if remaining is None:
            remaining = rule.gcra.remaining(refusal.bucket, now)
        extra: Headers = [
            (b"x-cache", b"BYPASS"),
            (b"age", b"0"),
            (b"ratelimit-policy", rule.policy),
            (b"ratelimit", b'"%s";r=%d;t=%d' % (rule.name.encode(), remaining, seconds)),
        ]
        return error_response(
            429,
            state.pop,
            REASON,
            request_id,
            request_id_header=state.request_id_header,
            keep_alive=keep_alive,
            retry_after=seconds,
            extra=extra,
            head_only=head_only,
        )

    @staticmethod
    def note(refusal: Refusal, route: str, now: float) -> None:
        """Log a refusal (or a dry run's would-be refusal) at most once per key per
        ``LOG_INTERVAL``, with how many it stands for."""
        bucket = refusal.bucket
        bucket.held += 1
        if now < bucket.log_after:
            return
        rule = refusal.rule
        log.warning(
            "rate_limit_would_refuse" if rule.dry_run else "rate_limited",
            limit=rule.name,
            route=route,
            client=refusal.client,
            refused=bucket.held,
            retry_after=round(refusal.wait, 3),
        )
        bucket.held = 0
        bucket.log_after = now + LOG_INTERVAL


class RateLimitStats(Collector):
    """``meridian_edge_rate_limit_requests_total{limit,route,outcome}`` (allowed, limited,
    would_limit: a dry run's, exempt: allow-listed), ``meridian_edge_rate_limit_keys{limit}``
    ``meridian_edge_rate_limit_forgotten_busy_total{limit}`` (keys forgotten before their
    burst was back, when more keys were busy than the table holds) and
    ``meridian_edge_rate_limit_fallbacks_total{limit,reason}`` (shared limits decided
    locally while Redis could not)."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    def collect(self) -> Iterable[Metric]:
        limits = self.limiter.limits
        rules = limits.rules if limits is not None else ()
        requests = CounterMetricFamily(
            "meridian_edge_rate_limit_requests",
            "Requests checked by a rate limit, by limit, route and outcome (would_limit: a "
            "dry run's refusals; exempt: allow-listed clients).",
            labels=["limit", "route", "outcome"],
        )
        keys = GaugeMetricFamily(
            "meridian_edge_rate_limit_keys", "Keys a rate limit tracks.", labels=["limit"]
        )
        forgotten = CounterMetricFamily(
            "meridian_edge_rate_limit_forgotten_busy",
            "Keys forgotten before their burst was back (more busy keys than max_keys).",
            labels=["limit"],
        )
        for rule in rules:
            for route, counts in sorted(rule.counts.items()):
                for outcome in _OUTCOMES:
                    requests.add_metric([rule.name, route, outcome], getattr(counts, outcome))
            keys.add_metric([rule.name], len(rule.gcra.buckets))
            forgotten.add_metric([rule.name], rule.gcra.forgotten_busy)
        fallbacks = CounterMetricFamily(
            "meridian_edge_rate_limit_fallbacks",
            "Shared limits' decisions made by this instance alone because Redis could not "
            "(timeout, error, breaker_open).",
            labels=["limit", "reason"],
        )
        shared = self.limiter.shared
        for (name, reason), value in sorted(shared.fallbacks.items() if shared else ()):
            fallbacks.add_metric([name, reason], value)
        yield requests
        yield keys
        yield forgotten
        yield fallbacks

    def describe(self) -> Iterable[Metric]:
        return []


__all__ = ["REASON", "Limiter", "RateLimitStats"]
