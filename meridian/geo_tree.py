"""The whole search tree of a MaxMind database as sorted address ranges (for compiled answers).

:func:`database_ranges` walks every node once, from arrays of child pointers decoded in bulk
(byte slicing, no per-node ``int.from_bytes``), and returns, per address family, the leaves in
address order as ``(first address, leaf value)``: a leaf value is ``node_count`` (not in the
database) or a data pointer (one per distinct record).  IPv6 subtrees that alias the IPv4
subtree (``::/96``, ``::ffff:0:0/96``, ``2002::/16`` in MaxMind's and most writers' files) are
reported once, as :class:`Alias` entries, rather than walked again.

Walking the shipped database (1.85 M nodes) takes about a second; the result is what
:mod:`geodns.compiled` collapses into answer ranges, so the walk happens once per database.
"""

from __future__ import annotations

import mmap
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path

_HIGH_NIBBLE = bytes(i >> 4 for i in range(256))
_LOW_NIBBLE = bytes(i & 0x0F for i in range(256))


@dataclass(frozen=True, slots=True)
class Alias:
    """An IPv6 subtree that is the IPv4 subtree again: ``first`` (a /``depth`` network) then
    the 32 bits of an IPv4 address, the remaining bits ignored."""

    first: int
    depth: int


@dataclass(frozen=True, slots=True, eq=False)
class TreeRanges:
    node_count: int
    ip_version: int
    #: IPv4 leaves in address order: first addresses and leaf values (parallel arrays).
    v4_starts: array[int]
    v4_values: array[int]
    #: IPv6 leaves in address order (empty for an IPv4-only database): first addresses and
    #: leaf values, where ``-(n + 1)`` stands for ``v6_aliases[n]``.
    v6_starts: list[int]
    v6_values: array[int]
    v6_aliases: list[Alias]


def child_arrays(data: bytes, node_count: int, record_size: int) -> tuple[array[int], array[int]]:
    """Left and right child of every node, as two ``array('I')``."""
    n = node_count
    left = bytearray(4 * n)
    right = bytearray(4 * n)
    if record_size == 24:
        raw = data[: 6 * n]
        for i in range(3):
            left[1 + i :: 4] = raw[i::6]
            right[1 + i :: 4] = raw[3 + i :: 6]
    elif record_size == 28:
        raw = data[: 7 * n]
        middle = raw[3::7]
        left[0::4] = middle.translate(_HIGH_NIBBLE)
        right[0::4] = middle.translate(_LOW_NIBBLE)
        for i in range(3):
            left[1 + i :: 4] = raw[i::7]
            right[1 + i :: 4] = raw[4 + i :: 7]
    elif record_size == 32:
        raw = data[: 8 * n]
        for i in range(4):
            left[i::4] = raw[i::8]
            right[i::4] = raw[4 + i :: 8]
    else:
        raise ValueError(f"unsupported record size {record_size}")
    lefts, rights = array("I"), array("I")
    lefts.frombytes(bytes(left))
    rights.frombytes(bytes(right))
    if sys.byteorder == "little":
        lefts.byteswap()
        rights.byteswap()
    return lefts, rights


def _walk(
    lefts: array[int],
    rights: array[int],
    node_count: int,
    root: int,
    bits: int,
    alias_node: int,
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Leaves under ``root`` (a /0 of ``bits`` bits) in address order: (firsts, values), and
    the (first, depth) of every subtree below the root that is ``alias_node`` (-1: none),
    which appears among the leaves with the value ``-(its index + 1)``."""
    firsts: list[int] = []
    values: list[int] = []
    aliases: list[tuple[int, int]] = []
    add_first, add_value = firsts.append, values.append
    # (node, its depth, its first address); a leaf value may be pushed too (>= node_count).
    stack = [(root, 0, 0)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth, first = pop()
        if node >= node_count:
            add_first(first)
            add_value(node)
            continue
        if node == alias_node and depth:
            aliases.append((first, depth))
            add_first(first)
            add_value(-len(aliases))
            continue
        depth += 1
        high = first | (1 << (bits - depth))
        left = lefts[node]
        right = rights[node]
        if left >= node_count:
            add_first(first)
            add_value(left)
            if right >= node_count:
                add_first(high)
                add_value(right)
            else:
                push((right, depth, high))
        else:
            push((right, depth, high))
            push((left, depth, first))
    return firsts, values, aliases


def database_ranges(path: Path, node_count: int, record_size: int, ip_version: int) -> TreeRanges:
    """Every leaf of the database's search tree, by family, in address order."""
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return tree_ranges(data, node_count, record_size, ip_version)


def tree_ranges(data: mmap.mmap, node_count: int, record_size: int, ip_version: int) -> TreeRanges:
    """:func:`database_ranges` of a database already mapped (the whole file)."""
    size = record_size // 4
    if len(data) < node_count * size:
        raise ValueError("the search tree is larger than the file")
    lefts, rights = child_arrays(data[: node_count * size], node_count, record_size)
    v4_root = 0
    if ip_version == 6:
        for _ in range(96):
            if v4_root >= node_count:
                break
            v4_root = lefts[v4_root]
    if v4_root >= node_count:  # the whole IPv4 space is one leaf
        v4_firsts, v4_values = [0], [v4_root]
    else:
        v4_firsts, v4_values, _ = _walk(lefts, rights, node_count, v4_root, 32, -1)
    v6_starts: list[int] = []
    v6_values = array("q")
    v6_aliases: list[Alias] = []
    if ip_version == 6:
        alias_node = v4_root if v4_root < node_count else -1
        v6_starts, values, aliases = _walk(lefts, rights, node_count, 0, 128, alias_node)
        v6_values = array("q", values)
        del values
        v6_aliases = [Alias(first, depth) for first, depth in aliases]
    return TreeRanges(
        node_count,
        ip_version,
        array("I", v4_firsts),
        array("I", v4_values),
        v6_starts,
        v6_values,
        v6_aliases,
    )
