"""Purges not yet applied to the POP's Redis: kept, coalesced and retried until Redis takes them.

A purge is applied to this process's L1 at once; its Redis half (delete the objects from L2,
then broadcast it to the POP's other instances) can fail while Redis is stalled or down.  Such
a purge goes here instead of being dropped (it used to be: ``propagated: false`` and the other
instances kept serving, and refilling from Redis, what had been purged).  Pure: no I/O, no
clock of its own; ``HttpCache`` runs the retries.

* Coalesced: the same purge twice is one pending item (with the later time).
* Bounded: past ``max_items`` distinct purges the backlog collapses into one purge of
  everything (path prefix ``/`` on every host): wider than asked, never narrower.
* Retried with exponential backoff (``min_delay`` doubling to ``max_delay``, each delay
  jittered down to half so that a POP's instances do not retry in step); reset by a success.
* ``covers``: while a purge is pending, a copy read from L2 that it covers (received before
  it) is not used, however long Redis stays away (the cache's 30-s race window alone would
  let it back in after a long stall).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

#: The purge the backlog collapses into when full: every path on every host.
EVERYTHING: Final = ("path_prefix", b"/")


@dataclass(frozen=True, slots=True)
class PendingPurge:
    """A purge whose Redis half has not been applied yet; ``at`` is wall time (comparable with
    an entry's ``response_time``)."""

    kind: str
    value: bytes
    at: float


def path_of(url: bytes) -> bytes | None:
    """The path (and query) of ``scheme://host/path``, None when it has none."""
    start = url.find(b"/", url.find(b"://") + 3)
    return None if start == -1 else url[start:]


def matches(kind: str, value: bytes, primary: bytes, url: bytes, tags: tuple[str, ...]) -> bool:
    """Whether a purge (``kind``, ``value``) covers an entry with this key, URL and tags.  A soft
    purge covers the same entries (an L2 copy from before it must not be taken for fresh)."""
    kind = kind.removeprefix("soft_")
    if kind == "primary":
        return primary == value
    if kind == "url_prefix":
        return url.startswith(value)
    if kind == "path_prefix":
        path = path_of(url)
        return path is not None and path.startswith(value)
    if kind == "tag":
        return value.decode("utf-8", "replace") in tags
    return False


class PurgeBacklog:
    """Pending purges, in the order first seen; see the module docstring."""

    __slots__ = ("_failures", "_items", "_random", "max_delay", "max_items", "min_delay")

    def __init__(
        self,
        *,
        max_items: int = 1024,
        min_delay: float = 0.05,
        max_delay: float = 1.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.max_items = max_items
        self.min_delay = min_delay
        self.max_delay = max_delay
        self._random = rng
        self._items: dict[tuple[str, bytes], PendingPurge] = {}
        self._failures = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    @property
    def failures(self) -> int:
        """Consecutive failed attempts since the last success."""
        return self._failures

    def add(self, kind: str, value: bytes, at: float) -> None:
        """Remember a purge whose Redis half failed (or has not been tried)."""
        items = self._items
        everything = items.get(EVERYTHING)
        if everything is not None:
            # Already purging everything: it now has to cover this later purge too.
            items[EVERYTHING] = PendingPurge(*EVERYTHING, max(everything.at, at))
            return
        key = (kind, value)
        known = items.get(key)
        if known is None and len(items) >= self.max_items:
            latest = max([at, *(item.at for item in items.values())])
            items.clear()
            items[EVERYTHING] = PendingPurge(*EVERYTHING, latest)
            return
        items[key] = PendingPurge(kind, value, at if known is None else max(known.at, at))

    def batch(self) -> list[PendingPurge]:
        """The pending purges to attempt now (a snapshot: ``add`` may run meanwhile)."""
        return list(self._items.values())

    def done(self, item: PendingPurge) -> None:
        """``item`` is applied: forget it, unless the same purge was asked again since (its
        later time then still needs applying)."""
        key = (item.kind, item.value)
        if self._items.get(key) == item:
            del self._items[key]
        self._failures = 0

    def failed(self) -> None:
        self._failures += 1

    def delay(self) -> float:
        """Seconds to wait before the next attempt: ``min_delay`` doubled per consecutive
        failure up to ``max_delay``, jittered into [half, whole]."""
        base = min(self.max_delay, self.min_delay * (1 << min(self._failures, 30)))
        return base * (0.5 + 0.5 * self._random())

    def covers(self, primary: bytes, url: bytes, tags: tuple[str, ...], received: float) -> bool:
        """Whether a response received at ``received`` (wall time) for this key is covered by
        a pending purge made at or after that time."""
        for item in self._items.values():
            if received <= item.at and matches(item.kind, item.value, primary, url, tags):
                return True
        return False


__all__ = ["EVERYTHING", "PendingPurge", "PurgeBacklog", "matches", "path_of"]
