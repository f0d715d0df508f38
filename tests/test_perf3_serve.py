"""The miss's serving and storing shortcuts make exactly what the plain paths make.

* ``entry.first_answer`` (a fill's MISS formatted in one go from its entry's head template,
  the head not kept) writes the bytes ``Entry.wire`` writes, and leaves the entry as ``wire``
  would less the head it did not keep: the next answer builds and counts that head, after
  which the two entries are alike to the byte;
* ``MemoryStore.put`` indexes a plain URL (one split) under ``url_path(url)``, as its two
  ``find`` calls did, and ``PathIndex.add_segments``'s shortcut to the last added directory's
  node builds the trie a walk from the root builds, whatever the adds, discards and clears.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge.cache.entry import (
    BYTES_OVERHEAD,
    X_CACHE_HIT,
    X_CACHE_MISS,
    X_CACHE_REVALIDATED,
    X_CACHE_STALE,
    Entry,
    HeadTemplate,
    StoredResponse,
    first_answer,
)
from edge.cache.lookups import serve
from edge.cache.messages import RequestInfo
from edge.cache.policy import NO_DIRECTIVES, Freshness
from edge.cache.store import MemoryStore, PathIndex, _Node, url_path

HEAD_VALUE = st.sampled_from([b"", b"a", b"100%", b"%s", b"%d%%", b'"e1"', b'W/"x"'])
HEAD_NAME = st.sampled_from(
    [
        b"date",
        b"etag",
        b"last-modified",
        b"content-type",
        b"vary",
        b"accept-ranges",
        b"x-note",
        b"cdn-cache-control",
    ]
)
EXTRA = st.sampled_from(
    [b"", b"x-request-id: 7\r\n", b"x-request-id: 5%d\r\nconnection: close\r\n"]
)
FRESHNESS = st.builds(
    Freshness,
    st.floats(0, 1e6),  # response_time
    st.floats(0, 1e6),  # initial_age
    st.floats(-1, 1e6),
    st.floats(0, 1e3),
    st.floats(0, 1e3),
    st.booleans(),
    st.booleans(),
)
NOW = st.floats(0, 3e9)


def _halve(body: bytes, coding: str) -> bytes:
    return body[: len(body) // 2]


def _entry(
    headers: tuple[tuple[bytes, bytes], ...],
    status: int,
    body: bytes,
    freshness: Freshness,
    extra_head: bytes,
    hidden: frozenset[bytes],
    compressed: bool,
) -> Entry:
    response = StoredResponse(status, b"", headers, body, freshness, compressible=compressed)
    return Entry(
        response,
        key=b"G|https://h/p",
        primary=b"G|https://h/p",
        url=b"https://h/p",
        compressor=_halve if compressed else None,
        extra_head=extra_head,
        hidden=hidden,
    )


@st.composite
def templated(draw: st.DrawFn) -> tuple[Entry, Entry, HeadTemplate]:
    """A pair of equal entries, the first holding its head's template (as a fill's), the second
    building its head line by line: both of a template made from a third entry of the shape."""
    fields = draw(st.lists(st.tuples(HEAD_NAME, HEAD_VALUE), min_size=1, max_size=6))
    places = sorted(draw(st.sets(st.integers(0, len(fields) - 1))))
    status = draw(st.sampled_from([200, 203, 204, 404]))
    body = draw(st.sampled_from([b"", b"body", b"{}" * 300]))
    freshness = draw(FRESHNESS)
    extra_head = draw(st.sampled_from([b"", b"x-pop: 5%\r\n"]))
    hidden = draw(st.sampled_from([frozenset(), frozenset({b"cdn-cache-control"})]))
    compressed = draw(st.booleans())

    def entry(headers: tuple[tuple[bytes, bytes], ...]) -> Entry:
        return _entry(headers, status, body, freshness, extra_head, hidden, compressed)

    template = entry(tuple(fields)).head_template(places)
    other = list(fields)
    for at in places:
        other[at] = (other[at][0], draw(HEAD_VALUE))
    shaped, plain = entry(tuple(other)), entry(tuple(other))
    if template is not None:
        assert template.fits(shaped)
        shaped.use_head_template(template)
    return shaped, plain, template  # type: ignore[return-value]


def _state(entry: Entry) -> tuple[object, ...]:
    return tuple(getattr(entry, slot) for slot in Entry.__slots__[1:]) + tuple(
        getattr(entry, slot)
        for slot in type(entry).__mro__[1].__slots__  # ResponseForms
    )


@given(
    templated(),
    st.sampled_from(["identity", "gzip", "br"]),
    NOW,
    st.booleans(),
    EXTRA,
)
def test_a_first_answer_is_the_wire_of_a_miss(
    pair: tuple[Entry, Entry, HeadTemplate | None],
    coding: str,
    now: float,
    head_only: bool,
    extra: bytes,
) -> None:
    shaped, plain, template = pair
    plain_sizes: list[int] = []
    shaped_sizes: list[int] = []
    plain.on_resize = lambda _entry, delta: plain_sizes.append(delta)
    shaped.on_resize = lambda _entry, delta: shaped_sizes.append(delta)
    expected = plain.wire(coding, now, head_only, X_CACHE_MISS, extra)
    first = first_answer(shaped, coding, now, head_only, extra)
    if template is None or (shaped._compressor is not None and coding != "identity"):
        assert first is None  # ``wire`` answers
        return
    assert first == expected
    # The head is not kept (nor counted): the entry is as before its answer.
    head = plain._head0
    assert isinstance(head, bytes) and shaped._head0 is template
    assert (plain_sizes, shaped_sizes) == ([len(head) + BYTES_OVERHEAD], [])
    assert shaped.size == plain.size - len(head) - BYTES_OVERHEAD
    # Any later answer builds the head and counts it: then the two are the same.
    for x_cache in (X_CACHE_HIT, X_CACHE_HIT, X_CACHE_STALE, X_CACHE_MISS):
        assert shaped.wire(coding, now, head_only, x_cache, extra) == plain.wire(
            coding, now, head_only, x_cache, extra
        )
    assert shaped.on_resize is not plain.on_resize
    shaped.on_resize = plain.on_resize = None
    assert _state(shaped) == _state(plain)
    assert shaped_sizes == plain_sizes  # the store is told the same growth, the head included


REQUEST_FIELDS = st.tuples(
    st.sampled_from(["identity", "gzip"]),
    st.booleans(),
    st.sampled_from([None, b'"e1"', b"*", b'W/"x"']),
    st.sampled_from([None, b"Mon, 07 Dec 2026 03:52:41 GMT"]),
    st.sampled_from([None, b"bytes=0-1", b"bytes=5-", b"bytes=9999-"]),
)


@given(
    templated(),
    REQUEST_FIELDS,
    NOW,
    EXTRA,
    st.sampled_from([X_CACHE_MISS, X_CACHE_HIT, X_CACHE_STALE, X_CACHE_REVALIDATED]),
)
def test_serve_answers_as_the_entry_does(
    pair: tuple[Entry, Entry, HeadTemplate | None],
    request_fields: tuple[str, bool, bytes | None, bytes | None, bytes | None],
    now: float,
    extra: bytes,
    x_cache: bytes,
) -> None:
    """``serve`` (its MISS shortcut included) answers what the entry's own forms answer: a 304
    for its conditionals, a range, else the whole response; then both entries serve alike."""
    shaped, plain, _ = pair
    coding, head, if_none_match, if_modified_since, range_ = request_fields
    request = RequestInfo(
        (),
        NO_DIRECTIVES,
        coding,  # type: ignore[arg-type]
        head,
        False,
        if_none_match,
        if_modified_since,
        range=range_,
    )
    if (if_none_match is not None or if_modified_since is not None) and plain.not_modified_for(
        if_none_match, if_modified_since
    ):
        expected = plain.wire_not_modified(coding, now, x_cache, extra)
    else:
        ranged = None
        if range_ is not None:
            ranged = plain.wire_range(range_, None, now, x_cache, extra)
        expected = (
            ranged if ranged is not None else plain.wire(coding, now, head, x_cache, extra)  # type: ignore[arg-type]
        )
    assert serve(shaped, request, x_cache, now, extra) == expected
    for later in (coding, "identity"):  # the template's head built on both sides
        assert shaped.wire(later, now + 1) == plain.wire(later, now + 1)
    assert _state(shaped) == _state(plain)


def test_a_ticker_miss_takes_the_shortcut() -> None:
    """The common case (a fill's MISS of an identity answer with its template) is answered
    by ``first_answer``: its entry keeps the template, not a head."""
    headers = (
        (b"etag", b'"e1"'),
        (b"cache-control", b"public, max-age=1"),
        (b"content-type", b"application/json"),
        (b"date", b"Mon, 07 Dec 2026 03:52:41 GMT"),
    )
    freshness = Freshness(100.0, 0.0, 1.0, 0.0, 0.0, False, False)
    first = _entry(headers, 200, b"{}", freshness, b"", frozenset(), True)
    template = first.head_template([0, 3])
    assert template is not None
    entry = _entry(headers, 200, b"{}", freshness, b"", frozenset(), True)
    entry.use_head_template(template)
    request = RequestInfo((), NO_DIRECTIVES, "identity", False, False, None, None)
    wire = serve(entry, request, X_CACHE_MISS, 100.5, b"x-request-id: 1\r\n")
    assert wire == first.wire("identity", 100.5, False, X_CACHE_MISS, b"x-request-id: 1\r\n")
    assert entry._head0 is template


# -----------------------------------------------------------------------------------------------
# The store: ``MemoryStore.put`` splits a plain URL once, and ``PathIndex.add_segments`` goes
# straight to the last added path's directory node.


def _dump(node: _Node | bytes) -> object:
    """A path index's trie as plain values (a set of keys as a frozenset)."""
    if isinstance(node, bytes):
        return node
    keys = frozenset(node.keys) if isinstance(node.keys, set) else node.keys
    children = (
        None
        if node.children is None
        else {segment: _dump(child) for segment, child in node.children.items()}
    )
    return keys, children


PATHS = st.sampled_from(
    [
        *(b"/", b"/a", b"/a/", b"/a/b", b"/a/b/c", b"/a/b/c?u=1", b"/a/b/c?u=2/3", b"/a/c"),
        *(b"/b", b"//", b"/a//b", b"/ab", b"/a/bc/d"),
    ]
)
INDEX_OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "add", "discard", "discard", "clear"]),
        PATHS,
        st.sampled_from([b"k1", b"k2"]),
    ),
    max_size=40,
)
PREFIXES = [b"/", b"/a", b"/a/", b"/a/b", b"/a/b/", b"/a/b/c", b"/b", b"//", b"/x"]


@settings(max_examples=500, deadline=None)
@given(INDEX_OPS)
@example(  # the directory's node turns back into a leaf, then a path under it is added
    [
        ("add", b"/a", b"k1"),
        ("add", b"/a/b", b"k2"),
        ("discard", b"/a/b", b"k2"),
        ("discard", b"/a", b"k1"),
        ("add", b"/a/c", b"k3"),
    ]
)
@example(  # the directory's node is pruned, then a path under it is added
    [("add", b"/a/b/c", b"k1"), ("discard", b"/a/b/c", b"k1"), ("add", b"/a/b/d", b"k2")]
)
def test_the_directory_shortcut_builds_the_walks_trie(ops: list[tuple[str, bytes, bytes]]) -> None:
    """Whatever the adds, discards and clears, the index that goes to its last directory's
    node holds the very trie of one that walks from the root every time, and finds the same
    keys under every prefix (as a scan of the paths would)."""
    shortcut, walked = PathIndex(), PathIndex()
    stored: dict[tuple[bytes, bytes], None] = {}
    hits = 0
    for op, path, key in ops:
        if op == "add":
            hits += shortcut._directory == path[1:].split(b"/")[:-1]
            shortcut.add(path, key)
            walked._directory = None  # never the shortcut: the walk every time
            walked.add(path, key)
            stored[(path, key)] = None
        elif op == "discard":
            shortcut.discard(path, key)
            walked.discard(path, key)
            stored.pop((path, key), None)
        else:
            shortcut.clear()
            walked.clear()
            stored.clear()
        assert _dump(shortcut._root) == _dump(walked._root)
        for prefix in PREFIXES:
            found = sorted(shortcut.under(prefix))
            assert found == sorted(walked.under(prefix))
            assert set(found) == {k for p, k in stored if p.startswith(prefix)}


STORE_URLS = st.sampled_from(
    [
        b"https://h.example/api/v1/ticker/BTC-USD?u=1",
        b"https://h.example/api/v1/ticker/BTC-USD?u=2",
        b"https://h.example/api/v1/ticker/ETH-USD?u=2/3",
        b"https://other.example/api/v1/ticker/BTC-USD?u=1",
        b"http://h/p",
        b"http://h",
        b"http://h/",
        b"http://h?q",
        b"http://h//",
        b"http:/h/p",
        b"https:/x//h/p",
        b"ftp://h/p",
        b"a/b://h/p/q",
        b"/bare/path",
        b"no-scheme",
    ]
)


class _Recording(PathIndex):
    """A path index noting the path each added key is indexed under (``add`` comes here)."""

    __slots__ = ("added",)

    def __init__(self) -> None:
        super().__init__()
        self.added: list[tuple[bytes, bytes]] = []

    def add_segments(self, segments: list[bytes], key: bytes) -> None:
        self.added.append((b"/" + b"/".join(segments), key))
        super().add_segments(segments, key)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(STORE_URLS, st.booleans()), max_size=12), st.integers(1, 40))
def test_put_indexes_a_url_where_url_path_says(puts: list[tuple[bytes, bool]], room: int) -> None:
    """``put``'s split of a plain URL indexes each entry under ``url_path(url)`` (as its two
    ``find`` calls did); with evictions (a store of ``room`` entries) and replaced keys on
    the way, the store's trie is the one of a store that walks from the root every time."""
    store = MemoryStore(room * _entry_size(), 1 << 16)
    walked = MemoryStore(room * _entry_size(), 1 << 16)
    recording = store._paths = _Recording()
    for url, own_url in puts:
        primary = b"G|" + (b"https://alias.example/x" if own_url else url)
        recording.added.clear()
        entry = _stored(primary, url)
        store.put(entry)
        path = url_path(url)
        assert recording.added == ([] if path is None else [(path, entry.key)])
        walked._paths._directory = None
        walked.put(_stored(primary, url))
        assert _dump(store._paths._root) == _dump(walked._paths._root)
        assert list(store._entries) == list(walked._entries)
        assert store.bytes == walked.bytes


def _stored(primary: bytes, url: bytes) -> Entry:
    freshness = Freshness(0.0, 0.0, 60.0, 0.0, 0.0, False, False)
    response = StoredResponse(200, b"OK", ((b"content-type", b"text/plain"),), b"x", freshness)
    return Entry(response, key=primary, primary=primary, url=url)


def _entry_size() -> int:
    return _stored(b"G|https://h.example/api/v1/ticker/BTC-USD?u=1", b"https://h/p").size + 60
