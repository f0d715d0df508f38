"""The server side of an HTTP/2 connection (RFC 9113), sans I/O: bytes in, events and bytes out.

``H2Core.receive`` cuts the client's bytes into frames (``edge.h2wire.FrameReader``), checks
them against the connection's state and returns what they mean for the application
(``RequestReceived``, ``DataReceived``, ...).  What the connection must say by itself (SETTINGS
and their ACK, PING replies, WINDOW_UPDATE, RST_STREAM for stream errors) and what the
application sends (``send_headers``, ``send_data``, ``reset``, ``goaway``) collect in
``out``; the caller writes them once per read (``take_output``).

Errors follow RFC 9113 5.4: a connection error raises ``H2ConnectionError`` (the caller sends
GOAWAY with its code and closes); a stream error resets that stream (RST_STREAM) and returns a
``StreamReset`` event with ``by_peer=False`` so the application forgets it too.

* Stream IDs: client streams are odd and increasing (5.1.1); a HEADERS frame on an even ID,
  or on an ID at or below the highest seen that is not open, is a PROTOCOL_ERROR (except on a
  stream this side reset, whose late frames are dropped: 5.1).  DATA, RST_STREAM and
  WINDOW_UPDATE on an idle stream are PROTOCOL_ERROR; on a closed one DATA is STREAM_CLOSED
  (its bytes still count against, and are given back to, the connection's window), the others
  are ignored.  Streams beyond ``max_concurrent_streams`` end the connection.
* Flow control both ways: the client's DATA against the connection's and the stream's receive
  windows (FLOW_CONTROL_ERROR past them); received bytes are credited back (WINDOW_UPDATE)
  as the application consumes them (``acknowledge``), in steps of a quarter window; what is
  sent is bounded by the peer's windows (``sendable``), which SETTINGS_INITIAL_WINDOW_SIZE and
  WINDOW_UPDATE move (overflow past 2^31-1: FLOW_CONTROL_ERROR).
* Header blocks: HEADERS plus CONTINUATION frames of the same stream and nothing between
  them, at most ``max_header_block`` bytes (else ENHANCE_YOUR_CALM), decoded by
  ``edge.h2hpack.HeaderDecoder`` (memoised); malformed requests are stream errors.
* PRIORITY is checked for size and ignored; GOAWAY from the client is an event.
* The frames that cost the server and not the client (RST_STREAM, SETTINGS, PING, PRIORITY,
  empty DATA and CONTINUATION) are counted by ``edge.h2meter.FrameMeter`` as they are read:
  past its limits, ENHANCE_YOUR_CALM (rapid reset, control floods).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from edge.h2hpack import DecodedBlock, Fields, HeaderDecoder
from edge.h2meter import FrameMeter
from edge.h2wire import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTING_ENABLE_PUSH,
    SETTING_INITIAL_WINDOW_SIZE,
    SETTING_MAX_CONCURRENT_STREAMS,
    SETTING_MAX_FRAME_SIZE,
    SETTING_MAX_HEADER_LIST_SIZE,
    SETTINGS,
    SETTINGS_ACK,
    WINDOW_UPDATE,
    ErrorCode,
    FrameReader,
    H2ConnectionError,
    frame_header,
    goaway,
    headers_frames,
    ping_ack,
    read_u32,
    rst_stream,
    settings_frame,
    window_update,
)

#: Streams this side reset whose late frames are still expected (and dropped).
RESET_MEMORY: Final = 256


@dataclass(slots=True)
class RequestReceived:
    stream_id: int
    headers: Fields
    #: The HEADERS frame carried END_STREAM: no body.
    ended: bool
    #: The decoded block (the same object while the client repeats the block).
    block: DecodedBlock


@dataclass(slots=True)
class DataReceived:
    stream_id: int
    data: bytes
    #: Bytes counted against the windows (with padding): what ``acknowledge`` gives back.
    flow_length: int
    ended: bool


@dataclass(slots=True)
class TrailersReceived:
    """The request's trailer section (its body ends; the fields are dropped)."""

    stream_id: int


@dataclass(slots=True)
class StreamReset:
    stream_id: int
    code: int
    #: True: the client's RST_STREAM; False: a stream error found here (RST_STREAM sent).
    by_peer: bool
    reason: str = ""


@dataclass(slots=True)
class WindowUpdated:
    """A send window grew (0: the connection's, or every stream's by SETTINGS)."""

    stream_id: int


@dataclass(slots=True)
class GoAwayReceived:
    code: int
    last_stream_id: int


Event = (
    RequestReceived | DataReceived | TrailersReceived | StreamReset | WindowUpdated | GoAwayReceived
)


class Stream:
    """One open stream's flow-control and end state."""

    __slots__ = ("expected", "local_open", "received", "recv_owed", "recv_window", "remote_open")

    def __init__(self, recv_window: int, remote_open: bool, expected: int) -> None:
        #: What the client may still send on the stream before our next WINDOW_UPDATE.
        self.recv_window = recv_window
        self.recv_owed = 0
        self.remote_open = remote_open
        self.local_open = True
        #: The request's Content-Length (-1: none) and the DATA bytes received so far.
        self.expected = expected
        self.received = 0


class StreamBook:
    """One connection's streams and windows, and everything sent on it: the send side of
    ``H2Core`` (RFC 9113 5.1 states kept as two flags per stream, 5.2 and 6.9 flow control)."""

    def __init__(
        self,
        *,
        max_concurrent_streams: int,
        max_header_list_size: int,
        max_frame_size: int,
        max_header_block: int,
        meter: FrameMeter | None = None,
    ) -> None:
        self.reader = FrameReader(max_frame_size)
        #: Counts the frames that cost us and not the client (None: unlimited, in tests).
        self.meter = meter
        self._now = 0.0
        self.decoder = HeaderDecoder(max_header_block)
        self.max_concurrent_streams = max_concurrent_streams
        self.max_header_block = max_header_block
        self.out: list[bytes | memoryview] = [
            settings_frame(
                {
                    SETTING_MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                    SETTING_MAX_HEADER_LIST_SIZE: max_header_list_size,
                    SETTING_MAX_FRAME_SIZE: max_frame_size,
                    SETTING_ENABLE_PUSH: 0,
                }
            )
        ]
        self.streams: dict[int, Stream] = {}
        #: Per open stream, what we may still send on it (apart from ``streams``: a
        #: SETTINGS_INITIAL_WINDOW_SIZE change moves them all, RFC 9113 6.9.2).
        self.send_windows: dict[int, int] = {}
        self.highest_stream = 0
        self._reset: dict[int, None] = {}
        #: The connection's windows: ours to send, the client's to send to us.
        self.send_window = DEFAULT_WINDOW
        self.recv_window = DEFAULT_WINDOW
        self._recv_owed = 0
        self.local_window = DEFAULT_WINDOW
        self._credit_step = DEFAULT_WINDOW // 4
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self._preface = True
        self._settings_seen = False
        #: A header block waiting for CONTINUATION: (stream, END_STREAM, bytes so far).
        self._block: bytearray | None = None
        self._block_stream = 0
        self._block_ended = False
        self.goaway_received = False
        #: The last stream ID our latest GOAWAY named (-1: none sent).
        self.goaway_sent = -1

    # -- state ---------------------------------------------------------------------------------

    def _remote_end(self, stream_id: int, stream: Stream) -> None:
        stream.remote_open = False
        if not stream.local_open:
            self._forget(stream_id)

    def _forget(self, stream_id: int) -> bool:
        self.send_windows.pop(stream_id, None)
        return self.streams.pop(stream_id, None) is not None

    def _stream_error(self, stream_id: int, code: int, reason: str, events: list[Event]) -> None:
        """RFC 9113 5.4.2: RST_STREAM, and the application told (``by_peer=False``)."""
        self._forget(stream_id)
        self._remember_reset(stream_id)
        self.out.append(rst_stream(stream_id, code))
        events.append(StreamReset(stream_id, code, False, reason))

    def _remember_reset(self, stream_id: int) -> None:
        reset = self._reset
        if len(reset) >= RESET_MEMORY:
            del reset[next(iter(reset))]
        reset[stream_id] = None

    def _credit(self, stream_id: int, length: int) -> None:
        """Give ``length`` received bytes back: to the connection, and to the stream while
        the client may still send on it; WINDOW_UPDATE once a quarter window is owed."""
        step = self._credit_step
        owed = self._recv_owed + length
        if owed >= step:
            self.out.append(window_update(0, owed))
            self.recv_window += owed
            owed = 0
        self._recv_owed = owed
        stream = self.streams.get(stream_id) if stream_id else None
        if stream is not None and stream.remote_open:
            stream.recv_owed += length
            if stream.recv_owed >= step:
                self.out.append(window_update(stream_id, stream.recv_owed))
                stream.recv_window += stream.recv_owed
                stream.recv_owed = 0

    # -- sending -------------------------------------------------------------------------------

    def acknowledge(self, stream_id: int, length: int) -> None:
        """The application consumed ``length`` flow-controlled bytes of ``stream_id``."""
        if length:
            self._credit(stream_id, length)

    def sendable(self, stream_id: int) -> int | None:
        """Bytes of DATA that may go out on the stream now (None: it cannot send at all).
        Windows may be negative (SETTINGS can shrink them, RFC 9113 6.9.2): 0 then."""
        window = self.send_windows.get(stream_id)
        stream = self.streams.get(stream_id)
        if window is None or stream is None or not stream.local_open:
            return None
        return max(0, min(window, self.send_window, self.peer_max_frame))

    def send_headers(self, stream_id: int, block: bytes, end_stream: bool) -> bool:
        """A response's HEADERS (``block``: HPACK without indexing); False if the stream is
        gone."""
        stream = self.streams.get(stream_id)
        if stream is None or not stream.local_open:
            return False
        self.out.append(headers_frames(stream_id, block, end_stream, self.peer_max_frame))
        if end_stream:
            self._local_end(stream_id, stream)
        return True

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool) -> bool:
        """One DATA frame, within ``sendable``; False if the stream is gone."""
        stream = self.streams.get(stream_id)
        if stream is None or not stream.local_open:
            return False
        length = len(data)
        self.send_windows[stream_id] -= length
        self.send_window -= length
        out = self.out
        out.append(frame_header(length, DATA, END_STREAM if end_stream else 0, stream_id))
        if length:
            out.append(data)
        if end_stream:
            self._local_end(stream_id, stream)
        return True

    def respond(self, stream_id: int, block: bytes, body: bytes | memoryview) -> bool | None:
        """A whole response at once: HEADERS, then the body as one DATA frame ending the
        stream (HEADERS ends it when there is no body).  False: the body does not fit the
        windows or the frame size now (nothing sent); None: the stream cannot send."""
        stream = self.streams.get(stream_id)
        if stream is None or not stream.local_open:
            return None
        length = len(body)
        max_frame = self.peer_max_frame
        out = self.out
        if length:
            window = self.send_windows[stream_id]
            if length > window or length > self.send_window or length > max_frame:
                return False
            self.send_windows[stream_id] = window - length
            self.send_window -= length
            out.append(headers_frames(stream_id, block, False, max_frame))
            out.append(frame_header(length, DATA, END_STREAM, stream_id))
            out.append(body)
        else:
            out.append(headers_frames(stream_id, block, True, max_frame))
        stream.local_open = False
        if not stream.remote_open:
            self._forget(stream_id)
        return True

    def _local_end(self, stream_id: int, stream: Stream) -> None:
        stream.local_open = False
        if not stream.remote_open:
            self._forget(stream_id)

    def reset(self, stream_id: int, code: int) -> bool:
        """RST_STREAM for a stream still open; False (nothing sent) otherwise."""
        if not self._forget(stream_id):
            return False
        self._remember_reset(stream_id)
        self.out.append(rst_stream(stream_id, code))
        return True

    def goaway(self, code: int, last_stream_id: int | None = None) -> None:
        """GOAWAY: streams above ``last_stream_id`` (default: the highest seen) were not and
        will not be processed.  A later GOAWAY never names a higher stream (RFC 9113 6.8)."""
        last = self.highest_stream if last_stream_id is None else last_stream_id
        if self.goaway_sent >= 0:
            last = min(last, self.goaway_sent)
        self.goaway_sent = last
        self.out.append(goaway(last, code))

    def take_output(self) -> bytes:
        out = self.out
        if not out:
            return b""
        data = b"".join(out) if len(out) > 1 else bytes(out[0])
        out.clear()
        return data


class H2Core(StreamBook):
    """One server connection's HTTP/2 state: ``receive`` is its receive side."""

    # -- receiving -----------------------------------------------------------------------------

    def receive(self, data: bytes, now: float = 0.0) -> list[Event]:
        """The events ``data`` completes (``now``: the clock, for the frame meter).  Raises
        ``H2ConnectionError``."""
        self._now = now
        reader = self.reader
        reader.feed(data)
        events: list[Event] = []
        if self._preface:
            preface = reader.take(len(PREFACE))
            if preface is None:
                if not PREFACE.startswith(reader.head()):
                    raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad_preface")
                return events
            if preface != PREFACE:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad_preface")
            self._preface = False
        while (frame := reader.next()) is not None:
            kind, flags, stream_id, payload = frame
            if self._block is not None and kind != CONTINUATION:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "expected_continuation")
            if not self._settings_seen:
                if kind != SETTINGS or flags & ACK:
                    raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "preface_without_settings")
                self._settings_seen = True
            if kind == HEADERS:
                self._headers(flags, stream_id, payload, events)
            elif kind == DATA:
                if not payload and not flags & END_STREAM:
                    self._meter(kind)
                self._data(flags, stream_id, payload, events)
            elif kind == WINDOW_UPDATE:
                self._window_update(stream_id, payload, events)
            elif kind == SETTINGS:
                if not flags & ACK:
                    self._meter(kind)
                self._settings(flags, stream_id, payload, events)
            elif kind == PING:
                if not flags & ACK:
                    self._meter(kind)
                if stream_id:
                    raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "ping_on_stream")
                if len(payload) != 8:
                    raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "bad_ping")
                if not flags & ACK:
                    self.out.append(ping_ack(payload))
            elif kind == RST_STREAM:
                self._meter(kind)
                self._rst_stream(stream_id, payload, events)
            elif kind == PRIORITY:
                self._meter(kind)
                self._priority(stream_id, payload, events)
            elif kind == CONTINUATION:
                if not payload:
                    self._meter(kind)
                self._continuation(flags, stream_id, payload, events)
            elif kind == GOAWAY:
                if stream_id:
                    raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "goaway_on_stream")
                if len(payload) < 8:
                    raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "bad_goaway")
                self.goaway_received = True
                last = read_u32(payload) & 0x7FFFFFFF
                events.append(GoAwayReceived(read_u32(payload[4:8]), last))
            elif kind == PUSH_PROMISE:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "push_promise_from_client")
            # Other types: extensions, ignored (RFC 9113 5.5).
        return events

    def _meter(self, kind: int) -> None:
        meter = self.meter
        if meter is not None:
            verdict = meter.frame(kind, self._now)
            if verdict is not None:
                raise H2ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, verdict)

    def _headers(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id & 1:  # zero, or a server's even ID
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad_stream_id")
        block = _unpad(flags, payload)
        self_dependent = False
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "short_headers")
            self_dependent = read_u32(block) & 0x7FFFFFFF == stream_id
            block = block[5:]
        if not flags & END_HEADERS:
            if len(block) > self.max_header_block:
                raise H2ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "header_block_too_large")
            self._block = bytearray(block)
            self._block_stream = stream_id
            self._block_ended = bool(flags & END_STREAM)
            return
        self._header_block(stream_id, block, bool(flags & END_STREAM), events, self_dependent)

    def _continuation(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        block = self._block
        if block is None or stream_id != self._block_stream:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "unexpected_continuation")
        block += payload
        if len(block) > self.max_header_block:
            raise H2ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "header_block_too_large")
        if flags & END_HEADERS:
            self._block = None
            self._header_block(stream_id, bytes(block), self._block_ended, events, False)

    def _header_block(
        self, stream_id: int, block: bytes, ended: bool, events: list[Event], self_dep: bool
    ) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers
            _, problem = self.decoder.trailers(block)
            if not stream.remote_open:
                self._stream_error(stream_id, ErrorCode.STREAM_CLOSED, "headers_after_end", events)
            elif not ended or problem is not None or self_dep:
                self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, "bad_trailers", events)
            elif stream.expected >= 0 and stream.received != stream.expected:
                self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, "length_mismatch", events)
            else:
                self._remote_end(stream_id, stream)
                events.append(TrailersReceived(stream_id))
            return
        if stream_id <= self.highest_stream:
            if stream_id in self._reset:
                self.decoder.trailers(block)  # kept in step with the client's table
                return
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "stream_id_not_increasing")
        self.highest_stream = stream_id
        decoded = self.decoder.request(block)
        if len(self.streams) >= self.max_concurrent_streams:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "too_many_streams")
        problem = decoded.problem
        if problem is not None or self_dep:
            self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, problem or "self_dep", events)
            return
        expected = decoded.expected
        if ended and expected > 0:
            self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, "length_mismatch", events)
            return
        self.streams[stream_id] = Stream(self.local_window, not ended, expected)
        self.send_windows[stream_id] = self.peer_initial_window
        events.append(RequestReceived(stream_id, decoded.fields, ended, decoded))

    def _data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        length = len(payload)
        self.recv_window -= length
        if self.recv_window < 0:
            raise H2ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection_window_exceeded")
        data = _unpad(flags, payload) if flags & PADDED else payload
        stream = self.streams.get(stream_id)
        problem = ""
        code = ErrorCode.STREAM_CLOSED
        ended = bool(flags & END_STREAM)
        if stream is None:
            if not stream_id & 1 or stream_id > self.highest_stream:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "data_on_idle_stream")
            self._credit(0, length)
            if stream_id not in self._reset:
                self._stream_error(stream_id, code, "data_on_closed_stream", events)
            return
        if not stream.remote_open:
            problem = "data_after_end"
        else:
            stream.recv_window -= length
            stream.received += len(data)
            if stream.recv_window < 0:
                code, problem = ErrorCode.FLOW_CONTROL_ERROR, "stream_window_exceeded"
            elif stream.expected >= 0 and (
                stream.received > stream.expected or (ended and stream.received < stream.expected)
            ):
                code, problem = ErrorCode.PROTOCOL_ERROR, "length_mismatch"
        if problem:
            self._credit(0, length)
            self._stream_error(stream_id, code, problem, events)
            return
        if ended:
            self._remote_end(stream_id, stream)
        events.append(DataReceived(stream_id, data, length, ended))

    def _window_update(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "bad_window_update")
        increment = read_u32(payload) & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "zero_window_increment")
            self.send_window += increment
            if self.send_window > 2**31 - 1:
                raise H2ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "window_overflow")
            events.append(WindowUpdated(0))
            return
        window = self.send_windows.get(stream_id)
        if window is None:
            if not stream_id & 1 or stream_id > self.highest_stream:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "window_update_on_idle_stream")
            return  # a closed stream: ignored (RFC 9113 6.9)
        if not increment:
            self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, "zero_increment", events)
        elif window + increment > 2**31 - 1:
            self._stream_error(stream_id, ErrorCode.FLOW_CONTROL_ERROR, "window_overflow", events)
        else:
            self.send_windows[stream_id] = window + increment
            events.append(WindowUpdated(stream_id))

    def _settings(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "settings_on_stream")
        if flags & ACK:
            if payload:
                raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "settings_ack_with_payload")
            return
        window, frame_size = apply_settings(payload, self.peer_initial_window, self.peer_max_frame)
        self.peer_max_frame = frame_size
        delta = window - self.peer_initial_window
        if delta:
            self.peer_initial_window = window
            windows = self.send_windows
            for sid, value in windows.items():
                if value + delta > 2**31 - 1:
                    raise H2ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "window_overflow")
                windows[sid] = value + delta
            events.append(WindowUpdated(0))
        self.out.append(SETTINGS_ACK)

    def _rst_stream(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "bad_rst_stream")
        if not stream_id & 1 or stream_id > self.highest_stream:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "rst_stream_on_idle_stream")
        if self._forget(stream_id):
            events.append(StreamReset(stream_id, read_u32(payload), True))

    def _priority(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "priority_on_connection")
        if len(payload) != 5:
            self._stream_error(stream_id, ErrorCode.FRAME_SIZE_ERROR, "bad_priority", events)
        elif read_u32(payload) & 0x7FFFFFFF == stream_id and stream_id in self.streams:
            self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, "self_dependency", events)


def apply_settings(payload: bytes, window: int, frame_size: int) -> tuple[int, int]:
    """The peer's initial window and frame size after a SETTINGS frame's ``payload``.
    Raises ``H2ConnectionError`` for a bad frame or value (RFC 9113 6.5.2)."""
    if len(payload) % 6:
        raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "bad_settings_length")
    for pos in range(0, len(payload), 6):
        key = payload[pos] << 8 | payload[pos + 1]
        value = read_u32(payload[pos + 2 : pos + 6])
        if key == SETTING_INITIAL_WINDOW_SIZE:
            if value > 2**31 - 1:
                raise H2ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "bad_initial_window")
            window = value
        elif key == SETTING_MAX_FRAME_SIZE:
            if not 16384 <= value <= 2**24 - 1:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad_max_frame_size")
            frame_size = value
        elif key == SETTING_ENABLE_PUSH and value > 1:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad_enable_push")
    return window, frame_size


def _unpad(flags: int, payload: bytes) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload:
        raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "short_padded_frame")
    pad = payload[0]
    if pad >= len(payload):
        raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad_padding")
    return payload[1 : len(payload) - pad]


__all__ = [
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "H2Core",
    "RequestReceived",
    "StreamReset",
    "TrailersReceived",
    "WindowUpdated",
]
