"""What an HTTP/2 client may send per second: the frames that cost the server and not the client.

``FrameMeter`` is told of each such frame by the connection core (``edge.h2core``, which
reads every frame header once) and names the first limit broken:

* ``rapid_reset``: more than ``max_resets`` RST_STREAM frames in one second (CVE-2023-44487:
  streams opened and cancelled at once cost the server their work, not the client);
* ``control_flood``: more than ``max_control`` SETTINGS, PING, PRIORITY, zero-length
  CONTINUATION or empty DATA frames without END_STREAM in one second (each costs the server a
  reply or a wake-up, the client nothing).  ACKs are not counted: they answer the server.

The core answers a verdict with GOAWAY ENHANCE_YOUR_CALM.  The other limits of the attacks
list are the core's own: a header block larger than its cap before END_HEADERS (the 2024
CONTINUATION flood: ``header_block_too_large``), a frame header announcing more than
SETTINGS_MAX_FRAME_SIZE (``frame_too_large``, judged on the 9-byte header before any payload
is held, so the HTTP/1.1 bytes after an h2c preface are refused at once), an HPACK bomb
(``hpack_bomb``: the decoded list's size, bounded while decoding).

Sans-I/O: a frame and a clock reading in, a reason (or None) out.
"""

from __future__ import annotations

from typing import Final

from edge.h2wire import PREFACE, RST_STREAM

_RST_STREAM: Final = RST_STREAM


class FrameMeter:
    """The costly frames of one client connection, counted per one-second window."""

    __slots__ = ("_control", "_resets", "_window_start", "max_control", "max_resets")

    def __init__(self, *, max_resets: int, max_control: int) -> None:
        self.max_resets = max_resets
        self.max_control = max_control
        self._window_start = 0.0
        self._resets = 0
        self._control = 0

    def frame(self, kind: int, now: float) -> str | None:
        """Account one RST_STREAM or control frame (the core decides which are); the limit it
        breaks, else None."""
        if now - self._window_start >= 1.0:
            self._window_start = now
            self._resets = 0
            self._control = 0
        if kind == _RST_STREAM:
            self._resets += 1
            if self._resets > self.max_resets:
                return "rapid_reset"
            return None
        self._control += 1
        if self._control > self.max_control:
            return "control_flood"
        return None


__all__ = ["PREFACE", "FrameMeter"]
