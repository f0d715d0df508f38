"""HTTP/2 requests: a request head read into a ``ProxyRequest`` (``build_request``, pure), and
``H2Requests``, which hands each request stream to the pipeline as the HTTP/1.1 front end
does: a bodiless GET/HEAD the cache can answer never leaves the callback (the hit stage's
prebuilt bytes, read back into frames by the stream), anything else runs ``Pipeline.handle``
in a task with the stream as its ``ResponseSink``.  A request the edge refuses (limits, target,
Host) is answered on its own stream; the connection goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from edge.accesslog import H1_FIELDS
from edge.cache import Lookup
from edge.exchange import head_of, replayed_request
from edge.h2core import DataReceived, RequestReceived
from edge.h2streams import H2Body, H2Stream, StreamTable
from edge.h2wire import ErrorCode
from edge.http1 import (
    NO_BODY,
    BodyFraming,
    BodyKind,
    Headers,
    RequestRejected,
    check_request_framing,
    new_request_id,
    valid_request_id,
)
from edge.pipeline import Pipeline, ProxyRequest
from edge.request_target import decide_target, screen_headers
from edge.state import EdgeState, RequestHead
from meridian.config import EdgeLimits
from meridian.log import get_logger

log = get_logger("edge")


def build_request(
    fields: Sequence[tuple[bytes, bytes]],
    ended: bool,
    *,
    limits: EdgeLimits,
    request_id_header: bytes,
    client_ip: str,
    received_at: float,
    scheme: bytes,
    protocol: str,
) -> ProxyRequest:
    """The ``ProxyRequest`` of one HTTP/2 request head (``edge.h2hpack.request_problem`` has
    validated the fields: no upper case, no connection-specific fields, pseudo-fields first and
    once).  The limits of
    HTTP/1.1 apply; ``:authority`` (else Host) goes through ``decide_target`` like any Host;
    cookie crumbs are joined for HTTP/1.1 (RFC 9113 8.2.3).  Raises ``RequestRejected``."""
    method = b""
    path = b""
    authority: bytes | None = None
    headers: Headers = []
    cookies: list[bytes] = []
    size = 0
    hosts = 0
    supplied: bytes | None = None
    for name, value in fields:
        size += len(name) + len(value) + 4
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            hosts += 1
        elif name == request_id_header and supplied is None:
            supplied = value
        headers.append((name, value))
    if cookies:  # RFC 9113 8.2.3: one field again for HTTP/1.1
        headers.append((b"cookie", b"; ".join(cookies)))
    if len(headers) > limits.max_headers:
        raise RequestRejected(431, "too_many_headers")
    if size > limits.max_header_bytes:
        raise RequestRejected(431, "headers_too_large")
    if len(path) > limits.max_url:
        raise RequestRejected(414, "url_too_long")
    if method == b"CONNECT":
        raise RequestRejected(405, "connect_not_supported")
    if hosts > 1:
        raise RequestRejected(400, "duplicate_host")
    host_value = authority
    if host_value is None:
        host_value = next((v for n, v in headers if n == b"host"), None)
    decided = decide_target(path, host_value, "1.1")
    host = decided.host
    headers = screen_headers(headers, host)
    framing = NO_BODY
    if not ended:
        framing = check_request_framing(headers, "1.1", limits)
        if framing.kind is BodyKind.NONE:
            framing = BodyFraming(BodyKind.CHUNKED)
        if method in (b"GET", b"HEAD"):
            raise RequestRejected(400, "body_not_allowed")
    request_supplied = supplied is not None and valid_request_id(supplied)
    return ProxyRequest(
        method=method.decode("ascii", "replace"),
        target=decided.target,
        path=decided.path,
        host=host,
        http_version="2",
        headers=headers,
        keep_alive=True,
        client_ip=client_ip,
        body=framing,
        request_id=supplied if request_supplied and supplied is not None else new_request_id(),
        received_at=received_at,
        request_id_supplied=request_supplied,
        scheme=scheme,
        protocol=protocol,
    )


class H2Head:
    """A request head validated from a repeated header block, under one config snapshot
    (kept on the block's ``DecodedBlock.app``; ``edge.memos.HPACK_BLOCKS`` bounds them)."""

    __slots__ = ("head", "state")

    def __init__(self, state: EdgeState, head: RequestHead) -> None:
        self.state = state
        self.head = head


class H2Requests:
    """The request streams of one connection, handed to the pipeline."""

    __slots__ = ("client_ip", "limits", "loop", "pipeline", "protocol", "scheme", "table")

    def __init__(
        self,
        pipeline: Pipeline,
        table: StreamTable,
        *,
        client_ip: str,
        scheme: bytes,
        protocol: str,
        limits: EdgeLimits,
    ) -> None:
        self.pipeline = pipeline
        self.table = table
        self.loop = table.loop
        self.client_ip = client_ip
        self.scheme = scheme
        self.protocol = protocol
        self.limits = limits

    def open(self, event: RequestReceived) -> None:
        """A new request stream: answered from the cache at once, else run in a task.

        A bodiless GET/HEAD whose header block the client repeats (``DecodedBlock.memoised``)
        keeps the request head it was validated into (an ``edge.state.RequestHead``, as
        HTTP/1.1 keeps one per repeated request's bytes) on the decoded block, under this
        config snapshot: the next request with that block skips ``build_request`` and the
        cache key, and replays the memoised hit like HTTP/1.1 (``Pipeline.replay_hit``)."""
        stream_id = event.stream_id
        ended = event.ended
        state = self.pipeline.state
        if ended:
            known = event.block.app
            if isinstance(known, H2Head) and known.state is state:
                self._replay(stream_id, known.head, None)
                return
        stream = self.table.open(stream_id)
        try:
            request = build_request(
                event.headers,
                ended,
                limits=self.limits,
                request_id_header=state.request_id_header,
                client_ip=self.client_ip,
                received_at=self.pipeline.clock(),
                scheme=self.scheme,
                protocol=self.protocol,
            )
        except RequestRejected as rejected:
            self._reject(stream, rejected)
            return
        stream.request = request
        if ended and (request.method == "GET" or request.method == "HEAD"):
            head = head_of(request)
            if event.block.memoised:
                event.block.app = H2Head(state, head)
            self._replay(stream_id, head, stream, request)
            return
        if request.body.kind is not BodyKind.NONE:
            stream.body = H2Body(self.table, stream_id)
        stream.task = self.loop.create_task(self._run(stream, None))

    def _replay(
        self,
        stream_id: int,
        head: RequestHead,
        stream: H2Stream | None,
        request: ProxyRequest | None = None,
    ) -> None:
        """A bodiless GET/HEAD: a cache hit never leaves this callback, as on HTTP/1.1 (the
        hit stage's bytes, which it accounts, sent as frames); asked as the HTTP/1.1 request
        it is equivalent to, and whatever it looked up goes on to the slow path."""
        pipeline = self.pipeline
        head_only = head.method == "HEAD"
        # Without a request ID line of its own, a hit's bytes are the cached object itself.
        stable = head.supplied_id is None
        if head.hit is not None:
            wire = pipeline.replay_hit(head, self.client_ip, head.supplied_id, self.protocol)
            if wire is not None:
                self._answer(stream_id, stream, wire, head_only, stable)
                return
        supplied = head.supplied_id
        if request is not None:
            request_id, received_at = request.request_id, request.received_at
        else:
            request_id = supplied if supplied is not None else new_request_id()
            received_at = pipeline.clock()
        as_http11 = replayed_request(
            head, self.client_ip, request_id, received_at, head, self.scheme, self.protocol
        )
        access_log = pipeline.access_log
        access_log.protocol = self.protocol
        try:
            wire = pipeline.fast_response(as_http11)
        finally:
            access_log.protocol = H1_FIELDS
        if wire is not None:
            self._answer(stream_id, stream, wire, head_only, stable)
            return
        lookup = pipeline.take_pending(as_http11)
        if stream is None:
            stream = self.table.open(stream_id)
        # The slow path sees the HTTP/2 request, without the memoised head (as before).
        stream.request = as_http11._replace(http_version="2", head=None)
        stream.task = self.loop.create_task(self._run(stream, lookup))

    def _answer(
        self, stream_id: int, stream: H2Stream | None, wire: bytes, head_only: bool, stable: bool
    ) -> None:
        if stream is None:
            self.table.answer(stream_id, wire, head_only, stable)
        else:
            stream.write_complete(wire, close=False)

    def _reject(self, stream: H2Stream, rejected: RequestRejected) -> None:
        """Answer a request the edge refuses to forward on its own stream."""
        stream.write_complete(self.pipeline.refusal(rejected, self.client_ip, "h2"), close=False)
        self.table.maybe_release(stream)

    async def _run(self, stream: H2Stream, lookup: Lookup | None) -> None:
        request = stream.request
        assert request is not None
        try:
            await self.pipeline.handle(request, stream.body, stream, lookup)
        except asyncio.CancelledError:
            pass  # reset by the client, or the connection went away
        except Exception as exc:  # a bug: answer 500 if we still can, never hang the stream
            log.error(
                "request_failed",
                error=repr(exc),
                request_id=request.request_id.decode("ascii", "replace"),
                protocol="h2",
            )
            if not stream.response_started and not stream.closed:
                stream.write_complete(
                    self.pipeline.error_answer(500, "internal_error", request.request_id),
                    close=False,
                )
            else:
                stream.abort()
        finally:
            stream.task = None
            if not stream.closed and not stream.finished:
                # The stage returned without ending its response: never leave it hanging.
                self.table.reset_stream(stream, ErrorCode.INTERNAL_ERROR, "unfinished")
            self.table.maybe_release(stream)

    def data(self, event: DataReceived) -> None:
        """Request body bytes: to their stream's body, else their window back at once."""
        stream = self.table.streams.get(event.stream_id)
        length = event.flow_length
        if stream is None or stream.body is None or stream.body.complete:
            # Nobody reads it (answered already, reset): give the window back at once.
            if length:
                self.table.acknowledge(event.stream_id, length)
            return
        body = stream.body
        body.feed(event.data, length)
        if body.received > self.limits.max_body:
            body.fail(RequestRejected(413, "body_too_large"))
            self.table.acknowledge(event.stream_id, body.unconsumed())
        if event.ended:
            body.finish()


__all__ = ["H2Head", "H2Requests", "build_request"]
