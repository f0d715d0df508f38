"""HTTP/2 streams: each one the ``ResponseSink`` of its exchange, and the send side of a
connection (``StreamTable``): HEADERS and DATA as the peer's windows allow, resets, and the
release of a stream once it is answered (``edge.h2front`` drives it).

A stream's response bytes wait in the stream until the windows open (``edge.h2core`` keeps
the windows and builds the frames); the stage writing them waits (``drain``) beyond
``STREAM_HIGH_WATER``.  The prebuilt HTTP/1.1 bytes of a cache hit or an edge error
(``write_complete``) are read back into a status, an HPACK block and the body
(``response_head``: the head's block memoised per distinct head, ``edge.memos``
``RESPONSE_HEADS``; the body goes out as DATA straight from the stored bytes).  A stream that
cannot be answered (the core has closed it) is forgotten at once, never left to hold the
connection open.  Request bodies (``H2Body``) are acknowledged to the peer only as they are
consumed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final, Protocol

from edge.bodyqueue import BodyQueue
from edge.cache.coalesce import leads_fill
from edge.h2core import H2Core
from edge.h2wire import ErrorCode
from edge.hpack_literal import LiteralEncoder
from edge.http1 import BodyFraming, BodyKind, Headers, RequestRejected
from edge.memos import RESPONSE_HEADS, RESPONSE_OBJECTS, BoundedMemo
from edge.pipeline import ProxyRequest

#: Response bytes a stream buffers (waiting for the peer's window) before its writer waits.
STREAM_HIGH_WATER: Final = 64 * 1024
HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
_HOP_BY_HOP = HOP_BY_HOP


class StreamOwner(Protocol):
    """What the send side needs from its connection."""

    @property
    def write_paused(self) -> bool: ...

    @property
    def alive(self) -> bool:
        """The transport is still there."""

    def write_out(self) -> None:
        """Write what the core has to send."""

    def streams_gone(self) -> None:
        """The last stream was released."""

    def count_reset(self, reason: str) -> None: ...


# --------------------------------------------------------------------------------------------
# Prebuilt HTTP/1.1 responses read back for HTTP/2


def parse_wire(wire: bytes) -> tuple[int, Headers, bytes]:
    """Status, HTTP/2 header fields and body of a complete HTTP/1.1 response made by the edge
    (a cached entry's bytes, an error).  Hop-by-hop fields are dropped, names lower-cased; a
    chunked body is decoded."""
    end = wire.find(b"\r\n\r\n")
    if end < 0:
        raise ValueError("prebuilt response without a head end")
    status, headers, chunked = _parse_head(wire[:end])
    body = wire[end + 4 :]
    return status, headers, _dechunk(body) if chunked else body


def _parse_head(head: bytes) -> tuple[int, Headers, bool]:
    lines = head.split(b"\r\n")
    status = int(lines[0][9:12])
    headers: Headers = [(b":status", lines[0][9:12])]
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name in _HOP_BY_HOP:
            chunked = chunked or (name == b"transfer-encoding" and b"chunked" in value.lower())
            continue
        headers.append((name, value.strip()))
    return status, headers, chunked


ResponseHeads = BoundedMemo[bytes, tuple[int, bytes]]
#: The largest prebuilt response remembered by object (``PrebuiltResponses.by_object``).
BY_OBJECT_MAX_BYTES: Final = 16 * 1024


def response_head(
    wire: bytes, memo: ResponseHeads, encoder: LiteralEncoder
) -> tuple[int, bytes, bytes | memoryview]:
    """Status, HPACK block (without indexing) and body of a prebuilt HTTP/1.1 response; the
    head's (status, block) memoised, so a hit costs a lookup and a slice."""
    end = wire.find(b"\r\n\r\n")
    if end < 0:
        raise ValueError("prebuilt response without a head end")
    head = wire[:end]
    body = memoryview(wire)[end + 4 :]  # sent from the stored bytes, not copied
    known = memo.get(head)
    if known is not None:
        return known[0], known[1], body
    status, headers, chunked = _parse_head(head)
    block = encoder.encode(headers)
    if chunked:  # never memoised: rare, and its body must be decoded each time
        return status, block, _dechunk(bytes(body))
    if len(memo) >= memo.bound:
        memo.clear()
    memo[head] = (status, block)
    return status, block, body


class PrebuiltResponses:
    """A worker's prebuilt HTTP/1.1 responses (cache hits, edge errors) read back for HTTP/2.

    Two memos (``edge.memos``): ``heads``, the head's bytes -> status and HPACK block
    (``RESPONSE_HEADS``); ``by_object``, the response's bytes object -> all three
    (``RESPONSE_OBJECTS``): the hit path returns the very same object while a cached answer
    holds (one Age second), so a hit then costs one dict lookup by ``id``, without hashing
    or slicing the bytes."""

    __slots__ = ("by_object", "encoder", "heads")

    def __init__(self) -> None:
        self.encoder = LiteralEncoder()
        self.heads: ResponseHeads = BoundedMemo(RESPONSE_HEADS)
        self.by_object: BoundedMemo[int, tuple[bytes, int, bytes, bytes | memoryview]] = (
            BoundedMemo(RESPONSE_OBJECTS)
        )

    def read(self, wire: bytes, stable: bool) -> tuple[int, bytes, bytes | memoryview]:
        """Status, HPACK block and body of ``wire``; ``stable``: the hit path may return this
        very object again (no per-request lines in it), so it is worth remembering."""
        known = self.by_object.get(id(wire))
        if known is not None and known[0] is wire:
            return known[1], known[2], known[3]
        status, block, body = response_head(wire, self.heads, self.encoder)
        if stable and len(wire) <= BY_OBJECT_MAX_BYTES:
            memo = self.by_object
            if len(memo) >= memo.bound:
                memo.clear()
            # Holding ``wire`` keeps its id from being reused while the entry lives.
            memo[id(wire)] = (wire, status, block, body)
        return status, block, body


def _dechunk(data: bytes) -> bytes:
    out: list[bytes] = []
    pos = 0
    while True:
        line_end = data.index(b"\r\n", pos)
        size = int(data[pos:line_end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        start = line_end + 2
        out.append(data[start : start + size])
        pos = start + size + 2


# --------------------------------------------------------------------------------------------
# Request body


class H2Body(BodyQueue):
    """A request body from DATA frames, handed to the forward stage as it arrives; its bytes
    are acknowledged to the peer (window reopened) only once consumed."""

    __slots__ = ("_conn", "stream_id")

    def __init__(self, table: StreamTable, stream_id: int) -> None:
        super().__init__()
        self._conn = table
        self.stream_id = stream_id

    def feed(self, data: bytes, flow_length: int) -> None:
        self._put(data, flow_length)

    def unconsumed(self) -> int:
        """Flow-controlled bytes received and never consumed (released when the stream ends)."""
        total = sum(length for _, length in self._chunks)
        self._chunks.clear()
        return total

    def _taken(self, credit: int) -> None:
        self._conn.consumed(self.stream_id, credit)


# --------------------------------------------------------------------------------------------
# One stream: the pipeline's ResponseSink


class H2Stream:
    """One request stream; the ``ResponseSink`` its exchange writes to."""

    __slots__ = (
        "_conn",
        "_drain_waiter",
        "_end_pending",
        "_outbound",
        "_pending_headers",
        "body",
        "bytes_sent",
        "closed",
        "deadline",
        "ended",
        "expired",
        "out_size",
        "request",
        "response_started",
        "stalled_since",
        "stream_id",
        "task",
    )

    def __init__(self, table: StreamTable, stream_id: int) -> None:
        self._conn = table
        self.stream_id = stream_id
        self.request: ProxyRequest | None = None
        self.body: H2Body | None = None
        self.task: asyncio.Task[None] | None = None
        self.response_started = False
        self.bytes_sent = 0
        #: The response's HPACK block, until it is sent.
        self._pending_headers: bytes | None = None
        self._outbound: deque[bytes | memoryview] = deque()
        self.out_size = 0
        self._end_pending = False
        #: Our END_STREAM went out (or the stream was reset): nothing more to send.
        self.ended = False
        #: Reset, or the connection is gone.
        self.closed = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.deadline = 0.0
        self.expired = False
        #: Loop time since when response bytes wait on a zero window (0: not waiting).
        self.stalled_since = 0.0

    # -- ResponseSink -------------------------------------------------------------------------

    @property
    def write_paused(self) -> bool:
        return self.out_size > STREAM_HIGH_WATER or self._conn.write_paused

    def start_response(
        self,
        status: int,
        reason: bytes,
        headers: Headers,
        framing: BodyFraming,
        head_length: int | None,
    ) -> None:
        self.response_started = True
        fields: Headers = [(b":status", str(status).encode())]
        fields.extend(h for h in headers if h[0] not in _HOP_BY_HOP)
        if framing.kind is BodyKind.LENGTH:
            fields.append((b"content-length", str(framing.length).encode()))
        elif framing.kind is BodyKind.NONE and head_length is not None:
            fields.append((b"content-length", str(head_length).encode()))
        self._pending_headers = self._conn.responses.encoder.encode(fields)

    def write_body(self, data: bytes) -> None:
        if not data or self.closed:
            return
        self._send_headers(end_stream=False)
        if self.closed:
            return  # the HEADERS could not be sent: the stream is gone
        self._outbound.append(data)
        self.out_size += len(data)
        self._conn.flush_stream(self)

    def end_response(self) -> None:
        if self.closed:
            return
        if self._pending_headers is not None and not self._outbound:
            self._send_headers(end_stream=True)
        else:
            self._end_pending = True
            self._conn.flush_stream(self)
        self._conn.write_out()

    def write_complete(self, data: bytes, *, close: bool) -> None:
        # ``close`` is HTTP/1.1's (the framing of the connection is unknown): a stream ends
        # on its own, the connection goes on.
        if self.closed:
            return
        conn = self._conn
        status, block, body = conn.responses.read(data, False)
        request = self.request
        if request is not None and (request.method == "HEAD" or status in (204, 304)):
            body = b""
        self.send_prebuilt(block, body)

    def send_prebuilt(self, block: bytes, body: bytes | memoryview) -> None:
        """A whole response: its HPACK block and its body (empty: none)."""
        if self.closed:
            return
        self.response_started = True
        conn = self._conn
        self._pending_headers = block
        if not body:
            self.end_response()
            return
        # The whole response is here: its last DATA frame carries END_STREAM (no empty
        # frame after it).
        self._send_headers(end_stream=False)
        if self.closed:
            return
        self._outbound.append(body)
        self.out_size += len(body)
        self._end_pending = True
        conn.flush_stream(self)
        conn.write_out()  # deferred to the end of the read when answered within one

    def abort(self) -> None:
        self._conn.reset_stream(self, ErrorCode.INTERNAL_ERROR, "aborted")

    async def drain(self) -> None:
        while self.write_paused and not self.closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter

    def expire_after(self, seconds: float) -> None:
        self.deadline = self._conn.loop.time() + seconds

    @property
    def deadline_expired(self) -> bool:
        return self.expired

    # -- the connection's side ----------------------------------------------------------------

    def _send_headers(self, *, end_stream: bool) -> None:
        fields = self._pending_headers
        if fields is None:
            return
        self._pending_headers = None
        self._conn.send_headers(self, fields, end_stream)
        if end_stream:
            self.ended = True

    def take(self, window: int) -> tuple[bytes | memoryview, bool] | None:
        """Up to ``window`` bytes to send now, and whether they end the stream."""
        if not self._outbound:
            if self._end_pending and not self.ended:
                self.ended = True
                return b"", True
            return None
        chunk = self._outbound[0]
        if len(chunk) <= window:
            self._outbound.popleft()
        else:
            self._outbound[0] = chunk[window:]
            chunk = chunk[:window]
        self.out_size -= len(chunk)
        self.bytes_sent += len(chunk)
        end = not self._outbound and self._end_pending
        if end:
            self.ended = True
        return chunk, end

    @property
    def finished(self) -> bool:
        """The stage ended its response (its last bytes may still wait for a window)."""
        return self.ended or self._end_pending

    @property
    def waiting(self) -> bool:
        return bool(self._outbound) or (self._end_pending and not self.ended)

    def wake(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done() and (not self.write_paused or self.closed):
            waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        self._outbound.clear()
        self.out_size = 0
        self.wake()


# --------------------------------------------------------------------------------------------
# The send side of a connection


class StreamTable:
    """The streams of one connection and everything sent on them."""

    __slots__ = ("core", "loop", "owner", "responses", "streams")

    def __init__(
        self,
        core: H2Core,
        loop: asyncio.AbstractEventLoop,
        owner: StreamOwner,
        responses: PrebuiltResponses,
    ) -> None:
        self.core = core
        self.loop = loop
        self.owner = owner
        self.responses = responses
        self.streams: dict[int, H2Stream] = {}

    @property
    def write_paused(self) -> bool:
        return self.owner.write_paused

    def write_out(self) -> None:
        self.owner.write_out()

    def open(self, stream_id: int) -> H2Stream:
        stream = self.streams[stream_id] = H2Stream(self, stream_id)
        return stream

    def wake_all(self) -> None:
        for stream in list(self.streams.values()):
            stream.wake()

    def end_all(self) -> None:
        for stream in list(self.streams.values()):
            self.end_stream(stream, cancel=True)

    def consumed(self, stream_id: int, length: int) -> None:
        """The forward stage took ``length`` flow-controlled bytes of a request body."""
        if length:
            self.acknowledge(stream_id, length)
            self.write_out()

    def acknowledge(self, stream_id: int, length: int) -> None:
        """Received bytes given back (to the connection alone once the stream is gone)."""
        self.core.acknowledge(stream_id, length)

    def send_headers(self, stream: H2Stream, block: bytes, end_stream: bool) -> None:
        if not self.core.send_headers(stream.stream_id, block, end_stream):
            # Never left behind: a stream that cannot be answered is forgotten (its task,
            # if any, is cancelled), or the connection would wait for it forever.
            self.end_stream(stream, cancel=True)
            return
        if end_stream:
            self.maybe_release(stream)

    def flush_stream(self, stream: H2Stream) -> None:
        """Send what the stream has buffered, as far as the windows allow."""
        core = self.core
        sid = stream.stream_id
        while not stream.closed:
            window = core.sendable(sid)
            if window is None:
                self.end_stream(stream, cancel=True)
                break
            if window == 0 and stream.waiting and stream.out_size:
                if not stream.stalled_since:
                    stream.stalled_since = self.loop.time()
                break
            piece = stream.take(window)
            if piece is None:
                break
            chunk, end = piece
            if not core.send_data(sid, chunk, end):
                self.end_stream(stream, cancel=True)
                break
            stream.stalled_since = 0.0
            if end:
                break
        stream.wake()
        if stream.ended:
            self.maybe_release(stream)

    def flush_all(self) -> None:
        for stream in list(self.streams.values()):
            if stream.waiting:
                self.flush_stream(stream)
        self.write_out()

    def reset_stream(self, stream: H2Stream, code: ErrorCode, reason: str) -> None:
        if not stream.closed:
            self.core.reset(stream.stream_id, code)
            self.owner.count_reset(reason)
        self.end_stream(stream, cancel=True)
        self.write_out()

    def answer(self, stream_id: int, wire: bytes, head_only: bool, stable: bool) -> None:
        """A new stream answered at once with a prebuilt response (a cache hit): HEADERS and
        one DATA frame from the stored bytes when the windows allow, without a stream object
        (the usual case); else through one, waiting for the windows like any response.
        ``stable``: see ``PrebuiltResponses.read``."""
        status, block, body = self.responses.read(wire, stable)
        if head_only or status == 204 or status == 304:
            body = b""
        sent = self.core.respond(stream_id, block, body)
        if sent:
            self.write_out()
        elif sent is not None:  # None: reset meanwhile
            self.open(stream_id).send_prebuilt(block, body)

    def refuse(self, stream_id: int) -> None:
        self.core.reset(stream_id, ErrorCode.REFUSED_STREAM)
        self.owner.count_reset("refused_draining")

    def maybe_release(self, stream: H2Stream) -> None:
        """Forget a stream once its response is out and its task is done."""
        if stream.task is not None:
            return
        if not (stream.ended or stream.closed):
            return
        body = stream.body
        if body is not None and not body.complete:
            # Answered before the body ended: stop the upload (RFC 9113 8.1) and give back
            # what it already took of the connection's window.
            self.core.reset(stream.stream_id, ErrorCode.NO_ERROR)
            body.fail(RequestRejected(400, "answered_early"))
        self.end_stream(stream, cancel=False)

    def end_stream(self, stream: H2Stream, *, cancel: bool) -> None:
        if self.streams.pop(stream.stream_id, None) is None and stream.closed:
            return
        body = stream.body
        if body is not None:
            body.fail(RequestRejected(400, "client_disconnected"))
            left = body.unconsumed()
            if left and self.owner.alive:
                self.acknowledge(stream.stream_id, left)
        stream.close()
        task = stream.task
        if (
            cancel
            and task is not None
            and not task.done()
            and task is not asyncio.current_task()
            # A cache fill's leader finishes (others wait on it): its answer goes nowhere.
            and not leads_fill(task)
        ):
            task.cancel()
        if not self.streams:
            self.owner.streams_gone()


__all__ = [
    "HOP_BY_HOP",
    "STREAM_HIGH_WATER",
    "H2Body",
    "H2Stream",
    "PrebuiltResponses",
    "ResponseHeads",
    "StreamTable",
    "parse_wire",
    "response_head",
]
