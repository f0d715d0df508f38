"""DNS over TCP framing (RFC 7766 section 8) with a deadline per whole message.  Pure: the
caller feeds bytes and passes ``now``; the asyncio protocol in ``server.py`` does the I/O.

The deadline is set when the connection opens and each time a whole message has been taken
out, never by a byte arriving: a client has ``timeout`` seconds to deliver each complete
message (two length octets and the message), so a connection that trickles a byte at a time
is closed like an idle one instead of living for ever (the slowloris of DNS)."""

from __future__ import annotations

#: The most a message can be: two length octets and 65535 octets.
MAX_FRAME = 2 + 65535


class MessageFramer:
    __slots__ = ("_buffer", "deadline", "timeout")

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout
        #: When the message being received must be complete.
        self.deadline = now + timeout
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        """Bytes as received (any split).  The deadline does not move."""
        self._buffer += data

    def ready(self) -> bool:
        """A whole message is buffered."""
        buffer = self._buffer
        return len(buffer) >= 2 and len(buffer) >= 2 + ((buffer[0] << 8) | buffer[1])

    def pop(self, now: float) -> bytes:
        """The next whole message (call only when :meth:`ready`); the next one is due
        ``timeout`` from now."""
        buffer = self._buffer
        end = 2 + ((buffer[0] << 8) | buffer[1])
        message = bytes(buffer[2:end])
        del buffer[:end]
        self.deadline = now + self.timeout
        return message

    def expired(self, now: float) -> bool:
        """The message being received is overdue (a whole one waiting to be taken never is)."""
        return now >= self.deadline and not self.ready()

    @property
    def buffered(self) -> int:
        return len(self._buffer)
