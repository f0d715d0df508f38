"""How a fill fetches: the walk, then the upstream response read for the cache.

``FillFetch`` is the fetch ``HttpCache.fill`` (and ``refresh``) calls: a GET of the normalised
target through the upstream walk, whose response it turns into what the cache stores: the whole
body, decoded to identity.  What the cache will not keep (``HttpCache.storable_head``, or above
``max_object``) goes back to the request live in its ``Handover``, to stream (never buffered
whole), unless its body is whole in the client's buffer already (a small answer arrives with its
head): then it goes out with the head in one write.  Upstream failures raise ``FetchError``
inside the fill, so the cache can answer from a stale entry within stale-if-error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from http import HTTPStatus

from edge.cache import Lookup, UpstreamResponse
from edge.compress import DecompressionBomb, accepts, is_compressible
from edge.exchange import ErrorAnswer, ExchangeRecord, FetchError, ProxyRequest, accept_encoding
from edge.http1 import Headers, RequestRejected, rewrite_response_headers
from edge.router import RouteTarget
from edge.stages.services import EdgeServices
from edge.stages.walk import UpstreamCall, UpstreamWalk
from edge.state import EdgeState
from edge.transcode import DECODABLE, content_coding, decode_whole, decoded_headers
from edge.upstream import (
    UPSTREAM_BODY_ERRORS,
    Attempt,
    OriginResponse,
    UpstreamPool,
    upstream_headers,
)
from meridian.log import get_logger

log = get_logger("edge")

#: The standard reason phrases as stored: one bytes object each, not one per stored response.
_REASONS: dict[str, bytes] = {
    status.phrase: status.phrase.encode("latin-1") for status in HTTPStatus
}


class Handover:
    """A live upstream response that a fill's fetch hands back to its own request to stream
    (the cache will not store it), instead of buffering it whole.

    ``marker`` is the (incomplete) ``UpstreamResponse`` the fetch returned to the cache; the
    request streams the live body only when ``fill`` returns that very object.  ``close``
    releases whatever was not taken (the client went away, a stale answer won, ...).
    """

    __slots__ = ("abandoned", "attempt", "data", "length", "marker", "prefix", "response")

    def __init__(self) -> None:
        self.abandoned = False
        self.marker: UpstreamResponse | None = None
        self.response: OriginResponse | None = None
        self.attempt: Attempt | None = None
        self.length: int | None = None
        self.prefix: list[bytes] = []
        #: The whole body, when it was read before the hand-over (no live stream left).
        self.data: bytes | None = None

    def attach(
        self,
        marker: UpstreamResponse,
        response: OriginResponse,
        attempt: Attempt,
        length: int | None,
        prefix: list[bytes],
        data: bytes | None,
    ) -> None:
        self.marker = marker
        self.response = response
        self.attempt = attempt
        self.length = length
        self.prefix = prefix
        self.data = data

    async def body(self) -> AsyncIterator[bytes]:
        assert self.response is not None
        for chunk in self.prefix:
            yield chunk
        self.prefix = []
        async for chunk in self.response.content.iter_any():
            yield chunk

    def close(self, upstream: UpstreamPool) -> None:
        self.abandoned = True
        response, attempt = self.response, self.attempt
        self.response = self.attempt = None
        self.marker = None
        self.data = None
        if response is not None:
            response.release()
        if attempt is not None:
            upstream.release(attempt.backend)


class FillFetch:
    """``async (validators) -> UpstreamResponse`` for one fill; raises ``FetchError``.

    ``handover`` None (background refresh): nothing is streamed, and a response too big to
    buffer is dropped unstored.  ``record`` learns where each fetch went."""

    __slots__ = (
        "forwarded",
        "handover",
        "lookup",
        "record",
        "request",
        "services",
        "state",
        "target",
        "target_text",
        "walker",
    )

    def __init__(
        self,
        services: EdgeServices,
        walker: UpstreamWalk,
        request: ProxyRequest,
        state: EdgeState,
        target: RouteTarget,
        lookup: Lookup,
        forwarded: bytes,
        record: ExchangeRecord,
        handover: Handover | None,
    ) -> None:
        assert lookup.key is not None
        self.services = services
        self.walker = walker
        self.request = request
        self.state = state
        self.target = target
        self.lookup = lookup
        self.forwarded = forwarded
        self.target_text = lookup.key.target.decode("latin-1")
        self.record = record
        self.handover = handover

    async def __call__(self, validators: list[tuple[bytes, bytes]]) -> UpstreamResponse:
        headers = self.forwarded
        if validators:
            headers += upstream_headers(validators)
        record = self.record
        call = UpstreamCall(
            "GET",
            self.target_text,
            headers,
            None,
            None,
            None,
            self.request.request_id.decode("latin-1"),
        )
        if not record.attempts:  # the first fetch: the walk writes the request's record
            got = await self.walker.walk(self.state, self.target, record, call)
        else:
            # A second fetch (after a 304 for another representation) walks the regions
            # afresh; the request's record learns where it went.
            walk = ExchangeRecord()
            try:
                got = await self.walker.walk(self.state, self.target, walk, call)
            finally:
                record.attempts.extend(walk.attempts)
                if walk.region != "-":
                    record.region, record.backend = walk.region, walk.backend
                    record.upstream_seconds = walk.upstream_seconds
        if isinstance(got, ErrorAnswer):
            raise FetchError(got.status, got.reason, got.retry_after)
        if isinstance(got, RequestRejected):
            raise FetchError(got.status, got.reason)
        response, attempt = got
        return await self.read_for_cache(response, attempt)

    def _hand_over(
        self,
        response: OriginResponse,
        attempt: Attempt,
        status: int,
        headers: Headers,
        reason: bytes,
        length: int | None,
        prefix: list[bytes],
        data: bytes | None,
    ) -> tuple[UpstreamResponse, bool]:
        """The (incomplete) response returned to the cache for what it will not store, and
        whether ``handover`` took the live response (then the request releases it)."""
        marker = UpstreamResponse(status, headers, b"", reason, complete=False)
        handover = self.handover
        if handover is None or handover.abandoned:
            return marker, False  # a background refresh, or the client is gone: nothing to send
        handover.attach(marker, response, attempt, length, prefix, data)
        return marker, True

    async def read_for_cache(self, response: OriginResponse, attempt: Attempt) -> UpstreamResponse:
        """The upstream response as ``fill`` stores it: whole, decoded to identity.  What the
        cache will not keep goes back in ``handover``: live, or, when the edge must decode a
        small body for this client, read whole first (so a decompression bomb is a 502, not
        a truncated response)."""
        services = self.services
        cache = services.cache
        assert cache is not None
        handover = self.handover
        state = self.state
        kept = False

        try:
            status = response.status
            reason = _REASONS.get(response.reason) or response.reason.encode("latin-1", "replace")
            headers = rewrite_response_headers(
                response.raw_headers,
                dropped=state.dropped_response_headers,
                via=state.via,
                region=attempt.region,
            )
            if status < 200 or status in (204, 304):
                return UpstreamResponse(status, headers, b"", reason)
            edge = state.config.edge
            limit = edge.cache.max_object
            length = response.content_length
            content = response.content
            coding = content_coding(headers)
            decodable = coding is not None and coding in DECODABLE
            refused = cache.storable_head(self.lookup, status, headers)
            if refused is not None or (length is not None and length > limit):
                small_for_decoding = (
                    coding is not None
                    and decodable
                    and length is not None
                    and length <= limit
                    and not accepts(accept_encoding(self.request.headers), coding.decode("latin-1"))
                )
                if not small_for_decoding or handover is None or handover.abandoned:
                    if length is not None and length <= limit and content.is_eof():
                        # Already whole in the client's buffer (a small answer comes with its
                        # head): taken in one piece and sent in one write, not streamed.
                        marker, kept = self._hand_over(
                            response,
                            attempt,
                            status,
                            headers,
                            reason,
                            length,
                            [],
                            content.read_nowait(-1),
                        )
                        return marker
                    marker, kept = self._hand_over(
                        response, attempt, status, headers, reason, length, [], None
                    )
                    return marker
            if content.is_eof():
                body = content.read_nowait(-1)  # whole already: no reads to wait for
                if len(body) > limit:
                    marker, kept = self._hand_over(
                        response, attempt, status, headers, reason, length, [body], None
                    )
                    return marker
            else:
                chunks: list[bytes] = []
                size = 0
                async for chunk in content.iter_any():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:  # too big to keep: stream the rest
                        marker, kept = self._hand_over(
                            response, attempt, status, headers, reason, length, chunks, None
                        )
                        return marker
                body = b"".join(chunks)
            if refused is not None:
                marker, kept = self._hand_over(
                    response, attempt, status, headers, reason, len(body), [], body
                )
                return marker
            transcoder = services.transcoder
            if decodable:
                assert coding is not None and transcoder is not None
                try:
                    decoded = decode_whole(
                        body,
                        coding,
                        # Decoded past max_object it could not be stored anyway: the encoder
                        # decodes it for the client in bounded pieces instead.
                        min(edge.compression.max_decoded_size, limit),
                        transcoder.stats,
                        count_bomb=False,
                    )
                except (DecompressionBomb, ValueError):
                    # Not stored; whether this client gets it as it is or a 502 is the
                    # encoder's call (it passes the origin's coding to clients that accept it).
                    marker, kept = self._hand_over(
                        response, attempt, status, headers, reason, len(body), [], body
                    )
                    return marker
                body = decoded
                headers = decoded_headers(headers)
            compressible = transcoder is not None and is_compressible(
                status,
                headers,
                edge.compression,
                route=self.target.route.name,
                body_size=len(body),
            )
            return UpstreamResponse(status, headers, body, reason, compressible=compressible)
        except UPSTREAM_BODY_ERRORS as exc:
            # The origin died (or stalled) mid-body: nothing is stored, the client is told.
            log.warning(
                "upstream_broke_mid_body",
                backend=attempt.backend,
                error=type(exc).__name__,
                request_id=self.request.request_id.decode("ascii", "replace"),
            )
            services.metrics.upstream_failures.labels(attempt.region, "mid_body").inc()
            services.health.report(attempt.backend, False)
            raise FetchError(502, "upstream_broke_mid_body", close=True) from None
        finally:
            if not kept:
                response.release()
                services.upstream.release(attempt.backend)


__all__ = ["FillFetch", "Handover"]
