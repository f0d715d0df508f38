"""WebSocket framing for edge-terminated streams (RFC 6455), with no I/O.

Server frames are unmasked, so a message is framed once (``text_frame``) and the same bytes
are written to every subscriber.  Client frames are parsed by ``ClientFrames``: every client
frame must be masked, carry no RSV bit (no extension is negotiated), and stay under the
message bound; control frames are at most 125 bytes and never fragmented.  A violation ends
the session with the close code RFC 6455 section 7.4.1 assigns to it.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from typing import Final, NamedTuple

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED: Final = 1003
CLOSE_INVALID_DATA: Final = 1007
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_SERVICE_RESTART: Final = 1012
CLOSE_TRY_AGAIN_LATER: Final = 1013

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: What a subscriber is sent: WebSocket frames, the same with permessage-deflate, or
#: Server-Sent Events.  Each kind of subscriber shares one copy of a message's bytes.
PLAIN: Final = 0
DEFLATE: Final = 1
EVENTS: Final = 2
KINDS: Final = 3
#: Payloads below this are sent uncompressed to permessage-deflate clients too (the same
#: bytes as the plain frame: a compressed message may be a plain one, RFC 7692 section 6).
DEFLATE_MIN: Final = 200
DEFLATE_LEVEL: Final = 6
_SYNC_TAIL: Final = b"\x00\x00\xff\xff"


def accept_key(key: bytes) -> bytes | None:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``, or None when the key is
    not the base64 of 16 bytes (RFC 6455 section 4.2.1)."""
    try:
        if len(base64.b64decode(key.strip(), validate=True)) != 16:
            return None
    except ValueError:
        return None
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, size) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, size) + payload


def text_frame(payload: bytes) -> bytes:
    return frame(OP_TEXT, payload)


def deflate_frame(payload: bytes) -> bytes:
    """A text message compressed with permessage-deflate and no context takeover (RFC 7692):
    the same bytes suit every client that negotiated it, so it is compressed once."""
    if len(payload) < DEFLATE_MIN:
        return text_frame(payload)
    compressor = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -15)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    data = data.removesuffix(_SYNC_TAIL)
    framed = frame(OP_TEXT, data)
    return bytes((framed[0] | 0x40,)) + framed[1:]  # RSV1: compressed


def data_frame(kind: int, payload: bytes, seq: int) -> bytes:
    """An upstream message for subscribers of ``kind``."""
    if kind == PLAIN:
        return text_frame(payload)
    if kind == DEFLATE:
        return deflate_frame(payload)
    return sse_event(payload, event_id=seq)


def negotiate_deflate(offers: bytes | None) -> bytes | None:
    """The ``Sec-WebSocket-Extensions`` answer to a client's offers: permessage-deflate with
    ``server_no_context_takeover`` (every message compressed alone, so once for everyone),
    or None.  An offer that limits the server's window below 15 bits, or has a parameter
    not known here, is declined (the next offer is considered)."""
    if not offers or len(offers) > 1024:
        return None
    for offer in offers.split(b","):
        params = [p.strip() for p in offer.split(b";")]
        if params[0].lower() != b"permessage-deflate":
            continue
        acceptable, client_reset = True, False
        for param in params[1:]:
            name, _, value = param.partition(b"=")
            name, value = name.strip().lower(), value.strip().strip(b'"')
            if name == b"server_no_context_takeover" and not value:
                continue
            if name == b"client_no_context_takeover" and not value:
                client_reset = True
            elif name == b"server_max_window_bits" and value == b"15":
                continue
            elif name == b"client_max_window_bits" and (not value or value.isdigit()):
                continue  # the client may use any window: inflating with 15 bits reads it
            else:
                acceptable = False
        if acceptable:
            answer = b"permessage-deflate; server_no_context_takeover"
            return answer + (b"; client_no_context_takeover" if client_reset else b"")
    return None


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit a control frame (123 bytes of UTF-8)."""
    data = reason.encode()[:123].decode("utf-8", "ignore").encode()
    return frame(OP_CLOSE, struct.pack("!H", code) + data)


class ClientFrame(NamedTuple):
    opcode: int
    payload: bytes


class FrameError(Exception):
    """The client broke the protocol: the session closes with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _unmask(mask: bytes, data: bytes) -> bytes:
    size = len(data)
    if not size:
        return data
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(size, "big")


class ClientFrames:
    """Parses masked client frames into whole messages and control frames.

    At most ``max_message`` payload bytes are buffered (plus one frame header); a fragmented
    message is reassembled up to the same bound."""

    __slots__ = (
        "_buffer",
        "_compressed",
        "_fragments",
        "_fragments_size",
        "_inflate",
        "_opcode",
        "deflate",
        "max_message",
    )

    def __init__(self, max_message: int, *, deflate: bool = False) -> None:
        self.max_message = max_message
        #: permessage-deflate was negotiated: RSV1 marks a compressed message.
        self.deflate = deflate
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._fragments_size = 0
        self._opcode = -1
        self._compressed = False
        #: Made at the first compressed message (the client may keep its context).
        self._inflate: zlib._Decompress | None = None

    def feed(self, data: bytes) -> list[ClientFrame]:
        """The complete messages and control frames in ``data``; raises ``FrameError``."""
        buffer = self._buffer
        buffer += data
        out: list[ClientFrame] = []
        while True:
            if len(buffer) < 2:
                break
            first, second = buffer[0], buffer[1]
            rsv1 = first & 0x40
            if first & 0x30 or (rsv1 and not self.deflate):
                raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
            if not second & 0x80:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
            fin, opcode, size = first & 0x80, first & 0x0F, second & 0x7F
            offset = 2
            if size == 126:
                if len(buffer) < 4:
                    break
                size = int.from_bytes(buffer[2:4], "big")
                offset = 4
            elif size == 127:
                if len(buffer) < 10:
                    break
                size = int.from_bytes(buffer[2:10], "big")
                offset = 10
            if opcode >= 0x8:
                if size > 125 or not fin:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "bad control frame")
            elif size + self._fragments_size > self.max_message:
                raise FrameError(CLOSE_TOO_BIG, "message too big")
            if len(buffer) < offset + 4 + size:
                break
            mask = bytes(buffer[offset : offset + 4])
            payload = _unmask(mask, bytes(buffer[offset + 4 : offset + 4 + size]))
            del buffer[: offset + 4 + size]
            if opcode >= 0x8:
                if opcode not in (OP_CLOSE, OP_PING, OP_PONG) or rsv1:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "bad control frame")
                out.append(ClientFrame(opcode, payload))
                continue
            if opcode == OP_CONTINUATION:
                if self._opcode < 0 or rsv1:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "bad continuation")
            elif opcode in (OP_TEXT, OP_BINARY):
                if self._opcode >= 0:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                self._opcode = opcode
                self._compressed = bool(rsv1)
            else:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "unknown opcode")
            self._fragments.append(payload)
            self._fragments_size += size
            if fin:
                message = b"".join(self._fragments)
                if self._compressed:
                    message = self._inflated(message)
                out.append(ClientFrame(self._opcode, message))
                self._fragments.clear()
                self._fragments_size = 0
                self._opcode = -1
        return out

    def _inflated(self, data: bytes) -> bytes:
        """A compressed message's text, at most ``max_message`` bytes of it (a bomb stops
        there: the output is bounded, not the input's promise)."""
        if self._inflate is None:
            self._inflate = zlib.decompressobj(-15)
        try:
            text = self._inflate.decompress(data + _SYNC_TAIL, self.max_message + 1)
        except zlib.error:
            raise FrameError(CLOSE_INVALID_DATA, "bad deflate data") from None
        if len(text) > self.max_message or self._inflate.unconsumed_tail:
            raise FrameError(CLOSE_TOO_BIG, "message too big")
        return text


def sse_event(data: bytes, *, event: str | None = None, event_id: int | None = None) -> bytes:
    """One Server-Sent Event as an HTTP/1.1 chunk (``edge.streams.sse``): a line break in
    ``data`` (whitespace between JSON tokens) starts another ``data:`` line, as the format
    requires, so no payload can forge an event."""
    if b"\n" in data or b"\r" in data:
        data = b"\ndata: ".join(data.splitlines())
    head = b""
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    if event_id is not None:
        head += b"id: %d\n" % event_id
    body = head + b"data: " + data + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(body), body)


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame's payload (1005: none given)."""
    if len(payload) < 2:
        return 1005, ""
    code = int.from_bytes(payload[:2], "big")
    return code, payload[2:].decode("utf-8", "replace")
