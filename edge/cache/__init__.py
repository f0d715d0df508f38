"""The edge's HTTP cache: RFC 9111 semantics, coalesced fills, L1 memory + L2 Redis, purges.

Everything the edge needs is ``HttpCache``.  Its pieces, each usable alone:

* ``policy``: the RFC 9111/5861 rules as pure functions (storable? fresh? 304? invalidate?);
* ``key``: primary and Vary keys, with per-route query normalisation;
* ``entry``: a stored response pre-serialised for HTTP/1.1 (a hit is one write);
* ``store``: L1, bounded in bytes, CLOCK eviction, purge by key/prefix/surrogate key;
* ``coalesce``: one upstream fetch per key, hit-for-miss memory, one background refresh;
* ``redis_l2``: the POP-shared Redis level, circuit breaker, purge broadcast.

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
    cache.refresh(lookup, fetch) -> bool                     # STALE with lookup.refresh
    cache.invalidate(method, status, scheme, host, target, response_headers) -> int
    await cache.purge_url(url) / purge_prefix(prefix) / purge_tag(tag) -> PurgeResult
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

import asyncio
import enum
import hmac
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Final, NamedTuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.memos import BYPASS_LOOKUPS, BoundedMemo
from meridian.config import CacheConfig
from meridian.log import get_logger

from .admission import Admission
from .coalesce import Coalescer, Role
from .entry import (
    X_CACHE_BYPASS,
    X_CACHE_HIT,
    X_CACHE_MISS,
    X_CACHE_REVALIDATED,
    X_CACHE_STALE,
    Compressor,
    Entry,
)
from .filling import FROM_L1, FROM_L2, FROM_ORIGIN, FROM_STALE, Filling, Outcome
from .key import (
    DEFAULT_RULE,
    CacheKey,
    Coding,
    KeyBuilder,
    Negotiator,
    negotiate_coding,
    normalise_host,
    split_target,
)
from .messages import Fetch, RequestInfo, UpstreamResponse
from .policy import (
    NO_DIRECTIVES,
    STALE_IF_ERROR,
    STALE_WHILE_REVALIDATE,
    Header,
    Headers,
    Use,
    decide,
    invalidation_targets,
    stable_until,
)
from .purge_queue import PurgeBacklog
from .purging import KINDS, SOFT_PURGE, PurgeResult, Purges
from .purging import soft as soft_kind
from .redis_l2 import RedisL2, RedisTarget
from .requests import Prepared, RequestReader
from .store import MemoryStore

log = get_logger("cache")


class LookupKind(enum.Enum):
    #: Fresh: write ``Lookup.wire``.
    HIT = "hit"
    #: Stale but usable now: write ``Lookup.wire``; start ``refresh`` when ``Lookup.refresh``.
    STALE = "stale"
    #: Stored but must be validated first: ``fill`` (conditional fetch, stale-if-error).
    REVALIDATE = "revalidate"
    #: Nothing stored: ``fill``.
    MISS = "miss"
    #: Not for the cache (method, rule, request body or precondition, request no-store,
    #: cache disabled): proxy it; why in ``reason``.
    BYPASS = "bypass"
    #: ``Cache-Control: only-if-cached`` and nothing usable: write ``Lookup.wire`` (a 504).
    ONLY_IF_CACHED = "only_if_cached"


# Module-level aliases: attribute access on an Enum class costs ~10x a global lookup (3.11).
_HIT: Final = LookupKind.HIT
_STALE: Final = LookupKind.STALE
_MISS: Final = LookupKind.MISS
_REVALIDATE: Final = LookupKind.REVALIDATE
_ONLY_IF_CACHED: Final = LookupKind.ONLY_IF_CACHED
_FRESH: Final = Use.FRESH
_USE_STALE: Final = Use.STALE


# Lookup and RequestInfo are made per request: NamedTuples, because a frozen dataclass's
# __init__ costs about five times as much, which would dominate a cache hit.


class Lookup(NamedTuple):
    """The L1 answer for one request."""

    kind: LookupKind
    #: The complete response to write (HIT, STALE, ONLY_IF_CACHED), else empty.
    wire: bytes = b""
    key: CacheKey | None = None
    entry: Entry | None = None
    #: Set for STALE, REVALIDATE and MISS (what ``fill`` and ``refresh`` need); not for HIT.
    request: RequestInfo | None = None
    #: BYPASS: why; STALE: the stale reason.
    reason: str = ""
    #: STALE: a background refresh should be started.
    refresh: bool = False


class HitMemo:
    """The bytes of a HIT (or a STALE answer served while one refresh runs) for one prepared
    request, reusable (``replay_hit``) while ``since <= now < until`` and ``entry`` is still
    the one stored under its key: until then the response stays fresh (or within its
    stale-while-revalidate window) with the same whole-second Age, so ``lookup_prepared``
    would build these very bytes again.  A STALE memo also stands for the refresh its first
    answer started: at most one refresh is asked for per key and Age second.

    Holds nothing the cache does not count: the entry weakly and the bytes as the entry's own
    cached response (``Entry.cached_wire``), so an evicted entry is freed at once.  (It held
    both strongly before: the edge's 4,096 memoised request heads could keep that many evicted
    responses alive beyond the cache's byte bound.)  ``wire`` is valid after ``replay_hit``
    returned True."""

    __slots__ = ("_entry", "keys", "since", "slot", "stale", "until")

    def __init__(
        self,
        keys: KeyBuilder,
        entry: Entry,
        slot: int,
        since: float,
        until: float,
        stale: str = "",
    ) -> None:
        self.keys = keys
        self._entry = weakref.ref(entry)
        self.slot = slot
        self.since = since
        self.until = until
        #: The stale reason for a STALE answer (a metric label), "" for a HIT.
        self.stale = stale

    @property
    def entry(self) -> Entry | None:
        return self._entry()

    @property
    def wire(self) -> bytes:
        entry = self._entry()
        wire = entry.cached_wire(self.slot) if entry is not None else None
        if wire is None:
            raise LookupError("the memoised response is gone (replay_hit said so)")
        return wire


class Filled(NamedTuple):
    """The result of ``fill``: bytes to write, or an unstored response for the edge to forward."""

    wire: bytes | None
    response: UpstreamResponse | None
    x_cache: bytes
    entry: Entry | None = None


# --------------------------------------------------------------------------------------------
# Metrics


class CacheMetrics(Collector):
    """Plain integers bumped on the hot path, turned into Prometheus families on scrape."""

    def __init__(self, cache: HttpCache) -> None:
        self._cache = cache
        self.l1_hits = 0
        self.l2_hits = 0
        self.coalesced_hits = 0
        self.misses = 0
        self.stale: dict[str, int] = {}
        self.bypass: dict[str, int] = {}
        self.coalesced_waiters = 0
        self.redis_errors: dict[str, int] = {}
        self.purge_retries = 0

    @property
    def hits(self) -> dict[str, int]:
        return {"l1": self.l1_hits, "l2": self.l2_hits, "coalesced": self.coalesced_hits}

    def count_stale(self, reason: str) -> None:
        self.stale[reason] = self.stale.get(reason, 0) + 1

    def count_bypass(self, reason: str) -> None:
        self.bypass[reason] = self.bypass.get(reason, 0) + 1

    def count_redis_error(self, reason: str) -> None:
        self.redis_errors[reason] = self.redis_errors.get(reason, 0) + 1

    def count_waiter(self) -> None:
        self.coalesced_waiters += 1

    def count_purge_retry(self) -> None:
        self.purge_retries += 1

    def collect(self) -> Iterable[Metric]:
        store = self._cache.store
        yield _labelled(
            CounterMetricFamily(
                "meridian_cache_hits", "Requests served fresh from the cache.", labels=["layer"]
            ),
            self.hits,
        )
        yield CounterMetricFamily(
            "meridian_cache_misses", "Requests that needed an upstream fetch.", value=self.misses
        )
        yield _labelled(
            CounterMetricFamily(
                "meridian_cache_stale_served", "Stale responses served.", labels=["reason"]
            ),
            self.stale,
        )
        yield _labelled(
            CounterMetricFamily(
                "meridian_cache_bypass", "Requests not handled by the cache.", labels=["reason"]
            ),
            self.bypass,
        )
        yield CounterMetricFamily(
            "meridian_cache_coalesced_waiters",
            "Requests that waited for another request's upstream fetch.",
            value=self.coalesced_waiters,
        )
        yield CounterMetricFamily(
            "meridian_cache_evictions", "L1 entries evicted for space.", value=store.evictions
        )
        yield _labelled(
            CounterMetricFamily(
                "meridian_cache_redis_errors", "Redis calls failed or timed out.", labels=["reason"]
            ),
            self.redis_errors,
        )
        yield GaugeMetricFamily("meridian_cache_bytes", "Bytes held by L1.", value=store.bytes)
        yield GaugeMetricFamily(
            "meridian_cache_purges_pending",
            "Purges Redis has not taken yet (stalled or down), retried with backoff.",
            value=len(self._cache.purge_backlog),
        )
        yield CounterMetricFamily(
            "meridian_cache_purge_retries",
            "Attempts to apply pending purges to Redis.",
            value=self.purge_retries,
        )
        yield GaugeMetricFamily("meridian_cache_entries", "Entries held by L1.", value=len(store))
        hits = sum(self.hits.values())
        lookups = hits + self.misses
        yield GaugeMetricFamily(
            "meridian_cache_hit_ratio",
            "Fresh hits over hits plus misses since start.",
            value=hits / lookups if lookups else 0.0,
        )
        l2 = self._cache.l2
        yield GaugeMetricFamily(
            "meridian_cache_redis_circuit_open",
            "1 while Redis is being skipped after repeated errors.",
            value=1.0 if l2 is not None and not l2.available else 0.0,
        )

    def describe(self) -> Iterable[Metric]:
        return []  # families are dynamic; registering must not call collect() early


def _labelled(family: CounterMetricFamily, values: dict[str, int]) -> CounterMetricFamily:
    for label, value in sorted(values.items()):
        family.add_metric([label], value)
    return family


# --------------------------------------------------------------------------------------------
# The facade

#: The key memo lives outside the cache's bound: 1/16 of it, at most 4 MiB.
_KEY_MEMO_MAX: Final = 4 << 20


def _key_memo_bytes(config: CacheConfig) -> int:
    return max(64 * 1024, min(_KEY_MEMO_MAX, config.memory // 16))


#: A purge kind with this prefix marks stale instead of removing (``purge_url(soft=True)``).
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
        self._negotiate = negotiate
        self._compressor = compressor
        self._compress_offload_above = compress_offload_above
        self.reader = RequestReader(negotiate, honour_request_no_cache)
        self._cross_instance_wait = cross_instance_wait
        self._extra_head = b"".join(n + b": " + v + b"\r\n" for n, v in extra_headers)
        self.admission = Admission(
            config.targets,
            compressor=compressor,
            extra_head=self._extra_head,
            negotiate=negotiate,
        )
        self._only_if_cached_wire = (
            b"HTTP/1.1 504 Gateway Timeout\r\ncontent-length: 0\r\n"
            + self._extra_head
            + b"x-cache: MISS\r\n\r\n"
        )
        self.keys = KeyBuilder(config.rules, memo_bytes=_key_memo_bytes(config))
        self.store = MemoryStore(config.memory, config.max_object, negotiate=negotiate)
        self._coalescer: Coalescer[Outcome] = Coalescer(
            lock_timeout=config.lock_timeout,
            hit_for_miss=config.hit_for_miss,
            clock=clock,
            on_wait=self.metrics.count_waiter,
            on_background_error=self._background_failed,
        )
        if l2 is None and config.enabled and (target := RedisTarget.from_config(config)):
            l2 = RedisL2(
                target,
                timeout=config.redis_timeout,
                max_value=config.redis_max_value,
                clock=clock,
                instance_id=instance_id,
                on_error=self.metrics.count_redis_error,
                negotiate=negotiate,
            )
        if l2 is not None and l2.on_error is None:
            l2.on_error = self.metrics.count_redis_error
        self.l2 = l2
        self._tasks: set[asyncio.Task[Any]] = set()
        self.purges = Purges(
            self.store,
            l2,
            clock,
            race_window=purge_race_window,
            backlog=purge_backlog,
            on_retry=self.metrics.count_purge_retry,
        )
        self.filling = Filling(
            self.store,
            l2,
            self.admission,
            self.purges,
            clock,
            self._spawn,
            negotiate=negotiate,
            lock_timeout=config.lock_timeout,
            cross_instance_wait=cross_instance_wait,
            compressor=compressor,
            compress_offload_above=compress_offload_above,
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
        while self._tasks or len(self._coalescer):
            await self._coalescer.drain()
            if self._tasks:
                await asyncio.gather(*tuple(self._tasks), return_exceptions=True)

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
        self._coalescer.lock_timeout = config.lock_timeout
        self.filling.lock_timeout = config.lock_timeout
        self._coalescer.hit_for_miss.ttl = config.hit_for_miss
        self.admission.set_targets(config.targets)

    @property
    def targeted_fields(self) -> frozenset[bytes]:
        """RFC 9213 fields this cache consumes: never sent on, stored or not."""
        return self.admission.targeted_fields

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _background_failed(self, error: BaseException) -> None:
        log.debug("cache_refresh_failed", error=str(error) or type(error).__name__)

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
        if now is None:
            now = self.clock()
        entry = self.store.get(key.primary, request.headers)
        if entry is not None and request.authorized and not entry.response.auth_ok:
            entry = None
        cc = request.cc
        if entry is not None:
            use, reason = decide(entry.response.freshness, cc, now)
            if use is _FRESH:  # the hot path
                self.metrics.l1_hits += 1
                if_none_match = request.if_none_match
                if_modified_since = request.if_modified_since
                if (
                    if_none_match is not None or if_modified_since is not None
                ) and entry.not_modified_for(if_none_match, if_modified_since):
                    wire = entry.wire_not_modified(request.coding, now, X_CACHE_HIT, extra)
                elif request.range is not None:
                    wire = self._serve(entry, request, X_CACHE_HIT, now, extra)
                else:
                    wire = entry.wire(request.coding, now, request.head, X_CACHE_HIT, extra)
                return Lookup(_HIT, wire, key, entry)
        if entry is None:
            if cc.only_if_cached:
                return Lookup(_ONLY_IF_CACHED, self._only_if_cached_wire, key)
            if cc.no_store:
                return self._bypassed("request-no-store")
            return Lookup(_MISS, key=key, request=request)
        if use is _USE_STALE:
            self.metrics.count_stale(reason)
            wire = self._serve(entry, request, X_CACHE_STALE, now, extra)
            return Lookup(_STALE, wire, key, entry, request, reason, refresh=True)
        if cc.only_if_cached:
            return Lookup(_ONLY_IF_CACHED, self._only_if_cached_wire, key)
        if cc.no_store:
            return self._bypassed("request-no-store")
        return Lookup(_REVALIDATE, key=key, entry=entry, request=request)

    def memo_hit(
        self,
        prepared: Prepared,
        lookup: Lookup,
        now: float,
        unshared: frozenset[bytes] = frozenset(),
    ) -> HitMemo | None:
        """A ``HitMemo`` for a HIT or a stale-while-revalidate answer of
        ``lookup_prepared(prepared, now)``, or None when the answer may change sooner than
        the next Age tick (no stable window, request directives).

        ``unshared``: request fields the memo's key ignores (``edge.fasthead.MeaningKey``); an
        entry that varies on one of them is never memoised (each request must be matched)."""
        request, entry = prepared.request, lookup.entry
        if entry is None or request is None:
            return None
        for name in entry.response.vary:
            if name in unshared:
                return None
        if lookup.kind is _STALE:
            if lookup.reason != STALE_WHILE_REVALIDATE:
                return None
        elif lookup.kind is not _HIT:
            return None
        if request.cc is not NO_DIRECTIVES:  # max-age, min-fresh, max-stale: per request
            return None
        until = stable_until(entry.response.freshness, now)
        if until <= now:
            return None
        slot = entry.slot_of(lookup.wire)
        if slot is None:  # built per request (extra header lines): nothing to replay
            return None
        stale = lookup.reason if lookup.kind is _STALE else ""
        return HitMemo(prepared.keys, entry, slot, now, until, stale)

    def replay_hit(self, memo: HitMemo, now: float) -> bool:
        """Whether ``memo.wire`` is still this cache's answer at ``now``; counted (as an L1 hit
        or a stale answer) when it is.  One dict lookup and a few comparisons."""
        entry = memo.entry
        if (
            entry is not None
            and memo.since <= now < memo.until
            and memo.keys is self.keys
            and self.store.get_key(entry.key) is entry
            and entry.cached_wire(memo.slot) is not None
        ):
            entry.visited = True
            if memo.stale:
                self.metrics.count_stale(memo.stale)
            else:
                self.metrics.l1_hits += 1
            return True
        return False

    @staticmethod
    def _serve(
        entry: Entry, request: RequestInfo, x_cache: bytes, now: float, extra: bytes
    ) -> bytes:
        if (
            request.if_none_match is not None or request.if_modified_since is not None
        ) and entry.not_modified_for(request.if_none_match, request.if_modified_since):
            return entry.wire_not_modified(request.coding, now, x_cache, extra)
        if request.range is not None:  # evaluated after the conditionals (RFC 9110 13.2.2)
            ranged = entry.wire_range(request.range, request.if_range, now, x_cache, extra)
            if ranged is not None:
                return ranged
        return entry.wire(request.coding, now, request.head, x_cache, extra)

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

    async def fill(self, lookup: Lookup, fetch: Fetch, extra: bytes = b"") -> Filled:
        """Answer a MISS or REVALIDATE: one coalesced fetch per key, stored when allowed."""
        key, request = lookup.key, lookup.request
        fillable = lookup.kind is LookupKind.MISS or lookup.kind is LookupKind.REVALIDATE
        if key is None or request is None or not fillable:
            raise ValueError(f"fill() needs a MISS or REVALIDATE lookup, got {lookup.kind}")
        for _round in range(2):
            coalesce_key = self.filling.coalesce_key(key, request)
            outcome, role = await self._coalescer.run(
                coalesce_key, lambda: self.filling.fill_once(key, request, lookup.entry, fetch)
            )
            entry = outcome.entry
            if role is not Role.WAITER or entry is None:
                self._count(outcome)
                return self._deliver(outcome, request, extra + outcome.leader_lines)
            if self.filling.usable_by(entry, request):
                if outcome.source == FROM_STALE:
                    self.metrics.count_stale(STALE_IF_ERROR)
                    return self._deliver(outcome, request, extra)
                self.metrics.coalesced_hits += 1
                return self._deliver(outcome._replace(x_cache=X_CACHE_HIT), request, extra)
            # The leader's response is another variant (its Vary names are known now, so the
            # second round queues under the precise key), or not for a request with
            # Authorization.  After two rounds, fetch alone.
        outcome, _ = await self.filling.fill_once(key, request, lookup.entry, fetch)
        self._count(outcome)
        return self._deliver(outcome, request, extra + outcome.leader_lines)

    def _count(self, outcome: Outcome) -> None:
        """Metrics for a request answered by a fill (background refreshes are not counted)."""
        source = outcome.source
        if source == FROM_ORIGIN:
            self.metrics.misses += 1
        elif source == FROM_L2:
            self.metrics.l2_hits += 1
        elif source == FROM_L1:
            self.metrics.l1_hits += 1
        else:
            self.metrics.count_stale(STALE_IF_ERROR)

    def refresh(self, lookup: Lookup, fetch: Fetch) -> bool:
        """Revalidate a STALE lookup in the background; False when one is already running."""
        key, request = lookup.key, lookup.request
        if key is None or request is None or lookup.entry is None:
            return False
        return self._coalescer.refresh(
            self.filling.coalesce_key(key, request),
            lambda: self.filling.fill_once(key, request, lookup.entry, fetch),
        )

    def _deliver(self, outcome: Outcome, request: RequestInfo, extra: bytes) -> Filled:
        entry = outcome.entry
        if entry is None:
            return Filled(None, outcome.response, X_CACHE_MISS)
        wire = self._serve(entry, request, outcome.x_cache, self.clock(), extra)
        return Filled(wire, None, outcome.x_cache, entry)

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
        key = self.keys.build(scheme, host, target)
        own_url = key.url.decode("latin-1")
        targets = invalidation_targets(method, status, own_url, response_headers)
        removed = 0
        for url in targets:
            # The request's own URL is keyed already: only Location targets are parsed again.
            primary = key.primary if url == own_url else self.keys.from_url(url).primary
            removed += self.purges.apply("primary", primary)
            if self.l2 is not None:
                self._spawn(self.purges.propagate("primary", primary, self.clock()))
        return removed

    async def purge_url(self, url: str, *, soft: bool = False) -> PurgeResult:
        """Purge one resource (all its variants) by absolute URL, normalised like requests.

        ``soft``: mark what the purge covers stale instead of removing it (every purge takes
        it): served within its stale-while-revalidate window while one refresh runs, or
        revalidated (coalesced) first, so a hot key costs the origin one request, not a
        stampede.  The count is of entries marked stale."""
        return await self.purges.purge(soft_kind("primary", soft), self.keys.from_url(url).primary)

    async def purge_prefix(self, prefix: str, *, soft: bool = False) -> PurgeResult:
        """Purge by URL prefix (``https://host/api/``) or, starting with ``/``, by path prefix
        on every host.  Cost: L1's path index (the entries under the prefix; a URL prefix
        ending inside the host scans) and a SCAN of Redis (see ``redis_l2``)."""
        raw = prefix.encode("latin-1")
        if raw.startswith(b"/"):
            return await self.purges.purge(soft_kind("path_prefix", soft), raw)
        path, scheme, authority = split_target(raw)
        if scheme is None or authority is None:
            raise ValueError(f"not a URL or path prefix: {prefix!r}")
        url_prefix = scheme + b"://" + normalise_host(authority, scheme) + path
        return await self.purges.purge(soft_kind("url_prefix", soft), url_prefix)

    async def purge_tag(self, tag: str, *, soft: bool = False) -> PurgeResult:
        """Purge every response tagged with ``tag`` in its Surrogate-Key header."""
        return await self.purges.purge(soft_kind("tag", soft), tag.encode("utf-8"))

    @property
    def purge_backlog(self) -> PurgeBacklog:
        """Purges Redis has not taken yet (``Purges``)."""
        return self.purges.backlog

    def check_purge_token(self, presented: bytes | str) -> bool:
        """Constant-time check of a purge request's token; always False when none is set."""
        expected = self.config.purge_token
        if not expected:
            return False
        given = presented.encode("utf-8") if isinstance(presented, str) else presented
        return hmac.compare_digest(expected.encode("utf-8"), given)

    def purge_local(self, kind: str, value: bytes) -> int:
        """Apply a purge another worker of this instance normalised (``PurgeResult.kind`` and
        ``value``) to this process's L1 only; returns the entries removed."""
        if kind.removeprefix(SOFT_PURGE) not in KINDS:
            raise ValueError(f"unknown purge kind {kind!r}")
        return self.purges.apply(kind, value)

    def _on_resync(self) -> None:
        # Purges broadcast while we were not subscribed are lost: start L1 afresh.
        removed = self.store.clear()
        log.info("cache_l1_cleared_after_resubscribe", removed=removed)


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
]
