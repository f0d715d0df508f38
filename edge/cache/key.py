"""Cache keys: which stored response a request may be served.

Primary key: ``b"G|" + scheme://host/path?query``.  ``G`` is the method class (GET and HEAD
share stored responses); the host is lower-cased without its default port or a trailing dot;
the query is normalised by the route's rule (parameters stably sorted by name, ``drop_params``
removed, a trailing ``*`` matching a prefix).  The path is kept byte for byte: decoding
``%41`` or ``..`` here but not at the origin is a classic poisoning vector.

The normalised target (``CacheKey.target``) is what the edge must forward upstream on a fill,
so the origin never sees a parameter the key ignores (a reflected ``utm_source``, a ``;``
cloaked parameter): what is stored is always what the key describes.

Secondary key: the values of the request headers the response names in ``Vary``, normalised
(whitespace folded, empty list members dropped; ``Accept*`` values lower-cased, since they are
case-insensitive; other values keep their case, because tokens such as ``Authorization`` are
not).  ``Accept-Encoding`` is reduced to the negotiated coding class (identity/gzip/br), and is
left out entirely when the stored body is identity: the entry builds every coding itself.

No other request header takes part, so headers outside the key (``X-Forwarded-Host``, ...)
cannot change what is served.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Final, Literal, NamedTuple

from edge.memos import (
    CACHE_CODINGS,
    CACHE_KEY_HOSTS,
    CACHE_KEYS,
    CACHE_RULES,
    DROP_MATCHERS,
    BoundedMemo,
)
from meridian.config import CacheRule

from .policy import Headers, joined

Coding = Literal["identity", "gzip", "br"]
CODINGS: Final[tuple[Coding, ...]] = ("identity", "gzip", "br")
Negotiator = Callable[[bytes | None], str | None]

#: Used for paths no configured rule covers: origin freshness only, default normalisation.
DEFAULT_RULE: Final = CacheRule(path_prefix="/")
METHOD_CLASS_GET: Final = b"G|"
#: Joins a primary key and a secondary (Vary) key; never appears in either.
VARIANT_SEPARATOR: Final = b"\x00"

_DEFAULT_PORTS: Final = {b"http": b"80", b"https": b"443"}
_CASE_INSENSITIVE_VALUES: Final = frozenset({b"accept", b"accept-charset", b"accept-language"})


class CacheKey(NamedTuple):
    """A request's primary cache key and the normalised pieces it was built from (a
    NamedTuple: one is built per first-sight request, and a frozen dataclass costs several
    times as much to build)."""

    #: ``b"G|https://host/path?query"``: stored responses live under this.
    primary: bytes
    #: ``b"https://host/path?query"``: what prefix purges match against.
    url: bytes
    #: ``b"/path?query"``: the normalised target; forward exactly this upstream on a fill.
    target: bytes
    path: bytes
    rule: CacheRule


#: ``CacheKey`` made from all its fields by ``tuple.__new__``, not the generated ``__new__``.
_new_tuple: Final = tuple.__new__


@lru_cache(maxsize=CACHE_KEY_HOSTS.bound)
def _scheme_and_host(scheme: bytes, host: bytes) -> bytes:
    """``scheme://host`` as keyed: the part of a key every request to one host shares."""
    return scheme + b"://" + normalise_host(host, scheme)


def normalise_host(host: bytes, scheme: bytes) -> bytes:
    """Lower-case, trailing dot and default port removed (``Example.COM.:443`` -> example.com)."""
    host = host.strip().lower()
    name, port = host, b""
    if host.startswith(b"["):  # IPv6 literal
        end = host.find(b"]")
        if end != -1:
            name, rest = host[: end + 1], host[end + 1 :]
            port = rest[1:] if rest.startswith(b":") else b""
    elif host.count(b":") == 1:
        name, _, port = host.partition(b":")
    name = name.rstrip(b".")
    port = port.lstrip(b"0") or (b"0" if port else b"")
    if not port or port == _DEFAULT_PORTS.get(scheme):
        return name
    return name + b":" + port


def prefix_matches(path: str, prefix: str) -> bool:
    """A rule's path prefix matches on a segment boundary: ``/api/v1/symbols`` covers
    ``/api/v1/symbols`` and ``/api/v1/symbols/x``, never ``/api/v1/symbolsX`` (a prefix
    ending in ``/`` covers everything under it).  The router uses the same rule."""
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] == "/"


def _param_name(param: bytes) -> bytes:
    return param.partition(b"=")[0]


class _DropMatcher:
    __slots__ = ("exact", "prefixes")

    def __init__(self, patterns: Sequence[str]) -> None:
        encoded = [p.encode("utf-8") for p in patterns]
        self.exact = frozenset(p for p in encoded if not p.endswith(b"*"))
        self.prefixes = tuple(p[:-1] for p in encoded if p.endswith(b"*"))

    def __call__(self, name: bytes) -> bool:
        return name in self.exact or (bool(self.prefixes) and name.startswith(self.prefixes))


@lru_cache(maxsize=DROP_MATCHERS.bound)
def _drop_matcher(patterns: tuple[str, ...]) -> _DropMatcher:
    return _DropMatcher(patterns)


def normalise_query(query: bytes, rule: CacheRule) -> bytes:
    """The query as keyed and forwarded: empty members dropped, ``drop_params`` removed, and
    (with ``sort_query``) a stable sort by parameter name, so repeated parameters keep their
    relative order (the origin may read the first or the last)."""
    if b"&" not in query:  # one member (or none): nothing to sort, at most itself to drop
        if query and rule.drop_params and _drop_matcher(rule.drop_params)(_param_name(query)):
            return b""
        return query
    params = [p for p in query.split(b"&") if p]
    if rule.drop_params:
        drop = _drop_matcher(rule.drop_params)
        params = [p for p in params if not drop(_param_name(p))]
    if rule.sort_query:
        params.sort(key=_param_name)
    return b"&".join(params)


def split_target(target: bytes) -> tuple[bytes, bytes | None, bytes | None]:
    """``(path_and_query, scheme, authority)``; the last two only for absolute-form targets."""
    if target[:1] == b"/":  # origin form: nothing to split
        return target, None, None
    lowered = target[:8].lower()
    for scheme in (b"http", b"https"):
        prefix = scheme + b"://"
        if lowered.startswith(prefix):
            rest = target[len(prefix) :]
            slash = rest.find(b"/")
            query = rest.find(b"?")
            cut = min(i for i in (slash, query, len(rest)) if i != -1)
            path = rest[cut:]
            if path.startswith(b"?"):
                path = b"/" + path
            return path or b"/", scheme, rest[:cut]
    return target, None, None


#: Bytes of Python objects per memoised key beyond its strings' lengths (the dict slot, the
#: (scheme, host, target) tuple, the CacheKey and five bytes objects' headers), measured on
#: CPython 3.11 (about 480) and rounded up.
MEMO_KEY_OVERHEAD: Final = 560


class KeyBuilder:
    """Builds primary keys, memoised per (scheme, host, raw target).

    The hot path sees the same few thousand URLs over and over, so a hit is one dict lookup.
    The memo is bounded: when full it is simply cleared (no per-hit LRU bookkeeping; it refills
    with whatever is hot within a few requests).  Full means ``memo_size`` keys or about
    ``memo_bytes`` bytes of them (``MEMO_KEY_OVERHEAD`` plus the strings each memoised key
    holds): it lives outside the cache's byte bound, so it must stay small in RSS too.
    """

    __slots__ = ("_by_path", "_memo", "_memo_bytes", "_memo_limit", "_memo_size", "_rules")

    def __init__(
        self, rules: Sequence[CacheRule], *, memo_size: int = 65536, memo_bytes: int = 4 << 20
    ) -> None:
        # Longest prefix first, so the most specific rule wins whatever the config order.
        self._rules = tuple(sorted(rules, key=lambda r: len(r.path_prefix), reverse=True))
        #: ``edge.memos.CACHE_KEYS``.
        self._memo: BoundedMemo[tuple[bytes, bytes, bytes], CacheKey] = BoundedMemo(
            CACHE_KEYS, bound=memo_size
        )
        self._memo_size = memo_size
        self._memo_limit = memo_bytes
        self._memo_bytes = 0
        #: ``edge.memos.CACHE_RULES``: path -> its rule (paths repeat where targets do not).
        self._by_path: BoundedMemo[bytes, CacheRule] = BoundedMemo(CACHE_RULES)

    def rule_for(self, path: bytes) -> CacheRule:
        rule = self._by_path.get(path)
        if rule is not None:
            return rule
        rule = DEFAULT_RULE
        text = path.decode("latin-1")
        for candidate in self._rules:
            if prefix_matches(text, candidate.path_prefix):
                rule = candidate
                break
        self._by_path.remember(path, rule)
        return rule

    def build(self, scheme: bytes, host: bytes, target: bytes) -> CacheKey:
        memo_key = (scheme, host, target)
        key = self._memo.get(memo_key)
        if key is not None:
            return key
        key = self.build_once(scheme, host, target)
        cost = MEMO_KEY_OVERHEAD + len(host) + len(target) + 4 * len(key.url)
        if len(self._memo) >= self._memo_size or self._memo_bytes + cost > self._memo_limit:
            self._memo.clear()
            self._memo_bytes = 0
        self._memo[memo_key] = key
        self._memo_bytes += cost
        return key

    def build_once(self, scheme: bytes, host: bytes, target: bytes) -> CacheKey:
        """``build`` without the memo, for a request seen for the first time (memoising the
        keys of traffic spread over more targets than the memo holds only churns it)."""
        if target[:1] != b"/":
            target, absolute_scheme, authority = split_target(target)
            if absolute_scheme is not None and authority is not None:
                # RFC 9112 3.2.2: an absolute-form target's authority replaces Host.
                scheme, host = absolute_scheme, authority
        path, has_query, query = target.partition(b"?")
        if b"#" in target:
            path = path.partition(b"#")[0]
            query = query.partition(b"#")[0]
        rule = self._by_path.get(path) or self.rule_for(path)
        if has_query and (rule.drop_params or b"&" in query):  # else one member: kept as is
            query = normalise_query(query, rule)
        normalised = path + b"?" + query if query else path
        url = _scheme_and_host(scheme.lower(), host) + normalised
        # CacheKey(...) without the NamedTuple's generated __new__: one per first-sight request.
        return _new_tuple(CacheKey, (METHOD_CLASS_GET + url, url, normalised, path, rule))

    def build_origin(self, scheme: bytes, host: bytes, target: bytes, path: bytes) -> CacheKey:
        """``build_once`` for an origin-form ``target`` without a fragment whose path (before
        any ``?``) is ``path``, and a lower-case ``scheme``: what the front end split already
        is not split again, and a query the rule leaves as it is (one parameter, nothing to
        drop) is not rebuilt: the target is its own normalised form."""
        rule = self._by_path.get(path) or self.rule_for(path)
        normalised = target
        if len(target) != len(path):
            query = target[len(path) + 1 :]
            if not query:
                normalised = path
            elif rule.drop_params or b"&" in query:
                kept = normalise_query(query, rule)
                if kept is not query:  # (else one member kept: the target is its own form)
                    normalised = path + b"?" + kept if kept else path
        url = _scheme_and_host(scheme, host) + normalised
        return _new_tuple(CacheKey, (METHOD_CLASS_GET + url, url, normalised, path, rule))

    def from_url(self, url: str | bytes) -> CacheKey:
        """The key of an absolute URL (purge requests, invalidation targets); a bare path
        keys as ``http://`` with no host."""
        raw = url.encode("latin-1") if isinstance(url, str) else url
        path, scheme, authority = split_target(raw)
        if scheme is None or authority is None:
            return self.build_once(b"http", b"", raw)
        return self.build_once(scheme, authority, path)


# --------------------------------------------------------------------------------------------
# Content coding and Vary


@lru_cache(maxsize=CACHE_CODINGS.bound)
def negotiate_coding(accept_encoding: bytes | None) -> Coding:
    """The best coding the cache can serve: br, then gzip, then identity (RFC 9110 12.5.3).

    The edge normally injects ``edge.compress.negotiate`` instead; this one keeps the package
    free of the compression module (and serves identity when nothing else is acceptable).
    """
    if not accept_encoding:
        return "identity"
    weights: dict[bytes, float] = {}
    for element in accept_encoding.split(b","):
        name, _, params = element.partition(b";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        for param in params.split(b";"):
            key, _, value = param.partition(b"=")
            if key.strip().lower() == b"q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if name == b"x-gzip":
            name = b"gzip"
        weights.setdefault(name, q)
    wildcard = weights.get(b"*", 0.0)
    best: Coding = "identity"
    best_q = 0.0
    for coding in ("br", "gzip"):
        q = weights.get(coding.encode(), wildcard)
        if 0.0 < q <= 1.0 and q > best_q:
            best, best_q = coding, q
    return best


def coding_class(negotiate: Negotiator, accept_encoding: bytes | None) -> Coding:
    chosen = negotiate(accept_encoding)
    return chosen if chosen in ("gzip", "br") else "identity"  # type: ignore[return-value]


def normalise_value(name: bytes, value: bytes) -> bytes:
    """A request header value as compared for Vary: list members trimmed, whitespace runs
    folded to one space, empty members dropped; lower-cased for case-insensitive fields."""
    members = [b" ".join(part.split()) for part in value.split(b",")]
    folded = b",".join(m for m in members if m)
    return folded.lower() if name in _CASE_INSENSITIVE_VALUES else folded


def vary_key(
    names: Sequence[bytes], headers: Headers, negotiate: Negotiator = negotiate_coding
) -> bytes:
    """The secondary key for ``names`` (lower-case, from the response's Vary).

    An absent header and an empty one differ (RFC 9111 4.1 matches absent only with absent).
    """
    parts: list[bytes] = []
    for name in names:
        value = joined(headers, name)
        if name == b"accept-encoding":
            parts.append(name + b"=" + coding_class(negotiate, value).encode())
        elif value is None:
            parts.append(name + b"!")
        else:
            parts.append(name + b"=" + normalise_value(name, value))
    return b"\n".join(parts)


def variant_key(primary: bytes, names: Sequence[bytes], secondary: bytes) -> bytes:
    """The store key of one variant: the primary key alone when nothing varies."""
    return primary + VARIANT_SEPARATOR + secondary if names else primary


__all__ = [
    "CODINGS",
    "DEFAULT_RULE",
    "METHOD_CLASS_GET",
    "VARIANT_SEPARATOR",
    "CacheKey",
    "Coding",
    "KeyBuilder",
    "Negotiator",
    "coding_class",
    "negotiate_coding",
    "normalise_host",
    "normalise_query",
    "normalise_value",
    "prefix_matches",
    "split_target",
    "variant_key",
    "vary_key",
]
