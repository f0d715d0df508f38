"""HTTP/1.1 framing, limits and header rules for the proxy (RFC 9110 / RFC 9112).

Everything here is pure: bytes and header lists in, decisions and bytes out.  httptools (llhttp,
strict mode) already rejects most ambiguous framing before we see it -- Content-Length together
with Transfer-Encoding, duplicate Content-Length (even equal values), lists in Content-Length,
obs-fold continuation lines, invalid or overflowing chunk sizes, bare LF line endings (rejected,
not tolerated) and unknown transfer codings.  ``check_request_framing`` repeats the checks that
matter for smuggling so they hold even if the parser's leniency changes, and adds the ones
llhttp lets through (``Transfer-Encoding: gzip, chunked``, Transfer-Encoding on HTTP/1.0).
``ChunkedScanner`` judges what llhttp accepts but cannot report in time (a 2^64-1 chunk
size, trailer fields) on the raw bytes, before the parser passes body bytes on.  What the
request-target, Host and forwarded headers become is decided in ``edge.request_target``.

Headers travel as ``list[tuple[bytes, bytes]]`` with lower-cased names, values untouched.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from http import HTTPStatus
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Final, NamedTuple

from edge.errors import EdgeError
from meridian.config import EdgeLimits

Headers = list[tuple[bytes, bytes]]

#: Headers that describe one connection, never forwarded (RFC 9110 7.6.1), plus the
#: ``Proxy-*`` family (credentials and hints meant for this hop, and httpoxy's ``Proxy``).
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"


class BodyKind(Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    #: Response bodies only: delimited by the server closing the connection.
    UNTIL_CLOSE = "until_close"


class BodyFraming(NamedTuple):
    """How a body is delimited (a NamedTuple: one is made per response with a length)."""

    kind: BodyKind
    length: int = 0

    @property
    def has_body(self) -> bool:
        return self.kind is not BodyKind.NONE and not (
            self.kind is BodyKind.LENGTH and self.length == 0
        )


NO_BODY = BodyFraming(BodyKind.NONE)
CHUNKED = BodyFraming(BodyKind.CHUNKED)


class RequestRejected(EdgeError):
    """A request answered by the edge itself and never forwarded; the connection is closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Limits checked while the head is still arriving (the protocol calls these from its callbacks)


def check_url_length(length: int, limits: EdgeLimits) -> None:
    if length > limits.max_url:
        raise RequestRejected(414, "url_too_long")


def check_header_section(count: int, size: int, limits: EdgeLimits) -> None:
    if count > limits.max_headers:
        raise RequestRejected(431, "too_many_headers")
    if size > limits.max_header_bytes:
        raise RequestRejected(431, "headers_too_large")


def head_budget(limits: EdgeLimits) -> int:
    """Raw bytes a request head may take before we stop buffering it (line ends included)."""
    return limits.max_url + limits.max_header_bytes + 4 * (limits.max_headers + 2) + 64


# --------------------------------------------------------------------------------------------
# Request framing


def check_request_framing(headers: Headers, http_version: str, limits: EdgeLimits) -> BodyFraming:
    """How the request body is delimited; raises RequestRejected for anything ambiguous."""
    lengths: list[bytes] = []
    codings: list[bytes] = []
    for name, value in headers:
        if name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            codings.append(value)
    if codings:
        if lengths:
            raise RequestRejected(400, "content_length_with_transfer_encoding")
        if http_version != "1.1":
            raise RequestRejected(400, "transfer_encoding_in_http10")
        if len(codings) != 1 or codings[0].strip().lower() != b"chunked":
            raise RequestRejected(400, "unsupported_transfer_encoding")
        return CHUNKED
    if not lengths:
        return NO_BODY
    if len(lengths) != 1:
        raise RequestRejected(400, "duplicate_content_length")
    text = lengths[0].strip()
    if not text.isdigit() or len(text) > 19:
        raise RequestRejected(400, "invalid_content_length")
    length = int(text)
    if length > limits.max_body:
        raise RequestRejected(413, "body_too_large")
    return BodyFraming(BodyKind.LENGTH, length) if length else NO_BODY


#: Chunk sizes at or above this are refused as invalid (400), as nginx refuses sizes that
#: overflow its off_t; sizes below it but above the body limit are 413.
MAX_CHUNK_SIZE = 1 << 63
#: Longest chunk-size line (size and extensions) and trailer section accepted.
MAX_CHUNK_LINE = 4096
MAX_TRAILER_BYTES = 8192

_HEX = frozenset(b"0123456789abcdefABCDEF")
_SCAN_SIZE, _SCAN_DATA, _SCAN_DATA_END, _SCAN_TRAILER, _SCAN_DONE = range(5)


class ChunkedScanner:
    """Follows a chunked request body on the raw bytes, ahead of the parser.

    llhttp checks the chunked syntax but reports neither chunk sizes nor trailer fields
    before it has passed on body bytes (and the head has gone upstream): a chunk size of
    2^64-1 is valid to it, and a body that breaks later has already started a request at the
    origin.  The protocol feeds each raw chunk here *before* the parser, so the sizes and
    trailers are judged first: a size of 2^63 or more is a 400, a body declared larger than
    ``max_body`` a 413 (before its bytes arrive), and every trailer field name goes to
    ``check_trailer`` (which raises to refuse it).  Syntax errors are left to llhttp (it
    rejects what this scanner would misread).  ``feed`` returns the offset just past the
    body's last byte when the body ends inside ``data``, else None; bytes after it belong to
    the next request and are not looked at.
    """

    __slots__ = ("_check_trailer", "_line", "_max_body", "_remaining", "_state", "_total")

    def __init__(self, max_body: int, check_trailer: Callable[[bytes], None]) -> None:
        self._max_body = max_body
        self._check_trailer = check_trailer
        self._state = _SCAN_SIZE
        self._line = b""
        self._remaining = 0
        self._total = 0

    @property
    def done(self) -> bool:
        return self._state == _SCAN_DONE

    def feed(self, data: bytes, start: int = 0) -> int | None:
        pos = start
        end = len(data)
        while pos < end:
            state = self._state
            if state == _SCAN_DATA:
                step = min(self._remaining, end - pos)
                self._remaining -= step
                pos += step
                if not self._remaining:
                    self._state = _SCAN_DATA_END
                    self._remaining = 2  # the CRLF after the data (llhttp checks it)
                continue
            if state == _SCAN_DATA_END:
                step = min(self._remaining, end - pos)
                self._remaining -= step
                pos += step
                if not self._remaining:
                    self._state = _SCAN_SIZE
                continue
            if state == _SCAN_DONE:
                return None
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += data[pos:]
                self._check_line_length()
                return None
            line = self._line + data[pos:newline]
            self._line = b""
            pos = newline + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if state == _SCAN_SIZE:
                self._size_line(line)
            elif self._trailer_line(line):
                return pos
        return None

    def _check_line_length(self) -> None:
        limit = MAX_CHUNK_LINE if self._state == _SCAN_SIZE else MAX_TRAILER_BYTES
        if len(self._line) > limit:
            raise RequestRejected(400, "chunk_line_too_long")

    def _size_line(self, line: bytes) -> None:
        if len(line) > MAX_CHUNK_LINE:
            raise RequestRejected(400, "chunk_line_too_long")
        digits = line.split(b";", 1)[0]
        if not digits or len(digits) > 16 or not _HEX.issuperset(digits):
            raise RequestRejected(400, "invalid_chunk_size")
        size = int(digits, 16)
        if size >= MAX_CHUNK_SIZE:
            raise RequestRejected(400, "invalid_chunk_size")
        self._total += size
        if self._total > self._max_body:
            raise RequestRejected(413, "body_too_large")
        if size:
            self._state = _SCAN_DATA
            self._remaining = size
        else:
            self._state = _SCAN_TRAILER
            self._remaining = 0  # trailer bytes so far

    def _trailer_line(self, line: bytes) -> bool:
        """True at the empty line that ends the body."""
        if not line:
            self._state = _SCAN_DONE
            return True
        self._remaining += len(line) + 2
        if self._remaining > MAX_TRAILER_BYTES:
            raise RequestRejected(400, "trailers_too_large")
        self._check_trailer(line.split(b":", 1)[0].strip().lower())
        return False


def head_end(data: bytes, start: int, carry: bytes) -> int:
    """Offset in ``data`` just past the CRLFCRLF that ends a request head.

    ``start`` >= 0: the head begins in ``data`` at ``start`` (after any empty lines);
    ``start`` < 0: it began in earlier data, whose last bytes of it are ``carry`` (up to 3).
    -1 when the head does not end in ``data``.
    """
    if start >= 0:
        while start < len(data) and data[start] in b"\r\n":
            start += 1
        found = data.find(b"\r\n\r\n", start)
        return -1 if found < 0 else found + 4
    found = (carry + data).find(b"\r\n\r\n")
    return -1 if found < 0 else found + 4 - len(carry)


def header_value(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    tokens: set[bytes] | None = None
    for name, value in headers:
        if name == b"connection":
            if tokens is None:
                tokens = set()
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return _NO_TOKENS if tokens is None else frozenset(tokens)


_NO_TOKENS: Final = frozenset[bytes]()


def is_websocket_upgrade(headers: Headers) -> bool:
    upgrade = header_value(headers, b"upgrade")
    return (
        upgrade is not None
        and upgrade.strip().lower() == b"websocket"
        and b"upgrade" in connection_tokens(headers)
    )


def expects_continue(headers: Headers) -> bool:
    value = header_value(headers, b"expect")
    return value is not None and value.strip().lower() == b"100-continue"


# --------------------------------------------------------------------------------------------
# Header rewriting (pure policy)

TrustedNetworks = Sequence[IPv4Network | IPv6Network]


def is_trusted(client_ip: str, trusted: TrustedNetworks) -> bool:
    if not trusted:
        return False
    try:
        address: IPv4Address | IPv6Address = ip_address(client_ip)
    except ValueError:
        return False
    return any(address in network for network in trusted)


class ForwardingContext(NamedTuple):
    """What the edge knows about the client hop, for the X-Forwarded-* and Via headers.  One
    per forwarded request: a NamedTuple (a frozen dataclass's ``__init__`` cost twice as much,
    2% of a cache miss)."""

    client_ip: str
    scheme: bytes
    pop: str
    http_version: str
    trusted: bool
    request_id_header: bytes
    request_id: bytes


@functools.lru_cache(maxsize=64)
def via_value(http_version: str, pop: str) -> bytes:
    """This hop's Via value (one per HTTP version and POP: made once, not per request)."""
    return f"{http_version} meridian-{pop}".encode()


@functools.lru_cache(maxsize=16)
def _removed_from_responses(dropped: frozenset[bytes]) -> frozenset[bytes]:
    """The response fields never passed on, but for ``Proxy-*``: hop-by-hop, Content-Length
    and ``dropped`` (one set per config: one membership test a field)."""
    return HOP_BY_HOP | {b"content-length"} | dropped


def rewrite_response_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    dropped: frozenset[bytes] = frozenset(),
    via: bytes | None = None,
    region: str | None = None,
) -> Headers:
    """Upstream response headers as the edge passes (and stores) them, in one pass: names
    lower-cased, hop-by-hop (fixed, ``Proxy-*`` and those the Connection header names) and
    Content-Length removed (the edge sets its own framing), and ``dropped`` (the edge's own
    headers) removed.

    With ``via``: earlier Via values and this hop's are joined into one Via line at the end.
    With ``region``: an ``x-meridian-region`` line follows it."""
    # One pass; the fields a Connection header names (rarely any but hop-by-hop ones) are
    # taken out after it, once all its lines are known.
    out: Headers = []
    prior_via: list[bytes] | None = None
    connection: list[bytes] | None = None
    removed = _removed_from_responses(dropped)
    for name, value in headers:
        name = name.lower()
        if name in removed or name.startswith(b"proxy"):
            if name == b"connection":
                if connection is None:
                    connection = []
                connection.append(value)
            continue
        if via is not None and name == b"via":
            if prior_via is None:
                prior_via = []
            prior_via.append(value)
            continue
        out.append((name, value))
    if connection is not None:
        named = connection_tokens([(b"connection", value) for value in connection])
        if named - HOP_BY_HOP:
            out = [line for line in out if line[0] not in named]
            if b"via" in named:
                prior_via = None
    if via is not None:
        out.append((b"via", via if prior_via is None else b", ".join([*prior_via, via])))
    if region is not None:
        out.append((b"x-meridian-region", region.encode()))
    return out


class _RequestIds:
    """24 hex digits: a random per-process prefix (drawn again in a forked child) and a
    counter.  Unique without a system call per request (``os.urandom`` took 1.4 us, a
    twentieth of a cache hit); request IDs correlate logs, they are not secrets."""

    prefix = os.urandom(4).hex().encode()
    counter = itertools.count(int.from_bytes(os.urandom(4), "big"))

    @classmethod
    def reseed(cls) -> None:
        cls.prefix = os.urandom(4).hex().encode()
        cls.counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


os.register_at_fork(after_in_child=_RequestIds.reseed)


def new_request_id() -> bytes:
    return b"%s%016x" % (_RequestIds.prefix, next(_RequestIds.counter))


#: A request ID worth echoing: 1 to 128 visible ASCII characters (no spaces, no controls).
_REQUEST_ID: Final = re.compile(rb"[\x21-\x7e]{1,128}")


def valid_request_id(value: bytes) -> bool:
    """A client's request ID is kept only if it is short and printable (it goes into logs).
    (One C-level match: it runs on every request that carries one.)"""
    return _REQUEST_ID.fullmatch(value) is not None


# --------------------------------------------------------------------------------------------
# Response serialization


def response_framing(
    request_method: str, status: int, upstream_length: int | None, client_http11: bool
) -> BodyFraming:
    """How the edge frames a response body to the client."""
    if request_method == "HEAD" or status < 200 or status in (204, 304):
        return NO_BODY
    if upstream_length is not None:
        return BodyFraming(BodyKind.LENGTH, upstream_length)
    return CHUNKED if client_http11 else BodyFraming(BodyKind.UNTIL_CLOSE)


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def serialize_head(
    status: int,
    reason: bytes,
    headers: Headers,
    framing: BodyFraming,
    *,
    keep_alive: bool,
    head_length: int | None = None,
) -> bytes:
    """The status line and headers; framing headers are written here and nowhere else.

    ``head_length`` is the Content-Length to advertise on a HEAD/304 answer (none: omit).
    (Lines joined by ``bytes.join`` over ``map``: a third of the cost of concatenating each
    line in a loop, which mattered on every uncached response.)
    """
    lines = b"\r\n".join(map(_JOIN_FIELD, headers))
    if lines:
        head = b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, lines)
    else:
        head = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    kind = framing.kind
    if kind is BodyKind.LENGTH:
        head += b"content-length: %d\r\n" % framing.length
    elif kind is BodyKind.CHUNKED:
        head += b"transfer-encoding: chunked\r\n"
    elif head_length is not None:
        head += b"content-length: %d\r\n" % head_length
    if not keep_alive or kind is BodyKind.UNTIL_CLOSE:
        head += b"connection: close\r\n"
    return head + CRLF


_JOIN_FIELD = b": ".join


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def error_body(status: int, pop: str, reason: str, request_id: bytes) -> bytes:
    return json.dumps(
        {
            "error": HTTPStatus(status).phrase,
            "status": status,
            "reason": reason,
            "pop": pop,
            "request_id": request_id.decode("ascii", "replace"),
        },
        separators=(",", ":"),
    ).encode()


def error_response(
    status: int,
    pop: str,
    reason: str,
    request_id: bytes,
    *,
    request_id_header: bytes = b"x-request-id",
    keep_alive: bool = False,
    retry_after: int | None = None,
    extra: Headers | None = None,
    head_only: bool = False,
) -> bytes:
    """A complete error response generated by the edge: small JSON naming the POP and reason."""
    body = error_body(status, pop, reason, request_id)
    headers: Headers = [
        (b"content-type", b"application/json"),
        (b"cache-control", b"no-store"),
        (request_id_header, request_id),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if extra:
        headers.extend(extra)
    framing = NO_BODY if head_only else BodyFraming(BodyKind.LENGTH, len(body))
    head = serialize_head(
        status,
        reason_phrase(status),
        headers,
        framing,
        keep_alive=keep_alive,
        head_length=len(body) if head_only else None,
    )
    return head if head_only else head + body
