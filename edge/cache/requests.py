"""What the cache reads from a request's head, once: its key and the fields that decide a lookup
(RFC 9111 request directives, conditionals, the coding it accepts, a range).  ``HttpCache``
keeps one ``RequestReader``; the edge keeps each memoised request head's ``Prepared`` with it,
so a repeated request skips this work."""

from __future__ import annotations

from dataclasses import replace
from typing import Final, NamedTuple

from edge.memos import SERVED_CODINGS, BoundedMemo

from .key import CacheKey, Coding, KeyBuilder, Negotiator, coding_class
from .messages import RequestInfo
from .policy import NO_DIRECTIVES, Headers, parse_cache_control

# Prepared is made per first-sight request: a NamedTuple, because a frozen dataclass's
# __init__ costs about five times as much.


class Prepared(NamedTuple):
    """``HttpCache.prepare``'s result: what a lookup needs from the request alone."""

    keys: KeyBuilder
    method: bytes
    scheme: bytes
    host: bytes
    target: bytes
    headers: Headers
    key: CacheKey | None
    #: Set when the cache has nothing to do with the request (also when ``bypass`` is set).
    request: RequestInfo | None
    #: The BYPASS reason, or "".
    bypass: str


_CACHE_CONTROL, _AUTHORIZATION, _IF_NONE_MATCH, _IF_MODIFIED_SINCE = 0, 1, 2, 3
_ACCEPT_ENCODING, _PRECONDITION, _BODY, _COOKIE = 4, 5, 6, 7
_RANGE, _IF_RANGE = 8, 9
_FIELDS: Final = {
    b"cache-control": _CACHE_CONTROL,
    b"authorization": _AUTHORIZATION,
    b"if-none-match": _IF_NONE_MATCH,
    b"if-modified-since": _IF_MODIFIED_SINCE,
    b"accept-encoding": _ACCEPT_ENCODING,
    # Preconditions only an origin can evaluate (RFC 9111 4.3.2): such requests bypass.
    b"if-match": _PRECONDITION,
    b"if-unmodified-since": _PRECONDITION,
    # Range and If-Range are answered from the stored complete response (ranges.py).
    b"range": _RANGE,
    b"if-range": _IF_RANGE,
    b"content-length": _BODY,
    b"transfer-encoding": _BODY,
    b"cookie": _COOKIE,
}
#: The request fields a lookup reads (``RequestReader.read``).
READ_FIELDS: Final = frozenset(_FIELDS)


class RequestReader:
    """Reads requests for one cache (module docstring)."""

    __slots__ = ("_codings", "_honour_no_cache", "_negotiate")

    def __init__(self, negotiate: Negotiator, honour_no_cache: bool) -> None:
        self._negotiate = negotiate
        #: Whether a client's ``no-cache`` and ``max-age`` are obeyed (``HttpCache``).
        self._honour_no_cache = honour_no_cache
        #: ``edge.memos.SERVED_CODINGS``: Accept-Encoding value -> the coding served.
        self._codings: BoundedMemo[bytes | None, Coding] = BoundedMemo(SERVED_CODINGS)

    def prepare(
        self,
        keys: KeyBuilder,
        enabled: bool,
        method: bytes,
        scheme: bytes,
        host: bytes,
        target: bytes,
        headers: Headers,
    ) -> Prepared:
        """Everything a lookup derives from the request alone (``HttpCache.prepare``)."""
        if not enabled:
            return Prepared(keys, method, scheme, host, target, headers, None, None, "disabled")
        head = method == b"HEAD"
        if not head and method != b"GET":
            return Prepared(keys, method, scheme, host, target, headers, None, None, "method")
        key = keys.build(scheme, host, target)
        if key.rule.bypass:
            return Prepared(keys, method, scheme, host, target, headers, key, None, "rule")
        read = self.read(head, headers)
        if isinstance(read, str):
            return Prepared(keys, method, scheme, host, target, headers, key, None, read)
        return Prepared(keys, method, scheme, host, target, headers, key, read, "")

    def prepare_read(
        self,
        keys: KeyBuilder,
        method: bytes,
        scheme: bytes,
        host: bytes,
        target: bytes,
        read: RequestInfo,
    ) -> Prepared:
        """``prepare`` for a GET or HEAD whose headers were read before (``read``: what
        ``read`` made of headers like them, carrying this request's own).  The key is built
        without its memo: such a request is one seen for the first time."""
        key = keys.build_once(scheme, host, target)
        if key.rule.bypass:
            return Prepared(keys, method, scheme, host, target, read.headers, key, None, "rule")
        return Prepared(keys, method, scheme, host, target, read.headers, key, read, "")

    def read(self, head: bool, headers: Headers) -> RequestInfo | str:
        """What a GET (or with ``head``, a HEAD) with these headers means to a lookup, whatever
        its target: its ``RequestInfo``, or the reason it bypasses the cache."""
        found: list[bytes | None] = [None, None, None, None, None, None, None, None, None, None]
        for name, value in headers:
            slot = _FIELDS.get(name)
            if slot is None:
                continue
            if slot == _BODY:
                if name == b"transfer-encoding" or value.strip() not in (b"0", b""):
                    return "request-body"
                continue
            previous = found[slot]
            # List-valued fields arrive on several lines: join them (RFC 9110 5.3).
            found[slot] = value if previous is None else previous + b"," + value
        if found[_PRECONDITION] is not None:
            return "precondition"
        cc_raw = found[_CACHE_CONTROL]
        cc = NO_DIRECTIVES
        if cc_raw is not None:
            cc = parse_cache_control(cc_raw)
            if not self._honour_no_cache and (cc.no_cache or cc.max_age is not None):
                cc = replace(cc, no_cache=False, max_age=None)
        accept_encoding = found[_ACCEPT_ENCODING]
        coding = self._codings.get(accept_encoding)
        if coding is None:
            coding = coding_class(self._negotiate, accept_encoding)
            if len(self._codings) >= self._codings.bound:  # a client can send any value
                self._codings.clear()
            self._codings[accept_encoding] = coding
        return RequestInfo(
            headers=headers,
            cc=cc,
            coding=coding,
            head=head,
            authorized=found[_AUTHORIZATION] is not None,
            if_none_match=found[_IF_NONE_MATCH],
            if_modified_since=found[_IF_MODIFIED_SINCE],
            cookie=found[_COOKIE] is not None,
            range=None if head else found[_RANGE],
            if_range=found[_IF_RANGE],
        )


__all__ = ["READ_FIELDS", "Prepared", "RequestReader"]
