"""Which front end a new client connection gets: HTTP/1.1 (``edge.protocol``) or HTTP/2
(``edge.h2front``), on the plain listener and on the TLS one.

* TLS: the handshake is done when ``connection_made`` runs, so the ALPN protocol decides at
  once (``h2`` -> HTTP/2, anything else -> HTTP/1.1) and the transport is handed to that
  protocol (``transport.set_protocol``): nothing of this module stays on the data path.  The
  handshake is counted here (full or resumed, by version and ALPN); a handshake that never
  completes is counted failed when its protocol object is dropped unused ("timeout" when the
  handshake timeout ended it, else "error": the loop's SSL layer does not tell the cause).
* Plain: with ``edge.http2.cleartext`` (h2c with prior knowledge), the first bytes decide:
  the HTTP/2 connection preface -> HTTP/2, anything else -> HTTP/1.1, after which the
  connection is the HTTP/1.1 protocol's alone (one ``set_protocol`` per connection, no cost
  per request).  A connection that sends nothing is closed after ``client_header``.  Without
  ``cleartext`` the plain listener makes HTTP/1.1 connections directly.

``FrontDoors`` also owns the HTTP/2 connections of the worker: their deadline sweep, their
graceful GOAWAY when the worker drains, and their counters.
"""

from __future__ import annotations

import asyncio
from typing import cast

from prometheus_client import CollectorRegistry

from edge.h2front import H2Connection, H2Stats
from edge.h2meter import PREFACE
from edge.h2streams import PrebuiltResponses
from edge.protocol import SWEEP_INTERVAL, Connections
from edge.tls import TlsContexts, TlsStats


class FrontDoors:
    """The front ends of one worker process."""

    def __init__(
        self,
        connections: Connections,
        registry: CollectorRegistry,
        *,
        tls: TlsContexts | None = None,
    ) -> None:
        self.connections = connections
        self.pipeline = connections.pipeline
        self.loop = connections.loop
        self.tls = tls
        self.tls_stats = tls.stats if tls is not None else TlsStats()
        registry.register(self.tls_stats)
        self.h2_stats = H2Stats()
        registry.register(self.h2_stats)
        self.h2_open: set[H2Connection] = set()
        #: Plain connections whose first bytes have not arrived yet, and since when.
        self.waiting: dict[FrontDoor, float] = {}
        #: Prebuilt responses read back as HPACK blocks and bodies, memoised for every
        #: HTTP/2 connection of the worker (stateless encoding: ``edge.hpack_literal``).
        self.h2_responses = PrebuiltResponses()
        self.draining = False
        self._sweeper: asyncio.Task[None] | None = None
        # Connections waiting for their first bytes hold descriptors too: without this, idle
        # plain connections were never counted, and at the descriptor limit the admin
        # listener and the health checks found none left.
        connections.other_fronts = self.open_connections

    def open_connections(self) -> int:
        """Client connections held here: undecided plain ones and HTTP/2 ones."""
        return len(self.waiting) + len(self.h2_open)

    def plain_factory(self) -> asyncio.Protocol:
        http2 = self.pipeline.state.config.edge.http2
        if http2.enabled and http2.cleartext:
            return FrontDoor(self, tls=False)
        return self.connections.factory()

    def tls_factory(self) -> asyncio.Protocol:
        return FrontDoor(self, tls=True)

    def start(self) -> None:
        self._sweeper = self.loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = self.loop.time()
            for conn in list(self.h2_open):
                conn.check_deadline(now)
            limit = self.pipeline.state.config.edge.timeouts.client_header
            for door, since in list(self.waiting.items()):
                if now - since >= limit:
                    door.close()

    @property
    def busy(self) -> int:
        return sum(1 for conn in self.h2_open if conn.busy)

    def begin_drain(self) -> None:
        self.draining = True
        for door in list(self.waiting):
            door.close()
        for conn in list(self.h2_open):
            conn.begin_drain()

    async def wait_idle(self, within: float) -> bool:
        deadline = self.loop.time() + within
        while self.busy and self.loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return not self.busy

    def close_all(self) -> None:
        for conn in list(self.h2_open):
            conn.close_now()
        for door in list(self.waiting):
            door.close()
        if self._sweeper is not None:
            self._sweeper.cancel()


class FrontDoor(asyncio.Protocol):
    """A connection until it is known which protocol it speaks."""

    __slots__ = ("_accepted", "_buffer", "_doors", "_handed", "_tls", "_transport")

    def __init__(self, doors: FrontDoors, *, tls: bool) -> None:
        self._doors = doors
        self._tls = tls
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._handed = False
        #: Loop time of the accept (a TLS connection's object is made before its handshake).
        self._accepted = doors.loop.time() if tls else 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        doors = self._doors
        if not self._tls:
            if not doors.connections.admit():  # over the descriptor budget: closed at once
                self._handed = True
                self._transport.abort()
                return
            doors.waiting[self] = doors.loop.time()
            return
        ssl_object = transport.get_extra_info("ssl_object")
        version = (ssl_object.version() or "-") if ssl_object is not None else "-"
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        resumed = bool(ssl_object is not None and ssl_object.session_reused)
        doors.tls_stats.completed(version, alpn or "http/1.1", resumed)
        if alpn == "h2" and not doors.draining:
            self._hand_over(H2Connection(doors, tls_version=version), b"")
        else:
            self._hand_over(doors.connections.factory(tls_version=version), b"")

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        size = min(len(buffer), len(PREFACE))
        if buffer[:size] == PREFACE[:size]:
            if size < len(PREFACE):
                self._buffer = buffer  # at most 23 bytes
                return
            protocol: asyncio.Protocol = H2Connection(self._doors)
        else:
            protocol = self._doors.connections.factory()
        self._doors.waiting.pop(self, None)
        self._hand_over(protocol, buffer)

    def _hand_over(self, protocol: asyncio.Protocol, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        self._handed = True
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data and not transport.is_closing():
            protocol.data_received(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._doors.waiting.pop(self, None)
        self._transport = None

    def close(self) -> None:
        self._doors.waiting.pop(self, None)
        if self._transport is not None:
            self._transport.close()

    def __del__(self) -> None:
        # A TLS connection whose handshake never completed: its protocol is dropped unused.
        # The event loop's SSL layer keeps the cause to itself (it logs it at debug level
        # only), so what is known is whether the handshake timeout ended it.
        if self._tls and self._transport is None and not self._handed:
            doors = self._doors
            timeout = doors.pipeline.state.config.edge.timeouts.client_header
            timed_out = doors.loop.time() - self._accepted >= timeout - SWEEP_INTERVAL
            doors.tls_stats.fail("timeout" if timed_out else "error")


__all__ = ["FrontDoor", "FrontDoors"]
