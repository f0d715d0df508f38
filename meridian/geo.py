"""Client location: address -> (country, continent, coordinates, accuracy, network).

Backed by any MaxMind-format database (GeoIP2/GeoLite2 City or Country, or the shipped
country-level database in the City layout), read with ``maxminddb`` — the reader geoip2 itself
uses — so that a lookup returns plain dicts and the network the answer holds for.  Country
databases carry no coordinates: those records are placed at the country's population centroid.

Hot path: results are kept in an LRU keyed by network prefix (/24 for IPv4, /56 for IPv6), so a
busy resolver costs one dict lookup.  A result is only shared across a prefix when the whole
prefix provably gets the same answer (the database network covers it and no override cuts it).

Cold IPv4 path (:meth:`GeoLocator.locate_v4`, what the DNS fast path calls with an int): the
search tree is walked in place over our own read-only mapping of the file (prefaulted), from a
directory of the first 16 bits built at open; the leaf's data pointer names its record, and each
distinct record is decoded once (by ``maxminddb``) into an interned :class:`Placement`.  A miss
therefore costs a few list and slice operations and no ``ipaddress`` object, no dict decoding.
"""

from __future__ import annotations

import csv
import ipaddress
import math
import mmap
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import maxminddb

from meridian.config import GeoConfig, GeoOverride, Location
from meridian.geo_tree import TreeRanges, tree_ranges

T = TypeVar("T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

EARTH_RADIUS_KM = 6371.0088
#: Prefix widths of the lookup cache buckets (the same truncation ECS resolvers use).
V4_BUCKET = 24
V6_BUCKET = 56
#: Bits of an IPv4 address resolved by the directory built at open (2**16 entries, ~20 ms for a
#: 1.8 M-node database); the rest of the search tree is walked per lookup.
V4_DIRECTORY_BITS = 16
_V4_WALKED_BITS = 32 - V4_DIRECTORY_BITS
#: Decoded records kept (by data pointer, and interned placements) before both are emptied: the
#: shipped database has about 160 distinct answers, a city database may have far more.
RECORD_CACHE_LIMIT = 65_536

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


class DatabaseIdentity(NamedTuple):
    """Which file a locator reads: equal identities are the same bytes (a file replaced on
    disk has a new inode, a file rewritten in place a new mtime or size), so whatever is
    derived from the file alone can be reused between locators of equal identity."""

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str, stat: os.stat_result) -> DatabaseIdentity:
        return cls(path, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


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


@dataclass(frozen=True, slots=True, eq=False)
class Placement:
    """Everything a location says of a client but its network: one object per distinct answer
    (database record, override, the default), shared by every network that gets that answer.

    Interned by the locator that made it, so identity is equality (and hashing is cheap)."""

    lat: float
    lon: float
    country: str | None
    continent: str | None
    accuracy_km: int | None
    source: Literal["database", "override", "default"]
    region: str | None = None
    pop: str | None = None

    def at(self, network: IPNetwork) -> ClientLocation:
        """This answer for ``network``."""
        return ClientLocation(
            self.lat,
            self.lon,
            self.country,
            self.continent,
            self.accuracy_km,
            network,
            self.source,
            self.region,
            self.pop,
        )


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
            path = path.resolve()
            # Before the reader opens it: checked against the file our own mapping holds.
            before = DatabaseIdentity.of(str(path), path.stat())
            self._reader = maxminddb.open_database(str(path))
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise GeoError(f"geo.database: cannot open {path}: {exc}") from None
        metadata = self._reader.metadata()
        kind = metadata.database_type
        if "City" not in kind and "Country" not in kind:
            self._reader.close()
            raise GeoError(f"geo.database: {path} is a {kind} database, not City or Country")
        self.database_type: str = kind
        self.path = path
        self._default = geo.default_location or fallback
        d = self._default
        self._default_placement = Placement(d.lat, d.lon, d.country, d.continent, None, "default")
        #: Placements by what they say (so that equal answers are one object).
        self._placements: dict[tuple[object, ...], Placement] = {}
        # Most specific override first.
        self._overrides: list[GeoOverride] = sorted(
            geo.overrides, key=lambda o: o.network.prefixlen, reverse=True
        )
        self._override_placements = [self._from_override(o) for o in self._overrides]
        #: IPv4 overrides as (first, last, prefix length, placement), most specific first.
        self._v4_overrides: list[tuple[int, int, int, Placement]] = [
            (
                int(o.network.network_address),
                int(o.network.broadcast_address),
                o.network.prefixlen,
                p,
            )
            for o, p in zip(self._overrides, self._override_placements, strict=True)
            if o.network.version == 4
        ]
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
        try:
            self._tree = _V4Tree(
                path, metadata.node_count, metadata.record_size, metadata.ip_version
            )
        except (OSError, ValueError, IndexError) as exc:
            self._reader.close()
            raise GeoError(f"geo.database: cannot open {path}: {exc}") from None
        #: The file both the reader and the tree read (what compiled answers are cached by).
        self.identity = self._tree.identity
        if self.identity != before:  # replaced between the two opens: which did the reader get?
            self.close()
            raise GeoError(f"geo.database: {path} changed while it was being opened")
        #: Data pointers seen (search tree leaf values) -> their placement.
        self._by_pointer: dict[int, Placement] = {}
        # The tree's directory, read directly by locate_v4 (most lookups end there).
        self._directory = self._tree.directory
        self._depths = self._tree.depths
        self._node_count = self._tree.node_count

    def close(self) -> None:
        self._reader.close()
        self._tree.close()

    @property
    def default_placement(self) -> Placement:
        """Where clients the database cannot place are put."""
        return self._default_placement

    def override_placements(self) -> list[tuple[IPNetwork, Placement]]:
        """The network overrides, most specific first (the first that holds an address wins)."""
        return [
            (o.network, p) for o, p in zip(self._overrides, self._override_placements, strict=True)
        ]

    def record_placement(self, address: IPAddress) -> Placement:
        """The placement of the database record holding ``address`` (overrides ignored)."""
        try:
            record = self._reader.get(address)
        except ValueError:  # an IPv6 address in an IPv4-only database: not in it
            return self._default_placement
        return self._placement(record)

    def tree_ranges(self) -> TreeRanges:
        """Every network of the database, in address order (a walk of the whole tree: about
        a second for the shipped database; what it is compiled into is kept, not this).
        Walked in the mapping opened with the locator, so it is the file :attr:`identity`
        names even if the path has been replaced since."""
        metadata = self._reader.metadata()
        return tree_ranges(
            self._tree.data, metadata.node_count, metadata.record_size, metadata.ip_version
        )

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

    def locate_v4(self, value: int) -> tuple[Placement, int]:
        """The placement of the IPv4 address ``value`` and the prefix length of the widest
        network holding it over which that answer holds (what :meth:`locate` would answer,
        network included, without building any object on the way).  Not cached: a miss is a
        few list and slice operations."""
        for first, last, override_len, pinned in self._v4_overrides:
            if first <= value <= last:
                return pinned, override_len
        high = value >> _V4_WALKED_BITS
        pointer = self._directory[high]
        if pointer >= self._node_count:
            prefix_len = self._depths[high]
        else:
            pointer, prefix_len = self._tree.walk(pointer, value)
        placement = self._by_pointer.get(pointer)
        if placement is None:
            placement = self._record_placement(value, pointer, prefix_len)
        if self._v4_overrides and self._narrowed(value, prefix_len):
            bucket = (4, value >> (32 - V4_BUCKET))
            prefix_len = V4_BUCKET if bucket not in self._cut_buckets else 32
        return placement, prefix_len

    def _narrowed(self, value: int, prefix_len: int) -> bool:
        """Whether an override lies inside the database network of ``value``."""
        shift = 32 - prefix_len
        first = value >> shift << shift
        last = first | ((1 << shift) - 1)
        return any(
            first <= o_first and o_last <= last for o_first, o_last, _, _ in self._v4_overrides
        )

    def _record_placement(self, value: int, pointer: int, prefix_len: int) -> Placement:
        """Decode the record a leaf points at (once per pointer: there are few records)."""
        if pointer == self._tree.node_count:  # an empty leaf: not in the database
            placement = self._default_placement
        else:
            record, reader_prefix = self._reader.get_with_prefix_len(ipaddress.IPv4Address(value))
            if reader_prefix != prefix_len:  # our walk and the reader's must agree
                raise GeoError(
                    f"geo.database: {self.path}: search tree walk disagrees with the reader "
                    f"for {ipaddress.IPv4Address(value)} (/{prefix_len} vs /{reader_prefix})"
                )
            placement = self._placement(record)
        if len(self._by_pointer) >= RECORD_CACHE_LIMIT:
            self._by_pointer.clear()
        self._by_pointer[pointer] = placement
        return placement

    def _remember(
        self, table: OrderedDict[Any, ClientLocation], key: Any, value: ClientLocation
    ) -> None:
        table[key] = value
        if len(table) > self._cache_size:
            table.popitem(last=False)

    def _lookup(self, ip: IPAddress) -> ClientLocation:
        if ip.version == 4:
            placement, prefix_len = self.locate_v4(int(ip))
            return placement.at(_network_of(ip, prefix_len))
        for override, placement in zip(self._overrides, self._override_placements, strict=True):
            if ip in override.network:
                return placement.at(override.network)
        try:
            record, prefix_len = self._reader.get_with_prefix_len(ip)
        except ValueError:  # an IPv6 address in an IPv4-only database: not in it
            record, prefix_len = None, 0
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
        return self._placement(record).at(network)

    def _placement(self, record: object) -> Placement:
        """What a database record says, interned."""
        if not isinstance(record, dict):
            return self._default_placement
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
                return self._default_placement
        key = (float(lat), float(lon), country, continent, accuracy)
        placement = self._placements.get(key)
        if placement is None:
            if len(self._placements) >= RECORD_CACHE_LIMIT:
                self._placements.clear()
            placement = self._placements[key] = Placement(*key, "database")
        return placement

    def _from_override(self, override: GeoOverride) -> Placement:
        loc = override.location or self._default
        return Placement(
            loc.lat,
            loc.lon,
            loc.country,
            loc.continent,
            None,
            "override",
            region=override.region,
            pop=override.pop,
        )


class _V4Tree:
    """The IPv4 part of a MaxMind DB search tree, walked in place.

    Lookups resolve the first :data:`V4_DIRECTORY_BITS` bits from a directory built at open,
    then follow the tree bit by bit to a leaf: the leaf value is ``node_count`` (not in the
    database) or a data pointer (larger), which identifies the record.  Same walk, same prefix
    lengths as libmaxminddb's (the locator checks each new record against the reader)."""

    def __init__(self, path: Path, node_count: int, record_size: int, ip_version: int) -> None:
        if record_size not in (24, 28, 32):
            raise ValueError(f"unsupported record size {record_size}")
        self.node_count = node_count
        self._record_size = record_size
        self._node_bytes = record_size // 4
        with path.open("rb") as fh:
            # Prefaulted (Linux): the first lookups do not pay a page fault each.
            populate = getattr(mmap, "MAP_POPULATE", 0)
            self._map = mmap.mmap(
                fh.fileno(), 0, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ
            )
            self.identity = DatabaseIdentity.of(str(path), os.fstat(fh.fileno()))
        if len(self._map) < node_count * self._node_bytes:
            self._map.close()
            raise ValueError("the search tree is larger than the file")
        start = 0
        if ip_version == 6:  # IPv4 lives under ::/96
            for _ in range(96):
                if start >= node_count:
                    break
                start = self._child(start, 0)
        #: Per 16-bit prefix: a node to walk on from (depth 16), or a leaf value and its depth.
        self.directory, self.depths = self._build_directory(start)

    def _build_directory(self, start: int) -> tuple[list[int], bytearray]:
        """Level by level (about 17 ms for the shipped database): each entry either expands
        to the node's two children or, a leaf, is repeated with its depth."""
        node_count = self.node_count
        data = self._map
        size = self._node_bytes >> 1
        node_bytes = self._node_bytes
        from_bytes = int.from_bytes
        child = self._child
        aligned = self._record_size != 28
        nodes, depths = [start], [0]
        for depth in range(1, V4_DIRECTORY_BITS + 1):
            next_nodes: list[int] = []
            next_depths: list[int] = []
            add_node, add_depth = next_nodes.append, next_depths.append
            for node, at in zip(nodes, depths, strict=True):
                if node < node_count:
                    if aligned:
                        offset = node * node_bytes
                        add_node(from_bytes(data[offset : offset + size], "big"))
                        add_node(from_bytes(data[offset + size : offset + node_bytes], "big"))
                    else:
                        add_node(child(node, 0))
                        add_node(child(node, 1))
                    add_depth(depth)
                    add_depth(depth)
                else:
                    add_node(node)
                    add_node(node)
                    add_depth(at)
                    add_depth(at)
            nodes, depths = next_nodes, next_depths
        return nodes, bytearray(depths)

    @property
    def data(self) -> mmap.mmap:
        """The whole file, mapped read-only."""
        return self._map

    def close(self) -> None:
        self._map.close()

    def _child(self, node: int, bit: int) -> int:
        data = self._map
        if self._record_size == 28:
            offset = node * 7
            middle = data[offset + 3]
            if bit:
                return ((middle & 0x0F) << 24) | int.from_bytes(
                    data[offset + 4 : offset + 7], "big"
                )
            return ((middle & 0xF0) << 20) | int.from_bytes(data[offset : offset + 3], "big")
        size = self._node_bytes >> 1
        offset = node * self._node_bytes + bit * size
        return int.from_bytes(data[offset : offset + size], "big")

    def find(self, value: int) -> tuple[int, int]:
        """(leaf value, prefix length) for the IPv4 address ``value``."""
        high = value >> _V4_WALKED_BITS
        node = self.directory[high]
        if node >= self.node_count:
            return node, self.depths[high]
        return self.walk(node, value)

    def walk(self, node: int, value: int) -> tuple[int, int]:
        """On from ``node``, the directory's entry for ``value``, to the leaf."""
        node_count = self.node_count
        depth = V4_DIRECTORY_BITS
        if self._record_size == 28:
            child = self._child
            while depth < 32:
                node = child(node, (value >> (31 - depth)) & 1)
                depth += 1
                if node >= node_count:
                    return node, depth
        else:
            data = self._map
            size = self._node_bytes >> 1
            node_bytes = self._node_bytes
            while depth < 32:
                offset = node * node_bytes + ((value >> (31 - depth)) & 1) * size
                node = int.from_bytes(data[offset : offset + size], "big")
                depth += 1
                if node >= node_count:
                    return node, depth
        raise GeoError("geo.database: corrupt search tree (no leaf after 32 bits)")
