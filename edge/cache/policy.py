"""HTTP caching rules for a shared cache (RFC 9111, RFC 5861), as pure functions.

Nothing here does I/O, logs or reads a clock: the current time is passed in as ``now`` (seconds
since the epoch, like ``time.time()``), so every rule can be tested exactly.  Headers are
``list[tuple[bytes, bytes]]`` (or any sequence of pairs) with lower-cased names.

Decisions worth knowing, where the RFCs leave a choice:

* Freshness order: ``s-maxage`` > ``max-age`` > ``Expires - Date`` > the route's ``ttl`` >
  10% of ``Date - Last-Modified`` (capped at ``HEURISTIC_CAP``).  The route's ttl is the
  operator's heuristic, so it replaces the Last-Modified guess: a ticker whose origin sends a
  day-old Last-Modified must still live one second.  Heuristics (either kind) apply only to
  statuses cacheable by default or responses marked ``public``.  ``force_ttl`` replaces the
  origin's freshness *and* its revalidation directives (no-cache, must-revalidate,
  proxy-revalidate) with the rule's ttl and stale windows, as Varnish's ``beresp.ttl`` does;
  privacy directives (no-store, private) always win.
* Stale windows: the origin's ``stale-while-revalidate`` / ``stale-if-error`` when present,
  otherwise the rule's.  ``no-cache``, ``must-revalidate`` and ``proxy-revalidate`` forbid stale
  serving altogether (RFC 9111 4.2.4).  ``s-maxage`` implies proxy-revalidate, so it cancels the
  rule's windows, but windows the origin sent next to it are an explicit grant and are kept.
* Duplicate directives: the first occurrence wins.  A malformed ``max-age``/``s-maxage`` value
  (``max-age=abc``, ``max-age =5``) makes the response stale (RFC 9111 4.2.1 allows that), and a
  malformed stale window is ignored; values past 2^31 are capped (RFC 9111 1.2.2).
* Qualified ``no-cache="f"`` / ``private="f"`` are treated as unqualified: stricter, and allowed.
* A request's ``no-cache`` or ``max-age=0`` forces revalidation (coalesced, so it cannot
  stampede the origin); ``stale-if-error`` still protects such a request when the origin fails.
* A request with ``Authorization`` is only served a stored response the origin marked shareable
  (``public``, ``s-maxage`` or ``must-revalidate``), not just stores under that rule (stricter
  than RFC 9111 3.5 requires: per-user content at a public URL is never served from cache).
"""

from __future__ import annotations

import calendar
import enum
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import formatdate, parsedate_tz
from functools import lru_cache
from typing import Final, NamedTuple
from urllib.parse import urljoin, urlsplit

from edge.memos import CACHE_CONTROL_PARSES, HTTP_DATES, TARGETED_CACHE_CONTROL_PARSES
from meridian.config import CacheRule

Header = tuple[bytes, bytes]
Headers = Sequence[Header]

#: RFC 9111 1.2.2: delta-seconds beyond what a cache can represent count as this.
DELTA_SECONDS_MAX: Final = 2147483648
#: Heuristic freshness from Last-Modified never exceeds this many seconds (a day, as Squid).
HEURISTIC_CAP: Final = 86400.0
#: Share of ``Date - Last-Modified`` used as heuristic freshness (RFC 9111 4.2.2).
HEURISTIC_FRACTION: Final = 0.1

#: RFC 9110 15.1 "heuristically cacheable" statuses.  206 is left out: partial content is
#: never stored here.
CACHEABLE_BY_DEFAULT: Final = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
#: Statuses whose caching requirements this cache implements, for ``must-understand`` (RFC 9111
#: 5.2.2.3): the heuristically cacheable ones plus the redirects and 304/206 it knows not to store.
UNDERSTOOD_STATUSES: Final = CACHEABLE_BY_DEFAULT | {206, 302, 303, 304, 307}
#: Upstream statuses that count as "the origin failed" for stale-if-error.
ERROR_STATUSES: Final = frozenset({500, 502, 503, 504})
SAFE_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})

#: Never stored nor merged from a 304: per-connection fields (RFC 9110 7.6.1) and fields the
#: cache recomputes for every response it writes.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
_NOT_STORED: Final = HOP_BY_HOP | {b"age", b"content-length", b"x-cache", b"surrogate-key"}
#: RFC 9111 3.2: a 304 never changes these; content-encoding/-range describe the body we kept.
#: Content-MD5 is a digest of the stored body (cache-tests 304-etag-update-response-Content-MD5).
#: Set-Cookie is merged only where the rule stores it (``merge_not_modified``).
_NOT_UPDATED_BY_304: Final = _NOT_STORED | {b"content-encoding", b"content-range", b"content-md5"}
#: Client conditionals the cache answers itself (RFC 9111 4.3.2) and so never forwards on a fill.
CONDITIONAL_REQUEST_HEADERS: Final = frozenset(
    {b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range"}
)


# --------------------------------------------------------------------------------------------
# Cache-Control


@dataclass(frozen=True, slots=True)
class CacheControl:
    """The Cache-Control directives a shared cache acts on, request and response alike."""

    max_age: int | None = None
    s_maxage: int | None = None
    no_store: bool = False
    no_cache: bool = False
    private: bool = False
    public: bool = False
    must_revalidate: bool = False
    proxy_revalidate: bool = False
    stale_while_revalidate: int | None = None
    stale_if_error: int | None = None
    #: Request only: ``max-stale`` without a value is ``DELTA_SECONDS_MAX`` (any staleness).
    max_stale: int | None = None
    min_fresh: int | None = None
    only_if_cached: bool = False
    #: Response only (RFC 9111 5.2.2.3): store only statuses the cache understands.
    must_understand: bool = False


NO_DIRECTIVES: Final = CacheControl()

_TCHAR: Final = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
_NUMERIC_STALE_IF_MALFORMED: Final = frozenset({"max-age", "s-maxage"})
_NUMERIC_IGNORED_IF_MALFORMED: Final = frozenset(
    {"stale-while-revalidate", "stale-if-error", "min-fresh", "max-stale"}
)
_BOOLEAN: Final = {
    "no-store": "no_store",
    "no-cache": "no_cache",
    "private": "private",
    "public": "public",
    "must-revalidate": "must_revalidate",
    "proxy-revalidate": "proxy_revalidate",
    "only-if-cached": "only_if_cached",
    "must-understand": "must_understand",
}
_NUMERIC_FIELD: Final = {
    "max-age": "max_age",
    "s-maxage": "s_maxage",
    "stale-while-revalidate": "stale_while_revalidate",
    "stale-if-error": "stale_if_error",
    "min-fresh": "min_fresh",
    "max-stale": "max_stale",
}


def split_directives(text: str) -> list[tuple[str, str | None, bool]]:
    """``(name, value, well_formed)`` for each list member of a Cache-Control value.

    Names are lower-cased; a quoted value is unquoted.  ``well_formed`` is False when the
    member breaks the RFC 9110 grammar around ``=`` (whitespace, an unterminated quote, junk
    after a quoted string, a non-token value).  Members whose name is not a token are dropped.
    Never raises, whatever the input.
    """
    result: list[tuple[str, str | None, bool]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t,":
            i += 1
        if i >= n:
            break
        start = i
        while i < n and text[i] not in ",=":
            i += 1
        raw_name = text[start:i]
        name = raw_name.strip(" \t").lower()
        well_formed = True
        value: str | None = None
        if i < n and text[i] == "=":
            # "max-age =5" is not the grammar; whitespace is only allowed around commas.
            well_formed = raw_name == raw_name.rstrip(" \t")
            i += 1
            if i < n and text[i] == '"':
                i += 1
                chars: list[str] = []
                closed = False
                while i < n:
                    ch = text[i]
                    if ch == "\\" and i + 1 < n:
                        chars.append(text[i + 1])
                        i += 2
                        continue
                    if ch == '"':
                        closed = True
                        i += 1
                        break
                    chars.append(ch)
                    i += 1
                value = "".join(chars)
                tail_start = i
                while i < n and text[i] != ",":
                    i += 1
                if not closed or text[tail_start:i].strip(" \t"):
                    well_formed = False
            else:
                vstart = i
                while i < n and text[i] != ",":
                    i += 1
                raw_value = text[vstart:i]
                value = raw_value.rstrip(" \t")
                if not value or not all(c in _TCHAR for c in value):
                    well_formed = False
        if name and all(c in _TCHAR for c in name):  # else garbage between commas: dropped
            result.append((name, value, well_formed))
    return result


def _delta_seconds(value: str | None) -> int | None:
    if value is None or not value or not value.isascii() or not value.isdigit():
        return None
    # Leading zeros are fine ("0003600"); overflow is capped rather than rejected.
    return min(int(value), DELTA_SECONDS_MAX)


@lru_cache(maxsize=CACHE_CONTROL_PARSES.bound)
def parse_cache_control(value: bytes | None) -> CacheControl:
    """Parse a (joined) Cache-Control field value; robust to any input, never raises."""
    if not value:
        return NO_DIRECTIVES
    fields: dict[str, object] = {}
    for name, raw, well_formed in split_directives(value.decode("latin-1")):
        boolean = _BOOLEAN.get(name)
        if boolean is not None:
            fields.setdefault(boolean, True)
            continue
        numeric = _NUMERIC_FIELD.get(name)
        if numeric is None or numeric in fields:
            continue  # unknown extension, or a duplicate: the first occurrence wins
        if name == "max-stale" and raw is None:
            fields[numeric] = DELTA_SECONDS_MAX
            continue
        seconds = _delta_seconds(raw) if well_formed else None
        if seconds is not None:
            fields[numeric] = seconds
        elif name in _NUMERIC_STALE_IF_MALFORMED:
            fields[numeric] = 0
        # else: a malformed window or request limit is ignored
    if not fields:
        return NO_DIRECTIVES
    return CacheControl(**fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Header helpers


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of ``name`` (lower-case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def joined(headers: Headers, name: bytes) -> bytes | None:
    """All values of a list-valued field joined with ``,`` (RFC 9110 5.3), or None."""
    values = [value for key, value in headers if key == name]
    if not values:
        return None
    return values[0] if len(values) == 1 else b",".join(values)


def field_names(value: bytes | None) -> tuple[bytes, ...]:
    """A comma-separated list of field names, lower-cased, deduplicated, in order."""
    if not value:
        return ()
    seen: dict[bytes, None] = {}
    for part in value.split(b","):
        name = part.strip().lower()
        if name:
            seen.setdefault(name, None)
    return tuple(seen)


def parse_http_date(value: bytes | None) -> float | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime) as epoch seconds, or None if invalid."""
    if not value:
        return None
    return _parse_http_date(value)


@lru_cache(maxsize=HTTP_DATES.bound)
def _parse_http_date(value: bytes) -> float | None:
    # Memoised: responses of one second share their Date, and Last-Modified values repeat
    # (email.utils takes about 3.5 us per value, three per response).
    try:
        parsed = parsedate_tz(value.decode("latin-1").strip())
    except (ValueError, IndexError, TypeError):
        return None
    if parsed is None:
        return None
    try:
        # parsedate_tz already maps RFC 850 two-digit years into 1969-2068.
        ts = calendar.timegm(parsed[:6])
    except (ValueError, OverflowError):
        return None
    return float(ts - (parsed[9] or 0))


def format_http_date(ts: float) -> bytes:
    """``ts`` as an IMF-fixdate."""
    return formatdate(ts, usegmt=True).encode("ascii")


# --------------------------------------------------------------------------------------------
# Responses


class ResponseMeta(NamedTuple):
    """What the caching rules need from a response's headers, parsed once (a NamedTuple: one
    is made per response the edge receives)."""

    cc: CacheControl
    date: float | None
    #: ``Expires`` as epoch seconds; an invalid value (e.g. "0") is a time in the past (0.0).
    expires: float | None
    age: float
    last_modified: float | None
    etag: bytes | None
    vary: tuple[bytes, ...]
    vary_star: bool
    set_cookie: bool
    surrogate_keys: tuple[str, ...]
    content_encoding: bytes | None

    @property
    def has_validator(self) -> bool:
        return self.etag is not None or self.last_modified is not None


#: The response fields ``response_meta`` reads, each to its slot (one pass over the lines).
_VARY, _EXPIRES, _AGE, _SURROGATE, _ENCODING, _CC, _DATE, _LAST_MODIFIED, _ETAG, _COOKIE = range(10)
_META_FIELDS: Final = {
    b"vary": _VARY,
    b"expires": _EXPIRES,
    b"age": _AGE,
    b"surrogate-key": _SURROGATE,
    b"content-encoding": _ENCODING,
    b"cache-control": _CC,
    b"date": _DATE,
    b"last-modified": _LAST_MODIFIED,
    b"etag": _ETAG,
    b"set-cookie": _COOKIE,
}


def response_meta(headers: Headers, targeted: Sequence[bytes] = ()) -> ResponseMeta:
    """Parse the caching-relevant response headers (first value of single-valued fields).

    ``targeted``: the cache's RFC 9213 field names in precedence order (``targeted_fields``).
    The first of them present with a valid, non-empty value replaces Cache-Control and Expires.
    """
    found: list[list[bytes] | None] = [None] * 10
    fields = _META_FIELDS
    # The targeted fields' lines are gathered in the same pass (rarely any: then no dict).
    targeted_lines: dict[bytes, list[bytes]] | None = None
    for name, value in headers:
        slot = fields.get(name)
        if slot is not None:
            values = found[slot]
            if values is None:
                found[slot] = [value]
            else:
                values.append(value)
        elif targeted and name in targeted:
            if targeted_lines is None:
                targeted_lines = {}
            targeted_lines.setdefault(name, []).append(value)
    targeted_cc = _first_targeted(targeted_lines, targeted) if targeted_lines is not None else None
    if targeted_cc is not None:
        found[_CC] = found[_EXPIRES] = None
    vary_lines = found[_VARY]
    vary = field_names(b",".join(vary_lines)) if vary_lines else ()
    expires: float | None = None
    expires_lines = found[_EXPIRES]
    if expires_lines is not None:
        parsed = parse_http_date(expires_lines[0])
        expires = 0.0 if parsed is None else parsed
    age = 0.0
    ages = found[_AGE]
    if ages:
        age = _age_value(ages)
    # Surrogate-Key is space-separated, so several lines join with a space, not a comma.
    surrogate_lines = found[_SURROGATE]
    surrogate = b" ".join(surrogate_lines) if surrogate_lines else b""
    encoding_lines = found[_ENCODING]
    encoding = None
    if encoding_lines is not None:
        encoding = encoding_lines[0].strip().lower()
        if encoding in (b"", b"identity"):
            encoding = None
    cc_lines = found[_CC]
    date_lines = found[_DATE]
    modified_lines = found[_LAST_MODIFIED]
    etag_lines = found[_ETAG]
    return ResponseMeta(
        targeted_cc
        or parse_cache_control(
            None if cc_lines is None else cc_lines[0] if len(cc_lines) == 1 else b",".join(cc_lines)
        ),
        None if date_lines is None else parse_http_date(date_lines[0]),
        expires,
        age,
        None if modified_lines is None else parse_http_date(modified_lines[0]),
        None if etag_lines is None else _strip_or_none(etag_lines[0]),
        tuple(name for name in vary if name != b"*") if vary else (),
        b"*" in vary,
        found[_COOKIE] is not None,
        tuple(dict.fromkeys(surrogate.decode("latin-1").split())) if surrogate else (),
        encoding,
    )


#: The response fields whose values differ from one response of a kind to the next (a head
#: shape keeps their names and places, not their values).  Of their values, ``response_meta``
#: reads only the first line of Date, ETag, Last-Modified, Expires and Age, each into its own
#: slot of the meta (``MetaShape``); of the others only their presence counts anywhere (a
#: Set-Cookie's, a Content-Length's), or nothing at all (tracing fields, passed on as they are).
VOLATILE_FIELDS: Final = frozenset(
    {
        b"date",
        b"etag",
        b"last-modified",
        b"expires",
        b"age",
        b"content-length",
        b"content-md5",
        b"set-cookie",
        b"x-request-id",
        b"x-trace-id",
        b"traceparent",
        b"tracestate",
        b"x-amzn-trace-id",
        b"x-amz-request-id",
        b"x-runtime",
        b"x-response-time",
        b"server-timing",
    }
)


class MetaShape(NamedTuple):
    """``response_meta`` of one head shape: the slots its stable lines decide (``base``), and
    the index in the header list of the first line of each volatile field it reads (-1: none,
    or ignored).  ``shaped_meta`` finishes it for one response of that shape."""

    base: ResponseMeta
    date_at: int
    expires_at: int
    age_at: int
    modified_at: int
    etag_at: int


def meta_shape(headers: Headers, targeted: Sequence[bytes] = ()) -> MetaShape:
    """The ``MetaShape`` of ``headers``: valid for every header list whose names are these, in
    this order, and whose values are these but for ``VOLATILE_FIELDS``."""
    base = response_meta(headers, targeted)
    at = {b"date": -1, b"expires": -1, b"age": -1, b"last-modified": -1, b"etag": -1}
    for index, (name, _value) in enumerate(headers):
        if at.get(name) == -1:
            at[name] = index
    expires_at = at[b"expires"]
    if expires_at >= 0 and base.expires is None:
        expires_at = -1  # an RFC 9213 field replaced Cache-Control and Expires
    return MetaShape(base, at[b"date"], expires_at, at[b"age"], at[b"last-modified"], at[b"etag"])


def shaped_meta(shape: MetaShape, headers: Headers) -> ResponseMeta:
    """``response_meta(headers, targeted)`` for ``headers`` of ``shape`` (``meta_shape``):
    only the volatile fields are read."""
    # ``parse_http_date`` inlined (its memo called directly on a non-empty value): a fill
    # parses its Date and Last-Modified here.
    base = shape.base
    at = shape.date_at
    date: float | None = None
    if at >= 0:
        value = headers[at][1]
        date = _parse_http_date(value) if value else None
    at = shape.expires_at
    expires: float | None = None
    if at >= 0:
        value = headers[at][1]
        parsed = _parse_http_date(value) if value else None
        expires = 0.0 if parsed is None else parsed
    at = shape.age_at
    age = 0.0 if at < 0 else _age_value([headers[at][1]])
    at = shape.modified_at
    modified: float | None = None
    if at >= 0:
        value = headers[at][1]
        modified = _parse_http_date(value) if value else None
    at = shape.etag_at
    etag = (headers[at][1].strip() or None) if at >= 0 else None  # ``_strip_or_none``
    # Every field given: ``tuple.__new__`` makes it without the NamedTuple's Python ``__new__``.
    return tuple.__new__(
        ResponseMeta,
        (
            base.cc,
            date,
            expires,
            age,
            modified,
            etag,
            base.vary,
            base.vary_star,
            base.set_cookie,
            base.surrogate_keys,
            base.content_encoding,
        ),
    )


#: The target whose field is the W3C Edge Architecture's Surrogate-Control, not RFC 9213's.
SURROGATE_TARGET: Final = "surrogate"


def targeted_fields(targets: Iterable[str]) -> tuple[bytes, ...]:
    """The response field names of a target list, in its order (RFC 9213 2): target ``t`` is
    ``t-cache-control`` (``cdn``: CDN-Cache-Control), ``surrogate`` is Surrogate-Control."""
    return tuple(
        b"surrogate-control" if t == SURROGATE_TARGET else t.encode("ascii") + b"-cache-control"
        for t in targets
    )


def targeted_cache_control(headers: Headers, fields: Sequence[bytes]) -> CacheControl | None:
    """RFC 9213 2.2: the directives of the first field in ``fields`` that is present with a
    valid, non-empty value, or None (Cache-Control and Expires then apply as usual).

    A field with any malformed member is invalid as a whole (a Structured Fields dictionary
    that fails to parse is ignored), so the cache falls back to Cache-Control rather than
    guessing.  Parameters on a member are ignored, except in Surrogate-Control, where
    ``max-age=60;box1`` is for the surrogate named ``box1``, not for this one.
    """
    for field in fields:
        value = joined(headers, field)
        if value is None:
            continue
        cc = _targeted_value(value, field == b"surrogate-control")
        if cc is not None:
            return cc
    return None


def _first_targeted(
    lines: dict[bytes, list[bytes]], fields: Sequence[bytes]
) -> CacheControl | None:
    """``targeted_cache_control`` of headers whose lines of ``fields`` are ``lines``."""
    for field in fields:
        values = lines.get(field)
        if values is None:
            continue
        cc = _targeted_value(
            values[0] if len(values) == 1 else b",".join(values), field == b"surrogate-control"
        )
        if cc is not None:
            return cc
    return None


@lru_cache(maxsize=TARGETED_CACHE_CONTROL_PARSES.bound)
def _targeted_value(value: bytes, surrogate: bool) -> CacheControl | None:
    kept: list[str] = []
    for member in value.decode("latin-1").split(","):
        member = member.strip(" \t")
        if not member:
            continue
        directive, semicolon, _params = member.partition(";")
        if semicolon and surrogate:
            continue  # targeted at another surrogate by name
        kept.append(directive.rstrip(" \t"))
    if not kept:
        return None
    text = ", ".join(kept)
    members = split_directives(text)
    if len(members) != len(kept) or not all(well_formed for _, _, well_formed in members):
        return None
    return parse_cache_control(text.encode("latin-1"))


def _age_value(lines: list[bytes]) -> float:
    """Age from its field lines: the first member of the (joined) list, as RFC 9111 5.1 says
    for a list received where a single value is expected ("0, 7200" is 0).  A first member that
    is not a delta-seconds (a sign, a fraction, parameters) cannot be trusted, so the response
    counts as stale rather than fresh: a cache downstream of a broken one must not extend its
    lifetime (cache-tests age-parse)."""
    first = lines[0].split(b",", 1)[0].strip(b" \t")
    seconds = _delta_seconds(first.decode("latin-1"))
    return float(seconds) if seconds is not None else float(DELTA_SECONDS_MAX)


def _strip_or_none(value: bytes | None) -> bytes | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def shareable_with_authorization(cc: CacheControl) -> bool:
    """RFC 9111 3.5: directives that let a response to an authorized request be shared."""
    return cc.public or cc.s_maxage is not None or cc.must_revalidate


def uncacheable_reason(
    method: bytes,
    status: int,
    request_cc: CacheControl,
    authorized: bool,
    meta: ResponseMeta,
    rule: CacheRule,
    cookie: bool = False,
) -> str | None:
    """Why a response may not be stored (RFC 9111 3), or None when it may.

    Only responses to GET are stored (a HEAD response has no body to serve a GET with; the edge
    fills HEAD misses with a GET).  The reason doubles as a metric/log label.

    ``cookie``: the request carried a Cookie.  Its response is stored only when the origin
    itself gave it a shared lifetime (``public``, ``s-maxage``, ``max-age`` or ``Expires``):
    a rule's ttl (forced or not) or a heuristic never stores it, since an origin silent about
    caching may well have personalised it (Varnish's builtin VCL passes such requests).
    """
    if method != b"GET":
        return "method"
    if rule.bypass:
        return "rule-bypass"
    if status < 200 or status in (206, 304):
        return "status"
    if request_cc.no_store:
        return "request-no-store"
    cc = meta.cc
    if cc.must_understand:
        # RFC 9111 5.2.2.3: only statuses whose rules we implement; for those, must-understand
        # overrides the no-store sent beside it for caches that do not know the directive.
        if status not in UNDERSTOOD_STATUSES:
            return "must-understand"
    elif cc.no_store:
        return "no-store"
    if cc.private:
        return "private"
    if meta.vary_star:
        return "vary-star"
    if authorized and not shareable_with_authorization(cc):
        return "authorization"
    if meta.set_cookie and not rule.store_set_cookie:
        return "set-cookie"
    explicit = (
        cc.s_maxage is not None or cc.max_age is not None or meta.expires is not None or cc.public
    )
    if cookie and not explicit:
        return "cookie"
    if status not in CACHEABLE_BY_DEFAULT and not explicit:
        return "status"
    return None


def storable(
    method: bytes, status: int, request_headers: Headers, response_headers: Headers, rule: CacheRule
) -> bool:
    """RFC 9111 3 from raw headers (convenience over ``uncacheable_reason``)."""
    return (
        uncacheable_reason(
            method,
            status,
            parse_cache_control(joined(request_headers, b"cache-control")),
            header(request_headers, b"authorization") is not None,
            response_meta(response_headers),
            rule,
            header(request_headers, b"cookie") is not None,
        )
        is None
    )


class Freshness(NamedTuple):
    """When a stored response was received, how old it was then, and how long it lives.

    A NamedTuple: one is made per fill, and a frozen dataclass's ``__init__`` cost twice as
    much.  (Still tracked by the cyclic GC: CPython untracks exact tuples of atoms only.)"""

    #: Our clock when the response arrived (RFC 9111 ``response_time``).
    response_time: float
    #: RFC 9111 4.2.3 ``corrected_initial_age``.
    initial_age: float
    lifetime: float
    stale_while_revalidate: float
    stale_if_error: float
    #: No stale serving of any kind (must-revalidate, proxy-revalidate, no-cache).
    no_stale: bool
    #: Every use needs a successful validation first (response no-cache).
    always_revalidate: bool

    def age(self, now: float) -> float:
        """RFC 9111 4.2.3 ``current_age``: initial age plus time resident in the cache."""
        return self.initial_age + max(0.0, now - self.response_time)

    def ttl(self, now: float) -> float:
        """Seconds of freshness left; negative once stale."""
        return self.lifetime - self.age(now)

    def retain_for(self, now: float) -> float:
        """Seconds the response is still of use (fresh or within a stale window)."""
        return self.ttl(now) + max(self.stale_while_revalidate, self.stale_if_error)


#: HTTP-dates have one-second resolution and origins truncate them: a response may have been
#: generated up to this long after its Date.
DATE_RESOLUTION: Final = 1.0


def initial_age(meta: ResponseMeta, request_time: float, response_time: float) -> float:
    """RFC 9111 4.2.3: max(apparent_age, corrected_age_value).

    ``apparent_age`` is measured from the end of the Date's second (``DATE_RESOLUTION``):
    the truncation alone would otherwise age a just-generated response by up to a second,
    and with the sub-second TTLs of market data (a 500 ms order book) about half the fills
    would be stale on arrival.  ``Age`` headers and the response delay count in full.
    """
    date = meta.date + DATE_RESOLUTION if meta.date is not None else response_time
    apparent_age = max(0.0, response_time - date)
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = meta.age + response_delay
    return max(apparent_age, corrected_age_value)


def freshness_lifetime(
    status: int, meta: ResponseMeta, rule: CacheRule, response_time: float
) -> float:
    """RFC 9111 4.2.1/4.2.2 with the rule's ttl as the configured heuristic (module docstring)."""
    if rule.force_ttl and rule.ttl is not None:
        return rule.ttl
    cc = meta.cc
    # The directive's own int (shared by every response that parsed the same field), not a
    # float made per response: 24 B of every stored entry.
    if cc.s_maxage is not None:
        return cc.s_maxage
    if cc.max_age is not None:
        return cc.max_age
    date = meta.date if meta.date is not None else response_time
    if meta.expires is not None:
        return max(0.0, meta.expires - date)
    if status not in CACHEABLE_BY_DEFAULT and not cc.public:
        return 0.0
    if rule.ttl is not None:
        return rule.ttl
    if meta.last_modified is not None:
        return min(HEURISTIC_CAP, max(0.0, (date - meta.last_modified) * HEURISTIC_FRACTION))
    return 0.0


def compute_freshness(
    status: int, meta: ResponseMeta, rule: CacheRule, request_time: float, response_time: float
) -> Freshness:
    """Everything the cache needs to decide later whether the response is fresh or usable."""
    cc = meta.cc
    lifetime = freshness_lifetime(status, meta, rule, response_time)
    if rule.force_ttl and rule.ttl is not None:
        return Freshness(
            response_time=response_time,
            initial_age=initial_age(meta, request_time, response_time),
            lifetime=lifetime,
            stale_while_revalidate=rule.stale_while_revalidate,
            stale_if_error=rule.stale_if_error,
            no_stale=False,
            always_revalidate=False,
        )
    no_stale = cc.no_cache or cc.must_revalidate or cc.proxy_revalidate
    # s-maxage implies proxy-revalidate: only windows the origin itself grants survive it.
    rule_windows = not no_stale and cc.s_maxage is None
    swr: float = 0.0
    sie: float = 0.0
    if not no_stale:
        if cc.stale_while_revalidate is not None:
            swr = float(cc.stale_while_revalidate)
        elif rule_windows:
            swr = rule.stale_while_revalidate
        if cc.stale_if_error is not None:
            sie = float(cc.stale_if_error)
        elif rule_windows:
            sie = rule.stale_if_error
    return Freshness(
        response_time=response_time,
        initial_age=initial_age(meta, request_time, response_time),
        lifetime=lifetime,
        stale_while_revalidate=swr,
        stale_if_error=sie,
        no_stale=no_stale,
        always_revalidate=cc.no_cache,
    )


#: What ``compute_freshness`` makes of a head shape when its lifetime and stale windows
#: depend on no volatile field: (lifetime, stale-while-revalidate, stale-if-error, no_stale,
#: always_revalidate).
FreshnessParts = tuple[float, float, float, bool, bool]


def freshness_parts(status: int, meta: ResponseMeta, rule: CacheRule) -> FreshnessParts | None:
    """``compute_freshness``' answer but for its times, for every response whose status and
    Cache-Control are these under ``rule``, when the lifetime is the rule's forced ttl or the
    origin's s-maxage/max-age (Date, Expires, Last-Modified then play no part); else None."""
    cc = meta.cc
    if not (rule.force_ttl and rule.ttl is not None) and cc.s_maxage is None and cc.max_age is None:
        return None
    made = compute_freshness(status, meta, rule, 0.0, 0.0)
    return (
        made.lifetime,
        made.stale_while_revalidate,
        made.stale_if_error,
        made.no_stale,
        made.always_revalidate,
    )


def worth_storing(freshness: Freshness, meta: ResponseMeta) -> bool:
    """A storable response that can never be served without a full refetch is not kept."""
    return (
        freshness.lifetime > 0
        or meta.has_validator
        or freshness.stale_while_revalidate > 0
        or freshness.stale_if_error > 0
    )


def without_fields(headers: Headers, names: frozenset[bytes]) -> list[Header]:
    """``headers`` less the fields in ``names`` (the targeted fields the edge consumed)."""
    return [(name, value) for name, value in headers if name not in names]


def stored_headers(headers: Headers, *, keep_set_cookie: bool) -> list[Header]:
    """The response headers kept with a stored response: hop-by-hop fields (including those
    named by Connection), Age, Content-Length, X-Cache and Surrogate-Key removed."""
    kept: list[Header] = []
    connection = False
    for name, value in headers:
        if name in _NOT_STORED:
            connection = connection or name == b"connection"
            continue
        if name == b"set-cookie" and not keep_set_cookie:
            continue
        kept.append((name, value))
    if connection:  # rare: a fill's headers come without (``rewrite_response_headers``)
        named = frozenset(field_names(joined(headers, b"connection")))
        if named:
            kept = [line for line in kept if line[0] not in named]
    return kept


# --------------------------------------------------------------------------------------------
# Serving decisions


class Use(enum.Enum):
    FRESH = "fresh"
    #: Usable now although stale (stale-while-revalidate or the client's max-stale).
    STALE = "stale"
    #: Must be validated with the origin first (stale-if-error may still apply on failure).
    VALIDATE = "validate"


# Module-level aliases: attribute access on an Enum class costs ~10x a global lookup (3.11).
_FRESH: Final = Use.FRESH
_STALE: Final = Use.STALE
_VALIDATE: Final = Use.VALIDATE

_IS_FRESH: Final = (_FRESH, "")
_MUST_VALIDATE: Final = (_VALIDATE, "")

STALE_WHILE_REVALIDATE: Final = "while_revalidate"
STALE_IF_ERROR: Final = "if_error"
STALE_MAX_STALE: Final = "max_stale"


def decide(freshness: Freshness, request_cc: CacheControl, now: float) -> tuple[Use, str]:
    """How a stored response may be used for a request (RFC 9111 4, 5.2.1; RFC 5861).

    Returns the use and, for ``Use.STALE``, the stale reason (a metric label).  On the hot
    path (a fresh hit for a request without Cache-Control) this is a few float operations.
    """
    resident = now - freshness.response_time
    age = freshness.initial_age + resident if resident > 0 else freshness.initial_age
    ttl = freshness.lifetime - age
    if freshness.always_revalidate:
        return _MUST_VALIDATE
    if request_cc is not NO_DIRECTIVES and (
        request_cc.no_cache
        or (request_cc.max_age is not None and age > request_cc.max_age)
        or (request_cc.min_fresh is not None and ttl < request_cc.min_fresh)
    ):
        return _MUST_VALIDATE
    if ttl > 0:
        return _IS_FRESH
    if freshness.no_stale:
        return _MUST_VALIDATE
    staleness = -ttl
    if freshness.stale_while_revalidate > 0 and staleness <= freshness.stale_while_revalidate:
        return _STALE, STALE_WHILE_REVALIDATE
    if request_cc.max_stale is not None and staleness <= request_cc.max_stale:
        return _STALE, STALE_MAX_STALE
    return _MUST_VALIDATE


def stable_until(freshness: Freshness, now: float) -> float:
    """Until when a response that may be used at ``now`` without a request stays usable the
    same way (fresh, or stale within its stale-while-revalidate window) with the same
    whole-second Age, so that serving it again would write the very same bytes: the earlier of
    the end of that window and the next tick of its Age.  ``now`` itself (nothing stable) when
    it must be validated first, or ``now`` is before it arrived (a clock that stepped back)."""
    resident = now - freshness.response_time
    if resident <= 0 or freshness.always_revalidate:
        return now
    # The same age and ttl arithmetic as decide(): computed another way (an expiry instant),
    # the two could disagree at the boundary by a rounding and replay a use decide() refuses.
    age = freshness.initial_age + resident
    ttl = freshness.lifetime - age
    if ttl > 0:
        end = now + ttl
    elif (
        not freshness.no_stale
        and freshness.stale_while_revalidate > 0
        and -ttl < freshness.stale_while_revalidate
    ):
        end = now + ttl + freshness.stale_while_revalidate
    else:
        return now
    next_age = now + (1.0 - age % 1.0)
    return end if end < next_age else next_age


def usable_on_error(freshness: Freshness, now: float) -> bool:
    """stale-if-error (RFC 5861 4): may this response stand in for a failed origin?

    A still-fresh response always may (its revalidation was forced by the request), unless
    the origin said no-cache.
    """
    if freshness.always_revalidate:
        return False
    ttl = freshness.ttl(now)
    if ttl > 0:
        return True
    return (
        not freshness.no_stale and freshness.stale_if_error > 0 and -ttl <= freshness.stale_if_error
    )


# --------------------------------------------------------------------------------------------
# Conditional requests


_ETAG_RE: Final = re.compile(rb'\s*(W/)?("[^"]*")\s*(?:,|$)')


def parse_etags(value: bytes) -> tuple[bytes, ...] | None:
    """The opaque tags of an If-None-Match list (weakness dropped), ``(b"*",)`` for ``*``, or
    None when the value is malformed."""
    stripped = value.strip()
    if stripped == b"*":
        return (b"*",)
    tags: list[bytes] = []
    pos = 0
    while pos < len(stripped):
        match = _ETAG_RE.match(stripped, pos)
        if match is None or match.end() == pos:
            return None
        tags.append(match.group(2))
        pos = match.end()
        while pos < len(stripped) and stripped[pos : pos + 1] in (b" ", b"\t", b","):
            pos += 1
    return tuple(tags) if tags else None


def opaque_tag(etag: bytes) -> bytes:
    """An entity tag without its weakness indicator, for weak comparison."""
    etag = etag.strip()
    return etag[2:] if etag.startswith(b"W/") else etag


def weak_match(a: bytes, b: bytes) -> bool:
    """RFC 9110 8.8.3.2 weak comparison."""
    return opaque_tag(a) == opaque_tag(b)


def not_modified(
    status: int,
    etag: bytes | None,
    last_modified: float | None,
    date: float | None,
    if_none_match: bytes | None,
    if_modified_since: bytes | None,
) -> bool:
    """Whether a client's conditional GET/HEAD is answered 304 from a stored response.

    RFC 9110 13.2.2 order: If-None-Match (weak comparison) decides alone when present;
    otherwise If-Modified-Since against Last-Modified, or the stored Date when there is none
    (RFC 9111 4.3.2).  Only 2xx responses are evaluated (RFC 9110 13.2.1).
    """
    if not 200 <= status < 300:
        return False
    if if_none_match is not None:
        tags = parse_etags(if_none_match)
        if tags is None:
            return False
        if tags == (b"*",):
            return True
        if etag is None:
            return False
        mine = opaque_tag(etag)
        return any(tag == mine for tag in tags)
    if if_modified_since is not None:
        since = parse_http_date(if_modified_since)
        modified = last_modified if last_modified is not None else date
        return since is not None and modified is not None and modified <= since
    return False


def upstream_validators(etag: bytes | None, last_modified: bytes | None) -> list[Header]:
    """Conditional headers for revalidating a stored response with the origin (RFC 9111 4.3.1)."""
    validators: list[Header] = []
    if etag is not None:
        validators.append((b"if-none-match", etag))
    if last_modified is not None:
        validators.append((b"if-modified-since", last_modified))
    return validators


#: Never forwarded on a fill: the cache answers these itself from the complete response.
NOT_FORWARDED_ON_FILL: Final = CONDITIONAL_REQUEST_HEADERS | {b"range"}


def upstream_request_headers(headers: Headers, validators: Iterable[Header]) -> list[Header]:
    """A fill's upstream request headers: the client's conditionals replaced by ``validators``.

    A fill fetches the whole representation: client conditionals and Range are answered (or,
    for Range, ignored: a full 200 is a valid answer) by the cache, since a 304 or 206 could
    not be stored.
    """
    forwarded = [(n, v) for n, v in headers if n not in NOT_FORWARDED_ON_FILL]
    forwarded.extend(validators)
    return forwarded


def not_modified_applies(stored_etag: bytes | None, update: Headers) -> bool:
    """RFC 9111 4.3.4: a 304 whose ETag differs from the stored one selects another response."""
    new_etag = _strip_or_none(header(update, b"etag"))
    if new_etag is None or stored_etag is None:
        return True
    return weak_match(new_etag, stored_etag)


def merge_not_modified(
    stored: Headers, update: Headers, *, keep_set_cookie: bool = False
) -> list[Header]:
    """RFC 9111 3.2: stored headers updated with those of a 304.

    Each field the 304 carries replaces every stored line of that field, except fields the
    cache recomputes or that describe the body it kept (Content-Length, Content-Encoding,
    Content-Range, Content-MD5).  ``keep_set_cookie`` (the rule stores Set-Cookie): a 304's
    Set-Cookie replaces the stored one, so the client that triggered the revalidation gets it.
    """
    named = frozenset(field_names(joined(update, b"connection")))
    replacing = [
        (name, value)
        for name, value in update
        if name not in _NOT_UPDATED_BY_304
        and name not in named
        and (keep_set_cookie or name != b"set-cookie")
    ]
    replaced = {name for name, _ in replacing}
    merged = [(name, value) for name, value in stored if name not in replaced]
    merged.extend(replacing)
    return merged


# --------------------------------------------------------------------------------------------
# Invalidation


def invalidation_targets(method: bytes, status: int, url: str, headers: Headers) -> list[str]:
    """URLs whose stored responses an unsafe request's response invalidates (RFC 9111 4.4).

    ``url`` is the request's absolute URL.  A non-error (2xx/3xx) response to a method not known
    to be safe invalidates it and the same-origin Location / Content-Location targets.
    """
    if method in SAFE_METHODS or not 200 <= status < 400:
        return []
    targets = [url]
    origin: tuple[str, str, int] | None = None  # parsed only when a location names a URL
    for name in (b"location", b"content-location"):
        value = header(headers, name)
        if not value:
            continue
        try:
            resolved = urljoin(url, value.decode("latin-1").strip())
        except ValueError:
            continue
        if origin is None:
            origin = _origin(url)
        if _origin(resolved) == origin and resolved not in targets:
            targets.append(resolved)
    return targets


_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    return scheme, host, port if port is not None else _DEFAULT_PORTS.get(scheme, 0)


__all__ = [
    "CACHEABLE_BY_DEFAULT",
    "CONDITIONAL_REQUEST_HEADERS",
    "DELTA_SECONDS_MAX",
    "ERROR_STATUSES",
    "HEURISTIC_CAP",
    "HOP_BY_HOP",
    "NOT_FORWARDED_ON_FILL",
    "NO_DIRECTIVES",
    "SAFE_METHODS",
    "STALE_IF_ERROR",
    "STALE_MAX_STALE",
    "STALE_WHILE_REVALIDATE",
    "SURROGATE_TARGET",
    "UNDERSTOOD_STATUSES",
    "VOLATILE_FIELDS",
    "CacheControl",
    "Freshness",
    "FreshnessParts",
    "Header",
    "Headers",
    "MetaShape",
    "ResponseMeta",
    "Use",
    "compute_freshness",
    "decide",
    "field_names",
    "format_http_date",
    "freshness_lifetime",
    "freshness_parts",
    "header",
    "initial_age",
    "invalidation_targets",
    "joined",
    "merge_not_modified",
    "meta_shape",
    "not_modified",
    "not_modified_applies",
    "parse_cache_control",
    "parse_etags",
    "parse_http_date",
    "response_meta",
    "shaped_meta",
    "shareable_with_authorization",
    "split_directives",
    "storable",
    "stored_headers",
    "targeted_cache_control",
    "targeted_fields",
    "uncacheable_reason",
    "upstream_request_headers",
    "upstream_validators",
    "usable_on_error",
    "weak_match",
    "without_fields",
]
