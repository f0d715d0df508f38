"""Client countries for the GeoDNS counters: the address space as ranges of country numbers.

Built once per address map (:func:`geodns.compiled.build_address_map`) from the same ranges of
placements the answers are compiled from, so a client is counted in the country its answer was
chosen for (overrides included).  Sans-I/O: numbers and ranges only.

Bounded cardinality: at most :data:`COUNTRY_LIMIT` named countries (ISO 3166 has 249; a
database with more distinct codes folds the rest, by address space, into ``other``); a code
that is not two ASCII letters reads as ``other``, a placement without a country as ``unknown``.
The names are what become Prometheus label values, so nothing from the database reaches a
label unchecked.

Memory: the IPv6 blocks that embed the IPv4 space (``::ffff:0:0/96``, and the database's
aliases of its IPv4 subtree, ``::/96`` and ``2002::/16``) are not copied: an address in one is
looked up in the IPv4 map (for the aliases that map includes the IPv4 overrides, which their
answers do not read: a deprecated corner where the count may name the override's country).
That keeps the IPv6 ranges to the database's native ones, in a tuple the garbage collector
stops tracking: a list of a million integers made every full collection - which a busy reply
memo triggers - walk it.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

#: Named countries kept; the rest fold into ``other`` (ISO 3166-1 has 249 codes).
COUNTRY_LIMIT = 250
OTHER = "other"
UNKNOWN = "unknown"
#: In :attr:`CountryMap.v4_blocks`: the /16 holds more than one country.
MIXED = 255
#: In :attr:`CountryMap.v6_numbers`: a block of IPv6 that embeds the IPv4 space (see
#: :attr:`CountryMap.v6_embedded`): the IPv4 map answers.
EMBEDDED = 254
_V4_MASK = 0xFFFFFFFF


def country_label(code: str | None) -> str:
    """A database's country code as a label value: two ASCII letters upper-cased, ``unknown``
    when absent, ``other`` when it is anything else."""
    if not code:
        return UNKNOWN
    if len(code) == 2 and code.isascii() and code.isalpha():
        return code.upper()
    return OTHER


@dataclass(frozen=True, slots=True, eq=False)
class CountryMap:
    """Both address families as ranges of country numbers (indexes into ``names``)."""

    names: tuple[str, ...]
    v4_starts: array[int]
    v4_numbers: bytes
    v6_starts: tuple[int, ...]
    v6_numbers: bytes
    #: The IPv6 blocks that embed the IPv4 space: (first, after the last, shift to the IPv4
    #: address), by first address.
    v6_embedded: tuple[tuple[int, int, int], ...]
    #: Per IPv4 /16: its country number when the whole /16 is one country, else ``MIXED``
    #: (the hot path reads this byte and bisects only for a mixed /16).
    v4_blocks: bytes
    #: Per IPv4 /16 (and one past the end): the number of the range holding its first
    #: address, so a mixed /16 bisects its own few ranges only.
    v4_index: array[int]

    def of_v4(self, address: int) -> int:
        block = address >> 16
        number = self.v4_blocks[block]
        if number != MIXED:
            return number
        index = self.v4_index
        i = bisect_right(self.v4_starts, address, index[block], index[block + 1] + 1) - 1
        return self.v4_numbers[i]

    def of_v6(self, address: int) -> int:
        number = self.v6_numbers[bisect_right(self.v6_starts, address) - 1]
        if number != EMBEDDED:
            return number
        for first, end, shift in self.v6_embedded:
            if first <= address < end:
                return self.of_v4((address >> shift) & _V4_MASK)
        raise AssertionError("an embedded range outside every embedded block")

    def of(self, address: IPv4Address | IPv6Address) -> int:
        """The country number of a client address (IPv4-mapped IPv6 reads as IPv4)."""
        if address.version == 4:
            return self.of_v4(int(address))
        return self.of_v6(int(address))

    def of_ecs(self, family: int, address: int) -> int:
        """The country number of an ECS address (family 1: IPv4, 2: IPv6) as an integer."""
        return self.of_v4(address) if family == 1 else self.of_v6(address)


def _merged(starts: Sequence[int], numbers: Sequence[int]) -> tuple[list[int], bytes]:
    keep_starts: list[int] = []
    keep: list[int] = []
    for start, number in zip(starts, numbers, strict=True):
        if keep and keep[-1] == number:
            continue
        keep_starts.append(start)
        keep.append(number)
    return keep_starts, bytes(keep)


def build_country_map(
    countries: Sequence[str | None],
    v4_starts: Sequence[int],
    v4_values: Sequence[int],
    v6_starts: Sequence[int],
    v6_values: Sequence[int],
    embedded: Sequence[tuple[int, int]] = (),
) -> CountryMap:
    """``countries`` by placement number; the ranges label addresses with placement numbers
    (both families cover their whole space: ``v4_starts[0] == v6_starts[0] == 0``).
    ``embedded``: (first, prefix length) of each IPv6 block whose next 32 bits are an IPv4
    address looked up in the IPv4 map (blocks must not overlap)."""
    labels = [country_label(code) for code in countries]
    named = sorted({label for label in labels if label not in (OTHER, UNKNOWN)})
    if len(named) > COUNTRY_LIMIT:
        # Keep the countries with the most IPv4 address space; fold the rest into "other".
        space: dict[str, int] = {}
        ends = [*v4_starts[1:], 1 << 32]
        for start, end, value in zip(v4_starts, ends, v4_values, strict=True):
            space[labels[value]] = space.get(labels[value], 0) + end - start
        named = sorted(sorted(named, key=lambda c: -space.get(c, 0))[:COUNTRY_LIMIT])
    names = (*named, OTHER, UNKNOWN)
    number_of = {name: i for i, name in enumerate(names)}
    by_placement = [number_of.get(label, number_of[OTHER]) for label in labels]
    s4, n4 = _merged(v4_starts, [by_placement[v] for v in v4_values])
    s6, n6 = _merged(v6_starts, [by_placement[v] for v in v6_values])
    blocks6: list[tuple[int, int, int]] = []
    for first, depth in sorted(set(embedded)):
        if not blocks6 or first >= blocks6[-1][1]:  # a block inside another is left out
            blocks6.append((first, first + (1 << (128 - depth)), 96 - depth))
    s6, n6 = _without_embedded(s6, n6, blocks6)
    blocks, index = _blocks(s4, n4)
    return CountryMap(names, array("I", s4), n4, tuple(s6), n6, tuple(blocks6), blocks, index)


def _without_embedded(
    starts: list[int], numbers: bytes, embedded: Sequence[tuple[int, int, int]]
) -> tuple[list[int], bytes]:
    """The ranges with each embedded block replaced by one range labelled ``EMBEDDED``."""
    if not embedded:
        return starts, numbers
    out_starts: list[int] = []
    out: list[int] = []
    i = 0
    for first, end, _ in embedded:
        while i < len(starts) and starts[i] < first:
            out_starts.append(starts[i])
            out.append(numbers[i])
            i += 1
        out_starts.append(first)
        out.append(EMBEDDED)
        while i < len(starts) and starts[i] < end:
            i += 1
        if end < 1 << 128 and (i >= len(starts) or starts[i] != end):
            # The range running on past the block's end starts again there.
            out_starts.append(end)
            out.append(numbers[bisect_right(starts, end) - 1])
    out_starts.extend(starts[i:])
    out.extend(numbers[i:])
    return _merged(out_starts, out)


def _blocks(starts: Sequence[int], numbers: bytes) -> tuple[bytes, array[int]]:
    """Per /16: the country when one holds all of it (else ``MIXED``), and the number of the
    range holding its first address (plus one entry past the end)."""
    blocks = bytearray(65536)
    index = array("I", bytes(4 * 65537))
    i = 0
    last = len(starts) - 1
    for block in range(65537):
        first = block << 16
        while i < last and starts[i + 1] <= first:
            i += 1
        index[block] = i
        if block < 65536:
            inside = i == last or starts[i + 1] > first + 0xFFFF
            blocks[block] = numbers[i] if inside else MIXED
    return bytes(blocks), index
