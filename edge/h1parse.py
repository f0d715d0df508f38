"""HTTP/1.1 request messages from a client connection's bytes: llhttp (httptools) and its
callbacks, for one ``edge.protocol.EdgeConnection``.

Every head goes through ``edge.request_target`` (the one decision about target, Host and
headers) and ``edge.http1``'s framing rules before a request exists.  A chunked body is followed
on the raw bytes by ``http1.ChunkedScanner`` ahead of the parser (chunk sizes and trailers judged
before any body byte is passed on; trailers are dropped, never merged).  llhttp reports no
offsets, so the parser keeps the raw offset of its position itself (``_cursor``).

The parser decides; the connection acts: each message is handed to its ``MessageSink`` as it
begins, once its head is validated (an ``Exchange``), as its body arrives and when it ends.
Anything refused comes out of ``feed`` as one ``RequestRejected``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import httptools

from edge.bodyqueue import BodyQueue
from edge.cache import Lookup
from edge.exchange import head_of
from edge.http1 import (
    NO_BODY,
    BodyKind,
    ChunkedScanner,
    Headers,
    RequestRejected,
    check_header_section,
    check_request_framing,
    check_url_length,
    head_end,
    is_websocket_upgrade,
    new_request_id,
    valid_request_id,
)
from edge.memos import BoundedMemo
from edge.pipeline import Pipeline, ProxyRequest, RequestHead
from edge.request_target import check_trailer, decide_target, screen_headers

#: Request body bytes buffered before the connection stops reading.
BODY_HIGH_WATER = 256 * 1024
#: ``MessageParser._cursor`` when the raw offset of the parser's position is not known.
_UNKNOWN = -2
#: Connection header values that nominate no header (no screening pass needed).
_PLAIN_CONNECTION = frozenset(
    {b"close", b"keep-alive", b"upgrade", b"Close", b"Keep-Alive", b"Upgrade"}
)
#: The HTTP versions served (llhttp also accepts 0.9 and 2.0 request lines).
_VERSIONS = frozenset({"1.1", "1.0"})
#: The largest request chunk remembered (``edge.memos.REQUEST_HEADS`` bounds how many).
REQUEST_HEAD_MAX_BYTES = 2048


def remember_head(heads: BoundedMemo[bytes, RequestHead], data: bytes, head: RequestHead) -> None:
    if len(data) > REQUEST_HEAD_MAX_BYTES:
        return
    if len(heads) >= heads.bound:
        heads.clear()  # bounded without bookkeeping: it refills with what is hot
    heads[data] = head


def seen_before(first_sights: BoundedMemo[int, int], data: bytes) -> bool:
    """Whether ``data`` (a head, or its meaning key) was seen since the memo was last cleared;
    notes it if not.  A head is memoised on its second sight: traffic spread over more keys
    than ``REQUEST_HEADS`` holds would only churn it (and the collector) otherwise."""
    return sightings(first_sights, data) > 0


def sightings(first_sights: BoundedMemo[int, int], data: bytes) -> int:
    """How often ``data`` was seen since the memo was last cleared: 0, 1, or 2 for twice or
    more; this sight is noted.  (Counts are small ints, which CPython never allocates: the memo
    costs what a set of the hashes would.)"""
    digest = hash(data)  # cached in the bytes object: the memo lookups computed it already
    seen = first_sights.get(digest, 0)
    if seen < 2:
        if not seen and len(first_sights) >= first_sights.bound:
            first_sights.clear()
        first_sights[digest] = seen + 1
    return seen


class StreamedBody(BodyQueue):
    """A request body passed from the parser to the upstream request, never buffered whole:
    the connection stops reading above ``BODY_HIGH_WATER`` bytes queued, and reads again once
    half of that is taken."""

    __slots__ = ("_on_pause", "_on_resume", "_paused", "_size")

    def __init__(self, on_pause: Callable[[], None], on_resume: Callable[[], None]) -> None:
        super().__init__()
        self._size = 0
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._paused = False

    def feed(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > BODY_HIGH_WATER and not self._paused:
            self._paused = True
            self._on_pause()
        self._put(data, len(data))

    def _taken(self, credit: int) -> None:
        self._size -= credit
        if self._paused and self._size <= BODY_HIGH_WATER // 2:
            self._paused = False
            self._on_resume()


class Exchange:
    """One request on a connection, from its head to the end of its response."""

    __slots__ = ("body", "lookup", "request", "response_started", "scheduled", "websocket")

    def __init__(self, request: ProxyRequest, body: StreamedBody | None, websocket: bool) -> None:
        self.request = request
        self.body = body
        self.websocket = websocket
        self.scheduled = False
        self.response_started = False
        #: The cache lookup the fast path made and could not answer from (reused by the
        #: slow path).
        self.lookup: Lookup | None = None


class MessageSink(Protocol):
    """The connection as its ``MessageParser`` hands it messages."""

    client_ip: str
    scheme: bytes
    protocol: str | None

    def message_begun(self) -> None:
        """A request head began (the header read deadline starts)."""

    def head_received(self, exchange: Exchange) -> None:
        """A head was validated; its body (if any) follows."""

    def body_received(self) -> None:
        """Body bytes arrived (the body read deadline starts again)."""

    def schedule(self, exchange: Exchange) -> None:
        """Start ``exchange`` (or queue it behind the one in progress): its body is arriving."""

    def message_complete(self, exchange: Exchange) -> None:
        """The message ended (its body, if any, is complete)."""

    def pause_reading(self) -> None:
        """Stop reading: the body is not taken as fast as it arrives."""

    def resume_reading(self) -> None: ...


class _NoRequests:
    """The callbacks of ``_CLOSED_PARSER``: a parser bound to nothing (it is never fed)."""


#: What a closed connection's parser is swapped for.  A parser holds bound methods of its
#: ``MessageParser`` (its callbacks), a reference cycle: left in place, every closed connection
#: stayed allocated until the cyclic collector ran, instead of being freed, in cache, by
#: reference counting the moment its transport let go of it.
_CLOSED_PARSER = httptools.HttpRequestParser(_NoRequests())


class _Closed:
    """The sink of a closed connection's ``MessageParser``: nothing is fed after
    ``connection_lost``, so nothing reaches it; it only stands in for the connection."""

    client_ip = "-"
    scheme = b"http"
    protocol: str | None = None

    def message_begun(self) -> None: ...

    def head_received(self, exchange: Exchange) -> None: ...

    def body_received(self) -> None: ...

    def schedule(self, exchange: Exchange) -> None: ...

    def message_complete(self, exchange: Exchange) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


_CLOSED_SINK = _Closed()


class MessageParser:
    """Request messages of one connection (module docstring); ``current`` is the exchange
    whose message is being read, ``reading_head`` whether a head is."""

    def __init__(self, sink: MessageSink, pipeline: Pipeline) -> None:
        self._sink = sink
        self._pipeline = pipeline
        self._parser = httptools.HttpRequestParser(self)
        self.current: Exchange | None = None
        self.reading_head = False
        # Head being parsed.
        self._url_parts: list[bytes] = []
        self._url_length = 0
        self._headers: Headers = []
        self._header_bytes = 0
        self._head_bytes = 0
        self._hosts = 0
        self._host: bytes | None = None
        self._supplied_id: bytes | None = None
        self._framing_headers = False
        #: The head needs ``screen_headers`` (an underscore name, a Connection nomination).
        self._screen = False
        # Raw-offset tracking for ``ChunkedScanner`` (llhttp reports no offsets): the chunk
        # being fed, the offset up to which it is accounted to messages, where the current
        # message began in it (-1: in earlier data, whose last head bytes are ``_carry``).
        self._raw = b""
        self._cursor = 0
        self._msg_start = _UNKNOWN
        self._carry = b""
        self._chunks: ChunkedScanner | None = None
        self._chunk_end: int | None = None
        #: Messages begun in the chunk being fed, and the head of the last bodiless
        #: keep-alive GET/HEAD parsed from it (see ``RequestHead``).
        self._chunk_messages = 0
        self._head_seen: RequestHead | None = None
        #: What a callback refused (httptools reports only that a callback raised).
        self._rejected: RequestRejected | None = None

    def close(self) -> None:
        """No more bytes come (the connection is lost): let go of the parser and the sink,
        the cycles that would keep the connection for the cyclic collector."""
        self._parser = _CLOSED_PARSER
        self._sink = _CLOSED_SINK

    def feed(self, data: bytes, at_boundary: bool) -> bytes | None:
        """Parse ``data`` (``at_boundary``: no message was begun before it).  Returns the bytes
        after the head of an upgrade request (the parser then stops), else None; raises
        ``RequestRejected`` for anything refused."""
        if self.reading_head:
            self._head_bytes += len(data)
        self._chunk_messages = 0
        self._head_seen = None
        try:
            if self._head_bytes > self._pipeline.state.head_budget:
                raise RequestRejected(431 if self._url_parts else 414, "head_too_large")
            self._raw = data
            self._cursor = 0
            if self.reading_head and self._msg_start != _UNKNOWN:
                self._msg_start = -1  # the head began in earlier data
            scanner = self._chunks
            if scanner is not None:
                # Chunk sizes and trailers are judged before the parser passes body bytes on.
                self._chunk_end = scanner.feed(data)
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            return data[int(upgrade.args[0]) :]
        except httptools.HttpParserCallbackError:
            raise self.take_rejected() or RequestRejected(400, "bad_request") from None
        except RequestRejected:
            self._rejected = None
            raise
        except httptools.HttpParserError as exc:
            raise RequestRejected(400, _parser_reason(exc)) from None
        if self.reading_head:
            self._keep_carry(data)
        head = self._head_seen
        if head is not None:
            self._head_seen = None
            state = self._pipeline.state
            if (
                at_boundary
                and self._chunk_messages == 1
                and not self.reading_head
                and seen_before(state.first_sights, data)
            ):
                # The chunk was exactly one request, seen before: remember its parsed head.
                remember_head(state.request_heads, data, head)
        return None

    def take_rejected(self) -> RequestRejected | None:
        rejected, self._rejected = self._rejected, None
        return rejected

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._msg_start = self._cursor
        self._chunk_messages += 1
        self._head_seen = None
        self._url_parts = []
        self._url_length = 0
        self._headers = []
        self._header_bytes = 0
        self._head_bytes = 0
        self._hosts = 0
        self._host = None
        self._supplied_id = None
        self._framing_headers = False
        self._screen = False
        self.reading_head = True
        self._sink.message_begun()

    def on_url(self, url: bytes) -> None:
        self._url_length += len(url)
        self._url_parts.append(url)
        self._guard(check_url_length, self._url_length)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.reading_head:
            # A chunked trailer field: never merged into the headers (the scanner has
            # already refused the ones that could only be an attack).
            self._guard(_check_trailer, name.lower())
            return
        self._header_bytes += len(name) + len(value) + 4
        name = name.lower()
        headers = self._headers
        headers.append((name, value))
        state = self._pipeline.state
        if len(headers) > state.max_headers or self._header_bytes > state.max_header_bytes:
            self._guard(check_header_section, len(headers), self._header_bytes)
        if name in state.tracked_headers:  # noted now: no second pass over the headers
            if name == b"host":
                self._hosts += 1
                self._host = value
            elif name == state.request_id_header:
                if self._supplied_id is None:
                    self._supplied_id = value
            elif name == b"connection":
                if value not in _PLAIN_CONNECTION:
                    self._screen = True
            else:
                self._framing_headers = True
        elif b"_" in name:
            self._screen = True

    def on_headers_complete(self) -> None:
        self.reading_head = False
        start = self._msg_start
        end = head_end(self._raw, start, self._carry) if start != _UNKNOWN else -1
        self._cursor = end if end >= 0 else _UNKNOWN
        state = self._pipeline.state
        parser = self._parser
        method = parser.get_method().decode("ascii", "replace")
        version = parser.get_http_version()
        headers = self._headers
        try:
            if version not in _VERSIONS:
                raise RequestRejected(400, "unsupported_http_version")
            if method == "CONNECT":
                raise RequestRejected(405, "connect_not_supported")
            framing = (
                check_request_framing(headers, version, state.config.edge.limits)
                if self._framing_headers
                else NO_BODY
            )
            if framing.kind is not BodyKind.NONE and (method == "GET" or method == "HEAD"):
                # Never forwarded (a cache fill would drop it; a body the origin reads and
                # the edge ignored is a desync): refused, as for any ambiguous framing.
                raise RequestRejected(400, "body_not_allowed")
            if self._hosts > 1:
                raise RequestRejected(400, "duplicate_host")
            # The one decision: target, routing path and host (key, Host, X-Forwarded-Host).
            decided = decide_target(b"".join(self._url_parts), self._host, version)
            host = decided.host
            if self._screen or host != self._host:
                headers = screen_headers(headers, host)
            if framing.kind is BodyKind.CHUNKED:
                if self._cursor < 0:
                    raise RequestRejected(400, "unscannable_request")
                scanner = self._chunks = ChunkedScanner(
                    state.config.edge.limits.max_body, check_trailer
                )
                self._chunk_end = scanner.feed(self._raw, self._cursor)
        except RequestRejected as exc:
            self._rejected = exc
            raise
        supplied = self._supplied_id
        request_supplied = supplied is not None and valid_request_id(supplied)
        request_id = supplied if request_supplied and supplied is not None else new_request_id()
        upgrade = parser.should_upgrade()
        sink = self._sink
        request = ProxyRequest(
            method=method,
            target=decided.target,
            path=decided.path,
            host=host,
            http_version=version,
            headers=headers,
            # After a non-WebSocket upgrade request httptools stops parsing: close after it.
            keep_alive=parser.should_keep_alive() and not upgrade,
            client_ip=sink.client_ip,
            body=framing,
            request_id=request_id,
            received_at=self._pipeline.clock(),
            request_id_supplied=request_supplied,
            scheme=sink.scheme,
            protocol=sink.protocol,
        )
        body = StreamedBody(sink.pause_reading, sink.resume_reading) if framing.has_body else None
        websocket = upgrade and method == "GET" and is_websocket_upgrade(headers)
        self.current = exchange = Exchange(request, body, websocket)
        sink.head_received(exchange)

    def on_body(self, data: bytes) -> None:
        if self._chunks is None and self._cursor >= 0:
            self._cursor += len(data)
        exchange = self.current
        if exchange is None or exchange.body is None:
            return
        exchange.body.feed(data)
        self._sink.body_received()
        if exchange.body.received > self._pipeline.state.config.edge.limits.max_body:
            rejected = RequestRejected(413, "body_too_large")
            exchange.body.fail(rejected)
            if not exchange.scheduled:
                self._rejected = rejected
                raise rejected
            return
        if not exchange.scheduled:
            self._sink.schedule(exchange)

    def on_message_complete(self) -> None:
        if self._chunks is not None:
            end = self._chunk_end
            self._cursor = end if end is not None and self._chunks.done else _UNKNOWN
            self._chunks = None
        exchange = self.current
        self.current = None
        if exchange is None:
            return
        if exchange.body is not None:
            exchange.body.finish()
        request = exchange.request
        if (
            not exchange.websocket
            and not exchange.scheduled
            and exchange.body is None
            and request.keep_alive
            and request.http_version == "1.1"
            and (request.method == "GET" or request.method == "HEAD")
        ):
            self._head_seen = head_of(request)
        self._sink.message_complete(exchange)

    # -- helpers ------------------------------------------------------------------------------

    def _keep_carry(self, data: bytes) -> None:
        """A head continues in the next chunk: keep its last bytes (for ``head_end``)."""
        start = self._msg_start
        if start == _UNKNOWN:
            return
        if start >= 0:
            while start < len(data) and data[start] in b"\r\n":
                start += 1
            tail = data[start:]
        else:
            tail = self._carry + data
        self._carry = tail[-3:]

    def _guard(self, check: Callable[..., None], *args: object) -> None:
        try:
            check(*args, self._pipeline.state.config.edge.limits)
        except RequestRejected as exc:
            self._rejected = exc
            raise


def _check_trailer(name: bytes, _limits: object) -> None:
    check_trailer(name)


def _parser_reason(exc: Exception) -> str:
    text = str(exc).lower()
    for needle, reason in (
        ("content-length", "invalid_content_length"),
        ("transfer-encoding", "invalid_transfer_encoding"),
        ("chunk", "invalid_chunk"),
        ("whitespace after header", "obs_fold"),
        ("cr", "bare_lf"),
    ):
        if needle in text:
            return reason
    return "malformed_request"


__all__ = [
    "BODY_HIGH_WATER",
    "REQUEST_HEAD_MAX_BYTES",
    "Exchange",
    "MessageParser",
    "MessageSink",
    "StreamedBody",
    "remember_head",
    "seen_before",
    "sightings",
]
