"""Routing: (host, path) -> route, service and the service's regions ordered for this POP.

Pure and built once per config snapshot.  A route matches when its host matches (``*``, an
exact name, or ``*.suffix``) and its prefix matches the path on a segment boundary
(``prefix_matches``: ``/api/v1/orders`` covers ``/api/v1/orders`` and ``/api/v1/orders/7``,
never ``/api/v1/ordersXYZ``); the most specific host wins, then the longest prefix, then
config order (nginx's longest-prefix rule for locations).  The host is the one
``edge.request_target`` decided, already validated and normalised.

Region order for a POP: the POP's explicit ``regions`` list first (when given), then the rest
nearest first.  A service restricted to a residency zone only ever gets regions of that zone,
so failover can never carry its requests out of the zone.  (A POP's own ``residency`` is a
GeoDNS concern -- which clients may land on the POP -- and does not restrict the edge.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meridian.config import Config, Pop, Region, Route, Service
from meridian.geo import nearest_first


@dataclass(frozen=True, slots=True)
class RouteTarget:
    route: Route
    service: Service
    #: Regions to try, best first; never contains a region outside the service's residency.
    regions: tuple[str, ...]
    #: Upper-cased methods that may be retried on another backend or region.
    retry_methods: frozenset[str]


def order_regions(pop: Pop, regions: Sequence[Region], service: Service) -> tuple[str, ...]:
    """The regions ``service`` may use, in the order this POP should try them."""
    members = [r for r in regions if not service.regions or r.name in service.regions]
    if service.residency is not None:
        members = [r for r in members if r.residency == service.residency]
    by_name = {r.name: r for r in members}
    explicit = [name for name in pop.regions if name in by_name]
    rest = [r for r in members if r.name not in explicit]
    nearest = nearest_first(pop.location.lat, pop.location.lon, rest, lambda r: r.location)
    return (*explicit, *(r.name for r, _ in nearest))


def prefix_matches(path: str, prefix: str) -> bool:
    """A path prefix matches on a segment boundary: the path is the prefix, or continues it
    with ``/`` (a prefix ending in ``/`` matches everything under it).  The same rule as
    ``edge.cache.key.prefix_matches`` for cache rules."""
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] == "/"


def normalise_host(host: bytes | None) -> str:
    """Host header -> lower-case name without port or trailing dot."""
    if not host:
        return ""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):  # IPv6 literal
        return text[: text.find("]") + 1]
    name, _, _port = text.partition(":")
    return name.rstrip(".")


def _host_specificity(pattern: str, host: str) -> int:
    """-1 when ``pattern`` does not match ``host``; higher is more specific."""
    if pattern == "*":
        return 0
    if pattern.startswith("*."):
        return 1 if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1 else -1
    return 2 if host == pattern else -1


class Router:
    """Routes for one POP under one config snapshot."""

    __slots__ = ("_targets",)

    def __init__(self, config: Config, pop_name: str) -> None:
        pop = config.pop(pop_name)
        services = {s.name: s for s in config.edge.services}
        targets = []
        for route in config.edge.routes:
            service = services[route.service]
            targets.append(
                RouteTarget(
                    route=route,
                    service=service,
                    regions=order_regions(pop, config.regions, service),
                    retry_methods=frozenset(m.upper() for m in service.retry_methods),
                )
            )
        self._targets = tuple(targets)

    @property
    def targets(self) -> tuple[RouteTarget, ...]:
        return self._targets

    def match(self, host: str, path: str) -> RouteTarget | None:
        best: RouteTarget | None = None
        best_rank = (-1, -1)
        for target in self._targets:
            route = target.route
            if not prefix_matches(path, route.path_prefix):
                continue
            specificity = _host_specificity(route.host.lower(), host)
            if specificity < 0:
                continue
            rank = (specificity, len(route.path_prefix))
            if rank > best_rank:
                best, best_rank = target, rank
        return best
