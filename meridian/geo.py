"""Client location: address -> (country, continent, coordinates, accuracy, network).

Backed by any MaxMind-format database (GeoIP2/GeoLite2 City or Country, or the shipped
country-level database in the City layout), read with ``maxminddb`` — the reader geoip2 itself
uses — so that a lookup returns plain dicts and the network the answer holds for.  Country
databases carry no coordinates: those records are placed at the country's population centroid.

Hot path: results are kept in an LRU keyed by network prefix (/24 for IPv4, /56 for IPv6), so a
busy resolver costs one dict lookup.  A result is only shared across a prefix when the whole
prefix provably gets the same answer (the database network covers it and no override cuts it).
"""

from __future__ import annotations

import csv
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import maxminddb

from meridian.config import GeoConfig, GeoOverride, Location

T = TypeVar("T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

EARTH_RADIUS_KM = 6371.0088
#: Prefix widths of the lookup cache buckets (the same truncation ECS resolvers use).
V4_BUCKET = 24
V6_BUCKET = 56

# Where continent-only records (and unknown countries) are put when the database has no point.
CONTINENT_CENTRES: dict[str, tuple[float, float]] = {
    "AF": (7.19, 21.09),
    "AN": (-82.86, 135.0),
    "AS": (29.84, 89.3),
    "EU": (48.69, 9.14),
    "NA": (46.07, -100.55),
    "OC": (-18.31, 138.52),
    "SA": (-14.6, -57.66),
}


class GeoError(Exception):
    """The geo database cannot be used (missing, unreadable, wrong kind)."""


@dataclass(frozen=True, slots=True)
class ClientLocation:
    lat: float
    lon: float
    country: str | None
    continent: str | None
    accuracy_km: int | None
    #: The widest network over which this answer holds (for ECS scope and caching).
    network: IPNetwork
    source: Literal["database", "override", "default"]
    #: A network override pinned to a region or a POP.
    region: str | None = None
    pop: str | None = None

    @property
    def found(self) -> bool:
        return self.source != "default"


def builtin_database() -> Path:
    return Path(str(resources.files("meridian") / "data" / "ipfire-country-city.mmdb"))


def _load_centroids() -> dict[str, tuple[float, float, str, int]]:
    path = Path(str(resources.files("meridian") / "data" / "country_centroids.csv"))
    table: dict[str, tuple[float, float, str, int]] = {}
    with path.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            table[row["iso_code"]] = (
                float(row["lat"]),
                float(row["lon"]),
                row["continent_code"],
                int(float(row["accuracy_radius_km"] or 0)),
            )
    return table


_CENTROIDS: dict[str, tuple[float, float, str, int]] | None = None


def country_centroid(iso: str) -> tuple[float, float, str, int] | None:
    """(lat, lon, continent, accuracy km) of a country's population centroid."""
    global _CENTROIDS
    if _CENTROIDS is None:
        _CENTROIDS = _load_centroids()
    return _CENTROIDS.get(iso)


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def nearest_first(
    lat: float, lon: float, items: Iterable[T], where: Callable[[T], Location]
) -> list[tuple[T, float]]:
    """``items`` with their distance from (lat, lon), nearest first; ties keep input order."""
    scored = []
    for item in items:
        loc = where(item)
        scored.append((item, distance_km(lat, lon, loc.lat, loc.lon)))
    scored.sort(key=lambda pair: pair[1])
    return scored


def _bucket(ip: IPAddress) -> tuple[int, int]:
    if ip.version == 4:
        return 4, int(ip) >> (32 - V4_BUCKET)
    return 6, int(ip) >> (128 - V6_BUCKET)


def _network_of(ip: IPAddress, prefix_len: int) -> IPNetwork:
    """The network of ``prefix_len`` bits holding ``ip`` (built from integers: no text parsing)."""
    bits = ip.max_prefixlen
    masked = (int(ip) >> (bits - prefix_len) << (bits - prefix_len)) if prefix_len else 0
    if ip.version == 4:
        return ipaddress.IPv4Network((masked, prefix_len))
    return ipaddress.IPv6Network((masked, prefix_len))


def _bucket_network(ip: IPAddress) -> IPNetwork:
    return _network_of(ip, V4_BUCKET if ip.version == 4 else V6_BUCKET)


class GeoLocator:
    """Looks clients up in the database, after the configured network overrides."""

    def __init__(self, geo: GeoConfig, fallback: Location) -> None:
        path = builtin_database() if geo.database == "builtin" else Path(geo.database)
        try:
            self._reader = maxminddb.open_database(str(path))
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise GeoError(f"geo.database: cannot open {path}: {exc}") from None
        kind = self._reader.metadata().database_type
        if "City" not in kind and "Country" not in kind:
            self._reader.close()
            raise GeoError(f"geo.database: {path} is a {kind} database, not City or Country")
        self.database_type: str = kind
        self.path = path
        self._default = geo.default_location or fallback
        # Most specific override first.
        self._overrides: list[GeoOverride] = sorted(
            geo.overrides, key=lambda o: o.network.prefixlen, reverse=True
        )
        # Buckets cut by an override narrower than the bucket: those never share a result.
        self._cut_buckets: set[tuple[int, int]] = set()
        for override in self._overrides:
            net = override.network
            width = V4_BUCKET if net.version == 4 else V6_BUCKET
            if net.prefixlen > width:
                self._cut_buckets.add(_bucket(net.network_address))
        self._cache_size = max(16, geo.cache_size)
        self._by_bucket: OrderedDict[tuple[int, int], ClientLocation] = OrderedDict()
        self._by_address: OrderedDict[IPAddress, ClientLocation] = OrderedDict()

    def close(self) -> None:
        self._reader.close()

    def locate(self, address: IPAddress | str) -> ClientLocation:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        bucket = _bucket(ip)
        hit = self._by_bucket.get(bucket)
        if hit is not None:
            self._by_bucket.move_to_end(bucket)
            return hit
        hit = self._by_address.get(ip)
        if hit is not None:
            self._by_address.move_to_end(ip)
            return hit
        result = self._lookup(ip)
        width = V4_BUCKET if ip.version == 4 else V6_BUCKET
        if result.network.prefixlen <= width and bucket not in self._cut_buckets:
            self._remember(self._by_bucket, bucket, result)
        else:
            self._remember(self._by_address, ip, result)
        return result

    def _remember(
        self, table: OrderedDict[Any, ClientLocation], key: Any, value: ClientLocation
    ) -> None:
        table[key] = value
        if len(table) > self._cache_size:
            table.popitem(last=False)

    def _lookup(self, ip: IPAddress) -> ClientLocation:
        for override in self._overrides:
            if ip in override.network:
                return self._from_override(override)
        record, prefix_len = self._reader.get_with_prefix_len(ip)
        network = _network_of(ip, prefix_len)
        # An override inside this database network makes only part of it uniform.
        if any(
            o.network.version == ip.version and o.network.subnet_of(network)  # type: ignore[arg-type]
            for o in self._overrides
        ):
            network = (
                _bucket_network(ip)
                if _bucket(ip) not in self._cut_buckets
                else _network_of(ip, ip.max_prefixlen)
            )
        if not isinstance(record, dict):
            d = self._default
            return ClientLocation(d.lat, d.lon, d.country, d.continent, None, network, "default")
        return self._from_record(record, network)

    def _from_record(self, record: dict[str, Any], network: IPNetwork) -> ClientLocation:
        country = (record.get("country") or record.get("registered_country") or {}).get("iso_code")
        continent = (record.get("continent") or {}).get("code")
        location = record.get("location") or {}
        lat, lon = location.get("latitude"), location.get("longitude")
        accuracy = location.get("accuracy_radius")
        if lat is None or lon is None:
            centroid = country_centroid(country) if country else None
            if centroid is not None:
                lat, lon, cont, radius = centroid
                continent = continent or cont
                accuracy = accuracy or radius or None
            elif continent in CONTINENT_CENTRES:
                lat, lon = CONTINENT_CENTRES[continent]
                accuracy = accuracy or 3000
            else:
                d = self._default
                return ClientLocation(
                    d.lat, d.lon, d.country, d.continent, None, network, "default"
                )
        return ClientLocation(
            float(lat), float(lon), country, continent, accuracy, network, "database"
        )

    def _from_override(self, override: GeoOverride) -> ClientLocation:
        loc = override.location or self._default
        return ClientLocation(
            loc.lat,
            loc.lon,
            loc.country,
            loc.continent,
            None,
            override.network,
            "override",
            region=override.region,
            pop=override.pop,
        )
