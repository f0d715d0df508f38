"""The respond stage: a response as this client gets it, written through the sink.

``encode`` hands an uncached response to ``edge.transcode`` (an origin coding the client does
not accept decoded, compressible bodies compressed chunk by chunk); ``send`` writes its head
and body with the framing ``http1.response_framing`` decides; ``send_error`` answers the
edge's own errors; ``write_wire`` writes prebuilt bytes from the cache.
"""

from __future__ import annotations

from edge.exchange import (
    CACHEABLE_METHODS,
    Exchange,
    OutgoingResponse,
    accept_encoding,
)
from edge.http1 import BodyKind, Headers, error_response, response_framing
from edge.stages.services import EdgeServices
from edge.transcode import BodyError
from edge.upstream import UPSTREAM_BODY_ERRORS
from meridian.log import get_logger

log = get_logger("edge")

#: What may break a body while it is sent: the upstream's errors, or its coding's.
_BODY_BROKE: tuple[type[Exception], ...] = (*UPSTREAM_BODY_ERRORS, BodyError)


class Responder:
    """Writes responses to the front end's ``ResponseSink``."""

    __slots__ = ("services",)

    def __init__(self, services: EdgeServices) -> None:
        self.services = services

    def encode(self, exchange: Exchange, response: OutgoingResponse) -> OutgoingResponse:
        """An uncached response as this client gets it (``edge.transcode``).  Raises
        ``BodyError`` when a body in memory cannot be decoded (a bomb: 502)."""
        transcoder = self.services.transcoder
        if transcoder is None:
            return response
        return transcoder.encode(
            response,
            accept_encoding(exchange.request.headers),
            exchange.routed.route.name,
            self.services.state.config.edge.compression,
        )

    def write_wire(self, exchange: Exchange, wire: bytes) -> None:
        """Bytes from the cache, head and body, in one write."""
        exchange.record.status = int(wire[9:12])
        exchange.sink.write_complete(wire, close=not exchange.request.keep_alive)

    async def send(self, exchange: Exchange, response: OutgoingResponse) -> None:
        request, sink, record = exchange.request, exchange.sink, exchange.record
        framing = response_framing(
            request.method, response.status, response.length, request.http_version == "1.1"
        )
        record.status = response.status
        sink.start_response(
            response.status, response.reason, response.headers, framing, response.head_length
        )
        data = response.data
        if data is not None and framing.kind is not BodyKind.NONE:
            sink.write_body(data)  # whole in memory: one write with the head
        elif framing.kind is not BodyKind.NONE and response.body is not None:
            try:
                async for chunk in response.body:
                    sink.write_body(chunk)
                    if sink.write_paused:
                        await sink.drain()
            except _BODY_BROKE as exc:
                # The origin died mid-body (or its coding broke): close the client connection
                # so the truncation shows (a missing last chunk or a short Content-Length),
                # never a clean end.
                reason = exc.reason if isinstance(exc, BodyError) else "mid_body"
                log.warning(
                    "upstream_broke_mid_body",
                    backend=record.backend,
                    error=reason if isinstance(exc, BodyError) else type(exc).__name__,
                    request_id=request.request_id.decode("ascii", "replace"),
                )
                self.services.metrics.upstream_failures.labels(record.region, reason).inc()
                if record.backend != "-" and not isinstance(exc, BodyError):
                    self.services.health.report(record.backend, False)
                sink.abort()
                return
        sink.end_response()

    async def encode_and_send(self, exchange: Exchange, response: OutgoingResponse) -> None:
        """``encode`` then ``send``; a body that cannot be decoded is a 502."""
        try:
            response = self.encode(exchange, response)
        except BodyError as exc:
            await self.send_error(exchange, 502, exc.reason)
            return
        await self.send(exchange, response)

    async def send_error(
        self,
        exchange: Exchange,
        status: int,
        reason: str,
        retry_after: int | None = None,
        *,
        close: bool = False,
    ) -> None:
        request, state, record = exchange.request, exchange.state, exchange.record
        record.status = status
        if record.cache == "MISS" and request.method not in CACHEABLE_METHODS:
            record.cache = "BYPASS"
        self.services.metrics.errors.labels(str(status), reason).inc()
        extra: Headers = [(b"x-cache", record.cache.encode()), (b"age", b"0")]
        if record.region != "-":
            extra.append((b"x-meridian-region", record.region.encode()))
        close = close or status in (400, 408, 413, 414, 431) or not request.keep_alive
        exchange.sink.write_complete(
            error_response(
                status,
                state.pop,
                reason,
                request.request_id,
                request_id_header=state.request_id_header,
                keep_alive=not close,
                retry_after=retry_after,
                extra=extra,
                head_only=request.method == "HEAD",
            ),
            close=close,
        )


__all__ = ["Responder"]
