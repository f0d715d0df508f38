"""Client connections at accept (``edge.connection_limits``): per client network and in total.

Checked when a connection is made, before a byte is read: one dict lookup.  A client network
is the peer's address cut to ``ipv4_prefix`` / ``ipv6_prefix`` (headers are not read yet, so
``trusted_proxies`` are never limited per client: their connections carry many clients).
The table holds one count per network with a connection open, so it is bounded by the open
connections themselves, which the descriptor budget bounds (``edge.fdlimit``).  Pure: the
caller refuses the connection and logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.ratelimit import Network, network_key, parse_address
from meridian.config import EdgeConnectionLimits

#: ``admit``'s key for a connection counted in no network (allowed, trusted, not IP).
UNCOUNTED: Final = -1


class ClientConnections:
    """Open connections per client network."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        #: Network key -> connections open from it (absent: none).
        self.open: dict[int, int] = {}

    def admit(
        self, peer: str, limits: EdgeConnectionLimits, trusted: Sequence[Network]
    ) -> int | None:
        """Count a new connection from ``peer``: its key (to ``release`` when it closes), or
        None when its network has ``per_client`` connections open already."""
        if not limits.per_client:
            return UNCOUNTED
        address = parse_address(peer)
        if (
            address is None
            or any(address in net for net in limits.allow)
            or any(address in net for net in trusted)
        ):
            return UNCOUNTED
        key = network_key(address, limits.ipv4_prefix, limits.ipv6_prefix)
        count = self.open.get(key, 0)
        if count >= limits.per_client:
            return None
        self.open[key] = count + 1
        return key

    def release(self, key: int) -> None:
        if key == UNCOUNTED:
            return
        count = self.open.get(key, 0) - 1
        if count > 0:
            self.open[key] = count
        else:
            self.open.pop(key, None)

    @property
    def busiest(self) -> int:
        """The most connections one network has open."""
        return max(self.open.values(), default=0)


class ClientConnectionStats(Collector):
    """``meridian_edge_client_networks`` (networks with a connection open: what
    ``per_client`` is counted over) and ``meridian_edge_client_connections_busiest`` (the
    most one network has open: how close the busiest client is to ``per_client``)."""

    def __init__(self, clients: ClientConnections) -> None:
        self.clients = clients

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "meridian_edge_client_networks",
            "Client networks with a connection open (counted when edge.connection_limits "
            "sets per_client).",
            value=len(self.clients.open),
        )
        yield GaugeMetricFamily(
            "meridian_edge_client_connections_busiest",
            "Connections open from the busiest client network.",
            value=self.clients.busiest,
        )

    def describe(self) -> Iterable[Metric]:
        return []


__all__ = ["UNCOUNTED", "ClientConnectionStats", "ClientConnections"]
