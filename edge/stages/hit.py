"""The hit stage: the cache lookup, and answers from cached bytes.

A cache hit never leaves the protocol callback: ``fast_response`` (called when the front end
has read a bodiless HTTP/1.1 GET/HEAD on an idle keep-alive connection) does one
``HttpCache.lookup`` and returns the entry's prebuilt bytes (HIT, or STALE after starting the
one background refresh), which the protocol writes in one ``transport.write``.  The
compressed variants live in the entry, built once, so a Brotli hit costs what an identity hit
costs.  ``replay_hit`` is cheaper still: the last hit for the same request bytes, replayed
while it holds.  ``edge.stages.shaped`` answers a head read by its shape (``edge.h1fast``)
when it is a hit, and nothing else.  All account their hits here (``served``), and all ask the
rate limits first (``stages.limit``): a client over its rate is answered 429, never from the
cache.

On the slow path ``lookup`` asks the cache (unless the fast path already did:
``take_pending``) and ``answer`` writes HIT / STALE / ONLY_IF_CACHED bytes (ONLY_IF_CACHED_L2,
which asks L2 first, goes to the fill stage: ``needs_fill``).
"""

from __future__ import annotations

from typing import Final

from edge.cache import HttpCache, Lookup, LookupKind
from edge.cache.entry import with_lines
from edge.exchange import (
    Exchange,
    ProxyRequest,
    connection_line,
    entry_region,
    request_id_line,
)
from edge.fasthead import stripped_fields
from edge.http1 import new_request_id
from edge.stages.fill import Filler
from edge.stages.limit import Limiter
from edge.stages.respond import Responder
from edge.stages.services import EdgeServices
from edge.state import EdgeState, HitReplay, RequestHead

_HIT: Final = LookupKind.HIT
_STALE: Final = LookupKind.STALE
_MISS: Final = LookupKind.MISS
_REVALIDATE: Final = LookupKind.REVALIDATE
_ONLY_IF_CACHED: Final = LookupKind.ONLY_IF_CACHED
_ONLY_IF_CACHED_L2: Final = LookupKind.ONLY_IF_CACHED_L2
_BYPASS: Final = LookupKind.BYPASS
_METHOD_BYTES: Final = {"GET": b"GET", "HEAD": b"HEAD"}
_SCHEME: Final = b"http"


class HitStage:
    """Cache lookups and hits.  Holds the cache, metrics, access log and clock directly
    (they are never swapped); reads ``services.state`` (swapped on reload)."""

    __slots__ = (
        "_pending",
        "access_log",
        "cache",
        "clock",
        "filler",
        "limiter",
        "metrics",
        "respond",
        "services",
    )

    def __init__(
        self, services: EdgeServices, filler: Filler, respond: Responder, limiter: Limiter
    ) -> None:
        self.services = services
        self.limiter = limiter
        self.cache: HttpCache | None = services.cache
        self.metrics = services.metrics
        self.access_log = services.access_log
        self.clock = services.clock
        self.filler = filler
        self.respond = respond
        #: The fast path's lookup of a request it did not answer, for the protocol to take at
        #: once (``take_pending``) and hand to ``handle`` (a second lookup would count a
        #: bypass twice and cost a second key build).
        self._pending: tuple[ProxyRequest, Lookup] | None = None

    # -- the fast path ------------------------------------------------------------------------

    def fast_response(self, request: ProxyRequest) -> bytes | None:
        """Complete response bytes for a cache hit (fresh, or stale while one background
        refresh runs), else None.

        Called synchronously when a head is complete (or a replayed ``RequestHead``), for
        a bodiless HTTP/1.1 GET/HEAD on a keep-alive connection with nothing in flight; the
        protocol writes the bytes in one ``transport.write``.  Metrics and the access line
        are accounted here.
        """
        cache = self.cache
        if cache is None or request.http_version != "1.1":
            return None
        state = self.services.state
        extra = request_id_line(request, state) if request.request_id_supplied else b""
        head = request.head
        prepared = None
        if head is not None:
            prepared = head.prepared
            if prepared is None:
                prepared = head.prepared = cache.prepare(
                    _METHOD_BYTES[request.method],
                    _SCHEME,
                    request.host or b"",
                    request.target,
                    request.headers,
                )
            now = cache.clock()
            # Without the request ID line: those bytes are the entry's own (memoisable); the
            # line goes in below, for this request only.
            lookup = cache.lookup_prepared(prepared, now)
        else:
            lookup = cache.lookup(
                _METHOD_BYTES[request.method],
                _SCHEME,
                request.host or b"",
                request.target,
                request.headers,
                None,
                extra,
            )
        kind = lookup.kind
        if kind is not _HIT and kind is not _STALE:
            self._pending = (request, lookup)
            return None
        route = head.route if head is not None else None
        if route is None:
            target = state.route(request.host, request.path)
            route = target.route.name if target is not None else "-"
            if head is not None:
                head.route = route
        limiter = self.limiter
        limits = limiter.limits if limiter.state is state else limiter.current(state)
        if limits is not None:
            if limits.shared_routes and route in limits.shared_routes:
                return None  # decided on the slow path, through Redis
            refused = limiter.check_hit(limits, state, route, request)
            if refused is not None:
                return refused
        wire = lookup.wire
        if prepared is not None and head is not None:
            memo = cache.memo_hit(prepared, lookup, now, stripped_fields(state.request_id_header))
            if memo is not None:
                label = "HIT" if kind is _HIT else "STALE"
                head.hit = HitReplay(
                    memo, route, entry_region(lookup.entry), int(wire[9:12]), label
                )
            if extra:
                wire = with_lines(wire, extra)
        return self.served(request, state, lookup, route, wire)

    def served(
        self, request: ProxyRequest, state: EdgeState, lookup: Lookup, route: str, wire: bytes
    ) -> bytes:
        """``wire``, the answer of a HIT or STALE ``lookup``, accounted (and for STALE, the
        one background refresh started)."""
        if lookup.kind is _HIT:
            label = "HIT"
        else:
            label = "STALE"
            if lookup.refresh:
                self.filler.refresh(request, lookup)
        region = entry_region(lookup.entry)
        status = int(wire[9:12])
        total = self.clock() - request.received_at
        self.metrics.observe_request(
            route, status, label, region, total, state.config.edge.latency_target
        )
        if self.access_log.enabled:
            self.access_log.record_request(
                request.method,
                request.path,
                status,
                label,
                region,
                "-",
                0,
                0.0,
                len(wire),
                total,
                request.request_id,
                request.client_ip,
                request.protocol,
            )
        return wire

    def replay_hit(
        self,
        head: RequestHead,
        client_ip: str,
        supplied_id: bytes | None,
        protocol: str | None = None,
    ) -> bytes | None:
        """The bytes of ``head.hit`` when that answer still holds (same stored entry, same
        Age second, still fresh or still within stale-while-revalidate, no reload), else None
        (and the memo is dropped).  The cheapest answer the edge gives: no request object, no
        key, no freshness arithmetic; still counted in the metrics and the access log like any
        hit.  ``supplied_id``: this request's valid request ID (echoed), else None; ``protocol``:
        the connection's access-line fields (``ProxyRequest.protocol``)."""
        replay = head.hit
        cache = self.cache
        if replay is None or cache is None:
            return None
        started = self.clock()
        memo = replay.memo
        wire = cache.replay_hit(memo, cache.clock())
        if wire is None:
            head.hit = None
            return None
        state = self.services.state
        limiter = self.limiter
        limits = limiter.limits if limiter.state is state else limiter.current(state)
        if limits is not None:
            if limits.shared_routes and replay.route in limits.shared_routes:
                return None  # decided on the slow path, through Redis
            refusal = limits.check(replay.route, client_ip, head.headers, started)
            if refusal is not None:
                refused = limiter.refuse_hit(
                    refusal,
                    state,
                    replay.route,
                    head.method,
                    head.path,
                    supplied_id if supplied_id is not None else new_request_id(),
                    client_ip,
                    started,
                    protocol,
                )
                if refused is not None:
                    return refused
        if supplied_id is not None:
            wire = with_lines(wire, state.request_id_header + b": " + supplied_id + b"\r\n")
        total = self.clock() - started
        self.metrics.observe_request(
            replay.route,
            replay.status,
            replay.label,
            replay.region,
            total,
            state.config.edge.latency_target,
        )
        if self.access_log.enabled:
            self.access_log.record_request(
                head.method,
                head.path,
                replay.status,
                replay.label,
                replay.region,
                "-",
                0,
                0.0,
                len(wire),
                total,
                supplied_id if supplied_id is not None else new_request_id(),
                client_ip,
                protocol,
            )
        return wire

    def pend(self, request: ProxyRequest, lookup: Lookup) -> None:
        """Keep ``lookup``, made for ``request`` outside ``fast_response`` (a head read by its
        shape that missed: ``edge.stages.shaped``), for ``take_pending``."""
        self._pending = (request, lookup)

    def take_pending(self, request: ProxyRequest) -> Lookup | None:
        """The lookup ``fast_response`` just made for ``request`` and could not answer from,
        for the protocol to hand to ``handle`` (the task runs later, after other connections'
        requests have gone through ``fast_response``)."""
        pending = self._pending
        if pending is None:
            return None
        self._pending = None
        if pending[0] is not request:
            return None
        lookup = pending[1]
        kind = lookup.kind
        if kind is _MISS or kind is _REVALIDATE or kind is _BYPASS or kind is _ONLY_IF_CACHED_L2:
            return lookup  # carries no bytes: nothing about the connection is baked in
        return None

    # -- the slow path ------------------------------------------------------------------------

    def lookup(self, exchange: Exchange) -> Lookup | None:
        """The cache's verdict for the exchange (None: no cache)."""
        cache = self.cache
        if cache is None:
            return None
        request = exchange.request
        method = _METHOD_BYTES.get(request.method, request.method.encode("ascii", "replace"))
        extra = request_id_line(request, exchange.state) if request.request_id_supplied else b""
        return cache.lookup(
            method,
            _SCHEME,
            request.host or b"",
            request.target,
            request.headers,
            None,
            extra + connection_line(request),
        )

    def answer(self, exchange: Exchange, lookup: Lookup) -> bool:
        """Write the cached bytes for HIT / STALE / ONLY_IF_CACHED; False for other verdicts."""
        kind = lookup.kind
        if kind is not _HIT and kind is not _STALE and kind is not _ONLY_IF_CACHED:
            return False
        record = exchange.record
        record.cache = "MISS" if kind is _ONLY_IF_CACHED else kind.name
        record.region = entry_region(lookup.entry)
        if kind is _STALE and lookup.refresh:
            self.filler.refresh(exchange.request, lookup)
        self.respond.write_wire(exchange, lookup.wire)
        return True


def needs_fill(lookup: Lookup) -> bool:
    """MISS, REVALIDATE and ONLY_IF_CACHED_L2 (L2 alone: ``Filler.fill``) go to the fill
    stage."""
    kind = lookup.kind
    return kind is _MISS or kind is _REVALIDATE or kind is _ONLY_IF_CACHED_L2


__all__ = ["HitStage", "needs_fill"]
