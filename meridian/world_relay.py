"""The WAN of ``meridian world``: a TCP relay that delays every byte by a link's distance.

There is no ``netem`` on this kernel, so each link between two places is a listener here that
forwards to the destination and holds each chunk ``delay`` seconds in each direction.  A new
connection's first bytes also wait one round trip: the TCP handshake happens with the relay
at once (on loopback), so that round trip is added here, and a request over a fresh
connection costs two round trips, as over a real WAN.

Faults, by line commands on the control listener (``down dst=us-east``, ``up src=gru``,
``blackhole dst=eu-central``; a selector is ``src=``/``dst=`` terms joined by commas, all of
which must match):

- ``down``: the link's listener is closed and its connections reset: the host refuses, as
  when its process is gone.
- ``blackhole``: connections are accepted and nothing is forwarded either way, old or new:
  the place is unreachable and nothing says so (only timeouts notice).
- ``up``: back to forwarding.

The state of the links is :class:`LinkTable` (pure); :class:`Relay` is the asyncio shell.
Bounded: a direction with more than ``PENDING_LIMIT`` bytes in flight stops reading its
source until half has been delivered; a control line is at most ``CONTROL_LINE`` bytes.

    python -m meridian.world_relay --spec links.json --control 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from meridian.config import HostPort, parse_hostport
from meridian.log import configure, get_logger

log = get_logger("world.relay")

#: Bytes in flight per direction of one connection before its source is paused.
PENDING_LIMIT = 1 << 20
CONTROL_LINE = 256


class LinkState(StrEnum):
    UP = "up"
    DOWN = "down"
    BLACKHOLE = "blackhole"


@dataclass(frozen=True, slots=True)
class LinkSpec:
    src: str
    dst: str
    listen: HostPort
    target: HostPort
    delay: float


def parse_selector(text: str) -> dict[str, str]:
    """``src=gru,dst=us-east`` -> {"src": "gru", "dst": "us-east"}; ValueError when bad."""
    terms: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in ("src", "dst") or not value or key in terms:
            raise ValueError(f"bad selector term {part.strip()!r} (expected src=NAME or dst=NAME)")
        terms[key] = value
    return terms


class LinkTable:
    """Which links are up, down or black-holed.  Pure: the relay acts on what it returns."""

    def __init__(self, links: list[LinkSpec]) -> None:
        self.links = links
        self.state = [LinkState.UP] * len(links)

    def select(self, selector: dict[str, str]) -> list[int]:
        return [
            i
            for i, link in enumerate(self.links)
            if all(getattr(link, key) == value for key, value in selector.items())
        ]

    def command(self, line: str) -> tuple[LinkState, list[int]]:
        """Apply ``VERB SELECTOR``; returns the new state and the links that changed."""
        verb, _, rest = line.strip().partition(" ")
        try:
            new = LinkState(verb)
        except ValueError:
            raise ValueError(f"unknown command {verb!r} (expected up, down, blackhole)") from None
        chosen = self.select(parse_selector(rest))
        if not chosen:
            raise ValueError(f"no link matches {rest.strip()!r}")
        changed = [i for i in chosen if self.state[i] is not new]
        for i in changed:
            self.state[i] = new
        return new, changed


class _Side(asyncio.Protocol):
    """One socket of a relayed connection; data goes to the other side, delayed."""

    def __init__(self, conn: _Connection, inbound: bool) -> None:
        self.conn = conn
        self.inbound = inbound
        self.transport: asyncio.Transport | None = None
        self.pending = 0
        self.paused = False
        #: A FIN came from this socket / was sent to it: with both, it is closed.
        self.got_eof = False
        self.sent_eof = False
        #: When the last chunk from this socket is due at the other.
        self.last_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.inbound:
            self.conn.accepted(self)

    def data_received(self, data: bytes) -> None:
        self.conn.forward(self, data)

    def eof_received(self) -> bool:
        self.got_eof = True
        self.conn.forward(self, b"")
        return not self.sent_eof  # half-open until the other side's FIN is passed on

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost(self)


class _Connection:
    def __init__(self, relay: Relay, index: int) -> None:
        self.relay = relay
        self.index = index
        self.link = relay.table.links[index]
        self.loop = asyncio.get_running_loop()
        self.inbound: _Side | None = None
        self.outbound: _Side | None = None
        #: Client bytes held until the upstream connection is open.
        self.early: list[bytes] = []
        self.hole = False
        self.closed = False
        #: The emulated handshake: client bytes leave no earlier than this.
        self.ready_at = self.loop.time() + 2 * self.link.delay

    def accepted(self, side: _Side) -> None:
        self.inbound = side
        self.relay.open[self.index].add(self)
        if self.relay.table.state[self.index] is LinkState.BLACKHOLE:
            self.hole = True
            return
        task = self.loop.create_task(self._connect())
        self.relay.tasks.add(task)
        task.add_done_callback(self.relay.tasks.discard)

    async def _connect(self) -> None:
        target = self.link.target
        try:
            _, side = await self.loop.create_connection(
                lambda: _Side(self, False), target.host, target.port
            )
        except OSError:
            # The destination refuses: so does the link, once the handshake would have gone
            # there and back.
            self.loop.call_at(self.ready_at, self.abort)
            return
        if self.closed or self.hole:
            assert side.transport is not None
            side.transport.abort()
            return
        self.outbound = side
        for chunk in self.early:
            self._write(side, chunk)
        self.early.clear()

    def forward(self, source: _Side, data: bytes) -> None:
        if self.hole or self.closed:
            return  # black-holed: swallowed
        if source.inbound:
            at = max(self.loop.time(), self.ready_at) + self.link.delay
        else:
            at = self.loop.time() + self.link.delay
        # Strictly later than the previous chunk: timers due at one instant run in no set
        # order, and a FIN must not overtake the data before it.
        at = source.last_at = max(at, source.last_at + 1e-6)
        source.pending += len(data)
        if source.pending > PENDING_LIMIT and not source.paused and source.transport is not None:
            source.paused = True
            source.transport.pause_reading()
        self.loop.call_at(at, self._deliver, source, data)

    def _deliver(self, source: _Side, data: bytes) -> None:
        source.pending -= len(data)
        if source.paused and source.pending <= PENDING_LIMIT // 2 and source.transport is not None:
            source.paused = False
            with contextlib.suppress(RuntimeError):
                source.transport.resume_reading()
        if self.hole or self.closed:
            return
        if source.inbound:
            if self.outbound is None:
                self.early.append(data)
                return
            self._write(self.outbound, data)
        elif self.inbound is not None:
            self._write(self.inbound, data)

    def _write(self, side: _Side, data: bytes) -> None:
        transport = side.transport
        if transport is None or transport.is_closing():
            return
        try:
            if data:
                transport.write(data)
            elif side.got_eof:  # FIN both ways: done
                side.sent_eof = True
                transport.close()
            elif transport.can_write_eof():
                side.sent_eof = True
                transport.write_eof()
        except (OSError, RuntimeError):  # the peer is gone: so is this connection
            self.abort()

    def black_hole(self) -> None:
        self.hole = True
        self.early.clear()

    def abort(self) -> None:
        """Reset both sides (the link went down)."""
        self.closed = True
        for side in (self.inbound, self.outbound):
            if side is not None and side.transport is not None:
                side.transport.abort()

    def lost(self, side: _Side) -> None:
        other = self.outbound if side.inbound else self.inbound
        if other is None or other.transport is None or self.closed:
            if side.inbound:
                self._forget()
            return
        if self.hole:  # a dead link says nothing: the other side is closed quietly
            other.transport.abort()
        else:
            self.loop.call_at(self.loop.time() + self.link.delay, other.transport.close)
        if side.inbound:
            self._forget()

    def _forget(self) -> None:
        self.relay.open[self.index].discard(self)


class Relay:
    def __init__(self, links: list[LinkSpec]) -> None:
        self.table = LinkTable(links)
        self.servers: list[asyncio.Server | None] = [None] * len(links)
        self.open: list[set[_Connection]] = [set() for _ in links]
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for index in range(len(self.table.links)):
            await self._listen(index)

    async def _listen(self, index: int) -> None:
        link = self.table.links[index]
        loop = asyncio.get_running_loop()

        def make() -> _Side:
            return _Side(_Connection(self, index), True)

        self.servers[index] = await loop.create_server(
            make, link.listen.host, link.listen.port, reuse_address=True
        )

    async def command(self, line: str) -> str:
        try:
            state, changed = self.table.command(line)
        except ValueError as exc:
            return f"error {exc}"
        for index in changed:
            if state is LinkState.DOWN:
                server = self.servers[index]
                self.servers[index] = None
                if server is not None:
                    server.close()
                for conn in list(self.open[index]):
                    conn.abort()
            elif state is LinkState.BLACKHOLE:
                for conn in list(self.open[index]):
                    conn.black_hole()
                if self.servers[index] is None:
                    await self._listen(index)
            elif self.servers[index] is None:
                await self._listen(index)
        log.info("relay_links", command=line.strip(), changed=len(changed))
        return f"ok {len(changed)}"

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                if len(line) > CONTROL_LINE or not line.endswith(b"\n"):
                    writer.write(b"error line too long\n")
                    break
                reply = await self.command(line.decode("ascii", "replace"))
                writer.write(reply.encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()


def load_links(path: Path) -> list[LinkSpec]:
    data: Any = json.loads(path.read_text(encoding="utf-8"))
    return [
        LinkSpec(
            str(item["src"]),
            str(item["dst"]),
            parse_hostport(str(item["listen"])),
            parse_hostport(str(item["target"])),
            float(item["delay"]),
        )
        for item in data
    ]


async def _serve(links: list[LinkSpec], control: HostPort) -> None:
    relay = Relay(links)
    await relay.start()
    server = await asyncio.start_server(
        relay.control, control.host, control.port, limit=CONTROL_LINE, reuse_address=True
    )
    log.info("relay_listening", links=len(links), control=str(control))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meridian.world_relay", description=__doc__)
    parser.add_argument("--spec", required=True, help="the links, as JSON")
    parser.add_argument("--control", required=True, type=parse_hostport, help="HOST:PORT")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    configure(args.log_level, "logfmt")
    asyncio.run(_serve(load_links(Path(args.spec)), args.control))
    return 0


if __name__ == "__main__":
    sys.exit(main())
