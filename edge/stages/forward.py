"""The forward stage (BYPASS): the client's request as it is, through the upstream walk.

Methods other than GET/HEAD, bypass rules, request bodies and preconditions come here.  A
request body up to ``REQUEST_BUFFER_LIMIT`` is read whole before a backend is picked (nginx's
``proxy_request_buffering``: a client trickling its upload then holds no upstream connection,
and the body can be sent again on a retry); a larger one is streamed, within its share of the
pool.  The response streams back; an unsafe method then invalidates what the cache holds.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

from edge.exchange import (
    CACHEABLE_METHODS,
    ErrorAnswer,
    Exchange,
    OutgoingResponse,
    RequestBody,
    forwarding_context,
)
from edge.http1 import BodyFraming, BodyKind, RequestRejected, rewrite_response_headers
from edge.request_target import forward_headers
from edge.stages.respond import Responder
from edge.stages.services import EdgeServices
from edge.stages.walk import UpstreamCall, UpstreamWalk, Walked
from edge.upstream import Attempt, OriginResponse, upstream_headers

#: Request bodies up to this size are read whole before an upstream connection is taken
#: (``buffer_request_body``); larger ones are streamed.
REQUEST_BUFFER_LIMIT = 64 * 1024
_SCHEME = b"http"


class Forwarder:
    __slots__ = ("respond", "services", "walker")

    def __init__(self, services: EdgeServices, walker: UpstreamWalk, respond: Responder) -> None:
        self.services = services
        self.walker = walker
        self.respond = respond

    async def forward(self, exchange: Exchange) -> None:
        respond = self.respond
        request, body = exchange.request, exchange.body
        framing = request.body
        # The body read and the walk awaited here, not in a coroutine of their own: one
        # frame fewer per forwarded request.
        fetched: Walked | None = None
        payload: bytes | AsyncIterable[bytes] | None = None
        has_body = framing.has_body
        if body is not None and has_body:
            try:
                payload = await buffer_request_body(body, framing, REQUEST_BUFFER_LIMIT)
            except RequestRejected as exc:
                fetched = exc  # the client's fault (too slow, too big, gone): nothing was sent
        if fetched is None:
            fetched = await self.walker.walk(
                exchange.state,
                exchange.routed,
                exchange.record,
                upstream_call(exchange, body if has_body else None, payload),
            )
        if isinstance(fetched, RequestRejected):
            await respond.send_error(exchange, fetched.status, fetched.reason)
            return
        if isinstance(fetched, ErrorAnswer):
            await respond.send_error(exchange, fetched.status, fetched.reason, fetched.retry_after)
            return
        response, attempt = fetched
        try:
            outgoing = from_upstream(exchange, response, attempt)
            cache = self.services.cache
            if cache is not None and request.method not in CACHEABLE_METHODS:
                cache.invalidate(
                    request.method.encode("ascii", "replace"),
                    response.status,
                    _SCHEME,
                    request.host or b"",
                    request.target,
                    outgoing.headers,
                )
            await respond.encode_and_send(exchange, outgoing)
        finally:
            response.release()
            self.services.upstream.release(attempt.backend, streamed=exchange.record.streamed_body)


def upstream_call(
    exchange: Exchange, body: RequestBody | None, payload: bytes | AsyncIterable[bytes] | None
) -> UpstreamCall:
    """What the walk sends for the client's request as it is: ``body`` the client's (when the
    request has one), ``payload`` what of it is sent (``buffer_request_body``)."""
    request = exchange.request
    headers = forward_headers(request.headers, forwarding_context(request, exchange.state))
    framing = request.body
    return UpstreamCall(
        request.method,
        request.target.decode("latin-1"),
        upstream_headers(headers),
        body,
        payload,
        # A streamed body keeps the client's declared length (origins that refuse chunked
        # uploads still get it); a chunked one goes chunked.
        framing.length if framing.kind is BodyKind.LENGTH else None,
        request.request_id.decode("latin-1"),
    )


def from_upstream(
    exchange: Exchange, response: OriginResponse, attempt: Attempt
) -> OutgoingResponse:
    """The upstream response as it goes to the client (streamed, X-Cache as recorded)."""
    request, state = exchange.request, exchange.state
    headers = rewrite_response_headers(
        response.raw_headers,
        dropped=state.dropped_forwarded_headers,
        via=state.via,
        region=attempt.region,
    )
    headers.append((b"x-cache", exchange.record.cache.encode()))
    for name, _ in headers:  # a loop, not any() over a generator: once per response
        if name == b"age":
            break
    else:
        headers.append((b"age", b"0"))
    headers.append((state.request_id_header, request.request_id))
    length = response.content_length
    no_body = request.method == "HEAD" or response.status in (204, 304)
    return OutgoingResponse(
        status=response.status,
        reason=response.reason.encode("latin-1", "replace"),
        headers=headers,
        length=None if no_body else length,
        body=None if no_body else response.content.iter_any(),
        head_length=length if no_body else None,
    )


async def buffer_request_body(
    body: RequestBody, framing: BodyFraming, limit: int
) -> bytes | AsyncIterator[bytes]:
    """The request body whole when it fits in ``limit`` bytes, else a stream of it (what was
    read so far, then the rest as it arrives).  Raises the body's ``RequestRejected`` (client
    too slow, body too large, client gone) while reading."""
    iterator = body.__aiter__()
    if framing.kind is BodyKind.LENGTH and framing.length > limit:
        return iterator  # known to be large: streamed from its first byte
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await anext(iterator)
        except StopAsyncIteration:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return _chain(chunks, iterator)


async def _chain(prefix: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in prefix:
        yield chunk
    prefix.clear()
    async for chunk in rest:
        yield chunk


__all__ = [
    "REQUEST_BUFFER_LIMIT",
    "Forwarder",
    "buffer_request_body",
    "from_upstream",
    "upstream_call",
]
