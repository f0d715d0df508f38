"""The request path of one worker: route -> lookup -> hit | fill | forward -> respond -> account.

A cache hit never leaves the protocol callback: ``Pipeline.fast_response`` and
``Pipeline.replay_hit`` (``edge.stages.hit``) answer it from prebuilt bytes in one write.
Everything else runs ``Pipeline.handle`` in a task, one stage after the other on one
``edge.exchange.Exchange``:

1. route    ``EdgeState.route``: route, service, regions ordered for this POP (memoised);
   then ``Limiter.refused``: a client over a rate limit is answered 429 (``stages.limit``;
   the fast path's hits ask the same limits first); a shared limit asks Redis here
2. lookup   ``HitStage.lookup``: the cache's verdict (reused from the fast path when it ran)
3. by verdict:

   * HIT / STALE / ONLY_IF_CACHED -> ``HitStage.answer``: the prebuilt bytes
   * MISS / REVALIDATE -> ``Filler.fill``: ``HttpCache.fill`` with a ``FillFetch``
     (coalesced, L2, then the upstream walk); what the cache did not store is streamed
   * ONLY_IF_CACHED_L2 (``only-if-cached``, nothing usable in L1, an L2 to ask) ->
     ``Filler.fill`` too: ``HttpCache.stored_only``, L2's copy or the 504, never upstream
   * BYPASS (methods other than GET/HEAD, bypass rules, request bodies, preconditions) ->
     ``Forwarder.forward``: the streaming proxy path, then invalidation for unsafe methods

   The fill and the forward reach upstream through ``UpstreamWalk`` (retries, failover,
   passive health reports, giving up on a backend that left rotation: ``on_health``).
4. respond  ``Responder``: encode (``edge.transcode``), send through the ``ResponseSink``
5. account  ``Accountant``: metrics and the access line

Every response carries ``X-Cache`` and ``Age``; responses from the cache carry the
``X-Meridian-Region`` of the region that filled the entry.  Every stage sees the same
``EdgeState`` snapshot, pinned when the request starts, so a reload never changes a request
half-way.

What a miss costs is kept to what is needed: the edge's own upstream client
(``edge.upstream_client``: pooled keep-alive connections, header lines sent as the bytes they
arrived as, one deadline sweep instead of a timer per request), no timer per client request
either (the total deadline is the connection sweep's, see ``ResponseSink.expire_after``),
metrics as plain numbers turned into Prometheus families on scrape (``edge.admin``), access
lines formatted at flush, upstream header lines built once per memoised request head and
client address (``stages.fill.fill_headers``), NamedTuples rather than frozen dataclasses for
the objects made per request.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Final, Protocol

from edge.accesslog import AccessLog
from edge.admin import EdgeMetrics
from edge.cache import HttpCache, Lookup, LookupKind
from edge.exchange import (
    CACHEABLE_METHODS,
    Exchange,
    HealthSource,
    ProxyRequest,
    RequestBody,
    ResponseSink,
)
from edge.fasthead import Volatile
from edge.http1 import RequestRejected, error_response, new_request_id
from edge.stages.account import Accountant
from edge.stages.fill import Filler
from edge.stages.forward import Forwarder
from edge.stages.hit import HitStage, needs_fill
from edge.stages.limit import Limiter
from edge.stages.respond import Responder
from edge.stages.shaped import ShapedHits
from edge.stages.walk import UpstreamWalk
from edge.state import EdgeState, HeadShape, RequestHead
from edge.transcode import Transcoder
from edge.upstream import SnapshotView, UpstreamPool
from meridian.log import get_logger

log = get_logger("edge")
#: What the front ends' own error answers say of the cache.
_NOT_CACHED: Final = ((b"x-cache", b"BYPASS"), (b"age", b"0"))
_MISS: Final = LookupKind.MISS


class RequestGuard(Protocol):
    """How a front end ends a request ``Pipeline.handle`` runs in its task
    (``edge.h1queue.RequestQueue``), so that no coroutine of its own wraps the handling."""

    def request_failed(self, request: ProxyRequest, exc: Exception) -> None:
        """Handling ``request`` raised ``exc`` (a bug): answer 500 if still possible."""

    def request_ended(self, request: ProxyRequest) -> None:
        """``request`` is over: answered, failed, or cancelled (its client went away)."""


class Pipeline:
    """The request path of one worker process: its services, and its stages in order.

    The protocol calls ``fast_response``, ``shaped_response``, ``replay_hit`` and
    ``take_pending`` (bound straight
    to the hit stage's methods: no extra call on the hot path) and ``handle``; the server
    swaps ``state`` on reload and subscribes ``on_health`` to the health monitor."""

    fast_response: Callable[[ProxyRequest], bytes | None]
    shaped_response: Callable[
        [HeadShape, Volatile, str, bytes, bytes, str, bytes | None, str, bytes, str | None, bool],
        bytes | ProxyRequest | None,
    ]
    replay_hit: Callable[[RequestHead, str, bytes | None, str | None], bytes | None]
    take_pending: Callable[[ProxyRequest], Lookup | None]
    on_health: Callable[[SnapshotView], None]

    def __init__(
        self,
        state: EdgeState,
        *,
        upstream: UpstreamPool,
        health: HealthSource,
        metrics: EdgeMetrics,
        access_log: AccessLog,
        clock: Callable[[], float],
        rng: random.Random | None = None,
        cache: HttpCache | None = None,
        transcoder: Transcoder | None = None,
    ) -> None:
        #: Swapped whole on reload; each request reads it once.
        self.state = state
        self.upstream = upstream
        self.health = health
        self.metrics = metrics
        self.access_log = access_log
        self.clock = clock
        self.rng = rng or random.Random()
        self.cache = cache
        self.transcoder = transcoder
        self.respond = Responder(self)
        self.walker = UpstreamWalk(self)
        self.filler = Filler(self, self.walker, self.respond)
        self.forwarder = Forwarder(self, self.walker, self.respond)
        self.limiter = Limiter(self)
        self.hits = HitStage(self, self.filler, self.respond, self.limiter)
        self.accountant = Accountant(self)
        self.fast_response = self.hits.fast_response
        self.shaped_response = ShapedHits(self.hits).respond
        self.replay_hit = self.hits.replay_hit
        self.take_pending = self.hits.take_pending
        self.on_health = self.walker.on_health

    def error_answer(self, status: int, reason: str, request_id: bytes) -> bytes:
        """A front end's own error response (before or outside the stages), never cached."""
        state = self.state
        return error_response(
            status,
            state.pop,
            reason,
            request_id,
            request_id_header=state.request_id_header,
            extra=list(_NOT_CACHED),
        )

    def refusal(self, rejected: RequestRejected, client_ip: str, protocol: str) -> bytes:
        """A request a front end refuses to forward: counted, logged, and its error answer."""
        self.metrics.errors.labels(str(rejected.status), rejected.reason).inc()
        log.info(
            "request_rejected",
            status=rejected.status,
            reason=rejected.reason,
            client=client_ip,
            protocol=protocol,
        )
        return self.error_answer(rejected.status, rejected.reason, new_request_id())

    async def handle(
        self,
        request: ProxyRequest,
        body: RequestBody | None,
        sink: ResponseSink,
        lookup: Lookup | None = None,
        guard: RequestGuard | None = None,
    ) -> None:
        """The slow path of one request.  ``lookup``: what ``fast_response`` found for it
        (``take_pending``), so that the cache is not asked twice.  ``guard``: the front end's
        end of it (``RequestGuard``): then a cancellation ends it quietly, an error is handed
        to the guard, and the guard hears of its end (what the front end's own coroutine
        around this one would do, a coroutine less per request)."""
        try:
            state = self.state
            exchange = Exchange(request, body, sink, state, lookup)
            stats = self.metrics.upstream_stats
            stats.in_flight += 1
            try:
                target = state.route(request.host, request.path)
                if target is not None:
                    exchange.target = target
                    exchange.record.route = target.route.name
                # Before the 404 too: limits on every route also count requests for none ("-").
                limiter = self.limiter
                limits = limiter.limits if limiter.state is state else limiter.current(state)
                if limits is not None and (
                    limiter.refused(exchange)
                    or (limiter.shares(exchange) and await limiter.refused_shared(exchange))
                ):
                    return
                if target is None:
                    await self.respond.send_error(exchange, 404, "no_route")
                    return
                # The total deadline: the connection's sweep cancels this task when it passes
                # (no timer per request); the cancellation is turned into a 504 here.
                sink.expire_after(state.config.edge.timeouts.total)
                try:
                    # lookup -> hit | fill | forward, in this frame (a coroutine less).
                    if lookup is None:
                        lookup = exchange.lookup = self.hits.lookup(exchange)
                    if lookup is not None:
                        if lookup.kind is _MISS:  # the usual verdict here: no answer, a fill
                            await self.filler.fill(exchange)
                            return
                        if self.hits.answer(exchange, lookup):
                            return
                        if needs_fill(lookup):
                            await self.filler.fill(exchange)
                            return
                    if self.cache is None and request.method in CACHEABLE_METHODS:
                        exchange.record.cache = "MISS"  # no cache at all: nothing was bypassed
                    else:
                        exchange.record.cache = "BYPASS"
                    await self.forwarder.forward(exchange)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if not sink.deadline_expired or task is None or task.uncancel() > 0:
                        raise  # the client went away (or another cancellation came too)
                    if sink.response_started:
                        sink.abort()
                        exchange.record.status = exchange.record.status or 504
                    else:
                        await self.respond.send_error(exchange, 504, "deadline_exceeded")
            finally:
                stats.in_flight -= 1
                self.accountant.account(exchange)
        except asyncio.CancelledError:
            if guard is None:
                raise
        except Exception as exc:
            if guard is None:
                raise
            guard.request_failed(request, exc)
        finally:
            if guard is not None:
                guard.request_ended(request)


#: ``EdgeState``, ``ProxyRequest`` and ``RequestHead`` are re-exported for ``edge.protocol``'s
#: import line (they live in ``edge.state`` and ``edge.exchange``).
__all__ = ["EdgeState", "Pipeline", "ProxyRequest", "RequestGuard", "RequestHead"]
