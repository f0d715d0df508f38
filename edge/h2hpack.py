"""HPACK decoding of request header blocks, memoised, and the checks of RFC 9113 8.2 and 8.3.

The ``hpack`` library's ``Decoder`` does the decoding (Huffman, the dynamic table, the header
list size limit).  In front of it, ``HeaderDecoder`` keeps a small memo (``edge.memos``
``HPACK_BLOCKS``): a block made only of indexed references and literals *without* indexing
(no insertion into the dynamic table, no table size update) decodes to the same list for as
long as the dynamic table is unchanged.  The memo is emptied whenever a decoded block changes
the table, which is the same as keying it by (table generation, block bytes).  Clients repeat
such blocks: h2load sends the same block for every request after the first, a browser's
requests to one page differ in ``:path`` alone, which is a literal the first time and an
indexed reference once indexed.

Whether a block leaves the table alone is read off its representations' first bytes
(``leaves_table_alone``: RFC 7541 6.1-6.3), skipping string bytes unread, only when a block is
decoded for the first time.
"""

from __future__ import annotations

import logging
from typing import Final

import hpack
import hpack.exceptions

from edge.h2wire import ErrorCode, H2ConnectionError
from edge.memos import HPACK_BLOCKS, BoundedMemo

Fields = tuple[tuple[bytes, bytes], ...]

# hpack logs every field it codes at debug level: a call per field even when nobody listens.
for _name in ("hpack.hpack", "hpack.table"):
    logging.getLogger(_name).disabled = True

_PSEUDO: Final = frozenset({b":method", b":scheme", b":path", b":authority"})
_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
#: Bytes a field name may hold (RFC 9113 8.2.1: no controls, space, upper case, DEL, 8-bit;
#: a colon only as a pseudo-field's first byte).
_NAME_BAD: Final = bytes(c for c in range(256) if c <= 0x20 or 0x41 <= c <= 0x5A or c >= 0x7F)


def _integer(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """RFC 7541 5.1: the integer at ``pos`` and the position after it; (-1, _) if cut short."""
    limit = (1 << prefix_bits) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while pos < len(block):
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
        if shift > 28:
            break
    return -1, pos


def leaves_table_alone(block: bytes) -> bool:
    """Whether every representation in ``block`` is an indexed field or a literal without
    indexing / never indexed (RFC 7541 6.1, 6.2.2, 6.2.3): no insertion, no size update."""
    pos = 0
    end = len(block)
    while pos < end:
        first = block[pos]
        if first & 0x80:  # indexed
            index, pos = _integer(block, pos, 7)
            if index < 0:
                return False
            continue
        if first & 0xE0 != 0:  # 01xxxxxx: incremental indexing; 001xxxxx: size update
            return False
        index, pos = _integer(block, pos, 4)
        if index < 0:
            return False
        strings = 1 if index else 2  # the name as a string too when not indexed
        for _ in range(strings):
            if pos >= end:
                return False
            length, pos = _integer(block, pos, 7)
            if length < 0:
                return False
            pos += length
        if pos > end:
            return False
    return True


def request_problem(fields: Fields) -> tuple[str | None, int]:
    """Why a request's header list is malformed (RFC 9113 8.2, 8.3), or None; and its
    Content-Length (-1: none), which its DATA must match (8.1.1)."""
    problem = _request_problem(fields)
    if problem is not None:
        return problem, -1
    length = -1
    for name, value in fields:
        if name == b"content-length":
            if not value.isdigit() or len(value) > 18 or (length >= 0 and int(value) != length):
                return "bad_content_length", -1
            length = int(value)
    return None, length


def _request_problem(fields: Fields) -> str | None:
    seen: set[bytes] = set()
    regular = False
    method = None
    authority = None
    host = None
    for name, value in fields:
        if not name:
            return "empty_field_name"
        if name[0] == 0x3A:  # a pseudo-field
            if regular or name in seen or name not in _PSEUDO:
                return "bad_pseudo_field"
            seen.add(name)
            if name == b":method":
                method = value
            elif name == b":path" and not value:
                return "empty_path"
            elif name == b":authority":
                authority = value
        else:
            regular = True
            problem = _field_problem(name, value)
            if problem is not None:
                return problem
            if name == b"host":
                host = value
        if value and (b"\r" in value or b"\n" in value or b"\x00" in value):
            return "bad_field_value"
    if method is None:
        return "missing_method"
    if method == b"CONNECT":
        if b":scheme" in seen or b":path" in seen:
            return "bad_connect"
    elif b":scheme" not in seen or b":path" not in seen:
        return "missing_pseudo_field"
    if authority is not None and host is not None and authority != host:
        return "authority_host_mismatch"
    return None


def trailers_problem(fields: Fields) -> str | None:
    """Why a trailer section is malformed (no pseudo-fields, RFC 9113 8.1), or None."""
    for name, value in fields:
        if not name or name[0] == 0x3A:
            return "bad_trailer_field"
        problem = _field_problem(name, value)
        if problem is not None:
            return problem
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            return "bad_field_value"
    return None


def _field_problem(name: bytes, value: bytes) -> str | None:
    if len(name.translate(None, _NAME_BAD)) != len(name) or b":" in name:
        return "bad_field_name"
    if name in _CONNECTION_SPECIFIC:
        return "connection_specific_field"
    if name == b"te" and value.lower() != b"trailers":
        return "bad_te"
    if value and (value[0] in (0x20, 0x09) or value[-1] in (0x20, 0x09)):
        return "bad_field_value"
    return None


class DecodedBlock:
    """A request header block decoded and checked; the memo's value, so what the application
    derives from the fields alone can be kept on it (``app``) for the next request that
    repeats the block."""

    __slots__ = ("app", "expected", "fields", "memoised", "problem")

    def __init__(self, fields: Fields, problem: str | None, expected: int, memoised: bool) -> None:
        self.fields = fields
        #: Why the fields are malformed as a request (None: well formed).
        self.problem = problem
        #: Its Content-Length (-1: none).
        self.expected = expected
        #: In the memo: the same object comes back while the block repeats.
        self.memoised = memoised
        #: The application's own (``edge.h2request``: the request head it validated).
        self.app: object = None


class HeaderDecoder:
    """One connection's HPACK decoder with its memo of blocks that leave the table alone."""

    __slots__ = ("_decoder", "memo")

    def __init__(self, max_header_list_size: int, max_table_size: int = 4096) -> None:
        decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        decoder.max_allowed_table_size = max_table_size
        self._decoder = decoder
        #: block bytes -> the block decoded.
        self.memo: BoundedMemo[bytes, DecodedBlock] = BoundedMemo(HPACK_BLOCKS)

    def request(self, block: bytes) -> DecodedBlock:
        """A request head's fields, checked (``request_problem``).

        Raises ``H2ConnectionError``: COMPRESSION_ERROR for a block that cannot be decoded
        (the table is no longer in step), ENHANCE_YOUR_CALM for a decoded list over the
        limit (an HPACK bomb)."""
        memo = self.memo
        known = memo.get(block)
        if known is not None:
            return known
        fields = self._decode(block)
        problem, expected = request_problem(fields)
        if leaves_table_alone(block):
            answer = DecodedBlock(fields, problem, expected, True)
            if len(memo) >= memo.bound:
                memo.clear()
            memo[block] = answer
        else:
            memo.clear()  # the table changed: no remembered block means what it meant
            answer = DecodedBlock(fields, problem, expected, False)
        return answer

    def trailers(self, block: bytes) -> tuple[Fields, str | None]:
        """A trailer section's fields (never memoised: rare)."""
        if not leaves_table_alone(block):
            self.memo.clear()
        fields = self._decode(block)
        return fields, trailers_problem(fields)

    def _decode(self, block: bytes) -> Fields:
        try:
            decoded = self._decoder.decode(block, raw=True)
        except hpack.exceptions.OversizedHeaderListError as exc:
            self.memo.clear()
            raise H2ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "hpack_bomb", str(exc)) from None
        except (hpack.exceptions.HPACKError, IndexError, ValueError) as exc:
            self.memo.clear()
            raise H2ConnectionError(
                ErrorCode.COMPRESSION_ERROR, "hpack_decoding_error", str(exc)[:200]
            ) from None
        return tuple((bytes(name), bytes(value)) for name, value in decoded)


__all__ = ["DecodedBlock", "Fields", "HeaderDecoder", "leaves_table_alone", "request_problem"]
