"""Cache hits for heads read by their shape (``edge.h1fast``, step 3): a request seen for the
first time whose fields, but its request line and volatile ones, match a head validated before.

Such a request is answered only if it is a fresh HIT (``edge.cache.lookup_read``).  A head
seen for the first time that finds nothing stored (``misses``) becomes its ``ProxyRequest``
from the shape, its fields in the client's order (``Volatile.in_order``), with the MISS kept for
``take_pending``: the fill goes upstream without a full parse or a second lookup.  Anything
else (a stale answer and its refresh, ...) returns None with nothing counted, and the front
end reads the head in full, which decides it exactly.  The ``ProxyRequest`` of a hit is made
only when a rate limit or the access log needs it: a plain hit goes from the target to the
cached bytes without one.
"""

from __future__ import annotations

from typing import Final

from edge.cache import Lookup, LookupKind, lookup_read
from edge.cache.messages import RequestInfo
from edge.cache.requests import READ_FIELDS
from edge.exchange import ProxyRequest, entry_region
from edge.fasthead import Volatile
from edge.http1 import NO_BODY, Headers, new_request_id
from edge.stages.hit import HitStage
from edge.state import EdgeState, HeadShape

_HIT: Final = LookupKind.HIT
_MISS: Final = LookupKind.MISS
_SCHEME: Final = b"http"
#: A NamedTuple made from all its fields without its generated ``__new__`` (a frame less).
_new_tuple: Final = tuple.__new__


def _route_name(state: EdgeState, host: bytes, path: str) -> str:
    """The name of the route ``host`` and ``path`` take (the access line's ``-`` for none)."""
    routed = state.route(host, path)
    return routed.route.name if routed is not None else "-"


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
        misses: bool = False,
    ) -> bytes | ProxyRequest | None:
        """The bytes of a fresh HIT for a head read by its shape (``edge.h1fast``: its fields
        are ``shape``'s plus its ``volatile`` ones; ``target``: origin-form, without a fragment;
        ``raw_path``: its path before any ``?``, ``path`` as routed; ``supplied``: its valid
        request ID), or a rate limit's refusal; with ``misses``, the request of one that
        finds nothing stored, its MISS pending (``HitStage.take_pending``); else None with
        nothing counted and no lookup pending (the caller then reads the head in full, which
        decides the rest)."""
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
        limiter = hits.limiter
        limits = limiter.limits if limiter.state is state else limiter.current(state)
        route: str | None = None
        if limits is not None:
            route = _route_name(state, shape.host, path)
            if limits.shared_routes and route in limits.shared_routes:
                return None
        extra = b"" if supplied is None else state.request_id_header + b": " + supplied + b"\r\n"
        lookup = lookup_read(
            cache,
            _SCHEME,
            shape.host,
            target,
            read,
            shape.headers,
            # Its stripped fields, read only for a resource that varies (no closure per request).
            volatile.fields if volatile.parts else None,
            extra,
            raw_path,
            misses and state.request_id_header not in READ_FIELDS,
        )
        if lookup is None:
            return None
        if lookup.kind is _MISS:
            return self._missed(
                lookup,
                shape,
                volatile,
                method,
                target,
                path,
                supplied,
                received_at,
                client_ip,
                scheme,
                protocol,
            )
        wire = lookup.wire
        if route is None:  # a miss goes on without one: the pipeline routes it
            route = _route_name(state, shape.host, path)
        if limits is None and not hits.access_log.enabled:  # a plain hit: no request made
            total = hits.clock() - received_at
            region, latency_target = entry_region(lookup.entry), state.config.edge.latency_target
            hits.metrics.observe_request(
                route, int(wire[9:12]), "HIT", region, total, latency_target
            )
            return wire
        request = shaped_request(
            method,
            target,
            path,
            shape,
            shape.headers + volatile.fields() if volatile.parts else shape.headers,
            client_ip,
            supplied,
            received_at,
            scheme,
            protocol,
        )
        if limits is not None:
            refused = limiter.check_hit(limits, state, route, request)
            if refused is not None:
                return refused
        return hits.served(request, state, lookup, route, wire)

    def _missed(
        self,
        lookup: Lookup,
        shape: HeadShape,
        volatile: Volatile,
        method: str,
        target: bytes,
        path: str,
        supplied: bytes | None,
        received_at: float,
        client_ip: str,
        scheme: bytes,
        protocol: str | None,
    ) -> ProxyRequest | None:
        """The request of a head read by its shape that found nothing stored, as the full
        parse would make it, its MISS (``lookup``, carrying the shape's read) pending with the
        request's own read; None when its fields cannot be put back in order."""
        read = lookup.request
        if read is None:
            return None
        headers = shape.headers
        if volatile.parts:
            ordered = volatile.in_order(headers)
            if ordered is None:
                return None
            headers, cookie = ordered
        else:
            cookie = False
        if headers is not read.headers or cookie != read.cookie:
            # The shape's read but for the fields it never saw: this request's own, and its
            # Cookie (the request ID field is none the reader reads: ``respond`` checked).
            own = _new_tuple(
                RequestInfo,
                (
                    headers,
                    read.cc,
                    read.coding,
                    read.head,
                    read.authorized,
                    read.if_none_match,
                    read.if_modified_since,
                    cookie,
                    read.range,
                    read.if_range,
                ),
            )
            lookup = _new_tuple(Lookup, (_MISS, b"", lookup.key, None, own, "", False))
        # (Else the shape's read is this request's own: its MISS carries it already.)
        request = shaped_request(
            method, target, path, shape, headers, client_ip, supplied, received_at, scheme, protocol
        )
        self.hits.pend(request, lookup)
        return request


def shaped_request(
    method: str,
    target: bytes,
    path: str,
    shape: HeadShape,
    headers: Headers,
    client_ip: str,
    supplied: bytes | None,
    received_at: float,
    scheme: bytes,
    protocol: str | None,
) -> ProxyRequest:
    """The request of a head read by its shape (HTTP/1.1, keep-alive, no body), as the full
    parse would make it, with ``headers`` as its fields."""
    # ProxyRequest(...) without the NamedTuple's generated __new__: one per request.
    return _new_tuple(
        ProxyRequest,
        (
            method,
            target,
            path,
            shape.host,
            "1.1",
            headers,
            True,
            client_ip,
            NO_BODY,
            supplied if supplied is not None else new_request_id(),
            received_at,
            supplied is not None,
            None,
            scheme,
            protocol,
            # The shape's own field list (no volatile fields): its fills' upstream lines too.
            shape if headers is shape.headers else None,
        ),
    )


__all__ = ["ShapedHits", "shaped_request"]
