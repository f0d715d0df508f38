"""HPACK for responses without indexing: blocks that depend on the fields alone, memoised.

RFC 7541 lets an encoder never touch the decoder's dynamic table: every field is a *literal
without indexing* (its name by static-table index when the table has it), or a fully indexed
static entry (``:status: 200``).  The block then means the same on every connection and at any
time, so a cached response's HEADERS block is encoded once and reused: a hit costs a
dictionary lookup instead of an HPACK encoder (``edge.h2streams.PrebuiltResponses`` keeps the
block per prebuilt head).  The price is bytes on the wire: no Huffman coding, no references
to earlier responses (a 2 KB hit's head is about 300 bytes instead of about 30 after the
first); the issue asks for this trade.

``LiteralEncoder.encode`` is what the HTTP/2 streams use for the heads of streamed responses
(``edge.h2streams.H2Stream.start_response``), memoised by the whole field list.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from hpack.table import HeaderTable

#: Encoded blocks remembered (cleared when full: bounded without bookkeeping).
MEMO_SIZE: Final = 4096

_STATIC = HeaderTable.STATIC_TABLE
#: name -> first static index with that name; (name, value) -> static index.
_NAME_INDEX: Final[dict[bytes, int]] = {}
_FULL_INDEX: Final[dict[tuple[bytes, bytes], int]] = {}
for _i, (_name, _value) in enumerate(_STATIC, start=1):
    _NAME_INDEX.setdefault(_name, _i)
    _FULL_INDEX.setdefault((_name, _value), _i)


def encode_integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 5.1: ``value`` with an N-bit prefix, ``first`` holding the pattern bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_field(name: bytes, value: bytes) -> bytes:
    """One field that leaves the dynamic table alone (RFC 7541 6.1 and 6.2.2)."""
    full = _FULL_INDEX.get((name, value))
    if full is not None:
        return encode_integer(full, 7, 0x80)
    index = _NAME_INDEX.get(name)
    if index is not None:
        head = encode_integer(index, 4, 0x00)
    else:
        head = b"\x00" + encode_integer(len(name), 7, 0x00) + name
    return head + encode_integer(len(value), 7, 0x00) + value


class LiteralEncoder:
    """Header lists as HPACK blocks without indexing, memoised by the list."""

    __slots__ = ("_memo",)

    def __init__(self) -> None:
        self._memo: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}

    def encode(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        key = tuple(headers)
        block = self._memo.get(key)
        if block is None:
            block = b"".join([encode_field(name, value) for name, value in key])
            memo = self._memo
            if len(memo) >= MEMO_SIZE:
                memo.clear()
            memo[key] = block
        return block


__all__ = ["LiteralEncoder", "encode_field", "encode_integer"]
