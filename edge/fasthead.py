"""The common request head, parsed in one regular-expression pass instead of llhttp's callbacks.

Almost every request an exchange's edge answers is a bodiless HTTP/1.1 ``GET`` (or ``HEAD``) of
an origin-form target whose whole head arrives in one read.  llhttp parses it fine, but through
a Python callback per header (``on_header``) plus three more per message, which cost more than
the cache hit they lead to.  ``parse_simple_head`` takes exactly that common shape, validated by
one compiled pattern that is stricter than llhttp (token names without ``_``, values of visible
ASCII, spaces and tabs only, no obs-fold, no body framing, one Host, no ``Connection`` but
``keep-alive``, no ``Upgrade``/``Expect``), and returns ``None`` for anything else, which then
goes through llhttp and every check of ``edge.protocol`` as before.  What it accepts, it must
decide exactly as the full parser would: ``tests/test_fasthead.py`` proves it, with hypothesis,
against ``EdgeConnection`` driven by the same bytes.

``MeaningKey`` strips from a head the fields that change on every request but never what a cache
hit answers (User-Agent, Cookie, the request ID), so that a client population sending the same
request with new header bytes each time still finds the hit it memoised (``edge.protocol``).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Final, NamedTuple

from edge.http1 import Headers, RequestRejected, valid_request_id
from edge.request_target import decide_target, screen_headers

#: A field name (RFC 9110 token) without ``_``: a name with one needs ``screen_headers``.
_TOKEN: Final = rb"[!#$%&'*+\-.^`|~0-9A-Za-z]+"
#: A field value: visible ASCII with spaces/tabs after its first character (llhttp keeps
#: trailing whitespace in the value, and so do we; leading OWS is not part of it).
_VALUE: Final = rb"(?:[!-~][ \t!-~]*)?"
_FIELD_LINE: Final = _TOKEN + rb":[ \t]*" + _VALUE + rb"\r\n"
_HEAD: Final = re.compile(rb"(GET|HEAD) (/[!-~]*) HTTP/1\.1\r\n((?:" + _FIELD_LINE + rb")*)\r\n")
_FIELD: Final = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")\r\n")

_HOST: Final = b"host"
#: Fields that send a head to the full parser: body framing, connection management, upgrades.
_DECLINED: Final = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"te",
        b"trailer",
        b"http2-settings",
    }
)
_CONNECTION: Final = b"connection"
_KEEP_ALIVE: Final = b"keep-alive"
_METHODS: Final = {b"GET": "GET", b"HEAD": "HEAD"}


class SimpleHead(NamedTuple):
    """A head ``parse_simple_head`` accepted: what ``ProxyRequest`` needs of it."""

    method: str
    target: bytes
    path: str
    host: bytes | None
    headers: Headers
    #: The client's request ID when it sent a valid one (the first such field), else None.
    supplied_id: bytes | None


def parse_simple_head(
    data: bytes,
    *,
    request_id_header: bytes,
    max_headers: int,
    max_header_bytes: int,
    max_url: int,
) -> SimpleHead | None:
    """``data`` as exactly one bodiless keep-alive HTTP/1.1 GET/HEAD head, or None.

    None means "not this shape" (or "invalid": the full parser then says how), never a
    verdict.  The limits are the edge's (``edge.limits``): a head near one goes the long way.
    """
    if len(data) > max_header_bytes:
        return None
    match = _HEAD.fullmatch(data)
    if match is None:
        return None
    method, target, block = match.groups()
    if len(target) > max_url:
        return None
    fields = _FIELD.findall(block)
    if len(fields) > max_headers:
        return None
    headers: Headers = []
    host: bytes | None = None
    supplied: bytes | None = None
    for name, value in fields:
        name = name.lower()
        headers.append((name, value))
        if name == _HOST:
            if host is not None:
                return None  # two Hosts: a 400 the full parser gives
            host = value
        elif name == request_id_header:
            if supplied is None:
                supplied = value
        elif name == _CONNECTION:
            if value.lower() != _KEEP_ALIVE:
                return None
        elif name in _DECLINED:
            return None
    if host is None:
        return None
    try:
        decided = decide_target(target, host, "1.1")
    except RequestRejected:
        return None
    if decided.host != host:
        headers = screen_headers(headers, decided.host)
    return SimpleHead(
        _METHODS[method],
        decided.target,
        decided.path,
        decided.host,
        headers,
        supplied if supplied is not None and valid_request_id(supplied) else None,
    )


class Volatile(NamedTuple):
    """What ``MeaningKey.split`` found of one head."""

    #: The head without its volatile fields (plus a marker of which were there), or the head
    #: itself when it had none.
    key: bytes
    #: The client's request ID (the first such field), valid or not; None when absent.
    request_id: bytes | None
    #: ``re.split``'s pieces (kept, name, value, kept, ...): ``fields`` reads the stripped
    #: fields from them; empty when none.
    parts: list[bytes] | tuple[()] = ()

    def fields(self) -> Headers:
        """The stripped fields, in order, as ``(lower-case name, value)``."""
        parts = self.parts
        return [(parts[i].lower(), parts[i + 1]) for i in range(1, len(parts), 3)]

    def in_order(self, kept: Headers) -> tuple[Headers, bool] | None:
        """The head's fields in the order the client sent them, and whether one is a Cookie:
        ``kept`` (its other fields, one per line, in order: a ``HeadShape``'s) with the
        stripped ones put back where they were.  None when ``kept`` does not hold one field
        per line kept (the caller then parses the head in full)."""
        parts = self.parts
        if not parts:
            return kept, False
        # Each kept piece holds one field per "\n" in it (the split takes the "\n" before a
        # stripped line and the "\r" after it); the last also ends the head ("\r\n\r\n").
        fields: Headers = []
        cookie = False
        at = 0
        for index in range(0, len(parts) - 1, 3):
            upto = at + parts[index].count(b"\n")
            fields += kept[at:upto]
            at = upto
            name = parts[index + 1].lower()
            cookie = cookie or name == b"cookie"
            fields.append((name, parts[index + 2]))
        if parts[-1].count(b"\n") - 2 != len(kept) - at:
            return None
        fields += kept[at:]
        return fields, cookie


class MeaningKey:
    """Heads that differ only in fields a cache hit never depends on, mapped to one key.

    Stripped: ``User-Agent``, ``Cookie`` and the request ID field, each only as a whole,
    well-formed line (anything odd stays in the key, so the head finds no memo and is parsed in
    full).  What they mean to the answer is kept beside the key: whether a Cookie was sent
    (the cache's rules treat such requests apart) and the request ID (echoed).  The caller must
    still refuse a memoised hit whose stored response varies on a stripped field
    (``STRIPPED``).
    """

    #: Fields stripped from the key (besides the request ID field, which is configurable).
    STRIPPED: Final = frozenset({b"user-agent", b"cookie"})

    __slots__ = ("_pattern", "_request_id", "stripped")

    def __init__(self, request_id_header: bytes) -> None:
        self._request_id = request_id_header
        self.stripped = stripped_fields(request_id_header)
        names = b"|".join(_any_case(name) for name in sorted(self.stripped))
        # A whole line after a line end, not followed by a continuation (obs-fold) line.  The
        # separator is "\n<line>\r" (the "\r\n" around it stays in the key, as if the line had
        # been cut with its own "\r\n"): a pattern that starts with a literal lets the regex
        # engine jump from line end to line end, and names spelt as character classes instead
        # of IGNORECASE keep it that way (2.6 -> 1.1 us a head).
        self._pattern = re.compile(
            rb"\n(" + names + rb"):[ \t]*(" + _VALUE + rb")\r(?=\n(?![ \t]))"
        )

    def split(self, data: bytes) -> Volatile:
        parts = self._pattern.split(data)
        if len(parts) == 1:
            return _volatile(Volatile, (data, None, ()))
        request_id: bytes | None = None
        cookie = False
        request_id_name = self._request_id
        for index in range(1, len(parts), 3):
            name = parts[index].lower()
            if name == request_id_name:
                if request_id is None:
                    request_id = parts[index + 1]
            elif name == b"cookie":
                cookie = True
        # No head ends in NUL: a stripped key never equals a real head's bytes.
        kept = parts[::3]
        kept.append(b"\x00c" if cookie else b"\x00")
        return _volatile(Volatile, (b"".join(kept), request_id, parts))


#: ``Volatile``'s constructor without its generated ``__new__`` (one made per request).
_volatile: Final = tuple.__new__


def _any_case(name: bytes) -> bytes:
    """``name`` as a pattern matching it in any letter case (``[Cc][Oo]...``)."""
    return b"".join(
        b"[%c%c]" % (c, c ^ 0x20) if 0x61 <= c <= 0x7A else re.escape(bytes([c])) for c in name
    )


@cache
def stripped_fields(request_id_header: bytes) -> frozenset[bytes]:
    """The fields ``MeaningKey(request_id_header)`` strips (a memoised hit must not vary on
    them: ``HttpCache.memo_hit``'s ``unshared``)."""
    return MeaningKey.STRIPPED | {request_id_header}


__all__ = ["MeaningKey", "SimpleHead", "Volatile", "parse_simple_head", "stripped_fields"]
