"""The edge's HTTP/1.1 client to origins: asyncio protocols around ``upstream_wire``.

``OriginClient.send`` sends one request on a pooled connection and returns an
``OriginResponse`` once its head is in (on a kept-alive connection, with the body in memory,
written and awaited inline: no coroutine besides ``send``'s own); its body is read with
``content.iter_any()`` (or taken whole when it came with the head) and ``release()`` gives
the connection back.

* **Pool**: per backend, idle connections most recent first (warm ones are reused, cold ones
  age out): at most ``max_idle`` kept, each closed after ``idle_timeout`` unused or
  ``max_requests`` requests.  How many are open per backend is bounded by the requests in
  flight (``UpstreamPool``'s slots).  An idle connection that hears anything (the origin
  closing it, stray bytes) leaves the pool at once.
* **Timeouts**: connect; first byte (from the end of the request); idle (between body reads,
  not counted while the edge itself holds reading because its client is slow).  The request's
  total deadline is the pipeline's (it cancels the request's task; a cancelled exchange closes
  its connection).
* **Backpressure**: a response body is buffered up to ``HIGH_WATER`` bytes, then the upstream
  transport stops reading until the client side has taken it; a streamed request body waits
  for the upstream transport's writes to drain before it reads more from the client.
* **Failures**: before the head, ``UpstreamError`` (``UpstreamFailure`` once mapped by
  ``UpstreamPool``'s ``failure``, which ``send`` applies itself; "connect" when no connection
  could be made, a certificate that does not verify included: nothing was sent, so even a
  POST may go elsewhere); after it,
  ``UpstreamBodyError`` from the body iterator.  A connection that saw anything wrong is
  closed, never pooled.
* **TLS** (``https://`` backends): a context per backend from ``meridian.origin_tls`` (verified,
  SNI and host name from the URL), the handshake inside the connect timeout, and the session
  of the last whole response offered to the next connection (resumption).
* **Deadlines** are checked by one sweep every ``SWEEP_EVERY`` over the open connections, not
  by a timer armed and cancelled per request: a timeout fires up to that much late.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final, cast

from edge.upstream_wire import (
    LAST_CHUNK,
    ResponseHead,
    ResponseReader,
    UpstreamBodyError,
    UpstreamProtocolError,
    chunk,
    encode_head,
)
from meridian.log import get_logger
from meridian.origin_tls import ResumingContext, verify_reason

log = get_logger("edge")

#: Response body bytes buffered per exchange before the upstream is told to wait.
HIGH_WATER: Final = 256 * 1024
#: How long a backend host name's addresses are used before it is resolved again.
DNS_TTL: Final = 60.0
#: How often deadlines are checked (and idle connections past their idle timeout closed): one
#: sweep over the open connections instead of a timer armed and cancelled per request; a
#: timeout fires up to this late.
SWEEP_EVERY: Final = 0.1


class UpstreamError(Exception):
    """A failure before any response head; ``kind`` is an ``edge.upstream.FailureKind`` value."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ClientLimits:
    connect: float
    first_byte: float
    #: Longest stall between two reads of a response body.
    read_idle: float
    idle_timeout: float
    max_idle: int
    max_requests: int


@dataclass(frozen=True, slots=True)
class Backend:
    """A backend URL split once: where to connect and what to put before request targets."""

    url: str
    host: str
    port: int
    #: ``host[:port]`` as a Host header value, for requests that carry none.
    authority: bytes
    #: A path the backend URL names (``http://o/prefix``): targets are sent under it.
    prefix: bytes
    #: ``https://``: TLS, verified against ``host`` (``meridian.origin_tls``).
    tls: bool = False
    #: ``host`` is an IP address (no lookup).
    literal: bool = False

    @classmethod
    def parse(cls, url: str) -> Backend:
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("http", "https"):
            raise ValueError(f"{url!r}: only http:// and https:// backends are supported")
        authority, slash, path = rest.partition("/")
        host, port = authority, 443 if scheme == "https" else 80
        if authority.startswith("["):
            end = authority.index("]")
            host = authority[1:end]
            if authority[end + 1 :].startswith(":"):
                port = int(authority[end + 2 :])
        elif ":" in authority:
            host, _, text = authority.rpartition(":")
            port = int(text)
        prefix = ("/" + path).rstrip("/") if slash else ""
        try:
            ipaddress.ip_address(host)
            literal = True
        except ValueError:
            literal = False
        return cls(
            url,
            host,
            port,
            authority.encode("ascii"),
            prefix.encode("ascii"),
            scheme == "https",
            literal,
        )


class ClientStats:
    """Counters per backend, read on scrape (plain numbers: no lock per request)."""

    __slots__ = (
        "connect_seconds",
        "created",
        "first_byte_seconds",
        "open",
        "resumed",
        "reused",
        "stale",
    )

    def __init__(self) -> None:
        self.created: dict[str, int] = {}
        #: TLS connections whose handshake resumed an earlier session.
        self.resumed: dict[str, int] = {}
        #: Kept-alive connections found closed by the origin as a request went out.
        self.stale: dict[str, int] = {}
        self.reused: dict[str, int] = {}
        self.open: dict[str, int] = {}
        #: Sum and count of connect and first-byte latencies, per backend.
        self.connect_seconds: dict[str, list[float]] = {}
        self.first_byte_seconds: dict[str, list[float]] = {}

    @staticmethod
    def add(table: dict[str, list[float]], backend: str, seconds: float) -> None:
        pair = table.get(backend)
        if pair is None:
            table[backend] = [seconds, 1.0]
        else:
            pair[0] += seconds
            pair[1] += 1.0


class Connection(asyncio.Protocol):
    """One upstream TCP connection; carries one exchange at a time."""

    __slots__ = (
        "_drain",
        "_waiter",
        "backend",
        "closed",
        "content",
        "deadline_kind",
        "due",
        "error",
        "last_read",
        "paused",
        "pool",
        "reader",
        "requests",
        "session_kept",
        "spare",
        "transport",
        "used_at",
        "write_paused",
    )

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool
        self.backend = pool.backend.url
        self.transport: asyncio.Transport | None = None
        self.reader: ResponseReader | None = None
        #: The last exchange's reader, whose parser the next may reuse (``ResponseReader.next``).
        self.spare: ResponseReader | None = None
        self.error: BaseException | None = None
        self.closed = False
        self.paused = False
        self.write_paused = False
        self.requests = 0
        #: Its TLS session was looked at (once per connection, ``BackendPool.keep_session``).
        self.session_kept = False
        self.used_at = 0.0
        self.last_read = 0.0
        self.deadline_kind = ""
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        #: When the current deadline passes (``loop.time()``; 0: none), checked by the sweep.
        self.due = 0.0
        #: Each response's ``content``: it reads whichever exchange is current, so one per
        #: connection serves them all (none is made per response).
        self.content = ResponseContent(self)

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader is None:
            # Nothing was asked: an idle connection hearing bytes is spoiled.
            self.close()
            return
        self.last_read = self.pool.loop.time()
        try:
            reader.feed(data)
        except (UpstreamProtocolError, UpstreamBodyError) as exc:
            self._fail(exc)
            return
        if reader.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        if reader.head is not None or reader.complete:
            waiter = self._waiter  # _wake, inline: once per response
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def eof_received(self) -> bool | None:
        reader = self.reader
        if reader is None:
            self.close()
            return None
        try:
            reader.feed_eof()
        except (UpstreamProtocolError, UpstreamBodyError) as exc:
            self._fail(exc)
            return None
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        self.pool.forget(self)
        reader = self.reader
        if reader is not None and not reader.complete and self.error is None:
            try:
                reader.feed_eof()
            except (UpstreamProtocolError, UpstreamBodyError) as error:
                self.error = error
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        self._wake()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- the exchange --------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.close()
        self._wake()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._cancel_timer()
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.abort()

    def _cancel_timer(self) -> None:
        self.due = 0.0

    def _arm(self, kind: str, delay: float) -> None:
        self.deadline_kind = kind
        self.due = self.pool.loop.time() + delay

    def check(self, now: float) -> None:
        """The sweep's look at this connection's deadline."""
        due = self.due
        if not due or self.closed or self.reader is None:
            return
        if self.deadline_kind == "read":
            # The stall counts from the last byte read; not while the edge itself holds
            # reading for a slow client (the origin is not stalling then).
            if self.paused or now < max(due, self.last_read + self.pool.limits.read_idle):
                return
        elif now < due:
            return
        self.due = 0.0
        self._fail(TimeoutError(f"{self.deadline_kind} timeout"))

    async def drained(self) -> None:
        """Until the socket's buffer has room again (``resume_writing``)."""
        if not self.write_paused or self.closed:
            return
        drain = self.pool.loop.create_future()
        self._drain = drain
        try:
            await drain
        finally:
            self._drain = None

    def _next_reader(self, head_request: bool) -> ResponseReader:
        """The reader of the exchange starting (the last one's parser reused when it can be)."""
        spare = self.spare
        self.reader = reader = (
            ResponseReader(head_request=head_request)
            if spare is None
            else spare.next(head_request=head_request)
        )
        self.requests += 1
        return reader

    def begin(self, head: bytes, body: bytes | None, head_request: bool) -> ResponseReader:
        """Write a request whose body is in memory and arm the first-byte deadline; the
        caller then waits (``_waiter``) until ``awaiting_head`` is False and calls
        ``head_in``.  Synchronous: the usual exchange costs no coroutine of its own."""
        transport = self.transport
        assert transport is not None
        reader = self._next_reader(head_request)
        transport.write(head + body if body else head)  # one write, one segment
        pool = self.pool
        now = self.last_read = pool.loop.time()
        if reader.head is None and self.error is None and not self.closed:
            self.deadline_kind = "first byte"
            self.due = now + pool.limits.first_byte
        return reader

    def head_in(self) -> ResponseHead:
        """After the wait for the head: the head, its read deadline armed; or, when none came
        (an error, a timeout, the connection closed), the connection closed and
        ``UpstreamError`` raised."""
        reader = self.reader
        assert reader is not None
        error = self.error
        head = reader.head
        if head is None:
            self.close()
            if isinstance(error, TimeoutError):
                raise UpstreamError("timeout", str(error))
            if isinstance(error, UpstreamProtocolError | UpstreamBodyError):
                raise UpstreamError("protocol", str(error))
            raise UpstreamError("reset", "connection closed before a response head")
        if reader.complete or error is not None:
            self.due = 0.0  # an error is raised by the body iterator
        else:
            self.deadline_kind = "read"
            self.due = self.pool.loop.time() + self.pool.limits.read_idle
        return head

    async def exchange(
        self,
        head: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        chunked: bool,
        head_request: bool,
    ) -> ResponseHead:
        """Write the request, wait for the response head.  Raises ``UpstreamError``."""
        if body is None or isinstance(body, bytes):
            reader = self.begin(head, body, head_request)
        else:
            transport = self.transport
            assert transport is not None
            reader = self._next_reader(head_request)
            transport.write(head)
            await _send_stream(self, body, chunked)
            self.last_read = self.pool.loop.time()
            if reader.head is None and self.error is None and not self.closed:
                self._arm("first byte", self.pool.limits.first_byte)
        loop = self.pool.loop
        while reader.head is None and self.error is None and not self.closed:
            # A future woken by ``_wake`` (inline: no coroutine per wait); one left
            # behind by a cancellation is done or never woken: harmless.
            waiter = self._waiter = loop.create_future()
            await waiter
        return self.head_in()

    def close_after_exchange(self) -> None:
        if self.reader is not None:
            self.reader.reusable = False

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The response body as it arrives; raises ``UpstreamBodyError`` or ``TimeoutError``."""
        reader = self.reader
        assert reader is not None
        while True:
            data = reader.take()
            if data:
                if self.paused and not self.closed and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                yield data
                continue
            if reader.complete:
                return
            error = self.error
            if error is not None or self.closed:
                if isinstance(error, TimeoutError):
                    raise error
                raise UpstreamBodyError(str(error or "connection closed mid-body"))
            waiter = self._waiter = self.pool.loop.create_future()
            await waiter

    def finish(self) -> None:
        """The exchange is over: back to the pool when whole and reusable, else closed."""
        reader = self.reader
        self.reader = None
        self.spare = reader
        self.due = 0.0  # _cancel_timer, inline
        if (
            reader is not None
            and reader.complete
            and not self.session_kept
            and self.pool.tls is not None
            and not self.closed
        ):
            self.pool.keep_session(self)
        if (
            reader is None
            or not reader.complete
            or not reader.reusable
            or self.closed
            or self.paused
            or self.error is not None
            or self.requests >= self.pool.limits.max_requests
        ):
            self.close()
            return
        pool = self.pool  # put_idle, inline: once per response
        self.used_at = pool.loop.time()
        idle = pool.idle
        idle.append(self)
        if len(idle) > pool.limits.max_idle:
            idle.popleft().close()  # the coldest goes


async def _send_stream(connection: Connection, body: AsyncIterable[bytes], chunked: bool) -> None:
    """Write a streamed request body on ``connection`` (its head is out), chunked or not,
    pausing while the socket's buffer is full; raises ``UpstreamError`` when it breaks."""
    transport = connection.transport
    assert transport is not None
    reader = connection.reader
    assert reader is not None
    try:
        async for data in body:
            if connection.closed or reader.head is not None:
                # The origin answered (or went away) before the body was all sent: stop
                # sending; the connection cannot carry another request.
                connection.close_after_exchange()
                return
            if data:
                transport.write(chunk(data) if chunked else data)
            if connection.write_paused:
                await connection.drained()
    except Exception as exc:  # the client's body broke (its ``error`` tells the walk)
        connection.close()
        raise UpstreamError("reset", f"request body: {type(exc).__name__}") from None
    if chunked and not connection.closed:
        transport.write(LAST_CHUNK)


class ResponseContent:
    """The body side of an ``OriginResponse`` (named as the stages have read bodies since
    aiohttp: ``is_eof``, ``read_nowait``, ``iter_any``)."""

    __slots__ = ("_connection",)

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def is_eof(self) -> bool:
        """The whole body is here already (it came with the head)."""
        reader = self._connection.reader
        return reader is not None and reader.complete

    def read_nowait(self, n: int = -1) -> bytes:
        reader = self._connection.reader
        return b"" if reader is None else reader.take()

    def iter_any(self) -> AsyncIterator[bytes]:
        return self._connection.iter_body()


class OriginResponse:
    """A response whose head is in; ``release()`` once done with it (always)."""

    __slots__ = ("_connection", "content", "content_length", "raw_headers", "reason", "status")

    def __init__(self, connection: Connection, head: ResponseHead) -> None:
        self._connection: Connection | None = connection
        self.status = head.status
        self.reason = head.reason.decode("latin-1")
        self.raw_headers = head.headers
        self.content_length = head.content_length
        self.content = connection.content

    def release(self) -> None:
        connection = self._connection
        if connection is not None:
            self._connection = None
            connection.finish()


class BackendPool:
    """The connections to one backend."""

    __slots__ = (
        "backend",
        "idle",
        "limits",
        "loop",
        "open",
        "resolved",
        "resolved_until",
        "stats",
        "tls",
    )

    def __init__(
        self,
        backend: Backend,
        limits: ClientLimits,
        loop: asyncio.AbstractEventLoop,
        stats: ClientStats,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.backend = backend
        self.tls = tls
        self.limits = limits
        self.loop = loop
        self.stats = stats
        #: Idle connections, most recently used last.
        self.idle: deque[Connection] = deque()
        self.open: set[Connection] = set()
        #: The host name's addresses while ``resolved_until`` (``loop.time()``) has not passed.
        self.resolved: list[str] = []
        self.resolved_until = 0.0

    def idle_connection(self) -> Connection | None:
        """The most recently used idle connection still fit for a request (synchronous: the
        usual case costs no coroutine), or None: ``connect``."""
        idle = self.idle
        now = self.loop.time()
        while idle:
            connection = idle.pop()
            transport = connection.transport
            if connection.closed or transport is None or transport.is_closing():
                continue
            if now - connection.used_at > self.limits.idle_timeout:
                connection.close()
                continue
            reused = self.stats.reused
            url = connection.backend
            reused[url] = reused.get(url, 0) + 1
            return connection
        return None

    async def _addresses(self) -> list[str]:
        """The backend host's addresses: an IP literal as it is; a name resolved at most once
        per ``DNS_TTL`` (a new connection must not cost a lookup in the resolver's thread)."""
        backend = self.backend
        if backend.literal:
            return [backend.host]
        now = self.loop.time()
        if self.resolved and now < self.resolved_until:
            return self.resolved
        infos = await self.loop.getaddrinfo(
            backend.host, backend.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise OSError(f"{backend.host}: no address")
        self.resolved, self.resolved_until = addresses, now + DNS_TTL
        return addresses

    async def connect(self) -> Connection:
        backend = self.backend
        started = time.monotonic()
        tls = self.tls
        try:
            # Resolving, connecting and the handshake: one bound for all.
            async with asyncio.timeout(self.limits.connect):
                addresses = await self._addresses()
                for index, address in enumerate(addresses):
                    connection = Connection(self)
                    try:
                        await self.loop.create_connection(
                            lambda made=connection: made,
                            address,
                            backend.port,
                            ssl=tls,
                            server_hostname=backend.host if tls is not None else None,
                            ssl_handshake_timeout=self.limits.connect if tls is not None else None,
                        )
                        break
                    except ssl.SSLError:
                        raise  # the certificate is the server's: another address would not help
                    except OSError:
                        if index == len(addresses) - 1:
                            raise
        except TimeoutError:
            raise UpstreamError("connect", f"connect timeout ({self.limits.connect:g}s)") from None
        except ssl.SSLError as exc:
            # A certificate that does not verify (wrong name, expired, unknown CA): the
            # backend's fault, and nothing was sent.
            raise UpstreamError("connect", verify_reason(exc)) from None
        except OSError as exc:
            raise UpstreamError("connect_os", f"{type(exc).__name__}: {exc}") from exc
        stats = self.stats
        url = backend.url
        stats.created[url] = stats.created.get(url, 0) + 1
        ClientStats.add(stats.connect_seconds, url, time.monotonic() - started)
        self.open.add(connection)
        stats.open[url] = len(self.open)
        return connection

    def keep_session(self, connection: Connection) -> None:
        """After a whole response on a TLS connection (a TLS 1.3 ticket has come by then): its
        session is offered by the backend's next handshake (``ResumingContext``)."""
        tls = self.tls
        connection.session_kept = True
        transport = connection.transport
        ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        if ssl_object.session_reused:
            stats = self.stats
            stats.resumed[self.backend.url] = stats.resumed.get(self.backend.url, 0) + 1
        session = ssl_object.session
        if session is not None and isinstance(tls, ResumingContext):
            tls.session = session

    def forget(self, connection: Connection) -> None:
        if connection in self.open:
            self.open.discard(connection)
            self.stats.open[self.backend.url] = len(self.open)
        with contextlib.suppress(ValueError):
            self.idle.remove(connection)

    def sweep(self, now: float) -> None:
        idle = self.idle
        while idle and now - idle[0].used_at > self.limits.idle_timeout:
            idle.popleft().close()
        for connection in list(self.open):
            if connection.due:
                connection.check(now)

    def close(self) -> None:
        for connection in list(self.open):
            connection.close()
        self.idle.clear()


class OriginClient:
    """The pools of one process, by backend URL."""

    def __init__(
        self,
        limits: ClientLimits,
        tls: Callable[[], ssl.SSLContext] | None = None,
        failure: Callable[[UpstreamError], Exception] | None = None,
    ) -> None:
        """``tls``: makes the context of an ``https://`` backend (called once per backend, when
        it is first used); ``failure``: what ``send`` raises instead of an ``UpstreamError``
        (``edge.upstream``'s mapping, so that its ``send`` needs no coroutine of its own)."""
        self.limits = limits
        self.failure = failure
        self.stats = ClientStats()
        self._tls_factory = tls
        self._pools: dict[str, BackendPool] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = loop.time()
            for pool in list(self._pools.values()):
                pool.sweep(now)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def pool(self, url: str) -> BackendPool:
        pool = self._pools.get(url)
        if pool is None:
            backend = Backend.parse(url)
            tls = None
            if backend.tls:
                # One context per backend: it offers that backend's last session only.
                tls = (self._tls_factory or ssl.create_default_context)()
            pool = self._pools[url] = BackendPool(
                backend, self.limits, asyncio.get_running_loop(), self.stats, tls
            )
        return pool

    def reconfigure(
        self, limits: ClientLimits, tls: Callable[[], ssl.SSLContext] | None = None
    ) -> None:
        """A reloaded config: new limits at once; with ``tls`` (its TLS settings changed),
        every ``https://`` backend gets a new context and its idle connections are closed, so
        the next request verifies against the new settings (busy ones finish as they are)."""
        self.limits = limits
        if tls is not None:
            self._tls_factory = tls
        for pool in self._pools.values():
            pool.limits = limits
            if tls is not None and pool.backend.tls:
                pool.tls = tls()
                while pool.idle:
                    pool.idle.pop().close()

    def idle_count(self, url: str) -> int:
        pool = self._pools.get(url)
        return 0 if pool is None else len(pool.idle)

    async def send(
        self,
        url: str,
        method: str,
        target: bytes,
        headers: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        length: int | None = None,
        *,
        replayable: bool = False,
    ) -> OriginResponse:
        """One request; the response once its head is in.  ``target``: as sent (the backend
        URL's path included, ``Backend.prefix``); ``headers``: the lines as sent
        (``upstream_wire.header_block``), without framing; ``length``: a streamed body's
        declared length (None: sent chunked); ``replayable``: the request may be sent twice
        (an idempotent method, the body in memory).  Raises ``UpstreamError``, or what the
        client's ``failure`` makes of it."""
        try:
            pool = self._pools.get(url) or self.pool(url)
            chunked = False
            if body is None:
                framing = b"content-length: 0\r\n" if method in _BODY_EXPECTED else b""
            elif isinstance(body, bytes):
                framing = b"content-length: %d\r\n" % len(body)
            elif length is not None:
                framing = b"content-length: %d\r\n" % length
            else:
                framing = b"transfer-encoding: chunked\r\n"
                chunked = True
            if headers.startswith(b"host:"):  # the usual head: the client's Host leads
                # ``encode_head``'s answer for lines that carry a Host (its host test, inline:
                # one join, no call or list per request).
                verb = _METHODS.get(method) or method.encode("ascii")
                head = b"".join((verb, b" ", target, b" HTTP/1.1\r\n", headers, framing, b"\r\n"))
            else:
                head = encode_head(
                    _METHODS.get(method) or method.encode("ascii"),
                    target,
                    headers,
                    pool.backend.authority,  # used only when the lines carry no Host
                    framing,
                )
            head_request = method == "HEAD"
            connection = pool.idle_connection()
            if connection is None:
                connection = await pool.connect()
                started = time.monotonic()
                try:
                    response_head = await connection.exchange(head, body, chunked, head_request)
                except BaseException:
                    connection.close()  # cancelled, or failed: never pooled half-way
                    raise
            else:
                started = time.monotonic()
                try:
                    if body is None or isinstance(body, bytes):
                        # The usual case, inline (``Connection.exchange`` without its
                        # coroutine): write, then wait on a bare future woken by the
                        # connection's callbacks.
                        reader = connection.begin(head, body, head_request)
                        loop = pool.loop
                        while (
                            reader.head is None
                            and connection.error is None
                            and not connection.closed
                        ):
                            waiter = connection._waiter = loop.create_future()
                            await waiter
                        # ``head_in``, inline when a head came (else it raises).
                        response_head = reader.head or connection.head_in()
                        if reader.complete or connection.error is not None:
                            connection.due = 0.0
                        else:
                            connection.deadline_kind = "read"
                            connection.due = loop.time() + pool.limits.read_idle
                    else:
                        response_head = await connection.exchange(head, body, chunked, head_request)
                except UpstreamError as exc:
                    connection.close()
                    if not (replayable and exc.kind == "reset"):
                        raise
                    # A kept-alive connection closed under the request with not a byte
                    # back: the origin's idle timeout racing ours.  A request that may go
                    # twice goes again, once, on a new connection (as Go's client does);
                    # any other is the walk's call.
                    stats = self.stats
                    stats.stale[url] = stats.stale.get(url, 0) + 1
                    connection = await pool.connect()
                    try:
                        response_head = await connection.exchange(head, body, chunked, head_request)
                    except BaseException:
                        connection.close()
                        raise
                except BaseException:
                    connection.close()  # cancelled, or failed: never pooled half-way
                    raise
        except UpstreamError as exc:
            failure = self.failure
            if failure is None:
                raise
            raise failure(exc) from None
        seconds = time.monotonic() - started
        pair = self.stats.first_byte_seconds.get(url)  # ClientStats.add, inline
        if pair is None:
            self.stats.first_byte_seconds[url] = [seconds, 1.0]
        else:
            pair[0] += seconds
            pair[1] += 1.0
        return OriginResponse(connection, response_head)


_BODY_EXPECTED = frozenset({"POST", "PUT", "PATCH"})
#: Request methods as sent, for the common ones (others are encoded per request).
_METHODS: Final = {
    name: name.encode("ascii")
    for name in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
}


__all__ = [
    "HIGH_WATER",
    "Backend",
    "BackendPool",
    "ClientLimits",
    "ClientStats",
    "Connection",
    "OriginClient",
    "OriginResponse",
    "ResponseContent",
    "UpstreamError",
]
