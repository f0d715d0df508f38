"""L1: the per-process memory store, bounded in bytes.

Eviction is CLOCK (second chance) over an ``OrderedDict`` in insertion order: a hit only sets
``entry.visited`` (no reordering on the hot path, unlike LRU's ``move_to_end``); eviction pops
the oldest entry and gives a visited one another lap with the bit cleared.  New entries start
unvisited, so a scan of one-hit wonders is evicted before the working set (the property that
makes SIEVE/CLOCK competitive with LRU for web traffic).

Keys: an entry without Vary is stored under its primary key; a resource with Vary stores each
variant under ``primary + NUL + secondary`` and remembers the Vary names per primary key.  A
resource whose Vary changes drops its old variants (RFC 9111 4.1 prefers the newest response).

Purges: by primary key (every variant), by URL prefix or path prefix (a scan over all entries:
O(entries), about 0.1 s per million on one core, acceptable for an admin action), and by
surrogate key (a tag index, O(tagged entries)).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from .entry import Entry
from .key import VARIANT_SEPARATOR, Negotiator, negotiate_coding, vary_key
from .policy import Headers


class MemoryStore:
    """Entries by key, at most ``max_bytes`` in total, no body above ``max_object`` bytes."""

    __slots__ = (
        "_entries",
        "_negotiate",
        "_on_resize",
        "_tags",
        "_variants",
        "_vary",
        "bytes",
        "evictions",
        "max_bytes",
        "max_object",
        "stored",
    )

    def __init__(
        self, max_bytes: int, max_object: int, *, negotiate: Negotiator = negotiate_coding
    ) -> None:
        self.max_bytes = max_bytes
        self.max_object = max_object
        self.bytes = 0
        self.evictions = 0
        #: Entries stored so far (only grows; the edge freezes the GC's heap by it).
        self.stored = 0
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        #: primary key -> the Vary names its variants are keyed by (resources with Vary only).
        self._vary: dict[bytes, tuple[bytes, ...]] = {}
        #: primary key -> keys of its stored variants (resources with Vary only).
        self._variants: dict[bytes, set[bytes]] = {}
        self._tags: dict[str, set[bytes]] = {}
        self._negotiate = negotiate
        #: One bound method shared by every stored entry (``entry.on_resize``): a bound method
        #: per entry would be one more object per entry, and one the cyclic GC tracks.  Entry
        #: -> this -> store -> ``_entries`` -> entry is a cycle; ``_unlink`` and ``clear`` break
        #: it, so a removed entry is freed by reference counting alone (no GC pass needed).
        self._on_resize: Callable[[Entry, int], None] = self._resized

    def __len__(self) -> int:
        return len(self._entries)

    # ----------------------------------------------------------------------------------------
    # Lookup

    def get(self, primary: bytes, headers: Headers) -> Entry | None:
        """The stored response for a request: one dict lookup when the resource has no Vary."""
        entry = self._entries.get(primary)
        if entry is None:
            names = self._vary.get(primary)
            if names is None:
                return None
            entry = self._entries.get(
                primary + VARIANT_SEPARATOR + vary_key(names, headers, self._negotiate)
            )
            if entry is None:
                return None
        entry.visited = True
        return entry

    def get_key(self, key: bytes) -> Entry | None:
        return self._entries.get(key)

    def vary_names(self, primary: bytes) -> tuple[bytes, ...] | None:
        """The Vary names known for a resource, or None when it has no stored variants."""
        return self._vary.get(primary)

    def entries(self) -> Iterable[Entry]:
        return self._entries.values()

    # ----------------------------------------------------------------------------------------
    # Insertion and eviction

    def put(self, entry: Entry) -> bool:
        """Store ``entry`` (replacing the same key); False when it is too large to keep."""
        if len(entry.response.body) > self.max_object or entry.size > self.max_bytes:
            self.remove(entry.key)  # the older copy is superseded: never serve it again
            return False
        old = self._entries.pop(entry.key, None)
        if old is not None:
            self._unlink(old)
        primary = entry.primary
        names = entry.response.vary
        if names:
            if self._vary.get(primary) != names:
                self.remove_primary(primary)
                self._vary[primary] = names
            self._variants.setdefault(primary, set()).add(entry.key)
        elif primary in self._vary:
            self.remove_primary(primary)
        self._entries[entry.key] = entry
        for tag in entry.response.surrogate_keys:
            self._tags.setdefault(tag, set()).add(entry.key)
        self.bytes += entry.size
        self.stored += 1
        entry.on_resize = self._on_resize
        self.evict()
        return True

    def _resized(self, entry: Entry, delta: int) -> None:
        self.bytes += delta
        if delta > 0 and self.bytes > self.max_bytes:
            self.evict()

    def evict(self) -> None:
        """Evict until within ``max_bytes`` (after lowering it, for instance)."""
        entries = self._entries
        while self.bytes > self.max_bytes and entries:
            key, entry = entries.popitem(last=False)
            if entry.visited:
                entry.visited = False
                entries[key] = entry  # second chance: to the back of the queue
                continue
            self._unlink(entry)
            self.evictions += 1

    def _unlink(self, entry: Entry) -> None:
        """Forget an entry already popped from ``_entries``."""
        entry.on_resize = None
        self.bytes -= entry.size
        for tag in entry.response.surrogate_keys:
            keys = self._tags.get(tag)
            if keys is not None:
                keys.discard(entry.key)
                if not keys:
                    del self._tags[tag]
        if entry.response.vary:
            variants = self._variants.get(entry.primary)
            if variants is not None:
                variants.discard(entry.key)
                if not variants:
                    del self._variants[entry.primary]
                    self._vary.pop(entry.primary, None)

    # ----------------------------------------------------------------------------------------
    # Removal and purges

    def remove(self, key: bytes) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._unlink(entry)
        return True

    def remove_entry(self, entry: Entry) -> bool:
        """Remove ``entry`` only if it is still the one stored under its key."""
        if self._entries.get(entry.key) is not entry:
            return False
        return self.remove(entry.key)

    def remove_primary(self, primary: bytes) -> int:
        """Remove every variant of a resource; returns how many entries went."""
        removed = int(self.remove(primary))
        for key in tuple(self._variants.get(primary, ())):
            removed += self.remove(key)
        self._vary.pop(primary, None)
        self._variants.pop(primary, None)
        return removed

    def variants_of(self, primary: bytes) -> list[Entry]:
        """Every stored variant of a resource (a soft purge marks them stale)."""
        found = [self._entries[key] for key in self._variants.get(primary, ())]
        entry = self._entries.get(primary)
        return found if entry is None else [entry, *found]

    def tagged(self, tag: str) -> list[Entry]:
        return [self._entries[key] for key in self._tags.get(tag, ())]

    def matching(self, matches: Callable[[Entry], bool]) -> list[Entry]:
        return [entry for entry in self._entries.values() if matches(entry)]

    def purge_tag(self, tag: str) -> int:
        return sum(self.remove(key) for key in tuple(self._tags.get(tag, ())))

    def purge_where(self, matches: Callable[[Entry], bool]) -> int:
        doomed = [key for key, entry in self._entries.items() if matches(entry)]
        return sum(self.remove(key) for key in doomed)

    def purge_url_prefix(self, prefix: bytes) -> int:
        """Entries whose URL (``scheme://host/path?query``) starts with ``prefix``."""
        return self.purge_where(lambda entry: entry.url.startswith(prefix))

    def purge_path_prefix(self, prefix: bytes) -> int:
        """Entries whose path (on any host) starts with ``prefix``."""

        def matches(entry: Entry) -> bool:
            url = entry.url
            path_start = url.find(b"/", url.find(b"://") + 3)
            return path_start != -1 and url.startswith(prefix, path_start)

        return self.purge_where(matches)

    def clear(self) -> int:
        count = len(self._entries)
        for entry in self._entries.values():
            entry.on_resize = None
        self._entries.clear()
        self._vary.clear()
        self._variants.clear()
        self._tags.clear()
        self.bytes = 0
        return count


__all__ = ["MemoryStore"]
