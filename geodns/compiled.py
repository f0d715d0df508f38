"""Answers compiled over the whole address space (gdnsd's way): sans-I/O, no clock.

Two stages:

1. :class:`AddressMap` (once per config and database, health-independent): the IPv4 and the
   IPv6 address space - every database network, then the network overrides - as sorted ranges,
   each labelled with a *signature*: everything :func:`~geodns.selection.select` reads of a
   client (the residency rule that applies, and per target set the order of the targets by
   distance with the pinned one first).  Clients with one signature get one answer whatever the
   health, so neighbouring networks with one signature are merged: a few hundred signatures
   and far fewer ranges than networks.

2. :class:`AnswerTable` (per geo answer class and address family, per health generation): each
   signature's selection, then the ranges re-labelled with answers and merged again - the
   maximal ranges that share one answer.  A query is one ``bisect`` in a table; the ECS scope
   is the widest prefix around the client's address inside its range
   (:func:`widest_scope`).  A health change re-labels only the tables whose answers change.

The IPv6 map follows :meth:`~meridian.geo.GeoLocator.locate` exactly: ``::ffff:0:0/96`` is the
IPv4 map (IPv4 overrides apply), other addresses are the database's IPv6 tree (its aliases of
the IPv4 subtree, ``::/96`` and ``2002::/16``, without the IPv4 overrides) under the IPv6
overrides.
"""

from __future__ import annotations

import gc
import ipaddress
import time
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import compress, islice, repeat, tee
from operator import and_, lshift, ne, or_, rshift

from geodns.countries import CountryMap, build_country_map
from geodns.selection import HealthView, Selection, select
from geodns.zone import GeoName, Target
from meridian.config import Config, Location
from meridian.geo import GeoLocator, Placement, nearest_first
from meridian.geo_tree import TreeRanges

V4_TOP = 1 << 32
V6_TOP = 1 << 128
#: Where IPv4-mapped IPv6 addresses start (``::ffff:0:0/96``).
V4_MAPPED = 0xFFFF << 32
_ANY_NETWORK = ipaddress.IPv4Network(0)
#: Answer tables kept for reuse by a responder (see :func:`compile_table`).
REUSE_LIMIT = 32

#: A signature (per target set): the residency rule's name, then the targets' names in the
#: order selection considers them (nearest first, a pinned one before all).
Signature = tuple[str | None, tuple[str, ...]]


def merge(starts: Sequence[int], values: Sequence[int]) -> tuple[list[int], list[int]]:
    """Ranges with the value of the range before them dropped (their start is no boundary)."""
    if not values:
        return [], []
    keep = [0]
    keep += compress(range(1, len(values)), map(ne, islice(values, 1, None), values))
    return [starts[i] for i in keep], [values[i] for i in keep]


def splice(
    starts: list[int],
    values: list[int],
    first: int,
    last: int,
    inner_starts: Sequence[int],
    inner_values: Sequence[int],
) -> None:
    """Replace ``[first, last]`` in the ranges (which cover the whole space) by the ranges
    ``inner`` (which cover exactly ``[first, last]``; ``inner_starts[0] == first``)."""
    i = bisect_right(starts, first) - 1
    j = bisect_right(starts, last) - 1
    after = values[j]
    new_starts = list(inner_starts)
    new_values = list(inner_values)
    if j + 1 >= len(starts) or starts[j + 1] != last + 1:
        new_starts.append(last + 1)
        new_values.append(after)
    cut = i + 1 if starts[i] < first else i
    starts[cut : j + 1] = new_starts
    values[cut : j + 1] = new_values


def _overlay(
    starts: list[int], values: list[int], first: int, last: int, value: int, top: int
) -> None:
    i = bisect_right(starts, first) - 1
    j = bisect_right(starts, last) - 1
    new_starts, new_values = [first], [value]
    if last + 1 < top and (j + 1 >= len(starts) or starts[j + 1] != last + 1):
        new_starts.append(last + 1)
        new_values.append(values[j])
    cut = i + 1 if starts[i] < first else i
    starts[cut : j + 1] = new_starts
    values[cut : j + 1] = new_values


def widest_scope(address: int, first: int, following: int, bits: int) -> int:
    """The shortest prefix length whose network around ``address`` lies inside
    ``[first, following - 1]`` (``following`` is the next range's start, or 2**bits)."""
    host_bits = bits
    if first:
        host_bits = min(host_bits, (address ^ (first - 1)).bit_length() - 1)
    if following < (1 << bits):
        host_bits = min(host_bits, (address ^ following).bit_length() - 1)
    return bits - host_bits


def widest_scope_plain(address: int, first: int, last: int, bits: int) -> int:
    """:func:`widest_scope` written out (the strict path's version, for the equivalence
    tests): try prefix lengths from 0 up."""
    for prefix in range(bits + 1):
        size = 1 << (bits - prefix)
        network_first = address - address % size
        if network_first >= first and network_first + size - 1 <= last:
            return prefix
    raise AssertionError("the address is outside its range")


@dataclass(frozen=True, slots=True, eq=False)
class GroupMap:
    """The address space as ranges of signatures for one target set."""

    #: The target set it was built for: a map shared across reloads may hold an earlier
    #: config's (other addresses); only what :func:`group_key` reads is the same.
    targets: tuple[Target, ...]
    v4_starts: array[int]
    #: Signature numbers: ``bytes`` while there are at most 256 signatures, else ``array``.
    v4_signatures: bytes | array[int]
    v6_starts: list[int]
    v6_signatures: bytes | array[int]
    #: One placement per signature (any client with that signature answers alike).
    representatives: tuple[Placement, ...]
    signatures: tuple[Signature, ...]

    @property
    def ranges(self) -> int:
        return len(self.v4_starts) + len(self.v6_starts)


@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class AddressMap:
    """Both address families as ranges of signatures, per target set (see the module
    docstring).  Never changed once settled: responders of successive reloads share one."""

    #: By :func:`group_key` of the target set.
    groups: dict[GroupKey, GroupMap]
    #: Database networks walked (IPv4 leaves, IPv6 leaves and aliases), distinct placements.
    leaves: tuple[int, int]
    placements: int
    seconds: float
    #: Client countries by address (what the answer counters are labelled with).
    countries: CountryMap

    @property
    def ranges(self) -> int:
        return sum(g.ranges for g in self.groups.values())


#: What a signature reads of a target set: kinds, names and places (not addresses).
GroupKey = tuple[tuple[str, str, Location], ...]


def group_key(targets: tuple[Target, ...]) -> GroupKey:
    return tuple((t.kind, t.name, t.location) for t in targets)


def _signature(config: Config, group: tuple[Target, ...], placement: Placement) -> Signature:
    rule = config.residency_zone_for(placement.country, placement.continent)
    order: tuple[str, ...] = ()
    if group:
        pinned = placement.pop if group[0].kind == "pop" else placement.region
        ordered = nearest_first(placement.lat, placement.lon, group, lambda t: t.location)
        ordered.sort(key=lambda pair: pair[0].name != pinned)
        order = tuple(t.name for t, _ in ordered)
    return (rule.name if rule is not None else None, order)


def _packed(values: list[int], count: int) -> bytes | array[int]:
    return bytes(values) if count <= 256 else array("I", values)


def build_address_map(
    locator: GeoLocator, tree: TreeRanges, config: Config, names: Sequence[GeoName]
) -> AddressMap:
    """Stage 1: the address space as ranges of placements (database, then overrides), then
    per target set as ranges of signatures."""
    started = time.perf_counter()
    placements: list[Placement] = []
    numbers: dict[int, int] = {}

    def number_of(placement: Placement) -> int:
        number = numbers.get(id(placement))
        if number is None:
            number = numbers[id(placement)] = len(placements)
            placements.append(placement)
        return number

    default = number_of(locator.default_placement)
    # Each distinct leaf value (a record) decoded once, at the first address that leads to it.
    by_value: dict[int, int] = {tree.node_count: default}
    for first, value in zip(tree.v4_starts, tree.v4_values, strict=True):
        if value not in by_value:
            placement = locator.record_placement(ipaddress.IPv4Address(first))
            by_value[value] = number_of(placement)
    v4_db_starts, v4_db = merge(tree.v4_starts, [by_value[v] for v in tree.v4_values])

    # IPv4: the database, then the overrides (most specific last, so it wins).
    v4_starts, v4_values = list(v4_db_starts), list(v4_db)
    overrides = locator.override_placements()
    for network, placement in reversed(overrides):
        if network.version == 4:
            first, last = int(network.network_address), int(network.broadcast_address)
            _overlay(v4_starts, v4_values, first, last, number_of(placement), V4_TOP)
    v4_starts, v4_values = merge(v4_starts, v4_values)

    # IPv6: the database's tree (aliases of the IPv4 subtree expanded from the database-only
    # IPv4 ranges), the IPv6 overrides, then the IPv4-mapped block from the IPv4 map.
    v6_starts: list[int] = []
    v6_values: list[int] = []
    if tree.ip_version == 6:
        for first, value in zip(tree.v6_starts, tree.v6_values, strict=True):
            if value < 0:
                alias = tree.v6_aliases[-value - 1]
                shift = 96 - alias.depth
                v6_starts.extend(alias.first | (s << shift) for s in v4_db_starts)
                v6_values.extend(v4_db)
                continue
            number = by_value.get(value)
            if number is None:
                placement = locator.record_placement(ipaddress.IPv6Address(first))
                number = by_value[value] = number_of(placement)
            v6_starts.append(first)
            v6_values.append(number)
        v6_starts, v6_values = merge(v6_starts, v6_values)
    else:
        v6_starts, v6_values = [0], [default]
    for network, placement in reversed(overrides):
        if network.version == 6:
            first, last = int(network.network_address), int(network.broadcast_address)
            _overlay(v6_starts, v6_values, first, last, number_of(placement), V6_TOP)
    splice(
        v6_starts,
        v6_values,
        V4_MAPPED,
        V4_MAPPED + V4_TOP - 1,
        [V4_MAPPED | s for s in v4_starts],
        v4_values,
    )
    v6_starts, v6_values = merge(v6_starts, v6_values)

    groups: dict[GroupKey, GroupMap] = {}
    for geo in names:
        if group_key(geo.targets) in groups:
            continue
        by_signature: dict[Signature, int] = {}
        representatives: list[Placement] = []
        of_placement: list[int] = []
        for placement in placements:
            signature = _signature(config, geo.targets, placement)
            number = by_signature.get(signature)
            if number is None:
                number = by_signature[signature] = len(representatives)
                representatives.append(placement)
            of_placement.append(number)
        count = len(representatives)
        g4_starts, g4 = merge(v4_starts, [of_placement[v] for v in v4_values])
        g6_starts, g6 = merge(v6_starts, [of_placement[v] for v in v6_values])
        groups[group_key(geo.targets)] = GroupMap(
            geo.targets,
            array("I", g4_starts),
            _packed(g4, count),
            g6_starts,
            _packed(g6, count),
            tuple(representatives),
            tuple(by_signature),
        )
    embedded = [(V4_MAPPED, 96)]
    if tree.ip_version == 6:
        embedded += [(alias.first, alias.depth) for alias in tree.v6_aliases]
    countries = build_country_map(
        [p.country for p in placements], v4_starts, v4_values, v6_starts, v6_values, embedded
    )
    return AddressMap(
        groups,
        (len(tree.v4_starts), len(tree.v6_starts)),
        len(placements),
        time.perf_counter() - started,
        countries,
    )


_LOW_HALF = (1 << 64) - 1


def _halves(starts: Sequence[int]) -> tuple[array[int], array[int]]:
    """128-bit integers as two arrays of 64-bit halves (no Python int outlives the call)."""
    return (
        array("Q", map(rshift, starts, repeat(64))),
        array("Q", map(and_, starts, repeat(_LOW_HALF))),
    )


def _joined(halves: tuple[array[int], array[int]], canonical: dict[int, int]) -> list[int]:
    """The integers back from :func:`_halves`, one object per value across every call that
    shares ``canonical`` (as the lists built by :func:`build_address_map` share them)."""
    high, low = halves
    joined = map(or_, map(lshift, high, repeat(64)), low)
    return list(map(canonical.setdefault, *tee(joined)))  # setdefault(v, v), in C


def settled(address_map: AddressMap) -> AddressMap:
    """``address_map`` with its IPv6 range starts (~900k Python ints on the shipped database)
    made anew, once nothing else of the build is left: packed into fresh memory instead of
    scattered among the build's freed temporaries, whose memory they would otherwise keep
    from being given back (CPython frees a 1 MiB arena of small objects only when all of it
    is free).  Measured on the compare benchmark's config: server RSS 182 -> 136 MiB.

    Equal to ``address_map`` (the same lists of the same values).  The saving needs the
    caller to hold no other reference to ``address_map`` or to the database walk it was
    built from (see :func:`geodns.responder._address_map`): the old integers must be freed
    before the new ones are made."""
    groups = [
        (key, replace(group, v6_starts=[]), _halves(group.v6_starts))
        for key, group in address_map.groups.items()
    ]
    countries = address_map.countries
    country_starts = _halves(countries.v6_starts)
    countries = replace(countries, v6_starts=())
    address_map = replace(address_map, groups={}, countries=countries)
    # The last references to the old integers were the map passed in (now replaced): they
    # are freed here, and with them every arena they kept alive.
    gc.collect()
    canonical: dict[int, int] = {}
    fresh = {
        key: replace(group, v6_starts=_joined(halves, canonical)) for key, group, halves in groups
    }
    starts = tuple(_joined(country_starts, canonical))
    del canonical
    return replace(address_map, groups=fresh, countries=replace(countries, v6_starts=starts))


#: What makes two selections render the same bytes at any moment: outcome, chosen targets,
#: TTL, and for a TTL bound by a pending transition the targets whose hints bound it.
AnswerKey = tuple[str, tuple[str, ...], int, tuple[str, ...] | None]


def answer_key(selection: Selection) -> AnswerKey:
    hinted: tuple[str, ...] | None = None
    if selection.timed:
        chosen = {t.name for t in selection.chosen}
        names = [c.target.name for c in selection.candidates]
        last = max(i for i, name in enumerate(names) if name in chosen)
        hinted = tuple(names[: last + 1])
    return (selection.outcome, tuple(t.name for t in selection.chosen), selection.ttl, hinted)


@dataclass(frozen=True, slots=True, eq=False)
class AnswerTable:
    """One geo answer class and query family under one health: maximal ranges of one answer."""

    v4_starts: array[int]
    v4_answers: array[int]
    v6_starts: list[int]
    v6_answers: array[int]
    #: One selection per answer number (a representative client's).
    selections: tuple[Selection, ...]
    #: Answer number by signature (what a later health generation compares against).
    by_signature: tuple[int, ...]
    keys: tuple[AnswerKey, ...]
    #: For each /16 of the IPv4 space (and one past the end), the number of the range that
    #: holds its first address: a lookup bisects only its /16's ranges.  Built here, with the
    #: table (off the hot path: a first query after a health change must not pay for it).
    v4_blocks: array[int]

    def find(self, ecs_family: int, address: int) -> tuple[int, int, int]:
        """(answer number, first address of its range, first address of the next range or
        2**bits) for ``address`` of ECS family 1 (IPv4) or 2 (IPv6)."""
        if ecs_family == 1:
            starts: Sequence[int] = self.v4_starts
            answers = self.v4_answers
            top = V4_TOP
        else:
            starts, answers, top = self.v6_starts, self.v6_answers, V6_TOP
        i = bisect_right(starts, address) - 1
        following = starts[i + 1] if i + 1 < len(starts) else top
        return answers[i], starts[i], following


def block_index(starts: Sequence[int]) -> array[int]:
    """For each /16 of the IPv4 space (and one past the end): the number of the range of
    ``starts`` (sorted, the first 0) that holds the /16's first address."""
    blocks = 65537
    if len(starts) > blocks:  # many ranges: a bisection per /16
        return array("I", [bisect_right(starts, block << 16) - 1 for block in range(blocks)])
    # Few ranges: range i holds the /16s whose first address lies in [starts[i],
    # starts[i+1]); filled a slice per range.
    index = array("I", bytes(4 * blocks))
    ends = [*starts[1:], V4_TOP]
    for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
        first, stop = (start + 0xFFFF) >> 16, (end + 0xFFFF) >> 16
        if stop > first:
            index[first:stop] = array("I", (i,)) * (stop - first)
    index[blocks - 1] = len(starts) - 1
    return index


def _relabel(
    starts: Sequence[int], signatures: bytes | array[int], by_signature: Sequence[int]
) -> tuple[list[int], list[int]]:
    labels: Sequence[int]
    if isinstance(signatures, bytes) and len(by_signature) <= 256:
        labels = signatures.translate(bytes(by_signature).ljust(256, b"\0"))
    else:
        labels = [by_signature[s] for s in signatures]
    return merge(starts, labels)


def compile_table(
    group: GroupMap,
    config: Config,
    geo: GeoName,
    family: int,
    health: HealthView,
    reuse: dict[tuple[object, ...], AnswerTable] | None = None,
) -> AnswerTable:
    """Stage 2 for one answer class and query family.  ``reuse`` keeps tables by what they
    are made of (the target set and each signature's answer): a health change that changes no
    answer of a class, or comes back to an earlier state, re-labels nothing."""
    keys: dict[AnswerKey, int] = {}
    selections: list[Selection] = []
    by_signature: list[int] = []
    for placement in group.representatives:
        selection = select(config, geo, family, placement.at(_ANY_NETWORK), health)
        key = answer_key(selection)
        number = keys.get(key)
        if number is None:
            number = keys[key] = len(selections)
            selections.append(selection)
        by_signature.append(number)
    numbers = tuple(by_signature)
    made_of = (id(group), numbers, tuple(keys))
    previous = reuse.get(made_of) if reuse is not None else None
    if previous is not None:
        return AnswerTable(
            previous.v4_starts,
            previous.v4_answers,
            previous.v6_starts,
            previous.v6_answers,
            tuple(selections),
            numbers,
            previous.keys,
            previous.v4_blocks,
        )
    code = "B" if len(selections) <= 256 else "I"
    if len(selections) == 1:  # one answer everywhere: one range
        v4_starts, v4_answers, v6_starts, v6_answers = [0], [0], [0], [0]
    else:
        v4_starts, v4_answers = _relabel(group.v4_starts, group.v4_signatures, numbers)
        v6_starts, v6_answers = _relabel(group.v6_starts, group.v6_signatures, numbers)
    table = AnswerTable(
        array("I", v4_starts),
        array(code, v4_answers),
        v6_starts,
        array(code, v6_answers),
        tuple(selections),
        numbers,
        tuple(keys),
        block_index(v4_starts),
    )
    if reuse is not None:
        if len(reuse) >= REUSE_LIMIT:
            reuse.clear()
        reuse[made_of] = table
    return table
