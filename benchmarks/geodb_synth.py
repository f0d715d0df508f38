"""A GeoLite2-City-sized test database, synthesised, and what compiling GeoDNS answers over it
costs.

    python -m benchmarks.geodb_synth write OUT.mmdb [--split 5] [--seed 1]
    python -m benchmarks.geodb_synth measure DB.mmdb [--json OUT.json]

``write`` takes the shipped country database's search tree (1.85 M nodes) and splits each of its
networks into up to ``--split`` smaller networks (random prefixes), each pointing at a city of
the network's country (cities placed at random around the country's centroid, a few per 10
networks of the country): about 3.5 million networks (IPv4 and IPv6) and 100,000 distinct
records in the GeoIP2-City layout (``city``, ``continent``, ``country``, ``location``), as
GeoLite2-City has.  The file is written by the small MaxMind DB writer below (search tree with
32-bit records, data section, metadata), readable by ``maxminddb`` and ``geoip2``.

``measure`` loads the demo world with that database in a fresh process and reports the time to
walk the tree, build the address map, compile every answer, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import ipaddress
import json
import random
import resource
import struct
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import maxminddb

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "meridian" / "data" / "ipfire-country-city.mmdb"
CENTROIDS = REPO / "meridian" / "data" / "country_centroids.csv"
METADATA_MARKER = b"\xab\xcd\xefMaxMind.com"


# ------------------------------------------------------------------------- MaxMind DB encoding


def _control(kind: int, size: int) -> bytes:
    if kind <= 7:
        head, extended = kind << 5, b""
    else:
        head, extended = 0, bytes((kind - 7,))
    if size < 29:
        return bytes((head | size,)) + extended
    if size < 29 + 256:
        return bytes((head | 29,)) + extended + bytes((size - 29,))
    if size < 285 + 65536:
        return bytes((head | 30,)) + extended + (size - 285).to_bytes(2, "big")
    return bytes((head | 31,)) + extended + (size - 65821).to_bytes(3, "big")


class U32(int):
    """An unsigned integer the format wants as uint32 whatever its value."""


class U64(int):
    """An unsigned integer the format wants as uint64 (the metadata's ``build_epoch``)."""


def encode(value: Any) -> bytes:
    """One value in the MaxMind DB data format (maps, UTF-8 strings, doubles, unsigned ints,
    arrays, booleans)."""
    if isinstance(value, bool):
        return _control(14, int(value))
    if isinstance(value, str):
        data = value.encode()
        return _control(2, len(data)) + data
    if isinstance(value, float):
        return _control(3, 8) + struct.pack(">d", value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError("only unsigned integers")
        data = value.to_bytes((value.bit_length() + 7) // 8, "big")
        if isinstance(value, U64):
            return _control(9, len(data)) + data
        if isinstance(value, U32):
            return _control(6, len(data)) + data
        if value < 1 << 16:
            return _control(5, len(data)) + data
        if value < 1 << 32:
            return _control(6, len(data)) + data
        return _control(9, len(data)) + data
    if isinstance(value, dict):
        out = _control(7, len(value))
        for key, item in value.items():
            out += encode(str(key)) + encode(item)
        return out
    if isinstance(value, list | tuple):
        return _control(11, len(value)) + b"".join(encode(item) for item in value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def write_database(
    path: Path,
    lefts: array[int],
    rights: array[int],
    data: bytes,
    database_type: str,
    description: str,
) -> None:
    """The file: search tree (32-bit records), 16 zero bytes, data section, metadata."""
    node_count = len(lefts)
    big_left, big_right = array("I", lefts), array("I", rights)
    if sys.byteorder == "little":
        big_left.byteswap()
        big_right.byteswap()
    left_bytes, right_bytes = big_left.tobytes(), big_right.tobytes()
    tree = bytearray(8 * node_count)
    for i in range(4):
        tree[i::8] = left_bytes[i::4]
        tree[4 + i :: 8] = right_bytes[i::4]
    metadata = {
        "binary_format_major_version": 2,
        "binary_format_minor_version": 0,
        "build_epoch": U64(int(time.time())),
        "database_type": database_type,
        "description": {"en": description},
        "ip_version": 6,
        "languages": ["en"],
        "node_count": U32(node_count),
        "record_size": 32,
    }
    with path.open("wb") as out:
        out.write(tree)
        out.write(b"\0" * 16)
        out.write(data)
        out.write(METADATA_MARKER)
        out.write(encode(metadata))


# ------------------------------------------------------------------------------ synthesis


def _centroids() -> dict[str, tuple[float, float, str]]:
    table = {}
    with CENTROIDS.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            table[row["iso_code"]] = (float(row["lat"]), float(row["lon"]), row["continent_code"])
    return table


def _country_of(record: Any) -> tuple[str | None, str | None]:
    if not isinstance(record, dict):
        return None, None
    country = (record.get("country") or {}).get("iso_code")
    continent = (record.get("continent") or {}).get("code")
    return country, continent


def synthesise(out: Path, split: int, seed: int) -> dict[str, Any]:
    """Split every network of the shipped database into city networks (see the docstring)."""
    from meridian.geo_tree import child_arrays

    started = time.perf_counter()
    rng = random.Random(seed)
    reader = maxminddb.open_database(str(SHIPPED))
    meta = reader.metadata()
    old_count = meta.node_count
    raw = SHIPPED.read_bytes()
    old_left, old_right = child_arrays(raw[: old_count * 6], old_count, meta.record_size)
    centroids = _centroids()

    lefts: list[int] = []
    rights: list[int] = []
    #: Leaf values until the end: -1 (not in the database) or -(2 + record number).
    records: list[bytes] = []
    cities: dict[str, list[int]] = {}
    country_of_pointer: dict[int, tuple[str | None, str | None]] = {}
    networks = 0

    def city_record(country: str | None, continent: str | None) -> int:
        pool = cities.setdefault(country or continent or "?", [])
        # Roughly one city per ten networks of the country, up to 3,000 cities.
        if not pool or (len(pool) < 3000 and rng.random() < 0.1):
            lat, lon, cont = centroids.get(country or "", (0.0, 0.0, continent or ""))
            lat = max(-89.0, min(89.0, lat + rng.uniform(-6, 6)))
            lon = (lon + rng.uniform(-8, 8) + 180.0) % 360.0 - 180.0
            record: dict[str, Any] = {
                "city": {
                    "geoname_id": 1_000_000 + len(records),
                    "names": {"en": f"City {len(records)}"},
                },
                "continent": {"code": cont or continent or "EU", "names": {"en": cont or "?"}},
                "location": {
                    "accuracy_radius": rng.choice([5, 10, 20, 50, 100, 200]),
                    "latitude": round(lat, 4),
                    "longitude": round(lon, 4),
                },
            }
            if country:
                record["country"] = {"iso_code": country, "names": {"en": country}}
            pool.append(len(records))
            records.append(encode(record))
        return pool[rng.randrange(len(pool))]

    def new_node() -> int:
        lefts.append(0)
        rights.append(0)
        return len(lefts) - 1

    def split_leaf(depth: int, record_of: Callable[[], int]) -> int:
        """A subtree of up to ``split`` leaves below a leaf at ``depth`` (or the leaf)."""
        nonlocal networks
        leaves = rng.randint(1, split)
        if leaves == 1 or depth >= 128:
            networks += 1
            return -(2 + record_of())
        node = new_node()
        # Split unevenly: the left part gets a random share of the leaves.
        left_count = rng.randint(1, leaves - 1)
        stack = [(node, depth + 1, left_count, leaves - left_count)]
        while stack:
            parent, at, left_n, right_n = stack.pop()
            for side, count in ((0, left_n), (1, right_n)):
                if count == 1 or at >= 128:
                    networks += 1
                    value = -(2 + record_of())
                else:
                    value = new_node()
                    first = rng.randint(1, count - 1)
                    stack.append((value, at + 1, first, count - first))
                (lefts if side == 0 else rights)[parent] = value
        return node

    mapping: dict[int, int] = {}
    root = new_node()
    mapping[0] = root
    stack = [(0, root, 0, 0)]  # old node, new node, depth, first address
    while stack:
        old, new, depth, first = stack.pop()
        for side, child in ((0, old_left[old]), (1, old_right[old])):
            child_first = first | (side << (127 - depth))
            if child < old_count:
                mapped = mapping.get(child)
                if mapped is None:
                    mapped = mapping[child] = new_node()
                    stack.append((child, mapped, depth + 1, child_first))
                value = mapped
            elif child == old_count:
                value = -1
            else:
                place = country_of_pointer.get(child)
                if place is None:
                    place = country_of_pointer[child] = _country_of(
                        reader.get(ipaddress.IPv6Address(child_first))
                    )
                country, continent = place
                value = split_leaf(depth + 1, functools.partial(city_record, country, continent))
            (lefts if side == 0 else rights)[new] = value

    node_count = len(lefts)
    offsets = []
    position = 0
    for record in records:
        offsets.append(position)
        position += len(record)

    def resolve(value: int) -> int:
        if value >= 0:
            return value
        if value == -1:
            return node_count
        return node_count + 16 + offsets[-2 - value]

    final_left = array("I", map(resolve, lefts))
    final_right = array("I", map(resolve, rights))
    write_database(
        out,
        final_left,
        final_right,
        b"".join(records),
        "Synthetic-GeoLite2-City",
        "Meridian benchmark: the shipped ranges split into city networks",
    )
    return {
        "path": str(out),
        "nodes": node_count,
        "networks": networks,
        "records": len(records),
        "bytes": out.stat().st_size,
        "seconds": round(time.perf_counter() - started, 1),
    }


# ------------------------------------------------------------------------------ measuring


def measure(database: Path) -> dict[str, Any]:
    """Load the demo world over ``database`` and compile every answer (this process)."""
    import yaml

    from geodns.responder import Responder
    from geodns.zone import Zone
    from meridian.config import parse_config
    from meridian.geo import GeoLocator
    from meridian.health.snapshot import HealthSnapshot

    data = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    data["geo"]["database"] = str(database)
    config = parse_config(data)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    locator = GeoLocator(config.geo, config.pops[0].location)
    tree = locator.tree_ranges()
    walked = time.perf_counter()
    networks = {"ipv4": len(tree.v4_starts), "ipv6": len(tree.v6_starts)}
    del tree
    responder = Responder(Zone.build(config), locator)  # walks the tree again, then drops it
    mapped = time.perf_counter()
    pops = {p.name: True for p in config.pops}
    health = HealthSnapshot(1, {}, {r.name: True for r in config.regions}, pops, {})
    responder.install(responder.compile(health))
    compiled = time.perf_counter()
    # One POP down (the nearest to most of the address space: every POP table changes).
    down = HealthSnapshot(
        2, {}, {r.name: True for r in config.regions}, {**pops, config.pops[0].name: False}, {}
    )
    responder.install(responder.compile(down))
    recompiled = time.perf_counter()
    address_map = responder.address_map
    result = {
        "database": str(database),
        "networks": networks,
        "placements": address_map.placements,
        "signature_ranges": address_map.ranges,
        "walk_s": round(walked - started, 2),
        "walk_and_address_map_s": round(mapped - walked, 2),
        "compile_s": round(compiled - mapped, 2),
        "recompile_one_pop_down_s": round(recompiled - compiled, 2),
        "answer_ranges": {
            geo.fqdn: len(table.v4_starts) + len(table.v6_starts)
            for geo, table in (
                (responder._class_names[n][1], tables[4])
                for n, tables in enumerate(responder.compiled.tables)  # type: ignore[union-attr]
            )
        },
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_mib": _current_rss_mib(),
        "rss_before_mib": round(rss_before / 1024, 1),
    }
    return result


def _current_rss_mib() -> float:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.geodb_synth")
    sub = parser.add_subparsers(dest="what", required=True)
    write = sub.add_parser("write")
    write.add_argument("out", type=Path)
    write.add_argument("--split", type=int, default=5)
    write.add_argument("--seed", type=int, default=1)
    check = sub.add_parser("measure")
    check.add_argument("database", type=Path)
    check.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.what == "write":
        print(json.dumps(synthesise(args.out, args.split, args.seed)))
        return 0
    result = measure(args.database)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
