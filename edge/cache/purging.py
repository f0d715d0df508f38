"""Purges and invalidations of one cache: asked for by URL, prefix or tag (the admin API), by
another worker (``purge_local``) or by an unsafe request (``invalidated``: RFC 9111 4.4),
normalised to the cache's keys, then applied.

A purge takes effect in this process's L1 at once, then in Redis, which deletes the shared
copies and broadcasts the purge to the POP's other instances.  When Redis cannot take it
(stalled, down, behind an open breaker) the purge waits in a ``PurgeBacklog`` and is retried
with backoff until Redis does; meanwhile the L2 copies it covers are not used.

Every purge is also remembered for ``race_window`` seconds: a fill that started before it may
carry the purged content, and is not stored (``raced``); an L2 copy received before it is not
served (``covers``).  Purges by primary key (one per unsafe request: RFC 9111 4.4) are kept in a
dict, the rare admin purges by prefix or tag in time order.

Kinds: ``primary`` (a resource, every variant), ``url_prefix``, ``path_prefix``, ``tag``; a
soft purge is the same kind with ``SOFT_PURGE`` before it and marks entries stale instead of
removing them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Final

from meridian.log import get_logger

from .entry import Entry
from .key import KeyBuilder, normalise_host, split_target
from .policy import Headers, invalidation_targets
from .purge_queue import PurgeBacklog
from .redis_broadcast import PurgeMessage
from .redis_l2 import RedisL2
from .store import MemoryStore

log = get_logger("edge.cache")

SOFT_PURGE: Final = "soft_"
KINDS: Final = frozenset({"primary", "url_prefix", "path_prefix", "tag"})
#: Purges by primary key remembered before the ledger is pruned (amortised pruning).
_PRUNE_PRIMARIES_ABOVE: Final = 4096


def soft_kind(kind: str, is_soft: bool) -> str:
    """``kind``, or its soft form."""
    return SOFT_PURGE + kind if is_soft else kind


def path_starts_with(url: bytes, prefix: bytes) -> bool:
    """Whether the path of ``url`` (``scheme://host/path``) starts with ``prefix``."""
    start = url.find(b"/", url.find(b"://") + 3)
    return start != -1 and url.startswith(prefix, start)


def prefix_purge(prefix: str) -> tuple[str, bytes]:
    """The purge a prefix asks for: ``path_prefix`` of a path prefix (starting with ``/``, on
    every host), else ``url_prefix`` of the URL prefix with its host normalised like keys."""
    raw = prefix.encode("latin-1")
    if raw.startswith(b"/"):
        return "path_prefix", raw
    path, scheme, authority = split_target(raw)
    if scheme is None or authority is None:
        raise ValueError(f"not a URL or path prefix: {prefix!r}")
    return "url_prefix", scheme + b"://" + normalise_host(authority, scheme) + path


def invalidated(
    keys: KeyBuilder,
    method: bytes,
    status: int,
    scheme: bytes,
    host: bytes,
    target: bytes,
    response_headers: Headers,
) -> Iterator[bytes]:
    """The primary keys an unsafe request's response invalidates (RFC 9111 4.4): its target
    URI and same-origin Location/Content-Location."""
    key = keys.build(scheme, host, target)
    own_url = key.url.decode("latin-1")
    for url in invalidation_targets(method, status, own_url, response_headers):
        # The request's own URL is keyed already: only Location targets are parsed again.
        yield key.primary if url == own_url else keys.from_url(url).primary


@dataclass(frozen=True, slots=True)
class PurgeResult:
    #: Entries removed from this instance's L1.
    local: int
    #: Keys deleted in Redis.
    shared: int
    #: Whether the purge was broadcast to the POP's other instances.
    propagated: bool
    #: The purge as the cache applied it, normalised (``purge_local`` takes the same pair):
    #: primary | url_prefix | path_prefix | tag, and the key, prefix or tag.
    kind: str = ""
    value: bytes = b""
    #: Redis did not take it now (stalled, down): kept and retried with backoff until it does
    #: (``meridian_cache_purges_pending``); the L2 copies it covers are not used meanwhile.
    queued: bool = False


class Purges:
    """The purges of one cache: asked for, applied, propagated, retried and remembered (module
    doc)."""

    def __init__(
        self,
        store: MemoryStore,
        l2: RedisL2 | None,
        keys: KeyBuilder,
        clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        *,
        race_window: float,
        backlog: PurgeBacklog | None = None,
        on_retry: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._l2 = l2
        #: The cache's keys (``HttpCache.reconfigure`` replaces them): URLs purge as requests
        #: to them are keyed.
        self.keys = keys
        self._clock = clock
        self._spawn = spawn
        self._race_window = race_window
        self._on_retry = on_retry
        self._by_primary: dict[bytes, float] = {}
        self._others: deque[tuple[float, str, bytes]] = deque()
        #: Purges whose Redis half failed, retried by ``_retry`` until Redis takes them.
        self.backlog = backlog or PurgeBacklog()
        self._retrier: asyncio.Task[None] | None = None

    # -- asked for (the admin API, the POP's other workers) -----------------------------------

    async def purge_url(self, url: str, *, soft: bool = False) -> PurgeResult:
        """Purge one resource (all its variants) by absolute URL, normalised like requests.

        ``soft``: mark what the purge covers stale instead of removing it (every purge takes
        it): served within its stale-while-revalidate window while one refresh runs, or
        revalidated (coalesced) first, so a hot key costs the origin one request, not a
        stampede.  The count is of entries marked stale."""
        return await self.purge(soft_kind("primary", soft), self.keys.from_url(url).primary)

    async def purge_prefix(self, prefix: str, *, soft: bool = False) -> PurgeResult:
        """Purge by URL prefix (``https://host/api/``) or, starting with ``/``, by path prefix
        on every host.  Cost: L1's path index (the entries under the prefix; a URL prefix
        ending inside the host scans) and a SCAN of Redis (see ``redis_purge``)."""
        kind, value = prefix_purge(prefix)
        return await self.purge(soft_kind(kind, soft), value)

    async def purge_tag(self, tag: str, *, soft: bool = False) -> PurgeResult:
        """Purge every response tagged with ``tag`` in its Surrogate-Key header."""
        return await self.purge(soft_kind("tag", soft), tag.encode("utf-8"))

    def purge_local(self, kind: str, value: bytes) -> int:
        """Apply a purge another worker of this instance normalised (``PurgeResult.kind`` and
        ``value``) to this process's L1 only; returns the entries removed."""
        if kind.removeprefix(SOFT_PURGE) not in KINDS:
            raise ValueError(f"unknown purge kind {kind!r}")
        return self.apply(kind, value)

    # -- applying ------------------------------------------------------------------------------

    def apply(self, kind: str, value: bytes) -> int:
        """Purge L1 and remember the purge so that racing fills are not stored; returns the
        entries removed (or, for a soft purge, marked stale).

        A soft purge is remembered the same way: a fill or an L2 copy from before it must not
        make fresh again what it made stale."""
        now = self._clock()
        self._forget_before(now - self._race_window)
        if kind.startswith(SOFT_PURGE):
            return self._soft(kind.removeprefix(SOFT_PURGE), value, now)
        store = self._store
        if kind == "primary":
            self._by_primary[value] = now
            return store.remove_primary(value)
        self._others.append((now, kind, value))
        if kind == "tag":
            return store.purge_tag(value.decode("utf-8"))
        if kind == "url_prefix":
            return store.purge_url_prefix(value)
        if kind == "path_prefix":
            return store.purge_path_prefix(value)
        return 0

    async def purge(self, kind: str, value: bytes) -> PurgeResult:
        """``apply`` here, then in Redis (queued for retries when Redis does not take it)."""
        at = self._clock()
        local = self.apply(kind, value)
        if self._l2 is None:
            return PurgeResult(local, 0, False, kind, value)
        shared = await self._l2.apply_purge(kind, value)
        if shared is None:
            self._queue(kind, value, at)
            return PurgeResult(local, 0, False, kind, value, queued=True)
        return PurgeResult(local, shared, True, kind, value)

    def invalidate(self, primaries: Iterable[bytes]) -> int:
        """Purge resources here at once, and in Redis and the POP's other instances in the
        background (an unsafe request's invalidations); returns the L1 entries removed."""
        removed = 0
        for primary in primaries:
            removed += self.apply("primary", primary)
            if self._l2 is not None:
                self._spawn(self.propagate("primary", primary, self._clock()))
        return removed

    async def propagate(self, kind: str, value: bytes, at: float) -> None:
        """The Redis half of a purge already applied here (invalidations, in the background)."""
        if self._l2 is not None and await self._l2.apply_purge(kind, value) is None:
            self._queue(kind, value, at)

    def on_message(self, message: PurgeMessage) -> None:
        """A purge another instance broadcast through Redis."""
        removed = self.apply(message.kind, message.value)
        log.debug("cache_purge_received", kind=message.kind, removed=removed, sender=message.sender)

    def _soft(self, kind: str, value: bytes, now: float) -> int:
        store = self._store
        if kind == "primary":
            self._by_primary[value] = now
            entries = store.variants_of(value)
        else:
            self._others.append((now, kind, value))
            if kind == "tag":
                entries = store.tagged(value.decode("utf-8"))
            elif kind == "url_prefix":
                entries = store.with_url_prefix(value)
            elif kind == "path_prefix":
                entries = store.with_path_prefix(value)
            else:
                return 0
        marked = 0
        for entry in entries:
            freshness = entry.response.freshness
            if freshness.ttl(now) <= 0:
                continue  # stale already
            # Lifetime cut to the age it has now: stale from this instant, its windows intact.
            expired = freshness._replace(lifetime=freshness.age(now))
            if store.put(entry.refreshed(replace(entry.response, freshness=expired))):
                marked += 1
        return marked

    # -- remembering ---------------------------------------------------------------------------

    def raced(self, entry: Entry, request_time: float) -> bool:
        """Whether a purge since ``request_time`` covers ``entry`` (a fill from before it)."""
        if not (self._others or self._by_primary):
            return False
        purged_at = self._by_primary.get(entry.primary)
        if purged_at is not None and purged_at >= request_time:
            return True
        self._forget_before(self._clock() - self._race_window)
        for when, kind, value in self._others:
            if when < request_time:
                continue
            if kind == "tag" and value.decode("utf-8") in entry.response.surrogate_keys:
                return True
            if kind == "url_prefix" and entry.url.startswith(value):
                return True
            if kind == "path_prefix" and path_starts_with(entry.url, value):
                return True
        return False

    def covers(self, entry: Entry, received: float) -> bool:
        """Whether an L2 copy received at ``received`` must not be used: a purge raced it, or
        one Redis has not taken yet covers it (however long Redis was away)."""
        if self.raced(entry, received):
            return True
        backlog = self.backlog
        return bool(backlog) and backlog.covers(
            entry.primary, entry.url, entry.response.surrogate_keys, received
        )

    def _forget_before(self, horizon: float) -> None:
        others = self._others
        while others and others[0][0] < horizon:
            others.popleft()
        if len(self._by_primary) > _PRUNE_PRIMARIES_ABOVE:
            self._by_primary = {k: t for k, t in self._by_primary.items() if t >= horizon}

    # -- retrying ------------------------------------------------------------------------------

    def _queue(self, kind: str, value: bytes, at: float) -> None:
        """Keep a purge Redis did not take, and make sure something retries it."""
        self.backlog.add(kind, value, at)
        log.warning("cache_purge_queued", kind=kind, pending=len(self.backlog), reason="redis")
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.ensure_future(self._retry())

    async def _retry(self) -> None:
        """Apply pending purges to Redis until there are none: delete and broadcast each, with
        backoff between failed rounds (each attempt also probes Redis past an open breaker)."""
        backlog, l2 = self.backlog, self._l2
        assert l2 is not None
        while backlog:
            await asyncio.sleep(backlog.delay())
            for item in backlog.batch():
                self._on_retry()
                if await l2.apply_purge(item.kind, item.value, force=True) is None:
                    backlog.failed()
                    break
                backlog.done(item)
                log.info(
                    "cache_purge_propagated",
                    kind=item.kind,
                    late_by=round(self._clock() - item.at, 3),
                    pending=len(backlog),
                )

    async def aclose(self) -> None:
        retrier, self._retrier = self._retrier, None
        if retrier is not None:
            retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retrier
        if self.backlog:
            # Not persisted: a purge Redis never took is lost with this process.
            log.warning("cache_purges_not_propagated", pending=len(self.backlog))


__all__ = [
    "KINDS",
    "SOFT_PURGE",
    "PurgeResult",
    "Purges",
    "invalidated",
    "path_starts_with",
    "prefix_purge",
    "soft_kind",
]
