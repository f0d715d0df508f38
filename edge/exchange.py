"""The types every stage of the request path shares, and the per-request ``Exchange``.

A request is parsed by a front end (``edge.protocol`` for HTTP/1.1) into a ``ProxyRequest``;
the pipeline wraps it with its body, the front end's ``ResponseSink``, the config snapshot, the
route and the cache lookup into one ``Exchange``, which each stage takes instead of a list of
arguments.  The stage that owns an I/O does it; what a stage learns for the access log and the
metrics goes into ``Exchange.record``.

Nothing here does I/O, and nothing here imports a stage, the pipeline or a front end.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

from edge.errors import EdgeError
from edge.http1 import (
    NO_BODY,
    BodyFraming,
    ForwardingContext,
    Headers,
    RequestRejected,
    is_trusted,
)
from edge.state import EdgeState, FillHeaders, RequestHead
from edge.upstream import Attempt, HealthView

if TYPE_CHECKING:
    from edge.cache import Lookup
    from edge.cache.entry import Entry
    from edge.router import RouteTarget

#: Methods a shared cache may answer; others are marked BYPASS.
CACHEABLE_METHODS: Final = frozenset({"GET", "HEAD"})
RETRY_AFTER_SECONDS: Final = 5
_CLOSE_LINE: Final = b"connection: close\r\n"
_KEEP_ALIVE_LINE: Final = b"connection: keep-alive\r\n"


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
    #: How the client reached the edge: b"https" over TLS (X-Forwarded-Proto).
    scheme: bytes = b"http"
    #: The access line's protocol fields (``edge.accesslog.protocol_fields``); None: HTTP/1.1.
    protocol: str | None = None
    #: Where a fill's upstream lines for these very ``headers`` are memoised when ``head`` is
    #: None (a head read by its shape, whose fields are the shape's list: ``edge.h1fast``).
    fills: FillHeaders | None = None


def replayed_request(
    head: RequestHead,
    client_ip: str,
    request_id: bytes,
    received_at: float,
    memo: RequestHead | None,
    scheme: bytes,
    protocol: str | None,
) -> ProxyRequest:
    """The request of a head validated before (HTTP/1.1 bytes or an HTTP/2 header block seen
    again), bodiless, without a parse; ``memo``: the head the hit path may keep what it
    derives on (None for a head seen once)."""
    return ProxyRequest(
        head.method,
        head.target,
        head.path,
        head.host,
        "1.1",
        head.headers,
        True,
        client_ip,
        NO_BODY,
        request_id,
        received_at,
        head.supplied_id is not None,
        memo,
        scheme,
        protocol,
    )


def head_of(request: ProxyRequest) -> RequestHead:
    """The head of a bodiless ``request`` just validated (HTTP/1.1 or HTTP/2), to be memoised
    by its bytes or its header block."""
    return RequestHead(
        request.method,
        request.target,
        request.path,
        request.host,
        request.headers,
        request.request_id if request.request_id_supplied else None,
    )


class RequestBody(Protocol):
    """The request body as the connection streams it (see ``edge.h1parse.StreamedBody``)."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @property
    def error(self) -> RequestRejected | None: ...


class ResponseSink(Protocol):
    """The front end's side of a response; framing headers are the sink's business."""

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


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """Why there is no upstream response: the edge answers ``status`` itself."""

    status: int
    reason: str
    retry_after: int | None = None


class FetchError(EdgeError):
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


class Exchange:
    """One request on the slow path, as every stage sees it.

    ``state`` is the config snapshot pinned when the request started; ``target`` is set by the
    route stage, ``lookup`` by the cache lookup (or handed over by the fast path); ``record``
    collects what the access log and the metrics report."""

    __slots__ = ("body", "lookup", "record", "request", "sink", "state", "target")

    def __init__(
        self,
        request: ProxyRequest,
        body: RequestBody | None,
        sink: ResponseSink,
        state: EdgeState,
        lookup: Lookup | None = None,
    ) -> None:
        self.request = request
        self.body = body
        self.sink = sink
        self.state = state
        self.target: RouteTarget | None = None
        self.lookup = lookup
        self.record = ExchangeRecord()

    @property
    def routed(self) -> RouteTarget:
        """The route target; only read by stages after the route stage found one."""
        target = self.target
        assert target is not None, "no route: the pipeline answers 404 before any stage"
        return target


def forwarding_context(request: ProxyRequest, state: EdgeState) -> ForwardingContext:
    """How the request's headers are rewritten for upstream (``request_target``)."""
    return ForwardingContext(
        request.client_ip,
        request.scheme,
        state.pop,
        request.http_version,
        is_trusted(request.client_ip, state.trusted_proxies),
        state.request_id_header,
        request.request_id,
    )


def request_id_line(request: ProxyRequest, state: EdgeState) -> bytes:
    return state.request_id_header + b": " + request.request_id + b"\r\n"


def connection_line(request: ProxyRequest) -> bytes:
    """The Connection line cached bytes need: none for HTTP/1.1 keep-alive (the default)."""
    if not request.keep_alive:
        return _CLOSE_LINE
    return _KEEP_ALIVE_LINE if request.http_version == "1.0" else b""


def accept_encoding(headers: Headers) -> bytes | None:
    """The request's Accept-Encoding lines joined with commas, None when it sent none."""
    found: bytes | None = None
    for name, value in headers:
        if name == b"accept-encoding":
            found = value if found is None else found + b"," + value
    return found


def entry_region(entry: Entry | None) -> str:
    """The region that filled a stored response (its X-Meridian-Region, added last)."""
    if entry is None:
        return "-"
    for name, value in reversed(entry.response.headers):
        if name == b"x-meridian-region":
            return value.decode("latin-1")
    return "-"


__all__ = [
    "CACHEABLE_METHODS",
    "RETRY_AFTER_SECONDS",
    "EdgeError",
    "ErrorAnswer",
    "Exchange",
    "ExchangeRecord",
    "FetchError",
    "HealthSource",
    "OutgoingResponse",
    "ProxyRequest",
    "RequestBody",
    "ResponseSink",
    "accept_encoding",
    "connection_line",
    "entry_region",
    "forwarding_context",
    "head_of",
    "replayed_request",
    "request_id_line",
]
