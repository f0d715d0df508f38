"""Market streams at the edge: N WebSocket clients, C channels at R messages/s each.

    python -m benchmarks.streams --clients 10000 --channels 20 --rate 10 --duration 20
    python -m benchmarks.streams --clients 2000 --nginx     # the same clients through nginx 1:1

Starts a sample origin and an edge (one worker) with ``edge.streams``, then a load generator
in another process (``--loadgen``), pinned to the other core where there are two (the edge on
CPU 0, the load generator and the origin on CPU 1).  The load generator connects the clients
(idle: the edge's RSS is read, for the memory per idle client), subscribes client ``i`` to
channel ``i % C`` (``trades:SYMBOL``: no conflation, every message counts), lets it settle,
then counts for ``--duration`` seconds: messages delivered per second, the delivery lag
(origin timestamp -> received, a sample of every ``LAG_SAMPLE``th message, so it includes the
load generator's own queueing) and the edge's CPU seconds over the window (from
/proc/PID/stat).  With ``--nginx`` the clients instead go through nginx's WebSocket proxy
(Debian nginx, ``proxy_pass`` + Upgrade) straight to the origin's stream endpoint, 1:1, and the
origin's open subscriptions are counted.

Figures are printed as a table and one JSON line.  On a shared machine the rates are noisy;
the CPU per delivered message is the steadier figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from meridian.origin import SYMBOLS

#: Every LAG_SAMPLE-th message's lag is measured by the load generator.
LAG_SAMPLE = 8
_HANDSHAKE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame (mask key 0: valid, and the payload is unchanged)."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    else:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    return head + b"\x00\x00\x00\x00" + payload


class StreamClient(asyncio.Protocol):
    """A small WebSocket client: handshake, masked commands, unmasked server frames parsed
    into ``messages`` (or handed to ``on_message``)."""

    def __init__(
        self,
        path: str = "/stream",
        on_message: Callable[[bytes], None] | None = None,
        keep: bool = True,
    ) -> None:
        self.path = path
        self.on_message = on_message
        self.keep = keep
        self.messages: list[bytes] = []
        self.buffer = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self.status = 0
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(_HANDSHAKE.format(path=self.path).encode())  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_result(False)
        if not self.lost.done():
            self.lost.set_result(None)
        self.arrived.set()

    def send_json(self, document: object) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(json.dumps(document).encode()))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.upgraded.done():
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(buffer[9:12])
            del buffer[: end + 4]
            self.upgraded.set_result(self.status == 101)
        start = 0
        size_total = len(buffer)
        while size_total - start >= 2:
            first, size = buffer[start], buffer[start + 1] & 0x7F
            offset = start + 2
            if size == 126:
                if size_total - start < 4:
                    break
                size = int.from_bytes(buffer[start + 2 : start + 4], "big")
                offset = start + 4
            elif size == 127:
                if size_total - start < 10:
                    break
                size = int.from_bytes(buffer[start + 2 : start + 10], "big")
                offset = start + 10
            if size_total < offset + size:
                break
            opcode = first & 0x0F
            payload = bytes(buffer[offset : offset + size])
            start = offset + size
            if opcode == 0x1:
                self.received += 1
                if self.on_message is not None:
                    self.on_message(payload)
                if self.keep:
                    self.messages.append(payload)
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(client_frame(payload, 0xA))
            elif opcode == 0x8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_reason = payload[2:].decode("utf-8", "replace")
        del buffer[:start]
        self.arrived.set()

    def documents(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.messages]

    async def wait_for(self, count: int, within: float = 10.0) -> None:
        """Until ``count`` text messages arrived (or the connection ended)."""
        async with asyncio.timeout(within):
            while self.received < count and not self.lost.done():
                self.arrived.clear()
                await self.arrived.wait()


async def connect(port: int, path: str = "/stream", **kwargs: Any) -> StreamClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: StreamClient(path, **kwargs), "127.0.0.1", port
    )
    if not await client.upgraded:
        raise ConnectionError(f"upgrade refused: {client.status}")
    return client


# --------------------------------------------------------------------------------------------
# Load generator (its own process)


def _ts(payload: bytes) -> float:
    at = payload.find(b'"ts":')
    if at < 0:
        return 0.0
    end = payload.find(b",", at)
    return float(payload[at + 5 : end])


async def loadgen(args: argparse.Namespace) -> None:
    channels = [f"trades:{name}" for name in list(SYMBOLS)[: args.channels]]
    lags: list[float] = []
    counting = False
    count = 0

    def on_message(payload: bytes) -> None:
        nonlocal count
        if counting:
            count += 1
            if count % LAG_SAMPLE == 0 and payload.startswith(b'{"channel"'):
                lags.append(time.time() - _ts(payload))

    def say(**fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    clients: list[StreamClient] = []
    for start in range(0, args.clients, 200):
        batch = [
            connect(args.port, "/stream", on_message=on_message, keep=False)
            for _ in range(min(200, args.clients - start))
        ]
        clients.extend(await asyncio.gather(*batch))
    say(phase="connected", clients=len(clients))
    await asyncio.sleep(2.0)
    for i, client in enumerate(clients):
        client.send_json({"op": "subscribe", "channel": channels[i % len(channels)]})
    await asyncio.sleep(args.warmup)
    counting = True
    started = time.perf_counter()
    cpu0 = time.process_time()
    say(phase="measure_start")
    await asyncio.sleep(args.duration)
    counting = False
    elapsed = time.perf_counter() - started
    say(phase="measure_end")
    lags.sort()
    closed = sum(1 for c in clients if c.lost.done())

    def pct(q: float) -> float:
        return lags[min(len(lags) - 1, int(q * len(lags)))] * 1000 if lags else float("nan")

    say(
        phase="result",
        delivered=count,
        seconds=elapsed,
        rate=count / elapsed,
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        max_ms=lags[-1] * 1000 if lags else float("nan"),
        closed=closed,
        loadgen_cpu=time.process_time() - cpu0,
    )
    for client in clients:
        if client.transport is not None:
            client.transport.close()


async def loadgen_nginx(args: argparse.Namespace) -> None:
    """``--nginx``: every client opens its own stream through nginx to the origin."""
    channels = [f"trades:{name}" for name in list(SYMBOLS)[: args.channels]]
    lags: list[float] = []
    counting = False
    count = 0

    def on_message(payload: bytes) -> None:
        nonlocal count
        if counting:
            count += 1
            if count % LAG_SAMPLE == 0:
                lags.append(time.time() - _ts(payload))

    def say(**fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    clients: list[StreamClient] = []
    for start in range(0, args.clients, 200):
        batch = [
            connect(
                args.port,
                f"/stream?channel={channels[(start + i) % len(channels)]}",
                on_message=on_message,
                keep=False,
            )
            for i in range(min(200, args.clients - start))
        ]
        clients.extend(await asyncio.gather(*batch))
    say(phase="connected", clients=len(clients))
    await asyncio.sleep(2.0 + args.warmup)
    counting = True
    started = time.perf_counter()
    say(phase="measure_start")
    await asyncio.sleep(args.duration)
    counting = False
    elapsed = time.perf_counter() - started
    say(phase="measure_end")
    lags.sort()

    def pct(q: float) -> float:
        return lags[min(len(lags) - 1, int(q * len(lags)))] * 1000 if lags else float("nan")

    say(
        phase="result",
        delivered=count,
        seconds=elapsed,
        rate=count / elapsed,
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        max_ms=lags[-1] * 1000 if lags else float("nan"),
        closed=sum(1 for c in clients if c.lost.done()),
    )
