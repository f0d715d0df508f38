"""The least a Python caching proxy can do per request: a yardstick, never a server to deploy.

    python -m benchmarks.floor_proxy --listen 127.0.0.1:PORT --origin 127.0.0.1:PORT

On the edge's own libraries (uvloop, httptools) and nothing else: per request, parse it, look
the target up in a dict, and on a miss send ``GET target`` on a pooled keep-alive connection,
parse the answer, keep status, headers and body in the dict and write them back.  No stages,
no coroutine per request (callbacks only), no routing, Host, forwarding headers, validation,
freshness, Vary, coalescing, limits, deadlines, retries, health, metrics or logs.

``benchmarks.compare http --peers meridian,python-floor,nginx`` runs it beside the others
(opt-in peer ``python-floor``): its CPU per miss is what any Python edge on this event loop and
parser pays before it does anything an edge is for, so it bounds from below what the miss path
can reach.  It trusts both sides completely (no limits on sizes or counts beyond the store's
entry cap): run it on loopback, under a benchmark, only.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque
from typing import Final

import httptools
import uvloop

#: Entries kept (oldest dropped first): bounds memory over a long unique-query run.
MAX_ENTRIES: Final = 200_000
_DROPPED: Final = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length"})


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the origin, one request at a time."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[bytes] = []
        self.body: list[bytes] = []
        self.client: Client | None = None
        self.target = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, client: Client, target: bytes) -> None:
        self.client, self.target = client, target
        self.headers, self.body = [], []
        assert self.transport is not None
        self.transport.write(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, self.proxy.host))

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _DROPPED:
            self.headers.append(name + b": " + value + b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        head = b"HTTP/1.1 %d OK\r\n%sContent-Length: %d\r\n" % (
            self.parser.get_status_code(),
            b"".join(self.headers),
            len(body),
        )
        client, self.client = self.client, None
        self.proxy.stored(self.target, head, body)
        self.proxy.idle.append(self)
        if client is not None:
            client.answer(head, b"MISS", body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.proxy.idle:
            self.proxy.idle.remove(self)
        if self.client is not None:
            self.client.fail()


class Client(asyncio.Protocol):
    """A client connection: requests answered in order, one at a time (no pipelining)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        self.proxy.request(self, self.url)

    def answer(self, head: bytes, cache: bytes, body: bytes) -> None:
        if self.transport is not None:
            self.transport.write(head + b"X-Cache: " + cache + b"\r\n\r\n" + body)

    def fail(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class Proxy:
    def __init__(self, origin: tuple[str, int]) -> None:
        self.origin = origin
        self.host = f"{origin[0]}:{origin[1]}".encode()
        self.idle: list[Upstream] = []
        self.store: dict[bytes, tuple[bytes, bytes]] = {}
        self.order: deque[bytes] = deque()
        self.connecting: set[asyncio.Future[None]] = set()

    def request(self, client: Client, target: bytes) -> None:
        found = self.store.get(target)
        if found is not None:
            client.answer(found[0], b"HIT", found[1])
        elif self.idle:
            self.idle.pop().send(client, target)
        else:
            connecting = asyncio.ensure_future(self._connect_and_send(client, target))
            self.connecting.add(connecting)
            connecting.add_done_callback(self.connecting.discard)

    async def _connect_and_send(self, client: Client, target: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: Upstream(self), *self.origin)
        except OSError:
            client.fail()
            return
        upstream.send(client, target)

    def stored(self, target: bytes, head: bytes, body: bytes) -> None:
        if target not in self.store:
            self.order.append(target)
            if len(self.order) > MAX_ENTRIES:
                self.store.pop(self.order.popleft(), None)
        self.store[target] = (head, body)


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(listen: tuple[str, int], origin: tuple[str, int]) -> None:
    proxy = Proxy(origin)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(proxy), *listen, backlog=4096)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening {host}:{port}", flush=True)  # --listen HOST:0 binds any free port
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=address, required=True)
    parser.add_argument("--origin", type=address, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.origin))


if __name__ == "__main__":
    main()
