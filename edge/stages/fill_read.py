"""How a fill fetches: the walk, then the upstream response read for the cache.

``FillFetch`` is the fetch ``HttpCache.fill`` (and ``refresh``) calls: a GET of the normalised
target through the upstream walk, whose response it turns into what the cache stores: the whole
body, decoded to identity.  What the cache will not keep (``HttpCache.storable_head``, or above
``max_object``) goes back to the request live in its ``Handover``, to stream (never buffered
whole), unless its body is whole in the client's buffer already (a small answer arrives with its
head): then it goes out with the head in one write.  Upstream failures raise ``FetchError``
inside the fill, so the cache can answer from a stale entry within stale-if-error.

Responses of one kind (a ticker's, every second) differ only in a few fields: Date, ETag,
Last-Modified, Expires, Age, Content-Length, tracing IDs (``policy.VOLATILE_FIELDS``).
``HeadShapes`` remembers, per head shape (the origin's lines but those fields' values, the
status, and what else decides the result), what the edge and the cache make of it: the
rewritten header list as a template, the coding, whether it may be compressed, and the cache's
reading (``edge.cache.admission.StoredShape``).  A fill of a known shape then fills in the
volatile values instead of walking the lines once per stage.  A head whose exact line names
and stable lines were seen before with a made shape finds it without a ``ShapeKey``
(``HeadShapes.read``): its names tell which lines are volatile (``ShapePlan``), and the shape's
volatile values are taken from the lines where they are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from operator import itemgetter
from typing import Final

from edge.cache import Lookup, UpstreamResponse
from edge.cache.admission import Admission, StoredShape
from edge.cache.policy import VOLATILE_FIELDS
from edge.compress import DecompressionBomb, accepts, is_compressible
from edge.exchange import ErrorAnswer, ExchangeRecord, FetchError, ProxyRequest, accept_encoding
from edge.http1 import Headers, RequestRejected, rewrite_response_headers
from edge.memos import RESPONSE_SHAPES, BoundedMemo
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
from meridian.config import CacheRule
from meridian.log import get_logger

log = get_logger("edge")

#: The standard reason phrases as stored: one bytes object each, not one per stored response.
_REASONS: dict[str, bytes] = {
    status.phrase: status.phrase.encode("latin-1") for status in HTTPStatus
}


#: ``UpstreamCall`` and a stored ``UpstreamResponse`` made from all their fields by
#: ``tuple.__new__``, not the NamedTuples' generated ``__new__`` (one call per miss each).
_new_tuple: Final = tuple.__new__

#: Header lines of an origin head that may have a shape; its stable lines' bytes, at most.
_SHAPED_LINES = 48
_SHAPED_BYTES = 4096
#: Stand-ins for the volatile values while a shape's template is made: objects of their own,
#: recognised by identity (no origin's value is ever one of them).
_MARKS: tuple[bytes, ...] = tuple(b"\x00volatile %d\x00" % i for i in range(_SHAPED_LINES))

#: (the origin's lines, each a (name, value) line as received or, for a volatile field, its
#: lower-cased name; status; region; route; id of the cache rule).  The rule is held by the
#: shape's ``StoredShape`` (its id cannot be reused while the key exists).
ShapeKey = tuple[tuple[tuple[bytes, bytes] | bytes, ...], int, str, str, int]


class HeadShape:
    """What every fill response of one head shape becomes (module docstring)."""

    __slots__ = ("coding", "compressible", "fills", "stored", "template")

    def __init__(
        self,
        template: list[tuple[bytes, bytes]],
        fills: tuple[tuple[int, int, bytes], ...],
        coding: bytes | None,
        compressible: bool,
        stored: StoredShape | None,
    ) -> None:
        #: ``rewrite_response_headers``' list for the first response of the shape; each
        #: response's own values go in at ``fills``: (index there, index among the origin's
        #: volatile values, the field's name).
        self.template = template
        self.fills = fills
        #: ``content_coding`` of the list.
        self.coding = coding
        #: ``is_compressible`` of the list, but for the body's size (``min_size``).
        self.compressible = compressible
        #: The cache's reading of the list (None: the head is too long for one).
        self.stored = stored

    def headers(self, volatile: list[bytes]) -> Headers:
        """The rewritten header list of a response of this shape with these volatile values."""
        headers = self.template.copy()
        for at, index, name in self.fills:
            headers[at] = (name, volatile[index])
        return headers


#: The names of an origin head's lines, in order (``tuple(map(_NAME, raw))``: no Python loop).
_NAME: Final = itemgetter(0)


def _no_lines(raw: list[tuple[bytes, bytes]]) -> tuple[()]:
    return ()


class ShapePlan:
    """Which lines of an origin head with these exact names (in order) are volatile: what
    ``shape_key`` finds by lower-casing each name, found once per names."""

    __slots__ = ("stable", "volatile_at")

    def __init__(self, names: tuple[bytes, ...]) -> None:
        volatile = [at for at, name in enumerate(names) if name.lower() in VOLATILE_FIELDS]
        stable = [at for at in range(len(names)) if at not in volatile]
        #: Indexes of the volatile lines (the order of ``shape_key``'s volatile values).
        self.volatile_at = tuple(volatile)
        #: The stable lines of a head with these names (``itemgetter``: one line, not a
        #: tuple, when there is one; the plan in the key says how many there are).
        self.stable: Callable[[list[tuple[bytes, bytes]]], object] = (
            itemgetter(*stable) if stable else _no_lines
        )


#: (the ``ShapePlan`` of the exact line names, the stable lines as its ``stable`` takes them,
#: status, region, route, id of the cache rule): a ``ShapeKey`` of one spelling of its names
#: (the plan by identity: no second comparison of the names).
KnownKey = tuple[ShapePlan, object, int, str, str, int]


class HeadShapes:
    """The ``RESPONSE_SHAPES`` memo: ``HeadShape`` by ``ShapeKey``, for one edge state and one
    cache (another state or cache clears it: what the key leaves out is theirs).  A shape is
    made on its key's second sight (the first leaves None), so heads that never repeat cost a
    key and no template.

    ``known`` finds a made shape again without its ``ShapeKey`` (``read``): by the head's
    exact names and stable lines, with the shape's ``fills`` pointing at the head's own lines
    (``ShapePlan``s by names in ``plans``); each is bounded as ``memo`` and cleared with it on
    another state or cache."""

    __slots__ = ("admission", "known", "memo", "plans", "state")

    def __init__(self) -> None:
        self.memo: BoundedMemo[ShapeKey, HeadShape | None] = BoundedMemo(RESPONSE_SHAPES)
        self.state: EdgeState | None = None
        self.admission: Admission | None = None
        self.plans: BoundedMemo[tuple[bytes, ...], ShapePlan] = BoundedMemo(RESPONSE_SHAPES)
        #: (the shape, its fills as (index in its headers, index of the origin's line, name)).
        self.known: BoundedMemo[KnownKey, tuple[HeadShape, tuple[tuple[int, int, bytes], ...]]]
        self.known = BoundedMemo(RESPONSE_SHAPES)

    def read(
        self,
        raw: list[tuple[bytes, bytes]],
        status: int,
        state: EdgeState,
        region: str,
        route: str,
        admission: Admission,
        rule: CacheRule,
    ) -> tuple[HeadShape | None, Headers]:
        """The head shape of the origin's lines ``raw`` when known (or made now, on its second
        sight), and its headers as ``rewrite_response_headers`` makes them."""
        names = tuple(map(_NAME, raw))
        plan = self.plans.get(names)
        if plan is not None and state is self.state and admission is self.admission:
            known = self.known.get((plan, plan.stable(raw), status, region, route, id(rule)))
            if known is not None:
                shape, fills = known
                headers = shape.template.copy()  # ``HeadShape.headers``, from the lines
                for at, line, name in fills:
                    headers[at] = (name, raw[line][1])
                return shape, headers
        key, volatile = shape_key(raw, status, region, route, rule)
        if key is not None:
            made, seen = self.find(state, admission, key)
            if made is None and seen:
                made = self.make(key, raw, status, state, region, route, admission, rule)
            if made is not None:
                self._know(names, raw, made, status, region, route, rule)
                return made, made.headers(volatile)
        headers = rewrite_response_headers(
            raw, dropped=state.dropped_response_headers, via=state.via, region=region
        )
        return None, headers

    def _know(
        self,
        names: tuple[bytes, ...],
        raw: list[tuple[bytes, bytes]],
        shape: HeadShape,
        status: int,
        region: str,
        route: str,
        rule: CacheRule,
    ) -> None:
        """Remember ``shape`` for heads with ``raw``'s names and stable lines (``read``)."""
        plans, known = self.plans, self.known
        plan = plans.get(names)
        if plan is None:
            if len(plans) >= plans.bound:
                plans.clear()
            plan = plans[names] = ShapePlan(names)
        if len(known) >= known.bound:
            known.clear()
        volatile_at = plan.volatile_at
        fills = tuple((at, volatile_at[index], name) for at, index, name in shape.fills)
        known[(plan, plan.stable(raw), status, region, route, id(rule))] = (shape, fills)

    def find(
        self, state: EdgeState, admission: Admission, key: ShapeKey
    ) -> tuple[HeadShape | None, bool]:
        """The shape of ``key`` and whether it was seen before (then the caller makes it)."""
        memo = self.memo
        if state is not self.state or admission is not self.admission:
            memo.clear()
            self.plans.clear()
            self.known.clear()
            self.state, self.admission = state, admission
        shape = memo.get(key)
        if shape is not None:
            return shape, True
        if key in memo:
            return None, True
        if sum(len(line[0]) + len(line[1]) for line in key[0] if type(line) is tuple) > (
            _SHAPED_BYTES
        ):
            return None, False  # too big to keep a copy of
        if len(memo) >= memo.bound:
            memo.clear()
        memo[key] = None
        return None, False

    def make(
        self,
        key: ShapeKey,
        raw: list[tuple[bytes, bytes]],
        status: int,
        state: EdgeState,
        region: str,
        route: str,
        admission: Admission,
        rule: CacheRule,
    ) -> HeadShape:
        """The shape of ``raw`` (whose key is ``key``), remembered."""
        # ``rewrite_response_headers`` of the lines with each volatile value replaced by a
        # mark: where a mark comes out, each response's own value goes.
        origin: dict[int, int] = {}
        marked: list[tuple[bytes, bytes]] = []
        volatile: list[bytes] = []
        for part, line in zip(key[0], raw, strict=True):
            if type(part) is bytes:
                mark = _MARKS[len(origin)]
                origin[id(mark)] = len(origin)
                volatile.append(line[1])
                line = (line[0], mark)
            marked.append(line)
        template = rewrite_response_headers(
            marked, dropped=state.dropped_response_headers, via=state.via, region=region
        )
        fills: list[tuple[int, int, bytes]] = []
        for at, (name, value) in enumerate(template):
            index = origin.get(id(value), -1)
            if index >= 0:
                fills.append((at, index, name))
        shape = HeadShape(template, tuple(fills), None, False, None)
        headers = shape.headers(volatile)
        shape.template = list(headers)  # no mark left in it
        shape.coding = content_coding(headers)
        shape.compressible = is_compressible(
            status, headers, state.config.edge.compression, route=route
        )
        shape.stored = admission.stored_shape(headers, rule)
        memo = self.memo
        if len(memo) >= memo.bound and key not in memo:
            memo.clear()
        memo[key] = shape
        return shape


#: One per worker: a fill's shapes are those of its state and cache (``HeadShapes.find``).
_SHAPES = HeadShapes()


def shape_key(
    raw: list[tuple[bytes, bytes]], status: int, region: str, route: str, rule: CacheRule
) -> tuple[ShapeKey | None, list[bytes]]:
    """The ``ShapeKey`` of an origin head, and its volatile values in order (None: too many
    lines for a shape)."""
    volatile: list[bytes] = []
    if len(raw) > _SHAPED_LINES:
        return None, volatile
    parts: list[tuple[bytes, bytes] | bytes] = []
    for line in raw:
        lowered = line[0].lower()
        if lowered in VOLATILE_FIELDS:
            parts.append(lowered)
            volatile.append(line[1])
        else:
            parts.append(line)
    return (tuple(parts), status, region, route, id(rule)), volatile


class Handover:
    """A live upstream response that a fill's fetch hands back to its own request to stream
    (the cache will not store it), instead of buffering it whole: made only then
    (``FillFetch.handover``).

    ``marker`` is the (incomplete) ``UpstreamResponse`` the fetch returned to the cache; the
    request streams the live body only when ``fill`` returns that very object.  ``close``
    releases whatever was not taken (the client went away, a stale answer won, ...).
    """

    __slots__ = ("attempt", "data", "length", "marker", "prefix", "response")

    def __init__(
        self,
        marker: UpstreamResponse,
        response: OriginResponse,
        attempt: Attempt,
        length: int | None,
        prefix: list[bytes],
        data: bytes | None,
    ) -> None:
        self.marker: UpstreamResponse | None = marker
        self.response: OriginResponse | None = response
        self.attempt: Attempt | None = attempt
        self.length = length
        self.prefix = prefix
        #: The whole body, when it was read before the hand-over (no live stream left).
        self.data = data

    async def body(self) -> AsyncIterator[bytes]:
        assert self.response is not None
        for chunk in self.prefix:
            yield chunk
        self.prefix = []
        async for chunk in self.response.content.iter_any():
            yield chunk

    def close(self, upstream: UpstreamPool) -> None:
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

    ``live`` False (a background refresh, or a request that has stopped taking one): nothing
    is handed over to stream, and a response too big to buffer is dropped unstored; else
    ``handover`` is what was handed over, if anything.  ``record`` learns where each fetch
    went."""

    __slots__ = (
        "forwarded",
        "handover",
        "live",
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
        live: bool,
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
        self.live = live
        self.handover: Handover | None = None

    async def __call__(self, validators: list[tuple[bytes, bytes]]) -> UpstreamResponse:
        headers = self.forwarded
        if validators:
            headers += upstream_headers(validators)
        record = self.record
        call = _new_tuple(
            UpstreamCall,
            (
                "GET",
                self.target_text,
                headers,
                None,
                None,
                None,
                self.request.request_id.decode("latin-1"),
            ),
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
        whether a ``handover`` took the live response (then the request releases it)."""
        marker = UpstreamResponse(status, headers, b"", reason, complete=False)
        if not self.live:
            return marker, False  # a background refresh, or the client is gone: nothing to send
        self.handover = Handover(marker, response, attempt, length, prefix, data)
        return marker, True

    async def read_for_cache(self, response: OriginResponse, attempt: Attempt) -> UpstreamResponse:
        """The upstream response as ``fill`` stores it: whole, decoded to identity.  What the
        cache will not keep goes back in ``handover``: live, or, when the edge must decode a
        small body for this client, read whole first (so a decompression bomb is a 502, not
        a truncated response)."""
        services = self.services
        cache = services.cache
        assert cache is not None
        state = self.state
        kept = False

        try:
            status = response.status
            reason = _REASONS.get(response.reason) or response.reason.encode("latin-1", "replace")
            lookup = self.lookup
            key = lookup.key
            assert key is not None
            shape, headers = _SHAPES.read(
                response.raw_headers,
                status,
                state,
                attempt.region,
                self.target.route.name,
                cache.admission,
                key.rule,
            )
            if status < 200 or status in (204, 304):
                return UpstreamResponse(status, headers, b"", reason)
            edge = state.config.edge
            limit = edge.cache.max_object
            length = response.content_length
            content = response.content
            if shape is not None:
                coding = shape.coding
                request = lookup.request
                # ``HttpCache.storable_head``, told the head's shape.
                refused = (
                    "lookup"
                    if request is None
                    else cache.admission.storable_head(
                        key, request, status, headers, cache.clock(), shape.stored
                    )
                )
            else:
                coding = content_coding(headers)
                refused = cache.storable_head(lookup, status, headers)
            decodable = coding is not None and coding in DECODABLE
            if refused is not None or (length is not None and length > limit):
                small_for_decoding = (
                    coding is not None
                    and decodable
                    and length is not None
                    and length <= limit
                    and not accepts(accept_encoding(self.request.headers), coding.decode("latin-1"))
                )
                if not small_for_decoding or not self.live:
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
                shape = None  # not the shape's headers any more
            if transcoder is None:
                compressible = False
            elif shape is not None:
                compressible = shape.compressible and len(body) >= edge.compression.min_size
            else:
                compressible = is_compressible(
                    status,
                    headers,
                    edge.compression,
                    route=self.target.route.name,
                    body_size=len(body),
                )
            return _new_tuple(UpstreamResponse, (status, headers, body, reason, compressible, True))
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


__all__ = ["FillFetch", "Handover", "HeadShape", "HeadShapes", "ShapePlan", "shape_key"]
