"""The upstream HTTP/1.1 exchange as bytes, without I/O: request heads out, responses in.

``encode_head`` writes a request head from header lines the edge already holds as bytes (no
text round trip); ``chunk`` frames a streamed request body.  ``ResponseReader`` is the response
side: bytes are fed in as they arrive (``feed``, then ``feed_eof`` when the connection ends),
and it says what it has learnt: the head (``head``), body pieces (``take``), whether the
message is whole (``complete``) and whether the connection may carry another request
(``reusable``).  It is the only judge of an origin's framing, and every byte an origin sends
may be an attack:

* the head is bounded (``MAX_HEAD_BYTES``, ``MAX_HEADERS``); llhttp (httptools, the client
  side's parser family) rejects what is not HTTP, a Content-Length beside Transfer-Encoding,
  duplicate or malformed lengths, bad chunk sizes;
* interim ``1xx`` heads are skipped; ``101`` is refused (the edge never asked to upgrade here);
* a response to HEAD, and every 204/304, ends with its head whatever length it declares;
* trailers of a chunked body are parsed (llhttp checks them) and dropped;
* a body with neither length nor chunking ends at the connection's end (close-delimited, never
  reused); a declared length or chunked body cut short by the end is ``UpstreamBodyError``;
* any byte after the end of the message (a lying Content-Length, a second answer nobody asked
  for) makes the connection unusable: it is never handed to another request (bare CR/LF
  excepted: llhttp skips those between messages, and no answer can be made of them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, NamedTuple

import httptools

from edge.errors import EdgeError

#: A response head larger than this (status line and header lines) is refused.
MAX_HEAD_BYTES = 64 * 1024
#: Header lines in one response head, at most.
MAX_HEADERS = 200

_CRLF = b"\r\n"
_HTTP11 = b" HTTP/1.1\r\n"
_NO_BODY_STATUSES = frozenset({204, 304})
#: The lengths of the names that frame a response (Content-Length, Transfer-Encoding,
#: Connection): only a header line whose name has one of them is lowered and looked at.
_FRAMING_SIZES = frozenset({14, 17, 10})


class UpstreamBodyError(EdgeError):
    """An upstream response that broke after its head: cut short, or malformed mid-body."""


class UpstreamProtocolError(EdgeError):
    """An upstream answer that is not an acceptable HTTP/1.1 response head."""


def encode_head(
    method: bytes, target: bytes, headers: bytes, host: bytes | None, framing: bytes
) -> bytes:
    """A request head: ``headers`` are the lines as sent (each ending CRLF, lower-case names),
    ``host`` a Host line's value to add when they carry none, ``framing`` the body's framing
    line(s)."""
    parts = [method, b" ", target, _HTTP11]
    if host is not None and not (headers.startswith(b"host:") or b"\r\nhost:" in headers):
        parts += [b"host: ", host, _CRLF]  # has_host, inline: once per request
    parts += [headers, framing, _CRLF]
    return b"".join(parts)


def header_block(lines: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Header lines as they go on the wire (names and values as given, each line ending CRLF)."""
    return b"".join([b"%s: %s\r\n" % line for line in lines])  # one format a line, no concats


def has_host(block: bytes) -> bool:
    """Whether a header block (lower-case names) carries a Host line."""
    return block.startswith(b"host:") or b"\r\nhost:" in block


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never empty: that would end the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


class ResponseHead(NamedTuple):
    """A response head as received: raw header lines, names as the origin wrote them (a
    NamedTuple: one is made per response, by ``tuple.__new__``)."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    #: The body's length when the origin declared one and the message has a body.
    content_length: int | None
    #: The origin did not ask to close (HTTP/1.1 without ``Connection: close``).
    keep_alive: bool


#: ``ResponseHead`` made from all its fields: ``tuple.__new__``, not the generated ``__new__``.
_new_head: Final = tuple.__new__


def _head_size(reason: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """The bytes of a final response head with this reason and these lines, at the least
    (``HTTP/1.1 200 `` and CRLF, ``name: value`` and CRLF each, the blank line; llhttp has
    dropped the whitespace around values)."""
    return 15 + len(reason) + sum(len(name) + len(value) + 4 for name, value in headers) + 2


class _Stop(Exception):
    """Raised inside a parser callback to stop reading bytes that belong to no message."""


class ResponseReader:
    """The parse of one response (interim 1xx heads included); see the module docstring.

    A connection's next response reuses the reader (``next``) only when llhttp ended the last
    message itself and the connection stayed reusable; anything else gets a fresh parser, so
    no state of a doubtful message carries into the next."""

    __slots__ = (
        "_chunked",
        "_close",
        "_error",
        "_head_bytes",
        "_headers",
        "_in_head",
        "_length",
        "_parser",
        "_reason",
        "_reuse",
        "_until_close",
        "body",
        "buffered",
        "complete",
        "head",
        "head_request",
        "parser_clean",
        "reusable",
    )

    def __init__(self, *, head_request: bool = False) -> None:
        self._parser = httptools.HttpResponseParser(self)
        #: llhttp itself ended the message (not this reader's HEAD/204/304 cut): its parser
        #: is back at a message boundary and may read the connection's next response.
        self.parser_clean = False
        self._start(head_request)

    def next(self, *, head_request: bool = False) -> ResponseReader:
        """A reader for the connection's next response: this one reset, keeping its parser,
        when that parser ended the last message cleanly; a new one otherwise."""
        if not (self.parser_clean and self.reusable):
            return ResponseReader(head_request=head_request)
        self._start(head_request)
        return self

    def _start(self, head_request: bool) -> None:
        self.head_request = head_request
        self.parser_clean = False
        self.head: ResponseHead | None = None
        #: Body pieces parsed and not yet taken, and their size.
        self.body: list[bytes] = []
        self.buffered = 0
        self.complete = False
        self.reusable = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._in_head = True
        self._head_bytes = 0
        #: The framing the head's lines declared so far (``on_header``): Content-Length,
        #: a chunked Transfer-Encoding, ``Connection: close``.
        self._length: int | None = None
        self._chunked = False
        self._close = False
        #: Why a callback stopped the parse (httptools does not chain the callback's error).
        self._error = ""

    # -- input ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the origin.  Raises ``UpstreamProtocolError`` (no usable head) or
        ``UpstreamBodyError`` (broken after the head)."""
        if self.complete:
            self.reusable = False  # bytes after the message: the connection is spoiled
            return
        in_head = self._in_head
        if in_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if self.complete:
                self.reusable = False  # stopped (``_Stop``) at bytes after the message
            else:
                self._fail(self._error or str(exc))
        except httptools.HttpParserUpgrade:
            self._fail("101 Switching Protocols, no upgrade was asked for")
        except httptools.HttpParserError as exc:
            if self.complete:
                self.reusable = False  # garbage after a whole message
            else:
                self._fail(str(exc))
        if (
            in_head
            and self._head_bytes > MAX_HEAD_BYTES
            # A head that ended in this read is measured itself (the read may carry body too):
            # a whole head over the bound is refused like one still arriving.
            and (self._in_head or _head_size(self._reason, self._headers) > MAX_HEAD_BYTES)
        ):
            self.reusable = False
            raise UpstreamProtocolError(f"response head over {MAX_HEAD_BYTES} bytes")

    def feed_eof(self) -> None:
        """The connection ended.  Raises when that cut the response short."""
        self.reusable = False
        if self.complete:
            return
        if self.head is None:
            if not self._head_bytes:
                return  # closed without a word: the shell reports a reset
            raise UpstreamProtocolError("connection closed inside the response head")
        if self._until_close:
            self.complete = True
            return
        raise UpstreamBodyError("connection closed mid-body")

    def take(self) -> bytes:
        """The body bytes parsed so far and not yet taken (``b""`` when none)."""
        body = self.body
        if not body:
            return b""
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self.buffered = 0
        return data

    def _fail(self, detail: str) -> None:
        self.reusable = False
        if self.head is None:
            raise UpstreamProtocolError(detail)
        raise UpstreamBodyError(detail)

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Stop  # a second message nobody asked for

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer: checked by llhttp, dropped here
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            self._error = f"over {MAX_HEADERS} header lines"
            raise _Stop
        headers.append((name, value))
        if len(name) in _FRAMING_SIZES:  # only names of these lengths need lowering
            lowered = name.lower()
            if lowered == b"content-length":
                self._length = int(value)  # llhttp checked it: digits only, one value
            elif lowered == b"transfer-encoding":
                self._chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            elif lowered == b"connection" and b"close" in value.lower():
                self._close = True

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                self._error = "101 Switching Protocols, no upgrade was asked for"
                raise _Stop
            # Interim (100 Continue, 103 Early Hints): not passed on; the final head follows.
            self._headers = []
            self._reason = b""
            self._length = None
            self._chunked = False
            self._close = False
            return
        keep_alive = not self._close and (
            parser.should_keep_alive() or parser.get_http_version() == "1.1"
        )
        chunked = self._chunked
        no_body = self.head_request or status in _NO_BODY_STATUSES
        length = None if no_body or chunked else self._length
        #: Neither length nor chunking: the body ends with the connection (``feed_eof``).
        self._until_close = length is None and not chunked and not no_body
        self._reuse = keep_alive and not self._until_close
        self.head = _new_head(
            ResponseHead, (status, self._reason, self._headers, length, keep_alive)
        )
        self._in_head = False
        if no_body:
            # Whatever length it declared, this response ends here (RFC 9112 6.3).  llhttp
            # does not know the request was HEAD: a body it then reads is stopped (on_body).
            self._finish()

    def on_body(self, data: bytes) -> None:
        if self.complete:
            raise _Stop  # bytes after a bodiless answer
        self.body.append(data)
        self.buffered += len(data)

    def on_message_complete(self) -> None:
        if self.head is None:
            return  # the end of an interim 1xx message
        self.parser_clean = not self.head_request
        self._finish()

    def _finish(self) -> None:
        self.complete = True
        self.reusable = self._reuse  # the head's keep-alive, unless it ends at the close


__all__ = [
    "LAST_CHUNK",
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "ResponseHead",
    "ResponseReader",
    "UpstreamBodyError",
    "UpstreamProtocolError",
    "chunk",
    "encode_head",
    "has_host",
    "header_block",
]
