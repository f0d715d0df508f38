"""The requests a lookup could not answer from L1 alone: a MISS or REVALIDATE waits for a fill,
coalesced with every other request for the same key onto one ``Filling.fill_once``, and is
answered from its outcome (the leader's own answer, or a waiter's share of it: the same entry
served for this request's conditionals, range and coding); a STALE answer's refresh runs in the
background, at most one per key; an ``only-if-cached`` request L1 could not answer reads L2
alone (``stored_only``).  Counted as the answer's source says (``CacheMetrics``)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Final, NamedTuple

from meridian.config import CacheConfig
from meridian.log import get_logger

from .admission import Admission
from .coalesce import Coalescer, Role
from .entry import X_CACHE_HIT, X_CACHE_MISS, Compressor, Entry
from .filling import FROM_L1, FROM_L2, FROM_ORIGIN, FROM_STALE, Filling, Outcome
from .key import CacheKey, Negotiator
from .lookups import Lookup, LookupKind, serve
from .messages import Fetch, RequestInfo, UpstreamResponse
from .metrics import CacheMetrics
from .policy import STALE_IF_ERROR
from .purging import Purges
from .redis_l2 import RedisL2
from .store import MemoryStore

log = get_logger("cache")


class Filled(NamedTuple):
    """The result of ``fill``: bytes to write, or an unstored response for the edge to forward."""

    wire: bytes | None
    response: UpstreamResponse | None
    x_cache: bytes
    entry: Entry | None = None


def _background_failed(error: BaseException) -> None:
    log.debug("cache_refresh_failed", error=str(error) or type(error).__name__)


#: ``Filled`` made from all its fields by ``tuple.__new__``, not the generated ``__new__``.
_new_tuple: Final = tuple.__new__
_MISS: Final = LookupKind.MISS
_REVALIDATE: Final = LookupKind.REVALIDATE


async def _fill_pair(
    filling: Filling, key: CacheKey, request: RequestInfo, stale: Entry | None, fetch: Fetch
) -> tuple[Outcome, bool]:
    """``filling.fill_once`` as the coalescer's fetch (the value and whether it is shared),
    asked when it runs: a background refresh's when its task starts."""
    outcome, shareable, _ = await filling.fill_once(key, request, stale, fetch)
    return outcome, shareable


class Fills:
    """The coalesced fills and background refreshes of one cache (module docstring)."""

    def __init__(
        self,
        config: CacheConfig,
        store: MemoryStore,
        l2: RedisL2 | None,
        admission: Admission,
        purges: Purges,
        metrics: CacheMetrics,
        clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        *,
        negotiate: Negotiator,
        cross_instance_wait: float,
        compressor: Compressor | None,
        compress_offload_above: int,
        only_if_cached_wire: bytes,
    ) -> None:
        """``config``: ``lock_timeout`` and ``hit_for_miss`` (``set_limits`` changes them);
        ``only_if_cached_wire``: ``stored_only``'s 504; the rest is ``Filling``'s."""
        self._filling = Filling(
            store,
            l2,
            admission,
            purges,
            clock,
            spawn,
            negotiate=negotiate,
            lock_timeout=config.lock_timeout,
            cross_instance_wait=cross_instance_wait,
            compressor=compressor,
            compress_offload_above=compress_offload_above,
        )
        self._metrics = metrics
        self._clock = clock
        #: The 504 of an ``only-if-cached`` request no level answers (``classify``'s too).
        self.only_if_cached_wire = only_if_cached_wire
        self._coalescer: Coalescer[Outcome] = Coalescer(
            lock_timeout=config.lock_timeout,
            hit_for_miss=config.hit_for_miss,
            clock=clock,
            on_wait=metrics.count_waiter,
            on_background_error=_background_failed,
        )

    def __len__(self) -> int:
        """Fills and refreshes in flight."""
        return len(self._coalescer)

    async def drain(self) -> None:
        await self._coalescer.drain()

    def set_limits(self, config: CacheConfig) -> None:
        """A reloaded config's ``lock_timeout`` and ``hit_for_miss``, from now on."""
        self._coalescer.lock_timeout = config.lock_timeout
        self._filling.lock_timeout = config.lock_timeout
        self._coalescer.hit_for_miss.ttl = config.hit_for_miss

    async def fill(self, lookup: Lookup, fetch: Fetch, extra: bytes = b"") -> Filled:
        """Answer a MISS or REVALIDATE: one coalesced fetch per key, stored when allowed."""
        key, request = lookup.key, lookup.request
        kind = lookup.kind
        if key is None or request is None or (kind is not _MISS and kind is not _REVALIDATE):
            raise ValueError(f"fill() needs a MISS or REVALIDATE lookup, got {lookup.kind}")
        filling = self._filling
        coalescer = self._coalescer
        coalesce_key = filling.coalesce_key(key, request)
        flight = coalescer.lead(coalesce_key)
        if flight is not None:
            # The common case, no fill of the key in flight: this task leads it in here (no
            # ``Coalescer.run`` coroutine, no closure), as ``run`` would.
            stale = lookup.entry
            try:
                if filling.origin_only(key, request, stale):  # ``fill_once``, frame and all
                    request_time = self._clock()
                    response = await fetch([])
                    outcome, shareable, _ = filling.fetched(key, request, response, request_time)
                else:
                    outcome, shareable, _ = await filling.fill_once(key, request, stale, fetch)
            except BaseException as error:
                coalescer.abandon(coalesce_key, flight, error)
                raise
            coalescer.led(coalesce_key, flight, outcome, shareable)
            entry = outcome.entry
            if outcome.source == FROM_ORIGIN:  # ``_count`` and ``_deliver``, inline
                self._metrics.misses += 1
            else:
                self._count(outcome)
            if entry is None:
                return _new_tuple(Filled, (None, outcome.response, X_CACHE_MISS, None))
            x_cache = outcome.x_cache
            wire = serve(entry, request, x_cache, self._clock(), extra + outcome.leader_lines)
            return _new_tuple(Filled, (wire, None, x_cache, entry))
        for round_ in range(2):
            if round_:  # the leader's Vary names are known now
                coalesce_key = filling.coalesce_key(key, request)
            outcome, role = await coalescer.run(
                coalesce_key, lambda: _fill_pair(filling, key, request, lookup.entry, fetch)
            )
            entry = outcome.entry
            if role is not Role.WAITER or entry is None:
                self._count(outcome)
                return self._deliver(outcome, request, extra + outcome.leader_lines)
            if filling.usable_by(entry, request):
                if outcome.source == FROM_STALE:
                    self._metrics.count_stale(STALE_IF_ERROR)
                    return self._deliver(outcome, request, extra)
                self._metrics.coalesced_hits += 1
                return self._deliver(outcome._replace(x_cache=X_CACHE_HIT), request, extra)
            # The leader's response is another variant (its Vary names are known now, so the
            # second round queues under the precise key), or not for a request with
            # Authorization.  After two rounds, fetch alone.
        outcome, _, _ = await filling.fill_once(key, request, lookup.entry, fetch)
        self._count(outcome)
        return self._deliver(outcome, request, extra + outcome.leader_lines)

    async def stored_only(self, lookup: Lookup, extra: bytes = b"") -> Filled:
        """Answer an ONLY_IF_CACHED_L2 lookup: a fresh response stored in L1 or L2
        (``Filling.stored_only``), counted as a hit there, else the 504 of an
        ``only-if-cached`` request that nothing stored answers.

        Not coalesced: a fill may end at the origin, and its waiters would get that answer
        (and an ``only-if-cached`` request's 504 must never reach a request that may fill).
        Nothing is fetched, locked or remembered as a hit-for-miss."""
        key, request = lookup.key, lookup.request
        if key is None or request is None or lookup.kind is not LookupKind.ONLY_IF_CACHED_L2:
            raise ValueError(f"stored_only() needs an ONLY_IF_CACHED_L2 lookup, got {lookup.kind}")
        outcome = await self._filling.stored_only(key, request)
        if outcome is None:
            return Filled(self.only_if_cached_wire, None, X_CACHE_MISS)
        self._count(outcome)
        return self._deliver(outcome, request, extra)

    def refresh(self, lookup: Lookup, fetch: Fetch) -> bool:
        """Revalidate a STALE lookup in the background; False when one is already running."""
        key, request = lookup.key, lookup.request
        if key is None or request is None or lookup.entry is None:
            return False
        filling = self._filling
        return self._coalescer.refresh(
            filling.coalesce_key(key, request),
            lambda: _fill_pair(filling, key, request, lookup.entry, fetch),
        )

    def _count(self, outcome: Outcome) -> None:
        """Metrics for a request answered by a fill (background refreshes are not counted)."""
        source = outcome.source
        metrics = self._metrics
        if source == FROM_ORIGIN:
            metrics.misses += 1
        elif source == FROM_L2:
            metrics.l2_hits += 1
        elif source == FROM_L1:
            metrics.l1_hits += 1
        else:
            metrics.count_stale(STALE_IF_ERROR)

    def _deliver(self, outcome: Outcome, request: RequestInfo, extra: bytes) -> Filled:
        entry = outcome.entry
        if entry is None:
            return _new_tuple(Filled, (None, outcome.response, X_CACHE_MISS, None))
        wire = serve(entry, request, outcome.x_cache, self._clock(), extra)
        return _new_tuple(Filled, (wire, None, outcome.x_cache, entry))


__all__ = ["Filled", "Fills"]
