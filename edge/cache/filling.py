"""One fill of the cache, as the coalescing leader (or a lone request) runs it: L1 again (another
fill may have landed meanwhile), then the POP's L2 (or its fill lock, or a wait for the
instance that holds it), then the origin (conditionally when something is stored), then the
store and, in the background, L2.

``HttpCache.fill`` coalesces requests onto one ``Filling.fill_once`` and hands each its answer;
this module is what that one fill does, and what an ``only-if-cached`` request may be answered
with from L1 or L2 alone (``stored_only``).  The RFC 9111 decisions are ``policy``'s; what a
response becomes in the store is ``Admission``'s; purges that raced the fill are ``Purges``'.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Final, NamedTuple

from .admission import Admission
from .entry import (
    X_CACHE_HIT,
    X_CACHE_MISS,
    X_CACHE_REVALIDATED,
    X_CACHE_STALE,
    Compressor,
    Entry,
    StoredResponse,
)
from .key import CacheKey, Negotiator, variant_key, vary_key
from .messages import Fetch, RequestInfo, UpstreamResponse
from .policy import (
    ERROR_STATUSES,
    Use,
    decide,
    not_modified_applies,
    uncacheable_reason,
    upstream_validators,
    usable_on_error,
)
from .purging import Purges
from .redis_l2 import NO_LOCK, RedisL2
from .store import MemoryStore

FROM_L1, FROM_L2, FROM_ORIGIN, FROM_STALE = "l1", "l2", "origin", "stale"
#: Reasons a new response is not stored that also make the stored one obsolete (the resource
#: itself changed); per-request reasons (request no-store, Authorization) leave it alone.
SUPERSEDING: Final = frozenset(
    {"status", "must-understand", "no-store", "private", "vary-star", "set-cookie", "no-freshness"}
)
#: ``Outcome`` made from all its fields by ``tuple.__new__``, not the generated ``__new__``.
_new_tuple: Final = tuple.__new__
_AUTH_COALESCE_SUFFIX: Final = b"\x00auth"
_COOKIE_COALESCE_SUFFIX: Final = b"\x00cookie"


class Outcome(NamedTuple):
    """A fill's result, independent of which of the coalesced requests reads it."""

    entry: Entry | None
    response: UpstreamResponse | None
    x_cache: bytes
    #: Where the answer came from, for the metrics: l1, l2, origin or stale.
    source: str
    #: Header lines for the request that led the fill only: a 304's Set-Cookie where the rule
    #: does not store cookies (the client that triggered the revalidation still gets its own).
    leader_lines: bytes = b""


class Filling:
    """The fills of one cache (module docstring)."""

    def __init__(
        self,
        store: MemoryStore,
        l2: RedisL2 | None,
        admission: Admission,
        purges: Purges,
        clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        *,
        negotiate: Negotiator,
        lock_timeout: float,
        cross_instance_wait: float,
        compressor: Compressor | None,
        compress_offload_above: int,
    ) -> None:
        self._store = store
        self._l2 = l2
        self._admission = admission
        self._purges = purges
        self._clock = clock
        self._spawn = spawn
        self._negotiate = negotiate
        #: ``CacheConfig.lock_timeout`` (``HttpCache.reconfigure`` sets it).
        self.lock_timeout = lock_timeout
        self._cross_instance_wait = cross_instance_wait
        self._compressor = compressor
        self._compress_offload_above = compress_offload_above

    def coalesce_key(self, key: CacheKey, request: RequestInfo) -> bytes:
        """What fills of this request coalesce on: its variant, and never anonymous requests
        with requests that carry Authorization or a Cookie."""
        names = self._store.vary_names(key.primary)
        coalesce_key = (
            key.primary
            if not names
            else variant_key(key.primary, names, vary_key(names, request.headers, self._negotiate))
        )
        if request.authorized:
            return coalesce_key + _AUTH_COALESCE_SUFFIX
        return coalesce_key + _COOKIE_COALESCE_SUFFIX if request.cookie else coalesce_key

    def usable_by(self, entry: Entry, request: RequestInfo) -> bool:
        """Whether ``entry`` answers ``request``: its variant, and shareable with it."""
        response = entry.response
        if request.authorized and not response.auth_ok:
            return False
        if not response.vary:
            return True
        secondary = vary_key(response.vary, request.headers, self._negotiate)
        return entry.key == variant_key(entry.primary, response.vary, secondary)

    def fill_once(
        self, key: CacheKey, request: RequestInfo, stale: Entry | None, fetch: Fetch
    ) -> Coroutine[Any, Any, tuple[Outcome, bool, Entry | None]]:
        """One fill: L1 again, L2, origin.  The coroutine returns the outcome, whether the
        requests coalesced on it may share it, and the entry it stored (None: nothing new).

        L1 is asked now, before the coroutine runs; without L2 the coroutine is ``_fetch``'s
        itself (no frame of its own to pass through on every resume)."""
        # Another fill may have landed while this one queued (lock timeout, hit-for-miss).
        current = self._store.get(key.primary, request.headers)
        if current is not None and current is not stale and self.usable_by(current, request):
            if decide(current.response.freshness, request.cc, self._clock())[0] is Use.FRESH:
                return _ready((Outcome(current, None, X_CACHE_HIT, FROM_L1), True, None))
            stale = stale or current
        if self._l2 is None:
            return self._fetch(key, request, fetch, stale)
        return self._fill_shared(key, request, fetch, stale)

    async def _fill_shared(
        self, key: CacheKey, request: RequestInfo, fetch: Fetch, stale: Entry | None
    ) -> tuple[Outcome, bool, Entry | None]:
        """``fill_once`` with L2: the POP's copy (or its fill lock, or a wait for the instance
        that holds it), then the origin; what it stores is written to L2 in the background."""
        l2 = self._l2
        assert l2 is not None
        token: bytes | None = None
        found = await l2.get(key.primary, request.headers)
        if found is None:
            token = await l2.acquire(self.coalesce_key(key, request), self.lock_timeout)
            if token is None:  # another instance is filling: give it a moment
                found = await l2.wait_for_fill(
                    key.primary,
                    request.headers,
                    self.coalesce_key(key, request),
                    min(self._cross_instance_wait, self.lock_timeout),
                )
        if found is not None:
            shared, fresh = self._from_l2(key, request, found)
            if shared is not None:
                if fresh:
                    self._store.put(shared)
                    return Outcome(shared, None, X_CACHE_HIT, FROM_L2), True, None
                received = shared.response.freshness.response_time
                if stale is None or received > stale.response.freshness.response_time:
                    stale = shared
        to_share: Entry | None = None
        try:
            outcome, shareable, to_share = await self._fetch(key, request, fetch, stale)
        finally:
            if to_share is not None or token:
                self._spawn(self._share(to_share, key, request, token or NO_LOCK))
        return outcome, shareable, to_share

    def _from_l2(
        self, key: CacheKey, request: RequestInfo, found: tuple[bytes, StoredResponse]
    ) -> tuple[Entry | None, bool]:
        """L2's copy (``RedisL2.get``) as an entry, when it may answer ``request`` (not purged
        since, its variant, shareable with it), and whether it is fresh for it."""
        shared = self._admission.entry(key, *found)
        # A purge or an invalidation deletes in Redis in the background: a copy received
        # before it must not come back from L2 in the meantime.
        received = shared.response.freshness.response_time
        if self._purges.covers(shared, received) or not self.usable_by(shared, request):
            return None, False
        return shared, decide(shared.response.freshness, request.cc, self._clock())[0] is Use.FRESH

    async def stored_only(self, key: CacheKey, request: RequestInfo) -> Outcome | None:
        """A fresh stored response for an ``only-if-cached`` request (RFC 9111 5.2.1.7): L1
        again (a fill may have landed since the lookup), then L2, read as ``fill_once`` reads
        them (an L2 copy is put in L1); None when neither has one.  Never the origin, the
        POP-wide fill lock or a wait for the instance that holds it."""
        store, l2 = self._store, self._l2
        current = store.get(key.primary, request.headers)
        if (
            current is not None
            and self.usable_by(current, request)
            and decide(current.response.freshness, request.cc, self._clock())[0] is Use.FRESH
        ):
            return Outcome(current, None, X_CACHE_HIT, FROM_L1)
        found = await l2.get(key.primary, request.headers) if l2 is not None else None
        if found is None:
            return None
        shared, fresh = self._from_l2(key, request, found)
        if shared is None or not fresh:  # a stale copy would need the origin to revalidate
            return None
        store.put(shared)
        return Outcome(shared, None, X_CACHE_HIT, FROM_L2)

    async def _share(
        self, entry: Entry | None, key: CacheKey, request: RequestInfo, token: bytes
    ) -> None:
        """Write a fill to L2, then release the POP-wide fill lock (pollers then find it)."""
        assert self._l2 is not None
        if entry is not None:
            await self._l2.put(entry)
        if token:
            await self._l2.release(self.coalesce_key(key, request), token)

    async def _fetch(
        self, key: CacheKey, request: RequestInfo, fetch: Fetch, stale: Entry | None
    ) -> tuple[Outcome, bool, Entry | None]:
        """Fetch from the origin (conditionally when something is stored) and store.

        Returns the outcome, whether coalesced waiters may share it, and the entry to write
        to L2 (None when nothing new was stored).
        """
        clock = self._clock
        validators = (
            upstream_validators(stale.etag, stale.last_modified_raw) if stale is not None else []
        )
        request_time = clock()
        try:
            response = await fetch(validators)
            if response.status == 304 and stale is not None and validators:
                response_time = clock()
                if not_modified_applies(stale.etag, response.headers):
                    return self._revalidated(
                        key, request, stale, response, request_time, response_time
                    )
                # The 304 is about another representation: fetch this one whole.
                request_time = clock()
                response = await fetch([])
        except Exception:
            if stale is not None and usable_on_error(stale.response.freshness, clock()):
                return Outcome(stale, None, X_CACHE_STALE, FROM_STALE), True, None
            raise
        return self.fetched(key, request, response, request_time, stale)

    def origin_only(self, key: CacheKey, request: RequestInfo, stale: Entry | None) -> bool:
        """Whether this fill is ``fill_once`` reduced to one fetch of the origin without
        validators, then ``fetched``: no L2, no stored response (L1 asked again) and none to
        revalidate or to answer with on an error.  (The caller fetches: no ``_fetch`` frame.)"""
        return (
            stale is None
            and self._l2 is None
            and self._store.get(key.primary, request.headers) is None
        )

    def fetched(
        self,
        key: CacheKey,
        request: RequestInfo,
        response: UpstreamResponse,
        request_time: float,
        stale: Entry | None = None,
    ) -> tuple[Outcome, bool, Entry | None]:
        """``_fetch``'s end, the origin's ``response`` in hand (the clock read now is its
        response time): stored when allowed, or the stale entry within stale-if-error."""
        response_time = self._clock()
        if (
            stale is not None
            and response.status in ERROR_STATUSES
            and usable_on_error(stale.response.freshness, response_time)
        ):
            return Outcome(stale, None, X_CACHE_STALE, FROM_STALE), True, None
        entry, reason = self._admission.admit(key, request, response, request_time, response_time)
        if entry is None:
            if stale is not None and reason in SUPERSEDING and response.status < 500:
                self._store.remove_entry(stale)  # a 5xx says nothing about the resource
            outcome = _new_tuple(Outcome, (None, response, X_CACHE_MISS, FROM_ORIGIN, b""))
            return outcome, False, None
        stored = self._keep(entry, request_time)
        outcome = _new_tuple(Outcome, (entry, None, X_CACHE_MISS, FROM_ORIGIN, b""))
        return outcome, True, entry if stored else None

    def _revalidated(
        self,
        key: CacheKey,
        request: RequestInfo,
        stale: Entry,
        update: UpstreamResponse,
        request_time: float,
        response_time: float,
    ) -> tuple[Outcome, bool, Entry | None]:
        """RFC 9111 4.3.4: freshen a stored response with a 304's headers."""
        rule = key.rule
        refreshed, meta = self._admission.refreshed(key, stale, update, request_time, response_time)
        cookies = b""
        if not rule.store_set_cookie:
            cookies = b"".join(
                b"set-cookie: " + value + b"\r\n"
                for name, value in update.headers
                if name == b"set-cookie"
            )
        outcome = Outcome(refreshed, None, X_CACHE_REVALIDATED, FROM_ORIGIN, cookies)
        reason = uncacheable_reason(
            b"GET", stale.status, request.cc, request.authorized, meta, rule, request.cookie
        )
        if reason is not None:
            if reason in SUPERSEDING:
                self._store.remove_entry(stale)  # the origin now forbids storing it
            return outcome, False, None
        stored = self._keep(refreshed, request_time)
        return outcome, True, refreshed if stored else None

    def _keep(self, entry: Entry, request_time: float) -> bool:
        """Put a freshly fetched entry in L1 unless a purge raced with its fetch."""
        if self._purges.raced(entry, request_time):
            return False
        if not self._store.put(entry):
            return False
        if len(entry.response.body) > self._compress_offload_above and entry.compressible:
            # Big bodies: build the compressed variants in a thread, not on the first hit.
            self._spawn(self._prepare_variants(entry))
        return True

    async def _prepare_variants(self, entry: Entry) -> None:
        compressor = self._compressor
        assert compressor is not None
        for coding in ("br", "gzip"):
            if entry.needs_variant(coding):
                data = await asyncio.to_thread(compressor, entry.body, coding)
                entry.set_variant(coding, data)


async def _ready(
    result: tuple[Outcome, bool, Entry | None],
) -> tuple[Outcome, bool, Entry | None]:
    return result


__all__ = ["FROM_L1", "FROM_L2", "FROM_ORIGIN", "FROM_STALE", "SUPERSEDING", "Filling", "Outcome"]
