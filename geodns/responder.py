"""The whole authoritative server as one function: query wire in, reply wire out.

Like dnspython's ``nanonameserver`` there is no I/O here: the asyncio shells in ``server.py`` read
datagrams, call :meth:`Responder.respond` (or, on the UDP hot path, :meth:`Responder.quick`),
send the bytes and count what the reply says.

Two paths give byte-for-byte equal replies (hypothesis checks it):

* fast (:meth:`Responder.quick`): "one A/AAAA question for a geo name, maybe an OPT whose only
  option is ECS".  The query is recognised in place - no parse into objects: the question is
  matched against the zone's geo names by slicing, the OPT and ECS fields are read at fixed
  offsets - and anything else of that shape is left to the strict parser.  An IPv4 client is
  placed by the locator's integer lookup (:meth:`~meridian.geo.GeoLocator.locate_v4`: an interned
  placement and the prefix length of its network, no objects built), places are numbered by what
  selection reads (distinct networks with the same database record share one), and the answer
  sections are memoized per (answer class, type, place) for a health generation - names that
  select alike and render equal bytes share a class (see ``_answer_class``); the ECS scope comes
  from the network's prefix length.  Only the header, the echoed question and the OPT (ECS
  scope) are assembled per query.  ANY for a geo name is the same answer (RFC 8482: one
  RRset).  Every other question of that shape has an answer that does not depend on the client
  (REFUSED, NXDOMAIN, NODATA, the apex SOA / NS with glue / ANY, glue addresses, RFC 8482
  HINFO): its body is rendered once per zone (``_quick_static``), so the questions an attacker
  picks because they used to be expensive cost what a memoized answer costs.
* slow: everything else (EDNS options other than ECS, BADVERS, records in other sections, a
  compressed question) goes through the strict parser (:func:`~geodns.wire.parse_query`) for
  FORMERR decisions, then dnspython message objects and its renderer; the server charges what
  it costs to the client's network (:class:`~geodns.ratelimit.ComputeBudget`).

Both paths use the pure :func:`~geodns.selection.select` for the answer.
"""

from __future__ import annotations

import struct
import time
import weakref
from array import array
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.HINFO
import dns.rrset

from geodns import wire
from geodns.compiled import (
    AddressMap,
    AnswerTable,
    build_address_map,
    compile_table,
    group_key,
    settled,
    widest_scope_plain,
)
from geodns.countries import MIXED
from geodns.selection import HealthView, Selection, is_up, select, ttl_of
from geodns.wire import Query, WireError
from geodns.zone import GeoName, IPAddress, Zone, name_key
from meridian.geo import GeoLocator

_RR_FIXED = struct.Struct("!HHIH")
_SOA_NUMBERS = struct.Struct("!IIIII")
#: A header after its ID: flags, qdcount, ancount, nscount, arcount.
_HEADER_TAIL = struct.Struct("!HHHHH")
FAMILY_OF_QTYPE = {wire.TYPE_A: 4, wire.TYPE_AAAA: 6}
#: The last four bytes of a question the fast path answers (type, class IN) -> (slot, type):
#: the slot of the compiled answers (ANY answers the one address family of the name, RFC 8482).
_QUESTION_TAILS = {b"\x00\x01\x00\x01": 0, b"\x00\x1c\x00\x01": 1, b"\x00\xff\x00\x01": 2}
_SLOT_QTYPES = (wire.TYPE_A, wire.TYPE_AAAA, wire.TYPE_ANY)
#: qdcount 1, ancount 0, nscount 0.
_COUNTS = b"\x00\x01\x00\x00\x00\x00"
#: Memoized replies kept before the table is simply emptied (a fresh start is cheap).
MEMO_LIMIT = 200_000
#: Slots of the UDP reply memo's doorkeeper (``DnsServer._seen``: one byte each, 1 MiB): a
#: reply the shape lookups give cheaply is memoized only on its query's second sighting, so
#: queries that never come back (a new ECS subnet each) do not fill the memo (~340 bytes each).
DOORKEEPER_SLOTS = 1 << 20
#: ECS query shapes remembered (see :meth:`Responder.shaped`) before the table is emptied.
SHAPE_LIMIT = 4096
#: Address maps by what they are made of (:func:`_map_key`), each kept while a responder uses
#: it: a reload that changes none of it reuses the serving map (no walk of the database), and
#: a map no responder uses any more is freed, not kept for a world that may not come back.
_MAPS: weakref.WeakValueDictionary[tuple[object, ...], AddressMap] = weakref.WeakValueDictionary()
#: The map made or reused last, held: a check that builds a responder only to drop it (the
#: supervisor validating a reloaded config) finds it again next time.  At most one map more.
_last_map: list[AddressMap] = []


#: ECS scope prefix lengths as the byte the reply carries.
_SCOPE_BYTES = tuple(bytes((n,)) for n in range(129))
#: Zone transfers are refused (REFUSED, like a question outside the zone).
_TRANSFER_TYPES = frozenset({wire.TYPE_IXFR, wire.TYPE_AXFR})
#: Static bodies kept (NXDOMAIN, NODATA, apex, glue, by name and type; REFUSED by type) before
#: that table is emptied (a flood of random names must not grow it).
NEGATIVE_LIMIT = 10_000
#: RFC 8482 section 4.2: the synthesized HINFO's RDATA (CPU "RFC8482", OS empty) and TTL.
_HINFO_RDATA = b"\x07RFC8482\x00"
_HINFO_TTL = 3600

#: What the fast path reads of an OPT: present, DO bit, payload (at least 512), ECS family
#: (0: no ECS), ECS source prefix, and where the ECS option starts.
_OptFields = tuple[bool, int, int, int, int, int]
_NO_OPT: _OptFields = (False, 0, 512, 0, 0, 0)


def _opt_fields(data: bytes, offset: int, size: int) -> _OptFields | None:
    """The one additional record at ``offset`` if it is an OPT of the fast shape (root owner,
    version 0, no option or exactly one well-formed ECS, the end of the message); None for
    anything else (the strict parser then judges it)."""
    if (
        offset + 11 > size
        or data[offset]
        or data[offset + 1]
        or data[offset + 2] != wire.TYPE_OPT
        or data[offset + 6]
    ):
        return None
    rdlength = (data[offset + 9] << 8) | data[offset + 10]
    if offset + 11 + rdlength != size:
        return None
    do_bit = data[offset + 7] >> 7
    payload = max((data[offset + 3] << 8) | data[offset + 4], 512)
    if not rdlength:
        return True, do_bit, payload, 0, 0, 0
    start = offset + 11
    if (
        rdlength < 8
        or data[start]
        or data[start + 1] != wire.OPTION_ECS
        or (data[start + 2] << 8) | data[start + 3] != rdlength - 4
        or data[start + 4]
        or data[start + 7]  # scope must be 0 in a query
    ):
        return None
    family = data[start + 5]
    source = data[start + 6]
    bits = wire.FAMILY_BITS.get(family)
    if bits is None or source > bits or rdlength - 8 != (source + 7) >> 3:
        return None
    if source & 7 and data[size - 1] & (0xFF >> (source & 7)):
        return None
    return True, do_bit, payload, family, source, start


@dataclass(frozen=True, slots=True)
class Reply:
    """The reply bytes and what the shell counts and logs about them."""

    wire: bytes
    qtype: int | None
    rcode: int
    truncated: bool
    ecs: bool
    fast: bool
    targets: tuple[str, ...] = ()
    #: Set when answering raised (the reply is then SERVFAIL): for the shell to log.
    error: str | None = None
    #: The same query bytes from the same client get the same reply until health changes.
    reusable: bool = False
    #: The client's country (a label of :mod:`geodns.countries`) for a geo name's answer.
    country: str | None = None


class ReplyInfo(NamedTuple):
    """What the shell counts about a reply (also the key of its tally)."""

    qtype: int | None
    rcode: int
    truncated: bool
    ecs: bool
    fast: bool
    targets: tuple[str, ...]


class Quick(NamedTuple):
    """A fast-path reply: ``data[:2] + tail`` is the wire."""

    tail: bytes
    info: ReplyInfo
    #: The same query bytes (from the same client, unless ``shared``) get the same reply until
    #: the health generation changes.
    reusable: bool
    #: The reply does not depend on the sender's address (an ECS subnet was used instead).
    shared: bool
    #: The client's country (a label of :mod:`geodns.countries`) for a geo name's answer.
    country: str | None = None


@dataclass(frozen=True, slots=True)
class _Body:
    """Everything of a fast-path reply that does not depend on the query's ID, case or ECS."""

    rcode: int
    sections: bytes
    #: The header after the ID, by RD * 2 + EDNS: for the whole answer, and truncated (TC).
    heads: tuple[bytes, ...]
    tc_heads: tuple[bytes, ...]
    #: What is counted, by truncated * 2 + ECS.
    infos: tuple[ReplyInfo, ...]


def _body(
    flags: int,
    rcode: int,
    ancount: int,
    nscount: int,
    sections: bytes,
    targets: tuple[str, ...],
    qtype: int,
    arcount: int = 0,
) -> _Body:
    rd_edns = [(rd, edns) for rd in (0, wire.FLAG_RD) for edns in (0, 1)]
    return _Body(
        rcode,
        sections,
        tuple(_HEADER_TAIL.pack(flags | rd, 1, ancount, nscount, arcount + e) for rd, e in rd_edns),
        tuple(_HEADER_TAIL.pack(flags | rd | wire.FLAG_TC, 1, 0, 0, e) for rd, e in rd_edns),
        tuple(
            ReplyInfo(qtype, rcode, truncated, ecs, True, () if truncated else targets)
            for truncated in (False, True)
            for ecs in (False, True)
        ),
    )


class _Entry(NamedTuple):
    """A compiled answer whose TTL a pending transition bounds: what is needed to recompute
    that TTL per query (the choice itself holds for the health generation)."""

    body: _Body
    selection: Selection
    geo: GeoName
    qtype: int
    family: int


#: What :meth:`Responder.shaped` needs of a query shape: the compilation it holds for, the
#: range table (starts, answers), the shift from address bytes to an address, the mask of
#: bits past the source prefix in the last byte, the family's bits, per answer the reply up
#: to the scope byte (or None) and what the shell counts, the /16 index (IPv4), the health
#: generation, and per answer the shell's tags by client country number (shared rows, filled
#: on first use: see :meth:`Responder._country_row`).
_Shape = tuple[
    "Compiled",
    Sequence[int],
    Sequence[int],
    int,
    int,
    int,
    tuple[bytes | None, ...],
    tuple["ReplyInfo", ...],
    "array[int] | None",
    int,
    tuple[list[int], ...],
]

_Plain = tuple[
    "Compiled",
    AnswerTable,
    "array[int]",
    list[tuple[bytes, "ReplyInfo", list[int]] | None],
    int,
]


class _Slot(NamedTuple):
    """The compiled answers of one answer class to one query type: the table, and per answer
    number its body, (for a TTL bound by a pending transition) its entry, and its entry in any
    case (what re-times an answer while the compilation lags the health it is served under)."""

    table: AnswerTable
    bodies: tuple[_Body, ...]
    timed: tuple[_Entry | None, ...]
    entries: tuple[_Entry, ...]


@dataclass(frozen=True, slots=True, eq=False)
class Compiled:
    """The geo answers for one health snapshot (swapped whole; filled in before the swap,
    or on first use when compiled lazily)."""

    health: HealthView
    #: By answer class, then slot (A, AAAA, ANY).
    slots: list[list[_Slot | None]]
    #: By answer class and family (4, 6).
    tables: list[dict[int, AnswerTable]]


def _rdtype(value: int) -> dns.rdatatype.RdataType:
    return dns.rdatatype.RdataType.make(value)


def _wire_name(name: dns.name.Name) -> bytes:
    data = name.to_wire()
    assert data is not None
    return data


def _ecs_of(query: Query) -> wire.ClientSubnet | None:
    """The query's ECS option when it gives a subnet (source 0 asks us not to use one)."""
    ecs = query.edns.ecs if query.edns is not None else None
    if ecs is None or ecs.source_prefix == 0:
        return None
    return ecs


def _udp_limit(query: Query, tcp: bool, ours: int) -> int:
    if tcp:
        return 65535
    if query.edns is None:
        return 512
    return min(query.edns.payload, ours)


class Responder:
    """Answers for one config snapshot; build a new one on reload (its memo goes with it).

    The geo answers are compiled (:mod:`geodns.compiled`) for a health generation: by
    default on the first query that brings a new generation (``compile_inline``); a server
    sets ``compile_inline`` to False, compiles off the hot path (:meth:`compile`) and swaps
    the result in (:meth:`install`), answering from the previous compilation meanwhile (those
    replies are not memoized)."""

    def __init__(
        self,
        zone: Zone,
        locator: GeoLocator,
        *,
        compile_inline: bool = True,
        previous: Responder | None = None,
    ) -> None:
        """``previous``: the responder this one replaces (a reload), whose answer tables are
        reused where they still hold (see :meth:`compile`)."""
        self.zone = zone
        self.locator = locator
        self.locate = locator.locate
        self.compile_inline = compile_inline
        self._origin_key = name_key(zone.origin)
        self._memo_generation = -1
        #: (query bytes after the ID, client, transport) -> reply: a hit skips even parsing.
        self._replies: dict[tuple[bytes, IPAddress, bool], Reply] = {}
        self._soa_labels = {
            "owner": wire.name_labels(name_key(zone.origin)),
            "mname": wire.name_labels(_wire_name(zone.soa.mname)),
            "rname": wire.name_labels(_wire_name(zone.soa.rname)),
        }
        #: Wire suffixes of the SOA's MNAME and RNAME longer than the origin: a question name
        #: ending in one gets a NODATA SOA compressed against its own labels.
        origin_labels = len(self._soa_labels["owner"])
        self._soa_suffixes = tuple(
            {
                b"".join(bytes((len(label),)) + label.lower() for label in labels[i:]) + b"\0"
                for labels in (self._soa_labels["mname"], self._soa_labels["rname"])
                if tuple(label.lower() for label in labels[-origin_labels:])
                == self._soa_labels["owner"]
                for i in range(len(labels) - origin_labels)
            }
        )
        #: Geo names by lowercased wire name, with the number of their answer class (the memo
        #: keys it): names that select alike and whose bodies are equal bytes share answers.
        self._names: dict[bytes, tuple[int, GeoName]] = {}
        classes: dict[tuple[object, ...], int] = {}
        #: The family an ANY question is answered with, by answer class (RFC 8482: one RRset;
        #: A when any candidate has IPv4, as the slow path decides).
        self._any_family: dict[int, int] = {}
        #: One name (its lowercased wire form) and its geo name per answer class: what the
        #: class's bodies are rendered for.
        self._class_names: list[tuple[bytes, GeoName]] = []
        for key, geo in zone.geo_names.items():
            number = classes.setdefault(self._answer_class(key, geo), len(classes))
            self._names[key] = (number, geo)
            self._any_family[number] = 4 if any(t.addresses_of(4) for t in geo.targets) else 6
            if number == len(self._class_names):
                self._class_names.append((key, geo))
        self._name_lengths = tuple(sorted({len(key) for key in zone.geo_names}))
        self.address_map, self.address_map_reused = _address_map(locator, zone)
        #: Client countries: what the shell's answer tallies are labelled with.
        self.countries = self.address_map.countries
        self._country_blocks = self.countries.v4_blocks
        #: Per kind of reply, the shell's tag by country number (-1: not asked yet); one row
        #: per kind of reply, shared by every shape (bounded by kinds x countries).
        self._country_rows: dict[ReplyInfo, list[int]] = {}
        self._compiled: Compiled | None = None
        self._reuse: dict[tuple[object, ...], AnswerTable] = {}
        if previous is not None and previous.address_map is self.address_map:
            # Its tables are keyed by the groups of this very map (by id: valid while the map
            # lives), so they hold here too; a copy, since the previous responder may still
            # compile for a health change until it is swapped out.
            self._reuse = dict(previous._reuse)
        #: ECS query shapes (the query after its ID, up to the address) -> what
        #: :meth:`shaped` needs; and the address lengths seen (the key is the query minus one).
        self._shapes: dict[bytes, _Shape] = {}
        self._shape_lengths: tuple[int, ...] = ()
        #: Queries without ECS (after the ID) -> what :meth:`plain` needs: the compiled
        #: table, and the reply per answer as :meth:`quick` made it (None: not made yet).
        self._plain: dict[bytes, _Plain] = {}
        #: The address length tried first (the first seen: /24 from most resolvers).
        self._shape_length = 3
        #: What :meth:`shaped` returns with each reply (set by the shell: its tally slot for a
        #: kind of reply and the client's country).
        self.tag_of: Callable[[ReplyInfo, str | None], int] | None = None
        #: How long the last compilation took.
        self.compile_seconds = 0.0
        #: Bodies that depend on the question only - NXDOMAIN, NODATA, the apex SOA / NS / ANY,
        #: glue addresses, RFC 8482 HINFO - by (name, type): they hold for the zone's lifetime,
        #: so an "expensive" question costs what a memoized answer costs.
        self._static_bodies: dict[tuple[bytes, int], _Body] = {}
        #: NXDOMAIN bodies by (name length, type), for names that do not end in the SOA's
        #: MNAME or RNAME (those are compressed against themselves: kept by name above).
        self._nxdomain: dict[tuple[int, int], _Body] = {}
        #: REFUSED bodies (outside the zone, another class, zone transfers) by query type.
        self._refused: dict[int, _Body] = {}
        self._max_udp_payload = zone.max_udp_payload
        payload = struct.pack("!H", zone.max_udp_payload)
        #: The OPT record up to its RDLENGTH, without and with the DO bit (our rcodes are < 16).
        self._opt_heads = (
            b"\x00\x00\x29" + payload + b"\x00\x00\x00\x00",
            b"\x00\x00\x29" + payload + b"\x00\x00\x80\x00",
        )

    def _answer_class(self, qname_key: bytes, geo: GeoName) -> tuple[object, ...]:
        """What a memoized body of ``geo`` depends on besides the place, the query type and
        health: everything :func:`~geodns.selection.select` reads of the name (never its
        owner), the name's wire length (an answer's records point at the question, offset 12)
        and, for the rare name that ends in the SOA's MNAME or RNAME, the name itself (its
        NODATA SOA is then compressed against it).  Many names configured alike (a generated
        zone) then share one selection per place instead of one each."""
        special = any(qname_key.endswith(suffix) for suffix in self._soa_suffixes)
        return (
            geo.targets,
            geo.spec.targets,
            geo.answers,
            geo.ttl,
            len(qname_key),
            qname_key if special else None,
        )

    def _soa_section(self, qname_key: bytes) -> bytes:
        """The authority section of a NODATA answer to ``qname_key`` (after its question)."""
        start = 12 + len(qname_key) + 4
        out = bytearray(start)
        compressor = wire.Compressor()
        compressor.remember(wire.name_labels(qname_key), 12)
        self._write_soa(out, compressor, self.zone.negative_ttl)
        return bytes(out[start:])

    # ---------------------------------------------------------------------------------- entry

    @property
    def memo_generation(self) -> int:
        return self._memo_generation

    @property
    def compiled(self) -> Compiled | None:
        return self._compiled

    def compile(self, health: HealthView, *, eager: bool = True) -> Compiled:
        """The geo answers under ``health``: every table now (``eager``: what a server does
        off the hot path, in another thread) or each on first use.  Tables whose answers are
        those of an earlier generation are reused."""
        started = time.perf_counter()
        compiled = Compiled(
            health,
            [[None, None, None] for _ in self._class_names],
            [{} for _ in self._class_names],
        )
        if eager:
            for number in range(len(self._class_names)):
                for slot in range(3):
                    self._fill(compiled, number, slot)
        self.compile_seconds = time.perf_counter() - started
        return compiled

    def _table(self, compiled: Compiled, number: int, family: int) -> AnswerTable:
        tables = compiled.tables[number]
        table = tables.get(family)
        if table is None:
            geo = self._class_names[number][1]
            group = self.address_map.groups[group_key(geo.targets)]
            table = compile_table(
                group, self.zone.config, geo, family, compiled.health, self._reuse
            )
            tables[family] = table
        return table

    def _fill(self, compiled: Compiled, number: int, slot: int) -> _Slot:
        key, geo = self._class_names[number]
        family = (4, 6, self._any_family[number])[slot]
        table = self._table(compiled, number, family)
        qtype = _SLOT_QTYPES[slot]
        bodies = []
        timed: list[_Entry | None] = []
        entries: list[_Entry] = []
        for selection in table.selections:
            body = self._render_body(key, qtype, family, selection)
            bodies.append(body)
            entry = _Entry(body, selection, geo, qtype, family)
            entries.append(entry)
            timed.append(entry if selection.timed else None)
        filled = _Slot(table, tuple(bodies), tuple(timed), tuple(entries))
        compiled.slots[number][slot] = filled
        return filled

    def answer_table(self, qname_key: bytes, family: int, health: HealthView) -> AnswerTable:
        """The compiled table of the geo name ``qname_key`` asked for ``family`` (4, 6)."""
        return self._table(self._answers(health), self._names[qname_key][0], family)

    def answer_range(
        self, qname_key: bytes, family: int, ecs_family: int, address: int, health: HealthView
    ) -> tuple[int, int, int]:
        """For the geo name ``qname_key`` asked for ``family`` (4: A, 6: AAAA) by a client at
        ``address`` (ECS family 1: IPv4, 2: IPv6): the answer number and the first and last
        address of the widest range around the address that gets the same answer."""
        table = self._table(self._answers(health), self._names[qname_key][0], family)
        answer, first, following = table.find(ecs_family, address)
        return answer, first, following - 1

    def install(self, compiled: Compiled) -> None:
        """Answer from ``compiled`` from now on (an atomic swap: one attribute)."""
        self._compiled = compiled
        self._shapes = {}
        self._plain = {}

    def _answers(self, health: HealthView) -> Compiled:
        compiled = self._compiled
        if compiled is None or (
            compiled.health.generation != health.generation and self.compile_inline
        ):
            compiled = self.compile(health, eager=False)
            self.install(compiled)
        return compiled

    def _check_generation(self, health: HealthView) -> None:
        generation = health.generation
        if generation != self._memo_generation:
            self._replies.clear()
            self._memo_generation = generation

    def respond(
        self, data: bytes, source: IPAddress, *, tcp: bool, health: HealthView
    ) -> Reply | None:
        """The reply to ``data`` from ``source``, or None when nothing must be sent."""
        self._check_generation(health)
        key = (data[2:], source, tcp)
        seen = self._replies.get(key)
        if seen is not None:
            return Reply(
                data[:2] + seen.wire[2:],
                seen.qtype,
                seen.rcode,
                seen.truncated,
                seen.ecs,
                True,
                seen.targets,
                None,
                True,
                seen.country,
            )
        try:
            quick = self.quick(data, source, tcp, health)
        except Exception:  # answered (SERVFAIL, with the error) by the general path below
            quick = None
        if quick is not None:
            info = quick.info
            reply: Reply | None = Reply(
                data[:2] + quick.tail,
                info.qtype,
                info.rcode,
                info.truncated,
                info.ecs,
                True,
                info.targets,
                None,
                quick.reusable,
                quick.country,
            )
        else:
            reply = self._respond(data, source, tcp, health)
        if reply is not None and reply.reusable:
            if len(self._replies) > MEMO_LIMIT:
                self._replies.clear()
            self._replies[key] = reply
        return reply

    def respond_slow(
        self, data: bytes, source: IPAddress, *, tcp: bool, health: HealthView
    ) -> Reply | None:
        """Same as :meth:`respond` but never the fast path (for the equivalence tests)."""
        return self._respond(data, source, tcp, health)

    def _respond(
        self, data: bytes, source: IPAddress, tcp: bool, health: HealthView
    ) -> Reply | None:
        head = wire.peek_header(data)
        if head is None:
            return None  # not even an ID to answer to
        ident, flags, _ = head
        if flags & wire.FLAG_QR:
            return None  # never answer a response: that is how reflection loops start
        if (flags >> 11) & 0xF != 0:
            return Reply(
                wire.header_only(ident, flags, wire.RCODE_NOTIMP),
                None,
                wire.RCODE_NOTIMP,
                False,
                False,
                True,
            )
        try:
            query = wire.parse_query(data)
        except WireError:
            return Reply(
                wire.header_only(ident, flags, wire.RCODE_FORMERR),
                None,
                wire.RCODE_FORMERR,
                False,
                False,
                True,
            )
        try:
            return self._slow(data, query, source, tcp, health)
        except Exception as exc:  # a handler bug answers SERVFAIL, never kills the server
            return Reply(
                wire.header_only(ident, flags, wire.RCODE_SERVFAIL),
                query.qtype,
                wire.RCODE_SERVFAIL,
                False,
                False,
                False,
                (),
                f"{type(exc).__name__}: {exc}",
            )

    # ------------------------------------------------------------------------------ fast path

    def quick(
        self,
        data: bytes,
        source: IPAddress | Callable[[], IPAddress],
        tcp: bool,
        health: HealthView,
    ) -> Quick | None:
        """The fast-path reply, or None when the query is not of the fast shape (then
        :meth:`respond`'s general path decides: FORMERR, BADVERS, slow path...).

        ``source`` may be a callable: it is only called when the reply depends on the sender
        (no ECS subnet).  May raise on a handler bug; the general path then answers SERVFAIL.
        """
        # Header: QR 0, opcode 0, then qdcount 1, ancount 0, nscount 0, arcount 0 or 1.
        size = len(data)
        if size < 17 or data[2] & 0xF8 or data[4:10] != _COUNTS or data[10] or data[11] > 1:
            return None
        # The question: a geo name matched by slicing.  A lowercased slice equal to a valid
        # wire name frames its labels exactly as that name (length bytes are below "A").
        found = None
        for length in self._name_lengths:
            end = 12 + length
            found = self._names.get(data[12:end].lower())
            if found is not None:
                break
        shape = _QUESTION_TAILS.get(data[end : end + 4]) if found is not None else None
        if found is None or shape is None:
            return self._quick_static(data, size, tcp)
        slot = shape
        offset = end + 4
        if data[11]:
            fields = _opt_fields(data, offset, size)
            if fields is None:
                return None
        elif offset != size:
            return None
        else:
            fields = _NO_OPT
        ecs_family = fields[3]

        compiled = self._compiled
        if compiled is None or compiled.health.generation != health.generation:
            compiled = self._answers(health)
            current = compiled.health.generation == health.generation
        else:
            current = True
        filled = compiled.slots[found[0]][slot]
        if filled is None:
            filled = self._fill(compiled, found[0], slot)
        table, bodies, timed, entries = filled
        # Where the client is: the ECS subnet, else the sender; one range lookup.
        shared = fields[4] > 0
        if shared:
            address = data[fields[5] + 8 : size]
            if ecs_family == 1:
                value = int.from_bytes(address, "big") << (32 - 8 * len(address))
                starts: Sequence[int] = table.v4_starts
                answers = table.v4_answers
                bits = 32
            else:
                value = int.from_bytes(address, "big") << (128 - 8 * len(address))
                starts, answers = table.v6_starts, table.v6_answers
                bits = 128
            i = bisect_right(starts, value) - 1
            answer = answers[i]
            country = self.countries.names[self.countries.of_ecs(ecs_family, value)]
            # The ECS scope: the widest network around the address inside its range.
            host_bits = bits
            first = starts[i]
            if first:
                host_bits = (value ^ (first - 1)).bit_length() - 1
            if i + 1 < len(starts):
                following = (value ^ starts[i + 1]).bit_length() - 1
                if following < host_bits:
                    host_bits = following
            scope: bytes | None = _SCOPE_BYTES[bits - host_bits]
        else:
            client = source if not callable(source) else source()
            value = int(client)
            if client.version == 4:
                i = bisect_right(table.v4_starts, value) - 1
                answer = table.v4_answers[i]
                countries = self.countries
                number = countries.v4_blocks[value >> 16]
                if number == MIXED:  # a /16 of several countries
                    number = countries.of_v4(value)
                country = countries.names[number]
            else:
                i = bisect_right(table.v6_starts, value) - 1
                answer = table.v6_answers[i]
                country = self.countries.names[self.countries.of_v6(value)]
            scope = None
        entry = timed[answer]
        if not current:
            # The compilation lags the health (a recompile is in flight).
            body = self._lagging_body(self._class_names[found[0]][0], entries[answer], health)
            reusable = False
        elif entry is None:
            body = bodies[answer]
            reusable = True
        else:
            body = self._timed_body(self._class_names[found[0]][0], entry, health)
            reusable = False
        if shared and reusable and not tcp and len(self._shapes) < SHAPE_LIMIT:
            self._learn_shape(data, offset, fields, compiled, found[0], slot)
        made = self._assemble(data, body, offset, fields, scope, tcp, reusable, shared, country)
        if reusable and not shared and not tcp:
            self._learn_plain(data[2:], compiled, filled, answer, made)
        return made

    def plain(
        self, query: bytes, v4: bool, address: int, generation: int
    ) -> tuple[bytes, ReplyInfo, int] | None:
        """The UDP reply (after the ID) to ``query`` (after its ID), which carries no ECS
        subnet, from a sender at ``address`` (IPv4 if ``v4``, else IPv6) - a resolver never
        seen before, typically: one dict lookup and one range lookup on the compiled answers,
        the reply rendered once per answer (by :meth:`quick`, for an earlier sender that got
        the same answer).  None when :meth:`quick` must decide (a new query shape or answer,
        or a compilation other than ``generation``'s).  The last item is as in :meth:`shaped`.
        """
        shape = self._plain.get(query)
        if shape is None:
            return None
        compiled, table, index, replies, made_for = shape
        if made_for != generation or compiled is not self._compiled:
            return None
        if v4:
            block = address >> 16
            i = bisect_right(table.v4_starts, address, index[block], index[block + 1] + 1) - 1
            answer = table.v4_answers[i]
            country = self._country_blocks[block]
            if country == MIXED:
                country = self.countries.of_v4(address)  # a /16 of several countries
        else:
            answer = table.v6_answers[bisect_right(table.v6_starts, address) - 1]
            country = self.countries.of_v6(address)
        learned = replies[answer]
        if learned is None:
            return None
        reply, info, row = learned
        tag = row[country]
        if tag < 0:
            tag = row[country] = self._country_tag(info, country)
        return reply, info, tag

    def _learn_plain(
        self, query: bytes, compiled: Compiled, filled: _Slot, answer: int, made: Quick
    ) -> None:
        """Remember, for :meth:`plain`, the reply :meth:`quick` made to ``query`` (after its
        ID, no ECS subnet) for a sender whose range got ``answer``: the same bytes for every
        sender that gets that answer, under this compilation."""
        shape = self._plain.get(query)
        if shape is None or shape[4] != compiled.health.generation or shape[0] is not compiled:
            if len(self._plain) >= SHAPE_LIMIT:
                self._plain.clear()
            table = filled.table
            index = table.v4_blocks
            replies: list[tuple[bytes, ReplyInfo, list[int]] | None] = [None] * len(filled.bodies)
            shape = (compiled, table, index, replies, compiled.health.generation)
            self._plain[query] = shape
        shape[3][answer] = (made.tail, made.info, self._country_row(made.info))

    def shaped(self, query: bytes, generation: int) -> tuple[bytes, ReplyInfo, int] | None:
        """The UDP reply (after the ID) to an ECS ``query`` (after its ID) whose shape - every
        byte but the ID and the address - was answered by :meth:`quick` before under the
        compilation in force for ``generation``: one slice, one dict lookup, one range lookup
        and one join.  None when the shape is new (then :meth:`quick` decides, and learns it).
        The last item is what :attr:`tag_of` said of the reply's :class:`ReplyInfo` (the
        shell's tally slot)."""
        length = self._shape_length
        shape = self._shapes.get(query[:-length])
        if shape is None:
            for length in self._shape_lengths:
                shape = self._shapes.get(query[:-length])
                if shape is not None:
                    break
            else:
                return None
        compiled, starts, answers, shift, mask, bits, heads, infos, index, made_for, rows = shape
        if made_for != generation or compiled is not self._compiled:
            return None
        address = query[-length:]
        if mask and query[-1] & mask:
            return None  # bits set past the source prefix: the strict parser's FORMERR
        value = int.from_bytes(address, "big") << shift
        if index is not None:  # IPv4: the ranges of the address's /16 first
            block = value >> 16
            i = bisect_right(starts, value, index[block], index[block + 1] + 1) - 1
            country = self._country_blocks[block]
            if country == MIXED:
                country = self.countries.of_v4(value)  # a /16 of several countries
        else:
            i = bisect_right(starts, value) - 1
            country = self.countries.of_v6(value)
        answer = answers[i]
        head = heads[answer]
        if head is None:
            return None
        row = rows[answer]
        tag = row[country]
        if tag < 0:
            tag = row[country] = self._country_tag(infos[answer], country)
        host_bits = bits
        first = starts[i]
        if first:
            host_bits = (value ^ (first - 1)).bit_length() - 1
        if i + 1 < len(starts):
            following = (value ^ starts[i + 1]).bit_length() - 1
            if following < host_bits:
                host_bits = following
        return head + _SCOPE_BYTES[bits - host_bits] + address, infos[answer], tag

    def _country_row(self, info: ReplyInfo) -> list[int]:
        row = self._country_rows.get(info)
        if row is None:
            row = self._country_rows[info] = [-1] * len(self.countries.names)
        return row

    def _country_tag(self, info: ReplyInfo, country: int) -> int:
        """The shell's tag for ``info`` from a client in country number ``country``."""
        tag_of = self.tag_of
        return tag_of(info, self.countries.names[country]) if tag_of is not None else -1

    def _learn_shape(
        self,
        data: bytes,
        offset: int,
        fields: _OptFields,
        compiled: Compiled,
        number: int,
        slot: int,
    ) -> None:
        """Remember an ECS query's shape for :meth:`shaped`: per answer of its table, the
        reply up to the scope byte (None for an answer :meth:`quick` must build: a TTL bound
        by a pending transition, or a reply that must be truncated)."""
        _, do_bit, payload, ecs_family, source, ecs_start = fields
        key = data[2 : ecs_start + 8]
        if key in self._shapes:
            return
        filled = compiled.slots[number][slot]
        assert filled is not None
        table, bodies, timed, _ = filled
        length = len(data) - ecs_start - 8
        variant = ((data[2] & 0x01) << 1) + 1
        limit = min(payload, self._max_udp_payload)
        heads: list[bytes | None] = []
        for body, entry in zip(bodies, timed, strict=True):
            if entry is not None or len(data) + len(body.sections) > limit:
                heads.append(None)
                continue
            heads.append(
                b"".join(
                    (
                        body.heads[variant],
                        data[12:offset],
                        body.sections,
                        self._opt_heads[do_bit],
                        data[offset + 9 : ecs_start + 7],
                    )
                )
            )
        index: array[int] | None = None
        if ecs_family == 1:
            starts: Sequence[int] = table.v4_starts
            answers: Sequence[int] = table.v4_answers
            bits = 32
            index = table.v4_blocks
        else:
            starts, answers, bits = table.v6_starts, table.v6_answers, 128
        mask = 0xFF >> (source & 7) if source & 7 else 0
        infos = tuple(body.infos[1] for body in bodies)
        tags = tuple(self._country_row(info) for info in infos)
        self._shapes[key] = (
            compiled,
            starts,
            answers,
            bits - 8 * length,
            mask,
            bits,
            tuple(heads),
            infos,
            index,
            compiled.health.generation,
            tags,
        )
        if length not in self._shape_lengths:
            self._shape_lengths = (*self._shape_lengths, length)
            if len(self._shape_lengths) == 1:
                self._shape_length = length

    def _quick_static(self, data: bytes, size: int, tcp: bool) -> Quick | None:
        """Every fast-shaped answer that does not depend on the client, from bodies rendered
        once per zone: REFUSED (outside the zone, a class other than IN, a zone transfer),
        NXDOMAIN, NODATA, the apex SOA / NS (with glue) / ANY, glue addresses, RFC 8482 HINFO
        for ANY.  These are what an attacker asks for when answers are expensive; here they
        cost what a memoized geo answer costs.  The header has been checked by :meth:`quick`."""
        offset = 12
        starts = []
        while True:  # an uncompressed name: anything else is the strict parser's to judge
            if offset >= size:
                return None
            length = data[offset]
            if not length:
                break
            if length > 63:
                return None
            starts.append(offset)
            offset += 1 + length
        name_end = offset + 1
        if name_end - 12 > wire.MAX_NAME_WIRE or name_end + 4 > size:
            return None
        qtype = (data[name_end] << 8) | data[name_end + 1]
        offset = name_end + 4
        if data[11]:
            fields = _opt_fields(data, offset, size)
            if fields is None:
                return None
        elif offset != size:
            return None
        else:
            fields = _NO_OPT
        if qtype == wire.TYPE_OPT:  # a question for OPT: FORMERR (the slow path's verdict)
            info = ReplyInfo(qtype, wire.RCODE_FORMERR, False, fields[3] != 0, True, ())
            tail = wire.header_only(0, data[2] << 8, wire.RCODE_FORMERR)[2:]
            return Quick(tail, info, False, True)
        origin = self._origin_key
        apex = name_end - len(origin)
        in_zone = apex in starts and data[apex:name_end].lower() == origin
        if (
            not in_zone
            or data[name_end + 2]
            or data[name_end + 3] != wire.CLASS_IN
            or qtype in _TRANSFER_TYPES
        ):
            body = self._refused.get(qtype)
            if body is None:
                if len(self._refused) >= NEGATIVE_LIMIT:
                    self._refused.clear()
                rcode = wire.RCODE_REFUSED
                body = self._refused[qtype] = _body(
                    wire.FLAG_QR | rcode, rcode, 0, 0, b"", (), qtype
                )
            # Not memoized as a reply: random names would only churn the reply memo.
            return self._assemble(data, body, offset, fields, None, tcp, False, True)
        key = data[12:name_end].lower()
        if key in self._names and qtype in (wire.TYPE_A, wire.TYPE_AAAA, wire.TYPE_ANY):
            return None  # a geo answer (quick matches those first; never here)
        if key not in self.zone.existing and not key.endswith(self._soa_suffixes):
            # NXDOMAIN: its SOA points at the origin's labels in the question, so names of
            # one length share a body (a flood of random names builds none).
            body = self._nxdomain.get((len(key), qtype))
            if body is None:
                if len(self._nxdomain) >= NEGATIVE_LIMIT:
                    self._nxdomain.clear()
                body = self._nxdomain[(len(key), qtype)] = self._static_body(key, qtype)
        else:
            body = self._static_bodies.get((key, qtype))
            if body is None:
                if len(self._static_bodies) >= NEGATIVE_LIMIT:
                    self._static_bodies.clear()
                body = self._static_bodies[(key, qtype)] = self._static_body(key, qtype)
        # NODATA and positive answers are reusable; NXDOMAIN is not (a flood of random names
        # would only churn the reply memo), though its body is kept a while.
        reusable = body.rcode == wire.RCODE_NOERROR
        return self._assemble(data, body, offset, fields, None, tcp, reusable, True)

    def _static_body(self, key: bytes, qtype: int) -> _Body:
        """The body of an answer to (``key``, ``qtype``) for a name in the zone that is not a
        geo answer: what the slow path's ``_static`` and negative answers render, byte for
        byte (names compressed as dnspython does, against the question at offset 12)."""
        start = 12 + len(key) + 4
        out = bytearray(start)
        compressor = wire.Compressor()
        question = wire.name_labels(key)
        compressor.remember(question, 12)
        zone = self.zone
        flags = wire.FLAG_QR | wire.FLAG_AA
        if key not in zone.existing:
            self._write_soa(out, compressor, zone.negative_ttl)
            rcode = wire.RCODE_NXDOMAIN
            return _body(flags | rcode, rcode, 0, 1, bytes(out[start:]), (), qtype)
        apex = key == self._origin_key
        glue = zone.glue.get(key)
        ancount = arcount = 0
        if apex and qtype in (wire.TYPE_SOA, wire.TYPE_ANY):
            self._write_soa(out, compressor, zone.static_ttl, question)
            ancount = 1
        elif apex and qtype == wire.TYPE_NS:
            servers = list(dict.fromkeys(zone.ns))  # an RRset has no duplicates
            for server in servers:
                compressor.write(out, question)
                out += _RR_FIXED.pack(wire.TYPE_NS, wire.CLASS_IN, zone.static_ttl, 0)
                rdata_start = len(out)
                compressor.write(out, wire.name_labels(_wire_name(server)))
                struct.pack_into("!H", out, rdata_start - 2, len(out) - rdata_start)
            ancount = len(servers)
            for server in zone.ns:  # glue in the order of the NS records, A then AAAA
                ns_glue = zone.glue.get(name_key(server))
                if ns_glue is None:
                    continue
                labels = wire.name_labels(_wire_name(server))
                for rrtype, addresses in (
                    (wire.TYPE_A, ns_glue.ipv4),
                    (wire.TYPE_AAAA, ns_glue.ipv6),
                ):
                    arcount += self._write_addresses(out, compressor, labels, rrtype, addresses)
        elif glue is not None and qtype in (wire.TYPE_A, wire.TYPE_AAAA, wire.TYPE_ANY):
            if qtype == wire.TYPE_ANY:
                rrtype = wire.TYPE_A if glue.ipv4 else wire.TYPE_AAAA
            else:
                rrtype = qtype
            addresses = glue.ipv4 if rrtype == wire.TYPE_A else glue.ipv6
            ancount = self._write_addresses(out, compressor, question, rrtype, addresses)
        elif qtype == wire.TYPE_ANY:
            out += _hinfo_record()
            ancount = 1
        if not ancount:  # NODATA: the SOA in the authority section
            self._write_soa(out, compressor, zone.negative_ttl)
            return _body(flags, wire.RCODE_NOERROR, 0, 1, bytes(out[start:]), (), qtype)
        return _body(flags, wire.RCODE_NOERROR, ancount, 0, bytes(out[start:]), (), qtype, arcount)

    def _write_addresses(
        self,
        out: bytearray,
        compressor: wire.Compressor,
        owner: tuple[bytes, ...],
        rrtype: int,
        addresses: tuple[IPAddress, ...],
    ) -> int:
        """An A or AAAA RRset (static TTL); returns how many records were written."""
        unique = list(dict.fromkeys(addresses))
        ttl = self.zone.static_ttl
        for address in unique:
            packed = address.packed
            compressor.write(out, owner)
            out += _RR_FIXED.pack(rrtype, wire.CLASS_IN, ttl, len(packed)) + packed
        return len(unique)

    def _assemble(
        self,
        data: bytes,
        body: _Body,
        offset: int,
        fields: _OptFields,
        scope: bytes | None,
        tcp: bool,
        reusable: bool,
        shared: bool,
        country: str | None = None,
    ) -> Quick:
        """The reply: header, the question as asked, the sections, the OPT echoing ECS (with
        ``scope``, else as sent: scope 0).  ``offset`` is where the question ends."""
        edns, do_bit, payload, ecs_family, _, ecs_start = fields
        sections = body.sections
        variant = (data[2] & 0x01) << 1  # RD
        if edns:
            variant += 1
            opt_head = self._opt_heads[do_bit]
            limit = 65535 if tcp else min(payload, self._max_udp_payload)
            # Our OPT is as long as the query's (its RDATA is echoed): the reply is the query
            # plus the sections.
            if len(data) + len(sections) > limit:
                if scope is not None:
                    opt_tail = data[offset + 9 : ecs_start + 7] + scope + data[ecs_start + 8 :]
                else:
                    opt_tail = data[offset + 9 :]
                return Quick(
                    b"".join((body.tc_heads[variant], data[12:offset], opt_head, opt_tail)),
                    body.infos[2 + (ecs_family != 0)],
                    reusable,
                    shared,
                    country,
                )
            if scope is not None:  # the query's OPT RDATA is exactly its ECS option
                tail = b"".join(
                    (
                        body.heads[variant],
                        data[12:offset],
                        sections,
                        opt_head,
                        data[offset + 9 : ecs_start + 7],
                        scope,
                        data[ecs_start + 8 :],
                    )
                )
            else:  # no option, or ECS echoed as sent
                tail = b"".join(
                    (body.heads[variant], data[12:offset], sections, opt_head, data[offset + 9 :])
                )
            return Quick(tail, body.infos[ecs_family != 0], reusable, shared, country)
        if not tcp and offset + len(sections) > 512:
            return Quick(
                body.tc_heads[variant] + data[12:offset], body.infos[2], reusable, shared, country
            )
        return Quick(
            body.heads[variant] + data[12:offset] + sections,
            body.infos[0],
            reusable,
            shared,
            country,
        )

    def _timed_body(self, qname_key: bytes, entry: _Entry, health: HealthView) -> _Body:
        """A compiled choice whose TTL a pending transition bounds: the TTL of this moment."""
        selection = entry.selection
        ordered = [(c.target, c.distance_km) for c in selection.candidates]
        ttl, _ = ttl_of(self.zone.config, entry.geo, ordered, selection.chosen, health)
        if ttl == selection.ttl:
            return entry.body
        return self._render_body(qname_key, entry.qtype, entry.family, selection, ttl)

    def _lagging_body(self, qname_key: bytes, entry: _Entry, health: HealthView) -> _Body:
        """A compiled choice served under a newer health than it was compiled for.  When no
        candidate's verdict changed, the choice is the one the new health makes: the strict
        answer, with this moment's TTL.  Otherwise the choice may be about to change: the TTL
        floor (``dns.min_ttl``, or the name's TTL when lower), so that resolvers ask again
        soon - never the full TTL of a region that just went down."""
        selection = entry.selection
        if all(is_up(c.target, health) == c.up for c in selection.candidates):
            return self._timed_body(qname_key, entry, health)
        ttl = min(entry.geo.ttl, int(self.zone.config.dns.min_ttl), selection.ttl)
        if ttl == selection.ttl:
            return entry.body
        return self._render_body(qname_key, entry.qtype, entry.family, selection, ttl)

    def _render_body(
        self,
        qname_key: bytes,
        qtype: int,
        family: int,
        selection: Selection,
        ttl: int | None = None,
    ) -> _Body:
        if selection.outcome == "servfail":
            rcode = wire.RCODE_SERVFAIL
            return _body(wire.FLAG_QR | rcode, rcode, 0, 0, b"", (), qtype)
        if selection.outcome == "refused":
            rcode = wire.RCODE_REFUSED
            return _body(wire.FLAG_QR | rcode, rcode, 0, 0, b"", (), qtype)
        flags = wire.FLAG_QR | wire.FLAG_AA
        # Offsets inside the body are absolute: the question always starts at 12.
        start = 12 + len(qname_key) + 4
        out = bytearray(start)
        addresses = list(dict.fromkeys(selection.addresses(family)))  # an RRset has no dups
        if selection.outcome == "answer" and addresses:
            answer_ttl = selection.ttl if ttl is None else ttl
            rrtype = wire.TYPE_A if family == 4 else wire.TYPE_AAAA  # ANY: the family's type
            for address in addresses:
                packed = address.packed
                out += (
                    b"\xc0\x0c"
                    + _RR_FIXED.pack(rrtype, wire.CLASS_IN, answer_ttl, len(packed))
                    + packed
                )
            return _body(
                flags,
                wire.RCODE_NOERROR,
                len(addresses),
                0,
                bytes(out[start:]),
                tuple(t.name for t in selection.chosen),
                qtype,
            )
        if qtype == wire.TYPE_ANY:  # nothing to answer with: RFC 8482 HINFO, not NODATA
            return _body(flags, wire.RCODE_NOERROR, 1, 0, _hinfo_record(), (), qtype)
        return _body(flags, wire.RCODE_NOERROR, 0, 1, self._soa_section(qname_key), (), qtype)

    def _write_soa(
        self,
        out: bytearray,
        compressor: wire.Compressor,
        ttl: int,
        owner: tuple[bytes, ...] | None = None,
    ) -> None:
        """The zone's SOA record: owned by the origin (a negative answer's authority) or by
        ``owner`` (the apex as asked: it compresses to the question either way)."""
        soa = self.zone.soa
        compressor.write(out, self._soa_labels["owner"] if owner is None else owner)
        out += _RR_FIXED.pack(wire.TYPE_SOA, wire.CLASS_IN, ttl, 0)
        rdata_start = len(out)
        compressor.write(out, self._soa_labels["mname"])
        compressor.write(out, self._soa_labels["rname"])
        out += _SOA_NUMBERS.pack(soa.serial, soa.refresh, soa.retry, soa.expire, soa.minimum)
        struct.pack_into("!H", out, rdata_start - 2, len(out) - rdata_start)

    # ------------------------------------------------------------------------------ slow path

    def _slow(
        self, data: bytes, query: Query, source: IPAddress, tcp: bool, health: HealthView
    ) -> Reply:
        try:
            message = dns.message.from_wire(data)
        except Exception:  # dnspython raises many types for bad input; all mean FORMERR
            return Reply(
                wire.header_only(query.id, query.flags, wire.RCODE_FORMERR),
                query.qtype,
                wire.RCODE_FORMERR,
                False,
                False,
                False,
            )
        response = dns.message.Message(id=message.id)
        response.flags = dns.flags.QR | (message.flags & dns.flags.RD)
        response.question = list(message.question)
        edns = query.edns
        ecs_present = edns is not None and edns.ecs is not None
        if edns is not None and edns.version != 0:
            response.use_edns(0, 0, self.zone.max_udp_payload)
            response.set_rcode(dns.rcode.BADVERS)
            return self._finish(response, query, tcp, ecs_present, ())

        scope = 0
        targets: tuple[str, ...] = ()
        country: str | None = None
        qname = message.question[0].name
        qtype = query.qtype
        key = name_key(qname)
        geo = self.zone.geo_names.get(key)
        if query.qtype == wire.TYPE_OPT:
            return Reply(
                wire.header_only(query.id, query.flags, wire.RCODE_FORMERR),
                query.qtype,
                wire.RCODE_FORMERR,
                False,
                ecs_present,
                False,
            )
        if (
            query.qclass != wire.CLASS_IN
            or not qname.is_subdomain(self.zone.origin)
            or qtype in (wire.TYPE_AXFR, wire.TYPE_IXFR)
        ):
            response.set_rcode(dns.rcode.REFUSED)
        elif key not in self.zone.existing:
            response.flags |= dns.flags.AA
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa_rrset(self.zone.negative_ttl))
        else:
            response.flags |= dns.flags.AA
            family = FAMILY_OF_QTYPE.get(qtype)
            if geo is not None and (family is not None or qtype == wire.TYPE_ANY):
                ecs = _ecs_of(query)
                client = ecs.ip() if ecs is not None else source
                location = self.locate(client)
                country = self.countries.names[self.countries.of(client)]
                if family is None:  # ANY: one RRset (RFC 8482), A if any candidate has IPv4
                    family = 4 if any(t.addresses_of(4) for t in geo.targets) else 6
                if ecs is not None:
                    address = int(ecs.ip())
                    _, first, last = self.answer_range(key, family, ecs.family, address, health)
                    scope = widest_scope_plain(address, first, last, wire.FAMILY_BITS[ecs.family])
                selection = select(self.zone.config, geo, family, location, health)
                if selection.outcome == "servfail":
                    response.flags &= ~dns.flags.AA
                    response.set_rcode(dns.rcode.SERVFAIL)
                elif selection.outcome == "refused":
                    response.flags &= ~dns.flags.AA
                    response.set_rcode(dns.rcode.REFUSED)
                elif selection.outcome == "answer" and selection.addresses(family):
                    rdtype = wire.TYPE_A if family == 4 else wire.TYPE_AAAA
                    response.answer.append(
                        self._address_rrset(
                            qname, rdtype, selection.ttl, selection.addresses(family)
                        )
                    )
                    targets = tuple(t.name for t in selection.chosen)
                elif qtype == wire.TYPE_ANY:
                    response.answer.append(self._hinfo(qname))
            else:
                self._static(response, qname, key, qtype)
            if response.rcode() == dns.rcode.NOERROR and not response.answer:
                response.authority.append(self._soa_rrset(self.zone.negative_ttl))

        if edns is not None:
            options: list[dns.edns.Option] = []
            if edns.ecs is not None:
                options.append(
                    dns.edns.ECSOption(str(edns.ecs.ip()), edns.ecs.source_prefix, scope)
                )
            response.use_edns(
                0, dns.flags.DO if edns.do_bit else 0, self.zone.max_udp_payload, options=options
            )
        return self._finish(response, query, tcp, ecs_present, targets, country)

    def _finish(
        self,
        response: dns.message.Message,
        query: Query,
        tcp: bool,
        ecs_present: bool,
        targets: tuple[str, ...],
        country: str | None = None,
    ) -> Reply:
        limit = _udp_limit(query, tcp, self.zone.max_udp_payload)
        truncated = False
        # No shuffling: addresses go nearest target first, as the fast path memoizes them.
        try:
            data = response.to_wire(max_size=limit, want_shuffle=False)
        except dns.exception.TooBig:
            response.answer, response.authority, response.additional = [], [], []
            response.flags |= dns.flags.TC
            truncated = True
            targets = ()
            data = response.to_wire(max_size=limit, want_shuffle=False)
        return Reply(
            data,
            query.qtype,
            response.rcode(),
            truncated,
            ecs_present,
            False,
            targets,
            country=country,
        )

    def _static(
        self, response: dns.message.Message, qname: dns.name.Name, key: bytes, qtype: int
    ) -> None:
        """Answers that do not depend on the client: apex SOA/NS, glue addresses, ANY."""
        apex = key == self._origin_key
        glue = self.zone.glue.get(key)
        if apex and qtype in (wire.TYPE_SOA, wire.TYPE_ANY):
            response.answer.append(self._soa_rrset(self.zone.static_ttl, qname))
        elif apex and qtype == wire.TYPE_NS:
            response.answer.append(
                dns.rrset.from_rdata_list(
                    qname,
                    self.zone.static_ttl,
                    [
                        dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.NS, ns.to_text())
                        for ns in self.zone.ns
                    ],
                )
            )
            for ns in self.zone.ns:
                ns_glue = self.zone.glue.get(name_key(ns))
                if ns_glue is not None:
                    if ns_glue.ipv4:
                        response.additional.append(
                            self._address_rrset(ns, wire.TYPE_A, self.zone.static_ttl, ns_glue.ipv4)
                        )
                    if ns_glue.ipv6:
                        response.additional.append(
                            self._address_rrset(
                                ns, wire.TYPE_AAAA, self.zone.static_ttl, ns_glue.ipv6
                            )
                        )
        elif glue is not None and qtype in (wire.TYPE_A, wire.TYPE_AAAA, wire.TYPE_ANY):
            if qtype == wire.TYPE_ANY:
                qtype = wire.TYPE_A if glue.ipv4 else wire.TYPE_AAAA
            addresses = glue.ipv4 if qtype == wire.TYPE_A else glue.ipv6
            if addresses:
                response.answer.append(
                    self._address_rrset(qname, qtype, self.zone.static_ttl, addresses)
                )
        elif qtype == wire.TYPE_ANY:
            response.answer.append(self._hinfo(qname))

    def _soa_rrset(self, ttl: int, owner: dns.name.Name | None = None) -> dns.rrset.RRset:
        return dns.rrset.from_rdata_list(owner or self.zone.origin, ttl, [self.zone.soa])

    @staticmethod
    def _address_rrset(
        owner: dns.name.Name, rdtype: int, ttl: int, addresses: tuple[IPAddress, ...]
    ) -> dns.rrset.RRset:
        return dns.rrset.from_rdata_list(
            owner,
            ttl,
            [dns.rdata.from_text(dns.rdataclass.IN, _rdtype(rdtype), str(a)) for a in addresses],
        )

    @staticmethod
    def _hinfo(owner: dns.name.Name) -> dns.rrset.RRset:
        # RFC 8482 section 4.2: a synthesized HINFO with CPU "RFC8482" and an empty OS.
        hinfo = dns.rdtypes.ANY.HINFO.HINFO(  # type: ignore[no-untyped-call]
            dns.rdataclass.IN, dns.rdatatype.HINFO, b"RFC8482", b""
        )
        return dns.rrset.from_rdata_list(owner, _HINFO_TTL, [hinfo])


def _hinfo_record() -> bytes:
    """The RFC 8482 HINFO record, owned by the question (a pointer to offset 12)."""
    return (
        b"\xc0\x0c"
        + _RR_FIXED.pack(wire.TYPE_HINFO, wire.CLASS_IN, _HINFO_TTL, len(_HINFO_RDATA))
        + _HINFO_RDATA
    )


def truncate_for_slip(reply: bytes) -> bytes:
    """A rate-limited client's "slip" answer: header and question only, TC set (BIND RRL).

    A legitimate client retries over TCP; a spoofed victim receives no amplification."""
    ident, flags, qdcount, _, _, _ = wire.HEADER.unpack_from(reply)
    end = 12
    if qdcount:
        while reply[end]:
            end += 1 + reply[end]
        end += 5
    return wire.HEADER.pack(ident, flags | wire.FLAG_TC, min(qdcount, 1), 0, 0, 0) + reply[12:end]


def slip_for_query(query: bytes) -> bytes | None:
    """A "slip" answer built from the query alone, for a query limited before anything was
    computed: the header (QR and TC set, opcode and RD as asked, no records) and the question
    as sent - never longer than the query.  None when there is no plain question to echo
    (then nothing is sent: a malformed query earns no reply from a limited network)."""
    size = len(query)
    if size < 17 or query[4:6] != b"\x00\x01" or query[2] & 0x80:
        return None
    offset = 12
    while True:
        if offset >= size:
            return None
        length = query[offset]
        if not length:
            break
        if length > 63:
            return None
        offset += 1 + length
    end = offset + 5
    if end - 16 > wire.MAX_NAME_WIRE or end > size:
        return None
    ident, flags = struct.unpack_from("!HH", query)
    flags = wire.FLAG_QR | wire.FLAG_TC | (flags & (0x7800 | wire.FLAG_RD))
    return wire.HEADER.pack(ident, flags, 1, 0, 0, 0) + query[12:end]


def _map_key(locator: GeoLocator, zone: Zone) -> tuple[object, ...]:
    """Everything :func:`build_address_map` reads: the database file (by identity, so a file
    replaced or rewritten on disk is walked again), the default placement and the overrides
    (where placements come from), the residency rules and what signatures read of the target
    sets (kinds, names and places; not addresses, TTLs or health: those are compiled later)."""
    default = locator.default_placement
    return (
        locator.identity,
        (default.lat, default.lon, default.country, default.continent),
        zone.config.geo.overrides,
        zone.config.residency,
        tuple(dict.fromkeys(group_key(geo.targets) for geo in zone.geo_names.values())),
    )


def _address_map(locator: GeoLocator, zone: Zone) -> tuple[AddressMap, bool]:
    """The zone's address map over the locator's database, and whether it was reused (built
    once per database, overrides and targets while any responder uses it)."""
    key = _map_key(locator, zone)
    address_map = _MAPS.get(key)
    reused = address_map is not None
    if address_map is None:
        _last_map.clear()  # not needed for the build: its memory may be reused by it
        # Settled once the walk of the database (the argument) is freed: see settled().
        address_map = settled(
            build_address_map(
                locator, locator.tree_ranges(), zone.config, list(zone.geo_names.values())
            )
        )
        _MAPS[key] = address_map
    _last_map[:] = [address_map]
    return address_map, reused


def forget_address_maps() -> None:
    """Build the next address map anew (for tests comparing a reused map with a fresh one)."""
    _MAPS.clear()
    _last_map.clear()
