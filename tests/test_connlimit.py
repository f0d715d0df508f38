"""``edge.connection_limits``: per client network and in total, at accept.  The pure table, the
HTTP/1.1 front end in memory, and (``test_edge_ratelimit``) real sockets."""

from __future__ import annotations

import asyncio
import ipaddress

from edge.connlimit import UNCOUNTED, ClientConnections
from edge.protocol import Connections
from meridian.config import EdgeConnectionLimits
from tests.health_support import captured_logs
from tests.stage_support import World, make_config, world
from tests.test_config import demo_data, problems_of
from tests.test_front_ratelimit import PeerTransport

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


def test_per_client_counts_networks_and_releases() -> None:
    table = ClientConnections()
    limits = EdgeConnectionLimits(per_client=2, ipv4_prefix=24)
    first = table.admit("192.0.2.1", limits, TRUSTED)
    second = table.admit("192.0.2.200", limits, TRUSTED)  # the same /24
    assert first is not None and first == second
    assert table.admit("192.0.2.3", limits, TRUSTED) is None
    assert table.admit("198.51.100.1", limits, TRUSTED) is not None  # another network
    table.release(first)
    assert table.admit("192.0.2.3", limits, TRUSTED) is not None
    assert table.busiest == 2
    # Trusted proxies, allow-listed and non-IP peers are never counted.
    allow = EdgeConnectionLimits(per_client=1, allow=(ipaddress.ip_network("203.0.113.0/24"),))
    for peer in ("10.1.2.3", "203.0.113.9", "-"):
        assert [table.admit(peer, allow, TRUSTED) for _ in range(5)] == [UNCOUNTED] * 5
    # Releasing every connection leaves nothing behind.
    table = ClientConnections()
    keys = [table.admit(f"2001:db8::{i}", limits, ()) for i in range(2)]  # one /64
    assert table.admit("2001:db8::9", limits, ()) is None
    for key in keys:
        assert key is not None
        table.release(key)
    assert table.open == {}
    assert ClientConnections().admit("192.0.2.1", EdgeConnectionLimits(), ()) == UNCOUNTED


def test_config_errors_name_the_field() -> None:
    data = demo_data()
    data["edge"]["connection_limits"] = {"per_client": -1, "ipv4_prefix": 40}
    assert problems_of(data) == [
        "t.yaml: edge.connection_limits: per_client and total must not be negative",
        "t.yaml: edge.connection_limits.ipv4_prefix: must be 0..32",
    ]


def open_from(connections: Connections, peer: str) -> PeerTransport:
    transport = PeerTransport(peer)
    connections.factory().connection_made(transport)
    return transport


def limited(**limits: int) -> World:
    return world(config=make_config(connection_limits=limits))


async def test_a_client_over_its_connections_is_closed_at_accept_and_others_are_not() -> None:
    w = limited(per_client=3)
    connections = Connections(w.pipeline, asyncio.get_running_loop())
    with captured_logs() as events:
        mine = [open_from(connections, "192.0.2.1") for _ in range(5)]
        refused = [e for e in events() if e["event"] == "connections_refused"]
    assert [t.closed for t in mine] == [False, False, False, True, True]
    assert len(connections.open) == 3
    other = open_from(connections, "198.51.100.7")
    assert not other.closed
    assert connections.resources.refused == {"per_client": 2}
    assert len(refused) == 1 and refused[0]["client"] == "192.0.2.1"  # throttled
    # One closes: the client may open one again.
    next(iter(c for c in connections.open if c.client_ip == "192.0.2.1")).connection_lost(None)
    assert not open_from(connections, "192.0.2.1").closed
    assert open_from(connections, "192.0.2.1").closed


async def test_the_total_cap() -> None:
    w = limited(total=4)
    connections = Connections(w.pipeline, asyncio.get_running_loop())
    transports = [open_from(connections, f"192.0.2.{i}") for i in range(6)]
    assert [t.closed for t in transports] == [False] * 4 + [True] * 2
    assert connections.resources.refused == {"total": 2}


async def test_caps_hold_over_thousands_of_connections() -> None:
    w = limited(per_client=10, total=1500)
    connections = Connections(w.pipeline, asyncio.get_running_loop())
    # 2,000 connections from 50 addresses: 10 each get in.
    crowd = [open_from(connections, f"192.0.2.{i % 50}") for i in range(2000)]
    assert sum(not t.closed for t in crowd) == 500
    assert max(connections.clients.open.values()) == 10
    # 1,200 from as many addresses: the total stops them at 1,500 open.
    many = [open_from(connections, f"198.51.{i >> 8}.{i & 255}") for i in range(1200)]
    assert sum(not t.closed for t in many) == 1000
    assert len(connections.open) == 1500
    assert connections.resources.refused == {"per_client": 1500, "total": 200}
    registry = w.pipeline.metrics.registry
    assert registry.get_sample_value("meridian_edge_client_networks") == 50 + 1000
    assert registry.get_sample_value("meridian_edge_client_connections_busiest") == 10
    for conn in list(connections.open):
        conn.connection_lost(None)
    assert connections.clients.open == {} and not connections.open
