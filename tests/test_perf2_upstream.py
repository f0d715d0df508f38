"""The upstream reader's framing, looked at line by line as the head arrives (``on_header``),
gives what it gave when the final head's lines were looked at once (``on_headers_complete``).

``_LoopReader`` is the reader with the framing found as it was before (its own
``on_header`` and ``on_headers_complete``, as they were): both read the same bytes, cut at the
same points, and must agree on everything they report, errors included.  In memory."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.upstream_wire import (
    MAX_HEADERS,
    ResponseHead,
    ResponseReader,
    UpstreamBodyError,
    UpstreamProtocolError,
    _Stop,
)
from tests.test_upstream_wire import _split


class _LoopReader(ResponseReader):
    """The framing from the final head's lines in one loop, as the reader found it before."""

    __slots__ = ()

    def next(self, *, head_request: bool = False) -> ResponseReader:
        following = super().next(head_request=head_request)
        return following if following is self else _LoopReader(head_request=head_request)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            self._error = f"over {MAX_HEADERS} header lines"
            raise _Stop
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                self._error = "101 Switching Protocols, no upgrade was asked for"
                raise _Stop
            self._headers = []
            self._reason = b""
            return
        length: int | None = None
        chunked = False
        keep_alive = parser.should_keep_alive() or parser.get_http_version() == "1.1"
        for name, value in self._headers:
            size = len(name)
            if size == 14 or size == 17 or size == 10:
                lowered = name.lower()
                if lowered == b"content-length":
                    length = int(value)
                elif lowered == b"transfer-encoding":
                    chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
                elif lowered == b"connection" and b"close" in value.lower():
                    keep_alive = False
        no_body = self.head_request or status in (204, 304)
        if no_body or chunked:
            length = None
        close_delimited = length is None and not chunked and not no_body
        self._until_close = close_delimited
        self._reuse = keep_alive and not close_delimited
        self.head = ResponseHead(status, self._reason, self._headers, length, keep_alive)
        self._in_head = False
        if no_body:
            self._finish()


LENGTHS = [b"Content-Length", b"content-length", b"CONTENT-LENGTH"]
CODINGS = [b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-ENCODING"]
CONNECTIONS = [b"Connection", b"connection", b"CONNECTION"]
#: Other names, some of the framing names' lengths.
OTHERS = [b"Xontent-Length", b"X-Transfer-Codin", b"Keep-Alive", b"Content-Type", b"X-A"]
VALUES = [b"0", b"3", b"12", b"close", b"Close", b"keep-alive", b"upgrade, CLOSE", b"chunked"]
VALUES += [b"gzip, chunked", b"chunked, gzip", b"identity", b"", b"1x"]

CHUNKED = [b"chunked", b"gzip, chunked", b"Chunked", b"gzip , CHUNKED"]
CLOSES = [b"close", b"Close", b"keep-alive", b"upgrade, CLOSE"]
line = st.one_of(
    st.tuples(st.sampled_from(LENGTHS), st.sampled_from([b"0", b"3", b"12", b"1x"])),
    st.tuples(
        st.sampled_from(CODINGS),
        st.sampled_from([b"chunked", b"gzip, chunked", b"Chunked", b"chunked, gzip", b"gzip"]),
    ),
    st.tuples(
        st.sampled_from(CONNECTIONS),
        st.sampled_from([b"close", b"Close", b"keep-alive", b"upgrade, CLOSE", b""]),
    ),
    st.tuples(st.sampled_from(OTHERS), st.sampled_from(VALUES)),
)
lines = st.lists(line, max_size=5)
#: Lines an interim head may carry without being refused (framing ones included).
interim_lines = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(LENGTHS), st.sampled_from([b"0", b"3"])),
        st.tuples(st.sampled_from(CODINGS), st.sampled_from(CHUNKED)),
        st.tuples(st.sampled_from(OTHERS), st.just(b"1")),
    ),
    min_size=1,
    max_size=3,
)


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    """One or two answers (interim heads; framed by a length, chunked with trailers, by the
    close, or by any lines at all), as an origin may send them, well formed or not."""
    raw = b""
    for _ in range(draw(st.integers(min_value=1, max_value=2))):
        for interim in draw(st.lists(st.sampled_from([100, 103]), max_size=2)):
            raw += b"HTTP/1.1 %d Wait\r\n" % interim
            raw += b"".join(b"%s: %s\r\n" % line for line in draw(interim_lines)) + b"\r\n"
        version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
        status = draw(st.sampled_from([200, 200, 204, 206, 304, 404]))
        body = draw(st.binary(max_size=20))
        framing = draw(st.sampled_from(["length", "chunked", "close", "any"]))
        head = draw(st.lists(line, max_size=3)) if framing == "any" else []
        head += draw(st.lists(st.tuples(st.sampled_from(OTHERS + CONNECTIONS), st.just(b"1"))))
        if framing == "length":
            head.append((draw(st.sampled_from(LENGTHS)), b"%d" % len(body)))
        elif framing == "chunked":
            head.append((draw(st.sampled_from(CODINGS)), draw(st.sampled_from(CHUNKED))))
            trailers = b"".join(
                b"%s: 1\r\n" % name for name in draw(st.lists(st.sampled_from(OTHERS)))
            )
            body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n"
            body += trailers + b"\r\n"
        if draw(st.booleans()):
            head.append((draw(st.sampled_from(CONNECTIONS)), draw(st.sampled_from(CLOSES))))
        head = draw(st.permutations(head))
        raw += b"HTTP/%s %d OK\r\n" % (version, status)
        raw += b"".join(b"%s: %s\r\n" % line for line in head) + b"\r\n" + body
    return raw


def _outcome(reader: ResponseReader, pieces: list[bytes], eof: bool) -> list[tuple[object, ...]]:
    """What the reader reported after each piece (and the close), its next answer's too."""
    seen: list[tuple[object, ...]] = []
    for piece in pieces:
        try:
            reader.feed(piece)
        except (UpstreamProtocolError, UpstreamBodyError) as exc:
            seen.append((type(exc), str(exc)))
            return seen
        seen.append(
            (reader.head, reader.take(), reader.complete, reader.reusable, reader.parser_clean)
        )
        if reader.complete and reader.reusable:
            following = reader.next()
            seen.append(("next", following is reader))
            reader = following
    if eof:
        try:
            reader.feed_eof()
        except (UpstreamProtocolError, UpstreamBodyError) as exc:
            seen.append((type(exc), str(exc)))
            return seen
        seen.append((reader.head, reader.take(), reader.complete, reader.reusable))
    return seen


@settings(max_examples=600, deadline=None)
@given(
    raw=responses(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=4),
    head_request=st.booleans(),
    eof=st.booleans(),
)
def test_framing_seen_line_by_line_reads_as_the_final_head_looked_at_once(
    raw: bytes, cuts: list[int], head_request: bool, eof: bool
) -> None:
    pieces = _split(raw, cuts)
    new = _outcome(ResponseReader(head_request=head_request), pieces, eof)
    old = _outcome(_LoopReader(head_request=head_request), pieces, eof)
    assert new == old


def test_a_head_is_a_tuple_of_its_fields() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
    assert reader.head == (
        200,
        b"OK",
        [(b"Content-Length", b"2"), (b"Connection", b"close")],
        2,
        False,
    )
    assert reader.head is not None and reader.head.content_length == 2
    assert reader.complete and not reader.reusable
