"""The HTTP/2 front end: each stream an ``Exchange`` through the same stages as HTTP/1.1.

``H2Connection`` is a thin ``asyncio.Protocol`` around the edge's own sans-I/O connection core
(``edge.h2core.H2Core``, RFC 9113): bytes in -> events -> streams; what the core has to send
(every frame a read produced: SETTINGS ACKs, PING replies, WINDOW_UPDATEs, the responses of
the streams answered at once) is written in one ``transport.write`` per read.
``edge.h2request.H2Requests`` turns each request stream into a ``ProxyRequest`` for the
pipeline, with an ``edge.h2streams.H2Stream`` as its ``ResponseSink``, so no stage knows
HTTP/2; ``edge.h2streams.StreamTable`` is the send side (HEADERS encoded without indexing,
``edge.hpack_literal``, memoised per prebuilt head; DATA as the peer's windows allow).  This
module keeps the connection: the frame meter, event dispatch, GOAWAY, drain and deadlines.

Hostile by default:

* SETTINGS: at most ``edge.http2.max_concurrent_streams`` streams (128), a header list of at
  most ``edge.limits.max_header_bytes`` advertised; the HPACK decoder refuses a decoded list
  beyond twice that (an HPACK bomb: GOAWAY ENHANCE_YOUR_CALM), a list beyond the limit but
  within the refusal is answered 431 on its stream; frame size ``edge.http2.max_frame_size``.
* ``edge.h2meter.FrameMeter``, fed by the core as it reads frames: rapid reset and
  control-frame floods end the connection with GOAWAY ENHANCE_YOUR_CALM, as do the core's
  own caps on a header block (CONTINUATION flood) and on a decoded list (HPACK bomb).
* Anything the core calls a connection error (stream-id abuse, a frame on an idle stream,
  a broken header block, window overflow) ends it with GOAWAY and that error code; a
  malformed request (bad pseudo-headers, fields that could smuggle into HTTP/1.1) is a stream
  error: RST_STREAM PROTOCOL_ERROR, never forwarded.
* Flow control: a stream's response bytes wait for the peer's window; the stage writing them
  waits (``drain``) once more than ``h2streams.STREAM_HIGH_WATER`` bytes wait, so memory per
  stream is bounded; a stream stuck on a zero window for ``edge.http2.stall_timeout`` is reset
  (and its work cancelled); the request body is acknowledged (WINDOW_UPDATE) only as the
  forward stage consumes it, so a client can never have more than one window in flight.
* The connection's deadlines (first request within ``client_header``, idle within
  ``client_idle``, each stream's total) are checked by the front end's sweep, as for
  HTTP/1.1: no timer per stream.
* Draining (SIGTERM) sends GOAWAY with the last stream accepted; streams in flight finish,
  later ones are refused (REFUSED_STREAM, safe to retry), then the connection closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol, cast

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from edge.accesslog import protocol_fields
from edge.connlimit import UNCOUNTED
from edge.h2core import (
    DataReceived,
    Event,
    GoAwayReceived,
    H2Core,
    RequestReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from edge.h2meter import FrameMeter
from edge.h2request import H2Requests
from edge.h2streams import PrebuiltResponses, StreamTable
from edge.h2wire import ErrorCode, H2ConnectionError
from edge.pipeline import Pipeline
from edge.protocol import Connections
from meridian.log import get_logger

log = get_logger("edge")

#: Seconds a connection ended by GOAWAY is still read (and its bytes dropped) before closing.
LINGER: Final = 1.0
#: The HPACK decoder refuses decoded header lists beyond this many times the advertised limit.
HPACK_REFUSE_FACTOR: Final = 2
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


class H2Host(Protocol):
    """What an HTTP/2 connection needs from the front ends of its worker (``edge.front``)."""

    pipeline: Pipeline
    loop: asyncio.AbstractEventLoop
    connections: Connections
    h2_open: set[H2Connection]
    h2_stats: H2Stats
    h2_responses: PrebuiltResponses


# --------------------------------------------------------------------------------------------
# The connection


class H2Connection(asyncio.Protocol):
    """The server side of one HTTP/2 connection (h2c or ALPN h2)."""

    def __init__(self, doors: H2Host, *, tls_version: str = "none") -> None:
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
        refuse = max(self.limits.max_header_bytes * HPACK_REFUSE_FACTOR, 8192)
        self.core = H2Core(
            max_concurrent_streams=self.settings.max_concurrent_streams,
            max_header_list_size=self.limits.max_header_bytes,
            max_frame_size=self.settings.max_frame_size,
            max_header_block=refuse,
            meter=FrameMeter(
                max_resets=self.settings.max_resets_per_second,
                max_control=self.settings.max_control_frames_per_second,
            ),
        )
        self._transport: asyncio.Transport | None = None
        self.table = StreamTable(self.core, self.loop, self, doors.h2_responses)
        #: The request side (made when the connection is, with the client's address).
        self.requests: H2Requests | None = None
        self.write_paused = False
        self._reading_paused = False
        #: Inside ``data_received``: what is sent is written once, at its end.
        self._in_read = False
        self._closing = False
        #: The last stream accepted once GOAWAY was sent (-1: not sent).
        self._goaway_last = -1
        self.streams_seen = 0
        self._idle_since = self.loop.time()
        self._had_request = False
        self._counted = False
        self._client_key = UNCOUNTED  # its network in Connections.clients
        #: The client sent GOAWAY.
        self._peer_went_away = False
        #: After an offender's GOAWAY: when the lingering connection is closed (0: not).
        self._linger_until = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        connections = self.doors.connections
        if not connections.admit():
            # Over the descriptor budget (``edge.fdlimit``), as for HTTP/1.1: closed at once.
            cast(asyncio.Transport, transport).abort()
            return
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else "-"
        client_key = connections.admit_client(self.client_ip, len(self.doors.h2_open))
        if client_key is None:  # over edge.connection_limits (edge.connlimit)
            cast(asyncio.Transport, transport).abort()
            return
        self._client_key = client_key
        self._transport = cast(asyncio.Transport, transport)
        self._counted = True
        self.doors.h2_open.add(self)
        self.pipeline.metrics.connections.inc()
        self.requests = H2Requests(
            self.pipeline,
            self.table,
            client_ip=self.client_ip,
            scheme=self.scheme,
            protocol=self.protocol,
            limits=self.limits,
        )
        self.write_out()  # our SETTINGS

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._counted:
            self._counted = False
            self.doors.connections.clients.release(self._client_key)
            self.doors.h2_open.discard(self)
            self.pipeline.metrics.connections.dec()
            self.doors.h2_stats.connection_closed(self.streams_seen)
        self.table.end_all()

    def pause_writing(self) -> None:
        self.write_paused = True
        # A client that does not read gets no more work done for it (PING acks, responses).
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume_reading()
        self.table.wake_all()

    def eof_received(self) -> bool | None:
        return None  # close: a half-closed HTTP/2 client cannot send the frames it must

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # lingering after GOAWAY: dropped unread
        try:
            events = self.core.receive(data, self.loop.time())
        except H2ConnectionError as exc:
            self.goaway(exc.code, exc.reason, exc.detail[:200])
            return
        self._in_read = True
        try:
            self._dispatch(events)
        finally:
            self._in_read = False
        self._flush()

    def _dispatch(self, events: list[Event]) -> None:
        table, requests = self.table, self.requests
        assert requests is not None
        for event in events:
            if self._closing:
                return  # closed by an earlier event (the client's GOAWAY, its last stream)
            if isinstance(event, RequestReceived):
                if self._goaway_last >= 0 and event.stream_id > self._goaway_last:
                    table.refuse(event.stream_id)
                    continue
                self.streams_seen += 1
                self._had_request = True
                # Streams answered at once never enter the table: idle from now.
                self._idle_since = self.loop.time()
                stats = self.doors.h2_stats
                stats.streams += 1
                stats.bump(stats.requests, self.tls_version)
                requests.open(event)
            elif isinstance(event, DataReceived):
                requests.data(event)
            elif isinstance(event, WindowUpdated):
                if event.stream_id == 0:
                    table.flush_all()
                else:
                    stream = table.streams.get(event.stream_id)
                    if stream is not None:
                        table.flush_stream(stream)
            elif isinstance(event, StreamReset):
                stream = table.streams.get(event.stream_id)
                self.count_reset("client" if event.by_peer else event.reason)
                if stream is not None:
                    table.end_stream(stream, cancel=True)
            elif isinstance(event, TrailersReceived):
                stream = table.streams.get(event.stream_id)  # dropped, never merged
                if stream is not None and stream.body is not None:
                    stream.body.finish()
            elif isinstance(event, GoAwayReceived):
                if event.code != ErrorCode.NO_ERROR or not table.streams:
                    self._close()
                    return
                # The client's graceful GOAWAY: it opens no more streams, the ones it opened
                # still get their responses (RFC 9113 6.8), then the connection closes.
                self._peer_went_away = True
                self._goaway_last = max(self._goaway_last, self.core.highest_stream)

    # -- connection control -------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.table.streams)

    # -- StreamOwner (the send side's view of the connection) -------------------------------

    @property
    def alive(self) -> bool:
        return self._transport is not None

    def write_out(self) -> None:
        if self._in_read:
            return  # written once, when the read's events are done
        if self._closing:
            # GOAWAY went out and the transport is closing: what the streams still say (the
            # resets of their cancelled tasks) is dropped, as a closed transport refuses it.
            self.core.out.clear()
            return
        self._flush()

    def _flush(self) -> None:
        data = self.core.take_output()
        if data and self._transport is not None:
            self._transport.write(data)

    def streams_gone(self) -> None:
        self._idle_since = self.loop.time()
        if self._goaway_last >= 0:
            self._close()

    def count_reset(self, reason: str) -> None:
        self.doors.h2_stats.bump(self.doors.h2_stats.resets, reason)

    def goaway(self, code: ErrorCode, reason: str, detail: str = "") -> None:
        """End the connection now with GOAWAY ``code`` (an offender, a protocol error)."""
        if self._closing:
            return
        self._closing = True
        self.doors.h2_stats.bump(self.doors.h2_stats.goaways, reason)
        log.warning(
            "h2_goaway", reason=reason, code=code.name, client=self.client_ip, detail=detail
        )
        self.core.goaway(code)
        self._in_read = False
        self._flush()
        self.table.end_all()
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
        self._goaway_last = self.core.highest_stream
        self.doors.h2_stats.bump(self.doors.h2_stats.goaways, "draining")
        # The streams in flight still have responses to finish after it.
        self.core.goaway(ErrorCode.NO_ERROR, self._goaway_last)
        self.write_out()
        if not self.table.streams:
            self._close()

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.core.goaway(ErrorCode.NO_ERROR)
        self._in_read = False
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def close_now(self) -> None:
        self.table.end_all()
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
        for stream in list(self.table.streams.values()):
            if stream.deadline and now >= stream.deadline:
                stream.deadline = 0.0
                task = stream.task
                if task is not None and not task.done():
                    stream.expired = True
                    task.cancel()
            if stream.stalled_since and now - stream.stalled_since >= stall:
                log.info("h2_stream_stalled", client=self.client_ip, stream=stream.stream_id)
                self.table.reset_stream(stream, ErrorCode.CANCEL, "zero_window_stall")
        if self.table.streams or self._closing:
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


__all__ = ["H2Connection", "H2Host", "H2Stats"]
