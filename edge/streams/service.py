"""The stream service of one worker: the hub, its upstream subscriptions, the sessions.

``edge.protocol`` asks ``handles(path)`` when a WebSocket upgrade completes and hands the
connection to ``open`` (other upgrades stay 1:1 tunnels, ``edge.websocket``).  The hub is
built from the config snapshot in force and follows reloads on its sweep (once a second):
channel policies, limits and history lengths change, open streams and their upstream
subscriptions stay.  Removing ``edge.streams`` from the config closes no open session; new
upgrades on the path are then tunnelled.

With ``--workers N`` each worker has its own service, so a POP holds up to N upstream
subscriptions per channel (one per worker with subscribers to it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from edge.admin import EdgeMetrics
from edge.exchange import ProxyRequest, RequestBody, ResponseSink
from edge.http1 import error_response, header_value
from edge.streams.frames import accept_key, negotiate_deflate
from edge.streams.hub import Hub
from edge.streams.metrics import StreamMetrics
from edge.streams.queue import WriteBatch
from edge.streams.session import Client, StreamSession
from edge.streams.snapshot import fetch_snapshot
from edge.streams.sse import EventSession, event_params
from edge.streams.stats import StreamStats
from edge.streams.upstream import UpstreamLinks
from edge.upstream import HealthView
from edge.websocket import TunnelHost, UpstreamServices
from meridian.config import EdgeStreams

#: Seconds between two hub sweeps (lingering channels, reloads).
SWEEP_EVERY = 1.0


class StreamServices(UpstreamServices, Protocol):
    """What the service reads from the worker's pipeline (``edge.pipeline.Pipeline``)."""

    @property
    def metrics(self) -> EdgeMetrics: ...

    async def handle(
        self, request: ProxyRequest, body: RequestBody | None, sink: ResponseSink
    ) -> None: ...


class StreamService:
    """Edge-terminated streams for one worker."""

    def __init__(
        self,
        services: StreamServices,
        loop: asyncio.AbstractEventLoop,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.services = services
        self.loop = loop
        self.stats = StreamStats(clock)
        #: One write per client per loop iteration, whatever it was sent in it.
        self.batch = WriteBatch(loop.call_soon)
        self.hub: Hub | None = None
        self.links = UpstreamLinks(services, lambda: self, self.stats, loop)
        self.sessions: set[Client] = set()
        #: Open sessions per client address (``max_connections_per_ip``).
        self.per_ip: dict[str, int] = {}
        #: (ping interval, ping timeout), read by every session's idle check.
        self.keep_alive = (20.0, 20.0)
        self._config: EdgeStreams | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: Snapshot fetches in flight (held here: the loop keeps only weak references).
        self._tasks: set[asyncio.Task[None]] = set()
        services.metrics.registry.register(
            StreamMetrics(
                self.stats,
                channels=lambda: len(self.hub.channels) if self.hub is not None else 0,
                connected=self.links.connected,
                made=self.links.made,
                moves=self.links.moves,
            )
        )
        self._follow_config()

    @property
    def request_id_header(self) -> bytes:
        return self.services.state.request_id_header

    # -- the hub's callbacks (``edge.streams.upstream.Publisher``) ----------------------------

    def publish(self, name: str, payload: bytes, seq: int, ts: float) -> bool:
        return self.hub is not None and self.hub.publish(name, payload, seq, ts)

    def last_seq(self, name: str) -> int | None:
        channel = self.hub.channels.get(name) if self.hub is not None else None
        return channel.last_seq if channel is not None else None

    def fail(self, name: str, reason: str) -> None:
        if self.hub is not None:
            self.hub.fail(name, reason)

    def on_health(self, snapshot: HealthView) -> None:
        """The health monitor published a snapshot (its subscription): the upstream links
        time regions coming up from here."""
        self.links.on_health(snapshot)

    # -- config -------------------------------------------------------------------------------

    def _follow_config(self) -> None:
        streams = self.services.state.config.edge.streams
        if streams is self._config:
            return
        self._config = streams
        if streams is None:
            return
        self.keep_alive = (streams.ping_interval, streams.ping_timeout)
        if self.hub is None:
            self.hub = Hub(
                streams,
                clock=self.loop.time,
                stats=self.stats,
                on_open=self.links.open,
                on_close=self.links.close,
            )
        else:
            self.hub.configure(streams)

    def _sweep(self) -> None:
        self._timer = self.loop.call_later(SWEEP_EVERY, self._sweep)
        self._follow_config()
        if self.hub is not None:
            self.hub.sweep()
        self.links.move_off_unhealthy()
        self.links.move_back_nearer()

    # -- sessions -----------------------------------------------------------------------------

    def handles(self, path: str) -> bool:
        streams = self.services.state.config.edge.streams
        return streams is not None and path == streams.path

    def _ready(self) -> EdgeStreams:
        """The config in force, the hub following it, its sweep running."""
        self._follow_config()
        if self._timer is None:
            self._timer = self.loop.call_later(SWEEP_EVERY, self._sweep)
        streams = self._config
        assert streams is not None  # handles() said so under the same snapshot
        return streams

    def takes_events(self, request: ProxyRequest) -> bool:
        """A plain GET on the stream path: a Server-Sent Events client (``edge.streams.sse``)."""
        return request.method == "GET" and self.handles(request.path)

    def open_events(
        self, host: TunnelHost, transport: asyncio.Transport, request: ProxyRequest
    ) -> EventSession | None:
        """Takes over a connection whose GET asked for the stream path's events; None when it
        was refused (answered with an HTTP error and closed)."""
        streams = self._ready()
        params = event_params(request)
        if isinstance(params, str):
            self._refuse(transport, request, 400, params)
            return None
        if request.http_version != "1.1":
            self._refuse(transport, request, 505, "event_stream_needs_http_1_1")
            return None
        held = self.per_ip.get(request.client_ip, 0)
        if streams.max_connections_per_ip and held >= streams.max_connections_per_ip:
            self._refuse(transport, request, 429, "stream_connections_per_ip")
            return None
        session = EventSession(self, host, transport, request, streams.send_queue)
        session.start(params)
        return session

    def open(
        self, host: TunnelHost, transport: asyncio.Transport, request: ProxyRequest, rest: bytes
    ) -> StreamSession | None:
        """Takes over an upgraded connection on the stream path; None when it was refused
        (answered with an HTTP error and closed)."""
        streams = self._ready()
        version = header_value(request.headers, b"sec-websocket-version")
        key = header_value(request.headers, b"sec-websocket-key")
        accept = accept_key(key) if key is not None else None
        ip = request.client_ip
        if version is None or version.strip() != b"13":
            self._refuse(transport, request, 426, "websocket_version", b"13")
            return None
        if accept is None:
            self._refuse(transport, request, 400, "websocket_key")
            return None
        held = self.per_ip.get(ip, 0)
        if streams.max_connections_per_ip and held >= streams.max_connections_per_ip:
            self._refuse(transport, request, 429, "stream_connections_per_ip")
            return None
        extensions = negotiate_deflate(header_value(request.headers, b"sec-websocket-extensions"))
        session = StreamSession(
            self, host, transport, request, streams.send_queue, streams.max_message, extensions
        )
        session.start(accept, rest)
        return session

    def _refuse(
        self,
        transport: asyncio.Transport,
        request: ProxyRequest,
        status: int,
        reason: str,
        version: bytes | None = None,
    ) -> None:
        state = self.services.state
        self.services.metrics.errors.labels(str(status), reason).inc()
        extra = [(b"sec-websocket-version", version)] if version is not None else None
        transport.write(
            error_response(
                status,
                state.pop,
                reason,
                request.request_id,
                request_id_header=state.request_id_header,
                keep_alive=False,
                extra=extra,
            )
        )
        transport.close()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def opened(self, session: Client) -> None:
        self.sessions.add(session)
        ip = session.request.client_ip
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self.stats.clients = len(self.sessions)

    def closed(self, session: Client) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        ip = session.request.client_ip
        held = self.per_ip.get(ip, 1) - 1
        if held > 0:
            self.per_ip[ip] = held
        else:
            self.per_ip.pop(ip, None)
        self.stats.clients = len(self.sessions)

    async def snapshot(self, request: ProxyRequest, channel: str) -> tuple[int, bytes] | str:
        streams = self._config
        if streams is None:
            return "streams_disabled"
        path = streams.snapshot_path.replace("{channel}", channel)
        return await fetch_snapshot(
            self.services,
            path,
            host=request.host,
            client_ip=request.client_ip,
            received_at=self.loop.time(),
        )

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.links.aclose()
