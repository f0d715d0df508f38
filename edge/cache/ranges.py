"""Byte ranges answered from a stored complete response (RFC 9110 14), as pure functions.

The cache never stores a partial response: a Range request on a miss fills with the whole
representation (``policy.upstream_request_headers`` drops Range) and is answered from it.

A Range header is hostile input until shown otherwise (CVE-2011-3192: thousands of overlapping
ranges made Apache build a response many times the size of the file).  As nginx does, a request
for more than ``MAX_RANGES`` ranges, or for ranges that add up to more than the whole body
(overlaps), gets the whole response (200), which is always a valid answer to a Range request.
"""

from __future__ import annotations

import secrets
from typing import Final

from .policy import opaque_tag, parse_http_date

#: More ranges than this in one request: the whole response instead (nginx's max_ranges knob;
#: Apache's MaxRanges defaults to 200, browsers and download managers ask for one).
MAX_RANGES: Final = 16
#: A Range value longer than this is not parsed at all (16 ranges of 20-digit positions fit).
MAX_RANGE_VALUE: Final = 1024
#: Positions with more digits than this are beyond any body (and would cost int() time).
_MAX_DIGITS: Final = 18
#: Bytes a multipart/byteranges part adds besides its data, not counting its Content-Type:
#: CRLF, "--" boundary CRLF, "content-range: bytes a-b/n" CRLF CRLF (boundary of 24).
PART_OVERHEAD: Final = 2 + 2 + 24 + 2 + 16 + 3 * _MAX_DIGITS + 4

Span = tuple[int, int]
"""A range as (first, last) byte positions, both included (the Content-Range form)."""
#: ``parse_range``'s answer when the Range is valid but no range in it is satisfiable (416).
UNSATISFIABLE: Final[tuple[Span, ...]] = ()


def _position(text: str) -> int | None:
    if not text or not text.isascii() or not text.isdigit():
        return None
    if len(text) > _MAX_DIGITS:
        return 10**_MAX_DIGITS  # past the end of any body we store
    return int(text)


def parse_range(value: bytes, length: int) -> tuple[Span, ...] | None:
    """The spans a ``Range`` value asks of a body of ``length`` bytes, in the order asked.

    None: serve the whole response (not a bytes range, a malformed value, an empty body, too
    many ranges, or ranges adding up to more than the body).  ``UNSATISFIABLE`` (empty): a valid
    value none of whose ranges starts within the body (416).  Last positions past the end are
    clamped to it (RFC 9110 14.1.2).  Never raises.
    """
    if length <= 0 or len(value) > MAX_RANGE_VALUE:
        return None
    text = value.decode("latin-1")
    unit, equals, range_set = text.partition("=")
    if not equals or unit.strip(" \t").lower() != "bytes":
        return None
    specs = [spec.strip(" \t") for spec in range_set.split(",")]
    specs = [spec for spec in specs if spec]  # empty list elements are allowed (RFC 9110 5.6.1)
    if not specs or len(specs) > MAX_RANGES:
        return None
    spans: list[Span] = []
    for spec in specs:
        first_text, dash, last_text = spec.partition("-")
        if not dash:
            return None
        if not first_text:  # suffix-range: the last N bytes
            suffix = _position(last_text)
            if suffix is None:
                return None
            if suffix > 0:
                spans.append((max(0, length - suffix), length - 1))
            continue
        first = _position(first_text)
        last = _position(last_text) if last_text else length - 1
        if first is None or last is None or (last_text and last < first):
            return None  # invalid: the whole value is ignored
        if first < length:
            spans.append((first, min(last, length - 1)))
    if not spans:
        return UNSATISFIABLE
    if sum(last - first + 1 for first, last in spans) > length:
        return None  # overlapping ranges: never more bytes than the body itself
    return tuple(spans)


def worth_multipart(spans: tuple[Span, ...], length: int, content_type: bytes | None) -> bool:
    """Whether a multipart/byteranges answer is smaller than the whole body (else send 200)."""
    per_part = PART_OVERHEAD + (len(content_type) + 16 if content_type else 0)
    return sum(last - first + 1 + per_part for first, last in spans) < length


def if_range_holds(
    if_range: bytes, etag: bytes | None, last_modified: float | None, date: float | None
) -> bool:
    """RFC 9110 13.1.5: whether a Range guarded by ``If-Range`` applies to the stored response.

    An entity tag must match the stored one by strong comparison (neither weak); a date must
    equal Last-Modified exactly, and that Last-Modified must be a strong validator (at least a
    second older than the response's Date, RFC 9110 8.8.2.2).  Otherwise the whole response.
    """
    value = if_range.strip()
    if value.startswith((b'"', b"W/")):
        if etag is None or value.startswith(b"W/") or etag.startswith(b"W/"):
            return False
        return value == etag.strip() and opaque_tag(value) == value
    since = parse_http_date(value)
    if since is None or last_modified is None or since != last_modified:
        return False
    return date is not None and date - last_modified >= 1.0


def content_range(span: Span, length: int) -> bytes:
    return b"bytes %d-%d/%d" % (span[0], span[1], length)


def partial_content(
    body: bytes, spans: tuple[Span, ...], content_type: bytes | None, header_lines: list[bytes]
) -> tuple[list[bytes], bytes] | None:
    """The 206's status line and header lines (``header_lines``: the stored response's, one
    ``name: value\r\n`` each; Content-Range and Content-Length added) and its payload, or None
    when a multipart answer is not worth it (``worth_multipart``): the whole body is then."""
    length = len(body)
    lines = [b"HTTP/1.1 206 Partial Content\r\n"]
    if len(spans) == 1:
        first, last = spans[0]
        lines.extend(header_lines)
        lines.append(b"content-range: " + content_range(spans[0], length) + b"\r\n")
        lines.append(b"content-length: %d\r\n" % (last - first + 1))
        return lines, body[first : last + 1]
    if not worth_multipart(spans, length, content_type):
        return None
    boundary = secrets.token_hex(12).encode("ascii")  # 24 characters, as budgeted
    type_line = b"content-type: " + content_type + b"\r\n" if content_type else b""
    parts: list[bytes] = []
    for span in spans:
        parts.append(b"\r\n--" + boundary + b"\r\n" + type_line)
        parts.append(b"content-range: " + content_range(span, length) + b"\r\n\r\n")
        parts.append(body[span[0] : span[1] + 1])
    parts.append(b"\r\n--" + boundary + b"--\r\n")
    payload = b"".join(parts)
    lines.extend(line for line in header_lines if not line.startswith(b"content-type:"))
    lines.append(b"content-type: multipart/byteranges; boundary=" + boundary + b"\r\n")
    lines.append(b"content-length: %d\r\n" % len(payload))
    return lines, payload


__all__ = [
    "MAX_RANGES",
    "MAX_RANGE_VALUE",
    "PART_OVERHEAD",
    "UNSATISFIABLE",
    "Span",
    "content_range",
    "if_range_holds",
    "parse_range",
    "partial_content",
    "worth_multipart",
]
