"""What a lookup answers: the kind of answer (``LookupKind``), the answer itself (``Lookup``),
the bytes an entry serves a request (``serve``), and the memo of a HIT that lets the edge replay
it for the next identical request (``HitMemo``, ``memo_hit``)."""

from __future__ import annotations

import enum
import weakref
from typing import Final, NamedTuple

from .entry import X_CACHE_MISS, Entry, first_answer
from .key import CacheKey, KeyBuilder
from .messages import RequestInfo
from .policy import NO_DIRECTIVES, STALE_WHILE_REVALIDATE, stable_until
from .requests import Prepared


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
    #: ``Cache-Control: only-if-cached``, nothing usable in L1 and an L2 to ask: ``stored_only``
    #: (L2's copy, or the 504; never the origin).
    ONLY_IF_CACHED_L2 = "only_if_cached_l2"


# Module-level aliases: attribute access on an Enum class costs ~10x a global lookup (3.11).
_HIT: Final = LookupKind.HIT
_STALE: Final = LookupKind.STALE


# Lookup is made per request: a NamedTuple, because a frozen dataclass's __init__ costs about
# five times as much, which would dominate a cache hit.


class Lookup(NamedTuple):
    """The L1 answer for one request."""

    kind: LookupKind
    #: The complete response to write (HIT, STALE, ONLY_IF_CACHED), else empty.
    wire: bytes = b""
    key: CacheKey | None = None
    entry: Entry | None = None
    #: Set for STALE, REVALIDATE, MISS and ONLY_IF_CACHED_L2 (what ``fill``, ``refresh`` and
    #: ``stored_only`` need); not for HIT.
    request: RequestInfo | None = None
    #: BYPASS: why; STALE: the stale reason.
    reason: str = ""
    #: STALE: a background refresh should be started.
    refresh: bool = False


def serve(entry: Entry, request: RequestInfo, x_cache: bytes, now: float, extra: bytes) -> bytes:
    """The bytes ``entry`` answers ``request`` with: a 304 when its conditionals say so, else
    the range it asks for (when it applies), else the whole response."""
    if (
        request.if_none_match is not None or request.if_modified_since is not None
    ) and entry.not_modified_for(request.if_none_match, request.if_modified_since):
        return entry.wire_not_modified(request.coding, now, x_cache, extra)
    if request.range is not None:  # evaluated after the conditionals (RFC 9110 13.2.2)
        ranged = entry.wire_range(request.range, request.if_range, now, x_cache, extra)
        if ranged is not None:
            return ranged
    if x_cache == X_CACHE_MISS:  # a fill's answer: its entry's first
        first = first_answer(entry, request.coding, now, request.head, extra)
        if first is not None:
            return first
    return entry.wire(request.coding, now, request.head, x_cache, extra)


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
    returned bytes."""

    __slots__ = ("key", "keys", "ref", "since", "slot", "stale", "until")

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
        #: The entry, weakly (``entry``), and the key it is stored under (``entry.key``).
        self.ref = weakref.ref(entry)
        self.key = entry.key
        self.slot = slot
        self.since = since
        self.until = until
        #: The stale reason for a STALE answer (a metric label), "" for a HIT.
        self.stale = stale

    @property
    def entry(self) -> Entry | None:
        return self.ref()

    @property
    def wire(self) -> bytes:
        entry = self.ref()
        wire = entry.cached_wire(self.slot) if entry is not None else None
        if wire is None:
            raise LookupError("the memoised response is gone (replay_hit said so)")
        return wire


def only_if_cached_wire(extra_head: bytes) -> bytes:
    """The answer to ``only-if-cached`` when no level of the cache has a usable response
    (RFC 9111 5.2.1.7: 504), with the cache-wide header lines ``extra_head``."""
    return (
        b"HTTP/1.1 504 Gateway Timeout\r\ncontent-length: 0\r\n"
        + extra_head
        + b"x-cache: MISS\r\n\r\n"
    )


def memo_hit(
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


__all__ = ["HitMemo", "Lookup", "LookupKind", "memo_hit", "only_if_cached_wire", "serve"]
