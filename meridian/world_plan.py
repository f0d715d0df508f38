"""``meridian world``, the plan: which process listens where, which link delays how much, and
the config file of every POP, all from one world file.  Pure (no sockets, no processes): the
ports come from an allocator handed in, the clients' places from a locator handed in.

A world file has a ``topology`` (a Meridian config, its path relative to the world file) and
a ``world`` section (clients and WAN).  Every POP of the topology runs an edge and a GeoDNS
on its first address (``pops.*.addresses``), every region one origin on its first address
(``regions.*.addresses``).  Places are joined by links of the relay (``meridian.world_relay``)
that delay each direction by the great-circle distance: POP -> region (the edge's upstream),
client -> POP and client -> region (direct to the origin, for the latency table).  DNS and
the GeoDNS checks of other POPs are not delayed.

Each POP gets its own config: the topology with its listeners on its address, each region's
backend replaced by the relay link from this POP to it, and every POP's ``health_url`` and
``ready_url`` at that POP's edge admin listener, so every GeoDNS checks every POP itself.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from meridian.config import (
    NAMED,
    Config,
    ConfigError,
    Duration,
    HostPort,
    IPNetwork,
    parse_config,
    parse_section,
)
from meridian.geo import distance_km
from meridian.units import parse_duration


@dataclass(frozen=True, slots=True)
class WorldClient:
    """A vantage point: its name is the ISO country its ECS subnet must be in."""

    name: str
    subnet: IPNetwork


@dataclass(frozen=True, slots=True)
class Wan:
    #: One-way kilometres per millisecond (routes, not light in a straight fibre).
    km_per_ms: float = 100.0
    #: The shortest one-way delay of a link (the same city).
    floor: Duration = 0.001


@dataclass(frozen=True, slots=True)
class WorldSection:
    clients: Annotated[tuple[WorldClient, ...], NAMED]
    #: The DNS name (relative to the zone) that clients resolve, and what they fetch.
    name: str = "api"
    path: str = "/api/v1/ticker/BTC-USD"
    wan: Wan = Wan()


@dataclass(frozen=True, slots=True)
class Place:
    lat: float
    lon: float
    country: str | None
    continent: str | None


@dataclass(frozen=True, slots=True)
class Link:
    """One relay listener: ``src`` reaches ``dst`` at ``listen``; forwarded to ``target``."""

    src: str
    dst: str
    listen: HostPort
    target: HostPort
    #: One-way seconds, each direction.
    delay: float
    #: To the POP's TLS listener (its plaintext one otherwise).
    tls: bool = False


@dataclass(frozen=True, slots=True)
class PopPlan:
    name: str
    address: str
    edge: HostPort
    edge_admin: HostPort
    dns: HostPort
    dns_admin: HostPort
    residency: str | None
    #: This POP's config (YAML data), ready to write.
    config: dict[str, Any]
    #: The edge's TLS listener, when the world has a certificate.
    tls: HostPort | None = None


@dataclass(frozen=True, slots=True)
class RegionPlan:
    name: str
    origin: HostPort
    residency: str | None


@dataclass(frozen=True, slots=True)
class ClientPlan:
    name: str
    subnet: IPNetwork
    place: Place
    #: The POP it should be answered when everything is up (nearest in its residency zone).
    nearest_pop: str
    #: The nearest region (the "direct to the origin" column).
    nearest_region: str
    #: The residency zone it must stay in, if a rule applies, and whether it may fall back.
    zone: str | None
    fallback: bool


@dataclass(frozen=True, slots=True)
class WorldPlan:
    section: WorldSection
    topology: Config
    pops: tuple[PopPlan, ...]
    regions: tuple[RegionPlan, ...]
    clients: tuple[ClientPlan, ...]
    links: tuple[Link, ...]
    relay_control: HostPort
    #: The CA clients trust for the POPs' TLS listeners, if they have them.
    ca: str | None = None

    def pop(self, name: str) -> PopPlan:
        return next(p for p in self.pops if p.name == name)

    def region(self, name: str) -> RegionPlan:
        return next(r for r in self.regions if r.name == name)

    def client(self, name: str) -> ClientPlan:
        return next(c for c in self.clients if c.name == name)

    def link(self, src: str, dst: str, *, tls: bool = False) -> Link:
        return next(k for k in self.links if k.src == src and k.dst == dst and k.tls == tls)

    @property
    def fqdn(self) -> str:
        zone = self.topology.dns.zone.rstrip(".")
        return zone if self.section.name == "@" else f"{self.section.name}.{zone}"

    def pop_of_address(self, address: str) -> str | None:
        return next((p.name for p in self.pops if p.address == address), None)


def client_tag(name: str) -> str:
    """A client's name as a link end (``client:BR``), apart from POP and region names."""
    return f"client:{name}"


def one_way_delay(km: float, wan: Wan) -> float:
    """Seconds one way over ``km`` of great circle."""
    return max(wan.floor, km / wan.km_per_ms / 1000.0)


def parse_world(data: object, source: str) -> tuple[WorldSection, str]:
    """The ``world`` section and the ``topology`` path of a world file's data."""
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: expected a mapping with topology and world"])
    unknown = sorted(set(data) - {"topology", "world"})
    if unknown:
        raise ConfigError([f"{source}: {unknown[0]}: unknown key (expected topology, world)"])
    topology = data.get("topology")
    if not isinstance(topology, str) or not topology:
        raise ConfigError([f"{source}: topology: a path to a Meridian config is required"])
    section = parse_section(WorldSection, data.get("world"), source, "world")
    if not section.clients:
        raise ConfigError([f"{source}: world.clients: at least one client is required"])
    return section, topology


def build_plan(
    section: WorldSection,
    topology: dict[str, Any],
    *,
    source: str,
    pops: Sequence[str] = (),
    locate: Callable[[IPNetwork], Place],
    port: Callable[[], int],
    health: Mapping[str, Any] | None = None,
    ttl: float | None = None,
    tls: tuple[str, str, str] | None = None,
) -> WorldPlan:
    """The whole world: ``pops`` picks a subset (all when empty), ``health`` overrides the
    topology's health settings and ``ttl`` the DNS TTL (with ``min_ttl`` no larger); ``tls``
    (certificate, key, CA files) gives every POP's edge a TLS listener with that certificate."""
    data = copy.deepcopy(topology)
    all_pops: dict[str, Any] = dict(data.get("pops") or {})
    chosen = list(pops) or list(all_pops)
    missing = [p for p in chosen if p not in all_pops]
    if missing:
        raise ConfigError([f"{source}: --pops: {missing[0]!r} is not a POP of the topology"])
    data["pops"] = {name: all_pops[name] for name in chosen}
    if health:
        data["health"] = {**(data.get("health") or {}), **health}
    if ttl is not None:
        dns = data.setdefault("dns", {})
        dns["ttl"] = f"{ttl:g}s"
        dns["min_ttl"] = f"{min(ttl, _seconds(dns.get('min_ttl', ttl))):g}s"
    # Every vantage point asks from 127.0.0.1: per-prefix response limits would count the
    # whole world as one abusive resolver.
    data.setdefault("dns", {}).setdefault("rate_limit", {})["enabled"] = False
    # A request stuck on a black-holed region is retried elsewhere after this, not 10 s.
    timeouts = data.setdefault("edge", {}).setdefault("timeouts", {})
    timeouts.setdefault("connect", "1s")
    timeouts.setdefault("first_byte", "3s")
    config = parse_config(data, source)  # validates the topology as given (and the subset)
    problems = [
        f"{source}: {kind}.{name}.addresses: the world needs an IPv4 loopback address to run it on"
        for kind, items in (("pops", config.pops), ("regions", config.regions))
        for name, addresses in ((item.name, item.addresses) for item in items)
        if not any(isinstance(a, ipaddress.IPv4Address) and a.is_loopback for a in addresses)
    ]
    if problems:
        raise ConfigError(problems)

    longest = max(
        (
            distance_km(p.location.lat, p.location.lon, r.location.lat, r.location.lon)
            for p in config.pops
            for r in config.regions
        ),
        default=0.0,
    )
    fresh = 4 * one_way_delay(longest, section.wan)  # a new connection: two round trips
    if config.health.timeout <= fresh:
        raise ConfigError(
            [
                f"{source}: health.timeout: {config.health.timeout:g}s is shorter than a check"
                f" over a new connection on the longest POP-region link ({fresh:.2f}s): every"
                " far region would look down"
            ]
        )
    regions = tuple(
        RegionPlan(r.name, HostPort(_loopback(r.addresses), port()), r.residency)
        for r in config.regions
    )
    pop_places = {p.name: p.location for p in config.pops}
    region_places = {r.name: r.location for r in config.regions}
    links: list[Link] = []

    def add_link(
        src: str, src_at: tuple[float, float], dst: str, target: HostPort, tls: bool = False
    ) -> Link:
        dst_loc = pop_places.get(dst) or region_places[dst]
        km = distance_km(src_at[0], src_at[1], dst_loc.lat, dst_loc.lon)
        delay = one_way_delay(km, section.wan)
        link = Link(src, dst, HostPort(target.host, port()), target, delay, tls)
        links.append(link)
        return link

    pop_plans: list[PopPlan] = []
    listeners = {
        p.name: {
            key: HostPort(_loopback(p.addresses), port())
            for key in ("edge", "edge_admin", "dns", "dns_admin", *(("tls",) if tls else ()))
        }
        for p in config.pops
    }
    for pop in config.pops:
        ours = listeners[pop.name]
        pop_data = copy.deepcopy(data)
        pop_data["listeners"] = {key: str(v) for key, v in ours.items() if key != "tls"}
        if tls is not None:
            cert, key_file, _ = tls
            pop_data["edge"]["tls"] = {
                "listen": str(ours["tls"]),
                "certificates": [{"cert": cert, "key": key_file}],
            }
        for region in regions:
            link = add_link(
                pop.name, (pop.location.lat, pop.location.lon), region.name, region.origin
            )
            pop_data["regions"][region.name]["backends"] = [f"http://{link.listen}"]
        for other, spec in pop_data["pops"].items():
            admin = listeners[other]["edge_admin"]
            spec["health_url"] = f"http://{admin}/healthz"
            spec["ready_url"] = f"http://{admin}/readyz"
        parse_config(pop_data, f"{source} (POP {pop.name})")  # what the processes will load
        pop_plans.append(
            PopPlan(
                pop.name,
                ours["edge"].host,
                ours["edge"],
                ours["edge_admin"],
                ours["dns"],
                ours["dns_admin"],
                pop.residency,
                pop_data,
                ours.get("tls"),
            )
        )

    clients: list[ClientPlan] = []
    for spec in section.clients:
        place = locate(spec.subnet)
        if place.country != spec.name:
            raise ConfigError(
                [
                    f"{source}: world.clients.{spec.name}.subnet: the geo database places"
                    f" {spec.subnet} in {place.country or 'no country'}, not {spec.name}"
                ]
            )
        at = (place.lat, place.lon)
        for pop in config.pops:
            add_link(client_tag(spec.name), at, pop.name, listeners[pop.name]["edge"])
            if tls is not None:
                add_link(client_tag(spec.name), at, pop.name, listeners[pop.name]["tls"], True)
        for region in regions:
            add_link(client_tag(spec.name), at, region.name, region.origin)
        rule = config.residency_zone_for(place.country, place.continent)
        eligible = [p for p in config.pops if rule is None or p.residency == rule.zone] or list(
            config.pops
        )
        nearest_pop = min(
            eligible, key=lambda p: distance_km(at[0], at[1], p.location.lat, p.location.lon)
        )
        nearest_region = min(
            config.regions,
            key=lambda r: distance_km(at[0], at[1], r.location.lat, r.location.lon),
        )
        clients.append(
            ClientPlan(
                spec.name,
                spec.subnet,
                place,
                nearest_pop.name,
                nearest_region.name,
                rule.zone if rule else None,
                rule is None or rule.on_failure == "fallback",
            )
        )
    return WorldPlan(
        section,
        config,
        tuple(pop_plans),
        regions,
        tuple(clients),
        tuple(links),
        HostPort("127.0.0.1", port()),
        tls[2] if tls is not None else None,
    )


def _loopback(addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> str:
    return str(next(a for a in addresses if isinstance(a, ipaddress.IPv4Address) and a.is_loopback))


def _seconds(value: object) -> float:
    return parse_duration(value)


def link_spec(plan: WorldPlan) -> list[dict[str, Any]]:
    """The relay's links as JSON-ready data (``meridian.world_relay --spec``)."""
    return [
        {
            "src": k.src,
            "dst": k.dst,
            "listen": str(k.listen),
            "target": str(k.target),
            "delay": round(k.delay, 6),
        }
        for k in plan.links
    ]


__all__ = [
    "ClientPlan",
    "Link",
    "Place",
    "PopPlan",
    "RegionPlan",
    "Wan",
    "WorldClient",
    "WorldPlan",
    "WorldSection",
    "build_plan",
    "client_tag",
    "link_spec",
    "one_way_delay",
    "parse_world",
]
