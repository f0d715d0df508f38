"""Market streams at the edge, over real sockets: the sample origin(s) and the edge are real
processes started here; clients are ``benchmarks.streams.StreamClient`` (raw WebSocket).

Every client's sequence is checked by ``tests.test_streams_hub.check``: no duplicate, no step
back, and no hole on a channel that does not conflate unless a ``resync`` announced it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.streams import StreamClient, client_frame, connect
from tests.edge_support import (
    LOCATIONS,
    Edge,
    Origin,
    Proc,
    free_port,
    http_request,
    poll_until,
    processes,
    region,
    write_config,
)
from tests.test_streams_hub import check

STREAMS: dict[str, Any] = {
    "channels": [
        {"pattern": "ticker:*", "slow_consumer": "conflate"},
        {"pattern": "trades:*", "slow_consumer": "disconnect"},
        {"pattern": "depth:*", "slow_consumer": "conflate"},
    ],
    "max_connections_per_ip": 0,
    "max_subscriptions_per_ip": 0,
}


class StreamOrigin(Origin):
    """The sample origin with its stream options (``--stream-rate``, ``--stream-history``)."""

    def __init__(
        self,
        name: str,
        tmp: Path,
        *,
        rate: float = 10.0,
        history: int = 10_000,
        port: int | None = None,
    ):
        self.region = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable,
            "-m",
            "meridian.origin",
            "--region",
            name,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--stream-rate",
            str(rate),
            "--stream-history",
            str(history),
        ]
        Proc.__init__(self, argv, tmp / f"origin-{name}-{self.port}.log", f"origin {name}")

    def streams(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control()["streams"]
        return result


def start(
    procs: list[Proc],
    tmp: Path,
    origins: dict[str, dict[str, Any]],
    streams: dict[str, Any] | None = None,
) -> tuple[Edge, dict[str, StreamOrigin]]:
    started: dict[str, StreamOrigin] = {}
    for name, options in origins.items():
        origin = StreamOrigin(name, tmp, **options)
        procs.append(origin)
        started[name] = origin
    for origin in started.values():
        origin.ready()
    config = write_config(
        tmp / "edge.yaml",
        {
            name: region(*LOCATIONS[name], [origin.url], "eu" if name.startswith("eu") else "us")
            for name, origin in started.items()
        },
        edge={"streams": {**STREAMS, **(streams or {})}},
    )
    edge = Edge(config, "fra", tmp)
    procs.append(edge)
    edge.ready()
    poll_until(lambda: all(t["state"] == "up" for t in _targets(edge)), within=10)
    return edge, started


def _targets(edge: Edge) -> list[dict[str, Any]]:
    targets: dict[str, dict[str, Any]] = edge.status()["health"]["targets"]
    return list(targets.values())


def data_seqs(client: StreamClient, channel: str) -> list[int]:
    return [d["seq"] for d in client.documents() if d.get("channel") == channel and "type" not in d]


async def subscribe(port: int, channel: str, **options: Any) -> StreamClient:
    client = await connect(port)
    client.send_json({"op": "subscribe", "channel": channel, **options})
    return client


async def test_a_thousand_clients_share_one_upstream_subscription(tmp_path):
    with processes() as procs:
        edge, origins = start(procs, tmp_path, {"eu-central": {}}, streams={"linger": "1s"})
        clients = []
        for _ in range(10):
            clients += await asyncio.gather(
                *(subscribe(edge.port, "trades:BTC-USD") for _ in range(100))
            )
        for client in clients:
            await client.wait_for(5, within=20)
        assert origins["eu-central"].streams()["subscriptions"] == {"trades:BTC-USD": 1}
        assert origins["eu-central"].streams()["opened"] == {"trades:BTC-USD": 1}
        metrics = await asyncio.to_thread(edge.metric, "meridian_edge_stream_clients")
        assert metrics == 1000
        assert (
            await asyncio.to_thread(
                edge.metric, "meridian_edge_stream_upstream_subscriptions", region="eu-central"
            )
            == 1
        )
        for client in clients:
            seqs = check(client.documents(), "trades:BTC-USD", conflate=False)
            assert len(seqs) >= 4
        # The same frame to everyone: the 1,000 clients saw the same bytes for a sequence.
        common = set(data_seqs(clients[0], "trades:BTC-USD"))
        for client in clients[1:]:
            common &= set(data_seqs(client, "trades:BTC-USD"))
        assert common
        seq = min(common)
        payloads = {
            m
            for c in clients
            for m in c.messages
            if json.loads(m).get("seq") == seq and b'"type"' not in m
        }
        assert len(payloads) == 1
        for client in clients:
            assert client.transport is not None
            client.transport.close()
        # Nobody left: the upstream subscription lingers, then goes.
        origin = origins["eu-central"]
        await asyncio.to_thread(poll_until, lambda: origin.streams()["subscriptions"] == {})


async def test_since_and_snapshot_plus_deltas_leave_no_gap_and_no_repeat(tmp_path):
    with processes() as procs:
        edge, _ = start(procs, tmp_path, {"eu-central": {"rate": 50.0}})
        live = await subscribe(edge.port, "trades:ETH-USD")
        await live.wait_for(20)
        seqs = check(live.documents(), "trades:ETH-USD", conflate=False)
        since = seqs[5]
        late = await subscribe(edge.port, "trades:ETH-USD", since=since)
        snap = await subscribe(edge.port, "trades:ETH-USD", snapshot=True)
        ticker = await subscribe(edge.port, "ticker:ETH-USD", snapshot=True)
        await asyncio.sleep(1.0)
        late_seqs = check(late.documents(), "trades:ETH-USD", conflate=False, since=since)
        assert late_seqs[0] == since + 1 and len(late_seqs) > 50
        documents = snap.documents()
        snapshot = next(d for d in documents if d.get("type") == "snapshot")
        assert snapshot["data"]["seq"] == snapshot["seq"]
        assert [t["id"] for t in snapshot["data"]["data"]][-1] == snapshot["seq"]
        snap_seqs = check(documents, "trades:ETH-USD", conflate=False)
        assert snap_seqs[0] == snapshot["seq"] + 1
        assert snap_seqs[-1] >= late_seqs[-1] - 5
        ticker_docs = ticker.documents()
        assert ticker_docs[0]["type"] == "snapshot"
        assert check(ticker_docs, "ticker:ETH-USD", conflate=True)
        # The snapshot came through the cache: a REST client gets the same object and its
        # sequence in X-Sequence.
        status, headers, body = http_request(edge.port, "GET", "/api/v1/snapshot/ticker:ETH-USD")
        assert status == 200 and int(headers["x-sequence"]) == json.loads(body)["seq"]


async def test_origin_killed_mid_stream_continues_from_another_region_without_a_gap(tmp_path):
    with processes() as procs:
        edge, origins = start(
            procs, tmp_path, {"eu-central": {"rate": 50.0}, "us-east": {"rate": 50.0}}
        )
        clients = [await subscribe(edge.port, "trades:SOL-USD") for _ in range(20)]
        await clients[0].wait_for(20)
        assert origins["eu-central"].streams()["subscriptions"] == {"trades:SOL-USD": 1}
        # Frozen first (messages published meanwhile never leave it), then killed: the
        # edge resubscribes to us-east since its last sequence.
        origins["eu-central"].signal(signal.SIGSTOP)
        await asyncio.sleep(0.5)
        origins["eu-central"].signal(signal.SIGKILL)
        before = clients[0].received
        await clients[0].wait_for(before + 60, within=10)
        assert origins["us-east"].streams()["subscriptions"] == {"trades:SOL-USD": 1}
        for client in clients:
            documents = client.documents()
            assert not [d for d in documents if d.get("type") == "resync"]
            seqs = check(documents, "trades:SOL-USD", conflate=False)
            assert len(seqs) >= 60
        assert (
            await asyncio.to_thread(
                edge.metric, "meridian_edge_stream_upstream_subscribes_total", region="us-east"
            )
            == 1
        )


async def test_a_region_that_cannot_replay_makes_an_explicit_resync(tmp_path):
    with processes() as procs:
        edge, origins = start(
            procs,
            tmp_path,
            {"eu-central": {"rate": 50.0}, "us-east": {"rate": 50.0, "history": 1}},
        )
        client = await subscribe(edge.port, "trades:SOL-USD")
        await client.wait_for(10)
        origins["eu-central"].signal(signal.SIGSTOP)
        await asyncio.sleep(0.5)
        origins["eu-central"].signal(signal.SIGKILL)
        await client.wait_for(client.received + 30, within=10)
        documents = client.documents()
        resyncs = [d for d in documents if d.get("type") == "resync"]
        assert len(resyncs) == 1 and resyncs[0]["reason"] == "upstream_gap"
        seqs = check(documents, "trades:SOL-USD", conflate=False)  # hole only where announced
        after = [s for s in seqs if s > resyncs[0]["seq"]]
        assert after[0] == resyncs[0]["seq"] + 1
        assert await asyncio.to_thread(
            edge.metric, "meridian_edge_stream_resyncs_total", reason="upstream_gap"
        ) == pytest.approx(1)


async def test_a_stalled_client_is_cut_or_conflated_while_others_keep_up(tmp_path):
    with processes() as procs:
        edge, _ = start(
            procs, tmp_path, {"eu-central": {"rate": 200.0}}, streams={"send_queue": "16KiB"}
        )
        symbols = ["BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD", "ADA-USD", "DOGE-USD"]
        # Stalled clients: a tiny receive buffer, and they never read after subscribing.
        stalled: dict[str, socket.socket] = {}
        for kind in ("trades", "depth"):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", edge.port))
            sock.sendall(
                b"GET /stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            for symbol in symbols:
                command = {"op": "subscribe", "channel": f"{kind}:{symbol}"}
                sock.sendall(client_frame(json.dumps(command).encode()))
            stalled[kind] = sock
        healthy = await subscribe(edge.port, "trades:BTC-USD")
        lags: list[float] = []
        healthy.on_message = lambda m: lags.append(
            time.time() - json.loads(m).get("ts", time.time())
        )

        def cut() -> float:
            return edge.metric("meridian_edge_stream_disconnected_total", reason="slow_consumer")

        await asyncio.to_thread(poll_until, lambda: cut() == 1, within=30)
        await asyncio.sleep(1.0)
        assert await asyncio.to_thread(cut) == 1  # the depth client is conflated, not cut
        assert await asyncio.to_thread(edge.metric, "meridian_edge_stream_conflated_total") > 0
        # The healthy client kept up throughout, with no hole.
        check(healthy.documents(), "trades:BTC-USD", conflate=False)
        lags.sort()
        assert len(lags) > 200
        # Bounds loose enough for a shared 2-core machine; a client held up behind the stalled
        # ones would stop receiving altogether (or fall seconds behind).
        assert lags[len(lags) // 2] < 0.2
        assert lags[int(len(lags) * 0.99)] < 1.0
        # The trades client was closed by the edge: its socket ends after what was sent (the
        # close frame itself may be lost: a socket that does not read is aborted).
        trades = stalled["trades"]
        trades.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while trades.recv(65536):
                pass
        # The conflating client reads now: it is still connected.
        depth = stalled["depth"]
        depth.settimeout(5)
        assert depth.recv(65536)
        assert await asyncio.to_thread(edge.metric, "meridian_edge_stream_clients") == 2
        for sock in stalled.values():
            sock.close()


async def test_sighup_under_a_thousand_streams_drops_none(tmp_path):
    with processes() as procs:
        edge, _ = start(procs, tmp_path, {"eu-central": {"rate": 20.0}})
        symbols = ["BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD"]
        clients: list[StreamClient] = []
        for batch in range(10):
            clients += await asyncio.gather(
                *(
                    subscribe(edge.port, f"trades:{symbols[(batch * 100 + i) % 4]}")
                    for i in range(100)
                )
            )
        for client in clients:
            await client.wait_for(3, within=20)
        config_path = tmp_path / "edge.yaml"
        document = yaml.safe_load(config_path.read_text())
        document["edge"]["streams"]["channels"][1]["history"] = 2048
        config_path.write_text(yaml.safe_dump(document, sort_keys=False))
        edge.signal(signal.SIGHUP)
        await asyncio.to_thread(edge.wait_for_log, r"event=config_reloaded .*generation=2")
        marks = [client.received for client in clients]
        await asyncio.sleep(1.5)
        for client, mark in zip(clients, marks, strict=True):
            assert not client.lost.done() and client.close_code is None
            assert client.received >= mark + 10
        for client in clients:
            check(client.documents(), client.documents()[-1]["channel"], conflate=False)
        assert await asyncio.to_thread(edge.metric, "meridian_edge_stream_clients") == 1000


async def test_sigterm_closes_streams_with_1012_service_restart(tmp_path):
    with processes() as procs:
        edge, _ = start(procs, tmp_path, {"eu-central": {}})
        client = await subscribe(edge.port, "ticker:BTC-USD")
        events = asyncio.create_task(read_events(edge.port, "/stream?channel=ticker:BTC-USD", 999))
        await client.wait_for(3)
        await asyncio.sleep(0.5)
        edge.signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            await client.lost
        assert client.close_code == 1012
        assert client.close_reason == "service restart"
        # The event stream ends with a close event and the last chunk.
        last = (await events)[-1]
        assert last == {
            "event": "close",
            "data": {"type": "close", "code": 1012, "reason": "service restart"},
        }
        assert await asyncio.to_thread(edge.wait, 10) == 0


async def test_hostile_and_refused_clients(tmp_path):
    with processes() as procs:
        edge, _ = start(
            procs,
            tmp_path,
            {"eu-central": {}},
            streams={"max_connections_per_ip": 2, "max_subscriptions_per_connection": 2},
        )
        # Wrong version: 426 naming the one spoken.
        status, headers, _ = http_request(
            edge.port,
            "GET",
            "/stream",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "8",
            },
        )
        assert status == 426 and headers["sec-websocket-version"] == "13"
        one = await connect(edge.port)
        two = await connect(edge.port)
        with pytest.raises(ConnectionError, match="429"):
            await connect(edge.port)
        for command in (
            b"not json",
            b'{"op": "subscribe", "channel": "orders:BTC-USD"}',
            b'{"op": "subscribe", "channel": "ticker:BTC-USD", "since": -1}',
            b'{"op": "subscribe", "channel": "ticker:A"}',
            b'{"op": "subscribe", "channel": "ticker:B"}',
            b'{"op": "subscribe", "channel": "ticker:C"}',
            b'{"op": "unsubscribe", "channel": "ticker:Z"}',
        ):
            assert one.transport is not None
            one.transport.write(client_frame(command))
        await one.wait_for(8)
        answers = [(d.get("type"), d.get("reason")) for d in one.documents()[:9]]
        for expected in (
            ("error", "bad_json"),
            ("error", "unknown_channel"),
            ("error", "bad_since"),
            ("error", "too_many_subscriptions"),
            ("error", "not_subscribed"),
        ):
            assert expected in answers
        await asyncio.sleep(2)  # ticker:A is not an origin channel: refused upstream
        assert ("error", "unknown_channel") in [
            (d.get("type"), d.get("reason"))
            for d in one.documents()
            if d.get("channel") == "ticker:A"
        ]
        # An unmasked frame is a protocol error: 1002.
        assert two.transport is not None
        two.transport.write(b"\x81\x02hi")
        async with asyncio.timeout(5):
            await two.lost
        assert two.close_code == 1002


async def read_events(port: int, target: str, count: int, **headers: str) -> list[dict[str, Any]]:
    """A plain HTTP client of the stream path: the first ``count`` events (``id``, ``event``,
    ``data`` decoded), read from the chunked body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {target} HTTP/1.1", "Host: x", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"content-type: text/event-stream" in head.lower()
    events: list[dict[str, Any]] = []
    text = b""
    async with asyncio.timeout(15):
        while len(events) < count:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                break
            text += (await reader.readexactly(size + 2))[:-2]
            while b"\n\n" in text:
                block, text = text.split(b"\n\n", 1)
                event: dict[str, Any] = {}
                for line in block.decode().split("\n"):
                    name, _, value = line.partition(": ")
                    if name in ("id", "event"):
                        event[name] = value
                    elif name == "data":
                        event["data"] = json.loads(value)
                if event:
                    events.append(event)
    writer.close()
    return events


async def test_server_sent_events_share_the_channel_and_resume_with_last_event_id(tmp_path):
    with processes() as procs:
        edge, origins = start(procs, tmp_path, {"eu-central": {"rate": 50.0}})
        socket_client = await subscribe(edge.port, "trades:ETH-USD")
        events = await read_events(edge.port, "/stream?channel=trades:ETH-USD", 20)
        assert events[0]["event"] == "subscribed"
        data = [e for e in events if "event" not in e]
        assert [int(e["id"]) for e in data] == [e["data"]["seq"] for e in data]
        seqs = [e["data"]["seq"] for e in data]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        # A reconnecting EventSource sends the last id it saw: the stream resumes after it.
        resumed = await read_events(
            edge.port, "/stream?channel=trades:ETH-USD", 10, **{"Last-Event-ID": str(seqs[5])}
        )
        resumed_seqs = [e["data"]["seq"] for e in resumed if "event" not in e]
        assert resumed_seqs[0] == seqs[5] + 1
        assert resumed_seqs == list(range(seqs[5] + 1, seqs[5] + 1 + len(resumed_seqs)))
        snapshot = await read_events(edge.port, "/stream?channel=ticker:ETH-USD&snapshot=1", 5)
        assert snapshot[0]["event"] == "snapshot"
        assert int(snapshot[0]["id"]) == snapshot[0]["data"]["seq"]
        following = [e["data"]["seq"] for e in snapshot if "event" not in e]
        assert following[0] > snapshot[0]["data"]["seq"]
        assert origins["eu-central"].streams()["subscriptions"] == {
            "ticker:ETH-USD": 1,
            "trades:ETH-USD": 1,
        }
        assert socket_client.received > 0
        status, _, body = http_request(edge.port, "GET", "/stream?channel=a&channel=b")
        assert status == 400 and b"one_channel_per_event_stream" in body


async def test_permessage_deflate_clients_share_one_compressed_frame(tmp_path):
    import aiohttp

    with processes() as procs:
        edge, _ = start(procs, tmp_path, {"eu-central": {"rate": 20.0}})
        plain = await subscribe(edge.port, "depth:BTC-USD")
        received: list[list[dict[str, Any]]] = [[], []]
        async with aiohttp.ClientSession() as session:
            sockets = [
                await session.ws_connect(f"ws://127.0.0.1:{edge.port}/stream", compress=15)
                for _ in range(2)
            ]
            for ws in sockets:
                assert (
                    "server_no_context_takeover" in ws._response.headers["Sec-WebSocket-Extensions"]
                )
                # aiohttp compresses what it sends too: the edge inflates it.
                await ws.send_str(json.dumps({"op": "subscribe", "channel": "depth:BTC-USD"}))
            for ws, documents in zip(sockets, received, strict=True):
                while len(documents) < 12:
                    message = await asyncio.wait_for(ws.receive(), 5)
                    assert message.type == aiohttp.WSMsgType.TEXT
                    documents.append(json.loads(message.data))
            for ws in sockets:
                await ws.close()
        for documents in received:
            seqs = check(documents, "depth:BTC-USD", conflate=True)
            assert len(seqs) >= 10 and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert plain.received > 0
        # Compressed once per message for both clients, not once per client.
        compressed = await asyncio.to_thread(edge.metric, "meridian_edge_stream_compressed_total")
        delivered = len(check(received[0], "depth:BTC-USD", conflate=True))
        assert delivered - 1 <= compressed <= delivered + 5  # per client, it would be twice


async def test_with_workers_each_worker_holds_its_own_upstream_subscription(tmp_path):
    with processes() as procs:
        origin = StreamOrigin("eu-central", tmp_path)
        procs.append(origin)
        origin.ready()
        config = write_config(
            tmp_path / "edge.yaml",
            {"eu-central": region(*LOCATIONS["eu-central"], [origin.url], "eu")},
            edge={"streams": STREAMS},
        )
        edge = Edge(config, "fra", tmp_path, workers=2)
        procs.append(edge)
        await asyncio.to_thread(edge.wait_for_log, r"event=edge_listening.* worker=1")
        await asyncio.to_thread(edge.wait_for_log, r"event=edge_listening.* worker=0")
        clients = await asyncio.gather(*(subscribe(edge.port, "trades:BTC-USD") for _ in range(60)))
        for client in clients:
            await client.wait_for(4, within=20)
            check(client.documents(), "trades:BTC-USD", conflate=False)
        # One per worker that has subscribers (the kernel spreads the 60 connections).
        assert origin.streams()["subscriptions"] in ({"trades:BTC-USD": 1}, {"trades:BTC-USD": 2})
        assert origin.streams()["opened"]["trades:BTC-USD"] <= 2


async def test_a_region_taken_out_by_health_checks_hands_its_streams_over_without_a_gap(
    tmp_path,
):
    with processes() as procs:
        edge, origins = start(
            procs, tmp_path, {"eu-central": {"rate": 50.0}, "us-east": {"rate": 50.0}}
        )
        client = await subscribe(edge.port, "trades:LTC-USD")
        await client.wait_for(10)
        # Still serving its stream, but failing its health checks: the edge moves away.
        origins["eu-central"].control({"healthy": False})
        await asyncio.to_thread(
            poll_until,
            lambda: origins["us-east"].streams()["subscriptions"] == {"trades:LTC-USD": 1},
            within=15,
        )
        await asyncio.to_thread(
            poll_until, lambda: origins["eu-central"].streams()["subscriptions"] == {}
        )
        await client.wait_for(client.received + 25)
        documents = client.documents()
        assert not [d for d in documents if d.get("type") == "resync"]
        assert len(check(documents, "trades:LTC-USD", conflate=False)) >= 30


async def test_streams_move_back_to_the_nearer_region_once_it_has_held(tmp_path):
    """eu-central (nearest to fra) killed: the subscription goes to us-east; restarted on its
    port: once the health checks see it up and it has held ``move_back_after``, the
    subscription comes back, and the client connected throughout misses nothing."""
    channel = "trades:XRP-USD"
    with processes() as procs:
        edge, origins = start(
            procs,
            tmp_path,
            {"eu-central": {"rate": 50.0}, "us-east": {"rate": 50.0}},
            streams={"move_back_after": "1s"},
        )
        eu, us = origins["eu-central"], origins["us-east"]
        client = await subscribe(edge.port, channel)
        await client.wait_for(10)
        assert eu.streams()["subscriptions"] == {channel: 1}
        eu.signal(signal.SIGKILL)
        eu.wait(5)
        await asyncio.to_thread(
            poll_until, lambda: us.streams()["subscriptions"] == {channel: 1}, within=10
        )
        # Down in the edge's health view before it comes back (fall = 2 checks).
        await asyncio.to_thread(
            poll_until,
            lambda: edge.status()["health"]["targets"][eu.url]["state"] == "down",
            within=10,
        )
        back = StreamOrigin("eu-central", tmp_path, rate=50.0, port=eu.port)
        procs.append(back)
        back.ready()
        restarted = time.monotonic()
        await asyncio.to_thread(
            poll_until, lambda: back.streams()["subscriptions"] == {channel: 1}, within=10
        )
        # Not before the hold: health saw it up after it started, then 1 s had to pass.
        assert time.monotonic() - restarted >= 1.0
        await asyncio.to_thread(poll_until, lambda: us.streams()["subscriptions"] == {})
        await client.wait_for(client.received + 25)
        documents = client.documents()
        assert not [d for d in documents if d.get("type") == "resync"]
        seqs = check(documents, channel, conflate=False)  # no gap, no duplicate, no step back
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert (
            await asyncio.to_thread(
                edge.metric,
                "meridian_edge_stream_upstream_moves_total",
                reason="nearer_region_back",
            )
            == 1
        )
        assert await asyncio.to_thread(
            edge.wait_for_log,
            r"stream_upstream_moving .*region=us-east .*reason=nearer_region_back to=eu-central",
        )


async def test_the_origins_channels_tick_at_their_own_instants(tmp_path):
    """Each channel's message is published at its own phase in the tick interval, never
    before its timestamp: a publisher that ticked every channel together would send some
    before their time; one that ignored phases would stamp them all alike."""
    with processes() as procs:
        origin = StreamOrigin("eu-central", tmp_path)
        procs.append(origin)
        origin.ready()
        channels = ["trades:BTC-USD", "trades:ETH-USD", "ticker:BTC-USD", "depth:ETH-USD"]
        arrivals: dict[str, list[tuple[float, dict[str, Any]]]] = {c: [] for c in channels}

        def receiver(channel: str) -> Any:
            return lambda payload: arrivals[channel].append((time.time(), json.loads(payload)))

        clients = [
            await connect(origin.port, f"/stream?channel={c}", on_message=receiver(c), keep=False)
            for c in channels
        ]
        await asyncio.sleep(1.5)
        for client in clients:
            assert client.transport is not None
            client.transport.close()
        # Each message written was counted by how late it went out (the lag's first hop).
        late = origin.streams()["publish_late_ms"]
        assert sum(late.values()) >= sum(len(received) for received in arrivals.values())
        stamps: dict[int, list[float]] = {}
        for channel, received in arrivals.items():
            assert len(received) >= 10, channel
            for arrived, message in received:
                assert arrived >= message["ts"] - 0.005, (channel, arrived, message["ts"])
                stamps.setdefault(message["seq"], []).append(message["ts"])
        common = [ts for ts in stamps.values() if len(ts) > 1]  # seen on several channels
        assert len(common) >= 5
        for ts in common:
            assert len(set(ts)) == len(ts)  # every channel at its own instant
            assert max(ts) - min(ts) < 0.1  # within the same tick interval
