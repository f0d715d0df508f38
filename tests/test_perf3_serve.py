"""The miss's serving shortcuts make exactly what the plain path makes.

``entry.first_answer`` (a fill's MISS formatted in one go from its entry's head template, the
head not kept) writes the bytes ``Entry.wire`` writes, and leaves the entry as ``wire`` would
less the head it did not keep: the next answer builds and counts that head, after which the two
entries are alike to the byte."""

from __future__ import annotations

from hypothesis import given
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
