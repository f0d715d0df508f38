"""What a client's request may become at the edge: the one place that decides it.

Pure functions, called once per request head (``edge.protocol``) and once per upstream request
(``edge.pipeline``, ``edge.websocket``):

* ``decide_target``: the request-target (RFC 9112 3.2) reduced to origin form, the path used
  for routing, and THE host: validated (RFC 9110 7.2 / RFC 3986 3.2.2) and normalised (lower
  case, no trailing dot, no default port).  With an absolute-form target the URI's authority
  is the host and the Host header is ignored (RFC 9112 3.2.2).  Routing, the cache key, the
  forwarded ``Host`` and ``X-Forwarded-Host`` all read this one value: ``screen_headers``
  writes it into the request's Host line, so nothing downstream can see another spelling.
* ``screen_headers``: the request's header list as the edge will use it -- for the cache key
  and Vary *and* for the upstream request, so both always see the same headers.  Names with
  an underscore are dropped (nginx's ``underscores_in_headers off``; CGI/WSGI origins read
  ``X_Forwarded_For`` as ``X-Forwarded-For``), and underscore spellings of framing or routing
  fields are refused.  Headers nominated by ``Connection`` are removed here, once, rather
  than only from the upstream copy: removing them from the upstream request alone let
  ``Connection: x-lang`` fill the entry of the client's X-Lang variant with the default
  answer.  ``Connection`` may not nominate Host or Content-Length (400).
* ``check_trailer``: chunked trailer fields are never merged into the headers (RFC 9110
  6.5.1); fields that could only be an attack there (framing, routing, credentials, the
  forwarding headers) make the request a 400.
* ``forward_headers``: the upstream request headers: hop-by-hop and ``Proxy-*`` removed,
  X-Forwarded-For/-Proto/-Host and Via set, headers that rewrite the target or the host at
  common origins (X-Original-URL, X-Host, ``Forwarded``, ...) dropped unless a trusted proxy
  sent them, and on cache fills dropped always (they are not in the key).

Everything a hostile client can get wrong here is a ``RequestRejected`` (400, connection
closed, nothing forwarded).
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address
from typing import Final, NamedTuple

from edge.http1 import (
    HOP_BY_HOP,
    ForwardingContext,
    Headers,
    RequestRejected,
    connection_tokens,
    via_value,
)
from edge.memos import HOSTS, BoundedMemo

#: The only URI schemes an HTTP proxy's absolute-form target may carry.
SCHEMES: Final = {b"http": b"80", b"https": b"443"}
#: RFC 1035 bounds a name at 253 characters (plus the trailing dot); a port adds 6.
MAX_HOST: Final = 262

_REG_NAME: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")
_DIGITS: Final = frozenset(b"0123456789")
_IPV6_CHARS: Final = frozenset(b"0123456789abcdefABCDEF:.")

#: Connection may not nominate these: the request could then no longer be routed, keyed or
#: framed as it was validated.
CONNECTION_PROTECTED: Final = frozenset({b"host", b"content-length"})
#: Connection options that name no header of their own here.
_CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})

#: Underscore spellings of these fields are refused rather than dropped: a client sends
#: ``Transfer_Encoding`` or ``Content_Length`` only to find a parser that reads it.
UNDERSCORE_REFUSED: Final = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"upgrade",
        b"te",
        b"trailer",
        b"expect",
    }
)

#: Trailer fields that are only ever an attack (RFC 9110 6.5.1: framing, routing, request
#: modifiers, authentication, and this edge's forwarding headers): the request is refused.
FORBIDDEN_TRAILERS: Final = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"content-encoding",
        b"content-type",
        b"content-range",
        b"trailer",
        b"te",
        b"connection",
        b"keep-alive",
        b"upgrade",
        b"expect",
        b"authorization",
        b"proxy-authorization",
        b"cookie",
        b"cache-control",
        b"pragma",
        b"range",
        b"max-forwards",
        b"forwarded",
        b"via",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-original-url",
        b"x-rewrite-url",
        b"x-http-method-override",
    }
)

#: Request headers that make common origins serve another path or host, or believe another
#: client or scheme (routing decided by the edge would no longer hold).  From an untrusted
#: client they are never forwarded; a trusted proxy's pass through on uncached requests.
ROUTING_OVERRIDES: Final = frozenset(
    {
        b"x-original-url",
        b"x-rewrite-url",
        b"x-original-host",
        b"x-host",
        b"x-forwarded-scheme",
        b"x-forwarded-server",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-ssl",
        b"front-end-https",
        b"forwarded",
    }
)
#: Never sent on a cache fill, whoever sent them: not in the key, and known to change the
#: response (the routing overrides, plus method overrides).
UNKEYED_DROPPED_ON_FILL: Final = ROUTING_OVERRIDES | {
    b"x-http-method-override",
    b"x-http-method",
    b"x-method-override",
}


class Target(NamedTuple):
    """The request-target as the edge uses it everywhere."""

    #: Origin form (``/path?query``), bytes as received: what is keyed and forwarded.
    target: bytes
    #: The path alone, for routing.
    path: str
    #: The normalised host (``api.test``, ``api.test:8080``, ``[::1]``); None only for an
    #: HTTP/1.0 request without Host and with an origin-form target.
    host: bytes | None


# --------------------------------------------------------------------------------------------
# Host


#: ``edge.memos.HOSTS``: Host values seen -> their verdict (a request head is parsed per
#: connection chunk, and a handful of Host spellings cover nearly all of them).
_HOST_MEMO: BoundedMemo[tuple[bytes, bytes], bytes | None] = BoundedMemo(HOSTS)


def parse_host(value: bytes, scheme: bytes = b"http") -> bytes | None:
    """``_parse_host``, memoised."""
    memo_key = (value, scheme)
    try:
        return _HOST_MEMO[memo_key]
    except KeyError:
        pass
    host = _parse_host(value, scheme)
    if len(_HOST_MEMO) >= _HOST_MEMO.bound:
        _HOST_MEMO.clear()
    _HOST_MEMO[memo_key] = host
    return host


def _parse_host(value: bytes, scheme: bytes) -> bytes | None:
    """The normalised host of a Host header or URI authority, or None when it is invalid.

    RFC 3986 host (reg-name, IPv4address, IP-literal) and an optional port of at most five
    digits (<= 65535).  Stricter than RFC 3986 where only attacks differ: a reg-name may hold
    letters, digits, ``-``, ``.`` and ``_`` only (no percent-encoding, no sub-delims, so no
    ``/``, ``@``, ``,`` or spaces), no empty label, no IPvFuture or zone IDs.  Normalised:
    lower case, the trailing dot and the scheme's default port removed, leading zeros of the
    port dropped.
    """
    if not value or len(value) > MAX_HOST:
        return None
    if value[:1] == b"[":
        end = value.find(b"]")
        if end < 0:
            return None
        literal, rest = value[1:end], value[end + 1 :]
        if not _IPV6_CHARS.issuperset(literal):
            return None  # no zone IDs (``%25eth0``), no IPvFuture
        try:
            IPv6Address(literal.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return None
        name = b"[" + literal.lower() + b"]"
    else:
        colon = value.find(b":")
        name, rest = (value, b"") if colon < 0 else (value[:colon], value[colon:])
        if not name or not _REG_NAME.issuperset(name):
            return None
        name = name.lower()
        if name.endswith(b"."):
            name = name[:-1]
        if not name or b".." in name or name.startswith(b"."):
            return None
        if _looks_numeric(name):
            # All-numeric names are IPv4 addresses: only the dotted-quad form (no 0x, no
            # octal, no shortened forms an origin might read as another address).
            try:
                IPv4Address(name.decode("ascii"))
            except ValueError:
                return None
    if rest:
        if rest[:1] != b":":
            return None
        port = rest[1:]
        if port:
            if len(port) > 5 or not _DIGITS.issuperset(port) or int(port) > 65535:
                return None
            port = port.lstrip(b"0") or b"0"
            if port != SCHEMES.get(scheme):
                return name + b":" + port
    return name


def _looks_numeric(name: bytes) -> bool:
    last = name.rsplit(b".", 1)[-1]
    return bool(last) and (
        _DIGITS.issuperset(last) or (last[:2] in (b"0x", b"0X") and len(last) > 2)
    )


# --------------------------------------------------------------------------------------------
# Request-target


def decide_target(url: bytes, host_header: bytes | None, http_version: str) -> Target:
    """The origin-form target, routing path and normalised host of one request.

    ``host_header``: the (single) Host header's value, or None.  Raises ``RequestRejected``
    (400) for an invalid Host, a missing Host on HTTP/1.1, an absolute-form target with a
    scheme other than http/https or with userinfo, an asterisk- or authority-form target, and
    a target the origin could read as another path than the edge routes and keys
    (``check_path``).
    """
    header_host: bytes | None = None
    if host_header is not None:
        header_host = parse_host(host_header.strip())
        if header_host is None:
            raise RequestRejected(400, "invalid_host")
    elif http_version == "1.1":
        raise RequestRejected(400, "missing_host")
    if url[:1] == b"/":
        check_path(url)
        return Target(url, path_of(url), header_host)
    if url == b"*":
        raise RequestRejected(400, "asterisk_form")
    scheme_end = url.find(b"://")
    if scheme_end < 0:
        raise RequestRejected(400, "invalid_target")
    scheme = url[:scheme_end].lower()
    if scheme not in SCHEMES:
        raise RequestRejected(400, "unsupported_scheme")
    rest = url[scheme_end + 3 :]
    cut = len(rest)
    for stop in (b"/", b"?", b"#"):
        index = rest.find(stop)
        if 0 <= index < cut:
            cut = index
    authority, target = rest[:cut], rest[cut:]
    if b"@" in authority:
        raise RequestRejected(400, "userinfo_in_target")  # RFC 9110 4.2.4
    # The edge serves one scheme: the authority is normalised as the client's connection
    # (http) sees it, so http://h:80/ and http://h/ are one host, and https://h/ is h:443.
    host = parse_host(authority, b"http")
    if host is None:
        raise RequestRejected(400, "invalid_host")
    if scheme == b"https" and host.endswith(b":443"):
        host = host[:-4]
    if not target or target[:1] == b"?":
        target = b"/" + target
    check_path(target)
    return Target(target, path_of(target), host)


def path_of(target: bytes) -> str:
    """The routing path of an origin-form target (without its query)."""
    return target.split(b"?", 1)[0].decode("latin-1")


_DOT_SEGMENTS: Final = (b".", b"..", b"%2e", b"%2e%2e", b".%2e", b"%2e.")
#: Raw controls, space, DEL and backslash; encoded NUL and backslash.
_BAD_PATH: Final = re.compile(rb"[\x00-\x20\x7f\\]|%(?:00|5c)", re.IGNORECASE)


def check_path(target: bytes) -> None:
    """Refuse origin-form targets the origin may read as another resource than the edge keys
    and routes: a fragment (never part of a request-target; the key drops it, an origin may
    not), dot-segments raw or percent-encoded (``/ticker/../orders``: routed and keyed by the
    raw path, served by the normalised one), an encoded NUL or backslash (truncation and
    ``\\``-as-``/`` at some origins), and raw controls or spaces."""
    if b"#" in target:
        raise RequestRejected(400, "fragment_in_target")
    path = target.split(b"?", 1)[0]
    if _BAD_PATH.search(path) is not None:
        raise RequestRejected(400, "invalid_target")
    if b"." in path or b"%" in path:
        for segment in path.lower().split(b"/"):
            if segment in _DOT_SEGMENTS:
                raise RequestRejected(400, "dot_segment_in_target")


# --------------------------------------------------------------------------------------------
# Request headers


def screen_headers(headers: Headers, host: bytes | None) -> Headers:
    """The request's headers as the edge uses them (for the key and Vary, and upstream).

    The Host line carries ``host`` (the decided host; added for an absolute-form target on
    HTTP/1.0 without Host); names with an underscore are dropped (the framing and routing
    ones refused); headers named by Connection are removed (Connection may not name Host or
    Content-Length).  Returns ``headers`` itself when nothing changes.
    """
    nominated = connection_tokens(headers) - _CONNECTION_OPTIONS
    if nominated & CONNECTION_PROTECTED:
        raise RequestRejected(400, "connection_nominates_protected")
    out: Headers = []
    changed = False
    saw_host = False
    for name, value in headers:
        if b"_" in name:
            if name.replace(b"_", b"-") in UNDERSCORE_REFUSED:
                raise RequestRejected(400, "underscore_in_header_name")
            changed = True
            continue
        if name in nominated and name not in HOP_BY_HOP:
            changed = True
            continue
        if name == b"host":
            saw_host = True
            if host is not None and value != host:
                value = host
                changed = True
        out.append((name, value))
    if host is not None and not saw_host:
        out.append((b"host", host))
        changed = True
    return out if changed else headers


def check_trailer(name: bytes) -> None:
    """A chunked trailer field (lower-case name): refused when it could only be an attack;
    otherwise the caller drops it (trailers never join the header section)."""
    if name in FORBIDDEN_TRAILERS or b"_" in name:
        raise RequestRejected(400, "forbidden_trailer")


#: What ``forward_headers`` never sends on (besides ``Proxy-*``, names with ``_`` and those
#: Connection names): hop-by-hop fields and Expect, plus for an untrusted client
#: ``ROUTING_OVERRIDES``, for a fill ``UNKEYED_DROPPED_ON_FILL``.
_SKIPPED_TRUSTED: Final = HOP_BY_HOP | {b"expect"}
_SKIPPED: Final = _SKIPPED_TRUSTED | ROUTING_OVERRIDES
_SKIPPED_ON_FILL: Final = _SKIPPED_TRUSTED | UNKEYED_DROPPED_ON_FILL
#: The fields of earlier hops ``forward_headers`` extends or replaces.
_FOR, _PROTO, _FORWARDED_HOST, _VIA = range(4)
_PRIOR_HOPS: Final = {
    b"x-forwarded-for": _FOR,
    b"x-forwarded-proto": _PROTO,
    b"x-forwarded-host": _FORWARDED_HOST,
    b"via": _VIA,
}


def forward_headers(
    headers: Headers,
    ctx: ForwardingContext,
    *,
    keep_upgrade: bool = False,
    fill: bool = False,
) -> Headers:
    """The headers sent upstream for a screened request (``screen_headers``).

    Hop-by-hop and ``Proxy-*`` fields removed (including any named by Connection), Expect
    answered by the edge and never forwarded, X-Forwarded-For/-Proto/-Host and Via set: from
    an untrusted client replaced (X-Forwarded-Host is the decided Host), from a trusted proxy
    extended (For) or kept (Proto, Host).  ``ROUTING_OVERRIDES`` are dropped unless a trusted
    proxy sent them; with ``fill`` (a cache fill) ``UNKEYED_DROPPED_ON_FILL`` are dropped from
    everyone.  ``keep_upgrade`` keeps ``Connection: upgrade`` and ``Upgrade`` for a WebSocket
    handshake.  Names with an underscore never pass (``screen_headers`` already dropped them;
    this is the last line).
    """
    named = connection_tokens(headers)
    if keep_upgrade:
        named = named - {b"upgrade"}
    trusted = ctx.trusted
    # Hop-by-hop, Expect, and what this kind of request drops: one set (``_SKIPPED``).
    skipped = _SKIPPED_ON_FILL if fill else (_SKIPPED_TRUSTED if trusted else _SKIPPED)
    request_id_header = ctx.request_id_header
    out: Headers = []
    prior_for: list[bytes] = []
    prior_proto: bytes | None = None
    prior_host: bytes | None = None
    host: bytes | None = None
    prior_via: list[bytes] = []
    for name, value in headers:
        if keep_upgrade and name == b"upgrade":
            out.append((name, value))
            continue
        if name in skipped or name.startswith(b"proxy") or b"_" in name or name in named:
            continue
        prior = _PRIOR_HOPS.get(name)
        if prior is not None:
            if prior == _FOR:
                prior_for.append(value)
            elif prior == _PROTO:
                prior_proto = value
            elif prior == _FORWARDED_HOST:
                prior_host = value
            else:
                prior_via.append(value)
            continue
        if name == request_id_header:
            continue
        if name == b"host":
            host = value
        out.append((name, value))
    client = ctx.client_ip.encode()
    if trusted and prior_for:
        out.append((b"x-forwarded-for", b", ".join([*prior_for, client])))
    else:
        out.append((b"x-forwarded-for", client))
    proto = prior_proto if trusted and prior_proto is not None else ctx.scheme
    out.append((b"x-forwarded-proto", proto))
    forwarded_host = prior_host if trusted and prior_host is not None else host
    if forwarded_host is not None:
        out.append((b"x-forwarded-host", forwarded_host))
    via = via_value(ctx.http_version, ctx.pop)
    out.append((b"via", b", ".join([*prior_via, via]) if prior_via else via))
    out.append((ctx.request_id_header, ctx.request_id))
    if keep_upgrade:
        out.append((b"connection", b"upgrade"))
    return out


__all__ = [
    "CONNECTION_PROTECTED",
    "FORBIDDEN_TRAILERS",
    "ROUTING_OVERRIDES",
    "UNKEYED_DROPPED_ON_FILL",
    "Target",
    "check_path",
    "check_trailer",
    "decide_target",
    "forward_headers",
    "parse_host",
    "path_of",
    "screen_headers",
]
