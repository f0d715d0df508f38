"""In-memory doubles for the request path: a response sink, a scripted upstream, a health
source and a pipeline built from them.  No sockets, no processes, no sleeps (modelled on
httpcore's mock backend and uvicorn's MockTransport)."""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from edge.accesslog import AccessLog
from edge.admin import EdgeMetrics
from edge.cache import HttpCache
from edge.cache.entry import Entry, StoredResponse
from edge.cache.policy import Headers as RequestHeaders
from edge.cache.redis_l2 import NO_LOCK, RedisL2
from edge.cache.testing import FakeClock
from edge.exchange import ProxyRequest
from edge.http1 import NO_BODY, BodyFraming, BodyKind, Headers, RequestRejected
from edge.pipeline import Pipeline
from edge.state import EdgeState
from edge.transcode import CompressionStats, Transcoder
from edge.upstream import FailureKind, UpstreamFailure, UpstreamPool
from edge.upstream_wire import UpstreamBodyError
from meridian.config import Config, EdgeTimeouts, parse_config

#: Backends by region, nearest the ``iad`` POP first.
BACKENDS = {"us-east": ("http://u1",), "eu-central": ("http://e1",)}


def make_config(**edge: Any) -> Config:
    return parse_config(
        {
            "regions": {
                "us-east": {"location": {"lat": 39.04, "lon": -77.49}, "backends": ["http://u1"]},
                "eu-central": {
                    "location": {"lat": 50.11, "lon": 8.68},
                    "backends": ["http://e1"],
                },
            },
            "pops": {"iad": {"location": {"lat": 39.04, "lon": -77.49}, "addresses": ["1.1.1.1"]}},
            "dns": {
                "zone": "m.test",
                "soa": {"mname": "ns1.m.test", "rname": "h.m.test"},
                "ns": [{"name": "ns1.m.test", "addresses": ["127.0.0.1"]}],
                "names": {"api": {"targets": "pops"}},
            },
            "edge": {
                "services": {"market": {}},
                "routes": [{"name": "market", "service": "market", "path_prefix": "/api/"}],
                **edge,
            },
        }
    )


# -- the client side ---------------------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """What a front end writes to, in memory: the bytes (``written``; not kept with
    ``keep=False``, for benchmarks), how many writes, and whether it was closed or paused."""

    def __init__(self, *, keep: bool = True) -> None:
        super().__init__()
        self.keep = keep
        self.written = bytearray()
        self.writes = 0
        self.closed = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 50000) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.writes += 1
        if self.keep:
            self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0


class FakeSink:
    """A ``ResponseSink`` that keeps what it is given."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: Headers = []
        self.framing: BodyFraming | None = None
        self.body = bytearray()
        self.ended = False
        self.aborted = False
        self.complete: bytes | None = None
        self.closed = False
        self.write_paused = False
        self.expires_after: float | None = None
        self.deadline_expired = False
        self.drains = 0

    @property
    def response_started(self) -> bool:
        return self.status is not None or self.complete is not None

    @property
    def bytes_sent(self) -> int:
        return len(self.body) + len(self.complete or b"")

    def start_response(
        self,
        status: int,
        reason: bytes,
        headers: Headers,
        framing: BodyFraming,
        head_length: int | None,
    ) -> None:
        assert not self.response_started
        self.status, self.headers, self.framing = status, list(headers), framing

    def write_body(self, data: bytes) -> None:
        assert self.status is not None and not self.ended
        self.body += data

    def end_response(self) -> None:
        self.ended = True

    def write_complete(self, data: bytes, *, close: bool) -> None:
        assert not self.response_started
        self.complete, self.closed = data, close
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = [
            (name.lower(), value.strip())
            for name, _, value in (line.partition(b":") for line in lines[1:])
        ]
        self.body += body
        self.ended = True

    def abort(self) -> None:
        self.aborted = True

    async def drain(self) -> None:
        self.drains += 1

    def expire_after(self, seconds: float) -> None:
        self.expires_after = seconds

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class FakeBody:
    """A request body streamed in the chunks given."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks
        self.error: RequestRejected | None = None

    async def _iterate(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()


def request(
    path: str = "/api/ticker",
    method: str = "GET",
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    body: bytes | None = None,
    keep_alive: bool = True,
    received_at: float = 0.0,
) -> ProxyRequest:
    lines: Headers = [(b"host", b"example.test"), *headers]
    framing = NO_BODY
    if body is not None:
        lines.append((b"content-length", b"%d" % len(body)))
        framing = BodyFraming(BodyKind.LENGTH, len(body))
    return ProxyRequest(
        method=method,
        target=path.encode(),
        path=path.partition("?")[0],
        host=b"example.test",
        http_version="1.1",
        headers=lines,
        keep_alive=keep_alive,
        client_ip="192.0.2.7",
        body=framing,
        request_id=b"rid-1",
        received_at=received_at,
    )


# -- the upstream side -------------------------------------------------------------------------


@dataclass
class Reply:
    """A scripted upstream response.  ``chunks`` arrive one by one (``whole``: already in the
    buffer with the head); ``broken_after`` chunks, the connection drops; ``gate``: the head
    waits for it."""

    status: int = 200
    headers: Headers = field(default_factory=list)
    chunks: tuple[bytes, ...] = (b"ok",)
    whole: bool = True
    broken_after: int | None = None
    gate: asyncio.Event | None = None
    length: bool = True


@dataclass
class Fail:
    """A scripted attempt that gets no response head."""

    kind: FailureKind = FailureKind.CONNECT
    gate: asyncio.Event | None = None


class FakeContent:
    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def is_eof(self) -> bool:
        return self.reply.whole and self.reply.broken_after is None

    def read_nowait(self, n: int = -1) -> bytes:
        return b"".join(self.reply.chunks)

    async def _iter(self) -> AsyncIterator[bytes]:
        for index, chunk in enumerate(self.reply.chunks):
            if self.reply.broken_after is not None and index >= self.reply.broken_after:
                raise UpstreamBodyError("connection closed mid-body")
            await asyncio.sleep(0)  # a turn of the loop, as a socket read would take
            yield chunk

    def iter_any(self) -> AsyncIterator[bytes]:
        return self._iter()


class FakeResponse:
    """What the stages read from an ``edge.upstream_client.OriginResponse``."""

    def __init__(self, reply: Reply) -> None:
        self.status = reply.status
        self.reason = "OK" if reply.status == 200 else "Whatever"
        self.raw_headers = tuple(reply.headers)
        self.content_length = sum(map(len, reply.chunks)) if reply.length else None
        self.content = FakeContent(reply)
        self.released = False

    def release(self) -> None:
        self.released = True


@dataclass
class Sent:
    backend: str
    method: str
    target: str
    headers: CIMultiDict[str]
    body: object


class ScriptedUpstream(UpstreamPool):
    """The real pool's slots and accounting, with ``send`` answered from a script: per backend,
    a queue of ``Reply`` / ``Fail`` (the last one repeats)."""

    def __init__(self, script: dict[str, list[Reply | Fail]] | None = None) -> None:
        super().__init__(pool_size=8, timeouts=EdgeTimeouts())
        self.script: dict[str, deque[Reply | Fail]] = {
            backend: deque(items) for backend, items in (script or {}).items()
        }
        self.sent: list[Sent] = []
        self.responses: list[FakeResponse] = []

    async def send(  # type: ignore[override]
        self,
        backend: str,
        method: str,
        target: str,
        headers: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        length: int | None = None,
        *,
        replayable: bool = False,
    ) -> FakeResponse:
        payload: bytes | None
        if body is None or isinstance(body, bytes):
            payload = body
        else:
            payload = b"".join([chunk async for chunk in body])
        self.sent.append(Sent(backend, method, target, _lines(headers), payload))
        queue = self.script.get(backend)
        if not queue:
            raise UpstreamFailure(FailureKind.CONNECT, f"nothing scripted for {backend}")
        item = queue[0] if len(queue) == 1 else queue.popleft()
        if item.gate is not None:
            await item.gate.wait()
        if isinstance(item, Fail):
            raise UpstreamFailure(item.kind, "scripted")
        response = FakeResponse(item)
        self.responses.append(response)
        return response


def _lines(block: bytes) -> CIMultiDict[str]:
    """Header lines as sent upstream, for assertions by name."""
    lines: CIMultiDict[str] = CIMultiDict()
    for line in block.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b": ")
            lines.add(name.decode("latin-1"), value.decode("latin-1"))
    return lines


class FakeSnapshot:
    def __init__(self, down: frozenset[str] = frozenset()) -> None:
        self.down = down

    def region_up(self, name: str) -> bool:
        return any(b not in self.down for b in BACKENDS.get(name, ()))

    def ejected_only(self, name: str) -> bool:
        return False

    def usable_backends(self, region: str) -> tuple[str, ...]:
        return tuple(b for b in BACKENDS.get(region, ()) if b not in self.down)

    def backend_up(self, url: str) -> bool:
        return url not in self.down


class FakeHealth:
    def __init__(self) -> None:
        self.snapshot = FakeSnapshot()
        self.reports: list[tuple[str, bool]] = []

    def report(self, backend_url: str, ok: bool) -> None:
        self.reports.append((backend_url, ok))


@dataclass
class World:
    pipeline: Pipeline
    upstream: ScriptedUpstream
    health: FakeHealth
    cache_clock: FakeClock
    clock: FakeClock

    async def run(
        self, req: ProxyRequest, body: FakeBody | None = None, sink: FakeSink | None = None
    ) -> FakeSink:
        """One request on the slow path, as the protocol runs it (fast path first)."""
        sink = sink or FakeSink()
        lookup = None
        if body is None and req.method in ("GET", "HEAD"):
            wire = self.pipeline.fast_response(req)
            if wire is not None:
                sink.write_complete(wire, close=False)
                return sink
            lookup = self.pipeline.take_pending(req)
        await self.pipeline.handle(req, body, sink, lookup)
        return sink

    async def settle(self) -> None:
        """Let background work (refreshes) finish."""
        cache = self.pipeline.cache
        for _ in range(50):
            tasks = [t for t in (cache.background.tasks if cache else ()) if not t.done()]
            if not tasks:
                await asyncio.sleep(0)
                return
            await asyncio.gather(*tasks, return_exceptions=True)


class MemoryL2(RedisL2):
    """A POP's shared L2 in a dict, for the worlds given it: what a fill writes (never
    purged or expired), read back by key; no lock is ever held.  No Redis is reached."""

    def __init__(self) -> None:
        super().__init__("redis://127.0.0.1:9", timeout=0.05, max_value=1 << 20, clock=FakeClock())
        self.stored: dict[bytes, tuple[bytes, StoredResponse]] = {}
        self.reads = 0

    async def get(
        self, primary: bytes, headers: RequestHeaders
    ) -> tuple[bytes, StoredResponse] | None:
        self.reads += 1
        return self.stored.get(primary)

    async def put(self, entry: Entry) -> bool:
        self.stored[entry.primary] = (entry.key, entry.response)
        return True

    async def acquire(self, key: bytes, ttl: float) -> bytes | None:
        return NO_LOCK

    async def release(self, key: bytes, token: bytes) -> None:
        pass


def world(
    script: dict[str, list[Reply | Fail]] | None = None,
    *,
    cached: bool = True,
    config: Config | None = None,
    l2: RedisL2 | None = None,
) -> World:
    config = config or make_config()
    registry = CollectorRegistry()
    cache_clock = FakeClock()
    clock = FakeClock(100.0)
    upstream = ScriptedUpstream(script)
    health = FakeHealth()
    transcoder = Transcoder(CompressionStats())
    cache = HttpCache(config.edge.cache, registry, clock=cache_clock, l2=l2) if cached else None
    pipeline = Pipeline(
        EdgeState.build(config, "iad", 1),
        upstream=upstream,
        health=health,
        metrics=EdgeMetrics(registry, pop="iad", latency_target=config.edge.latency_target),
        access_log=AccessLog(),
        clock=clock,
        rng=random.Random(7),
        cache=cache,
        transcoder=transcoder,
    )
    return World(pipeline, upstream, health, cache_clock, clock)
