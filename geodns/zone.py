"""The zone model, built once per config: apex SOA/NS, glue, and the names answered by geography."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA

from meridian.config import Config, DnsName, Location

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Target:
    """A POP or region that a geo name can answer with."""

    kind: Literal["pop", "region"]
    name: str
    location: Location
    addresses: tuple[IPAddress, ...]
    residency: str | None
    #: Keys the health engine gives TTL hints for ("pop:NAME", "pop:NAME/SERVICE", or a
    #: region's backend URLs).
    hint_keys: tuple[str, ...]
    #: The edge service the name serves: a POP is up for it only while its edge is ready for
    #: the service (cross-layer health), not merely while the process answers.
    service: str | None = None

    def addresses_of(self, family: int) -> tuple[IPAddress, ...]:
        return tuple(a for a in self.addresses if a.version == family)


@dataclass(frozen=True, slots=True)
class GeoName:
    fqdn: str
    spec: DnsName
    targets: tuple[Target, ...]
    answers: int
    ttl: int


@dataclass(frozen=True, slots=True)
class Glue:
    ipv4: tuple[ipaddress.IPv4Address, ...]
    ipv6: tuple[ipaddress.IPv6Address, ...]


def pop_key(name: str) -> str:
    """The health engine's target name for a POP."""
    return f"pop:{name}"


def config_name(text: str, origin: dns.name.Name) -> dns.name.Name:
    """A host name from the config (NS, SOA mname/rname): a dotted name is fully qualified
    (``ns1.meridian.test``, ``ns.elsewhere.example``); a single label is in the zone (``ns1``)."""
    if "." in text.rstrip("."):
        return dns.name.from_text(text.rstrip(".") + ".")
    return dns.name.from_text(text, origin)


def name_key(name: dns.name.Name) -> bytes:
    """The lookup key of a name: its wire form, ASCII-lowercased (as the hand parser makes it)."""
    wire = name.to_wire()
    assert wire is not None  # to_wire without a file returns the bytes
    return wire.lower()


@dataclass(frozen=True, slots=True)
class Zone:
    config: Config
    origin: dns.name.Name
    soa: dns.rdtypes.ANY.SOA.SOA
    #: TTL of the SOA, NS and glue records (they change rarely).
    static_ttl: int
    #: RFC 2308 section 3: the SOA in a negative answer carries min(SOA TTL, SOA MINIMUM).
    negative_ttl: int
    ns: tuple[dns.name.Name, ...]
    geo_names: Mapping[bytes, GeoName]
    glue: Mapping[bytes, Glue]
    #: Every name that exists (apex, geo names, glue owners, empty non-terminals), as keys.
    existing: frozenset[bytes]
    max_udp_payload: int

    @classmethod
    def build(cls, config: Config) -> Zone:
        dns_config = config.dns
        origin = dns.name.from_text(dns_config.zone)
        soa_config = dns_config.soa
        soa = dns.rdtypes.ANY.SOA.SOA(  # type: ignore[no-untyped-call]
            dns.rdataclass.IN,
            dns.rdatatype.SOA,
            config_name(soa_config.mname, origin),
            config_name(soa_config.rname, origin),
            soa_config.serial,
            int(soa_config.refresh),
            int(soa_config.retry),
            int(soa_config.expire),
            int(soa_config.minimum),
        )
        static_ttl = int(soa_config.refresh)
        owners: list[dns.name.Name] = [origin]

        geo_names: dict[bytes, GeoName] = {}
        for spec in dns_config.names:
            owner = origin if spec.name == "@" else dns.name.from_text(spec.name, origin)
            geo_names[name_key(owner)] = GeoName(
                fqdn=owner.to_text(),
                spec=spec,
                targets=_targets(config, spec),
                answers=spec.answers,
                ttl=int(spec.ttl if spec.ttl is not None else dns_config.ttl),
            )
            owners.append(owner)

        glue: dict[bytes, Glue] = {}
        ns_names = []
        for server in dns_config.ns:
            ns_name = config_name(server.name, origin)
            ns_names.append(ns_name)
            # Addresses of out-of-zone servers are not ours to answer for.
            if server.addresses and ns_name.is_subdomain(origin):
                glue[name_key(ns_name)] = Glue(
                    tuple(a for a in server.addresses if isinstance(a, ipaddress.IPv4Address)),
                    tuple(a for a in server.addresses if isinstance(a, ipaddress.IPv6Address)),
                )
                owners.append(ns_name)

        existing: set[bytes] = set()
        for owner in owners:
            # Ancestors up to the apex exist too (empty non-terminals answer NODATA).
            name = owner
            while name.is_subdomain(origin):
                existing.add(name_key(name))
                if name == origin:
                    break
                name = name.parent()

        return cls(
            config=config,
            origin=origin,
            soa=soa,
            static_ttl=static_ttl,
            negative_ttl=min(static_ttl, int(soa_config.minimum)),
            ns=tuple(ns_names),
            geo_names=geo_names,
            glue=glue,
            existing=frozenset(existing),
            max_udp_payload=dns_config.max_udp_payload,
        )


def _targets(config: Config, spec: DnsName) -> tuple[Target, ...]:
    if spec.targets == "pops":
        service = spec.service
        return tuple(
            Target(
                "pop",
                pop.name,
                pop.location,
                pop.addresses,
                pop.residency,
                (f"pop:{pop.name}",)
                if service is None
                else (f"pop:{pop.name}", f"pop:{pop.name}/{service}"),
                service,
            )
            for pop in config.pops
            if not spec.candidates or pop.name in spec.candidates
        )
    return tuple(
        Target(
            "region",
            region.name,
            region.location,
            region.addresses,
            region.residency,
            region.backends,
        )
        for region in config.regions
        if not spec.candidates or region.name in spec.candidates
    )
