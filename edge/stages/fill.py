"""The fill stage: MISS and REVALIDATE through ``HttpCache.fill``, background refreshes, and
``only-if-cached`` requests L1 could not answer (ONLY_IF_CACHED_L2) through
``HttpCache.stored_only``: L2's copy or the 504, never a fetch.

The cache decides (coalescing, L2, what to store, stale-if-error); this stage gives it the
fetch (``fill_read.FillFetch``) and sends what it returns: cached bytes, or a response it did
not store (``unstored``), live from the ``Handover`` or whole.  Upstream request header lines for a
memoised request head are built once per client address (``fill_headers``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import Final

from edge.cache import Filled, Lookup, LookupKind, UpstreamResponse
from edge.cache.policy import NOT_FORWARDED_ON_FILL, without_fields
from edge.exchange import (
    Exchange,
    ExchangeRecord,
    FetchError,
    OutgoingResponse,
    ProxyRequest,
    connection_line,
    entry_region,
    forwarding_context,
    request_id_line,
)
from edge.http1 import Headers
from edge.request_target import forward_headers
from edge.router import RouteTarget
from edge.stages.fill_read import FillFetch, Handover
from edge.stages.respond import Responder
from edge.stages.services import EdgeServices
from edge.stages.walk import UpstreamWalk
from edge.state import EdgeState, FillHeaders

_X_CACHE_LABELS = {
    b"HIT": "HIT",
    b"MISS": "MISS",
    b"STALE": "STALE",
    b"REVALIDATED": "REVALIDATED",
    b"BYPASS": "BYPASS",
}
_ONLY_IF_CACHED_L2: Final = LookupKind.ONLY_IF_CACHED_L2


class Filler:
    __slots__ = ("respond", "services", "walker")

    def __init__(self, services: EdgeServices, walker: UpstreamWalk, respond: Responder) -> None:
        self.services = services
        self.walker = walker
        self.respond = respond

    async def fill(self, exchange: Exchange) -> None:
        services = self.services
        cache = services.cache
        lookup = exchange.lookup
        assert cache is not None and lookup is not None
        request, record, respond, state = (
            exchange.request,
            exchange.record,
            self.respond,
            exchange.state,
        )
        id_line = request_id_line(request, state)
        extra = id_line + connection_line(request)
        if lookup.kind is _ONLY_IF_CACHED_L2:  # no fetch: L2's copy, or the 504
            self._write_cached(exchange, await cache.stored_only(lookup, extra))
            return
        target = exchange.target
        assert target is not None, "no route: the pipeline answers 404 before any stage"
        fetch = self.fetch_for(request, state, target, lookup, record, True, id_line)
        try:
            try:
                # ``HttpCache.fill`` is this coroutine: called without passing through it.
                filled = await cache.fills.fill(lookup, fetch, extra)
            except FetchError as exc:
                await respond.send_error(
                    exchange, exc.status, exc.reason, exc.retry_after, close=exc.close
                )
                return
            if filled.wire is not None:
                self._write_cached(exchange, filled)
                return
            record.cache = "MISS"
            response = filled.response
            assert response is not None
            outgoing = unstored(
                request, exchange.state, response, fetch.handover, hidden=cache.targeted_fields
            )
            if outgoing is None:
                await respond.send_error(exchange, 502, "upstream_incomplete")
                return
            await respond.encode_and_send(exchange, outgoing)
        finally:
            fetch.live = False  # nothing is handed over from now on
            handover = fetch.handover
            if handover is not None:
                handover.close(services.upstream)

    def _write_cached(self, exchange: Exchange, filled: Filled) -> None:
        """Write the cache's bytes (``filled.wire``), recorded as its X-Cache says."""
        assert filled.wire is not None
        record = exchange.record
        x_cache = filled.x_cache
        record.cache = _X_CACHE_LABELS.get(x_cache, "MISS")
        # A MISS was filled by this request's own walk, which recorded the region already.
        if filled.entry is not None and (x_cache != b"MISS" or record.region == "-"):
            record.region = entry_region(filled.entry)
        self.respond.write_wire(exchange, filled.wire)

    def fetch_for(
        self,
        request: ProxyRequest,
        state: EdgeState,
        target: RouteTarget,
        lookup: Lookup,
        record: ExchangeRecord,
        live: bool,
        id_line: bytes | None = None,
    ) -> FillFetch:
        """The fetch a fill calls: a GET of the normalised target with the client's headers
        minus its conditionals and minus unkeyed headers that could change the response.
        ``live``: whether the request takes a response the cache will not store, to stream
        (``FillFetch.handover``); ``id_line``: the request ID line, when the caller has made
        it already."""
        if id_line is None:
            id_line = request_id_line(request, state)
        return FillFetch(
            self.services,
            self.walker,
            request,
            state,
            target,
            lookup,
            fill_headers(request, state, id_line),
            record,
            live,
        )

    def refresh(self, request: ProxyRequest, lookup: Lookup) -> None:
        """Stale-while-revalidate: one background fetch per key (the cache dedupes)."""
        cache = self.services.cache
        state = self.services.state
        target = state.route(request.host, request.path)
        if cache is None or target is None:
            return
        fetch = self.fetch_for(request, state, target, lookup, ExchangeRecord(), False)
        deadline = state.config.edge.timeouts.total

        async def bounded(validators: list[tuple[bytes, bytes]]) -> UpstreamResponse:
            async with asyncio.timeout(deadline):
                return await fetch(validators)

        cache.refresh(lookup, bounded)


def fill_headers(request: ProxyRequest, state: EdgeState, id_line: bytes) -> bytes:
    """A fill's upstream request header lines (``forward_headers`` with ``fill``, minus the
    client's conditionals), as sent; built from the screened request (its Host line
    is the key's host), never from anything the key does not hold.  For a memoised request
    head, or a head read by its shape whose fields are the shape's (``ProxyRequest.fills``),
    they depend on the client address and scheme and the request ID alone: built once per
    address and scheme (``edge.memos.FILL_HEADERS``), then the request ID line appended
    (``id_line``: ``request_id_line``, which the caller has made already)."""
    head: FillHeaders | None = request.head
    if head is None:
        head = request.fills
    if head is None or not head.filled:
        # The memo pays off only for a head that fills again (a refresh after expiry, an
        # uncacheable answer): made on its second fill, not carried by every head seen once
        # (4,096 memoised heads x ~1 KB of headers was 4 MiB of RSS outside the cache bound).
        if head is not None:
            head.filled = True
        return fill_header_block(_fill_request_headers(request, state))
    memo = head.fill_headers
    if memo is None:
        memo = head.new_fill_headers()
    # By scheme too: one listener's shortcuts serve plain and TLS clients (X-Forwarded-Proto).
    client = (request.client_ip, request.scheme)
    base = memo.get(client)
    if base is None:
        lines = _fill_request_headers(request, state)
        if lines[-1][0] != state.request_id_header:  # it comes last; never otherwise
            return fill_header_block(lines)
        base = fill_header_block(lines[:-1])
        memo.remember(client, base)
    return base + id_line


def _fill_request_headers(request: ProxyRequest, state: EdgeState) -> list[tuple[bytes, bytes]]:
    return forward_headers(request.headers, forwarding_context(request, state), fill=True)


#: Never sent on a fill: the client's conditionals and Range (``NOT_FORWARDED_ON_FILL``), and
#: Content-Length (the upstream client writes the framing: ``upstream_headers``).
_NOT_SENT_ON_FILL: Final = NOT_FORWARDED_ON_FILL | {b"content-length"}


def fill_header_block(lines: Headers) -> bytes:
    """``upstream_headers(upstream_request_headers(lines, ()))`` in one pass: a fill's forwarded
    header lines as they go upstream."""
    return b"".join([b"%s: %s\r\n" % line for line in lines if line[0] not in _NOT_SENT_ON_FILL])


def unstored(
    request: ProxyRequest,
    state: EdgeState,
    response: UpstreamResponse,
    handover: Handover | None,
    *,
    hidden: frozenset[bytes] = frozenset(),
) -> OutgoingResponse | None:
    """The response to send for a fill the cache did not store (X-Cache: MISS), less the
    ``hidden`` fields (the RFC 9213 fields addressed to this cache); ``handover``: what the
    fill's fetch handed over, if anything."""
    headers = without_fields(response.headers, hidden) if hidden else list(response.headers)
    headers.append((b"x-cache", b"MISS"))
    if not any(name == b"age" for name, _ in headers):
        headers.append((b"age", b"0"))
    headers.append((state.request_id_header, request.request_id))
    status = response.status
    no_body = request.method == "HEAD" or status < 200 or status in (204, 304)
    data: bytes | None
    length: int | None
    body: AsyncIterable[bytes] | None
    if handover is not None and response is handover.marker:
        data = handover.data
        if data is not None:
            length = len(data)
            body = None if no_body else _one(data)
        else:
            length = handover.length
            body = None if no_body else handover.body()
    elif response.complete:
        data = response.body
        length = len(data)
        body = None if no_body else _one(data)
    else:
        return None  # another request's live stream: cannot happen, never half-send
    return OutgoingResponse(
        status=status,
        reason=response.reason,
        headers=headers,
        length=None if no_body else length,
        body=body,
        head_length=length if no_body else None,
        data=None if no_body else data,
    )


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


def _one(data: bytes) -> AsyncIterable[bytes]:
    return _one_chunk(data)


__all__ = ["Filler", "fill_header_block", "fill_headers", "unstored"]
