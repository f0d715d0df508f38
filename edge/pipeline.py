"""The request path, in one place: request -> route -> cache -> upstream -> encode -> response.

``Pipeline.handle`` runs the stages in order for every request the fast path did not answer:

1. ``Router.match``                  route, service, regions ordered for this POP
2. ``Pipeline.cache_lookup``         CACHE SEAM (lookup): returns a ``CacheDecision``
3. ``Pipeline.fetch``                failover walk over regions/backends (``edge.upstream``)
4. ``Pipeline.cache_store``          CACHE SEAM (store): may wrap the body to keep a copy
5. ``Pipeline.encode_response``      COMPRESSION SEAM: may replace headers, length and body
6. ``Pipeline.send``                 head + streamed body to the client through a ``ResponseSink``

and ``Pipeline.fast_response`` is the synchronous hook the protocol calls at
``on_message_complete`` for a GET/HEAD with nothing else in flight on the connection: it
returns the complete prebuilt response bytes of a cache hit (one ``transport.write``) or None.

Today the seams are pass-throughs: lookups answer MISS (BYPASS for methods a cache never
serves), nothing is stored, nothing is encoded.  Every stage sees the same ``EdgeState``
snapshot, pinned when the request starts, so a reload never changes a request half-way.
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
from typing import Protocol

import aiohttp

from edge.admin import EdgeMetrics
from edge.http1 import (
    BodyFraming,
    BodyKind,
    ForwardingContext,
    Headers,
    RequestRejected,
    error_response,
    is_trusted,
    response_framing,
    rewrite_request_headers,
    rewrite_response_headers,
    via_value,
)
from edge.router import Router, RouteTarget, normalise_host
from edge.upstream import (
    Attempt,
    HealthView,
    UpstreamFailure,
    UpstreamPool,
    live_regions,
    next_attempt,
    retry_allowed,
)
from meridian.config import Config
from meridian.log import _State, format_event, get_logger

log = get_logger("edge")
access_logger = get_logger("edge.access")

#: Methods a shared cache may answer; others are marked BYPASS.
CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
RETRY_AFTER_SECONDS = 5


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
        )


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """A request head as the protocol parsed and validated it."""

    method: str
    #: The request-target in origin form, bytes as received (absolute form is reduced).
    target: bytes
    path: str
    host: bytes | None
    http_version: str
    headers: Headers
    keep_alive: bool
    client_ip: str
    body: BodyFraming
    request_id: bytes
    #: ``loop.time()`` when the head was complete.
    received_at: float


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


class HealthSource(Protocol):
    """``meridian.health.HealthMonitor`` as the request path uses it."""

    @property
    def snapshot(self) -> HealthView: ...

    def report(self, backend_url: str, ok: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class CacheDecision:
    """What the cache lookup stage decided; ``response`` is a hit to send as it is."""

    status: str
    response: OutgoingResponse | None = None


@dataclass(frozen=True, slots=True)
class OutgoingResponse:
    status: int
    reason: bytes
    #: Final headers (lower-case names) without Content-Length/Transfer-Encoding/Connection.
    headers: Headers
    #: Body length when known (sent as Content-Length), None to stream it chunked.
    length: int | None
    body: AsyncIterable[bytes] | None
    #: For HEAD/304: the Content-Length to advertise without a body.
    head_length: int | None = None


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


class AccessLog:
    """One structured line per request, batched: written once per flush (every sweep of the
    connections, or 256 lines), not once per request.  Same line format as ``meridian.log``
    (logfmt or JSON, to the stream the CLI configured), but formatted here with a cheaper path
    for the plain values an access line holds; disabled when the level is above info."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._enabled = access_logger.enabled(logging.INFO)
        self._second = -1
        self._stamp = ""

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
        if _State.fmt == "json":
            line = format_event("info", "edge.access", "access", fields, "json")
        else:
            parts = [f"ts={self._timestamp()} level=info logger=edge.access event=access"]
            for key, value in fields.items():
                text = str(value)
                if not text or _NEEDS_QUOTES.search(text):
                    text = json.dumps(text)
                parts.append(f"{key}={text}")
            line = " ".join(parts)
        self._lines.append(line)
        if len(self._lines) >= 256:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            _State.stream.write(text)
            _State.stream.flush()
        except (OSError, ValueError):  # a closed stderr must never take a request down
            pass


_NEEDS_QUOTES = re.compile(r'[ ="\\\n\t]')


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
    ) -> None:
        #: Swapped whole on reload; each request reads it once.
        self.state = state
        self.upstream = upstream
        self.health = health
        self.metrics = metrics
        self.access_log = access_log
        self.clock = clock
        self.rng = rng or random.Random()

    # -- stage 0: the fast path ---------------------------------------------------------------

    def fast_response(self, request: ProxyRequest) -> bytes | None:
        """CACHE SEAM (hit fast path): complete response bytes for a fresh hit, else None.

        Called synchronously from ``on_message_complete`` for a bodiless GET/HEAD on a
        keep-alive connection with nothing in flight; the protocol writes the bytes in one
        ``transport.write``.  The cache must do its own metrics/access-log accounting here.
        """
        return None

    # -- the slow path ------------------------------------------------------------------------

    async def handle(
        self, request: ProxyRequest, body: RequestBody | None, sink: ResponseSink
    ) -> None:
        state = self.state
        record = ExchangeRecord()
        self.metrics.in_flight.inc()
        try:
            target = state.router.match(normalise_host(request.host), request.path)
            if target is None:
                await self._send_error(sink, request, state, record, 404, "no_route")
                return
            record.route = target.route.name
            try:
                async with asyncio.timeout(state.config.edge.timeouts.total):
                    await self._proxy(request, body, sink, state, target, record)
            except TimeoutError:
                if sink.response_started:
                    sink.abort()
                    record.status = record.status or 504
                else:
                    await self._send_error(sink, request, state, record, 504, "deadline_exceeded")
        finally:
            self.metrics.in_flight.dec()
            self._account(request, state, record, sink.bytes_sent)

    async def _proxy(
        self,
        request: ProxyRequest,
        body: RequestBody | None,
        sink: ResponseSink,
        state: EdgeState,
        target: RouteTarget,
        record: ExchangeRecord,
    ) -> None:
        decision = await self.cache_lookup(request, target)
        record.cache = decision.status
        if decision.response is not None:
            await self.send(sink, request, decision.response, record)
            return
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
            outgoing = self.cache_store(request, target, outgoing)
            outgoing = self.encode_response(request, target, outgoing)
            await self.send(sink, request, outgoing, record)
        finally:
            response.release()
            self.upstream.release(attempt.backend)

    # -- stage 2: cache lookup ----------------------------------------------------------------

    async def cache_lookup(self, request: ProxyRequest, target: RouteTarget) -> CacheDecision:
        """CACHE SEAM (lookup before upstream).  Receives the request and its route; returns
        the X-Cache status to report and, for a hit or a stale answer, the response to send
        (``OutgoingResponse``).  Coalescing waits happen in here.  Pass-through for now."""
        if request.method not in CACHEABLE_METHODS:
            return _BYPASS
        return _MISS

    # -- stage 3: upstream --------------------------------------------------------------------

    async def fetch(
        self,
        request: ProxyRequest,
        body: RequestBody | None,
        state: EdgeState,
        target: RouteTarget,
        record: ExchangeRecord,
    ) -> tuple[aiohttp.ClientResponse, Attempt] | _EdgeError | RequestRejected:
        """The failover walk; returns the first response head, or why there is none."""
        health = self.health.snapshot
        regions = live_regions(target.regions, health)
        if not regions:
            return _EdgeError(503, "no_healthy_region", RETRY_AFTER_SECONDS)
        headers = rewrite_request_headers(request.headers, self._forwarding(request, state))
        target_text = request.target.decode("latin-1")
        has_body = request.body.has_body
        failure: UpstreamFailure | None = None
        while True:
            attempt = next_attempt(
                regions, health, record.attempts, self.upstream.outstanding, self.rng
            )
            if attempt is None:
                break
            if record.attempts:
                assert failure is not None
                if not retry_allowed(request.method, target.retry_methods, has_body, failure.kind):
                    break
                self.metrics.retries.labels(target.service.name).inc()
                if attempt.region != record.attempts[0].region:
                    self.metrics.failovers.labels(
                        target.service.name, record.attempts[0].region, attempt.region
                    ).inc()
            record.attempts.append(attempt)
            record.region, record.backend = attempt.region, attempt.backend
            started = self.clock()
            self.upstream.acquire(attempt.backend)
            try:
                response = await self.upstream.send(
                    attempt.backend,
                    request.method,
                    target_text,
                    headers,
                    body if has_body else None,
                )
            except UpstreamFailure as exc:
                self.upstream.release(attempt.backend)
                if body is not None and body.error is not None:
                    return body.error  # the client's fault: no retry, no health report
                self.health.report(attempt.backend, False)
                self.metrics.upstream_failures.labels(attempt.region, exc.kind.value).inc()
                log.warning(
                    "upstream_failed",
                    backend=attempt.backend,
                    region=attempt.region,
                    kind=exc.kind.value,
                    detail=exc.detail,
                    request_id=request.request_id.decode("ascii", "replace"),
                )
                failure = exc
                continue
            except BaseException:
                self.upstream.release(attempt.backend)
                raise
            elapsed = self.clock() - started
            record.upstream_seconds = elapsed
            self.metrics.upstream_duration.labels(attempt.region).observe(elapsed)
            self.health.report(attempt.backend, response.status not in state.failure_statuses)
            return response, attempt
        if failure is None:
            return _EdgeError(503, "no_backend", RETRY_AFTER_SECONDS)
        return _EdgeError(failure.kind.status, f"upstream_{failure.kind.value}")

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

    def _from_upstream(
        self,
        request: ProxyRequest,
        state: EdgeState,
        record: ExchangeRecord,
        response: aiohttp.ClientResponse,
        attempt: Attempt,
    ) -> OutgoingResponse:
        own = (b"x-cache", b"x-meridian-region", state.request_id_header)
        headers = [h for h in rewrite_response_headers(response.raw_headers) if h[0] not in own]
        prior_via = [v for n, v in headers if n == b"via"]
        headers = [h for h in headers if h[0] != b"via"]
        headers.append((b"via", b", ".join([*prior_via, via_value("1.1", state.pop)])))
        headers.append((b"x-cache", record.cache.encode()))
        headers.append((b"x-meridian-region", attempt.region.encode()))
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

    # -- stage 4: cache store -----------------------------------------------------------------

    def cache_store(
        self, request: ProxyRequest, target: RouteTarget, response: OutgoingResponse
    ) -> OutgoingResponse:
        """CACHE SEAM (store).  Receives the identity response from upstream; returns it, or a
        copy whose ``body`` also feeds the store (stored only once the body completes).
        Pass-through for now."""
        return response

    # -- stage 5: compression -----------------------------------------------------------------

    def encode_response(
        self, request: ProxyRequest, target: RouteTarget, response: OutgoingResponse
    ) -> OutgoingResponse:
        """COMPRESSION SEAM.  Receives the response about to be sent (request headers carry
        Accept-Encoding); returns it, or an encoded copy (new headers incl. Content-Encoding
        and Vary, ``length`` None when streamed, wrapped ``body``).  Pass-through for now."""
        return response

    # -- stage 6: send ------------------------------------------------------------------------

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
        if framing.kind is not BodyKind.NONE and response.body is not None:
            try:
                async for chunk in response.body:
                    sink.write_body(chunk)
                    if sink.write_paused:
                        await sink.drain()
            except (aiohttp.ClientError, ConnectionError, OSError) as exc:
                # The origin died mid-body: close the client connection so the truncation shows
                # (a missing last chunk or a short Content-Length), never a clean end.
                log.warning(
                    "upstream_broke_mid_body",
                    backend=record.backend,
                    error=type(exc).__name__,
                    request_id=request.request_id.decode("ascii", "replace"),
                )
                self.metrics.upstream_failures.labels(record.region, "mid_body").inc()
                if record.backend != "-":
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
    ) -> None:
        record.status = status
        if record.cache == "MISS" and request.method not in CACHEABLE_METHODS:
            record.cache = "BYPASS"
        self.metrics.errors.labels(str(status), reason).inc()
        extra: Headers = [(b"x-cache", record.cache.encode())]
        if record.region != "-":
            extra.append((b"x-meridian-region", record.region.encode()))
        close = status in (400, 408, 413, 414, 431) or not request.keep_alive
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
        self.access_log.record(
            method=request.method,
            path=request.path,
            status=record.status,
            bytes=sent,
            cache=record.cache,
            region=record.region,
            backend=record.backend,
            attempts=len(record.attempts),
            upstream_ms=round(record.upstream_seconds * 1000, 2),
            total_ms=round(total * 1000, 2),
            request_id=request.request_id.decode("ascii", "replace"),
            client=request.client_ip,
        )


@dataclass(frozen=True, slots=True)
class _EdgeError:
    status: int
    reason: str
    retry_after: int | None = None


_MISS = CacheDecision("MISS")
_BYPASS = CacheDecision("BYPASS")


def monotonic() -> float:
    return time.monotonic()


__all__ = [
    "AccessLog",
    "CacheDecision",
    "EdgeState",
    "ExchangeRecord",
    "OutgoingResponse",
    "Pipeline",
    "ProxyRequest",
    "ResponseSink",
]
