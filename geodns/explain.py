"""``meridian explain``: why a client gets the answer it gets, from the same pure selection the
server runs.  The text is built by :func:`explain` (pure); the CLI only gathers inputs."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from geodns.budget import failover_budget
from geodns.selection import HealthView, select
from geodns.zone import GeoName, Zone
from meridian.config import Config
from meridian.geo import ClientLocation


@dataclass(frozen=True, slots=True)
class StaticHealth:
    """A health view from fixed verdicts: everything up unless listed (explain, tests)."""

    pops: Mapping[str, bool] = field(default_factory=dict)
    regions: Mapping[str, bool] = field(default_factory=dict)
    generation: int = 0

    def pop_up(self, name: str) -> bool:
        return self.pops.get(name, True)

    def pop_serves(self, pop: str, service: str) -> bool:
        return self.pops.get(f"{pop}/{service}", True)

    def region_up(self, name: str) -> bool:
        return self.regions.get(name, True)

    def ttl_hint(self, target: str) -> float | None:
        return None


def _location_line(client: str, location: ClientLocation) -> str:
    where = "/".join(x for x in (location.country, location.continent) if x) or "unknown place"
    accuracy = f", accuracy {location.accuracy_km} km" if location.accuracy_km else ""
    pinned = ""
    if location.pop:
        pinned = f", pinned to POP {location.pop}"
    elif location.region:
        pinned = f", pinned to region {location.region}"
    source = {
        "database": "found in the geo database",
        "override": "matched a network override",
        "default": "not in the geo database: using the default location",
    }[location.source]
    return (
        f"client {client}: {where} at {location.lat:.2f},{location.lon:.2f} ({source}, "
        f"network {location.network}{accuracy}{pinned})"
    )


def explain(
    config: Config,
    client: str,
    location: ClientLocation,
    health: HealthView,
    names: Sequence[str] = (),
    health_source: str = "assumed up",
    ranges: Callable[[GeoName, int], str] | None = None,
) -> str:
    """``ranges(geo, family)``, when given, describes the compiled range of addresses around
    the client that gets the same answer (and so the ECS scope)."""
    zone = Zone.build(config)
    lines = [_location_line(client, location)]
    rule = config.residency_zone_for(location.country, location.continent)
    lines.append(
        f"residency: rule {rule.name} (zone {rule.zone}, on_failure {rule.on_failure})"
        if rule
        else "residency: no rule applies"
    )
    lines.append(f"health: {health_source}")
    chosen_names = _names(zone, names)
    for geo in chosen_names:
        lines.append("")
        lines.append(f"{geo.fqdn} {failover_budget(config, geo).describe()}")
        for family, rdtype in ((4, "A"), (6, "AAAA")):
            selection = select(config, geo, family, location, health)
            lines.append("")
            lines.append(f"{geo.fqdn} {rdtype} ({geo.spec.targets}, {geo.answers} answer(s)):")
            for c in selection.candidates:
                zone_verdict = (
                    "" if c.in_zone is None else ("  in zone" if c.in_zone else "  outside zone")
                )
                lines.append(
                    f"  {'*' if c.chosen else ' '} {c.target.kind} {c.target.name:<14}"
                    f" {c.distance_km:8.0f} km  {'up' if c.up else 'DOWN':<4}"
                    f"{'  pinned' if c.pinned else ''}{zone_verdict}"
                )
            addresses = ", ".join(str(a) for a in selection.addresses(family))
            if selection.outcome == "answer" and addresses:
                result = f"answer {addresses} ttl {selection.ttl}"
            elif selection.outcome in ("answer", "empty"):
                result = "NODATA (NOERROR, no records)"
            else:
                result = selection.outcome.upper()
            lines.append(f"  => {result}: {selection.reason}")
            if ranges is not None:
                lines.append(f"  {ranges(geo, family)}")
    return "\n".join(lines)


def _names(zone: Zone, wanted: Sequence[str]) -> list[GeoName]:
    if not wanted:
        return list(zone.geo_names.values())
    found = []
    for text in wanted:
        candidates = [
            g
            for g in zone.geo_names.values()
            if text.rstrip(".").lower() in (g.fqdn.rstrip(".").lower(), g.spec.name)
        ]
        if not candidates:
            raise KeyError(text)
        found.extend(candidates)
    return found


def parse_client(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A client address, or a subnet (its network address is located, as ECS does)."""
    if "/" in text:
        return ipaddress.ip_network(text, strict=False).network_address
    return ipaddress.ip_address(text)


def describe_range(
    address: int, version: int, first: int, last: int, before: str | None, after: str | None
) -> str:
    """The compiled range around a client, its ECS scope, and why it ends where it does."""
    from geodns.compiled import widest_scope_plain

    bits = 32 if version == 4 else 128
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    scope = widest_scope_plain(address, first, last, bits)
    network = (
        ipaddress.ip_network((address >> (bits - scope) << (bits - scope), scope))
        if (version == 4)
        else ipaddress.IPv6Network((address >> (bits - scope) << (bits - scope), scope))
    )
    ends = []
    ends.append(f"before it: {before}" if before is not None else "it starts the address space")
    ends.append(f"after it: {after}" if after is not None else "it ends the address space")
    return (
        f"range {make(first)} - {make(last)} ({last - first + 1:,} addresses) gets this "
        f"answer; ECS scope /{scope} = {network}, the widest network around the client inside "
        f"it ({'; '.join(ends)})"
    )
