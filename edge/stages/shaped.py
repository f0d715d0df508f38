"""Cache hits for heads read by their shape (``edge.h1fast``, step 3): a request seen for the
first time whose fields, but its request line and volatile ones, match a head validated before.

Such a request is answered only if it is a fresh HIT (``HttpCache.lookup_read``); anything
else (a miss, a stale answer and its refresh) returns None with nothing
counted, and the front end reads the head in full, which decides it exactly.  The
``ProxyRequest`` is made only when a rate limit or the access log needs it: a plain hit goes
from the target to the cached bytes without one.
"""

from __future__ import annotations

from typing import Final

from edge.cache import LookupKind
from edge.exchange import ProxyRequest, entry_region
from edge.fasthead import Volatile
from edge.http1 import NO_BODY, new_request_id
from edge.stages.hit import HitStage
from edge.state import HeadShape

_HIT: Final = LookupKind.HIT
_SCHEME: Final = b"http"


class ShapedHits:
    """``respond``: the hit stage's answer to a head read by its shape (module docstring)."""

    __slots__ = ("hits",)

    def __init__(self, hits: HitStage) -> None:
        self.hits = hits

    def respond(
        self,
        shape: HeadShape,
        volatile: Volatile,
        method: str,
        target: bytes,
        raw_path: bytes,
        path: str,
        supplied: bytes | None,
        client_ip: str,
        scheme: bytes,
        protocol: str | None,
    ) -> bytes | None:
        """The bytes of a fresh HIT for a head read by its shape (``edge.h1fast``: its fields
        are ``shape``'s plus its ``volatile`` ones; ``target``: origin-form, without a fragment;
        ``raw_path``: its path before any ``?``, ``path`` as routed; ``supplied``: its valid
        request ID), or a rate limit's refusal; else None with nothing counted and no lookup
        pending (the caller then reads the head in full, which decides the rest)."""
        hits = self.hits
        received_at = hits.clock()
        cache = hits.cache
        if cache is None or not cache.enabled:
            return None
        read = shape.reads.get(method)
        if read is None:
            read = shape.read(method, cache.reader)
        if read is False:
            return None
        state = hits.services.state
        routed = state.route(shape.host, path)
        route = routed.route.name if routed is not None else "-"
        limiter = hits.limiter
        limits = limiter.limits if limiter.state is state else limiter.current(state)
        if limits is not None and limits.shared_routes and route in limits.shared_routes:
            return None
        extra = b"" if supplied is None else state.request_id_header + b": " + supplied + b"\r\n"
        lookup = cache.lookup_read(
            _SCHEME,
            shape.host,
            target,
            read,
            lambda: shape.headers + volatile.fields(),
            extra,
            raw_path,
        )
        if lookup is None:
            return None
        wire = lookup.wire
        if limits is None and not hits.access_log.enabled:  # a plain hit: no request made
            total = hits.clock() - received_at
            region, latency_target = entry_region(lookup.entry), state.config.edge.latency_target
            hits.metrics.observe_request(
                route, int(wire[9:12]), "HIT", region, total, latency_target
            )
            return wire
        request = ProxyRequest(
            method,
            target,
            path,
            shape.host,
            "1.1",
            shape.headers + volatile.fields() if volatile.parts else shape.headers,
            True,
            client_ip,
            NO_BODY,
            supplied if supplied is not None else new_request_id(),
            received_at,
            supplied is not None,
            None,
            scheme,
            protocol,
        )
        if limits is not None:
            refused = limiter.check_hit(limits, state, route, request)
            if refused is not None:
                return refused
        return hits.served(request, state, lookup, route, wire)


__all__ = ["ShapedHits"]
