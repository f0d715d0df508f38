"""A strict hand parser for DNS queries and the few wire-writing helpers the fast path needs.

``parse_query`` walks the whole message with explicit bounds checks: any byte string either
parses into a :class:`Query` or raises :class:`WireError` (answered FORMERR); nothing else can
escape.  It reads the header, the one question, every record's framing and the OPT record with
its options, validating EDNS Client Subnet by RFC 7871 rules that dnspython does not enforce
(it silently masks stray address bits).  No I/O, no logging.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

TYPE_A = 1
TYPE_NS = 2
TYPE_SOA = 6
TYPE_HINFO = 13
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_IXFR = 251
TYPE_AXFR = 252
TYPE_ANY = 255
CLASS_IN = 1

OPTION_ECS = 8

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
RCODE_BADVERS = 16

FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
EDNS_FLAG_DO = 0x8000

HEADER = struct.Struct("!HHHHHH")
_U16 = struct.Struct("!H")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_ECS_FIXED = struct.Struct("!HBB")

MAX_NAME_WIRE = 255
FAMILY_BITS = {1: 32, 2: 128}


class WireError(Exception):
    """The message is malformed; the only exception ``parse_query`` raises."""


@dataclass(frozen=True, slots=True)
class ClientSubnet:
    """An ECS option as received: ``address`` holds exactly ceil(source_prefix / 8) bytes."""

    family: int
    source_prefix: int
    address: bytes

    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        if self.family == 1:
            return ipaddress.IPv4Address(self.address.ljust(4, b"\0"))
        return ipaddress.IPv6Address(self.address.ljust(16, b"\0"))

    def option(self, scope_prefix: int) -> bytes:
        """The option echoed in a reply (RFC 7871 section 7.2.1: same family, source, address)."""
        return (
            _U16.pack(OPTION_ECS)
            + _U16.pack(4 + len(self.address))
            + _ECS_FIXED.pack(self.family, self.source_prefix, scope_prefix)
            + self.address
        )


@dataclass(frozen=True, slots=True)
class Edns:
    payload: int
    version: int
    do_bit: bool
    ecs: ClientSubnet | None
    #: Options other than ECS (cookies, padding, NSID...): those queries take the slow path.
    other_options: bool


@dataclass(frozen=True, slots=True)
class Query:
    id: int
    flags: int
    ancount: int
    nscount: int
    arcount: int
    #: The question exactly as sent (name in the client's case, type, class).
    question: bytes
    #: The question name in wire form, ASCII-lowercased: the lookup key.
    qname_key: bytes
    qtype: int
    qclass: int
    edns: Edns | None

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def only_question_and_opt(self) -> bool:
        """The shape the fast path serves: one question and at most the OPT record."""
        return (
            self.ancount == 0
            and self.nscount == 0
            and self.arcount == (1 if self.edns is not None else 0)
        )


def peek_header(wire: bytes) -> tuple[int, int, int] | None:
    """(id, flags, qdcount), or None when there are not even 12 bytes (nothing to answer)."""
    if len(wire) < 12:
        return None
    ident, flags, qdcount = struct.unpack_from("!HHH", wire)
    return ident, flags, qdcount


def _question_name(wire: bytes, offset: int) -> int:
    """End offset of an uncompressed name (a query's question cannot point anywhere useful)."""
    end = len(wire)
    while True:
        if offset >= end:
            raise WireError("name runs past the end")
        length = wire[offset]
        if length == 0:
            offset += 1
            break
        if length & 0xC0:
            raise WireError("compression pointer or reserved label type in the question")
        offset += 1 + length
    return offset


def _record_name(wire: bytes, offset: int) -> int:
    """End offset (in the record) of a possibly compressed name; pointers must go backwards."""
    end = len(wire)
    name_length = 0
    resume: int | None = None
    limit = offset  # every pointer must point strictly before the previous one: no loops
    while True:
        if offset >= end:
            raise WireError("name runs past the end")
        length = wire[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= end:
                raise WireError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | wire[offset + 1]
            if target >= limit:
                raise WireError("compression pointer does not point backwards")
            if resume is None:
                resume = offset + 2
            limit = target
            offset = target
            continue
        if length & 0xC0:
            raise WireError("reserved label type")
        name_length += 1 + length
        if name_length > MAX_NAME_WIRE:
            raise WireError("name longer than 255 octets")
        if length == 0:
            return resume if resume is not None else offset + 1
        offset += 1 + length


def _client_subnet(data: bytes) -> ClientSubnet:
    if len(data) < 4:
        raise WireError("ECS option shorter than 4 octets")
    family, source, scope = _ECS_FIXED.unpack_from(data)
    bits = FAMILY_BITS.get(family)
    if bits is None:
        raise WireError(f"ECS family {family} is not IPv4 or IPv6")
    if source > bits:
        raise WireError(f"ECS source prefix {source} exceeds {bits}")
    if scope != 0:
        raise WireError("ECS scope prefix must be 0 in a query")
    address = data[4:]
    if len(address) != (source + 7) // 8:
        raise WireError("ECS address length does not match the source prefix")
    if source % 8 and address[-1] & (0xFF >> (source % 8)):
        raise WireError("ECS address has bits set beyond the source prefix")
    return ClientSubnet(family, source, bytes(address))


def _edns(wire: bytes, owner: int, ttl: int, payload: int, rdata: bytes) -> Edns:
    if wire[owner] != 0:
        raise WireError("OPT owner is not the root")
    ecs: ClientSubnet | None = None
    other = False
    offset, end = 0, len(rdata)
    while offset < end:
        if offset + 4 > end:
            raise WireError("truncated EDNS option header")
        code, length = struct.unpack_from("!HH", rdata, offset)
        offset += 4
        if offset + length > end:
            raise WireError("EDNS option runs past the OPT record")
        if code == OPTION_ECS:
            if ecs is not None:
                raise WireError("more than one ECS option")
            ecs = _client_subnet(rdata[offset : offset + length])
        else:
            other = True
        offset += length
    # RFC 6891 section 6.2.5: a payload below 512 is treated as 512.
    return Edns(max(payload, 512), (ttl >> 16) & 0xFF, bool(ttl & EDNS_FLAG_DO), ecs, other)


def parse_query(wire: bytes) -> Query:
    """Parse and validate a query with exactly one question; raises WireError otherwise."""
    size = len(wire)
    if size < 12:
        raise WireError("shorter than a header")
    ident, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(wire)
    if qdcount != 1:
        raise WireError(f"{qdcount} questions")
    name_end = _question_name(wire, 12)
    if name_end - 12 > MAX_NAME_WIRE:
        raise WireError("question name longer than 255 octets")
    if name_end + 4 > size:
        raise WireError("truncated question")
    qtype, qclass = struct.unpack_from("!HH", wire, name_end)
    offset = name_end + 4
    edns: Edns | None = None
    for index in range(ancount + nscount + arcount):
        owner = offset
        offset = _record_name(wire, offset)
        if offset + 10 > size:
            raise WireError("truncated resource record")
        rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(wire, offset)
        offset += 10
        if offset + rdlength > size:
            raise WireError("record data runs past the end")
        if rtype == TYPE_OPT:
            if index < ancount + nscount:
                raise WireError("OPT outside the additional section")
            if edns is not None:
                raise WireError("more than one OPT record")
            edns = _edns(wire, owner, ttl, rclass, wire[offset : offset + rdlength])
        offset += rdlength
    if offset != size:
        raise WireError("trailing bytes after the message")
    return Query(
        ident,
        flags,
        ancount,
        nscount,
        arcount,
        wire[12 : name_end + 4],
        wire[12:name_end].lower(),
        qtype,
        qclass,
        edns,
    )


def header_only(ident: int, query_flags: int, rcode: int) -> bytes:
    """A reply with no sections (FORMERR, NOTIMP): opcode and RD copied from the query."""
    flags = FLAG_QR | (query_flags & 0x7800) | (query_flags & FLAG_RD) | (rcode & 0xF)
    return HEADER.pack(ident, flags, 0, 0, 0, 0)


def opt_record(payload: int, do_bit: bool, rcode: int, options: bytes) -> bytes:
    """An OPT pseudo-record as dnspython renders it (root owner, class = our payload)."""
    return (
        b"\0"
        + struct.pack(
            "!HHBBHH", TYPE_OPT, payload, rcode >> 4, 0, EDNS_FLAG_DO if do_bit else 0, len(options)
        )
        + options
    )


def name_labels(wire_name: bytes) -> tuple[bytes, ...]:
    """Labels of an uncompressed wire name (validated input only)."""
    labels = []
    offset = 0
    while wire_name[offset]:
        length = wire_name[offset]
        labels.append(wire_name[offset + 1 : offset + 1 + length])
        offset += 1 + length
    return tuple(labels)


class Compressor:
    """Name compression exactly as dnspython's renderer does it, so both paths emit equal bytes.

    Every suffix written at an offset below 0x4000 is remembered; a later name is written up to
    its first remembered suffix, then a pointer.  Matching ignores ASCII case.
    """

    __slots__ = ("table",)

    def __init__(self) -> None:
        self.table: dict[tuple[bytes, ...], int] = {}

    def remember(self, labels: tuple[bytes, ...], offset: int) -> None:
        """Register a name already written at ``offset`` (the question)."""
        lowered = tuple(label.lower() for label in labels)
        for i in range(len(lowered)):
            if offset <= 0x3FFF:
                self.table.setdefault(lowered[i:], offset)
            offset += 1 + len(lowered[i])

    def write(self, out: bytearray, labels: tuple[bytes, ...]) -> None:
        lowered = tuple(label.lower() for label in labels)
        for i, label in enumerate(labels):
            pointer = self.table.get(lowered[i:])
            if pointer is not None:
                out += _U16.pack(0xC000 | pointer)
                return
            if len(out) <= 0x3FFF:
                self.table[lowered[i:]] = len(out)
            out.append(len(label))
            out += label
        out.append(0)
