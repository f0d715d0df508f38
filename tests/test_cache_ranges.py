"""Byte ranges from a stored complete response: the pure parser and If-Range (RFC 9110 14,
13.1.5), and the 206/416 bytes an entry builds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.cache.entry import Entry, StoredResponse
from edge.cache.policy import Freshness, format_http_date
from edge.cache.ranges import (
    MAX_RANGES,
    UNSATISFIABLE,
    if_range_holds,
    parse_range,
    worth_multipart,
)

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "length", "spans"),
    [
        (b"bytes=0-1", 11, ((0, 1),)),
        (b"bytes=1-", 11, ((1, 10),)),
        (b"bytes=-1", 11, ((10, 10),)),
        (b"bytes=-50", 11, ((0, 10),)),  # a suffix longer than the body is all of it
        (b"bytes=5-999", 11, ((5, 10),)),  # last-pos clamped
        (b"BYTES = 0-0 , 2-3", 11, ((0, 0), (2, 3))),
        (b"bytes=0-0,,2-3", 11, ((0, 0), (2, 3))),  # empty list members are allowed
        (b"bytes=20-30, 0-1", 11, ((0, 1),)),  # the unsatisfiable one is dropped
        (b"bytes=" + b"9" * 40 + b"-", 11, UNSATISFIABLE),  # huge, not a slow int()
        (b"bytes=11-", 11, UNSATISFIABLE),
        (b"bytes=-0", 11, UNSATISFIABLE),
    ],
)
def test_parse_range(value: bytes, length: int, spans: tuple[tuple[int, int], ...]) -> None:
    assert parse_range(value, length) == spans


@pytest.mark.parametrize(
    "value",
    [
        b"items=0-1",  # another unit
        b"bytes 0-1",
        b"bytes=",
        b"bytes=1-0",  # last < first: invalid, ignored
        b"bytes=a-b",
        b"bytes=0-1;x",
        b"bytes=+1-2",
        b"bytes=\xd9\xa1-2",  # non-ASCII digits
        b"bytes=0-1,bytes=2-3",  # two Range lines joined
    ],
)
def test_malformed_ranges_get_the_whole_response(value: bytes) -> None:
    assert parse_range(value, 100) is None


def test_an_empty_body_is_sent_whole() -> None:
    assert parse_range(b"bytes=-5", 0) is None


def test_too_many_ranges_get_the_whole_response() -> None:
    few = b"bytes=" + b",".join(b"%d-%d" % (i * 10, i * 10 + 1) for i in range(MAX_RANGES))
    assert parse_range(few, 1000) is not None
    many = few + b",900-901"
    assert parse_range(many, 1000) is None


def test_overlapping_ranges_adding_up_past_the_body_get_the_whole_response() -> None:
    # CVE-2011-3192: "bytes=0-,0-,0-..." made Apache build many copies of the file.
    assert parse_range(b"bytes=0-,0-", 1000) is None
    assert parse_range(b"bytes=0-499,400-799", 1000) == ((0, 499), (400, 799))
    assert parse_range(b"bytes=0-599,400-", 1000) is None


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=10_000))
def test_parse_range_never_raises_and_stays_within_the_body(value: bytes, length: int) -> None:
    spans = parse_range(value, length)
    if spans is None:
        return
    assert len(spans) <= MAX_RANGES
    assert sum(last - first + 1 for first, last in spans) <= length
    assert all(0 <= first <= last < length for first, last in spans)


@given(
    st.lists(
        st.tuples(st.integers(0, 5000), st.integers(0, 5000)).map(sorted), min_size=1, max_size=4
    ),
    st.integers(1, 5000),
)
def test_parse_range_reads_what_was_asked(pairs: list[list[int]], length: int) -> None:
    value = b"bytes=" + b",".join(b"%d-%d" % (a, b) for a, b in pairs)
    spans = parse_range(value, length)
    expected = tuple((a, min(b, length - 1)) for a, b in pairs if a < length)
    if not expected:
        assert spans == UNSATISFIABLE
    elif sum(b - a + 1 for a, b in expected) > length:
        assert spans is None
    else:
        assert spans == expected


def test_multipart_only_when_smaller_than_the_body() -> None:
    assert worth_multipart(((0, 9), (500, 509)), 10_000, b"text/plain")
    assert not worth_multipart(((0, 9), (20, 29)), 100, b"text/plain")


LM = NOW - 3600


@pytest.mark.parametrize(
    ("if_range", "etag", "holds"),
    [
        (b'"v1"', b'"v1"', True),
        (b'"v2"', b'"v1"', False),
        (b'W/"v1"', b'W/"v1"', False),  # weak tags never match for If-Range
        (b'"v1"', b'W/"v1"', False),
        (b'"v1"', None, False),
        (format_http_date(LM), None, True),
        (format_http_date(LM + 1), None, False),
        (b"yesterday", b'"v1"', False),
    ],
)
def test_if_range(if_range: bytes, etag: bytes | None, holds: bool) -> None:
    assert if_range_holds(if_range, etag, LM, NOW) is holds


def test_if_range_date_needs_a_strong_last_modified() -> None:
    # Modified in the second the response was generated: could have changed again unseen.
    assert not if_range_holds(format_http_date(LM), None, LM, LM + 0.5)
    assert not if_range_holds(format_http_date(LM), None, LM, None)


# --------------------------------------------------------------------------------------------
# The bytes an entry builds

BODY = b"0123456789" * 100


def entry(body: bytes = BODY, status: int = 200) -> Entry:
    freshness = Freshness(NOW, 0.0, 60.0, 0.0, 0.0, False, False)
    response = StoredResponse(
        status=status,
        reason=b"OK",
        headers=(
            (b"content-type", b"text/plain"),
            (b"etag", b'"v1"'),
            (b"date", format_http_date(NOW)),
        ),
        body=body,
        freshness=freshness,
    )
    return Entry(response, key=b"k", primary=b"k", url=b"/x")


def split(wire: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = wire.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return status, dict(line.split(b": ", 1) for line in lines), body


def test_a_single_range_is_a_206_with_content_range() -> None:
    wire = entry().wire_range(b"bytes=10-14", None, NOW + 2)
    assert wire is not None
    status, headers, body = split(wire)
    assert status == b"HTTP/1.1 206 Partial Content"
    assert (headers[b"content-range"], headers[b"content-length"], body) == (
        b"bytes 10-14/1000",
        b"5",
        b"01234",
    )
    assert headers[b"etag"] == b'"v1"' and headers[b"age"] == b"2"


def test_several_ranges_are_multipart_byteranges() -> None:
    wire = entry().wire_range(b"bytes=0-2, 995-", None, NOW)
    assert wire is not None
    _, headers, body = split(wire)
    kind, _, boundary = headers[b"content-type"].partition(b"; boundary=")
    assert kind == b"multipart/byteranges" and len(boundary) == 24
    assert int(headers[b"content-length"]) == len(body)
    parts = body.split(b"--" + boundary)
    assert parts[0] == b"\r\n" and parts[-1] == b"--\r\n"
    first = b"\r\ncontent-type: text/plain\r\ncontent-range: bytes 0-2/1000\r\n\r\n012\r\n"
    assert parts[1] == first
    assert parts[2].endswith(b"content-range: bytes 995-999/1000\r\n\r\n56789\r\n")


def test_unsatisfiable_is_416_with_the_length() -> None:
    wire = entry().wire_range(b"bytes=1000-", None, NOW)
    assert wire is not None
    status, headers, body = split(wire)
    assert status == b"HTTP/1.1 416 Range Not Satisfiable"
    assert headers[b"content-range"] == b"bytes */1000" and body == b""


@pytest.mark.parametrize(
    ("value", "if_range", "status"),
    [
        (b"bytes=0-1", b'"v2"', 200),  # If-Range failed
        (b"bytes=0-1", b'"v1"', 206),
        (b"bytes=0-1,3-4", None, 200),  # multipart larger than 10 bytes
        (b"bytes=x", None, 200),
    ],
)
def test_the_whole_response_when_a_range_does_not_apply(
    value: bytes, if_range: bytes | None, status: int
) -> None:
    small = entry(b"0123456789")
    wire = small.wire_range(value, if_range, NOW)
    assert (206 if wire is not None else 200) == status


def test_only_200_responses_are_ranged() -> None:
    assert entry(status=404).wire_range(b"bytes=0-1", None, NOW) is None
