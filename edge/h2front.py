"""The HTTP/2 front end: each stream an ``Exchange`` through the same stages as HTTP/1.1.

``H2Connection`` is a thin ``asyncio.Protocol`` around the ``h2`` library's state machine (as
hypercorn drives it): bytes in -> ``h2`` events -> streams; what ``h2`` wants sent is written
once per read.  Each request stream becomes a ``ProxyRequest`` and runs ``Pipeline.handle`` in
a task with an ``H2Stream`` as its ``ResponseSink``, so no stage knows HTTP/2: a response head
becomes a HEADERS frame (HPACK per connection, by ``h2``), its body DATA frames sent as the
peer's flow-control windows allow, and the prebuilt HTTP/1.1 bytes of a cache hit or an edge
error (``write_complete``) are read back into status, headers and body (the head's parse is
memoised per distinct head, so a hit costs one dictionary lookup and the frames).

Hostile by default:

* SETTINGS: at most ``edge.http2.max_concurrent_streams`` streams (128), a header list of at
  most ``edge.limits.max_header_bytes`` advertised; the HPACK decoder refuses a decoded list
  beyond twice that (an HPACK bomb: GOAWAY ENHANCE_YOUR_CALM), a list beyond the limit but
  within the refusal is answered 431 on its stream; frame size ``edge.http2.max_frame_size``.
* ``edge.h2meter.FrameMeter`` on the raw bytes: rapid reset, control-frame floods and
  CONTINUATION floods end the connection with GOAWAY ENHANCE_YOUR_CALM.
* Anything ``h2`` calls a protocol error (stream-id abuse, a frame on a closed stream, bad
  pseudo-headers) ends it with GOAWAY and that error code.
* Flow control: a stream's response bytes wait for the peer's window; the stage writing them
  waits (``drain``) once more than ``STREAM_HIGH_WATER`` bytes wait, so memory per stream is
  bounded; a stream stuck on a zero window for ``edge.http2.stall_timeout`` is reset (and its
  work cancelled); the request body is acknowledged (WINDOW_UPDATE) only as the forward stage
  consumes it, so a client can never have more than one window in flight.
* The connection's deadlines (first request within ``client_header``, idle within
  ``client_idle``, each stream's total) are checked by the front end's sweep, as for
  HTTP/1.1: no timer per stream.
* Draining (SIGTERM) sends GOAWAY with the last stream accepted; streams in flight finish,
  later ones are refused (REFUSED_STREAM, safe to retry), then the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
from hyperframe.frame import GoAwayFrame
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from edge.accesslog import H1_FIELDS, protocol_fields
from edge.cache import Lookup
from edge.http1 import (
    NO_BODY,
    BodyFraming,
    BodyKind,
    Headers,
    RequestRejected,
    check_request_framing,
    error_response,
    new_request_id,
    valid_request_id,
)
from edge.pipeline import Pipeline, ProxyRequest
from edge.request_target import decide_target, screen_headers
from meridian.log import get_logger

from .h2meter import FrameMeter

if TYPE_CHECKING:
    from edge.front import FrontDoors

log = get_logger("edge")
# hpack logs every field it codes at debug level: a call per field even when nobody listens.
for _name in ("hpack.hpack", "hpack.table"):
    logging.getLogger(_name).disabled = True

#: Response bytes a stream buffers (waiting for the peer's window) before its writer waits.
STREAM_HIGH_WATER: Final = 64 * 1024
#: Parsed heads of prebuilt HTTP/1.1 responses remembered (cleared when full).
WIRE_MEMO_SIZE: Final = 1024
#: Seconds a connection ended by GOAWAY is still read (and its bytes dropped) before closing.
LINGER: Final = 1.0
#: The HPACK decoder refuses decoded header lists beyond this many times the advertised limit.
HPACK_REFUSE_FACTOR: Final = 2
_HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
_NOT_CACHED: Headers = [(b"x-cache", b"BYPASS"), (b"age", b"0")]
_CLOSED: Final = h2.connection.ConnectionState.CLOSED
_STREAMS_BUCKETS: Final = (1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 1000.0, 10000.0)


@dataclass(slots=True, eq=False)
class H2Stats(Collector):
    """HTTP/2 counters (plain numbers, exported on scrape)."""

    streams: int = 0
    #: Requests by TLS version ("none": h2c).
    requests: dict[str, int] = field(default_factory=dict)
    goaways: dict[str, int] = field(default_factory=dict)
    resets: dict[str, int] = field(default_factory=dict)
    #: Streams per connection, observed when a connection closes.
    per_connection: list[int] = field(default_factory=lambda: [0] * (len(_STREAMS_BUCKETS) + 1))
    per_connection_sum: int = 0

    def bump(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def connection_closed(self, streams: int) -> None:
        self.per_connection_sum += streams
        for i, bound in enumerate(_STREAMS_BUCKETS):
            if streams <= bound:
                self.per_connection[i] += 1
                return
        self.per_connection[-1] += 1

    def collect(self) -> Iterable[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "meridian_edge_h2_requests",
            "HTTP/2 requests (streams that carried a request), by TLS version.",
            labels=("tls_version",),
        )
        for version, count in sorted(self.requests.items()):
            requests.add_metric((version,), count)
        yield requests
        goaways = CounterMetricFamily(
            "meridian_edge_h2_goaways",
            "HTTP/2 connections ended by the edge with GOAWAY, by reason.",
            labels=("reason",),
        )
        for reason, count in sorted(self.goaways.items()):
            goaways.add_metric((reason,), count)
        yield goaways
        resets = CounterMetricFamily(
            "meridian_edge_h2_stream_resets",
            "HTTP/2 streams reset, by who and why.",
            labels=("reason",),
        )
        for reason, count in sorted(self.resets.items()):
            resets.add_metric((reason,), count)
        yield resets
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(_STREAMS_BUCKETS, self.per_connection, strict=False):
            running += count
            buckets.append((str(bound), running))
        running += self.per_connection[-1]
        buckets.append(("+Inf", running))
        histogram = HistogramMetricFamily(
            "meridian_edge_h2_streams_per_connection",
            "Streams each closed HTTP/2 connection carried.",
        )
        histogram.add_metric([], buckets, self.per_connection_sum)
        yield histogram

    def describe(self) -> Iterable[CounterMetricFamily]:
        return []


# --------------------------------------------------------------------------------------------
# Prebuilt HTTP/1.1 responses read back for HTTP/2


def parse_wire(wire: bytes, memo: dict[bytes, tuple[int, Headers]]) -> tuple[int, Headers, bytes]:
    """Status, HTTP/2 header fields and body of a complete HTTP/1.1 response made by the edge
    (a cached entry's bytes, an error).  Hop-by-hop fields are dropped, names lower-cased; a
    chunked body is decoded."""
    end = wire.find(b"\r\n\r\n")
    if end < 0:
        raise ValueError("prebuilt response without a head end")
    head = wire[:end]
    body = wire[end + 4 :]
    parsed = memo.get(head)
    if parsed is None:
        lines = head.split(b"\r\n")
        status = int(lines[0][9:12])
        headers: Headers = [(b":status", lines[0][9:12])]
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name in _HOP_BY_HOP:
                chunked = chunked or (name == b"transfer-encoding" and b"chunked" in value.lower())
                continue
            headers.append((name, value.strip()))
        if chunked:  # never memoised: rare, and its body must be decoded each time
            return status, headers, _dechunk(body)
        if len(memo) >= WIRE_MEMO_SIZE:
            memo.clear()
        memo[head] = parsed = (status, headers)
    return parsed[0], parsed[1], body


def _dechunk(data: bytes) -> bytes:
    out: list[bytes] = []
    pos = 0
    while True:
        line_end = data.index(b"\r\n", pos)
        size = int(data[pos:line_end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        start = line_end + 2
        out.append(data[start : start + size])
        pos = start + size + 2


# --------------------------------------------------------------------------------------------
# Request body


class H2Body:
    """A request body from DATA frames, handed to the forward stage as it arrives; its bytes
    are acknowledged to the peer (window reopened) only once consumed."""

    __slots__ = ("_chunks", "_conn", "_done", "_error", "_waiter", "received", "stream_id")

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._done = False
        self._error: RequestRejected | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.received = 0

    @property
    def complete(self) -> bool:
        return self._done

    @property
    def error(self) -> RequestRejected | None:
        return self._error

    def feed(self, data: bytes, flow_length: int) -> None:
        self.received += len(data)
        self._chunks.append((data, flow_length))
        self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    def fail(self, error: RequestRejected) -> None:
        if self._done:
            return
        self._error = error
        self._done = True
        self._wake()

    def unconsumed(self) -> int:
        """Flow-controlled bytes received and never consumed (released when the stream ends)."""
        total = sum(length for _, length in self._chunks)
        self._chunks.clear()
        return total

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                chunk, length = self._chunks.popleft()
                self._conn.consumed(self.stream_id, length)
                if chunk:
                    yield chunk
                continue
            if self._error is not None:
                raise self._error
            if self._done:
                return
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None


# --------------------------------------------------------------------------------------------
# One stream: the pipeline's ResponseSink


class H2Stream:
    """One request stream; the ``ResponseSink`` its exchange writes to."""

    __slots__ = (
        "_conn",
        "_drain_waiter",
        "_end_pending",
        "_outbound",
        "_pending_headers",
        "body",
        "bytes_sent",
        "closed",
        "deadline",
        "ended",
        "expired",
        "out_size",
        "request",
        "response_started",
        "stalled_since",
        "stream_id",
        "task",
    )

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.request: ProxyRequest | None = None
        self.body: H2Body | None = None
        self.task: asyncio.Task[None] | None = None
        self.response_started = False
        self.bytes_sent = 0
        self._pending_headers: Headers | None = None
        self._outbound: deque[bytes] = deque()
        self.out_size = 0
        self._end_pending = False
        #: Our END_STREAM went out (or the stream was reset): nothing more to send.
        self.ended = False
        #: Reset, or the connection is gone.
        self.closed = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.deadline = 0.0
        self.expired = False
        #: Loop time since when response bytes wait on a zero window (0: not waiting).
        self.stalled_since = 0.0

    # -- ResponseSink -------------------------------------------------------------------------

    @property
    def write_paused(self) -> bool:
        return self.out_size > STREAM_HIGH_WATER or self._conn.write_paused

    def start_response(
        self,
        status: int,
        reason: bytes,
        headers: Headers,
        framing: BodyFraming,
        head_length: int | None,
    ) -> None:
        self.response_started = True
        fields: Headers = [(b":status", str(status).encode())]
        fields.extend(h for h in headers if h[0] not in _HOP_BY_HOP)
        if framing.kind is BodyKind.LENGTH:
            fields.append((b"content-length", str(framing.length).encode()))
        elif framing.kind is BodyKind.NONE and head_length is not None:
            fields.append((b"content-length", str(head_length).encode()))
        self._pending_headers = fields

    def write_body(self, data: bytes) -> None:
        if not data or self.closed:
            return
        self._send_headers(end_stream=False)
        if self.closed:
            return  # the HEADERS could not be sent: the stream is gone
        self._outbound.append(data)
        self.out_size += len(data)
        self._conn.flush_stream(self)

    def end_response(self) -> None:
        if self.closed:
            return
        if self._pending_headers is not None and not self._outbound:
            self._send_headers(end_stream=True)
        else:
            self._end_pending = True
            self._conn.flush_stream(self)
        self._conn.write_out()

    def write_complete(self, data: bytes, *, close: bool) -> None:
        # ``close`` is HTTP/1.1's (the framing of the connection is unknown): a stream ends
        # on its own, the connection goes on.
        if self.closed:
            return
        self.response_started = True
        status, fields, body = parse_wire(data, self._conn.doors.wire_memo)
        request = self.request
        if request is not None and (request.method == "HEAD" or status in (204, 304)):
            body = b""
        self._pending_headers = fields
        if not body:
            self.end_response()
            return
        # The whole response is here: its last DATA frame carries END_STREAM (no empty
        # frame after it).
        self._send_headers(end_stream=False)
        if self.closed:
            return
        self._outbound.append(body)
        self.out_size += len(body)
        self._end_pending = True
        self._conn.flush_stream(self)
        self._conn.write_out()

    def abort(self) -> None:
        self._conn.reset_stream(self, h2.errors.ErrorCodes.INTERNAL_ERROR, "aborted")

    async def drain(self) -> None:
        while self.write_paused and not self.closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter

    def expire_after(self, seconds: float) -> None:
        self.deadline = self._conn.loop.time() + seconds

    @property
    def deadline_expired(self) -> bool:
        return self.expired

    # -- the connection's side ----------------------------------------------------------------

    def _send_headers(self, *, end_stream: bool) -> None:
        fields = self._pending_headers
        if fields is None:
            return
        self._pending_headers = None
        self._conn.send_headers(self, fields, end_stream)
        if end_stream:
            self.ended = True

    def take(self, window: int) -> tuple[bytes, bool] | None:
        """Up to ``window`` bytes to send now, and whether they end the stream."""
        if not self._outbound:
            if self._end_pending and not self.ended:
                self.ended = True
                return b"", True
            return None
        chunk = self._outbound[0]
        if len(chunk) <= window:
            self._outbound.popleft()
        else:
            self._outbound[0] = chunk[window:]
            chunk = chunk[:window]
        self.out_size -= len(chunk)
        self.bytes_sent += len(chunk)
        end = not self._outbound and self._end_pending
        if end:
            self.ended = True
        return chunk, end

    @property
    def finished(self) -> bool:
        """The stage ended its response (its last bytes may still wait for a window)."""
        return self.ended or self._end_pending

    @property
    def waiting(self) -> bool:
        return bool(self._outbound) or (self._end_pending and not self.ended)

    def wake(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done() and (not self.write_paused or self.closed):
            waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        self._outbound.clear()
        self.out_size = 0
        self.wake()


# --------------------------------------------------------------------------------------------
# The connection


class H2Connection(asyncio.Protocol):
    """The server side of one HTTP/2 connection (h2c or ALPN h2)."""

    def __init__(self, doors: FrontDoors, *, tls_version: str = "none") -> None:
        self.doors = doors
        self.pipeline: Pipeline = doors.pipeline
        self.loop = doors.loop
        self.tls_version = tls_version
        self.scheme = b"https" if tls_version != "none" else b"http"
        #: This connection's fields in the access lines of its requests.
        self.protocol = protocol_fields("h2", tls_version if tls_version != "none" else None)
        self.client_ip = "-"
        state = self.pipeline.state
        edge = state.config.edge
        self.settings = edge.http2
        self.limits = edge.limits
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=config)
        codes = h2.settings.SettingCodes
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: self.settings.max_concurrent_streams,
                codes.MAX_HEADER_LIST_SIZE: self.limits.max_header_bytes,
                codes.MAX_FRAME_SIZE: self.settings.max_frame_size,
                codes.ENABLE_PUSH: 0,
            },
        )
        self.h2.max_inbound_frame_size = self.settings.max_frame_size
        # Responses are encoded without indexing, blocks memoised for the worker
        # (``edge.hpack_literal``): a hit's HEADERS cost a lookup, not an HPACK encoding.
        self.h2.encoder = cast(hpack.Encoder, doors.hpack_encoder)  # duck-typed, see there
        # Refused at once, not when the client acknowledges our SETTINGS.
        refuse = max(self.limits.max_header_bytes * HPACK_REFUSE_FACTOR, 8192)
        self.h2.decoder.max_header_list_size = refuse
        self.h2.decoder.max_allowed_table_size = 4096
        self.meter = FrameMeter(
            max_resets=self.settings.max_resets_per_second,
            max_control=self.settings.max_control_frames_per_second,
            max_header_block=refuse,
        )
        self._transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.write_paused = False
        self._reading_paused = False
        self._closing = False
        #: The last stream accepted once GOAWAY was sent (-1: not sent).
        self._goaway_last = -1
        self.streams_seen = 0
        self._idle_since = self.loop.time()
        self._had_request = False
        self._counted = False
        #: The client sent GOAWAY.
        self._peer_went_away = False
        #: After an offender's GOAWAY: when the lingering connection is closed (0: not).
        self._linger_until = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        connections = self.doors.connections
        cap = connections.max_open
        if cap and len(connections.open) + len(self.doors.h2_open) >= cap:
            # Over the descriptor budget (``edge.fdlimit``), as for HTTP/1.1: closed at once.
            connections.resources.refuse("fd_reserve")
            cast(asyncio.Transport, transport).abort()
            return
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else "-"
        self._counted = True
        self.doors.h2_open.add(self)
        self.pipeline.metrics.connections.inc()
        self.h2.initiate_connection()
        self.write_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._counted:
            self._counted = False
            self.doors.h2_open.discard(self)
            self.pipeline.metrics.connections.dec()
            self.doors.h2_stats.connection_closed(self.streams_seen)
        for stream in list(self.streams.values()):
            self._end_stream(stream, cancel=True)

    def pause_writing(self) -> None:
        self.write_paused = True
        # A client that does not read gets no more work done for it (PING acks, responses).
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume_reading()
        for stream in list(self.streams.values()):
            stream.wake()

    def eof_received(self) -> bool | None:
        return None  # close: a half-closed HTTP/2 client cannot send the frames it must

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # lingering after GOAWAY: dropped unread
        verdict = self.meter.feed(data, self.loop.time())
        if verdict is not None:
            self.goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, verdict)
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            code = exc.error_code if isinstance(exc.error_code, int) else 1
            reason = type(exc).__name__
            self.goaway(h2.errors.ErrorCodes(code), _snake(reason), str(exc)[:200])
            return
        if self.h2.state_machine.state is _CLOSED and not self._closing:
            terminated = next(
                (e for e in events if isinstance(e, h2.events.ConnectionTerminated)), None
            )
            if terminated is not None and terminated.error_code == h2.errors.ErrorCodes.NO_ERROR:
                # The client's graceful GOAWAY: it opens no more streams, the ones it opened
                # (in this very read too) still get their responses (RFC 9113 6.8), then the
                # connection closes.  h2 closes its state machine on any GOAWAY received; it
                # is reopened for sending before the requests of this read are answered.
                self.h2.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
                self._peer_went_away = True
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._request(event)
            elif isinstance(event, h2.events.DataReceived):
                self._data(event)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream.body is not None:
                    stream.body.finish()
            elif isinstance(event, h2.events.StreamReset):
                stream = self.streams.get(event.stream_id)
                self.doors.h2_stats.bump(self.doors.h2_stats.resets, "client")
                if stream is not None:
                    self._end_stream(stream, cancel=True)
            elif isinstance(event, h2.events.WindowUpdated):
                if event.stream_id == 0:
                    self.flush_all()
                else:
                    stream = self.streams.get(event.stream_id)
                    if stream is not None:
                        self.flush_stream(stream)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                    self.flush_all()
            elif isinstance(event, h2.events.TrailersReceived):
                stream = self.streams.get(event.stream_id)  # dropped, never merged
                if stream is not None and stream.body is not None:
                    stream.body.finish()
            elif isinstance(event, h2.events.ConnectionTerminated):
                if not self._peer_went_away or not self.streams:
                    self._close()
                    return
                self._goaway_last = max(self._goaway_last, self.h2.highest_inbound_stream_id)
        self.write_out()

    # -- requests -----------------------------------------------------------------------------

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self._goaway_last >= 0 and stream_id > self._goaway_last:
            self._refuse(stream_id)
            return
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        self.streams_seen += 1
        self._had_request = True
        stats = self.doors.h2_stats
        stats.streams += 1
        stats.bump(stats.requests, self.tls_version)
        ended = event.stream_ended is not None
        try:
            request = self._build_request(list(event.headers or ()), ended)
        except RequestRejected as rejected:
            self._reject(stream, rejected)
            return
        stream.request = request
        lookup = None
        if ended and (request.method == "GET" or request.method == "HEAD"):
            # A cache hit never leaves this callback, as on HTTP/1.1: the hit stage's bytes
            # (it accounts the hit), read back into frames.  Asked as the HTTP/1.1 request it
            # is equivalent to; whatever it looked up goes on to the slow path.
            as_http11 = request._replace(http_version="1.1")
            access_log = self.pipeline.access_log
            access_log.protocol = self.protocol
            try:
                wire = self.pipeline.fast_response(as_http11)
            finally:
                access_log.protocol = H1_FIELDS
            if wire is not None:
                stream.write_complete(wire, close=False)
                return
            lookup = self.pipeline.take_pending(as_http11)
        elif request.body.kind is not BodyKind.NONE:
            stream.body = H2Body(self, stream_id)
        stream.task = self.loop.create_task(self._run(stream, lookup))

    def _build_request(self, fields: list[tuple[bytes, bytes]], ended: bool) -> ProxyRequest:
        limits = self.limits
        method = b""
        path = b""
        authority: bytes | None = None
        headers: Headers = []
        cookies: list[bytes] = []
        size = 0
        hosts = 0
        supplied: bytes | None = None
        request_id_header = self.pipeline.state.request_id_header
        for name, value in fields:
            size += len(name) + len(value) + 4
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue
            if name == b"cookie":
                cookies.append(value)
                continue
            if name == b"host":
                hosts += 1
            elif name == request_id_header and supplied is None:
                supplied = value
            headers.append((name, value))
        if cookies:  # RFC 9113 8.2.3: one field again for HTTP/1.1
            headers.append((b"cookie", b"; ".join(cookies)))
        if len(headers) > limits.max_headers:
            raise RequestRejected(431, "too_many_headers")
        if size > limits.max_header_bytes:
            raise RequestRejected(431, "headers_too_large")
        if len(path) > limits.max_url:
            raise RequestRejected(414, "url_too_long")
        if method == b"CONNECT":
            raise RequestRejected(405, "connect_not_supported")
        if hosts > 1:
            raise RequestRejected(400, "duplicate_host")
        host_value = authority
        if host_value is None:
            host_value = next((v for n, v in headers if n == b"host"), None)
        decided = decide_target(path, host_value, "1.1")
        host = decided.host
        headers = screen_headers(headers, host)
        framing = NO_BODY
        if not ended:
            framing = check_request_framing(headers, "1.1", limits)
            if framing.kind is BodyKind.NONE:
                framing = BodyFraming(BodyKind.CHUNKED)
            if method in (b"GET", b"HEAD"):
                raise RequestRejected(400, "body_not_allowed")
        request_supplied = supplied is not None and valid_request_id(supplied)
        return ProxyRequest(
            method=method.decode("ascii", "replace"),
            target=decided.target,
            path=decided.path,
            host=host,
            http_version="2",
            headers=headers,
            keep_alive=True,
            client_ip=self.client_ip,
            body=framing,
            request_id=supplied if request_supplied and supplied is not None else new_request_id(),
            received_at=self.pipeline.clock(),
            request_id_supplied=request_supplied,
            scheme=self.scheme,
            protocol=self.protocol,
        )

    def _reject(self, stream: H2Stream, rejected: RequestRejected) -> None:
        """Answer a request the edge refuses to forward on its own stream."""
        state = self.pipeline.state
        self.pipeline.metrics.errors.labels(str(rejected.status), rejected.reason).inc()
        log.info(
            "request_rejected",
            status=rejected.status,
            reason=rejected.reason,
            client=self.client_ip,
            protocol="h2",
        )
        stream.write_complete(
            error_response(
                rejected.status,
                state.pop,
                rejected.reason,
                new_request_id(),
                request_id_header=state.request_id_header,
                extra=_NOT_CACHED,
            ),
            close=False,
        )
        self._maybe_release(stream)

    async def _run(self, stream: H2Stream, lookup: Lookup | None) -> None:
        request = stream.request
        assert request is not None
        try:
            await self.pipeline.handle(request, stream.body, stream, lookup)
        except asyncio.CancelledError:
            pass  # reset by the client, or the connection went away
        except Exception as exc:  # a bug: answer 500 if we still can, never hang the stream
            log.error(
                "request_failed",
                error=repr(exc),
                request_id=request.request_id.decode("ascii", "replace"),
                protocol="h2",
            )
            if not stream.response_started and not stream.closed:
                state = self.pipeline.state
                stream.write_complete(
                    error_response(
                        500,
                        state.pop,
                        "internal_error",
                        request.request_id,
                        request_id_header=state.request_id_header,
                        extra=_NOT_CACHED,
                    ),
                    close=False,
                )
            else:
                stream.abort()
        finally:
            stream.task = None
            if not stream.closed and not stream.finished:
                # The stage returned without ending its response: never leave it hanging.
                self.reset_stream(stream, h2.errors.ErrorCodes.INTERNAL_ERROR, "unfinished")
            self._maybe_release(stream)

    def _data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        length = event.flow_controlled_length
        if stream is None or stream.body is None or stream.body.complete:
            # Nobody reads it (answered already, reset): give the window back at once.
            if length:
                self._acknowledge(event.stream_id, length)
            return
        body = stream.body
        body.feed(event.data, length)
        if body.received > self.limits.max_body:
            body.fail(RequestRejected(413, "body_too_large"))
            self._acknowledge(event.stream_id, body.unconsumed())
        if event.stream_ended is not None:
            body.finish()

    def consumed(self, stream_id: int, length: int) -> None:
        """The forward stage took ``length`` flow-controlled bytes of a request body."""
        if length:
            self._acknowledge(stream_id, length)
            self.write_out()

    def _acknowledge(self, stream_id: int, length: int) -> None:
        try:
            self.h2.acknowledge_received_data(length, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            # The stream is gone: the connection's window must still be given back.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.increment_flow_control_window(length)

    # -- responses ----------------------------------------------------------------------------

    def send_headers(self, stream: H2Stream, fields: Headers, end_stream: bool) -> None:
        try:
            self.h2.send_headers(stream.stream_id, fields, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            # Never left behind: a stream that cannot be answered is forgotten (its task,
            # if any, is cancelled), or the connection would wait for it forever.
            self._end_stream(stream, cancel=True)
            return
        if end_stream:
            self._maybe_release(stream)

    def flush_stream(self, stream: H2Stream) -> None:
        """Send what the stream has buffered, as far as the windows allow."""
        h2conn = self.h2
        sid = stream.stream_id
        while not stream.closed:
            try:
                window = min(h2conn.local_flow_control_window(sid), h2conn.max_outbound_frame_size)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self._end_stream(stream, cancel=True)
                break
            if window <= 0 and stream.waiting and stream.out_size:
                if not stream.stalled_since:
                    stream.stalled_since = self.loop.time()
                break
            piece = stream.take(window)
            if piece is None:
                break
            chunk, end = piece
            try:
                h2conn.send_data(sid, chunk, end_stream=end)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self._end_stream(stream, cancel=True)
                break
            stream.stalled_since = 0.0
            if end:
                break
        stream.wake()
        if stream.ended:
            self._maybe_release(stream)

    def flush_all(self) -> None:
        for stream in list(self.streams.values()):
            if stream.waiting:
                self.flush_stream(stream)
        self.write_out()

    def write_out(self) -> None:
        data = self.h2.data_to_send()
        if data and self._transport is not None:
            self._transport.write(data)

    def reset_stream(self, stream: H2Stream, code: h2.errors.ErrorCodes, reason: str) -> None:
        if not stream.closed:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.h2.reset_stream(stream.stream_id, code)
            self.doors.h2_stats.bump(self.doors.h2_stats.resets, reason)
        self._end_stream(stream, cancel=True)
        self.write_out()

    def _refuse(self, stream_id: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        self.doors.h2_stats.bump(self.doors.h2_stats.resets, "refused_draining")

    def _maybe_release(self, stream: H2Stream) -> None:
        """Forget a stream once its response is out and its task is done."""
        if stream.task is not None:
            return
        if not (stream.ended or stream.closed):
            return
        body = stream.body
        if body is not None and not body.complete:
            # Answered before the body ended: stop the upload (RFC 9113 8.1) and give back
            # what it already took of the connection's window.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(stream.stream_id, h2.errors.ErrorCodes.NO_ERROR)
            body.fail(RequestRejected(400, "answered_early"))
        self._end_stream(stream, cancel=False)

    def _end_stream(self, stream: H2Stream, *, cancel: bool) -> None:
        if self.streams.pop(stream.stream_id, None) is None and stream.closed:
            return
        body = stream.body
        if body is not None:
            body.fail(RequestRejected(400, "client_disconnected"))
            left = body.unconsumed()
            if left and self._transport is not None:
                self._acknowledge(stream.stream_id, left)
        stream.close()
        task = stream.task
        if cancel and task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        if not self.streams:
            self._idle_since = self.loop.time()
            if self._goaway_last >= 0:
                self._close()

    # -- connection control -------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.streams)

    def goaway(self, code: h2.errors.ErrorCodes, reason: str, detail: str = "") -> None:
        """End the connection now with GOAWAY ``code`` (an offender, a protocol error)."""
        if self._closing:
            return
        self._closing = True
        self.doors.h2_stats.bump(self.doors.h2_stats.goaways, reason)
        log.warning(
            "h2_goaway", reason=reason, code=code.name, client=self.client_ip, detail=detail
        )
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(error_code=code)
        self.write_out()
        for stream in list(self.streams.values()):
            self._end_stream(stream, cancel=True)
        transport = self._transport
        if transport is not None:
            # Lingering close (nginx's): closing with the offender's bytes unread would send
            # a TCP reset that can destroy the GOAWAY before the client reads it.  What it
            # sends now is read and dropped; the sweep closes the connection after LINGER.
            if transport.can_write_eof():
                transport.write_eof()
            self._linger_until = self.loop.time() + LINGER

    def begin_drain(self) -> None:
        """Graceful GOAWAY: streams so far finish, later ones are refused, then close."""
        if self._goaway_last >= 0 or self._closing:
            return
        self._goaway_last = self.h2.highest_inbound_stream_id
        self.doors.h2_stats.bump(self.doors.h2_stats.goaways, "draining")
        # Written by hand: once h2 sends GOAWAY its state machine refuses to send anything
        # else, and the streams in flight still have responses to finish.
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._goaway_last
        frame.error_code = h2.errors.ErrorCodes.NO_ERROR
        self.write_out()
        if self._transport is not None:
            self._transport.write(frame.serialize())
        if not self.streams:
            self._close()

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
        self.write_out()
        if self._transport is not None:
            self._transport.close()

    def close_now(self) -> None:
        for stream in list(self.streams.values()):
            self._end_stream(stream, cancel=True)
        if self._transport is not None:
            self._transport.abort()

    def check_deadline(self, now: float) -> None:
        """The sweep: stream deadlines and stalls, the connection's idle/first-request time."""
        if self._linger_until:
            if now >= self._linger_until and self._transport is not None:
                self._transport.close()
            return
        timeouts = self.pipeline.state.config.edge.timeouts
        stall = self.settings.stall_timeout
        for stream in list(self.streams.values()):
            if stream.deadline and now >= stream.deadline:
                stream.deadline = 0.0
                task = stream.task
                if task is not None and not task.done():
                    stream.expired = True
                    task.cancel()
            if stream.stalled_since and now - stream.stalled_since >= stall:
                log.info("h2_stream_stalled", client=self.client_ip, stream=stream.stream_id)
                self.reset_stream(stream, h2.errors.ErrorCodes.CANCEL, "zero_window_stall")
        if self.streams or self._closing:
            return
        limit = timeouts.client_idle if self._had_request else timeouts.client_header
        if now - self._idle_since >= limit:
            self._close()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i:
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


__all__ = ["H2Body", "H2Connection", "H2Stats", "H2Stream", "parse_wire"]
