"""Server-Sent Events on the stream path, for plain HTTP clients (``EventSource``).

    GET /stream?channel=trades:BTC-USD[&since=SEQ | &snapshot=1]
    Accept: text/event-stream
    Last-Event-ID: SEQ                 (a reconnecting EventSource: resumes after SEQ)

One channel per connection.  The response is ``text/event-stream``, chunked; each message is
``id: SEQ`` plus ``data: <the origin's JSON>``, made once per message for every SSE subscriber
of the channel (``Hub``); the edge's own messages are events named after their ``type``
(``subscribed``, ``snapshot``, ``resync``, ``error``, ``close``).  A comment line keeps idle
connections alive every ``ping_interval``.  The slow-consumer policy and the limits are the
WebSocket clients'; on SIGTERM the stream ends with a ``close`` event (code 1012), and the
client's EventSource reconnects with ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from edge.exchange import ProxyRequest
from edge.http1 import header_value
from edge.streams.frames import CLOSE_SERVICE_RESTART, EVENTS, sse_event
from edge.streams.hub import notify
from edge.streams.session import WRITE_HIGH_WATER, Owner, StreamClient, snapshot_then_stream

if TYPE_CHECKING:
    from edge.websocket import TunnelHost

#: Bytes a client may send after its request (nothing is expected) before it is closed.
MAX_CLIENT_BYTES = 4096
_PING = b"8\r\n: ping\n\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class EventParams:
    """What the request asks for: a channel, and a ``since`` or a snapshot."""

    __slots__ = ("channel", "since", "snapshot")

    def __init__(self, channel: str, since: int | None, snapshot: bool) -> None:
        self.channel = channel
        self.since = since
        self.snapshot = snapshot


def event_params(request: ProxyRequest) -> EventParams | str:
    """The request's parameters, or why they are not acceptable."""
    _, _, query = request.target.partition(b"?")
    if len(query) > 512:
        return "bad_query"
    try:
        fields = parse_qs(query.decode("ascii"), max_num_fields=4)
    except (UnicodeDecodeError, ValueError):
        return "bad_query"
    channels = fields.get("channel", [])
    if len(channels) != 1:
        return "one_channel_per_event_stream"
    since_text = header_value(request.headers, b"last-event-id")
    since_values = fields.get("since", [])
    text = since_text.decode("latin-1") if since_text is not None else None
    if text is None and since_values:
        text = since_values[0]
    since: int | None = None
    if text is not None:
        if not text.strip().isdigit() or len(text.strip()) > 18:
            return "bad_since"
        since = int(text.strip())
    snapshot = fields.get("snapshot", ["0"])[0] in ("1", "true")
    if snapshot and since is not None:
        snapshot = False  # a reconnecting client resumes; it does not start over
    return EventParams(channels[0], since, snapshot)


class EventSession(StreamClient):
    """One Server-Sent Events client (an ``edge.websocket.Upgraded``)."""

    __slots__ = ("last_ping", "received")

    def __init__(
        self,
        service: Owner,
        host: TunnelHost,
        transport: asyncio.Transport,
        request: ProxyRequest,
        queue_limit: int,
    ) -> None:
        super().__init__(service, host, transport, request, queue_limit, EVENTS)
        self.received = 0
        self.last_ping = host.loop.time()

    def start(self, params: EventParams) -> None:
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\n"
            b"x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n%s: %s\r\n\r\n"
            % (self.service.request_id_header, self.request.request_id)
        )
        self.host.tunnels.add(self)
        self.service.opened(self)
        hub = self.service.hub
        if hub is None:
            self.close(CLOSE_SERVICE_RESTART, "streams disabled")
            return
        refused = hub.join(self.sub, params.channel)
        if refused is not None:
            notify(self.sub, "error", params.channel, reason=refused)
            self.close(1008, refused)
        elif params.snapshot:
            self.service.spawn(
                snapshot_then_stream(self.service, self.sub, self.request, params.channel)
            )
        else:
            hub.start(self.sub, params.channel, params.since)

    def from_client(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > MAX_CLIENT_BYTES:
            self.close(1008, "unexpected request body")

    def closing_bytes(self, code: int, reason: str) -> bytes:
        event = json.dumps({"type": "close", "code": code, "reason": reason}).encode()
        return sse_event(event, event="close") + _LAST_CHUNK

    def check_idle(self, now: float) -> None:
        if self.ended(now):
            return
        if now - self.last_ping >= self.service.keep_alive[0]:
            self.last_ping = now
            self.sub.send(_PING)
