"""What an HTTP/2 client may send per second and per header block: judged on raw frame headers.

``FrameMeter`` reads the 9-byte frame headers of the bytes a client sends (before the ``h2``
library parses them, payloads skipped unread) and names the first limit they break:

* ``rapid_reset``: more than ``max_resets`` RST_STREAM frames in one second (CVE-2023-44487:
  streams opened and cancelled at once cost the server their work, not the client);
* ``control_flood``: more than ``max_control`` SETTINGS, PING, PRIORITY, zero-length
  CONTINUATION or empty DATA frames without END_STREAM in one second (each costs the server a
  reply or a wake-up, the client nothing);
* ``header_block_too_large``: a header block (HEADERS or PUSH_PROMISE plus CONTINUATION frames)
  larger than ``max_header_block`` bytes before END_HEADERS (the 2024 CONTINUATION flood: a
  block that never ends, buffered by the server until memory runs out);
* ``frame_too_large``: a frame header announcing more than ``max_frame_size`` bytes (RFC 9113
  4.2: FRAME_SIZE_ERROR).  Judged on the header: the ``h2`` library checks only once the
  whole frame is buffered, so a client announcing 16 MiB made the edge hold up to that much
  per connection (and the HTTP/1.1 bytes after an h2c preface were waited on, not refused).

Sans-I/O: bytes and a clock reading in, a reason (or None) out; the protocol decides what to
do (``GOAWAY ENHANCE_YOUR_CALM`` and close).
"""

from __future__ import annotations

from typing import Final

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_DATA: Final = 0x0
_HEADERS: Final = 0x1
_PRIORITY: Final = 0x2
_RST_STREAM: Final = 0x3
_SETTINGS: Final = 0x4
_PUSH_PROMISE: Final = 0x5
_PING: Final = 0x6
_CONTINUATION: Final = 0x9
_END_STREAM: Final = 0x1
_ACK: Final = 0x1
_END_HEADERS: Final = 0x4


class FrameMeter:
    """Frame headers of one client connection, against per-second and per-block limits."""

    __slots__ = (
        "_block",
        "_control",
        "_header",
        "_resets",
        "_skip",
        "_window_start",
        "max_control",
        "max_frame_size",
        "max_header_block",
        "max_resets",
    )

    def __init__(
        self,
        *,
        max_resets: int,
        max_control: int,
        max_header_block: int,
        max_frame_size: int = 16384,
        preface: bool = True,
    ) -> None:
        self.max_frame_size = max_frame_size
        self.max_resets = max_resets
        self.max_control = max_control
        self.max_header_block = max_header_block
        #: Bytes still to skip: the rest of the client preface, or of a frame's payload.
        self._skip = len(PREFACE) if preface else 0
        #: A frame header split across reads.
        self._header = b""
        #: Bytes of the header block being received (-1: none open).
        self._block = -1
        self._window_start = 0.0
        self._resets = 0
        self._control = 0

    def feed(self, data: bytes, now: float) -> str | None:
        """Account the frames in ``data``; the first limit broken, else None."""
        pos = 0
        end = len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            need = 9 - len(self._header)
            header = self._header + data[pos : pos + need]
            pos += len(header) - len(self._header)
            if len(header) < 9:
                self._header = header
                return None
            self._header = b""
            length = int.from_bytes(header[0:3], "big")
            if length > self.max_frame_size:
                return "frame_too_large"
            kind = header[3]
            flags = header[4]
            self._skip = length
            verdict = self._frame(kind, flags, length, now)
            if verdict is not None:
                return verdict
        return None

    def _frame(self, kind: int, flags: int, length: int, now: float) -> str | None:
        if now - self._window_start >= 1.0:
            self._window_start = now
            self._resets = 0
            self._control = 0
        control = False
        if kind in (_HEADERS, _PUSH_PROMISE):
            if flags & _END_HEADERS:
                self._block = -1
            else:
                self._block = length
        elif kind == _CONTINUATION:
            if self._block >= 0:
                self._block += length
                if flags & _END_HEADERS:
                    self._block = -1
            control = length == 0
        elif kind == _RST_STREAM:
            self._resets += 1
            if self._resets > self.max_resets:
                return "rapid_reset"
        elif kind in (_SETTINGS, _PING):
            control = not flags & _ACK
        elif kind == _PRIORITY:
            control = True
        elif kind == _DATA:
            control = length == 0 and not flags & _END_STREAM
        if self._block > self.max_header_block:
            return "header_block_too_large"
        if control:
            self._control += 1
            if self._control > self.max_control:
                return "control_flood"
        return None


__all__ = ["PREFACE", "FrameMeter"]
