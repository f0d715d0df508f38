"""The cache's view of the two messages it deals in: a request's cache-relevant fields, parsed
once (``RequestInfo``), and a complete upstream response as the edge's ``fetch`` returns it
(``UpstreamResponse``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

from .key import Coding
from .policy import CacheControl, Header, Headers

# RequestInfo is made per request: a NamedTuple, because a frozen dataclass's __init__ costs
# about five times as much, which would show in a cache hit.


class RequestInfo(NamedTuple):
    """What the cache parsed from a request's headers, reused by ``fill``/``refresh``."""

    headers: Headers
    cc: CacheControl
    coding: Coding
    head: bool
    authorized: bool
    if_none_match: bytes | None
    if_modified_since: bytes | None
    #: The request carries a Cookie: stored only with the origin's own freshness (policy).
    cookie: bool = False
    #: GET only (a HEAD's Range is ignored, RFC 9110 14.2): answered from the whole response.
    range: bytes | None = None
    if_range: bytes | None = None


class UpstreamResponse(NamedTuple):
    """A complete upstream response, as the edge's ``fetch`` returns it."""

    status: int
    headers: Sequence[Header]
    body: bytes
    reason: bytes = b""
    #: The edge's verdict: worth compressing (type, size, no Set-Cookie, route allows it).
    compressible: bool = False
    #: False when ``body`` is not the whole body: the edge streams the rest to its client
    #: itself (a response ``storable_head`` refused, or one too large to buffer).  Such a
    #: response is never stored; it still counts as the origin's answer (304/5xx handling,
    #: superseding a stored response).
    complete: bool = True


#: ``async fetch(validators) -> UpstreamResponse``; see ``edge.cache``'s docstring.
Fetch = Callable[[list[Header]], Awaitable[UpstreamResponse]]


def truncated(response: UpstreamResponse) -> bool:
    """Whether the body is shorter than the Content-Length announced."""
    for name, value in response.headers:
        if name == b"content-length":
            return value.strip() != b"%d" % len(response.body)
    return False


__all__ = ["Fetch", "RequestInfo", "UpstreamResponse", "truncated"]
