"""What a client of ``meridian world`` does: ask a GeoDNS with its resolver's ECS subnet, and
fetch over a fresh TCP connection timing the first byte.  Bounded reads throughout: a reply
is at most ``MAX_HEAD`` bytes of head and ``MAX_BODY`` of body, and every step has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass

import dns.asyncquery
import dns.edns
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype

from meridian.config import HostPort, IPNetwork

MAX_HEAD = 16 * 1024
MAX_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    #: The A records answered (empty: NODATA or an error, see ``rcode``).
    addresses: tuple[str, ...]
    rcode: str
    ttl: int | None
    error: str | None = None


async def resolve(server: HostPort, name: str, subnet: IPNetwork, within: float = 1.0) -> DnsAnswer:
    """One A query for ``name`` to ``server`` carrying ``subnet`` as ECS."""
    query = dns.message.make_query(
        name,
        dns.rdatatype.A,
        use_edns=0,
        options=[dns.edns.ECSOption(str(subnet.network_address), subnet.prefixlen)],
    )
    try:
        reply = await dns.asyncquery.udp(query, server.host, timeout=within, port=server.port)
    except (dns.exception.DNSException, OSError) as exc:
        return DnsAnswer((), "", None, f"{type(exc).__name__}: {exc}")
    addresses: list[str] = []
    ttl: int | None = None
    for rrset in reply.answer:
        if rrset.rdtype == dns.rdatatype.A:
            addresses.extend(r.address for r in rrset)
            ttl = rrset.ttl
    return DnsAnswer(tuple(addresses), dns.rcode.to_text(reply.rcode()), ttl)


@dataclass(frozen=True, slots=True)
class Fetch:
    ok: bool
    status: int | None
    #: Seconds from starting to connect to the first byte of the response.
    ttfb: float | None
    total: float
    #: Who served it (``X-Origin-Region``) and the cache's verdict (``X-Cache``), if said.
    region: str | None = None
    cache: str | None = None
    error: str | None = None


async def fetch(
    target: HostPort,
    host: str,
    path: str,
    within: float = 5.0,
    tls: ssl.SSLContext | None = None,
) -> Fetch:
    """GET ``path`` over a new connection to ``target`` (``Host: host``), closing it after;
    over TLS with ``tls`` (SNI ``host``)."""
    started = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(
                target.host,
                target.port,
                ssl=tls,
                server_hostname=host if tls is not None else None,
            )
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: meridian-world\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            first = await reader.read(1)
            if not first:
                return Fetch(False, None, None, time.perf_counter() - started, error="closed")
            ttfb = time.perf_counter() - started
            head = first + await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_HEAD:
                raise ValueError("response head too large")
            status, headers = _parse_head(head)
            length = int(headers.get("content-length", "0") or 0)
            if length > MAX_BODY:
                raise ValueError("response body too large")
            await reader.readexactly(length)
            return Fetch(
                200 <= status < 400,
                status,
                ttfb,
                time.perf_counter() - started,
                headers.get("x-origin-region"),
                headers.get("x-cache"),
            )
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
        reason = "timeout" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        return Fetch(False, None, None, time.perf_counter() - started, error=reason)
    except asyncio.LimitOverrunError:
        return Fetch(False, None, None, time.perf_counter() - started, error="head too large")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"bad status line {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


__all__ = ["DnsAnswer", "Fetch", "fetch", "resolve"]
