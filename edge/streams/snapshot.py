"""A channel's snapshot: the cached REST object, fetched through the worker's own request path.

The snapshot is an ordinary GET of ``edge.streams.snapshot_path`` run through
``Pipeline.handle`` with a sink that keeps the response (``CaptureSink``): routing, rate
limits, the cache (a hit, a coalesced fill, stale-while-revalidate) and failover all apply, and
the object a REST client fetches at the same moment is the one a stream client starts from.
The origin states the sequence the object reflects in ``X-Sequence``; a response without one,
or that is not JSON, is no snapshot.
"""

from __future__ import annotations

import json
from typing import Protocol

import httptools

from edge.exchange import ProxyRequest, RequestBody, ResponseSink
from edge.http1 import NO_BODY, BodyFraming, Headers, new_request_id

#: Largest snapshot body taken.
MAX_SNAPSHOT = 4 * 1024 * 1024


class Handler(Protocol):
    async def handle(
        self, request: ProxyRequest, body: RequestBody | None, sink: ResponseSink
    ) -> None: ...


class _Parsed:
    """httptools callbacks filling a ``CaptureSink`` from prebuilt response bytes."""

    def __init__(self, sink: CaptureSink) -> None:
        self.sink = sink

    def on_header(self, name: bytes, value: bytes) -> None:
        self.sink.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.sink.write_body(body)


class CaptureSink:
    """A ``ResponseSink`` that keeps the status, headers and body (bounded)."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: Headers = []
        self.body = bytearray()
        self.too_big = False
        self._started = False

    @property
    def response_started(self) -> bool:
        return self._started

    @property
    def write_paused(self) -> bool:
        return False

    @property
    def bytes_sent(self) -> int:
        return len(self.body)

    @property
    def deadline_expired(self) -> bool:
        return False

    def start_response(
        self,
        status: int,
        reason: bytes,
        headers: Headers,
        framing: BodyFraming,
        head_length: int | None,
    ) -> None:
        self._started = True
        self.status = status
        self.headers = list(headers)

    def write_body(self, data: bytes) -> None:
        if len(self.body) + len(data) > MAX_SNAPSHOT:
            self.too_big = True
            return
        self.body += data

    def end_response(self) -> None:
        pass

    def write_complete(self, data: bytes, *, close: bool) -> None:
        """Prebuilt bytes (a cache hit, an error): head and body, parsed here."""
        self._started = True
        parser = httptools.HttpResponseParser(_Parsed(self))
        try:
            parser.feed_data(data)
        except httptools.HttpParserError:
            self.status = 502
            return
        self.status = parser.get_status_code()

    def abort(self) -> None:
        self.status = 502

    async def drain(self) -> None:
        pass

    def expire_after(self, seconds: float) -> None:
        pass


async def fetch_snapshot(
    handler: Handler,
    path: str,
    *,
    host: bytes | None,
    client_ip: str,
    received_at: float,
) -> tuple[int, bytes] | str:
    """(sequence, body) of the snapshot at ``path``, or why there is none."""
    host_line = host or b"localhost"
    request = ProxyRequest(
        method="GET",
        target=path.encode(),
        path=path,
        host=host_line,
        http_version="1.1",
        headers=[(b"host", host_line)],
        keep_alive=True,
        client_ip=client_ip,
        body=NO_BODY,
        request_id=new_request_id(),
        received_at=received_at,
    )
    sink = CaptureSink()
    await handler.handle(request, None, sink)
    if sink.status != 200 or sink.too_big:
        return f"snapshot_status_{sink.status}"
    seq_text = next((v for n, v in sink.headers if n == b"x-sequence"), None)
    if seq_text is None or not seq_text.strip().isdigit() or len(seq_text) > 19:
        return "snapshot_without_sequence"
    body = bytes(sink.body)
    try:
        json.loads(body)
    except ValueError:
        return "snapshot_not_json"
    return int(seq_text), body
