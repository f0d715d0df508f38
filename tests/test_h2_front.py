"""The HTTP/2 front end without sockets: the frame meter on raw bytes, prebuilt responses read
back, and ``H2Connection`` driven by an h2 client through an in-memory transport over the
in-memory pipeline of ``tests.stage_support`` (no processes, no sleeps)."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import pytest
from hyperframe.frame import (
    HeadersFrame,
    SettingsFrame,
)
from prometheus_client import CollectorRegistry

from edge.front import FrontDoors
from edge.h2front import H2Connection
from edge.h2meter import PREFACE
from edge.h2streams import PrebuiltResponses, ResponseHeads, parse_wire, response_head
from edge.hpack_literal import LiteralEncoder
from edge.http1 import RequestRejected, error_response
from edge.memos import RESPONSE_HEADS, BoundedMemo
from edge.protocol import Connections
from tests.stage_support import Reply, World, world

# -- parse_wire ------------------------------------------------------------------------------


def test_parse_wire_drops_hop_by_hop_fields():
    wire = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive\r\n"
        b"Keep-Alive: timeout=5\r\nX-Cache: HIT\r\nContent-Length: 5\r\n\r\nhello"
    )
    status, fields, body = parse_wire(wire)
    assert status == 200 and body == b"hello"
    assert fields == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"x-cache", b"HIT"),
        (b"content-length", b"5"),
    ]
    chunked = b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    status, fields, body = parse_wire(chunked)
    assert status == 502 and body == b"abc" and fields == [(b":status", b"502")]
    error = error_response(
        431, "iad", "headers_too_large", b"rid", request_id_header=b"x-request-id"
    )
    status, fields, body = parse_wire(error)
    assert status == 431 and (b"x-request-id", b"rid") in fields and body


def test_response_head_encodes_a_prebuilt_head_once_and_sends_the_body_as_stored():
    memo: ResponseHeads = BoundedMemo(RESPONSE_HEADS)
    encoder = LiteralEncoder()
    wire = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive\r\n"
        b"X-Cache: HIT\r\nContent-Length: 5\r\n\r\nhello"
    )
    status, block, body = response_head(wire, memo, encoder)
    assert status == 200 and bytes(body) == b"hello"
    assert hpack.Decoder().decode(block, raw=True) == parse_wire(wire)[1]
    again = response_head(wire + b"", memo, encoder)
    assert again[1] is block and len(memo) == 1  # encoded once per distinct head
    chunked = b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert response_head(chunked, memo, encoder)[2] == b"abc"
    assert len(memo) == 1  # a chunked body is decoded every time, its head not remembered
    for i in range(memo.bound + 5):
        response_head(b"HTTP/1.1 200 OK\r\nX-N: %d\r\n\r\n" % i, memo, encoder)
    assert 0 < len(memo) <= memo.bound


def test_prebuilt_responses_are_remembered_by_object_only_when_stable_and_small():
    responses = PrebuiltResponses()
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    status, block, body = responses.read(wire, True)
    assert (status, bytes(body)) == (200, b"hello")
    assert responses.by_object[id(wire)][0] is wire
    again = responses.read(wire, True)
    assert again[1] is block and again[2] is body  # the remembered view, not a new slice
    twin = bytes(bytearray(wire))  # equal bytes, another object: read afresh, still right
    assert twin is not wire and responses.read(twin, True)[2] is not body
    assert bytes(responses.read(twin, True)[2]) == b"hello"
    responses.by_object.clear()
    responses.read(wire, False)  # a request's own bytes (a request ID line): not kept
    large = b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 20_000
    responses.read(large, True)
    assert not responses.by_object


# -- H2Connection over an in-memory transport --------------------------------------------------


class MemoryTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.eof = False
        self.paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        pass

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data


class Peer:
    """An h2 client on the other side of a ``MemoryTransport``."""

    def __init__(self, w: World, **settings: int) -> None:
        loop = asyncio.get_running_loop()
        self.connections = Connections(w.pipeline, loop)
        self.doors = FrontDoors(self.connections, CollectorRegistry())
        self.server = H2Connection(self.doors)
        self.transport = MemoryTransport()
        self.server.connection_made(self.transport)
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.client.initiate_connection()
        if settings:
            self.client.update_settings(
                {getattr(h2.settings.SettingCodes, k.upper()): v for k, v in settings.items()}
            )
        self.events: list[h2.events.Event] = []
        self.pump()

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything to say."""
        for _ in range(100):
            to_server = self.client.data_to_send()
            if to_server:
                self.server.data_received(to_server)
            to_client = self.transport.take()
            if to_client:
                self.events += self.client.receive_data(to_client)
            if not to_server and not to_client:
                return

    def get(self, path: str, *, method: str = "GET", end_stream: bool = True) -> int:
        stream_id: int = self.client.get_next_available_stream_id()
        self.client.send_headers(
            stream_id,
            [
                (b":method", method.encode()),
                (b":path", path.encode()),
                (b":scheme", b"http"),
                (b":authority", b"api.m.test"),
                (b"accept-encoding", b"identity"),
            ],
            end_stream=end_stream,
        )
        self.pump()
        return stream_id

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)
            self.pump()

    def response(self, stream_id: int) -> tuple[dict[bytes, bytes], bytes, bool]:
        headers: dict[bytes, bytes] = {}
        body = b""
        ended = False
        for event in self.events:
            if getattr(event, "stream_id", None) != stream_id:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                headers = dict(event.headers or [])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data or b""
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
        return headers, body, ended

    def close(self) -> None:
        self.server.connection_lost(None)
        self.doors.close_all()
        self.connections.close_all()


CACHEABLE = [(b"cache-control", b"public, max-age=60"), (b"content-type", b"text/plain")]


async def test_a_miss_then_a_hit_over_h2_carry_the_http11_headers():
    w = world({"http://u1": [Reply(headers=CACHEABLE, chunks=(b"tick",))]})
    peer = Peer(w)
    first = peer.get("/api/ticker")
    await peer.settle()
    headers, body, ended = peer.response(first)
    assert ended and body == b"tick"
    assert headers[b":status"] == b"200" and headers[b"x-cache"] == b"MISS"
    second = peer.get("/api/ticker")  # answered in the callback: no task, no settle
    headers, body, ended = peer.response(second)
    assert ended and body == b"tick"
    assert headers[b"x-cache"] == b"HIT" and headers[b"content-length"] == b"4"
    assert b"connection" not in headers and b"keep-alive" not in headers
    assert len(w.upstream.sent) == 1
    # What went upstream is an ordinary HTTP/1.1 request of the same meaning.
    sent = w.upstream.sent[0]
    assert sent.method == "GET" and sent.target == "/api/ticker"
    assert sent.headers["host"] == "api.m.test"
    peer.close()


async def test_a_fill_leaders_reset_stream_does_not_stop_the_fill_its_waiter_needs():
    # RST_STREAM on a stream leading a cache fill: the stream ends, its fetch goes on for the
    # stream waiting on it (one origin request) and for the cache.
    gate = asyncio.Event()
    w = world({"http://u1": [Reply(headers=CACHEABLE, chunks=(b"tick",), gate=gate)]})
    cache = w.pipeline.cache
    assert cache is not None
    peer = Peer(w)
    leader = peer.get("/api/ticker")
    await peer.settle()
    waiter = peer.get("/api/ticker")
    await peer.settle()
    assert len(w.upstream.sent) == 1 and cache.metrics.coalesced_waiters == 1
    peer.client.reset_stream(leader)
    peer.pump()
    gate.set()
    await peer.settle()
    headers, body, ended = peer.response(waiter)
    assert ended and body == b"tick" and headers[b"x-cache"] == b"HIT"
    assert peer.response(leader) == ({}, b"", False)
    assert len(w.upstream.sent) == 1
    peer.close()


async def test_a_repeated_header_block_replays_its_request_head_and_memoised_hit(monkeypatch):
    """The client's encoder indexes the request's fields the first time; from the second
    request on the block is all indexed (the HPACK memo's), and from the third its validated
    head (kept on the decoded block) replays the memoised hit: no build_request, no stream
    object, HEADERS and DATA from the stored bytes."""
    from edge import h2request

    w = world({"http://u1": [Reply(headers=CACHEABLE, chunks=(b"tick",))]})
    peer = Peer(w)
    peer.get("/api/ticker")  # miss: fills the cache
    await peer.settle()
    built = []
    real = h2request.build_request
    monkeypatch.setattr(
        h2request, "build_request", lambda *a, **k: built.append(1) or real(*a, **k)
    )
    second = peer.get("/api/ticker")
    assert built == [1]  # the block is new to the memo (indexed now, literals before)
    streams = [peer.get("/api/ticker") for _ in range(3)]
    assert built == [1]  # replayed
    assert not peer.server.table.streams  # answered without a stream object
    for stream in (second, *streams):
        headers, body, ended = peer.response(stream)
        assert ended and body == b"tick" and headers[b"x-cache"] == b"HIT"
    head = peer.get("/api/ticker", method="HEAD")
    headers, body, ended = peer.response(head)
    assert ended and body == b"" and headers[b"content-length"] == b"4"
    assert len(w.upstream.sent) == 1
    peer.close()


async def test_a_hit_larger_than_the_window_waits_for_it_on_a_stream():
    w = world({"http://u1": [Reply(headers=CACHEABLE, chunks=(b"tick",))]})
    peer = Peer(w, initial_window_size=3)
    first = peer.get("/api/ticker")
    await peer.settle()
    second = peer.get("/api/ticker")
    for stream in (first, second):
        _, body, ended = peer.response(stream)
        assert body == b"tic" and not ended
    assert second in peer.server.table.streams  # the hit's last byte waits on its stream
    peer.client.increment_flow_control_window(10, stream_id=second)
    peer.pump()
    _, body, ended = peer.response(second)
    assert body == b"tick" and ended
    assert second not in peer.server.table.streams
    peer.close()


async def test_response_bytes_wait_for_the_peer_window():
    body = b"x" * 100_000
    w = world({"http://u1": [Reply(chunks=(body,), headers=[(b"cache-control", b"no-store")])]})
    peer = Peer(w, initial_window_size=1000)
    stream = peer.get("/api/big")
    await peer.settle()
    _, got, ended = peer.response(stream)
    assert len(got) == 1000 and not ended  # no more than the window
    held = peer.server.table.streams[stream]
    assert held.stalled_since > 0  # waiting on the window: the sweep's stall clock runs
    peer.client.increment_flow_control_window(200_000, stream_id=stream)
    peer.client.increment_flow_control_window(200_000)
    peer.pump()
    await peer.settle()
    _, got, ended = peer.response(stream)
    assert ended and got == body
    assert stream not in peer.server.table.streams  # released
    peer.close()


async def test_a_stalled_stream_is_reset_by_the_sweep():
    w = world(
        {"http://u1": [Reply(chunks=(b"y" * 10_000,), headers=[(b"cache-control", b"no-store")])]}
    )
    peer = Peer(w, initial_window_size=0)
    stream = peer.get("/api/stall")
    await peer.settle()
    held = peer.server.table.streams[stream]
    assert held.stalled_since
    stall = w.pipeline.state.config.edge.http2.stall_timeout
    peer.server.check_deadline(held.stalled_since + stall - 0.01)
    assert stream in peer.server.table.streams
    peer.server.check_deadline(held.stalled_since + stall)
    peer.pump()
    resets = [e for e in peer.events if isinstance(e, h2.events.StreamReset)]
    assert [r.stream_id for r in resets] == [stream]
    assert resets[0].error_code == h2.errors.ErrorCodes.CANCEL
    assert not peer.server.table.streams
    peer.close()


async def test_a_request_body_is_streamed_and_acknowledged_as_consumed():
    w = world({"http://u1": [Reply(headers=[(b"cache-control", b"no-store")], chunks=(b"ok",))]})
    peer = Peer(w)
    stream = peer.get("/api/orders", method="POST", end_stream=False)
    payload = b"p" * 50_000
    peer.client.send_data(stream, payload[:16_000])
    peer.client.send_data(stream, payload[16_000:32_000])
    peer.client.send_data(stream, payload[32_000:48_000])
    peer.client.send_data(stream, payload[48_000:], end_stream=True)
    peer.pump()
    await peer.settle()
    headers, body, ended = peer.response(stream)
    assert ended and headers[b":status"] == b"200" and body == b"ok"
    assert w.upstream.sent[0].body == payload
    # Every byte consumed was given back: the client's windows are whole again.
    # (h2 batches its WINDOW_UPDATEs: the last few KB may still be owed).
    assert peer.client.outbound_flow_control_window > 65535 - 16384
    peer.close()


async def test_a_protocol_error_ends_the_connection_with_goaway():
    w = world()
    peer = Peer(w)
    peer.server.data_received(HeadersFrame(2, data=b"", flags=["END_HEADERS"]).serialize())
    peer.events += peer.client.receive_data(peer.transport.take())
    goaway = [e for e in peer.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway and goaway[0].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert peer.transport.eof and not peer.transport.closed  # lingering
    peer.server.check_deadline(asyncio.get_running_loop().time() + 2)
    assert peer.transport.closed
    peer.close()


async def test_after_an_offenders_goaway_nothing_more_is_written():
    """Its streams end; what their tasks would still send is dropped (the transport was
    half-closed with write_eof: a write would raise), and GOAWAY is the last frame.  (A stream
    leading a cache fill finishes it, for the requests waiting on it: ``leads_fill``.)"""
    gate = asyncio.Event()
    w = world({"http://u1": [Reply(headers=[(b"cache-control", b"no-store")], gate=gate)]})
    peer = Peer(w)
    stream = peer.get("/api/slow")
    await peer.settle()
    task = peer.server.table.streams[stream].task
    assert task is not None
    peer.server.data_received(HeadersFrame(2, data=b"", flags=["END_HEADERS"]).serialize())
    frames = _frames(peer.transport.take())
    assert frames[-1][0] == 0x7 and peer.transport.eof
    gate.set()  # the origin answers the fill the stream led
    for _ in range(10):
        await asyncio.sleep(0)
    assert task.done() and not peer.transport.take()
    peer.server.check_deadline(asyncio.get_running_loop().time() + 2)
    assert peer.transport.closed
    peer.close()


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ((b"/api/x", b"x-big", b"v" * 17_000), b"431"),
        ((b"/api/../admin", b"x-small", b"v"), b"400"),
        ((b"/api/" + b"u" * 9000, b"x-small", b"v"), b"414"),
    ],
)
async def test_requests_refused_on_their_stream(extra, status):
    w = world()
    peer = Peer(w)
    stream_id = peer.client.get_next_available_stream_id()
    peer.client.send_headers(
        stream_id,
        [
            (b":method", b"GET"),
            (b":path", extra[0]),
            (b":scheme", b"http"),
            (b":authority", b"api.m.test"),
            (extra[1], extra[2]),
        ],
        end_stream=True,
    )
    peer.pump()
    headers, _, ended = peer.response(stream_id)
    assert ended and headers[b":status"] == status
    assert not w.upstream.sent
    peer.close()


def _frames(data: bytes) -> list[tuple[int, int, int]]:
    """(type, flags, stream) of each frame in ``data``."""
    out = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        out.append((data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF))
        data = data[9 + length :]
    return out


async def test_a_clients_graceful_goaway_lets_its_streams_finish():
    gate = asyncio.Event()
    w = world({"http://u1": [Reply(headers=[(b"cache-control", b"no-store")], gate=gate)]})
    peer = Peer(w)
    stream = peer.get("/api/slow")
    await peer.settle()
    peer.client.close_connection()  # GOAWAY NO_ERROR: no new streams from the client
    peer.server.data_received(peer.client.data_to_send())
    assert not peer.transport.closed and stream in peer.server.table.streams
    gate.set()
    for _ in range(20):
        await asyncio.sleep(0)
    frames = _frames(peer.transport.take())
    assert (0x1, 0x4, stream) in frames  # HEADERS, END_HEADERS
    assert any(kind == 0x0 and flags & 0x1 and sid == stream for kind, flags, sid in frames)
    assert frames[-1][0] == 0x7  # then the edge's GOAWAY
    assert peer.transport.closed
    peer.close()


async def test_requests_in_the_same_read_as_the_clients_goaway_are_answered():
    """h2 closes its state machine as soon as it parses a GOAWAY: requests that came in the
    same read (answered from the cache at once) must still be answered, and nothing left
    behind, or the connection never closes (found by h2load -D over TLS)."""
    w = world({"http://u1": [Reply(headers=CACHEABLE, chunks=(b"tick",))]})
    peer = Peer(w)
    peer.get("/api/ticker")  # fills the cache
    await peer.settle()
    stream = peer.client.get_next_available_stream_id()
    peer.client.send_headers(
        stream,
        [
            (b":method", b"GET"),
            (b":path", b"/api/ticker"),
            (b":scheme", b"http"),
            (b":authority", b"api.m.test"),
            (b"accept-encoding", b"identity"),
        ],
        end_stream=True,
    )
    peer.client.close_connection()
    peer.server.data_received(peer.client.data_to_send())  # HEADERS + GOAWAY in one read
    frames = _frames(peer.transport.take())
    assert (0x1, 0x4, stream) in frames  # the hit's HEADERS
    assert any(kind == 0x0 and flags & 0x1 and sid == stream for kind, flags, sid in frames)
    assert not peer.server.table.streams
    assert peer.transport.closed
    peer.close()


# -- LiteralEncoder ----------------------------------------------------------------------------


def test_literal_hpack_blocks_decode_and_leave_the_dynamic_table_empty():
    from edge.hpack_literal import encode_integer

    encoder = LiteralEncoder()
    fields = [
        (b":status", b"200"),  # a static entry: one byte
        (b":status", b"418"),  # a static name
        (b"content-type", b"application/json"),
        (b"x-meridian-region", b"us-east"),  # a new name
        (b"x-long", b"v" * 300),  # lengths past the 7-bit prefix
        (b"set-cookie", b"a=b"),
    ]
    block = encoder.encode(fields)
    assert block[0] == 0x88
    decoder = hpack.Decoder()
    assert decoder.decode(block, raw=True) == fields
    assert len(decoder.header_table.dynamic_entries) == 0
    # The same block on every connection: a second decoder, and again, reads the same.
    assert hpack.Decoder().decode(encoder.encode(list(fields)), raw=True) == fields
    assert encoder.encode(fields) is block  # memoised
    assert encode_integer(10, 5, 0) == b"\x0a"
    assert encode_integer(1337, 5, 0) == b"\x1f\x9a\x0a"  # RFC 7541 C.1.2


async def test_connections_over_the_descriptor_budget_are_refused():
    w = world()
    peer = Peer(w)  # one HTTP/2 connection open
    peer.connections.max_open = 1
    refused = H2Connection(peer.doors)
    transport = MemoryTransport()
    refused.connection_made(transport)
    assert transport.closed and not transport.out  # not even SETTINGS
    assert refused not in peer.doors.h2_open
    assert peer.connections.resources.refused == {"fd_reserve": 1}
    refused.connection_lost(None)  # nothing to undo
    peer.close()


# -- FrontDoor --------------------------------------------------------------------------------


class SwitchingTransport(MemoryTransport):
    def __init__(self) -> None:
        super().__init__()
        self.protocol: asyncio.BaseProtocol | None = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([PREFACE], "H2Connection"),
        ([PREFACE[:3], PREFACE[3:10], PREFACE[10:] + SettingsFrame(0).serialize()], "H2Connection"),
        ([b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], "EdgeConnection"),
        ([b"PR", b"IX"], "EdgeConnection"),  # a prefix of the preface, then not
        ([b"P"], None),  # still undecided
    ],
)
async def test_the_front_door_picks_the_protocol_by_the_first_bytes(chunks, expected):
    from edge.front import FrontDoor

    w = world()
    loop = asyncio.get_running_loop()
    connections = Connections(w.pipeline, loop)
    doors = FrontDoors(connections, CollectorRegistry())
    door = FrontDoor(doors, tls=False)
    transport = SwitchingTransport()
    door.connection_made(transport)
    assert door in doors.waiting  # closed by the sweep if nothing comes
    for chunk in chunks:
        door.data_received(chunk)
    if expected is None:
        assert transport.protocol is None and door in doors.waiting
    else:
        assert type(transport.protocol).__name__ == expected
        assert door not in doors.waiting
    if isinstance(transport.protocol, H2Connection):
        transport.protocol.connection_lost(None)
    doors.close_all()
    connections.close_all()


@pytest.mark.parametrize(
    "field",
    [
        (b"x-smuggle", b"a\r\nx-injected: 1"),
        (b"x-nul", b"a\x00b"),
        (b"Upper-Case", b"v"),
        (b"connection", b"close"),
        (b"transfer-encoding", b"chunked"),
        (b"te", b"gzip"),
    ],
)
async def test_fields_that_could_smuggle_into_http11_never_reach_upstream(field):
    """A malformed request is a stream error (RFC 9113 8.1.1): RST_STREAM PROTOCOL_ERROR, never
    forwarded; the connection goes on."""
    w = world({"http://u1": [Reply(headers=[(b"cache-control", b"no-store")])]})
    peer = Peer(w)
    block = hpack.Encoder().encode(
        [
            (b":method", b"GET"),
            (b":path", b"/api/x"),
            (b":scheme", b"http"),
            (b":authority", b"api.m.test"),
            field,
        ]
    )
    peer.server.data_received(
        HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
    )
    for _ in range(10):
        await asyncio.sleep(0)
    assert not w.upstream.sent
    out = peer.transport.take()  # raw: the h2 client never saw stream 1 opened
    assert _frames(out) == [(0x3, 0, 1)]  # RST_STREAM on stream 1, no GOAWAY
    assert out[9:13] == b"\x00\x00\x00\x01"  # PROTOCOL_ERROR
    assert not peer.server.table.streams and not peer.server.core.streams
    assert not peer.transport.closed
    peer.close()


# -- build_request ---------------------------------------------------------------------------


def _build(fields: list[tuple[bytes, bytes]], ended: bool = True) -> Any:
    from edge.h2request import build_request
    from meridian.config import EdgeLimits

    return build_request(
        fields,
        ended,
        limits=EdgeLimits(),
        request_id_header=b"x-request-id",
        client_ip="192.0.2.1",
        received_at=1.0,
        scheme=b"https",
        protocol=" proto=h2 tls=TLSv1.3",
    )


PSEUDO = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/api/a?b=1")]


def test_build_request_reads_an_http2_head_as_the_http11_request_it_means():
    request = _build(
        [
            *PSEUDO,
            (b":authority", b"API.m.test:443"),
            (b"cookie", b"a=1"),
            (b"cookie", b"b=2"),
            (b"x-request-id", b"abc123"),
        ]
    )
    assert request.method == "GET" and request.target == b"/api/a?b=1"
    assert request.path == "/api/a" and request.http_version == "2"
    assert (b"cookie", b"a=1; b=2") in request.headers  # crumbs joined (RFC 9113 8.2.3)
    assert request.host is not None and (b"host", request.host) in request.headers
    assert request.request_id == b"abc123" and request.request_id_supplied
    assert request.scheme == b"https" and request.client_ip == "192.0.2.1"
    # A Host field without :authority is the host; a body without a length is chunked upstream.
    post = _build(
        [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/o"), (b"host", b"h.test")],
        ended=False,
    )
    assert post.host == b"h.test" and post.body.kind.name == "CHUNKED"
    sized = _build(
        [*PSEUDO[1:], (b":method", b"PUT"), (b"host", b"h"), (b"content-length", b"5")], False
    )
    assert sized.body.kind.name == "LENGTH" and sized.body.length == 5


@pytest.mark.parametrize(
    ("fields", "ended", "status"),
    [
        ([*PSEUDO], True, 400),  # no :authority, no Host
        ([*PSEUDO, (b"host", b"a"), (b"host", b"b")], True, 400),
        ([*PSEUDO, (b":authority", b"a")], False, 400),  # GET with a body
        ([(b":method", b"CONNECT"), (b":authority", b"a:443")], True, 405),
        ([*PSEUDO, (b":authority", b"a"), *[(b"x-%d" % i, b"v") for i in range(101)]], True, 431),
        ([*PSEUDO, (b":authority", b"a"), (b"content-length", b"99999999999")], False, 413),
    ],
)
def test_build_request_refusals(fields, ended, status):
    with pytest.raises(RequestRejected) as caught:
        _build(fields, ended)
    assert caught.value.status == status
