"""The HTTP/1.1 front end's side of a response (``edge.exchange.ResponseSink``), for one client
connection: framing (Content-Length, chunked, until close), keep-alive, write flow control and
the request's total deadline.

The pipeline writes the response of the request being handled through it; the connection
(``edge.protocol.EdgeConnection``) points it at each exchange it starts (``begin``) and reads
back whether the connection may carry another request (``keep_alive``, ``must_close``).
Cache hits answered in the protocol callback never come here: they are one ``transport.write``.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from edge.h1parse import Exchange
from edge.http1 import BodyFraming, BodyKind, Headers, encode_chunk, serialize_head


class Draining(Protocol):
    """The listener, as far as a response cares: whether it is draining (no keep-alive)."""

    @property
    def draining(self) -> bool: ...


class ResponseWriter:
    """The response sink of one connection (module docstring)."""

    __slots__ = (
        "_connections",
        "_drain_waiter",
        "_framing",
        "_loop",
        "_pending_head",
        "active",
        "bytes_sent",
        "keep_alive",
        "must_close",
        "request_deadline",
        "request_expired",
        "transport",
        "write_paused",
    )

    def __init__(self, connections: Draining, loop: asyncio.AbstractEventLoop) -> None:
        self._connections = connections
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        #: The exchange whose response this is (None between requests).
        self.active: Exchange | None = None
        self._framing = BodyFraming(BodyKind.NONE)
        self.keep_alive = True
        #: The connection closes once this response is out (framing now unknown, a body
        #: never read to its end, a response delimited by the close).
        self.must_close = False
        self._pending_head = b""
        self.bytes_sent = 0
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        #: The active request's total deadline (loop time; 0: none), and whether it passed.
        self.request_deadline = 0.0
        self.request_expired = False

    def begin(self, exchange: Exchange) -> None:
        """The response of ``exchange`` is next."""
        self.active = exchange
        self.keep_alive = exchange.request.keep_alive
        self.bytes_sent = 0
        self.request_deadline = 0.0
        self.request_expired = False

    @property
    def response_started(self) -> bool:
        return self.active is not None and self.active.response_started

    def start_response(
        self,
        status: int,
        reason: bytes,
        headers: Headers,
        framing: BodyFraming,
        head_length: int | None,
    ) -> None:
        if self.active is not None:
            self.active.response_started = True
        keep_alive = self.keep_alive and not self._connections.draining
        if framing.kind is BodyKind.UNTIL_CLOSE or not keep_alive:
            self.keep_alive = False
        self._framing = framing
        # Held back to go out with the first body bytes: one write per small response.
        self._pending_head = serialize_head(
            status,
            reason,
            headers,
            framing,
            keep_alive=self.keep_alive,
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
        self.write(data)

    def end_response(self) -> None:
        tail = b"0\r\n\r\n" if self._framing.kind is BodyKind.CHUNKED else b""
        if self._framing.kind is BodyKind.UNTIL_CLOSE:
            self.must_close = True
        if self._pending_head or tail:
            self.write(self._pending_head + tail)
            self._pending_head = b""

    def write_complete(self, data: bytes, *, close: bool) -> None:
        if self.active is not None:
            self.active.response_started = True
        transport = self.transport  # ``write``, inlined: every cached answer comes this way
        if transport is not None:
            transport.write(data)
            self.bytes_sent += len(data)
        if close:
            self.must_close = True

    def abort(self) -> None:
        """End the connection without completing the response (the client sees truncation)."""
        self.must_close = True
        if self.transport is not None:
            self.transport.close()

    def expire_after(self, seconds: float) -> None:
        """Cancel the active request's task once ``seconds`` have passed (checked by the
        listener's sweep, so up to ``SWEEP_INTERVAL`` late: no timer per request)."""
        self.request_deadline = self._loop.time() + seconds

    @property
    def deadline_expired(self) -> bool:
        return self.request_expired

    async def drain(self) -> None:
        if not self.write_paused or self.transport is None:
            return
        self._drain_waiter = self._loop.create_future()
        await self._drain_waiter

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            self.bytes_sent += len(data)

    def writing_paused(self, paused: bool) -> None:
        """The transport's flow control (``pause_writing``/``resume_writing``)."""
        self.write_paused = paused
        if not paused:
            self.wake_drain()

    def wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._drain_waiter = None


__all__ = ["Draining", "ResponseWriter"]
