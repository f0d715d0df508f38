"""The upstream client over real sockets against a real origin process (``tests.upstream_support``).

First the client alone (``OriginClient`` in this process): keep-alive reuse proven by the
origin's own connection count, pool limits, every timeout, every lying-origin case, streamed
request bodies, backpressure.  Then through an edge process: a lying origin is a clean 502
before the head and a cut connection after it, never stored; a slow client reading a 100 MiB
body keeps the edge's RSS flat; a POST is never replayed, but one whose connect failed goes
elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edge.upstream import UPSTREAM_BODY_ERRORS
from edge.upstream_client import (
    HIGH_WATER,
    Backend,
    ClientLimits,
    OriginClient,
    OriginResponse,
    UpstreamError,
)
from edge.upstream_wire import UpstreamBodyError, header_block
from tests.edge_support import (
    Edge,
    Proc,
    free_port,
    http_request,
    parse_response,
    raw_exchange,
    read_until_close,
    region,
    write_config,
)

LIMITS = ClientLimits(
    connect=1.0, first_byte=2.0, read_idle=2.0, idle_timeout=30.0, max_idle=8, max_requests=1000
)


class RawOrigin(Proc):
    def __init__(self, tmp: Path, name: str = "raw", *, tls: list[str] | None = None) -> None:
        argv = [sys.executable, "-m", "tests.upstream_support", "--port", "0", *(tls or [])]
        super().__init__(argv, tmp / f"origin-{name}.log", f"origin {name}")
        match = self.wait_for_log(r"listening port=(\d+)")
        self.port = int(match.group(1))
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._asked = 0

    def stats(self) -> dict[str, Any]:
        self._asked += 1
        status, _, body = http_request(self.port, "GET", "/stats")
        assert status == 200
        result: dict[str, Any] = json.loads(body)
        return result

    def connections(self) -> int:
        # Each /stats comes on a connection of its own: those are not counted here.
        return int(self.stats()["connections"]) - self._asked

    def count(self, path: str) -> int:
        return int(self.stats()["paths"].get(path, 0))


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RawOrigin]:
    proc = RawOrigin(tmp_path_factory.mktemp("raw-origin"))
    try:
        yield proc
    finally:
        proc.stop()


@contextlib.asynccontextmanager
async def _client(**changes: Any) -> AsyncIterator[OriginClient]:
    client = OriginClient(replace(LIMITS, **changes))
    client.start()
    try:
        yield client
    finally:
        await client.close()


_HEADERS = header_block([(b"host", b"origin.test"), (b"x-test", b"1")])


async def _get(client: OriginClient, origin: RawOrigin, target: bytes) -> OriginResponse:
    return await client.send(origin.url, "GET", target, _HEADERS, None)


async def _body(response: OriginResponse) -> bytes:
    try:
        return b"".join([chunk async for chunk in response.content.iter_any()])
    finally:
        response.release()


# -- keep-alive and the pool ------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(origin: RawOrigin) -> None:
    before = origin.connections()
    async with _client() as client:
        for _ in range(20):
            assert await _body(await _get(client, origin, b"/ok?size=100")) == b"x" * 100
        for _ in range(5):  # chunked answers with trailers leave it reusable too
            assert await _body(await _get(client, origin, b"/chunked?size=7")) == b"c" * 7
        assert client.stats.created[origin.url] == 1
        assert client.stats.reused[origin.url] == 24
    assert origin.connections() - before == 1


async def test_concurrent_requests_each_get_a_connection_and_max_idle_are_kept(
    origin: RawOrigin,
) -> None:
    before = origin.connections()
    async with _client(max_idle=2) as client:
        responses = await asyncio.gather(
            *[_get(client, origin, b"/slow-head?ms=200") for _ in range(5)]
        )
        assert [await _body(r) for r in responses] == [b"late"] * 5
        assert client.idle_count(origin.url) == 2
        assert client.stats.open[origin.url] == 2
        # Two at once again: both idle connections are reused, nothing new is opened.
        await asyncio.gather(*[_body(await _get(client, origin, b"/ok")) for _ in range(2)])
        assert client.stats.created[origin.url] == 5
    assert origin.connections() - before == 5


async def test_a_connection_is_retired_after_max_requests(origin: RawOrigin) -> None:
    before = origin.connections()
    async with _client(max_requests=3) as client:
        for _ in range(7):
            await _body(await _get(client, origin, b"/ok"))
    assert origin.connections() - before == 3


async def test_an_idle_connection_past_its_idle_timeout_is_closed_not_reused(
    origin: RawOrigin,
) -> None:
    async with _client(idle_timeout=5.0) as client:
        await _body(await _get(client, origin, b"/ok"))
        pool = client.pool(origin.url)
        (idle,) = pool.idle
        idle.used_at -= 10  # aged instead of slept
        await _body(await _get(client, origin, b"/ok"))
        assert idle.closed and client.stats.created[origin.url] == 2
        (fresh,) = pool.idle
        fresh.used_at -= 10
        pool.sweep(pool.loop.time())  # what the sweeper does every second
        assert fresh.closed and not pool.idle and not pool.open


async def test_an_idle_connection_the_origin_closes_leaves_the_pool(origin: RawOrigin) -> None:
    async with _client() as client:
        response = await _get(client, origin, b"/close-delimited")
        assert await _body(response) == b"until the end"
        assert client.idle_count(origin.url) == 0  # ended by the close: never reusable
        assert await _body(await _get(client, origin, b"/ok")) == b"xx"
        assert client.stats.created[origin.url] == 2


# -- timeouts ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _full_backlog() -> Iterator[int]:
    """A port whose listen queue is full: the kernel drops further SYNs, connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_connect_timeout_is_a_connect_failure_that_sent_nothing() -> None:
    with _full_backlog() as port:
        async with _client(connect=0.3) as client:
            started = time.monotonic()
            with pytest.raises(UpstreamError) as caught:
                await client.send(f"http://127.0.0.1:{port}", "POST", b"/", _HEADERS, b"{}")
            assert caught.value.kind == "connect" and "timeout" in caught.value.detail
            assert time.monotonic() - started < 2


async def test_a_refused_connect_is_a_connect_failure() -> None:
    port = free_port()  # nothing listens there
    async with _client() as client:
        with pytest.raises(UpstreamError) as caught:
            await client.send(f"http://127.0.0.1:{port}", "GET", b"/", _HEADERS, None)
        assert caught.value.kind == "connect_os"


async def test_first_byte_timeout(origin: RawOrigin) -> None:
    async with _client(first_byte=0.3) as client:
        started = time.monotonic()
        with pytest.raises(UpstreamError) as caught:
            await _get(client, origin, b"/slow-head?ms=3000")
        assert caught.value.kind == "timeout"
        assert 0.25 < time.monotonic() - started < 2
        assert client.idle_count(origin.url) == 0


async def test_a_body_stalled_past_the_read_timeout_breaks(origin: RawOrigin) -> None:
    async with _client(read_idle=0.3) as client:
        response = await _get(client, origin, b"/stall-body")
        assert response.status == 200 and response.content_length == 100
        with pytest.raises(UPSTREAM_BODY_ERRORS):
            await _body(response)
        assert client.idle_count(origin.url) == 0


# -- lying origins -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [b"/short", b"/chunk-cut"])
async def test_a_body_cut_short_is_an_error_never_a_clean_end(
    origin: RawOrigin, path: bytes
) -> None:
    async with _client() as client:
        response = await _get(client, origin, path)
        assert response.status == 200
        with pytest.raises(UpstreamBodyError):
            await _body(response)
        assert client.idle_count(origin.url) == 0


@pytest.mark.parametrize(
    ("path", "kind"),
    [(b"/garbage", "protocol"), (b"/both", "protocol"), (b"/drop", "reset")],
)
async def test_no_usable_head_is_an_upstream_error(origin: RawOrigin, path: bytes, kind: str):
    async with _client() as client:
        with pytest.raises(UpstreamError) as caught:
            await _get(client, origin, path)
        assert caught.value.kind == kind
        assert client.idle_count(origin.url) == 0


async def test_bytes_past_the_declared_length_are_dropped_with_the_connection(
    origin: RawOrigin,
) -> None:
    before = origin.connections()
    async with _client() as client:
        assert await _body(await _get(client, origin, b"/long")) == b"hello"
        assert await _body(await _get(client, origin, b"/ok")) == b"xx"
    assert origin.connections() - before == 2  # the spoiled connection was not reused


async def test_a_head_request_ends_with_the_head(origin: RawOrigin) -> None:
    async with _client() as client:
        response = await client.send(origin.url, "HEAD", b"/ok?size=5000", _HEADERS, None)
        assert response.content.is_eof() and await _body(response) == b""
        assert client.idle_count(origin.url) == 1


# -- request bodies ---------------------------------------------------------------------------


async def _pieces(count: int, size: int) -> AsyncIterator[bytes]:
    for index in range(count):
        yield bytes([65 + index % 26]) * size


@pytest.mark.parametrize("length", [None, 40 * 100_000])
async def test_streamed_request_bodies_arrive_whole(origin: RawOrigin, length: int | None):
    import hashlib

    expected = b"".join([p async for p in _pieces(40, 100_000)])
    async with _client() as client:
        response = await client.send(
            origin.url, "PUT", b"/echo-body", _HEADERS, _pieces(40, 100_000), length
        )
        answer = json.loads(await _body(response))
    assert answer["length"] == len(expected)
    assert answer["sha256"] == hashlib.sha256(expected).hexdigest()
    assert answer["framing"] == ("chunked" if length is None else "length")


async def test_a_slow_reader_pauses_the_upstream_instead_of_buffering(origin: RawOrigin) -> None:
    async with _client() as client:
        response = await _get(client, origin, b"/big?mb=64")
        connection = response._connection
        assert connection is not None and connection.reader is not None
        reader = connection.reader
        # Nobody reads: the origin keeps sending until the buffer passes its mark.
        for _ in range(500):  # a poll over a real socket, 5 s at most
            if connection.paused:
                break
            await asyncio.sleep(0.01)
        assert connection.paused
        # One more turn of the loop buffers nothing more while paused.
        held = reader.buffered
        await asyncio.sleep(0.2)
        assert reader.buffered == held <= HIGH_WATER + 2**18
        total = 0
        async for piece in response.content.iter_any():
            total += len(piece)
            assert reader.buffered <= HIGH_WATER + 2**18
        response.release()
        assert total == 64 * 2**20


def test_backend_urls_are_split_once() -> None:
    backend = Backend.parse("http://origin.test:8080/base/")
    assert (backend.host, backend.port, backend.prefix) == ("origin.test", 8080, b"/base")
    assert backend.authority == b"origin.test:8080"
    v6 = Backend.parse("http://[::1]:81")
    assert (v6.host, v6.port, v6.prefix) == ("::1", 81, b"")
    with pytest.raises(ValueError, match="only http"):
        Backend.parse("ftp://origin.test")


# -- through the edge ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edged(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Edge, RawOrigin, RawOrigin, str]]:
    """An edge over one region of three backends: two raw origins and a port nobody listens
    on (health checks every 30 s: it stays in rotation while the tests run)."""
    tmp = tmp_path_factory.mktemp("upstream-edge")
    first, second = RawOrigin(tmp, "a"), RawOrigin(tmp, "b")
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_config(
        tmp / "config.yaml",
        {"eu-central": region(50.11, 8.68, [first.url, second.url, dead])},
        health={"interval": "30s", "fast_interval": "30s"},
        outlier={"enabled": False},
        edge={
            # first byte 5 s: /slow-read answers once it has read a 48 MiB upload that the
            # edge counts as sent when the kernel took it, seconds earlier on a loaded machine.
            "timeouts": {"first_byte": "5s", "client_body": "60s"},
            "upstream": {"read_timeout": "1s"},
            "limits": {"max_body": "64MiB"},
        },
    )
    edge = Edge(config, "fra", tmp)
    try:
        edge.ready()
        yield edge, first, second, dead
    finally:
        edge.stop()
        first.stop()
        second.stop()


def _both(origins: tuple[RawOrigin, RawOrigin], path: str) -> int:
    return sum(o.count(path) for o in origins)


def test_a_head_that_is_not_http_is_a_clean_502(edged: tuple[Edge, RawOrigin, RawOrigin, str]):
    edge = edged[0]
    for path in ("/garbage", "/both"):
        status, _, body = http_request(edge.port, "GET", path)
        assert status == 502, (path, body)
        assert json.loads(body)["reason"].startswith("upstream_")


def test_a_body_cut_after_the_head_cuts_the_client_and_is_never_stored(
    edged: tuple[Edge, RawOrigin, RawOrigin, str],
) -> None:
    edge, first, second, _ = edged
    for path in ("/short", "/chunk-cut"):
        before = _both((first, second), path)
        for _ in range(2):
            raw = raw_exchange(
                edge.port, f"GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode(), timeout=5
            )
            head, _, rest = raw.partition(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 200"):
                # The head went out: the connection is cut, the body short of its framing.
                if b"content-length: 100" in head.lower():
                    assert len(rest) < 100
                else:
                    assert not rest.endswith(b"0\r\n\r\n")
            else:
                assert head.startswith(b"HTTP/1.1 502"), raw[:200]
        assert _both((first, second), path) - before == 2  # asked again: nothing was stored


def test_a_post_is_never_replayed_but_one_whose_connect_failed_goes_elsewhere(
    edged: tuple[Edge, RawOrigin, RawOrigin, str],
) -> None:
    edge, first, second, dead = edged
    order = b'{"symbol":"BTC-USD","qty":1}'
    before = _both((first, second), "/echo-body")
    for _ in range(12):
        status, _, body = http_request(
            edge.port, "POST", "/echo-body", body=order, headers={"Content-Type": "x/json"}
        )
        assert status == 200, body
        assert json.loads(body)["length"] == len(order)
    # Each reached an origin exactly once, although some were first sent at the dead port.
    assert _both((first, second), "/echo-body") - before == 12
    failed = [
        line
        for line in edge.log_text().splitlines()
        if "event=upstream_failed" in line and dead in line
    ]
    assert failed and all("kind=connect" in line for line in failed)
    # A POST that reached an origin which then closed without answering: not replayed.
    before = _both((first, second), "/drop")
    status, _, body = http_request(edge.port, "POST", "/drop", body=order)
    assert status == 502
    assert _both((first, second), "/drop") - before == 1


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_slow_client_of_a_100_mib_body_keeps_the_edge_rss_flat(
    edged: tuple[Edge, RawOrigin, RawOrigin, str],
) -> None:
    edge, *_ = edged
    http_request(edge.port, "GET", "/ok?size=10")  # warm: the first request's allocations
    baseline = _rss(edge.pid)
    peak = baseline
    size = 100 * 2**20
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect(("127.0.0.1", edge.port))
        sock.sendall(b"GET /big?mb=100 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        # Not reading for a while: an edge without backpressure would buffer it all now.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            peak = max(peak, _rss(edge.pid))
            time.sleep(0.05)
        received = 0
        reads = 0
        while True:
            data = sock.recv(256 * 1024)
            if not data:
                break
            received += len(data)
            reads += 1
            if reads % 64 == 0:
                peak = max(peak, _rss(edge.pid))
                time.sleep(0.002)  # a slow reader
    assert received > size  # the head and every byte of the body
    assert peak - baseline < 32 * 2**20, f"edge RSS grew {(peak - baseline) / 2**20:.1f} MiB"


def test_a_fast_upload_to_a_slow_origin_keeps_the_edge_rss_flat(
    edged: tuple[Edge, RawOrigin, RawOrigin, str],
) -> None:
    """The reverse direction: the upstream's writes wait to drain before more of the client's
    body is read, so the client is held back, not buffered."""
    edge, first, second, _ = edged
    before = _both((first, second), "/slow-read")
    http_request(edge.port, "GET", "/ok?size=11")
    baseline = peak = _rss(edge.pid)
    size = 48 * 2**20
    piece = b"u" * 2**16
    with socket.create_connection(("127.0.0.1", edge.port), timeout=30) as sock:
        sock.sendall(
            b"PUT /slow-read HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        for index in range(size // len(piece)):
            sock.sendall(piece)  # as fast as the edge takes it
            if index % 32 == 0:
                peak = max(peak, _rss(edge.pid))
        raw = read_until_close(sock, 30)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    assert raw.endswith(b"read")
    assert _both((first, second), "/slow-read") - before == 1
    assert peak - baseline < 32 * 2**20, f"edge RSS grew {(peak - baseline) / 2**20:.1f} MiB"


def test_the_edge_reports_upstream_connections(
    edged: tuple[Edge, RawOrigin, RawOrigin, str],
) -> None:
    edge, first = edged[0], edged[1]
    for index in range(5):
        status, _, _ = http_request(edge.port, "GET", f"/ok?size=3&metrics={index}")
        assert status == 200
    assert edge.metric("meridian_edge_upstream_connections_reused_total") >= 1
    assert edge.metric("meridian_edge_upstream_connections_created_total") >= 1
    assert edge.metric("meridian_edge_upstream_connections_open", backend=first.url) >= 0
    assert edge.metric("meridian_edge_upstream_first_byte_seconds_count") >= 5
    assert edge.metric("meridian_edge_upstream_connect_seconds_count") >= 1


__all__ = ["RawOrigin", "parse_response"]


def test_requests_over_pool_size_wait_for_a_connection_and_never_open_more(
    tmp_path: Path,
) -> None:
    origin = RawOrigin(tmp_path, "limited")
    config = write_config(
        tmp_path / "config.yaml",
        {"eu-central": region(50.11, 8.68, [origin.url])},
        health={"interval": "30s", "fast_interval": "30s"},
        edge={"pool_size": 2},
    )
    edge = Edge(config, "fra", tmp_path)
    try:
        edge.ready()
        before = origin.connections()
        checks_before = origin.count("/healthz")

        def one(index: int) -> int:
            status, _, _ = http_request(edge.port, "GET", f"/slow-head?ms=300&i={index}")
            return status

        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(one, range(6)))
        assert statuses == [200] * 6
        assert origin.count("/slow-head") == 6
        # Two at a time, on two connections (health checks come on connections of their own).
        checks = origin.count("/healthz") - checks_before
        assert origin.connections() - before - checks <= 2
        assert edge.metric("meridian_edge_upstream_connections_created_total") == 2
        assert edge.metric("meridian_edge_upstream_pool_waits_total") >= 4
    finally:
        edge.stop()
        origin.stop()


def test_expect_100_continue_is_answered_by_the_edge_and_the_body_then_forwarded(
    edged: tuple[Edge, RawOrigin, RawOrigin, str],
) -> None:
    edge = edged[0]
    body = b'{"symbol":"ETH-USD","qty":2}'
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(
            b"POST /echo-body HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        interim = sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        sock.sendall(body)
        status, _, answer = parse_response(read_until_close(sock, 10))
    assert status == 200
    echoed = json.loads(answer)
    assert echoed["length"] == len(body) and echoed["method"] == "POST"


async def test_a_backend_name_is_resolved_once_for_many_connections(origin: RawOrigin) -> None:
    """``localhost`` may come first as ::1, where nothing listens: the next address is tried.
    Its addresses are kept (``DNS_TTL``): new connections cost no lookup."""
    loop = asyncio.get_running_loop()
    lookups: list[str] = []
    original = loop.getaddrinfo

    async def counting(host: Any, *args: Any, **kwargs: Any) -> Any:
        lookups.append(str(host))
        return await original(host, *args, **kwargs)

    url = f"http://localhost:{origin.port}"
    loop.getaddrinfo = counting  # type: ignore[method-assign]
    try:
        async with _client(max_requests=1) as client:
            for _ in range(3):
                response = await client.send(url, "GET", b"/ok?size=5", _HEADERS, None)
                assert await _body(response) == b"xxxxx"
            assert client.stats.created[url] == 3
    finally:
        loop.getaddrinfo = original  # type: ignore[method-assign]
    assert lookups == ["localhost"]


async def test_a_kept_alive_connection_closed_under_a_request_replays_only_what_may_go_twice(
    origin: RawOrigin,
) -> None:
    """/drop closes without a byte, as an origin whose idle timeout races ours does: on a
    kept-alive connection a GET is sent once more on a new one; a POST never."""
    async with _client() as client:
        for method, replayable, sent in (("GET", True, 2), ("POST", False, 1)):
            await _body(await _get(client, origin, b"/ok"))  # a connection to keep alive
            assert client.idle_count(origin.url) == 1
            before = origin.count("/drop")
            with pytest.raises(UpstreamError) as caught:
                await client.send(
                    origin.url, method, b"/drop", _HEADERS, b"", replayable=replayable
                )
            assert caught.value.kind == "reset"
            assert origin.count("/drop") - before == sent
        assert client.stats.stale[origin.url] == 1
        # On a new connection there is no race to blame: never sent again.
        before = origin.count("/drop")
        with pytest.raises(UpstreamError):
            await client.send(origin.url, "GET", b"/drop", _HEADERS, None, replayable=True)
        assert origin.count("/drop") - before == 1
