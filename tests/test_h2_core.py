"""The HTTP/2 connection core in memory: bytes in -> events and bytes out (``edge.h2core``), the
frame reader (``edge.h2wire``) and the memoised HPACK decoding (``edge.h2hpack``).  Frames the
core sends are read back with ``hyperframe`` (an independent parser), blocks made with the
``hpack`` library's encoder as a client would."""

from __future__ import annotations

from typing import Any

import hpack
import pytest
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import Frame
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.h2core import (
    DataReceived,
    GoAwayReceived,
    H2Core,
    RequestReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from edge.h2hpack import HeaderDecoder, leaves_table_alone, request_problem
from edge.h2meter import FrameMeter
from edge.h2wire import (
    PREFACE,
    ErrorCode,
    FrameReader,
    H2ConnectionError,
    frame_header,
    headers_frames,
)

DATA, HEADERS, PRIORITY, RST, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONT = range(10)
END_STREAM, END_HEADERS, PADDED, PRIO = 0x1, 0x4, 0x8, 0x20
REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":path", b"/api/v1/symbols"),
    (b":authority", b"api.m.test"),
    (b"accept-encoding", b"identity"),
]


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return frame_header(len(payload), kind, flags, stream_id) + payload


def setting(key: int, value: int) -> bytes:
    return key.to_bytes(2, "big") + value.to_bytes(4, "big")


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def sent(data: bytes) -> list[Any]:
    """The frames in ``data``, parsed by hyperframe."""
    frames = []
    view = memoryview(data)
    while view:
        parsed, length = Frame.parse_frame_header(view[:9])
        parsed.parse_body(view[9 : 9 + length])
        frames.append(parsed)
        view = view[9 + length :]
    return frames


class Client:
    """A connected client: preface and SETTINGS exchanged, our output drained."""

    def __init__(self, *, max_streams: int = 128, block_limit: int = 32768, **peer: int) -> None:
        self.core = H2Core(
            max_concurrent_streams=max_streams,
            max_header_list_size=16384,
            max_frame_size=16384,
            max_header_block=block_limit,
        )
        self.encoder = hpack.Encoder()
        payload = b"".join(setting(int(k[1:]), v) for k, v in peer.items())
        events = self.core.receive(PREFACE + frame(SETTINGS, 0, 0, payload))
        assert events == ([WindowUpdated(0)] if "s4" in peer else [])
        self.greeting = sent(self.core.take_output())

    def send(self, data: bytes) -> list[Any]:
        return self.core.receive(data)

    def request(self, stream_id: int, fields: list[Any] | None = None, *, end: bool = True) -> Any:
        block = self.encoder.encode(fields or REQUEST)
        flags = END_HEADERS | (END_STREAM if end else 0)
        return self.send(frame(HEADERS, flags, stream_id, block))

    def out(self) -> list[Any]:
        return sent(self.core.take_output())

    def error(self, data: bytes) -> tuple[ErrorCode, str]:
        with pytest.raises(H2ConnectionError) as caught:
            self.send(data)
        return caught.value.code, caught.value.reason


# -- the connection -----------------------------------------------------------------------------


def test_the_server_speaks_first_and_acknowledges_settings_and_pings():
    client = Client()
    settings_frame, ack = client.greeting
    assert settings_frame.type == SETTINGS and "ACK" not in settings_frame.flags
    assert settings_frame.settings == {0x3: 128, 0x6: 16384, 0x5: 16384, 0x2: 0}
    assert ack.type == SETTINGS and "ACK" in ack.flags
    assert client.send(frame(PING, 0, 0, b"12345678")) == []
    (pong,) = client.out()
    assert pong.type == PING and "ACK" in pong.flags and pong.opaque_data == b"12345678"
    assert client.send(frame(PING, 0x1, 0, b"12345678")) == []  # an ACK is not answered
    assert client.send(frame(SETTINGS, 0x1, 0)) == []
    assert client.out() == []


def test_the_preface_may_arrive_a_byte_at_a_time_and_must_be_exact():
    core = H2Core(
        max_concurrent_streams=1, max_header_list_size=1, max_frame_size=16384, max_header_block=1
    )
    data = PREFACE + frame(SETTINGS, 0, 0)
    for i in range(len(data)):
        assert core.receive(data[i : i + 1]) == []
    assert [f.type for f in sent(core.take_output())] == [SETTINGS, SETTINGS]
    with pytest.raises(H2ConnectionError) as caught:
        H2Core(
            max_concurrent_streams=1,
            max_header_list_size=1,
            max_frame_size=16384,
            max_header_block=1,
        ).receive(b"GET / HTTP/1.1\r\n")
    assert caught.value.code == ErrorCode.PROTOCOL_ERROR


def test_a_request_its_body_and_its_end():
    client = Client()
    (event,) = client.request(1, end=False)
    assert isinstance(event, RequestReceived) and event.stream_id == 1 and not event.ended
    assert event.headers == tuple(REQUEST)
    padded = b"\x03" + b"body" + b"\x00\x00\x00"
    (data,) = client.send(frame(DATA, PADDED | END_STREAM, 1, padded))
    assert data == DataReceived(1, b"body", len(padded), True)
    assert client.core.send_headers(1, b"\x88", False)
    assert client.core.send_data(1, b"ok", True)
    headers, body = client.out()
    assert headers.type == HEADERS and "END_HEADERS" in headers.flags
    assert body.data == b"ok" and "END_STREAM" in body.flags
    assert 1 not in client.core.streams  # both sides ended: closed


def test_trailers_end_the_body_and_must_end_the_stream():
    client = Client()
    client.request(1, end=False)
    block = client.encoder.encode([(b"x-checksum", b"abc")])
    (event,) = client.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
    assert event == TrailersReceived(1)
    client.request(3, end=False)
    block = client.encoder.encode([(b"x-checksum", b"abc")])
    (reset,) = client.send(frame(HEADERS, END_HEADERS, 3, block))  # trailers without END_STREAM
    assert reset == StreamReset(3, ErrorCode.PROTOCOL_ERROR, False, "bad_trailers")


def test_a_header_block_across_continuation_frames():
    client = Client()
    block = client.encoder.encode(REQUEST)
    head, rest = block[:5], block[5:]
    assert client.send(frame(HEADERS, END_STREAM, 1, head)) == []
    (event,) = client.send(frame(CONT, END_HEADERS, 1, rest))
    assert isinstance(event, RequestReceived) and event.headers == tuple(REQUEST)


@pytest.mark.parametrize(
    ("data", "code", "reason"),
    [
        (frame(HEADERS, END_HEADERS | END_STREAM, 2, b"\x82"), ErrorCode.PROTOCOL_ERROR, None),
        (frame(DATA, 0, 7, b"x"), ErrorCode.PROTOCOL_ERROR, "data_on_idle_stream"),
        (frame(DATA, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR, "data_on_idle_stream"),
        (frame(WINDOW, 0, 9, u32(1)), ErrorCode.PROTOCOL_ERROR, None),
        (frame(RST, 0, 9, u32(8)), ErrorCode.PROTOCOL_ERROR, None),
        (frame(RST, 0, 0, u32(8)), ErrorCode.PROTOCOL_ERROR, None),
        (frame(RST, 0, 1, b"\x00"), ErrorCode.FRAME_SIZE_ERROR, None),
        (frame(SETTINGS, 0, 1), ErrorCode.PROTOCOL_ERROR, None),
        (frame(SETTINGS, 0, 0, b"\x00" * 5), ErrorCode.FRAME_SIZE_ERROR, None),
        (frame(SETTINGS, 0x1, 0, setting(3, 1)), ErrorCode.FRAME_SIZE_ERROR, None),
        (frame(SETTINGS, 0, 0, setting(4, 2**31)), ErrorCode.FLOW_CONTROL_ERROR, None),
        (frame(SETTINGS, 0, 0, setting(5, 100)), ErrorCode.PROTOCOL_ERROR, None),
        (frame(SETTINGS, 0, 0, setting(2, 2)), ErrorCode.PROTOCOL_ERROR, None),
        (frame(PING, 0, 0, b"1234567"), ErrorCode.FRAME_SIZE_ERROR, None),
        (frame(PING, 0, 1, b"12345678"), ErrorCode.PROTOCOL_ERROR, None),
        (frame(WINDOW, 0, 0, u32(0)), ErrorCode.PROTOCOL_ERROR, "zero_window_increment"),
        (frame(WINDOW, 0, 0, u32(2**31 - 1)), ErrorCode.FLOW_CONTROL_ERROR, "window_overflow"),
        (frame(WINDOW, 0, 0, b"\x00"), ErrorCode.FRAME_SIZE_ERROR, None),
        (frame(PUSH, END_HEADERS, 1, u32(2)), ErrorCode.PROTOCOL_ERROR, None),
        (frame(CONT, END_HEADERS, 1, b"\x82"), ErrorCode.PROTOCOL_ERROR, None),
        (
            frame(HEADERS, 0, 1, b"\x82") + frame(PING, 0, 0, b"12345678"),
            ErrorCode.PROTOCOL_ERROR,
            "expected_continuation",
        ),
        (
            frame(HEADERS, 0, 1, b"\x82") + frame(CONT, 0, 3, b"\x84"),
            ErrorCode.PROTOCOL_ERROR,
            None,
        ),
        (frame_header(16385, DATA, 0, 1), ErrorCode.FRAME_SIZE_ERROR, "frame_too_large"),
        (frame(HEADERS, END_HEADERS, 1, b"\xff\x80\x01"), ErrorCode.COMPRESSION_ERROR, None),
        (frame(HEADERS, END_HEADERS | PADDED, 1, b"\x05\x82"), ErrorCode.PROTOCOL_ERROR, None),
        (frame(GOAWAY, 0, 1, u32(0) + u32(0)), ErrorCode.PROTOCOL_ERROR, None),
        (frame(GOAWAY, 0, 0, u32(0)), ErrorCode.FRAME_SIZE_ERROR, None),
        (frame(PRIORITY, 0, 0, u32(1) + b"\x10"), ErrorCode.PROTOCOL_ERROR, None),
    ],
)
def test_connection_errors(data, code, reason):
    got_code, got_reason = Client().error(data)
    assert got_code == code
    if reason is not None:
        assert got_reason == reason


def test_stream_ids_must_increase():
    client = Client()
    client.request(5)
    assert client.error(frame(HEADERS, END_HEADERS | END_STREAM, 3, b"\x82\x87\x84")) == (
        ErrorCode.PROTOCOL_ERROR,
        "stream_id_not_increasing",
    )


def test_the_first_frame_must_be_settings():
    core = H2Core(
        max_concurrent_streams=1, max_header_list_size=1, max_frame_size=16384, max_header_block=1
    )
    with pytest.raises(H2ConnectionError) as caught:
        core.receive(PREFACE + frame(PING, 0, 0, b"12345678"))
    assert caught.value.reason == "preface_without_settings"


def test_streams_beyond_the_advertised_limit_end_the_connection():
    client = Client(max_streams=2)
    client.request(1, end=False)
    client.request(3, end=False)
    block = client.encoder.encode(REQUEST)
    assert client.error(frame(HEADERS, END_HEADERS, 5, block)) == (
        ErrorCode.PROTOCOL_ERROR,
        "too_many_streams",
    )


def test_header_blocks_are_bounded_before_they_end():
    client = Client(block_limit=100)
    client.send(frame(HEADERS, 0, 1, b"\x82" * 60))
    assert client.error(frame(CONT, 0, 1, b"\x82" * 60)) == (
        ErrorCode.ENHANCE_YOUR_CALM,
        "header_block_too_large",
    )


def test_an_hpack_bomb_is_refused_while_decoding():
    client = Client(block_limit=8192)
    fields = [*REQUEST, *[(b"x-bomb", b"b" * 4000)] * 10]  # indexed once, then 1 byte each
    block = client.encoder.encode(fields)
    assert len(block) < 8192
    assert client.error(frame(HEADERS, END_HEADERS | END_STREAM, 1, block)) == (
        ErrorCode.ENHANCE_YOUR_CALM,
        "hpack_bomb",
    )


# -- the frame meter: floods -------------------------------------------------------------------


def _metered(**limits: int) -> Client:
    client = Client()
    client.core.meter = FrameMeter(**{"max_resets": 3, "max_control": 3, **limits})
    return client


def test_rapid_reset_within_one_second_only():
    client = _metered()
    for sid in (1, 3, 5):
        client.request(sid, end=False)
        client.core.receive(frame(RST, 0, sid, u32(8)), 0.0)
    client.request(7, end=False)
    with pytest.raises(H2ConnectionError) as caught:
        client.core.receive(frame(RST, 0, 7, u32(8)), 0.5)
    assert (caught.value.code, caught.value.reason) == (ErrorCode.ENHANCE_YOUR_CALM, "rapid_reset")
    client = _metered()
    for sid in (1, 3, 5):
        client.request(sid, end=False)
        client.core.receive(frame(RST, 0, sid, u32(8)), 0.0)
    for sid in (7, 9, 11):
        client.request(sid, end=False)
        client.core.receive(frame(RST, 0, sid, u32(8)), 1.0)  # a new second


def test_control_floods_count_requests_not_acks():
    client = _metered()
    acks = frame(SETTINGS, 0x1, 0) + frame(PING, 0x1, 0, b"12345678")
    client.core.receive(acks * 10, 0.0)
    client.core.receive(frame(PING, 0, 0, b"12345678") * 3, 0.0)
    with pytest.raises(H2ConnectionError) as caught:
        client.core.receive(frame(SETTINGS, 0, 0), 0.0)
    assert caught.value.reason == "control_flood"
    empty = _metered()
    empty.request(1, end=False)
    empty.core.receive(frame(DATA, END_STREAM, 1), 0.0)  # an empty end: not counted
    for sid in (3, 5, 7):
        empty.request(sid, end=False)
        empty.core.receive(frame(DATA, 0, sid), 0.0)
    with pytest.raises(H2ConnectionError) as caught:
        empty.core.receive(frame(DATA, 0, 3), 0.0)
    assert caught.value.reason == "control_flood"
    continuation = _metered()
    continuation.core.receive(frame(HEADERS, 0, 1, b"\x82") + frame(CONT, 0, 1) * 3, 0.0)
    with pytest.raises(H2ConnectionError) as caught:
        continuation.core.receive(frame(CONT, 0, 1), 0.0)
    assert caught.value.reason == "control_flood"
    priority = _metered()
    with pytest.raises(H2ConnectionError) as caught:
        priority.core.receive(frame(PRIORITY, 0, 3, u32(1) + b"\x10") * 4, 0.0)
    assert caught.value.reason == "control_flood"


def test_payload_bytes_are_never_read_as_frames_even_a_byte_at_a_time():
    client = _metered()
    client.request(1, end=False)
    lookalikes = frame(RST, 0, 1, u32(8)) * 5
    data = frame(DATA, 0, 1, lookalikes) * 10
    events = []
    for i in range(len(data)):
        events += client.core.receive(data[i : i + 1], 0.0)
    assert events == [DataReceived(1, lookalikes, len(lookalikes), False)] * 10


def test_http11_after_an_h2c_preface_is_refused_on_its_first_nine_bytes():
    """ "GET /smuggle HTTP/1.1" read as a frame header announces 4.6 MB: refused at once,
    never waited for."""
    client = Client()
    assert client.error(b"GET /smuggle HTTP/1.1\r\nHost: a\r\n\r\n") == (
        ErrorCode.FRAME_SIZE_ERROR,
        "frame_too_large",
    )


# -- stream errors ------------------------------------------------------------------------------


def _reset(client: Client) -> tuple[int, int]:
    (rst,) = [f for f in client.out() if f.type == RST]
    return rst.stream_id, rst.error_code


def test_data_after_the_clients_end_is_stream_closed():
    client = Client()
    client.request(1)  # END_STREAM: half-closed (remote)
    (event,) = client.send(frame(DATA, 0, 1, b"late"))
    assert event == StreamReset(1, ErrorCode.STREAM_CLOSED, False, "data_after_end")
    assert _reset(client) == (1, ErrorCode.STREAM_CLOSED)
    assert 1 not in client.core.streams


def test_data_on_a_closed_stream_is_refused_and_its_window_given_back():
    client = Client()
    client.request(1)
    client.core.send_headers(1, b"\x88", True)  # closed both ways
    client.out()
    before = client.core.recv_window
    (event,) = client.send(frame(DATA, 0, 1, b"x" * 16384))
    assert event.code == ErrorCode.STREAM_CLOSED and not event.by_peer
    frames = client.out()
    assert [(f.type, f.stream_id) for f in frames] == [(WINDOW, 0), (RST, 1)]
    assert frames[0].window_increment == 16384 and client.core.recv_window == before


def test_frames_on_a_stream_this_side_reset_are_dropped_and_the_table_kept_in_step():
    client = Client()
    client.request(1, end=False)
    assert client.core.reset(1, ErrorCode.CANCEL)
    assert _reset(client) == (1, ErrorCode.CANCEL)
    assert client.send(frame(DATA, 0, 1, b"in flight")) == []
    assert client.send(frame(WINDOW, 0, 1, u32(10))) == []
    assert client.send(frame(RST, 0, 1, u32(0))) == []
    trailers = client.encoder.encode([(b"x-new-field", b"indexed")])  # inserts in the table
    assert client.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, trailers)) == []
    assert client.out() == []
    (event,) = client.request(3, [*REQUEST, (b"x-new-field", b"indexed")])
    assert (b"x-new-field", b"indexed") in event.headers  # decoded by the same table


def test_a_malformed_request_is_a_stream_error():
    client = Client()
    (event,) = client.request(1, [*REQUEST, (b"connection", b"close")])
    assert event == StreamReset(1, ErrorCode.PROTOCOL_ERROR, False, "connection_specific_field")
    assert _reset(client) == (1, ErrorCode.PROTOCOL_ERROR)
    (event,) = client.request(3)  # the connection goes on
    assert isinstance(event, RequestReceived)


def test_content_length_must_match_the_data():
    client = Client()
    client.request(1, [*REQUEST, (b"content-length", b"3")], end=False)
    (event,) = client.send(frame(DATA, 0, 1, b"four"))
    assert event.reason == "length_mismatch"
    client.request(3, [*REQUEST, (b"content-length", b"3")], end=False)
    (event,) = client.send(frame(DATA, END_STREAM, 3, b"ab"))
    assert event.reason == "length_mismatch"
    client.request(5, [*REQUEST, (b"content-length", b"3")], end=False)
    (event,) = client.send(frame(DATA, END_STREAM, 5, b"abc"))
    assert isinstance(event, DataReceived) and event.ended


def test_a_stream_window_overrun_is_a_stream_flow_control_error():
    client = Client()
    client.core.recv_window += 65535  # as if the connection's window had been widened
    client.request(1, end=False)
    for _ in range(3):
        client.send(frame(DATA, 0, 1, b"x" * 16384))
    (event,) = client.send(frame(DATA, 0, 1, b"x" * 16384))  # 65,536 > 65,535
    assert event.code == ErrorCode.FLOW_CONTROL_ERROR and event.reason == "stream_window_exceeded"


def test_the_connection_window_overrun_ends_the_connection():
    client = Client()
    for sid in (1, 3, 5, 7, 9):
        client.request(sid, end=False)
    for sid in (1, 3, 5):
        client.send(frame(DATA, 0, sid, b"x" * 16384))
    client.send(frame(DATA, 0, 7, b"x" * 16383))  # 65,535 in all: the whole window
    assert client.error(frame(DATA, 0, 9, b"x")) == (
        ErrorCode.FLOW_CONTROL_ERROR,
        "connection_window_exceeded",
    )


def test_priority_is_ignored_and_opens_no_stream():
    client = Client()
    assert client.send(frame(PRIORITY, 0, 9, u32(1) + b"\x10")) == []
    assert client.core.streams == {} and client.core.highest_stream == 0
    (event,) = client.request(9)
    assert isinstance(event, RequestReceived)
    block = client.encoder.encode(REQUEST)
    self_dependent = u32(11) + b"\x10" + block
    (event,) = client.send(frame(HEADERS, END_HEADERS | END_STREAM | PRIO, 11, self_dependent))
    assert event == StreamReset(11, ErrorCode.PROTOCOL_ERROR, False, "self_dep")


def test_the_clients_reset_and_goaway_are_events():
    client = Client()
    client.request(1)
    (event,) = client.send(frame(RST, 0, 1, u32(ErrorCode.CANCEL)))
    assert event == StreamReset(1, ErrorCode.CANCEL, True)
    assert client.send(frame(WINDOW, 0, 1, u32(5))) == []  # late: ignored
    (event,) = client.send(frame(GOAWAY, 0, 0, u32(1) + u32(0)))
    assert event == GoAwayReceived(0, 1) and client.core.goaway_received


# -- flow control, sending ----------------------------------------------------------------------


def test_what_may_be_sent_follows_both_windows_and_the_frame_size():
    client = Client(s4=100)  # SETTINGS_INITIAL_WINDOW_SIZE
    client.request(1)
    core = client.core
    assert core.sendable(1) == 100
    core.send_data(1, b"x" * 60, False)
    assert core.sendable(1) == 40
    (event,) = client.send(frame(WINDOW, 0, 1, u32(100_000)))
    assert event == WindowUpdated(1)
    assert core.sendable(1) == 16384  # the peer's frame size
    (event,) = client.send(frame(SETTINGS, 0, 0, setting(4, 0)))  # shrinks by 100
    assert event == WindowUpdated(0) and core.send_windows[1] == 100 - 60 + 100_000 - 100
    core.send_data(1, b"x" * 16384, False)
    core.send_data(1, b"x" * 16384, False)
    core.send_data(1, b"x" * 16384, False)
    assert core.sendable(1) == 65535 - 60 - 3 * 16384  # now the connection's window
    client.send(frame(SETTINGS, 0, 0, setting(4, 0) + setting(5, 20000)))
    assert core.sendable(5) is None  # no such stream


def test_settings_may_drive_a_send_window_negative():
    client = Client()
    client.request(1)
    client.core.send_data(1, b"x" * 1000, False)
    client.send(frame(SETTINGS, 0, 0, setting(4, 10)))
    assert client.core.send_windows[1] == 10 - 1000
    assert client.core.sendable(1) == 0


def test_a_stream_window_overflow_is_a_stream_error():
    client = Client()
    client.request(1)
    (event,) = client.send(frame(WINDOW, 0, 1, u32(2**31 - 1)))
    assert event.code == ErrorCode.FLOW_CONTROL_ERROR and event.stream_id == 1
    client.request(3)
    (event,) = client.send(frame(WINDOW, 0, 3, u32(0)))
    assert event.code == ErrorCode.PROTOCOL_ERROR and event.stream_id == 3


def test_consumed_bytes_are_given_back_a_quarter_window_at_a_time():
    client = Client()
    client.request(1, end=False)
    client.send(frame(DATA, 0, 1, b"x" * 16384))
    client.core.acknowledge(1, 10000)
    assert client.out() == []
    client.core.acknowledge(1, 6384)  # 16,384 owed >= 65,535 // 4
    updates = {(f.stream_id, f.window_increment) for f in client.out()}
    assert updates == {(0, 16384), (1, 16384)}
    client.send(frame(DATA, END_STREAM, 1, b"x" * 16384))
    client.core.acknowledge(1, 16384)  # the client sends no more on it: the connection only
    assert {(f.stream_id, f.window_increment) for f in client.out()} == {(0, 16384)}


def test_a_large_header_block_goes_out_in_continuation_frames():
    data = headers_frames(1, b"\x00" * 40000, True, 16384)
    frames = sent(data)
    assert [(f.type, sorted(f.flags)) for f in frames] == [
        (HEADERS, ["END_STREAM"]),
        (CONT, []),
        (CONT, ["END_HEADERS"]),
    ]
    assert b"".join(f.data for f in frames) == b"\x00" * 40000


def test_a_whole_response_at_once_when_it_fits():
    client = Client(s4=10)  # a 10-byte stream window
    client.request(1)
    core = client.core
    assert core.respond(1, b"\x88", b"x" * 11) is False  # does not fit: nothing sent
    assert client.out() == [] and 1 in core.streams
    assert core.respond(1, b"\x88", b"x" * 10) is True
    headers, data = client.out()
    assert headers.type == HEADERS and sorted(headers.flags) == ["END_HEADERS"]
    assert data.data == b"x" * 10 and "END_STREAM" in data.flags
    assert 1 not in core.streams and core.send_window == 65535 - 10
    client.request(3)
    assert core.respond(3, b"\x88", b"") is True  # no body: HEADERS ends the stream
    (only,) = client.out()
    assert sorted(only.flags) == ["END_HEADERS", "END_STREAM"]
    assert core.respond(3, b"\x88", b"") is None  # gone


def test_nothing_is_sent_on_a_stream_that_is_gone():
    client = Client()
    client.request(1)
    assert client.core.send_headers(1, b"\x88", True)
    assert not client.core.send_headers(1, b"\x88", True)
    assert not client.core.send_data(1, b"x", True)
    assert not client.core.reset(1, ErrorCode.CANCEL)
    client.core.goaway(ErrorCode.NO_ERROR)
    frames = client.out()
    assert frames[-1].type == GOAWAY and frames[-1].last_stream_id == 1
    client.request(3)  # refused by the application, say
    client.core.goaway(ErrorCode.INTERNAL_ERROR)
    (last,) = client.out()
    assert last.last_stream_id == 1 and last.error_code == ErrorCode.INTERNAL_ERROR


# -- the frame reader ---------------------------------------------------------------------------

frames_strategy = st.lists(
    st.tuples(
        st.integers(0, 255),
        st.integers(0, 255),
        st.integers(0, 2**31 - 1),
        st.binary(max_size=300),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(frames_strategy, st.lists(st.integers(1, 400), max_size=30))
def test_the_frame_reader_cuts_any_split_of_the_bytes_into_the_same_frames(frames, cuts):
    data = b"".join(frame_header(len(p), k, f, s) + p for k, f, s, p in frames)
    reader = FrameReader(300)
    got = []
    pos = 0
    for cut in [*cuts, len(data)]:
        reader.feed(data[pos : pos + cut])
        pos += cut
        while (parsed := reader.next()) is not None:
            got.append(parsed)
        if pos >= len(data):
            break
    assert got == frames
    assert reader.buffered == 0


def test_the_frame_reader_refuses_a_large_frame_on_its_header():
    reader = FrameReader(16384)
    reader.feed(frame_header(16385, DATA, 0, 1))  # no payload yet: refused at once
    with pytest.raises(H2ConnectionError):
        reader.next()


# -- HPACK: the memo equals plain decoding -----------------------------------------------------

names = st.sampled_from(
    [b"accept", b"user-agent", b"cookie", b"x-a", b"x-b", b":path", b"accept-encoding"]
)
values = st.binary(min_size=0, max_size=20).map(lambda b: b.replace(b"\r", b"r"))
header_lists = st.lists(st.tuples(names, values, st.booleans()), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(header_lists, min_size=1, max_size=8),
    st.lists(st.integers(0, 7), max_size=20),
    st.sampled_from([None, 0, 256, 4096]),
)
def test_memoised_decoding_equals_plain_decoding(lists, repeats, table_size):
    """A client's encoder (indexing, never-indexed fields, a table size update) and its blocks
    sent again: the memoised decoder and a plain one read the same lists throughout."""
    encoder = hpack.Encoder()
    memoised = HeaderDecoder(1 << 20)
    plain = hpack.Decoder(max_header_list_size=1 << 20)
    plain.max_allowed_table_size = 4096
    sequence = [lists[i % len(lists)] for i in [*range(len(lists)), *repeats]]
    for position, fields in enumerate(sequence):
        if table_size is not None and position == 2:
            encoder.header_table_size = table_size
        encoded = [
            NeverIndexedHeaderTuple(name, value) if never else (name, value)
            for name, value, never in fields
        ]
        block = encoder.encode(encoded)
        for _ in range(2):  # the same block twice: the second may be a memo hit
            expected = tuple((bytes(n), bytes(v)) for n, v in plain.decode(block, raw=True))
            assert memoised.request(block).fields == expected
            block = encoder.encode(encoded)


@settings(max_examples=200, deadline=None)
@given(header_lists)
def test_the_scan_says_whether_a_block_changes_the_table(fields):
    """Against the decoder's table before and after: a client's first block (literals with
    indexing, or all static) and the same list again (indexed, or never-indexed literals)."""
    encoder = hpack.Encoder()
    decoder = hpack.Decoder()
    first = encoder.encode([(n, v) for n, v, _ in fields])
    again = encoder.encode(
        [NeverIndexedHeaderTuple(n, v) if never else (n, v) for n, v, never in fields]
    )
    for block in (first, again):
        before = list(decoder.header_table.dynamic_entries)
        decoded = decoder.decode(block, raw=True)
        unchanged = list(decoder.header_table.dynamic_entries) == before
        assert leaves_table_alone(block) == unchanged
        if unchanged:
            assert decoder.decode(block, raw=True) == decoded
    assert leaves_table_alone(again)


def test_the_memo_holds_only_blocks_that_leave_the_table_alone():
    decoder = HeaderDecoder(65536)
    encoder = hpack.Encoder()
    first = encoder.encode(REQUEST)  # literals with incremental indexing
    assert not leaves_table_alone(first)
    decoded = decoder.request(first)
    assert not decoded.memoised and first not in decoder.memo
    second = encoder.encode(REQUEST)  # all indexed now
    assert leaves_table_alone(second)
    again = decoder.request(second)
    assert again.memoised and decoder.request(second) is again  # the same object back
    decoder.request(encoder.encode([*REQUEST, (b"x-other", b"2")]))  # an insertion
    assert second not in decoder.memo  # cleared: an index may mean something else now


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (REQUEST, None),
        ([*REQUEST, (b"X-Upper", b"v")], "bad_field_name"),
        ([*REQUEST, (b"x-bad", b"a\r\nb")], "bad_field_value"),
        ([*REQUEST, (b"x-space", b" v")], "bad_field_value"),
        ([*REQUEST, (b"te", b"gzip")], "bad_te"),
        ([*REQUEST, (b"te", b"trailers")], None),
        ([*REQUEST, (b"upgrade", b"h2c")], "connection_specific_field"),
        ([(b"x-a", b"1"), *REQUEST], "bad_pseudo_field"),
        ([*REQUEST, (b":path", b"/again")], "bad_pseudo_field"),
        ([(b":status", b"200"), *REQUEST], "bad_pseudo_field"),
        ([(b":method", b"GET"), (b":path", b"/")], "missing_pseudo_field"),
        ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"")], "empty_path"),
        ([(b":method", b"CONNECT"), (b":authority", b"a:443")], None),
        ([*REQUEST, (b"host", b"other.test")], "authority_host_mismatch"),
        ([*REQUEST, (b"content-length", b"x")], "bad_content_length"),
        ([*REQUEST, (b"content-length", b"1"), (b"content-length", b"2")], "bad_content_length"),
    ],
)
def test_request_checks(fields, problem):
    assert request_problem(tuple(fields))[0] == problem


# -- hostile bytes ----------------------------------------------------------------------------

hostile_frames = st.lists(
    st.tuples(
        st.integers(0, 10),  # the known types and one unknown
        st.sampled_from([0, 0x1, 0x4, 0x5, 0x8, 0x20, 0x25, 0x2D, 0xFF]),
        st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1]),
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from([u32(0), u32(1), u32(2**31 - 1), b"\x82\x84\x87\x41\x01a", b""]),
        ),
    ),
    max_size=25,
)


@settings(max_examples=400, deadline=None)
@given(hostile_frames, st.integers(1, 64))
def test_any_frames_give_events_or_a_connection_error_and_nothing_else(frames, cut):
    """Whatever a client sends, the core answers with events or ``H2ConnectionError``: never
    another exception, and what it holds stays within its bounds."""
    client = Client(max_streams=4, block_limit=200)
    client.core.meter = FrameMeter(max_resets=1000, max_control=1000)
    data = b"".join(frame(k, f, s, p) for k, f, s, p in frames)
    try:
        for pos in range(0, len(data), cut):
            events = client.core.receive(data[pos : pos + cut], 0.0)
            for event in events:
                if isinstance(event, RequestReceived):  # answer some, as the edge would
                    client.core.send_headers(event.stream_id, b"\x88", event.stream_id % 3 == 0)
    except H2ConnectionError as error:
        assert isinstance(error.code, ErrorCode) and error.reason
    core = client.core
    assert len(core.streams) <= 4 and set(core.streams) == set(core.send_windows)
    assert core.reader.buffered <= 16384 + 9 + 64
    assert len(core.decoder.memo) <= core.decoder.memo.bound


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_header_block_decodes_or_is_a_compression_error(block):
    decoder = HeaderDecoder(4096)
    try:
        decoded = decoder.request(block)
    except H2ConnectionError as error:
        assert error.code in (ErrorCode.COMPRESSION_ERROR, ErrorCode.ENHANCE_YOUR_CALM)
    else:
        assert all(isinstance(n, bytes) and isinstance(v, bytes) for n, v in decoded.fields)
