"""One client WebSocket on the stream path: the handshake, client frames in, commands to the
hub, the hub's frames out, keep-alive and the ending.

The client speaks JSON in text frames:

    {"op": "subscribe", "channel": "ticker:BTC-USD"}                 live from the next message
    {"op": "subscribe", "channel": "trades:BTC-USD", "since": 1234}  every message after 1234
    {"op": "subscribe", "channel": "depth:BTC-USD", "snapshot": true}
    {"op": "unsubscribe", "channel": "ticker:BTC-USD"}

and gets the origin's messages (``{"channel", "seq", "ts", "data"}``, the bytes the origin
sent) plus frames of the edge's own, each with ``type``: ``subscribed`` (``seq``: the
channel's last sequence then), ``snapshot`` (``seq`` it reflects, ``data``: the REST
object), ``resync`` (the stream continues after ``seq``; state must be refetched),
``unsubscribed`` and ``error`` (``reason``).

Keep-alive: a ping after ``ping_interval`` without a byte from the client, closed (1001) when
nothing comes back within ``ping_timeout``.  On SIGTERM every session gets 1012 (service
restart: reconnect, elsewhere or in a moment) and its socket is closed; a socket that does not
take the close frame within ``CLOSE_GRACE`` is aborted, as is one closed by the slow-consumer
policy (its buffer is full by definition).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from edge.exchange import ProxyRequest
from edge.streams.frames import (
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_DATA,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SERVICE_RESTART,
    CLOSE_UNSUPPORTED,
    DEFLATE,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PLAIN,
    ClientFrames,
    FrameError,
    close_frame,
    frame,
    parse_close,
    sse_event,
    text_frame,
)
from edge.streams.hub import Channel, Hub, notify
from edge.streams.queue import Subscriber, WriteBatch
from edge.streams.stats import StreamStats
from meridian.log import get_logger

if TYPE_CHECKING:
    from edge.websocket import TunnelHost


class Client(Protocol):
    """A stream client's session, WebSocket or Server-Sent Events."""

    @property
    def request(self) -> ProxyRequest: ...


class Owner(Protocol):
    """The stream service as a session uses it (``edge.streams.service.StreamService``)."""

    @property
    def request_id_header(self) -> bytes: ...

    @property
    def stats(self) -> StreamStats: ...

    @property
    def batch(self) -> WriteBatch | None: ...

    @property
    def hub(self) -> Hub | None: ...

    @property
    def keep_alive(self) -> tuple[float, float]:
        """(ping interval, ping timeout)."""

    def opened(self, session: Client) -> None: ...

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs ``work`` in a task the service holds (and cancels when it closes)."""

    def closed(self, session: Client) -> None: ...

    async def snapshot(self, request: ProxyRequest, channel: str) -> tuple[int, bytes] | str: ...


log = get_logger("edge.streams")

#: Seconds a closing socket has to take its close frame before it is aborted.
CLOSE_GRACE = 2.0
_PING = frame(OP_PING, b"")
#: The transport's write buffer (bytes) above which frames wait in the session's own queue.
WRITE_HIGH_WATER = 64 * 1024


async def snapshot_then_stream(
    owner: Owner, sub: Subscriber[Channel], request: ProxyRequest, channel: str
) -> None:
    """Sends the channel's snapshot, then starts the subscription after the sequence it
    reflects (the client has joined the channel already)."""
    result = await owner.snapshot(request, channel)
    hub = owner.hub
    if sub.closed or hub is None or channel not in sub.channels:
        return
    if isinstance(result, str):
        notify(sub, "error", channel, reason=result)
        hub.leave(sub, channel)
        return
    seq, body = result
    owner.stats.snapshots += 1
    head = json.dumps({"type": "snapshot", "channel": channel, "seq": seq})
    payload = head[:-1].encode() + b',"data":' + body + b"}"
    sub.send(sse_event(payload, event="snapshot", event_id=seq) if sub.sse else text_frame(payload))
    hub.start(sub, channel, seq)


class StreamClient:
    """What every kind of stream client shares (``StreamSession``, ``sse.EventSession``): its
    subscriber, its place in the hub, flow control, and the end: the closing bytes, then the
    socket closed, aborted after ``CLOSE_GRACE`` if the client never lets go."""

    __slots__ = ("abort_at", "closing", "host", "request", "service", "sub", "transport")

    def __init__(
        self,
        service: Owner,
        host: TunnelHost,
        transport: asyncio.Transport,
        request: ProxyRequest,
        queue_limit: int,
        kind: int,
    ) -> None:
        self.service = service
        self.host = host
        self.transport = transport
        self.request = request
        self.sub: Subscriber[Channel] = Subscriber(
            transport.write,
            self.close,
            request.client_ip,
            queue_limit,
            service.stats,
            kind=kind,
            batch=service.batch,
        )
        self.closing = False
        self.abort_at = 0.0

    def closing_bytes(self, code: int, reason: str) -> bytes:
        """What the client is sent last (a close frame, a close event)."""
        raise NotImplementedError

    def close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self._leave_hub()
        self.transport.write(self.closing_bytes(code, reason))
        self.transport.close()
        self.abort_at = self.host.loop.time() + CLOSE_GRACE

    def _leave_hub(self) -> None:
        self.closing = True
        hub = self.service.hub
        if hub is not None:
            hub.remove(self.sub)
        else:
            self.sub.mark_closed()

    def pause_upstream_reading(self) -> None:
        self.sub.paused = True

    def resume_upstream_reading(self) -> None:
        if not self.closing:
            self.sub.resume()

    def client_lost(self) -> None:
        if not self.closing:
            self._leave_hub()
        self.host.tunnels.discard(self)
        self.service.closed(self)

    def close_going_away(self) -> None:
        self.close(CLOSE_SERVICE_RESTART, "service restart")

    def ended(self, now: float) -> bool:
        """For ``check_idle``: True when closing (the socket aborted once the grace is over)."""
        if self.closing and now >= self.abort_at:
            self.transport.abort()
        return self.closing


class StreamSession(StreamClient):
    """One client connection on the stream path (an ``edge.websocket.Upgraded``)."""

    __slots__ = ("extensions", "frames", "last_seen", "ping_sent")

    def __init__(
        self,
        service: Owner,
        host: TunnelHost,
        transport: asyncio.Transport,
        request: ProxyRequest,
        queue_limit: int,
        max_message: int,
        extensions: bytes | None = None,
    ) -> None:
        kind = PLAIN if extensions is None else DEFLATE
        super().__init__(service, host, transport, request, queue_limit, kind)
        #: The negotiated ``Sec-WebSocket-Extensions`` (permessage-deflate), if any.
        self.extensions = extensions
        self.frames = ClientFrames(max_message, deflate=extensions is not None)
        self.last_seen = host.loop.time()
        self.ping_sent = 0.0

    def start(self, accept: bytes, rest: bytes) -> None:
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: %s\r\n%s%s: %s\r\n\r\n"
            % (
                accept,
                b"sec-websocket-extensions: %s\r\n" % self.extensions if self.extensions else b"",
                self.service.request_id_header,
                self.request.request_id,
            )
        )
        self.host.tunnels.add(self)
        self.service.opened(self)
        if rest:
            self.from_client(rest)

    # -- client -> edge -----------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_seen = self.host.loop.time()
        self.ping_sent = 0.0
        try:
            frames = self.frames.feed(data)
        except FrameError as exc:
            self.close(exc.code, exc.reason)
            return
        for opcode, payload in frames:
            if opcode == OP_TEXT:
                self._command(payload)
            elif opcode == OP_PING:
                self.sub.send(frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                code, _ = parse_close(payload)
                if code == 1005:
                    code = 1000
                elif not (1000 <= code <= 1003 or 1007 <= code <= 1011 or 3000 <= code <= 4999):
                    code = CLOSE_PROTOCOL_ERROR  # a code no endpoint may send (RFC 6455 7.4)
                self.close(code, "")
            elif opcode != OP_PONG:
                self.close(CLOSE_UNSUPPORTED, "text frames only")
            if self.closing:
                return

    def _command(self, payload: bytes) -> None:
        try:
            command = json.loads(payload.decode("utf-8"))
        except UnicodeDecodeError:
            self.close(CLOSE_INVALID_DATA, "invalid UTF-8")
            return
        except ValueError:
            self._error("", "bad_json")
            return
        if not isinstance(command, dict):
            self._error("", "bad_command")
            return
        op, channel = command.get("op"), command.get("channel")
        if not isinstance(channel, str) or len(channel) > 100:
            self._error("", "bad_channel")
            return
        hub = self.service.hub
        if hub is None:
            self._error(channel, "streams_disabled")
            return
        if op == "unsubscribe":
            if hub.leave(self.sub, channel):
                notify(self.sub, "unsubscribed", channel)
            else:
                self._error(channel, "not_subscribed")
            return
        if op != "subscribe":
            self._error(channel, "unknown_op")
            return
        since, snapshot = command.get("since"), command.get("snapshot", False)
        if since is not None and (type(since) is not int or not 0 <= since < 1 << 63):
            self._error(channel, "bad_since")
            return
        if not isinstance(snapshot, bool) or (snapshot and since is not None):
            self._error(channel, "bad_snapshot")
            return
        refused = hub.join(self.sub, channel)
        if refused is not None:
            self._error(channel, refused)
        elif snapshot:
            self.service.spawn(self._snapshot(channel))
        else:
            hub.start(self.sub, channel, since)

    async def _snapshot(self, channel: str) -> None:
        await snapshot_then_stream(self.service, self.sub, self.request, channel)

    def _error(self, channel: str, reason: str) -> None:
        notify(self.sub, "error", channel, reason=reason)

    # -- flow control and endings -------------------------------------------------------------

    def closing_bytes(self, code: int, reason: str) -> bytes:
        return close_frame(code, reason)

    def close(self, code: int, reason: str) -> None:
        """Close frame, then the socket (the server closes TCP first, RFC 6455 7.1.1)."""
        if self.closing:
            return
        super().close(code, reason)
        if code not in (1000, CLOSE_SERVICE_RESTART):
            log.info(
                "stream_closed",
                code=code,
                reason=reason,
                client=self.request.client_ip,
                request_id=self.request.request_id.decode("ascii", "replace"),
            )

    def check_idle(self, now: float) -> None:
        if self.ended(now):
            return
        keep_alive = self.service.keep_alive
        if self.ping_sent:
            if now - self.ping_sent > keep_alive[1]:
                self.close(CLOSE_GOING_AWAY, "ping timeout")
        elif now - self.last_seen > keep_alive[0]:
            self.ping_sent = now
            self.sub.send(_PING)
