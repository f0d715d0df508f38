"""The client-facing data plane: one ``asyncio.Protocol`` per connection, parsing with httptools.

Shaped like uvicorn's httptools server.  Per connection: one parser, requests answered strictly
in order (pipelining), at most one request being proxied at a time.  A bodiless GET/HEAD that
the cache can answer never leaves ``on_message_complete`` (``Pipeline.fast_response``: one
write, no task, no timer).  Everything else runs ``Pipeline.handle`` in a task.

When a request with a body starts upstream: at its first body byte (or at its end), not at
its head -- so a request whose framing breaks at the first chunk never reaches the origin.
With ``Expect: 100-continue`` the edge answers ``100 Continue`` and starts at the head.  (The
pipeline then reads a small body whole before it takes an upstream connection:
``pipeline.buffer_request_body``.)
A chunked body is followed on the raw bytes by ``http1.ChunkedScanner`` ahead of the parser
(chunk sizes and trailers judged before any body byte is passed on; trailers are dropped,
never merged), and every head goes through ``edge.request_target`` (the one decision about
target, Host and headers) before a request exists.

Timeouts without per-request timers: each connection keeps one deadline (header read, body
read, keep-alive idle) plus the total deadline of the request it is handling
(``expire_after``), and ``Connections`` sweeps them every ``SWEEP_INTERVAL`` (so a timeout
fires up to that much late), the way nginx trades timer precision for cost.

Accounting that cannot leak: every exchange ends in ``_finished`` (its task's ``finally``),
which closes the connection unless the request was read to its end, so a request still being
read when its response went out (a 504 during a chunked upload) never leaves a connection
open and "busy" with nothing to end it.  Client connections stop at the descriptor budget
(``edge.fdlimit``): the last descriptors stay for upstream connections and health checks;
and at ``edge.connection_limits`` (``edge.connlimit``: per client network, in total).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools

from edge.accesslog import protocol_fields
from edge.bodyqueue import BodyQueue
from edge.cache import Lookup
from edge.connlimit import UNCOUNTED, ClientConnections, ClientConnectionStats
from edge.fasthead import MeaningKey, parse_simple_head
from edge.fdlimit import FdBudget, ResourceStats, Throttle, fd_exhausted
from edge.http1 import (
    NO_BODY,
    BodyFraming,
    BodyKind,
    ChunkedScanner,
    Headers,
    RequestRejected,
    check_header_section,
    check_request_framing,
    check_url_length,
    encode_chunk,
    expects_continue,
    head_end,
    is_websocket_upgrade,
    new_request_id,
    serialize_head,
    valid_request_id,
)
from edge.memos import BoundedMemo
from edge.pipeline import EdgeState, Pipeline, ProxyRequest, RequestHead
from edge.request_target import check_trailer, decide_target, screen_headers
from meridian.log import get_logger

if TYPE_CHECKING:
    from edge.streams.service import StreamService
    from edge.websocket import Upgraded

log = get_logger("edge")

SWEEP_INTERVAL = 0.25
#: Sweeps between two probes for descriptor exhaustion (once a second).
FD_PROBE_EVERY = 4
#: Request body bytes buffered before the connection stops reading.
BODY_HIGH_WATER = 256 * 1024
#: Pipelined requests queued before the connection stops reading.
PIPELINE_DEPTH = 16

#: On the edge's own rejections: every response says X-Cache and Age.

_DEADLINE_NONE = 0
_DEADLINE_HEADER = 1
_DEADLINE_BODY = 2
_DEADLINE_IDLE = 3
#: ``EdgeConnection._cursor`` when the raw offset of the parser's position is not known.
_UNKNOWN = -2
#: Connection header values that nominate no header (no screening pass needed).
_PLAIN_CONNECTION = frozenset(
    {b"close", b"keep-alive", b"upgrade", b"Close", b"Keep-Alive", b"Upgrade"}
)
#: The HTTP versions served (llhttp also accepts 0.9 and 2.0 request lines).
_VERSIONS = frozenset({"1.1", "1.0"})


class _NoRequests:
    """The callbacks of ``_CLOSED_PARSER``: a parser bound to nothing (it is never fed)."""


#: What a closed connection's parser is swapped for.  A connection's own parser holds bound
#: methods of the connection (its callbacks), a reference cycle: left in place, every closed
#: connection (13 objects) stayed allocated until the cyclic collector ran, instead of being
#: freed, in cache, by reference counting the moment its transport let go of it.
_CLOSED_PARSER = httptools.HttpRequestParser(_NoRequests())


def _no_other_fronts() -> int:
    return 0


#: The largest request chunk remembered (``edge.memos.REQUEST_HEADS`` bounds how many).
REQUEST_HEAD_MAX_BYTES = 2048


def remember_head(heads: BoundedMemo[bytes, RequestHead], data: bytes, head: RequestHead) -> None:
    if len(data) > REQUEST_HEAD_MAX_BYTES:
        return
    if len(heads) >= heads.bound:
        heads.clear()  # bounded without bookkeeping: it refills with what is hot
    heads[data] = head


def seen_before(first_sights: BoundedMemo[int, None], data: bytes) -> bool:
    """Whether ``data`` (a head, or its meaning key) was seen since the memo was last cleared;
    notes it if not.  A head is memoised on its second sight: traffic spread over more keys
    than ``REQUEST_HEADS`` holds would only churn it (and the collector) otherwise."""
    digest = hash(data)  # cached in the bytes object: the memo lookups computed it already
    if digest in first_sights:
        return True
    if len(first_sights) >= first_sights.bound:
        first_sights.clear()
    first_sights[digest] = None
    return False


class StreamedBody(BodyQueue):
    """A request body passed from the parser to the upstream request, never buffered whole:
    the connection stops reading above ``BODY_HIGH_WATER`` bytes queued, and reads again once
    half of that is taken."""

    __slots__ = ("_on_pause", "_on_resume", "_paused", "_size")

    def __init__(self, on_pause: Callable[[], None], on_resume: Callable[[], None]) -> None:
        super().__init__()
        self._size = 0
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._paused = False

    def feed(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > BODY_HIGH_WATER and not self._paused:
            self._paused = True
            self._on_pause()
        self._put(data, len(data))

    def _taken(self, credit: int) -> None:
        self._size -= credit
        if self._paused and self._size <= BODY_HIGH_WATER // 2:
            self._paused = False
            self._on_resume()


class Exchange:
    """One request on a connection, from its head to the end of its response."""

    __slots__ = ("body", "lookup", "request", "response_started", "scheduled", "websocket")

    def __init__(self, request: ProxyRequest, body: StreamedBody | None, websocket: bool) -> None:
        self.request = request
        self.body = body
        self.websocket = websocket
        self.scheduled = False
        self.response_started = False
        #: The cache lookup the fast path made and could not answer from (reused by the
        #: slow path).
        self.lookup: Lookup | None = None


class Connections:
    """The open connections of one listener: deadline sweeps and draining."""

    def __init__(
        self,
        pipeline: Pipeline,
        loop: asyncio.AbstractEventLoop,
        budget: FdBudget | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.loop = loop
        self.open: set[EdgeConnection] = set()
        #: Upgraded connections: 1:1 WebSocket tunnels and edge-terminated stream sessions.
        self.tunnels: set[Upgraded] = set()
        #: Edge-terminated streams (``edge.streams``), set by the worker.
        self.streams: StreamService | None = None
        self.draining = False
        self._sweeper: asyncio.Task[None] | None = None
        self.budget = budget if budget is not None else FdBudget.current()
        #: Client connections allowed at once (0: unbounded), read on every accept.
        self.max_open = self.budget.max_connections
        #: Client connections held by the other front ends (``edge.front``: connections whose
        #: protocol is not known yet, HTTP/2 ones), counted against the same budget.
        self.other_fronts: Callable[[], int] = _no_other_fronts
        self.resources = ResourceStats(self.budget)
        pipeline.metrics.registry.register(self.resources)
        self._refused_log = Throttle()
        self._exhausted_log = Throttle()
        #: Open connections per client network (``edge.connection_limits``), and the log
        #: throttle of each refusal reason.
        self.clients = ClientConnections()
        pipeline.metrics.registry.register(ClientConnectionStats(self.clients))
        self._limit_logs = {"total": Throttle(), "per_client": Throttle()}
        self._sweeps = 0
        # A descriptor to dup: the cheapest question "is there one left?" (fdlimit).
        self._probe_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        #: The head-stripping rule for the config snapshot it was made for (the request ID
        #: field's name is configurable).
        self._meaning: tuple[EdgeState, MeaningKey] | None = None

    def meaning_key(self, state: EdgeState) -> MeaningKey:
        """The ``MeaningKey`` of config snapshot ``state`` (made once per snapshot)."""
        meaning = self._meaning
        if meaning is None or meaning[0] is not state:
            key = MeaningKey(state.request_id_header)
            self._meaning = meaning = (state, key)
        return meaning[1]

    def factory(self, tls_version: str | None = None) -> EdgeConnection:
        """A connection's protocol; ``tls_version`` for one that came over TLS (its requests
        then say ``https`` upstream, in X-Forwarded-Proto, and its access lines the version)."""
        return EdgeConnection(self, tls_version)

    def start(self) -> None:
        self._sweeper = self.loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = self.loop.time()
            for conn in list(self.open):
                conn.check_deadline(now)
            for tunnel in list(self.tunnels):
                tunnel.check_idle(now)
            self.pipeline.access_log.flush()
            self._sweeps += 1
            if self._sweeps % FD_PROBE_EVERY == 0:
                self.probe_descriptors()

    def admit(self) -> bool:
        """Whether one more client connection fits the descriptor budget; logs (at most once
        per ``LOG_INTERVAL``) and counts the refusals."""
        cap = self.max_open
        if cap == 0:
            return True
        open_now = len(self.open) + self.other_fronts()
        if open_now < cap:
            return True
        self.resources.refuse("fd_reserve")
        count = self._refused_log.note(self.loop.time())
        if count:
            log.warning(
                "connections_refused",
                reason="fd_reserve",
                refused=count,
                open=open_now,
                max_connections=cap,
                fd_limit=self.budget.limit,
            )
        return False

    def admit_client(self, peer: str, also_open: int = 0) -> int | None:
        """``edge.connection_limits`` for a new connection from ``peer`` (``also_open``:
        connections of another front end): its key for ``clients.release``, or None when
        refused (counted, and logged at most once per ``LOG_INTERVAL`` per reason)."""
        state = self.pipeline.state
        limits = state.config.edge.connection_limits
        open_now = len(self.open) + also_open
        if limits.total and open_now >= limits.total:
            reason, cap = "total", limits.total
        else:
            key = self.clients.admit(peer, limits, state.trusted_proxies)
            if key is not None:
                return key
            reason, cap = "per_client", limits.per_client
        self.resources.refuse(reason)
        count = self._limit_logs[reason].note(self.loop.time())
        if count:
            log.warning(
                "connections_refused",
                reason=reason,
                client=peer,
                refused=count,
                open=open_now,
                limit=cap,
            )
        return None

    def probe_descriptors(self) -> bool:
        """Whether the process is out of descriptors (then the event loop closes every new
        connection unseen): counted and logged, at most once per ``LOG_INTERVAL``."""
        if not fd_exhausted(self._probe_fd):
            return False
        self.resources.exhausted += 1
        count = self._exhausted_log.note(self.loop.time())
        if count:
            log.error(
                "accept_failing",
                reason="fd_exhausted",
                probes=count,
                open=len(self.open),
                fd_limit=self.budget.limit,
            )
        return True

    @property
    def busy(self) -> int:
        return sum(1 for c in self.open if c.busy) + len(self.tunnels)

    def begin_drain(self) -> None:
        """Stop keep-alive: idle connections close now, busy ones after their response."""
        self.draining = True
        # Upgraded connections first: their close frame goes out before the connection,
        # idle as HTTP, is closed below.
        for tunnel in list(self.tunnels):
            tunnel.close_going_away()
        for conn in list(self.open):
            conn.stop_keep_alive()

    async def wait_idle(self, within: float) -> bool:
        deadline = self.loop.time() + within
        # "busy" is derived from every connection's state; polling it is simpler than events.
        while self.busy and self.loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return not self.busy

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.close_now()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.pipeline.access_log.flush()
        if self._probe_fd >= 0:
            os.close(self._probe_fd)
            self._probe_fd = -1


class EdgeConnection(asyncio.Protocol):
    """HTTP/1.1 server side of one client connection (also the pipeline's ``ResponseSink``)."""

    def __init__(self, connections: Connections, tls_version: str | None = None) -> None:
        self._connections = connections
        #: How the client reached the edge (X-Forwarded-Proto) and the access lines' fields.
        self.scheme = b"https" if tls_version else b"http"
        self.protocol = protocol_fields("h1", tls_version) if tls_version else None
        self._pipeline = connections.pipeline
        self._loop = connections.loop
        self._transport: asyncio.Transport | None = None
        #: In ``Connections.open`` and the connections gauge (until connection_lost).
        self._counted = False
        #: Its client network in ``Connections.clients`` (``edge.connection_limits``).
        self._client_key = UNCOUNTED
        self._parser = httptools.HttpRequestParser(self)
        self.client_ip = "-"
        # Head being parsed.
        self._url_parts: list[bytes] = []
        self._url_length = 0
        self._headers: Headers = []
        self._header_bytes = 0
        self._head_bytes = 0
        self._hosts = 0
        self._host: bytes | None = None
        self._supplied_id: bytes | None = None
        self._framing_headers = False
        #: The head needs ``screen_headers`` (an underscore name, a Connection nomination).
        self._screen = False
        self._reading_head = False
        # Raw-offset tracking for ``ChunkedScanner`` (llhttp reports no offsets): the chunk
        # being fed, the offset up to which it is accounted to messages, where the current
        # message began in it (-1: in earlier data, whose last head bytes are ``_carry``).
        self._raw = b""
        self._cursor = 0
        self._msg_start = _UNKNOWN
        self._carry = b""
        self._chunks: ChunkedScanner | None = None
        self._chunk_end: int | None = None
        #: Messages begun in the chunk being fed, and the head of the last bodiless
        #: keep-alive GET/HEAD parsed from it (see ``RequestHead``).
        self._chunk_messages = 0
        self._head_seen: RequestHead | None = None
        self._rejected: RequestRejected | None = None
        # Requests.
        self._current: Exchange | None = None
        self._active: Exchange | None = None
        self._queue: deque[Exchange] = deque()
        self._task: asyncio.Task[None] | None = None
        self._tunnel: Upgraded | None = None
        self._pending_upgrade: Exchange | None = None
        # Response being written.
        self._framing = BodyFraming(BodyKind.NONE)
        self._keep_alive = True
        self._must_close = False
        self._pending_head = b""
        self.bytes_sent = 0
        # Flow control.
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_pauses = 0
        # Timeouts.
        self._deadline = 0.0
        self._deadline_kind = _DEADLINE_NONE
        #: The active request's total deadline (loop time; 0: none), and whether it passed.
        self._request_deadline = 0.0
        self._request_expired = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._connections.admit():
            # Over the descriptor budget: closed at once, never counted as open.
            self._counted = False
            cast(asyncio.Transport, transport).abort()
            return
        peer = transport.get_extra_info("peername")
        client_ip = peer[0] if peer else "-"
        client_key = self._connections.admit_client(client_ip)
        if client_key is None:
            # Over edge.connection_limits: closed before a byte is read.
            self._counted = False
            cast(asyncio.Transport, transport).abort()
            return
        self._client_key = client_key
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.client_ip = client_ip
        self._counted = True
        self._connections.open.add(self)
        self._connections.pipeline.metrics.connections.inc()
        # The first request head must arrive within the header timeout (slowloris).
        self._set_deadline(_DEADLINE_HEADER)

    def connection_lost(self, exc: Exception | None) -> None:
        self._parser = _CLOSED_PARSER  # no data comes after this: break the cycle
        if not self._counted:
            return  # refused in connection_made
        self._counted = False
        self._connections.open.discard(self)
        self._connections.clients.release(self._client_key)
        self._connections.pipeline.metrics.connections.dec()
        self._transport = None
        for exchange in (self._current, self._active, *self._queue):
            if exchange is not None and exchange.body is not None:
                exchange.body.fail(RequestRejected(400, "client_disconnected"))
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._tunnel is not None:
            self._tunnel.client_lost()
        self._wake_drain()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._tunnel is not None:
            self._tunnel.pause_upstream_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._tunnel is not None:
            self._tunnel.resume_upstream_reading()
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.from_client(data)
            return
        at_boundary = not self._reading_head and self._current is None
        if (
            at_boundary
            and self._active is None
            and not self._connections.draining
            and self._fast_path(data)
        ):
            return
        if self._reading_head:
            self._head_bytes += len(data)
        self._chunk_messages = 0
        self._head_seen = None
        try:
            if self._head_bytes > self._pipeline.state.head_budget:
                raise RequestRejected(431 if self._url_parts else 414, "head_too_large")
            self._raw = data
            self._cursor = 0
            if self._reading_head and self._msg_start != _UNKNOWN:
                self._msg_start = -1  # the head began in earlier data
            scanner = self._chunks
            if scanner is not None:
                # Chunk sizes and trailers are judged before the parser passes body bytes on.
                self._chunk_end = scanner.feed(data)
            self._parser.feed_data(data)
            if self._reading_head:
                self._keep_carry(data)
            head = self._head_seen
            if head is not None:
                self._head_seen = None
                if (
                    at_boundary
                    and self._chunk_messages == 1
                    and not self._reading_head
                    and seen_before(self._pipeline.state.first_sights, data)
                ):
                    # The chunk was exactly one request, seen before: remember its parsed head.
                    remember_head(self._pipeline.state.request_heads, data, head)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded(data[int(upgrade.args[0]) :])
        except httptools.HttpParserCallbackError:
            rejected = self._rejected or RequestRejected(400, "bad_request")
            self._reject(rejected)
        except RequestRejected as rejected:
            self._reject(rejected)
        except httptools.HttpParserError as exc:
            self._reject(RequestRejected(400, _parser_reason(exc)))

    def eof_received(self) -> bool | None:
        # A half-closed client still gets its responses (returning True keeps the socket open).
        return self.busy

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._msg_start = self._cursor
        self._chunk_messages += 1
        self._head_seen = None
        self._url_parts = []
        self._url_length = 0
        self._headers = []
        self._header_bytes = 0
        self._head_bytes = 0
        self._hosts = 0
        self._host = None
        self._supplied_id = None
        self._framing_headers = False
        self._screen = False
        self._reading_head = True
        self._set_deadline(_DEADLINE_HEADER)

    def on_url(self, url: bytes) -> None:
        self._url_length += len(url)
        self._url_parts.append(url)
        self._guard(check_url_length, self._url_length)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._reading_head:
            # A chunked trailer field: never merged into the headers (the scanner has
            # already refused the ones that could only be an attack).
            self._guard(_check_trailer, name.lower())
            return
        self._header_bytes += len(name) + len(value) + 4
        name = name.lower()
        headers = self._headers
        headers.append((name, value))
        state = self._pipeline.state
        if len(headers) > state.max_headers or self._header_bytes > state.max_header_bytes:
            try:
                check_header_section(len(headers), self._header_bytes, state.config.edge.limits)
            except RequestRejected as exc:
                self._rejected = exc
                raise
        if name in state.tracked_headers:  # noted now: no second pass over the headers
            if name == b"host":
                self._hosts += 1
                self._host = value
            elif name == state.request_id_header:
                if self._supplied_id is None:
                    self._supplied_id = value
            elif name == b"connection":
                if value not in _PLAIN_CONNECTION:
                    self._screen = True
            else:
                self._framing_headers = True
        elif b"_" in name:
            self._screen = True

    def on_headers_complete(self) -> None:
        self._reading_head = False
        start = self._msg_start
        end = head_end(self._raw, start, self._carry) if start != _UNKNOWN else -1
        self._cursor = end if end >= 0 else _UNKNOWN
        state = self._pipeline.state
        parser = self._parser
        method = parser.get_method().decode("ascii", "replace")
        version = parser.get_http_version()
        headers = self._headers
        try:
            if version not in _VERSIONS:
                raise RequestRejected(400, "unsupported_http_version")
            if method == "CONNECT":
                raise RequestRejected(405, "connect_not_supported")
            framing = (
                check_request_framing(headers, version, state.config.edge.limits)
                if self._framing_headers
                else NO_BODY
            )
            if framing.kind is not BodyKind.NONE and (method == "GET" or method == "HEAD"):
                # Never forwarded (a cache fill would drop it; a body the origin reads and
                # the edge ignored is a desync): refused, as for any ambiguous framing.
                raise RequestRejected(400, "body_not_allowed")
            if self._hosts > 1:
                raise RequestRejected(400, "duplicate_host")
            # The one decision: target, routing path and host (key, Host, X-Forwarded-Host).
            decided = decide_target(b"".join(self._url_parts), self._host, version)
            host = decided.host
            if self._screen or host != self._host:
                headers = screen_headers(headers, host)
            if framing.kind is BodyKind.CHUNKED:
                if self._cursor < 0:
                    raise RequestRejected(400, "unscannable_request")
                scanner = self._chunks = ChunkedScanner(
                    state.config.edge.limits.max_body, check_trailer
                )
                self._chunk_end = scanner.feed(self._raw, self._cursor)
        except RequestRejected as exc:
            self._rejected = exc
            raise
        target, path = decided.target, decided.path
        supplied = self._supplied_id
        request_supplied = supplied is not None and valid_request_id(supplied)
        request_id = supplied if request_supplied and supplied is not None else new_request_id()
        upgrade = parser.should_upgrade()
        websocket = upgrade and method == "GET" and is_websocket_upgrade(headers)
        request = ProxyRequest(
            method=method,
            target=target,
            path=path,
            host=host,
            http_version=version,
            headers=headers,
            # After a non-WebSocket upgrade request httptools stops parsing: close after it.
            keep_alive=parser.should_keep_alive() and not upgrade,
            client_ip=self.client_ip,
            body=framing,
            request_id=request_id,
            received_at=self._pipeline.clock(),
            request_id_supplied=request_supplied,
            scheme=self.scheme,
            protocol=self.protocol,
        )
        body = (
            StreamedBody(self._pause_for_body, self._resume_for_body) if framing.has_body else None
        )
        exchange = Exchange(request, body, websocket)
        self._current = exchange
        if body is not None:
            self._set_deadline(_DEADLINE_BODY)
            if expects_continue(headers):
                self._schedule(exchange)
        else:
            self._set_deadline(_DEADLINE_NONE)

    def on_body(self, data: bytes) -> None:
        if self._chunks is None and self._cursor >= 0:
            self._cursor += len(data)
        exchange = self._current
        if exchange is None or exchange.body is None:
            return
        exchange.body.feed(data)
        self._set_deadline(_DEADLINE_BODY)
        if exchange.body.received > self._pipeline.state.config.edge.limits.max_body:
            rejected = RequestRejected(413, "body_too_large")
            exchange.body.fail(rejected)
            if not exchange.scheduled:
                self._rejected = rejected
                raise rejected
            return
        if not exchange.scheduled:
            self._schedule(exchange)

    def on_message_complete(self) -> None:
        if self._chunks is not None:
            end = self._chunk_end
            self._cursor = end if end is not None and self._chunks.done else _UNKNOWN
            self._chunks = None
        exchange = self._current
        self._current = None
        if exchange is None:
            return
        if exchange.body is not None:
            exchange.body.finish()
        if exchange.websocket:
            self._pending_upgrade = exchange  # httptools raises HttpParserUpgrade next
            return
        if exchange.scheduled:
            return
        request = exchange.request
        if request.keep_alive and request.method in ("GET", "HEAD"):
            if request.http_version == "1.1" and exchange.body is None:
                self._head_seen = RequestHead(
                    request.method,
                    request.target,
                    request.path,
                    request.host,
                    request.headers,
                    request.request_id if request.request_id_supplied else None,
                )
            if self._active is None and not self._connections.draining:
                prebuilt = self._pipeline.fast_response(request)
                if prebuilt is not None and self._transport is not None:
                    self._transport.write(prebuilt)
                    self.bytes_sent += len(prebuilt)
                    self._set_deadline(_DEADLINE_IDLE)
                    return
                exchange.lookup = self._pipeline.take_pending(request)
        self._schedule(exchange)

    def _fast_path(self, data: bytes) -> bool:
        """Answer ``data`` without llhttp when it is exactly one common request head; False
        leaves it to the parser.  In order of cost:

        1. the exact bytes seen before (``request_heads``): a memoised hit, else the parsed head;
        2. the same head but for its User-Agent, Cookie and request ID (``MeaningKey``): the
           memoised hit, if any, never the parsed head (those fields go upstream on a miss);
        3. a head of the common shape (``parse_simple_head``), parsed in one pass.
        """
        state = self._pipeline.state
        heads = state.request_heads
        head = heads.get(data)
        if head is not None:
            if head.hit is not None:
                supplied = head.supplied_id
                wire = self._pipeline.replay_hit(head, self.client_ip, supplied, self.protocol)
                if wire is not None:
                    self._write_prebuilt(wire)
                    return True
            self._replay(head)
            return True
        if len(data) > REQUEST_HEAD_MAX_BYTES or data[-4:] != b"\r\n\r\n":
            return False
        volatile = self._connections.meaning_key(state).split(data)
        key = volatile.key
        if key is not data:
            head = heads.get(key)
            if (
                head is not None
                and head.hit is not None
                # The stripped fields count against the limits like any other.
                and data.count(b"\n") <= state.max_headers + 2
                and len(data) <= state.max_header_bytes
            ):
                rid = volatile.request_id
                supplied = rid if rid is not None and valid_request_id(rid) else None
                wire = self._pipeline.replay_hit(head, self.client_ip, supplied, self.protocol)
                if wire is not None:
                    self._write_prebuilt(wire)
                    return True
        limits = state.config.edge.limits
        simple = parse_simple_head(
            data,
            request_id_header=state.request_id_header,
            max_headers=limits.max_headers,
            max_header_bytes=limits.max_header_bytes,
            max_url=limits.max_url,
        )
        if simple is None:
            return False
        head = RequestHead(*simple)
        if seen_before(state.first_sights, key):
            remember_head(heads, key, head)
            self._replay(head)
        else:
            self._replay(head, memoised=False)
        return True

    def _write_prebuilt(self, wire: bytes) -> None:
        if self._transport is not None:
            self._transport.write(wire)
            self.bytes_sent += len(wire)
        self._set_deadline(_DEADLINE_IDLE)

    def _replay(self, head: RequestHead, *, memoised: bool = True) -> None:
        """A request whose exact bytes were parsed and validated before: no parser, no
        callbacks (the parser stays at the message boundary it was at).  ``memoised``: the
        head lives in ``request_heads``, so what the hit path derives from it is kept on it;
        a head seen once goes through as if llhttp had parsed it."""
        supplied = head.supplied_id
        request = ProxyRequest(
            head.method,
            head.target,
            head.path,
            head.host,
            "1.1",
            head.headers,
            True,
            self.client_ip,
            NO_BODY,
            supplied if supplied is not None else new_request_id(),
            self._pipeline.clock(),
            supplied is not None,
            head if memoised else None,
            self.scheme,
            self.protocol,
        )
        prebuilt = self._pipeline.fast_response(request)
        if prebuilt is not None and self._transport is not None:
            self._transport.write(prebuilt)
            self.bytes_sent += len(prebuilt)
            self._set_deadline(_DEADLINE_IDLE)
            return
        self._set_deadline(_DEADLINE_NONE)
        exchange = Exchange(request, None, False)
        exchange.lookup = self._pipeline.take_pending(request)
        self._schedule(exchange)

    # -- scheduling ---------------------------------------------------------------------------

    def _schedule(self, exchange: Exchange) -> None:
        streams = self._connections.streams
        if streams is not None and (
            self._tunnel is not None or streams.takes_events(exchange.request)
        ):
            self._to_event_stream(exchange, streams)
            return
        exchange.scheduled = True
        if self._active is None:
            self._start(exchange)
            return
        self._queue.append(exchange)
        if len(self._queue) == PIPELINE_DEPTH:
            self._pause_reading()

    def _to_event_stream(self, exchange: Exchange, streams: StreamService) -> None:
        """A GET on the stream path: the connection becomes a Server-Sent Events stream
        (``edge.streams.sse``); what a client pipelines after it is dropped."""
        exchange.scheduled = True
        if self._tunnel is not None or self._transport is None:
            return
        if self._active is not None or self._queue or exchange.body is not None:
            self._reject(RequestRejected(400, "event_stream_while_busy"))
            return
        self._deadline_kind = _DEADLINE_NONE
        self._tunnel = streams.open_events(self._connections, self._transport, exchange.request)

    def _start(self, exchange: Exchange) -> None:
        self._active = exchange
        self._keep_alive = exchange.request.keep_alive
        self.bytes_sent = 0
        self._request_deadline = 0.0
        self._request_expired = False
        if exchange.body is not None and expects_continue(exchange.request.headers):
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._task = self._loop.create_task(self._run(exchange))

    async def _run(self, exchange: Exchange) -> None:
        try:
            await self._pipeline.handle(exchange.request, exchange.body, self, exchange.lookup)
        except asyncio.CancelledError:
            pass  # the client went away
        except Exception as exc:  # a bug: answer 500 if we still can, never hang the client
            log.error(
                "request_failed",
                error=repr(exc),
                request_id=exchange.request.request_id.decode("ascii", "replace"),
            )
            if self._active is exchange and not exchange.response_started:
                self.write_complete(
                    self._pipeline.error_answer(500, "internal_error", exchange.request.request_id),
                    close=True,
                )
            else:
                self.abort()
        finally:
            self._finished(exchange)

    def _finished(self, exchange: Exchange) -> None:
        if self._active is not exchange:
            return
        self._active = None
        self._task = None
        self._request_deadline = 0.0
        body = exchange.body
        # The request must have been read to its end for the connection to be reused: a
        # body that failed (timed out, too large) or is still arriving leaves the parser
        # mid-message, and nothing else would ever end this connection.
        body_unread = self._current is exchange or (
            body is not None and (not body.complete or body.error is not None)
        )
        if self._transport is None:
            return
        if self._must_close or not self._keep_alive or body_unread:
            self.close_now()
            return
        if self._queue:
            was_full = len(self._queue) >= PIPELINE_DEPTH
            self._start(self._queue.popleft())
            if was_full:
                self._resume_reading()
        elif self._connections.draining:
            self.close_now()
        elif not self._reading_head and self._current is None:
            self._set_deadline(_DEADLINE_IDLE)

    # -- ResponseSink -------------------------------------------------------------------------

    @property
    def response_started(self) -> bool:
        return self._active is not None and self._active.response_started

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    @property
    def busy(self) -> bool:
        return self._active is not None or bool(self._queue) or self._current is not None

    def start_response(
        self,
        status: int,
        reason: bytes,
        headers: Headers,
        framing: BodyFraming,
        head_length: int | None,
    ) -> None:
        if self._active is not None:
            self._active.response_started = True
        keep_alive = self._keep_alive and not self._connections.draining
        if framing.kind is BodyKind.UNTIL_CLOSE or not keep_alive:
            self._keep_alive = False
        self._framing = framing
        # Held back to go out with the first body bytes: one write per small response.
        self._pending_head = serialize_head(
            status,
            reason,
            headers,
            framing,
            keep_alive=self._keep_alive,
            head_length=head_length,
        )

    def write_body(self, data: bytes) -> None:
        if not data:
            return
        if self._framing.kind is BodyKind.CHUNKED:
            data = encode_chunk(data)
        if self._pending_head:
            data = self._pending_head + data
            self._pending_head = b""
        self._write(data)

    def end_response(self) -> None:
        tail = b"0\r\n\r\n" if self._framing.kind is BodyKind.CHUNKED else b""
        if self._framing.kind is BodyKind.UNTIL_CLOSE:
            self._must_close = True
        if self._pending_head or tail:
            self._write(self._pending_head + tail)
            self._pending_head = b""

    def write_complete(self, data: bytes, *, close: bool) -> None:
        if self._active is not None:
            self._active.response_started = True
        self._write(data)
        if close:
            self._must_close = True

    def abort(self) -> None:
        """End the connection without completing the response (the client sees truncation)."""
        self._must_close = True
        if self._transport is not None:
            self._transport.close()

    def expire_after(self, seconds: float) -> None:
        """Cancel the active request's task once ``seconds`` have passed (checked by the
        sweep, so up to ``SWEEP_INTERVAL`` late: no timer per request)."""
        self._request_deadline = self._loop.time() + seconds

    @property
    def deadline_expired(self) -> bool:
        return self._request_expired

    async def drain(self) -> None:
        if not self._write_paused or self._transport is None:
            return
        self._drain_waiter = self._loop.create_future()
        await self._drain_waiter

    # -- connection control -------------------------------------------------------------------

    def stop_keep_alive(self) -> None:
        """Draining: an idle connection closes now, a busy one after its current response."""
        if not self.busy:
            self.close_now()

    def close_now(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def check_deadline(self, now: float) -> None:
        if self._request_deadline and now >= self._request_deadline:
            self._request_deadline = 0.0
            task = self._task
            if task is not None and not task.done():
                self._request_expired = True
                task.cancel()
        kind = self._deadline_kind
        if kind == _DEADLINE_NONE:
            if self._active is None and self._current is not None and not self._queue:
                # A request being read with no deadline and nothing handling it: nothing
                # would ever end this connection (the accounting must not leak).
                self.close_now()
            return
        if now < self._deadline:
            return
        self._deadline_kind = _DEADLINE_NONE
        if kind == _DEADLINE_IDLE:
            self.close_now()
        elif kind == _DEADLINE_HEADER:
            if self._active is None:
                self._reject(RequestRejected(408, "client_header_timeout"))
            else:
                self._must_close = True
        elif kind == _DEADLINE_BODY:
            exchange = self._current
            rejected = RequestRejected(408, "client_body_timeout")
            if exchange is not None and exchange.body is not None:
                exchange.body.fail(rejected)
                if not exchange.scheduled:
                    self._reject(rejected)
                else:
                    # The message will never end: close once its response is out.
                    self._must_close = True

    def _set_deadline(self, kind: int) -> None:
        self._deadline_kind = kind
        if kind != _DEADLINE_NONE:
            self._deadline = self._loop.time() + self._pipeline.state.deadlines[kind]

    # -- helpers ------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)
            self.bytes_sent += len(data)

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._drain_waiter = None

    def _keep_carry(self, data: bytes) -> None:
        """A head continues in the next chunk: keep its last bytes (for ``head_end``)."""
        start = self._msg_start
        if start == _UNKNOWN:
            return
        if start >= 0:
            while start < len(data) and data[start] in b"\r\n":
                start += 1
            tail = data[start:]
        else:
            tail = self._carry + data
        self._carry = tail[-3:]

    def _guard(self, check: Callable[..., None], *args: object) -> None:
        try:
            check(*args, self._pipeline.state.config.edge.limits)
        except RequestRejected as exc:
            self._rejected = exc
            raise

    def _reject(self, rejected: RequestRejected) -> None:
        """Answer a request the edge refuses to forward, then close (framing is now unknown)."""
        answer = self._pipeline.refusal(rejected, self.client_ip, "h1")
        self._rejected = None
        self._deadline_kind = _DEADLINE_NONE
        if self._current is not None and self._current.body is not None:
            self._current.body.fail(rejected)
        if self._transport is None:
            return
        if self._active is None:
            self._transport.write(answer)
            self._transport.close()
        else:
            # A response is in progress: let it finish, then close; the bad request is dropped.
            self._must_close = True
            self._queue.clear()
            self._pause_reading()

    def _pause_for_body(self) -> None:
        self._pause_reading()

    def _resume_for_body(self) -> None:
        self._resume_reading()

    def _pause_reading(self) -> None:
        self._read_pauses += 1
        if self._read_pauses == 1 and self._transport is not None:
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        self._read_pauses = max(0, self._read_pauses - 1)
        if self._read_pauses == 0 and self._transport is not None:
            self._transport.resume_reading()

    def _upgraded(self, rest: bytes) -> None:
        exchange = self._current
        self._current = None
        if exchange is None:  # on_message_complete already ran
            exchange = self._pending_upgrade
        self._pending_upgrade = None
        if exchange is None or not exchange.websocket:
            # Not a WebSocket: answered normally, then the connection closes (keep_alive=False).
            return
        if self._active is not None or self._queue:
            self._reject(RequestRejected(400, "upgrade_while_busy"))
            return
        from edge.websocket import Tunnel

        assert self._transport is not None
        self._deadline_kind = _DEADLINE_NONE
        streams = self._connections.streams
        if streams is not None and streams.handles(exchange.request.path):
            # The stream path: terminated here (edge.streams), not tunnelled.
            self._tunnel = streams.open(self._connections, self._transport, exchange.request, rest)
            return
        tunnel = Tunnel(self._connections, self, self._transport, exchange.request, rest)
        self._tunnel = tunnel
        tunnel.start()


def _check_trailer(name: bytes, _limits: object) -> None:
    check_trailer(name)


def _parser_reason(exc: Exception) -> str:
    text = str(exc).lower()
    for needle, reason in (
        ("content-length", "invalid_content_length"),
        ("transfer-encoding", "invalid_transfer_encoding"),
        ("chunk", "invalid_chunk"),
        ("whitespace after header", "obs_fold"),
        ("cr", "bare_lf"),
    ):
        if needle in text:
            return reason
    return "malformed_request"
