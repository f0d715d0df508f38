"""The request path, in one place: request -> route -> cache -> upstream -> encode -> response.

A cache hit never leaves the protocol callback: ``Pipeline.fast_response`` (called from
``on_message_complete`` for a bodiless HTTP/1.1 GET/HEAD on an idle keep-alive connection) does
one ``HttpCache.lookup`` and returns the entry's prebuilt bytes (HIT, or STALE after starting
the one background ``refresh``), which the protocol writes in one ``transport.write``.  The
compressed variants live in the entry, built once, so a Brotli hit costs what an identity hit
costs.

Everything else runs ``Pipeline.handle`` in a task, stage by stage:

1. ``EdgeState.route``              route, service, regions ordered for this POP (memoised)
2. ``HttpCache.lookup``             the cache's verdict (reused from the fast path when it ran)
3. by verdict:

   * HIT / STALE / ONLY_IF_CACHED -> ``_write_wire``: the prebuilt bytes
   * MISS / REVALIDATE -> ``_fill``: ``HttpCache.fill`` with ``_fill_fetch`` (coalesced, L2,
     then ``_walk`` over regions/backends: retries, failover and passive health reports as for
     any request).  A response the cache will store is read whole (``_read_for_cache``); one it
     will not (``HttpCache.storable_head``) or one above ``max_object`` is handed back live
     and streamed (``_Handover``), unless its body is whole in aiohttp's buffer already (a
     small answer arrives with its head): then it goes out with the head in one write.
     Upstream failures raise ``_FetchError`` inside the fill, so the cache answers from a
     stale entry within its stale-if-error window, else the edge answers 502/503/504.
   * BYPASS (methods other than GET/HEAD, bypass rules, request bodies, preconditions) ->
     ``_forward``: the streaming proxy path (``_walk`` -> ``_from_upstream``), then
     ``HttpCache.invalidate`` for unsafe methods.  A request body up to
     ``REQUEST_BUFFER_LIMIT`` is read whole before a backend is picked (a trickling client
     holds no upstream connection); a larger one is streamed, within its share of the pool.

4. ``Pipeline.encode_response``      uncached responses: decode an origin coding the client
   does not accept, compress chunk by chunk at the stream levels (``edge.transcode``)
5. ``Pipeline.send``                 head + streamed body to the client through a ``ResponseSink``

Every response carries ``X-Cache`` and ``Age``; responses from the cache carry the
``X-Meridian-Region`` of the region that filled the entry.  Every stage sees the same
``EdgeState`` snapshot, pinned when the request starts, so a reload never changes a request
half-way.

What a miss costs is mostly aiohttp's client and the system calls; the rest is kept to what
is needed: no timer per request (the total deadline is the connection sweep's, see
``ResponseSink.expire_after``), metrics as plain numbers turned into Prometheus families on
scrape (``edge.admin``), access lines formatted at flush, upstream header lines built once
per memoised request head and client address then copied (``_fill_headers``), aiohttp's own
per-request header copies skipped (``edge.upstream.UpstreamRequest``), NamedTuples rather
than frozen dataclasses for the objects made per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Final, NamedTuple, Protocol

import aiohttp
from multidict import CIMultiDict

from edge.admin import EdgeMetrics
from edge.cache import (
    Fetch,
    HitMemo,
    HttpCache,
    Lookup,
    LookupKind,
    Prepared,
    UpstreamResponse,
)
from edge.cache.entry import Entry
from edge.cache.policy import upstream_request_headers
from edge.compress import DecompressionBomb, accepts, is_compressible
from edge.fdlimit import Throttle
from edge.http1 import (
    HOP_BY_HOP,
    BodyFraming,
    BodyKind,
    ForwardingContext,
    Headers,
    RequestRejected,
    connection_tokens,
    error_response,
    head_budget,
    is_trusted,
    new_request_id,
    response_framing,
    via_value,
)
from edge.request_target import UNKEYED_DROPPED_ON_FILL, forward_headers
from edge.router import Router, RouteTarget, normalise_host
from edge.transcode import (
    DECODABLE,
    BodyError,
    Transcoder,
    content_coding,
    decode_whole,
    decoded_headers,
)
from edge.upstream import (
    Attempt,
    FailureKind,
    HealthView,
    SnapshotView,
    UpstreamFailure,
    UpstreamPool,
    live_regions,
    next_attempt,
    retry_allowed,
    upstream_headers,
)
from meridian.config import Config
from meridian.log import current_format, format_event, get_logger, write_lines

log = get_logger("edge")
access_logger = get_logger("edge.access")

#: Methods a shared cache may answer; others are marked BYPASS.
CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
RETRY_AFTER_SECONDS = 5
#: Routes remembered per config snapshot by (host, path); cleared when full.
ROUTE_MEMO_SIZE = 4096
#: Request bodies up to this size are read whole before an upstream connection is taken
#: (``buffer_request_body``); larger ones are streamed.
REQUEST_BUFFER_LIMIT = 64 * 1024

_HIT: Final = LookupKind.HIT
_STALE: Final = LookupKind.STALE
_MISS: Final = LookupKind.MISS
_REVALIDATE: Final = LookupKind.REVALIDATE
_ONLY_IF_CACHED: Final = LookupKind.ONLY_IF_CACHED
_BYPASS: Final = LookupKind.BYPASS
_METHOD_BYTES: Final = {"GET": b"GET", "HEAD": b"HEAD"}
_SCHEME: Final = b"http"
_CLOSE_LINE: Final = b"connection: close\r\n"
_KEEP_ALIVE_LINE: Final = b"connection: keep-alive\r\n"
_X_CACHE_LABELS: Final = {
    b"HIT": "HIT",
    b"MISS": "MISS",
    b"STALE": "STALE",
    b"REVALIDATED": "REVALIDATED",
    b"BYPASS": "BYPASS",
}


@dataclass(frozen=True, slots=True)
class EdgeState:
    """Everything a request reads from config, built once per config generation."""

    config: Config
    generation: int
    pop: str
    router: Router
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...]
    request_id_header: bytes
    failure_statuses: frozenset[int]
    #: ``request_id_header`` as aiohttp takes header names.
    request_id_name: str = ""
    #: Upstream response headers never passed on: hop-by-hop, framing, the edge's own.
    dropped_response_headers: frozenset[bytes] = frozenset()
    #: ``Via`` value this POP adds to responses.
    via: bytes = b""
    #: Per-request limits and client deadlines, precomputed for the protocol's callbacks:
    #: raw head bytes allowed (``http1.head_budget``), and seconds per deadline kind
    #: (none, header, body, idle: ``edge.protocol``'s ``_DEADLINE_*`` indexes).
    head_budget: int = 0
    deadlines: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    max_headers: int = 0
    max_header_bytes: int = 0
    #: Request headers the protocol notes as they arrive: Host, framing, the request ID.
    tracked_headers: frozenset[bytes] = frozenset()
    #: Raw request chunk -> its parsed head (``RequestHead``), for requests validated under
    #: this snapshot's limits (a reload starts afresh).
    request_heads: dict[bytes, RequestHead] = field(default_factory=dict)
    #: (Host header, path) -> route; filled lazily, dropped with the snapshot.
    route_memo: dict[tuple[bytes | None, str], RouteTarget | None] = field(default_factory=dict)

    @classmethod
    def build(cls, config: Config, pop: str, generation: int) -> EdgeState:
        edge = config.edge
        return cls(
            config=config,
            generation=generation,
            pop=pop,
            router=Router(config, pop),
            trusted_proxies=edge.trusted_proxies,
            request_id_header=edge.request_id_header.lower().encode(),
            failure_statuses=frozenset(config.outlier.failure_statuses),
            request_id_name=edge.request_id_header.lower(),
            dropped_response_headers=HOP_BY_HOP
            | {
                b"content-length",
                b"x-cache",
                b"x-meridian-region",
                edge.request_id_header.lower().encode(),
            },
            via=via_value("1.1", pop),
            head_budget=head_budget(edge.limits),
            deadlines=(
                0.0,
                edge.timeouts.client_header,
                edge.timeouts.client_body,
                edge.timeouts.client_idle,
            ),
            max_headers=edge.limits.max_headers,
            max_header_bytes=edge.limits.max_header_bytes,
            tracked_headers=frozenset(
                {
                    b"host",
                    b"content-length",
                    b"transfer-encoding",
                    b"connection",
                    edge.request_id_header.lower().encode(),
                }
            ),
        )

    def route(self, host: bytes | None, path: str) -> RouteTarget | None:
        key = (host, path)
        memo = self.route_memo
        try:
            return memo[key]
        except KeyError:
            pass
        target = self.router.match(normalise_host(host), path)
        if len(memo) >= ROUTE_MEMO_SIZE:
            memo.clear()
        memo[key] = target
        return target


class ProxyRequest(NamedTuple):
    """A request head as the protocol parsed and validated it (a NamedTuple: one is made per
    request, and a frozen dataclass costs several microseconds more to build)."""

    method: str
    #: The request-target in origin form, bytes as received (absolute form is reduced).
    target: bytes
    path: str
    #: The decided host (``edge.request_target``): validated and normalised, an absolute-form
    #: target's authority over Host; the Host line of ``headers`` carries the same value.
    host: bytes | None
    http_version: str
    headers: Headers
    keep_alive: bool
    client_ip: str
    body: BodyFraming
    request_id: bytes
    #: ``loop.time()`` when the head was complete.
    received_at: float
    #: The client sent the request ID (echoed on cache hits too; a generated one is not).
    request_id_supplied: bool = False
    #: The memoised head this request was replayed from (``edge.protocol``), if any.
    head: RequestHead | None = None


class RequestHead:
    """A validated bodiless HTTP/1.1 keep-alive GET/HEAD, by the exact bytes it came in.

    Parsing and validation are a pure function of those bytes (under one config snapshot's
    limits), so when a connection at a message boundary receives exactly the same chunk again
    (clients repeat their requests byte for byte) the protocol replays this instead of running
    httptools and its callbacks.  It also keeps what the hit path derives from the head alone:
    the cache's ``Prepared`` lookup and the route name.  Lives in ``EdgeState.request_heads``.
    """

    __slots__ = (
        "fill_headers",
        "headers",
        "hit",
        "host",
        "method",
        "path",
        "prepared",
        "route",
        "supplied_id",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        path: str,
        host: bytes | None,
        headers: Headers,
        supplied_id: bytes | None,
    ) -> None:
        self.method = method
        self.target = target
        self.path = path
        self.host = host
        self.headers = headers
        #: The client's request ID when it sent one (valid); None: a new one per request.
        self.supplied_id = supplied_id
        self.prepared: Prepared | None = None
        self.route: str | None = None
        #: A fill's upstream request headers by client address, without the request ID
        #: (``Pipeline._fill_headers``); a few addresses at most, cleared when full.
        self.fill_headers: dict[str, CIMultiDict[str]] | None = None
        #: The last fresh hit for these bytes, replayed while it holds (``Pipeline.replay_hit``).
        self.hit: HitReplay | None = None


class HitReplay(NamedTuple):
    """A memoised hit (or stale-while-revalidate answer) and what its metrics and access line
    need."""

    memo: HitMemo
    route: str
    region: str
    status: int
    #: The cache status to count and log: HIT, or STALE (served while one refresh runs).
    label: str


class RequestBody(Protocol):
    """The request body as the connection streams it (see ``edge.protocol.StreamedBody``)."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @property
    def error(self) -> RequestRejected | None: ...


class ResponseSink(Protocol):
    """The connection's side of a response; framing headers are the sink's business."""

    @property
    def response_started(self) -> bool: ...

    @property
    def write_paused(self) -> bool: ...

    @property
    def bytes_sent(self) -> int: ...

    def start_response(
        self,
        status: int,
        reason: bytes,
        headers: Headers,
        framing: BodyFraming,
        head_length: int | None,
    ) -> None: ...

    def write_body(self, data: bytes) -> None: ...

    def end_response(self) -> None: ...

    def write_complete(self, data: bytes, *, close: bool) -> None: ...

    def abort(self) -> None: ...

    async def drain(self) -> None: ...

    def expire_after(self, seconds: float) -> None:
        """Cancel the task handling the request once ``seconds`` have passed (roughly)."""

    @property
    def deadline_expired(self) -> bool:
        """Whether that cancellation happened (it is then a deadline, not a disconnect)."""


class HealthSource(Protocol):
    """``meridian.health.HealthMonitor`` as the request path uses it."""

    @property
    def snapshot(self) -> HealthView: ...

    def report(self, backend_url: str, ok: bool) -> None: ...


class OutgoingResponse(NamedTuple):
    """A response on its way to the client (a NamedTuple: one or two are made per request)."""

    status: int
    reason: bytes
    #: Final headers (lower-case names) without Content-Length/Transfer-Encoding/Connection.
    headers: Headers
    #: Body length when known (sent as Content-Length), None to stream it chunked.
    length: int | None
    body: AsyncIterable[bytes] | None
    #: For HEAD/304: the Content-Length to advertise without a body.
    head_length: int | None = None
    #: The whole body when it is in memory (``body`` then yields exactly this), so the
    #: encoder can compress it in one piece with an exact length.
    data: bytes | None = None


@dataclass(slots=True)
class ExchangeRecord:
    """What the access log and the metrics learn about one request as it goes (mutable on
    purpose: each stage fills in its part)."""

    route: str = "-"
    region: str = "-"
    backend: str = "-"
    cache: str = "MISS"
    status: int = 0
    upstream_seconds: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
    #: The request body is streamed (too large to buffer): its pool slot is of the share
    #: streamed bodies may hold (``UpstreamPool``).
    streamed_body: bool = False


_Pending = tuple[float, str, float, float, bytes, str]
_MiddleKey = tuple[str, int, int, str, str, str, str, int]


class AccessLog:
    """One structured line per request, batched: written once per flush (every sweep of the
    connections, or 256 lines), not once per request.  Same line format as ``meridian.log``
    (logfmt or JSON, to the stream the CLI configured), but formatted here with a cheaper path
    for the plain values an access line holds; disabled when the level is above info.

    ``record_request`` (every request the edge answers, hits and misses alike) keeps a tuple
    and the line is put together at ``flush``; its constant middle (method, path, status,
    bytes, cache, region, backend, attempts) is built once per distinct value."""

    def __init__(self) -> None:
        #: Formatted lines, and requests still to format (at flush, in order).
        self._lines: list[str | _Pending] = []
        self._middles: dict[_MiddleKey, str] = {}
        self._enabled = access_logger.enabled(logging.INFO)
        self._second = -1
        self._stamp = ""
        self._millisecond = -1
        self._prefix = ""

    @property
    def enabled(self) -> bool:
        return self._enabled

    def configure(self, enabled: bool) -> None:
        """Switch the access log on or off (``edge.access_log``, at start and on reload);
        it stays off while the ``edge.access`` logger's level is above info."""
        if not enabled:
            self.flush()
        self._enabled = enabled and access_logger.enabled(logging.INFO)

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int(now * 1000) % 1000:03d}Z"

    def record(self, **fields: object) -> None:
        if not self._enabled:
            return
        if current_format() == "json":
            line = format_event("info", "edge.access", "access", fields, "json")
        else:
            parts = [f"ts={self._timestamp()} level=info logger=edge.access event=access"]
            for key, value in fields.items():
                parts.append(f"{key}={_logfmt(str(value))}")
            line = " ".join(parts)
        self._add(line)

    def record_request(
        self,
        method: str,
        path: str,
        status: int,
        cache: str,
        region: str,
        backend: str,
        attempts: int,
        upstream: float,
        sent: int,
        total: float,
        request_id: bytes,
        client_ip: str,
    ) -> None:
        """The access line of one request: the same fields as ``record``, in the same order,
        for about half a microsecond here (logfmt formatting waits for ``flush``)."""
        if not self._enabled:
            return
        if current_format() == "json":
            self.record(
                method=method,
                path=path,
                status=status,
                bytes=sent,
                cache=cache,
                region=region,
                backend=backend,
                attempts=attempts,
                upstream_ms=round(upstream * 1000, 2),
                total_ms=round(total * 1000, 2),
                request_id=request_id.decode("ascii", "replace"),
                client=client_ip,
            )
            return
        key = (path, status, sent, cache, region, method, backend, attempts)
        middle = self._middles.get(key)
        if middle is None:
            middle = self._middle(key)
        lines = self._lines
        lines.append((time.time(), middle, upstream, total, request_id, client_ip))
        if len(lines) >= 256:
            self.flush()

    def _middle(self, key: _MiddleKey) -> str:
        path, status, sent, cache, region, method, backend, attempts = key
        middle = (
            f" method={_logfmt(method)} path={_logfmt(path)} status={status} bytes={sent}"
            f" cache={_logfmt(cache)} region={_logfmt(region)} backend={_logfmt(backend)}"
            f" attempts={attempts} upstream_ms="
        )
        if len(self._middles) >= 4096:  # bounded: paths are the client's choice
            self._middles.clear()
        self._middles[key] = middle
        return middle

    def _format(self, item: _Pending) -> str:
        now, middle, upstream, total, request_id, client = item
        millisecond = int(now * 1000)
        if millisecond != self._millisecond:  # lines of one millisecond share their prefix
            self._millisecond = millisecond
            self._prefix = (
                f"ts={self._stamp_of(millisecond // 1000)}.{millisecond % 1000:03d}Z"
                " level=info logger=edge.access event=access"
            )
        rid = request_id.decode("ascii", "replace")
        if _NEEDS_QUOTES.search(rid):
            rid = json.dumps(rid)
        return (
            f"{self._prefix}{middle}{round(upstream * 1000, 2)}"
            f" total_ms={round(total * 1000, 2)} request_id={rid} client={_logfmt(client)}"
        )

    def _stamp_of(self, second: int) -> str:
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._stamp

    def _add(self, line: str) -> None:
        self._lines.append(line)
        if len(self._lines) >= 256:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        lines = [item if isinstance(item, str) else self._format(item) for item in self._lines]
        self._lines.clear()
        write_lines("\n".join(lines) + "\n")


def _logfmt(text: str) -> str:
    """A logfmt value: as it is, or JSON-quoted when empty or holding a separator."""
    if not text or _NEEDS_QUOTES.search(text):
        return json.dumps(text)
    return text


_NEEDS_QUOTES = re.compile(r'[ ="\\\n\t]')


#: A request waiting for a response head: its regions and its attempts so far.
_Waiting = tuple[tuple[str, ...], list[Attempt]]


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


class _FetchError(Exception):
    """A fill's fetch got no usable response (raised inside ``HttpCache.fill``, so a stale
    entry within its stale-if-error window is served instead; otherwise the edge answers)."""

    def __init__(
        self, status: int, reason: str, retry_after: int | None = None, *, close: bool = False
    ) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        self.close = close


class _Handover:
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
        self.response: aiohttp.ClientResponse | None = None
        self.attempt: Attempt | None = None
        self.length: int | None = None
        self.prefix: list[bytes] = []
        #: The whole body, when it was read before the hand-over (no live stream left).
        self.data: bytes | None = None

    def attach(
        self,
        marker: UpstreamResponse,
        response: aiohttp.ClientResponse,
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


class Pipeline:
    """The request path of one worker process."""

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
        #: Tasks waiting for a response head, by backend, with where else they could go
        #: (``on_health``), and the ones it cancelled to retry elsewhere.
        self._waiting: dict[str, dict[asyncio.Task[object], _Waiting]] = {}
        self._abandoning: set[asyncio.Task[object]] = set()
        self._own_failures = {FailureKind.POOL: Throttle(), FailureKind.LOCAL: Throttle()}
        #: The fast path's lookup of a request it did not answer, for the protocol to take at
        #: once (``take_pending``) and hand to ``handle`` (a second lookup would count a
        #: bypass twice and cost a second key build).
        self._pending: tuple[ProxyRequest, Lookup] | None = None

    # -- stage 0: the fast path ---------------------------------------------------------------

    def fast_response(self, request: ProxyRequest) -> bytes | None:
        """Complete response bytes for a cache hit (fresh, or stale while one background
        refresh runs), else None.

        Called synchronously from ``on_message_complete`` (or a replayed ``RequestHead``) for
        a bodiless HTTP/1.1 GET/HEAD on a keep-alive connection with nothing in flight; the
        protocol writes the bytes in one ``transport.write``.  Metrics and the access line
        are accounted here.
        """
        cache = self.cache
        if cache is None or request.http_version != "1.1":
            return None
        extra = self._request_id_line(request) if request.request_id_supplied else b""
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
            lookup = cache.lookup_prepared(prepared, now, extra)
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
        if kind is _HIT:
            label = "HIT"
        elif kind is _STALE:
            label = "STALE"
            if lookup.refresh:
                self._refresh(request, lookup)
        else:
            self._pending = (request, lookup)
            return None
        wire = lookup.wire
        state = self.state
        route = head.route if head is not None else None
        if route is None:
            target = state.route(request.host, request.path)
            route = target.route.name if target is not None else "-"
            if head is not None:
                head.route = route
        region = _entry_region(lookup.entry)
        status = int(wire[9:12])
        if prepared is not None and head is not None:
            memo = cache.memo_hit(prepared, lookup, now)
            if memo is not None:
                head.hit = HitReplay(memo, route, region, status, label)
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
            )
        return wire

    def replay_hit(self, head: RequestHead, client_ip: str) -> bytes | None:
        """The bytes of ``head.hit`` when that answer still holds (same stored entry, same
        Age second, still fresh or still within stale-while-revalidate, no reload), else None
        (and the memo is dropped).  The cheapest answer the edge gives: no request object, no
        key, no freshness arithmetic; still counted in the metrics and the access log like any
        hit."""
        replay = head.hit
        cache = self.cache
        if replay is None or cache is None:
            return None
        started = self.clock()
        memo = replay.memo
        if not cache.replay_hit(memo, cache.clock()):
            head.hit = None
            return None
        wire = memo.wire
        total = self.clock() - started
        self.metrics.observe_request(
            replay.route,
            replay.status,
            replay.label,
            replay.region,
            total,
            self.state.config.edge.latency_target,
        )
        if self.access_log.enabled:
            supplied = head.supplied_id
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
                supplied if supplied is not None else new_request_id(),
                client_ip,
            )
        return wire

    # -- the slow path ------------------------------------------------------------------------

    async def handle(
        self,
        request: ProxyRequest,
        body: RequestBody | None,
        sink: ResponseSink,
        lookup: Lookup | None = None,
    ) -> None:
        """The slow path of one request.  ``lookup``: what ``fast_response`` found for it
        (``take_pending``), so that the cache is not asked twice."""
        state = self.state
        record = ExchangeRecord()
        stats = self.metrics.upstream_stats
        stats.in_flight += 1
        try:
            target = state.route(request.host, request.path)
            if target is None:
                await self._send_error(sink, request, state, record, 404, "no_route")
                return
            record.route = target.route.name
            # The total deadline: the connection's sweep cancels this task when it passes (no
            # timer per request); the cancellation is turned into a 504 here.
            sink.expire_after(state.config.edge.timeouts.total)
            try:
                await self._proxy(request, body, sink, state, target, record, lookup)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not sink.deadline_expired or task is None or task.uncancel() > 0:
                    raise  # the client went away (or another cancellation came too)
                if sink.response_started:
                    sink.abort()
                    record.status = record.status or 504
                else:
                    await self._send_error(sink, request, state, record, 504, "deadline_exceeded")
        finally:
            stats.in_flight -= 1
            self._account(request, state, record, sink.bytes_sent)

    async def _proxy(
        self,
        request: ProxyRequest,
        body: RequestBody | None,
        sink: ResponseSink,
        state: EdgeState,
        target: RouteTarget,
        record: ExchangeRecord,
        pending: Lookup | None,
    ) -> None:
        lookup = pending if pending is not None else self._lookup(request, state)
        kind = _BYPASS if lookup is None else lookup.kind
        if lookup is not None and kind in (_HIT, _STALE, _ONLY_IF_CACHED):
            record.cache = "MISS" if kind is _ONLY_IF_CACHED else kind.name
            record.region = _entry_region(lookup.entry)
            if kind is _STALE and lookup.refresh:
                self._refresh(request, lookup)
            self._write_wire(sink, request, lookup.wire, record)
            return
        if lookup is not None and (kind is _MISS or kind is _REVALIDATE):
            await self._fill(request, sink, state, target, record, lookup)
            return
        if self.cache is None and request.method in CACHEABLE_METHODS:
            record.cache = "MISS"  # no cache at all: nothing was bypassed
        else:
            record.cache = "BYPASS"
        await self._forward(request, body, sink, state, target, record)

    # -- stage 2: cache lookup ----------------------------------------------------------------

    def _lookup(self, request: ProxyRequest, state: EdgeState) -> Lookup | None:
        cache = self.cache
        if cache is None:
            return None
        method = _METHOD_BYTES.get(request.method, request.method.encode("ascii", "replace"))
        return cache.lookup(
            method,
            _SCHEME,
            request.host or b"",
            request.target,
            request.headers,
            None,
            self._cached_extra(request, state),
        )

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
        if lookup.kind is _MISS or lookup.kind is _REVALIDATE or lookup.kind is _BYPASS:
            return lookup  # carries no bytes: nothing about the connection is baked in
        return None

    def _request_id_line(self, request: ProxyRequest) -> bytes:
        return self.state.request_id_header + b": " + request.request_id + b"\r\n"

    def _cached_extra(self, request: ProxyRequest, state: EdgeState) -> bytes:
        """Per-request header lines for bytes from the cache on the slow path."""
        extra = self._request_id_line(request) if request.request_id_supplied else b""
        return extra + _connection_line(request)

    def _write_wire(
        self, sink: ResponseSink, request: ProxyRequest, wire: bytes, record: ExchangeRecord
    ) -> None:
        record.status = int(wire[9:12])
        sink.write_complete(wire, close=not request.keep_alive)

    # -- stage 3a: fill (MISS / REVALIDATE) ---------------------------------------------------

    async def _fill(
        self,
        request: ProxyRequest,
        sink: ResponseSink,
        state: EdgeState,
        target: RouteTarget,
        record: ExchangeRecord,
        lookup: Lookup,
    ) -> None:
        cache = self.cache
        assert cache is not None
        handover = _Handover()
        fetch = self._fill_fetch(request, state, target, record, lookup, handover)
        extra = self._request_id_line(request) + _connection_line(request)
        try:
            try:
                filled = await cache.fill(lookup, fetch, extra)
            except _FetchError as exc:
                await self._send_error(
                    sink,
                    request,
                    state,
                    record,
                    exc.status,
                    exc.reason,
                    exc.retry_after,
                    close=exc.close,
                )
                return
            if filled.wire is not None:
                record.cache = _X_CACHE_LABELS.get(filled.x_cache, "MISS")
                if filled.entry is not None:
                    record.region = _entry_region(filled.entry)
                self._write_wire(sink, request, filled.wire, record)
                return
            record.cache = "MISS"
            response = filled.response
            assert response is not None
            outgoing = self._unstored(request, state, response, handover)
            if outgoing is None:
                await self._send_error(sink, request, state, record, 502, "upstream_incomplete")
                return
            try:
                outgoing = self.encode_response(request, target, outgoing)
            except BodyError as exc:
                await self._send_error(sink, request, state, record, 502, exc.reason)
                return
            await self.send(sink, request, outgoing, record)
        finally:
            handover.close(self.upstream)

    def _fill_fetch(
        self,
        request: ProxyRequest,
        state: EdgeState,
        target: RouteTarget,
        record: ExchangeRecord,
        lookup: Lookup,
        handover: _Handover | None,
    ) -> Fetch:
        """The fetch a fill calls: ``async (validators) -> UpstreamResponse``, a GET of the
        normalised target with the client's headers minus its conditionals and minus unkeyed
        headers that could change the response; raises ``_FetchError`` on failure.

        ``handover`` None (background refresh): nothing is streamed, and a response too big to
        buffer is dropped unstored."""
        assert lookup.key is not None
        forwarded = self._fill_headers(request, state)
        target_text = lookup.key.target.decode("latin-1")

        async def fetch(validators: list[tuple[bytes, bytes]]) -> UpstreamResponse:
            # Each call walks the regions afresh (a fill may fetch twice: after a 304 for
            # another representation); the request's record learns where it went.
            walk = ExchangeRecord()
            headers = forwarded
            if validators:
                headers = forwarded.copy()
                headers.extend(upstream_headers(validators))
            try:
                got = await self._walk(
                    "GET",
                    target_text,
                    headers,
                    None,
                    state,
                    target,
                    walk,
                )
            finally:
                record.attempts.extend(walk.attempts)
                if walk.region != "-":
                    record.region, record.backend = walk.region, walk.backend
                    record.upstream_seconds = walk.upstream_seconds
            if isinstance(got, _EdgeError):
                raise _FetchError(got.status, got.reason, got.retry_after)
            if isinstance(got, RequestRejected):
                raise _FetchError(got.status, got.reason)
            response, attempt = got
            return await self._read_for_cache(
                request, state, target, lookup, response, attempt, handover
            )

        return fetch

    def _fill_headers(self, request: ProxyRequest, state: EdgeState) -> CIMultiDict[str]:
        """A fill's upstream request headers (``_fill_request_headers`` minus the client's
        conditionals), ready for aiohttp.  For a memoised request head they depend on the
        client address and the request ID alone: built once per address, then copied."""
        head = request.head
        if head is None:
            return upstream_headers(
                upstream_request_headers(self._fill_request_headers(request, state), ())
            )
        memo = head.fill_headers
        if memo is None:
            memo = head.fill_headers = {}
        base = memo.get(request.client_ip)
        if base is None:
            lines = upstream_request_headers(self._fill_request_headers(request, state), ())
            if lines[-1][0] != state.request_id_header:  # it comes last; never otherwise
                return upstream_headers(lines)
            base = upstream_headers(lines[:-1])
            if len(memo) >= 16:
                memo.clear()
            memo[request.client_ip] = base
        headers = base.copy()
        headers.add(state.request_id_name, request.request_id.decode("latin-1"))
        return headers

    def _fill_request_headers(self, request: ProxyRequest, state: EdgeState) -> Headers:
        """A fill's upstream headers: built from the screened request (its Host line is the
        key's host, ``edge.request_target``), never from anything the key does not hold."""
        return forward_headers(request.headers, self._forwarding(request, state), fill=True)

    async def _read_for_cache(
        self,
        request: ProxyRequest,
        state: EdgeState,
        target: RouteTarget,
        lookup: Lookup,
        response: aiohttp.ClientResponse,
        attempt: Attempt,
        handover: _Handover | None,
    ) -> UpstreamResponse:
        """Turn an upstream response into what ``fill`` stores: the whole body, decoded to
        identity.  What the cache will not keep goes back to the request in ``handover``:
        live, to stream (never buffered whole), or, when the edge must decode a small body
        for this client, read whole first (so a decompression bomb is a 502, not a truncated
        response)."""
        cache = self.cache
        assert cache is not None
        kept = False

        def hand_over(
            length: int | None, prefix: list[bytes], data: bytes | None
        ) -> UpstreamResponse:
            nonlocal kept
            marker = UpstreamResponse(status, headers, b"", reason, complete=False)
            if handover is None or handover.abandoned:
                return marker  # a background refresh, or the client is gone: nothing to send
            handover.attach(marker, response, attempt, length, prefix, data)
            kept = True
            return marker

        try:
            status = response.status
            reason = (response.reason or "").encode("latin-1", "replace")
            headers = self._upstream_headers(response.raw_headers, state, attempt.region)
            if status < 200 or status in (204, 304):
                return UpstreamResponse(status, headers, b"", reason)
            edge = state.config.edge
            limit = edge.cache.max_object
            length = response.content_length
            content = response.content
            coding = content_coding(headers)
            decodable = coding is not None and coding in DECODABLE
            refused = cache.storable_head(lookup, status, headers)
            if refused is not None or (length is not None and length > limit):
                small_for_decoding = (
                    coding is not None
                    and decodable
                    and length is not None
                    and length <= limit
                    and not accepts(_accept_encoding(request.headers), coding.decode("latin-1"))
                )
                if not small_for_decoding or handover is None or handover.abandoned:
                    if length is not None and length <= limit and content.is_eof():
                        # Already whole in aiohttp's buffer (a small answer comes with its
                        # head): taken in one piece and sent in one write, not streamed.
                        return hand_over(length, [], content.read_nowait(-1))
                    return hand_over(length, [], None)
            if content.is_eof():
                body = content.read_nowait(-1)  # whole already: no reads to wait for
                if len(body) > limit:
                    return hand_over(length, [body], None)
            else:
                chunks: list[bytes] = []
                size = 0
                async for chunk in content.iter_any():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        return hand_over(length, chunks, None)  # too big to keep: stream the rest
                body = b"".join(chunks)
            if refused is not None:
                return hand_over(len(body), [], body)
            if decodable:
                assert coding is not None and self.transcoder is not None
                try:
                    decoded = decode_whole(
                        body,
                        coding,
                        # Decoded past max_object it could not be stored anyway: the encoder
                        # decodes it for the client in bounded pieces instead.
                        min(edge.compression.max_decoded_size, limit),
                        self.transcoder.stats,
                        count_bomb=False,
                    )
                except (DecompressionBomb, ValueError):
                    # Not stored; whether this client gets it as it is or a 502 is the
                    # encoder's call (it passes the origin's coding to clients that accept it).
                    return hand_over(len(body), [], body)
                body = decoded
                headers = decoded_headers(headers)
            compressible = self.transcoder is not None and is_compressible(
                status, headers, edge.compression, route=target.route.name, body_size=len(body)
            )
            return UpstreamResponse(status, headers, body, reason, compressible=compressible)
        except (aiohttp.ClientError, ConnectionError, OSError, TimeoutError) as exc:
            # The origin died (or stalled) mid-body: nothing is stored, the client is told.
            log.warning(
                "upstream_broke_mid_body",
                backend=attempt.backend,
                error=type(exc).__name__,
                request_id=request.request_id.decode("ascii", "replace"),
            )
            self.metrics.upstream_failures.labels(attempt.region, "mid_body").inc()
            self.health.report(attempt.backend, False)
            raise _FetchError(502, "upstream_broke_mid_body", close=True) from None
        finally:
            if not kept:
                response.release()
                self.upstream.release(attempt.backend)

    def _unstored(
        self,
        request: ProxyRequest,
        state: EdgeState,
        response: UpstreamResponse,
        handover: _Handover,
    ) -> OutgoingResponse | None:
        """The response to send for a fill the cache did not store (X-Cache: MISS)."""
        headers = list(response.headers)
        headers.append((b"x-cache", b"MISS"))
        if not any(name == b"age" for name, _ in headers):
            headers.append((b"age", b"0"))
        headers.append((state.request_id_header, request.request_id))
        status = response.status
        no_body = request.method == "HEAD" or status < 200 or status in (204, 304)
        data: bytes | None
        length: int | None
        if response is handover.marker and handover.data is not None:
            data = handover.data
            length = len(data)
            body: AsyncIterable[bytes] | None = None if no_body else _one(data)
        elif response is handover.marker:
            length = handover.length
            body = None if no_body else handover.body()
            data = None
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

    def _refresh(self, request: ProxyRequest, lookup: Lookup) -> None:
        """Stale-while-revalidate: one background fetch per key (the cache dedupes)."""
        cache = self.cache
        state = self.state
        target = state.route(request.host, request.path)
        if cache is None or target is None:
            return
        fetch = self._fill_fetch(request, state, target, ExchangeRecord(), lookup, None)
        deadline = state.config.edge.timeouts.total

        async def bounded(validators: list[tuple[bytes, bytes]]) -> UpstreamResponse:
            async with asyncio.timeout(deadline):
                return await fetch(validators)

        cache.refresh(lookup, bounded)

    # -- stage 3b: forward (BYPASS) -----------------------------------------------------------

    async def _forward(
        self,
        request: ProxyRequest,
        body: RequestBody | None,
        sink: ResponseSink,
        state: EdgeState,
        target: RouteTarget,
        record: ExchangeRecord,
    ) -> None:
        fetched = await self.fetch(request, body, state, target, record)
        if isinstance(fetched, RequestRejected):
            await self._send_error(sink, request, state, record, fetched.status, fetched.reason)
            return
        if isinstance(fetched, _EdgeError):
            await self._send_error(
                sink, request, state, record, fetched.status, fetched.reason, fetched.retry_after
            )
            return
        response, attempt = fetched
        try:
            outgoing = self._from_upstream(request, state, record, response, attempt)
            cache = self.cache
            if cache is not None and request.method not in CACHEABLE_METHODS:
                cache.invalidate(
                    request.method.encode("ascii", "replace"),
                    response.status,
                    _SCHEME,
                    request.host or b"",
                    request.target,
                    outgoing.headers,
                )
            try:
                outgoing = self.encode_response(request, target, outgoing)
            except BodyError as exc:
                await self._send_error(sink, request, state, record, 502, exc.reason)
                return
            await self.send(sink, request, outgoing, record)
        finally:
            response.release()
            self.upstream.release(attempt.backend, streamed=record.streamed_body)

    # -- upstream -----------------------------------------------------------------------------

    async def fetch(
        self,
        request: ProxyRequest,
        body: RequestBody | None,
        state: EdgeState,
        target: RouteTarget,
        record: ExchangeRecord,
    ) -> tuple[aiohttp.ClientResponse, Attempt] | _EdgeError | RequestRejected:
        """The client's request as it is, through the failover walk (the BYPASS path).

        A small body is read whole before a backend is picked (nginx's
        ``proxy_request_buffering``, bounded by ``REQUEST_BUFFER_LIMIT``): a client trickling
        its upload then holds no upstream connection, and the body can be sent again on a
        retry.  A larger one is streamed as it arrives."""
        headers = forward_headers(request.headers, self._forwarding(request, state))
        payload: bytes | AsyncIterable[bytes] | None = None
        if body is not None and request.body.has_body:
            try:
                payload = await buffer_request_body(body, request.body, REQUEST_BUFFER_LIMIT)
            except RequestRejected as exc:
                return exc  # the client's fault (too slow, too big, gone): nothing was sent
        return await self._walk(
            request.method,
            request.target.decode("latin-1"),
            upstream_headers(headers),
            body if request.body.has_body else None,
            state,
            target,
            record,
            payload,
        )

    async def _walk(
        self,
        method: str,
        target_text: str,
        headers: CIMultiDict[str],
        body: RequestBody | None,
        state: EdgeState,
        target: RouteTarget,
        record: ExchangeRecord,
        payload: bytes | AsyncIterable[bytes] | None = None,
    ) -> tuple[aiohttp.ClientResponse, Attempt] | _EdgeError | RequestRejected:
        """The failover walk; returns the first response head, or why there is none.

        ``body``: the client's body (its ``error`` tells a client fault from a backend's);
        ``payload``: what is sent, the body whole in memory (replayable) or streamed.

        Only failures that are the backend's feed passive health: a wait for a pool slot, a
        local resource error, a client's body error and an attempt abandoned because its
        backend left rotation (``on_health``) are not evidence against it."""
        health = self.health.snapshot
        regions = live_regions(target.regions, health)
        if not regions:
            return _EdgeError(503, "no_healthy_region", RETRY_AFTER_SECONDS)
        if payload is None and body is not None:
            payload = body
        # A body in memory can be sent again; a streamed one cannot.
        streamed = payload is not None and not isinstance(payload, bytes)
        upstream = self.upstream
        abandonable = method in target.retry_methods and not streamed
        failure: UpstreamFailure | None = None
        while True:
            attempt = next_attempt(regions, health, record.attempts, upstream.outstanding, self.rng)
            if attempt is None:
                break
            if record.attempts:
                assert failure is not None
                if not retry_allowed(method, target.retry_methods, streamed, failure.kind):
                    break
                if self.health.snapshot is not health:
                    # Health changed while we waited (maybe because of this very failure):
                    # the retry goes by what is known now, not by what was at the start.
                    health = self.health.snapshot
                    regions = live_regions(target.regions, health) or regions
                    attempt = next_attempt(
                        regions, health, record.attempts, upstream.outstanding, self.rng
                    )
                    if attempt is None:
                        break
                self.metrics.retries.labels(target.service.name).inc()
                if attempt.region != record.attempts[0].region:
                    self.metrics.failovers.labels(
                        target.service.name, record.attempts[0].region, attempt.region
                    ).inc()
            record.attempts.append(attempt)
            record.region, record.backend = attempt.region, attempt.backend
            backend = attempt.backend
            started = self.clock()
            task: asyncio.Task[object] | None = None
            record.streamed_body = streamed
            try:
                if not upstream.try_acquire(backend, streamed=streamed):
                    await upstream.wait_for_slot(
                        backend, state.config.edge.timeouts.connect, streamed=streamed
                    )
            except UpstreamFailure as exc:  # the edge's own limit: not the backend's doing
                self._failed(attempt, exc, state, headers)
                failure = exc
                continue
            try:
                if abandonable:
                    task = asyncio.current_task()
                    if task is not None:
                        self._watch(backend, task, regions, record.attempts)
                try:
                    response = await upstream.send(backend, method, target_text, headers, payload)
                finally:
                    # Unwatched before anything else: the health report below may publish
                    # a snapshot, and this task must not be given up on for its own report.
                    if task is not None:
                        self._unwatch(backend, task)
            except UpstreamFailure as exc:
                upstream.release(backend, streamed=streamed)
                if task is not None:
                    self._settle(task)
                if body is not None and body.error is not None:
                    return body.error  # the client's fault: no retry, no health report
                if exc.kind.blames_backend:
                    self.health.report(backend, False)
                self._failed(attempt, exc, state, headers)
                failure = exc
                continue
            except asyncio.CancelledError:
                upstream.release(backend, streamed=streamed)
                if task is None or not self._abandoned(task):
                    raise
                # on_health gave up on this attempt: the backend left rotation while we
                # waited for its first byte.  Nothing to report; go on with the walk.
                failure = UpstreamFailure(FailureKind.ABANDONED, "backend left rotation")
                self._failed(attempt, failure, state, headers)
                continue
            except BaseException:
                upstream.release(backend, streamed=streamed)
                raise
            if task is not None:
                self._settle(task)
            elapsed = self.clock() - started
            record.upstream_seconds = elapsed
            self.metrics.upstream_stats.observe_upstream(attempt.region, elapsed)
            self.health.report(backend, response.status not in state.failure_statuses)
            return response, attempt
        if failure is None:
            return _EdgeError(503, "no_backend", RETRY_AFTER_SECONDS)
        status = failure.kind.status
        return _EdgeError(
            status,
            f"upstream_{failure.kind.value}",
            RETRY_AFTER_SECONDS if status == 503 else None,
        )

    def _failed(
        self, attempt: Attempt, exc: UpstreamFailure, state: EdgeState, headers: CIMultiDict[str]
    ) -> None:
        self.metrics.upstream_failures.labels(attempt.region, exc.kind.value).inc()
        count = 1
        throttle = self._own_failures.get(exc.kind)
        if throttle is not None:
            # The edge's own shortage (pool full, out of descriptors) hits every request at
            # once: one line per kind per interval, with how many it stands for.
            count = throttle.note(self.clock())
            if not count:
                return
        log.warning(
            "upstream_failed",
            backend=attempt.backend,
            region=attempt.region,
            kind=exc.kind.value,
            detail=exc.detail,
            backend_fault=exc.kind.blames_backend,
            count=count,
            request_id=headers.get(state.request_id_name, "-"),
        )

    # -- giving up on attempts to a backend that left rotation --------------------------------

    def _watch(
        self,
        backend: str,
        task: asyncio.Task[object],
        regions: tuple[str, ...],
        tried: list[Attempt],
    ) -> None:
        waiting = self._waiting.get(backend)
        if waiting is None:
            waiting = self._waiting[backend] = {}
        waiting[task] = (regions, tried)

    def _unwatch(self, backend: str, task: asyncio.Task[object]) -> None:
        waiting = self._waiting.get(backend)
        if waiting is not None:
            waiting.pop(task, None)
            if not waiting:
                del self._waiting[backend]

    def _abandoned(self, task: asyncio.Task[object]) -> bool:
        """Whether a CancelledError in ``task`` was ``on_health``'s (and only its)."""
        if task not in self._abandoning:
            return False
        self._abandoning.discard(task)
        return task.uncancel() == 0

    def _settle(self, task: asyncio.Task[object]) -> None:
        """The attempt ended on its own although ``on_health`` had just given up on it: take
        that cancellation back (it was never delivered)."""
        if task in self._abandoning:
            self._abandoning.discard(task)
            if task.cancelling():
                task.uncancel()

    def on_health(self, snapshot: SnapshotView) -> None:
        """A new health snapshot (``HealthMonitor.subscribe``): requests waiting for the first
        byte of a backend that has left rotation (ejected by traffic, down by its checks) are
        retried elsewhere now, instead of each waiting out the first-byte timeout (10 s by
        default).  Only requests that may be retried (idempotent, body replayable) and that
        have somewhere else to go; the abandoned attempt is not reported again."""
        if not self._waiting:
            return
        for backend, waiting in list(self._waiting.items()):
            if snapshot.backend_up(backend):
                continue
            for task, (regions, tried) in list(waiting.items()):
                if task.done() or task in self._abandoning:
                    continue
                later = next_attempt(regions, snapshot, tried, self.upstream.outstanding, self.rng)
                if later is None:
                    continue  # nowhere else to go: this backend may still answer
                self._abandoning.add(task)
                task.cancel()

    def _forwarding(self, request: ProxyRequest, state: EdgeState) -> ForwardingContext:
        return ForwardingContext(
            client_ip=request.client_ip,
            scheme=b"http",
            pop=state.pop,
            http_version=request.http_version,
            trusted=is_trusted(request.client_ip, state.trusted_proxies),
            request_id_header=state.request_id_header,
            request_id=request.request_id,
        )

    def _upstream_headers(
        self, raw: Headers | tuple[tuple[bytes, bytes], ...], state: EdgeState, region: str
    ) -> Headers:
        """An upstream response's headers as the edge passes (and stores) them: hop-by-hop
        and framing removed, the edge's own headers dropped, Via extended, the region added.

        ``rewrite_response_headers`` and the edge's own filter in one pass over the lines."""
        lowered = [(name.lower(), value) for name, value in raw]
        named = connection_tokens(lowered)
        dropped = state.dropped_response_headers
        headers: Headers = []
        prior_via: list[bytes] | None = None
        for line in lowered:
            name = line[0]
            if name in dropped or name.startswith(b"proxy") or (named and name in named):
                continue
            if name == b"via":
                if prior_via is None:
                    prior_via = []
                prior_via.append(line[1])
                continue
            headers.append(line)
        via = state.via if prior_via is None else b", ".join([*prior_via, state.via])
        headers.append((b"via", via))
        headers.append((b"x-meridian-region", region.encode()))
        return headers

    def _from_upstream(
        self,
        request: ProxyRequest,
        state: EdgeState,
        record: ExchangeRecord,
        response: aiohttp.ClientResponse,
        attempt: Attempt,
    ) -> OutgoingResponse:
        headers = self._upstream_headers(response.raw_headers, state, attempt.region)
        headers.append((b"x-cache", record.cache.encode()))
        if not any(name == b"age" for name, _ in headers):
            headers.append((b"age", b"0"))
        headers.append((state.request_id_header, request.request_id))
        length = response.content_length
        no_body = request.method == "HEAD" or response.status in (204, 304)
        return OutgoingResponse(
            status=response.status,
            reason=(response.reason or "").encode("latin-1", "replace"),
            headers=headers,
            length=None if no_body else length,
            body=None if no_body else response.content.iter_any(),
            head_length=length if no_body else None,
        )

    # -- stage 4: compression -----------------------------------------------------------------

    def encode_response(
        self, request: ProxyRequest, target: RouteTarget, response: OutgoingResponse
    ) -> OutgoingResponse:
        """An uncached response as this client gets it (``edge.transcode``): an origin coding
        it does not accept decoded, compressible bodies compressed at the stream levels.
        Raises ``BodyError`` when a body in memory cannot be decoded (a bomb: 502)."""
        transcoder = self.transcoder
        if transcoder is None:
            return response
        return transcoder.encode(
            response,
            _accept_encoding(request.headers),
            target.route.name,
            self.state.config.edge.compression,
        )

    # -- stage 5: send ------------------------------------------------------------------------

    async def send(
        self,
        sink: ResponseSink,
        request: ProxyRequest,
        response: OutgoingResponse,
        record: ExchangeRecord,
    ) -> None:
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
            except (aiohttp.ClientError, ConnectionError, OSError, BodyError) as exc:
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
                self.metrics.upstream_failures.labels(record.region, reason).inc()
                if record.backend != "-" and not isinstance(exc, BodyError):
                    self.health.report(record.backend, False)
                sink.abort()
                return
        sink.end_response()

    async def _send_error(
        self,
        sink: ResponseSink,
        request: ProxyRequest,
        state: EdgeState,
        record: ExchangeRecord,
        status: int,
        reason: str,
        retry_after: int | None = None,
        *,
        close: bool = False,
    ) -> None:
        record.status = status
        if record.cache == "MISS" and request.method not in CACHEABLE_METHODS:
            record.cache = "BYPASS"
        self.metrics.errors.labels(str(status), reason).inc()
        extra: Headers = [(b"x-cache", record.cache.encode()), (b"age", b"0")]
        if record.region != "-":
            extra.append((b"x-meridian-region", record.region.encode()))
        close = close or status in (400, 408, 413, 414, 431) or not request.keep_alive
        sink.write_complete(
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

    def _account(
        self, request: ProxyRequest, state: EdgeState, record: ExchangeRecord, sent: int
    ) -> None:
        total = self.clock() - request.received_at
        self.metrics.observe_request(
            record.route,
            record.status,
            record.cache,
            record.region,
            total,
            state.config.edge.latency_target,
        )
        if self.access_log.enabled:
            self.access_log.record_request(
                request.method,
                request.path,
                record.status,
                record.cache,
                record.region,
                record.backend,
                len(record.attempts),
                record.upstream_seconds,
                sent,
                total,
                request.request_id,
                request.client_ip,
            )


@dataclass(frozen=True, slots=True)
class _EdgeError:
    status: int
    reason: str
    retry_after: int | None = None


def _entry_region(entry: Entry | None) -> str:
    """The region that filled a stored response (its X-Meridian-Region, added last)."""
    if entry is None:
        return "-"
    for name, value in reversed(entry.response.headers):
        if name == b"x-meridian-region":
            return value.decode("latin-1")
    return "-"


def _connection_line(request: ProxyRequest) -> bytes:
    """The Connection line cached bytes need: none for HTTP/1.1 keep-alive (the default)."""
    if not request.keep_alive:
        return _CLOSE_LINE
    return _KEEP_ALIVE_LINE if request.http_version == "1.0" else b""


def _accept_encoding(headers: Headers) -> bytes | None:
    found: bytes | None = None
    for name, value in headers:
        if name == b"accept-encoding":
            found = value if found is None else found + b"," + value
    return found


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


def _one(data: bytes) -> AsyncIterable[bytes]:
    return _one_chunk(data)


def monotonic() -> float:
    return time.monotonic()


__all__ = [
    "UNKEYED_DROPPED_ON_FILL",
    "AccessLog",
    "EdgeState",
    "ExchangeRecord",
    "OutgoingResponse",
    "Pipeline",
    "ProxyRequest",
    "ResponseSink",
]
