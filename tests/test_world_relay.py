"""The WAN relay of ``meridian world``: delays, faults by command, and no connection kept
after both ends are done (over real loopback sockets, in this process)."""

from __future__ import annotations

import asyncio
import time

import pytest

from meridian.config import HostPort
from meridian.ports import free_port
from meridian.world_relay import LinkSpec, LinkState, LinkTable, Relay, parse_selector

DELAY = 0.05


def links(target: HostPort, *pairs: tuple[str, str]) -> list[LinkSpec]:
    return [
        LinkSpec(src, dst, HostPort("127.0.0.1", free_port()), target, DELAY) for src, dst in pairs
    ]


def test_selectors_and_commands_change_only_matching_links() -> None:
    target = HostPort("127.0.0.1", 9)
    table = LinkTable(links(target, ("gru", "us-east"), ("gru", "eu"), ("fra", "us-east")))
    assert parse_selector("src=gru,dst=eu") == {"src": "gru", "dst": "eu"}
    state, changed = table.command("down dst=us-east")
    assert state is LinkState.DOWN and changed == [0, 2]
    assert table.command("down src=fra") == (LinkState.DOWN, [])  # already down
    assert table.command("blackhole src=gru")[1] == [0, 1]
    assert table.state == [LinkState.BLACKHOLE, LinkState.BLACKHOLE, LinkState.DOWN]
    for bad in ("explode dst=eu", "up", "up dst=", "up where=eu", "up dst=nowhere"):
        with pytest.raises(ValueError):
            table.command(bad)


async def _server() -> tuple[asyncio.Server, HostPort]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"pong\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, HostPort("127.0.0.1", port)


async def _ping(listen: HostPort, within: float = 2.0) -> tuple[bytes, float]:
    started = time.perf_counter()
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection(listen.host, listen.port)
        writer.write(b"ping\n")
        data = await reader.read()
        writer.close()
    return data, time.perf_counter() - started


def test_a_fresh_connection_pays_two_round_trips_and_nothing_is_left_open() -> None:
    async def scenario() -> None:
        server, target = await _server()
        relay = Relay(links(target, ("a", "b")))
        await relay.start()
        listen = relay.table.links[0].listen
        for _ in range(20):
            data, seconds = await _ping(listen)
            assert data == b"pong\n"
            assert seconds >= 4 * DELAY  # handshake round trip + request and response
        await asyncio.sleep(3 * DELAY)
        assert relay.open[0] == set()  # both ends closed: the relay holds nothing
        server.close()

    asyncio.run(scenario())


def test_down_refuses_blackhole_swallows_up_restores() -> None:
    async def scenario() -> None:
        server, target = await _server()
        relay = Relay(links(target, ("a", "b")))
        await relay.start()
        listen = relay.table.links[0].listen
        assert (await relay.command("down dst=b")).startswith("ok 1")
        with pytest.raises(ConnectionRefusedError):
            await _ping(listen)
        await relay.command("blackhole dst=b")
        with pytest.raises(TimeoutError):
            await _ping(listen, within=0.5)
        await relay.command("up dst=b")
        assert (await _ping(listen))[0] == b"pong\n"
        assert (await relay.command("sideways dst=b")).startswith("error")
        server.close()

    asyncio.run(scenario())
