"""Every memo of the edge request path, named, documented and bounded in one place.

A memo remembers what a pure function of its key returned, so that the next request with the
same key skips the work.  Each one here says what it caches, under which key, where it lives,
what clears it and how big it may grow; its owner makes it with ``BoundedMemo(SPEC)``.

``BoundedMemo`` is a plain ``dict`` (a hit stays one dict lookup, no Python call) that knows
its bound.  When full it is cleared (``policy="clear"``): no bookkeeping per hit, and what is
hot refills within a few requests, which is cheaper than an LRU's reordering on every hit.
The Accept-Encoding negotiation memo evicts its oldest entry instead (``policy="oldest"``),
because a few values cover nearly every client and a flood of odd ones should not flush them.
The rate limits' tables of keys forget idle keys first (``policy="idle"``: a key whose bucket is
full again needs no memory), then the busy keys nearest to full.
Pure parsing functions off the hottest path are memoised with ``functools.lru_cache``
(``policy="lru"``), sized here.
Owners on hot paths check ``len(memo) >= memo.bound`` inline rather than calling ``remember``.

Memos that are not dicts (one slot per object) are listed too, with what bounds them.
A leaf module: the cache package and every edge module may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, TypeVar

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class MemoSpec:
    """What one memo is: written once, read by its owner and by the tests."""

    name: str
    #: Where the memo lives (the attribute or module global holding it).
    owner: str
    #: What it is keyed by, and what it remembers.
    key: str
    value: str
    #: What empties it besides its bound.
    cleared_by: str
    #: Entries at most; when full it is cleared (or its oldest entry evicted).
    bound: int
    policy: Literal["clear", "oldest", "lru", "slot", "idle"] = "clear"


class BoundedMemo(dict[K, V]):
    """A dict that never holds more than ``spec.bound`` entries when filled with ``remember``
    (or by an owner that checks ``len(memo) >= memo.bound`` first)."""

    __slots__ = ("bound", "spec")

    def __init__(self, spec: MemoSpec, *, bound: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        #: ``spec.bound`` (or the owner's configured bound), one attribute away for the
        #: owners' inline checks.
        self.bound = spec.bound if bound is None else bound

    def remember(self, key: K, value: V) -> V:
        """Store ``value`` under ``key`` within the bound; returns ``value``."""
        if key not in self and len(self) >= self.bound:
            if self.spec.policy == "oldest":
                del self[next(iter(self))]
            else:
                self.clear()
        self[key] = value
        return value


# -- request heads and routes (edge.state) ------------------------------------------------------

REQUEST_HEADS: Final = MemoSpec(
    name="request heads",
    owner="edge.state.EdgeState.request_heads (filled by edge.h1parse.remember_head)",
    key="the raw bytes of a bodiless keep-alive GET/HEAD chunk, at most 2048 bytes",
    value="its validated RequestHead (with the cache's Prepared lookup and the route name)",
    cleared_by="a config reload (a new EdgeState); the chunk's bytes are the whole key",
    bound=4096,
)
FIRST_SIGHTS: Final = MemoSpec(
    name="first sights",
    owner="edge.state.EdgeState.first_sights (edge.h1fast.HeadShortcuts.answer)",
    key="the hash of a request head's bytes (or of its MeaningKey) seen before",
    value="how often it was seen (1, or 2 for more): a head is memoised in REQUEST_HEADS on its "
    "second sight (its third when edge.h1fast answered the second by its shape), so traffic "
    "spread over more keys than the memo holds does not churn it (a collision only memoises "
    "early)",
    cleared_by="a config reload (a new EdgeState)",
    bound=16384,
)
ROUTES: Final = MemoSpec(
    name="routes",
    owner="edge.state.EdgeState.route_memo (EdgeState.route)",
    key="(Host header as decided, path)",
    value="the RouteTarget, or None for no route",
    cleared_by="a config reload (a new EdgeState)",
    bound=4096,
)
HEAD_SHAPES: Final = MemoSpec(
    name="head shapes",
    owner="edge.h1fast.HeadShortcuts._shapes",
    key="a request head's MeaningKey without its request line (its fields but the volatile ones)",
    value="the HeadShape: those fields as validated and decided, and what the cache reads of them",
    cleared_by="a config reload (a new EdgeState)",
    bound=1024,
)
CHECKED_PATHS: Final = MemoSpec(
    name="checked paths",
    owner="edge.h1fast.HeadShortcuts._paths",
    key="the path of a request target (before its query) that request_target.check_path accepted",
    value="its routing path (str)",
    cleared_by="its bound only (a pure function of the key)",
    bound=4096,
)
FILL_HEADERS: Final = MemoSpec(
    name="fill headers",
    owner="edge.state.FillHeaders.fill_headers of a RequestHead or a HeadShape "
    "(edge.stages.fill.fill_headers)",
    key="client address and scheme",
    value="the upstream request headers of a fill for that head, without the request ID",
    cleared_by="its RequestHead leaving REQUEST_HEADS (its HeadShape leaving HEAD_SHAPES); "
    "made on a head's second fill only",
    bound=16,
)
HIT_REPLAYS: Final = MemoSpec(
    name="hit replays",
    owner="edge.state.RequestHead.hit (Pipeline.replay_hit)",
    key="the RequestHead it hangs on (one slot per head)",
    value="the last hit's bytes and what its metrics and access line need (HitReplay)",
    cleared_by="a replay that no longer holds (new entry, next Age second, stale, reload)",
    bound=1,
    policy="slot",
)

# -- the cache (edge.cache) ---------------------------------------------------------------------

SERVED_CODINGS: Final = MemoSpec(
    name="served codings",
    owner="edge.cache.requests.RequestReader._codings",
    key="Accept-Encoding value (None: absent)",
    value="the coding a stored entry is served in",
    cleared_by="its bound only (the answer depends on the value alone)",
    bound=1024,
)
BYPASS_LOOKUPS: Final = MemoSpec(
    name="bypass lookups",
    owner="edge.cache.HttpCache._bypass",
    key="bypass reason (a fixed set of names in edge.cache and the config's rules)",
    value="the one Lookup(BYPASS, reason) shared by every bypassed request",
    cleared_by="its bound only",
    bound=256,
)
SHARED_FIELDS: Final = MemoSpec(
    name="shared header fields",
    owner="edge.cache.admission.SharedFields._pool (pooled, shaped)",
    key="a stored header field (name, value) that responses repeat",
    value="the one copy every stored entry shares",
    cleared_by="its bound only (entries keep the copies they hold)",
    bound=4096,
)
CACHE_KEYS: Final = MemoSpec(
    name="cache keys",
    owner="edge.cache.key.KeyBuilder._memo",
    key="(scheme, host, raw target)",
    value="the primary CacheKey",
    cleared_by="its bound, or its byte budget (1/16 of the cache's memory, at most 4 MiB)",
    bound=65536,  # the default; KeyBuilder(memo_size=...) sets its own
)

CACHE_RULES: Final = MemoSpec(
    name="cache rules by path",
    owner="edge.cache.key.KeyBuilder._by_path (rule_for)",
    key="a request path (the target without its query)",
    value="the cache rule whose prefix covers it (longest first)",
    cleared_by="its bound (cleared when full); a reload builds a new KeyBuilder",
    bound=4096,
)
CACHE_KEY_HOSTS: Final = MemoSpec(
    name="cache key hosts",
    owner="edge.cache.key._scheme_and_host (lru_cache)",
    key="(scheme, Host as sent)",
    value="b'scheme://host' as keyed (host normalised)",
    cleared_by="its bound only (least recently used out; a pure function of the key)",
    bound=1024,
    policy="lru",
)
TARGETED_CACHE_CONTROL_PARSES: Final = MemoSpec(
    name="targeted Cache-Control parses",
    owner="edge.cache.policy._targeted_value (lru_cache)",
    key="a joined CDN-Cache-Control / Surrogate-Control (RFC 9213) value, and which of the two",
    value="the parsed CacheControl, or None when the value is invalid",
    cleared_by="its bound only (least recently used first)",
    bound=1024,
    policy="lru",
)

CACHE_CONTROL_PARSES: Final = MemoSpec(
    name="Cache-Control parses",
    owner="edge.cache.policy.parse_cache_control (lru_cache)",
    key="a joined Cache-Control value",
    value="the parsed CacheControl",
    cleared_by="its bound only (least recently used first)",
    bound=4096,
    policy="lru",
)
HTTP_DATES: Final = MemoSpec(
    name="HTTP dates",
    owner="edge.cache.policy._parse_http_date (lru_cache)",
    key="a Date / Last-Modified / Expires value",
    value="its timestamp, or None when invalid",
    cleared_by="its bound only (least recently used first)",
    bound=4096,
    policy="lru",
)
CACHE_CODINGS: Final = MemoSpec(
    name="cache codings",
    owner="edge.cache.key.negotiate_coding (lru_cache)",
    key="Accept-Encoding value (None: absent)",
    value="the coding the cache serves: br, gzip or identity",
    cleared_by="its bound only (least recently used first)",
    bound=1024,
    policy="lru",
)
DROP_MATCHERS: Final = MemoSpec(
    name="query drop matchers",
    owner="edge.cache.key._drop_matcher (lru_cache)",
    key="a cache rule's query parameter patterns",
    value="the compiled matcher",
    cleared_by="its bound only (the config's rules: a handful)",
    bound=256,
    policy="lru",
)

# -- edge modules -------------------------------------------------------------------------------

HOSTS: Final = MemoSpec(
    name="hosts",
    owner="edge.request_target._HOST_MEMO (parse_host)",
    key="(Host value as sent, scheme)",
    value="the validated, normalised host, or None when invalid",
    cleared_by="its bound only (a pure function of the key)",
    bound=1024,
)
NEGOTIATIONS: Final = MemoSpec(
    name="Accept-Encoding negotiations",
    owner="edge.compress._memo (negotiate, accepts)",
    key="Accept-Encoding value, at most 256 bytes",
    value="the parsed acceptance (choice, allowed, refused, wildcard)",
    cleared_by="its bound only; the oldest entry goes first",
    bound=1024,
    policy="oldest",
)
RESPONSE_SHAPES: Final = MemoSpec(
    name="fill response head shapes",
    owner="edge.stages.fill_read._SHAPES (HeadShapes; FillFetch.read_for_cache)",
    key="an origin head's lines with the values of edge.cache.policy.VOLATILE_FIELDS (Date, "
    "ETag, Last-Modified, Expires, Age, Content-Length, Set-Cookie, tracing IDs, ...) left "
    "out (their names kept in place), its status, the region, the route and the cache rule; "
    "at most 48 lines and 4 KiB of kept lines",
    value="the HeadShape: the rewritten header list as a template, its coding, whether it may "
    "be compressed, the cache's StoredShape (meta, stored fields, entry size); None on the "
    "key's first sight.  Two more tables of this bound find a made shape without its key "
    "(HeadShapes.read): the ShapePlan (which lines are volatile) by a head's exact line "
    "names, and the shape with its fills by (plan, stable lines, status, region, route, rule)",
    cleared_by="another EdgeState (a config reload) or cache; its bound (each table its own)",
    bound=1024,
)
MEDIA_TYPE_PATTERNS: Final = MemoSpec(
    name="compressible media type patterns",
    owner="edge.compress._type_patterns (lru_cache)",
    key="the configured compressible types",
    value="exact types and prefixes",
    cleared_by="its bound only (one value per config)",
    bound=16,
    policy="lru",
)
ACCESS_LOG_MIDDLES: Final = MemoSpec(
    name="access log middles",
    owner="edge.accesslog.AccessLog._middles",
    key="(path, status, bytes, cache, region, method, backend, attempts)",
    value="the constant middle of a logfmt access line",
    cleared_by="its bound only",
    bound=4096,
)

# -- HTTP/2 (edge.h2hpack, edge.h2streams) --------------------------------------------------------

HPACK_BLOCKS: Final = MemoSpec(
    name="HPACK request blocks",
    owner="edge.h2hpack.HeaderDecoder.memo (one per HTTP/2 connection)",
    key="a request header block's bytes that insert nothing into the dynamic table and "
    "update not its size (indexed and literal-without-indexing representations only)",
    value="its decoded fields and why they are malformed (None: well formed)",
    cleared_by="any block that changes the connection's dynamic table (as if keyed by the "
    "table's generation too), a decoding error; its bound",
    bound=16,
)
RESPONSE_HEADS: Final = MemoSpec(
    name="HTTP/2 response heads",
    owner="edge.h2streams.PrebuiltResponses.heads (one per worker; response_head)",
    key="the head of a prebuilt HTTP/1.1 response (a cache hit's, an edge error's), as bytes",
    value="its status and its HPACK block (literals without indexing: valid on any "
    "connection, edge.hpack_literal), or None when its body is chunked (decoded each time)",
    cleared_by="its bound only (a pure function of the head)",
    bound=1024,
)
RESPONSE_OBJECTS: Final = MemoSpec(
    name="HTTP/2 prebuilt response objects",
    owner="edge.h2streams.PrebuiltResponses.by_object (one per worker)",
    key="id() of a prebuilt response of at most 16 KiB that the hit path hands back as the "
    "same object while it holds (a cached answer within one Age second; no request ID line)",
    value="the object itself (so its id stays its own), its status, HPACK block and body view",
    cleared_by="its bound only; an object that is not the one remembered under its id misses",
    bound=64,
)

# -- rate limits (edge.ratelimit) -----------------------------------------------------------------

RATE_LIMIT_KEYS: Final = MemoSpec(
    name="rate limit keys",
    owner="edge.ratelimit.Gcra.buckets (one table per configured limit)",
    key="client network (an int), (b'h', header value) or (network, header value)",
    value="its GCRA bucket (theoretical arrival time, refusals held for the log)",
    cleared_by="never by a reload that keeps the limit's config; a changed limit starts afresh",
    bound=10_000_000,  # the most edge.rate_limits.*.max_keys allows (default 100,000)
    policy="idle",
)
RATE_LIMIT_CLIENTS: Final = MemoSpec(
    name="rate limit clients",
    owner="edge.ratelimit.RateLimits._clients (RateLimits.client)",
    key="peer address (with the X-Forwarded-For value when the peer is a trusted proxy)",
    value="the client address as decided and its network key under each limit",
    cleared_by="a config reload (new RateLimits)",
    bound=8192,
)

RATE_LIMIT_LANES: Final = MemoSpec(
    name="rate limit lanes",
    owner="edge.ratelimit.Plan.lanes (RateLimits.check; one per route with one client limit)",
    key="peer address (never a trusted proxy's)",
    value="the Lane: the limit's bucket for that peer, valid while its table forgets nothing",
    cleared_by="a config reload (new RateLimits); the table forgetting keys voids every lane",
    bound=8192,
)

#: Every memo above, for the tests and for readers.
MEMOS: Final = (
    REQUEST_HEADS,
    FIRST_SIGHTS,
    HEAD_SHAPES,
    CHECKED_PATHS,
    ROUTES,
    FILL_HEADERS,
    HIT_REPLAYS,
    SERVED_CODINGS,
    BYPASS_LOOKUPS,
    SHARED_FIELDS,
    CACHE_KEYS,
    CACHE_CONTROL_PARSES,
    TARGETED_CACHE_CONTROL_PARSES,
    HTTP_DATES,
    CACHE_CODINGS,
    CACHE_RULES,
    CACHE_KEY_HOSTS,
    DROP_MATCHERS,
    HOSTS,
    NEGOTIATIONS,
    RESPONSE_SHAPES,
    MEDIA_TYPE_PATTERNS,
    ACCESS_LOG_MIDDLES,
    HPACK_BLOCKS,
    RESPONSE_HEADS,
    RESPONSE_OBJECTS,
    RATE_LIMIT_KEYS,
    RATE_LIMIT_CLIENTS,
    RATE_LIMIT_LANES,
)

__all__ = ["MEMOS", "BoundedMemo", "MemoSpec"]
