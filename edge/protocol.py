"""The client-facing data plane: one ``asyncio.Protocol`` per connection, parsing with httptools.

Shaped like uvicorn's httptools server.  Per connection: one parser (``edge.h1parse``),
requests answered strictly in order (pipelining), at most one request being proxied at a time,
its response written through the connection's ``edge.h1response.ResponseWriter``.  A common
head that arrives whole is answered from its bytes (``edge.h1fast``), and a bodiless GET/HEAD
that the cache can answer never leaves ``message_complete`` (``Pipeline.fast_response``: one
write, no task, no timer).  Everything else runs ``Pipeline.handle`` in a task.

When a request with a body starts upstream: at its first body byte (or at its end), not at
its head -- so a request whose framing breaks at the first chunk never reaches the origin.
With ``Expect: 100-continue`` the edge answers ``100 Continue`` and starts at the head.  (The
pipeline then reads a small body whole before it takes an upstream connection:
``pipeline.buffer_request_body``.)

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
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from edge.accesslog import protocol_fields
from edge.connlimit import UNCOUNTED, ClientConnections, ClientConnectionStats
from edge.fdlimit import FdBudget, ResourceStats, Throttle, fd_exhausted
from edge.h1fast import HeadShortcuts
from edge.h1parse import (
    Exchange,
    MessageParser,
    StreamedBody,
    remember_head,
    seen_before,
)
from edge.h1queue import PIPELINE_DEPTH, RequestQueue
from edge.h1response import ResponseWriter
from edge.http1 import RequestRejected, expects_continue
from edge.pipeline import Pipeline
from meridian.log import get_logger

if TYPE_CHECKING:
    from edge.streams.service import StreamService
    from edge.websocket import Upgraded

log = get_logger("edge")

SWEEP_INTERVAL = 0.25
#: Sweeps between two probes for descriptor exhaustion (once a second).
FD_PROBE_EVERY = 4
_DEADLINE_NONE = 0
_DEADLINE_HEADER = 1
_DEADLINE_BODY = 2
_DEADLINE_IDLE = 3


def _no_other_fronts() -> int:
    return 0


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
        #: Answers from whole request heads, past llhttp (shared by the connections).
        self.shortcuts = HeadShortcuts(pipeline)

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

    def accept(self, transport: asyncio.BaseTransport) -> tuple[str, int] | None:
        """A new HTTP/1.1 connection's client address and its key for ``clients.release``,
        or None when it is refused (the descriptor budget, ``edge.connection_limits``)."""
        if not self.admit():
            return None
        peer = transport.get_extra_info("peername")
        client_ip = peer[0] if peer else "-"
        key = self.admit_client(client_ip)
        return None if key is None else (client_ip, key)

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
    """HTTP/1.1 server side of one client connection: reads requests (``MessageParser``, or
    ``HeadShortcuts`` for a whole common head), answers them in order (``RequestQueue``,
    writing through its ``ResponseWriter``), keeps the connection's deadlines, and hands an
    upgraded connection to a tunnel or a stream session."""

    def __init__(self, connections: Connections, tls_version: str | None = None) -> None:
        self._connections = connections
        #: How the client reached the edge (X-Forwarded-Proto) and the access lines' fields.
        self.scheme = b"https" if tls_version else b"http"
        self.protocol = protocol_fields("h1", tls_version) if tls_version else None
        self._pipeline = pipeline = connections.pipeline
        self._loop = connections.loop
        self._shortcuts = connections.shortcuts
        self._transport: asyncio.Transport | None = None
        #: In ``Connections.open`` and the connections gauge (until connection_lost).
        self._counted = False
        #: Its client network in ``Connections.clients`` (``edge.connection_limits``).
        self._client_key = UNCOUNTED
        self.client_ip = "-"
        self._reader = MessageParser(self, pipeline)
        self._response = ResponseWriter(connections, connections.loop)
        self._requests = RequestQueue(self, pipeline, connections.loop, self._response)
        self._tunnel: Upgraded | None = None
        self._pending_upgrade: Exchange | None = None
        self._read_pauses = 0
        # The connection's one deadline (header read, body read, keep-alive idle).
        self._deadline = 0.0
        self._deadline_kind = _DEADLINE_NONE

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        admitted = self._connections.accept(transport)
        if admitted is None:
            cast(asyncio.Transport, transport).abort()  # never counted as open
            return
        self.client_ip, self._client_key = admitted
        # uvloop's transport is not an asyncio.Transport subclass.
        self._transport = self._response.transport = cast(asyncio.Transport, transport)
        self._counted = True
        self._connections.open.add(self)
        self._pipeline.metrics.connections.inc()
        # The first request head must arrive within the header timeout (slowloris).
        self._set_deadline(_DEADLINE_HEADER)

    def connection_lost(self, exc: Exception | None) -> None:
        self._reader.close()  # no data comes after this: break its parser's cycle
        if not self._counted:
            return  # refused in connection_made
        self._counted = False
        self._connections.open.discard(self)
        self._connections.clients.release(self._client_key)
        self._pipeline.metrics.connections.dec()
        self._transport = self._response.transport = None
        for exchange in (self._reader.current, *self._requests):
            if exchange is not None and exchange.body is not None:
                exchange.body.fail(RequestRejected(400, "client_disconnected"))
        self._requests.release()
        if self._tunnel is not None:
            self._tunnel.client_lost()
        self._response.wake_drain()

    def pause_writing(self) -> None:
        self._response.writing_paused(True)
        if self._tunnel is not None:
            self._tunnel.pause_upstream_reading()

    def resume_writing(self) -> None:
        if self._tunnel is not None:
            self._tunnel.resume_upstream_reading()
        self._response.writing_paused(False)

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.from_client(data)
            return
        reader = self._reader
        at_boundary = not reader.reading_head and reader.current is None
        if at_boundary and self._requests.active is None and not self._connections.draining:
            answer = self._shortcuts.answer(data, self.client_ip, self.scheme, self.protocol)
            if answer is not None:
                if isinstance(answer, bytes):
                    if self._transport is not None:
                        self._transport.write(answer)
                    self._set_deadline(_DEADLINE_IDLE)
                else:  # read, not answered: the cache's lookup goes with it
                    self._deadline_kind = _DEADLINE_NONE
                    exchange = Exchange(answer, None, False)
                    exchange.lookup = self._pipeline.take_pending(answer)
                    self.schedule(exchange)
                return
        try:
            rest = reader.feed(data, at_boundary)
        except RequestRejected as rejected:
            self._reject(rejected)
            return
        if rest is not None:
            self._upgraded(rest)

    def eof_received(self) -> bool | None:
        # A half-closed client still gets its responses (returning True keeps the socket open).
        return self.busy

    # -- MessageSink: what the parser hands over ----------------------------------------------

    def message_begun(self) -> None:
        self._set_deadline(_DEADLINE_HEADER)

    def head_received(self, exchange: Exchange) -> None:
        if exchange.body is None:
            self._set_deadline(_DEADLINE_NONE)
            return
        self._set_deadline(_DEADLINE_BODY)
        if expects_continue(exchange.request.headers):
            self.schedule(exchange)

    def body_received(self) -> None:
        self._set_deadline(_DEADLINE_BODY)

    def message_complete(self, exchange: Exchange) -> None:
        if exchange.websocket:
            self._pending_upgrade = exchange  # httptools raises HttpParserUpgrade next
            return
        if exchange.scheduled:
            return
        request = exchange.request
        if (
            request.keep_alive
            and (request.method == "GET" or request.method == "HEAD")
            and self._requests.active is None
            and not self._connections.draining
        ):
            prebuilt = self._pipeline.fast_response(request)
            if prebuilt is not None and self._transport is not None:
                self._transport.write(prebuilt)
                self._set_deadline(_DEADLINE_IDLE)
                return
            exchange.lookup = self._pipeline.take_pending(request)
        self.schedule(exchange)

    def schedule(self, exchange: Exchange) -> None:
        streams = self._connections.streams
        if streams is not None and (
            self._tunnel is not None or streams.takes_events(exchange.request)
        ):
            self._to_event_stream(exchange, streams)
            return
        self._requests.push(exchange)

    def pause_reading(self) -> None:
        """Stop reading (a full pipeline, a body not taken fast enough); counted."""
        self._read_pauses += 1
        if self._read_pauses == 1 and self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._read_pauses = max(0, self._read_pauses - 1)
        if self._read_pauses == 0 and self._transport is not None:
            self._transport.resume_reading()

    # -- QueueHost ----------------------------------------------------------------------------

    def request_done(self, exchange: Exchange) -> None:
        body = exchange.body
        # The request must have been read to its end for the connection to be reused: a
        # body that failed (timed out, too large) or is still arriving leaves the parser
        # mid-message, and nothing else would ever end this connection.
        body_unread = self._reader.current is exchange or (
            body is not None and (not body.complete or body.error is not None)
        )
        if self._transport is None:
            return
        response = self._response
        if response.must_close or not response.keep_alive or body_unread:
            self.close_now()
        elif self._requests.start_next():
            pass
        elif self._connections.draining:
            self.close_now()
        elif not self._reader.reading_head and self._reader.current is None:
            self._set_deadline(_DEADLINE_IDLE)

    # -- connection control -------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._requests.busy or self._reader.current is not None

    def stop_keep_alive(self) -> None:
        """Draining: an idle connection closes now, a busy one after its current response."""
        if not self.busy:
            self.close_now()

    def close_now(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def check_deadline(self, now: float) -> None:
        """The listener's sweep: the request's total deadline, then the connection's."""
        response = self._response
        if response.request_deadline and now >= response.request_deadline:
            response.request_deadline = 0.0
            if self._requests.running:
                response.request_expired = True
                self._requests.cancel()
        kind = self._deadline_kind
        current = self._reader.current
        if kind == _DEADLINE_NONE:
            if current is not None and not self._requests.busy:
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
            if self._requests.active is None:
                self._reject(RequestRejected(408, "client_header_timeout"))
            else:
                response.must_close = True
        elif kind == _DEADLINE_BODY and current is not None and current.body is not None:
            rejected = RequestRejected(408, "client_body_timeout")
            current.body.fail(rejected)
            if not current.scheduled:
                self._reject(rejected)
            else:
                response.must_close = True  # the message never ends: close after the response

    def _set_deadline(self, kind: int) -> None:
        self._deadline_kind = kind
        if kind != _DEADLINE_NONE:
            self._deadline = self._loop.time() + self._pipeline.state.deadlines[kind]

    def _reject(self, rejected: RequestRejected) -> None:
        """Answer a request the edge refuses to forward, then close (framing is now unknown)."""
        answer = self._pipeline.refusal(rejected, self.client_ip, "h1")
        self._reader.take_rejected()
        self._deadline_kind = _DEADLINE_NONE
        current = self._reader.current
        if current is not None and current.body is not None:
            current.body.fail(rejected)
        if self._transport is None:
            return
        if self._requests.active is None:
            self._transport.write(answer)
            self._transport.close()
        else:
            # A response is in progress: let it finish, then close; the bad request is dropped.
            self._response.must_close = True
            self._requests.drop_waiting()
            self.pause_reading()

    # -- upgrades -----------------------------------------------------------------------------

    def _to_event_stream(self, exchange: Exchange, streams: StreamService) -> None:
        """A GET on the stream path: the connection becomes a Server-Sent Events stream
        (``edge.streams.sse``); what a client pipelines after it is dropped."""
        exchange.scheduled = True
        if self._tunnel is not None or self._transport is None:
            return
        if self._requests.busy or exchange.body is not None:
            self._reject(RequestRejected(400, "event_stream_while_busy"))
            return
        self._deadline_kind = _DEADLINE_NONE
        self._tunnel = streams.open_events(self._connections, self._transport, exchange.request)

    def _upgraded(self, rest: bytes) -> None:
        exchange = self._reader.current
        self._reader.current = None
        if exchange is None:  # message_complete already ran
            exchange = self._pending_upgrade
        self._pending_upgrade = None
        if exchange is None or not exchange.websocket:
            # Not a WebSocket: answered normally, then the connection closes (keep_alive=False).
            return
        if self._requests.busy:
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


__all__ = [
    "FD_PROBE_EVERY",
    "PIPELINE_DEPTH",
    "SWEEP_INTERVAL",
    "Connections",
    "EdgeConnection",
    "Exchange",
    "StreamedBody",
    "remember_head",
    "seen_before",
]
