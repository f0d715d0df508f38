"""L1: the per-process memory store, bounded in bytes.

Eviction is CLOCK (second chance) over an ``OrderedDict`` in insertion order: a hit only sets
``entry.visited`` (no reordering on the hot path, unlike LRU's ``move_to_end``); eviction pops
the oldest entry and gives a visited one another lap with the bit cleared.  New entries start
unvisited, so a scan of one-hit wonders is evicted before the working set (the property that
makes SIEVE/CLOCK competitive with LRU for web traffic).

Keys: an entry without Vary is stored under its primary key; a resource with Vary stores each
variant under ``primary + NUL + secondary`` and remembers the Vary names per primary key.  A
resource whose Vary changes drops its old variants (RFC 9111 4.1 prefers the newest response).

Purges: by primary key (every variant), by surrogate key (a tag index, O(tagged entries)) and by
URL or path prefix through a path index (``PathIndex``: a trie of path segments, so a prefix
purge visits the entries under the prefix, not all of them).  A URL prefix that ends inside the
host (``https://api.exa``) has no path to go by and scans.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from .entry import Entry, ResponseForms, stored_under
from .key import VARIANT_SEPARATOR, Negotiator, negotiate_coding, vary_key
from .policy import Headers
from .purge_queue import path_of

#: The path (and query) of a stored URL ``scheme://host/path?q``; None without one.
url_path = path_of
#: What comes before the ``//`` of the URLs a store holds (``MemoryStore.put``).
_PLAIN_SCHEMES = frozenset({b"https:", b"http:"})


class _Node:
    __slots__ = ("children", "keys")

    def __init__(self) -> None:
        #: Segment -> subtree, or the one store key of a path that ends there with nothing
        #: under it (most paths: a node per entry would cost 48 B of every entry).
        self.children: dict[bytes, _Node | bytes] | None = None
        #: Store keys of entries whose path ends here: one key as is (most paths have one
        #: entry; a set per entry would cost 200 B), a set for variants.
        self.keys: bytes | set[bytes] | None = None


class PathIndex:
    """Store keys by URL path: a trie of ``/``-separated segments (the query stays in the last
    segment).  ``under(prefix)`` walks the prefix's whole segments, then takes every subtree
    whose segment starts with its last, partial one: O(depth + entries under the prefix)."""

    __slots__ = ("_directory", "_directory_node", "_root")

    def __init__(self) -> None:
        self._root = _Node()
        #: The segments of the last added path's directory and the node they lead to: a stream
        #: of new keys under one path (``?u=1``, ``?u=2``, ...) walks the trie once.  Forgotten
        #: whenever a node leaves the trie or turns into a leaf (``discard``, ``clear``): until
        #: then the walk would lead to the same node (``add`` only turns leaves into nodes).
        self._directory: list[bytes] | None = None
        self._directory_node = self._root

    def add(self, path: bytes, key: bytes) -> None:
        self.add_segments(path[1:].split(b"/"), key)

    def add_segments(self, segments: list[bytes], key: bytes) -> None:
        """``add`` of the path whose segments (after its leading ``/``) are ``segments``: a
        list of one's own, which this keeps."""
        last = segments.pop()
        if segments == self._directory:  # the last add's directory: its node, without the walk
            node = self._directory_node
        else:
            node = self._root
            for segment in segments:  # the node for each, made (a leaf there made a node)
                children = node.children
                if children is None:
                    children = node.children = {}
                child = children.get(segment)
                if isinstance(child, _Node):
                    node = child
                    continue
                made = children[segment] = _Node()
                if child is not None:
                    made.keys = child  # the leaf's key stays: its path now has more under it
                node = made
            self._directory, self._directory_node = segments, node
        children = node.children
        if children is None:
            children = node.children = {}
        child = children.get(last)
        if child is None:
            children[last] = key  # a leaf: the key itself
            return
        if isinstance(child, bytes):
            if child == key:
                return
            variants = children[last] = _Node()  # a second key for this path (Vary)
            variants.keys = {child, key}
            return
        keys = child.keys
        if keys is None:
            child.keys = key
        elif isinstance(keys, bytes):
            if keys != key:
                child.keys = {keys, key}
        else:
            keys.add(key)

    def discard(self, path: bytes, key: bytes) -> None:
        trail: list[tuple[_Node, bytes]] = []
        node = self._root
        *inner, last = path[1:].split(b"/")
        for segment in inner:
            child = node.children.get(segment) if node.children is not None else None
            if child is None or isinstance(child, bytes):
                return
            trail.append((node, segment))
            node = child
        children = node.children
        found = children.get(last) if children is not None else None
        if found is None:
            return
        assert children is not None
        if isinstance(found, bytes):
            if found == key:
                del children[last]
        else:
            keys = found.keys
            if isinstance(keys, bytes):
                if keys == key:
                    found.keys = None
            elif keys is not None:
                keys.discard(key)
                if len(keys) == 1:
                    found.keys = next(iter(keys))
                elif not keys:
                    found.keys = None
            if not found.children:
                self._directory = None  # ``found`` leaves the trie
                if found.keys is None:
                    del children[last]
                elif isinstance(found.keys, bytes):
                    children[last] = found.keys  # back to a leaf
        # Prune the branch that no longer leads to anything.
        while trail and node.keys is None and not node.children:
            self._directory = None
            parent, segment = trail.pop()
            assert parent.children is not None
            del parent.children[segment]
            node = parent

    def under(self, prefix: bytes) -> list[bytes]:
        """Keys of entries whose path starts with ``prefix`` (which starts with ``/``)."""
        *whole, partial = prefix[1:].split(b"/")
        node = self._root
        for segment in whole:
            child = node.children.get(segment) if node.children is not None else None
            if child is None or isinstance(child, bytes):
                return []
            node = child
        if node.children is None:
            return []
        stack = [child for name, child in node.children.items() if name.startswith(partial)]
        found: list[bytes] = []
        while stack:
            item = stack.pop()
            if isinstance(item, bytes):
                found.append(item)
                continue
            keys = item.keys
            if isinstance(keys, bytes):
                found.append(keys)
            elif keys is not None:
                found.extend(keys)
            if item.children:
                stack.extend(item.children.values())
        return found

    def clear(self) -> None:
        self._root = self._directory_node = _Node()
        self._directory = None


class MemoryStore:
    """Entries by key, at most ``max_bytes`` in total, no body above ``max_object`` bytes."""

    __slots__ = (
        "_entries",
        "_negotiate",
        "_on_resize",
        "_paths",
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
        self._paths = PathIndex()
        self._negotiate = negotiate
        #: One bound method shared by every stored entry (``entry.on_resize``): a bound method
        #: per entry would be one more object per entry, and one the cyclic GC tracks.  Entry
        #: -> this -> store -> ``_entries`` -> entry is a cycle; ``_unlink`` and ``clear`` break
        #: it, so a removed entry is freed by reference counting alone (no GC pass needed).
        self._on_resize: Callable[[ResponseForms, int], None] = self._resized

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
        key, url = stored_under(entry)
        response = entry.response
        if len(response.body) > self.max_object or entry.size > self.max_bytes:
            self.remove(key)  # the older copy is superseded: never serve it again
            return False
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self._unlink(old)
        primary = entry.primary
        names = response.vary
        if names:
            if self._vary.get(primary) != names:
                self.remove_primary(primary)
                self._vary[primary] = names
            self._variants.setdefault(primary, set()).add(key)
        elif primary in self._vary:
            self.remove_primary(primary)
        entries[key] = entry
        for tag in response.surrogate_keys:
            self._tags.setdefault(tag, set()).add(key)
        # ``url_path``, as one split for a plain ``https://host/...``: ``find`` parses its
        # arguments at a few hundred instructions a call, and a split of the path followed.
        segments = url.split(b"/")
        if len(segments) > 3 and segments[0] in _PLAIN_SCHEMES and not segments[1]:
            del segments[:3]  # scheme, "" and host: the path's segments are left
            self._paths.add_segments(segments, key)
        else:
            start = url.find(b"/", url.find(b"://") + 3)
            if start != -1:
                self._paths.add(url[start:], key)
        self.bytes += entry.size
        self.stored += 1
        entry.on_resize = self._on_resize
        if self.bytes > self.max_bytes:  # ``evict``'s own test: no call while within bounds
            self.evict()
        return True

    def _resized(self, entry: ResponseForms, delta: int) -> None:
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
        path = url_path(entry.url)
        if path is not None:
            self._paths.discard(path, entry.key)
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

    def with_url_prefix(self, prefix: bytes) -> list[Entry]:
        """Entries whose URL (``scheme://host/path?query``) starts with ``prefix``: through
        the path index when the prefix reaches the path, else a scan."""
        path = url_path(prefix)
        if path is None:
            return self.matching(lambda entry: entry.url.startswith(prefix))
        return [entry for entry in self.with_path_prefix(path) if entry.url.startswith(prefix)]

    def with_path_prefix(self, prefix: bytes) -> list[Entry]:
        """Entries whose path (on any host) starts with ``prefix`` (``/api/v1/ti``)."""
        entries = self._entries
        found = [entries[key] for key in self._paths.under(prefix) if key in entries]
        # The trie is exact; the check keeps a purge exact whatever the URL's shape.
        return [entry for entry in found if (url_path(entry.url) or b"").startswith(prefix)]

    def purge_tag(self, tag: str) -> int:
        return sum(self.remove(key) for key in tuple(self._tags.get(tag, ())))

    def purge_where(self, matches: Callable[[Entry], bool]) -> int:
        doomed = [key for key, entry in self._entries.items() if matches(entry)]
        return sum(self.remove(key) for key in doomed)

    def purge_url_prefix(self, prefix: bytes) -> int:
        """Entries whose URL (``scheme://host/path?query``) starts with ``prefix``."""
        return sum(self.remove(entry.key) for entry in self.with_url_prefix(prefix))

    def purge_path_prefix(self, prefix: bytes) -> int:
        """Entries whose path (on any host) starts with ``prefix``."""
        return sum(self.remove(entry.key) for entry in self.with_path_prefix(prefix))

    def clear(self) -> int:
        count = len(self._entries)
        for entry in self._entries.values():
            entry.on_resize = None
        self._entries.clear()
        self._vary.clear()
        self._variants.clear()
        self._tags.clear()
        self._paths.clear()
        self.bytes = 0
        return count


__all__ = ["MemoryStore", "PathIndex", "url_path"]
