"""The edge's HTTP cache: RFC 9111 semantics, coalesced fills, L1 memory + L2 Redis, purges.

Everything the edge needs is ``HttpCache``.  Its pieces, each usable alone:

* ``policy``: the RFC 9111/5861 rules as pure functions (storable? fresh? 304? invalidate?);
* ``key``: primary and Vary keys, with per-route query normalisation;
* ``entry``: a stored response pre-serialised for HTTP/1.1 (a hit is one write);
* ``store``: L1, bounded in bytes, CLOCK eviction, purge by key/prefix/surrogate key;
* ``coalesce``: one upstream fetch per key, hit-for-miss memory, one background refresh;
* ``requests``: what a lookup reads from a request's head, once (``prepare``);
* ``lookups``: what a lookup answers (``Lookup``), and the memo that replays a HIT;
* ``admission``: what a response becomes in the store, or why it is not stored;
* ``filling``: one fill (L1 again, L2, origin, store); ``fills``: the requests that wait for
  one, coalesced, and the background refreshes;
* ``purging``: purges asked for, applied, propagated, retried and remembered;
* ``redis_l2``: the POP-shared Redis level (``redis_codec``, ``redis_guard``: deadline and
  circuit breaker, ``redis_purge``, ``redis_broadcast``: purges to the other instances);
* ``metrics``: plain counters on the hot path, Prometheus families on scrape.

API (all headers are ``list[tuple[bytes, bytes]]`` with lower-case names)::

    cache = HttpCache(config.edge.cache, registry,
                      extra_headers=[(b"via", b"1.1 meridian-iad"), (b"x-meridian-region", b"iad")],
                      compressor=lambda body, coding: compress(body, coding, level_for(coding)),
                      negotiate=edge.compress.negotiate)
    await cache.start()                      # purge subscription (only with a Redis URL)
    cache.reconfigure(new_config.edge.cache)  # on SIGHUP: rules/limits now, entries kept

    cache.lookup(method, scheme, host, target, headers, now=None, extra=b"") -> Lookup   # sync
    cache.prepare(method, scheme, host, target, headers) -> Prepared   # the request-only part
    cache.lookup_prepared(prepared, now=None, extra=b"") -> Lookup     # lookup = both, in turn
    cache.storable_head(lookup, status, headers) -> str | None         # stream, not buffer?
    await cache.fill(lookup, fetch, extra=b"") -> Filled     # MISS / REVALIDATE, coalesced
    await cache.stored_only(lookup, extra=b"") -> Filled     # ONLY_IF_CACHED_L2: L1, L2 or 504
    cache.refresh(lookup, fetch) -> bool                     # STALE with lookup.refresh
    cache.invalidate(method, status, scheme, host, target, response_headers) -> int
    await cache.purges.purge_url(url) / purge_prefix(prefix) / purge_tag(tag) -> PurgeResult
    cache.check_purge_token(token) -> bool
    await cache.aclose()

``fetch`` is the edge's ``async (validators) -> UpstreamResponse``: a **GET** (also for HEAD
requests) of ``lookup.key.target`` (the normalised target: never the raw one), with the
client's request headers minus its conditionals plus ``validators``
(``policy.upstream_request_headers`` does exactly that), reading the whole body (decoded to
identity when the edge can; ``compressible`` set by the edge's own eligibility rules).  It
raises on failure (connect error, timeout, no healthy region): with a stored response inside
its stale-if-error window the cache then answers stale instead.  For a background refresh the
fetch must not depend on the client connection.

The edge's request path::

    r = cache.lookup(method, scheme, host, raw_target, headers)
    match r.kind:
        case LookupKind.HIT | LookupKind.ONLY_IF_CACHED:
            transport.write(r.wire)                       # the whole response, pre-built
        case LookupKind.STALE:
            transport.write(r.wire)
            if r.refresh:
                cache.refresh(r, fetch)                   # at most one per key, in background
        case LookupKind.ONLY_IF_CACHED_L2:               # only-if-cached, an L2 to ask
            f = await cache.stored_only(r)                # L2's copy (HIT) or the 504, alone
            transport.write(f.wire)
        case LookupKind.MISS | LookupKind.REVALIDATE:
            f = await cache.fill(r, fetch)                # coalesce -> L2 -> origin -> store
            if f.wire is not None:
                transport.write(f.wire)                   # X-Cache: MISS/HIT/REVALIDATED/STALE
            else:
                forward(f.response, x_cache=b"MISS")      # not storable: the edge writes it
                # (for HEAD: headers only; the fetch was a GET)
        case LookupKind.BYPASS:
            response = await proxy(...)                   # X-Cache: BYPASS
            cache.invalidate(method, response.status, scheme, host, raw_target, response.headers)

A fetch may return an ``UpstreamResponse`` with ``complete=False`` for a response the cache
will not keep (``storable_head`` says why from the head alone, or the body outgrew
``max_object``): the edge then streams that body to its own client itself; it is never stored
but still counts as the origin's answer (5xx -> stale-if-error, no-store -> supersedes).

``fill`` re-raises the fetch's exception when there is nothing stale to serve (the edge
answers 502/504 itself).  Served bytes carry ``x-cache`` and ``age`` and the cache-wide
``extra_headers``; ``extra`` adds pre-formatted per-request lines (``b"x-request-id: 7\\r\\n"``)
at the cost of one concatenation.  HTTP/1.0 or ``Connection: close`` clients: write the same
bytes and close (the head has no Connection header).

Metrics (a collector on the registry, plain integer counters on the hot path):
``meridian_cache_hits_total{layer}``, ``meridian_cache_misses_total``,
``meridian_cache_stale_served_total{reason}``, ``meridian_cache_bypass_total{reason}``,
``meridian_cache_coalesced_waiters_total``, ``meridian_cache_evictions_total``,
``meridian_cache_redis_errors_total{reason}``, gauges ``meridian_cache_bytes``,
``meridian_cache_entries``, ``meridian_cache_hit_ratio``, ``meridian_cache_redis_circuit_open``.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry

from edge.memos import BYPASS_LOOKUPS, BoundedMemo
from meridian.config import CacheConfig
from meridian.log import get_logger

from .admission import Admission
from .background import Background
from .entry import (
    X_CACHE_BYPASS,
    X_CACHE_HIT,
    X_CACHE_MISS,
    X_CACHE_REVALIDATED,
    X_CACHE_STALE,
    Compressor,
    Entry,
)
from .fills import Filled, Fills
from .key import DEFAULT_RULE, CacheKey, Coding, KeyBuilder, Negotiator, negotiate_coding
from .lookups import HitMemo, Lookup, LookupKind, only_if_cached_wire, serve
from .lookups import memo_hit as _memo_hit
from .messages import Fetch, RequestInfo, UpstreamResponse
from .metrics import CacheMetrics
from .policy import NO_DIRECTIVES, Header, Headers, Use, decide
from .purge_queue import PurgeBacklog
from .purging import SOFT_PURGE, PurgeResult, Purges, invalidated
from .redis_l2 import RedisL2, RedisTarget
from .requests import Prepared, RequestReader
from .store import MemoryStore

log = get_logger("cache")


# Module-level aliases: attribute access on an Enum class costs ~10x a global lookup (3.11).
_HIT: Final = LookupKind.HIT
_STALE: Final = LookupKind.STALE
_MISS: Final = LookupKind.MISS
#: A request without cache directives (``RequestInfo.cc``).
_PLAIN: Final = NO_DIRECTIVES
_REVALIDATE: Final = LookupKind.REVALIDATE
_ONLY_IF_CACHED: Final = LookupKind.ONLY_IF_CACHED
_ONLY_IF_CACHED_L2: Final = LookupKind.ONLY_IF_CACHED_L2
_FRESH: Final = Use.FRESH
_USE_STALE: Final = Use.STALE
#: A NamedTuple made per hit from all its fields: ``tuple.__new__``, not the generated one.
_new_tuple: Final = tuple.__new__


# --------------------------------------------------------------------------------------------
# The facade

#: The key memo lives outside the cache's bound: 1/16 of it, at most 4 MiB.
_KEY_MEMO_MAX: Final = 4 << 20


def _key_memo_bytes(config: CacheConfig) -> int:
    return max(64 * 1024, min(_KEY_MEMO_MAX, config.memory // 16))


class HttpCache:
    """The edge cache; see the module docstring for the call sequence."""

    def __init__(
        self,
        config: CacheConfig,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.time,
        extra_headers: Sequence[Header] = (),
        compressor: Compressor | None = None,
        negotiate: Negotiator = negotiate_coding,
        compress_offload_above: int = 64 * 1024,
        l2: RedisL2 | None = None,
        honour_request_no_cache: bool = True,
        cross_instance_wait: float = 1.0,
        purge_race_window: float = 30.0,
        instance_id: str | None = None,
        purge_backlog: PurgeBacklog | None = None,
    ) -> None:
        """``clock`` is wall time (freshness is compared with origin Dates).  ``l2`` is built
        from ``config.redis_url`` when not given.  ``cross_instance_wait`` bounds how long a
        fill waits for another instance that holds the POP-wide fill lock.  Fills that started
        up to ``purge_race_window`` seconds before a purge are not stored (they may carry the
        purged content)."""
        self.config = config
        self.enabled = config.enabled
        self.metrics = CacheMetrics(self)
        self.clock = clock
        self.reader = RequestReader(negotiate, honour_request_no_cache)
        self._extra_head = b"".join(n + b": " + v + b"\r\n" for n, v in extra_headers)
        self.admission = Admission(
            config.targets,
            compressor=compressor,
            extra_head=self._extra_head,
            negotiate=negotiate,
        )
        self.keys = KeyBuilder(config.rules, memo_bytes=_key_memo_bytes(config))
        self.store = MemoryStore(config.memory, config.max_object, negotiate=negotiate)
        if l2 is None and config.enabled:
            l2 = RedisL2.from_config(
                config, clock=clock, instance_id=instance_id, negotiate=negotiate
            )
        if l2 is not None and l2.on_error is None:
            l2.on_error = self.metrics.count_redis_error
        self.l2 = l2
        self.background = Background()
        self.purges = Purges(
            self.store,
            l2,
            self.keys,
            clock,
            self.background.spawn,
            race_window=purge_race_window,
            backlog=purge_backlog,
            on_retry=self.metrics.count_purge_retry,
        )
        self.fills = Fills(
            config,
            self.store,
            l2,
            self.admission,
            self.purges,
            self.metrics,
            clock,
            self.background.spawn,
            negotiate=negotiate,
            cross_instance_wait=cross_instance_wait,
            compressor=compressor,
            compress_offload_above=compress_offload_above,
            only_if_cached_wire=only_if_cached_wire(self._extra_head),
        )
        #: ``edge.memos.BYPASS_LOOKUPS``, ``SERVED_CODINGS`` and ``SHARED_FIELDS``.
        self._bypass: BoundedMemo[str, Lookup] = BoundedMemo(BYPASS_LOOKUPS)
        if registry is not None:
            registry.register(self.metrics)

    # ----------------------------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        """Start listening for purges from the POP's other instances (no-op without Redis)."""
        if self.l2 is not None:
            self.l2.start(self.purges.on_message, self._on_resync)

    async def drain(self) -> None:
        """Wait for fills, refreshes and Redis writes in flight (tests, graceful shutdown)."""
        while self.background or len(self.fills):
            await self.fills.drain()
            await self.background.wait()

    async def aclose(self) -> None:
        await self.drain()
        await self.purges.aclose()
        if self.l2 is not None:
            await self.l2.aclose()

    def reconfigure(self, config: CacheConfig) -> None:
        """Apply a reloaded config, keeping what is stored.

        Rules, limits, timeouts and ``enabled`` take effect at once (stored entries keep the
        freshness they were stored with; a smaller memory bound evicts now).  A changed
        ``redis_url`` needs a restart: it is logged and ignored.
        """
        if RedisTarget.from_config(config) != RedisTarget.from_config(self.config):
            log.warning("cache_redis_url_change_ignored", reason="restart to change redis_url")
        self.config = config
        self.enabled = config.enabled
        self.keys = KeyBuilder(config.rules, memo_bytes=_key_memo_bytes(config))
        self.store.max_bytes = config.memory
        self.store.max_object = config.max_object
        self.store.evict()
        self.purges.keys = self.keys
        self.fills.set_limits(config)
        self.admission.set_targets(config.targets)

    @property
    def targeted_fields(self) -> frozenset[bytes]:
        """RFC 9213 fields this cache consumes: never sent on, stored or not."""
        return self.admission.targeted_fields

    # ----------------------------------------------------------------------------------------
    # Lookup (synchronous, L1 only)

    def _bypassed(self, reason: str) -> Lookup:
        self.metrics.count_bypass(reason)
        lookup = self._bypass.get(reason)
        if lookup is None:
            lookup = self._bypass.remember(reason, Lookup(LookupKind.BYPASS, reason=reason))
        return lookup

    def lookup(
        self,
        method: bytes,
        scheme: bytes,
        host: bytes,
        target: bytes,
        headers: Headers,
        now: float | None = None,
        extra: bytes = b"",
    ) -> Lookup:
        """Classify a request against L1 and, for HIT/STALE, build the response bytes.

        ``target`` is the raw request target; ``host`` the Host header (or b"" for an
        absolute-form target, whose authority wins).  ``now`` defaults to the cache's clock.
        The same as ``lookup_prepared(prepare(...))``.
        """
        return self.lookup_prepared(self.prepare(method, scheme, host, target, headers), now, extra)

    def prepare(
        self, method: bytes, scheme: bytes, host: bytes, target: bytes, headers: Headers
    ) -> Prepared:
        """Everything ``lookup`` derives from the request alone (key, rule, the request's
        cache directives, conditionals and coding), with no clock and no store.

        A client repeating a request byte for byte can reuse the result: the edge keeps it
        with the request head it memoises, so a hit skips key building and header parsing.
        Valid until ``reconfigure`` (``lookup_prepared`` checks and prepares again).
        """
        return self.reader.prepare(self.keys, self.enabled, method, scheme, host, target, headers)

    def lookup_prepared(
        self, prepared: Prepared, now: float | None = None, extra: bytes = b""
    ) -> Lookup:
        """``lookup`` for a request ``prepare`` has seen: the store, freshness and bytes."""
        if prepared.keys is not self.keys:  # reconfigured since: rules may differ
            prepared = self.prepare(*prepared[1:6])
        if prepared.bypass:
            return self._bypassed(prepared.bypass)
        key, request = prepared.key, prepared.request
        assert key is not None and request is not None
        return classify(
            self,
            key,
            request,
            self.store.get(key.primary, request.headers),
            self.clock() if now is None else now,
            extra,
        )

    #: ``lookups.memo_hit``: a ``HitMemo`` for a HIT or a stale-while-revalidate answer.
    memo_hit = staticmethod(_memo_hit)

    def replay_hit(self, memo: HitMemo, now: float) -> bytes | None:
        """``memo.wire`` when it is still this cache's answer at ``now``, counted (as an L1 hit
        or a stale answer), else None.  One dict lookup and a few comparisons."""
        entry = memo.ref()  # ``memo.entry`` and ``entry.key``, without their properties
        if (
            entry is None
            or not memo.since <= now < memo.until
            or memo.keys is not self.keys
            or self.store.get_key(memo.key) is not entry
        ):
            return None
        wire = entry.cached_wire(memo.slot)
        if wire is not None:
            entry.visited = True
            if memo.stale:
                self.metrics.count_stale(memo.stale)
            else:
                self.metrics.l1_hits += 1
        return wire

    def storable_head(self, lookup: Lookup, status: int, headers: Headers) -> str | None:
        """Why a fill's response with this status and these headers will not be stored (its
        body need not be buffered: the edge may stream it), or None when it may be.

        The same rules ``fill`` applies once the body is in, minus what needs the body.
        """
        key, request = lookup.key, lookup.request
        if key is None or request is None:
            return "lookup"
        return self.admission.storable_head(key, request, status, headers, self.clock())

    # ----------------------------------------------------------------------------------------
    # Fill (asynchronous: coalescing, L2, origin)

    def fill(self, lookup: Lookup, fetch: Fetch, extra: bytes = b"") -> Coroutine[Any, Any, Filled]:
        """Answer a MISS or REVALIDATE: one coalesced fetch per key, stored when allowed (the
        ``Fills.fill`` coroutine itself: no layer of its own to pass through on every resume)."""
        return self.fills.fill(lookup, fetch, extra)

    def refresh(self, lookup: Lookup, fetch: Fetch) -> bool:
        """Revalidate a STALE lookup in the background; False when one is already running."""
        return self.fills.refresh(lookup, fetch)

    def stored_only(self, lookup: Lookup, extra: bytes = b"") -> Coroutine[Any, Any, Filled]:
        """Answer an ONLY_IF_CACHED_L2 lookup from L1 or L2, else the 504 (``Fills``')."""
        return self.fills.stored_only(lookup, extra)

    # ----------------------------------------------------------------------------------------
    # Invalidation and purges

    def invalidate(
        self,
        method: bytes,
        status: int,
        scheme: bytes,
        host: bytes,
        target: bytes,
        response_headers: Headers,
    ) -> int:
        """After an unsafe request's response: drop the target URI and same-origin
        Location/Content-Location (RFC 9111 4.4) here, in Redis and in the POP's other
        instances (in the background).  Returns the L1 entries removed."""
        if not self.enabled:
            return 0
        return self.purges.invalidate(
            invalidated(self.keys, method, status, scheme, host, target, response_headers)
        )

    def check_purge_token(self, presented: bytes | str) -> bool:
        """Constant-time check of a purge request's token; always False when none is set."""
        expected = self.config.purge_token
        if not expected:
            return False
        given = presented.encode("utf-8") if isinstance(presented, str) else presented
        return hmac.compare_digest(expected.encode("utf-8"), given)

    def _on_resync(self) -> None:
        # Purges broadcast while we were not subscribed are lost: start L1 afresh.
        removed = self.store.clear()
        log.info("cache_l1_cleared_after_resubscribe", removed=removed)


def classify(
    cache: HttpCache,
    key: CacheKey,
    request: RequestInfo,
    entry: Entry | None,
    now: float,
    extra: bytes,
) -> Lookup:
    """What ``cache`` answers a request (``request``, keyed ``key``) that found ``entry`` (or
    nothing) in L1 at ``now``: freshness, conditionals, ranges and, for HIT/STALE, the bytes
    (``extra``: per-request header lines): ``HttpCache.lookup_prepared``'s verdict."""
    if entry is not None and request.authorized and not entry.response.auth_ok:
        entry = None
    cc = request.cc
    if entry is not None:
        use, reason = decide(entry.response.freshness, cc, now)
        if use is _FRESH:  # the hot path
            return fresh_hit(cache, key, request, entry, now, extra)
    if entry is None:
        if cc.only_if_cached:
            return only_if_cached(cache, key, request)
        if cc.no_store:
            return cache._bypassed("request-no-store")
        return Lookup(_MISS, key=key, request=request)
    if use is _USE_STALE:
        cache.metrics.count_stale(reason)
        wire = serve(entry, request, X_CACHE_STALE, now, extra)
        return Lookup(_STALE, wire, key, entry, request, reason, refresh=True)
    if cc.only_if_cached:
        return only_if_cached(cache, key, request)
    if cc.no_store:
        return cache._bypassed("request-no-store")
    return Lookup(_REVALIDATE, key=key, entry=entry, request=request)


def only_if_cached(cache: HttpCache, key: CacheKey, request: RequestInfo) -> Lookup:
    """An ``only-if-cached`` request's verdict when L1 has nothing usable for it (nothing, or
    a response to validate first): ask L2 (``stored_only``) when one is there to ask, else
    the 504 now.  An L2 whose breaker is open is not asked: the 504 at once, as without one."""
    l2 = cache.l2
    if l2 is not None and l2.available:
        return Lookup(_ONLY_IF_CACHED_L2, b"", key, None, request)
    return Lookup(_ONLY_IF_CACHED, cache.fills.only_if_cached_wire, key)


def lookup_read(
    cache: HttpCache,
    scheme: bytes,
    host: bytes,
    target: bytes,
    read: RequestInfo,
    headers: Headers,
    more: Callable[[], Headers] | None = None,
    extra: bytes = b"",
    path: bytes | None = None,
    misses: bool = False,
) -> Lookup | None:
    """``cache``'s fresh HIT for a GET or HEAD seen for the first time whose headers were
    read before (``read``: what ``RequestReader.read`` made of headers like its own, but for
    fields a lookup never reads), else None with nothing counted (the caller looks up in full);
    with ``misses``, a miss is its MISS, carrying ``read``.  The request's own fields are
    ``headers`` plus ``more()``, called only for a resource that varies.  The key is built
    without its memo (given ``path``: ``build_origin``, ``target`` origin-form without a
    fragment)."""
    keys = cache.keys
    key = (
        keys.build_once(scheme, host, target)
        if path is None
        else keys.build_origin(scheme, host, target, path)
    )
    if key.rule.bypass:
        return None
    store = cache.store
    primary = key.primary
    if more is not None and store.vary_names(primary) is not None:
        headers = [*headers, *more()]
    entry = store.get(primary, headers)
    if entry is None:  # a MISS, but for a request with directives (``classify``)
        if misses and read.cc is _PLAIN:
            # Lookup(...) without the NamedTuple's generated __new__ (one per such miss).
            return _new_tuple(Lookup, (_MISS, b"", key, None, read, "", False))
        return None
    if read.authorized and not entry.response.auth_ok:
        return None
    now = cache.clock()
    if decide(entry.response.freshness, read.cc, now)[0] is not _FRESH:
        return None
    return fresh_hit(cache, key, read, entry, now, extra)


def fresh_hit(
    cache: HttpCache, key: CacheKey, request: RequestInfo, entry: Entry, now: float, extra: bytes
) -> Lookup:
    """The HIT of a request whose stored response ``entry`` is fresh at ``now``, counted: the
    entry's bytes for its coding (a 304 for a matching conditional, a range's part)."""
    cache.metrics.l1_hits += 1
    if_none_match = request.if_none_match
    if_modified_since = request.if_modified_since
    if (if_none_match is not None or if_modified_since is not None) and entry.not_modified_for(
        if_none_match, if_modified_since
    ):
        wire = entry.wire_not_modified(request.coding, now, X_CACHE_HIT, extra)
    elif request.range is not None:
        wire = serve(entry, request, X_CACHE_HIT, now, extra)
    else:
        wire = entry.wire(request.coding, now, request.head, X_CACHE_HIT, extra)
    # Lookup(_HIT, wire, key, entry), without the NamedTuple's generated __new__ (per hit).
    return _new_tuple(Lookup, (_HIT, wire, key, entry, None, "", False))


__all__ = [
    "DEFAULT_RULE",
    "SOFT_PURGE",
    "X_CACHE_BYPASS",
    "X_CACHE_HIT",
    "X_CACHE_MISS",
    "X_CACHE_REVALIDATED",
    "X_CACHE_STALE",
    "CacheKey",
    "CacheMetrics",
    "Coding",
    "Compressor",
    "Entry",
    "Fetch",
    "Filled",
    "HitMemo",
    "HttpCache",
    "Lookup",
    "LookupKind",
    "Prepared",
    "PurgeResult",
    "RedisL2",
    "RequestInfo",
    "UpstreamResponse",
    "lookup_read",
]
