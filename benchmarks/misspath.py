"""The edge's HTTP/1.1 cache-miss path in one process: CPU per miss, without sockets.

    python -m benchmarks.misspath [--requests 20000] [--rounds 3] [--profile FILE]

The real front end (``edge.protocol.EdgeConnection``), pipeline, cache and upstream client
(``edge.upstream.UpstreamPool`` over ``edge.upstream_client``: its pool, ``upstream_wire``'s
request encoding and httptools response parse), with both ends' transports in memory: each
request goes in through ``data_received``; the upstream connection answers every request it is
written with the sample origin's ticker response (``meridian.origin``: 1,963 bytes, public,
max-age=1), delivered on the loop's next turn as a socket read would be.  Scenarios, as in
``benchmarks.compare``:

* miss  - (d) ``GET /api/v1/ticker/BTC-USD?u=N``, a new key every request: forwarded, stored,
  answered;
* post  - (g) ``POST /api/v1/orders`` with a ~300-byte JSON body, answered 201 by the origin,
  never stored.

Prints CPU µs per request (``time.process_time``: this process only) per round and the best
round.  What it leaves out: the kernel's socket work on both sides, which ``benchmarks.compare``
measures end to end.  ``--profile FILE``: cProfile of the rounds run (``--only`` picks the
scenario), written to FILE (``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvloop

from benchmarks.hitpath import print_rounds
from edge.protocol import Connections, EdgeConnection
from edge.server import _settle_garbage_collector as settle_garbage_collector
from edge.upstream import UpstreamPool
from edge.upstream_client import BackendPool, Connection
from meridian.config import EdgeTimeouts
from tests.stage_support import FakeTransport, make_config, world

#: The sample origin's answer to a ticker miss, as it arrives on the wire.
TICKER_BODY = (
    b'{"symbol":"BTC-USD","book":['
    + b",".join(b'["659%02d.61","0.0127%04d"]' % (i, i * 37) for i in range(60))
    + b"]}"
)
TICKER = (
    b"HTTP/1.1 200 OK\r\n"
    b'ETag: "e07928b494debfa6996e4b7b"\r\n'
    b"Last-Modified: Mon, 07 Dec 2026 03:52:41 GMT\r\n"
    b"Cache-Control: public, max-age=1\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"Date: Mon, 07 Dec 2026 03:52:41 GMT\r\n"
    b"Server: Python/3.11 aiohttp/3.14.5\r\n"
    b"X-Origin-Region: bench\r\n\r\n" % len(TICKER_BODY)
) + TICKER_BODY
ORDER_BODY = (
    b'{"client_order_id":"c-0000000001","symbol":"BTC-USD","side":"buy","type":"limit",'
    b'"price":"65943.61","size":"0.01250000","time_in_force":"GTC","post_only":false,'
    b'"self_trade_prevention":"cancel_newest","reduce_only":false,"leverage":"1",'
    b'"tag":"bench","nonce":1796615561000123}'
)
CREATED_BODY = b'{"order_id":"o-1","status":"open","client_order_id":"c-0000000001"}'
CREATED = (
    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"Date: Mon, 07 Dec 2026 03:52:41 GMT\r\nServer: Python/3.11 aiohttp/3.14.5\r\n"
    b"X-Origin-Region: bench\r\n\r\n" % len(CREATED_BODY)
) + CREATED_BODY


class OriginTransport(FakeTransport):
    """An upstream connection's transport: every request written is answered with ``reply``
    on the loop's next turn (as a socket read would deliver it)."""

    def __init__(self, protocol: Connection, reply: Callable[[], bytes]) -> None:
        super().__init__(keep=False)
        self.protocol = protocol
        self.reply = reply
        self.loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        super().write(data)
        self.loop.call_soon(self.protocol.data_received, self.reply())


class InMemoryBackend(BackendPool):
    """A backend pool whose connections are made in memory (``OriginTransport``)."""

    __slots__ = ("reply",)
    reply: Callable[[], bytes]

    async def connect(self) -> Connection:
        connection = Connection(self)
        connection.connection_made(OriginTransport(connection, self.reply))
        self.open.add(connection)
        return connection


def upstream_in_memory(reply: Callable[[], bytes]) -> UpstreamPool:
    """The real ``UpstreamPool`` and client, its backends' connections in memory."""
    upstream = UpstreamPool(pool_size=64, timeouts=EdgeTimeouts())
    client = upstream.client
    loop = asyncio.get_running_loop()
    for url in ("http://u1", "http://e1"):
        real = client.pool(url)
        pool = InMemoryBackend(real.backend, real.limits, loop, client.stats)
        pool.reply = reply
        client._pools[url] = pool
    return upstream


def misses() -> Iterator[bytes]:
    n = 0
    while True:
        n += 1
        yield b"GET /api/v1/ticker/BTC-USD?u=%d HTTP/1.1\r\nHost: example.test\r\n\r\n" % n


def posts() -> Iterator[bytes]:
    head = (
        b"POST /api/v1/orders HTTP/1.1\r\nHost: example.test\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(ORDER_BODY)
    )
    while True:
        yield head + ORDER_BODY


class Answered(FakeTransport):
    """The client's transport: wakes ``waiter`` at each response written."""

    def __init__(self) -> None:
        super().__init__(keep=False)
        self.waiter: asyncio.Future[None] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        super().write(data)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def measure(
    requests: int, rounds: int, only: tuple[str, ...] = (), profile: str | None = None
) -> dict[str, list[float]]:
    config = make_config(cache={"memory": "1GiB"})
    w = world(config=config)
    replies = {"miss": TICKER, "post": CREATED}
    current: list[bytes] = [TICKER]
    w.pipeline.upstream = upstream_in_memory(lambda: current[0])
    w.pipeline.access_log.configure(False)
    w.health.reports = _Forgetful()
    loop = asyncio.get_running_loop()
    connections = Connections(w.pipeline, loop)
    transport = Answered()
    connection: EdgeConnection = connections.factory()
    connection.connection_made(transport)
    scenarios: dict[str, Callable[[], Iterator[bytes]]] = {"miss": misses, "post": posts}
    figures: dict[str, list[float]] = {}
    profiler = cProfile.Profile() if profile else None
    for name, make in scenarios.items():
        if only and name not in only:
            continue
        current[0] = replies[name]
        heads = make()
        await run(connection, transport, [next(heads) for _ in range(200)], w)  # warm up
        settle_garbage_collector()
        for _ in range(rounds):
            batch = [next(heads) for _ in range(requests)]
            if profiler is not None:
                profiler.enable()
            started = time.process_time()
            await run(connection, transport, batch, w)
            spent = time.process_time() - started
            if profiler is not None:
                profiler.disable()
            figures.setdefault(name, []).append(spent / requests * 1e6)
    connection.connection_lost(None)
    if profiler is not None and profile:
        profiler.dump_stats(profile)
    return figures


async def run(connection: EdgeConnection, transport: Answered, batch: list[bytes], w: Any) -> None:
    loop = asyncio.get_running_loop()
    for data in batch:
        w.cache_clock.advance(0.0001)
        w.clock.advance(0.0001)
        before = transport.writes
        waiter = transport.waiter = loop.create_future()
        connection.data_received(data)
        if transport.writes == before:
            await waiter
    transport.waiter = None


class _Forgetful(list):  # type: ignore[type-arg]
    """A list that keeps nothing appended to it."""

    def append(self, item: object) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", action="append", choices=("miss", "post"), default=[])
    parser.add_argument("--profile", help="write a cProfile of the miss rounds here")
    args = parser.parse_args(argv)
    # The event loop an edge worker runs (``edge.server``).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        figures = runner.run(measure(args.requests, args.rounds, tuple(args.only), args.profile))
    print(f"edge miss path in one process: {args.requests:,} requests a round")
    print_rounds(figures, 5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
