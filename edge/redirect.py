"""The optional plaintext listener that sends every request to HTTPS (``edge.tls.redirect``).

One response per connection: ``308 Permanent Redirect`` (the method and body are kept on the
way to HTTPS) to ``https://HOST[:PORT]/target``, then close.  The request head is read up to
``edge.limits`` sizes within ``edge.timeouts.client_header``; its target and Host go through
the same decision as every request (``edge.request_target.decide_target``), so a redirect never
carries a header-injected or malformed location: anything else is a 400 and close.  A body is
never read.  ``redirect_location`` is pure.
"""

from __future__ import annotations

import asyncio
import re
from typing import cast

from edge.http1 import RequestRejected, reason_phrase
from edge.request_target import decide_target

#: A field name (RFC 9110 token).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Request lines this listener answers (anything else: 400).
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")


def redirect_location(head: bytes, https_port: int) -> bytes:
    """The ``Location`` for a request head (request line and fields, without the final blank
    line); raises ``RequestRejected`` for a head that is not a plain HTTP/1.x request."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in _VERSIONS or not parts[0].isalpha():
        raise RequestRejected(400, "bad_request_line")
    host: bytes | None = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise RequestRejected(400, "bad_header")
        if name.lower() == b"host":
            if host is not None:
                raise RequestRejected(400, "duplicate_host")
            host = value.strip()
    version = "1.1" if parts[2] == b"HTTP/1.1" else "1.0"
    decided = decide_target(parts[1], host, version)
    if decided.host is None:
        raise RequestRejected(400, "missing_host")
    name = _without_port(decided.host)
    port = b"" if https_port == 443 else b":%d" % https_port
    return b"https://" + name + port + decided.target


def _without_port(host: bytes) -> bytes:
    if host.startswith(b"["):
        return host[: host.index(b"]") + 1]
    name, colon, port = host.rpartition(b":")
    return name if colon and port.isdigit() else host


class RedirectProtocol(asyncio.Protocol):
    """One plaintext connection: read a head, answer 308 (or 400), close."""

    __slots__ = ("_buffer", "_https_port", "_max_head", "_timer", "_timer_seconds", "_transport")

    def __init__(self, https_port: int, max_head: int, timeout: float) -> None:
        self._https_port = https_port
        self._max_head = max_head
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_seconds = timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._timer_seconds, self._transport.close)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > self._max_head:
                self._answer(431, [])
            return
        try:
            location = redirect_location(self._buffer[:end], self._https_port)
        except RequestRejected as rejected:
            self._answer(rejected.status, [])
            return
        self._answer(308, [(b"Location", location)])

    def _answer(self, status: int, fields: list[tuple[bytes, bytes]]) -> None:
        transport = self._transport
        if transport is None:
            return
        head = b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))
        for name, value in fields:
            head += name + b": " + value + b"\r\n"
        transport.write(head + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None


__all__ = ["RedirectProtocol", "redirect_location"]
