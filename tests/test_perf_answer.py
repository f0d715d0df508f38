"""The answer path's shortcuts make exactly what the plain code makes: ``stored_response`` is a
``StoredResponse`` like one built by its constructor (equal, hashed, shown and frozen alike), and
``shaped_meta`` reads a head as ``response_meta`` does."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.cache.admission import Admission
from edge.cache.entry import Entry, ResponseForms, StoredResponse, stored_response
from edge.cache.key import CacheKey, negotiate_coding
from edge.cache.messages import RequestInfo, UpstreamResponse
from edge.cache.policy import NO_DIRECTIVES, Freshness, meta_shape, response_meta, shaped_meta
from meridian.config import CacheRule

NOW = 1_796_615_561.0

FIELD_BYTES = st.binary(max_size=12)
FRESHNESS = st.builds(
    Freshness,
    st.floats(0, 2e9),
    st.floats(0, 1e6),
    st.floats(-1, 1e6),
    st.floats(0, 1e3),
    st.floats(0, 1e3),
    st.booleans(),
    st.booleans(),
)
FIELDS = st.tuples(
    st.integers(100, 599),
    FIELD_BYTES,
    st.lists(st.tuples(FIELD_BYTES, FIELD_BYTES), max_size=4).map(tuple),
    FIELD_BYTES,
    FRESHNESS,
    st.lists(FIELD_BYTES, max_size=3).map(tuple),
    st.lists(st.text(max_size=5), max_size=3).map(tuple),
    st.none() | FIELD_BYTES,
    st.booleans(),
    st.booleans(),
)


@given(FIELDS)
def test_stored_response_is_the_constructors(fields: tuple[object, ...]) -> None:
    made = stored_response(*fields)  # type: ignore[arg-type]
    plain = StoredResponse(*fields)  # type: ignore[arg-type]
    assert type(made) is StoredResponse
    assert made == plain and plain == made
    assert hash(made) == hash(plain)
    assert repr(made) == repr(plain)
    assert dataclasses.astuple(made) == dataclasses.astuple(plain)
    assert dataclasses.replace(made, status=204) == dataclasses.replace(plain, status=204)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.status = 1  # type: ignore[misc]


#: Values a volatile field may carry: valid and invalid dates, empty ones, odd ETags and Ages.
VOLATILE_VALUE = st.sampled_from(
    [
        b"",
        b" ",
        b"0",
        b"-1",
        b"5, 7",
        b"Mon, 07 Dec 2026 15:00:00 GMT",
        b"Sunday, 06-Nov-94 08:49:37 GMT",
        b"Sun Nov  6 08:49:37 1994",
        b"not a date",
        b'"abc"',
        b' W/"x" ',
    ]
)
SHAPE_LINE = st.sampled_from(
    [
        b"date",
        b"etag",
        b"last-modified",
        b"expires",
        b"age",
        b"cache-control",
        b"content-type",
        b"vary",
        b"cdn-cache-control",
    ]
)
STABLE_VALUE = {
    b"cache-control": b"max-age=60",
    b"content-type": b"text/plain",
    b"vary": b"accept-encoding",
    b"cdn-cache-control": b"max-age=5",
}


@given(
    st.lists(SHAPE_LINE, max_size=8),
    st.data(),
    st.sampled_from([(), (b"cdn-cache-control",)]),
)
def test_shaped_meta_is_response_meta(
    names: list[bytes], data: st.DataObject, targeted: tuple[bytes, ...]
) -> None:
    def head() -> list[tuple[bytes, bytes]]:
        return [
            (name, STABLE_VALUE[name] if name in STABLE_VALUE else data.draw(VOLATILE_VALUE))
            for name in names
        ]

    first, other = head(), head()
    assert shaped_meta(meta_shape(first, targeted), other) == response_meta(other, targeted)


@given(
    st.sampled_from([200, 204, 304, 404]),
    st.binary(max_size=8),
    st.booleans(),
    st.booleans(),
    st.sampled_from([b"", b"x-pop: a\r\n"]),
    st.sampled_from([frozenset(), frozenset({b"cdn-cache-control"})]),
)
def test_entry_sets_what_response_forms_sets(
    status: int,
    body: bytes,
    compressible: bool,
    with_compressor: bool,
    extra_head: bytes,
    hidden: frozenset[bytes],
) -> None:
    """``Entry.__init__`` sets the ``ResponseForms`` slots itself: as its ``__init__`` would."""
    response = StoredResponse(
        status, b"", ((b"etag", b'"e"'),), body, Freshness(0, 0, 60, 0, 0, False, False)
    )
    response = dataclasses.replace(response, compressible=compressible)
    compressor = (lambda data, coding: data) if with_compressor else None
    entry = Entry(
        response,
        key=b"G:https://h/p",
        primary=b"G:https://h/p",
        url=b"https://h/p",
        compressor=compressor,
        extra_head=extra_head,
        hidden=hidden,
    )
    forms = ResponseForms(response, entry._compressor, extra_head, hidden)
    for slot in ResponseForms.__slots__:
        if slot != "size":
            assert getattr(entry, slot) == getattr(forms, slot), slot
    assert entry._house is forms._house
    assert (entry._compressor is not None) == (
        with_compressor and compressible and status not in (204, 304) and bool(body)
    )


HEAD_VALUE = st.sampled_from([b"", b"a", b"100%", b"%s", b"%d%%", b'"e1"', b'W/"x"'])
HEAD_NAME = st.sampled_from(
    [b"date", b"etag", b"content-type", b"vary", b"accept-ranges", b"x-note", b"cdn-cache-control"]
)


@given(
    st.lists(st.tuples(HEAD_NAME, HEAD_VALUE), min_size=1, max_size=6),
    st.data(),
    st.sampled_from([200, 204, 404]),
    st.sampled_from([b"", b"x-pop: 5%\r\n"]),
    st.sampled_from([frozenset(), frozenset({b"cdn-cache-control"})]),
    st.booleans(),
)
def test_a_template_head_is_the_plain_head(
    fields: list[tuple[bytes, bytes]],
    data: st.DataObject,
    status: int,
    extra_head: bytes,
    hidden: frozenset[bytes],
    compressed: bool,
) -> None:
    """``HeadTemplate.head`` (one ``%`` formatting) makes the head ``_head`` builds line by
    line, for any values at its places, ``%`` in them or around them."""
    places = sorted(data.draw(st.sets(st.integers(0, len(fields) - 1))))

    def entry(headers: tuple[tuple[bytes, bytes], ...]) -> Entry:
        response = StoredResponse(
            status, b"", headers, b"body", Freshness(0, 0, 60, 0, 0, False, False)
        )
        return Entry(
            dataclasses.replace(response, compressible=True),
            key=b"G|https://h/p",
            primary=b"G|https://h/p",
            url=b"https://h/p",
            compressor=(lambda body, coding: body[:1]) if compressed else None,
            extra_head=extra_head,
            hidden=hidden,
        )

    template = entry(tuple(fields)).head_template(places)
    if template is None:
        return  # a value hidden: the entry keeps building its head itself
    other = list(fields)
    for at in places:
        other[at] = (other[at][0], data.draw(HEAD_VALUE))
    shaped, plain = entry(tuple(other)), entry(tuple(other))
    assert template.fits(shaped)
    shaped.use_head_template(template)
    assert shaped.wire("identity", 1.0) == plain.wire("identity", 1.0)
    assert shaped.size == plain.size


@given(
    st.lists(
        st.sampled_from(
            [
                (b"content-length", b"0"),
                (b"content-length", b"4"),
                (b"content-length", b" 4 "),
                (b"content-length", b"junk"),
                (b"content-encoding", b"gzip"),
                (b"cache-control", b"max-age=60"),
                (b"etag", b'"e"'),
                (b"vary", b"accept-language"),
                (b"content-type", b"text/plain"),
            ]
        ),
        max_size=6,
    ),
    st.sampled_from([b"", b"body", b"bodybody"]),
)
def test_a_shaped_admission_is_the_plain_one(
    fields: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """``admit`` of a head of a known shape (its Content-Length read by index, its store key
    without ``variant_key`` when nothing varies) gives the verdict and entry of the plain one."""
    headers = [(b"date", b"Mon, 07 Dec 2026 15:00:00 GMT"), *fields]
    rule = CacheRule("/", ttl=5.0)
    key = CacheKey(b"G|http://h/p", b"http://h/p", b"/p", b"/p", rule)
    request = RequestInfo([], NO_DIRECTIVES, "identity", False, False, None, None)
    made = [
        Admission((), compressor=None, extra_head=b"", negotiate=negotiate_coding) for _ in "ab"
    ]
    shape = made[0].stored_shape(headers, rule)
    answers = []
    for admission, known in zip(made, (shape, None), strict=True):
        verdict = admission.storable_head(key, request, 200, headers, NOW, known)
        entry, why = admission.admit(
            key, request, UpstreamResponse(200, headers, body, b"OK", False), NOW, NOW
        )
        answers.append((verdict, why, entry and (entry.key, entry.response, entry.size)))
    assert answers[0] == answers[1]
