"""WebSocket upgrades (``/ws``): handshake through the failover walk, then bytes both ways.

After the upstream's ``101`` the edge does not decode messages: it copies bytes in both
directions with flow control.  It does track frame boundaries in the upstream -> client
direction (a few integer operations per frame), so that it can insert a close frame of its own
at a frame boundary: 1011 when the upstream connection dies, 1001 when the edge drains or the
tunnel has been idle for ``edge.timeouts.client_idle``.  If the upstream dies mid-frame, a close
frame cannot be inserted and the client connection is simply closed.

Pings are end to end (the origin's pings and the client's pongs pass through); the edge does not
originate its own.  A non-101 answer to the handshake is reported as a 502.
"""

from __future__ import annotations

import asyncio
import random
import struct
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from edge.admin import EdgeMetrics
from edge.exchange import HealthSource, ProxyRequest, forwarding_context
from edge.http1 import NO_BODY, Headers, error_response, serialize_head
from edge.request_target import forward_headers
from edge.router import normalise_host
from edge.state import EdgeState
from edge.upstream import Attempt, UpstreamPool, live_regions, next_attempt
from meridian.log import get_logger

if TYPE_CHECKING:
    from edge.stages.limit import Limiter

log = get_logger("edge.websocket")

CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
_OPCODE_CLOSE = 0x8


class UpstreamServices(Protocol):
    """What reaching an origin takes from the worker's pipeline (``edge.pipeline.Pipeline``):
    the config in force, the health view, the walk's randomness and the connection pool."""

    @property
    def state(self) -> EdgeState: ...

    @property
    def health(self) -> HealthSource: ...

    @property
    def rng(self) -> random.Random: ...

    @property
    def upstream(self) -> UpstreamPool: ...


class TunnelServices(UpstreamServices, Protocol):
    """What a tunnel reads from the worker's pipeline."""

    @property
    def metrics(self) -> EdgeMetrics: ...

    @property
    def limiter(self) -> Limiter: ...


class Upgraded(Protocol):
    """A connection the HTTP/1.1 front end handed over after an upgrade: a ``Tunnel``, or an
    edge-terminated stream session (``edge.streams.session``)."""

    def from_client(self, data: bytes) -> None: ...

    def client_lost(self) -> None: ...

    def pause_upstream_reading(self) -> None:
        """The client's socket is full (its transport paused writing)."""

    def resume_upstream_reading(self) -> None: ...

    def close_going_away(self) -> None:
        """The edge drains (SIGTERM)."""

    def check_idle(self, now: float) -> None:
        """The listener's sweep, every ``SWEEP_INTERVAL``."""


class TunnelHost(Protocol):
    """The front end's listener as a tunnel uses it (``edge.protocol.Connections``): the
    loop, the set of open tunnels it drains and sweeps, and the pipeline."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def tunnels(self) -> set[Upgraded]: ...

    @property
    def pipeline(self) -> TunnelServices: ...


def close_frame(code: int, reason: bytes = b"") -> bytes:
    """An unmasked (server to client) close frame."""
    payload = struct.pack("!H", code) + reason[:123]
    return bytes((0x80 | _OPCODE_CLOSE, len(payload))) + payload


class FrameBoundaries:
    """Follows frame boundaries in a byte stream without buffering payloads."""

    __slots__ = ("_header", "_remaining", "close_seen")

    def __init__(self) -> None:
        self._header = bytearray()
        self._remaining = 0
        self.close_seen = False

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and not self._header

    def feed(self, data: bytes) -> None:
        index, end = 0, len(data)
        while index < end:
            if self._remaining:
                step = min(self._remaining, end - index)
                self._remaining -= step
                index += step
                continue
            self._header.append(data[index])
            index += 1
            header = self._header
            if len(header) < 2:
                continue
            size7 = header[1] & 0x7F
            need = 2 + (2 if size7 == 126 else 8 if size7 == 127 else 0)
            need += 4 if header[1] & 0x80 else 0
            if len(header) < need:
                continue
            if size7 == 126:
                length = int.from_bytes(header[2:4], "big")
            elif size7 == 127:
                length = int.from_bytes(header[2:10], "big")
            else:
                length = size7
            if header[0] & 0x0F == _OPCODE_CLOSE:
                self.close_seen = True
            self._remaining = length
            self._header = bytearray()


class _UpstreamSide(asyncio.Protocol):
    """The upstream connection of a tunnel: parses the handshake answer, then forwards."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[tuple[int, Headers, bytes]] = (
            asyncio.get_running_loop().create_future()
        )
        self.headers: Headers = []
        self.transport: asyncio.Transport | None = None
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status != 101 and not self.head.done():
            self.head.set_result((status, self.headers, b""))

    def data_received(self, data: bytes) -> None:
        if self.open:
            self.tunnel.from_upstream(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if not self.head.done():
                rest = data[int(upgrade.args[0]) :]
                self.head.set_result((self.parser.get_status_code(), self.headers, rest))
        except httptools.HttpParserError as exc:
            if not self.head.done():
                self.head.set_exception(ConnectionError(f"bad handshake answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionError("upstream closed during handshake"))
        self.tunnel.upstream_lost()

    def pause_writing(self) -> None:
        self.tunnel.pause_client_reading()

    def resume_writing(self) -> None:
        self.tunnel.resume_client_reading()


class Tunnel:
    """One proxied WebSocket: the client connection, its upstream connection, and the state."""

    def __init__(
        self,
        connections: TunnelHost,
        client: asyncio.Protocol,
        client_transport: asyncio.Transport,
        request: ProxyRequest,
        early_data: bytes,
    ) -> None:
        self.connections = connections
        self.client = client
        self.client_transport = client_transport
        self.request = request
        self.pending = bytearray(early_data)
        self.upstream: _UpstreamSide | None = None
        self.boundaries = FrameBoundaries()
        self.established = False
        self.closed = False
        self.last_activity = connections.loop.time()
        self.attempt: Attempt | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.connections.tunnels.add(self)
        self.connections.pipeline.metrics.websockets.inc()
        self.connections.loop.create_task(self._handshake())

    async def _handshake(self) -> None:
        pipeline = self.connections.pipeline
        state = pipeline.state
        request = self.request
        target = state.router.match(normalise_host(request.host), request.path)
        if target is None:
            self._fail(404, "no_route")
            return
        refused = pipeline.limiter.answer(state, target.route.name, request, close=True)
        if refused is not None:  # over a rate limit (edge.stages.limit)
            if not self.closed:
                self.client_transport.write(refused)
            self._close()
            return
        health = pipeline.health.snapshot
        regions = live_regions(target.regions, health)
        if not regions:
            self._fail(503, "no_healthy_region")
            return
        headers = forward_headers(
            request.headers, forwarding_context(request, state), keep_upgrade=True
        )
        lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
        timeouts = state.config.edge.timeouts
        tried: list[Attempt] = []
        loop = self.connections.loop
        while (attempt := next_attempt(regions, health, tried, {}, pipeline.rng)) is not None:
            tried.append(attempt)
            # The upstream client's view of the backend: host, port, and for https:// its
            # verified TLS context (the tunnel's connection is its own, never pooled).
            pool = pipeline.upstream.client.pool(attempt.backend)
            backend, tls = pool.backend, pool.tls
            try:
                async with asyncio.timeout(timeouts.connect):
                    _, side = await loop.create_connection(
                        lambda: _UpstreamSide(self),
                        backend.host,
                        backend.port,
                        ssl=tls,
                        server_hostname=backend.host if tls is not None else None,
                    )
            except (OSError, TimeoutError) as exc:
                pipeline.health.report(attempt.backend, False)
                log.warning("websocket_connect_failed", backend=attempt.backend, error=repr(exc))
                continue
            if self.closed:  # the client left while we connected
                assert side.transport is not None
                side.transport.close()
                return
            self.upstream = side
            self.attempt = attempt
            assert side.transport is not None
            side.transport.write(b"GET %s HTTP/1.1\r\n" % (backend.prefix + request.target) + lines)
            try:
                async with asyncio.timeout(timeouts.first_byte):
                    status, answer_headers, rest = await side.head
            except (ConnectionError, TimeoutError) as exc:
                pipeline.health.report(attempt.backend, False)
                self._fail(502, "websocket_handshake_failed", close_upstream=True)
                log.warning("websocket_handshake_failed", backend=attempt.backend, error=repr(exc))
                return
            pipeline.health.report(attempt.backend, True)
            if status != 101:
                self._fail(502, f"websocket_upgrade_refused_{status}", close_upstream=True)
                return
            self._established(attempt, answer_headers, rest)
            return
        self._fail(502, "upstream_connect")

    def _established(self, attempt: Attempt, headers: Headers, rest: bytes) -> None:
        state = self.connections.pipeline.state
        side = self.upstream
        assert side is not None and side.transport is not None
        headers = [h for h in headers if h[0] not in (b"x-meridian-region", b"x-cache")]
        headers.append((b"x-meridian-region", attempt.region.encode()))
        headers.append((b"x-cache", b"BYPASS"))
        headers.append((state.request_id_header, self.request.request_id))
        self.client_transport.write(
            serialize_head(101, b"Switching Protocols", headers, NO_BODY, keep_alive=True)
        )
        self.established = True
        side.open = True
        log.info(
            "websocket_open",
            region=attempt.region,
            backend=attempt.backend,
            request_id=self.request.request_id.decode("ascii", "replace"),
        )
        if rest:
            self.from_upstream(rest)
        if self.pending:
            side.transport.write(bytes(self.pending))
            self.pending.clear()

    def _fail(self, status: int, reason: str, *, close_upstream: bool = False) -> None:
        state = self.connections.pipeline.state
        self.connections.pipeline.metrics.errors.labels(str(status), reason).inc()
        if not self.closed:
            self.client_transport.write(
                error_response(
                    status,
                    state.pop,
                    reason,
                    self.request.request_id,
                    request_id_header=state.request_id_header,
                    retry_after=5 if status == 503 else None,
                )
            )
        if close_upstream and self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.connections.tunnels.discard(self)
        self.connections.pipeline.metrics.websockets.dec()
        self.client_transport.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    # -- data ---------------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        self.last_activity = self.connections.loop.time()
        side = self.upstream
        if self.established and side is not None and side.transport is not None:
            side.transport.write(data)
        else:
            self.pending += data

    def from_upstream(self, data: bytes) -> None:
        self.last_activity = self.connections.loop.time()
        self.boundaries.feed(data)
        self.client_transport.write(data)

    def pause_client_reading(self) -> None:
        self.client_transport.pause_reading()

    def resume_client_reading(self) -> None:
        self.client_transport.resume_reading()

    def pause_upstream_reading(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_upstream_reading(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    # -- endings ------------------------------------------------------------------------------

    def upstream_lost(self) -> None:
        if self.established and not self.closed:
            self._send_close(CLOSE_INTERNAL_ERROR, b"upstream closed")
            log.info(
                "websocket_upstream_lost",
                region=self.attempt.region if self.attempt else "-",
                request_id=self.request.request_id.decode("ascii", "replace"),
            )
        if self.established:
            self._close()

    def client_lost(self) -> None:
        self._close()

    def close_going_away(self) -> None:
        if self.established:
            self._send_close(CLOSE_GOING_AWAY, b"edge shutting down")
        self._close()

    def check_idle(self, now: float) -> None:
        idle = self.connections.pipeline.state.config.edge.timeouts.client_idle
        if self.established and now - self.last_activity > idle:
            self._send_close(CLOSE_GOING_AWAY, b"idle timeout")
            self._close()

    def _send_close(self, code: int, reason: bytes) -> None:
        # Only at a frame boundary, and only if the upstream has not closed the session itself.
        if self.boundaries.at_boundary and not self.boundaries.close_seen:
            self.client_transport.write(close_frame(code, reason))
