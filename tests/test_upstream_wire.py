"""The upstream response reader over in-memory bytes: framing, interim heads, lies, cuts.

Every case is fed whole and also split at random points (hypothesis): where the bytes are cut
by the network must never change what is read."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.upstream_wire import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    ResponseReader,
    UpstreamBodyError,
    UpstreamProtocolError,
    chunk,
    encode_head,
    has_host,
    header_block,
)


def _split(data: bytes, cuts: tuple[int, ...] | list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return [p for p in pieces if p]


def _read(
    data: bytes,
    cuts: tuple[int, ...] | list[int] = (),
    *,
    head_request: bool = False,
    eof: bool = False,
) -> tuple[ResponseReader, bytes]:
    reader = ResponseReader(head_request=head_request)
    body = b""
    for piece in _split(data, cuts):
        reader.feed(piece)
        body += reader.take()
    if eof:
        reader.feed_eof()
        body += reader.take()
    return reader, body


cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=6)
bodies = st.binary(max_size=3000)


@given(body=bodies, cut=cuts)
def test_a_content_length_body_is_read_whole_and_the_connection_kept(body: bytes, cut: list[int]):
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-A: 1\r\n\r\n" % len(body) + body
    reader, got = _read(raw, cut)
    assert reader.complete and reader.reusable and got == body
    assert reader.head is not None and reader.head.content_length == len(body)
    assert reader.head.headers == [(b"Content-Length", b"%d" % len(body)), (b"X-A", b"1")]


@given(pieces=st.lists(st.binary(min_size=1, max_size=500), max_size=6), cut=cuts)
def test_a_chunked_body_is_dechunked_and_its_trailers_dropped(
    pieces: list[bytes], cut: list[int]
) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(chunk(p) for p in pieces)
        + b"0\r\nX-Trailer: sneaky\r\nSet-Cookie: a=b\r\n\r\n"
    )
    reader, got = _read(raw, cut)
    assert reader.complete and reader.reusable and got == b"".join(pieces)
    assert reader.head is not None and reader.head.content_length is None
    names = [name.lower() for name, _ in reader.head.headers]
    assert b"x-trailer" not in names and b"set-cookie" not in names


def test_a_framing_header_in_trailers_breaks_the_body() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
    with pytest.raises(UpstreamBodyError):
        reader.feed(b"0\r\nContent-Length: 5\r\n\r\n")


@given(body=bodies, cut=cuts)
def test_a_body_without_length_ends_with_the_connection_and_is_never_reused(
    body: bytes, cut: list[int]
) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body
    reader, got = _read(raw, cut)
    assert not reader.complete
    reader.feed_eof()
    got += reader.take()
    assert reader.complete and not reader.reusable and got == body


@given(cut=cuts)
def test_interim_heads_are_skipped(cut: list[int]) -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    )
    reader, got = _read(raw, cut)
    assert reader.head is not None and reader.head.status == 201
    assert reader.head.headers == [(b"Content-Length", b"2")]
    assert reader.head.reason == b"Created"
    assert got == b"ok" and reader.complete and reader.reusable


def test_a_101_nobody_asked_for_is_refused() -> None:
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"
    with pytest.raises(UpstreamProtocolError, match="101"):
        _read(raw)


@given(cut=cuts, length=st.integers(min_value=0, max_value=10**12))
def test_a_head_answer_ends_with_its_head_whatever_length_it_declares(
    cut: list[int], length: int
) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length
    reader, got = _read(raw, cut, head_request=True)
    assert reader.complete and reader.reusable and got == b""
    assert reader.head is not None and reader.head.content_length is None


def test_a_head_answer_followed_by_a_body_spoils_the_connection() -> None:
    reader, got = _read(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", head_request=True)
    assert reader.complete and not reader.reusable and got == b""


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body_and_bytes_after_them_spoil_the_connection(status: int) -> None:
    clean, _ = _read(b"HTTP/1.1 %d X\r\n\r\n" % status)
    assert clean.complete and clean.reusable
    lying, got = _read(b"HTTP/1.1 %d X\r\nContent-Length: 3\r\n\r\nabc" % status)
    assert lying.complete and not lying.reusable and got == b""


@given(
    body=st.binary(min_size=1, max_size=500),
    extra=st.binary(min_size=1, max_size=50).filter(lambda b: b.strip(b"\r\n")),
)
def test_bytes_past_the_declared_length_spoil_the_connection_not_the_answer(
    body: bytes, extra: bytes
) -> None:
    # Bare CR/LF between messages llhttp skips without a callback (harmless: no answer can be
    # made of them); anything else spoils the connection.
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body + extra
    reader, got = _read(raw)
    assert reader.complete and got == body and not reader.reusable
    reader.feed(b"HTTP/1.1 200 OK\r\n\r\n")  # a second answer nobody asked for
    assert not reader.reusable


@given(body=st.binary(min_size=2, max_size=500), cut=cuts, data=st.data())
def test_a_length_cut_short_by_the_close_is_an_error_never_a_clean_end(
    body: bytes, cut: list[int], data: st.DataObject
) -> None:
    sent = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:sent]
    reader, got = _read(raw, cut)
    assert not reader.complete and got == body[:sent]
    with pytest.raises(UpstreamBodyError):
        reader.feed_eof()
    assert not reader.reusable


def test_a_chunked_body_cut_before_its_last_chunk_is_an_error() -> None:
    reader, got = _read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert got == b"abc"
    with pytest.raises(UpstreamBodyError):
        reader.feed_eof()


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header : x\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
    ],
)
def test_what_is_not_a_response_head_is_refused(raw: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        _read(raw)


def test_a_bad_chunk_size_after_the_head_is_a_body_error() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(UpstreamBodyError):
        reader.feed(b"zz\r\nabc\r\n")
    assert not reader.reusable


def test_a_head_without_end_and_too_many_lines_are_refused() -> None:
    endless = ResponseReader()
    endless.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(UpstreamProtocolError, match="head over"):
        for _ in range(MAX_HEAD_BYTES // 1000 + 2):
            endless.feed(b"X-Pad: " + b"a" * 991 + b"\r\n")
    lines = b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1))
    with pytest.raises(UpstreamProtocolError, match="header lines"):
        _read(b"HTTP/1.1 200 OK\r\n" + lines + b"\r\n")


def test_a_head_over_the_bound_is_refused_when_it_arrives_whole_in_one_read() -> None:
    pad = b"X-Pad: " + b"a" * 991 + b"\r\n"
    lines = pad * (MAX_HEAD_BYTES // len(pad) + 1)
    whole = b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\n\r\nok"
    reader = ResponseReader()
    with pytest.raises(UpstreamProtocolError, match="head over"):
        reader.feed(whole)
    assert not reader.reusable
    # Under the bound, with a body that takes the read over it: accepted, the body whole.
    body = b"b" * (MAX_HEAD_BYTES * 2)
    fits = b"HTTP/1.1 200 OK\r\n" + pad * 8 + b"Content-Length: %d\r\n\r\n" % len(body)
    reader = ResponseReader()
    reader.feed(fits + body)
    assert reader.complete and reader.reusable and reader.take() == body


def test_a_close_before_any_byte_is_no_protocol_error_but_inside_the_head_is() -> None:
    silent = ResponseReader()
    silent.feed_eof()  # the shell reports a reset: the classic keep-alive race
    assert silent.head is None and not silent.reusable
    partial = ResponseReader()
    partial.feed(b"HTTP/1.1 200 OK\r\nConte")
    with pytest.raises(UpstreamProtocolError):
        partial.feed_eof()


@pytest.mark.parametrize(
    ("raw", "keep"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", True),
    ],
)
def test_keep_alive_follows_the_version_and_connection_close(raw: bytes, keep: bool) -> None:
    reader, _ = _read(raw)
    assert reader.complete and reader.reusable is keep


@settings(max_examples=300)
@given(st.binary(max_size=400), cuts)
def test_arbitrary_bytes_either_parse_or_raise_an_upstream_error(raw: bytes, cut: list[int]):
    try:
        reader, _ = _read(b"HTTP/1.1 200 OK\r\n" + raw, cut, eof=True)
    except (UpstreamProtocolError, UpstreamBodyError):
        return
    assert reader.head is None or reader.complete


def test_request_heads_carry_the_lines_as_given_and_a_host_only_when_missing() -> None:
    block = header_block([(b"host", b"example.test"), (b"x-a", b"\xff raw")])
    assert has_host(block) and not has_host(b"x-host: a\r\n")
    head = encode_head(b"POST", b"/o?x=1", block, None, b"content-length: 2\r\n")
    assert head == (
        b"POST /o?x=1 HTTP/1.1\r\nhost: example.test\r\nx-a: \xff raw\r\ncontent-length: 2\r\n\r\n"
    )
    bare = encode_head(b"GET", b"/", b"", b"10.0.0.1:8080", b"")
    assert bare == b"GET / HTTP/1.1\r\nhost: 10.0.0.1:8080\r\n\r\n"
    assert chunk(b"abc") == b"3\r\nabc\r\n"


@given(first=bodies, second=bodies, chunked=st.booleans())
def test_a_reader_is_reused_only_after_a_message_its_parser_ended(
    first: bytes, second: bytes, chunked: bool
) -> None:
    def answer(body: bytes) -> bytes:
        if chunked:
            framed = (chunk(body) if body else b"") + b"0\r\n\r\n"
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body

    reader, got = _read(answer(first))
    assert got == first and reader.reusable and reader.parser_clean
    again = reader.next()
    assert again is reader and again.head is None and not again.complete
    again.feed(answer(second))
    assert again.take() == second and again.complete and again.reusable
    # After a HEAD the parser still expects the declared body: never reused.
    head, _ = _read(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", head_request=True)
    assert head.reusable and not head.parser_clean and head.next() is not head
