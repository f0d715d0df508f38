"""A stream session in memory: a fake transport and clock, the real hub and framing.

Keep-alive (a ping after the interval, 1001 when nothing answers), the drain's 1012, the
abort of a socket that does not take its close frame, and commands answered in order."""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any

from benchmarks.streams import client_frame
from edge.exchange import ProxyRequest
from edge.http1 import NO_BODY
from edge.streams.frames import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, accept_key
from edge.streams.hub import Hub
from edge.streams.session import CLOSE_GRACE, StreamSession
from edge.streams.stats import StreamStats
from tests.test_streams_hub import STREAMS


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def frames(self) -> list[tuple[int, bytes]]:
        """The server frames written after the 101 head."""
        data = bytes(self.data[self.data.index(b"\r\n\r\n") + 4 :])
        out = []
        while data:
            opcode, size = data[0] & 0x0F, data[1]
            assert not size & 0x80  # server frames are never masked
            offset = 2
            if size == 126:
                size, offset = int.from_bytes(data[2:4], "big"), 4
            out.append((opcode, data[offset : offset + size]))
            data = data[offset + size :]
        return out


class FakeLoop:
    def __init__(self) -> None:
        self.now = 100.0

    def time(self) -> float:
        return self.now


class FakeHost:
    def __init__(self) -> None:
        self.loop = FakeLoop()
        self.tunnels: set[Any] = set()


class FakeOwner:
    request_id_header = b"x-request-id"
    batch = None

    def __init__(self) -> None:
        self.stats = StreamStats(lambda: 1000.0)
        self.opened_channels: list[str] = []
        self.hub: Hub | None = Hub(
            STREAMS,
            clock=lambda: 0.0,
            stats=self.stats,
            on_open=self.opened_channels.append,
            on_close=lambda name: None,
        )
        self.keep_alive = (20.0, 10.0)
        self.sessions: set[StreamSession] = set()

    def opened(self, session: StreamSession) -> None:
        self.sessions.add(session)

    def closed(self, session: StreamSession) -> None:
        self.sessions.discard(session)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        work.close()

    async def snapshot(self, request: ProxyRequest, channel: str) -> tuple[int, bytes] | str:
        return "unused"


def session() -> tuple[StreamSession, FakeTransport, FakeHost, FakeOwner]:
    transport, host, owner = FakeTransport(), FakeHost(), FakeOwner()
    request = ProxyRequest(
        "GET", b"/stream", "/stream", b"x", "1.1", [], True, "192.0.2.9", NO_BODY, b"r1", 0.0
    )
    accept = accept_key(b"dGhlIHNhbXBsZSBub25jZQ==")
    assert accept is not None
    stream = StreamSession(owner, host, transport, request, 4096, 1024)  # type: ignore[arg-type]
    stream.start(accept, b"")
    return stream, transport, host, owner


def test_handshake_then_commands_answered_in_order() -> None:
    stream, transport, host, owner = session()
    assert transport.data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in transport.data
    assert stream in host.tunnels and stream in owner.sessions
    command = {"op": "subscribe", "channel": "trades:BTC-USD"}
    stream.from_client(client_frame(json.dumps(command).encode()) + client_frame(b"[]"))
    assert owner.opened_channels == ["trades:BTC-USD"]
    assert owner.hub is not None
    owner.hub.publish("trades:BTC-USD", b'{"seq":1}', 1, 999.0)
    texts = [json.loads(p) for op, p in transport.frames() if op == OP_TEXT]
    assert texts == [
        {"type": "subscribed", "channel": "trades:BTC-USD", "seq": None},
        {"type": "error", "channel": "", "reason": "bad_command"},
        {"seq": 1},
    ]


def test_ping_after_the_interval_and_1001_when_nothing_answers() -> None:
    stream, transport, host, _ = session()
    host.loop.now += 19.0
    stream.check_idle(host.loop.now)
    assert transport.frames() == []
    host.loop.now += 2.0
    stream.check_idle(host.loop.now)
    assert transport.frames() == [(OP_PING, b"")]
    stream.from_client(client_frame(b"", OP_PONG))  # answered: no timeout
    host.loop.now += 15.0
    stream.check_idle(host.loop.now)
    assert not transport.closed
    host.loop.now += 6.0
    stream.check_idle(host.loop.now)  # a second ping
    host.loop.now += 10.5
    stream.check_idle(host.loop.now)
    assert transport.frames()[-1] == (OP_CLOSE, (1001).to_bytes(2, "big") + b"ping timeout")
    assert transport.closed and not transport.aborted
    host.loop.now += CLOSE_GRACE
    stream.check_idle(host.loop.now)
    assert transport.aborted  # the socket never took its close frame


def test_client_ping_is_answered_and_drain_says_1012() -> None:
    stream, transport, host, owner = session()
    stream.from_client(client_frame(b"hello", OP_PING))
    assert transport.frames() == [(OP_PONG, b"hello")]
    stream.close_going_away()
    assert transport.frames()[-1] == (OP_CLOSE, (1012).to_bytes(2, "big") + b"service restart")
    stream.from_client(client_frame(b'{"op":"subscribe","channel":"ticker:X"}'))  # ignored
    assert owner.opened_channels == []
    stream.client_lost()
    assert stream not in host.tunnels and stream not in owner.sessions


def test_client_close_is_echoed() -> None:
    stream, transport, _, _ = session()
    stream.from_client(client_frame((4001).to_bytes(2, "big") + b"bye", OP_CLOSE))
    assert transport.frames() == [(OP_CLOSE, (4001).to_bytes(2, "big"))]
    assert transport.closed


def test_a_close_code_no_endpoint_may_send_is_a_protocol_error() -> None:
    stream, transport, _, _ = session()
    stream.from_client(client_frame((1006).to_bytes(2, "big"), OP_CLOSE))
    assert transport.frames() == [(OP_CLOSE, (1002).to_bytes(2, "big"))]
