"""HTTP/2 on the wire (RFC 9113 section 4 and 6): frame types, flags, error codes and settings,
the frames the edge sends, built as bytes, and ``FrameReader``, which cuts received bytes into
frames.  Pure functions and one small buffer: no state beyond it, no I/O.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9

END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY_FLAG: Final = 0x20

#: SETTINGS parameters (RFC 9113 6.5.2).
SETTING_HEADER_TABLE_SIZE: Final = 0x1
SETTING_ENABLE_PUSH: Final = 0x2
SETTING_MAX_CONCURRENT_STREAMS: Final = 0x3
SETTING_INITIAL_WINDOW_SIZE: Final = 0x4
SETTING_MAX_FRAME_SIZE: Final = 0x5
SETTING_MAX_HEADER_LIST_SIZE: Final = 0x6

#: RFC 9113 6.9.1: the largest window, and the smallest and largest frame sizes.
MAX_WINDOW: Final = 2**31 - 1
MIN_FRAME_SIZE: Final = 16384
MAX_FRAME_LIMIT: Final = 2**24 - 1
DEFAULT_WINDOW: Final = 65535


class ErrorCode(enum.IntEnum):
    """RFC 9113 7."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class H2ConnectionError(Exception):
    """A connection error (RFC 9113 5.4.1): the connection ends with GOAWAY ``code``."""

    def __init__(self, code: ErrorCode, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.code = code
        #: A short snake_case name for metrics and logs.
        self.reason = reason
        self.detail = detail


_HEADER: Final = struct.Struct(">BHBBL")
_SETTING: Final = struct.Struct(">HL")
_U32: Final = struct.Struct(">L")
_GOAWAY: Final = struct.Struct(">LL")


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    """The 9-byte frame header (RFC 9113 4.1)."""
    return _HEADER.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id)


def settings_frame(values: dict[int, int]) -> bytes:
    payload = b"".join(_SETTING.pack(key, value) for key, value in values.items())
    return frame_header(len(payload), SETTINGS, 0, 0) + payload


SETTINGS_ACK: Final = frame_header(0, SETTINGS, ACK, 0)


def ping_ack(opaque: bytes) -> bytes:
    return frame_header(8, PING, ACK, 0) + opaque


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame_header(4, RST_STREAM, 0, stream_id) + _U32.pack(code)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame_header(4, WINDOW_UPDATE, 0, stream_id) + _U32.pack(increment)


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame_header(8 + len(debug), GOAWAY, 0, 0) + _GOAWAY.pack(last_stream_id, code) + debug


def headers_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """A header block as HEADERS (and CONTINUATION frames when it exceeds ``max_frame``)."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return frame_header(len(block), HEADERS, flags | END_HEADERS, stream_id) + block
    parts = [frame_header(max_frame, HEADERS, flags, stream_id), block[:max_frame]]
    pos = max_frame
    while pos < len(block):
        piece = block[pos : pos + max_frame]
        pos += len(piece)
        last = END_HEADERS if pos >= len(block) else 0
        parts.append(frame_header(len(piece), CONTINUATION, last, stream_id))
        parts.append(piece)
    return b"".join(parts)


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    """The parameters of a SETTINGS frame's payload (its length checked by the caller)."""
    return [_SETTING.unpack_from(payload, pos) for pos in range(0, len(payload), 6)]


def read_u32(payload: bytes) -> int:
    value: int = _U32.unpack_from(payload)[0]
    return value


class FrameReader:
    """Received bytes cut into frames: ``feed`` then ``next`` until it returns None.

    A frame announcing more than ``max_frame_size`` bytes is refused on its header, before
    any of its payload is held; what is held is at most one frame plus one read."""

    __slots__ = ("_buf", "_pos", "max_frame_size")

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._buf: bytes | bytearray = b""
        self._pos = 0

    def feed(self, data: bytes) -> None:
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            self._buf = data  # the usual case: nothing left over, no copy
        elif isinstance(buf, bytearray):
            # A frame split across reads grows in place (amortised appends, never a copy
            # of the whole per read).
            if pos:
                del buf[:pos]
            buf += data
        else:
            rest = bytearray(memoryview(buf)[pos:])
            rest += data
            self._buf = rest
        self._pos = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def head(self) -> bytes:
        """What is buffered, unread (for the preface check)."""
        return bytes(self._buf[self._pos :])

    def take(self, count: int) -> bytes | None:
        """``count`` raw bytes (the preface), or None until they are all here."""
        pos = self._pos
        if len(self._buf) - pos < count:
            return None
        self._pos = pos + count
        return bytes(self._buf[pos : pos + count])

    def next(self) -> tuple[int, int, int, bytes] | None:
        """(type, flags, stream ID, payload) of the next whole frame, or None.

        Raises ``H2ConnectionError`` (FRAME_SIZE_ERROR) for a frame too large."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 9:
            return None
        high, low, kind, flags, stream_id = _HEADER.unpack_from(buf, pos)
        length = high << 16 | low
        if length > self.max_frame_size:
            raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "frame_too_large")
        end = pos + 9 + length
        if len(buf) < end:
            return None
        self._pos = end
        return kind, flags, stream_id & 0x7FFFFFFF, bytes(buf[pos + 9 : end])


__all__ = [
    "PREFACE",
    "ErrorCode",
    "FrameReader",
    "H2ConnectionError",
    "frame_header",
    "goaway",
    "headers_frames",
    "parse_settings",
    "ping_ack",
    "rst_stream",
    "settings_frame",
    "window_update",
]
