"""WebSocket proxying through the edge to the sample origin's /ws ticker stream."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp

from edge.websocket import CLOSE_INTERNAL_ERROR, FrameBoundaries, close_frame
from tests.edge_support import LOCATIONS, Edge, Origin, processes, region, write_config


def test_frame_boundaries_are_followed_across_splits():
    frames = (
        bytes((0x81, 5))
        + b"hello"  # text, 7-bit length
        + bytes((0x82, 126))
        + (300).to_bytes(2, "big")
        + b"x" * 300  # 16-bit length
        + bytes((0x81, 0x80 | 3))
        + b"mask"
        + b"abc"  # masked
    )
    for split in (1, 2, 3, 7, 50, len(frames)):
        tracker = FrameBoundaries()
        for i in range(0, len(frames), split):
            tracker.feed(frames[i : i + split])
        assert tracker.at_boundary
        assert not tracker.close_seen
    tracker = FrameBoundaries()
    tracker.feed(frames[:10])
    assert not tracker.at_boundary
    tracker.feed(close_frame(1000))
    assert close_frame(1011, b"bye") == b"\x88\x05\x03\xf3bye"


async def test_messages_flow_both_ways_and_upstream_death_closes_with_1011(tmp_path):
    with processes() as procs:
        origin = Origin("eu-central", tmp_path)
        procs.append(origin)
        origin.ready()
        config = write_config(
            tmp_path / "edge.yaml",
            {"eu-central": region(*LOCATIONS["eu-central"], [origin.url], "eu")},
        )
        edge = Edge(config, "fra", tmp_path)
        procs.append(edge)
        edge.ready()
        async with aiohttp.ClientSession() as session:
            url = f"ws://127.0.0.1:{edge.port}/ws?symbols=BTC-USD,ETH-USD&interval_ms=20"
            async with session.ws_connect(url, autoping=False) as ws:
                assert ws._response.headers["X-Meridian-Region"] == "eu-central"
                updates = []
                while len(updates) < 10:
                    message = await asyncio.wait_for(ws.receive(), timeout=5)
                    assert message.type == aiohttp.WSMsgType.TEXT
                    updates.append(json.loads(message.data))
                assert {u["symbol"] for u in updates} == {"BTC-USD", "ETH-USD"}
                # Client -> origin: the application-level ping is answered through the tunnel.
                await ws.send_str("ping")
                while True:
                    message = await asyncio.wait_for(ws.receive(), timeout=5)
                    if json.loads(message.data).get("type") == "pong":
                        break
                assert await asyncio.to_thread(edge.metric, "meridian_edge_websocket_sessions") == 1
                origin.signal(signal.SIGKILL)
                while True:
                    message = await asyncio.wait_for(ws.receive(), timeout=5)
                    if message.type != aiohttp.WSMsgType.TEXT:
                        break
                assert message.type == aiohttp.WSMsgType.CLOSE
                assert message.data == CLOSE_INTERNAL_ERROR
                assert message.extra == "upstream closed"
        assert await asyncio.to_thread(edge.metric, "meridian_edge_websocket_sessions") == 0
