"""The whole authoritative server as one function: query wire in, reply wire out.

Like dnspython's ``nanonameserver`` there is no I/O here: the asyncio shells in ``server.py`` read
datagrams, call :meth:`Responder.respond`, send the bytes and count what :class:`Reply` says.

Two paths give byte-for-byte equal replies (hypothesis checks it):

* fast: "one A/AAAA question for a geo name, maybe an OPT with ECS" - the hand parser's
  :class:`~geodns.wire.Query` is answered from memoized wire bytes keyed by (name, type, the
  client's location network, health generation); only the header, the echoed question and the
  OPT (ECS scope) are assembled per query.
* slow: everything else goes through dnspython message objects and its renderer.

Both paths share the strict parser (:func:`~geodns.wire.parse_query`) for FORMERR decisions and
the pure :func:`~geodns.selection.select` for the answer.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

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
from geodns.selection import HealthView, Selection, select
from geodns.wire import Query, WireError
from geodns.zone import GeoName, IPAddress, Zone, name_key
from meridian.geo import ClientLocation

Locate = Callable[[IPAddress], ClientLocation]

_RR_FIXED = struct.Struct("!HHIH")
_SOA_NUMBERS = struct.Struct("!IIIII")
FAMILY_OF_QTYPE = {wire.TYPE_A: 4, wire.TYPE_AAAA: 6}
#: Memoized bodies kept before the table is simply emptied (a fresh start is cheap).
MEMO_LIMIT = 200_000


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


@dataclass(frozen=True, slots=True)
class _Body:
    """Everything of a fast-path reply that does not depend on the query's ID, case or ECS."""

    flags: int
    rcode: int
    ancount: int
    nscount: int
    sections: bytes
    targets: tuple[str, ...]


def _rdtype(value: int) -> dns.rdatatype.RdataType:
    return dns.rdatatype.RdataType.make(value)


def _wire_name(name: dns.name.Name) -> bytes:
    data = name.to_wire()
    assert data is not None
    return data


def _scope(query: Query, location: ClientLocation) -> int:
    """RFC 7871 SCOPE PREFIX-LENGTH: the prefix over which the answer holds (the located
    network, never wider); 0 when the client asked us not to use its subnet (source 0)."""
    ecs = query.edns.ecs if query.edns is not None else None
    if ecs is None or ecs.source_prefix == 0:
        return 0
    network = location.network
    if ecs.family == 2 and network.version == 4:  # an IPv4-mapped IPv6 subnet
        return min(128, 96 + network.prefixlen)
    return min(wire.FAMILY_BITS[ecs.family], network.prefixlen)


def _client_address(query: Query, source: IPAddress) -> IPAddress:
    ecs = query.edns.ecs if query.edns is not None else None
    if ecs is None or ecs.source_prefix == 0:
        return source
    return ecs.ip()


def _udp_limit(query: Query, tcp: bool, ours: int) -> int:
    if tcp:
        return 65535
    if query.edns is None:
        return 512
    return min(query.edns.payload, ours)


class Responder:
    """Answers for one config snapshot; build a new one on reload (its memo goes with it)."""

    def __init__(self, zone: Zone, locate: Locate) -> None:
        self.zone = zone
        self.locate = locate
        self._origin_key = name_key(zone.origin)
        self._memo: dict[tuple[object, ...], _Body] = {}
        self._memo_generation = -1
        #: (query bytes after the ID, client, transport) -> reply: a hit skips even parsing.
        self._replies: dict[tuple[bytes, IPAddress, bool], Reply] = {}
        self._soa_labels = {
            "owner": wire.name_labels(name_key(zone.origin)),
            "mname": wire.name_labels(_wire_name(zone.soa.mname)),
            "rname": wire.name_labels(_wire_name(zone.soa.rname)),
        }

    # ---------------------------------------------------------------------------------- entry

    def respond(
        self, data: bytes, source: IPAddress, *, tcp: bool, health: HealthView
    ) -> Reply | None:
        """The reply to ``data`` from ``source``, or None when nothing must be sent."""
        generation = health.generation
        if generation != self._memo_generation:
            self._memo.clear()
            self._replies.clear()
            self._memo_generation = generation
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
            )
        reply = self._respond(data, source, tcp, health, allow_fast=True)
        if reply is not None and reply.reusable:
            if len(self._replies) > MEMO_LIMIT:
                self._replies.clear()
            self._replies[key] = reply
        return reply

    def respond_slow(
        self, data: bytes, source: IPAddress, *, tcp: bool, health: HealthView
    ) -> Reply | None:
        """Same as :meth:`respond` but never the fast path (for the equivalence tests)."""
        return self._respond(data, source, tcp, health, allow_fast=False)

    def _respond(
        self, data: bytes, source: IPAddress, tcp: bool, health: HealthView, allow_fast: bool
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
            if allow_fast:
                reply = self._fast(query, source, tcp, health)
                if reply is not None:
                    return reply
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

    def _fast(self, query: Query, source: IPAddress, tcp: bool, health: HealthView) -> Reply | None:
        family = FAMILY_OF_QTYPE.get(query.qtype)
        if family is None or query.qclass != wire.CLASS_IN or not query.only_question_and_opt:
            return None
        edns = query.edns
        if edns is not None and (edns.version != 0 or edns.other_options):
            return None
        geo = self.zone.geo_names.get(query.qname_key)
        if geo is None:
            return None
        location = self.locate(_client_address(query, source))
        if health.generation != self._memo_generation or len(self._memo) > MEMO_LIMIT:
            self._memo.clear()
            self._replies.clear()
            self._memo_generation = health.generation
        # Keyed by what selection reads (not the network: only the echoed ECS scope needs that),
        # so all networks of one country share an entry with a country database.
        key = (
            query.qname_key,
            query.qtype,
            location.lat,
            location.lon,
            location.country,
            location.continent,
            location.pop,
            location.region,
        )
        body = self._memo.get(key)
        reusable = body is not None
        if body is None:
            selection = select(self.zone.config, geo, family, location, health)
            body = self._render_body(query, geo, family, selection)
            if not selection.ttl_shortened:
                self._memo[key] = body
                reusable = True

        flags = body.flags | (query.flags & wire.FLAG_RD)
        opt = b""
        if edns is not None:
            options = b"" if edns.ecs is None else edns.ecs.option(_scope(query, location))
            opt = wire.opt_record(self.zone.max_udp_payload, edns.do_bit, body.rcode, options)
        arcount = 1 if opt else 0
        question = query.question
        limit = _udp_limit(query, tcp, self.zone.max_udp_payload)
        if 12 + len(question) + len(body.sections) + len(opt) > limit:
            header = wire.HEADER.pack(query.id, flags | wire.FLAG_TC, 1, 0, 0, arcount)
            return Reply(
                header + question + opt,
                query.qtype,
                body.rcode,
                True,
                edns is not None and edns.ecs is not None,
                True,
                reusable=reusable,
            )
        header = wire.HEADER.pack(query.id, flags, 1, body.ancount, body.nscount, arcount)
        return Reply(
            header + question + body.sections + opt,
            query.qtype,
            body.rcode,
            False,
            edns is not None and edns.ecs is not None,
            True,
            body.targets,
            reusable=reusable,
        )

    def _render_body(self, query: Query, geo: GeoName, family: int, selection: Selection) -> _Body:
        if selection.outcome == "servfail":
            return _Body(wire.FLAG_QR | wire.RCODE_SERVFAIL, wire.RCODE_SERVFAIL, 0, 0, b"", ())
        if selection.outcome == "refused":
            return _Body(wire.FLAG_QR | wire.RCODE_REFUSED, wire.RCODE_REFUSED, 0, 0, b"", ())
        flags = wire.FLAG_QR | wire.FLAG_AA
        # Offsets inside the body are absolute: the question always starts at 12.
        start = 12 + len(query.question)
        out = bytearray(start)
        addresses = list(dict.fromkeys(selection.addresses(family)))  # an RRset has no dups
        if selection.outcome == "answer" and addresses:
            for address in addresses:
                packed = address.packed
                out += (
                    b"\xc0\x0c"
                    + _RR_FIXED.pack(query.qtype, wire.CLASS_IN, selection.ttl, len(packed))
                    + packed
                )
            return _Body(
                flags,
                wire.RCODE_NOERROR,
                len(addresses),
                0,
                bytes(out[start:]),
                tuple(t.name for t in selection.chosen),
            )
        compressor = wire.Compressor()
        compressor.remember(wire.name_labels(query.qname_key), 12)
        self._write_soa(out, compressor)
        return _Body(flags, wire.RCODE_NOERROR, 0, 1, bytes(out[start:]), ())

    def _write_soa(self, out: bytearray, compressor: wire.Compressor) -> None:
        soa = self.zone.soa
        compressor.write(out, self._soa_labels["owner"])
        out += _RR_FIXED.pack(wire.TYPE_SOA, wire.CLASS_IN, self.zone.negative_ttl, 0)
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
                location = self.locate(_client_address(query, source))
                scope = _scope(query, location)
                if family is None:  # ANY: one RRset (RFC 8482), A if any candidate has IPv4
                    family = 4 if any(t.addresses_of(4) for t in geo.targets) else 6
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
        return self._finish(response, query, tcp, ecs_present, targets)

    def _finish(
        self,
        response: dns.message.Message,
        query: Query,
        tcp: bool,
        ecs_present: bool,
        targets: tuple[str, ...],
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
        return Reply(data, query.qtype, response.rcode(), truncated, ecs_present, False, targets)

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
        return dns.rrset.from_rdata_list(owner, 3600, [hinfo])


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
